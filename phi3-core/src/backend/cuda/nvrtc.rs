//! NVRTC: compile one CUDA C++ source to a CUBIN for one GPU architecture.
//!
//! Written on cudarc's `nvrtc::sys`/`result` layers rather than its `compile_ptx` helper because
//! we need (a) headers supplied by name (`common.cuh`), (b) CUBIN output (no PTX JIT in the driver,
//! so a newer NVRTC than the driver is not a problem), and (c) errors instead of panics when the
//! compile log cannot be read. libnvrtc is looked up (dlopen) only when [`available`] is called.

use std::ffi::{c_char, c_int, CString};

use cudarc::nvrtc::{result, sys};

use super::error::{guard, nvrtc};
use crate::error::{Error, ErrorKind, Result};

/// Whether libnvrtc can be loaded (searched as libnvrtc.so, .so.13, .so.12, ... on the library
/// path).
pub(crate) fn available() -> bool {
    // SAFETY: only dlopen()s candidate library names; no symbol is called.
    guard("probe libnvrtc", || Ok(unsafe { sys::is_culib_present() })).unwrap_or(false)
}

fn require() -> Result<()> {
    if available() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unsupported,
            "NVRTC not found (libnvrtc.so.13 / libnvrtc.so.12 on the library path, e.g. \
             LD_LIBRARY_PATH=/usr/local/cuda/lib64): CUDA kernels cannot be compiled",
        ))
    }
}

/// NVRTC's (major, minor) version.
pub(crate) fn version() -> Result<(i32, i32)> {
    require()?;
    guard("nvrtcVersion", || {
        let (mut major, mut minor) = (0 as c_int, 0 as c_int);
        // SAFETY: two valid out-pointers.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| nvrtc("nvrtcVersion", e))?;
        Ok((major, minor))
    })
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here. A failure to destroy
        // leaks the program, which is harmless.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn log(prog: &Program) -> String {
    // SAFETY: a live program.
    match unsafe { result::get_program_log(prog.0) } {
        Ok(chars) => {
            // c_char is i8 on x86-64 and u8 on aarch64: reinterpret the bytes either way.
            let chars: &[u8] = bytemuck::cast_slice(chars.as_slice());
            let bytes: Vec<u8> = chars.iter().copied().take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(e) => format!("(no log: {:?})", e.0),
    }
}

/// Compile `source` (file `name`, which may include the given `headers` by name) for `sm_<arch>`
/// (e.g. 80 for sm_80) with `options`; returns the CUBIN. A compile error is `Device` and carries
/// NVRTC's log.
pub(crate) fn compile_cubin(
    name: &str,
    source: &str,
    headers: &[(&str, &str)],
    arch: u32,
    options: &[&str],
) -> Result<Vec<u8>> {
    require()?;
    guard(&format!("NVRTC compile of {name}"), || {
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| Error::internal(format!("{name}: NUL byte in source")))
        };
        let src = cstr(source)?;
        let cname = cstr(name)?;
        let header_srcs = headers.iter().map(|(_, s)| cstr(s)).collect::<Result<Vec<_>>>()?;
        let header_names = headers.iter().map(|(n, _)| cstr(n)).collect::<Result<Vec<_>>>()?;
        let header_src_ptrs: Vec<*const c_char> = header_srcs.iter().map(|s| s.as_ptr()).collect();
        let header_name_ptrs: Vec<*const c_char> =
            header_names.iter().map(|s| s.as_ptr()).collect();
        let mut raw = std::ptr::null_mut();
        // SAFETY: every pointer refers to a NUL-terminated string that outlives the program
        // (they are dropped at the end of this closure, after `prog`), and the header arrays have
        // `headers.len()` entries.
        unsafe {
            sys::nvrtcCreateProgram(
                &mut raw,
                src.as_ptr(),
                cname.as_ptr(),
                headers.len() as c_int,
                header_src_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            )
        }
        .result()
        .map_err(|e| nvrtc(&format!("create program {name}"), e))?;
        let prog = Program(raw);
        let mut opts = vec![format!("--gpu-architecture=sm_{arch}")];
        opts.extend(options.iter().map(|s| s.to_string()));
        // SAFETY: a live program; options are converted to C strings inside.
        if let Err(e) = unsafe { result::compile_program(prog.0, &opts) } {
            return Err(Error::new(
                ErrorKind::Device,
                format!(
                    "NVRTC: {name} does not compile for sm_{arch} ({:?}, options {opts:?}):\n{}",
                    e.0,
                    log(&prog)
                ),
            ));
        }
        let mut size = 0usize;
        // SAFETY: a compiled program and a valid out-pointer.
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
            .result()
            .map_err(|e| nvrtc(&format!("CUBIN size of {name}"), e))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
        unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| nvrtc(&format!("CUBIN of {name}"), e))?;
        drop(prog);
        drop((src, cname, header_srcs, header_names));
        Ok(cubin)
    })
}

/// The architectures NVRTC can compile for, e.g. `[75, 80, 86, 89, 90, ...]`.
pub(crate) fn supported_archs() -> Result<Vec<u32>> {
    require()?;
    guard("nvrtcGetSupportedArchs", || {
        let mut n: c_int = 0;
        // SAFETY: valid out-pointer.
        unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
            .result()
            .map_err(|e| nvrtc("nvrtcGetNumSupportedArchs", e))?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        // SAFETY: `archs` has room for the `n` entries NVRTC reported.
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| nvrtc("nvrtcGetSupportedArchs", e))?;
        Ok(archs.into_iter().map(|a| a as u32).collect())
    })
}

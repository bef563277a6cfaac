//! Every CUDA kernel compiles with NVRTC for sm_80, sm_86, sm_89 and sm_90 (no GPU needed).
//!
//! libnvrtc is found on the library path (e.g. `LD_LIBRARY_PATH` pointing at the `nvidia/cu13/lib`
//! folder of the pip package `nvidia-cuda-nvrtc`; `scripts/nvrtc-check` sets that up). Without it
//! the test prints a notice and passes, unless `PHI3_REQUIRE_NVRTC=1`, when it fails.

use phi3_core::backend::cuda::kernels::{self, SOURCES};

const ARCHS: [u32; 4] = [80, 86, 89, 90];

#[test]
fn every_kernel_compiles_for_every_architecture() {
    let version = match kernels::nvrtc_version() {
        Ok(v) => v,
        Err(e) => {
            if std::env::var("PHI3_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("PHI3_REQUIRE_NVRTC=1 but NVRTC is unavailable: {e}");
            }
            println!("SKIPPED: kernel compile check needs libnvrtc: {e}");
            return;
        }
    };
    println!("NVRTC {}.{}", version.0, version.1);
    let supported = kernels::nvrtc_supported_archs().unwrap();
    let mut failures = Vec::new();
    for arch in ARCHS {
        assert!(supported.contains(&arch), "NVRTC {version:?} cannot target sm_{arch}");
        for src in SOURCES {
            match kernels::compile(src, arch) {
                Ok(cubin) => println!("{:<14} sm_{arch}: {} bytes", src.name, cubin.len()),
                Err(e) => failures.push(format!("{} sm_{arch}: {e}", src.name)),
            }
        }
    }
    assert!(failures.is_empty(), "kernels failed to compile:\n{}", failures.join("\n\n"));
}

#[test]
fn every_entry_point_is_defined_in_its_source() {
    for src in SOURCES {
        for entry in src.entries {
            let decl = format!("extern \"C\" __global__ void {entry}(");
            let decl_bounds = format!("{entry}(");
            assert!(
                src.source.contains(&decl) || src.source.contains(&decl_bounds),
                "{}: no definition of {entry}",
                src.name
            );
        }
    }
}

/// A source that does not compile is a `Device` error naming the file and the architecture and
/// carrying NVRTC's own log, read back byte by byte (the log is `c_char`s: `i8` on x86-64,
/// `u8` on aarch64).
#[test]
fn a_compile_error_carries_nvrtcs_log() {
    if kernels::nvrtc_version().is_err() {
        if std::env::var("PHI3_REQUIRE_NVRTC").as_deref() == Ok("1") {
            panic!("PHI3_REQUIRE_NVRTC=1 but NVRTC is unavailable");
        }
        println!("SKIPPED: needs libnvrtc");
        return;
    }
    let broken = kernels::KernelSource {
        name: "broken.cu",
        source: "extern \"C\" __global__ void phi3_broken(float* out) { *out = not_declared; }\n",
        entries: &["phi3_broken"],
    };
    let err = kernels::compile(&broken, 80).expect_err("an undeclared identifier compiled");
    let text = err.to_string();
    assert_eq!(err.kind(), phi3_core::ErrorKind::Device, "{err:?}");
    assert!(text.contains("broken.cu does not compile for sm_80"), "{text}");
    assert!(text.contains("not_declared"), "NVRTC's log is missing: {text}");
}

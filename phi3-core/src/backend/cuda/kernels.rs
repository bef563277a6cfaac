//! The kernel sources (`kernels/*.cu`, embedded with `include_str!`), their compilation by NVRTC
//! for the device's architecture, the on-disk CUBIN cache, and the loaded functions.
//!
//! Cache: one file per kernel source, `<dir>/<source>-sm<arch>-nvrtc<major>.<minor>-<hash>.cubin`,
//! where hash is SHA-256 over `common.cuh`, the source and the compile options. `<dir>` is
//! `$PHI3_KERNEL_CACHE`, else `$XDG_CACHE_HOME/phi3-rs/kernels`, else `~/.cache/phi3-rs/kernels`;
//! `PHI3_KERNEL_CACHE=off` disables it. Files are written to a temporary name and renamed, so a
//! concurrent start never reads half a file; a cache file the driver rejects is recompiled and
//! replaced. Cache failures are logged and never fatal.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use sha2::{Digest, Sha256};

use super::error::{guard, DriverResultExt};
use super::nvrtc;
use super::ops::ATTN_TC_SMEM_BYTES;
use crate::error::{Error, ErrorKind, Result};

/// The header every kernel includes as `"common.cuh"`.
pub const COMMON_HEADER: &str = include_str!("../../../../kernels/common.cuh");

/// One `kernels/<name>.cu` and the entry points it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name, e.g. "gemv.cu".
    pub name: &'static str,
    /// The CUDA C++ source.
    pub source: &'static str,
    /// `extern "C" __global__` functions it defines.
    pub entries: &'static [&'static str],
}

/// Every kernel source of the CUDA backend.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "embed.cu",
        source: include_str!("../../../../kernels/embed.cu"),
        entries: &["phi3_embed_bf16", "phi3_embed_f16", "phi3_embed_f32", "phi3_gather_rows_f32"],
    },
    KernelSource {
        name: "rms_norm.cu",
        source: include_str!("../../../../kernels/rms_norm.cu"),
        entries: &["phi3_rms_norm"],
    },
    KernelSource {
        name: "gemv.cu",
        source: include_str!("../../../../kernels/gemv.cu"),
        entries: &["phi3_gemv_bf16", "phi3_gemv_f16", "phi3_gemv_f32"],
    },
    KernelSource {
        name: "decode_gemm.cu",
        source: include_str!("../../../../kernels/decode_gemm.cu"),
        entries: &[
            "phi3_decode_gemm_bf16",
            "phi3_decode_gemm_f16",
            "phi3_decode_gemm_swiglu_bf16",
            "phi3_decode_gemm_swiglu_f16",
        ],
    },
    KernelSource {
        name: "gemv_quant.cu",
        source: include_str!("../../../../kernels/gemv_quant.cu"),
        entries: &[
            "phi3_gemv_int8",
            "phi3_gemv_int4_bf16",
            "phi3_gemv_int4_f16",
            "phi3_gemv_int8_x8",
            "phi3_gemv_int4_bf16_x8",
            "phi3_gemv_int4_f16_x8",
        ],
    },
    KernelSource {
        name: "dequant.cu",
        source: include_str!("../../../../kernels/dequant.cu"),
        entries: &["phi3_dequant_int8", "phi3_dequant_int4_bf16", "phi3_dequant_int4_f16"],
    },
    KernelSource {
        name: "rope_kv.cu",
        source: include_str!("../../../../kernels/rope_kv.cu"),
        entries: &["phi3_rope_store_kv"],
    },
    KernelSource {
        name: "attention.cu",
        source: include_str!("../../../../kernels/attention.cu"),
        entries: &["phi3_attention"],
    },
    KernelSource {
        name: "attention_tc.cu",
        source: include_str!("../../../../kernels/attention_tc.cu"),
        entries: &[
            "phi3_attention_prefill",
            "phi3_attention_prefill_fast",
            "phi3_attention_decode",
            "phi3_attention_decode_fast",
        ],
    },
    KernelSource {
        name: "kv_blocks.cu",
        source: include_str!("../../../../kernels/kv_blocks.cu"),
        entries: &["phi3_copy_kv_blocks"],
    },
    KernelSource {
        name: "swiglu.cu",
        source: include_str!("../../../../kernels/swiglu.cu"),
        entries: &["phi3_swiglu"],
    },
    KernelSource {
        name: "argmax.cu",
        source: include_str!("../../../../kernels/argmax.cu"),
        entries: &["phi3_argmax_rows"],
    },
    KernelSource {
        name: "top_candidates.cu",
        source: include_str!("../../../../kernels/top_candidates.cu"),
        entries: &["phi3_top_candidates"],
    },
    KernelSource {
        name: "convert.cu",
        source: include_str!("../../../../kernels/convert.cu"),
        entries: &[
            "phi3_f32_to_bf16",
            "phi3_f32_to_f16",
            "phi3_fill_f32",
            "phi3_fill_u16",
            "phi3_fill_u8",
        ],
    },
    KernelSource {
        name: "dummy.cu",
        source: include_str!("../../../../kernels/dummy.cu"),
        entries: &[
            "phi3_fill_dummy_bf16",
            "phi3_fill_dummy_f16",
            "phi3_fill_dummy_f32",
            "phi3_fill_random_u8",
        ],
    },
];

/// Sources whose functions take more dynamic shared memory than the default limit of 48 KiB, and
/// how much: the limit of each of their entries is raised at load (every supported GPU has at
/// least 99 KiB per block).
const LARGE_SHARED_MEMORY: &[(&str, u32)] = &[("attention_tc.cu", ATTN_TC_SMEM_BYTES)];

/// NVRTC options besides the architecture. No fast math: softmax and SiLU use the accurate expf.
const OPTIONS: &[&str] = &["--std=c++17"];

/// Compile one source for `sm_<arch>` (no cache, no device): the CI compile check uses this.
pub fn compile(src: &KernelSource, arch: u32) -> Result<Vec<u8>> {
    nvrtc::compile_cubin(src.name, src.source, &[("common.cuh", COMMON_HEADER)], arch, OPTIONS)
}

/// NVRTC's version, or an `Unsupported` error when libnvrtc cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc::version()
}

/// Architectures the loaded NVRTC supports.
pub fn nvrtc_supported_archs() -> Result<Vec<u32>> {
    nvrtc::supported_archs()
}

/// How the kernels of a backend were obtained (shown by `phi3 info` and `phi3 bench`).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelStatus {
    /// Architecture compiled for, e.g. 90 for sm_90.
    pub arch: u32,
    /// NVRTC (major, minor).
    pub nvrtc: (i32, i32),
    /// Sources compiled by NVRTC during this start.
    pub compiled: usize,
    /// Sources loaded from the disk cache.
    pub from_cache: usize,
    /// The cache folder, when caching is on.
    pub cache_dir: Option<PathBuf>,
    /// Wall time spent compiling and loading, in seconds.
    pub seconds: f64,
}

impl std::fmt::Display for KernelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sm_{}, NVRTC {}.{}: {} compiled now, {} loaded from cache ({:.2} s); cache: {}",
            self.arch,
            self.nvrtc.0,
            self.nvrtc.1,
            self.compiled,
            self.from_cache,
            self.seconds,
            self.cache_dir.as_ref().map_or("off".to_string(), |d| d.display().to_string())
        )
    }
}

/// The cache folder (see the module docs), or None when disabled or no home is known.
fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("PHI3_KERNEL_CACHE") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("phi3-rs").join("kernels")),
    }
}

fn cache_file(dir: &std::path::Path, src: &KernelSource, arch: u32, v: (i32, i32)) -> PathBuf {
    let mut h = Sha256::new();
    h.update(COMMON_HEADER);
    h.update([0]);
    h.update(src.source);
    h.update([0]);
    h.update(OPTIONS.join(" "));
    let hash: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let stem = src.name.trim_end_matches(".cu");
    dir.join(format!("{stem}-sm{arch}-nvrtc{}.{}-{hash}.cubin", v.0, v.1))
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Unique per process and call, so two backends created at once (several threads of one
    // process) never write the same temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Every kernel function, loaded into one context.
pub(crate) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
    pub(crate) status: KernelStatus,
}

impl Kernels {
    /// Load every source for `sm_<arch>` into `ctx`: from the disk cache when a valid CUBIN is
    /// there, else compiled by NVRTC (and then cached).
    pub(crate) fn load(ctx: &Arc<CudaContext>, arch: u32) -> Result<Kernels> {
        let started = Instant::now();
        let version = nvrtc::version()?;
        let dir = cache_dir();
        let (mut compiled, mut from_cache) = (0, 0);
        let mut functions = HashMap::new();
        for src in SOURCES {
            let path = dir.as_ref().map(|d| cache_file(d, src, arch, version));
            let cached = path.as_ref().and_then(|p| std::fs::read(p).ok());
            let module = match cached.map(|bin| load_module(ctx, src, bin)) {
                Some(Ok(m)) => {
                    from_cache += 1;
                    m
                }
                other => {
                    if let Some(Err(e)) = other {
                        log::warn!("kernel cache: {}: {e}; recompiling", src.name);
                    }
                    let bin = compile(src, arch)?;
                    compiled += 1;
                    if let Some(p) = &path {
                        if let Err(e) = write_atomically(p, &bin) {
                            log::warn!("kernel cache: cannot write {}: {e}", p.display());
                        }
                    }
                    load_module(ctx, src, bin)?
                }
            };
            for &entry in src.entries {
                let f = guard(entry, || {
                    module.load_function(entry).ctx(&format!("{}: function {entry}", src.name))
                })?;
                if let Some(&(_, bytes)) = LARGE_SHARED_MEMORY.iter().find(|(n, _)| *n == src.name)
                {
                    let attr =
                        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                    guard(entry, || {
                        f.set_attribute(attr, bytes as i32)
                            .ctx(&format!("{entry}: allow {bytes} bytes of shared memory"))
                    })?;
                }
                functions.insert(entry, f);
            }
        }
        let status = KernelStatus {
            arch,
            nvrtc: version,
            compiled,
            from_cache,
            cache_dir: dir,
            seconds: started.elapsed().as_secs_f64(),
        };
        log::info!("CUDA kernels: {status}");
        Ok(Kernels { functions, status })
    }

    /// The function `name` (one of the `entries` of [`SOURCES`]).
    pub(crate) fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| {
            Error::new(ErrorKind::Internal, format!("CUDA kernel {name} is not loaded"))
        })
    }
}

fn load_module(
    ctx: &Arc<CudaContext>,
    src: &KernelSource,
    cubin: Vec<u8>,
) -> Result<Arc<cudarc::driver::CudaModule>> {
    guard(src.name, || ctx.load_module(Ptx::from_binary(cubin)).ctx(&format!("load {}", src.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every source of the shared-memory table is one of [`SOURCES`].
    #[test]
    fn large_shared_memory_names_sources() {
        for (name, _) in LARGE_SHARED_MEMORY {
            assert!(SOURCES.iter().any(|s| s.name == *name), "{name} is no source");
        }
    }
}

//! Software prefetch for the decode kernels, which stream every weight from memory once per token
//! and do little arithmetic on each byte.
//!
//! On the development VM (Xeon, AVX-512) the hardware prefetchers did not keep far enough ahead of
//! the int4 kernel: one core streamed its rows at 5.6 GB/s where a plain read runs at 10-11, as if
//! each line's wait for memory and its arithmetic took turns. Asking for the line a few kilobytes
//! ahead keeps more misses in flight: one token against Phi-3-medium's gate_up on two cores went
//! from 10-18 to 23-24 GB/s in int4 and from 20-22 to 26-32 in bf16 (docs/PERF.md, "Decode
//! kernels that keep memory busy").

/// How far past the bytes being read a kernel asks for the next line. The int4 GEMV above, one
/// run each: 1 KiB 19.2 GB/s, 2 KiB 22.7, 4 KiB 23.9.
const AHEAD_BYTES: usize = 4096;

/// Starts loading the cache line `AHEAD_BYTES` past the start of `data`: for kernels that read
/// one row after another, whose rows lie one after another in memory.
#[inline(always)]
pub(super) fn ahead<T>(data: &[T]) {
    line(data, AHEAD_BYTES)
}

/// For kernels that read `rows` adjacent rows side by side (`row` is one of them, at element
/// `at`): the line `AHEAD_BYTES` further along `row`, or past its end the same place in the
/// row `rows` further on, which the kernel reads side by side with this one next.
#[inline(always)]
pub(super) fn ahead_in_rows<T>(row: &[T], at: usize, rows: usize) {
    let (len, at) = (size_of_val(row), at * size_of::<T>() + AHEAD_BYTES);
    line(row, if at < len { at } else { at + (rows - 1) * len })
}

/// Starts loading the cache line holding byte `at` of `data`. Only a hint: the address is never
/// dereferenced, so it may lie past the end of `data` (it is computed with wrapping arithmetic,
/// and a prefetch does not fault). A no-op off x86-64.
#[inline(always)]
fn line<T>(data: &[T], at: usize) {
    #[cfg(target_arch = "x86_64")]
    // SSE is part of x86-64, so this is a constant `Some`.
    if let Some(sse) = pulp::core_arch::x86::Sse::try_new() {
        let line = data.as_ptr().cast::<i8>().wrapping_add(at);
        sse._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

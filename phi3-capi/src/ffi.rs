//! The panic boundary, the thread-local last error, and argument helpers that turn raw C
//! arguments into Rust values or an `InvalidArgument` error naming the parameter.
//!
//! Every status-returning entry point is `boundary(|| { ... })`: it clears the last error, runs
//! the body under `catch_unwind`, maps `Err(e)` to `e.kind()`'s code and a panic to
//! `PHI3_ERR_INTERNAL`, and records the message (rustls-ffi's `ffi_panic_boundary!`, returning
//! `Result` so `?` works).

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use phi3_core::{Error, ErrorKind, Result};

use crate::status::{phi3_status, status_of, PHI3_ERR_INTERNAL, PHI3_OK};

thread_local! {
    /// Message of this thread's last failed call; empty after a success.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs would truncate the C string; show them instead of dropping the message.
    let clean = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = clean);
}

/// This thread's last error message: "" after a successful call. The pointer stays valid until
/// the next phi3 call on this thread; do not free it. Thread-safe (thread-local); cannot fail.
#[no_mangle]
pub extern "C" fn phi3_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Run an entry point's body: clear the last error, catch panics, map errors to status codes.
/// A success clears the last error again at the end: a failing call made from inside a
/// callback during this one must not leave its message behind a PHI3_OK.
pub(crate) fn boundary(body: impl FnOnce() -> Result<()>) -> phi3_status {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            PHI3_OK
        }
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            status_of(e.kind())
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(&format!("internal error (panic): {text}"));
            PHI3_ERR_INTERNAL
        }
    }
}

/// For entry points that cannot report errors (getters, `_free`): run, and on a panic return
/// `fallback` (rustls-ffi's PanicOrDefault).
pub(crate) fn guarded<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

pub(crate) fn null_arg(name: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("{name} is NULL"))
}

/// A shared reference from a handle pointer.
///
/// # Safety
/// `p` is NULL or a pointer this library returned that has not been freed.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: the caller guarantees p is NULL or a live handle; NULL is rejected here.
    unsafe { p.as_ref() }.ok_or_else(|| null_arg(name))
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid during the call.
pub(crate) unsafe fn arg_cstr<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(null_arg(name));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    utf8(bytes, name)
}

/// A `(pointer, length)` UTF-8 string argument (not necessarily NUL-terminated).
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that stay valid during the call.
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, len: usize, name: &str) -> Result<&'a str> {
    // SAFETY: forwarded contract.
    let bytes = unsafe { arg_slice(p.cast::<u8>(), len, name) }?;
    utf8(bytes, name)
}

fn utf8<'a>(bytes: &'a [u8], name: &str) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{name} is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })
}

/// A `(pointer, count)` array argument; NULL is allowed only when `n` is 0.
///
/// # Safety
/// `p` is NULL or points to `n` readable, initialised elements valid during the call.
pub(crate) unsafe fn arg_slice<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null_arg(name));
    }
    // A slice may not span more than isize::MAX bytes; a larger count is a lie about the buffer.
    if n > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{name}: {n} elements is more than any buffer can hold"),
        ));
    }
    // SAFETY: non-NULL, n elements readable by the caller's contract, n * size <= isize::MAX.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Token ids from C (`int32_t`) as u32, rejecting negatives with the index. Checked in place
/// and reinterpreted, not copied: a count never turns into an allocation here.
pub(crate) fn token_ids<'a>(tokens: &'a [i32], name: &str) -> Result<&'a [u32]> {
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t < 0) {
        return Err(Error::new(
            ErrorKind::TokenOutOfRange,
            format!("{name}[{i}] = {t} is negative"),
        ));
    }
    // Non-negative i32 and u32 have the same bits.
    Ok(bytemuck::cast_slice(tokens))
}

/// An out-pointer checked for NULL before any work, written only on success.
pub(crate) struct Out<T>(*mut T);

/// Check an out-pointer argument up front, naming it when NULL.
pub(crate) fn arg_out<T>(p: *mut T, name: &str) -> Result<Out<T>> {
    if p.is_null() {
        return Err(null_arg(name));
    }
    Ok(Out(p))
}

impl<T> Out<T> {
    /// Store the result.
    ///
    /// # Safety
    /// The pointer is valid, writable and aligned for `T` (the entry point's contract).
    pub(crate) unsafe fn write(self, value: T) {
        // SAFETY: non-NULL (checked by arg_out) and writable by the caller's contract.
        unsafe { self.0.write(value) }
    }

    /// The pointer (non-NULL), for reading a caller's `struct_size` before writing.
    pub(crate) fn as_ptr(&self) -> *const T {
        self.0
    }

    /// Store the first `size` bytes of `value` (a caller's older, smaller version of a struct
    /// that starts with `uint32_t struct_size` gets the fields it has).
    ///
    /// # Safety
    /// The pointer has `size <= size_of::<T>()` writable bytes (a size checked by
    /// `struct_size`), and `T` is plain `repr(C)` data.
    pub(crate) unsafe fn write_prefix(self, value: &T, size: usize) {
        let size = size.min(std::mem::size_of::<T>());
        // SAFETY: `size` bytes are readable in `value` and writable at the caller's pointer
        // (contract); the regions cannot overlap (ours is a local).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (value as *const T).cast::<u8>(),
                self.0.cast::<u8>(),
                size,
            )
        }
    }
}

/// Copy `data` into a caller's buffer `(out, cap)`, always reporting the needed length through
/// `out_len`; `BufferTooSmall` when it does not fit.
///
/// # Safety
/// `out` is NULL or has room for `cap` elements; `out_len` is NULL or writable.
pub(crate) unsafe fn copy_out<T: Copy>(
    data: &[T],
    out: *mut T,
    cap: usize,
    out_len: *mut usize,
) -> Result<()> {
    if !out_len.is_null() {
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out_len.write(data.len()) };
    }
    if data.len() > cap {
        return Err(Error::new(
            ErrorKind::BufferTooSmall,
            format!("buffer holds {cap} elements, {} needed", data.len()),
        ));
    }
    if !data.is_empty() {
        if out.is_null() {
            return Err(null_arg("out"));
        }
        // SAFETY: out has room for cap >= data.len() elements; regions cannot overlap (ours
        // is a Rust-owned buffer).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
    }
    Ok(())
}

/// An options struct that starts with `uint32_t struct_size`.
pub(crate) trait Options: Copy {
    /// The defaults, with `struct_size` set to this library's size.
    fn defaults() -> Self;

    /// Byte range (start, end) of every field. An older version of the struct is a prefix of
    /// its fields, so a `struct_size` is valid when it ends on or after a field's end and no
    /// later than the next field's start (padding included), never inside a field. New fields go
    /// after the last one, so an older version's tail padding never holds one.
    fn fields() -> Vec<(usize, usize)>;
}

/// Read an options struct of any size up to ours: NULL means defaults; fields past an older,
/// smaller `struct_size` keep their defaults; a larger size than we know is an error.
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes (its first field).
pub(crate) unsafe fn read_options<T: Options>(p: *const T, name: &str) -> Result<T> {
    let mut value = T::defaults();
    if p.is_null() {
        return Ok(value);
    }
    // SAFETY: every options struct starts with a u32 struct_size (its first field).
    let size = unsafe { struct_size::<T>(p, name) }?;
    // SAFETY: the caller's struct has `size` readable bytes; ours has `ours >= size` bytes; both
    // are plain repr(C) data, and the bytes past `size` keep our defaults.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut value as *mut T).cast::<u8>(), size)
    };
    Ok(value)
}

/// The `struct_size` a caller put in the first field of its struct, if it is a size this struct
/// had in some version (a field boundary up to ours).
///
/// # Safety
/// `p` is non-NULL and points to at least 4 readable bytes.
pub(crate) unsafe fn struct_size<T: Options>(p: *const T, name: &str) -> Result<usize> {
    // SAFETY: the caller's struct starts with its u32 struct_size.
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    let ours = std::mem::size_of::<T>();
    let cuts_a_field = T::fields().iter().any(|&(start, end)| start < size && size < end);
    if size < std::mem::size_of::<u32>() || size > ours || cuts_a_field {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{name}->struct_size = {size}: not a size of this struct in any version up to \
                 {ours} bytes (set it with the _init function or sizeof)"
            ),
        ));
    }
    Ok(size)
}

/// Fill an options struct with its defaults (the `_init` functions); NULL is ignored.
///
/// # Safety
/// `p` is NULL or points to a writable `T`.
pub(crate) unsafe fn init_options<T: Options>(p: *mut T) {
    // SAFETY: NULL or writable by the caller's contract.
    if let Some(p) = unsafe { p.as_mut() } {
        *p = T::defaults();
    }
}

//! Model handles: `phi3_model_options`, load (folder or built-in demo), free, getters.

use std::ffi::c_char;
use std::ptr;

use phi3_core::{demo, Device, LoadOptions, Model, WeightFormat};

use crate::ffi::{
    arg_cstr, arg_out, arg_ref, boundary, guarded, init_options, read_options, Options,
};
use crate::status::phi3_status;

/// A loaded model. Opaque. Reference-counted: sessions keep their model alive, so
/// phi3_model_free may be called while sessions of it still exist. Thread-safe: any number of
/// threads may use one model at once.
pub struct phi3_model {
    pub(crate) model: Model,
}

/// How to load a model. Fill with phi3_model_options_init, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct phi3_model_options {
    /// sizeof(phi3_model_options), set by phi3_model_options_init.
    pub struct_size: u32,
    /// "auto" (the CPU until the CUDA backend is verified on a GPU), "cpu", "cuda" or "cuda:N";
    /// NULL means "auto".
    /// Borrowed for the duration of the call.
    pub device: *const c_char,
    /// Largest context any session may hold, in tokens; 0 means the model's maximum.
    pub max_context: usize,
    /// How the decoder projections (qkv, o, gate_up, down) are stored: "native" (the file's
    /// dtype), "int8" (per-row scales), "int4" (groups of 128 columns), "int4-g32", "int4-g64"
    /// or "int4-g128"; quantized at load time. NULL means "native". Embeddings, norms and
    /// lm_head stay in the file's dtype. A folder already quantized (`phi3 quantize`, AWQ,
    /// GPTQ) loads as stored with "native" or its own format; another format is
    /// PHI3_ERR_INVALID_ARGUMENT. Borrowed for the duration of the call. A struct_size that ends
    /// before this field (a caller built against an older header) means "native".
    pub weights: *const c_char,
}

impl Options for phi3_model_options {
    fn fields() -> Vec<(usize, usize)> {
        use std::mem::{offset_of, size_of};
        let field = |start: usize, len: usize| (start, start + len);
        vec![
            (0, size_of::<u32>()),
            field(offset_of!(Self, device), size_of::<usize>()),
            field(offset_of!(Self, max_context), size_of::<usize>()),
            field(offset_of!(Self, weights), size_of::<usize>()),
        ]
    }

    fn defaults() -> Self {
        phi3_model_options {
            struct_size: std::mem::size_of::<Self>() as u32,
            device: ptr::null(),
            max_context: 0,
            weights: ptr::null(),
        }
    }
}

/// Fill `*o` with the defaults (device "auto", model's max context, "native" weights). NULL is
/// ignored.
/// Thread-safe; cannot fail.
///
/// # Safety
/// `o` is NULL or points to a writable phi3_model_options.
#[no_mangle]
pub unsafe extern "C" fn phi3_model_options_init(o: *mut phi3_model_options) {
    // SAFETY: forwarded contract.
    unsafe { init_options(o) }
}

/// Rust LoadOptions from C options.
///
/// # Safety
/// `o` is NULL or a valid options struct whose `device` and `weights` are NULL or
/// NUL-terminated.
unsafe fn load_options(o: *const phi3_model_options) -> phi3_core::Result<LoadOptions> {
    // SAFETY: forwarded contract.
    let o = unsafe { read_options(o, "options") }?;
    let device = if o.device.is_null() {
        Device::Auto
    } else {
        // SAFETY: non-NULL, NUL-terminated by contract.
        unsafe { arg_cstr(o.device, "options->device") }?.parse()?
    };
    let weights = if o.weights.is_null() {
        WeightFormat::Native
    } else {
        // SAFETY: non-NULL, NUL-terminated by contract.
        unsafe { arg_cstr(o.weights, "options->weights") }?.parse()?
    };
    Ok(LoadOptions {
        device,
        max_context: (o.max_context > 0).then_some(o.max_context),
        weights,
        ..Default::default()
    })
}

/// Load a Hugging Face model folder (config.json, safetensors, tokenizer.json). On success
/// `*out` receives a new model the caller frees with phi3_model_free. Thread-safe.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL `path` or `out`, bad options), PHI3_ERR_IO (missing
/// files), PHI3_ERR_MODEL_FORMAT (malformed config or weights), PHI3_ERR_UNSUPPORTED (model or
/// rope type, device), PHI3_ERR_OUT_OF_MEMORY.
///
/// # Safety
/// `path` is NULL or NUL-terminated; `o` is NULL or a valid options struct; `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_model_load(
    path: *const c_char,
    o: *const phi3_model_options,
    out: *mut *mut phi3_model,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let path = unsafe { arg_cstr(path, "path") }?;
        let options = unsafe { load_options(o) }?;
        let out = arg_out(out, "out")?;
        let model = Model::load(path, &options)?;
        let handle = Box::into_raw(Box::new(phi3_model { model }));
        // SAFETY: out was checked by arg_out and is writable (contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Load the built-in demo model: small, random weights, its own tokenizer and chat template;
/// no files needed. For examples and tests. Free with phi3_model_free. Thread-safe.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL `out`, bad options), PHI3_ERR_UNSUPPORTED (device).
///
/// # Safety
/// `o` is NULL or a valid options struct; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_model_load_demo(
    o: *const phi3_model_options,
    out: *mut *mut phi3_model,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let options = unsafe { load_options(o) }?;
        let out = arg_out(out, "out")?;
        let model = demo::demo_model(&options)?;
        let handle = Box::into_raw(Box::new(phi3_model { model }));
        // SAFETY: out was checked by arg_out and is writable (contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Release the caller's reference to a model. Sessions of the model keep it alive until they are
/// freed. NULL is a no-op. Must not race with other calls using the same `m` pointer.
///
/// # Safety
/// `m` is NULL or a model from phi3_model_load / phi3_model_load_demo not yet freed.
#[no_mangle]
pub unsafe extern "C" fn phi3_model_free(m: *mut phi3_model) {
    guarded((), || {
        if !m.is_null() {
            // SAFETY: m came from Box::into_raw in this library and is freed once (contract).
            drop(unsafe { Box::from_raw(m) });
        }
    })
}

/// Number of logits per position (the model's padded vocabulary, e.g. 32064); 0 for NULL.
/// Thread-safe.
///
/// # Safety
/// `m` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn phi3_model_vocab_size(m: *const phi3_model) -> usize {
    // SAFETY: forwarded contract.
    guarded(0, || unsafe { arg_ref(m, "model") }.map_or(0, |m| m.model.config().vocab_size))
}

/// The most tokens a session of this model may hold; 0 for NULL. Thread-safe.
///
/// # Safety
/// `m` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn phi3_model_max_context(m: *const phi3_model) -> usize {
    // SAFETY: forwarded contract.
    guarded(0, || unsafe { arg_ref(m, "model") }.map_or(0, |m| m.model.max_context()))
}

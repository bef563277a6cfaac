//! Model handles: `phi3_model_options`, load (folder or built-in demo), free, getters, and
//! `phi3_kv_usage` (the KV pool and the batching scheduler of a model).

use std::ffi::c_char;
use std::ptr;

use phi3_core::{demo, Device, LoadOptions, Model, WeightFormat};

use crate::ffi::{
    arg_cstr, arg_out, arg_ref, boundary, guarded, init_options, read_options, struct_size, Options,
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
    /// Bytes of KV-cache memory that all sessions of the model may use together (the pool of KV
    /// blocks; see phi3_model_kv_usage); 0 means the backend's default: on the CPU no limit but
    /// allocation failure, on CUDA the device memory free after loading the weights, less a
    /// reserve. A budget smaller than one KV block is PHI3_ERR_INVALID_ARGUMENT. A struct_size
    /// that ends before this field means 0.
    pub kv_memory_bytes: u64,
    /// What a forward pass does when it needs KV blocks that the budget cannot supply: 0 (the
    /// default) fails the call with PHI3_ERR_OUT_OF_MEMORY (the session unchanged); non-zero
    /// waits until other sessions free blocks (phi3_session_free, _truncate, _reset on another
    /// thread) or the waiting session is cancelled (PHI3_ERR_CANCELLED). Nothing else frees
    /// blocks, so a host that uses sessions from one thread only must keep 0: it would wait
    /// forever. A session that needs more blocks than the whole budget still fails at once.
    /// A struct_size that ends before this field means 0.
    pub kv_wait: i32,
    /// Most prompt tokens of one session in one forward pass (a longer prompt runs in chunks of
    /// this many, each a cancellation point), and most prefill tokens of one batched pass of
    /// several sessions; 0 means 512. Larger chunks keep a GPU busier on long prompts and take
    /// more activation memory (about 0.42 GiB per 512 tokens of Phi-3-medium on CUDA, counted
    /// when the model loads); smaller ones let other sessions' decode steps in more often. Above
    /// 65536 is PHI3_ERR_INVALID_ARGUMENT. A struct_size that ends before this field means 0.
    pub prefill_chunk: usize,
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
            field(offset_of!(Self, kv_memory_bytes), size_of::<u64>()),
            field(offset_of!(Self, kv_wait), size_of::<i32>()),
            field(offset_of!(Self, prefill_chunk), size_of::<usize>()),
        ]
    }

    fn defaults() -> Self {
        phi3_model_options {
            struct_size: std::mem::size_of::<Self>() as u32,
            device: ptr::null(),
            max_context: 0,
            weights: ptr::null(),
            kv_memory_bytes: 0,
            kv_wait: 0,
            prefill_chunk: 0,
        }
    }
}

/// Fill `*o` with the defaults (device "auto", model's max context, "native" weights, the
/// backend's KV memory, no waiting for KV memory, 512-token prefill chunks). NULL is ignored.
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
        kv_memory: (o.kv_memory_bytes > 0).then_some(o.kv_memory_bytes),
        kv_wait: o.kv_wait != 0,
        prefill_chunk: (o.prefill_chunk > 0).then_some(o.prefill_chunk),
        ..Default::default()
    })
}

/// Load a Hugging Face model folder (config.json, safetensors, tokenizer.json). On success
/// `*out` receives a new model the caller frees with phi3_model_free. Thread-safe.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL `path` or `out`, bad options, a KV memory budget
/// smaller than one block), PHI3_ERR_IO (missing files), PHI3_ERR_MODEL_FORMAT (malformed config
/// or weights), PHI3_ERR_UNSUPPORTED (model or rope type, device), PHI3_ERR_OUT_OF_MEMORY.
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
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL `out`, bad options, a KV memory budget smaller than
/// one block), PHI3_ERR_UNSUPPORTED (device).
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

/// How a model's KV memory and batching scheduler are used (phi3_model_kv_usage). The caller sets
/// `struct_size` = sizeof(phi3_kv_usage); an older, smaller struct gets the fields it has.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct phi3_kv_usage {
    /// sizeof(phi3_kv_usage), set by the caller.
    pub struct_size: u32,
    /// Tokens per KV block (16 today).
    pub block_tokens: usize,
    /// Bytes of one block (every layer's keys and values of `block_tokens` tokens).
    pub block_bytes: u64,
    /// Blocks held by at least one session (a block shared by forks counts once).
    pub blocks_in_use: usize,
    /// Blocks the backend has allocated (in use, or free for reuse).
    pub blocks_allocated: usize,
    /// Most blocks the KV memory budget allows; 0 when only allocation failure limits it.
    pub max_blocks: usize,
    /// Forward passes the model's scheduler has run.
    pub steps: u64,
    /// Sequences over all passes (`sequences / steps` is the mean batch size).
    pub sequences: u64,
    /// Most sequences one pass has batched.
    pub max_batch: usize,
}

impl Options for phi3_kv_usage {
    fn fields() -> Vec<(usize, usize)> {
        use std::mem::{offset_of, size_of};
        let field = |start: usize, len: usize| (start, start + len);
        vec![
            (0, size_of::<u32>()),
            field(offset_of!(Self, block_tokens), size_of::<usize>()),
            field(offset_of!(Self, block_bytes), size_of::<u64>()),
            field(offset_of!(Self, blocks_in_use), size_of::<usize>()),
            field(offset_of!(Self, blocks_allocated), size_of::<usize>()),
            field(offset_of!(Self, max_blocks), size_of::<usize>()),
            field(offset_of!(Self, steps), size_of::<u64>()),
            field(offset_of!(Self, sequences), size_of::<u64>()),
            field(offset_of!(Self, max_batch), size_of::<usize>()),
        ]
    }

    fn defaults() -> Self {
        phi3_kv_usage {
            struct_size: std::mem::size_of::<Self>() as u32,
            block_tokens: 0,
            block_bytes: 0,
            blocks_in_use: 0,
            blocks_allocated: 0,
            max_blocks: 0,
            steps: 0,
            sequences: 0,
            max_batch: 0,
        }
    }
}

/// Fill `*out` with how the model's KV memory is used and how its scheduler has batched
/// sessions' forward passes so far. Set `out->struct_size` = sizeof(phi3_kv_usage) first (an
/// older, smaller size gets the fields it has). A snapshot: other threads' sessions may change
/// the numbers right after. Thread-safe; may wait for a forward pass running on another thread
/// to finish (the pool is locked while a pass runs).
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL `m` or `out`, a `struct_size` that is no version's
/// size of phi3_kv_usage). `*out` is written only on success.
///
/// # Safety
/// `m` NULL or a live model; `out` NULL or a writable phi3_kv_usage-like struct whose
/// `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn phi3_model_kv_usage(
    m: *const phi3_model,
    out: *mut phi3_kv_usage,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let m = unsafe { arg_ref(m, "model") }?;
        let out = arg_out(out, "out")?;
        // SAFETY: non-NULL (arg_out); the caller's struct starts with its u32 struct_size.
        let size = unsafe { struct_size(out.as_ptr(), "out") }?;
        let kv = m.model.kv_usage();
        let sched = m.model.scheduler_stats();
        let usage = phi3_kv_usage {
            struct_size: size as u32,
            block_tokens: kv.block_tokens,
            block_bytes: kv.block_bytes,
            blocks_in_use: kv.blocks_in_use,
            blocks_allocated: kv.blocks_allocated,
            max_blocks: kv.max_blocks.unwrap_or(0),
            steps: sched.steps,
            sequences: sched.sequences,
            max_batch: sched.max_batch,
        };
        // SAFETY: `size` bytes are writable in the caller's struct (checked size, contract).
        unsafe { out.write_prefix(&usage, size) };
        Ok(())
    })
}

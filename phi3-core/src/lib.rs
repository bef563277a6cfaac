//! phi3-core: an embeddable inference engine for the Phi-3 family.
//!
//! Loads a Hugging Face model folder (config.json, safetensors, tokenizer), runs the forward pass of
//! `Phi3ForCausalLM` on a [`backend`] (the CPU reference backend here; CUDA in `backend::cuda`), and
//! keeps per-conversation state in [`Session`]s. The logits equal those of HF transformers running
//! the whole sequence in one forward pass (see `tests/oracle/`).
//!
//! ```no_run
//! use phi3_core::{GenerateOptions, LoadOptions, Model, SessionOptions};
//! let model = Model::load("Phi-3-medium-128k-instruct", &LoadOptions::default())?;
//! let mut session = model.session(SessionOptions::default())?;
//! session.append_message("user", "Hello")?;
//! let reply = session.generate(&GenerateOptions::default(), |text, _token| {
//!     print!("{text}");
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! println!("\n{} tokens, finished by {}", reply.tokens.len(), reply.finish_reason.as_str());
//! # Ok::<(), phi3_core::Error>(())
//! ```

#![warn(missing_docs)]

pub mod backend;
pub mod chat;
pub mod config;
pub mod demo;
pub mod detok;
mod error;
pub mod eval;
mod forward;
pub mod generate;
mod kv_cache;
mod kv_pool;
pub mod loader;
mod model;
pub mod quantize;
pub mod rope;
pub mod sampler;
mod scheduler;
mod session;
mod session_file;
mod stream;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::ModelConfig;
pub use error::{Error, ErrorKind, Result};
pub use generate::{CancelToken, FinishReason, GenerateOptions, GenerationResult, GenerationStats};
pub use loader::WeightFormat;
pub use model::DummyWeights;
pub use model::{
    Device, DeviceStats, KvUsage, LoadOptions, LoadProgress, Model, ProgressFn, MAX_PREFILL_CHUNK,
};
pub use scheduler::SchedulerStats;
pub use session::{Session, SessionOptions, PREFILL_CHUNK};
pub use stream::{StreamChunk, TokenStream};
pub use tokenizer::Tokenizer;

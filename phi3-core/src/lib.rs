//! phi3-core: an embeddable inference engine for the Phi-3 family.
//!
//! Loads a Hugging Face model folder (config.json, safetensors, tokenizer), runs the forward pass of
//! `Phi3ForCausalLM` on a [`backend`] (the CPU reference backend here; CUDA in `backend::cuda`), and
//! keeps per-conversation state in [`Session`]s. The logits equal those of HF transformers running
//! the whole sequence in one forward pass (see `tests/oracle/`).
//!
//! ```no_run
//! use phi3_core::{LoadOptions, Model, SessionOptions};
//! let model = Model::load("Phi-3-medium-128k-instruct", &LoadOptions::default())?;
//! let mut session = model.session(SessionOptions::default())?;
//! let logits = session.append_text("Hello")?;
//! println!("{} logits, session holds {} tokens", logits.len(), session.len());
//! # Ok::<(), phi3_core::Error>(())
//! ```

pub mod backend;
pub mod chat;
pub mod config;
pub mod detok;
mod error;
mod forward;
pub mod generate;
mod kv_cache;
pub mod loader;
mod model;
pub mod rope;
pub mod sampler;
mod session;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::ModelConfig;
pub use error::{Error, ErrorKind, Result};
pub use generate::{CancelToken, FinishReason, GenerateOptions, GenerationResult, GenerationStats};
pub use model::DummyWeights;
pub use model::{Device, LoadOptions, Model};
pub use session::{Session, SessionOptions};
pub use tokenizer::Tokenizer;

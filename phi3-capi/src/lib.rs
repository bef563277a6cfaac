//! The stable C ABI of phi3-rs (`libphi3.so`, `libphi3.a`, `include/phi3.h`).
//!
//! Only `extern "C"` functions and the `#[repr(C)]` types they take live here; every body runs
//! inside `ffi::boundary`, which catches panics and maps `phi3_core::Error` kinds to
//! `phi3_status` codes while recording the message for `phi3_last_error()`. Front-end logic stays
//! out: this crate converts arguments and errors, phi3-core does the work.
//!
//! Files: `status.rs` (codes), `ffi.rs` (boundary, last error, argument helpers), `model.rs`,
//! `session.rs`, `generate.rs`, `tokenize.rs`.

#![allow(non_camel_case_types)]

mod ffi;
mod generate;
mod model;
mod session;
mod status;
mod tokenize;

pub use generate::*;
pub use model::*;
pub use session::*;
pub use status::*;
pub use tokenize::*;

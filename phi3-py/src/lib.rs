//! `phi3._phi3`: the native half of the `phi3` Python package (PyO3, built by maturin as the
//! `phi3-rs` wheel). The Python package `phi3` (phi3-py/python/phi3/) re-exports everything here;
//! `_phi3.pyi` next to it holds the type stubs.
//!
//! Front-end rules (DESIGN.md): no logic beyond conversion and error mapping. Every call into
//! phi3-core that does real work (tokenizing, loading, prefill, decode, save/load) goes through
//! `gil.rs` (`run_detached`, `run_cancellable`), which releases the GIL, lets Ctrl-C cancel
//! model work, catches panics and maps errors to the `phi3.Phi3Error` hierarchy (`errors.rs`).

use pyo3::prelude::*;

mod convert;
mod errors;
mod gil;
mod model;
mod quantize;
mod session;
mod stream;
mod tokenizer;

#[pymodule]
fn _phi3(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PyKvUsage>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<session::PySession>()?;
    m.add_class::<session::PyGenerationResult>()?;
    m.add_class::<session::PyGenerationStats>()?;
    m.add_class::<stream::PyTokenStream>()?;
    m.add_function(wrap_pyfunction!(quantize::quantize, m)?)?;
    Ok(())
}

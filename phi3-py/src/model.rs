//! `phi3.Model`: a loaded checkpoint (or the built-in demo model), its tokenizer, sessions and
//! the one-call `chat`.

use std::path::PathBuf;

use phi3_core::{Device, ErrorKind, LoadOptions, Model, SessionOptions, WeightFormat};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{self, GenArgs};
use crate::errors::to_py_err;
use crate::gil::{lock, run_detached};
use crate::session::PySession;
use crate::stream::PyTokenStream;
use crate::tokenizer::PyTokenizer;

/// A Phi-3 model on a device, loaded from a Hugging Face folder (config.json, *.safetensors,
/// tokenizer.json). Thread-safe: share one Model between threads, one Session per conversation.
///
/// Model(path, device="auto", weights="native", max_context=None)
///
/// - device: "auto" (the CPU until the CUDA backend is verified on a GPU), "cpu", "cuda" or
///   "cuda:N".
/// - weights: "native" keeps the checkpoint's dtype; "int8" (per-row scales), "int4" (groups of
///   128 columns), "int4-g32", "int4-g64", "int4-g128" quantize the layer projections while
///   loading. A folder that is already quantized (`phi3 quantize`, AWQ, GPTQ) loads as stored
///   with "native" or its own format.
/// - max_context: upper bound on any session's tokens (default: the model's maximum).
///
/// Raises IoError (missing folder or file), ModelFormatError (bad config, tensor name/shape/dtype,
/// tokenizer files), UnsupportedError (model or rope type, device, a quantization config it cannot read),
/// InvalidArgumentError (bad device or weights string, an int4 group that does not divide a
/// row, max_context <= 0). Loading releases the GIL.
#[pyclass(name = "Model", module = "phi3", frozen)]
pub(crate) struct PyModel {
    pub(crate) model: Model,
    /// `model.tokenizer`, made once (None: the folder had no tokenizer.json).
    tokenizer: Option<Py<PyTokenizer>>,
}

impl PyModel {
    fn wrap(py: Python<'_>, model: Model) -> PyResult<Self> {
        let tokenizer = match model.tokenizer() {
            Ok(tok) => {
                Some(Py::new(py, PyTokenizer::new(tok.clone(), model.chat_template().clone()))?)
            }
            Err(_) => None,
        };
        Ok(PyModel { model, tokenizer })
    }
}

/// Check the load arguments before anything is read.
fn load_options(
    py: Python<'_>,
    device: &str,
    weights: &str,
    max_context: Option<i64>,
) -> PyResult<LoadOptions> {
    let device: Device = device.parse().map_err(|e| to_py_err(py, e))?;
    let weights: WeightFormat = weights.parse().map_err(|e| to_py_err(py, e))?;
    let max_context = convert::positive(py, max_context, "max_context")?;
    Ok(LoadOptions { device, max_context, weights, ..Default::default() })
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (path, device = "auto", weights = "native", max_context = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        weights: &str,
        max_context: Option<i64>,
    ) -> PyResult<Self> {
        let options = load_options(py, device, weights, max_context)?;
        let model = run_detached(py, || Model::load(&path, &options))?;
        Self::wrap(py, model)
    }

    /// The built-in demo model: a tiny Phi-3 (4 layers, 256 wide, LongRoPE) with random weights
    /// and a small English tokenizer. Loads in milliseconds from nothing on disk; it produces
    /// gibberish but exercises the whole pipeline (tests, examples).
    #[staticmethod]
    #[pyo3(signature = (device = "auto", max_context = None, weights = "native"))]
    fn demo(
        py: Python<'_>,
        device: &str,
        max_context: Option<i64>,
        weights: &str,
    ) -> PyResult<Self> {
        let options = load_options(py, device, weights, max_context)?;
        let model = run_detached(py, || phi3_core::demo::demo_model(&options))?;
        Self::wrap(py, model)
    }

    /// The model's tokenizer. Raises UnsupportedError when the model folder had no
    /// tokenizer.json.
    #[getter]
    fn tokenizer(&self, py: Python<'_>) -> PyResult<Py<PyTokenizer>> {
        match &self.tokenizer {
            Some(t) => Ok(t.clone_ref(py)),
            None => Err(to_py_err(
                py,
                self.model.tokenizer().err().unwrap_or_else(|| {
                    phi3_core::Error::new(ErrorKind::Unsupported, "this model has no tokenizer")
                }),
            )),
        }
    }

    /// Where the model runs, e.g. "cpu (16 threads)".
    #[getter]
    fn device(&self) -> String {
        self.model.device_name()
    }

    /// How the layer projections are stored: "native", "int8", "int4-g128", ...
    #[getter]
    fn weights(&self) -> String {
        self.model.weight_format().to_string()
    }

    /// Bytes of weights the model holds (quantized projections counted as stored).
    #[getter]
    fn weight_bytes(&self) -> u64 {
        self.model.weight_bytes()
    }

    /// The folder the model was loaded from (None for the demo model).
    #[getter]
    fn path(&self) -> Option<String> {
        self.model.path().map(|p| p.to_string_lossy().into_owned())
    }

    /// The most tokens any session of this model may hold.
    #[getter]
    fn max_context(&self) -> usize {
        self.model.max_context()
    }

    /// Rows of the embedding table: token ids are in [0, vocab_size); the logits have this length.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    /// A new, empty session (a conversation with its own KV cache). `max_context` caps its
    /// length (default and upper bound: the model's max_context).
    #[pyo3(signature = (max_context = None))]
    fn session(slf: &Bound<'_, Self>, max_context: Option<i64>) -> PyResult<PySession> {
        let py = slf.py();
        let max_context = convert::positive(py, max_context, "max_context")?;
        let session = slf
            .get()
            .model
            .session(SessionOptions { max_context })
            .map_err(|e| to_py_err(py, e))?;
        Ok(PySession::new(slf.clone().unbind(), session))
    }

    /// One chat turn in a new session: append each of the OpenAI-style `messages` (a list of
    /// {"role": "system"|"user"|"assistant", "content": str} dicts) through the model's chat
    /// template, then generate the assistant's reply. `**gen` takes the options of
    /// `Session.generate` (max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    /// seed, stop, on_token, ...).
    ///
    /// Returns a GenerationResult, or with `stream=True` an iterator of text chunks
    /// (a TokenStream, whose `.session` continues the conversation).
    #[pyo3(signature = (messages, stream = false, **gen))]
    fn chat(
        slf: &Bound<'_, Self>,
        messages: &Bound<'_, PyAny>,
        stream: bool,
        gen: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let func = if stream { "chat(stream=True)" } else { "chat" };
        let messages = convert::messages(py, messages)?;
        let call =
            GenArgs::from_kwargs(gen, func)?.check(py, slf.get().model.config().vocab_size)?;
        let session = Bound::new(py, Self::session(slf, None)?)?;
        {
            let s = session.get();
            let mut guard = lock(py, &s.inner)?;
            let inner = &mut *guard;
            run_detached(py, || {
                messages.iter().try_for_each(|m| inner.append_message(&m.role, &m.content))
            })?;
        }
        if stream {
            let it = PyTokenStream::start(py, session.unbind(), call)?;
            Ok(Bound::new(py, it)?.into_any().unbind())
        } else {
            let result = session.get().run_generate(py, call)?;
            Ok(Bound::new(py, result)?.into_any().unbind())
        }
    }

    fn __repr__(&self) -> String {
        match self.model.path() {
            Some(p) => format!(
                "Model({:?}, device={:?})",
                p.display().to_string(),
                self.model.device_name()
            ),
            None => format!("Model.demo(device={:?})", self.model.device_name()),
        }
    }
}

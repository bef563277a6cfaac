//! Conversions between Python values and phi3-core types, each checked before any work starts
//! and failing with an exception that names the argument: token ids, chat messages, generation
//! options, and logits as numpy arrays.

use phi3_core::{ChatMessage, ErrorKind, GenerateOptions};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyDict, PyList, PyMapping, PyString};

use crate::errors::{invalid_argument, new_err};

/// `value` as a count: `InvalidArgumentError` naming `what` when it is negative.
pub(crate) fn count(py: Python<'_>, value: i64, what: &str) -> PyResult<usize> {
    usize::try_from(value)
        .map_err(|_| invalid_argument(py, format!("{what} = {value}: must be >= 0")))
}

/// An optional positive size, such as `max_context`.
pub(crate) fn positive(py: Python<'_>, value: Option<i64>, what: &str) -> PyResult<Option<usize>> {
    match value {
        None => Ok(None),
        Some(v) if v > 0 => Ok(Some(v as usize)),
        Some(v) => Err(invalid_argument(py, format!("{what} = {v}: must be > 0 (or None)"))),
    }
}

/// Token ids from any iterable of ints (list, tuple, numpy array). A negative or too large id is
/// `TokenOutOfRangeError` naming its index, like phi3-core's own check; `vocab` is the range.
/// `what` names the argument in messages, e.g. `tokens[3] = -1 out of range [0, 32064)`.
pub(crate) fn token_ids(
    py: Python<'_>,
    ids: &Bound<'_, PyAny>,
    vocab: usize,
    what: &str,
) -> PyResult<Vec<u32>> {
    if ids.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!("{what} must be a sequence of ints, not str")));
    }
    let mut out = Vec::new();
    for (i, item) in ids.try_iter()?.enumerate() {
        let item = item?;
        let id: i64 = item.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "{what}[{i}] must be an int, not {}",
                item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        match u32::try_from(id) {
            Ok(id) => out.push(id),
            Err(_) => {
                return Err(new_err(
                    py,
                    ErrorKind::TokenOutOfRange,
                    format!("{what}[{i}] = {id} out of range [0, {vocab})"),
                ))
            }
        }
    }
    Ok(out)
}

/// OpenAI-style messages: a list of dicts with `role` (str) and `content` (a str, None, or a
/// list of `{"type": "text", "text": str}` parts, which are concatenated). Other keys are ignored.
pub(crate) fn messages(py: Python<'_>, messages: &Bound<'_, PyAny>) -> PyResult<Vec<ChatMessage>> {
    if messages.is_instance_of::<PyString>() || messages.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err(
            "messages must be a list of {\"role\": ..., \"content\": ...} dicts",
        ));
    }
    let mut out = Vec::new();
    for (i, m) in messages.try_iter()?.enumerate() {
        let m = m?;
        let m = m.cast::<PyMapping>().map_err(|_| {
            PyTypeError::new_err(format!(
                "messages[{i}] must be a dict with \"role\" and \"content\""
            ))
        })?;
        let field = |key: &str| -> PyResult<Bound<'_, PyAny>> {
            m.get_item(key)
                .map_err(|_| invalid_argument(py, format!("messages[{i}] has no \"{key}\"")))
        };
        let role = field("role")?;
        let role: String = role
            .extract()
            .map_err(|_| invalid_argument(py, format!("messages[{i}][\"role\"] must be a str")))?;
        let content = content_text(py, &field("content")?, i)?;
        out.push(ChatMessage::new(role, content));
    }
    if out.is_empty() {
        return Err(invalid_argument(py, "messages is empty"));
    }
    Ok(out)
}

fn content_text(py: Python<'_>, content: &Bound<'_, PyAny>, i: usize) -> PyResult<String> {
    if content.is_none() {
        return Ok(String::new());
    }
    if let Ok(s) = content.extract::<String>() {
        return Ok(s);
    }
    let bad = || {
        invalid_argument(
            py,
            format!(
                "messages[{i}][\"content\"] must be a str or a list of {{\"type\": \"text\", \
                 \"text\": str}} parts"
            ),
        )
    };
    let parts = content.cast::<PyList>().map_err(|_| bad())?;
    let mut text = String::new();
    for part in parts.iter() {
        let part = part.cast_into::<PyDict>().map_err(|_| bad())?;
        let kind: Option<String> = part.get_item("type")?.map(|t| t.extract()).transpose()?;
        if kind.as_deref() != Some("text") {
            return Err(invalid_argument(
                py,
                format!(
                    "messages[{i}][\"content\"]: only \"text\" parts are supported, not {:?}",
                    kind.unwrap_or_default()
                ),
            ));
        }
        let t: String = part.get_item("text")?.ok_or_else(bad)?.extract().map_err(|_| bad())?;
        text.push_str(&t);
    }
    Ok(text)
}

/// The arguments of `Session.generate` / `Session.stream` / `Model.chat(**gen)`, as Python
/// passed them. Defaults are `GenerateOptions::default()` (greedy, 256 tokens).
pub(crate) struct GenArgs<'py> {
    pub max_tokens: i64,
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
    pub min_p: f64,
    pub repetition_penalty: f64,
    pub seed: Option<Bound<'py, PyAny>>,
    pub stop: Option<Bound<'py, PyAny>>,
    pub on_token: Option<Bound<'py, PyAny>>,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub stop_token_ids: Option<Bound<'py, PyAny>>,
    pub logit_bias: Option<Bound<'py, PyAny>>,
    pub skip_special_tokens: bool,
}

/// Checked options plus the callback.
pub(crate) struct GenCall {
    pub options: GenerateOptions,
    pub on_token: Option<Py<PyAny>>,
}

const GEN_KEYS: [&str; 14] = [
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "on_token",
    "presence_penalty",
    "frequency_penalty",
    "stop_token_ids",
    "logit_bias",
    "skip_special_tokens",
];

impl<'py> GenArgs<'py> {
    /// The defaults, as `Session.generate()` has them.
    pub fn defaults() -> Self {
        let d = GenerateOptions::default();
        GenArgs {
            max_tokens: d.max_tokens as i64,
            temperature: d.temperature.into(),
            top_k: d.top_k as i64,
            top_p: d.top_p.into(),
            min_p: d.min_p.into(),
            repetition_penalty: d.repetition_penalty.into(),
            seed: None,
            stop: None,
            on_token: None,
            presence_penalty: d.presence_penalty.into(),
            frequency_penalty: d.frequency_penalty.into(),
            stop_token_ids: None,
            logit_bias: None,
            skip_special_tokens: d.skip_special_tokens,
        }
    }

    /// From `**kwargs` (`Model.chat`): the same names and defaults as `Session.generate`;
    /// an unknown name is a `TypeError`, as Python reports it for a real signature.
    pub fn from_kwargs(kwargs: Option<&Bound<'py, PyDict>>, func: &str) -> PyResult<Self> {
        let mut a = Self::defaults();
        let Some(kwargs) = kwargs else { return Ok(a) };
        for (key, value) in kwargs.iter() {
            let key: String = key.extract()?;
            let arg = |e: PyErr| PyTypeError::new_err(format!("{func}() argument '{key}': {e}"));
            match key.as_str() {
                "max_tokens" => a.max_tokens = value.extract().map_err(arg)?,
                "temperature" => a.temperature = value.extract().map_err(arg)?,
                "top_k" => a.top_k = value.extract().map_err(arg)?,
                "top_p" => a.top_p = value.extract().map_err(arg)?,
                "min_p" => a.min_p = value.extract().map_err(arg)?,
                "repetition_penalty" => a.repetition_penalty = value.extract().map_err(arg)?,
                "presence_penalty" => a.presence_penalty = value.extract().map_err(arg)?,
                "frequency_penalty" => a.frequency_penalty = value.extract().map_err(arg)?,
                "skip_special_tokens" => a.skip_special_tokens = value.extract().map_err(arg)?,
                "seed" => a.seed = Some(value),
                "stop" => a.stop = Some(value),
                "on_token" => a.on_token = Some(value),
                "stop_token_ids" => a.stop_token_ids = Some(value),
                "logit_bias" => a.logit_bias = Some(value),
                _ => {
                    return Err(PyTypeError::new_err(format!(
                        "{func}() got an unexpected keyword argument '{key}' (generation \
                         options are: {})",
                        GEN_KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(a)
    }

    /// Check every value against `vocab` (the model's embedding rows) and build the options.
    pub fn check(self, py: Python<'py>, vocab: usize) -> PyResult<GenCall> {
        let none = |v: &Option<Bound<'py, PyAny>>| v.as_ref().is_none_or(|v| v.is_none());
        let seed = if none(&self.seed) {
            None
        } else {
            let v = self
                .seed
                .as_ref()
                .map(|s| s.extract::<i128>())
                .transpose()
                .map_err(|_| PyTypeError::new_err("seed must be an int or None"))?;
            match v.map(u64::try_from) {
                Some(Ok(s)) => Some(s),
                Some(Err(_)) => {
                    return Err(invalid_argument(
                        py,
                        format!("seed = {}: must be in [0, 2**64)", v.unwrap_or_default()),
                    ))
                }
                None => None,
            }
        };
        let stop: Vec<String> = match &self.stop {
            Some(v) if !v.is_none() => {
                if let Ok(s) = v.extract::<String>() {
                    vec![s]
                } else {
                    v.extract::<Vec<String>>().map_err(|_| {
                        PyTypeError::new_err("stop must be a str, a list of str, or None")
                    })?
                }
            }
            _ => Vec::new(),
        };
        let on_token = match self.on_token {
            Some(f) if !f.is_none() => {
                if !f.is_callable() {
                    return Err(PyTypeError::new_err(
                        "on_token must be a callable (text: str, token: int | None) -> bool | None",
                    ));
                }
                Some(f.unbind())
            }
            _ => None,
        };
        let stop_token_ids = match &self.stop_token_ids {
            Some(v) if !v.is_none() => Some(token_ids(py, v, vocab, "stop_token_ids")?),
            _ => None,
        };
        let logit_bias = match &self.logit_bias {
            Some(v) if !v.is_none() => {
                let d = v.cast::<PyDict>().map_err(|_| {
                    PyTypeError::new_err("logit_bias must be a dict {token_id: bias} or None")
                })?;
                let mut out = Vec::with_capacity(d.len());
                for (k, b) in d.iter() {
                    let id: i64 = k.extract().map_err(|_| {
                        PyTypeError::new_err("logit_bias keys must be int token ids")
                    })?;
                    let bias: f64 = b
                        .extract()
                        .map_err(|_| PyTypeError::new_err("logit_bias values must be floats"))?;
                    let id = u32::try_from(id).map_err(|_| {
                        invalid_argument(
                            py,
                            format!("logit_bias: token id {id} out of range [0, {vocab})"),
                        )
                    })?;
                    out.push((id, bias as f32));
                }
                out
            }
            _ => Vec::new(),
        };
        let options = GenerateOptions {
            max_tokens: count(py, self.max_tokens, "max_tokens")?,
            temperature: self.temperature as f32,
            top_k: count(py, self.top_k, "top_k")?,
            top_p: self.top_p as f32,
            min_p: self.min_p as f32,
            repetition_penalty: self.repetition_penalty as f32,
            presence_penalty: self.presence_penalty as f32,
            frequency_penalty: self.frequency_penalty as f32,
            logit_bias,
            seed,
            stop,
            stop_token_ids,
            skip_special_tokens: self.skip_special_tokens,
        };
        options.validate(vocab).map_err(|e| crate::errors::to_py_err(py, e))?;
        Ok(GenCall { options, on_token })
    }
}

/// A float32 numpy array holding `values` (one copy, into a bytearray numpy then wraps).
pub(crate) fn numpy_f32(py: Python<'_>, values: &[f32]) -> PyResult<Py<PyAny>> {
    static FROMBUFFER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let frombuffer = FROMBUFFER.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("numpy")?.getattr("frombuffer")?.unbind())
    })?;
    let bytes = PyByteArray::new(py, bytemuck::cast_slice(values));
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", "float32")?;
    Ok(frombuffer.bind(py).call((bytes,), Some(&kwargs))?.unbind())
}

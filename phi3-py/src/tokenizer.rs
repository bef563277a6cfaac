//! `phi3.Tokenizer`: encode/decode with HF semantics and the model's chat template.

use std::path::PathBuf;

use phi3_core::{ChatTemplate, Tokenizer};
use pyo3::prelude::*;

use crate::convert;
use crate::gil::run_detached;

/// A tokenizer (tokenizer.json + tokenizer_config.json), as `model.tokenizer` or loaded on its
/// own with `Tokenizer.from_dir(path)`. Its ids equal transformers' (`AutoTokenizer`); both
/// `encode` and `decode` release the GIL. Thread-safe: share it freely.
#[pyclass(name = "Tokenizer", module = "phi3", frozen)]
pub(crate) struct PyTokenizer {
    tok: Tokenizer,
    template: ChatTemplate,
}

impl PyTokenizer {
    pub(crate) fn new(tok: Tokenizer, template: ChatTemplate) -> Self {
        PyTokenizer { tok, template }
    }
}

#[pymethods]
impl PyTokenizer {
    /// Load `tokenizer.json` (and `tokenizer_config.json`, `special_tokens_map.json`,
    /// `chat_template.jinja` when present) from a folder, without a model.
    ///
    /// Raises IoError when tokenizer.json is missing, ModelFormatError when a file is invalid.
    #[staticmethod]
    fn from_dir(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let (tok, template) = run_detached(py, || {
            let tok = Tokenizer::from_dir(&path)?;
            let template = ChatTemplate::from_tokenizer(&tok)?;
            Ok((tok, template))
        })?;
        Ok(PyTokenizer { tok, template })
    }

    /// Token ids of `text`, equal to transformers' `tokenizer(text,
    /// add_special_tokens=...)["input_ids"]`: with `add_special_tokens` a BOS token is added
    /// (Phi-3: `<s>` = 1). Special-token text inside `text` (e.g. "<|user|>") becomes that token.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let text = text.to_owned();
        run_detached(py, || self.tok.encode(&text, add_special_tokens))
    }

    /// Text of `ids`, equal to transformers' `tokenizer.decode(ids, skip_special_tokens=...)`.
    /// Raises TokenOutOfRangeError naming the first id the tokenizer does not know.
    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        skip_special_tokens: bool,
    ) -> PyResult<String> {
        let ids = convert::token_ids(py, ids, self.tok.vocab_size(), "tokens")?;
        run_detached(py, || self.tok.decode(&ids, skip_special_tokens))
    }

    /// The chat template applied to OpenAI-style `messages` (a list of {"role", "content"}
    /// dicts), as transformers' `apply_chat_template(messages, add_generation_prompt=...,
    /// tokenize=...)`: token ids by default, the prompt text with `tokenize=False`.
    #[pyo3(signature = (messages, add_generation_prompt = false, tokenize = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        tokenize: bool,
    ) -> PyResult<Py<PyAny>> {
        let messages = convert::messages(py, messages)?;
        let (text, ids) = run_detached(py, || {
            let text = self.template.render(
                &messages,
                add_generation_prompt,
                self.tok.bos_token().unwrap_or(""),
                self.tok.eos_token().unwrap_or(""),
            )?;
            let ids = if tokenize { Some(self.tok.encode(&text, false)?) } else { None };
            Ok((text, ids))
        })?;
        match ids {
            Some(ids) => Ok(ids.into_pyobject(py)?.into_any().unbind()),
            None => Ok(text.into_pyobject(py)?.into_any().unbind()),
        }
    }

    /// Number of ids the tokenizer can decode (the largest id + 1; 32011 for Phi-3). The model's
    /// embedding may have more rows (padding).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.tok.vocab_size()
    }

    /// The id of a token string (vocabulary or added token), or None.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// The token string of an id (e.g. "▁hello", "<0x0A>"), or None.
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.tok.id_to_token(id)
    }

    /// Whether `id` is a special token (dropped by `decode(..., skip_special_tokens=True)`).
    fn is_special(&self, id: u32) -> bool {
        self.tok.is_special(id)
    }

    /// The BOS token id (`<s>` = 1 for Phi-3), or None.
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.tok.bos_token_id()
    }

    /// The EOS token id (`<|endoftext|>` = 32000 for Phi-3), or None.
    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.tok.eos_token_id()
    }

    /// The BOS token text, or None.
    #[getter]
    fn bos_token(&self) -> Option<&str> {
        self.tok.bos_token()
    }

    /// The EOS token text, or None.
    #[getter]
    fn eos_token(&self) -> Option<&str> {
        self.tok.eos_token()
    }

    /// The Jinja chat template in use (the tokenizer's own, or phi3's built-in Phi-3 format).
    #[getter]
    fn chat_template(&self) -> &str {
        self.template.source()
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={}, bos_token={:?}, eos_token={:?})",
            self.tok.vocab_size(),
            self.tok.bos_token().unwrap_or(""),
            self.tok.eos_token().unwrap_or("")
        )
    }
}

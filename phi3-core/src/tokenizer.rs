//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, configured the way HF
//! transformers configures it, so that `encode`/`decode` give the ids and text that users get
//! from `AutoTokenizer.from_pretrained(dir)` (`tokenizer(text)["input_ids"]`, `tokenizer.decode`).
//!
//! HF reference: transformers 5.x `models/llama/tokenization_llama.py` (`LlamaTokenizer.__init__`)
//! and `tokenization_utils_tokenizers.py` (`TokenizersBackend.__init__`, `update_post_processor`).
//!
//! Why not `tokenizer.json` as is: for `tokenizer_class` `LlamaTokenizer`/`LlamaTokenizerFast`
//! (Phi-3, Phi-3.5), transformers 5 keeps only the vocabulary, merges, added tokens and
//! post-processor of `tokenizer.json` and rebuilds the rest: no normalizer, a `Metaspace`
//! pre-tokenizer that prepends `▁` only at the start of the text (`legacy: false`) and never
//! doubles an existing leading space, and a matching decoder. Phi-3's own `tokenizer.json`
//! instead prepends `▁` to every piece of text between special tokens, so
//! `"<|user|>\nhi"` is `[32010, 7251 ("▁hi")]` with the `tokenizers` library (and transformers 4)
//! but `[32010, 2918 ("hi")]` with transformers 5; we follow transformers 5 and record both in the
//! parity fixture. Other tokenizer classes, and a `tokenizer.json` without `tokenizer_config.json`,
//! are used exactly as the file says. When `tokenizer_config.json` sets `add_bos_token` or
//! `add_eos_token`, the post-processor is rebuilt from them, as transformers does.
//!
//! Invariants: token ids are `0..vocab_size()`; `decode` rejects any other id with
//! `TokenOutOfRange`; truncation and padding from `tokenizer.json` are switched off (an engine
//! must never silently drop or add tokens). Not here: incremental decoding (`detok.rs`), chat
//! formatting (`chat.rs`).

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};

/// Per-id facts used by `decode`, `is_special` and the incremental decoder.
const FLAG_KNOWN: u8 = 1;
const FLAG_SPECIAL: u8 = 2;
/// The token is a byte-fallback piece `<0xHH>`; HF's `ByteFallback` decoder turns a whole run of
/// them into U+FFFD if any byte in the run is invalid UTF-8, so a run is only final once a
/// non-byte token closes it.
const FLAG_BYTE: u8 = 4;

/// Longest text [`Tokenizer::encode`] accepts, in bytes. The `tokenizers` crate needs about 200
/// bytes of working memory per input byte (measured: 8 MiB of text, 1.6 GB peak), so this
/// bounds one call at about 3.5 GB; it is 32 times the text of a full 128k-token Phi-3 context.
pub const MAX_ENCODE_BYTES: usize = 16 << 20;

/// How much a normalizer may shrink text (NFC/NFKC composition, e.g. `e` + U+0301 -> `é`, 3
/// bytes -> 2) in the lower bound of [`Tokenizer::min_tokens`]; generous on purpose.
const NORMALIZER_SHRINK: usize = 4;

/// A loaded tokenizer. Cheap to clone (shared behind an `Arc`); `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tk: tokenizers::Tokenizer,
    /// One entry per id in `0..vocab_size`: `FLAG_*` bits.
    flags: Vec<u8>,
    /// Bytes of the longest token string (vocabulary pieces and added tokens).
    max_token_bytes: usize,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    chat_template: Option<String>,
}

// The model, sessions and front ends share one tokenizer across threads.
const _: () = {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    let _ = assert_traits::<Tokenizer>;
};

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.inner.bos_token)
            .field("eos_token", &self.inner.eos_token)
            .field("chat_template", &self.inner.chat_template.is_some())
            .finish()
    }
}

/// One input file: its bytes and the name used in error messages.
struct Source<'a> {
    bytes: &'a [u8],
    name: String,
}

impl Tokenizer {
    /// Load `tokenizer.json` from a model folder, with `tokenizer_config.json`,
    /// `special_tokens_map.json` and `chat_template.jinja` when present.
    ///
    /// `chat_template.jinja` (how recent transformers saves templates) wins over the
    /// `chat_template` field of `tokenizer_config.json`, as in transformers.
    ///
    /// Errors: `Io` when `tokenizer.json` is missing or any of the files cannot be read;
    /// `ModelFormat` for invalid JSON, a file the `tokenizers` crate rejects, a mistyped field,
    /// a BOS/EOS token missing from the vocabulary, or a `chat_template.jinja` that is not UTF-8.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        use crate::loader::paths::read_model_file;
        let json_path = dir.join("tokenizer.json");
        let json = read_model_file(dir, "tokenizer.json")?.ok_or_else(|| {
            Error::io(&json_path, std::io::Error::from(std::io::ErrorKind::NotFound))
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_model_file(dir, "tokenizer_config.json")?;
        let map_path = dir.join("special_tokens_map.json");
        let map = read_model_file(dir, "special_tokens_map.json")?;
        let template_path = dir.join("chat_template.jinja");
        let template = read_model_file(dir, "chat_template.jinja")?;
        let template = match template {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|e| {
                Error::model_format(format!("{}: not UTF-8: {e}", template_path.display()))
            })?),
            None => None,
        };
        build(
            Source { bytes: &json, name: json_path.display().to_string() },
            config.as_deref().map(|b| Source { bytes: b, name: config_path.display().to_string() }),
            map.as_deref().map(|b| Source { bytes: b, name: map_path.display().to_string() }),
            template,
        )
    }

    /// Load from explicit files: `tokenizer.json` and optionally `tokenizer_config.json`.
    ///
    /// Errors: `Io` when a given file cannot be read; otherwise as [`Tokenizer::from_dir`].
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Tokenizer> {
        let json = read_file(tokenizer_json)?;
        let config = match tokenizer_config {
            Some(p) => Some((read_file(p)?, p.display().to_string())),
            None => None,
        };
        build(
            Source { bytes: &json, name: tokenizer_json.display().to_string() },
            config.as_ref().map(|(b, name)| Source { bytes: b, name: name.clone() }),
            None,
            None,
        )
    }

    /// Load from the contents of `tokenizer.json` and optionally `tokenizer_config.json`
    /// (for models built in memory and for tests). Errors (`ModelFormat`, as
    /// [`Tokenizer::from_dir`]) name the files as `tokenizer.json` / `tokenizer_config.json`.
    pub fn from_bytes(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<&[u8]>,
    ) -> Result<Tokenizer> {
        build(
            Source { bytes: tokenizer_json, name: "tokenizer.json".into() },
            tokenizer_config_json
                .map(|b| Source { bytes: b, name: "tokenizer_config.json".into() }),
            None,
            None,
        )
    }

    /// Token ids of `text`, equal to transformers' `tokenizer(text, add_special_tokens=...)`.
    /// With `add_special_tokens` the post-processor adds BOS (Phi-3: `<s>` = 1).
    /// Special-token text inside `text` (e.g. `"<|user|>"`) becomes the special token.
    /// Errors: `InvalidArgument` for a text longer than [`MAX_ENCODE_BYTES`] (checked before any
    /// work), `Internal` when the `tokenizers` crate fails to encode.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        if text.len() > MAX_ENCODE_BYTES {
            return Err(Error::invalid_argument(format!(
                "text of {} bytes is longer than the tokenizer's limit of {MAX_ENCODE_BYTES} bytes",
                text.len()
            )));
        }
        let enc = self
            .inner
            .tk
            .encode(text, add_special_tokens)
            .map_err(|e| Error::internal(format!("tokenizer: encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, equal to transformers' `tokenizer.decode(ids, skip_special_tokens=...)`.
    /// An id outside the vocabulary is a `TokenOutOfRange` error naming its index; a failure
    /// inside the `tokenizers` crate is `Internal`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.decode_unchecked(ids, skip_special_tokens)
    }

    /// `decode` for ids already checked with `check_ids` (the incremental decoder checks each id
    /// once when it is pushed).
    pub(crate) fn decode_unchecked(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<String> {
        self.inner
            .tk
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::internal(format!("tokenizer: decoding failed: {e}")))
    }

    /// A lower bound on the number of tokens `encode(text, _)` returns, computed without
    /// tokenizing: every token covers at most `max_token_bytes` bytes of normalized text, except
    /// that added tokens with `lstrip`/`rstrip` swallow any amount of whitespace (so whitespace
    /// is not counted) and a normalizer may shrink text (by at most [`NORMALIZER_SHRINK`]).
    /// Lets a session reject a text that cannot fit its context before tokenizing it.
    pub(crate) fn min_tokens(&self, text: &str) -> usize {
        let bytes: usize = text.chars().filter(|c| !c.is_whitespace()).map(char::len_utf8).sum();
        bytes.div_ceil(NORMALIZER_SHRINK * self.inner.max_token_bytes.max(1))
    }

    /// Ok when every id can be decoded; otherwise `TokenOutOfRange` naming the first bad index.
    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        for (index, &id) in ids.iter().enumerate() {
            self.check_id(index, id)?;
        }
        Ok(())
    }

    /// Ok when `id` can be decoded; `index` is its position in the caller's input, for the message.
    pub(crate) fn check_id(&self, index: usize, id: u32) -> Result<()> {
        match self.inner.flags.get(id as usize) {
            Some(f) if f & FLAG_KNOWN != 0 => Ok(()),
            Some(_) => Err(Error::new(
                ErrorKind::TokenOutOfRange,
                format!("tokens[{index}] = {id} is not in the vocabulary (a gap in the ids)"),
            )),
            None => Err(Error::token_out_of_range(index, i64::from(id), self.vocab_size())),
        }
    }

    /// Number of ids this tokenizer can decode: the largest id + 1 (32011 for Phi-3). The model's
    /// embedding table may be larger (Phi-3: 32064 rows); ids beyond this cannot be decoded.
    pub fn vocab_size(&self) -> usize {
        self.inner.flags.len()
    }

    /// The id of a token string (vocabulary or added token), e.g. `"<|end|>"` -> 32007.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tk.token_to_id(token)
    }

    /// The token string of an id, e.g. 22172 -> `"▁hello"`, 243 -> `"<0xF0>"`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tk.id_to_token(id)
    }

    /// The BOS token id (`<s>` = 1 for Phi-3), when `tokenizer_config.json` names a BOS token.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id
    }

    /// The EOS token id (`<|endoftext|>` = 32000 for Phi-3). Phi-3 chat models also stop at
    /// `<|end|>`; that list comes from `generation_config.json`, not from the tokenizer.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id
    }

    /// The BOS token text, e.g. `"<s>"`.
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    /// The EOS token text, e.g. `"<|endoftext|>"`.
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    /// The model's Jinja chat template: `chat_template.jinja`, else `chat_template` of
    /// `tokenizer_config.json` (a string, or the entry named `default` of a list of
    /// `{name, template}`).
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// Whether `id` is a special token, i.e. one that `decode(.., skip_special_tokens=true)` drops.
    /// Phi-3: 0, 1 and 32000..=32010 are special; `</s>` (2) is not.
    pub fn is_special(&self, id: u32) -> bool {
        self.flag(id, FLAG_SPECIAL)
    }

    /// Whether `id` is a byte-fallback piece `<0xHH>`.
    pub(crate) fn is_byte_token(&self, id: u32) -> bool {
        self.flag(id, FLAG_BYTE)
    }

    fn flag(&self, id: u32, bit: u8) -> bool {
        self.inner.flags.get(id as usize).is_some_and(|f| f & bit != 0)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn parse_json(src: &Source<'_>) -> Result<Value> {
    serde_json::from_slice(src.bytes)
        .map_err(|e| Error::model_format(format!("{}: invalid JSON: {e}", src.name)))
}

fn build(
    json: Source<'_>,
    config: Option<Source<'_>>,
    special_map: Option<Source<'_>>,
    template_file: Option<String>,
) -> Result<Tokenizer> {
    let mut tj = parse_json(&json)?;
    if !tj.is_object() {
        return Err(Error::model_format(format!("{}: expected a JSON object", json.name)));
    }
    let cfg = match &config {
        Some(src) => {
            let v = parse_json(src)?;
            if !v.is_object() {
                return Err(Error::model_format(format!("{}: expected a JSON object", src.name)));
            }
            Some(Config { v, name: &src.name })
        }
        None => None,
    };
    let map = match &special_map {
        Some(src) => Some(Config { v: parse_json(src)?, name: &src.name }),
        None => None,
    };

    if let Some(cfg) = &cfg {
        let class = cfg.string("tokenizer_class")?;
        let is_bpe = tj.pointer("/model/type").and_then(Value::as_str) == Some("BPE");
        if matches!(class.as_deref(), Some("LlamaTokenizer" | "LlamaTokenizerFast")) && is_bpe {
            apply_llama_pipeline(&mut tj, cfg)?;
        }
    }
    // Never truncate or pad: a single encode must return every token of the text.
    tj["truncation"] = Value::Null;
    tj["padding"] = Value::Null;

    let mut tk: tokenizers::Tokenizer = serde_json::from_value(tj)
        .map_err(|e| Error::model_format(format!("{}: not a tokenizer file: {e}", json.name)))?;

    let (bos_token, bos_token_id) =
        special_token(&tk, &json.name, cfg.as_ref(), map.as_ref(), "bos_token")?;
    let (eos_token, eos_token_id) =
        special_token(&tk, &json.name, cfg.as_ref(), map.as_ref(), "eos_token")?;

    if let Some(cfg) = &cfg {
        let add_bos = cfg.bool("add_bos_token")?;
        let add_eos = cfg.bool("add_eos_token")?;
        if add_bos.is_some() || add_eos.is_some() {
            // transformers' update_post_processor: an unset flag is false, a flag without its
            // token is dropped.
            let bos = bos_token.as_deref().zip(bos_token_id).filter(|_| add_bos == Some(true));
            let eos = eos_token.as_deref().zip(eos_token_id).filter(|_| add_eos == Some(true));
            let pp = template_processing(bos, eos);
            let pp: tokenizers::PostProcessorWrapper = serde_json::from_value(pp).map_err(|e| {
                Error::internal(format!("tokenizer: building the BOS/EOS post-processor: {e}"))
            })?;
            tk.with_post_processor(Some(pp));
        }
    }

    let chat_template = match template_file {
        Some(t) => Some(t),
        None => match &cfg {
            Some(cfg) => cfg.chat_template()?,
            None => None,
        },
    };

    let flags = token_flags(&tk);
    let max_token_bytes = tk.get_vocab(true).keys().map(String::len).max().unwrap_or(1);
    Ok(Tokenizer {
        inner: Arc::new(Inner {
            tk,
            flags,
            max_token_bytes,
            bos_token,
            eos_token,
            bos_token_id,
            eos_token_id,
            chat_template,
        }),
    })
}

/// Rebuild normalizer, pre-tokenizer, decoder and BPE options as transformers 5's
/// `LlamaTokenizer.__init__` does (see the module docs for why).
fn apply_llama_pipeline(tj: &mut Value, cfg: &Config<'_>) -> Result<()> {
    let add_prefix_space = cfg.bool("add_prefix_space")?.unwrap_or(true);
    let legacy = cfg.bool("legacy")?.unwrap_or(false);
    // transformers' _get_prepend_scheme
    let prepend_scheme = match (add_prefix_space, legacy) {
        (false, _) => "never",
        (true, false) => "first",
        (true, true) => "always",
    };
    tj["normalizer"] = Value::Null;
    tj["pre_tokenizer"] = json!({
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend_scheme, "split": false
    });
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    tj["decoder"] = json!({"type": "Sequence", "decoders": decoders});
    // transformers builds BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None)
    // without an unk token.
    let model = &mut tj["model"];
    model["byte_fallback"] = Value::Bool(true);
    model["fuse_unk"] = Value::Bool(true);
    model["dropout"] = Value::Null;
    model["unk_token"] = Value::Null;
    model["ignore_merges"] = Value::Bool(false);
    Ok(())
}

/// `TemplateProcessing` JSON for `[bos] $A [eos]` (pair: `[bos] $A [eos] [bos] $B [eos]`).
fn template_processing(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let special =
        |tok: &str, type_id: u32| json!({"SpecialToken": {"id": tok, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (type_id, name, out) in [(0, "A", &mut single), (1, "B", &mut pair)] {
        if let Some((t, _)) = bos {
            out.push(special(t, type_id));
        }
        out.push(seq(name, type_id));
        if let Some((t, _)) = eos {
            out.push(special(t, type_id));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut specials = serde_json::Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

fn token_flags(tk: &tokenizers::Tokenizer) -> Vec<u8> {
    let vocab = tk.get_vocab(true);
    let size = vocab.values().max().map_or(0, |&m| m as usize + 1);
    let mut flags = vec![0u8; size];
    for (tok, &id) in &vocab {
        let f = &mut flags[id as usize];
        *f |= FLAG_KNOWN;
        if is_byte_piece(tok) {
            *f |= FLAG_BYTE;
        }
    }
    for (id, tok) in tk.get_added_tokens_decoder() {
        if tok.special {
            if let Some(f) = flags.get_mut(id as usize) {
                *f |= FLAG_SPECIAL;
            }
        }
    }
    flags
}

/// `<0xHH>`: the form HF's ByteFallback decoder turns back into a byte.
fn is_byte_piece(tok: &str) -> bool {
    tok.len() == 6
        && tok.starts_with("<0x")
        && tok.ends_with('>')
        && u8::from_str_radix(&tok[3..5], 16).is_ok()
}

/// The special token named `field` (`"<s>"`, or `{"content": "<s>", ...}`) and its id: from
/// `tokenizer_config.json`, else `special_tokens_map.json`. A token missing from the vocabulary
/// is an error naming the file that names it.
fn special_token(
    tk: &tokenizers::Tokenizer,
    json_name: &str,
    cfg: Option<&Config<'_>>,
    map: Option<&Config<'_>>,
    field: &str,
) -> Result<(Option<String>, Option<u32>)> {
    for c in cfg.into_iter().chain(map) {
        if let Some(t) = c.token(field)? {
            let id = tk.token_to_id(&t).ok_or_else(|| {
                Error::model_format(format!(
                    "{}: {field} {t:?} is not in the vocabulary of {json_name}",
                    c.name
                ))
            })?;
            return Ok((Some(t), Some(id)));
        }
    }
    Ok((None, None))
}

/// A parsed `tokenizer_config.json` (or `special_tokens_map.json`) with typed field access that
/// names the file and field on a type mismatch.
struct Config<'a> {
    v: Value,
    name: &'a str,
}

impl Config<'_> {
    fn wrong(&self, field: &str, expected: &str, got: &Value) -> Error {
        let got = match got {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        };
        Error::model_format(format!("{}: {field}: expected {expected}, got {got}", self.name))
    }

    fn bool(&self, field: &str) -> Result<Option<bool>> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(field, "a boolean", other)),
        }
    }

    fn string(&self, field: &str) -> Result<Option<String>> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong(field, "a string", other)),
        }
    }

    /// A special token given as a string or as an AddedToken object `{"content": ...}`.
    fn token(&self, field: &str) -> Result<Option<String>> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Object(o)) => match o.get("content") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(Error::model_format(format!(
                    "{}: {field}: object without a string \"content\"",
                    self.name
                ))),
            },
            Some(other) => Err(self.wrong(field, "a string or {\"content\": ...}", other)),
        }
    }

    fn chat_template(&self) -> Result<Option<String>> {
        match self.v.get("chat_template") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Array(list)) => {
                for (i, entry) in list.iter().enumerate() {
                    let (Some(name), Some(template)) = (
                        entry.get("name").and_then(Value::as_str),
                        entry.get("template").and_then(Value::as_str),
                    ) else {
                        return Err(Error::model_format(format!(
                            "{}: chat_template[{i}]: expected {{\"name\": string, \"template\": string}}",
                            self.name
                        )));
                    };
                    if name == "default" {
                        return Ok(Some(template.to_string()));
                    }
                }
                log::warn!(
                    "{}: chat_template lists named templates but none is \"default\"; ignoring them",
                    self.name
                );
                Ok(None)
            }
            Some(other) => Err(self.wrong("chat_template", "a string or a list", other)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny SentencePiece-style BPE with byte fallback, built in memory: the pieces
    /// `▁hello`, `▁world`, `hi`, `é`, the 256 byte tokens, and added tokens `<unk>` `<s>`
    /// (special), `</s>` (not special), `<|end|>` (special, rstrip), as in Phi-3.
    pub(crate) fn tiny_json() -> String {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<unk>".into(), json!(0));
        vocab.insert("<s>".into(), json!(1));
        vocab.insert("</s>".into(), json!(2));
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
        }
        let pieces = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "i", "é", "▁h", "▁he", "▁hel", "▁hell",
            "▁hello", "▁w", "▁wo", "▁wor", "▁worl", "▁world", "hi",
        ];
        let mut next = 259u32;
        for p in pieces {
            vocab.insert(p.into(), json!(next));
            next += 1;
        }
        let merges = [
            "▁ h",
            "▁h e",
            "▁he l",
            "▁hel l",
            "▁hell o",
            "▁ w",
            "▁w o",
            "▁wo r",
            "▁wor l",
            "▁worl d",
            "h i",
        ];
        let added = |id: u32, content: &str, special: bool, rstrip: bool| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": rstrip, "normalized": false, "special": special})
        };
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(0, "<unk>", true, false), added(1, "<s>", true, false),
                             added(2, "</s>", false, true), added(next, "<|end|>", true, true)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        })
        .to_string()
    }

    pub(crate) const TINY_CONFIG: &str = r#"{
        "add_bos_token": true, "add_eos_token": false, "bos_token": "<s>",
        "eos_token": {"content": "</s>", "lstrip": false},
        "legacy": false, "tokenizer_class": "LlamaTokenizer",
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ bos_token }}"}]
    }"#;

    pub(crate) fn tiny() -> Tokenizer {
        Tokenizer::from_bytes(tiny_json().as_bytes(), Some(TINY_CONFIG.as_bytes())).unwrap()
    }

    #[test]
    fn tiny_config_fields() {
        let t = tiny();
        assert_eq!(t.vocab_size(), 281);
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.bos_token_id(), Some(1));
        assert_eq!(t.eos_token(), Some("</s>"));
        assert_eq!(t.eos_token_id(), Some(2));
        assert_eq!(t.chat_template(), Some("{{ bos_token }}"));
        assert!(t.is_special(0) && t.is_special(1) && t.is_special(280));
        assert!(!t.is_special(2) && !t.is_special(5) && !t.is_special(100_000));
        assert!(t.is_byte_token(3) && t.is_byte_token(258) && !t.is_byte_token(259));
        assert_eq!(t.token_to_id("▁hello"), Some(273));
        assert_eq!(t.id_to_token(273).as_deref(), Some("▁hello"));
    }

    #[test]
    fn transformers_pipeline_vs_tokenizer_json() {
        let hf = tiny();
        let raw = Tokenizer::from_bytes(tiny_json().as_bytes(), None).unwrap();
        // BOS from add_bos_token; tokenizer.json alone has no post-processor.
        assert_eq!(hf.encode("hello", true).unwrap(), vec![1, 273]);
        assert_eq!(raw.encode("hello", true).unwrap(), vec![273]);
        // transformers 5 does not prepend ▁ after a special token; tokenizer.json does.
        assert_eq!(hf.encode("<|end|>hi", false).unwrap(), vec![280, 279]);
        assert_eq!(raw.encode("<|end|>hi", false).unwrap(), vec![280, 269, 267]);
        // A leading space is not doubled by transformers 5.
        assert_eq!(hf.encode(" hello", false).unwrap(), vec![273]);
        assert_eq!(raw.encode(" hello", false).unwrap(), vec![259, 273]);
        // é is a piece; ñ is not and falls back to its two UTF-8 bytes.
        assert_eq!(hf.encode("é", false).unwrap(), vec![259, 268]);
        assert_eq!(hf.encode("ñ", false).unwrap(), vec![259, 3 + 0xC3, 3 + 0xB1]);
        assert_eq!(hf.decode(&[259, 3 + 0xC3, 3 + 0xB1], false).unwrap(), "ñ");
    }

    #[test]
    fn decode_skips_only_special_tokens() {
        let t = tiny();
        let ids = [1, 273, 280, 2, 278];
        assert_eq!(t.decode(&ids, false).unwrap(), "<s> hello<|end|></s> world");
        assert_eq!(t.decode(&ids, true).unwrap(), "hello</s> world");
    }

    #[test]
    fn decode_out_of_range_names_index() {
        let t = tiny();
        let e = t.decode(&[273, 281], false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TokenOutOfRange);
        assert_eq!(e.message(), "tokens[1] = 281 out of range [0, 281)");
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("tokenizer.json"), "{e}");

        std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("tokenizer.json: invalid JSON"), "{e}");

        std::fs::write(dir.path().join("tokenizer.json"), r#"{"model": 3}"#).unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("tokenizer.json: not a tokenizer file"), "{e}");

        std::fs::write(dir.path().join("tokenizer.json"), tiny_json()).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"add_bos_token": "yes"}"#)
            .unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(
            e.message().ends_with(
                "tokenizer_config.json: add_bos_token: expected a boolean, got a string"
            ),
            "{e}"
        );

        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<nope>"}"#)
            .unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("bos_token \"<nope>\" is not in the vocabulary"), "{e}");
    }

    #[test]
    fn from_dir_reads_special_tokens_map_and_template_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tiny_json()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"add_bos_token": true, "chat_template": "from config"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#,
        )
        .unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!((t.bos_token_id(), t.eos_token_id()), (Some(1), Some(2)));
        assert_eq!(t.chat_template(), Some("from config"));
        // add_bos_token with a BOS from special_tokens_map: BOS is added.
        assert_eq!(t.encode("hello", true).unwrap(), vec![1, 273]);
        std::fs::write(dir.path().join("chat_template.jinja"), "from file").unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.chat_template(), Some("from file"));
    }
}

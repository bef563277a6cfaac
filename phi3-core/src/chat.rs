//! Chat formatting: renders a list of messages into the prompt text the model was trained on,
//! with the model's own Jinja chat template (minijinja) or the built-in Phi-3 format.
//!
//! HF reference: transformers `utils/chat_template_utils.py` (`_compile_jinja_template`,
//! `render_jinja_template`) and `apply_chat_template`. Like HF, templates run with
//! `trim_blocks` and `lstrip_blocks`, loop controls (`break`/`continue`), `raise_exception(msg)`,
//! a `tojson` filter that writes JSON the way Python's `json.dumps` does (HF overrides Jinja's
//! HTML-escaping one for the same reason), and Python string/dict methods (`.strip()`,
//! `.startswith()`, `.items()`, ...). The variables are `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, and `tools`/`documents` (always none here).
//!
//! Invariants: rendering is sandboxed: no loader (so `include`/`import`/`extends` fail), no
//! environment or file access, no HTML escaping; message contents are data, never evaluated as
//! template code. `tokenizer.encode(render(..), false)` gives the ids of transformers'
//! `apply_chat_template(messages, tokenize=True)` (checked by `tests/tokenizer_parity.rs`).
//!
//! Note on Phi-3's own template (Phi-3-mini/medium): it emits `bos_token`, then only `user` and
//! `assistant` messages (system messages are silently dropped by the template itself), appends
//! `<|assistant|>\n` after every user message and ignores `add_generation_prompt`. We reproduce
//! that faithfully. The built-in default ([`ChatTemplate::phi3_default`]) is the Phi-3.5 format,
//! which does render system messages.

use std::fmt::Write as _;

use std::sync::Arc;

use minijinja::value::{from_args, Enumerator, Kwargs, Object, ValueKind};
use minijinja::{AutoEscape, Environment, State, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::tokenizer::Tokenizer;

/// Name of the one template in a [`ChatTemplate`]'s environment (shown in template errors).
const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one render may execute. A template comes from the model folder, which is not
/// trusted: without a bound, `{% for i in range(10**9) %}` hangs the host. Phi-3's own template
/// spends about 20 per message (see the test), so this allows conversations of ~100k messages.
const RENDER_FUEL: u64 = 2_000_000;

/// The built-in Phi-3.5 chat format: `<|system|>`, `<|user|>` and `<|assistant|>` turns, each
/// `<|role|>\n{content}<|end|>\n`, after `bos_token`; `<|assistant|>\n` when a reply is wanted.
/// As in Phi-3.5's template, a system message with empty content is left out. Unknown roles are
/// an error rather than silently dropped.
const PHI3_DEFAULT_TEMPLATE: &str = "{{ bos_token }}\
{% for message in messages %}\
{% if message['role'] == 'system' %}\
{% if message['content'] %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}\
{% elif message['role'] == 'user' or message['role'] == 'assistant' %}\
{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}\
{% else %}\
{{ raise_exception('unknown role ' ~ message['role'] | tojson ~ \
'; the built-in Phi-3 chat format knows system, user and assistant') }}\
{% endif %}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// One chat message, e.g. `{role: "user", content: "Hello"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, or whatever roles the template knows.
    pub role: String,
    /// The message text; inserted as data, never evaluated as template code.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Templates see a message as a dict with keys in HF's order (`role`, then `content`), which
/// matters for `message.items()` and `message | tojson`.
impl Object for ChatMessage {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// A compiled chat template. Cheap enough to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

const _: () = {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    let _ = assert_traits::<ChatTemplate>;
};

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

/// Marks the minijinja error raised by the template's own `raise_exception(msg)`.
#[derive(Debug)]
struct RaisedByTemplate;

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raise_exception")
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compile a Jinja chat template. A syntax error is a `ModelFormat` error naming the problem
    /// and its line.
    pub fn new(source: &str) -> Result<ChatTemplate> {
        let mut env = sandbox();
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::model_format(format!("chat template: {}", describe(&e))))?;
        Ok(ChatTemplate { env, source: source.to_string() })
    }

    /// The built-in Phi-3 format (Phi-3.5 style, with system messages), for models without a
    /// template of their own.
    pub fn phi3_default() -> ChatTemplate {
        // The source is a constant covered by unit tests; it cannot fail to compile.
        Self::new(PHI3_DEFAULT_TEMPLATE).expect("built-in Phi-3 chat template compiles")
    }

    /// The tokenizer's own template (`chat_template`) when it has one, else [`Self::phi3_default`].
    /// Errors: `ModelFormat` when the tokenizer's template does not compile.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<ChatTemplate> {
        match tok.chat_template() {
            Some(source) => Self::new(source),
            None => Ok(Self::phi3_default()),
        }
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages` into prompt text. Encode the result with `add_special_tokens = false`:
    /// the template itself places `bos_token` (pass `""` to leave it out, e.g. when appending
    /// to a conversation already in a session). A template's `raise_exception(msg)` is an
    /// `InvalidArgument` error with `msg`; any other rendering failure is `ModelFormat`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::internal(format!("chat template: {}", describe(&e))))?;
        let ctx = minijinja::context! {
            messages => messages.iter().cloned().map(Value::from_object).collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            tools => Value::from(()),
            documents => Value::from(()),
        };
        template.render(ctx).map_err(render_error)
    }
}

/// A minijinja environment set up like HF's `ImmutableSandboxedEnvironment(trim_blocks=True,
/// lstrip_blocks=True, extensions=[loopcontrols])`, with HF's extra globals and filters.
fn sandbox() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(RENDER_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Prompt text is not HTML.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env.set_unknown_method_callback(python_methods);
    // Jinja2 prints values with Python's str(): True, None, ['a', 'b'].
    env.set_formatter(|out, _state, value| {
        write_python_str(out, value).map_err(|_| {
            minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "formatting a value")
        })
    });
    env
}

/// Python's `str(value)`: strings as they are, everything else as `repr`.
fn write_python_str(out: &mut impl std::fmt::Write, v: &Value) -> std::fmt::Result {
    match v.as_str() {
        Some(s) => out.write_str(s),
        None if v.is_undefined() => Ok(()),
        None => write_python_repr(out, v),
    }
}

/// Python's `repr(value)` for the kinds templates print: `None`, `True`, `'text'`, lists, dicts.
fn write_python_repr(out: &mut impl std::fmt::Write, v: &Value) -> std::fmt::Result {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.write_str("None"),
        ValueKind::Bool => out.write_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            // Python prefers single quotes unless the text has ' and no ".
            let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            out.write_char(q)?;
            for c in s.chars() {
                match c {
                    '\\' => out.write_str("\\\\")?,
                    '\n' => out.write_str("\\n")?,
                    '\r' => out.write_str("\\r")?,
                    '\t' => out.write_str("\\t")?,
                    c if c == q => write!(out, "\\{c}")?,
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        write!(out, "\\x{:02x}", c as u32)?
                    }
                    c => out.write_char(c)?,
                }
            }
            out.write_char(q)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.write_char('[')?;
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.write_str(", ")?;
                }
                write_python_repr(out, &item)?;
            }
            out.write_char(']')
        }
        ValueKind::Map => {
            out.write_char('{')?;
            for (i, key) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.write_str(", ")?;
                }
                write_python_repr(out, &key)?;
                out.write_str(": ")?;
                write_python_repr(out, &v.get_item(&key).unwrap_or_default())?;
            }
            out.write_char('}')
        }
        _ => write!(out, "{v}"),
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message)
        .with_source(RaisedByTemplate))
}

fn render_error(e: minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.is::<RaisedByTemplate>() {
            let msg = e.detail().unwrap_or("raise_exception");
            return Error::new(
                ErrorKind::InvalidArgument,
                format!("chat template rejected the messages: {msg}"),
            );
        }
        source = s.source();
    }
    Error::model_format(format!("chat template: {}", describe(&e)))
}

/// One-line description of a minijinja error: kind, detail and line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(detail) = e.detail() {
        let _ = write!(s, ": {detail}");
    }
    if let Some(line) = e.line() {
        let _ = write!(s, " (line {line})");
    }
    s
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps` output, not minijinja's HTML-safe variant.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v).map_err(|_| {
                minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    "tojson: indent must be a non-negative integer or a string",
                )
            })?),
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let (a, b): (String, String) =
                from_args(&[v.get_item_by_index(0)?, v.get_item_by_index(1)?])?;
            (a, b)
        }
        // Python's defaults: ", " without indent, "," with it.
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let fmt = JsonFormat {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    fmt.write(&mut out, value, 0)?;
    Ok(out)
}

struct JsonFormat {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonFormat {
    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                // Integers print as integers, floats as JSON numbers (serde_json's shortest form).
                if let Ok(i) = i64::try_from(v.clone()) {
                    let _ = write!(out, "{i}");
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    match serde_json::Number::from_f64(f) {
                        Some(n) => {
                            let _ = write!(out, "{n}");
                        }
                        None if f.is_nan() => out.push_str("NaN"),
                        None if f > 0.0 => out.push_str("Infinity"),
                        None => out.push_str("-Infinity"),
                    }
                }
            }
            ValueKind::String | ValueKind::Bytes => self.string(out, &v.to_string()),
            ValueKind::Map => {
                let mut pairs: Vec<(String, Value)> = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    // json.dumps turns non-string keys into strings.
                    let key = match key.as_str() {
                        Some(s) => s.to_string(),
                        None => {
                            let mut k = String::new();
                            self.write(&mut k, &key, 0)?;
                            k
                        }
                    };
                    pairs.push((key, item));
                }
                if self.sort_keys {
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(out, '{', '}', &pairs, depth, |out, (k, item), depth| {
                    self.string(out, k);
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth)
                })?;
            }
            _ => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, '[', ']', &items, depth, |out, item, depth| {
                    self.write(out, item, depth)
                })?;
            }
        }
        Ok(())
    }

    fn container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[T],
        depth: usize,
        mut each: impl FnMut(&mut String, &T, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(depth + 1));
            }
            each(out, item, depth + 1)?;
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    /// A JSON string literal escaped as Python's json module does.
    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python methods on strings and dicts that HF templates call (`content.strip()`,
/// `role.startswith('sys')`, `message.get('name')`, `tool.items()`), which Jinja2 gets from
/// Python itself.
fn python_methods(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let unknown = || minijinja::Error::from(minijinja::ErrorKind::UnknownMethod);
    if let Some(s) = value.as_str() {
        return string_method(s, method, args)?.ok_or_else(unknown);
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let item = value.get_item(&key)?;
                Ok(if item.is_undefined() { default.unwrap_or(Value::from(())) } else { item })
            }
            "keys" | "values" | "items" => {
                let () = from_args(args)?;
                let mut out = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    out.push(match method {
                        "keys" => key,
                        "values" => item,
                        _ => Value::from(vec![key, item]),
                    });
                }
                Ok(Value::from(out))
            }
            _ => Err(unknown()),
        };
    }
    Err(unknown())
}

fn string_method(
    s: &str,
    method: &str,
    args: &[Value],
) -> std::result::Result<Option<Value>, minijinja::Error> {
    let strip_set =
        |chars: Option<&str>| -> Vec<char> { chars.map_or_else(Vec::new, |c| c.chars().collect()) };
    let v = match method {
        "strip" | "lstrip" | "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            let set = strip_set(chars);
            let pred = |c: char| if chars.is_some() { set.contains(&c) } else { c.is_whitespace() };
            Value::from(match method {
                "strip" => s.trim_matches(pred),
                "lstrip" => s.trim_start_matches(pred),
                _ => s.trim_end_matches(pred),
            })
        }
        "startswith" | "endswith" => {
            let (what,): (Value,) = from_args(args)?;
            let options: Vec<Value> =
                if what.as_str().is_some() { vec![what] } else { what.try_iter()?.collect() };
            let mut hit = false;
            for o in &options {
                let o = o.as_str().ok_or_else(|| {
                    minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        format!("{method} takes a string or a tuple of strings"),
                    )
                })?;
                hit |= if method == "startswith" { s.starts_with(o) } else { s.ends_with(o) };
            }
            Value::from(hit)
        }
        "upper" | "lower" | "title" | "capitalize" | "isspace" | "isdigit" | "isalpha"
        | "isalnum" | "islower" | "isupper" => {
            let () = from_args(args)?;
            match method {
                "upper" => Value::from(s.to_uppercase()),
                "lower" => Value::from(s.to_lowercase()),
                "title" => Value::from(minijinja::filters::title(s.into())),
                "capitalize" => {
                    let mut cs = s.chars();
                    Value::from(match cs.next() {
                        Some(first) => {
                            first.to_uppercase().chain(cs.flat_map(char::to_lowercase)).collect()
                        }
                        None => String::new(),
                    })
                }
                "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
                "isdigit" => Value::from(!s.is_empty() && s.chars().all(char::is_numeric)),
                "isalpha" => Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
                "isalnum" => Value::from(!s.is_empty() && s.chars().all(char::is_alphanumeric)),
                "islower" => Value::from(
                    s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase),
                ),
                _ => Value::from(
                    s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase),
                ),
            }
        }
        "replace" => {
            let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
            Value::from(match count {
                Some(n) if n >= 0 => s.replacen(old, new, n as usize),
                _ => s.replace(old, new),
            })
        }
        "split" | "rsplit" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let max = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
            let parts: Vec<String> = match sep {
                Some("") => {
                    return Err(minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        "split: empty separator",
                    ))
                }
                Some(sep) => match (max, method) {
                    (Some(m), "split") => s.splitn(m + 1, sep).map(String::from).collect(),
                    (Some(m), _) => {
                        let mut p: Vec<String> = s.rsplitn(m + 1, sep).map(String::from).collect();
                        p.reverse();
                        p
                    }
                    (None, _) => s.split(sep).map(String::from).collect(),
                },
                // Python's split() without a separator: runs of whitespace, no empty parts.
                None => s.split_whitespace().map(String::from).collect(),
            };
            Value::from(parts)
        }
        "splitlines" => {
            let (keepends,): (Option<bool>,) = from_args(args)?;
            if keepends.unwrap_or(false) {
                Value::from(s.split_inclusive('\n').map(String::from).collect::<Vec<_>>())
            } else {
                Value::from(s.lines().map(String::from).collect::<Vec<_>>())
            }
        }
        "find" | "rfind" | "count" => {
            let (what,): (&str,) = from_args(args)?;
            match method {
                // Python counts characters, not bytes.
                "find" => Value::from(s.find(what).map_or(-1, |b| s[..b].chars().count() as i64)),
                "rfind" => Value::from(s.rfind(what).map_or(-1, |b| s[..b].chars().count() as i64)),
                _ if what.is_empty() => Value::from(s.chars().count() + 1),
                _ => Value::from(s.matches(what).count()),
            }
        }
        "join" => {
            let (items,): (Value,) = from_args(args)?;
            let mut out = String::new();
            for (i, item) in items.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(s);
                }
                let _ = write!(out, "{item}");
            }
            Value::from(out)
        }
        _ => return Ok(None),
    };
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(list: &[(&str, &str)]) -> Vec<ChatMessage> {
        list.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    fn render(source: &str, messages: &[(&str, &str)]) -> Result<String> {
        ChatTemplate::new(source)?.render(&msgs(messages), true, "<s>", "</s>")
    }

    #[test]
    fn render_time_is_bounded_but_long_chats_fit() {
        let hang =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let err = render(hang, &[("user", "hi")]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ModelFormat);
        assert!(err.message().contains("fuel"), "{err}");
        // 50k messages through the built-in template stay well within the fuel.
        let many: Vec<ChatMessage> = (0..50_000)
            .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "hello"))
            .collect();
        let text = ChatTemplate::phi3_default().render(&many, true, "<s>", "</s>").unwrap();
        assert_eq!(text.matches("<|user|>").count(), 25_000);
    }

    #[test]
    fn default_format() {
        let t = ChatTemplate::phi3_default();
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Bye"),
        ]);
        assert_eq!(
            t.render(&m, true, "<s>", "<|endoftext|>").unwrap(),
            "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n\
             <|user|>\nBye<|end|>\n<|assistant|>\n"
        );
        assert_eq!(
            t.render(&m[1..2], false, "", "<|endoftext|>").unwrap(),
            "<|user|>\nHi<|end|>\n"
        );
        // An empty system message is left out, as in Phi-3.5's template.
        let m = msgs(&[("system", ""), ("user", "Hi")]);
        assert_eq!(t.render(&m, true, "", "").unwrap(), "<|user|>\nHi<|end|>\n<|assistant|>\n");
        assert_eq!(t.render(&[], true, "<s>", "").unwrap(), "<s><|assistant|>\n");
    }

    #[test]
    fn default_rejects_unknown_roles() {
        let e = ChatTemplate::phi3_default()
            .render(&msgs(&[("tool", "{}")]), true, "", "")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.message(),
            "chat template rejected the messages: unknown role \"tool\"; the built-in Phi-3 chat \
             format knows system, user and assistant"
        );
    }

    #[test]
    fn content_is_data() {
        let evil = "{{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}{{ raise_exception('no') }}";
        let out =
            ChatTemplate::phi3_default().render(&msgs(&[("user", evil)]), false, "", "").unwrap();
        assert_eq!(out, format!("<|user|>\n{evil}<|end|>\n"));
        // Also through Python-style methods and filters.
        let out =
            render("{{ messages[0].content.strip() | trim }}", &[("user", " {{ 1 }} ")]).unwrap();
        assert_eq!(out, "{{ 1 }}");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        assert_eq!(render(src, &[("user", "x")]).unwrap(), "ok");
        let e = render(src, &[("assistant", "x")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.message(),
            "chat template rejected the messages: Conversation must start with user"
        );
    }

    #[test]
    fn malformed_template_is_model_format() {
        let e = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().starts_with("chat template: syntax error"), "{e}");
        assert!(e.message().contains("(line 1)"), "{e}");
        let e = ChatTemplate::new("a\n{{ x + }}").unwrap_err();
        assert!(e.message().contains("(line 2)"), "{e}");
    }

    #[test]
    fn rendering_failures_are_model_format() {
        let e = render("{{ messages[0].content.frobnicate() }}", &[("user", "x")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("unknown method"), "{e}");
    }

    #[test]
    fn sandbox_has_no_loader() {
        let e = render("{% include 'tokenizer.json' %}", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        let e = render("{% extends '/etc/passwd' %}", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        // No environment access either: undefined names render as nothing.
        assert_eq!(render("[{{ env }}{{ HOME }}]", &[]).unwrap(), "[]");
    }

    #[test]
    fn hf_template_features() {
        // trim_blocks / lstrip_blocks, loop controls, loop variables, namespace, bos/eos, generation prompt.
        let src = "{{ bos_token }}\n{% set ns = namespace(n=0) %}\n{% for m in messages %}\n    {% if m.role == 'system' %}{% continue %}{% endif %}\n    {% if loop.index > 3 %}{% break %}{% endif %}\n{% set ns.n = ns.n + 1 %}\n{{ m.role | upper }}:{{ m['content'] }}{{ eos_token if loop.last }}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}{{ ns.n }}\n";
        let out = render(src, &[("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "v")])
            .unwrap();
        assert_eq!(out, "<s>\nUSER:u\nASSISTANT:a\nA:2");
        assert_eq!(render("{{ tools is none and documents is none }}", &[]).unwrap(), "True");
    }

    #[test]
    fn python_string_and_dict_methods() {
        let out = render(
            "{{ '  a b  '.strip() }}|{{ 'xxaxx'.strip('x') }}|{{ ' a'.lstrip() }}|{{ 'a '.rstrip() }}|\
             {{ 'system'.startswith('sys') }}|{{ 'abc'.endswith(('x', 'bc')) }}|{{ 'aXb'.lower() }}{{ 'aXb'.upper() }}|\
             {{ 'hello world'.title() }}|{{ 'hELLO'.capitalize() }}|{{ 'a,b,c'.split(',') }}|{{ ' a  b '.split() }}|\
             {{ 'a,b,c'.split(',', 1) }}|{{ 'aaa'.replace('a', 'b', 2) }}|{{ 'héllo'.find('l') }}|{{ 'banana'.count('a') }}|\
             {{ '-'.join(['x', 'y']) }}|{{ 'a\\nb'.splitlines() }}|{{ ' '.isspace() }}{{ '12'.isdigit() }}",
            &[],
        )
        .unwrap();
        assert_eq!(
            out,
            "a b|a|a|a|True|True|axbAXB|Hello World|Hello|['a', 'b', 'c']|['a', 'b']|\
             ['a', 'b,c']|bba|2|3|x-y|['a', 'b']|TrueTrue"
        );
        let out = render(
            "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].get('name', 'none') }}|{{ messages[0].keys() | list | length }}",
            &[("user", "hi")],
        )
        .unwrap();
        assert_eq!(out, "role=user;content=hi;none|2");
    }

    #[test]
    fn values_print_as_python_str() {
        // Expected strings are Jinja2's output (HF's environment) for the same template.
        let out = render(
            "{{ none }}|{{ true }}|{{ [1, 'a', \"it's\", none, 1.0, {'k': false}] }}|{{ x }}|{{ 3 / 2 }}|{{ 1.0 }}|{{ 'a\\n' ~ 1 }}",
            &[],
        )
        .unwrap();
        assert_eq!(out, "None|True|[1, 'a', \"it's\", None, 1.0, {'k': False}]||1.5|1.0|a\n1");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let out =
            render("{{ messages[0] | tojson }}", &[("user", "a \"q\" <b> é\n\u{1}")]).unwrap();
        assert_eq!(out, r#"{"role": "user", "content": "a \"q\" <b> é\n\u0001"}"#);
        let out = render("{{ messages[0] | tojson(indent=2, sort_keys=true) }}", &[("user", "x")])
            .unwrap();
        assert_eq!(out, "{\n  \"content\": \"x\",\n  \"role\": \"user\"\n}");
        let out = render("{{ [1, 2.5, none, true, [], {}] | tojson(separators=(',', ':')) }}|{{ 'é' | tojson(ensure_ascii=true) }}", &[]).unwrap();
        assert_eq!(out, "[1,2.5,null,true,[],{}]|\"\\u00e9\"");
    }
}

//! Session files: `Session::save(path)` / `Session::load(model, path)`.
//!
//! Layout (all little-endian), version 1:
//! ```text
//! magic      8 bytes  b"PHI3SES\0"
//! version    u32      1
//! header_len u32      length of the JSON header (at most 16 MiB)
//! header     JSON     SessionHeader: model fingerprint, sizes, rope regime, RNG state, messages
//! tokens     u32 x n_tokens
//! logits     f32 x vocab            (only when header.has_logits)
//! kv         f32 x n_layers x 2 x kv_tokens x kv_dim   (per layer: keys, then values)
//! checksum   32 bytes SHA-256 of everything above
//! ```
//! A session whose last pass was a greedy generation step holds that step's token instead of the
//! logits (`OutputKind::Greedy`); the header then records it as `greedy` (absent otherwise, so
//! files of other sessions are as before), and a session loaded from it continues exactly as the
//! original. Likewise a top-k sampling step's candidates (`OutputKind::Candidates`: the largest
//! logits, as ids and exact bits) are recorded as `candidates`.
//!
//! Loading checks, before allocating anything, that the file's length equals what the header
//! implies and that every size is within the model's limits (a hostile file cannot make us
//! allocate more than its own size); then the checksum, the fingerprint (the session must come
//! from the same config and weights) and the version. Saving writes a temporary file beside the
//! target and renames it, so a failed save never leaves a half-written file at `path`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chat::ChatMessage;
use crate::error::{Error, ErrorKind, Result};
use crate::model::Model;
use crate::rope::RopeRegime;
use crate::sampler::Rng;

const MAGIC: &[u8; 8] = b"PHI3SES\0";
const VERSION: u32 = 1;
const MAX_HEADER: u32 = 16 << 20;
/// False only in fuzz builds (cargo-fuzz passes `--cfg fuzzing`; see `fuzz/`), which skip the
/// checksum comparison and nothing else: a mutated input would otherwise fail it every time, and
/// the fuzzer would never reach the checks after it, which must hold for a file whose checksum
/// is valid but whose content is hostile (anyone can compute a SHA-256). Every size check runs
/// before the comparison either way.
const VERIFY_CHECKSUM: bool = !cfg!(fuzzing);

/// The JSON header of a session file.
#[derive(Serialize, Deserialize, Debug)]
struct SessionHeader {
    fingerprint: String,
    n_tokens: usize,
    kv_tokens: usize,
    long_rope: bool,
    max_context: usize,
    rng_state: [u64; 4],
    n_layers: usize,
    kv_dim: usize,
    vocab: usize,
    has_logits: bool,
    /// The greedy choice of the last token's pass when that is all the session holds of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    greedy: Option<GreedyChoice>,
    /// A top-k step's candidates for the last token when that is all the session holds of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    candidates: Option<SavedCandidates>,
    messages: Vec<ChatMessage>,
    needs_generation_prompt: bool,
}

/// A greedy generation step's result for the last token: the choice among the first `limit` ids
/// (`None`: no logit there was above -inf).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GreedyChoice {
    pub(crate) limit: usize,
    pub(crate) token: Option<u32>,
}

/// A top-k sampling step's result for the last token: the `count` largest logits among the first
/// `limit` ids (`sampler::top_candidates`), ids ascending, logits as their bits.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedCandidates {
    pub(crate) limit: usize,
    pub(crate) count: usize,
    pub(crate) ids: Vec<u32>,
    pub(crate) logits: Vec<u32>,
}

impl SavedCandidates {
    /// The (id, logit) pairs.
    pub(crate) fn entries(&self) -> Vec<(u32, f32)> {
        self.ids.iter().copied().zip(self.logits.iter().map(|&bits| f32::from_bits(bits))).collect()
    }

    /// Whether these could have been saved over `vocab` ids: `limit <= vocab`, `count` at most
    /// `sampler::MAX_CANDIDATES`, as many logits as ids, and the pairs as `top_candidates` gives
    /// them (`sampler::check_candidates`). Err says what is wrong.
    fn check(&self, vocab: usize) -> std::result::Result<(), String> {
        if self.limit > vocab || self.count > crate::sampler::MAX_CANDIDATES {
            return Err(format!("limit above the vocabulary of {vocab} or count above the cap"));
        }
        if self.ids.len() != self.logits.len() {
            return Err("as many ids as logits are needed".into());
        }
        crate::sampler::check_candidates(&self.entries(), self.limit, self.count)
    }
}

/// What a session file holds, independent of the `Session` type.
pub(crate) struct SessionState {
    pub(crate) tokens: Vec<u32>,
    pub(crate) last_logits: Vec<f32>,
    /// Instead of the logits (at most one of the three).
    pub(crate) greedy: Option<GreedyChoice>,
    pub(crate) candidates: Option<SavedCandidates>,
    pub(crate) kv_tokens: usize,
    pub(crate) regime: RopeRegime,
    pub(crate) kv: Vec<f32>,
    pub(crate) max_context: usize,
    pub(crate) rng: Rng,
    pub(crate) messages: Vec<ChatMessage>,
    pub(crate) needs_generation_prompt: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn format_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::ModelFormat, format!("{}: {message}", path.display()))
}

/// Write `state` of a session of `model` to `path` (atomically: temp file + rename).
pub(crate) fn save(model: &Model, state: &SessionState, path: &Path) -> Result<()> {
    let config = model.config();
    let header = SessionHeader {
        fingerprint: hex(&model.fingerprint()),
        n_tokens: state.tokens.len(),
        kv_tokens: state.kv_tokens,
        long_rope: state.regime == RopeRegime::Long,
        max_context: state.max_context,
        rng_state: state.rng.state(),
        n_layers: config.num_hidden_layers,
        kv_dim: config.kv_dim(),
        vocab: config.vocab_size,
        has_logits: !state.last_logits.is_empty(),
        greedy: state.greedy,
        candidates: state.candidates.clone(),
        messages: state.messages.clone(),
        needs_generation_prompt: state.needs_generation_prompt,
    };
    let header_json =
        serde_json::to_vec(&header).map_err(|e| Error::internal(format!("session header: {e}")))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile_in(dir, path)?;
    let write = || -> std::io::Result<()> {
        let mut out =
            HashingWriter { inner: BufWriter::new(create_new(&tmp)?), hash: Sha256::new() };
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&(header_json.len() as u32).to_le_bytes())?;
        out.write_all(&header_json)?;
        write_words(&mut out, state.tokens.iter().copied())?;
        write_words(&mut out, state.last_logits.iter().chain(&state.kv).map(|x| x.to_bits()))?;
        let digest = out.hash.finalize();
        let mut inner = out.inner;
        inner.write_all(&digest)?;
        inner.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    if let Err(e) = write().and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Create `path`, failing if anything exists there: a file or symlink planted at the temporary
/// name is never followed or overwritten (O_EXCL).
fn create_new(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().write(true).create_new(true).open(path)
}

/// A temporary file name beside `target`, unique to this process and call.
fn tempfile_in(dir: &Path, target: &Path) -> Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("{}: not a file path", target.display())))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{}.{}.{n}.tmp", name.to_string_lossy(), std::process::id())))
}

/// Read and check a session file written for `model`.
pub(crate) fn load(model: &Model, path: &Path) -> Result<SessionState> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut input = HashingReader { inner: BufReader::new(file), hash: Sha256::new() };
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format_err(path, "truncated session file")
        } else {
            Error::io(path, e)
        }
    };

    let mut fixed = [0u8; 16];
    input.read_exact(&mut fixed).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format_err(path, "not a phi3 session file (too short)")
        } else {
            Error::io(path, e)
        }
    })?;
    if &fixed[..8] != MAGIC {
        return Err(format_err(path, "not a phi3 session file (bad magic)"));
    }
    let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    if version != VERSION {
        return Err(Error::unsupported(format!(
            "{}: session file version {version}; this build reads version {VERSION}",
            path.display()
        )));
    }
    let header_len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
    if header_len > MAX_HEADER || u64::from(header_len) + 16 > file_len {
        return Err(format_err(path, format!("session header length {header_len} is invalid")));
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    input.read_exact(&mut header_bytes).map_err(io)?;
    let header: SessionHeader = serde_json::from_slice(&header_bytes)
        .map_err(|e| format_err(path, format!("invalid session header: {e}")))?;

    let config = model.config();
    if header.fingerprint != hex(&model.fingerprint()) {
        return Err(Error::invalid_argument(format!(
            "{}: the session was saved from a different model (fingerprint {}, this model {})",
            path.display(),
            header.fingerprint,
            hex(&model.fingerprint())
        )));
    }
    let geometry_ok = header.n_layers == config.num_hidden_layers
        && header.kv_dim == config.kv_dim()
        && header.vocab == config.vocab_size;
    if !geometry_ok
        || header.n_tokens > model.max_context()
        || header.kv_tokens > header.n_tokens
        || header.max_context == 0
        || header.max_context > model.max_context()
        || header.n_tokens > header.max_context
    {
        return Err(format_err(path, "session header sizes do not fit this model"));
    }
    // A greedy choice or candidates are only ever saved for a fully cached session without
    // logits, and never both.
    let only_output = !header.has_logits
        && header.n_tokens > 0
        && header.kv_tokens == header.n_tokens
        && !(header.greedy.is_some() && header.candidates.is_some());
    if let Some(g) = header.greedy {
        // With a token below its limit (which is at most the vocabulary).
        let consistent = only_output
            && g.limit <= header.vocab
            && g.token.is_none_or(|t| (t as usize) < g.limit);
        if !consistent {
            return Err(format_err(path, format!("session header: inconsistent greedy {g:?}")));
        }
    }
    if let Some(c) = &header.candidates {
        let checked = if only_output { c.check(header.vocab) } else { Err("not alone".into()) };
        if let Err(why) = checked {
            return Err(format_err(
                path,
                format!(
                    "session header: inconsistent candidates ({} ids, {} logits, {} asked below \
                     {}): {why}",
                    c.ids.len(),
                    c.logits.len(),
                    c.count,
                    c.limit
                ),
            ));
        }
    }
    let logits_len = if header.has_logits { header.vocab } else { 0 };
    // Every factor is bounded by the checks above (dims <= 2^20, tokens <= 2^24), yet checked
    // arithmetic keeps a hostile header from wrapping on any platform.
    let sizes = || -> Option<(usize, u64)> {
        let kv_len = header
            .n_layers
            .checked_mul(2)?
            .checked_mul(header.kv_tokens)?
            .checked_mul(header.kv_dim)?;
        let words = header.n_tokens.checked_add(logits_len)?.checked_add(kv_len)?;
        let expected = u64::try_from(words).ok()?.checked_mul(4)?.checked_add(16 + 32)?;
        Some((kv_len, expected.checked_add(u64::from(header_len))?))
    };
    let Some((kv_len, expected)) = sizes() else {
        return Err(format_err(path, "session header sizes overflow"));
    };
    if expected != file_len {
        return Err(format_err(
            path,
            format!("session file is {file_len} bytes, its header implies {expected} (truncated or corrupted)"),
        ));
    }
    let tokens = read_words(&mut input, header.n_tokens).map_err(io)?;
    let last_logits: Vec<f32> =
        read_words(&mut input, logits_len).map_err(io)?.into_iter().map(f32::from_bits).collect();
    let kv: Vec<f32> =
        read_words(&mut input, kv_len).map_err(io)?.into_iter().map(f32::from_bits).collect();
    let digest = input.hash.finalize();
    let mut stored = [0u8; 32];
    input.inner.read_exact(&mut stored).map_err(io)?;
    if digest.as_slice() != stored && VERIFY_CHECKSUM {
        return Err(format_err(path, "session file checksum mismatch (corrupted)"));
    }
    model.check_tokens(&tokens).map_err(|e| e.context(path.display()))?;
    let rng = Rng::from_state(header.rng_state).map_err(|e| e.context(path.display()))?;
    Ok(SessionState {
        tokens,
        last_logits,
        greedy: header.greedy,
        candidates: header.candidates,
        kv_tokens: header.kv_tokens,
        regime: if header.long_rope { RopeRegime::Long } else { RopeRegime::Short },
        kv,
        max_context: header.max_context,
        rng,
        messages: header.messages,
        needs_generation_prompt: header.needs_generation_prompt,
    })
}

/// Write 32-bit words little-endian, in blocks (one hash update per block, not per word).
fn write_words(out: &mut impl Write, words: impl Iterator<Item = u32>) -> std::io::Result<()> {
    let mut block = Vec::with_capacity(1 << 16);
    for w in words {
        block.extend_from_slice(&w.to_le_bytes());
        if block.len() == block.capacity() {
            out.write_all(&block)?;
            block.clear();
        }
    }
    out.write_all(&block)
}

/// Read `n` little-endian 32-bit words.
fn read_words(input: &mut impl Read, n: usize) -> std::io::Result<Vec<u32>> {
    let mut bytes = vec![0u8; n * 4];
    input.read_exact(&mut bytes)?;
    Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

//! Incremental (streaming) detokenizer: turns generated token ids into text chunks as they arrive,
//! never splitting a UTF-8 character across byte-fallback tokens.
//!
//! HF reference: text-generation-inference `server/text_generation_server/models/model.py`
//! (`Model.decode_token`) and `tokenizers`' `DecodeStream`: decode a short window of ids twice,
//! with and without the newest ones, and emit the difference, so that decoders that look at
//! neighbouring tokens (SentencePiece's leading-space strip) see the same context as a full decode.
//!
//! Invariant: the concatenation of every `push` result and the final `flush` equals
//! `tokenizer.decode(ids)` (with a prefix: `decode(prefix + ids)` minus `decode(prefix)`), and no
//! chunk contains U+FFFD unless that full decode does.
//!
//! Why byte runs are held back until a non-byte token arrives (TGI only waits while the text ends
//! in U+FFFD): HF's `ByteFallback` decoder converts a whole run of consecutive `<0xHH>` tokens at
//! once and turns *every* byte of the run into U+FFFD when any part is invalid, so a valid emoji
//! can still become U+FFFD U+FFFD U+FFFD U+FFFD in the full decode if a stray byte follows it.
//! Emitting it early would break the invariant; holding it costs one token of latency for text
//! made of byte tokens only. The U+FFFD check is kept for byte-level BPE vocabularies (Phi-4),
//! whose tokens may end inside a character.
//!
//! Not here: stop strings (generate.rs) and the tokenizer itself (tokenizer.rs).

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Closing tokens kept before the newest ones so that context-dependent decoders see the same
/// neighbours as in a full decode (TGI keeps 5 ids).
const CONTEXT_TOKENS: usize = 5;
/// Ids before the window are dropped once this many have accumulated, so memory stays bounded
/// over a long generation.
const TRIM_AT: usize = 256;

/// Streaming decoder state for one generation. Owns a (cheaply cloned) [`Tokenizer`].
#[derive(Clone, Debug)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// The tail of the session's ids that later decodes still need: the window plus held ids.
    ids: Vec<u32>,
    /// Start of the context window in `ids`: always 0 or just after a closing token.
    prefix_offset: usize,
    /// End of the text already returned; `ids[read_offset..]` are held back.
    read_offset: usize,
    /// Number of ids pushed so far, to name a bad id's position.
    pushed: usize,
}

impl IncrementalDecoder {
    /// A decoder for a generation that starts with no context (the first text has its leading
    /// SentencePiece space stripped, as `decode` does).
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> Self {
        Self::with_prefix(tokenizer, skip_special_tokens, &[])
    }

    /// A decoder for a generation that continues `prefix_ids` (the session's tokens so far). Only
    /// the last few prefix ids are kept. In context the first generated word keeps its leading
    /// space (`"▁Sure"` after a prompt streams as `" Sure"`; HF's `TextStreamer`, which decodes
    /// the generated ids alone, shows `"Sure"`: use [`Self::new`] for that). The text of the
    /// prefix is not returned, except for a
    /// character whose byte-fallback tokens straddle the end of the prefix: those bytes are
    /// returned with the rest of the character. Ids the tokenizer does not know are ignored here
    /// (sessions validate their tokens when they append them).
    pub fn with_prefix(
        tokenizer: Tokenizer,
        skip_special_tokens: bool,
        prefix_ids: &[u32],
    ) -> Self {
        let mut dec = IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            pushed: 0,
        };
        let (start, read) = dec.window_of(prefix_ids);
        dec.ids = prefix_ids[start..].to_vec();
        // A prefix ending in a byte run that already decodes to whole characters (e.g. "é"
        // before skipped special tokens) is prompt text: count it as returned, so the reply never
        // repeats it. Only a character left incomplete by the prefix is held for the reply.
        let complete =
            dec.decode(0, dec.ids.len()).map(|text| !text.ends_with('\u{FFFD}')).unwrap_or(false);
        dec.read_offset = if complete { dec.ids.len() } else { read - start };
        dec
    }

    /// Add one generated id; returns the text it completes (empty while a character's bytes, or
    /// the context a decoder needs, are still incomplete). An id outside the vocabulary is a
    /// `TokenOutOfRange` error naming its position among the pushed ids; the state is unchanged.
    /// A failure inside the `tokenizers` crate's decode is `Internal`.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.check_id(self.pushed, id)?;
        self.pushed += 1;
        self.ids.push(id);
        if !self.closes(id) {
            return Ok(String::new());
        }
        let prefix_text = self.decode(self.prefix_offset, self.read_offset)?;
        let new_text = self.decode(self.prefix_offset, self.ids.len())?;
        if new_text.len() <= prefix_text.len()
            || !new_text.starts_with(&prefix_text)
            || new_text.ends_with('\u{FFFD}')
        {
            return Ok(String::new());
        }
        let chunk = new_text[prefix_text.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if self.prefix_offset >= TRIM_AT {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(chunk)
    }

    /// The text still held back (incomplete bytes become U+FFFD, as in `decode`). Ends the
    /// stream; later pushes continue after the flushed text, with the ids so far as context.
    pub fn flush(&mut self) -> String {
        let (prefix_text, new_text) = match (
            self.decode(self.prefix_offset, self.read_offset),
            self.decode(self.prefix_offset, self.ids.len()),
        ) {
            (Ok(p), Ok(n)) => (p, n),
            (Err(e), _) | (_, Err(e)) => {
                // Unreachable in practice: every id was checked when pushed.
                log::error!("incremental decoder: flush failed: {e}");
                return String::new();
            }
        };
        let common = common_prefix_len(&prefix_text, &new_text);
        let chunk = new_text[common..].to_string();
        let ids = std::mem::take(&mut self.ids);
        let (start, _) = self.window_of(&ids);
        self.ids = ids[start..].to_vec();
        // Everything up to the end has now been returned.
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        chunk
    }

    /// Whether `id` ends any byte-fallback run before it: a token that `decode` keeps and that
    /// is not a byte piece. (Skipped special tokens vanish before the decoder, so byte pieces on
    /// both sides of one join into a single run.)
    fn closes(&self, id: u32) -> bool {
        let skipped = self.skip_special_tokens && self.tokenizer.is_special(id);
        !(skipped || self.tokenizer.is_byte_token(id))
    }

    /// For context ids `ids`: (window start, read offset). The read offset is just after the last
    /// closing token (so an open byte run is re-read); the window starts at 0 or just after a
    /// closing token, and holds up to `CONTEXT_TOKENS` closing tokens so that it decodes to
    /// something when anything before it does.
    fn window_of(&self, ids: &[u32]) -> (usize, usize) {
        let read = ids.iter().rposition(|&id| self.closes(id)).map_or(0, |i| i + 1);
        let mut start = read;
        let mut closers = 0;
        while start > 0 && (closers < CONTEXT_TOKENS || !self.closes(ids[start - 1])) {
            start -= 1;
            if self.closes(ids[start]) {
                closers += 1;
            }
        }
        (start, read)
    }

    fn decode(&self, from: usize, to: usize) -> Result<String> {
        self.tokenizer.decode_unchecked(&self.ids[from..to], self.skip_special_tokens)
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::tokenizer::tests::tiny;

    const HELLO: u32 = 273; // ▁hello
    const WORLD: u32 = 278; // ▁world
    const SPACE: u32 = 259; // ▁
    const HI: u32 = 279; // hi
    const E_ACUTE: u32 = 268; // é
    const END: u32 = 280; // <|end|>, special
    const BOS: u32 = 1; // <s>, special
    const EOS: u32 = 2; // </s>, not special

    fn byte(b: u8) -> u32 {
        3 + u32::from(b)
    }

    /// Push every id, flush, and check the module invariant against a full decode.
    fn check(prefix: &[u32], ids: &[u32], skip: bool) -> Vec<String> {
        let tok = tiny();
        let mut dec = IncrementalDecoder::with_prefix(tok.clone(), skip, prefix);
        let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
        chunks.push(dec.flush());
        let all: Vec<u32> = prefix.iter().chain(ids).copied().collect();
        let full = tok.decode(&all, skip).unwrap();
        let before = tok.decode(prefix, skip).unwrap();
        let expected = full
            .strip_prefix(before.as_str())
            .unwrap_or_else(|| panic!("decode(prefix) {before:?} is not a prefix of {full:?}"));
        assert_eq!(chunks.concat(), expected, "prefix {prefix:?} ids {ids:?} skip {skip}");
        if !expected.contains('\u{FFFD}') {
            for c in &chunks {
                assert!(!c.contains('\u{FFFD}'), "chunk {c:?} of {chunks:?}");
            }
        }
        chunks
    }

    #[test]
    fn words_stream_one_by_one() {
        let chunks = check(&[], &[HELLO, WORLD, SPACE, HI], false);
        assert_eq!(chunks, ["hello", " world", " ", "hi", ""]);
    }

    #[test]
    fn emoji_bytes_are_held_until_the_run_closes() {
        let smile = "😀".as_bytes().iter().map(|&b| byte(b)).collect::<Vec<_>>();
        let ids: Vec<u32> = [HELLO, SPACE].iter().chain(&smile).chain(&[WORLD]).copied().collect();
        let chunks = check(&[], &ids, false);
        assert_eq!(chunks, ["hello", " ", "", "", "", "", "😀 world", ""]);
        // At the end of the stream flush returns the held character.
        let chunks = check(&[], &smile, false);
        assert_eq!(chunks, ["", "", "", "", "😀"]);
    }

    #[test]
    fn incomplete_and_poisoned_runs_match_full_decode() {
        // Truncated emoji at the end: flush gives U+FFFD per byte, as decode does.
        let chunks = check(&[], &[HELLO, byte(0xF0), byte(0x9F)], false);
        assert_eq!(chunks.last().map(String::as_str), Some("\u{FFFD}\u{FFFD}"));
        // A stray continuation byte turns the whole run (including a valid é) into U+FFFD.
        check(&[], &[HI, byte(0xC3), byte(0xA9), byte(0x80), HI], false);
    }

    #[test]
    fn special_tokens_kept_or_skipped() {
        let ids = [BOS, HELLO, END, SPACE, WORLD, EOS, END, HI];
        let kept = check(&[], &ids, false);
        assert_eq!(kept.concat(), "<s> hello<|end|>  world</s><|end|>hi");
        let skipped = check(&[], &ids, true);
        assert_eq!(skipped.concat(), "hello  world</s>hi");
        // Byte pieces on both sides of a skipped special token form one run.
        let ids = [HI, byte(0xC3), END, byte(0xA9), HI];
        assert_eq!(check(&[], &ids, true).concat(), "hié hi".replace(' ', ""));
        check(&[], &ids, false);
    }

    #[test]
    fn prefix_context_keeps_leading_spaces() {
        // Without context "▁hello" would lose its space; after a prefix it keeps it.
        assert_eq!(check(&[HI], &[HELLO], false), [" hello", ""]);
        assert_eq!(check(&[BOS, END, END], &[HELLO], true), ["hello", ""]);
        assert_eq!(check(&[HI, END, END, END, END, END, END, END], &[HELLO], true), [" hello", ""]);
        // A prefix ending inside a byte run: the character is returned whole.
        let mut dec = IncrementalDecoder::with_prefix(tiny(), false, &[HI, byte(0xC3)]);
        assert_eq!(dec.push(byte(0xA9)).unwrap(), "");
        assert_eq!(dec.push(HI).unwrap(), "\u{FFFD}éhi".trim_start_matches('\u{FFFD}'));
    }

    #[test]
    fn push_rejects_unknown_ids_without_changing_state() {
        let mut dec = IncrementalDecoder::new(tiny(), false);
        assert_eq!(dec.push(HELLO).unwrap(), "hello");
        let e = dec.push(281).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TokenOutOfRange);
        assert_eq!(e.message(), "tokens[1] = 281 out of range [0, 281)");
        assert_eq!(dec.push(WORLD).unwrap(), " world");
        assert_eq!(dec.flush(), "");
        // After flush the stream continues with the flushed ids as context.
        assert_eq!(dec.push(HELLO).unwrap(), " hello");
    }

    #[test]
    fn long_streams_trim_their_buffer() {
        let ids: Vec<u32> =
            (0..2000).map(|i| [HELLO, WORLD, E_ACUTE, byte(0xC3), byte(0xA9)][i % 5]).collect();
        let mut dec = IncrementalDecoder::new(tiny(), false);
        let mut out = String::new();
        for &id in &ids {
            out += &dec.push(id).unwrap();
            assert!(dec.ids.len() < TRIM_AT + 16);
        }
        out += &dec.flush();
        assert_eq!(out, tiny().decode(&ids, false).unwrap());
    }

    /// Random sequences over the whole tiny vocabulary (bytes, pieces, special and non-special
    /// added tokens), with random prefixes, in both skip modes.
    #[test]
    fn random_sequences_keep_the_invariant() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let interesting = [
            HELLO,
            WORLD,
            SPACE,
            HI,
            E_ACUTE,
            END,
            BOS,
            EOS,
            0,
            byte(0xC3),
            byte(0xA9),
            byte(0xF0),
            byte(0x9F),
            byte(0x98),
            byte(0x80),
            byte(b'a'),
            byte(0xFF),
        ];
        for _ in 0..400 {
            let len = next(12) as usize;
            let ids: Vec<u32> =
                (0..len)
                    .map(|_| {
                        if next(4) == 0 {
                            next(281) as u32
                        } else {
                            interesting[next(17) as usize]
                        }
                    })
                    .collect();
            let split = next(len as u64 + 1) as usize;
            for skip in [false, true] {
                let (prefix, rest) = ids.split_at(split);
                let tok = tiny();
                let before = tok.decode(prefix, skip).unwrap();
                let full = tok.decode(&ids, skip).unwrap();
                // The invariant is stated for prefixes whose text is a prefix of the whole text.
                let probe = IncrementalDecoder::new(tok.clone(), skip);
                let closes = prefix.last().is_none_or(|&id| probe.closes(id));
                if full.starts_with(&before) && closes {
                    check(prefix, rest, skip);
                }
                check(&[], &ids, skip);
            }
        }
    }
}

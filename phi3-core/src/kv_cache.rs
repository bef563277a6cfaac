//! `SeqKv`: one sequence's KV cache as the session holds it: the ids of its blocks in the
//! model's pool (`kv_pool.rs`), how many tokens they hold, and which LongRoPE regime the keys are
//! rotated with. Backend-independent: the data lives in the pool.
//!
//! Positions past `len` inside the last block are garbage, which is what makes truncation free.
//! Invariant: every cached entry was computed in `regime`, and `blocks` covers `len` tokens
//! (more only between a reservation and the forward pass that fills it).
//!
//! Why a regime switch empties the cache instead of re-rotating keys: in HF's full forward of a
//! sequence longer than `original_max_position_embeddings`, *every* position uses the long
//! factors, so layer 0's attention output at early positions changes, and with it the keys and
//! values of every deeper layer. Re-rotating cached keys fixes layer 0 only (measured on the
//! oracle fixtures: relative logit error 1e-1 after re-rotation, 1e-6 after recomputation). The
//! session therefore recomputes its history in the new regime, as HF's generate does.

use crate::error::{Error, Result};
use crate::rope::RopeRegime;

/// A sequence's KV cache: block ids in its model's pool.
#[derive(Debug)]
pub(crate) struct SeqKv {
    /// Block `i` holds positions `i * KV_BLOCK_TOKENS ..`; ids are counted references into the
    /// pool (see `KvPool`), so a clone must go through `KvPool::share`.
    pub(crate) blocks: Vec<u32>,
    /// Tokens whose keys and values are valid.
    len: usize,
    /// Rotation of the cached keys.
    regime: RopeRegime,
}

impl Default for SeqKv {
    fn default() -> Self {
        SeqKv { blocks: Vec::new(), len: 0, regime: RopeRegime::Short }
    }
}

impl SeqKv {
    /// An empty cache holding no blocks.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A cache over `blocks` (already counted for it) holding `len` tokens in `regime`.
    pub(crate) fn from_parts(blocks: Vec<u32>, len: usize, regime: RopeRegime) -> Self {
        SeqKv { blocks, len, regime }
    }

    /// Number of cached tokens.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Record that positions `0..len` are now valid (after a successful forward).
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Forget tokens past `len` (no data moves; the pool takes back whole blocks past it).
    pub(crate) fn forget_after(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Prepare to append entries computed in `regime`: an empty cache adopts it; a non-empty
    /// one must already be in it (the session recomputes its history on a switch).
    pub(crate) fn prepare(&mut self, regime: RopeRegime) -> Result<()> {
        if self.len == 0 {
            self.regime = regime;
        } else if self.regime != regime {
            return Err(Error::internal(format!(
                "KV cache holds {} tokens in the {:?} rope regime; a {regime:?} append needs a recompute",
                self.len, self.regime
            )));
        }
        Ok(())
    }

    /// The regime the cached entries were computed in.
    pub(crate) fn regime(&self) -> RopeRegime {
        self.regime
    }
}

//! `KvPool<B>`: the paged KV memory of one model: block storage on the backend plus which
//! sequences hold which blocks.
//!
//! Every sequence ([`SeqKv`]) owns a table of block ids; a block holds [`KV_BLOCK_TOKENS`] tokens
//! of every layer. Blocks are reference-counted: a fork takes another reference to each of its
//! parent's blocks (nothing is copied, so a long system prompt is cached once for any number of
//! conversations), and a sequence about to write into a block another one also holds copies it
//! first (copy on write). Freed blocks go to a free list and are reused before the storage
//! grows; storage grows up to the budget (`LoadOptions::kv_memory`, or the backend's default),
//! never shrinks.
//!
//! A reservation is all or nothing: when the pool cannot supply every block a pass needs, the
//! sequence is left exactly as it was and the error (`OutOfMemory`) says what was asked and what
//! the budget allows.

use crate::backend::{Backend, KvLayout, KV_BLOCK_TOKENS};
use crate::error::{Error, ErrorKind, Result};
use crate::kv_cache::SeqKv;

/// A model's KV memory on backend `B`.
pub(crate) struct KvPool<B: Backend> {
    pub(crate) storage: B::KvPool,
    /// Per block: how many sequences hold it (0: free).
    refs: Vec<u32>,
    /// Free block ids, reused last-freed first.
    free: Vec<u32>,
    /// Most blocks the storage may grow to.
    max_blocks: usize,
    /// Bytes of one block on the backend.
    block_bytes: u64,
}

/// How a model's KV memory is used (see [`crate::Model::kv_usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvUsage {
    /// Tokens per block.
    pub block_tokens: usize,
    /// Bytes of one block (every layer's keys and values of `block_tokens` tokens).
    pub block_bytes: u64,
    /// Blocks held by at least one sequence (a block shared by forks counts once).
    pub blocks_in_use: usize,
    /// Blocks the backend has allocated (in use or free for reuse).
    pub blocks_allocated: usize,
    /// Most blocks the budget allows; `None` when only allocation failure limits it.
    pub max_blocks: Option<usize>,
}

impl<B: Backend> KvPool<B> {
    /// An empty pool for sequences of `layout`, growing to at most `budget` bytes.
    pub(crate) fn new(be: &B, layout: &KvLayout, budget: Option<u64>) -> Result<Self> {
        let block_bytes = be.kv_block_bytes(layout).max(1);
        let max_blocks = match budget {
            Some(bytes) if bytes < block_bytes => {
                return Err(Error::invalid_argument(format!(
                    "a KV memory budget of {bytes} bytes is less than one KV block \
                     ({block_bytes} bytes: {KV_BLOCK_TOKENS} tokens)"
                )))
            }
            Some(bytes) => usize::try_from(bytes / block_bytes).unwrap_or(usize::MAX),
            None => usize::MAX,
        }
        .min(u32::MAX as usize); // block ids are u32
        Ok(KvPool {
            storage: be.new_kv_pool(layout)?,
            refs: Vec::new(),
            free: Vec::new(),
            max_blocks,
            block_bytes,
        })
    }

    /// Blocks a sequence of `tokens` tokens holds.
    pub(crate) fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(KV_BLOCK_TOKENS)
    }

    /// Whether a sequence of `tokens` tokens fits the budget at all (with every other block
    /// free): a request that does not can never be served, waiting or not.
    pub(crate) fn could_ever_hold(&self, tokens: usize) -> bool {
        Self::blocks_for(tokens) <= self.max_blocks
    }

    /// Current use, for reports and tests.
    pub(crate) fn usage(&self) -> KvUsage {
        KvUsage {
            block_tokens: KV_BLOCK_TOKENS,
            block_bytes: self.block_bytes,
            blocks_in_use: self.refs.iter().filter(|&&r| r > 0).count(),
            blocks_allocated: self.refs.len(),
            max_blocks: (self.max_blocks < u32::MAX as usize).then_some(self.max_blocks),
        }
    }

    /// Make `kv` able to take positions `kv.len()..new_len`: a private copy of every shared
    /// block those positions fall in, and fresh blocks past its table. All or nothing: on error
    /// `kv` and the pool are as they were.
    ///
    /// Errors: `OutOfMemory` when the budget (or the backend's memory) cannot supply the blocks.
    pub(crate) fn reserve(&mut self, be: &B, kv: &mut SeqKv, new_len: usize) -> Result<()> {
        let first = kv.len() / KV_BLOCK_TOKENS;
        let needed = Self::blocks_for(new_len);
        let shared: Vec<usize> = (first..kv.blocks.len().min(needed))
            .filter(|&i| self.refs[kv.blocks[i] as usize] > 1)
            .collect();
        let fresh = needed.saturating_sub(kv.blocks.len());
        let ids = self.take(be, shared.len() + fresh, new_len)?;
        let pairs: Vec<(u32, u32)> =
            shared.iter().zip(&ids).map(|(&i, &new)| (kv.blocks[i], new)).collect();
        if let Err(e) = be.copy_kv_blocks(&mut self.storage, &pairs) {
            self.put_back(&ids);
            return Err(e);
        }
        for (&i, &new) in shared.iter().zip(&ids) {
            self.refs[kv.blocks[i] as usize] -= 1;
            kv.blocks[i] = new;
        }
        kv.blocks.extend_from_slice(&ids[shared.len()..]);
        Ok(())
    }

    /// Give back the blocks of `kv` past what its `len()` tokens need (after a truncate or a
    /// failed pass).
    pub(crate) fn trim(&mut self, kv: &mut SeqKv) {
        let keep = Self::blocks_for(kv.len());
        if kv.blocks.len() > keep {
            let gone = kv.blocks.split_off(keep);
            self.put_back(&gone);
        }
    }

    /// Keep the first `len` tokens of `kv` and give back the blocks past them.
    pub(crate) fn truncate(&mut self, kv: &mut SeqKv, len: usize) {
        kv.forget_after(len);
        self.trim(kv);
    }

    /// A second sequence holding the same tokens and blocks (a fork): no data moves.
    pub(crate) fn share(&mut self, kv: &SeqKv) -> SeqKv {
        let blocks = kv.blocks[..Self::blocks_for(kv.len()).min(kv.blocks.len())].to_vec();
        for &b in &blocks {
            self.refs[b as usize] += 1;
        }
        SeqKv::from_parts(blocks, kv.len(), kv.regime())
    }

    /// `n` blocks for a sequence growing to `tokens` tokens, each with one reference: free ones
    /// first, then new storage up to the budget.
    fn take(&mut self, be: &B, n: usize, tokens: usize) -> Result<Vec<u32>> {
        let allocated = self.refs.len();
        let short = n.saturating_sub(self.free.len());
        if short > 0 {
            if allocated + short > self.max_blocks {
                return Err(self.exhausted(n, tokens));
            }
            let target = allocated + short;
            let got = be.grow_kv_pool(&mut self.storage, target, self.max_blocks).map_err(|e| {
                Error::new(e.kind(), format!("{} ({e})", self.exhausted(n, tokens)))
            })?;
            if got < target {
                return Err(Error::internal(format!("grow_kv_pool gave {got} < {target} blocks")));
            }
            // New blocks join the free list (highest ids last, so the lowest are used first).
            self.free.extend((allocated as u32..got as u32).rev());
            self.refs.resize(got, 0);
        }
        let ids = self.free.split_off(self.free.len() - n);
        for &b in &ids {
            self.refs[b as usize] = 1;
        }
        Ok(ids)
    }

    /// Drop one reference to each of `blocks`; blocks nobody holds become free.
    fn put_back(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let r = &mut self.refs[b as usize];
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.free.push(b);
            }
        }
    }

    /// The error for a reservation of `n` blocks that the budget cannot supply.
    fn exhausted(&self, n: usize, tokens: usize) -> Error {
        let mib = |blocks: usize| (blocks as u64 * self.block_bytes) as f64 / (1 << 20) as f64;
        let in_use = self.refs.iter().filter(|&&r| r > 0).count();
        let budget = if self.max_blocks < u32::MAX as usize {
            format!("{} blocks ({:.1} MiB)", self.max_blocks, mib(self.max_blocks))
        } else {
            "what the device could allocate".to_string()
        };
        Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "KV memory exhausted: a sequence growing to {tokens} tokens needs {n} more blocks \
                 of {KV_BLOCK_TOKENS} tokens ({:.1} MiB); {in_use} blocks are in use by sessions \
                 and the budget is {budget} (free or truncate sessions, or raise the KV budget)",
                mib(n)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    const LAYOUT: KvLayout = KvLayout { n_layers: 2, n_kv_heads: 1, head_dim: 4 };

    fn pool(budget_blocks: Option<usize>) -> KvPool<CpuBackend> {
        let be = CpuBackend;
        let bytes = be.kv_block_bytes(&LAYOUT);
        KvPool::new(&be, &LAYOUT, budget_blocks.map(|b| b as u64 * bytes)).unwrap()
    }

    #[test]
    fn fork_shares_and_first_write_copies() {
        let be = CpuBackend;
        let mut p = pool(None);
        let mut a = SeqKv::new();
        p.reserve(&be, &mut a, 40).unwrap(); // 3 blocks
        a.set_len(40);
        let mut b = p.share(&a);
        assert_eq!(b.blocks, a.blocks);
        assert_eq!(p.usage().blocks_in_use, 3);
        // b appends at 40: block 2 (positions 32..48) is shared, so b gets a copy of it.
        p.reserve(&be, &mut b, 41).unwrap();
        assert_eq!(b.blocks[..2], a.blocks[..2]);
        assert_ne!(b.blocks[2], a.blocks[2]);
        assert_eq!(p.usage().blocks_in_use, 4);
        // Appending at a block boundary copies nothing.
        b.set_len(48);
        let mut c = p.share(&b);
        p.reserve(&be, &mut c, 49).unwrap();
        assert_eq!(c.blocks[..3], b.blocks[..3]);
        assert_eq!(c.blocks.len(), 4);
        // Dropping everything frees everything.
        for kv in [&mut a, &mut b, &mut c] {
            p.truncate(kv, 0);
        }
        assert_eq!(p.usage().blocks_in_use, 0);
        assert_eq!(p.usage().blocks_allocated, 5);
    }

    #[test]
    fn budget_is_all_or_nothing_and_freed_blocks_are_reused() {
        let be = CpuBackend;
        let mut p = pool(Some(4));
        let mut a = SeqKv::new();
        p.reserve(&be, &mut a, 48).unwrap();
        a.set_len(48);
        let mut b = SeqKv::new();
        let e = p.reserve(&be, &mut b, 17).unwrap_err(); // needs 2, 1 left
        assert_eq!(e.kind(), ErrorKind::OutOfMemory);
        assert!(e.to_string().contains("needs 2 more blocks"), "{e}");
        assert!(b.blocks.is_empty());
        assert_eq!(p.usage().blocks_in_use, 3);
        assert!(!p.could_ever_hold(65) && p.could_ever_hold(64));
        p.truncate(&mut a, 10); // keeps 1 block
        p.reserve(&be, &mut b, 17).unwrap(); // the 2 freed blocks, no new storage
        assert_eq!(p.usage().blocks_allocated, 3);
        assert_eq!(p.usage().blocks_in_use, 3);
    }
}

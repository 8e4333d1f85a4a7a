//! The tree-aware prefix cache: sequences kept alive after a call, keyed by the tokens they hold.

use arbor_model::{Engine, SeqId};

/// Sequences kept alive after a call, keyed by the tokens they hold: the tree-aware part of the
/// KV cache. A node's children are generated from forks of its parent's kept sequence, so each
/// expansion computes only the tokens the cache does not already hold (usually one).
#[derive(Debug, Default)]
pub(crate) struct PrefixCache {
    entries: Vec<CacheEntry>,
    /// Logical clock for least-recently-used eviction.
    clock: u64,
}

#[derive(Debug)]
struct CacheEntry {
    tokens: Vec<u32>,
    seq: SeqId,
    last_used: u64,
}

impl PrefixCache {
    /// Sequences held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The longest cached sequence whose tokens are a proper prefix of `tokens`.
    pub(crate) fn lookup(&mut self, tokens: &[u32]) -> Option<(SeqId, usize)> {
        self.lookup_within(tokens, tokens.len().saturating_sub(1))
    }

    /// The longest cached sequence of at most `len_max` tokens that are a prefix of `tokens`.
    pub(crate) fn lookup_within(
        &mut self,
        tokens: &[u32],
        len_max: usize,
    ) -> Option<(SeqId, usize)> {
        self.clock += 1;
        let clock = self.clock;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.tokens.len() <= len_max && tokens.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())?;
        best.last_used = clock;
        Some((best.seq, best.tokens.len()))
    }

    pub(crate) fn insert(&mut self, tokens: Vec<u32>, seq: SeqId, engine: &mut Engine) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens == tokens) {
            // Already cached: keep the old sequence, drop the new duplicate.
            e.last_used = self.clock;
            engine.free(seq);
            return;
        }
        self.entries.push(CacheEntry {
            tokens,
            seq,
            last_used: self.clock,
        });
    }

    pub(crate) fn evict(&mut self, engine: &mut Engine, entries_max: usize, blocks_max: usize) {
        while !self.entries.is_empty()
            && (self.entries.len() > entries_max || engine.kv_blocks_in_use() > blocks_max)
        {
            let (i, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .expect("non-empty");
            let e = self.entries.swap_remove(i);
            engine.free(e.seq);
        }
    }

    pub(crate) fn clear(&mut self, engine: &mut Engine) {
        for e in self.entries.drain(..) {
            engine.free(e.seq);
        }
    }
}

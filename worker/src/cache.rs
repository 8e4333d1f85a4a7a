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

    /// Gives back least recently used sequences while more than `entries_max` are held or
    /// more than `blocks_max` KV blocks are in use (by anyone: a sequence given back frees only
    /// the blocks no other sequence shares). Sorts once, however many go.
    pub(crate) fn evict(&mut self, engine: &mut Engine, entries_max: usize, blocks_max: usize) {
        let over = |held: usize, engine: &Engine| {
            held > 0 && (held > entries_max || engine.kv_blocks_in_use() > blocks_max)
        };
        if !over(self.entries.len(), engine) {
            return;
        }
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_key(|&i| self.entries[i].last_used);
        let mut gone = vec![false; self.entries.len()];
        let mut held = self.entries.len();
        for i in order {
            if !over(held, engine) {
                break;
            }
            engine.free(self.entries[i].seq);
            gone[i] = true;
            held -= 1;
        }
        let mut i = 0;
        self.entries.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
    }

    pub(crate) fn clear(&mut self, engine: &mut Engine) {
        for e in self.entries.drain(..) {
            engine.free(e.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_model::backend::cpu::CpuBackend;
    use arbor_model::tiny::TinyModel;
    use arbor_model::{EngineOptions, Model};

    /// Least recently used entries go first, only as many as the limits need, and a lookup
    /// counts as a use.
    #[test]
    fn eviction_gives_back_the_least_recently_used_until_under_the_limits() {
        let dir = std::env::temp_dir().join(format!("arbor-cache-evict-{}", std::process::id()));
        TinyModel::new("qwen2").write(&dir).unwrap();
        let model = Model::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let mut engine = Engine::new(
            Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
            EngineOptions {
                kv_blocks_max: 64,
                batch_tokens_max: 512,
            },
        );
        let mut cache = PrefixCache::default();
        // Five unshared sequences of 48 tokens: three blocks each.
        let paths: Vec<Vec<u32>> = (0..5u32)
            .map(|i| (0..48u32).map(|t| (t * 7 + i * 31 + 1) % 256).collect())
            .collect();
        for p in &paths {
            let s = engine.new_sequence();
            engine.forward(&[(s, p)]).unwrap();
            cache.insert(p.clone(), s, &mut engine);
        }
        assert_eq!(engine.kv_blocks_in_use(), 15);
        let longer = |i: usize| [&paths[i][..], &[5]].concat();
        // Entries 0 and 3 used again: 1, 2 and 4 are the least recent, in that order.
        assert_eq!(cache.lookup(&longer(0)).map(|h| h.1), Some(48));
        assert_eq!(cache.lookup(&longer(3)).map(|h| h.1), Some(48));
        // At most 9 blocks: 1 and 2 go, not 4.
        cache.evict(&mut engine, 100, 9);
        assert_eq!((cache.len(), engine.kv_blocks_in_use()), (3, 9));
        for (i, kept) in [(0, true), (1, false), (2, false), (3, true), (4, true)] {
            assert_eq!(cache.lookup(&longer(i)).is_some(), kept, "entry {i}");
        }
        // Within both limits: nothing goes. At most one entry: the last one used stays.
        cache.evict(&mut engine, 3, 9);
        assert_eq!(cache.len(), 3);
        cache.evict(&mut engine, 1, 100);
        assert_eq!(cache.len(), 1);
        assert!(cache.lookup(&longer(4)).is_some());
        assert_eq!(engine.kv_blocks_in_use(), 3);
    }
}

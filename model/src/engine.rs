//! Sequences over a paged KV cache, batched forward passes, and forking.

use std::collections::HashMap;

use crate::arch::ModelConfig;
use crate::backend::{Backend, ForwardBatch};
use crate::error::{ModelError, Result};
use crate::kv::{BlockAllocator, KV_BLOCK_TOKENS};

/// Identifies a sequence (a token prefix with its KV cache) inside one [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u32);

/// Limits of an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most KV blocks that may exist at once (each holds [`KV_BLOCK_TOKENS`] tokens of every layer).
    pub kv_blocks_max: usize,
    /// Most tokens in one forward pass; longer prefills are split into passes of this size,
    /// which bounds the memory of activations.
    pub batch_tokens_max: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        // 8192 blocks of 16 tokens: 131,072 token slots, about 3 GiB of f32 KV for Qwen2.5-0.5B.
        EngineOptions {
            kv_blocks_max: 8192,
            batch_tokens_max: 512,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
}

/// Runs a model for many sequences at once.
///
/// Sequences are created empty, grown with [`Engine::forward`], cloned cheaply with
/// [`Engine::fork`] (children share the parent's KV blocks), and freed with [`Engine::free`].
pub struct Engine {
    backend: Box<dyn Backend>,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, SeqState>,
    next_id: u32,
    options: EngineOptions,
    /// Output buffer of `forward`, reused between calls.
    logits: Vec<f32>,
    /// Logits of one pass, reused between calls.
    pass_logits: Vec<f32>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.name())
            .field("sequences", &self.seqs.len())
            .field("kv_blocks_in_use", &self.alloc.in_use())
            .finish()
    }
}

impl Engine {
    /// An engine over a backend.
    pub fn new(backend: Box<dyn Backend>, options: EngineOptions) -> Self {
        Engine {
            backend,
            alloc: BlockAllocator::new(options.kv_blocks_max),
            seqs: HashMap::new(),
            next_id: 0,
            options,
            logits: Vec::new(),
            pass_logits: Vec::new(),
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Creates an empty sequence.
    pub fn new_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.seqs.insert(id, SeqState::default());
        id
    }

    /// Creates a sequence that shares all of `parent`'s tokens and KV blocks.
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let state = self
            .seqs
            .get(&parent)
            .ok_or_else(|| unknown(parent))?
            .clone();
        for &b in &state.blocks {
            self.alloc.retain(b);
        }
        let id = SeqId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.seqs.insert(id, state);
        Ok(id)
    }

    /// Frees a sequence; blocks no other sequence shares return to the pool.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(state) = self.seqs.remove(&seq) {
            for b in state.blocks {
                self.alloc.release(b);
            }
        }
    }

    /// Number of tokens in a sequence.
    pub fn seq_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len)
    }

    /// Live sequences.
    pub fn n_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// KV blocks owned by at least one sequence.
    pub fn kv_blocks_in_use(&self) -> usize {
        self.alloc.in_use()
    }

    /// Appends `tokens` to each listed sequence, runs the model over them, and returns the
    /// next-token logits after the last token of each entry (`entries.len() * vocab_size`).
    ///
    /// Either every entry is appended or, on error, none is: a bad request (unknown sequence,
    /// token id out of range, context too long, cache full) changes nothing.
    ///
    /// The returned slice is a buffer the engine reuses on the next call.
    pub fn forward(&mut self, entries: &[(SeqId, &[u32])]) -> Result<&[f32]> {
        self.forward_impl(entries, false)
    }

    /// Like [`Engine::forward`], but returns the logits after *every* appended token, entry
    /// after entry (`Σ tokens * vocab_size`): what scoring a path token by token needs.
    pub fn forward_all_logits(&mut self, entries: &[(SeqId, &[u32])]) -> Result<&[f32]> {
        self.forward_impl(entries, true)
    }

    fn forward_impl(&mut self, entries: &[(SeqId, &[u32])], all: bool) -> Result<&[f32]> {
        self.validate(entries)?;
        let vocab = self.config().vocab_size;
        // Where each entry's logits start in the output.
        let mut out_start = Vec::with_capacity(entries.len());
        let mut total = 0;
        for (_, toks) in entries {
            out_start.push(total);
            total += if all { toks.len() } else { 1 };
        }
        // Reused buffers: a fresh 600 kB vector per step would be a fresh mmap and page faults.
        let mut logits = std::mem::take(&mut self.logits);
        logits.resize(total * vocab, 0.0);
        // Split long inputs into passes of at most `batch_tokens_max` tokens; every entry's
        // tokens go in order, and later passes attend to what earlier ones wrote.
        let mut offsets = vec![0usize; entries.len()];
        let mut pass_logits = std::mem::take(&mut self.pass_logits);
        let result = loop {
            let mut budget = self.options.batch_tokens_max;
            let mut pass: Vec<(usize, SeqId, &[u32])> = Vec::new();
            for (e, (seq, toks)) in entries.iter().enumerate() {
                if offsets[e] < toks.len() && budget > 0 {
                    let take = (toks.len() - offsets[e]).min(budget);
                    pass.push((e, *seq, &toks[offsets[e]..offsets[e] + take]));
                    offsets[e] += take;
                    budget -= take;
                }
            }
            if pass.is_empty() {
                break Ok(());
            }
            // For each entry in the pass: which of its tokens need logits, and where they go.
            let mut want: Vec<(usize, usize)> = Vec::new(); // (token index in pass, output row)
            let mut idx = 0;
            for (e, _, toks) in &pass {
                let end = offsets[*e];
                let start = end - toks.len();
                if all {
                    for k in 0..toks.len() {
                        want.push((idx + k, out_start[*e] + start + k));
                    }
                } else if end == entries[*e].1.len() {
                    want.push((idx + toks.len() - 1, out_start[*e]));
                }
                idx += toks.len();
            }
            let logits_for: Vec<u32> = want.iter().map(|w| w.0 as u32).collect();
            if let Err(e) = self.run_pass(&pass, &logits_for, &mut pass_logits) {
                break Err(e);
            }
            for (j, (_, row)) in want.iter().enumerate() {
                logits[row * vocab..(row + 1) * vocab]
                    .copy_from_slice(&pass_logits[j * vocab..(j + 1) * vocab]);
            }
        };
        self.pass_logits = pass_logits;
        self.logits = logits;
        result?;
        Ok(&self.logits[..total * vocab])
    }

    fn validate(&self, entries: &[(SeqId, &[u32])]) -> Result<()> {
        let cfg = self.config();
        let mut seen = std::collections::HashSet::new();
        let mut blocks_needed = 0usize;
        for (seq, toks) in entries {
            let state = self.seqs.get(seq).ok_or_else(|| unknown(*seq))?;
            if !seen.insert(*seq) {
                return Err(ModelError::invalid(
                    "entries",
                    format!("sequence {} appears twice in one batch", seq.0),
                ));
            }
            if toks.is_empty() {
                return Err(ModelError::invalid(
                    "tokens",
                    format!("no tokens given for sequence {}", seq.0),
                ));
            }
            if let Some(&t) = toks.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::invalid(
                    "tokens",
                    format!(
                        "token id {t} is outside the vocabulary of {}",
                        cfg.vocab_size
                    ),
                ));
            }
            let new_len = state.len + toks.len();
            if new_len > cfg.context_length {
                return Err(ModelError::invalid(
                    "tokens",
                    format!(
                        "sequence {} would hold {new_len} tokens, beyond the model's context of {}",
                        seq.0, cfg.context_length
                    ),
                ));
            }
            let cow = state.len % KV_BLOCK_TOKENS != 0
                && state
                    .blocks
                    .last()
                    .is_some_and(|&b| self.alloc.is_shared(b));
            blocks_needed +=
                new_len.div_ceil(KV_BLOCK_TOKENS) - state.blocks.len() + usize::from(cow);
        }
        if blocks_needed > self.alloc.available() {
            return Err(ModelError::KvCacheFull {
                needed: blocks_needed,
                limit: self.alloc.limit(),
                block_size: KV_BLOCK_TOKENS,
            });
        }
        Ok(())
    }

    /// Reserves slots for one pass, runs it, and advances the sequences.
    fn run_pass(
        &mut self,
        pass: &[(usize, SeqId, &[u32])],
        logits_for: &[u32],
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut seq_index = Vec::new();
        let mut tables = Vec::with_capacity(pass.len());
        for (j, (_, seq, toks)) in pass.iter().enumerate() {
            self.reserve(*seq, toks.len())?;
            let state = &self.seqs[seq];
            for (k, &t) in toks.iter().enumerate() {
                tokens.push(t);
                positions.push((state.len + k) as u32);
                seq_index.push(j as u32);
            }
            tables.push(state.blocks.clone());
        }
        self.backend.ensure_kv_blocks(self.alloc.high_water())?;
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            seq_index: &seq_index,
            block_tables: &tables,
            logits_for,
        };
        self.backend.forward(&batch, logits)?;
        for (_, seq, toks) in pass {
            self.seqs.get_mut(seq).expect("validated").len += toks.len();
        }
        Ok(())
    }

    /// Makes sure `seq` owns writable slots for `n` more tokens: copies a shared, partly
    /// filled last block, and appends fresh blocks.
    fn reserve(&mut self, seq: SeqId, n: usize) -> Result<()> {
        let state = self.seqs.get(&seq).ok_or_else(|| unknown(seq))?;
        let (len, last) = (state.len, state.blocks.last().copied());
        if len % KV_BLOCK_TOKENS != 0 {
            let last = last.expect("a partly filled sequence has a last block");
            if self.alloc.is_shared(last) {
                let fresh = self.alloc.alloc()?;
                self.backend.ensure_kv_blocks(self.alloc.high_water())?;
                self.backend
                    .copy_kv_block(last, fresh, len % KV_BLOCK_TOKENS);
                self.alloc.release(last);
                *self
                    .seqs
                    .get_mut(&seq)
                    .expect("checked")
                    .blocks
                    .last_mut()
                    .expect("checked") = fresh;
            }
        }
        let need = (len + n).div_ceil(KV_BLOCK_TOKENS);
        while self.seqs[&seq].blocks.len() < need {
            let b = self.alloc.alloc()?;
            self.seqs.get_mut(&seq).expect("checked").blocks.push(b);
        }
        Ok(())
    }
}

fn unknown(seq: SeqId) -> ModelError {
    ModelError::invalid(
        "seq",
        format!("sequence {} does not exist (freed or never created)", seq.0),
    )
}

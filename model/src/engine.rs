//! Sequences over a paged KV cache, batched forward passes, and forking.

use std::collections::HashMap;

use crate::arch::ModelConfig;
use crate::backend::{Backend, ForwardBatch, HiddenLayer};
use crate::error::{ModelError, Result};
use crate::kv::{BlockAllocator, KV_BLOCK_TOKENS};
use crate::sampling::Draw;

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
    /// Output buffer of hidden states, reused between calls.
    hidden: Vec<f32>,
    /// Hidden states of one pass, reused between calls.
    pass_hidden: Vec<f32>,
    /// Where hidden states are read ([`Engine::set_hidden_layers`]).
    hidden_layers: Vec<HiddenLayer>,
    /// Picked tokens, entry after entry, reused between calls.
    picks: Vec<(u32, f32)>,
    /// Picks of one pass, reused between calls.
    pass_picks: Vec<(u32, f32)>,
    /// Forward passes run so far ([`Engine::passes`]).
    passes: u64,
}

/// One entry of [`Engine::forward_at`]: tokens to append to a sequence, and the offsets into
/// them after which outputs are wanted.
#[derive(Debug, Clone, Copy)]
pub struct ForwardEntry<'a> {
    /// The sequence the tokens extend.
    pub seq: SeqId,
    /// The tokens; never empty.
    pub tokens: &'a [u32],
    /// Offsets into `tokens` whose next-token logits are wanted, in output order.
    pub logits_at: &'a [u32],
    /// Offsets into `tokens` whose final hidden states are wanted, in output order.
    pub hidden_at: &'a [u32],
    /// Pick the next token after the last of `tokens` once with each of these draws (on the
    /// device, for a backend that samples there): only the tokens and their log-probabilities
    /// come back, in draw order.
    pub samples: &'a [Draw],
}

impl<'a> ForwardEntry<'a> {
    /// An entry that wants logits at `at` and no hidden states.
    pub fn logits_at(seq: SeqId, tokens: &'a [u32], at: &'a [u32]) -> Self {
        ForwardEntry {
            seq,
            tokens,
            logits_at: at,
            hidden_at: &[],
            samples: &[],
        }
    }

    /// An entry that wants the next token after its last one picked with `draw`.
    pub fn sampled(seq: SeqId, tokens: &'a [u32], draw: &'a Draw) -> Self {
        Self::sampled_n(seq, tokens, std::slice::from_ref(draw))
    }

    /// An entry that wants the next token after its last one picked once with each of `draws`
    /// (the first tokens of several samples of one prompt).
    pub fn sampled_n(seq: SeqId, tokens: &'a [u32], draws: &'a [Draw]) -> Self {
        ForwardEntry {
            seq,
            tokens,
            logits_at: &[],
            hidden_at: &[],
            samples: draws,
        }
    }

    /// An entry that wants hidden states at `at` and no logits.
    pub fn hidden_at(seq: SeqId, tokens: &'a [u32], at: &'a [u32]) -> Self {
        ForwardEntry {
            seq,
            tokens,
            logits_at: &[],
            hidden_at: at,
            samples: &[],
        }
    }
}

/// What [`Engine::forward_at`] returns: buffers the engine reuses on its next call.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOutputs<'a> {
    /// `vocab_size` logits per requested offset, entry after entry.
    pub logits: &'a [f32],
    /// `d_model` values per requested hidden state, entry after entry.
    pub hidden: &'a [f32],
    /// `(token, log_prob)` for each draw, entry after entry.
    pub picks: &'a [(u32, f32)],
}

/// Pairs each offset with the next output row, counting rows in `next`.
fn numbered(offsets: &[u32], next: &mut usize) -> Vec<(usize, usize)> {
    offsets
        .iter()
        .map(|&o| {
            *next += 1;
            (o as usize, *next - 1)
        })
        .collect()
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
            hidden: Vec::new(),
            pass_hidden: Vec::new(),
            hidden_layers: vec![HiddenLayer::Final],
            picks: Vec::new(),
            pass_picks: Vec::new(),
            passes: 0,
        }
    }

    /// Forward passes run so far: one per [`Engine::forward_at`] call whose tokens fit
    /// [`EngineOptions::batch_tokens_max`], more for longer ones.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }

    /// Sets where the hidden states that passes return are read: each requested hidden state
    /// is then `d_model` values per layer listed, in this order. The default is
    /// `[HiddenLayer::Final]`. An empty list, a repeated layer or a block the model lacks is
    /// refused, and the setting is left as it was.
    pub fn set_hidden_layers(&mut self, layers: &[HiddenLayer]) -> Result<()> {
        let n_layers = self.config().n_layers;
        if layers.is_empty() {
            return Err(ModelError::invalid("hidden_layers", "no layer given"));
        }
        for (i, layer) in layers.iter().enumerate() {
            if let HiddenLayer::Block(b) = layer {
                if *b >= n_layers {
                    return Err(ModelError::invalid(
                        "hidden_layers",
                        format!("{layer}: the model has {n_layers} blocks"),
                    ));
                }
            }
            if layers[..i].contains(layer) {
                return Err(ModelError::invalid(
                    "hidden_layers",
                    format!("{layer} is listed twice"),
                ));
            }
        }
        self.hidden_layers = layers.to_vec();
        Ok(())
    }

    /// Where hidden states are read ([`Engine::set_hidden_layers`]).
    pub fn hidden_layers(&self) -> &[HiddenLayer] {
        &self.hidden_layers
    }

    /// Bytes of scratch memory kept between passes: the output buffers of
    /// [`Engine::forward_at`] and the backend's pass buffers. They grow to the largest pass and
    /// stay there until [`Engine::release_scratch`].
    pub fn scratch_bytes(&self) -> usize {
        let floats = self.logits.capacity()
            + self.pass_logits.capacity()
            + self.hidden.capacity()
            + self.pass_hidden.capacity();
        let picks = self.picks.capacity() + self.pass_picks.capacity();
        floats * 4 + picks * std::mem::size_of::<(u32, f32)>() + self.backend.scratch_bytes()
    }

    /// Frees each scratch buffer larger than `keep_bytes` (a worker calls it when it goes
    /// idle): a pass over many sequences, or one asking for many logit rows, would otherwise
    /// hold its buffers (a vocabulary row of logits, 600 kB for a 152k vocabulary, per row) for
    /// the life of the process. The next pass grows them again as it needs.
    pub fn release_scratch(&mut self, keep_bytes: usize) {
        use crate::backend::release;
        release(&mut self.logits, keep_bytes);
        release(&mut self.pass_logits, keep_bytes);
        release(&mut self.hidden, keep_bytes);
        release(&mut self.pass_hidden, keep_bytes);
        release(&mut self.picks, keep_bytes);
        release(&mut self.pass_picks, keep_bytes);
        self.backend.release_scratch(keep_bytes);
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

    /// Shortens a sequence to its first `len` tokens and gives back the blocks it no longer
    /// needs. The next append overwrites the rest, copying a block first if another sequence
    /// shares it: so a fork of a longer sequence, truncated, reads outputs at a position the
    /// longer one already passed (a hidden state at its last token) for one token of compute.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let state = self.seqs.get_mut(&seq).ok_or_else(|| unknown(seq))?;
        if len > state.len {
            return Err(ModelError::invalid(
                "len",
                format!("sequence {} holds {} tokens, not {len}", seq.0, state.len),
            ));
        }
        for b in state.blocks.drain(len.div_ceil(KV_BLOCK_TOKENS)..) {
            self.alloc.release(b);
        }
        state.len = len;
        Ok(())
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

    /// Most KV blocks that may exist at once ([`EngineOptions::kv_blocks_max`]).
    pub fn kv_blocks_max(&self) -> usize {
        self.alloc.limit()
    }

    /// Appends `tokens` to each listed sequence, runs the model over them, and returns the
    /// next-token logits after the last token of each entry (`entries.len() * vocab_size`).
    ///
    /// Either every entry is appended or, on error, none is: a bad request (unknown sequence,
    /// token id out of range, context too long, cache full) changes nothing.
    ///
    /// The returned slice is a buffer the engine reuses on the next call.
    pub fn forward(&mut self, entries: &[(SeqId, &[u32])]) -> Result<&[f32]> {
        let last: Vec<[u32; 1]> = entries
            .iter()
            .map(|(_, t)| [t.len().saturating_sub(1) as u32])
            .collect();
        let at: Vec<ForwardEntry<'_>> = entries
            .iter()
            .zip(&last)
            .map(|(&(seq, tokens), l)| ForwardEntry::logits_at(seq, tokens, l))
            .collect();
        Ok(self.forward_at(&at)?.logits)
    }

    /// Like [`Engine::forward`], but returns the logits after *every* appended token, entry
    /// after entry (`Σ tokens * vocab_size`): what scoring a path token by token needs.
    pub fn forward_all_logits(&mut self, entries: &[(SeqId, &[u32])]) -> Result<&[f32]> {
        Ok(self.forward_every(entries, false)?.logits)
    }

    /// Like [`Engine::forward`], but returns the hidden state (by default after the last block
    /// and the final norm; see [`Engine::set_hidden_layers`]) at *every* appended token, entry
    /// after entry (`Σ tokens * d_model` per layer read), and computes no logits: what a reward
    /// or value head reads.
    pub fn forward_hidden(&mut self, entries: &[(SeqId, &[u32])]) -> Result<&[f32]> {
        Ok(self.forward_every(entries, true)?.hidden)
    }

    /// [`Engine::forward_at`] at every appended token: hidden states if `hidden`, else logits.
    fn forward_every(
        &mut self,
        entries: &[(SeqId, &[u32])],
        hidden: bool,
    ) -> Result<ForwardOutputs<'_>> {
        let all: Vec<Vec<u32>> = entries
            .iter()
            .map(|(_, t)| (0..t.len() as u32).collect())
            .collect();
        let at: Vec<ForwardEntry<'_>> = entries
            .iter()
            .zip(&all)
            .map(|(&(seq, tokens), a)| {
                if hidden {
                    ForwardEntry::hidden_at(seq, tokens, a)
                } else {
                    ForwardEntry::logits_at(seq, tokens, a)
                }
            })
            .collect();
        self.forward_at(&at)
    }

    /// The general pass: appends each entry's tokens to its sequence and returns the
    /// next-token logits and the final hidden states at the offsets each entry asks for
    /// (offsets index the entry's `tokens`). Rows come entry after entry, and within an
    /// entry in the order of its offsets. A pass that asks for no logits skips the output
    /// projection, so extending sequences or reading hidden states costs less than decoding.
    ///
    /// Atomic like [`Engine::forward`]; an offset outside its entry's tokens is rejected.
    pub fn forward_at(&mut self, entries: &[ForwardEntry<'_>]) -> Result<ForwardOutputs<'_>> {
        self.validate(entries)?;
        let vocab = self.config().vocab_size;
        // Values per hidden state: `d_model` per layer read.
        let d = self.config().d_model * self.hidden_layers.len();
        // Output rows per entry: (token offset, row), for logits and for hidden states.
        let mut logit_rows: Vec<Vec<(usize, usize)>> = Vec::with_capacity(entries.len());
        let mut hidden_rows: Vec<Vec<(usize, usize)>> = Vec::with_capacity(entries.len());
        let mut pick_rows: Vec<Vec<(usize, usize)>> = Vec::with_capacity(entries.len());
        let (mut n_logits, mut n_hidden, mut n_picks) = (0, 0, 0);
        for e in entries {
            logit_rows.push(numbered(e.logits_at, &mut n_logits));
            hidden_rows.push(numbered(e.hidden_at, &mut n_hidden));
            let at = vec![e.tokens.len() as u32 - 1; e.samples.len()];
            pick_rows.push(numbered(&at, &mut n_picks));
        }
        // Reused buffers: a fresh 600 kB vector per step would be a fresh mmap and page faults.
        let mut logits = std::mem::take(&mut self.logits);
        logits.resize(n_logits * vocab, 0.0);
        let mut hidden = std::mem::take(&mut self.hidden);
        hidden.resize(n_hidden * d, 0.0);
        let mut picks = std::mem::take(&mut self.picks);
        picks.resize(n_picks, (0, 0.0));
        // Split long inputs into passes of at most `batch_tokens_max` tokens; every entry's
        // tokens go in order, and later passes attend to what earlier ones wrote.
        let mut offsets = vec![0usize; entries.len()];
        let mut pass_logits = std::mem::take(&mut self.pass_logits);
        let mut pass_hidden = std::mem::take(&mut self.pass_hidden);
        let mut pass_picks = std::mem::take(&mut self.pass_picks);
        let result = loop {
            let mut budget = self.options.batch_tokens_max;
            let mut pass: Vec<(usize, SeqId, &[u32])> = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                if offsets[i] < e.tokens.len() && budget > 0 {
                    let take = (e.tokens.len() - offsets[i]).min(budget);
                    pass.push((i, e.seq, &e.tokens[offsets[i]..offsets[i] + take]));
                    offsets[i] += take;
                    budget -= take;
                }
            }
            if pass.is_empty() {
                break Ok(());
            }
            // For each entry in the pass: which of its tokens need outputs, and where they go
            // (token index in the pass, output row).
            let (mut want_logits, mut want_hidden, mut want_picks) =
                (Vec::new(), Vec::new(), Vec::new());
            let mut draws = Vec::new();
            let mut idx = 0;
            for (i, _, toks) in &pass {
                let end = offsets[*i];
                let start = end - toks.len();
                let in_pass = |rows: &[(usize, usize)], want: &mut Vec<(u32, usize)>| {
                    for &(off, row) in rows {
                        if (start..end).contains(&off) {
                            want.push(((idx + off - start) as u32, row));
                        }
                    }
                };
                in_pass(&logit_rows[*i], &mut want_logits);
                in_pass(&hidden_rows[*i], &mut want_hidden);
                let before = want_picks.len();
                in_pass(&pick_rows[*i], &mut want_picks);
                if want_picks.len() > before {
                    draws.extend_from_slice(entries[*i].samples);
                }
                idx += toks.len();
            }
            let logits_for: Vec<u32> = want_logits.iter().map(|w| w.0).collect();
            let hidden_for: Vec<u32> = want_hidden.iter().map(|w| w.0).collect();
            let sample_for: Vec<u32> = want_picks.iter().map(|w| w.0).collect();
            let outputs = (&mut pass_logits, &mut pass_hidden);
            let sampling = (&sample_for[..], &draws[..], &mut pass_picks);
            if let Err(e) = self.run_pass(&pass, &logits_for, &hidden_for, outputs, sampling) {
                break Err(e);
            }
            for (j, (_, row)) in want_picks.iter().enumerate() {
                picks[*row] = pass_picks[j];
            }
            for (j, (_, row)) in want_logits.iter().enumerate() {
                logits[row * vocab..(row + 1) * vocab]
                    .copy_from_slice(&pass_logits[j * vocab..(j + 1) * vocab]);
            }
            for (j, (_, row)) in want_hidden.iter().enumerate() {
                hidden[row * d..(row + 1) * d].copy_from_slice(&pass_hidden[j * d..(j + 1) * d]);
            }
        };
        self.pass_logits = pass_logits;
        self.pass_hidden = pass_hidden;
        self.pass_picks = pass_picks;
        self.logits = logits;
        self.hidden = hidden;
        self.picks = picks;
        result?;
        Ok(ForwardOutputs {
            logits: &self.logits[..n_logits * vocab],
            hidden: &self.hidden[..n_hidden * d],
            picks: &self.picks[..n_picks],
        })
    }

    fn validate(&self, entries: &[ForwardEntry<'_>]) -> Result<()> {
        let cfg = self.config();
        let mut seen = std::collections::HashSet::new();
        let mut blocks_needed = 0usize;
        for e in entries {
            let (seq, toks) = (&e.seq, e.tokens);
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
            if let Some(&off) = e
                .logits_at
                .iter()
                .chain(e.hidden_at)
                .find(|&&o| o as usize >= toks.len())
            {
                return Err(ModelError::invalid(
                    "offsets",
                    format!(
                        "output offset {off} is outside the {} tokens given for sequence {}",
                        toks.len(),
                        seq.0
                    ),
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
        hidden_for: &[u32],
        outputs: (&mut Vec<f32>, &mut Vec<f32>),
        (sample_for, draws, picks): (&[u32], &[Draw], &mut Vec<(u32, f32)>),
    ) -> Result<()> {
        self.passes += 1;
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
            hidden_for,
            hidden_layers: &self.hidden_layers,
        };
        self.backend
            .forward_sampled(&batch, sample_for, draws, outputs, picks)?;
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

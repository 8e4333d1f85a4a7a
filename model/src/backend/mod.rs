//! The interface between the engine (sequences, KV block tables, sampling) and the code that
//! runs the transformer's arithmetic. The engine owns all bookkeeping; a backend owns only the
//! weights it computes with and the KV *storage*, addressed by block ids the engine hands out.
//! That split is what lets a wgpu backend keep its KV blocks in GPU buffers behind the same
//! interface as the CPU backend.

pub mod cpu;
pub mod wgpu;

use rayon::prelude::*;

use crate::arch::ModelConfig;
use crate::error::Result;
use crate::sampling::{Draw, RowPicker};

/// One forward pass over a batch of tokens from any number of sequences.
///
/// Token `i` is at position `positions[i]` of the sequence whose block table is
/// `block_tables[seq_index[i]]`; its key and value go to slot `positions[i] % KV_BLOCK_TOKENS`
/// of block `block_tables[..][positions[i] / KV_BLOCK_TOKENS]`, and it attends to positions
/// `0..=positions[i]` of the same sequence (earlier ones written by previous passes or by
/// earlier tokens of this batch).
#[derive(Debug, Clone, Copy)]
pub struct ForwardBatch<'a> {
    /// Token ids.
    pub tokens: &'a [u32],
    /// Position of each token in its sequence.
    pub positions: &'a [u32],
    /// For each token, the index of its sequence's block table.
    pub seq_index: &'a [u32],
    /// Block tables of the sequences in this batch.
    pub block_tables: &'a [Vec<u32>],
    /// Indices of the tokens whose next-token logits are wanted, in output order.
    pub logits_for: &'a [u32],
    /// Indices of the tokens whose hidden states are wanted, in output order. Empty for plain
    /// decoding.
    pub hidden_for: &'a [u32],
    /// Where each of those tokens' hidden states are read, in output order: for each token of
    /// `hidden_for`, `d_model` values per layer listed here. Usually `[HiddenLayer::Final]`.
    pub hidden_layers: &'a [HiddenLayer],
}

/// Where a hidden state is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HiddenLayer {
    /// After the last block and the final norm: the vector the output projection (or a reward
    /// model's head) reads. Written `final_norm`.
    Final,
    /// The residual stream after block `b` (0-based), scaled to a root-mean-square of one (the
    /// scale a norm would give it, without the norm's weight). Written `block.B`.
    Block(usize),
}

impl HiddenLayer {
    /// Parses `final_norm` or `block.B`, checking `B` against the model's `n_layers`.
    pub fn parse(s: &str, n_layers: usize) -> std::result::Result<HiddenLayer, String> {
        if s == "final_norm" {
            return Ok(HiddenLayer::Final);
        }
        let b = s
            .strip_prefix("block.")
            .and_then(|b| b.parse::<usize>().ok())
            .ok_or_else(|| format!("{s:?} is neither `final_norm` nor `block.B`"))?;
        if b >= n_layers {
            return Err(format!(
                "{s:?}: the model's blocks are block.0 to block.{}",
                n_layers.saturating_sub(1)
            ));
        }
        Ok(HiddenLayer::Block(b))
    }

    /// Parses a comma-separated list of layers (`block.11,final_norm`); empty or repeated
    /// entries are refused.
    pub fn parse_list(s: &str, n_layers: usize) -> std::result::Result<Vec<HiddenLayer>, String> {
        let mut out: Vec<HiddenLayer> = Vec::new();
        for part in s.split(',') {
            let layer = HiddenLayer::parse(part.trim(), n_layers)?;
            if out.contains(&layer) {
                return Err(format!("{layer} is listed twice in {s:?}"));
            }
            out.push(layer);
        }
        Ok(out)
    }

    /// `layers` as `parse_list` reads them.
    pub fn list(layers: &[HiddenLayer]) -> String {
        layers
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::fmt::Display for HiddenLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HiddenLayer::Final => f.write_str("final_norm"),
            HiddenLayer::Block(b) => write!(f, "block.{b}"),
        }
    }
}

/// RoPE angles of the `head_dim / 2` dimension pairs at `position`, as llama.cpp computes them:
/// `theta_i = position * base^(-2i/head_dim)`, the power taken by repeated multiplication in
/// f32. Every backend rotates with these, so they rotate identically.
pub(crate) fn rope_angles(cfg: &ModelConfig, position: u32) -> impl Iterator<Item = f32> {
    let theta_scale = cfg.rope_theta.powf(-2.0 / cfg.head_dim as f32);
    (0..cfg.head_dim / 2).scan(position as f32, move |theta, _| {
        let t = *theta;
        *theta *= theta_scale;
        Some(t)
    })
}

/// Frees `v` (scratch: its contents do not matter) if it holds more than `keep_bytes`; the next
/// pass allocates what it needs. For [`Backend::release_scratch`] and the engine's own buffers.
pub(crate) fn release<T>(v: &mut Vec<T>, keep_bytes: usize) {
    if v.capacity() * std::mem::size_of::<T>() > keep_bytes {
        *v = Vec::new();
    }
}

/// Runs the transformer. Implementations: [`cpu::CpuBackend`], [`wgpu::WgpuBackend`].
pub trait Backend: Send {
    /// Short name for logs and statistics (`cpu`, `wgpu`).
    fn name(&self) -> &'static str;
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// Makes KV storage for block ids `0..n_blocks` available.
    fn ensure_kv_blocks(&mut self, n_blocks: usize) -> Result<()>;
    /// Copies the first `n_tokens` slots of every layer of block `src` into block `dst`
    /// (copy-on-write of a shared, partly filled block).
    fn copy_kv_block(&mut self, src: u32, dst: u32, n_tokens: usize);
    /// Runs the batch, writing its keys and values into the KV storage,
    /// `logits_for.len() * vocab_size` logits into `logits` and
    /// `hidden_for.len() * hidden_layers.len() * d_model` hidden states into `hidden`. A backend skips the output projection when
    /// `logits_for` is empty.
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
        hidden: &mut Vec<f32>,
    ) -> Result<()>;

    /// Bytes of scratch memory the backend keeps between passes (buffers sized by the largest
    /// pass so far; KV storage and weights are not scratch).
    fn scratch_bytes(&self) -> usize {
        0
    }

    /// Frees each scratch buffer larger than `keep_bytes`: called when the engine goes
    /// idle, so one large pass does not hold its buffers for the life of the process. The
    /// next pass grows them again as needed.
    fn release_scratch(&mut self, keep_bytes: usize) {
        let _ = keep_bytes;
    }

    /// Like [`Backend::forward`], and also picks the next token after each token listed in
    /// `sample_for` with the matching draw, writing `(token, log_prob)` per entry into
    /// `picks`: the rows of `sample_for` are neither returned nor (on a device) read back.
    /// A token may be listed more than once (several draws from one row). Picks must equal
    /// [`crate::sampling::pick`] on the backend's own logits, up to the rounding of a sum (a
    /// uniform within a few ulps of a boundary between two tokens).
    ///
    /// The default computes each listed row once and picks on the host.
    fn forward_sampled(
        &mut self,
        batch: &ForwardBatch<'_>,
        sample_for: &[u32],
        draws: &[Draw],
        (logits, hidden): (&mut Vec<f32>, &mut Vec<f32>),
        picks: &mut Vec<(u32, f32)>,
    ) -> Result<()> {
        picks.clear();
        if sample_for.is_empty() {
            return self.forward(batch, logits, hidden);
        }
        // Each distinct token's row once, with the draws that pick from it.
        let mut unique: Vec<u32> = Vec::new();
        let mut draws_of: Vec<Vec<(usize, Draw)>> = Vec::new();
        for (i, (&t, d)) in sample_for.iter().zip(draws).enumerate() {
            let u = match unique.iter().position(|&x| x == t) {
                Some(u) => u,
                None => {
                    unique.push(t);
                    draws_of.push(Vec::new());
                    unique.len() - 1
                }
            };
            draws_of[u].push((i, *d));
        }
        let rows: Vec<u32> = batch.logits_for.iter().chain(&unique).copied().collect();
        let with_rows = ForwardBatch {
            logits_for: &rows,
            ..*batch
        };
        self.forward(&with_rows, logits, hidden)?;
        let vocab = self.config().vocab_size;
        let sampled = &logits[batch.logits_for.len() * vocab..];
        picks.resize(sample_for.len(), (0, 0.0));
        for (u, picked) in host_picks(sampled, vocab, &draws_of)
            .into_iter()
            .enumerate()
        {
            for ((i, _), p) in draws_of[u].iter().zip(picked) {
                picks[*i] = p;
            }
        }
        logits.truncate(batch.logits_for.len() * vocab);
        Ok(())
    }
}

/// [`crate::sampling::pick`] on each row of `rows` (`vocab` logits each) with each of its
/// draws, over the cores when there are several rows: the draws of a row share one
/// [`RowPicker`], whose passes over the row they make once.
fn host_picks(rows: &[f32], vocab: usize, draws: &[Vec<(usize, Draw)>]) -> Vec<Vec<(u32, f32)>> {
    let one = |(row, ds): (&[f32], &Vec<(usize, Draw)>)| {
        let mut picker = RowPicker::new(row);
        ds.iter().map(|(_, d)| picker.pick(d)).collect::<Vec<_>>()
    };
    if draws.len() >= 4 {
        rows.par_chunks(vocab).zip(draws).map(one).collect()
    } else {
        rows.chunks(vocab).zip(draws).map(one).collect()
    }
}

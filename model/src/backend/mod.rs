//! The interface between the engine (sequences, KV block tables, sampling) and the code that
//! runs the transformer's arithmetic. The engine owns all bookkeeping; a backend owns only the
//! weights it computes with and the KV *storage*, addressed by block ids the engine hands out.
//! That split is what lets a wgpu backend keep its KV blocks in GPU buffers behind the same
//! interface as the CPU backend.

pub mod cpu;
pub mod wgpu;

use crate::arch::ModelConfig;
use crate::error::Result;

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
    /// Indices of the tokens whose final hidden state is wanted, in output order: the residual
    /// stream after the last block and the final norm, the vector the output projection (or a
    /// reward model's head) reads. Empty for plain decoding.
    pub hidden_for: &'a [u32],
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
    /// `logits_for.len() * vocab_size` logits into `logits` and `hidden_for.len() * d_model`
    /// final hidden states into `hidden`. A backend skips the output projection when
    /// `logits_for` is empty.
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
        hidden: &mut Vec<f32>,
    ) -> Result<()>;
}

//! The wgpu backend: the same decoder as [`super::cpu`], with every step of the forward pass a
//! WGSL compute shader (Vulkan, Metal or DX12 through wgpu).
//!
//! - **Weights** are uploaded once. Every GGUF type unpacks exactly to an unsigned integer per
//!   weight plus a `(scale, min)` pair per 16 weights (`QMatrix::unpack_row_unsigned`), and
//!   each matrix is stored in the fewest bits that hold those values unchanged
//!   (`weights.rs`: 4, 5, 6 or 8 bits a weight, pairs per 32 where blocks share them, f16
//!   pairs where exact; 0.92 bytes a weight for the default model against 1.5 for bytes and
//!   f32 pairs). The matrix kernels decode every format through one pair of functions, so
//!   one kernel serves all types, bit for bit. Q, K and V are fused into one matrix, and so
//!   are the MLP's gate and up projections. A matrix larger than the device's largest
//!   storage binding is split into row chunks.
//! - **KV cache**: one buffer per layer, `[block][K, V][slot][kv_dim]` in f32, addressed through
//!   the block tables the engine hands over, exactly as the CPU backend's. Forking and
//!   copy-on-write stay in the engine; `copy_kv_block` is a buffer-to-buffer copy.
//! - **A pass**, per layer: QKV product (+bias), RoPE with the KV write, paged attention with an
//!   online softmax, output product added into the residual, gate|up product with SwiGLU, down
//!   product added into the residual. The RMS norms are fused into the products that read them
//!   (passes of up to 8 tokens; larger ones run `rms_norm.wgsl` first), SwiGLU into the gate|up
//!   product (its rows interleaved), and on decode steps RoPE and the KV write into attention:
//!   5 dispatches a layer for a decode step, 8 for a prefill, since small passes are bound by
//!   the number of dispatches. Only the rows whose logits or hidden states are wanted are
//!   normalised and projected, and only those are read back.
//! - Activations stay in f32 (the CPU backend quantizes them to 8 bits for its integer dot
//!   products), so the two backends agree to a tolerance, not bit for bit: on the real model the
//!   largest logit difference is about 0.4 (tests in `model/tests/it/wgpu.rs`).
//!
//! **Kernels**, each a `.wgsl` file beside this one, loaded with `include_str!`:
//! - `matmul.wgsl`: one kernel for every weight type, one row per 64 threads; every matrix
//!   variant is prepended with `matmul_common.wgsl` (shared bindings, one explicit layout for all
//!   of them, helpers, and the fused norm prologue and SwiGLU epilogue);
//! - `matmul_rows.wgsl`: the batched form with four rows a thread, which reads each token's
//!   activations once per four rows; taken while a product still makes at least
//!   [`WgpuOptions::tiled_min_workgroups`] (256) workgroups, so small products keep the one-row
//!   kernel;
//! - `matmul_gemm.wgsl`: a tiled matrix-matrix kernel for passes of more than 8 tokens (64 rows ×
//!   32 tokens a workgroup, weights staged column-major with the activations in workgroup
//!   memory, a 4 × 2 block of sums per thread, no reduction across threads, the next step's
//!   tile read during this one's arithmetic); only for
//!   rows of at most 1024 columns, since it measured slower on longer rows;
//! - `matmul_coop.wgsl`: the same product on cooperative matrices (tensor cores), taken instead
//!   of the three batched kernels above for every product of 2 tokens or more where the
//!   adapter multiplies 16x16x16 f16 tiles into f32 in 32-wide subgroups (NVIDIA): weights
//!   dequantized and activations clamped to f16 in workgroup memory, 64 rows x 32 tokens a
//!   workgroup of four subgroups. On an H200 it made 512-token prefill 2.6x and 256-sequence
//!   decode 2.5x faster; 16 and 32 sequences gain only with their columns split
//!   (`COOP_MIN_TOKENS` in `pipelines.rs`; BENCHMARKS.md). Results agree
//!   with the f32 kernels' to f16 rounding, not bit for bit; `ARBOR_WGPU_COOP=0`
//!   ([`WgpuOptions::no_cooperative_matrix`]) turns it off; `matmul_coop_wide.wgsl` is a
//!   larger, software-pipelined tile, a candidate ([`WgpuOptions::coop_tokens`]);
//! - `rms_norm.wgsl`, `rope_kv.wgsl` (RoPE plus the write of the rotated key and the value into
//!   the paged KV cache), `attention.wgsl` (paged attention through the block tables, 256
//!   positions a tile, online softmax, the head dimension compiled in so its loops unroll).
//!
//! **Fewer dispatches.** Each dispatch costs ~8-10 µs on an H200 however little it does, so small
//! passes are bound by their number. The fused variants are compile-time switches (`NORM`,
//! `SWIGLU`) of the same WGSL, built on first use: as run-time flags their registers slowed every
//! product (the output projection 1.7x on one token). The norm is fused only into passes of up
//! to 8 tokens: in larger ones the products are bound by arithmetic and the extra multiply per
//! weight cost more than the dispatch it saved. A pass with several tokens of one sequence runs
//! `rope_kv.wgsl` before attention, because those tokens attend to each other's keys.
//!
//! **Submission.** A pass goes to the GPU as command buffers of 8, 16, 32, … dispatches, each
//! submitted as soon as it is encoded, so the GPU starts while the host still encodes the rest
//! (one buffer for the pass left the GPU idle ~0.5 ms a step on the 0.5B shapes). Each
//! dispatch's parameters sit in a 256-byte slot of one uniform buffer written per pass; bind
//! groups are cached by dispatch slot, reused while the slot has the same kernel and buffers,
//! and dropped when a buffer is reallocated. [`WgpuOptions::profile`] times the host's phases
//! and each kernel (`ARBOR_BENCH_PROFILE=1` in the backends bench): that is how these costs were
//! found.
//!
//! **Adapters.** A software adapter (lavapipe, ~100x slower than the CPU backend) is refused
//! unless [`WgpuOptions::allow_software`] is set (the command line sets it from
//! `ARBOR_WGPU_ALLOW_SOFTWARE=1`); the tests set it to run the kernels without a GPU.
//!
//! **Sampling.** Rows whose next token is wanted rather than their logits
//! ([`Backend::forward_sampled`]) are projected like the others and picked by `sample.wgsl`,
//! one workgroup a row, with the host's [`Draw`] (its uniform from the sequence's seeded
//! stream): a decode step reads back 8 bytes a sequence instead of 600 kB of logits, and the
//! host no longer sorts or exponentiates 151,936 values per sequence.
//!
//! **Tuning.** [`WgpuOptions::matvec_rows`] (`ARBOR_WGPU_MATVEC_ROWS`) gives single tokens a
//! kernel that reads several rows a thread; [`WgpuOptions::matvec_subgroups`]
//! (`ARBOR_WGPU_MATVEC_SUBGROUP=1`) gives products of up to 16 tokens kernels that sum on
//! subgroups. [`WgpuOptions::matvec_lanes`] (`ARBOR_WGPU_MATVEC_LANES`) sets how many threads
//! share a row in the single-token kernel; `ARBOR_BENCH_LANES=8,16,32,64` in the backends bench
//! measures each, to be chosen on the H200 (today's default, 64, is the measured one).
//! [`WgpuOptions::coop_tokens`] (`ARBOR_WGPU_COOP_TOKENS=64`) gives products of 128 tokens or
//! more 64-token cooperative tiles; [`WgpuOptions::byte_weights`] (`ARBOR_WGPU_PACK=0`) keeps
//! the unpacked weights; [`WgpuOptions::gqa_min_tokens`] (`ARBOR_WGPU_GQA_MIN_TOKENS`) runs
//! attention a workgroup per key head (`attention_gqa.wgsl`) in passes of that many tokens;
//! [`WgpuOptions::split_k_workgroups`] (`ARBOR_WGPU_SPLIT_K`, default 512) splits the columns
//! of tiled products with too few tiles to fill the GPU, a second dispatch (`matmul_reduce.wgsl`)
//! adding the ranges up. The backends bench measures each against the defaults in one run.
//!
//! **Not yet**, and what limits speed today (H200, `floor.rs` and the backends bench): a
//! single-sequence step is 2.3 ms of GPU time, of which ~120 dependent dispatches are only
//! 0.2 ms (1.85 µs each): the matrix-vector kernels reached 313 GB/s reading 1.5 bytes a
//! weight (the packed 0.92 is not yet measured there); submitting a step costs 0.7 ms of host
//! time; the host waits for each step before encoding the next (multi-step decoding, with the
//! embeddings gathered on the GPU, would overlap them); f32 KV.

use std::sync::Arc;

use super::{Backend, ForwardBatch};
use crate::arch::{DecoderWeights, ModelConfig};
use crate::error::{ModelError, Result};
use crate::kv::KV_BLOCK_TOKENS;
use crate::sampling::Draw;

mod adapter;
mod floor;
mod pass;
mod pipelines;
mod profile;
mod record;
mod weights;
use adapter::{adapter, cooperative_f16, summary};
pub use adapter::{adapters, cooperative_matrix_available, AdapterSummary};
pub use floor::{dispatch_floor, DispatchFloor};
use pipelines::Pipelines;
use profile::Timestamps;
pub use profile::{PassProfile, SharedProfile};
use record::CachedGroup;
use weights::{GpuLayer, GpuMatrix, Uploader};

/// Tokens per matrix-kernel workgroup in batched passes (one weight read serves this many).
const TOKENS_PER_TILE: u32 = 8;
/// Rows per thread of the tiled batched matrix kernel (`matmul_rows.wgsl`): a token's
/// activations are read once for this many rows.
const ROWS_PER_THREAD: u32 = 4;
/// Rows per workgroup of the matrix kernels with one row a thread (four sets of 64 threads).
const ROWS_PER_WG: u32 = 4;
/// Default of [`WgpuOptions::tiled_min_workgroups`]: about two workgroups per streaming
/// multiprocessor of a large GPU (an H200 has 132); with fewer the GPU would idle.
const MIN_TILED_WORKGROUPS: u32 = 256;
/// Slot size of the per-dispatch parameters (the uniform-offset alignment every device meets).
const PARAM_SLOT: u64 = 256;
/// Workgroups a dispatch may have along one dimension (WebGPU's guaranteed limit).
const MAX_WORKGROUPS_PER_DIM: u32 = 65_535;
/// Largest head dimension the attention kernel holds in workgroup memory.
const HEAD_DIM_MAX: usize = 256;

/// Which GPU to use.
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// Accept a software adapter (Mesa's lavapipe, WARP): correct but slow; for tests and for
    /// machines without a GPU.
    pub allow_software: bool,
    /// Largest weight chunk and logits buffer, in bytes (default and upper bound: the device's
    /// largest storage binding). Smaller values split more; tests use them to exercise the
    /// splitting on small models.
    pub max_chunk_bytes: Option<u64>,
    /// Fewest workgroups for which a batched matrix product uses the kernel with several rows
    /// a thread (default 256, enough to fill a large GPU). Tests set 0 to run that kernel on
    /// small models.
    pub tiled_min_workgroups: Option<u32>,
    /// Measure each pass: the host's phases, and each kernel's GPU time where the device has
    /// timestamp queries inside passes (read through [`WgpuBackend::profile`]). Each pass
    /// then waits for the GPU, which costs a little; for benchmarks and tuning.
    pub profile: bool,
    /// Keep the f32 kernels where the adapter offers cooperative matrices (tensor cores) for
    /// batched products; the command line sets it from `ARBOR_WGPU_COOP=0`. For comparisons
    /// and as the way out should a driver's cooperative matrices misbehave.
    pub no_cooperative_matrix: bool,
    /// Threads that share one row in the single-token matrix-vector kernel: 8, 16, 32 or 64
    /// (default 64; the command line reads `ARBOR_WGPU_MATVEC_LANES`). Fewer lanes give each
    /// thread more of a short row to read and a shorter reduction, and a workgroup more rows;
    /// which is fastest depends on the GPU and the row length (the backends bench measures it).
    pub matvec_lanes: Option<u32>,
    /// Rows a thread reads for single tokens: 2, 4 or 8 run `matmul_rows.wgsl` for one token
    /// on matrices with enough rows to fill the GPU that way (the activations and norm weights
    /// read once for that many rows, not once a row); 1 (the default) keeps `matmul.wgsl`.
    /// On an H100 (2026-12-06) 2 and 4 ran one sequence at 0.98x and 0.93x, hence not the
    /// default; the command line reads `ARBOR_WGPU_MATVEC_ROWS`, the backends bench compares.
    pub matvec_rows: Option<u32>,
    /// Products of up to 16 tokens on `matmul_sub.wgsl`: a row per 32 threads, eight rows a
    /// workgroup, its sums by subgroup shuffles instead of a tree of barriers (as llama.cpp's
    /// Vulkan matrix-vector kernels); from 2 tokens in tiles of 8, each weight group read once
    /// for the whole tile as in `matmul.wgsl`'s tiles. Products that cooperative matrices take
    /// (more than [`WgpuOptions::coop_min_tokens`] tokens) keep them; where the adapter has no
    /// subgroups the option changes nothing. On an H100 (2026-12-06): 1.05x at 1 sequence,
    /// 0.91x at 8, 1.01x at 16, hence not the default; the command line reads
    /// `ARBOR_WGPU_MATVEC_SUBGROUP=1`, the backends bench compares at 1, 8 and 16 sequences.
    pub matvec_subgroups: bool,
    /// Products of more tokens than this run on cooperative matrices where the adapter has
    /// them (default 1: from 2 tokens, `COOP_MIN_TOKENS` in `pipelines.rs`; 1 to 4,096; below
    /// 8, passes of up to 8 tokens run the RMS norms as dispatches of their own instead of
    /// fusing them into the products, so that their products can take cooperative tiles).
    /// With splits (below), on an H100: 2 to 8 sequences 1.2x-1.5x faster than from 9 tokens,
    /// 16 and 32 sequences 2.1x-2.4x faster than from 33; the command line reads
    /// `ARBOR_WGPU_COOP_MIN_TOKENS`, the backends bench compares 8 and 32 (the defaults
    /// before).
    pub coop_min_tokens: Option<u32>,
    /// Cooperative products that would make fewer workgroups (64-row by 32-token tiles) than
    /// this keep the f32 kernels (default 0: none do). On an H100 at 64 sequences the
    /// cooperative kernel took 287 µs a layer on down's 896 rows (28 tiles for 132
    /// multiprocessors); the command line reads `ARBOR_WGPU_COOP_MIN_WORKGROUPS`, the backends
    /// bench compares 64.
    pub coop_min_workgroups: Option<u32>,
    /// Tiled products (the matrix-matrix and cooperative kernels, batches of more than 8
    /// tokens) whose 64-row by 32-token tiles make fewer workgroups than this split their
    /// columns into up to 16 ranges, each summed by workgroups of its own, and add the ranges
    /// up in a second dispatch (`matmul_reduce.wgsl`); default 512, 0: none split. Every workgroup
    /// of those kernels walks all the columns of its tile, so down's 896 rows of 4,864
    /// columns at 64 sequences (28 tiles) left most of an H100's 132 multiprocessors idle
    /// (287 µs a layer, against 84 µs for gate_up's twice the work). At most 2,048; costs
    /// `2 × value × 8 KiB` of partial sums. The results differ from the unsplit ones by f32
    /// summation order. On an H100 (2026-12-06) 512 made 64 sequences 1.92x faster and
    /// 16 and 256 sequences 1.20x (2.9x at 16 with cooperative matrices from 2 tokens); the
    /// command line reads `ARBOR_WGPU_SPLIT_K`, the backends bench compares 0.
    pub split_k_workgroups: Option<u32>,
    /// Store every weight matrix as a byte a weight with f32 `(scale, min)` pairs per 16
    /// weights (1.5 bytes a weight), the form before packing, instead of the fewest bits that
    /// hold it exactly (`weights.rs`; 0.92 bytes a weight for the default model). The results
    /// are the same bit for bit; for comparisons (the command line reads `ARBOR_WGPU_PACK=0`).
    pub byte_weights: bool,
    /// Tokens of a cooperative-matrix tile: 32 (default), or 64, which then serves products
    /// of at least 128 tokens with `matmul_coop_wide.wgsl` (64 columns a step too, and the
    /// next step's tile read during this one's multiply-adds: each dequantized weight feeds
    /// twice the tokens, at 32 KiB of workgroup memory instead of 14). On an H100 it ran at
    /// 0.61x-0.64x, hence not the default; the command line reads `ARBOR_WGPU_COOP_TOKENS`,
    /// and the backends bench compares both.
    pub coop_tokens: Option<u32>,
    /// Passes of at least this many tokens run attention with one workgroup per key head
    /// and token, covering the query heads that share it (`attention_gqa.wgsl`: each key and
    /// value read once for all of them), after a separate RoPE dispatch; smaller ones keep a
    /// workgroup per query head with RoPE fused in. Default: never, until measured on a GPU;
    /// the command line reads `ARBOR_WGPU_GQA_MIN_TOKENS`, the backends bench compares.
    pub gqa_min_tokens: Option<u32>,
}

/// Per-pass buffers, sized for up to `tokens` tokens, `logit_rows` rows of logits and
/// `rows_out` selected rows in all (logits rows, then hidden-state rows).
struct Scratch {
    tokens: usize,
    logit_rows: usize,
    rows_out: usize,
    table_len: usize,
    x: wgpu::Buffer,
    /// The normalised residual stream, for passes too large to fuse the norm into the products.
    h: wgpu::Buffer,
    qkv: wgpu::Buffer,
    att: wgpu::Buffer,
    act: wgpu::Buffer,
    cs: wgpu::Buffer,
    tok: wgpu::Buffer,
    tables: wgpu::Buffer,
    sel: wgpu::Buffer,
    fin: wgpu::Buffer,
    logits: wgpu::Buffer,
    /// Partial sums of products split over their columns
    /// ([`WgpuOptions::split_k_workgroups`]; absent when none split).
    part: Option<wgpu::Buffer>,
    /// One [`Draw`] per sampled row, and the `(token, log-prob bits)` picked.
    draws: wgpu::Buffer,
    picks: wgpu::Buffer,
    readback: wgpu::Buffer,
}

/// Runs a llama-style decoder with WGSL compute shaders.
pub struct WgpuBackend {
    config: ModelConfig,
    weights: Arc<DecoderWeights>,
    adapter: AdapterSummary,
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipelines: Pipelines,
    layers: Vec<GpuLayer>,
    out_norm: wgpu::Buffer,
    /// `d_model` ones: the weight of the norm that scales a middle layer's hidden states.
    ones: wgpu::Buffer,
    output: GpuMatrix,
    /// One buffer per layer.
    kv: Vec<wgpu::Buffer>,
    kv_blocks: usize,
    params: wgpu::Buffer,
    params_slots: usize,
    scratch: Option<Scratch>,
    /// Bind groups by dispatch slot; cleared whenever a bound buffer is reallocated.
    bind_cache: Vec<Option<CachedGroup>>,
    /// An empty-ish buffer bound where a kernel's optional input is absent.
    dummy: wgpu::Buffer,
    max_binding: u64,
    /// Largest weight chunk and logits buffer ([`WgpuOptions::max_chunk_bytes`]).
    max_chunk: u64,
    /// See [`WgpuOptions::gqa_min_tokens`].
    gqa_min_tokens: Option<u32>,
    /// See [`WgpuOptions::profile`].
    profile: Option<SharedProfile>,
    /// Timestamp queries, when profiling on a device that has them inside passes.
    timestamps: Option<Timestamps>,
    /// Whether the device was opened with timestamp queries inside passes.
    has_timestamps: bool,
    /// Copy-on-write block copies `(src, dst, tokens)` not yet sent: they go to the GPU
    /// together, through one staging buffer, before the next pass or reallocation.
    pending_copies: Vec<(u32, u32, usize)>,
    /// The staging buffer of those copies, kept between passes.
    copy_staging: Option<wgpu::Buffer>,
}

fn device_err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Device(format!("{what}: {e}"))
}

impl WgpuBackend {
    /// Opens the first suitable adapter and uploads the weights.
    pub fn new(
        config: ModelConfig,
        weights: Arc<DecoderWeights>,
        options: &WgpuOptions,
    ) -> Result<Self> {
        if config.head_dim > HEAD_DIM_MAX || config.head_dim % 4 != 0 {
            return Err(ModelError::Device(format!(
                "head_dim {}: the attention kernel needs a multiple of 4, at most {HEAD_DIM_MAX}",
                config.head_dim
            )));
        }
        let coop_tokens = options.coop_tokens.unwrap_or(32);
        if ![32, 64].contains(&coop_tokens) {
            return Err(ModelError::invalid(
                "coop_tokens",
                format!("{coop_tokens}: a cooperative-matrix tile takes 32 or 64 tokens"),
            ));
        }
        let coop_min_tokens = options
            .coop_min_tokens
            .unwrap_or(pipelines::COOP_MIN_TOKENS as u32);
        if !(1..=4096).contains(&coop_min_tokens) {
            return Err(ModelError::invalid(
                "coop_min_tokens",
                format!("{coop_min_tokens}: give 1 (cooperative from 2 tokens) to 4096"),
            ));
        }
        let split_k_workgroups = options
            .split_k_workgroups
            .unwrap_or(record::DEFAULT_SPLIT_K_WORKGROUPS);
        if split_k_workgroups > record::MAX_SPLIT_K_WORKGROUPS {
            return Err(ModelError::invalid(
                "split_k_workgroups",
                format!(
                    "{split_k_workgroups}: give 0 (no splits) to {}",
                    record::MAX_SPLIT_K_WORKGROUPS
                ),
            ));
        }
        let matvec_rows = options.matvec_rows.unwrap_or(1);
        if ![1, 2, 4, 8].contains(&matvec_rows) {
            return Err(ModelError::invalid(
                "matvec_rows",
                format!(
                    "{matvec_rows}: the single-token rows kernel takes 1, 2, 4 or 8 rows a thread"
                ),
            ));
        }
        let matvec_lanes = options.matvec_lanes.unwrap_or(64);
        if ![8, 16, 32, 64].contains(&matvec_lanes) {
            return Err(ModelError::invalid(
                "matvec_lanes",
                format!(
                    "{matvec_lanes}: the single-token kernel takes 8, 16, 32 or 64 lanes a row"
                ),
            ));
        }
        let adapter = adapter().map_err(|e| {
            device_err(
                "no GPU adapter (install a Vulkan driver, e.g. mesa-vulkan-drivers, or use --device cpu)",
                e,
            )
        })?;
        let info = summary(&adapter.get_info());
        if info.software && !options.allow_software {
            return Err(ModelError::Device(format!(
                "the only adapter is the software renderer `{}` ({}); it is far slower than \
                 the CPU backend (use --device cpu, or set ARBOR_WGPU_ALLOW_SOFTWARE=1 to run on it anyway)",
                info.name, info.backend
            )));
        }
        let limits = adapter.limits();
        let timestamp_features =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let has_timestamps = options.profile && adapter.features().contains(timestamp_features);
        let coop = !options.no_cooperative_matrix && cooperative_f16(&adapter);
        let subgroups =
            options.matvec_subgroups && adapter.features().contains(wgpu::Features::SUBGROUP);
        let mut required_features = wgpu::Features::empty();
        if subgroups {
            required_features |= wgpu::Features::SUBGROUP;
        }
        if has_timestamps {
            required_features |= timestamp_features;
        }
        if coop {
            required_features |=
                wgpu::Features::SHADER_F16 | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("arbor"),
            required_features,
            required_limits: limits.clone(),
            experimental_features: if coop {
                // SAFETY: wgpu's experimental features may have bugs; the one asked for here,
                // cooperative matrices, runs only `matmul_coop.wgsl`, whose results the
                // backends bench and the H200 parity check compare with the CPU backend's, and
                // ARBOR_WGPU_COOP=0 turns it off.
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| device_err("opening the GPU device", e))?;
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            & !255;
        tracing::info!(adapter = %info.name, backend = %info.backend, max_binding, coop, "wgpu device open");

        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            tracing::error!("wgpu: {e}");
        }));
        let pipelines = Pipelines::new(
            &device,
            &config,
            (
                options.tiled_min_workgroups.unwrap_or(MIN_TILED_WORKGROUPS),
                coop_min_tokens as usize,
                options.coop_min_workgroups.unwrap_or(0),
                split_k_workgroups,
            ),
            coop,
            coop && coop_tokens == 64,
            (matvec_lanes, matvec_rows, subgroups),
        );
        let max_chunk = options
            .max_chunk_bytes
            .map_or(max_binding, |c| c.min(max_binding));
        let up = Uploader {
            device: &device,
            max_chunk,
            bytes_only: options.byte_weights,
        };
        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let out_norm = up.f32("output_norm", &weights.out_norm);
        let ones = up.f32("ones", &vec![1.0; config.d_model]);
        let output = up.matrix("output", &[&weights.output])?;
        let mut layers = Vec::with_capacity(config.n_layers);
        for (l, lw) in weights.layers.iter().enumerate() {
            let qkv_bias = if lw.bq.is_some() || lw.bk.is_some() || lw.bv.is_some() {
                let mut b =
                    Vec::with_capacity(config.n_heads * config.head_dim + 2 * config.kv_dim());
                for (bias, len) in [
                    (&lw.bq, config.n_heads * config.head_dim),
                    (&lw.bk, config.kv_dim()),
                    (&lw.bv, config.kv_dim()),
                ] {
                    match bias {
                        Some(v) => b.extend_from_slice(v),
                        None => b.extend(std::iter::repeat_n(0.0, len)),
                    }
                }
                Some(up.f32("qkv_bias", &b))
            } else {
                None
            };
            layers.push(GpuLayer {
                attn_norm: up.f32("attn_norm", &lw.attn_norm),
                qkv: up.matrix(&format!("blk.{l}.attn_qkv"), &[&lw.wq, &lw.wk, &lw.wv])?,
                qkv_bias,
                wo: up.matrix(&format!("blk.{l}.attn_output"), &[&lw.wo])?,
                ffn_norm: up.f32("ffn_norm", &lw.ffn_norm),
                gate_up: up.matrix_pairs(&format!("blk.{l}.ffn_gate_up"), &lw.w_gate, &lw.w_up)?,
                down: up.matrix(&format!("blk.{l}.ffn_down"), &[&lw.w_down])?,
            });
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err("uploading the weights", e));
        }
        let dummy = up.f32("dummy", &[0.0; 4]);
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: PARAM_SLOT,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(WgpuBackend {
            config,
            weights,
            adapter: info,
            device,
            queue,
            pipelines,
            layers,
            out_norm,
            ones,
            output,
            kv: Vec::new(),
            kv_blocks: 0,
            params,
            params_slots: 1,
            scratch: None,
            bind_cache: Vec::new(),
            dummy,
            max_binding,
            max_chunk,
            gqa_min_tokens: options.gqa_min_tokens,
            profile: options.profile.then(SharedProfile::default),
            timestamps: None,
            has_timestamps,
            pending_copies: Vec::new(),
            copy_staging: None,
        })
    }

    /// Whether batched products run on cooperative matrices (`matmul_coop.wgsl`).
    pub fn cooperative_matrix(&self) -> bool {
        self.pipelines.coop
    }

    /// Whether products of up to 16 tokens run on the subgroup kernels
    /// ([`WgpuOptions::matvec_subgroups`], where the adapter has subgroups).
    pub fn matvec_subgroups(&self) -> bool {
        self.pipelines.matvec_subgroups
    }

    /// The pass measurements, when made with [`WgpuOptions::profile`]; take them with
    /// [`PassProfile::take`].
    pub fn profile(&self) -> Option<SharedProfile> {
        self.profile.clone()
    }

    /// Bytes of weight matrices on the device: what one token's pass reads (norms and biases
    /// aside), for bandwidth figures.
    pub fn weight_bytes(&self) -> u64 {
        self.output.bytes()
            + self
                .layers
                .iter()
                .map(|l| l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes())
                .sum::<u64>()
    }

    /// The adapter this backend runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    fn kv_layer_bytes(&self, blocks: usize) -> u64 {
        (blocks * 2 * KV_BLOCK_TOKENS * self.config.kv_dim() * 4) as u64
    }

    fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let size = bytes.max(16).next_multiple_of(16);
        if size > self.max_binding {
            return Err(ModelError::Device(format!(
                "{label}: {size} bytes exceeds the device's largest storage binding ({} bytes); \
                 use fewer tokens per pass",
                self.max_binding
            )));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err(&format!("allocating {label} ({size} bytes)"), e));
        }
        Ok(buf)
    }

    fn ensure_scratch(
        &mut self,
        tokens: usize,
        logit_rows: usize,
        rows_out: usize,
        table_len: usize,
    ) -> Result<()> {
        if let Some(s) = &self.scratch {
            if s.tokens >= tokens
                && s.logit_rows >= logit_rows
                && s.rows_out >= rows_out
                && s.table_len >= table_len
            {
                return Ok(());
            }
        }
        let old = self.scratch.as_ref();
        let tokens = tokens
            .max(old.map_or(0, |s| s.tokens))
            .next_power_of_two()
            .max(16);
        // Logits rows grow to what is asked, not a power of two: they can be the largest
        // buffer, bounded by the device's largest binding.
        let logit_rows = logit_rows.max(old.map_or(0, |s| s.logit_rows)).max(1);
        let rows_out = rows_out
            .max(old.map_or(0, |s| s.rows_out))
            .next_power_of_two()
            .max(1);
        let table_len = table_len
            .max(old.map_or(0, |s| s.table_len))
            .next_power_of_two()
            .max(64);
        let c = &self.config;
        let f = 4u64;
        let (n, d) = (tokens as u64, c.d_model as u64);
        let q_dim = (c.n_heads * c.head_dim) as u64;
        let qkv = q_dim + 2 * c.kv_dim() as u64;
        let ffn = c.ffn_dim as u64;
        let logits_bytes = logit_rows as u64 * c.vocab_size as u64 * f;
        let fin_bytes = rows_out as u64 * d * f;
        let picks_bytes = logit_rows as u64 * 8;
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: (logits_bytes + fin_bytes + picks_bytes).max(16),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.bind_cache.clear();
        self.scratch = Some(Scratch {
            tokens,
            logit_rows,
            rows_out,
            table_len,
            x: self.storage("x", n * d * f)?,
            h: self.storage("h", n * d * f)?,
            qkv: self.storage("qkv", n * qkv * f)?,
            att: self.storage("att", n * q_dim * f)?,
            act: self.storage("act", n * ffn * f)?,
            cs: self.storage("rope", n * (c.head_dim as u64 / 2) * 8)?,
            tok: self.storage("tok", n * 16)?,
            tables: self.storage("tables", table_len as u64 * 4)?,
            sel: self.storage("sel", rows_out as u64 * 4)?,
            fin: self.storage("fin", fin_bytes)?,
            logits: self.storage("logits", logits_bytes)?,
            part: match self.pipelines.split_k_workgroups {
                0 => None,
                w => Some(self.storage("partial sums", record::split_part_bytes(w))?),
            },
            draws: self.storage("draws", logit_rows as u64 * 16)?,
            picks: self.storage("picks", picks_bytes)?,
            readback,
        });
        Ok(())
    }

    fn ensure_params(&mut self, slots: usize) {
        if slots > self.params_slots {
            let slots = slots.next_power_of_two();
            self.params = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: slots as u64 * PARAM_SLOT,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.params_slots = slots;
            self.bind_cache.clear();
        }
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn scratch_bytes(&self) -> usize {
        self.scratch.as_ref().map_or(0, |s| {
            [
                &s.x,
                &s.h,
                &s.qkv,
                &s.att,
                &s.act,
                &s.cs,
                &s.tok,
                &s.tables,
                &s.sel,
                &s.fin,
                &s.logits,
                &s.draws,
                &s.picks,
                &s.readback,
            ]
            .into_iter()
            .chain(&s.part)
            .map(|b| b.size() as usize)
            .sum()
        })
    }

    /// Drops the pass buffers (device memory, and the host-visible read-back buffer) when
    /// their largest, the logits with their read-back copy, is past `keep_bytes`: the next pass
    /// makes them again at its own size.
    fn release_scratch(&mut self, keep_bytes: usize) {
        let large = self
            .scratch
            .as_ref()
            .is_some_and(|s| s.readback.size() as usize > keep_bytes);
        if large {
            self.bind_cache.clear();
            self.scratch = None;
        }
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn ensure_kv_blocks(&mut self, n_blocks: usize) -> Result<()> {
        if n_blocks <= self.kv_blocks {
            return Ok(());
        }
        // Each layer's KV buffer is one storage binding, which bounds the blocks a device holds.
        let blocks_cap = (self.max_binding / self.kv_layer_bytes(1)) as usize;
        if n_blocks > blocks_cap {
            return Err(ModelError::KvCacheFull {
                needed: n_blocks - self.kv_blocks,
                limit: blocks_cap,
                block_size: KV_BLOCK_TOKENS,
            });
        }
        self.flush_copies();
        let target = n_blocks.max(self.kv_blocks * 2).max(16).min(blocks_cap);
        let mut fresh = Vec::with_capacity(self.config.n_layers);
        for l in 0..self.config.n_layers {
            fresh.push(self.storage(&format!("kv.{l}"), self.kv_layer_bytes(target))?);
        }
        if self.kv_blocks > 0 {
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            let bytes = self.kv_layer_bytes(self.kv_blocks);
            for (old, new) in self.kv.iter().zip(&fresh) {
                enc.copy_buffer_to_buffer(old, 0, new, 0, bytes);
            }
            self.queue.submit([enc.finish()]);
        }
        self.kv = fresh;
        self.kv_blocks = target;
        self.bind_cache.clear();
        Ok(())
    }

    fn copy_kv_block(&mut self, src: u32, dst: u32, n_tokens: usize) {
        if n_tokens == 0 || src == dst {
            return;
        }
        // Batched copies read all sources before writing any destination: a copy that
        // touches an earlier one's blocks waits for those to land first.
        if self
            .pending_copies
            .iter()
            .any(|&(s, d, _)| d == src || d == dst || s == dst)
        {
            self.flush_copies();
        }
        self.pending_copies.push((src, dst, n_tokens));
    }

    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        self.forward_sampled(batch, &[], &[], (logits, hidden), &mut Vec::new())
    }

    fn forward_sampled(
        &mut self,
        batch: &ForwardBatch<'_>,
        sample_for: &[u32],
        draws: &[Draw],
        (logits, hidden): (&mut Vec<f32>, &mut Vec<f32>),
        picks: &mut Vec<(u32, f32)>,
    ) -> Result<()> {
        // The logits of one pass (returned or sampled) must fit one storage binding (128 MiB
        // on some devices: 220 rows of a 151,936-token vocabulary; or `max_chunk_bytes`). A
        // batch that wants more runs as consecutive slices of its tokens; attention is causal
        // and each slice's keys and values are in the cache before the next slice runs, so the
        // result is the same.
        let rows_max = (self.max_chunk as usize / (self.config.vocab_size * 4)).max(1);
        if batch.logits_for.len() + sample_for.len() <= rows_max {
            return self.forward_pass(batch, (sample_for, draws), (logits, hidden), picks);
        }
        let vocab = self.config.vocab_size;
        // Per hidden row: `d_model` values for each layer read.
        let d = self.config.d_model * batch.hidden_layers.len();
        logits.resize(batch.logits_for.len() * vocab, 0.0);
        hidden.resize(batch.hidden_for.len() * d, 0.0);
        picks.clear();
        picks.resize(sample_for.len(), (0, 0.0));
        let (mut part_logits, mut part_hidden, mut part_picks) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        while start < batch.tokens.len() {
            // Extend the slice until it holds `rows_max` rows.
            let mut end = start;
            let mut rows = 0;
            while end < batch.tokens.len() {
                let wanted = batch
                    .logits_for
                    .iter()
                    .chain(sample_for)
                    .filter(|&&i| i as usize == end)
                    .count();
                if rows + wanted > rows_max && end > start {
                    break;
                }
                rows += wanted;
                end += 1;
            }
            let local = |list: &[u32]| -> (Vec<usize>, Vec<u32>) {
                list.iter()
                    .enumerate()
                    .filter(|(_, &i)| (start..end).contains(&(i as usize)))
                    .map(|(j, &i)| (j, i - start as u32))
                    .unzip()
            };
            let (lj, lf) = local(batch.logits_for);
            let (hj, hf) = local(batch.hidden_for);
            let (sj, sf) = local(sample_for);
            let part_draws: Vec<Draw> = sj.iter().map(|&j| draws[j]).collect();
            let part = ForwardBatch {
                tokens: &batch.tokens[start..end],
                positions: &batch.positions[start..end],
                seq_index: &batch.seq_index[start..end],
                block_tables: batch.block_tables,
                logits_for: &lf,
                hidden_for: &hf,
                hidden_layers: batch.hidden_layers,
            };
            self.forward_pass(
                &part,
                (&sf, &part_draws),
                (&mut part_logits, &mut part_hidden),
                &mut part_picks,
            )?;
            for (k, j) in lj.into_iter().enumerate() {
                logits[j * vocab..(j + 1) * vocab]
                    .copy_from_slice(&part_logits[k * vocab..(k + 1) * vocab]);
            }
            for (k, j) in hj.into_iter().enumerate() {
                hidden[j * d..(j + 1) * d].copy_from_slice(&part_hidden[k * d..(k + 1) * d]);
            }
            for (k, j) in sj.into_iter().enumerate() {
                picks[j] = part_picks[k];
            }
            start = end;
        }
        Ok(())
    }
}

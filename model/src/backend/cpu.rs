//! The native CPU backend: quantized SIMD matrix products on all cores (rayon), f32 KV cache.
//!
//! - **One pool, one pass.** Each forward pass runs inside the compute pool (`install`), so the
//!   pass's ~100 parallel regions split by work stealing instead of parking the caller on a futex
//!   each time (single-sequence decode went from 29.6 to 37.2 tokens/s on two cores).
//! - **Element-wise work** (RMSNorm, SwiGLU, softmax) is plain Rust loops run through
//!   `with_simd`, which compiles them for AVX2 when the CPU has it while the binary stays
//!   baseline x86-64. Rust never fuses or reorders float operations, so both builds give the
//!   same numbers.
//! - **Attention** has, besides its plain loops, an AVX2 form (`scores_avx2`, `values_avx2`) that
//!   does every element's products and sums in the plain loops' order, arranged differently: each
//!   query head's output stays in registers while the positions pass, and eight scores' lane sums
//!   are transposed so that they add eight to a vector. A test holds the two to the same bits.
//! - **The exception is `e^x`** in softmax and SiLU: with AVX2 it is `exp8` (Cephes' polynomial,
//!   eight at a time, within 2 ulp of `f32::exp`, which it replaced one call per value), so the
//!   two builds differ there by an ulp or two. Batching is unaffected: every value takes the same
//!   function wherever it sits.
//! - Products go through [`crate::quant`]; activations are quantized to 8 bits per pass, so this
//!   backend matches llama.cpp's logits to a tolerance (tested), not the f32 reference exactly.

use std::sync::Arc;

use rayon::prelude::*;

use super::{release, rope_angles, Backend, ForwardBatch, HiddenLayer};
use crate::arch::{DecoderWeights, ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::kv::KV_BLOCK_TOKENS;
use crate::quant::{has_avx2, matmul_many, QMatrix, QuantizedActs};

/// Scratch buffers reused between forward passes, so steady-state decoding allocates nothing.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: QuantizedActs,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Scratch {
    fn vecs(&mut self) -> [&mut Vec<f32>; 11] {
        let s = self;
        [
            &mut s.x,
            &mut s.h,
            &mut s.q,
            &mut s.k,
            &mut s.v,
            &mut s.att,
            &mut s.o,
            &mut s.gate,
            &mut s.up,
            &mut s.cos,
            &mut s.sin,
        ]
    }
}

/// Runs a llama-style decoder on the CPU.
pub struct CpuBackend {
    config: ModelConfig,
    weights: Arc<DecoderWeights>,
    /// KV storage: block-major, then layer, then K/V, then slot, then the KV width.
    kv: Vec<f32>,
    kv_blocks: usize,
    scratch: Scratch,
}

impl CpuBackend {
    /// Builds a backend over shared weights.
    pub fn new(config: ModelConfig, weights: Arc<DecoderWeights>) -> Self {
        CpuBackend {
            config,
            weights,
            kv: Vec::new(),
            kv_blocks: 0,
            scratch: Scratch::default(),
        }
    }

    fn block_stride(&self) -> usize {
        self.config.n_layers * 2 * KV_BLOCK_TOKENS * self.config.kv_dim()
    }
}

/// Rows at or above which element-wise work is spread over the pool (below it, the cost of
/// splitting exceeds the work).
const PARALLEL_ROWS_MIN: usize = 16;

/// Runs `f` compiled for AVX2 when `avx2` is set (from [`has_avx2`]). The operations and their
/// order are unchanged (Rust never fuses or reorders float arithmetic), so both builds agree
/// exactly; AVX2 only makes the loops twice as wide.
#[inline(always)]
fn with_simd<R>(avx2: bool, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        #[target_feature(enable = "avx2")]
        unsafe fn go<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: `avx2` is only set when the CPU has AVX2.
        return unsafe { go(f) };
    }
    let _ = avx2;
    f()
}

/// `e^v` for every element of `v`, in place: eight at a time with AVX2 when `avx2` is set
/// ([`exp8`], within 2 units in the last place of `f32::exp`), else `f32::exp`. Every
/// element goes through the same function wherever it sits in the slice.
fn exp_in_place(v: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn go(v: &mut [f32]) {
            use std::arch::x86_64::*;
            let mut chunks = v.chunks_exact_mut(8);
            for c in &mut chunks {
                _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr())));
            }
            let rest = chunks.into_remainder();
            if !rest.is_empty() {
                let mut buf = [0f32; 8];
                buf[..rest.len()].copy_from_slice(rest);
                _mm256_storeu_ps(buf.as_mut_ptr(), exp8(_mm256_loadu_ps(buf.as_ptr())));
                rest.copy_from_slice(&buf[..rest.len()]);
            }
        }
        // SAFETY: `avx2` is only set when the CPU has AVX2 and FMA (`has_avx2`).
        unsafe { go(v) };
        return;
    }
    let _ = avx2;
    for x in v {
        *x = x.exp();
    }
}

/// `e^x` for eight floats (Cephes' `expf`: `x = n ln 2 + r`, a degree-5 polynomial in `r`,
/// times `2^n`). Inputs are clamped to [-87.34, 88.3], where `2^n` keeps a normal exponent, so
/// very negative inputs give about 1.2e-38 rather than 0; NaN stays NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // max/min return their second operand when either is NaN: keep `x` second.
    let x = _mm256_max_ps(_mm256_set1_ps(-87.336_55), x);
    let x = _mm256_min_ps(_mm256_set1_ps(88.3), x);
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // ln 2 in two parts, so `r` is exact to far below an ulp.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(y, pow2n)
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let avx2 = has_avx2();
    let norm_row = |(xr, or): (&[f32], &mut [f32])| {
        with_simd(
            avx2,
            #[inline(always)]
            || {
                let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let scale = 1.0 / (ss + eps).sqrt();
                for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
                    *o = xv * scale * wv;
                }
            },
        )
    };
    if x.len() / d >= PARALLEL_ROWS_MIN {
        x.par_chunks_exact(d)
            .zip(out.par_chunks_exact_mut(d))
            .for_each(norm_row);
    } else {
        x.chunks_exact(d)
            .zip(out.chunks_exact_mut(d))
            .for_each(norm_row);
    }
}

/// `gate = silu(gate) * up`, row by row.
fn swiglu(gate: &mut [f32], up: &[f32], width: usize) {
    let avx2 = has_avx2();
    let row = |(g, u): (&mut [f32], &[f32])| {
        with_simd(
            avx2,
            #[inline(always)]
            || {
                // silu(g) = g / (1 + e^-g), e^-g a chunk at a time on the stack.
                let mut e = [0f32; 64];
                for (gc, uc) in g.chunks_mut(64).zip(u.chunks(64)) {
                    let e = &mut e[..gc.len()];
                    for (ev, gv) in e.iter_mut().zip(gc.iter()) {
                        *ev = -gv;
                    }
                    exp_in_place(e, avx2);
                    for ((gv, uv), ev) in gc.iter_mut().zip(uc).zip(e.iter()) {
                        *gv = *gv / (1.0 + ev) * uv;
                    }
                }
            },
        )
    };
    if gate.len() / width >= PARALLEL_ROWS_MIN {
        gate.par_chunks_mut(width)
            .zip(up.par_chunks(width))
            .for_each(row);
    } else {
        gate.chunks_mut(width).zip(up.chunks(width)).for_each(row);
    }
}

/// The products of `n` rows of activations `x` with every job's matrix, the activations
/// quantized as each matrix's type takes them (one scale per 32 values, or per 256 for the
/// K-quants): once when all jobs agree, as they do in the models seen so far, else once per
/// kind.
fn matmul_quantized(
    acts: &mut QuantizedActs,
    x: &[f32],
    n: usize,
    jobs: &mut [(&QMatrix, &mut [f32])],
) {
    let (first, cols) = (jobs[0].0.ty, jobs[0].0.cols);
    if jobs
        .iter()
        .all(|(w, _)| w.ty.act_scale_block() == first.act_scale_block())
    {
        acts.quantize_for(first, x, n, cols);
        matmul_many(jobs, acts);
        return;
    }
    for block in [32, 256] {
        let mut some: Vec<(&QMatrix, &mut [f32])> = jobs
            .iter_mut()
            .filter(|(w, _)| w.ty.act_scale_block() == block)
            .map(|(w, out)| (*w, &mut **out))
            .collect();
        if let Some((w, _)) = some.first() {
            acts.quantize_for(w.ty, x, n, cols);
            matmul_many(&mut some, acts);
        }
    }
}

fn add_bias(y: &mut [f32], b: Option<&Vec<f32>>) {
    if let Some(b) = b {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

fn rope(v: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    for head in v.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = match style {
                RopeStyle::Neox => (i, i + half),
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// One attention task: query token `i`'s heads that share KV head `kvh`, against every cached
/// position of its sequence. The `group` query heads read each cached key and value once; per
/// head, the arithmetic and its order are those of a plain one-head loop.
struct AttentionTask<'a> {
    kv: &'a [f32],
    q: &'a [f32],
    batch: &'a ForwardBatch<'a>,
    layer: usize,
    n_kv_heads: usize,
    group: usize,
    hd: usize,
    q_dim: usize,
    kv_dim: usize,
    stride: usize,
    slab: usize,
    scale: f32,
    /// Whether the CPU has AVX2 ([`has_avx2`], read once per layer rather than per task).
    avx2: bool,
}

impl AttentionTask<'_> {
    /// Runs task `idx` (token `idx / n_kv_heads`, KV head `idx % n_kv_heads`) into `out`.
    #[inline(always)]
    fn run(&self, idx: usize, out: &mut [f32]) {
        self.run_as(idx, out, self.avx2 && self.hd % 8 == 0)
    }

    /// [`Self::run`], with the AVX2 loops when `vector` is set (the CPU must have AVX2 and `hd`
    /// be a multiple of 8), else the plain loops: both give the same bits.
    #[inline(always)]
    fn run_as(&self, idx: usize, out: &mut [f32], vector: bool) {
        let i = idx / self.n_kv_heads;
        let kvh = idx % self.n_kv_heads;
        let ctx = self.batch.positions[i] as usize + 1;
        let (group, hd) = (self.group, self.hd);
        let qs = &self.q[i * self.q_dim + kvh * group * hd..][..group * hd];
        let table = &self.batch.block_tables[self.batch.seq_index[i] as usize];
        let (l, stride, slab, kv_dim) = (self.layer, self.stride, self.slab, self.kv_dim);
        // Where position p's key (kind 0) or value (kind 1) for this KV head starts.
        let slot = |p: usize, kind: usize| {
            let block = table[p / KV_BLOCK_TOKENS] as usize;
            block * stride + (2 * l + kind) * slab + (p % KV_BLOCK_TOKENS) * kv_dim + kvh * hd
        };
        ATTENTION_SCRATCH.with_borrow_mut(|(scores, part)| {
            // scores[g * ctx + p]: query head g of the group against position p.
            scores.clear();
            scores.resize(group * ctx, 0.0);
            #[cfg(target_arch = "x86_64")]
            if vector {
                assert!(self.avx2 && hd % 8 == 0);
                // SAFETY: AVX2 is present (`avx2` is only set when it is); every key and value
                // slot holds `hd` floats of `kv`, and `qs`, `scores` and `out` have the lengths
                // `scores_avx2` and `values_avx2` read and write.
                unsafe {
                    self.scores_avx2(qs, &slot, ctx, scores, part);
                    softmax_rows(scores, ctx, true);
                    self.values_avx2(scores, &slot, ctx, out);
                }
                return;
            }
            let _ = vector;
            for p in 0..ctx {
                let k = &self.kv[slot(p, 0)..][..hd];
                for g in 0..group {
                    scores[g * ctx + p] = dot(&qs[g * hd..(g + 1) * hd], k) * self.scale;
                }
            }
            softmax_rows(scores, ctx, self.avx2);
            out.fill(0.0);
            for p in 0..ctx {
                let v = &self.kv[slot(p, 1)..][..hd];
                for g in 0..group {
                    let wgt = scores[g * ctx + p];
                    for (o, vv) in out[g * hd..(g + 1) * hd].iter_mut().zip(v) {
                        *o += wgt * vv;
                    }
                }
            }
        })
    }

    /// The scores of [`Self::run`], with AVX2: each score's eight lane sums of [`dot`] are
    /// formed as a vector and kept in `part`, then eight scores at a time are transposed so
    /// that their lanes add in [`dot`]'s order with eight scores to a vector.
    ///
    /// # Safety
    /// AVX2 must be available; `hd` must be a multiple of 8; `slot(p, 0)` must start `hd`
    /// floats of `kv` for every `p < ctx`; `qs` holds `group * hd` floats and `scores`
    /// `group * ctx`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn scores_avx2(
        &self,
        qs: &[f32],
        slot: &impl Fn(usize, usize) -> usize,
        ctx: usize,
        scores: &mut [f32],
        part: &mut Vec<f32>,
    ) {
        use std::arch::x86_64::*;
        let (group, hd) = (self.group, self.hd);
        let n = group * ctx;
        part.clear();
        part.resize(8 * n, 0.0);
        let pp = part.as_mut_ptr();
        for p in 0..ctx {
            let k = self.kv[slot(p, 0)..][..hd].as_ptr();
            for g in 0..group {
                let q = qs[g * hd..][..hd].as_ptr();
                let mut acc = _mm256_setzero_ps();
                for c in (0..hd).step_by(8) {
                    let m = _mm256_mul_ps(_mm256_loadu_ps(q.add(c)), _mm256_loadu_ps(k.add(c)));
                    acc = _mm256_add_ps(acc, m);
                }
                _mm256_storeu_ps(pp.add(8 * (g * ctx + p)), acc);
            }
        }
        // [`dot`] sums the lanes in order from the empty sum, then adds the (empty) sum of
        // its remainder.
        let zero: f32 = [0f32; 0].iter().sum();
        let (zv, scale) = (_mm256_set1_ps(zero), _mm256_set1_ps(self.scale));
        let mut j = 0;
        while j + 8 <= n {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(pp.add(8 * (j + i))));
            let lanes = transpose8(r);
            let mut s = zv;
            for l in lanes {
                s = _mm256_add_ps(s, l);
            }
            s = _mm256_add_ps(s, zv);
            _mm256_storeu_ps(scores.as_mut_ptr().add(j), _mm256_mul_ps(s, scale));
            j += 8;
        }
        for (j, sc) in scores.iter_mut().enumerate().skip(j) {
            let lanes = &part[8 * j..8 * j + 8];
            *sc = (lanes.iter().sum::<f32>() + zero) * self.scale;
        }
    }

    /// The weighted values of [`Self::run`], with AVX2: each query head's output kept in
    /// registers, 64 values at a time, while the positions pass (each element gets the same
    /// products and sums in the same order as the plain loop).
    ///
    /// # Safety
    /// As for [`Self::scores_avx2`], for values (`slot(p, 1)`); `out` holds `group * hd`
    /// floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(
        &self,
        scores: &[f32],
        slot: &impl Fn(usize, usize) -> usize,
        ctx: usize,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        #[inline(always)]
        unsafe fn chunk<const M: usize>(
            kv: *const f32,
            weights: &[f32],
            slot: &impl Fn(usize, usize) -> usize,
            at: usize,
            out: *mut f32,
        ) {
            let mut o = [_mm256_setzero_ps(); M];
            for (p, &w) in weights.iter().enumerate() {
                let v = kv.add(slot(p, 1) + at);
                let w = _mm256_set1_ps(w);
                for (j, o) in o.iter_mut().enumerate() {
                    *o = _mm256_add_ps(*o, _mm256_mul_ps(w, _mm256_loadu_ps(v.add(8 * j))));
                }
            }
            for (j, o) in o.iter().enumerate() {
                _mm256_storeu_ps(out.add(8 * j), *o);
            }
        }
        let hd = self.hd;
        let kv = self.kv.as_ptr();
        for g in 0..self.group {
            let weights = &scores[g * ctx..(g + 1) * ctx];
            let o = out[g * hd..(g + 1) * hd].as_mut_ptr();
            let mut c = 0;
            while c + 64 <= hd {
                chunk::<8>(kv, weights, slot, c, o.add(c));
                c += 64;
            }
            while c < hd {
                chunk::<1>(kv, weights, slot, c, o.add(c));
                c += 8;
            }
        }
    }
}

thread_local! {
    /// Per-thread buffers of the attention tasks: scores, and their lane sums.
    static ATTENTION_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Softmax of every `ctx`-long row of `scores`, in place.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], ctx: usize, avx2: bool) {
    for row in scores.chunks_exact_mut(ctx) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for sc in row.iter_mut() {
            *sc -= max;
        }
        exp_in_place(row, avx2);
        let mut sum = 0f32;
        for sc in row.iter() {
            sum += *sc;
        }
        let inv = 1.0 / sum;
        for sc in row.iter_mut() {
            *sc *= inv;
        }
    }
}

/// Transposes eight vectors of eight floats: lane `l` of the result `i` is lane `i` of `r[l]`
/// (the quantized kernels' 32-bit transpose; the casts move no bits).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // Plain loops: a closure would not inherit the target features.
    let mut v = [_mm256_setzero_si256(); 8];
    for (v, r) in v.iter_mut().zip(r) {
        *v = _mm256_castps_si256(r);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for (o, t) in out.iter_mut().zip(crate::quant::transpose8x32(v)) {
        *o = _mm256_castsi256_ps(t);
    }
    out
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn ensure_kv_blocks(&mut self, n_blocks: usize) -> Result<()> {
        if n_blocks > self.kv_blocks {
            // Grow geometrically so a long generation reallocates O(log n) times.
            let target = n_blocks.max(self.kv_blocks * 2).max(16);
            let len = target
                .checked_mul(self.block_stride())
                .ok_or_else(|| ModelError::invalid("kv_blocks", "overflow"))?;
            self.kv
                .try_reserve_exact(len - self.kv.len())
                .map_err(|e| {
                    ModelError::invalid(
                        "kv_blocks",
                        format!("cannot allocate KV storage for {target} blocks: {e}"),
                    )
                })?;
            self.kv.resize(len, 0.0);
            self.kv_blocks = target;
        }
        Ok(())
    }

    fn copy_kv_block(&mut self, src: u32, dst: u32, n_tokens: usize) {
        let cfg = &self.config;
        let slab = KV_BLOCK_TOKENS * cfg.kv_dim();
        let stride = self.block_stride();
        for lk in 0..cfg.n_layers * 2 {
            let s = src as usize * stride + lk * slab;
            let d = dst as usize * stride + lk * slab;
            self.kv.copy_within(s..s + n_tokens * cfg.kv_dim(), d);
        }
    }

    fn scratch_bytes(&self) -> usize {
        let s = &self.scratch;
        let floats: usize = [
            &s.x, &s.h, &s.q, &s.k, &s.v, &s.att, &s.o, &s.gate, &s.up, &s.cos, &s.sin,
        ]
        .iter()
        .map(|v| v.capacity())
        .sum();
        floats * 4 + s.acts.capacity_bytes()
    }

    fn release_scratch(&mut self, keep_bytes: usize) {
        for v in self.scratch.vecs() {
            release(v, keep_bytes);
        }
        self.scratch.acts.release(keep_bytes);
    }

    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        // Run the whole pass on a worker of the pool: the ~100 parallel regions of a pass then
        // split work by stealing, instead of each one parking the caller on a futex and waking
        // it (tens of microseconds each, several milliseconds per decoded token).
        let pool = compute_pool();
        pool.install(|| self.forward_on_pool(batch, logits, hidden))
    }
}

/// The thread pool all CPU backends compute on: as many threads as rayon's global pool
/// (`RAYON_NUM_THREADS`, or one per core).
fn compute_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("arbor-cpu-{i}"))
            .build()
            .expect("building the CPU thread pool")
    })
}

impl CpuBackend {
    fn forward_on_pool(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = self.config.clone();
        let w = self.weights.clone();
        let n = batch.tokens.len();
        let d = cfg.d_model;
        let hd = cfg.head_dim;
        let q_dim = cfg.n_heads * hd;
        let kv_dim = cfg.kv_dim();
        let group = cfg.n_heads / cfg.n_kv_heads;
        let stride = self.block_stride();
        let slab = KV_BLOCK_TOKENS * kv_dim;
        let s = &mut self.scratch;
        s.x.resize(n * d, 0.0);
        s.h.resize(n * d, 0.0);
        s.q.resize(n * q_dim, 0.0);
        s.k.resize(n * kv_dim, 0.0);
        s.v.resize(n * kv_dim, 0.0);
        s.att.resize(n * q_dim, 0.0);
        s.o.resize(n * d, 0.0);
        s.gate.resize(n * cfg.ffn_dim, 0.0);
        s.up.resize(n * cfg.ffn_dim, 0.0);

        for (i, &t) in batch.tokens.iter().enumerate() {
            w.embed
                .dequantize_row_into(t as usize, &mut s.x[i * d..(i + 1) * d]);
        }
        let half = hd / 2;
        s.cos.resize(n * half, 0.0);
        s.sin.resize(n * half, 0.0);
        for (i, &p) in batch.positions.iter().enumerate() {
            for (j, theta) in rope_angles(&cfg, p).enumerate() {
                s.cos[i * half + j] = theta.cos();
                s.sin[i * half + j] = theta.sin();
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let (mh, nl) = (batch.hidden_for.len(), batch.hidden_layers.len());
        hidden.resize(mh * nl * d, 0.0);
        // Hidden states read at layer `k` of `hidden_layers`, normalised with `weight`.
        let read_hidden = |x: &[f32], k: usize, weight: &[f32], hidden: &mut Vec<f32>| {
            for (j, &i) in batch.hidden_for.iter().enumerate() {
                let row = &mut hidden[(j * nl + k) * d..(j * nl + k + 1) * d];
                rms_norm(
                    &x[i as usize * d..(i as usize + 1) * d],
                    weight,
                    cfg.rms_eps,
                    row,
                );
            }
        };
        // The weight of a middle block's norm, made only for a pass that reads one.
        let reads_block = mh > 0
            && batch
                .hidden_layers
                .iter()
                .any(|l| matches!(l, HiddenLayer::Block(_)));
        let ones = if reads_block {
            vec![1.0f32; d]
        } else {
            Vec::new()
        };

        for (l, lw) in w.layers.iter().enumerate() {
            rms_norm(&s.x, &lw.attn_norm, cfg.rms_eps, &mut s.h);
            matmul_quantized(
                &mut s.acts,
                &s.h,
                n,
                &mut [
                    (&lw.wq, &mut s.q[..]),
                    (&lw.wk, &mut s.k[..]),
                    (&lw.wv, &mut s.v[..]),
                ],
            );
            add_bias(&mut s.q, lw.bq.as_ref());
            add_bias(&mut s.k, lw.bk.as_ref());
            add_bias(&mut s.v, lw.bv.as_ref());
            for i in 0..n {
                let (c, sn) = (
                    &s.cos[i * half..(i + 1) * half],
                    &s.sin[i * half..(i + 1) * half],
                );
                rope(
                    &mut s.q[i * q_dim..(i + 1) * q_dim],
                    hd,
                    c,
                    sn,
                    cfg.rope_style,
                );
                rope(
                    &mut s.k[i * kv_dim..(i + 1) * kv_dim],
                    hd,
                    c,
                    sn,
                    cfg.rope_style,
                );
            }
            // Write this batch's keys and values into their slots.
            for i in 0..n {
                let pos = batch.positions[i] as usize;
                let table = &batch.block_tables[batch.seq_index[i] as usize];
                let block = table[pos / KV_BLOCK_TOKENS] as usize;
                let slot = pos % KV_BLOCK_TOKENS;
                let kbase = block * stride + (2 * l) * slab + slot * kv_dim;
                let vbase = block * stride + (2 * l + 1) * slab + slot * kv_dim;
                self.kv[kbase..kbase + kv_dim].copy_from_slice(&s.k[i * kv_dim..(i + 1) * kv_dim]);
                self.kv[vbase..vbase + kv_dim].copy_from_slice(&s.v[i * kv_dim..(i + 1) * kv_dim]);
            }
            // Attention, one task per (token, KV head): the `group` query heads that share a KV
            // head read each cached key and value once. Per head, the arithmetic and its order
            // are those of a plain one-head loop.
            let task = AttentionTask {
                kv: &self.kv,
                q: &s.q,
                batch,
                layer: l,
                n_kv_heads: cfg.n_kv_heads,
                group,
                hd,
                q_dim,
                kv_dim,
                stride,
                slab,
                scale,
                avx2: has_avx2(),
            };
            s.att
                .par_chunks_mut(group * hd)
                .enumerate()
                .for_each(|(idx, out)| {
                    with_simd(
                        task.avx2,
                        #[inline(always)]
                        || task.run(idx, out),
                    )
                });
            matmul_quantized(&mut s.acts, &s.att, n, &mut [(&lw.wo, &mut s.o[..])]);
            for (x, o) in s.x.iter_mut().zip(&s.o) {
                *x += o;
            }
            rms_norm(&s.x, &lw.ffn_norm, cfg.rms_eps, &mut s.h);
            matmul_quantized(
                &mut s.acts,
                &s.h,
                n,
                &mut [(&lw.w_gate, &mut s.gate[..]), (&lw.w_up, &mut s.up[..])],
            );
            swiglu(&mut s.gate, &s.up, cfg.ffn_dim);
            matmul_quantized(&mut s.acts, &s.gate, n, &mut [(&lw.w_down, &mut s.o[..])]);
            for (x, o) in s.x.iter_mut().zip(&s.o) {
                *x += o;
            }
            for (k, layer) in batch.hidden_layers.iter().enumerate() {
                if *layer == HiddenLayer::Block(l) {
                    read_hidden(&s.x, k, &ones, hidden);
                }
            }
        }

        // Final hidden states: the selected rows, normalised in f32 (never quantized).
        for (k, layer) in batch.hidden_layers.iter().enumerate() {
            if *layer == HiddenLayer::Final {
                read_hidden(&s.x, k, &w.out_norm, hidden);
            }
        }
        let m = batch.logits_for.len();
        logits.resize(m * cfg.vocab_size, 0.0);
        if m == 0 {
            // Nothing reads logits (a pass that only extends sequences or reads hidden
            // states): skip the output projection, the largest matrix of the model.
            return Ok(());
        }
        for (j, &i) in batch.logits_for.iter().enumerate() {
            s.o[j * d..(j + 1) * d].copy_from_slice(&s.x[i as usize * d..(i as usize + 1) * d]);
        }
        rms_norm(&s.o[..m * d], &w.out_norm, cfg.rms_eps, &mut s.h[..m * d]);
        matmul_quantized(
            &mut s.acts,
            &s.h[..m * d],
            m,
            &mut [(&w.output, &mut logits[..])],
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{matmul, random_matrix, GgmlType};

    /// Matrices sharing an input but taking differently quantized activations (one scale per
    /// 32 values for Q8_0, per 256 for Q4_K) each get their own quantization, and the same
    /// products as one matrix at a time.
    #[test]
    fn mixed_activation_kinds_in_one_call_match_separate_products() {
        let (cols, n) = (512, 11);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 2.0)
            .collect();
        let a = random_matrix(GgmlType::Q8_0, 7, cols, 1);
        let b = random_matrix(GgmlType::Q4K, 5, cols, 2);
        let c = random_matrix(GgmlType::Q8_0, 3, cols, 3);
        let (mut ya, mut yb, mut yc) = (vec![0f32; n * 7], vec![0f32; n * 5], vec![0f32; n * 3]);
        let mut acts = QuantizedActs::default();
        matmul_quantized(
            &mut acts,
            &x,
            n,
            &mut [(&a, &mut ya[..]), (&b, &mut yb[..]), (&c, &mut yc[..])],
        );
        for (w, got) in [(&a, &ya), (&b, &yb), (&c, &yc)] {
            let mut want = vec![0f32; n * w.rows];
            matmul(
                w,
                &QuantizedActs::quantize_for_type(w.ty, &x, n, cols),
                &mut want,
            );
            assert_eq!(got, &want, "{:?}", w.ty);
        }
    }

    /// A product whose activations were quantized for another type is refused, naming the
    /// quantization it needs, instead of giving wrong numbers.
    #[test]
    #[should_panic(expected = "one scale per 256 values")]
    fn activations_quantized_for_another_type_are_refused() {
        let w = random_matrix(GgmlType::Q4K, 2, 256, 4);
        let x = vec![0.5f32; 256];
        let mut out = vec![0f32; 2];
        matmul(&w, &QuantizedActs::quantize(&x, 1, 256), &mut out);
    }

    /// The AVX2 attention gives the same bits as the plain loops, for head widths with and
    /// without a remainder past 64, contexts with and without a remainder of eight scores, and
    /// positions spread over several KV blocks.
    #[test]
    fn vector_attention_matches_the_plain_loops_exactly() {
        if !has_avx2() {
            return;
        }
        for (hd, group, ctx) in [
            (64usize, 7usize, 37usize),
            (64, 2, 1),
            (128, 3, 40),
            (72, 1, 17),
            (8, 4, 5),
        ] {
            let (n_kv_heads, layers) = (2, 2);
            let kv_dim = n_kv_heads * hd;
            let q_dim = group * kv_dim;
            let slab = KV_BLOCK_TOKENS * kv_dim;
            let stride = layers * 2 * slab;
            let blocks = ctx.div_ceil(KV_BLOCK_TOKENS) + 3;
            let wave = |i: usize, f: f32| ((i as f32 * f).sin() * 3.0).round() / 3.0 + 0.01;
            let kv: Vec<f32> = (0..blocks * stride).map(|i| wave(i, 0.37)).collect();
            let q: Vec<f32> = (0..2 * q_dim).map(|i| wave(i, 0.91)).collect();
            // Token 1 of the batch: its sequence's blocks out of order in the store.
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let tables = [table];
            let positions = [0, ctx as u32 - 1];
            let batch = ForwardBatch {
                tokens: &[0, 0],
                positions: &positions,
                seq_index: &[0, 0],
                block_tables: &tables,
                logits_for: &[],
                hidden_for: &[],
                hidden_layers: &[],
            };
            let run = |vector: bool| {
                let task = AttentionTask {
                    kv: &kv,
                    q: &q,
                    batch: &batch,
                    layer: 1,
                    n_kv_heads,
                    group,
                    hd,
                    q_dim,
                    kv_dim,
                    stride,
                    slab,
                    scale: 1.0 / (hd as f32).sqrt(),
                    avx2: true,
                };
                let mut out = vec![f32::NAN; 2 * q_dim];
                for (idx, o) in out.chunks_mut(group * hd).enumerate() {
                    with_simd(true, || task.run_as(idx, o, vector));
                }
                out
            };
            let (plain, vector) = (run(false), run(true));
            assert!(plain.iter().all(|v| v.is_finite()));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&plain),
                bits(&vector),
                "hd {hd}, group {group}, ctx {ctx}"
            );
        }
    }

    /// The AVX2 exponential stays within 2 units in the last place of `f32::exp` over the whole
    /// range that softmax and SiLU use, is exact at 0, and keeps NaN.
    #[test]
    fn vector_exp_matches_libm() {
        if !has_avx2() {
            return;
        }
        let mut worst = 0f32;
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .chain([0.0, -0.0, 1e-8, -1e-8, 88.0, -87.0])
            .collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys, true);
        for (x, y) in xs.iter().zip(&ys) {
            let want = x.exp();
            let ulps = (y - want).abs() / (want * f32::EPSILON);
            worst = worst.max(ulps);
            assert!(ulps <= 2.0, "exp({x}) = {y}, libm {want}: {ulps} ulp");
        }
        eprintln!("worst: {worst} ulp");
        let mut special = [0.0f32, f32::NAN, -1000.0, 1000.0];
        exp_in_place(&mut special, true);
        assert_eq!(special[0], 1.0);
        assert!(special[1].is_nan());
        assert!(special[2] >= 0.0 && special[2] < 1.2e-38, "{}", special[2]);
        assert!(
            special[3].is_finite() && special[3] > 2e38,
            "{}",
            special[3]
        );
    }

    /// llama.cpp's converter permutes each head's Q/K rows so that rotating interleaved pairs
    /// `(2i, 2i+1)` equals Hugging Face's `rotate_half` on the original order: output row `2i`
    /// takes original row `i`, row `2i+1` takes row `i + head_dim/2`. Both styles must agree
    /// under that permutation, or GGUF llama files would be rotated wrongly.
    #[test]
    fn interleaved_rope_on_permuted_rows_equals_neox_rope() {
        let hd = 8;
        let heads = 2;
        let v: Vec<f32> = (0..hd * heads).map(|i| (i as f32 * 0.37).sin()).collect();
        let pos = 5.0f32;
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..hd / 2)
            .map(|i| pos * 10_000f32.powf(-2.0 * i as f32 / hd as f32))
            .map(|t| (t.cos(), t.sin()))
            .unzip();
        let permute = |x: &[f32]| -> Vec<f32> {
            let mut out = vec![0f32; x.len()];
            for (h, head) in x.chunks(hd).enumerate() {
                for i in 0..hd / 2 {
                    out[h * hd + 2 * i] = head[i];
                    out[h * hd + 2 * i + 1] = head[i + hd / 2];
                }
            }
            out
        };
        let mut neox = v.clone();
        rope(&mut neox, hd, &cos, &sin, RopeStyle::Neox);
        let mut inter = permute(&v);
        rope(&mut inter, hd, &cos, &sin, RopeStyle::Interleaved);
        let expected = permute(&neox);
        for (a, b) in inter.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{inter:?} vs {expected:?}");
        }
    }
}

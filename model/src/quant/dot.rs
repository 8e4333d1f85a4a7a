//! Quantized matrix products: 8-bit activations against weight rows, on all cores.
//!
//! [`QuantizedActs::quantize_for`] quantizes a batch's activations per token, one scale per 32
//! values or per 256 for the K-quants (`GgmlType::act_scale_block`), in groups of eight tokens,
//! block-interleaved so a kernel walks one pointer per group; the AVX2 quantizer is
//! bit-identical to the scalar one. [`matmul`] and [`matmul_many`] then run the rows:
//! - Q5x4 on the eight-row kernels ([`super::rows8`], `rows8_range`), every other format on
//!   [`super::avx2`] (`simd_rows`), and the portable scalar kernel where the CPU lacks AVX2, FMA
//!   or F16C; [`matmul_into_scalar`] runs that kernel on one thread as the reference the SIMD
//!   kernels are tested against;
//! - a batch of more than one group decodes a block of rows (as many as fit 16 KB, at most 8) and
//!   passes each group over the whole block, so the group's activations and the decoded rows stay
//!   in L1 (1.04x-1.15x at 32 tokens); each (row, token) still gets the same operations;
//! - the rows of every matrix of one call (Q, K and V together) are cut into chunks, multiples of
//!   eight rows, in one parallel region: 32 chunks a thread for batches, so the last chunk idles a
//!   core for less time, and 8 for passes of one group, which measured faster.

use rayon::prelude::*;

use super::formats::unpack_row;
use super::QMatrix;

/// Tokens whose blocks [`QuantizedActs`] interleaves, the widest group the kernels take at once.
pub(super) const GROUP: usize = 8;

/// Activations of a batch of tokens quantized to 8 bits in blocks of 32, the form every
/// matmul kernel takes. Scales are symmetric (`x ≈ d * q`, `q` in -127..=127), one per
/// `scale_block` values: 32, or 256 for the K-quants' products
/// ([`GgmlType::act_scale_block`](super::GgmlType::act_scale_block); each block of 32 then
/// carries its super-block's scale).
///
/// Tokens are stored in groups of eight (`GROUP`; the last may be smaller) and, within a
/// group, block-interleaved: block 0 of every token of the group, then block 1, and so on, so
/// that a kernel working on the whole group walks one pointer. See `QuantizedActs::block`.
#[derive(Debug, Default, Clone)]
pub struct QuantizedActs {
    /// Number of token rows.
    pub n_tokens: usize,
    /// Elements per row (a multiple of 32, or of 256 when `scale_block` is 256).
    pub cols: usize,
    /// Values sharing one scale: 32 or 256.
    pub scale_block: usize,
    /// Quantized values, `n_tokens * cols`, group-interleaved.
    qs: Vec<i8>,
    /// One scale per block of 32, group-interleaved like `qs`.
    d: Vec<f32>,
    /// `d * Σq` over each half block of 16, for the weight offsets (`min16`) of the K-quants;
    /// per token (not interleaved).
    sums16: Vec<f32>,
    /// `16 * d * Σq` over each block, interleaved like `d`: for the offset term of the
    /// formats whose weights are `dw * (u - 16)` (`dw * (u - 8)` for Q4_0, which halves it).
    s32: Vec<f32>,
    /// `16 * Σq` over each block, interleaved like `d`: the same offset as an integer, for
    /// the kernels that subtract it before scaling.
    q16: Vec<i32>,
}

impl QuantizedActs {
    /// Bytes its buffers hold.
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.qs.capacity()
            + 4 * (self.d.capacity()
                + self.sums16.capacity()
                + self.s32.capacity()
                + self.q16.capacity())
    }

    /// Frees each buffer larger than `keep_bytes` (the next quantization allocates what it
    /// needs).
    pub(crate) fn release(&mut self, keep_bytes: usize) {
        use crate::backend::release;
        release(&mut self.qs, keep_bytes);
        release(&mut self.d, keep_bytes);
        release(&mut self.sums16, keep_bytes);
        release(&mut self.s32, keep_bytes);
        release(&mut self.q16, keep_bytes);
        self.n_tokens = 0;
    }

    /// Index (in blocks) of token `t`'s block `b` in the interleaved layout.
    fn block_index(&self, t: usize, b: usize) -> usize {
        let nb = self.cols / 32;
        let t0 = t / GROUP * GROUP;
        let g = GROUP.min(self.n_tokens - t0);
        t0 * nb + b * g + (t - t0)
    }

    /// Token `t`'s block `b`: its 32 quantized values and scale.
    fn block(&self, t: usize, b: usize) -> (&[i8], f32) {
        let i = self.block_index(t, b);
        (&self.qs[32 * i..32 * i + 32], self.d[i])
    }

    /// Quantizes `x` (`n_tokens` rows of `cols`) into `self` for products with `ty` weights
    /// (one scale per [`GgmlType::act_scale_block`](super::GgmlType::act_scale_block)
    /// values), reusing its buffers.
    pub fn quantize_for(&mut self, ty: super::GgmlType, x: &[f32], n_tokens: usize, cols: usize) {
        self.quantize_blocks(x, n_tokens, cols, ty.act_scale_block());
    }

    /// Quantizes `x` (`n_tokens` rows of `cols`) into `self` with one scale per 32 values,
    /// reusing its buffers.
    pub fn quantize_from(&mut self, x: &[f32], n_tokens: usize, cols: usize) {
        self.quantize_blocks(x, n_tokens, cols, 32);
    }

    fn quantize_blocks(&mut self, x: &[f32], n_tokens: usize, cols: usize, scale_block: usize) {
        assert_eq!(x.len(), n_tokens * cols, "activation shape");
        assert!(
            scale_block == 32 || scale_block == 256,
            "activation scale block {scale_block} (32 or 256)"
        );
        assert_eq!(
            cols % scale_block,
            0,
            "activation width must be a multiple of {scale_block}"
        );
        self.n_tokens = n_tokens;
        self.cols = cols;
        self.scale_block = scale_block;
        self.qs.resize(n_tokens * cols, 0);
        self.d.resize(n_tokens * cols / 32, 0.0);
        self.sums16.resize(n_tokens * cols / 16, 0.0);
        self.s32.resize(n_tokens * cols / 32, 0.0);
        self.q16.resize(n_tokens * cols / 32, 0);
        let nb = cols / 32;
        let simd = has_avx2();
        // Each group of GROUP tokens owns contiguous ranges of `qs`, `d` and `sums16`, so large
        // batches quantize their groups in parallel.
        let quantize_group = |(gi, ((((qs, d), sums16), s32), q16)): (usize, GroupBuffers)| {
            let t0 = gi * GROUP;
            let g = GROUP.min(n_tokens - t0);
            for tl in 0..g {
                let row = &x[(t0 + tl) * cols..(t0 + tl + 1) * cols];
                for (sb, sblk) in row.chunks_exact(scale_block).enumerate() {
                    let amax = sblk
                        .chunks_exact(32)
                        .fold(0f32, |m, blk| m.max(amax32(blk, simd)));
                    let dv = amax / 127.0;
                    for (j, blk) in sblk.chunks_exact(32).enumerate() {
                        let b = sb * (scale_block / 32) + j;
                        let i = b * g + tl;
                        let q = &mut qs[i * 32..i * 32 + 32];
                        let s = quantize_block(blk, dv, q, simd);
                        d[i] = dv;
                        s32[i] = 16.0 * dv * (s[0] + s[1]) as f32;
                        q16[i] = 16 * (s[0] + s[1]);
                        sums16[tl * 2 * nb + 2 * b] = dv * s[0] as f32;
                        sums16[tl * 2 * nb + 2 * b + 1] = dv * s[1] as f32;
                    }
                }
            }
        };
        if n_tokens >= 2 * GROUP {
            self.qs
                .par_chunks_mut(GROUP * cols)
                .zip(self.d.par_chunks_mut(GROUP * nb))
                .zip(self.sums16.par_chunks_mut(GROUP * 2 * nb))
                .zip(self.s32.par_chunks_mut(GROUP * nb))
                .zip(self.q16.par_chunks_mut(GROUP * nb))
                .enumerate()
                .for_each(quantize_group);
        } else {
            self.qs
                .chunks_mut(GROUP * cols)
                .zip(self.d.chunks_mut(GROUP * nb))
                .zip(self.sums16.chunks_mut(GROUP * 2 * nb))
                .zip(self.s32.chunks_mut(GROUP * nb))
                .zip(self.q16.chunks_mut(GROUP * nb))
                .enumerate()
                .for_each(quantize_group);
        }
    }

    /// The kernels' view of the group of tokens that starts at token `t0` (a multiple of
    /// [`GROUP`]).
    #[cfg(target_arch = "x86_64")]
    fn group(&self, t0: usize) -> super::avx2::Group {
        let cols = self.cols;
        super::avx2::Group {
            qs: self.qs[t0 * cols..].as_ptr(),
            d: self.d[t0 * cols / 32..].as_ptr(),
            s16: self.sums16[t0 * cols / 16..].as_ptr(),
            s32: self.s32[t0 * cols / 32..].as_ptr(),
            q16: self.q16[t0 * cols / 32..].as_ptr(),
            s16_stride: cols / 16,
        }
    }

    /// Quantizes `x` into a new value, with one scale per 32 values.
    pub fn quantize(x: &[f32], n_tokens: usize, cols: usize) -> Self {
        let mut a = QuantizedActs::default();
        a.quantize_from(x, n_tokens, cols);
        a
    }

    /// Quantizes `x` into a new value for products with `ty` weights.
    pub fn quantize_for_type(ty: super::GgmlType, x: &[f32], n_tokens: usize, cols: usize) -> Self {
        let mut a = QuantizedActs::default();
        a.quantize_for(ty, x, n_tokens, cols);
        a
    }
}

/// One group's slices of [`QuantizedActs`]' buffers: bytes, scales, half-block sums and offset
/// terms (float and integer).
type GroupBuffers<'a> = (
    (
        ((&'a mut [i8], &'a mut [f32]), &'a mut [f32]),
        &'a mut [f32],
    ),
    &'a mut [i32],
);

/// The largest magnitude among 32 activations (the AVX2 path gives the scalar path's value).
fn amax32(x: &[f32], simd: bool) -> f32 {
    assert!(x.len() == 32);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set when AVX2/FMA/F16C were detected; `x` holds 32.
        return unsafe { super::avx2::amax32(x.as_ptr()) };
    }
    let _ = simd;
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Quantizes 32 activations to `q` with scale `dv` (`x ≈ dv * q`, rounding half away from
/// zero as ggml's `quantize_row_q8_0` does) and returns the sums of `q` over each half. The
/// AVX2 path gives exactly the scalar path's bytes.
fn quantize_block(x: &[f32], dv: f32, q: &mut [i8], simd: bool) -> [i32; 2] {
    assert!(x.len() == 32 && q.len() == 32);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set when AVX2/FMA/F16C were detected; both slices hold 32.
        return unsafe { super::avx2::quantize_block(x.as_ptr(), dv, q.as_mut_ptr()) };
    }
    let _ = simd;
    let id = if dv > 0.0 { 1.0 / dv } else { 0.0 };
    let mut s = [0i32; 2];
    for (k, (qv, v)) in q.iter_mut().zip(x).enumerate() {
        let r = (v * id).round() as i32;
        *qv = r as i8;
        s[k / 16] += r;
    }
    s
}

/// A weight row unpacked for the dot kernels.
struct UnpackedRow {
    u: Vec<u8>,
    /// Scale per 16 weights.
    scale16: Vec<f32>,
    min16: Vec<f32>,
    signed: bool,
}

impl UnpackedRow {
    fn new(cols: usize) -> Self {
        UnpackedRow {
            u: vec![0; cols],
            scale16: vec![0.0; cols / 16],
            min16: vec![0.0; cols / 16],
            signed: false,
        }
    }
    fn load(&mut self, w: &QMatrix, r: usize) {
        self.signed = unpack_row(
            w.ty,
            w.row_bytes(r),
            &mut self.u,
            &mut self.scale16,
            &mut self.min16,
        );
    }
}

fn min_term(min16: &[f32], sums16: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks_m = min16.chunks_exact(8);
    let mut chunks_s = sums16.chunks_exact(8);
    for (m, s) in (&mut chunks_m).zip(&mut chunks_s) {
        for i in 0..8 {
            acc[i] += m[i] * s[i];
        }
    }
    let mut total: f32 = acc.iter().sum();
    for (m, s) in chunks_m.remainder().iter().zip(chunks_s.remainder()) {
        total += m * s;
    }
    total
}

fn dot_scalar(row: &UnpackedRow, x: &QuantizedActs, t: usize) -> f32 {
    let mut total = 0f32;
    for b in 0..x.cols / 32 {
        let (qs, db) = x.block(t, b);
        for h in 0..2 {
            let mut isum = 0i32;
            let u = &row.u[b * 32 + h * 16..b * 32 + h * 16 + 16];
            for (&u, &q) in u.iter().zip(&qs[h * 16..h * 16 + 16]) {
                let w = if row.signed {
                    i32::from(u as i8)
                } else {
                    i32::from(u)
                };
                isum += w * i32::from(q);
            }
            total += row.scale16[2 * b + h] * db * isum as f32;
        }
    }
    total
}

/// Whether the CPU has AVX2, FMA and F16C (checked once): the kernels here need all three, and
/// the CPU backend compiles its element-wise loops for AVX2 under the same check.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Most rows decoded together by the batched kernel: each group of tokens then passes over all
/// of them while its activations are in L1 (a group of 8 tokens of the default model's
/// 896-wide rows is 7 KB, and 8 such rows decoded another 7 KB).
const ROW_BLOCK: usize = 8;

/// Bytes of decoded rows a block may hold ([`ROW_BLOCK`] rows at most): half of a 32 KB L1,
/// the other half for a group's activations.
const ROW_BLOCK_BYTES: usize = 16 * 1024;

/// Runs `$pass!(N)` with the literal `N` equal to `$g` (1 to [`GROUP`]): the kernels take the
/// number of tokens in a group as a constant.
macro_rules! with_group_size {
    ($g:expr, $pass:ident) => {
        match $g {
            8 => $pass!(8),
            7 => $pass!(7),
            6 => $pass!(6),
            5 => $pass!(5),
            4 => $pass!(4),
            3 => $pass!(3),
            2 => $pass!(2),
            _ => $pass!(1),
        }
    };
}

/// Rows `rows` (at most [`ROW_BLOCK`]) against every token, `put(t, r, value)` receiving each
/// product. One token decodes each row in registers; a batch decodes the rows once into
/// `scratch` and passes each group of up to [`GROUP`] tokens over all of them (eight
/// accumulators and the decoded block fit in the 16 AVX2 registers).
#[cfg(target_arch = "x86_64")]
fn simd_rows(
    w: &QMatrix,
    rows: std::ops::Range<usize>,
    x: &QuantizedActs,
    scratch: &mut [super::avx2::Scratch],
    mut put: impl FnMut(usize, usize, f32),
) {
    use super::avx2::{decode_row, row_dot, row_dot1};
    if x.n_tokens == 1 {
        let grp = x.group(0);
        for r in rows {
            // SAFETY: only called when AVX2/FMA/F16C were detected; the bytes are a whole row
            // of `w.ty`, `scratch[0]` was made for `cols`, and the group is the one token of
            // `x`.
            put(0, r, unsafe {
                row_dot1(w.ty, w.row_bytes(r), &grp, &mut scratch[0])
            });
        }
        return;
    }
    assert!(rows.len() <= scratch.len(), "more rows than scratch rows");
    for (r, s) in rows.clone().zip(scratch.iter_mut()) {
        // SAFETY: only called when AVX2/FMA/F16C were detected; the bytes are a whole row of
        // `w.ty` and `s` was made for `cols`.
        unsafe { decode_row(w.ty, w.row_bytes(r), s) };
    }
    let mut t0 = 0;
    while t0 < x.n_tokens {
        let g = GROUP.min(x.n_tokens - t0);
        let grp = x.group(t0);
        for (r, s) in rows.clone().zip(scratch.iter_mut()) {
            macro_rules! pass {
                ($n:literal) => {{
                    // SAFETY: as above, `s` holds row r decoded, and tokens t0..t0 + g
                    // (g == $n) form one interleaved group of `cols` columns, as `Group`
                    // describes.
                    let v = unsafe { row_dot::<$n>(s, &grp) };
                    v.into_iter()
                        .enumerate()
                        .for_each(|(i, v)| put(t0 + i, r, v));
                }};
            }
            with_group_size!(g, pass);
        }
        t0 += g;
    }
}

/// Rows `range` of `w` against every token on the eight-row kernels ([`super::rows8`]): eight
/// rows are decoded and transposed at a time, then every group of tokens passes over them.
#[cfg(target_arch = "x86_64")]
fn rows8_range(
    w: &QMatrix,
    range: std::ops::Range<usize>,
    x: &QuantizedActs,
    r8: &mut super::rows8::Rows8,
    ptr: OutPtr,
) {
    use super::rows8::{decode_q5x4_rows8, dot_q5x4_one, dot_rows8, store_lanes, ROWS};
    let cols = x.cols;
    let rows = w.rows;
    // The block of rows at r0: how many (at most eight), a pointer to each (the last repeated
    // past the range's end; those lanes are not stored), and the bytes of the block after it,
    // to prefetch.
    let block_at = |r0: usize| {
        let n = ROWS.min(range.end - r0);
        let at: [*const u8; ROWS] =
            std::array::from_fn(|i| w.row_bytes(r0 + i.min(n - 1)).as_ptr());
        let next = (r0 + n).min(rows);
        (n, at, w.rows_bytes(next..(next + ROWS).min(rows)))
    };
    let mut r0 = range.start;
    if x.n_tokens == 1 {
        let grp = x.group(0);
        while r0 < range.end {
            let (n, rows_at, ahead) = block_at(r0);
            // SAFETY: only called when AVX2/FMA/F16C were detected; every pointer addresses a
            // whole Q5x4 row of `cols / 32` blocks, the group is x's one token, and
            // (0, r0..r0 + n) lies inside the output and is written by this task only.
            unsafe {
                let v = dot_q5x4_one(&rows_at, cols / 32, &grp, ahead);
                store_lanes(v, ptr.0.add(r0), n);
            }
            r0 += n;
        }
        return;
    }
    while r0 < range.end {
        let (n, at, ahead) = block_at(r0);
        // SAFETY: only called when AVX2/FMA/F16C were detected; the rows are whole Q5x4 rows
        // of `cols / 32` blocks, and `r8` was made for `cols`.
        unsafe { decode_q5x4_rows8(&at, cols / 32, r8, ahead) };
        let mut t0 = 0;
        while t0 < x.n_tokens {
            let gs = GROUP.min(x.n_tokens - t0);
            let grp = x.group(t0);
            let out = ptr.0.wrapping_add(t0 * rows + r0);
            macro_rules! pass {
                ($n:literal) => {{
                    // SAFETY: as above; the group holds gs == $n tokens, and (t0 + t, r0..r0 + n)
                    // for t < gs is written by this task only (row ranges are disjoint) and lies
                    // inside the output (t0 + t < n_tokens, r0 + n <= rows).
                    unsafe { dot_rows8::<$n>(r8, &grp, out, rows, n) };
                }};
            }
            with_group_size!(gs, pass);
            t0 += gs;
        }
        r0 += n;
    }
}

/// A raw pointer to the output that rayon tasks write at disjoint indices.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (token, row) cells; see `matmul_impl`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Computes every job's rows for `range`, writing through the job's output pointer.
fn run_rows(
    w: &QMatrix,
    x: &QuantizedActs,
    ptr: OutPtr,
    range: std::ops::Range<usize>,
    simd: bool,
) {
    let rows = w.rows;
    let cols = w.cols;
    #[cfg(target_arch = "x86_64")]
    if simd {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<super::avx2::Scratch>> =
                std::cell::RefCell::new((0..ROW_BLOCK).map(|_| Default::default()).collect());
        }
        if super::rows8::takes(w.ty) {
            thread_local! {
                static ROWS8: std::cell::RefCell<super::rows8::Rows8> =
                    std::cell::RefCell::new(Default::default());
            }
            ROWS8.with_borrow_mut(|r8| {
                r8.fit(cols);
                rows8_range(w, range.clone(), x, r8, ptr);
            });
            return;
        }
        SCRATCH.with_borrow_mut(|scratch| {
            for s in scratch.iter_mut() {
                s.fit(cols);
            }
            // Several groups of tokens: block rows so a group's pass over them stays in L1.
            // One group passes over each row once anyway.
            let block = if x.n_tokens > GROUP {
                (ROW_BLOCK_BYTES / cols).clamp(1, ROW_BLOCK)
            } else {
                1
            };
            let mut r0 = range.start;
            while r0 < range.end {
                let r1 = (r0 + block).min(range.end);
                simd_rows(w, r0..r1, x, scratch, |t, r, v| {
                    // SAFETY: (t, r) is written by exactly one task, since row ranges are
                    // disjoint, and t * rows + r < n_tokens * rows == the output's length.
                    unsafe { *ptr.0.add(t * rows + r) = v };
                });
                r0 = r1;
            }
        });
        return;
    }
    let _ = simd;
    let mut row = UnpackedRow::new(cols);
    for r in range {
        row.load(w, r);
        for t in 0..x.n_tokens {
            let mut v = dot_scalar(&row, x, t);
            if !row.signed {
                v -= min_term(&row.min16, &x.sums16[t * cols / 16..(t + 1) * cols / 16]);
            }
            // SAFETY: as above.
            unsafe { *ptr.0.add(t * rows + r) = v };
        }
    }
}

fn matmul_impl(jobs: &mut [(&QMatrix, &mut [f32])], x: &QuantizedActs, simd: bool, parallel: bool) {
    for (w, out) in jobs.iter() {
        assert_eq!(
            w.cols, x.cols,
            "matmul: weight has {} columns, activations {}",
            w.cols, x.cols
        );
        assert_eq!(out.len(), x.n_tokens * w.rows, "matmul: output size");
        assert_eq!(
            x.scale_block,
            w.ty.act_scale_block(),
            "matmul: {:?} weights take activations with one scale per {} values \
             (QuantizedActs::quantize_for)",
            w.ty,
            w.ty.act_scale_block()
        );
    }
    let ptrs: Vec<OutPtr> = jobs
        .iter_mut()
        .map(|(_, out)| OutPtr(out.as_mut_ptr()))
        .collect();
    if !parallel {
        for ((w, _), ptr) in jobs.iter().zip(&ptrs) {
            run_rows(w, x, *ptr, 0..w.rows, simd);
        }
        return;
    }
    // One parallel region for all jobs: chunks of rows from every matrix, enough of them to
    // balance the cores, few enough that per-task overhead stays negligible, in multiples of
    // eight rows, the eight-row kernels' unit. Batches take 32 a thread (with 8, a 32-token
    // gate|up product left one core idle for the last chunk's ~0.3 ms); passes of one group
    // are short, and 8 a thread measured faster for them.
    let total_rows: usize = jobs.iter().map(|(w, _)| w.rows).sum();
    let per_thread = if x.n_tokens > GROUP { 32 } else { 8 };
    let chunk = (total_rows / (rayon::current_num_threads() * per_thread))
        .clamp(8, 512)
        .next_multiple_of(8);
    let mut tasks: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    for (j, (w, _)) in jobs.iter().enumerate() {
        let mut r = 0;
        while r < w.rows {
            tasks.push((j, r..(r + chunk).min(w.rows)));
            r += chunk;
        }
    }
    let jobs = &*jobs;
    tasks
        .into_par_iter()
        .for_each(|(j, range)| run_rows(jobs[j].0, x, ptrs[j], range, simd));
}

/// `out[t][r] = Σ_c w[r][c] * x[t][c]` for every token `t` and row `r`, on all cores.
pub fn matmul(w: &QMatrix, x: &QuantizedActs, out: &mut [f32]) {
    matmul_impl(&mut [(w, out)], x, has_avx2(), true);
}

/// Several products of the same activations (e.g. Q, K and V) in one parallel region.
pub fn matmul_many(jobs: &mut [(&QMatrix, &mut [f32])], x: &QuantizedActs) {
    matmul_impl(jobs, x, has_avx2(), true);
}

/// The same product with the portable scalar kernel on one thread: the reference the SIMD
/// kernels are tested against.
pub fn matmul_into_scalar(w: &QMatrix, x: &QuantizedActs, out: &mut [f32]) {
    matmul_impl(&mut [(w, out)], x, false, false);
}

#[cfg(test)]
mod tests {
    use super::super::{random_matrix, GgmlType};
    use super::*;

    /// Random-looking bytes that form valid blocks of `ty` (scales kept finite and small).
    fn check(ty: GgmlType, rows: usize, cols: usize, n_tokens: usize) {
        let w = random_matrix(ty, rows, cols, rows as u64 * 31 + cols as u64);
        let x: Vec<f32> = (0..n_tokens * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0)
            .collect();
        let qa = QuantizedActs::quantize_for_type(ty, &x, n_tokens, cols);
        let mut fast = vec![0f32; n_tokens * rows];
        let mut reference = vec![0f32; n_tokens * rows];
        matmul(&w, &qa, &mut fast);
        matmul_into_scalar(&w, &qa, &mut reference);
        // Against the exact f32 product of dequantized weights and unquantized activations.
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.dequantize_row_into(r, &mut row);
            for t in 0..n_tokens {
                let exact: f32 = row.iter().zip(&x[t * cols..]).map(|(a, b)| a * b).sum();
                let got = fast[t * rows + r];
                let refv = reference[t * rows + r];
                let norm: f32 = row.iter().map(|v| v.abs()).sum::<f32>() * 3.0;
                assert!(
                    (got - refv).abs() <= 1e-4 * norm.max(1.0),
                    "{ty:?} simd {got} vs scalar {refv}"
                );
                assert!(
                    (got - exact).abs() <= 0.01 * norm.max(1.0),
                    "{ty:?} r{r} t{t}: {got} vs exact {exact}"
                );
            }
        }
    }

    /// The AVX2 quantizer must give the scalar one's bytes, scale and sums exactly, including
    /// values that land exactly on a half after scaling and blocks of zeros.
    #[test]
    fn simd_quantization_equals_scalar() {
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        for seed in 0..200u32 {
            blocks.push(std::array::from_fn(|k| {
                let i = seed * 32 + k as u32;
                ((i.wrapping_mul(2654435761) >> 8) as f32 / (1 << 24) as f32 - 0.5) * 7.0
            }));
        }
        // Scaled values land exactly on n + 0.5 in these (scales 1 and 1/2).
        blocks.push(std::array::from_fn(|k| {
            if k == 0 {
                127.0
            } else {
                k as f32 - 15.5
            }
        }));
        blocks.push(std::array::from_fn(|k| {
            if k == 0 {
                254.0
            } else {
                2.0 * k as f32 - 31.0
            }
        }));
        blocks.push([0.0; 32]);
        blocks.push(std::array::from_fn(|k| if k == 7 { -3.0 } else { 0.0 }));
        for (n, blk) in blocks.iter().enumerate() {
            let (ma, mb) = (amax32(blk, false), amax32(blk, has_avx2()));
            assert_eq!(ma.to_bits(), mb.to_bits(), "block {n}: amax");
            // The block's own scale, and a larger one as a super-block of 256 may give it.
            for dv in [ma / 127.0, ma / 127.0 * 2.7] {
                let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
                let ra = quantize_block(blk, dv, &mut a, false);
                let rb = quantize_block(blk, dv, &mut b, has_avx2());
                assert_eq!((ra, a), (rb, b), "block {n}, scale {dv}");
            }
        }
    }

    #[test]
    fn q4_0_and_q5_0_repack_losslessly() {
        // Rows of whole 128-weight groups become Q5x4, other widths Q8_0; both exactly.
        for (ty, cols, into) in [
            (GgmlType::Q4_0, 64, GgmlType::Q8_0),
            (GgmlType::Q5_0, 96, GgmlType::Q8_0),
            (GgmlType::Q4_0, 256, GgmlType::Q5x4),
            (GgmlType::Q5_0, 896, GgmlType::Q5x4),
        ] {
            let w = random_matrix(ty, 3, cols, 9);
            let packed = w.clone().into_matmul_ready("w").unwrap();
            assert_eq!(packed.ty, into, "{ty:?} with {cols} columns");
            assert_eq!(packed.row_bytes(0).len(), into.row_bytes(cols));
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..3 {
                w.dequantize_row_into(r, &mut a);
                packed.dequantize_row_into(r, &mut b);
                assert_eq!(a, b, "{ty:?} row {r}");
            }
        }
    }

    /// A token's result must not depend on the batch around it (batched and single decoding
    /// agree exactly), whatever pass width and position the token gets.
    #[test]
    fn results_do_not_depend_on_the_batch() {
        for (ty, cols) in [
            (GgmlType::Q8_0, 96),
            (GgmlType::Q4_0, 96),
            (GgmlType::Q5_0, 96),
            (GgmlType::Q4K, 512),
            (GgmlType::Q6K, 512),
            (GgmlType::Q5x4, 384),
        ] {
            let rows = 21;
            let w = random_matrix(ty, rows, cols, 7);
            let n = 13;
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0)
                .collect();
            let mut all = vec![0f32; n * rows];
            matmul(
                &w,
                &QuantizedActs::quantize_for_type(ty, &x, n, cols),
                &mut all,
            );
            for t in 0..n {
                let mut one = vec![0f32; rows];
                matmul(
                    &w,
                    &QuantizedActs::quantize_for_type(ty, &x[t * cols..(t + 1) * cols], 1, cols),
                    &mut one,
                );
                assert_eq!(one[..], all[t * rows..(t + 1) * rows], "{ty:?} token {t}");
            }
        }
    }

    #[test]
    fn kernels_agree_with_reference_on_every_type() {
        for (rows, cols, n) in [
            (1, 128, 1),
            (7, 896, 3),
            (3, 256, 17),
            (5, 4864, 9),
            (21, 384, 1),
        ] {
            check(GgmlType::Q5x4, rows, cols, n);
        }
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0] {
            for (rows, cols, n) in [
                (1, 32, 1),
                (7, 96, 3),
                (5, 64, 6),
                (33, 896, 5),
                (3, 32, 17),
            ] {
                check(ty, rows, cols, n);
            }
        }
        for ty in [GgmlType::Q4K, GgmlType::Q6K] {
            for (rows, cols, n) in [(1, 256, 1), (9, 512, 4), (17, 4864, 2), (3, 256, 19)] {
                check(ty, rows, cols, n);
            }
        }
        // Enough rows per task for full blocks of ROW_BLOCK rows, and three groups of tokens.
        for ty in [GgmlType::Q8_0, GgmlType::Q5x4] {
            check(ty, 256, 128, 17);
        }
        // Every pass width and remainder: 1..=9 tokens (8 + 1), 12 (8 + 4) and 15 (8 + 4 + 3).
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::Q5_0,
            GgmlType::Q5x4,
        ] {
            let cols = if matches!(ty, GgmlType::Q4K | GgmlType::Q6K | GgmlType::Q5x4) {
                512
            } else {
                96
            };
            for n in (1..=9).chain([12, 15]) {
                check(ty, 5, cols, n);
            }
        }
    }
}

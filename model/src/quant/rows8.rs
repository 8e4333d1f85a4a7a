//! AVX2 kernels for Q5x4 on eight weight rows at once, rows in the vector lanes.
//!
//! The kernels of [`super::avx2`] multiply one row's 32 weights with a token's 32 activations
//! and leave 8 partial sums of that row in a vector, to be converted, scaled and summed across
//! lanes: `maddubs`, `madd`, a conversion and an FMA for every 32 weights and token. Here a
//! block of eight rows is *transposed* once as it is decoded (in registers, straight from the
//! rows' bytes, [`decode_q5x4_rows8`]), so that vector `s` of block `b`
//! holds weights `4s..4s + 4` of each of the eight rows (one 32-bit lane per row), and a
//! token's activations `4s..4s + 4` are broadcast to every lane. A product then leaves the
//! eight rows' sums in the eight lanes:
//! - no sums across lanes, and the conversion and scaling are paid once per block for eight
//!   rows instead of once per row;
//! - four steps' `maddubs` results are added as 16-bit integers (at most 4 × 2 × 31 × 127 =
//!   31,496) before one `madd`;
//! - the offset of 16 is subtracted as an integer (`16 Σq`, exact) from the block's sum.
//!
//! Q8_0 gained nothing this way (measured, also with 16-bit weights and `madd` alone): its
//! products need a `sign` and a `madd` per step, since two steps' signed byte products can
//! overflow 16 bits. A first version for the K-quants ran slower than their own kernels, which
//! already sum a super-block in integers; they keep those.
//!
//! A group of up to eight tokens passes over the decoded block token by token: the weights are
//! reloaded from L1 and only the eight float sums stay in registers. One token
//! ([`dot_q5x4_one`]) decodes each row's block as the one-token kernel of [`super::avx2`] does and
//! gathers the eight rows' exact block sums into the lanes with horizontal 16-bit adds, which
//! costs less than transposing for one token (a transposing first attempt ran at 0.4x-0.9x).
//! Each row's sum over blocks is then one FMA chain in block order, whatever the number of
//! tokens or the row's place among the eight, so a token's result does not depend on its batch
//! (tested with full and partial groups of eight rows).
//!
//! The eight rows are read interleaved, which the hardware prefetcher does not follow from
//! memory (the 151,936-row output-sized matrix ran at 40% of the bandwidth), so both paths
//! prefetch the next eight rows as they go. Against the one-row kernels, `kernel_speed` measured
//! Q5x4 products 1.4x-1.8x faster at 32 tokens and 1.2x-1.6x at 8 (BENCHMARKS.md).

use std::arch::x86_64::*;

use super::avx2::{transpose8x32, Group};
use super::GgmlType;

/// Rows transposed together.
pub(super) const ROWS: usize = 8;

/// Whether `ty`'s products run on these kernels (the others keep [`super::avx2`]'s).
pub(super) fn takes(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q5x4)
}

/// Eight rows decoded and transposed by [`decode_q5x4_rows8`]: per 32-weight block, eight
/// vectors of weights (lane `r` of vector `s`: row `r`'s weights `4s..4s + 4`) and the eight
/// rows' scales.
#[derive(Default)]
pub(super) struct Rows8 {
    w: Vec<__m256i>,
    /// Scale of block `b` of row `r` at `8 * b + r`.
    dw: Vec<f32>,
    n32: usize,
    ty: Option<GgmlType>,
}

impl Rows8 {
    /// Grows the buffers for rows of `cols` weights (they never shrink).
    pub(super) fn fit(&mut self, cols: usize) {
        let n = cols / 32 * ROWS;
        if self.w.len() < n {
            // SAFETY: an all-zero __m256i is a valid value.
            let zero = unsafe { _mm256_setzero_si256() };
            self.w.resize(n, zero);
            self.dw.resize(n, 0.0);
        }
    }
}

/// Decodes and transposes eight Q5x4 rows at `rows` (each `n32` blocks) into `r8` straight from
/// their bytes, a group of four blocks at a time in registers (no per-row scratch), prefetching
/// `ahead` (the rows that come next) on the way: the hardware prefetcher does not follow eight
/// interleaved rows from memory.
///
/// # Safety
/// AVX2, FMA and F16C must be available; every pointer must address a whole Q5x4 row of `n32`
/// blocks, and `r8` must have been made for that width.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode_q5x4_rows8(
    rows: &[*const u8; ROWS],
    n32: usize,
    r8: &mut Rows8,
    ahead: &[u8],
) {
    assert!(r8.w.len() >= n32 * ROWS, "Rows8 made for a narrower row");
    r8.n32 = n32;
    r8.ty = Some(GgmlType::Q5x4);
    let groups = n32 / 4;
    let lines = ahead.len().div_ceil(64);
    let (w, dw) = (r8.w.as_mut_ptr(), r8.dw.as_mut_ptr());
    for gi in 0..groups {
        for l in gi * lines / groups..(gi + 1) * lines / groups {
            _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(64 * l) as *const i8);
        }
        for (k, d) in q5x4_scales(rows, gi).into_iter().enumerate() {
            _mm256_storeu_ps(dw.add(ROWS * (4 * gi + k)), d);
        }
        macro_rules! block {
            ($k:literal) => {{
                let mut v = [_mm256_setzero_si256(); ROWS];
                for (v, &row) in v.iter_mut().zip(rows) {
                    *v = q5x4_block::<$k>(row, gi);
                }
                let dst = w.add(ROWS * (4 * gi + $k));
                for (s, v) in transpose8x32(v).into_iter().enumerate() {
                    *dst.add(s) = v;
                }
            }};
        }
        block!(0);
        block!(1);
        block!(2);
        block!(3);
    }
}

/// The products of the eight rows in `r8` with the `NT` tokens of a group (laid out as
/// [`Group`] says), row `r` times token `t` stored at `out[t * stride + r]` for the first `n`
/// rows. Per row and token: one FMA chain over the blocks in order, of each block's exact
/// integer sum times `dw * d`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `r8` must hold rows decoded by
/// [`decode_q5x4_rows8`], the group must hold `NT` tokens of the rows' width, quantized with one
/// scale per 32 values, and `out` must have room for every value stored.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows8<const NT: usize>(
    r8: &Rows8,
    g: &Group,
    out: *mut f32,
    stride: usize,
    n: usize,
) {
    debug_assert_eq!(r8.ty, Some(GgmlType::Q5x4));
    for (t, v) in dot_q5::<NT>(r8, g).into_iter().enumerate() {
        store_lanes(v, out.add(t * stride), n);
    }
}

/// Stores the first `n` lanes of `v` at `dst`.
///
/// # Safety
/// AVX must be available and `dst` must have room for `n <= 8` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store_lanes(v: __m256, dst: *mut f32, n: usize) {
    if n == ROWS {
        _mm256_storeu_ps(dst, v);
    } else {
        let mut lanes = [0f32; ROWS];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n);
    }
}

/// Activations `4s..4s + 4` of the group's block `i` (a token's block, interleaved as
/// [`Group`] says), in every lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn act4(g: &Group, i: usize, s: usize) -> __m256i {
    _mm256_set1_epi32((g.qs.add(32 * i + 4 * s) as *const i32).read_unaligned())
}

/// [`dot_rows8`]'s products, lane `r` of result `t` being row `r` times token `t`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5<const NT: usize>(r8: &Rows8, g: &Group) -> [__m256; NT] {
    let ones = _mm256_set1_epi16(1);
    let w = r8.w.as_ptr();
    let dw = r8.dw.as_ptr();
    let mut acc = [_mm256_setzero_ps(); NT];
    for b in 0..r8.n32 {
        let wb = w.add(ROWS * b);
        let i0 = b * NT;
        let dwv = _mm256_loadu_ps(dw.add(ROWS * b));
        // Token by token, the block's eight weight vectors reloaded from L1 for each: only
        // the float sums stay in registers, so a whole group of eight fits.
        for (t, acc) in acc.iter_mut().enumerate() {
            let i = i0 + t;
            let mut p = [_mm256_setzero_si256(); 2];
            for (h, p) in p.iter_mut().enumerate() {
                for s in 4 * h..4 * h + 4 {
                    *p = _mm256_add_epi16(*p, _mm256_maddubs_epi16(*wb.add(s), act4(g, i, s)));
                }
            }
            let isum =
                _mm256_add_epi32(_mm256_madd_epi16(p[0], ones), _mm256_madd_epi16(p[1], ones));
            let v = _mm256_sub_epi32(isum, _mm256_set1_epi32(*g.q16.add(i)));
            let sd = _mm256_mul_ps(dwv, _mm256_set1_ps(*g.d.add(i)));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), sd, *acc);
        }
    }
    acc
}

/// Block `4gi + K` of a Q5x4 row at `p` as 32 unsigned bytes (the layout of
/// `formats::repack_q5x4`: a group of four blocks holds four f16 scales, a 16-byte plane of
/// fifth bits and two 32-byte planes of nibbles). Block `K` takes the low or high nibbles of
/// one 32-byte load and bit `K` of the fifth bits, moved to bit 4 with one shift.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5x4_block<const K: usize>(p: *const u8, gi: usize) -> __m256i {
    let m4 = _mm256_set1_epi8(0x0F);
    let m10 = _mm256_set1_epi8(0x10);
    let grp = p.add(88 * gi);
    let h = _mm_loadu_si128(grp.add(8) as *const __m128i);
    let hv = _mm256_set_m128i(_mm_srli_epi16(h, 4), h);
    let n = _mm256_loadu_si256(grp.add(24 + 32 * (K / 2)) as *const __m256i);
    let lo = if K % 2 == 0 {
        _mm256_and_si256(n, m4)
    } else {
        _mm256_and_si256(_mm256_srli_epi16(n, 4), m4)
    };
    let hb = match K {
        0 => _mm256_slli_epi16(hv, 4),
        1 => _mm256_slli_epi16(hv, 3),
        2 => _mm256_slli_epi16(hv, 2),
        _ => _mm256_slli_epi16(hv, 1),
    };
    _mm256_or_si256(lo, _mm256_and_si256(hb, m10))
}

/// Block `4gi + K`'s integer sums for the eight rows at `rows` against one token's block `x`
/// (lane `r`: row `r`), as exact as [`dot_q5`]'s: each row's `maddubs` sums (16-bit) are
/// added across lanes with `hadd` while they fit 16 bits (eight products of at most
/// 31 × 127), then widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5x4_sums<const K: usize>(rows: &[*const u8; ROWS], gi: usize, x: __m256i) -> __m256i {
    let mut p = [_mm256_setzero_si256(); ROWS];
    for (p, &row) in p.iter_mut().zip(rows) {
        *p = _mm256_maddubs_epi16(q5x4_block::<K>(row, gi), x);
    }
    let a01 = _mm256_hadd_epi16(p[0], p[1]);
    let a23 = _mm256_hadd_epi16(p[2], p[3]);
    let a45 = _mm256_hadd_epi16(p[4], p[5]);
    let a67 = _mm256_hadd_epi16(p[6], p[7]);
    // Per 128-bit half: two sums of rows 0, 1, 2, 3 (or 4..8), each of eight products.
    let ones = _mm256_set1_epi16(1);
    let m0 = _mm256_madd_epi16(_mm256_hadd_epi16(a01, a23), ones);
    let m1 = _mm256_madd_epi16(_mm256_hadd_epi16(a45, a67), ones);
    // Halves: (rows 0..4 | same rows) and (rows 4..8 | same); add the weights 0..16 and 16..32.
    _mm256_add_epi32(
        _mm256_permute2x128_si256(m0, m1, 0x20),
        _mm256_permute2x128_si256(m0, m1, 0x31),
    )
}

/// The four block scales of group `gi` of eight Q5x4 rows, one vector per block with the
/// rows in the lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5x4_scales(rows: &[*const u8; ROWS], gi: usize) -> [__m256; 4] {
    let mut s = [_mm_setzero_ps(); ROWS];
    for (s, &row) in s.iter_mut().zip(rows) {
        *s = _mm_cvtph_ps(_mm_loadl_epi64(row.add(88 * gi) as *const __m128i));
    }
    // Rows r and r + 4 side by side: lanes (k0..k3 | k0..k3).
    let mut v = [_mm256_setzero_ps(); 4];
    for (r, v) in v.iter_mut().enumerate() {
        *v = _mm256_set_m128(s[r + 4], s[r]);
    }
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    [
        _mm256_castpd_ps(_mm256_unpacklo_pd(
            _mm256_castps_pd(t0),
            _mm256_castps_pd(t2),
        )),
        _mm256_castpd_ps(_mm256_unpackhi_pd(
            _mm256_castps_pd(t0),
            _mm256_castps_pd(t2),
        )),
        _mm256_castpd_ps(_mm256_unpacklo_pd(
            _mm256_castps_pd(t1),
            _mm256_castps_pd(t3),
        )),
        _mm256_castpd_ps(_mm256_unpackhi_pd(
            _mm256_castps_pd(t1),
            _mm256_castps_pd(t3),
        )),
    ]
}

/// [`dot_rows8`] for one token: each of the eight Q5x4 rows at `rows` is decoded and multiplied
/// block by block in registers, as in [`super::avx2`]'s one-token kernel, and the rows' sums
/// are gathered into the lanes with horizontal adds (for one token this costs less than
/// transposing the weights). The `ahead` bytes (the rows that come next) are prefetched on the
/// way. The
/// integer sums and the FMA chain are those of the batched kernel, so the results are equal
/// bit for bit. Rows past the matrix's end may repeat a valid row; their lanes are ignored.
///
/// # Safety
/// AVX2, FMA and F16C must be available; every pointer must address a whole Q5x4 row of
/// `n32` blocks, and the group must hold one token of that width, quantized with one scale
/// per 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q5x4_one(
    rows: &[*const u8; ROWS],
    n32: usize,
    g: &Group,
    ahead: &[u8],
) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    let groups = n32 / 4;
    let lines = ahead.len().div_ceil(64);
    for gi in 0..groups {
        // The hardware prefetcher does not follow eight interleaved rows from memory (the
        // output projection's rows ran at 40% of the bandwidth): fetch the next rows' share.
        for l in gi * lines / groups..(gi + 1) * lines / groups {
            _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(64 * l) as *const i8);
        }
        let dws = q5x4_scales(rows, gi);
        let b = 4 * gi;
        let x = g.qs.add(32 * b) as *const __m256i;
        let isums = [
            q5x4_sums::<0>(rows, gi, _mm256_loadu_si256(x)),
            q5x4_sums::<1>(rows, gi, _mm256_loadu_si256(x.add(1))),
            q5x4_sums::<2>(rows, gi, _mm256_loadu_si256(x.add(2))),
            q5x4_sums::<3>(rows, gi, _mm256_loadu_si256(x.add(3))),
        ];
        for (k, (isum, dwv)) in isums.into_iter().zip(dws).enumerate() {
            let v = _mm256_sub_epi32(isum, _mm256_set1_epi32(*g.q16.add(b + k)));
            let sd = _mm256_mul_ps(dwv, _mm256_set1_ps(*g.d.add(b + k)));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), sd, acc);
        }
    }
    acc
}

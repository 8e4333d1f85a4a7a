//! AVX2 kernels for one weight row against up to eight tokens: Q8_0, Q4_0, Q5_0, Q4_K and Q6_K
//! (Q5x4 runs on [`super::rows8`]; float matrices become Q8_0 at load). Activations are 8-bit with one scale per 32 values, or per 256 for the
//! K-quants' products, as llama.cpp's Q8_K ([`super::QuantizedActs`]).
//!
//! Two paths, one decoder ([`for_each_block`], each format's decoding written once; the caller's
//! closure decides what to do with a decoded block):
//! - **one token** ([`row_dot1`], single-sequence decode, bound by memory bandwidth): each block
//!   is decoded in registers and multiplied at once;
//! - **several tokens** ([`decode_row`] + [`row_dot`]): the row is decoded once into a byte per
//!   weight (plus scales, offsets and Q6_K's integer sub-scales), then multiplied with each group
//!   of up to eight tokens. Every block's combined scale (`weight scale × token scale`) is formed
//!   for the group before the product loop, so the loop holds only the eight accumulators (no
//!   spills) and does one load, `maddubs`, `madd`, convert, broadcast and FMA per (block, token).
//!
//! For weights of the form `dw * (u - 16)` (Q5_0; Q4_0 with 8) the offset term
//! `Σ dw * 16 * d * Σq` takes one FMA per block for all eight tokens, in the loop that forms the
//! combined scales, in four interleaved chains (one chain's latency cost a fifth of the kernel). The K-quants
//! ([`row_dot_k`]) sum a super-block's eight blocks as integers, each weighted by its integer
//! sub-block scales in `madd`, and convert and scale once: two multiply-pipe operations per block
//! and token instead of four; their offsets (`min`) are applied once per token at the end. The
//! eight tokens' final horizontal sums run together ([`hsum8`]: transposed as they add, 22
//! operations instead of 48, each lane in [`hsum`]'s order).
//!
//! Both paths do the same operations in the same order per token, so a token's result never
//! depends on its batch (the worker's continuous batching relies on it; tested bit for bit). That
//! decides the kernels' shape: an order cheaper for one token (four blocks summed per
//! conversion, 1.2x faster single decode) made batches 1.1x slower, and batches are the search's
//! workload. On the development machine's Zen 3, `maddubs`, `madd`, convert, FMA and `sign`
//! (Q8_0's signed weights need it too) share two pipes, so four of them per block and token put
//! a floor of 2 cycles per 32 multiply-adds; the loop measured about 2.5.

use std::arch::x86_64::*;

use super::GgmlType;

/// A group of `NT` tokens' quantized activations (raw pointers into a
/// [`super::QuantizedActs`]), stored block-interleaved: block `b` of token `i` is at
/// `qs + 32 * (b * NT + i)` with its scale at `d + b * NT + i`, so one pointer serves every
/// token. Half-block sums stay per token: token `i`'s start at `s16 + i * s16_stride`.
#[derive(Clone, Copy)]
pub(super) struct Group {
    pub(super) qs: *const i8,
    pub(super) d: *const f32,
    pub(super) s16: *const f32,
    pub(super) s16_stride: usize,
    /// Offset terms `16 * d * Σq` per block, interleaved like `d`.
    pub(super) s32: *const f32,
    /// The same offsets as integers, `16 * Σq` per block, interleaved like `d`.
    pub(super) q16: *const i32,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
        u16::from_le_bytes([*p, *p.add(1)]),
    ))))
}

/// Block `b` of weights `w` times every token of the group. Pairs of byte products are summed
/// with weights `mult` (ones, or Q6_K's integer sub-block scales) and scaled by the block's
/// combined scales `sd[b * NT + t] = dw[b] * d[t]`, which [`row_dot`] works out for the whole
/// row before this loop: one broadcast load and one FMA per token, and no scale arithmetic
/// (nor registers held for it) among the products.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_block_u<const NT: usize, const SIGNED: bool>(
    w: __m256i,
    mult: __m256i,
    sd: *const f32,
    b: usize,
    g: &Group,
    acc: &mut [__m256; NT],
) {
    let aw = if SIGNED { _mm256_sign_epi8(w, w) } else { w };
    let xs = g.qs.add(32 * NT * b);
    let sd = sd.add(NT * b);
    for (t, acc) in acc.iter_mut().enumerate() {
        let x = _mm256_loadu_si256(xs.add(32 * t) as *const __m256i);
        let xs = if SIGNED { _mm256_sign_epi8(x, w) } else { x };
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), mult);
        *acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(p),
            _mm256_broadcast_ss(&*sd.add(t)),
            *acc,
        );
    }
}

/// 32 nibbles of 16 bytes: low nibbles to bytes 0..16, high nibbles to bytes 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Byte `i` is 0xFF where bit `i` of `x` is set (ggml's bytes_from_bits_32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits_32(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// [`hsum`] of eight vectors at once, lane `t` of the result being `hsum(v[t])` exactly: the
/// same additions in the same order (upper half plus lower, then lanes 0 + 2 and 1 + 3, then
/// those two), done eight vectors at a time by transposing as it goes (22 operations against
/// 48 for eight separate sums).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum8(v: &[__m256; 8]) -> __m256 {
    // [v_a lanes j + (j + 4) | v_b lanes j + (j + 4)] for the pairs (0,1), (2,3), (4,5), (6,7).
    let half = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x31>(a, b),
            _mm256_permute2f128_ps::<0x20>(a, b),
        )
    };
    let (p01, p23, p45, p67) = (
        half(v[0], v[1]),
        half(v[2], v[3]),
        half(v[4], v[5]),
        half(v[6], v[7]),
    );
    // [u0(a), u0(c), u1(a), u1(c) | u0(b), u0(d), u1(b), u1(d)] with u0 = t0 + t2, u1 = t1 + t3.
    let quad = |ab: __m256, cd: __m256| {
        _mm256_add_ps(_mm256_unpacklo_ps(ab, cd), _mm256_unpackhi_ps(ab, cd))
    };
    let (q0, q1) = (quad(p01, p23), quad(p45, p67));
    // [r0, r2, r4, r6 | r1, r3, r5, r7] with r = u0 + u1.
    let r = _mm256_add_ps(
        _mm256_shuffle_ps::<0x44>(q0, q1),
        _mm256_shuffle_ps::<0xEE>(q0, q1),
    );
    _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Q4_K's 12 packed scale bytes as 8 six-bit scales (bytes 0..8) and 8 six-bit mins (bytes
/// 8..16), the same unpacking as ggml's `kmask` code.
#[inline]
unsafe fn q4k_scales_mins(p: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let mut u = [0u32; 4];
    std::ptr::copy_nonoverlapping(p, u.as_mut_ptr() as *mut u8, 12);
    u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
    let aux = u[1] & KMASK1;
    u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
    u[2] = aux;
    u[0] &= KMASK1;
    u
}

/// Stores `v` (8 per-32 values) as 16 per-16 values, each repeated twice, at `dst`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_doubled(v: __m256, dst: *mut f32) {
    let lo = _mm256_unpacklo_ps(v, v); // v0 v0 v1 v1 | v4 v4 v5 v5
    let hi = _mm256_unpackhi_ps(v, v); // v2 v2 v3 v3 | v6 v6 v7 v7
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(dst.add(8), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/// One weight row decoded by [`decode_row`] for [`row_dot`] (and [`row_dot1`]'s offsets): each
/// pool thread keeps one, grown to the widest row it has met and reused row after row.
#[derive(Default)]
pub(super) struct Scratch {
    /// One byte per weight: unsigned (`weight = dw * mult * u - min`) or, for Q8_0, signed.
    u: Vec<u8>,
    /// Weight scale per 32 weights.
    dw32: Vec<f32>,
    /// Offset (`min`) per 16 weights of the K-quants.
    mins16: Vec<f32>,
    /// Q6_K's integer scale per 16 weights (the `mult` of the byte products).
    sc16: Vec<i8>,
    /// Combined scales, `dw32[b] * d[b][t]`, per block and token of a group.
    sd: Vec<f32>,
    /// Blocks of 32 in the decoded row.
    n32: usize,
    /// Storage type of the decoded row.
    ty: Option<GgmlType>,
}

impl Scratch {
    /// Grows the buffers to hold rows of `cols` weights (they never shrink).
    pub(super) fn fit(&mut self, cols: usize) {
        fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
            if v.len() < n {
                v.resize(n, T::default());
            }
        }
        grow(&mut self.u, cols);
        grow(&mut self.dw32, cols / 32);
        grow(&mut self.mins16, cols / 16);
        grow(&mut self.sc16, cols / 16);
        grow(&mut self.sd, cols / 32 * super::dot::GROUP);
    }
}

/// Decodes every 32-weight block of a row, in order, for [`decode_row`] and [`row_dot1`], which
/// do the same decoding and differ only in what they do with a block: `f(b, w, mult, dw)` gets
/// block `b`'s 32 weight bytes `w` (unsigned, or signed for Q8_0), the 16-bit multipliers of
/// their pair products `mult` (ones, or the K-quants' integer sub-block scales) and its float
/// scale `dw` (the super-block's `d` for the K-quants). The K-quants' offsets (`min`) of every
/// 16 weights go to `mins16` on the way.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `row` must hold whole blocks of `ty`, and `mins16`
/// must have room for one value per 16 weights.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn for_each_block(
    ty: GgmlType,
    row: &[u8],
    mins16: *mut f32,
    mut f: impl FnMut(usize, __m256i, __m256i, f32),
) {
    let p = row.as_ptr();
    let n32 = row.len() / ty.block_bytes() * ty.block_elems() / 32;
    let ones = _mm256_set1_epi16(1);
    match ty {
        GgmlType::Q8_0 => {
            let block = |b: usize| {
                let blk = p.add(34 * b);
                (
                    _mm256_loadu_si256(blk.add(2) as *const __m256i),
                    f16_at(blk),
                )
            };
            // Two blocks a step: both loads issue before the first product (at one token
            // this runs 1.3x faster than one block a step).
            let mut b = 0;
            while b + 2 <= n32 {
                let (w0, d0) = block(b);
                let (w1, d1) = block(b + 1);
                f(b, w0, ones, d0);
                f(b + 1, w1, ones, d1);
                b += 2;
            }
            if b < n32 {
                let (w0, d0) = block(b);
                f(b, w0, ones, d0);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let bytes = ty.block_bytes();
            let m10 = _mm256_set1_epi8(0x10);
            let mut block = |b: usize| {
                let blk = p.add(bytes * b);
                let d = f16_at(blk);
                let w = if ty == GgmlType::Q5_0 {
                    let qh =
                        u32::from_le_bytes([*blk.add(2), *blk.add(3), *blk.add(4), *blk.add(5)]);
                    _mm256_or_si256(nibbles_32(blk.add(6)), _mm256_and_si256(bits_32(qh), m10))
                } else {
                    nibbles_32(blk.add(2))
                };
                f(b, w, ones, d);
            };
            // Four blocks a step, so that a caller's per-`b % 4` state is known at compile time
            // (the offset chains of `row_dot1`).
            for gi in 0..n32 / 4 {
                for k in 0..4 {
                    block(4 * gi + k);
                }
            }
            for b in n32 / 4 * 4..n32 {
                block(b);
            }
        }
        GgmlType::Q5x4 => unreachable!("Q5x4 products run on the eight-row kernels (rows8)"),
        GgmlType::Q4K => {
            // The 6-bit sub-block scales multiply the byte products as integers (`mult`), so
            // a block's float scale is the super-block's `d`.
            let m4 = _mm256_set1_epi8(0x0F);
            for sb in 0..n32 / 8 {
                let blk = p.add(144 * sb);
                let d = f16_at(blk);
                let dmin = _mm256_set1_ps(f16_at(blk.add(2)));
                let sm = q4k_scales_mins(blk.add(4));
                let smv = _mm_loadu_si128(sm.as_ptr() as *const __m128i);
                let mn = _mm256_mul_ps(
                    dmin,
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(smv, smv))),
                );
                store_doubled(mn, mins16.add(16 * sb));
                let sc: [u8; 8] = std::mem::transmute([sm[0], sm[1]]);
                for j in 0..4 {
                    let q = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                    let b = sb * 8 + 2 * j;
                    let mult = |k: usize| _mm256_set1_epi16(i16::from(sc[k]));
                    f(b, _mm256_and_si256(q, m4), mult(2 * j), d);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    f(b + 1, hi, mult(2 * j + 1), d);
                }
            }
        }
        GgmlType::Q6K => {
            // The i8 sub-block scales multiply the byte products as integers (`mult`), so a
            // block's float scale is the super-block's `d`.
            let m4 = _mm256_set1_epi8(0x0F);
            let m30 = _mm256_set1_epi8(0x30);
            for sb in 0..n32 / 8 {
                let blk = p.add(210 * sb);
                let d = f16_at(blk.add(208));
                let d32 = _mm256_set1_ps(32.0 * d);
                let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
                let m_lo = _mm256_mul_ps(d32, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)));
                let m_hi = _mm256_mul_ps(
                    d32,
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(sc8, sc8))),
                );
                _mm256_storeu_ps(mins16.add(16 * sb), m_lo);
                _mm256_storeu_ps(mins16.add(16 * sb + 8), m_hi);
                // Block `gi`'s two halves' i8 scales, as 16-bit multipliers of their products.
                let sc = |gi: usize| mult_pair(blk.add(192 + 2 * gi));
                for n in 0..2 {
                    let ql0 = _mm256_loadu_si256(blk.add(64 * n) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(blk.add(64 * n + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                    // Block `kind` of this half: low nibbles of ql0/ql1 (kinds 0, 1) or their
                    // high nibbles (2, 3), with bits 2*kind.. of qh as bits 4 and 5.
                    let b0 = sb * 8 + 4 * n;
                    let lo0 = _mm256_and_si256(ql0, m4);
                    let h0 = _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30);
                    f(b0, _mm256_or_si256(lo0, h0), sc(4 * n), d);
                    let lo1 = _mm256_and_si256(ql1, m4);
                    let h1 = _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30);
                    f(b0 + 1, _mm256_or_si256(lo1, h1), sc(4 * n + 1), d);
                    let hi0 = _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4);
                    let h2 = _mm256_and_si256(qh, m30);
                    f(b0 + 2, _mm256_or_si256(hi0, h2), sc(4 * n + 2), d);
                    let hi1 = _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4);
                    let h3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30);
                    f(b0 + 3, _mm256_or_si256(hi1, h3), sc(4 * n + 3), d);
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("converted to Q8_0 at load"),
    }
}

/// The 16-bit multipliers of a K-quant block's pair products: its first half's i8 scale `*sc`
/// in the low 128 bits, its second half's `*sc.add(1)` in the high.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mult_pair(sc: *const u8) -> __m256i {
    _mm256_set_m128i(
        _mm_set1_epi16(i16::from(*sc.add(1) as i8)),
        _mm_set1_epi16(i16::from(*sc as i8)),
    )
}

/// Decodes one weight row into `s`: a byte per weight, the weight scale of every 32, the
/// K-quants' integer sub-block scales and their offsets (`min`) of every 16 (applied once per
/// token at the end, with one vector dot, which keeps them out of the products). A row is decoded
/// once and then multiplied with every group of tokens by [`row_dot`], whose inner loop then
/// holds no decoding masks or temporaries: its registers stay free for the eight accumulators.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `row` must hold whole blocks of `ty`, and `s` must
/// have been made for at least the row's width.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode_row(ty: GgmlType, row: &[u8], s: &mut Scratch) {
    let n32 = row.len() / ty.block_bytes() * ty.block_elems() / 32;
    assert!(s.dw32.len() >= n32, "scratch made for a narrower row");
    s.n32 = n32;
    s.ty = Some(ty);
    if ty == GgmlType::Q6K {
        for sb in 0..n32 / 8 {
            s.sc16[16 * sb..16 * sb + 16]
                .copy_from_slice(bytemuck::cast_slice(&row[210 * sb + 192..210 * sb + 208]));
        }
    } else if ty == GgmlType::Q4K {
        for sb in 0..n32 / 8 {
            let sm = q4k_scales_mins(row.as_ptr().add(144 * sb + 4));
            let sc: [u8; 8] = std::mem::transmute([sm[0], sm[1]]);
            for (j, &v) in sc.iter().enumerate() {
                // Six bits: the same value as an i8.
                s.sc16[16 * sb + 2 * j] = v as i8;
                s.sc16[16 * sb + 2 * j + 1] = v as i8;
            }
        }
    }
    let dw = s.dw32.as_mut_ptr();
    let u = s.u.as_mut_ptr();
    for_each_block(ty, row, s.mins16.as_mut_ptr(), |b, w, _, d| {
        *dw.add(b) = d;
        _mm256_storeu_si256(u.add(32 * b) as *mut __m256i, w);
    });
}

/// Dot products of the row decoded in `s` with `NT` tokens: every block's combined scale for
/// every token first (one vector product per block for eight tokens, with one FMA for the
/// offset terms of the unsigned formats), then the integer products, each weight block
/// multiplied with every token before the next is read. The K-quants go to [`row_dot_k`]. Each
/// token's sums run in the same order whatever `NT` is, so a token's result does not depend on
/// the batch it is computed in (the engine relies on batched and single decoding agreeing
/// exactly).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `s` must hold a row decoded by [`decode_row`], and
/// the group's buffers must hold `NT` tokens (laid out as [`Group`] says) of the row's width.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row_dot<const NT: usize>(s: &mut Scratch, g: &Group) -> [f32; NT] {
    if matches!(s.ty, Some(GgmlType::Q4K | GgmlType::Q6K)) {
        return row_dot_k::<NT>(s, g);
    }
    let n32 = s.n32;
    let signed = s.ty == Some(GgmlType::Q8_0);
    let dw = s.dw32.as_ptr();
    let sd = s.sd.as_mut_ptr();
    // The combined scales, and for the unsigned formats (weights `dw * (u - 16)`) each
    // token's offset term `Σ dw * 16 * d * Σq` over the blocks, in four FMA chains (blocks
    // `b % 4`; one chain's latency cost a fifth of the kernel) as [`Offsets`] sums them.
    let mut offsets = [[0f32; NT]; 4];
    if NT == 8 {
        // Block b's scales for the eight tokens; returns the broadcast weight scale.
        let scales = |b: usize| {
            let wv = _mm256_set1_ps(*dw.add(b));
            _mm256_storeu_ps(
                sd.add(8 * b),
                _mm256_mul_ps(wv, _mm256_loadu_ps(g.d.add(8 * b))),
            );
            wv
        };
        if signed {
            for b in 0..n32 {
                scales(b);
            }
        } else {
            // Unrolled by four so that the four chains stay in registers.
            let mut ov = [_mm256_setzero_ps(); 4];
            let mut b = 0;
            while b < n32 {
                for (k, ov) in ov.iter_mut().enumerate().take(n32 - b) {
                    let wv = scales(b + k);
                    *ov = _mm256_fmadd_ps(wv, _mm256_loadu_ps(g.s32.add(8 * (b + k))), *ov);
                }
                b += 4;
            }
            for (o, v) in offsets.iter_mut().zip(&ov) {
                _mm256_storeu_ps(o.as_mut_ptr(), *v);
            }
        }
    } else {
        for b in 0..n32 {
            let w = *dw.add(b);
            for (t, m) in offsets[b % 4].iter_mut().enumerate() {
                *sd.add(NT * b + t) = w * *g.d.add(NT * b + t);
                if !signed {
                    *m = w.mul_add(*g.s32.add(NT * b + t), *m);
                }
            }
        }
    }
    let sd = sd as *const f32;
    let u = s.u.as_ptr();
    let mut acc = [_mm256_setzero_ps(); NT];
    let ones = _mm256_set1_epi16(1);
    let load = |b: usize| _mm256_loadu_si256(u.add(32 * b) as *const __m256i);
    if signed {
        for b in 0..n32 {
            acc_block_u::<NT, true>(load(b), ones, sd, b, g, &mut acc);
        }
        if let Some(acc8) = as8(&acc) {
            return from8(hsum8(acc8));
        }
        return std::array::from_fn(|t| hsum(acc[t]));
    }
    for b in 0..n32 {
        acc_block_u::<NT, false>(load(b), ones, sd, b, g, &mut acc);
    }
    let half = s.ty == Some(GgmlType::Q4_0);
    if let Some(acc8) = as8(&acc) {
        // `Offsets::term` for the eight tokens at once, in the same order.
        let o: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(offsets[k].as_ptr()));
        let mut m = _mm256_add_ps(_mm256_add_ps(o[0], o[1]), _mm256_add_ps(o[2], o[3]));
        if half {
            m = _mm256_mul_ps(_mm256_set1_ps(0.5), m);
        }
        return from8(_mm256_sub_ps(hsum8(acc8), m));
    }
    std::array::from_fn(|t| {
        let m = Offsets([offsets[0][t], offsets[1][t], offsets[2][t], offsets[3][t]]);
        hsum(acc[t]) - m.term(half)
    })
}

/// `v` as eight vectors when `NT` is 8.
#[inline(always)]
fn as8<const NT: usize>(v: &[__m256; NT]) -> Option<&[__m256; 8]> {
    v.as_slice().try_into().ok()
}

/// Eight lanes as the `[f32; NT]` of an `NT == 8` kernel.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn from8<const NT: usize>(v: __m256) -> [f32; NT] {
    let mut out = [0f32; NT];
    assert_eq!(NT, 8);
    _mm256_storeu_ps(out.as_mut_ptr(), v);
    out
}

/// The four partial sums of an unsigned format's offset term `Σ dw * 16 * d * Σq` (blocks
/// `b % 4`), which [`row_dot`] and [`row_dot1`] add in the same order.
struct Offsets([f32; 4]);

impl Offsets {
    /// Adds block `b`'s `dw * s32`.
    #[inline]
    fn add(&mut self, b: usize, dw: f32, s32: f32) {
        self.0[b % 4] = dw.mul_add(s32, self.0[b % 4]);
    }

    /// The term to subtract: halved for Q4_0, whose offset is 8 (exact, a power of two).
    #[inline]
    fn term(&self, half: bool) -> f32 {
        let m = (self.0[0] + self.0[1]) + (self.0[2] + self.0[3]);
        if half {
            0.5 * m
        } else {
            m
        }
    }
}

/// [`row_dot`] for the K-quants, whose activations have one scale per super-block of 256
/// (see [`GgmlType::act_scale_block`]): a super-block's eight blocks' byte products, each
/// weighted by its integer sub-block scales (`mult`), are summed as integers, then converted
/// and scaled once. Per block and token that is two of the multiply pipes' operations
/// (`maddubs`, `madd`) and an integer add, against four for the per-block float scales of
/// the other formats.
///
/// # Safety
/// As for [`row_dot`]; the group's activations must have been quantized with one scale per
/// 256 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_k<const NT: usize>(s: &mut Scratch, g: &Group) -> [f32; NT] {
    let n32 = s.n32;
    let dw = s.dw32.as_ptr();
    let sd = s.sd.as_mut_ptr();
    // Combined scales per super-block and token (every block of a super-block carries the
    // same weight and activation scales).
    for sb in 0..n32 / 8 {
        let w = *dw.add(8 * sb);
        let d = g.d.add(NT * 8 * sb);
        if NT == 8 {
            _mm256_storeu_ps(
                sd.add(8 * sb),
                _mm256_mul_ps(_mm256_set1_ps(w), _mm256_loadu_ps(d)),
            );
        } else {
            for t in 0..NT {
                *sd.add(NT * sb + t) = w * *d.add(t);
            }
        }
    }
    let sd = sd as *const f32;
    let u = s.u.as_ptr();
    let sc = s.sc16.as_ptr();
    // The float sums are touched once per super-block: they live in memory, leaving the
    // registers to the eight integer sums and the block.
    let mut facc = [_mm256_setzero_ps(); NT];
    let fp = std::hint::black_box(facc.as_mut_ptr());
    for sb in 0..n32 / 8 {
        let mut iacc = [_mm256_setzero_si256(); NT];
        for b in 8 * sb..8 * sb + 8 {
            let w = _mm256_loadu_si256(u.add(32 * b) as *const __m256i);
            let mult = mult_pair(sc.add(2 * b) as *const u8);
            let xs = g.qs.add(32 * NT * b);
            for (t, acc) in iacc.iter_mut().enumerate() {
                let x = _mm256_loadu_si256(xs.add(32 * t) as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), mult);
                *acc = _mm256_add_epi32(*acc, p);
            }
        }
        for (t, acc) in iacc.iter().enumerate() {
            let f = fp.add(t);
            *f = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(*acc),
                _mm256_broadcast_ss(&*sd.add(NT * sb + t)),
                *f,
            );
        }
    }
    let facc = &*(fp as *const [__m256; NT]);
    let mut out: [f32; NT] = match as8(facc) {
        Some(f8) => from8(hsum8(f8)),
        None => std::array::from_fn(|t| hsum(facc[t])),
    };
    // Through memory, as the float sums: beside the offsets' eight accumulators, the sums
    // held in registers would push one of those onto the stack inside the loop.
    let out = std::hint::black_box(&mut out);
    let mins = dots_f32::<NT>(s.mins16.as_ptr(), g.s16, g.s16_stride, 2 * n32);
    for t in 0..NT {
        out[t] -= mins[t];
    }
    *out
}

/// The dot product of one weight row with a single token, decoding each block in registers
/// and multiplying it at once (for one token, writing the decoded row out as [`decode_row`]
/// does costs more than it saves). The products, scales and sums are exactly those of
/// [`row_dot`] in the same order, so single and batched decoding agree bit for bit.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `row` must hold whole blocks of `ty`, `s` must have
/// been made for at least the row's width, and the group must hold one token of that width.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row_dot1(ty: GgmlType, row: &[u8], g: &Group, s: &mut Scratch) -> f32 {
    let mins16 = s.mins16.as_mut_ptr();
    let mut acc = _mm256_setzero_ps();
    // One instantiation per signedness, so the product loop holds no branch.
    if ty == GgmlType::Q8_0 {
        for_each_block(ty, row, mins16, |b, w, mult, dw| {
            acc_block_1::<true>(w, mult, dw, b, g, &mut acc)
        });
        return hsum(acc);
    } else if matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0) {
        // The offset term as `row_dot` forms it: one FMA per block, in block order.
        let mut m = Offsets([0.0; 4]);
        for_each_block(ty, row, mins16, |b, w, mult, dw| {
            acc_block_1::<false>(w, mult, dw, b, g, &mut acc);
            m.add(b, dw, *g.s32.add(b));
        });
        return hsum(acc) - m.term(ty == GgmlType::Q4_0);
    }
    // The K-quants, as `row_dot_k`: integer sums over each super-block, then one conversion
    // and scale, and the offsets (`mins16`, `sums16`) last.
    {
        let mut iacc = _mm256_setzero_si256();
        for_each_block(ty, row, mins16, |b, w, mult, dw| {
            let x = _mm256_loadu_si256(g.qs.add(32 * b) as *const __m256i);
            iacc = _mm256_add_epi32(iacc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), mult));
            if b % 8 == 7 {
                let scale = _mm256_set1_ps(dw * *g.d.add(b));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), scale, acc);
                iacc = _mm256_setzero_si256();
            }
        });
    }
    let n16 = row.len() / ty.block_bytes() * ty.block_elems() / 16;
    hsum(acc) - dot_f32(mins16, g.s16, n16)
}

/// One token's products with block `b` of weights `w` (see [`acc_block_u`]), its combined
/// scale `dw * d` formed here.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_block_1<const SIGNED: bool>(
    w: __m256i,
    mult: __m256i,
    dw: f32,
    b: usize,
    g: &Group,
    acc: &mut __m256,
) {
    let aw = if SIGNED { _mm256_sign_epi8(w, w) } else { w };
    let x = _mm256_loadu_si256(g.qs.add(32 * b) as *const __m256i);
    let xs = if SIGNED { _mm256_sign_epi8(x, w) } else { x };
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), mult);
    *acc = _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(p),
        _mm256_set1_ps(dw * *g.d.add(b)),
        *acc,
    );
}

/// The 8 × 8 transpose of 32-bit lanes: lane `r` of result `s` is lane `s` of `v[r]` (the
/// eight-row kernels' weights, and the CPU backend's attention scores as floats).
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose8x32(v: [__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256(u0, u4, 0x20),
        _mm256_permute2x128_si256(u1, u5, 0x20),
        _mm256_permute2x128_si256(u2, u6, 0x20),
        _mm256_permute2x128_si256(u3, u7, 0x20),
        _mm256_permute2x128_si256(u0, u4, 0x31),
        _mm256_permute2x128_si256(u1, u5, 0x31),
        _mm256_permute2x128_si256(u2, u6, 0x31),
        _mm256_permute2x128_si256(u3, u7, 0x31),
    ]
}

/// The largest magnitude among the 32 floats at `x`, as `dot::amax32`'s scalar path.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `x` must hold 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn amax32(x: *const f32) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let abs = |i: usize| _mm256_andnot_ps(sign, _mm256_loadu_ps(x.add(8 * i)));
    let m = _mm256_max_ps(_mm256_max_ps(abs(0), abs(1)), _mm256_max_ps(abs(2), abs(3)));
    let m = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

/// Quantizes 32 floats at `x` to bytes at `q` with scale `dv`, as `dot::quantize_block`'s
/// scalar path does, bit for bit: the same products `v * (1 / dv)`, and rounding half away
/// from zero (`trunc(v + copysign(0.5 - ulp, v))` equals `round(v)` for every float). Returns
/// the sums of the first and second 16 bytes.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `x` and `q` must hold 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_block(x: *const f32, dv: f32, q: *mut i8) -> [i32; 2] {
    let sign = _mm256_set1_ps(-0.0);
    let v = [
        _mm256_loadu_ps(x),
        _mm256_loadu_ps(x.add(8)),
        _mm256_loadu_ps(x.add(16)),
        _mm256_loadu_ps(x.add(24)),
    ];
    let id = _mm256_set1_ps(if dv > 0.0 { 1.0 / dv } else { 0.0 });
    let half = _mm256_set1_ps(f32::from_bits(0x3EFF_FFFF)); // the float just below 0.5
    let round = |v: __m256| {
        let s = _mm256_mul_ps(v, id);
        let r = _mm256_add_ps(s, _mm256_or_ps(_mm256_and_ps(s, sign), half));
        _mm256_cvttps_epi32(_mm256_round_ps(r, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC))
    };
    let i = [round(v[0]), round(v[1]), round(v[2]), round(v[3])];
    let hsum_i = |a: __m256i| {
        let s = _mm_add_epi32(_mm256_extracti128_si256(a, 1), _mm256_castsi256_si128(a));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
        _mm_cvtsi128_si32(s)
    };
    let sums = [
        hsum_i(_mm256_add_epi32(i[0], i[1])),
        hsum_i(_mm256_add_epi32(i[2], i[3])),
    ];
    // Pack to bytes; the packs interleave 128-bit lanes, which the permute undoes.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q as *mut __m256i, p);
    sums
}

/// [`dot_f32`] of `a` with each of `NT` vectors (`b + t * stride`), with the same operations in
/// the same order per vector, so each result equals `dot_f32`'s exactly. The vectors' sums run
/// side by side: one FMA chain each, interleaved, instead of one chain after another.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_f32<const NT: usize>(
    a: *const f32,
    b: *const f32,
    stride: usize,
    n: usize,
) -> [f32; NT] {
    let mut acc = [_mm256_setzero_ps(); NT];
    let mut i = 0;
    while i + 8 <= n {
        let av = _mm256_loadu_ps(a.add(i));
        for (t, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(b.add(t * stride + i)), *acc);
        }
        i += 8;
    }
    if let (Some(acc8), true) = (as8(&acc), i == n) {
        return from8(hsum8(acc8));
    }
    let mut out = [0f32; NT];
    for t in 0..NT {
        let mut total = hsum(acc[t]);
        for j in i..n {
            total += *a.add(j) * *b.add(t * stride + j);
        }
        out[t] = total;
    }
    out
}

/// `Σ a[i] * b[i]` over `n` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc);
        i += 8;
    }
    let mut total = hsum(acc);
    while i < n {
        total += *a.add(i) * *b.add(i);
        i += 1;
    }
    total
}

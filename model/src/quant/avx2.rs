//! AVX2 kernels: each weight block is decoded into 32 unsigned (or, for Q8_0, signed) bytes in
//! registers and multiplied with up to four tokens' 8-bit activations before the next block is
//! read, so a row is read once per four tokens and never written out unpacked.

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
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
        u16::from_le_bytes([*p, *p.add(1)]),
    ))))
}

/// Block `b` of weights `w` with scale `dw`, times every token of the group. Pairs of byte
/// products are summed with weights `mult` (ones, or Q6_K's integer sub-block scales); the
/// group's combined scales `dw * d[t]` are formed together (one vector product for eight
/// tokens), leaving one broadcast load and one FMA per token.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_block_u<const NT: usize, const SIGNED: bool>(
    w: __m256i,
    mult: __m256i,
    dw: f32,
    b: usize,
    g: &Group,
    acc: &mut [__m256; NT],
) {
    let aw = if SIGNED { _mm256_sign_epi8(w, w) } else { w };
    let xs = g.qs.add(32 * NT * b);
    let ds = g.d.add(NT * b);
    let mut sd = [0f32; NT];
    if NT == 8 {
        _mm256_storeu_ps(
            sd.as_mut_ptr(),
            _mm256_mul_ps(_mm256_set1_ps(dw), _mm256_loadu_ps(ds)),
        );
    } else {
        for t in 0..NT {
            sd[t] = dw * *ds.add(t);
        }
    }
    for t in 0..NT {
        let x = _mm256_loadu_si256(xs.add(32 * t) as *const __m256i);
        let xs = if SIGNED { _mm256_sign_epi8(x, w) } else { x };
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), mult);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sd[t]), acc[t]);
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

/// Dot products of one weight row with `NT` tokens.
///
/// Offsets (the `min` of unsigned formats) are gathered per 16 weights into `mins16` while the
/// row is decoded and applied once at the end with one vector dot per token, which keeps them
/// out of the inner loop's dependency chains. Every token has one accumulator, so that eight
/// tokens fit in registers and results are identical whatever the batch.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `row` must hold whole blocks of `ty`, `mins16` must
/// have room for one value per 16 weights, and the group's buffers must hold `NT` tokens
/// (laid out as [`Group`] says) of the row's width.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row_dot<const NT: usize>(
    ty: GgmlType,
    row: &[u8],
    g: &Group,
    mins16: &mut [f32],
) -> [f32; NT] {
    // One accumulator per token for every NT, so that a token's result does not depend on the
    // batch it is computed in (the engine relies on batched and single decoding agreeing
    // exactly). With one token the FMA chain is still shorter than a block's memory time.
    let mut acc_a = [_mm256_setzero_ps(); NT];
    macro_rules! odd {
        () => {
            &mut acc_a
        };
    }
    let p = row.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let mut signed = false;
    match ty {
        GgmlType::Q8_0 => {
            signed = true;
            let block = |b: usize| {
                let blk = p.add(34 * b);
                (
                    _mm256_loadu_si256(blk.add(2) as *const __m256i),
                    f16_at(blk),
                )
            };
            let nb = row.len() / 34;
            let mut b = 0;
            while b + 2 <= nb {
                let (w0, s0) = block(b);
                acc_block_u::<NT, true>(w0, ones, s0, b, g, &mut acc_a);
                let (w1, s1) = block(b + 1);
                acc_block_u::<NT, true>(w1, ones, s1, b + 1, g, odd!());
                b += 2;
            }
            if b < nb {
                let (w0, s0) = block(b);
                acc_block_u::<NT, true>(w0, ones, s0, b, g, &mut acc_a);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let m10 = _mm256_set1_epi8(0x10);
            let five = ty == GgmlType::Q5_0;
            let bytes = ty.block_bytes();
            let mut block = |b: usize| {
                let blk = p.add(bytes * b);
                let d = f16_at(blk);
                let (w, offset) = if five {
                    let qh =
                        u32::from_le_bytes([*blk.add(2), *blk.add(3), *blk.add(4), *blk.add(5)]);
                    (
                        _mm256_or_si256(nibbles_32(blk.add(6)), _mm256_and_si256(bits_32(qh), m10)),
                        16.0,
                    )
                } else {
                    (nibbles_32(blk.add(2)), 8.0)
                };
                *mins16.get_unchecked_mut(2 * b) = offset * d;
                *mins16.get_unchecked_mut(2 * b + 1) = offset * d;
                (w, d)
            };
            let nb = row.len() / bytes;
            let mut b = 0;
            while b + 2 <= nb {
                let (w0, s0) = block(b);
                acc_block_u::<NT, false>(w0, ones, s0, b, g, &mut acc_a);
                let (w1, s1) = block(b + 1);
                acc_block_u::<NT, false>(w1, ones, s1, b + 1, g, odd!());
                b += 2;
            }
            if b < nb {
                let (w0, s0) = block(b);
                acc_block_u::<NT, false>(w0, ones, s0, b, g, &mut acc_a);
            }
        }
        GgmlType::Q4K => {
            let m4 = _mm256_set1_epi8(0x0F);
            let mut scales = [0f32; 8];
            for sb in 0..row.len() / 144 {
                let blk = p.add(144 * sb);
                let d = _mm256_set1_ps(f16_at(blk));
                let dmin = _mm256_set1_ps(f16_at(blk.add(2)));
                let u = q4k_scales_mins(blk.add(4));
                let sm = _mm_loadu_si128(u.as_ptr() as *const __m128i);
                let sc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
                let mn = _mm256_mul_ps(
                    dmin,
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(sm, sm))),
                );
                _mm256_storeu_ps(scales.as_mut_ptr(), sc);
                store_doubled(mn, mins16.as_mut_ptr().add(16 * sb));
                for j in 0..4 {
                    let q = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                    let b = sb * 8 + 2 * j;
                    acc_block_u::<NT, false>(
                        _mm256_and_si256(q, m4),
                        ones,
                        scales[2 * j],
                        b,
                        g,
                        &mut acc_a,
                    );
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    acc_block_u::<NT, false>(hi, ones, scales[2 * j + 1], b + 1, g, odd!());
                }
            }
        }
        GgmlType::Q6K => {
            let m4 = _mm256_set1_epi8(0x0F);
            let m30 = _mm256_set1_epi8(0x30);
            for sb in 0..row.len() / 210 {
                let blk = p.add(210 * sb);
                let d = f16_at(blk.add(208));
                let d32 = _mm256_set1_ps(32.0 * d);
                let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
                let m_lo = _mm256_mul_ps(d32, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)));
                let m_hi = _mm256_mul_ps(
                    d32,
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(sc8, sc8))),
                );
                _mm256_storeu_ps(mins16.as_mut_ptr().add(16 * sb), m_lo);
                _mm256_storeu_ps(mins16.as_mut_ptr().add(16 * sb + 8), m_hi);
                for n in 0..2 {
                    let ql0 = _mm256_loadu_si256(blk.add(64 * n) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(blk.add(64 * n + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                    // Group `kind` of this half: low nibbles of ql0/ql1 (kinds 0, 1) or their high
                    // nibbles (2, 3), and bits 2*kind.. of qh as bits 4 and 5.
                    // The two halves' i8 scales, as 16-bit multipliers of their byte products.
                    let sc = |gi: usize| {
                        let lo = _mm_set1_epi16(i16::from(*blk.add(192 + 2 * gi) as i8));
                        _mm256_set_m128i(
                            _mm_set1_epi16(i16::from(*blk.add(193 + 2 * gi) as i8)),
                            lo,
                        )
                    };
                    let b0 = sb * 8 + 4 * n;
                    let w0 = _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                    );
                    acc_block_u::<NT, false>(w0, sc(4 * n), d, b0, g, &mut acc_a);
                    let w1 = _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                    );
                    acc_block_u::<NT, false>(w1, sc(4 * n + 1), d, b0 + 1, g, odd!());
                    let w2 = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, m30),
                    );
                    acc_block_u::<NT, false>(w2, sc(4 * n + 2), d, b0 + 2, g, &mut acc_a);
                    let w3 = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                    );
                    acc_block_u::<NT, false>(w3, sc(4 * n + 3), d, b0 + 3, g, odd!());
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("converted to Q8_0 at load"),
    }
    let mut out = [0f32; NT];
    let n16 = row.len() / ty.block_bytes() * ty.block_elems() / 16;
    for t in 0..NT {
        out[t] = hsum(acc_a[t]);
        if !signed {
            out[t] -= dot_f32(mins16.as_ptr(), g.s16.add(t * g.s16_stride), n16);
        }
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

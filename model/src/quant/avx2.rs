//! AVX2 kernels: each weight block is decoded into 32 unsigned (or, for Q8_0, signed) bytes in
//! registers and multiplied with up to four tokens' 8-bit activations before the next block is
//! read, so a row is read once per four tokens and never written out unpacked.

use std::arch::x86_64::*;

use super::GgmlType;

/// One token's quantized activations (raw pointers into a [`super::QuantizedActs`]).
#[derive(Clone, Copy)]
pub(super) struct Tok {
    pub(super) qs: *const i8,
    pub(super) d: *const f32,
    pub(super) s16: *const f32,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([*p, *p.add(1)])))))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_block<const NT: usize, const SIGNED: bool>(w: __m256i, sv: __m256, b: usize, toks: &[Tok; NT], acc: &mut [__m256; NT]) {
    let ones = _mm256_set1_epi16(1);
    let aw = if SIGNED { _mm256_sign_epi8(w, w) } else { w };
    for t in 0..NT {
        let x = _mm256_loadu_si256(toks[t].qs.add(32 * b) as *const __m256i);
        let xs = if SIGNED { _mm256_sign_epi8(x, w) } else { x };
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);
        let s = _mm256_mul_ps(sv, _mm256_set1_ps(*toks[t].d.add(b)));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[t]);
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
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000);
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

/// Dot products of one weight row with `NT` tokens.
///
/// Offsets (the `min` of unsigned formats) are gathered per 16 weights into `mins16` while the
/// row is decoded and applied once at the end with one vector dot per token, which keeps them
/// out of the inner loop's dependency chains. Even and odd blocks go to separate accumulators
/// for the same reason.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `row` must hold whole blocks of `ty`, `mins16` must
/// have room for one value per 16 weights, and every token's buffers must cover the row's width.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row_dot<const NT: usize>(ty: GgmlType, row: &[u8], toks: &[Tok; NT], mins16: &mut [f32]) -> [f32; NT] {
    let mut acc_a = [_mm256_setzero_ps(); NT];
    let mut acc_b = [_mm256_setzero_ps(); NT];
    let p = row.as_ptr();
    let mut signed = false;
    match ty {
        GgmlType::Q8_0 => {
            signed = true;
            // Blocks in pairs, one accumulator each, so the two FMA chains overlap.
            let block = |b: usize| {
                let blk = p.add(34 * b);
                (_mm256_loadu_si256(blk.add(2) as *const __m256i), _mm256_set1_ps(f16_at(blk)))
            };
            let nb = row.len() / 34;
            let mut b = 0;
            while b + 2 <= nb {
                let (w0, s0) = block(b);
                let (w1, s1) = block(b + 1);
                acc_block::<NT, true>(w0, s0, b, toks, &mut acc_a);
                acc_block::<NT, true>(w1, s1, b + 1, toks, &mut acc_b);
                b += 2;
            }
            if b < nb {
                let (w0, s0) = block(b);
                acc_block::<NT, true>(w0, s0, b, toks, &mut acc_a);
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
                    let qh = u32::from_le_bytes([*blk.add(2), *blk.add(3), *blk.add(4), *blk.add(5)]);
                    (_mm256_or_si256(nibbles_32(blk.add(6)), _mm256_and_si256(bits_32(qh), m10)), 16.0)
                } else {
                    (nibbles_32(blk.add(2)), 8.0)
                };
                *mins16.get_unchecked_mut(2 * b) = offset * d;
                *mins16.get_unchecked_mut(2 * b + 1) = offset * d;
                (w, _mm256_set1_ps(d))
            };
            let nb = row.len() / bytes;
            let mut b = 0;
            while b + 2 <= nb {
                let (w0, s0) = block(b);
                let (w1, s1) = block(b + 1);
                acc_block::<NT, false>(w0, s0, b, toks, &mut acc_a);
                acc_block::<NT, false>(w1, s1, b + 1, toks, &mut acc_b);
                b += 2;
            }
            if b < nb {
                let (w0, s0) = block(b);
                acc_block::<NT, false>(w0, s0, b, toks, &mut acc_a);
            }
        }
        GgmlType::Q4K => {
            let m4 = _mm256_set1_epi8(0x0F);
            for sb in 0..row.len() / 144 {
                let blk = p.add(144 * sb);
                let d = f16_at(blk);
                let dmin = f16_at(blk.add(2));
                let sc = std::slice::from_raw_parts(blk.add(4), 12);
                let mut scales = [0f32; 8];
                for j in 0..8 {
                    let (s, m) = if j < 4 {
                        (sc[j] & 63, sc[j + 4] & 63)
                    } else {
                        ((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
                    };
                    scales[j] = d * f32::from(s);
                    let m = dmin * f32::from(m);
                    *mins16.get_unchecked_mut(16 * sb + 2 * j) = m;
                    *mins16.get_unchecked_mut(16 * sb + 2 * j + 1) = m;
                }
                for j in 0..4 {
                    let q = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    let b = sb * 8 + 2 * j;
                    acc_block::<NT, false>(lo, _mm256_set1_ps(scales[2 * j]), b, toks, &mut acc_a);
                    acc_block::<NT, false>(hi, _mm256_set1_ps(scales[2 * j + 1]), b + 1, toks, &mut acc_b);
                }
            }
        }
        GgmlType::Q6K => {
            let m4 = _mm256_set1_epi8(0x0F);
            let m2 = _mm256_set1_epi8(0x03);
            for sb in 0..row.len() / 210 {
                let blk = p.add(210 * sb);
                let d = f16_at(blk.add(208));
                let mut scales = [0f32; 16];
                for g in 0..16 {
                    scales[g] = d * f32::from(*blk.add(192 + g) as i8);
                    *mins16.get_unchecked_mut(16 * sb + g) = 32.0 * scales[g];
                }
                for n in 0..2 {
                    let ql0 = _mm256_loadu_si256(blk.add(64 * n) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(blk.add(64 * n + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                    let lows = [
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    ];
                    let highs = [qh, _mm256_srli_epi16(qh, 2), _mm256_srli_epi16(qh, 4), _mm256_srli_epi16(qh, 6)];
                    let group = |kind: usize| {
                        let hb = _mm256_slli_epi16(_mm256_and_si256(highs[kind], m2), 4);
                        let gi = 4 * n + kind;
                        let sv = _mm256_set_m128(_mm_set1_ps(scales[2 * gi + 1]), _mm_set1_ps(scales[2 * gi]));
                        (_mm256_or_si256(lows[kind], hb), sv, sb * 8 + gi)
                    };
                    for kind in [0, 2] {
                        let (w0, s0, b0) = group(kind);
                        let (w1, s1, b1) = group(kind + 1);
                        acc_block::<NT, false>(w0, s0, b0, toks, &mut acc_a);
                        acc_block::<NT, false>(w1, s1, b1, toks, &mut acc_b);
                    }
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("converted to Q8_0 at load"),
    }
    let mut out = [0f32; NT];
    let n16 = row.len() / ty.block_bytes() * ty.block_elems() / 16;
    for t in 0..NT {
        out[t] = hsum(_mm256_add_ps(acc_a[t], acc_b[t]));
        if !signed {
            out[t] -= dot_f32(mins16.as_ptr(), toks[t].s16, n16);
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

//! Quantized matrix products: 8-bit activations against unpacked weight rows.

use rayon::prelude::*;

use super::formats::unpack_row;
use super::QMatrix;

/// Activations of a batch of tokens quantized to 8 bits in blocks of 32, the form every
/// matmul kernel takes. Scales are symmetric (`x ≈ d * q`, `q` in -127..=127).
#[derive(Debug, Default, Clone)]
pub struct QuantizedActs {
    /// Number of token rows.
    pub n_tokens: usize,
    /// Elements per row (a multiple of 32).
    pub cols: usize,
    /// Quantized values, `n_tokens * cols`.
    qs: Vec<i8>,
    /// One scale per block of 32.
    d: Vec<f32>,
    /// `d * Σq` over each half block of 16, for the weight offsets (`min16`) of unsigned formats.
    sums16: Vec<f32>,
}

impl QuantizedActs {
    /// Quantizes `x` (`n_tokens` rows of `cols`) into `self`, reusing its buffers.
    pub fn quantize_from(&mut self, x: &[f32], n_tokens: usize, cols: usize) {
        assert_eq!(x.len(), n_tokens * cols, "activation shape");
        assert_eq!(cols % 32, 0, "activation width must be a multiple of 32");
        self.n_tokens = n_tokens;
        self.cols = cols;
        self.qs.resize(n_tokens * cols, 0);
        self.d.resize(n_tokens * cols / 32, 0.0);
        self.sums16.resize(n_tokens * cols / 16, 0.0);
        for (b, blk) in x.chunks_exact(32).enumerate() {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.qs[b * 32..b * 32 + 32];
            let mut s = [0i32; 2];
            for (i, (qv, v)) in q.iter_mut().zip(blk).enumerate() {
                let r = (v * id).round() as i32;
                *qv = r as i8;
                s[i / 16] += r;
            }
            self.d[b] = d;
            self.sums16[2 * b] = d * s[0] as f32;
            self.sums16[2 * b + 1] = d * s[1] as f32;
        }
    }

    /// Quantizes `x` into a new value.
    pub fn quantize(x: &[f32], n_tokens: usize, cols: usize) -> Self {
        let mut a = QuantizedActs::default();
        a.quantize_from(x, n_tokens, cols);
        a
    }
}

/// A weight row unpacked for the dot kernels.
struct UnpackedRow {
    u: Vec<u8>,
    /// Scale per 16 weights.
    scale16: Vec<f32>,
    /// The same scales repeated for each i32 lane of the AVX2 kernel (4 per 16 weights).
    lanes: Vec<f32>,
    min16: Vec<f32>,
    signed: bool,
}

impl UnpackedRow {
    fn new(cols: usize) -> Self {
        UnpackedRow {
            u: vec![0; cols],
            scale16: vec![0.0; cols / 16],
            lanes: vec![0.0; cols / 4],
            min16: vec![0.0; cols / 16],
            signed: false,
        }
    }
    fn load(&mut self, w: &QMatrix, r: usize) {
        self.signed = unpack_row(w.ty, w.row_bytes(r), &mut self.u, &mut self.scale16, &mut self.min16);
        for (lane4, s) in self.lanes.chunks_exact_mut(4).zip(&self.scale16) {
            lane4.fill(*s);
        }
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

fn dot_scalar(row: &UnpackedRow, qs: &[i8], d: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, db) in d.iter().enumerate() {
        for h in 0..2 {
            let mut isum = 0i32;
            for i in b * 32 + h * 16..b * 32 + h * 16 + 16 {
                let w = if row.signed { i32::from(row.u[i] as i8) } else { i32::from(row.u[i]) };
                isum += w * i32::from(qs[i]);
            }
            total += row.scale16[2 * b + h] * db * isum as f32;
        }
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Σ over blocks of `d[b] * Σ_lane lanes[8b+lane] * (Σ of 4 products)`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `u` and `qs` must hold `32 * d.len()` bytes and
    /// `lanes` `8 * d.len()` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot<const SIGNED: bool>(u: &[u8], lanes: &[f32], qs: &[i8], d: &[f32]) -> f32 {
        let nb = d.len();
        debug_assert!(u.len() >= nb * 32 && qs.len() >= nb * 32 && lanes.len() >= nb * 8);
        let ones = _mm256_set1_epi16(1);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let up = u.as_ptr();
        let xp = qs.as_ptr();
        let lp = lanes.as_ptr();
        let mut b = 0;
        while b + 2 <= nb {
            let w0 = _mm256_loadu_si256(up.add(32 * b) as *const __m256i);
            let x0 = _mm256_loadu_si256(xp.add(32 * b) as *const __m256i);
            let w1 = _mm256_loadu_si256(up.add(32 * b + 32) as *const __m256i);
            let x1 = _mm256_loadu_si256(xp.add(32 * b + 32) as *const __m256i);
            let (p0, p1) = if SIGNED {
                (
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)),
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1)),
                )
            } else {
                (_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1))
            };
            let s0 = _mm256_mul_ps(_mm256_loadu_ps(lp.add(8 * b)), _mm256_set1_ps(*d.get_unchecked(b)));
            let s1 = _mm256_mul_ps(_mm256_loadu_ps(lp.add(8 * b + 8)), _mm256_set1_ps(*d.get_unchecked(b + 1)));
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p0, ones)), s0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p1, ones)), s1, acc1);
            b += 2;
        }
        if b < nb {
            let w0 = _mm256_loadu_si256(up.add(32 * b) as *const __m256i);
            let x0 = _mm256_loadu_si256(xp.add(32 * b) as *const __m256i);
            let p0 = if SIGNED {
                _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0))
            } else {
                _mm256_maddubs_epi16(w0, x0)
            };
            let s0 = _mm256_mul_ps(_mm256_loadu_ps(lp.add(8 * b)), _mm256_set1_ps(*d.get_unchecked(b)));
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p0, ones)), s0, acc0);
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let hi = _mm256_extractf128_ps(acc, 1);
        let lo = _mm256_castps256_ps128(acc);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot_row(row: &UnpackedRow, qs: &[i8], d: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2 and FMA were detected; lengths match by construction.
        return unsafe {
            if row.signed {
                avx2::dot::<true>(&row.u, &row.lanes, qs, d)
            } else {
                avx2::dot::<false>(&row.u, &row.lanes, qs, d)
            }
        };
    }
    let _ = simd;
    dot_scalar(row, qs, d)
}

/// A raw pointer to the output that rayon tasks write at disjoint indices.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (token, row) cells; see `matmul_impl`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn matmul_impl(w: &QMatrix, x: &QuantizedActs, out: &mut [f32], simd: bool, parallel: bool) {
    assert_eq!(w.cols, x.cols, "matmul: weight has {} columns, activations {}", w.cols, x.cols);
    assert_eq!(out.len(), x.n_tokens * w.rows, "matmul: output size");
    let rows = w.rows;
    let cols = w.cols;
    let n_tokens = x.n_tokens;
    let ptr = OutPtr(out.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        let ptr = ptr;
        let mut row = UnpackedRow::new(cols);
        for r in range {
            row.load(w, r);
            for t in 0..n_tokens {
                let qs = &x.qs[t * cols..(t + 1) * cols];
                let d = &x.d[t * cols / 32..(t + 1) * cols / 32];
                let mut v = dot_row(&row, qs, d, simd);
                if !row.signed {
                    v -= min_term(&row.min16, &x.sums16[t * cols / 16..(t + 1) * cols / 16]);
                }
                // SAFETY: (t, r) is written by exactly one task, since row ranges are disjoint,
                // and t * rows + r < n_tokens * rows == out.len().
                unsafe { *ptr.0.add(t * rows + r) = v };
            }
        }
    };
    if parallel {
        // Enough chunks to balance work between cores, few enough to keep the per-task
        // overhead (a scratch row) negligible.
        let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(4, 256);
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| work(c * chunk..((c + 1) * chunk).min(rows)));
    } else {
        work(0..rows);
    }
}

/// `out[t][r] = Σ_c w[r][c] * x[t][c]` for every token `t` and row `r`, on all cores.
pub fn matmul(w: &QMatrix, x: &QuantizedActs, out: &mut [f32]) {
    matmul_impl(w, x, out, has_avx2(), true);
}

/// The same product with the portable scalar kernel on one thread: the reference the SIMD
/// kernels are tested against.
pub fn matmul_into_scalar(w: &QMatrix, x: &QuantizedActs, out: &mut [f32]) {
    matmul_impl(w, x, out, false, false);
}

#[cfg(test)]
mod tests {
    use super::super::{GgmlType, Storage};
    use super::*;

    /// Random-looking bytes that form valid blocks of `ty` (scales kept finite and small).
    fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let n = rows * ty.row_bytes(cols);
        let mut s = seed;
        let mut bytes: Vec<u8> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect();
        let bb = ty.block_bytes();
        let scale = half::f16::from_f32(0.01).to_le_bytes();
        for blk in bytes.chunks_exact_mut(bb) {
            match ty {
                GgmlType::Q6K => blk[208..210].copy_from_slice(&scale),
                GgmlType::Q4K => {
                    blk[0..2].copy_from_slice(&scale);
                    blk[2..4].copy_from_slice(&scale);
                }
                _ => blk[0..2].copy_from_slice(&scale),
            }
        }
        QMatrix::new("test", ty, rows, cols, Storage::Owned(bytes.into())).unwrap()
    }

    fn check(ty: GgmlType, rows: usize, cols: usize, n_tokens: usize) {
        let w = random_matrix(ty, rows, cols, rows as u64 * 31 + cols as u64);
        let x: Vec<f32> = (0..n_tokens * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0).collect();
        let qa = QuantizedActs::quantize(&x, n_tokens, cols);
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
                assert!((got - refv).abs() <= 1e-4 * norm.max(1.0), "{ty:?} simd {got} vs scalar {refv}");
                assert!((got - exact).abs() <= 0.01 * norm.max(1.0), "{ty:?} r{r} t{t}: {got} vs exact {exact}");
            }
        }
    }

    #[test]
    fn kernels_agree_with_reference_on_every_type() {
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0] {
            for (rows, cols, n) in [(1, 32, 1), (7, 96, 3), (33, 896, 5)] {
                check(ty, rows, cols, n);
            }
        }
        for ty in [GgmlType::Q4K, GgmlType::Q6K] {
            for (rows, cols, n) in [(1, 256, 1), (9, 512, 4), (17, 4864, 2)] {
                check(ty, rows, cols, n);
            }
        }
    }
}

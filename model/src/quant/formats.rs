//! GGML block formats: sizes, dequantisation to f32, and unpacking to the matmul form.
//!
//! Layouts follow ggml-quants.c exactly; the unit tests check each against hand-built blocks.

use half::{bf16, f16};

/// Tensor storage types Arbor reads (GGML type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, blocks of 32 with an f16 scale.
    Q4_0,
    /// 5-bit, blocks of 32 with an f16 scale.
    Q5_0,
    /// 8-bit, blocks of 32 with an f16 scale.
    Q8_0,
    /// 4-bit k-quant, super-blocks of 256 with 6-bit sub-block scales and mins.
    Q4K,
    /// 6-bit k-quant, super-blocks of 256 with 8-bit sub-block scales.
    Q6K,
    /// Arbor's own in-memory layout for Q5_0 and Q4_0 matrices, never read from a file: four
    /// 32-weight blocks (128 weights, 88 bytes, the size of four Q5_0 blocks) stored so that AVX2
    /// decodes them with a few shifts and masks. Bytes 0..8: the four f16 scales. Bytes 8..24:
    /// the fifth bits, byte `j` holding block `k`'s weight `j` in bit `k` and its weight `16 + j`
    /// in bit `4 + k`. Bytes 24..88: two 32-byte halves, half `h` holding block `2h`'s weight `j`
    /// in the low nibble of byte `j` and block `2h + 1`'s in the high nibble. A weight is
    /// `d * (q - 16)` with `q` in 0..32, exactly as in Q5_0 (Q4_0's `q - 8` is `(q + 8) - 16`).
    Q5x4,
}

impl GgmlType {
    /// Maps a GGML type id to a supported type.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            6 => GgmlType::Q5_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
            GgmlType::Q5x4 => 128,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q5_0 => 22,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
            GgmlType::Q5x4 => 88,
        }
    }

    /// Bytes of a row of `cols` elements (`cols` must be a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Activations this type's matrix products take have one scale per this many values: 256
    /// for the K-quants (as llama.cpp's Q8_K), whose integer sub-block scales then multiply
    /// integer products summed over a whole super-block; 32 for the others.
    pub fn act_scale_block(self) -> usize {
        match self {
            GgmlType::Q4K | GgmlType::Q6K => 256,
            _ => 32,
        }
    }

    /// Whether the integer matmul kernels take this type directly.
    pub fn is_matmul_native(self) -> bool {
        matches!(
            self,
            GgmlType::Q4_0
                | GgmlType::Q5_0
                | GgmlType::Q8_0
                | GgmlType::Q4K
                | GgmlType::Q6K
                | GgmlType::Q5x4
        )
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes the 6-bit scale and min of sub-block `j` of a Q4_K super-block (ggml's get_scale_min_k4).
fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Unpacks a row into one byte per weight plus a scale and offset per 16 weights, so that
/// `weight[i] = scale16[i / 16] * u[i] - min16[i / 16]`. Returns `true` when `u` holds
/// *signed* bytes (Q8_0), in which case `min16` is all zero.
pub(crate) fn unpack_row(
    ty: GgmlType,
    bytes: &[u8],
    u: &mut [u8],
    scale16: &mut [f32],
    min16: &mut [f32],
) -> bool {
    match ty {
        GgmlType::Q8_0 => {
            for (b, blk) in bytes.chunks_exact(34).enumerate() {
                let d = f16_at(blk, 0);
                u[b * 32..b * 32 + 32].copy_from_slice(&blk[2..34]);
                scale16[2 * b] = d;
                scale16[2 * b + 1] = d;
                min16[2 * b] = 0.0;
                min16[2 * b + 1] = 0.0;
            }
            true
        }
        GgmlType::Q4_0 => {
            for (b, blk) in bytes.chunks_exact(18).enumerate() {
                let d = f16_at(blk, 0);
                let out = &mut u[b * 32..b * 32 + 32];
                for j in 0..16 {
                    out[j] = blk[2 + j] & 0xF;
                    out[j + 16] = blk[2 + j] >> 4;
                }
                scale16[2 * b] = d;
                scale16[2 * b + 1] = d;
                min16[2 * b] = 8.0 * d;
                min16[2 * b + 1] = 8.0 * d;
            }
            false
        }
        GgmlType::Q5_0 => {
            for (b, blk) in bytes.chunks_exact(22).enumerate() {
                let d = f16_at(blk, 0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let out = &mut u[b * 32..b * 32 + 32];
                for j in 0..16 {
                    let q = blk[6 + j];
                    out[j] = (q & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                    out[j + 16] = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                }
                scale16[2 * b] = d;
                scale16[2 * b + 1] = d;
                min16[2 * b] = 16.0 * d;
                min16[2 * b + 1] = 16.0 * d;
            }
            false
        }
        GgmlType::Q5x4 => {
            for (g, grp) in bytes.chunks_exact(88).enumerate() {
                for k in 0..4 {
                    let d = f16_at(grp, 2 * k);
                    let b = 4 * g + k;
                    let out = &mut u[b * 32..b * 32 + 32];
                    let nib = &grp[24 + 32 * (k / 2)..24 + 32 * (k / 2) + 32];
                    for (j, o) in out.iter_mut().enumerate() {
                        let lo = if k % 2 == 0 {
                            nib[j] & 0xF
                        } else {
                            nib[j] >> 4
                        };
                        let hi = (grp[8 + j % 16] >> (k + 4 * (j / 16))) & 1;
                        *o = lo | (hi << 4);
                    }
                    scale16[2 * b] = d;
                    scale16[2 * b + 1] = d;
                    min16[2 * b] = 16.0 * d;
                    min16[2 * b + 1] = 16.0 * d;
                }
            }
            false
        }
        GgmlType::Q4K => {
            for (b, blk) in bytes.chunks_exact(144).enumerate() {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                let out = &mut u[b * 256..b * 256 + 256];
                for j in 0..4 {
                    let q = &qs[32 * j..32 * j + 32];
                    for l in 0..32 {
                        out[64 * j + l] = q[l] & 0xF;
                        out[64 * j + 32 + l] = q[l] >> 4;
                    }
                    for half in 0..2 {
                        let (sc, m) = q4k_scale_min(2 * j + half, scales);
                        let g = b * 16 + 4 * j + 2 * half;
                        scale16[g] = d * f32::from(sc);
                        scale16[g + 1] = d * f32::from(sc);
                        min16[g] = dmin * f32::from(m);
                        min16[g + 1] = dmin * f32::from(m);
                    }
                }
            }
            false
        }
        GgmlType::Q6K => {
            for (b, blk) in bytes.chunks_exact(210).enumerate() {
                let d = f16_at(blk, 208);
                let out = &mut u[b * 256..b * 256 + 256];
                for n in 0..2 {
                    let ql = &blk[64 * n..64 * n + 64];
                    let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
                    let o = &mut out[128 * n..128 * n + 128];
                    for l in 0..32 {
                        o[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        o[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                for g in 0..16 {
                    let s = d * f32::from(blk[192 + g] as i8);
                    scale16[b * 16 + g] = s;
                    min16[b * 16 + g] = 32.0 * s;
                }
            }
            false
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!(
                "float matrices are converted to Q8_0 at load (QMatrix::into_matmul_ready)"
            )
        }
    }
}

/// Dequantizes one row of `ty` into `out` (`out.len()` elements).
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            let n = out.len();
            let mut u = vec![0u8; n];
            let mut scale16 = vec![0f32; n / 16];
            let mut min16 = vec![0f32; n / 16];
            let signed = unpack_row(ty, bytes, &mut u, &mut scale16, &mut min16);
            for (i, o) in out.iter_mut().enumerate() {
                let q = if signed {
                    f32::from(u[i] as i8)
                } else {
                    f32::from(u[i])
                };
                *o = scale16[i / 16] * q - min16[i / 16];
            }
        }
    }
}

/// Appends a Q5_0 or Q4_0 row (`bytes`, a multiple of four blocks) to `out` as [`GgmlType::Q5x4`]
/// groups, losslessly: the same scales and the same `q - offset` values.
pub(crate) fn repack_q5x4(ty: GgmlType, bytes: &[u8], out: &mut Vec<u8>) {
    let bb = ty.block_bytes();
    assert!(matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0));
    assert_eq!(
        bytes.len() % (4 * bb),
        0,
        "a Q5x4 row is whole groups of four blocks"
    );
    let mut u = [0u8; 128];
    let (mut scale16, mut min16) = ([0f32; 8], [0f32; 8]);
    for grp in bytes.chunks_exact(4 * bb) {
        unpack_row(ty, grp, &mut u, &mut scale16, &mut min16);
        if ty == GgmlType::Q4_0 {
            u.iter_mut().for_each(|q| *q += 8);
        }
        for k in 0..4 {
            out.extend_from_slice(&grp[k * bb..k * bb + 2]);
        }
        for j in 0..16 {
            let mut h = 0u8;
            for k in 0..4 {
                h |= ((u[32 * k + j] >> 4) & 1) << k;
                h |= ((u[32 * k + 16 + j] >> 4) & 1) << (4 + k);
            }
            out.push(h);
        }
        for half in 0..2 {
            for j in 0..32 {
                out.push((u[64 * half + j] & 0xF) | ((u[64 * half + 32 + j] & 0xF) << 4));
            }
        }
    }
}

/// Appends `x` quantized to Q8_0 blocks (as ggml's quantize_row_q8_0_ref).
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for blk in x.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| ((v * id).round() as i8) as u8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_0_block_layout() {
        let mut blk = vec![];
        blk.extend_from_slice(&f16b(0.5));
        for j in 0..16u8 {
            blk.push(j | ((15 - j) << 4));
        }
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q4_0, &blk, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 0.5 * (15.0 - j as f32 - 8.0));
        }
    }

    #[test]
    fn q5_0_block_layout() {
        let mut blk = vec![];
        blk.extend_from_slice(&f16b(0.25));
        let qh: u32 = 0b1010_0000_0000_0000_0000_0000_0000_0101;
        blk.extend_from_slice(&qh.to_le_bytes());
        for j in 0..16u8 {
            blk.push(j | (j << 4));
        }
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q5_0, &blk, &mut out);
        for (j, &v) in out.iter().enumerate() {
            let hi = (qh >> j) & 1;
            let q = (j % 16) as u32 | (hi << 4);
            assert_eq!(v, 0.25 * (q as f32 - 16.0), "element {j}");
        }
    }

    #[test]
    fn q8_0_round_trip() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        let mut q = vec![];
        quantize_row_q8_0(&x, &mut q);
        assert_eq!(q.len(), 68);
        let mut back = vec![0f32; 64];
        dequantize_row(GgmlType::Q8_0, &q, &mut back);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() < 0.03, "{a} vs {b}");
        }
    }

    #[test]
    fn q4k_matches_reference_formula() {
        // Build a super-block with distinct scales/mins and check element 0 of every sub-block
        // and a few interior elements against ggml's dequantize_row_q4_K written out literally.
        let mut blk = vec![0u8; 144];
        blk[0..2].copy_from_slice(&f16b(0.5));
        blk[2..4].copy_from_slice(&f16b(0.125));
        for (i, b) in blk[4..16].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(29).wrapping_add(7) ^ 0x5a;
        }
        for (i, b) in blk[16..].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(13).wrapping_add(3);
        }
        let mut out = vec![0f32; 256];
        dequantize_row(GgmlType::Q4K, &blk, &mut out);
        // Literal port of ggml's reference.
        let d = 0.5f32;
        let dmin = 0.125f32;
        let mut expected = vec![0f32; 256];
        let mut is = 0;
        let mut qi = 16;
        let mut y = 0;
        for _ in 0..4 {
            let (sc, m) = q4k_scale_min(is, &blk[4..16]);
            let (d1, m1) = (d * sc as f32, dmin * m as f32);
            let (sc, m) = q4k_scale_min(is + 1, &blk[4..16]);
            let (d2, m2) = (d * sc as f32, dmin * m as f32);
            for l in 0..32 {
                expected[y + l] = d1 * (blk[qi + l] & 0xF) as f32 - m1;
            }
            for l in 0..32 {
                expected[y + 32 + l] = d2 * (blk[qi + l] >> 4) as f32 - m2;
            }
            qi += 32;
            is += 2;
            y += 64;
        }
        assert_eq!(out, expected);
    }

    #[test]
    fn q6k_matches_reference_formula() {
        let mut blk = vec![0u8; 210];
        for (i, b) in blk.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(101).wrapping_add(17);
        }
        blk[208..210].copy_from_slice(&f16b(0.0625));
        let mut out = vec![0f32; 256];
        dequantize_row(GgmlType::Q6K, &blk, &mut out);
        let d = 0.0625f32;
        let mut expected = vec![0f32; 256];
        for n in 0..2 {
            let ql = &blk[64 * n..];
            let qh = &blk[128 + 32 * n..];
            let sc = &blk[192 + 8 * n..];
            let y = &mut expected[128 * n..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
        for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "element {i}: {a} vs {b}"
            );
        }
    }
}

//! Weights on the device, in as few bits as each matrix needs, exactly: every GGUF type
//! unpacks to an unsigned integer per weight plus a `(scale, min)` pair per 16 weights
//! (`QMatrix::unpack_row_unsigned`, `W = scale * u - min`), and each row chunk is stored in
//! the smallest [`Format`] that holds those values without change. Q|K|V and gate|up are
//! fused; matrices past the largest storage binding (or one dispatch's reach) are split into
//! row chunks.

use rayon::prelude::*;
use wgpu::util::DeviceExt;

use super::{MAX_WORKGROUPS_PER_DIM, ROWS_PER_WG};
use crate::error::{ModelError, Result};
use crate::quant::QMatrix;

/// How a chunk's weights are laid out; the matrix kernels decode it (`wgroup` and `wscale` in
/// `matmul_common.wgsl`), so every format gives the same values, bit for bit.
///
/// - `bits` 8: a byte per weight, 16 to a 16-byte word (one per 16-weight group).
/// - `bits` 4, 5 or 6 (rows of a multiple of 32 columns whose integers fit): per 32 weights,
///   one 16-byte word of low nibbles (weight `j` in bits `4 (j % 8)` of 32-bit word `j / 8`),
///   and after all of those, `bits - 4` 32-bit bit planes per 32 weights (plane `k` holds bit
///   `4 + k` of weight `j` in bit `j`).
/// - `(scale, min)` per 32 weights where both 16-weight halves share it (Q4_K, Q5_0, Q8_0
///   blocks), else per 16; as two f16 (scale in the low half) where both convert exactly, else
///   two f32.
///
/// The default model (mostly Q5_0) takes 0.92 bytes a weight this way against 1.5 as bytes with f32
/// pairs per 16 (Q5_0 0.75, Q8_0 1.125, Q6_K 1.25, Q4_K 0.75); [`super::WgpuOptions::byte_weights`]
/// keeps that older form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Format {
    pub(super) bits: u32,
    pub(super) pair_per_32: bool,
    pub(super) pair_f16: bool,
}

impl Format {
    /// The form every matrix had before packing: a byte a weight, f32 pairs per 16.
    pub(super) const BYTES: Format = Format {
        bits: 8,
        pair_per_32: false,
        pair_f16: false,
    };

    /// The word the kernels read (`Params::fmt`): bits, then flags at bits 8 and 9.
    pub(super) fn word(self) -> u32 {
        self.bits | (self.pair_per_32 as u32) << 8 | (self.pair_f16 as u32) << 9
    }

    /// The smallest format that holds `u` (the integers of rows of `cols` weights) and `sm`
    /// (their pairs per 16) exactly.
    pub(super) fn fitting(cols: usize, u: &[u8], sm: &[[f32; 2]]) -> Format {
        let whole_units = cols % 32 == 0;
        let top = u.iter().fold(0u8, |m, &v| m | v);
        let bits = match top {
            _ if !whole_units => 8,
            0..=15 => 4,
            16..=31 => 5,
            32..=63 => 6,
            _ => 8,
        };
        let pair_per_32 = whole_units
            && sm.chunks_exact(2).all(|p| {
                p[0][0].to_bits() == p[1][0].to_bits() && p[0][1].to_bits() == p[1][1].to_bits()
            });
        let pair_f16 = sm.iter().flatten().all(|&v| {
            let h = half::f16::from_f32(v);
            h.is_finite() && h.to_f32().to_bits() == v.to_bits()
        });
        Format {
            bits,
            pair_per_32,
            pair_f16,
        }
    }

    /// `u` (rows of `cols` integers) in this format, as the 32-bit words of the buffer (a
    /// multiple of four, since the kernels read 16-byte words).
    pub(super) fn pack_weights(self, cols: usize, u: &[u8]) -> Vec<u32> {
        let mut out;
        if self.bits == 8 {
            out = u
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<u32>>();
        } else {
            debug_assert!(cols % 32 == 0);
            let units = u.len() / 32;
            let extra = (self.bits - 4) as usize;
            out = vec![0u32; units * (4 + extra)];
            let (nibbles, planes) = out.split_at_mut(units * 4);
            // Units in parallel: a large model packs hundreds of millions of weights.
            nibbles
                .par_chunks_mut(4)
                .zip(u.par_chunks(32))
                .for_each(|(n, w)| {
                    for (j, &v) in w.iter().enumerate() {
                        n[j / 8] |= (v as u32 & 15) << (4 * (j % 8));
                    }
                });
            if extra > 0 {
                planes
                    .par_chunks_mut(extra)
                    .zip(u.par_chunks(32))
                    .for_each(|(pl, w)| {
                        for (j, &v) in w.iter().enumerate() {
                            for (p, word) in pl.iter_mut().enumerate() {
                                *word |= ((v as u32 >> (4 + p)) & 1) << j;
                            }
                        }
                    });
            }
        }
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    /// `sm` (pairs per 16 weights, rows of `cols` weights) in this format, as 32-bit words (an
    /// even number: the kernels read them in pairs).
    pub(super) fn pack_pairs(self, cols: usize, sm: &[[f32; 2]]) -> Vec<u32> {
        let groups = cols / 16;
        let step = if self.pair_per_32 { 2 } else { 1 };
        let pairs = sm
            .chunks_exact(groups)
            .flat_map(|row| row.iter().step_by(step));
        let mut out: Vec<u32> = if self.pair_f16 {
            pairs
                .map(|&[s, m]| {
                    half::f16::from_f32(s).to_bits() as u32
                        | (half::f16::from_f32(m).to_bits() as u32) << 16
                })
                .collect()
        } else {
            pairs
                .flat_map(|&[s, m]| [s.to_bits(), m.to_bits()])
                .collect()
        };
        out.resize(out.len().next_multiple_of(2), 0);
        out
    }
}

/// Rows `start..start + rows` of a matrix on the device.
pub(super) struct Chunk {
    pub(super) start: usize,
    pub(super) rows: usize,
    pub(super) format: Format,
    /// The integers, in `format`.
    pub(super) q: wgpu::Buffer,
    /// The `(scale, min)` pairs, in `format`.
    pub(super) sm: wgpu::Buffer,
}

/// One weight matrix on the device, possibly in row chunks.
pub(super) struct GpuMatrix {
    pub(super) cols: usize,
    pub(super) chunks: Vec<Chunk>,
}

impl GpuMatrix {
    /// Bytes on the device: what a product reads.
    pub(super) fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.q.size() + c.sm.size()).sum()
    }
}

pub(super) struct GpuLayer {
    pub(super) attn_norm: wgpu::Buffer,
    pub(super) qkv: GpuMatrix,
    pub(super) qkv_bias: Option<wgpu::Buffer>,
    pub(super) wo: GpuMatrix,
    pub(super) ffn_norm: wgpu::Buffer,
    pub(super) gate_up: GpuMatrix,
    pub(super) down: GpuMatrix,
}

/// Uploads weights into device buffers.
pub(super) struct Uploader<'a> {
    pub(super) device: &'a wgpu::Device,
    pub(super) max_chunk: u64,
    /// Keep every chunk in [`Format::BYTES`] ([`super::WgpuOptions::byte_weights`]).
    pub(super) bytes_only: bool,
}

impl Uploader<'_> {
    pub(super) fn f32(&self, label: &str, v: &[f32]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(v),
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    /// Uploads the row-wise concatenation of `parts` (same column count) in the unsigned-byte
    /// form, split into chunks that each fit one storage binding.
    pub(super) fn matrix(&self, name: &str, parts: &[&QMatrix]) -> Result<GpuMatrix> {
        let rows = parts.iter().flat_map(|m| (0..m.rows).map(move |r| (*m, r)));
        self.upload(name, parts, rows)
    }

    /// Uploads `gate` and `up` with their rows interleaved (gate 0, up 0, gate 1, ...), for
    /// the product that writes `silu(gate) * up` (`Fused::swiglu`). Chunks hold whole pairs.
    pub(super) fn matrix_pairs(
        &self,
        name: &str,
        gate: &QMatrix,
        up: &QMatrix,
    ) -> Result<GpuMatrix> {
        if gate.rows != up.rows {
            return Err(ModelError::tensor(
                name,
                format!("gate has {} rows and up {}", gate.rows, up.rows),
            ));
        }
        let rows = (0..gate.rows).flat_map(|r| [(gate, r), (up, r)]);
        self.upload(name, &[gate, up], rows)
    }

    pub(super) fn upload<'m>(
        &self,
        name: &str,
        parts: &[&QMatrix],
        mut all_rows: impl Iterator<Item = (&'m QMatrix, usize)>,
    ) -> Result<GpuMatrix> {
        let cols = parts[0].cols;
        if parts.iter().any(|m| m.cols != cols) || cols % 16 != 0 {
            return Err(ModelError::tensor(
                name,
                "fused matrices must share a column count that is a multiple of 16",
            ));
        }
        let rows: usize = parts.iter().map(|m| m.rows).sum();
        // Rows per chunk: the byte array is the larger of the two buffers (`cols` bytes a row).
        // A multiple of the rows of a workgroup, which is even: chunks hold whole row pairs.
        // And at most what one dispatch reaches: the one-row kernel's `rows / 4` workgroups
        // must stay within WebGPU's 65,535 a dimension (a vocabulary past 262,140 rows).
        let wg = ROWS_PER_WG as usize;
        let per_chunk = (self.max_chunk as usize / cols / wg * wg)
            .clamp(wg, MAX_WORKGROUPS_PER_DIM as usize * wg);
        let mut chunks = Vec::new();
        let mut start = 0;
        let mut u = vec![0u8; cols];
        let mut sm = vec![[0f32; 2]; cols / 16];
        while start < rows {
            let n = per_chunk.min(rows - start);
            let mut q = Vec::with_capacity(n * cols);
            let mut s = Vec::with_capacity(n * cols / 16);
            for (m, r) in all_rows.by_ref().take(n) {
                m.unpack_row_unsigned(r, &mut u, &mut sm);
                q.extend_from_slice(&u);
                s.extend_from_slice(&sm);
            }
            let format = if self.bytes_only {
                Format::BYTES
            } else {
                Format::fitting(cols, &q, &s)
            };
            let buffer = |words: &[u32]| {
                self.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(name),
                        contents: bytemuck::cast_slice(words),
                        usage: wgpu::BufferUsages::STORAGE,
                    })
            };
            chunks.push(Chunk {
                start,
                rows: n,
                format,
                q: buffer(&format.pack_weights(cols, &q)),
                sm: buffer(&format.pack_pairs(cols, &s)),
            });
            start += n;
        }
        Ok(GpuMatrix { cols, chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::Format;
    use crate::quant::{random_matrix, GgmlType};

    /// matmul_common.wgsl's `wgroup` and `wscale`, on the host: group `g` of row `r`.
    fn decode(
        f: Format,
        cols: usize,
        rows: usize,
        q: &[u32],
        sm: &[u32],
        r: usize,
        g: usize,
    ) -> ([u8; 16], [f32; 2]) {
        let groups = cols / 16;
        let mut w = [0u8; 16];
        if f.bits == 8 {
            for (j, b) in w.iter_mut().enumerate() {
                *b = (q[(r * groups + g) * 4 + j / 4] >> (8 * (j % 4))) as u8;
            }
        } else {
            let unit = r * groups / 2 + g / 2;
            let half = g % 2;
            let extra = (f.bits - 4) as usize;
            let planes = rows * groups / 2 * 4;
            for (j, b) in w.iter_mut().enumerate() {
                let i = 16 * half + j;
                let mut v = (q[unit * 4 + i / 8] >> (4 * (i % 8))) & 15;
                for k in 0..extra {
                    v |= ((q[planes + unit * extra + k] >> i) & 1) << (4 + k);
                }
                *b = v as u8;
            }
        }
        let e = if f.pair_per_32 {
            r * groups / 2 + g / 2
        } else {
            r * groups + g
        };
        let pair = if f.pair_f16 {
            let h = |b: u32| half::f16::from_bits(b as u16).to_f32();
            [h(sm[e] & 0xffff), h(sm[e] >> 16)]
        } else {
            [f32::from_bits(sm[2 * e]), f32::from_bits(sm[2 * e + 1])]
        };
        (w, pair)
    }

    #[test]
    fn every_gguf_type_packs_into_its_fewest_bits_and_decodes_exactly() {
        let (rows, cols) = (6, 512);
        // (type, bits, a pair per 32, pairs in f16)
        let cases = [
            (GgmlType::Q4K, 4, true, false),
            (GgmlType::Q4_0, 4, true, true),
            (GgmlType::Q5_0, 5, true, true),
            (GgmlType::Q6K, 6, false, false),
            (GgmlType::Q8_0, 8, true, true),
        ];
        for (ty, bits, per_32, f16) in cases {
            let m = random_matrix(ty, rows, cols, 7);
            let mut u = vec![0u8; rows * cols];
            let mut sm = vec![[0f32; 2]; rows * cols / 16];
            for r in 0..rows {
                m.unpack_row_unsigned(
                    r,
                    &mut u[r * cols..(r + 1) * cols],
                    &mut sm[r * cols / 16..(r + 1) * cols / 16],
                );
            }
            let f = Format::fitting(cols, &u, &sm);
            assert_eq!(
                (f.bits, f.pair_per_32, f.pair_f16),
                (bits, per_32, f16),
                "{ty:?}"
            );
            for f in [f, Format::BYTES] {
                let q = f.pack_weights(cols, &u);
                let s = f.pack_pairs(cols, &sm);
                assert_eq!(q.len() % 4, 0);
                assert_eq!(s.len() % 2, 0);
                for r in 0..rows {
                    for g in 0..cols / 16 {
                        let (w, pair) = decode(f, cols, rows, &q, &s, r, g);
                        let at = r * cols + g * 16;
                        assert_eq!(&w[..], &u[at..at + 16], "{ty:?} {f:?} row {r} group {g}");
                        let want = sm[r * cols / 16 + g];
                        assert_eq!(
                            pair.map(f32::to_bits),
                            want.map(f32::to_bits),
                            "{ty:?} {f:?} row {r} group {g}"
                        );
                    }
                }
            }
        }
        // Rows of 16 columns (no whole 32-weight units) keep a byte a weight and pairs per 16.
        let u = vec![3u8; 32];
        let sm = vec![[0.5f32, 0.25]; 2];
        let f = Format::fitting(16, &u, &sm);
        assert_eq!((f.bits, f.pair_per_32), (8, false));
        // A pair no f16 holds exactly keeps f32.
        let sm = vec![[0.1f32, 0.0]; 2];
        assert!(!Format::fitting(32, &u, &sm).pair_f16);
    }
}

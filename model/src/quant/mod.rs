//! Tensor storage types, dequantisation, and the quantized matrix product used by the CPU backend.
//!
//! Weights stay in their GGUF block formats in memory. A matrix product decodes a weight row
//! (the portable path: one unsigned byte per weight, a scale and an offset per 16 weights), then
//! takes integer dot products of it with activations quantized to 8 bits with one scale per 32
//! values, or per 256 for the K-quants ([`QuantizedActs`]). Decoding a row once and reusing it
//! for every token in the batch is what makes batched decoding cheaper per token than single
//! decoding.
//!
//! At load ([`QMatrix::into_matmul_ready`]) Q4_0 and Q5_0 rows of whole 128-weight groups are
//! repacked losslessly into Q5x4, Arbor's own layout in Q5_0's bytes: per four blocks, their four
//! f16 scales together, their fifth bits in one 16-byte plane (one shift per block puts a block's
//! bit in place) and two blocks' nibbles per 32 bytes, 88 bytes per 128 weights (0.69 bytes a
//! weight against Q8_0's 1.06). It decodes in a few vector operations a block instead of Q5_0's
//! bit gathering; single-sequence decode is bound by memory bandwidth, so bytes are speed. Other
//! widths and the float types become Q8_0.
//!
//! Where to read on: `formats.rs` (block layouts, the scalar reference), `dot.rs` (activations,
//! the row loop and its threads), `avx2.rs` (one row against eight tokens), `rows8.rs` (Q5x4 on
//! eight rows at once).

#[cfg(target_arch = "x86_64")]
mod avx2;
mod dot;
mod formats;
#[cfg(target_arch = "x86_64")]
mod rows8;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::transpose8x32;
pub(crate) use dot::has_avx2;
pub use dot::{matmul, matmul_into_scalar, matmul_many, QuantizedActs};
pub use formats::{dequantize_row, quantize_row_q8_0, GgmlType};

use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{ModelError, Result};

/// Bytes of a tensor: borrowed from the memory-mapped file, or owned after a conversion.
#[derive(Clone)]
pub enum Storage {
    /// A range of a mapped file.
    Mapped {
        /// The mapping, shared by every tensor of the file.
        mmap: Arc<Mmap>,
        /// Start of the tensor's bytes.
        offset: usize,
        /// Length in bytes.
        len: usize,
    },
    /// Bytes owned by the tensor (converted from another type at load).
    Owned(Arc<[u8]>),
}

impl Storage {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped { mmap, offset, len } => &mmap[*offset..*offset + *len],
            Storage::Owned(b) => b,
        }
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Mapped { offset, len, .. } => write!(f, "Mapped({offset}..+{len})"),
            Storage::Owned(b) => write!(f, "Owned({} bytes)", b.len()),
        }
    }
}

/// A 2-D weight matrix `[rows, cols]` in one of the block formats; rows are contiguous.
#[derive(Debug, Clone)]
pub struct QMatrix {
    /// Storage type of every row.
    pub ty: GgmlType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Number of columns (input features); a multiple of the type's block size.
    pub cols: usize,
    storage: Storage,
}

impl QMatrix {
    /// Wraps raw bytes as a matrix after checking that their size matches the shape.
    pub fn new(
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        storage: Storage,
    ) -> Result<Self> {
        if cols % ty.block_elems() != 0 {
            return Err(ModelError::tensor(
                name,
                format!("{cols} columns is not a multiple of the {ty:?} block size"),
            ));
        }
        let expected = rows * ty.row_bytes(cols);
        let got = storage.bytes().len();
        if expected != got {
            return Err(ModelError::tensor(
                name,
                format!("expected {expected} bytes for [{rows}, {cols}] {ty:?}, found {got}"),
            ));
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            storage,
        })
    }

    /// Re-stores a matrix in the form the matmul kernels run fastest on.
    ///
    /// F32/F16/BF16 become Q8_0 (as llama.cpp quantizes activations' partners). Q4_0 and Q5_0
    /// become [`GgmlType::Q5x4`] when a row is whole groups of 128 weights, *losslessly* (same
    /// scales, same `q - offset` values) and in the same bytes as Q5_0: single-token decoding is
    /// bound by memory bandwidth, and Q5x4's fifth bits and nibbles decode in a few vector
    /// operations instead of Q5_0's bit gathering. Other widths become Q8_0, also losslessly:
    /// their values `q - offset` lie in -16..=15, which Q8_0 holds exactly with the same scale.
    pub fn into_matmul_ready(self, name: &str) -> Result<Self> {
        match self.ty {
            GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K | GgmlType::Q5x4 => return Ok(self),
            GgmlType::Q4_0 | GgmlType::Q5_0 if self.cols % 128 == 0 => {
                let mut out = Vec::with_capacity(self.rows * GgmlType::Q5x4.row_bytes(self.cols));
                for r in 0..self.rows {
                    formats::repack_q5x4(self.ty, self.row_bytes(r), &mut out);
                }
                return QMatrix::new(
                    name,
                    GgmlType::Q5x4,
                    self.rows,
                    self.cols,
                    Storage::Owned(out.into()),
                );
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let mut out = Vec::with_capacity(self.rows * GgmlType::Q8_0.row_bytes(self.cols));
                let mut u = vec![0u8; self.cols];
                let mut scale16 = vec![0f32; self.cols / 16];
                let mut min16 = vec![0f32; self.cols / 16];
                let offset = if self.ty == GgmlType::Q5_0 { 16 } else { 8 };
                let block_bytes = self.ty.block_bytes();
                for r in 0..self.rows {
                    let bytes = self.row_bytes(r);
                    formats::unpack_row(self.ty, bytes, &mut u, &mut scale16, &mut min16);
                    for (b, blk) in bytes.chunks_exact(block_bytes).enumerate() {
                        out.extend_from_slice(&blk[0..2]);
                        out.extend(
                            u[b * 32..b * 32 + 32]
                                .iter()
                                .map(|&q| (q as i8 - offset) as u8),
                        );
                    }
                }
                return QMatrix::new(
                    name,
                    GgmlType::Q8_0,
                    self.rows,
                    self.cols,
                    Storage::Owned(out.into()),
                );
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
        }
        let mut row = vec![0f32; self.cols];
        let mut out = Vec::with_capacity(self.rows * GgmlType::Q8_0.row_bytes(self.cols));
        for r in 0..self.rows {
            dequantize_row(self.ty, self.row_bytes(r), &mut row);
            quantize_row_q8_0(&row, &mut out);
        }
        QMatrix::new(
            name,
            GgmlType::Q8_0,
            self.rows,
            self.cols,
            Storage::Owned(out.into()),
        )
    }

    /// The bytes of row `r`.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let n = self.ty.row_bytes(self.cols);
        &self.storage.bytes()[r * n..(r + 1) * n]
    }

    /// The bytes of rows `range`, which are contiguous.
    pub(crate) fn rows_bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        let n = self.ty.row_bytes(self.cols);
        &self.storage.bytes()[range.start * n..range.end * n]
    }

    /// Dequantizes row `r` into `out` (length `cols`).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.ty, self.row_bytes(r), out);
    }
}

impl QMatrix {
    /// Row `r` as one *unsigned* byte per weight plus a `(scale, min)` pair per 16 weights, so
    /// that `weight = scale * u - min` for every storage type (Q8_0's signed bytes are shifted
    /// by 128, with `min = 128 * scale`). The wgpu backend keeps weights in this form: one kernel
    /// then serves every GGUF type, exactly.
    pub(crate) fn unpack_row_unsigned(&self, r: usize, u: &mut [u8], sm: &mut [[f32; 2]]) {
        let groups = self.cols / 16;
        let mut scale16 = vec![0f32; groups];
        let mut min16 = vec![0f32; groups];
        let signed = formats::unpack_row(self.ty, self.row_bytes(r), u, &mut scale16, &mut min16);
        if signed {
            for b in u.iter_mut() {
                *b = (*b as i8 as i16 + 128) as u8;
            }
            for m in min16.iter_mut().zip(&scale16) {
                *m.0 = 128.0 * m.1;
            }
        }
        for (g, o) in sm.iter_mut().enumerate() {
            *o = [scale16[g], min16[g]];
        }
    }
}

/// A matrix of pseudo-random blocks of `ty` with small finite scales, for tests.
#[cfg(test)]
pub(crate) fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let n = rows * ty.row_bytes(cols);
    let mut s = seed;
    let mut bytes: Vec<u8> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
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
            GgmlType::Q5x4 => {
                for k in 0..4 {
                    blk[2 * k..2 * k + 2].copy_from_slice(&scale);
                }
            }
            _ => blk[0..2].copy_from_slice(&scale),
        }
    }
    QMatrix::new("test", ty, rows, cols, Storage::Owned(bytes.into())).unwrap()
}

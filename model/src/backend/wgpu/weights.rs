//! Weights on the device: one byte per weight plus a `(scale, min)` pair per 16 weights for
//! every GGUF type (`QMatrix::unpack_row_unsigned`), Q|K|V and gate|up fused, matrices past the
//! largest storage binding (or one dispatch's reach) split into row chunks.

use wgpu::util::DeviceExt;

use super::{MAX_WORKGROUPS_PER_DIM, ROWS_PER_WG};
use crate::error::{ModelError, Result};
use crate::quant::QMatrix;

/// One weight matrix on the device, possibly in row chunks.
pub(super) struct GpuMatrix {
    pub(super) cols: usize,
    /// `(first row, rows, bytes, (scale, min) pairs)` per chunk.
    pub(super) chunks: Vec<(usize, usize, wgpu::Buffer, wgpu::Buffer)>,
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
            let qb = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(name),
                    contents: &q,
                    usage: wgpu::BufferUsages::STORAGE,
                });
            let sb = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(name),
                    contents: bytemuck::cast_slice(&s),
                    usage: wgpu::BufferUsages::STORAGE,
                });
            chunks.push((start, n, qb, sb));
            start += n;
        }
        Ok(GpuMatrix { cols, chunks })
    }
}

//! Recording a pass: each dispatch's parameters in its uniform slot, bind groups cached by slot,
//! and the choice of matrix kernel for each product.

use bytemuck::{Pod, Zeroable};

use super::pipelines::{
    Kernel, MatShape, Pipelines, COOP_ROWS, COOP_TOKENS, COOP_WIDE_TOKENS, GEMM_MAX_COLS,
    GEMM_ROWS, GEMM_TOKENS,
};
use super::weights::GpuMatrix;
use super::{PARAM_SLOT, ROWS_PER_THREAD, ROWS_PER_WG, TOKENS_PER_TILE};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct MatParams {
    pub(super) rows: u32,
    pub(super) cols: u32,
    pub(super) n_tok: u32,
    pub(super) y_stride: u32,
    pub(super) row_offset: u32,
    pub(super) accumulate: u32,
    pub(super) has_bias: u32,
    pub(super) eps: f32,
    /// The weights' storage format ([`super::weights::Format::word`]).
    pub(super) fmt: u32,
    pub(super) pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct NormParams {
    pub(super) n_rows: u32,
    pub(super) d: u32,
    pub(super) eps: f32,
    pub(super) use_sel: u32,
    /// With `use_sel`: the first entry of `sel` read, and the first output row written.
    pub(super) sel_from: u32,
    pub(super) out_from: u32,
    pub(super) pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct SampleParams {
    pub(super) vocab: u32,
    pub(super) first_row: u32,
    pub(super) pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct HeadParams {
    pub(super) n_heads: u32,
    pub(super) n_kv_heads: u32,
    pub(super) head_dim: u32,
    pub(super) qkv_stride: u32,
    pub(super) kv_dim: u32,
    /// `interleaved` for RoPE, `scale` (as f32 bits) for attention.
    pub(super) word5: u32,
    pub(super) block_tokens: u32,
    /// Attention only: 0, or RoPE and the KV write fused in (1: pairs (j, j + hd/2), 2:
    /// interleaved pairs); see attention.wgsl.
    pub(super) rope: u32,
}

/// What a matrix product does besides `y = W x` (see `matmul_common.wgsl`).
#[derive(Clone, Copy, Default)]
pub(super) struct Fused<'b> {
    /// RMS-normalise the input first, with this weight and epsilon.
    pub(super) norm: Option<(&'b wgpu::Buffer, f32)>,
    /// Add this vector to each output row.
    pub(super) bias: Option<&'b wgpu::Buffer>,
    /// Add into `y` (the residual stream) instead of overwriting it.
    pub(super) accumulate: bool,
    /// The rows are (gate, up) pairs: write `silu(gate) * up`, one value per pair.
    pub(super) swiglu: bool,
}

/// A bind group made for dispatch slot `k`: reused while slot `k` runs the same kernel on the
/// same buffers (a decode step skips `rope_kv`, so a slot's dispatch can change between passes).
pub(super) struct CachedGroup {
    pub(super) kernel: u8,
    pub(super) buffers: Vec<wgpu::Buffer>,
    pub(super) group: wgpu::BindGroup,
}

/// A recorded dispatch: pipeline, bind group, workgroup counts.
pub(super) struct Dispatch<'p> {
    /// The kernel's role in the model, for profiles.
    pub(super) label: &'static str,
    pub(super) pipeline: &'p wgpu::ComputePipeline,
    pub(super) group: wgpu::BindGroup,
    pub(super) size: (u32, u32, u32),
}

/// Collects a pass's dispatches and their parameter blocks.
///
/// Dispatch `k` of a pass always has parameter slot `k`, and mostly the same kernel and buffers
/// as in the pass before (the sequence of dispatches is fixed by the model and by whether the
/// pass is a decode step; only sizes change), so its bind group is made once and reused while
/// they stay the same. Reallocating a buffer clears `cache`.
pub(super) struct Recorder<'a> {
    pub(super) device: &'a wgpu::Device,
    pub(super) params: &'a wgpu::Buffer,
    pub(super) blob: Vec<u8>,
    pub(super) dispatches: Vec<Dispatch<'a>>,
    pub(super) cache: &'a mut Vec<Option<CachedGroup>>,
}

impl<'a> Recorder<'a> {
    pub(super) fn add<P: Pod>(
        &mut self,
        kernel: &'a Kernel,
        label: &'static str,
        params: P,
        buffers: &[&wgpu::Buffer],
        size: (u32, u32, u32),
    ) {
        let slot = self.dispatches.len();
        let offset = self.blob.len() as u64;
        self.blob.extend_from_slice(bytemuck::bytes_of(&params));
        self.blob.resize((offset + PARAM_SLOT) as usize, 0);
        if self.cache.len() <= slot {
            self.cache.resize_with(slot + 1, || None);
        }
        if let Some(c) = &self.cache[slot] {
            if c.kernel == kernel.id
                && c.buffers.len() == buffers.len()
                && c.buffers.iter().zip(buffers).all(|(a, b)| a == *b)
            {
                self.dispatches.push(Dispatch {
                    label,
                    pipeline: &kernel.pipeline,
                    group: c.group.clone(),
                    size,
                });
                return;
            }
        }
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: self.params,
                offset,
                size: wgpu::BufferSize::new(std::mem::size_of::<P>() as u64),
            }),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &kernel.layout,
            entries: &entries,
        });
        self.cache[slot] = Some(CachedGroup {
            kernel: kernel.id,
            buffers: buffers.iter().map(|b| (*b).clone()).collect(),
            group: group.clone(),
        });
        self.dispatches.push(Dispatch {
            label,
            pipeline: &kernel.pipeline,
            group,
            size,
        });
    }

    /// The input of a product that reads the RMS norm of `x` (in `(x, h)`) with `weight`: `x`
    /// itself with the norm to fuse into the product when `fuse`, otherwise `h` after a norm
    /// dispatch.
    pub(super) fn normed<'b>(
        &mut self,
        pipes: &'a Pipelines,
        fuse: bool,
        (x, h): (&'b wgpu::Buffer, &'b wgpu::Buffer),
        weight: &'b wgpu::Buffer,
        params: NormParams,
        dummy: &wgpu::Buffer,
    ) -> (&'b wgpu::Buffer, Option<(&'b wgpu::Buffer, f32)>) {
        if fuse {
            return (x, Some((weight, params.eps)));
        }
        let rows = params.n_rows;
        self.add(
            &pipes.rms_norm,
            "rms_norm",
            params,
            &[x, weight, h, dummy],
            (rows, 1, 1),
        );
        (h, None)
    }

    /// `y[.., row_offset..] (+)= W x (+ bias)` for `n` tokens, with what `fused` adds.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
        &mut self,
        pipes: &'a Pipelines,
        label: &'static str,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        y_stride: usize,
        n: usize,
        fused: Fused<'_>,
        dummy: &wgpu::Buffer,
    ) {
        for c in &w.chunks {
            let (start, rows) = (&c.start, &c.rows);
            // Several rows a thread read each token's activations fewer times, but make fewer
            // workgroups: take them only when there are still enough to fill the GPU.
            let tiles = (n as u32).div_ceil(TOKENS_PER_TILE);
            let tiled_wgs = (*rows as u32).div_ceil(ROWS_PER_WG * ROWS_PER_THREAD) * tiles;
            // Past one tile of tokens (where the norm is never fused), the tiled
            // matrix-matrix kernel for rows it is faster on, as long as its larger tiles still
            // make about a workgroup for each multiprocessor of a large GPU.
            let gemm_wgs = (*rows as u32).div_ceil(GEMM_ROWS) * (n as u32).div_ceil(GEMM_TOKENS);
            let (shape, tt, rows_per_wg) =
                if pipes.coop_wide && n >= 2 * COOP_WIDE_TOKENS as usize && fused.norm.is_none() {
                    (MatShape::CoopWide, COOP_WIDE_TOKENS, COOP_ROWS)
                } else if pipes.coop && n > pipes.coop_min_tokens && fused.norm.is_none() {
                    (MatShape::Coop, COOP_TOKENS, COOP_ROWS)
                } else if n > TOKENS_PER_TILE as usize
                    && fused.norm.is_none()
                    && w.cols <= GEMM_MAX_COLS
                    && gemm_wgs >= pipes.min_tiled_workgroups / 2
                {
                    (MatShape::Gemm, GEMM_TOKENS, GEMM_ROWS)
                } else if n == 1
                    && pipes.matvec_rows > 1
                    && (*rows as u32).div_ceil(4 * pipes.matvec_rows) >= pipes.min_tiled_workgroups
                {
                    (MatShape::OneRows, 1, 4 * pipes.matvec_rows)
                } else if n == 1 {
                    (MatShape::One, 1, 256 / pipes.matvec_lanes)
                } else if tiled_wgs >= pipes.min_tiled_workgroups {
                    (
                        MatShape::TileRows,
                        TOKENS_PER_TILE,
                        ROWS_PER_WG * ROWS_PER_THREAD,
                    )
                } else {
                    (MatShape::Tile, TOKENS_PER_TILE, ROWS_PER_WG)
                };
            let pipe = pipes.matmul(
                shape,
                fused.norm.is_some(),
                fused.swiglu,
                c.format.bits != 8,
            );
            let params = MatParams {
                rows: *rows as u32,
                cols: w.cols as u32,
                n_tok: n as u32,
                y_stride: y_stride as u32,
                row_offset: *start as u32,
                accumulate: fused.accumulate as u32,
                has_bias: fused.bias.is_some() as u32,
                eps: fused.norm.map_or(0.0, |n| n.1),
                fmt: c.format.word(),
                pad: [0; 3],
            };
            self.add(
                pipe,
                label,
                params,
                &[
                    &c.q,
                    &c.sm,
                    x,
                    y,
                    fused.bias.unwrap_or(dummy),
                    fused.norm.map_or(dummy, |n| n.0),
                ],
                (
                    (*rows as u32).div_ceil(rows_per_wg),
                    (n as u32).div_ceil(tt),
                    1,
                ),
            );
        }
    }
}

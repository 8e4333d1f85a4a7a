//! Recording a pass: each dispatch's parameters in its uniform slot, bind groups cached by slot,
//! and the choice of matrix kernel for each product.

use bytemuck::{Pod, Zeroable};

use super::pipelines::{
    Kernel, MatShape, Pipelines, COOP_ROWS, COOP_TOKENS, COOP_WIDE_TOKENS, GEMM_MAX_COLS,
    GEMM_ROWS, GEMM_TOKENS, SUB_MAX_TOKENS, SUB_ROWS,
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
    /// Columns a workgroup of a split product sums (`SPLIT` kernels; see
    /// [`KernelChoice::split_k`]).
    pub(super) k_split: u32,
    pub(super) pad: [u32; 2],
}

/// `matmul_reduce.wgsl`'s parameters: a split product's shape and what finishes it.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct SplitParams {
    pub(super) rows: u32,
    pub(super) n_tok: u32,
    pub(super) splits: u32,
    pub(super) y_stride: u32,
    pub(super) row_offset: u32,
    pub(super) accumulate: u32,
    pub(super) has_bias: u32,
    pub(super) swiglu: u32,
}

/// Most column ranges one product is split into.
pub(super) const MAX_SPLITS: u32 = 16;
/// Columns of one step of the tiled kernels: a split covers a whole number of them.
const SPLIT_STEP: u32 = 32;
/// Largest [`KernelChoice::split_k_workgroups`]: the reduction's one-dimensional dispatch of
/// up to 16 workgroups per split workgroup stays within a dimension's 65,535.
pub(super) const MAX_SPLIT_K_WORKGROUPS: u32 = 2048;
/// [`super::WgpuOptions::split_k_workgroups`]'s default. On an H100 (default model's shapes,
/// 2026-12-06) splitting below 512 workgroups made 64 sequences 1.92x faster, 16 and 256
/// sequences 1.20x and a 512-token prefill 1.04x; with cooperative matrices from 2 tokens,
/// 16 and 32 sequences 2.5x and 2.8x.
pub(super) const DEFAULT_SPLIT_K_WORKGROUPS: u32 = 512;

/// Bytes of partial sums a split product may need at most with `split_k_workgroups`: splits
/// are only taken by products of fewer workgroups (`w`) than that, and at most
/// `ceil(split_k_workgroups / w)` of them, so splits times workgroups stay under twice
/// `split_k_workgroups`, each workgroup a tile of 64 rows by 32 tokens.
pub(super) fn split_part_bytes(split_k_workgroups: u32) -> u64 {
    2 * split_k_workgroups as u64 * (GEMM_ROWS * GEMM_TOKENS) as u64 * 4
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

/// The settings that choose each product's kernel ([`Pipelines::choice`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct KernelChoice {
    pub(super) coop: bool,
    pub(super) coop_wide: bool,
    pub(super) coop_min_tokens: usize,
    pub(super) coop_min_workgroups: u32,
    pub(super) split_k_workgroups: u32,
    pub(super) min_tiled_workgroups: u32,
    pub(super) matvec_lanes: u32,
    pub(super) matvec_rows: u32,
    pub(super) matvec_subgroups: bool,
}

impl KernelChoice {
    /// The kernel for `rows` rows of `cols` columns times `n` tokens (`norm`: the input's
    /// RMS norm fused in), its tile of tokens, and its rows a workgroup.
    pub(super) fn shape(
        &self,
        rows: usize,
        cols: usize,
        n: usize,
        norm: bool,
    ) -> (MatShape, u32, u32) {
        let rows = rows as u32;
        // Several rows a thread read each token's activations fewer times, but make fewer
        // workgroups: take them only when there are still enough to fill the GPU.
        let tiles = (n as u32).div_ceil(TOKENS_PER_TILE);
        let tiled_wgs = rows.div_ceil(ROWS_PER_WG * ROWS_PER_THREAD) * tiles;
        // Past one tile of tokens (where the norm is never fused), the tiled
        // matrix-matrix kernel for rows it is faster on, as long as its larger tiles still
        // make about a workgroup for each multiprocessor of a large GPU.
        let gemm_wgs = rows.div_ceil(GEMM_ROWS) * (n as u32).div_ceil(GEMM_TOKENS);
        let coop_wgs = rows.div_ceil(COOP_ROWS) * (n as u32).div_ceil(COOP_TOKENS);
        let coop = self.coop && coop_wgs >= self.coop_min_workgroups;
        if self.coop_wide && n >= 2 * COOP_WIDE_TOKENS as usize && !norm {
            (MatShape::CoopWide, COOP_WIDE_TOKENS, COOP_ROWS)
        } else if coop && n > self.coop_min_tokens && !norm {
            (MatShape::Coop, COOP_TOKENS, COOP_ROWS)
        } else if self.matvec_subgroups && n <= SUB_MAX_TOKENS {
            // Up to two tiles of tokens on subgroups, the norm fused or not (a tile's NORM
            // variant takes each token's own RMS).
            if n == 1 {
                (MatShape::OneSub, 1, SUB_ROWS)
            } else {
                (MatShape::TileSub, TOKENS_PER_TILE, SUB_ROWS)
            }
        } else if n > TOKENS_PER_TILE as usize
            && !norm
            && cols <= GEMM_MAX_COLS
            && gemm_wgs >= self.min_tiled_workgroups / 2
        {
            (MatShape::Gemm, GEMM_TOKENS, GEMM_ROWS)
        } else if n == 1
            && self.matvec_rows > 1
            && rows.div_ceil(4 * self.matvec_rows) >= self.min_tiled_workgroups
        {
            (MatShape::OneRows, 1, 4 * self.matvec_rows)
        } else if n == 1 {
            (MatShape::One, 1, 256 / self.matvec_lanes)
        } else if tiled_wgs >= self.min_tiled_workgroups {
            (
                MatShape::TileRows,
                TOKENS_PER_TILE,
                ROWS_PER_WG * ROWS_PER_THREAD,
            )
        } else {
            (MatShape::Tile, TOKENS_PER_TILE, ROWS_PER_WG)
        }
    }

    /// Whether a pass of `n` tokens fuses the RMS norms into the products that read them: up
    /// to one tile of tokens (saving two dispatches a layer; larger passes are bound by
    /// arithmetic, where the fused norm's extra work per weight costs more than a dispatch),
    /// unless cooperative matrices take products of that many tokens (they never fuse it).
    pub(super) fn fuse_norm(&self, n: usize) -> bool {
        n <= TOKENS_PER_TILE as usize && !(self.coop && n > self.coop_min_tokens)
    }

    /// How a product on `shape` making `workgroups` workgroups splits its `cols` columns:
    /// `(splits, columns a split)`, or `None` to run whole. Only the tiled kernels
    /// (`Gemm`, `Coop`) split, and only below [`Self::split_k_workgroups`]: each of their
    /// workgroups steps through every column of its tile, so a product of few row tiles
    /// (down's 896 rows make 14) leaves most of a large GPU idle while a few workgroups walk
    /// thousands of columns. Split, each range is summed by workgroups of its own and
    /// `matmul_reduce.wgsl` adds the ranges up: enough splits to reach the target, at most
    /// [`MAX_SPLITS`], each a whole number of 32-column steps.
    pub(super) fn split_k(
        &self,
        shape: MatShape,
        workgroups: u32,
        cols: usize,
    ) -> Option<(u32, u32)> {
        if !matches!(shape, MatShape::Gemm | MatShape::Coop)
            || workgroups == 0
            || workgroups >= self.split_k_workgroups
        {
            return None;
        }
        let steps = (cols as u32).div_ceil(SPLIT_STEP);
        let want = self
            .split_k_workgroups
            .div_ceil(workgroups)
            .min(MAX_SPLITS)
            .min(steps);
        let per = steps.div_ceil(want.max(1)) * SPLIT_STEP;
        let splits = (cols as u32).div_ceil(per);
        (splits > 1).then_some((splits, per))
    }
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
    /// Partial sums of split products ([`split_part_bytes`] of them), where the backend splits.
    pub(super) part: Option<&'a wgpu::Buffer>,
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
        let choice = pipes.choice();
        for c in &w.chunks {
            let (start, rows) = (&c.start, &c.rows);
            let (shape, tt, rows_per_wg) = choice.shape(*rows, w.cols, n, fused.norm.is_some());
            let size = (
                (*rows as u32).div_ceil(rows_per_wg),
                (n as u32).div_ceil(tt),
                1,
            );
            let split = self.part.and_then(|part| {
                let (splits, per) = choice.split_k(shape, size.0 * size.1, w.cols)?;
                let bytes = splits as u64 * n as u64 * *rows as u64 * 4;
                (bytes <= part.size()).then_some((part, splits, per))
            });
            let pipe = pipes.matmul(
                shape,
                fused.norm.is_some(),
                fused.swiglu,
                c.format.bits != 8,
                split.is_some(),
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
                k_split: 0,
                pad: [0; 2],
            };
            let bias = fused.bias.unwrap_or(dummy);
            let Some((part, splits, per)) = split else {
                let gam = fused.norm.map_or(dummy, |n| n.0);
                self.add(pipe, label, params, &[&c.q, &c.sm, x, y, bias, gam], size);
                continue;
            };
            // Raw partial sums into `part` (never with the norm: tiled kernels take none),
            // then the reduction finishes them into `y` as `params` says.
            let partial = MatParams {
                y_stride: *rows as u32,
                row_offset: 0,
                accumulate: 0,
                has_bias: 0,
                k_split: per,
                ..params
            };
            self.add(
                pipe,
                label,
                partial,
                &[&c.q, &c.sm, x, part, dummy, dummy],
                (size.0, size.1, splits),
            );
            let outputs = n as u32 * (*rows as u32 / (1 + fused.swiglu as u32));
            self.add(
                &pipes.matmul_reduce,
                "split_sum",
                SplitParams {
                    rows: params.rows,
                    n_tok: params.n_tok,
                    splits,
                    y_stride: params.y_stride,
                    row_offset: params.row_offset,
                    accumulate: params.accumulate,
                    has_bias: params.has_bias,
                    swiglu: fused.swiglu as u32,
                },
                &[part, y, bias],
                (outputs.div_ceil(256), 1, 1),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed choice the cases below vary one field of (the shipped defaults differ:
    /// cooperative matrices from 2 tokens, splits below 512 workgroups).
    const BASE: KernelChoice = KernelChoice {
        coop: true,
        coop_wide: false,
        coop_min_tokens: 32,
        coop_min_workgroups: 0,
        split_k_workgroups: 0,
        min_tiled_workgroups: 256,
        matvec_lanes: 64,
        matvec_rows: 1,
        matvec_subgroups: false,
    };

    /// The tuning options change the kernels of the products they name and no others (the
    /// default model's shapes: down 896 rows of 4864 columns, gate_up 9728 of 896).
    #[test]
    fn tuning_options_choose_the_kernels_they_name() {
        let shape = |c: KernelChoice, rows, cols, n, norm| c.shape(rows, cols, n, norm).0;
        // One token on the single-row kernel, 16 tokens on f32, 64 cooperative.
        assert_eq!(shape(BASE, 9728, 896, 1, true), MatShape::One);
        assert_eq!(shape(BASE, 9728, 896, 16, false), MatShape::Gemm);
        assert_eq!(shape(BASE, 896, 4864, 64, false), MatShape::Coop);
        // Rows a thread for single tokens, where the rows fill the GPU.
        let rows = KernelChoice {
            matvec_rows: 2,
            ..BASE
        };
        assert_eq!(shape(rows, 9728, 896, 1, true), MatShape::OneRows);
        assert_eq!(rows.shape(9728, 896, 1, true).2, 8);
        assert_eq!(shape(rows, 896, 4864, 1, false), MatShape::One);
        assert_eq!(shape(rows, 9728, 896, 2, true), MatShape::TileRows);
        // Cooperative matrices from 9 tokens, never with the norm fused (up to 8 tokens).
        let early = KernelChoice {
            coop_min_tokens: 8,
            ..BASE
        };
        assert_eq!(shape(early, 9728, 896, 16, false), MatShape::Coop);
        assert_eq!(shape(early, 9728, 896, 8, true), MatShape::TileRows);
        assert!(early.fuse_norm(8) && !early.fuse_norm(9));
        // From 2 tokens: passes of 2 to 8 tokens then leave the norm unfused, so their
        // products can take the cooperative kernel; single tokens keep theirs.
        let two = KernelChoice {
            coop_min_tokens: 1,
            ..BASE
        };
        assert!(two.fuse_norm(1) && !two.fuse_norm(2) && !two.fuse_norm(8));
        assert_eq!(shape(two, 9728, 896, 2, two.fuse_norm(2)), MatShape::Coop);
        assert_eq!(shape(two, 896, 4864, 8, two.fuse_norm(8)), MatShape::Coop);
        assert_eq!(shape(two, 9728, 896, 1, two.fuse_norm(1)), MatShape::One);
        // Too few cooperative tiles: down's 896 rows at 64 tokens make 28.
        let few = KernelChoice {
            coop_min_workgroups: 64,
            ..BASE
        };
        assert_eq!(shape(few, 896, 4864, 64, false), MatShape::TileRows);
        assert_eq!(shape(few, 9728, 896, 64, false), MatShape::Coop);
        assert_eq!(shape(few, 896, 4864, 256, false), MatShape::Coop);
        // Without cooperative matrices none of this matters.
        let none = KernelChoice {
            coop: false,
            coop_min_tokens: 8,
            ..BASE
        };
        assert_eq!(shape(none, 9728, 896, 16, false), MatShape::Gemm);
        assert!(KernelChoice {
            coop_min_tokens: 1,
            ..none
        }
        .fuse_norm(8));
        // Subgroups for up to 16 tokens, the norm fused or not, eight rows a workgroup and
        // a tile of 8 tokens; past that, and where cooperative matrices start earlier, the
        // other kernels.
        let sub = KernelChoice {
            matvec_subgroups: true,
            ..BASE
        };
        assert_eq!(sub.shape(9728, 896, 1, true), (MatShape::OneSub, 1, 8));
        assert_eq!(shape(sub, 896, 4864, 1, false), MatShape::OneSub);
        assert_eq!(sub.shape(9728, 896, 2, true), (MatShape::TileSub, 8, 8));
        assert_eq!(shape(sub, 9728, 896, 8, true), MatShape::TileSub);
        assert_eq!(shape(sub, 896, 4864, 8, false), MatShape::TileSub);
        assert_eq!(shape(sub, 9728, 896, 16, false), MatShape::TileSub);
        assert_eq!(shape(sub, 9728, 896, 17, false), MatShape::Gemm);
        assert_eq!(shape(sub, 896, 4864, 64, false), MatShape::Coop);
        let sub_early = KernelChoice {
            coop_min_tokens: 8,
            ..sub
        };
        assert_eq!(shape(sub_early, 9728, 896, 8, true), MatShape::TileSub);
        assert_eq!(shape(sub_early, 9728, 896, 16, false), MatShape::Coop);
        // Without them, the same products keep their kernels.
        assert_eq!(shape(BASE, 9728, 896, 8, true), MatShape::TileRows);
        assert_eq!(shape(BASE, 896, 4864, 8, false), MatShape::Tile);
    }

    /// Products of few tiles split their columns into whole 32-column steps, enough ranges to
    /// reach the target and no more than 16, every range holding columns; the tiles times the
    /// ranges stay within the partial-sum buffer's bound; other kernels never split.
    #[test]
    fn few_tiles_split_their_columns_within_the_partial_sums_bound() {
        assert_eq!(BASE.split_k(MatShape::Coop, 28, 4864), None);
        let split = KernelChoice {
            split_k_workgroups: 512,
            ..BASE
        };
        // down at 64 sequences: 14 row tiles x 2 token tiles.
        assert_eq!(split.split_k(MatShape::Coop, 28, 4864), Some((16, 320)));
        // gate_up at 16 sequences on the f32 tiles: 152 workgroups, 4 ranges of 7 steps.
        assert_eq!(split.split_k(MatShape::Gemm, 152, 896), Some((4, 224)));
        assert_eq!(split.split_k(MatShape::Coop, 304, 896), Some((2, 448)));
        // Enough workgroups already, a kernel without the SPLIT variant, one step of columns.
        assert_eq!(split.split_k(MatShape::Coop, 1216, 896), None);
        assert_eq!(split.split_k(MatShape::TileRows, 28, 4864), None);
        assert_eq!(split.split_k(MatShape::Gemm, 4, 32), None);
        for target in [1, 64, 512, MAX_SPLIT_K_WORKGROUPS] {
            let c = KernelChoice {
                split_k_workgroups: target,
                ..BASE
            };
            let bound = split_part_bytes(target);
            for rows in [16, 64, 100, 896, 1152, 9728] {
                for n in [9, 16, 33, 64, 256, 512] {
                    for cols in [64, 96, 896, 4864, 18944] {
                        let wgs = (rows as u32).div_ceil(COOP_ROWS) * (n as u32).div_ceil(32);
                        let Some((splits, per)) = c.split_k(MatShape::Coop, wgs, cols) else {
                            continue;
                        };
                        let what = format!("{target}: {rows}x{cols}, {n} tokens");
                        assert!(splits > 1 && splits <= MAX_SPLITS, "{what}: {splits}");
                        assert_eq!(per % 32, 0, "{what}");
                        assert!(
                            (splits - 1) * per < cols as u32 && splits * per >= cols as u32,
                            "{what}: {splits} x {per}"
                        );
                        let bytes = splits as u64 * n as u64 * rows as u64 * 4;
                        assert!(bytes <= bound, "{what}: {bytes} > {bound}");
                    }
                }
            }
        }
    }
}

//! Compiling the kernels: each `.wgsl` file beside this one, the matrix kernels in one variant
//! per shape and fused prologue/epilogue, built on first use.

use super::{ModelConfig, ROWS_PER_THREAD, TOKENS_PER_TILE};

/// A compiled kernel and the layout of its bind group.
pub(super) struct Kernel {
    /// Distinguishes kernels in the bind-group cache.
    pub(super) id: u8,
    pub(super) pipeline: wgpu::ComputePipeline,
    pub(super) layout: wgpu::BindGroupLayout,
}

pub(super) struct Pipelines {
    pub(super) device: wgpu::Device,
    /// Matrix kernels by [`MatShape`] and variant (`split as usize * 8 + packed as usize * 4 +
    /// norm as usize * 2 + swiglu as usize`), compiled on first use: a pass uses a few of them.
    pub(super) matmul: [[std::sync::OnceLock<Kernel>; 16]; 9],
    /// `matmul_reduce.wgsl`: adds up and finishes the partial sums of a split product.
    pub(super) matmul_reduce: Kernel,
    /// Whether the device was opened with f16 cooperative matrices (`matmul_coop.wgsl`).
    pub(super) coop: bool,
    /// Whether products of at least twice [`COOP_WIDE_TOKENS`] tokens take 64-token tiles.
    pub(super) coop_wide: bool,
    /// Threads sharing a row in the single-token kernel ([`super::WgpuOptions::matvec_lanes`]).
    pub(super) matvec_lanes: u32,
    /// Rows a thread of the single-token rows kernel ([`super::WgpuOptions::matvec_rows`]; 1:
    /// that kernel is not used).
    pub(super) matvec_rows: u32,
    /// Whether products of up to [`SUB_MAX_TOKENS`] tokens take the subgroup kernels
    /// (`matmul_sub.wgsl`, [`super::WgpuOptions::matvec_subgroups`]; the device was opened
    /// with subgroups).
    pub(super) matvec_subgroups: bool,
    /// The bind group layout every matrix kernel shares.
    pub(super) matmul_layout: wgpu::PipelineLayout,
    /// See [`WgpuOptions::tiled_min_workgroups`].
    pub(super) min_tiled_workgroups: u32,
    /// Products of more tokens than this run on cooperative matrices
    /// ([`super::WgpuOptions::coop_min_tokens`], default [`COOP_MIN_TOKENS`]).
    pub(super) coop_min_tokens: usize,
    /// Cooperative products that would make fewer workgroups than this keep the f32
    /// kernels ([`super::WgpuOptions::coop_min_workgroups`], default 0).
    pub(super) coop_min_workgroups: u32,
    /// Tiled products of fewer workgroups than this split their columns
    /// ([`super::WgpuOptions::split_k_workgroups`], default 0: none).
    pub(super) split_k_workgroups: u32,
    pub(super) rms_norm: Kernel,
    pub(super) rope_kv: Kernel,
    pub(super) attention: Kernel,
    /// `attention_gqa.wgsl`, where the model's query heads per key head are at most
    /// [`GQA_MAX_GROUP`].
    pub(super) attention_gqa: Option<Kernel>,
    pub(super) sample: Kernel,
}

/// Most query heads per key head `attention_gqa.wgsl` takes (its workgroup memory grows with
/// them: 21 KiB at 7 heads of 64 dimensions).
pub(super) const GQA_MAX_GROUP: usize = 8;

/// The matrix kernels: one row per 64 threads for one token (`matmul.wgsl`, TT = 1) or for a
/// tile of tokens, several rows a thread for a tile (`matmul_rows.wgsl`), and the tiled
/// matrix-matrix kernel for large passes (`matmul_gemm.wgsl`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum MatShape {
    One = 0,
    Tile = 1,
    TileRows = 2,
    Gemm = 3,
    Coop = 4,
    /// `matmul_coop_wide.wgsl`: 64-token tiles, software pipelined
    /// ([`super::WgpuOptions::coop_tokens`]).
    CoopWide = 5,
    /// `matmul_rows.wgsl` for one token: each thread reads a weight group of several rows
    /// against one read of the activations (and norm weights) it shares
    /// ([`super::WgpuOptions::matvec_rows`]).
    OneRows = 6,
    /// `matmul_sub.wgsl`: one token, a row per 32 threads, sums on subgroups
    /// ([`super::WgpuOptions::matvec_subgroups`]).
    OneSub = 7,
    /// `matmul_sub.wgsl` for a tile of [`TOKENS_PER_TILE`] tokens, each weight group read once
    /// for all of them: products of 2 to [`SUB_MAX_TOKENS`] tokens
    /// ([`super::WgpuOptions::matvec_subgroups`]).
    TileSub = 8,
}

/// Rows a workgroup of the subgroup kernels (`matmul_sub.wgsl`: 256 threads, 32 a row).
pub(super) const SUB_ROWS: u32 = 8;
/// Most tokens a product takes the subgroup kernels for (two tiles), where they are asked for.
pub(super) const SUB_MAX_TOKENS: usize = 16;

/// Rows and tokens of a `matmul_gemm.wgsl` workgroup's tile.
pub(super) const GEMM_ROWS: u32 = 64;
pub(super) const GEMM_TOKENS: u32 = 32;
/// Longest rows the tiled matrix-matrix kernel takes. On an H200 it made the 0.5B shapes'
/// prefill 1.37x and 32- and 128-sequence decode 1.22x faster (rows of 896 columns), but the
/// 7B shapes' (3584 and 18944 columns) 0.86x–0.93x, so longer rows keep the other kernels
/// until it is tuned for them (BENCHMARKS.md).
pub(super) const GEMM_MAX_COLS: usize = 1024;
/// Rows and tokens of a `matmul_coop.wgsl` workgroup's tile.
pub(super) const COOP_ROWS: u32 = 64;
pub(super) const COOP_TOKENS: u32 = 32;
/// Tokens (and columns a step) of the wide variant's tile (`MatShape::CoopWide`), taken for
/// products of at least twice as many tokens when [`super::WgpuOptions::coop_tokens`] asks.
pub(super) const COOP_WIDE_TOKENS: u32 = 64;
/// Products of more tokens than this run on cooperative matrices: every product of 2 tokens
/// or more (passes of 2 to 8 tokens then run the RMS norms as dispatches of their own rather
/// than fused into the products, which the cooperative kernel does not do). Unsplit, they
/// lost to the f32 kernels at 16 and 32 sequences (H200: 0.88x, 0.93x); with their columns
/// split where tiles are few ([`super::record::DEFAULT_SPLIT_K_WORKGROUPS`]), on an H100
/// (2026-12-06, BENCHMARKS.md): 2, 4 and 8 sequences 1.19x, 1.31x and 1.54x faster than from
/// 9 tokens, 16 and 32 sequences 2.1x and 2.4x faster than from 33.
pub(super) const COOP_MIN_TOKENS: usize = 1;

/// Threads of `sample.wgsl`'s workgroup: 1024, or the device's most if fewer (a power of
/// two, at least 64). One workgroup picks a row, streaming its logits several times, so with a
/// single sequence its threads are the only ones reading.
pub(super) fn sample_workgroup(device: &wgpu::Device) -> u32 {
    let l = device.limits();
    let most = l
        .max_compute_invocations_per_workgroup
        .min(l.max_compute_workgroup_size_x)
        .clamp(64, 1024);
    1 << (31 - most.leading_zeros())
}

/// Compiles a kernel; with `layout` absent, its bind group layout is derived from the bindings
/// the shader uses.
pub(super) fn compile(
    device: &wgpu::Device,
    id: u8,
    label: &str,
    src: String,
    layout: Option<&wgpu::PipelineLayout>,
) -> Kernel {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    Kernel {
        id,
        layout: pipeline.get_bind_group_layout(0),
        pipeline,
    }
}

impl Pipelines {
    pub(super) fn new(
        device: &wgpu::Device,
        config: &ModelConfig,
        (min_tiled_workgroups, coop_min_tokens, coop_min_workgroups, split_k_workgroups): (
            u32,
            usize,
            u32,
            u32,
        ),
        coop: bool,
        coop_wide: bool,
        (matvec_lanes, matvec_rows, matvec_subgroups): (u32, u32, bool),
    ) -> Self {
        // Every matrix kernel binds the same seven buffers (`matmul_common.wgsl`), whichever
        // of them its variant reads, so one explicit layout serves all.
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        entries.extend((1..=6).map(|b| storage(b, b != 4)));
        let matmul_groups = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("matmul"),
            entries: &entries,
        });
        let matmul_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("matmul"),
            bind_group_layouts: &[Some(&matmul_groups)],
            immediate_size: 0,
        });
        Pipelines {
            device: device.clone(),
            matmul: Default::default(),
            coop,
            coop_wide,
            matvec_lanes,
            matvec_rows,
            matvec_subgroups,
            matmul_layout,
            matmul_reduce: compile(
                device,
                7,
                "matmul_reduce",
                include_str!("matmul_reduce.wgsl").into(),
                None,
            ),
            rms_norm: compile(
                device,
                2,
                "rms_norm",
                include_str!("rms_norm.wgsl").into(),
                None,
            ),
            rope_kv: compile(
                device,
                3,
                "rope_kv",
                include_str!("rope_kv.wgsl").into(),
                None,
            ),
            attention: compile(
                device,
                4,
                "attention",
                include_str!("attention.wgsl").replace("__HD__", &config.head_dim.to_string()),
                None,
            ),
            attention_gqa: {
                let g = config.n_heads / config.n_kv_heads;
                (config.n_heads % config.n_kv_heads == 0 && g <= GQA_MAX_GROUP).then(|| {
                    let cols = config.head_dim / 4;
                    compile(
                        device,
                        6,
                        "attention_gqa",
                        include_str!("attention_gqa.wgsl")
                            .replace("__HD__", &config.head_dim.to_string())
                            .replace("__G__", &g.to_string())
                            .replace("__QS__", &(g * cols).to_string())
                            .replace("__GT__", &(g * 256).to_string()),
                        None,
                    )
                })
            },
            sample: compile(
                device,
                5,
                "sample",
                include_str!("sample.wgsl")
                    .replace("__WG__", &sample_workgroup(device).to_string()),
                None,
            ),
            min_tiled_workgroups,
            coop_min_tokens,
            coop_min_workgroups,
            split_k_workgroups,
        }
    }

    /// The settings that choose each product's kernel.
    pub(super) fn choice(&self) -> super::record::KernelChoice {
        super::record::KernelChoice {
            coop: self.coop,
            coop_wide: self.coop_wide,
            coop_min_tokens: self.coop_min_tokens,
            coop_min_workgroups: self.coop_min_workgroups,
            split_k_workgroups: self.split_k_workgroups,
            min_tiled_workgroups: self.min_tiled_workgroups,
            matvec_lanes: self.matvec_lanes,
            matvec_rows: self.matvec_rows,
            matvec_subgroups: self.matvec_subgroups,
        }
    }

    /// A matrix kernel, with the RMS norm of its input fused in (`norm`), the SwiGLU
    /// epilogue (`swiglu`), weights of fewer than 8 bits (`packed`, weights.rs) and partial
    /// sums over a range of columns (`split`, the tiled kernels only) as compile-time switches: a switch read at run time would cost every product the
    /// registers of the code it guards (measured: the fused norm made the output projection
    /// 1.7x slower on one token).
    pub(super) fn matmul(
        &self,
        shape: MatShape,
        norm: bool,
        swiglu: bool,
        packed: bool,
        split: bool,
    ) -> &Kernel {
        let variant =
            split as usize * 8 + packed as usize * 4 + norm as usize * 2 + swiglu as usize;
        self.matmul[shape as usize][variant].get_or_init(|| {
            let src = matmul_source(
                shape,
                norm,
                swiglu,
                packed,
                split,
                (self.matvec_lanes, self.matvec_rows),
            );
            let label =
                format!("matmul_{shape:?}_norm{norm}_swiglu{swiglu}_packed{packed}_split{split}");
            compile(
                &self.device,
                16 + (shape as u8) * 16 + variant as u8,
                &label,
                src,
                Some(&self.matmul_layout),
            )
        })
    }
}

/// The source of a matrix kernel as [`Pipelines::matmul`] compiles it.
pub(super) fn matmul_source(
    shape: MatShape,
    norm: bool,
    swiglu: bool,
    packed: bool,
    split: bool,
    (matvec_lanes, matvec_rows): (u32, u32),
) -> String {
    assert!(
        !split || matches!(shape, MatShape::Gemm | MatShape::Coop),
        "only the tiled kernels split their columns"
    );
    let lanes = if shape == MatShape::One {
        matvec_lanes
    } else {
        64
    };
    let (kernel, tt, rt) = match shape {
        MatShape::One => (include_str!("matmul.wgsl"), 1, 1),
        MatShape::Tile => (include_str!("matmul.wgsl"), TOKENS_PER_TILE, 1),
        MatShape::TileRows => (
            include_str!("matmul_rows.wgsl"),
            TOKENS_PER_TILE,
            ROWS_PER_THREAD,
        ),
        MatShape::Gemm => (include_str!("matmul_gemm.wgsl"), 1, 1),
        MatShape::Coop => (include_str!("matmul_coop.wgsl"), 1, 1),
        MatShape::CoopWide => (include_str!("matmul_coop_wide.wgsl"), 1, 1),
        MatShape::OneRows => (include_str!("matmul_rows.wgsl"), 1, matvec_rows),
        MatShape::OneSub => (include_str!("matmul_sub.wgsl"), 1, 1),
        MatShape::TileSub => (include_str!("matmul_sub.wgsl"), TOKENS_PER_TILE, 1),
    };
    // The subgroup kernels reduce through workgroup memory of their own (16 KiB at a tile of
    // 8 tokens): the tree kernels' buffers, which they never read, are kept to one word.
    let sub = matches!(shape, MatShape::OneSub | MatShape::TileSub);
    let (red, rss) = if sub { (1, 1) } else { (256 * tt, 64 * tt) };
    let enables = match shape {
        MatShape::Coop | MatShape::CoopWide => "enable f16;\nenable wgpu_cooperative_matrix;\n",
        _ => "",
    };
    [
        enables,
        &format!(
            "const NORM: bool = {norm};\nconst SWIGLU: bool = {swiglu};\n\
             const PACKED: bool = {packed};\nconst SPLIT: bool = {split};\n"
        ),
        include_str!("matmul_common.wgsl"),
        kernel,
    ]
    .concat()
    .replace("__TT__", &tt.to_string())
    .replace("__RT__", &rt.to_string())
    .replace("__LANES__", &lanes.to_string())
    .replace("__ACC__", &(tt * rt).to_string())
    .replace("__RED__", &red.to_string())
    .replace("__RSS__", &rss.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every matrix kernel variant the backend may compile is valid WGSL and translates to
    /// SPIR-V (what wgpu hands a Vulkan driver), the cooperative-matrix one included, which no
    /// adapter in CI runs (lavapipe has no cooperative matrices).
    #[test]
    fn every_matrix_kernel_validates_and_translates_to_spirv() {
        use naga::valid::{Capabilities, ValidationFlags, Validator};
        for shape in [
            MatShape::One,
            MatShape::Tile,
            MatShape::TileRows,
            MatShape::Gemm,
            MatShape::Coop,
            MatShape::CoopWide,
            MatShape::OneRows,
            MatShape::OneSub,
            MatShape::TileSub,
        ] {
            for (norm, swiglu) in [(false, false), (false, true), (true, false), (true, true)] {
                if norm && matches!(shape, MatShape::Gemm | MatShape::Coop | MatShape::CoopWide) {
                    continue; // const_assert !NORM: never built
                }
                for (lanes, packed) in [8, 16, 32, 64]
                    .into_iter()
                    .flat_map(|l| [(l, false), (l, true)])
                {
                    if lanes != 64 && !matches!(shape, MatShape::One | MatShape::OneRows) {
                        continue; // only the single-token kernels take other counts
                    }
                    if shape == MatShape::OneRows && lanes == 64 {
                        continue; // 2, 4 and 8 rows a thread (from 8, 16 and 32)
                    }
                    // The rows kernel for one token, at each rows-a-thread count.
                    let rows = if shape == MatShape::OneRows {
                        lanes / 4
                    } else {
                        1
                    };
                    let splits: &[bool] = if matches!(shape, MatShape::Gemm | MatShape::Coop) {
                        &[false, true]
                    } else {
                        &[false]
                    };
                    for &split in splits {
                        let src = matmul_source(shape, norm, swiglu, packed, split, (lanes, rows));
                        let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| {
                            panic!(
                                "{shape:?} norm {norm} swiglu {swiglu} packed {packed}: {}",
                                e.emit_to_string(&src)
                            )
                        });
                        let info = Validator::new(
                            ValidationFlags::all(),
                            Capabilities::SHADER_FLOAT16
                                | Capabilities::COOPERATIVE_MATRIX
                                | Capabilities::SUBGROUP,
                        )
                        .validate(&module)
                        .unwrap_or_else(|e| {
                            panic!(
                                "{shape:?} norm {norm} swiglu {swiglu}: {}",
                                e.emit_to_string(&src)
                            )
                        });
                        let words = naga::back::spv::write_vec(
                            &module,
                            &info,
                            &naga::back::spv::Options::default(),
                            None,
                        )
                        .unwrap_or_else(|e| panic!("{shape:?}: SPIR-V: {e}"));
                        assert!(words.len() > 100, "{shape:?}: {} SPIR-V words", words.len());
                    }
                }
            }
        }
    }
}

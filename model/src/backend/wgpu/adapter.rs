//! Adapters: which one a backend opens, what it can do (cooperative matrices), and a summary
//! of each that wgpu can see.

/// Describes the adapter a backend runs on.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// Adapter name as the driver reports it.
    pub name: String,
    /// Graphics API (Vulkan, Metal, Dx12).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU (software) or other.
    pub device_type: String,
    /// Whether it is a software rasterizer.
    pub software: bool,
}

/// Whether the adapter a [`WgpuBackend`](super::WgpuBackend) would open runs batched products on cooperative
/// matrices (f16 inputs, f32 sums), so results of passes of more than 32 tokens agree with the
/// f32 kernels' to f16 rounding rather than f32's (tests pick their tolerance by it).
pub fn cooperative_matrix_available() -> bool {
    adapter().is_ok_and(|a| cooperative_f16(&a))
        && std::env::var_os("ARBOR_WGPU_COOP").is_none_or(|v| v != "0")
}

/// Lists the compute adapters wgpu can see.
pub fn adapters() -> Vec<AdapterSummary> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|a| summary(&a.get_info()))
        .collect()
}

/// The adapter a backend opens: the first high-performance one.
pub(super) fn adapter() -> std::result::Result<wgpu::Adapter, wgpu::RequestAdapterError> {
    pollster::block_on(instance().request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))
}

pub(super) fn instance() -> wgpu::Instance {
    // `WGPU_BACKEND` and the other wgpu variables override these defaults.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(desc.with_env())
}

pub(super) fn summary(info: &wgpu::AdapterInfo) -> AdapterSummary {
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        software: info.device_type == wgpu::DeviceType::Cpu,
    }
}

/// Whether the adapter multiplies 16x16x16 f16 cooperative matrices into f32 in 32-wide
/// subgroups, as `matmul_coop.wgsl` needs.
pub(super) fn cooperative_f16(adapter: &wgpu::Adapter) -> bool {
    let needed = wgpu::Features::SHADER_F16 | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
    let info = adapter.get_info();
    adapter.features().contains(needed)
        && info.subgroup_min_size == 32
        && info.subgroup_max_size == 32
        && adapter.cooperative_matrix_properties().iter().any(|c| {
            (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                && c.ab_type == wgpu::CooperativeScalarType::F16
                && c.cr_type == wgpu::CooperativeScalarType::F32
        })
}

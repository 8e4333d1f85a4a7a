//! What the device costs before any kernel does work: the time of a chain of dependent empty
//! dispatches, of one submit-and-wait round trip, and the features the faster kernels would
//! need (subgroups, f16, cooperative matrices). A decode step of the 0.5B model is ~120
//! dependent dispatches, so at batch 1 this floor, not bandwidth, bounds its speed; the
//! backends bench prints it beside the decode figures.

use std::time::Instant;

use super::{adapter, device_err, summary, AdapterSummary};
use crate::error::Result;

/// The device's fixed costs, measured by [`dispatch_floor`].
#[derive(Debug, Clone)]
pub struct DispatchFloor {
    /// The adapter measured.
    pub adapter: AdapterSummary,
    /// Dependent dispatches in the measured chain.
    pub dispatches: u32,
    /// Microseconds a dependent (one-workgroup, one-word) dispatch adds, recorded in one pass.
    pub us_per_dispatch: f64,
    /// The same chain with each dispatch in its own compute pass.
    pub us_per_pass: f64,
    /// Microseconds of an empty submit followed by waiting for the device: the floor of any
    /// step that reads back before the next is encoded.
    pub us_per_round_trip: f64,
    /// The adapter offers `SUBGROUP`.
    pub subgroup: bool,
    /// The adapter offers `SHADER_F16`.
    pub shader_f16: bool,
    /// The adapter offers `EXPERIMENTAL_COOPERATIVE_MATRIX`.
    pub cooperative_matrix: bool,
    /// `MxNxK ab->cr` for each cooperative-matrix configuration the adapter lists.
    pub cooperative_configs: Vec<String>,
    /// Smallest and largest subgroup size.
    pub subgroup_sizes: (u32, u32),
}

impl std::fmt::Display for DispatchFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {:.2} µs a dependent dispatch (chain of {} in one pass), {:.2} µs in separate \
             passes, {:.1} µs a submit-and-wait round trip; subgroup {} (sizes {}..{}), f16 {}, \
             cooperative matrix {} [{}]",
            self.adapter.name,
            self.us_per_dispatch,
            self.dispatches,
            self.us_per_pass,
            self.us_per_round_trip,
            self.subgroup,
            self.subgroup_sizes.0,
            self.subgroup_sizes.1,
            self.shader_f16,
            self.cooperative_matrix,
            self.cooperative_configs.join(", ")
        )
    }
}

const CHAIN: &str = "
@group(0) @binding(0) var<storage, read_write> v: array<u32>;
@compute @workgroup_size(1)
fn main() { v[0] = v[0] + 1u; }
";

/// Measures [`DispatchFloor`] with a chain of `dispatches` dependent dispatches (each reads
/// the word the last one wrote, so they cannot overlap); checks the chain's count.
pub fn dispatch_floor(allow_software: bool, dispatches: u32) -> Result<DispatchFloor> {
    let adapter = adapter().map_err(|e| device_err("no GPU adapter", e))?;
    let info_raw = adapter.get_info();
    let info = summary(&info_raw);
    if info.software && !allow_software {
        return Err(crate::error::ModelError::Device(format!(
            "the only adapter is the software renderer `{}`",
            info.name
        )));
    }
    let features = adapter.features();
    let cooperative_configs = adapter
        .cooperative_matrix_properties()
        .iter()
        .map(|p| {
            format!(
                "{}x{}x{} {:?}->{:?}",
                p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
            )
        })
        .collect();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("arbor floor"),
        required_features: wgpu::Features::empty(),
        required_limits: wgpu::Limits::default(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .map_err(|e| device_err("opening the GPU device", e))?;
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("chain"),
        source: wgpu::ShaderSource::Wgsl(CHAIN.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("chain"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("chain"),
        size: 256,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let read = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("chain read"),
        size: 256,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: buf.as_entire_binding(),
        }],
    });
    let wait = || {
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| device_err("waiting for the device", e))
    };
    // Runs the chain; returns seconds from submit to the device being idle.
    let chain = |separate: bool| -> Result<f64> {
        queue.write_buffer(&buf, 0, &[0u8; 4]);
        let mut enc = device.create_command_encoder(&Default::default());
        if separate {
            for _ in 0..dispatches {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
        } else {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            for _ in 0..dispatches {
                pass.dispatch_workgroups(1, 1, 1);
            }
        }
        enc.copy_buffer_to_buffer(&buf, 0, &read, 0, 4);
        let cmd = enc.finish();
        let t = Instant::now();
        queue.submit([cmd]);
        wait()?;
        let secs = t.elapsed().as_secs_f64();
        let (tx, rx) = std::sync::mpsc::channel();
        read.slice(0..4).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        wait()?;
        rx.recv()
            .map_err(|e| device_err("mapping the chain's count", e))?
            .map_err(|e| device_err("mapping the chain's count", e))?;
        let count = {
            let view = read
                .slice(0..4)
                .get_mapped_range()
                .map_err(|e| device_err("reading the chain's count", e))?;
            u32::from_le_bytes([view[0], view[1], view[2], view[3]])
        };
        read.unmap();
        if count != dispatches {
            return Err(crate::error::ModelError::Device(format!(
                "the dispatch chain counted {count}, not {dispatches}: dispatches overlapped"
            )));
        }
        Ok(secs)
    };
    let best = |f: &dyn Fn() -> Result<f64>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            best = best.min(f()?);
        }
        Ok(best)
    };
    let round_trip = best(&|| {
        let t = Instant::now();
        queue.submit([device.create_command_encoder(&Default::default()).finish()]);
        wait()?;
        Ok(t.elapsed().as_secs_f64())
    })?;
    let one_pass = best(&|| chain(false))?;
    let passes = best(&|| chain(true))?;
    let per = |s: f64| (s - round_trip).max(0.0) * 1e6 / dispatches as f64;
    Ok(DispatchFloor {
        adapter: info,
        dispatches,
        us_per_dispatch: per(one_pass),
        us_per_pass: per(passes),
        us_per_round_trip: round_trip * 1e6,
        subgroup: features.contains(wgpu::Features::SUBGROUP),
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        cooperative_matrix: features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        cooperative_configs,
        subgroup_sizes: (info_raw.subgroup_min_size, info_raw.subgroup_max_size),
    })
}

//! Where a wgpu forward pass spends its time, for benchmarks and tuning
//! ([`super::WgpuOptions::profile`]): the host's phases of each pass, and each kernel's time on
//! the GPU, from a timestamp written between consecutive dispatches.
//!
//! A timestamp after dispatch `k` minus the one before it is the time the GPU took from the end
//! of dispatch `k - 1` to the end of dispatch `k`: the kernel, the barrier before it, and any
//! idle time while the host had not yet submitted (none within one command buffer).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Time summed over the passes since the last [`PassProfile::take`].
#[derive(Debug, Clone, Default)]
pub struct PassProfile {
    /// Forward passes measured.
    pub passes: u64,
    /// Host: embeddings, RoPE angles, KV addresses and the uploads of them.
    pub prepare: Duration,
    /// Host: recording the dispatches (parameters, bind groups).
    pub record: Duration,
    /// Host: encoding the command buffers and submitting them (wgpu translates the commands
    /// for the driver when a command buffer is finished).
    pub submit: Duration,
    /// Host: waiting for the GPU to finish and the results to be mapped.
    pub wait: Duration,
    /// Host: copying the logits and hidden states out of the mapped buffer.
    pub read: Duration,
    /// GPU time per kernel role (`qkv`, `attention`, ...), with the number of dispatches.
    /// Empty when the device has no timestamp queries inside passes.
    pub kernels: BTreeMap<&'static str, (u64, Duration)>,
    /// GPU time from the first dispatch's start to the last one's end.
    pub gpu_span: Duration,
}

impl PassProfile {
    /// Returns the figures so far and starts again from zero.
    pub fn take(shared: &Mutex<PassProfile>) -> PassProfile {
        std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn host(&self) -> Duration {
        self.prepare + self.record + self.submit + self.wait + self.read
    }
}

impl fmt::Display for PassProfile {
    /// Per pass, in microseconds: the host phases, then the GPU kernels, largest first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.passes.max(1) as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n;
        writeln!(
            f,
            "{} passes; per pass (µs): host {:.0} = prepare {:.0} + record {:.0} + submit {:.0} + wait {:.0} + read {:.0}",
            self.passes,
            us(self.host()),
            us(self.prepare),
            us(self.record),
            us(self.submit),
            us(self.wait),
            us(self.read)
        )?;
        if self.kernels.is_empty() {
            return writeln!(f, "  (no GPU timestamps on this device)");
        }
        writeln!(
            f,
            "  GPU {:.0} µs a pass from the first dispatch's start to the last one's end:",
            us(self.gpu_span)
        )?;
        let mut rows: Vec<_> = self.kernels.iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1 .1));
        for (name, (count, time)) in rows {
            writeln!(
                f,
                "  {name:>10}: {:7.1} µs a pass, {:5.1} dispatches, {:6.2} µs each",
                us(*time),
                *count as f64 / n,
                time.as_secs_f64() * 1e6 / (*count).max(1) as f64
            )?;
        }
        Ok(())
    }
}

/// The query set and buffers that carry one timestamp per dispatch back to the host.
pub(super) struct Timestamps {
    pub(super) set: wgpu::QuerySet,
    pub(super) resolve: wgpu::Buffer,
    pub(super) read: wgpu::Buffer,
    pub(super) capacity: u32,
    /// Nanoseconds per timestamp tick.
    pub(super) period: f64,
}

impl Timestamps {
    /// Largest query set wgpu allows.
    const MAX_QUERIES: u32 = 4096;

    pub(super) fn new(device: &wgpu::Device, queue: &wgpu::Queue, capacity: u32) -> Self {
        let capacity = capacity.clamp(2, Self::MAX_QUERIES);
        let bytes = capacity as u64 * 8;
        Timestamps {
            set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: capacity,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile_resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            read: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile_read"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            capacity,
            period: queue.get_timestamp_period() as f64,
        }
    }

    /// Whether `dispatches` dispatches (and one timestamp more) fit.
    pub(super) fn fits(&self, dispatches: usize) -> bool {
        dispatches < self.capacity as usize
    }

    pub(super) fn wanted(dispatches: usize) -> u32 {
        ((dispatches + 1) as u32)
            .next_power_of_two()
            .min(Self::MAX_QUERIES)
    }
}

/// Adds one pass's GPU timestamps (`ticks[k]` before dispatch `k`, then one after the last) to
/// `profile` under each dispatch's label.
pub(super) fn add_kernel_times(
    profile: &mut PassProfile,
    labels: &[&'static str],
    ticks: &[u64],
    period: f64,
) {
    let ns = |a: u64, b: u64| Duration::from_nanos((b.saturating_sub(a) as f64 * period) as u64);
    for (k, label) in labels.iter().enumerate() {
        let e = profile.kernels.entry(label).or_default();
        e.0 += 1;
        e.1 += ns(ticks[k], ticks[k + 1]);
    }
    profile.gpu_span += ns(ticks[0], ticks[labels.len()]);
}

/// The handle a caller keeps to read a backend's profile while the engine owns the backend.
pub type SharedProfile = Arc<Mutex<PassProfile>>;

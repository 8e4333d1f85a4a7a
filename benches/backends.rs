//! The wgpu backend against the CPU backend, in one run, on the same weights.
//!
//! `cargo bench --bench backends` builds weights in the shapes and storage types of published
//! models ([`arbor_model::arch::preset`]; the values are pseudo-random, which does not change
//! how long a kernel takes) and measures, on each backend: prefill of a 128-token prompt,
//! single-sequence decode, and aggregate decode of 8, 32 and 128 sequences forked from one
//! prompt. It prints a Markdown table with the GPU/CPU ratio and the weight bandwidth the
//! single-sequence decode reaches (bytes of the GPU's weight form read per token / time).
//!
//! Options (env): `ARBOR_BENCH_SHAPES` (comma-separated presets, default `qwen2.5-0.5b`),
//! `ARBOR_BENCH_STEPS` (decode steps, default 32), `ARBOR_BENCH_SKIP_CPU=1`,
//! `ARBOR_WGPU_ALLOW_SOFTWARE=1` (measure on a software adapter such as lavapipe),
//! `ARBOR_BENCH_PROFILE=1` (after each measurement, print where the wgpu passes' time went:
//! host phases and each kernel's GPU time; the timing itself then includes waiting for every
//! pass).

use std::sync::Arc;
use std::time::Instant;

use arbor_model::arch::{preset, DecoderWeights, ModelConfig};
use arbor_model::backend::cpu::CpuBackend;
use arbor_model::backend::wgpu::{PassProfile, WgpuBackend, WgpuOptions};
use arbor_model::sampling::argmax;
use arbor_model::{Engine, EngineOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    prefill: f64,
    decode1: f64,
    batched: [f64; 3],
}

const BATCHES: [usize; 3] = [8, 32, 128];

/// Runs the measurements; `report(Some(what))` is called after each one's timed part (the
/// bench prints the wgpu profile there when asked for) and `report(None)` before it (the
/// profile so far is dropped).
fn measure(
    mut engine: Engine,
    cfg: &ModelConfig,
    steps: usize,
    report: &dyn Fn(Option<&str>),
) -> anyhow::Result<Figures> {
    let vocab = cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..128u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut prefill = Vec::new();
    report(None);
    for rep in 0..4 {
        let s = engine.new_sequence();
        let t = Instant::now();
        engine.forward(&[(s, &prompt)])?;
        if rep > 0 {
            prefill.push(t.elapsed().as_secs_f64());
        }
        engine.free(s);
    }
    let prefill = prompt.len() as f64 / median(prefill);
    report(Some("prefill"));

    let s = engine.new_sequence();
    let mut tok = argmax(engine.forward(&[(s, &prompt)])?);
    // One untimed step (first-use costs), then `steps` timed ones.
    tok = argmax(engine.forward(&[(s, &[tok])])?);
    report(None);
    let t = Instant::now();
    for _ in 0..steps {
        tok = argmax(engine.forward(&[(s, &[tok])])?) % vocab;
    }
    let decode1 = steps as f64 / t.elapsed().as_secs_f64();
    report(Some("decode, 1 sequence"));
    engine.free(s);

    let mut batched = [0f64; 3];
    for (slot, &n) in BATCHES.iter().enumerate() {
        let root = engine.new_sequence();
        engine.forward(&[(root, &prompt)])?;
        let mut seqs = vec![root];
        for _ in 1..n {
            seqs.push(engine.fork(root)?);
        }
        let mut toks: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 7) % vocab).collect();
        let step = |engine: &mut Engine, toks: &mut Vec<u32>| -> anyhow::Result<()> {
            let inputs: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
            let entries: Vec<_> = seqs
                .iter()
                .zip(&inputs)
                .map(|(s, t)| (*s, &t[..]))
                .collect();
            let logits = engine.forward(&entries)?;
            for (i, t) in toks.iter_mut().enumerate() {
                *t = argmax(&logits[i * vocab as usize..(i + 1) * vocab as usize]);
            }
            Ok(())
        };
        step(&mut engine, &mut toks)?;
        report(None);
        let t = Instant::now();
        for _ in 0..steps {
            step(&mut engine, &mut toks)?;
        }
        batched[slot] = (n * steps) as f64 / t.elapsed().as_secs_f64();
        report(Some(&format!("decode, {n} sequences")));
        for s in seqs {
            engine.free(s);
        }
    }
    Ok(Figures {
        prefill,
        decode1,
        batched,
    })
}

/// Bytes of weights a single-token pass reads in the GPU's form (a byte per weight plus 8
/// bytes of scale and min per 16 weights), embeddings excluded (one row is read per token).
fn gpu_weight_bytes(cfg: &ModelConfig) -> f64 {
    let d = cfg.d_model as f64;
    let q = (cfg.n_heads * cfg.head_dim) as f64;
    let kv = cfg.kv_dim() as f64;
    let per_layer = (q + 2.0 * kv) * d + q * d + 3.0 * cfg.ffn_dim as f64 * d;
    let weights = per_layer * cfg.n_layers as f64 + cfg.vocab_size as f64 * d;
    weights * 1.5
}

fn main() -> anyhow::Result<()> {
    let shapes = std::env::var("ARBOR_BENCH_SHAPES").unwrap_or_else(|_| "qwen2.5-0.5b".into());
    let steps: usize = std::env::var("ARBOR_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let skip_cpu = std::env::var_os("ARBOR_BENCH_SKIP_CPU").is_some();
    let allow_software = std::env::var_os("ARBOR_WGPU_ALLOW_SOFTWARE").is_some();
    let profile = std::env::var_os("ARBOR_BENCH_PROFILE").is_some();
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for name in shapes.split(',') {
        let cfg = preset(name).ok_or_else(|| anyhow::anyhow!("unknown shape preset `{name}`"))?;
        let t = Instant::now();
        let weights = Arc::new(DecoderWeights::synthetic(&cfg, 42)?);
        eprintln!(
            "{name}: synthetic weights in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let gpu = WgpuBackend::new(
            cfg.clone(),
            weights.clone(),
            &WgpuOptions {
                allow_software,
                max_chunk_bytes: None,
                tiled_min_workgroups: None,
                profile,
            },
        )?;
        let profile = gpu.profile();
        let adapter = gpu.adapter().clone();
        eprintln!(
            "{name}: uploaded to {} in {:.1}s",
            adapter.name,
            t.elapsed().as_secs_f64()
        );
        // The two backends must agree before their speeds mean anything: the logits of the
        // prompt's last token, relative to their scale.
        let prompt: Vec<u32> = (0..128u32)
            .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
            .collect();
        let mut ge = Engine::new(Box::new(gpu), EngineOptions::default());
        let gs = ge.new_sequence();
        let gl = ge.forward(&[(gs, &prompt)])?.to_vec();
        let mut ce = Engine::new(
            Box::new(CpuBackend::new(cfg.clone(), weights.clone())),
            EngineOptions::default(),
        );
        let cs = ce.new_sequence();
        let cl = ce.forward(&[(cs, &prompt)])?.to_vec();
        drop(ce);
        let scale = cl.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = gl
            .iter()
            .zip(&cl)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "{name}: wgpu vs cpu logits: worst difference {:.3}% of the scale {scale:.2}; argmax {} vs {}",
            100.0 * worst / scale,
            argmax(&gl),
            argmax(&cl)
        );
        ge.free(gs);
        let report = |what: Option<&str>| {
            if let Some(p) = &profile {
                let taken = PassProfile::take(p);
                if let Some(what) = what {
                    eprintln!("{name} wgpu profile, {what}: {taken}");
                }
            }
        };
        let g = measure(ge, &cfg, steps, &report)?;
        eprintln!("{name}: wgpu {g:?}");
        let c = if skip_cpu {
            None
        } else {
            let c = measure(
                Engine::new(
                    Box::new(CpuBackend::new(cfg.clone(), weights.clone())),
                    EngineOptions::default(),
                ),
                &cfg,
                steps,
                &|_| {},
            )?;
            eprintln!("{name}: cpu {c:?}");
            Some(c)
        };
        rows.push((name.to_string(), cfg, adapter, g, c));
    }
    println!(
        "\nTokens/s (higher is better); CPU backend on {threads} threads; ratio = wgpu / cpu.\n"
    );
    for (name, cfg, adapter, g, c) in &rows {
        println!(
            "### {name} shapes on {} ({}, {})\n",
            adapter.name, adapter.backend, adapter.device_type
        );
        println!("| measurement | wgpu | cpu | wgpu / cpu |");
        println!("|---|---|---|---|");
        let row = |label: String, gv: f64, cv: Option<f64>| match cv {
            Some(cv) => println!("| {label} | {gv:.1} | {cv:.1} | {:.2}x |", gv / cv),
            None => println!("| {label} | {gv:.1} | n/a | n/a |"),
        };
        row(
            "prefill, 128-token prompt".into(),
            g.prefill,
            c.map(|c| c.prefill),
        );
        row("decode, 1 sequence".into(), g.decode1, c.map(|c| c.decode1));
        for (i, n) in BATCHES.iter().enumerate() {
            row(
                format!("decode, {n} forked sequences (aggregate)"),
                g.batched[i],
                c.map(|c| c.batched[i]),
            );
        }
        let bytes = gpu_weight_bytes(cfg);
        println!(
            "\nsingle-sequence decode reads {:.2} GB of weights per token: {:.0} GB/s on the GPU; wgpu batched/single: x8 {:.2}x, x32 {:.2}x, x128 {:.2}x\n",
            bytes / 1e9,
            bytes * g.decode1 / 1e9,
            g.batched[0] / g.decode1,
            g.batched[1] / g.decode1,
            g.batched[2] / g.decode1
        );
    }
    Ok(())
}

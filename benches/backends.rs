//! The wgpu backend against the CPU backend, in one run, on the same weights.
//!
//! `cargo bench --bench backends` builds weights in the shapes and storage types of published
//! models ([`arbor_model::arch::preset`]; the values are pseudo-random, which does not change
//! how long a kernel takes) and measures, on each backend: prefill of a 512-token prompt,
//! single-sequence decode, and aggregate decode of 8, 32 and 128 sequences forked from one
//! prompt. It prints a Markdown table with the GPU/CPU ratio and the weight bandwidth the
//! single-sequence decode reaches (bytes of the GPU's weight form read per token / time).
//! Decode steps pick their tokens the way generation does: greedy draws through
//! `ForwardEntry::sampled`, which the wgpu backend answers on the device (8 bytes read back a
//! sequence); the "host picks" rows read every logit back and take the argmax on the host,
//! as every step did before device sampling, so one run shows what that saves.
//!
//! Options (env): `ARBOR_BENCH_SHAPES` (comma-separated presets, default `qwen2.5-0.5b`; the
//! name `model` means the real model at `ARBOR_BENCH_MODEL`, a GGUF file or model folder),
//! `ARBOR_BENCH_STEPS` (decode steps, default 32), `ARBOR_BENCH_SKIP_CPU=1`,
//! `ARBOR_WGPU_ALLOW_SOFTWARE=1` (measure on a software adapter such as lavapipe),
//! `ARBOR_BENCH_PROFILE=1` (after each measurement, print where the wgpu passes' time went:
//! host phases and each kernel's GPU time; the timing itself then includes waiting for every
//! pass), `ARBOR_WGPU_MATVEC_LANES` (threads a row in the single-token kernel, as the command
//! line takes it), `ARBOR_WGPU_SPLIT_K` (likewise), `ARBOR_BENCH_LANES=8,16,32,64` (then also decode at each). After the table,
//! variants are measured back to back with the default: the weights as a byte a weight
//! (`ARBOR_WGPU_PACK=0`, the form before packing; 1 and 16 sequences), 64-token
//! cooperative-matrix tiles (`ARBOR_WGPU_COOP_TOKENS=64`; prefill, 128 and 256 sequences;
//! only where the adapter has cooperative matrices), grouped-query attention
//! (`ARBOR_WGPU_GQA_MIN_TOKENS=1`; prefill, 1, 16, 128 and 256 sequences), the defaults of
//! before 2026-12-06: products whose columns never split (`ARBOR_WGPU_SPLIT_K=0`; prefill,
//! 16, 64 and 256 sequences) and cooperative matrices only from 33 tokens
//! (`ARBOR_WGPU_COOP_MIN_TOKENS=32`; 16 and 32 sequences; both: also 64 and 256),
//! or from 9 tokens with the norm fused up to 8 (`ARBOR_WGPU_COOP_MIN_TOKENS=8`; 2, 4 and 8),
//! two and four rows a
//! thread for single tokens (`ARBOR_WGPU_MATVEC_ROWS`; 1 sequence), the subgroup kernels for
//! up to 16 tokens (`ARBOR_WGPU_MATVEC_SUBGROUP=1`; 1, 8 and 16 sequences) and each lane count
//! (1 and 16 sequences); `ARBOR_BENCH_VARIANTS=0` skips them.

use std::sync::Arc;
use std::time::Instant;

use arbor_model::arch::{preset, DecoderWeights, ModelConfig};
use arbor_model::backend::cpu::CpuBackend;
use arbor_model::backend::wgpu::{PassProfile, WgpuBackend, WgpuOptions};
use arbor_model::sampling::{argmax, Draw};
use arbor_model::{Engine, EngineOptions, ForwardEntry, Model};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    prefill: f64,
    decode1: f64,
    batched: [f64; BATCHES.len()],
    /// Decode of one sequence and of the largest batch with every logit read back.
    host_picks: (f64, f64),
}

const BATCHES: [usize; 6] = [8, 16, 32, 64, 128, 256];
/// The prefill measurement's prompt, as llama-bench's pp512.
const PREFILL_TOKENS: usize = 512;

/// One decode step of `seqs`, each fed its token in `toks`, which the step replaces by the
/// greedy next token: picked by the backend (`device`) or from logits read back.
fn decode_step(
    engine: &mut Engine,
    seqs: &[arbor_model::SeqId],
    toks: &mut [u32],
    device: bool,
) -> anyhow::Result<()> {
    let vocab = engine.config().vocab_size;
    let inputs: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
    if device {
        let greedy = Draw {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
        };
        let entries: Vec<_> = seqs
            .iter()
            .zip(&inputs)
            .map(|(s, t)| ForwardEntry::sampled(*s, t, &greedy))
            .collect();
        let out = engine.forward_at(&entries)?;
        for (t, p) in toks.iter_mut().zip(out.picks) {
            *t = p.0;
        }
    } else {
        let entries: Vec<_> = seqs
            .iter()
            .zip(&inputs)
            .map(|(s, t)| (*s, &t[..]))
            .collect();
        let logits = engine.forward(&entries)?;
        for (i, t) in toks.iter_mut().enumerate() {
            *t = argmax(&logits[i * vocab..(i + 1) * vocab]);
        }
    }
    Ok(())
}

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
    let long: Vec<u32> = (0..PREFILL_TOKENS as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut prefill = Vec::new();
    report(None);
    for rep in 0..4 {
        let s = engine.new_sequence();
        let t = Instant::now();
        engine.forward(&[(s, &long)])?;
        if rep > 0 {
            prefill.push(t.elapsed().as_secs_f64());
        }
        engine.free(s);
    }
    let prefill = long.len() as f64 / median(prefill);
    report(Some("prefill"));

    let rate = |engine: &mut Engine, n: usize, device: bool| -> anyhow::Result<f64> {
        let root = engine.new_sequence();
        engine.forward(&[(root, &prompt)])?;
        let mut seqs = vec![root];
        for _ in 1..n {
            seqs.push(engine.fork(root)?);
        }
        let mut toks: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 7) % vocab).collect();
        // One untimed step (first-use costs), then `steps` timed ones.
        decode_step(engine, &seqs, &mut toks, device)?;
        report(None);
        let t = Instant::now();
        for _ in 0..steps {
            decode_step(engine, &seqs, &mut toks, device)?;
        }
        let rate = (n * steps) as f64 / t.elapsed().as_secs_f64();
        let how = if device { "" } else { ", host picks" };
        report(Some(&format!("decode, {n} sequences{how}")));
        for s in seqs {
            engine.free(s);
        }
        Ok(rate)
    };
    let decode1 = rate(&mut engine, 1, true)?;
    let mut batched = [0f64; BATCHES.len()];
    for (slot, &n) in BATCHES.iter().enumerate() {
        batched[slot] = rate(&mut engine, n, true)?;
    }
    let host_picks = (
        rate(&mut engine, 1, false)?,
        rate(&mut engine, BATCHES[BATCHES.len() - 1], false)?,
    );
    Ok(Figures {
        prefill,
        decode1,
        batched,
        host_picks,
    })
}

/// What a variant measures: prefill (or not), and decode of these counts of sequences.
type Measure = (bool, &'static [usize]);

/// Rates of a backend made with `options`: prefill of a `PREFILL_TOKENS` prompt when
/// `prefill`, then decode of each count of forked sequences in `batches` (tokens/s); and the
/// bytes of weights it holds.
fn variant_rates(
    cfg: &ModelConfig,
    weights: &Arc<DecoderWeights>,
    options: &WgpuOptions,
    allow_software: bool,
    steps: usize,
    (prefill, batches): Measure,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let gpu = WgpuBackend::new(
        cfg.clone(),
        weights.clone(),
        &WgpuOptions {
            allow_software,
            ..options.clone()
        },
    )?;
    let bytes = gpu.weight_bytes() as f64;
    let mut e = Engine::new(Box::new(gpu), EngineOptions::default());
    let vocab = cfg.vocab_size as u32;
    let mut rates = Vec::new();
    if prefill {
        let long: Vec<u32> = (0..PREFILL_TOKENS as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .collect();
        let mut times = Vec::new();
        for rep in 0..4 {
            let s = e.new_sequence();
            let t = Instant::now();
            e.forward(&[(s, &long)])?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            e.free(s);
        }
        rates.push(long.len() as f64 / median(times));
    }
    let prompt: Vec<u32> = (0..128u32).map(|i| (i * 7919 + 13) % vocab).collect();
    for &n in batches {
        let root = e.new_sequence();
        e.forward(&[(root, &prompt)])?;
        let mut seqs = vec![root];
        for _ in 1..n {
            seqs.push(e.fork(root)?);
        }
        let mut toks: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 7) % vocab).collect();
        decode_step(&mut e, &seqs, &mut toks, true)?;
        let t = Instant::now();
        for _ in 0..steps {
            decode_step(&mut e, &seqs, &mut toks, true)?;
        }
        rates.push((n * steps) as f64 / t.elapsed().as_secs_f64());
        for s in seqs {
            e.free(s);
        }
    }
    Ok((rates, bytes))
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
    let matvec_lanes: Option<u32> = std::env::var("ARBOR_WGPU_MATVEC_LANES")
        .ok()
        .map(|v| v.parse().expect("ARBOR_WGPU_MATVEC_LANES: 8, 16, 32 or 64"));
    // Taken by the main measurement too, so a profile can show where a split product's time
    // goes.
    let split_k_workgroups: Option<u32> = std::env::var("ARBOR_WGPU_SPLIT_K").ok().map(|v| {
        v.parse()
            .expect("ARBOR_WGPU_SPLIT_K: a count of workgroups")
    });
    let sweep: Vec<u32> = std::env::var("ARBOR_BENCH_LANES")
        .map(|v| {
            v.split(',')
                .map(|l| {
                    l.trim()
                        .parse()
                        .expect("ARBOR_BENCH_LANES: e.g. 8,16,32,64")
                })
                .collect()
        })
        .unwrap_or_default();
    let threads = rayon::current_num_threads();
    // The device's fixed costs first: at batch 1 on small models they, not bandwidth, bound
    // a decode step (~120 dependent dispatches).
    match arbor_model::backend::wgpu::dispatch_floor(allow_software, 2000) {
        Ok(f) => eprintln!("dispatch floor: {f}"),
        Err(e) => eprintln!("dispatch floor: not measured: {e}"),
    }
    let mut rows = Vec::new();
    for name in shapes.split(',') {
        let t = Instant::now();
        let (cfg, weights) = if name == "model" {
            let path = std::env::var("ARBOR_BENCH_MODEL")
                .map_err(|_| anyhow::anyhow!("shape `model` needs ARBOR_BENCH_MODEL=FILE"))?;
            let m = Model::load(std::path::Path::new(&path))?;
            (m.config, m.weights)
        } else {
            let cfg =
                preset(name).ok_or_else(|| anyhow::anyhow!("unknown shape preset `{name}`"))?;
            let weights = Arc::new(DecoderWeights::synthetic(&cfg, 42)?);
            (cfg, weights)
        };
        eprintln!("{name}: weights in {:.1}s", t.elapsed().as_secs_f64());
        // The two backends must agree before their speeds mean anything: the logits of the
        // prompt's last token, relative to their scale.
        let prompt: Vec<u32> = (0..128u32)
            .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
            .collect();
        let cl = {
            let mut ce = Engine::new(
                Box::new(CpuBackend::new(cfg.clone(), weights.clone())),
                EngineOptions::default(),
            );
            let cs = ce.new_sequence();
            ce.forward(&[(cs, &prompt)])?.to_vec()
        };
        // With cooperative matrices where the adapter has them, then (for the ratio in the
        // same run) with the f32 kernels.
        let mut g = None;
        let mut g_f32 = None;
        let mut adapter = None;
        let mut weight_bytes = 0.0;
        for no_cooperative_matrix in [false, true] {
            let t = Instant::now();
            let gpu = WgpuBackend::new(
                cfg.clone(),
                weights.clone(),
                &WgpuOptions {
                    allow_software,
                    profile,
                    no_cooperative_matrix,
                    matvec_lanes,
                    split_k_workgroups,
                    ..Default::default()
                },
            )?;
            let coop = gpu.cooperative_matrix();
            weight_bytes = gpu.weight_bytes() as f64;
            let kernels = if coop {
                "cooperative matrices"
            } else {
                "f32 kernels"
            };
            let profile = gpu.profile();
            adapter = Some(gpu.adapter().clone());
            eprintln!(
                "{name}: uploaded to {} in {:.1}s ({kernels})",
                gpu.adapter().name,
                t.elapsed().as_secs_f64()
            );
            let mut ge = Engine::new(Box::new(gpu), EngineOptions::default());
            let gs = ge.new_sequence();
            let gl = ge.forward(&[(gs, &prompt)])?.to_vec();
            let scale = cl.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = gl
                .iter()
                .zip(&cl)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!(
                "{name} ({kernels}): wgpu vs cpu logits: worst difference {:.3}% of the scale {scale:.2}; argmax {} vs {}",
                100.0 * worst / scale,
                argmax(&gl),
                argmax(&cl)
            );
            ge.free(gs);
            let report = |what: Option<&str>| {
                if let Some(p) = &profile {
                    let taken = PassProfile::take(p);
                    if let Some(what) = what {
                        eprintln!("{name} wgpu profile ({kernels}), {what}: {taken}");
                    }
                }
            };
            let f = measure(ge, &cfg, steps, &report)?;
            eprintln!("{name}: wgpu ({kernels}) {f:?}");
            if coop {
                g = Some(f);
            } else {
                g_f32 = Some(f);
                if g.is_none() {
                    // No cooperative matrices on this adapter: one measurement is all.
                    break;
                }
            }
        }
        let adapter = adapter.expect("measured at least once");
        let (g, g_f32) = match (g, g_f32) {
            (Some(g), f) => (g, f),
            (None, Some(f)) => (f, None),
            (None, None) => unreachable!("measured at least once"),
        };
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
        // Variants of the backend against its defaults, measured back to back: the weights as
        // a byte a weight (the form before packing), 64-token cooperative-matrix tiles (where
        // the adapter has them), the rows kernel for single tokens, grouped-query attention,
        // and the single-token kernel at each lane count asked for.
        let base = WgpuOptions {
            matvec_lanes,
            ..Default::default()
        };
        let mut variants: Vec<(String, WgpuOptions, Measure)> = vec![(
            "a byte a weight (ARBOR_WGPU_PACK=0)".into(),
            WgpuOptions {
                byte_weights: true,
                ..base.clone()
            },
            (false, &[1, 16]),
        )];
        if g_f32.is_some() {
            variants.push((
                "64-token cooperative tiles (ARBOR_WGPU_COOP_TOKENS=64)".into(),
                WgpuOptions {
                    coop_tokens: Some(64),
                    ..base.clone()
                },
                (true, &[128, 256]),
            ));
        }
        if g_f32.is_some() {
            variants.push((
                "cooperative matrices from 33 tokens, the default before 2026-12-06 \
                 (ARBOR_WGPU_COOP_MIN_TOKENS=32)"
                    .into(),
                WgpuOptions {
                    coop_min_tokens: Some(32),
                    ..base.clone()
                },
                (false, &[16, 32]),
            ));
            variants.push((
                "cooperative matrices from 9 tokens, the norm fused up to 8 \
                 (ARBOR_WGPU_COOP_MIN_TOKENS=8)"
                    .into(),
                WgpuOptions {
                    coop_min_tokens: Some(8),
                    ..base.clone()
                },
                (false, &[2, 4, 8]),
            ));
            variants.push((
                "f32 kernels where cooperative tiles are few (ARBOR_WGPU_COOP_MIN_WORKGROUPS=64)"
                    .into(),
                WgpuOptions {
                    coop_min_workgroups: Some(64),
                    ..base.clone()
                },
                (true, &[64, 128, 256]),
            ));
            variants.push((
                "neither, the kernels before 2026-12-06 (ARBOR_WGPU_SPLIT_K=0 \
                 ARBOR_WGPU_COOP_MIN_TOKENS=32)"
                    .into(),
                WgpuOptions {
                    split_k_workgroups: Some(0),
                    coop_min_tokens: Some(32),
                    ..base.clone()
                },
                (true, &[16, 32, 64, 256]),
            ));
        }
        variants.push((
            "no column splits (ARBOR_WGPU_SPLIT_K=0)".into(),
            WgpuOptions {
                split_k_workgroups: Some(0),
                ..base.clone()
            },
            (true, &[16, 64, 256]),
        ));
        variants.push((
            "the subgroup kernels for up to 16 tokens (ARBOR_WGPU_MATVEC_SUBGROUP=1)".into(),
            WgpuOptions {
                matvec_subgroups: true,
                ..base.clone()
            },
            (false, &[1, 8, 16]),
        ));
        for rows in [2, 4] {
            variants.push((
                format!("{rows} rows a thread for single tokens (ARBOR_WGPU_MATVEC_ROWS={rows})"),
                WgpuOptions {
                    matvec_rows: Some(rows),
                    ..base.clone()
                },
                (false, &[1]),
            ));
        }
        variants.push((
            "grouped-query attention (ARBOR_WGPU_GQA_MIN_TOKENS=1)".into(),
            WgpuOptions {
                gqa_min_tokens: Some(1),
                ..base.clone()
            },
            (true, &[1, 16, 128, 256]),
        ));
        for lanes in &sweep {
            variants.push((
                format!("{lanes} lanes a row"),
                WgpuOptions {
                    matvec_lanes: Some(*lanes),
                    ..Default::default()
                },
                (false, &[1, 16]),
            ));
        }
        if std::env::var_os("ARBOR_BENCH_VARIANTS").is_some_and(|v| v == "0") {
            variants.clear();
        }
        for (label, options, what) in &variants {
            let (want, _) = variant_rates(&cfg, &weights, &base, allow_software, steps, *what)?;
            let (got, bytes) =
                variant_rates(&cfg, &weights, options, allow_software, steps, *what)?;
            let names = what
                .0
                .then(|| format!("prefill {PREFILL_TOKENS}"))
                .into_iter()
                .chain(what.1.iter().map(|&n| match n {
                    1 => "1 sequence".to_string(),
                    n => format!("{n} sequences"),
                }));
            let figures: Vec<String> = names
                .zip(got.iter().zip(&want))
                .map(|(n, (g, w))| {
                    format!("{n} {g:.1} tokens/s ({:.2}x the default's {w:.1})", g / w)
                })
                .collect();
            eprintln!(
                "{name}: with {label}: {}; {:.3} GB of weights",
                figures.join(", "),
                bytes / 1e9
            );
        }
        rows.push((name.to_string(), weight_bytes, adapter, g, g_f32, c));
    }
    println!(
        "\nTokens/s (higher is better); CPU backend on {threads} threads; ratio = wgpu / cpu.\n"
    );
    for (name, weight_bytes, adapter, g, g_f32, c) in &rows {
        println!(
            "### {name} shapes on {} ({}, {})\n",
            adapter.name, adapter.backend, adapter.device_type
        );
        if g_f32.is_some() {
            println!("wgpu: batched products on cooperative matrices; \"f32 kernels\": the same backend without them.\n");
            println!("| measurement | wgpu | f32 kernels | wgpu / f32 | cpu | wgpu / cpu |");
            println!("|---|---|---|---|---|---|");
        } else {
            println!("| measurement | wgpu | cpu | wgpu / cpu |");
            println!("|---|---|---|---|");
        }
        let row = |label: String, pick: &dyn Fn(&Figures) -> f64| {
            let gv = pick(g);
            let mut line = format!("| {label} | {gv:.1} |");
            if let Some(f) = g_f32 {
                let fv = pick(f);
                line += &format!(" {fv:.1} | {:.2}x |", gv / fv);
            }
            match c.as_ref().map(pick) {
                Some(cv) => line += &format!(" {cv:.1} | {:.2}x |", gv / cv),
                None => line += " n/a | n/a |",
            }
            println!("{line}");
        };
        row(format!("prefill, {PREFILL_TOKENS}-token prompt"), &|f| {
            f.prefill
        });
        row("decode, 1 sequence".into(), &|f| f.decode1);
        for (i, n) in BATCHES.iter().enumerate() {
            row(format!("decode, {n} forked sequences (aggregate)"), &|f| {
                f.batched[i]
            });
        }
        let big = BATCHES[BATCHES.len() - 1];
        row("decode, 1 sequence, host picks".into(), &|f| f.host_picks.0);
        row(
            format!("decode, {big} forked sequences, host picks"),
            &|f| f.host_picks.1,
        );
        let bytes = *weight_bytes;
        println!(
            "\nsingle-sequence decode reads {:.2} GB of weights per token: {:.0} GB/s on the GPU; \
             device picks / host picks: 1 sequence {:.2}x, {big} sequences {:.2}x\n",
            bytes / 1e9,
            bytes * g.decode1 / 1e9,
            g.decode1 / g.host_picks.0,
            g.batched[BATCHES.len() - 1] / g.host_picks.1,
        );
    }
    Ok(())
}

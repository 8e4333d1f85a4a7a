//! Engine speed against llama.cpp, in one run, on the same model and thread count.
//!
//! `cargo bench --bench engine` measures Arbor's CPU backend (prefill of a 128-token prompt,
//! single-sequence decode, and aggregate decode of 8 and 32 sequences forked from one prompt),
//! then runs `benches/llama_cpp_baseline.py` (llama-cpp-python, same threads) when it is
//! installed, and prints both with their ratios. Shared machines are noisy: compare ratios.
//! Each round measures Arbor and then llama.cpp, back to back; the table reports medians over
//! rounds and the median of the per-round ratios, which is what survives a noisy machine.
//! Options (env): `ARBOR_BENCH_THREADS` (default: all cores), `ARBOR_BENCH_ROUNDS` (default 3),
//! `ARBOR_BENCH_SKIP_LLAMA=1`.

use std::process::Command;
use std::time::Instant;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::fetch::ensure_default_model;
use arbor_model::sampling::argmax;
use arbor_model::{Engine, EngineOptions, Model};

const PROMPT_SEED_TEXT: &str =
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and \
bakes muffins for her friends every day with four. She sells the remainder at the \
farmers' market daily for $2 per fresh duck egg. How much in dollars does she make \
every day at the farmers' market? Let's think step by step. First, we count the eggs \
that are left after breakfast and baking, then multiply by the price of one egg. ";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Clone, Copy, Debug)]
struct Figures {
    prefill: f64,
    decode1: f64,
    decode8: f64,
    decode32: f64,
}

fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::var("ARBOR_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let rounds: usize = std::env::var("ARBOR_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let path = ensure_default_model(&mut |_| {})?;
    let model = Model::load(&path)?;
    let skip_llama = std::env::var_os("ARBOR_BENCH_SKIP_LLAMA").is_some();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..rounds {
        let a = measure_arbor(&model)?;
        eprintln!("round {round}: arbor {a:?}");
        ours.push(a);
        if !skip_llama {
            if let Some(l) = measure_llama(&path, threads) {
                eprintln!("round {round}: llama.cpp {l:?}");
                theirs.push(l);
            }
        }
    }
    let med = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    let ratio = |f: fn(&Figures) -> f64| -> Option<f64> {
        (theirs.len() == ours.len())
            .then(|| median(ours.iter().zip(&theirs).map(|(a, b)| f(a) / f(b)).collect()))
    };
    let row = |name: &str, f: fn(&Figures) -> f64| {
        let o = med(&ours, f);
        match (theirs.is_empty(), ratio(f)) {
            (false, Some(r)) => println!("| {name} | {o:.1} | {:.1} | {r:.2}x |", med(&theirs, f)),
            _ => println!("| {name} | {o:.1} | n/a | n/a |"),
        }
    };
    println!("\nQwen2.5-Coder-0.5B-Instruct Q4_K_M, {threads} threads, tokens/s (higher is better), median of {rounds} rounds\n");
    println!("| measurement | Arbor (cpu) | llama.cpp | Arbor / llama.cpp (median of per-round ratios) |");
    println!("|---|---|---|---|");
    row("prefill, 128-token prompt", |f| f.prefill);
    row("decode, 1 sequence", |f| f.decode1);
    row("decode, 8 forked sequences (aggregate)", |f| f.decode8);
    row("decode, 32 forked sequences (aggregate)", |f| f.decode32);
    println!(
        "\nArbor batched/single (median of per-round ratios): x8 {:.2}x, x32 {:.2}x",
        median(ours.iter().map(|f| f.decode8 / f.decode1).collect()),
        median(ours.iter().map(|f| f.decode32 / f.decode1).collect())
    );
    Ok(())
}

fn measure_llama(path: &std::path::Path, threads: usize) -> Option<Figures> {
    let out = Command::new("python3")
        .args([
            "benches/llama_cpp_baseline.py",
            "--threads",
            &threads.to_string(),
            "--model",
        ])
        .arg(path)
        .output();
    let v: serde_json::Value = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok()?,
        Ok(o) => {
            eprintln!(
                "llama.cpp baseline failed: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return None;
        }
        Err(e) => {
            eprintln!("llama.cpp baseline not run: {e}");
            return None;
        }
    };
    let par = |n: u64| {
        v["decode_parallel"]
            .as_array()?
            .iter()
            .find(|e| e["n_seq"].as_u64() == Some(n))?["aggregate_tokens_per_s"]
            .as_f64()
    };
    Some(Figures {
        prefill: v.pointer("/prefill/tokens_per_s")?.as_f64()?,
        decode1: v.pointer("/decode_1/tokens_per_s")?.as_f64()?,
        decode8: par(8)?,
        decode32: par(32)?,
    })
}

fn measure_arbor(model: &Model) -> anyhow::Result<Figures> {
    let vocab = model.config.vocab_size;
    let mut engine = Engine::new(
        Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
        EngineOptions::default(),
    );
    let mut text = PROMPT_SEED_TEXT.to_string();
    while model.tokenizer.encode(&text, false)?.len() < 128 {
        text.push_str(PROMPT_SEED_TEXT);
    }
    let prompt: Vec<u32> = model.tokenizer.encode(&text, false)?[..128].to_vec();

    // Prefill: one untimed warm-up, then the median of three.
    let mut prefill = Vec::new();
    for rep in 0..4 {
        let s = engine.new_sequence();
        let t = Instant::now();
        engine.forward(&[(s, &prompt)])?;
        if rep > 0 {
            prefill.push(t.elapsed().as_secs_f64());
        }
        engine.free(s);
    }
    let prefill_tps = prompt.len() as f64 / median(prefill);

    // Single-sequence greedy decode of 64 tokens.
    let s = engine.new_sequence();
    let mut tok = argmax(engine.forward(&[(s, &prompt)])?);
    let steps = 64;
    let t = Instant::now();
    for _ in 0..steps {
        tok = argmax(engine.forward(&[(s, &[tok])])?);
    }
    let decode1_tps = steps as f64 / t.elapsed().as_secs_f64();
    engine.free(s);

    // N sequences forked from one prefilled prompt; sequence i starts from the i-th best token.
    let mut parallel = Vec::new();
    for n in [8usize, 32] {
        let root = engine.new_sequence();
        let logits = engine.forward(&[(root, &prompt)])?.to_vec();
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let mut seqs = vec![root];
        for _ in 1..n {
            seqs.push(engine.fork(root)?);
        }
        let mut toks: Vec<u32> = order[..n].to_vec();
        let steps = 32;
        let t = Instant::now();
        for _ in 0..steps {
            let inputs: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
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
        parallel.push((n * steps) as f64 / t.elapsed().as_secs_f64());
        for s in seqs {
            engine.free(s);
        }
    }
    Ok(Figures {
        prefill: prefill_tps,
        decode1: decode1_tps,
        decode8: parallel[0],
        decode32: parallel[1],
    })
}

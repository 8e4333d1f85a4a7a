//! Engine speed against llama.cpp, in one run, on the same model and thread count.
//!
//! `cargo bench --bench engine` measures Arbor's CPU backend (prefill of a 128-token prompt,
//! single-sequence decode, and aggregate decode of 8 and 32 sequences forked from one prompt),
//! then runs `benches/llama_cpp_baseline.py` (llama-cpp-python, same threads) when it is
//! installed, and prints both with their ratios. Shared machines are noisy: compare ratios.
//! Options (env): `ARBOR_BENCH_THREADS` (default: all cores), `ARBOR_BENCH_SKIP_LLAMA=1`.

use std::process::Command;
use std::time::Instant;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::fetch::ensure_default_model;
use arbor_model::sampling::argmax;
use arbor_model::{Engine, EngineOptions, Model};

const PROMPT_SEED_TEXT: &str = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and \
bakes muffins for her friends every day with four. She sells the remainder at the \
farmers' market daily for $2 per fresh duck egg. How much in dollars does she make \
every day at the farmers' market? Let's think step by step. First, we count the eggs \
that are left after breakfast and baking, then multiply by the price of one egg. ";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::var("ARBOR_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    });
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let path = ensure_default_model(&mut |_| {})?;
    let model = Model::load(&path)?;
    let vocab = model.config.vocab_size;
    let mut engine = Engine::new(Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())), EngineOptions::default());
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
    eprintln!("arbor prefill: {prefill_tps:.1} tok/s");

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
    eprintln!("arbor decode x1: {decode1_tps:.1} tok/s");

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
            let entries: Vec<_> = seqs.iter().zip(&inputs).map(|(s, t)| (*s, &t[..])).collect();
            let logits = engine.forward(&entries)?;
            for (i, t) in toks.iter_mut().enumerate() {
                *t = argmax(&logits[i * vocab..(i + 1) * vocab]);
            }
        }
        let tps = (n * steps) as f64 / t.elapsed().as_secs_f64();
        eprintln!("arbor decode x{n}: {tps:.1} tok/s aggregate; KV blocks in use {}", engine.kv_blocks_in_use());
        for s in seqs {
            engine.free(s);
        }
        parallel.push((n, tps));
    }

    let llama = if std::env::var_os("ARBOR_BENCH_SKIP_LLAMA").is_some() {
        None
    } else {
        let out = Command::new("python3")
            .args(["benches/llama_cpp_baseline.py", "--threads", &threads.to_string(), "--model"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => serde_json::from_slice::<serde_json::Value>(&o.stdout).ok(),
            Ok(o) => {
                eprintln!("llama.cpp baseline failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
                None
            }
            Err(e) => {
                eprintln!("llama.cpp baseline not run: {e}");
                None
            }
        }
    };
    let l = |ptr: &str| llama.as_ref().and_then(|v| v.pointer(ptr)).and_then(|v| v.as_f64());
    let lpar = |n: usize| {
        llama.as_ref().and_then(|v| v["decode_parallel"].as_array()).and_then(|a| {
            a.iter().find(|e| e["n_seq"].as_u64() == Some(n as u64)).and_then(|e| e["aggregate_tokens_per_s"].as_f64())
        })
    };
    let row = |name: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!("| {name} | {ours:.1} | {t:.1} | {:.2}x |", ours / t),
        None => println!("| {name} | {ours:.1} | n/a | n/a |"),
    };
    println!("\nQwen2.5-Coder-0.5B-Instruct Q4_K_M, {threads} threads, tokens/s (higher is better)\n");
    println!("| measurement | Arbor (cpu) | llama.cpp | Arbor / llama.cpp |");
    println!("|---|---|---|---|");
    row("prefill, 128-token prompt", prefill_tps, l("/prefill/tokens_per_s"));
    row("decode, 1 sequence", decode1_tps, l("/decode_1/tokens_per_s"));
    for (n, tps) in &parallel {
        row(&format!("decode, {n} forked sequences (aggregate)"), *tps, lpar(*n));
    }
    println!("\nArbor batched/single: x8 {:.2}x, x32 {:.2}x", parallel[0].1 / decode1_tps, parallel[1].1 / decode1_tps);
    Ok(())
}

//! Tree throughput: MCTS selections and backups per second on one core, with a policy and a scorer
//! that cost (almost) nothing, so the tree's own work is what is measured.
//!
//! Run with `cargo bench -p arbor-search --bench tree`. The first row (one simulation in flight)
//! is the baseline; the others batch many simulations per policy call under virtual loss. "Node
//! visits" are nodes passed during selection plus edges updated during backup; the target is at
//! least 1M per second per core. Expansion, request building and scoring are included in the
//! time, so the figure is a lower bound on raw selection/backup speed.

use std::time::Instant;

use arbor_search::{
    Policy, PolicyCost, PolicyError, Proposals, ProposeRequest, ProposedStep, ScoreError,
    ScoreRequest, Scorer, Search, SearchConfig, SearchControl, StepScores, StepStop,
};

/// Returns `k` one-token steps at once; log-probs vary with the seed so priors differ.
struct ZeroCostPolicy;

impl Policy for ZeroCostPolicy {
    async fn propose(&self, batch: Vec<ProposeRequest>) -> Result<Vec<Proposals>, PolicyError> {
        Ok(batch
            .iter()
            .map(|r| Proposals {
                steps: (0..r.k)
                    .map(|j| {
                        let h = r
                            .sampling
                            .seed
                            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            .wrapping_add(u64::from(j) << 17);
                        ProposedStep {
                            text: String::new(),
                            token_ids: vec![1],
                            token_logprobs: vec![-((h >> 40) as f32) / 16_777_216.0],
                            stop: StepStop::Delimiter,
                        }
                    })
                    .collect(),
                cost: PolicyCost {
                    generated_tokens: u64::from(r.k),
                    ..PolicyCost::default()
                },
            })
            .collect())
    }
}

/// Scores only the last step (an outcome model), from its log-prob: O(1) per request.
struct ZeroCostScorer;

impl Scorer for ZeroCostScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        Ok(batch
            .iter()
            .map(|r| {
                let mut scores = vec![0.5; r.steps.len()];
                if let (Some(last), Some(step)) = (scores.last_mut(), r.steps.last()) {
                    *last = step.mean_logprob().exp() as f32;
                }
                StepScores {
                    scores,
                    cost: Default::default(),
                }
            })
            .collect())
    }
}

struct Row {
    label: &'static str,
    in_flight: u32,
    simulations: u64,
    node_visits: u64,
    nodes: u64,
    seconds: f64,
}

fn measure(label: &'static str, in_flight: u32, expand_k: u32, simulations: u32) -> Row {
    let config = SearchConfig::from_json(&format!(
        r#"{{"strategy": {{"kind": "mcts", "expand_k": {expand_k}, "simulations_in_flight": {in_flight},
              "max_simulations": {simulations}}},
            "max_depth": 4096, "budget": {{"max_nodes": 4000000}}}}"#
    ))
    .expect("bench config");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut search = Search::new("bench", config).expect("search");
    let started = Instant::now();
    let outcome = runtime
        .block_on(search.run(&ZeroCostPolicy, &ZeroCostScorer, &SearchControl::new()))
        .expect("run");
    let seconds = started.elapsed().as_secs_f64();
    search.tree().check_invariants().expect("invariants");
    Row {
        label,
        in_flight,
        simulations: outcome.stats.simulations,
        node_visits: outcome.stats.node_visits,
        nodes: outcome.costs.nodes,
        seconds,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then a short smoke
    // run (in debug mode) only checks that the bench works.
    let full = std::env::args().any(|a| a == "--bench");
    let simulations = if full { 300_000 } else { 2_000 };
    // Warm the allocator and caches once before measuring.
    measure("warm-up", 1, 4, simulations / 15);
    let rows = [
        measure("baseline: 1 in flight, k=4", 1, 4, simulations),
        measure("8 in flight, k=4", 8, 4, simulations),
        measure("64 in flight, k=4", 64, 4, simulations),
        measure("256 in flight, k=4", 256, 4, simulations),
        measure("64 in flight, k=2 (deeper)", 64, 2, simulations),
    ];
    println!(
        "{:<28} {:>9} {:>12} {:>12} {:>10} {:>8} {:>14} {:>10} {:>9}",
        "scenario",
        "in flight",
        "simulations",
        "node visits",
        "tree nodes",
        "time ms",
        "visits/s",
        "sims/s",
        "vs base"
    );
    let base = rows[0].node_visits as f64 / rows[0].seconds;
    for r in &rows {
        let visits_per_s = r.node_visits as f64 / r.seconds;
        println!(
            "{:<28} {:>9} {:>12} {:>12} {:>10} {:>8.1} {:>14.0} {:>10.0} {:>8.2}x",
            r.label,
            r.in_flight,
            r.simulations,
            r.node_visits,
            r.nodes,
            r.seconds * 1e3,
            visits_per_s,
            r.simulations as f64 / r.seconds,
            visits_per_s / base,
        );
    }
    let worst = rows
        .iter()
        .map(|r| r.node_visits as f64 / r.seconds)
        .fold(f64::INFINITY, f64::min);
    if full {
        println!(
            "\ntarget >= 1,000,000 node visits/s per core: {}",
            if worst >= 1e6 { "met" } else { "NOT met" }
        );
    } else {
        println!("\nsmoke run only (debug build); run `cargo bench` for figures");
    }
}

//! End to end: every strategy on a real GSM8K question with the real default model.

use std::sync::OnceLock;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::{Engine, EngineOptions, Model};
use arbor_search::{LogProbScorer, Search, SearchConfig, SearchControl};
use arbor_worker::{LocalWorker, WorkerOptions};

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path =
            arbor_model::fetch::ensure_default_model(&mut |_| {}).expect("fetch default model");
        Model::load(&path).expect("load default model")
    })
}

fn worker() -> LocalWorker {
    worker_with(EngineOptions::default(), WorkerOptions::default())
}

fn worker_with(engine_options: EngineOptions, options: WorkerOptions) -> LocalWorker {
    let m = model();
    let engine = Engine::new(
        Box::new(CpuBackend::new(m.config.clone(), m.weights.clone())),
        engine_options,
    );
    LocalWorker::new(m, engine, options)
}

#[test]
fn a_full_kv_pool_drops_the_prefix_cache_instead_of_failing_the_search() {
    // 48 blocks of 16 tokens: room for one call's sequences, not for them plus a cache that
    // is allowed to keep far more than that.
    let w = worker_with(
        EngineOptions {
            kv_blocks_max: 48,
            batch_tokens_max: 512,
        },
        WorkerOptions {
            prefix_cache_blocks_max: 10_000,
            ..WorkerOptions::default()
        },
    );
    let prompt = w.format_question(QUESTION).unwrap();
    let config = SearchConfig::from_json(
        r#"{"strategy": {"kind": "beam", "beam_width": 2, "proposals_per_beam": 2}, "scoring": {"scorer": "log_prob"},
            "sampling": {"temperature": 0.7, "top_p": 1.0, "max_step_tokens": 48},
            "budget": {"max_generated_tokens": 500}}"#,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut search = Search::new(prompt, config).unwrap();
    let outcome = rt
        .block_on(search.run(&w, &LogProbScorer, &SearchControl::new()))
        .unwrap();
    search.tree().check_invariants().unwrap();
    assert_eq!(
        outcome.stats.policy_errors, 0,
        "no call may fail: {:?}",
        outcome.stats
    );
    assert!(
        outcome.costs.generated_tokens >= 400,
        "the search ran to its budget: {:?}",
        outcome.costs
    );
    let (live, blocks, cached) = w.engine_usage();
    assert_eq!(live, cached);
    assert!(blocks <= 48);
}

/// The first GSM8K training question (answer 72).
const QUESTION: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?";

fn run(strategy_json: &str, budget_tokens: u64) {
    let w = worker();
    let prompt = w.format_question(QUESTION).unwrap();
    let config = SearchConfig::from_json(&format!(
        r#"{{"strategy": {strategy_json}, "scoring": {{"scorer": "log_prob"}}, "seed": 3,
            "sampling": {{"temperature": 0.7, "top_p": 1.0, "max_step_tokens": 64}},
            "budget": {{"max_generated_tokens": {budget_tokens}}}}}"#
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut search = Search::new(prompt, config).unwrap();
    let outcome = rt
        .block_on(search.run(&w, &LogProbScorer, &SearchControl::new()))
        .unwrap();
    search.tree().check_invariants().unwrap();
    let stats = w.stats();
    let c = &outcome.costs;
    // The search's counters are exactly what the worker computed.
    assert_eq!(
        c.generated_tokens, stats.generated_tokens,
        "{strategy_json}"
    );
    assert_eq!(
        c.prompt_tokens_computed, stats.prompt_tokens_computed,
        "{strategy_json}"
    );
    assert_eq!(c.policy_calls, stats.propose_calls, "{strategy_json}");
    assert!(
        c.generated_tokens > 0 && c.generated_tokens <= budget_tokens + 16,
        "{strategy_json}: {c:?}"
    );
    assert!(c.nodes >= 2);
    let (live, _, cached) = w.engine_usage();
    assert_eq!(
        live, cached,
        "between calls every live sequence belongs to the prefix cache"
    );
    assert!(
        c.prompt_tokens_reused > 0,
        "{strategy_json}: expansions should reuse cached prefixes: {c:?}"
    );
    w.clear_prefix_cache();
    assert_eq!(
        w.engine_usage(),
        (0, 0, 0),
        "clearing the cache frees every sequence and block"
    );
    // A well-formed answer: the small model may be wrong, but it must give a number.
    let answer = outcome.answer.unwrap_or_else(|| {
        panic!(
            "{strategy_json}: no answer within budget; tree: {:?}",
            search.tree().export()
        )
    });
    assert!(!answer.answer.key.is_empty(), "{strategy_json}");
    assert!(
        answer.answer.key.parse::<f64>().is_ok(),
        "{strategy_json}: answer {:?} is not a number",
        answer.answer
    );
    eprintln!(
        "{strategy_json}: answer {} ({} generated tokens, {} nodes)",
        answer.answer.raw, c.generated_tokens, c.nodes
    );
}

#[test]
fn every_strategy_answers_a_gsm8k_question_with_exact_costs() {
    for (strategy, budget) in [
        (r#"{"kind": "self_consistency", "n": 2}"#, 500),
        (r#"{"kind": "best_of_n", "n": 2}"#, 500),
        (r#"{"kind": "weighted_best_of_n", "n": 2}"#, 500),
        (
            r#"{"kind": "beam", "beam_width": 2, "proposals_per_beam": 2}"#,
            1200,
        ),
        (r#"{"kind": "dvts", "beams": 2, "width": 2}"#, 1200),
        (
            r#"{"kind": "mcts", "expand_k": 2, "simulations_in_flight": 2, "rollout": {"max_steps": 6}}"#,
            1200,
        ),
    ] {
        run(strategy, budget);
    }
}

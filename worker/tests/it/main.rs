//! End to end: every strategy on a real GSM8K question with the real default model.

mod prm;

use std::sync::OnceLock;
use std::time::Duration;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::{Engine, EngineOptions, Model, SamplingParams};
use arbor_search::{LogProbScorer, Search, SearchConfig, SearchControl};
use arbor_worker::{ExpandItem, LocalWorker, WorkerError, WorkerOptions};

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
            prefix_cache_blocks_max: Some(10_000),
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

fn item(w: &LocalWorker, text: &str, k: usize, max_tokens: usize, seed: u64) -> ExpandItem {
    ExpandItem {
        prompt: w.tokenizer().encode(text, false).unwrap(),
        k,
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.8,
            seed,
            ..Default::default()
        },
        stop: vec![],
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Continuous batching across calls: three clients at once share forward passes, and each gets
/// exactly the samples it gets alone.
#[test]
fn concurrent_calls_share_forward_passes_and_match_running_alone() {
    let rt = runtime();
    let prompts = [
        "def fib(n):\n",
        "The capital of France is",
        "Once upon a time",
    ];
    let alone_worker = worker();
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let items = vec![item(&alone_worker, p, 2, 10, i as u64)];
        alone.push(rt.block_on(alone_worker.expand(items, None)).unwrap());
    }
    let passes_alone = alone_worker.stats().forward_passes;

    let w = worker();
    let together = rt.block_on(async {
        let calls = prompts.iter().enumerate().map(|(i, p)| {
            let w = w.clone();
            let items = vec![item(&w, p, 2, 10, i as u64)];
            tokio::spawn(async move { w.expand(items, None).await })
        });
        let mut out = Vec::new();
        for c in calls.collect::<Vec<_>>() {
            out.push(c.await.unwrap().unwrap());
        }
        out
    });
    for (a, t) in alone.iter().zip(&together) {
        for (sa, st) in a[0].samples.iter().zip(&t[0].samples) {
            assert_eq!(sa.tokens, st.tokens);
            assert_eq!(sa.logprobs, st.logprobs);
        }
    }
    let passes_together = w.stats().forward_passes;
    assert!(
        passes_together < passes_alone,
        "shared passes: {passes_together} together vs {passes_alone} one after another"
    );
    assert_eq!(w.in_flight(), 0);
}

/// The CPU backend, noting when it is dropped.
struct NotesDrop {
    inner: CpuBackend,
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for NotesDrop {
    fn drop(&mut self) {
        self.dropped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl arbor_model::backend::Backend for NotesDrop {
    fn name(&self) -> &'static str {
        "notes-drop"
    }
    fn config(&self) -> &arbor_model::ModelConfig {
        self.inner.config()
    }
    fn ensure_kv_blocks(&mut self, n_blocks: usize) -> arbor_model::Result<()> {
        self.inner.ensure_kv_blocks(n_blocks)
    }
    fn copy_kv_block(&mut self, src: u32, dst: u32, n_tokens: usize) {
        self.inner.copy_kv_block(src, dst, n_tokens)
    }
    fn forward(
        &mut self,
        batch: &arbor_model::backend::ForwardBatch<'_>,
        logits: &mut Vec<f32>,
        hidden: &mut Vec<f32>,
    ) -> arbor_model::Result<()> {
        self.inner.forward(batch, logits, hidden)
    }
}

/// When the last handle to a worker goes, its engine (and so a GPU device) is dropped before
/// the drop returns: a command that returns from `main` right after no longer races the
/// engine thread's teardown (the likely cause of a SIGSEGV at exit on NVIDIA's driver).
#[test]
fn dropping_the_last_worker_handle_drops_the_engine_before_it_returns() {
    let m = model();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backend = NotesDrop {
        inner: CpuBackend::new(m.config.clone(), m.weights.clone()),
        dropped: dropped.clone(),
    };
    let w = LocalWorker::new(
        m,
        Engine::new(Box::new(backend), EngineOptions::default()),
        WorkerOptions::default(),
    );
    let rt = runtime();
    let other = w.clone();
    rt.block_on(w.expand(vec![item(&w, "Hello", 1, 2, 0)], None))
        .unwrap();
    drop(w);
    assert!(
        !dropped.load(std::sync::atomic::Ordering::SeqCst),
        "another handle keeps the engine"
    );
    drop(other);
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the engine is gone once the last handle is"
    );
}

/// A burst of calls that together need more KV blocks than the cache has, each fitting alone:
/// calls that find the cache full wait for others to finish instead of failing (before, a
/// decode pass that outgrew the cache failed every call in it), and each gets exactly the
/// samples it gets alone. A call too large for the empty cache still fails, naming the limit.
#[test]
fn a_burst_larger_than_the_kv_cache_waits_instead_of_failing() {
    let rt = runtime();
    let prompts = [
        "def fib(n):\n",
        "The capital of France is",
        "Once upon a time",
        "Water boils at",
        "The first prime numbers are",
        "import numpy as np\n",
    ];
    // 4 samples of 40 tokens after a short prompt: about 13 blocks of 16 tokens a call.
    let call = |w: &LocalWorker, i: usize| vec![item(w, prompts[i], 4, 40, i as u64)];
    let big = worker();
    let alone: Vec<_> = (0..prompts.len())
        .map(|i| rt.block_on(big.expand(call(&big, i), None)).unwrap())
        .collect();
    // 3 samples of 100 counting tokens: about 21 blocks, which fit only when nothing else
    // (finished calls' cached sequences included) holds any.
    let large = |w: &LocalWorker| vec![item(w, "1, 2, 3, 4, 5, 6,", 3, 100, 7)];
    let large_alone = rt.block_on(big.expand(large(&big), None)).unwrap();
    let large_tokens: usize = large_alone[0].samples.iter().map(|s| s.tokens.len()).sum();
    assert!(large_tokens >= 270, "{large_tokens} tokens");
    // 24 blocks: room for one call at a time, not for six; without the prefix cache, and with
    // it (then finished calls' sequences hold blocks the others need, and are given back).
    for cache in [false, true] {
        let w = worker_with(
            EngineOptions {
                kv_blocks_max: 24,
                batch_tokens_max: 512,
            },
            WorkerOptions {
                prefix_cache_entries_max: if cache { 4096 } else { 0 },
                ..WorkerOptions::default()
            },
        );
        let (together, too_big) = rt.block_on(async {
            let calls: Vec<_> = (0..prompts.len())
                .map(|i| {
                    let w = w.clone();
                    let items = call(&w, i);
                    tokio::spawn(async move { w.expand(items, None).await })
                })
                .collect();
            // 8 samples of 200 tokens need about 100 blocks: more than the whole cache.
            let huge = {
                let w = w.clone();
                let items = vec![item(&w, prompts[0], 8, 200, 9)];
                tokio::spawn(async move { w.expand(items, None).await })
            };
            let large = {
                let w = w.clone();
                let items = large(&w);
                tokio::spawn(async move { w.expand(items, None).await })
            };
            let mut out = Vec::new();
            for c in calls {
                out.push(c.await.unwrap());
            }
            out.push(large.await.unwrap());
            (out, huge.await.unwrap())
        });
        for (i, (a, t)) in alone
            .iter()
            .chain(std::iter::once(&large_alone))
            .zip(&together)
            .enumerate()
        {
            let t = t
                .as_ref()
                .unwrap_or_else(|e| panic!("cache {cache}: call {i} failed: {e}"));
            for (sa, st) in a[0].samples.iter().zip(&t[0].samples) {
                assert_eq!(sa.tokens, st.tokens, "cache {cache}: call {i}");
                assert_eq!(sa.logprobs, st.logprobs, "cache {cache}: call {i}");
            }
        }
        match too_big {
            Err(WorkerError::Model(e)) => assert!(
                e.to_string().contains("limit is 24 blocks"),
                "the error names the limit: {e}"
            ),
            other => panic!("a call larger than the cache must fail: {other:?}"),
        }
        let s = w.stats();
        assert!(
            s.deferred_calls > 0 || cache,
            "some calls had to wait: {s:?}"
        );
        assert_eq!(s.propose_calls, prompts.len() as u64 + 1);
        assert_eq!(w.in_flight(), 0);
        let (live, blocks, cached) = w.engine_usage();
        assert_eq!(
            live, cached,
            "cache {cache}: only cached sequences are left"
        );
        assert!(blocks <= 24);
        if !cache {
            assert_eq!((live, blocks), (0, 0), "every block given back");
        }
    }
}

/// The prefix cache keeps what it holds while the calls running use most of the KV pool (up
/// to seven eighths by default): a sample's path is still cached after another call held over
/// half the pool, so continuing it computes only the new tokens. (With the cache's old fixed
/// limit, half the default pool, 128 searches in flight on a GPU emptied it every pass.)
#[test]
fn the_prefix_cache_keeps_prefixes_while_running_calls_hold_most_blocks() {
    let rt = runtime();
    // 64 blocks of 16 tokens.
    let w = worker_with(
        EngineOptions {
            kv_blocks_max: 64,
            batch_tokens_max: 512,
        },
        WorkerOptions::default(),
    );
    let first = rt
        .block_on(w.expand(vec![item(&w, "Once upon a time", 1, 24, 1)], None))
        .unwrap();
    let path: Vec<u32> = w
        .tokenizer()
        .encode("Once upon a time", false)
        .unwrap()
        .into_iter()
        .chain(first[0].samples[0].tokens.iter().copied())
        .collect();
    // 4 samples of 150 tokens: about 40 blocks while they decode, and cached after.
    let before = w.stats().prompt_tokens_computed;
    let busy = rt
        .block_on(w.expand(vec![item(&w, "1, 2, 3, 4, 5, 6,", 4, 150, 2)], None))
        .unwrap();
    let held: usize = busy[0].samples.iter().map(|s| s.tokens.len()).sum();
    assert!(
        held >= 400,
        "the busy call held over half the pool: {held} tokens"
    );
    assert!(w.stats().prompt_tokens_computed > before);
    // Continue the first call's sample: its whole path comes from the cache.
    let next = ExpandItem {
        prompt: path.clone(),
        ..item(&w, "", 1, 8, 3)
    };
    let cont = rt.block_on(w.expand(vec![next], None)).unwrap();
    assert_eq!(
        cont[0].prompt_tokens_reused as usize,
        path.len() - 1,
        "the first path was still cached: {:?}",
        w.engine_usage()
    );
    assert_eq!(cont[0].prompt_tokens_computed, 1);
}

/// A call that needs nearly the whole KV pool, made while another call decodes and the prefix
/// cache holds blocks: the cache gives back what it can and the call waits; when it runs alone
/// it gets the whole pool (the cache emptied), and its samples are those it gets on a worker
/// of its own.
#[test]
fn a_call_that_needs_the_whole_pool_waits_and_then_gets_it() {
    let rt = runtime();
    // 3 samples of 100 counting tokens: about 21 blocks of the 24.
    let large = |w: &LocalWorker| vec![item(w, "1, 2, 3, 4, 5, 6,", 3, 100, 7)];
    let big = worker();
    let want = rt.block_on(big.expand(large(&big), None)).unwrap();
    let w = worker_with(
        EngineOptions {
            kv_blocks_max: 24,
            batch_tokens_max: 512,
        },
        WorkerOptions::default(),
    );
    // Cached sequences holding blocks, then a long call holding more.
    rt.block_on(w.expand(vec![item(&w, "Once upon a time", 2, 40, 1)], None))
        .unwrap();
    assert!(w.engine_usage().2 > 0, "the cache holds sequences");
    let got = rt.block_on(async {
        let long = {
            let w = w.clone();
            let items = vec![item(&w, "import numpy as np\n", 1, 160, 2)];
            tokio::spawn(async move { w.expand(items, None).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = w.expand(large(&w), None).await;
        long.await.unwrap().unwrap();
        got
    });
    let got = got.unwrap_or_else(|e| panic!("the large call failed: {e}"));
    assert!(
        w.stats().deferred_calls > 0,
        "it had to wait: {:?}",
        w.stats()
    );
    for (a, b) in want[0].samples.iter().zip(&got[0].samples) {
        assert_eq!(a.tokens, b.tokens);
    }
    let (live, blocks, cached) = w.engine_usage();
    assert_eq!(live, cached);
    assert!(blocks <= 24);
}

/// A caller that goes away (a dropped future: a cancelled RPC, a client that hung up) stops its
/// decoding at the next pass and gives its sequences back.
#[test]
fn dropping_a_call_stops_its_decoding_and_frees_its_sequences() {
    let rt = runtime();
    let w = worker();
    let items = vec![item(&w, "Count to one thousand: 1, 2, 3,", 4, 400, 1)];
    let started = std::time::Instant::now();
    let r = rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(500), w.expand(items, None)).await
    });
    assert!(r.is_err(), "the call is still running when dropped");
    wait_until_idle(&w);
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = w.stats();
    assert_eq!(s.cancelled_calls, 1);
    assert!(
        s.generated_tokens < 4 * 400,
        "decoding stopped early: {s:?}"
    );
    assert_eq!(w.usage().sequences, 0, "a cancelled call keeps nothing");
    assert_eq!(w.usage().kv_blocks, 0);

    // A deadline does the same, and says so.
    let items = vec![item(&w, "Count to one thousand: 1, 2, 3,", 4, 400, 1)];
    let deadline = std::time::Instant::now() + Duration::from_millis(300);
    let err = rt.block_on(w.expand(items, Some(deadline))).unwrap_err();
    assert!(matches!(err, WorkerError::DeadlineExceeded), "{err:?}");
    assert_eq!(w.in_flight(), 0);
    assert_eq!(w.usage().sequences, 0);
}

/// Work beyond the in-flight limit is refused at once instead of queueing without bound.
#[test]
fn calls_beyond_the_limit_are_refused_as_overloaded() {
    let rt = runtime();
    let w = worker_with(
        EngineOptions::default(),
        WorkerOptions {
            calls_in_flight_max: 1,
            ..WorkerOptions::default()
        },
    );
    rt.block_on(async {
        let long = {
            let w = w.clone();
            let items = vec![item(&w, "Count to one thousand: 1, 2, 3,", 2, 200, 1)];
            tokio::spawn(async move { w.expand(items, None).await })
        };
        while w.in_flight() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let err = w
            .expand(vec![item(&w, "Hello", 1, 4, 2)], None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WorkerError::Overloaded {
                    in_flight: 1,
                    limit: 1
                }
            ),
            "{err:?}"
        );
        long.abort();
    });
    wait_until_idle(&w);
}

/// An idle worker gives back what a large pass grew: 64 sequences decoding at once need a
/// 152k-vocabulary row of logits each (39 MB), which the worker keeps only while busy. The
/// next large call grows the buffers again and gets the same samples.
#[test]
fn an_idle_worker_gives_back_the_buffers_of_a_large_pass() {
    let rt = runtime();
    let w = worker();
    let call = || vec![item(&w, "Once upon a time", 64, 3, 7)];
    let first = rt.block_on(w.expand(call(), None)).unwrap();
    wait_until_idle(&w);
    let t = std::time::Instant::now();
    loop {
        let kept = w.usage().scratch_bytes;
        if kept <= 12 << 20 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "an idle worker keeps {kept} bytes of pass buffers"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let again = rt.block_on(w.expand(call(), None)).unwrap();
    for (a, b) in first[0].samples.iter().zip(&again[0].samples) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.logprobs, b.logprobs);
    }
}

fn wait_until_idle(w: &LocalWorker) {
    let t = std::time::Instant::now();
    while w.in_flight() != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "calls never finished"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Scoring a path in chunks gives the same log-prob scores whatever the chunk size, and the
/// same as reading every token's logits in one pass (the unchunked way).
#[test]
fn chunked_path_scores_equal_the_one_pass_scores_for_any_chunk_size() {
    use arbor_model::sampling::log_prob;
    use arbor_worker::PathScorer;
    let m = model();
    let mut engine = Engine::new(
        Box::new(CpuBackend::new(m.config.clone(), m.weights.clone())),
        EngineOptions::default(),
    );
    let prompt = m
        .tokenizer
        .encode("Natalia sold clips to 48 friends.", true)
        .unwrap();
    let steps: Vec<Vec<u32>> = [
        "She sold 24 in May.\n\n",
        "So 48 + 24 = 72.\n\n",
        "The answer is 72.",
    ]
    .iter()
    .map(|s| m.tokenizer.encode(s, false).unwrap())
    .collect();
    // The unchunked reference: every logit row of the whole path at once.
    let all: Vec<u32> = prompt
        .iter()
        .chain(steps.iter().flatten())
        .copied()
        .collect();
    let seq = engine.new_sequence();
    let vocab = m.config.vocab_size;
    let logits = engine.forward_all_logits(&[(seq, &all)]).unwrap().to_vec();
    engine.free(seq);
    let mut at = prompt.len();
    let want: Vec<f32> = steps
        .iter()
        .map(|s| {
            let sum: f64 = (at..at + s.len())
                .map(|p| f64::from(log_prob(&logits[(p - 1) * vocab..p * vocab], all[p])))
                .sum();
            at += s.len();
            (sum / s.len() as f64).exp() as f32
        })
        .collect();
    for chunk in [1, 3, 7, 32, 10_000] {
        let got = PathScorer::run(&mut engine, &prompt, &steps, chunk).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-3, "chunk {chunk}: {got:?} vs {want:?}");
        }
    }
    assert_eq!(engine.n_sequences(), 0, "the scorer frees its sequence");
}

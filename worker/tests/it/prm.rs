//! Process reward models on real paths: the judge, Math-Shepherd's layout and the rollout value
//! with the real default model; the classification head on a tiny model made here, against a
//! plain f32 reference; the value head trained in the test.

use std::collections::HashMap;
use std::sync::Arc;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::tiny::{matvec, Rng, TinyModel, D, EXTRA_0};
use arbor_model::{Engine, EngineOptions, HiddenLayer, Model, SamplingParams};
use arbor_search::{
    Aggregation, ScoreRequest, Scorer, ScorerChoice, Search, SearchConfig, SearchControl, Step,
};
use arbor_worker::prm::value_head::{step_hidden_states, FitOptions, HeadMeta};
use arbor_worker::prm::{
    self, request_from_texts, ClassifierConfig, LabelTokenConfig, PrmConfig, PrmError,
    RolloutScorer, RolloutValueConfig, TagMode, ValueHead, ValueHeadConfig,
};
use arbor_worker::{ExpandItem, LocalWorker, WorkerOptions};

use crate::{model, worker, QUESTION};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A right solution of [`QUESTION`], one step per paragraph as the policy is asked to write.
const RIGHT: [&str; 3] = [
    "In May, Natalia sold 48 / 2 = 24 clips.\n\n",
    "Altogether she sold 48 + 24 = 72 clips in April and May.\n\n",
    "The answer is 72.",
];

/// The final hidden state at every position of `tokens`, the plain way: the whole stream in
/// one fresh sequence.
fn plain_hidden(rt: &tokio::runtime::Runtime, w: &LocalWorker, tokens: Vec<u32>) -> Vec<f32> {
    rt.block_on(w.with_engine(move |e, _| {
        let s = e.new_sequence();
        let h = e.forward_hidden(&[(s, &tokens)]).unwrap().to_vec();
        e.free(s);
        h
    }))
    .unwrap()
}

/// Asserts that `row` is the hidden state at position `at` of `all` (rows of `row.len()`).
fn check_hidden_row(row: &[f32], all: &[f32], at: usize) {
    let d = row.len();
    let err = row
        .iter()
        .zip(&all[at * d..(at + 1) * d])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-3, "hidden state at {at}: max error {err}");
}

fn check_scores(what: &str, scores: &[f32], steps: usize) {
    assert_eq!(scores.len(), steps, "{what}: one score per step");
    for s in scores {
        assert!(
            s.is_finite() && (0.0..=1.0).contains(s),
            "{what}: {scores:?}"
        );
    }
}

/// `P(good) / (P(good) + P(bad))` from a full row of logits, the plain way.
fn by_hand(row: &[f32], good: u32, bad: u32) -> f32 {
    let (g, b) = (row[good as usize].exp(), row[bad as usize].exp());
    g / (g + b)
}

/// The logits after every token of `tokens`, in a fresh sequence of the worker's engine.
fn all_logits(rt: &tokio::runtime::Runtime, w: &LocalWorker, tokens: Vec<u32>) -> Vec<f32> {
    rt.block_on(w.with_engine(move |e, _| {
        let s = e.new_sequence();
        let out = e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec();
        e.free(s);
        out
    }))
    .unwrap()
}

fn token(w: &LocalWorker, text: &str) -> u32 {
    let ids = w.tokenizer().encode(text, false).unwrap();
    assert_eq!(ids.len(), 1, "{text:?}");
    ids[0]
}

/// The judge (the policy asked, in a fork after each step, whether the step is right) gives
/// exactly the two-way softmax of `Yes`/`No` computed by hand from `forward_all_logits` on the
/// whole text; a path the policy wrote itself is read from its prefix cache, one token a step
/// plus the question.
#[test]
fn prm_judge_scores_equal_a_softmax_by_hand_and_reuse_the_prefix_cache() {
    let rt = runtime();
    let w = worker();
    let prompt = w.format_question(QUESTION).unwrap();
    let config = LabelTokenConfig::default();
    let scorer = prm::build(&PrmConfig::LabelToken(config.clone()), &w).unwrap();
    let tag = w.tokenizer().encode(&config.tag, true).unwrap();
    let (yes, no) = (token(&w, "Yes"), token(&w, "No"));
    let vocab = model().config.vocab_size;
    let expected = |steps: &[Arc<Step>]| -> Vec<f32> {
        (0..steps.len())
            .map(|i| {
                let mut tokens = w.tokenizer().encode(&prompt, true).unwrap();
                steps[..=i]
                    .iter()
                    .for_each(|s| tokens.extend_from_slice(&s.token_ids));
                tokens.extend_from_slice(&tag);
                let n = tokens.len();
                let logits = all_logits(&rt, &w, tokens);
                by_hand(&logits[(n - 1) * vocab..n * vocab], yes, no)
            })
            .collect()
    };

    // A path given as text.
    let request = request_from_texts(w.tokenizer(), &prompt, &RIGHT).unwrap();
    let want = expected(&request.steps);
    let got = rt.block_on(scorer.score(vec![request.clone()])).unwrap();
    check_scores("judge", &got[0].scores, 3);
    for (g, e) in got[0].scores.iter().zip(&want) {
        assert!(
            (g - e).abs() < 1e-3,
            "judge {:?} vs by hand {want:?}",
            got[0].scores
        );
    }
    let prompt_len = w.tokenizer().encode(&prompt, true).unwrap().len();
    let path_len: usize = request.steps.iter().map(|s| s.token_ids.len()).sum();
    assert_eq!(
        got[0].cost.tokens_computed as usize,
        prompt_len + path_len + 3 * tag.len(),
        "nothing cached: the path once, the question once per step"
    );
    assert_eq!(w.usage().sequences, 0, "the scorer frees what it creates");

    // A path the policy wrote, step by step: the prefix cache holds it.
    let mut steps: Vec<Arc<Step>> = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..2 {
        let mut tokens = w.tokenizer().encode(&prompt, true).unwrap();
        steps
            .iter()
            .for_each(|s| tokens.extend_from_slice(&s.token_ids));
        let item = ExpandItem {
            prompt: tokens,
            k: 1,
            max_tokens: 48,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: vec!["\n\n".into()],
        };
        let out = rt.block_on(w.expand(vec![item], None)).unwrap();
        let s = &out[0].samples[0];
        stops.push(s.stop_reason.clone());
        steps.push(Arc::new(Step {
            text: s.text.clone(),
            token_ids: s.tokens.clone(),
            token_logprobs: s.logprobs.clone(),
        }));
    }
    let request = ScoreRequest {
        steps: steps.clone(),
        ..request
    };
    let got = rt.block_on(scorer.score(vec![request])).unwrap();
    check_scores("judge on its own path", &got[0].scores, 2);
    let want = expected(&steps);
    for (g, e) in got[0].scores.iter().zip(&want) {
        assert!(
            (g - e).abs() < 1e-3,
            "{:?} vs by hand {want:?}",
            got[0].scores
        );
    }
    // The cache keeps a sample's sequence one token short of it when it stopped at the
    // delimiter (the last token was never fed back), and whole after an end of sequence.
    let short: usize = stops
        .iter()
        .map(|s| usize::from(*s != arbor_model::StopReason::Eos))
        .sum();
    assert_eq!(
        got[0].cost.tokens_computed as usize,
        short + 2 * tag.len(),
        "each step forks the cached sequence of its path ({stops:?})"
    );
    let (live, _, cached) = w.engine_usage();
    assert_eq!(live, cached, "only the cache's own sequences are left");
}

/// Math-Shepherd's inline layout (`question step ки\n…`, `+` against `-` at each tag) reads
/// the logits at exactly the tags' token offsets, with the policy's own tokens and with steps
/// re-tokenized by a reader model of its own (here the same model file loaded again).
#[test]
fn prm_inline_tags_are_read_at_their_token_offsets() {
    let rt = runtime();
    let w = worker();
    let prompt = w.format_question(QUESTION).unwrap();
    let request = request_from_texts(w.tokenizer(), &prompt, &RIGHT).unwrap();
    let vocab = model().config.vocab_size;
    let (plus, minus) = (token(&w, "+"), token(&w, "-"));
    let path = arbor_model::fetch::ensure_default_model(&mut |_| {}).unwrap();
    let shepherd = LabelTokenConfig::math_shepherd(path);
    let own = LabelTokenConfig {
        model: None,
        ..shepherd.clone()
    };
    for config in [own, shepherd] {
        let own_tokens = config.model.is_none();
        let scorer = prm::build(&PrmConfig::LabelToken(config.clone()), &w).unwrap();
        let got = rt.block_on(scorer.score(vec![request.clone()])).unwrap();
        check_scores("math-shepherd layout", &got[0].scores, 3);
        // The same layout built here, piece by piece, and every position's logits.
        let tok = w.tokenizer();
        let mut tokens = tok.encode(&format!("{QUESTION} "), true).unwrap();
        let mut tags = Vec::new();
        for (s, text) in request.steps.iter().zip(RIGHT) {
            if own_tokens {
                tokens.extend_from_slice(&s.token_ids);
            } else {
                tokens.extend(tok.encode(text.trim_end_matches('\n'), false).unwrap());
            }
            tokens.extend(tok.encode(" ки", false).unwrap());
            tags.push(tokens.len() - 1);
            if !own_tokens {
                tokens.extend(tok.encode("\n", false).unwrap());
            }
        }
        let n = tokens.len();
        let logits = all_logits(&rt, &w, tokens);
        for (i, &t) in tags.iter().enumerate() {
            let want = by_hand(&logits[t * vocab..(t + 1) * vocab], plus, minus);
            let g = got[0].scores[i];
            assert!(
                (g - want).abs() < 1e-3,
                "own tokens {own_tokens}, step {i}: {g} vs {want} by hand"
            );
        }
        assert_eq!(
            got[0].cost.tokens_computed as usize, n,
            "own tokens {own_tokens}"
        );
    }
}

const TINY_SYSTEM: &str = "sys";

/// A tiny-model worker (the policy for the classifier test; its chat template frames the
/// question).
fn tiny_worker(dir: &std::path::Path) -> LocalWorker {
    let m = Model::load(dir).unwrap();
    let engine = Engine::new(
        Box::new(CpuBackend::new(m.config.clone(), m.weights.clone())),
        EngineOptions::default(),
    );
    LocalWorker::new(&m, engine, WorkerOptions::default())
}

/// The classification head (Qwen2.5-Math-PRM's `score.0` → ReLU → `score.2`, or one
/// `score.weight`) on a tiny model made here: each step's score is the head's class-1
/// probability at its `<extra_0>`, as a plain f32 reference computes it.
#[test]
fn prm_classifier_head_matches_a_plain_f32_reference() {
    let rt = runtime();
    for two_layers in [true, false] {
        let dir = std::env::temp_dir().join(format!(
            "arbor-prm-classifier-{two_layers}-{}",
            std::process::id()
        ));
        let mut tiny = TinyModel::new("qwen2");
        let mut r = Rng(7);
        let scaled = |r: &mut Rng, n: usize, s: f32| -> Vec<f32> {
            r.vec(n).into_iter().map(|v| v * s).collect()
        };
        if two_layers {
            tiny.push("score.0.weight", vec![D, D], scaled(&mut r, D * D, 1.0));
            tiny.push("score.0.bias", vec![D], scaled(&mut r, D, 1.0));
            tiny.push("score.2.weight", vec![2, D], scaled(&mut r, 2 * D, 1.0));
            tiny.push("score.2.bias", vec![2], vec![0.1, -0.1]);
        } else {
            tiny.push("score.weight", vec![2, D], scaled(&mut r, 2 * D, 4.0));
        }
        tiny.write(&dir).unwrap();
        let policy = tiny_worker(&dir);
        let question = "what is ab + ab?";
        let prompt = policy.format_question_with(TINY_SYSTEM, question).unwrap();
        let steps = [
            "first ab step\n\n",
            "then a second one",
            "so ab it is.",
            "ab",
        ];
        let request = request_from_texts(policy.tokenizer(), &prompt, &steps).unwrap();
        let config = ClassifierConfig {
            model: dir.clone(),
            system: "Reason.".into(),
            ..ClassifierConfig::default()
        };
        let scorer = prm::build(&PrmConfig::Classifier(config), &policy).unwrap();
        let got = rt
            .block_on(scorer.score(vec![request.clone(), request]))
            .unwrap();
        check_scores("classifier", &got[0].scores, steps.len());
        assert_eq!(got[0].scores, got[1].scores, "requests are independent");

        // The reference: the reward model's chat template, steps each followed by
        // <extra_0>, hidden states the plain way, the head in f32.
        let tok = policy.tokenizer();
        let text = format!(
            "<|im_start|>system\nReason.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        );
        let mut tokens = tok.encode(&text, true).unwrap();
        let mut seps = Vec::new();
        for s in steps {
            tokens.extend(tok.encode(s.trim(), false).unwrap());
            tokens.push(EXTRA_0);
            seps.push(tokens.len() - 1);
        }
        assert_eq!(got[0].cost.tokens_computed as usize, tokens.len());
        let hidden = tiny.reference_hidden(&tokens);
        let head = |p: usize| {
            let logits = if two_layers {
                let mut h = matvec(tiny.get("score.0.weight"), &hidden[p], D);
                for (v, b) in h.iter_mut().zip(tiny.get("score.0.bias")) {
                    *v = (*v + b).max(0.0);
                }
                let mut l = matvec(tiny.get("score.2.weight"), &h, 2);
                l[0] += 0.1;
                l[1] -= 0.1;
                l
            } else {
                matvec(tiny.get("score.weight"), &hidden[p], 2)
            };
            1.0 / (1.0 + (logits[0] - logits[1]).exp())
        };
        let want: Vec<f32> = seps.iter().map(|&p| head(p)).collect();
        // Read one token early (the last token of the step's text) for comparison.
        let early: Vec<f32> = seps.iter().map(|&p| head(p - 1)).collect();
        eprintln!(
            "two layers {two_layers}: {:?} vs reference {want:?} (one token early: {early:?})",
            got[0].scores
        );
        // The engine quantizes weights and activations to 8 bits inside the blocks, which
        // moves these probabilities by up to ~0.06; reading the wrong token moves them more.
        let tolerance = 0.08;
        let off = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(
            off(&got[0].scores, &want) < tolerance,
            "two layers {two_layers}: {:?} vs reference {want:?}",
            got[0].scores
        );
        assert!(
            off(&got[0].scores, &early) > 2.0 * tolerance,
            "the test tells the separator from its neighbour"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The rollout value of each step is the share of its k rollouts that agree with their
/// majority answer; what they cost is counted, and a step already valued costs nothing.
#[test]
fn prm_rollout_value_is_the_majority_share_of_k_rollouts() {
    let rt = runtime();
    let w = worker();
    let prompt = w.format_question(QUESTION).unwrap();
    let request = request_from_texts(w.tokenizer(), &prompt, &RIGHT[..2]).unwrap();
    let k = 3;
    let config = RolloutValueConfig {
        rollouts: k,
        temperature: 0.7,
        max_tokens: 64,
        seed: 5,
        last_step_only: false,
    };
    let scorer = RolloutScorer::new(&config, &w).unwrap();
    let before = w.stats();
    let got = rt
        .block_on(scorer.score_with_rollouts(vec![request.clone()]))
        .unwrap();
    let after = w.stats();
    let (scores, rollouts) = &got[0];
    check_scores("rollout", &scores.scores, 2);
    for (value, answers) in scores.scores.iter().zip(rollouts) {
        assert_eq!(answers.len(), k as usize);
        let mut counts: HashMap<&String, u32> = HashMap::new();
        for a in answers.iter().flatten() {
            *counts.entry(a).or_default() += 1;
        }
        let majority = counts.values().copied().max().unwrap_or(0);
        assert_eq!(*value, majority as f32 / k as f32, "{answers:?}");
    }
    eprintln!("rollout values {:?}, answers {rollouts:?}", scores.scores);
    assert!(
        rollouts[1].iter().flatten().any(|a| a == "72"),
        "after the right sum, some rollout answers 72: {rollouts:?}"
    );
    let spent = (after.generated_tokens - before.generated_tokens)
        + (after.prompt_tokens_computed - before.prompt_tokens_computed);
    assert_eq!(scores.cost.tokens_computed, spent);
    // Scored again (its parent and itself, as a search scores a child): memoised.
    let again = rt.block_on(scorer.score(vec![request.clone()])).unwrap();
    assert_eq!(again[0].scores, scores.scores);
    assert_eq!(again[0].cost.tokens_computed, 0);
    // Only the last step, for an outcome-style `aggregation: last`: the same rollouts
    // (same seed, same path) for the last step, none for the first.
    let last_only = RolloutScorer::new(
        &RolloutValueConfig {
            last_step_only: true,
            ..config
        },
        &w,
    )
    .unwrap();
    let got = rt
        .block_on(last_only.score_with_rollouts(vec![request]))
        .unwrap();
    assert!(got[0].0.scores[0].is_nan() && got[0].1[0].is_empty());
    assert_eq!(got[0].0.scores[1], scores.scores[1]);
    assert_eq!(got[0].1[1], rollouts[1]);
}

/// A value head fitted in the test on the policy's hidden states of real paths: the scorer's
/// features are the hidden states at each step's last token (checked against
/// `forward_hidden` on the whole path), its values are the head's predictions, and the head
/// survives a round trip through its file.
#[test]
fn prm_value_head_scores_real_paths_with_a_head_fitted_here() {
    let rt = runtime();
    let w = worker();
    let prompt = w.format_question(QUESTION).unwrap();
    let wrong = [
        RIGHT[0],
        "Altogether she sold 48 + 24 = 60 clips in April and May.\n\n",
        "The answer is 60.",
    ];
    let requests = vec![
        request_from_texts(w.tokenizer(), &prompt, &RIGHT).unwrap(),
        request_from_texts(w.tokenizer(), &prompt, &wrong).unwrap(),
    ];
    let features = rt
        .block_on(step_hidden_states(&w, &requests, &[HiddenLayer::Final]))
        .unwrap();
    let d = model().config.d_model;
    // The same hidden states, the plain way: the whole path in one fresh sequence.
    for (r, (rows, _)) in requests.iter().zip(&features) {
        let mut tokens = w.tokenizer().encode(&prompt, true).unwrap();
        let mut ends = Vec::new();
        for s in &r.steps {
            tokens.extend_from_slice(&s.token_ids);
            ends.push(tokens.len() - 1);
        }
        let all = plain_hidden(&rt, &w, tokens);
        assert_eq!(rows.len(), r.steps.len());
        for (row, &end) in rows.iter().zip(&ends) {
            assert_eq!(row.len(), d);
            check_hidden_row(row, &all, end);
        }
    }
    // Fit "right path" against "wrong path" on these six steps.
    let xs: Vec<Vec<f32>> = features.iter().flat_map(|(rows, _)| rows.clone()).collect();
    let ys = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
    // A linear head (the default of `arbor prm train`): its fit is convex, so it separates six
    // points in 896 dimensions whatever the last bits of the hidden states are. (A hidden
    // layer this small can start with every unit dead on a point and never fit it; the unit
    // tests cover hidden layers on enough data.)
    let meta = HeadMeta::new(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "",
        &model().config,
        0,
    );
    let options = FitOptions {
        hidden_units: 0,
        epochs: 200,
        learning_rate: 0.01,
        l2: 1e-3,
        seed: 1,
        ..FitOptions::default()
    };
    let head = ValueHead::fit(meta, &xs, &ys, &options);
    let path =
        std::env::temp_dir().join(format!("arbor-prm-head-{}.safetensors", std::process::id()));
    head.save(&path).unwrap();
    let config = PrmConfig::ValueHead(ValueHeadConfig { path: path.clone() });
    let scorer = prm::build(&config, &w).unwrap();
    let got = rt.block_on(scorer.score(requests.clone())).unwrap();
    std::fs::remove_file(&path).unwrap();
    for (reply, (rows, _)) in got.iter().zip(&features) {
        check_scores("value head", &reply.scores, 3);
        for (s, row) in reply.scores.iter().zip(rows) {
            assert!((s - head.predict(row)).abs() < 1e-4);
        }
    }
    assert!(
        got[0].scores[2] > 0.5 && got[1].scores[2] < 0.5,
        "the head fits its own training steps: {got:?}"
    );
    // A middle block's state beside the final one: the final part is what was read alone, the
    // middle one differs, and a head on the middle block scores with what it was fitted on.
    let layers = [HiddenLayer::Block(11), HiddenLayer::Final];
    let both = rt
        .block_on(step_hidden_states(&w, &requests, &layers))
        .unwrap();
    let mut middle = Vec::new();
    for ((rows, _), (finals, _)) in both.iter().zip(&features) {
        for (row, fin) in rows.iter().zip(finals) {
            assert_eq!(row.len(), 2 * d);
            let err = row[d..]
                .iter()
                .zip(fin)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-3, "the final layer read beside another: {err}");
            let apart = row[..d].iter().zip(fin).any(|(a, b)| (a - b).abs() > 0.1);
            assert!(apart, "block.11 reads the same values as final_norm");
            middle.push(row[..d].to_vec());
        }
    }
    let meta = HeadMeta::new("policy.gguf", "", &model().config, 0).reading(&layers[..1]);
    let head = ValueHead::fit(meta, &middle, &ys, &options);
    let path =
        std::env::temp_dir().join(format!("arbor-prm-mid-{}.safetensors", std::process::id()));
    head.save(&path).unwrap();
    let config = PrmConfig::ValueHead(ValueHeadConfig { path: path.clone() });
    let scorer = prm::build(&config, &w).unwrap();
    let got = rt.block_on(scorer.score(requests.clone())).unwrap();
    std::fs::remove_file(&path).unwrap();
    let scores: Vec<f32> = got.iter().flat_map(|r| r.scores.clone()).collect();
    for (s, row) in scores.iter().zip(&middle) {
        assert!(
            (s - head.predict(row)).abs() < 1e-4,
            "{s} vs {}",
            head.predict(row)
        );
    }
    // Solutions the policy just wrote are read from its prefix cache for one token each,
    // also when a finished one is held whole (forked and truncated back one token).
    let item = ExpandItem {
        prompt: w.tokenizer().encode(&prompt, true).unwrap(),
        k: 2,
        max_tokens: 160,
        sampling: SamplingParams {
            temperature: 0.7,
            seed: 3,
            ..SamplingParams::default()
        },
        stop: Vec::new(),
    };
    let out = rt.block_on(w.expand(vec![item], None)).unwrap();
    let written: Vec<ScoreRequest> = out[0]
        .samples
        .iter()
        .map(|s| ScoreRequest {
            steps: vec![Arc::new(Step {
                text: s.text.clone(),
                token_ids: s.tokens.clone(),
                token_logprobs: s.logprobs.clone(),
            })],
            ..requests[0].clone()
        })
        .collect();
    let stops: Vec<_> = out[0]
        .samples
        .iter()
        .map(|s| s.stop_reason.clone())
        .collect();
    let got = rt.block_on(scorer.score(written)).unwrap();
    for reply in &got {
        check_scores("value head on a written path", &reply.scores, 1);
        assert_eq!(reply.cost.tokens_computed, 1, "{stops:?}");
    }
    assert_eq!(w.usage().sequences, w.usage().cached_sequences);
    // The same solution cut into two steps: the cache holds the whole solution (not the bare
    // prompt), so the prompt and the first step are computed in a new sequence and the second
    // step read from a fork of the solution truncated one token back, both segments in one
    // pass; the hidden states are the ones the whole path gives.
    let sample = &out[0].samples[0];
    let half = sample.tokens.len() / 2;
    assert!(half >= 2, "{sample:?}");
    let cut = |range: std::ops::Range<usize>| {
        Arc::new(Step {
            text: w.tokenizer().decode(&sample.tokens[range.clone()]).unwrap(),
            token_ids: sample.tokens[range.clone()].to_vec(),
            token_logprobs: sample.logprobs[range].to_vec(),
        })
    };
    let two_steps = ScoreRequest {
        steps: vec![cut(0..half), cut(half..sample.tokens.len())],
        ..requests[0].clone()
    };
    let passes = || rt.block_on(w.with_engine(|e, _| e.passes())).unwrap();
    let before = passes();
    let read = rt
        .block_on(step_hidden_states(&w, &[two_steps], &[HiddenLayer::Final]))
        .unwrap();
    assert_eq!(passes(), before + 1, "two steps, two segments, one pass");
    let (rows, computed) = &read[0];
    let mut tokens = w.tokenizer().encode(&prompt, true).unwrap();
    let prompt_len = tokens.len();
    assert_eq!(*computed, (prompt_len + half + 1) as u64);
    tokens.extend_from_slice(&sample.tokens);
    let all = plain_hidden(&rt, &w, tokens);
    for (row, end) in rows
        .iter()
        .zip([prompt_len + half, prompt_len + sample.tokens.len()])
    {
        assert_eq!(row.len(), d);
        check_hidden_row(row, &all, end - 1);
    }
    assert_eq!(w.usage().sequences, w.usage().cached_sequences);
    // Reads that wait together (here, while the engine thread is held) run together: two
    // callers' paths in one pass, each answered with what it would have read alone.
    let alone = rt
        .block_on(step_hidden_states(
            &w,
            &requests[..1],
            &[HiddenLayer::Final],
        ))
        .unwrap();
    let before = passes();
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let (started, running) = std::sync::mpsc::channel::<()>();
    let blocker = {
        let w = w.clone();
        rt.spawn(async move {
            w.with_engine(move |_, _| {
                started.send(()).unwrap();
                held.recv().unwrap();
            })
            .await
            .unwrap()
        })
    };
    running.recv().unwrap();
    let reads: Vec<_> = (0..2)
        .map(|i| {
            let (w, r) = (w.clone(), requests[i..i + 1].to_vec());
            rt.spawn(async move { step_hidden_states(&w, &r, &[HiddenLayer::Final]).await })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    hold.send(()).unwrap();
    rt.block_on(blocker).unwrap();
    let got: Vec<_> = reads
        .into_iter()
        .map(|h| rt.block_on(h).unwrap().unwrap())
        .collect();
    assert_eq!(passes(), before + 1, "two callers' reads in one pass");
    assert_eq!(got[0], alone);
    assert_eq!(got[1], features[1..2].to_vec());
}

/// A search with a PRM chosen by configuration: `ScorerChoice::Provided`, the judge's tokens
/// counted in the search's costs.
#[test]
fn prm_a_search_runs_with_a_configured_prm() {
    let rt = runtime();
    let w = worker();
    let prompt = w.format_question(QUESTION).unwrap();
    let scorer = prm::build(
        &PrmConfig::from_json(r#"{"kind": "label_token"}"#).unwrap(),
        &w,
    )
    .unwrap();
    let mut config = SearchConfig::from_json(
        r#"{"strategy": {"kind": "best_of_n", "n": 2}, "seed": 1,
            "sampling": {"temperature": 0.7, "top_p": 1.0, "max_step_tokens": 64},
            "budget": {"max_generated_tokens": 800}}"#,
    )
    .unwrap();
    config.scoring.scorer = ScorerChoice::Provided;
    config.scoring.aggregation = Aggregation::Min;
    let mut search = Search::new(prompt, config).unwrap();
    let outcome = rt
        .block_on(search.run(&w, &scorer, &SearchControl::new()))
        .unwrap();
    search.tree().check_invariants().unwrap();
    assert!(outcome.costs.scorer_calls > 0, "{:?}", outcome.costs);
    assert!(outcome.costs.scorer_tokens > 0, "{:?}", outcome.costs);
    assert_eq!(outcome.stats.scorer_errors, 0, "{:?}", outcome.stats);
}

/// Configurations that cannot work are refused when the PRM is built, naming the field or file.
#[test]
fn prm_build_errors_name_the_field_or_file() {
    let w = worker();
    let check = |config: PrmConfig, needle: &str| {
        let err: PrmError = prm::build(&config, &w).unwrap_err();
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    };
    let judge = |good: &str| LabelTokenConfig {
        good: good.into(),
        ..LabelTokenConfig::default()
    };
    check(PrmConfig::LabelToken(judge("Yes indeed")), "`good`");
    check(PrmConfig::LabelToken(judge("No")), "`bad`");
    check(
        PrmConfig::LabelToken(LabelTokenConfig {
            model: Some("/nonexistent/shepherd.gguf".into()),
            tag_mode: TagMode::Inline,
            ..LabelTokenConfig::default()
        }),
        "/nonexistent/shepherd.gguf",
    );
    check(
        PrmConfig::Classifier(ClassifierConfig::default()),
        "`model`",
    );
    check(
        PrmConfig::ValueHead(ValueHeadConfig {
            path: "/nonexistent/head.safetensors".into(),
        }),
        "/nonexistent/head.safetensors",
    );
    check(
        PrmConfig::Rollout(RolloutValueConfig {
            rollouts: 0,
            ..RolloutValueConfig::default()
        }),
        "`rollouts`",
    );
    // A Hugging Face folder without a head says what it looked for.
    let dir = std::env::temp_dir().join(format!("arbor-prm-nohead-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    check(
        PrmConfig::Classifier(ClassifierConfig {
            model: dir.clone(),
            ..ClassifierConfig::default()
        }),
        "score.0.weight",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

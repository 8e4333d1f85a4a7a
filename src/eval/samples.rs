//! Sample reuse: best-of-N, weighted best-of-N and majority at every budget, read off one run of
//! complete samples per question.
//!
//! The three strategies differ only in how they choose among N independent samples, so instead
//! of one search per (strategy, budget) a question gets one sampling run: best-of-N searches
//! without a token budget ("chunks", so every sample runs to its end) until the samples' generated
//! tokens cover the largest budget. A cell at budget B then takes the longest prefix of samples
//! (in sampling order) whose generated tokens add up to at most B, and applies its strategy's rule
//! through [`arbor_search::select_answer`], the search crate's own selection and tie-breaking.
//!
//! A search with a token budget could not produce these samples: it shares what is left of the
//! budget among all open samples, so a large N cuts every sample short.
//!
//! Costs are what a sampler that stops at the budget would pay: the samples in the prefix (their
//! generated tokens, the prompt tokens their requests computed, measured per request by
//! [`Recording`], and each chunk's shared prompt prefill) plus the share of the next sample that
//! the budget cuts off, which spends tokens but gives no answer. Calls, nodes and wall time count
//! as if each chunk had run only those samples (wall time prorated by generated tokens).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;
use arbor_search::{
    select_answer, tally_answers, Answer, AnswerSelection, AnswerTally, LogProbScorer, NodeId,
    NodeState, Policy, PolicyCost, PolicyError, Proposals, ProposeRequest, ScoreError,
    ScoreRequest, Scorer, Search, SearchConfig, SearchControl, StepScores,
};
use serde::{Deserialize, Serialize};

use super::trace::TraceCosts;
use crate::search_cmd::Strategy;

/// Most chunks one question's sampling run may take: a bound against a policy that keeps
/// producing nothing.
pub(crate) const CHUNKS_MAX: u32 = 64;

/// One complete sampled solution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Sample {
    /// Node id of its final node: the order in which the search reached its answer, which is
    /// what answer selection breaks ties by.
    pub(crate) finish: u32,
    /// True when it ended as a solution (end of sequence or depth limit); false when it failed.
    pub(crate) complete: bool,
    /// Its final answer as written, if one could be extracted.
    pub(crate) answer: Option<String>,
    /// Its path value from the reward model.
    pub(crate) value: Option<f64>,
    /// The policy's own confidence in its path (the log-prob scorer's value): what
    /// self-consistency breaks ties by. `None` in samples written before it was recorded.
    #[serde(default)]
    pub(crate) confidence: Option<f64>,
    /// Tokens generated for it.
    pub(crate) generated_tokens: u64,
    /// Prompt tokens its own requests computed (the chunk's first, shared request excluded).
    pub(crate) prompt_tokens_computed: u64,
    /// Prompt tokens its own requests took from the prefix cache.
    pub(crate) prompt_tokens_reused: u64,
    /// Tokens the reward model computed for it.
    pub(crate) prm_tokens_computed: u64,
    /// Steps.
    pub(crate) depth: u32,
    /// The reasoning steps.
    pub(crate) path: Vec<String>,
}

/// One best-of-N search without a token budget: a chunk of a question's samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SampleChunk {
    /// The question's index in the dataset.
    pub(crate) index: usize,
    /// Position of this chunk in the question's sampling run (0, 1, ...).
    pub(crate) chunk: u32,
    /// The search seed of this chunk.
    pub(crate) seed: u64,
    /// Prompt tokens the first request (the root's, shared by all samples) computed.
    pub(crate) root_prompt_tokens_computed: u64,
    /// Prompt tokens the first request took from the prefix cache.
    pub(crate) root_prompt_tokens_reused: u64,
    /// Wall-clock time of the chunk's search.
    pub(crate) wall_ms: u64,
    /// The samples, in sampling order (the order of the root's children).
    pub(crate) samples: Vec<Sample>,
}

impl SampleChunk {
    /// Tokens generated over all its samples.
    pub(crate) fn generated_tokens(&self) -> u64 {
        self.samples.iter().map(|s| s.generated_tokens).sum()
    }
}

/// How a sample strategy chooses, as the search engine does for it: the selection, and whether
/// values take part (self-consistency never scores, so its votes carry no weight).
pub(crate) fn selection_rule(strategy: Strategy) -> Option<(AnswerSelection, bool)> {
    match strategy {
        Strategy::BestOfN => Some((AnswerSelection::BestValue, true)),
        Strategy::WeightedBestOfN => Some((AnswerSelection::WeightedVote, true)),
        Strategy::Majority => Some((AnswerSelection::Majority, false)),
        Strategy::Mcts | Strategy::Beam | Strategy::Dvts => None,
    }
}

/// A cell read off a sampling run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Derived {
    /// Whole samples that fit the budget.
    pub(crate) samples: u32,
    /// The chosen sample (chunk, position in chunk), if any answer was chosen.
    pub(crate) chosen: Option<(usize, usize)>,
    /// What the samples in the prefix cost, plus the part of the next one that the budget cut.
    pub(crate) costs: TraceCosts,
    /// The distinct final answers among them (votes, sum of the values the rule reads), most
    /// votes first, as a search's outcome lists its own.
    pub(crate) candidates: Vec<AnswerTally>,
}

/// The cell of `strategy` at `budget` generated tokens, from `chunks` (in chunk order).
pub(crate) fn derive(chunks: &[SampleChunk], budget: u64, strategy: Strategy) -> Derived {
    let (selection, scored) = selection_rule(strategy).expect("a sample strategy");
    // (chunk, sample, share of it spent): whole samples while they fit, then the one the budget
    // cuts, which is paid for but never answers.
    let mut spent: Vec<(usize, usize, f64)> = Vec::new();
    let mut generated = 0u64;
    'chunks: for (ci, chunk) in chunks.iter().enumerate() {
        for (si, sample) in chunk.samples.iter().enumerate() {
            if generated + sample.generated_tokens > budget {
                let cut = budget - generated;
                if cut > 0 {
                    spent.push((ci, si, cut as f64 / sample.generated_tokens as f64));
                }
                break 'chunks;
            }
            generated += sample.generated_tokens;
            spent.push((ci, si, 1.0));
        }
    }
    let sample = |ci: usize, si: usize| &chunks[ci].samples[si];
    // Finals in the order the search reached them, as its tally saw them.
    let mut finals: Vec<(usize, usize)> = spent
        .iter()
        .filter(|&&(ci, si, share)| {
            let s = sample(ci, si);
            share == 1.0 && s.complete && s.answer.is_some() && (!scored || s.value.is_some())
        })
        .map(|&(ci, si, _)| (ci, si))
        .collect();
    finals.sort_by_key(|&(ci, si)| (ci, sample(ci, si).finish));
    let candidates: Vec<(Answer, Option<f64>)> = finals
        .iter()
        .map(|&(ci, si)| {
            let s = sample(ci, si);
            let raw = s.answer.clone().unwrap_or_default();
            // Majority reads the policy's confidence only to break ties (the larger sum wins),
            // as self-consistency's tally does.
            (
                Answer::new(raw),
                if scored { s.value } else { s.confidence },
            )
        })
        .collect();
    let chosen = select_answer(&candidates, selection).map(|i| finals[i]);

    let part = |x: u64, share: f64| (x as f64 * share).round() as u64;
    let mut costs = TraceCosts::default();
    for (ci, chunk) in chunks.iter().enumerate() {
        let mine: Vec<(&Sample, f64)> = spent
            .iter()
            .filter(|at| at.0 == ci)
            .map(|&(ci, si, share)| (sample(ci, si), share))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let chunk_generated: u64 = mine
            .iter()
            .map(|&(s, share)| part(s.generated_tokens, share))
            .sum();
        costs.generated_tokens += chunk_generated;
        costs.prompt_tokens_computed += chunk.root_prompt_tokens_computed
            + mine
                .iter()
                .map(|&(s, share)| part(s.prompt_tokens_computed, share))
                .sum::<u64>();
        costs.prompt_tokens_reused += chunk.root_prompt_tokens_reused
            + mine
                .iter()
                .map(|&(s, share)| part(s.prompt_tokens_reused, share))
                .sum::<u64>();
        costs.prm_tokens_computed += mine
            .iter()
            .map(|&(s, share)| part(s.prm_tokens_computed, share))
            .sum::<u64>();
        // Steps started: a cut sample got through its share of its steps, rounded up.
        let steps = |&(s, share): &(&Sample, f64)| (f64::from(s.depth) * share).ceil() as u64;
        // One call per round; a chunk of these samples needs as many rounds as its deepest one.
        costs.policy_calls += mine.iter().map(steps).max().unwrap_or(0);
        costs.nodes += 1 + mine.iter().map(steps).sum::<u64>();
        let all = chunk.generated_tokens().max(1);
        costs.wall_ms += part(chunk.wall_ms, chunk_generated as f64 / all as f64);
    }
    Derived {
        samples: spent.iter().filter(|at| at.2 == 1.0).count() as u32,
        chosen,
        costs,
        candidates: tally_answers(&candidates),
    }
}

/// A policy that forwards to another and records what each request cost, by node, so the costs
/// of a search can be split among its samples.
#[derive(Debug)]
pub(crate) struct Recording<'a, T> {
    /// The policy or scorer doing the work.
    inner: &'a T,
    /// Per request: the node it was about and its policy cost.
    policy_costs: Mutex<Vec<(NodeId, PolicyCost)>>,
    /// Per request: the node scored and the tokens the scorer computed.
    scorer_tokens: Mutex<Vec<(NodeId, u64)>>,
    /// Calls that failed, and the last one's error.
    failures: Mutex<(u64, Option<String>)>,
}

impl<'a, T> Recording<'a, T> {
    pub(crate) fn new(inner: &'a T) -> Self {
        Recording {
            inner,
            policy_costs: Mutex::new(Vec::new()),
            scorer_tokens: Mutex::new(Vec::new()),
            failures: Mutex::new((0, None)),
        }
    }

    fn failed(&self, error: String) {
        let mut f = self.failures.lock().expect("failure lock");
        f.0 += 1;
        f.1 = Some(error);
    }

    /// `N calls failed; the last: ERROR`, if any call failed.
    pub(crate) fn failure(&self) -> Option<String> {
        let f = self.failures.lock().expect("failure lock");
        f.1.as_ref().map(|e| {
            let calls = if f.0 == 1 { "call" } else { "calls" };
            format!("{} {calls} failed; the last: {e}", f.0)
        })
    }
}

/// A cell whose search lost worker calls: its result would count a failure as a wrong answer,
/// so it is left out of the traces (the next run of the same command retries it).
#[derive(Debug)]
pub(crate) struct CellFailed(pub(crate) String);

impl std::fmt::Display for CellFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CellFailed {}

/// Fails the cell if any call of `policy` or `scorer` failed.
pub(crate) fn check_calls<P, S>(policy: &Recording<P>, scorer: &Recording<S>) -> Result<()> {
    match (policy.failure(), scorer.failure()) {
        (None, None) => Ok(()),
        (Some(p), _) => Err(CellFailed(format!("worker {p}")).into()),
        (None, Some(s)) => Err(CellFailed(format!("scorer {s}")).into()),
    }
}

impl<T: Policy> Policy for Recording<'_, T> {
    async fn propose(&self, batch: Vec<ProposeRequest>) -> Result<Vec<Proposals>, PolicyError> {
        let nodes: Vec<NodeId> = batch.iter().map(|r| r.node).collect();
        let reply = self.inner.propose(batch).await;
        let mut log = self.policy_costs.lock().expect("cost log lock");
        match &reply {
            Ok(replies) => log.extend(nodes.iter().zip(replies).map(|(&n, r)| (n, r.cost))),
            // The search keeps (and charges) the part of a call that did come back.
            Err(e) => log.extend(
                nodes
                    .iter()
                    .zip(&e.partial)
                    .filter_map(|(&n, r)| r.as_ref().map(|r| (n, r.cost))),
            ),
        }
        drop(log);
        if let Err(e) = &reply {
            self.failed(e.to_string());
        }
        reply
    }
}

impl<T: Scorer> Scorer for Recording<'_, T> {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        let nodes: Vec<NodeId> = batch.iter().map(|r| r.node).collect();
        let reply = self.inner.score(batch).await;
        if let Err(e) = &reply {
            self.failed(e.to_string());
        }
        if let Ok(replies) = &reply {
            let mut log = self.scorer_tokens.lock().expect("cost log lock");
            log.extend(
                nodes
                    .iter()
                    .zip(replies)
                    .map(|(&n, r)| (n, r.cost.tokens_computed)),
            );
        }
        reply
    }
}

/// Runs one chunk: a best-of-N search under `config` (which must have no token budget), and
/// splits its tree and costs into samples.
pub(crate) async fn run_chunk<P: Policy, S: Scorer>(
    policy: &P,
    scorer: &S,
    prompt: &str,
    config: SearchConfig,
    index: usize,
    chunk: u32,
) -> Result<SampleChunk> {
    let seed = config.seed;
    let policy = Recording::new(policy);
    let scorer = Recording::new(scorer);
    let mut search = Search::new(prompt, config)?;
    let outcome = search.run(&policy, &scorer, &SearchControl::new()).await?;
    check_calls(&policy, &scorer)?;
    let policy_costs = policy.policy_costs.into_inner().expect("cost log lock");
    let scorer_tokens = scorer.scorer_tokens.into_inner().expect("cost log lock");
    let mut by_node: HashMap<NodeId, PolicyCost> = HashMap::new();
    for (node, cost) in policy_costs {
        let entry = by_node.entry(node).or_default();
        entry.prompt_tokens_computed += cost.prompt_tokens_computed;
        entry.prompt_tokens_reused += cost.prompt_tokens_reused;
    }
    let mut scored_by_node: HashMap<NodeId, u64> = HashMap::new();
    for (node, tokens) in scorer_tokens {
        *scored_by_node.entry(node).or_default() += tokens;
    }
    let root = by_node.get(&NodeId::ROOT).copied().unwrap_or_default();
    let tree = search.tree();
    // Every leaf below the root ends one sample; its depth-1 ancestor gives the sampling order.
    let mut samples: Vec<(NodeId, Sample)> = Vec::new();
    for (id, node) in tree.nodes() {
        if id == NodeId::ROOT || !node.edges().is_empty() {
            continue;
        }
        let mut chain = vec![id];
        while let Some(parent) = tree.node(*chain.last().expect("non-empty")).parent() {
            if parent == NodeId::ROOT {
                break;
            }
            chain.push(parent);
        }
        let first = *chain.last().expect("non-empty");
        let steps = tree.path(id);
        let complete = node.state() == NodeState::Terminal;
        let sample = Sample {
            finish: id.get(),
            complete,
            answer: node.answer().filter(|_| complete).map(|a| a.raw.clone()),
            value: node.score(),
            confidence: LogProbScorer::path_value(&steps, search.config().scoring.aggregation),
            generated_tokens: steps.iter().map(|s| s.token_ids.len() as u64).sum(),
            // The leaf itself was never expanded; every other node on the chain was, once.
            prompt_tokens_computed: chain[1..]
                .iter()
                .filter_map(|n| by_node.get(n))
                .map(|c| c.prompt_tokens_computed)
                .sum(),
            prompt_tokens_reused: chain[1..]
                .iter()
                .filter_map(|n| by_node.get(n))
                .map(|c| c.prompt_tokens_reused)
                .sum(),
            prm_tokens_computed: chain.iter().filter_map(|n| scored_by_node.get(n)).sum(),
            depth: node.depth(),
            path: steps.iter().map(|s| s.text.clone()).collect(),
        };
        samples.push((first, sample));
    }
    samples.sort_by_key(|(first, _)| *first);
    Ok(SampleChunk {
        index,
        chunk,
        seed,
        root_prompt_tokens_computed: root.prompt_tokens_computed,
        root_prompt_tokens_reused: root.prompt_tokens_reused,
        wall_ms: outcome.costs.wall_us / 1000,
        samples: samples.into_iter().map(|(_, s)| s).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_search::synthetic::{GamePolicy, GameScorer, PathGame};
    use arbor_search::{SampleConfig, StrategyConfig};

    fn sample(finish: u32, answer: &str, value: f64, tokens: u64) -> Sample {
        Sample {
            finish,
            complete: true,
            answer: Some(answer.into()),
            value: Some(value),
            confidence: Some(value),
            generated_tokens: tokens,
            prompt_tokens_computed: 2,
            prompt_tokens_reused: 30,
            prm_tokens_computed: 0,
            depth: 3,
            path: vec![format!("The answer is {answer}.")],
        }
    }

    fn chunk(chunk: u32, samples: Vec<Sample>) -> SampleChunk {
        SampleChunk {
            index: 0,
            chunk,
            seed: 0,
            root_prompt_tokens_computed: 100,
            root_prompt_tokens_reused: 0,
            wall_ms: 1000,
            samples,
        }
    }

    /// Derives `strategy` at `budget` and expects `answer` from `samples` samples.
    fn check(chunks: &[SampleChunk], strategy: Strategy, budget: u64, expected: (&str, u32)) {
        let d = derive(chunks, budget, strategy);
        let answer = d
            .chosen
            .map(|(c, s)| chunks[c].samples[s].answer.clone().unwrap());
        assert_eq!(
            (answer.as_deref().unwrap_or("-"), d.samples),
            expected,
            "{strategy:?} at {budget}"
        );
    }

    #[test]
    fn each_rule_reads_the_prefix_that_fits_the_budget() {
        // Sampling order ≠ finishing order: the second sample finished first.
        let chunks = [
            chunk(
                0,
                vec![
                    sample(9, "5", 0.9, 100),
                    sample(5, "7", 0.4, 100),
                    sample(8, "7", 0.4, 100),
                ],
            ),
            chunk(1, vec![sample(4, "8", 0.5, 100), sample(6, "8", 0.5, 100)]),
        ];
        check(&chunks, Strategy::BestOfN, 99, ("-", 0));
        check(&chunks, Strategy::BestOfN, 199, ("5", 1));
        check(&chunks, Strategy::BestOfN, 500, ("5", 5));
        // Weighted: "7" 0.8 against "5" 0.9 with three samples; "8" 1.0 with five.
        check(&chunks, Strategy::WeightedBestOfN, 300, ("5", 3));
        check(&chunks, Strategy::WeightedBestOfN, 500, ("8", 5));
        // Majority counts votes and breaks ties by the policy's confidence summed (here equal
        // to the values), never by which finished first: 1-1, "5" (0.9) beats "7" (0.4), though
        // "7" finished first.
        check(&chunks, Strategy::Majority, 200, ("5", 2));
        check(&chunks, Strategy::Majority, 300, ("7", 3));
        // Two votes each for "7" (0.8) and "8" (1.0).
        check(&chunks, Strategy::Majority, 500, ("8", 5));

        // Three whole samples and half of the fourth, cut by the budget: paid for, no vote.
        let d = derive(&chunks, 350, Strategy::BestOfN);
        assert_eq!(d.samples, 3);
        assert_eq!(d.costs.generated_tokens, 350);
        assert_eq!(d.costs.prompt_tokens_computed, (100 + 3 * 2) + (100 + 1));
        assert_eq!(d.costs.prompt_tokens_reused, 3 * 30 + 15);
        assert_eq!(d.costs.policy_calls, 3 + 2);
        assert_eq!(d.costs.nodes, (1 + 9) + (1 + 2));
        assert_eq!(d.costs.wall_ms, 1000 + 250);
        let d = derive(&chunks, 400, Strategy::BestOfN);
        assert_eq!(d.samples, 4);
        assert_eq!(d.costs.generated_tokens, 400);
        assert_eq!(d.costs.prompt_tokens_computed, 100 + 3 * 2 + 100 + 2);
        assert_eq!(d.costs.wall_ms, 1000 + 500);
        assert_eq!(d.costs.nodes, 10 + 4);
        // Nothing fits: the first sample's cut part is still spent.
        let d = derive(&chunks, 40, Strategy::Majority);
        assert_eq!((d.samples, d.chosen), (0, None));
        assert_eq!(d.costs.generated_tokens, 40);
        assert_eq!(d.costs.prompt_tokens_computed, 100 + 1);
        // The budget beyond every sample: all of them, nothing more.
        assert_eq!(
            derive(&chunks, 10_000, Strategy::BestOfN)
                .costs
                .generated_tokens,
            500
        );
    }

    #[test]
    fn incomplete_and_answerless_samples_spend_tokens_but_get_no_vote() {
        let mut failed = sample(2, "3", 0.99, 50);
        failed.complete = false;
        let mut silent = sample(3, "3", 0.99, 50);
        silent.answer = None;
        let chunks = [chunk(0, vec![failed, silent, sample(4, "6", 0.1, 50)])];
        check(&chunks, Strategy::BestOfN, 100, ("-", 2));
        check(&chunks, Strategy::BestOfN, 150, ("6", 3));
        check(&chunks, Strategy::Majority, 150, ("6", 3));
    }

    /// The derivation chooses what the search itself chooses: on the synthetic game, every sample
    /// of a real best-of-N run, re-selected by each strategy's rule, gives the answer a real run of
    /// that strategy (same seed, so the same samples) gives.
    #[test]
    fn derived_selection_matches_the_search_engine() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut disagreements = Vec::new();
        let mut distinct_answers = 0;
        for seed in 0..24u64 {
            let game = PathGame::new(seed, 3, 0.5);
            let policy = GamePolicy::new(game.clone());
            let scorer = GameScorer::new(game.clone(), 0.3, 0.2);
            let config = |strategy: StrategyConfig| SearchConfig {
                strategy,
                seed,
                ..SearchConfig::default()
            };
            let n = SampleConfig { n: 6 };
            let pool = runtime
                .block_on(run_chunk(
                    &policy,
                    &scorer,
                    game.prompt(),
                    config(StrategyConfig::BestOfN(n.clone())),
                    0,
                    0,
                ))
                .unwrap();
            assert_eq!(pool.samples.len(), 6);
            let all = pool.generated_tokens();
            let mut keys = std::collections::BTreeSet::new();
            for s in &pool.samples {
                keys.insert(s.answer.clone());
            }
            distinct_answers += usize::from(keys.len() > 1);
            for (strategy, engine) in [
                (Strategy::BestOfN, StrategyConfig::BestOfN(n.clone())),
                (
                    Strategy::WeightedBestOfN,
                    StrategyConfig::WeightedBestOfN(n.clone()),
                ),
                (
                    Strategy::Majority,
                    StrategyConfig::SelfConsistency(n.clone()),
                ),
            ] {
                let mut search = Search::new(game.prompt().clone(), config(engine)).unwrap();
                let outcome = runtime
                    .block_on(search.run(&policy, &scorer, &SearchControl::new()))
                    .unwrap();
                let derived = derive(std::slice::from_ref(&pool), all, strategy);
                assert_eq!(derived.samples, 6);
                let got = derived.chosen.map(|(c, s)| {
                    assert_eq!(c, 0);
                    Answer::new(pool.samples[s].answer.clone().unwrap()).key
                });
                let want = outcome.answer.map(|a| a.answer.key);
                if got != want {
                    disagreements.push((seed, strategy, got, want));
                }
                if strategy == Strategy::BestOfN {
                    assert_eq!(outcome.costs.generated_tokens, all, "seed {seed}");
                }
            }
        }
        assert!(disagreements.is_empty(), "{disagreements:?}");
        // The comparison means something only where samples disagree.
        assert!(distinct_answers >= 12, "{distinct_answers}");
    }
}

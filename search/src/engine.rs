//! The engine every strategy shares: budgets and cost accounting ([`Io`]), batched expansion and
//! scoring ([`expand`], [`score_nodes`]), and the answer tally ([`Tally`]). Strategies use it;
//! it uses none of them ([`crate::search`] dispatches).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::answer::{extract_answer, states_final_answer, Answer};
use crate::config::{AnswerSelection, Backup, MctsAnswer, SearchConfig, StrategyConfig};
use crate::control::{BestAnswer, SearchControl, SearchEvent};
use crate::error::{PolicyError, ScoreError};
use crate::flight::InFlight;
use crate::outcome::{Budget, Costs, SearchStats, Termination};
use crate::policy::{Policy, Proposals, ProposeRequest, Sampling, Step, StepStop};
use crate::scorer::{LogProbScorer, ScoreRequest, Scorer, StepScores};
use crate::tree::{NewChild, NodeId, NodeState, Tree};

/// Every final answer found, grouped by equivalence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerTally {
    /// The answer as first written.
    pub answer: Answer,
    /// How many final answers were equivalent to it.
    pub votes: u32,
    /// Sum of their values (unscored answers add 0).
    pub weight: f64,
    /// The highest of their values.
    pub best_value: Option<f64>,
    /// The node holding the highest value (the first one when none was scored).
    pub best_node: NodeId,
    /// The first node that reached it; breaks ties deterministically.
    pub first_node: NodeId,
    /// The tree's estimate of how often the policy reaches this answer: the sum of its final
    /// answers' path shares, where the root's share is 1 and a node passes its share on
    /// equally to those of its children under which some final answer lies. Answers below a
    /// step the search explored many times thus count as often as the policy would reach them,
    /// not once per rollout; for independent samples it is votes / all votes.
    #[serde(default)]
    pub share: f64,
    /// The sum of share × value over its final answers (unscored answers add 0).
    #[serde(default)]
    pub share_weight: f64,
}

/// How the final answer is chosen, derived from the strategy.
#[derive(Debug, Clone, Copy)]
enum AnswerRule {
    MostVisited(Backup),
    Tally(AnswerSelection),
}

impl AnswerRule {
    fn of(strategy: &StrategyConfig) -> AnswerRule {
        match strategy {
            StrategyConfig::Mcts(m) => match m.final_answer {
                MctsAnswer::MostVisited => AnswerRule::MostVisited(m.backup),
                MctsAnswer::BestValue => AnswerRule::Tally(AnswerSelection::BestValue),
                MctsAnswer::WeightedVote => AnswerRule::Tally(AnswerSelection::WeightedVote),
                MctsAnswer::Majority => AnswerRule::Tally(AnswerSelection::Majority),
                MctsAnswer::ShareVote => AnswerRule::Tally(AnswerSelection::ShareVote),
                MctsAnswer::WeightedShareVote => {
                    AnswerRule::Tally(AnswerSelection::WeightedShareVote)
                }
            },
            StrategyConfig::BestOfN(_) => AnswerRule::Tally(AnswerSelection::BestValue),
            StrategyConfig::WeightedBestOfN(_) => AnswerRule::Tally(AnswerSelection::WeightedVote),
            StrategyConfig::SelfConsistency(_) => AnswerRule::Tally(AnswerSelection::Majority),
            StrategyConfig::Beam(b) => AnswerRule::Tally(b.answer),
            StrategyConfig::Dvts(d) => AnswerRule::Tally(d.answer),
        }
    }
}

/// Final answers seen so far, by canonical key. A `BTreeMap` so iteration, and thus tie-breaking,
/// never depends on hashing.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    entries: BTreeMap<String, AnswerTally>,
    /// Every final answer added: its node, key and value (their count is the vote total; the
    /// nodes give the path shares).
    finals: Vec<(NodeId, String, Option<f64>)>,
}

impl Tally {
    pub(crate) fn add(&mut self, node: NodeId, answer: &Answer, value: Option<f64>) {
        let entry = self
            .entries
            .entry(answer.key.clone())
            .or_insert_with(|| AnswerTally {
                answer: answer.clone(),
                votes: 0,
                weight: 0.0,
                best_value: None,
                best_node: node,
                first_node: node,
                share: 0.0,
                share_weight: 0.0,
            });
        self.finals.push((node, answer.key.clone(), value));
        entry.votes += 1;
        if let Some(v) = value {
            entry.weight += v;
            if entry.best_value.is_none_or(|b| v > b) {
                entry.best_value = Some(v);
                entry.best_node = node;
            }
        }
    }

    fn pick(&self, selection: AnswerSelection) -> Option<&AnswerTally> {
        pick_among(self.entries.values().map(|e| (e.first_node, e)), selection).map(|(_, e)| e)
    }

    /// A copy with every entry's `share` and `share_weight` filled in from the finals' places
    /// in `tree`; without a tree (independent samples, as [`tally_answers`] has) each final's
    /// share is 1 / all finals.
    pub(crate) fn with_shares(&self, tree: Option<&Tree>) -> Tally {
        let mut out = self.clone();
        let shares: Vec<f64> = match tree {
            Some(tree) => {
                let nodes: Vec<NodeId> = self.finals.iter().map(|f| f.0).collect();
                let share = path_shares(tree, &nodes);
                nodes.iter().map(|n| share[n.index()]).collect()
            }
            None => vec![1.0 / self.finals.len().max(1) as f64; self.finals.len()],
        };
        for e in out.entries.values_mut() {
            e.share = 0.0;
            e.share_weight = 0.0;
        }
        for ((_, key, value), share) in self.finals.iter().zip(shares) {
            if let Some(e) = out.entries.get_mut(key) {
                e.share += share;
                e.share_weight += share * value.unwrap_or(0.0);
            }
        }
        out
    }

    /// The share of final answers so far that are equivalent to `answer` (0 before any).
    pub(crate) fn share(&self, answer: &Answer) -> f64 {
        let votes = self.entries.get(&answer.key).map_or(0, |e| e.votes);
        f64::from(votes) / self.finals.len().max(1) as f64
    }

    /// True before the first final answer.
    pub(crate) fn is_empty(&self) -> bool {
        self.finals.is_empty()
    }

    /// Mean depth of the distinct final answers so far (each at the node that first reached it).
    pub(crate) fn mean_depth(&self, tree: &Tree) -> Option<f64> {
        if self.entries.is_empty() {
            return None;
        }
        let sum: f64 = self
            .entries
            .values()
            .map(|e| f64::from(tree.node(e.first_node).depth()))
            .sum();
        Some(sum / self.entries.len() as f64)
    }

    fn converged(&self, min_answers: u32, min_share: f64) -> bool {
        let top = self.entries.values().map(|e| e.votes).max().unwrap_or(0);
        let total = self.finals.len();
        total >= min_answers as usize && f64::from(top) >= min_share * total as f64
    }

    pub(crate) fn candidates(&self) -> Vec<AnswerTally> {
        let mut all: Vec<AnswerTally> = self.entries.values().cloned().collect();
        all.sort_by(|a, b| {
            b.votes
                .cmp(&a.votes)
                .then(b.weight.total_cmp(&a.weight))
                .then(a.first_node.cmp(&b.first_node))
        });
        all
    }

    fn best(&self, selection: AnswerSelection) -> Option<BestAnswer> {
        self.pick(selection).map(|e| BestAnswer {
            answer: e.answer.clone(),
            node: e.best_node,
            value: e.best_value,
            votes: e.votes,
            weight: e.weight,
        })
    }
}

/// Chooses among final answers exactly as a search's answer selection does (answers grouped by
/// their normalised key, the same tie-breaking), for harnesses that re-select among stored
/// samples, e.g. best-of-N at a smaller N read off one large run.
///
/// `finals` are in the order the search reached them (earlier wins ties), each with its value:
/// `Some` when it was scored, `None` as in self-consistency, which never scores. Returns the
/// index of the final holding the chosen answer (for a scored answer, its highest-valued final;
/// otherwise its first), or `None` when there is nothing to choose (for
/// [`AnswerSelection::BestValue`]: no scored final).
pub fn select_answer(
    finals: &[(Answer, Option<f64>)],
    selection: AnswerSelection,
) -> Option<usize> {
    tally_of(finals)?
        .with_shares(None)
        .pick(selection)
        .map(|e| e.best_node.index())
}

/// The distinct answers among `finals` (as [`select_answer`] takes them) as a search's outcome
/// lists them ([`crate::SearchOutcome::candidates`]): grouped by normalised key, most votes
/// first; a node id is the final's index.
pub fn tally_answers(finals: &[(Answer, Option<f64>)]) -> Vec<AnswerTally> {
    tally_of(finals).map_or_else(Vec::new, |t| t.with_shares(None).candidates())
}

/// `finals` tallied, node ids their indices (`None` past `u32::MAX` finals).
fn tally_of(finals: &[(Answer, Option<f64>)]) -> Option<Tally> {
    let mut tally = Tally::default();
    for (i, (answer, value)) in finals.iter().enumerate() {
        tally.add(NodeId::from_raw(u32::try_from(i).ok()?), answer, *value);
    }
    Some(tally)
}

/// The entry `selection` picks among `entries`, each with its rank: between equal keys the
/// smaller rank wins (the answer reached first, or listed first).
fn pick_among<'a, R: Ord>(
    entries: impl Iterator<Item = (R, &'a AnswerTally)>,
    selection: AnswerSelection,
) -> Option<(R, &'a AnswerTally)> {
    type Ranked<'a, R> = (R, &'a AnswerTally);
    let earlier_first = |a: &Ranked<'_, R>, b: &Ranked<'_, R>| b.0.cmp(&a.0);
    match selection {
        AnswerSelection::BestValue => {
            entries.filter(|e| e.1.best_value.is_some()).max_by(|a, b| {
                a.1.best_value
                    .unwrap_or(0.0)
                    .total_cmp(&b.1.best_value.unwrap_or(0.0))
                    .then_with(|| earlier_first(a, b))
            })
        }
        AnswerSelection::WeightedVote => entries.max_by(|a, b| {
            a.1.weight
                .total_cmp(&b.1.weight)
                .then(a.1.votes.cmp(&b.1.votes))
                .then_with(|| earlier_first(a, b))
        }),
        AnswerSelection::Majority => entries.max_by(|a, b| {
            a.1.votes
                .cmp(&b.1.votes)
                .then(a.1.weight.total_cmp(&b.1.weight))
                .then_with(|| earlier_first(a, b))
        }),
        AnswerSelection::ShareVote => entries.max_by(|a, b| {
            a.1.share
                .total_cmp(&b.1.share)
                .then(a.1.weight.total_cmp(&b.1.weight))
                .then_with(|| earlier_first(a, b))
        }),
        AnswerSelection::WeightedShareVote => entries.max_by(|a, b| {
            a.1.share_weight
                .total_cmp(&b.1.share_weight)
                .then(a.1.share.total_cmp(&b.1.share))
                .then_with(|| earlier_first(a, b))
        }),
    }
}

/// Chooses among answers already tallied (a search's `candidates`, or a trace's), by the
/// rule a search with `selection` applies, ties going to the answer listed first. Returns its
/// index, or `None` when there is nothing to choose (for [`AnswerSelection::BestValue`]: no
/// scored answer).
pub fn pick_candidate(candidates: &[AnswerTally], selection: AnswerSelection) -> Option<usize> {
    pick_among(candidates.iter().enumerate(), selection).map(|(i, _)| i)
}

/// Each node's path share, by node index: the root's is 1, and a node passes its share on in
/// equal parts to those of its children under which one of `finals` lies (the others, and
/// nodes with no final below them, get 0). Every node's parent comes before it in the tree.
fn path_shares(tree: &Tree, finals: &[NodeId]) -> Vec<f64> {
    let n = tree.len();
    let mut reached = vec![false; n];
    for f in finals {
        reached[f.index()] = true;
    }
    let mut branches = vec![0u32; n];
    let parents: Vec<Option<usize>> = tree
        .nodes()
        .map(|(_, node)| node.parent().map(NodeId::index))
        .collect();
    for i in (0..n).rev() {
        if let (true, Some(p)) = (reached[i], parents[i]) {
            debug_assert!(p < i, "a parent comes before its children");
            branches[p] += 1;
            reached[p] = true;
        }
    }
    let mut share = vec![0.0; n];
    if n > 0 && reached[0] {
        share[0] = 1.0;
    }
    for i in 1..n {
        if let (true, Some(p)) = (reached[i], parents[i]) {
            share[i] = share[p] / f64::from(branches[p].max(1));
        }
    }
    share
}

/// Follows the most visited child from the root (ties: higher Q, then the earlier child) and
/// returns the final answer where the walk ends, if there is one there.
fn most_visited(tree: &Tree, tally: &Tally, backup: Backup) -> Option<BestAnswer> {
    let mut at = NodeId::ROOT;
    loop {
        let best = tree
            .node(at)
            .edges()
            .iter()
            .filter(|e| e.stats().visits > 0)
            .max_by(|a, b| {
                a.stats()
                    .visits
                    .cmp(&b.stats().visits)
                    .then(
                        a.stats()
                            .q(backup, 0.0)
                            .total_cmp(&b.stats().q(backup, 0.0)),
                    )
                    .then(b.child().cmp(&a.child()))
            });
        match best {
            Some(edge) => at = edge.child(),
            None => break,
        }
    }
    let node = tree.node(at);
    let (answer, value) = match (node.answer(), node.rollout()) {
        (Some(answer), _) => (answer, node.score()),
        (None, Some(rollout)) => (rollout.answer.as_ref()?, Some(rollout.value)),
        (None, None) => return None,
    };
    let entry = tally.entries.get(&answer.key);
    Some(BestAnswer {
        answer: answer.clone(),
        node: at,
        value,
        votes: entry.map_or(1, |e| e.votes),
        weight: entry.map_or(value.unwrap_or(0.0), |e| e.weight),
    })
}

fn best_answer(tree: &Tree, tally: &Tally, rule: AnswerRule) -> Option<BestAnswer> {
    match rule {
        AnswerRule::MostVisited(backup) => {
            most_visited(tree, tally, backup).or_else(|| tally.best(AnswerSelection::BestValue))
        }
        AnswerRule::Tally(selection) if selection.uses_shares() => {
            tally.with_shares(Some(tree)).best(selection)
        }
        AnswerRule::Tally(selection) => tally.best(selection),
    }
}

/// SplitMix64: a cheap, well-mixed, portable hash for deriving seeds.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x6A09_E667_F3BC_C909);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed salt of the first call at a node; each later call there (widening) adds one.
pub(crate) const SALT_EXPAND: u64 = 0;

/// The search's side of every call: the policy and scorer, budgets, costs, events.
pub(crate) struct Io<'a, P, S> {
    /// The step generator.
    policy: &'a P,
    /// The scorer passed in; `None` when the config selects the log-prob scorer.
    scorer: Option<&'a S>,
    /// Cancellation, events and the best-answer watch.
    control: &'a SearchControl,
    /// The whole configuration, for budgets, sampling and aggregation.
    pub(crate) config: &'a SearchConfig,
    /// How the final (and the anytime) answer is chosen.
    rule: AnswerRule,
    /// When the search started, for `wall_us` and the deadline.
    started: Instant,
    /// When the search must stop, if ever.
    deadline: Option<Instant>,
    /// Counted as the callers report them.
    pub(crate) costs: Costs,
    pub(crate) stats: SearchStats,
    /// The most tokens the next policy call may generate in all, below what the budget leaves
    /// (set by [`Io::cap_next_call`], used up by that call).
    next_call_cap: Option<u64>,
    /// Score requests answered, for the scorer's generated tokens per request.
    scored_requests: u64,
    /// Failed calls since the last good one.
    failed_in_row: u32,
    /// The best answer last published (node and key), to publish only changes.
    published: Option<(NodeId, String)>,
}

impl<'a, P: Policy, S: Scorer> Io<'a, P, S> {
    pub(crate) fn new(
        policy: &'a P,
        scorer: Option<&'a S>,
        control: &'a SearchControl,
        config: &'a SearchConfig,
    ) -> Self {
        let started = Instant::now();
        let deadline = config
            .budget
            .deadline_ms
            .map(|ms| started + std::time::Duration::from_millis(ms));
        Io {
            policy,
            scorer,
            control,
            config,
            rule: AnswerRule::of(&config.strategy),
            started,
            deadline,
            costs: Costs::default(),
            stats: SearchStats::default(),
            next_call_cap: None,
            scored_requests: 0,
            failed_in_row: 0,
            published: None,
        }
    }

    /// Cancellation, the deadline and repeated failures: checked before anything is spent.
    pub(crate) fn check_live(&self) -> Result<(), Termination> {
        if self.control.cancel_token().is_cancelled() {
            return Err(Termination::Cancelled);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Termination::Budget(Budget::Deadline));
        }
        if self.failed_in_row >= self.config.max_failed_calls {
            return Err(Termination::TooManyFailures);
        }
        Ok(())
    }

    /// May the search make one more policy call?
    pub(crate) fn check_policy(&self) -> Result<(), Termination> {
        self.check_live()?;
        let budget = &self.config.budget;
        if budget
            .max_policy_calls
            .is_some_and(|max| self.costs.policy_calls >= max)
        {
            return Err(Termination::Budget(Budget::PolicyCalls));
        }
        if budget
            .max_generated_tokens
            .is_some_and(|max| self.costs.generated_tokens >= max)
        {
            return Err(Termination::Budget(Budget::GeneratedTokens));
        }
        Ok(())
    }

    /// May the search make `calls` more scorer calls?
    pub(crate) fn check_scorer(&self, calls: u64) -> Result<(), Termination> {
        self.check_live()?;
        if self
            .config
            .budget
            .max_scorer_calls
            .is_some_and(|max| self.costs.scorer_calls + calls > max)
        {
            return Err(Termination::Budget(Budget::ScorerCalls));
        }
        Ok(())
    }

    /// Generated tokens the budget has left, if it sets one.
    pub(crate) fn tokens_left(&self) -> Option<u64> {
        self.config
            .budget
            .max_generated_tokens
            .map(|max| max.saturating_sub(self.costs.generated_tokens))
    }

    /// How many more nodes the tree may take.
    pub(crate) fn nodes_left(&self, tree: &Tree) -> u64 {
        u64::from(self.config.budget.max_nodes).saturating_sub(tree.len() as u64)
    }

    /// Awaits `call`, unless cancellation or the deadline comes first. A call that is already
    /// done wins, so finished work (and its cost) is never thrown away.
    async fn race<T>(&self, call: impl Future<Output = T>) -> Result<T, Termination> {
        let cancel = self.control.cancel_token();
        let deadline = self.deadline;
        tokio::select! {
            biased;
            out = call => Ok(out),
            () = cancel.cancelled() => Err(Termination::Cancelled),
            () = until(deadline) => Err(Termination::Budget(Budget::Deadline)),
        }
    }

    fn call_failed(&mut self) {
        self.failed_in_row += 1;
    }

    /// One policy call. The outer `Err` means the search must stop now; the inner one that the
    /// call failed (its nodes are to be marked failed).
    pub(crate) async fn propose(
        &mut self,
        mut batch: Vec<ProposeRequest>,
    ) -> Result<Result<Vec<Proposals>, PolicyError>, Termination> {
        let cap = self.next_call_cap.take();
        self.check_policy()?;
        // Share what is left of the token budget among the call's samples, so one wide batch
        // cannot overshoot the budget by a batch's worth of full-length steps: steps of the
        // last call are cut short instead (a cut step is kept, marked `MaxTokens`). A strategy
        // may cap the call further, to keep tokens back for later calls. A scorer that
        // generates (a rollout PRM) will score each new step at about its cost so far per
        // request: that much is kept back for it, and a call that would leave it less is not
        // made.
        if let Some(left) = self.tokens_left() {
            let samples: u64 = batch.iter().map(|r| u64::from(r.k)).sum::<u64>().max(1);
            let scoring = samples.saturating_mul(self.scorer_generated_per_request());
            if scoring > 0 && left < scoring.saturating_add(samples) {
                return Err(Termination::Budget(Budget::GeneratedTokens));
            }
            let remaining = (left - scoring).min(cap.unwrap_or(u64::MAX));
            let per_sample = u32::try_from(remaining / samples)
                .unwrap_or(u32::MAX)
                .max(1);
            for r in &mut batch {
                r.sampling.max_step_tokens = r.sampling.max_step_tokens.min(per_sample);
            }
        }
        self.costs.policy_calls += 1;
        let expected = batch.len();
        let policy = self.policy;
        let reply = self.race(policy.propose(batch)).await?;
        match reply {
            Ok(replies) => {
                for r in &replies {
                    self.costs.add_policy(&r.cost);
                }
                if replies.len() != expected {
                    self.stats.policy_errors += 1;
                    self.call_failed();
                    let message = format!(
                        "policy returned {} replies for {expected} requests",
                        replies.len()
                    );
                    return Ok(Err(PolicyError::new(message)));
                }
                self.failed_in_row = 0;
                Ok(Ok(replies))
            }
            Err(mut e) => {
                tracing::debug!(error = %e, "policy call failed");
                // Work that did come back was paid for, and is kept when it fits the request.
                for r in e.partial.iter().flatten() {
                    self.costs.add_policy(&r.cost);
                }
                if e.partial.len() != expected {
                    e.partial.clear();
                }
                self.stats.policy_errors += 1;
                self.call_failed();
                Ok(Err(e))
            }
        }
    }

    /// Tokens the scorer generated per request so far, rounded up (0 for a scorer that does not
    /// generate, and before the first score).
    pub(crate) fn scorer_generated_per_request(&self) -> u64 {
        self.costs
            .scorer_generated_tokens
            .div_ceil(self.scored_requests.max(1))
    }

    /// Caps the tokens the next policy call may generate in all (shared among its samples as
    /// the budget's remainder is); only with a generated-token budget.
    pub(crate) fn cap_next_call(&mut self, tokens: u64) {
        self.next_call_cap = Some(tokens);
    }

    /// One scorer call; outer and inner `Err` as for [`Io::propose`].
    pub(crate) async fn score(
        &mut self,
        batch: Vec<ScoreRequest>,
    ) -> Result<Result<Vec<StepScores>, ScoreError>, Termination> {
        self.check_scorer(1)?;
        self.costs.scorer_calls += 1;
        let expected = batch.len();
        let reply = match self.scorer {
            Some(scorer) => self.race(scorer.score(batch)).await?,
            None => Ok(LogProbScorer::score_now(&batch)),
        };
        match reply {
            Ok(replies) => {
                self.scored_requests += replies.len() as u64;
                for r in &replies {
                    let c = &mut self.costs;
                    c.scorer_tokens = c.scorer_tokens.saturating_add(r.cost.tokens_computed);
                    c.generated_tokens = c.generated_tokens.saturating_add(r.cost.generated_tokens);
                    c.scorer_generated_tokens = c
                        .scorer_generated_tokens
                        .saturating_add(r.cost.generated_tokens);
                }
                if replies.len() != expected {
                    self.stats.scorer_errors += 1;
                    self.call_failed();
                    let message = format!(
                        "scorer returned {} replies for {expected} requests",
                        replies.len()
                    );
                    return Ok(Err(ScoreError::new(message)));
                }
                self.failed_in_row = 0;
                Ok(Ok(replies))
            }
            Err(e) => {
                tracing::debug!(error = %e, "scorer call failed");
                self.stats.scorer_errors += 1;
                self.call_failed();
                Ok(Err(e))
            }
        }
    }

    /// Publishes the final answer, completes the costs (nodes, wall time) and sends the
    /// `Finished` event. Called once, when the strategy has returned.
    pub(crate) fn finish(
        &mut self,
        tree: &Tree,
        tally: &Tally,
        termination: Termination,
    ) -> (Option<BestAnswer>, Costs) {
        let answer = self.publish_best(tree, tally);
        self.costs.nodes = tree.len() as u64;
        self.costs.wall_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let costs = self.costs;
        self.emit(|| SearchEvent::Finished { termination, costs });
        (answer, costs)
    }

    /// Sends an event, building it only when someone listens.
    pub(crate) fn emit(&mut self, event: impl FnOnce() -> SearchEvent) {
        if self.control.wants_events() && !self.control.emit(event()) {
            self.stats.events_dropped += 1;
        }
    }

    /// Sampling settings for a request about `node`.
    pub(crate) fn sampling(&self, node: NodeId, salt: u64, temperature: Option<f32>) -> Sampling {
        let s = &self.config.sampling;
        Sampling {
            temperature: temperature.unwrap_or(s.temperature),
            top_p: s.top_p,
            max_step_tokens: s.max_step_tokens,
            seed: mix(self.config.seed, (u64::from(node.get()) << 32) ^ salt),
        }
    }

    /// Whether the configured convergence rule holds.
    pub(crate) fn converged(&self, tally: &Tally) -> bool {
        self.config
            .convergence
            .as_ref()
            .is_some_and(|c| tally.converged(c.min_answers, c.min_share))
    }

    /// Computes the best answer so far and publishes it, and copies the tree for readers
    /// ([`crate::TreeTap`]). Called after every round. The watch
    /// channel always gets the latest (votes and weights change every round); an event is sent
    /// only when the answer or its node changed, to keep the stream short.
    pub(crate) fn publish_best(&mut self, tree: &Tree, tally: &Tally) -> Option<BestAnswer> {
        self.control.offer_tree(tree);
        let best = best_answer(tree, tally, self.rule)?;
        self.control.publish_best(best.clone());
        let key = (best.node, best.answer.key.clone());
        if self.published.as_ref() != Some(&key) {
            self.published = Some(key);
            let event = best.clone();
            self.emit(|| SearchEvent::BestAnswer(event));
        }
        Some(best)
    }

    /// Marks `node` failed, counts it and tells listeners.
    pub(crate) fn fail(&mut self, tree: &mut Tree, node: NodeId, reason: &str) {
        tree.fail(node, reason);
        self.stats.failed_nodes += 1;
        self.emit(|| SearchEvent::NodeFailed {
            node,
            reason: reason.to_owned(),
        });
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a proposed step cannot become a usable node, if it cannot.
fn malformed(step: &crate::policy::ProposedStep) -> Option<String> {
    if !step.token_logprobs.is_empty() && step.token_logprobs.len() != step.token_ids.len() {
        return Some(format!(
            "{} log-probs for {} tokens",
            step.token_logprobs.len(),
            step.token_ids.len()
        ));
    }
    if step
        .token_logprobs
        .iter()
        .any(|lp| lp.is_nan() || *lp > 0.0)
    {
        return Some("log-prob is NaN or positive".to_owned());
    }
    None
}

/// Expands every `(leaf, k)` (claimed with [`InFlight::begin_expanding`]: an unexpanded leaf,
/// or an expanded node being widened) with one batched policy call. Returns the new children
/// that did not fail. Terminal children get their answer extracted.
pub(crate) async fn expand<P: Policy, S: Scorer>(
    flight: &mut InFlight<'_>,
    io: &mut Io<'_, P, S>,
    leaves: &[(NodeId, u32)],
) -> Result<Vec<NodeId>, Termination> {
    expand_at(flight, io, leaves, None).await
}

/// [`expand`] at `temperature` instead of the configured one, when given (rollouts).
pub(crate) async fn expand_at<P: Policy, S: Scorer>(
    flight: &mut InFlight<'_>,
    io: &mut Io<'_, P, S>,
    leaves: &[(NodeId, u32)],
    temperature: Option<f32>,
) -> Result<Vec<NodeId>, Termination> {
    let tree = flight.tree();
    let requests = leaves
        .iter()
        .map(|&(node, k)| ProposeRequest {
            node,
            prompt: Arc::clone(tree.prompt()),
            steps: tree.path(node),
            k,
            // Each call at a node draws new samples: a widened node must not get its first
            // children again.
            sampling: io.sampling(
                node,
                SALT_EXPAND + u64::from(tree.node(node).expansions()),
                temperature,
            ),
        })
        .collect();
    // One reply per leaf, or why it has none (a call may fail for some of its leaves only).
    let replies: Vec<Result<Proposals, String>> = match io.propose(requests).await? {
        Ok(replies) => replies.into_iter().map(Ok).collect(),
        Err(e) if e.partial.is_empty() => vec![Err(e.message); leaves.len()],
        Err(e) => {
            let message = e.message;
            e.partial
                .into_iter()
                .map(|r| r.ok_or_else(|| message.clone()))
                .collect()
        }
    };
    let max_depth = io.config.max_depth;
    let mut created = Vec::new();
    for (&(leaf, k), reply) in leaves.iter().zip(replies) {
        let reply = match reply {
            Ok(reply) => reply,
            Err(message) => {
                if flight.tree().node(leaf).is_widening() {
                    // Its children stand; only the call for more of them failed.
                    flight.tree_mut().abandon_expanding(leaf);
                } else {
                    io.fail(flight.tree_mut(), leaf, &message);
                }
                continue;
            }
        };
        let count = reply.steps.len();
        if count == 0 || count > k as usize {
            let reason = format!("policy returned {count} steps for k = {k}");
            if flight.tree().node(leaf).is_widening() {
                flight.tree_mut().abandon_expanding(leaf);
                tracing::debug!(%leaf, reason, "widening failed");
            } else {
                io.fail(flight.tree_mut(), leaf, &reason);
            }
            continue;
        }
        let depth = flight.tree().node(leaf).depth() + 1;
        let min_answer_depth = io.config.min_answer_depth;
        // A step cut by its token limit after it had stated its final answer in full ends the
        // solution as end-of-sequence would have (the limit left no room for it).
        let ends: Vec<bool> = reply
            .steps
            .iter()
            .map(|s| {
                s.stop == StepStop::EndOfSequence
                    || (s.stop == StepStop::MaxTokens && states_final_answer(&s.text))
            })
            .collect();
        let failures: Vec<Option<String>> = reply
            .steps
            .iter()
            .zip(&ends)
            .map(|(s, &ends)| {
                malformed(s).or_else(|| {
                    (ends && depth < min_answer_depth).then(|| {
                        format!(
                            "final answer at step {depth}, before min_answer_depth {min_answer_depth}"
                        )
                    })
                })
            })
            .collect();
        // Priors: exp(mean log-prob) normalised among siblings, computed as a softmax of the
        // means so long steps cannot underflow to zero.
        let means: Vec<f64> = reply
            .steps
            .iter()
            .zip(&failures)
            .map(|(s, f)| {
                let lp = &s.token_logprobs;
                let mean = if lp.is_empty() {
                    0.0
                } else {
                    lp.iter().map(|&x| f64::from(x)).sum::<f64>() / lp.len() as f64
                };
                if f.is_none() {
                    mean
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let top = means.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = means
            .iter()
            .map(|&m| {
                if m == f64::NEG_INFINITY || top == f64::NEG_INFINITY {
                    0.0
                } else {
                    (m - top).exp()
                }
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let children = reply
            .steps
            .into_iter()
            .zip(failures)
            .zip(weights)
            .zip(ends)
            .map(|(((s, failure), w), ends)| NewChild {
                terminal: ends || depth >= max_depth,
                prior: if total > 0.0 { (w / total) as f32 } else { 0.0 },
                stop: s.stop,
                failure,
                step: Arc::new(Step {
                    text: s.text,
                    token_ids: s.token_ids,
                    token_logprobs: s.token_logprobs,
                }),
            })
            .collect();
        let ids = flight.tree_mut().expand(leaf, children);
        for &id in &ids {
            match flight.tree().node(id).state() {
                NodeState::Terminal => {
                    let answer = extract_answer(&flight.tree().solution_text(id));
                    flight.tree_mut().set_answer(id, answer);
                    created.push(id);
                }
                NodeState::Failed => {
                    io.stats.failed_nodes += 1;
                    let reason = flight
                        .tree()
                        .node(id)
                        .failure()
                        .unwrap_or_default()
                        .to_owned();
                    io.emit(|| SearchEvent::NodeFailed { node: id, reason });
                }
                _ => created.push(id),
            }
        }
        io.emit(|| SearchEvent::NodeExpanded {
            node: leaf,
            children: ids,
        });
    }
    Ok(created)
}

/// Scores `nodes` with one batched scorer call. A failed call, a malformed reply or a non-finite
/// value fails the node. Scored final answers enter `tally` when one is given (beam search and
/// DVTS pass none: only the final answers they keep count).
pub(crate) async fn score_nodes<P: Policy, S: Scorer>(
    flight: &mut InFlight<'_>,
    io: &mut Io<'_, P, S>,
    mut tally: Option<&mut Tally>,
    nodes: &[NodeId],
) -> Result<(), Termination> {
    if nodes.is_empty() {
        return Ok(());
    }
    flight.owe_scores(nodes);
    let tree = flight.tree();
    let requests = nodes
        .iter()
        .map(|&node| ScoreRequest {
            node,
            prompt: Arc::clone(tree.prompt()),
            steps: tree.path(node),
        })
        .collect();
    match io.score(requests).await? {
        Err(e) => {
            for &node in nodes {
                io.fail(flight.tree_mut(), node, &e.message);
            }
        }
        Ok(replies) => {
            let aggregation = io.config.scoring.aggregation;
            for (&node, reply) in nodes.iter().zip(replies) {
                let depth = flight.tree().node(node).depth() as usize;
                if reply.scores.len() != depth {
                    let reason = format!(
                        "scorer returned {} scores for {depth} steps",
                        reply.scores.len()
                    );
                    io.fail(flight.tree_mut(), node, &reason);
                    continue;
                }
                let Some(value) = aggregation.apply(&reply.scores) else {
                    io.fail(flight.tree_mut(), node, "score is NaN or infinite");
                    continue;
                };
                flight.tree_mut().set_score(node, value);
                io.emit(|| SearchEvent::NodeScored { node, value });
                if let (Some(tally), Some(answer)) =
                    (tally.as_deref_mut(), flight.tree().node(node).answer())
                {
                    tally.add(node, answer, Some(value));
                }
            }
        }
    }
    flight.scores_stored();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(raw: &str) -> Answer {
        Answer::new(raw)
    }

    fn node(i: u32) -> NodeId {
        NodeId::from_raw(i)
    }

    fn check(entries: &[(&str, Option<f64>)], selection: AnswerSelection, expected: &str) {
        let mut tally = Tally::default();
        for (i, (raw, value)) in entries.iter().enumerate() {
            tally.add(node(i as u32 + 1), &answer(raw), *value);
        }
        let best = tally.best(selection).map(|b| b.answer.key);
        assert_eq!(
            best.as_deref(),
            Some(expected),
            "{selection:?} over {entries:?}"
        );
    }

    #[test]
    fn tally_selections() {
        let entries = [
            ("1/2", Some(0.9)),
            ("7", Some(0.5)),
            ("0.5", Some(0.1)),
            ("7", Some(0.6)),
            ("$7", Some(0.3)),
        ];
        check(&entries, AnswerSelection::BestValue, "0.5"); // 0.9 is the single best, "1/2" == "0.5"
        check(&entries, AnswerSelection::WeightedVote, "7"); // 1.4 against 1.0
        check(&entries, AnswerSelection::Majority, "7"); // 3 votes against 2
                                                         // Equal votes: the larger value sum wins, not the answer that finished first (which is
                                                         // usually the cheapest guess).
        let tie = [
            ("3", Some(0.2)),
            ("4", Some(0.3)),
            ("4", Some(0.2)),
            ("3", Some(0.4)),
        ];
        check(&tie, AnswerSelection::Majority, "3");
        let tie = [("3", Some(0.2)), ("4", Some(0.7))];
        check(&tie, AnswerSelection::Majority, "4");
        // Equal value sums: more votes win.
        let tie = [("3", Some(0.6)), ("4", Some(0.3)), ("4", Some(0.3))];
        check(&tie, AnswerSelection::WeightedVote, "4");
        // Only with nothing else to go on does the answer seen first win.
        check(&[("3", None), ("4", None)], AnswerSelection::Majority, "3");
        check(
            &[("3", Some(0.5)), ("4", Some(0.5))],
            AnswerSelection::BestValue,
            "3",
        );
    }

    /// Root → a (→ a1 "7", a2 → a21 "7", a3 "8"), b "9", c (no final below). Shares: b 1/2;
    /// a's 1/2 split in three: a1 1/6, a21 1/6, a3 1/6. So "7" 1/3, "8" 1/6, "9" 1/2: the
    /// vote (two "7"s) and the share vote ("9") disagree, as they should.
    #[test]
    fn share_vote_counts_each_final_as_often_as_the_policy_reaches_it() {
        use crate::policy::{Step, StepStop};
        use crate::tree::NewChild;
        let new = |text: &str, terminal: bool| NewChild {
            step: Arc::new(Step {
                text: text.into(),
                token_ids: vec![1],
                token_logprobs: vec![-0.1],
            }),
            stop: StepStop::Delimiter,
            prior: 0.5,
            terminal,
            failure: None,
        };
        let mut tree = Tree::new("q");
        tree.begin_expanding(NodeId::ROOT);
        let top = tree.expand(
            NodeId::ROOT,
            vec![
                new("a", false),
                new("The answer is 9.", true),
                new("c", false),
            ],
        );
        tree.begin_expanding(top[0]);
        let under_a = tree.expand(
            top[0],
            vec![
                new("The answer is 7.", true),
                new("a2", false),
                new("The answer is 8.", true),
            ],
        );
        tree.begin_expanding(under_a[1]);
        let deep = tree.expand(under_a[1], vec![new("The answer is 7.", true)]);
        let mut tally = Tally::default();
        let finals = [
            (under_a[0], "7", 0.9),
            (deep[0], "7", 0.8),
            (under_a[2], "8", 0.2),
            (top[1], "9", 0.5),
        ];
        for (node, raw, value) in finals {
            tally.add(node, &answer(raw), Some(value));
        }
        let shared = tally.with_shares(Some(&tree));
        let by_answer = |raw: &str| {
            shared
                .candidates()
                .into_iter()
                .find(|c| c.answer.raw == raw)
                .unwrap()
        };
        assert!((by_answer("7").share - 1.0 / 3.0).abs() < 1e-12);
        assert!((by_answer("8").share - 1.0 / 6.0).abs() < 1e-12);
        assert!((by_answer("9").share - 0.5).abs() < 1e-12);
        assert!((by_answer("7").share_weight - (0.9 + 0.8) / 6.0).abs() < 1e-12);
        let total: f64 = shared.candidates().iter().map(|c| c.share).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(
            tally.best(AnswerSelection::Majority).unwrap().answer.raw,
            "7"
        );
        assert_eq!(
            shared.best(AnswerSelection::ShareVote).unwrap().answer.raw,
            "9"
        );
        // 7: 1.7/6 = 0.283 against 9: 0.25.
        assert_eq!(
            shared
                .best(AnswerSelection::WeightedShareVote)
                .unwrap()
                .answer
                .raw,
            "7"
        );
        // The rule as a search applies it fills the shares from the tree itself.
        let rule = AnswerRule::Tally(AnswerSelection::ShareVote);
        assert_eq!(best_answer(&tree, &tally, rule).unwrap().answer.raw, "9");
        // Without a tree every final counts 1 / all: the share vote is the majority vote.
        let flat = tally.with_shares(None);
        assert_eq!(
            flat.best(AnswerSelection::ShareVote).unwrap().answer.raw,
            "7"
        );
        assert!((flat.candidates()[0].share - 0.5).abs() < 1e-12);
    }

    #[test]
    fn select_answer_agrees_with_the_tally() {
        let finals: Vec<(Answer, Option<f64>)> = [
            ("1/2", Some(0.9)),
            ("7", Some(0.5)),
            ("0.5", Some(0.1)),
            ("7", Some(0.6)),
            ("$7", Some(0.3)),
        ]
        .iter()
        .map(|&(raw, v)| (answer(raw), v))
        .collect();
        assert_eq!(select_answer(&finals, AnswerSelection::BestValue), Some(0));
        // "7" wins on weight and on votes; its best-valued final is the fourth.
        assert_eq!(
            select_answer(&finals, AnswerSelection::WeightedVote),
            Some(3)
        );
        assert_eq!(select_answer(&finals, AnswerSelection::Majority), Some(3));
        // Unscored (self-consistency): ties go to the answer reached first, held by its first final.
        let unscored: Vec<(Answer, Option<f64>)> = ["4", "3", "3", "4"]
            .iter()
            .map(|&raw| (answer(raw), None))
            .collect();
        assert_eq!(select_answer(&unscored, AnswerSelection::Majority), Some(0));
        assert_eq!(select_answer(&unscored, AnswerSelection::BestValue), None);
        assert_eq!(select_answer(&[], AnswerSelection::Majority), None);
    }

    #[test]
    fn convergence_needs_both_count_and_share() {
        let mut tally = Tally::default();
        for (i, raw) in ["5", "5", "6", "5"].iter().enumerate() {
            tally.add(node(i as u32), &answer(raw), None);
        }
        assert!(tally.converged(4, 0.75));
        assert!(!tally.converged(5, 0.75));
        assert!(!tally.converged(4, 0.8));
    }

    #[test]
    fn seeds_differ_by_node_and_salt() {
        let seeds = [mix(1, 0), mix(1, 1), mix(2, 0), mix(1, 1 << 32)];
        for (i, a) in seeds.iter().enumerate() {
            for b in &seeds[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(mix(1, 0), mix(1, 0));
    }
}

//! Serde-deserialisable configuration for every strategy, with defaults and validation.
//!
//! Every field has a default, so `{}` is a valid [`SearchConfig`] (MCTS with the defaults below),
//! and unknown fields are rejected so a typo cannot silently fall back to a default.

use serde::{Deserialize, Serialize};

use crate::error::SearchError;
use crate::scorer::Aggregation;

/// Most samples one request may ask for.
pub const K_MAX: u32 = 256;
/// Most simulations one MCTS round may have in flight.
pub const IN_FLIGHT_MAX: u32 = 4096;
/// Most nodes any tree may hold (the arena's hard limit, far below `u32::MAX`).
pub const NODES_MAX: u32 = 1 << 22;
/// Deepest path any search may build.
pub const DEPTH_MAX: u32 = 4096;

/// Everything one search needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// Which algorithm, with its own settings.
    pub strategy: StrategyConfig,
    /// Which scorer values nodes and how step scores become a path value.
    pub scoring: ScoringConfig,
    /// Sampling settings sent with every policy request.
    pub sampling: SamplingConfig,
    /// Limits on what the search may spend; it stops at the first one reached.
    pub budget: BudgetConfig,
    /// Seed of every random choice and of every request's sampling seed: the same seed and a
    /// deterministic policy give the same tree.
    pub seed: u64,
    /// Paths end here even without an end-of-sequence; the last step is then treated as final.
    pub max_depth: u32,
    /// Fewest reasoning steps before a final answer counts, in tree searches (MCTS, beam,
    /// DVTS): a step that ends the solution at a smaller depth fails ("final answer at step
    /// 1, before min_answer_depth 2") and the search spends its budget elsewhere. 1 accepts an
    /// answer at any depth. Small models often open with an answer-first guess ("The answer is
    /// 144."); in the GSM8K comparison (docs/eval) none of 179 such one-step answers returned
    /// by the tree searches was right.
    pub min_answer_depth: u32,
    /// Stop early once the answer has converged.
    pub convergence: Option<ConvergenceConfig>,
    /// Stop after this many policy or scorer calls fail in a row (each failure already marks its
    /// nodes failed; this only keeps a broken backend from eating the whole budget).
    pub max_failed_calls: u32,
    /// Tree searches (MCTS, beam, DVTS) may ask a node for more children with a new seed
    /// (progressive widening) until it holds this many: when every child is final or failed, or
    /// (MCTS) when its visits outgrow its children. A node at this limit whose children are all
    /// final or failed is exhausted; a search ends `exhausted` only when the root is.
    pub max_children: u32,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            strategy: StrategyConfig::default(),
            scoring: ScoringConfig::default(),
            sampling: SamplingConfig::default(),
            budget: BudgetConfig::default(),
            seed: 0,
            max_depth: 32,
            min_answer_depth: 1,
            convergence: None,
            max_failed_calls: 8,
            max_children: 64,
        }
    }
}

/// The search algorithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StrategyConfig {
    /// Monte-Carlo tree search with PUCT selection.
    Mcts(MctsConfig),
    /// Sample `n` solutions, keep the one with the best score.
    BestOfN(SampleConfig),
    /// Sample `n` solutions, keep the answer with the largest total score.
    WeightedBestOfN(SampleConfig),
    /// Sample `n` solutions, keep the most frequent answer (no scorer calls).
    SelfConsistency(SampleConfig),
    /// Beam search guided by the scorer.
    Beam(BeamConfig),
    /// Diverse verifier tree search: independent greedy subtrees.
    Dvts(DvtsConfig),
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::Mcts(MctsConfig::default())
    }
}

/// Settings of [`StrategyConfig::Mcts`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MctsConfig {
    /// Children created per expansion (one batched request asks for this many samples).
    pub expand_k: u32,
    /// Constant part of the exploration weight `c(s) = c_puct + ln((N + c_base + 1) / c_base)`.
    /// The default, 0.2, suits values in [0, 1] and budgets of tens to hundreds of simulations;
    /// AlphaZero's 1.25 (for values in [-1, 1] and thousands of simulations) explores far too
    /// broadly at LLM budgets.
    pub c_puct: f64,
    /// Visit scale at which the exploration weight starts to grow.
    pub c_base: f64,
    /// Simulations selected per round under virtual loss; their leaves share one policy call.
    pub simulations_in_flight: u32,
    /// Stop after this many simulations.
    pub max_simulations: u32,
    /// How values flow up the tree.
    pub backup: Backup,
    /// How the final answer is chosen.
    pub final_answer: MctsAnswer,
    /// Run every simulation's new leaf on to a final answer, keeping the rollout's steps as tree
    /// nodes (so every simulation adds an answer to the vote and later ones share its prefix),
    /// and back up a mix of the leaf's value and the answer's. `null` stops each simulation at
    /// its new leaf and backs up the leaf's value alone.
    pub rollout: Option<RolloutConfig>,
    /// Progressive widening: an expanded node with `N` visits may hold
    /// `ceil(widen_c * N^widen_alpha)` children; when it holds fewer, the next simulation there
    /// asks it for one more (with a new seed) instead of descending. A node whose children are
    /// all final or failed is widened by `expand_k` whatever its visits. Up to
    /// [`SearchConfig::max_children`].
    pub widen_c: f64,
    /// Exponent of progressive widening, in [0, 1]; see `widen_c`.
    pub widen_alpha: f64,
    /// Independent samples the search starts from: the first round gives the root
    /// `max(expand_k, root_samples)` children and runs every one of them on to a final answer
    /// (with rollouts on), each its own simulation, before PUCT chooses among them. Their
    /// answers enter the vote like any other, so the tree keeps the coverage of that many
    /// independent samples, and later simulations branch off their steps. 0 or 1: the first
    /// round expands the root like any leaf and follows its best child only.
    pub root_samples: u32,
}

impl Default for MctsConfig {
    fn default() -> Self {
        MctsConfig {
            expand_k: 2,
            c_puct: 0.2,
            c_base: 19652.0,
            simulations_in_flight: 8,
            max_simulations: 10_000,
            backup: Backup::Mean,
            final_answer: MctsAnswer::WeightedVote,
            rollout: Some(RolloutConfig::default()),
            widen_c: 1.0,
            widen_alpha: 0.5,
            root_samples: 0,
        }
    }
}

/// How MCTS combines the values backed up through an edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backup {
    /// Q is the mean of backed-up values (AlphaZero).
    #[default]
    Mean,
    /// Q is the best backed-up value (optimistic; suits "one right path is enough").
    Max,
}

/// How MCTS picks its answer at the end. The votes count every final answer the tree holds
/// (expanded leaves and rollouts alike); ties go to the larger value sum, then the answer
/// reached first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MctsAnswer {
    /// Follow the most visited child from the root down to a final answer.
    MostVisited,
    /// The scored final answer with the highest value.
    BestValue,
    /// Sum values per distinct answer over all final answers; the largest sum wins (the
    /// default: weighted voting beat plain majority and single best values on GSM8K with the
    /// policy's own confidence, docs/eval; the share votes were no better on the tuning
    /// questions with the shipped head, docs/eval/gsm8k-tune-300-head-1024, and undo a good
    /// verifier's guidance, search/tests/it/lookahead.rs).
    #[default]
    WeightedVote,
    /// The answer most final answers agree on (self-consistency over the tree).
    Majority,
    /// [`AnswerSelection::ShareVote`]: each final answer counts by its path share.
    ShareVote,
    /// [`AnswerSelection::WeightedShareVote`]: share × value, summed per answer.
    WeightedShareVote,
}

/// Settings of MCTS rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Most steps one rollout may add before it is scored as it stands.
    pub max_steps: u32,
    /// Temperature of rollout steps; `None` uses [`SamplingConfig::temperature`].
    pub temperature: Option<f32>,
    /// Weight of the final answer's value in what a simulation backs up, in [0, 1]:
    /// `(1 - w) * leaf value + w * answer value` (AlphaGo's mix of value and rollout outcome).
    pub answer_weight: f64,
    /// What a rollout's final answer is worth.
    pub answer_value: AnswerValue,
}

/// The value of a rollout's final answer, in what its simulation backs up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerValue {
    /// The scorer's value of the final step.
    #[default]
    Score,
    /// The share of the tree's final answers so far that agree with it (rStar's
    /// self-consistency reward): needs no verifier, and favours the subtrees whose answers the
    /// rest of the tree confirms.
    Consistency,
    /// The scorer's value times that share (a verifier and self-consistency together).
    ScoreTimesConsistency,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            max_steps: 16,
            temperature: None,
            answer_weight: 0.5,
            answer_value: AnswerValue::Score,
        }
    }
}

/// Settings of the sampling strategies (best-of-N, weighted best-of-N, self-consistency).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// Solutions to sample.
    pub n: u32,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig { n: 16 }
    }
}

/// Settings of [`StrategyConfig::Beam`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeamConfig {
    /// N: beams kept after each step (the root counts as N copies of the prompt).
    pub beam_width: u32,
    /// M: next steps proposed per beam; the best N of all N·M are kept.
    pub proposals_per_beam: u32,
    /// How the answer is chosen among finished beams.
    pub answer: AnswerSelection,
}

impl Default for BeamConfig {
    fn default() -> Self {
        BeamConfig {
            beam_width: 4,
            proposals_per_beam: 4,
            answer: AnswerSelection::WeightedVote,
        }
    }
}

/// Settings of [`StrategyConfig::Dvts`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DvtsConfig {
    /// N: total beams; the root starts N / M independent subtrees.
    pub beams: u32,
    /// M: next steps proposed per subtree per step; each subtree greedily keeps the best.
    pub width: u32,
    /// How the answer is chosen among the subtrees' final answers.
    pub answer: AnswerSelection,
}

impl Default for DvtsConfig {
    fn default() -> Self {
        DvtsConfig {
            beams: 16,
            width: 4,
            answer: AnswerSelection::WeightedVote,
        }
    }
}

/// How a final answer is chosen among scored final answers. Every vote breaks ties by the
/// larger value sum, then by the answer reached first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerSelection {
    /// The single highest value.
    #[default]
    BestValue,
    /// The answer whose values sum highest (ties: more votes).
    WeightedVote,
    /// The most frequent answer (ties: larger value sum).
    Majority,
    /// The answer with the largest path share (`AnswerTally::share`): a vote in which each
    /// final answer counts as often as the policy would reach it, so answers below a step the
    /// search explored many times do not outvote the rest (ties: larger value sum). For
    /// independent samples it is majority vote.
    ShareVote,
    /// The answer whose share × value sums highest (`AnswerTally::share_weight`; ties: larger
    /// share). For independent samples it is the weighted vote.
    WeightedShareVote,
}

impl AnswerSelection {
    /// Whether the choice needs the finals' places in the tree.
    pub fn uses_shares(self) -> bool {
        matches!(
            self,
            AnswerSelection::ShareVote | AnswerSelection::WeightedShareVote
        )
    }
}

/// Which scorer values nodes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// The scorer to call.
    pub scorer: ScorerChoice,
    /// How a path's step scores become its value.
    pub aggregation: Aggregation,
}

/// The scorer to call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorerChoice {
    /// The [`crate::Scorer`] passed to [`crate::Search::run`] (a PRM or ORM).
    #[default]
    Provided,
    /// [`crate::LogProbScorer`]: the policy's own step confidence; the passed scorer is unused.
    LogProb,
}

/// Sampling settings sent with every policy request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass, in (0, 1].
    pub top_p: f32,
    /// Most tokens per step.
    pub max_step_tokens: u32,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.8,
            top_p: 1.0,
            max_step_tokens: 256,
        }
    }
}

/// What a search may spend; it stops at whichever limit it reaches first.
///
/// Token limits are checked before each policy call, so one search can pass
/// `max_generated_tokens` by at most one batch; call and node limits are never passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Generated tokens, as the policy reports them.
    pub max_generated_tokens: Option<u64>,
    /// Calls to [`crate::Policy::propose`].
    pub max_policy_calls: Option<u64>,
    /// Calls to [`crate::Scorer::score`] (or to the log-prob scorer).
    pub max_scorer_calls: Option<u64>,
    /// Nodes in the tree, root included; at most [`NODES_MAX`].
    pub max_nodes: u32,
    /// Wall-clock limit from the start of the search, in milliseconds; an in-flight call is
    /// abandoned when it passes.
    pub deadline_ms: Option<u64>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            max_generated_tokens: None,
            max_policy_calls: None,
            max_scorer_calls: None,
            max_nodes: 100_000,
            deadline_ms: None,
        }
    }
}

/// Early stop once enough final answers agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvergenceConfig {
    /// Final answers needed before convergence is judged.
    pub min_answers: u32,
    /// Share of final answers the leading answer must hold, in (0, 1].
    pub min_share: f64,
}

impl Default for ConvergenceConfig {
    fn default() -> Self {
        ConvergenceConfig {
            min_answers: 8,
            min_share: 0.75,
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SearchError {
    SearchError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

fn in_range(field: &'static str, value: u32, low: u32, high: u32) -> Result<(), SearchError> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} is outside {low}..={high}")))
    }
}

impl SearchConfig {
    /// Parses a config from JSON and validates it.
    pub fn from_json(json: &str) -> Result<SearchConfig, SearchError> {
        let config: SearchConfig =
            serde_json::from_str(json).map_err(|e| invalid("<json>", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against its range.
    pub fn validate(&self) -> Result<(), SearchError> {
        in_range("max_depth", self.max_depth, 1, DEPTH_MAX)?;
        in_range("min_answer_depth", self.min_answer_depth, 1, self.max_depth)?;
        in_range("budget.max_nodes", self.budget.max_nodes, 2, NODES_MAX)?;
        let s = &self.sampling;
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return Err(invalid("sampling.temperature", "must be finite and >= 0"));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(invalid("sampling.top_p", "must be in (0, 1]"));
        }
        in_range("sampling.max_step_tokens", s.max_step_tokens, 1, 1 << 20)?;
        if let Some(c) = &self.convergence {
            if !(c.min_share > 0.0 && c.min_share <= 1.0) {
                return Err(invalid("convergence.min_share", "must be in (0, 1]"));
            }
            in_range("convergence.min_answers", c.min_answers, 1, u32::MAX)?;
        }
        in_range("max_failed_calls", self.max_failed_calls, 1, u32::MAX)?;
        in_range("max_children", self.max_children, 1, K_MAX * K_MAX)?;
        match &self.strategy {
            StrategyConfig::Mcts(m) => {
                in_range("strategy.expand_k", m.expand_k, 1, K_MAX)?;
                in_range(
                    "strategy.simulations_in_flight",
                    m.simulations_in_flight,
                    1,
                    IN_FLIGHT_MAX,
                )?;
                in_range("strategy.max_simulations", m.max_simulations, 1, u32::MAX)?;
                if !(m.c_puct.is_finite() && m.c_puct >= 0.0) {
                    return Err(invalid("strategy.c_puct", "must be finite and >= 0"));
                }
                if !(m.c_base.is_finite() && m.c_base > 0.0) {
                    return Err(invalid("strategy.c_base", "must be finite and > 0"));
                }
                if !(m.widen_c.is_finite() && m.widen_c >= 0.0) {
                    return Err(invalid("strategy.widen_c", "must be finite and >= 0"));
                }
                in_range("strategy.root_samples", m.root_samples, 0, K_MAX)?;
                if !(0.0..=1.0).contains(&m.widen_alpha) {
                    return Err(invalid("strategy.widen_alpha", "must be in [0, 1]"));
                }
                if let Some(r) = &m.rollout {
                    in_range("strategy.rollout.max_steps", r.max_steps, 1, DEPTH_MAX)?;
                    if !(0.0..=1.0).contains(&r.answer_weight) {
                        return Err(invalid(
                            "strategy.rollout.answer_weight",
                            "must be in [0, 1]",
                        ));
                    }
                    if r.temperature.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
                        return Err(invalid(
                            "strategy.rollout.temperature",
                            "must be finite and >= 0",
                        ));
                    }
                }
            }
            StrategyConfig::BestOfN(c)
            | StrategyConfig::WeightedBestOfN(c)
            | StrategyConfig::SelfConsistency(c) => {
                in_range("strategy.n", c.n, 1, K_MAX)?;
            }
            StrategyConfig::Beam(b) => {
                in_range("strategy.beam_width", b.beam_width, 1, K_MAX)?;
                in_range(
                    "strategy.proposals_per_beam",
                    b.proposals_per_beam,
                    1,
                    K_MAX,
                )?;
                in_range(
                    "strategy.beam_width * proposals_per_beam",
                    b.beam_width * b.proposals_per_beam,
                    1,
                    K_MAX,
                )?;
            }
            StrategyConfig::Dvts(d) => {
                in_range("strategy.width", d.width, 1, K_MAX)?;
                in_range("strategy.beams", d.beams, d.width, K_MAX * d.width)?;
                if d.beams % d.width != 0 {
                    return Err(invalid("strategy.beams", "must be a multiple of `width`"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, expected: Result<(), &str>) {
        match (SearchConfig::from_json(json), expected) {
            (Ok(_), Ok(())) => {}
            (Err(SearchError::InvalidConfig { field, .. }), Err(want)) => {
                assert_eq!(field, want, "{json}")
            }
            (got, want) => panic!("{json}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parsing_and_validation() {
        check("{}", Ok(()));
        check(
            r#"{"strategy": {"kind": "mcts", "expand_k": 3, "rollout": {}}}"#,
            Ok(()),
        );
        check(
            r#"{"strategy": {"kind": "beam", "beam_width": 4, "proposals_per_beam": 4}}"#,
            Ok(()),
        );
        check(
            r#"{"strategy": {"kind": "dvts", "beams": 16, "width": 4, "answer": "weighted_vote"}}"#,
            Ok(()),
        );
        check(
            r#"{"strategy": {"kind": "best_of_n", "n": 8}, "scoring": {"aggregation": "min"}}"#,
            Ok(()),
        );
        check(
            r#"{"strategy": {"kind": "self_consistency"}, "scoring": {"scorer": "log_prob"}}"#,
            Ok(()),
        );
        check(
            r#"{"budget": {"max_generated_tokens": 1000, "deadline_ms": 50}, "seed": 7}"#,
            Ok(()),
        );
        check(
            r#"{"strategy": {"kind": "dvts", "beams": 10, "width": 4}}"#,
            Err("strategy.beams"),
        );
        check(
            r#"{"strategy": {"kind": "mcts", "expand_k": 0}}"#,
            Err("strategy.expand_k"),
        );
        check(
            r#"{"strategy": {"kind": "mcts", "c_base": 0}}"#,
            Err("strategy.c_base"),
        );
        check(r#"{"sampling": {"top_p": 0}}"#, Err("sampling.top_p"));
        check(r#"{"max_depth": 0}"#, Err("max_depth"));
        check(r#"{"budget": {"max_nodes": 1}}"#, Err("budget.max_nodes"));
        check(
            r#"{"convergence": {"min_share": 1.5}}"#,
            Err("convergence.min_share"),
        );
        check(
            r#"{"strategy": {"kind": "beam", "beam_width": 64, "proposals_per_beam": 8}}"#,
            Err("strategy.beam_width * proposals_per_beam"),
        );
        check(r#"{"stratgey": {}}"#, Err("<json>"));
        check(
            r#"{"strategy": {"kind": "mcts", "expandk": 3}}"#,
            Err("<json>"),
        );
        check(r#"{"strategy": {"kind": "annealing"}}"#, Err("<json>"));
    }

    #[test]
    fn defaults_round_trip_through_json() {
        let config = SearchConfig::default();
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(SearchConfig::from_json(&json).unwrap(), config);
    }
}

//! The named strategies of the command line and the gRPC API, and the search configuration each
//! one means.

use arbor_search::{
    BeamConfig, DvtsConfig, MctsConfig, SampleConfig, ScorerChoice, SearchConfig, StrategyConfig,
};

/// Test-time strategies.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Monte-Carlo tree search: PUCT, progressive widening, every leaf rolled out to an answer
    /// (its steps kept as nodes), a weighted vote over the tree's answers.
    Mcts,
    /// Sample N solutions, keep the best-scored one.
    BestOfN,
    /// Sample N solutions, keep the answer with the largest summed score.
    WeightedBestOfN,
    /// Sample N solutions, keep the most frequent answer (self-consistency; ties: the policy's
    /// summed confidence).
    Majority,
    /// Beam search guided by step scores (search-and-learn's): every finished beam votes.
    Beam,
    /// Diverse verifier tree search: independent subtrees, each keeping its best of M per step.
    Dvts,
}

impl Strategy {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Mcts => "mcts",
            Strategy::BestOfN => "best-of-n",
            Strategy::WeightedBestOfN => "weighted-best-of-n",
            Strategy::Majority => "majority",
            Strategy::Beam => "beam",
            Strategy::Dvts => "dvts",
        }
    }
}

/// Expected generated tokens of one sampled solution with the default model and prompt: a
/// budget of B tokens pays for about B / this whole solutions.
pub const SOLUTION_TOKENS: u32 = 192;

/// The share of the solutions a budget pays for that MCTS spends first on independent samples
/// from the root (`arbor search --root-samples`, `arbor eval --root-share`). Chosen on GSM8K
/// training questions 4000-4299 with the shipped head (docs/eval/gsm8k-tune-300-root-samples):
/// 0.8 beat none by 5-11 of 300 questions at 1,024 tokens and by 15 at 2,048.
pub const ROOT_SHARE: f64 = 0.8;

/// Whole solutions `budget` pays for at `solution_tokens` each: 1 to 16.
pub fn solutions_in(budget: u64, solution_tokens: u32) -> u32 {
    u32::try_from(budget / u64::from(solution_tokens.max(1)))
        .unwrap_or(u32::MAX)
        .clamp(1, 16)
}

/// MCTS's root samples for `share` of the solutions `budget` pays for (rounded).
pub fn root_samples(budget: u64, solution_tokens: u32, share: f64) -> u32 {
    (share * f64::from(solutions_in(budget, solution_tokens))).round() as u32
}

/// The search configuration of `strategy` with `n` samples (best-of-n, weighted, majority) or
/// beams (beam: at most 4 kept; dvts: all), steps sampled at `temperature` with at most
/// `max_step_tokens` tokens, valued by the policy's own log-probs. Budgets and seed are the
/// caller's to set.
pub fn strategy_config(
    strategy: Strategy,
    n: u32,
    temperature: f32,
    max_step_tokens: u32,
) -> SearchConfig {
    let strategy = match strategy {
        Strategy::Mcts => StrategyConfig::Mcts(MctsConfig::default()),
        Strategy::BestOfN => StrategyConfig::BestOfN(SampleConfig { n }),
        Strategy::WeightedBestOfN => StrategyConfig::WeightedBestOfN(SampleConfig { n }),
        Strategy::Majority => StrategyConfig::SelfConsistency(SampleConfig { n }),
        Strategy::Beam => StrategyConfig::Beam(BeamConfig {
            beam_width: n.min(4),
            ..BeamConfig::default()
        }),
        Strategy::Dvts => StrategyConfig::Dvts(DvtsConfig {
            beams: n,
            ..DvtsConfig::default()
        }),
    };
    let mut c = SearchConfig {
        strategy,
        ..SearchConfig::default()
    };
    c.scoring.scorer = ScorerChoice::LogProb;
    c.sampling.temperature = temperature;
    c.sampling.max_step_tokens = max_step_tokens;
    c
}

/// A short name for why a search stopped: `completed`, `exhausted`, `converged`, `cancelled`,
/// `budget_generated_tokens`, `budget_deadline`, ..., `too_many_failures`. One spelling
/// everywhere: the RPC result, `arbor search --json` and `arbor eval`'s traces.
pub fn termination_name(t: arbor_search::Termination) -> String {
    use arbor_search::{Budget, Termination};
    match t {
        Termination::Completed => "completed".into(),
        Termination::Exhausted => "exhausted".into(),
        Termination::Converged => "converged".into(),
        Termination::Cancelled => "cancelled".into(),
        Termination::TooManyFailures => "too_many_failures".into(),
        Termination::Budget(b) => format!(
            "budget_{}",
            match b {
                Budget::GeneratedTokens => "generated_tokens",
                Budget::PolicyCalls => "policy_calls",
                Budget::ScorerCalls => "scorer_calls",
                Budget::Nodes => "nodes",
                Budget::Simulations => "simulations",
                Budget::Deadline => "deadline",
            }
        ),
    }
}

//! Test-time search over LLM reasoning steps.
//!
//! A search grows a tree whose nodes are reasoning steps. It asks a [`Policy`] for next steps and a
//! [`Scorer`] for step values, always in batches, and knows nothing of how either is served: no
//! gRPC, GPUs, files or specific models. Strategies (all in one engine, all configured by
//! serde-deserialisable structs, all seeded and reproducible):
//!
//! - MCTS with PUCT, virtual loss, batched expansion, progressive widening, and rollouts kept as
//!   tree nodes, answering by a vote over the tree ([`MctsConfig`]);
//! - best-of-N, weighted best-of-N and self-consistency ([`SampleConfig`]);
//! - beam search ([`BeamConfig`]) and DVTS ([`DvtsConfig`]).
//!
//! Every search respects budgets ([`BudgetConfig`]), reports exact costs ([`Costs`]), can be
//! cancelled and streams events and its best answer so far ([`SearchControl`]).
//!
//! ```
//! use arbor_search::synthetic::{GamePolicy, GameScorer, PathGame};
//! use arbor_search::{Search, SearchConfig, SearchControl};
//!
//! let game = PathGame::new(1, 4, 0.6);
//! let config = SearchConfig::from_json(r#"{"strategy": {"kind": "beam"}, "seed": 7}"#).unwrap();
//! let policy = GamePolicy::new(game.clone());
//! let scorer = GameScorer::new(game.clone(), 0.3, 0.1);
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let mut search = Search::new(game.prompt().clone(), config).unwrap();
//! let outcome = runtime.block_on(search.run(&policy, &scorer, &SearchControl::new())).unwrap();
//! assert_eq!(outcome.answer.unwrap().answer.key, game.answer());
//! search.tree().check_invariants().unwrap();
//! ```

#![warn(missing_docs, unreachable_pub)]

mod answer;
mod beam;
mod best_of_n;
mod config;
mod control;
mod engine;
mod error;
mod flight;
mod mcts;
mod outcome;
mod policy;
mod scorer;
mod search;
pub mod synthetic;
mod tree;

pub use answer::{equivalent, extract_answer, extract_raw, normalize, states_final_answer, Answer};
pub use config::{
    AnswerSelection, AnswerValue, Backup, BeamConfig, BudgetConfig, ConvergenceConfig, DvtsConfig,
    MctsAnswer, MctsConfig, RolloutConfig, SampleConfig, SamplingConfig, ScorerChoice,
    ScoringConfig, SearchConfig, StrategyConfig, DEPTH_MAX, IN_FLIGHT_MAX, K_MAX, NODES_MAX,
};
pub use control::{BestAnswer, CancelToken, SearchControl, SearchEvent, TreeTap};
pub use engine::{mix as mix_seed, pick_candidate, select_answer, tally_answers, AnswerTally};
pub use error::{PolicyError, ScoreError, SearchError, Violation};
pub use outcome::{Budget, Costs, SearchStats, Termination};
pub use policy::{
    Policy, PolicyCost, Proposals, ProposeRequest, ProposedStep, Sampling, Step, StepStop,
};
pub use scorer::{Aggregation, LogProbScorer, ScoreCost, ScoreRequest, Scorer, StepScores};
pub use search::{search, Search, SearchOutcome};
pub use tree::{Edge, EdgeStats, Node, NodeExport, NodeId, NodeState, Rollout, Tree, TreeExport};

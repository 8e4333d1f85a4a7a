//! The top layer: [`Search`] owns the tree and dispatches to the configured strategy. Each
//! strategy (`mcts`, `best_of_n`, `beam`) is one module that uses the engine below it
//! ([`crate::engine`]: budgets, batched expansion and scoring, the answer tally); nothing below
//! uses this module or the strategies back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ScorerChoice, SearchConfig, StrategyConfig};
use crate::control::{BestAnswer, SearchControl};
use crate::engine::{AnswerTally, Io, Tally};
use crate::error::SearchError;
use crate::outcome::{Costs, SearchStats, Termination};
use crate::policy::Policy;
use crate::scorer::Scorer;
use crate::tree::Tree;
use crate::{beam, best_of_n, mcts};

/// What a search found and what it spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchOutcome {
    /// The chosen answer; `None` when no final answer was reached.
    pub answer: Option<BestAnswer>,
    /// Every distinct final answer, most votes first.
    pub candidates: Vec<AnswerTally>,
    /// Why the search stopped.
    pub termination: Termination,
    /// What it spent.
    pub costs: Costs,
    /// How it went.
    pub stats: SearchStats,
}

/// One search over one question: owns the tree, so the tree stays inspectable whatever happens
/// to [`Search::run`] (even when a policy panics through it).
#[derive(Debug)]
pub struct Search {
    /// The tree this search grows.
    tree: Tree,
    /// Validated configuration.
    config: SearchConfig,
    /// A search runs once; a second run would mix two budgets in one tree.
    ran: bool,
}

impl Search {
    /// Validates `config` and makes a tree holding only the prompt.
    pub fn new(prompt: impl Into<Arc<str>>, config: SearchConfig) -> Result<Search, SearchError> {
        config.validate()?;
        let tree = match config.strategy {
            StrategyConfig::Mcts(_) | StrategyConfig::Beam(_) | StrategyConfig::Dvts(_) => {
                Tree::with_max_children(prompt, config.max_children)
            }
            _ => Tree::new(prompt),
        };
        Ok(Search {
            tree,
            config,
            ran: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SearchConfig {
        &self.config
    }

    /// The tree, as far as it has grown.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Takes the tree.
    pub fn into_tree(self) -> Tree {
        self.tree
    }

    /// Runs the configured strategy until it finishes, a budget runs out, or `control` cancels
    /// it, then checks the tree's invariants.
    ///
    /// Policy and scorer failures do not end the search: they fail the affected nodes. `Err` is
    /// returned only for a second run or a broken invariant.
    ///
    /// Any tokio runtime will do (current-thread is enough); `deadline_ms` needs its time driver.
    /// The future is `Send` when the policy's and scorer's futures are. Dropping it mid-search is
    /// safe: the round guard leaves the tree as consistent as a cancellation would.
    pub async fn run<P: Policy, S: Scorer>(
        &mut self,
        policy: &P,
        scorer: &S,
        control: &SearchControl,
    ) -> Result<SearchOutcome, SearchError> {
        if std::mem::replace(&mut self.ran, true) {
            return Err(SearchError::AlreadyRun);
        }
        let scorer = match self.config.scoring.scorer {
            ScorerChoice::Provided => Some(scorer),
            ScorerChoice::LogProb => None,
        };
        let mut io = Io::new(policy, scorer, control, &self.config);
        let mut tally = Tally::default();
        tracing::debug!(strategy = ?self.config.strategy, seed = self.config.seed, "search starts");
        let termination = match &self.config.strategy {
            StrategyConfig::Mcts(m) => mcts::run(&mut self.tree, &mut io, &mut tally, m).await,
            StrategyConfig::BestOfN(c) | StrategyConfig::WeightedBestOfN(c) => {
                best_of_n::run(&mut self.tree, &mut io, &mut tally, c.n, true).await
            }
            StrategyConfig::SelfConsistency(c) => {
                best_of_n::run(&mut self.tree, &mut io, &mut tally, c.n, false).await
            }
            StrategyConfig::Beam(b) => beam::run_beam(&mut self.tree, &mut io, &mut tally, b).await,
            StrategyConfig::Dvts(d) => beam::run_dvts(&mut self.tree, &mut io, &mut tally, d).await,
        };
        let (answer, costs) = io.finish(&self.tree, &tally, termination);
        tracing::debug!(?termination, ?costs, "search ends");
        control.close_tree(&self.tree);
        self.tree.check_invariants()?;
        Ok(SearchOutcome {
            answer,
            candidates: tally.with_shares(Some(&self.tree)).candidates(),
            termination,
            costs,
            stats: io.stats,
        })
    }
}

/// Runs one search over `prompt` and returns its outcome with the tree.
pub async fn search<P: Policy, S: Scorer>(
    prompt: &str,
    config: SearchConfig,
    policy: &P,
    scorer: &S,
    control: &SearchControl,
) -> Result<(SearchOutcome, Tree), SearchError> {
    let mut search = Search::new(prompt, config)?;
    let outcome = search.run(policy, scorer, control).await?;
    Ok((outcome, search.into_tree()))
}

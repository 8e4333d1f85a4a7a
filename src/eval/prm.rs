//! Which process reward model values the steps, chosen by name on the command line.
//!
//! Adding a reward model is three edits here: a [`PrmChoice`] variant (its command-line and
//! `run.json` name), a [`Prm`] variant holding the built scorer, and its arms in
//! [`PrmChoice::build`], [`PrmChoice::scorer_choice`] and `Prm`'s [`Scorer`] impl.

use anyhow::Result;
use arbor_search::{LogProbScorer, ScoreError, ScoreRequest, Scorer, ScorerChoice, StepScores};
use arbor_worker::LocalWorker;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// The reward model to search with.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PrmChoice {
    /// The policy's own confidence: exp(mean token log-prob) of each step; costs no tokens.
    #[default]
    #[value(name = "logprob")]
    #[serde(rename = "logprob")]
    LogProb,
}

impl PrmChoice {
    /// Its name on the command line and in `run.json`.
    pub(crate) fn name(self) -> String {
        self.to_possible_value()
            .expect("no variant is skipped")
            .get_name()
            .to_owned()
    }

    /// Which scorer slot of [`arbor_search::SearchConfig`] it uses: the log-prob scorer is built
    /// into the search; a real reward model is passed in as [`ScorerChoice::Provided`].
    pub(crate) fn scorer_choice(self) -> ScorerChoice {
        match self {
            PrmChoice::LogProb => ScorerChoice::LogProb,
        }
    }

    /// Builds the scorer; a reward model that runs on the policy's engine borrows the worker.
    pub(crate) fn build(self, _worker: &LocalWorker) -> Result<Prm> {
        Ok(match self {
            PrmChoice::LogProb => Prm::LogProb(LogProbScorer),
        })
    }
}

/// A built reward model, passed to every search of a run.
#[derive(Debug, Clone)]
pub(crate) enum Prm {
    /// [`PrmChoice::LogProb`].
    LogProb(LogProbScorer),
}

impl Scorer for Prm {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        match self {
            Prm::LogProb(scorer) => scorer.score(batch).await,
        }
    }
}

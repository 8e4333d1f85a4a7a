//! The [`Scorer`] trait (a process or outcome reward model) and [`LogProbScorer`], a scorer built
//! from the policy's own token log-probabilities.

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::ScoreError;
use crate::policy::Step;
use crate::tree::NodeId;

/// "How good is each step of this path?"
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    /// The node at the end of the path (for rollouts: the node the rollout started from).
    pub node: NodeId,
    /// The question, formatted as the prompt the steps continue.
    pub prompt: Arc<str>,
    /// The steps from the root, in order; never empty.
    pub steps: Vec<Arc<Step>>,
}

/// What one score request cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreCost {
    /// Tokens the reward model computed (after any cache reuse), generated ones included.
    pub tokens_computed: u64,
    /// Of those, tokens it generated (a rollout PRM's completions). A search counts these
    /// against its generated-token budget too: they are compute the policy model spent.
    #[serde(default)]
    pub generated_tokens: u64,
}

/// The answer to one [`ScoreRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepScores {
    /// One score per step, same length as the request's `steps`. A process reward model (PRM) fills
    /// every entry; for an outcome reward model (ORM) only the last entry is read (use
    /// [`crate::Aggregation::Last`]). Entries that are read must be finite: a NaN marks the node
    /// failed.
    pub scores: Vec<f32>,
    /// What computing them cost.
    pub cost: ScoreCost,
}

/// A reward model over reasoning paths.
///
/// Implement it with a plain `async fn score(&self, batch: Vec<ScoreRequest>) -> ...`; the future
/// must be `Send`. The reply must have one [`StepScores`] per request, in request order.
pub trait Scorer: Send + Sync {
    /// Scores many paths in one batched call.
    fn score(
        &self,
        batch: Vec<ScoreRequest>,
    ) -> impl Future<Output = Result<Vec<StepScores>, ScoreError>> + Send;
}

/// How a path's per-step scores become one value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The last step's score; the right choice for an outcome reward model.
    #[default]
    Last,
    /// The weakest step.
    Min,
    /// The product of all steps (the chance that every step is right).
    Product,
    /// The arithmetic mean.
    Mean,
}

impl Aggregation {
    /// The steps whose scores this aggregation reads, as a range into `scores`.
    fn read_range(self, len: usize) -> std::ops::Range<usize> {
        match self {
            Aggregation::Last => len.saturating_sub(1)..len,
            Aggregation::Min | Aggregation::Product | Aggregation::Mean => 0..len,
        }
    }

    /// Folds per-step scores into a path value. `None` when a score it reads is not finite or
    /// there is none.
    pub fn apply(self, scores: &[f32]) -> Option<f64> {
        let read = &scores[self.read_range(scores.len())];
        if read.is_empty() || read.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let mut values = read.iter().map(|&s| f64::from(s));
        let value = match self {
            Aggregation::Last => values.next_back().unwrap_or(0.0),
            Aggregation::Min => values.fold(f64::INFINITY, f64::min),
            Aggregation::Product => values.product(),
            Aggregation::Mean => values.sum::<f64>() / read.len() as f64,
        };
        value.is_finite().then_some(value)
    }
}

/// A scorer that needs no reward model: each step scores `exp(mean token log-prob)`, the policy's
/// own confidence in it. Path values then come from the configured [`Aggregation`].
///
/// Select it with [`crate::ScorerChoice::LogProb`]; it costs no tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogProbScorer;

impl LogProbScorer {
    /// The score of one step: `exp(mean token log-prob)`, in (0, 1] for real log-probs.
    pub fn step_score(step: &Step) -> f32 {
        step.mean_logprob().exp() as f32
    }

    /// The policy's confidence in a whole path: its step scores folded by `aggregation`
    /// (`None` when a read score is not finite or there is no step). No model call.
    pub fn path_value(steps: &[Arc<Step>], aggregation: Aggregation) -> Option<f64> {
        let scores: Vec<f32> = steps.iter().map(|s| Self::step_score(s)).collect();
        aggregation.apply(&scores)
    }

    /// Scores a batch synchronously; the [`Scorer`] impl wraps this.
    pub fn score_now(batch: &[ScoreRequest]) -> Vec<StepScores> {
        batch
            .iter()
            .map(|request| StepScores {
                scores: request.steps.iter().map(|s| Self::step_score(s)).collect(),
                cost: ScoreCost::default(),
            })
            .collect()
    }
}

impl Scorer for LogProbScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        Ok(Self::score_now(&batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(aggregation: Aggregation, scores: &[f32], expected: Option<f64>) {
        let got = aggregation.apply(scores);
        match (got, expected) {
            (Some(g), Some(e)) => assert!(
                (g - e).abs() < 1e-6,
                "{aggregation:?} {scores:?}: {g} != {e}"
            ),
            _ => assert_eq!(got, expected, "{aggregation:?} {scores:?}"),
        }
    }

    #[test]
    fn aggregations() {
        check(Aggregation::Last, &[0.2, 0.9], Some(0.9));
        check(Aggregation::Min, &[0.2, 0.9], Some(0.2));
        check(Aggregation::Product, &[0.5, 0.5], Some(0.25));
        check(Aggregation::Mean, &[0.2, 0.6], Some(0.4));
        // An outcome model may leave earlier entries meaningless: `Last` does not read them.
        check(Aggregation::Last, &[f32::NAN, 0.7], Some(0.7));
        check(Aggregation::Mean, &[f32::NAN, 0.7], None);
        check(Aggregation::Min, &[], None);
        check(Aggregation::Last, &[f32::INFINITY], None);
    }

    #[test]
    fn logprob_scorer_scores_each_step_by_confidence() {
        let step = |lps: Vec<f32>| {
            Arc::new(Step {
                text: "s".into(),
                token_ids: vec![1; lps.len()],
                token_logprobs: lps,
            })
        };
        let request = ScoreRequest {
            node: NodeId::ROOT,
            prompt: Arc::from("q"),
            steps: vec![step(vec![0.0, 0.0]), step(vec![-1.0, -3.0]), step(vec![])],
        };
        let scores = LogProbScorer::score_now(&[request]);
        let got = &scores[0].scores;
        assert_eq!(got.len(), 3);
        assert!((got[0] - 1.0).abs() < 1e-6);
        assert!((got[1] - (-2.0f32).exp()).abs() < 1e-6);
        assert!(
            (got[2] - 1.0).abs() < 1e-6,
            "no log-probs counts as certain"
        );
        assert_eq!(scores[0].cost.tokens_computed, 0);
    }
}

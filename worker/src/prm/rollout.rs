//! The rollout value: from each step, `k` cheap continuations to a final answer; the step's
//! value is the share of them whose answer agrees with the most common answer among them.
//! No gold answer is needed, so it works at search time: a state from which the model keeps
//! reaching the same answer is one it is sure of.
//!
//! Rollouts go through the worker's continuous batching like any expansion (they fork the
//! prefix cache's sequence of the path), are bounded by `max_tokens`, and a rollout that hits
//! the bound without ending counts as no answer. Each step's value is memoised, so a tree
//! search pays for a node's rollouts once, when it is first scored.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use arbor_model::{SamplingParams, StopReason};
use arbor_search::{extract_answer, ScoreCost, ScoreError, ScoreRequest, Scorer, StepScores};
use serde::{Deserialize, Serialize};

use super::{invalid, model_error, worker_error, PrmError};
use crate::{ExpandItem, LocalWorker};

/// Most memoised step values before the memo is emptied.
const MEMO_ENTRIES_MAX: usize = 100_000;

/// Settings of the rollout value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutValueConfig {
    /// Rollouts per step (`k`).
    pub rollouts: u32,
    /// Sampling temperature of rollouts (0 is greedy, and makes every rollout the same).
    pub temperature: f32,
    /// Most tokens one rollout may generate.
    pub max_tokens: u32,
    /// Seed of the rollouts (each step's rollouts draw from a stream keyed by its path).
    pub seed: u64,
    /// Roll out from the path's last step only: earlier steps keep a memoised value or are
    /// NaN (unread by `aggregation: last`), so scoring a whole solution costs `k` rollouts
    /// instead of `k` per step.
    pub last_step_only: bool,
}

impl Default for RolloutValueConfig {
    fn default() -> Self {
        RolloutValueConfig {
            rollouts: 4,
            temperature: 0.7,
            max_tokens: 256,
            seed: 0,
            last_step_only: false,
        }
    }
}

/// The rollouts of one step: each one's final answer key, `None` when it did not finish.
pub type StepRollouts = Vec<Option<String>>;

/// Scores steps by rollout agreement; see the module docs.
#[derive(Debug)]
pub struct RolloutScorer {
    config: RolloutValueConfig,
    worker: LocalWorker,
    /// Step value by a hash of the path's tokens up to the step.
    memo: Mutex<HashMap<u64, f32>>,
}

/// The share of `answers` that equal the most common answer (unfinished ones never count).
pub fn majority_share(answers: &[Option<String>]) -> f32 {
    if answers.is_empty() {
        return 0.0;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for a in answers.iter().flatten() {
        *counts.entry(a.as_str()).or_default() += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0);
    top as f32 / answers.len() as f32
}

impl RolloutScorer {
    /// Checks the settings.
    pub fn new(config: &RolloutValueConfig, policy: &LocalWorker) -> Result<Self, PrmError> {
        if !(1..=arbor_search::K_MAX).contains(&config.rollouts) {
            return Err(invalid(
                "rollouts",
                format!("{} is outside 1..={}", config.rollouts, arbor_search::K_MAX),
            ));
        }
        if !(config.temperature.is_finite() && config.temperature >= 0.0) {
            return Err(invalid("temperature", "must be finite and >= 0"));
        }
        if config.max_tokens == 0 {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        Ok(RolloutScorer {
            config: config.clone(),
            worker: policy.clone(),
            memo: Mutex::new(HashMap::new()),
        })
    }

    /// Scores a batch and also returns, per request and step, the rollouts' answers (empty
    /// for a step whose value came from the memo).
    pub async fn score_with_rollouts(
        &self,
        batch: Vec<ScoreRequest>,
    ) -> Result<Vec<(StepScores, Vec<StepRollouts>)>, ScoreError> {
        // Every (request, step) and the prefix it rolls out from.
        struct Job {
            key: u64,
            prompt: Vec<u32>,
            path_text: String,
        }
        let mut jobs: Vec<Job> = Vec::new();
        let mut job_of: HashMap<u64, usize> = HashMap::new();
        let mut slots: Vec<Vec<(u64, Option<f32>)>> = Vec::with_capacity(batch.len());
        {
            let memo = self.memo.lock().expect("memo lock");
            for r in &batch {
                let mut prompt = self
                    .worker
                    .tokenizer()
                    .encode(&r.prompt, true)
                    .map_err(model_error)?;
                let mut path_text = String::new();
                let mut row = Vec::with_capacity(r.steps.len());
                for (i, step) in r.steps.iter().enumerate() {
                    prompt.extend_from_slice(&step.token_ids);
                    path_text.push_str(&step.text);
                    path_text.push_str("\n\n");
                    let key = path_key(&prompt);
                    let skipped = self.config.last_step_only && i + 1 < r.steps.len();
                    let known = memo.get(&key).copied().or(skipped.then_some(f32::NAN));
                    if known.is_none() && !job_of.contains_key(&key) {
                        job_of.insert(key, jobs.len());
                        jobs.push(Job {
                            key,
                            prompt: prompt.clone(),
                            path_text: path_text.clone(),
                        });
                    }
                    row.push((key, known));
                }
                slots.push(row);
            }
        }
        let o = self.worker.options();
        let items: Vec<ExpandItem> = jobs
            .iter()
            .map(|j| ExpandItem {
                prompt: j.prompt.clone(),
                k: self.config.rollouts as usize,
                max_tokens: self.config.max_tokens as usize,
                sampling: SamplingParams {
                    temperature: self.config.temperature,
                    top_k: o.top_k,
                    top_p: 1.0,
                    seed: self.config.seed ^ j.key,
                },
                stop: Vec::new(),
            })
            .collect();
        let results = if items.is_empty() {
            Vec::new()
        } else {
            self.worker
                .expand(items, None)
                .await
                .map_err(worker_error)?
        };
        // Per job: answers, value and what it cost.
        let mut computed: Vec<(StepRollouts, f32, (u64, u64))> = Vec::with_capacity(jobs.len());
        for (job, result) in jobs.iter().zip(&results) {
            let answers: StepRollouts = result
                .samples
                .iter()
                .map(|s| {
                    (s.stop_reason != StopReason::MaxTokens)
                        .then(|| extract_answer(&format!("{}{}", job.path_text, s.text)))
                        .flatten()
                        .map(|a| a.key)
                })
                .collect();
            let generated: u64 = result.samples.iter().map(|s| s.tokens.len() as u64).sum();
            let value = majority_share(&answers);
            computed.push((
                answers,
                value,
                (result.prompt_tokens_computed + generated, generated),
            ));
        }
        {
            let mut memo = self.memo.lock().expect("memo lock");
            if memo.len() + computed.len() > MEMO_ENTRIES_MAX {
                memo.clear();
            }
            for (job, (_, value, _)) in jobs.iter().zip(&computed) {
                memo.insert(job.key, *value);
            }
        }
        // A job shared by several requests is charged to the first that asked for it.
        let mut charged = vec![false; jobs.len()];
        Ok(slots
            .into_iter()
            .map(|row| {
                let (mut tokens, mut generated) = (0, 0);
                let mut scores = Vec::with_capacity(row.len());
                let mut rollouts = Vec::with_capacity(row.len());
                for (key, known) in row {
                    match (known, job_of.get(&key)) {
                        (Some(v), _) => {
                            scores.push(v);
                            rollouts.push(Vec::new());
                        }
                        (None, Some(&j)) => {
                            let (answers, value, cost) = &computed[j];
                            if !std::mem::replace(&mut charged[j], true) {
                                tokens += cost.0;
                                generated += cost.1;
                            }
                            scores.push(*value);
                            rollouts.push(answers.clone());
                        }
                        (None, None) => unreachable!("every unknown step has a job"),
                    }
                }
                let cost = ScoreCost {
                    tokens_computed: tokens,
                    generated_tokens: generated,
                };
                (StepScores { scores, cost }, rollouts)
            })
            .collect())
    }
}

fn path_key(tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    tokens.hash(&mut h);
    h.finish()
}

impl Scorer for RolloutScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        Ok(self
            .score_with_rollouts(batch)
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_share_counts_the_largest_group_over_all_rollouts() {
        let a = |s: &str| Some(s.to_string());
        assert_eq!(majority_share(&[a("72"), a("72"), a("36"), None]), 0.5);
        assert_eq!(majority_share(&[a("1"), a("1"), a("1")]), 1.0);
        assert_eq!(majority_share(&[None, None]), 0.0);
        assert_eq!(majority_share(&[]), 0.0);
    }
}

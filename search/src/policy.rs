//! The [`Policy`] trait: how the search asks a language model for next reasoning steps.

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::tree::NodeId;

/// One reasoning step already in the tree: what the model wrote and how sure it was.
///
/// Steps are shared (`Arc`) between the tree and every request that carries their path, so building
/// a batch copies pointers, not text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The step's text, as it is appended to the prompt.
    pub text: String,
    /// The step's token ids, so an engine can reuse its prefix cache without re-tokenising.
    pub token_ids: Vec<u32>,
    /// Log-probability of each token in `token_ids` (same length, or empty when unknown).
    pub token_logprobs: Vec<f32>,
}

impl Step {
    /// Mean token log-probability; a step without log-probs counts as certain (0).
    pub fn mean_logprob(&self) -> f64 {
        if self.token_logprobs.is_empty() {
            return 0.0;
        }
        let sum: f64 = self.token_logprobs.iter().map(|&lp| f64::from(lp)).sum();
        sum / self.token_logprobs.len() as f64
    }
}

/// Sampling settings for one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Most tokens one step may have before it is cut with [`StepStop::MaxTokens`].
    pub max_step_tokens: u32,
    /// Seed for this request; derived from the search seed and the node, so results do not depend
    /// on batch order. Sample `j` of `k` should use a stream derived from `(seed, j)`.
    pub seed: u64,
}

/// "Give me `k` next steps after this path."
#[derive(Debug, Clone)]
pub struct ProposeRequest {
    /// The node whose continuations are wanted; stable within a search, so it can key a cache.
    pub node: NodeId,
    /// The question, formatted as the prompt the steps continue.
    pub prompt: Arc<str>,
    /// The steps from the root to `node`, in order.
    pub steps: Vec<Arc<Step>>,
    /// How many independent samples to return (at most; fewer is allowed, more is an error).
    pub k: u32,
    /// How to sample them.
    pub sampling: Sampling,
}

impl ProposeRequest {
    /// Tokens of the path (the prompt's own tokens are the implementer's to count).
    pub fn path_tokens(&self) -> u64 {
        self.steps.iter().map(|s| s.token_ids.len() as u64).sum()
    }
}

/// Why the model stopped writing a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStop {
    /// It wrote the step delimiter: more steps may follow.
    Delimiter,
    /// It wrote end-of-sequence: the path is a complete solution with a final answer.
    EndOfSequence,
    /// It hit [`Sampling::max_step_tokens`]: the step is kept, cut short, and more may follow.
    MaxTokens,
}

/// One sampled next step.
#[derive(Debug, Clone, PartialEq)]
pub struct ProposedStep {
    /// The step's text.
    pub text: String,
    /// Its token ids.
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token (same length as `token_ids`).
    pub token_logprobs: Vec<f32>,
    /// Why generation stopped.
    pub stop: StepStop,
}

/// What one request cost, as the implementer measured it. The search adds these up verbatim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCost {
    /// Prompt tokens sent with the request (prompt plus path).
    pub prompt_tokens: u64,
    /// Of those, how many the engine had to compute.
    pub prompt_tokens_computed: u64,
    /// Of those, how many it reused from its prefix cache.
    pub prompt_tokens_reused: u64,
    /// Tokens generated over all samples of the request.
    pub generated_tokens: u64,
}

/// The answer to one [`ProposeRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct Proposals {
    /// Up to `k` next steps.
    pub steps: Vec<ProposedStep>,
    /// What producing them cost.
    pub cost: PolicyCost,
}

/// A step generator: a language model behind whatever engine the worker runs.
///
/// Implement it with a plain `async fn propose(&self, batch: Vec<ProposeRequest>) -> ...`; the
/// future must be `Send`. The reply must have one [`Proposals`] per request, in request order.
pub trait Policy: Send + Sync {
    /// Samples next steps for many nodes in one batched call.
    fn propose(
        &self,
        batch: Vec<ProposeRequest>,
    ) -> impl Future<Output = Result<Vec<Proposals>, PolicyError>> + Send;
}

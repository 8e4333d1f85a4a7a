//! A worker: the search crate's [`Policy`] and [`Scorer`] served by the model crate's engine.
//!
//! The search asks for the next steps of many nodes at once; the worker turns the whole batch
//! into one [`generate`] call, so every decoding step of every node shares one forward pass, and
//! the `k` samples of a node share one prefill of its prefix (forked KV blocks).
//!
//! **Architecture Invariant:** the worker is the only crate that sees both `arbor-search` and
//! `arbor-model`; neither of them knows the other.

use std::sync::{Arc, Mutex};

use arbor_model::generate::{generate, GenStats};
use arbor_model::{ChatMessage, Engine, GenRequest, Model, SamplingParams, StopReason, Tokenizer};
use arbor_search::{Policy, PolicyCost, PolicyError, ProposeRequest, Proposals, ProposedStep, StepStop};

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Text that ends a reasoning step (a blank line by default).
    pub step_delimiter: String,
    /// Top-k applied to every sampled token (0 = off).
    pub top_k: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions { step_delimiter: "\n\n".into(), top_k: 0 }
    }
}

/// Counters over the worker's life, for statistics and tests.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// `propose` calls served.
    pub propose_calls: u64,
    /// Requests (nodes) in those calls.
    pub requests: u64,
    /// Forward passes run.
    pub forward_passes: u64,
    /// Prompt tokens computed.
    pub prompt_tokens_computed: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
}

struct Inner {
    tokenizer: Arc<Tokenizer>,
    /// One engine, used by one batch at a time; batching happens inside a call.
    engine: Mutex<Engine>,
    options: WorkerOptions,
    stats: Mutex<WorkerStats>,
}

/// A policy backed by a local engine. Cheap to clone (shared state).
#[derive(Clone)]
pub struct LocalWorker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWorker").field("options", &self.inner.options).finish()
    }
}

/// The system prompt Arbor uses for step-by-step maths: one step per paragraph, so the blank
/// line is a natural step delimiter, and a GSM8K-style final line the answer extractor reads.
pub const STEP_BY_STEP_SYSTEM_PROMPT: &str = "You are a careful maths tutor. Solve the problem step by step. \
Write each step as one short paragraph, separated by a blank line. \
End with a final line of the form \"The answer is N.\" where N is the number.";

impl LocalWorker {
    /// A worker over `engine`, which must run `model`.
    pub fn new(model: &Model, engine: Engine, options: WorkerOptions) -> Self {
        LocalWorker {
            inner: Arc::new(Inner {
                tokenizer: model.tokenizer.clone(),
                engine: Mutex::new(engine),
                options,
                stats: Mutex::new(WorkerStats::default()),
            }),
        }
    }

    /// The prompt a search should continue for `question`: the model's chat template with a
    /// step-by-step system prompt, ending where the assistant's answer begins.
    pub fn format_question(&self, question: &str) -> Result<String, arbor_model::ModelError> {
        self.inner.tokenizer.apply_chat_template(
            &[ChatMessage::new("system", STEP_BY_STEP_SYSTEM_PROMPT), ChatMessage::new("user", question)],
            true,
        )
    }

    /// Counters so far.
    pub fn stats(&self) -> WorkerStats {
        self.inner.stats.lock().expect("stats lock").clone()
    }

    /// Live sequences and KV blocks in the engine (both zero between calls).
    pub fn engine_usage(&self) -> (usize, usize) {
        let e = self.inner.engine.lock().expect("engine lock");
        (e.n_sequences(), e.kv_blocks_in_use())
    }

    fn propose_blocking(&self, batch: &[ProposeRequest]) -> Result<Vec<Proposals>, PolicyError> {
        let inner = &self.inner;
        let mut requests = Vec::with_capacity(batch.len());
        for r in batch {
            // The prompt is already templated, so its special tokens are parsed; the steps are the
            // model's own tokens, appended as generated.
            let mut prompt = inner.tokenizer.encode(&r.prompt, true).map_err(|e| PolicyError::new(e.to_string()))?;
            for s in &r.steps {
                prompt.extend_from_slice(&s.token_ids);
            }
            requests.push(GenRequest {
                prompt,
                n: r.k as usize,
                max_tokens: r.sampling.max_step_tokens as usize,
                sampling: SamplingParams {
                    temperature: r.sampling.temperature,
                    top_k: inner.options.top_k,
                    top_p: r.sampling.top_p,
                    seed: r.sampling.seed,
                },
                stop: vec![inner.options.step_delimiter.clone()],
            });
        }
        let (outputs, gstats) = {
            let mut engine = inner.engine.lock().map_err(|_| PolicyError::new("engine lock poisoned by an earlier panic"))?;
            generate(&mut engine, &inner.tokenizer, &requests, |_, _, _| {}).map_err(|e| PolicyError::new(e.to_string()))?
        };
        self.record(batch.len(), &gstats);
        Ok(outputs
            .into_iter()
            .zip(&requests)
            .map(|(samples, req)| {
                let generated: u64 = samples.iter().map(|s| s.tokens.len() as u64).sum();
                let steps = samples
                    .into_iter()
                    .map(|s| ProposedStep {
                        text: s.text,
                        token_ids: s.tokens,
                        token_logprobs: s.logprobs,
                        stop: match s.stop_reason {
                            StopReason::Eos => StepStop::EndOfSequence,
                            StopReason::Stop(_) => StepStop::Delimiter,
                            StopReason::MaxTokens => StepStop::MaxTokens,
                        },
                    })
                    .collect();
                let sent = req.prompt.len() as u64;
                Proposals {
                    steps,
                    cost: PolicyCost {
                        prompt_tokens: sent,
                        // Each request's prefix is prefilled once for all its samples; no prefix
                        // is kept between calls yet, so nothing is reused across calls.
                        prompt_tokens_computed: sent,
                        prompt_tokens_reused: 0,
                        generated_tokens: generated,
                    },
                }
            })
            .collect())
    }

    fn record(&self, requests: usize, g: &GenStats) {
        let mut s = self.inner.stats.lock().expect("stats lock");
        s.propose_calls += 1;
        s.requests += requests as u64;
        s.forward_passes += g.forward_passes;
        s.prompt_tokens_computed += g.prompt_tokens_computed;
        s.generated_tokens += g.generated_tokens;
    }
}

impl Policy for LocalWorker {
    async fn propose(&self, batch: Vec<ProposeRequest>) -> Result<Vec<Proposals>, PolicyError> {
        let worker = self.clone();
        // Model work is CPU-bound: keep it off the async threads.
        tokio::task::spawn_blocking(move || worker.propose_blocking(&batch))
            .await
            .map_err(|e| PolicyError::new(format!("worker task failed: {e}")))?
    }
}

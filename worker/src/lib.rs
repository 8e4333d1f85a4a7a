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
use arbor_model::{
    ChatMessage, Engine, GenRequest, Model, SamplingParams, SeqId, StopReason, Tokenizer,
};
use arbor_search::{
    Policy, PolicyCost, PolicyError, Proposals, ProposeRequest, ProposedStep, StepStop,
};

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Text that ends a reasoning step (a blank line by default).
    pub step_delimiter: String,
    /// Top-k applied to every sampled token (0 = off).
    pub top_k: usize,
    /// Most sequences the prefix cache keeps (0 disables it).
    pub prefix_cache_entries_max: usize,
    /// The prefix cache gives back its least recently used sequences while more KV blocks
    /// than this are in use.
    pub prefix_cache_blocks_max: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            step_delimiter: "\n\n".into(),
            top_k: 0,
            prefix_cache_entries_max: 512,
            prefix_cache_blocks_max: 4096,
        }
    }
}

/// Sequences kept alive after a call, keyed by the tokens they hold: the tree-aware part of the
/// KV cache. A node's children are generated from forks of its parent's kept sequence, so each
/// expansion computes only the tokens the cache does not already hold (usually one).
#[derive(Debug, Default)]
struct PrefixCache {
    entries: Vec<CacheEntry>,
    /// Logical clock for least-recently-used eviction.
    clock: u64,
}

#[derive(Debug)]
struct CacheEntry {
    tokens: Vec<u32>,
    seq: SeqId,
    last_used: u64,
}

impl PrefixCache {
    /// The longest cached sequence whose tokens are a proper prefix of `tokens`.
    fn lookup(&mut self, tokens: &[u32]) -> Option<(SeqId, usize)> {
        self.clock += 1;
        let clock = self.clock;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.tokens.len() < tokens.len() && tokens.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())?;
        best.last_used = clock;
        Some((best.seq, best.tokens.len()))
    }

    fn insert(&mut self, tokens: Vec<u32>, seq: SeqId, engine: &mut Engine) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens == tokens) {
            // Already cached: keep the old sequence, drop the new duplicate.
            e.last_used = self.clock;
            engine.free(seq);
            return;
        }
        self.entries.push(CacheEntry {
            tokens,
            seq,
            last_used: self.clock,
        });
    }

    fn evict(&mut self, engine: &mut Engine, entries_max: usize, blocks_max: usize) {
        while !self.entries.is_empty()
            && (self.entries.len() > entries_max || engine.kv_blocks_in_use() > blocks_max)
        {
            let (i, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .expect("non-empty");
            let e = self.entries.swap_remove(i);
            engine.free(e.seq);
        }
    }

    fn clear(&mut self, engine: &mut Engine) {
        for e in self.entries.drain(..) {
            engine.free(e.seq);
        }
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
    /// One engine and its prefix cache, used by one batch at a time; batching happens inside a call.
    engine: Mutex<(Engine, PrefixCache)>,
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
        f.debug_struct("LocalWorker")
            .field("options", &self.inner.options)
            .finish()
    }
}

/// The system prompt Arbor uses for step-by-step maths: one step per paragraph, so the blank
/// line is a natural step delimiter, and a GSM8K-style final line the answer extractor reads.
pub const STEP_BY_STEP_SYSTEM_PROMPT: &str =
    "You are a careful maths tutor. Solve the problem step by step. \
Write each step as one short paragraph, separated by a blank line. \
End with a final line of the form \"The answer is N.\" where N is the number.";

impl LocalWorker {
    /// A worker over `engine`, which must run `model`.
    pub fn new(model: &Model, engine: Engine, options: WorkerOptions) -> Self {
        LocalWorker {
            inner: Arc::new(Inner {
                tokenizer: model.tokenizer.clone(),
                engine: Mutex::new((engine, PrefixCache::default())),
                options,
                stats: Mutex::new(WorkerStats::default()),
            }),
        }
    }

    /// The prompt a search should continue for `question`: the model's chat template with a
    /// step-by-step system prompt, ending where the assistant's answer begins.
    pub fn format_question(&self, question: &str) -> Result<String, arbor_model::ModelError> {
        self.format_question_with(STEP_BY_STEP_SYSTEM_PROMPT, question)
    }

    /// Like [`LocalWorker::format_question`] with another system prompt.
    pub fn format_question_with(
        &self,
        system: &str,
        question: &str,
    ) -> Result<String, arbor_model::ModelError> {
        self.inner.tokenizer.apply_chat_template(
            &[
                ChatMessage::new("system", system),
                ChatMessage::new("user", question),
            ],
            true,
        )
    }

    /// Counters so far.
    pub fn stats(&self) -> WorkerStats {
        self.inner.stats.lock().expect("stats lock").clone()
    }

    /// Live sequences, KV blocks in use, and sequences held by the prefix cache. Between calls
    /// every live sequence belongs to the cache.
    pub fn engine_usage(&self) -> (usize, usize, usize) {
        let g = self.inner.engine.lock().expect("engine lock");
        (g.0.n_sequences(), g.0.kv_blocks_in_use(), g.1.entries.len())
    }

    /// Frees every cached sequence (e.g. between unrelated searches).
    pub fn clear_prefix_cache(&self) {
        let mut g = self.inner.engine.lock().expect("engine lock");
        let (engine, cache) = &mut *g;
        cache.clear(engine);
    }

    fn propose_blocking(&self, batch: &[ProposeRequest]) -> Result<Vec<Proposals>, PolicyError> {
        let inner = &self.inner;
        let caching = inner.options.prefix_cache_entries_max > 0;
        let mut guard = inner
            .engine
            .lock()
            .map_err(|_| PolicyError::new("engine lock poisoned by an earlier panic"))?;
        let (engine, cache) = &mut *guard;
        let mut requests = Vec::with_capacity(batch.len());
        let mut reused = Vec::with_capacity(batch.len());
        for r in batch {
            // The prompt is already templated, so its special tokens are parsed; the steps are the
            // model's own tokens, appended as generated.
            let mut prompt = inner
                .tokenizer
                .encode(&r.prompt, true)
                .map_err(|e| PolicyError::new(e.to_string()))?;
            for s in &r.steps {
                prompt.extend_from_slice(&s.token_ids);
            }
            let hit = if caching { cache.lookup(&prompt) } else { None };
            reused.push(hit.map_or(0, |h| h.1) as u64);
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
                prefix: hit.map(|h| h.0),
                keep_sequences: caching,
            });
        }
        let (mut outputs, gstats) =
            match generate(engine, &inner.tokenizer, &requests, |_, _, _| {}) {
                Ok(done) => done,
                // The cache's own blocks may be what fills the KV pool: give them all back and try
                // once more from scratch (a failed generate left the engine as it was).
                Err(arbor_model::ModelError::KvCacheFull { .. }) if !cache.entries.is_empty() => {
                    tracing::info!(
                        cached = cache.entries.len(),
                        "KV cache full: dropping the prefix cache and retrying"
                    );
                    cache.clear(engine);
                    for (r, reused) in requests.iter_mut().zip(reused.iter_mut()) {
                        r.prefix = None;
                        *reused = 0;
                    }
                    generate(engine, &inner.tokenizer, &requests, |_, _, _| {})
                        .map_err(|e| PolicyError::new(e.to_string()))?
                }
                Err(e) => return Err(PolicyError::new(e.to_string())),
            };
        // Keep every sample's sequence under the tokens it holds: the next expansion of that
        // child forks it instead of recomputing the path.
        for (samples, req) in outputs.iter_mut().zip(&requests) {
            for out in samples.iter_mut() {
                if let Some(seq) = out.seq.take() {
                    let held = engine.seq_len(seq).unwrap_or(0);
                    let tokens: Vec<u32> = req
                        .prompt
                        .iter()
                        .chain(&out.tokens)
                        .copied()
                        .take(held)
                        .collect();
                    cache.insert(tokens, seq, engine);
                }
            }
        }
        cache.evict(
            engine,
            inner.options.prefix_cache_entries_max,
            inner.options.prefix_cache_blocks_max,
        );
        drop(guard);
        self.record(batch.len(), &gstats);
        Ok(outputs
            .into_iter()
            .zip(&requests)
            .zip(reused)
            .map(|((samples, req), reused)| {
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
                        // A request's prefix is computed once for all its samples, minus what the
                        // prefix cache already held.
                        prompt_tokens_computed: sent - reused,
                        prompt_tokens_reused: reused,
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

//! A worker: the search crate's [`Policy`] and [`Scorer`] served by the model crate's engine.
//!
//! One thread owns the engine and runs continuous batching over every call the worker gets
//! ([`runner`]): the nodes of one call, and of every other call in flight (other searches, other
//! clients), share each forward pass; the `k` samples of a node share one prefill of its prefix
//! (forked KV blocks); and a tree-aware prefix cache keeps each generated step's sequence so
//! expanding that node later computes only what is new. Calls whose caller went away or whose
//! deadline passed stop decoding at the next pass.
//!
//! **Architecture Invariant:** the worker is the only crate that sees both `arbor-search` and
//! `arbor-model`; neither of them knows the other.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arbor_model::{ChatMessage, Engine, Model, ModelConfig, SamplingParams, StopReason, Tokenizer};
use arbor_search::{
    Policy, PolicyCost, PolicyError, Proposals, ProposeRequest, ProposedStep, StepStop,
};
use tokio::sync::oneshot;

mod cache;
pub mod prm;
pub mod runner;
pub mod score;

use runner::Command;
pub use runner::{ExpandItem, ExpandResult};
pub use score::{PathScorer, SCORE_CHUNK_TOKENS};

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Text that ends a reasoning step (a blank line by default).
    pub step_delimiter: String,
    /// Top-k applied to every sampled token (0 = off).
    pub top_k: usize,
    /// Most sequences the prefix cache keeps (0 disables it; default 4,096).
    pub prefix_cache_entries_max: usize,
    /// The prefix cache gives back its least recently used sequences while more KV blocks
    /// than this are in use, by it and by the calls running. Default (`None`): seven eighths
    /// of the engine's blocks ([`arbor_model::EngineOptions::kv_blocks_max`]), keeping an
    /// eighth free for the passes to come. (A fixed 4,096 of 8,192 emptied the cache whenever
    /// the calls running held more: at 128 searches in flight on a GPU it kept almost nothing,
    /// and prompts were computed 4x over.)
    pub prefix_cache_blocks_max: Option<usize>,
    /// Most calls queued or running at once; more are refused with
    /// [`WorkerError::Overloaded`] instead of queueing without bound.
    pub calls_in_flight_max: usize,
    /// Told the size of every forward pass (for metrics); `None`: nobody.
    pub on_pass: Option<PassObserver>,
}

/// Sees every forward pass the engine thread runs: the sequences in it (prompts being
/// prefilled and samples decoding). Runs on the engine thread, so it must be quick.
#[derive(Clone)]
pub struct PassObserver(pub Arc<dyn Fn(usize) + Send + Sync>);

impl std::fmt::Debug for PassObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassObserver")
    }
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            step_delimiter: "\n\n".into(),
            top_k: 0,
            prefix_cache_entries_max: 4096,
            prefix_cache_blocks_max: None,
            calls_in_flight_max: 256,
            on_pass: None,
        }
    }
}

/// Why a worker call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    /// The engine rejected or failed the call (bad token ids, context too long, KV cache full).
    #[error(transparent)]
    Model(#[from] arbor_model::ModelError),
    /// Too many calls are queued or running; try again later or elsewhere.
    #[error("worker overloaded: {in_flight} calls in flight, limit {limit}")]
    Overloaded {
        /// Calls in flight when this one arrived.
        in_flight: usize,
        /// [`WorkerOptions::calls_in_flight_max`].
        limit: usize,
    },
    /// The call's deadline passed before it finished; its decoding was stopped.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The call was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The engine thread has stopped (it panicked).
    #[error("the worker's engine thread has stopped")]
    Stopped,
}

/// Counters over the worker's life, for statistics and tests.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// Expansion calls answered successfully (`propose` or `expand`).
    pub propose_calls: u64,
    /// Requests (nodes) in those calls.
    pub requests: u64,
    /// Forward passes run (shared by every call in them).
    pub forward_passes: u64,
    /// Prompt tokens computed.
    pub prompt_tokens_computed: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Calls cancelled or timed out before they finished.
    pub cancelled_calls: u64,
    /// Times a call found the KV cache full while others held it and waited for them
    /// (instead of failing); it ran again once blocks were given back.
    pub deferred_calls: u64,
}

/// A snapshot of the engine's state, published after every pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live sequences.
    pub sequences: usize,
    /// KV blocks in use.
    pub kv_blocks: usize,
    /// Sequences held by the prefix cache.
    pub cached_sequences: usize,
    /// Calls queued or decoding.
    pub running_calls: usize,
    /// Bytes of pass buffers the engine keeps ([`arbor_model::Engine::scratch_bytes`]); those
    /// over 8 MiB are freed when the worker goes idle.
    pub scratch_bytes: usize,
}

/// What a worker runs, for clients and the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Where the model came from (file or folder).
    pub source: String,
    /// Its hyper-parameters.
    pub config: ModelConfig,
    /// The engine's backend.
    pub backend: String,
    /// Its tokenizer's [`Tokenizer::fingerprint`].
    pub tokenizer_fingerprint: String,
    /// Its weights' fingerprint (`Model::weights_fingerprint`).
    pub weights_fingerprint: String,
}

pub(crate) struct Shared {
    stats: Mutex<WorkerStats>,
    usage: Mutex<Usage>,
    /// Calls sent to the engine thread and not yet answered.
    in_flight: AtomicUsize,
    /// Set when the engine thread has ended (a panic in a pass, or every clone dropped).
    engine_stopped: AtomicBool,
}

/// Marks the engine thread as ended when dropped: on return and on a panic's unwinding alike.
/// `runner::run` holds it below its state, so it drops first: a caller whose call failed
/// because the thread ended already sees [`LocalWorker::engine_running`] false.
pub(crate) struct EngineAlive(pub(crate) Arc<Shared>);

impl Drop for EngineAlive {
    fn drop(&mut self) {
        self.0.engine_stopped.store(true, Ordering::SeqCst);
    }
}

struct Inner {
    tokenizer: Arc<Tokenizer>,
    tx: crossbeam_channel::Sender<Command>,
    options: WorkerOptions,
    shared: Arc<Shared>,
    info: ModelInfo,
    /// The engine thread, joined when the last handle goes (see `Drop`).
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closes the channel and waits for the engine thread to finish its calls and drop the
    /// engine. Without the wait, a command-line run returned from `main` while the thread could
    /// still be tearing down the GPU device: the likely cause of `arbor search --device gpu`
    /// dying of SIGSEGV at exit, after its answer, on NVIDIA's Vulkan driver (an H200; not
    /// re-checked there yet).
    fn drop(&mut self) {
        drop(std::mem::replace(
            &mut self.tx,
            crossbeam_channel::unbounded().0,
        ));
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// A policy backed by a local engine, which runs on its own thread. Cheap to clone (shared
/// state); the thread ends when the last clone is dropped and its calls are done.
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
/// It asks for the working before the answer and names no placeholder: the earlier prompt's
/// `"The answer is N."` drew answer-first guesses (40% of samples, right 4.8% of the time) and
/// was echoed verbatim to questions without a number.
pub const STEP_BY_STEP_SYSTEM_PROMPT: &str =
    "You are a careful maths tutor. Solve the problem step by step. \
Write each step as one short paragraph that works out one quantity, separated from the next \
step by a blank line. Never state the final answer before you have worked it out. \
After the last step, finish with the sentence \"The answer is\" followed by the final number.";

impl LocalWorker {
    /// A worker over `engine`, which must run `model`. Starts the engine thread.
    pub fn new(model: &Model, engine: Engine, options: WorkerOptions) -> Self {
        let shared = Arc::new(Shared {
            stats: Mutex::new(WorkerStats::default()),
            usage: Mutex::new(Usage::default()),
            in_flight: AtomicUsize::new(0),
            engine_stopped: AtomicBool::new(false),
        });
        let info = ModelInfo {
            source: format!("{:?}", model.source),
            config: model.config.clone(),
            backend: engine.backend_name().to_string(),
            tokenizer_fingerprint: model.tokenizer.fingerprint(),
            weights_fingerprint: model.weights_fingerprint.clone(),
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let tokenizer = model.tokenizer.clone();
        let thread = {
            let (tokenizer, options, shared) = (tokenizer.clone(), options.clone(), shared.clone());
            std::thread::Builder::new()
                .name("arbor-engine".into())
                .spawn(move || runner::run(engine, tokenizer, options, shared, rx))
                .expect("spawning the engine thread")
        };
        LocalWorker {
            inner: Arc::new(Inner {
                tokenizer,
                tx,
                options,
                shared,
                info,
                thread: Some(thread),
            }),
        }
    }

    /// The tokenizer of the worker's model.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.inner.tokenizer
    }

    /// The worker's settings.
    pub fn options(&self) -> &WorkerOptions {
        &self.inner.options
    }

    /// What the worker runs.
    pub fn model_info(&self) -> &ModelInfo {
        &self.inner.info
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
        self.inner.shared.stats.lock().expect("stats lock").clone()
    }

    /// Whether the engine thread still runs. It ends only if a pass panicked (or every clone
    /// was dropped); then every call fails with [`WorkerError::Stopped`] and the servers report
    /// the worker NOT_SERVING, liveness included.
    pub fn engine_running(&self) -> bool {
        !self.inner.shared.engine_stopped.load(Ordering::SeqCst)
    }

    /// Calls queued or running now (0 once every call has been answered or dropped).
    pub fn in_flight(&self) -> usize {
        self.inner.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The engine's state after its last pass.
    pub fn usage(&self) -> Usage {
        *self.inner.shared.usage.lock().expect("usage lock")
    }

    /// Live sequences, KV blocks in use, and sequences held by the prefix cache. Between calls
    /// every live sequence belongs to the cache.
    pub fn engine_usage(&self) -> (usize, usize, usize) {
        let u = self.usage();
        (u.sequences, u.kv_blocks, u.cached_sequences)
    }

    /// Frees every cached sequence (e.g. between unrelated searches) and waits until it is done.
    /// Blocks the calling thread: from async code use [`LocalWorker::with_engine`].
    pub fn clear_prefix_cache(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self
            .inner
            .tx
            .send(Command::Exclusive(Box::new(move |engine, cache| {
                cache.clear(engine);
                Box::new(move || {
                    let _ = tx.send(());
                })
            })));
        if sent.is_ok() {
            let _ = rx.recv();
        }
    }

    /// Runs `f` on the engine thread between two forward passes, with the engine to itself:
    /// for work that is not sampling (scoring a path, reading hidden states). Sequences `f`
    /// creates must be freed by `f`.
    pub async fn with_engine<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine, &Tokenizer) -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        self.with_engine_and_cache(move |engine, tokenizer, _cache| f(engine, tokenizer))
            .await
    }

    /// Like [`LocalWorker::with_engine`], with the prefix cache too: a reward model reading
    /// the policy's own paths forks the sequences the cache keeps instead of recomputing them.
    pub(crate) async fn with_engine_and_cache<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine, &Tokenizer, &mut cache::PrefixCache) -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        let (tx, rx) = oneshot::channel();
        let tokenizer = self.inner.tokenizer.clone();
        self.inner
            .tx
            .send(Command::Exclusive(Box::new(move |engine, cache| {
                let r = f(engine, &tokenizer, cache);
                Box::new(move || {
                    let _ = tx.send(r);
                })
            })))
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)
    }

    /// Reads `what` after every step of every path, inline (at `PathLayout::read_at`), on the
    /// engine thread at the next gap between passes, in one call with every other read
    /// waiting there ([`runner::Command::Read`]): the scoring of many searches shares a pass.
    pub(crate) async fn read_inline(
        &self,
        paths: Vec<prm::reader::PathLayout>,
        what: prm::reader::Read,
    ) -> Result<Result<Vec<prm::reader::PathReadout>, arbor_model::ModelError>, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Read(runner::ReadJob { paths, what, reply }))
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)
    }

    /// Takes one of the [`WorkerOptions::calls_in_flight_max`] call slots for work that is not
    /// an expansion (scoring), so it counts in [`LocalWorker::in_flight`] and is refused with
    /// [`WorkerError::Overloaded`] like one. The slot is given back when the guard drops.
    pub fn admit(&self) -> Result<InFlight, WorkerError> {
        self.take_slot()?;
        Ok(InFlight(self.inner.shared.clone()))
    }

    /// Counts one more call in flight, or refuses it at the limit. Whoever takes a slot gives
    /// it back: an [`InFlight`] guard, or the engine thread when it answers an expansion.
    fn take_slot(&self) -> Result<(), WorkerError> {
        let shared = &self.inner.shared;
        let limit = self.inner.options.calls_in_flight_max;
        let in_flight = shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if in_flight >= limit {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(WorkerError::Overloaded { in_flight, limit });
        }
        Ok(())
    }

    /// Frees `seq` on the engine thread at the next gap between passes, without waiting: for
    /// a caller that goes away while holding a sequence (a dropped `Score`).
    pub fn free_sequence(&self, seq: arbor_model::SeqId) {
        let _ = self
            .inner
            .tx
            .send(Command::Exclusive(Box::new(move |engine, _cache| {
                engine.free(seq);
                Box::new(|| {})
            })));
    }

    /// Samples `k` continuations of each item, sharing forward passes with every other call in
    /// flight. Dropping the returned future cancels the call: its decoding stops at the next
    /// pass and its sequences are freed. After `deadline` the call fails with
    /// [`WorkerError::DeadlineExceeded`], also at the next pass.
    pub async fn expand(
        &self,
        items: Vec<ExpandItem>,
        deadline: Option<Instant>,
    ) -> Result<Vec<ExpandResult>, WorkerError> {
        self.take_slot()?;
        let shared = &self.inner.shared;
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .tx
            .send(Command::Expand {
                items,
                deadline,
                reply: tx,
            })
            .is_err()
        {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(WorkerError::Stopped);
        }
        rx.await.map_err(|_| WorkerError::Stopped)?
    }

    /// The token prefix of a search request: the templated prompt (special tokens parsed),
    /// then the path's own tokens as generated.
    pub fn request_tokens(&self, r: &ProposeRequest) -> Result<Vec<u32>, arbor_model::ModelError> {
        let mut prompt = self.inner.tokenizer.encode(&r.prompt, true)?;
        for s in &r.steps {
            prompt.extend_from_slice(&s.token_ids);
        }
        Ok(prompt)
    }
}

impl Policy for LocalWorker {
    async fn propose(&self, batch: Vec<ProposeRequest>) -> Result<Vec<Proposals>, PolicyError> {
        let o = &self.inner.options;
        let mut items = Vec::with_capacity(batch.len());
        for r in &batch {
            items.push(ExpandItem {
                prompt: self
                    .request_tokens(r)
                    .map_err(|e| PolicyError::new(e.to_string()))?,
                k: r.k as usize,
                max_tokens: r.sampling.max_step_tokens as usize,
                sampling: SamplingParams {
                    temperature: r.sampling.temperature,
                    top_k: o.top_k,
                    top_p: r.sampling.top_p,
                    seed: r.sampling.seed,
                },
                stop: vec![o.step_delimiter.clone()],
            });
        }
        let results = self
            .expand(items, None)
            .await
            .map_err(|e| PolicyError::new(e.to_string()))?;
        Ok(results.into_iter().map(proposals).collect())
    }
}

/// A call slot taken by [`LocalWorker::admit`]; dropping it gives the slot back.
pub struct InFlight(Arc<Shared>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A search's view of one expansion result.
pub fn proposals(r: ExpandResult) -> Proposals {
    let generated: u64 = r.samples.iter().map(|s| s.tokens.len() as u64).sum();
    let steps = r
        .samples
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
    Proposals {
        steps,
        cost: PolicyCost {
            prompt_tokens: r.prompt_tokens,
            // A request's prefix is computed once for all its samples, minus what the prefix
            // cache already held.
            prompt_tokens_computed: r.prompt_tokens_computed,
            prompt_tokens_reused: r.prompt_tokens_reused,
            generated_tokens: generated,
        },
    }
}

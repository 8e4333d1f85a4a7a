//! The engine thread: one thread owns the [`Engine`] and its prefix cache and runs continuous
//! batching over every call the worker receives.
//!
//! Calls arrive as [`Command`]s on a channel. Between two forward passes the thread takes new
//! calls (their prompts join the next pass), drops calls whose caller went away or whose deadline
//! passed (their sequences are freed at once), runs exclusive work such as scoring, and answers
//! the calls that finished. Every call's result is the same as if it had run alone.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arbor_model::generate::{Batcher, JobId, JobResult};
use arbor_model::{Engine, GenOutput, GenRequest, ModelError, SamplingParams, Tokenizer};
use crossbeam_channel::{Receiver, TryRecvError};
use tokio::sync::oneshot;

use crate::cache::PrefixCache;
use crate::prm::reader::{read_paths, PathLayout, PathReadout, Probe, Read};
use crate::{Shared, Usage, WorkerError, WorkerOptions};

/// One node to expand: a token prefix and how to continue it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpandItem {
    /// The full token prefix (templated prompt followed by the path's steps).
    pub prompt: Vec<u32>,
    /// Samples wanted; they share one prefill of `prompt`.
    pub k: usize,
    /// Most tokens per sample.
    pub max_tokens: usize,
    /// How tokens are picked; sample `j` draws from stream `j` of the seed.
    pub sampling: SamplingParams,
    /// Texts that end a sample (the step delimiter).
    pub stop: Vec<String>,
}

/// The samples of one [`ExpandItem`] and what they cost.
#[derive(Debug, Clone)]
pub struct ExpandResult {
    /// `k` samples, in sample order.
    pub samples: Vec<GenOutput>,
    /// Prompt tokens sent.
    pub prompt_tokens: u64,
    /// Of those, computed by this call (once for all samples).
    pub prompt_tokens_computed: u64,
    /// Of those, reused from the prefix cache.
    pub prompt_tokens_reused: u64,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, WorkerError>>;

/// Sends the result of exclusive work back to its caller.
pub(crate) type Deliver = Box<dyn FnOnce() + Send>;

pub(crate) enum Command {
    Expand {
        items: Vec<ExpandItem>,
        deadline: Option<Instant>,
        reply: Reply<Vec<ExpandResult>>,
    },
    /// Work that needs the engine to itself (scoring, cache control), run between passes. It
    /// returns its reply, which runs once the usage snapshot is current.
    Exclusive(ExclusiveWork),
    /// A reward model's inline reads of the policy's own paths (a value head's hidden
    /// states): every read waiting at a gap between passes runs in one `read_paths` call, so
    /// the scoring of many searches shares one pass instead of taking one each.
    Read(ReadJob),
}

/// See [`Command::Read`].
pub(crate) struct ReadJob {
    pub(crate) paths: Vec<PathLayout>,
    pub(crate) what: Read,
    pub(crate) reply: oneshot::Sender<Result<Vec<PathReadout>, ModelError>>,
}

/// Work run with the engine and prefix cache to itself; see [`Command::Exclusive`].
pub(crate) type ExclusiveWork = Box<dyn FnOnce(&mut Engine, &mut PrefixCache) -> Deliver + Send>;

struct Running {
    items: Vec<ExpandItem>,
    deadline: Option<Instant>,
    reply: Reply<Vec<ExpandResult>>,
    /// Prompt tokens each item reused from the cache.
    reused: Vec<u64>,
    /// Already retried once after a full KV cache.
    retried: bool,
}

struct Runner {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    options: WorkerOptions,
    shared: Arc<Shared>,
    batcher: Batcher,
    cache: PrefixCache,
    running: std::collections::HashMap<JobId, Running>,
    /// Calls that found the KV cache full while other calls held it: they start again, oldest
    /// first, as calls finish and give their blocks back, so a burst larger than the cache
    /// queues instead of failing.
    deferred: std::collections::VecDeque<Running>,
    /// Prompts submitted since the last pass (they are prefilled in the next one).
    new_prompts: usize,
    /// Reads waiting for the next gap between passes ([`Command::Read`]).
    reads: Vec<ReadJob>,
}

/// The largest pass buffer an idle engine keeps: one holding the logits of a dozen sequences
/// (a 152k vocabulary) stays, so small calls allocate nothing, while a large pass (hundreds of
/// sequences, a long `Score` chunk) frees its buffers once the worker is idle.
pub(crate) const SCRATCH_KEEP_BYTES: usize = 8 << 20;

/// The engine thread's main loop; returns when every handle to the worker is gone and no call
/// is left.
pub(crate) fn run(
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    options: WorkerOptions,
    shared: Arc<Shared>,
    rx: Receiver<Command>,
) {
    let mut r = Runner {
        engine,
        tokenizer,
        options,
        shared,
        batcher: Batcher::new(),
        cache: PrefixCache::default(),
        running: Default::default(),
        deferred: Default::default(),
        new_prompts: 0,
        reads: Vec::new(),
    };
    // Dropped before `r` (and the reply channels it holds), on return or unwinding.
    let _alive = crate::EngineAlive(r.shared.clone());
    loop {
        // Deferred calls go first once nothing else holds the cache.
        if r.batcher.is_idle() {
            r.resume_deferred();
        }
        // Wait for work when idle; otherwise take whatever has arrived and keep decoding.
        if r.batcher.is_idle() {
            // Nothing to do: give back what the largest pass grew (see `SCRATCH_KEEP_BYTES`).
            if r.engine.scratch_bytes() > SCRATCH_KEEP_BYTES {
                r.engine.release_scratch(SCRATCH_KEEP_BYTES);
                r.publish();
            }
            match rx.recv() {
                Ok(cmd) => r.command(cmd),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    // Exclusive work that comes in pieces (a long Score, one chunk after
                    // another) would otherwise starve decoding: while calls are decoding,
                    // at most one piece runs between two passes.
                    let exclusive = matches!(cmd, Command::Exclusive(_));
                    r.command(cmd);
                    if exclusive && !r.batcher.is_idle() {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if r.batcher.is_idle() => return,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        r.run_reads();
        r.drop_abandoned();
        if !r.batcher.is_idle() {
            r.step();
        }
    }
}

impl Running {
    /// Why the call should end now: its caller went away, or its deadline passed.
    fn abandoned(&self, now: Instant) -> Option<WorkerError> {
        if self.reply.is_closed() {
            Some(WorkerError::Cancelled)
        } else if self.deadline.is_some_and(|d| now >= d) {
            Some(WorkerError::DeadlineExceeded)
        } else {
            None
        }
    }
}

impl Runner {
    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Expand {
                items,
                deadline,
                reply,
            } => self.start(items, deadline, reply, false),
            Command::Read(job) => self.reads.push(job),
            Command::Exclusive(f) => {
                let (engine, cache) = (&mut self.engine, &mut self.cache);
                match std::panic::catch_unwind(AssertUnwindSafe(|| f(engine, cache))) {
                    Ok(deliver) => {
                        self.publish();
                        deliver();
                    }
                    // The caller sees its reply channel closed.
                    Err(_) => {
                        tracing::error!("exclusive engine work panicked; the worker carries on")
                    }
                }
            }
        }
    }

    /// Looks up each item's longest cached prefix and queues the call in the batcher.
    fn start(
        &mut self,
        items: Vec<ExpandItem>,
        deadline: Option<Instant>,
        reply: Reply<Vec<ExpandResult>>,
        retried: bool,
    ) {
        let caching = self.options.prefix_cache_entries_max > 0;
        let mut reused = Vec::with_capacity(items.len());
        let requests: Vec<GenRequest> = items
            .iter()
            .map(|it| {
                let hit = if caching {
                    self.cache.lookup(&it.prompt)
                } else {
                    None
                };
                reused.push(hit.map_or(0, |h| h.1) as u64);
                GenRequest {
                    prompt: it.prompt.clone(),
                    n: it.k,
                    max_tokens: it.max_tokens,
                    sampling: it.sampling.clone(),
                    stop: it.stop.clone(),
                    prefix: hit.map(|h| h.0),
                    keep_sequences: caching,
                }
            })
            .collect();
        let prompts = requests.len();
        match self.batcher.submit(&mut self.engine, requests) {
            Ok(id) => {
                self.new_prompts += prompts;
                self.running.insert(
                    id,
                    Running {
                        items,
                        deadline,
                        reply,
                        reused,
                        retried,
                    },
                );
            }
            Err(e) => {
                self.publish();
                self.answer(reply, Err(WorkerError::Model(e)));
                return;
            }
        }
        self.publish();
    }

    /// Cancels calls nobody waits for any more and calls past their deadline, running or
    /// deferred.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let gone: Vec<(JobId, WorkerError)> = self
            .running
            .iter()
            .filter_map(|(&id, r)| r.abandoned(now).map(|e| (id, e)))
            .collect();
        let mut replies = Vec::with_capacity(gone.len());
        for (id, err) in gone {
            self.batcher.cancel(&mut self.engine, id);
            let r = self.running.remove(&id).expect("listed");
            replies.push((r.reply, err));
        }
        let mut kept = std::collections::VecDeque::with_capacity(self.deferred.len());
        for r in std::mem::take(&mut self.deferred) {
            match r.abandoned(now) {
                Some(err) => replies.push((r.reply, err)),
                None => kept.push_back(r),
            }
        }
        self.deferred = kept;
        self.shared
            .stats
            .lock()
            .expect("stats lock")
            .cancelled_calls += replies.len() as u64;
        // The usage snapshot must show the freed sequences before a caller wakes up.
        self.publish();
        for (reply, err) in replies {
            self.answer(reply, Err(err));
        }
    }

    /// Runs every waiting read: those reading the same thing in one `read_paths` call (one
    /// pass when the prefix cache covers their paths). A merged call that fails is retried job
    /// by job, so one job's error (a path too long for the KV cache) is its own.
    fn run_reads(&mut self) {
        // A caller that went away (a search cancelled mid-scoring) needs nothing read.
        self.reads.retain(|j| !j.reply.is_closed());
        while !self.reads.is_empty() {
            let what = self.reads[0].what.clone();
            let (group, rest): (Vec<ReadJob>, Vec<ReadJob>) = std::mem::take(&mut self.reads)
                .into_iter()
                .partition(|j| j.what == what);
            self.reads = rest;
            let merged = if group.len() > 1 {
                let paths: Vec<PathLayout> =
                    group.iter().flat_map(|j| j.paths.iter().cloned()).collect();
                self.read(&paths, &what).ok()
            } else {
                None
            };
            let results: Vec<Result<Vec<PathReadout>, ModelError>> = match merged {
                Some(mut all) => group
                    .iter()
                    .map(|j| Ok(all.drain(..j.paths.len()).collect()))
                    .collect(),
                None => group.iter().map(|j| self.read(&j.paths, &what)).collect(),
            };
            self.publish();
            for (job, result) in group.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
    }

    /// One `read_paths` call on the engine and prefix cache; a panic in it is an error.
    fn read(&mut self, paths: &[PathLayout], what: &Read) -> Result<Vec<PathReadout>, ModelError> {
        let (engine, cache) = (&mut self.engine, &mut self.cache);
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            read_paths(engine, Some(cache), paths, &Probe::Inline, what)
        }))
        .unwrap_or_else(|_| {
            tracing::error!("reading paths panicked; the worker carries on");
            Err(ModelError::InvalidRequest {
                field: "paths",
                reason: "reading them panicked".into(),
            })
        })
    }

    fn step(&mut self) {
        if let Some(observe) = &self.options.on_pass {
            (observe.0)(self.batcher.live_samples() + self.new_prompts);
        }
        self.new_prompts = 0;
        let finished = self
            .batcher
            .step(&mut self.engine, &self.tokenizer, |_, _, _, _| {});
        self.shared.stats.lock().expect("stats lock").forward_passes += 1;
        let mut freed = false;
        for (id, result) in finished {
            let Some(r) = self.running.remove(&id) else {
                continue;
            };
            freed |= result.is_ok();
            self.finish(r, result);
        }
        // A finished call gave its blocks back: one deferred call may start in the next pass.
        if freed {
            self.resume_one();
        }
        self.evict();
        self.publish();
    }

    fn finish(&mut self, r: Running, result: JobResult) {
        let (mut outputs, stats) = match result {
            Ok(done) => done,
            // Alone, only the cache's own blocks can stand in the way: give them all back and
            // try again (a failed job gave its own sequences back already; a second failure
            // finds the cache empty and is the call's error).
            Err(ModelError::KvCacheFull { .. })
                if self.batcher.is_idle() && self.cache.len() > 0 =>
            {
                tracing::info!(
                    cached = self.cache.len(),
                    "KV cache full: the prefix cache given back, the call retried"
                );
                self.cache.clear(&mut self.engine);
                self.start(r.items, r.deadline, r.reply, true);
                return;
            }
            // Beside others, once: the least recently used entries go until what the call
            // lacked, and at least a quarter of the pool, is free, so the others' cached
            // prefixes mostly stay.
            Err(ModelError::KvCacheFull { needed, .. })
                if !self.batcher.is_idle() && self.cache.len() > 0 && !r.retried =>
            {
                let max = self.engine.kv_blocks_max();
                let cached = self.cache.len();
                let free = needed.max(max / 4);
                self.cache
                    .evict(&mut self.engine, cached, max.saturating_sub(free));
                tracing::info!(
                    cached,
                    kept = self.cache.len(),
                    "KV cache full: prefix cache entries given back, the call retried"
                );
                self.start(r.items, r.deadline, r.reply, true);
                return;
            }
            // Other calls hold the cache: wait for them instead of failing.
            Err(ModelError::KvCacheFull { .. }) if !self.batcher.is_idle() => {
                tracing::debug!(
                    deferred = self.deferred.len() + 1,
                    "KV cache full: the call waits for others to finish"
                );
                self.shared.stats.lock().expect("stats lock").deferred_calls += 1;
                self.deferred.push_back(r);
                return;
            }
            Err(e) => {
                // The failed job gave its sequences back: the snapshot says so before the
                // caller wakes up.
                self.publish();
                self.answer(r.reply, Err(WorkerError::Model(e)));
                return;
            }
        };
        // Keep every sample's sequence under the tokens it holds: the next expansion of that
        // child forks it instead of recomputing the path.
        for (samples, item) in outputs.iter_mut().zip(&r.items) {
            for out in samples.iter_mut() {
                if let Some(seq) = out.seq.take() {
                    let held = self.engine.seq_len(seq).unwrap_or(0);
                    let tokens: Vec<u32> = item
                        .prompt
                        .iter()
                        .chain(&out.tokens)
                        .copied()
                        .take(held)
                        .collect();
                    self.cache.insert(tokens, seq, &mut self.engine);
                }
            }
        }
        {
            let mut s = self.shared.stats.lock().expect("stats lock");
            s.propose_calls += 1;
            s.requests += r.items.len() as u64;
            s.prompt_tokens_computed += stats.prompt_tokens_computed;
            s.generated_tokens += stats.generated_tokens;
        }
        let results = outputs
            .into_iter()
            .zip(&r.items)
            .zip(&r.reused)
            .map(|((samples, item), &reused)| {
                let sent = item.prompt.len() as u64;
                ExpandResult {
                    samples,
                    prompt_tokens: sent,
                    prompt_tokens_computed: sent - reused,
                    prompt_tokens_reused: reused,
                }
            })
            .collect();
        // The usage snapshot must be current before the caller wakes up.
        self.evict();
        self.publish();
        self.answer(r.reply, Ok(results));
    }

    /// Gives back least recently used cache entries past the options' limits
    /// ([`WorkerOptions::prefix_cache_blocks_max`]).
    fn evict(&mut self) {
        let max = self.engine.kv_blocks_max();
        let blocks_max = self
            .options
            .prefix_cache_blocks_max
            .unwrap_or(max - max / 8);
        self.cache.evict(
            &mut self.engine,
            self.options.prefix_cache_entries_max,
            blocks_max,
        );
    }

    /// Starts the oldest deferred call, if any.
    fn resume_one(&mut self) {
        if let Some(r) = self.deferred.pop_front() {
            self.start(r.items, r.deadline, r.reply, r.retried);
        }
    }

    /// With nothing running, starts deferred calls until one is running (a call that fails
    /// alone in an empty cache gets its error).
    fn resume_deferred(&mut self) {
        while self.batcher.is_idle() && !self.deferred.is_empty() {
            self.resume_one();
        }
    }

    fn answer<T>(&self, reply: Reply<T>, result: Result<T, WorkerError>) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        let _ = reply.send(result);
    }

    /// Publishes the engine's usage for [`crate::LocalWorker::engine_usage`].
    fn publish(&self) {
        *self.shared.usage.lock().expect("usage lock") = Usage {
            sequences: self.engine.n_sequences(),
            kv_blocks: self.engine.kv_blocks_in_use(),
            cached_sequences: self.cache.len(),
            running_calls: self.running.len() + self.deferred.len(),
            scratch_bytes: self.engine.scratch_bytes(),
        };
    }
}

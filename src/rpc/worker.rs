//! The worker service: `Expand`, `Score` and `ModelInfo` over a [`LocalWorker`].
//!
//! Concurrent calls share forward passes (the worker's engine thread batches them). A call whose
//! client goes away or whose gRPC deadline passes stops decoding at the next pass. Expansions are
//! idempotent by `expansion_id`: a coordinator that re-sends one after a lost reply gets the same
//! answer without a second computation.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_model::{SamplingParams, StopReason};
use arbor_worker::{ExpandItem, LocalWorker, PathScorer, WorkerError, SCORE_CHUNK_TOKENS};
use dashmap::DashMap;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::limits::WorkerLimits;
use super::pb;
use super::pb::worker_server::{Worker, WorkerServer};

/// A path to score: its prompt tokens and its steps' tokens.
type ScorePath = (Vec<u32>, Vec<Vec<u32>>);

/// Answers kept for repeated expansion ids.
const REMEMBERED_EXPANSIONS: usize = 1024;

type Shared = Arc<OnceCell<pb::ExpandResponse>>;

/// How a worker's refusal of a call made for another tokenizer begins (the field's name), so
/// that a coordinator tells it from other failed preconditions.
pub const TOKENIZER_MISMATCH: &str = "tokenizer_fingerprint";

/// How a worker's refusal of a call made for other weights begins.
pub const WEIGHTS_MISMATCH: &str = "weights_fingerprint";

/// The metadata key under which a coordinator sends a worker call's search request id; the
/// worker logs it in the call's span (`worker_call{request_id=…}`).
pub const REQUEST_ID_HEADER: &str = "x-arbor-request-id";

/// Bytes of a caller's request id a worker logs.
const REQUEST_ID_LOGGED_MAX: usize = 128;

/// The span of one worker call: the request id its coordinator sent (cut to
/// [`REQUEST_ID_LOGGED_MAX`] bytes), or empty.
fn call_span<T>(request: &Request<T>, method: &'static str) -> tracing::Span {
    let id = request
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut end = id.len().min(REQUEST_ID_LOGGED_MAX);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    tracing::info_span!("worker_call", request_id = %&id[..end], method)
}

/// The gRPC face of a [`LocalWorker`].
#[derive(Clone)]
pub struct WorkerService {
    worker: LocalWorker,
    limits: WorkerLimits,
    /// Recent and running expansions by id, with a digest of the request each id was made for.
    expansions: Arc<DashMap<String, (u64, Shared)>>,
    order: Arc<Mutex<VecDeque<String>>>,
    /// The bearer tokens callers must present; `None`: none.
    auth: Option<super::auth::Tokens>,
    /// Set on shutdown: new calls are refused with UNAVAILABLE (the coordinator re-sends them
    /// to another worker).
    draining: Arc<AtomicBool>,
    drain_timeout: Duration,
    /// Where calls are counted (`--metrics-listen`); `None`: nowhere.
    metrics: Option<super::metrics::WorkerMetrics>,
}

impl WorkerService {
    /// A service over `worker`.
    pub fn new(worker: LocalWorker, limits: WorkerLimits) -> Self {
        WorkerService {
            worker,
            limits,
            expansions: Arc::default(),
            order: Arc::default(),
            auth: None,
            draining: Arc::default(),
            drain_timeout: Duration::from_secs(30),
            metrics: None,
        }
    }

    /// Counts calls in `metrics`.
    pub fn with_metrics(mut self, metrics: Option<super::metrics::WorkerMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Counts one answered call of `method`.
    fn count<T>(&self, method: &str, result: &Result<T, Status>) {
        if let Some(m) = &self.metrics {
            let code = result
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            m.requests
                .with_label_values(&[method, super::metrics::code_label(code)])
                .inc();
        }
    }

    /// Accepts only calls carrying one of `tokens` (health stays open).
    pub fn with_auth(mut self, tokens: Option<super::auth::Tokens>) -> Self {
        self.auth = tokens;
        self
    }

    /// On shutdown, how long calls in flight may take to finish.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    fn admit(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(
                "the worker is shutting down and takes no new calls",
            ));
        }
        Ok(())
    }

    /// The worker behind the service.
    pub fn worker(&self) -> &LocalWorker {
        &self.worker
    }

    /// The tonic server, with the message size limit applied.
    pub fn into_server(self) -> WorkerServer<WorkerService> {
        let max = self.limits.message_bytes_max;
        WorkerServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
    }

    /// Refuses a call made for other weights: a search must not mix two models' steps.
    fn check_weights(&self, fingerprint: &str) -> Result<(), Status> {
        let info = self.worker.model_info();
        if fingerprint.is_empty() || fingerprint == info.weights_fingerprint {
            return Ok(());
        }
        if fingerprint.len() > 64 {
            return Err(invalid(
                WEIGHTS_MISMATCH,
                format!(
                    "{} bytes; a fingerprint (ModelInfo.weights_fingerprint) has 32",
                    fingerprint.len()
                ),
            ));
        }
        Err(Status::failed_precondition(format!(
            "{WEIGHTS_MISMATCH}: the request was made for weights {fingerprint:?}, this worker \
             runs {:?} (model {})",
            info.weights_fingerprint, info.source
        )))
    }

    /// Refuses a call made for another tokenizer: its token ids would mean other text here.
    fn check_tokenizer(&self, fingerprint: &str) -> Result<(), Status> {
        let info = self.worker.model_info();
        if fingerprint.is_empty() || fingerprint == info.tokenizer_fingerprint {
            return Ok(());
        }
        // A fingerprint is 32 hex digits; anything much longer is not one (and is not echoed).
        if fingerprint.len() > 64 {
            return Err(invalid(
                TOKENIZER_MISMATCH,
                format!(
                    "{} bytes; a fingerprint (ModelInfo.tokenizer_fingerprint) has 32",
                    fingerprint.len()
                ),
            ));
        }
        Err(Status::failed_precondition(format!(
            "{TOKENIZER_MISMATCH}: the request was made for tokenizer {fingerprint:?}, this \
             worker runs {:?} (model {}, vocabulary {}); its token ids would mean other text \
             here",
            info.tokenizer_fingerprint, info.source, info.config.vocab_size
        )))
    }

    fn validate(&self, req: &pb::ExpandRequest) -> Result<Vec<ExpandItem>, Status> {
        let l = &self.limits;
        let info = self.worker.model_info();
        let vocab = info.config.vocab_size;
        let context = info.config.context_length;
        if req.expansion_id.len() > l.expansion_id_bytes_max {
            return Err(invalid(
                "expansion_id",
                format!(
                    "{} bytes; at most {}",
                    req.expansion_id.len(),
                    l.expansion_id_bytes_max
                ),
            ));
        }
        if req.nodes.is_empty() || req.nodes.len() > l.nodes_per_call_max {
            return Err(invalid(
                "nodes",
                format!(
                    "{} nodes; 1 to {} per call",
                    req.nodes.len(),
                    l.nodes_per_call_max
                ),
            ));
        }
        let mut items = Vec::with_capacity(req.nodes.len());
        for (i, n) in req.nodes.iter().enumerate() {
            let field = |f: &str| format!("nodes[{i}].{f}");
            if n.prefix_tokens.is_empty() {
                return Err(invalid(&field("prefix_tokens"), "empty"));
            }
            if let Some((j, t)) = n
                .prefix_tokens
                .iter()
                .enumerate()
                .find(|(_, &t)| t as usize >= vocab)
            {
                return Err(invalid(
                    &format!("nodes[{i}].prefix_tokens[{j}]"),
                    format!("token id {t} is outside the vocabulary of {vocab}"),
                ));
            }
            if n.k == 0 || n.k > l.k_max {
                return Err(invalid(&field("k"), format!("{}; 1 to {}", n.k, l.k_max)));
            }
            if n.max_tokens == 0 || n.max_tokens > l.max_tokens_max {
                return Err(invalid(
                    &field("max_tokens"),
                    format!("{}; 1 to {}", n.max_tokens, l.max_tokens_max),
                ));
            }
            let total = n.prefix_tokens.len() + n.max_tokens as usize;
            if total > context {
                return Err(invalid(
                    &field("prefix_tokens"),
                    format!(
                        "{} prefix tokens + max_tokens {} exceed the model's context of {context}",
                        n.prefix_tokens.len(),
                        n.max_tokens
                    ),
                ));
            }
            if !n.temperature.is_finite() || n.temperature < 0.0 {
                return Err(invalid(
                    &field("temperature"),
                    format!("{}; a finite number ≥ 0", n.temperature),
                ));
            }
            let top_p = if n.top_p == 0.0 { 1.0 } else { n.top_p };
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(invalid(&field("top_p"), format!("{}; in (0, 1]", n.top_p)));
            }
            if n.stop.len() > l.stop_strings_max {
                return Err(invalid(
                    &field("stop"),
                    format!(
                        "{} stop strings; at most {}",
                        n.stop.len(),
                        l.stop_strings_max
                    ),
                ));
            }
            if let Some(s) = n
                .stop
                .iter()
                .find(|s| s.is_empty() || s.len() > l.stop_bytes_max)
            {
                return Err(invalid(
                    &field("stop"),
                    format!(
                        "stop string of {} bytes; 1 to {} bytes each",
                        s.len(),
                        l.stop_bytes_max
                    ),
                ));
            }
            items.push(ExpandItem {
                prompt: n.prefix_tokens.clone(),
                k: n.k as usize,
                max_tokens: n.max_tokens as usize,
                sampling: SamplingParams {
                    temperature: n.temperature,
                    top_k: n.top_k as usize,
                    top_p,
                    seed: n.seed,
                },
                stop: n.stop.clone(),
            });
        }
        Ok(items)
    }

    async fn run_expand(
        &self,
        items: Vec<ExpandItem>,
        deadline: Option<Instant>,
    ) -> Result<pb::ExpandResponse, Status> {
        let results = self
            .worker
            .expand(items, deadline)
            .await
            .map_err(worker_status)?;
        Ok(pb::ExpandResponse {
            nodes: results
                .into_iter()
                .map(|r| pb::NodeSamples {
                    samples: r
                        .samples
                        .into_iter()
                        .map(|s| pb::Sample {
                            token_ids: s.tokens,
                            logprobs: s.logprobs,
                            text: s.text,
                            stop_reason: match s.stop_reason {
                                StopReason::Eos => pb::StopReason::EndOfSequence,
                                StopReason::Stop(_) => pb::StopReason::Delimiter,
                                StopReason::MaxTokens => pb::StopReason::MaxTokens,
                            } as i32,
                        })
                        .collect(),
                    prompt_tokens_computed: r.prompt_tokens_computed,
                    prompt_tokens_reused: r.prompt_tokens_reused,
                })
                .collect(),
        })
    }

    /// Checks a `Score` request against the limits: every violation names the field and the
    /// limit (INVALID_ARGUMENT for one path or step, RESOURCE_EXHAUSTED for the whole call).
    fn validate_score(&self, req: &pb::ScoreRequest) -> Result<Vec<ScorePath>, Status> {
        let l = &self.limits;
        let info = self.worker.model_info();
        let (vocab, context) = (info.config.vocab_size, info.config.context_length);
        if req.paths.is_empty() || req.paths.len() > l.nodes_per_call_max {
            return Err(invalid(
                "paths",
                format!(
                    "{} paths; 1 to {} per call",
                    req.paths.len(),
                    l.nodes_per_call_max
                ),
            ));
        }
        let mut call_tokens = 0usize;
        let mut paths = Vec::with_capacity(req.paths.len());
        for (i, p) in req.paths.iter().enumerate() {
            if p.prompt_tokens.is_empty() {
                return Err(invalid(&format!("paths[{i}].prompt_tokens"), "empty"));
            }
            if p.steps.is_empty() || p.steps.iter().any(|s| s.token_ids.is_empty()) {
                return Err(invalid(
                    &format!("paths[{i}].steps"),
                    "at least one step, and no empty step",
                ));
            }
            if let Some((j, s)) = p
                .steps
                .iter()
                .enumerate()
                .find(|(_, s)| s.token_ids.len() > l.score_step_tokens_max)
            {
                return Err(invalid(
                    &format!("paths[{i}].steps[{j}].token_ids"),
                    format!(
                        "{} tokens; at most {} per step",
                        s.token_ids.len(),
                        l.score_step_tokens_max
                    ),
                ));
            }
            let total =
                p.prompt_tokens.len() + p.steps.iter().map(|s| s.token_ids.len()).sum::<usize>();
            let path_max = l.score_path_tokens_max.min(context);
            if total > path_max {
                return Err(invalid(
                    &format!("paths[{i}]"),
                    format!(
                        "{total} tokens (prompt and steps); at most {path_max} per path (the \
                         model's context is {context})"
                    ),
                ));
            }
            let all = p
                .prompt_tokens
                .iter()
                .chain(p.steps.iter().flat_map(|s| s.token_ids.iter()));
            if let Some(t) = all.copied().find(|&t| t as usize >= vocab) {
                return Err(invalid(
                    &format!("paths[{i}]"),
                    format!("token id {t} is outside the vocabulary of {vocab}"),
                ));
            }
            call_tokens += total;
            if call_tokens > l.score_call_tokens_max {
                return Err(Status::resource_exhausted(format!(
                    "paths: more than {} tokens in one Score call (at paths[{i}]); at most {} \
                     per call: send fewer paths per call",
                    call_tokens, l.score_call_tokens_max
                )));
            }
            let steps = p.steps.iter().map(|s| s.token_ids.clone()).collect();
            paths.push((p.prompt_tokens.clone(), steps));
        }
        Ok(paths)
    }

    /// Scores one path a chunk at a time ([`PathScorer`]): each chunk is its own piece of
    /// exclusive engine work, so expansions keep running between chunks, memory stays at one
    /// chunk of logits, and the deadline and the caller (dropping this future) are checked
    /// between chunks.
    async fn score_path(
        &self,
        prompt: &[u32],
        steps: &[Vec<u32>],
        deadline: Option<Instant>,
    ) -> Result<pb::PathScores, Status> {
        let mut scorer = PathScorer::new(prompt, steps);
        let tokens = scorer.tokens() as u64;
        let seq = self
            .worker
            .with_engine(|engine, _| engine.new_sequence())
            .await
            .map_err(worker_status)?;
        // Freed however this ends: finished, failed, past its deadline or dropped.
        let _seq = FreeOnDrop(self.worker.clone(), seq);
        while !scorer.done() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Status::deadline_exceeded(
                    "the call's deadline passed while scoring; its work was stopped",
                ));
            }
            let (back, result) = self
                .worker
                .with_engine(move |engine, _| {
                    let r = scorer.advance(engine, seq, SCORE_CHUNK_TOKENS);
                    (scorer, r)
                })
                .await
                .map_err(worker_status)?;
            scorer = back;
            result.map_err(|e| worker_status(WorkerError::Model(e)))?;
        }
        Ok(pb::PathScores {
            scores: scorer.scores(),
            tokens_computed: tokens,
        })
    }

    /// The answer cell of expansion `id`, made for a request with `digest`. An id already used
    /// for another request is refused: answering it from memory would hand this caller another
    /// request's samples.
    fn remember(&self, id: &str, digest: u64) -> Result<Shared, Status> {
        let (first, cell) = self
            .expansions
            .entry(id.to_string())
            .or_insert_with(|| (digest, Shared::default()))
            .clone();
        if first != digest {
            return Err(invalid(
                "expansion_id",
                format!(
                    "`{id}` was already used for a different request; an id names one request \
                     (a retry of it, with the same nodes, gets its answer)"
                ),
            ));
        }
        let mut order = self.order.lock().expect("order lock");
        if !order.iter().any(|o| o == id) {
            order.push_back(id.to_string());
            while order.len() > REMEMBERED_EXPANSIONS {
                if let Some(old) = order.pop_front() {
                    self.expansions.remove(&old);
                }
            }
        }
        Ok(cell)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn expand(
        &self,
        request: Request<pb::ExpandRequest>,
    ) -> Result<Response<pb::ExpandResponse>, Status> {
        let span = call_span(&request, "expand");
        let result = self.expand_call(request).instrument(span.clone()).await;
        self.count("expand", &result);
        span.in_scope(|| log_answer(&result));
        result
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let span = call_span(&request, "score");
        let result = self.score_call(request).instrument(span.clone()).await;
        self.count("score", &result);
        span.in_scope(|| log_answer(&result));
        result
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let info = self.worker.model_info();
        let c = &info.config;
        Ok(Response::new(pb::ModelInfoResponse {
            source: info.source.clone(),
            architecture: c.architecture.clone(),
            vocab_size: c.vocab_size as u32,
            context_length: c.context_length as u32,
            n_layers: c.n_layers as u32,
            d_model: c.d_model as u32,
            backend: info.backend.clone(),
            in_flight: self.worker.in_flight() as u32,
            step_delimiter: self.worker.options().step_delimiter.clone(),
            tokenizer_fingerprint: info.tokenizer_fingerprint.clone(),
            weights_fingerprint: info.weights_fingerprint.clone(),
        }))
    }
}

impl WorkerService {
    async fn expand_call(
        &self,
        request: Request<pb::ExpandRequest>,
    ) -> Result<Response<pb::ExpandResponse>, Status> {
        let deadline = grpc_deadline(&request);
        self.admit()?;
        let req = request.into_inner();
        self.check_tokenizer(&req.tokenizer_fingerprint)?;
        self.check_weights(&req.weights_fingerprint)?;
        let items = self.validate(&req)?;
        tracing::debug!(nodes = items.len(), expansion_id = %req.expansion_id, "expand");
        if req.expansion_id.is_empty() {
            return Ok(Response::new(self.run_expand(items, deadline).await?));
        }
        // A repeated id joins the first call (or gets its stored answer). A failed or dropped
        // first call stores nothing, so the repeat computes afresh.
        let cell = self.remember(&req.expansion_id, request_digest(&req))?;
        let answer = cell
            .get_or_try_init(|| self.run_expand(items, deadline))
            .await?;
        Ok(Response::new(answer.clone()))
    }

    async fn score_call(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let deadline = grpc_deadline(&request);
        self.admit()?;
        let req = request.into_inner();
        self.check_tokenizer(&req.tokenizer_fingerprint)?;
        self.check_weights(&req.weights_fingerprint)?;
        let paths = self.validate_score(&req)?;
        tracing::debug!(paths = paths.len(), "score");
        // Counted in flight like an expansion (and refused like one when the worker is full).
        let _slot = self.worker.admit().map_err(worker_status)?;
        let mut scored = Vec::with_capacity(paths.len());
        for (prompt, steps) in paths {
            scored.push(self.score_path(&prompt, &steps, deadline).await?);
        }
        Ok(Response::new(pb::ScoreResponse { paths: scored }))
    }
}

/// Logs how a call ended (debug level: one line per call).
fn log_answer<T>(result: &Result<T, Status>) {
    match result {
        Ok(_) => tracing::debug!("answered"),
        Err(s) => tracing::debug!(code = ?s.code(), "failed: {}", s.message()),
    }
}

/// Frees a sequence on the engine thread when dropped.
struct FreeOnDrop(LocalWorker, arbor_model::SeqId);

impl Drop for FreeOnDrop {
    fn drop(&mut self) {
        self.0.free_sequence(self.1);
    }
}

/// The deadline a client set with the `grpc-timeout` header.
pub(crate) fn grpc_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let v = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

pub(crate) fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn worker_status(e: WorkerError) -> Status {
    match &e {
        WorkerError::Model(arbor_model::ModelError::InvalidRequest { .. }) => {
            Status::invalid_argument(e.to_string())
        }
        WorkerError::Model(arbor_model::ModelError::KvCacheFull { .. })
        | WorkerError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        WorkerError::Model(_) => Status::internal(e.to_string()),
        WorkerError::DeadlineExceeded => Status::deadline_exceeded(e.to_string()),
        WorkerError::Cancelled => Status::cancelled(e.to_string()),
        WorkerError::Stopped => Status::unavailable(e.to_string()),
    }
}

/// Serves the worker (with health, and reflection if asked) on `listener` until `shutdown`
/// completes, over TLS when `tls` is given; then drains: health NOT_SERVING (`""` and
/// `arbor.v1.Worker`), new calls UNAVAILABLE, calls in flight finish for up to the drain
/// timeout.
pub async fn serve(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    reflection: bool,
    tls: Option<&super::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<WorkerServer<WorkerService>>().await;
    reporter
        .set_service_status(super::LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let reflection_service = reflection.then(super::reflection_service);
    let mut builder = server_builder(tls)?;
    let draining = service.draining.clone();
    let drain_timeout = service.drain_timeout;
    let worker = service.worker.clone();
    // Health follows the engine thread: once it has ended (a pass panicked) every call fails,
    // so the worker is neither ready nor alive, and an orchestrator restarts it.
    let watched = worker.clone();
    let watch_reporter = reporter.clone();
    let engine_watch = tokio::spawn(async move {
        while watched.engine_running() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::error!("the engine thread has stopped: health NOT_SERVING, liveness included");
        for name in ["", super::LIVENESS] {
            watch_reporter
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        watch_reporter
            .set_not_serving::<WorkerServer<WorkerService>>()
            .await;
    });
    // Aborted when serving ends, on every path out.
    let _engine_watch = AbortOnDrop(engine_watch);
    let intercepted = tonic::service::interceptor::InterceptedService::new(
        service.clone().into_server(),
        super::auth::Tokens::interceptor(service.auth.clone()),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_service(health)
        .add_optional_service(reflection_service)
        .add_service(intercepted)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stop_rx.await;
            },
        );
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served,
        () = shutdown => {}
    }
    draining.store(true, Ordering::SeqCst);
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    reporter
        .set_not_serving::<WorkerServer<WorkerService>>()
        .await;
    eprintln!(
        "arbor: draining: health NOT_SERVING, no new calls, {} in flight (waiting up to \
         {drain_timeout:?})",
        worker.in_flight()
    );
    let w = worker.clone();
    if let Some(served) =
        super::coordinator::drain(&mut server, drain_timeout, move || w.in_flight() == 0).await
    {
        return served;
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(served) => served,
        Err(_) => Ok(()),
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A server builder, with `tls` when given (its configuration was checked when it was loaded).
pub(crate) fn server_builder(
    tls: Option<&super::tls::ServerTls>,
) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let builder = tonic::transport::Server::builder();
    match tls {
        Some(tls) => builder.tls_config(tls.config()),
        None => Ok(builder),
    }
}

/// A digest of what an `Expand` request asks for (its nodes, in order, and the tokenizer it
/// was made for), to tell a retry from another request under the same id.
fn request_digest(req: &pb::ExpandRequest) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    req.tokenizer_fingerprint.hash(&mut h);
    req.weights_fingerprint.hash(&mut h);
    req.nodes.len().hash(&mut h);
    for n in &req.nodes {
        n.prefix_tokens.hash(&mut h);
        (
            n.k,
            n.temperature.to_bits(),
            n.top_p.to_bits(),
            n.top_k,
            n.seed,
        )
            .hash(&mut h);
        (n.max_tokens, &n.stop).hash(&mut h);
    }
    h.finish()
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

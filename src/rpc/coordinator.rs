//! The coordinator: the public `Search` service over a [`WorkerPool`].
//!
//! Each request is validated into a search configuration (every violation is INVALID_ARGUMENT
//! naming the field and the limit), then runs as one [`Search`] whose policy and scorer are a
//! [`RemotePolicy`] over the pool. Many searches run at once, up to
//! [`SearchLimits::searches_max`]; finished trees are kept for `GetTree`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_model::{ChatMessage, Tokenizer};
use arbor_search::{
    CancelToken, Search, SearchConfig, SearchControl, SearchEvent, StrategyConfig, Termination,
    TreeTap,
};
use arbor_worker::STEP_BY_STEP_SYSTEM_PROMPT;
use dashmap::DashMap;
use tokio::sync::{mpsc, Semaphore};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::auth::Owner;
use super::limits::SearchLimits;
use super::pb;
use super::pb::search_server::{Search as SearchRpc, SearchServer};
use super::pool::{RemotePolicy, WorkerPool};
use super::worker::{grpc_deadline, invalid};
use crate::strategy::{strategy_config, termination_name, Strategy};

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Limits on requests.
    pub limits: SearchLimits,
    /// The text that ends a reasoning step (the workers stop sampling there).
    pub step_delimiter: String,
    /// Finished trees kept for `GetTree`.
    pub trees_kept: usize,
    /// Most bytes the kept trees' JSON and DOT renderings may take together; the oldest go
    /// first (a tree larger than this is not kept at all).
    pub trees_kept_bytes: usize,
    /// Largest tree rendering `GetTree` sends (RESOURCE_EXHAUSTED beyond, naming the limit).
    pub tree_response_bytes_max: usize,
    /// Most prompt tokens (after the chat template).
    pub prompt_tokens_max: usize,
    /// The bearer tokens clients must present (`--auth-token-file`); `None`: no
    /// authentication. Each search is visible (`GetTree`, `Cancel`) only to its token.
    pub auth: Option<super::auth::Tokens>,
    /// On shutdown, how long running searches may take to finish before they are cancelled
    /// (and end with their best answer so far).
    pub drain_timeout: Duration,
    /// Events buffered for a `SearchStream` reader. The search never waits for its reader:
    /// events that do not fit wait in a second queue of [`STREAM_BACKLOG_MAX`] events.
    pub stream_buffer: usize,
    /// A `SearchStream` reader that leaves the buffer full for this long (or lets the backlog
    /// overflow) is cut off with RESOURCE_EXHAUSTED; the search goes on to its end and its
    /// tree is kept for `GetTree`.
    pub stream_stall_max: Duration,
    /// Where searches are counted and timed (`--metrics-listen`); `None`: nowhere.
    pub metrics: Option<super::metrics::SearchMetrics>,
}

/// Events a slow `SearchStream` reader may leave waiting beyond the stream's buffer before it
/// is cut off.
pub const STREAM_BACKLOG_MAX: usize = 4096;

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            limits: SearchLimits::default(),
            step_delimiter: "\n\n".into(),
            trees_kept: 64,
            trees_kept_bytes: 256 << 20,
            tree_response_bytes_max: 64 << 20,
            prompt_tokens_max: 8192,
            auth: None,
            drain_timeout: Duration::from_secs(30),
            stream_buffer: 256,
            stream_stall_max: Duration::from_secs(10),
            metrics: None,
        }
    }
}

/// A search in progress: how to cancel it and how to copy its tree.
struct RunningSearch {
    cancel: CancelToken,
    tap: TreeTap,
}

/// How long `GetTree` waits for a running search to finish its first round.
const TREE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct TreeDump {
    owner: Owner,
    request_id: String,
    json: String,
    dot: String,
}

impl TreeDump {
    /// Bytes its renderings hold.
    fn bytes(&self) -> usize {
        self.json.len() + self.dot.len() + self.request_id.len()
    }
}

/// Keeps `dump` (replacing an earlier tree of the same owner and id), then drops the oldest
/// trees while more than `count` are kept or they hold more than `bytes` bytes.
fn keep_tree(trees: &mut VecDeque<Arc<TreeDump>>, dump: Arc<TreeDump>, count: usize, bytes: usize) {
    trees.retain(|t| (t.owner, &t.request_id) != (dump.owner, &dump.request_id));
    trees.push_back(dump);
    let mut held: usize = trees.iter().map(|t| t.bytes()).sum();
    while trees.len() > count || (held > bytes && !trees.is_empty()) {
        held -= trees.pop_front().map_or(0, |t| t.bytes());
    }
}

/// RESOURCE_EXHAUSTED for a rendering larger than `max` bytes.
fn check_tree_size(id: &str, tree: &str, max: usize) -> Result<(), Status> {
    if tree.len() > max {
        return Err(Status::resource_exhausted(format!(
            "the tree of `{id}` renders to {} bytes, beyond the GetTree limit of {max} bytes \
             (tree_response_bytes_max)",
            tree.len()
        )));
    }
    Ok(())
}

struct Inner {
    pool: WorkerPool,
    tokenizer: Arc<Tokenizer>,
    options: CoordinatorOptions,
    /// Running searches by owner and request id: two clients' ids never collide, and one
    /// client cannot see or cancel another's search.
    running: DashMap<(Owner, String), RunningSearch>,
    trees: Mutex<VecDeque<Arc<TreeDump>>>,
    permits: Arc<Semaphore>,
    invariant_violations: AtomicU64,
    /// Set on shutdown: new searches are refused with UNAVAILABLE.
    draining: AtomicBool,
}

/// The `Search` service. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

/// A validated request.
#[derive(Debug)]
pub struct SearchSpec {
    /// The request id (the client's, or a random one the server made).
    pub request_id: String,
    /// Who asked (the token the call carried); only they see the search.
    pub owner: Owner,
    /// The prompt, chat template applied.
    pub prompt: String,
    /// Its tokens.
    pub prompt_tokens: Vec<u32>,
    /// The search configuration, budgets and deadline included.
    pub config: SearchConfig,
}

/// Removes a search from the running set however its call ends (finished, failed or dropped).
struct Running<'a>(&'a Inner, (Owner, String));

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.remove(&self.1);
        if let Some(m) = &self.0.options.metrics {
            m.running.dec();
        }
    }
}

impl Coordinator {
    /// A coordinator over `pool`, building prompts with `tokenizer` (the workers' model's).
    pub fn new(pool: WorkerPool, tokenizer: Arc<Tokenizer>, options: CoordinatorOptions) -> Self {
        Coordinator {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(options.limits.searches_max)),
                pool,
                tokenizer,
                options,
                running: DashMap::new(),
                trees: Mutex::new(VecDeque::new()),
                invariant_violations: AtomicU64::new(0),
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &WorkerPool {
        &self.inner.pool
    }

    /// Finished searches whose tree broke an invariant (always 0 unless there is a bug).
    pub fn invariant_violations(&self) -> u64 {
        self.inner.invariant_violations.load(Ordering::Relaxed)
    }

    /// Searches running now.
    pub fn running(&self) -> usize {
        self.inner.running.len()
    }

    /// Stops admitting searches (each new one gets UNAVAILABLE); running ones go on.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Coordinator::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Cancels every running search (each ends with its best answer so far).
    pub fn cancel_all(&self) {
        for r in self.inner.running.iter() {
            r.cancel.cancel();
        }
    }

    /// The tonic server, with the message size limit applied.
    pub fn into_server(self) -> SearchServer<Coordinator> {
        let max = self.inner.options.limits.message_bytes_max;
        SearchServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
    }

    /// Checks every field of `req` against the limits and builds the search it asks for.
    pub fn validate(
        &self,
        req: &pb::SearchRequest,
        rpc_deadline: Option<Instant>,
    ) -> Result<SearchSpec, Status> {
        let o = &self.inner.options;
        let l = &o.limits;
        if req.request_id.len() > l.request_id_bytes_max {
            return Err(invalid(
                "request_id",
                format!(
                    "{} bytes; at most {}",
                    req.request_id.len(),
                    l.request_id_bytes_max
                ),
            ));
        }
        if req.request_id.chars().any(|c| c.is_control()) {
            return Err(invalid("request_id", "control characters are not allowed"));
        }
        let request_id = if req.request_id.is_empty() {
            // Random (128 bits), so an id says nothing about other searches and cannot be
            // guessed.
            format!("{:032x}", rand::random::<u128>())
        } else {
            req.request_id.clone()
        };
        let prompt = match (req.question.is_empty(), req.messages.is_empty()) {
            (true, true) => return Err(invalid("question", "give a question or messages")),
            (false, false) => {
                return Err(invalid(
                    "messages",
                    "give either a question or messages, not both",
                ))
            }
            (false, true) => {
                if req.question.len() > l.question_bytes_max {
                    return Err(invalid(
                        "question",
                        format!(
                            "{} bytes; at most {}",
                            req.question.len(),
                            l.question_bytes_max
                        ),
                    ));
                }
                self.template(&[
                    ChatMessage::new("system", STEP_BY_STEP_SYSTEM_PROMPT),
                    ChatMessage::new("user", &req.question),
                ])?
            }
            (true, false) => {
                if req.messages.len() > l.messages_max {
                    return Err(invalid(
                        "messages",
                        format!(
                            "{} messages; at most {}",
                            req.messages.len(),
                            l.messages_max
                        ),
                    ));
                }
                let bytes: usize = req.messages.iter().map(|m| m.content.len()).sum();
                if bytes > l.question_bytes_max {
                    return Err(invalid(
                        "messages",
                        format!("{bytes} bytes of content; at most {}", l.question_bytes_max),
                    ));
                }
                for (i, m) in req.messages.iter().enumerate() {
                    if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                        return Err(invalid(
                            &format!("messages[{i}].role"),
                            format!("`{}`; one of system, user, assistant", m.role),
                        ));
                    }
                }
                if req.messages.last().map(|m| m.role.as_str()) != Some("user") {
                    return Err(invalid(
                        "messages",
                        "the last message must be the user's question",
                    ));
                }
                let msgs: Vec<ChatMessage> = req
                    .messages
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect();
                self.template(&msgs)?
            }
        };
        let prompt_tokens = self
            .inner
            .tokenizer
            .encode(&prompt, true)
            .map_err(|e| invalid("question", e))?;
        if prompt_tokens.len() > o.prompt_tokens_max {
            return Err(invalid(
                "question",
                format!(
                    "{} tokens after the chat template; at most {}",
                    prompt_tokens.len(),
                    o.prompt_tokens_max
                ),
            ));
        }
        let mut config = if req.config_json.is_empty() {
            let strategy = match pb::Strategy::try_from(req.strategy) {
                Ok(pb::Strategy::Unspecified | pb::Strategy::Mcts) => Strategy::Mcts,
                Ok(pb::Strategy::BestOfN) => Strategy::BestOfN,
                Ok(pb::Strategy::WeightedBestOfN) => Strategy::WeightedBestOfN,
                Ok(pb::Strategy::Majority) => Strategy::Majority,
                Ok(pb::Strategy::Beam) => Strategy::Beam,
                Ok(pb::Strategy::Dvts) => Strategy::Dvts,
                Err(_) => {
                    return Err(invalid(
                        "strategy",
                        format!("unknown value {}", req.strategy),
                    ))
                }
            };
            let n = if req.n == 0 { 8 } else { req.n };
            let s = req.sampling.unwrap_or_default();
            let mut c = strategy_config(
                strategy,
                n,
                s.temperature.unwrap_or(0.7),
                s.max_step_tokens.unwrap_or(128),
            );
            if let Some(p) = s.top_p {
                c.sampling.top_p = p;
            }
            c
        } else {
            if req.config_json.len() > l.config_json_bytes_max {
                return Err(invalid(
                    "config_json",
                    format!(
                        "{} bytes; at most {}",
                        req.config_json.len(),
                        l.config_json_bytes_max
                    ),
                ));
            }
            SearchConfig::from_json(&req.config_json).map_err(|e| invalid("config_json", e))?
        };
        config.seed = req.seed;
        let budget = req.budget.unwrap_or_default();
        let tokens = match (budget.generated_tokens, config.budget.max_generated_tokens) {
            (0, Some(t)) => t,
            (0, None) => l.budget_tokens_default,
            (t, _) => t,
        };
        if tokens > l.budget_tokens_max {
            return Err(invalid(
                "budget.generated_tokens",
                format!("{tokens}; at most {}", l.budget_tokens_max),
            ));
        }
        config.budget.max_generated_tokens = Some(tokens);
        if budget.policy_calls > 0 {
            config.budget.max_policy_calls = Some(budget.policy_calls);
        }
        if budget.nodes > 0 {
            if budget.nodes > u64::from(l.nodes_max) {
                return Err(invalid(
                    "budget.nodes",
                    format!("{}; at most {}", budget.nodes, l.nodes_max),
                ));
            }
            config.budget.max_nodes = budget.nodes as u32;
        }
        // The earlier of the request's own deadline and the call's gRPC deadline.
        // The search stops a margin before the call's gRPC deadline, so that its best answer
        // so far reaches the client before the deadline cuts the call off.
        let rpc_ms = rpc_deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            left.saturating_sub(deadline_margin(left))
                .as_millis()
                .max(1) as u64
        });
        let asked = (req.deadline_ms > 0).then_some(req.deadline_ms);
        config.budget.deadline_ms = match (asked, rpc_ms, config.budget.deadline_ms) {
            (Some(a), Some(r), _) => Some(a.min(r)),
            (a, r, c) => a.or(r).or(c),
        };
        check_limits(&config, l)?;
        config.validate().map_err(|e| invalid("config", e))?;
        Ok(SearchSpec {
            request_id,
            owner: Owner::default(),
            prompt,
            prompt_tokens,
            config,
        })
    }

    fn template(&self, messages: &[ChatMessage]) -> Result<String, Status> {
        self.inner
            .tokenizer
            .apply_chat_template(messages, true)
            .map_err(|e| invalid("messages", e))
    }

    /// Runs one validated search to its end. `events` receives the tree's events.
    pub async fn run(
        &self,
        spec: SearchSpec,
        events: Option<mpsc::Sender<SearchEvent>>,
        cancel: CancelToken,
    ) -> Result<pb::SearchResult, Status> {
        let span = tracing::info_span!("search", request_id = %spec.request_id);
        let result = self.run_search(spec, events, cancel).instrument(span).await;
        if let Err(status) = &result {
            self.count_failure(status);
        }
        result
    }

    /// Counts a search call answered with an error.
    fn count_failure(&self, status: &Status) {
        if let Some(m) = &self.inner.options.metrics {
            m.failed
                .with_label_values(&[super::metrics::code_label(status.code())])
                .inc();
        }
    }

    /// [`Coordinator::validate`], counting a refusal.
    fn admit(
        &self,
        req: &pb::SearchRequest,
        rpc_deadline: Option<Instant>,
    ) -> Result<SearchSpec, Status> {
        self.validate(req, rpc_deadline)
            .inspect_err(|s| self.count_failure(s))
    }

    async fn run_search(
        &self,
        spec: SearchSpec,
        events: Option<mpsc::Sender<SearchEvent>>,
        cancel: CancelToken,
    ) -> Result<pb::SearchResult, Status> {
        let inner = &*self.inner;
        if self.is_draining() {
            return Err(Status::unavailable(
                "the coordinator is shutting down and admits no new searches; send it to \
                 another coordinator",
            ));
        }
        let tap = TreeTap::new();
        let _permit = inner.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} searches are running, the limit; try again later",
                inner.options.limits.searches_max
            ))
        })?;
        let key = (spec.owner, spec.request_id.clone());
        match inner.running.entry(key.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(Status::already_exists(format!(
                    "request_id: a search with id `{}` is running",
                    spec.request_id
                )))
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(RunningSearch {
                    cancel: cancel.clone(),
                    tap: tap.clone(),
                });
                if let Some(m) = &inner.options.metrics {
                    m.running.inc();
                }
            }
        }
        let _running = Running(inner, key);
        // Worker calls may run a moment past the search's deadline: the search ends at its
        // deadline itself (dropping the calls in flight, which stops their decoding) with the
        // termination `budget_deadline` and its best answer so far, rather than seeing its
        // last calls fail first.
        let deadline = spec
            .config
            .budget
            .deadline_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms) + Duration::from_millis(200));
        let remote = RemotePolicy::new(
            inner.pool.clone(),
            spec.prompt_tokens,
            deadline,
            inner.options.step_delimiter.clone(),
        )
        .with_request_id(&spec.request_id);
        let mut control = SearchControl::new().with_cancel(cancel).with_tree_tap(tap);
        if let Some(tx) = events {
            control = control.with_events(tx);
        }
        let mut search = Search::new(spec.prompt, spec.config).map_err(|e| invalid("config", e))?;
        let outcome = search
            .run(&remote, &remote, &control)
            .await
            .map_err(|e| Status::internal(format!("search failed: {e}")))?;
        let tree = search.tree();
        if let Err(e) = tree.check_invariants() {
            inner.invariant_violations.fetch_add(1, Ordering::Relaxed);
            tracing::error!(request_id = %spec.request_id, "tree invariant violated: {e:?}");
        }
        let dump = Arc::new(TreeDump {
            owner: spec.owner,
            request_id: spec.request_id.clone(),
            json: serde_json::to_string(&tree.export()).unwrap_or_default(),
            dot: tree.to_dot(),
        });
        keep_tree(
            &mut inner.trees.lock().expect("trees lock"),
            dump,
            inner.options.trees_kept,
            inner.options.trees_kept_bytes,
        );
        // A search that ended with nothing because its worker calls failed (every worker
        // gone, say: best-of-N whose root expansion failed "completes" with no sample) is an
        // error, not an OK with nothing in it. With an answer it is an OK, whose termination
        // (`too_many_failures`) says when it ended early; one that ran out of budget or time
        // is an OK as always.
        let unanswered = outcome.answer.is_none()
            && (outcome.stats.policy_errors > 0 || outcome.stats.scorer_errors > 0)
            && matches!(
                outcome.termination,
                Termination::TooManyFailures | Termination::Exhausted | Termination::Completed
            );
        if unanswered {
            let (code, last) = remote
                .last_failure()
                .unwrap_or((tonic::Code::Unavailable, "no worker answered".into()));
            // Workers out of reach, full or out of rotation: worth sending again later. A call
            // the workers refused for its content: not.
            let code = match code {
                tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::OutOfRange => tonic::Code::Internal,
                _ => tonic::Code::Unavailable,
            };
            let status = Status::new(
                code,
                format!(
                    "search `{}` found no answer: {} worker calls failed ({} of {} workers \
                     healthy now; the last failure: {last}); its tree is kept for GetTree",
                    spec.request_id,
                    outcome.stats.policy_errors + outcome.stats.scorer_errors,
                    inner.pool.healthy(),
                    inner.pool.members().len(),
                ),
            );
            tracing::warn!(termination = %termination_name(outcome.termination), "{}", status.message());
            self.count_failure(&status);
            return Err(status);
        }
        if let Some(m) = &inner.options.metrics {
            let c = &outcome.costs;
            m.finished
                .with_label_values(&[termination_name(outcome.termination)])
                .inc();
            m.duration.observe(c.wall_us as f64 / 1e6);
            m.tokens.observe(c.generated_tokens as f64);
            m.generation_tokens.inc_by(c.generated_tokens);
        }
        let (hits, wanted) = remote.affinity();
        tracing::info!(
            termination = %termination_name(outcome.termination),
            affinity_hits = hits,
            affinity_wanted = wanted,
            "search finished"
        );
        Ok(result_of(&spec.request_id, &outcome, tree))
    }
}

fn check_limits(c: &SearchConfig, l: &SearchLimits) -> Result<(), Status> {
    let n = |field: &str, v: u32| {
        if v > l.n_max {
            Err(invalid(field, format!("{v}; at most {}", l.n_max)))
        } else {
            Ok(())
        }
    };
    match &c.strategy {
        StrategyConfig::Mcts(m) => n("strategy.expand_k", m.expand_k)?,
        StrategyConfig::BestOfN(s)
        | StrategyConfig::WeightedBestOfN(s)
        | StrategyConfig::SelfConsistency(s) => n("n", s.n)?,
        StrategyConfig::Beam(b) => {
            n("strategy.beam_width", b.beam_width)?;
            n("strategy.proposals_per_beam", b.proposals_per_beam)?;
        }
        StrategyConfig::Dvts(d) => {
            n("n", d.beams)?;
            n("strategy.width", d.width)?;
        }
    }
    if c.max_depth > l.depth_max {
        return Err(invalid(
            "max_depth",
            format!("{}; at most {}", c.max_depth, l.depth_max),
        ));
    }
    if c.budget.max_nodes > l.nodes_max {
        return Err(invalid(
            "budget.nodes",
            format!("{}; at most {}", c.budget.max_nodes, l.nodes_max),
        ));
    }
    if c.sampling.max_step_tokens > l.step_tokens_max {
        return Err(invalid(
            "sampling.max_step_tokens",
            format!(
                "{}; at most {}",
                c.sampling.max_step_tokens, l.step_tokens_max
            ),
        ));
    }
    Ok(())
}

/// The wire form of a search's outcome.
pub fn result_of(
    request_id: &str,
    outcome: &arbor_search::SearchOutcome,
    tree: &arbor_search::Tree,
) -> pb::SearchResult {
    let c = &outcome.costs;
    let a = outcome.answer.as_ref();
    pb::SearchResult {
        request_id: request_id.to_string(),
        answer: a.map(|a| a.answer.raw.clone()).unwrap_or_default(),
        answer_key: a.map(|a| a.answer.key.clone()).unwrap_or_default(),
        value: a.and_then(|a| a.value),
        votes: a.map_or(0, |a| a.votes),
        path: a
            .map(|a| tree.path(a.node).iter().map(|s| s.text.clone()).collect())
            .unwrap_or_default(),
        candidates: outcome
            .candidates
            .iter()
            .map(|t| pb::Candidate {
                answer: t.answer.raw.clone(),
                votes: t.votes,
                weight: t.weight,
            })
            .collect(),
        termination: termination_name(outcome.termination),
        costs: Some(pb::Costs {
            generated_tokens: c.generated_tokens,
            prompt_tokens_sent: c.prompt_tokens_sent,
            prompt_tokens_computed: c.prompt_tokens_computed,
            prompt_tokens_reused: c.prompt_tokens_reused,
            prm_tokens_computed: c.scorer_tokens,
            policy_calls: c.policy_calls,
            scorer_calls: c.scorer_calls,
            nodes: c.nodes,
            wall_ms: c.wall_us / 1000,
        }),
    }
}

fn event_of(e: SearchEvent) -> Option<pb::SearchEvent> {
    use pb::search_event::Event;
    let event = match e {
        SearchEvent::NodeExpanded { node, children } => Event::Expanded(pb::NodeExpanded {
            node: node.get(),
            children: children.into_iter().map(|c| c.get()).collect(),
        }),
        SearchEvent::NodeScored { node, value } => Event::Scored(pb::NodeScored {
            node: node.get(),
            value,
        }),
        SearchEvent::NodeFailed { node, reason } => Event::Failed(pb::NodeFailed {
            node: node.get(),
            reason,
        }),
        SearchEvent::BestAnswer(b) => Event::BestAnswer(pb::BestAnswer {
            answer: b.answer.raw,
            node: b.node.get(),
            value: b.value,
            votes: b.votes,
        }),
        SearchEvent::Finished { .. } => return None,
    };
    Some(pb::SearchEvent { event: Some(event) })
}

/// How long before a call's gRPC deadline its search stops, so that the answer found so far
/// reaches the client before the deadline cuts the call off: a tenth of the time left, at least
/// 300 ms and at most 2 s, and never more than half of it.
pub fn deadline_margin(left: Duration) -> Duration {
    (left / 10)
        .clamp(Duration::from_millis(300), Duration::from_secs(2))
        .min(left / 2)
}

/// A `SearchStream` response: the events, unless the reader has been cut off, which ends the
/// stream with that status (ahead of whatever events are still buffered).
pub struct EventStream {
    abort: Option<tokio::sync::oneshot::Receiver<Status>>,
    rx: mpsc::Receiver<Result<pb::SearchEvent, Status>>,
    done: bool,
}

impl tokio_stream::Stream for EventStream {
    type Item = Result<pb::SearchEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(abort) = self.abort.as_mut() {
            match std::pin::Pin::new(abort).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Err(_)) => self.abort = None,
                Poll::Pending => {}
            }
        }
        self.rx.poll_recv(cx)
    }
}

/// Feeds a `SearchStream` reader without ever making the search wait for it. Events go into
/// the stream's buffer when there is room, else into a backlog; a reader that takes nothing
/// for [`CoordinatorOptions::stream_stall_max`] while events wait, or lets more than
/// [`STREAM_BACKLOG_MAX`] pile up, is cut off (RESOURCE_EXHAUSTED) while the search goes on.
struct StreamFeed {
    out: mpsc::Sender<Result<pb::SearchEvent, Status>>,
    abort: Option<tokio::sync::oneshot::Sender<Status>>,
    backlog: VecDeque<pb::SearchEvent>,
    /// Since when events have been waiting without the reader taking any.
    stalled_since: Option<Instant>,
    stall_max: Duration,
    request_id: String,
    /// The reader was cut off or hung up: nothing more is sent.
    cut: bool,
}

impl StreamFeed {
    /// Moves what fits from the backlog into the stream, and cuts a stalled reader off.
    /// Returns false when the reader has hung up.
    fn flush(&mut self) -> bool {
        if self.cut {
            return true;
        }
        let mut progressed = false;
        while let Some(ev) = self.backlog.pop_front() {
            match self.out.try_send(Ok(ev)) {
                Ok(()) => progressed = true,
                Err(mpsc::error::TrySendError::Full(Ok(ev))) => {
                    self.backlog.push_front(ev);
                    break;
                }
                Err(_) => {
                    self.cut = true;
                    return false;
                }
            }
        }
        if self.backlog.is_empty() || progressed {
            self.stalled_since = None;
        }
        if !self.backlog.is_empty() {
            let since = *self.stalled_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.stall_max || self.backlog.len() > STREAM_BACKLOG_MAX {
                self.cut_off();
            }
        }
        true
    }

    fn cut_off(&mut self) {
        self.cut = true;
        self.backlog.clear();
        tracing::warn!(request_id = %self.request_id, "stream reader too slow: cut off");
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(Status::resource_exhausted(format!(
                "the stream's reader took no events for {:?} while they waited (or let more than \
                 {STREAM_BACKLOG_MAX} pile up), so it was cut off; the search `{}` goes on to its \
                 end: read its tree and answer with GetTree",
                self.stall_max, self.request_id
            )));
        }
    }
}

#[tonic::async_trait]
impl SearchRpc for Coordinator {
    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResult>, Status> {
        let deadline = grpc_deadline(&request);
        let mut spec = self.admit(request.get_ref(), deadline)?;
        spec.owner = Owner::of(&request);
        // A client that goes away drops this future, and with it the search and its calls.
        let result = self.run(spec, None, CancelToken::new()).await?;
        Ok(Response::new(result))
    }

    type SearchStreamStream = EventStream;

    async fn search_stream(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = grpc_deadline(&request);
        let mut spec = self.admit(request.get_ref(), deadline)?;
        spec.owner = Owner::of(&request);
        if self.is_draining() {
            let status =
                Status::unavailable("the coordinator is shutting down and admits no new searches");
            self.count_failure(&status);
            return Err(status);
        }
        let o = &self.inner.options;
        let (out, rx) = mpsc::channel(o.stream_buffer.max(1));
        let (abort_tx, abort_rx) = tokio::sync::oneshot::channel();
        let mut feed = StreamFeed {
            out,
            abort: Some(abort_tx),
            backlog: VecDeque::new(),
            stalled_since: None,
            stall_max: o.stream_stall_max,
            request_id: spec.request_id.clone(),
            cut: false,
        };
        let coordinator = self.clone();
        let cancel = CancelToken::new();
        tokio::spawn(async move {
            let (ev_tx, mut ev_rx) = mpsc::channel(1024);
            let search = coordinator.run(spec, Some(ev_tx), cancel.clone());
            tokio::pin!(search);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let result = loop {
                // Never waits on the reader: the search is polled whatever the stream's state.
                tokio::select! {
                    result = &mut search => break result,
                    Some(ev) = ev_rx.recv() => {
                        if !feed.cut {
                            if let Some(ev) = event_of(ev) {
                                feed.backlog.push_back(ev);
                            }
                        }
                    }
                    _ = feed.out.closed(), if !feed.cut => {
                        // The client hung up: stop the search (and the workers' decoding).
                        feed.cut = true;
                        cancel.cancel();
                    }
                    _ = tick.tick(), if !feed.cut && !feed.backlog.is_empty() => {}
                }
                if !feed.flush() {
                    cancel.cancel();
                }
            };
            if feed.cut {
                return;
            }
            // The search is over: the rest of its events, then its result, as the reader takes
            // them (a reader that stalls as long as the rule allows is cut off).
            while let Ok(ev) = ev_rx.try_recv() {
                if let Some(ev) = event_of(ev) {
                    feed.backlog.push_back(ev);
                }
            }
            let last = result.map(|r| pb::SearchEvent {
                event: Some(pb::search_event::Event::Result(r)),
            });
            let items = feed.backlog.drain(..).map(Ok).collect::<Vec<_>>();
            for item in items.into_iter().chain(std::iter::once(last)) {
                match tokio::time::timeout(feed.stall_max, feed.out.send(item)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        feed.cut_off();
                        return;
                    }
                }
            }
        });
        Ok(Response::new(EventStream {
            abort: Some(abort_rx),
            rx,
            done: false,
        }))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let owner = Owner::of(&request);
        let id = request.get_ref().request_id.clone();
        if let Some(search) = self.inner.running.get(&(owner, id.clone())) {
            search.cancel.cancel();
            return Ok(Response::new(pb::CancelResponse { cancelled: true }));
        }
        let finished = self
            .inner
            .trees
            .lock()
            .expect("trees lock")
            .iter()
            .any(|t| t.owner == owner && t.request_id == id);
        if finished {
            return Ok(Response::new(pb::CancelResponse { cancelled: false }));
        }
        Err(Status::not_found(format!(
            "no running or finished search with request_id `{id}`"
        )))
    }

    async fn get_tree(
        &self,
        request: Request<pb::GetTreeRequest>,
    ) -> Result<Response<pb::GetTreeResponse>, Status> {
        let owner = Owner::of(&request);
        let req = request.into_inner();
        let format = pb::TreeFormat::try_from(req.format)
            .map_err(|_| invalid("format", format!("unknown value {}", req.format)))?;
        // A running search first: a client may reuse the id of a finished one. It copies its
        // tree at the end of a round, at most every 100 ms. A search that ends meanwhile has
        // stored its tree before leaving the running set, so one of the two lookups finds it.
        let tap = self
            .inner
            .running
            .get(&(owner, req.request_id.clone()))
            .map(|r| r.tap.clone());
        let Some(tap) = tap else {
            let found = self
                .inner
                .trees
                .lock()
                .expect("trees lock")
                .iter()
                .find(|t| t.owner == owner && t.request_id == req.request_id)
                .cloned();
            let Some(dump) = found else {
                return Err(Status::not_found(format!(
                    "no running or finished search with request_id `{}` (the coordinator keeps \
                     the last {} finished, in at most {} bytes of renderings)",
                    req.request_id,
                    self.inner.options.trees_kept,
                    self.inner.options.trees_kept_bytes
                )));
            };
            let tree = match format {
                pb::TreeFormat::Json => dump.json.clone(),
                pb::TreeFormat::Dot => dump.dot.clone(),
            };
            check_tree_size(
                &req.request_id,
                &tree,
                self.inner.options.tree_response_bytes_max,
            )?;
            return Ok(Response::new(pb::GetTreeResponse {
                tree,
                running: false,
            }));
        };
        let (tree, finished) = tokio::time::timeout(TREE_WAIT, tap.snapshot())
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "search `{}` did not finish its first round within {} s, so there is no \
                     consistent copy of its tree yet; try again",
                    req.request_id,
                    TREE_WAIT.as_secs()
                ))
            })?;
        let tree = match format {
            pb::TreeFormat::Json => serde_json::to_string(&tree.export())
                .map_err(|e| Status::internal(format!("rendering the tree: {e}")))?,
            pb::TreeFormat::Dot => tree.to_dot(),
        };
        check_tree_size(
            &req.request_id,
            &tree,
            self.inner.options.tree_response_bytes_max,
        )?;
        Ok(Response::new(pb::GetTreeResponse {
            tree,
            running: !finished,
        }))
    }
}

/// Serves the coordinator (with health, and reflection if asked) on `listener` until
/// `shutdown` completes, over TLS when `tls` is given; then drains (see [`drain`]).
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    reflection: bool,
    tls: Option<&super::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = super::worker::server_builder(tls)?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(super::LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    // Serving while at least one worker is healthy, so a load balancer in front of several
    // coordinators routes around one whose workers are all gone.
    let pool = coordinator.pool().clone();
    let watched = coordinator.clone();
    let watch_reporter = reporter.clone();
    let watcher = tokio::spawn(async move {
        let mut serving = None;
        loop {
            if watched.is_draining() {
                return;
            }
            let now = pool.healthy() > 0;
            if serving != Some(now) {
                if now {
                    watch_reporter
                        .set_serving::<SearchServer<Coordinator>>()
                        .await;
                } else {
                    watch_reporter
                        .set_not_serving::<SearchServer<Coordinator>>()
                        .await;
                }
                serving = Some(now);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    let reflection_service = reflection.then(super::reflection_service);
    let auth = coordinator.inner.options.auth.clone();
    let service = tonic::service::interceptor::InterceptedService::new(
        coordinator.clone().into_server(),
        super::auth::Tokens::interceptor(auth),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_service(health)
        .add_optional_service(reflection_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stop_rx.await;
            },
        );
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => {
            watcher.abort();
            return served;
        }
        () = shutdown => {}
    }
    // Draining: not serving to probes and load balancers, no new searches, running ones
    // finish (or, past the drain timeout, are cancelled and end with their best answer).
    coordinator.start_draining();
    watcher.abort();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    reporter
        .set_not_serving::<SearchServer<Coordinator>>()
        .await;
    let drain_timeout = coordinator.inner.options.drain_timeout;
    let running = coordinator.running();
    eprintln!(
        "arbor: draining: health NOT_SERVING, no new searches, {running} running (waiting up to \
         {drain_timeout:?})"
    );
    let c = coordinator.clone();
    let drained = drain(&mut server, drain_timeout, move || c.running() == 0).await;
    if let Some(served) = drained {
        return served;
    }
    if coordinator.running() > 0 {
        eprintln!(
            "arbor: drain timeout: cancelling {} searches (they end with their best answer so far)",
            coordinator.running()
        );
        coordinator.cancel_all();
        let c = coordinator.clone();
        if let Some(served) = drain(&mut server, Duration::from_secs(5), move || {
            c.running() == 0
        })
        .await
        {
            return served;
        }
    }
    let _ = stop_tx.send(());
    // Answers still on their way get a moment; connections kept open by idle clients do not
    // hold the process.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(served) => served,
        Err(_) => Ok(()),
    }
}

/// Keeps `server` running until `done()` holds or `timeout` passes; `Some` if the server
/// stopped by itself meanwhile.
pub(crate) async fn drain<F>(
    server: &mut std::pin::Pin<&mut F>,
    timeout: Duration,
    done: impl Fn() -> bool,
) -> Option<F::Output>
where
    F: std::future::Future,
{
    let until = Instant::now() + timeout;
    while !done() && Instant::now() < until {
        tokio::select! {
            served = server.as_mut() => return Some(served),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    None
}

/// The address a listener is bound to.
pub fn local_addr(listener: &tokio::net::TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

#[cfg(test)]
mod tree_store_tests {
    use super::*;

    fn dump(owner: Option<u32>, id: &str, size: usize) -> Arc<TreeDump> {
        Arc::new(TreeDump {
            owner: Owner(owner),
            request_id: id.into(),
            json: "j".repeat(size),
            dot: String::new(),
        })
    }

    fn ids(trees: &VecDeque<Arc<TreeDump>>) -> Vec<&str> {
        trees.iter().map(|t| t.request_id.as_str()).collect()
    }

    /// Kept trees are bounded by count and by bytes, the oldest dropped first; a tree larger
    /// than the byte bound is not kept; a finished id replaces its earlier tree.
    #[test]
    fn kept_trees_stay_within_their_count_and_bytes() {
        let mut trees = VecDeque::new();
        for id in ["a", "b", "c"] {
            keep_tree(&mut trees, dump(None, id, 999), 8, 3000);
        }
        assert_eq!(ids(&trees), ["a", "b", "c"]);
        keep_tree(&mut trees, dump(None, "d", 999), 8, 3000);
        assert_eq!(
            ids(&trees),
            ["b", "c", "d"],
            "4000 bytes > 3000: the oldest goes"
        );
        keep_tree(&mut trees, dump(None, "e", 1), 2, 3000);
        assert_eq!(ids(&trees), ["d", "e"], "count bound");
        keep_tree(&mut trees, dump(Some(1), "e", 1), 8, 3000);
        assert_eq!(
            ids(&trees),
            ["d", "e", "e"],
            "another owner's id is another search"
        );
        keep_tree(&mut trees, dump(None, "e", 5), 8, 3000);
        assert_eq!(trees.len(), 3, "the same owner's id replaces its tree");
        keep_tree(&mut trees, dump(None, "huge", 4000), 8, 3000);
        assert!(trees.is_empty(), "{:?}", ids(&trees));
        assert!(trees.iter().map(|t| t.bytes()).sum::<usize>() <= 3000);
    }

    #[test]
    fn a_tree_rendering_past_the_limit_is_refused_naming_it() {
        assert!(check_tree_size("s", &"x".repeat(100), 100).is_ok());
        let e = check_tree_size("s", &"x".repeat(101), 100).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("101 bytes") && e.message().contains("tree_response_bytes_max"),
            "{}",
            e.message()
        );
    }
}

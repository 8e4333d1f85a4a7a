//! The coordinator's worker pool: membership from a static list or a DNS name, health checks,
//! least-outstanding routing with subtree affinity, and re-dispatch of failed calls.
//!
//! One [`RemotePolicy`] per search implements the search crate's `Policy` and `Scorer` over the
//! pool. A node's children are sent to the worker that generated the node (it holds the node's
//! prefix in its cache); a call that fails on one worker (it died, it is overloaded) is sent to
//! another under the same expansion id. Sampling seeds travel with each node, so a search gives
//! the same tree whichever workers serve it.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use arbor_search::{
    Policy, PolicyCost, PolicyError, Proposals, ProposeRequest, ProposedStep, ScoreCost,
    ScoreError, ScoreRequest, Scorer, StepScores, StepStop,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tracing::Instrument;

use super::pb;
use super::pb::worker_client::WorkerClient;
use super::worker::{REQUEST_ID_HEADER, TOKENIZER_MISMATCH, WEIGHTS_MISMATCH};

/// Where workers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerSpec {
    /// One worker at a URL (`http://10.0.0.5:50051`).
    Url(String),
    /// Every address a name resolves to, re-resolved at each health check
    /// (`dns://arbor-workers.default.svc:50051`: a Kubernetes headless service).
    Dns {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
    },
}

impl std::str::FromStr for WorkerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("dns://") {
            let rest = rest.trim_start_matches('/');
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{s}: a dns:// worker needs a port (dns://NAME:PORT)"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{s}: `{port}` is not a port number"))?;
            if host.is_empty() {
                return Err(format!("{s}: empty host name"));
            }
            return Ok(WorkerSpec::Dns {
                host: host.to_string(),
                port,
            });
        }
        let url = if s.contains("://") {
            s.to_string()
        } else {
            format!("http://{s}")
        };
        Endpoint::from_shared(url.clone()).map_err(|e| format!("{s}: not a worker URL: {e}"))?;
        Ok(WorkerSpec::Url(url))
    }
}

/// What resolves a `dns://` name to addresses: the system's resolver by default
/// ([`PoolOptions::resolver`]); another service discovery, or a test, may supply its own.
#[derive(Clone)]
pub struct Resolver(
    #[allow(clippy::type_complexity)]
    pub  Arc<
        dyn Fn(
                String,
                u16,
            ) -> std::pin::Pin<
                Box<
                    dyn std::future::Future<Output = std::io::Result<Vec<std::net::SocketAddr>>>
                        + Send,
                >,
            > + Send
            + Sync,
    >,
);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// How often each worker's health is checked (and DNS names re-resolved).
    pub health_interval: Duration,
    /// Most workers one call is tried on before it fails.
    pub attempts: usize,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// The coordinator's tokenizer (`Tokenizer::fingerprint`). When set, a worker gets work only
    /// once its `ModelInfo` reports the same fingerprint: token ids from a worker with another
    /// tokenizer would mean other text, and a search mixing them would be garbage. A worker
    /// that reports another is left out (logged, and named by [`Member::incompatible`]) and
    /// checked again after it restarts.
    pub tokenizer_fingerprint: Option<String>,
    /// TLS for `https://` workers (and for `dns://` ones, which are then reached over TLS and
    /// must present a certificate for the DNS name). `https://` workers without it are checked
    /// against the public web's roots.
    pub tls: Option<super::tls::ClientTls>,
    /// The bearer token sent to workers (`authorization: Bearer …` on every `Expand`, `Score`
    /// and `ModelInfo` call; health checks stay open). `None`: no token.
    pub auth_token: Option<String>,
    /// The first re-send waits about this long (jittered), each next one twice as long.
    pub backoff_base: Duration,
    /// The longest wait before a re-send.
    pub backoff_max: Duration,
    /// The retry budget: re-sends stop while this many or more of the last tokens are spent.
    /// Each failed attempt that would be re-sent spends one token, each success gives back
    /// [`PoolOptions::retry_token_ratio`], up to this many tokens (gRPC's retry throttling:
    /// once half the budget is spent, failures are returned instead of re-sent, so a pool
    /// that fails everything is not hammered with copies).
    pub retry_tokens_max: f64,
    /// Tokens a successful call gives back to the retry budget.
    pub retry_token_ratio: f64,
    /// Most time one worker call may take when the search has no deadline (and the cap on it
    /// when it has one): a worker that stops answering without closing its connection is
    /// given up on after this, and the call re-sent elsewhere.
    pub call_timeout: Duration,
    /// HTTP/2 keepalive ping period on worker connections: a worker that stops answering pings
    /// for [`PoolOptions::keepalive_timeout`] more (a stopped process, a dead host) has its
    /// connection closed and its calls re-sent, within seconds.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// Resolves `dns://` names; `None`: the system's resolver.
    pub resolver: Option<Resolver>,
    /// Where the pool records its calls, retries and members (`--metrics-listen`); `None`:
    /// nowhere.
    pub metrics: Option<super::metrics::PoolMetrics>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            health_interval: Duration::from_secs(2),
            attempts: 3,
            connect_timeout: Duration::from_secs(3),
            tokenizer_fingerprint: None,
            tls: None,
            auth_token: None,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            retry_tokens_max: 10.0,
            retry_token_ratio: 0.1,
            call_timeout: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(3),
            resolver: None,
            metrics: None,
        }
    }
}

/// Whether a worker's tokenizer matches the coordinator's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Compat {
    /// Not asked yet (or asked before the worker last went down).
    Unknown,
    /// Same fingerprint (or no fingerprint expected).
    Same,
    /// Another tokenizer: why, for the log and [`Member::incompatible`].
    Different(String),
}

/// One worker as the pool sees it.
#[derive(Debug)]
pub struct Member {
    url: String,
    client: WorkerClient<Channel>,
    health: HealthClient<Channel>,
    healthy: AtomicBool,
    outstanding: AtomicUsize,
    calls: AtomicU64,
    failures: AtomicU64,
    compat: Mutex<Compat>,
    /// The weights fingerprint its `ModelInfo` reported (empty: not asked, or not reported).
    weights: Mutex<String>,
    /// Why the last health check failed (empty when it passed).
    last_error: Mutex<String>,
    /// Whether it is reached with a client certificate.
    client_certificate: bool,
    /// The DNS name it was resolved from (`dns://` workers).
    dns_name: Option<String>,
    /// Until when it is known to be full (it answered RESOURCE_EXHAUSTED): work goes to others
    /// meanwhile when there are any.
    busy_until: Mutex<Option<Instant>>,
}

impl Member {
    /// A member at `url`; `domain` is the name its TLS certificate must carry when that is not
    /// the URL's host (a `dns://` worker reached by address).
    fn new(url: String, options: &PoolOptions, domain: Option<&str>) -> Result<Member, String> {
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("{url}: {e}"))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(options.keepalive_interval)
            .keep_alive_timeout(options.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(10)));
        if url.starts_with("https://") {
            let tls = options.tls.clone().unwrap_or_default();
            endpoint = endpoint
                .tls_config(tls.config(domain))
                .map_err(|e| format!("{url}: {}", super::tls::error_chain(&e)))?;
        }
        let channel = endpoint.connect_lazy();
        Ok(Member {
            client: WorkerClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            health: HealthClient::new(channel),
            url,
            healthy: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            compat: Mutex::new(Compat::Unknown),
            weights: Mutex::new(String::new()),
            last_error: Mutex::new(String::new()),
            client_certificate: options.tls.as_ref().is_some_and(|t| t.has_identity()),
            dns_name: None,
            busy_until: Mutex::new(None),
        })
    }

    /// Why its last health check failed (a refused connection, a TLS handshake the
    /// certificates did not pass, a worker not serving); `None` when it passed.
    pub fn last_error(&self) -> Option<String> {
        let e = self.last_error.lock().expect("last_error lock");
        (!e.is_empty()).then(|| e.clone())
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether its last health check (or call) succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Calls that failed on this worker.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether it said RESOURCE_EXHAUSTED recently (and its back-off has not run out).
    fn is_busy(&self, now: Instant) -> bool {
        self.busy_until
            .lock()
            .expect("busy lock")
            .is_some_and(|t| t > now)
    }

    /// Calls sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Why this worker gets no work although it answers: it runs another tokenizer than the
    /// coordinator's (see [`PoolOptions::tokenizer_fingerprint`]), or other weights than the
    /// first worker the pool verified (see [`WorkerPool::weights_fingerprint`]).
    pub fn incompatible(&self) -> Option<String> {
        match &*self.compat.lock().expect("compat lock") {
            Compat::Different(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// Checks health and, once per time the worker comes up, that it runs the expected
    /// tokenizer (and notes the weights it reports). True when both hold; the pool then
    /// checks its weights ([`WorkerPool::refresh`]) before it counts as healthy.
    async fn check(
        &self,
        timeout: Duration,
        expected: Option<&str>,
        auth: Option<&AuthHeader>,
    ) -> bool {
        let mut h = self.health.clone();
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: "arbor.v1.Worker".into(),
        });
        req.set_timeout(timeout);
        let error = match tokio::time::timeout(timeout, h.check(req)).await {
            Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => String::new(),
            Ok(Ok(r)) => format!("health status {}", r.get_ref().status),
            Ok(Err(status)) => {
                let why = super::tls::status_reason(&status);
                let https = self.url.starts_with("https://");
                let hint = super::tls::worker_hint(&why, https, self.client_certificate);
                format!("{why}{hint}")
            }
            Err(_) => format!("no health answer within {timeout:?}"),
        };
        let serving = error.is_empty();
        *self.last_error.lock().expect("last_error lock") = error;
        if !serving {
            // It may come back running another model.
            *self.compat.lock().expect("compat lock") = Compat::Unknown;
            self.healthy.store(false, Ordering::SeqCst);
            return false;
        }
        let known = self.compat.lock().expect("compat lock").clone();
        let compat = match (expected, known) {
            (None, _) => Compat::Same,
            (Some(_), Compat::Same) => Compat::Same,
            (Some(_), Compat::Different(why)) => Compat::Different(why),
            (Some(expected), Compat::Unknown) => {
                let mut c = self.client.clone();
                let mut req = tonic::Request::new(pb::ModelInfoRequest {});
                req.set_timeout(timeout);
                if let Some(auth) = auth {
                    req.metadata_mut().insert("authorization", auth.clone());
                }
                match tokio::time::timeout(timeout, c.model_info(req)).await {
                    Ok(Ok(info)) => {
                        let info = info.into_inner();
                        if info.tokenizer_fingerprint == expected {
                            *self.weights.lock().expect("weights lock") = info.weights_fingerprint;
                            Compat::Same
                        } else {
                            let why = format!(
                                "runs another tokenizer than the coordinator's (its model: {}, \
                                 vocabulary {}; tokenizer fingerprint {:?}, expected {expected:?}), \
                                 so it gets no work: start it with the coordinator's model",
                                info.source, info.vocab_size, info.tokenizer_fingerprint
                            );
                            tracing::error!(worker = %self.url, "{why}");
                            Compat::Different(why)
                        }
                    }
                    // Not verified yet: no work until a later check verifies it.
                    _ => Compat::Unknown,
                }
            }
        };
        let ok = compat == Compat::Same;
        *self.compat.lock().expect("compat lock") = compat;
        if !ok {
            self.healthy.store(false, Ordering::SeqCst);
        }
        ok
    }
}

/// The `authorization` header value sent to workers.
type AuthHeader = tonic::metadata::AsciiMetadataValue;

struct PoolInner {
    specs: Vec<WorkerSpec>,
    options: PoolOptions,
    members: RwLock<Vec<Arc<Member>>>,
    auth: Option<AuthHeader>,
    /// The retry budget's tokens (see [`PoolOptions::retry_tokens_max`]).
    retry_tokens: Mutex<f64>,
    retries: AtomicU64,
    retries_refused: AtomicU64,
    /// The weights fingerprint of the first worker verified, and that worker's URL: every
    /// other member must report the same.
    weights: Mutex<Option<(String, String)>>,
}

/// How a failed worker call is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connection failed or the worker said UNAVAILABLE: the worker leaves the rotation
    /// until a health check passes, and the call is re-sent elsewhere.
    WorkerDown,
    /// The worker is full: it gets no new work for a back-off, the call is re-sent (to a
    /// worker that is not known to be full, or after the back-off).
    Busy,
    /// A failure the request may have caused (INTERNAL, UNKNOWN, ABORTED from the worker):
    /// re-sent elsewhere within the retry budget, the worker stays in rotation.
    Request,
    /// The call's own deadline (or its per-call timeout) passed.
    Timeout,
    /// Final: bad input, cancelled, refused for a precondition. Not re-sent; the worker stays.
    Final,
}

/// Whether a worker at `url` reporting weights fingerprint `reported` may join a pool whose
/// first verified worker is `pinned` (fingerprint, URL); the first one pins it. A worker that
/// reports none (an older worker) is let in. The error names both fingerprints and workers.
fn admit_weights(
    pinned: &mut Option<(String, String)>,
    url: &str,
    reported: &str,
) -> Result<(), String> {
    if reported.is_empty() {
        return Ok(());
    }
    match pinned {
        None => {
            *pinned = Some((reported.to_string(), url.to_string()));
            Ok(())
        }
        Some((want, first)) if want != reported => Err(format!(
            "runs other weights than the pool's: weights fingerprint {reported:?}, while the \
             first worker verified ({first}) runs {want:?}; a search must not mix two models, \
             so it gets no work: start it with the same model as the other workers (or restart \
             the coordinator to pool the new model)"
        )),
        Some(_) => Ok(()),
    }
}

/// Classifies a failed call. A status the worker sent has no `source`; one tonic made from a
/// local error (connection refused or reset, an HTTP/2 error, a keepalive timeout) carries
/// the error as its source, except that the call's own timeout is CANCELLED with a
/// `TimeoutExpired` source.
fn classify(status: &Status) -> Failure {
    use std::error::Error as _;
    let mut source = status.source();
    let local = source.is_some();
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return Failure::Timeout;
        }
        source = e.source();
    }
    match status.code() {
        Code::Unavailable => Failure::WorkerDown,
        // A local error of any other code is the transport failing (a reset connection, an
        // HTTP/2 protocol error), not an answer from the worker.
        _ if local => Failure::WorkerDown,
        Code::ResourceExhausted => Failure::Busy,
        Code::DeadlineExceeded => Failure::Timeout,
        Code::Internal | Code::Unknown | Code::Aborted => Failure::Request,
        _ => Failure::Final,
    }
}

/// The workers a coordinator uses. Cheap to clone.
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("specs", &self.inner.specs)
            .finish()
    }
}

impl WorkerPool {
    /// The fingerprint every call carries ([`PoolOptions::tokenizer_fingerprint`]; empty: none).
    fn tokenizer_fingerprint(&self) -> String {
        self.inner
            .options
            .tokenizer_fingerprint
            .clone()
            .unwrap_or_default()
    }

    /// Resolves the members, checks their health once, and starts the health loop (on the
    /// current tokio runtime; it stops when the last clone of the pool is dropped).
    pub async fn connect(specs: Vec<WorkerSpec>, options: PoolOptions) -> Result<Self, String> {
        if specs.is_empty() {
            return Err("no workers given".into());
        }
        let pool =
            WorkerPool {
                inner: Arc::new(PoolInner {
                    specs,
                    auth: match &options.auth_token {
                        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                            "the workers' token is not printable ASCII".to_string()
                        })?),
                        None => None,
                    },
                    retry_tokens: Mutex::new(options.retry_tokens_max),
                    options,
                    members: RwLock::new(Vec::new()),
                    retries: AtomicU64::new(0),
                    retries_refused: AtomicU64::new(0),
                    weights: Mutex::new(None),
                }),
            };
        pool.refresh().await;
        let weak: Weak<PoolInner> = Arc::downgrade(&pool.inner);
        let interval = pool.inner.options.health_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                WorkerPool { inner }.refresh().await;
            }
        });
        Ok(pool)
    }

    /// Re-resolves DNS names and checks every member's health.
    pub async fn refresh(&self) {
        let options = &self.inner.options;
        // (URL, the name its certificate must carry when not the URL's host).
        let mut urls: Vec<(String, Option<String>)> = Vec::new();
        // `dns://` workers are reached by address: over TLS when the pool has TLS settings,
        // their certificates checked against the DNS name.
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        for spec in &self.inner.specs {
            match spec {
                WorkerSpec::Url(u) => urls.push((u.clone(), None)),
                WorkerSpec::Dns { host, port } => {
                    let resolved = match &options.resolver {
                        Some(r) => (r.0)(host.clone(), *port).await,
                        None => tokio::net::lookup_host((host.as_str(), *port))
                            .await
                            .map(|a| a.collect()),
                    };
                    match resolved {
                        Ok(addrs) => urls.extend(
                            addrs
                                .into_iter()
                                .map(|a| (format!("{scheme}://{a}"), Some(host.clone()))),
                        ),
                        Err(e) => {
                            // A failed lookup (a DNS server down, a timeout) says nothing about
                            // the workers: keep the members the name last resolved to (their
                            // health checks still decide whether they get work).
                            let kept: Vec<(String, Option<String>)> = self
                                .members()
                                .iter()
                                .filter(|m| m.dns_name.as_deref() == Some(host.as_str()))
                                .map(|m| (m.url.clone(), Some(host.clone())))
                                .collect();
                            tracing::warn!(
                                %host,
                                kept = kept.len(),
                                "resolving workers failed, keeping the last known members: {e}"
                            );
                            urls.extend(kept);
                        }
                    }
                }
            }
        }
        urls.sort();
        urls.dedup();
        let members: Vec<Arc<Member>> = {
            let current = self.inner.members.read().expect("members lock");
            urls.into_iter()
                .filter_map(|(u, domain)| match current.iter().find(|m| m.url == u) {
                    Some(m) => Some(m.clone()),
                    None => Member::new(u, options, domain.as_deref())
                        .map_err(|e| tracing::warn!("worker {e}"))
                        .ok()
                        .map(|mut m| {
                            m.dns_name = domain;
                            Arc::new(m)
                        }),
                })
                .collect()
        };
        let timeout = options.health_interval.min(Duration::from_secs(2));
        let expected = options.tokenizer_fingerprint.as_deref();
        let auth = self.inner.auth.as_ref();
        let checks = members.iter().map(|m| m.check(timeout, expected, auth));
        let passed = futures_util::future::join_all(checks).await;
        self.settle_weights(&members, &passed);
        if let Some(m) = &options.metrics {
            let (mut healthy, mut unhealthy, mut incompatible) = (0, 0, 0);
            for member in &members {
                if member.is_healthy() {
                    healthy += 1;
                } else if member.incompatible().is_some() {
                    incompatible += 1;
                } else {
                    unhealthy += 1;
                }
            }
            m.workers.with_label_values(&["healthy"]).set(healthy);
            m.workers.with_label_values(&["unhealthy"]).set(unhealthy);
            m.workers
                .with_label_values(&["incompatible"])
                .set(incompatible);
        }
        *self.inner.members.write().expect("members lock") = members;
    }

    /// Puts the members whose checks `passed` into rotation, except those whose weights differ
    /// from the first worker verified (the first in member order, when several come up in the
    /// same check): they are named and get no work.
    fn settle_weights(&self, members: &[Arc<Member>], passed: &[bool]) {
        let mut pinned = self.inner.weights.lock().expect("weights lock");
        for (m, &ok) in members.iter().zip(passed) {
            if !ok {
                continue;
            }
            let reported = m.weights.lock().expect("weights lock").clone();
            if let Err(why) = admit_weights(&mut pinned, &m.url, &reported) {
                tracing::error!(worker = %m.url, "{why}");
                *m.compat.lock().expect("compat lock") = Compat::Different(why);
                m.healthy.store(false, Ordering::SeqCst);
                continue;
            }
            m.healthy.store(true, Ordering::SeqCst);
        }
    }

    /// The weights fingerprint every member must report: the first verified worker's (`None`
    /// until one is). Calls carry it, so a worker restarted with other weights between two
    /// health checks refuses them.
    pub fn weights_fingerprint(&self) -> Option<String> {
        self.inner
            .weights
            .lock()
            .expect("weights lock")
            .as_ref()
            .map(|(fp, _)| fp.clone())
    }

    /// The current members.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.inner.members.read().expect("members lock").clone()
    }

    /// Members whose last check succeeded.
    pub fn healthy(&self) -> usize {
        self.members().iter().filter(|m| m.is_healthy()).count()
    }

    /// The member to send work to: `preferred` if it is healthy and not excluded, else the
    /// healthy one with the fewest outstanding calls (plus `extra` work already planned for it).
    fn pick(
        &self,
        preferred: Option<&str>,
        exclude: &[String],
        extra: &HashMap<String, usize>,
    ) -> Option<Arc<Member>> {
        let members = self.members();
        let now = Instant::now();
        let usable = |m: &&Arc<Member>| m.is_healthy() && !exclude.contains(&m.url);
        if let Some(p) = preferred {
            if let Some(m) = members
                .iter()
                .filter(usable)
                .find(|m| m.url == p && !m.is_busy(now))
            {
                return Some(m.clone());
            }
        }
        // Workers that said they are full come last, the one free soonest first among them.
        members
            .iter()
            .filter(usable)
            .min_by_key(|m| {
                let busy = *m.busy_until.lock().expect("busy lock");
                (
                    busy.filter(|&t| t > now),
                    m.outstanding() + extra.get(&m.url).copied().unwrap_or(0),
                )
            })
            .cloned()
    }

    /// Re-sends made, and re-sends the retry budget refused.
    pub fn retries(&self) -> (u64, u64) {
        (
            self.inner.retries.load(Ordering::Relaxed),
            self.inner.retries_refused.load(Ordering::Relaxed),
        )
    }

    /// Whether the retry budget allows one more re-send; spends a token if so.
    fn spend_retry(&self) -> bool {
        let max = self.inner.options.retry_tokens_max;
        let mut tokens = self.inner.retry_tokens.lock().expect("retry lock");
        let metrics = self.inner.options.metrics.as_ref();
        if *tokens > max / 2.0 {
            *tokens -= 1.0;
            self.inner.retries.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = metrics {
                m.retries.inc();
            }
            true
        } else {
            self.inner.retries_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = metrics {
                m.retries_refused.inc();
            }
            false
        }
    }

    fn call_succeeded(&self) {
        let o = &self.inner.options;
        let mut tokens = self.inner.retry_tokens.lock().expect("retry lock");
        *tokens = (*tokens + o.retry_token_ratio).min(o.retry_tokens_max);
    }

    /// The wait before re-send number `attempt` (1, 2, …): exponential from
    /// [`PoolOptions::backoff_base`], capped at [`PoolOptions::backoff_max`], with jitter (half
    /// fixed, half random) so that calls failed together are not re-sent together.
    fn backoff(&self, attempt: u32) -> Duration {
        use rand::Rng;
        let o = &self.inner.options;
        let exp = o
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(o.backoff_max);
        let half = exp / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }

    /// Sends one call, re-sending it when it fails in a way another attempt could fix (see
    /// [`Failure`]): after a back-off with jitter, to another worker where there is one, within
    /// [`PoolOptions::attempts`] and the pool's retry budget. Only a failed connection or
    /// UNAVAILABLE takes a worker out of rotation.
    async fn call<T, F, Fut>(
        &self,
        method: &'static str,
        request_id: Option<&AuthHeader>,
        first: Arc<Member>,
        deadline: Option<Instant>,
        mut send: F,
    ) -> Result<(T, Arc<Member>), Status>
    where
        F: FnMut(WorkerClient<Channel>, CallMeta) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let options = &self.inner.options;
        let mut member = first;
        let mut tried: Vec<String> = Vec::new();
        let mut attempt = 0u32;
        loop {
            let remaining = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => return Err(Status::deadline_exceeded("the search's deadline passed")),
                },
                None => None,
            };
            // The search's deadline, capped by the per-call timeout: a worker that stops
            // answering (a stopped process) is given up on even when the search has no deadline.
            let timeout = remaining.map_or(options.call_timeout, |r| r.min(options.call_timeout));
            let per_call_timeout = remaining.is_none_or(|r| r > options.call_timeout);
            member.calls.fetch_add(1, Ordering::Relaxed);
            let guard = Outstanding::new(&member, options.metrics.as_ref());
            let started = Instant::now();
            let meta = CallMeta {
                timeout,
                auth: self.inner.auth.clone(),
                request_id: request_id.cloned(),
            };
            tracing::debug!(worker = %member.url, attempt, "{method} sent");
            // The timeout travels as `grpc-timeout` and is enforced here too, so a worker that
            // never answers (not even with its own deadline error) cannot hold the call.
            let result = match tokio::time::timeout(
                timeout + Duration::from_millis(200),
                send(member.client.clone(), meta),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer from worker {} within {timeout:?}",
                    member.url
                ))),
            };
            drop(guard);
            if let Some(m) = &options.metrics {
                let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
                m.calls
                    .with_label_values(&[method, super::metrics::code_label(code)])
                    .inc();
                m.call_duration
                    .with_label_values(&[method])
                    .observe(started.elapsed().as_secs_f64());
            }
            let status = match result {
                Ok(v) => {
                    self.call_succeeded();
                    return Ok((v, member));
                }
                Err(s) => s,
            };
            member.failures.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            // A worker that now runs another tokenizer (restarted with another model since its
            // last check) refuses the call: out of rotation, named, and the call goes elsewhere.
            let other_tokenizer = status.code() == Code::FailedPrecondition
                && (status.message().starts_with(TOKENIZER_MISMATCH)
                    || status.message().starts_with(WEIGHTS_MISMATCH));
            let mut failure = classify(&status);
            if failure == Failure::Timeout && per_call_timeout && started.elapsed() >= timeout {
                // Not the search's deadline: the per-call timeout of a worker that stopped
                // answering.
                failure = Failure::WorkerDown;
            }
            let retry = match failure {
                Failure::WorkerDown => {
                    // Gone or broken: out of rotation until a health check says otherwise
                    // (and, as it may have restarted with another model, checks its tokenizer
                    // again).
                    member.healthy.store(false, Ordering::SeqCst);
                    *member.compat.lock().expect("compat lock") = Compat::Unknown;
                    true
                }
                Failure::Busy => {
                    let wait = self.backoff(attempt);
                    *member.busy_until.lock().expect("busy lock") = Some(Instant::now() + wait);
                    true
                }
                Failure::Request => true,
                Failure::Timeout | Failure::Final => false,
            };
            if other_tokenizer {
                let why = if status.message().starts_with(WEIGHTS_MISMATCH) {
                    format!(
                        "refused a call made for the pool's weights ({}), so it gets no work: \
                         start it with the same model as the other workers",
                        status.message()
                    )
                } else {
                    format!(
                        "refused a call made for the coordinator's tokenizer ({}), so it gets \
                         no work: start it with the coordinator's model",
                        status.message()
                    )
                };
                tracing::error!(worker = %member.url, "{why}");
                *member.compat.lock().expect("compat lock") = Compat::Different(why);
                member.healthy.store(false, Ordering::SeqCst);
            }
            let retry = retry || other_tokenizer;
            tracing::warn!(worker = %member.url, code = ?status.code(), ?failure, "worker call failed: {}", status.message());
            tried.push(member.url.clone());
            if !retry || tried.len() >= options.attempts {
                return Err(status);
            }
            if !other_tokenizer && !self.spend_retry() {
                tracing::warn!("retry budget spent: not re-sending");
                return Err(status);
            }
            // A full worker is tried again only once the others have been (and after its
            // back-off); a failed one is not tried again by this call.
            let exclude: Vec<String> = if failure == Failure::Busy {
                Vec::new()
            } else {
                tried.clone()
            };
            let next = self
                .pick(None, &exclude, &HashMap::new())
                .or_else(|| self.pick(None, &[], &HashMap::new()));
            member = match next {
                Some(m) => m,
                None => return Err(status),
            };
            // Back off before re-sending; to a worker that said it is full, at least until its
            // back-off runs out (never past the search's deadline).
            let mut wait = self.backoff(attempt);
            if let Some(until) = *member.busy_until.lock().expect("busy lock") {
                wait = wait.max(until.saturating_duration_since(Instant::now()));
            }
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(Instant::now()));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// What each attempt of a call carries: its timeout, the workers' token and the search's
/// request id (for the worker's logs).
pub(crate) struct CallMeta {
    timeout: Duration,
    auth: Option<AuthHeader>,
    request_id: Option<AuthHeader>,
}

impl CallMeta {
    /// `message` as a request with this attempt's timeout and token.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.timeout);
        if let Some(a) = &self.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        if let Some(id) = &self.request_id {
            req.metadata_mut().insert(REQUEST_ID_HEADER, id.clone());
        }
        req
    }
}

/// A call in flight on a member (and in the pool's gauge), until dropped.
struct Outstanding<'a>(&'a Member, Option<&'a super::metrics::PoolMetrics>);

impl<'a> Outstanding<'a> {
    fn new(member: &'a Member, metrics: Option<&'a super::metrics::PoolMetrics>) -> Self {
        member.outstanding.fetch_add(1, Ordering::SeqCst);
        if let Some(m) = metrics {
            m.in_flight.inc();
        }
        Outstanding(member, metrics)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
        if let Some(m) = self.1 {
            m.in_flight.dec();
        }
    }
}

/// One search's view of the pool: its `Policy` and `Scorer`.
pub struct RemotePolicy {
    pool: WorkerPool,
    /// The tokens of the search's prompt (its chat template already applied).
    prompt_tokens: Arc<Vec<u32>>,
    /// Names this search's expansion ids: unique to this run of a search (see
    /// [`unique_search_id`]), so a worker's remembered answers are only ever this search's.
    search_id: String,
    /// The search's request id, as logged here and sent to workers (`x-arbor-request-id`).
    request_id: String,
    request_header: Option<AuthHeader>,
    calls: AtomicU64,
    deadline: Option<Instant>,
    step_delimiter: String,
    /// Path hash → the worker that generated the path's last step.
    affinity: Mutex<HashMap<u64, String>>,
    /// Calls that went to the preferred worker, and calls that had one.
    affinity_hits: AtomicU64,
    affinity_wanted: AtomicU64,
    /// The code and message of the last call that failed, if any.
    last_failure: Mutex<Option<(Code, String)>>,
}

impl std::fmt::Debug for RemotePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePolicy")
            .field("search_id", &self.search_id)
            .finish()
    }
}

/// An id no other search run gets, in this process or another: a random 64-bit number drawn
/// once per process, then a counter. Workers answer a repeated expansion id from memory (so a
/// call re-sent after a lost reply gets the same samples), so ids made from request ids alone
/// would collide: two coordinators, or one restarted, both number their searches from `s0`,
/// and clients may reuse request ids.
fn unique_search_id() -> String {
    use std::hash::BuildHasher;
    static PROCESS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| {
        // std seeds each `RandomState` from the operating system's randomness.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()))
    });
    format!("{process:016x}.{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `id` as a metadata value: printable ASCII as it is, other bytes percent-encoded (request
/// ids may hold any text but control characters); `None` for an empty id.
fn request_id_header(id: &str) -> Option<AuthHeader> {
    if id.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.parse().ok()
}

/// Hash of a path: the step token ids in order (the prompt is fixed per search).
fn path_hash<'a>(steps: impl IntoIterator<Item = &'a [u32]>) -> u64 {
    let mut h = DefaultHasher::new();
    for s in steps {
        s.hash(&mut h);
    }
    h.finish()
}

impl RemotePolicy {
    /// A policy for one search over `pool`.
    pub fn new(
        pool: WorkerPool,
        prompt_tokens: Vec<u32>,
        deadline: Option<Instant>,
        step_delimiter: String,
    ) -> Self {
        RemotePolicy {
            pool,
            prompt_tokens: Arc::new(prompt_tokens),
            search_id: unique_search_id(),
            request_id: String::new(),
            request_header: None,
            calls: AtomicU64::new(0),
            deadline,
            step_delimiter,
            affinity: Mutex::new(HashMap::new()),
            affinity_hits: AtomicU64::new(0),
            affinity_wanted: AtomicU64::new(0),
            last_failure: Mutex::new(None),
        }
    }

    /// Tags this search's worker calls with `request_id`: their spans here, and the
    /// `x-arbor-request-id` header their workers log.
    pub fn with_request_id(mut self, request_id: &str) -> Self {
        self.request_header = request_id_header(request_id);
        self.request_id = request_id.to_string();
        self
    }

    /// (calls sent to the worker holding the node's prefix, calls that had such a worker).
    pub fn affinity(&self) -> (u64, u64) {
        (
            self.affinity_hits.load(Ordering::Relaxed),
            self.affinity_wanted.load(Ordering::Relaxed),
        )
    }

    /// The code and message of the last worker call of this search that failed (after its
    /// re-sends), if one did: what a search that found no answer reports.
    pub fn last_failure(&self) -> Option<(Code, String)> {
        self.last_failure.lock().expect("failure lock").clone()
    }

    fn failed(&self, status: &Status) {
        *self.last_failure.lock().expect("failure lock") =
            Some((status.code(), status.message().to_string()));
    }

    fn no_worker(&self) -> Status {
        let status = Status::unavailable(format!(
            "no healthy worker (0 of {} workers in rotation)",
            self.pool.members().len()
        ));
        self.failed(&status);
        status
    }
}

impl Policy for RemotePolicy {
    async fn propose(&self, batch: Vec<ProposeRequest>) -> Result<Vec<Proposals>, PolicyError> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        // Plan: each node goes to the worker that made its path, else to the least loaded.
        let mut groups: Vec<(Arc<Member>, Vec<usize>)> = Vec::new();
        let mut planned: HashMap<String, usize> = HashMap::new();
        {
            let affinity = self.affinity.lock().expect("affinity lock");
            for (i, r) in batch.iter().enumerate() {
                let preferred = if r.steps.is_empty() {
                    None
                } else {
                    self.affinity_wanted.fetch_add(1, Ordering::Relaxed);
                    affinity
                        .get(&path_hash(r.steps.iter().map(|s| &s.token_ids[..])))
                        .cloned()
                };
                let m = self
                    .pool
                    .pick(preferred.as_deref(), &[], &planned)
                    .ok_or_else(|| PolicyError::new(self.no_worker().message().to_string()))?;
                if preferred.as_deref() == Some(m.url()) {
                    self.affinity_hits.fetch_add(1, Ordering::Relaxed);
                }
                *planned.entry(m.url.clone()).or_default() += 1;
                match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &m)) {
                    Some((_, idx)) => idx.push(i),
                    None => groups.push((m, vec![i])),
                }
            }
        }
        let sends = groups.into_iter().enumerate().map(|(g, (member, idx))| {
            let nodes: Vec<pb::ExpandNode> = idx
                .iter()
                .map(|&i| {
                    let r = &batch[i];
                    let mut prefix = (*self.prompt_tokens).clone();
                    for s in &r.steps {
                        prefix.extend_from_slice(&s.token_ids);
                    }
                    pb::ExpandNode {
                        prefix_tokens: prefix,
                        k: r.k,
                        temperature: r.sampling.temperature,
                        top_p: r.sampling.top_p,
                        top_k: 0,
                        seed: r.sampling.seed,
                        max_tokens: r.sampling.max_step_tokens,
                        stop: vec![self.step_delimiter.clone()],
                    }
                })
                .collect();
            if let Some(m) = &self.pool.inner.options.metrics {
                m.expand_nodes.observe(nodes.len() as f64);
            }
            let request = pb::ExpandRequest {
                expansion_id: format!("{}/{call}/{g}", self.search_id),
                nodes,
                tokenizer_fingerprint: self.pool.tokenizer_fingerprint(),
                weights_fingerprint: self.pool.weights_fingerprint().unwrap_or_default(),
            };
            let span = tracing::info_span!(
                "worker_call",
                request_id = %self.request_id,
                method = "expand",
                nodes = idx.len()
            );
            async move {
                let sent = self
                    .pool
                    .call(
                        "expand",
                        self.request_header.as_ref(),
                        member,
                        self.deadline,
                        |mut client, meta| {
                            let req = meta.request(request.clone());
                            async move { client.expand(req).await.map(|r| r.into_inner()) }
                        },
                    )
                    .await;
                (idx, sent)
            }
            .instrument(span)
        });
        let replies = futures_util::future::join_all(sends).await;
        let mut out: Vec<Option<Proposals>> = vec![None; batch.len()];
        // A group that failed fails its own nodes only: the other groups' samples are kept
        // (and their costs charged) through `PolicyError::partial`.
        let mut failed: Option<String> = None;
        for (idx, reply) in replies {
            let (resp, member) = match reply {
                Ok(r) => r,
                Err(s) => {
                    self.failed(&s);
                    failed.get_or_insert_with(|| {
                        format!("expansion failed: {}: {}", s.code(), s.message())
                    });
                    continue;
                }
            };
            if resp.nodes.len() != idx.len() {
                failed.get_or_insert_with(|| {
                    format!(
                        "worker {} answered {} nodes for {}",
                        member.url,
                        resp.nodes.len(),
                        idx.len()
                    )
                });
                continue;
            }
            let mut affinity = self.affinity.lock().expect("affinity lock");
            for (&i, node) in idx.iter().zip(resp.nodes) {
                let r = &batch[i];
                let prompt_tokens = (self.prompt_tokens.len() as u64) + r.path_tokens();
                let mut generated = 0u64;
                let steps: Vec<ProposedStep> = node
                    .samples
                    .into_iter()
                    .map(|s| {
                        generated += s.token_ids.len() as u64;
                        let key = path_hash(
                            r.steps
                                .iter()
                                .map(|st| &st.token_ids[..])
                                .chain(std::iter::once(&s.token_ids[..])),
                        );
                        affinity.insert(key, member.url.clone());
                        ProposedStep {
                            stop: match pb::StopReason::try_from(s.stop_reason) {
                                Ok(pb::StopReason::EndOfSequence) => StepStop::EndOfSequence,
                                Ok(pb::StopReason::MaxTokens) => StepStop::MaxTokens,
                                _ => StepStop::Delimiter,
                            },
                            text: s.text,
                            token_ids: s.token_ids,
                            token_logprobs: s.logprobs,
                        }
                    })
                    .collect();
                out[i] = Some(Proposals {
                    steps,
                    cost: PolicyCost {
                        prompt_tokens,
                        prompt_tokens_computed: node.prompt_tokens_computed,
                        prompt_tokens_reused: node.prompt_tokens_reused,
                        generated_tokens: generated,
                    },
                });
            }
        }
        match failed {
            None => Ok(out
                .into_iter()
                .map(|p| p.expect("every node was answered"))
                .collect()),
            Some(message) if out.iter().all(Option::is_none) => Err(PolicyError::new(message)),
            Some(message) => Err(PolicyError::partial(message, out)),
        }
    }
}

impl Scorer for RemotePolicy {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        let request = pb::ScoreRequest {
            paths: batch
                .iter()
                .map(|r| pb::ScorePath {
                    prompt_tokens: (*self.prompt_tokens).clone(),
                    steps: r
                        .steps
                        .iter()
                        .map(|s| pb::StepTokens {
                            token_ids: s.token_ids.clone(),
                        })
                        .collect(),
                })
                .collect(),
            tokenizer_fingerprint: self.pool.tokenizer_fingerprint(),
            weights_fingerprint: self.pool.weights_fingerprint().unwrap_or_default(),
        };
        let member = self
            .pool
            .pick(None, &[], &HashMap::new())
            .ok_or_else(|| ScoreError::new(self.no_worker().message().to_string()))?;
        let (resp, _) = self
            .pool
            .call(
                "score",
                self.request_header.as_ref(),
                member,
                self.deadline,
                |mut client, meta| {
                    let req = meta.request(request.clone());
                    async move { client.score(req).await.map(|r| r.into_inner()) }
                },
            )
            .instrument(tracing::info_span!(
                "worker_call",
                request_id = %self.request_id,
                method = "score",
                paths = batch.len()
            ))
            .await
            .map_err(|s| {
                self.failed(&s);
                ScoreError::new(format!("scoring failed: {}: {}", s.code(), s.message()))
            })?;
        if resp.paths.len() != batch.len() {
            return Err(ScoreError::new(format!(
                "worker answered {} paths for {}",
                resp.paths.len(),
                batch.len()
            )));
        }
        Ok(resp
            .paths
            .into_iter()
            .map(|p| StepScores {
                scores: p.scores,
                cost: ScoreCost {
                    tokens_computed: p.tokens_computed,
                    ..ScoreCost::default()
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_verified_weights_pin_the_pool_and_others_are_named() {
        let mut pinned = None;
        // A worker that reports no weights (an older worker) neither pins nor is refused.
        assert_eq!(admit_weights(&mut pinned, "http://old:1", ""), Ok(()));
        assert_eq!(pinned, None);
        assert_eq!(admit_weights(&mut pinned, "http://a:1", "aaaa"), Ok(()));
        assert_eq!(admit_weights(&mut pinned, "http://b:1", "aaaa"), Ok(()));
        let why = admit_weights(&mut pinned, "http://c:1", "cccc").unwrap_err();
        assert!(
            why.contains("\"cccc\"") && why.contains("\"aaaa\"") && why.contains("http://a:1"),
            "{why}"
        );
        // The first stays the reference, even after a refusal.
        assert_eq!(pinned, Some(("aaaa".into(), "http://a:1".into())));
        assert!(admit_weights(&mut pinned, "http://a:1", "cccc").is_err());
    }

    #[test]
    fn request_ids_travel_as_printable_ascii() {
        let header = |id: &str| request_id_header(id).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(header(""), None);
        assert_eq!(header("a1-b2_c3.d4").as_deref(), Some("a1-b2_c3.d4"));
        assert_eq!(header("q 7%é").as_deref(), Some("q%207%25%C3%A9"));
    }
}

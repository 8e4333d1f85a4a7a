//! `arbor worker` and `arbor serve`: the gRPC worker and coordinator processes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arbor::rpc::auth::{read_first_token, Tokens};
use arbor::rpc::coordinator::{self, Coordinator, CoordinatorOptions};
use arbor::rpc::limits::{SearchLimits, WorkerLimits};
use arbor::rpc::metrics::{self, PoolMetrics, SearchMetrics, WorkerMetrics};
use arbor::rpc::pool::{PoolOptions, WorkerPool, WorkerSpec};
use arbor::rpc::tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles};
use arbor::rpc::worker::{self, WorkerService};
use arbor_model::{EngineOptions, Model};
use arbor_worker::{LocalWorker, PassObserver, WorkerOptions};

use crate::cli::{load_engine_with, resolve_model, Device};

/// TLS on a server's own port (the worker's and the coordinator's flags).
#[derive(clap::Args, Debug)]
pub(crate) struct ServerTlsArgs {
    /// Serve over TLS with this certificate chain (PEM; with --tls-key). Clients then connect
    /// with `https://`.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients presenting a certificate signed by this CA (PEM).
    #[arg(long, value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The files read and checked; `None` without --tls-cert/--tls-key.
    fn load(&self) -> Result<Option<ServerTls>> {
        ServerTls::load(
            &ServerTlsFiles {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                client_ca: self.tls_client_ca.clone(),
            },
            "tls-",
        )
        .map_err(anyhow::Error::msg)
    }
}

/// Authentication and shutdown, shared by the worker and the coordinator.
#[derive(clap::Args, Debug)]
pub(crate) struct ServerOpsArgs {
    /// Require a bearer token: FILE holds the accepted tokens, one per line (blank lines and
    /// `#` comments ignored). Calls must carry `authorization: Bearer TOKEN`; others get
    /// UNAUTHENTICATED. Health checks stay open. Default: no authentication.
    /// Example: --auth-token-file /etc/arbor/tokens
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// On SIGTERM or SIGINT: health turns NOT_SERVING (both `""` and the named service; the
    /// `liveness` service, for liveness probes, stays SERVING), new work is refused with
    /// UNAVAILABLE, and work in flight gets this long to finish (then
    /// it is cancelled, a search ending with its best answer so far) before the process exits
    /// 0. A number of seconds, or with a unit: 500ms, 30s, 2m.
    /// Example: --drain-timeout 2m
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Serve Prometheus metrics (`arbor_…`, text format) at `GET http://ADDR/metrics` (port 0
    /// picks a free port; the chosen address is printed). Plain HTTP without authentication:
    /// bind it where only the scraper reaches it. Default: no metrics.
    /// Example: --metrics-listen 0.0.0.0:9090
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

impl ServerOpsArgs {
    fn tokens(&self) -> Result<Option<Tokens>> {
        self.auth_token_file
            .as_deref()
            .map(|p| Tokens::load(p).map_err(anyhow::Error::msg))
            .transpose()
            .context("--auth-token-file")
    }

    /// Binds --metrics-listen (before the model loads, so a taken port fails at once).
    fn metrics_listener(&self) -> Result<Option<std::net::TcpListener>> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let l = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .with_context(|| format!("--metrics-listen {addr}"))?;
        Ok(Some(l))
    }
}

/// Serves `exposition` on `listener` (from [`ServerOpsArgs::metrics_listener`]) in the
/// background of the current runtime, and says where.
fn start_metrics(
    listener: Option<std::net::TcpListener>,
    exposition: metrics::Exposition,
) -> Result<()> {
    let Some(listener) = listener else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::from_std(listener).context("--metrics-listen")?;
    eprintln!(
        "arbor metrics listening on http://{}/metrics",
        listener.local_addr()?
    );
    tokio::spawn(metrics::serve(listener, exposition));
    Ok(())
}

/// `30`, `30s`, `500ms`, `2m`.
fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: a duration such as 30, 30s, 500ms or 2m"))?;
    if !v.is_finite() || v < 0.0 || v * scale > 86_400.0 {
        return Err(format!("`{s}`: between 0 and 24 hours"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

#[derive(clap::Args, Debug)]
pub(crate) struct WorkerArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// A GGUF file or Hugging Face folder; default: the embedded default model.
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// KV cache blocks of 16 tokens (memory: about 0.4 MB per block for the default model).
    #[arg(long, default_value_t = 8192)]
    kv_blocks: usize,
    /// Most calls queued or running at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    calls_in_flight_max: usize,
    /// Also serve gRPC reflection (for grpcurl and friends).
    #[arg(long)]
    reflection: bool,
    #[command(flatten)]
    tls: ServerTlsArgs,
    #[command(flatten)]
    ops: ServerOpsArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Workers, comma-separated: `host:port`, `http://host:port`, `https://host:port` (TLS),
    /// or `dns://NAME:PORT` for every address a name resolves to (a Kubernetes headless
    /// service), re-resolved at each health check (over TLS when a --workers-tls-* flag is
    /// given, the certificates then checked against NAME).
    #[arg(long, value_delimiter = ',', required = true)]
    workers: Vec<String>,
    /// The model the workers run (its tokenizer and chat template build the prompts); default:
    /// the embedded default model. Workers whose tokenizer differs from this model's get no
    /// work (each is named on stderr, and checked again when it restarts).
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// Searches running at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    searches_max: usize,
    /// Generated-token budget of a search that names none.
    #[arg(long, default_value_t = 1024)]
    default_budget_tokens: u64,
    /// Health-check period in milliseconds.
    #[arg(long, default_value_t = 2000)]
    health_interval_ms: u64,
    /// Also serve gRPC reflection (for grpcurl and friends).
    #[arg(long)]
    reflection: bool,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// The CA (PEM) that signed the `https://` workers' certificates; without it they are
    /// checked against the public web's roots.
    #[arg(long, value_name = "PEM")]
    workers_tls_ca: Option<PathBuf>,
    /// This coordinator's certificate (PEM) for workers that require one (their
    /// --tls-client-ca); with --workers-tls-key.
    #[arg(long, value_name = "PEM")]
    workers_tls_cert: Option<PathBuf>,
    /// The private key of --workers-tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    workers_tls_key: Option<PathBuf>,
    /// The token this coordinator sends to its workers (`authorization: Bearer TOKEN`; the
    /// first token in FILE), for workers started with --auth-token-file. Default: none.
    /// Example: --workers-token-file /etc/arbor/worker-token
    #[arg(long, value_name = "FILE")]
    workers_token_file: Option<PathBuf>,
    #[command(flatten)]
    ops: ServerOpsArgs,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => eprintln!("arbor: SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => eprintln!("arbor: SIGINT: shutting down"),
                }
                return;
            }
            Err(e) => eprintln!("arbor: warning: cannot watch for SIGTERM: {e}"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("arbor: SIGINT: shutting down");
}

/// How clients reach the server: `http`, `https`, or `https` with client certificates.
fn scheme_note(tls: &Option<ServerTls>) -> &'static str {
    match tls {
        None => "",
        Some(t) if t.requires_client_certificates() => " (TLS, client certificates required)",
        Some(_) => " (TLS)",
    }
}

pub(crate) fn run_worker(a: WorkerArgs) -> Result<()> {
    // Checked before the model loads, so a wrong path fails at once.
    let tls = a.tls.load()?;
    let tokens = a.ops.tokens()?;
    let metrics_listener = a.ops.metrics_listener()?;
    let registry = prometheus::Registry::new();
    let worker_metrics = WorkerMetrics::new(&registry);
    worker_metrics.kv_blocks_max.set(a.kv_blocks as i64);
    let batch_size = worker_metrics.batch_size.clone();
    let (model, engine) = load_engine_with(
        a.model,
        a.device,
        EngineOptions {
            kv_blocks_max: a.kv_blocks,
            ..EngineOptions::default()
        },
    )?;
    let local = LocalWorker::new(
        &model,
        engine,
        WorkerOptions {
            calls_in_flight_max: a.calls_in_flight_max,
            on_pass: metrics_listener
                .is_some()
                .then(|| PassObserver(Arc::new(move |n| batch_size.observe(n as f64)))),
            ..WorkerOptions::default()
        },
    );
    let observed = local.clone();
    let wm = worker_metrics.clone();
    let exposition = metrics::Exposition::new(registry, move || wm.update_from(&observed));
    let service = WorkerService::new(local, WorkerLimits::default())
        .with_auth(tokens)
        .with_drain_timeout(a.ops.drain_timeout)
        .with_metrics(metrics_listener.is_some().then_some(worker_metrics));
    runtime()?.block_on(async move {
        start_metrics(metrics_listener, exposition)?;
        let listener = worker::bind(a.listen)
            .await
            .with_context(|| format!("--listen {}", a.listen))?;
        let addr = listener.local_addr()?;
        eprintln!("arbor worker listening on {addr}{}", scheme_note(&tls));
        worker::serve(
            service,
            listener,
            a.reflection,
            tls.as_ref(),
            shutdown_signal(),
        )
        .await?;
        eprintln!("arbor: worker stopped");
        Ok(())
    })
}

pub(crate) fn run_serve(a: ServeArgs) -> Result<()> {
    let specs = a
        .workers
        .iter()
        .map(|w| w.parse::<WorkerSpec>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()
        .context("--workers")?;
    if a.searches_max == 0 {
        bail!("--searches-max must be at least 1");
    }
    let tls = a.tls.load()?;
    let tokens = a.ops.tokens()?;
    let metrics_listener = a.ops.metrics_listener()?;
    let registry = prometheus::Registry::new();
    let (search_metrics, pool_metrics) = match metrics_listener {
        Some(_) => {
            let searches = SearchMetrics::new(&registry);
            searches.max.set(a.searches_max as i64);
            (Some(searches), Some(PoolMetrics::new(&registry)))
        }
        None => (None, None),
    };
    let workers_token = a
        .workers_token_file
        .as_deref()
        .map(read_first_token)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--workers-token-file")?;
    let workers_tls = ClientTls::load(
        &ClientTlsFiles {
            ca: a.workers_tls_ca.clone(),
            cert: a.workers_tls_cert.clone(),
            key: a.workers_tls_key.clone(),
        },
        "workers-tls-",
    )
    .map_err(anyhow::Error::msg)?;
    let path = resolve_model(a.model)?;
    let tokenizer = Arc::new(
        Model::load_tokenizer(&path).with_context(|| format!("loading {}", path.display()))?,
    );
    runtime()?.block_on(async move {
        start_metrics(metrics_listener, metrics::Exposition::new(registry, || {}))?;
        let pool = WorkerPool::connect(
            specs,
            PoolOptions {
                health_interval: Duration::from_millis(a.health_interval_ms.max(50)),
                tokenizer_fingerprint: Some(tokenizer.fingerprint()),
                tls: workers_tls,
                auth_token: workers_token,
                metrics: pool_metrics,
                ..PoolOptions::default()
            },
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let healthy = pool.healthy();
        let members = pool.members().len();
        let mut incompatible = 0;
        for m in pool.members() {
            if let Some(why) = m.incompatible() {
                eprintln!("arbor: error: worker {} {why}", m.url());
                incompatible += 1;
            } else if let Some(why) = m.last_error() {
                eprintln!("arbor: warning: worker {} is not reachable yet: {why}", m.url());
            }
        }
        if healthy == 0 && incompatible == members && members > 0 {
            eprintln!("arbor: warning: none of the {members} workers runs the tokenizer of --model; searches wait until one does");
        } else if healthy == 0 {
            eprintln!("arbor: warning: none of the {members} workers is healthy yet; searches wait for the health checks");
        }
        let coordinator = Coordinator::new(
            pool,
            tokenizer,
            CoordinatorOptions {
                limits: SearchLimits {
                    searches_max: a.searches_max,
                    budget_tokens_default: a.default_budget_tokens,
                    ..SearchLimits::default()
                },
                auth: tokens,
                drain_timeout: a.ops.drain_timeout,
                metrics: search_metrics,
                ..CoordinatorOptions::default()
            },
        );
        let listener = worker::bind(a.listen)
            .await
            .with_context(|| format!("--listen {}", a.listen))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "arbor coordinator listening on {addr}{} ({healthy}/{members} workers healthy)",
            scheme_note(&tls)
        );
        coordinator::serve(
            coordinator,
            listener,
            a.reflection,
            tls.as_ref(),
            shutdown_signal(),
        )
        .await?;
        eprintln!("arbor: coordinator stopped");
        Ok(())
    })
}

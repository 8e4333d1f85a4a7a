//! Operating the service: Prometheus metrics scraped over HTTP, the coordinator's request id
//! in its workers' logs, and workers pooled only when they run the same weights. Real
//! `arbor serve` and `arbor worker` processes on 127.0.0.1 (the default model; tiny models for
//! the weights).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor::rpc::pb;
use arbor::rpc::pb::search_client::SearchClient;
use arbor::rpc::pool::{PoolOptions, WorkerPool, WorkerSpec};

/// The tests share the machine's cores: one cluster at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// An `arbor` server process whose stderr lines are kept; killed when dropped.
struct Server {
    child: Child,
    /// `http://ADDR` of its gRPC port.
    url: String,
    /// `ADDR` of its metrics port, when started with --metrics-listen.
    metrics: Option<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `arbor ARGS…` with `env`, once it says it is listening.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(args)
            .envs(env.iter().copied())
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start arbor");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut metrics = None;
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("arbor {args:?} exited before listening"))
                .unwrap();
            log.lock().unwrap().push(line.clone());
            if let Some(a) = line.strip_prefix("arbor metrics listening on http://") {
                metrics = Some(a.trim_end_matches("/metrics").to_string());
            }
            let listening = [
                "arbor worker listening on ",
                "arbor coordinator listening on ",
            ]
            .iter()
            .find_map(|p| line.strip_prefix(p));
            if let Some(a) = listening {
                break a.split_whitespace().next().unwrap().to_string();
            }
        };
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Server {
            child,
            url: format!("http://{addr}"),
            metrics,
            log,
        }
    }

    fn worker(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args = vec!["worker", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Server::start(&args, env)
    }

    fn coordinator(workers: &[&Server], extra: &[&str], env: &[(&str, &str)]) -> Server {
        let urls: Vec<&str> = workers.iter().map(|w| w.url.as_str()).collect();
        let urls = urls.join(",");
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--health-interval-ms",
            "300",
            "--workers",
            &urls,
        ];
        args.extend_from_slice(extra);
        Server::start(&args, env)
    }

    /// Lines it wrote to stderr so far.
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The first stderr line that `pred` accepts, waiting up to 5 s for it.
    fn wait_line(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let t = Instant::now();
        loop {
            if let Some(l) = self.log().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if t.elapsed() > Duration::from_secs(5) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET path` on its metrics port: (status code, body).
    fn get(&self, path: &str) -> (u16, String) {
        http(
            self.metrics.as_deref().expect("--metrics-listen"),
            "GET",
            path,
        )
    }

    /// Its metrics, scraped over HTTP.
    fn scrape(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Metrics(body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request, its answer read to the end: (status code, body).
fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A scrape in Prometheus' text format.
struct Metrics(String);

impl Metrics {
    /// The sum of the samples named exactly `name` whose labels include every one of `labels`
    /// (`code="OK"`); 0 when there is none.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, ""));
                (n == name && labels.iter().all(|want| rest.contains(want)))
                    .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn search_request(id: &str, budget: u64) -> pb::SearchRequest {
    pb::SearchRequest {
        request_id: id.into(),
        question: "What is 12 + 30?".into(),
        strategy: pb::Strategy::BestOfN as i32,
        n: 4,
        budget: Some(pb::Budget {
            generated_tokens: budget,
            ..Default::default()
        }),
        sampling: Some(pb::SamplingOptions {
            temperature: Some(0.7),
            top_p: None,
            max_step_tokens: Some(32),
        }),
        seed: 7,
        ..Default::default()
    }
}

/// Runs `req` on the coordinator at `url`.
fn search(url: &str, req: pb::SearchRequest) -> Result<pb::SearchResult, tonic::Status> {
    runtime().block_on(async {
        let mut client = SearchClient::connect(url.to_string()).await.unwrap();
        client.search(req).await.map(|r| r.into_inner())
    })
}

/// A real search moves the coordinator's and the worker's counters, as scraped over HTTP, by
/// what the search reports; other paths get 404 and other methods 405, and malformed HTTP does
/// not stop the metrics port or the server.
#[test]
fn metrics_scraped_over_http_count_a_real_search_on_both_servers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let worker = Server::worker(&["--metrics-listen", "127.0.0.1:0"], &[]);
    let coord = Server::coordinator(&[&worker], &["--metrics-listen", "127.0.0.1:0"], &[]);

    let before = coord.scrape();
    assert_eq!(before.sum("arbor_searches_finished_total", &[]), 0.0);
    assert_eq!(
        before.sum("arbor_pool_workers", &["state=\"healthy\""]),
        1.0
    );
    assert!(before
        .0
        .contains("# TYPE arbor_search_duration_seconds histogram"));

    // While the search runs, the gauges show it: one search, calls in flight on both sides.
    let url = coord.url.clone();
    let running = std::thread::spawn(move || search(&url, search_request("metrics-1", 160)));
    let t = Instant::now();
    let (mut seen_coordinator, mut seen_worker) = (false, false);
    while !(running.is_finished() || seen_coordinator && seen_worker) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the search did not show"
        );
        let c = coord.scrape();
        seen_coordinator |= c.sum("arbor_searches_running", &[]) == 1.0
            && c.sum("arbor_pool_calls_in_flight", &[]) >= 1.0;
        seen_worker |= worker.scrape().sum("arbor_worker_calls_running", &[]) >= 1.0;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        seen_coordinator && seen_worker,
        "{seen_coordinator} {seen_worker}"
    );
    let result = running.join().unwrap().expect("search");
    let generated = result.costs.as_ref().unwrap().generated_tokens;
    assert!(generated > 0);
    // A refused request is counted by its code.
    let refused = search(
        &coord.url,
        pb::SearchRequest {
            question: String::new(),
            ..search_request("metrics-2", 64)
        },
    )
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let c = coord.scrape();
    assert_eq!(c.sum("arbor_searches_finished_total", &[]), 1.0, "{}", c.0);
    assert_eq!(
        c.sum(
            "arbor_searches_failed_total",
            &["code=\"INVALID_ARGUMENT\""]
        ),
        1.0
    );
    assert_eq!(c.sum("arbor_searches_running", &[]), 0.0);
    assert_eq!(c.sum("arbor_searches_max", &[]), 64.0);
    assert_eq!(c.sum("arbor_pool_calls_in_flight", &[]), 0.0);
    assert_eq!(c.sum("arbor_search_duration_seconds_count", &[]), 1.0);
    assert!(c.sum("arbor_search_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(c.sum("arbor_search_generation_tokens_count", &[]), 1.0);
    let tokens = c.sum("arbor_generation_tokens_total", &[]);
    assert_eq!(tokens, generated as f64);
    let ok_calls = c.sum(
        "arbor_pool_calls_total",
        &["method=\"expand\"", "code=\"OK\""],
    );
    assert!(ok_calls > 0.0, "{}", c.0);
    assert_eq!(
        c.sum("arbor_pool_call_duration_seconds_count", &[]),
        ok_calls
    );
    assert_eq!(c.sum("arbor_pool_expand_batch_nodes_count", &[]), ok_calls);
    assert_eq!(c.sum("arbor_pool_retries_total", &[]), 0.0);

    let w = worker.scrape();
    // Every call the coordinator saw answered OK was answered OK by the worker.
    assert_eq!(
        w.sum(
            "arbor_worker_requests_total",
            &["method=\"expand\"", "code=\"OK\""]
        ),
        ok_calls
    );
    assert_eq!(w.sum("arbor_worker_generation_tokens_total", &[]), tokens);
    assert!(w.sum("arbor_worker_prompt_tokens_total", &[]) > 0.0);
    let passes = w.sum("arbor_worker_forward_passes_total", &[]);
    assert!(passes > 0.0);
    assert_eq!(w.sum("arbor_worker_batch_size_count", &[]), passes);
    // Four samples share passes: some pass held more than one sequence.
    assert!(w.sum("arbor_worker_batch_size_sum", &[]) > passes);
    assert_eq!(w.sum("arbor_worker_kv_blocks_max", &[]), 8192.0);
    // The prefix cache keeps the samples' sequences, so blocks stay in use.
    assert!(w.sum("arbor_worker_kv_blocks_in_use", &[]) > 0.0);
    assert_eq!(w.sum("arbor_worker_calls_running", &[]), 0.0);
    // An idle worker keeps no pass buffer over 8 MiB (a few small ones, at most).
    let scratch = w.sum("arbor_worker_scratch_bytes", &[]);
    assert!(scratch > 0.0 && scratch < 64.0 * 1048576.0, "{scratch}");

    for server in [&coord, &worker] {
        let (status, body) = server.get("/");
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("/metrics"), "{body}");
        assert_eq!(server.get("/metrics/x").0, 404);
        let addr = server.metrics.as_deref().unwrap();
        assert_eq!(http(addr, "POST", "/metrics").0, 405);
        // Not HTTP at all, then a request cut off mid-line: the port keeps answering.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metr").unwrap();
        drop(s);
        assert_eq!(server.get("/metrics").0, 200);
    }
    assert!(search(&coord.url, search_request("metrics-3", 32)).is_ok());
}

/// The coordinator logs each search in a `search{request_id=…}` span and sends the request id
/// to its workers (`x-arbor-request-id`), which log each call in a
/// `worker_call{request_id=…}` span: one id follows a search across processes.
#[test]
fn the_coordinators_request_id_reaches_the_worker_logs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let worker = Server::worker(&[], &[("ARBOR_LOG", "arbor=debug")]);
    let coord = Server::coordinator(&[&worker], &[], &[("ARBOR_LOG", "arbor=info")]);
    let id = "trace-5b1e-42";
    search(&coord.url, search_request(id, 48)).expect("search");
    let wanted = format!("worker_call{{request_id={id} method=\"expand\"}}");
    let answered = worker.wait_line(|l| l.contains(&wanted) && l.contains("answered"));
    assert!(answered.is_some(), "{:#?}", worker.log());
    assert!(
        worker
            .log()
            .iter()
            .any(|l| l.contains(&wanted) && l.contains("DEBUG") && l.contains(" expand ")),
        "no expand line in the request's span: {:#?}",
        worker.log()
    );
    // Logs go to a pipe here: no colour codes.
    assert!(worker.log().iter().all(|l| !l.contains('\x1b')));
    let coordinator_line = coord
        .wait_line(|l| l.contains("search finished"))
        .unwrap_or_else(|| panic!("the coordinator logs the search: {:#?}", coord.log()));
    assert!(
        coordinator_line.contains(&format!("search{{request_id={id}}}")),
        "{coordinator_line}"
    );
    // Another search's calls carry its own id, not this one's.
    search(&coord.url, search_request("trace-other", 16)).expect("search");
    assert!(worker
        .wait_line(|l| l.contains("worker_call{request_id=trace-other"))
        .is_some());
}

/// A tiny model folder; `variant` > 0 changes one weight (same tokenizer, other weights).
fn tiny_model(tag: &str, variant: u32) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("arbor-ops-{tag}-{}", std::process::id()));
    let mut m = arbor_model::tiny::TinyModel::new("qwen2");
    if variant > 0 {
        m.tensors[0].2[0] += variant as f32;
    }
    m.write(&dir).unwrap();
    dir
}

/// A free port on 127.0.0.1 (bound and released).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Two workers with the same tokenizer and other weights: the pool keeps the first one it
/// verified and refuses the other, naming both fingerprints and the first worker; a worker
/// restarted with other weights refuses the calls made for the pool's (every call carries
/// its fingerprint) and leaves the rotation, named.
#[test]
fn workers_with_other_weights_are_not_pooled_and_are_named() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a_dir, b_dir) = (tiny_model("a", 0), tiny_model("b", 1));
    let a = arbor_model::Model::load(&a_dir).unwrap();
    let b = arbor_model::Model::load(&b_dir).unwrap();
    assert_eq!(a.tokenizer.fingerprint(), b.tokenizer.fingerprint());
    assert_ne!(a.weights_fingerprint, b.weights_fingerprint);
    assert_eq!(
        a.weights_fingerprint,
        arbor_model::Model::load(&a_dir)
            .unwrap()
            .weights_fingerprint,
        "computed the same at every load"
    );
    let model_a = ["--model", a_dir.to_str().unwrap()];
    let model_b = ["--model", b_dir.to_str().unwrap()];
    let worker_a = Server::worker(&model_a, &[]);
    // B's address is in the pool from the start, but B comes up after A was verified.
    let b_addr = free_addr();
    let rt = runtime();
    let pool = rt.block_on(async {
        WorkerPool::connect(
            vec![
                WorkerSpec::Url(worker_a.url.clone()),
                WorkerSpec::Url(format!("http://{b_addr}")),
            ],
            PoolOptions {
                // Checked only when the test asks.
                health_interval: Duration::from_secs(3600),
                tokenizer_fingerprint: Some(a.tokenizer.fingerprint()),
                ..PoolOptions::default()
            },
        )
        .await
        .unwrap()
    });
    assert_eq!(pool.healthy(), 1);
    assert_eq!(
        pool.weights_fingerprint(),
        Some(a.weights_fingerprint.clone())
    );
    let worker_b = Server::start(
        &["worker", "--listen", &b_addr, model_b[0], model_b[1]],
        &[],
    );
    rt.block_on(pool.refresh());
    let members = pool.members();
    let member_b = members.iter().find(|m| m.url().contains(&b_addr)).unwrap();
    assert!(!member_b.is_healthy());
    let why = member_b
        .incompatible()
        .expect("the other weights are named");
    assert!(
        why.contains("other weights")
            && why.contains(&b.weights_fingerprint)
            && why.contains(&a.weights_fingerprint)
            && why.contains(&worker_a.url),
        "{why}"
    );
    // Later checks keep it out; A stays in.
    rt.block_on(pool.refresh());
    assert_eq!(pool.healthy(), 1);
    assert!(pool
        .members()
        .iter()
        .any(|m| m.url() == worker_a.url && m.is_healthy()));

    // A coordinator process over both: B is refused and named on stderr, searches run on A.
    let coord = Server::coordinator(
        &[&worker_a, &worker_b],
        &[model_a[0], model_a[1], "--metrics-listen", "127.0.0.1:0"],
        &[],
    );
    let _ = search(&coord.url, search_request("weights-1", 16));
    let scraped = coord.scrape();
    assert_eq!(
        scraped.sum("arbor_pool_workers", &["state=\"healthy\""])
            + scraped.sum("arbor_pool_workers", &["state=\"incompatible\""]),
        2.0,
        "{}",
        scraped.0
    );
    assert_eq!(
        scraped.sum("arbor_pool_workers", &["state=\"incompatible\""]),
        1.0
    );
    let named = coord.wait_line(|l| {
        l.contains("other weights")
            && l.contains(&a.weights_fingerprint)
            && l.contains(&b.weights_fingerprint)
    });
    assert!(named.is_some(), "{:#?}", coord.log());

    // Calls carry the pool's fingerprint: a worker that runs other weights refuses them.
    let status = rt
        .block_on(async {
            let mut c = pb::worker_client::WorkerClient::connect(worker_b.url.clone())
                .await
                .unwrap();
            c.expand(pb::ExpandRequest {
                nodes: vec![pb::ExpandNode {
                    prefix_tokens: vec![1, 2, 3],
                    k: 1,
                    max_tokens: 2,
                    ..Default::default()
                }],
                weights_fingerprint: a.weights_fingerprint.clone(),
                ..Default::default()
            })
            .await
        })
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().starts_with("weights_fingerprint:")
            && status.message().contains(&b.weights_fingerprint),
        "{}",
        status.message()
    );
    drop(coord);

    // The pool's first worker restarted with other weights at the same address, between two
    // health checks: the pool's next call fails there (refused for its weights, or on the
    // dropped connection), and by the next health check at the latest the worker is named
    // with both fingerprints and out of rotation.
    let a_url = worker_a.url.clone();
    drop(worker_a);
    let a_addr = a_url.strip_prefix("http://").unwrap().to_string();
    let t = Instant::now();
    let _restarted = loop {
        // The port frees once the killed process is gone.
        match std::panic::catch_unwind(|| {
            Server::start(
                &["worker", "--listen", &a_addr, model_b[0], model_b[1]],
                &[],
            )
        }) {
            Ok(w) => break w,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => std::panic::resume_unwind(e),
        }
    };
    assert_eq!(pool.healthy(), 1, "no health check has run since");
    let proposed = rt.block_on(async {
        use arbor_search::Policy as _;
        let remote =
            arbor::rpc::pool::RemotePolicy::new(pool.clone(), vec![1, 2, 3], None, "\n\n".into());
        remote
            .propose(vec![arbor_search::ProposeRequest {
                node: arbor_search::NodeId::ROOT,
                prompt: "p".into(),
                steps: vec![],
                k: 1,
                sampling: arbor_search::Sampling {
                    temperature: 0.5,
                    top_p: 1.0,
                    max_step_tokens: 4,
                    seed: 1,
                },
            }])
            .await
    });
    assert!(
        proposed.is_err(),
        "no worker runs the pool's weights any more"
    );
    let member_a = || {
        let members = pool.members();
        members.iter().find(|m| m.url() == a_url).unwrap().clone()
    };
    if member_a().incompatible().is_none() {
        // The call failed on the dropped connection: the next health check names it.
        rt.block_on(pool.refresh());
    }
    let member_a = member_a();
    let why = member_a
        .incompatible()
        .expect("the restarted worker is named");
    assert!(
        why.contains("weights")
            && why.contains(&a.weights_fingerprint)
            && why.contains(&b.weights_fingerprint),
        "{why}"
    );
    assert_eq!(pool.healthy(), 0);
    drop(worker_b);
    let _ = std::fs::remove_dir_all(&a_dir);
    let _ = std::fs::remove_dir_all(&b_dir);
}

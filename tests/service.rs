//! The gRPC service end to end: a coordinator and three `arbor worker` processes on 127.0.0.1
//! with the real default model.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbor::rpc::coordinator::{self, Coordinator, CoordinatorOptions};
use arbor::rpc::pb;
use arbor::rpc::pb::search_client::SearchClient;
use arbor::rpc::pb::worker_client::WorkerClient;
use arbor::rpc::pool::{PoolOptions, WorkerPool, WorkerSpec};
use arbor::strategy::{strategy_config, Strategy};
use arbor_model::backend::cpu::CpuBackend;
use arbor_model::{Engine, EngineOptions, Model};
use arbor_search::{LogProbScorer, Search, SearchConfig, SearchControl};
use arbor_worker::{LocalWorker, WorkerOptions};
use tonic::transport::Channel;
use tonic::Code;

/// The tests share the machine's cores: one cluster at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = arbor_model::fetch::ensure_default_model(&mut |_| {}).expect("fetch model");
        Model::load(&path).expect("load model")
    })
}

/// An `arbor worker` process, killed when dropped.
struct WorkerProcess {
    child: Child,
    url: String,
}

impl WorkerProcess {
    fn start() -> WorkerProcess {
        WorkerProcess::start_with(&[])
    }

    /// A worker with extra command-line arguments (`--model DIR`).
    fn start_with(args: &[&str]) -> WorkerProcess {
        WorkerProcess::start_at("127.0.0.1:0", args)
    }

    /// A worker listening on `listen` (`host:port`).
    fn start_at(listen: &str, args: &[&str]) -> WorkerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["worker", "--listen", listen])
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start arbor worker");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("worker exited before listening")
                .unwrap();
            if let Some(a) = line.strip_prefix("arbor worker listening on ") {
                // "ADDR" or "ADDR (TLS...)".
                let tls = a.contains("(TLS");
                break (a.split_whitespace().next().unwrap().to_string(), tls);
            }
        };
        // Keep draining stderr so the worker never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let (addr, tls) = addr;
        WorkerProcess {
            child,
            url: format!("{}://{addr}", if tls { "https" } else { "http" }),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tiny random `qwen2` model (another tokenizer than the default model's) written to a
/// fresh temporary folder named after `tag`.
fn tiny_model_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    arbor_model::tiny::TinyModel::new("qwen2")
        .write(&dir)
        .unwrap();
    dir
}

/// A CA, a server certificate from it for 127.0.0.1 and localhost, a client certificate from
/// it, and a second CA that signed neither, as PEM files in a fresh temporary folder.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let (ca1, ca2) = (ca("arbor test CA"), ca("another CA"));
        let leaf = |sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca1)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
        let (client, client_key) = leaf(vec!["coordinator".into()]);
        for (name, text) in [
            ("ca.pem", ca1.pem()),
            ("other-ca.pem", ca2.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three workers and an in-process coordinator.
struct Cluster {
    rt: tokio::runtime::Runtime,
    workers: Vec<WorkerProcess>,
    coordinator: Coordinator,
    client: SearchClient<Channel>,
    pool: WorkerPool,
    /// The coordinator's URL.
    url: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Cluster {
    fn start(n_workers: usize) -> Cluster {
        let workers: Vec<WorkerProcess> = (0..n_workers).map(|_| WorkerProcess::start()).collect();
        Cluster::over(workers, n_workers)
    }

    /// A coordinator over `workers`, of which `usable` run the default model (the pool checks
    /// every worker's tokenizer against the coordinator's).
    fn over(workers: Vec<WorkerProcess>, usable: usize) -> Cluster {
        Cluster::over_checked_every(workers, usable, Duration::from_millis(300))
    }

    /// As [`Cluster::over`], with health checks every `health_interval`.
    fn over_checked_every(
        workers: Vec<WorkerProcess>,
        usable: usize,
        health_interval: Duration,
    ) -> Cluster {
        Cluster::with_options(
            workers,
            usable,
            PoolOptions {
                health_interval,
                ..PoolOptions::default()
            },
            CoordinatorOptions::default(),
        )
    }

    /// A coordinator with `options` over `workers` in a pool with `pool_options`.
    fn with_options(
        workers: Vec<WorkerProcess>,
        usable: usize,
        pool_options: PoolOptions,
        options: CoordinatorOptions,
    ) -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let specs = workers
            .iter()
            .map(|w| w.url.parse::<WorkerSpec>().unwrap())
            .collect();
        let (coordinator, client, shutdown, pool, url) = rt.block_on(async {
            let pool = WorkerPool::connect(
                specs,
                PoolOptions {
                    tokenizer_fingerprint: Some(model().tokenizer.fingerprint()),
                    ..pool_options
                },
            )
            .await
            .unwrap();
            assert_eq!(
                pool.healthy(),
                usable,
                "every worker with the coordinator's tokenizer answers its checks"
            );
            let coordinator = Coordinator::new(pool.clone(), model().tokenizer.clone(), options);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let c = coordinator.clone();
            tokio::spawn(async move {
                coordinator::serve(c, listener, true, None, async {
                    let _ = rx.await;
                })
                .await
                .unwrap()
            });
            let client = SearchClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            (coordinator, client, tx, pool, format!("http://{addr}"))
        });
        Cluster {
            rt,
            workers,
            coordinator,
            client,
            pool,
            url,
            _shutdown: shutdown,
        }
    }

    /// Waits until a search has been under way for 1.5 s, then returns the index of the worker
    /// with the most calls in flight.
    fn busiest_once_under_way(&self) -> usize {
        let t = Instant::now();
        loop {
            let busy: u32 = self.in_flight().iter().sum();
            if busy > 0 && t.elapsed() > Duration::from_millis(1500) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the search never started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let loads = self.in_flight();
        (0..loads.len()).max_by_key(|&i| loads[i]).unwrap()
    }

    /// Calls queued or running on each live worker.
    fn in_flight(&self) -> Vec<u32> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            for w in &self.workers {
                if let Ok(mut c) = WorkerClient::connect(w.url.clone()).await {
                    let info = c.model_info(pb::ModelInfoRequest {}).await.unwrap();
                    out.push(info.get_ref().in_flight);
                }
            }
            out
        })
    }
}

const QUESTION: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?";

fn request(
    id: &str,
    question: &str,
    strategy: pb::Strategy,
    budget: u64,
    seed: u64,
) -> pb::SearchRequest {
    pb::SearchRequest {
        request_id: id.into(),
        question: question.into(),
        strategy: strategy as i32,
        n: 4,
        budget: Some(pb::Budget {
            generated_tokens: budget,
            ..Default::default()
        }),
        sampling: Some(pb::SamplingOptions {
            temperature: Some(0.7),
            top_p: None,
            max_step_tokens: Some(48),
        }),
        seed,
        ..Default::default()
    }
}

/// The same search run embedded (no network), for comparison.
fn embedded(question: &str, strategy: Strategy, budget: u64, seed: u64) -> (String, u64, u64) {
    let m = model();
    let engine = Engine::new(
        Box::new(CpuBackend::new(m.config.clone(), m.weights.clone())),
        EngineOptions::default(),
    );
    let w = LocalWorker::new(m, engine, WorkerOptions::default());
    let mut config: SearchConfig = strategy_config(strategy, 4, 0.7, 48);
    config.seed = seed;
    config.budget.max_generated_tokens = Some(budget);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut search = Search::new(w.format_question(question).unwrap(), config).unwrap();
    let o = rt
        .block_on(search.run(&w, &LogProbScorer, &SearchControl::new()))
        .unwrap();
    (
        o.answer.map(|a| a.answer.raw).unwrap_or_default(),
        o.costs.generated_tokens,
        o.costs.nodes,
    )
}

async fn stream(
    client: &mut SearchClient<Channel>,
    req: pb::SearchRequest,
) -> (Vec<pb::search_event::Event>, pb::SearchResult) {
    let mut s = client.search_stream(req).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(ev) = s.message().await.unwrap() {
        match ev.event.unwrap() {
            pb::search_event::Event::Result(r) => return (events, r),
            e => events.push(e),
        }
    }
    panic!("the stream ended without a result");
}

#[test]
fn a_streamed_search_over_three_workers_equals_the_embedded_search() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(3);
    let (events, result) = c.rt.block_on(stream(
        &mut c.client,
        request("q0", QUESTION, pb::Strategy::Mcts, 300, 5),
    ));
    let expanded = events
        .iter()
        .filter(|e| matches!(e, pb::search_event::Event::Expanded(_)))
        .count();
    assert!(expanded > 0, "the stream carries tree events");
    assert_eq!(result.request_id, "q0");
    let costs = result.costs.unwrap();
    assert!(costs.generated_tokens >= 250, "{costs:?}");
    assert!(
        costs.prompt_tokens_reused > 0,
        "affinity keeps prefixes warm: {costs:?}"
    );
    // Seeds travel with every node, so the workers serving it do not change the search.
    let (answer, generated, nodes) = embedded(QUESTION, Strategy::Mcts, 300, 5);
    assert_eq!(result.answer, answer);
    assert_eq!(costs.generated_tokens, generated);
    assert_eq!(costs.nodes, nodes);
    // The finished tree, as JSON and DOT.
    let tree =
        c.rt.block_on(c.client.get_tree(pb::GetTreeRequest {
            request_id: "q0".into(),
            format: pb::TreeFormat::Json as i32,
        }))
        .unwrap()
        .into_inner()
        .tree;
    let tree: serde_json::Value = serde_json::from_str(&tree).unwrap();
    assert_eq!(tree["nodes"].as_array().unwrap().len() as u64, costs.nodes);
    let missing =
        c.rt.block_on(c.client.get_tree(pb::GetTreeRequest {
            request_id: "nope".into(),
            format: pb::TreeFormat::Dot as i32,
        }))
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(c.coordinator.invariant_violations(), 0);
}

/// A worker started with another model (another tokenizer: its token ids mean other text) gets
/// no work: the pool names it and why, and a search runs on the worker that shares the
/// coordinator's tokenizer, with the same result as embedded.
#[test]
fn a_worker_with_another_tokenizer_gets_no_work() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tiny_model_dir("arbor-tiny-worker");
    let good = WorkerProcess::start();
    let odd = WorkerProcess::start_with(&["--model", dir.to_str().unwrap()]);
    let odd_url = odd.url.clone();
    let mut c = Cluster::over(vec![good, odd], 1);
    let members = c.pool.members();
    let odd_member = members.iter().find(|m| m.url() == odd_url).unwrap();
    assert!(!odd_member.is_healthy());
    let why = odd_member.incompatible().expect("the odd worker is named");
    assert!(
        why.contains("another tokenizer") && why.contains("vocabulary 288"),
        "{why}"
    );
    let good_member = members.iter().find(|m| m.url() != odd_url).unwrap();
    assert!(good_member.is_healthy() && good_member.incompatible().is_none());
    // Later health checks keep it out.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(c.pool.healthy(), 1);
    let (_, result) = c.rt.block_on(stream(
        &mut c.client,
        request("odd", QUESTION, pb::Strategy::Mcts, 96, 3),
    ));
    let (answer, generated, nodes) = embedded(QUESTION, Strategy::Mcts, 96, 3);
    let costs = result.costs.unwrap();
    assert_eq!(result.answer, answer);
    assert_eq!((costs.generated_tokens, costs.nodes), (generated, nodes));
    assert_eq!(c.coordinator.invariant_violations(), 0);
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker restarted with another model between two health checks refuses the calls made for
/// the coordinator's tokenizer (every call carries its fingerprint), and the pool takes it out
/// of rotation, naming it and why.
#[test]
fn a_worker_restarted_with_another_model_between_checks_refuses_calls_and_is_named() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tiny_model_dir("arbor-tiny-restart");
    // Checked once at start, then not for an hour: only the calls can notice the restart.
    let mut c =
        Cluster::over_checked_every(vec![WorkerProcess::start()], 1, Duration::from_secs(3600));
    let url = c.workers[0].url.clone();
    c.workers[0].kill();
    let addr = url.strip_prefix("http://").unwrap().to_string();
    let t = Instant::now();
    let odd = loop {
        // The port frees once the killed process is gone.
        match std::panic::catch_unwind(|| {
            WorkerProcess::start_at(&addr, &["--model", dir.to_str().unwrap()])
        }) {
            Ok(w) => break w,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => std::panic::resume_unwind(e),
        }
    };
    c.workers[0] = odd;
    assert_eq!(c.pool.healthy(), 1, "no health check has run since");
    // The search's calls reach the tiny-model worker, which refuses them; with no other
    // worker the search cannot make progress, whatever it then reports.
    let _ =
        c.rt.block_on(
            c.client
                .search(request("restart", QUESTION, pb::Strategy::BestOfN, 64, 5)),
        );
    let members = c.pool.members();
    let why = members[0]
        .incompatible()
        .expect("the restarted worker is named");
    assert!(
        why.contains("refused a call made for the coordinator's tokenizer")
            && why.contains("vocabulary 288")
            && why.contains(&model().tokenizer.fingerprint()),
        "{why}"
    );
    assert_eq!(c.pool.healthy(), 0, "it left the rotation");
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killing_a_worker_mid_search_still_completes_the_search() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(3);
    let req = request("kill", QUESTION, pb::Strategy::Beam, 400, 9);
    let mut client = c.client.clone();
    let search = c.rt.spawn(async move { stream(&mut client, req).await });
    let busiest = c.busiest_once_under_way();
    c.workers[busiest].kill();
    c.workers.remove(busiest);
    let (_, result) = c.rt.block_on(search).unwrap();
    let costs = result.costs.unwrap();
    assert!(
        costs.generated_tokens >= 350,
        "the search ran to its budget on the survivors: {costs:?}"
    );
    assert_eq!(c.coordinator.invariant_violations(), 0);
    let pool = c.coordinator.pool();
    c.rt.block_on(pool.refresh());
    assert_eq!(pool.healthy(), 2, "the dead worker left the rotation");
    let failed: u64 = pool.members().iter().map(|m| m.failures()).sum();
    eprintln!("calls that failed and were re-sent: {failed}");
    // Re-dispatched calls carry the same seeds: the result is the one a healthy run gives.
    let (answer, generated, _) = embedded(QUESTION, Strategy::Beam, 400, 9);
    assert_eq!((result.answer, costs.generated_tokens), (answer, generated));
}

/// Every worker gone: a search gets UNAVAILABLE saying what failed (or, if it had found an
/// answer before, that answer flagged `too_many_failures`), never an OK with nothing in it; a
/// search sent while no worker is left is refused the same way, at once.
#[test]
fn a_search_whose_workers_are_all_gone_gets_unavailable_not_an_empty_ok() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(1);
    let req = request("gone", QUESTION, pb::Strategy::BestOfN, 2000, 3);
    let mut client = c.client.clone();
    let search = c.rt.spawn(async move { client.search(req).await });
    c.busiest_once_under_way();
    c.workers[0].kill();
    c.workers.clear();
    match c.rt.block_on(search).unwrap() {
        Err(e) => {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert!(e.message().contains("found no answer"), "{e:?}");
        }
        Ok(r) => {
            let r = r.into_inner();
            assert!(!r.answer.is_empty(), "an OK with no answer: {r:?}");
            assert_eq!(r.termination, "too_many_failures", "{r:?}");
        }
    }
    let t = Instant::now();
    let mut client = c.client.clone();
    let e =
        c.rt.block_on(client.search(request("gone-2", QUESTION, pb::Strategy::BestOfN, 200, 3)))
            .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no healthy worker"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The tree of the failed search is kept, as for any other.
    let tree = c.rt.block_on(client.get_tree(pb::GetTreeRequest {
        request_id: "gone-2".into(),
        ..Default::default()
    }));
    assert!(tree.is_ok(), "{tree:?}");
}

#[test]
fn bad_requests_get_invalid_argument_naming_the_field_and_the_server_keeps_serving() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(1);
    let ok = || request("", "What is 2 + 3?", pb::Strategy::BestOfN, 32, 1);
    let cases: Vec<(pb::SearchRequest, &str)> = vec![
        (
            pb::SearchRequest {
                question: "x".repeat(100_000),
                ..ok()
            },
            "question",
        ),
        (pb::SearchRequest { n: 100_000, ..ok() }, "n"),
        (
            pb::SearchRequest {
                strategy: 99,
                ..ok()
            },
            "strategy",
        ),
        (
            pb::SearchRequest {
                budget: Some(pb::Budget {
                    generated_tokens: u64::MAX,
                    ..Default::default()
                }),
                ..ok()
            },
            "budget.generated_tokens",
        ),
        (
            pb::SearchRequest {
                sampling: Some(pb::SamplingOptions {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                }),
                ..ok()
            },
            "temperature",
        ),
        (
            pb::SearchRequest {
                config_json: r#"{"strategy": {"kind": "beam", "beam_wdth": 2}}"#.into(),
                ..ok()
            },
            "config_json",
        ),
        (
            pb::SearchRequest {
                question: String::new(),
                messages: vec![pb::ChatMessage {
                    role: "robot".into(),
                    content: "hi".into(),
                }],
                ..ok()
            },
            "messages[0].role",
        ),
        (
            pb::SearchRequest {
                question: String::new(),
                ..ok()
            },
            "question",
        ),
        (
            pb::SearchRequest {
                request_id: "r".repeat(1000),
                ..ok()
            },
            "request_id",
        ),
    ];
    for (req, field) in cases {
        let err = c.rt.block_on(c.client.search(req)).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    // The worker validates too, before any model work.
    let url = c.workers[0].url.clone();
    let bad_nodes = c.rt.block_on(async move {
        let mut w = WorkerClient::connect(url).await.unwrap();
        let node = |tokens: Vec<u32>, k: u32| pb::ExpandNode {
            prefix_tokens: tokens,
            k,
            temperature: 0.5,
            max_tokens: 4,
            ..Default::default()
        };
        let mut errs = Vec::new();
        for nodes in [
            vec![],
            vec![node(vec![1, 2, 3], 0)],
            vec![node(vec![1, 4_000_000_000], 1)],
            vec![node(vec![], 1)],
        ] {
            let e = w
                .expand(pb::ExpandRequest {
                    expansion_id: "bad".into(),
                    nodes,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            errs.push((e.code(), e.message().to_string()));
        }
        // A call made for another tokenizer is refused before any model work, naming both
        // fingerprints; Score too.
        let other = "0123456789abcdef0123456789abcdef".to_string();
        let refused = w
            .expand(pb::ExpandRequest {
                expansion_id: "other".into(),
                nodes: vec![node(vec![9707, 11, 1879], 1)],
                tokenizer_fingerprint: other.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let ours = model().tokenizer.fingerprint();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused.message().starts_with("tokenizer_fingerprint")
                && refused.message().contains(&other)
                && refused.message().contains(&ours),
            "{}",
            refused.message()
        );
        let refused = w
            .score(pb::ScoreRequest {
                paths: vec![pb::ScorePath {
                    prompt_tokens: vec![9707, 11, 1879],
                    steps: vec![pb::StepTokens {
                        token_ids: vec![11],
                    }],
                }],
                tokenizer_fingerprint: other,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        // Something too long to be a fingerprint is bad input, and is not echoed back.
        let long = w
            .expand(pb::ExpandRequest {
                nodes: vec![node(vec![9707, 11, 1879], 1)],
                tokenizer_fingerprint: "x".repeat(100_000),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(long.code(), Code::InvalidArgument, "{long:?}");
        assert!(
            long.message().starts_with("tokenizer_fingerprint") && long.message().len() < 200,
            "{}",
            long.message()
        );
        // And still serves a good call, made for its own tokenizer.
        let good = w
            .expand(pb::ExpandRequest {
                expansion_id: String::new(),
                nodes: vec![node(vec![9707, 11, 1879], 2)],
                tokenizer_fingerprint: ours,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(good.nodes[0].samples.len(), 2);
        // An expansion id names one request: a retry with the same nodes gets the first answer,
        // the same id with other nodes is refused rather than answered with the first one's
        // samples.
        let once = |tokens: Vec<u32>| pb::ExpandRequest {
            expansion_id: "once".into(),
            nodes: vec![node(tokens, 1)],
            ..Default::default()
        };
        let first = w.expand(once(vec![9707, 11])).await.unwrap().into_inner();
        let retry = w.expand(once(vec![9707, 11])).await.unwrap().into_inner();
        assert_eq!(first, retry);
        let reused = w.expand(once(vec![9707, 12])).await.unwrap_err();
        assert_eq!(reused.code(), Code::InvalidArgument, "{reused:?}");
        assert!(
            reused.message().starts_with("expansion_id") && reused.message().contains("`once`"),
            "{}",
            reused.message()
        );
        // Score recomputes a step's confidence by teacher forcing: it equals what sampling
        // measured (exp of the mean token log-prob).
        let sample = &good.nodes[0].samples[0];
        let scored = w
            .score(pb::ScoreRequest {
                paths: vec![pb::ScorePath {
                    prompt_tokens: vec![9707, 11, 1879],
                    steps: vec![pb::StepTokens {
                        token_ids: sample.token_ids.clone(),
                    }],
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mean = sample.logprobs.iter().sum::<f32>() / sample.logprobs.len() as f32;
        let got = scored.paths[0].scores[0];
        assert!(
            (got - mean.exp()).abs() < 1e-3,
            "score {got} vs sampled {}",
            mean.exp()
        );
        assert_eq!(
            scored.paths[0].tokens_computed,
            3 + sample.token_ids.len() as u64
        );
        errs
    });
    for (code, msg) in &bad_nodes {
        assert_eq!(*code, Code::InvalidArgument, "{msg}");
        assert!(msg.starts_with("nodes"), "{msg}");
    }
    let fine = c.rt.block_on(c.client.search(ok())).unwrap().into_inner();
    assert!(fine.costs.unwrap().generated_tokens > 0);
}

#[test]
fn cancelling_a_search_stops_the_workers_decoding() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3);
    // A long search: 16 samples of up to 400 tokens each.
    let mut req = request(
        "long",
        "Write a long story about a dragon.",
        pb::Strategy::BestOfN,
        100_000,
        2,
    );
    req.n = 16;
    req.sampling = Some(pb::SamplingOptions {
        temperature: Some(1.0),
        top_p: None,
        max_step_tokens: Some(400),
    });
    let mut client = c.client.clone();
    let search = c.rt.spawn(async move { stream(&mut client, req).await });
    let t = Instant::now();
    while c.in_flight().iter().sum::<u32>() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the search never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut client = c.client.clone();
    let cancelled =
        c.rt.block_on(client.cancel(pb::CancelRequest {
            request_id: "long".into(),
        }))
        .unwrap()
        .into_inner()
        .cancelled;
    assert!(cancelled);
    let cancelled_at = Instant::now();
    let (_, result) = c.rt.block_on(search).unwrap();
    assert_eq!(result.termination, "cancelled");
    loop {
        let busy = c.in_flight();
        if busy.iter().all(|&n| n == 0) {
            break;
        }
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(5),
            "workers still decoding for a cancelled search: {busy:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let unknown =
        c.rt.block_on(client.cancel(pb::CancelRequest {
            request_id: "long".into(),
        }))
        .unwrap()
        .into_inner();
    assert!(!unknown.cancelled, "a finished search cannot be cancelled");
}

/// `GetTree` on a running search returns a consistent copy of its tree as of the end of a
/// round, flagged as running, which grows as the search goes on; once the search has ended it
/// returns the finished tree.
#[test]
fn a_running_search_shows_its_tree_as_it_grows() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(1);
    // A budget this machine cannot spend in the test's time: the search is still running when
    // the copies are taken, and is cancelled after.
    let req = request("grow", QUESTION, pb::Strategy::Mcts, 1_000_000, 3);
    let mut client = c.client.clone();
    let search = c.rt.spawn(async move { stream(&mut client, req).await });
    let mut tree_client = c.client.clone();
    let mut live = |format: pb::TreeFormat| {
        c.rt.block_on(tree_client.get_tree(pb::GetTreeRequest {
            request_id: "grow".into(),
            format: format as i32,
        }))
    };
    let t = Instant::now();
    let nodes = |tree: &str| -> usize {
        let v: serde_json::Value = serde_json::from_str(tree).expect("the copy is JSON");
        v["nodes"].as_array().expect("nodes").len()
    };
    // Wait until the search is known (its first round may still be running).
    let first = loop {
        match live(pb::TreeFormat::Json) {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::NotFound || e.code() == Code::Unavailable => {
                assert!(t.elapsed() < Duration::from_secs(120), "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(first.running, "the search cannot have spent its budget yet");
    let first_nodes = nodes(&first.tree);
    assert!(
        first_nodes >= 2,
        "a copy after a round holds the root's children"
    );
    // Later copies hold more of the tree.
    let later = loop {
        let r = live(pb::TreeFormat::Json).unwrap().into_inner();
        assert!(r.running);
        if nodes(&r.tree) > first_nodes {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "the tree never grew"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let dot = live(pb::TreeFormat::Dot).unwrap().into_inner();
    assert!(
        dot.running && dot.tree.starts_with("digraph"),
        "{}",
        dot.tree
    );
    let mut client = c.client.clone();
    let cancelled =
        c.rt.block_on(client.cancel(pb::CancelRequest {
            request_id: "grow".into(),
        }))
        .unwrap()
        .into_inner()
        .cancelled;
    assert!(cancelled);
    let (_, result) = c.rt.block_on(search).unwrap();
    assert_eq!(result.termination, "cancelled");
    let done = live(pb::TreeFormat::Json).unwrap().into_inner();
    assert!(!done.running);
    let final_nodes = nodes(&done.tree);
    assert_eq!(final_nodes as u64, result.costs.unwrap().nodes);
    assert!(final_nodes >= nodes(&later.tree));
    assert_eq!(c.coordinator.invariant_violations(), 0);
}

#[test]
fn sixteen_concurrent_searches_do_not_mix_results() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3);
    let questions: Vec<String> = (0..16)
        .map(|i| format!("What is {} + {}?", 10 + i, 3 * i))
        .collect();
    let results = c.rt.block_on(async {
        let calls: Vec<_> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut client = c.client.clone();
                let req = request(&format!("c{i}"), q, pb::Strategy::Majority, 48, i as u64);
                tokio::spawn(async move { client.search(req).await.map(|r| r.into_inner()) })
            })
            .collect();
        let mut out = Vec::new();
        for call in calls {
            out.push(Arc::new(call.await.unwrap().unwrap()));
        }
        out
    });
    for (i, (q, r)) in questions.iter().zip(&results).enumerate() {
        assert_eq!(r.request_id, format!("c{i}"));
        let (answer, generated, nodes) = embedded(q, Strategy::Majority, 48, i as u64);
        let costs = r.costs.unwrap();
        assert_eq!(
            (&r.answer, costs.generated_tokens, costs.nodes),
            (&answer, generated, nodes),
            "search {i} ({q})"
        );
    }
}

/// 256 searches at once against a limit of 4: every one is answered (its own, whole result)
/// or refused with RESOURCE_EXHAUSTED naming the limit; none is lost, none fails another way,
/// and the coordinator holds nothing afterwards.
#[test]
fn searches_past_the_limit_are_refused_and_none_is_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::with_options(
        vec![WorkerProcess::start()],
        1,
        PoolOptions::default(),
        CoordinatorOptions {
            limits: arbor::rpc::limits::SearchLimits {
                searches_max: 4,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let results = c.rt.block_on(async {
        let calls: Vec<_> = (0..256)
            .map(|i| {
                let mut client = c.client.clone();
                let req = request(
                    &format!("many-{i}"),
                    &format!("What is {i} + 1?"),
                    pb::Strategy::BestOfN,
                    24,
                    i,
                );
                tokio::spawn(async move { client.search(req).await.map(|r| r.into_inner()) })
            })
            .collect();
        let mut out = Vec::new();
        for call in calls {
            out.push(call.await.unwrap());
        }
        out
    });
    let (mut answered, mut refused) = (0, 0);
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(r) => {
                assert_eq!(r.request_id, format!("many-{i}"));
                assert!(
                    !r.answer.is_empty() || r.termination.starts_with("budget"),
                    "{r:?}"
                );
                assert!(r.costs.unwrap().generated_tokens > 0, "{r:?}");
                answered += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "search {i}: {e:?}");
                assert!(e.message().contains('4'), "the limit is named: {e:?}");
                refused += 1;
            }
        }
    }
    eprintln!("256 searches against a limit of 4: {answered} answered, {refused} refused");
    assert_eq!(answered + refused, 256);
    assert!(answered >= 4, "only {answered} answered");
    assert!(refused > 0, "nothing was refused: the limit did not hold");
    // Every slot is free again: four more searches run at once.
    let again = c.rt.block_on(async {
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let mut client = c.client.clone();
                let req = request(
                    &format!("after-{i}"),
                    QUESTION,
                    pb::Strategy::BestOfN,
                    24,
                    i,
                );
                tokio::spawn(async move { client.search(req).await })
            })
            .collect();
        let mut ok = 0;
        for call in calls {
            ok += usize::from(call.await.unwrap().is_ok());
        }
        ok
    });
    assert_eq!(again, 4, "slots were still held after the burst");
}

/// TLS end to end, with client certificates: a worker started with `--tls-cert`, `--tls-key`
/// and `--tls-client-ca` serves a coordinator that trusts its CA and presents a certificate
/// from it, and a search runs through both over TLS. The worker turns away a coordinator
/// without a client certificate, one that trusts another CA, and plain `http://`, each named
/// with why; the coordinator's own TLS server turns away a plaintext client.
#[test]
fn workers_and_the_coordinator_serve_over_tls_with_client_certificates() {
    use arbor::rpc::tls::{self, ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pki = Pki::new("arbor-tls");
    let worker = WorkerProcess::start_with(&[
        "--tls-cert",
        &pki.arg("server.pem"),
        "--tls-key",
        &pki.arg("server-key.pem"),
        "--tls-client-ca",
        &pki.arg("ca.pem"),
    ]);
    assert!(
        worker.url.starts_with("https://127.0.0.1:"),
        "{}",
        worker.url
    );
    let client_tls = |ca: &str, with_cert: bool| {
        ClientTls::load(
            &ClientTlsFiles {
                ca: Some(pki.path(ca)),
                cert: with_cert.then(|| pki.path("client.pem")),
                key: with_cert.then(|| pki.path("client-key.pem")),
            },
            "workers-tls-",
        )
        .unwrap()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool_with = |url: String, tls: Option<ClientTls>| async move {
            WorkerPool::connect(
                vec![url.parse::<WorkerSpec>().unwrap()],
                PoolOptions {
                    health_interval: Duration::from_secs(3600),
                    tokenizer_fingerprint: Some(model().tokenizer.fingerprint()),
                    tls,
                    ..PoolOptions::default()
                },
            )
            .await
            .unwrap()
        };
        // Turned away, each with its reason (under TLS 1.3 a client without a certificate may
        // learn only that the server closed the connection).
        for (tls, url, needles) in [
            (
                client_tls("ca.pem", false),
                worker.url.clone(),
                &["transport error"][..],
            ),
            (
                client_tls("other-ca.pem", true),
                worker.url.clone(),
                &["UnknownIssuer", "--workers-tls-ca"][..],
            ),
            (None, worker.url.replace("https://", "http://"), &[][..]),
        ] {
            let pool = pool_with(url.clone(), tls).await;
            assert_eq!(pool.healthy(), 0, "{url} {needles:?}");
            let error = pool.members()[0]
                .last_error()
                .expect("the failure is named");
            for n in needles {
                assert!(error.contains(n), "{url}: expected {n:?} in {error}");
            }
        }

        // `dns://` workers under a pool with TLS settings: reached by address over TLS, the
        // certificate checked against the name (`localhost` may also give ::1, not listened on).
        let port = worker.url.rsplit(':').next().unwrap();
        let pool = pool_with(
            format!("dns://localhost:{port}"),
            client_tls("ca.pem", true),
        )
        .await;
        let up: Vec<String> = pool
            .members()
            .iter()
            .filter(|m| m.is_healthy())
            .map(|m| m.url().to_string())
            .collect();
        assert_eq!(up, [format!("https://127.0.0.1:{port}")]);

        // Trusted both ways: the coordinator serves over TLS too.
        let pool = pool_with(worker.url.clone(), client_tls("ca.pem", true)).await;
        assert_eq!(pool.healthy(), 1, "{:?}", pool.members()[0].last_error());
        assert!(pool.members()[0].last_error().is_none());
        let server_tls = ServerTls::load(
            &ServerTlsFiles {
                cert: Some(pki.path("server.pem")),
                key: Some(pki.path("server-key.pem")),
                client_ca: None,
            },
            "tls-",
        )
        .unwrap()
        .unwrap();
        let c = Coordinator::new(
            pool,
            model().tokenizer.clone(),
            CoordinatorOptions::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            coordinator::serve(
                c,
                listener,
                false,
                Some(&server_tls),
                std::future::pending(),
            )
            .await
            .unwrap()
        });
        let https = format!("https://127.0.0.1:{}", addr.port());
        let channel = tls::connect(&https, client_tls("ca.pem", false).as_ref())
            .await
            .unwrap();
        let result = SearchClient::new(channel)
            .search(request("tls", QUESTION, pb::Strategy::BestOfN, 48, 1))
            .await
            .unwrap()
            .into_inner();
        let costs = result.costs.unwrap();
        assert!(
            costs.generated_tokens > 0 && costs.policy_calls > 0,
            "{costs:?}"
        );

        // A plaintext client cannot talk to the TLS coordinator.
        let plain = SearchClient::connect(format!("http://127.0.0.1:{}", addr.port())).await;
        let refused = match plain {
            Err(_) => true,
            Ok(mut client) => client
                .search(request("plain", QUESTION, pb::Strategy::BestOfN, 48, 1))
                .await
                .is_err(),
        };
        assert!(
            refused,
            "a plaintext client got an answer from the TLS coordinator"
        );
    });
}

/// Expansion ids are unique to a search run: a second coordinator over the same worker (as
/// after a restart, which numbers its searches from the start again) that reuses a request id
/// for another question gets that question's own search, not answers the worker remembered
/// from the first.
#[test]
fn two_coordinators_reusing_a_request_id_over_one_worker_get_their_own_answers() {
    use arbor::rpc::pb::search_server::Search as _;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(1);
    let other = "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?";
    let (_, first) = c.rt.block_on(stream(
        &mut c.client,
        request("same", QUESTION, pb::Strategy::Mcts, 96, 3),
    ));
    let second = Coordinator::new(
        c.pool.clone(),
        model().tokenizer.clone(),
        CoordinatorOptions::default(),
    );
    let result =
        c.rt.block_on(second.search(tonic::Request::new(request(
            "same",
            other,
            pb::Strategy::Mcts,
            96,
            3,
        ))))
        .unwrap()
        .into_inner();
    let (answer, generated, nodes) = embedded(other, Strategy::Mcts, 96, 3);
    let costs = result.costs.unwrap();
    assert_eq!(
        (result.answer.as_str(), costs.generated_tokens, costs.nodes),
        (answer.as_str(), generated, nodes),
        "the second search is its question's own (the first answered {:?})",
        first.answer
    );
    assert_eq!(second.invariant_violations(), 0);
}

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`).
fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// One `Score` path: a short prompt and one step of `n` tokens.
fn score_request(n: usize) -> pb::ScoreRequest {
    pb::ScoreRequest {
        paths: vec![pb::ScorePath {
            prompt_tokens: vec![9707, 11, 1879],
            steps: vec![pb::StepTokens {
                token_ids: (0..n as u32).map(|i| 100 + i % 5000).collect(),
            }],
        }],
        ..Default::default()
    }
}

/// `Score` is bounded: a step, a path or a call beyond its limit is refused at once, naming the
/// field and the limit, and the worker keeps serving.
#[test]
fn an_oversized_score_is_refused_at_once_naming_the_field_and_the_limit() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let worker = WorkerProcess::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut w = WorkerClient::connect(worker.url.clone()).await.unwrap();
        let t = Instant::now();
        let e = w.score(score_request(6000)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with("paths[0].steps[0].token_ids") && e.message().contains("2048"),
            "{}",
            e.message()
        );
        // A path of many in-limit steps, longer than a path may be.
        let mut long = score_request(2000);
        long.paths[0].steps = (0..9).map(|_| long.paths[0].steps[0].clone()).collect();
        let e = w.score(long).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with("paths[0]:") && e.message().contains("16384"),
            "{}",
            e.message()
        );
        // Paths each within the limits, too many tokens together.
        let mut many = score_request(2000);
        let path = many.paths[0].clone();
        many.paths = (0..40).map(|_| path.clone()).collect();
        let e = w.score(many).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("65536"), "{}", e.message());
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "refused before any model work: {:?}",
            t.elapsed()
        );
        let ok = w.score(score_request(8)).await.unwrap().into_inner();
        assert_eq!(ok.paths[0].scores.len(), 1);
    });
}

/// A long `Score` is computed in chunks: the worker's memory does not grow with the step's
/// length times the vocabulary, the call counts in flight, expansions keep being served while
/// it runs, and a deadline stops it (its work too, not only the client's wait).
#[test]
fn a_long_score_keeps_memory_bounded_counts_in_flight_and_stops_at_its_deadline() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let worker = WorkerProcess::start();
    let pid = worker.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut w = WorkerClient::connect(worker.url.clone()).await.unwrap();
        let small = pb::ExpandRequest {
            nodes: vec![pb::ExpandNode {
                prefix_tokens: vec![9707, 11, 1879],
                k: 1,
                temperature: 0.5,
                max_tokens: 4,
                ..Default::default()
            }],
            ..Default::default()
        };
        // Warm up: engine buffers, pages of the weights.
        w.expand(small.clone()).await.unwrap();
        w.score(score_request(64)).await.unwrap();
        let before = proc_kb(pid, "VmRSS");
        // Reset the peak (VmHWM) to the current resident size.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        // 1500 tokens: a row of logits per token would be 1500 × 151,936 × 4 B = 912 MB.
        let mut bg = w.clone();
        let long = tokio::spawn(async move { bg.score(score_request(1500)).await });
        let t = Instant::now();
        let mut counted = false;
        while !long.is_finished() {
            let info = w
                .model_info(pb::ModelInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            counted |= info.in_flight > 0;
            if counted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(counted, "a running Score counts in flight");
        // An expansion sent meanwhile is answered between two chunks, long before the Score ends.
        let e0 = Instant::now();
        w.expand(small.clone()).await.unwrap();
        let expand_wait = e0.elapsed();
        let scored = long.await.unwrap().unwrap().into_inner();
        let score_time = t.elapsed();
        assert_eq!(scored.paths[0].scores.len(), 1);
        assert!(
            expand_wait < score_time / 2,
            "an expansion waited {expand_wait:?} behind a Score of {score_time:?}"
        );
        let peak = proc_kb(pid, "VmHWM");
        let grown_mb = peak.saturating_sub(before) / 1024;
        assert!(
            grown_mb < 300,
            "the worker's peak memory grew {grown_mb} MB scoring 1500 tokens"
        );
        // A deadline stops the work: an expansion sent right after is not kept waiting.
        let mut req = tonic::Request::new(score_request(2000));
        req.set_timeout(Duration::from_millis(300));
        let e = w.score(req).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{e:?}"
        );
        let e0 = Instant::now();
        w.expand(small.clone()).await.unwrap();
        assert!(
            e0.elapsed() < score_time / 3,
            "an expansion waited {:?} behind a Score past its deadline",
            e0.elapsed()
        );
        let t = Instant::now();
        loop {
            let info = w
                .model_info(pb::ModelInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            if info.in_flight == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "a stopped Score is still in flight"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// A fake worker (no model): answers health checks SERVING, and each `Expand` with
/// `answer(n)` (n: the calls it had before) after `delay`, recording when each call came.
#[derive(Clone)]
struct Fake {
    calls: Arc<Mutex<Vec<Instant>>>,
    answer: Arc<dyn Fn(usize) -> Result<(), tonic::Status> + Send + Sync>,
    delay: Duration,
}

impl Fake {
    fn new(answer: impl Fn(usize) -> Result<(), tonic::Status> + Send + Sync + 'static) -> Fake {
        Fake {
            calls: Arc::default(),
            answer: Arc::new(answer),
            delay: Duration::ZERO,
        }
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }

    /// Serves it on a free port of 127.0.0.1 (on the current runtime); returns its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<pb::worker_server::WorkerServer<Fake>>()
            .await;
        let svc = pb::worker_server::WorkerServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap()
        });
        format!("http://{addr}")
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for Fake {
    async fn expand(
        &self,
        request: tonic::Request<pb::ExpandRequest>,
    ) -> Result<tonic::Response<pb::ExpandResponse>, tonic::Status> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len() - 1
        };
        tokio::time::sleep(self.delay).await;
        (self.answer)(n)?;
        let nodes = request
            .into_inner()
            .nodes
            .iter()
            .map(|node| pb::NodeSamples {
                samples: (0..node.k)
                    .map(|_| pb::Sample {
                        token_ids: vec![1],
                        logprobs: vec![-0.1],
                        text: "x".into(),
                        stop_reason: pb::StopReason::Delimiter as i32,
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        Ok(tonic::Response::new(pb::ExpandResponse { nodes }))
    }

    async fn score(
        &self,
        _request: tonic::Request<pb::ScoreRequest>,
    ) -> Result<tonic::Response<pb::ScoreResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn model_info(
        &self,
        _request: tonic::Request<pb::ModelInfoRequest>,
    ) -> Result<tonic::Response<pb::ModelInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ModelInfoResponse::default()))
    }
}

/// A pool over `urls`, health checked once an hour (only calls change what it knows).
async fn fake_pool(urls: &[String], options: PoolOptions) -> WorkerPool {
    WorkerPool::connect(
        urls.iter()
            .map(|u| u.parse::<WorkerSpec>().unwrap())
            .collect(),
        PoolOptions {
            health_interval: Duration::from_secs(3600),
            ..options
        },
    )
    .await
    .unwrap()
}

/// One expansion of the root through `pool`, as a search makes it.
async fn propose_once(
    pool: &WorkerPool,
    deadline: Option<Instant>,
) -> Result<Vec<arbor_search::Proposals>, arbor_search::PolicyError> {
    use arbor_search::Policy as _;
    let remote =
        arbor::rpc::pool::RemotePolicy::new(pool.clone(), vec![1, 2, 3], deadline, "\n\n".into());
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
}

/// Only a failed connection or UNAVAILABLE takes a worker out of rotation: a worker that
/// answers INVALID_ARGUMENT, INTERNAL, CANCELLED or DEADLINE_EXCEEDED (a request's fault, or a
/// search's own deadline) stays in it. One poison request tried on three workers leaves all
/// three healthy.
#[test]
fn only_transport_failures_and_unavailable_take_a_worker_out_of_rotation() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use tonic::Status;
        // (name, how the fake worker answers call n, whether the worker stays in rotation).
        type Answer = fn(usize) -> Result<(), Status>;
        let answers: Vec<(&str, Answer, bool)> = vec![
            (
                "invalid",
                |_| Err(Status::invalid_argument("nodes[0].k: bad")),
                true,
            ),
            ("internal", |_| Err(Status::internal("poison")), true),
            ("cancelled", |_| Err(Status::cancelled("cancelled")), true),
            (
                "deadline",
                |_| Err(Status::deadline_exceeded("deadline exceeded")),
                true,
            ),
            (
                "unavailable",
                |_| Err(Status::unavailable("engine stopped")),
                false,
            ),
        ];
        for (name, answer, stays) in answers {
            let fake = Fake::new(answer);
            let url = fake.serve().await;
            let pool = fake_pool(&[url], PoolOptions::default()).await;
            assert_eq!(pool.healthy(), 1);
            assert!(propose_once(&pool, None).await.is_err(), "{name}");
            assert_eq!(pool.healthy() == 1, stays, "{name}");
        }
        // A poison request (INTERNAL everywhere) leaves all three workers in rotation.
        let fakes: Vec<Fake> = (0..3)
            .map(|_| Fake::new(|_| Err(Status::internal("poison"))))
            .collect();
        let mut urls = Vec::new();
        for f in &fakes {
            urls.push(f.serve().await);
        }
        let pool = fake_pool(&urls, PoolOptions::default()).await;
        assert!(propose_once(&pool, None).await.is_err());
        assert_eq!(pool.healthy(), 3, "a poison request took workers out");
        // A search's deadline that passes during a slow call is not the worker's fault.
        let mut slow = Fake::new(|_| Ok(()));
        slow.delay = Duration::from_secs(3);
        let url = slow.serve().await;
        let pool = fake_pool(&[url], PoolOptions::default()).await;
        let e = propose_once(&pool, Some(Instant::now() + Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("ancel") || e.to_string().contains("eadline"),
            "{e}"
        );
        assert_eq!(
            pool.healthy(),
            1,
            "the search's own deadline took the worker out"
        );
        // A worker that is gone is taken out.
        let pool = fake_pool(&["http://127.0.0.1:1".to_string()], PoolOptions::default()).await;
        assert_eq!(pool.healthy(), 0);
    });
}

/// A call spread over two workers where one fails for good keeps the other's samples: the
/// error carries them (`PolicyError::partial`), so the search keeps that work and its cost.
#[test]
fn a_failed_expansion_group_keeps_the_other_groups_work() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use arbor_search::Policy as _;
        let good = Fake::new(|_| Ok(()));
        let bad = Fake::new(|_| Err(tonic::Status::invalid_argument("nodes[0].k: poison")));
        let urls = vec![good.serve().await, bad.serve().await];
        let pool = fake_pool(&urls, PoolOptions::default()).await;
        let remote =
            arbor::rpc::pool::RemotePolicy::new(pool.clone(), vec![1, 2, 3], None, "\n\n".into());
        let request = |node: u32| arbor_search::ProposeRequest {
            node: arbor_search::NodeId::ROOT,
            prompt: "p".into(),
            steps: vec![],
            k: 1 + node,
            sampling: arbor_search::Sampling {
                temperature: 0.5,
                top_p: 1.0,
                max_step_tokens: 4,
                seed: u64::from(node),
            },
        };
        // Two root nodes with no worker to prefer: one goes to each worker.
        let e = remote
            .propose(vec![request(0), request(1)])
            .await
            .expect_err("one worker refused its group");
        assert!(e.message.contains("poison"), "{e}");
        assert_eq!(e.partial.len(), 2, "one slot per request");
        assert_eq!(good.calls().len(), 1);
        assert_eq!(bad.calls().len(), 1, "INVALID_ARGUMENT is not re-sent");
        let kept: Vec<_> = e.partial.iter().flatten().collect();
        assert_eq!(
            kept.len(),
            1,
            "the good worker's group is kept: {:?}",
            e.partial
        );
        let i = e.partial.iter().position(Option::is_some).unwrap();
        assert_eq!(
            kept[0].steps.len(),
            1 + i,
            "the kept reply answers its own request"
        );
        assert_eq!(kept[0].cost.generated_tokens, (1 + i) as u64);
    });
}

/// Re-sends back off exponentially with jitter: a worker that says RESOURCE_EXHAUSTED is not
/// sent the call again at once, nor is another equally full one; and a retry budget stops
/// re-sending when most calls fail.
#[test]
fn retries_back_off_with_jitter_and_stop_when_the_retry_budget_is_spent() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use tonic::Status;
        // Two workers, both full for their first two calls.
        let fakes: Vec<Fake> = (0..2)
            .map(|_| {
                Fake::new(|n| {
                    if n < 2 {
                        Err(Status::resource_exhausted("worker overloaded"))
                    } else {
                        Ok(())
                    }
                })
            })
            .collect();
        let mut urls = Vec::new();
        for f in &fakes {
            urls.push(f.serve().await);
        }
        let options = PoolOptions {
            attempts: 6,
            backoff_base: Duration::from_millis(100),
            ..PoolOptions::default()
        };
        let pool = fake_pool(&urls, options.clone()).await;
        propose_once(&pool, None).await.expect("succeeds once a worker has room");
        let mut times: Vec<Instant> = fakes.iter().flat_map(|f| f.calls()).collect();
        times.sort();
        assert!(times.len() >= 4, "{} calls", times.len());
        for w in times.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= Duration::from_millis(40),
                "a RESOURCE_EXHAUSTED call was re-sent after only {gap:?}"
            );
        }
        // Later re-sends wait longer (exponential), whatever the jitter.
        let first_gap = times[1] - times[0];
        let last_gap = times[times.len() - 1] - times[times.len() - 2];
        assert!(last_gap > first_gap, "{first_gap:?} then {last_gap:?}");

        // Every call fails (INTERNAL: re-sent, worker kept): the budget caps the re-sends.
        let fakes: Vec<Fake> = (0..3).map(|_| Fake::new(|_| Err(Status::internal("boom")))).collect();
        let mut urls = Vec::new();
        for f in &fakes {
            urls.push(f.serve().await);
        }
        let pool = fake_pool(
            &urls,
            PoolOptions {
                backoff_base: Duration::from_millis(1),
                ..PoolOptions::default()
            },
        )
        .await;
        for _ in 0..40 {
            assert!(propose_once(&pool, None).await.is_err());
        }
        let sent: usize = fakes.iter().map(|f| f.calls().len()).sum();
        let (retries, refused) = pool.retries();
        assert!(
            sent <= 40 + 10,
            "{sent} calls for 40 requests: re-sends were not budgeted ({retries} made, {refused} refused)"
        );
        assert!(refused > 0);
    });
}

/// A search client sending `token` (if any) as `authorization: Bearer TOKEN`.
type TokenClient = SearchClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<
            dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>
                + Send
                + Sync,
        >,
    >,
>;

async fn client_with_token(url: &str, token: Option<&str>) -> TokenClient {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: Option<tonic::metadata::AsciiMetadataValue> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    SearchClient::with_interceptor(
        channel,
        Box::new(move |mut req: tonic::Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut().insert("authorization", h.clone());
            }
            Ok(req)
        }),
    )
}

async fn health_status(url: &str, service: &str) -> Result<i32, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    Ok(h.check(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    })
    .await?
    .into_inner()
    .status)
}

/// Bearer tokens on both servers: without a valid token a call is UNAUTHENTICATED while
/// health stays open; the coordinator reaches its workers with its own token; ids the server
/// makes are random; and one token's searches are invisible to another (NOT_FOUND).
#[test]
fn tokens_authenticate_callers_and_each_token_sees_only_its_own_searches() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("arbor-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let worker_tokens = dir.join("worker-tokens");
    std::fs::write(&worker_tokens, "# the coordinator's\nw0rker-t0ken\n").unwrap();
    let worker = WorkerProcess::start_with(&["--auth-token-file", worker_tokens.to_str().unwrap()]);
    let wurl = worker.url.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut w = WorkerClient::connect(wurl.clone()).await.unwrap();
        let e = w.model_info(pb::ModelInfoRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert_eq!(
            health_status(&wurl, "arbor.v1.Worker").await.unwrap(),
            ServingStatus::Serving as i32,
            "health needs no token"
        );
    });
    drop(rt);
    let c = Cluster::with_options(
        vec![worker],
        1,
        PoolOptions {
            auth_token: Some("w0rker-t0ken".into()),
            ..PoolOptions::default()
        },
        CoordinatorOptions {
            auth: Some(arbor::rpc::auth::Tokens::new([
                "alice-token".to_string(),
                "bob-token".to_string(),
            ])),
            ..CoordinatorOptions::default()
        },
    );
    c.rt.block_on(async {
        let small = |id: &str| request(id, "What is 2 + 3?", pb::Strategy::BestOfN, 16, 1);
        for token in [None, Some("mallory"), Some("alice-token ")] {
            let mut client = client_with_token(&c.url, token).await;
            let e = client.search(small("")).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
        }
        assert_eq!(
            health_status(&c.url, "").await.unwrap(),
            ServingStatus::Serving as i32
        );
        let mut alice = client_with_token(&c.url, Some("alice-token")).await;
        let mut bob = client_with_token(&c.url, Some("bob-token")).await;
        // Server-made ids are random, not a sequence.
        let a1 = alice
            .search(small(""))
            .await
            .unwrap()
            .into_inner()
            .request_id;
        let a2 = alice
            .search(small(""))
            .await
            .unwrap()
            .into_inner()
            .request_id;
        for id in [&a1, &a2] {
            assert!(
                id.len() >= 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
                "{id}"
            );
        }
        assert_ne!(a1, a2);
        let tree = |id: &str| pb::GetTreeRequest {
            request_id: id.into(),
            format: pb::TreeFormat::Json as i32,
        };
        alice.get_tree(tree(&a1)).await.unwrap();
        let e = bob.get_tree(tree(&a1)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let e = bob
            .cancel(pb::CancelRequest {
                request_id: a1.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        // The same client id for two tokens: two searches, each its owner's.
        let mine = alice.search(small("mine")).await.unwrap().into_inner();
        let theirs = bob
            .search(request(
                "mine",
                "What is 7 + 8?",
                pb::Strategy::BestOfN,
                16,
                1,
            ))
            .await
            .unwrap()
            .into_inner();
        let alice_tree = alice
            .get_tree(tree("mine"))
            .await
            .unwrap()
            .into_inner()
            .tree;
        let bob_tree = bob.get_tree(tree("mine")).await.unwrap().into_inner().tree;
        assert!(alice_tree.contains("2 + 3") && !alice_tree.contains("7 + 8"));
        assert!(bob_tree.contains("7 + 8") && !bob_tree.contains("2 + 3"));
        assert!(
            mine.costs.unwrap().generated_tokens > 0 && theirs.costs.unwrap().generated_tokens > 0
        );
    });
    // The command-line client sends ARBOR_TOKEN, and without it is refused, saying why.
    let cli = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arbor"));
        cmd.args(["search", "--coordinator", &c.url, "--strategy", "best-of-n"])
            .args([
                "--n",
                "1",
                "--budget-tokens",
                "16",
                "--json",
                "What is 2 + 3?",
            ])
            .env_remove("ARBOR_TOKEN");
        if let Some(token) = token {
            cmd.env("ARBOR_TOKEN", token);
        }
        cmd.output().expect("run arbor search")
    };
    let out = cli(Some("alice-token"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("generated_tokens"), "{stdout}");
    for token in [None, Some("mallory")] {
        let out = cli(token);
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{token:?} was let in");
        assert!(
            stderr.contains("unauthenticated") || stderr.contains("token"),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An `arbor serve` process, killed when dropped.
struct ServeProcess {
    child: Child,
    url: String,
}

impl ServeProcess {
    fn start(args: &[&str]) -> ServeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--health-interval-ms",
                "300",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start arbor serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("coordinator exited before listening")
                .unwrap();
            if let Some(a) = line.strip_prefix("arbor coordinator listening on ") {
                break a.split_whitespace().next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        ServeProcess {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Waits up to `limit` for `child` to exit; its exit status.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            t.elapsed() < limit,
            "the process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM on a real coordinator process mid-search: health turns NOT_SERVING (both `""` and
/// the named service), new searches get UNAVAILABLE, the running search finishes with its
/// full answer, then the process exits 0. SIGINT drains a worker the same way.
#[test]
fn sigterm_drains_running_searches_refuses_new_ones_and_exits_zero() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut worker = WorkerProcess::start();
    let mut serve = ServeProcess::start(&["--workers", &worker.url, "--drain-timeout", "120s"]);
    let url = serve.url.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = SearchClient::connect(url.clone()).await.unwrap();
        let t = Instant::now();
        while health_status(&url, "arbor.v1.Search").await.unwrap() != ServingStatus::Serving as i32
        {
            assert!(t.elapsed() < Duration::from_secs(30), "never healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let req = request("drained", QUESTION, pb::Strategy::BestOfN, 160, 4);
        let mut s = client.search_stream(req).await.unwrap().into_inner();
        // Under way: its first event arrived.
        let first = s.message().await.unwrap();
        assert!(first.is_some());
        signal(&serve.child, "TERM");
        let t = Instant::now();
        for service in ["", "arbor.v1.Search"] {
            loop {
                let st = health_status(&url, service).await.unwrap();
                if st == ServingStatus::NotServing as i32 {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(3),
                    "`{service}` still {st}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let e = client
            .search(request("late", QUESTION, pb::Strategy::BestOfN, 16, 1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        let mut result = None;
        while let Some(ev) = s.message().await.unwrap() {
            if let Some(pb::search_event::Event::Result(r)) = ev.event {
                result = Some(r);
            }
        }
        let result = result.expect("the running search finished");
        assert!(
            result.termination.starts_with("budget") || result.termination == "completed",
            "{}",
            result.termination
        );
        assert!(result.costs.unwrap().generated_tokens > 0);
    });
    let status = wait_exit(&mut serve.child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status:?}");
    signal(&worker.child, "INT");
    let status = wait_exit(&mut worker.child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A `SearchStream` reader that reads nothing does not freeze its search: the search runs to
/// its end while the reader sleeps, and the reader, too slow for too long, is cut off with
/// RESOURCE_EXHAUSTED naming `GetTree`, where the finished tree waits.
#[test]
fn a_stream_reader_that_reads_nothing_does_not_freeze_its_search() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::with_options(
        vec![WorkerProcess::start()],
        1,
        PoolOptions::default(),
        CoordinatorOptions {
            stream_buffer: 2,
            stream_stall_max: Duration::from_secs(2),
            ..CoordinatorOptions::default()
        },
    );
    c.rt.block_on(async {
        // A small HTTP/2 window, so the transport does not hide the slow reader.
        let channel = tonic::transport::Endpoint::from_shared(c.url.clone())
            .unwrap()
            .initial_stream_window_size(Some(256))
            .initial_connection_window_size(Some(256))
            .connect()
            .await
            .unwrap();
        let mut slow = SearchClient::new(channel);
        let mut req = request("slow", QUESTION, pb::Strategy::Mcts, 240, 2);
        req.sampling = Some(pb::SamplingOptions {
            temperature: Some(0.8),
            top_p: None,
            max_step_tokens: Some(8),
        });
        let mut stream = slow.search_stream(req).await.unwrap().into_inner();
        let mut client = c.client.clone();
        let t = Instant::now();
        loop {
            match client
                .get_tree(pb::GetTreeRequest {
                    request_id: "slow".into(),
                    format: pb::TreeFormat::Json as i32,
                })
                .await
            {
                Ok(r) if !r.get_ref().running => break,
                Ok(_) => {}
                Err(e) if matches!(e.code(), Code::NotFound | Code::Unavailable) => {}
                Err(e) => panic!("{e:?}"),
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "the search froze behind its stream reader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Still reading nothing for longer than the rule allows (the search may have ended
        // before it did), then read: some events, then the cut-off.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut events = 0;
        let e = loop {
            match stream.message().await {
                Ok(Some(pb::SearchEvent {
                    event: Some(pb::search_event::Event::Result(_)),
                })) => {
                    panic!("a reader that stalled for longer than the rule allows got the result")
                }
                Ok(Some(_)) => events += 1,
                Ok(None) => panic!("the stream ended without a status"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("GetTree"), "{}", e.message());
        eprintln!("{events} events read before the cut-off");
    });
}

/// A search under a client deadline returns its best answer so far (OK, terminated by the
/// deadline) instead of the call failing with DEADLINE_EXCEEDED.
#[test]
fn a_client_deadline_returns_the_best_answer_so_far() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(1);
    let mut client = c.client.clone();
    let mut search = request("deadline", QUESTION, pb::Strategy::Mcts, 1_000_000, 7);
    search.sampling = Some(pb::SamplingOptions {
        temperature: Some(0.7),
        top_p: None,
        max_step_tokens: Some(16),
    });
    let mut req = tonic::Request::new(search);
    req.set_timeout(Duration::from_secs(10));
    let t = Instant::now();
    let result =
        c.rt.block_on(client.search(req))
            .expect("an answer before the deadline")
            .into_inner();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        result.termination.contains("deadline"),
        "{}",
        result.termination
    );
    assert!(result.costs.unwrap().generated_tokens > 0);
}

/// A worker stopped with SIGSTOP mid-search (its connections stay open, it answers nothing) is
/// detected by HTTP/2 keepalive within seconds: its calls are re-sent to the other worker and
/// the search completes with the result a healthy run gives.
#[test]
fn a_worker_stopped_with_sigstop_mid_search_is_detected_and_its_calls_re_sent() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(2);
    let req = request("stop", QUESTION, pb::Strategy::Beam, 240, 9);
    let mut client = c.client.clone();
    let search = c.rt.spawn(async move { stream(&mut client, req).await });
    let busiest = c.busiest_once_under_way();
    signal(&c.workers[busiest].child, "STOP");
    let stopped_at = Instant::now();
    let done =
        c.rt.block_on(async { tokio::time::timeout(Duration::from_secs(240), search).await });
    signal(&c.workers[busiest].child, "CONT");
    let (_, result) = done
        .expect("the search hung on the stopped worker")
        .unwrap();
    eprintln!("finished {:?} after the stop", stopped_at.elapsed());
    let costs = result.costs.unwrap();
    let (answer, generated, _) = embedded(QUESTION, Strategy::Beam, 240, 9);
    assert_eq!((result.answer, costs.generated_tokens), (answer, generated));
    assert_eq!(c.coordinator.invariant_violations(), 0);
}

/// A `dns://` name whose lookups start failing (a DNS server down) keeps the members it last
/// resolved to: the pool does not empty, and searches go on.
#[test]
fn a_dns_name_that_stops_resolving_keeps_its_last_known_members() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let fake = Fake::new(|_| Ok(()));
        let url = fake.serve().await;
        let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
        let resolving = Arc::new(AtomicBool::new(true));
        let flag = resolving.clone();
        let resolver = arbor::rpc::pool::Resolver(Arc::new(move |host: String, _port: u16| {
            let ok = flag.load(Ordering::SeqCst);
            Box::pin(async move {
                if ok && host == "workers.test" {
                    Ok(vec![addr])
                } else {
                    Err(std::io::Error::other("no answer from the DNS server"))
                }
            })
        }));
        let pool = WorkerPool::connect(
            vec![format!("dns://workers.test:{}", addr.port())
                .parse()
                .unwrap()],
            PoolOptions {
                health_interval: Duration::from_millis(100),
                resolver: Some(resolver),
                ..PoolOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!((pool.members().len(), pool.healthy()), (1, 1));
        resolving.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            (pool.members().len(), pool.healthy()),
            (1, 1),
            "failed lookups emptied the pool"
        );
        propose_once(&pool, None)
            .await
            .expect("the kept worker serves");
    });
}

/// Runs `arbor eval` with `args` (plus `--out out`), failing the test on a non-zero exit.
fn arbor_eval(args: &[&str], out: &std::path::Path) -> Vec<serde_json::Value> {
    let status = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .arg("eval")
        .args(args)
        .arg("--out")
        .arg(out)
        .env_remove("ARBOR_TOKEN")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "arbor eval {args:?} failed: {status}");
    let text = std::fs::read_to_string(out.join("traces.jsonl")).unwrap();
    let mut records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    records.sort_by_key(|r| {
        (
            r["index"].as_u64(),
            r["strategy"].as_str().map(String::from),
            r["budget"].as_u64(),
        )
    });
    records
}

/// `arbor eval --coordinator` runs each cell as a search on the coordinator's three workers, and
/// its traces are the embedded run's: same answers, paths, token counts, nodes and terminations
/// for the same seed.
#[test]
fn eval_on_a_coordinator_gives_the_embedded_traces() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3);
    let dir = std::env::temp_dir().join(format!("arbor-eval-remote-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dataset = dir.join("two.jsonl");
    std::fs::write(
        &dataset,
        [
            r#"{"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"}"#,
            r#"{"question": "Tom has 3 apples and buys 5 more. How many apples does he have?", "answer": "3+5=8\n#### 8"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let common = [
        "--dataset",
        dataset.to_str().unwrap(),
        "--strategies",
        "mcts,beam,majority",
        "--budgets",
        "160",
        "--no-sample-reuse",
        "--seed",
        "3",
    ];
    let remote_args: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--coordinator", &c.url, "--concurrency", "6"])
        .collect();
    let remote = arbor_eval(&remote_args, &dir.join("remote"));
    let embedded = arbor_eval(&common, &dir.join("embedded"));
    assert_eq!(remote.len(), 6, "2 questions × 3 strategies × 1 budget");
    assert_eq!(embedded.len(), 6);
    for (r, e) in remote.iter().zip(&embedded) {
        let cell = format!("{} {} {}", r["index"], r["strategy"], r["budget"]);
        for field in [
            "answer",
            "answer_key",
            "path",
            "termination",
            "correct",
            "seed",
        ] {
            assert_eq!(r[field], e[field], "{cell}: {field}");
        }
        for cost in ["generated_tokens", "nodes", "policy_calls"] {
            assert_eq!(r["costs"][cost], e["costs"][cost], "{cell}: costs.{cost}");
        }
        assert!(
            r["costs"]["generated_tokens"].as_u64().unwrap() > 0,
            "{cell}"
        );
    }
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("remote/run.json")).unwrap())
            .unwrap();
    assert!(
        run.to_string().contains("coordinator"),
        "run.json names the coordinator: {run}"
    );
    // A PRM the workers do not serve is refused before anything runs, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args([
            "eval",
            "--prm",
            "judge",
            "--coordinator",
            &c.url,
            "--dataset",
        ])
        .arg(&dataset)
        .arg("--out")
        .arg(dir.join("judge"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--prm judge with --coordinator"), "{err}");
    assert!(
        !dir.join("judge").exists(),
        "nothing is written for a refused run"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The CPU backend, except that its forward pass panics once `passes_left` passes have run: a
/// stand-in for a bug in a kernel that takes the engine thread down.
struct PanicsAfter {
    inner: CpuBackend,
    passes_left: usize,
}

impl arbor_model::backend::Backend for PanicsAfter {
    fn name(&self) -> &'static str {
        "panics-after"
    }
    fn config(&self) -> &arbor_model::ModelConfig {
        self.inner.config()
    }
    fn ensure_kv_blocks(&mut self, n_blocks: usize) -> arbor_model::Result<()> {
        self.inner.ensure_kv_blocks(n_blocks)
    }
    fn copy_kv_block(&mut self, src: u32, dst: u32, n_tokens: usize) {
        self.inner.copy_kv_block(src, dst, n_tokens)
    }
    fn forward(
        &mut self,
        batch: &arbor_model::backend::ForwardBatch<'_>,
        logits: &mut Vec<f32>,
        hidden: &mut Vec<f32>,
    ) -> arbor_model::Result<()> {
        assert!(self.passes_left > 0, "injected kernel failure");
        self.passes_left -= 1;
        self.inner.forward(batch, logits, hidden)
    }
}

/// A worker whose engine thread has died is neither ready nor alive: every health status turns
/// NOT_SERVING (liveness included, so an orchestrator restarts it), where before its health
/// stayed SERVING and the pool kept sending it calls that all failed.
#[test]
fn a_worker_whose_engine_thread_died_is_neither_ready_nor_alive() {
    let dir = tiny_model_dir("arbor-engine-dies");
    let model = Model::load(&dir).unwrap();
    let backend = PanicsAfter {
        inner: CpuBackend::new(model.config.clone(), model.weights.clone()),
        passes_left: 1,
    };
    let engine = Engine::new(Box::new(backend), EngineOptions::default());
    let worker = LocalWorker::new(&model, engine, WorkerOptions::default());
    let service = arbor::rpc::worker::WorkerService::new(worker.clone(), Default::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(arbor::rpc::worker::serve(
            service,
            listener,
            false,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        let services = ["", "arbor.v1.Worker", arbor::rpc::LIVENESS];
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        let t = Instant::now();
        for s in services {
            while health_status(&url, s).await.ok() != Some(serving) {
                assert!(t.elapsed() < Duration::from_secs(10), "{s:?} never served");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // The prompt's pass runs; the first decode pass panics and ends the engine thread.
        let mut w = WorkerClient::connect(url.clone()).await.unwrap();
        let failed = w
            .expand(pb::ExpandRequest {
                expansion_id: "dies".into(),
                nodes: vec![pb::ExpandNode {
                    prefix_tokens: vec![1, 2, 3],
                    k: 1,
                    temperature: 0.5,
                    max_tokens: 8,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
        // The thread marks itself ended before its callers' replies are dropped.
        assert!(!worker.engine_running());
        let t = Instant::now();
        for s in services {
            loop {
                let status = health_status(&url, s).await.unwrap();
                if status
                    == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
                {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "{s:?} still {status} after the engine thread died"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    std::fs::remove_dir_all(&dir).ok();
}

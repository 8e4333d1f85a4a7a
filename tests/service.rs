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
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let specs = workers
            .iter()
            .map(|w| w.url.parse::<WorkerSpec>().unwrap())
            .collect();
        let (coordinator, client, shutdown, pool) = rt.block_on(async {
            let pool = WorkerPool::connect(
                specs,
                PoolOptions {
                    health_interval,
                    tokenizer_fingerprint: Some(model().tokenizer.fingerprint()),
                    ..PoolOptions::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(
                pool.healthy(),
                usable,
                "every worker with the coordinator's tokenizer answers its checks"
            );
            let coordinator = Coordinator::new(
                pool.clone(),
                model().tokenizer.clone(),
                CoordinatorOptions::default(),
            );
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
            (coordinator, client, tx, pool)
        });
        Cluster {
            rt,
            workers,
            coordinator,
            client,
            pool,
            _shutdown: shutdown,
        }
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
    // Wait until the search is under way, then kill the busiest worker.
    let t = Instant::now();
    loop {
        let busy: u32 = c.in_flight().iter().sum();
        if busy > 0 && t.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the search never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let loads = c.in_flight();
    let busiest = (0..loads.len()).max_by_key(|&i| loads[i]).unwrap();
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

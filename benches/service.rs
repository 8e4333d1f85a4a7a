//! What the network costs: the same work in-process and over loopback gRPC.
//!
//! `cargo bench --bench service` measures, with the real default model and `arbor worker`
//! processes on 127.0.0.1:
//! 1. a bare gRPC round trip (`ModelInfo`, no model work), in plain text and over TLS (a worker
//!    started with `--tls-cert`, a certificate made here);
//! 2. a minimal expansion (1 sample of 1 token after a 3-token prefix): `LocalWorker::expand`
//!    in-process against `Expand` over gRPC, in plain text and over TLS;
//! 3. a whole search (MCTS, 256 generated tokens, GSM8K question 0): embedded, through a
//!    coordinator with one worker, and with three; the overhead per expansion call is
//!    (coordinated wall − embedded wall) / policy calls; and through a coordinator with one
//!    worker recording metrics (`--metrics-listen`), against the same without; and secured:
//!    a bearer token on both hops (`--auth-token-file` on a worker recording metrics too, the
//!    coordinator sending it and requiring it of its client) with metrics on both servers,
//!    against a twin worker and coordinator with neither (each serving only its own searches).
//!    The ratios are taken per round (the variants run moments apart) and shown with their
//!    range, beside the range of two plain runs against each other: the noise.
//!
//! Rounds are interleaved (each starting at another variant) and medians reported, so machine
//! noise hits every variant alike.
//! Options (env): `ARBOR_BENCH_ROUNDS` (default 3).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor::rpc::coordinator::{self, Coordinator, CoordinatorOptions};
use arbor::rpc::metrics::{Exposition, PoolMetrics, SearchMetrics};
use arbor::rpc::pb;
use arbor::rpc::pb::search_client::SearchClient;
use arbor::rpc::pb::worker_client::WorkerClient;
use arbor::rpc::pool::{PoolOptions, WorkerPool, WorkerSpec};
use arbor::strategy::{strategy_config, Strategy};
use arbor_model::backend::cpu::CpuBackend;
use arbor_model::{Engine, EngineOptions, Model, SamplingParams};
use arbor_search::{LogProbScorer, Search, SearchControl};
use arbor_worker::{ExpandItem, LocalWorker, WorkerOptions};

const QUESTION: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?";
const BUDGET: u64 = 256;

struct Proc(Child, String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and a certificate from it for 127.0.0.1, as PEM files in `dir`: `ca.pem`, `cert.pem`,
/// `key.pem`.
fn make_certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("cert.pem", cert.pem()),
        ("key.pem", key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn start_worker(args: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["worker", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start arbor worker");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("worker exited").unwrap();
        if let Some(a) = line.strip_prefix("arbor worker listening on ") {
            // "ADDR" or "ADDR (TLS)".
            let scheme = if a.contains("(TLS") { "https" } else { "http" };
            break format!("{scheme}://{}", a.split_whitespace().next().unwrap());
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Proc(child, addr)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn coordinator_for(
    urls: &[String],
    model: &Model,
) -> SearchClient<tonic::transport::Channel> {
    coordinator_with(urls, model, None, false).await
}

/// The bearer token of the secured variant, on both hops.
const TOKEN: &str = "bench-token-0123456789abcdef";

/// A coordinator over `urls`, recording its metrics in `registry` when given; with `secured`,
/// it sends [`TOKEN`] to its workers and requires it of its clients.
async fn coordinator_with(
    urls: &[String],
    model: &Model,
    registry: Option<&prometheus::Registry>,
    secured: bool,
) -> SearchClient<tonic::transport::Channel> {
    let pool = WorkerPool::connect(
        urls.iter()
            .map(|u| u.parse::<WorkerSpec>().unwrap())
            .collect(),
        PoolOptions {
            metrics: registry.map(PoolMetrics::new),
            auth_token: secured.then(|| TOKEN.to_string()),
            ..PoolOptions::default()
        },
    )
    .await
    .unwrap();
    let c = Coordinator::new(
        pool,
        model.tokenizer.clone(),
        CoordinatorOptions {
            metrics: registry.map(SearchMetrics::new),
            auth: secured.then(|| arbor::rpc::auth::Tokens::new([TOKEN.to_string()])),
            ..CoordinatorOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(coordinator::serve(
        c,
        listener,
        false,
        None,
        std::future::pending(),
    ));
    SearchClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ARBOR_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let path = arbor_model::fetch::ensure_default_model(&mut |_| {})?;
    let model = Arc::new(Model::load(&path)?);
    let local = LocalWorker::new(
        &model,
        Engine::new(
            Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
            EngineOptions::default(),
        ),
        WorkerOptions {
            prefix_cache_entries_max: 0,
            ..WorkerOptions::default()
        },
    );
    let workers: Vec<Proc> = (0..3).map(|_| start_worker(&[])).collect();
    let urls: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
    let pki = std::env::temp_dir().join(format!("arbor-bench-tls-{}", std::process::id()));
    make_certificates(&pki);
    let arg = |name: &str| pki.join(name).to_str().unwrap().to_string();
    let tls_worker = start_worker(&["--tls-cert", &arg("cert.pem"), "--tls-key", &arg("key.pem")]);
    let client_tls = arbor::rpc::tls::ClientTls::load(
        &arbor::rpc::tls::ClientTlsFiles {
            ca: Some(pki.join("ca.pem")),
            ..Default::default()
        },
        "tls-",
    )
    .map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let registry = prometheus::Registry::new();
    // The secured variant: a worker requiring the token and recording metrics, a coordinator
    // sending it and requiring it of its clients, recording metrics.
    let token_file = pki.join("tokens");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let secured_worker = start_worker(&[
        "--auth-token-file",
        token_file.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    // Its twin: a worker of its own with neither, so that both serve only their own searches.
    let twin_worker = start_worker(&[]);
    let secured_registry = prometheus::Registry::new();
    let (mut one, mut three, mut one_metrics, mut secured, mut twin) = rt.block_on(async {
        (
            coordinator_for(&urls[..1], &model).await,
            coordinator_for(&urls, &model).await,
            coordinator_with(&urls[..1], &model, Some(&registry), false).await,
            coordinator_with(
                std::slice::from_ref(&secured_worker.1),
                &model,
                Some(&secured_registry),
                true,
            )
            .await,
            coordinator_for(std::slice::from_ref(&twin_worker.1), &model).await,
        )
    });
    let mut worker = rt.block_on(WorkerClient::connect(urls[0].clone()))?;
    let mut tls = WorkerClient::new(
        rt.block_on(arbor::rpc::tls::connect(&tls_worker.1, client_tls.as_ref()))?,
    );

    // 1 and 2: round trips.
    let item = ExpandItem {
        prompt: vec![9707, 11, 1879],
        k: 1,
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        stop: vec![],
    };
    let node = pb::ExpandNode {
        prefix_tokens: item.prompt.clone(),
        k: 1,
        max_tokens: 1,
        ..Default::default()
    };
    let calls = 40;
    let expand = || pb::ExpandRequest {
        expansion_id: String::new(),
        nodes: vec![node.clone()],
        ..Default::default()
    };
    let (mut rtt, mut exp_local, mut exp_remote) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rtt_tls, mut exp_tls) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        rt.block_on(async {
            let t = Instant::now();
            for _ in 0..200 {
                worker.model_info(pb::ModelInfoRequest {}).await.unwrap();
            }
            rtt.push(t.elapsed().as_secs_f64() * 1e6 / 200.0);
            let t = Instant::now();
            for _ in 0..200 {
                tls.model_info(pb::ModelInfoRequest {}).await.unwrap();
            }
            rtt_tls.push(t.elapsed().as_secs_f64() * 1e6 / 200.0);
            let t = Instant::now();
            for _ in 0..calls {
                tls.expand(expand()).await.unwrap();
            }
            exp_tls.push(t.elapsed().as_secs_f64() * 1e6 / calls as f64);
            let t = Instant::now();
            for _ in 0..calls {
                local.expand(vec![item.clone()], None).await.unwrap();
            }
            exp_local.push(t.elapsed().as_secs_f64() * 1e6 / calls as f64);
            let t = Instant::now();
            for _ in 0..calls {
                worker.expand(expand()).await.unwrap();
            }
            exp_remote.push(t.elapsed().as_secs_f64() * 1e6 / calls as f64);
        });
    }

    // 3: whole searches.
    let search_request = || pb::SearchRequest {
        question: QUESTION.into(),
        config_json: {
            let mut c = strategy_config(Strategy::Mcts, 8, 0.7, 128);
            c.budget.max_generated_tokens = Some(BUDGET);
            serde_json::to_string(&c).unwrap()
        },
        budget: Some(pb::Budget {
            generated_tokens: BUDGET,
            ..Default::default()
        }),
        seed: 1,
        ..Default::default()
    };
    let (mut emb, mut r1, mut r3, mut r1m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut r1s, mut r1t) = (Vec::new(), Vec::new());
    // Per round: secured / plain, and metrics / plain, so each ratio pairs runs made moments
    // apart.
    let (mut ratio_secured, mut ratio_metrics) = (Vec::new(), Vec::new());
    let mut policy_calls = 0;
    for round in 0..rounds {
        let mut c = strategy_config(Strategy::Mcts, 8, 0.7, 128);
        c.budget.max_generated_tokens = Some(BUDGET);
        c.seed = 1;
        let fresh = LocalWorker::new(
            &model,
            Engine::new(
                Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
                EngineOptions::default(),
            ),
            WorkerOptions::default(),
        );
        let mut search = Search::new(fresh.format_question(QUESTION)?, c)?;
        let t = Instant::now();
        let o = rt.block_on(search.run(&fresh, &LogProbScorer, &SearchControl::new()))?;
        emb.push(t.elapsed().as_secs_f64());
        policy_calls = o.costs.policy_calls;
        let mut variants = [
            (&mut one, &mut r1, false),
            (&mut three, &mut r3, false),
            (&mut one_metrics, &mut r1m, false),
            (&mut secured, &mut r1s, true),
            (&mut twin, &mut r1t, false),
        ];
        // Each round starts at another variant, so none always runs first or last.
        variants.rotate_left(round % 5);
        for (client, out, token) in variants {
            let mut req = tonic::Request::new(search_request());
            if token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {TOKEN}").parse()?);
            }
            let t = Instant::now();
            let r = rt.block_on(client.search(req))?.into_inner();
            out.push(t.elapsed().as_secs_f64());
            assert_eq!(r.costs.unwrap().policy_calls, policy_calls, "same search");
        }
        let plain = r1[r1.len() - 1];
        ratio_metrics.push(r1m[r1m.len() - 1] / plain);
        ratio_secured.push(r1s[r1s.len() - 1] / r1t[r1t.len() - 1]);
        std::thread::sleep(Duration::from_millis(200));
    }
    // The plain runs against each other: how far two runs of the same thing differ here.
    let noise: Vec<f64> = r1.windows(2).map(|w| w[1] / w[0]).collect();
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        (lo, hi)
    };
    let (r1s, r1t) = (median(r1s), median(r1t));
    let (emb, r1, r3, r1m) = (median(emb), median(r1), median(r3), median(r1m));
    let scraped = Exposition::new(registry, || {}).render();
    assert!(
        scraped.contains("arbor_searches_finished_total"),
        "metrics were recorded"
    );
    drop(tls_worker);
    let _ = std::fs::remove_dir_all(&pki);
    println!("service overhead, {rounds} interleaved rounds, medians");
    println!("| measure | in-process | over gRPC | difference |");
    println!("|---|---|---|---|");
    let rp = median(rtt);
    println!("| bare round trip (ModelInfo) | – | {rp:.0} µs | {rp:.0} µs |");
    let (el, er) = (median(exp_local), median(exp_remote));
    println!(
        "| minimal expansion (1 token) | {el:.0} µs | {er:.0} µs | {:.0} µs |",
        er - el
    );
    let (rt_tls, et) = (median(rtt_tls), median(exp_tls));
    println!(
        "| bare round trip over TLS | – | {rt_tls:.0} µs | {:+.0} µs against plain text ({:.2}x) |",
        rt_tls - rp,
        rt_tls / rp
    );
    println!(
        "| minimal expansion over TLS | {el:.0} µs | {et:.0} µs | {:+.0} µs against plain text ({:.2}x) |",
        et - er,
        et / er
    );
    for (name, r) in [("search, 1 worker", r1), ("search, 3 workers", r3)] {
        println!(
            "| {name} (MCTS, {BUDGET} tokens, {policy_calls} calls) | {emb:.2} s | {r:.2} s | {:+.0} µs per call ({:.2}x) |",
            (r - emb) * 1e6 / policy_calls as f64,
            r / emb
        );
    }
    let (m_lo, m_hi) = spread(&ratio_metrics);
    println!(
        "| search, 1 worker, metrics recorded | {r1:.2} s (metrics off) | {r1m:.2} s | {:+.0} µs per call ({:.3}x; rounds {m_lo:.3}-{m_hi:.3}x) |",
        (r1m - r1) * 1e6 / policy_calls as f64,
        median(ratio_metrics.clone()),
    );
    let (s_lo, s_hi) = spread(&ratio_secured);
    println!(
        "| search, 1 worker, tokens on both hops + metrics on both servers | {r1t:.2} s (neither, twin worker) | {r1s:.2} s | {:+.0} µs per call ({:.3}x; rounds {s_lo:.3}-{s_hi:.3}x) |",
        (r1s - r1t) * 1e6 / policy_calls as f64,
        median(ratio_secured.clone()),
    );
    if !noise.is_empty() {
        let (n_lo, n_hi) = spread(&noise);
        println!("| noise: one plain run against the next | | | {n_lo:.3}-{n_hi:.3}x |");
    }
    let scraped = Exposition::new(secured_registry, || {}).render();
    assert!(scraped.contains("arbor_searches_finished_total"));
    drop((secured_worker, twin_worker));
    Ok(())
}

//! `arbor eval --coordinator URL`: every cell runs as one `Search` call on a coordinator
//! (`arbor serve`) and its worker pool, so a comparison spreads over as many workers as the pool
//! has. The request carries the cell's whole `SearchConfig` (seed, budget and widths included)
//! and the same chat messages the embedded run formats, so a cell's search is the one the
//! embedded run makes: same seed, same tree (the service promises it; the test in
//! `tests/service.rs` compares the traces).
//!
//! A coordinator answers with the search's result and costs, not with its tree's per-node costs,
//! which reading best-of-N, weighted best-of-N and majority off one shared sampling run needs;
//! so every cell is its own search (`--no-sample-reuse` is implied).
//!
//! A coordinator that is full (RESOURCE_EXHAUSTED: `--searches-max` searches running) is asked
//! again after a pause that doubles up to 5 s; any other failure stops the run, naming the cell
//! (finished cells are in the traces already, and the next run resumes after them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use arbor::rpc::pb;
use arbor_search::{equivalent, SearchConfig};
use tonic::Code;

use super::dataset::Question;
use super::trace::{TraceCosts, TraceRecord};
use crate::coordinator_client;

/// A connection to one coordinator.
pub(crate) struct Coordinator {
    url: String,
    client: coordinator_client::Client,
}

impl Coordinator {
    /// Connects to `url`, over TLS for `https://` with the CA in `tls_ca` when given; the token
    /// comes from `ARBOR_TOKEN`.
    pub(crate) async fn connect(url: &str, tls_ca: Option<PathBuf>) -> Result<Self> {
        let files = arbor::rpc::tls::ClientTlsFiles {
            ca: tls_ca,
            cert: None,
            key: None,
        };
        let (url, client) = coordinator_client::connect(url, &files).await?;
        Ok(Coordinator {
            url,
            client: client.max_decoding_message_size(64 << 20),
        })
    }

    /// The coordinator's URL, as connected.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Runs one search: `question` under `system` (Arbor's default prompt when `None`), with
    /// `config` (whose seed and token budget the request repeats).
    pub(crate) async fn search(
        &self,
        question: &str,
        system: Option<&str>,
        config: &SearchConfig,
    ) -> Result<pb::SearchResult> {
        let (question, messages) = match system {
            None => (question.to_string(), vec![]),
            Some(s) => (
                String::new(),
                vec![
                    pb::ChatMessage {
                        role: "system".into(),
                        content: s.into(),
                    },
                    pb::ChatMessage {
                        role: "user".into(),
                        content: question.into(),
                    },
                ],
            ),
        };
        let request = pb::SearchRequest {
            request_id: String::new(),
            question,
            messages,
            strategy: pb::Strategy::Unspecified as i32,
            n: 0,
            budget: Some(pb::Budget {
                generated_tokens: config.budget.max_generated_tokens.unwrap_or(0),
                ..Default::default()
            }),
            sampling: None,
            seed: config.seed,
            config_json: serde_json::to_string(config)?,
            deadline_ms: 0,
        };
        let mut pause = Duration::from_millis(100);
        loop {
            let mut client = self.client.clone();
            match client.search(request.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(s) => {
                    return Err(anyhow!("{}: {}", s.code(), s.message()))
                        .with_context(|| format!("--coordinator {}", self.url))
                }
            }
        }
    }
}

/// The trace of a cell searched on a coordinator.
pub(crate) fn record(
    question: &Question,
    strategy: String,
    budget: u64,
    seed: u64,
    r: pb::SearchResult,
) -> TraceRecord {
    // The service sends no answer as empty strings (an extracted answer is never empty).
    let answer = Some(r.answer).filter(|a| !a.is_empty());
    let c = r.costs.unwrap_or_default();
    TraceRecord {
        index: question.index,
        question: question.question.clone(),
        gold: question.gold.clone(),
        strategy,
        budget,
        seed,
        correct: answer
            .as_deref()
            .is_some_and(|a| equivalent(a, &question.gold)),
        answer_key: answer.as_ref().map(|_| r.answer_key),
        answer,
        value: r.value,
        costs: TraceCosts {
            generated_tokens: c.generated_tokens,
            prompt_tokens_computed: c.prompt_tokens_computed,
            prompt_tokens_reused: c.prompt_tokens_reused,
            prm_tokens_computed: c.prm_tokens_computed,
            policy_calls: c.policy_calls,
            nodes: c.nodes,
            wall_ms: c.wall_ms,
        },
        termination: r.termination,
        derived_from_samples: false,
        samples: None,
        candidates: None,
        path: r.path,
    }
}

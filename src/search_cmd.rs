//! `arbor search`: one question, one strategy, one budget; embedded coordinator and worker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arbor_search::{
    BeamConfig, DvtsConfig, LogProbScorer, MctsConfig, SampleConfig, ScorerChoice, Search,
    SearchConfig, SearchControl, SearchEvent, StrategyConfig,
};
use arbor_worker::prm::AnyScorer;
use arbor_worker::{LocalWorker, WorkerOptions};
use clap::ValueEnum;

use crate::cli::{load_engine, Device};

/// Test-time strategies.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Monte-Carlo tree search (PUCT, batched expansion, virtual loss).
    Mcts,
    /// Sample N solutions, keep the best-scored one.
    BestOfN,
    /// Sample N solutions, keep the answer with the largest summed score.
    WeightedBestOfN,
    /// Sample N solutions, keep the most frequent answer (self-consistency).
    Majority,
    /// Beam search guided by step scores.
    Beam,
    /// Diverse verifier tree search: independent greedy subtrees.
    Dvts,
}

#[derive(clap::Args, Debug)]
pub(crate) struct SearchArgs {
    /// The question to answer.
    question: String,
    /// Search strategy.
    #[arg(long, value_enum, default_value_t = Strategy::Mcts)]
    strategy: Strategy,
    /// Stop after this many generated tokens (the main compute budget).
    #[arg(long, default_value_t = 1024)]
    budget_tokens: u64,
    /// Wall-clock deadline in milliseconds (optional).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Samples for best-of-n / weighted-best-of-n / majority; beams for beam and dvts.
    #[arg(long, default_value_t = 8)]
    n: u32,
    /// Sampling temperature of reasoning steps.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Most tokens in one reasoning step.
    #[arg(long, default_value_t = 128)]
    max_step_tokens: u32,
    /// System prompt; the default asks for one step per paragraph and a final "The answer is N."
    /// (the step delimiter is a blank line, so a custom prompt should keep steps as paragraphs).
    #[arg(long)]
    system: Option<String>,
    /// Seed: the same seed gives the same tree.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score steps with a process reward model: `judge` (the policy asked whether each step
    /// is right), `rollout` (agreement of cheap rollouts), a value head from `arbor prm train`
    /// (FILE.safetensors), or a JSON file with any PRM configuration, e.g.
    /// {"kind": "classifier", "model": "Qwen2.5-Math-PRM-7B/"} (see README). Without it, steps
    /// are valued by the policy's own confidence. Path values aggregate step scores as the
    /// configuration's `scoring.aggregation` says (default `last`; see --print-config).
    #[arg(long)]
    prm: Option<String>,
    /// A JSON file with a full search configuration (overrides the options above except the budget and seed when they are given explicitly).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print one JSON object (answer, path, costs) instead of text.
    #[arg(long)]
    json: bool,
    /// Print the full search configuration these options make, as JSON for --config, and exit.
    #[arg(long)]
    print_config: bool,
    /// Write the search tree in Graphviz DOT to this file (`dot -Tsvg FILE > tree.svg`).
    #[arg(long)]
    dot: Option<PathBuf>,
    /// Write the whole search tree as JSON to this file (every node's text, tokens, score,
    /// visits and state).
    #[arg(long)]
    tree_json: Option<PathBuf>,
    /// A remote coordinator (gRPC service): not part of this build yet.
    #[arg(long)]
    coordinator: Option<String>,
    /// A GGUF file or Hugging Face folder; default: the embedded default model.
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

fn build_config(a: &SearchArgs) -> Result<SearchConfig> {
    if a.budget_tokens == 0 {
        bail!("--budget-tokens must be at least 1");
    }
    if a.n == 0 {
        bail!("--n must be at least 1 (samples for best-of-n/majority, beams for beam/dvts)");
    }
    let mut config = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            SearchConfig::from_json(&text).with_context(|| format!("{}", path.display()))?
        }
        None => {
            let mut c = SearchConfig::default();
            let n = a.n;
            c.strategy = match a.strategy {
                Strategy::Mcts => StrategyConfig::Mcts(MctsConfig::default()),
                Strategy::BestOfN => StrategyConfig::BestOfN(SampleConfig { n }),
                Strategy::WeightedBestOfN => StrategyConfig::WeightedBestOfN(SampleConfig { n }),
                Strategy::Majority => StrategyConfig::SelfConsistency(SampleConfig { n }),
                Strategy::Beam => StrategyConfig::Beam(BeamConfig {
                    beam_width: n.min(4),
                    ..BeamConfig::default()
                }),
                Strategy::Dvts => StrategyConfig::Dvts(DvtsConfig {
                    beams: n,
                    ..DvtsConfig::default()
                }),
            };
            c.scoring.scorer = ScorerChoice::LogProb;
            c.sampling.temperature = a.temperature;
            c.sampling.max_step_tokens = a.max_step_tokens;
            c
        }
    };
    if a.prm.is_some() {
        config.scoring.scorer = ScorerChoice::Provided;
    }
    config.seed = a.seed;
    config.budget.max_generated_tokens = Some(a.budget_tokens);
    if a.deadline_ms.is_some() {
        config.budget.deadline_ms = a.deadline_ms;
    }
    config.validate().context("search configuration")?;
    Ok(config)
}

pub(crate) fn run(args: SearchArgs) -> Result<()> {
    if let Some(url) = &args.coordinator {
        bail!("--coordinator {url}: the gRPC service is not part of this build yet; run without it (embedded)");
    }
    let config = build_config(&args)?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    // A bad --prm is reported before the model loads.
    let prm = args
        .prm
        .as_deref()
        .map(crate::prm_cmd::parse_prm)
        .transpose()?;
    let (model, engine) = load_engine(args.model.clone(), args.device)?;
    let worker = LocalWorker::new(&model, engine, WorkerOptions::default());
    let scorer = match (&args.prm, prm) {
        (Some(spec), Some(prm)) => {
            arbor_worker::prm::build(&prm, &worker).with_context(|| format!("--prm {spec}"))?
        }
        _ => AnyScorer::LogProb(LogProbScorer),
    };
    let prompt = match &args.system {
        Some(system) => worker.format_question_with(system, &args.question)?,
        None => worker.format_question(&args.question)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SearchEvent>(1024);
    let control = SearchControl::new().with_events(tx);
    let mut search = Search::new(prompt, config)?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let budget = args.budget_tokens;
    let progress = {
        let bar = bar.clone();
        let worker = worker.clone();
        rt.spawn(async move {
            let (mut expanded, mut best) = (0u64, String::from("-"));
            while let Some(ev) = rx.recv().await {
                match ev {
                    SearchEvent::NodeExpanded { .. } => expanded += 1,
                    SearchEvent::BestAnswer(b) => best = b.answer.raw.clone(),
                    _ => {}
                }
                let s = worker.stats();
                bar.set_message(format!(
                    "{expanded} expansions, {}/{budget} tokens generated, best answer so far: {best}",
                    s.generated_tokens
                ));
            }
        })
    };
    let outcome = rt.block_on(search.run(&worker, &scorer, &control));
    drop(control);
    let _ = rt.block_on(progress);
    bar.finish_and_clear();
    let outcome = outcome?;
    let tree = search.tree();
    if let Err(e) = tree.check_invariants() {
        tracing::error!("tree invariant violated after search: {e:?}");
    }
    if let Some(path) = &args.dot {
        std::fs::write(path, tree.to_dot())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.tree_json {
        let json = serde_json::to_string_pretty(&tree.export())?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    let path: Vec<String> = outcome
        .answer
        .as_ref()
        .map(|a| tree.path(a.node).iter().map(|s| s.text.clone()).collect())
        .unwrap_or_default();
    let c = &outcome.costs;
    if args.json {
        let out = serde_json::json!({
            "question": args.question,
            "strategy": format!("{:?}", args.strategy),
            "answer": outcome.answer.as_ref().map(|a| a.answer.raw.clone()),
            "answer_key": outcome.answer.as_ref().map(|a| a.answer.key.clone()),
            "value": outcome.answer.as_ref().and_then(|a| a.value),
            "votes": outcome.answer.as_ref().map(|a| a.votes),
            "path": path,
            "candidates": outcome.candidates.iter().map(|t| serde_json::json!({"answer": t.answer.raw, "votes": t.votes, "weight": t.weight})).collect::<Vec<_>>(),
            "termination": format!("{:?}", outcome.termination),
            "costs": {
                "generated_tokens": c.generated_tokens,
                "prompt_tokens_sent": c.prompt_tokens_sent,
                "prompt_tokens_computed": c.prompt_tokens_computed,
                "prompt_tokens_reused": c.prompt_tokens_reused,
                "prm_tokens_computed": c.scorer_tokens,
                "policy_calls": c.policy_calls,
                "scorer_calls": c.scorer_calls,
                "nodes": c.nodes,
                "wall_ms": c.wall_us / 1000,
            },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match &outcome.answer {
            Some(a) => {
                println!("Answer: {}", a.answer.raw);
                println!("\nReasoning path ({} steps):", path.len());
                for (i, step) in path.iter().enumerate() {
                    println!("  {}. {}", i + 1, step.trim().replace('\n', "\n     "));
                }
            }
            None => println!(
                "No final answer within the budget ({:?}).",
                outcome.termination
            ),
        }
        if outcome.candidates.len() > 1 {
            let cands: Vec<String> = outcome
                .candidates
                .iter()
                .map(|t| format!("{} ({} votes)", t.answer.raw, t.votes))
                .collect();
            println!("\nCandidates: {}", cands.join(", "));
        }
        println!(
            "\nCost: {} generated tokens, {} prompt tokens computed ({} reused), {} policy calls, {} nodes, {:.1}s; stopped: {:?}",
            c.generated_tokens,
            c.prompt_tokens_computed,
            c.prompt_tokens_reused,
            c.policy_calls,
            c.nodes,
            c.wall_us as f64 / 1e6,
            outcome.termination
        );
    }
    Ok(())
}

//! `arbor search`: one question, one strategy, one budget; embedded coordinator and worker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arbor::rpc::pb;
use arbor::strategy::strategy_config;
pub(crate) use arbor::strategy::Strategy;
use arbor_search::{
    AnswerSelection, LogProbScorer, MctsAnswer, ScorerChoice, Search, SearchConfig, SearchControl,
    SearchEvent, StrategyConfig,
};
use arbor_worker::prm::AnyScorer;
use arbor_worker::{LocalWorker, WorkerOptions};

use crate::cli::{load_engine, Device};

#[derive(clap::Args, Debug)]
pub(crate) struct SearchArgs {
    /// The question to answer.
    question: String,
    /// Search strategy. MCTS, beam and DVTS answer by a vote over every final answer they
    /// reach (weighted by value); every vote, majority's included, breaks ties by the larger
    /// value sum, never by which answer came first.
    #[arg(long, value_enum, default_value_t = Strategy::Mcts)]
    strategy: Strategy,
    /// How MCTS, beam and DVTS choose among the final answers they reached (default: each
    /// strategy's own, see --print-config). `majority`: most final answers; `weighted_vote`:
    /// largest value sum; `best_value`: the single highest value; `share_vote`: each final
    /// answer counts by its path share (the root's 1 split equally among the children with an
    /// answer below), so answers under a step the search explored many times count as often as
    /// the policy would reach them; `weighted_share_vote`: share × value. Ties: larger value
    /// sum, then the answer reached first. Applies over --config too.
    #[arg(long, value_enum)]
    tree_answer: Option<TreeAnswer>,
    /// Stop after this many generated tokens (the main compute budget).
    #[arg(long, default_value_t = 1024)]
    budget_tokens: u64,
    /// MCTS: independent samples the search starts from. The first round gives the question
    /// this many first steps and runs each on to an answer; all of them vote with the rest of
    /// the tree, and later simulations branch off their steps (0 or 1: none). Default: 0.8 of
    /// the solutions the budget pays for at 192 tokens each (4 at 1,024 tokens; chosen on
    /// GSM8K training questions, docs/eval/gsm8k-tune-300-root-samples). Applies over
    /// --config when given.
    #[arg(long)]
    root_samples: Option<u32>,
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
    /// Fewest reasoning steps before a final answer counts, in tree searches: an answer-first
    /// step ("The answer is 144.") at a smaller depth is rejected and its node asked again with
    /// a new seed. 1 accepts an answer at any depth; 2 rejects answer-first guesses (rare with
    /// the default prompt, and almost never right).
    #[arg(long, default_value_t = 1)]
    min_answer_depth: u32,
    /// System prompt; the default asks for one step per paragraph and a final "The answer is …"
    /// (the step delimiter is a blank line, so a custom prompt should keep steps as paragraphs).
    #[arg(long)]
    system: Option<String>,
    /// Seed: the same seed gives the same tree.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score steps with a process reward model: `judge` (the policy asked whether each step
    /// is right), `rollout` (agreement of cheap rollouts), a value head from `arbor prm train`
    /// (FILE.safetensors), a head shipped with Arbor by name (`arbor-gsm8k-v1`: heads/ in the
    /// repository says how it was made and how well it does), or a JSON file with any PRM
    /// configuration, e.g.
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
    /// Run the search on a coordinator (`arbor serve`) instead of in this process, e.g.
    /// http://localhost:50051. The options above travel with it as one search configuration.
    /// A coordinator that requires a token (--auth-token-file) gets the one in the
    /// ARBOR_TOKEN environment variable (e.g. ARBOR_TOKEN=s3cret arbor search --coordinator …).
    #[arg(long)]
    coordinator: Option<String>,
    /// With an `https://` --coordinator: the CA (PEM) that signed its certificate (default:
    /// the public web's roots).
    #[arg(long, value_name = "PEM", requires = "coordinator")]
    tls_ca: Option<PathBuf>,
    /// With an `https://` --coordinator that requires client certificates: this client's
    /// certificate (PEM; with --tls-key).
    #[arg(long, value_name = "PEM", requires = "coordinator")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "coordinator")]
    tls_key: Option<PathBuf>,
    /// A GGUF file or Hugging Face folder; default: the embedded default model.
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

/// `--tree-answer`: an answer rule of the tree searches, named as in a search config.
#[derive(
    clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub(crate) enum TreeAnswer {
    Majority,
    WeightedVote,
    BestValue,
    ShareVote,
    WeightedShareVote,
}

impl TreeAnswer {
    fn selection(self) -> AnswerSelection {
        match self {
            TreeAnswer::Majority => AnswerSelection::Majority,
            TreeAnswer::WeightedVote => AnswerSelection::WeightedVote,
            TreeAnswer::BestValue => AnswerSelection::BestValue,
            TreeAnswer::ShareVote => AnswerSelection::ShareVote,
            TreeAnswer::WeightedShareVote => AnswerSelection::WeightedShareVote,
        }
    }

    /// Sets the rule of `strategy` when it is a tree search (sampling strategies keep theirs).
    pub(crate) fn apply(self, strategy: &mut StrategyConfig) {
        let selection = self.selection();
        match strategy {
            StrategyConfig::Mcts(m) => {
                m.final_answer = match self {
                    TreeAnswer::Majority => MctsAnswer::Majority,
                    TreeAnswer::WeightedVote => MctsAnswer::WeightedVote,
                    TreeAnswer::BestValue => MctsAnswer::BestValue,
                    TreeAnswer::ShareVote => MctsAnswer::ShareVote,
                    TreeAnswer::WeightedShareVote => MctsAnswer::WeightedShareVote,
                }
            }
            StrategyConfig::Beam(b) => b.answer = selection,
            StrategyConfig::Dvts(d) => d.answer = selection,
            StrategyConfig::BestOfN(_)
            | StrategyConfig::WeightedBestOfN(_)
            | StrategyConfig::SelfConsistency(_) => {}
        }
    }
}

/// The knobs `arbor search` and `arbor eval` share; [`SearchKnobs::config`] turns them into a
/// configuration (budget and seed are the caller's to set).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SearchKnobs {
    /// Which algorithm.
    pub(crate) strategy: Strategy,
    /// Samples for best-of-n / weighted-best-of-n / majority; beams for beam and dvts.
    pub(crate) n: u32,
    /// Sampling temperature of reasoning steps.
    pub(crate) temperature: f32,
    /// Most tokens in one reasoning step.
    pub(crate) max_step_tokens: u32,
    /// Fewest steps before a final answer counts (`SearchConfig::min_answer_depth`).
    pub(crate) min_answer_depth: u32,
    /// Which scorer values nodes.
    pub(crate) scorer: ScorerChoice,
    /// The tree searches' answer rule, when not their default.
    pub(crate) tree_answer: Option<TreeAnswer>,
}

impl SearchKnobs {
    /// The configuration these knobs make, everything else at its default.
    pub(crate) fn config(&self) -> SearchConfig {
        let mut c = strategy_config(
            self.strategy,
            self.n,
            self.temperature,
            self.max_step_tokens,
        );
        c.scoring.scorer = self.scorer;
        c.min_answer_depth = self.min_answer_depth;
        if let Some(rule) = self.tree_answer {
            rule.apply(&mut c.strategy);
        }
        c
    }
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
        None => SearchKnobs {
            strategy: a.strategy,
            n: a.n,
            temperature: a.temperature,
            max_step_tokens: a.max_step_tokens,
            min_answer_depth: a.min_answer_depth,
            scorer: ScorerChoice::LogProb,
            tree_answer: None,
        }
        .config(),
    };
    if let Some(rule) = a.tree_answer {
        rule.apply(&mut config.strategy);
    }
    match (&mut config.strategy, a.root_samples) {
        (StrategyConfig::Mcts(m), Some(r)) => m.root_samples = r,
        (StrategyConfig::Mcts(m), None) if a.config.is_none() => {
            m.root_samples = arbor::strategy::root_samples(
                a.budget_tokens,
                arbor::strategy::SOLUTION_TOKENS,
                arbor::strategy::ROOT_SHARE,
            );
        }
        (_, Some(_)) => bail!("--root-samples is an MCTS setting; --strategy is not mcts"),
        _ => {}
    }
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
    let config = build_config(&args)?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    if let Some(url) = &args.coordinator {
        if let Some(spec) = &args.prm {
            bail!("--prm {spec} with --coordinator: a coordinator scores steps with its workers' Score service; run the PRM embedded (without --coordinator)");
        }
        return run_remote(&args, url, &config);
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
    print_result(
        &args,
        &arbor::rpc::coordinator::result_of("", &outcome, tree),
    )?;
    Ok(())
}

/// Prints a search's result: text, or one JSON object with `--json`.
fn print_result(args: &SearchArgs, r: &pb::SearchResult) -> Result<()> {
    let c = r.costs.unwrap_or_default();
    if args.json {
        let out = serde_json::json!({
            "question": args.question,
            "strategy": args.strategy.name(),
            "answer": (!r.answer.is_empty()).then_some(&r.answer),
            "answer_key": (!r.answer.is_empty()).then_some(&r.answer_key),
            "value": r.value,
            "votes": (!r.answer.is_empty()).then_some(r.votes),
            "path": r.path,
            "candidates": r.candidates.iter().map(|t| serde_json::json!({"answer": t.answer, "votes": t.votes, "weight": t.weight})).collect::<Vec<_>>(),
            "termination": r.termination,
            "costs": {
                "generated_tokens": c.generated_tokens,
                "prompt_tokens_sent": c.prompt_tokens_sent,
                "prompt_tokens_computed": c.prompt_tokens_computed,
                "prompt_tokens_reused": c.prompt_tokens_reused,
                "prm_tokens_computed": c.prm_tokens_computed,
                "policy_calls": c.policy_calls,
                "scorer_calls": c.scorer_calls,
                "nodes": c.nodes,
                "wall_ms": c.wall_ms,
            },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if r.answer.is_empty() {
        println!("No final answer within the budget ({}).", r.termination);
    } else {
        println!("Answer: {}", r.answer);
        println!("\nReasoning path ({} steps):", r.path.len());
        for (i, step) in r.path.iter().enumerate() {
            println!("  {}. {}", i + 1, step.trim().replace('\n', "\n     "));
        }
    }
    if r.candidates.len() > 1 {
        let cands: Vec<String> = r
            .candidates
            .iter()
            .map(|t| format!("{} ({} votes)", t.answer, t.votes))
            .collect();
        println!("\nCandidates: {}", cands.join(", "));
    }
    println!(
        "\nCost: {} generated tokens, {} prompt tokens computed ({} reused), {} policy calls, {} nodes, {:.1}s; stopped: {}",
        c.generated_tokens,
        c.prompt_tokens_computed,
        c.prompt_tokens_reused,
        c.policy_calls,
        c.nodes,
        c.wall_ms as f64 / 1e3,
        r.termination
    );
    Ok(())
}

/// `arbor search --coordinator URL`: the same search on a remote coordinator, streamed.
fn run_remote(args: &SearchArgs, url: &str, config: &SearchConfig) -> Result<()> {
    let tls = arbor::rpc::tls::ClientTlsFiles {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    };
    let request = pb::SearchRequest {
        request_id: String::new(),
        question: args.question.clone(),
        messages: vec![],
        strategy: pb::Strategy::Unspecified as i32,
        n: 0,
        budget: Some(pb::Budget {
            generated_tokens: args.budget_tokens,
            ..Default::default()
        }),
        sampling: None,
        seed: args.seed,
        // The full configuration these options make, so a remote search is the same search.
        config_json: serde_json::to_string(config)?,
        deadline_ms: args.deadline_ms.unwrap_or(0),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let result = rt.block_on(async {
        let (_, mut client) = crate::coordinator_client::connect(url, &tls).await?;
        let mut stream = client
            .search_stream(request)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let (mut expanded, mut best) = (0u64, String::from("-"));
        while let Some(ev) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        {
            use pb::search_event::Event;
            match ev.event {
                Some(Event::Result(r)) => return Ok(r),
                Some(Event::Expanded(_)) => expanded += 1,
                Some(Event::BestAnswer(b)) => best = b.answer,
                _ => {}
            }
            bar.set_message(format!("{expanded} expansions, best answer so far: {best}"));
        }
        bail!("the coordinator closed the stream without a result")
    });
    bar.finish_and_clear();
    print_result(args, &result?)
}

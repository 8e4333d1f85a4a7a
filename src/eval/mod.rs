//! `arbor eval`: every strategy at every budget on a GSM8K-style dataset, resumable, with a
//! summary table and plots of accuracy against compute.
//!
//! A run is a grid of cells (question × strategy × budget). Cells run concurrently through one
//! shared worker; each finished cell is appended to `DIR/traces.jsonl` at once, so a run can be
//! killed and started again and only missing cells run. Best-of-N, weighted best-of-N and majority
//! are read off one sampling run per question ([`samples`]), kept in `DIR/samples.jsonl`. The gold
//! answer is used only to mark a finished cell correct; the search never sees it. With
//! `--coordinator URL` the cells run as searches on a coordinator and its workers ([`remote`]).

mod dataset;
pub(crate) mod plot;
pub(crate) mod prm;
mod remote;
mod samples;
mod settings;
mod summary;
pub(crate) mod trace;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbor_model::{Engine, EngineOptions};
use arbor_search::{equivalent, Search, SearchControl, StrategyConfig, K_MAX};
use arbor_worker::{LocalWorker, WorkerOptions};
use tokio::task::JoinSet;

use crate::cli::{load_model_and_backend, Device};
use crate::search_cmd::{SearchKnobs, Strategy};
use dataset::Question;
use prm::{Prm, PrmChoice};
use samples::SampleChunk;
use trace::{JsonlAppender, TraceCandidate, TraceCosts, TraceRecord};

/// KV blocks the embedded worker may hold per search in flight, by default (`--kv-blocks`).
const KV_BLOCKS_PER_SEARCH: usize = 256;
/// Searches in flight when `--concurrency` is not given: a GPU's batches fill at 64 to 128
/// sequences decoding; two keep a CPU's cores busy; a coordinator's pool of one worker takes
/// about 16.
const GPU_CONCURRENCY: usize = 128;
const CPU_CONCURRENCY: usize = 2;
const COORDINATOR_CONCURRENCY: usize = 16;

/// `arbor eval` and `arbor eval report`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct EvalArgs {
    #[command(subcommand)]
    command: Option<EvalCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
enum EvalCommand {
    /// Redraw summary.csv, summary.md and the plots of DIR from its traces alone (no model).
    ///
    /// Example: arbor eval report eval-out
    Report {
        /// The output folder of an earlier `arbor eval`.
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// GSM8K-style JSONL: one {"question": ..., "answer": "... #### N"} per line.
    #[arg(long, required = true)]
    dataset: Option<PathBuf>,
    /// Strategies to compare, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "mcts,best-of-n,weighted-best-of-n,majority,beam,dvts"
    )]
    strategies: Vec<Strategy>,
    /// Generated-token budgets per question, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024")]
    budgets: Vec<u64>,
    /// Questions to run (default: to the end of the dataset).
    #[arg(long)]
    limit: Option<usize>,
    /// First question (0-based).
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Run seed; question i searches with a seed derived from it and i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Searches in flight at once, all through one shared model worker (or, with
    /// --coordinator, on the coordinator: give it about the pool's capacity, e.g. 16 per
    /// worker). Default: 128 on a GPU (its batches fill at 64 to 128; the runs in docs/eval
    /// used 128), 2 on the CPU, 16 on a coordinator.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Most KV cache blocks of 16 tokens the embedded worker may hold (about 0.4 MB each for
    /// the default model; made as needed, not up front). Default: 8,192, or 256 per search in
    /// flight where that is more (4,096 tokens each: its live samples and the prefixes the
    /// worker keeps for its next calls). Calls that find the cache full wait for others, so a
    /// small one costs speed, not cells: a cache too small for the searches in flight
    /// recomputes their prompts instead of reusing them.
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// The process reward model that values steps, as `arbor search --prm` takes it: `logprob`
    /// (the policy's own confidence, free), `judge` (the policy asked whether each step is
    /// right), `rollout` (agreement of cheap rollouts; their tokens count against the budget),
    /// a value head from `arbor prm train` (FILE.safetensors), a shipped head by name
    /// (`arbor-gsm8k-v1`, held-out AUC 0.79 on reasoned final answers), or a JSON file with any
    /// PRM configuration.
    #[arg(long, default_value = "logprob", value_parser = parse_prm_arg)]
    prm: PrmChoice,
    /// Output folder: traces, summary, plots. Running again with the same folder resumes.
    #[arg(long, default_value = "eval-out")]
    out: PathBuf,
    /// Search best-of-n, weighted-best-of-n and majority separately at every budget (N = budget
    /// / --sample-tokens) instead of reading them off one sampling run per question.
    #[arg(long)]
    no_sample_reuse: bool,
    /// Samples per sampling search; more such searches run until the samples cover the largest
    /// budget.
    #[arg(long, default_value_t = 8)]
    sample_chunk: u32,
    /// Expected tokens of one solution; with --no-sample-reuse, best-of-N at budget B uses
    /// N = B / this.
    #[arg(long, default_value_t = arbor::strategy::SOLUTION_TOKENS)]
    sample_tokens: u32,
    /// Beams for beam search and DVTS (as `arbor search --n`), with --fixed-tree-widths.
    #[arg(long, default_value_t = 8)]
    n: u32,
    /// Give MCTS, beam and DVTS the widths of `arbor search` (--n beams; MCTS expanding 4
    /// children, 8 simulations in flight) at every budget. By default their widths follow the
    /// budget: P = budget / --sample-tokens is how many whole solutions the budget pays for, and
    /// each tree search spends about P solutions' worth of tokens per level (MCTS: 2 children
    /// per expansion, max(1, P/2) simulations in flight; beam: width ⌊√P⌋, P/width proposals
    /// each; DVTS: P beams in subtrees of 2). Fixed widths at small budgets spread the budget
    /// over so many nodes that no path reaches an answer.
    #[arg(long)]
    fixed_tree_widths: bool,
    /// With widths that follow the budget: the share of the P solutions the budget pays for
    /// that MCTS starts with as independent samples from the root (its `root_samples`, rounded;
    /// each is run to an answer and votes with the rest of the tree), in [0, 1]. 0: MCTS
    /// expands the root like any other leaf. The default, 0.8, was chosen on training
    /// questions 4000-4299 (docs/eval/gsm8k-tune-300-root-samples).
    #[arg(long, default_value_t = arbor::strategy::ROOT_SHARE, value_parser = parse_share, conflicts_with = "fixed_tree_widths")]
    root_share: f64,
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
    /// How MCTS, beam and DVTS choose among their final answers, as `arbor search
    /// --tree-answer` (default: each strategy's own). summary.md shows every rule's accuracy
    /// on the same traces whichever is chosen; recorded in run.json.
    #[arg(long, value_enum)]
    tree_answer: Option<crate::search_cmd::TreeAnswer>,
    /// System prompt of every question (default: Arbor's step-by-step prompt, as `arbor
    /// search`). Recorded in run.json: a folder resumes only with the same one.
    #[arg(long)]
    system: Option<String>,
    /// A GGUF file or Hugging Face folder; default: the embedded default model.
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Run every cell as a search on this coordinator (`arbor serve`) and its worker pool
    /// instead of in this process: ten workers finish a comparison about ten times sooner,
    /// with the same traces for the same seed. Implies --no-sample-reuse; the PRM is the
    /// workers' (`--prm logprob`); --model and --device are the workers' business. A
    /// coordinator started with --auth-token-file gets the token in ARBOR_TOKEN.
    /// Example: ARBOR_TOKEN=s3cret arbor eval --coordinator http://arbor:50051 --dataset d.jsonl
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// With an https:// --coordinator: the CA (PEM) that signed its certificate (default: the
    /// public web's roots).
    #[arg(long, value_name = "PEM", requires = "coordinator")]
    tls_ca: Option<PathBuf>,
}

/// A strategy's name as on the command line and in traces.
pub(crate) fn strategy_name(strategy: Strategy) -> String {
    strategy.name().to_owned()
}

/// Runs `arbor eval` or `arbor eval report`.
pub(crate) fn run(args: EvalArgs) -> Result<()> {
    match args.command {
        Some(EvalCommand::Report { dir }) => report(&dir),
        None => run_grid(args.run),
    }
}

/// File names inside the output folder.
const TRACES: &str = "traces.jsonl";
const SAMPLES: &str = "samples.jsonl";

/// Reads `DIR/traces.jsonl` and writes the summary table and plots next to it.
pub(crate) fn report(dir: &Path) -> Result<()> {
    let path = dir.join(TRACES);
    let Some((records, _)) = trace::read_jsonl::<TraceRecord>(&path)? else {
        bail!(
            "no traces at {} (run `arbor eval --out {}` first)",
            path.display(),
            dir.display()
        );
    };
    write_report(dir, &records)
}

fn write_report(dir: &Path, records: &[TraceRecord]) -> Result<()> {
    let rows = summary::summarize(records);
    let pairs = summary::pair_with_baseline(records);
    let markdown = summary::write(dir, &rows, &pairs)?;
    plot::write_all(dir, &rows)?;
    println!("{markdown}");
    eprintln!(
        "arbor eval: {} cells; wrote {}/summary.csv, summary.md, {}.png/.svg and {}.png/.svg",
        records.len(),
        dir.display(),
        plot::Axis::Generated.stem(),
        plot::Axis::Computed.stem()
    );
    Ok(())
}

/// The search seed of question `index`: every strategy and budget of a question share it.
fn question_seed(run_seed: u64, index: usize) -> u64 {
    arbor_search::mix_seed(run_seed, index as u64)
}

/// The seed of chunk `chunk` of a question's sampling run.
fn chunk_seed(question_seed: u64, chunk: u32) -> u64 {
    arbor_search::mix_seed(question_seed, 0x5A3B_1E00_0000_0000 | u64::from(chunk))
}

/// One unit of work.
#[derive(Debug)]
enum Job {
    /// One search: one cell.
    Search {
        question: Arc<Question>,
        strategy: Strategy,
        budget: u64,
    },
    /// A question's sampling run (extended as far as needed), then every missing sample cell.
    Samples {
        question: Arc<Question>,
        cells: Vec<(Strategy, u64)>,
        chunks: Vec<SampleChunk>,
    },
}

impl Job {
    fn cells(&self) -> usize {
        match self {
            Job::Search { .. } => 1,
            Job::Samples { cells, .. } => cells.len(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Job::Search {
                question,
                strategy,
                budget,
            } => format!(
                "question {}, {} at {budget} tokens",
                question.index,
                strategy_name(*strategy)
            ),
            Job::Samples { question, .. } => {
                format!("question {}, sampling run", question.index)
            }
        }
    }
}

/// What a finished job hands back to be written.
struct JobDone {
    records: Vec<TraceRecord>,
    new_chunks: Vec<SampleChunk>,
}

/// Where the searches run.
enum Runner {
    /// In this process, through one model worker, with the reward model built on it.
    Embedded { worker: LocalWorker, prm: Prm },
    /// On a coordinator.
    Remote(remote::Coordinator),
}

/// What every job needs; shared by all tasks.
struct Shared {
    runner: Runner,
    /// Which reward model it is.
    prm_choice: PrmChoice,
    /// The run's settings (seed, sampling, sample reuse and chunk size).
    settings: settings::Settings,
}

impl Shared {
    /// The prompt a search of `question` continues on `worker`, with the run's system prompt.
    fn prompt(
        &self,
        worker: &LocalWorker,
        question: &str,
    ) -> Result<String, arbor_model::ModelError> {
        match &self.settings.system {
            Some(system) => worker.format_question_with(system, question),
            None => worker.format_question(question),
        }
    }
}

/// A share in [0, 1] (`--root-share`).
fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        Ok(x) => Err(format!("{x} is not a share: give a number from 0 to 1")),
        Err(e) => Err(format!("{text:?} is not a number: {e}")),
    }
}

fn parse_prm_arg(spec: &str) -> Result<PrmChoice, String> {
    PrmChoice::parse(spec).map_err(|e| format!("{e:#}"))
}

fn validate(a: &RunArgs) -> Result<()> {
    if a.strategies.is_empty() {
        bail!("--strategies: name at least one");
    }
    if a.budgets.is_empty() || a.budgets.contains(&0) {
        bail!("--budgets: give one or more budgets of at least 1 token");
    }
    if a.concurrency == Some(0) {
        bail!("--concurrency must be at least 1");
    }
    if a.kv_blocks == Some(0) {
        bail!("--kv-blocks must be at least 1");
    }
    if a.n == 0 || a.sample_tokens == 0 {
        bail!("--n and --sample-tokens must be at least 1");
    }
    if a.sample_chunk == 0 || a.sample_chunk > K_MAX {
        bail!("--sample-chunk must be in 1..={K_MAX}");
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if a.coordinator.is_some() && !a.prm.is_logprob() {
        bail!(
            "--prm {} with --coordinator: a coordinator values steps with its workers' Score \
             service (the policy's confidence); run this PRM embedded (without --coordinator)",
            a.prm.spec()
        );
    }
    Ok(())
}

fn run_grid(a: RunArgs) -> Result<()> {
    validate(&a)?;
    let dataset_path = a.dataset.clone().expect("clap requires --dataset");
    let mut strategies = Vec::new();
    for s in &a.strategies {
        if !strategies.contains(s) {
            strategies.push(*s);
        }
    }
    let mut budgets = a.budgets.clone();
    budgets.sort_unstable();
    budgets.dedup();
    let all_questions = dataset::load(&dataset_path)?;
    let questions = dataset::select(all_questions.clone(), a.offset, a.limit)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let model = match &a.model {
        Some(p) => Some(
            std::fs::canonicalize(p)
                .with_context(|| format!("--model {}", p.display()))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    // A coordinator's workers hold the model; the record names the coordinator instead.
    let model = match &a.coordinator {
        Some(url) => Some(format!("the workers of coordinator {url}")),
        None => model,
    };
    let settings = settings::Settings {
        seed: a.seed,
        prm: a.prm.name()?,
        model,
        temperature: a.temperature,
        max_step_tokens: a.max_step_tokens,
        n: a.n,
        sample_tokens: a.sample_tokens,
        sample_chunk: a.sample_chunk,
        sample_reuse: !a.no_sample_reuse && a.coordinator.is_none(),
        scaled_trees: !a.fixed_tree_widths,
        root_share: a.root_share,
        min_answer_depth: a.min_answer_depth,
        system: a.system.clone(),
        tree_answer: a.tree_answer,
    };

    // What is already done, and whether it was made from this dataset.
    let traces_path = a.out.join(TRACES);
    let (done_records, traces_len) = match trace::read_jsonl::<TraceRecord>(&traces_path)? {
        Some((records, len)) => (records, Some(len)),
        None => (Vec::new(), None),
    };
    for r in &done_records {
        if all_questions
            .get(r.index)
            .is_none_or(|q| q.question != r.question)
        {
            bail!(
                "{}: question {} there is not question {} of {}; the folder was made from \
                 another dataset (use another --out)",
                traces_path.display(),
                r.index,
                r.index,
                dataset_path.display()
            );
        }
    }
    settings::record(
        &a.out,
        &settings,
        settings::Invocation {
            dataset: dataset_path.display().to_string(),
            offset: a.offset,
            limit: a.limit,
            strategies: strategies.iter().map(|s| strategy_name(*s)).collect(),
            budgets: budgets.clone(),
            arbor: concat!(env!("CARGO_PKG_VERSION"), " (", env!("ARBOR_GIT_REV"), ")").into(),
        },
    )?;
    let done: HashSet<(usize, String, u64)> = done_records.iter().map(TraceRecord::key).collect();
    let samples_path = a.out.join(SAMPLES);
    let (mut pools, samples_len) = if settings.sample_reuse {
        load_pools(&samples_path)?
    } else {
        (BTreeMap::new(), None)
    };

    let jobs = plan(
        &questions,
        &strategies,
        &budgets,
        &done,
        &mut pools,
        settings.sample_reuse,
    );
    let todo: usize = jobs.iter().map(Job::cells).sum();
    let grid = questions.len() * strategies.len() * budgets.len();
    eprintln!(
        "arbor eval: {todo} cells to run of {grid} ({} questions × {} strategies × {} budgets; {} already in {})",
        questions.len(),
        strategies.len(),
        budgets.len(),
        grid - todo,
        traces_path.display()
    );
    // Searches whose worker calls failed, and the first one's error.
    let mut failed: (u64, Option<String>) = (0, None);
    if todo > 0 {
        // One runtime for the run: a coordinator's channel lives on the runtime it was made on.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (runner, concurrency) = match &a.coordinator {
            Some(url) => {
                let connect = remote::Coordinator::connect(url, a.tls_ca.clone());
                let coordinator = runtime.block_on(connect)?;
                eprintln!(
                    "arbor eval: cells run on the coordinator at {}",
                    coordinator.url()
                );
                let concurrency = a.concurrency.unwrap_or(COORDINATOR_CONCURRENCY);
                (Runner::Remote(coordinator), concurrency)
            }
            None => {
                let (model, backend) = load_model_and_backend(a.model.clone(), a.device)?;
                let concurrency = a.concurrency.unwrap_or(if backend.name() == "cpu" {
                    CPU_CONCURRENCY
                } else {
                    GPU_CONCURRENCY
                });
                let engine = Engine::new(
                    backend,
                    EngineOptions {
                        kv_blocks_max: a.kv_blocks.unwrap_or_else(|| {
                            (KV_BLOCKS_PER_SEARCH * concurrency)
                                .max(EngineOptions::default().kv_blocks_max)
                        }),
                        ..EngineOptions::default()
                    },
                );
                let worker = LocalWorker::new(&model, engine, WorkerOptions::default());
                let prm = a.prm.build(&worker)?;
                (Runner::Embedded { worker, prm }, concurrency)
            }
        };
        if a.concurrency.is_none() {
            eprintln!(
                "arbor eval: {concurrency} searches in flight (this worker's default; \
                 --concurrency sets it)"
            );
        }
        let context = Arc::new(Shared {
            runner,
            prm_choice: a.prm.clone(),
            settings,
        });
        let mut traces = JsonlAppender::open(&traces_path, traces_len)?;
        let mut samples_out = if context.settings.sample_reuse {
            Some(JsonlAppender::open(&samples_path, samples_len)?)
        } else {
            None
        };
        failed = execute(
            runtime,
            context,
            jobs,
            todo,
            concurrency,
            &mut traces,
            samples_out.as_mut(),
        )?;
    }
    let Some((records, _)) = trace::read_jsonl::<TraceRecord>(&traces_path)? else {
        bail!("{} vanished during the run", traces_path.display());
    };
    if !records.is_empty() || failed.0 == 0 {
        write_report(&a.out, &records)?;
    }
    if let (n @ 1.., Some(first)) = failed {
        bail!(
            "{n} searches failed because worker calls failed; their cells are not in {} (the \
             report covers the others): run the same command again to retry them. The first: \
             {first}",
            traces_path.display()
        );
    }
    Ok(())
}

/// Each question's stored sampling run: its chunks, in order.
type Pools = BTreeMap<usize, Vec<SampleChunk>>;

/// Stored sampling runs by question, each a contiguous run of chunks from 0, and the length of
/// the file's complete lines.
fn load_pools(path: &Path) -> Result<(Pools, Option<u64>)> {
    let Some((chunks, len)) = trace::read_jsonl::<SampleChunk>(path)? else {
        return Ok((BTreeMap::new(), None));
    };
    let mut pools = Pools::new();
    for chunk in chunks {
        pools.entry(chunk.index).or_default().push(chunk);
    }
    for pool in pools.values_mut() {
        pool.sort_by_key(|c| c.chunk);
        pool.dedup_by_key(|c| c.chunk);
        // A gap (never written by this program) would break the sampling order: keep the prefix.
        let contiguous = pool
            .iter()
            .enumerate()
            .take_while(|(i, c)| c.chunk as usize == *i)
            .count();
        pool.truncate(contiguous);
    }
    Ok((pools, Some(len)))
}

/// The jobs for every missing cell, question by question, in the order of `strategies`.
fn plan(
    questions: &[Question],
    strategies: &[Strategy],
    budgets: &[u64],
    done: &HashSet<(usize, String, u64)>,
    pools: &mut Pools,
    sample_reuse: bool,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    for q in questions {
        let question = Arc::new(q.clone());
        let missing = |s: Strategy, b: u64| !done.contains(&(q.index, strategy_name(s), b));
        let sample_cells: Vec<(Strategy, u64)> = if sample_reuse {
            strategies
                .iter()
                .filter(|s| samples::selection_rule(**s).is_some())
                .flat_map(|&s| budgets.iter().map(move |&b| (s, b)))
                .filter(|&(s, b)| missing(s, b))
                .collect()
        } else {
            Vec::new()
        };
        let mut sampled = sample_cells.is_empty();
        for &strategy in strategies {
            if sample_reuse && samples::selection_rule(strategy).is_some() {
                if !sampled {
                    sampled = true;
                    jobs.push(Job::Samples {
                        question: Arc::clone(&question),
                        cells: sample_cells.clone(),
                        chunks: pools.remove(&q.index).unwrap_or_default(),
                    });
                }
                continue;
            }
            for &budget in budgets {
                if missing(strategy, budget) {
                    jobs.push(Job::Search {
                        question: Arc::clone(&question),
                        strategy,
                        budget,
                    });
                }
            }
        }
    }
    jobs
}

/// The progress line's message: accuracy so far, failed cells if any, and (`speed`) how fast
/// the embedded worker generates.
fn eval_status(correct: u64, finished: u64, failed: u64, speed: Option<String>) -> String {
    let mut s = if finished == 0 {
        "accuracy so far: -".to_string()
    } else {
        format!(
            "accuracy so far: {correct}/{finished} = {:.1}%",
            100.0 * correct as f64 / finished as f64
        )
    };
    if failed > 0 {
        s.push_str(&format!(", {failed} failed (left out, rerun to retry)"));
    }
    if let Some(speed) = speed {
        s.push_str("; ");
        s.push_str(&speed);
    }
    s
}

/// The embedded worker's generated tokens per second since `started`, its forward passes per
/// second and tokens a pass (generated and prompt: small passes mean the searches in flight
/// keep too few sequences decoding; large slow ones, the model's own speed), and the prompt
/// tokens it computed per token generated (what the prefix cache failed to reuse); `None` on
/// a coordinator, whose workers count their own.
fn worker_speed(context: &Shared, started: Instant) -> Option<String> {
    let Runner::Embedded { worker, .. } = &context.runner else {
        return None;
    };
    let s = worker.stats();
    if s.generated_tokens == 0 {
        return None;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let passes = s.forward_passes.max(1) as f64;
    Some(format!(
        "{:.0} tokens/s generated in {:.0} passes/s of {:.0} tokens, {:.2} prompt tokens \
         computed per token",
        s.generated_tokens as f64 / secs,
        s.forward_passes as f64 / secs,
        (s.generated_tokens + s.prompt_tokens_computed) as f64 / passes,
        s.prompt_tokens_computed as f64 / s.generated_tokens as f64
    ))
}

/// Runs `jobs`, `concurrency` at a time on one runtime, writing each result as it comes.
fn execute(
    runtime: tokio::runtime::Runtime,
    context: Arc<Shared>,
    jobs: Vec<Job>,
    todo: usize,
    concurrency: usize,
    traces: &mut JsonlAppender,
    mut samples_out: Option<&mut JsonlAppender>,
) -> Result<(u64, Option<String>)> {
    let bar = crate::cli::Progress::new(todo as u64, "cells");
    let started = Instant::now();
    bar.advance(0, eval_status(0, 0, 0, None));
    bar.steady();
    let (mut finished, mut correct) = (0u64, 0u64);
    let mut failed: (u64, Option<String>) = (0, None);
    let result = runtime.block_on(async {
        let mut pending = jobs.into_iter();
        let mut running = JoinSet::new();
        loop {
            while running.len() < concurrency {
                let Some(job) = pending.next() else { break };
                let context = Arc::clone(&context);
                running.spawn(async move {
                    let what = job.describe();
                    run_job(&context, job).await.with_context(|| what)
                });
            }
            let Some(joined) = running.join_next().await else {
                return Ok(());
            };
            let done = match joined {
                Ok(Ok(done)) => done,
                // A cell whose worker calls failed is left out; the others go on.
                Ok(Err(e)) if e.downcast_ref::<samples::CellFailed>().is_some() => {
                    tracing::warn!("{e:#}");
                    failed.0 += 1;
                    failed.1.get_or_insert_with(|| format!("{e:#}"));
                    let speed = worker_speed(&context, started);
                    bar.advance(1, eval_status(correct, finished, failed.0, speed));
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(anyhow::anyhow!("a search task failed: {e}")),
            };
            if let Some(out) = samples_out.as_deref_mut() {
                for chunk in &done.new_chunks {
                    out.append(chunk)?;
                }
            }
            for record in &done.records {
                traces.append(record)?;
                finished += 1;
                correct += u64::from(record.correct);
            }
            bar.advance(
                done.records.len() as u64,
                eval_status(correct, finished, failed.0, worker_speed(&context, started)),
            );
        }
    });
    bar.finish();
    let speed = worker_speed(&context, started);
    // Abandoned tasks (after an error) are dropped with the runtime; their cells run next time.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result?;
    eprintln!(
        "arbor eval: ran {finished} cells, {correct} correct ({:.1}%){}",
        100.0 * correct as f64 / finished.max(1) as f64,
        speed.map_or(String::new(), |s| format!("; {s}"))
    );
    Ok(failed)
}

async fn run_job(context: &Shared, job: Job) -> Result<JobDone> {
    match job {
        Job::Search {
            question,
            strategy,
            budget,
        } => Ok(JobDone {
            records: vec![search_cell(context, &question, strategy, budget).await?],
            new_chunks: Vec::new(),
        }),
        Job::Samples {
            question,
            cells,
            chunks,
        } => sample_cells(context, &question, &cells, chunks).await,
    }
}

/// The knobs of `strategy` for this run.
fn knobs(context: &Shared, strategy: Strategy, n: u32) -> SearchKnobs {
    SearchKnobs {
        strategy,
        n,
        temperature: context.settings.temperature,
        max_step_tokens: context.settings.max_step_tokens,
        min_answer_depth: context.settings.min_answer_depth,
        scorer: context.prm_choice.scorer_choice(),
        tree_answer: context.settings.tree_answer,
    }
}

/// Sets a tree search's widths to what `budget` pays for: P = budget / `solution_tokens` whole
/// solutions (at least 1), spent about once per tree level, so a path can reach an answer
/// within the budget. Sampling strategies are left alone (their N follows the budget already).
/// MCTS starts from `root_share` × P independent samples (rounded; fewer than 2 are none).
pub(crate) fn tree_widths(
    strategy: &mut StrategyConfig,
    budget: u64,
    solution_tokens: u32,
    root_share: f64,
) {
    let p = arbor::strategy::solutions_in(budget, solution_tokens);
    match strategy {
        StrategyConfig::Mcts(m) => {
            m.expand_k = 2;
            m.simulations_in_flight = (p / 2).max(1);
            m.root_samples = arbor::strategy::root_samples(budget, solution_tokens, root_share);
        }
        StrategyConfig::Beam(b) => {
            let width = ((p as f64).sqrt().floor() as u32).max(1);
            b.beam_width = width;
            b.proposals_per_beam = (p / width).max(1);
        }
        StrategyConfig::Dvts(d) => {
            d.width = p.min(2);
            d.beams = p - p % d.width;
        }
        StrategyConfig::BestOfN(_)
        | StrategyConfig::WeightedBestOfN(_)
        | StrategyConfig::SelfConsistency(_) => {}
    }
}

/// One cell by one search at its budget.
async fn search_cell(
    context: &Shared,
    question: &Question,
    strategy: Strategy,
    budget: u64,
) -> Result<TraceRecord> {
    let seed = question_seed(context.settings.seed, question.index);
    // Without sample reuse, best-of-N at a budget samples as many solutions as the budget pays for.
    let n = if samples::selection_rule(strategy).is_some() {
        u32::try_from(budget / u64::from(context.settings.sample_tokens))
            .unwrap_or(K_MAX)
            .clamp(1, K_MAX)
    } else {
        context.settings.n
    };
    let mut config = knobs(context, strategy, n).config();
    if context.settings.scaled_trees {
        tree_widths(
            &mut config.strategy,
            budget,
            context.settings.sample_tokens,
            context.settings.root_share,
        );
    }
    config.seed = seed;
    config.budget.max_generated_tokens = Some(budget);
    let (worker, prm) = match &context.runner {
        Runner::Embedded { worker, prm } => (worker, prm),
        Runner::Remote(coordinator) => {
            let system = context.settings.system.as_deref();
            // Whatever fails here fails this cell only; the run goes on and a later one
            // retries it.
            let r = coordinator
                .search(&question.question, system, &config)
                .await
                .map_err(|e| samples::CellFailed(format!("{e:#}")))?;
            if r.termination == "too_many_failures" {
                return Err(samples::CellFailed(format!(
                    "the search ended after too many failed worker calls (answer {:?})",
                    r.answer
                ))
                .into());
            }
            return Ok(remote::record(
                question,
                strategy_name(strategy),
                budget,
                seed,
                r,
            ));
        }
    };
    let prompt = context.prompt(worker, &question.question)?;
    let mut search = Search::new(prompt, config)?;
    let (policy, scorer) = (
        samples::Recording::new(worker),
        samples::Recording::new(prm),
    );
    let outcome = search.run(&policy, &scorer, &SearchControl::new()).await?;
    samples::check_calls(&policy, &scorer)?;
    let tree = search.tree();
    let path = outcome
        .answer
        .as_ref()
        .map(|a| tree.path(a.node).iter().map(|s| s.text.clone()).collect())
        .unwrap_or_default();
    let c = &outcome.costs;
    let answer = outcome.answer.as_ref();
    Ok(TraceRecord {
        index: question.index,
        question: question.question.clone(),
        gold: question.gold.clone(),
        strategy: strategy_name(strategy),
        budget,
        seed,
        answer: answer.map(|a| a.answer.raw.clone()),
        answer_key: answer.map(|a| a.answer.key.clone()),
        value: answer.and_then(|a| a.value),
        correct: answer.is_some_and(|a| equivalent(&a.answer.raw, &question.gold)),
        costs: TraceCosts {
            generated_tokens: c.generated_tokens,
            prompt_tokens_computed: c.prompt_tokens_computed,
            prompt_tokens_reused: c.prompt_tokens_reused,
            prm_tokens_computed: c.scorer_tokens,
            policy_calls: c.policy_calls,
            nodes: c.nodes,
            wall_ms: c.wall_us / 1000,
        },
        termination: arbor::strategy::termination_name(outcome.termination),
        derived_from_samples: false,
        samples: None,
        candidates: Some(
            outcome
                .candidates
                .iter()
                .map(|c| TraceCandidate::new(c, &question.gold))
                .collect(),
        ),
        path,
    })
}

/// Extends the question's sampling run until it covers the largest missing budget, then reads
/// every missing cell off it.
async fn sample_cells(
    context: &Shared,
    question: &Question,
    cells: &[(Strategy, u64)],
    mut chunks: Vec<SampleChunk>,
) -> Result<JobDone> {
    let Runner::Embedded { worker, prm } = &context.runner else {
        bail!("sample reuse runs in this process only (a coordinator runs every cell as a search)");
    };
    let need = cells.iter().map(|c| c.1).max().unwrap_or(0);
    let seed = question_seed(context.settings.seed, question.index);
    let prompt = context.prompt(worker, &question.question)?;
    let mut new_chunks = Vec::new();
    let covered =
        |chunks: &[SampleChunk]| -> u64 { chunks.iter().map(SampleChunk::generated_tokens).sum() };
    while covered(&chunks) < need {
        let chunk = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        if chunk >= samples::CHUNKS_MAX {
            tracing::warn!(
                question = question.index,
                "sampling run stopped at {} chunks without covering {need} tokens",
                samples::CHUNKS_MAX
            );
            break;
        }
        let mut config = knobs(context, Strategy::BestOfN, context.settings.sample_chunk).config();
        config.seed = chunk_seed(seed, chunk);
        let made = samples::run_chunk(worker, prm, &prompt, config, question.index, chunk).await?;
        let produced = made.generated_tokens();
        chunks.push(made.clone());
        new_chunks.push(made);
        if produced == 0 {
            break;
        }
    }
    let records = cells
        .iter()
        .map(|&(strategy, budget)| {
            let derived = samples::derive(&chunks, budget, strategy);
            let chosen = derived.chosen.map(|(c, s)| &chunks[c].samples[s]);
            let answer = chosen.and_then(|s| s.answer.clone());
            TraceRecord {
                index: question.index,
                question: question.question.clone(),
                gold: question.gold.clone(),
                strategy: strategy_name(strategy),
                budget,
                seed,
                answer_key: answer.as_deref().map(arbor_search::normalize),
                correct: answer
                    .as_deref()
                    .is_some_and(|a| equivalent(a, &question.gold)),
                answer,
                value: chosen.and_then(|s| s.value),
                costs: derived.costs,
                termination: "derived".into(),
                derived_from_samples: true,
                samples: Some(derived.samples),
                candidates: Some(
                    derived
                        .candidates
                        .iter()
                        .map(|c| TraceCandidate::new(c, &question.gold))
                        .collect(),
                ),
                path: chosen.map(|s| s.path.clone()).unwrap_or_default(),
            }
        })
        .collect();
    Ok(JobDone {
        records,
        new_chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each level of a scaled tree costs about as many samples as the budget has solutions,
    /// and every configuration it makes is valid.
    #[test]
    fn tree_widths_follow_the_budget() {
        for (budget, per_level) in [(100u64, 1u32), (256, 1), (512, 2), (1024, 5), (4096, 16)] {
            for strategy in [Strategy::Mcts, Strategy::Beam, Strategy::Dvts] {
                let mut c = crate::search_cmd::SearchKnobs {
                    strategy,
                    n: 8,
                    temperature: 0.7,
                    max_step_tokens: 128,
                    min_answer_depth: 1,
                    scorer: arbor_search::ScorerChoice::LogProb,
                    tree_answer: None,
                }
                .config();
                tree_widths(&mut c.strategy, budget, 192, arbor::strategy::ROOT_SHARE);
                c.validate().unwrap();
                if let StrategyConfig::Mcts(m) = &c.strategy {
                    // 0.8 of the solutions the budget pays for start the tree.
                    let expected = (0.8 * f64::from(per_level)).round() as u32;
                    assert_eq!(m.root_samples, expected, "at {budget}");
                }
                let samples_per_level = match &c.strategy {
                    StrategyConfig::Mcts(m) => m.expand_k * m.simulations_in_flight,
                    StrategyConfig::Beam(b) => b.beam_width * b.proposals_per_beam,
                    StrategyConfig::Dvts(d) => d.beams,
                    _ => unreachable!(),
                };
                assert!(
                    samples_per_level <= per_level.max(2) && samples_per_level + 1 >= per_level,
                    "{strategy:?} at {budget}: {samples_per_level} samples per level for {per_level}"
                );
            }
        }
    }

    #[test]
    fn seeds_are_stable_and_distinct() {
        assert_eq!(question_seed(7, 3), question_seed(7, 3));
        let seeds = [
            question_seed(7, 3),
            question_seed(7, 4),
            question_seed(8, 3),
            chunk_seed(question_seed(7, 3), 0),
            chunk_seed(question_seed(7, 3), 1),
        ];
        for (i, a) in seeds.iter().enumerate() {
            for b in &seeds[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn the_plan_skips_done_cells_and_groups_sample_strategies() {
        let questions: Vec<Question> = (0..2)
            .map(|i| Question {
                index: i,
                question: format!("q{i}"),
                gold: "1".into(),
            })
            .collect();
        let strategies = [Strategy::Mcts, Strategy::BestOfN, Strategy::Majority];
        let mut done = HashSet::new();
        done.insert((0, "mcts".to_owned(), 256));
        done.insert((1, "best-of-n".to_owned(), 256));
        done.insert((1, "best-of-n".to_owned(), 512));
        done.insert((1, "majority".to_owned(), 256));
        done.insert((1, "majority".to_owned(), 512));
        let jobs = plan(
            &questions,
            &strategies,
            &[256, 512],
            &done,
            &mut BTreeMap::new(),
            true,
        );
        let described: Vec<String> = jobs.iter().map(Job::describe).collect();
        assert_eq!(
            described,
            vec![
                "question 0, mcts at 512 tokens",
                "question 0, sampling run",
                "question 1, mcts at 256 tokens",
                "question 1, mcts at 512 tokens",
            ]
        );
        assert_eq!(jobs[1].cells(), 4);
        // Without reuse every sample cell is its own search.
        let jobs = plan(
            &questions,
            &strategies,
            &[256, 512],
            &done,
            &mut BTreeMap::new(),
            false,
        );
        assert_eq!(jobs.iter().map(Job::cells).sum::<usize>(), 12 - 5);
        assert!(jobs.iter().all(|j| matches!(j, Job::Search { .. })));
    }
}

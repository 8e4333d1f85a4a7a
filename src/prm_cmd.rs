//! `arbor prm train`: a value head for the policy, learned from its own solutions to GSM8K
//! training questions labelled by Monte-Carlo completion (Math-Shepherd's recipe); and the
//! `--prm` option's parser shared with `arbor search`.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arbor_model::fetch::{sha256_file, DEFAULT_MODEL};
use arbor_model::{HiddenLayer, SamplingParams, StopReason};
use arbor_search::{
    equivalent, extract_answer, select_answer, Answer, AnswerSelection, ScoreRequest, Step,
};
use arbor_worker::prm::value_head::{accuracy, auc, step_hidden_states, FitOptions, HeadMeta};
use arbor_worker::prm::{
    split_into_steps, LabelTokenConfig, PrmConfig, RolloutValueConfig, ValueHead, ValueHeadConfig,
};
use arbor_worker::{ExpandItem, LocalWorker, WorkerOptions};
use clap::ValueEnum;

use crate::cli::{load_engine_with, Device};

/// `arbor prm` subcommands.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum PrmAction {
    /// Train a value head on the policy's hidden states (Math-Shepherd labels).
    ///
    /// For each GSM8K training question (from --offset on) the policy samples --samples
    /// solutions, split into steps at blank lines. Each step is labelled by Monte-Carlo
    /// completion: --rollouts continuations from the end of the step, and the share of them
    /// that reach the gold answer (a final step is labelled by its own answer). A head
    /// (logistic regression, or --hidden units of one ReLU layer) is fitted on the policy's
    /// final hidden state at each step's last token; 20% of the questions are held out and
    /// the held-out step accuracy and AUC printed and saved as JSON next to the head
    /// (FILE.json), with every labelled step in FILE.labels.jsonl. 15% of the others
    /// validate: the head keeps the weights with the lowest validation loss (early stopping)
    /// and is calibrated on them (Platt scaling).
    ///
    /// Labels are kept as they are made (FILE.steps.jsonl, FILE.features.f32): run the same
    /// command again, with more --questions if you like, and it resumes where it stopped. The
    /// last --dev-split lines of --dataset (the development split) are never labelled.
    ///
    /// Then search with it: arbor search --prm head.safetensors "..."
    ///
    /// Example (the token budget stops it after 20-40 minutes on 2 busy cores):
    ///   arbor prm train --dataset data/gsm8k/train.jsonl --questions 40 --samples 4 --rollouts 4 \
    ///     --steps-per-solution 2 --budget-tokens 60000 --out head.safetensors
    #[command(verbatim_doc_comment)]
    Train(TrainArgs),
}

/// How a step's Monte-Carlo share becomes the training target.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// 1 when any completion reaches the gold answer (Math-Shepherd's hard estimate).
    Hard,
    /// The share itself (soft estimate).
    Soft,
    /// Final steps only, 1 when the solution's answer is right: an outcome head (ORM) rather
    /// than a process head.
    Outcome,
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct TrainArgs {
    /// GSM8K-style JSONL: `question`, and `answer` ending in `#### N`.
    #[arg(long)]
    dataset: PathBuf,
    /// Questions to use.
    #[arg(long, default_value_t = 40)]
    questions: usize,
    /// First question (0-based line). The default keeps clear of the first thousand, which
    /// evaluations use.
    #[arg(long, default_value_t = 5000)]
    offset: usize,
    /// Solutions sampled per question.
    #[arg(long, default_value_t = 4)]
    samples: u32,
    /// Completions per step for its label.
    #[arg(long, default_value_t = 4)]
    rollouts: u32,
    /// Where to write the head (safetensors); the report goes next to it. The labels are
    /// kept as they are made in FILE.steps.jsonl and FILE.features.f32: running the same
    /// command again resumes, skipping the questions already labelled (--questions may grow).
    #[arg(long)]
    out: PathBuf,
    /// Where the labels are kept (LABELS.steps.jsonl, LABELS.features.f32), when not beside
    /// --out: train several heads (targets, sizes) from one labelling run.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Lines at the end of --dataset that are the development split (the last 500 of
    /// GSM8K's training file): labelling a question there is refused, so no head is ever
    /// trained on what evaluations report on. 0 turns the guard off.
    #[arg(long, default_value_t = 500)]
    dev_split: usize,
    /// Sampling temperature of solutions and completions.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Most tokens of one solution.
    #[arg(long, default_value_t = 320)]
    max_tokens: u32,
    /// Most tokens of one completion.
    #[arg(long, default_value_t = 256)]
    rollout_max_tokens: u32,
    /// Most steps per solution (later steps are dropped).
    #[arg(long, default_value_t = 10)]
    max_steps: usize,
    /// Steps per solution labelled by completions, chosen at random (0: all). A finished
    /// solution's last step is always labelled, by its own answer, at no cost.
    #[arg(long, default_value_t = 0)]
    steps_per_solution: usize,
    /// Stop starting new questions once this many tokens were generated.
    #[arg(long)]
    budget_tokens: Option<u64>,
    /// Questions labelled at once (their sequences share forward passes).
    #[arg(long, default_value_t = 2)]
    in_flight: usize,
    /// KV cache blocks of 16 tokens (about 0.4 MB each for the default model). Calls that find
    /// it full wait for others, so a small cache costs speed, not labels: raise it on a large
    /// GPU with many questions in flight.
    #[arg(long, default_value_t = 8192)]
    kv_blocks: usize,
    /// Where the policy's hidden states are read, and kept with the labels: `final_norm`
    /// (after the last block and the final norm), `block.B` (the residual stream after block
    /// B, counted from 0, scaled to unit RMS), or several, comma-separated
    /// (`block.8,block.16,final_norm`), kept side by side so that heads on each can be
    /// compared on the same labels (--head-layers). `auto`: the blocks a quarter, half,
    /// two thirds and five sixths of the way up, and the final norm
    /// (`block.5,block.11,block.15,block.19,final_norm` for the default model): on 415
    /// training questions their head had a lower validation loss than any one of them alone.
    #[arg(long, default_value = "auto")]
    layers: String,
    /// The layers the head reads: some of --layers (default: all of them, side by side).
    #[arg(long)]
    head_layers: Option<String>,
    /// Hidden units of the head (0: logistic regression).
    #[arg(long, default_value_t = 0)]
    hidden: usize,
    /// Training target.
    #[arg(long, value_enum, default_value_t = Target::Hard)]
    target: Target,
    /// Full-batch training steps.
    #[arg(long, default_value_t = 300)]
    epochs: usize,
    /// Learning rate (Adam).
    #[arg(long, default_value_t = 0.01)]
    learning_rate: f32,
    /// L2 penalty on the head's weights. The default had the lowest validation loss of 0.1,
    /// 0.3, 1 and 3 on 938 training questions, 8 samples each, five layers
    /// (heads/arbor-gsm8k-v1.json).
    #[arg(long, default_value_t = 0.1)]
    l2: f32,
    /// Weight of a ranking loss among each question's final steps (every right answer above
    /// every wrong one of the same question, Bradley–Terry), added to the per-step
    /// cross-entropy; 0: none. The cross-entropy mostly learns which questions are hard,
    /// which does little to choose among one question's samples (best-of-N); the report's
    /// `selection` figures (majority, weighted, best-of-N, oracle) show what each weight
    /// does: choose it on the validation figures, never the held-out ones. The calibration
    /// keeps the ranking's order.
    #[arg(long, default_value_t = 0.0)]
    pairwise: f32,
    /// Share of questions held out for evaluation.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Share of the remaining (training) questions kept aside for validation: the head's
    /// weights are those of the step with the lowest validation loss (early stopping), and
    /// its output is calibrated on them (Platt scaling). 0: every step, no calibration.
    #[arg(long, default_value_t = 0.15)]
    validation: f64,
    /// Training steps without a lower validation loss before training stops.
    #[arg(long, default_value_t = 100)]
    patience: usize,
    /// Seed of sampling, the split and the head's initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A GGUF file or Hugging Face folder; default: the embedded default model.
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

/// Value heads shipped with Arbor, by name. Beside each in `heads/`, NAME.json is the report
/// of the `arbor prm train` run that made it (its command, the labels' SHA-256, the policy's,
/// held-out AUCs).
pub(crate) const BUILTIN_HEADS: &[(&str, &[u8])] = &[
    (
        "arbor-gsm8k-v1",
        include_bytes!("../heads/arbor-gsm8k-v1.safetensors"),
    ),
    (
        "arbor-gsm8k-v0",
        include_bytes!("../heads/arbor-gsm8k-v0.safetensors"),
    ),
];

/// A built-in head's file under `$ARBOR_HOME/heads/`, written there on first use (and again
/// should it differ from the shipped bytes).
fn builtin_head(name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let dir = arbor_model::fetch::arbor_home().join("heads");
    let path = dir.join(format!("{name}.safetensors"));
    if std::fs::read(&path).ok().as_deref() != Some(bytes) {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

/// `--prm`: a JSON file with a PRM configuration, a value head file, a built-in head's name
/// ([`BUILTIN_HEADS`]), or a kind's name.
pub(crate) fn parse_prm(spec: &str) -> Result<PrmConfig> {
    if let Some((name, bytes)) = BUILTIN_HEADS.iter().find(|(n, _)| *n == spec) {
        return Ok(PrmConfig::ValueHead(ValueHeadConfig {
            path: builtin_head(name, bytes)?,
        }));
    }
    let path = Path::new(spec);
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "safetensors") {
            return Ok(PrmConfig::ValueHead(ValueHeadConfig { path: path.into() }));
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {spec}"))?;
        return PrmConfig::from_json(&text).with_context(|| format!("--prm {spec}"));
    }
    Ok(match spec {
        "judge" | "label_token" => PrmConfig::LabelToken(LabelTokenConfig::default()),
        "rollout" => PrmConfig::Rollout(RolloutValueConfig::default()),
        "log_prob" => PrmConfig::LogProb,
        "value_head" | "classifier" => {
            bail!(
                "--prm {spec} needs a file: a head (*.safetensors) or a JSON config with its path"
            )
        }
        _ => bail!(
            "--prm {spec}: no such file, and not a PRM kind (judge, rollout, log_prob) or a \
             built-in head ({}); give a JSON config such as {{\"kind\": \"rollout\", \
             \"rollouts\": 4}} in a file",
            BUILTIN_HEADS
                .iter()
                .map(|h| h.0)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

pub(crate) fn run(action: PrmAction) -> Result<()> {
    match action {
        PrmAction::Train(args) => train(args),
    }
}

struct Question {
    index: usize,
    text: String,
    gold: String,
}

/// One labelled step.
#[derive(Clone)]
struct Example {
    question: usize,
    sample: usize,
    step: usize,
    text: String,
    /// Share of completions from here that reached the gold answer.
    share: f32,
    /// The solution's last step, labelled by its own answer.
    is_final: bool,
    /// The policy's own confidence in the step, `exp(mean token log-prob)` (the baseline
    /// the head must beat: the `log_prob` scorer).
    confidence: f32,
    feature: Vec<f32>,
}

/// Choosing among each question's samples by their final steps (`values`: the head's, one per
/// example of `set`): the share of questions with an answered sample where the search's own
/// rules ([`select_answer`]: majority vote, the vote weighted by value, the single highest
/// value) and any sample (the oracle, pass@N) are right.
fn selection(set: &[&Example], values: &[f32]) -> serde_json::Value {
    // Each question's answered finals: (answer, value), and whether each is right.
    type Finals = (Vec<(Answer, Option<f64>)>, Vec<bool>);
    let mut finals: std::collections::BTreeMap<usize, Finals> = Default::default();
    for (e, &v) in set.iter().zip(values) {
        let Some(answer) = extract_answer(&e.text).filter(|_| e.is_final) else {
            continue;
        };
        let f = finals.entry(e.question).or_default();
        f.0.push((answer, Some(f64::from(v))));
        f.1.push(e.share > 0.0);
    }
    let n = finals.len().max(1) as f64;
    let rate = |rule: AnswerSelection| {
        finals
            .values()
            .filter(|(candidates, right)| select_answer(candidates, rule).is_some_and(|i| right[i]))
            .count() as f64
            / n
    };
    serde_json::json!({
        "questions": finals.len(),
        "majority": rate(AnswerSelection::Majority),
        "weighted_best_of_n": rate(AnswerSelection::WeightedVote),
        "best_of_n": rate(AnswerSelection::BestValue),
        "oracle": finals.values().filter(|f| f.1.contains(&true)).count() as f64 / n,
    })
}

fn read_questions(path: &Path, offset: usize, n: usize) -> Result<Vec<Question>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("--dataset {}", path.display()))?;
    let mut out = Vec::with_capacity(n);
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if i < offset {
            continue;
        }
        if out.len() == n {
            break;
        }
        let line = line?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        let (Some(q), Some(a)) = (v["question"].as_str(), v["answer"].as_str()) else {
            bail!(
                "{} line {}: needs `question` and `answer`",
                path.display(),
                i + 1
            );
        };
        let Some((_, gold)) = a.rsplit_once("####") else {
            bail!(
                "{} line {}: the answer has no `#### N`",
                path.display(),
                i + 1
            );
        };
        out.push(Question {
            index: i,
            text: q.to_string(),
            gold: gold.trim().to_string(),
        });
    }
    if out.is_empty() {
        bail!("{}: no question from line {offset} on", path.display());
    }
    Ok(out)
}

fn sampling(args: &TrainArgs, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: 0,
        top_p: 1.0,
        seed,
    }
}

/// Samples solutions to one question, labels their steps and reads their hidden states.
async fn label_question(
    worker: LocalWorker,
    args: Arc<TrainArgs>,
    layers: Arc<Vec<HiddenLayer>>,
    q: Question,
) -> Result<Vec<Example>> {
    let tok = worker.tokenizer().clone();
    let prompt = worker.format_question(&q.text)?;
    let prompt_ids = tok.encode(&prompt, true)?;
    let solutions = worker
        .expand(
            vec![ExpandItem {
                prompt: prompt_ids.clone(),
                k: args.samples as usize,
                max_tokens: args.max_tokens as usize,
                sampling: sampling(&args, args.seed ^ (q.index as u64) << 16),
                stop: Vec::new(),
            }],
            None,
        )
        .await?;
    let delimiter = &worker.options().step_delimiter;
    // Per solution: its steps, and whether it ended with the right answer.
    let mut paths: Vec<(Vec<Step>, bool, bool)> = Vec::new();
    for s in &solutions[0].samples {
        let mut steps = split_into_steps(&tok, &s.tokens, &s.logprobs, delimiter)?;
        steps.truncate(args.max_steps);
        let ended = s.stop_reason == StopReason::Eos;
        let right = ended && extract_answer(&s.text).is_some_and(|a| equivalent(&a.raw, &q.gold));
        if !steps.is_empty() {
            paths.push((steps, ended, right));
        }
    }
    // Completions from the chosen steps (never a finished solution's last).
    let mut items = Vec::new();
    let mut owner = Vec::new();
    let mut labelled: Vec<Vec<usize>> = Vec::new();
    for (p, (steps, ended, _)) in paths.iter().enumerate() {
        let open = steps.len() - usize::from(*ended);
        let seed = args.seed ^ ((q.index * 1000 + p) as u64);
        let mut chosen = shuffled((0..open).collect(), seed);
        if args.steps_per_solution > 0 {
            chosen.truncate(args.steps_per_solution);
        }
        if *ended {
            chosen.push(steps.len() - 1);
        }
        chosen.sort_unstable();
        labelled.push(chosen);
        let mut tokens = prompt_ids.clone();
        let mut text = String::new();
        for (i, step) in steps.iter().enumerate() {
            tokens.extend_from_slice(&step.token_ids);
            text.push_str(&step.text);
            text.push_str(delimiter);
            if i >= open || !labelled[p].contains(&i) {
                continue;
            }
            items.push(ExpandItem {
                prompt: tokens.clone(),
                k: args.rollouts as usize,
                max_tokens: args.rollout_max_tokens as usize,
                sampling: sampling(&args, args.seed ^ ((q.index * 1000 + p * 100 + i) as u64)),
                stop: Vec::new(),
            });
            owner.push((p, i, text.clone()));
        }
    }
    let completions = if items.is_empty() {
        Vec::new()
    } else {
        worker.expand(items, None).await?
    };
    let mut share: HashMap<(usize, usize), f32> = HashMap::new();
    for ((p, i, text), result) in owner.iter().zip(&completions) {
        let reached = result
            .samples
            .iter()
            .filter(|c| {
                c.stop_reason == StopReason::Eos
                    && extract_answer(&format!("{text}{}", c.text))
                        .is_some_and(|a| equivalent(&a.raw, &q.gold))
            })
            .count();
        share.insert(
            (*p, *i),
            reached as f32 / result.samples.len().max(1) as f32,
        );
    }
    let requests: Vec<ScoreRequest> = paths
        .iter()
        .map(|(steps, _, _)| ScoreRequest {
            node: arbor_search::NodeId::ROOT,
            prompt: Arc::from(prompt.as_str()),
            steps: steps.iter().cloned().map(Arc::new).collect(),
        })
        .collect();
    let features = step_hidden_states(&worker, &requests, &layers)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let mut out = Vec::new();
    for (p, ((steps, _, right), (rows, _))) in paths.iter().zip(features).enumerate() {
        for (i, (step, feature)) in steps.iter().zip(rows).enumerate() {
            if !labelled[p].contains(&i) {
                continue;
            }
            let (share, is_final) = match share.get(&(p, i)) {
                Some(&s) => (s, false),
                None => (if *right { 1.0 } else { 0.0 }, true),
            };
            out.push(Example {
                question: q.index,
                sample: p,
                step: i,
                text: step.text.clone(),
                share,
                is_final,
                confidence: step.mean_logprob().exp() as f32,
                feature,
            });
        }
    }
    Ok(out)
}

/// Calibration of predicted probabilities `p` against `labels`, in `bins` equal-width bins:
/// the expected calibration error (the count-weighted mean of |mean prediction − observed
/// rate|) and, per non-empty bin, its range, count, mean prediction and observed rate (the
/// points of a reliability plot).
fn reliability(p: &[f32], labels: &[bool], bins: usize) -> (f64, Vec<serde_json::Value>) {
    let mut sums = vec![(0usize, 0f64, 0usize); bins];
    for (&x, &l) in p.iter().zip(labels) {
        let b = ((f64::from(x) * bins as f64) as usize).min(bins - 1);
        sums[b].0 += 1;
        sums[b].1 += f64::from(x);
        sums[b].2 += usize::from(l);
    }
    let total = p.len().max(1) as f64;
    let mut ece = 0.0;
    let mut out = Vec::new();
    for (b, &(n, sum, pos)) in sums.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let (mean, rate) = (sum / n as f64, pos as f64 / n as f64);
        ece += n as f64 / total * (mean - rate).abs();
        out.push(serde_json::json!({
            "from": b as f64 / bins as f64, "to": (b + 1) as f64 / bins as f64,
            "count": n, "mean_prediction": mean, "observed": rate,
        }));
    }
    (ece, out)
}

/// A seeded shuffle (xorshift), so the split does not depend on a random-number crate.
fn shuffled(mut items: Vec<usize>, seed: u64) -> Vec<usize> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in (1..items.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        items.swap(i, (s % (i as u64 + 1)) as usize);
    }
    items
}

/// The model file's name and SHA-256 (the default model's is known; a folder has none).
fn model_identity(path: &Path) -> Result<(String, String)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name == DEFAULT_MODEL.file_name {
        return Ok((name, DEFAULT_MODEL.sha256.into()));
    }
    if path.is_file() {
        return Ok((name, sha256_file(path)?));
    }
    Ok((name, String::new()))
}

/// SHA-256 (hex) of the label store's two files, steps then features: the fingerprint of the
/// data a head was trained on.
fn labels_digest(base: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for ext in ["steps.jsonl", "features.f32"] {
        let path = base.with_extension(ext);
        let mut f =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The labelling parameters a store was made with; a resumed run must match them.
/// The layers `--layers auto` reads: the blocks a quarter, half, two thirds and five sixths of
/// the way up a model of `n_layers` blocks, and the final norm.
fn auto_layers(n_layers: usize) -> Vec<HiddenLayer> {
    let mut out: Vec<HiddenLayer> = Vec::new();
    for (num, den) in [(1, 4), (1, 2), (2, 3), (5, 6)] {
        let b = ((n_layers * num + den / 2) / den).clamp(1, n_layers) - 1;
        if !out.contains(&HiddenLayer::Block(b)) {
            out.push(HiddenLayer::Block(b));
        }
    }
    out.push(HiddenLayer::Final);
    out
}

fn label_header(
    args: &TrainArgs,
    model_sha256: &str,
    d_model: usize,
    layers: &[HiddenLayer],
) -> serde_json::Value {
    let mut header = serde_json::json!({
        "arbor_prm_labels": 1,
        "dataset": args.dataset.display().to_string(),
        "model_sha256": model_sha256,
        "d_model": d_model,
        "samples": args.samples,
        "rollouts": args.rollouts,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "rollout_max_tokens": args.rollout_max_tokens,
        "max_steps": args.max_steps,
        "steps_per_solution": args.steps_per_solution,
        "seed": args.seed,
    });
    // Stores of the final layer alone (all of them before `--layers`) name no layers.
    if layers != [HiddenLayer::Final] {
        header["layers"] = HiddenLayer::list(layers).into();
    }
    header
}

/// `d_model` values per layer a store's header names (`layers`; none: the final layer).
fn store_width(header: &serde_json::Value) -> usize {
    let d_model = header["d_model"].as_u64().unwrap_or(0) as usize;
    let layers = header["layers"]
        .as_str()
        .map_or(1, |l| l.split(',').count());
    d_model * layers
}

/// Labelled steps on disk as they are made, so a long labelling run can stop and resume:
/// `PATH.steps.jsonl` (a header line, then one line per step and a `{"done": QUESTION}` line
/// after each question's steps) and `PATH.features.f32` (each step's hidden states, `d_model`
/// little-endian f32s per layer of the header's `layers`, in the order of the step lines). A question counts only once its
/// `done` line is written; anything after the last one (a run stopped mid-write) is dropped
/// on resume.
struct LabelStore {
    steps: std::io::BufWriter<std::fs::File>,
    features: std::io::BufWriter<std::fs::File>,
    d_model: usize,
}

impl LabelStore {
    /// Opens the store next to `out`, creating it with `header` or resuming it: returns the
    /// store and the examples of every finished question. A store made with other parameters
    /// is refused, naming the first that differs.
    fn open(out: &Path, header: &serde_json::Value) -> Result<(LabelStore, Vec<Example>)> {
        let steps_path = out.with_extension("steps.jsonl");
        let features_path = out.with_extension("features.f32");
        // Values per step.
        let d_model = store_width(header);
        let mut examples = Vec::new();
        // Bytes of each file that hold finished questions.
        let (mut keep_steps, mut keep_rows) = (0u64, 0usize);
        if steps_path.exists() {
            let text = std::fs::read_to_string(&steps_path)
                .with_context(|| format!("reading {}", steps_path.display()))?;
            let features = std::fs::read(&features_path).unwrap_or_default();
            let rows_on_disk = features.len() / (4 * d_model.max(1));
            let mut pending: Vec<Example> = Vec::new();
            let mut offset = 0u64;
            for (n, line) in text.split_inclusive('\n').enumerate() {
                offset += line.len() as u64;
                if !line.ends_with('\n') {
                    break; // cut off mid-line
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    break;
                };
                if n == 0 {
                    if let Some(field) = header
                        .as_object()
                        .into_iter()
                        .flatten()
                        .find(|(k, want)| v.get(k.as_str()) != Some(want))
                        .map(|(k, _)| k)
                    {
                        bail!(
                            "{} was made with another `{field}` ({} there, {} now): use another \
                             --out, or the same options",
                            steps_path.display(),
                            v.get(field).unwrap_or(&serde_json::Value::Null),
                            header[field]
                        );
                    }
                    keep_steps = offset;
                    continue;
                }
                if v.get("done").is_some() {
                    keep_rows += pending.len();
                    examples.append(&mut pending);
                    keep_steps = offset;
                    continue;
                }
                let row = keep_rows + pending.len();
                if row >= rows_on_disk {
                    break; // its hidden state was never written
                }
                let feature = features[row * 4 * d_model..(row + 1) * 4 * d_model]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let field = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                pending.push(Example {
                    question: v["question"].as_u64().unwrap_or(0) as usize,
                    sample: v["sample"].as_u64().unwrap_or(0) as usize,
                    step: v["step"].as_u64().unwrap_or(0) as usize,
                    text: v["text"].as_str().unwrap_or_default().to_string(),
                    share: field("share") as f32,
                    is_final: v["final"].as_bool().unwrap_or(false),
                    confidence: field("confidence") as f32,
                    feature,
                });
            }
        }
        let open = |path: &Path, keep: u64| -> Result<std::fs::File> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            f.set_len(keep)
                .with_context(|| format!("truncating {}", path.display()))?;
            Ok(f)
        };
        let steps_file = open(&steps_path, keep_steps)?;
        let features_file = open(&features_path, (keep_rows * 4 * d_model) as u64)?;
        let mut store = LabelStore {
            steps: std::io::BufWriter::new(steps_file),
            features: std::io::BufWriter::new(features_file),
            d_model,
        };
        if keep_steps == 0 {
            writeln!(store.steps, "{header}")?;
            store.steps.flush()?;
        }
        Ok((store, examples))
    }

    /// Appends one finished question's steps (hidden states first, then the lines, then its
    /// `done` line, each flushed).
    fn append(&mut self, question: usize, examples: &[Example]) -> Result<()> {
        for e in examples {
            if e.feature.len() != self.d_model {
                bail!(
                    "a hidden state of {} values, not {}",
                    e.feature.len(),
                    self.d_model
                );
            }
            for x in &e.feature {
                self.features.write_all(&x.to_le_bytes())?;
            }
        }
        self.features.flush()?;
        for e in examples {
            let line = serde_json::json!({
                "question": e.question, "sample": e.sample, "step": e.step, "final": e.is_final,
                "share": e.share, "confidence": e.confidence, "text": e.text,
            });
            writeln!(self.steps, "{line}")?;
        }
        writeln!(self.steps, "{}", serde_json::json!({ "done": question }))?;
        self.steps.flush()?;
        Ok(())
    }
}

/// Refuses questions in the last `dev_split` lines of a dataset of `lines` lines.
fn check_dev_split(
    dataset: &Path,
    lines: usize,
    dev_split: usize,
    offset: usize,
    questions: usize,
) -> Result<()> {
    if dev_split == 0 {
        return Ok(());
    }
    let first_dev = lines.saturating_sub(dev_split);
    let last = offset + questions.min(lines.saturating_sub(offset));
    if last > first_dev {
        bail!(
            "--offset {offset} --questions {questions} reaches line {} of {} ({} lines): its \
             last {dev_split} lines are the development split, which a head is never trained \
             on; keep --offset + --questions at most {first_dev} (or set --dev-split)",
            last - 1,
            dataset.display(),
            lines
        );
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    if args.samples == 0 || args.rollouts == 0 || args.questions == 0 {
        bail!("--questions, --samples and --rollouts must be at least 1");
    }
    if !(0.0..1.0).contains(&args.holdout) {
        bail!("--holdout must be in [0, 1)");
    }
    if !(0.0..1.0).contains(&args.validation) {
        bail!("--validation must be in [0, 1)");
    }
    let lines = std::io::BufReader::new(
        std::fs::File::open(&args.dataset)
            .with_context(|| format!("--dataset {}", args.dataset.display()))?,
    )
    .lines()
    .count();
    check_dev_split(
        &args.dataset,
        lines,
        args.dev_split,
        args.offset,
        args.questions,
    )?;
    let mut questions = read_questions(&args.dataset, args.offset, args.questions)?;
    let model_path = crate::cli::resolve_model(args.model.clone())?;
    let (model_name, model_sha256) = model_identity(&model_path)?;
    if args.kv_blocks == 0 {
        anyhow::bail!("--kv-blocks must be at least 1");
    }
    let (model, engine) = load_engine_with(
        Some(model_path),
        args.device,
        arbor_model::EngineOptions {
            kv_blocks_max: args.kv_blocks,
            ..arbor_model::EngineOptions::default()
        },
    )?;
    let n_layers = model.config.n_layers;
    let layers = match args.layers.as_str() {
        "auto" => auto_layers(n_layers),
        list => {
            HiddenLayer::parse_list(list, n_layers).map_err(|e| anyhow::anyhow!("--layers: {e}"))?
        }
    };
    let head_layers = match &args.head_layers {
        None => layers.clone(),
        Some(list) => {
            let chosen = HiddenLayer::parse_list(list, n_layers)
                .map_err(|e| anyhow::anyhow!("--head-layers: {e}"))?;
            if let Some(missing) = chosen.iter().find(|l| !layers.contains(l)) {
                bail!(
                    "--head-layers: {missing} is not among the layers labelled (--layers {})",
                    HiddenLayer::list(&layers)
                );
            }
            chosen
        }
    };
    let header = label_header(&args, &model_sha256, model.config.d_model, &layers);
    let labels_base = args.labels.clone().unwrap_or_else(|| args.out.clone());
    let (mut store, resumed) = LabelStore::open(&labels_base, &header)?;
    let done: std::collections::HashSet<usize> = resumed.iter().map(|e| e.question).collect();
    if !done.is_empty() {
        eprintln!(
            "resuming: {} questions already labelled ({} steps) in {}",
            done.len(),
            resumed.len(),
            labels_base.with_extension("steps.jsonl").display()
        );
    }
    // Questions done before are skipped (a question that gave no step is done again: cheap).
    questions.retain(|q| !done.contains(&q.index));
    let worker = LocalWorker::new(&model, engine, WorkerOptions::default());
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let bar = crate::cli::Progress::new(questions.len() as u64, "questions");
    let args = Arc::new(args);
    let read_layers = Arc::new(layers.clone());
    let n_questions = questions.len();
    let mut examples: Vec<Example> = rt.block_on(async {
        let mut pending = questions.into_iter();
        let mut tasks = tokio::task::JoinSet::new();
        let mut examples = resumed;
        let mut started_questions = 0;
        loop {
            let over_budget = args
                .budget_tokens
                .is_some_and(|b| worker.stats().generated_tokens >= b);
            while tasks.len() < args.in_flight.max(1) && !over_budget {
                let Some(q) = pending.next() else { break };
                started_questions += 1;
                let index = q.index;
                let job = label_question(worker.clone(), args.clone(), read_layers.clone(), q);
                tasks.spawn(async move { (index, job.await) });
            }
            let Some(done) = tasks.join_next().await else {
                break;
            };
            let (index, labelled) = done?;
            let labelled = labelled?;
            store.append(index, &labelled)?;
            examples.extend(labelled);
            bar.advance(
                1,
                format!(
                    "{} steps labelled, {} tokens generated",
                    examples.len(),
                    worker.stats().generated_tokens
                ),
            );
        }
        if started_questions < n_questions {
            bar.println(format!(
                "token budget reached after {started_questions} of {n_questions} questions"
            ));
        }
        anyhow::Ok(examples)
    })?;
    bar.finish();
    let label_secs = started.elapsed().as_secs_f64();
    if examples.is_empty() {
        bail!("no step was labelled");
    }
    // The head's layers, out of those kept side by side.
    if head_layers != layers {
        let d = model.config.d_model;
        let at: Vec<usize> = head_layers
            .iter()
            .map(|l| layers.iter().position(|k| k == l).expect("checked above"))
            .collect();
        for e in &mut examples {
            e.feature = at
                .iter()
                .flat_map(|&k| e.feature[k * d..(k + 1) * d].iter().copied())
                .collect();
        }
    }

    // Hold out whole questions.
    let mut ids: Vec<usize> = examples.iter().map(|e| e.question).collect();
    ids.sort_unstable();
    ids.dedup();
    let held_n = ((ids.len() as f64 * args.holdout).round() as usize).clamp(
        usize::from(ids.len() > 1 && args.holdout > 0.0),
        ids.len() - 1,
    );
    let held: Vec<usize> = shuffled(ids.clone(), args.seed)[..held_n].to_vec();
    let (test, rest): (Vec<&Example>, Vec<&Example>) =
        examples.iter().partition(|e| held.contains(&e.question));
    // Validation questions from the rest: early stopping and calibration.
    let mut rest_ids: Vec<usize> = rest.iter().map(|e| e.question).collect();
    rest_ids.sort_unstable();
    rest_ids.dedup();
    let val_n = ((rest_ids.len() as f64 * args.validation).round() as usize)
        .min(rest_ids.len().saturating_sub(1));
    let val_q: Vec<usize> = shuffled(rest_ids, args.seed ^ 0x5eed)[..val_n].to_vec();
    let (mut val, mut train): (Vec<&Example>, Vec<&Example>) =
        rest.into_iter().partition(|e| val_q.contains(&e.question));
    if args.target == Target::Outcome {
        train.retain(|e| e.is_final);
        val.retain(|e| e.is_final);
        if train.is_empty() {
            bail!("--target outcome: no finished solution among the training questions");
        }
    }
    let target = |e: &Example| match args.target {
        Target::Hard | Target::Outcome => f32::from(e.share > 0.0),
        Target::Soft => e.share,
    };
    let meta =
        HeadMeta::new(&model_name, &model_sha256, &model.config, args.hidden).reading(&head_layers);
    let options = FitOptions {
        hidden_units: args.hidden,
        epochs: args.epochs,
        learning_rate: args.learning_rate,
        l2: args.l2,
        seed: args.seed,
        patience: args.patience,
        pairwise: args.pairwise,
    };
    if !(args.pairwise >= 0.0 && args.pairwise.is_finite()) {
        bail!("--pairwise {}: give a weight of 0 or more", args.pairwise);
    }
    let xs: Vec<Vec<f32>> = train.iter().map(|e| e.feature.clone()).collect();
    let ys: Vec<f32> = train.iter().map(|e| target(e)).collect();
    let vxs: Vec<Vec<f32>> = val.iter().map(|e| e.feature.clone()).collect();
    let vys: Vec<f32> = val.iter().map(|e| target(e)).collect();
    // The ranking's groups: each question's final steps.
    let groups = |set: &[&Example]| -> Vec<Option<u32>> {
        set.iter()
            .map(|e| e.is_final.then_some(e.question as u32))
            .collect()
    };
    let (head, fit) = ValueHead::fit_ranked(
        meta,
        (&xs, &ys, &groups(&train)),
        (&vxs, &vys, &groups(&val)),
        &options,
    );
    head.save(&args.out)?;

    let metrics = |set: &[&Example]| {
        let p: Vec<f32> = set.iter().map(|e| head.predict(&e.feature)).collect();
        let labels: Vec<bool> = set.iter().map(|e| e.share > 0.0).collect();
        let positive = labels.iter().filter(|&&l| l).count() as f64 / labels.len().max(1) as f64;
        let confidence: Vec<f32> = set.iter().map(|e| e.confidence).collect();
        // The same AUC over final steps only (is the answer right?) and the others.
        let auc_where = |keep: bool| {
            let (p, l): (Vec<f32>, Vec<bool>) = set
                .iter()
                .zip(&p)
                .zip(&labels)
                .filter(|((e, _), _)| e.is_final == keep)
                .map(|((_, &p), &l)| (p, l))
                .unzip();
            auc(&p, &l)
        };
        // Final steps of solutions with at least two steps: is a *reasoned* answer right?
        // (One-step guesses are mostly wrong, which any score that spots them separates.)
        let reasoned = |values: &[f32]| {
            let (p, l): (Vec<f32>, Vec<bool>) = set
                .iter()
                .zip(values)
                .zip(&labels)
                .filter(|((e, _), _)| e.is_final && e.step >= 1)
                .map(|((_, &p), &l)| (p, l))
                .unzip();
            auc(&p, &l)
        };
        let (ece, bins) = reliability(&p, &labels, 10);
        let questions: std::collections::BTreeSet<usize> = set.iter().map(|e| e.question).collect();
        serde_json::json!({
            "reasoned_final_steps": set.iter().filter(|e| e.is_final && e.step >= 1).count(),
            "auc_reasoned_final_steps": reasoned(&p),
            "log_prob_confidence_auc_reasoned_final_steps": reasoned(&confidence),
            "expected_calibration_error": ece,
            "reliability": bins,
            "steps": set.len(),
            "final_steps": set.iter().filter(|e| e.is_final).count(),
            "questions": questions.len(),
            "positive_share": positive,
            "majority_class_accuracy": positive.max(1.0 - positive),
            "accuracy": accuracy(&p, &labels),
            "auc": auc(&p, &labels),
            "auc_final_steps": auc_where(true),
            "auc_other_steps": auc_where(false),
            "log_prob_confidence_auc": auc(&confidence, &labels),
            "selection": selection(set, &p),
        })
    };
    let (train_m, val_m, test_m) = (metrics(&train), metrics(&val), metrics(&test));
    let s = worker.stats();
    let report = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "head": args.out.display().to_string(),
        "model": model_name,
        "model_sha256": model_sha256,
        "questions": {
            "offset": args.offset,
            "labelled": ids.len(),
            "held_out": held,
            "validation": val_q,
        },
        "labels_file": labels_base.with_extension("steps.jsonl").display().to_string(),
        "labels_sha256": labels_digest(&labels_base)?,
        "fit": fit,
        "validation_steps": val.len(),
        "samples": args.samples,
        "rollouts": args.rollouts,
        "target": format!("{:?}", args.target).to_lowercase(),
        "layers": HiddenLayer::list(&head_layers),
        "hidden_units": args.hidden,
        "labels": match args.target {
            Target::Outcome => "final steps only: 1 when the solution's answer is right",
            _ => "1 when any completion from the step reaches the gold answer (a final step: its own answer)",
        },
        "train": train_m,
        "validation": val_m,
        "held_out": test_m,
        "generated_tokens": s.generated_tokens,
        "prompt_tokens_computed": s.prompt_tokens_computed,
        "labelling_secs": label_secs,
        "total_secs": started.elapsed().as_secs_f64(),
    });
    let report_path = args.out.with_extension("json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    let plot_path = args.out.with_extension("reliability.png");
    let bins: Vec<crate::eval::plot::Bin> = test_m["reliability"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let f = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
            (f("mean_prediction"), f("observed"), f("count") as usize)
        })
        .collect();
    let title = format!(
        "Reliability on {} held-out steps ({} questions), calibration error {:.3}",
        test_m["steps"],
        test_m["questions"],
        test_m["expected_calibration_error"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
    crate::eval::plot::write_reliability(&plot_path, &title, &bins)?;
    let labels_path = args.out.with_extension("labels.jsonl");
    let mut labels = std::io::BufWriter::new(
        std::fs::File::create(&labels_path)
            .with_context(|| format!("writing {}", labels_path.display()))?,
    );
    for e in &examples {
        let line = serde_json::json!({
            "question": e.question, "sample": e.sample, "step": e.step, "final": e.is_final,
            "share": e.share, "held_out": held.contains(&e.question),
            "value": head.predict(&e.feature), "log_prob_confidence": e.confidence,
            "text": e.text,
        });
        writeln!(labels, "{line}")?;
    }
    labels.flush()?;
    let show = |name: &str, m: &serde_json::Value| {
        let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name}: {} steps from {} questions, accuracy {:.3} (majority class {:.3}), \
             AUC {:.3} (final steps {:.3}, reasoned final steps {:.3}, others {:.3}; log-prob \
             confidence {:.3}, on reasoned final steps {:.3}), calibration error {:.3}",
            m["steps"],
            m["questions"],
            f("accuracy"),
            f("majority_class_accuracy"),
            f("auc"),
            f("auc_final_steps"),
            f("auc_reasoned_final_steps"),
            f("auc_other_steps"),
            f("log_prob_confidence_auc"),
            f("log_prob_confidence_auc_reasoned_final_steps"),
            f("expected_calibration_error"),
        )
    };
    show("train", &train_m);
    if !val.is_empty() {
        println!(
            "validation: {} steps from {} questions; kept training step {} of {} (loss {:.4}, \
             {:.4} after calibration a = {:.3}, b = {:.3})",
            val.len(),
            val_q.len(),
            fit.best_epoch,
            fit.epochs_run,
            fit.validation_loss,
            fit.calibrated_validation_loss,
            fit.calibration[0],
            fit.calibration[1]
        );
    }
    show("held out", &test_m);
    println!(
        "head: {}  report: {}  reliability plot: {}  labels: {}  ({} tokens generated, {:.0}s)",
        args.out.display(),
        report_path.display(),
        plot_path.display(),
        labels_path.display(),
        s.generated_tokens,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prm_specs_parse_to_configs() {
        assert!(matches!(
            parse_prm("judge").unwrap(),
            PrmConfig::LabelToken(_)
        ));
        assert!(matches!(
            parse_prm("rollout").unwrap(),
            PrmConfig::Rollout(_)
        ));
        assert!(parse_prm("value_head")
            .unwrap_err()
            .to_string()
            .contains("needs a file"));
        assert!(parse_prm("oracle")
            .unwrap_err()
            .to_string()
            .contains("not a PRM kind"));
        let dir = std::env::temp_dir().join(format!("arbor-prm-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("prm.json");
        std::fs::write(&json, r#"{"kind": "rollout", "rollouts": 2}"#).unwrap();
        let c = parse_prm(json.to_str().unwrap()).unwrap();
        assert!(matches!(c, PrmConfig::Rollout(r) if r.rollouts == 2));
        std::fs::write(&json, r#"{"kind": "rollout", "rolouts": 2}"#).unwrap();
        let err = format!("{:#}", parse_prm(json.to_str().unwrap()).unwrap_err());
        assert!(err.contains("rolouts"), "{err}");
        let head = dir.join("h.safetensors");
        std::fs::write(&head, b"").unwrap();
        assert!(matches!(
            parse_prm(head.to_str().unwrap()).unwrap(),
            PrmConfig::ValueHead(_)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn example(question: usize, step: usize, d: usize) -> Example {
        Example {
            question,
            sample: 1,
            step,
            text: format!("step {step} of {question}"),
            share: 0.5,
            is_final: step == 1,
            confidence: 0.25,
            feature: (0..d)
                .map(|i| (question * 100 + step * 10 + i) as f32)
                .collect(),
        }
    }

    #[test]
    fn labels_resume_from_the_last_finished_question_and_refuse_other_options() {
        let dir = std::env::temp_dir().join(format!("arbor-label-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("head.safetensors");
        let header = serde_json::json!({"arbor_prm_labels": 1, "d_model": 4, "samples": 2});
        let (mut store, before) = LabelStore::open(&out, &header).unwrap();
        assert!(before.is_empty());
        store
            .append(3, &[example(3, 0, 4), example(3, 1, 4)])
            .unwrap();
        store.append(5, &[example(5, 0, 4)]).unwrap();
        drop(store);
        // A run stopped mid-question: a step line and part of its hidden state, no `done`.
        let steps = out.with_extension("steps.jsonl");
        let features = out.with_extension("features.f32");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&steps)
            .unwrap();
        writeln!(
            f,
            "{}",
            serde_json::json!({"question": 7, "sample": 0, "step": 0})
        )
        .unwrap();
        write!(f, "{{\"question\": 7, \"sam").unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&features)
            .unwrap();
        f.write_all(&[0u8; 10]).unwrap();
        drop(f);
        let (mut store, resumed) = LabelStore::open(&out, &header).unwrap();
        let got: Vec<(usize, usize, Vec<f32>)> = resumed
            .iter()
            .map(|e| (e.question, e.step, e.feature.clone()))
            .collect();
        let want: Vec<(usize, usize, Vec<f32>)> =
            [example(3, 0, 4), example(3, 1, 4), example(5, 0, 4)]
                .into_iter()
                .map(|e| (e.question, e.step, e.feature))
                .collect();
        assert_eq!(got, want);
        assert!(resumed[1].is_final && !resumed[0].is_final);
        assert_eq!(resumed[0].text, "step 0 of 3");
        // The partial question was cut off both files.
        assert_eq!(std::fs::metadata(&features).unwrap().len(), 3 * 4 * 4);
        store.append(7, &[example(7, 0, 4)]).unwrap();
        drop(store);
        let (_, again) = LabelStore::open(&out, &header).unwrap();
        assert_eq!(again.len(), 4);
        assert_eq!(again[3].feature, example(7, 0, 4).feature);
        // Other labelling options: refused, naming the option.
        let other = serde_json::json!({"arbor_prm_labels": 1, "d_model": 4, "samples": 8});
        let err = LabelStore::open(&out, &other).err().unwrap().to_string();
        assert!(err.contains("`samples` (2 there, 8 now)"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_development_split_is_never_labelled() {
        let d = Path::new("train.jsonl");
        // GSM8K's training file: 7473 lines, the last 500 the development split.
        assert!(check_dev_split(d, 7473, 500, 1000, 5973).is_ok());
        let err = check_dev_split(d, 7473, 500, 1000, 5974)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("development split") && err.contains("6973"),
            "{err}"
        );
        assert!(check_dev_split(d, 7473, 500, 7000, 10).is_err());
        assert!(check_dev_split(d, 7473, 0, 7000, 10).is_ok());
        // --questions past the end counts only the lines there are.
        assert!(check_dev_split(d, 7473, 500, 6900, 1_000_000).is_err());
        assert!(check_dev_split(d, 600, 500, 0, 100).is_ok());
        assert!(check_dev_split(d, 600, 500, 0, 101).is_err());
    }

    #[test]
    fn reliability_bins_predictions_and_measures_their_calibration() {
        // Perfectly calibrated: 0.25 predicted, 1 in 4 positive; 0.95 predicted, all positive.
        let p = [0.25, 0.25, 0.25, 0.25, 0.95, 0.95];
        let l = [true, false, false, false, true, true];
        let (ece, bins) = reliability(&p, &l, 10);
        assert_eq!(bins.len(), 2);
        assert_eq!(bins[0]["count"], 4);
        assert!((bins[0]["observed"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        // |0.95 - 1| weighted 2 of 6.
        assert!((ece - 0.05 * 2.0 / 6.0).abs() < 1e-6, "{ece}");
        // A prediction of exactly 1 falls in the last bin.
        let (_, bins) = reliability(&[1.0], &[true], 10);
        assert_eq!(bins[0]["from"], 0.9);
    }

    #[test]
    fn auto_layers_spread_over_the_depth() {
        let names = |n| HiddenLayer::list(&auto_layers(n));
        assert_eq!(names(24), "block.5,block.11,block.15,block.19,final_norm");
        assert_eq!(names(28), "block.6,block.13,block.18,block.22,final_norm");
        // Shallow models: each block once, never past the last.
        assert_eq!(names(2), "block.0,block.1,final_norm");
        assert_eq!(names(1), "block.0,final_norm");
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        let a = shuffled((0..10).collect(), 3);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, shuffled((0..10).collect(), 3));
        assert_ne!(a, shuffled((0..10).collect(), 4));
    }
}

//! Process reward models: every way Arbor values a reasoning step, behind the search crate's
//! one [`Scorer`] trait and chosen by configuration ([`PrmConfig`], JSON with a `kind`).
//!
//! | kind | file | what scores a step |
//! |---|---|---|
//! | `log_prob` | (search crate) | the policy's own confidence, `exp(mean token log-prob)` |
//! | `label_token` | [`label_token`] | P(good) / (P(good) + P(bad)) at a tag after the step: a judge prompt to the policy itself, or Math-Shepherd's `ки` with `+`/`-` |
//! | `classifier` | [`classifier`] | a 2-class head on the final hidden state at each `<extra_0>` (Qwen2.5-Math-PRM), from a Hugging Face folder |
//! | `rollout` | [`rollout`] | the share of k cheap rollouts from the step that agree with their majority answer |
//! | `value_head` | [`value_head`] | a small head on the policy's hidden state at the step's end, trained by `arbor prm train` |
//!
//! Every scorer reads token positions from token offsets: the pieces of a prompt (question,
//! steps, tags) are tokenized separately and their ids concatenated, recording where each tag
//! lands; no position is ever found by searching text.
//!
//! [`Scorer`] returns `impl Future`, so it is not object-safe; [`AnyScorer`] dispatches over
//! the kinds instead of a `Box<dyn Scorer>`.

pub mod classifier;
pub mod label_token;
pub(crate) mod reader;
pub mod rollout;
pub mod value_head;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::{ChatMessage, Engine, EngineOptions, Model, ModelError, Tokenizer};
use arbor_search::{LogProbScorer, ScoreError, ScoreRequest, Scorer, Step, StepScores};
use serde::{Deserialize, Serialize};

use crate::{LocalWorker, WorkerError, WorkerOptions};

pub use classifier::{ClassifierConfig, ClassifierScorer};
pub use label_token::{LabelTokenConfig, LabelTokenScorer, TagMode};
pub use rollout::{RolloutScorer, RolloutValueConfig};
pub use value_head::{ValueHead, ValueHeadConfig, ValueHeadScorer};

/// Which process reward model scores steps, with its settings.
///
/// ```
/// use arbor_worker::prm::PrmConfig;
/// let judge: PrmConfig = serde_json::from_str(r#"{"kind": "label_token"}"#).unwrap();
/// let rollout = PrmConfig::from_json(r#"{"kind": "rollout", "rollouts": 4}"#).unwrap();
/// assert!(PrmConfig::from_json(r#"{"kind": "rollout", "rolouts": 4}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PrmConfig {
    /// The policy's own step confidence (no reward model; costs nothing).
    LogProb,
    /// Probability of a good label token at a tag after each step.
    LabelToken(LabelTokenConfig),
    /// A classification head at step separators (Qwen2.5-Math-PRM style).
    Classifier(ClassifierConfig),
    /// Agreement of cheap rollouts from each step.
    Rollout(RolloutValueConfig),
    /// A learned head on the policy's hidden states (`arbor prm train`).
    ValueHead(ValueHeadConfig),
}

impl PrmConfig {
    /// Parses a config from JSON (unknown fields are errors, missing ones take defaults).
    pub fn from_json(json: &str) -> Result<PrmConfig, PrmError> {
        serde_json::from_str(json).map_err(|e| PrmError::Json(e.to_string()))
    }

    /// The kind's name as it is written in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            PrmConfig::LogProb => "log_prob",
            PrmConfig::LabelToken(_) => "label_token",
            PrmConfig::Classifier(_) => "classifier",
            PrmConfig::Rollout(_) => "rollout",
            PrmConfig::ValueHead(_) => "value_head",
        }
    }
}

/// Why a PRM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PrmError {
    /// The JSON does not parse or has an unknown field.
    #[error("PRM config: {0}")]
    Json(String),
    /// A field's value cannot work.
    #[error("PRM config `{field}`: {reason}")]
    InvalidConfig {
        /// The field, e.g. `good` or `model`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A file (a head, a model folder) is missing, unreadable or malformed.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Loading a reward model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> PrmError {
    PrmError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

/// Any of the PRMs, dispatching [`Scorer::score`] to the one configured.
#[derive(Debug)]
pub enum AnyScorer {
    /// See [`PrmConfig::LogProb`].
    LogProb(LogProbScorer),
    /// See [`PrmConfig::LabelToken`].
    LabelToken(LabelTokenScorer),
    /// See [`PrmConfig::Classifier`].
    Classifier(ClassifierScorer),
    /// See [`PrmConfig::Rollout`].
    Rollout(RolloutScorer),
    /// See [`PrmConfig::ValueHead`].
    ValueHead(ValueHeadScorer),
}

impl Scorer for AnyScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        match self {
            AnyScorer::LogProb(s) => s.score(batch).await,
            AnyScorer::LabelToken(s) => s.score(batch).await,
            AnyScorer::Classifier(s) => s.score(batch).await,
            AnyScorer::Rollout(s) => s.score(batch).await,
            AnyScorer::ValueHead(s) => s.score(batch).await,
        }
    }
}

/// Builds the configured PRM. `policy` is the worker whose model wrote the paths: the judge,
/// rollouts and value heads run on it (sharing its engine and prefix cache); a PRM with its
/// own model gets its own worker, with the policy worker's engine limits.
pub fn build(config: &PrmConfig, policy: &LocalWorker) -> Result<AnyScorer, PrmError> {
    Ok(match config {
        PrmConfig::LogProb => AnyScorer::LogProb(LogProbScorer),
        PrmConfig::LabelToken(c) => AnyScorer::LabelToken(LabelTokenScorer::new(c, policy)?),
        PrmConfig::Classifier(c) => AnyScorer::Classifier(ClassifierScorer::new(c, policy)?),
        PrmConfig::Rollout(c) => AnyScorer::Rollout(RolloutScorer::new(c, policy)?),
        PrmConfig::ValueHead(c) => AnyScorer::ValueHead(ValueHeadScorer::new(c, policy)?),
    })
}

/// Loads a reward model into a worker of its own (its own engine thread), or fails naming the
/// field that pointed at it.
pub(crate) fn load_worker(path: &Path) -> Result<(LocalWorker, Model), PrmError> {
    if !path.exists() {
        return Err(PrmError::File {
            path: path.into(),
            reason: "no such file or folder (field `model`)".into(),
        });
    }
    let model = Model::load(path)?;
    let engine = Engine::new(
        Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
        EngineOptions::default(),
    );
    let options = WorkerOptions {
        // Nothing samples on this worker, so a prefix cache would stay empty.
        prefix_cache_entries_max: 0,
        ..WorkerOptions::default()
    };
    Ok((LocalWorker::new(&model, engine, options), model))
}

/// The single token a label string must be, or an error naming the field.
pub(crate) fn single_token(
    tokenizer: &Tokenizer,
    field: &'static str,
    text: &str,
) -> Result<u32, PrmError> {
    let ids = tokenizer.encode(text, true)?;
    match ids[..] {
        [id] => Ok(id),
        _ => Err(invalid(
            field,
            format!(
                "{text:?} is {} tokens for this model's tokenizer, not one",
                ids.len()
            ),
        )),
    }
}

/// Recovers the user's question from a search prompt made with the policy's chat template
/// (`LocalWorker::format_question*`), so a reward model can lay it out in its own format.
///
/// The template is rendered once with marker texts as the system prompt and the question;
/// the literal text around the markers is what any prompt made by the template has around
/// its system prompt and question.
#[derive(Debug, Clone)]
pub(crate) struct QuestionFinder {
    before_system: String,
    between: String,
    after_question: String,
}

impl QuestionFinder {
    const SYSTEM: &'static str = "\u{1}SYSTEM\u{1}";
    const QUESTION: &'static str = "\u{2}QUESTION\u{2}";

    /// `None` when the policy has no chat template, or its rendering hides the markers.
    pub(crate) fn new(policy: &Tokenizer) -> Option<Self> {
        let text = policy
            .apply_chat_template(
                &[
                    ChatMessage::new("system", Self::SYSTEM),
                    ChatMessage::new("user", Self::QUESTION),
                ],
                true,
            )
            .ok()?;
        let s = text.find(Self::SYSTEM)?;
        let q = text.find(Self::QUESTION)?;
        if q < s + Self::SYSTEM.len() {
            return None;
        }
        Some(QuestionFinder {
            before_system: text[..s].to_string(),
            between: text[s + Self::SYSTEM.len()..q].to_string(),
            after_question: text[q + Self::QUESTION.len()..].to_string(),
        })
    }

    /// The question inside `prompt`, or `None` when `prompt` was not made by the template.
    pub(crate) fn question<'a>(&self, prompt: &'a str) -> Option<&'a str> {
        let rest = prompt
            .strip_prefix(&self.before_system)?
            .strip_suffix(&self.after_question)?;
        let at = rest.find(&self.between)?;
        Some(&rest[at + self.between.len()..])
    }
}

/// Fills a prefix template: `{prompt}` is the search's prompt as the policy sees it,
/// `{question}` the user's question recovered from it.
pub(crate) fn render_prefix(
    template: &str,
    prompt: &str,
    finder: Option<&QuestionFinder>,
) -> Result<String, ScoreError> {
    let mut out = template.replace("{prompt}", prompt);
    if out.contains("{question}") {
        let question = finder.and_then(|f| f.question(prompt)).ok_or_else(|| {
            ScoreError::new(
                "the prefix template uses {question}, but the search prompt was not made by \
                 the policy's chat template; use {prompt} instead",
            )
        })?;
        out = out.replace("{question}", question);
    }
    Ok(out)
}

/// Splits generated tokens into reasoning steps exactly as step-by-step sampling with stop
/// string `delimiter` would have: a step ends at the token whose decoding completes the
/// delimiter (that token belongs to the step; the text is cut before the delimiter).
pub fn split_into_steps(
    tokenizer: &Tokenizer,
    tokens: &[u32],
    logprobs: &[f32],
    delimiter: &str,
) -> Result<Vec<Step>, ModelError> {
    let mut steps = Vec::new();
    let mut start = 0;
    for end in 1..=tokens.len() {
        let text = tokenizer.decode(&tokens[start..end])?;
        let at = text.find(delimiter);
        if at.is_some() || end == tokens.len() {
            steps.push(Step {
                text: text[..at.unwrap_or(text.len())].to_string(),
                token_ids: tokens[start..end].to_vec(),
                token_logprobs: logprobs.get(start..end).unwrap_or_default().to_vec(),
            });
            start = end;
        }
    }
    Ok(steps)
}

/// A score request for a path given as texts (tests, training): tokens from `tokenizer`.
pub fn request_from_texts(
    tokenizer: &Tokenizer,
    prompt: &str,
    steps: &[&str],
) -> Result<ScoreRequest, ModelError> {
    let steps = steps
        .iter()
        .map(|t| {
            Ok(Arc::new(Step {
                text: t.trim_end_matches('\n').to_string(),
                token_ids: tokenizer.encode(t, false)?,
                token_logprobs: Vec::new(),
            }))
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    Ok(ScoreRequest {
        node: arbor_search::NodeId::ROOT,
        prompt: Arc::from(prompt),
        steps,
    })
}

/// `P(good) / (P(good) + P(bad))` from the two logits, computed without overflow.
pub(crate) fn two_way(good: f32, bad: f32) -> f32 {
    1.0 / (1.0 + (bad - good).exp())
}

pub(crate) fn worker_error(e: WorkerError) -> ScoreError {
    ScoreError::new(format!("reward model: {e}"))
}

pub(crate) fn model_error(e: ModelError) -> ScoreError {
    ScoreError::new(format!("reward model: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_with_defaults_and_reject_typos() {
        let check = |json: &str, ok: bool| {
            assert_eq!(PrmConfig::from_json(json).is_ok(), ok, "{json}");
        };
        check(r#"{"kind": "log_prob"}"#, true);
        check(r#"{"kind": "label_token"}"#, true);
        check(
            r#"{"kind": "label_token", "tag_mode": "inline", "tag": " ки", "good": "+", "bad": "-"}"#,
            true,
        );
        check(r#"{"kind": "label_token", "tagg": "x"}"#, false);
        check(r#"{"kind": "classifier", "model": "/m"}"#, true);
        check(
            r#"{"kind": "rollout", "rollouts": 3, "temperature": 0.5}"#,
            true,
        );
        check(r#"{"kind": "value_head", "path": "h.safetensors"}"#, true);
        check(r#"{"kind": "value_head", "file": "h.safetensors"}"#, false);
        check(r#"{"kind": "oracle"}"#, false);
        let c = PrmConfig::from_json(r#"{"kind": "rollout"}"#).unwrap();
        assert_eq!(c, PrmConfig::Rollout(RolloutValueConfig::default()));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(PrmConfig::from_json(&json).unwrap(), c);
    }

    #[test]
    fn two_way_is_a_softmax_over_two() {
        let (g, b) = (1.3f32, -0.4f32);
        let by_hand = g.exp() / (g.exp() + b.exp());
        assert!((two_way(g, b) - by_hand).abs() < 1e-6);
        assert_eq!(two_way(100.0, -100.0), 1.0);
        assert_eq!(two_way(-100.0, 100.0), 0.0);
    }
}

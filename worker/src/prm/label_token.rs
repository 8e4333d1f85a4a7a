//! The label-token PRM: a language model reads the question and the path with a tag after each
//! step, and a step's score is `P(good) / (P(good) + P(bad))` from the next-token logits at its
//! tag.
//!
//! Two layouts ([`TagMode`]):
//! - `fork` (the default, a judge): after each step a fork of the path's sequence reads the tag,
//!   a question such as "Is this step correct?", so later steps never see it. With the policy
//!   model itself and the search's own prompt, the path's tokens are the policy's and the
//!   worker's prefix cache already holds them: a step costs about the tag's tokens.
//! - `inline` (Math-Shepherd): the tag follows every step in one sequence
//!   (`question step1 ки\nstep2 ки\n…`) and the logits at each tag are read in one pass.

use std::path::PathBuf;

use arbor_search::{ScoreCost, ScoreError, ScoreRequest, Scorer, StepScores};
use serde::{Deserialize, Serialize};

use super::reader::{read_paths, PathLayout, Probe, Read};
use super::{
    invalid, load_worker, model_error, render_prefix, single_token, two_way, worker_error,
    PrmError, QuestionFinder,
};
use crate::LocalWorker;

/// The default judge question, asked of the policy in its own chat format after each step.
pub const JUDGE_TAG: &str = "<|im_end|>\n<|im_start|>user\nIs the last step of your answer correct? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n";

/// Where the tag goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TagMode {
    /// After each step, in a fork that later steps do not see (a judge's question).
    #[default]
    Fork,
    /// After each step, in the one sequence (Math-Shepherd's step tag).
    Inline,
}

/// Settings of the label-token PRM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelTokenConfig {
    /// A GGUF file or Hugging Face folder (Math-Shepherd, say); `None` is the policy model
    /// itself, sharing its engine and prefix cache.
    pub model: Option<PathBuf>,
    /// Text before the first step: `{prompt}` is the search's prompt as the policy sees it,
    /// `{question}` the user's question recovered from it. Special tokens in it are parsed.
    pub prefix: String,
    /// The tag: the question a fork asks after each step, or the marker that follows each
    /// step inline. The score is read at its last token. Special tokens are parsed.
    pub tag: String,
    /// Where the tag goes.
    pub tag_mode: TagMode,
    /// The label meaning "this step is right"; must be one token.
    pub good: String,
    /// The label meaning "this step is wrong"; must be one token.
    pub bad: String,
    /// Text after each step (inline: after its tag) when steps are re-tokenized from their
    /// text, which happens when the reader is not the policy model. The policy's own tokens
    /// already end with the step delimiter.
    pub step_separator: String,
}

impl Default for LabelTokenConfig {
    fn default() -> Self {
        LabelTokenConfig {
            model: None,
            prefix: "{prompt}".into(),
            tag: JUDGE_TAG.into(),
            tag_mode: TagMode::Fork,
            good: "Yes".into(),
            bad: "No".into(),
            step_separator: "\n\n".into(),
        }
    }
}

impl LabelTokenConfig {
    /// Math-Shepherd's format: `question step1 ки\nstep2 ки\n…`, `+` against `-` at each `ки`.
    pub fn math_shepherd(model: PathBuf) -> Self {
        LabelTokenConfig {
            model: Some(model),
            prefix: "{question} ".into(),
            tag: " ки".into(),
            tag_mode: TagMode::Inline,
            good: "+".into(),
            bad: "-".into(),
            step_separator: "\n".into(),
        }
    }
}

/// Scores steps by label-token probabilities; see the module docs.
#[derive(Debug)]
pub struct LabelTokenScorer {
    config: LabelTokenConfig,
    /// The worker that runs the reader model (the policy's own, or one of its own).
    reader: LocalWorker,
    /// Steps are the policy's own tokens (the reader is the policy model).
    own_tokens: bool,
    finder: Option<QuestionFinder>,
    good: u32,
    bad: u32,
    tag: Vec<u32>,
    separator: Vec<u32>,
}

impl LabelTokenScorer {
    /// Checks the configuration against the reader model's tokenizer and loads that model
    /// when it is not the policy.
    pub fn new(config: &LabelTokenConfig, policy: &LocalWorker) -> Result<Self, PrmError> {
        let reader = match &config.model {
            Some(path) => load_worker(path)?.0,
            None => policy.clone(),
        };
        let tok = reader.tokenizer();
        let good = single_token(tok, "good", &config.good)?;
        let bad = single_token(tok, "bad", &config.bad)?;
        if good == bad {
            return Err(invalid("bad", "is the same token as `good`"));
        }
        let tag = tok.encode(&config.tag, true)?;
        if tag.is_empty() {
            return Err(invalid(
                "tag",
                "must not be empty: scores are read at its last token",
            ));
        }
        let finder = QuestionFinder::new(policy.tokenizer());
        if config.prefix.contains("{question}") && finder.is_none() {
            return Err(invalid(
                "prefix",
                "{question} needs the policy's chat template, and this policy has none",
            ));
        }
        Ok(LabelTokenScorer {
            own_tokens: config.model.is_none(),
            separator: tok.encode(&config.step_separator, true)?,
            config: config.clone(),
            reader,
            finder,
            good,
            bad,
            tag,
        })
    }

    /// The token stream of one path and where its tags are.
    fn layout(&self, r: &ScoreRequest) -> Result<PathLayout, ScoreError> {
        let tok = self.reader.tokenizer();
        let prefix = render_prefix(&self.config.prefix, &r.prompt, self.finder.as_ref())?;
        let mut tokens = tok.encode(&prefix, true).map_err(model_error)?;
        let inline = self.config.tag_mode == TagMode::Inline;
        let (mut step_ends, mut read_at) = (Vec::new(), Vec::new());
        for step in &r.steps {
            if self.own_tokens {
                tokens.extend_from_slice(&step.token_ids);
            } else {
                let text = tok.encode(&step.text, false).map_err(model_error)?;
                tokens.extend_from_slice(&text);
            }
            if inline {
                tokens.extend_from_slice(&self.tag);
                read_at.push(tokens.len() - 1);
            }
            if !self.own_tokens {
                tokens.extend_from_slice(&self.separator);
            }
            step_ends.push(tokens.len());
        }
        Ok(PathLayout {
            tokens,
            step_ends,
            read_at,
        })
    }
}

impl Scorer for LabelTokenScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        let layouts = batch
            .iter()
            .map(|r| self.layout(r))
            .collect::<Result<Vec<_>, _>>()?;
        let probe = match self.config.tag_mode {
            TagMode::Inline => Probe::Inline,
            TagMode::Fork => Probe::Fork(self.tag.clone()),
        };
        let read = Read::Logits(vec![self.good, self.bad]);
        let readouts = self
            .reader
            .with_engine_and_cache(move |engine, _, cache| {
                read_paths(engine, Some(cache), &layouts, &probe, &read)
            })
            .await
            .map_err(worker_error)?
            .map_err(model_error)?;
        Ok(readouts
            .into_iter()
            .map(|r| StepScores {
                scores: r.rows.iter().map(|l| two_way(l[0], l[1])).collect(),
                cost: ScoreCost {
                    tokens_computed: r.tokens_computed,
                    ..ScoreCost::default()
                },
            })
            .collect())
    }
}

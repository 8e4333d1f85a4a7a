//! The classification-head PRM (Qwen2.5-Math-PRM style): a decoder reads the question and the
//! steps, each followed by a separator token (`<extra_0>`); a 2-class head on the final hidden
//! state at each separator gives the step's score, `softmax(head(h))[1]`.
//!
//! Loaded from a Hugging Face folder: `config.json`, `tokenizer.json` (+ its chat template in
//! `tokenizer_config.json`) and safetensors holding the decoder (`model.*`) and the head, either
//! Qwen2.5-Math-PRM's `score.0.{weight,bias}` → ReLU → `score.2.{weight,bias}`
//! (`Qwen2ForProcessRewardModel`'s `nn.Sequential(Linear, ReLU, Linear)`) or a single linear
//! `score.weight` (+ optional `score.bias`, as token-classification models have). The head runs
//! in f32 on the CPU; it is a few million multiply-adds against the decoder's billions.

use std::path::{Path, PathBuf};

use arbor_model::safetensors_folder::SafetensorsFolder;
use arbor_model::{ChatMessage, HiddenLayer, ModelError};
use arbor_search::{ScoreCost, ScoreError, ScoreRequest, Scorer, StepScores};
use serde::{Deserialize, Serialize};

use super::reader::{read_paths, PathLayout, Probe, Read};
use super::{
    invalid, load_worker, model_error, render_prefix, worker_error, PrmError, QuestionFinder,
};
use crate::LocalWorker;

/// Settings of the classification-head PRM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// The Hugging Face folder of the reward model (required).
    pub model: PathBuf,
    /// The text after each step whose last token's hidden state the head reads.
    pub separator: String,
    /// The system prompt of the reward model's chat template (Qwen2.5-Math-PRM's own).
    pub system: String,
    /// Text before the first step, overriding the chat template: `{prompt}` is the search's
    /// prompt, `{question}` the user's question recovered from it.
    pub prefix: Option<String>,
    /// The head's class that means "this step is right".
    pub positive_class: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            model: PathBuf::new(),
            separator: "<extra_0>".into(),
            system: "Please reason step by step, and put your final answer within \\boxed{}."
                .into(),
            prefix: None,
            positive_class: 1,
        }
    }
}

fn tensor_error(name: &str, reason: String) -> ModelError {
    ModelError::Tensor {
        name: name.to_string(),
        reason,
    }
}

/// A dense layer in f32: `y = W x + b`, `W` row-major `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Linear {
    pub(crate) w: Vec<f32>,
    pub(crate) b: Vec<f32>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl Linear {
    pub(crate) fn apply(&self, x: &[f32]) -> Vec<f32> {
        debug_assert_eq!(x.len(), self.cols);
        (0..self.rows)
            .map(|r| {
                let row = &self.w[r * self.cols..(r + 1) * self.cols];
                row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + self.b[r]
            })
            .collect()
    }
}

/// The head: one linear layer, or linear → ReLU → linear.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierHead {
    layers: Vec<Linear>,
}

impl ClassifierHead {
    /// Reads the head from a folder's safetensors, checking shapes against `d_model`.
    pub fn load(folder: &SafetensorsFolder, d_model: usize, dir: &Path) -> Result<Self, PrmError> {
        let linear = |w: &str, b: &str, cols: usize| -> Result<Linear, PrmError> {
            let (shape, weights) = folder.tensor_f32(w)?;
            let [rows, c] = shape[..] else {
                return Err(tensor_error(w, format!("shape {shape:?}, expected 2-D")).into());
            };
            if c != cols {
                return Err(
                    tensor_error(w, format!("shape {shape:?}, expected [_, {cols}]")).into(),
                );
            }
            let bias = if folder.has_tensor(b) {
                let (bs, bias) = folder.tensor_f32(b)?;
                if bs != [rows] {
                    return Err(tensor_error(b, format!("shape {bs:?}, expected [{rows}]")).into());
                }
                bias
            } else {
                vec![0.0; rows]
            };
            Ok(Linear {
                w: weights,
                b: bias,
                rows,
                cols,
            })
        };
        let layers = if folder.has_tensor("score.0.weight") {
            let first = linear("score.0.weight", "score.0.bias", d_model)?;
            let second = linear("score.2.weight", "score.2.bias", first.rows)?;
            vec![first, second]
        } else if folder.has_tensor("score.weight") {
            vec![linear("score.weight", "score.bias", d_model)?]
        } else {
            return Err(PrmError::File {
                path: dir.into(),
                reason: "no classification head: expected `score.0.weight` … `score.2.bias` \
                         (Qwen2.5-Math-PRM) or `score.weight`"
                    .into(),
            });
        };
        Ok(ClassifierHead { layers })
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.rows)
    }

    /// Class probabilities for one final hidden state.
    pub fn probabilities(&self, hidden: &[f32]) -> Vec<f32> {
        let mut x = hidden.to_vec();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.apply(&x);
            if i + 1 < self.layers.len() {
                x.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
        let z: f32 = exps.iter().sum();
        exps.iter().map(|e| e / z).collect()
    }
}

/// Scores steps with a classification head; see the module docs.
#[derive(Debug)]
pub struct ClassifierScorer {
    config: ClassifierConfig,
    reader: LocalWorker,
    head: ClassifierHead,
    separator: Vec<u32>,
    finder: Option<QuestionFinder>,
}

impl ClassifierScorer {
    /// Loads the reward model and its head.
    pub fn new(config: &ClassifierConfig, policy: &LocalWorker) -> Result<Self, PrmError> {
        if config.model.as_os_str().is_empty() {
            return Err(invalid(
                "model",
                "required: the reward model's Hugging Face folder",
            ));
        }
        if !config.model.is_dir() {
            return Err(PrmError::File {
                path: config.model.clone(),
                reason: "not a folder (field `model` needs a Hugging Face folder)".into(),
            });
        }
        let folder = SafetensorsFolder::open(&config.model)?;
        let (reader, model) = load_worker(&config.model)?;
        let head = ClassifierHead::load(&folder, model.config.d_model, &config.model)?;
        if config.positive_class >= head.classes() {
            return Err(invalid(
                "positive_class",
                format!("the head has {} classes", head.classes()),
            ));
        }
        let separator = reader.tokenizer().encode(&config.separator, true)?;
        if separator.is_empty() {
            return Err(invalid("separator", "must not be empty"));
        }
        let finder = QuestionFinder::new(policy.tokenizer());
        let needs_question = config
            .prefix
            .as_deref()
            .is_none_or(|p| p.contains("{question}"));
        if needs_question && finder.is_none() {
            return Err(invalid(
                "prefix",
                "the question cannot be recovered: the policy has no chat template; set a prefix with {prompt}",
            ));
        }
        if config.prefix.is_none() && reader.tokenizer().chat_template().is_none() {
            return Err(invalid(
                "prefix",
                "the reward model has no chat template; set a prefix",
            ));
        }
        Ok(ClassifierScorer {
            config: config.clone(),
            reader,
            head,
            separator,
            finder,
        })
    }

    /// The head, for inspection and tests.
    pub fn head(&self) -> &ClassifierHead {
        &self.head
    }

    /// The text before the first step: the prefix template, or the reward model's chat
    /// template with its system prompt and the question, up to where the answer begins.
    pub fn prefix_text(&self, prompt: &str) -> Result<String, ScoreError> {
        match &self.config.prefix {
            Some(template) => render_prefix(template, prompt, self.finder.as_ref()),
            None => {
                let question = render_prefix("{question}", prompt, self.finder.as_ref())?;
                self.reader
                    .tokenizer()
                    .apply_chat_template(
                        &[
                            ChatMessage::new("system", &self.config.system),
                            ChatMessage::new("user", &question),
                        ],
                        true,
                    )
                    .map_err(model_error)
            }
        }
    }

    fn layout(&self, r: &ScoreRequest) -> Result<PathLayout, ScoreError> {
        let tok = self.reader.tokenizer();
        let mut tokens = tok
            .encode(&self.prefix_text(&r.prompt)?, true)
            .map_err(model_error)?;
        let (mut step_ends, mut read_at) = (Vec::new(), Vec::new());
        for step in &r.steps {
            let text = tok.encode(step.text.trim(), false).map_err(model_error)?;
            tokens.extend_from_slice(&text);
            tokens.extend_from_slice(&self.separator);
            read_at.push(tokens.len() - 1);
            step_ends.push(tokens.len());
        }
        Ok(PathLayout {
            tokens,
            step_ends,
            read_at,
        })
    }
}

impl Scorer for ClassifierScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        let layouts = batch
            .iter()
            .map(|r| self.layout(r))
            .collect::<Result<Vec<_>, _>>()?;
        let readouts = self
            .reader
            .with_engine_and_cache(move |engine, _, _| {
                read_paths(
                    engine,
                    None,
                    &layouts,
                    &Probe::Inline,
                    &Read::Hidden(vec![HiddenLayer::Final]),
                )
            })
            .await
            .map_err(worker_error)?
            .map_err(model_error)?;
        let positive = self.config.positive_class;
        Ok(readouts
            .into_iter()
            .map(|r| StepScores {
                scores: r
                    .rows
                    .iter()
                    .map(|h| self.head.probabilities(h)[positive])
                    .collect(),
                cost: ScoreCost {
                    tokens_computed: r.tokens_computed,
                    ..ScoreCost::default()
                },
            })
            .collect())
    }
}

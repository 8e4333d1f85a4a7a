//! The learned value head: a small model (logistic regression, or one hidden ReLU layer) on the
//! policy's own hidden states at the last token of each step (the final one, a middle block's,
//! or several side by side), trained by `arbor prm train` on Monte-Carlo labels and stored as
//! safetensors with its metadata.
//!
//! File format (`*.safetensors`, f32), with `n` = `d_model` times the layers read: `mean` and
//! `inv_std` `[n]` standardise the hidden states; then either `w1` `[h, n]`, `b1` `[h]`, ReLU,
//! `w2` `[1, h]`, `b2` `[1]`, or (no hidden layer) `w2` `[1, n]`, `b2` `[1]`; the value is
//! `sigmoid(a * z + b)` of that
//! output `z`, with the Platt calibration `calibration` `[2]` = `(a, b)` fitted on validation
//! questions (absent in older files: `(1, 0)`). The metadata
//! (string pairs) name the format, the model (file name, SHA-256, architecture, widths) and the
//! layers read (`layer`: [`HiddenLayer::parse_list`]'s form, e.g. `final_norm`, after the last
//! block and the final norm, or `block.11,final_norm`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arbor_model::{HiddenLayer, ModelConfig};
use arbor_search::{ScoreCost, ScoreError, ScoreRequest, Scorer, StepScores};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::classifier::Linear;
use super::reader::{PathLayout, Read};
use super::{invalid, model_error, worker_error, PrmError};
use crate::LocalWorker;
use rayon::prelude::*;

/// The `format` metadata value of a value head file.
pub const FORMAT: &str = "arbor-value-head/1";
/// The layer read by default: the final hidden state after the final norm.
pub const LAYER_FINAL_NORM: &str = "final_norm";

/// Settings of the value-head PRM.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValueHeadConfig {
    /// The head file written by `arbor prm train` (required).
    pub path: PathBuf,
}

/// What a head was trained on, kept in its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMeta {
    /// The policy model's file name.
    pub model_name: String,
    /// SHA-256 of the policy model's file (hex), or empty when unknown.
    pub model_sha256: String,
    /// The policy's architecture.
    pub architecture: String,
    /// Width of the policy's hidden state.
    pub d_model: usize,
    /// Blocks of the policy.
    pub n_layers: usize,
    /// Where the hidden states are read: [`HiddenLayer::list`]'s form, e.g.
    /// [`LAYER_FINAL_NORM`] or `block.11,final_norm`.
    pub layer: String,
    /// Hidden units of the head (0: logistic regression).
    pub hidden_units: usize,
}

impl HeadMeta {
    /// Metadata for a head on `config`'s hidden states.
    pub fn new(model_name: &str, model_sha256: &str, config: &ModelConfig, hidden: usize) -> Self {
        HeadMeta {
            model_name: model_name.into(),
            model_sha256: model_sha256.into(),
            architecture: config.architecture.clone(),
            d_model: config.d_model,
            n_layers: config.n_layers,
            layer: LAYER_FINAL_NORM.into(),
            hidden_units: hidden,
        }
    }

    /// The same, reading the hidden states at `layers`.
    pub fn reading(mut self, layers: &[HiddenLayer]) -> Self {
        self.layer = HiddenLayer::list(layers);
        self
    }

    /// The layers read.
    pub fn layers(&self) -> Result<Vec<HiddenLayer>, String> {
        HiddenLayer::parse_list(&self.layer, self.n_layers)
            .map_err(|e| format!("metadata `layer`: {e}"))
    }

    /// Width of the head's input: `d_model` per layer read.
    pub fn input_width(&self) -> usize {
        self.d_model * self.layer.split(',').count()
    }

    fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("model_name".into(), self.model_name.clone());
        m.insert("model_sha256".into(), self.model_sha256.clone());
        m.insert("architecture".into(), self.architecture.clone());
        m.insert("d_model".into(), self.d_model.to_string());
        m.insert("n_layers".into(), self.n_layers.to_string());
        m.insert("layer".into(), self.layer.clone());
        m.insert("hidden_units".into(), self.hidden_units.to_string());
        m
    }

    fn from_map(m: &HashMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| {
            m.get(k)
                .cloned()
                .ok_or_else(|| format!("metadata `{k}` missing"))
        };
        let num = |k: &str| -> Result<usize, String> {
            get(k)?.parse().map_err(|e| format!("metadata `{k}`: {e}"))
        };
        if get("format")? != FORMAT {
            return Err(format!("metadata `format` is not {FORMAT}"));
        }
        let meta = HeadMeta {
            model_name: get("model_name")?,
            model_sha256: get("model_sha256")?,
            architecture: get("architecture")?,
            d_model: num("d_model")?,
            n_layers: num("n_layers")?,
            layer: get("layer")?,
            hidden_units: num("hidden_units")?,
        };
        meta.layers()?;
        Ok(meta)
    }
}

/// A value head: standardisation, then logistic regression or a one-hidden-layer MLP.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueHead {
    /// What it was trained on.
    pub meta: HeadMeta,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// The hidden layer, if any.
    hidden: Option<Linear>,
    /// The output layer (one row).
    out: Linear,
    /// Platt scaling `(a, b)` of the output: `sigmoid(a * z + b)`.
    calibration: [f32; 2],
}

/// How [`ValueHead::fit_validated`] went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitReport {
    /// Adam steps taken (fewer than [`FitOptions::epochs`] when stopped early).
    pub epochs_run: usize,
    /// The step whose weights were kept: the lowest validation loss.
    pub best_epoch: usize,
    /// Mean cross-entropy on the validation set at that step, before calibration (NaN
    /// without a validation set).
    pub validation_loss: f64,
    /// The same after calibration.
    pub calibrated_validation_loss: f64,
    /// The Platt scaling fitted on the validation set, `(a, b)`.
    pub calibration: [f32; 2],
}

/// Settings of [`ValueHead::fit`].
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Hidden units (0: logistic regression).
    pub hidden_units: usize,
    /// Full-batch Adam steps.
    pub epochs: usize,
    /// Adam's step size.
    pub learning_rate: f32,
    /// L2 penalty on the weights (not the biases).
    pub l2: f32,
    /// Seed of the initial weights.
    pub seed: u64,
    /// With a validation set: stop after this many steps without a lower validation loss,
    /// keeping the best weights.
    pub patience: usize,
    /// Weight of a ranking loss within each group of examples ([`ValueHead::fit_ranked`]),
    /// added to the mean cross-entropy; 0 (the default): none.
    pub pairwise: f32,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            hidden_units: 0,
            epochs: 300,
            learning_rate: 0.01,
            l2: 1e-2,
            seed: 0,
            patience: 100,
            pairwise: 0.0,
        }
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Cross-entropy of prediction `p` against target `y` in [0, 1].
/// Every (right, wrong) pair of examples within one group: `(i, j)` with `ys[i] > 0.5 >=
/// ys[j]` and `groups[i] == groups[j]`.
fn ranked_pairs(groups: &[Option<u32>], ys: &[f32]) -> Vec<(usize, usize)> {
    let mut by_group: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, g) in groups.iter().enumerate() {
        if let Some(g) = g {
            by_group.entry(*g).or_default().push(i);
        }
    }
    let mut pairs = Vec::new();
    for members in by_group.values() {
        for &i in members.iter().filter(|&&i| ys[i] > 0.5) {
            for &j in members.iter().filter(|&&j| ys[j] <= 0.5) {
                pairs.push((i, j));
            }
        }
    }
    pairs
}

/// Mean of `log(1 + exp(z_j - z_i))` over `pairs`.
fn pair_loss(zs: &[f32], pairs: &[(usize, usize)]) -> f64 {
    let total: f64 = pairs
        .iter()
        .map(|&(i, j)| {
            let d = f64::from(zs[j] - zs[i]);
            // log(1 + e^d), without overflow.
            d.max(0.0) + (-d.abs()).exp().ln_1p()
        })
        .sum();
    total / pairs.len().max(1) as f64
}

fn cross_entropy(p: f32, y: f32) -> f64 {
    let p = (p as f64).clamp(1e-7, 1.0 - 1e-7);
    let y = y as f64;
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

/// Smallest slope of a calibration: it may flatten the head's order, never reverse it.
const PLATT_SLOPE_MIN: f64 = 1e-3;

/// Platt scaling: the `(a, b)` minimising the cross-entropy of `sigmoid(a * z + b)` against
/// `ys`, by Newton's method from `(1, 0)`, each step halved until the loss falls (a tiny ridge
/// keeps the Hessian invertible when `z` separates the labels perfectly). The slope is kept at
/// [`PLATT_SLOPE_MIN`] or more (then `b` alone is fitted): a head trained to rank one
/// question's samples may order steps of different questions against their labels, and a
/// calibration that turned it around would undo the ranking.
fn platt(zs: &[f32], ys: &[f32]) -> [f32; 2] {
    let loss = |a: f64, b: f64| -> f64 {
        zs.iter()
            .zip(ys)
            .map(|(&z, &y)| cross_entropy(sigmoid((a * z as f64 + b) as f32), y))
            .sum()
    };
    let (mut a, mut b) = (1.0f64, 0.0f64);
    let mut current = loss(a, b);
    for _ in 0..100 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 1e-6, 0.0, 1e-6);
        for (&z, &y) in zs.iter().zip(ys) {
            let z = z as f64;
            let p = 1.0 / (1.0 + (-(a * z + b)).exp());
            let (r, w) = (p - y as f64, p * (1.0 - p));
            ga += r * z;
            gb += r;
            haa += w * z * z;
            hab += w * z;
            hbb += w;
        }
        let det = haa * hbb - hab * hab;
        if det <= 0.0 || !det.is_finite() {
            break;
        }
        let (da, db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
        let mut step = 1.0;
        let next = loop {
            let (na, nb) = (a - step * da, b - step * db);
            let l = loss(na, nb);
            if l <= current || step < 1e-6 {
                break (na, nb, l);
            }
            step /= 2.0;
        };
        if next.2 > current {
            break;
        }
        let moved = (next.0 - a).abs() + (next.1 - b).abs();
        (a, b, current) = next;
        if moved < 1e-9 {
            break;
        }
    }
    if a < PLATT_SLOPE_MIN {
        a = PLATT_SLOPE_MIN;
        for _ in 0..100 {
            let (mut g, mut h) = (0.0, 1e-6);
            for (&z, &y) in zs.iter().zip(ys) {
                let p = 1.0 / (1.0 + (-(a * z as f64 + b)).exp());
                g += p - y as f64;
                h += p * (1.0 - p);
            }
            let step = g / h;
            b -= step;
            if step.abs() < 1e-9 || !b.is_finite() {
                break;
            }
        }
    }
    if a.is_finite() && b.is_finite() {
        [a as f32, b as f32]
    } else {
        [1.0, 0.0]
    }
}

/// Examples a parallel task sums the gradient over (fixed, so the sum's order is too).
const GRADIENT_CHUNK: usize = 512;

/// The loss's gradient with respect to the head's parameters: output layer (`w2`, `b2`) and,
/// for a head with a hidden layer, that layer (`w1`, `b1`).
struct Gradient {
    w2: Vec<f32>,
    b2: f32,
    w1: Vec<f32>,
    b1: Vec<f32>,
}

impl Gradient {
    fn zero(width: usize, hidden: usize, d: usize) -> Self {
        Gradient {
            w2: vec![0.0; width],
            b2: 0.0,
            w1: vec![0.0; hidden * d],
            b1: vec![0.0; hidden],
        }
    }

    fn add(&mut self, o: &Gradient) {
        let sum = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        sum(&mut self.w2, &o.w2);
        self.b2 += o.b2;
        sum(&mut self.w1, &o.w1);
        sum(&mut self.b1, &o.b1);
    }
}

/// Adam state of one parameter vector.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Self {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, p: &mut [f32], g: &[f32], lr: f32, t: i32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for i in 0..p.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            p[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + eps);
        }
    }
}

impl ValueHead {
    /// The value of one hidden state, in (0, 1).
    pub fn predict(&self, hidden: &[f32]) -> f32 {
        let x: Vec<f32> = hidden
            .iter()
            .zip(&self.mean)
            .zip(&self.inv_std)
            .map(|((v, m), s)| (v - m) * s)
            .collect();
        let h = match &self.hidden {
            Some(layer) => layer.apply(&x).into_iter().map(|v| v.max(0.0)).collect(),
            None => x,
        };
        let [a, b] = self.calibration;
        sigmoid(a * self.out.apply(&h)[0] + b)
    }

    /// The output before calibration and the sigmoid.
    fn logit(&self, hidden: &[f32]) -> f32 {
        let uncalibrated = ValueHead {
            calibration: [1.0, 0.0],
            ..self.clone()
        };
        let p = uncalibrated.predict(hidden).clamp(1e-7, 1.0 - 1e-7);
        (p / (1.0 - p)).ln()
    }

    /// Fits a head to hidden states `xs` and targets `ys` in [0, 1] (hard or soft labels) by
    /// full-batch Adam on the cross-entropy plus an L2 penalty. Features are standardised
    /// with the training set's mean and deviation.
    pub fn fit(meta: HeadMeta, xs: &[Vec<f32>], ys: &[f32], o: &FitOptions) -> ValueHead {
        Self::fit_validated(meta, (xs, ys), (&[], &[]), o).0
    }

    /// [`ValueHead::fit`] with a validation set (examples from other questions than the
    /// training set's): every 5 steps the validation loss is measured, the weights with the
    /// lowest are kept, and training stops after [`FitOptions::patience`] steps without a new
    /// lowest (early stopping). Then the output is calibrated on the validation set (Platt
    /// scaling: `sigmoid(a * z + b)` with `a`, `b` minimising its cross-entropy), so that a
    /// value of 0.7 means about 70% of such steps reach the answer. Without a validation set
    /// this is `fit`: every step taken, no calibration.
    pub fn fit_validated(
        meta: HeadMeta,
        (xs, ys): (&[Vec<f32>], &[f32]),
        (vxs, vys): (&[Vec<f32>], &[f32]),
        o: &FitOptions,
    ) -> (ValueHead, FitReport) {
        Self::fit_ranked(meta, (xs, ys, &[]), (vxs, vys, &[]), o)
    }

    /// [`ValueHead::fit_validated`] with examples in groups (`Some(g)`: the samples' final
    /// steps of one question; `None` or an empty slice: none) and, with
    /// [`FitOptions::pairwise`] above 0, a ranking loss within each group added to the
    /// cross-entropy: the mean over every pair (right `i`, wrong `j`) of one group of
    /// `log(1 + exp(z_j - z_i))` (Bradley–Terry, as reward models are trained), times the
    /// weight. The cross-entropy alone rewards telling easy questions from hard ones, which
    /// does nothing to choose among one question's samples; the ranking loss is about exactly
    /// that. The validation loss (early stopping) is the same sum.
    pub fn fit_ranked(
        meta: HeadMeta,
        (xs, ys, groups): (&[Vec<f32>], &[f32], &[Option<u32>]),
        (vxs, vys, vgroups): (&[Vec<f32>], &[f32], &[Option<u32>]),
        o: &FitOptions,
    ) -> (ValueHead, FitReport) {
        assert_eq!(xs.len(), ys.len(), "one target per example");
        assert_eq!(vxs.len(), vys.len(), "one target per validation example");
        assert!(
            groups.is_empty() || groups.len() == xs.len(),
            "one group per example"
        );
        assert!(
            vgroups.is_empty() || vgroups.len() == vxs.len(),
            "one group per validation example"
        );
        let pairs = ranked_pairs(groups, ys);
        let vpairs = ranked_pairs(vgroups, vys);
        assert!(!xs.is_empty(), "no examples");
        let d = xs[0].len();
        assert_eq!(d, meta.input_width(), "d_model features per layer read");
        let n = xs.len() as f32;
        let mut mean = vec![0f32; d];
        for x in xs {
            mean.iter_mut().zip(x).for_each(|(m, v)| *m += v / n);
        }
        let mut var = vec![0f32; d];
        for x in xs {
            for ((s, v), m) in var.iter_mut().zip(x).zip(&mean) {
                *s += (v - m) * (v - m) / n;
            }
        }
        let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v.sqrt() + 1e-4)).collect();
        let zs: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                x.iter()
                    .zip(&mean)
                    .zip(&inv_std)
                    .map(|((v, m), s)| (v - m) * s)
                    .collect()
            })
            .collect();
        let mut rng = o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = |scale: f32| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        };
        let h = o.hidden_units;
        let width = if h == 0 { d } else { h };
        let mut hidden = (h > 0).then(|| Linear {
            w: (0..h * d)
                .map(|_| uniform(1.0 / (d as f32).sqrt()))
                .collect(),
            b: vec![0.0; h],
            rows: h,
            cols: d,
        });
        let mut out = Linear {
            w: (0..width)
                .map(|_| {
                    if h == 0 {
                        0.0
                    } else {
                        uniform(1.0 / (h as f32).sqrt())
                    }
                })
                .collect(),
            b: vec![0.0],
            rows: 1,
            cols: width,
        };
        let (mut adam_w1, mut adam_b1) = (Adam::new(h * d), Adam::new(h));
        let (mut adam_w2, mut adam_b2) = (Adam::new(width), Adam::new(1));
        let snapshot = |hidden: &Option<Linear>, out: &Linear| ValueHead {
            meta: meta.clone(),
            mean: mean.clone(),
            inv_std: inv_std.clone(),
            hidden: hidden.clone(),
            out: out.clone(),
            calibration: [1.0, 0.0],
        };
        let loss = |head: &ValueHead| -> f64 {
            let each: Vec<f64> = vxs
                .par_iter()
                .zip(vys)
                .map(|(x, &y)| cross_entropy(head.predict(x), y))
                .collect();
            let total: f64 = each.iter().sum();
            let mut l = total / vxs.len() as f64;
            if o.pairwise > 0.0 && !vpairs.is_empty() {
                let zs: Vec<f32> = vxs.par_iter().map(|x| head.logit(x)).collect();
                l += f64::from(o.pairwise) * pair_loss(&zs, &vpairs);
            }
            l
        };
        let validate = !vxs.is_empty();
        let mut best: Option<(f64, usize, Option<Linear>, Linear)> = None;
        let mut epochs_run = 0;
        for epoch in 1..=o.epochs {
            if validate && (epoch - 1) % 5 == 0 {
                let l = loss(&snapshot(&hidden, &out));
                if best.as_ref().is_none_or(|b| l < b.0) {
                    best = Some((l, epoch - 1, hidden.clone(), out.clone()));
                } else if epoch - 1 - best.as_ref().map_or(0, |b| b.1) >= o.patience {
                    break;
                }
            }
            epochs_run = epoch;
            // The ranking loss's gradient by each example's logit (zero for examples in no
            // pair, and for all without it).
            let mut ranked = vec![0f32; zs.len()];
            if o.pairwise > 0.0 && !pairs.is_empty() {
                let forward = |z: &Vec<f32>| match &hidden {
                    Some(l) => {
                        let relu: Vec<f32> = l.apply(z).into_iter().map(|v| v.max(0.0)).collect();
                        out.apply(&relu)[0]
                    }
                    None => out.apply(z)[0],
                };
                let logits: Vec<f32> = zs.par_iter().map(forward).collect();
                let scale = o.pairwise / pairs.len() as f32;
                for &(i, j) in &pairs {
                    // d/dz_i log(1 + exp(z_j - z_i)) = -sigmoid(z_j - z_i).
                    let s = sigmoid(logits[j] - logits[i]) * scale;
                    ranked[i] -= s;
                    ranked[j] += s;
                }
            }
            // The gradient, summed over fixed chunks of examples in parallel and the chunks'
            // sums added in order: the same result on any number of threads.
            let parts: Vec<Gradient> = zs
                .par_chunks(GRADIENT_CHUNK)
                .zip(ys.par_chunks(GRADIENT_CHUNK))
                .zip(ranked.par_chunks(GRADIENT_CHUNK))
                .map(|((zc, yc), rc)| {
                    let mut g = Gradient::zero(width, h, d);
                    for ((z, &y), &r) in zc.iter().zip(yc).zip(rc) {
                        let relu: Option<Vec<f32>> = hidden
                            .as_ref()
                            .map(|l| l.apply(z).into_iter().map(|v| v.max(0.0)).collect());
                        let act: &[f32] = relu.as_deref().unwrap_or(z);
                        let p = sigmoid(out.apply(act)[0]);
                        let dz = (p - y) / n + r;
                        g.w2.iter_mut().zip(act).for_each(|(g, a)| *g += dz * a);
                        g.b2 += dz;
                        if relu.is_some() {
                            let units = act.iter().zip(&out.w).zip(&mut g.b1);
                            for (((&a, &w), b1), row) in units.zip(g.w1.chunks_mut(d)) {
                                if a > 0.0 {
                                    let dh = dz * w;
                                    *b1 += dh;
                                    row.iter_mut().zip(z).for_each(|(g, x)| *g += dh * x);
                                }
                            }
                        }
                    }
                    g
                })
                .collect();
            let mut total = Gradient::zero(width, h, d);
            for part in &parts {
                total.add(part);
            }
            let Gradient {
                w2: mut g_w2,
                b2: g_b2,
                w1: mut g_w1,
                b1: g_b1,
            } = total;
            g_w2.iter_mut()
                .zip(&out.w)
                .for_each(|(g, w)| *g += o.l2 * w);
            let t = epoch as i32;
            adam_w2.step(&mut out.w, &g_w2, o.learning_rate, t);
            adam_b2.step(&mut out.b, &[g_b2], o.learning_rate, t);
            if let Some(l) = &mut hidden {
                g_w1.iter_mut().zip(&l.w).for_each(|(g, w)| *g += o.l2 * w);
                adam_w1.step(&mut l.w, &g_w1, o.learning_rate, t);
                adam_b1.step(&mut l.b, &g_b1, o.learning_rate, t);
            }
        }
        let mut best_epoch = epochs_run;
        if validate {
            let l = loss(&snapshot(&hidden, &out));
            if best.as_ref().is_none_or(|b| l < b.0) {
                best = Some((l, epochs_run, hidden.clone(), out.clone()));
            }
            let b = best.take().expect("measured at least once");
            (best_epoch, hidden, out) = (b.1, b.2, b.3);
        }
        let mut head = snapshot(&hidden, &out);
        let mut report = FitReport {
            epochs_run,
            best_epoch,
            validation_loss: f64::NAN,
            calibrated_validation_loss: f64::NAN,
            calibration: [1.0, 0.0],
        };
        if validate {
            report.validation_loss = loss(&head);
            let zs: Vec<f32> = vxs.iter().map(|x| head.logit(x)).collect();
            head.calibration = platt(&zs, vys);
            report.calibration = head.calibration;
            report.calibrated_validation_loss = loss(&head);
        }
        (head, report)
    }

    /// Writes the head as safetensors with its metadata.
    pub fn save(&self, path: &Path) -> Result<(), PrmError> {
        let file_err = |reason: String| PrmError::File {
            path: path.into(),
            reason,
        };
        let d = self.meta.input_width();
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("mean", vec![d], &self.mean),
            ("inv_std", vec![d], &self.inv_std),
        ];
        if let Some(l) = &self.hidden {
            tensors.push(("w1", vec![l.rows, l.cols], &l.w));
            tensors.push(("b1", vec![l.rows], &l.b));
        }
        tensors.push(("w2", vec![1, self.out.cols], &self.out.w));
        tensors.push(("b2", vec![1], &self.out.b));
        tensors.push(("calibration", vec![2], &self.calibration));
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                TensorView::new(Dtype::F32, shape.clone(), b)
                    .map(|v| (name.to_string(), v))
                    .map_err(|e| file_err(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let data = safetensors::serialize(views, Some(self.meta.to_map()))
            .map_err(|e| file_err(e.to_string()))?;
        std::fs::write(path, data).map_err(|e| file_err(e.to_string()))
    }

    /// Reads a head written by [`ValueHead::save`], checking every shape.
    pub fn load(path: &Path) -> Result<ValueHead, PrmError> {
        let file_err = |reason: String| PrmError::File {
            path: path.into(),
            reason,
        };
        let data = std::fs::read(path).map_err(|e| file_err(format!("{e} (field `path`)")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| file_err("no metadata: not an Arbor value head".into()))
            .and_then(|m| HeadMeta::from_map(m).map_err(file_err))?;
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>, PrmError> {
            let t = st
                .tensor(name)
                .map_err(|_| file_err(format!("tensor `{name}` missing")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(file_err(format!(
                    "tensor `{name}`: {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(file_err(format!("tensor `{name}` is not finite")));
            }
            Ok(v)
        };
        let (d, h) = (meta.input_width(), meta.hidden_units);
        let hidden = if h > 0 {
            Some(Linear {
                w: tensor("w1", &[h, d])?,
                b: tensor("b1", &[h])?,
                rows: h,
                cols: d,
            })
        } else {
            None
        };
        let width = if h > 0 { h } else { d };
        let calibration = match st.tensor("calibration") {
            Ok(_) => {
                let c = tensor("calibration", &[2])?;
                [c[0], c[1]]
            }
            Err(_) => [1.0, 0.0],
        };
        Ok(ValueHead {
            calibration,
            mean: tensor("mean", &[d])?,
            inv_std: tensor("inv_std", &[d])?,
            hidden,
            out: Linear {
                w: tensor("w2", &[1, width])?,
                b: tensor("b2", &[1])?,
                rows: 1,
                cols: width,
            },
            meta,
        })
    }
}

/// The policy's hidden states at `layers` (`d_model` values each, side by side) at the last
/// token of every step of every request (the features a value head reads), and the tokens
/// computed for each request. Runs on the
/// policy's engine and forks its prefix cache, so a path the policy just wrote costs about one
/// token per step.
pub async fn step_hidden_states(
    worker: &LocalWorker,
    batch: &[ScoreRequest],
    layers: &[HiddenLayer],
) -> Result<Vec<(Vec<Vec<f32>>, u64)>, ScoreError> {
    let read = Read::Hidden(layers.to_vec());
    let tok = worker.tokenizer();
    let mut layouts = Vec::with_capacity(batch.len());
    for r in batch {
        let mut tokens = tok.encode(&r.prompt, true).map_err(model_error)?;
        let (mut step_ends, mut read_at) = (Vec::new(), Vec::new());
        for step in &r.steps {
            tokens.extend_from_slice(&step.token_ids);
            step_ends.push(tokens.len());
            read_at.push(tokens.len() - 1);
        }
        layouts.push(PathLayout {
            tokens,
            step_ends,
            read_at,
        });
    }
    let readouts = worker
        .read_inline(layouts, read)
        .await
        .map_err(worker_error)?
        .map_err(model_error)?;
    Ok(readouts
        .into_iter()
        .map(|r| (r.rows, r.tokens_computed))
        .collect())
}

/// Scores steps with a trained value head; see the module docs.
#[derive(Debug)]
pub struct ValueHeadScorer {
    head: ValueHead,
    /// The layers the head reads (its metadata's `layer`).
    layers: Vec<HiddenLayer>,
    worker: LocalWorker,
}

impl ValueHeadScorer {
    /// Loads the head and checks that it was trained on this policy's hidden states.
    pub fn new(config: &ValueHeadConfig, policy: &LocalWorker) -> Result<Self, PrmError> {
        if config.path.as_os_str().is_empty() {
            return Err(invalid(
                "path",
                "required: a head written by `arbor prm train`",
            ));
        }
        let head = ValueHead::load(&config.path)?;
        Self::with_head(head, policy).map_err(|reason| PrmError::File {
            path: config.path.clone(),
            reason,
        })
    }

    /// A scorer over a head already in memory.
    pub fn with_head(head: ValueHead, policy: &LocalWorker) -> Result<Self, String> {
        let c = &policy.model_info().config;
        let m = &head.meta;
        if m.d_model != c.d_model || m.n_layers != c.n_layers || m.architecture != c.architecture {
            return Err(format!(
                "trained on {} ({} {} layers, width {}), but the policy is {} layers of width {}",
                m.model_name, m.architecture, m.n_layers, m.d_model, c.n_layers, c.d_model
            ));
        }
        let layers = m.layers()?;
        if !policy.model_info().source.contains(&m.model_name) {
            tracing::warn!(
                trained_on = %m.model_name,
                policy = %policy.model_info().source,
                "the value head was trained on another model file of the same shape"
            );
        }
        Ok(ValueHeadScorer {
            head,
            layers,
            worker: policy.clone(),
        })
    }

    /// The head.
    pub fn head(&self) -> &ValueHead {
        &self.head
    }
}

impl Scorer for ValueHeadScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        let features = step_hidden_states(&self.worker, &batch, &self.layers).await?;
        Ok(features
            .into_iter()
            .map(|(rows, tokens)| StepScores {
                scores: rows.iter().map(|h| self.head.predict(h)).collect(),
                cost: ScoreCost {
                    tokens_computed: tokens,
                    ..ScoreCost::default()
                },
            })
            .collect())
    }
}

/// Share of predictions on the right side of 0.5 for binary labels.
pub fn accuracy(predictions: &[f32], labels: &[bool]) -> f64 {
    if predictions.is_empty() {
        return f64::NAN;
    }
    let right = predictions
        .iter()
        .zip(labels)
        .filter(|(&p, &l)| (p >= 0.5) == l)
        .count();
    right as f64 / predictions.len() as f64
}

/// Area under the ROC curve: the chance that a random positive scores above a random negative
/// (ties count half). `NaN` when one class is absent.
pub fn auc(predictions: &[f32], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..predictions.len()).collect();
    order.sort_by(|&a, &b| predictions[a].total_cmp(&predictions[b]));
    // Average ranks (1-based) over runs of equal predictions.
    let mut ranks = vec![0f64; predictions.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && predictions[order[j + 1]] == predictions[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(r, _)| r)
        .sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(d: usize, hidden: usize) -> HeadMeta {
        HeadMeta {
            model_name: "tiny.gguf".into(),
            model_sha256: "00".into(),
            architecture: "qwen2".into(),
            d_model: d,
            n_layers: 2,
            layer: LAYER_FINAL_NORM.into(),
            hidden_units: hidden,
        }
    }

    /// Points whose label is the sign of a fixed direction, with a large offset and uneven
    /// scales, as hidden states have.
    fn synthetic(n: usize, d: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for _ in 0..n {
            let x: Vec<f32> = (0..d).map(|i| 5.0 + next() * (1.0 + i as f32)).collect();
            let margin = x[0] - 5.0 - (x[3] - 5.0) / 4.0;
            ys.push(if margin > 0.0 { 1.0 } else { 0.0 });
            xs.push(x);
        }
        (xs, ys)
    }

    /// Eight samples of each of `questions` questions, as final steps: a sample is right when
    /// its question's ease plus its own quality is positive; its one informative feature is
    /// its quality minus twice the ease, so across questions a high feature means a hard
    /// question (mostly wrong) and within one a better sample.
    fn ranked_synthetic(questions: u32, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>, Vec<Option<u32>>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let (mut xs, mut ys, mut groups) = (Vec::new(), Vec::new(), Vec::new());
        for q in 0..questions {
            let ease = 4.0 * next();
            for _ in 0..8 {
                let quality = 2.0 * next();
                xs.push(vec![quality - 2.0 * ease, next(), next(), next()]);
                ys.push(if ease + quality > 0.0 { 1.0 } else { 0.0 });
                groups.push(Some(q));
            }
        }
        (xs, ys, groups)
    }

    /// Where telling questions apart and telling one question's samples apart pull a feature
    /// opposite ways, the cross-entropy alone learns the first and picks within a question
    /// worse than chance; with the ranking loss the head's best pick is right whenever any
    /// sample is (nearly).
    #[test]
    fn the_ranking_loss_teaches_the_choice_among_one_questions_samples() {
        let (xs, ys, groups) = ranked_synthetic(300, 11);
        let (vxs, vys, vgroups) = ranked_synthetic(60, 12);
        let (txs, tys, _) = ranked_synthetic(200, 13);
        // Best-of-8 on the test questions: right when the highest-valued sample is right.
        let best_of_8 = |head: &ValueHead| {
            let mut right = 0;
            for q in 0..200 {
                let best = (8 * q..8 * q + 8)
                    .max_by(|&a, &b| head.predict(&txs[a]).total_cmp(&head.predict(&txs[b])))
                    .unwrap();
                right += (tys[best] > 0.5) as usize;
            }
            right as f64 / 200.0
        };
        let oracle = (0..200)
            .filter(|q| (8 * q..8 * q + 8).any(|i| tys[i] > 0.5))
            .count() as f64
            / 200.0;
        let chance = tys.iter().sum::<f32>() as f64 / tys.len() as f64;
        let fit = |pairwise: f32| {
            let o = FitOptions {
                epochs: 400,
                learning_rate: 0.05,
                pairwise,
                ..FitOptions::default()
            };
            ValueHead::fit_ranked(meta(4, 0), (&xs, &ys, &groups), (&vxs, &vys, &vgroups), &o).0
        };
        let ranked_head = fit(10.0);
        let (pointwise, ranked) = (best_of_8(&fit(0.0)), best_of_8(&ranked_head));
        // Its calibration flattens the values (across questions the feature runs against the
        // labels) but keeps their order.
        assert!(ranked_head.calibration[0] > 0.0);
        eprintln!("best of 8: cross-entropy {pointwise}, ranked {ranked}, chance {chance}, oracle {oracle}");
        assert!(pointwise < chance, "{pointwise} vs chance {chance}");
        assert!(ranked > oracle - 0.03, "{ranked} vs oracle {oracle}");
        // Without groups the weight changes nothing.
        let o = FitOptions {
            epochs: 50,
            pairwise: 1.0,
            ..FitOptions::default()
        };
        let a = ValueHead::fit_ranked(meta(4, 0), (&xs, &ys, &[]), (&vxs, &vys, &[]), &o).0;
        let b = ValueHead::fit_validated(
            meta(4, 0),
            (&xs, &ys),
            (&vxs, &vys),
            &FitOptions { pairwise: 0.0, ..o },
        );
        assert_eq!(a, b.0);
    }

    #[test]
    fn auc_and_accuracy_by_hand() {
        let labels = [true, false, true, false];
        assert_eq!(auc(&[0.9, 0.1, 0.8, 0.2], &labels), 1.0);
        assert_eq!(auc(&[0.1, 0.9, 0.2, 0.8], &labels), 0.0);
        // One positive above both negatives, one tied with a negative: (2 + 1.5) / 4.
        assert_eq!(auc(&[0.9, 0.5, 0.5, 0.1], &labels), 0.875);
        assert!(auc(&[0.3, 0.4], &[true, true]).is_nan());
        assert_eq!(accuracy(&[0.9, 0.4, 0.4, 0.6], &labels), 0.5);
    }

    /// `f` run on a pool of `threads` threads.
    fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn a_fit_is_the_same_on_any_number_of_threads() {
        // More examples than one gradient chunk, so several tasks sum parts of it.
        let d = 8;
        let (xs, ys) = synthetic(3 * GRADIENT_CHUNK + 7, d, 5);
        let (vxs, vys) = synthetic(100, d, 6);
        for hidden in [0, 4] {
            let o = FitOptions {
                hidden_units: hidden,
                epochs: 30,
                seed: 9,
                ..FitOptions::default()
            };
            let fit_on = |threads| {
                on_threads(threads, || {
                    ValueHead::fit_validated(meta(d, hidden), (&xs, &ys), (&vxs, &vys), &o).0
                })
            };
            let one = fit_on(1);
            assert_eq!(one, fit_on(3), "hidden {hidden}");
            assert_ne!(one.out.w, vec![0.0; one.out.w.len()], "it trained");
        }
        // With the ranking loss: 1,600 examples in 200 groups.
        let (xs, ys, groups) = ranked_synthetic(200, 7);
        let (vxs, vys, vgroups) = ranked_synthetic(20, 8);
        let o = FitOptions {
            hidden_units: 4,
            epochs: 30,
            pairwise: 3.0,
            ..FitOptions::default()
        };
        let fit_on = |threads| {
            on_threads(threads, || {
                ValueHead::fit_ranked(meta(4, 4), (&xs, &ys, &groups), (&vxs, &vys, &vgroups), &o).0
            })
        };
        assert_eq!(fit_on(1), fit_on(3), "ranked");
    }

    #[test]
    fn heads_learn_a_separable_rule_and_round_trip_through_a_file() {
        let d = 8;
        let (xs, ys) = synthetic(400, d, 1);
        let (test_x, test_y) = synthetic(200, d, 2);
        let labels: Vec<bool> = test_y.iter().map(|&y| y > 0.5).collect();
        for hidden in [0, 16] {
            let o = FitOptions {
                hidden_units: hidden,
                epochs: 400,
                learning_rate: 0.05,
                l2: 1e-4,
                seed: 3,
                ..FitOptions::default()
            };
            let head = ValueHead::fit(meta(d, hidden), &xs, &ys, &o);
            let p: Vec<f32> = test_x.iter().map(|x| head.predict(x)).collect();
            let (acc, area) = (accuracy(&p, &labels), auc(&p, &labels));
            assert!(
                acc > 0.9 && area > 0.97,
                "hidden {hidden}: acc {acc}, auc {area}"
            );
            let path = std::env::temp_dir().join(format!(
                "arbor-head-{hidden}-{}.safetensors",
                std::process::id()
            ));
            head.save(&path).unwrap();
            let back = ValueHead::load(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert_eq!(back, head);
            for x in &test_x {
                assert_eq!(back.predict(x), head.predict(x));
            }
        }
    }

    /// With a validation set, a head that would overfit noisy labels stops early at the lowest
    /// validation loss, and its calibration lowers that loss further and travels with the file.
    #[test]
    fn validated_fits_stop_early_and_calibrate() {
        let d = 8;
        // Labels flipped for a third of the points: a wide MLP trained long overfits them.
        let noisy = |n, seed| {
            let (xs, mut ys) = synthetic(n, d, seed);
            for (i, y) in ys.iter_mut().enumerate() {
                if i % 3 == 0 {
                    *y = 1.0 - *y;
                }
            }
            (xs, ys)
        };
        let (xs, ys) = noisy(120, 1);
        let (vx, vy) = noisy(120, 2);
        let o = FitOptions {
            hidden_units: 32,
            epochs: 3000,
            learning_rate: 0.05,
            l2: 0.0,
            seed: 3,
            patience: 50,
            pairwise: 0.0,
        };
        let (head, report) = ValueHead::fit_validated(meta(d, 32), (&xs, &ys), (&vx, &vy), &o);
        assert!(report.epochs_run < 3000, "{report:?}");
        assert!(report.epochs_run >= report.best_epoch + 50, "{report:?}");
        assert!(
            report.calibrated_validation_loss <= report.validation_loss + 1e-9,
            "{report:?}"
        );
        assert_ne!(report.calibration, [1.0, 0.0]);
        // The full run, without validation, ends with a higher validation loss.
        let full = ValueHead::fit(meta(d, 32), &xs, &ys, &o);
        let loss = |h: &ValueHead| {
            vx.iter()
                .zip(&vy)
                .map(|(x, &y)| cross_entropy(h.predict(x), y))
                .sum::<f64>()
                / vx.len() as f64
        };
        assert!(
            loss(&full) > report.validation_loss,
            "{} vs {report:?}",
            loss(&full)
        );
        let path =
            std::env::temp_dir().join(format!("arbor-head-cal-{}.safetensors", std::process::id()));
        head.save(&path).unwrap();
        let back = ValueHead::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, head);
    }

    /// Platt scaling recovers a known slope and offset.
    #[test]
    fn platt_scaling_recovers_a_known_calibration() {
        // Logits z whose true probability is sigmoid(0.5 z - 1), with expected labels.
        let zs: Vec<f32> = (-40..=40).map(|i| i as f32 / 4.0).collect();
        let ys: Vec<f32> = zs.iter().map(|&z| sigmoid(0.5 * z - 1.0)).collect();
        let [a, b] = platt(&zs, &ys);
        assert!((a - 0.5).abs() < 1e-3 && (b + 1.0).abs() < 1e-3, "{a} {b}");
    }

    #[test]
    fn broken_head_files_name_the_problem() {
        let path = std::env::temp_dir().join(format!("arbor-head-bad-{}", std::process::id()));
        std::fs::write(&path, b"not a head").unwrap();
        let err = ValueHead::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a safetensors file"), "{err}");
        let (xs, ys) = synthetic(20, 4, 1);
        let mut head = ValueHead::fit(meta(4, 0), &xs, &ys, &FitOptions::default());
        // Metadata that promise a hidden layer the file does not hold.
        head.meta.hidden_units = 3;
        head.save(&path).unwrap();
        let err = ValueHead::load(&path).unwrap_err().to_string();
        assert!(err.contains("tensor `w1` missing"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = ValueHead::load(&path).unwrap_err().to_string();
        assert!(err.contains("field `path`"), "{err}");
    }
}

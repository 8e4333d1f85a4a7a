//! Turning logits into a token: greedy, temperature, top-k, top-p; seeded and reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Seed of the random stream; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Rejects values that make no sense, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::invalid(
                "temperature",
                format!("{} must be a finite number ≥ 0", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::invalid(
                "top_p",
                format!("{} must be in (0, 1]", self.top_p),
            ));
        }
        Ok(())
    }
}

/// `log_softmax(logits)[token]` under the model's own distribution (temperature 1).
///
/// The sum is taken in f64: over a 151,936-token vocabulary an f32 running sum is off by up to
/// ~1e-3.
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    logits[token as usize] - max - log_sum_exp_shifted(logits, max)
}

/// `ln(sum(exp(v - max)))`, summed in f64.
fn log_sum_exp_shifted(logits: &[f32], max: f32) -> f32 {
    let sum: f64 = logits.iter().map(|&v| (v - max).exp() as f64).sum();
    sum.ln() as f32
}

/// Index of the largest logit (the first on ties, as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// One pick of a next token: the sampling parameters and the uniform number in `[0, 1)` that
/// decides it. A backend that samples on its device gets these from the host, so a seed gives
/// the same tokens wherever the pick runs.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Draw {
    /// 0 picks the most likely token (the first on ties); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the tokens whose scaled logit is at least the `top_k`-th largest (0 keeps all).
    pub top_k: u32,
    /// Then keep the tokens whose probability is at least that of the last token of the
    /// smallest most-likely-first set whose mass reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Where in the kept tokens' cumulative mass, in token order, the pick falls.
    pub uniform: f32,
}

/// The reference pick, which every backend's sampler reproduces: `(token, log_prob)`, the
/// log-probability under the model's own distribution (temperature 1).
///
/// The kept set is defined by thresholds, not by a sort, so tokens tied at a threshold are all
/// kept: the top-k threshold is the `top_k`-th largest scaled logit, the top-p threshold the
/// largest weight `w` such that the tokens weighing at least `w` hold `top_p` of the mass. The
/// token is the first, in token order, whose cumulative weight reaches `uniform × total`
/// (weights `exp(logit / T - max)`; tokens of weight 0 are never picked). Sums are taken in
/// f64, so the reference is closer to exact than any device's f32 sums.
pub fn pick(logits: &[f32], d: &Draw) -> (u32, f32) {
    RowPicker::new(logits).pick(d)
}

/// [`pick`] for several draws from one row (the first tokens of a request's samples): the
/// row's max and log-normaliser are computed once, and the kept weights once per distinct
/// temperature, top-k and top-p, so each further draw is one walk over cached weights instead
/// of several passes of `exp` over the vocabulary. Picks equal [`pick`]'s, which is this with
/// one draw.
pub struct RowPicker<'a> {
    logits: &'a [f32],
    max: f32,
    log_z: f32,
    /// The draw parameters (uniform 0) the cached weights are for, the weights, their sum.
    kept: Option<(Draw, Vec<f32>, f64)>,
}

impl<'a> RowPicker<'a> {
    /// A picker over `logits`: one max and one log-sum-exp pass.
    pub fn new(logits: &'a [f32]) -> Self {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let log_z = log_sum_exp_shifted(logits, max);
        RowPicker {
            logits,
            max,
            log_z,
            kept: None,
        }
    }

    /// `log_softmax(logits)[token]` (temperature 1), as [`log_prob`].
    pub fn log_prob(&self, token: u32) -> f32 {
        self.logits[token as usize] - self.max - self.log_z
    }

    /// The pick of `d`: `(token, log_prob)`, as [`pick`] defines it.
    pub fn pick(&mut self, d: &Draw) -> (u32, f32) {
        if d.temperature == 0.0 {
            let t = argmax(self.logits);
            return (t, self.log_prob(t));
        }
        let params = Draw { uniform: 0.0, ..*d };
        if self.kept.as_ref().is_none_or(|(p, _, _)| *p != params) {
            let kept = Kept::new(self.logits, self.max, d);
            let w: Vec<f32> = self.logits.iter().map(|&v| kept.weight(v)).collect();
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            self.kept = Some((params, w, total));
        }
        let (_, weights, total) = self.kept.as_ref().expect("cached above");
        let mut r = d.uniform as f64 * total;
        let mut last = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                r -= w as f64;
                last = i as u32;
                if r <= 0.0 {
                    return (last, self.log_prob(last));
                }
            }
        }
        (last, self.log_prob(last))
    }
}

/// The weight [`pick`] gives each token under `d` (0 for a cut token), for checking another
/// sampler's pick against the cumulative mass. Greedy draws weigh the first largest logit 1.
pub fn kept_weights(logits: &[f32], d: &Draw) -> Vec<f32> {
    if d.temperature == 0.0 {
        let mut w = vec![0.0; logits.len()];
        w[argmax(logits) as usize] = 1.0;
        return w;
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let kept = Kept::new(logits, max, d);
    logits.iter().map(|&v| kept.weight(v)).collect()
}

/// The thresholds of one draw: a token weighs `exp(logit / T - max / T)` if its scaled logit
/// reaches `min_s` (top-k) and that weight reaches `min_w` (top-p), else 0.
struct Kept {
    inv_t: f32,
    max_s: f32,
    min_s: f32,
    min_w: f32,
}

impl Kept {
    fn new(logits: &[f32], max: f32, d: &Draw) -> Self {
        let inv_t = 1.0 / d.temperature;
        let k = d.top_k as usize;
        let min_s = if k > 0 && k < logits.len() {
            let mut s: Vec<f32> = logits.iter().map(|&v| v * inv_t).collect();
            *s.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
        } else {
            f32::NEG_INFINITY
        };
        let mut kept = Kept {
            inv_t,
            max_s: max * inv_t,
            min_s,
            min_w: 0.0,
        };
        if d.top_p < 1.0 {
            let mut w: Vec<f32> = logits.iter().map(|&v| kept.weight(v)).collect();
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            w.sort_unstable_by(|a, b| b.total_cmp(a));
            let target = d.top_p as f64 * total;
            let mut acc = 0.0f64;
            for &x in &w {
                acc += x as f64;
                if acc >= target {
                    kept.min_w = x;
                    break;
                }
            }
        }
        kept
    }

    fn weight(&self, v: f32) -> f32 {
        let s = v * self.inv_t;
        if s < self.min_s {
            return 0.0;
        }
        let w = (s - self.max_s).exp();
        if w >= self.min_w {
            w
        } else {
            0.0
        }
    }
}

/// A sampler with its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose stream is determined by `params.seed` and `stream` (e.g. the index of
    /// the sample among siblings), so siblings differ but reruns repeat.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        let seed = params.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Sampler {
            params,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next draw, without consuming it: pass the returned stream to [`Sampler::commit`]
    /// once the pick has been made (a failed forward pass then leaves the stream unchanged).
    /// Greedy sampling draws no random number.
    pub fn peek(&self) -> (Draw, StdRng) {
        let mut rng = self.rng.clone();
        let uniform = if self.params.temperature == 0.0 {
            0.0
        } else {
            rng.gen::<f32>()
        };
        let draw = Draw {
            temperature: self.params.temperature,
            top_k: self.params.top_k.min(u32::MAX as usize) as u32,
            top_p: self.params.top_p,
            uniform,
        };
        (draw, rng)
    }

    /// Advances the stream past a draw returned by [`Sampler::peek`].
    pub fn commit(&mut self, rng: StdRng) {
        self.rng = rng;
    }

    /// Picks the next token on the host.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let (draw, rng) = self.peek();
        self.commit(rng);
        pick(logits, &draw).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_log_prob_normalises() {
        let logits = [0.0, 2.0, 1.0, 2.0];
        assert_eq!(Sampler::new(SamplingParams::greedy(), 0).sample(&logits), 1);
        let total: f32 = (0..4).map(|t| log_prob(&logits, t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    /// One picker serving many draws (as a request's samples share their prompt's row) picks
    /// what a fresh [`pick`] per draw picks, with the same log-probability, whatever the
    /// order of greedy, top-k, top-p and plain draws.
    #[test]
    fn a_shared_row_picker_picks_as_fresh_picks() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i as f32 * 0.731).sin() * 7.0) + if i % 97 == 0 { 4.0 } else { 0.0 })
            .collect();
        let mut picker = RowPicker::new(&logits);
        let mut rng = StdRng::seed_from_u64(3);
        let params = [
            (0.7, 0, 1.0),
            (0.7, 0, 1.0),
            (1.0, 40, 1.0),
            (0.0, 0, 1.0),
            (0.5, 0, 0.9),
        ];
        let mut distinct = std::collections::HashSet::new();
        for round in 0..200 {
            let (temperature, top_k, top_p) = params[round % params.len()];
            let d = Draw {
                temperature,
                top_k,
                top_p,
                uniform: rng.gen(),
            };
            let shared = picker.pick(&d);
            assert_eq!(shared, pick(&logits, &d), "draw {round}: {d:?}");
            assert_eq!(shared.1, log_prob(&logits, shared.0));
            distinct.insert(shared.0);
        }
        assert!(distinct.len() > 20, "the draws spread: {}", distinct.len());
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_restricts() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone(), 1);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p.clone(), 1);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut top: Vec<u32> = (0..100).collect();
        top.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        assert!(
            a.iter().all(|t| top[..3].contains(t)),
            "{a:?} outside top-3 {:?}",
            &top[..3]
        );
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 1,
            "temperature 1 over 3 candidates should vary"
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = [10.0, 0.0, 0.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 7,
        };
        let mut s = Sampler::new(p, 0);
        assert!((0..100).all(|_| s.sample(&logits) == 0));
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}

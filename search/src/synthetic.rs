//! A synthetic task with a known answer, and a policy and scorer for it, so that strategies can be
//! tested (here and in front-end crates) without a model.
//!
//! **The path game.** The answer is the sum of `depth` hidden numbers `a_1..a_depth`. Step `i`
//! writes "add x to get T"; it is *right* when `x = a_i`, otherwise `x` overshoots by 1..=5, so a
//! path's final total is right exactly when every one of its steps is. The policy picks a right step
//! with probability `p_correct`, so a random full path is right with probability
//! `p_correct^depth`, while a step-level scorer that knows which prefixes are still on track can
//! steer a search to the answer: the task rewards lookahead. Steps are 3-9 tokens long unless
//! shaped ([`PathGame::with_step_tokens`], [`PathGame::with_long_steps`]); fillers
//! ([`PathGame::with_filler_steps`]) make paths vary in depth; [`PathGame::with_end_token`] cuts
//! final steps as a real engine does, so budgets can be tested against realistic step lengths.
//!
//! Everything is a pure function of the game seed, the request's sampling seed and the path, so a
//! search with the same seed builds the same tree. Both fakes count what they see independently of
//! the search, and can inject faults (errors, NaN scores, hangs, panics, latency).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::control::CancelToken;
use crate::engine::mix;
use crate::error::{PolicyError, ScoreError};
use crate::policy::{Policy, PolicyCost, Proposals, ProposeRequest, ProposedStep, Step, StepStop};
use crate::scorer::{ScoreCost, ScoreRequest, Scorer, StepScores};

/// First token of every game step; the next two tokens are `x` and the running total.
const STEP_TOKEN: u32 = 7;
/// First token of an answer-first guess.
const GUESS_TOKEN: u32 = 8;
/// First token of a filler step (a re-check that adds nothing); the third is the running total.
const FILLER_TOKEN: u32 = 9;

/// The game: hidden increments and how the policy plays them.
#[derive(Debug, Clone)]
pub struct PathGame {
    /// Seeds the hidden numbers and every sample.
    seed: u64,
    /// Steps in a complete solution.
    depth: u32,
    /// Chance that a sampled step is right.
    p_correct: f64,
    /// Steps are `min_tokens + uniform(0..=extra_tokens_max)` tokens long.
    min_tokens: u32,
    /// See `min_tokens`.
    extra_tokens_max: u32,
    /// Chance that a step is `long_factor` times its drawn length.
    p_long: f64,
    /// See `p_long`.
    long_factor: u32,
    /// Chance that a step is a filler (a re-check that adds nothing), so paths vary in depth.
    p_filler: f64,
    /// A final step needs one token position more for its end-of-sequence (see
    /// [`PathGame::with_end_token`]).
    end_token: bool,
    /// How much lower a wrong step's mean token log-prob is than a right step's.
    logprob_gap: f32,
    /// Chance that a step before the last is an answer-first guess (a wrong final answer).
    p_guess: f64,
    /// The hidden numbers.
    increments: Vec<u64>,
    /// The question text.
    prompt: Arc<str>,
}

impl PathGame {
    /// A game of `depth` steps where each sampled step is right with probability `p_correct`.
    pub fn new(seed: u64, depth: u32, p_correct: f64) -> PathGame {
        assert!(depth >= 1 && (0.0..=1.0).contains(&p_correct));
        let mut rng = StdRng::seed_from_u64(mix(seed, 0x9a3e));
        let increments: Vec<u64> = (0..depth).map(|_| rng.gen_range(1..=9)).collect();
        let prompt =
            format!("Game {seed}: find the sum of {depth} hidden numbers, one step per number.")
                .into();
        PathGame {
            seed,
            depth,
            p_correct,
            min_tokens: 3,
            extra_tokens_max: 6,
            p_long: 0.0,
            long_factor: 1,
            p_filler: 0.0,
            end_token: false,
            logprob_gap: 0.0,
            p_guess: 0.0,
            increments,
            prompt,
        }
    }

    /// Makes wrong steps look less likely to the policy by `gap` nats per token on average, which
    /// gives [`crate::LogProbScorer`] and the priors something to go on.
    pub fn with_logprob_gap(mut self, gap: f32) -> PathGame {
        self.logprob_gap = gap;
        self
    }

    /// Makes each step before the last, with probability `p`, a confident answer-first guess
    /// ("The answer is G. #### G", ending the solution) whose answer is always wrong: what small
    /// models do on GSM8K (docs/eval), and what `min_answer_depth` guards against.
    pub fn with_early_guesses(mut self, p: f64) -> PathGame {
        assert!((0.0..=1.0).contains(&p));
        self.p_guess = p;
        self
    }

    /// Makes steps `min..=max` tokens long, uniformly (the default is `3..=9`); `min` is at
    /// least 3.
    pub fn with_step_tokens(mut self, min: u32, max: u32) -> PathGame {
        assert!(3 <= min && min <= max);
        self.min_tokens = min;
        self.extra_tokens_max = max - min;
        self
    }

    /// Makes a share `p` of steps `factor` times their drawn length: a long tail of step
    /// lengths, as a model's steps have.
    pub fn with_long_steps(mut self, p: f64, factor: u32) -> PathGame {
        assert!((0.0..=1.0).contains(&p) && factor >= 1);
        self.p_long = p;
        self.long_factor = factor;
        self
    }

    /// Makes each step, with probability `p`, a filler ("Check: the total so far is T.") that
    /// adds nothing and is never wrong, so paths to an answer vary in depth around `depth`.
    pub fn with_filler_steps(mut self, p: f64) -> PathGame {
        assert!((0.0..1.0).contains(&p));
        self.p_filler = p;
        self
    }

    /// Makes end-of-sequence take one more token position, as in a real engine: a final step
    /// whose text fills its token limit exactly stops at the limit ([`StepStop::MaxTokens`])
    /// with its answer line whole, and a final step cut shorter loses its answer line.
    pub fn with_end_token(mut self) -> PathGame {
        self.end_token = true;
        self
    }

    /// Tokens a step takes on average (before any cut).
    pub fn mean_step_tokens(&self) -> f64 {
        let drawn = f64::from(self.min_tokens) + f64::from(self.extra_tokens_max) / 2.0;
        drawn * (1.0 + self.p_long * f64::from(self.long_factor - 1))
    }

    /// Steps a path takes on average to its answer (fillers included).
    pub fn mean_depth(&self) -> f64 {
        f64::from(self.depth) / (1.0 - self.p_filler)
    }

    /// The question.
    pub fn prompt(&self) -> &Arc<str> {
        &self.prompt
    }

    /// Tokens the prompt counts as.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt.split_whitespace().count() as u64
    }

    /// Steps in a complete solution.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The right final answer.
    pub fn answer(&self) -> String {
        self.increments.iter().sum::<u64>().to_string()
    }

    /// True when every step of `steps` is right (so the path can still reach the answer);
    /// fillers are never wrong.
    pub fn on_track(&self, steps: &[Arc<Step>]) -> bool {
        let mut i = 0;
        steps.iter().all(|s| {
            if s.token_ids.first() == Some(&FILLER_TOKEN) {
                return true;
            }
            let right = s.token_ids.first() == Some(&STEP_TOKEN)
                && s.token_ids.get(1).map(|&x| u64::from(x)) == self.increments.get(i).copied();
            i += 1;
            right
        })
    }

    /// Steps of `steps` that are not fillers.
    fn real_steps(steps: &[Arc<Step>]) -> usize {
        steps
            .iter()
            .filter(|s| s.token_ids.first() != Some(&FILLER_TOKEN))
            .count()
    }

    fn total(steps: &[Arc<Step>]) -> u64 {
        steps
            .last()
            .and_then(|s| s.token_ids.get(2))
            .map_or(0, |&t| u64::from(t))
    }

    /// Sample `j` of request `request`.
    fn sample(&self, request: &ProposeRequest, j: u32) -> ProposedStep {
        let mut rng =
            StdRng::seed_from_u64(mix(mix(self.seed, request.sampling.seed), u64::from(j)));
        let i = Self::real_steps(&request.steps);
        let last = i + 1 >= self.depth as usize;
        // Drawn only when guesses are on, so other games keep their random streams.
        if self.p_guess > 0.0 && !last && rng.gen_bool(self.p_guess) {
            let guess = self.increments.iter().sum::<u64>() + rng.gen_range(1..=5);
            return ProposedStep {
                text: format!("The answer is {guess}.\n#### {guess}"),
                token_ids: vec![GUESS_TOKEN, guess as u32],
                token_logprobs: vec![-0.05, -0.05],
                stop: StepStop::EndOfSequence,
            };
        }
        let filler = self.p_filler > 0.0 && rng.gen_bool(self.p_filler);
        let target = self.increments.get(i).copied().unwrap_or(0);
        let right = filler || rng.gen_bool(self.p_correct);
        let x = if filler {
            0
        } else if right {
            target
        } else {
            target + rng.gen_range(1..=5)
        };
        let total = Self::total(&request.steps) + x;
        let ends = last && !filler;
        let mut text = if filler {
            format!("Check: the total so far is {total}.")
        } else {
            format!("Step {}: add {x} to get {total}.", i + 1)
        };
        let answer_line = format!("\n#### {total}");
        if ends {
            text.push_str(&answer_line);
        }
        let mut len = self.min_tokens + rng.gen_range(0..=self.extra_tokens_max);
        if self.p_long > 0.0 && rng.gen_bool(self.p_long) {
            len *= self.long_factor;
        }
        let first = if filler { FILLER_TOKEN } else { STEP_TOKEN };
        let mut token_ids = vec![first, x as u32, total as u32];
        token_ids.extend((3..len).map(|t| 100 + t));
        let base = if right { -0.1 } else { -0.1 - self.logprob_gap };
        let mut token_logprobs: Vec<f32> = (0..len)
            .map(|_| (base + rng.gen_range(-0.08..0.08f32)).min(0.0))
            .collect();
        let mut stop = if ends {
            StepStop::EndOfSequence
        } else {
            StepStop::Delimiter
        };
        let max = request.sampling.max_step_tokens as usize;
        if token_ids.len() > max {
            token_ids.truncate(max);
            token_logprobs.truncate(max);
            stop = StepStop::MaxTokens;
            // The answer line is written last: a step cut short lost it.
            if self.end_token && ends {
                text.truncate(text.len() - answer_line.len());
            }
        } else if self.end_token && ends && token_ids.len() == max {
            // The step's text is whole, but end-of-sequence would have been one token more, as
            // in a real engine: it stops at the limit.
            stop = StepStop::MaxTokens;
        }
        ProposedStep {
            text,
            token_ids,
            token_logprobs,
            stop,
        }
    }
}

/// Fingerprint of the prompt plus the first `len` steps.
fn fingerprints(seed: u64, steps: &[Arc<Step>]) -> Vec<u64> {
    let mut fp = mix(seed, 0xf1);
    let mut out = Vec::with_capacity(steps.len() + 1);
    out.push(fp);
    for s in steps {
        fp = s
            .token_ids
            .iter()
            .fold(mix(fp, s.token_ids.len() as u64), |h, &t| {
                mix(h, u64::from(t))
            });
        out.push(fp);
    }
    out
}

/// What a fake saw, counted on its own side of the trait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Calls made (including ones that failed, hung or panicked).
    pub calls: u64,
    /// Requests over all calls that returned.
    pub requests: u64,
    /// Tokens generated in calls that returned (policy only).
    pub generated_tokens: u64,
    /// Prompt tokens sent in calls that returned (policy), or tokens computed (scorer).
    pub prompt_tokens: u64,
    /// Prompt tokens computed in calls that returned (policy only).
    pub prompt_tokens_computed: u64,
    /// Prompt tokens reused from the simulated prefix cache (policy only).
    pub prompt_tokens_reused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    requests: AtomicU64,
    generated_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    prompt_tokens_computed: AtomicU64,
    prompt_tokens_reused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Seen {
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        Seen {
            calls: get(&self.calls),
            requests: get(&self.requests),
            generated_tokens: get(&self.generated_tokens),
            prompt_tokens: get(&self.prompt_tokens),
            prompt_tokens_computed: get(&self.prompt_tokens_computed),
            prompt_tokens_reused: get(&self.prompt_tokens_reused),
        }
    }
}

/// Faults a [`GamePolicy`] injects, by 0-based call number.
#[derive(Debug, Clone, Default)]
pub struct PolicyFaults {
    /// These calls return an error.
    pub fail_calls: Vec<u64>,
    /// This call panics.
    pub panic_on_call: Option<u64>,
    /// This call never returns.
    pub hang_on_call: Option<u64>,
    /// This call cancels the token before doing anything else.
    pub cancel_on_call: Option<(u64, CancelToken)>,
    /// Every call takes this long (on tokio's clock, so paused-time tests run instantly).
    pub latency: Option<Duration>,
    /// These calls return one step more than asked for (a malformed reply).
    pub overfill_calls: Vec<u64>,
}

/// The game's policy.
#[derive(Debug)]
pub struct GamePolicy {
    /// The game it plays.
    game: PathGame,
    /// Faults to inject.
    faults: PolicyFaults,
    /// What it saw.
    counters: Counters,
    /// Fingerprints of prompt prefixes seen before: a simulated prefix cache, so reported reuse is
    /// real bookkeeping rather than a constant.
    cache: Mutex<HashSet<u64>>,
}

impl GamePolicy {
    /// A fault-free policy for `game`.
    pub fn new(game: PathGame) -> GamePolicy {
        GamePolicy::with_faults(game, PolicyFaults::default())
    }

    /// A policy for `game` that injects `faults`.
    pub fn with_faults(game: PathGame, faults: PolicyFaults) -> GamePolicy {
        GamePolicy {
            game,
            faults,
            counters: Counters::default(),
            cache: Mutex::new(HashSet::new()),
        }
    }

    /// What it saw so far.
    pub fn seen(&self) -> Seen {
        self.counters.snapshot()
    }

    /// Prompt tokens sent and reused for one request; records its prefixes.
    fn prompt_cost(&self, request: &ProposeRequest) -> (u64, u64) {
        let prompt = self.game.prompt_tokens();
        let sent = prompt + request.path_tokens();
        let fps = fingerprints(self.game.seed, &request.steps);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut reused = 0;
        let mut prefix = prompt;
        for (i, fp) in fps.iter().enumerate() {
            if i > 0 {
                prefix += request.steps[i - 1].token_ids.len() as u64;
            }
            if !cache.contains(fp) {
                break;
            }
            reused = prefix;
        }
        cache.extend(fps);
        (sent, reused)
    }
}

impl Policy for GamePolicy {
    async fn propose(&self, batch: Vec<ProposeRequest>) -> Result<Vec<Proposals>, PolicyError> {
        let call = self.counters.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(latency) = self.faults.latency {
            tokio::time::sleep(latency).await;
        }
        if let Some((at, token)) = &self.faults.cancel_on_call {
            if *at == call {
                token.cancel();
            }
        }
        if self.faults.hang_on_call == Some(call) {
            std::future::pending::<()>().await;
        }
        if self.faults.panic_on_call == Some(call) {
            panic!("synthetic policy panics on call {call}");
        }
        if self.faults.fail_calls.contains(&call) {
            return Err(PolicyError::new(format!(
                "synthetic failure on call {call}"
            )));
        }
        let overfill = u32::from(self.faults.overfill_calls.contains(&call));
        let mut replies = Vec::with_capacity(batch.len());
        for request in &batch {
            let steps: Vec<ProposedStep> = (0..request.k + overfill)
                .map(|j| self.game.sample(request, j))
                .collect();
            let generated: u64 = steps.iter().map(|s| s.token_ids.len() as u64).sum();
            let (sent, reused) = self.prompt_cost(request);
            let cost = PolicyCost {
                prompt_tokens: sent,
                prompt_tokens_computed: sent - reused,
                prompt_tokens_reused: reused,
                generated_tokens: generated,
            };
            let c = &self.counters;
            c.requests.fetch_add(1, Ordering::SeqCst);
            c.generated_tokens.fetch_add(generated, Ordering::SeqCst);
            c.prompt_tokens.fetch_add(sent, Ordering::SeqCst);
            c.prompt_tokens_computed
                .fetch_add(sent - reused, Ordering::SeqCst);
            c.prompt_tokens_reused.fetch_add(reused, Ordering::SeqCst);
            replies.push(Proposals { steps, cost });
        }
        Ok(replies)
    }
}

/// The game's process reward model: it knows which prefixes are on track, blurred by noise.
#[derive(Debug)]
pub struct GameScorer {
    /// The game it judges.
    game: PathGame,
    /// An on-track step scores `0.5 + margin`, an off-track one `0.5 - margin`, before noise.
    margin: f32,
    /// Uniform noise in `[-noise, noise]`, fixed per prefix.
    noise: f32,
    /// Chance that a prefix scores NaN (fixed per prefix).
    nan_rate: f64,
    /// These 0-based calls return an error.
    fail_calls: Vec<u64>,
    /// What it saw.
    counters: Counters,
}

impl GameScorer {
    /// A scorer for `game` with the given margin and noise.
    pub fn new(game: PathGame, margin: f32, noise: f32) -> GameScorer {
        GameScorer {
            game,
            margin,
            noise,
            nan_rate: 0.0,
            fail_calls: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// Makes a share `rate` of prefixes score NaN.
    pub fn with_nan_rate(mut self, rate: f64) -> GameScorer {
        self.nan_rate = rate;
        self
    }

    /// Makes these 0-based calls fail.
    pub fn with_failing_calls(mut self, calls: Vec<u64>) -> GameScorer {
        self.fail_calls = calls;
        self
    }

    /// What it saw so far (`prompt_tokens` holds the tokens it computed).
    pub fn seen(&self) -> Seen {
        self.counters.snapshot()
    }

    fn score_path(&self, steps: &[Arc<Step>]) -> Vec<f32> {
        let fps = fingerprints(self.game.seed ^ 0x5c0e, steps);
        (0..steps.len())
            .map(|j| {
                let mut rng = StdRng::seed_from_u64(fps[j + 1]);
                let sign = if self.game.on_track(&steps[..=j]) {
                    1.0
                } else {
                    -1.0
                };
                let noise = if self.noise > 0.0 {
                    rng.gen_range(-self.noise..=self.noise)
                } else {
                    0.0
                };
                let nan = self.nan_rate > 0.0 && rng.gen_bool(self.nan_rate);
                if nan {
                    f32::NAN
                } else {
                    (0.5 + sign * self.margin + noise).clamp(0.0, 1.0)
                }
            })
            .collect()
    }
}

impl Scorer for GameScorer {
    async fn score(&self, batch: Vec<ScoreRequest>) -> Result<Vec<StepScores>, ScoreError> {
        let call = self.counters.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_calls.contains(&call) {
            return Err(ScoreError::new(format!(
                "synthetic scorer failure on call {call}"
            )));
        }
        let mut replies = Vec::with_capacity(batch.len());
        for request in &batch {
            let tokens = self.game.prompt_tokens()
                + request
                    .steps
                    .iter()
                    .map(|s| s.token_ids.len() as u64)
                    .sum::<u64>();
            self.counters.requests.fetch_add(1, Ordering::SeqCst);
            self.counters
                .prompt_tokens
                .fetch_add(tokens, Ordering::SeqCst);
            replies.push(StepScores {
                scores: self.score_path(&request.steps),
                cost: ScoreCost {
                    tokens_computed: tokens,
                    ..ScoreCost::default()
                },
            });
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Sampling;
    use crate::tree::NodeId;

    fn request(game: &PathGame, steps: Vec<Arc<Step>>, k: u32, seed: u64) -> ProposeRequest {
        ProposeRequest {
            node: NodeId::ROOT,
            prompt: Arc::clone(game.prompt()),
            steps,
            k,
            sampling: Sampling {
                temperature: 1.0,
                top_p: 1.0,
                max_step_tokens: 64,
                seed,
            },
        }
    }

    fn to_step(p: &ProposedStep) -> Arc<Step> {
        Arc::new(Step {
            text: p.text.clone(),
            token_ids: p.token_ids.clone(),
            token_logprobs: p.token_logprobs.clone(),
        })
    }

    #[test]
    fn a_path_is_right_exactly_when_every_step_is() {
        let game = PathGame::new(3, 4, 1.0);
        let mut steps = Vec::new();
        for _ in 0..4 {
            let s = game.sample(&request(&game, steps.clone(), 1, 9), 0);
            steps.push(to_step(&s));
        }
        assert!(game.on_track(&steps));
        let text: Vec<&str> = steps.iter().map(|s| s.text.as_str()).collect();
        let answer = crate::answer::extract_answer(&text.join("\n")).unwrap();
        assert_eq!(answer.key, game.answer());

        let wrong = PathGame::new(3, 4, 0.0);
        let s = wrong.sample(&request(&wrong, vec![], 1, 9), 0);
        assert!(!wrong.on_track(&[to_step(&s)]));
    }

    #[test]
    fn samples_depend_only_on_seed_path_and_index() {
        let game = PathGame::new(1, 5, 0.5);
        let a = game.sample(&request(&game, vec![], 4, 11), 2);
        let b = game.sample(&request(&game, vec![], 1, 11), 2);
        let c = game.sample(&request(&game, vec![], 4, 12), 2);
        assert_eq!(a, b);
        assert_ne!(a, c, "another seed draws another sample");
    }

    #[tokio::test]
    async fn the_prefix_cache_reports_reuse_on_the_second_visit() {
        let game = PathGame::new(1, 5, 0.5);
        let policy = GamePolicy::new(game.clone());
        let first = policy
            .propose(vec![request(&game, vec![], 1, 1)])
            .await
            .unwrap();
        assert_eq!(first[0].cost.prompt_tokens_reused, 0);
        let step = to_step(&first[0].steps[0]);
        let second = policy
            .propose(vec![request(&game, vec![step.clone()], 1, 2)])
            .await
            .unwrap();
        let cost = second[0].cost;
        assert_eq!(
            cost.prompt_tokens_reused,
            game.prompt_tokens(),
            "the prompt was cached, the step not yet"
        );
        assert_eq!(
            cost.prompt_tokens,
            game.prompt_tokens() + step.token_ids.len() as u64
        );
        let seen = policy.seen();
        assert_eq!(seen.calls, 2);
        assert_eq!(seen.prompt_tokens_reused, cost.prompt_tokens_reused);
    }

    #[test]
    fn the_scorer_separates_on_and_off_track_prefixes() {
        let game = PathGame::new(5, 3, 0.5);
        let scorer = GameScorer::new(game.clone(), 0.3, 0.1);
        let right = PathGame::new(5, 3, 1.0);
        let wrong = PathGame::new(5, 3, 0.0);
        let good = to_step(&right.sample(&request(&right, vec![], 1, 1), 0));
        let bad = to_step(&wrong.sample(&request(&wrong, vec![], 1, 1), 0));
        let scores = scorer.score_path(&[good, bad]);
        assert!(scores[0] >= 0.7 && scores[1] <= 0.3, "{scores:?}");
    }
}

//! Batched sampling: many requests, each with `n` samples that share its prompt's KV blocks.
//!
//! [`Batcher`] is continuous batching: jobs (each a list of requests) join and leave between
//! forward passes, and every pass carries the new jobs' prompts together with one token of every
//! live sample of the older ones. [`generate`] is the one-job case.

use std::collections::HashMap;
use std::time::Instant;

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, ForwardEntry, SeqId};
use crate::error::{ModelError, Result};
use crate::sampling::{Draw, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Most samples one request may ask for.
pub const SAMPLES_PER_REQUEST_MAX: usize = 256;

/// One prompt to continue, `n` times.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenRequest {
    /// Token ids of the prompt (already templated).
    pub prompt: Vec<u32>,
    /// Number of continuations; they share the prompt's prefill and KV blocks.
    pub n: usize,
    /// Most tokens generated per continuation.
    pub max_tokens: usize,
    /// How tokens are picked; sample `i` uses stream `i` of the seed.
    pub sampling: SamplingParams,
    /// Generation stops once the generated text contains one of these (e.g. `"\n\n"`, the
    /// reasoning-step delimiter). The returned text ends before it.
    pub stop: Vec<String>,
    /// A live sequence that already holds the first tokens of `prompt`: the samples fork it and
    /// only the rest of the prompt is computed. It is left unchanged.
    #[serde(skip)]
    pub prefix: Option<SeqId>,
    /// Keep each sample's sequence alive and return it in [`GenOutput::seq`] (the caller frees
    /// it), so a later request can continue from it.
    #[serde(default)]
    pub keep_sequences: bool,
}

impl GenRequest {
    /// A request for `n` samples of at most `max_tokens` after `prompt`.
    pub fn new(prompt: Vec<u32>, n: usize, max_tokens: usize, sampling: SamplingParams) -> Self {
        GenRequest {
            prompt,
            n,
            max_tokens,
            sampling,
            stop: Vec::new(),
            prefix: None,
            keep_sequences: false,
        }
    }
}

/// Why a continuation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The model produced an end-of-sequence token (the token is not included).
    Eos,
    /// The text reached the stop string with this index in [`GenRequest::stop`].
    Stop(usize),
    /// `max_tokens` were generated.
    MaxTokens,
}

/// One continuation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenOutput {
    /// Generated token ids (including the one that completed a stop string; excluding EOS).
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token under the model (temperature 1).
    pub logprobs: Vec<f32>,
    /// Decoded text, cut before the stop string if one was hit.
    pub text: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// With [`GenRequest::keep_sequences`]: the sequence holding `prompt` followed by the
    /// generated tokens (all of them after EOS; all but the last, which was never fed back,
    /// otherwise). [`Engine::seq_len`] says how many tokens it holds.
    #[serde(skip)]
    pub seq: Option<SeqId>,
}

/// Counters of one [`generate`] call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenStats {
    /// Prompt tokens run through the model (once per request, not once per sample; tokens
    /// already held by a [`GenRequest::prefix`] are not computed again).
    pub prompt_tokens_computed: u64,
    /// Tokens generated over all samples.
    pub generated_tokens: u64,
    /// Forward passes (one prefill plus one per decoding step).
    pub forward_passes: u64,
    /// Largest number of KV blocks in use at once.
    pub kv_blocks_peak: usize,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Seconds spent decoding.
    pub decode_secs: f64,
}

/// Identifies a job inside one [`Batcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// What a finished job returns: one list of samples per request, in request order, and counters.
pub type JobResult = Result<(Vec<Vec<GenOutput>>, GenStats)>;

struct Job {
    requests: Vec<GenRequest>,
    /// One root per request, forked from its prefix (or empty) at submission; its prefill
    /// appends the rest of the prompt, and the samples fork it.
    roots: Vec<SeqId>,
    /// Tokens each root held at submission.
    held: Vec<usize>,
    prefilled: bool,
    /// Finished samples, by request and sample index.
    outputs: Vec<Vec<Option<GenOutput>>>,
    /// Samples still decoding.
    live: usize,
    /// Every sequence the job created; those not handed back are freed when it ends.
    seqs: Vec<SeqId>,
    stats: GenStats,
}

struct Live {
    job: JobId,
    request: usize,
    sample: usize,
    seq: SeqId,
    sampler: Sampler,
    out: GenOutput,
    done: bool,
}

/// A new request's samples, each with its sampler (past its first draw) and first pick.
type Firsts = Vec<(Sampler, (u32, f32))>;

/// What one pass gives back: the new requests' first picks, request after request, and the
/// live samples' picks.
#[derive(Default)]
struct Passed {
    firsts: Vec<Firsts>,
    picks: Vec<(u32, f32)>,
}

/// Continuous batching over one [`Engine`].
///
/// [`Batcher::submit`] validates a job and forks its prefixes at once (so a prefix sequence may be
/// freed right after); each [`Batcher::step`] runs one forward pass holding the prompts of new jobs
/// and the next token of every live sample, and returns the jobs that finished. A failed pass fails
/// only the jobs it could concern, and every failed or cancelled job gives its sequences back.
///
/// Each sample draws from its own seeded stream and the CPU kernels do not depend on the batch, so
/// a job's results are the same whatever else shares its passes.
#[derive(Default)]
pub struct Batcher {
    jobs: HashMap<JobId, Job>,
    live: Vec<Live>,
    next: u64,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("jobs", &self.jobs.len())
            .field("live_samples", &self.live.len())
            .finish()
    }
}

impl Batcher {
    /// An empty batcher.
    pub fn new() -> Self {
        Batcher::default()
    }

    /// No job is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Jobs submitted and not yet finished.
    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Samples decoding now.
    pub fn live_samples(&self) -> usize {
        self.live.len()
    }

    /// Validates `requests` and queues them as one job; its prefill runs in the next step.
    pub fn submit(&mut self, engine: &mut Engine, requests: Vec<GenRequest>) -> Result<JobId> {
        validate(engine, &requests)?;
        let mut roots = Vec::with_capacity(requests.len());
        let mut held = Vec::with_capacity(requests.len());
        for r in &requests {
            let root = match r.prefix {
                Some(p) => match engine.fork(p) {
                    Ok(s) => s,
                    Err(e) => {
                        roots.iter().for_each(|&s| engine.free(s));
                        return Err(e);
                    }
                },
                None => engine.new_sequence(),
            };
            held.push(engine.seq_len(root).expect("just created"));
            roots.push(root);
        }
        let id = JobId(self.next);
        self.next += 1;
        let outputs = requests.iter().map(|r| vec![None; r.n]).collect();
        self.jobs.insert(
            id,
            Job {
                seqs: roots.clone(),
                requests,
                roots,
                held,
                prefilled: false,
                outputs,
                live: 0,
                stats: GenStats::default(),
            },
        );
        Ok(id)
    }

    /// Drops a job and frees its sequences; false if it does not exist (finished or unknown).
    pub fn cancel(&mut self, engine: &mut Engine, job: JobId) -> bool {
        let Some(j) = self.jobs.remove(&job) else {
            return false;
        };
        self.live.retain(|l| l.job != job);
        for s in j.seqs {
            engine.free(s);
        }
        true
    }

    /// Runs one forward pass and returns the jobs that finished (successfully or not).
    /// `on_token(job, request, sample, token)` sees each accepted token (for streaming).
    pub fn step(
        &mut self,
        engine: &mut Engine,
        tokenizer: &Tokenizer,
        mut on_token: impl FnMut(JobId, usize, usize, u32),
    ) -> Vec<(JobId, JobResult)> {
        let mut finished = Vec::new();
        if self.jobs.is_empty() {
            return finished;
        }
        let t0 = Instant::now();
        let mut new: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| !j.prefilled)
            .map(|(&id, _)| id)
            .collect();
        new.sort();
        let Passed { firsts, picks } = loop {
            match self.pass(engine, &new) {
                Ok(done) => break done,
                Err(e) if !new.is_empty() => {
                    // The new prompts may be what broke the pass (most often: the KV cache is
                    // full). Fail those jobs, which gives their blocks back, and run the live
                    // samples alone.
                    for &id in &new {
                        finished.push((id, Err(e.clone())));
                        self.cancel(engine, id);
                    }
                    new.clear();
                }
                Err(e @ ModelError::KvCacheFull { .. }) if self.jobs.len() > 1 => {
                    // The live samples outgrew the cache. Preempt the youngest job (the least
                    // work lost) instead of failing them all: it gives its blocks back and
                    // finishes with `KvCacheFull`, which a caller may run again once others
                    // have finished (the worker does); its seeded samples come out the same.
                    let youngest = *self.jobs.keys().max().expect("more than one job");
                    finished.push((youngest, Err(e)));
                    self.cancel(engine, youngest);
                }
                Err(e) => {
                    self.fail_all(engine, &e, &mut finished);
                    return finished;
                }
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        let blocks = engine.kv_blocks_in_use();
        for (id, job) in self.jobs.iter_mut() {
            job.stats.forward_passes += 1;
            job.stats.kv_blocks_peak = job.stats.kv_blocks_peak.max(blocks);
            if new.contains(id) {
                job.stats.prefill_secs += secs;
            } else {
                job.stats.decode_secs += secs;
            }
        }
        // The live samples take their tokens (before the new samples join the list).
        let mut failed: Vec<(JobId, ModelError)> = Vec::new();
        for (l, (tok, lp)) in self.live.iter_mut().zip(picks) {
            let job = self.jobs.get_mut(&l.job).expect("live samples have jobs");
            let r = &job.requests[l.request];
            if let Err(e) = accept_token(l, tok, lp, r, tokenizer, &mut job.stats, &mut on_token) {
                failed.push((l.job, e));
            }
        }
        for (id, e) in failed {
            if self.cancel(engine, id) {
                finished.push((id, Err(e)));
            }
        }
        // The new jobs' samples: fork each root once per extra sample, take the first token.
        let mut firsts = firsts.into_iter();
        for &id in &new {
            if let Err(e) = self.start_samples(engine, tokenizer, id, &mut firsts, &mut on_token) {
                finished.push((id, Err(e)));
                self.cancel(engine, id);
            }
        }
        // Jobs whose samples all stopped.
        let mut i = 0;
        while i < self.live.len() {
            if self.live[i].done {
                let l = self.live.swap_remove(i);
                let job = self.jobs.get_mut(&l.job).expect("live samples have jobs");
                job.outputs[l.request][l.sample] = Some(l.out);
                job.live -= 1;
            } else {
                i += 1;
            }
        }
        let done: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.prefilled && j.live == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            let job = self.jobs.remove(&id).expect("listed");
            let outputs: Vec<Vec<GenOutput>> = job
                .outputs
                .into_iter()
                .map(|samples| {
                    samples
                        .into_iter()
                        .map(|o| o.expect("every sample finished"))
                        .collect()
                })
                .collect();
            let kept: std::collections::HashSet<SeqId> =
                outputs.iter().flatten().filter_map(|o| o.seq).collect();
            for s in job.seqs {
                if !kept.contains(&s) {
                    engine.free(s);
                }
            }
            finished.push((id, Ok((outputs, job.stats))));
        }
        finished
    }

    /// One forward pass over the prompts of `new` and the last token of every live sample.
    /// Returns the first picks of each new request's samples (request after request) and each
    /// live sample's next token with its log-probability. On error nothing has changed.
    fn pass(&mut self, engine: &mut Engine, new: &[JobId]) -> Result<Passed> {
        let last: Vec<[u32; 1]> = self
            .live
            .iter()
            .map(|l| {
                [*l.out
                    .tokens
                    .last()
                    .expect("a live sample has accepted a token")]
            })
            .collect();
        // Every new request's samples pick their first tokens where the logits are, like the
        // live samples their next ones (on the device for a GPU backend: no row comes back):
        // sample `si` draws from its own stream, which it keeps.
        let mut samplers: Vec<Vec<(Sampler, StdRng)>> = Vec::new();
        let mut first_draws: Vec<Vec<Draw>> = Vec::new();
        for id in new {
            for r in &self.jobs[id].requests {
                let (s, d): (Vec<_>, Vec<_>) = (0..r.n)
                    .map(|si| {
                        let sampler = Sampler::new(r.sampling.clone(), si as u64);
                        let (draw, rng) = sampler.peek();
                        ((sampler, rng), draw)
                    })
                    .unzip();
                samplers.push(s);
                first_draws.push(d);
            }
        }
        let mut entries: Vec<ForwardEntry<'_>> = Vec::new();
        for id in new {
            let job = &self.jobs[id];
            for (ri, r) in job.requests.iter().enumerate() {
                let tokens = &r.prompt[job.held[ri]..];
                let draws = &first_draws[entries.len()];
                entries.push(ForwardEntry::sampled_n(job.roots[ri], tokens, draws));
            }
        }
        let draws: Vec<_> = self.live.iter().map(|l| l.sampler.peek()).collect();
        entries.extend(
            self.live
                .iter()
                .zip(&last)
                .zip(&draws)
                .map(|((l, t), (d, _))| ForwardEntry::sampled(l.seq, &t[..], d)),
        );
        if entries.is_empty() {
            return Ok(Passed::default());
        }
        let out = engine.forward_at(&entries)?;
        drop(entries);
        let n_first = first_draws.iter().map(Vec::len).sum();
        let (first_picks, picks) = out.picks.split_at(n_first);
        let mut first_picks = first_picks.iter();
        let firsts = samplers
            .into_iter()
            .map(|samples| {
                samples
                    .into_iter()
                    .zip(first_picks.by_ref())
                    .map(|((mut sampler, rng), &pick)| {
                        sampler.commit(rng);
                        (sampler, pick)
                    })
                    .collect()
            })
            .collect();
        let picks = picks.to_vec();
        for (l, (_, rng)) in self.live.iter_mut().zip(draws) {
            l.sampler.commit(rng);
        }
        Ok(Passed { firsts, picks })
    }

    /// Forks the samples of new job `id` from its roots and gives each its first token, picked
    /// in the pass: `firsts` yields them request after request.
    fn start_samples(
        &mut self,
        engine: &mut Engine,
        tokenizer: &Tokenizer,
        id: JobId,
        firsts: &mut impl Iterator<Item = Firsts>,
        on_token: &mut impl FnMut(JobId, usize, usize, u32),
    ) -> Result<()> {
        let job = self.jobs.get_mut(&id).expect("new jobs exist");
        job.prefilled = true;
        for (ri, r) in job.requests.iter().enumerate() {
            job.stats.prompt_tokens_computed += (r.prompt.len() - job.held[ri]) as u64;
            let samples = firsts.next().expect("first picks for every request");
            debug_assert_eq!(samples.len(), r.n);
            for (si, (sampler, (tok, lp))) in samples.into_iter().enumerate() {
                let seq = if si == 0 {
                    job.roots[ri]
                } else {
                    let s = engine.fork(job.roots[ri])?;
                    job.seqs.push(s);
                    s
                };
                let mut l = Live {
                    job: id,
                    request: ri,
                    sample: si,
                    seq,
                    sampler,
                    out: GenOutput {
                        tokens: vec![],
                        logprobs: vec![],
                        text: String::new(),
                        stop_reason: StopReason::MaxTokens,
                        seq: r.keep_sequences.then_some(seq),
                    },
                    done: false,
                };
                accept_token(&mut l, tok, lp, r, tokenizer, &mut job.stats, on_token)?;
                job.live += 1;
                self.live.push(l);
            }
        }
        Ok(())
    }

    fn fail_all(
        &mut self,
        engine: &mut Engine,
        e: &ModelError,
        finished: &mut Vec<(JobId, JobResult)>,
    ) {
        let mut ids: Vec<JobId> = self.jobs.keys().copied().collect();
        ids.sort();
        for id in ids {
            finished.push((id, Err(e.clone())));
            self.cancel(engine, id);
        }
    }
}

/// Runs every request to completion, batching all live continuations into each forward pass.
/// `on_token(request, sample, token)` sees each token as it is accepted (for streaming).
///
/// On error every sequence it created is freed, so the engine is left as it was.
pub fn generate(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    requests: &[GenRequest],
    mut on_token: impl FnMut(usize, usize, u32),
) -> Result<(Vec<Vec<GenOutput>>, GenStats)> {
    let mut batcher = Batcher::new();
    let id = batcher.submit(engine, requests.to_vec())?;
    loop {
        let mut finished = batcher.step(engine, tokenizer, |_, r, s, t| on_token(r, s, t));
        if let Some(i) = finished.iter().position(|(j, _)| *j == id) {
            return finished.swap_remove(i).1;
        }
    }
}

fn validate(engine: &Engine, requests: &[GenRequest]) -> Result<()> {
    for r in requests {
        if r.prompt.is_empty() {
            return Err(ModelError::invalid(
                "prompt",
                "empty prompt: at least one token is needed",
            ));
        }
        if r.n == 0 || r.n > SAMPLES_PER_REQUEST_MAX {
            return Err(ModelError::invalid(
                "n",
                format!(
                    "{} samples requested; allowed 1..={SAMPLES_PER_REQUEST_MAX}",
                    r.n
                ),
            ));
        }
        if r.max_tokens == 0 {
            return Err(ModelError::invalid("max_tokens", "must be at least 1"));
        }
        if let Some(p) = r.prefix {
            let held = engine.seq_len(p).ok_or_else(|| {
                ModelError::invalid("prefix", format!("sequence {} does not exist", p.0))
            })?;
            if held >= r.prompt.len() {
                return Err(ModelError::invalid(
                    "prefix",
                    format!(
                        "the prefix sequence holds {held} tokens; the prompt ({}) must extend it",
                        r.prompt.len()
                    ),
                ));
            }
        }
        if r.stop.iter().any(|s| s.is_empty()) {
            return Err(ModelError::invalid(
                "stop",
                "stop strings must not be empty",
            ));
        }
        r.sampling.validate()?;
    }
    Ok(())
}

/// Takes `tok` (with log-probability `lp`) as `l`'s next token and decides whether it has finished.
/// Whether the text of `tokens`' last few tokens holds one of `stop`: a stop string of `B`
/// bytes that ends in the last token spans at most `B + 1` tokens (each is at least a byte),
/// and 3 more cover a character split across tokens at the window's start, whose bytes alone
/// decode to replacement characters.
fn tail_may_stop(tokenizer: &Tokenizer, tokens: &[u32], stop: &[String]) -> Result<bool> {
    let longest = stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let tail = tokenizer.decode(&tokens[tokens.len().saturating_sub(longest + 4)..])?;
    Ok(stop.iter().any(|s| tail.contains(s.as_str())))
}

fn accept_token(
    l: &mut Live,
    tok: u32,
    lp: f32,
    r: &GenRequest,
    tokenizer: &Tokenizer,
    stats: &mut GenStats,
    on_token: &mut impl FnMut(JobId, usize, usize, u32),
) -> Result<()> {
    if tokenizer.is_eos(tok) {
        l.out.stop_reason = StopReason::Eos;
        l.done = true;
        l.out.text = tokenizer.decode(&l.out.tokens)?;
        return Ok(());
    }
    l.out.tokens.push(tok);
    // (`text` is decoded at every step only when stop strings need it; otherwise at the end.)
    l.out.logprobs.push(lp);
    stats.generated_tokens += 1;
    on_token(l.job, l.request, l.sample, tok);
    if r.stop.is_empty() {
        if l.out.tokens.len() >= r.max_tokens {
            l.out.stop_reason = StopReason::MaxTokens;
            l.done = true;
            l.out.text = tokenizer.decode(&l.out.tokens)?;
        }
        return Ok(());
    }
    // Only the last tokens' text can hold a stop string that was not there a token ago, so
    // the whole text is decoded (and searched) only when that tail holds one, or at the end:
    // decoding it at every token made a long sample's stop checks quadratic in its length.
    if !tail_may_stop(tokenizer, &l.out.tokens, &r.stop)? && l.out.tokens.len() < r.max_tokens {
        return Ok(());
    }
    l.out.text = tokenizer.decode(&l.out.tokens)?;
    let first_stop = r
        .stop
        .iter()
        .enumerate()
        .filter_map(|(i, s)| l.out.text.find(s.as_str()).map(|at| (at, i)))
        .min();
    if let Some((at, i)) = first_stop {
        l.out.text.truncate(at);
        l.out.stop_reason = StopReason::Stop(i);
        l.done = true;
    } else if l.out.tokens.len() >= r.max_tokens {
        l.out.stop_reason = StopReason::MaxTokens;
        l.done = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::tail_may_stop;

    /// Wherever a stop string first appears in the decoded text, token after token, the tail
    /// check sees it too: random sequences of pieces, characters split across byte tokens
    /// included, on the tiny model's byte-level tokenizer.
    #[test]
    fn the_tail_sees_every_stop_string_the_whole_text_shows() {
        let dir = std::env::temp_dir().join(format!("arbor-tail-stop-{}", std::process::id()));
        crate::tiny::TinyModel::new("qwen2").write(&dir).unwrap();
        let model = crate::Model::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let tok = &model.tokenizer;
        let mut pool: Vec<u32> = Vec::new();
        for piece in ["\n", "a", "b", " ", "c", "é", "ab", "x"] {
            pool.extend(tok.encode(piece, false).unwrap());
        }
        pool.sort_unstable();
        pool.dedup();
        let stops: Vec<String> = ["\n\n", "é", "ab c", "b\nx"].map(String::from).to_vec();
        let mut rng = crate::tiny::Rng(7);
        let mut seen = 0;
        for _ in 0..300 {
            let mut tokens = Vec::new();
            for _ in 0..40 {
                let r = ((rng.next_f32() + 0.25) * 2.0 * pool.len() as f32) as usize;
                tokens.push(pool[r.min(pool.len() - 1)]);
                let text = tok.decode(&tokens).unwrap();
                if stops.iter().any(|s| text.contains(s.as_str())) {
                    assert!(
                        tail_may_stop(tok, &tokens, &stops).unwrap(),
                        "{tokens:?}: {text:?} holds a stop string its tail does not"
                    );
                    seen += 1;
                    break;
                }
            }
        }
        assert!(seen > 100, "only {seen} sequences reached a stop string");
    }
}

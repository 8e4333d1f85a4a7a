//! Batched sampling: many requests, each with `n` samples that share its prompt's KV blocks.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, SeqId};
use crate::error::{ModelError, Result};
use crate::sampling::{log_prob, Sampler, SamplingParams};
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

struct Live {
    request: usize,
    sample: usize,
    seq: SeqId,
    sampler: Sampler,
    out: GenOutput,
    done: bool,
}

/// Runs every request to completion, batching all live continuations into each forward pass.
/// `on_token(request, sample, token)` sees each token as it is accepted (for streaming).
pub fn generate(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    requests: &[GenRequest],
    mut on_token: impl FnMut(usize, usize, u32),
) -> Result<(Vec<Vec<GenOutput>>, GenStats)> {
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
    let mut seqs: Vec<SeqId> = Vec::new();
    let result = run(engine, tokenizer, requests, &mut seqs, &mut on_token);
    // Free every sequence on every path, so an error leaves the cache as it was; on success
    // the ones the caller asked to keep survive.
    let kept: std::collections::HashSet<SeqId> = match &result {
        Ok((outs, _)) => outs.iter().flatten().filter_map(|o| o.seq).collect(),
        Err(_) => Default::default(),
    };
    for s in seqs {
        if !kept.contains(&s) {
            engine.free(s);
        }
    }
    result
}

fn run(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    requests: &[GenRequest],
    seqs: &mut Vec<SeqId>,
    on_token: &mut impl FnMut(usize, usize, u32),
) -> Result<(Vec<Vec<GenOutput>>, GenStats)> {
    let mut stats = GenStats::default();
    let vocab = engine.config().vocab_size;
    let t0 = std::time::Instant::now();
    let mut roots = Vec::with_capacity(requests.len());
    let mut entries: Vec<(SeqId, &[u32])> = Vec::with_capacity(requests.len());
    for r in requests {
        let (root, held) = match r.prefix {
            Some(p) => (engine.fork(p)?, engine.seq_len(p).expect("validated")),
            None => (engine.new_sequence(), 0),
        };
        seqs.push(root);
        roots.push(root);
        entries.push((root, &r.prompt[held..]));
        stats.prompt_tokens_computed += (r.prompt.len() - held) as u64;
    }
    let prompt_logits = engine.forward(&entries)?.to_vec();
    stats.forward_passes += 1;
    stats.prefill_secs = t0.elapsed().as_secs_f64();

    let t1 = std::time::Instant::now();
    let mut live = Vec::new();
    for (ri, r) in requests.iter().enumerate() {
        let logits = &prompt_logits[ri * vocab..(ri + 1) * vocab];
        for si in 0..r.n {
            let seq = if si == 0 {
                roots[ri]
            } else {
                engine.fork(roots[ri])?
            };
            if si > 0 {
                seqs.push(seq);
            }
            let mut l = Live {
                request: ri,
                sample: si,
                seq,
                sampler: Sampler::new(r.sampling.clone(), si as u64),
                out: GenOutput {
                    tokens: vec![],
                    logprobs: vec![],
                    text: String::new(),
                    stop_reason: StopReason::MaxTokens,
                    seq: r.keep_sequences.then_some(seq),
                },
                done: false,
            };
            accept(&mut l, logits, r, tokenizer, &mut stats, on_token)?;
            live.push(l);
        }
    }
    stats.kv_blocks_peak = engine.kv_blocks_in_use();
    loop {
        let active: Vec<usize> = (0..live.len()).filter(|&i| !live[i].done).collect();
        if active.is_empty() {
            break;
        }
        let last: Vec<[u32; 1]> = active
            .iter()
            .map(|&i| [*live[i].out.tokens.last().expect("one token accepted")])
            .collect();
        let entries: Vec<(SeqId, &[u32])> = active
            .iter()
            .zip(&last)
            .map(|(&i, t)| (live[i].seq, &t[..]))
            .collect();
        stats.kv_blocks_peak = stats.kv_blocks_peak.max(engine.kv_blocks_in_use());
        let logits = engine.forward(&entries)?;
        stats.forward_passes += 1;
        // Sampling and log-softmax read all 151,936 logits per sequence: spread them over the
        // cores for wide batches. Each sequence has its own sampler, so the result is the same.
        let picks: Vec<(u32, f32)> = {
            let mut refs: Vec<&mut Live> = live.iter_mut().filter(|l| !l.done).collect();
            let pick = |(j, l): (usize, &mut &mut Live)| {
                let row = &logits[j * vocab..(j + 1) * vocab];
                let tok = l.sampler.sample(row);
                (tok, log_prob(row, tok))
            };
            if refs.len() >= 4 {
                refs.par_iter_mut().enumerate().map(pick).collect()
            } else {
                refs.iter_mut().enumerate().map(pick).collect()
            }
        };
        for (&i, (tok, lp)) in active.iter().zip(picks) {
            let r = &requests[live[i].request];
            accept_token(&mut live[i], tok, lp, r, tokenizer, &mut stats, on_token)?;
        }
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    let mut outputs: Vec<Vec<GenOutput>> =
        requests.iter().map(|r| Vec::with_capacity(r.n)).collect();
    for l in live {
        debug_assert_eq!(outputs[l.request].len(), l.sample);
        outputs[l.request].push(l.out);
    }
    Ok((outputs, stats))
}

/// Samples one token for `l` from `logits` and decides whether it has finished.
fn accept(
    l: &mut Live,
    logits: &[f32],
    r: &GenRequest,
    tokenizer: &Tokenizer,
    stats: &mut GenStats,
    on_token: &mut impl FnMut(usize, usize, u32),
) -> Result<()> {
    let tok = l.sampler.sample(logits);
    accept_token(l, tok, log_prob(logits, tok), r, tokenizer, stats, on_token)
}

/// Takes `tok` (with log-probability `lp`) as `l`'s next token and decides whether it has finished.
fn accept_token(
    l: &mut Live,
    tok: u32,
    lp: f32,
    r: &GenRequest,
    tokenizer: &Tokenizer,
    stats: &mut GenStats,
    on_token: &mut impl FnMut(usize, usize, u32),
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
    on_token(l.request, l.sample, tok);
    if r.stop.is_empty() {
        if l.out.tokens.len() >= r.max_tokens {
            l.out.stop_reason = StopReason::MaxTokens;
            l.done = true;
            l.out.text = tokenizer.decode(&l.out.tokens)?;
        }
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

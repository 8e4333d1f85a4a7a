//! Teacher-forced scoring of a path in bounded chunks.
//!
//! A step's score is the model's own confidence in it, `exp(mean token log-prob)`: the same
//! value the log-prob scorer gives a step the policy generated, computed here for any text.
//! Reading it needs the next-token logits at every token of the step, but never more than one
//! vocabulary row per token *at a time*: [`PathScorer`] runs the path through the engine a
//! chunk of tokens at a time, asks the engine for logits only where a step token is predicted,
//! turns each row into the one log-prob it is needed for, and keeps only the running sums.
//! Memory is one chunk of vocabulary rows, whatever the length of the step; and between two
//! chunks the engine thread is free for other calls (the worker's `Score` runs each chunk as
//! its own piece of exclusive work, checking its deadline and caller in between).

use arbor_model::sampling::log_prob;
use arbor_model::{Engine, ForwardEntry, SeqId};

/// Tokens run per chunk by default: 32 rows of logits (about 19 MB for a 150k vocabulary).
pub const SCORE_CHUNK_TOKENS: usize = 32;

/// One path being scored: its tokens, how far the engine has read them, and the log-prob sums.
#[derive(Debug, Clone)]
pub struct PathScorer {
    /// The prompt's tokens, then every step's, in order.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// For each step, the index in `tokens` one past its last token.
    step_ends: Vec<usize>,
    /// Tokens already appended to the sequence.
    pos: usize,
    /// Sum of the log-probs of each step's tokens read so far.
    sums: Vec<f64>,
}

impl PathScorer {
    /// A scorer for `steps` (each non-empty) after `prompt` (non-empty).
    pub fn new(prompt: &[u32], steps: &[Vec<u32>]) -> PathScorer {
        let mut tokens = prompt.to_vec();
        let mut step_ends = Vec::with_capacity(steps.len());
        for s in steps {
            tokens.extend_from_slice(s);
            step_ends.push(tokens.len());
        }
        PathScorer {
            tokens,
            prompt_len: prompt.len(),
            sums: vec![0.0; steps.len()],
            step_ends,
            pos: 0,
        }
    }

    /// Tokens the engine computes for this path in all (prompt and steps).
    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Whether every token has been read.
    pub fn done(&self) -> bool {
        self.pos >= self.tokens.len()
    }

    /// Appends the next (at most) `chunk` tokens to `seq` and adds the log-probs they let us
    /// read: at position `p` the logits predict token `p + 1`, needed when that token belongs
    /// to a step. Logits are computed only at those positions. On error nothing is appended.
    pub fn advance(
        &mut self,
        engine: &mut Engine,
        seq: SeqId,
        chunk: usize,
    ) -> arbor_model::Result<()> {
        let start = self.pos;
        let end = (start + chunk.max(1)).min(self.tokens.len());
        if start >= end {
            return Ok(());
        }
        // Positions in this chunk whose next token is a step token.
        let first = start.max(self.prompt_len.saturating_sub(1));
        let last = end.min(self.tokens.len() - 1);
        let at: Vec<u32> = (first..last).map(|p| (p - start) as u32).collect();
        let vocab = engine.config().vocab_size;
        let out =
            engine.forward_at(&[ForwardEntry::logits_at(seq, &self.tokens[start..end], &at)])?;
        for (row, &off) in at.iter().enumerate() {
            let target = start + off as usize + 1;
            let lp = log_prob(
                &out.logits[row * vocab..(row + 1) * vocab],
                self.tokens[target],
            );
            let step = self.step_ends.partition_point(|&e| e <= target);
            self.sums[step] += f64::from(lp);
        }
        self.pos = end;
        Ok(())
    }

    /// Each step's score, `exp(mean token log-prob)`; meaningful once [`PathScorer::done`].
    pub fn scores(&self) -> Vec<f32> {
        let mut begin = self.prompt_len;
        self.step_ends
            .iter()
            .zip(&self.sums)
            .map(|(&end, &sum)| {
                let n = (end - begin).max(1) as f64;
                begin = end;
                (sum / n).exp() as f32
            })
            .collect()
    }

    /// Scores a whole path on `engine` in chunks of `chunk` tokens, on a fresh sequence it
    /// frees afterwards: the one-call form of [`PathScorer::advance`].
    pub fn run(
        engine: &mut Engine,
        prompt: &[u32],
        steps: &[Vec<u32>],
        chunk: usize,
    ) -> arbor_model::Result<Vec<f32>> {
        let mut s = PathScorer::new(prompt, steps);
        let seq = engine.new_sequence();
        let mut result = Ok(());
        while !s.done() && result.is_ok() {
            result = s.advance(engine, seq, chunk);
        }
        engine.free(seq);
        result.map(|()| s.scores())
    }
}

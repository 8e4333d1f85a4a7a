//! Reading a model's outputs at chosen token offsets of many paths at once: the one engine
//! routine every model-based PRM shares.
//!
//! A path is laid out as one token stream (the question, then each step's segment); after
//! step `i` the reader takes either the logits of some vocabulary ids or the final hidden state
//! at a position inside the stream (`inline`), or forks the sequence there, appends a probe
//! (a judge's question) and reads at the probe's last token (`fork`), so later steps never see
//! the probe. Inline reads take one pass for every path of a call ([`read_inline`]); fork
//! probes advance the paths step by step, all paths in the same passes. Either way the longest
//! prefix the worker's prefix cache holds is forked instead of recomputed.

use arbor_model::{Engine, ForwardEntry, HiddenLayer, ModelError, SeqId};

use crate::cache::PrefixCache;

/// One path: its token stream and where to read after each step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PathLayout {
    /// The whole stream: question, then every step's segment.
    pub(crate) tokens: Vec<u32>,
    /// Per step: the stream length after its segment (non-decreasing).
    pub(crate) step_ends: Vec<usize>,
    /// Per step, inline reads only: the stream position read (before `step_ends[i]`).
    pub(crate) read_at: Vec<usize>,
}

/// What to read after each step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Read {
    /// The next-token logits of these vocabulary ids.
    Logits(Vec<u32>),
    /// The hidden states at these layers (`d_model` values each, in this order).
    Hidden(Vec<HiddenLayer>),
}

/// Where to read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Probe {
    /// At [`PathLayout::read_at`], inside the stream.
    Inline,
    /// At the last token of these tokens, appended to a fork of the stream after each step.
    Fork(Vec<u32>),
}

/// The values read for one path (one row per step) and the tokens computed for it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PathReadout {
    /// Per step: the selected logits, or the hidden state.
    pub(crate) rows: Vec<Vec<f32>>,
    /// Tokens this path made the engine compute (cache hits excluded).
    pub(crate) tokens_computed: u64,
}

/// Per path: the sequence that holds a prefix of its stream, and how much of it.
struct Cursor {
    seq: Option<SeqId>,
    len: usize,
}

/// Reads `what` after every step of every path. Every sequence it creates is freed before it
/// returns, on success and on error.
pub(crate) fn read_paths(
    engine: &mut Engine,
    mut cache: Option<&mut PrefixCache>,
    paths: &[PathLayout],
    probe: &Probe,
    what: &Read,
) -> Result<Vec<PathReadout>, ModelError> {
    let mut cursors: Vec<Cursor> = paths.iter().map(|_| Cursor { seq: None, len: 0 }).collect();
    // (Inline reads replace these with one cursor per segment of the pass.)
    let before = engine.hidden_layers().to_vec();
    if let Read::Hidden(layers) = what {
        engine.set_hidden_layers(layers)?;
    }
    let result = match probe {
        Probe::Inline => read_inline(engine, &mut cache, paths, what, &mut cursors),
        Probe::Fork(tokens) => read_forked(engine, &mut cache, paths, tokens, what, &mut cursors),
    };
    for c in cursors {
        if let Some(seq) = c.seq {
            engine.free(seq);
        }
    }
    engine
        .set_hidden_layers(&before)
        .expect("the engine's own setting is valid");
    result
}

/// Where one row of an inline read comes from.
enum Row {
    /// This output row of the pass.
    Output(usize),
    /// The path's previous row again (an empty step reads where the one before did).
    Repeat,
}

/// A run of one path's stream computed in one entry of the pass: from `start` (a fork of a
/// cached sequence truncated there, or a new sequence at 0) to `end`, reading at `reads`.
struct Segment {
    path: usize,
    start: usize,
    end: usize,
    /// Offsets into the segment's tokens.
    reads: Vec<u32>,
}

/// Inline reads in one pass: each path's stream is cut into segments wherever the prefix
/// cache lets it skip ahead (a path the policy just wrote is one token per step, each step a
/// fork of the cached sequence), and every segment of every path is one entry of a single
/// forward pass. A path no cache entry covers is one segment from its first token. The
/// sequences go into `cursors` (one per segment) for the caller to free.
fn read_inline(
    engine: &mut Engine,
    cache: &mut Option<&mut PrefixCache>,
    paths: &[PathLayout],
    what: &Read,
    cursors: &mut Vec<Cursor>,
) -> Result<Vec<PathReadout>, ModelError> {
    cursors.clear();
    let mut segments: Vec<Segment> = Vec::new();
    let mut rows: Vec<Vec<Row>> = paths.iter().map(|_| Vec::new()).collect();
    let mut out_rows = 0usize;
    for (i, p) in paths.iter().enumerate() {
        // Tokens the path's current segment reaches (0: none yet).
        let mut pos = 0usize;
        let mut current: Option<usize> = None;
        for round in 0..p.step_ends.len() {
            let (needed, end) = (p.read_at[round], p.step_ends[round]);
            if needed < pos {
                // Only an empty step reads where the previous one did.
                if round > 0 && p.read_at[round - 1] == needed {
                    rows[i].push(Row::Repeat);
                    continue;
                }
                return Err(ModelError::InvalidRequest {
                    field: "read_at",
                    reason: format!("step {round} reads position {needed}, already passed"),
                });
            }
            // Skip ahead through the cache when it holds more of the stream than the current
            // segment would compute: everything before the read (which must be computed), a
            // longer cached sequence truncated back to it.
            let hit = cache
                .as_deref_mut()
                .and_then(|c| c.lookup_within(&p.tokens[..end], end))
                .map(|(seq, len)| (seq, len.min(needed)))
                .filter(|&(_, len)| len > pos);
            if let Some((seq, len)) = hit {
                let fork = engine.fork(seq)?;
                cursors.push(Cursor {
                    seq: Some(fork),
                    len,
                });
                engine.truncate(fork, len)?;
                segments.push(Segment {
                    path: i,
                    start: len,
                    end: len,
                    reads: Vec::new(),
                });
                current = Some(segments.len() - 1);
            } else if current.is_none() {
                cursors.push(Cursor {
                    seq: Some(engine.new_sequence()),
                    len: 0,
                });
                segments.push(Segment {
                    path: i,
                    start: 0,
                    end: 0,
                    reads: Vec::new(),
                });
                current = Some(segments.len() - 1);
            }
            let seg = &mut segments[current.expect("set above")];
            seg.end = seg.end.max(end);
            seg.reads.push((needed - seg.start) as u32);
            pos = end;
            rows[i].push(Row::Output(out_rows));
            out_rows += 1;
        }
    }
    // Output rows come entry by entry, in segment order: renumber the planned rows, which
    // were counted path by path (the same order, as each path's segments are consecutive).
    let entries: Vec<ForwardEntry<'_>> = segments
        .iter()
        .zip(cursors.iter())
        .map(|(seg, c)| {
            let tokens = &paths[seg.path].tokens[seg.start..seg.end];
            let seq = c.seq.expect("every segment has its sequence");
            match what {
                Read::Logits(_) => ForwardEntry::logits_at(seq, tokens, &seg.reads),
                Read::Hidden(_) => ForwardEntry::hidden_at(seq, tokens, &seg.reads),
            }
        })
        .collect();
    let (vocab, width) = row_sizes(engine, what);
    let outputs = if entries.is_empty() {
        None
    } else {
        Some(engine.forward_at(&entries)?)
    };
    let mut out = empty_readouts(paths);
    for seg in &segments {
        out[seg.path].tokens_computed += (seg.end - seg.start) as u64;
    }
    for (i, plan) in rows.into_iter().enumerate() {
        for row in plan {
            let value = match (row, &outputs) {
                (Row::Output(r), Some(o)) => take_row(o.logits, o.hidden, r, what, vocab, width),
                (Row::Repeat, _) => out[i]
                    .rows
                    .last()
                    .cloned()
                    .expect("a previous step was read"),
                (Row::Output(_), None) => unreachable!("a planned row means a pass ran"),
            };
            out[i].rows.push(value);
        }
    }
    Ok(out)
}

/// Fork probes, step by step with all paths in the same passes: each path's main sequence is
/// brought to the end of the step (from the cache where it can), then a fork of it gets the
/// probe and is read and freed, so later steps never see the probe.
fn read_forked(
    engine: &mut Engine,
    cache: &mut Option<&mut PrefixCache>,
    paths: &[PathLayout],
    probe_tokens: &[u32],
    what: &Read,
    cursors: &mut [Cursor],
) -> Result<Vec<PathReadout>, ModelError> {
    let mut out = empty_readouts(paths);
    let rounds = paths.iter().map(|p| p.step_ends.len()).max().unwrap_or(0);
    let (vocab, width) = row_sizes(engine, what);
    for round in 0..rounds {
        // Phase 1: bring every path's main sequence to the end of this step.
        let mut appends: Vec<(usize, usize)> = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let Some(&end) = p.step_ends.get(round) else {
                continue;
            };
            let c = &mut cursors[i];
            if let Some(cache) = cache.as_deref_mut() {
                // The longest cached prefix of the stream up to this step's end is forked.
                if let Some((seq, len)) = cache.lookup_within(&p.tokens[..end], end) {
                    if len > c.len {
                        let fork = engine.fork(seq)?;
                        if let Some(old) = c.seq.replace(fork) {
                            engine.free(old);
                        }
                        c.len = len;
                    }
                }
            }
            if c.seq.is_none() {
                c.seq = Some(engine.new_sequence());
            }
            if c.len < end {
                appends.push((i, end));
            }
        }
        if !appends.is_empty() {
            let entries: Vec<ForwardEntry<'_>> = appends
                .iter()
                .map(|&(i, end)| {
                    let c = &cursors[i];
                    ForwardEntry::hidden_at(c.seq.expect("set"), &paths[i].tokens[c.len..end], &[])
                })
                .collect();
            engine.forward_at(&entries)?;
            for &(i, end) in &appends {
                out[i].tokens_computed += (end - cursors[i].len) as u64;
                cursors[i].len = end;
            }
        }
        // Phase 2: fork each main sequence, append the probe, read, free.
        let live: Vec<usize> = (0..paths.len())
            .filter(|&i| round < paths[i].step_ends.len())
            .collect();
        let mut forks = Vec::with_capacity(live.len());
        for &i in &live {
            match engine.fork(cursors[i].seq.expect("advanced in phase 1")) {
                Ok(f) => forks.push(f),
                Err(e) => {
                    forks.into_iter().for_each(|f| engine.free(f));
                    return Err(e);
                }
            }
        }
        let last = [probe_tokens.len() as u32 - 1];
        let entries: Vec<ForwardEntry<'_>> = forks
            .iter()
            .map(|&f| match what {
                Read::Logits(_) => ForwardEntry::logits_at(f, probe_tokens, &last),
                Read::Hidden(_) => ForwardEntry::hidden_at(f, probe_tokens, &last),
            })
            .collect();
        let result = engine.forward_at(&entries).map(|o| {
            (0..live.len())
                .map(|j| take_row(o.logits, o.hidden, j, what, vocab, width))
                .collect::<Vec<_>>()
        });
        forks.into_iter().for_each(|f| engine.free(f));
        for (&i, row) in live.iter().zip(result?) {
            out[i].rows.push(row);
            out[i].tokens_computed += probe_tokens.len() as u64;
        }
    }
    Ok(out)
}

/// One empty readout per path.
fn empty_readouts(paths: &[PathLayout]) -> Vec<PathReadout> {
    paths
        .iter()
        .map(|p| PathReadout {
            rows: Vec::with_capacity(p.step_ends.len()),
            tokens_computed: 0,
        })
        .collect()
}

/// The vocabulary size and the width of one hidden-state row (`d_model` per layer read).
fn row_sizes(engine: &Engine, what: &Read) -> (usize, usize) {
    let width = match what {
        Read::Hidden(layers) => engine.config().d_model * layers.len(),
        Read::Logits(_) => 0,
    };
    (engine.config().vocab_size, width)
}

fn take_row(
    logits: &[f32],
    hidden: &[f32],
    row: usize,
    what: &Read,
    vocab: usize,
    width: usize,
) -> Vec<f32> {
    match what {
        Read::Logits(ids) => {
            let r = &logits[row * vocab..(row + 1) * vocab];
            ids.iter().map(|&id| r[id as usize]).collect()
        }
        Read::Hidden(_) => hidden[row * width..(row + 1) * width].to_vec(),
    }
}

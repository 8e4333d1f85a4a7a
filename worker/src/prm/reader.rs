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
        Probe::Fork(_) => read_with(engine, &mut cache, paths, probe, what, &mut cursors),
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
    let width = match what {
        Read::Hidden(layers) => engine.config().d_model * layers.len(),
        Read::Logits(_) => 0,
    };
    let vocab = engine.config().vocab_size;
    let outputs = if entries.is_empty() {
        None
    } else {
        Some(engine.forward_at(&entries)?)
    };
    let mut out: Vec<PathReadout> = paths
        .iter()
        .map(|p| PathReadout {
            rows: Vec::with_capacity(p.step_ends.len()),
            tokens_computed: 0,
        })
        .collect();
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

/// Step by step, all paths in the same passes: what fork probes need (the probe goes on a fork
/// of each path after each step); it reads inline too.
fn read_with(
    engine: &mut Engine,
    cache: &mut Option<&mut PrefixCache>,
    paths: &[PathLayout],
    probe: &Probe,
    what: &Read,
    cursors: &mut [Cursor],
) -> Result<Vec<PathReadout>, ModelError> {
    let mut out: Vec<PathReadout> = paths
        .iter()
        .map(|p| PathReadout {
            rows: Vec::with_capacity(p.step_ends.len()),
            tokens_computed: 0,
        })
        .collect();
    let rounds = paths.iter().map(|p| p.step_ends.len()).max().unwrap_or(0);
    let width = match what {
        Read::Hidden(layers) => engine.config().d_model * layers.len(),
        Read::Logits(_) => 0,
    };
    let vocab = engine.config().vocab_size;
    for round in 0..rounds {
        // Phase 1: bring every path's main sequence to the end of this step, reading inline.
        // (path, read offset into the appended tokens, or None)
        let mut appends: Vec<(usize, usize, Option<u32>)> = Vec::new();
        // Paths whose inline read repeats the previous position (an empty step).
        let mut repeats: Vec<usize> = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let Some(&end) = p.step_ends.get(round) else {
                continue;
            };
            // The longest prefix the cache may supply: everything before the inline read
            // (which must be computed), or the whole stream up to the fork.
            let (needed, usable_max) = match probe {
                Probe::Inline => (p.read_at[round], p.read_at[round]),
                Probe::Fork(_) => (end.saturating_sub(1), end),
            };
            let c = &mut cursors[i];
            if matches!(probe, Probe::Inline) && needed < c.len {
                // Only an empty step reads where the previous one did.
                if round > 0 && p.read_at[round - 1] == needed {
                    repeats.push(i);
                    continue;
                }
                return Err(ModelError::InvalidRequest {
                    field: "read_at",
                    reason: format!("step {round} reads position {needed}, already passed"),
                });
            }
            if let Some(cache) = cache.as_deref_mut() {
                // A cached sequence that holds more (a finished solution, whole) is forked and
                // truncated back to what is usable.
                if let Some((seq, len)) = cache.lookup_within(&p.tokens[..end], end) {
                    let usable = len.min(usable_max);
                    if usable > c.len {
                        let fork = engine.fork(seq)?;
                        if let Some(old) = c.seq.replace(fork) {
                            engine.free(old);
                        }
                        engine.truncate(fork, usable)?;
                        c.len = usable;
                    }
                }
            }
            if c.seq.is_none() {
                c.seq = Some(engine.new_sequence());
            }
            if c.len < end {
                let read = matches!(probe, Probe::Inline).then(|| (needed - c.len) as u32);
                appends.push((i, end, read));
            }
        }
        if !appends.is_empty() {
            let reads: Vec<[u32; 1]> = appends.iter().map(|a| [a.2.unwrap_or(0)]).collect();
            let entries: Vec<ForwardEntry<'_>> = appends
                .iter()
                .zip(&reads)
                .map(|(&(i, end, read), at)| {
                    let c = &cursors[i];
                    let tokens = &paths[i].tokens[c.len..end];
                    let at: &[u32] = if read.is_some() { at } else { &[] };
                    match what {
                        Read::Logits(_) => ForwardEntry::logits_at(c.seq.expect("set"), tokens, at),
                        Read::Hidden(_) => ForwardEntry::hidden_at(c.seq.expect("set"), tokens, at),
                    }
                })
                .collect();
            let outputs = engine.forward_at(&entries)?;
            let mut row = 0;
            for &(i, end, read) in &appends {
                out[i].tokens_computed += (end - cursors[i].len) as u64;
                cursors[i].len = end;
                if read.is_some() {
                    out[i].rows.push(take_row(
                        outputs.logits,
                        outputs.hidden,
                        row,
                        what,
                        vocab,
                        width,
                    ));
                    row += 1;
                }
            }
        }
        for i in repeats {
            let last = out[i]
                .rows
                .last()
                .cloned()
                .expect("a previous step was read");
            out[i].rows.push(last);
        }
        // Phase 2 (fork probes): fork each main sequence, append the probe, read, free.
        if let Probe::Fork(probe_tokens) = probe {
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
    }
    Ok(out)
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

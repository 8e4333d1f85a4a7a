//! Traces: one JSON line per finished cell (question × strategy × budget), appended as cells
//! finish, so a run can be killed at any moment and resumed from what is on disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What one cell cost, named as `arbor search --json` names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TraceCosts {
    /// Tokens the policy generated.
    pub(crate) generated_tokens: u64,
    /// Prompt tokens the policy's engine computed (not taken from its prefix cache).
    pub(crate) prompt_tokens_computed: u64,
    /// Prompt tokens it took from its prefix cache.
    pub(crate) prompt_tokens_reused: u64,
    /// Tokens the process reward model computed (0 for the log-prob scorer).
    pub(crate) prm_tokens_computed: u64,
    /// Policy calls (each one batched forward pass sequence).
    pub(crate) policy_calls: u64,
    /// Nodes in the tree, root included.
    pub(crate) nodes: u64,
    /// Wall-clock time in milliseconds.
    pub(crate) wall_ms: u64,
}

impl TraceCosts {
    /// Every token a model computed for this cell: generated, prompt and reward-model tokens.
    pub(crate) fn total_computed(&self) -> u64 {
        self.generated_tokens + self.prompt_tokens_computed + self.prm_tokens_computed
    }
}

/// One distinct final answer a cell's search reached (answers grouped by equivalence).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TraceCandidate {
    /// The answer as first written.
    pub(crate) answer: String,
    /// How many final answers were equivalent to it.
    pub(crate) votes: u32,
    /// The sum of their values (what a weighted vote adds up).
    pub(crate) weight: f64,
    /// The highest of their values, when any was scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) best: Option<f64>,
    /// Their summed path shares (`share_vote`; for samples, votes / all votes).
    #[serde(default)]
    pub(crate) share: f64,
    /// Their summed share × value (`weighted_share_vote`).
    #[serde(default)]
    pub(crate) share_weight: f64,
    /// Whether it equals the gold answer.
    pub(crate) correct: bool,
}

impl TraceCandidate {
    /// `found` as a trace records it, marked against the gold answer.
    pub(crate) fn new(found: &arbor_search::AnswerTally, gold: &str) -> TraceCandidate {
        TraceCandidate {
            answer: found.answer.raw.clone(),
            votes: found.votes,
            weight: found.weight,
            best: found.best_value,
            share: found.share,
            share_weight: found.share_weight,
            correct: arbor_search::equivalent(&found.answer.raw, gold),
        }
    }
}

/// One finished cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TraceRecord {
    /// The question's index in the dataset.
    pub(crate) index: usize,
    /// The question text.
    pub(crate) question: String,
    /// The gold answer (never shown to the search).
    pub(crate) gold: String,
    /// Strategy name as on the command line (`best-of-n`, ...).
    pub(crate) strategy: String,
    /// The generated-token budget.
    pub(crate) budget: u64,
    /// The search seed (for derived cells: the seed of the question's sample run).
    pub(crate) seed: u64,
    /// The chosen answer as written, if any.
    pub(crate) answer: Option<String>,
    /// Its normalised key.
    pub(crate) answer_key: Option<String>,
    /// Its value (path score), when scored.
    pub(crate) value: Option<f64>,
    /// Whether it equals the gold answer after normalisation.
    pub(crate) correct: bool,
    /// What the cell cost.
    pub(crate) costs: TraceCosts,
    /// Why the search stopped (`derived` for cells read off a sample run).
    pub(crate) termination: String,
    /// True when the cell was read off the question's one large sample run instead of searched.
    #[serde(default)]
    pub(crate) derived_from_samples: bool,
    /// For derived cells: how many samples fit the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) samples: Option<u32>,
    /// Every distinct final answer the cell reached, most votes first (absent in traces
    /// written before they were recorded, and from a coordinator, whose replies carry only
    /// the chosen one): whether the gold answer was found at all, and which rule would have
    /// chosen it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) candidates: Option<Vec<TraceCandidate>>,
    /// The chosen reasoning path, one entry per step.
    pub(crate) path: Vec<String>,
}

impl TraceRecord {
    /// The cell this record fills.
    pub(crate) fn key(&self) -> (usize, String, u64) {
        (self.index, self.strategy.clone(), self.budget)
    }
}

/// The complete lines of a JSONL file, parsed; `None` when the file does not exist.
///
/// A last line without its newline was cut by a kill mid-write: it is reported in the returned
/// byte length (the end of the last complete line) and skipped with a warning. Any other bad
/// line is an error naming the file and line.
pub(crate) fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Option<(Vec<T>, u64)>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        eprintln!(
            "arbor: warning: {}: ignoring a truncated last line ({} bytes cut by an interrupted write)",
            path.display(),
            bytes.len() - complete
        );
    }
    let text = std::str::from_utf8(&bytes[..complete])
        .with_context(|| format!("{}: not UTF-8", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a trace line", path.display(), i + 1))?;
        records.push(record);
    }
    Ok(Some((records, complete as u64)))
}

/// Appends one JSON line per record, each with a single write, so a kill loses at most the line
/// being written (which [`read_jsonl`] then skips).
#[derive(Debug)]
pub(crate) struct JsonlAppender {
    /// Opened for appending; every record is one `write_all` of a whole line.
    file: File,
}

impl JsonlAppender {
    /// Opens `path` for appending, first cutting off a truncated last line (ending at byte
    /// `complete_len`, as [`read_jsonl`] found) so the next line does not glue onto it.
    pub(crate) fn open(path: &Path, complete_len: Option<u64>) -> Result<JsonlAppender> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if let Some(len) = complete_len {
            let on_disk = file.metadata()?.len();
            if on_disk < len {
                bail!("{} shrank while being read", path.display());
            }
            if on_disk > len {
                file.set_len(len).with_context(|| {
                    format!("cutting the truncated line off {}", path.display())
                })?;
            }
        }
        Ok(JsonlAppender { file })
    }

    /// Writes `record` as one line and flushes it.
    pub(crate) fn append<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: usize) -> TraceRecord {
        TraceRecord {
            index,
            question: format!("q{index}"),
            gold: "7".into(),
            strategy: "mcts".into(),
            budget: 256,
            seed: 1,
            answer: Some("7".into()),
            answer_key: Some("7".into()),
            value: Some(0.5),
            correct: true,
            costs: TraceCosts {
                generated_tokens: 10,
                ..TraceCosts::default()
            },
            termination: "completed".into(),
            derived_from_samples: false,
            samples: None,
            candidates: None,
            path: vec!["step".into(), "The answer is 7.".into()],
        }
    }

    #[test]
    fn a_truncated_last_line_is_skipped_and_cut_before_appending() {
        let dir = std::env::temp_dir().join(format!("arbor-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("traces.jsonl");
        let _ = std::fs::remove_file(&path);
        assert!(read_jsonl::<TraceRecord>(&path).unwrap().is_none());
        let mut out = JsonlAppender::open(&path, None).unwrap();
        out.append(&record(0)).unwrap();
        out.append(&record(1)).unwrap();
        drop(out);
        // A kill in the middle of the third write.
        let line = serde_json::to_string(&record(2)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&line.as_bytes()[..line.len() / 2]).unwrap();
        drop(f);

        let (records, complete) = read_jsonl::<TraceRecord>(&path).unwrap().unwrap();
        assert_eq!(records, vec![record(0), record(1)]);
        assert!(complete < std::fs::metadata(&path).unwrap().len());
        let mut out = JsonlAppender::open(&path, Some(complete)).unwrap();
        out.append(&record(3)).unwrap();
        drop(out);
        let (records, _) = read_jsonl::<TraceRecord>(&path).unwrap().unwrap();
        assert_eq!(
            records.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![0, 1, 3]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_complete_line_is_an_error_naming_the_line() {
        let dir = std::env::temp_dir().join(format!("arbor-trace-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("traces.jsonl");
        let good = serde_json::to_string(&record(0)).unwrap();
        std::fs::write(&path, format!("{good}\n{{\"index\": 1}}\n{good}\n")).unwrap();
        let err = read_jsonl::<TraceRecord>(&path).unwrap_err();
        assert!(
            format!("{err:#}").contains("traces.jsonl:2: not a trace line"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

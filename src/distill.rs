//! `arbor distill`: the correct reasoning paths that searches found, as chat-format fine-tuning
//! examples (the rejection-sampling / STaR step: fine-tune the policy on what search found).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use arbor_worker::STEP_BY_STEP_SYSTEM_PROMPT;
use serde_json::json;

use crate::eval::trace::{read_jsonl, TraceRecord};

#[derive(clap::Args, Debug)]
pub(crate) struct DistillArgs {
    /// An `arbor eval` output folder, or a traces.jsonl file.
    #[arg(long)]
    traces: PathBuf,
    /// Where to write the examples, one JSON object per line.
    #[arg(long)]
    out: PathBuf,
    /// System message of every example; default: the step-by-step prompt the searches used.
    #[arg(long)]
    system: Option<String>,
}

/// What distilling kept and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DistillStats {
    /// Examples written.
    pub(crate) examples: usize,
    /// Correct paths dropped as duplicates of an earlier one.
    pub(crate) duplicates: usize,
    /// Cells skipped as wrong or without a path.
    pub(crate) skipped: usize,
}

/// The reasoning as the assistant writes it: steps trimmed and separated by blank lines.
fn reasoning(path: &[String]) -> String {
    path.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// What makes two reasonings the same: equal up to whitespace.
fn dedup_key(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One example per distinct (question, reasoning) among the correct cells of `records`, in
/// trace order; `found_by` in the metadata counts the cells that found the same reasoning.
pub(crate) fn distill(
    records: &[TraceRecord],
    system: &str,
) -> (Vec<serde_json::Value>, DistillStats) {
    let mut examples: Vec<serde_json::Value> = Vec::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut stats = DistillStats {
        examples: 0,
        duplicates: 0,
        skipped: 0,
    };
    for r in records {
        let text = reasoning(&r.path);
        if !r.correct || text.is_empty() {
            stats.skipped += 1;
            continue;
        }
        let key = (r.question.clone(), dedup_key(&text));
        if let Some(&at) = seen.get(&key) {
            stats.duplicates += 1;
            let found_by = &mut examples[at]["metadata"]["found_by"];
            *found_by = json!(found_by.as_u64().unwrap_or(1) + 1);
            continue;
        }
        seen.insert(key, examples.len());
        examples.push(json!({
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": r.question},
                {"role": "assistant", "content": text},
            ],
            "metadata": {
                "index": r.index,
                "strategy": r.strategy,
                "budget": r.budget,
                "seed": r.seed,
                "answer": r.answer,
                "gold": r.gold,
                "score": r.value,
                "costs": r.costs,
                "derived_from_samples": r.derived_from_samples,
                "found_by": 1,
            },
        }));
    }
    stats.examples = examples.len();
    (examples, stats)
}

/// Runs `arbor distill`.
pub(crate) fn run(args: DistillArgs) -> Result<()> {
    let path = if args.traces.is_dir() {
        args.traces.join("traces.jsonl")
    } else {
        args.traces.clone()
    };
    let Some((records, _)) = read_jsonl::<TraceRecord>(&path)? else {
        bail!("no traces at {}", path.display());
    };
    let system = args.system.as_deref().unwrap_or(STEP_BY_STEP_SYSTEM_PROMPT);
    let (examples, stats) = distill(&records, system);
    let mut text = String::new();
    for e in &examples {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    // Written whole, then renamed: a reader never sees half a file.
    let tmp = args.out.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "arbor distill: {} examples to {} ({} duplicate paths merged, {} wrong or empty cells skipped, of {} cells)",
        stats.examples,
        args.out.display(),
        stats.duplicates,
        stats.skipped,
        records.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace line as `arbor eval` writes it.
    fn line(index: usize, strategy: &str, correct: bool, path: &[&str]) -> String {
        json!({
            "index": index, "question": format!("Question {index}?"), "gold": "72",
            "strategy": strategy, "budget": 256, "seed": 9,
            "answer": if correct { "72" } else { "70" }, "answer_key": "72", "value": 0.8,
            "correct": correct,
            "costs": {"generated_tokens": 120, "prompt_tokens_computed": 90,
                      "prompt_tokens_reused": 300, "prm_tokens_computed": 0,
                      "policy_calls": 3, "nodes": 4, "wall_ms": 1500},
            "termination": "completed", "derived_from_samples": strategy != "mcts",
            "path": path,
        })
        .to_string()
    }

    #[test]
    fn writes_one_chat_example_per_distinct_correct_path() {
        let dir = std::env::temp_dir().join(format!("arbor-distill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let traces = [
            line(
                0,
                "mcts",
                true,
                &["48 / 2 = 24.\n", "48 + 24 = 72.", "The answer is 72."],
            ),
            // The same reasoning up to whitespace, found by another strategy.
            line(
                0,
                "best-of-n",
                true,
                &["48 / 2 = 24.", "48 +  24 = 72.", " The answer is 72. "],
            ),
            line(
                0,
                "majority",
                false,
                &["48 + 22 = 70.", "The answer is 70."],
            ),
            line(
                1,
                "mcts",
                true,
                &["48 / 2 = 24.", "48 + 24 = 72.", "The answer is 72."],
            ),
            line(1, "beam", true, &[]),
        ];
        std::fs::write(dir.join("traces.jsonl"), traces.join("\n") + "\n").unwrap();
        let out = dir.join("sft.jsonl");
        run(DistillArgs {
            traces: dir.clone(),
            out: out.clone(),
            system: None,
        })
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let examples: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        // Question 0's path once (found twice), question 1's once; the wrong and empty ones never.
        assert_eq!(examples.len(), 2, "{text}");
        let first = &examples[0];
        let messages = first["messages"].as_array().unwrap();
        let roles: Vec<&str> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(messages[0]["content"], STEP_BY_STEP_SYSTEM_PROMPT);
        assert_eq!(messages[1]["content"], "Question 0?");
        assert_eq!(
            messages[2]["content"],
            "48 / 2 = 24.\n\n48 + 24 = 72.\n\nThe answer is 72."
        );
        assert_eq!(first["metadata"]["strategy"], "mcts");
        assert_eq!(first["metadata"]["found_by"], 2);
        assert_eq!(first["metadata"]["score"], 0.8);
        assert_eq!(first["metadata"]["costs"]["generated_tokens"], 120);
        assert_eq!(examples[1]["messages"][1]["content"], "Question 1?");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

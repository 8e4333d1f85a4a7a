//! `run.json`: the settings an output folder was made with. A run may resume into a folder only
//! with the same settings; it may add questions, strategies and budgets.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Version of the `run.json` and trace formats.
const FORMAT_VERSION: u32 = 1;

/// Everything that changes what a cell means; equal in every run that writes into one folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    /// The run seed; each question's seed derives from it and the question's index.
    pub(crate) seed: u64,
    /// The reward model's name (`--prm`).
    pub(crate) prm: String,
    /// The model file or folder (canonical path), or `None` for the default model.
    pub(crate) model: Option<String>,
    /// Sampling temperature of reasoning steps.
    pub(crate) temperature: f32,
    /// Most tokens in one reasoning step.
    pub(crate) max_step_tokens: u32,
    /// Beams of beam search and DVTS.
    pub(crate) n: u32,
    /// Expected tokens of one sampled solution: without sample reuse, best-of-N at budget B
    /// samples N = B / this.
    pub(crate) sample_tokens: u32,
    /// Samples per search of a sampling run.
    pub(crate) sample_chunk: u32,
    /// Whether sample strategies are read off one sampling run per question.
    pub(crate) sample_reuse: bool,
    /// Whether tree searches get widths the budget pays for ([`super::tree_widths`]) instead of
    /// `n` and the strategies' defaults. Runs made before the setting existed used fixed widths.
    #[serde(default)]
    pub(crate) scaled_trees: bool,
    /// With scaled trees, the share of the budget's solutions MCTS starts with as independent
    /// root samples (`--root-share`); runs made before the setting existed had none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) root_share: f64,
    /// Fewest steps before a final answer counts (`--min-answer-depth`); runs made before the
    /// setting existed accepted answers at any depth.
    #[serde(default = "one")]
    pub(crate) min_answer_depth: u32,
    /// The system prompt (`--system`); `None`: Arbor's default step-by-step prompt as of the
    /// binary that made the folder.
    #[serde(default)]
    pub(crate) system: Option<String>,
    /// The tree searches' answer rule (`--tree-answer`); `None`: each strategy's default as of
    /// the binary that made the folder. Every rule's accuracy can be read off the traces
    /// (summary.md), whichever one made the cells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tree_answer: Option<crate::search_cmd::TreeAnswer>,
}

fn one() -> u32 {
    1
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// One invocation that wrote into the folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Invocation {
    /// The dataset file as given.
    pub(crate) dataset: String,
    /// First question.
    pub(crate) offset: usize,
    /// Questions asked for (`None`: to the end).
    pub(crate) limit: Option<usize>,
    /// Strategies asked for.
    pub(crate) strategies: Vec<String>,
    /// Budgets asked for.
    pub(crate) budgets: Vec<u64>,
    /// `arbor --version` of the binary.
    pub(crate) arbor: String,
}

/// The contents of `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunFile {
    /// [`FORMAT_VERSION`] of the writer.
    pub(crate) version: u32,
    /// What every cell in the folder was made with.
    pub(crate) settings: Settings,
    /// Every invocation so far, oldest first.
    pub(crate) runs: Vec<Invocation>,
}

/// Checks `settings` against the folder's `run.json` (if any) and records `invocation` there.
pub(crate) fn record(dir: &Path, settings: &Settings, invocation: Invocation) -> Result<()> {
    let path = dir.join("run.json");
    let mut file = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let existing: RunFile = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an arbor eval run file", path.display()))?;
            check_compatible(&existing, settings)
                .with_context(|| format!("cannot resume into {}", dir.display()))?;
            existing
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => RunFile {
            version: FORMAT_VERSION,
            settings: settings.clone(),
            runs: Vec::new(),
        },
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    file.runs.push(invocation);
    let tmp = dir.join("run.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// An error listing every setting that differs, unless none does.
pub(crate) fn check_compatible(existing: &RunFile, settings: &Settings) -> Result<()> {
    if existing.version != FORMAT_VERSION {
        bail!(
            "it was written by format version {}, this arbor writes {FORMAT_VERSION}; use a new --out",
            existing.version
        );
    }
    // Through text, as run.json holds them: `to_value` would widen f32 0.7 to 0.699999988.
    let old: serde_json::Value = serde_json::from_str(&serde_json::to_string(&existing.settings)?)?;
    let new: serde_json::Value = serde_json::from_str(&serde_json::to_string(settings)?)?;
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        bail!("settings are not objects");
    };
    let differences: Vec<String> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, v)| {
            let was = old.get(k).map_or("nothing".to_owned(), ToString::to_string);
            format!("{k} was {was}, now {v}")
        })
        .collect();
    if !differences.is_empty() {
        bail!(
            "it was made with other settings ({}). Only --limit, --offset, --strategies and \
             --budgets may change when resuming; use the old settings or another --out",
            differences.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            seed: 1,
            prm: "logprob".into(),
            model: None,
            temperature: 0.7,
            max_step_tokens: 128,
            n: 8,
            sample_tokens: 192,
            sample_chunk: 8,
            sample_reuse: true,
            scaled_trees: true,
            root_share: 0.0,
            min_answer_depth: 1,
            system: None,
            tree_answer: None,
        }
    }

    fn invocation(budgets: Vec<u64>) -> Invocation {
        Invocation {
            dataset: "d.jsonl".into(),
            offset: 0,
            limit: Some(3),
            strategies: vec!["mcts".into()],
            budgets,
            arbor: "test".into(),
        }
    }

    #[test]
    fn resuming_needs_equal_settings_and_may_extend_the_grid() {
        let dir = std::env::temp_dir().join(format!("arbor-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("run.json"));
        record(&dir, &settings(), invocation(vec![256])).unwrap();
        // More budgets, same settings: fine, and remembered.
        record(&dir, &settings(), invocation(vec![256, 512])).unwrap();
        let file: RunFile =
            serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
        assert_eq!(file.runs.len(), 2);
        assert_eq!(file.runs[1].budgets, vec![256, 512]);

        let mut other = settings();
        other.temperature = 0.9;
        other.seed = 2;
        let err = format!(
            "{:#}",
            record(&dir, &other, invocation(vec![256])).unwrap_err()
        );
        assert!(err.contains("cannot resume into"), "{err}");
        assert!(err.contains("temperature was 0.7, now 0.9"), "{err}");
        assert!(err.contains("seed was 1, now 2"), "{err}");
        // The refused run left the file as it was.
        let file: RunFile =
            serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
        assert_eq!(file.runs.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

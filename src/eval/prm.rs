//! Which process reward model values the steps: any PRM `arbor search --prm` takes.
//!
//! `logprob` (the default; `log_prob` too) is the policy's own confidence, computed inside the
//! search at no token cost. `judge` and `rollout` run on the policy's engine; a value head
//! (`FILE.safetensors`, from `arbor prm train`) or a JSON file with any PRM configuration (e.g.
//! `{"kind": "classifier", "model": "Qwen2.5-Math-PRM-7B/"}`) name their own.

use anyhow::{Context, Result};
use arbor_search::ScorerChoice;
use arbor_worker::prm::{AnyScorer, PrmConfig};
use arbor_worker::LocalWorker;
use sha2::{Digest, Sha256};

/// The reward model to search with, as given on the command line.
#[derive(Debug, Clone)]
pub(crate) struct PrmChoice {
    /// The spelling given (`logprob`, `judge`, a file).
    spec: String,
    /// What it means.
    config: PrmConfig,
}

/// A built reward model, passed to every search of a run.
pub(crate) type Prm = AnyScorer;

impl PrmChoice {
    /// Parses `--prm`: a kind's name, a value head file or a JSON configuration file.
    pub(crate) fn parse(spec: &str) -> Result<PrmChoice> {
        let kind = if spec == "logprob" { "log_prob" } else { spec };
        Ok(PrmChoice {
            spec: spec.to_owned(),
            config: crate::prm_cmd::parse_prm(kind)?,
        })
    }

    /// Its name in `run.json`: the spelling given, and for a file the start of its SHA-256, so
    /// a folder never mixes cells of two different heads that shared a file name.
    pub(crate) fn name(&self) -> Result<String> {
        let path = std::path::Path::new(&self.spec);
        if !path.is_file() {
            return Ok(self.spec.clone());
        }
        let bytes = std::fs::read(path).with_context(|| format!("--prm {}", self.spec))?;
        let digest = Sha256::digest(&bytes);
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{} (sha256 {hex}…)", self.spec))
    }

    /// Whether it is the policy's own confidence, the one scorer a coordinator's workers serve.
    pub(crate) fn is_logprob(&self) -> bool {
        matches!(self.config, PrmConfig::LogProb)
    }

    /// The `--prm` argument as given.
    pub(crate) fn spec(&self) -> &str {
        &self.spec
    }

    /// Which scorer slot of [`arbor_search::SearchConfig`] it uses: the log-prob scorer is built
    /// into the search; a real reward model is passed in as [`ScorerChoice::Provided`].
    pub(crate) fn scorer_choice(&self) -> ScorerChoice {
        match self.config {
            PrmConfig::LogProb => ScorerChoice::LogProb,
            _ => ScorerChoice::Provided,
        }
    }

    /// Builds the scorer; a reward model that runs on the policy's engine borrows the worker.
    pub(crate) fn build(&self, worker: &LocalWorker) -> Result<Prm> {
        arbor_worker::prm::build(&self.config, worker)
            .with_context(|| format!("--prm {}", self.spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_search_takes_is_taken() {
        assert_eq!(
            PrmChoice::parse("logprob").unwrap().scorer_choice(),
            ScorerChoice::LogProb
        );
        assert_eq!(
            PrmChoice::parse("log_prob").unwrap().scorer_choice(),
            ScorerChoice::LogProb
        );
        for kind in ["judge", "rollout"] {
            let c = PrmChoice::parse(kind).unwrap();
            assert_eq!(c.scorer_choice(), ScorerChoice::Provided);
            assert_eq!(c.name().unwrap(), kind);
        }
        let dir = std::env::temp_dir().join(format!("arbor-eval-prm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("prm.json");
        std::fs::write(&json, r#"{"kind": "rollout", "rollouts": 2}"#).unwrap();
        let c = PrmChoice::parse(json.to_str().unwrap()).unwrap();
        assert!(matches!(c.config, PrmConfig::Rollout(ref r) if r.rollouts == 2));
        assert!(
            c.name().unwrap().contains("sha256"),
            "{}",
            c.name().unwrap()
        );
        let err = PrmChoice::parse("oracle").unwrap_err().to_string();
        assert!(err.contains("oracle"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

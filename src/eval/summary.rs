//! The summary of a run, per strategy and budget: accuracy with a Wilson confidence interval and
//! the mean of every cost, written as CSV and as a Markdown table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::trace::TraceRecord;
use crate::search_cmd::Strategy;

/// z for a two-sided 95% interval.
const Z_95: f64 = 1.959_963_984_540_054;

/// One row: every cell of one strategy at one budget.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    /// Strategy name.
    pub(crate) strategy: String,
    /// Generated-token budget.
    pub(crate) budget: u64,
    /// Cells (questions).
    pub(crate) n: u64,
    /// Cells answered correctly.
    pub(crate) correct: u64,
    /// 95% Wilson interval of the accuracy.
    pub(crate) ci: (f64, f64),
    /// Mean generated tokens.
    pub(crate) generated: f64,
    /// Mean prompt tokens computed.
    pub(crate) prompt_computed: f64,
    /// Mean of generated + computed prompt + reward-model tokens.
    pub(crate) total_computed: f64,
    /// Mean wall time in milliseconds.
    pub(crate) wall_ms: f64,
    /// Cells read off a sampling run rather than searched.
    pub(crate) derived: u64,
}

impl Row {
    /// Share of cells answered correctly.
    pub(crate) fn accuracy(&self) -> f64 {
        self.correct as f64 / self.n.max(1) as f64
    }
}

/// The 95% Wilson score interval of `successes` out of `n` (0..1 for no trials).
pub(crate) fn wilson_interval(successes: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (successes as f64, n as f64);
    let p = k / n;
    let z2 = Z_95 * Z_95;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = Z_95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Rank of a strategy name in the command line's order (unknown names last).
fn strategy_rank(name: &str) -> usize {
    use clap::ValueEnum;
    Strategy::value_variants()
        .iter()
        .position(|s| super::strategy_name(*s) == name)
        .unwrap_or(usize::MAX)
}

/// Rows for every (strategy, budget) in `records`, strategies in command-line order, budgets
/// ascending.
pub(crate) fn summarize(records: &[TraceRecord]) -> Vec<Row> {
    let mut groups: BTreeMap<(usize, String, u64), Vec<&TraceRecord>> = BTreeMap::new();
    for r in records {
        groups
            .entry((strategy_rank(&r.strategy), r.strategy.clone(), r.budget))
            .or_default()
            .push(r);
    }
    groups
        .into_iter()
        .map(|((_, strategy, budget), cells)| {
            let n = cells.len() as u64;
            let correct = cells.iter().filter(|c| c.correct).count() as u64;
            let mean = |f: &dyn Fn(&TraceRecord) -> u64| {
                cells.iter().map(|c| f(c) as f64).sum::<f64>() / n as f64
            };
            Row {
                strategy,
                budget,
                n,
                correct,
                ci: wilson_interval(correct, n),
                generated: mean(&|c| c.costs.generated_tokens),
                prompt_computed: mean(&|c| c.costs.prompt_tokens_computed),
                total_computed: mean(&|c| c.costs.total_computed()),
                wall_ms: mean(&|c| c.costs.wall_ms),
                derived: cells.iter().filter(|c| c.derived_from_samples).count() as u64,
            }
        })
        .collect()
}

/// The rows as CSV, one header line first.
pub(crate) fn to_csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "strategy,budget,n,correct,accuracy,ci_low,ci_high,mean_generated_tokens,\
         mean_prompt_tokens_computed,mean_total_computed_tokens,mean_wall_ms,derived_from_samples\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.4},{:.4},{:.4},{:.1},{:.1},{:.1},{:.0},{}",
            r.strategy,
            r.budget,
            r.n,
            r.correct,
            r.accuracy(),
            r.ci.0,
            r.ci.1,
            r.generated,
            r.prompt_computed,
            r.total_computed,
            r.wall_ms,
            r.derived
        );
    }
    out
}

/// The rows as a Markdown table with a short legend.
pub(crate) fn to_markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| strategy | budget | n | accuracy | 95% CI | mean generated | mean prompt computed | mean total computed | mean wall (s) |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mark = if r.derived > 0 { "*" } else { "" };
        let _ = writeln!(
            out,
            "| {}{mark} | {} | {} | {:.1}% ({}/{}) | {:.1}–{:.1}% | {:.0} | {:.0} | {:.0} | {:.1} |",
            r.strategy,
            r.budget,
            r.n,
            100.0 * r.accuracy(),
            r.correct,
            r.n,
            100.0 * r.ci.0,
            100.0 * r.ci.1,
            r.generated,
            r.prompt_computed,
            r.total_computed,
            r.wall_ms / 1000.0
        );
    }
    out.push_str(
        "\nBudget: generated tokens per question. Total computed: generated + prompt tokens the \
         engine computed (prefix-cache hits excluded) + reward-model tokens. 95% CI: Wilson score \
         interval. Wall time is per cell, measured while other cells ran on the same worker \
         (`--concurrency`).\n",
    );
    if rows.iter().any(|r| r.derived > 0) {
        out.push_str(
            "\n\\* Read off one sampling run per question: the longest prefix of complete samples \
             whose generated tokens fit the budget, chosen by the strategy's own rule \
             (`derived_from_samples` in the traces).\n",
        );
    }
    out
}

/// Writes `summary.csv` and `summary.md` into `dir`; returns the Markdown.
pub(crate) fn write(dir: &Path, rows: &[Row]) -> Result<String> {
    let md = to_markdown(rows);
    std::fs::write(dir.join("summary.csv"), to_csv(rows))
        .with_context(|| format!("writing {}", dir.join("summary.csv").display()))?;
    std::fs::write(dir.join("summary.md"), &md)
        .with_context(|| format!("writing {}", dir.join("summary.md").display()))?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::trace::TraceCosts;

    fn check_interval(k: u64, n: u64, expected: (f64, f64)) {
        let (lo, hi) = wilson_interval(k, n);
        assert!(
            (lo - expected.0).abs() < 5e-4 && (hi - expected.1).abs() < 5e-4,
            "{k}/{n}: ({lo}, {hi}) != {expected:?}"
        );
    }

    #[test]
    fn wilson_interval_matches_reference_values() {
        // Reference values from the closed form (e.g. statsmodels' proportion_confint, wilson).
        check_interval(0, 10, (0.0, 0.2775));
        check_interval(5, 10, (0.2366, 0.7634));
        check_interval(10, 10, (0.7225, 1.0));
        check_interval(1, 4, (0.0456, 0.6994));
        check_interval(81, 263, (0.2553, 0.3662));
        check_interval(0, 0, (0.0, 1.0));
    }

    fn cell(strategy: &str, budget: u64, correct: bool, generated: u64) -> TraceRecord {
        TraceRecord {
            index: 0,
            question: "q".into(),
            gold: "1".into(),
            strategy: strategy.into(),
            budget,
            seed: 0,
            answer: None,
            answer_key: None,
            value: None,
            correct,
            costs: TraceCosts {
                generated_tokens: generated,
                prompt_tokens_computed: 10,
                prm_tokens_computed: 1,
                wall_ms: 2000,
                ..TraceCosts::default()
            },
            termination: "completed".into(),
            derived_from_samples: strategy == "majority",
            samples: None,
            path: Vec::new(),
        }
    }

    #[test]
    fn rows_group_by_strategy_and_budget_in_command_line_order() {
        let records = vec![
            cell("majority", 512, true, 400),
            cell("mcts", 512, false, 500),
            cell("majority", 256, false, 200),
            cell("mcts", 512, true, 520),
            cell("majority", 256, true, 240),
        ];
        let rows = summarize(&records);
        let keys: Vec<(&str, u64, u64, u64)> = rows
            .iter()
            .map(|r| (r.strategy.as_str(), r.budget, r.n, r.correct))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("mcts", 512, 2, 1),
                ("majority", 256, 2, 1),
                ("majority", 512, 1, 1)
            ]
        );
        assert_eq!(rows[0].generated, 510.0);
        assert_eq!(rows[0].total_computed, 521.0);
        let csv = to_csv(&rows);
        assert_eq!(csv.lines().count(), 4);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .starts_with("mcts,512,2,1,0.5000,"),
            "{csv}"
        );
        let md = to_markdown(&rows);
        assert!(md.contains("| majority* | 256 | 2 | 50.0% (1/2) |"), "{md}");
        assert!(md.contains("\\* Read off one sampling run"), "{md}");
    }
}

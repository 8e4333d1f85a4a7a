//! The summary of a run, per strategy and budget: accuracy with a Wilson confidence interval and
//! the mean of every cost, written as CSV and as a Markdown table; and each strategy paired
//! with weighted best-of-N on the same questions at the same budget (wins, ties, losses, and a
//! paired bootstrap interval of the accuracy difference).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use arbor_search::{Answer, AnswerSelection, AnswerTally, NodeId};

use super::trace::{TraceCandidate, TraceRecord};
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
    /// Cells that ended with no answer.
    pub(crate) no_answer: u64,
    /// Cells whose search ended `exhausted`.
    pub(crate) exhausted: u64,
    /// Cells among whose final answers the gold answer was, where every cell recorded its
    /// answers (`None` otherwise: older traces, a coordinator's).
    pub(crate) found: Option<u64>,
    /// Cells right under each of [`RULES`] applied to the cell's recorded answers, where every
    /// cell recorded them with their path shares (`None` otherwise).
    pub(crate) by_rule: Option<[u64; RULES.len()]>,
}

/// The answer rules `summary.md` re-applies to each cell's recorded answers, as named in a
/// search config (`final_answer` of MCTS, `answer` of beam and DVTS).
pub(crate) const RULES: [(&str, AnswerSelection); 5] = [
    ("majority", AnswerSelection::Majority),
    ("weighted_vote", AnswerSelection::WeightedVote),
    ("best_value", AnswerSelection::BestValue),
    ("share_vote", AnswerSelection::ShareVote),
    ("weighted_share_vote", AnswerSelection::WeightedShareVote),
];

/// The index of the answer `RULES[rule]` picks among `all`, as a search applies the rule
/// ([`arbor_search::pick_candidate`]; ties: the answer listed first), if any.
fn pick_by_rule(all: &[TraceCandidate], rule: usize) -> Option<usize> {
    let tallied: Vec<AnswerTally> = all
        .iter()
        .map(|c| AnswerTally {
            answer: Answer::new(c.answer.clone()),
            votes: c.votes,
            weight: c.weight,
            best_value: c.best,
            best_node: NodeId::ROOT,
            first_node: NodeId::ROOT,
            share: c.share,
            share_weight: c.share_weight,
        })
        .collect();
    arbor_search::pick_candidate(&tallied, RULES[rule].1)
}

/// Cells right under each rule, when every cell recorded its answers with their shares.
fn right_by_rule(cells: &[&TraceRecord]) -> Option<[u64; RULES.len()]> {
    let mut right = [0u64; RULES.len()];
    for cell in cells {
        let all = cell.candidates.as_ref()?;
        if !all.is_empty() && all.iter().all(|c| c.share == 0.0) {
            return None; // recorded before shares were
        }
        for (rule, n) in right.iter_mut().enumerate() {
            *n += pick_by_rule(all, rule).is_some_and(|i| all[i].correct) as u64;
        }
    }
    Some(right)
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
                no_answer: cells.iter().filter(|c| c.answer.is_none()).count() as u64,
                exhausted: cells
                    .iter()
                    .filter(|c| c.termination == "exhausted")
                    .count() as u64,
                found: cells
                    .iter()
                    .map(|c| {
                        c.candidates
                            .as_ref()
                            .map(|all| all.iter().any(|a| a.correct) as u64)
                    })
                    .sum(),
                by_rule: right_by_rule(&cells),
            }
        })
        .collect()
}

/// The rows as CSV, one header line first.
pub(crate) fn to_csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "strategy,budget,n,correct,accuracy,ci_low,ci_high,mean_generated_tokens,\
         mean_prompt_tokens_computed,mean_total_computed_tokens,mean_wall_ms,derived_from_samples,\
         no_answer,exhausted\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.4},{:.4},{:.4},{:.1},{:.1},{:.1},{:.0},{},{},{}",
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
            r.derived,
            r.no_answer,
            r.exhausted
        );
    }
    out
}

/// The rows as a Markdown table with a short legend.
pub(crate) fn to_markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| strategy | budget | n | accuracy | 95% CI | no answer | mean generated | mean prompt computed | mean total computed | mean wall (s) |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mark = if r.derived > 0 { "*" } else { "" };
        let _ = writeln!(
            out,
            "| {}{mark} | {} | {} | {:.1}% ({}/{}) | {:.1}–{:.1}% | {} | {:.0} | {:.0} | {:.0} | {:.1} |",
            r.strategy,
            r.budget,
            r.n,
            100.0 * r.accuracy(),
            r.correct,
            r.n,
            100.0 * r.ci.0,
            100.0 * r.ci.1,
            r.no_answer,
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
    if rows.iter().any(|r| r.found.is_some()) {
        out.push_str(
            "\n| strategy | budget | gold among its answers | chosen when among them |\n\
             |---|---:|---:|---:|\n",
        );
        for r in rows {
            let Some(found) = r.found else { continue };
            // A right chosen answer is always among the cell's answers.
            let _ = writeln!(
                out,
                "| {} | {} | {:.1}% ({found}/{}) | {:.1}% ({}/{found}) |",
                r.strategy,
                r.budget,
                100.0 * found as f64 / r.n.max(1) as f64,
                r.n,
                100.0 * r.correct as f64 / found.max(1) as f64,
                r.correct,
            );
        }
        out.push_str(
            "\nGold among its answers: the cell reached the gold answer in at least one final \
             answer (for sampling rows, pass@N of the samples within the budget); chosen: how \
             often its rule then picked it (`candidates` in the traces).\n",
        );
    }
    if rows.iter().any(|r| r.by_rule.is_some() && r.derived == 0) {
        out.push_str("\n| strategy | budget |");
        for (rule, _) in RULES {
            let _ = write!(out, " {rule} |");
        }
        out.push_str("\n|---|---:|");
        out.push_str(&"---:|".repeat(RULES.len()));
        out.push('\n');
        for r in rows.iter().filter(|r| r.derived == 0) {
            let Some(right) = r.by_rule else { continue };
            let _ = write!(out, "| {} | {} |", r.strategy, r.budget);
            for n in right {
                let _ = write!(out, " {:.1}% |", 100.0 * n as f64 / r.n.max(1) as f64);
            }
            out.push('\n');
        }
        out.push_str(
            "\nEach search's recorded answers under every answer rule (the search itself does \
             not depend on the rule, so this is what the search would have answered with that \
             rule; ties: the answer listed first). Share: each final answer counts by its path \
             share, the root's 1 split equally among the children with an answer below \
             (`share_vote` in a search config).\n",
        );
    }
    out
}

/// The strategy every other one is paired with.
pub(crate) const BASELINE: &str = "weighted-best-of-n";

/// Bootstrap resamples of the paired interval.
const RESAMPLES: usize = 4000;

/// One strategy against [`BASELINE`] at one budget, on the questions both answered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Paired {
    /// Strategy name.
    pub(crate) strategy: String,
    /// Generated-token budget.
    pub(crate) budget: u64,
    /// Questions with a cell of both.
    pub(crate) n: u64,
    /// Right where the baseline was wrong.
    pub(crate) wins: u64,
    /// Both right or both wrong.
    pub(crate) ties: u64,
    /// Wrong where the baseline was right.
    pub(crate) losses: u64,
    /// Accuracy difference (strategy minus baseline), in [-1, 1].
    pub(crate) diff: f64,
    /// 95% paired bootstrap interval of `diff` (percentile method, questions resampled).
    pub(crate) ci: (f64, f64),
}

/// The 95% percentile interval of the mean of `d` over `resamples` bootstrap resamples, with a
/// fixed seed so a summary is reproducible.
pub(crate) fn bootstrap_mean_interval(d: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if d.is_empty() {
        return (0.0, 0.0);
    }
    let mut state = seed;
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let mut sum = 0.0;
            for _ in 0..d.len() {
                state = arbor_search::mix_seed(state, 0x5eed);
                sum += d[(state % d.len() as u64) as usize];
            }
            sum / d.len() as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    (at(0.025), at(0.975))
}

/// Every strategy but the baseline, paired with it question by question at each budget.
pub(crate) fn pair_with_baseline(records: &[TraceRecord]) -> Vec<Paired> {
    let base: BTreeMap<(u64, usize), bool> = records
        .iter()
        .filter(|r| r.strategy == BASELINE)
        .map(|r| ((r.budget, r.index), r.correct))
        .collect();
    let mut groups: BTreeMap<(usize, String, u64), Vec<f64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.strategy != BASELINE) {
        if let Some(&b) = base.get(&(r.budget, r.index)) {
            groups
                .entry((strategy_rank(&r.strategy), r.strategy.clone(), r.budget))
                .or_default()
                .push(f64::from(u8::from(r.correct)) - f64::from(u8::from(b)));
        }
    }
    groups
        .into_iter()
        .map(|((_, strategy, budget), d)| {
            let count = |v: f64| d.iter().filter(|&&x| x == v).count() as u64;
            Paired {
                strategy,
                budget,
                n: d.len() as u64,
                wins: count(1.0),
                ties: count(0.0),
                losses: count(-1.0),
                diff: d.iter().sum::<f64>() / d.len() as f64,
                ci: bootstrap_mean_interval(&d, RESAMPLES, budget),
            }
        })
        .collect()
}

/// The pairs as a Markdown table with a short legend.
pub(crate) fn paired_markdown(pairs: &[Paired]) -> String {
    let mut out = format!(
        "\n| strategy vs {BASELINE} | budget | questions | wins | ties | losses | difference | 95% paired bootstrap CI |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n"
    );
    for p in pairs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:+.1} pts | {:+.1} to {:+.1} |",
            p.strategy,
            p.budget,
            p.n,
            p.wins,
            p.ties,
            p.losses,
            100.0 * p.diff,
            100.0 * p.ci.0,
            100.0 * p.ci.1
        );
    }
    out.push_str(
        "\nWins: the strategy right where weighted best-of-N was wrong on the same question at the \
         same budget; losses the reverse. The interval resamples questions (percentile method).\n",
    );
    out
}

/// Writes `summary.csv` and `summary.md` into `dir`; returns the Markdown.
pub(crate) fn write(dir: &Path, rows: &[Row], pairs: &[Paired]) -> Result<String> {
    let mut md = to_markdown(rows);
    if !pairs.is_empty() {
        md.push_str(&paired_markdown(pairs));
    }
    std::fs::write(dir.join("summary.csv"), to_csv(rows))
        .with_context(|| format!("writing {}", dir.join("summary.csv").display()))?;
    std::fs::write(dir.join("summary.md"), &md)
        .with_context(|| format!("writing {}", dir.join("summary.md").display()))?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two answers the rules disagree on: "7" has the votes, "9" the share and the best
    /// value, and each rule picks as a search with it would.
    #[test]
    fn every_answer_rule_is_applied_to_the_recorded_answers() {
        let cand =
            |answer: &str, votes, weight, best, share, share_weight, correct| TraceCandidate {
                answer: answer.into(),
                votes,
                weight,
                best: Some(best),
                share,
                share_weight,
                correct,
            };
        let all = [
            cand("7", 3, 1.2, 0.5, 0.4, 0.2, false),
            cand("9", 2, 1.5, 0.9, 0.6, 0.45, true),
        ];
        let picks: Vec<&str> = (0..RULES.len())
            .map(|rule| all[pick_by_rule(&all, rule).unwrap()].answer.as_str())
            .collect();
        assert_eq!(picks, ["7", "9", "9", "9", "9"]);
        // Ties go to the answer listed first.
        let tied = [
            cand("7", 2, 1.0, 0.5, 0.5, 0.25, false),
            cand("9", 2, 1.0, 0.5, 0.5, 0.25, true),
        ];
        for (rule, (name, _)) in RULES.iter().enumerate() {
            assert_eq!(pick_by_rule(&tied, rule), Some(0), "{name}");
        }
        assert_eq!(pick_by_rule(&[], 0), None);
    }
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
            // The right answer was reached in every right cell and in one wrong mcts cell.
            candidates: Some(vec![crate::eval::trace::TraceCandidate {
                answer: "1".into(),
                votes: 1,
                weight: 0.5,
                best: Some(0.5),
                share: 1.0,
                share_weight: 0.5,
                correct: correct || (strategy == "mcts" && generated == 500),
            }]),
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
        assert!(md.contains("| 2 | 510 |"), "the no-answer column: {md}");
        assert!(md.contains("\\* Read off one sampling run"), "{md}");
        assert!(
            md.contains("| mcts | 512 | 100.0% (2/2) | 50.0% (1/2) |"),
            "{md}"
        );
        assert!(
            md.contains("| majority | 256 | 50.0% (1/2) | 100.0% (1/1) |"),
            "{md}"
        );
        // Without recorded answers in every cell of a row, no figure for it.
        let mut old = records.clone();
        old[1].candidates = None;
        let md = to_markdown(&summarize(&old));
        assert!(!md.contains("| mcts | 512 | 100.0%"), "{md}");
        assert!(md.contains("| majority | 512 | 100.0% (1/1) |"), "{md}");
    }

    #[test]
    fn pairs_count_wins_ties_and_losses_on_shared_questions() {
        let at = |strategy: &str, index: usize, correct: bool| TraceRecord {
            index,
            ..cell(strategy, 1024, correct, 900)
        };
        let mut records = Vec::new();
        // Questions 0..10: the baseline right on 0..5; MCTS right on 3..9.
        for i in 0..10 {
            records.push(at(BASELINE, i, i < 5));
            records.push(at("mcts", i, (3..9).contains(&i)));
        }
        records.push(at("mcts", 99, true)); // no baseline cell: not paired
        let pairs = pair_with_baseline(&records);
        assert_eq!(pairs.len(), 1);
        let p = &pairs[0];
        assert_eq!((p.n, p.wins, p.ties, p.losses), (10, 4, 3, 3));
        assert!((p.diff - 0.1).abs() < 1e-12);
        assert!(p.ci.0 < p.diff && p.diff < p.ci.1, "{:?}", p.ci);
        assert!(p.ci.0 >= -1.0 && p.ci.1 <= 1.0);
        // All equal differences: the interval collapses onto them.
        assert_eq!(bootstrap_mean_interval(&[1.0; 20], 500, 3), (1.0, 1.0));
        // Symmetric ±1: about ±1.96 standard errors (0.22 for 20 questions).
        let d: Vec<f64> = (0..20)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let (lo, hi) = bootstrap_mean_interval(&d, 4000, 3);
        assert!(
            (lo + 0.43).abs() < 0.06 && (hi - 0.43).abs() < 0.06,
            "({lo}, {hi})"
        );
        let md = paired_markdown(&pairs);
        assert!(
            md.contains("| mcts | 1024 | 10 | 4 | 3 | 3 | +10.0 pts |"),
            "{md}"
        );
    }
}

//! Budgets hold exactly (tokens to within one token per sample of the last call, since the last
//! call's steps are capped to the budget left) and reported costs equal what the fake policy and
//! scorer counted on their own side.

use arbor_search::synthetic::PathGame;
use arbor_search::{Budget, Termination};

use crate::{play, Played};

fn deep(seed: u64) -> PathGame {
    PathGame::new(seed, 10, 0.6)
}

/// Strategies and the most tokens one of their batches can generate (requests × k × 9 tokens).
const STRATEGIES: [(&str, u64); 7] = [
    (r#"{"kind": "mcts"}"#, 8 * 4 * 9),
    (
        r#"{"kind": "mcts", "rollout": {}, "simulations_in_flight": 3}"#,
        3 * 4 * 9,
    ),
    (r#"{"kind": "best_of_n", "n": 16}"#, 16 * 9),
    (r#"{"kind": "weighted_best_of_n", "n": 16}"#, 16 * 9),
    (r#"{"kind": "self_consistency", "n": 16}"#, 16 * 9),
    (
        r#"{"kind": "beam", "beam_width": 4, "proposals_per_beam": 4}"#,
        16 * 9,
    ),
    (r#"{"kind": "dvts", "beams": 16, "width": 4}"#, 16 * 9),
];

/// Every reported cost equals the fakes' own count.
fn check_costs(played: &Played, what: &str) {
    let costs = played.outcome.costs;
    let policy = played.policy.seen();
    let scorer = played.scorer.seen();
    assert_eq!(costs.policy_calls, policy.calls, "{what}: policy calls");
    assert_eq!(
        costs.generated_tokens, policy.generated_tokens,
        "{what}: generated tokens"
    );
    assert_eq!(
        costs.prompt_tokens_sent, policy.prompt_tokens,
        "{what}: prompt tokens"
    );
    assert_eq!(
        costs.prompt_tokens_computed, policy.prompt_tokens_computed,
        "{what}: computed"
    );
    assert_eq!(
        costs.prompt_tokens_reused, policy.prompt_tokens_reused,
        "{what}: reused"
    );
    assert_eq!(
        costs.prompt_tokens_computed + costs.prompt_tokens_reused,
        costs.prompt_tokens_sent,
        "{what}"
    );
    assert_eq!(costs.scorer_calls, scorer.calls, "{what}: scorer calls");
    assert_eq!(
        costs.scorer_tokens, scorer.prompt_tokens,
        "{what}: scorer tokens"
    );
    assert_eq!(costs.nodes, played.tree.len() as u64, "{what}: nodes");
    // Every generated token sits in the tree or in a rollout: nothing is counted twice.
    let in_tree: u64 = played
        .tree
        .nodes()
        .filter_map(|(_, n)| n.step())
        .map(|s| s.token_ids.len() as u64)
        .sum();
    // Rollout steps are generated but not kept in the tree.
    if !what.contains("rollout") {
        assert_eq!(
            in_tree, costs.generated_tokens,
            "{what}: tokens in the tree"
        );
    }
}

#[test]
fn token_budgets_hold_to_one_token_per_sample_and_costs_match_what_the_fakes_saw() {
    for (strategy, batch_tokens) in STRATEGIES {
        for budget in [60, 333, 1000] {
            let fields = format!(
                r#""strategy": {strategy}, "budget": {{"max_generated_tokens": {budget}}}"#
            );
            let played = play(deep(budget), &fields, budget);
            let what = format!("{strategy} at {budget} tokens");
            let used = played.outcome.costs.generated_tokens;
            // Each sample of a call gets at most its share of the tokens left (at least one), so
            // the overshoot is below one token per sample of the widest call.
            let samples = batch_tokens / 9;
            assert!(used <= budget + samples, "{what}: used {used}");
            if played.outcome.termination == Termination::Budget(Budget::GeneratedTokens) {
                assert!(used >= budget, "{what}: stopped early at {used}");
            }
            check_costs(&played, &what);
        }
    }
}

#[test]
fn call_and_node_budgets_are_never_passed() {
    for (strategy, _) in STRATEGIES {
        let played = play(
            deep(1),
            &format!(r#""strategy": {strategy}, "budget": {{"max_policy_calls": 3}}"#),
            1,
        );
        assert_eq!(played.outcome.costs.policy_calls, 3, "{strategy}");
        assert_eq!(
            played.outcome.termination,
            Termination::Budget(Budget::PolicyCalls),
            "{strategy}"
        );
        check_costs(&played, strategy);

        let played = play(
            deep(2),
            &format!(r#""strategy": {strategy}, "budget": {{"max_scorer_calls": 2}}"#),
            2,
        );
        assert!(played.outcome.costs.scorer_calls <= 2, "{strategy}");
        check_costs(&played, strategy);

        let played = play(
            deep(3),
            &format!(r#""strategy": {strategy}, "budget": {{"max_nodes": 40}}"#),
            3,
        );
        assert!(
            played.tree.len() <= 40,
            "{strategy}: {} nodes",
            played.tree.len()
        );
        assert_eq!(
            played.outcome.termination,
            Termination::Budget(Budget::Nodes),
            "{strategy}"
        );
        check_costs(&played, strategy);
    }
}

#[test]
fn self_consistency_spends_no_scorer_calls_even_with_a_scorer_budget_of_zero() {
    let played = play(
        deep(4),
        r#""strategy": {"kind": "self_consistency", "n": 4}, "budget": {"max_scorer_calls": 0}"#,
        4,
    );
    assert_eq!(played.outcome.termination, Termination::Completed);
    assert!(played.outcome.answer.is_some());
}

#[test]
fn convergence_stops_mcts_early_on_the_answer() {
    let easy = || PathGame::new(8, 4, 0.8);
    let fields = r#""strategy": {"kind": "mcts", "final_answer": "weighted_vote"}, "budget": {"max_generated_tokens": 3000}"#;
    let full = play(easy(), fields, 8);
    let early = play(
        easy(),
        &format!(r#"{fields}, "convergence": {{"min_answers": 4, "min_share": 0.6}}"#),
        8,
    );
    assert_eq!(early.outcome.termination, Termination::Converged);
    assert!(early.outcome.costs.generated_tokens < full.outcome.costs.generated_tokens);
    assert!(early.solved() && full.solved());
}

//! Every strategy finds the answer of an easy game, and each behaves as its definition says.

use arbor_search::synthetic::{GamePolicy, GameScorer, PathGame};
use arbor_search::{NodeId, NodeState, SearchControl, Termination};

use crate::{config, play, run, success_rate};

fn easy(seed: u64) -> PathGame {
    PathGame::new(seed, 4, 0.7).with_logprob_gap(1.0)
}

fn check(fields: &str, min_rate: f64) {
    let rate = success_rate(10, easy, fields);
    assert!(
        rate >= min_rate,
        "{fields}: solved {rate:.2} of seeds, want >= {min_rate}"
    );
}

#[test]
fn every_strategy_finds_the_answer() {
    check(
        r#""strategy": {"kind": "mcts"}, "budget": {"max_generated_tokens": 4000}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "mcts", "rollout": {}}, "budget": {"max_generated_tokens": 4000}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "mcts", "final_answer": "best_value", "backup": "max"}, "budget": {"max_generated_tokens": 4000}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "mcts", "final_answer": "weighted_vote", "simulations_in_flight": 1}, "budget": {"max_generated_tokens": 4000}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "best_of_n", "n": 16}, "scoring": {"aggregation": "min"}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "best_of_n", "n": 16}, "scoring": {"aggregation": "last"}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "best_of_n", "n": 16}, "scoring": {"aggregation": "product"}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "best_of_n", "n": 16}, "scoring": {"aggregation": "mean"}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "weighted_best_of_n", "n": 16}"#,
        0.9,
    );
    check(r#""strategy": {"kind": "self_consistency", "n": 24}"#, 0.9);
    check(
        r#""strategy": {"kind": "beam", "beam_width": 4, "proposals_per_beam": 4}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "beam", "answer": "weighted_vote"}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "dvts", "beams": 16, "width": 4}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "dvts", "beams": 16, "width": 2, "answer": "majority"}"#,
        0.9,
    );
    // The log-prob scorer works where wrong steps are less likely to the policy itself.
    check(
        r#""strategy": {"kind": "beam"}, "scoring": {"scorer": "log_prob", "aggregation": "min"}"#,
        0.9,
    );
    check(
        r#""strategy": {"kind": "mcts"}, "scoring": {"scorer": "log_prob", "aggregation": "min"}, "budget": {"max_generated_tokens": 4000}"#,
        0.9,
    );
}

#[test]
fn the_log_prob_scorer_replaces_the_provided_one() {
    let game = easy(3);
    let policy = GamePolicy::new(game.clone());
    // Every call to the provided scorer would fail; it must not be called at all.
    let broken = GameScorer::new(game.clone(), 0.25, 0.2).with_failing_calls((0..1000).collect());
    let fields =
        r#""strategy": {"kind": "beam"}, "scoring": {"scorer": "log_prob", "aggregation": "min"}"#;
    let (outcome, _) = run(
        game.prompt(),
        config(fields, 3),
        &policy,
        &broken,
        &SearchControl::new(),
    );
    assert_eq!(broken.seen().calls, 0);
    assert!(
        outcome.costs.scorer_calls > 0,
        "log-prob scoring still counts as scorer calls"
    );
    assert_eq!(outcome.costs.scorer_tokens, 0);
    assert_eq!(outcome.answer.unwrap().answer.key, game.answer());
}

#[test]
fn self_consistency_never_calls_the_scorer_and_counts_votes() {
    let played = play(
        easy(1),
        r#""strategy": {"kind": "self_consistency", "n": 12}"#,
        1,
    );
    assert_eq!(played.scorer.seen().calls, 0);
    assert_eq!(played.outcome.costs.scorer_calls, 0);
    let votes: u32 = played.outcome.candidates.iter().map(|c| c.votes).sum();
    assert_eq!(votes, 12, "every sampled solution votes once");
    assert_eq!(played.outcome.termination, Termination::Completed);
    let top = &played.outcome.candidates[0];
    assert_eq!(played.outcome.answer.unwrap().answer.key, top.answer.key);
}

#[test]
fn best_of_n_samples_n_independent_paths() {
    let played = play(easy(2), r#""strategy": {"kind": "best_of_n", "n": 8}"#, 2);
    let tree = &played.tree;
    assert_eq!(tree.node(NodeId::ROOT).edges().len(), 8);
    let finals = tree
        .nodes()
        .filter(|(_, n)| n.state() == NodeState::Terminal)
        .count();
    assert_eq!(finals, 8);
    assert_eq!(tree.len(), 1 + 8 * 4, "one chain of depth 4 per sample");
    // The chosen answer is the best-scored final node.
    let best = tree
        .nodes()
        .filter(|(_, n)| n.state() == NodeState::Terminal)
        .max_by(|a, b| a.1.score().unwrap().total_cmp(&b.1.score().unwrap()))
        .unwrap();
    assert_eq!(played.outcome.answer.unwrap().value, best.1.score());
}

#[test]
fn beam_search_keeps_at_most_n_beams_per_depth() {
    let played = play(
        easy(4),
        r#""strategy": {"kind": "beam", "beam_width": 3, "proposals_per_beam": 2}"#,
        4,
    );
    let tree = &played.tree;
    assert_eq!(
        tree.node(NodeId::ROOT).edges().len(),
        6,
        "the root proposes N·M"
    );
    for depth in 1..4 {
        let expanded = tree
            .nodes()
            .filter(|(_, n)| n.depth() == depth && n.state() == NodeState::Expanded)
            .count();
        assert!(expanded <= 3, "depth {depth}: {expanded} beams expanded");
    }
    assert_eq!(played.outcome.termination, Termination::Completed);
}

#[test]
fn dvts_grows_independent_greedy_chains() {
    let played = play(
        easy(5),
        r#""strategy": {"kind": "dvts", "beams": 12, "width": 3}"#,
        5,
    );
    let tree = &played.tree;
    assert_eq!(
        tree.node(NodeId::ROOT).edges().len(),
        12,
        "the root proposes N first steps"
    );
    let heads = tree
        .nodes()
        .filter(|(_, n)| n.depth() == 1 && n.state() == NodeState::Expanded)
        .count();
    assert_eq!(heads, 4, "each group of M keeps its best: N/M subtrees");
    for depth in 1..4 {
        let expanded = tree
            .nodes()
            .filter(|(_, n)| n.depth() == depth && n.state() == NodeState::Expanded)
            .count();
        assert!(
            expanded <= 4,
            "depth {depth}: one expanded node per subtree at most, got {expanded}"
        );
    }
    for (_, node) in tree
        .nodes()
        .filter(|(_, n)| n.depth() >= 1 && n.state() == NodeState::Expanded)
    {
        assert_eq!(node.edges().len(), 3);
    }
}

#[test]
fn mcts_visits_add_up_to_simulations() {
    let played = play(
        easy(6),
        r#""strategy": {"kind": "mcts", "max_simulations": 40}"#,
        6,
    );
    let root_visits = played.tree.incoming(NodeId::ROOT).visits;
    assert_eq!(u64::from(root_visits), played.outcome.stats.simulations);
    assert!(played.outcome.stats.simulations <= 40);
    assert!(matches!(
        played.outcome.termination,
        Termination::Budget(arbor_search::Budget::Simulations) | Termination::Exhausted
    ));
}

#[test]
fn mcts_with_rollouts_records_them() {
    let played = play(
        easy(7),
        r#""strategy": {"kind": "mcts", "rollout": {"max_steps": 8}, "max_simulations": 40}"#,
        7,
    );
    let rollouts = played
        .tree
        .nodes()
        .filter(|(_, n)| n.rollout().is_some())
        .count();
    assert!(rollouts > 0);
    for (_, node) in played.tree.nodes() {
        if let Some(r) = node.rollout() {
            assert!(
                r.answer.is_some(),
                "the game always finishes within its depth"
            );
            assert_eq!(node.depth() + r.steps, 4);
        }
    }
    assert!(played.solved());
}

//! Failing, NaN-scoring, malformed, hanging, slow and panicking backends never corrupt the tree,
//! and the search still returns.

use std::time::Duration;

use arbor_search::synthetic::{GamePolicy, GameScorer, PathGame, PolicyFaults};
use arbor_search::{Budget, CancelToken, NodeState, Search, SearchControl, Termination};

use crate::{config, run, runtime};

const STRATEGIES: [&str; 6] = [
    r#"{"kind": "mcts", "rollout": {"max_steps": 4}}"#,
    r#"{"kind": "mcts", "simulations_in_flight": 1}"#,
    r#"{"kind": "best_of_n", "n": 8}"#,
    r#"{"kind": "self_consistency", "n": 8}"#,
    r#"{"kind": "beam"}"#,
    r#"{"kind": "dvts", "beams": 8, "width": 2}"#,
];

fn game() -> PathGame {
    PathGame::new(13, 5, 0.6)
}

fn fields(strategy: &str) -> String {
    format!(r#""strategy": {strategy}, "budget": {{"max_generated_tokens": 1500}}"#)
}

#[test]
fn nan_scores_fail_their_nodes_and_nothing_else() {
    for strategy in STRATEGIES {
        let policy = GamePolicy::new(game());
        let scorer = GameScorer::new(game(), 0.25, 0.2).with_nan_rate(0.2);
        let (outcome, tree) = run(
            game().prompt(),
            config(&fields(strategy), 1),
            &policy,
            &scorer,
            &SearchControl::new(),
        );
        let failed = tree
            .nodes()
            .filter(|(_, n)| n.state() == NodeState::Failed)
            .count() as u64;
        if !strategy.contains("self_consistency") {
            assert!(
                failed > 0,
                "{strategy}: a 20% NaN rate must fail some nodes"
            );
        }
        assert!(outcome.stats.failed_nodes <= failed, "{strategy}");
        for (_, node) in tree.nodes() {
            assert!(
                node.score().is_none_or(f64::is_finite),
                "{strategy}: a NaN reached the tree"
            );
            if node.state() == NodeState::Failed {
                assert!(
                    node.failure().is_some(),
                    "{strategy}: a failed node says why"
                );
            }
        }
    }
}

#[test]
fn failing_calls_fail_their_batch_and_the_search_goes_on() {
    for strategy in STRATEGIES {
        let faults = PolicyFaults {
            fail_calls: vec![1, 2],
            overfill_calls: vec![4],
            ..PolicyFaults::default()
        };
        let policy = GamePolicy::with_faults(game(), faults);
        let scorer = GameScorer::new(game(), 0.25, 0.2).with_failing_calls(vec![2]);
        let (outcome, _) = run(
            game().prompt(),
            config(&fields(strategy), 2),
            &policy,
            &scorer,
            &SearchControl::new(),
        );
        let failing_calls_made = [1, 2].iter().filter(|&&c| c < policy.seen().calls).count() as u64;
        assert_eq!(
            outcome.stats.policy_errors, failing_calls_made,
            "{strategy}"
        );
        assert!(outcome.stats.scorer_errors <= 1, "{strategy}");
        assert_eq!(
            outcome.costs.policy_calls,
            policy.seen().calls,
            "{strategy}"
        );
        assert_eq!(
            outcome.costs.scorer_calls,
            scorer.seen().calls,
            "{strategy}"
        );
    }
}

#[test]
fn a_backend_that_always_fails_stops_the_search_after_max_failed_calls() {
    let policy = GamePolicy::with_faults(
        game(),
        PolicyFaults {
            fail_calls: (0..100).collect(),
            ..PolicyFaults::default()
        },
    );
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let fields = r#""strategy": {"kind": "best_of_n"}, "max_failed_calls": 3"#;
    let (outcome, tree) = run(
        game().prompt(),
        config(fields, 3),
        &policy,
        &scorer,
        &SearchControl::new(),
    );
    // The root fails on the first call, so there is nothing left to try.
    assert_eq!(outcome.termination, Termination::Completed);
    assert_eq!(
        tree.node(arbor_search::NodeId::ROOT).state(),
        NodeState::Failed
    );
    assert!(outcome.answer.is_none());

    // MCTS keeps trying other leaves until the limit on failures in a row.
    let policy = GamePolicy::with_faults(
        game(),
        PolicyFaults {
            fail_calls: (1..100).collect(),
            ..PolicyFaults::default()
        },
    );
    let fields =
        r#""strategy": {"kind": "mcts", "simulations_in_flight": 1}, "max_failed_calls": 3"#;
    let (outcome, _) = run(
        game().prompt(),
        config(fields, 3),
        &policy,
        &scorer,
        &SearchControl::new(),
    );
    assert_eq!(outcome.termination, Termination::TooManyFailures);
    assert_eq!(outcome.costs.policy_calls, 4);
}

#[test]
fn a_panicking_policy_leaves_a_consistent_tree() {
    for strategy in STRATEGIES {
        let policy = GamePolicy::with_faults(
            game(),
            PolicyFaults {
                panic_on_call: Some(2),
                ..PolicyFaults::default()
            },
        );
        let scorer = GameScorer::new(game(), 0.25, 0.2);
        let mut search =
            Search::new(game().prompt().clone(), config(&fields(strategy), 4)).unwrap();
        let control = SearchControl::new();
        let rt = runtime();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(search.run(&policy, &scorer, &control))
        }));
        assert!(result.is_err(), "{strategy}: the panic propagates");
        search
            .tree()
            .check_invariants()
            .unwrap_or_else(|e| panic!("{strategy}: {e}"));
        assert!(
            search.tree().len() > 1,
            "{strategy}: the first calls' work is kept"
        );
    }
}

#[test]
fn cancelling_mid_call_returns_the_best_answer_so_far() {
    for strategy in STRATEGIES {
        let token = CancelToken::new();
        let faults = PolicyFaults {
            hang_on_call: Some(3),
            cancel_on_call: Some((3, token.clone())),
            ..PolicyFaults::default()
        };
        let policy = GamePolicy::with_faults(game(), faults);
        let scorer = GameScorer::new(game(), 0.25, 0.2);
        let control = SearchControl::new().with_cancel(token);
        let best = control.best_answer();
        let (outcome, _) = run(
            game().prompt(),
            config(&fields(strategy), 5),
            &policy,
            &scorer,
            &control,
        );
        assert_eq!(outcome.termination, Termination::Cancelled, "{strategy}");
        assert_eq!(
            outcome.costs.policy_calls, 4,
            "{strategy}: the abandoned call counts"
        );
        assert_eq!(
            *best.borrow(),
            outcome.answer,
            "{strategy}: the watch holds the final best"
        );
    }
}

#[test]
fn a_search_cancelled_before_it_starts_spends_nothing() {
    let token = CancelToken::new();
    token.cancel();
    let policy = GamePolicy::new(game());
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let control = SearchControl::new().with_cancel(token);
    let (outcome, tree) = run(game().prompt(), config("", 6), &policy, &scorer, &control);
    assert_eq!(outcome.termination, Termination::Cancelled);
    assert_eq!((outcome.costs.policy_calls, tree.len()), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_abandons_a_slow_call() {
    for strategy in STRATEGIES {
        // Each call takes 100 ms of (paused, auto-advancing) time; the deadline falls inside call 4.
        let policy = GamePolicy::with_faults(
            game(),
            PolicyFaults {
                latency: Some(Duration::from_millis(100)),
                ..PolicyFaults::default()
            },
        );
        let scorer = GameScorer::new(game(), 0.25, 0.2);
        let fields = format!(r#""strategy": {strategy}, "budget": {{"deadline_ms": 350}}"#);
        let mut search = Search::new(game().prompt().clone(), config(&fields, 7)).unwrap();
        let outcome = search
            .run(&policy, &scorer, &SearchControl::new())
            .await
            .unwrap();
        search.tree().check_invariants().unwrap();
        assert_eq!(
            outcome.termination,
            Termination::Budget(Budget::Deadline),
            "{strategy}"
        );
        assert_eq!(outcome.costs.policy_calls, 4, "{strategy}");
        assert_eq!(policy.seen().calls, 4, "{strategy}");
        assert!(
            (350_000..360_000).contains(&outcome.costs.wall_us),
            "{strategy}: {}",
            outcome.costs.wall_us
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_hung_call() {
    let policy = GamePolicy::with_faults(
        game(),
        PolicyFaults {
            hang_on_call: Some(1),
            ..PolicyFaults::default()
        },
    );
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let mut search = Search::new(
        game().prompt().clone(),
        config(r#""budget": {"deadline_ms": 1000}"#, 8),
    )
    .unwrap();
    let outcome = search
        .run(&policy, &scorer, &SearchControl::new())
        .await
        .unwrap();
    assert_eq!(outcome.termination, Termination::Budget(Budget::Deadline));
    search.tree().check_invariants().unwrap();
}

//! The same seed and a deterministic policy give the same tree, byte for byte.

use arbor_search::synthetic::PathGame;

use crate::play;

fn check(strategy: &str) {
    let fields = format!(r#""strategy": {strategy}, "budget": {{"max_generated_tokens": 700}}"#);
    let game = || PathGame::new(21, 6, 0.6).with_logprob_gap(0.5);
    let a = play(game(), &fields, 5);
    let b = play(game(), &fields, 5);
    let c = play(game(), &fields, 6);
    let json = |p: &crate::Played| serde_json::to_string(&p.tree.export()).unwrap();
    assert_eq!(json(&a), json(&b), "{strategy}: same seed, different trees");
    assert_ne!(
        json(&a),
        json(&c),
        "{strategy}: the seed does not reach the samples"
    );
    assert_eq!(a.tree.to_dot(), b.tree.to_dot());
    let (mut oa, mut ob) = (a.outcome.clone(), b.outcome.clone());
    oa.costs.wall_us = 0;
    ob.costs.wall_us = 0;
    assert_eq!(oa, ob, "{strategy}: same seed, different outcomes");
}

#[test]
fn same_seed_same_tree() {
    check(r#"{"kind": "mcts", "simulations_in_flight": 8}"#);
    check(r#"{"kind": "mcts", "simulations_in_flight": 1, "backup": "max"}"#);
    check(r#"{"kind": "mcts", "simulations_in_flight": 4, "rollout": {"max_steps": 3}}"#);
    check(r#"{"kind": "best_of_n", "n": 8}"#);
    check(r#"{"kind": "weighted_best_of_n", "n": 8}"#);
    check(r#"{"kind": "self_consistency", "n": 8}"#);
    check(r#"{"kind": "beam", "beam_width": 3, "proposals_per_beam": 3}"#);
    check(r#"{"kind": "dvts", "beams": 8, "width": 2}"#);
}

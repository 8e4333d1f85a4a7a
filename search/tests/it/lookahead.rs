//! The task built to reward lookahead: a random full path is almost always wrong, but a step-level
//! scorer can steer a search. At one token budget, MCTS and beam search must beat best-of-N.

use arbor_search::synthetic::PathGame;

use crate::play_with;

/// Depth 8, each step right with probability 1/2: a random solution is right 1 time in 256.
fn hard(seed: u64) -> PathGame {
    PathGame::new(seed, 8, 0.5)
}

const SEEDS: u64 = 40;
const TOKEN_BUDGET: u64 = 800;
/// Scorer margin and noise: noise above the margin, so on- and off-track scores overlap.
const SCORER: (f32, f32) = (0.2, 0.3);

struct Rate {
    solved: f64,
    most_tokens: u64,
}

fn rate(strategy: &str) -> Rate {
    let fields =
        format!(r#""strategy": {strategy}, "budget": {{"max_generated_tokens": {TOKEN_BUDGET}}}"#);
    let mut solved = 0;
    let mut most_tokens = 0;
    for seed in 0..SEEDS {
        let played = play_with(hard(seed), &fields, seed + 1000, SCORER);
        solved += u64::from(played.solved());
        most_tokens = most_tokens.max(played.outcome.costs.generated_tokens);
    }
    Rate {
        solved: solved as f64 / SEEDS as f64,
        most_tokens,
    }
}

#[test]
fn mcts_and_beam_beat_best_of_n_at_an_equal_token_budget() {
    // Sixteen 8-step solutions of about 6 tokens a step fill the budget.
    let best_of_n = rate(r#"{"kind": "best_of_n", "n": 16}"#);
    let weighted = rate(r#"{"kind": "weighted_best_of_n", "n": 16}"#);
    let beam = rate(r#"{"kind": "beam", "beam_width": 4, "proposals_per_beam": 4}"#);
    // Step-level MCTS: with a step scorer this good, every token goes to lookahead, none to
    // rollouts (the default rolls every leaf out to an answer, for a vote over the tree).
    let mcts = rate(
        r#"{"kind": "mcts", "expand_k": 4, "simulations_in_flight": 2, "c_puct": 0.2, "rollout": null}"#,
    );
    let report = format!(
        "solved: best-of-N {:.2}, weighted {:.2}, beam {:.2}, MCTS {:.2}",
        best_of_n.solved, weighted.solved, beam.solved, mcts.solved
    );
    println!("{report}");
    // One batch may pass the budget: at most 16 proposals of at most 9 tokens.
    for r in [&best_of_n, &weighted, &beam, &mcts] {
        assert!(
            r.most_tokens <= TOKEN_BUDGET + 16 * 9,
            "{report}: {} tokens",
            r.most_tokens
        );
    }
    assert!(
        best_of_n.solved <= 0.25,
        "{report}: the task must defeat sampling"
    );
    assert!(beam.solved >= best_of_n.solved + 0.4, "{report}");
    assert!(mcts.solved >= best_of_n.solved + 0.4, "{report}");
    assert!(mcts.solved >= weighted.solved + 0.4, "{report}");
}

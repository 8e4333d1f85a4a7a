//! `min_answer_depth`: an MCTS search that may not accept a final answer before the last step
//! of the game never returns an answer-first guess, and solves about as often as one that may
//! (within 2 of 40: a rejected guess is resampled, so it costs only its own tokens). Tested
//! with the single-best-value answer, where a confident guess tempts most.

use arbor_search::synthetic::PathGame;

use crate::play;

const DEPTH: u32 = 4;
const SEEDS: u64 = 40;

/// Depth 4, steps right 3 times in 4, and a wrong answer-first guess at each early step 1 time
/// in 4: the shape of the 0.5B model on GSM8K.
fn game(seed: u64) -> PathGame {
    PathGame::new(seed, DEPTH, 0.75).with_early_guesses(0.25)
}

#[test]
fn min_answer_depth_keeps_searches_from_returning_early_guesses() {
    // The single best value, where a confident guess is most tempting (the default vote over
    // the tree already outvotes most guesses).
    let strategy = r#"{"kind": "mcts", "final_answer": "best_value"}"#;
    for tokens in [200, 300] {
        let mut guesses_without = 0;
        let (mut solved_without, mut solved_with) = (0, 0);
        for seed in 0..SEEDS {
            let budget = format!(r#""budget": {{"max_generated_tokens": {tokens}}}"#);
            let free = play(
                game(seed),
                &format!(r#""strategy": {strategy}, {budget}"#),
                seed,
            );
            let strict = play(
                game(seed),
                &format!(r#""strategy": {strategy}, {budget}, "min_answer_depth": {DEPTH}"#),
                seed,
            );
            if let Some(a) = &free.outcome.answer {
                guesses_without += u32::from(free.tree.node(a.node).depth() < DEPTH);
            }
            if let Some(a) = &strict.outcome.answer {
                assert_eq!(
                    strict.tree.node(a.node).depth(),
                    DEPTH,
                    "{strategy} seed {seed}: an answer before step {DEPTH} was returned"
                );
            }
            solved_without += u32::from(free.solved());
            solved_with += u32::from(strict.solved());
        }
        eprintln!(
        "{strategy} {tokens}: solved {solved_without}/{SEEDS} without, {solved_with}/{SEEDS} with \
         min_answer_depth; {guesses_without} guesses returned without"
    );
        // The game must actually tempt the search, or the comparison says nothing.
        assert!(
            guesses_without > 0,
            "{strategy}: no guess was ever returned"
        );
        assert!(
            solved_with + 2 >= solved_without,
            "{strategy}: {solved_with} solved with min_answer_depth, {solved_without} without"
        );
    }
}

#[test]
fn min_answer_depth_is_validated() {
    let err = arbor_search::SearchConfig::from_json(r#"{"max_depth": 4, "min_answer_depth": 5}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("min_answer_depth"), "{err}");
    let err = arbor_search::SearchConfig::from_json(r#"{"min_answer_depth": 0}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("min_answer_depth"), "{err}");
}

//! A synthetic sweep of beam search and DVTS over step-length distributions, budgets and seeds:
//! how many searches end with no answer, and how much of the budget they use. Ignored (it runs
//! a few thousand searches); run it with
//! `cargo test --release -p arbor-search --test it sweep -- --ignored --nocapture`.

use arbor_search::synthetic::PathGame;

use crate::play;

/// Step-length distributions: name and how to shape a game of depth 5, p_correct 0.7.
type Shape = (&'static str, fn(PathGame) -> PathGame);

const SHAPES: [Shape; 6] = [
    ("3-9 tokens", |g| g),
    ("20-60", |g| g.with_step_tokens(20, 60)),
    ("20-60, 10% x4", |g| {
        g.with_step_tokens(20, 60).with_long_steps(0.1, 4)
    }),
    ("20-60, fillers 0.4", |g| {
        g.with_step_tokens(20, 60).with_filler_steps(0.4)
    }),
    ("10-80, 20% x3, fillers 0.3", |g| {
        g.with_step_tokens(10, 80)
            .with_long_steps(0.2, 3)
            .with_filler_steps(0.3)
    }),
    ("60-140", |g| g.with_step_tokens(60, 140)),
];

/// Beam and DVTS with their defaults, and one sample (best-of-1) as the floor: how often a
/// single path does not fit in the budget at all.
const STRATEGIES: [(&str, &str); 3] = [
    ("beam", r#"{"kind": "beam"}"#),
    ("dvts", r#"{"kind": "dvts"}"#),
    ("one sample", r#"{"kind": "best_of_n", "n": 1}"#),
];

const BUDGETS: [u64; 4] = [512, 1024, 2048, 4096];

const SEEDS: u64 = 40;

#[test]
#[ignore = "a sweep: run by hand with --ignored --nocapture"]
fn sweep_no_answer_counts_for_beam_and_dvts() {
    let mut totals = [(0u32, 0u32); 3]; // (no answer, searches) over eligible cells, per strategy
    let mut over = 0u32;
    println!("strategy | shape | budget | path tokens | eligible | no answer | solved | tokens used / budget | max used | answers");
    for (si, (label, strategy)) in STRATEGIES.iter().enumerate() {
        for (name, shape) in SHAPES {
            for budget in BUDGETS {
                let (mut empty, mut solved, mut used_sum, mut used_max) = (0u32, 0u32, 0u64, 0u64);
                let mut votes = 0u32;
                let mut path = 0.0;
                for seed in 0..SEEDS {
                    let game = shape(PathGame::new(seed, 5, 0.7).with_end_token());
                    path = game.mean_depth() * game.mean_step_tokens();
                    let fields = format!(
                        r#""strategy": {strategy}, "budget": {{"max_generated_tokens": {budget}}}"#
                    );
                    let played = play(game, &fields, seed);
                    let used = played.outcome.costs.generated_tokens;
                    used_sum += used;
                    used_max = used_max.max(used);
                    over += u32::from(used > budget);
                    empty += u32::from(played.outcome.answer.is_none());
                    solved += u32::from(played.solved());
                    votes += played
                        .outcome
                        .candidates
                        .iter()
                        .map(|c| c.votes)
                        .sum::<u32>();
                }
                // The budget allows one reasoned answer: twice a path's mean length.
                let eligible = budget as f64 >= 2.0 * path;
                if eligible {
                    totals[si].0 += empty;
                    totals[si].1 += SEEDS as u32;
                }
                println!(
                    "{label} | {name} | {budget} | {path:.0} | {} | {empty}/{SEEDS} | {solved} | {:.2} | {used_max} | {:.1}",
                    if eligible { "yes" } else { "no" },
                    used_sum as f64 / (SEEDS * budget) as f64,
                    f64::from(votes) / SEEDS as f64,
                );
            }
        }
    }
    println!(
        "eligible cells with no answer: beam {}/{}, dvts {}/{}, one sample {}/{}; searches over budget: {over}",
        totals[0].0, totals[0].1, totals[1].0, totals[1].1, totals[2].0, totals[2].1
    );
}

//! Integration tests: whole searches over the synthetic path game, where the right answer and the
//! value of every path are known.

mod budgets;
mod determinism;
mod early_answers;
mod events;
mod faults;
mod lookahead;
mod strategies;
mod sweep;
mod tree_search;

use arbor_search::synthetic::{GamePolicy, GameScorer, PathGame};
use arbor_search::{Policy, Scorer, Search, SearchConfig, SearchControl, SearchOutcome, Tree};

/// A single-threaded runtime with time enabled, as a worker would drive one search.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A config from a JSON fragment of `SearchConfig` fields plus a seed.
pub(crate) fn config(fields: &str, seed: u64) -> SearchConfig {
    let sep = if fields.trim().is_empty() { "" } else { "," };
    SearchConfig::from_json(&format!(r#"{{"seed": {seed}{sep} {fields}}}"#)).expect("valid config")
}

/// Runs one search to the end, checks the tree's invariants, and returns outcome and tree.
pub(crate) fn run<P: Policy, S: Scorer>(
    prompt: &str,
    config: SearchConfig,
    policy: &P,
    scorer: &S,
    control: &SearchControl,
) -> (SearchOutcome, Tree) {
    let mut search = Search::new(prompt, config).expect("valid config");
    let outcome = runtime()
        .block_on(search.run(policy, scorer, control))
        .expect("search runs");
    search.tree().check_invariants().expect("invariants hold");
    (outcome, search.into_tree())
}

/// One search on a fresh game with a fault-free policy and the game's scorer.
pub(crate) struct Played {
    pub(crate) game: PathGame,
    pub(crate) policy: GamePolicy,
    pub(crate) scorer: GameScorer,
    pub(crate) outcome: SearchOutcome,
    pub(crate) tree: Tree,
}

impl Played {
    pub(crate) fn solved(&self) -> bool {
        self.outcome
            .answer
            .as_ref()
            .is_some_and(|a| a.answer.key == self.game.answer())
    }
}

/// Plays `game` with `fields` (config JSON fields) and seed `seed`; scorer margin 0.25, noise 0.2.
pub(crate) fn play(game: PathGame, fields: &str, seed: u64) -> Played {
    play_with(game, fields, seed, (0.25, 0.2))
}

/// As [`play`], with the scorer's `(margin, noise)`.
pub(crate) fn play_with(
    game: PathGame,
    fields: &str,
    seed: u64,
    (margin, noise): (f32, f32),
) -> Played {
    let policy = GamePolicy::new(game.clone());
    let scorer = GameScorer::new(game.clone(), margin, noise);
    let (outcome, tree) = run(
        game.prompt(),
        config(fields, seed),
        &policy,
        &scorer,
        &SearchControl::new(),
    );
    Played {
        game,
        policy,
        scorer,
        outcome,
        tree,
    }
}

/// Share of seeds `0..seeds` on which `fields` solves the game `make(seed)`.
pub(crate) fn success_rate(seeds: u64, make: impl Fn(u64) -> PathGame, fields: &str) -> f64 {
    let solved = (0..seeds)
        .filter(|&seed| play(make(seed), fields, seed).solved())
        .count();
    solved as f64 / seeds as f64
}

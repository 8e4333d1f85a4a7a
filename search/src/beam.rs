//! Beam search and diverse verifier tree search (DVTS), as Hugging Face's search-and-learn
//! defines them, guided step by step by the scorer.
//!
//! Beam: the root proposes N·M first steps; every round, all candidates are scored in one call,
//! **every finished candidate is collected for the vote**, and the best N unfinished ones are
//! kept; the kept beams then propose N·M next steps between them (M each while N are kept, more
//! each when fewer survive), so the compute per round stays the same.
//!
//! DVTS: the root proposes N first steps in N / M groups of M; each group keeps its best as the
//! head of an independent subtree (selection at every level, the first included). Every round,
//! each live subtree proposes M next steps and greedily keeps its best; finished candidates are
//! collected for the vote. Independence keeps the final answers diverse where beam search tends
//! to collapse onto one prefix.
//!
//! Both: a node whose candidates all failed (e.g. answer-first guesses below
//! `min_answer_depth`) is asked again with a new seed; when every beam has finished without a
//! final answer and budget remains, the root is widened and the search starts over; and before
//! the token budget runs out, a **finish phase** runs the best survivors on to a final answer,
//! one sample per step, so a search never ends with unfinished beams and no answer while it
//! could have finished one. The answer is a vote over every collected final answer.

use std::cmp::Ordering;

use crate::config::{BeamConfig, DvtsConfig, K_MAX};
use crate::engine::{expand, score_nodes, Io, Tally};
use crate::flight::InFlight;
use crate::outcome::{Budget, Termination};
use crate::policy::Policy;
use crate::scorer::Scorer;
use crate::tree::{NodeId, NodeState, Tree};

/// Higher score first; ties go to the earlier node.
fn by_score(a: &(f64, NodeId), b: &(f64, NodeId)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Steps a solution is assumed to take before any has finished.
const ASSUMED_DEPTH: f64 = 6.0;

/// The new children of one leaf, scored: `(value, node)`, failed ones left out.
type Scored = Vec<(f64, NodeId)>;

/// Every new child of one leaf in edge order, with its value (`None`: it failed).
type Made = Vec<(Option<f64>, NodeId)>;

fn scored(made: Made) -> Scored {
    made.into_iter()
        .filter_map(|(v, c)| v.map(|v| (v, c)))
        .collect()
}

/// One round shared by both: expand every `(leaf, k)` in one policy call (a leaf may be an
/// expanded node being widened), score every new child in one scorer call, tally the final
/// answers among them, and return each leaf's new scored children.
async fn expand_and_score<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    leaves: &[(NodeId, u32)],
) -> Result<Vec<Made>, Termination> {
    io.check_policy()?;
    io.check_scorer(1)?;
    let needed: u64 = leaves.iter().map(|&(_, k)| u64::from(k)).sum();
    if io.nodes_left(tree) < needed {
        return Err(Termination::Budget(Budget::Nodes));
    }
    let mut flight = InFlight::new(tree);
    let mut batch = Vec::with_capacity(leaves.len());
    for &(leaf, k) in leaves {
        let node = flight.tree().node(leaf);
        let claimable = node.state() == NodeState::Unexpanded || flight.tree().can_widen(leaf);
        if claimable {
            flight.begin_expanding(leaf);
            batch.push((leaf, k));
        }
    }
    let before = flight.tree().len();
    let children = expand(&mut flight, io, &batch).await?;
    score_nodes(&mut flight, io, Some(tally), &children).await?;
    let tree = flight.tree();
    Ok(leaves
        .iter()
        .map(|&(leaf, _)| {
            tree.node(leaf)
                .edges()
                .iter()
                .map(|e| e.child())
                .filter(|c| c.index() >= before)
                .map(|c| {
                    let node = tree.node(c);
                    let value = node.score().filter(|_| node.state() != NodeState::Failed);
                    (value, c)
                })
                .collect()
        })
        .collect())
}

/// Tokens a step has taken so far, on average (at least 1).
fn step_tokens<P: Policy, S: Scorer>(tree: &Tree, io: &Io<'_, P, S>) -> f64 {
    let steps = (tree.len() as f64 - 1.0).max(1.0);
    (io.costs.generated_tokens as f64 / steps).max(1.0)
}

/// When to stop branching and run the best `n` open beams on to a final answer: when what is
/// left of the token budget would not cover another round of `proposals` steps plus finishing
/// every beam. Returns how many beams the rest of the budget can finish (at least one), or
/// `None` to go on branching (always, without a token budget).
fn finish_now<P: Policy, S: Scorer>(
    tree: &Tree,
    io: &Io<'_, P, S>,
    tally: &Tally,
    beams: &[NodeId],
    proposals: u64,
) -> Option<usize> {
    let max = io.config.budget.max_generated_tokens?;
    let spent = io.costs.generated_tokens;
    let left = max.saturating_sub(spent) as f64;
    let per_step = step_tokens(tree, io);
    let depth = tally.mean_depth(tree).unwrap_or(ASSUMED_DEPTH);
    let at = beams
        .iter()
        .map(|&b| f64::from(tree.node(b).depth()))
        .fold(0.0, f64::max);
    // Paths deeper than the typical answer still need a few steps: never count on fewer than
    // three, nor on fewer than half the steps taken so far (a beam that finishes early only
    // leaves budget for the others).
    let to_go = (depth - at).max(3.0).max(at / 2.0);
    let finish_one = per_step * to_go;
    let round = per_step * proposals as f64;
    if left >= round + finish_one * beams.len() as f64 {
        return None;
    }
    Some(((left / finish_one) as usize).clamp(1, beams.len()))
}

/// The finish phase: keeps the best `n` of `heads` by value and runs the best on to a final
/// answer, one sample per step (a step whose sample failed is asked again), then the others
/// together with what budget is left; every final answer is scored and tallied. The best goes
/// first and alone so that the last tokens finish one path rather than cut several.
async fn finish<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    mut heads: Vec<NodeId>,
    n: usize,
) -> Termination {
    let value = |h: &NodeId| tree.node(*h).score().unwrap_or(f64::NEG_INFINITY);
    heads.sort_by(|a, b| value(b).total_cmp(&value(a)));
    heads.truncate(n);
    let (best, rest) = heads.split_at(heads.len().min(1));
    if let Err(termination) = run_on(tree, io, tally, best.to_vec()).await {
        return termination;
    }
    match run_on(tree, io, tally, rest.to_vec()).await {
        Ok(()) => Termination::Completed,
        Err(termination) => termination,
    }
}

/// Runs each of `heads` on to a final answer (see [`finish`]); `Err` when a budget ran out.
async fn run_on<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    mut heads: Vec<NodeId>,
) -> Result<(), Termination> {
    loop {
        heads.retain(|&h| {
            let node = tree.node(h);
            node.state() == NodeState::Unexpanded || tree.can_widen(h)
        });
        if heads.is_empty() {
            return Ok(());
        }
        // When the budget cannot pay every head a whole step, the weakest are dropped.
        if let Some(max) = io.config.budget.max_generated_tokens {
            let left = max.saturating_sub(io.costs.generated_tokens) as f64;
            let afford = (left / (1.5 * step_tokens(tree, io))) as usize;
            heads.truncate(afford.max(1));
        }
        let leaves: Vec<(NodeId, u32)> = heads.iter().map(|&h| (h, 1)).collect();
        let result = expand_and_score(tree, io, tally, &leaves).await;
        io.stats.rounds += 1;
        io.publish_best(tree, tally);
        heads = heads
            .iter()
            .zip(result?)
            .map(|(&h, children)| match scored(children).first() {
                // Finished (tallied) or unfinished, it goes on from its new step.
                Some(&(_, child)) => child,
                None => h,
            })
            .collect();
    }
}

/// Starts over from the root when every beam ended without a final answer: widens the root by
/// `k`. False when the root cannot take more children.
fn restart(tree: &Tree, tally: &Tally) -> bool {
    tally.is_empty() && tree.can_widen(NodeId::ROOT)
}

pub(crate) async fn run_beam<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    config: &BeamConfig,
) -> Termination {
    let width = config.beam_width as usize;
    let total = config.beam_width * config.proposals_per_beam;
    let mut beams = vec![NodeId::ROOT];
    loop {
        if io.converged(tally) {
            return Termination::Converged;
        }
        if beams.is_empty() {
            if !restart(tree, tally) {
                return Termination::Completed;
            }
            beams = vec![NodeId::ROOT];
        }
        // N·M proposals in all, shared among the beams left.
        let k = total.div_ceil(beams.len() as u32).min(K_MAX);
        if beams != [NodeId::ROOT] {
            if let Some(n) = finish_now(tree, io, tally, &beams, u64::from(total)) {
                return finish(tree, io, tally, beams, n).await;
            }
        }
        let leaves: Vec<(NodeId, u32)> = beams.iter().map(|&b| (b, k)).collect();
        let result = expand_and_score(tree, io, tally, &leaves).await;
        io.stats.rounds += 1;
        let per_leaf = match result {
            Ok(per_leaf) => per_leaf,
            Err(termination) => {
                io.publish_best(tree, tally);
                return termination;
            }
        };
        // A beam whose candidates all failed is asked again (widened) next round, if the
        // best open candidates leave it room.
        let retry: Vec<NodeId> = beams
            .iter()
            .zip(&per_leaf)
            .filter(|(&b, children)| children.iter().all(|c| c.0.is_none()) && tree.can_widen(b))
            .map(|(&b, _)| b)
            .collect();
        let mut open: Vec<(f64, NodeId)> = per_leaf
            .into_iter()
            .flat_map(scored)
            .filter(|&(_, c)| tree.node(c).state() == NodeState::Unexpanded)
            .collect();
        open.sort_by(by_score);
        open.truncate(width);
        beams = open.into_iter().map(|(_, c)| c).collect();
        let room = width - beams.len();
        beams.extend(retry.into_iter().take(room));
        io.publish_best(tree, tally);
    }
}

pub(crate) async fn run_dvts<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    config: &DvtsConfig,
) -> Termination {
    let m = config.width;
    // Each entry is the current node of one live subtree; the root stands for all of them.
    let mut heads: Vec<NodeId> = vec![NodeId::ROOT];
    loop {
        if io.converged(tally) {
            return Termination::Converged;
        }
        if heads.is_empty() {
            if !restart(tree, tally) {
                return Termination::Completed;
            }
            heads = vec![NodeId::ROOT];
        }
        let at_root = heads == [NodeId::ROOT];
        if !at_root {
            let proposals = heads.len() as u64 * u64::from(m);
            if let Some(n) = finish_now(tree, io, tally, &heads, proposals) {
                return finish(tree, io, tally, heads, n).await;
            }
        }
        let k = if at_root { config.beams } else { m };
        let leaves: Vec<(NodeId, u32)> = heads.iter().map(|&h| (h, k)).collect();
        let result = expand_and_score(tree, io, tally, &leaves).await;
        io.stats.rounds += 1;
        let per_leaf = match result {
            Ok(per_leaf) => per_leaf,
            Err(termination) => {
                io.publish_best(tree, tally);
                return termination;
            }
        };
        let mut next = Vec::with_capacity(heads.len());
        for (&head, children) in heads.iter().zip(per_leaf) {
            // The root's N children form N / M subtrees of M; below, a head's M children.
            let groups: Vec<Scored> = if head == NodeId::ROOT && at_root {
                children
                    .chunks(m as usize)
                    .map(|group| scored(group.to_vec()))
                    .collect()
            } else {
                vec![scored(children)]
            };
            for mut group in groups {
                group.sort_by(by_score);
                match group.first() {
                    Some(&(_, best)) if tree.node(best).state() == NodeState::Unexpanded => {
                        next.push(best);
                    }
                    Some(_) => {} // its best is a final answer (tallied): the subtree is done
                    None if head != NodeId::ROOT && tree.can_widen(head) => next.push(head),
                    None => {}
                }
            }
        }
        heads = next;
        io.publish_best(tree, tally);
    }
}

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
//! final answer and budget remains, the root is widened and the search starts over. The answer
//! is a vote over every collected final answer.
//!
//! **Budget plan** (with a generated-token budget): every level keeps a **finish reserve**, the
//! tokens that running the best beam on to a final answer needs: the steps it still has to go
//! (what the answers' mean depth leaves, at least three and half the depth so far; before any
//! answer, from an assumed 8 steps and at least 1.5 times the depth so far), each as long as a
//! long step (the 90th percentile of step lengths in the tree, plus the scorer's generated
//! tokens per step), or finishing every beam at the mean step, whichever is more. A level gets as many proposals as
//! the rest pays for at the long step; when that is fewer than wanted, only the best beams by
//! value branch (the others are dropped), and the level's policy call is capped so long steps
//! cannot eat into the reserve. Before any step is seen, a level that could take more than half
//! the budget (every step as long as `max_step_tokens`) sends a probe of N (beam) or M (DVTS)
//! proposals first, and is planned again from their lengths. When the rest cannot pay two
//! proposals, the **finish phase** runs the best beam alone on to a final answer, one sample per
//! step, then as many of the others as the budget left then pays for. Budget left once the
//! search has its answers (after the finish, or when every beam has finished) runs the best open
//! candidates of the tree on to more answers for the vote. A step cut by the token limit after
//! it stated its final answer in full counts as final (see [`crate::states_final_answer`]). An
//! ignored sweep (`tests/it/sweep.rs`) measures searches without an answer over step-length
//! shapes, budgets and seeds.

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
const ASSUMED_DEPTH: f64 = 8.0;

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

/// What the steps in the tree say about the tokens a step to come will cost.
struct StepCost {
    /// On average: tokens generated so far (the scorer's included) per step in the tree.
    mean: f64,
    /// A long step: the 90th percentile of step lengths in the tree, plus the scorer's mean
    /// generations per step.
    long: f64,
    /// Tokens the scorer generated per step, on average (a rollout PRM's completions).
    scorer: f64,
}

/// `None` before the first step.
fn step_cost<P: Policy, S: Scorer>(tree: &Tree, io: &Io<'_, P, S>) -> Option<StepCost> {
    let mut lengths: Vec<usize> = tree
        .nodes()
        .filter_map(|(_, n)| n.step())
        .map(|s| s.token_ids.len())
        .collect();
    if lengths.is_empty() {
        return None;
    }
    lengths.sort_unstable();
    let steps = lengths.len() as f64;
    let p90 = lengths[(lengths.len() - 1) * 9 / 10] as f64;
    let scorer = io.costs.scorer_generated_tokens as f64 / steps;
    let mean = (io.costs.generated_tokens as f64 / steps).max(1.0);
    Some(StepCost {
        mean,
        long: (p90 + scorer).max(mean),
        scorer,
    })
}

/// Steps a beam at depth `at` is expected to need to reach a final answer: what the typical
/// answer's depth leaves, but never fewer than three, nor (paths deeper than the typical answer
/// still need a few) fewer than half the steps taken so far; before any answer, when a beam left
/// unfinished means no answer at all, never fewer than one and a half times the steps taken so
/// far (a search that has gone deep without an answer is on long paths).
fn steps_to_go(tree: &Tree, tally: &Tally, at: u32) -> f64 {
    let at = f64::from(at);
    match tally.mean_depth(tree) {
        Some(depth) => (depth - at).max(3.0).max(at / 2.0),
        None => (ASSUMED_DEPTH - at).max(3.0).max(1.5 * at),
    }
}

/// What to do next with the open beams.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Next {
    /// Propose `proposals` next steps among the beams in one call; `cap`: the most tokens the
    /// call may generate. A `probe` was sized before any step was seen: once its steps are in,
    /// the level is planned again.
    Branch {
        proposals: u64,
        cap: Option<u64>,
        probe: bool,
    },
    /// Stop branching and run the best beams on to a final answer.
    Finish,
}

/// Plans the next call of a level that wants `wanted` more proposals among `beams`, so that
/// what is left of the token budget always covers finishing the best beam: a **finish reserve**
/// of the steps it still needs, each as long as a long step (the 90th percentile seen), or of
/// finishing every beam at the mean step, whichever is more. The level gets as many proposals as
/// the rest pays for at the long step (fewer than wanted when the budget is tight), and its call
/// is capped so that long steps cannot eat into the reserve; when the rest cannot pay one
/// proposal per beam, the search finishes. Before any step is seen, a level that might take more
/// than half the budget (every step as long as `max_step_tokens`) sends a probe of `probe`
/// proposals first. Without a token budget: every wanted proposal in one call.
fn plan<P: Policy, S: Scorer>(
    tree: &Tree,
    io: &Io<'_, P, S>,
    tally: &Tally,
    beams: &[NodeId],
    wanted: u64,
    probe: u64,
) -> Next {
    let Some(left) = io.tokens_left() else {
        return Next::Branch {
            proposals: wanted,
            cap: None,
            probe: false,
        };
    };
    let Some(cost) = step_cost(tree, io) else {
        let worst = wanted.saturating_mul(u64::from(io.config.sampling.max_step_tokens));
        let probing = worst.saturating_mul(2) > left && probe < wanted;
        return Next::Branch {
            proposals: if probing { probe.max(1) } else { wanted },
            cap: None,
            probe: probing,
        };
    };
    let at = beams
        .iter()
        .map(|&b| tree.node(b).depth())
        .max()
        .unwrap_or(0);
    let to_go = steps_to_go(tree, tally, at);
    let finish_one = to_go * cost.long;
    let finish_all = to_go * cost.mean * beams.len() as f64;
    let left = left as f64;
    let spare = left - finish_one.max(finish_all);
    let proposals = if spare > 0.0 {
        ((spare / cost.long) as u64).min(wanted)
    } else {
        0
    };
    // A level needs a choice: two proposals at least (to the best beam, when no more is paid).
    if proposals < wanted.min(2) {
        return Next::Finish;
    }
    let cap = left - finish_one - proposals as f64 * cost.scorer;
    Next::Branch {
        proposals,
        cap: Some(cap.max(0.0) as u64),
        probe: false,
    }
}

/// One level: up to `wanted` proposals shared among `beams`, `k` each, in one call (two after a
/// probe). When the budget pays for fewer, only the best beams by value branch, up to `k` each
/// (the others are dropped, as beams outside the best N are).
/// Returns each beam's new children (none for a beam that did not branch), or `None` to finish
/// instead.
async fn level<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    beams: &[NodeId],
    (wanted, k): (u64, u32),
    probe: u64,
) -> Result<Option<Vec<Made>>, Termination> {
    let mut made: Vec<Made> = vec![Vec::new(); beams.len()];
    let mut asked = 0;
    while asked < wanted {
        let rest = wanted - asked;
        let (proposals, cap, probing) = match plan(tree, io, tally, beams, rest, probe) {
            Next::Finish if asked == 0 => return Ok(None),
            Next::Finish => break,
            Next::Branch {
                proposals,
                cap,
                probe,
            } => (proposals, cap, probe),
        };
        let mut leaves: Vec<(usize, u32)> = if proposals >= rest {
            let each = u32::try_from(rest.div_ceil(beams.len() as u64)).unwrap_or(K_MAX);
            (0..beams.len()).map(|i| (i, each.clamp(1, k))).collect()
        } else {
            let branching = (proposals / u64::from(k)).clamp(1, beams.len() as u64);
            let each = u32::try_from(proposals / branching).unwrap_or(K_MAX).min(k);
            let mut order: Vec<(f64, usize)> = beams
                .iter()
                .enumerate()
                .map(|(i, &b)| (tree.node(b).score().unwrap_or(f64::NEG_INFINITY), i))
                .collect();
            order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            order
                .into_iter()
                .take(branching as usize)
                .map(|(_, i)| (i, each))
                .collect()
        };
        leaves.sort_unstable();
        if let Some(cap) = cap {
            io.cap_next_call(cap);
        }
        let calls: Vec<(NodeId, u32)> = leaves.iter().map(|&(i, each)| (beams[i], each)).collect();
        let result = expand_and_score(tree, io, tally, &calls).await;
        io.stats.rounds += 1;
        for (&(i, _), new) in leaves.iter().zip(result?) {
            made[i].extend(new);
        }
        asked += calls.iter().map(|&(_, each)| u64::from(each)).sum::<u64>();
        if !probing {
            break;
        }
    }
    Ok(Some(made))
}

/// How many of `heads` what is left of the token budget can run on to a final answer, at the
/// mean step (at least one; all of them without a token budget).
fn finishable<P: Policy, S: Scorer>(
    tree: &Tree,
    io: &Io<'_, P, S>,
    tally: &Tally,
    heads: &[NodeId],
) -> usize {
    let (Some(left), Some(cost)) = (io.tokens_left(), step_cost(tree, io)) else {
        return heads.len().max(1);
    };
    let left = left as f64;
    let at = heads
        .iter()
        .map(|&h| tree.node(h).depth())
        .max()
        .unwrap_or(0);
    let n = (left / (steps_to_go(tree, tally, at) * cost.mean)) as usize;
    n.clamp(1, heads.len().max(1))
}

/// The finish phase: runs the best of `heads` by value on to a final answer, one sample per
/// step (a step whose sample failed is asked again), then as many of the others, best first,
/// as the budget left then pays for ([`finishable`], planned again once the first answer is
/// in: the reserve was sized before any answer, when it had to be conservative); every final
/// answer is scored and tallied. The best goes first and alone so that the last tokens finish
/// one path rather than cut several.
async fn finish<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    mut heads: Vec<NodeId>,
) -> Termination {
    let value = |h: &NodeId| tree.node(*h).score().unwrap_or(f64::NEG_INFINITY);
    heads.sort_by(|a, b| value(b).total_cmp(&value(a)));
    let mut rest = heads.split_off(heads.len().min(1));
    if let Err(termination) = run_on(tree, io, tally, heads).await {
        return termination;
    }
    rest.truncate(finishable(tree, io, tally, &rest));
    if let Err(termination) = run_on(tree, io, tally, rest).await {
        return termination;
    }
    spend_rest(tree, io, tally).await
}

/// With a token budget left once the search has its answers (the finish reserve was sized to be
/// safe, and beams that all finished leave budget behind), runs the best open candidates of the
/// tree, kept as beams or not, on to more final answers for the vote, as many at a time as the
/// budget pays for at the mean step. Without a token budget it does nothing.
async fn spend_rest<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
) -> Termination {
    loop {
        if io.converged(tally) {
            return Termination::Converged;
        }
        let mut open: Vec<(f64, NodeId)> = tree
            .nodes()
            .filter(|(_, n)| n.state() == NodeState::Unexpanded)
            .filter_map(|(id, n)| n.score().map(|v| (v, id)))
            .collect();
        open.sort_by(by_score);
        let Some(&(_, best)) = open.first() else {
            return Termination::Completed;
        };
        let n = affordable(tree, io, tally, tree.node(best).depth());
        if n == 0 {
            return Termination::Completed;
        }
        let heads = open.into_iter().take(n).map(|(_, id)| id).collect();
        if let Err(termination) = run_on(tree, io, tally, heads).await {
            return termination;
        }
    }
}

/// How many paths from depth `at` what is left of the token budget pays for at the mean step
/// (none without a token budget: this only spends what a budget leaves).
fn affordable<P: Policy, S: Scorer>(
    tree: &Tree,
    io: &Io<'_, P, S>,
    tally: &Tally,
    at: u32,
) -> usize {
    let (Some(left), Some(cost)) = (io.tokens_left(), step_cost(tree, io)) else {
        return 0;
    };
    let left = left as f64;
    (left / (steps_to_go(tree, tally, at) * cost.mean)) as usize
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
        if let (Some(left), Some(cost)) = (io.tokens_left(), step_cost(tree, io)) {
            let afford = (left as f64 / (1.5 * cost.mean)) as usize;
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
                return spend_rest(tree, io, tally).await;
            }
            beams = vec![NodeId::ROOT];
        }
        // N·M proposals in all, shared among the beams left.
        let k = total.div_ceil(beams.len() as u32).min(K_MAX);
        let wanted = u64::from(k) * beams.len() as u64;
        let result = level(
            tree,
            io,
            tally,
            &beams,
            (wanted, k),
            u64::from(config.beam_width),
        )
        .await;
        let per_leaf = match result {
            Ok(Some(per_leaf)) => per_leaf,
            Ok(None) => return finish(tree, io, tally, beams).await,
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
                return spend_rest(tree, io, tally).await;
            }
            heads = vec![NodeId::ROOT];
        }
        let at_root = heads == [NodeId::ROOT];
        let k = if at_root { config.beams } else { m };
        let wanted = u64::from(k) * heads.len() as u64;
        let result = level(tree, io, tally, &heads, (wanted, k), u64::from(m)).await;
        let per_leaf = match result {
            Ok(Some(per_leaf)) => per_leaf,
            Ok(None) => return finish(tree, io, tally, heads).await,
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

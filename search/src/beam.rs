//! Beam search and diverse verifier tree search (DVTS), both guided step by step by the scorer.
//!
//! Beam: N beams each propose M next steps (the root counts as N copies of the prompt, so it
//! proposes N·M); all candidates are scored in one call and the best N are kept. Finished
//! candidates among them stop; the rest go on until none is left or a budget runs out.
//!
//! DVTS: the root proposes N/M first steps, each the root of an independent subtree; every round,
//! each live subtree proposes M next steps and greedily keeps its best-scored one. Independence
//! keeps the final answers diverse where beam search tends to collapse onto one prefix.

use std::cmp::Ordering;

use crate::config::{BeamConfig, DvtsConfig};
use crate::engine::{expand, score_nodes, Budget, Io, Tally, Termination};
use crate::flight::InFlight;
use crate::policy::Policy;
use crate::scorer::Scorer;
use crate::tree::{NodeId, NodeState, Tree};

/// Higher score first; ties go to the earlier node.
fn by_score(a: &(f64, NodeId), b: &(f64, NodeId)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// One round shared by both: expand every leaf with `k` samples in one policy call, score every
/// new child in one scorer call, and return the scored children of each leaf.
async fn expand_and_score<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    leaves: &[NodeId],
    k: u32,
) -> Result<Vec<Vec<(f64, NodeId)>>, Termination> {
    io.check_policy()?;
    io.check_scorer(1)?;
    if io.nodes_left(tree) < leaves.len() as u64 * u64::from(k) {
        return Err(Termination::Budget(Budget::Nodes));
    }
    let mut flight = InFlight::new(tree);
    for &leaf in leaves {
        flight.begin_expanding(leaf);
    }
    let batch: Vec<(NodeId, u32)> = leaves.iter().map(|&leaf| (leaf, k)).collect();
    let children = expand(&mut flight, io, &batch).await?;
    score_nodes(&mut flight, io, None, &children).await?;
    let tree = flight.tree();
    Ok(leaves
        .iter()
        .map(|&leaf| {
            tree.node(leaf)
                .edges()
                .iter()
                .filter_map(|e| tree.node(e.child()).score().map(|s| (s, e.child())))
                .filter(|&(_, c)| tree.node(c).state() != NodeState::Failed)
                .collect()
        })
        .collect())
}

/// Tallies the kept candidates that are final answers and returns the others, which go on.
fn keep(tree: &Tree, tally: &mut Tally, kept: impl Iterator<Item = (f64, NodeId)>) -> Vec<NodeId> {
    let mut open = Vec::new();
    for (value, node) in kept {
        let n = tree.node(node);
        match (n.state(), n.answer()) {
            (NodeState::Unexpanded, _) => open.push(node),
            (_, Some(answer)) => tally.add(node, answer, Some(value)),
            _ => {}
        }
    }
    open
}

pub(crate) async fn run_beam<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    config: &BeamConfig,
) -> Termination {
    let width = config.beam_width as usize;
    let mut beams = vec![NodeId::ROOT];
    loop {
        if beams.is_empty() {
            return Termination::Completed;
        }
        if io.converged(tally) {
            return Termination::Converged;
        }
        let k = if beams == [NodeId::ROOT] {
            config.beam_width * config.proposals_per_beam
        } else {
            config.proposals_per_beam
        };
        let result = expand_and_score(tree, io, &beams, k).await;
        io.stats.rounds += 1;
        let mut candidates: Vec<(f64, NodeId)> = match result {
            Ok(per_leaf) => per_leaf.into_iter().flatten().collect(),
            Err(termination) => {
                io.publish_best(tree, tally);
                return termination;
            }
        };
        candidates.sort_by(by_score);
        candidates.truncate(width);
        beams = keep(tree, tally, candidates.into_iter());
        io.publish_best(tree, tally);
    }
}

pub(crate) async fn run_dvts<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    config: &DvtsConfig,
) -> Termination {
    let subtrees = config.beams / config.width;
    // Each entry is the current node of one live subtree.
    let mut heads: Option<Vec<NodeId>> = None;
    loop {
        let (leaves, k) = match &heads {
            None => (vec![NodeId::ROOT], subtrees),
            Some(heads) => (heads.clone(), config.width),
        };
        if leaves.is_empty() {
            return Termination::Completed;
        }
        if io.converged(tally) {
            return Termination::Converged;
        }
        let result = expand_and_score(tree, io, &leaves, k).await;
        io.stats.rounds += 1;
        let per_leaf = match result {
            Ok(per_leaf) => per_leaf,
            Err(termination) => {
                io.publish_best(tree, tally);
                return termination;
            }
        };
        let next: Vec<(f64, NodeId)> = if heads.is_none() {
            // The root's children start one subtree each.
            per_leaf.into_iter().flatten().collect()
        } else {
            // Greedy within each subtree: keep the best-scored child.
            per_leaf
                .into_iter()
                .filter_map(|mut children| {
                    children.sort_by(by_score);
                    children.first().copied()
                })
                .collect()
        };
        heads = Some(keep(tree, tally, next.into_iter()));
        io.publish_best(tree, tally);
    }
}

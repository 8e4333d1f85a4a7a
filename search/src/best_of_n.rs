//! Best-of-N, weighted best-of-N and self-consistency: sample N complete solutions.
//!
//! The root is expanded once with `k = N`; then every unfinished path is extended by one step per
//! round, all paths sharing one batched policy call. Final answers are scored as they appear (one
//! scorer call per round), so the best answer so far is always current. The strategies differ only
//! in how the answer is chosen ([`crate::engine`] picks by best value, value sum or vote count),
//! and self-consistency never calls the scorer: equally frequent answers are told apart by the
//! policy's own confidence in them (summed), never by which finished first.

use crate::engine::{expand, score_nodes, Io, Tally};
use crate::flight::InFlight;
use crate::outcome::{Budget, Termination};
use crate::policy::Policy;
use crate::scorer::{LogProbScorer, Scorer};
use crate::tree::{NodeId, NodeState, Tree};

pub(crate) async fn run<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    n: u32,
    scored: bool,
) -> Termination {
    let mut frontier: Vec<(NodeId, u32)> = vec![(NodeId::ROOT, n)];
    loop {
        if frontier.is_empty() {
            return Termination::Completed;
        }
        if io.converged(tally) {
            return Termination::Converged;
        }
        let result = round(tree, io, tally, &mut frontier, scored).await;
        io.stats.rounds += 1;
        io.publish_best(tree, tally);
        if let Err(termination) = result {
            return termination;
        }
    }
}

async fn round<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    frontier: &mut Vec<(NodeId, u32)>,
    scored: bool,
) -> Result<(), Termination> {
    io.check_policy()?;
    if scored {
        io.check_scorer(1)?;
    }
    let needed: u64 = frontier.iter().map(|&(_, k)| u64::from(k)).sum();
    if io.nodes_left(tree) < needed {
        return Err(Termination::Budget(Budget::Nodes));
    }
    let mut flight = InFlight::new(tree);
    for &(node, _) in frontier.iter() {
        flight.begin_expanding(node);
    }
    let children = expand(&mut flight, io, frontier).await?;
    let (finals, open): (Vec<NodeId>, Vec<NodeId>) = children
        .into_iter()
        .partition(|&c| flight.tree().node(c).state() == NodeState::Terminal);
    if scored {
        score_nodes(&mut flight, io, Some(&mut *tally), &finals).await?;
    } else {
        // No scorer call: the policy's own confidence (free, from the step log-probs) only
        // breaks ties between equally frequent answers.
        let aggregation = io.config.scoring.aggregation;
        for node in finals {
            let tree = flight.tree();
            if let Some(answer) = tree.node(node).answer() {
                let value = LogProbScorer::path_value(&tree.path(node), aggregation);
                tally.add(node, answer, value);
            }
        }
    }
    *frontier = open.into_iter().map(|node| (node, 1)).collect();
    Ok(())
}

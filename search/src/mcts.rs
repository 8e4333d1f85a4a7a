//! Monte-Carlo tree search with PUCT selection, progressive widening, batched expansion under
//! virtual loss, rollouts kept as tree nodes, and mean or max backup.
//!
//! One round: select up to `simulations_in_flight` paths (each loads virtual loss so the next
//! selection looks elsewhere). A selection ends at an unexpanded leaf, or at an expanded node
//! that is due more children (progressive widening: all its children are final or failed, or its
//! visits outgrew them). All those nodes are expanded with one policy call and their new children
//! scored with one scorer call; each simulation steps into its best new child. With rollouts on
//! (the default), each simulation then runs that child on to a final answer, one batched policy
//! call per step for all simulations of the round, and **every rollout step becomes a tree node**
//! (so later simulations share the prefix, and the final answer enters the vote). Each simulation
//! backs up `(1 - w) * leaf value + w * answer value`. Final answers are never revisited: they are
//! valued once, when they are made, so every simulation adds a new path. With
//! [`MctsConfig::root_samples`] the first round gives the root that many children and runs
//! every one on to an answer: the search starts from independent samples, all in the vote.
//!
//! The search ends `exhausted` only when the root is: every node it reaches holds
//! [`crate::SearchConfig::max_children`] children and all of them are final or failed.
//! The round's [`InFlight`] guard undoes whatever a round leaves half-done.

use crate::config::{AnswerValue, MctsConfig};
use crate::engine::{expand, expand_at, score_nodes, Io, Tally};
use crate::flight::InFlight;
use crate::outcome::{Budget, Termination};
use crate::policy::Policy;
use crate::scorer::Scorer;
use crate::tree::{NodeId, NodeState, Puct, Rollout, Tree};

/// Where one selection ended.
enum Descent {
    /// An unexpanded leaf: claim it.
    Leaf(NodeId),
    /// An expanded node due more children: widen it by this many.
    Widen(NodeId, u32),
    /// A node another simulation of this round is expanding or widening (or nothing selectable).
    Busy(NodeId),
}

/// Progressive widening's rule: how many more children `id` should get now, 0 for none.
fn widen_by(tree: &Tree, id: NodeId, config: &MctsConfig) -> u32 {
    if !tree.can_widen(id) {
        return 0;
    }
    let node = tree.node(id);
    let room = u64::from(tree.max_children()).saturating_sub(node.edges().len() as u64);
    let room = u32::try_from(room).unwrap_or(u32::MAX);
    if node.open_children() == 0 {
        return config.expand_k.min(room);
    }
    let visits = f64::from(tree.incoming(id).visits);
    let allowed = (config.widen_c * visits.powf(config.widen_alpha)).ceil();
    u32::from(allowed > node.edges().len() as f64).min(room)
}

/// Walks from the root along the best PUCT edges; counts every node passed.
fn descend(tree: &Tree, puct: &Puct, config: &MctsConfig, visits: &mut u64) -> Descent {
    let mut at = NodeId::ROOT;
    loop {
        *visits += 1;
        let node = tree.node(at);
        match node.state() {
            NodeState::Expanded => {
                let more = widen_by(tree, at, config);
                if more > 0 {
                    return Descent::Widen(at, more);
                }
                match tree.select_open_child(at, puct) {
                    Some(edge) => at = node.edges()[edge as usize].child(),
                    None => return Descent::Busy(at),
                }
            }
            NodeState::Unexpanded => return Descent::Leaf(at),
            NodeState::Terminal | NodeState::Expanding | NodeState::Failed => {
                return Descent::Busy(at)
            }
        }
    }
}

/// One simulation of a round.
struct Simulation {
    /// Its slot in the round's [`InFlight`].
    slot: usize,
    /// The node it expanded or widened.
    leaf: NodeId,
    /// The new child it stepped into, valued by the scorer.
    start: Option<NodeId>,
    /// The final answer its rollout reached.
    end: Option<NodeId>,
    /// Rollout steps added below `start`.
    added: u32,
}

pub(crate) async fn run<P: Policy, S: Scorer>(
    tree: &mut Tree,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    config: &MctsConfig,
) -> Termination {
    let puct = Puct {
        c_puct: config.c_puct,
        c_base: config.c_base,
        backup: config.backup,
    };
    loop {
        if tree.node(NodeId::ROOT).is_exhausted() {
            return Termination::Exhausted;
        }
        if io.stats.simulations >= u64::from(config.max_simulations) {
            return Termination::Budget(Budget::Simulations);
        }
        if io.converged(tally) {
            return Termination::Converged;
        }
        let result = round(tree, io, tally, config, &puct).await;
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
    config: &MctsConfig,
    puct: &Puct,
) -> Result<(), Termination> {
    io.check_policy()?;
    io.check_scorer(1 + u64::from(config.rollout.is_some()))?;
    let k = config.expand_k;
    let rollout_room = config
        .rollout
        .as_ref()
        .map_or(0, |r| u64::from(r.max_steps));
    let room = io.nodes_left(tree) / (u64::from(k) + rollout_room);
    if room == 0 {
        return Err(Termination::Budget(Budget::Nodes));
    }
    let sims_left = u64::from(config.max_simulations) - io.stats.simulations;
    let slots = u64::from(config.simulations_in_flight)
        .min(room)
        .min(sims_left) as usize;

    // Root samples belong to the root's first expansion only, not to its later widenings.
    let root_samples =
        tree.node(NodeId::ROOT).state() == NodeState::Unexpanded && config.root_samples > 1;
    let mut flight = InFlight::new(tree);
    let mut sims: Vec<Simulation> = Vec::with_capacity(slots);
    let mut leaves: Vec<(NodeId, u32)> = Vec::with_capacity(slots);
    // Collisions are bounded: at most `slots` wasted selections per round.
    let mut attempts = 0;
    while sims.len() < slots && attempts < 2 * slots {
        attempts += 1;
        let (leaf, k) = match descend(flight.tree(), puct, config, &mut io.stats.node_visits) {
            // The first expansion of the root: as many children as independent samples asked.
            Descent::Leaf(NodeId::ROOT) => (
                NodeId::ROOT,
                k.max(config.root_samples).min(flight.tree().max_children()),
            ),
            Descent::Leaf(leaf) => (leaf, k),
            Descent::Widen(node, more) => (node, more),
            Descent::Busy(node) => {
                io.stats.collisions += 1;
                if node == NodeId::ROOT {
                    break; // the root itself is busy: nothing else can be selected this round
                }
                continue;
            }
        };
        flight.begin_expanding(leaf);
        let slot = flight.load(leaf);
        sims.push(Simulation {
            slot,
            leaf,
            start: None,
            end: None,
            added: 0,
        });
        leaves.push((leaf, k));
    }
    if sims.is_empty() {
        // Nothing is selectable although the root is not exhausted: cannot happen between
        // rounds (every open node has an open child or room to widen), but never spin.
        return Err(Termination::Exhausted);
    }

    let children = expand(&mut flight, io, &leaves).await?;
    score_nodes(&mut flight, io, Some(&mut *tally), &children).await?;
    // Each simulation goes on into its best new child: the highest value, then prior.
    for sim in &mut sims {
        let tree = flight.tree();
        let best = children
            .iter()
            .copied()
            .filter(|&c| tree.node(c).parent() == Some(sim.leaf))
            .filter(|&c| tree.node(c).state() != NodeState::Failed)
            .max_by(|&a, &b| {
                let (na, nb) = (tree.node(a), tree.node(b));
                na.score()
                    .unwrap_or(f64::NEG_INFINITY)
                    .total_cmp(&nb.score().unwrap_or(f64::NEG_INFINITY))
                    .then(tree.prior(a).total_cmp(&tree.prior(b)))
                    .then(b.cmp(&a))
            });
        if let Some(child) = best {
            flight.step_down(sim.slot, child);
            io.stats.node_visits += 1;
            sim.start = Some(child);
            if flight.tree().node(child).state() == NodeState::Terminal {
                sim.end = Some(child);
            }
        }
    }
    // Root samples: every other new child of the root becomes a simulation of its own.
    if root_samples {
        let first = sims
            .iter()
            .find(|sim| sim.leaf == NodeId::ROOT)
            .and_then(|sim| sim.start);
        if let Some(first) = first {
            let others: Vec<NodeId> = children
                .iter()
                .copied()
                .filter(|&c| c != first)
                .filter(|&c| flight.tree().node(c).parent() == Some(NodeId::ROOT))
                .filter(|&c| flight.tree().node(c).state() != NodeState::Failed)
                .take(sims_left.saturating_sub(sims.len() as u64) as usize)
                .collect();
            for child in others {
                let slot = flight.load(NodeId::ROOT);
                flight.step_down(slot, child);
                io.stats.node_visits += 2;
                let terminal = flight.tree().node(child).state() == NodeState::Terminal;
                sims.push(Simulation {
                    slot,
                    leaf: NodeId::ROOT,
                    start: Some(child),
                    end: terminal.then_some(child),
                    added: 0,
                });
            }
        }
    }
    let rolled = roll_out(&mut flight, io, tally, config, &mut sims).await;

    for sim in &sims {
        let value = sim.start.and_then(|start| {
            let tree = flight.tree();
            let leaf_value = tree.node(start).score();
            let answer_value = sim.end.and_then(|end| {
                let node = tree.node(end);
                let share = || node.answer().map(|a| tally.share(a));
                match config.rollout.as_ref().map(|r| r.answer_value) {
                    Some(AnswerValue::Consistency) => share(),
                    Some(AnswerValue::ScoreTimesConsistency) => {
                        node.score().zip(share()).map(|(v, s)| v * s)
                    }
                    Some(AnswerValue::Score) | None => node.score(),
                }
            });
            let w = config.rollout.as_ref().map_or(0.0, |r| r.answer_weight);
            match (leaf_value, answer_value) {
                (Some(l), Some(a)) if sim.end != Some(start) => Some((1.0 - w) * l + w * a),
                // A final answer revisited: its answer's value (its score, unless configured
                // otherwise).
                (l, a) if sim.end == Some(start) => a.or(l),
                (l, a) => l.or(a),
            }
        });
        if let (Some(start), Some(value)) = (sim.start, value) {
            if sim.added > 0 {
                let answer = sim
                    .end
                    .and_then(|e| flight.tree().node(e).answer().cloned());
                flight.tree_mut().set_rollout(
                    start,
                    Rollout {
                        steps: sim.added,
                        answer,
                        value,
                    },
                );
            }
        }
        let walked = flight.settle(sim.slot, value);
        if value.is_some() {
            io.stats.node_visits += walked;
            io.stats.simulations += 1;
        }
    }
    rolled
}

/// Runs every simulation's new child on to a final answer, one batched policy call per step,
/// each step a new tree node the simulation steps into; the final answers are scored (and
/// tallied) with one scorer call per step that made any. A rollout stops early at the step
/// limit, at a failed step, or when a budget runs out; its simulation then backs up the leaf's
/// value alone.
async fn roll_out<P: Policy, S: Scorer>(
    flight: &mut InFlight<'_>,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    config: &MctsConfig,
    sims: &mut [Simulation],
) -> Result<(), Termination> {
    let Some(rollout) = &config.rollout else {
        return Ok(());
    };
    loop {
        let mut active: Vec<usize> = (0..sims.len())
            .filter(|&i| {
                let sim = &sims[i];
                sim.end.is_none()
                    && sim.added < rollout.max_steps
                    && sim.start.is_some()
                    && flight
                        .end(sim.slot)
                        .is_some_and(|at| flight.tree().node(at).state() == NodeState::Unexpanded)
            })
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        if let Err(t) = io.check_policy().and_then(|()| io.check_scorer(1)) {
            // Out of budget: the simulations back up what they have.
            return if t.is_abrupt() { Err(t) } else { Ok(()) };
        }
        if io.nodes_left(flight.tree()) < active.len() as u64 {
            return Ok(());
        }
        // The finish: when what is left of the budget cannot pay two full steps for every
        // rollout, only the rollouts furthest along go on (as many as it pays two full steps
        // for, at least one). The others wait, not end: they go on if the first finish with
        // budget to spare. The tokens spent are the same; they go to fewer paths at a time, so
        // the budget ends in answers (as a sampler's does, finishing one sample after another)
        // instead of in as many cut, unanswered paths.
        if let Some(left) = io.tokens_left() {
            let step = 2 * u64::from(io.config.sampling.max_step_tokens);
            let affordable = usize::try_from(left / step).unwrap_or(usize::MAX).max(1);
            if affordable < active.len() {
                let tree = flight.tree();
                let depth = |i: usize| {
                    flight
                        .end(sims[i].slot)
                        .map_or(0, |at| tree.node(at).depth())
                };
                active.sort_by_key(|&i| (std::cmp::Reverse(depth(i)), i));
                active.truncate(affordable);
                active.sort_unstable();
            }
        }
        let mut leaves = Vec::with_capacity(active.len());
        for &i in &active {
            let at = flight.end(sims[i].slot).expect("checked above");
            flight.begin_expanding(at);
            leaves.push((at, 1));
        }
        let children = expand_at(flight, io, &leaves, rollout.temperature).await?;
        let finals: Vec<NodeId> = children
            .iter()
            .copied()
            .filter(|&c| flight.tree().node(c).state() == NodeState::Terminal)
            .collect();
        for &i in &active {
            let sim = &mut sims[i];
            let at = flight.end(sim.slot).expect("checked above");
            let Some(child) = children
                .iter()
                .copied()
                .find(|&c| flight.tree().node(c).parent() == Some(at))
            else {
                sim.added = rollout.max_steps; // the step failed: this rollout is over
                continue;
            };
            flight.step_down(sim.slot, child);
            io.stats.node_visits += 1;
            sim.added += 1;
            if flight.tree().node(child).state() == NodeState::Terminal {
                sim.end = Some(child);
            }
        }
        score_nodes(flight, io, Some(&mut *tally), &finals).await?;
    }
}

//! Monte-Carlo tree search with PUCT selection, batched expansion under virtual loss, optional
//! rollouts, and mean or max backup.
//!
//! One round: select up to `simulations_in_flight` paths (each loads virtual loss so the next
//! selection looks elsewhere), expand all their leaves with one policy call, score all new children
//! with one scorer call, step each simulation into its best new child (whose scored value is its
//! initial Q), optionally roll those children out, then back every simulation up. The round's
//! [`InFlight`] guard undoes whatever a round leaves half-done.

use std::sync::Arc;

use crate::answer::extract_answer;
use crate::config::{MctsConfig, RolloutConfig};
use crate::engine::{expand, score_nodes, Budget, Io, Tally, Termination, SALT_ROLLOUT};
use crate::flight::InFlight;
use crate::policy::{Policy, ProposeRequest, Step, StepStop};
use crate::scorer::{ScoreRequest, Scorer};
use crate::tree::{NodeId, NodeState, Puct, Rollout, Tree};

/// Where one selection ended.
enum Descent {
    /// An unexpanded leaf: claim it.
    Leaf(NodeId),
    /// A final answer: back its value up again.
    Terminal(NodeId),
    /// A leaf another simulation of this round is expanding (or nothing selectable).
    Busy(NodeId),
}

/// Walks from the root along the best PUCT edges; counts every node passed.
fn descend(tree: &Tree, puct: &Puct, visits: &mut u64) -> Descent {
    let mut at = NodeId::ROOT;
    loop {
        *visits += 1;
        let node = tree.node(at);
        match node.state() {
            NodeState::Expanded => match tree.select_child(at, puct) {
                Some(edge) => at = node.edges()[edge as usize].child(),
                None => return Descent::Busy(at),
            },
            NodeState::Unexpanded => return Descent::Leaf(at),
            NodeState::Terminal => return Descent::Terminal(at),
            NodeState::Expanding | NodeState::Failed => return Descent::Busy(at),
        }
    }
}

/// One simulation of a round.
struct Simulation {
    /// Its slot in the round's [`InFlight`].
    slot: usize,
    /// True when it claimed a leaf to expand; false for a terminal revisit.
    expands: bool,
    /// True once an expanding simulation stepped into a new child.
    stepped: bool,
    /// The value its rollout reached, when it had one.
    rollout_value: Option<f64>,
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
    let room = io.nodes_left(tree) / u64::from(k);
    if room == 0 {
        return Err(Termination::Budget(Budget::Nodes));
    }
    let sims_left = u64::from(config.max_simulations) - io.stats.simulations;
    let slots = u64::from(config.simulations_in_flight)
        .min(room)
        .min(sims_left) as usize;

    let mut flight = InFlight::new(tree);
    let mut sims: Vec<Simulation> = Vec::with_capacity(slots);
    let mut leaves: Vec<(NodeId, u32)> = Vec::with_capacity(slots);
    // Collisions are bounded: at most `slots` wasted selections per round.
    let mut attempts = 0;
    while sims.len() < slots && attempts < 2 * slots {
        attempts += 1;
        match descend(flight.tree(), puct, &mut io.stats.node_visits) {
            Descent::Leaf(leaf) => {
                flight.begin_expanding(leaf);
                let slot = flight.load(leaf);
                sims.push(Simulation {
                    slot,
                    expands: true,
                    stepped: false,
                    rollout_value: None,
                });
                leaves.push((leaf, k));
            }
            Descent::Terminal(node) => {
                let slot = flight.load(node);
                sims.push(Simulation {
                    slot,
                    expands: false,
                    stepped: false,
                    rollout_value: None,
                });
            }
            Descent::Busy(node) => {
                io.stats.collisions += 1;
                if node == NodeId::ROOT {
                    break; // only the root exists: nothing else can be selected this round
                }
            }
        }
    }

    if !leaves.is_empty() {
        let children = expand(&mut flight, io, &leaves).await?;
        score_nodes(&mut flight, io, Some(&mut *tally), &children).await?;
        // Each expanding simulation goes on into its best new child, valued by the scorer.
        let mut starts = Vec::new();
        for (i, sim) in sims.iter_mut().enumerate().filter(|(_, s)| s.expands) {
            let Some(leaf) = flight.end(sim.slot) else {
                continue;
            };
            if flight.tree().node(leaf).state() != NodeState::Expanded {
                continue;
            }
            if let Some(edge) = flight.tree().select_child(leaf, puct) {
                let child = flight.tree().node(leaf).edges()[edge as usize].child();
                flight.step_down(sim.slot, child);
                sim.stepped = true;
                io.stats.node_visits += 1;
                if config.rollout.is_some()
                    && flight.tree().node(child).state() == NodeState::Unexpanded
                {
                    starts.push((i, child));
                }
            }
        }
        if let Some(rollout) = &config.rollout {
            let values = rollouts(&mut flight, io, tally, rollout, &starts).await?;
            for ((i, _), value) in starts.iter().zip(values) {
                sims[*i].rollout_value = value;
            }
        }
    }

    for sim in &sims {
        let Some(end) = flight.end(sim.slot) else {
            continue;
        };
        let node = flight.tree().node(end);
        // A simulation whose leaf failed to expand never reached a value: it only releases.
        let lands = node.state() != NodeState::Failed && (!sim.expands || sim.stepped);
        let value = if lands {
            sim.rollout_value.or(node.score())
        } else {
            None
        };
        let walked = flight.settle(sim.slot, value);
        if value.is_some() {
            io.stats.node_visits += walked;
            io.stats.simulations += 1;
        }
    }
    Ok(())
}

/// A rollout in progress.
struct Roll {
    /// The tree node it started from.
    start: NodeId,
    /// The full path so far: the start node's path plus the rollout's own steps.
    steps: Vec<Arc<Step>>,
    /// Steps the rollout added.
    added: u32,
    /// Still generating.
    open: bool,
    /// Reached a final answer.
    finished: bool,
}

/// Rolls each start node out to a final answer, one batched policy call per step, then scores the
/// finished paths with one scorer call. Unfinished rollouts (budget, errors, `max_steps`) return
/// `None`, and their simulations back up the start node's own value instead.
async fn rollouts<P: Policy, S: Scorer>(
    flight: &mut InFlight<'_>,
    io: &mut Io<'_, P, S>,
    tally: &mut Tally,
    config: &RolloutConfig,
    starts: &[(usize, NodeId)],
) -> Result<Vec<Option<f64>>, Termination> {
    let max_depth = io.config.max_depth as usize;
    let mut rolls: Vec<Roll> = starts
        .iter()
        .map(|&(_, start)| Roll {
            start,
            steps: flight.tree().path(start),
            added: 0,
            open: true,
            finished: false,
        })
        .collect();
    let prompt = Arc::clone(flight.tree().prompt());
    loop {
        let active: Vec<usize> = (0..rolls.len()).filter(|&i| rolls[i].open).collect();
        if active.is_empty() {
            break;
        }
        if let Err(t) = io.check_policy() {
            if t.is_abrupt() {
                return Err(t);
            }
            break;
        }
        let requests = active
            .iter()
            .map(|&i| ProposeRequest {
                node: rolls[i].start,
                prompt: Arc::clone(&prompt),
                steps: rolls[i].steps.clone(),
                k: 1,
                sampling: io.sampling(
                    rolls[i].start,
                    SALT_ROLLOUT + u64::from(rolls[i].added),
                    config.temperature,
                ),
            })
            .collect();
        let replies = match io.propose(requests).await? {
            Ok(replies) => replies,
            Err(_) => break,
        };
        for (&i, reply) in active.iter().zip(replies) {
            let roll = &mut rolls[i];
            let mut steps = reply.steps.into_iter();
            let step = match (steps.next(), steps.next()) {
                (Some(step), None)
                    if step.token_logprobs.is_empty()
                        || step.token_logprobs.len() == step.token_ids.len() =>
                {
                    step
                }
                _ => {
                    roll.open = false;
                    continue;
                }
            };
            let stop = step.stop;
            roll.steps.push(Arc::new(Step {
                text: step.text,
                token_ids: step.token_ids,
                token_logprobs: step.token_logprobs,
            }));
            roll.added += 1;
            if stop == StepStop::EndOfSequence || roll.steps.len() >= max_depth {
                roll.finished = true;
                roll.open = false;
            } else if roll.added >= config.max_steps {
                roll.open = false;
            }
        }
    }
    for roll in &mut rolls {
        roll.open = false;
    }

    let mut values = vec![None; rolls.len()];
    let finished: Vec<usize> = (0..rolls.len()).filter(|&i| rolls[i].finished).collect();
    if finished.is_empty() {
        return Ok(values);
    }
    if let Err(t) = io.check_scorer(1) {
        return if t.is_abrupt() { Err(t) } else { Ok(values) };
    }
    let requests = finished
        .iter()
        .map(|&i| ScoreRequest {
            node: rolls[i].start,
            prompt: Arc::clone(&prompt),
            steps: rolls[i].steps.clone(),
        })
        .collect();
    let Ok(replies) = io.score(requests).await? else {
        return Ok(values);
    };
    let aggregation = io.config.scoring.aggregation;
    for (&i, reply) in finished.iter().zip(replies) {
        let roll = &rolls[i];
        if reply.scores.len() != roll.steps.len() {
            continue;
        }
        let Some(value) = aggregation.apply(&reply.scores) else {
            continue;
        };
        let text = roll
            .steps
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let answer = extract_answer(&text);
        if let Some(answer) = &answer {
            tally.add(roll.start, answer, Some(value));
        }
        flight.tree_mut().set_rollout(
            roll.start,
            Rollout {
                steps: roll.added,
                answer,
                value,
            },
        );
        values[i] = Some(value);
    }
    Ok(values)
}

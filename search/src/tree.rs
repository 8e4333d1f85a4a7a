//! The search tree: an arena of nodes addressed by [`NodeId`], with statistics on edges.
//!
//! Every node except the root has exactly one incoming edge, stored in its parent's `edges` so
//! selection scans one contiguous slice (as KataGo keeps child pointers with their stats). Nodes
//! move forward through explicit [`NodeState`]s; only [`crate::Search`] mutates a tree, and
//! [`Tree::check_invariants`] verifies the bookkeeping after every search.

use std::fmt;
use std::sync::Arc;

use petgraph::graph::DiGraph;
use serde::{Deserialize, Serialize};

use crate::answer::Answer;
use crate::config::Backup;
use crate::error::{SearchError, Violation};
use crate::policy::{Step, StepStop};

/// Index of a node in its tree's arena. Ids are dense and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(u32);

impl NodeId {
    /// The root: the bare prompt.
    pub const ROOT: NodeId = NodeId(0);

    /// Position in the arena.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The raw id, as it appears in exports.
    pub fn get(self) -> u32 {
        self.0
    }

    pub(crate) const fn from_raw(raw: u32) -> NodeId {
        NodeId(raw)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// A leaf nobody has asked the policy about yet.
    Unexpanded,
    /// A policy call for its children is in flight.
    Expanding,
    /// It has children.
    Expanded,
    /// The policy or scorer failed for it, or every child failed; never selected again.
    Failed,
    /// Its path is a complete solution (end of sequence, or the depth limit).
    Terminal,
}

/// Statistics of one edge, i.e. of one node as seen from its parent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeStats {
    /// Simulations that went through this edge and were backed up.
    pub visits: u32,
    /// Sum of the values backed up through it.
    pub value_sum: f64,
    /// Largest value backed up through it (meaningful only when `visits > 0`).
    pub value_max: f64,
    /// Simulations in flight through it; each counts as a visit of value 0 until it lands.
    pub virtual_loss: u32,
}

impl EdgeStats {
    /// Q as selection sees it: in-flight simulations count as losses, and an edge nobody has
    /// visited is worth `value_init` (the scorer's value of the child).
    #[inline]
    pub fn q(&self, backup: Backup, value_init: f64) -> f64 {
        let n = self.visits + self.virtual_loss;
        if n == 0 {
            return value_init;
        }
        let total = match backup {
            Backup::Mean => self.value_sum,
            Backup::Max if self.visits == 0 => 0.0,
            Backup::Max => self.value_max * f64::from(self.visits),
        };
        total / f64::from(n)
    }

    /// Mean backed-up value, if any simulation landed.
    pub fn mean(&self) -> Option<f64> {
        (self.visits > 0).then(|| self.value_sum / f64::from(self.visits))
    }
}

/// An edge from a node to one of its children.
#[derive(Debug, Clone)]
pub struct Edge {
    /// The child it leads to.
    child: NodeId,
    /// P: the child's share of `exp(mean token log-prob)` among its siblings.
    prior: f32,
    /// The child's scored value; Q of the edge until a simulation lands.
    value_init: f64,
    /// The child failed: selection skips this edge. Mirrors the child's state so selection need
    /// not touch the child node.
    blocked: bool,
    /// Visits, values and virtual loss.
    stats: EdgeStats,
}

impl Edge {
    /// The child node.
    pub fn child(&self) -> NodeId {
        self.child
    }

    /// The child's prior probability among its siblings.
    pub fn prior(&self) -> f32 {
        self.prior
    }

    /// The edge's statistics.
    pub fn stats(&self) -> &EdgeStats {
        &self.stats
    }

    /// True when the child failed and is never selected.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }
}

/// The outcome of a rollout that started at a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Steps the rollout added below the node.
    pub steps: u32,
    /// The answer it reached, if it found one.
    pub answer: Option<Answer>,
    /// The scored value of the rolled-out path.
    pub value: f64,
}

/// One node: a step appended to its parent's path.
#[derive(Debug, Clone)]
pub struct Node {
    /// Parent and the index of our edge among its edges; `None` only for the root.
    parent: Option<(NodeId, u32)>,
    /// Steps from the root.
    depth: u32,
    /// Life-cycle state.
    state: NodeState,
    /// The step this node adds; `None` only for the root.
    step: Option<Arc<Step>>,
    /// Why the policy ended the step.
    stop: Option<StepStop>,
    /// Edges to the children, in the order the policy returned them.
    edges: Vec<Edge>,
    /// The scorer's value of the path ending here, aggregated over its steps.
    score: Option<f64>,
    /// The final answer, for terminal nodes that contain one.
    answer: Option<Answer>,
    /// Simulations that ended here (expansion evaluations and terminal revisits), so that visits
    /// into the node equal `end_visits` plus the child edges' visits.
    end_visits: u32,
    /// Children that are not exhausted; the node is exhausted when this reaches 0.
    open_children: u32,
    /// Children that failed; the node fails when every child has.
    blocked_children: u32,
    /// Nothing below this node is left to expand: it is final or failed, or every child is
    /// exhausted and it holds [`Tree::max_children`] children, so it cannot be widened.
    exhausted: bool,
    /// A policy call for more children of this expanded node is in flight (progressive
    /// widening); nobody else may widen it meanwhile.
    widening: bool,
    /// Policy calls that added children here (its first expansion and every widening); salts
    /// the sampling seed so each call draws new samples.
    expansions: u32,
    /// Why the node failed.
    failure: Option<String>,
    /// The rollout that started here, if any.
    rollout: Option<Rollout>,
}

impl Node {
    fn new(
        parent: Option<(NodeId, u32)>,
        depth: u32,
        step: Option<Arc<Step>>,
        stop: Option<StepStop>,
    ) -> Node {
        Node {
            parent,
            depth,
            state: NodeState::Unexpanded,
            step,
            stop,
            edges: Vec::new(),
            score: None,
            answer: None,
            end_visits: 0,
            open_children: 0,
            blocked_children: 0,
            exhausted: false,
            widening: false,
            expansions: 0,
            failure: None,
            rollout: None,
        }
    }

    /// The parent; `None` for the root.
    pub fn parent(&self) -> Option<NodeId> {
        self.parent.map(|(p, _)| p)
    }

    /// Steps from the root.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Life-cycle state.
    pub fn state(&self) -> NodeState {
        self.state
    }

    /// The step this node adds; `None` for the root.
    pub fn step(&self) -> Option<&Arc<Step>> {
        self.step.as_ref()
    }

    /// Why the policy ended the step.
    pub fn stop(&self) -> Option<StepStop> {
        self.stop
    }

    /// Edges to the children.
    pub fn edges(&self) -> &[Edge] {
        &self.edges
    }

    /// The scorer's value of the path ending here.
    pub fn score(&self) -> Option<f64> {
        self.score
    }

    /// The final answer of a terminal node.
    pub fn answer(&self) -> Option<&Answer> {
        self.answer.as_ref()
    }

    /// Simulations that ended at this node.
    pub fn end_visits(&self) -> u32 {
        self.end_visits
    }

    /// True when nothing below this node is left to expand.
    pub fn is_exhausted(&self) -> bool {
        self.exhausted
    }

    /// Children that are not exhausted.
    pub fn open_children(&self) -> u32 {
        self.open_children
    }

    /// True while a call for more children of this expanded node is in flight.
    pub fn is_widening(&self) -> bool {
        self.widening
    }

    /// Policy calls that added children here (the first expansion and every widening).
    pub fn expansions(&self) -> u32 {
        self.expansions
    }

    /// Why the node failed.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The rollout that started here.
    pub fn rollout(&self) -> Option<&Rollout> {
        self.rollout.as_ref()
    }
}

/// A child about to be added by an expansion.
#[derive(Debug)]
pub(crate) struct NewChild {
    pub(crate) step: Arc<Step>,
    pub(crate) stop: StepStop,
    pub(crate) prior: f32,
    pub(crate) terminal: bool,
    pub(crate) failure: Option<String>,
}

/// PUCT constants for [`Tree::select_child`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Puct {
    pub(crate) c_puct: f64,
    pub(crate) c_base: f64,
    pub(crate) backup: Backup,
}

/// The search tree.
#[derive(Debug, Clone)]
pub struct Tree {
    /// The arena; `nodes[0]` is the root.
    nodes: Vec<Node>,
    /// Statistics of the root's (imaginary) incoming edge: N of the root in PUCT.
    root_stats: EdgeStats,
    /// The prompt every path continues.
    prompt: Arc<str>,
    /// Most children one node may get through widening (0: widening off); a node holding this
    /// many whose children are all exhausted is exhausted itself.
    max_children: u32,
}

impl Tree {
    /// A tree holding only the root.
    pub fn new(prompt: impl Into<Arc<str>>) -> Tree {
        Tree {
            nodes: vec![Node::new(None, 0, None, None)],
            root_stats: EdgeStats::default(),
            prompt: prompt.into(),
            max_children: 0,
        }
    }

    /// A tree whose expanded nodes may be widened until they hold `max_children` children each.
    /// [`Tree::new`] makes one with widening off (0): a node's first expansion is its last.
    pub fn with_max_children(prompt: impl Into<Arc<str>>, max_children: u32) -> Tree {
        Tree {
            max_children,
            ..Tree::new(prompt)
        }
    }

    /// Most children one node may get through widening; 0 when widening is off.
    pub fn max_children(&self) -> u32 {
        self.max_children
    }

    /// True when `id` is expanded and may take more children (progressive widening): it holds
    /// fewer than [`Tree::max_children`] and no widening of it is in flight.
    pub fn can_widen(&self, id: NodeId) -> bool {
        let node = &self.nodes[id.index()];
        node.state == NodeState::Expanded && !node.widening && self.has_room(node)
    }

    fn has_room(&self, node: &Node) -> bool {
        (node.edges.len() as u64) < u64::from(self.max_children)
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a tree has a root.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The prompt.
    pub fn prompt(&self) -> &Arc<str> {
        &self.prompt
    }

    /// One node. Panics on an id from another tree that is out of range.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// Every node with its id, in id order (parents before children).
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (NodeId(i as u32), n))
    }

    /// Statistics of the edge into `id` (for the root, its own counters).
    pub fn incoming(&self, id: NodeId) -> &EdgeStats {
        match self.nodes[id.index()].parent {
            None => &self.root_stats,
            Some((p, i)) => &self.nodes[p.index()].edges[i as usize].stats,
        }
    }

    fn incoming_mut(&mut self, id: NodeId) -> &mut EdgeStats {
        match self.nodes[id.index()].parent {
            None => &mut self.root_stats,
            Some((p, i)) => &mut self.nodes[p.index()].edges[i as usize].stats,
        }
    }

    /// The prior of the edge into `id` (1 for the root).
    pub fn prior(&self, id: NodeId) -> f32 {
        match self.nodes[id.index()].parent {
            None => 1.0,
            Some((p, i)) => self.nodes[p.index()].edges[i as usize].prior,
        }
    }

    /// The steps from the root to `id`.
    pub fn path(&self, id: NodeId) -> Vec<Arc<Step>> {
        let mut steps = Vec::with_capacity(self.nodes[id.index()].depth as usize);
        let mut at = id;
        while let Some(step) = &self.nodes[at.index()].step {
            steps.push(Arc::clone(step));
            at = self.nodes[at.index()]
                .parent()
                .expect("a node with a step has a parent");
        }
        steps.reverse();
        steps
    }

    /// The solution text from the root to `id`: its steps' texts joined by newlines.
    pub fn solution_text(&self, id: NodeId) -> String {
        self.path(id)
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    // ---- Mutation, for the search only -------------------------------------------------------

    /// Claims `id` for a policy call that adds children: an unexpanded leaf becomes
    /// `Expanding`; an expanded node that [`Tree::can_widen`] is marked widening.
    pub(crate) fn begin_expanding(&mut self, id: NodeId) {
        let widen = self.can_widen(id);
        let node = &mut self.nodes[id.index()];
        if widen {
            node.widening = true;
            return;
        }
        assert_eq!(
            node.state,
            NodeState::Unexpanded,
            "{id} claimed for expansion twice (or widened past its limit)"
        );
        node.state = NodeState::Expanding;
    }

    /// Puts a node whose expansion was abandoned back as it was. Used by drop guards, so it must
    /// not panic.
    pub(crate) fn abandon_expanding(&mut self, id: NodeId) {
        let node = &mut self.nodes[id.index()];
        node.widening = false;
        if node.state == NodeState::Expanding {
            node.state = NodeState::Unexpanded;
        }
    }

    /// Adds the children of an expanding node and marks it expanded, or appends the children of
    /// a widening one (priors then shared among old and new children by their counts). A node
    /// left with no viable child fails, unless it can still be widened. Returns the new ids.
    pub(crate) fn expand(&mut self, parent: NodeId, children: Vec<NewChild>) -> Vec<NodeId> {
        let p = &self.nodes[parent.index()];
        let widening = p.state == NodeState::Expanded && p.widening;
        assert!(
            widening || p.state == NodeState::Expanding,
            "{parent} expanded while not expanding"
        );
        let depth = p.depth + 1;
        let old = p.edges.iter().filter(|e| !e.blocked).count();
        let fresh = children.iter().filter(|c| c.failure.is_none()).count();
        if widening && old + fresh > 0 {
            let keep = old as f32 / (old + fresh) as f32;
            for e in &mut self.nodes[parent.index()].edges {
                e.prior *= keep;
            }
        }
        let share = if widening && old + fresh > 0 {
            fresh as f32 / (old + fresh) as f32
        } else {
            1.0
        };
        let mut ids = Vec::with_capacity(children.len());
        let (mut open, mut blocked) = (0, 0);
        for c in children {
            let id = NodeId(u32::try_from(self.nodes.len()).expect("node count fits u32"));
            let index = self.nodes[parent.index()].edges.len() as u32;
            let mut node = Node::new(Some((parent, index)), depth, Some(c.step), Some(c.stop));
            let failed = c.failure.is_some();
            if failed {
                node.state = NodeState::Failed;
                node.failure = c.failure;
                blocked += 1;
            } else if c.terminal {
                node.state = NodeState::Terminal;
            }
            node.exhausted = failed || c.terminal;
            open += u32::from(!node.exhausted);
            self.nodes.push(node);
            let prior = if failed { 0.0 } else { c.prior * share };
            let edge = Edge {
                child: id,
                prior,
                value_init: 0.0,
                blocked: failed,
                stats: EdgeStats::default(),
            };
            self.nodes[parent.index()].edges.push(edge);
            ids.push(id);
        }
        let node = &mut self.nodes[parent.index()];
        node.state = NodeState::Expanded;
        node.widening = false;
        node.expansions = node.expansions.saturating_add(1);
        node.open_children += open;
        node.blocked_children += blocked;
        let (open, blocked, len) = (node.open_children, node.blocked_children, node.edges.len());
        let room = self.has_room(&self.nodes[parent.index()]);
        if blocked as usize == len && !room {
            self.fail(parent, "no viable continuation");
        } else if open == 0 && !room {
            self.mark_exhausted(parent);
        }
        ids
    }

    /// Marks a node failed, blocks its edge, and fails ancestors left without viable children.
    /// Never panics: drop guards call it.
    pub(crate) fn fail(&mut self, id: NodeId, reason: &str) {
        let mut at = id;
        let mut reason = reason.to_owned();
        loop {
            let node = &mut self.nodes[at.index()];
            if node.state == NodeState::Failed {
                return;
            }
            node.state = NodeState::Failed;
            node.failure = Some(reason);
            self.mark_exhausted(at);
            let Some((parent, edge)) = self.nodes[at.index()].parent else {
                return;
            };
            let room = self.has_room(&self.nodes[parent.index()]);
            let p = &mut self.nodes[parent.index()];
            p.edges[edge as usize].blocked = true;
            p.blocked_children += 1;
            if p.state != NodeState::Expanded
                || (p.blocked_children as usize) < p.edges.len()
                || room
            {
                return;
            }
            at = parent;
            reason = "every child failed".to_owned();
        }
    }

    /// Marks a node exhausted and walks up, exhausting every ancestor left with no open child.
    fn mark_exhausted(&mut self, id: NodeId) {
        let mut at = id;
        loop {
            let node = &mut self.nodes[at.index()];
            if node.exhausted {
                return;
            }
            node.exhausted = true;
            let Some((parent, _)) = node.parent else {
                return;
            };
            let room = self.has_room(&self.nodes[parent.index()]);
            let p = &mut self.nodes[parent.index()];
            p.open_children = p.open_children.saturating_sub(1);
            if p.open_children > 0 || p.state != NodeState::Expanded || room {
                return;
            }
            at = parent;
        }
    }

    /// Records the scorer's value of the path ending at `id`.
    pub(crate) fn set_score(&mut self, id: NodeId, value: f64) {
        assert!(value.is_finite(), "{id}: non-finite score {value}");
        self.nodes[id.index()].score = Some(value);
        if let Some((p, i)) = self.nodes[id.index()].parent {
            self.nodes[p.index()].edges[i as usize].value_init = value;
        }
    }

    pub(crate) fn set_answer(&mut self, id: NodeId, answer: Option<Answer>) {
        self.nodes[id.index()].answer = answer;
    }

    pub(crate) fn set_rollout(&mut self, id: NodeId, rollout: Rollout) {
        assert!(rollout.value.is_finite(), "{id}: non-finite rollout value");
        self.nodes[id.index()].rollout = Some(rollout);
    }

    /// Picks the child edge with the highest PUCT score, AlphaZero's form:
    /// `Q + c(s) · P · sqrt(N_parent) / (1 + N)` with `c(s) = c_puct + ln((N_parent + c_base + 1) / c_base)`.
    /// In-flight simulations count in both N's. Ties go to the earlier edge. Failed children are
    /// skipped, and exhausted ones too (final answers are valued once, when they are made).
    #[inline]
    pub(crate) fn select_open_child(&self, id: NodeId, puct: &Puct) -> Option<u32> {
        self.select_where(id, puct, |tree, e| !tree.nodes[e.child.index()].exhausted)
    }

    /// [`Tree::select_open_child`] over every child that has not failed.
    #[cfg(test)]
    pub(crate) fn select_child(&self, id: NodeId, puct: &Puct) -> Option<u32> {
        self.select_where(id, puct, |_, _| true)
    }

    #[inline]
    fn select_where(
        &self,
        id: NodeId,
        puct: &Puct,
        eligible: impl Fn(&Tree, &Edge) -> bool,
    ) -> Option<u32> {
        let incoming = self.incoming(id);
        let n_parent = f64::from(incoming.visits + incoming.virtual_loss);
        let c = puct.c_puct + ((n_parent + puct.c_base + 1.0) / puct.c_base).ln();
        let explore = c * n_parent.sqrt();
        let mut best = None;
        let mut best_score = f64::NEG_INFINITY;
        for (i, e) in self.nodes[id.index()].edges.iter().enumerate() {
            if e.blocked || !eligible(self, e) {
                continue;
            }
            let n_child = f64::from(e.stats.visits + e.stats.virtual_loss);
            let score = e.stats.q(puct.backup, e.value_init)
                + explore * f64::from(e.prior) / (1.0 + n_child);
            if score > best_score {
                best_score = score;
                best = Some(i as u32);
            }
        }
        best
    }

    /// Adds one virtual loss on every edge from the root to `leaf`.
    pub(crate) fn add_virtual_loss(&mut self, leaf: NodeId) {
        let mut at = leaf;
        loop {
            self.incoming_mut(at).virtual_loss += 1;
            match self.nodes[at.index()].parent {
                Some((p, _)) => at = p,
                None => return,
            }
        }
    }

    /// Adds one virtual loss on the edge into `child` only (a simulation stepping one level on).
    pub(crate) fn add_virtual_loss_edge(&mut self, child: NodeId) {
        self.incoming_mut(child).virtual_loss += 1;
    }

    /// Removes one virtual loss from every edge from the root to `leaf`, and when `value` is given,
    /// backs it up in the same walk. Returns the number of edges walked. Never panics.
    pub(crate) fn settle(&mut self, leaf: NodeId, value: Option<f64>) -> u64 {
        if value.is_some() {
            let node = &mut self.nodes[leaf.index()];
            node.end_visits = node.end_visits.saturating_add(1);
        }
        let mut at = leaf;
        let mut walked = 0;
        loop {
            let stats = self.incoming_mut(at);
            stats.virtual_loss = stats.virtual_loss.saturating_sub(1);
            if let Some(v) = value {
                stats.visits = stats.visits.saturating_add(1);
                stats.value_sum += v;
                stats.value_max = if stats.visits == 1 {
                    v
                } else {
                    stats.value_max.max(v)
                };
            }
            walked += 1;
            match self.nodes[at.index()].parent {
                Some((p, _)) => at = p,
                None => return walked,
            }
        }
    }

    // ---- Invariants ---------------------------------------------------------------------------

    /// Checks the bookkeeping: no virtual loss left, no node left expanding, visits into every node
    /// equal the visits that ended there plus its child edges' visits, every stored float finite,
    /// and parent links, depths, states, blocked flags and exhaustion consistent.
    pub fn check_invariants(&self) -> Result<(), SearchError> {
        let mut violations = Vec::new();
        let structure = |violations: &mut Vec<Violation>, node, what| {
            violations.push(Violation::Structure { node, what })
        };
        for (id, node) in self.nodes() {
            match (id == NodeId::ROOT, node.parent, &node.step) {
                (true, None, None) => {}
                (false, Some((p, i)), Some(_)) => {
                    let parent = &self.nodes[p.index()];
                    if parent.edges.get(i as usize).map(|e| e.child) != Some(id) {
                        structure(&mut violations, id, "parent's edge does not point back");
                    }
                    if node.depth != parent.depth + 1 {
                        structure(&mut violations, id, "depth is not parent's + 1");
                    }
                }
                _ => structure(&mut violations, id, "root/parent/step disagree"),
            }
            let has_edges = !node.edges.is_empty();
            let edges_ok = match node.state {
                NodeState::Expanded => has_edges,
                NodeState::Unexpanded | NodeState::Expanding | NodeState::Terminal => !has_edges,
                NodeState::Failed => true,
            };
            if !edges_ok {
                structure(&mut violations, id, "edges do not fit the state");
            }
            let mut open = 0;
            let mut blocked = 0;
            for edge in &node.edges {
                let child = &self.nodes[edge.child.index()];
                if edge.blocked != (child.state == NodeState::Failed) {
                    structure(
                        &mut violations,
                        edge.child,
                        "blocked flag disagrees with the child's state",
                    );
                }
                open += u32::from(!child.exhausted);
                blocked += u32::from(edge.blocked);
            }
            if node.state == NodeState::Expanded
                && (open != node.open_children || blocked != node.blocked_children)
            {
                structure(&mut violations, id, "open/blocked child counts are stale");
            }
            let exhausted = match node.state {
                NodeState::Terminal | NodeState::Failed => true,
                NodeState::Expanded => open == 0 && !self.has_room(node),
                NodeState::Unexpanded | NodeState::Expanding => false,
            };
            if exhausted != node.exhausted {
                structure(&mut violations, id, "exhausted flag is stale");
            }
            let finite = |violations: &mut Vec<Violation>, field, value: f64| {
                if !value.is_finite() {
                    violations.push(Violation::NotFinite { node: id, field });
                }
            };
            let incoming = self.incoming(id);
            finite(&mut violations, "value_sum", incoming.value_sum);
            finite(&mut violations, "value_max", incoming.value_max);
            finite(&mut violations, "prior", f64::from(self.prior(id)));
            if let Some(score) = node.score {
                finite(&mut violations, "score", score);
            }
            if let Some((p, i)) = node.parent {
                finite(
                    &mut violations,
                    "value_init",
                    self.nodes[p.index()].edges[i as usize].value_init,
                );
            }
            if let Some(r) = &node.rollout {
                finite(&mut violations, "rollout.value", r.value);
            }
            if node.state == NodeState::Expanding || node.widening {
                violations.push(Violation::LeftExpanding { node: id });
            }
            if incoming.virtual_loss != 0 {
                violations.push(Violation::VirtualLossLeft {
                    node: id,
                    virtual_loss: incoming.virtual_loss,
                });
            }
            let accounted = u64::from(node.end_visits)
                + node
                    .edges
                    .iter()
                    .map(|e| u64::from(e.stats.visits))
                    .sum::<u64>();
            if u64::from(incoming.visits) != accounted {
                violations.push(Violation::VisitsDoNotAddUp {
                    node: id,
                    incoming: incoming.visits,
                    accounted,
                });
            }
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(SearchError::InvariantsViolated { violations })
        }
    }

    // ---- Export -------------------------------------------------------------------------------

    /// A serde-friendly copy of the whole tree, in id order.
    pub fn export(&self) -> TreeExport {
        let nodes = self
            .nodes()
            .map(|(id, node)| {
                let stats = *self.incoming(id);
                NodeExport {
                    id,
                    parent: node.parent(),
                    depth: node.depth,
                    state: node.state,
                    text: node.step.as_ref().map(|s| s.text.clone()),
                    tokens: node.step.as_ref().map_or(0, |s| s.token_ids.len() as u32),
                    stop: node.stop,
                    prior: self.prior(id),
                    visits: stats.visits,
                    value_sum: stats.value_sum,
                    value_max: stats.value_max,
                    virtual_loss: stats.virtual_loss,
                    end_visits: node.end_visits,
                    score: node.score,
                    answer: node.answer.clone(),
                    failure: node.failure.clone(),
                    rollout: node.rollout.clone(),
                }
            })
            .collect();
        TreeExport {
            prompt: self.prompt.to_string(),
            nodes,
        }
    }

    /// The tree as a petgraph graph whose node indices equal the node ids; edge weights are the
    /// edge statistics.
    pub fn to_petgraph(&self) -> DiGraph<NodeExport, EdgeStats> {
        let export = self.export();
        let mut graph =
            DiGraph::with_capacity(export.nodes.len(), export.nodes.len().saturating_sub(1));
        for node in export.nodes {
            graph.add_node(node);
        }
        for (id, node) in self.nodes() {
            for edge in &node.edges {
                graph.add_edge(
                    petgraph::graph::NodeIndex::new(id.index()),
                    petgraph::graph::NodeIndex::new(edge.child.index()),
                    edge.stats,
                );
            }
        }
        graph
    }

    /// Graphviz DOT of the tree, one short label per node and edge.
    pub fn to_dot(&self) -> String {
        let graph = self.to_petgraph().map(
            |_, n| {
                let text: String = n
                    .text
                    .as_deref()
                    .unwrap_or("(prompt)")
                    .chars()
                    .take(40)
                    .collect();
                let score = n
                    .score
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}"));
                format!("{} {:?}\n{text}\nscore {score}", n.id, n.state)
            },
            |_, e| {
                format!(
                    "N={} Q={}",
                    e.visits,
                    e.mean()
                        .map_or_else(|| "-".to_owned(), |q| format!("{q:.3}"))
                )
            },
        );
        format!("{}", petgraph::dot::Dot::new(&graph))
    }
}

/// A serialisable copy of a [`Tree`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeExport {
    /// The prompt.
    pub prompt: String,
    /// Every node, in id order.
    pub nodes: Vec<NodeExport>,
}

/// A serialisable copy of one node and the statistics of the edge into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeExport {
    /// Its id.
    pub id: NodeId,
    /// Its parent.
    pub parent: Option<NodeId>,
    /// Steps from the root.
    pub depth: u32,
    /// Life-cycle state.
    pub state: NodeState,
    /// The step's text.
    pub text: Option<String>,
    /// The step's token count.
    pub tokens: u32,
    /// Why the step ended.
    pub stop: Option<StepStop>,
    /// Prior of the edge into it.
    pub prior: f32,
    /// Visits of the edge into it.
    pub visits: u32,
    /// Value sum of the edge into it.
    pub value_sum: f64,
    /// Largest value backed up through the edge into it.
    pub value_max: f64,
    /// Virtual loss on the edge into it (0 after a search).
    pub virtual_loss: u32,
    /// Simulations that ended here.
    pub end_visits: u32,
    /// Scored value of its path.
    pub score: Option<f64>,
    /// Its final answer.
    pub answer: Option<Answer>,
    /// Why it failed.
    pub failure: Option<String>,
    /// The rollout that started here.
    pub rollout: Option<Rollout>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(text: &str) -> Arc<Step> {
        Arc::new(Step {
            text: text.into(),
            token_ids: vec![1, 2],
            token_logprobs: vec![-0.1, -0.2],
        })
    }

    fn child(text: &str, prior: f32, terminal: bool, failure: Option<&str>) -> NewChild {
        NewChild {
            step: step(text),
            stop: StepStop::Delimiter,
            prior,
            terminal,
            failure: failure.map(str::to_owned),
        }
    }

    const PUCT: Puct = Puct {
        c_puct: 1.0,
        c_base: 19652.0,
        backup: Backup::Mean,
    };

    /// Root with children a (open), b (terminal), c (failed at birth).
    fn small_tree() -> (Tree, Vec<NodeId>) {
        let mut tree = Tree::new("q");
        tree.begin_expanding(NodeId::ROOT);
        let ids = tree.expand(
            NodeId::ROOT,
            vec![
                child("a", 0.5, false, None),
                child("b", 0.5, true, None),
                child("c", 0.0, false, Some("bad")),
            ],
        );
        tree.set_score(ids[0], 0.4);
        tree.set_score(ids[1], 0.9);
        (tree, ids)
    }

    #[test]
    fn expansion_links_children_and_counts() {
        let (tree, ids) = small_tree();
        tree.check_invariants().unwrap();
        assert_eq!(tree.node(NodeId::ROOT).state(), NodeState::Expanded);
        assert_eq!(tree.node(ids[1]).state(), NodeState::Terminal);
        assert_eq!(tree.node(ids[2]).state(), NodeState::Failed);
        assert!(tree.node(NodeId::ROOT).edges()[2].is_blocked());
        assert_eq!(tree.path(ids[0]).len(), 1);
        assert_eq!(tree.solution_text(ids[0]), "a");
    }

    #[test]
    fn selection_skips_failed_and_prefers_value_then_explores() {
        let (mut tree, ids) = small_tree();
        // No visits yet: U is 0, so the higher initial value (the terminal b) wins.
        assert_eq!(tree.select_child(NodeId::ROOT, &PUCT), Some(1));
        // b lands a poor value a few times; a becomes the better bet.
        for _ in 0..3 {
            tree.add_virtual_loss(ids[1]);
            tree.settle(ids[1], Some(0.0));
        }
        assert_eq!(tree.select_child(NodeId::ROOT, &PUCT), Some(0));
        tree.check_invariants().unwrap();
    }

    #[test]
    fn virtual_loss_steers_away_and_is_released() {
        let (mut tree, ids) = small_tree();
        tree.add_virtual_loss(ids[1]);
        assert_eq!(tree.incoming(ids[1]).virtual_loss, 1);
        assert_eq!(tree.root_stats.virtual_loss, 1);
        assert_eq!(
            tree.select_child(NodeId::ROOT, &PUCT),
            Some(0),
            "an in-flight edge looks like a loss"
        );
        assert!(matches!(
            tree.check_invariants(),
            Err(SearchError::InvariantsViolated { .. })
        ));
        assert_eq!(tree.settle(ids[1], None), 2);
        tree.check_invariants().unwrap();
        assert_eq!(tree.incoming(ids[1]).visits, 0);
    }

    #[test]
    fn backup_mean_and_max() {
        let (mut tree, ids) = small_tree();
        for v in [0.2, 0.6] {
            tree.add_virtual_loss(ids[0]);
            tree.settle(ids[0], Some(v));
        }
        let stats = *tree.incoming(ids[0]);
        assert_eq!(stats.visits, 2);
        assert!((stats.q(Backup::Mean, 0.0) - 0.4).abs() < 1e-12);
        assert!((stats.q(Backup::Max, 0.0) - 0.6).abs() < 1e-12);
        assert_eq!(tree.root_stats.visits, 2);
        assert_eq!(tree.node(ids[0]).end_visits(), 2);
        tree.check_invariants().unwrap();
    }

    #[test]
    fn failure_propagates_and_exhaustion_follows() {
        let (mut tree, ids) = small_tree();
        assert!(!tree.node(NodeId::ROOT).is_exhausted());
        tree.begin_expanding(ids[0]);
        let grand = tree.expand(ids[0], vec![child("a1", 1.0, false, None)]);
        tree.fail(grand[0], "scorer NaN");
        // a had one child and it failed: a fails; root keeps the terminal b, so it is exhausted
        // (nothing left to expand) but not failed.
        assert_eq!(tree.node(ids[0]).state(), NodeState::Failed);
        assert_eq!(tree.node(NodeId::ROOT).state(), NodeState::Expanded);
        assert!(tree.node(NodeId::ROOT).is_exhausted());
        tree.check_invariants().unwrap();
    }

    #[test]
    fn abandoned_expansion_is_detected_until_undone() {
        let (mut tree, ids) = small_tree();
        tree.begin_expanding(ids[0]);
        let err = tree.check_invariants().unwrap_err();
        assert!(err.to_string().contains("expanding"), "{err}");
        tree.abandon_expanding(ids[0]);
        tree.check_invariants().unwrap();
    }

    #[test]
    fn invariants_catch_broken_visit_counts() {
        let (mut tree, ids) = small_tree();
        tree.nodes[ids[0].index()].end_visits = 1;
        let Err(SearchError::InvariantsViolated { violations }) = tree.check_invariants() else {
            panic!("not caught")
        };
        assert_eq!(
            violations,
            vec![Violation::VisitsDoNotAddUp {
                node: ids[0],
                incoming: 0,
                accounted: 1
            }]
        );
    }

    #[test]
    fn exports_agree() {
        let (tree, _) = small_tree();
        let export = tree.export();
        assert_eq!(export.nodes.len(), 4);
        let json = serde_json::to_string(&export).unwrap();
        let back: TreeExport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, export);
        let graph = tree.to_petgraph();
        assert_eq!((graph.node_count(), graph.edge_count()), (4, 3));
        let dot = tree.to_dot();
        assert!(dot.starts_with("digraph"), "{dot}");
        assert!(dot.contains("n1 Unexpanded"), "{dot}");
    }
}

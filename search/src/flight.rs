//! The guard that owns one round's in-flight work on the tree.
//!
//! A round claims leaves (moving them to `Expanding` and loading virtual loss on their paths),
//! awaits policy and scorer calls, then settles. If the round ends any other way — an error, a
//! cancelled or timed-out call (the future is dropped), a panic in a policy — [`InFlight`]'s `Drop`
//! releases every virtual loss, puts unexpanded leaves back, and fails children whose score never
//! came, so the tree stays consistent on every exit path.

use crate::tree::{NodeId, NodeState, Tree};

pub(crate) struct InFlight<'t> {
    /// The tree, borrowed for the whole round so nothing else can touch it meanwhile.
    tree: &'t mut Tree,
    /// The end node of every simulation still carrying virtual loss; `None` once settled.
    loaded: Vec<Option<NodeId>>,
    /// Nodes this round moved to `Expanding`.
    expanding: Vec<NodeId>,
    /// Nodes whose score this round has asked for but not yet stored.
    unscored: Vec<NodeId>,
}

impl<'t> InFlight<'t> {
    pub(crate) fn new(tree: &'t mut Tree) -> InFlight<'t> {
        InFlight {
            tree,
            loaded: Vec::new(),
            expanding: Vec::new(),
            unscored: Vec::new(),
        }
    }

    pub(crate) fn tree(&self) -> &Tree {
        self.tree
    }

    pub(crate) fn tree_mut(&mut self) -> &mut Tree {
        self.tree
    }

    /// Moves `node` to `Expanding`; the guard puts it back if the round is abandoned.
    pub(crate) fn begin_expanding(&mut self, node: NodeId) {
        self.tree.begin_expanding(node);
        self.expanding.push(node);
    }

    /// Loads virtual loss on the path to `leaf` and returns the simulation's slot.
    pub(crate) fn load(&mut self, leaf: NodeId) -> usize {
        self.tree.add_virtual_loss(leaf);
        self.loaded.push(Some(leaf));
        self.loaded.len() - 1
    }

    /// Moves simulation `slot` one level down, from its end node to `child`.
    pub(crate) fn step_down(&mut self, slot: usize, child: NodeId) {
        debug_assert_eq!(self.loaded[slot], self.tree.node(child).parent());
        self.tree.add_virtual_loss_edge(child);
        self.loaded[slot] = Some(child);
    }

    /// Where simulation `slot` currently ends.
    pub(crate) fn end(&self, slot: usize) -> Option<NodeId> {
        self.loaded[slot]
    }

    /// Releases simulation `slot`'s virtual loss and, with `Some(value)`, backs the value up.
    /// Returns the number of edges walked.
    pub(crate) fn settle(&mut self, slot: usize, value: Option<f64>) -> u64 {
        match self.loaded[slot].take() {
            Some(leaf) => self.tree.settle(leaf, value),
            None => 0,
        }
    }

    /// Records that scores for `nodes` are owed until [`InFlight::scores_stored`].
    pub(crate) fn owe_scores(&mut self, nodes: &[NodeId]) {
        self.unscored.extend_from_slice(nodes);
    }

    pub(crate) fn scores_stored(&mut self) {
        self.unscored.clear();
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Nothing here may panic: this also runs while unwinding.
        for leaf in self.loaded.drain(..).flatten() {
            self.tree.settle(leaf, None);
        }
        for node in self.expanding.drain(..) {
            self.tree.abandon_expanding(node);
        }
        for node in self.unscored.drain(..) {
            let n = self.tree.node(node);
            if n.score().is_none() && n.state() != NodeState::Failed {
                self.tree.fail(node, "abandoned before its score arrived");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Step, StepStop};
    use crate::tree::NewChild;
    use std::sync::Arc;

    fn tree_with_children(n: usize) -> (Tree, Vec<NodeId>) {
        let mut tree = Tree::new("q");
        tree.begin_expanding(NodeId::ROOT);
        let step = Arc::new(Step {
            text: "s".into(),
            token_ids: vec![1],
            token_logprobs: vec![0.0],
        });
        let children = (0..n)
            .map(|_| NewChild {
                step: Arc::clone(&step),
                stop: StepStop::Delimiter,
                prior: 1.0,
                terminal: false,
                failure: None,
            })
            .collect();
        let ids = tree.expand(NodeId::ROOT, children);
        (tree, ids)
    }

    #[test]
    fn dropping_a_round_releases_everything() {
        let (mut tree, ids) = tree_with_children(2);
        {
            let mut flight = InFlight::new(&mut tree);
            flight.begin_expanding(ids[0]);
            flight.load(ids[0]);
            let slot = flight.load(NodeId::ROOT);
            flight.step_down(slot, ids[1]);
            flight.owe_scores(&[ids[1]]);
            assert!(flight.tree().check_invariants().is_err());
        }
        tree.check_invariants().unwrap();
        assert_eq!(tree.node(ids[0]).state(), NodeState::Unexpanded);
        assert_eq!(
            tree.node(ids[1]).state(),
            NodeState::Failed,
            "an unscored child cannot stay selectable"
        );
    }

    #[test]
    fn a_panic_mid_round_releases_everything() {
        let (mut tree, ids) = tree_with_children(1);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut flight = InFlight::new(&mut tree);
            flight.begin_expanding(ids[0]);
            flight.load(ids[0]);
            panic!("policy blew up");
        }));
        assert!(result.is_err());
        tree.check_invariants().unwrap();
    }

    #[test]
    fn settled_simulations_keep_their_visits() {
        let (mut tree, ids) = tree_with_children(1);
        {
            let mut flight = InFlight::new(&mut tree);
            let slot = flight.load(ids[0]);
            assert_eq!(flight.settle(slot, Some(0.5)), 2);
            assert_eq!(
                flight.settle(slot, Some(0.5)),
                0,
                "settling twice is a no-op"
            );
        }
        tree.check_invariants().unwrap();
        assert_eq!(tree.incoming(ids[0]).visits, 1);
    }
}

//! The crate's one error enum, plus the two error values the traits return.

use std::fmt;

use crate::tree::NodeId;

/// Everything that can make a search refuse to start or refuse to report.
///
/// Failures of the policy or the scorer are *not* here: they mark nodes failed and the search goes
/// on (see [`crate::SearchStats`]). This enum is for programmer and configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// A configuration value is out of its allowed range.
    #[error("invalid config `{field}`: {reason}")]
    InvalidConfig {
        /// Dotted path of the offending field, e.g. `strategy.beam_width`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// [`crate::Search::run`] was called a second time on the same search.
    #[error("this search has already run; build a new `Search` to search again")]
    AlreadyRun,
    /// The tree broke one of its invariants: this is a bug in the search, never in the caller.
    #[error("tree invariants violated: {}", violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvariantsViolated {
        /// Every violation found, in node order.
        violations: Vec<Violation>,
    },
}

/// One broken tree invariant, as found by [`crate::Tree::check_invariants`].
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// An edge (or the root's own counter) still carries virtual loss after a search.
    VirtualLossLeft {
        /// The child the edge leads to (the root for the root's counter).
        node: NodeId,
        /// How much is left.
        virtual_loss: u32,
    },
    /// A node is still marked as being expanded.
    LeftExpanding {
        /// The node.
        node: NodeId,
    },
    /// Visits into a node differ from the visits that ended there plus those that went on.
    VisitsDoNotAddUp {
        /// The node.
        node: NodeId,
        /// Visits on the edge into the node.
        incoming: u32,
        /// Visits that ended at the node plus the visits of all its child edges.
        accounted: u64,
    },
    /// A stored float is NaN or infinite.
    NotFinite {
        /// The node that holds it.
        node: NodeId,
        /// Which field.
        field: &'static str,
    },
    /// Parent, child, depth, state or edge bookkeeping disagree.
    Structure {
        /// The node.
        node: NodeId,
        /// What disagrees.
        what: &'static str,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::VirtualLossLeft { node, virtual_loss } => {
                write!(f, "{node}: virtual loss {virtual_loss} left on its edge")
            }
            Violation::LeftExpanding { node } => write!(f, "{node}: left in state expanding"),
            Violation::VisitsDoNotAddUp {
                node,
                incoming,
                accounted,
            } => {
                write!(f, "{node}: {incoming} visits in, {accounted} accounted for")
            }
            Violation::NotFinite { node, field } => write!(f, "{node}: `{field}` is not finite"),
            Violation::Structure { node, what } => write!(f, "{node}: {what}"),
        }
    }
}

/// A failed [`crate::Policy::propose`] call. The search marks the nodes it has no reply for
/// failed and goes on.
///
/// A call can fail in part: one served by several workers, say, where one worker failed and
/// the others answered. [`PolicyError::partial`] carries the replies that did come, in request
/// order, so the search keeps that work and charges what it cost.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy call failed: {message}")]
pub struct PolicyError {
    /// What went wrong, for logs and the event stream.
    pub message: String,
    /// The replies that did come, one slot per request in request order (`None` where the
    /// request failed); empty when the whole call failed. A list of another length is ignored
    /// (its costs are still charged).
    pub partial: Vec<Option<crate::policy::Proposals>>,
}

impl PolicyError {
    /// A call that failed as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        PolicyError {
            message: message.into(),
            partial: Vec::new(),
        }
    }

    /// A call that failed in part: `replies` has one slot per request, `None` where it failed.
    pub fn partial(
        message: impl Into<String>,
        replies: Vec<Option<crate::policy::Proposals>>,
    ) -> Self {
        PolicyError {
            message: message.into(),
            partial: replies,
        }
    }
}

/// A failed [`crate::Scorer::score`] call. The search marks the nodes of that batch failed and
/// goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scorer call failed: {message}")]
pub struct ScoreError {
    /// What went wrong, for logs and the event stream.
    pub message: String,
}

impl ScoreError {
    /// An error with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        ScoreError {
            message: message.into(),
        }
    }
}

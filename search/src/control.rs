//! Talking to a running search: cancelling it, watching its events and its best answer so far.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::answer::Answer;
use crate::outcome::{Costs, Termination};
use crate::tree::{NodeId, Tree};

/// Cancels a search from anywhere. Clones share one flag; cancelling is permanent.
///
/// A cancelled search abandons its in-flight call (its virtual loss is released), and returns
/// normally with [`Termination::Cancelled`] and the best answer found so far.
#[derive(Debug, Clone)]
pub struct CancelToken {
    /// A watch channel rather than a bare flag so waiters wake at once.
    flag: Arc<watch::Sender<bool>>,
}

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken::new()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> CancelToken {
        CancelToken {
            flag: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Cancels every search holding a clone of this token.
    pub fn cancel(&self) {
        self.flag.send_replace(true);
    }

    /// True once [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.flag.borrow()
    }

    /// Completes once the token is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.flag.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|&cancelled| cancelled).await;
    }
}

/// Copies of a running search's tree, made only while someone reads them: the search copies
/// its tree at the end of a round, where the tree is consistent (no call in flight, every
/// backup done), at most every [`TreeTap::MIN_INTERVAL`] and only within
/// [`TreeTap::WANTED_FOR`] of a [`TreeTap::snapshot`], and once more when it ends. A tree nobody
/// asks for is never copied while it runs. Clones share one tap.
///
/// A copy costs O(nodes); the interval bounds that cost for large trees grown by fast rounds.
/// A search without a tap makes none.
#[derive(Debug, Clone)]
pub struct TreeTap {
    latest: Arc<watch::Sender<Option<TreeCopy>>>,
    /// When the last copy was made (tokio's clock, which tests can pause).
    copied_at: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// Until when a reader wants fresh copies, and whether one waits for a copy not made yet
    /// (set by `snapshot`; a round longer than the window still ends in a copy).
    wanted: Arc<std::sync::Mutex<(Option<tokio::time::Instant>, bool)>>,
    /// Copies made of the running tree (the final one not counted).
    copies: Arc<std::sync::atomic::AtomicU64>,
}

/// A copy of the tree, and whether the search had ended when it was made.
type TreeCopy = (Arc<Tree>, bool);

impl Default for TreeTap {
    fn default() -> Self {
        TreeTap::new()
    }
}

impl TreeTap {
    /// Shortest time between two copies of a running search's tree.
    pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

    /// How long after a read the search keeps copying at round ends (a reader that polls sees
    /// fresh copies without waiting for a round each time).
    pub const WANTED_FOR: std::time::Duration = std::time::Duration::from_secs(2);

    /// How long a read waits for a copy fresher than [`TreeTap::MIN_INTERVAL`] before taking
    /// an older one (a round can be long: a slow worker call).
    pub const FRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

    /// A tap no search has used yet.
    pub fn new() -> TreeTap {
        TreeTap {
            latest: Arc::new(watch::Sender::new(None)),
            copied_at: Arc::new(std::sync::Mutex::new(None)),
            wanted: Arc::new(std::sync::Mutex::new((None, false))),
            copies: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Copies made of the running tree so far (the final copy not counted).
    pub fn copies(&self) -> u64 {
        self.copies.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A recent copy of the tree, and whether it is the final one (the search had ended). Asks
    /// the search for copies for the next [`TreeTap::WANTED_FOR`]; returns the latest at once
    /// when it is final or younger than [`TreeTap::MIN_INTERVAL`], else the next one made
    /// within [`TreeTap::FRESH_WAIT`], else the latest. With no copy yet, waits for the end of
    /// the current round; callers bound that with a timeout.
    pub async fn snapshot(&self) -> (Arc<Tree>, bool) {
        let now = tokio::time::Instant::now();
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) =
            (Some(now + Self::WANTED_FOR), true);
        let mut rx = self.latest.subscribe();
        let fresh = self
            .copied_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| now.duration_since(t) < Self::MIN_INTERVAL);
        let current = rx.borrow_and_update().clone();
        match current {
            Some(copy) if copy.1 || fresh => return copy,
            Some(older) => {
                // The sender lives in `self`, so the channel cannot close while we wait.
                return match tokio::time::timeout(Self::FRESH_WAIT, rx.changed()).await {
                    Ok(_) => rx.borrow().clone().unwrap_or(older),
                    Err(_) => older,
                };
            }
            None => {}
        }
        let copy = rx
            .wait_for(Option::is_some)
            .await
            .map(|copy| copy.clone())
            .ok()
            .flatten();
        copy.expect("the tap's sender outlives its readers")
    }

    /// Called by the search at the end of every round.
    pub(crate) fn offer(&self, tree: &Tree) {
        let now = tokio::time::Instant::now();
        {
            let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
            let (until, pending) = *wanted;
            if !pending && until.is_none_or(|until| now > until) {
                return;
            }
            let mut at = self.copied_at.lock().unwrap_or_else(|e| e.into_inner());
            if at.is_some_and(|t| now.duration_since(t) < Self::MIN_INTERVAL) {
                return;
            }
            *at = Some(now);
            wanted.1 = false;
        }
        self.copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.latest
            .send_replace(Some((Arc::new(tree.clone()), false)));
    }

    /// Called by the search when it ends: the final tree.
    pub(crate) fn close(&self, tree: &Tree) {
        self.latest
            .send_replace(Some((Arc::new(tree.clone()), true)));
    }
}

/// The answer a search would give if it stopped now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestAnswer {
    /// The answer.
    pub answer: Answer,
    /// The node that holds it (for a rollout answer: the node the rollout started from).
    pub node: NodeId,
    /// Its value, when it was scored.
    pub value: Option<f64>,
    /// Final answers equivalent to it found so far.
    pub votes: u32,
    /// Sum of those answers' values.
    pub weight: f64,
}

/// Something that happened in the tree; a streaming front end forwards these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SearchEvent {
    /// A node got children.
    NodeExpanded {
        /// The node.
        node: NodeId,
        /// Its new children, in order.
        children: Vec<NodeId>,
    },
    /// A node's path got a value from the scorer.
    NodeScored {
        /// The node.
        node: NodeId,
        /// The aggregated value.
        value: f64,
    },
    /// A node failed (policy or scorer error, NaN score, malformed reply).
    NodeFailed {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The best answer so far changed.
    BestAnswer(BestAnswer),
    /// The search ended.
    Finished {
        /// Why it ended.
        termination: Termination,
        /// What it spent.
        costs: Costs,
    },
}

/// The caller's handles on one running search.
///
/// Events go through a bounded channel with `try_send`: a slow reader loses events (counted in
/// [`crate::SearchStats::events_dropped`]) rather than stalling the search. The best answer so far
/// is also kept in a watch channel, which never loses the latest value.
#[derive(Debug)]
pub struct SearchControl {
    /// Checked before every round and raced against every call.
    cancel: CancelToken,
    /// Where tree events go, if anyone listens.
    events: Option<mpsc::Sender<SearchEvent>>,
    /// The latest best answer, for readers that only want the current state.
    best: watch::Sender<Option<BestAnswer>>,
    /// Copies of the tree for readers that ask, if any may.
    tap: Option<TreeTap>,
}

impl Default for SearchControl {
    fn default() -> Self {
        SearchControl::new()
    }
}

impl SearchControl {
    /// No events, a fresh cancel token.
    pub fn new() -> SearchControl {
        SearchControl {
            cancel: CancelToken::new(),
            events: None,
            best: watch::Sender::new(None),
            tap: None,
        }
    }

    /// Uses `token` for cancellation.
    pub fn with_cancel(mut self, token: CancelToken) -> SearchControl {
        self.cancel = token;
        self
    }

    /// Lets `tap`'s holders copy the tree while the search runs.
    pub fn with_tree_tap(mut self, tap: TreeTap) -> SearchControl {
        self.tap = Some(tap);
        self
    }

    /// Sends tree events to `sender`.
    pub fn with_events(mut self, sender: mpsc::Sender<SearchEvent>) -> SearchControl {
        self.events = Some(sender);
        self
    }

    /// The cancel token.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// A receiver of the best answer so far; it always holds the latest value.
    pub fn best_answer(&self) -> watch::Receiver<Option<BestAnswer>> {
        self.best.subscribe()
    }

    /// The best answer so far.
    pub fn current_best(&self) -> Option<BestAnswer> {
        self.best.borrow().clone()
    }

    pub(crate) fn wants_events(&self) -> bool {
        self.events.is_some()
    }

    /// Sends an event without waiting; returns false when it was dropped.
    pub(crate) fn emit(&self, event: SearchEvent) -> bool {
        match &self.events {
            Some(tx) => tx.try_send(event).is_ok(),
            None => true,
        }
    }

    pub(crate) fn publish_best(&self, best: BestAnswer) {
        self.best.send_replace(Some(best));
    }

    pub(crate) fn offer_tree(&self, tree: &Tree) {
        if let Some(tap) = &self.tap {
            tap.offer(tree);
        }
    }

    pub(crate) fn close_tree(&self, tree: &Tree) {
        if let Some(tap) = &self.tap {
            tap.close(tree);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_wakes_waiters_and_sticks() {
        let token = CancelToken::new();
        let clone = token.clone();
        assert!(!clone.is_cancelled());
        let waiter = tokio::spawn(async move { clone.cancelled().await });
        token.cancel();
        waiter.await.unwrap();
        assert!(token.is_cancelled());
        token.cancelled().await; // already cancelled: returns at once
    }

    #[test]
    fn a_full_event_channel_drops_instead_of_blocking() {
        let (tx, mut rx) = mpsc::channel(1);
        let control = SearchControl::new().with_events(tx);
        let event = || SearchEvent::NodeFailed {
            node: NodeId::ROOT,
            reason: "x".into(),
        };
        assert!(control.emit(event()));
        assert!(!control.emit(event()));
        assert_eq!(rx.try_recv().unwrap(), event());
    }
}

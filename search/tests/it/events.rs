//! Events, the anytime best answer, exports and the API's contracts.

use arbor_search::synthetic::{GamePolicy, GameScorer, PathGame};
use arbor_search::{
    NodeId, NodeState, Search, SearchControl, SearchError, SearchEvent, TreeExport,
};
use tokio::sync::mpsc;

use crate::{config, play, run, runtime};

fn game() -> PathGame {
    PathGame::new(17, 5, 0.7)
}

const FIELDS: &str =
    r#""strategy": {"kind": "mcts", "rollout": {}}, "budget": {"max_generated_tokens": 1500}"#;

#[test]
fn events_describe_the_tree_and_end_with_the_outcome() {
    let (tx, mut rx) = mpsc::channel(100_000);
    let control = SearchControl::new().with_events(tx);
    let policy = GamePolicy::new(game());
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let (outcome, tree) = run(
        game().prompt(),
        config(FIELDS, 1),
        &policy,
        &scorer,
        &control,
    );
    let mut events = Vec::new();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    assert_eq!(outcome.stats.events_dropped, 0);
    let expanded = events
        .iter()
        .filter(|e| matches!(e, SearchEvent::NodeExpanded { .. }))
        .count();
    // One event per call that added children: a node's first expansion and each widening.
    let calls: u32 = tree.nodes().map(|(_, n)| n.expansions()).sum();
    assert_eq!(expanded, calls as usize);
    let mut announced: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            SearchEvent::NodeExpanded { node, .. } => Some(*node),
            _ => None,
        })
        .collect();
    announced.sort();
    announced.dedup();
    let nodes_with_children = tree.nodes().filter(|(_, n)| !n.edges().is_empty()).count();
    assert_eq!(announced.len(), nodes_with_children);
    let scored = events
        .iter()
        .filter(|e| matches!(e, SearchEvent::NodeScored { .. }))
        .count();
    assert_eq!(
        scored,
        tree.nodes().filter(|(_, n)| n.score().is_some()).count()
    );
    let last_best = events.iter().rev().find_map(|e| match e {
        SearchEvent::BestAnswer(best) => Some(best.clone()),
        _ => None,
    });
    let key =
        |b: &Option<arbor_search::BestAnswer>| b.as_ref().map(|b| (b.node, b.answer.key.clone()));
    assert_eq!(
        key(&last_best),
        key(&outcome.answer),
        "events announce each new best answer"
    );
    assert_eq!(control.current_best(), outcome.answer);
    match events.last() {
        Some(SearchEvent::Finished { termination, costs }) => {
            assert_eq!((*termination, *costs), (outcome.termination, outcome.costs));
        }
        other => panic!("last event {other:?}"),
    }
    // Events serialise for a streaming front end.
    let json = serde_json::to_string(&events[0]).unwrap();
    assert!(json.contains("\"event\":\"node_expanded\""), "{json}");
}

#[test]
fn a_slow_listener_loses_events_but_not_the_search() {
    let (tx, _rx) = mpsc::channel(2);
    let policy = GamePolicy::new(game());
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let control = SearchControl::new().with_events(tx);
    let (with_events, tree_a) = run(
        game().prompt(),
        config(FIELDS, 2),
        &policy,
        &scorer,
        &control,
    );
    let quiet = play(game(), FIELDS, 2);
    assert!(with_events.stats.events_dropped > 0);
    let json = |t: &arbor_search::Tree| serde_json::to_string(&t.export()).unwrap();
    assert_eq!(
        json(&tree_a),
        json(&quiet.tree),
        "listening must not change the search"
    );
}

#[test]
fn exports_cover_the_whole_tree() {
    let played = play(game(), FIELDS, 3);
    let tree = &played.tree;
    let export = tree.export();
    let back: TreeExport = serde_json::from_str(&serde_json::to_string(&export).unwrap()).unwrap();
    assert_eq!(back, export);
    let graph = tree.to_petgraph();
    assert_eq!(graph.node_count(), tree.len());
    assert_eq!(graph.edge_count(), tree.len() - 1);
    let visits: u32 = graph
        .edges(petgraph::graph::NodeIndex::new(0))
        .map(|e| e.weight().visits)
        .sum();
    assert_eq!(
        visits + tree.node(NodeId::ROOT).end_visits(),
        tree.incoming(NodeId::ROOT).visits
    );
    let dot = tree.to_dot();
    assert_eq!(dot.matches(" -> ").count(), tree.len() - 1);
    assert!(tree.nodes().any(|(_, n)| n.state() == NodeState::Terminal));
}

#[test]
fn a_search_runs_once() {
    let policy = GamePolicy::new(game());
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let mut search = Search::new(game().prompt().clone(), config(FIELDS, 4)).unwrap();
    let rt = runtime();
    rt.block_on(search.run(&policy, &scorer, &SearchControl::new()))
        .unwrap();
    let again = rt.block_on(search.run(&policy, &scorer, &SearchControl::new()));
    assert!(matches!(again, Err(SearchError::AlreadyRun)), "{again:?}");
}

#[test]
fn the_search_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let policy = GamePolicy::new(game());
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let control = SearchControl::new();
    let mut search = Search::new(game().prompt().clone(), config(FIELDS, 5)).unwrap();
    let future = search.run(&policy, &scorer, &control);
    assert_send(&future);
    let entry = arbor_search::search("q", config(FIELDS, 5), &policy, &scorer, &control);
    assert_send(&entry);
}

/// A runtime on a paused clock, and the game's policy taking 20 ms a call (so rounds take
/// time that the clock can skip).
fn paused_with_slow_rounds() -> (tokio::runtime::Runtime, GamePolicy) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let policy = GamePolicy::with_faults(
        game(),
        arbor_search::synthetic::PolicyFaults {
            latency: Some(std::time::Duration::from_millis(20)),
            ..Default::default()
        },
    );
    (rt, policy)
}

#[test]
fn a_tree_tap_holds_the_tree_as_of_a_recent_round_and_the_final_tree_at_the_end() {
    let (rt, policy) = paused_with_slow_rounds();
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let tap = arbor_search::TreeTap::new();
    let control = SearchControl::new().with_tree_tap(tap.clone());
    let mut search = Search::new(game().prompt().clone(), config(FIELDS, 1)).unwrap();
    let (first, second) = rt.block_on(async {
        let run = search.run(&policy, &scorer, &control);
        tokio::pin!(run);
        let mut copies: Vec<(std::sync::Arc<arbor_search::Tree>, bool)> = Vec::new();
        for round in 0..2 {
            // The latest copy (the first waits for the first round to end).
            tokio::select! {
                copy = tap.snapshot() => copies.push(copy),
                _ = &mut run => panic!("the search ended before the copy was made"),
            }
            if round == 0 {
                // Rounds take 20 ms here; within TreeTap::MIN_INTERVAL no new copy is made.
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(40)) => {}
                    _ = &mut run => panic!("the search ended too soon for this test"),
                }
                let again = tap.snapshot().await;
                assert!(std::sync::Arc::ptr_eq(&again.0, &copies[0].0));
            }
            // Let a few rounds pass.
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                _ = &mut run => panic!("the search ended too soon for this test"),
            }
        }
        run.await.unwrap();
        (copies[0].clone(), copies[1].clone())
    });
    let final_len = search.tree().len();
    for (copy, finished) in [&first, &second] {
        assert!(!finished);
        copy.check_invariants()
            .expect("a copy between rounds is consistent");
    }
    assert!(
        first.0.len() >= 2 && first.0.len() < second.0.len() && second.0.len() < final_len,
        "copies grow with the search: {} then {}, finally {final_len}",
        first.0.len(),
        second.0.len()
    );
    // Once the search has ended, a reader gets the final tree at once.
    let (last, finished) = rt.block_on(tap.snapshot());
    assert!(finished);
    assert_eq!(last.export(), search.tree().export());
}

/// A running tree nobody reads is never copied; a read asks the search for copies for
/// `TreeTap::WANTED_FOR`, at most one every `TreeTap::MIN_INTERVAL`, and then they stop.
#[test]
fn a_tree_nobody_reads_is_not_copied_and_a_read_asks_for_copies_for_a_while() {
    let (rt, policy) = paused_with_slow_rounds();
    let scorer = GameScorer::new(game(), 0.25, 0.2);
    let fields =
        r#""strategy": {"kind": "mcts", "expand_k": 2}, "budget": {"max_generated_tokens": 8000}"#;
    use arbor_search::TreeTap;
    // Nobody reads: no copy while it runs; the final tree is there at the end.
    let tap = TreeTap::new();
    let control = SearchControl::new().with_tree_tap(tap.clone());
    let mut search = Search::new(game().prompt().clone(), config(fields, 1)).unwrap();
    let unread_time = rt.block_on(async {
        let t = tokio::time::Instant::now();
        search.run(&policy, &scorer, &control).await.unwrap();
        t.elapsed()
    });
    assert_eq!(tap.copies(), 0, "a tree nobody read was copied");
    let (last, finished) = rt.block_on(tap.snapshot());
    assert!(finished);
    assert_eq!(last.export(), search.tree().export());
    assert!(
        unread_time > TreeTap::WANTED_FOR * 2,
        "the search must outlast the window for this test: {unread_time:?}"
    );
    // One read, 100 ms in: copies for the window, then none.
    let tap = TreeTap::new();
    let control = SearchControl::new().with_tree_tap(tap.clone());
    let mut search = Search::new(game().prompt().clone(), config(fields, 1)).unwrap();
    rt.block_on(async {
        let run = search.run(&policy, &scorer, &control);
        tokio::pin!(run);
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            _ = &mut run => panic!("the search ended too soon for this test"),
        }
        tokio::select! {
            (copy, finished) = tap.snapshot() => {
                assert!(!finished);
                copy.check_invariants().expect("a copy between rounds is consistent");
            }
            _ = &mut run => panic!("the search ended before the copy was made"),
        }
        run.await.unwrap();
    });
    let most = (TreeTap::WANTED_FOR.as_millis() / TreeTap::MIN_INTERVAL.as_millis()) as u64 + 2;
    let copies = tap.copies();
    assert!(
        (1..=most).contains(&copies),
        "{copies} copies for one read (at most {most})"
    );
}

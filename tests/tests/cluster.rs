//! The event store on the three-node cluster of `nats/cluster/` (a stream with three
//! replicas): every replica answers direct gets, and a follower may not have an append the
//! leader has just acknowledged (ADR 004). What the store reads after an append must show it
//! all the same, whichever node the reader is connected to.

use ch_domain::AggregateType;
use ch_e2e::fixtures::{open, rename_strategy, renamed, strategy};
use ch_e2e::{TestEnv, Worker};
use ch_runtime::{EventStore, StoreError};
use serde_json::json;

/// The store of `env` through another node than the environment's client.
async fn store_on_node(env: &TestEnv, node: usize) -> EventStore {
    let client = async_nats::connect(&env.cluster_urls()[node])
        .await
        .expect("connect to the node");
    EventStore::open(client, env.subjects.clone())
        .await
        .expect("store")
}

/// A stale expected sequence is a conflict (which the command path decides again), not an
/// error for the client, whatever code the clustered server reports it with.
#[tokio::test]
async fn a_stale_append_on_a_replicated_stream_is_a_conflict() {
    let env = TestEnv::on_own_cluster().await;
    let store = store_on_node(&env, 0).await;
    let first = store
        .append(0, &[renamed("p1", 1, "first")], "c1")
        .await
        .expect("first append");
    let stale = store.append(0, &[renamed("p1", 1, "stale")], "c2").await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    // The same message id again is the first append's, not a conflict.
    let again = store
        .append(0, &[renamed("p1", 1, "first")], "c1")
        .await
        .expect("re-sent");
    assert!(again.duplicate);
    assert_eq!(again.seqs, first.seqs);
    let next = store
        .append(first.seqs[0], &[renamed("p1", 2, "next")], "c3")
        .await
        .expect("append after the last sequence");
    assert!(next.seqs[0] > first.seqs[0]);
}

/// Every read of the store right after an append shows it, from readers on the stream's
/// followers: the event by its sequence, the first event from it, whether the stream reaches
/// it, and a load from the previous sequence. Answered by the followers themselves (as all
/// direct gets were), a read missed the append just acknowledged within the first 300 appends
/// in each of four runs.
#[tokio::test]
async fn reads_right_after_an_append_show_it_on_the_followers() {
    let env = TestEnv::on_own_cluster().await;
    let leader = env
        .stream_info()
        .await
        .cluster
        .and_then(|c| c.leader)
        .expect("a stream leader");
    // Nodes are named ch-n1 to ch-n3 (nats/cluster/node-N.conf).
    let leader_node: usize = leader
        .trim_start_matches("ch-n")
        .parse::<usize>()
        .expect("a node name")
        - 1;
    let writer = store_on_node(&env, leader_node).await;
    let mut readers = Vec::new();
    for node in (0..3).filter(|&n| n != leader_node) {
        readers.push(store_on_node(&env, node).await);
    }
    let filter = env.subjects.events_filter();
    let mut last = 0;
    for version in 1..=300 {
        let appended = writer
            .append(last, &[renamed("p1", version, "n")], &format!("c{version}"))
            .await
            .expect("append")
            .seqs[0];
        for reader in &readers {
            let got = reader.get(appended).await.expect("get");
            assert_eq!(got.map(|e| e.seq), Some(appended), "get {appended}");
            let first = reader.first_seq_from(&filter, appended).await;
            assert_eq!(
                first.expect("first"),
                Some(appended),
                "first from {appended}"
            );
            let reaches = reader.reaches(appended).await.expect("reaches");
            assert!(reaches, "reaches {appended}");
            let loaded = reader
                .load(AggregateType::Portfolio, "p1", last)
                .await
                .expect("load");
            let seqs: Vec<u64> = loaded.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, vec![appended], "load after {last}");
        }
        last = appended;
    }
    assert!(!readers[0].reaches(last + 1).await.expect("reaches"));
}

/// The strategy read model on a cluster: its projector reads only strategy subjects and moves
/// its checkpoint over the other events once the stream has none of its own up to the head,
/// and a read-your-writes query on it ends as soon as nothing of its is left to apply. Both
/// look at the stream: with a follower's stale answer, an update just made would be skipped
/// or not yet shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_update_shows_at_its_sequence_on_a_cluster() {
    let mut env = TestEnv::on_own_cluster().await;
    env.start_all(&Worker::ALL).await;
    env.start_on_node(Worker::QueryStrategy, 1).await;
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    for version in 1..=40u64 {
        // Portfolio events between the strategy's: the projector moves over them.
        env.cmd("portfolio.update", open(&format!("p{version}"), "u1"))
            .await;
        let updated = env
            .cmd("strategy.update", rename_strategy("s1", version))
            .await;
        let at = updated["stream_seq"].as_u64().expect("stream_seq");
        let seen = env
            .query_at("strategy.get", json!({"strategy_id": "s1"}), at)
            .await;
        assert_eq!(seen["version"], version + 1, "at {at}: {seen}");
    }
}

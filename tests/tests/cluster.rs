//! The event store and the workers on the three-node cluster of `nats/cluster/` (a stream
//! with three replicas): every replica answers direct gets, and a follower may not have an
//! append the leader has just acknowledged (ADR 004). What the store reads after an append
//! must show it all the same, whichever node the reader is connected to; commands go on
//! across a crash of the stream's leader, and a worker starts while a node is down.

use ch_domain::AggregateType;
use ch_e2e::fixtures::{open, rename_strategy, renamed, strategy};
use ch_e2e::{eventually, TestEnv, Worker};
use ch_runtime::{EventStore, StoreError};
use serde_json::json;
use std::time::Duration;

/// The store of `env` through node `node` (0 to 2), with a client of its own.
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
    // A replicated stream just created may not take appends through every node yet ("no
    // stream found": no responder there): asked again, as the command path does.
    let first =
        eventually(|| async { store.append(0, &[renamed("p1", 1, "first")], "c1").await }).await;
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
    // The stream is replicated from the start: the store's usual re-reading of it will do.
    let followers = follower_stores(&env, Duration::from_secs(10)).await;
    appends_show_at_once(&env, &followers).await;
}

/// A stream scaled from one replica to three while workers run: the store reads its replica
/// count again (every 10 s; at once here) and from then on reads as on any replicated stream.
#[tokio::test]
async fn reads_after_a_scale_up_to_three_replicas_show_every_append() {
    let env = TestEnv::on_own_cluster_with(1).await;
    // Opened while the stream has one replica.
    let mut readers = Vec::new();
    for node in 0..3 {
        let store = store_on_node(&env, node).await;
        readers.push(store.with_replication_check(Duration::ZERO));
    }
    let js = async_nats::jetstream::new(env.client.clone());
    let config = ch_runtime::eventstore::stream_config(&env.subjects, 3).expect("config");
    js.update_stream(config)
        .await
        .expect("scale to three replicas");
    eventually(|| async {
        let replicas = env.stream_info().await.cluster.map(|c| c.replicas);
        match replicas {
            Some(r) if r.len() == 2 && r.iter().all(|p| p.current) => Ok(()),
            other => Err(format!("followers not current yet: {other:?}")),
        }
    })
    .await;
    let leader = env.stream_leader_node().await;
    let followers: Vec<EventStore> = readers
        .into_iter()
        .enumerate()
        .filter(|(node, _)| *node != leader)
        .map(|(_, s)| s)
        .collect();
    appends_show_at_once(&env, &followers).await;
}

/// Stores connected to the stream's two followers.
async fn follower_stores(env: &TestEnv, replication_check: Duration) -> Vec<EventStore> {
    let leader = env.stream_leader_node().await;
    let mut stores = Vec::new();
    for node in (0..3).filter(|&n| n != leader) {
        stores.push(
            store_on_node(env, node)
                .await
                .with_replication_check(replication_check),
        );
    }
    stores
}

/// 300 appends through the stream's leader, each read by every reader at once: by its
/// sequence, as the first event from it, as reached, and by a load from the one before.
async fn appends_show_at_once(env: &TestEnv, readers: &[EventStore]) {
    let writer = store_on_node(env, env.stream_leader_node().await).await;
    let filter = env.subjects.events_filter();
    let mut last = 0;
    for version in 1..=300 {
        let appended = writer
            .append(last, &[renamed("p1", version, "n")], &format!("c{version}"))
            .await
            .expect("append")
            .seqs[0];
        for reader in readers {
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

/// A deposit sent until it is answered, as API.md asks of a client: again with the same
/// `command_id` after `unavailable` or no reply at all (the first may have been stored: the
/// id makes the retry idempotent). Any other error fails the test.
async fn deposit_until_answered(
    client: &async_nats::Client,
    subject: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let payload = bytes::Bytes::from(body.to_string());
    eventually(|| async {
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            client.request(subject.to_owned(), payload.clone()),
        )
        .await;
        let msg = match reply {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) => return Err(format!("request failed: {e}")),
            Err(_) => return Err("no reply within 3 s".to_owned()),
        };
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).expect("JSON reply");
        match v["error"]["code"].as_str() {
            None => Ok(v),
            Some("unavailable") => Err(format!("{v}")),
            Some(_) => panic!("deposit {body} refused: {v}"),
        }
    })
    .await
}

/// The stream's leader crashes (SIGKILL) while four clients deposit: the other two nodes
/// notice within 5 to 10 s and elect a new leader, appends meanwhile fail and are retried, and
/// every deposit, sent until answered, is stored exactly once and shows in the read model.
/// The crashed node comes back and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposits_across_a_crash_of_the_stream_leader_are_stored_exactly_once() {
    let mut env = TestEnv::on_own_cluster().await;
    env.start_all(&Worker::PORTFOLIO_PATH).await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    let subject = format!("{}.cmd.portfolio.update", env.subjects.prefix());
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for c in 0..4u64 {
        let (client, subject, answered) = (env.client.clone(), subject.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            for i in 1..=15u64 {
                let body = json!({
                    "portfolio_id": "p1", "op": "deposit", "amount": (c * 15 + i).to_string(),
                    "command_id": uuid::Uuid::now_v7(),
                });
                let reply = deposit_until_answered(&client, &subject, &body).await;
                let _ = answered.send(reply["stream_seq"].as_u64().expect("stream_seq"));
            }
        }));
    }
    drop(answered);
    // A third of the deposits in, the leader crashes.
    for _ in 0..20 {
        answers.recv().await.expect("a deposit answered");
    }
    let leader = env.stream_leader_node().await;
    env.cluster().kill_node(leader);
    for c in clients {
        c.await.expect("client");
    }
    let mut last = 0;
    while let Some(seq) = answers.recv().await {
        last = last.max(seq);
    }
    assert_ne!(env.stream_leader_node().await, leader, "a new leader");
    // Opened, then 60 deposits: none lost, none doubled.
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 61);
    // The projector's pull from the old leader is given up on a missed heartbeat (10 s after
    // the crash), and the deposits may have been answered well before that: asked again,
    // within the harness' patience, rather than within one read-your-writes wait.
    let perf = eventually(|| async {
        let q = json!({"portfolio_id": "p1", "min_stream_seq": last, "timeout_ms": 5_000});
        let r = env.request("query.portfolio.performance", q).await;
        match r.code() {
            None => Ok(r.ok()),
            Some(code) => Err(format!("{code}: {}", r.body)),
        }
    })
    .await;
    assert_eq!(perf["cash"], (1..=60).sum::<u64>().to_string(), "{perf}");
    assert_eq!(perf["version"], 61);
    // Back, the crashed node catches up with what it missed.
    env.cluster().restart_node(leader);
    eventually(|| async {
        let info = env.stream_info().await;
        let replicas = info.cluster.map(|c| c.replicas).unwrap_or_default();
        if replicas.len() == 2 && replicas.iter().all(|r| r.current && !r.offline) {
            Ok(())
        } else {
            Err(format!("followers not current: {replicas:?}"))
        }
    })
    .await;
}

/// `CH_NATS_URL` may list several servers (a cluster's nodes): a worker whose list holds a
/// node that is down starts on another and serves. async-nats tries the list in a random
/// order, so about half the runs meet the node that is down first.
#[tokio::test]
async fn a_worker_starts_on_a_server_list_with_a_node_down() {
    let mut env = TestEnv::on_own_cluster().await;
    // The node down leads the stream: the worker also starts while the other two elect a
    // new leader (5-10 s, in which the stream answers no request).
    let down = env.stream_leader_node().await;
    env.cluster().kill_node(down);
    let mut cfg = env.app_config();
    let urls = env.cluster_urls();
    cfg.nats_url = format!("{}, {}", urls[down], urls[(down + 1) % urls.len()]);
    env.start_with(Worker::CmdPortfolio, cfg).await;
    let opened = env.cmd("portfolio.update", open("p1", "u1")).await;
    assert_eq!(opened["version"], 1, "{opened}");
}

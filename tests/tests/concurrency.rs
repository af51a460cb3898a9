//! Optimistic concurrency on the write side: many concurrent buys on one portfolio, served
//! by two signal workers in one queue group, never overdraw it; on one server and on a
//! three-node cluster, where the stream's leader checks the expected sequences and the
//! workers connect to different nodes.

use ch_domain::AggregateType;
use ch_e2e::fixtures::{signal, strategy};
use ch_e2e::{TestEnv, Worker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_buys_with_cash_for_ten_execute_exactly_ten() {
    let mut env = TestEnv::with_all_workers().await;
    // A second replica of the signal worker: appends race across processes too.
    env.start(Worker::CmdSignal).await;
    forty_buys_with_cash_for_ten(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_buys_with_cash_for_ten_execute_exactly_ten_on_a_cluster() {
    let mut env = TestEnv::on_own_cluster().await;
    env.start_all(&Worker::ALL).await;
    // The second signal worker on another node than the first: its appends reach the
    // stream's leader through a route, and its loads may be answered by a follower.
    env.start_on_node(Worker::CmdSignal, 2).await;
    let info = env.stream_info().await;
    assert_eq!(info.config.num_replicas, 3, "the stream is replicated");
    assert_eq!(
        info.cluster.map(|c| c.replicas.len()),
        Some(2),
        "a leader and two followers"
    );
    let env = forty_buys_with_cash_for_ten(env).await;
    // The two workers' caches raced: the leader refused stale appends, and they were decided
    // again (the test above proves their outcome).
    let conflicts: u64 = env
        .service_stats(Worker::CmdSignal, 2)
        .await
        .iter()
        .map(|s| {
            s["endpoints"][0]["data"]["append_conflicts"]
                .as_u64()
                .expect("append_conflicts")
        })
        .sum();
    assert!(conflicts > 0, "no append raced another");
}

/// 40 buys of 100 each on a portfolio with 1,000: exactly ten execute, whichever worker
/// decides them, and every request stores one event.
async fn forty_buys_with_cash_for_ten(env: TestEnv) -> std::sync::Arc<TestEnv> {
    // Both signal workers answer (a ping is answered by either), so both take buys.
    env.service_stats(Worker::CmdSignal, 2).await;
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    env.funded("p1", "u1", "1000", "s1").await;
    let before = env.subject_count(AggregateType::Portfolio, "p1").await;

    let env = std::sync::Arc::new(env);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            env.cmd(
                "signal.execute",
                signal("p1", "s1", "buy", "1", "100", Some("0")),
            )
            .await
        }));
    }
    let mut executed = 0;
    let mut rejected = 0;
    let mut max_seq = 0;
    for t in tasks {
        let r = t.await.expect("task");
        max_seq = max_seq.max(r["stream_seq"].as_u64().unwrap());
        match r["status"].as_str() {
            Some("executed") => executed += 1,
            Some("rejected") => {
                assert_eq!(r["reason"], "INSUFFICIENT_CASH", "{r}");
                rejected += 1;
            }
            other => panic!("unexpected status {other:?}: {r}"),
        }
    }
    assert_eq!(executed, 10);
    assert_eq!(rejected, 30);
    // Every request stored exactly one event: nothing lost, nothing doubled.
    assert_eq!(
        env.subject_count(AggregateType::Portfolio, "p1").await,
        before + 40
    );

    let perf = env.performance_at("p1", max_seq).await;
    assert_eq!(perf["cash"], "0");
    assert_eq!(perf["positions"][0]["quantity"], "10");
    assert_eq!(perf["fill_count"], 10);
    assert_eq!(perf["rejected_signals"], 30);
    assert_eq!(perf["version"], 3 + 40);
    env
}

/// A replica whose clock runs ahead stamps its events later than this one's now; a command
/// sent without `at` to a replica behind it takes the aggregate's last time (never going back)
/// and is not refused as "in the future": the client sent no time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_at_after_an_event_stamped_by_a_clock_ahead_is_taken() {
    let mut env = TestEnv::new().await;
    env.start(Worker::CmdPortfolio).await;
    let opened = env
        .cmd("portfolio.update", ch_e2e::fixtures::open("p1", "u1"))
        .await;
    let opened_seq = opened["stream_seq"].as_u64().unwrap();
    // As the replica 10 s ahead would store a rename.
    let (mut meta, event) = ch_e2e::fixtures::renamed("p1", 2, "ahead");
    meta.occurred_at = chrono::Utc::now() + chrono::TimeDelta::seconds(10);
    let ahead = chrono::SubsecRound::trunc_subsecs(meta.occurred_at, 6);
    meta.occurred_at = ahead;
    env.event_store()
        .await
        .append(opened_seq, &[(meta, event)], "ahead-1")
        .await
        .expect("appended");
    let r = env
        .request(
            "cmd.portfolio.update",
            ch_e2e::fixtures::deposit("p1", "100"),
        )
        .await
        .ok();
    assert_eq!(r["version"], 3, "{r}");
    // Stored at the aggregate's last time, not before it.
    let seq = r["stream_seq"].as_u64().unwrap();
    let stream = async_nats::jetstream::new(env.client.clone())
        .get_stream(env.subjects.stream_name())
        .await
        .expect("stream");
    let raw = stream.get_raw_message(seq).await.expect("the deposit");
    let stored = ch_runtime::envelope::decode(seq, &raw.payload).expect("an event");
    assert_eq!(stored.meta.occurred_at, ahead);
    // A time the client sends is still checked.
    let mut future = ch_e2e::fixtures::deposit("p1", "1");
    future["at"] =
        serde_json::json!((chrono::Utc::now() + chrono::TimeDelta::seconds(60)).to_rfc3339());
    env.request("cmd.portfolio.update", future)
        .await
        .err(400, "bad_request");
}

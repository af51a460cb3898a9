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

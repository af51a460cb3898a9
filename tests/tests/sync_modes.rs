//! CH_SYNC modes: `immediate` replies after the read models applied the event; `batch` and
//! `adaptive` projectors leave the same read model as `eventual`.

use std::time::Duration;

use ch_e2e::fixtures::{deposit, open, price, seq, signal, strategy};
use ch_e2e::{eventually, TestEnv, Worker};
use ch_runtime::projector::{ADAPTIVE_BACKLOG, ADAPTIVE_BEHIND};
use ch_runtime::SyncMode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_replies_once_projected_and_says_so() {
    let mut env = TestEnv::new().await;
    env.cfg.sync = SyncMode::Immediate;
    // Far above a projection's time on a loaded machine: `true` is what is asserted.
    env.cfg.immediate_timeout = Duration::from_secs(10);
    for w in Worker::ALL {
        env.start(w).await;
    }
    env.cmd("portfolio.update", open("p1", "u1")).await;
    let dep = env.cmd("portfolio.update", deposit("p1", "500")).await;
    assert_eq!(dep["projected"], true, "{dep}");
    // No min_stream_seq: the read model already has the write.
    let perf = env
        .request("query.portfolio.performance", json!({"portfolio_id": "p1"}))
        .await
        .ok();
    assert_eq!(perf["cash"], "500");
    assert!(perf["as_of_seq"].as_u64().unwrap() >= dep["stream_seq"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_says_not_projected_when_a_projector_is_down() {
    let mut env = TestEnv::new().await;
    env.cfg.sync = SyncMode::Immediate;
    env.cfg.immediate_timeout = Duration::from_millis(200);
    env.start_all(&[Worker::CmdPortfolio, Worker::ProjStrategy])
        .await;
    // There at 0 before the first such reply.
    let stats = env.service_stats(Worker::CmdPortfolio, 1).await.remove(0);
    let gauges = &stats["endpoints"][0]["data"]["gauges"];
    assert_eq!(gauges["not_projected"], 0, "{stats}");
    let opened = env.cmd("portfolio.update", open("p1", "u1")).await;
    assert_eq!(opened["projected"], false, "{opened}");
    // Counted for an operator, in the worker's `$SRV.STATS`.
    let stats = env.service_stats(Worker::CmdPortfolio, 1).await.remove(0);
    let gauges = &stats["endpoints"][0]["data"]["gauges"];
    assert_eq!(gauges["not_projected"], 1, "{stats}");
}

/// `immediate` waits for the projectors that consume the event: the strategy projector reads
/// strategy subjects only, so a portfolio command does not wait for it, a strategy command does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_waits_for_the_projectors_that_consume_the_event() {
    let mut env = TestEnv::new().await;
    env.cfg.sync = SyncMode::Immediate;
    // Far above a projection's time on a loaded machine for the portfolio command (`true`);
    // the strategy command waits its own, short bound out (`false`).
    env.cfg.immediate_timeout = Duration::from_secs(10);
    env.start_all(&[Worker::CmdPortfolio, Worker::ProjPortfolio])
        .await;
    let mut short = env.cfg.clone();
    short.immediate_timeout = Duration::from_millis(300);
    env.start_with(Worker::CmdStrategy, short).await;
    let opened = env.cmd("portfolio.update", open("p1", "u1")).await;
    assert_eq!(opened["projected"], true, "{opened}");
    let created = env
        .cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    assert_eq!(created["projected"], false, "{created}");
}

async fn workload(env: &TestEnv) -> u64 {
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    let mut last = 0;
    for p in 0..4 {
        let id = format!("p{p}");
        env.funded(&id, "u1", "50000", "s1").await;
        for i in 0..15 {
            let side = if i % 4 == 3 { "sell" } else { "buy" };
            let px = format!("{}", 20000 + i * 37);
            env.cmd("market.price", price("BTC-USDT", &px)).await;
            let r = env
                .cmd("signal.execute", signal(&id, "s1", side, "0.05", &px, None))
                .await;
            last = r["stream_seq"].as_u64().unwrap();
        }
    }
    last
}

/// Runs the workload with the projectors stopped, then projects it in `mode`.
async fn project_in(mode: SyncMode, batch_max: usize) -> Vec<String> {
    let mut env = TestEnv::without_projectors().await;
    let last = workload(&env).await;
    env.cfg.sync = mode;
    env.cfg.batch_max = batch_max;
    env.cfg.batch_wait = Duration::from_millis(if mode == SyncMode::Batch { 5 } else { 0 });
    env.start_all(&[Worker::ProjPortfolio, Worker::ProjStrategy])
        .await;
    let perf = env.performance_at("p3", last).await;
    assert_eq!(
        perf["fill_count"].as_u64().unwrap() + perf["rejected_signals"].as_u64().unwrap(),
        15
    );
    // Both read models must have everything before the dump (strategy.get waits for both).
    env.query_at("strategy.get", json!({"strategy_id": "s1"}), last)
        .await;
    // Ids and sequences are the same in every run (one writer, same order): compare rows.
    env.dump_read_model()
        .await
        .into_iter()
        .filter(|r| !r.starts_with("trades:"))
        .map(|r| strip_times(&r))
        .collect()
}

/// Timestamps differ between runs (business time defaults to now): blank them out.
fn strip_times(row: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(row.split_once(": ").unwrap().1).unwrap();
    for k in [
        "opened_at",
        "updated_at",
        "at",
        "created_at",
        "closed_at",
        "attached_at",
        "first_deposit_at",
    ] {
        if v.get(k).is_some_and(|x| !x.is_null()) {
            v[k] = json!("t");
        }
    }
    format!("{}: {v}", row.split_once(": ").unwrap().0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_adaptive_projectors_build_the_same_read_model_as_eventual() {
    let eventual = project_in(SyncMode::Eventual, 1).await;
    assert!(eventual.len() > 10);
    let batch = project_in(SyncMode::Batch, 64).await;
    assert_same(&eventual, &batch, "batch");
    let adaptive = project_in(SyncMode::Adaptive, 2000).await;
    assert_same(&eventual, &adaptive, "adaptive");
}

fn assert_same(a: &[String], b: &[String], mode: &str) {
    let count = |rows: &[String]| {
        let mut m = std::collections::BTreeMap::new();
        for r in rows {
            *m.entry(r.split_once(':').unwrap().0.to_owned())
                .or_insert(0) += 1;
        }
        m
    };
    assert_eq!(count(a), count(b), "{mode}: row counts differ");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x, y, "{mode}: rows differ");
    }
}

/// `adaptive` shows its decisions to an operator in the projector's service stats: the last
/// batch's size, its fill wait, and what that followed (how long ago its first event was
/// appended, the server's backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_shows_its_decisions_in_the_projectors_stats() {
    let mut env = TestEnv::new().await;
    env.cfg.sync = SyncMode::Adaptive;
    env.start_all(&Worker::PORTFOLIO_PATH).await;
    // The first event may reach the projector in its start-up catch-up; the second, once that
    // is projected, comes through the live consumer, whose batches are the ones planned.
    let opened = env.cmd("portfolio.update", open("p1", "u1")).await;
    env.performance_at("p1", opened["stream_seq"].as_u64().unwrap())
        .await;
    let deposited = env.cmd("portfolio.update", deposit("p1", "500")).await;
    env.performance_at("p1", deposited["stream_seq"].as_u64().unwrap())
        .await;
    let stats = env.service_stats(Worker::ProjPortfolio, 1).await.remove(0);
    let gauges = &stats["endpoints"][0]["data"]["gauges"];
    let gauge = |name: &str| {
        gauges[name]
            .as_i64()
            .unwrap_or_else(|| panic!("no gauge {name}: {stats}"))
    };
    assert_eq!(gauge("batch_size"), 1, "{stats}");
    // What an operator alerts on is there before anything failed: 0, not absent.
    assert_eq!(gauge("consecutive_failures"), 0, "{stats}");
    assert_eq!(gauge("dead_letters"), 0, "{stats}");
    // It waited to fill the batch exactly when it was behind.
    let behind = gauge("behind_ms") >= ADAPTIVE_BEHIND.as_millis() as i64
        || gauge("pending") >= ADAPTIVE_BACKLOG as i64;
    assert_eq!(gauge("fill_wait_ms"), i64::from(behind), "{stats}");
}

/// A rebuild resets the read model: a command sent again after the reset (its reply carries
/// the old `stream_seq`) is not `projected: true` until the replay has brought the read model
/// back past it. (The command worker went by the last announcement, from before the reset.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_after_a_reset_waits_for_the_replay() {
    use ch_readmodel::workers::projector;
    use ch_readmodel::PortfolioProjection;
    use ch_runtime::app::App;

    let mut env = TestEnv::new().await;
    env.cfg.sync = SyncMode::Immediate;
    env.cfg.immediate_timeout = Duration::from_millis(300);
    env.start(Worker::CmdPortfolio).await;
    let proj = env.spawn(Worker::ProjPortfolio).await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    let mut dep = deposit("p1", "500");
    dep["command_id"] = json!(uuid::Uuid::now_v7().to_string());
    let first = env.cmd("portfolio.update", dep.clone()).await;
    proj.stop().await;

    // The rebuild's reset, with no projector to replay.
    let app = App::start(env.app_config(), "test-reset").await.unwrap();
    projector(&app, PortfolioProjection::default())
        .unwrap()
        .reset()
        .await
        .unwrap();
    let seq = first["stream_seq"].clone();
    resend_until(&env, &dep, &seq, false).await;
    // The projector back: it replays, and the re-send is projected again.
    env.start(Worker::ProjPortfolio).await;
    resend_until(&env, &dep, &seq, true).await;
}

/// Sends `command` again until its reply's `projected` is `want` (bounded); each reply must be
/// the first one's, at `seq`.
async fn resend_until(
    env: &TestEnv,
    command: &serde_json::Value,
    seq: &serde_json::Value,
    want: bool,
) {
    ch_e2e::eventually(|| async {
        let r = env.cmd("portfolio.update", command.clone()).await;
        assert_eq!(r["duplicate"], true, "{r}");
        assert_eq!(&r["stream_seq"], seq, "{r}");
        if r["projected"] == want {
            Ok(())
        } else {
            Err(format!("projected is not {want}: {r}"))
        }
    })
    .await;
}

/// A shutdown during a batch's fill wait applies what the batch gathered and stops, rather
/// than waiting out the rest of `CH_BATCH_WAIT_MS` (up to a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_a_batchs_fill_wait_and_applies_the_batch() {
    let mut env = TestEnv::without_projectors().await;
    env.cfg.sync = SyncMode::Batch;
    env.cfg.batch_max = 500;
    // Under half the consumer's ack wait (30 s), the most a batch waits.
    env.cfg.batch_wait = Duration::from_secs(14);
    let proj = env.spawn(Worker::ProjPortfolio).await;
    let store = env.event_store().await;
    let stream = store.stream();
    // Its consumer exists once the start's catch-up is over: what comes next is delivered.
    let delivered = || async {
        stream
            .consumer_info("proj_portfolio")
            .await
            .map(|i| i.delivered.stream_sequence)
            .map_err(|e| e.to_string())
    };
    eventually(delivered).await;
    let opened = seq(&env.cmd("portfolio.update", open("p1", "u1")).await);
    eventually(|| async {
        let at = delivered().await?;
        (at >= opened)
            .then_some(())
            .ok_or(format!("delivered up to {at}"))
    })
    .await;
    let stopping = std::time::Instant::now();
    proj.stop().await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(7),
        "the stop waited for the batch to fill: {took:?}"
    );
    let checkpoint = ch_runtime::projector::checkpoint(&env.pg, "portfolio")
        .await
        .unwrap();
    assert_eq!(checkpoint, opened, "the gathered batch is applied");
}

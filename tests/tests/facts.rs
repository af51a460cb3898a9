//! A signal worker caches the strategies and marks it checks signals against; a change to
//! either must be seen by the very next signal (API.md: checks use the current state).

use std::time::Duration;

use ch_domain::strategy::StrategyState;
use ch_e2e::fixtures::{price, signal, strategy, strategy_with};
use ch_e2e::{eventually, TestEnv, Worker};
use ch_runtime::repo::Repo;
use ch_runtime::EventStore;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_signal_sees_a_strategy_change_at_once() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    env.funded("p1", "u1", "1000", "s1").await;
    for i in 0..20 {
        let allowed = if i % 2 == 0 { "ETH-USDT" } else { "BTC-USDT" };
        let mut profile = strategy("u1", "s1", &[allowed])["risk_profile"].clone();
        profile["max_open_positions"] = json!(1 + i % 3);
        env.cmd(
            "strategy.update",
            json!({"strategy_id": "s1", "risk_profile": profile}),
        )
        .await;
        // Quantity 0: if the symbol is allowed, the check after it (INVALID_QUANTITY) fails.
        let r = env
            .cmd(
                "signal.execute",
                signal("p1", "s1", "buy", "0", "20000", None),
            )
            .await;
        let want = if allowed == "BTC-USDT" {
            "INVALID_QUANTITY"
        } else {
            "SYMBOL_NOT_ALLOWED"
        };
        assert_eq!(r["reason"], want, "round {i}: {r}");
    }
    env.cmd("strategy.delete", json!({"strategy_id": "s1"}))
        .await;
    let r = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "buy", "0", "20000", None),
        )
        .await;
    assert_eq!(r["reason"], "STRATEGY_NOT_ACTIVE", "{r}");
}

/// Marks are facts of the drawdown halt: each price change flips the next signal's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_signal_sees_a_price_change_at_once() {
    let env = TestEnv::with_all_workers().await;
    let limits = json!({"max_drawdown_pct": "0.1"});
    env.cmd(
        "strategy.create",
        strategy_with("u1", "s1", &["BTC-USDT"], limits),
    )
    .await;
    env.funded("p1", "u1", "10000", "s1").await;
    // Cash 7998 and 0.1 BTC: halted (equity <= 9000) below a mark of about 10,020.
    let b = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "buy", "0.1", "20000", None),
        )
        .await;
    assert_eq!(b["status"], "executed", "{b}");
    for i in 0..12 {
        let px = if i % 2 == 0 { "10000" } else { "19000" };
        env.cmd("market.price", price("BTC-USDT", px)).await;
        let r = env
            .cmd(
                "signal.execute",
                signal("p1", "s1", "buy", "0.0001", px, None),
            )
            .await;
        if px == "10000" {
            assert_eq!(r["reason"], "TRADING_HALTED", "round {i}: {r}");
        } else {
            assert_eq!(r["status"], "executed", "round {i}: {r}");
        }
    }
}

/// Change notices are core NATS messages: one sent while a worker's connection is down never
/// reaches it. A fact the worker checked before it reconnected is read from the stream again
/// after, not trusted until its age runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_checked_before_a_reconnect_is_read_again_after_it() {
    // A repo that follows no notices (every notice lost) and trusts a fact for an hour: only
    // a reconnect can make it look again.
    let (env, client, repo) = s1_and_a_repo_of_its_own("facts-reconnect").await;
    assert_eq!(repo.fact("s1").await.expect("fact").version, 1);
    env.cmd(
        "strategy.update",
        json!({"strategy_id": "s1", "strategy_name": "renamed"}),
    )
    .await;
    assert_eq!(
        repo.fact("s1").await.expect("fact").version,
        1,
        "without a notice or a reconnect the cached fact is used"
    );

    let connects = repo.store().connects();
    client.force_reconnect().await.expect("reconnect");
    eventually(|| async {
        let now = repo.store().connects();
        (now > connects)
            .then_some(())
            .ok_or(format!("connected {now} times"))
    })
    .await;
    let fact = repo.fact("s1").await.expect("fact");
    assert_eq!(fact.version, 2, "{fact:?}");
    assert_eq!(fact.name, "renamed");
}

/// The server hands out a change notice as the append arrives and stores the event after it
/// (after its sync with `sync_interval: always`, or a cluster's replication), so a read just
/// after the notice may not find the event yet. The fact stays noticed until a read finds it:
/// a signal sent after the change's reply reached its client never decides on the old state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_noticed_before_its_event_is_stored_is_read_until_it_is() {
    use ch_domain::AggregateType;
    let (env, client, repo) = s1_and_a_repo_of_its_own("facts-early-notice").await;
    let last = repo
        .store()
        .last_seq_of(AggregateType::Strategy, "s1")
        .await
        .expect("last")
        .expect("s1 stored");
    // Notices on a subject of the test's own (one of the stream's would be stored as an
    // event), trusted for an hour: only a notice can make the repo look again.
    let notices = format!("{}.test-notices", env.subjects.prefix());
    repo.follow(
        client.subscribe(format!("{notices}.*")).await.expect("sub"),
        &client,
    );
    assert_eq!(repo.fact("s1").await.expect("fact").version, 1);

    // The notice of an update whose event is not stored yet, as the server can send it.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        last.to_string().as_str(),
    );
    client
        .publish_with_headers(format!("{notices}.s1"), headers, "".into())
        .await
        .expect("publish");
    // A request's reply on the same connection comes after the notice: it is queued now.
    repo.store()
        .last_seq_of(AggregateType::Strategy, "s1")
        .await
        .expect("read");
    assert_eq!(
        repo.fact("s1").await.expect("fact").version,
        1,
        "the read after the notice finds the old state"
    );
    // The update is stored, its reply sent: the next decision finds it.
    env.cmd(
        "strategy.update",
        json!({"strategy_id": "s1", "strategy_name": "renamed"}),
    )
    .await;
    let fact = repo.fact("s1").await.expect("fact");
    assert_eq!(fact.version, 2, "{fact:?}");
    assert_eq!(fact.name, "renamed");
    // Found: trusted again, no read per decision.
    env.cmd(
        "strategy.update",
        json!({"strategy_id": "s1", "strategy_name": "again"}),
    )
    .await;
    assert_eq!(repo.fact("s1").await.expect("fact").version, 2);
}

/// A strategy worker with strategy s1 stored, and a strategy repo on a connection of its own
/// (`name`) that trusts a cached fact for an hour without a notice.
async fn s1_and_a_repo_of_its_own(
    name: &str,
) -> (TestEnv, async_nats::Client, Repo<StrategyState>) {
    let mut env = TestEnv::new().await;
    env.start(Worker::CmdStrategy).await;
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    let client = ch_runtime::connect_nats(&env.cfg, name)
        .await
        .expect("nats");
    let store = EventStore::open(client.clone(), env.subjects.clone())
        .await
        .expect("store");
    let repo = Repo::new(store, 16).with_fact_max_age(Duration::from_secs(3600));
    (env, client, repo)
}

/// Two prices of a symbol less than a microsecond apart, the later one stored first: every part
/// of the system takes the same one as the mark (times are kept to the microsecond, as the
/// read models keep them; at nanoseconds the command side took the price stored first, the
/// read models after a reload and the analysis the one stored last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_within_a_microsecond_mark_the_same_everywhere() {
    let env = TestEnv::with_all_workers().await;
    env.cmd(
        "strategy.create",
        strategy_with(
            "u1",
            "s1",
            &["BTC-USDT"],
            json!({"max_drawdown_pct": "0.05", "max_order_notional": "1000000"}),
        ),
    )
    .await;
    env.funded("p1", "u1", "100000", "s1").await;
    env.bought("p1", "s1", "BTC-USDT", "4", "20000").await;
    let second = (chrono::Utc::now() - chrono::Duration::seconds(1))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    let at = |ns: &str| format!("{second}.000001{ns}Z");
    let mut later = price("BTC-USDT", "20000");
    later["at"] = at("900").into();
    env.cmd("market.price", later).await;
    let mut earlier = price("BTC-USDT", "18000");
    earlier["at"] = at("100").into();
    let last = ch_e2e::fixtures::seq(&env.cmd("market.price", earlier).await);
    // One microsecond for both: the one stored last is the mark (equity 20,000 in cash and
    // 4 at 18,000: 8 % below the high-water mark of about 100,000).
    let perf = env.performance_at("p1", last).await;
    assert_eq!(perf["positions"][0]["mark_price"], "18000", "{perf}");
    let buy = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "buy", "0.1", "18000", None),
        )
        .await;
    assert_eq!(buy["reason"], "TRADING_HALTED", "{buy}");
}

/// Change notices carry whole events: they are moved out of the subscription's buffer as they
/// come, also while no command reads a fact (a signal worker that sees only strategy updates),
/// rather than piling up there (a megabyte per large strategy) until the buffer drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_notices_are_taken_in_while_no_fact_is_read() {
    let (env, client, repo) = s1_and_a_repo_of_its_own("notices-drained").await;
    let subject = env
        .subjects
        .aggregate(ch_domain::AggregateType::Strategy, "*");
    repo.follow(client.subscribe(subject).await.unwrap(), &client);
    client.flush().await.unwrap();
    for id in ["s2", "s3", "s4"] {
        env.cmd("strategy.create", strategy("u1", id, &["BTC-USDT"]))
            .await;
    }
    eventually(|| async {
        let n = repo.noticed();
        (n == 3)
            .then_some(())
            .ok_or(format!("{n} of 3 notices taken in"))
    })
    .await;
}

//! Strategy commands seen through `ch.query.strategy.get` and `ch.query.strategy.list`
//! (API.md "Queries"): rules and risk profile as stored, status, version, attached portfolios
//! and their combined performance; keyset pagination, `include_deleted`, one user's rows only.

use ch_e2e::fixtures::{
    deposit, detach, open, rename_strategy, seq, signal, signal_on, strategy, version,
};
use ch_e2e::{TestEnv, Worker};
use serde_json::{json, Value};

async fn get(env: &TestEnv, strategy_id: &str, at: u64) -> Value {
    let v = env
        .query_at("strategy.get", json!({"strategy_id": strategy_id}), at)
        .await;
    assert!(
        v["as_of_seq"].as_u64().is_some_and(|s| s >= at),
        "as_of_seq below {at}: {v}"
    );
    v
}

async fn list(env: &TestEnv, query: Value, at: u64) -> Value {
    let v = env.query_at("strategy.list", query, at).await;
    assert!(
        v["as_of_seq"].as_u64().is_some_and(|s| s >= at),
        "as_of_seq below {at}: {v}"
    );
    v
}

fn ids(page: &Value) -> Vec<String> {
    page["strategies"]
        .as_array()
        .unwrap_or_else(|| panic!("no strategies in {page}"))
        .iter()
        .map(|s| s["strategy_id"].as_str().expect("strategy_id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_follows_create_update_delete_and_trades() {
    let env = TestEnv::with_all_workers().await;
    let create = json!({
        "strategy_id": "s1", "user_id": "u1", "strategy_name": "Momentum",
        "rules": [
            {"rule_id": "r1", "symbol": "BTC-USDT", "stake": {"mode": "fixed_quote", "value": 1000.50},
             "stop_loss_pct": 0.05, "take_profit_pct": "0.20",
             "trailing_stop": {"trailing_pct": 0.03, "activation_pct": "1E-1"}},
            {"rule_id": "r2", "symbol": "*", "stake": {"mode": "pct_equity", "value": "0.25"}}
        ],
        "risk_profile": {"allowed_symbols": ["BTC-USDT", "ETH-USDT"], "max_open_positions": 3,
                         "max_order_notional": 50000, "min_order_notional": "10.0",
                         "max_position_notional": "60000", "max_drawdown_pct": 0.5, "max_leverage": 1}
    });
    let c = env.cmd("strategy.create", create).await;
    assert_eq!(version(&c), 1);
    let s = get(&env, "s1", seq(&c)).await;
    assert_eq!(s["strategy_id"], "s1");
    assert_eq!(s["user_id"], "u1");
    assert_eq!(s["name"], "Momentum");
    assert_eq!(s["status"], "active");
    assert_eq!(s["version"], 1);
    // Decimals come back as plain strings, normalized; absent options stay absent.
    let rules = json!([
        {"rule_id": "r1", "symbol": "BTC-USDT", "stake": {"mode": "fixed_quote", "value": "1000.5"},
         "stop_loss_pct": "0.05", "take_profit_pct": "0.2",
         "trailing_stop": {"trailing_pct": "0.03", "activation_pct": "0.1"}},
        {"rule_id": "r2", "symbol": "*", "stake": {"mode": "pct_equity", "value": "0.25"}}
    ]);
    assert_eq!(s["rules"], rules);
    let profile = json!({"allowed_symbols": ["BTC-USDT", "ETH-USDT"], "max_open_positions": 3,
                         "max_order_notional": "50000", "min_order_notional": "10",
                         "max_position_notional": "60000", "max_drawdown_pct": "0.5", "max_leverage": "1"});
    assert_eq!(s["risk_profile"], profile);
    assert_eq!(s["attached_portfolios"], json!([]));
    assert_eq!(s["performance"]["portfolio_count"], 0);
    assert_eq!(s["performance"]["trade_count"], 0);
    assert_eq!(s["performance"]["fill_count"], 0);
    assert_eq!(s["performance"]["realized_pnl"], "0");
    assert_eq!(s["performance"]["win_rate"], Value::Null);
    assert_eq!(s["created_at"], s["updated_at"]);
    let created_at = s["created_at"].clone();

    // Update the name only: rules and profile unchanged.
    let u = env
        .cmd(
            "strategy.update",
            json!({"strategy_id": "s1", "strategy_name": "Momentum v2"}),
        )
        .await;
    assert_eq!(version(&u), 2);
    let s = get(&env, "s1", seq(&u)).await;
    assert_eq!(s["name"], "Momentum v2");
    assert_eq!(s["version"], 2);
    assert_eq!(s["rules"], rules);
    assert_eq!(s["risk_profile"], profile);
    assert_eq!(s["created_at"], created_at);
    assert!(
        s["updated_at"].as_str().unwrap() >= created_at.as_str().unwrap(),
        "{s}"
    );

    // Update the rules only.
    let new_rules = json!([{"rule_id": "r3", "symbol": "ETH-USDT", "stake": {"mode": "fixed_quote", "value": "500"}}]);
    let u = env
        .cmd(
            "strategy.update",
            json!({"strategy_id": "s1", "rules": new_rules}),
        )
        .await;
    let s = get(&env, "s1", seq(&u)).await;
    assert_eq!(s["version"], 3);
    assert_eq!(s["rules"], new_rules);
    assert_eq!(s["risk_profile"], profile);
    assert_eq!(s["name"], "Momentum v2");

    // Update the risk profile only.
    let mut profile2 = profile.clone();
    profile2["max_open_positions"] = 4.into();
    profile2.as_object_mut().unwrap().remove("max_drawdown_pct");
    let u = env
        .cmd(
            "strategy.update",
            json!({"strategy_id": "s1", "risk_profile": profile2}),
        )
        .await;
    let s = get(&env, "s1", seq(&u)).await;
    assert_eq!(s["version"], 4);
    assert_eq!(s["risk_profile"], profile2);
    assert_eq!(s["rules"], new_rules);

    // Attached to two portfolios, with trades: their combined performance.
    for p in ["p1", "p2"] {
        env.funded(p, "u1", "25000", "s1").await;
    }
    // p1: +979 (buy 0.5 at 20000, fee 10; sell at 22000, fee 11).
    env.cmd(
        "signal.execute",
        signal("p1", "s1", "buy", "0.5", "20000", None),
    )
    .await;
    let t = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "sell", "0.5", "22000", None),
        )
        .await;
    assert_eq!(t["trade"]["realized_pnl"], "979", "{t}");
    // p2: -101.9 (buy 1 ETH at 1000, fee 1; sell at 900, fee 0.9), then an open buy.
    env.cmd(
        "signal.execute",
        signal_on("p2", "s1", "ETH-USDT", "buy", "1", "1000"),
    )
    .await;
    let t = env
        .cmd(
            "signal.execute",
            signal_on("p2", "s1", "ETH-USDT", "sell", "1", "900"),
        )
        .await;
    assert_eq!(t["trade"]["realized_pnl"], "-101.9", "{t}");
    let last = env
        .cmd(
            "signal.execute",
            signal_on("p2", "s1", "ETH-USDT", "buy", "0.1", "1000"),
        )
        .await;
    assert_eq!(last["status"], "executed", "{last}");
    let s = get(&env, "s1", seq(&last)).await;
    assert_eq!(s["attached_portfolios"], json!(["p1", "p2"]));
    assert_eq!(
        s["version"], 4,
        "attaching and trading do not change the strategy"
    );
    let perf = &s["performance"];
    assert_eq!(perf["portfolio_count"], 2, "{s}");
    assert_eq!(perf["trade_count"], 2, "{s}");
    assert_eq!(perf["fill_count"], 5, "{s}");
    assert_eq!(perf["realized_pnl"], "877.1", "{s}");
    assert_eq!(perf["fees_paid"], "23", "{s}");
    assert_eq!(perf["win_rate"], "0.5", "{s}");

    // Detached from p2: only p1 remains.
    let d = env.cmd("portfolio.update", detach("p2", "s1")).await;
    let s = get(&env, "s1", seq(&d)).await;
    assert_eq!(s["attached_portfolios"], json!(["p1"]));
    assert_eq!(s["performance"]["trade_count"], 1, "{s}");
    assert_eq!(s["performance"]["realized_pnl"], "979", "{s}");
    assert_eq!(s["performance"]["win_rate"], "1", "{s}");

    // Deleted: still readable, status deleted, version 5.
    let del = env
        .cmd("strategy.delete", json!({"strategy_id": "s1"}))
        .await;
    assert_eq!(version(&del), 5);
    let s = get(&env, "s1", seq(&del)).await;
    assert_eq!(s["status"], "deleted");
    assert_eq!(s["version"], 5);
    assert_eq!(s["name"], "Momentum v2");
    assert_eq!(s["rules"], new_rules);
    assert_eq!(s["created_at"], created_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_paginates_one_users_strategies() {
    let env = TestEnv::with_all_workers().await;
    let mine = ["st-a", "st-b", "st-c", "st-d", "st-e", "st-f", "st-g"];
    // Created out of order, with another user's ids in between.
    for id in ["st-e", "st-a", "st-g", "st-c", "st-b", "st-f", "st-d"] {
        env.cmd("strategy.create", strategy("u1", id, &["BTC-USDT"]))
            .await;
    }
    for id in ["st-b2", "st-e2"] {
        env.cmd("strategy.create", strategy("u2", id, &["BTC-USDT"]))
            .await;
    }
    let at = env.last_seq().await;

    // Pages of 3: 3, 3, 1, linked by next_cursor.
    let p1 = list(&env, json!({"user_id": "u1", "limit": 3}), at).await;
    assert_eq!(ids(&p1), ["st-a", "st-b", "st-c"]);
    assert_eq!(p1["next_cursor"], "st-c");
    let row = &p1["strategies"][0];
    assert_eq!(row["user_id"], "u1");
    assert_eq!(row["name"], "strategy st-a");
    assert_eq!(row["status"], "active");
    assert_eq!(row["version"], 1);
    assert!(
        row["created_at"].is_string() && row["updated_at"].is_string(),
        "{row}"
    );
    let p2 = list(
        &env,
        json!({"user_id": "u1", "limit": 3, "cursor": p1["next_cursor"]}),
        at,
    )
    .await;
    assert_eq!(ids(&p2), ["st-d", "st-e", "st-f"]);
    assert_eq!(p2["next_cursor"], "st-f");
    let p3 = list(
        &env,
        json!({"user_id": "u1", "limit": 3, "cursor": p2["next_cursor"]}),
        at,
    )
    .await;
    assert_eq!(ids(&p3), ["st-g"]);
    assert_eq!(p3["next_cursor"], Value::Null);

    // Exactly one page: no cursor. Default limit: everything.
    let all = list(&env, json!({"user_id": "u1", "limit": 7}), at).await;
    assert_eq!(ids(&all), mine);
    assert_eq!(all["next_cursor"], Value::Null);
    let all = list(&env, json!({"user_id": "u1"}), at).await;
    assert_eq!(ids(&all), mine);
    assert_eq!(all["next_cursor"], Value::Null);
    let theirs = list(&env, json!({"user_id": "u2"}), at).await;
    assert_eq!(ids(&theirs), ["st-b2", "st-e2"]);
    assert!(theirs["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["user_id"] == "u2"));
    let nobody = list(&env, json!({"user_id": "u3"}), at).await;
    assert_eq!(nobody["strategies"], json!([]));
    assert_eq!(nobody["next_cursor"], Value::Null);

    // A deleted strategy is hidden unless include_deleted.
    let d = env
        .cmd("strategy.delete", json!({"strategy_id": "st-d"}))
        .await;
    let u = env
        .cmd(
            "strategy.update",
            json!({"strategy_id": "st-a", "strategy_name": "renamed"}),
        )
        .await;
    let at = seq(&d).max(seq(&u));
    let live = list(&env, json!({"user_id": "u1"}), at).await;
    assert_eq!(ids(&live), ["st-a", "st-b", "st-c", "st-e", "st-f", "st-g"]);
    assert_eq!(live["strategies"][0]["name"], "renamed");
    assert_eq!(live["strategies"][0]["version"], 2);
    let live = list(
        &env,
        json!({"user_id": "u1", "include_deleted": false, "limit": 3}),
        at,
    )
    .await;
    assert_eq!(ids(&live), ["st-a", "st-b", "st-c"]);
    let live2 = list(
        &env,
        json!({"user_id": "u1", "limit": 3, "cursor": live["next_cursor"]}),
        at,
    )
    .await;
    assert_eq!(ids(&live2), ["st-e", "st-f", "st-g"]);
    assert_eq!(live2["next_cursor"], Value::Null);
    let every = list(
        &env,
        json!({"user_id": "u1", "include_deleted": true, "limit": 4}),
        at,
    )
    .await;
    assert_eq!(ids(&every), ["st-a", "st-b", "st-c", "st-d"]);
    assert_eq!(every["strategies"][3]["status"], "deleted");
    assert_eq!(every["strategies"][3]["version"], 2);
    let every2 = list(
        &env,
        json!({"user_id": "u1", "include_deleted": true, "limit": 4, "cursor": every["next_cursor"]}),
        at,
    )
    .await;
    assert_eq!(ids(&every2), ["st-e", "st-f", "st-g"]);
    assert_eq!(every2["next_cursor"], Value::Null);

    // Limits: 1 to 500.
    let one = list(&env, json!({"user_id": "u1", "limit": 1}), at).await;
    assert_eq!(ids(&one), ["st-a"]);
    assert_eq!(one["next_cursor"], "st-a");
    list(&env, json!({"user_id": "u1", "limit": 500}), at).await;
    for limit in [0, 501] {
        let r = env
            .request(
                "query.strategy.list",
                json!({"user_id": "u1", "limit": limit}),
            )
            .await;
        let body = r.err(400, "bad_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("limit"),
            "{body}"
        );
    }
    let r = env
        .request(
            "query.strategy.list",
            json!({"user_id": "u1", "cursor": "st.a"}),
        )
        .await;
    r.err(400, "bad_request");
}

/// The strategy read model is sparse (its projector reads strategy subjects only): it is
/// current for a sequence when none of its events lies between its checkpoint and that
/// sequence. Read-your-writes on it after a portfolio command does not wait for its projector
/// to move the checkpoint: with that projector stopped, the reply still comes (and `as_of_seq`
/// says how far it is current); a strategy event it has not applied makes the wait stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_read_model_answers_when_none_of_its_events_is_pending() {
    let mut env = TestEnv::without_projectors().await;
    env.start(Worker::ProjPortfolio).await;
    let projector = env.spawn(Worker::ProjStrategy).await;
    let created = env
        .cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    get(&env, "s1", seq(&created)).await;
    // Portfolio events only from here on, none of them the strategy projector's: it has
    // nothing to apply, whether or not its idle tick has moved its checkpoint yet.
    env.funded("p1", "u1", "10000", "s1").await;
    let status = env
        .request_raw("admin.projector.strategy.status", Vec::new())
        .await
        .ok();
    assert_eq!(status["lag_events"], 0, "{status}");
    projector.stop().await;

    // One more with the strategy projector gone: nothing moves its checkpoint past it.
    env.cmd("portfolio.update", deposit("p1", "500")).await;
    let head = env.last_seq().await;
    let checkpoint = ch_runtime::projector::checkpoint(&env.pg, "strategy")
        .await
        .expect("strategy checkpoint");
    assert!(
        checkpoint < head,
        "the stopped strategy projector's checkpoint {checkpoint} should be below {head}"
    );
    let s = get(&env, "s1", head).await;
    assert_eq!(s["as_of_seq"], head);
    assert_eq!(s["attached_portfolios"], json!(["p1"]));
    let page = list(&env, json!({"user_id": "u1"}), head).await;
    assert_eq!(ids(&page), ["s1"]);

    // A strategy event nobody applies: the read model is not current for it.
    let renamed = env.cmd("strategy.update", rename_strategy("s1", 1)).await;
    let stale = env
        .request(
            "query.strategy.get",
            json!({"strategy_id": "s1", "min_stream_seq": seq(&renamed), "timeout_ms": 200}),
        )
        .await
        .err(504, "stale");
    assert!(
        stale["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&seq(&renamed).to_string())),
        "{stale}"
    );
}

/// `strategy.get` draws on the strategy and the portfolio read models: its `as_of_seq` is the
/// lower of their checkpoints, so a reply never claims a portfolio figure it has not seen.
#[tokio::test]
async fn get_is_only_as_current_as_the_least_current_read_model() {
    let mut env = TestEnv::without_projectors().await;
    env.start(Worker::ProjStrategy).await;
    let c = env
        .cmd(
            "strategy.create",
            strategy("u-asof", "s-asof", &["BTC-USDT"]),
        )
        .await;
    // The strategy read model has it; the portfolio one (no projector yet) is at 0.
    list(&env, json!({"user_id": "u-asof"}), seq(&c)).await;
    let v = env
        .request("query.strategy.get", json!({"strategy_id": "s-asof"}))
        .await
        .ok();
    assert_eq!(v["as_of_seq"], json!(0), "{v}");

    env.start(Worker::ProjPortfolio).await;
    get(&env, "s-asof", seq(&c)).await;
}

/// A read-your-writes wait on the strategy read model (sparse: it may show a sequence past its
/// checkpoint when the stream has none of its events in between) is bounded by `timeout_ms`
/// also while the stream does not answer that look (direct gets off here; a replicated stream
/// electing its leader, there): a client waiting two seconds gets its `stale` reply, where
/// the look's own retries took three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strategy_wait_ends_at_timeout_ms_when_the_stream_does_not_answer() {
    let mut env = TestEnv::without_projectors().await;
    let projector = env.spawn(Worker::ProjStrategy).await;
    env.start_all(&[
        Worker::CmdStrategy,
        Worker::CmdPortfolio,
        Worker::QueryStrategy,
    ])
    .await;
    let created = env
        .cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    list(&env, json!({"user_id": "u1"}), seq(&created)).await;
    projector.stop().await;
    let at = seq(&env.cmd("portfolio.update", open("p1", "u1")).await);

    let js = async_nats::jetstream::new(env.client.clone());
    let mut stream = js.get_stream(env.subjects.stream_name()).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.allow_direct = false;
    js.update_stream(config).await.unwrap();

    let body = json!({"user_id": "u1", "min_stream_seq": at, "timeout_ms": 300});
    let request = async_nats::Request::new()
        .payload(serde_json::to_vec(&body).unwrap().into())
        .timeout(Some(std::time::Duration::from_secs(2)));
    let reply = env
        .client
        .send_request(env.subjects.query("strategy.list"), request)
        .await
        .expect("a reply within the client's 2 s");
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["error"]["code"], "stale", "{v}");
}

//! `command_id` deduplication, `expected_version`, and how command replies' `version` and
//! `stream_seq` move (API.md "Conventions" and "Commands").

use ch_domain::AggregateType;
use ch_e2e::fixtures::{
    attach, deposit, open, price, renamed, seq, signal, strategy, strategy_ids, version, withdraw,
};
use ch_e2e::TestEnv;
use serde_json::{json, Value};
use uuid::Uuid;

fn with_id(mut body: Value, command_id: Uuid) -> Value {
    body["command_id"] = command_id.to_string().into();
    body
}

/// The reply without `duplicate`: what must equal the first answer.
fn without_duplicate(mut v: Value) -> Value {
    v.as_object_mut().expect("object").remove("duplicate");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_resent_with_the_same_command_id_is_applied_once() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    let c1 = Uuid::now_v7();
    let first = env
        .cmd("portfolio.update", with_id(deposit("p1", "100"), c1))
        .await;
    assert_eq!(version(&first), 2);
    assert!(first.get("duplicate").is_none(), "{first}");
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 2);

    // Re-sent: same stream_seq, version and event, marked duplicate; nothing stored.
    let last = env.last_seq().await;
    for _ in 0..3 {
        let again = env
            .cmd("portfolio.update", with_id(deposit("p1", "100"), c1))
            .await;
        assert_eq!(again["duplicate"], true, "{again}");
        assert_eq!(seq(&again), seq(&first));
        assert_eq!(version(&again), version(&first));
        assert_eq!(without_duplicate(again), first);
    }
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 2);
    assert_eq!(env.last_seq().await, last);

    // Another command in between does not change the answer to a re-send.
    let c2 = Uuid::now_v7();
    let second = env
        .cmd("portfolio.update", with_id(deposit("p1", "50"), c2))
        .await;
    assert_eq!(version(&second), 3);
    let again = env
        .cmd("portfolio.update", with_id(deposit("p1", "100"), c1))
        .await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(seq(&again), seq(&first));
    assert_eq!(version(&again), 2);

    // A different command_id is a new command, even with the same body.
    let third = env
        .cmd(
            "portfolio.update",
            with_id(deposit("p1", "100"), Uuid::now_v7()),
        )
        .await;
    assert!(third.get("duplicate").is_none(), "{third}");
    assert_eq!(version(&third), 4);

    // Cash counted once per command, not per request.
    let perf = env.performance_at("p1", seq(&third)).await;
    assert_eq!(perf["cash"], "250");
    assert_eq!(perf["net_deposits"], "250");
    assert_eq!(perf["version"], 4);
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 4);
}

/// The `command_id_reused` reply: its message names the id and what it was used for.
fn reused(reply: ch_e2e::Reply, c: Uuid, used_for: &str) {
    let e = reply.err(409, "command_id_reused");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains(&c.to_string()), "{message}");
    assert!(message.contains(used_for), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_id_reused_for_another_command_is_refused_and_stores_nothing() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    env.cmd("portfolio.update", open("p2", "u1")).await;
    let c = Uuid::now_v7();
    let first = env
        .cmd("portfolio.update", with_id(deposit("p1", "100"), c))
        .await;
    let last = env.last_seq().await;
    let used_for = format!(
        "portfolio.update/deposit on portfolio p1, stream_seq {}",
        seq(&first)
    );

    // Another aggregate type or another portfolio (only the stream's de-duplication knows the
    // id there), or another kind of command on the same portfolio (the worker's cache does).
    let other_type = env
        .request("cmd.market.price", with_id(price("ETH-USDT", "3000"), c))
        .await;
    reused(other_type, c, &used_for);
    let other_portfolio = env
        .request("cmd.portfolio.update", with_id(deposit("p2", "100"), c))
        .await;
    reused(other_portfolio, c, &used_for);
    let other_kind = env
        .request("cmd.portfolio.update", with_id(withdraw("p1", "10"), c))
        .await;
    reused(other_kind, c, &used_for);
    assert_eq!(env.last_seq().await, last);
    assert_eq!(
        env.subject_count(AggregateType::Market, "ETH-USDT").await,
        0
    );

    // The same kind on the same portfolio: the id's first outcome stands. Another amount is
    // answered the first result, marked as differing from it; the same command written
    // differently (fields in another order, another correlation_id) is a plain re-send.
    let other_amount = env
        .cmd("portfolio.update", with_id(deposit("p1", "7"), c))
        .await;
    assert_eq!(other_amount["duplicate"], true, "{other_amount}");
    assert_eq!(other_amount["request_differs"], true, "{other_amount}");
    assert_eq!(seq(&other_amount), seq(&first));
    let resent = format!(
        r#"{{ "op": "deposit", "amount": "100", "correlation_id": "another-flow",
              "portfolio_id": "p1", "command_id": "{c}" }}"#
    );
    let again = env
        .request_raw("cmd.portfolio.update", resent.into_bytes())
        .await
        .ok();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(without_duplicate(again), first);
    assert_eq!(env.last_seq().await, last);
    let perf = env.performance_at("p1", seq(&first)).await;
    assert_eq!(perf["cash"], "100");
}

/// Events stored before command digests existed name no kind or fields: a re-send on their
/// aggregate is answered their result, one on another aggregate is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_id_of_an_event_stored_before_digests() {
    let env = TestEnv::with_all_workers().await;
    let opened = env.cmd("portfolio.update", open("p1", "u1")).await;
    env.cmd("portfolio.update", open("p2", "u1")).await;
    let c = Uuid::now_v7();
    // As an older worker stored a rename: the command_id, no digest.
    let store = env.event_store().await;
    let (mut meta, event) = renamed("p1", 2, "older");
    meta.command_id = Some(c);
    let old = store
        .append(seq(&opened), &[(meta, event)], &c.to_string())
        .await
        .expect("appended");
    let resent = env
        .cmd(
            "portfolio.update",
            with_id(
                json!({"portfolio_id": "p1", "op": "rename", "name": "newer"}),
                c,
            ),
        )
        .await;
    assert_eq!(resent["duplicate"], true, "{resent}");
    assert!(resent.get("request_differs").is_none(), "{resent}");
    assert_eq!(seq(&resent), old.seqs[0]);
    let other = env
        .request("cmd.portfolio.update", with_id(deposit("p2", "5"), c))
        .await;
    reused(
        other,
        c,
        &format!("portfolio p1, stream_seq {}", old.seqs[0]),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_does_not_use_up_its_command_id() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    let c = Uuid::now_v7();
    let r = env
        .request("cmd.portfolio.update", with_id(withdraw("p1", "70"), c))
        .await;
    r.err(422, "insufficient_funds");
    env.cmd("portfolio.update", deposit("p1", "100")).await;
    // Nothing was stored for c: the same command now applies, as a first time.
    let w = env
        .cmd("portfolio.update", with_id(withdraw("p1", "70"), c))
        .await;
    assert!(w.get("duplicate").is_none(), "{w}");
    assert_eq!(version(&w), 3);
    let again = env
        .cmd("portfolio.update", with_id(withdraw("p1", "70"), c))
        .await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(seq(&again), seq(&w));
    let perf = env.performance_at("p1", seq(&w)).await;
    assert_eq!(perf["cash"], "30");
}

/// A command sent without a `command_id` is de-duplicated by a message id of its own: a later
/// command named by that command's event id (a reaction to the event) is a new command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_id_equal_to_an_unnamed_commands_event_id_is_a_new_command() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    env.cmd("portfolio.update", open("p2", "u1")).await;
    let event_id = |reply: &Value| -> Uuid {
        reply["events"][0]["event_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("an event id in {reply}"))
    };
    let first = env.cmd("portfolio.update", deposit("p1", "100")).await;
    let second = env.cmd("portfolio.update", deposit("p1", "1")).await;
    // On the same aggregate: a withdrawal, not the deposit's duplicate.
    let w = env
        .cmd(
            "portfolio.update",
            with_id(withdraw("p1", "10"), event_id(&first)),
        )
        .await;
    assert!(w.get("duplicate").is_none(), "{w}");
    assert_eq!(w["events"][0]["type"], "FundsWithdrawn", "{w}");
    assert_eq!(version(&w), 4);
    // On another aggregate: stored, not `command_id_reused`.
    let other = env
        .cmd(
            "portfolio.update",
            with_id(deposit("p2", "5"), event_id(&second)),
        )
        .await;
    assert!(other.get("duplicate").is_none(), "{other}");
    assert_eq!(version(&other), 2);
    let perf = env.performance_at("p1", seq(&other)).await;
    assert_eq!(perf["cash"], "91");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategy_create_without_id_resent_answers_the_same_generated_id() {
    let env = TestEnv::with_all_workers().await;
    let c = Uuid::now_v7();
    let mut body = strategy("u1", "unused", &["BTC-USDT"]);
    body.as_object_mut().unwrap().remove("strategy_id");
    let first = env.cmd("strategy.create", with_id(body.clone(), c)).await;
    let id = first["aggregate_id"]
        .as_str()
        .expect("aggregate_id")
        .to_owned();
    let uuid =
        Uuid::parse_str(&id).unwrap_or_else(|e| panic!("generated id {id} is not a UUID: {e}"));
    assert_eq!(uuid.get_version_num(), 7, "{id}");
    assert_eq!(version(&first), 1);
    assert_eq!(first["events"][0]["type"], "StrategyCreated");

    let last = env.last_seq().await;
    let again = env.cmd("strategy.create", with_id(body.clone(), c)).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["aggregate_id"], id.as_str(), "{again}");
    assert_eq!(seq(&again), seq(&first));
    assert_eq!(without_duplicate(again), first);
    assert_eq!(env.last_seq().await, last, "the re-send stored nothing");
    assert_eq!(env.subject_count(AggregateType::Strategy, &id).await, 1);

    // Re-sent with its nested fields in another order and spacing: the same command. With
    // another name: the first result, marked as differing. Both keep the first generated id.
    let mut reordered = format!(
        r#"{{"command_id": "{c}", "risk_profile": {{ "max_leverage": 1, "max_position_notional": "1000000",
             "max_order_notional": "1000000", "max_open_positions": 5, "allowed_symbols": ["BTC-USDT"] }},
             "rules": {}, "strategy_name": "strategy unused", "user_id": "u1" }}"#,
        body["rules"]
    );
    let again = env
        .request_raw("cmd.strategy.create", reordered.clone().into_bytes())
        .await
        .ok();
    assert_eq!(again["aggregate_id"], id.as_str(), "{again}");
    assert!(again.get("request_differs").is_none(), "{again}");
    reordered = reordered.replace("strategy unused", "renamed");
    let renamed = env
        .request_raw("cmd.strategy.create", reordered.into_bytes())
        .await
        .ok();
    assert_eq!(renamed["aggregate_id"], id.as_str(), "{renamed}");
    assert_eq!(renamed["request_differs"], true, "{renamed}");
    assert_eq!(env.last_seq().await, last, "the re-sends stored nothing");
    // The id of another command is not a create's to re-send, though a create without id
    // names no aggregate: an update's, and a create's that named its strategy.
    for (name, used) in [
        (
            "strategy.update",
            json!({"strategy_id": id, "strategy_name": "n2"}),
        ),
        ("strategy.create", strategy("u2", "s-named", &["BTC-USDT"])),
    ] {
        let c2 = Uuid::now_v7();
        let first = env.cmd(name, with_id(used, c2)).await;
        let refused = env
            .request("cmd.strategy.create", with_id(body.clone(), c2))
            .await;
        reused(refused, c2, &format!("stream_seq {}", seq(&first)));
    }

    // Without a command_id, each create generates a new strategy.
    let other = env.cmd("strategy.create", body).await;
    assert_ne!(other["aggregate_id"], id.as_str());

    let list = env
        .query_at("strategy.list", json!({"user_id": "u1"}), seq(&other))
        .await;
    let ids = strategy_ids(&list);
    assert_eq!(ids.len(), 2, "{list}");
    assert!(ids.contains(&id.as_str()), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_resent_answers_the_identical_trade() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    env.funded("p1", "u1", "25000", "s1").await;

    let c = Uuid::now_v7();
    let first = env
        .cmd(
            "signal.execute",
            with_id(signal("p1", "s1", "buy", "0.5", "20000", None), c),
        )
        .await;
    assert_eq!(first["status"], "executed", "{first}");
    let again = env
        .cmd(
            "signal.execute",
            with_id(signal("p1", "s1", "buy", "0.5", "20000", None), c),
        )
        .await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        again["trade"], first["trade"],
        "the identical trade, trade_id included"
    );
    assert_eq!(without_duplicate(again), first);

    // A rejected signal re-sent answers the same rejection.
    let c2 = Uuid::now_v7();
    let rej = env
        .cmd(
            "signal.execute",
            with_id(signal("p1", "s1", "sell", "5", "20000", None), c2),
        )
        .await;
    assert_eq!(rej["reason"], "OVERSELL", "{rej}");
    let rej2 = env
        .cmd(
            "signal.execute",
            with_id(signal("p1", "s1", "sell", "5", "20000", None), c2),
        )
        .await;
    assert_eq!(rej2["duplicate"], true);
    assert_eq!(without_duplicate(rej2), rej);

    let perf = env.performance_at("p1", seq(&rej)).await;
    assert_eq!(perf["fill_count"], 1);
    assert_eq!(perf["rejected_signals"], 1);
    assert_eq!(perf["cash"], "14990");
    assert_eq!(perf["positions"][0]["quantity"], "0.5");
    assert_eq!(
        perf["version"], 5,
        "open, deposit, attach, one buy, one rejection"
    );
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_version_equal_to_the_current_version_succeeds() {
    let env = TestEnv::with_all_workers().await;
    // 0 is the version of an aggregate that does not exist yet.
    let mut body = open("p1", "u1");
    body["expected_version"] = 0.into();
    let o = env.cmd("portfolio.update", body).await;
    assert_eq!(version(&o), 1);
    let mut v = version(&o);
    for amount in ["10", "20", "30"] {
        let mut body = deposit("p1", amount);
        body["expected_version"] = v.into();
        let r = env.cmd("portfolio.update", body).await;
        assert_eq!(version(&r), v + 1);
        v = version(&r);
    }
    // The version just left behind is now stale.
    let mut body = deposit("p1", "1");
    body["expected_version"] = (v - 1).into();
    env.request("cmd.portfolio.update", body)
        .await
        .err(409, "conflict");
    // A strategy too, through update and delete.
    let mut body = strategy("u1", "s1", &["BTC-USDT"]);
    body["expected_version"] = 0.into();
    env.cmd("strategy.create", body).await;
    let u = env
        .cmd(
            "strategy.update",
            json!({"strategy_id": "s1", "strategy_name": "x", "expected_version": 1}),
        )
        .await;
    assert_eq!(version(&u), 2);
    let d = env
        .cmd(
            "strategy.delete",
            json!({"strategy_id": "s1", "expected_version": 2}),
        )
        .await;
    assert_eq!(version(&d), 3);
    let perf = env.performance_at("p1", seq(&d)).await;
    assert_eq!(perf["cash"], "60");
    assert_eq!(perf["version"], v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_per_aggregate_and_stream_seq_is_the_stream_position() {
    let env = TestEnv::with_all_workers().await;
    let mut versions: std::collections::HashMap<&str, u64> = Default::default();
    let mut last_seq = env.last_seq().await;
    let steps: Vec<(&str, &str, Value)> = vec![
        ("s1", "strategy.create", strategy("u1", "s1", &["BTC-USDT"])),
        ("p1", "portfolio.update", open("p1", "u1")),
        ("p2", "portfolio.update", open("p2", "u1")),
        ("p1", "portfolio.update", deposit("p1", "25000")),
        ("BTC-USDT", "market.price", price("BTC-USDT", "20000")),
        ("p2", "portfolio.update", deposit("p2", "100")),
        ("p1", "portfolio.update", attach("p1", "s1")),
        (
            "s1",
            "strategy.update",
            json!({"strategy_id": "s1", "strategy_name": "renamed"}),
        ),
        (
            "p1",
            "signal.execute",
            signal("p1", "s1", "buy", "0.5", "20000", None),
        ),
        (
            "p1",
            "signal.execute",
            signal("p1", "s1", "sell", "9", "20000", None),
        ),
        ("BTC-USDT", "market.price", price("BTC-USDT", "21000")),
        ("p1", "portfolio.update", withdraw("p1", "1")),
    ];
    for (i, (id, name, body)) in steps.into_iter().enumerate() {
        // A refused command in between moves nothing.
        let bad = env
            .request("cmd.portfolio.update", withdraw("p2", "1000000"))
            .await;
        assert!(bad.status.is_some(), "{}", bad.body);
        let r = env.cmd(name, body).await;
        let v = versions.entry(id).or_insert(0);
        *v += 1;
        assert_eq!(r["aggregate_id"], id, "step {i}: {r}");
        assert_eq!(version(&r), *v, "step {i}: version of {id}: {r}");
        assert_eq!(seq(&r), last_seq + 1, "step {i}: stream_seq: {r}");
        assert_eq!(r["events"].as_array().map(Vec::len), Some(1), "{r}");
        assert_eq!(r["events"][0]["stream_seq"], r["stream_seq"]);
        assert!(
            r["events"][0]["event_id"]
                .as_str()
                .is_some_and(|e| Uuid::parse_str(e).is_ok()),
            "{r}"
        );
        last_seq = seq(&r);
        assert_eq!(env.last_seq().await, last_seq);
    }
    // Each aggregate's subject holds as many events as its replies counted versions.
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 6);
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p2").await, 2);
    assert_eq!(env.subject_count(AggregateType::Strategy, "s1").await, 2);
    assert_eq!(
        env.subject_count(AggregateType::Market, "BTC-USDT").await,
        2
    );

    // The read model reports the same version, and as_of_seq the stream position it applied.
    let perf = env.performance_at("p1", last_seq).await;
    assert_eq!(perf["version"], 6);
    assert_eq!(perf["as_of_seq"], last_seq);
    let s = env
        .query_at("strategy.get", json!({"strategy_id": "s1"}), last_seq)
        .await;
    assert_eq!(s["version"], 2);
    assert!(s["as_of_seq"].as_u64().unwrap() >= last_seq, "{s}");
}

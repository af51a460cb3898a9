//! API.md's error table through NATS: every class with its status header, `error.code`,
//! `error.status` and a message that says what is wrong; and for every refused command, that
//! nothing was stored (the aggregate's subject and the stream do not move).

use ch_domain::AggregateType;
use ch_e2e::fixtures::{
    attach, close, deposit, open, price, seq, signal, signal_on, strategy, version, withdraw,
};
use ch_e2e::proxy::FreezingProxy;
use ch_e2e::{eventually, Reply, TestEnv, Worker};
use ch_runtime::error::ApiError;
use ch_runtime::metrics::Metrics;
use ch_runtime::service::{self, EndpointSpec, Handler, ServiceSpec};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const PORTFOLIO: AggregateType = AggregateType::Portfolio;
const STRATEGY: AggregateType = AggregateType::Strategy;
const MARKET: AggregateType = AggregateType::Market;

/// A class of API.md's error table: the status (header and `error.status`) and `error.code`.
#[derive(Clone, Copy)]
struct Class(u16, &'static str);

const BAD_REQUEST: Class = Class(400, "bad_request");
const NOT_FOUND: Class = Class(404, "not_found");
const ALREADY_EXISTS: Class = Class(409, "already_exists");
const CONFLICT: Class = Class(409, "conflict");
const STALE: Class = Class(504, "stale");
const UNAVAILABLE: Class = Class(503, "unavailable");
const INTERNAL: Class = Class(500, "internal");

/// A domain refusal (422) with its code.
const fn refusal(code: &'static str) -> Class {
    Class(422, code)
}

/// Checks an error reply: `Nats-Service-Error-Code` and `error.status` are the class's status,
/// `error.code` is its code, `Nats-Service-Error` carries the message, and the message contains
/// every one of `needles`. Returns the message.
#[track_caller]
fn check_error(reply: Reply, Class(status, code): Class, needles: &[&str]) -> String {
    let headers = reply.headers.clone().expect("an error reply has headers");
    assert_eq!(
        headers
            .get("Nats-Service-Error-Code")
            .map(|v| v.as_str().to_owned()),
        Some(status.to_string()),
        "status header of {}",
        reply.body
    );
    let body = reply.err(status, code);
    let message = body["error"]["message"]
        .as_str()
        .expect("error.message is a string")
        .to_owned();
    assert!(!message.trim().is_empty(), "empty message: {body}");
    assert_eq!(
        headers
            .get("Nats-Service-Error")
            .map(|v| v.as_str().to_owned()),
        Some(message.clone()),
        "Nats-Service-Error header carries the message"
    );
    for n in needles {
        assert!(
            message.contains(n),
            "message {message:?} should mention {n:?}"
        );
    }
    message
}

/// A request body: raw text (malformed on purpose) or JSON.
trait Body {
    fn into_bytes(self) -> Vec<u8>;
}

impl Body for &str {
    fn into_bytes(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl Body for Value {
    fn into_bytes(self) -> Vec<u8> {
        serde_json::to_vec(&self).expect("json")
    }
}

impl Body for &Value {
    fn into_bytes(self) -> Vec<u8> {
        serde_json::to_vec(self).expect("json")
    }
}

/// A command subject, and the aggregate whose subject must not move when it is refused.
struct Command<'a> {
    env: &'a TestEnv,
    name: &'a str,
    agg: (AggregateType, &'a str),
}

fn command<'a>(env: &'a TestEnv, name: &'a str, agg: (AggregateType, &'a str)) -> Command<'a> {
    Command { env, name, agg }
}

impl Command<'_> {
    /// Sends `body`, checks the error reply (see [`check_error`]) and that neither the
    /// aggregate's subject nor the stream moved. Returns the message.
    async fn refused(&self, body: impl Body, class: Class, needles: &[&str]) -> String {
        let (env, name, agg) = (self.env, self.name, self.agg);
        let before = env.subject_count(agg.0, agg.1).await;
        let last = env.last_seq().await;
        let reply = env
            .request_raw(&format!("cmd.{name}"), body.into_bytes())
            .await;
        let message = check_error(reply, class, needles);
        assert_eq!(
            env.subject_count(agg.0, agg.1).await,
            before,
            "{name}: an event was stored for {agg:?}"
        );
        assert_eq!(env.last_seq().await, last, "{name}: the stream moved");
        message
    }
}

/// s1 on BTC-USDT, p1 open in USDT with 1000 deposited and s1 attached.
async fn setup() -> TestEnv {
    let env = TestEnv::with_all_workers().await;
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    env.funded("p1", "u1", "1000", "s1").await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_for_malformed_bodies_and_fields() {
    let env = setup().await;
    let update = command(&env, "portfolio.update", (PORTFOLIO, "p1"));
    let execute = command(&env, "signal.execute", (PORTFOLIO, "p1"));
    let create_s9 = command(&env, "strategy.create", (STRATEGY, "s9"));

    // Malformed JSON, truncated and with a trailing comma.
    for body in [
        r#"{"portfolio_id":"p1","op":"deposit","amount":"#,
        r#"{"portfolio_id":"p1","op":"deposit","amount":5,}"#,
    ] {
        update.refused(body, BAD_REQUEST, &["malformed JSON"]).await;
    }
    update.refused("", BAD_REQUEST, &[]).await;
    // Bodies that are JSON but not an object.
    for body in [
        r#"[{"portfolio_id":"p1","op":"deposit","amount":5}]"#,
        r#""deposit""#,
        "42",
        "null",
    ] {
        update.refused(body, BAD_REQUEST, &["JSON object"]).await;
    }
    // A typo never passes silently.
    let typo = json!({"portfolio_id": "p1", "op": "deposit", "amout": 5});
    update
        .refused(typo, BAD_REQUEST, &["unknown field", "amout"])
        .await;
    let mut typo = signal("p1", "s1", "buy", "0.01", "20000", None);
    typo["feee"] = "1".into();
    execute
        .refused(typo, BAD_REQUEST, &["unknown field", "feee"])
        .await;
    let mut typo = strategy("u1", "s9", &["BTC-USDT"]);
    typo["risk_profile"]["max_leverag"] = 1.into();
    create_s9.refused(typo, BAD_REQUEST, &["max_leverag"]).await;
    // Missing fields.
    let missing = json!({"portfolio_id": "p1", "op": "deposit"});
    update
        .refused(missing, BAD_REQUEST, &["missing field", "amount"])
        .await;
    let missing = json!({"portfolio_id": "p1", "amount": "5"});
    update
        .refused(missing, BAD_REQUEST, &["missing field", "op"])
        .await;
    let mut missing = signal("p1", "s1", "buy", "0.01", "20000", None);
    missing.as_object_mut().unwrap().remove("price");
    execute
        .refused(missing, BAD_REQUEST, &["missing field", "price"])
        .await;
    let mut missing = strategy("u1", "s9", &["BTC-USDT"]);
    missing.as_object_mut().unwrap().remove("risk_profile");
    create_s9
        .refused(missing, BAD_REQUEST, &["risk_profile"])
        .await;
    // A value of the wrong type, named by its field's path.
    let mut wrong = strategy("u1", "s9", &["BTC-USDT"]);
    wrong["risk_profile"]["max_open_positions"] = "3".into();
    let message = create_s9.refused(wrong, BAD_REQUEST, &[]).await;
    assert_eq!(
        message,
        r#"risk_profile.max_open_positions: invalid type: string "3", expected u32"#
    );
    // Unknown op.
    let unknown = json!({"portfolio_id": "p1", "op": "transfer", "amount": 5});
    update
        .refused(unknown, BAD_REQUEST, &["op", "transfer"])
        .await;
    // Names of 0 or 201 characters.
    for name in [String::new(), "n".repeat(201)] {
        let rename = json!({"portfolio_id": "p1", "op": "rename", "name": name});
        update.refused(rename, BAD_REQUEST, &["name"]).await;
    }
    // A name with U+0000: it would be stored in the stream and then refused by Postgres, so
    // the portfolio or strategy would never reach its read model.
    let rename = json!({"portfolio_id": "p1", "op": "rename", "name": "a\u{0}b"});
    update
        .refused(rename, BAD_REQUEST, &["name: must not hold U+0000"])
        .await;
    let open = json!({"portfolio_id": "p9", "op": "open", "user_id": "u1", "name": "x\u{0}",
                      "quote_currency": "USDT"});
    command(&env, "portfolio.update", (PORTFOLIO, "p9"))
        .refused(open, BAD_REQUEST, &["name: must not hold U+0000"])
        .await;
    let mut nul = strategy("u1", "s9", &["BTC-USDT"]);
    nul["strategy_name"] = "s\u{0}".into();
    create_s9
        .refused(nul, BAD_REQUEST, &["strategy_name: must not hold U+0000"])
        .await;
    // A key given twice is refused, not read as its last value.
    update
        .refused(
            r#"{"portfolio_id":"p1","op":"withdraw","op":"deposit","amount":5}"#,
            BAD_REQUEST,
            &["duplicate field `op`"],
        )
        .await;
    // Wrong types for the common keys.
    let mut bad_cid = deposit("p1", "5");
    bad_cid["command_id"] = "not-a-uuid".into();
    update.refused(bad_cid, BAD_REQUEST, &["command_id"]).await;
    let mut bad_ev = deposit("p1", "5");
    bad_ev["expected_version"] = (-1).into();
    update
        .refused(bad_ev, BAD_REQUEST, &["expected_version"])
        .await;

    // The portfolio is still usable and saw exactly its four events.
    let ok = env.cmd("portfolio.update", deposit("p1", "5")).await;
    assert_eq!(version(&ok), 4, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_for_ids_that_could_address_other_subjects() {
    let env = setup().await;
    let update = command(&env, "portfolio.update", (PORTFOLIO, "p1"));
    let execute = command(&env, "signal.execute", (PORTFOLIO, "p1"));
    let long = "x".repeat(65);
    let bad_ids = ["p.1", "p*", ">", "*", "a b", "", "p1.>", long.as_str()];
    for id in bad_ids {
        // As the aggregate id: nothing anywhere in the stream may move.
        update
            .refused(deposit(id, "5"), BAD_REQUEST, &["portfolio_id"])
            .await;
        update
            .refused(open(id, "u1"), BAD_REQUEST, &["portfolio_id"])
            .await;
        command(&env, "strategy.delete", (STRATEGY, "s1"))
            .refused(json!({"strategy_id": id}), BAD_REQUEST, &["strategy_id"])
            .await;
        command(&env, "strategy.create", (STRATEGY, "s1"))
            .refused(
                strategy("u1", id, &["BTC-USDT"]),
                BAD_REQUEST,
                &["strategy_id"],
            )
            .await;
        // As a referenced id or an owner.
        update
            .refused(attach("p1", id), BAD_REQUEST, &["strategy_id"])
            .await;
        command(&env, "portfolio.update", (PORTFOLIO, "p2"))
            .refused(open("p2", id), BAD_REQUEST, &["user_id"])
            .await;
        let on_strategy = signal("p1", id, "buy", "0.01", "20000", None);
        execute
            .refused(on_strategy, BAD_REQUEST, &["strategy_id"])
            .await;
        let on_portfolio = signal(id, "s1", "buy", "0.01", "20000", None);
        execute
            .refused(on_portfolio, BAD_REQUEST, &["portfolio_id"])
            .await;
        // And in a query.
        for (query, field) in [
            ("portfolio.performance", "portfolio_id"),
            ("strategy.get", "strategy_id"),
            ("strategy.list", "user_id"),
        ] {
            let reply = env
                .request(&format!("query.{query}"), json!({ field: id }))
                .await;
            check_error(reply, BAD_REQUEST, &[field]);
        }
    }
    // 64 characters is still an id.
    let ok = env
        .cmd("portfolio.update", open(&"y".repeat(64), "u1"))
        .await;
    assert_eq!(ok["aggregate_id"], "y".repeat(64));
    assert_eq!(env.subject_count(PORTFOLIO, &"y".repeat(64)).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_for_symbols_decimals_and_times() {
    let env = setup().await;
    let update = command(&env, "portfolio.update", (PORTFOLIO, "p1"));
    let execute = command(&env, "signal.execute", (PORTFOLIO, "p1"));
    let btc_price = command(&env, "market.price", (MARKET, "BTC-USDT"));

    // Invalid symbols, in a price and in a signal.
    for sym in [
        "btc-usdt",
        "BTC.USDT",
        "BTCUSDT",
        "BTC-USDT-X",
        "BTC-",
        "BTC-*",
        ">",
        "",
    ] {
        btc_price
            .refused(price(sym, "20000"), BAD_REQUEST, &["symbol"])
            .await;
        let on_symbol = signal_on("p1", "s1", sym, "buy", "0.01", "20000");
        execute.refused(on_symbol, BAD_REQUEST, &["symbol"]).await;
    }
    let mut bad_allowed = strategy("u1", "s9", &["BTC-USDT"]);
    bad_allowed["risk_profile"]["allowed_symbols"] = json!(["BTC-USDT", "eth.usdt"]);
    command(&env, "strategy.create", (STRATEGY, "s9"))
        .refused(bad_allowed, BAD_REQUEST, &["risk_profile.allowed_symbols"])
        .await;

    // Nine places, as a string, a number and in exponent notation.
    for amount in [
        json!("0.000000001"),
        json!(1.000000001),
        json!("1E-9"),
        json!(1e-9),
    ] {
        let body = json!({"portfolio_id": "p1", "op": "deposit", "amount": amount});
        update
            .refused(body, BAD_REQUEST, &["amount", "8 decimal places"])
            .await;
    }
    btc_price
        .refused(
            price("BTC-USDT", "20000.000000001"),
            BAD_REQUEST,
            &["price", "8 decimal places"],
        )
        .await;
    // Zero and negative amounts and prices.
    for amount in [
        json!("0"),
        json!(0),
        json!("-5"),
        json!(-0.5),
        json!("0.00000000"),
    ] {
        for op in ["deposit", "withdraw"] {
            let body = json!({"portfolio_id": "p1", "op": op, "amount": amount});
            update.refused(body, BAD_REQUEST, &["amount", "> 0"]).await;
        }
        let body = json!({"symbol": "BTC-USDT", "price": amount});
        btc_price
            .refused(body, BAD_REQUEST, &["price", "> 0"])
            .await;
    }
    // Not a decimal at all.
    for amount in [json!("abc"), json!(true), json!([1]), json!("1,5")] {
        let body = json!({"portfolio_id": "p1", "op": "deposit", "amount": amount});
        update.refused(body, BAD_REQUEST, &["amount"]).await;
    }

    // `at`: not RFC 3339, far in the future, or before the aggregate's last event.
    for at in [
        "yesterday",
        "2026-01-01 00:00:00",
        "2026-01-01",
        "1700000000",
    ] {
        let mut body = deposit("p1", "5");
        body["at"] = at.into();
        update.refused(body, BAD_REQUEST, &["at", "RFC 3339"]).await;
    }
    let mut body = deposit("p1", "5");
    body["at"] = "2099-01-01T00:00:00Z".into();
    update.refused(body, BAD_REQUEST, &["at", "future"]).await;
    let mut body = price("BTC-USDT", "20000");
    body["at"] = "2099-01-01T00:00:00Z".into();
    btc_price
        .refused(body, BAD_REQUEST, &["at", "future"])
        .await;
    let mut body = deposit("p1", "5");
    body["at"] = "2001-01-01T00:00:00Z".into();
    update.refused(body, BAD_REQUEST, &["at", "before"]).await;

    // A valid deposit with 8 places in exponent notation is accepted, so the above were the
    // values, not the shape.
    let ok = env
        .cmd(
            "portfolio.update",
            json!({"portfolio_id": "p1", "op": "deposit", "amount": 1e-8}),
        )
        .await;
    let perf = env.performance_at("p1", seq(&ok)).await;
    assert_eq!(perf["cash"], "1000.00000001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_already_exists_and_conflict() {
    let env = setup().await;
    let update = command(&env, "portfolio.update", (PORTFOLIO, "p1"));

    // not_found: commands on an unknown portfolio or strategy.
    let update_ghost = command(&env, "portfolio.update", (PORTFOLIO, "ghost"));
    update_ghost
        .refused(
            deposit("ghost", "5"),
            NOT_FOUND,
            &["portfolio", "not found"],
        )
        .await;
    update_ghost
        .refused(close("ghost"), NOT_FOUND, &["not found"])
        .await;
    command(&env, "signal.execute", (PORTFOLIO, "ghost"))
        .refused(
            signal("ghost", "s1", "buy", "0.01", "20000", None),
            NOT_FOUND,
            &["not found"],
        )
        .await;
    update
        .refused(attach("p1", "nope"), NOT_FOUND, &["strategy", "nope"])
        .await;
    let rename = json!({"strategy_id": "nope", "strategy_name": "x"});
    command(&env, "strategy.update", (STRATEGY, "nope"))
        .refused(rename, NOT_FOUND, &["nope"])
        .await;
    command(&env, "strategy.delete", (STRATEGY, "nope"))
        .refused(json!({"strategy_id": "nope"}), NOT_FOUND, &["nope"])
        .await;
    assert_eq!(env.subject_count(PORTFOLIO, "ghost").await, 0);
    assert_eq!(env.subject_count(STRATEGY, "nope").await, 0);

    // not_found: queries of an unknown portfolio and strategy (after the read model caught up).
    let last = env.last_seq().await;
    let mut q = json!({"portfolio_id": "ghost", "min_stream_seq": last, "timeout_ms": 10000});
    check_error(
        env.request("query.portfolio.performance", q.clone()).await,
        NOT_FOUND,
        &["ghost"],
    );
    q = json!({"strategy_id": "nope", "min_stream_seq": last, "timeout_ms": 10000});
    check_error(
        env.request("query.strategy.get", q).await,
        NOT_FOUND,
        &["nope"],
    );

    // already_exists: open twice, create an existing strategy id.
    let mut again = open("p1", "u2");
    again["name"] = "another".into();
    update.refused(again, ALREADY_EXISTS, &["p1"]).await;
    command(&env, "strategy.create", (STRATEGY, "s1"))
        .refused(strategy("u2", "s1", &["ETH-USDT"]), ALREADY_EXISTS, &["s1"])
        .await;

    // conflict: a stale expected_version (p1 is at version 3).
    for stale in [0, 1, 2, 4, 99] {
        let mut body = deposit("p1", "5");
        body["expected_version"] = stale.into();
        update
            .refused(body, CONFLICT, &["expected_version", &stale.to_string()])
            .await;
    }
    let mut body = json!({"strategy_id": "s1", "strategy_name": "renamed", "expected_version": 7});
    command(&env, "strategy.update", (STRATEGY, "s1"))
        .refused(&body, CONFLICT, &["expected_version"])
        .await;
    body["expected_version"] = 1.into();
    let ok = env.cmd("strategy.update", body).await;
    assert_eq!(version(&ok), 2);

    // The unchanged state: p1 is still at 1000 and version 3.
    let perf = env.performance_at("p1", env.last_seq().await).await;
    assert_eq!(perf["cash"], "1000");
    assert_eq!(perf["version"], 3);
    assert_eq!(perf["user_id"], "u1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_refusals_are_422_and_store_nothing() {
    let env = setup().await;
    let update = command(&env, "portfolio.update", (PORTFOLIO, "p1"));
    let insufficient = refusal("insufficient_funds");

    // insufficient_funds: withdraw above cash (and an exact-cash withdrawal is fine).
    let msg = update
        .refused(
            withdraw("p1", "1000.00000001"),
            insufficient,
            &["1000.00000001", "1000", "USDT"],
        )
        .await;
    assert!(msg.contains("cash"), "{msg}");
    let w = env.cmd("portfolio.update", withdraw("p1", "400")).await;
    update
        .refused(withdraw("p1", "600.5"), insufficient, &["600.5", "600"])
        .await;
    let w2 = env.cmd("portfolio.update", withdraw("p1", "600")).await;
    assert_eq!(version(&w2), version(&w) + 1);
    update
        .refused(withdraw("p1", "0.00000001"), insufficient, &["cash"])
        .await;
    env.cmd("portfolio.update", deposit("p1", "30000")).await;

    // strategy_deleted: update of a deleted strategy, and attaching it.
    env.cmd("strategy.create", strategy("u1", "s2", &["BTC-USDT"]))
        .await;
    env.cmd("strategy.delete", json!({"strategy_id": "s2"}))
        .await;
    let deleted = refusal("strategy_deleted");
    let rename = json!({"strategy_id": "s2", "strategy_name": "back"});
    command(&env, "strategy.update", (STRATEGY, "s2"))
        .refused(rename, deleted, &["s2", "deleted"])
        .await;
    command(&env, "strategy.delete", (STRATEGY, "s2"))
        .refused(json!({"strategy_id": "s2"}), deleted, &["s2"])
        .await;
    update.refused(attach("p1", "s2"), deleted, &["s2"]).await;

    // position_not_flat: close with a position.
    let buy = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "buy", "0.5", "20000", None),
        )
        .await;
    assert_eq!(buy["status"], "executed", "{buy}");
    update
        .refused(close("p1"), refusal("position_not_flat"), &["BTC-USDT"])
        .await;
    let sell = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "sell", "0.5", "20000", None),
        )
        .await;
    assert_eq!(sell["trade"]["position_after"], "0", "{sell}");
    // Refusals use the current state: the sell went through another worker, and its cash
    // (30000 - 10010 + 9990) can all be withdrawn here.
    assert_eq!(sell["trade"]["cash_after"], "29980", "{sell}");
    update
        .refused(withdraw("p1", "29980.00000001"), insufficient, &["29980"])
        .await;
    let w = env.cmd("portfolio.update", withdraw("p1", "29980")).await;
    assert_eq!(version(&w), version(&sell) + 1);

    // portfolio_closed: once closed, a portfolio takes no money, name or strategy; what it
    // still holds may leave (cash: none is left here; its strategies).
    let closed = env.cmd("portfolio.update", close("p1")).await;
    assert_eq!(closed["events"][0]["type"], "PortfolioClosed");
    for body in [
        deposit("p1", "5"),
        close("p1"),
        json!({"portfolio_id": "p1", "op": "rename", "name": "x"}),
        json!({"portfolio_id": "p1", "op": "attach_strategy", "strategy_id": "s1"}),
    ] {
        update
            .refused(body, refusal("portfolio_closed"), &["p1", "closed"])
            .await;
    }
    update
        .refused(withdraw("p1", "5"), insufficient, &["cash is 0"])
        .await;
    let detached = env
        .cmd(
            "portfolio.update",
            json!({"portfolio_id": "p1", "op": "detach_strategy", "strategy_id": "s1"}),
        )
        .await;
    assert_eq!(version(&detached), version(&closed) + 1);
    let perf = env.performance_at("p1", seq(&detached)).await;
    assert_eq!(perf["status"], "closed");
    assert_eq!(perf["attached_strategies"], json!([]), "{perf}");
    assert_eq!(perf["version"], version(&detached));
}

/// A database that takes a query worker's statements and never answers (a server stopped, a
/// network cut off after connecting): the query is answered `unavailable` within
/// `CH_QUERY_TIMEOUT_MS` (or a `min_stream_seq` wait's bound), not left unanswered; once the
/// database answers again, so do the queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_answer_is_unavailable_within_the_bounds() {
    let mut env = TestEnv::new().await;
    let proxy = FreezingProxy::start(env.database_addr()).await;
    let mut cfg = env.app_config();
    cfg.database_url = env.database_url_via(proxy.port());
    cfg.query_timeout = std::time::Duration::from_millis(300);
    env.start_with(Worker::QueryPortfolio, cfg).await;
    let missing = json!({"portfolio_id": "p1"});
    let analysis = "query.portfolio.analysis";
    env.request("query.portfolio.performance", missing.clone())
        .await
        .err(404, "not_found");
    env.request(analysis, missing.clone())
        .await
        .err(404, "not_found");

    proxy.freeze();
    // The wait's bound (what is left of it) and a second: the sessions were replaced, and a
    // new one cannot even log in.
    let wait = json!({"portfolio_id": "p1", "min_stream_seq": 1, "timeout_ms": 200});
    for (endpoint, body, bounds) in [
        ("query.portfolio.performance", missing.clone(), 300..=300),
        (analysis, missing.clone(), 300..=300),
        ("query.portfolio.performance", wait, 1_000..=1_200),
    ] {
        let msg = check_error(
            env.request(endpoint, body).await,
            UNAVAILABLE,
            &["the database did not answer ", "within ", " ms"],
        );
        let ms: u64 = msg
            .trim_end_matches(" ms")
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no bound in {msg:?}"));
        assert!(bounds.contains(&ms), "{msg}");
    }

    proxy.thaw();
    eventually(|| async {
        match env.request(analysis, missing.clone()).await.code() {
            Some("not_found") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_errors_stale_and_timeout_bounds() {
    let env = setup().await;
    let last = env.last_seq().await;

    // stale: a sequence the stream will not reach within 50 ms.
    let far = last + 1_000_000;
    // The bound a `stale` message says it waited.
    let bound = |msg: &str| -> u64 {
        msg.trim_end_matches(" ms")
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no bound in {msg:?}"))
    };
    let q = json!({"portfolio_id": "p1", "min_stream_seq": far, "timeout_ms": 50});
    // The client's own bound (what was left of it once the request was read), not the
    // default 2 s.
    let msg = check_error(
        env.request("query.portfolio.performance", q).await,
        STALE,
        &[&far.to_string(), " ms"],
    );
    let waited = bound(&msg);
    assert!(waited <= 50, "{msg}");
    // Without `timeout_ms`, API.md's default bound of 2 s (less what reading the request took).
    let started = std::time::Instant::now();
    let msg = check_error(
        env.request(
            "query.portfolio.performance",
            json!({"portfolio_id": "p1", "min_stream_seq": far}),
        )
        .await,
        STALE,
        &[&far.to_string(), " ms"],
    );
    let waited = bound(&msg);
    // (less by however long a loaded machine took to read the request: not 1 s, nor 10)
    assert!((1_500..=2_000).contains(&waited), "{msg}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(waited));
    for (name, q) in [
        (
            "strategy.get",
            json!({"strategy_id": "s1", "min_stream_seq": far, "timeout_ms": 50}),
        ),
        (
            "strategy.list",
            json!({"user_id": "u1", "min_stream_seq": far, "timeout_ms": 50}),
        ),
    ] {
        check_error(
            env.request(&format!("query.{name}"), q).await,
            STALE,
            &[&far.to_string()],
        );
    }

    // A request that cannot be answered is bad_request at once, not stale after the wait.
    for (name, q, field) in [
        (
            "portfolio.performance",
            json!({"portfolio_id": "p.1"}),
            "portfolio_id",
        ),
        ("strategy.get", json!({"strategy_id": "s 1"}), "strategy_id"),
        (
            "strategy.list",
            json!({"user_id": "u1", "limit": 0}),
            "limit",
        ),
        (
            "strategy.list",
            json!({"user_id": "u1", "cursor": "a*"}),
            "cursor",
        ),
        (
            "strategy.leaderboard",
            json!({"user_id": "u1", "limit": 501}),
            "limit",
        ),
        (
            "portfolio.analysis",
            json!({"portfolio_id": "p1", "from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}),
            "from",
        ),
        (
            "portfolio.analysis",
            json!({"portfolio_id": "p1", "risk_free_rate": "-1"}),
            "risk_free_rate",
        ),
    ] {
        let mut q = q;
        q["min_stream_seq"] = far.into();
        q["timeout_ms"] = 10_000.into();
        // (checked after the wait, it was `stale`, 10 s later)
        check_error(
            env.request(&format!("query.{name}"), q).await,
            BAD_REQUEST,
            &[field],
        );
    }
    // An optional field sent as null is its default, as when absent; a rate in exponent
    // notation is the rate.
    for (name, q) in [
        (
            "strategy.list",
            json!({"user_id": "u1", "include_deleted": null}),
        ),
        (
            "strategy.leaderboard",
            json!({"user_id": "u1", "by": null, "include_deleted": null, "limit": null}),
        ),
        (
            "portfolio.analysis",
            json!({"portfolio_id": "p1", "from": "2026-01-01T00:00:00Z",
                   "to": "2027-01-01T00:00:00Z", "interval": null, "risk_free_rate": null}),
        ),
    ] {
        // Both read at the same sequence (the setup's), as of which the read models answer.
        let mut q = q;
        q["min_stream_seq"] = last.into();
        q["timeout_ms"] = 10_000.into();
        let mut with_nulls = env.request(&format!("query.{name}"), q.clone()).await.ok();
        let mut absent = q.clone();
        absent.as_object_mut().unwrap().retain(|_, v| !v.is_null());
        let mut without = env.request(&format!("query.{name}"), absent).await.ok();
        for r in [&mut with_nulls, &mut without] {
            r.as_object_mut().unwrap().remove("as_of_seq");
        }
        assert_eq!(with_nulls, without, "{name}");
    }
    let rate = |r: &str| {
        json!({"portfolio_id": "p1", "from": "2026-01-01T00:00:00Z", "to": "2027-01-01T00:00:00Z",
               "risk_free_rate": r, "min_stream_seq": last, "timeout_ms": 10_000})
    };
    let exp = env
        .request("query.portfolio.analysis", rate("3E-2"))
        .await
        .ok();
    let plain = env
        .request("query.portfolio.analysis", rate("0.03"))
        .await
        .ok();
    assert_eq!(exp["risk_free_rate"], 0.03, "{exp}");
    assert_eq!(exp["metrics"], plain["metrics"]);
    let long = env
        .request(
            "query.portfolio.analysis",
            rate("0.030000000000000000000000000000001"),
        )
        .await
        .ok();
    assert_eq!(long["risk_free_rate"], 0.03, "{long}");
    // As a number is read: an exponent, and digits beyond a Decimal's 28 places.
    for (text, read) in [("1e-30", 1e-30), ("0.00000000000000000000000000001", 1e-29)] {
        let r = env
            .request("query.portfolio.analysis", rate(text))
            .await
            .ok();
        // (serde_json's reading of the reply, not correctly rounded at such exponents)
        let echoed = r["risk_free_rate"].as_f64().expect("a number");
        assert!((echoed - read).abs() <= read * 1e-12, "{text}: {r}");
    }
    let mut q = rate("0");
    q["risk_free_rate"] = true.into();
    let r = env
        .request("query.portfolio.analysis", q)
        .await
        .err(400, "bad_request");
    assert_eq!(
        r["error"]["message"], "risk_free_rate: expected a number or a decimal string",
        "{r}"
    );

    // timeout_ms above 10000 (and 0) is bad_request; 10000 itself is fine.
    for (name, mut q) in [
        ("portfolio.performance", json!({"portfolio_id": "p1"})),
        ("strategy.get", json!({"strategy_id": "s1"})),
        ("strategy.list", json!({"user_id": "u1"})),
    ] {
        q["timeout_ms"] = 10_001.into();
        check_error(
            env.request(&format!("query.{name}"), q.clone()).await,
            BAD_REQUEST,
            &["timeout_ms", "10000"],
        );
        q["timeout_ms"] = 0.into();
        check_error(
            env.request(&format!("query.{name}"), q.clone()).await,
            BAD_REQUEST,
            &["timeout_ms"],
        );
        q["timeout_ms"] = 10_000.into();
        q["min_stream_seq"] = last.into();
        let ok = env.request(&format!("query.{name}"), q).await.ok();
        assert!(ok["as_of_seq"].as_u64().unwrap() >= last, "{ok}");
    }

    // Queries refuse typos and malformed bodies too.
    let q = json!({"portfolio_id": "p1", "min_stream_seqq": 1});
    check_error(
        env.request("query.portfolio.performance", q).await,
        BAD_REQUEST,
        &["min_stream_seqq"],
    );
    // A wrong value is named by its field, without the parser's position (which the field
    // already says); malformed JSON keeps its position.
    let q = json!({"portfolio_id": "p1", "timeout_ms": -1});
    let message = check_error(
        env.request("query.portfolio.performance", q).await,
        BAD_REQUEST,
        &["-1"],
    );
    assert_eq!(
        message,
        "timeout_ms: invalid value: integer `-1`, expected u64"
    );
    let message = check_error(
        env.request("query.portfolio.performance", json!({"portfolio_id": 5}))
            .await,
        BAD_REQUEST,
        &[],
    );
    assert_eq!(
        message,
        "portfolio_id: invalid type: integer `5`, expected a string"
    );
    let message = check_error(
        env.request_raw("query.strategy.get", "{\"strategy_id\":")
            .await,
        BAD_REQUEST,
        &["malformed JSON", "line 1 column 15"],
    );
    assert!(!message.contains('?'), "{message}");
    check_error(
        env.request_raw("query.strategy.get", "[]").await,
        BAD_REQUEST,
        &["JSON object"],
    );
    // Text that is not JSON is said to be that, as the command workers say it.
    check_error(
        env.request_raw("query.portfolio.performance", "x").await,
        BAD_REQUEST,
        &["malformed JSON: expected value at line 1 column 1"],
    );
    // An array of the fields in order would read as the struct: still not a request.
    check_error(
        env.request_raw("query.portfolio.performance", r#" ["p1", null, null]"#)
            .await,
        BAD_REQUEST,
        &["request body must be a JSON object"],
    );
    check_error(
        env.request_raw(
            "query.portfolio.performance",
            r#"{"portfolio_id":"p1","portfolio_id":"p2"}"#,
        )
        .await,
        BAD_REQUEST,
        &["duplicate field `portfolio_id`"],
    );
    let message = check_error(
        env.request("query.strategy.list", json!({})).await,
        BAD_REQUEST,
        &["user_id"],
    );
    assert_eq!(message, "missing field `user_id`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_never_reaches_a_worker() {
    let env = setup().await;
    let before = env.subject_count(PORTFOLIO, "p1").await;
    let last = env.last_seq().await;
    let max = env.client.server_info().max_payload;
    assert!(max <= 1024 * 1024, "server max payload is {max}");

    let body = json!({"portfolio_id": "p1", "op": "rename", "name": "n".repeat(1024 * 1024 + 16)});
    let subject = format!("{}.cmd.portfolio.update", env.subjects.prefix());
    let r = env.client.request(subject, body.into_bytes().into()).await;
    let e = r.expect_err("a request above max payload fails at the client");
    assert_eq!(
        e.kind(),
        async_nats::client::RequestErrorKind::MaxPayloadExceeded,
        "{e}"
    );
    assert!(e.to_string().contains("max payload"), "{e}");
    assert_eq!(env.subject_count(PORTFOLIO, "p1").await, before);
    assert_eq!(env.last_seq().await, last);

    // The connection is still usable, and a name just within the limits works.
    let ok = env
        .cmd(
            "portfolio.update",
            json!({"portfolio_id": "p1", "op": "rename", "name": "n".repeat(200)}),
        )
        .await;
    assert_eq!(version(&ok), before + 1);
}

/// A request within the max payload whose event would not be (rules whose decimals the event
/// spells out in full) is a `bad_request` at once: the server would never take it, so it is
/// not `unavailable` ("safe to retry"), and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_event_exceeds_the_max_payload_is_bad_request() {
    let env = setup().await;
    let max = env.client.server_info().max_payload;
    let rule = |i: usize| {
        format!(
            r#"{{"rule_id":"r{i}","symbol":"*","stake":{{"mode":"fixed_quote","value":1e20}}}}"#
        )
    };
    let mut rules = Vec::new();
    let mut size = 0;
    while size < max * 9 / 10 {
        let r = rule(rules.len());
        size += r.len() + 1;
        rules.push(r);
    }
    let body = format!(
        r#"{{"strategy_id":"big","user_id":"u1","strategy_name":"big","rules":[{}],
            "risk_profile":{{"allowed_symbols":["BTC-USDT"],"max_open_positions":3,
            "max_order_notional":"50000","max_position_notional":"100000","max_leverage":1}}}}"#,
        rules.join(",")
    );
    assert!(
        body.len() < max,
        "the request itself fits: {} of {max}",
        body.len()
    );
    let create = command(&env, "strategy.create", (STRATEGY, "big"));
    create
        .refused(body.as_str(), BAD_REQUEST, &["too large", "max_payload"])
        .await;
    env.request("query.strategy.get", json!({"strategy_id": "big"}))
        .await
        .err(404, "not_found");
}

/// An error message quotes the request (here an unknown field's name); one that quoted a large
/// request in full, in the header and the body, would make a reply above the max payload that
/// is never sent, and the client would wait for its timeout. Messages are cut short instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_quoting_a_large_request_is_cut_short_and_sent() {
    let env = setup().await;
    let field = "x".repeat(600 * 1024);
    let body = format!(r#"{{"portfolio_id":"p1","op":"rename","name":"n","{field}":1}}"#);
    let update = command(&env, "portfolio.update", (PORTFOLIO, "p1"));
    let message = update
        .refused(body.as_str(), BAD_REQUEST, &["unknown field", "[...]"])
        .await;
    assert!(
        message.len() <= ch_runtime::error::MAX_MESSAGE + 16,
        "{} bytes",
        message.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_signals_are_bad_request_invalid_quantities_are_stored_rejections() {
    let env = setup().await;

    // Malformed: bad_request, nothing stored.
    let bad = [
        (
            signal("p1", "s1", "hold", "0.01", "20000", None),
            vec!["hold"],
        ),
        (
            signal("p1", "s1", "BUY", "0.01", "20000", None),
            vec!["BUY"],
        ),
        (
            signal("p1", "s1", "buy", "0.01", "20000.000000001", None),
            vec!["price", "8 decimal places"],
        ),
        (
            signal("p1", "s1", "buy", "0.01", "0", None),
            vec!["price", "> 0"],
        ),
        (
            signal("p1", "s1", "buy", "0.01", "-20000", None),
            vec!["price", "> 0"],
        ),
        (
            signal("p1", "s1", "buy", "0.01", "20000", Some("-1")),
            vec!["fee"],
        ),
        (
            signal("p1", "s1", "buy", "0.01", "20000", Some("0.000000001")),
            vec!["fee", "8 decimal places"],
        ),
        (
            signal("p1", "s1", "buy", "abc", "20000", None),
            vec!["quantity"],
        ),
    ];
    let execute = command(&env, "signal.execute", (PORTFOLIO, "p1"));
    for (body, needles) in bad {
        execute.refused(body, BAD_REQUEST, &needles).await;
    }

    // A quantity of 0, negative, or with 9 places is the strategy's fault: stored as rejected.
    let mut n = env.subject_count(PORTFOLIO, "p1").await;
    let mut last = None;
    for q in ["0", "-0.5", "0.000000001", "1.123456789"] {
        let r = env
            .cmd(
                "signal.execute",
                signal("p1", "s1", "buy", q, "20000", None),
            )
            .await;
        assert_eq!(r["status"], "rejected", "{r}");
        assert_eq!(r["reason"], "INVALID_QUANTITY", "{r}");
        assert_eq!(r["events"][0]["type"], "TradeSignalRejected", "{r}");
        assert!(
            r["detail"].as_str().is_some_and(|d| d.contains("quantity")),
            "{r}"
        );
        n += 1;
        assert_eq!(env.subject_count(PORTFOLIO, "p1").await, n);
        assert_eq!(version(&r), n);
        last = Some(r);
    }
    let perf = env.performance_at("p1", seq(&last.unwrap())).await;
    assert_eq!(perf["rejected_signals"], 4);
    assert_eq!(perf["fill_count"], 0);
    assert_eq!(perf["cash"], "1000");
}

/// A database error printed whole, as `chctl` prints errors (`{:#}`: the error and its
/// sources), says what the server said once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_says_the_server_message_once() {
    let env = TestEnv::new().await;
    let e = env
        .pg
        .execute("SELECT * FROM no_such_table", &[])
        .await
        .expect_err("there is no such table");
    let text = format!("{:#}", anyhow::Error::from(ch_runtime::DbError::from(e)));
    assert!(text.starts_with("database: db error: "), "{text}");
    assert!(text.contains("(SQLSTATE 42P01)"), "{text}");
    assert_eq!(text.matches("no_such_table").count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_out_of_decimal_range_is_an_error_reply_not_a_silence() {
    let env = setup().await;
    env.bought("p1", "s1", "BTC-USDT", "100", "1").await;
    // A price far beyond any market's, recorded all the same (it is a valid amount): 100 BTC at
    // it are worth 10^29, more than a Decimal's 28 digits hold.
    let seq = seq(&env.cmd("market.price", price("BTC-USDT", "1e27")).await);
    let q = json!({"portfolio_id": "p1", "min_stream_seq": seq, "timeout_ms": 10000});
    check_error(
        env.request("query.portfolio.performance", q).await,
        INTERNAL,
        &["p1", "28 significant digits"],
    );
    // The analysis values its curve with arithmetic of its own: the same.
    let q = json!({"portfolio_id": "p1", "min_stream_seq": seq, "interval": "1h",
                    "timeout_ms": 10000});
    check_error(
        env.request("query.portfolio.analysis", q).await,
        INTERNAL,
        &["28 significant digits"],
    );
    // The workers go on serving (read-your-writes: the strategy read model is not waited
    // for above).
    let r = env
        .request(
            "query.strategy.get",
            json!({"strategy_id": "s1", "min_stream_seq": seq, "timeout_ms": 10000}),
        )
        .await
        .ok();
    assert_eq!(r["strategy_id"], "s1", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_beyond_any_market_never_stops_the_projector() {
    let env = setup().await;
    env.bought("p1", "s1", "BTC-USDT", "1", "10").await;
    // Accepted: a valid amount, and the portfolio's equity (about 10^22) fits a Decimal. The
    // NAV index chained at the first deposit is about 10^19; at the second one, the index
    // times the equity (10^41) did not fit, and the projector panicked on every restart.
    env.cmd("market.price", price("BTC-USDT", "1e22")).await;
    env.cmd("portfolio.update", deposit("p1", "1")).await;
    let last = seq(&env.cmd("portfolio.update", deposit("p1", "1")).await);
    let q = json!({"portfolio_id": "p1", "min_stream_seq": last, "timeout_ms": 10000});
    let r = env.request("query.portfolio.performance", q).await.ok();
    assert_eq!(r["net_deposits"], "1002", "{r}");
    assert_eq!(
        r["positions"][0]["market_value"], "10000000000000000000000",
        "{r}"
    );
    // The growth since the last flow is none: the return is the index's, about 10^19 - 1.
    let total: f64 = r["total_return"].as_str().unwrap().parse().unwrap();
    assert!(total > 1e18, "{r}");
    // The projector goes on with what follows.
    let more = seq(&env.cmd("portfolio.update", deposit("p1", "3")).await);
    let q = json!({"portfolio_id": "p1", "min_stream_seq": more, "timeout_ms": 10000});
    let r = env.request("query.portfolio.performance", q).await.ok();
    assert_eq!(r["net_deposits"], "1005", "{r}");
}

/// Panics on the body `panic` (a bug in a handler), answers `{"ok": true}` otherwise.
struct Panics;

impl Handler for Panics {
    async fn handle(&self, _: &str, msg: &async_nats::Message) -> Result<Value, ApiError> {
        if msg.payload.as_ref() == b"panic" {
            panic!("a bug in the handler");
        }
        Ok(json!({"ok": true}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_is_answered_internal_and_serving_goes_on() {
    let env = TestEnv::new().await;
    let spec = ServiceSpec {
        name: format!("{}-panics", env.subjects.prefix()),
        description: "a handler with a bug".into(),
        endpoints: vec![EndpointSpec {
            name: "panics".into(),
            subject: format!("{}.test.panics", env.subjects.prefix()),
        }],
        metadata: Default::default(),
    };
    let token = CancellationToken::new();
    let conns = service::Connections {
        client: env.client.clone(),
        intake: ch_runtime::connect_nats(&env.cfg, "panics")
            .await
            .expect("connects"),
    };
    let served = tokio::spawn(service::serve(
        conns,
        spec,
        Arc::new(Panics),
        Metrics::default(),
        token.clone(),
    ));
    let subject = format!("{}.test.panics", env.subjects.prefix());
    eventually(|| async {
        match env.client.request(subject.clone(), "{}".into()).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("not served yet: {e}")),
        }
    })
    .await;
    check_error(
        env.request_raw("test.panics", "panic").await,
        INTERNAL,
        &["handler failed", "a bug in the handler"],
    );
    assert_eq!(env.request("test.panics", json!({})).await.ok()["ok"], true);
    token.cancel();
    served.await.expect("joined").expect("served");
}

/// A worker started against a nats-server with JetStream off says so, and how to turn it on,
/// rather than only that the store is not ready.
#[tokio::test]
async fn a_worker_on_a_server_without_jetstream_says_it_is_off() {
    let server =
        ch_e2e::NatsServer::start_with(|port, _| format!("listen: \"127.0.0.1:{port}\"\n")).await;
    let cfg = ch_runtime::Config {
        nats_url: server.url.clone(),
        prefix: "nojs".into(),
        ..ch_runtime::Config::default()
    };
    let Err(e) = ch_runtime::app::App::start(cfg, "cmd-market").await else {
        panic!("a worker started without JetStream");
    };
    let said = e.to_string();
    assert!(
        said.contains("has JetStream off") && said.contains("-js"),
        "{said}"
    );
}

/// A command published without a reply subject (fire and forget, as NATS allows) is executed,
/// a malformed one refused, and neither answered: the worker's stats count both in `data`
/// (`ok`, `errors_by_code`) and in `no_reply`, which the standard `num_requests` (replies sent)
/// leaves out. (The worker logged a warning for each, failing to answer no one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_published_without_a_reply_subject_is_executed_and_counted() {
    let mut env = TestEnv::new().await;
    env.start(Worker::CmdPortfolio).await;
    let opened = env.cmd("portfolio.update", open("p1", "u1")).await;
    let subject = env.subjects.command("portfolio.update");
    for body in [
        serde_json::to_vec(&deposit("p1", "100")).unwrap(),
        b"not json".to_vec(),
    ] {
        env.client
            .publish(subject.clone(), body.into())
            .await
            .unwrap();
    }
    env.client.flush().await.unwrap();
    let stats = eventually(|| async {
        let s = env.service_stats(Worker::CmdPortfolio, 1).await.remove(0);
        (s["endpoints"][0]["data"]["no_reply"] == 2)
            .then_some(s.clone())
            .ok_or(format!("not both handled yet: {s}"))
    })
    .await;
    let endpoint = &stats["endpoints"][0];
    assert_eq!(endpoint["data"]["ok"], 2, "{stats}");
    assert_eq!(
        endpoint["data"]["errors_by_code"],
        json!({"bad_request": 1}),
        "{stats}"
    );
    assert_eq!(endpoint["num_requests"], 1, "{stats}");
    // The deposit is stored: the next one follows it.
    let next = env.cmd("portfolio.update", deposit("p1", "1")).await;
    assert_eq!(version(&next), version(&opened) + 2, "{next}");
}

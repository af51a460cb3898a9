//! DOMAIN.md's signal checks through the API: each rejection reason is a stored
//! `TradeSignalRejected` answered `{"status": "rejected", "reason": ...}`, counted by the
//! performance query's `rejected_signals`, and the first failing check (in DOMAIN.md's order)
//! is the reason.

use ch_domain::AggregateType;
use ch_e2e::fixtures::{
    attach, close, detach, open, price, seq, signal, signal_on, strategy, strategy_with, version,
};
use ch_e2e::TestEnv;
use serde_json::{json, Value};

/// Sends a signal that must be rejected with `reason`; checks the reply, that exactly one
/// event was stored on the portfolio, and that `detail` mentions `needle`.
async fn rejected(env: &TestEnv, body: Value, reason: &str, needle: &str) -> Value {
    let pid = body["portfolio_id"]
        .as_str()
        .expect("portfolio_id")
        .to_owned();
    let before = env.subject_count(AggregateType::Portfolio, &pid).await;
    let r = env.cmd("signal.execute", body.clone()).await;
    assert_eq!(r["status"], "rejected", "{body} -> {r}");
    assert_eq!(r["reason"], reason, "{body} -> {r}");
    let detail = r["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {r}"));
    assert!(
        detail.contains(needle),
        "detail {detail:?} should mention {needle:?}"
    );
    assert!(r.get("trade").is_none(), "{r}");
    assert_eq!(r["aggregate_id"], pid.as_str());
    assert_eq!(r["events"][0]["type"], "TradeSignalRejected", "{r}");
    assert_eq!(r["events"][0]["stream_seq"], r["stream_seq"]);
    let after = env.subject_count(AggregateType::Portfolio, &pid).await;
    assert_eq!(
        after,
        before + 1,
        "one TradeSignalRejected stored for {body}"
    );
    assert_eq!(version(&r), after, "{r}");
    r
}

/// Sends a signal that must execute; returns the reply.
async fn executed(env: &TestEnv, body: Value) -> Value {
    let r = env.cmd("signal.execute", body.clone()).await;
    assert_eq!(r["status"], "executed", "{body} -> {r}");
    assert_eq!(r["events"][0]["type"], "TradeExecuted", "{r}");
    assert!(r.get("reason").is_none(), "{r}");
    r
}

async fn performance(env: &TestEnv, portfolio_id: &str, at: &Value) -> Value {
    env.performance_at(portfolio_id, seq(at)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_reason_is_stored_and_counted() {
    let env = TestEnv::with_all_workers().await;
    let limits = json!({"max_open_positions": 2, "max_order_notional": "5000", "min_order_notional": "10",
                        "max_position_notional": "8000"});
    let symbols = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BTC-EUR"];
    env.cmd(
        "strategy.create",
        strategy_with("u1", "s1", &symbols, limits),
    )
    .await;
    env.funded("p1", "u1", "20000", "s1").await;
    let mut p1_rejections = 0;

    // 1. STRATEGY_NOT_ACTIVE: unknown, and deleted (while still attached).
    rejected(
        &env,
        signal("p1", "ghost", "buy", "0.1", "20000", None),
        "STRATEGY_NOT_ACTIVE",
        "ghost",
    )
    .await;
    env.cmd("strategy.create", strategy("u1", "sdel", &["BTC-USDT"]))
        .await;
    env.cmd("portfolio.update", attach("p1", "sdel")).await;
    // Active until deleted: the strategy checks pass, the quantity check fails.
    rejected(
        &env,
        signal("p1", "sdel", "buy", "0", "20000", None),
        "INVALID_QUANTITY",
        "quantity",
    )
    .await;
    env.cmd("strategy.delete", json!({"strategy_id": "sdel"}))
        .await;
    rejected(
        &env,
        signal("p1", "sdel", "buy", "0.01", "20000", None),
        "STRATEGY_NOT_ACTIVE",
        "deleted",
    )
    .await;
    p1_rejections += 3;

    // 1. STRATEGY_NOT_ATTACHED: never attached, and detached.
    env.cmd("strategy.create", strategy("u1", "s2", &["BTC-USDT"]))
        .await;
    rejected(
        &env,
        signal("p1", "s2", "buy", "0.1", "20000", None),
        "STRATEGY_NOT_ATTACHED",
        "s2",
    )
    .await;
    env.cmd("strategy.create", strategy("u1", "s3", &["BTC-USDT"]))
        .await;
    env.cmd("portfolio.update", attach("p1", "s3")).await;
    env.cmd("portfolio.update", detach("p1", "s3")).await;
    rejected(
        &env,
        signal("p1", "s3", "buy", "0.1", "20000", None),
        "STRATEGY_NOT_ATTACHED",
        "not attached",
    )
    .await;
    p1_rejections += 2;

    // 3. SYMBOL_NOT_ALLOWED: not in allowed_symbols; allowed but quoted in another currency.
    rejected(
        &env,
        signal_on("p1", "s1", "XRP-USDT", "buy", "10", "1"),
        "SYMBOL_NOT_ALLOWED",
        "XRP-USDT",
    )
    .await;
    rejected(
        &env,
        signal_on("p1", "s1", "BTC-EUR", "buy", "0.1", "20000"),
        "SYMBOL_NOT_ALLOWED",
        "EUR",
    )
    .await;
    p1_rejections += 2;

    // 6. OVERSELL: nothing held, then more than held.
    rejected(
        &env,
        signal("p1", "s1", "sell", "0.1", "20000", None),
        "OVERSELL",
        "holding 0",
    )
    .await;
    let b1 = executed(&env, signal("p1", "s1", "buy", "0.1", "20000", None)).await;
    assert_eq!(b1["trade"]["fee"], "2");
    assert_eq!(b1["trade"]["cash_after"], "17998");
    rejected(
        &env,
        signal("p1", "s1", "sell", "0.10000001", "20000", None),
        "OVERSELL",
        "holding 0.1",
    )
    .await;
    p1_rejections += 2;

    // 7. MAX_OPEN_POSITIONS (2): BTC and ETH open, SOL refused, more BTC is fine.
    executed(&env, signal_on("p1", "s1", "ETH-USDT", "buy", "1", "1000")).await;
    rejected(
        &env,
        signal_on("p1", "s1", "SOL-USDT", "buy", "10", "100"),
        "MAX_OPEN_POSITIONS",
        "max_open_positions is 2",
    )
    .await;
    let b2 = executed(&env, signal("p1", "s1", "buy", "0.2", "20000", None)).await;
    assert_eq!(b2["trade"]["position_after"], "0.3");
    p1_rejections += 1;

    // 8. ORDER_NOTIONAL_ABOVE_MAX / BELOW_MIN, for buys and sells alike.
    rejected(
        &env,
        signal("p1", "s1", "buy", "0.25000001", "20000", None),
        "ORDER_NOTIONAL_ABOVE_MAX",
        "5000",
    )
    .await;
    rejected(
        &env,
        signal("p1", "s1", "sell", "0.1", "60000", None),
        "ORDER_NOTIONAL_ABOVE_MAX",
        "6000",
    )
    .await;
    rejected(
        &env,
        signal("p1", "s1", "buy", "0.0001", "20000", None),
        "ORDER_NOTIONAL_BELOW_MIN",
        "below min_order_notional 10",
    )
    .await;
    rejected(
        &env,
        signal("p1", "s1", "sell", "0.0001", "20000", None),
        "ORDER_NOTIONAL_BELOW_MIN",
        "notional 2 ",
    )
    .await;
    p1_rejections += 4;

    // 9. MAX_POSITION_SIZE: 0.3 held, +0.2 at 20000 is 10000 > 8000 (the order itself is 4000).
    rejected(
        &env,
        signal("p1", "s1", "buy", "0.2", "20000", None),
        "MAX_POSITION_SIZE",
        "8000",
    )
    .await;
    p1_rejections += 1;

    // The order of the checks: the first failing one is the reason.
    rejected(
        &env,
        signal_on("p1", "s2", "XRP-USDT", "buy", "0", "1"),
        "STRATEGY_NOT_ATTACHED",
        "s2",
    )
    .await;
    rejected(
        &env,
        signal_on("p1", "s1", "XRP-USDT", "buy", "0", "1"),
        "SYMBOL_NOT_ALLOWED",
        "XRP",
    )
    .await;
    rejected(
        &env,
        signal("p1", "s1", "sell", "-1", "20000", None),
        "INVALID_QUANTITY",
        "quantity",
    )
    .await;
    rejected(
        &env,
        signal("p1", "s1", "sell", "1", "20000", None),
        "OVERSELL",
        "holding 0.3",
    )
    .await;
    rejected(
        &env,
        signal_on("p1", "s1", "SOL-USDT", "buy", "100", "100"),
        "MAX_OPEN_POSITIONS",
        "SOL-USDT",
    )
    .await;
    rejected(
        &env,
        signal("p1", "s1", "buy", "0.3", "20000", None),
        "ORDER_NOTIONAL_ABOVE_MAX",
        "6000",
    )
    .await;
    p1_rejections += 6;

    // 10. INSUFFICIENT_CASH: the notional fits, the fee does not.
    env.funded("p2", "u1", "100", "s1").await;
    rejected(
        &env,
        signal("p2", "s1", "buy", "0.005", "20000", None),
        "INSUFFICIENT_CASH",
        "100.1",
    )
    .await;
    let p2_last = executed(&env, signal("p2", "s1", "buy", "0.004", "20000", None)).await;
    assert_eq!(p2_last["trade"]["cash_after"], "19.92");

    // 2. PORTFOLIO_CLOSED (after the strategy checks: an unknown strategy still says so).
    env.cmd("portfolio.update", open("p3", "u1")).await;
    env.cmd("portfolio.update", attach("p3", "s1")).await;
    env.cmd("portfolio.update", close("p3")).await;
    rejected(
        &env,
        signal("p3", "s1", "buy", "0.1", "20000", None),
        "PORTFOLIO_CLOSED",
        "p3",
    )
    .await;
    let p3_last = rejected(
        &env,
        signal("p3", "ghost", "buy", "0.1", "20000", None),
        "STRATEGY_NOT_ACTIVE",
        "ghost",
    )
    .await;

    // The read model counts them; rejections moved no money.
    let last = rejected(
        &env,
        signal("p1", "s1", "buy", "0.2", "20000", None),
        "MAX_POSITION_SIZE",
        "10000",
    )
    .await;
    p1_rejections += 1;
    let perf = performance(&env, "p1", &last).await;
    assert_eq!(perf["rejected_signals"], p1_rejections, "{perf}");
    assert_eq!(perf["fill_count"], 3, "{perf}");
    // 20000 - 2002 - 1001 - 4004
    assert_eq!(perf["cash"], "12993", "{perf}");
    assert_eq!(perf["version"], version(&last));
    let perf = performance(&env, "p2", &p2_last).await;
    assert_eq!(perf["rejected_signals"], 1, "{perf}");
    assert_eq!(perf["fill_count"], 1, "{perf}");
    let perf = performance(&env, "p3", &p3_last).await;
    assert_eq!(perf["rejected_signals"], 2, "{perf}");
    assert_eq!(perf["status"], "closed");
    assert_eq!(perf["cash"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trading_halted_below_the_drawdown_limit_but_sells_execute() {
    let env = TestEnv::with_all_workers().await;
    env.cmd(
        "strategy.create",
        strategy_with(
            "u1",
            "sdd",
            &["BTC-USDT"],
            json!({"max_drawdown_pct": "0.1"}),
        ),
    )
    .await;
    env.cmd("strategy.create", strategy("u1", "sfree", &["BTC-USDT"]))
        .await;
    for (p, s) in [("p1", "sdd"), ("p2", "sfree")] {
        env.funded(p, "u1", "10000", s).await;
    }

    // High-water mark 10000 (the deposit). Buy 0.1 at 20000: cash 7998.
    let b = executed(&env, signal("p1", "sdd", "buy", "0.1", "20000", None)).await;
    assert_eq!(b["trade"]["cash_after"], "7998");
    executed(&env, signal("p2", "sfree", "buy", "0.1", "20000", None)).await;

    // Marked at 19000: equity 9898, 1.02% down, above the 9000 floor: buys go on.
    env.cmd("market.price", price("BTC-USDT", "19000")).await;
    let b = executed(&env, signal("p1", "sdd", "buy", "0.01", "19000", None)).await;
    assert_eq!(b["trade"]["cash_after"], "7807.81");
    assert_eq!(b["trade"]["position_after"], "0.11");

    // Marked at 10000: equity 7807.81 + 1100 = 8907.81 <= 9000: buys halted.
    env.cmd("market.price", price("BTC-USDT", "10000")).await;
    rejected(
        &env,
        signal("p1", "sdd", "buy", "0.01", "10000", None),
        "TRADING_HALTED",
        "8907.81",
    )
    .await;
    // A strategy without max_drawdown_pct is not halted by the same drop.
    executed(&env, signal("p2", "sfree", "buy", "0.01", "10000", None)).await;

    // Sells still execute: released = round8(2192.19 * 0.05 / 0.11) = 996.45.
    let s = executed(&env, signal("p1", "sdd", "sell", "0.05", "10000", None)).await;
    assert_eq!(s["trade"]["fee"], "0.5");
    assert_eq!(s["trade"]["realized_pnl"], "-496.95");
    assert_eq!(s["trade"]["cash_after"], "8307.31");
    assert_eq!(s["trade"]["position_after"], "0.06");
    // Still below the floor (8907.31): halted again, and the halt is not an error.
    rejected(
        &env,
        signal("p1", "sdd", "buy", "0.001", "10000", None),
        "TRADING_HALTED",
        "high-water",
    )
    .await;

    // Recovery to 19000: equity 8307.31 + 1140 = 9447.31 > 9000: buys go on again.
    env.cmd("market.price", price("BTC-USDT", "19000")).await;
    let last = executed(&env, signal("p1", "sdd", "buy", "0.001", "19000", None)).await;
    assert_eq!(last["trade"]["position_after"], "0.061");

    let perf = performance(&env, "p1", &last).await;
    assert_eq!(perf["rejected_signals"], 2, "{perf}");
    assert_eq!(perf["fill_count"], 4, "{perf}");
    assert_eq!(perf["positions"][0]["quantity"], "0.061", "{perf}");
    assert_eq!(perf["positions"][0]["mark_price"], "19000", "{perf}");
    let perf = performance(&env, "p2", &last).await;
    assert_eq!(perf["rejected_signals"], 0, "{perf}");
    assert_eq!(perf["fill_count"], 2, "{perf}");
}

/// DOMAIN.md: "A position with no mark yet is valued at its avg_entry_price and flagged";
/// once a price is recorded, at the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_without_a_mark_is_valued_at_its_entry_and_flagged() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("strategy.create", strategy("u1", "s1", &["ETH-USDT"]))
        .await;
    env.funded("p1", "u1", "1000", "s1").await;
    // 0.5 at 1000: notional 500, fee round8(500 * 0.001) = 0.5, no market price yet.
    let buy = executed(
        &env,
        signal_on("p1", "s1", "ETH-USDT", "buy", "0.5", "1000"),
    )
    .await;
    let perf = performance(&env, "p1", &buy).await;
    let pos = &perf["positions"][0];
    assert_eq!(pos["priced"], false, "{perf}");
    assert_eq!(pos["mark_price"], Value::Null, "{perf}");
    assert_eq!(pos["avg_entry_price"], "1000", "{perf}");
    assert_eq!(pos["market_value"], "500", "{perf}");
    // Valued at its entry, the position is down by its fee (in its cost basis).
    assert_eq!(pos["unrealized_pnl"], "-0.5", "{perf}");
    assert_eq!(perf["cash"], "499.5", "{perf}");
    assert_eq!(perf["equity"], "999.5", "{perf}");

    let mark = env.cmd("market.price", price("ETH-USDT", "1100")).await;
    let perf = performance(&env, "p1", &mark).await;
    let pos = &perf["positions"][0];
    assert_eq!(pos["priced"], true, "{perf}");
    assert_eq!(pos["mark_price"], "1100", "{perf}");
    assert_eq!(pos["market_value"], "550", "{perf}");
    assert_eq!(pos["unrealized_pnl"], "49.5", "{perf}");
    assert_eq!(perf["equity"], "1049.5", "{perf}");
}

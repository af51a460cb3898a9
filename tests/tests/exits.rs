//! Exit triggers (DOMAIN.md, "Exit triggers"): the `exit-triggers` worker follows market prices
//! and sells a whole position once its stop loss, take profit or trailing stop fires, exactly
//! once per round trip and trigger, through `cmd.signal.execute` like any client.

use std::future::Future;

use ch_domain::exits::{exit_command_id, ExitKind, Trip};
use ch_domain::AggregateType;
use ch_e2e::fixtures::{attach, deposit, open, price, seq, signal_on};
use ch_e2e::{eventually, Running, TestEnv, Worker};
use ch_runtime::app::App;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A strategy on `symbols` whose one `*` rule has the given exits.
fn strategy_with_exits(strategy_id: &str, symbols: &[&str], exits: Value) -> Value {
    let mut rule = json!({"rule_id": "r1", "symbol": "*",
                          "stake": {"mode": "fixed_quote", "value": "1000"}});
    for (k, v) in exits.as_object().expect("an object") {
        rule[k] = v.clone();
    }
    json!({
        "strategy_id": strategy_id, "user_id": "u1", "strategy_name": "exits",
        "rules": [rule],
        "risk_profile": {"allowed_symbols": symbols, "max_open_positions": 5,
                         "max_order_notional": "1000000", "max_position_notional": "1000000",
                         "max_leverage": 1}
    })
}

/// Opens a funded portfolio with `strategy_id` attached.
async fn portfolio(env: &TestEnv, portfolio_id: &str, strategy_id: &str) {
    env.cmd("portfolio.update", open(portfolio_id, "u1")).await;
    env.cmd("portfolio.update", deposit(portfolio_id, "100000"))
        .await;
    env.cmd("portfolio.update", attach(portfolio_id, strategy_id))
        .await;
}

/// Records prices in order; returns the stream sequence of the last.
async fn prices(env: &TestEnv, symbol: &str, pxs: &[&str]) -> u64 {
    let mut last = 0;
    for p in pxs {
        last = seq(&env.cmd("market.price", price(symbol, p)).await);
    }
    last
}

/// The performance of `pid` at the stream head.
async fn performance(env: &TestEnv, pid: &str) -> Value {
    let head = env.last_seq().await;
    env.performance_at(pid, head).await
}

/// Polls the performance (read-your-writes at the stream head) until `pred` holds, bounded.
async fn wait_performance(env: &TestEnv, pid: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(|| async {
        let perf = performance(env, pid).await;
        if pred(&perf) {
            Ok(perf)
        } else {
            Err(format!("{pid} never got there: {perf}"))
        }
    })
    .await
}

/// Waits until the durable consumer `durable` has acked every price up to `seq` (the worker
/// evaluated them and awaited their sells).
async fn wait_evaluated(env: &TestEnv, durable: &str, seq: u64) {
    let js = async_nats::jetstream::new(env.client.clone());
    let stream = js
        .get_stream(env.subjects.stream_name())
        .await
        .expect("stream");
    eventually(|| async {
        let info = stream.consumer_info(durable).await.expect("consumer info");
        if info.ack_floor.stream_sequence >= seq && info.num_ack_pending == 0 {
            Ok(())
        } else {
            Err(format!(
                "{durable} did not evaluate up to {seq}: ack floor {}, {} pending acks",
                info.ack_floor.stream_sequence, info.num_ack_pending
            ))
        }
    })
    .await;
}

/// The same through the worker's `status` endpoint.
async fn status_evaluated(env: &TestEnv, seq: u64) -> Value {
    eventually(|| async {
        let s = env
            .request("admin.exit-triggers.status", json!({}))
            .await
            .ok();
        if s["consumer"]["ack_floor_seq"].as_u64() >= Some(seq)
            && s["consumer"]["num_ack_pending"] == 0
        {
            Ok(s)
        } else {
            Err(format!("status never reached {seq}: {s}"))
        }
    })
    .await
}

/// Every event on a portfolio's subject, decoded as stored (envelopes).
async fn portfolio_events(env: &TestEnv, pid: &str) -> Vec<Value> {
    let js = async_nats::jetstream::new(env.client.clone());
    let stream = js
        .get_stream(env.subjects.stream_name())
        .await
        .expect("stream");
    let subject = env.subjects.aggregate(AggregateType::Portfolio, pid);
    let mut out = Vec::new();
    let mut next = 1;
    while let Ok(m) = stream
        .direct_get_next_for_subject(subject.clone(), Some(next))
        .await
    {
        next = m.sequence + 1;
        out.push(serde_json::from_slice(&m.payload).expect("an envelope"));
    }
    out
}

/// The `TradeExecuted` sells of a portfolio: (symbol, quantity, price, command_id).
async fn sells(env: &TestEnv, pid: &str) -> Vec<(String, String, String, String)> {
    portfolio_events(env, pid)
        .await
        .into_iter()
        .filter(|e| e["event_type"] == "TradeExecuted" && e["payload"]["side"] == "sell")
        .map(|e| {
            let p = &e["payload"];
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&p["symbol"]),
                s(&p["quantity"]),
                s(&p["price"]),
                s(&e["command_id"]),
            )
        })
        .collect()
}

/// The exit sell of `portfolio`'s round trip in `symbol` opened at `opened` by its only fill,
/// by `kind` of the rule of `strategy` (id, version), as [`sells`] lists it.
fn exit_sell(
    portfolio: &str,
    symbol: &str,
    qty: &str,
    px: &str,
    opened: u64,
    kind: ExitKind,
    strategy: (&str, u64),
) -> (String, String, String, String) {
    let trip = single(opened);
    exit_sell_of(portfolio, symbol, (qty, px), trip, kind, strategy)
}

/// A round trip of one fill, at `seq`.
fn single(seq: u64) -> Trip {
    Trip {
        opened_seq: seq,
        last_fill_seq: seq,
    }
}

/// [`exit_sell`] of a round trip of any fills.
fn exit_sell_of(
    portfolio: &str,
    symbol: &str,
    (qty, px): (&str, &str),
    trip: Trip,
    kind: ExitKind,
    strategy: (&str, u64),
) -> (String, String, String, String) {
    let cid = exit_command_id(portfolio, symbol, trip, kind, strategy);
    (symbol.into(), qty.into(), px.into(), cid.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trailing_stop_sells_the_whole_position_exactly_once() {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    // Entry 100: stop loss at 80, take profit at 150, trailing stop 10 % once 105 is reached.
    let exits = json!({"stop_loss_pct": "0.2", "take_profit_pct": "0.5",
                       "trailing_stop": {"trailing_pct": "0.1", "activation_pct": "0.05"}});
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &["BTC-USDT"], exits),
    )
    .await;
    portfolio(&env, "p1", "s1").await;
    let opened = env.bought("p1", "s1", "BTC-USDT", "2", "100").await;
    // Activated at 110 (stop 99), high 120 (stop 108): nothing fires down to 109.
    let quiet = prices(&env, "BTC-USDT", &["104", "110", "120", "115", "109"]).await;
    let s = status_evaluated(&env, quiet).await;
    assert_eq!(s["counters"]["triggers"], 0, "{s}");
    // Its status takes no fields.
    env.request_raw("admin.exit-triggers.status", "[1, 2]")
        .await
        .err(400, "bad_request");
    assert_eq!(performance(&env, "p1").await["fill_count"], 1);
    // 107 <= 108: the trailing stop fires; the price keeps falling, through the stop loss too.
    let trigger = env.cmd("market.price", price("BTC-USDT", "107")).await;
    let perf = wait_performance(&env, "p1", |p| p["fill_count"] == 2).await;
    let last = prices(&env, "BTC-USDT", &["106", "100", "95", "79", "70"]).await;
    let s = status_evaluated(&env, last).await;
    assert_eq!(s["counters"]["sells_executed"], 1, "{s}");
    assert_eq!(s["counters"]["sells_rejected"], 0, "{s}");

    let after = performance(&env, "p1").await;
    for p in [&perf, &after] {
        assert_eq!(p["fill_count"], 2, "{p}");
        assert_eq!(p["positions"], json!([]), "{p}");
        assert_eq!(p["rejected_signals"], 0, "{p}");
        assert_eq!(p["trade_count"], 1, "{p}");
    }
    // Bought 2 at 100 (fee 0.2, basis 200.2), sold 2 at 107 (fee 0.214):
    // realized 214 - 0.214 - 200.2 = 13.586; cash 100000 - 200.2 + 213.786.
    assert_eq!(after["realized_pnl"], "13.586", "{after}");
    assert_eq!(after["cash"], "100013.586", "{after}");
    assert_eq!(
        sells(&env, "p1").await,
        vec![exit_sell(
            "p1",
            "BTC-USDT",
            "2",
            "107",
            opened,
            ExitKind::TrailingStop,
            ("s1", 1)
        )]
    );
    // open, deposit, attach, buy, sell: nothing else (no rejected repeats).
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 5);
    // The sell's envelope names the price event that caused it.
    let events = portfolio_events(&env, "p1").await;
    let sold = events.last().expect("the sell");
    assert_eq!(
        sold["causation_id"], trigger["events"][0]["event_id"],
        "{sold}"
    );
    assert_eq!(sold["correlation_id"], sold["command_id"], "{sold}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trailing_stop_activates_against_the_entry_of_its_time() {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    // Trailing stop 10 % once 5 % above the entry; no other exits.
    let exits = json!({"trailing_stop": {"trailing_pct": "0.1", "activation_pct": "0.05"}});
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &["BTC-USDT", "ETH-USDT"], exits),
    )
    .await;
    portfolio(&env, "p1", "s1").await;
    // A client's own correlation and causation ids go into the envelope.
    let mut more = deposit("p1", "10");
    more["correlation_id"] = json!("flow-7");
    more["causation_id"] = json!("cause-1");
    env.cmd("portfolio.update", more).await;
    let events = portfolio_events(&env, "p1").await;
    let stored = events.last().expect("the deposit");
    assert_eq!(
        (&stored["correlation_id"], &stored["causation_id"]),
        (&json!("flow-7"), &json!("cause-1")),
        "{stored}"
    );

    // BTC: 1 at 100, activated at 110 (stop 99); 1 more at 110 raises the entry to 105, whose
    // activation level (110.25) no price reaches. The stop stays active and fires at 98.
    let btc = env.bought("p1", "s1", "BTC-USDT", "1", "100").await;
    prices(&env, "BTC-USDT", &["110"]).await;
    let btc_last = env.bought("p1", "s1", "BTC-USDT", "1", "110").await;
    prices(&env, "BTC-USDT", &["105", "100"]).await;
    // ETH: 1 at 100, up to 104 (not active: 105 needed); 1 more at 90, dated the 104's time
    // but stored after it, lowers the entry to 95 (activation 99.75, below 104): the 104 was
    // seen with the entry at 100, so the stop is not active until a price since reaches 99.75.
    let eth = env.bought("p1", "s1", "ETH-USDT", "1", "100").await;
    let then = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut high = price("ETH-USDT", "104");
    high["at"] = json!(then);
    env.cmd("market.price", high).await;
    let mut more = signal_on("p1", "s1", "ETH-USDT", "buy", "1", "90");
    more["at"] = json!(then);
    let r = env.cmd("signal.execute", more).await;
    assert_eq!(r["status"], "executed", "{r}");
    let eth_last = seq(&r);
    let quiet = prices(&env, "ETH-USDT", &["94", "93"]).await;
    wait_evaluated(&env, ch_readmodel::exits::DURABLE, quiet).await;
    assert_eq!(sells(&env, "p1").await, vec![]);

    prices(&env, "BTC-USDT", &["98"]).await;
    // Activated at 99.75; the stop trails the high since then, 99.75 * 0.9 = 89.775, not the
    // older 104: 93 does not sell, 89 does.
    let quiet = prices(&env, "ETH-USDT", &["99.75", "93"]).await;
    wait_evaluated(&env, ch_readmodel::exits::DURABLE, quiet).await;
    assert_eq!(sells(&env, "p1").await.len(), 1);
    prices(&env, "ETH-USDT", &["89"]).await;
    wait_performance(&env, "p1", |p| p["positions"] == json!([])).await;
    assert_eq!(
        sells(&env, "p1").await,
        vec![
            exit_sell_of(
                "p1",
                "BTC-USDT",
                ("2", "98"),
                Trip {
                    opened_seq: btc,
                    last_fill_seq: btc_last
                },
                ExitKind::TrailingStop,
                ("s1", 1)
            ),
            exit_sell_of(
                "p1",
                "ETH-USDT",
                ("2", "89"),
                Trip {
                    opened_seq: eth,
                    last_fill_seq: eth_last
                },
                ExitKind::TrailingStop,
                ("s1", 1)
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_position_in_a_symbol_is_judged_on_its_own_fills_and_rule() {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    let trailing = json!({"trailing_stop": {"trailing_pct": "0.1", "activation_pct": "0.05"}});
    env.cmd(
        "strategy.create",
        strategy_with_exits("st", &["BTC-USDT"], trailing),
    )
    .await;
    env.cmd(
        "strategy.create",
        strategy_with_exits("sl", &["BTC-USDT"], json!({"stop_loss_pct": "0.05"})),
    )
    .await;
    // pa and pb trail (activation 105 and 126), pc has a stop loss only (95).
    portfolio(&env, "pa", "st").await;
    portfolio(&env, "pb", "st").await;
    portfolio(&env, "pc", "sl").await;
    let pa = env.bought("pa", "st", "BTC-USDT", "1", "100").await;
    env.bought("pb", "st", "BTC-USDT", "1", "120").await;
    let pc = env.bought("pc", "sl", "BTC-USDT", "1", "100").await;
    // 110 activates pa's stop (99) only; 98 sells pa; 94 sells pc; pb never activated.
    let last = prices(&env, "BTC-USDT", &["110", "98", "94"]).await;
    wait_evaluated(&env, ch_readmodel::exits::DURABLE, last).await;
    assert_eq!(
        sells(&env, "pa").await,
        vec![exit_sell(
            "pa",
            "BTC-USDT",
            "1",
            "98",
            pa,
            ExitKind::TrailingStop,
            ("st", 1)
        )]
    );
    assert_eq!(sells(&env, "pb").await, vec![]);
    assert_eq!(
        sells(&env, "pc").await,
        vec![exit_sell(
            "pc",
            "BTC-USDT",
            "1",
            "94",
            pc,
            ExitKind::StopLoss,
            ("sl", 1)
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_loss_and_take_profit_fire_once_each_per_round_trip() {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    let symbols = ["BTC-USDT", "ETH-USDT", "SOL-USDT"];
    let exits = json!({"stop_loss_pct": "0.05", "take_profit_pct": "0.1"});
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &symbols, exits),
    )
    .await;
    portfolio(&env, "p1", "s1").await;
    let btc = env.bought("p1", "s1", "BTC-USDT", "1", "100").await;
    let eth = env.bought("p1", "s1", "ETH-USDT", "0.5", "2000").await;
    env.bought("p1", "s1", "SOL-USDT", "10", "50").await;

    // BTC: exactly at the stop loss level (95) fires; further falls do not sell again.
    prices(&env, "BTC-USDT", &["97", "95"]).await;
    wait_performance(&env, "p1", |p| p["fill_count"] == 4).await;
    prices(&env, "BTC-USDT", &["93", "90"]).await;
    // ETH: 2199.99 is below the take profit (2200); 2200 fires; higher prices do not sell again.
    prices(&env, "ETH-USDT", &["2100", "2199.99", "2200"]).await;
    wait_performance(&env, "p1", |p| p["fill_count"] == 5).await;
    prices(&env, "ETH-USDT", &["2300", "2500"]).await;
    // SOL stays inside its band (47.5, 55).
    let last = prices(&env, "SOL-USDT", &["47.51", "54.99", "50"]).await;
    wait_evaluated(&env, ch_readmodel::exits::DURABLE, last).await;
    let perf = performance(&env, "p1").await;
    assert_eq!(perf["fill_count"], 5, "{perf}");
    assert_eq!(perf["rejected_signals"], 0, "{perf}");
    let held: Vec<&str> = perf["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(held, vec!["SOL-USDT"], "{perf}");

    // A new round trip in BTC gets its own trigger (and command id): entry 90, stop loss 85.5.
    let btc2 = env.bought("p1", "s1", "BTC-USDT", "1", "90").await;
    prices(&env, "BTC-USDT", &["86", "85.5"]).await;
    wait_performance(&env, "p1", |p| p["fill_count"] == 7).await;
    let last = prices(&env, "BTC-USDT", &["80"]).await;
    wait_evaluated(&env, ch_readmodel::exits::DURABLE, last).await;

    assert_eq!(
        sells(&env, "p1").await,
        vec![
            exit_sell(
                "p1",
                "BTC-USDT",
                "1",
                "95",
                btc,
                ExitKind::StopLoss,
                ("s1", 1)
            ),
            exit_sell(
                "p1",
                "ETH-USDT",
                "0.5",
                "2200",
                eth,
                ExitKind::TakeProfit,
                ("s1", 1)
            ),
            exit_sell(
                "p1",
                "BTC-USDT",
                "1",
                "85.5",
                btc2,
                ExitKind::StopLoss,
                ("s1", 1)
            ),
        ]
    );
    let perf = performance(&env, "p1").await;
    assert_eq!(perf["fill_count"], 7, "{perf}");
    assert_eq!(perf["trade_count"], 3, "{perf}");
    assert_eq!(perf["rejected_signals"], 0, "{perf}");
    // open, deposit, attach, 4 buys, 3 sells.
    assert_eq!(env.subject_count(AggregateType::Portfolio, "p1").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_running_side_by_side_sell_once() {
    let mut env = TestEnv::with_all_workers().await;
    // Two replicas sharing the shipped durable (they split the prices), and a third worker on
    // a durable of its own: it evaluates every price too, so it races the others on each
    // trigger with the same command ids.
    env.start(Worker::ExitTriggers).await;
    env.start(Worker::ExitTriggers).await;
    let app = App::start(env.app_config(), ch_readmodel::exits::WORKER)
        .await
        .expect("worker starts");
    let token = CancellationToken::new();
    let other = tokio::spawn(ch_readmodel::exits::run_on(
        app,
        "exit_triggers_other",
        token.clone(),
    ));
    let js = async_nats::jetstream::new(env.client.clone());
    let stream = js
        .get_stream(env.subjects.stream_name())
        .await
        .expect("stream");
    eventually(|| async {
        let info = stream.consumer_info("exit_triggers_other").await;
        info.map(drop)
            .map_err(|e| format!("the other durable never appeared: {e}"))
    })
    .await;

    // Stop loss 5 % and a trailing stop (10 % once 5 % up): both can fire on the way down.
    let exits = json!({"stop_loss_pct": "0.05",
                       "trailing_stop": {"trailing_pct": "0.1", "activation_pct": "0.05"}});
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &["BTC-USDT"], exits),
    )
    .await;
    let ids: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
    let mut opened = Vec::new();
    for id in &ids {
        portfolio(&env, id, "s1").await;
        opened.push(env.bought(id, "s1", "BTC-USDT", "1", "100").await);
    }
    // Up to 120 (stop 108), then a fall through both the trailing stop and the stop loss.
    let last = prices(
        &env,
        "BTC-USDT",
        &["110", "120", "107", "104", "99", "94", "90", "85", "80"],
    )
    .await;
    wait_evaluated(&env, ch_readmodel::exits::DURABLE, last).await;
    wait_evaluated(&env, "exit_triggers_other", last).await;

    // The durable hands out one price at a time, so replicas sharing it judge the prices in
    // stream order as one worker does (as does the worker on its own durable): every round
    // trip is sold once, at the first price that fires, 107 (the trailing stop, 108).
    for (id, opened) in ids.iter().zip(&opened) {
        let perf = performance(&env, id).await;
        assert_eq!(perf["fill_count"], 2, "{id}: {perf}");
        assert_eq!(perf["positions"], json!([]), "{id}: {perf}");
        assert_eq!(perf["rejected_signals"], 0, "{id}: {perf}");
        let sold = sells(&env, id).await;
        assert_eq!(sold.len(), 1, "{id}: {sold:?}");
        let (symbol, qty, px, cid) = &sold[0];
        assert_eq!((symbol.as_str(), qty.as_str()), ("BTC-USDT", "1"), "{id}");
        let px: rust_decimal::Decimal = px.parse().unwrap();
        // Above the stop loss (95) only the trailing stop (108) fires; at or below, the stop loss.
        let kind = if px > rust_decimal::Decimal::from(95) {
            ExitKind::TrailingStop
        } else {
            ExitKind::StopLoss
        };
        assert_eq!(px, rust_decimal::Decimal::from(107), "{id}: sold at {px}");
        assert_eq!(
            cid,
            &exit_command_id(id, "BTC-USDT", single(*opened), kind, ("s1", 1)).to_string(),
            "{id}: sold at {px}"
        );
        assert_eq!(env.subject_count(AggregateType::Portfolio, id).await, 5);
    }
    token.cancel();
    other
        .await
        .expect("joins")
        .expect("the other worker stops cleanly");
}

/// An exit the risk checks reject (here the position's notional is above the strategy's
/// `max_order_notional`) is not sent again on every later price, which would store a rejection
/// each; once the strategy changes (the limit raised), the next price that fires sells.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_exit_is_tried_again_once_the_strategy_changes() {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    let mut created = strategy_with_exits("s1", &["BTC-USDT"], json!({"stop_loss_pct": "0.05"}));
    env.cmd("strategy.create", created.clone()).await;
    portfolio(&env, "p1", "s1").await;
    // Two buys of 0.5 at 1000, each within a limit of 900; the whole position at the stop
    // (1 at 950) is not.
    env.bought("p1", "s1", "BTC-USDT", "0.5", "1000").await;
    let mut limited = created["risk_profile"].clone();
    limited["max_order_notional"] = json!("600");
    env.cmd(
        "strategy.update",
        json!({"strategy_id": "s1", "risk_profile": limited}),
    )
    .await;
    env.bought("p1", "s1", "BTC-USDT", "0.5", "1000").await;
    let last = prices(&env, "BTC-USDT", &["950", "940", "930"]).await;
    let s = status_evaluated(&env, last).await;
    assert_eq!(
        s["counters"]["sells_rejected"], 1,
        "one rejection, not one per price: {s}"
    );
    let perf = performance(&env, "p1").await;
    assert_eq!(perf["rejected_signals"], 1, "{perf}");
    assert_eq!(perf["fill_count"], 2, "{perf}");

    // The limit raised: the next price below the stop sells the whole position.
    created["risk_profile"]["max_order_notional"] = json!("1000000");
    env.cmd(
        "strategy.update",
        json!({"strategy_id": "s1", "risk_profile": created["risk_profile"]}),
    )
    .await;
    prices(&env, "BTC-USDT", &["920"]).await;
    let perf = wait_performance(&env, "p1", |p| p["fill_count"] == 3).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
    let sold = sells(&env, "p1").await;
    assert_eq!(sold.len(), 1, "{sold:?}");
    assert_eq!(
        (sold[0].1.as_str(), sold[0].2.as_str()),
        ("1", "920"),
        "{sold:?}"
    );
}

/// A rejected exit is tried again once the position changes: here a sell by hand brings the
/// position under the strategy's limit, and the next price below the stop sells the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_exit_is_tried_again_once_the_position_changes() {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    let mut created = strategy_with_exits("s1", &["BTC-USDT"], json!({"stop_loss_pct": "0.05"}));
    created["risk_profile"]["max_order_notional"] = json!("600");
    env.cmd("strategy.create", created).await;
    portfolio(&env, "p1", "s1").await;
    let opened = env.bought("p1", "s1", "BTC-USDT", "0.5", "1000").await;
    env.bought("p1", "s1", "BTC-USDT", "0.5", "1000").await;
    // The whole position at the stop (1 at 950) is above the limit: refused, once.
    let last = prices(&env, "BTC-USDT", &["950", "945"]).await;
    let s = status_evaluated(&env, last).await;
    assert_eq!(s["counters"]["sells_rejected"], 1, "{s}");
    let sold = env
        .cmd(
            "signal.execute",
            signal_on("p1", "s1", "BTC-USDT", "sell", "0.5", "945"),
        )
        .await;
    assert_eq!(sold["status"], "executed", "{sold}");
    let by_hand = seq(&sold);
    // Half the position now: 0.5 at 940 is within the limit, and the stop sells it.
    prices(&env, "BTC-USDT", &["940"]).await;
    let perf = wait_performance(&env, "p1", |p| p["fill_count"] == 4).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
    let sold = sells(&env, "p1").await;
    assert_eq!(
        sold.iter()
            .map(|s| (s.1.as_str(), s.2.as_str()))
            .collect::<Vec<_>>(),
        [("0.5", "945"), ("0.5", "940")],
        "the sell by hand, then the exit: {sold:?}"
    );
    let trip = Trip {
        opened_seq: opened,
        last_fill_seq: by_hand,
    };
    let exit = exit_command_id("p1", "BTC-USDT", trip, ExitKind::StopLoss, ("s1", 1));
    assert_eq!(sold[1].3, exit.to_string());
}

/// A consumer made by an earlier version, with a delivery limit (20), is updated to none as
/// the worker starts: prices given back while the read models lag are never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_consumer_loses_its_delivery_limit() {
    let mut env = TestEnv::with_all_workers().await;
    let js = async_nats::jetstream::new(env.client.clone());
    let stream = js
        .get_stream(env.subjects.stream_name())
        .await
        .expect("stream");
    let mut old =
        ch_readmodel::exits::consumer_config(env.subjects.prefix(), ch_readmodel::exits::DURABLE)
            .unwrap();
    old.max_deliver = 20;
    old.max_ack_pending = 1000;
    stream.create_consumer(old).await.expect("the old consumer");
    env.start(Worker::ExitTriggers).await;
    let info = stream
        .consumer_info(ch_readmodel::exits::DURABLE)
        .await
        .expect("consumer info");
    assert_eq!(info.config.max_deliver, -1, "{:?}", info.config);
    assert_eq!(info.config.max_ack_pending, 1, "{:?}", info.config);
}

/// Every worker and the exit-trigger worker; p1 holds 1 BTC-USDT bought at 100 on s1, whose
/// exit rule stops the loss at 5 % (95).
async fn long_with_a_stop_loss() -> TestEnv {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    let exits = json!({"stop_loss_pct": "0.05"});
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &["BTC-USDT"], exits),
    )
    .await;
    portfolio(&env, "p1", "s1").await;
    env.bought("p1", "s1", "BTC-USDT", "1", "100").await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_consumers_are_made_again_and_their_workers_go_on() {
    let env = long_with_a_stop_loss().await;

    // An operator deletes both durables (`nats consumer rm`): the projector and the exit
    // worker stopped quietly when their deliveries ended (the process exited 0).
    let js = async_nats::jetstream::new(env.client.clone());
    let stream = js.get_stream(env.subjects.stream_name()).await.unwrap();
    for durable in ["proj_portfolio", ch_readmodel::exits::DURABLE] {
        assert!(stream.delete_consumer(durable).await.unwrap().success);
    }
    // Each makes its consumer again: the projector from its checkpoint, so a deposit made
    // now reaches the read model.
    let s = seq(&env.cmd("portfolio.update", deposit("p1", "5")).await);
    let perf = env.performance_at("p1", s).await;
    assert_eq!(perf["net_deposits"], "100005", "{perf}");
    // The exit worker follows the prices from when its consumer is made again (deliver
    // policy new): once it is there, a price at the stop loss sells.
    eventually(|| async {
        match stream.consumer_info(ch_readmodel::exits::DURABLE).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("the exit consumer is not back: {e}")),
        }
    })
    .await;
    prices(&env, "BTC-USDT", &["95"]).await;
    let perf = wait_performance(&env, "p1", |p| p["fill_count"] == 2).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
}

/// Both projectors, each handed to the caller (to stop).
async fn projectors(env: &TestEnv) -> (Running, Running) {
    (
        env.spawn(Worker::ProjPortfolio).await,
        env.spawn(Worker::ProjStrategy).await,
    )
}

/// An exit-trigger worker on a stream where p1 bought at 100 (stop loss 95) and another
/// portfolio made it longer, its projectors stopped: the read models stay as the old stream
/// made them when it is made anew (no `chctl setup` to empty them).
async fn exit_worker_on_a_longer_old_stream() -> TestEnv {
    let mut env = TestEnv::without_projectors().await;
    let (portfolios, strategies) = projectors(&env).await;
    env.start(Worker::ExitTriggers).await;
    create_s1(&env).await.ok();
    portfolio(&env, "p1", "s1").await;
    env.bought("p1", "s1", "BTC-USDT", "1", "100").await;
    // The old stream longer than the new one will be when its prices come, so that its read
    // models "reach" them; p1 at the same version in both.
    env.cmd("portfolio.update", open("p9", "u1")).await;
    let mut last = 0;
    for _ in 0..10 {
        last = seq(&env.cmd("portfolio.update", deposit("p9", "1")).await);
    }
    env.performance_at("p1", last).await;
    portfolios.stop().await;
    strategies.stop().await;
    env
}

/// s1 with a 5 % stop loss.
async fn create_s1(env: &TestEnv) -> ch_e2e::Reply {
    let exits = json!({"stop_loss_pct": "0.05"});
    env.request(
        "cmd.strategy.create",
        strategy_with_exits("s1", &["BTC-USDT"], exits),
    )
    .await
}

/// Until the exit worker says it holds prices back for the read models.
async fn exit_worker_waiting_for_read_models(env: &TestEnv) {
    eventually(|| async {
        // `unavailable` until the worker has made its consumer again.
        let status = env.request("admin.exit-triggers.status", json!({})).await;
        if status.code().is_none() && status.ok()["waiting_for_read_models"] == true {
            Ok(())
        } else {
            Err("not waiting for the read models")
        }
    })
    .await;
}

/// On the stream there now: s1, p1 bought at 79 (stop loss 75.05), prices 80 and 74; then
/// the projectors started again (each resets its read model, folded from another stream, and
/// folds this one): one exit sell, at 74.
async fn sold_once_at_74_on_the_new_stream(env: &TestEnv, before_projectors: impl Future) {
    // The command workers hear of the new stream by an advisory: asked until they have.
    eventually(|| async {
        match create_s1(env).await.code() {
            None => Ok(()),
            Some(code) => Err(format!("strategy.create: {code}")),
        }
    })
    .await;
    portfolio(env, "p1", "s1").await;
    let bought = env.bought("p1", "s1", "BTC-USDT", "1", "79").await;
    prices(env, "BTC-USDT", &["80", "74"]).await;
    before_projectors.await;
    let (portfolios, strategies) = projectors(env).await;
    let perf = wait_performance(env, "p1", |p| p["fill_count"] == 2).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
    let sold = exit_sell(
        "p1",
        "BTC-USDT",
        "1",
        "74",
        bought,
        ExitKind::StopLoss,
        ("s1", 1),
    );
    assert_eq!(sells(env, "p1").await, vec![sold]);
    portfolios.stop().await;
    strategies.stop().await;
}

/// The stream deleted and made anew under a running exit-trigger worker: its consumer, gone
/// with the old stream, is made again following the new stream from its start, so the prices
/// stored before that are judged too, and only once the read models are folded from the new
/// stream, not on the old stream's rows (on them, 80 would sell: below the old entry's stop).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_made_anew_is_judged_from_its_start_on_its_own_read_models() {
    let env = exit_worker_on_a_longer_old_stream().await;
    env.make_stream_anew().await;
    sold_once_at_74_on_the_new_stream(&env, exit_worker_waiting_for_read_models(&env)).await;
}

/// The stream made anew once more while the exit worker waits for the read models to follow
/// the stream before: it follows the one there now (its read models never follow the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_made_anew_again_while_the_exit_worker_waits_is_followed() {
    let env = exit_worker_on_a_longer_old_stream().await;
    env.make_stream_anew().await;
    exit_worker_waiting_for_read_models(&env).await;
    env.make_stream_anew().await;
    sold_once_at_74_on_the_new_stream(&env, exit_worker_waiting_for_read_models(&env)).await;
}

/// A price recorded late with an earlier business time (a backfill) is not the mark: it
/// triggers nothing, however far below the stop loss, though the position was open at its
/// time; the next live price does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfilled_price_below_the_stop_sells_nothing() {
    let mut env = TestEnv::with_all_workers().await;
    env.start(Worker::ExitTriggers).await;
    let ago = |h: i64| {
        (chrono::Utc::now() - chrono::Duration::hours(h))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let mut s = strategy_with_exits("s1", &["BTC-USDT"], json!({"stop_loss_pct": "0.05"}));
    s["at"] = ago(3).into();
    env.cmd("strategy.create", s).await;
    // The position opened two hours ago: open when the backfilled price was.
    let two_hours_ago = ago(2);
    for mut c in [
        open("p1", "u1"),
        deposit("p1", "100000"),
        attach("p1", "s1"),
    ] {
        c["at"] = two_hours_ago.clone().into();
        env.cmd("portfolio.update", c).await;
    }
    let mut buy = signal_on("p1", "s1", "BTC-USDT", "buy", "1", "100");
    buy["at"] = two_hours_ago.into();
    env.cmd("signal.execute", buy).await;
    prices(&env, "BTC-USDT", &["100"]).await;
    let mut backfill = price("BTC-USDT", "50");
    backfill["at"] = ago(1).into();
    let late = seq(&env.cmd("market.price", backfill).await);
    let status = status_evaluated(&env, late).await;
    // It would fire at 50: the worker saw that it is a backfill and skipped it.
    assert_eq!(status["counters"]["backfills_skipped"], 1, "{status}");
    assert_eq!(status["counters"]["triggers"], 0, "{status}");
    assert_eq!(status["counters"]["prices"], 2, "{status}");
    assert_eq!(performance(&env, "p1").await["fill_count"], 1);

    // A live price at the stop (95) sells.
    prices(&env, "BTC-USDT", &["95"]).await;
    let perf = wait_performance(&env, "p1", |p| p["fill_count"] == 2).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
}

/// Every worker but `exit-triggers`, whose durable (deliver policy `new`) was made before it
/// stopped; strategy s1 on BTC-USDT with `exits`, and p1 funded with it attached.
async fn with_the_exit_worker_down(exits: Value) -> TestEnv {
    let env = TestEnv::with_all_workers().await;
    let worker = env.spawn(Worker::ExitTriggers).await;
    env.wait_ping(Worker::ExitTriggers).await;
    worker.stop().await;
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &["BTC-USDT"], exits),
    )
    .await;
    portfolio(&env, "p1", "s1").await;
    env
}

/// Starts the exit worker, which evaluates the BTC-USDT prices up to stream sequence `last`
/// late and sells p1 nothing at them; then a live price `live` sells its whole position (its
/// `fills`th fill).
async fn judged_late_then_sold_live(env: &mut TestEnv, last: u64, live: &str, fills: u64) {
    env.start(Worker::ExitTriggers).await;
    let status = status_evaluated(env, last).await;
    assert_eq!(status["counters"]["triggers"], 0, "{status}");
    assert_eq!(sells(env, "p1").await, vec![]);
    prices(env, "BTC-USDT", &[live]).await;
    let perf = wait_performance(env, "p1", |p| p["fill_count"] == fills).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
}

/// A price the worker evaluates late (it was down, or behind) judges only a position it
/// marked: a fill stored after the price (here a second buy, at 110, that moves the stop loss
/// from 95 to 99.75) is newer than it, so the old price (96) sells nothing at its old mark,
/// and the next price judges the position as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_evaluated_late_does_not_judge_a_position_filled_after_it() {
    let mut env = with_the_exit_worker_down(json!({"stop_loss_pct": "0.05"})).await;
    let buy = |px: &str| signal_on("p1", "s1", "BTC-USDT", "buy", "1", px);
    env.cmd("signal.execute", buy("100")).await;
    prices(&env, "BTC-USDT", &["96"]).await; // above the stop at 95
    env.cmd("signal.execute", buy("110")).await; // entry 105: stop at 99.75
    let last = prices(&env, "BTC-USDT", &["110"]).await;

    // A live price below the new stop sells the whole position.
    judged_late_then_sold_live(&mut env, last, "99", 3).await;
}

/// A price evaluated late is not judged by rules written after it: with no stop loss when 90
/// was stored, a stop loss of 5 % added later (while the worker was down) must not sell at 90,
/// as a worker keeping up would not have; the next price judges by the new rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_evaluated_late_is_not_judged_by_rules_written_after_it() {
    let mut env = with_the_exit_worker_down(json!({"take_profit_pct": "0.5"})).await;
    env.cmd(
        "signal.execute",
        signal_on("p1", "s1", "BTC-USDT", "buy", "1", "100"),
    )
    .await;
    prices(&env, "BTC-USDT", &["90", "100"]).await;
    let mut update = strategy_with_exits(
        "s1",
        &["BTC-USDT"],
        json!({"take_profit_pct": "0.5", "stop_loss_pct": "0.05"}),
    );
    for k in ["user_id", "strategy_name"] {
        update.as_object_mut().unwrap().remove(k);
    }
    let updated = seq(&env.cmd("strategy.update", update).await);

    // A live price below the new stop (95) sells the whole position, by the new rules.
    judged_late_then_sold_live(&mut env, updated - 1, "94", 2).await;
}

/// A price evaluated late is not judged by a strategy attached after it: the stop loss of a
/// strategy the portfolio attached once 90 was stored (while the worker was down) must not sell
/// at 90, as a worker keeping up, finding no stop then, would not have; the next price judges
/// the position by it. (The read model holds the attachments as they are now: the worker sold
/// at 90.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_evaluated_late_is_not_judged_by_a_strategy_attached_after_it() {
    // s1, which made the buy, has no exits.
    let mut env = with_the_exit_worker_down(json!({})).await;
    env.cmd(
        "strategy.create",
        strategy_with_exits("s2", &["BTC-USDT"], json!({"stop_loss_pct": "0.05"})),
    )
    .await;
    env.cmd(
        "signal.execute",
        signal_on("p1", "s1", "BTC-USDT", "buy", "1", "100"),
    )
    .await;
    let last = prices(&env, "BTC-USDT", &["90", "100"]).await;
    let attached = seq(&env.cmd("portfolio.update", attach("p1", "s2")).await);
    assert!(attached > last);

    // A live price below s2's stop (95) sells the whole position.
    judged_late_then_sold_live(&mut env, last, "94", 2).await;
}

/// A rebuild resets the strategy read model after the worker waited for a price's sequence and
/// before it read the strategies (held here on their table, as a reset holds it): the price is
/// given back and evaluated again once the strategies are folded again, and the stop loss
/// sells. (Reading the emptied table, it found no rule and acked the price: no sell, ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_read_across_a_reset_is_given_back_and_sells_once_folded_again() {
    let env = long_with_a_stop_loss().await;
    // Both read models past the set-up (the strategy's too) before the test holds their
    // tables: else the strategy projector, not the exit worker, would be the one waiting.
    let head = env.last_seq().await;
    env.query_at("strategy.get", json!({"strategy_id": "s1"}), head)
        .await;

    let reset = ch_runtime::pg::connect(&env.cfg.database_url, Some(&env.cfg.db_schema))
        .await
        .expect("postgres");
    reset
        .batch_execute("BEGIN; LOCK TABLE strategies IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    prices(&env, "BTC-USDT", &["95"]).await;
    let app = env.subjects.service_name(Worker::ExitTriggers.name());
    eventually(|| async {
        let waiting: i64 = env
            .pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        (waiting > 0)
            .then_some(())
            .ok_or("the exit worker does not wait for the strategies yet")
    })
    .await;
    reset
        .batch_execute(
            "UPDATE ch_checkpoints SET last_seq = 0 WHERE projection = 'strategy';
             TRUNCATE strategies; COMMIT",
        )
        .await
        .expect("the reset");
    let perf = wait_performance(&env, "p1", |p| p["fill_count"] == 2).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
}

/// A price delivered and not acked (held by a worker that stopped, or given back) is judged
/// before any later price: the durable hands out one at a time. Here the test holds a
/// take-profit price while a stop-loss price is recorded after it; the worker gets nothing
/// until the held price comes back to it, and sells at the take profit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_held_elsewhere_is_judged_before_the_later_ones() {
    use async_nats::jetstream::AckKind;
    use futures::StreamExt;

    let mut env = TestEnv::with_all_workers().await;
    let exits = json!({"stop_loss_pct": "0.05", "take_profit_pct": "0.2"});
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &["BTC-USDT"], exits),
    )
    .await;
    portfolio(&env, "p1", "s1").await;
    let opened = env.bought("p1", "s1", "BTC-USDT", "1", "100").await;
    let js = async_nats::jetstream::new(env.client.clone());
    let stream = js.get_stream(env.subjects.stream_name()).await.unwrap();
    let cfg =
        ch_readmodel::exits::consumer_config(env.subjects.prefix(), ch_readmodel::exits::DURABLE)
            .unwrap();
    let durable = stream.create_consumer(cfg).await.expect("the durable");
    prices(&env, "BTC-USDT", &["130"]).await;
    let mut fetched = durable
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("a fetch");
    let held = fetched.next().await.expect("the price").expect("delivered");
    prices(&env, "BTC-USDT", &["90"]).await;
    env.start(Worker::ExitTriggers).await;
    // The worker asks for prices; with one held, the durable gives it none.
    eventually(|| async {
        let info = stream
            .consumer_info(ch_readmodel::exits::DURABLE)
            .await
            .map_err(|e| e.to_string())?;
        (info.num_waiting >= 1)
            .then_some(())
            .ok_or(format!("the worker is not waiting: {info:?}"))
    })
    .await;
    held.ack_with(AckKind::Nak(None)).await.unwrap();
    let perf = wait_performance(&env, "p1", |p| p["fill_count"] == 2).await;
    assert_eq!(perf["positions"], json!([]), "{perf}");
    let sold = sells(&env, "p1").await;
    assert_eq!(sold.len(), 1, "{sold:?}");
    assert_eq!(sold[0].2, "130", "{sold:?}");
    assert_eq!(
        sold[0].3,
        exit_command_id(
            "p1",
            "BTC-USDT",
            single(opened),
            ExitKind::TakeProfit,
            ("s1", 1)
        )
        .to_string()
    );
}

/// Each position's last fill, which the exit triggers read for every price, is the projector's
/// from its fills; a schema upgraded to it learns it from the trades, and a projector of the
/// release before, which would leave it behind, has its position writes refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_know_their_last_fill_and_an_upgrade_fills_it_in() {
    let env = TestEnv::with_all_workers().await;
    env.cmd(
        "strategy.create",
        strategy_with_exits("s1", &["BTC-USDT", "ETH-USDT"], json!({})),
    )
    .await;
    portfolio(&env, "p1", "s1").await;
    env.bought("p1", "s1", "BTC-USDT", "0.1", "20000").await;
    env.bought("p1", "s1", "ETH-USDT", "1", "2000").await;
    let last_btc = env.bought("p1", "s1", "BTC-USDT", "0.1", "21000").await;
    let last_eth = env.bought("p1", "s1", "ETH-USDT", "1", "2100").await;
    env.performance_at("p1", last_eth).await;
    let last_fills = || async {
        env.pg
            .query(
                "SELECT symbol, last_fill_seq FROM positions WHERE portfolio_id = 'p1'
                 ORDER BY symbol",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect::<Vec<_>>()
    };
    let want = vec![
        ("BTC-USDT".to_owned(), last_btc),
        ("ETH-USDT".to_owned(), last_eth),
    ];
    assert_eq!(last_fills().await, want);

    // The schema as before migration 12, migrated again.
    env.pg
        .batch_execute(
            "ALTER TABLE positions DROP COLUMN last_fill_seq;
             DELETE FROM ch_migrations WHERE version = 12",
        )
        .await
        .unwrap();
    ch_runtime::pg::migrate(
        &env.cfg.database_url,
        &env.cfg.db_schema,
        ch_readmodel::MIGRATIONS,
    )
    .await
    .unwrap();
    assert_eq!(last_fills().await, want);
    // The release before's upsert of a position, for a row there and for a new one.
    for symbol in ["BTC-USDT", "SOL-USDT"] {
        let refused = env
            .pg
            .execute(
                "INSERT INTO positions (portfolio_id, symbol, quantity, cost_basis, gross_entry)
                 VALUES ('p1', $1, 1, 1, 1)
                 ON CONFLICT (portfolio_id, symbol) DO UPDATE SET quantity = EXCLUDED.quantity",
                &[&symbol],
            )
            .await
            .expect_err("an old release's position write");
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION),
            "{refused}"
        );
    }
}

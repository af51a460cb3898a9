//! DOMAIN.md's worked example E1, end to end through NATS: commands to the command workers,
//! events on JetStream, the portfolio projector in Postgres, answers from the query worker.

use ch_e2e::fixtures::{price, signal, strategy};
use ch_e2e::TestEnv;
use rust_decimal::Decimal;
use serde_json::Value;

fn seq(v: &Value) -> u64 {
    v["stream_seq"].as_u64().expect("stream_seq")
}

/// DOMAIN.md's invariant: equity - net_deposits = realized_pnl + unrealized_pnl.
fn holds_the_invariant(perf: &Value) {
    let d = |k: &str| -> Decimal { perf[k].as_str().expect(k).parse().expect(k) };
    assert_eq!(
        d("equity") - d("net_deposits"),
        d("realized_pnl") + d("unrealized_pnl"),
        "{perf}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e1_average_cost_through_the_whole_loop() {
    let env = TestEnv::with_all_workers().await;
    env.cmd("strategy.create", strategy("u1", "s1", &["BTC-USDT"]))
        .await;
    env.funded("p1", "u1", "25000", "s1").await;

    let buy1 = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "buy", "0.5", "20000", None),
        )
        .await;
    assert_eq!(buy1["status"], "executed", "{buy1}");
    assert_eq!(buy1["trade"]["fee"], "10");
    assert_eq!(buy1["trade"]["cash_after"], "14990");
    assert_eq!(buy1["trade"]["position_after"], "0.5");

    let buy2 = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "buy", "0.5", "22000", None),
        )
        .await;
    assert_eq!(buy2["trade"]["fee"], "11");
    assert_eq!(buy2["trade"]["cash_after"], "3979");

    // Marked at 23000 after the second buy: unrealized 1979, equity 26979.
    let mark = env.cmd("market.price", price("BTC-USDT", "23000")).await;
    let perf = env.performance_at("p1", seq(&mark)).await;
    assert_eq!(perf["cash"], "3979");
    assert_eq!(perf["unrealized_pnl"], "1979");
    assert_eq!(perf["equity"], "26979");
    assert_eq!(perf["positions"][0]["quantity"], "1");
    assert_eq!(perf["positions"][0]["avg_cost"], "21021");
    assert_eq!(perf["positions"][0]["mark_price"], "23000");
    assert!(perf["as_of_seq"].as_u64().unwrap() >= seq(&mark));
    holds_the_invariant(&perf);

    let sell1 = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "sell", "0.4", "25000", Some("8")),
        )
        .await;
    assert_eq!(sell1["trade"]["realized_pnl"], "1583.6");
    assert_eq!(sell1["trade"]["cash_after"], "13971");
    assert_eq!(sell1["trade"]["position_after"], "0.6");

    // Marked at 25000 after the first sell: unrealized 2387.4, equity 28971.
    let mark = env.cmd("market.price", price("BTC-USDT", "25000")).await;
    let perf = env.performance_at("p1", seq(&mark)).await;
    assert_eq!(perf["unrealized_pnl"], "2387.4");
    assert_eq!(perf["equity"], "28971");
    assert_eq!(perf["positions"][0]["cost_basis"], "12612.6");
    holds_the_invariant(&perf);

    let sell2 = env
        .cmd(
            "signal.execute",
            signal("p1", "s1", "sell", "0.6", "19000", None),
        )
        .await;
    assert_eq!(sell2["trade"]["fee"], "11.4");
    assert_eq!(sell2["trade"]["realized_pnl"], "-1224");
    assert_eq!(sell2["trade"]["cash_after"], "25359.6");
    assert_eq!(sell2["trade"]["position_after"], "0");

    let perf = env.performance_at("p1", seq(&sell2)).await;
    assert_eq!(perf["cash"], "25359.6");
    assert_eq!(perf["realized_pnl"], "359.6");
    assert_eq!(perf["unrealized_pnl"], "0");
    assert_eq!(perf["equity"], "25359.6");
    assert_eq!(perf["net_deposits"], "25000");
    assert_eq!(perf["fees_paid"], "40.4");
    assert_eq!(perf["positions"], serde_json::json!([]));
    assert_eq!(perf["trade_count"], 1, "one closed round trip");
    assert_eq!(perf["fill_count"], 4);
    assert_eq!(perf["win_rate"], "1");
    assert_eq!(perf["total_return"], "0.014384");
    assert_eq!(perf["version"], 7);
    assert_eq!(perf["status"], "open");
    assert_eq!(perf["attached_strategies"], serde_json::json!(["s1"]));
    holds_the_invariant(&perf);
}

//! A signal worker caches the strategies and marks it checks signals against; a change to
//! either must be seen by the very next signal (API.md: checks use the current state).

use ch_e2e::fixtures::{price, signal, strategy, strategy_with};
use ch_e2e::TestEnv;
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

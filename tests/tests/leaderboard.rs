//! `ch.query.strategy.leaderboard`: a user's strategies ranked by the realized PnL of their own
//! trades or by the win rate of the round trips their signals closed.

use ch_e2e::fixtures::{attach, deposit, open, signal, strategy, strategy_ids};
use ch_e2e::TestEnv;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_ranked_by_realized_pnl_and_win_rate() {
    let env = TestEnv::with_all_workers().await;
    for s in ["alpha", "beta", "gamma"] {
        env.cmd("strategy.create", strategy("u1", s, &["BTC-USDT"]))
            .await;
    }
    env.cmd(
        "strategy.create",
        strategy("other", "theirs", &["BTC-USDT"]),
    )
    .await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    env.cmd("portfolio.update", deposit("p1", "100000")).await;
    for s in ["alpha", "beta", "gamma"] {
        env.cmd("portfolio.update", attach("p1", s)).await;
    }
    // alpha: one round trip +98 and one -102 (realized -4, win rate 0.5)
    let fee = Some("1");
    env.cmd(
        "signal.execute",
        signal("p1", "alpha", "buy", "1", "1000", fee),
    )
    .await;
    env.cmd(
        "signal.execute",
        signal("p1", "alpha", "sell", "1", "1100", fee),
    )
    .await;
    env.cmd(
        "signal.execute",
        signal("p1", "alpha", "buy", "1", "1000", fee),
    )
    .await;
    env.cmd(
        "signal.execute",
        signal("p1", "alpha", "sell", "1", "900", fee),
    )
    .await;
    // beta buys, gamma sells the same position: gamma closes a +48 round trip (win rate 1).
    env.cmd(
        "signal.execute",
        signal("p1", "beta", "buy", "1", "1000", fee),
    )
    .await;
    let last = env
        .cmd(
            "signal.execute",
            signal("p1", "gamma", "sell", "1", "1050", fee),
        )
        .await;
    let seq = last["stream_seq"].as_u64().unwrap();

    let board = env
        .query_at("strategy.leaderboard", json!({"user_id": "u1"}), seq)
        .await;
    let ids = strategy_ids(&board);
    assert_eq!(ids, ["gamma", "beta", "alpha"], "{board}");
    let row = |b: &Value, id: &str| {
        b["strategies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["strategy_id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(row(&board, "gamma")["realized_pnl"], "48");
    assert_eq!(row(&board, "alpha")["realized_pnl"], "-4");
    assert_eq!(row(&board, "alpha")["trade_count"], 2);
    assert_eq!(row(&board, "alpha")["win_rate"], "0.5");
    assert_eq!(row(&board, "beta")["fill_count"], 1);
    assert_eq!(row(&board, "beta")["win_rate"], Value::Null);
    assert_eq!(board["strategies"][0]["rank"], 1);
    assert!(board["as_of_seq"].as_u64().unwrap() >= seq);

    let by_win = env
        .query_at(
            "strategy.leaderboard",
            json!({"user_id": "u1", "by": "win_rate", "limit": 2}),
            seq,
        )
        .await;
    let ids = strategy_ids(&by_win);
    assert_eq!(ids, ["gamma", "alpha"], "{by_win}");

    env.request(
        "query.strategy.leaderboard",
        json!({"user_id": "u1", "by": "luck"}),
    )
    .await
    .err(400, "bad_request");
}

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
    let r = env
        .request(
            "query.strategy.leaderboard",
            json!({"user_id": "u1", "by": {"win_rate": null}}),
        )
        .await
        .err(400, "bad_request");
    assert_eq!(
        r["error"]["message"], "by: invalid type: map, expected a string",
        "{r}"
    );
}

/// A deleted strategy leaves the board unless `include_deleted`; a board holds 50 rows unless
/// `limit` says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_strategies_and_the_default_limit() {
    let env = TestEnv::with_all_workers().await;
    // 52, one deleted: 51 live, one more than a default board holds.
    for i in 0..52 {
        env.cmd(
            "strategy.create",
            strategy("u1", &format!("s{i:02}"), &["BTC-USDT"]),
        )
        .await;
    }
    let deleted = env
        .cmd("strategy.delete", json!({"strategy_id": "s07"}))
        .await;
    let seq = deleted["stream_seq"].as_u64().unwrap();

    let board = |q: Value| {
        let env = &env;
        async move { env.query_at("strategy.leaderboard", q, seq).await }
    };
    let default = board(json!({"user_id": "u1"})).await;
    let ids = strategy_ids(&default);
    assert_eq!(ids.len(), 50, "{default}");
    assert!(!ids.contains(&"s07"), "{default}");
    let all = board(json!({"user_id": "u1", "include_deleted": true, "limit": 500})).await;
    let rows = all["strategies"].as_array().unwrap();
    assert_eq!(rows.len(), 52, "{all}");
    let s07 = rows.iter().find(|r| r["strategy_id"] == "s07").unwrap();
    assert_eq!(s07["status"], "deleted", "{all}");
    let live = board(json!({"user_id": "u1", "limit": 500})).await;
    assert_eq!(strategy_ids(&live).len(), 51, "{live}");
    assert!(!strategy_ids(&live).contains(&"s07"), "{live}");
}

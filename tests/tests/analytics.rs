//! `ch.query.portfolio.analysis` on a week imported with business times (`at`), a deposit
//! mid-week and a late (backfilled) price, checked against figures computed here
//! independently; then the read model is rebuilt from the stream and must answer the same.

use ch_e2e::fixtures::strategy;
use ch_e2e::TestEnv;
use ch_readmodel::workers::projector;
use ch_readmodel::PortfolioProjection;
use ch_runtime::app::App;
use serde_json::{json, Value};

const DAY0: i64 = 1_767_571_200; // 2026-01-05T00:00:00Z, a Monday

fn at(day: i64, hour: i64, min: i64) -> String {
    chrono::DateTime::from_timestamp(DAY0 + day * 86_400 + hour * 3_600 + min * 60, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn secs(day: i64, hour: i64, min: i64) -> i64 {
    DAY0 + day * 86_400 + hour * 3_600 + min * 60
}

/// The independent model: prices, and the portfolio's cash/quantity timeline.
struct Model {
    prices: Vec<(i64, f64)>,
    /// (time, cash after, quantity after, gross entry after, flow)
    states: Vec<(i64, f64, f64, f64, f64)>,
}

impl Model {
    fn price_at(&self, t: i64) -> Option<f64> {
        self.prices
            .iter()
            .filter(|(pt, _)| *pt <= t)
            .max_by_key(|(pt, _)| *pt)
            .map(|p| p.1)
    }
    fn equity_with(&self, s: Option<&(i64, f64, f64, f64, f64)>, t: i64) -> f64 {
        match s {
            None => 0.0,
            Some(&(_, cash, qty, gross, _)) => {
                cash + if qty == 0.0 {
                    0.0
                } else {
                    self.price_at(t).map_or(gross, |p| qty * p)
                }
            }
        }
    }
    fn equity(&self, t: i64, strict: bool) -> f64 {
        let s = self
            .states
            .iter()
            .rfind(|s| if strict { s.0 < t } else { s.0 <= t });
        self.equity_with(s, t)
    }
    /// The period's start: how many states it takes in (those before `from`, then the flows at
    /// `from` before anything else there), and its equity.
    fn start(&self, from: i64) -> (usize, f64) {
        let before = self.states.iter().take_while(|s| s.0 < from).count();
        let start = before
            + self.states[before..]
                .iter()
                .take_while(|s| s.0 == from && s.4 != 0.0)
                .count();
        let state = start.checked_sub(1).map(|i| &self.states[i]);
        (start, self.equity_with(state, from))
    }
    /// The equity of the curve's point `i` at `t`: the start's, then the state before `t`.
    fn point(&self, i: usize, from: i64, t: i64) -> f64 {
        if i == 0 {
            self.start(from).1
        } else {
            self.equity(t, true)
        }
    }
    /// NAV at each daily boundary from `from` to `to`, chained time-weighted over flows.
    fn navs(&self, from: i64, to: i64) -> Vec<f64> {
        let mut times: Vec<i64> = (0..)
            .map(|d| from + d * 86_400)
            .take_while(|t| *t < to)
            .collect();
        times.push(to);
        let mut nav_at_flow = 1.0;
        let (start, mut e_after) = self.start(from);
        let mut out = vec![1.0];
        let mut flows = self
            .states
            .iter()
            .enumerate()
            .skip(start)
            .filter(|(_, s)| s.4 != 0.0)
            .peekable();
        for &t in times.iter().skip(1) {
            // What happens at a boundary belongs to the interval it starts.
            while let Some((k, s)) = flows.peek() {
                if s.0 < t {
                    let before = self.equity_with(k.checked_sub(1).map(|j| &self.states[j]), s.0);
                    nav_at_flow *= before / e_after;
                    e_after = before + s.4;
                    flows.next();
                } else {
                    break;
                }
            }
            out.push(nav_at_flow * self.equity(t, true) / e_after);
        }
        out
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        "{what}: got {a}, expected {b}"
    );
}

async fn import_week(env: &TestEnv) -> (Model, u64) {
    let mut s = strategy("u1", "s1", &["BTC-USDT"]);
    s["at"] = json!(at(-1, 0, 0));
    env.cmd("strategy.create", s).await;
    let pf = |op: Value| {
        let mut op = op;
        op["portfolio_id"] = json!("p1");
        op
    };
    env.cmd("portfolio.update", pf(json!({"op": "open", "user_id": "u1", "name": "week", "quote_currency": "USDT", "at": at(0, 0, 0)}))).await;
    env.cmd(
        "portfolio.update",
        pf(json!({"op": "deposit", "amount": "10000", "at": at(0, 0, 0)})),
    )
    .await;
    env.cmd(
        "portfolio.update",
        pf(json!({"op": "attach_strategy", "strategy_id": "s1", "at": at(0, 0, 1)})),
    )
    .await;
    let prices = [20000, 21000, 20500, 22000, 21500, 23000, 22500];
    let mut model = Model {
        prices: vec![],
        states: vec![(secs(0, 0, 0), 10000.0, 0.0, 0.0, 10000.0)],
    };
    for (d, p) in prices.iter().enumerate() {
        let d = d as i64;
        env.cmd(
            "market.price",
            json!({"symbol": "BTC-USDT", "price": p.to_string(), "at": at(d, 12, 0)}),
        )
        .await;
        model.prices.push((secs(d, 12, 0), *p as f64));
    }
    let trade = |side: &str, qty: &str, price: &str, fee: &str, when: String| {
        json!({"portfolio_id": "p1", "strategy_id": "s1", "symbol": "BTC-USDT", "side": side,
               "quantity": qty, "price": price, "fee": fee, "at": when})
    };
    let r = env
        .cmd(
            "signal.execute",
            trade("buy", "0.2", "20000", "4", at(0, 12, 30)),
        )
        .await;
    assert_eq!(r["status"], "executed", "{r}");
    model
        .states
        .push((secs(0, 12, 30), 10000.0 - 4004.0, 0.2, 4000.0, 0.0));
    env.cmd(
        "portfolio.update",
        pf(json!({"op": "deposit", "amount": "5000", "at": at(2, 10, 0)})),
    )
    .await;
    model
        .states
        .push((secs(2, 10, 0), 5996.0 + 5000.0, 0.2, 4000.0, 5000.0));
    let r = env
        .cmd(
            "signal.execute",
            trade("sell", "0.1", "22000", "2.2", at(3, 12, 30)),
        )
        .await;
    assert_eq!(r["trade"]["realized_pnl"], "195.8", "{r}"); // 2200 - 2.2 - 2002
    model
        .states
        .push((secs(3, 12, 30), 10996.0 + 2197.8, 0.1, 2000.0, 0.0));
    let r = env
        .cmd(
            "signal.execute",
            trade("buy", "0.1", "21500", "2.15", at(4, 13, 0)),
        )
        .await;
    model
        .states
        .push((secs(4, 13, 0), 13193.8 - 2152.15, 0.2, 4150.0, 0.0));
    let last = r["stream_seq"].as_u64().unwrap();
    // A backfilled price, recorded last but dated mid-week: the curve must use it.
    let late = env
        .cmd(
            "market.price",
            json!({"symbol": "BTC-USDT", "price": "19000", "at": at(4, 18, 0)}),
        )
        .await;
    model.prices.push((secs(4, 18, 0), 19000.0));
    (model, last.max(late["stream_seq"].as_u64().unwrap()))
}

fn stats(navs: &[f64]) -> (f64, f64, f64, f64) {
    let r: Vec<f64> = navs.windows(2).map(|w| w[1] / w[0] - 1.0).collect();
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    let std = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let mut peak: f64 = 1.0;
    let mut mdd: f64 = 0.0;
    for &v in navs {
        peak = peak.max(v);
        mdd = mdd.min(v / peak - 1.0);
    }
    (mean, std, mean / std * 365f64.sqrt(), mdd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_week_with_a_mid_week_deposit_and_a_late_price() {
    let env = TestEnv::with_all_workers().await;
    let (model, seq) = import_week(&env).await;
    let q = json!({"portfolio_id": "p1", "from": at(0, 0, 0), "to": at(7, 0, 0), "interval": "1d"});
    let reply = env.query_at("portfolio.analysis", q.clone(), seq).await;

    let navs = model.navs(secs(0, 0, 0), secs(7, 0, 0));
    let curve = reply["equity_curve"].as_array().unwrap();
    assert_eq!(curve.len(), 8, "{reply}");
    for (i, p) in curve.iter().enumerate() {
        assert_eq!(p["t"], json!(at(i as i64, 0, 0).replace("+00:00", "Z")));
        close(p["nav"].as_f64().unwrap(), navs[i], &format!("nav[{i}]"));
        let equity: f64 = p["equity"].as_str().unwrap().parse().unwrap();
        let t = secs(i as i64, 0, 0);
        close(
            equity,
            model.point(i, secs(0, 0, 0), t),
            &format!("equity[{i}]"),
        );
    }
    // Day 5 00:00 values 0.2 BTC at the backfilled 19000, not at 21500.
    assert_eq!(curve[5]["equity"], "14841.65");

    let m = &reply["metrics"];
    let (_, std, sharpe, mdd) = stats(&navs);
    close(
        m["total_return"].as_f64().unwrap(),
        navs[7] - 1.0,
        "total_return",
    );
    close(
        m["volatility"].as_f64().unwrap(),
        std * 365f64.sqrt(),
        "volatility",
    );
    close(m["sharpe"].as_f64().unwrap(), sharpe, "sharpe");
    // A risk-free rate, annual, taken daily as (1 + rf)^(1/365) - 1 (DOMAIN.md): the excess
    // returns' deviation is the returns', their mean lower by the daily rate.
    let mut with_rf = q.clone();
    with_rf["risk_free_rate"] = json!("0.05");
    let rf_reply = env.query_at("portfolio.analysis", with_rf, seq).await;
    let (mean, _, _, _) = stats(&navs);
    let daily = 1.05f64.powf(1.0 / 365.0) - 1.0;
    close(
        rf_reply["metrics"]["sharpe"].as_f64().unwrap(),
        (mean - daily) / std * 365f64.sqrt(),
        "sharpe at a risk-free rate of 5 %",
    );
    close(m["max_drawdown"].as_f64().unwrap(), mdd, "max_drawdown");
    close(
        m["cagr"].as_f64().unwrap(),
        navs[7].powf(365.0 / 7.0) - 1.0,
        "cagr",
    );
    assert_eq!(m["realized_pnl"], "195.8");
    assert_eq!(m["fees_paid"], "8.35");
    assert_eq!(m["fill_count"], 3);
    assert_eq!(m["trade_count"], 0, "no round trip closed");
    assert_eq!(m["win_rate"], Value::Null);
    assert_eq!(m["profit_factor"], Value::Null);
    close(m["exposure"].as_f64().unwrap(), 1.0, "exposure");

    // From within the week: the state at `from` comes from the last deposit before it and the
    // fills after that deposit (day 1: a buy after the first deposit; day 4: a sell after the
    // mid-week deposit, which carries the position bought on day 0).
    for day in [1, 4] {
        let q = json!({"portfolio_id": "p1", "from": at(day, 0, 0), "to": at(7, 0, 0),
                       "interval": "1d"});
        let reply = env.query_at("portfolio.analysis", q, seq).await;
        let navs = model.navs(secs(day, 0, 0), secs(7, 0, 0));
        let curve = reply["equity_curve"].as_array().unwrap();
        assert_eq!(curve.len(), navs.len(), "{reply}");
        for (i, p) in curve.iter().enumerate() {
            let t = day + i as i64;
            let what = format!("from day {day}: point {i}");
            close(p["nav"].as_f64().unwrap(), navs[i], &what);
            let equity: f64 = p["equity"].as_str().unwrap().parse().unwrap();
            close(
                equity,
                model.point(i, secs(day, 0, 0), secs(t, 0, 0)),
                &what,
            );
        }
    }

    // A `from` before the first deposit is the first deposit: no NAV exists before it.
    let early = json!({"portfolio_id": "p1", "from": at(-1, 0, 0), "to": at(7, 0, 0),
                       "interval": "1d"});
    let clamped = env.query_at("portfolio.analysis", early, seq).await;
    assert_eq!(clamped["from"], reply["from"], "{clamped}");
    assert_eq!(clamped["equity_curve"], reply["equity_curve"]);
    assert_eq!(clamped["metrics"], reply["metrics"]);

    // Hourly: 7 days of 24 points after the one at `from`; at each midnight the same NAV and
    // equity as the daily curve's.
    let hourly = json!({"portfolio_id": "p1", "from": at(0, 0, 0), "to": at(7, 0, 0),
                        "interval": "1h"});
    let hourly = env.query_at("portfolio.analysis", hourly, seq).await;
    let hours = hourly["equity_curve"].as_array().unwrap();
    assert_eq!(hours.len(), 7 * 24 + 1, "{hourly}");
    for (day, daily) in curve.iter().enumerate() {
        let h = &hours[day * 24];
        assert_eq!(h["t"], daily["t"], "day {day}");
        assert_eq!(h["equity"], daily["equity"], "day {day}");
        close(
            h["nav"].as_f64().unwrap(),
            daily["nav"].as_f64().unwrap(),
            &format!("hourly nav at day {day}"),
        );
    }
    // Between midnights too: 13:00 on day 0, after the buy of 12:30, as the model values it.
    let t = at(0, 13, 0).replace("+00:00", "Z");
    let h13 = hours.iter().find(|p| p["t"] == json!(t)).expect("13:00");
    close(
        h13["equity"].as_str().unwrap().parse().unwrap(),
        model.equity(secs(0, 13, 0), true),
        "equity at 13:00",
    );

    // Drop the read model and rebuild it from the stream: the same answer.
    let app = App::start(env.app_config(), "test-rebuild").await.unwrap();
    let p = projector(&app, PortfolioProjection::default()).unwrap();
    p.reset().await.unwrap();
    let head = env.last_seq().await;
    let mut rebuilt = env.query_at("portfolio.analysis", q.clone(), head).await;
    let mut before = reply.clone();
    rebuilt["as_of_seq"] = Value::Null;
    before["as_of_seq"] = Value::Null;
    assert_eq!(rebuilt, before);
}

/// The period is [from, to) and each interval [t(i-1), t(i)): a fill at `from` is the
/// period's (its fee a loss, as `performance` and `fees_paid` count it), and a fill or a flow
/// at an inner boundary is the interval's that the boundary starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_happens_at_a_boundary_belongs_to_the_interval_it_starts() {
    let env = TestEnv::with_all_workers().await;
    let mut s = strategy("u1", "s1", &["BTC-USDT"]);
    s["at"] = json!(at(-1, 0, 0));
    env.cmd("strategy.create", s).await;
    let p2 = |op: Value| {
        let mut op = op;
        op["portfolio_id"] = json!("p2");
        op
    };
    env.cmd(
        "market.price",
        json!({"symbol": "BTC-USDT", "price": "1000", "at": at(0, 0, 0)}),
    )
    .await;
    for op in [
        json!({"op": "open", "user_id": "u1", "name": "edges", "quote_currency": "USDT", "at": at(0, 0, 0)}),
        json!({"op": "deposit", "amount": "10000", "at": at(0, 0, 0)}),
        json!({"op": "attach_strategy", "strategy_id": "s1", "at": at(0, 0, 0)}),
    ] {
        env.cmd("portfolio.update", p2(op)).await;
    }
    let trade = |side: &str, price: &str, fee: &str, when: String| {
        json!({"portfolio_id": "p2", "strategy_id": "s1", "symbol": "BTC-USDT", "side": side,
               "quantity": "5", "price": price, "fee": fee, "at": when})
    };
    // At the period's start: bought at 1000 plus a fee of 5, valued at 1000.
    let r = env
        .cmd("signal.execute", trade("buy", "1000", "5", at(0, 0, 0)))
        .await;
    assert_eq!(r["status"], "executed", "{r}");
    // At day 1's boundary: sold at 1100 (no price recorded but 1000), then 1000 deposited.
    let r = env
        .cmd("signal.execute", trade("sell", "1100", "5.5", at(1, 0, 0)))
        .await;
    assert_eq!(r["trade"]["cash_after"], "10489.5", "{r}");
    let r = env
        .cmd(
            "portfolio.update",
            p2(json!({"op": "deposit", "amount": "1000", "at": at(1, 0, 0)})),
        )
        .await;
    let seq = r["stream_seq"].as_u64().unwrap();

    // Default `from`, the first deposit: the start is the deposit; the buy's fee is the first
    // day's loss, the sell's gain the second's; the deposit at day 1 is no return.
    let q = json!({"portfolio_id": "p2", "to": at(2, 0, 0), "interval": "1d"});
    let reply = env.query_at("portfolio.analysis", q, seq).await;
    let curve = reply["equity_curve"].as_array().unwrap();
    let equities: Vec<&str> = curve
        .iter()
        .map(|p| p["equity"].as_str().unwrap())
        .collect();
    assert_eq!(equities, ["10000", "9995", "11489.5"], "{reply}");
    let navs: Vec<f64> = curve.iter().map(|p| p["nav"].as_f64().unwrap()).collect();
    close(navs[1], 0.9995, "nav at day 1");
    close(navs[2], 10489.5 / 10000.0, "nav at day 2");
    let m = &reply["metrics"];
    close(m["total_return"].as_f64().unwrap(), 0.04895, "total_return");
    assert_eq!(
        (&m["fees_paid"], &m["fill_count"]),
        (&json!("10.5"), &json!(2))
    );
    // Held from the start of day 0, flat from the start of day 1.
    close(m["exposure"].as_f64().unwrap(), 0.5, "exposure");
    // `performance` says the same of the whole: 489.5 on 11,000 deposited would be the money
    // return; the time-weighted one is the analysis', and both count the two fees.
    let perf = env
        .query_at("portfolio.performance", json!({"portfolio_id": "p2"}), seq)
        .await;
    assert_eq!(perf["fees_paid"], "10.5", "{perf}");
    assert_eq!(perf["equity"], "11489.5", "{perf}");

    // From day 1 00:00 itself: the start is the state before it (the position at 1000); the
    // sell and the deposit at that instant are the period's.
    let q = json!({"portfolio_id": "p2", "from": at(1, 0, 0), "to": at(3, 0, 0), "interval": "1d"});
    let reply = env.query_at("portfolio.analysis", q, seq).await;
    let curve = reply["equity_curve"].as_array().unwrap();
    assert_eq!(curve[0]["equity"], "9995", "{reply}");
    let m = &reply["metrics"];
    close(
        m["total_return"].as_f64().unwrap(),
        10489.5 / 9995.0 - 1.0,
        "total_return from day 1",
    );
    assert_eq!(
        (&m["fees_paid"], &m["fill_count"]),
        (&json!("5.5"), &json!(1))
    );
    assert_eq!(m["realized_pnl"], "489.5");

    // Bounds finer than the microsecond, as stored times are not: the period is [from, to)
    // all the same (rounded up, the bounds keep every stored time on its side), for the curve
    // and the totals alike. Half a microsecond after day 1 00:00, the sell and the deposit
    // there are before `from`, and before `to`. (The curve compared the finer time, the
    // totals' SQL a cut one: the sell was before the period for one and in it for the other.)
    let finer = |t: String| t.replace('Z', ".0000005Z");
    let q = json!({"portfolio_id": "p2", "from": finer(at(1, 0, 0)), "to": at(3, 0, 0), "interval": "1d"});
    let reply = env.query_at("portfolio.analysis", q, seq).await;
    assert_eq!(
        reply["from"],
        at(1, 0, 0).replace('Z', ".000001Z"),
        "{reply}"
    );
    assert_eq!(reply["equity_curve"][0]["equity"], "11489.5", "{reply}");
    let m = &reply["metrics"];
    assert_eq!(
        (&m["fees_paid"], &m["fill_count"], &m["realized_pnl"]),
        (&json!("0"), &json!(0), &json!("0")),
        "{reply}"
    );
    let q = json!({"portfolio_id": "p2", "to": finer(at(1, 0, 0)), "interval": "1d"});
    let reply = env.query_at("portfolio.analysis", q, seq).await;
    let curve = reply["equity_curve"].as_array().unwrap();
    assert_eq!(curve.last().unwrap()["equity"], "11489.5", "{reply}");
    let m = &reply["metrics"];
    assert_eq!(
        (&m["fees_paid"], &m["fill_count"], &m["realized_pnl"]),
        (&json!("10.5"), &json!(2), &json!("489.5")),
        "{reply}"
    );
}

/// Opens `pid` at business time `opened` and deposits 100 at `deposited`; the deposit's reply.
async fn funded_at(env: &TestEnv, pid: &str, opened: &str, deposited: &str) -> Value {
    env.cmd(
        "portfolio.update",
        json!({"portfolio_id": pid, "op": "open", "user_id": "u", "name": "n",
               "quote_currency": "USDT", "at": opened}),
    )
    .await;
    env.cmd(
        "portfolio.update",
        json!({"portfolio_id": pid, "op": "deposit", "amount": "100", "at": deposited}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analysis_validates_its_input_and_handles_empty_portfolios() {
    let env = TestEnv::with_all_workers().await;
    env.request("query.portfolio.analysis", json!({"portfolio_id": "nope"}))
        .await
        .err(404, "not_found");
    env.request("query.portfolio.analysis", json!({"portfolio_id": "p.1"}))
        .await
        .err(400, "bad_request");
    env.request(
        "query.portfolio.analysis",
        json!({"portfolio_id": "p1", "interval": "1w"}),
    )
    .await
    .err(400, "bad_request");
    // The interval by its name alone; no second 60 (ordered apart by chrono and Postgres).
    for (q, message) in [
        (
            json!({"portfolio_id": "p1", "interval": {"1h": null}}),
            "interval: invalid type: map, expected a string",
        ),
        (
            json!({"portfolio_id": "p1", "from": "2026-01-01T00:00:60Z"}),
            "from: second 60 (a leap second) is not taken: give the next second's time",
        ),
    ] {
        let r = env
            .request("query.portfolio.analysis", q)
            .await
            .err(400, "bad_request");
        assert_eq!(r["error"]["message"], message, "{r}");
    }
    let opened = env
        .cmd("portfolio.update", json!({"portfolio_id": "p1", "op": "open", "user_id": "u", "name": "n", "quote_currency": "USDT"}))
        .await;
    let r = env
        .query_at(
            "portfolio.analysis",
            json!({"portfolio_id": "p1"}),
            opened["stream_seq"].as_u64().unwrap(),
        )
        .await;
    assert_eq!(r["equity_curve"], json!([]));
    assert_eq!(r["metrics"]["sharpe"], Value::Null);
    // The default `to`, now, in microseconds as every stored time.
    let to = r["to"].as_str().unwrap();
    let places = to
        .trim_end_matches('Z')
        .rsplit_once('.')
        .map_or(0, |(_, f)| f.len());
    assert!(places <= 6, "{to}");
    env.request(
        "query.portfolio.analysis",
        json!({"portfolio_id": "p1", "from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}),
    )
    .await
    .err(400, "bad_request");
    // Without `to` the period ends now: a `from` after it is refused as with an explicit
    // `to` before it.
    let refused = env
        .request(
            "query.portfolio.analysis",
            json!({"portfolio_id": "p1", "from": "2999-01-01T00:00:00Z"}),
        )
        .await
        .err(400, "bad_request");
    let message = refused["error"]["message"].as_str().unwrap();
    assert_eq!(message, "from: must be before to (default: now)");
    // A period of centuries (history imported with an old `at`) is refused by its count of
    // points, before any point is listed (listing 70 million hourly times first took the
    // query worker's memory).
    let funded = funded_at(&env, "p2", "1900-01-01T00:00:00Z", "1900-01-02T00:00:00Z").await;
    let refused = env
        .request(
            "query.portfolio.analysis",
            json!({"portfolio_id": "p2", "interval": "1h",
                   "min_stream_seq": funded["stream_seq"], "timeout_ms": 10000}),
        )
        .await
        .err(400, "bad_request");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("points at interval 1h: at most 20000"),
        "{message}"
    );
    assert!(message.ends_with("narrow from/to or use 1d"), "{message}");
    // Already daily: narrowing is the only way.
    let refused = env
        .request(
            "query.portfolio.analysis",
            json!({"portfolio_id": "p2", "to": "2026-01-01T00:00:00Z"}),
        )
        .await
        .err(400, "bad_request");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.ends_with("points at interval 1d: at most 20000; narrow from/to"),
        "{message}"
    );
}

/// A curve within the count of points whose reply is above the server's max payload (about
/// 70 bytes a point: 19,000 hourly points make some 1.3 MB against 1 MB) is `bad_request`
/// naming its size, not a reply the server refuses and a client left to time out; the same
/// period daily is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_above_the_max_payload_is_bad_request() {
    let env = TestEnv::with_all_workers().await;
    let max = env.client.server_info().max_payload;
    let funded = funded_at(&env, "p1", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z").await;
    // 19,000 hours after the deposit: 792 days and 16 hours (794 daily points: one at `from`,
    // one a day, the partial last).
    let period = |interval: &str| {
        json!({"portfolio_id": "p1", "interval": interval, "to": "2028-03-03T16:00:00Z",
               "min_stream_seq": funded["stream_seq"], "timeout_ms": 10000})
    };
    let refused = env
        .request("query.portfolio.analysis", period("1h"))
        .await
        .err(400, "bad_request");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("the reply would be ")
            && message.contains(&format!("max_payload of {max} bytes")),
        "{message}"
    );
    let daily = env
        .request("query.portfolio.analysis", period("1d"))
        .await
        .ok();
    assert_eq!(daily["equity_curve"].as_array().map(Vec::len), Some(794));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_curve_over_more_prices_than_one_read_takes_is_valued_the_same() {
    let env = TestEnv::with_all_workers().await;
    let (_, seq) = import_week(&env).await;
    let q = json!({"portfolio_id": "p1", "from": at(0, 0, 0), "to": at(7, 0, 0), "interval": "1d"});
    let few = env.query_at("portfolio.analysis", q.clone(), seq).await;
    // 100,000 more prices of BTC-USDT between day 0 12:00 and day 1 10:14, each the price in
    // force then (day 0 12:00's: the next is at day 1 12:00), so no valuation changes; written
    // into the read model directly. With the week's own prices that is more than the analysis
    // reads in one range (100,000, the first of them by time), so it looks each time up
    // instead: a range cut short at its limit and taken for whole would value days 2-7 at day
    // 0's price.
    env.pg
        .execute(
            "WITH day0 AS MATERIALIZED (
                 SELECT price FROM prices WHERE symbol = 'BTC-USDT' AND at = $1)
             INSERT INTO prices (symbol, at, stream_seq, price)
             SELECT 'BTC-USDT', $1::timestamptz + k * interval '800 milliseconds', 0, day0.price
             FROM generate_series(1, 100000) k, day0",
            &[&chrono::DateTime::from_timestamp(secs(0, 12, 0), 0).unwrap()],
        )
        .await
        .expect("prices inserted");
    let in_range: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM prices WHERE symbol = 'BTC-USDT' AND at > $1",
            &[&chrono::DateTime::from_timestamp(secs(0, 0, 0), 0).unwrap()],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(in_range, 100_008);
    let many = env.query_at("portfolio.analysis", q, seq).await;
    assert_eq!(many, few);
}

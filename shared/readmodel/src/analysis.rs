//! `ch.query.portfolio.analysis` and `ch.query.strategy.leaderboard`: DOMAIN.md's performance
//! metrics from the read model, without replaying events.
//!
//! The curve is valued at query time from the cash and positions after each flow
//! (`portfolio_history`) and fill (`trades`, which carry the position after them) and from
//! `prices` (every price), with the latest price at or before each time, so a
//! backfilled price or a replay gives the same answer. The NAV index starts at 1 at `from` (or
//! at the first deposit, if later) and chains external flows time-weighted, each valued just
//! before the flow (`ch_domain::analytics`).

use std::collections::{BTreeMap, BTreeSet};

use ch_domain::analytics::{self, Interval, NavPoint, Observation, Totals};
use ch_domain::portfolio::Position;
use ch_runtime::error::{ApiError, DbError};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::Transaction;

use crate::queries::{
    check_id, check_limit, null_as_default, Consistency, Validate, DEFAULT_LIMIT,
};

/// Most curve points one reply carries (a year of hours is 8,760).
pub const MAX_POINTS: usize = 20_000;

/// A rate given as a JSON number or a decimal string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "expected a number or a decimal string")]
pub enum Rate {
    Number(f64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisQuery {
    pub portfolio_id: String,
    #[serde(default, deserialize_with = "to_the_microsecond")]
    pub from: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "to_the_microsecond")]
    pub to: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "ch_domain::request::by_name_or_default")]
    pub interval: Interval,
    pub risk_free_rate: Option<Rate>,
    pub min_stream_seq: Option<u64>,
    pub timeout_ms: Option<u64>,
}

/// A period's bound in whole microseconds, as every stored time is: compared at a finer
/// precision in the fold, and cut in the SQL parameters, a fill at the bound fell on one side
/// for the curve and on the other for the totals. Rounded up: for a stored time `t`,
/// `t >= from` and `t < to` hold exactly when they hold for the bounds rounded up, so the
/// period is [from, to) as given.
fn to_the_microsecond<'de, D>(d: D) -> Result<Option<DateTime<Utc>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<DateTime<Utc>>::deserialize(d)?.map(|t| {
        let cut = chrono::SubsecRound::trunc_subsecs(t, 6);
        if cut == t {
            t
        } else {
            cut + chrono::TimeDelta::microseconds(1)
        }
    }))
}

impl Consistency for AnalysisQuery {
    fn min_stream_seq(&self) -> Option<u64> {
        self.min_stream_seq
    }
    fn timeout_ms(&self) -> Option<u64> {
        self.timeout_ms
    }
}

/// Sort keys of the leaderboard.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RankBy {
    #[default]
    RealizedPnl,
    WinRate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderboardQuery {
    pub user_id: String,
    #[serde(default, deserialize_with = "ch_domain::request::by_name_or_default")]
    pub by: RankBy,
    pub limit: Option<u32>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub include_deleted: bool,
    pub min_stream_seq: Option<u64>,
    pub timeout_ms: Option<u64>,
}

impl Validate for AnalysisQuery {
    fn validate(&self) -> Result<(), ApiError> {
        check_id("portfolio_id", &self.portfolio_id)?;
        parse_rate(&self.risk_free_rate)?;
        for (field, t) in [("from", &self.from), ("to", &self.to)] {
            if let Some(t) = t {
                ch_domain::request::check_time(field, t).map_err(ApiError::from)?;
            }
        }
        match (self.from, self.to) {
            (Some(f), Some(t)) if f >= t => Err(ApiError::bad_request(
                "from: must be before to (by a microsecond at least: times are kept to it)",
            )),
            // Without `to`, the period ends now.
            (Some(f), None) if f >= Utc::now() => Err(ApiError::bad_request(
                "from: must be before to (default: now)",
            )),
            _ => Ok(()),
        }
    }
    fn aggregate_id(&self) -> Option<&str> {
        Some(&self.portfolio_id)
    }
}

impl Validate for LeaderboardQuery {
    fn validate(&self) -> Result<(), ApiError> {
        check_id("user_id", &self.user_id)?;
        check_limit(self.limit)
    }
}

impl Consistency for LeaderboardQuery {
    fn min_stream_seq(&self) -> Option<u64> {
        self.min_stream_seq
    }
    fn timeout_ms(&self) -> Option<u64> {
        self.timeout_ms
    }
}

/// Cash and positions after one event.
#[derive(Debug, Clone)]
struct State {
    at: DateTime<Utc>,
    cash: Decimal,
    positions: BTreeMap<String, Position>,
    flow: Decimal,
}

/// The portfolio's cash and positions just before `from` (after its last flow or fill before
/// it; none if there is none), then after each flow and fill in [`from`, `to`), in
/// business-time order, then stream order (the same as stream order for one portfolio, whose
/// commands may not go back in business time).
/// Flows carry the cash after them (`portfolio_history`, with the positions), fills the cash
/// and the one position they change (`trades`); the states in between are folded from both.
async fn states(
    tx: &Transaction<'_>,
    portfolio_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<State>, DbError> {
    // Sent together: tokio-postgres pipelines concurrent queries on one connection.
    let until_from: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&portfolio_id, &from];
    let period: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&portfolio_id, &from, &to];
    let (last_flow, last_fills, changes) = futures::try_join!(
        tx.query_opt(
            "SELECT at, stream_seq, cash, positions FROM portfolio_history
             WHERE portfolio_id = $1 AND at < $2 ORDER BY at DESC, stream_seq DESC LIMIT 1",
            &until_from,
        ),
        tx.query(
            "SELECT DISTINCT ON (symbol) at, stream_seq, cash_after, symbol, position_after,
                    cost_basis_after, gross_entry_after
             FROM trades WHERE portfolio_id = $1 AND at < $2
             ORDER BY symbol, at DESC, stream_seq DESC",
            &until_from,
        ),
        tx.query(
            "SELECT at, stream_seq, cash, flow, NULL AS symbol, NULL::numeric AS quantity,
                    NULL::numeric AS cost_basis, NULL::numeric AS gross_entry
             FROM portfolio_history WHERE portfolio_id = $1 AND at >= $2 AND at < $3
             UNION ALL
             SELECT at, stream_seq, cash_after, 0, symbol, position_after, cost_basis_after,
                    gross_entry_after
             FROM trades WHERE portfolio_id = $1 AND at >= $2 AND at < $3
             ORDER BY at, stream_seq",
            &period,
        ),
    )?;

    // The state before `from`: the positions from the last flow, each changed by a later fill
    // of its symbol, and the cash of the latest of them all.
    let mut latest: Option<((DateTime<Utc>, i64), Decimal)> = None;
    let mut later = |key: (DateTime<Utc>, i64), cash: Decimal| {
        if latest.is_none_or(|(k, _)| k < key) {
            latest = Some((key, cash));
        }
    };
    let mut positions = BTreeMap::new();
    let mut flow_key = None;
    if let Some(r) = &last_flow {
        let key = (r.get(0), r.get(1));
        later(key, r.get(2));
        positions = parse_positions(&r.get::<_, Value>(3));
        flow_key = Some(key);
    }
    for r in &last_fills {
        let key: (DateTime<Utc>, i64) = (r.get(0), r.get(1));
        later(key, r.get(2));
        if flow_key.is_none_or(|f| f < key) {
            set_position(&mut positions, r.get(3), r.get(4), r.get(5), r.get(6));
        }
    }
    let mut history = Vec::with_capacity(changes.len() + 1);
    if let Some(((at, _), cash)) = latest {
        history.push(State {
            at,
            cash,
            positions: positions.clone(),
            flow: Decimal::ZERO,
        });
    }
    for r in &changes {
        if let Some(symbol) = r.get::<_, Option<String>>(4) {
            set_position(&mut positions, symbol, r.get(5), r.get(6), r.get(7));
        }
        history.push(State {
            at: r.get(0),
            cash: r.get(2),
            positions: positions.clone(),
            flow: r.get(3),
        });
    }
    Ok(history)
}

/// A fill's position after it: gone when flat.
fn set_position(
    positions: &mut BTreeMap<String, Position>,
    symbol: String,
    quantity: Decimal,
    cost_basis: Decimal,
    gross_entry: Decimal,
) {
    if quantity.is_zero() {
        positions.remove(&symbol);
    } else {
        positions.insert(
            symbol,
            Position {
                quantity,
                cost_basis,
                gross_entry,
            },
        );
    }
}

fn parse_positions(v: &Value) -> BTreeMap<String, Position> {
    let dec = |x: &Value| {
        x.as_str()
            .and_then(|s| s.parse::<Decimal>().ok())
            .unwrap_or_default()
    };
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(sym, p)| {
                    (
                        sym.clone(),
                        Position {
                            quantity: dec(&p["quantity"]),
                            cost_basis: dec(&p["cost_basis"]),
                            gross_entry: dec(&p["gross_entry"]),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Most prices read in one go to value a curve; above it, each time is looked up instead.
const MAX_PRICE_ROWS: i64 = 100_000;

/// Latest prices at or before given times, per symbol.
struct Marks {
    /// Per symbol, prices in (at, stream_seq) order.
    series: BTreeMap<String, Vec<(DateTime<Utc>, Decimal)>>,
    /// Per (symbol, time), when looked up one by one.
    at: BTreeMap<(String, DateTime<Utc>), Decimal>,
}

impl Marks {
    /// Reads what valuing `symbols` at `times` needs: the last price at or before the first
    /// time and every price up to the last time (one range scan), or, when that is more than
    /// [`MAX_PRICE_ROWS`] (say minute prices over a year), one index probe per symbol and time.
    async fn load(
        tx: &Transaction<'_>,
        symbols: &[String],
        times: &[DateTime<Utc>],
    ) -> Result<Marks, DbError> {
        let mut marks = Marks {
            series: BTreeMap::new(),
            at: BTreeMap::new(),
        };
        let (Some(&first), Some(&last)) = (times.iter().min(), times.iter().max()) else {
            return Ok(marks);
        };
        if symbols.is_empty() {
            return Ok(marks);
        }
        let rows = tx
            .query(
                "SELECT s.symbol, p.at, p.stream_seq, p.price
                 FROM unnest($1::text[]) AS s(symbol)
                 JOIN LATERAL (
                     SELECT at, stream_seq, price FROM prices
                     WHERE prices.symbol = s.symbol AND prices.at <= $2
                     ORDER BY at DESC, stream_seq DESC LIMIT 1
                 ) p ON true
                 UNION ALL
                 (SELECT symbol, at, stream_seq, price FROM prices
                  WHERE symbol = ANY($1) AND at > $2 AND at <= $3
                  ORDER BY symbol, at, stream_seq LIMIT $4)",
                &[&symbols, &first, &last, &MAX_PRICE_ROWS],
            )
            .await?;
        // Fewer rows than the range's limit: the range is whole. (At the limit it may have been
        // cut short even when no price precedes the first time, and the lookup added none.)
        if (rows.len() as i64) < MAX_PRICE_ROWS {
            let mut all: Vec<(String, DateTime<Utc>, i64, Decimal)> = rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            all.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
            for (sym, at, _, price) in all {
                marks.series.entry(sym).or_default().push((at, price));
            }
            return Ok(marks);
        }
        let rows = tx
            .query(
                "SELECT s.symbol, v.t, p.price
                 FROM unnest($1::text[]) AS s(symbol)
                 CROSS JOIN unnest($2::timestamptz[]) AS v(t)
                 JOIN LATERAL (
                     SELECT price FROM prices
                     WHERE prices.symbol = s.symbol AND prices.at <= v.t
                     ORDER BY prices.at DESC, prices.stream_seq DESC LIMIT 1
                 ) p ON true",
                &[&symbols, &times],
            )
            .await?;
        for r in rows {
            marks.at.insert(
                (r.get::<_, String>(0), r.get::<_, DateTime<Utc>>(1)),
                r.get(2),
            );
        }
        Ok(marks)
    }

    /// The latest price of `symbol` at or before `t`.
    fn price(&self, symbol: &str, t: DateTime<Utc>) -> Option<Decimal> {
        if let Some(series) = self.series.get(symbol) {
            let n = series.partition_point(|(at, _)| *at <= t);
            return n.checked_sub(1).map(|i| series[i].1);
        }
        self.at.get(&(symbol.to_owned(), t)).copied()
    }

    /// Equity of `state` at time `t`: positions at their mark, or at their gross entry when
    /// no price is known at or before `t`. Also returns the unrealized PnL.
    ///
    /// # Errors
    /// `internal` when a value needs more than a Decimal's 28 digits (a mark far beyond any
    /// price, recorded all the same).
    fn value(
        &self,
        state: Option<&State>,
        t: DateTime<Utc>,
    ) -> Result<(Decimal, Decimal), ApiError> {
        let Some(s) = state else {
            return Ok((Decimal::ZERO, Decimal::ZERO));
        };
        let mut equity = Some(s.cash);
        let mut unrealized = Some(Decimal::ZERO);
        for (sym, p) in &s.positions {
            let value = p.value_at(self.price(sym, t).as_ref());
            equity = equity.zip(value).and_then(|(e, v)| e.checked_add(v));
            unrealized = unrealized
                .zip(value.and_then(|v| v.checked_sub(p.cost_basis)))
                .and_then(|(u, v)| u.checked_add(v));
        }
        equity.zip(unrealized).ok_or_else(|| {
            ApiError::internal(format!(
                "the equity at {t} needs more than 28 significant digits at the marks"
            ))
        })
    }
}

/// The state in force at `t`: the last row at or before `t` (`strict`: before `t`).
fn state_at(history: &[State], t: DateTime<Utc>, strict: bool) -> Option<&State> {
    let n = history.partition_point(|s| if strict { s.at < t } else { s.at <= t });
    n.checked_sub(1).map(|i| &history[i])
}

fn parse_rate(r: &Option<Rate>) -> Result<f64, ApiError> {
    let rate = match r {
        None => 0.0,
        Some(Rate::Number(x)) => *x,
        // It is an f64 in the statistics (DOMAIN.md): read as one, to the nearest, exponents
        // and any count of digits taken as a JSON number's are.
        Some(Rate::Text(s)) => s
            .parse::<f64>()
            .map_err(|_| ApiError::bad_request(format!("risk_free_rate: invalid decimal {s:?}")))?,
    };
    if !rate.is_finite() || rate <= -1.0 {
        return Err(ApiError::bad_request(
            "risk_free_rate: must be a number above -1",
        ));
    }
    Ok(rate)
}

/// `ch.query.portfolio.analysis`.
///
/// # Errors
/// `not_found` for an unknown portfolio; `bad_request` for a period longer than a reply
/// carries (the request's own fields were checked as it was parsed).
pub async fn portfolio_analysis(
    tx: &Transaction<'_>,
    q: &AnalysisQuery,
    as_of_seq: u64,
) -> Result<Value, ApiError> {
    let rf = parse_rate(&q.risk_free_rate)?;
    let Some(p) = tx
        .query_opt(
            "SELECT first_deposit_at FROM portfolios WHERE portfolio_id = $1",
            &[&q.portfolio_id],
        )
        .await
        .map_err(DbError::from)?
    else {
        return Err(ApiError::not_found(format!(
            "portfolio {} not found",
            q.portfolio_id
        )));
    };
    let first_deposit: Option<DateTime<Utc>> = p.get(0);
    // Microseconds, as every stored time (the commands' `at` and clock are cut there too).
    let to =
        q.to.unwrap_or_else(|| chrono::SubsecRound::trunc_subsecs(Utc::now(), 6));
    let empty = || {
        json!({
            "portfolio_id": q.portfolio_id,
            "from": q.from, "to": to, "interval": q.interval, "risk_free_rate": rf,
            "metrics": analytics::metrics(&[], &[], &[], &Totals::default(), q.interval,
                                          chrono::TimeDelta::zero(), rf),
            "equity_curve": [],
            "as_of_seq": as_of_seq,
        })
    };
    let Some(first_deposit) = first_deposit else {
        return Ok(empty());
    };
    let from = q.from.map_or(first_deposit, |f| f.max(first_deposit));
    if from >= to {
        return Ok(empty());
    }
    // Counted before they are listed: `to` may be centuries away.
    let points = analytics::boundary_count(from, to, q.interval);
    if points > MAX_POINTS as u64 {
        let or_days = if q.interval == Interval::Day {
            ""
        } else {
            " or use 1d"
        };
        return Err(ApiError::bad_request(format!(
            "the period has {points} points at interval {}: at most {MAX_POINTS}; narrow from/to{or_days}",
            q.interval.as_str()
        )));
    }
    let times = analytics::boundaries(from, to, q.interval);

    // Cash and positions: the last state before `from` and every state in [from, to).
    let history = states(tx, &q.portfolio_id, from, to).await?;
    let symbols: Vec<String> = history
        .iter()
        .flat_map(|s| s.positions.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // The period's intervals are [t(i-1), t(i)): what happens at a boundary belongs to the
    // interval it starts. The start is the state before `from` and the flows at `from` that
    // come before anything else there (the capital the period starts with: the first deposit,
    // by default); a fill at `from` is the period's, like any later one. The flows after the
    // start are chained.
    let before_from = history.partition_point(|s| s.at < from);
    let start = before_from
        + history[before_from..]
            .iter()
            .take_while(|s| s.at == from && !s.flow.is_zero())
            .count();
    let flows: Vec<usize> = (start..history.len())
        .filter(|&i| !history[i].flow.is_zero())
        .collect();
    let mut valuation_times: Vec<DateTime<Utc>> = times.clone();
    valuation_times.extend(flows.iter().map(|&i| history[i].at));
    let marks = Marks::load(tx, &symbols, &valuation_times).await?;

    // Observations in time order: the start as a first "deposit" of its equity; the equity at
    // each later boundary is that of the state before it (at the latest marks at or before it),
    // so a flow at a boundary comes after it.
    let last = times.len() - 1;
    let value_at = |i: usize| {
        let t = times[i];
        marks.value(state_at(&history, t, true), t)
    };
    let (e0, _) = marks.value(start.checked_sub(1).map(|i| &history[i]), from)?;
    let mut obs = vec![
        Observation::Flow {
            t: from,
            equity_before: Decimal::ZERO,
            amount: e0,
        },
        Observation::Equity {
            t: from,
            equity: e0,
        },
    ];
    let mut fi = 0;
    for (i, &t) in times.iter().enumerate().skip(1) {
        while fi < flows.len() && history[flows[fi]].at < t {
            let k = flows[fi];
            let before = k.checked_sub(1).map(|j| &history[j]);
            let (equity_before, _) = marks.value(before, history[k].at)?;
            obs.push(Observation::Flow {
                t: history[k].at,
                equity_before,
                amount: history[k].flow,
            });
            fi += 1;
        }
        let (equity, _) = value_at(i)?;
        obs.push(Observation::Equity { t, equity });
    }
    let points: Vec<NavPoint> = analytics::nav_points(&obs);
    let curve = analytics::equity_curve(&points);
    let navs: Vec<f64> = curve.iter().map(|p| p.nav).collect();

    // A period is exposed when a position was held at its start or at any state within it.
    let exposed: Vec<bool> = (1..times.len())
        .map(|i| {
            let held = |s: Option<&State>| s.is_some_and(|s| !s.positions.is_empty());
            held(state_at(&history, times[i - 1], false))
                || history
                    .iter()
                    .filter(|s| s.at > times[i - 1] && s.at < times[i])
                    .any(|s| !s.positions.is_empty())
        })
        .collect();

    let pnls: Vec<Decimal> = tx
        .query(
            "SELECT pnl FROM round_trips WHERE portfolio_id = $1 AND closed_at >= $2 AND closed_at < $3
             ORDER BY closed_at, opened_seq",
            &[&q.portfolio_id, &from, &to],
        )
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let t = tx
        .query_one(
            "SELECT COALESCE(sum(realized_pnl), 0), COALESCE(sum(fee), 0), count(*)
             FROM trades WHERE portfolio_id = $1 AND at >= $2 AND at < $3",
            &[&q.portfolio_id, &from, &to],
        )
        .await
        .map_err(DbError::from)?;
    let (_, unrealized) = value_at(last)?;
    let totals = Totals {
        realized_pnl: t.get(0),
        fees_paid: t.get(1),
        unrealized_pnl: unrealized,
        fill_count: t.get::<_, i64>(2) as u64,
    };
    let metrics = analytics::metrics(&navs, &exposed, &pnls, &totals, q.interval, to - from, rf);
    Ok(json!({
        "portfolio_id": q.portfolio_id,
        "from": from,
        "to": to,
        "interval": q.interval,
        "risk_free_rate": rf,
        "metrics": metrics,
        "equity_curve": curve,
        "as_of_seq": as_of_seq,
    }))
}

/// `ch.query.strategy.leaderboard`: a user's strategies ranked by the realized PnL of their
/// own trades (or by the win rate of the round trips their signals closed).
///
/// # Errors
/// Database trouble only (the request's fields were checked as it was parsed).
pub async fn strategy_leaderboard(
    tx: &Transaction<'_>,
    q: &LeaderboardQuery,
    as_of_seq: u64,
) -> Result<Value, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    let order = match q.by {
        RankBy::RealizedPnl => "realized_pnl DESC, win_rate DESC NULLS LAST, strategy_id",
        RankBy::WinRate => "win_rate DESC NULLS LAST, realized_pnl DESC, strategy_id",
    };
    // Each of the user's strategies' own fills and closed round trips, by their indexes
    // (migration 009): as long as the user's history, not everyone's.
    let sql = format!(
        "SELECT s.strategy_id, s.name, s.status, t.realized_pnl, t.fees_paid, t.fill_count,
                r.trade_count,
                CASE WHEN r.trade_count > 0 THEN r.wins::numeric / r.trade_count END AS win_rate
         FROM strategies s
         CROSS JOIN LATERAL (
             SELECT COALESCE(sum(realized_pnl), 0) AS realized_pnl,
                    COALESCE(sum(fee), 0) AS fees_paid, count(*) AS fill_count
             FROM trades WHERE strategy_id = s.strategy_id) t
         CROSS JOIN LATERAL (
             SELECT count(*) AS trade_count, count(*) FILTER (WHERE pnl > 0) AS wins
             FROM round_trips WHERE strategy_id = s.strategy_id AND closed_at IS NOT NULL) r
         WHERE s.user_id = $1 AND ($2 OR s.status <> 'deleted')
         ORDER BY {order} LIMIT $3"
    );
    let rows = tx
        .query(&sql, &[&q.user_id, &q.include_deleted, &i64::from(limit)])
        .await
        .map_err(DbError::from)?;
    let ranked: Vec<Value> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let win_rate: Option<Decimal> = r.get("win_rate");
            json!({
                "rank": i + 1,
                "strategy_id": r.get::<_, String>("strategy_id"),
                "name": r.get::<_, String>("name"),
                "status": r.get::<_, String>("status"),
                "realized_pnl": crate::plain(r.get("realized_pnl")),
                "fees_paid": crate::plain(r.get("fees_paid")),
                "fill_count": r.get::<_, i64>("fill_count"),
                "trade_count": r.get::<_, i64>("trade_count"),
                "win_rate": win_rate.map(|w| crate::plain(w.round_dp(10))),
            })
        })
        .collect();
    let by = match q.by {
        RankBy::RealizedPnl => "realized_pnl",
        RankBy::WinRate => "win_rate",
    };
    Ok(json!({"user_id": q.user_id, "by": by, "strategies": ranked, "as_of_seq": as_of_seq}))
}

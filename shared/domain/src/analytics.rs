//! Performance analytics (DOMAIN.md, "Performance metrics"): pure math over stored data, so a
//! read side answers `ch.query.portfolio.analysis` without replaying events.
//!
//! The pipeline, each step usable on its own:
//!
//! 1. [`NavChain`] (or [`nav_points`] over a list of [`Observation`]s) turns equity and external
//!    flows into a time-weighted NAV index: a sub-period return is
//!    `E_before_flow / E_after_previous_flow - 1`, and sub-periods are chained, so deposits and
//!    withdrawals are never counted as return.
//! 2. [`boundaries`] lists the UTC hourly or daily times of the equity curve of a period
//!    (`from` inclusive, `to` exclusive); the caller values equity there (latest marks at or
//!    before each time) and [`equity_curve`] rebases the index to `N_0 = 1` and adds drawdowns.
//! 3. [`metrics`] fills [`Metrics`] (every metric of DOMAIN.md's table, by its name there) from
//!    the NAV series, per-period exposure flags, round-trip PnLs ([`round_trip_stats`]) and
//!    totals.
//!
//! Money stays [`Decimal`] (serialized as plain strings); statistics use `f64` (JSON numbers).
//! Anything undefined is `None` (JSON `null`), never NaN or infinite.

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize, Serializer};

use crate::money::{plain, round8};

/// Relative tolerance under which a NAV counts as back at its peak, and absolute one under which
/// a deviation counts as zero: both absorb `f64` noise (about 1e-16 here), so a flat or
/// constant-growth series gets a drawdown of exactly 0 and a `null` Sharpe rather than garbage.
const EPS: f64 = 1e-12;

// ---------------------------------------------------------------------------------------------
// 1. Time-weighted returns
// ---------------------------------------------------------------------------------------------

/// Incremental time-weighted NAV index of one portfolio.
///
/// State is two numbers, so a read side can store it next to the portfolio and update it on each
/// external flow. The index starts at 1 (before the first deposit there is no capital and it stays
/// 1). At a flow, the sub-period that ends there contributes
/// `equity_before / equity_after_flow` (the equity right after the previous flow); between flows
/// the index is `nav_at_flow * equity_now / equity_after_flow`.
///
/// **No capital.** While `equity_after_flow <= 0` (before the first deposit, or after a
/// withdrawal of everything) a sub-period has no return: the index is carried flat at
/// `nav_at_flow` whatever `equity_now` says, and the next deposit restarts the chain from there.
/// A sub-period that ends with `equity_before == 0` while it started with capital is a real total
/// loss: the index becomes 0 and stays 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NavChain {
    /// The index right after the last flow (1 before any).
    pub nav_at_flow: f64,
    /// Equity right after the last flow (0 before any).
    pub equity_after_flow: Decimal,
}

impl Default for NavChain {
    fn default() -> Self {
        Self::new()
    }
}

impl NavChain {
    /// A chain with no flow yet: index 1, no capital.
    pub fn new() -> Self {
        Self {
            nav_at_flow: 1.0,
            equity_after_flow: Decimal::ZERO,
        }
    }

    /// Records an external flow: `amount` > 0 is a deposit, < 0 a withdrawal, and
    /// `equity_before` the equity valued at the latest marks just before it.
    pub fn flow(&mut self, equity_before: Decimal, amount: Decimal) {
        self.nav_at_flow = self.nav(equity_before);
        self.equity_after_flow = equity_before + amount;
    }

    /// The index for the current equity (valued at the latest marks).
    pub fn nav(&self, equity_now: Decimal) -> f64 {
        if self.equity_after_flow <= Decimal::ZERO {
            return self.nav_at_flow;
        }
        // The ratio in Decimal first: exact for equal equities (a flat index stays exactly flat).
        let growth = equity_now
            .checked_div(self.equity_after_flow)
            .and_then(|g| g.to_f64())
            .unwrap_or_else(|| to_f64(equity_now) / to_f64(self.equity_after_flow));
        self.nav_at_flow * growth
    }
}

/// One fact of a portfolio's chronological history, as a read side stores it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// The equity at `t` (a bucket boundary), after every flow listed before it.
    Equity { t: DateTime<Utc>, equity: Decimal },
    /// An external flow at `t` (deposit > 0, withdrawal < 0) with the equity just before it.
    Flow {
        t: DateTime<Utc>,
        equity_before: Decimal,
        amount: Decimal,
    },
}

/// A valued boundary: equity and the (not yet rebased) NAV index at `t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NavPoint {
    pub t: DateTime<Utc>,
    pub equity: Decimal,
    pub nav: f64,
}

/// Folds a chronological history through a [`NavChain`] started at its beginning: one
/// [`NavPoint`] per [`Observation::Equity`], in order. Facts at the same time are taken in list
/// order: a flow at `t` listed after the equity at `t` belongs to the interval that `t` starts.
pub fn nav_points(observations: &[Observation]) -> Vec<NavPoint> {
    let mut chain = NavChain::new();
    let mut out = Vec::new();
    for o in observations {
        match *o {
            Observation::Flow {
                equity_before,
                amount,
                ..
            } => chain.flow(equity_before, amount),
            Observation::Equity { t, equity } => out.push(NavPoint {
                t,
                equity,
                nav: chain.nav(equity),
            }),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 2. Bucketing
// ---------------------------------------------------------------------------------------------

/// Bucket size of an equity curve; on the wire `"1h"` or `"1d"` (default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Interval {
    /// UTC hours; annualisation factor 365 * 24.
    #[serde(rename = "1h")]
    Hour,
    /// UTC days; annualisation factor 365.
    #[default]
    #[serde(rename = "1d")]
    Day,
}

impl Interval {
    /// The wire name: `"1h"` or `"1d"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Hour => "1h",
            Interval::Day => "1d",
        }
    }

    fn seconds(self) -> i64 {
        match self {
            Interval::Hour => 3_600,
            Interval::Day => 86_400,
        }
    }

    /// Periods per year: 365 for days, 365 * 24 for hours.
    pub fn periods_per_year(self) -> f64 {
        match self {
            Interval::Hour => 365.0 * 24.0,
            Interval::Day => 365.0,
        }
    }

    /// The boundary at or before `t` (UTC midnight, or the start of the UTC hour).
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let step = self.seconds();
        let secs = t.timestamp().div_euclid(step) * step;
        // A boundary is never before chrono's first representable time (itself a boundary).
        DateTime::from_timestamp(secs, 0).unwrap_or(t)
    }

    /// The first boundary strictly after `t` (saturates at chrono's last representable time).
    pub fn next(self, t: DateTime<Utc>) -> DateTime<Utc> {
        self.floor(t)
            .checked_add_signed(TimeDelta::seconds(self.seconds()))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// The times of the equity curve of the period `[from, to)`: `from`, then every boundary
/// strictly between `from` and `to`, then `to`.
///
/// Each time after the first ends one interval. Partial intervals are kept, not dropped: when
/// `from` is not on a boundary the first interval is `[from, next boundary)`, and when `to` is
/// not on one the last interval is `[last boundary, to)` and ends at `to`, so the curve (and
/// `total_return`) always covers exactly the requested period; a partial interval counts as one
/// period in the statistics. `to <= from` gives `[from]` alone (no period).
///
/// Pass as `from` the effective start: DOMAIN.md starts the index at the first deposit when it
/// is later than the requested `from`. The length is `(to - from) / interval`, so callers
/// should bound the period before calling.
pub fn boundaries(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    interval: Interval,
) -> Vec<DateTime<Utc>> {
    let mut out = vec![from];
    if to <= from {
        return out;
    }
    let mut b = interval.next(from);
    while b < to {
        out.push(b);
        b = interval.next(b);
    }
    out.push(to);
    out
}

/// How many times [`boundaries`] lists for the same period, counted without listing them: a
/// request may name a period of centuries, and the caller refuses more points than it serves.
pub fn boundary_count(from: DateTime<Utc>, to: DateTime<Utc>, interval: Interval) -> u64 {
    if to <= from {
        return 1;
    }
    let first = interval.next(from);
    if first >= to {
        return 2;
    }
    // The boundaries first, first + step, ... strictly before `to`.
    let span = to - first;
    let (secs, step) = (span.num_seconds(), interval.seconds());
    let within = secs / step + i64::from(secs % step != 0 || span.subsec_nanos() != 0);
    2 + within as u64
}

/// One point of the equity curve of `ch.query.portfolio.analysis`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The boundary (RFC 3339 UTC).
    pub t: DateTime<Utc>,
    /// Equity at `t` (plain decimal string).
    #[serde(serialize_with = "ser_plain")]
    pub equity: Decimal,
    /// The NAV index, 1 at the first point.
    pub nav: f64,
    /// `nav / max(nav so far, first point included) - 1`: 0 or negative.
    pub drawdown: f64,
}

/// The equity curve from valued boundaries (e.g. [`nav_points`] at [`boundaries`]): the index is
/// rebased so that the first point has `nav` 1 (left as is if the first NAV is not positive),
/// and each point gets its drawdown from the running peak.
pub fn equity_curve(points: &[NavPoint]) -> Vec<CurvePoint> {
    let navs = rebase(&points.iter().map(|p| p.nav).collect::<Vec<_>>());
    let dds = drawdowns(&navs);
    points
        .iter()
        .zip(navs.iter().zip(dds))
        .map(|(p, (&nav, drawdown))| CurvePoint {
            t: p.t,
            equity: p.equity,
            nav,
            drawdown,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 3. Round trips
// ---------------------------------------------------------------------------------------------

/// Statistics of closed round trips (flat to flat per symbol). Averages are rounded to 8 places,
/// midpoint to even; ratios are `f64`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTripStats {
    pub trade_count: u64,
    /// Wins / all round trips (breakevens count in the denominator); `None` without trades.
    pub win_rate: Option<f64>,
    /// Mean positive PnL; `None` without a win.
    pub avg_win: Option<Decimal>,
    /// Mean negative PnL (negative); `None` without a loss.
    pub avg_loss: Option<Decimal>,
    /// Sum of wins / |sum of losses|; `None` without a loss (0 with losses and no win).
    pub profit_factor: Option<f64>,
    /// Mean PnL; `None` without trades.
    pub expectancy: Option<Decimal>,
}

/// [`RoundTripStats`] of a list of round-trip PnLs. A sum beyond [`Decimal`]'s range makes the
/// metrics that need it `None`.
pub fn round_trip_stats(pnls: &[Decimal]) -> RoundTripStats {
    // (sum, count) of the PnLs that pass `keep`; `None` when the sum overflows.
    let sum = |keep: fn(&Decimal) -> bool| -> Option<(Decimal, u64)> {
        pnls.iter()
            .filter(|p| keep(p))
            .try_fold((Decimal::ZERO, 0u64), |(s, n), x| {
                Some((s.checked_add(*x)?, n + 1))
            })
    };
    let mean = |s: Option<(Decimal, u64)>| -> Option<Decimal> {
        let (s, n) = s?;
        (n > 0)
            .then(|| s.checked_div(Decimal::from(n)))
            .flatten()
            .map(round8)
    };
    let wins = sum(|p| *p > Decimal::ZERO);
    let losses = sum(|p| *p < Decimal::ZERO);
    let all = sum(|_| true);
    let trade_count = pnls.len() as u64;
    let win_count = pnls.iter().filter(|p| **p > Decimal::ZERO).count() as u64;
    let profit_factor = match (wins, losses) {
        (Some((w, _)), Some((l, nl))) if nl > 0 => w
            .checked_div(l.abs())
            .and_then(|r| r.to_f64())
            .and_then(finite),
        _ => None,
    };
    RoundTripStats {
        trade_count,
        win_rate: (trade_count > 0).then(|| win_count as f64 / trade_count as f64),
        avg_win: mean(wins),
        avg_loss: mean(losses),
        profit_factor,
        expectancy: mean(all),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Metrics
// ---------------------------------------------------------------------------------------------

/// Totals that come straight from the read model (sums over positions and trades).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Totals {
    pub realized_pnl: Decimal,
    pub unrealized_pnl: Decimal,
    pub fees_paid: Decimal,
    /// Every trade (fill), whereas `trade_count` counts closed round trips.
    pub fill_count: u64,
}

/// Every metric of DOMAIN.md's table, by its name there: decimals as plain strings, statistics
/// as JSON numbers, undefined as `null`.
///
/// The series metrics (`total_return` to `exposure`, except the round-trip ones) are `None` when
/// the period has fewer than two intervals, and whenever the result would not be finite.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Metrics {
    /// `N_T - 1`.
    pub total_return: Option<f64>,
    #[serde(serialize_with = "ser_plain")]
    pub realized_pnl: Decimal,
    #[serde(serialize_with = "ser_plain")]
    pub unrealized_pnl: Decimal,
    #[serde(serialize_with = "ser_plain")]
    pub fees_paid: Decimal,
    /// Closed round trips.
    pub trade_count: u64,
    /// Every trade.
    pub fill_count: u64,
    pub win_rate: Option<f64>,
    #[serde(serialize_with = "ser_plain_opt")]
    pub avg_win: Option<Decimal>,
    #[serde(serialize_with = "ser_plain_opt")]
    pub avg_loss: Option<Decimal>,
    pub profit_factor: Option<f64>,
    #[serde(serialize_with = "ser_plain_opt")]
    pub expectancy: Option<Decimal>,
    /// `std(r) * sqrt(A)`, sample deviation (ddof = 1).
    pub volatility: Option<f64>,
    /// `mean(r - rf) / std(r - rf) * sqrt(A)`; `None` when the deviation is 0.
    pub sharpe: Option<f64>,
    /// `mean(r - rf) / sqrt(sum(min(r - rf, 0)^2) / n) * sqrt(A)`, n = all periods; `None` when
    /// no period is below the risk-free rate.
    pub sortino: Option<f64>,
    /// `min_t(N_t / max_{s<=t} N_s - 1)`, `N_0` included: 0 or negative.
    pub max_drawdown: Option<f64>,
    /// Longest run of consecutive periods below the running peak.
    pub max_drawdown_duration: Option<u64>,
    /// `N_T^(365/D) - 1`, D = the period's length in days.
    pub cagr: Option<f64>,
    /// `cagr / |max_drawdown|`; `None` when the drawdown is 0.
    pub calmar: Option<f64>,
    /// Share of periods with a non-zero position.
    pub exposure: Option<f64>,
}

/// Fills [`Metrics`].
///
/// - `nav`: the index at each time of [`boundaries`] (`N_0` at `from`, then one per period);
///   rebased here so that `N_0 = 1`.
/// - `exposed`: one flag per period (`nav.len() - 1` of them), true when a non-zero position
///   was held during it (the caller decides what "during" means); `exposure` is the share of
///   true flags among those given, `None` when none is given.
/// - `round_trip_pnls`: PnL of every closed round trip in the period.
/// - `period`: `to - from`, for CAGR's `D` (fractional days allowed).
/// - `risk_free_rate`: annual, converted per period as `(1 + rf)^(1/A) - 1` with
///   `A = interval.periods_per_year()`.
pub fn metrics(
    nav: &[f64],
    exposed: &[bool],
    round_trip_pnls: &[Decimal],
    totals: &Totals,
    interval: Interval,
    period: TimeDelta,
    risk_free_rate: f64,
) -> Metrics {
    let rt = round_trip_stats(round_trip_pnls);
    let s = series_stats(nav, exposed, interval, period, risk_free_rate);
    Metrics {
        total_return: s.total_return,
        realized_pnl: totals.realized_pnl,
        unrealized_pnl: totals.unrealized_pnl,
        fees_paid: totals.fees_paid,
        trade_count: rt.trade_count,
        fill_count: totals.fill_count,
        win_rate: rt.win_rate,
        avg_win: rt.avg_win,
        avg_loss: rt.avg_loss,
        profit_factor: rt.profit_factor,
        expectancy: rt.expectancy,
        volatility: s.volatility,
        sharpe: s.sharpe,
        sortino: s.sortino,
        max_drawdown: s.max_drawdown,
        max_drawdown_duration: s.max_drawdown_duration,
        cagr: s.cagr,
        calmar: s.calmar,
        exposure: s.exposure,
    }
}

#[derive(Debug, Default)]
struct SeriesStats {
    total_return: Option<f64>,
    volatility: Option<f64>,
    sharpe: Option<f64>,
    sortino: Option<f64>,
    max_drawdown: Option<f64>,
    max_drawdown_duration: Option<u64>,
    cagr: Option<f64>,
    calmar: Option<f64>,
    exposure: Option<f64>,
}

fn series_stats(
    nav: &[f64],
    exposed: &[bool],
    interval: Interval,
    period: TimeDelta,
    risk_free_rate: f64,
) -> SeriesStats {
    let periods = nav.len().saturating_sub(1);
    if periods < 2 || !(nav[0] > 0.0 && nav[0].is_finite()) {
        return SeriesStats::default();
    }
    let n = rebase(nav);
    // After a total loss the index stays at 0 (`NavChain`): a period without capital returns 0,
    // not 0/0, so that the statistics of the periods before it still count.
    let r: Vec<f64> = n
        .windows(2)
        .map(|w| if w[0] == 0.0 { 0.0 } else { w[1] / w[0] - 1.0 })
        .collect();
    let a = interval.periods_per_year();
    let rf = (1.0 + risk_free_rate).powf(1.0 / a) - 1.0;
    let excess: Vec<f64> = r.iter().map(|x| x - rf).collect();
    let ann = a.sqrt();

    let volatility = sample_std(&r).map(|s| s * ann);
    let ex_mean = mean(&excess);
    let sharpe = sample_std(&excess)
        .filter(|s| *s > EPS)
        .map(|s| ex_mean / s * ann);
    let downside = (excess.iter().map(|x| x.min(0.0).powi(2)).sum::<f64>() / r.len() as f64).sqrt();
    let sortino = (downside > EPS).then(|| ex_mean / downside * ann);

    let dds = drawdowns(&n);
    let max_drawdown = dds.iter().copied().fold(0.0_f64, f64::min);
    let mut run = 0u64;
    let mut longest = 0u64;
    for dd in &dds[1..] {
        run = if *dd < 0.0 { run + 1 } else { 0 };
        longest = longest.max(run);
    }

    let n_t = n[n.len() - 1];
    let days = period.num_milliseconds() as f64 / 86_400_000.0;
    let cagr = (days > 0.0)
        .then(|| n_t.powf(365.0 / days) - 1.0)
        .and_then(finite);
    let calmar = cagr
        .filter(|_| max_drawdown < 0.0)
        .map(|c| c / max_drawdown.abs());
    let exposure = (!exposed.is_empty())
        .then(|| exposed.iter().filter(|e| **e).count() as f64 / exposed.len() as f64);

    SeriesStats {
        total_return: finite(n_t - 1.0),
        volatility: volatility.and_then(finite),
        sharpe: sharpe.and_then(finite),
        sortino: sortino.and_then(finite),
        max_drawdown: finite(max_drawdown),
        max_drawdown_duration: max_drawdown.is_finite().then_some(longest),
        cagr,
        calmar: calmar.and_then(finite),
        exposure,
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn to_f64(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(f64::NAN)
}

/// Divides by the first value when it is positive; otherwise returns the series as is.
fn rebase(nav: &[f64]) -> Vec<f64> {
    match nav.first() {
        Some(&b) if b > 0.0 && b.is_finite() => nav.iter().map(|x| x / b).collect(),
        _ => nav.to_vec(),
    }
}

/// `N_t / max_{s<=t} N_s - 1` per point; within [`EPS`] of the peak counts as at the peak (0).
fn drawdowns(nav: &[f64]) -> Vec<f64> {
    let mut peak = f64::NEG_INFINITY;
    nav.iter()
        .map(|&x| {
            peak = peak.max(x);
            if peak > 0.0 && x < peak * (1.0 - EPS) {
                x / peak - 1.0
            } else {
                0.0
            }
        })
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample standard deviation (ddof = 1), two-pass; `None` below two values.
fn sample_std(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|x| (x - m).powi(2)).sum();
    Some((ss / (xs.len() - 1) as f64).sqrt())
}

fn ser_plain<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&plain(*d))
}

fn ser_plain_opt<S: Serializer>(d: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&plain(*d)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn t(y: i32, mo: u32, day: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, day, h, mi, 0).unwrap()
    }

    /// `got` equals `want` to the printed precision: within half a unit of its last place.
    fn close(got: Option<f64>, want: f64, places: i32) {
        let got = got.expect("a value");
        let tol = 0.5 * 10f64.powi(-places);
        assert!(
            (got - want).abs() <= tol,
            "{got} != {want} (to {places} places)"
        );
    }

    fn nav_from_returns(rs: &[f64]) -> Vec<f64> {
        let mut n = vec![1.0];
        for r in rs {
            n.push(n[n.len() - 1] * (1.0 + r));
        }
        n
    }

    const E3: [f64; 7] = [0.02, -0.01, 0.03, -0.05, -0.02, 0.04, 0.05];

    fn m(nav: &[f64], interval: Interval, days: i64, rf: f64) -> Metrics {
        let exposed = vec![true; nav.len().saturating_sub(1)];
        metrics(
            nav,
            &exposed,
            &[],
            &Totals::default(),
            interval,
            TimeDelta::days(days),
            rf,
        )
    }

    #[test]
    fn e2_round_trips_exactly() {
        let s = round_trip_stats(&[d("120"), d("-50"), d("80"), d("-30"), d("0")]);
        assert_eq!(s.trade_count, 5);
        assert_eq!(s.win_rate, Some(0.4));
        assert_eq!(s.profit_factor, Some(2.5));
        assert_eq!(s.avg_win, Some(d("100")));
        assert_eq!(s.avg_loss, Some(d("-40")));
        assert_eq!(s.expectancy, Some(d("24")));
    }

    #[test]
    fn round_trips_without_losses_or_trades() {
        let s = round_trip_stats(&[d("10"), d("0")]);
        assert_eq!(s.profit_factor, None);
        assert_eq!(s.avg_loss, None);
        assert_eq!(s.win_rate, Some(0.5));
        let s = round_trip_stats(&[d("-10")]);
        assert_eq!(s.profit_factor, Some(0.0));
        assert_eq!(s.avg_win, None);
        let s = round_trip_stats(&[]);
        assert_eq!(s.trade_count, 0);
        assert_eq!(
            (s.win_rate, s.expectancy, s.profit_factor),
            (None, None, None)
        );
        let s = round_trip_stats(&[d("1"), d("1"), d("2")]);
        assert_eq!(s.expectancy, Some(d("1.33333333")));
    }

    #[test]
    fn e3_daily_no_flows() {
        // From 10000 at day 0: equity values, then the index through the chain.
        let mut equity = d("10000");
        let mut obs = vec![Observation::Flow {
            t: t(2026, 1, 1, 0, 0),
            equity_before: Decimal::ZERO,
            amount: equity,
        }];
        obs.push(Observation::Equity {
            t: t(2026, 1, 1, 0, 0),
            equity,
        });
        for (i, r) in E3.iter().enumerate() {
            equity *= Decimal::ONE + Decimal::try_from(*r).unwrap();
            obs.push(Observation::Equity {
                t: t(2026, 1, 2 + i as u32, 0, 0),
                equity,
            });
        }
        let curve = equity_curve(&nav_points(&obs));
        assert_eq!(curve.len(), 8);
        assert_eq!(curve[0].nav, 1.0);
        let nav: Vec<f64> = curve.iter().map(|p| p.nav).collect();
        let r: Vec<f64> = nav.windows(2).map(|w| w[1] / w[0] - 1.0).collect();
        close(Some(mean(&r)), 0.00857143, 8);
        close(sample_std(&r), 0.03625308, 8);

        let x = m(&nav, Interval::Day, 7, 0.0);
        close(x.sharpe, 4.51705, 5);
        close(x.sortino, 7.91021, 5);
        close(x.volatility, 0.692614, 6);
        close(x.max_drawdown, -0.069, 12);
        assert_eq!(x.max_drawdown_duration, Some(3));
        close(x.total_return, 0.0574136, 7);
        let cagr = 1.0574136_f64.powf(365.0 / 7.0) - 1.0;
        assert!((x.cagr.unwrap() / cagr - 1.0).abs() < 1e-5);
        close(x.calmar, x.cagr.unwrap() / 0.069, 6);
        assert_eq!(x.exposure, Some(1.0));
        close(Some(curve[5].drawdown), -0.069, 12);
        assert_eq!(curve[7].drawdown, 0.0);
    }

    #[test]
    fn e4_flow_is_not_return() {
        let obs = [
            Observation::Flow {
                t: t(2026, 1, 1, 0, 0),
                equity_before: Decimal::ZERO,
                amount: d("10000"),
            },
            Observation::Equity {
                t: t(2026, 1, 1, 0, 0),
                equity: d("10000"),
            },
            Observation::Equity {
                t: t(2026, 1, 2, 0, 0),
                equity: d("11000"),
            },
            Observation::Flow {
                t: t(2026, 1, 2, 12, 0),
                equity_before: d("11000"),
                amount: d("10000"),
            },
            Observation::Equity {
                t: t(2026, 1, 3, 0, 0),
                equity: d("18900"),
            },
        ];
        let curve = equity_curve(&nav_points(&obs));
        let nav: Vec<f64> = curve.iter().map(|p| p.nav).collect();
        close(Some(nav[2] - 1.0), -0.01, 12);
        close(Some(curve[2].drawdown), -0.10, 12);
        let x = m(&nav, Interval::Day, 2, 0.0);
        close(x.total_return, -0.01, 12);
        close(x.max_drawdown, -0.10, 12);
        assert_eq!(x.max_drawdown_duration, Some(1));
    }

    #[test]
    fn nav_chain_full_withdrawal_and_redeposit() {
        let mut c = NavChain::new();
        assert_eq!(c.nav(Decimal::ZERO), 1.0);
        c.flow(Decimal::ZERO, d("100"));
        assert_eq!(c.nav(d("120")), 1.2);
        c.flow(d("120"), d("-120"));
        assert_eq!(c.equity_after_flow, Decimal::ZERO);
        // No capital: flat whatever the equity says.
        assert_eq!(c.nav(Decimal::ZERO), 1.2);
        c.flow(Decimal::ZERO, d("50"));
        close(Some(c.nav(d("25"))), 0.6, 12);
        // A partial withdrawal changes nothing by itself.
        let before = c.nav(d("40"));
        c.flow(d("40"), d("-10"));
        close(Some(c.nav(d("30"))), before, 12);
    }

    #[test]
    fn fewer_than_two_periods_is_null() {
        for nav in [vec![], vec![1.0], vec![1.0, 1.1]] {
            let x = m(&nav, Interval::Day, 1, 0.0);
            assert_eq!(x.total_return, None);
            assert_eq!(x.volatility, None);
            assert_eq!(x.sharpe, None);
            assert_eq!(x.sortino, None);
            assert_eq!(x.max_drawdown, None);
            assert_eq!(x.max_drawdown_duration, None);
            assert_eq!(x.cagr, None);
            assert_eq!(x.calmar, None);
            assert_eq!(x.exposure, None);
        }
    }

    #[test]
    fn a_total_loss_keeps_the_statistics() {
        let x = m(&[1.0, 0.5, 0.0, 0.0, 0.0], Interval::Day, 4, 0.0);
        // returns -0.5, -1, 0, 0: mean -0.375, sample variance 0.6875 / 3
        close(x.volatility, (0.6875_f64 / 3.0).sqrt() * 365f64.sqrt(), 9);
        assert!(x.sharpe.is_some_and(|s| s < 0.0), "{:?}", x.sharpe);
        assert!(x.sortino.is_some_and(|s| s < 0.0), "{:?}", x.sortino);
        assert_eq!(x.max_drawdown, Some(-1.0));
        assert_eq!(x.total_return, Some(-1.0));
    }

    #[test]
    fn zero_deviation_gives_null_sharpe() {
        let x = m(&[1.0, 1.0, 1.0], Interval::Day, 2, 0.0);
        assert_eq!(x.volatility, Some(0.0));
        assert_eq!((x.sharpe, x.sortino, x.calmar), (None, None, None));
        assert_eq!(x.max_drawdown, Some(0.0));
        assert_eq!(x.max_drawdown_duration, Some(0));
        assert_eq!(x.total_return, Some(0.0));
        // Constant growth: deviation is float noise, still null; no downside either.
        let nav = nav_from_returns(&[0.01; 10]);
        let x = m(&nav, Interval::Day, 10, 0.0);
        assert_eq!((x.sharpe, x.sortino), (None, None));
    }

    #[test]
    fn hourly_annualisation() {
        let nav = nav_from_returns(&E3);
        let x = m(&nav, Interval::Hour, 1, 0.0);
        let k = 24f64.sqrt();
        close(x.sharpe, 4.51705 * k, 4);
        close(x.volatility, 0.692614 * k, 5);
        close(x.sortino, 7.91021 * k, 4);
    }

    #[test]
    fn risk_free_rate_per_period() {
        let nav = nav_from_returns(&E3);
        let rf = 0.05;
        let rf_d = 1.05_f64.powf(1.0 / 365.0) - 1.0;
        assert!((rf_d - 0.000133681).abs() < 1e-9);
        let ex: Vec<f64> = E3.iter().map(|r| r - rf_d).collect();
        let want = mean(&ex) / sample_std(&ex).unwrap() * 365f64.sqrt();
        let x = m(&nav, Interval::Day, 7, rf);
        close(x.sharpe, want, 9);
        assert!(x.sharpe.unwrap() < 4.51705);
        let down = (ex.iter().map(|x| x.min(0.0).powi(2)).sum::<f64>() / 7.0).sqrt();
        close(x.sortino, mean(&ex) / down * 365f64.sqrt(), 9);
        // Volatility ignores the risk-free rate.
        close(x.volatility, 0.692614, 6);
        let rf_h = 1.05_f64.powf(1.0 / 8760.0) - 1.0;
        let ex: Vec<f64> = E3.iter().map(|r| r - rf_h).collect();
        let want = mean(&ex) / sample_std(&ex).unwrap() * 8760f64.sqrt();
        close(m(&nav, Interval::Hour, 1, rf).sharpe, want, 9);
    }

    #[test]
    fn exposure_is_a_share_of_periods() {
        let nav = nav_from_returns(&[0.0, 0.01, 0.0, -0.01]);
        let x = metrics(
            &nav,
            &[false, true, true, false],
            &[],
            &Totals::default(),
            Interval::Day,
            TimeDelta::days(4),
            0.0,
        );
        assert_eq!(x.exposure, Some(0.5));
    }

    #[test]
    fn boundaries_daily_from_off_boundary() {
        let b = boundaries(t(2026, 1, 1, 15, 30), t(2026, 1, 4, 0, 0), Interval::Day);
        assert_eq!(
            b,
            vec![
                t(2026, 1, 1, 15, 30),
                t(2026, 1, 2, 0, 0),
                t(2026, 1, 3, 0, 0),
                t(2026, 1, 4, 0, 0)
            ]
        );
        // A partial last interval ends at `to`.
        let b = boundaries(t(2026, 1, 1, 15, 30), t(2026, 1, 3, 6, 0), Interval::Day);
        assert_eq!(
            b,
            vec![
                t(2026, 1, 1, 15, 30),
                t(2026, 1, 2, 0, 0),
                t(2026, 1, 3, 0, 0),
                t(2026, 1, 3, 6, 0)
            ]
        );
        // On boundaries: one point per day.
        let b = boundaries(t(2026, 1, 1, 0, 0), t(2026, 1, 3, 0, 0), Interval::Day);
        assert_eq!(b.len(), 3);
        assert_eq!(
            boundaries(t(2026, 1, 1, 0, 0), t(2026, 1, 1, 0, 0), Interval::Day),
            vec![t(2026, 1, 1, 0, 0)]
        );
    }

    #[test]
    fn boundaries_are_counted_without_listing_them() {
        let cases = [
            (t(2026, 1, 1, 15, 30), t(2026, 1, 4, 0, 0), Interval::Day),
            (t(2026, 1, 1, 15, 30), t(2026, 1, 3, 6, 0), Interval::Day),
            (t(2026, 1, 1, 0, 0), t(2026, 1, 3, 0, 0), Interval::Day),
            (t(2026, 1, 1, 0, 0), t(2026, 1, 1, 0, 0), Interval::Day),
            (t(2026, 1, 1, 0, 0), t(2026, 1, 1, 0, 1), Interval::Hour),
            (t(2026, 1, 1, 22, 10), t(2026, 1, 2, 1, 5), Interval::Hour),
            (t(2026, 1, 1, 22, 10), t(2026, 1, 2, 1, 0), Interval::Hour),
            (t(2026, 3, 1, 0, 0), t(2026, 1, 1, 0, 0), Interval::Hour),
        ];
        for (from, to, interval) in cases {
            let listed = boundaries(from, to, interval).len() as u64;
            assert_eq!(
                boundary_count(from, to, interval),
                listed,
                "{from} {to} {interval:?}"
            );
        }
        let (from, to) = (
            t(2026, 1, 1, 0, 0) + TimeDelta::nanoseconds(1),
            t(2026, 1, 2, 0, 0),
        );
        assert_eq!(
            boundary_count(from, to, Interval::Hour),
            boundaries(from, to, Interval::Hour).len() as u64
        );
        // Far-away ends: counted in no time and without memory.
        let far = DateTime::parse_from_rfc3339("9999-12-31T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            boundary_count(t(2026, 1, 1, 0, 0), far, Interval::Hour),
            (far - t(2026, 1, 1, 0, 0)).num_hours() as u64 + 1
        );
    }

    proptest::proptest! {
        #[test]
        fn boundary_count_is_the_length_of_boundaries(
            from in 0i64..20_000_000, len in -100_000i64..20_000_000, hourly: bool,
        ) {
            let start = t(2026, 1, 1, 0, 0) + TimeDelta::seconds(from);
            let end = start + TimeDelta::seconds(len);
            let interval = if hourly { Interval::Hour } else { Interval::Day };
            proptest::prop_assert_eq!(
                boundary_count(start, end, interval),
                boundaries(start, end, interval).len() as u64
            );
        }
    }

    #[test]
    fn boundaries_hourly_from_off_boundary() {
        let b = boundaries(t(2026, 1, 1, 22, 10), t(2026, 1, 2, 1, 5), Interval::Hour);
        assert_eq!(
            b,
            vec![
                t(2026, 1, 1, 22, 10),
                t(2026, 1, 1, 23, 0),
                t(2026, 1, 2, 0, 0),
                t(2026, 1, 2, 1, 0),
                t(2026, 1, 2, 1, 5)
            ]
        );
        assert_eq!(
            Interval::Hour.floor(t(2026, 1, 1, 22, 10)),
            t(2026, 1, 1, 22, 0)
        );
        assert_eq!(
            Interval::Hour.next(t(2026, 1, 1, 22, 0)),
            t(2026, 1, 1, 23, 0)
        );
        assert_eq!(
            Interval::Day.floor(t(2026, 1, 1, 22, 10)),
            t(2026, 1, 1, 0, 0)
        );
        assert_eq!(
            Interval::Day.next(t(2025, 12, 31, 0, 0)),
            t(2026, 1, 1, 0, 0)
        );
        // Before the epoch too.
        assert_eq!(
            Interval::Day.floor(t(1969, 12, 31, 5, 0)),
            t(1969, 12, 31, 0, 0)
        );
    }

    #[test]
    fn serializes_with_table_names() {
        let nav = nav_from_returns(&[0.0, 0.0]);
        let totals = Totals {
            realized_pnl: d("359.60"),
            unrealized_pnl: d("0"),
            fees_paid: d("40.4"),
            fill_count: 4,
        };
        let x = metrics(
            &nav,
            &[false, false],
            &[d("359.6")],
            &totals,
            Interval::Day,
            TimeDelta::days(2),
            0.0,
        );
        let v = serde_json::to_value(x).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "total_return",
            "realized_pnl",
            "unrealized_pnl",
            "fees_paid",
            "trade_count",
            "fill_count",
            "win_rate",
            "avg_win",
            "avg_loss",
            "profit_factor",
            "expectancy",
            "volatility",
            "sharpe",
            "sortino",
            "max_drawdown",
            "max_drawdown_duration",
            "cagr",
            "calmar",
            "exposure",
        ];
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        want.sort_unstable();
        assert_eq!(keys_sorted, want);
        assert_eq!(v["realized_pnl"], "359.6");
        assert_eq!(v["avg_win"], "359.6");
        assert_eq!(v["avg_loss"], serde_json::Value::Null);
        assert_eq!(v["sharpe"], serde_json::Value::Null);
        assert_eq!(v["win_rate"], 1.0);
        assert_eq!(v["trade_count"], 1);
        assert_eq!(v["exposure"], 0.0);

        let p = CurvePoint {
            t: t(2026, 1, 1, 0, 0),
            equity: d("10000.00"),
            nav: 1.0,
            drawdown: 0.0,
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"t":"2026-01-01T00:00:00Z","equity":"10000","nav":1.0,"drawdown":0.0}"#
        );
        assert_eq!(serde_json::to_string(&Interval::Hour).unwrap(), r#""1h""#);
        assert_eq!(
            serde_json::from_str::<Interval>(r#""1d""#).unwrap(),
            Interval::Day
        );
    }
}

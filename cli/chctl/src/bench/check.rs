//! The end of a run: every portfolio folded from the stream and compared with its read-model
//! row (and with the baseline's), and the timed rebuild of the portfolio read model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use bytes::Bytes;
use ch_domain::event::Side;
use ch_domain::portfolio::PortfolioState;
use ch_domain::{Aggregate, Event};
use ch_readmodel::PortfolioProjection;
use ch_runtime::app::App;
use ch_runtime::{envelope, Subjects};
use futures::stream::{self, StreamExt};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::load::{send, Outcome, Target};
use crate::common::Ctx;
use crate::rebuild::follow;

/// A portfolio folded from the stream: its state, and the counters the read model keeps beside
/// it, which the state does not (fills, rejected signals, round trips closed and won).
#[derive(Default)]
pub struct Portfolio {
    pub state: PortfolioState,
    fills: u64,
    rejected: u64,
    trips_closed: u64,
    trips_won: u64,
    /// Each symbol's open round trip (flat to flat) and its realized PnL so far.
    open_trips: HashMap<String, Decimal>,
}

impl Portfolio {
    fn apply(&mut self, event: &Event, at: chrono::DateTime<chrono::Utc>) {
        match event {
            Event::TradeExecuted(t) => {
                self.fills += 1;
                // A buy from flat opens a round trip, sells add their realized PnL, and the
                // sell that leaves the position flat closes it: won when its PnL is positive.
                match t.side {
                    Side::Buy => {
                        self.open_trips.entry(t.symbol.clone()).or_default();
                    }
                    Side::Sell => {
                        if let Some(pnl) = self.open_trips.get_mut(&t.symbol) {
                            *pnl = pnl.saturating_add(t.realized_pnl);
                            if t.position_after.is_zero() {
                                self.trips_closed += 1;
                                self.trips_won += u64::from(*pnl > Decimal::ZERO);
                                self.open_trips.remove(&t.symbol);
                            }
                        }
                    }
                }
            }
            Event::TradeSignalRejected(_) => self.rejected += 1,
            _ => {}
        }
        self.state.apply(event, at);
    }
}

/// Folds every portfolio of the stream of `subjects` whose id starts with `id_prefix`; also
/// returns the stream's last sequence when the fold started.
pub async fn fold(
    client: &async_nats::Client,
    subjects: &Subjects,
    id_prefix: &str,
) -> Result<(HashMap<String, Portfolio>, u64)> {
    let js = jetstream::new(client.clone());
    let mut stream = js
        .get_stream(subjects.stream_name())
        .await
        .with_context(|| format!("opening stream {}", subjects.stream_name()))?;
    let head = stream.info().await?.state.last_sequence;
    // The whole stream, the other aggregates' events skipped here: for a filter that matches
    // most of a stream's subjects but not all (`<prefix>.events.portfolio.>`), nats-server
    // walks the message block's subject tree for every message it delivers (two thirds of its
    // CPU in such a fold), while the stream's own subject is delivered message by message.
    let filter = subjects.events_filter();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.clone(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .with_context(|| format!("an ordered consumer on {filter}"))?;
    let mut messages = consumer.messages().await?;
    let mut states: HashMap<String, Portfolio> = HashMap::new();
    let id_start = format!("{}.events.portfolio.", subjects.prefix());
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let msg = match next {
            Err(_) => break, // nothing (more) on the filter
            Ok(None) => break,
            Ok(Some(m)) => m.map_err(|e| anyhow!("reading {filter}: {e}"))?,
        };
        let info = msg.info().map_err(|e| anyhow!("{e}"))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let id = msg.subject.as_str().strip_prefix(&id_start).unwrap_or("");
        if id.starts_with(id_prefix) && seq <= head {
            let ev = envelope::decode(seq, &msg.payload)
                .map_err(|e| anyhow!("event {seq} on {}: {e}", msg.subject))?;
            states
                .entry(ev.meta.aggregate_id.clone())
                .or_default()
                .apply(&ev.event, ev.meta.occurred_at);
        }
        if pending == 0 || seq >= head {
            break;
        }
    }
    Ok((states, head))
}

/// The comparable figures of a portfolio: the figures of the performance reply that the
/// folded state and counters hold and that do not depend on when the run happened (its owner,
/// name and currency, cash, realized PnL, fees, net deposits, status, fee rate, attached
/// strategies, version, fills, rejected signals, round trips closed and their win rate, and
/// each position's quantity, cost basis and average entry price). Not compared: the times
/// (the monolith's run is another), what depends on the marks (equity, unrealized PnL, the
/// NAV behind `total_return`), and the fills' and history's rows.
#[derive(Debug, PartialEq)]
struct Figures {
    user_id: String,
    name: String,
    quote_currency: String,
    cash: Decimal,
    realized: Decimal,
    fees_paid: Decimal,
    net_deposits: Decimal,
    status: String,
    fee_rate: Decimal,
    attached: BTreeSet<String>,
    version: u64,
    fills: u64,
    rejected: u64,
    trips_closed: u64,
    win_rate: Option<Decimal>,
    /// Quantity, cost basis, average entry price.
    positions: BTreeMap<String, (Decimal, Decimal, Decimal)>,
}

impl Figures {
    fn of(folded: &Portfolio) -> Figures {
        let s = &folded.state;
        let win_rate = ch_readmodel::win_rate(folded.trips_won, folded.trips_closed);
        Figures {
            user_id: s.user_id.clone(),
            name: s.name.clone(),
            quote_currency: s.quote_currency.clone(),
            cash: s.cash,
            realized: s.realized_pnl,
            fees_paid: s.fees_paid,
            net_deposits: s.net_deposits,
            status: s.status.as_str().to_owned(),
            fee_rate: s.fee_rate,
            attached: s.attached_strategies.clone(),
            version: s.version,
            fills: folded.fills,
            rejected: folded.rejected,
            trips_closed: folded.trips_closed,
            win_rate,
            positions: s
                .positions
                .iter()
                .filter(|(_, p)| !p.quantity.is_zero())
                .map(|(k, p)| {
                    let avg_entry = (p.gross_entry / p.quantity).round_dp(8);
                    (k.clone(), (p.quantity, p.cost_basis, avg_entry))
                })
                .collect(),
        }
    }

    fn of_reply(v: &Value) -> Option<Figures> {
        let d = |x: &Value| -> Option<Decimal> { x.as_str()?.parse().ok() };
        let mut positions = BTreeMap::new();
        for p in v["positions"].as_array()? {
            positions.insert(
                p["symbol"].as_str()?.to_owned(),
                (
                    d(&p["quantity"])?,
                    d(&p["cost_basis"])?,
                    d(&p["avg_entry_price"])?,
                ),
            );
        }
        let attached = v["attached_strategies"]
            .as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<BTreeSet<String>>>()?;
        Some(Figures {
            user_id: v["user_id"].as_str()?.to_owned(),
            name: v["name"].as_str()?.to_owned(),
            quote_currency: v["quote_currency"].as_str()?.to_owned(),
            cash: d(&v["cash"])?,
            realized: d(&v["realized_pnl"])?,
            fees_paid: d(&v["fees_paid"])?,
            net_deposits: d(&v["net_deposits"])?,
            status: v["status"].as_str()?.to_owned(),
            fee_rate: d(&v["fee_rate"])?,
            attached,
            version: v["version"].as_u64()?,
            fills: v["fill_count"].as_u64()?,
            rejected: v["rejected_signals"].as_u64()?,
            trips_closed: v["trade_count"].as_u64()?,
            win_rate: match &v["win_rate"] {
                Value::Null => None,
                w => Some(d(w)?),
            },
            positions,
        })
    }

    fn diff(&self, other: &Figures) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! compare {
            ($($field:ident as $name:literal),* $(,)?) => {$(
                if self.$field != other.$field {
                    out.push(format!("{} {:?} vs {:?}", $name, self.$field, other.$field));
                }
            )*};
        }
        compare!(
            user_id as "user_id",
            name as "name",
            quote_currency as "quote_currency",
            cash as "cash",
            realized as "realized_pnl",
            fees_paid as "fees_paid",
            net_deposits as "net_deposits",
            status as "status",
            fee_rate as "fee_rate",
            attached as "attached_strategies",
            version as "version",
            fills as "fill_count",
            rejected as "rejected_signals",
            trips_closed as "trade_count",
            win_rate as "win_rate",
            positions as "positions",
        );
        out
    }
}

/// Asks `target` for each portfolio (waiting for `min_seq` when given) and compares the reply
/// with the folded state. `rows_differing` counts portfolios whose figures differ or that
/// could not be read, but for those in `failed`, which had a command fail (and so may have
/// taken a different path); they are counted as `rows_differing_after_failed_commands`.
pub async fn compare(
    t: &Target,
    states: &HashMap<String, Portfolio>,
    ids: &[String],
    min_seq: Option<u64>,
    failed: &BTreeSet<String>,
) -> Value {
    let subject = t.query("portfolio.performance");
    let results: Vec<(String, Vec<String>)> = stream::iter(ids.iter())
        .map(|id| {
            let subject = &subject;
            async move {
                let mut body = json!({"portfolio_id": id, "timeout_ms": 10000});
                if let Some(seq) = min_seq {
                    body["min_stream_seq"] = json!(seq);
                }
                let o = send(
                    &t.client,
                    subject,
                    Bytes::from(body.to_string()),
                    Duration::from_secs(15),
                )
                .await;
                let folded = states.get(id).map(Figures::of);
                let problems = match (o, folded) {
                    (_, None) => vec!["no events on the stream".to_owned()],
                    (Outcome::Ok(b), Some(f)) => {
                        match serde_json::from_slice::<Value>(&b)
                            .ok()
                            .as_ref()
                            .and_then(Figures::of_reply)
                        {
                            Some(r) => f.diff(&r),
                            None => vec!["unreadable reply".to_owned()],
                        }
                    }
                    (Outcome::Api(code), _) => vec![format!("query failed: {code}")],
                    (Outcome::Failed(why), _) => vec![format!("query failed: {why}")],
                };
                (id.clone(), problems)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    tally(&results, failed)
}

/// [`compare`]'s figures from each portfolio's problems (none: the same).
fn tally(results: &[(String, Vec<String>)], failed: &BTreeSet<String>) -> Value {
    let (explained, differing): (Vec<_>, Vec<_>) = results
        .iter()
        .filter(|(_, p)| !p.is_empty())
        .partition(|(id, _)| failed.contains(id));
    let examples: Vec<Value> = differing
        .iter()
        .take(5)
        .map(|(id, p)| json!({"portfolio_id": id, "stream_vs_reply": p}))
        .collect();
    json!({
        "portfolios_checked": results.len(),
        "rows_differing": differing.len(),
        "rows_differing_after_failed_commands": explained.len(),
        "examples": examples,
    })
}

/// The rebuild of the portfolio read model: reset, then replay of the whole stream. Asked of
/// the running projector over NATS (its `rebuild` endpoint; the projector that holds the lock
/// replays, announcing its progress), so that a run against a deployment needs no database;
/// with no projector running, this process resets and replays through `CH_DATABASE_URL`.
pub async fn rebuild(ctx: &Ctx) -> Result<Value> {
    let app = App::start(ctx.cfg.clone(), "chctl-bench")
        .await
        .context("connecting for the rebuild")?;
    let head = app.store.last_seq().await?;
    // Subscribed before asking: the replay may be over before the reply is read.
    let progress = app
        .client
        .subscribe(app.subjects.progress("portfolio"))
        .await?;
    let stall = Duration::from_secs(60);
    let started = Instant::now();
    let asked = tokio::time::timeout(
        Duration::from_secs(30),
        app.client
            .request(app.subjects.projector_rebuild("portfolio"), Bytes::new()),
    )
    .await
    .map_err(|_| anyhow!("the projector's rebuild endpoint did not answer within 30 s"))?;
    let (by, first_move) = match asked {
        Ok(reply) => {
            if reply
                .headers
                .as_ref()
                .is_some_and(|h| h.get("Nats-Service-Error-Code").is_some())
            {
                bail!(
                    "the projector refused the rebuild: {}",
                    String::from_utf8_lossy(&reply.payload)
                );
            }
            let followed = follow(ctx, &app, "portfolio", head, stall, progress).await?;
            (
                "the running projector, asked over NATS",
                followed.first_move,
            )
        }
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            ch_readmodel::workers::migrate(&app).await?;
            let projector = ch_readmodel::workers::projector(&app, PortfolioProjection::default())?;
            match projector.rebuild().await? {
                Some(_) => ("chctl (no projector was running)", None),
                // A projector took the lock meanwhile: it replays.
                None => {
                    let followed = follow(ctx, &app, "portfolio", head, stall, progress).await?;
                    ("the running projector", followed.first_move)
                }
            }
        }
        Err(e) => bail!("asking the projector to rebuild: {e}"),
    };
    let secs = started.elapsed().as_secs_f64();
    let replay = first_move.and_then(|(t, cp)| {
        let s = t.elapsed().as_secs_f64();
        (s > 0.0 && head > cp).then(|| (head - cp) as f64 / s)
    });
    Ok(json!({
        "events": head,
        "seconds": super::load::round3(secs),
        "events_per_sec": (head as f64 / secs.max(1e-6)).round(),
        "replayed_by": by,
        "replay_events_per_sec_after_first_commit": replay.map(f64::round),
        "note": "from the request to <prefix>.admin.projector.portfolio.rebuild until the projector's checkpoint reaches the stream head (its announcements on <prefix>.progress.portfolio, confirmed by its status)",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every figure the fold holds is compared, not only cash, positions and PnL: a reply that
    /// matches the fold matches, one whose fees, deposits, status, fee rate, attached
    /// strategies, counters or a position's average entry price differ does not.
    #[test]
    fn every_folded_figure_is_compared_with_the_reply() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let mut state = PortfolioState {
            cash: d("900.5"),
            realized_pnl: d("1.25"),
            fees_paid: d("0.5"),
            net_deposits: d("1000"),
            fee_rate: d("0.001"),
            user_id: "u1".into(),
            name: "p one".into(),
            quote_currency: "USDT".into(),
            ..PortfolioState::default()
        };
        state.attached_strategies.insert("s1".into());
        state.positions.insert(
            "BTC-USDT".into(),
            ch_domain::portfolio::Position {
                quantity: d("0.1"),
                cost_basis: d("100.1"),
                gross_entry: d("100"),
            },
        );
        let reply = json!({
            "user_id": "u1", "name": "p one", "quote_currency": "USDT",
            "cash": "900.5", "realized_pnl": "1.25", "fees_paid": "0.5", "net_deposits": "1000",
            "status": "open", "fee_rate": "0.0010", "attached_strategies": ["s1"], "version": 0,
            "fill_count": 5, "rejected_signals": 2, "trade_count": 3, "win_rate": "0.6666666667",
            "positions": [{"symbol": "BTC-USDT", "quantity": "0.1", "cost_basis": "100.1",
                           "avg_entry_price": "1000"}],
        });
        let folded = Figures::of(&Portfolio {
            state,
            fills: 5,
            rejected: 2,
            trips_closed: 3,
            trips_won: 2,
            open_trips: HashMap::new(),
        });
        assert_eq!(
            folded.diff(&Figures::of_reply(&reply).unwrap()),
            Vec::<String>::new()
        );
        for (field, wrong) in [
            ("fees_paid", json!("0.6")),
            ("net_deposits", json!("900")),
            ("status", json!("closed")),
            ("fee_rate", json!("0.002")),
            ("attached_strategies", json!(["s1", "s2"])),
            ("user_id", json!("u2")),
            ("name", json!("p two")),
            ("quote_currency", json!("USDC")),
            ("fill_count", json!(4)),
            ("rejected_signals", json!(3)),
            ("trade_count", json!(2)),
            ("win_rate", json!("0.6666666666")),
            ("win_rate", Value::Null),
        ] {
            let mut r = reply.clone();
            r[field] = wrong;
            let problems = folded.diff(&Figures::of_reply(&r).unwrap());
            assert_eq!(problems.len(), 1, "{field}: {problems:?}");
            assert!(problems[0].starts_with(field), "{problems:?}");
        }
        let mut r = reply.clone();
        r["positions"][0]["avg_entry_price"] = json!("1000.1");
        let problems = folded.diff(&Figures::of_reply(&r).unwrap());
        assert!(
            problems.len() == 1 && problems[0].starts_with("positions"),
            "{problems:?}"
        );
    }

    /// Round trips, flat to flat per symbol, as the read model counts them: a buy from flat
    /// opens one, the sell that leaves the position flat closes it, won when the realized PnL
    /// of its sells is positive; a rejected signal counts apart.
    #[test]
    fn round_trips_and_counters_are_folded_from_the_fills() {
        use ch_domain::event::{SignalRecord, TradeExecuted, TradeSignalRejected};
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let fill = |side: Side, symbol: &str, pnl: &str, after: &str| {
            Event::TradeExecuted(TradeExecuted {
                portfolio_id: "p1".into(),
                strategy_id: "s1".into(),
                trade_id: uuid::Uuid::nil(),
                symbol: symbol.into(),
                side,
                quantity: d("1"),
                price: d("1"),
                fee: d("0"),
                realized_pnl: d(pnl),
                cash_after: d("0"),
                position_after: d(after),
                cost_basis_after: d(after),
                gross_entry_after: d(after),
                equity_after: None,
            })
        };
        let mut p = Portfolio::default();
        let at = chrono::Utc::now();
        for e in [
            // BTC: a trip of two sells, +5 then -3: won.
            fill(Side::Buy, "BTC-USDT", "0", "2"),
            fill(Side::Sell, "BTC-USDT", "5", "1"),
            fill(Side::Sell, "BTC-USDT", "-3", "0"),
            // ETH: a buy added to, then sold at a loss: lost.
            fill(Side::Buy, "ETH-USDT", "0", "1"),
            fill(Side::Buy, "ETH-USDT", "0", "2"),
            fill(Side::Sell, "ETH-USDT", "-1", "0"),
            // BTC again: open at the end.
            fill(Side::Buy, "BTC-USDT", "0", "1"),
            Event::TradeSignalRejected(TradeSignalRejected {
                portfolio_id: "p1".into(),
                reason: "OVERSELL".into(),
                detail: String::new(),
                signal: SignalRecord {
                    strategy_id: "s1".into(),
                    symbol: "SOL-USDT".into(),
                    side: Side::Sell,
                    quantity: d("1"),
                    price: d("1"),
                    fee: None,
                },
            }),
        ] {
            p.apply(&e, at);
        }
        assert_eq!(
            (p.fills, p.rejected, p.trips_closed, p.trips_won),
            (7, 1, 2, 1)
        );
        assert_eq!(Figures::of(&p).win_rate, Some(d("0.5")));
    }

    /// A portfolio whose signal failed in a run may differ; it is counted apart, and only the
    /// others make `rows_differing` and its examples.
    #[test]
    fn portfolios_with_failed_signals_are_counted_apart() {
        let row = |id: &str, problems: &[&str]| {
            (
                id.to_owned(),
                problems.iter().map(|p| p.to_string()).collect(),
            )
        };
        let results = vec![
            row("p1", &[]),
            row("p2", &["cash 1 vs 2"]),
            row("p3", &["version 3 vs 4"]),
            row("p4", &[]),
        ];
        let failed = BTreeSet::from(["p3".to_owned(), "p4".to_owned()]);
        let v = tally(&results, &failed);
        assert_eq!(v["portfolios_checked"], 4);
        assert_eq!(v["rows_differing"], 1, "{v}");
        assert_eq!(v["rows_differing_after_failed_commands"], 1, "{v}");
        assert_eq!(v["examples"][0]["portfolio_id"], "p2", "{v}");
        assert_eq!(v["examples"].as_array().map(Vec::len), Some(1), "{v}");
        // Without failures every difference counts.
        let all = tally(&results, &BTreeSet::new());
        assert_eq!(all["rows_differing"], 2, "{all}");
        assert_eq!(all["rows_differing_after_failed_commands"], 0, "{all}");
    }
}

//! The `portfolio` projection: portfolios with their cash and totals, positions, marks,
//! fills, round trips and attached strategies. The accounting is not redone here: trade
//! events carry the position's state after the fill.
//!
//! A batch is folded in memory, in stream order, over the rows it touches (read once at the
//! start), and written back with one set-based statement per table (`UNNEST`, or `COPY` for the
//! append-only ones), so the cost of a batch grows with the rows it changes, not with round
//! trips per event. The leading projector is the only writer, so it keeps the rows it folded
//! for the next batch ([`Kept`]) and reads only the portfolios it has not seen yet.
//!
//! History and prices are appended as each batch is applied, and so are the fills of a batch
//! of more than `HELD_FILLS_MAX` (a replay's chunks, as a rule: by `COPY`); the rows that
//! change (portfolios, positions, marks, round trips) and the fills of a smaller batch (a live
//! one's, as a rule) are written by [`Projection::flush`], once per transaction,
//! all sent together: a replay applies several chunks per transaction, and a portfolio that
//! changes in each chunk is written once; a live batch's transaction is a few round trips.
//!
//! A round trip's row is written when it opens (its PnL and fees those of its first fill) and
//! when it closes (final); the fills in between change only the projector's fold, which a
//! projector that starts mid-trip sums again from the trades of the trip's symbol since it
//! opened. So a round trip costs two row writes, not one per fill, and the rows do not depend
//! on where batches began and ended.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ch_domain::event::{Side, TradeExecuted};
use ch_domain::Event;
use ch_runtime::envelope::StoredEvent;
use ch_runtime::pg::{exec, rows, CopyRows};
use ch_runtime::projector::Projection;
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use rust_decimal::Decimal;
use tokio_postgres::types::Type;

#[derive(Default)]
pub struct PortfolioProjection {
    kept: std::sync::Mutex<Option<Kept>>,
}

/// What a projector keeps between its batches: the rows of the portfolios it has folded, with
/// all of their positions and open round trips, and the marks, as of the event `seq`; until
/// the flush, also which of them changed. Valid for the next batch only if that batch follows
/// `seq` (a failed commit, a reset or another writer moves the checkpoint elsewhere, and the
/// rows are read again; a failed transaction's unflushed changes go with it).
struct Kept {
    seq: u64,
    /// History and prices are written and gone; the dirty sets (and fills held back for a
    /// live batch) are owed to the flush.
    fold: Fold,
}

/// Most portfolios kept between batches; beyond that, every batch reads its rows again.
const KEPT_MAX: usize = 100_000;

/// The projection's tables: what its reset empties, and what a query's snapshot locks before
/// it reads the checkpoint (see `queries::snapshot`).
pub const TABLES: &[&str] = &[
    "portfolios",
    "positions",
    "marks",
    "trades",
    "round_trips",
    "portfolio_strategies",
    "portfolio_history",
    "prices",
];

/// Most fills held back for the flush (a live batch's); more are appended by `COPY` at once.
const HELD_FILLS_MAX: usize = 1000;

/// Equity of a portfolio at the marks known now: cash plus each position at its mark, or at
/// its gross entry (average entry price) when it has none (DOMAIN.md).
pub const EQUITY_SQL: &str = "
    (SELECT pf.cash + COALESCE((
        SELECT sum(CASE WHEN m.price IS NULL THEN p.gross_entry ELSE p.quantity * m.price END)
        FROM positions p LEFT JOIN marks m ON m.symbol = p.symbol
        WHERE p.portfolio_id = pf.portfolio_id), 0)
     FROM portfolios pf WHERE pf.portfolio_id = $1)";

/// Places kept of the NAV index at flows.
const NAV_PLACES: u32 = 20;

/// `nav` grown by `to / from`: multiplied first (the figures of every earlier release), the
/// growth ratio first when that product overflows (a price far beyond any market's is
/// accepted up to Decimal's range); `None` when even the result does not fit. The NAV chain
/// of the projector, the performance query and the benchmark's monolith.
pub fn grow(nav: Decimal, to: Decimal, from: Decimal) -> Option<Decimal> {
    nav.checked_mul(to)
        .and_then(|grown| grown.checked_div(from))
        .or_else(|| to.checked_div(from).and_then(|r| nav.checked_mul(r)))
}

/// The NAV index chained over a sub-period that grew from `at_flow` to `before`. The fold's
/// arithmetic saturates, as the aggregate's does, and never panics: a panic would stop the
/// projector at the same event after every restart and in every rebuild.
fn chain_nav(nav: Decimal, before: Decimal, at_flow: Decimal) -> Decimal {
    grow(nav, before, at_flow)
        .unwrap_or(Decimal::MAX)
        .round_dp(NAV_PLACES)
}

#[derive(Debug, Clone)]
struct PortfolioRow {
    portfolio_id: String,
    user_id: String,
    name: String,
    quote_currency: String,
    fee_rate: Decimal,
    status: String,
    cash: Decimal,
    net_deposits: Decimal,
    realized_pnl: Decimal,
    fees_paid: Decimal,
    fill_count: i64,
    rejected_signals: i64,
    /// Closed round trips, and those with pnl > 0.
    trade_count: i64,
    win_count: i64,
    nav_at_flow: Decimal,
    equity_at_flow: Decimal,
    first_deposit_at: Option<DateTime<Utc>>,
    version: i64,
    opened_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_seq: i64,
    /// The stream sequence of the last strategy attach or detach (0: none).
    strategies_seq: i64,
}

#[derive(Debug, Clone, Copy)]
struct PositionRow {
    quantity: Decimal,
    cost_basis: Decimal,
    gross_entry: Decimal,
    /// The stream sequence of its last fill.
    last_fill_seq: i64,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    price: Decimal,
    at: DateTime<Utc>,
    seq: i64,
}

#[derive(Debug, Clone)]
struct Trip {
    /// Strategy of the sell that closed it.
    strategy_id: Option<String>,
    opened_seq: i64,
    opened_at: DateTime<Utc>,
    closed_at: Option<DateTime<Utc>>,
    pnl: Decimal,
    fees: Decimal,
}

enum Attachment {
    Attach(String, String, DateTime<Utc>),
    Detach(String, String),
}

/// The rows a batch touches, folded in memory.
#[derive(Default)]
struct Fold {
    portfolios: HashMap<String, PortfolioRow>,
    dirty_portfolios: BTreeSet<String>,
    /// Positions of the touched portfolios; `None` = deleted in this batch.
    positions: BTreeMap<(String, String), Option<PositionRow>>,
    dirty_positions: BTreeSet<(String, String)>,
    marks: HashMap<String, Mark>,
    dirty_marks: BTreeSet<String>,
    /// The open round trip per (portfolio, symbol), and trips changed in this batch.
    open_trips: HashMap<(String, String), Trip>,
    trips: BTreeMap<(String, String, i64), Trip>,
    trades: Vec<(TradeExecuted, DateTime<Utc>, i64)>,
    attachments: Vec<Attachment>,
    /// `portfolio_history` rows: state after each flow.
    history: Vec<HistoryRow>,
    /// `prices` rows: every price event.
    prices: Vec<(String, DateTime<Utc>, i64, Decimal)>,
}

struct HistoryRow {
    portfolio_id: String,
    seq: i64,
    at: DateTime<Utc>,
    cash: Decimal,
    positions: serde_json::Value,
    flow: Decimal,
}

impl Fold {
    /// The rows `events` touch: from `kept` where it has them, else from the database.
    async fn load(
        tx: &Transaction<'_>,
        events: &[StoredEvent],
        kept: Option<Kept>,
    ) -> Result<Fold, tokio_postgres::Error> {
        let have_marks = kept.is_some();
        let mut fold = kept.map_or_else(Fold::default, |k| k.fold);
        let ids: Vec<&str> = events
            .iter()
            .filter(|e| e.meta.aggregate_type == ch_domain::AggregateType::Portfolio)
            .map(|e| e.meta.aggregate_id.as_str())
            .filter(|id| !fold.portfolios.contains_key(*id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if ids.is_empty() && have_marks {
            return Ok(fold);
        }
        // Sent together: tokio-postgres pipelines concurrent queries on one connection.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
        let (portfolios, positions, trips, marks) = futures::try_join!(
            rows(
                tx,
                "SELECT * FROM portfolios WHERE portfolio_id = ANY($1)",
                &params
            ),
            rows(
                tx,
                "SELECT portfolio_id, symbol, quantity, cost_basis, gross_entry, last_fill_seq
                 FROM positions WHERE portfolio_id = ANY($1)",
                &params,
            ),
            // An open trip's row is as of its first fill: its PnL and fees so far are those of
            // the fills of its symbol since (every one of them belongs to it). Postgres sums
            // exactly; the fold saturates at a Decimal's range, and so do these sums (one
            // beyond it could not be read back, and every start would fail on it).
            rows(
                tx,
                "SELECT rt.portfolio_id, rt.symbol, rt.opened_seq, rt.opened_at,
                        GREATEST(LEAST(COALESCE(sum(t.realized_pnl) FILTER (WHERE t.side = 'sell'), 0),
                                       79228162514264337593543950335),
                                 -79228162514264337593543950335),
                        LEAST(COALESCE(sum(t.fee), 0), 79228162514264337593543950335)
                   FROM round_trips rt
                   JOIN trades t ON t.portfolio_id = rt.portfolio_id AND t.symbol = rt.symbol
                                AND t.stream_seq >= rt.opened_seq
                  WHERE rt.portfolio_id = ANY($1) AND rt.closed_at IS NULL
                  GROUP BY rt.portfolio_id, rt.symbol, rt.opened_seq, rt.opened_at",
                &params,
            ),
            // One row per symbol: small.
            async {
                if have_marks {
                    Ok(Vec::new())
                } else {
                    rows(tx, "SELECT symbol, price, at, last_seq FROM marks", &[]).await
                }
            },
        )?;
        for r in portfolios {
            let row = PortfolioRow {
                portfolio_id: r.get("portfolio_id"),
                user_id: r.get("user_id"),
                name: r.get("name"),
                quote_currency: r.get("quote_currency"),
                fee_rate: r.get("fee_rate"),
                status: r.get("status"),
                cash: r.get("cash"),
                net_deposits: r.get("net_deposits"),
                realized_pnl: r.get("realized_pnl"),
                fees_paid: r.get("fees_paid"),
                fill_count: r.get("fill_count"),
                rejected_signals: r.get("rejected_signals"),
                trade_count: r.get("trade_count"),
                win_count: r.get("win_count"),
                nav_at_flow: r.get("nav_at_flow"),
                equity_at_flow: r.get("equity_at_flow"),
                first_deposit_at: r.get("first_deposit_at"),
                version: r.get("version"),
                opened_at: r.get("opened_at"),
                updated_at: r.get("updated_at"),
                last_seq: r.get("last_seq"),
                strategies_seq: r.get("strategies_seq"),
            };
            fold.portfolios.insert(row.portfolio_id.clone(), row);
        }
        for r in positions {
            fold.positions.insert(
                (r.get(0), r.get(1)),
                Some(PositionRow {
                    quantity: r.get(2),
                    cost_basis: r.get(3),
                    gross_entry: r.get(4),
                    last_fill_seq: r.get(5),
                }),
            );
        }
        for r in trips {
            fold.open_trips.insert(
                (r.get(0), r.get(1)),
                Trip {
                    strategy_id: None,
                    opened_seq: r.get(2),
                    opened_at: r.get(3),
                    closed_at: None,
                    pnl: r.get(4),
                    fees: r.get(5),
                },
            );
        }
        for r in marks {
            fold.marks.insert(
                r.get(0),
                Mark {
                    price: r.get(1),
                    at: r.get(2),
                    seq: r.get(3),
                },
            );
        }
        Ok(fold)
    }

    /// Equity at the marks known at this point of the batch.
    fn equity(&self, p: &PortfolioRow) -> Decimal {
        let from = (p.portfolio_id.clone(), String::new());
        self.positions
            .range(from..)
            .take_while(|((pid, _), _)| *pid == p.portfolio_id)
            .filter_map(|((_, sym), pos)| pos.map(|pos| (sym, pos)))
            .fold(p.cash, |eq, (sym, pos)| {
                eq.saturating_add(
                    self.marks
                        .get(sym)
                        .map_or(pos.gross_entry, |m| pos.quantity.saturating_mul(m.price)),
                )
            })
    }

    /// Records the portfolio's cash and positions after the flow `ev` (a fill's row in
    /// `trades` carries the state after it).
    fn snapshot(&mut self, ev: &StoredEvent, flow: Decimal) {
        let id = &ev.meta.aggregate_id;
        let Some(p) = self.portfolios.get(id) else {
            return;
        };
        let from = (id.clone(), String::new());
        let positions: serde_json::Map<String, serde_json::Value> = self
            .positions
            .range(from..)
            .take_while(|((pid, _), _)| pid == id)
            .filter_map(|((_, sym), pos)| {
                pos.map(|pos| {
                    (
                        sym.clone(),
                        serde_json::json!({
                            "quantity": crate::plain(pos.quantity),
                            "cost_basis": crate::plain(pos.cost_basis),
                            "gross_entry": crate::plain(pos.gross_entry),
                        }),
                    )
                })
            })
            .collect();
        self.history.push(HistoryRow {
            portfolio_id: id.clone(),
            seq: ev.seq as i64,
            at: ev.meta.occurred_at,
            cash: p.cash,
            positions: serde_json::Value::Object(positions),
            flow,
        });
    }

    /// Moves the portfolio row's version and times; `f` changes the rest.
    fn touch(&mut self, ev: &StoredEvent, f: impl FnOnce(&mut PortfolioRow)) {
        let id = &ev.meta.aggregate_id;
        if let Some(p) = self.portfolios.get_mut(id) {
            p.version = ev.meta.aggregate_version as i64;
            p.updated_at = ev.meta.occurred_at;
            p.last_seq = ev.seq as i64;
            f(p);
            self.dirty_portfolios.insert(id.clone());
        }
    }

    fn flow(&mut self, ev: &StoredEvent, signed: Decimal, cash_after: Decimal) {
        let Some(p) = self.portfolios.get(&ev.meta.aggregate_id) else {
            return;
        };
        // Time-weighted chain (DOMAIN.md): value just before the flow, chain the sub-period.
        let before = self.equity(p);
        let at = ev.meta.occurred_at;
        self.touch(ev, |p| {
            if p.equity_at_flow > Decimal::ZERO {
                p.nav_at_flow = chain_nav(p.nav_at_flow, before, p.equity_at_flow);
            }
            p.equity_at_flow = before.saturating_add(signed);
            p.cash = cash_after;
            p.net_deposits = p.net_deposits.saturating_add(signed);
            if signed > Decimal::ZERO && p.first_deposit_at.is_none() {
                p.first_deposit_at = Some(at);
            }
        });
        self.snapshot(ev, signed);
    }

    fn trade(&mut self, ev: &StoredEvent, e: &TradeExecuted) {
        if !self.portfolios.contains_key(&e.portfolio_id) {
            return;
        }
        let at = ev.meta.occurred_at;
        let seq = ev.seq as i64;
        self.touch(ev, |p| {
            p.cash = e.cash_after;
            p.realized_pnl = p.realized_pnl.saturating_add(e.realized_pnl);
            p.fees_paid = p.fees_paid.saturating_add(e.fee);
            p.fill_count += 1;
        });
        let key = (e.portfolio_id.clone(), e.symbol.clone());
        let pos = (!e.position_after.is_zero()).then_some(PositionRow {
            quantity: e.position_after,
            cost_basis: e.cost_basis_after,
            gross_entry: e.gross_entry_after,
            last_fill_seq: seq,
        });
        self.positions.insert(key.clone(), pos);
        self.dirty_positions.insert(key.clone());
        self.trades.push((e.clone(), at, seq));
        // Round trips, flat to flat: a buy from flat opens one; sells add their realized PnL;
        // the sell that makes the position flat closes it.
        let trip = match (e.side, self.open_trips.remove(&key)) {
            (Side::Buy, None) => Some(Trip {
                strategy_id: None,
                opened_seq: seq,
                opened_at: at,
                closed_at: None,
                pnl: Decimal::ZERO,
                fees: e.fee,
            }),
            (Side::Buy, Some(mut t)) => {
                t.fees = t.fees.saturating_add(e.fee);
                Some(t)
            }
            (Side::Sell, Some(mut t)) => {
                t.pnl = t.pnl.saturating_add(e.realized_pnl);
                t.fees = t.fees.saturating_add(e.fee);
                if e.position_after.is_zero() {
                    t.closed_at = Some(at);
                    t.strategy_id = Some(e.strategy_id.clone());
                }
                Some(t)
            }
            (Side::Sell, None) => None,
        };
        if let Some(t) = trip {
            // Written when it opens (as of its first fill) and when it closes: in between, its
            // row does not change (the projector folds its fills; `Fold::load` sums them again).
            let opened = t.opened_seq == seq;
            if opened || t.closed_at.is_some() {
                self.trips
                    .insert((key.0.clone(), key.1.clone(), t.opened_seq), t.clone());
            }
            if t.closed_at.is_none() {
                self.open_trips.insert(key, t);
            } else if let Some(p) = self.portfolios.get_mut(&e.portfolio_id) {
                // Closed by this fill (a closed trip is never touched again).
                p.trade_count += 1;
                p.win_count += i64::from(t.pnl > Decimal::ZERO);
            }
        }
    }

    fn apply(&mut self, ev: &StoredEvent) {
        let at = ev.meta.occurred_at;
        match &ev.event {
            Event::PortfolioOpened(e) => {
                if !self.portfolios.contains_key(&e.portfolio_id) {
                    self.portfolios.insert(
                        e.portfolio_id.clone(),
                        PortfolioRow {
                            portfolio_id: e.portfolio_id.clone(),
                            user_id: e.user_id.clone(),
                            name: e.name.clone(),
                            quote_currency: e.quote_currency.clone(),
                            fee_rate: e.fee_rate,
                            status: "open".into(),
                            cash: Decimal::ZERO,
                            net_deposits: Decimal::ZERO,
                            realized_pnl: Decimal::ZERO,
                            fees_paid: Decimal::ZERO,
                            fill_count: 0,
                            rejected_signals: 0,
                            trade_count: 0,
                            win_count: 0,
                            nav_at_flow: Decimal::ONE,
                            equity_at_flow: Decimal::ZERO,
                            first_deposit_at: None,
                            version: ev.meta.aggregate_version as i64,
                            opened_at: at,
                            updated_at: at,
                            last_seq: ev.seq as i64,
                            strategies_seq: 0,
                        },
                    );
                    self.dirty_portfolios.insert(e.portfolio_id.clone());
                }
            }
            Event::FundsDeposited(e) => self.flow(ev, e.amount, e.cash_after),
            Event::FundsWithdrawn(e) => self.flow(ev, -e.amount, e.cash_after),
            Event::PortfolioRenamed(e) => self.touch(ev, |p| p.name = e.name.clone()),
            Event::StrategyAttached(e) => {
                self.attachments.push(Attachment::Attach(
                    e.portfolio_id.clone(),
                    e.strategy_id.clone(),
                    at,
                ));
                self.touch(ev, |p| p.strategies_seq = ev.seq as i64);
            }
            Event::StrategyDetached(e) => {
                self.attachments.push(Attachment::Detach(
                    e.portfolio_id.clone(),
                    e.strategy_id.clone(),
                ));
                self.touch(ev, |p| p.strategies_seq = ev.seq as i64);
            }
            Event::PortfolioClosed(_) => self.touch(ev, |p| p.status = "closed".into()),
            Event::TradeSignalRejected(_) => self.touch(ev, |p| p.rejected_signals += 1),
            Event::TradeExecuted(e) => self.trade(ev, e),
            Event::MarketPriceRecorded(e) => {
                self.prices
                    .push((e.symbol.clone(), at, ev.seq as i64, e.price));
                let newer = self.marks.get(&e.symbol).is_none_or(|m| m.at <= at);
                if newer {
                    self.marks.insert(
                        e.symbol.clone(),
                        Mark {
                            price: e.price,
                            at,
                            seq: ev.seq as i64,
                        },
                    );
                    self.dirty_marks.insert(e.symbol.clone());
                }
            }
            Event::StrategyCreated(_) | Event::StrategyUpdated(_) | Event::StrategyDeleted(_) => {}
        }
    }

    /// Writes the changed rows and the fills held back (the flush), and forgets them.
    async fn write_state(&mut self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        // Independent tables: sent together (pipelined), one round trip for all of them.
        futures::try_join!(
            self.write_portfolios(tx),
            self.write_positions(tx),
            self.write_marks(tx),
            self.write_trips(tx),
            self.insert_trades(tx),
        )?;
        self.trades.clear();
        // Positions closed since the last flush are the only `None`s (and all dirty): drop
        // those rather than walk every kept position.
        for key in std::mem::take(&mut self.dirty_positions) {
            if matches!(self.positions.get(&key), Some(None)) {
                self.positions.remove(&key);
            }
        }
        self.dirty_portfolios.clear();
        self.dirty_marks.clear();
        self.trips.clear();
        Ok(())
    }

    /// Appends the batch's history and prices (COPY one after the other), and its fills unless
    /// `hold_fills` (the flush inserts them then), and writes its attachments; then forgets them.
    async fn write_appended(
        &mut self,
        tx: &Transaction<'_>,
        hold_fills: bool,
    ) -> Result<(), tokio_postgres::Error> {
        if !hold_fills {
            self.write_trades(tx).await?;
            self.trades.clear();
        }
        self.write_history(tx).await?;
        self.history.clear();
        self.prices.clear();
        self.write_attachments(tx).await
    }

    /// The batch's attachments and detachments, two statements for all of them: in stream
    /// order, a detachment removes the pair and an attachment adds it unless it is there (the
    /// first attachment since the last detachment keeps its time), so each pair ends deleted,
    /// inserted, or both (detached, then attached again).
    async fn write_attachments(
        &mut self,
        tx: &Transaction<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        if self.attachments.is_empty() {
            return Ok(());
        }
        /// A pair's net change in this batch.
        #[derive(Default)]
        struct Net {
            detached: bool,
            /// The first attachment since the last detachment.
            attached: Option<DateTime<Utc>>,
        }
        let mut pairs: BTreeMap<(String, String), Net> = BTreeMap::new();
        for a in std::mem::take(&mut self.attachments) {
            match a {
                Attachment::Attach(p, s, at) => {
                    pairs.entry((p, s)).or_default().attached.get_or_insert(at);
                }
                Attachment::Detach(p, s) => {
                    let net = pairs.entry((p, s)).or_default();
                    (net.detached, net.attached) = (true, None);
                }
            }
        }
        let (mut del_p, mut del_s, mut ins_p, mut ins_s, mut ins_at) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((p, s), net) in &pairs {
            if net.detached {
                del_p.push(p.as_str());
                del_s.push(s.as_str());
            }
            if let Some(at) = &net.attached {
                ins_p.push(p.as_str());
                ins_s.push(s.as_str());
                ins_at.push(*at);
            }
        }
        if !del_p.is_empty() {
            exec(
                tx,
                "DELETE FROM portfolio_strategies ps
                 USING UNNEST($1::text[], $2::text[]) AS d(portfolio_id, strategy_id)
                 WHERE ps.portfolio_id = d.portfolio_id AND ps.strategy_id = d.strategy_id",
                &[&del_p, &del_s],
            )
            .await?;
        }
        if !ins_p.is_empty() {
            exec(
                tx,
                "INSERT INTO portfolio_strategies (portfolio_id, strategy_id, attached_at)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[])
                 ON CONFLICT DO NOTHING",
                &[&ins_p, &ins_s, &ins_at],
            )
            .await?;
        }
        Ok(())
    }

    async fn write_portfolios(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.dirty_portfolios.is_empty() {
            return Ok(());
        }
        let rows: Vec<&PortfolioRow> = self
            .dirty_portfolios
            .iter()
            .filter_map(|id| self.portfolios.get(id))
            .collect();
        macro_rules! col {
            ($f:ident) => {
                rows.iter().map(|r| r.$f.clone()).collect::<Vec<_>>()
            };
        }
        exec(
            tx,
            "INSERT INTO portfolios (portfolio_id, user_id, name, quote_currency, fee_rate, status, cash,
                 net_deposits, realized_pnl, fees_paid, fill_count, rejected_signals, nav_at_flow,
                 equity_at_flow, first_deposit_at, version, opened_at, updated_at, last_seq,
                 trade_count, win_count, strategies_seq)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                 $6::text[], $7::numeric[], $8::numeric[], $9::numeric[], $10::numeric[], $11::int8[],
                 $12::int8[], $13::numeric[], $14::numeric[], $15::timestamptz[], $16::int8[],
                 $17::timestamptz[], $18::timestamptz[], $19::int8[], $20::int8[], $21::int8[],
                 $22::int8[])
             ON CONFLICT (portfolio_id) DO UPDATE SET
                 name = EXCLUDED.name, status = EXCLUDED.status, cash = EXCLUDED.cash,
                 net_deposits = EXCLUDED.net_deposits, realized_pnl = EXCLUDED.realized_pnl,
                 fees_paid = EXCLUDED.fees_paid, fill_count = EXCLUDED.fill_count,
                 trade_count = EXCLUDED.trade_count, win_count = EXCLUDED.win_count,
                 rejected_signals = EXCLUDED.rejected_signals, nav_at_flow = EXCLUDED.nav_at_flow,
                 equity_at_flow = EXCLUDED.equity_at_flow, first_deposit_at = EXCLUDED.first_deposit_at,
                 version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, last_seq = EXCLUDED.last_seq,
                 strategies_seq = EXCLUDED.strategies_seq",
            &[
                &col!(portfolio_id),
                &col!(user_id),
                &col!(name),
                &col!(quote_currency),
                &col!(fee_rate),
                &col!(status),
                &col!(cash),
                &col!(net_deposits),
                &col!(realized_pnl),
                &col!(fees_paid),
                &col!(fill_count),
                &col!(rejected_signals),
                &col!(nav_at_flow),
                &col!(equity_at_flow),
                &col!(first_deposit_at),
                &col!(version),
                &col!(opened_at),
                &col!(updated_at),
                &col!(last_seq),
                &col!(trade_count),
                &col!(win_count),
                &col!(strategies_seq),
            ],
        )
        .await?;
        Ok(())
    }

    async fn write_positions(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        let (mut del_p, mut del_s) = (Vec::new(), Vec::new());
        let (mut up_p, mut up_s, mut q, mut c, mut g, mut last) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for key in &self.dirty_positions {
            match self.positions.get(key).copied().flatten() {
                None => {
                    del_p.push(key.0.as_str());
                    del_s.push(key.1.as_str());
                }
                Some(pos) => {
                    up_p.push(key.0.as_str());
                    up_s.push(key.1.as_str());
                    q.push(pos.quantity);
                    c.push(pos.cost_basis);
                    g.push(pos.gross_entry);
                    last.push(pos.last_fill_seq);
                }
            }
        }
        if !del_p.is_empty() {
            exec(
                tx,
                "DELETE FROM positions p USING UNNEST($1::text[], $2::text[]) AS d(portfolio_id, symbol)
                 WHERE p.portfolio_id = d.portfolio_id AND p.symbol = d.symbol",
                &[&del_p, &del_s],
            )
            .await?;
        }
        if !up_p.is_empty() {
            exec(
                tx,
                "INSERT INTO positions (portfolio_id, symbol, quantity, cost_basis, gross_entry,
                                        last_fill_seq)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::numeric[], $4::numeric[],
                                      $5::numeric[], $6::bigint[])
                 ON CONFLICT (portfolio_id, symbol) DO UPDATE SET quantity = EXCLUDED.quantity,
                     cost_basis = EXCLUDED.cost_basis, gross_entry = EXCLUDED.gross_entry,
                     last_fill_seq = EXCLUDED.last_fill_seq",
                &[&up_p, &up_s, &q, &c, &g, &last],
            )
            .await?;
        }
        Ok(())
    }

    async fn write_marks(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.dirty_marks.is_empty() {
            return Ok(());
        }
        let syms: Vec<&str> = self.dirty_marks.iter().map(String::as_str).collect();
        let marks: Vec<&Mark> = self.dirty_marks.iter().map(|s| &self.marks[s]).collect();
        let prices: Vec<Decimal> = marks.iter().map(|m| m.price).collect();
        let ats: Vec<DateTime<Utc>> = marks.iter().map(|m| m.at).collect();
        let seqs: Vec<i64> = marks.iter().map(|m| m.seq).collect();
        exec(
            tx,
            "INSERT INTO marks (symbol, price, at, last_seq)
             SELECT * FROM UNNEST($1::text[], $2::numeric[], $3::timestamptz[], $4::int8[])
             ON CONFLICT (symbol) DO UPDATE SET price = EXCLUDED.price, at = EXCLUDED.at,
                 last_seq = EXCLUDED.last_seq",
            &[&syms, &prices, &ats, &seqs],
        )
        .await?;
        Ok(())
    }

    /// Fills are appended with binary COPY: each event is applied exactly once (its sequence
    /// is above the checkpoint moved in the same transaction), so no conflict handling is needed.
    async fn write_trades(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.trades.is_empty() {
            return Ok(());
        }
        const TYPES: &[Type] = &[
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::TIMESTAMPTZ,
            Type::INT8,
        ];
        let mut copy = CopyRows::new(TYPES, self.trades.len());
        for (e, at, seq) in &self.trades {
            copy.push(&[
                &e.trade_id,
                &e.portfolio_id,
                &e.strategy_id,
                &e.symbol,
                &e.side.as_str(),
                &e.quantity,
                &e.price,
                &e.fee,
                &e.realized_pnl,
                &e.cash_after,
                &e.position_after,
                &e.cost_basis_after,
                &e.gross_entry_after,
                at,
                seq,
            ]);
        }
        copy.send(
            tx,
            "COPY trades (trade_id, portfolio_id, strategy_id, symbol, side, quantity, price, fee,
                          realized_pnl, cash_after, position_after, cost_basis_after,
                          gross_entry_after, at, stream_seq)
             FROM STDIN BINARY",
        )
        .await?;
        Ok(())
    }

    /// Fills held back for the flush: one prepared `INSERT ... UNNEST`, which goes out with the
    /// flush's other statements (a `COPY` costs round trips of its own: worth it for a replay's
    /// thousands of fills, not for a live batch's few dozen).
    async fn insert_trades(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.trades.is_empty() {
            return Ok(());
        }
        macro_rules! col {
            ($f:expr) => {
                self.trades.iter().map($f).collect::<Vec<_>>()
            };
        }
        exec(
            tx,
            "INSERT INTO trades (trade_id, portfolio_id, strategy_id, symbol, side, quantity, price,
                 fee, realized_pnl, cash_after, position_after, cost_basis_after, gross_entry_after,
                 at, stream_seq)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                 $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[], $10::numeric[],
                 $11::numeric[], $12::numeric[], $13::numeric[], $14::timestamptz[], $15::int8[])",
            &[
                &col!(|(e, _, _)| e.trade_id),
                &col!(|(e, _, _)| e.portfolio_id.as_str()),
                &col!(|(e, _, _)| e.strategy_id.as_str()),
                &col!(|(e, _, _)| e.symbol.as_str()),
                &col!(|(e, _, _)| e.side.as_str()),
                &col!(|(e, _, _)| e.quantity),
                &col!(|(e, _, _)| e.price),
                &col!(|(e, _, _)| e.fee),
                &col!(|(e, _, _)| e.realized_pnl),
                &col!(|(e, _, _)| e.cash_after),
                &col!(|(e, _, _)| e.position_after),
                &col!(|(e, _, _)| e.cost_basis_after),
                &col!(|(e, _, _)| e.gross_entry_after),
                &col!(|(_, at, _)| *at),
                &col!(|(_, _, seq)| *seq),
            ],
        )
        .await?;
        Ok(())
    }

    /// History and prices are append-only too: binary COPY (see [`Fold::write_trades`]).
    async fn write_history(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if !self.history.is_empty() {
            const TYPES: &[Type] = &[
                Type::TEXT,
                Type::INT8,
                Type::TIMESTAMPTZ,
                Type::NUMERIC,
                Type::JSONB,
                Type::NUMERIC,
            ];
            let mut copy = CopyRows::new(TYPES, self.history.len());
            for r in &self.history {
                copy.push(&[
                    &r.portfolio_id,
                    &r.seq,
                    &r.at,
                    &r.cash,
                    &r.positions,
                    &r.flow,
                ]);
            }
            copy.send(
                tx,
                "COPY portfolio_history (portfolio_id, stream_seq, at, cash, positions, flow)
                 FROM STDIN BINARY",
            )
            .await?;
        }
        if !self.prices.is_empty() {
            const TYPES: &[Type] = &[Type::TEXT, Type::TIMESTAMPTZ, Type::INT8, Type::NUMERIC];
            let mut copy = CopyRows::new(TYPES, self.prices.len());
            for (sym, at, seq, price) in &self.prices {
                copy.push(&[sym, at, seq, price]);
            }
            copy.send(
                tx,
                "COPY prices (symbol, at, stream_seq, price) FROM STDIN BINARY",
            )
            .await?;
        }
        Ok(())
    }

    async fn write_trips(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.trips.is_empty() {
            return Ok(());
        }
        let keys: Vec<&(String, String, i64)> = self.trips.keys().collect();
        let trips: Vec<&Trip> = self.trips.values().collect();
        let pids: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let syms: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let seqs: Vec<i64> = keys.iter().map(|k| k.2).collect();
        let opened: Vec<DateTime<Utc>> = trips.iter().map(|t| t.opened_at).collect();
        let closed: Vec<Option<DateTime<Utc>>> = trips.iter().map(|t| t.closed_at).collect();
        let pnl: Vec<Decimal> = trips.iter().map(|t| t.pnl).collect();
        let fees: Vec<Decimal> = trips.iter().map(|t| t.fees).collect();
        let strategies: Vec<Option<&str>> =
            trips.iter().map(|t| t.strategy_id.as_deref()).collect();
        exec(
            tx,
            "INSERT INTO round_trips (portfolio_id, symbol, opened_seq, opened_at, closed_at, pnl, fees,
                                      strategy_id)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::timestamptz[],
                 $5::timestamptz[], $6::numeric[], $7::numeric[], $8::text[])
             ON CONFLICT (portfolio_id, symbol, opened_seq) DO UPDATE SET closed_at = EXCLUDED.closed_at,
                 pnl = EXCLUDED.pnl, fees = EXCLUDED.fees, strategy_id = EXCLUDED.strategy_id",
            &[&pids, &syms, &seqs, &opened, &closed, &pnl, &fees, &strategies],
        )
        .await?;
        Ok(())
    }
}

impl PortfolioProjection {
    fn take_kept(&self) -> Option<Kept> {
        self.kept.lock().expect("kept rows lock poisoned").take()
    }
}

impl Projection for PortfolioProjection {
    fn name(&self) -> &'static str {
        "portfolio"
    }

    fn consumer_json(&self) -> &'static str {
        ch_runtime::eventstore::CONSUMER_PORTFOLIO_JSON
    }

    fn schema_known(&self) -> Option<i32> {
        crate::newest_migration()
    }

    async fn apply_batch(
        &self,
        tx: &Transaction<'_>,
        events: &[StoredEvent],
        after: u64,
    ) -> Result<(), tokio_postgres::Error> {
        let t0 = std::time::Instant::now();
        let kept = self.take_kept().filter(|k| k.seq == after);
        let reused = kept.as_ref().map_or(0, |k| k.fold.portfolios.len());
        let mut fold = Fold::load(tx, events, kept).await?;
        let loaded = t0.elapsed();
        for ev in events {
            fold.apply(ev);
        }
        let folded = t0.elapsed();
        let keep = fold.portfolios.len() <= KEPT_MAX;
        // A small batch's fills (a live one's) go out with the flush; a large one's (a
        // replay chunk's), by COPY now.
        let hold_fills = keep && fold.trades.len() <= HELD_FILLS_MAX;
        fold.write_appended(tx, hold_fills).await?;
        if !keep {
            // Too many to keep: the changed rows go now, and the next batch reads them again.
            fold.write_state(tx).await?;
        }
        tracing::debug!(
            events = events.len(),
            kept_portfolios = reused,
            load_us = loaded.as_micros() as u64,
            fold_us = (folded - loaded).as_micros() as u64,
            write_us = (t0.elapsed() - folded).as_micros() as u64,
            "portfolio batch"
        );
        let seq = events.last().map_or(after, |e| e.seq);
        *self.kept.lock().expect("kept rows lock poisoned") = keep.then_some(Kept { seq, fold });
        Ok(())
    }

    async fn flush(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        // Taken while writing: should the write fail, the transaction fails with it, and the
        // next batch reads the rows again.
        let Some(mut kept) = self.take_kept() else {
            return Ok(());
        };
        let t0 = std::time::Instant::now();
        let rows = kept.fold.dirty_portfolios.len();
        kept.fold.write_state(tx).await?;
        tracing::debug!(
            portfolios = rows,
            write_us = t0.elapsed().as_micros() as u64,
            "portfolio flush"
        );
        *self.kept.lock().expect("kept rows lock poisoned") = Some(kept);
        Ok(())
    }

    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        drop(self.take_kept());
        tx.batch_execute(&format!("TRUNCATE {}", TABLES.join(", ")))
            .await
    }
}

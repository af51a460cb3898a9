//! The exit-trigger worker (DOMAIN.md, "Exit triggers"): follows market prices and sends the
//! sell of a position whose stop loss, take profit or trailing stop fires, through the same
//! command path as any client (`<prefix>.cmd.signal.execute`). The decision is pure
//! ([`ch_domain::exits`]); this module gathers its facts from the read model and sends.
//!
//! For each `MarketPriceRecorded` (durable pull consumer `exit_triggers` on
//! `<prefix>.events.market.>`, `nats/consumers/exit_triggers.json`, explicit acks):
//!
//! 1. wait (bounded) until the `portfolio` and `strategy` read models applied the event's stream
//!    sequence `S` (progress announcements, [`Progress::wait_for`]);
//! 2. query, in one snapshot, the open positions in the symbol with their open round trip and
//!    the portfolio's active strategies, and where the exit rule has a trailing stop the
//!    position after each fill of the trip with the highest price while so held (`prices`
//!    from the fill on by business time, `stream_seq <= S`: the same on every replica and
//!    after restarts; the stop's activation counts against the entry of its time, and it
//!    trails the high since then), kept from one price of the symbol to the next
//!    ([`SpanCache`]: each price then costs a step per position, not a scan of the prices the
//!    trip held); a price older than the trip is not evaluated for it, nor
//!    for a position a fill stored after the price has changed (evaluated late, the price
//!    is older than what the position holds; the next price judges it);
//! 3. if some exit fires, skip the price anyway when it is a backfill: a price of the symbol
//!    stored before it (`stream_seq < S`) is later in business time, so it is not the mark;
//! 4. for a position whose exit fires: catch up with the portfolio (wait until the read model
//!    applied the last event of its subject), decide again on that state, and send the sell of
//!    the whole position at the triggering mark with the deterministic `command_id`, the
//!    price event's id as `causation_id` and the portfolio's `expected_version`. A re-sent
//!    `command_id` is answered with the first result (`"duplicate": true`); a `conflict`
//!    (another exit or trade got in first) means: catch up and decide again, so a round trip
//!    is sold once even when two different triggers race;
//! 5. ack. Trouble (a read model behind, the command side unreachable) naks the price for a
//!    redelivery, which decides the same again.
//!
//! The durable hands out one price at a time (`max_ack_pending` 1): the next only once the one
//! before is acked, whichever worker holds it, so prices are judged in stream order across
//! replicas (which take turns), restarts and redeliveries (a price given back, or held by a
//! worker that died, comes again before any later one; a take-profit price is never overtaken
//! by the stop-loss price after it). A round trip is sold once either way. Which rule applies
//! and the priority of triggers are documented in [`ch_domain::exits`].
//!
//! The sell carries the price's business time as `at` (the fill happened at that mark); if the
//! portfolio has already moved past it (`bad_request`), it is sent without `at` (now).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::AckKind;
use async_nats::Message;
use ch_domain::event::MarketPriceRecorded;
use ch_domain::exits::{
    decide_exit, needs_history, AttachedStrategy, EntrySpan, ExitDecision, PositionFacts, Trip,
};
use ch_domain::strategy::{RiskProfile, StrategyRule};
use ch_domain::{AggregateType, Event};
use ch_runtime::app::App;
use ch_runtime::envelope;
use ch_runtime::error::{ApiError, DbError, StoreError};
use ch_runtime::query::{Progress, Reached};
use ch_runtime::service::{self, Handler};
use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_postgres::Pool;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{plain, queries};

/// `nats/consumers/exit_triggers.json`, usable with `nats consumer add --config`.
pub const CONSUMER_JSON: &str = include_str!("../../../nats/consumers/exit_triggers.json");
/// The shipped durable consumer name.
pub const DURABLE: &str = "exit_triggers";
/// The worker's name: service `<prefix>-exit-triggers`.
pub const WORKER: &str = "exit-triggers";

/// How often a worker that found the stream made anew looks whether the read models are
/// folded from it...
const FOLDED_LOOK: Duration = Duration::from_millis(200);
/// ...and every this many looks, whether the stream was made anew once more.
const STREAM_LOOK_EVERY: u32 = 5;

/// How [`Worker::wait_for_read_models_of`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// The read models follow the stream: its prices can be judged.
    Folded,
    /// The stream was made anew once more meanwhile: the consumer is to be made again.
    StreamChanged,
    Shutdown,
}

/// Bound of the wait for the read models to reach a price (then the price is redelivered).
const READ_MODEL_WAIT: Duration = Duration::from_secs(10);
/// Bound of one sell request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Tries to send one exit (each after catching up) before giving the price back.
const MAX_ATTEMPTS: u32 = 8;
/// How long one pull request for the next price waits on the server. A price at a time: a
/// worker never holds a price it is not evaluating, so a stopping one waits out at most this
/// (giving back what comes) rather than leaving a price to the ack wait (30 s), behind which
/// every later price would wait (the durable hands out one at a time).
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// While a price is evaluated (waits of up to `READ_MODEL_WAIT`, sells of up to
/// `REQUEST_TIMEOUT`, `MAX_ATTEMPTS` of them, may outlast the consumer's 30 s ack wait), the
/// worker tells the server it is still at it this often: else the price would go to a replica
/// meanwhile, and the next one after it, judged beside it.
const IN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// `<prefix>.admin.exit-triggers.status`.
pub fn status_subject(prefix: &str) -> String {
    format!("{prefix}.admin.{WORKER}.status")
}

/// The durable consumer definition for a prefix: the JSON with the filter on the market
/// subjects, under `durable`.
///
/// # Errors
/// [`StoreError::Other`] if the compiled-in JSON is invalid.
pub fn consumer_config(prefix: &str, durable: &str) -> Result<pull::Config, StoreError> {
    let mut cfg: pull::Config = serde_json::from_str(CONSUMER_JSON)
        .map_err(|e| StoreError::Other(format!("exit_triggers.json: {e}")))?;
    cfg.filter_subject = format!("{prefix}.events.market.>");
    cfg.durable_name = Some(durable.to_owned());
    Ok(cfg)
}

/// The read models the worker reads: it waits for them, and reads them in one snapshot.
const READ_MODELS: [&str; 2] = ["portfolio", "strategy"];

/// Figures of the worker (status reply and `$SRV.STATS` gauges).
#[derive(Default)]
struct Counters {
    prices: AtomicU64,
    backfills_skipped: AtomicU64,
    triggers: AtomicU64,
    sells_executed: AtomicU64,
    sells_rejected: AtomicU64,
    duplicates: AtomicU64,
    conflicts: AtomicU64,
    retries: AtomicU64,
    last_seq: AtomicU64,
}

impl Counters {
    fn json(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "prices": g(&self.prices),
            "backfills_skipped": g(&self.backfills_skipped),
            "triggers": g(&self.triggers),
            "sells_executed": g(&self.sells_executed),
            "sells_rejected": g(&self.sells_rejected),
            "duplicates": g(&self.duplicates),
            "conflicts": g(&self.conflicts),
            "retries": g(&self.retries),
            "last_seq": g(&self.last_seq),
        })
    }
}

/// One open position in the priced symbol, with what its exit needs.
#[derive(Debug, Clone)]
struct Candidate {
    portfolio_id: String,
    version: u64,
    trip: Trip,
    facts: PositionFacts,
    strategies: Vec<AttachedStrategy>,
}

impl Candidate {
    /// Its round trip as the [`SpanCache`] keeps it: (portfolio, opening sequence).
    fn key(&self) -> (String, u64) {
        (self.portfolio_id.clone(), self.trip.opened_seq)
    }
}

/// A price to evaluate.
#[derive(Debug, Clone)]
struct Price {
    seq: u64,
    /// The symbol's version with this price: consecutive prices of a symbol go 1 apart.
    version: u64,
    /// The price event's id: the sell's `causation_id`.
    event_id: uuid::Uuid,
    symbol: String,
    price: Decimal,
    at: DateTime<Utc>,
}

/// Why a price goes back for a redelivery.
#[derive(Debug)]
struct Retry(String);

impl<E: std::fmt::Display> From<E> for Retry {
    fn from(e: E) -> Self {
        Retry(e.to_string())
    }
}

struct Worker {
    app: App,
    pool: Pool,
    progress: Progress,
    durable: String,
    counters: Counters,
    spans: std::sync::Mutex<SpanCache>,
    /// Holding the prices back until the read models follow the stream there now (see
    /// [`Worker::wait_for_read_models_of`]): in the status.
    waiting_for_read_models: std::sync::atomic::AtomicBool,
}

/// A fill's place in the stream, as prices are sorted against it: business time, then stream
/// sequence.
type Place = (DateTime<Utc>, u64);

/// One [`EntrySpan`] of a cached round trip, with its bounds: the prices in `[from, to)` (`to`
/// `None`: the span of the last fill, open) count for its high.
#[derive(Debug, Clone, PartialEq)]
struct Span {
    from: Place,
    to: Option<Place>,
    entry: EntrySpan,
}

/// The trailing-stop spans of open round trips, kept between prices: each price of the symbol
/// then costs a step per round trip instead of [`SPANS_SQL`]'s scan of every price the trip
/// held (a price a second over a day of holding is 86,400 rows per position per price). Valid
/// for a symbol as of one price (its version): the next price of the symbol (the version after)
/// is added to the span its place falls in, as the query would count it; any gap (a price
/// another replica evaluated, a restart) reads them again. A round trip is kept with the
/// portfolio's version it was read at: another version (a fill, anything) reads it again.
#[derive(Default)]
struct SpanCache {
    symbols: HashMap<String, SymbolSpans>,
}

#[derive(Default)]
struct SymbolSpans {
    /// The symbol's version of the last price counted.
    as_of: u64,
    /// By (portfolio, the round trip's opening sequence): the portfolio's version, the spans.
    trips: HashMap<(String, u64), (u64, Vec<Span>)>,
}

impl SpanCache {
    /// Counts `p` in the cached spans of its symbol when it is the next price of the symbol;
    /// forgets them on a gap; nothing when counted already (a redelivery).
    fn advance(&mut self, p: &Price) {
        let symbol = self.symbols.entry(p.symbol.clone()).or_default();
        if symbol.as_of == p.version {
            return;
        }
        if symbol.as_of + 1 != p.version {
            symbol.trips.clear();
        } else {
            for (_, spans) in symbol.trips.values_mut() {
                count_price(spans, (p.at, p.seq), p.price);
            }
        }
        symbol.as_of = p.version;
    }

    /// The spans of a round trip read as of `p` at the portfolio's `version`, if kept.
    fn get(&self, p: &Price, trip: &(String, u64), version: u64) -> Option<Vec<EntrySpan>> {
        let symbol = self
            .symbols
            .get(&p.symbol)
            .filter(|s| s.as_of == p.version)?;
        let (_, spans) = symbol.trips.get(trip).filter(|(v, _)| *v == version)?;
        Some(spans.iter().map(|s| s.entry.clone()).collect())
    }

    /// Keeps a round trip's spans read as of `p`.
    fn put(&mut self, p: &Price, trip: (String, u64), version: u64, spans: Vec<Span>) {
        let symbol = self.symbols.entry(p.symbol.clone()).or_default();
        if symbol.as_of != p.version {
            symbol.trips.clear();
            symbol.as_of = p.version;
        }
        symbol.trips.insert(trip, (version, spans));
    }

    /// Drops the round trips of `p`'s symbol not in `open` (closed, or no longer trailing).
    fn retain(&mut self, p: &Price, open: &std::collections::HashSet<(String, u64)>) {
        if let Some(symbol) = self.symbols.get_mut(&p.symbol) {
            symbol.trips.retain(|trip, _| open.contains(trip));
        }
    }
}

/// Counts a price at `place` in the span it falls in (none before the first fill).
fn count_price(spans: &mut [Span], place: Place, price: Decimal) {
    if let Some(span) = spans
        .iter_mut()
        .find(|s| s.from <= place && s.to.is_none_or(|to| place < to))
    {
        span.entry.high = Some(span.entry.high.map_or(price, |h| h.max(price)));
    }
}

/// The positions in `symbol` open at the price (business time `$2`, stream sequence `$3`)
/// whose round trip opened before it (by business time, then stream sequence), that no fill
/// stored after the price has changed since, and whose portfolio attached, detached, or had
/// updated or deleted, no strategy after it. The read models hold positions and rules as they
/// are now: a price evaluated late (the worker down or behind) would otherwise judge, and sell
/// at its old mark, a position it never marked, or by rules written later, where a worker
/// keeping up had not; the next price judges them. One portfolio's only when `portfolio_id` is
/// given.
const CANDIDATES_SQL: &str = "
    SELECT p.portfolio_id, p.quantity, p.gross_entry, po.version, t.opened_seq, p.last_fill_seq
      FROM positions p
      JOIN portfolios po ON po.portfolio_id = p.portfolio_id
      JOIN LATERAL (SELECT opened_seq, opened_at FROM round_trips rt
                     WHERE rt.portfolio_id = p.portfolio_id AND rt.symbol = p.symbol
                       AND rt.closed_at IS NULL
                     ORDER BY rt.opened_seq DESC LIMIT 1) t ON true
     WHERE p.symbol = $1 AND p.quantity > 0 AND po.status = 'open'
       AND (t.opened_at, t.opened_seq) < ($2::timestamptz, $3::bigint)
       AND p.last_fill_seq <= $3 AND po.strategies_seq <= $3
       AND NOT EXISTS (SELECT 1 FROM portfolio_strategies ps
                         JOIN strategies s ON s.strategy_id = ps.strategy_id
                        WHERE ps.portfolio_id = p.portfolio_id AND s.last_seq > $3)
       AND ($4::text IS NULL OR p.portfolio_id = $4)
     ORDER BY p.portfolio_id";

/// For the trailing stop, of the round trips in `symbol` of the portfolios `$3` opened at the
/// stream sequences `$4`: the position after each fill and the highest price from that fill
/// to the next (prices stored at or before the price, `$2`), with each fill's place (business
/// time, sequence). A price recorded just before a fill at the same business time belongs to
/// the entry before the fill; the row comparisons are the bounds of a range scan of the
/// prices' key. (A price stored before but later in business time than the one evaluated
/// counts too: the evaluated one is then a backfill, which sells nothing whatever fires; so a
/// [`SpanCache`] that counts each next price reads the same as this query would.)
const SPANS_SQL: &str = "
    SELECT c.portfolio_id, e.quantities, e.gross_entries, e.highs, e.ats, e.seqs
      FROM unnest($3::text[], $4::bigint[]) AS c(portfolio_id, opened_seq)
      CROSS JOIN LATERAL (
          SELECT array_agg(f.position_after ORDER BY f.stream_seq) AS quantities,
                 array_agg(f.gross_entry_after ORDER BY f.stream_seq) AS gross_entries,
                 array_agg((SELECT max(pr.price) FROM prices pr
                             WHERE pr.symbol = $1
                               AND (pr.at, pr.stream_seq) >= (f.at, f.stream_seq)
                               AND (pr.at, pr.stream_seq) < (f.next_at, f.next_seq)
                               AND pr.stream_seq <= $2)
                           ORDER BY f.stream_seq) AS highs,
                 array_agg(f.at ORDER BY f.stream_seq) AS ats,
                 array_agg(f.stream_seq ORDER BY f.stream_seq) AS seqs
            FROM (SELECT tr.stream_seq, tr.at, tr.position_after, tr.gross_entry_after,
                         COALESCE(lead(tr.at) OVER w, 'infinity') AS next_at,
                         COALESCE(lead(tr.stream_seq) OVER w, 0) AS next_seq
                    FROM trades tr
                   WHERE tr.portfolio_id = c.portfolio_id AND tr.symbol = $1
                     AND tr.stream_seq >= c.opened_seq
                  WINDOW w AS (ORDER BY tr.stream_seq)) f) e";

const STRATEGIES_SQL: &str = "
    SELECT ps.portfolio_id, s.strategy_id, s.rules::text, s.risk_profile::text, s.version
      FROM portfolio_strategies ps JOIN strategies s ON s.strategy_id = ps.strategy_id
     WHERE ps.portfolio_id = ANY($1) AND s.status = 'active'
     ORDER BY ps.portfolio_id, s.strategy_id";

/// A later (by business time) price of the symbol stored before this one.
const BACKFILL_SQL: &str = "
    SELECT EXISTS (SELECT 1 FROM prices WHERE symbol = $1 AND at > $2 AND stream_seq < $3)";

/// The trip's [`Span`]s from a [`SPANS_SQL`] row's parallel arrays.
fn spans_of(r: &tokio_postgres::Row) -> Vec<Span> {
    let column = |i| r.get::<_, Option<Vec<Decimal>>>(i).unwrap_or_default();
    let highs = r
        .get::<_, Option<Vec<Option<Decimal>>>>(3)
        .unwrap_or_default();
    let ats = r
        .get::<_, Option<Vec<DateTime<Utc>>>>(4)
        .unwrap_or_default();
    let seqs = r.get::<_, Option<Vec<i64>>>(5).unwrap_or_default();
    let places: Vec<Place> = ats
        .into_iter()
        .zip(seqs)
        .map(|(at, seq)| (at, seq as u64))
        .collect();
    column(1)
        .into_iter()
        .zip(column(2))
        .zip(highs)
        .enumerate()
        .map(|(i, ((quantity, gross_entry), high))| Span {
            from: places[i],
            to: places.get(i + 1).copied(),
            entry: EntrySpan {
                quantity,
                gross_entry,
                high,
            },
        })
        .collect()
}

impl Worker {
    /// The stream was made anew (created at `created`): its prices are all new to the worker
    /// (its consumer, made again, follows it from its start), and the trailing-stop spans kept
    /// are the old stream's (whose sequences and versions the new one numbers again from 1).
    /// No price is judged before the read models are folded from the new stream.
    async fn follow_stream_made_anew(
        &self,
        created: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Waited {
        *self.spans.lock().expect("span cache lock poisoned") = SpanCache::default();
        self.counters.last_seq.store(0, Ordering::Relaxed);
        warn!(
            durable = self.durable,
            stream_created = %created,
            "the stream was made anew: following its prices from its start"
        );
        self.wait_for_read_models_of(created, shutdown).await
    }

    /// Waits until no read model's checkpoint records another stream than the one created at
    /// `created`: read models folded from a stream since deleted hold its rows at sequences
    /// past the new stream's, and a price's wait for its sequence would pass on them (until
    /// their projectors, or `chctl setup`, reset them). A checkpoint without the record (a
    /// schema from before it) or none at all does not hold it up. While it waits it looks
    /// every [`STREAM_LOOK_EVERY`] tries whether the stream was made anew once more (the
    /// read models then follow that one, never this).
    async fn wait_for_read_models_of(
        &self,
        created: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Waited {
        let models: Vec<&str> = READ_MODELS.to_vec();
        let (mut told, mut told_error) = (false, false);
        let mut tries = 0u32;
        loop {
            tries = tries.wrapping_add(1);
            let folded = match self.pool.get().await.map_err(DbError::from) {
                Ok(conn) => conn
                    .query_one(
                        "SELECT count(*) FROM ch_checkpoints
                         WHERE projection = ANY($1) AND stream_created <> $2",
                        &[&models, &created],
                    )
                    .await
                    .map(|row| row.get::<_, i64>(0) == 0)
                    .map_err(DbError::from),
                Err(e) => Err(e),
            };
            let folded = folded.unwrap_or_else(|e| {
                // Looked at again: said once, not as if the read models were behind.
                if !told_error {
                    warn!(
                        durable = self.durable,
                        error = %e,
                        "cannot read the read models' checkpoints; trying again"
                    );
                    told_error = true;
                }
                false
            });
            self.waiting_for_read_models
                .store(!folded, Ordering::Relaxed);
            if folded {
                if told {
                    info!(durable = self.durable, "the read models follow the stream");
                }
                return Waited::Folded;
            }
            if !told {
                warn!(
                    durable = self.durable,
                    "waiting for the read models to be folded from the stream there now"
                );
                told = true;
            }
            if tries.is_multiple_of(STREAM_LOOK_EVERY) {
                if let Ok((_, now)) = self.app.store.last_seq_and_created().await {
                    if now != created {
                        self.waiting_for_read_models.store(false, Ordering::Relaxed);
                        return Waited::StreamChanged;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.waiting_for_read_models.store(false, Ordering::Relaxed);
                    return Waited::Shutdown;
                }
                () = tokio::time::sleep(FOLDED_LOOK) => {}
            }
        }
    }

    fn bump(&self, counter: &AtomicU64, gauge: &'static str) {
        let v = counter.fetch_add(1, Ordering::Relaxed) + 1;
        self.app.metrics.gauge(gauge, v as i64);
    }

    /// The open positions a price is evaluated for, with their strategies and, where the
    /// exit rule has a trailing stop, the trip's spans: all read in one snapshot.
    async fn candidates(
        &self,
        p: &Price,
        portfolio_id: Option<&str>,
        reached: &Reached,
    ) -> Result<Vec<Candidate>, DbError> {
        let mut conn = self.pool.get().await?;
        let tx = queries::snapshot(&mut conn, &queries::tables_of(&READ_MODELS)).await?;
        // Prepared (the first time on a session) once the tables are locked in the reset's
        // order: preparing before took them in the statements' order, and a rebuild's reset
        // waiting between the two deadlocked with it.
        let (candidates, strategies, spans) = (
            tx.prepare_cached(CANDIDATES_SQL).await?,
            tx.prepare_cached(STRATEGIES_SQL).await?,
            tx.prepare_cached(SPANS_SQL).await?,
        );
        // A rebuild's reset since the wait would show no position: the price is given back.
        let as_of = queries::as_of(&tx, &READ_MODELS, reached).await?;
        if as_of < p.seq {
            return Err(DbError::Unavailable(format!(
                "the read models were reset since the wait (at {as_of}, not yet {})",
                p.seq
            )));
        }
        let rows = tx
            .query(
                &candidates,
                &[&p.symbol, &p.at, &(p.seq as i64), &portfolio_id],
            )
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut out: Vec<Candidate> = rows
            .iter()
            .map(|r| Candidate {
                portfolio_id: r.get(0),
                version: r.get::<_, i64>(3) as u64,
                trip: Trip {
                    opened_seq: r.get::<_, i64>(4) as u64,
                    last_fill_seq: r.get::<_, i64>(5) as u64,
                },
                facts: PositionFacts {
                    quantity: r.get(1),
                    gross_entry: r.get(2),
                    mark: p.price,
                    entries: Vec::new(),
                },
                strategies: Vec::new(),
            })
            .collect();
        let index: HashMap<String, usize> = out
            .iter()
            .enumerate()
            .map(|(i, c)| (c.portfolio_id.clone(), i))
            .collect();
        let ids: Vec<&str> = out.iter().map(|c| c.portfolio_id.as_str()).collect();
        let rows = tx.query(&strategies, &[&ids]).await?;
        for r in rows {
            let pid: String = r.get(0);
            let strategy_id: String = r.get(1);
            let rules = serde_json::from_str::<Vec<StrategyRule>>(r.get(2));
            let profile = serde_json::from_str::<RiskProfile>(r.get(3));
            let (Ok(rules), Ok(risk_profile)) = (rules, profile) else {
                warn!(
                    strategy_id,
                    "strategy rules or risk profile unreadable; skipped"
                );
                continue;
            };
            if let Some(&i) = index.get(&pid) {
                out[i].strategies.push(AttachedStrategy {
                    strategy_id,
                    version: r.get::<_, i64>(4) as u64,
                    rules,
                    risk_profile,
                });
            }
        }
        // Only a trailing stop looks back over the trip: the spans of those positions only,
        // kept from the price before when they can be (see `SpanCache`).
        let trailing: Vec<usize> = (0..out.len())
            .filter(|&i| needs_history(&out[i].strategies, &p.symbol))
            .collect();
        let mut unread: (Vec<String>, Vec<i64>) = (Vec::new(), Vec::new());
        {
            let cache = self.spans.lock().expect("span cache");
            for &i in &trailing {
                let c = &mut out[i];
                match cache.get(p, &c.key(), c.version) {
                    Some(entries) => c.facts.entries = entries,
                    None => {
                        unread.0.push(c.portfolio_id.clone());
                        unread.1.push(c.trip.opened_seq as i64);
                    }
                }
            }
        }
        if !unread.0.is_empty() {
            let rows = tx
                .query(&spans, &[&p.symbol, &(p.seq as i64), &unread.0, &unread.1])
                .await?;
            let mut cache = self.spans.lock().expect("span cache");
            for r in rows {
                if let Some(&i) = index.get(r.get::<_, &str>(0)) {
                    let spans = spans_of(&r);
                    out[i].facts.entries = spans.iter().map(|s| s.entry.clone()).collect();
                    cache.put(p, out[i].key(), out[i].version, spans);
                }
            }
        }
        if portfolio_id.is_none() {
            let open = trailing.iter().map(|&i| out[i].key()).collect();
            self.spans.lock().expect("span cache").retain(p, &open);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Waits until the portfolio read model applied the last event of `portfolio_id`'s subject.
    async fn catch_up_portfolio(&self, portfolio_id: &str) -> Result<(), Retry> {
        // Through the store: on a replicated stream a follower may not have the last one yet.
        let head = match self
            .app
            .store
            .last_seq_of(AggregateType::Portfolio, portfolio_id)
            .await
        {
            Ok(Some(seq)) => seq,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Retry(format!("portfolio {portfolio_id} head: {e}"))),
        };
        self.progress
            .wait_for(&self.pool, &["portfolio"], head, READ_MODEL_WAIT)
            .await?;
        Ok(())
    }

    /// Evaluates one price; `Err` gives it back for a redelivery.
    async fn on_price(&self, p: &Price) -> Result<(), Retry> {
        self.spans.lock().expect("span cache").advance(p);
        let reached = self
            .progress
            .wait_for(&self.pool, &READ_MODELS, p.seq, READ_MODEL_WAIT)
            .await?;
        let firing: Vec<Candidate> = self
            .candidates(p, None, &reached)
            .await?
            .into_iter()
            .filter(|c| {
                decide_exit(&c.portfolio_id, &p.symbol, c.trip, &c.facts, &c.strategies).is_some()
            })
            .collect();
        if firing.is_empty() || self.is_backfill(p).await? {
            return Ok(());
        }
        for c in firing {
            self.exit(p, &c.portfolio_id, &reached).await?;
        }
        Ok(())
    }

    /// Whether a price of the symbol stored before `p` is later in business time: then `p` is
    /// a backfill, not the mark, and triggers nothing.
    async fn is_backfill(&self, p: &Price) -> Result<bool, DbError> {
        let conn = self.pool.get().await?;
        let backfill: bool = conn
            .query_one(BACKFILL_SQL, &[&p.symbol, &p.at, &(p.seq as i64)])
            .await?
            .get(0);
        if backfill {
            self.bump(&self.counters.backfills_skipped, "backfills_skipped");
            debug!(seq = p.seq, symbol = %p.symbol, "a backfilled price is not the mark; skipped");
        }
        Ok(backfill)
    }

    /// Sends the exit of one position, deciding on the portfolio's latest state first.
    async fn exit(&self, p: &Price, portfolio_id: &str, reached: &Reached) -> Result<(), Retry> {
        let (mut with_at, mut with_causation) = (true, true);
        for attempt in 1..=MAX_ATTEMPTS {
            self.catch_up_portfolio(portfolio_id).await?;
            let Some(c) = self
                .candidates(p, Some(portfolio_id), reached)
                .await?
                .into_iter()
                .next()
            else {
                // Closed, filled or its strategies attached or detached after the price,
                // meanwhile.
                return Ok(());
            };
            let Some(d) = decide_exit(&c.portfolio_id, &p.symbol, c.trip, &c.facts, &c.strategies)
            else {
                return Ok(());
            };
            let at = with_at.then_some(p.at);
            let causation = with_causation.then_some(p.event_id);
            match self.send(p, &c, &d, at, causation).await? {
                // A trigger counts once it is through (sent, or refused for good): one whose
                // price is given back and delivered again counts then, not at each delivery.
                Ok(reply) => {
                    self.bump(&self.counters.triggers, "exit_triggers");
                    self.log_sent(p, &c, &d, &reply);
                    return Ok(());
                }
                Err((status, code, message)) => match code.as_str() {
                    "conflict" => {
                        self.bump(&self.counters.conflicts, "exit_conflicts");
                        debug!(portfolio_id, attempt, %message, "portfolio moved; deciding again");
                    }
                    // A signal worker older than `causation_id` refuses it as an unknown
                    // field (workers upgraded one by one): the sell goes without it.
                    "bad_request" if with_causation && message.contains("causation_id") => {
                        warn!(portfolio_id, %message, "the command side does not take causation_id; sending without it");
                        with_causation = false;
                    }
                    "bad_request" if with_at => {
                        debug!(portfolio_id, %message, "sending without `at`");
                        with_at = false;
                    }
                    _ if status >= 500 => {
                        return Err(Retry(format!("sell {portfolio_id}: {code}: {message}")))
                    }
                    _ => {
                        self.bump(&self.counters.triggers, "exit_triggers");
                        error!(
                            portfolio_id, symbol = %p.symbol, command_id = %d.command_id,
                            kind = %d.trigger.kind, %code, %message,
                            "exit sell refused"
                        );
                        return Ok(());
                    }
                },
            }
        }
        Err(Retry(format!(
            "exit of {portfolio_id} {}: still conflicting after {MAX_ATTEMPTS} attempts",
            p.symbol
        )))
    }

    /// Sends the sell; `Ok(Err((status, code, message)))` is an error reply.
    async fn send(
        &self,
        p: &Price,
        c: &Candidate,
        d: &ExitDecision,
        at: Option<DateTime<Utc>>,
        causation: Option<uuid::Uuid>,
    ) -> Result<Result<Value, (u16, String, String)>, Retry> {
        let mut body = json!({
            "portfolio_id": c.portfolio_id,
            "strategy_id": d.strategy_id,
            "symbol": p.symbol,
            "side": "sell",
            "quantity": plain(d.quantity),
            "price": plain(d.price),
            "command_id": d.command_id,
            "expected_version": c.version,
        });
        if let Some(causation) = causation {
            body["causation_id"] = causation.to_string().into();
        }
        if let Some(at) = at {
            body["at"] = at.to_rfc3339_opts(SecondsFormat::AutoSi, true).into();
        }
        let subject = self.app.subjects.command("signal.execute");
        let msg = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.app
                .client
                .request(subject, serde_json::to_vec(&body)?.into()),
        )
        .await
        .map_err(|_| Retry("signal.execute: no reply in time".into()))??;
        let reply: Value = serde_json::from_slice(&msg.payload)?;
        let status = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .and_then(|v| v.as_str().parse::<u16>().ok());
        Ok(match status {
            None => Ok(reply),
            Some(s) => Err((
                s,
                reply["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
                reply["error"]["message"].as_str().unwrap_or("").to_owned(),
            )),
        })
    }

    fn log_sent(&self, p: &Price, c: &Candidate, d: &ExitDecision, reply: &Value) {
        let duplicate = reply["duplicate"].as_bool().unwrap_or(false);
        if duplicate {
            self.bump(&self.counters.duplicates, "exit_duplicates");
        }
        let executed = reply["status"] == "executed";
        if duplicate {
            debug!(
                portfolio_id = %c.portfolio_id, symbol = %p.symbol, kind = %d.trigger.kind,
                mark = %plain(p.price), command_id = %d.command_id,
                stream_seq = reply["stream_seq"].as_u64(),
                "exit already sent (by another worker or before a restart): first result kept"
            );
            return;
        }
        if executed {
            self.bump(&self.counters.sells_executed, "exit_sells_executed");
        } else {
            self.bump(&self.counters.sells_rejected, "exit_sells_rejected");
        }
        let entry = c.facts.avg_entry_price().map(plain).unwrap_or_default();
        if executed {
            info!(
                portfolio_id = %c.portfolio_id, symbol = %p.symbol, strategy_id = %d.strategy_id,
                rule_id = %d.rule_id, kind = %d.trigger.kind, level = %plain(d.trigger.level),
                mark = %plain(p.price), entry = %entry,
                quantity = %plain(d.quantity), opened_seq = c.trip.opened_seq, price_seq = p.seq,
                command_id = %d.command_id, stream_seq = reply["stream_seq"].as_u64(),
                "exit trigger sold the position"
            );
        } else {
            warn!(
                portfolio_id = %c.portfolio_id, symbol = %p.symbol, strategy_id = %d.strategy_id,
                kind = %d.trigger.kind, mark = %plain(p.price), command_id = %d.command_id,
                reason = reply["reason"].as_str(), detail = reply["detail"].as_str(),
                "exit trigger's sell was rejected"
            );
        }
    }

    async fn status(&self) -> Result<Value, ApiError> {
        let mut v = json!({
            "worker": WORKER,
            "durable": self.durable,
            "stream_last_seq": self.app.store.last_seq().await?,
        });
        match self.app.store.stream().consumer_info(&self.durable).await {
            Ok(i) => {
                v["consumer"] = json!({
                    "ack_floor_seq": i.ack_floor.stream_sequence,
                    "delivered_seq": i.delivered.stream_sequence,
                    "num_pending": i.num_pending,
                    "num_ack_pending": i.num_ack_pending,
                });
            }
            Err(e) => return Err(ApiError::unavailable(format!("consumer info: {e}"))),
        }
        // Read after the consumer: a price counts before it is acked, so every price the ack
        // floor shows is in the counters (read first, they could miss the last one acked).
        v["counters"] = self.counters.json();
        v["waiting_for_read_models"] = self.waiting_for_read_models.load(Ordering::Relaxed).into();
        Ok(v)
    }

    /// Handles one message of the consumer: evaluate, then ack (or nak for a redelivery).
    async fn on_message(&self, m: &async_nats::jetstream::Message) {
        let seq = m.info().map_or(0, |i| i.stream_sequence);
        let price = match envelope::decode(seq, &m.payload) {
            Ok(ev) => match ev.event {
                Event::MarketPriceRecorded(MarketPriceRecorded { symbol, price }) => Some(Price {
                    seq,
                    version: ev.meta.aggregate_version,
                    event_id: ev.meta.event_id,
                    symbol,
                    price,
                    at: ev.meta.occurred_at,
                }),
                _ => None,
            },
            Err(e) => {
                warn!(seq, error = %e, "undecodable market event; skipped");
                None
            }
        };
        let result = match &price {
            Some(p) => {
                let evaluated = self.on_price(p);
                tokio::pin!(evaluated);
                let mut still_at_it = tokio::time::interval_at(
                    tokio::time::Instant::now() + IN_PROGRESS_EVERY,
                    IN_PROGRESS_EVERY,
                );
                loop {
                    tokio::select! {
                        r = &mut evaluated => break r,
                        _ = still_at_it.tick() => {
                            let _ = m.ack_with(AckKind::Progress).await;
                        }
                    }
                }
            }
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                // Prices evaluated: one given back and delivered again counts once, here.
                if price.is_some() {
                    self.bump(&self.counters.prices, "prices");
                }
                // A redelivered older price must not take the gauge back.
                let last = self
                    .counters
                    .last_seq
                    .fetch_max(seq, Ordering::Relaxed)
                    .max(seq);
                self.app.metrics.gauge("last_seq", last as i64);
                if let Err(e) = m.double_ack().await {
                    warn!(seq, error = %e, "ack failed; the redelivery decides the same");
                }
            }
            Err(Retry(why)) => {
                self.bump(&self.counters.retries, "retries");
                let n = m.info().map_or(1, |i| i.delivered.max(1)) as u32;
                let delay = Duration::from_millis(250 * u64::from(n.min(20)));
                warn!(seq, error = %why, redeliver_in_ms = delay.as_millis() as u64, "price given back");
                let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }
}

struct StatusHandler(Arc<Worker>);

impl Handler for StatusHandler {
    async fn handle(&self, _: &str, msg: &Message) -> Result<Value, ApiError> {
        ch_runtime::service::takes_no_fields(&msg.payload)?;
        self.0.status().await
    }
}

/// Runs the exit-trigger worker on the shipped durable consumer until `shutdown`.
///
/// # Errors
/// When the schema, the consumer or the service cannot be set up.
pub async fn run(app: App, shutdown: CancellationToken) -> Result<(), async_nats::Error> {
    run_on(app, DURABLE, shutdown).await
}

/// `exit-triggers`' whole life (see [`ch_runtime::app::boxed_main`]).
#[inline(never)]
pub fn main_future(cfg: ch_runtime::Config) -> ch_runtime::app::MainFuture {
    ch_runtime::app::boxed_main(cfg, WORKER, run)
}

/// The worker's durable consumer, created if it does not exist (by the first worker, or
/// again after someone deleted it). `from_start`: on a stream made anew, whose every price is
/// new to the worker.
async fn open_consumer(
    app: &App,
    durable: &str,
    from_start: bool,
) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, async_nats::Error> {
    // Created by the first worker: it follows prices from then on (`deliver_policy: new`), so a
    // first start on a long stream does not sell at old marks.
    let mut cfg = consumer_config(app.subjects.prefix(), durable)?;
    if from_start {
        cfg.deliver_policy = async_nats::jetstream::consumer::DeliverPolicy::All;
    }
    let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = app
        .store
        .stream()
        .get_or_create_consumer(durable, cfg.clone())
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    if consumer.cached_info().config.ack_policy != AckPolicy::Explicit {
        return Err(format!(
            "consumer {durable} does not ack explicitly; delete it to have it recreated"
        )
        .into());
    }
    // Every price is evaluated, however long the read models lag (each try gives the price
    // back after a wait): a consumer made with a delivery limit (20 before) would drop the
    // prices of a long outage for good, and the exits they cross with them. And one price at
    // a time (1000 before: a later price could be judged before an earlier one held elsewhere).
    let current = &consumer.cached_info().config;
    if current.max_deliver == cfg.max_deliver && current.max_ack_pending == cfg.max_ack_pending {
        return Ok(consumer);
    }
    info!(
        durable,
        max_deliver = cfg.max_deliver,
        max_ack_pending = cfg.max_ack_pending,
        was_max_deliver = current.max_deliver,
        was_max_ack_pending = current.max_ack_pending,
        "updating the consumer to nats/consumers/exit_triggers.json"
    );
    match app.store.stream().update_consumer(cfg).await {
        Ok(updated) => Ok(updated),
        Err(e) => {
            warn!(durable, error = %e, "could not update the consumer; going on with it");
            Ok(consumer)
        }
    }
}

/// Runs the worker on the durable consumer `durable` (replicas sharing one durable share the
/// prices; a worker on another durable sees every price too, and sends the same command ids).
///
/// # Errors
/// When the schema, the consumer or the service cannot be set up.
pub async fn run_on(
    app: App,
    durable: &str,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    if !crate::workers::migrated(&app, &shutdown, crate::workers::Schema::Require).await? {
        return Ok(());
    }
    let progress = crate::workers::progress(&app, &READ_MODELS).await?;
    let consumer = open_consumer(&app, durable, false).await?;
    let worker = Arc::new(Worker {
        pool: app.read_pool()?,
        progress,
        durable: durable.to_owned(),
        counters: Counters::default(),
        spans: std::sync::Mutex::default(),
        waiting_for_read_models: std::sync::atomic::AtomicBool::new(false),
        app,
    });
    let spec = worker.app.service_spec(
        "exit triggers: stop loss, take profit and trailing stop sells on market prices",
        [("status", status_subject(worker.app.subjects.prefix()))],
    );
    let svc = tokio::spawn(service::serve(
        worker.app.connections(),
        spec,
        Arc::new(StatusHandler(worker.clone())),
        worker.app.metrics.clone(),
        shutdown.clone(),
    ));
    service::alongside(
        svc,
        follow_prices(&worker, &consumer, &shutdown),
        shutdown.clone(),
    )
    .await
}

/// Evaluates each price the consumer delivers until `shutdown`, one pull request of one price
/// at a time; makes the consumer again should it be gone.
async fn follow_prices(
    worker: &Worker,
    consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>,
    shutdown: &CancellationToken,
) -> Result<(), async_nats::Error> {
    let durable = worker.durable.as_str();
    let started = Instant::now();
    let mut consumer = consumer.clone();
    // The stream followed: one made anew (its consumer gone with the old one) is told by its
    // creation time as the consumer is made again.
    let mut stream_created = worker.app.store.opened_created();
    // The stream made anew once more while the worker waited for the read models: the
    // consumer (gone with it) is made again at once, not fetched from.
    let mut made_anew_again = match worker
        .wait_for_read_models_of(stream_created, shutdown)
        .await
    {
        Waited::Folded => false,
        Waited::StreamChanged => true,
        Waited::Shutdown => return Ok(()),
    };
    // Where it resumes: a price held by a worker that died comes back after the ack wait.
    let at = consumer.cached_info();
    info!(
        durable,
        ack_floor_seq = at.ack_floor.stream_sequence,
        delivered_seq = at.delivered.stream_sequence,
        num_ack_pending = at.num_ack_pending,
        ack_wait_s = at.config.ack_wait.as_secs(),
        "following market prices"
    );
    // Between tries to make the consumer again: 0.5 s, doubling up to 10 s.
    let mut reopen_wait = Duration::from_millis(500);
    while !shutdown.is_cancelled() {
        let fetched = if std::mem::take(&mut made_anew_again) {
            None
        } else {
            Some(
                consumer
                    .fetch()
                    .max_messages(1)
                    .expires(FETCH_WAIT)
                    .messages()
                    .await,
            )
        };
        let trouble = match fetched {
            None => Some("the stream was made anew once more".to_owned()),
            Some(Ok(mut batch)) => {
                let mut trouble = None;
                let mut stopping = false;
                // Until the pull request is over (answered, or expired on the server): what
                // it delivers after a shutdown goes back at once, for the next worker.
                loop {
                    let next = tokio::select! {
                        () = shutdown.cancelled(), if !stopping => {
                            stopping = true;
                            continue;
                        }
                        m = batch.next() => m,
                    };
                    match next {
                        None => break,
                        Some(Ok(m)) if stopping => {
                            let _ = m.ack_with(AckKind::Nak(None)).await;
                        }
                        // Finish the price in hand even if a shutdown comes meanwhile.
                        Some(Ok(m)) => worker.on_message(&m).await,
                        Some(Err(e)) => {
                            trouble = Some(e.to_string());
                            break;
                        }
                    }
                }
                trouble
            }
            Some(Err(e)) => Some(e.to_string()),
        };
        let Some(why) = trouble else {
            reopen_wait = Duration::from_millis(500);
            continue;
        };
        // The consumer may be gone (deleted by an operator): made again, it follows the
        // prices from then on.
        warn!(
            durable,
            error = %why,
            retry_in_ms = reopen_wait.as_millis() as u64,
            "no price from the consumer; opening it again"
        );
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(reopen_wait) => {}
        }
        let opened = match worker.app.store.last_seq_and_created().await {
            Ok((_, created)) => {
                let anew = created != stream_created;
                open_consumer(&worker.app, durable, anew)
                    .await
                    .map(|c| (c, anew.then_some(created)))
            }
            Err(e) => Err(e.into()),
        };
        match opened {
            Ok((c, anew)) => {
                consumer = c;
                if let Some(created) = anew {
                    match worker.follow_stream_made_anew(created, shutdown).await {
                        Waited::Folded => stream_created = created,
                        // The consumer just made went with that stream; the one made next is
                        // on a stream made anew too (`stream_created` is still the old one's).
                        Waited::StreamChanged => {
                            made_anew_again = true;
                            continue;
                        }
                        Waited::Shutdown => break,
                    }
                }
                info!(durable, "following market prices again");
            }
            Err(e) => {
                warn!(durable, error = %e, "could not open the consumer");
                reopen_wait = (reopen_wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    info!(
        durable,
        uptime_s = started.elapsed().as_secs(),
        "exit triggers stopped"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn price(version: u64, seq: u64, at: i64, px: &str) -> Price {
        Price {
            seq,
            version,
            event_id: uuid::Uuid::nil(),
            symbol: "BTC-USDT".into(),
            price: d(px),
            at: t(at),
        }
    }

    /// A trip of two fills: at t=10 (seq 5) and t=20 (seq 9).
    fn two_fills() -> Vec<Span> {
        let span = |from: Place, to: Option<Place>, q: &str| Span {
            from,
            to,
            entry: EntrySpan {
                quantity: d(q),
                gross_entry: d(q) * d("100"),
                high: None,
            },
        };
        vec![
            span((t(10), 5), Some((t(20), 9)), "1"),
            span((t(20), 9), None, "2"),
        ]
    }

    fn highs(cache: &SpanCache, p: &Price) -> Option<Vec<Option<Decimal>>> {
        cache
            .get(p, &("p1".into(), 5), 7)
            .map(|e| e.into_iter().map(|s| s.high).collect())
    }

    #[test]
    fn each_next_price_counts_in_the_span_its_place_falls_in() {
        let mut cache = SpanCache::default();
        let first = price(3, 12, 25, "110");
        cache.advance(&first);
        cache.put(&first, ("p1".into(), 5), 7, two_fills());
        assert_eq!(highs(&cache, &first), Some(vec![None, None]));
        // The next price: in the last span.
        let next = price(4, 13, 26, "120");
        cache.advance(&next);
        assert_eq!(highs(&cache, &next), Some(vec![None, Some(d("120"))]));
        // A redelivery counts once; a lower price leaves the high.
        cache.advance(&next);
        let lower = price(5, 14, 27, "105");
        cache.advance(&lower);
        assert_eq!(highs(&cache, &lower), Some(vec![None, Some(d("120"))]));
        // A backfill into the first span's time counts there, as the query counts it; one
        // from before the trip counts nowhere.
        let backfill = price(6, 15, 15, "130");
        cache.advance(&backfill);
        let before = price(7, 16, 5, "999");
        cache.advance(&before);
        assert_eq!(
            highs(&cache, &before),
            Some(vec![Some(d("130")), Some(d("120"))])
        );
        // At the boundary: a price at the second fill's time stored before it belongs to the
        // first span, one stored after it to the second.
        let mut spans = two_fills();
        count_price(&mut spans, (t(20), 8), d("50"));
        count_price(&mut spans, (t(20), 10), d("60"));
        assert_eq!(spans[0].entry.high, Some(d("50")));
        assert_eq!(spans[1].entry.high, Some(d("60")));
    }

    #[test]
    fn a_gap_or_another_portfolio_version_reads_the_spans_again() {
        let mut cache = SpanCache::default();
        let first = price(3, 12, 25, "110");
        cache.advance(&first);
        cache.put(&first, ("p1".into(), 5), 7, two_fills());
        // A fill or any other event of the portfolio since: not the spans kept.
        assert!(cache.get(&first, &("p1".into(), 5), 8).is_none());
        // A price of the symbol this worker did not see (another replica's): forgotten.
        let after_gap = price(5, 20, 30, "115");
        cache.advance(&after_gap);
        assert_eq!(highs(&cache, &after_gap), None);
        // Read as of another price than the cache's: not served.
        cache.put(&after_gap, ("p1".into(), 5), 7, two_fills());
        assert_eq!(highs(&cache, &first), None);
        // Closed trips go.
        cache.retain(&after_gap, &std::collections::HashSet::new());
        assert_eq!(highs(&cache, &after_gap), None);
    }
}

//! The SQL behind each query, and the query requests' shapes. Every reply is read in one
//! snapshot together with the checkpoint it reports as `as_of_seq` (one statement, or a
//! REPEATABLE READ, READ ONLY transaction), so the figures and the sequence always match.

use ch_domain::ids::validate_id;
use ch_domain::portfolio::Position;
use ch_domain::DomainError;
use ch_runtime::error::{ApiError, DbError};
use ch_runtime::query::Reached;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::{IsolationLevel, Row, Transaction};

use crate::plain;
use crate::portfolio::EQUITY_SQL;

/// Fields every query accepts (API.md, "Queries").
pub trait Consistency {
    fn min_stream_seq(&self) -> Option<u64>;
    fn timeout_ms(&self) -> Option<u64>;
}

macro_rules! consistency {
    ($t:ty) => {
        impl Consistency for $t {
            fn min_stream_seq(&self) -> Option<u64> {
                self.min_stream_seq
            }
            fn timeout_ms(&self) -> Option<u64> {
                self.timeout_ms
            }
        }
    };
}

/// A query request's own checks (ids, limits, periods), made as it is parsed: a request that
/// cannot be answered is `bad_request` at once, never `stale` after a read-your-writes wait.
pub trait Validate {
    /// # Errors
    /// `bad_request` naming the field.
    fn validate(&self) -> Result<(), ApiError>;

    /// The aggregate the query reads, for the request's span (`aggregate_id`): a portfolio or
    /// a strategy; none for a user's lists.
    fn aggregate_id(&self) -> Option<&str> {
        None
    }
}

/// For an optional field with a default: an explicit `null` is the default too, as an absent
/// field is (clients that send `None` as `null`).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A page's `limit` when none is given.
pub(crate) const DEFAULT_LIMIT: u32 = 50;

/// `limit` between 1 and 500, else `bad_request`.
pub(crate) fn check_limit(limit: Option<u32>) -> Result<(), ApiError> {
    if (1..=500).contains(&limit.unwrap_or(DEFAULT_LIMIT)) {
        Ok(())
    } else {
        Err(ApiError::bad_request("limit: must be between 1 and 500"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerformanceQuery {
    pub portfolio_id: String,
    pub min_stream_seq: Option<u64>,
    pub timeout_ms: Option<u64>,
}
consistency!(PerformanceQuery);

impl Validate for PerformanceQuery {
    fn validate(&self) -> Result<(), ApiError> {
        check_id("portfolio_id", &self.portfolio_id)
    }
    fn aggregate_id(&self) -> Option<&str> {
        Some(&self.portfolio_id)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyListQuery {
    pub user_id: String,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub include_deleted: bool,
    pub min_stream_seq: Option<u64>,
    pub timeout_ms: Option<u64>,
}
consistency!(StrategyListQuery);

impl Validate for StrategyListQuery {
    fn validate(&self) -> Result<(), ApiError> {
        check_id("user_id", &self.user_id)?;
        check_limit(self.limit)?;
        match &self.cursor {
            Some(c) => check_id("cursor", c),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyGetQuery {
    pub strategy_id: String,
    pub min_stream_seq: Option<u64>,
    pub timeout_ms: Option<u64>,
}
consistency!(StrategyGetQuery);

impl Validate for StrategyGetQuery {
    fn validate(&self) -> Result<(), ApiError> {
        check_id("strategy_id", &self.strategy_id)
    }
    fn aggregate_id(&self) -> Option<&str> {
        Some(&self.strategy_id)
    }
}

/// Parses a query body and checks its fields ([`Validate`]); malformed JSON, unknown fields
/// and invalid values are `bad_request`.
///
/// # Errors
/// `bad_request` naming what is wrong.
pub fn parse<T: serde::de::DeserializeOwned + Validate>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "empty request: expected a JSON object",
        ));
    }
    // A struct would also read from an array of its fields in order: not a request. Text that
    // is not JSON at all is said to be that, as the command workers say it.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(ApiError::bad_request(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => "request body must be a JSON object".to_owned(),
                Err(e) => format!("malformed JSON: {e}"),
            },
        ));
    }
    let q: T = ch_domain::request::read_json(body).map_err(ApiError::bad_request)?;
    q.validate()?;
    if let Some(id) = q.aggregate_id() {
        tracing::Span::current().record("aggregate_id", id);
    }
    Ok(q)
}

pub(crate) fn check_id(field: &str, v: &str) -> Result<(), ApiError> {
    validate_id(field, v).map_err(|e: DomainError| ApiError::from(e))
}

/// The tables of the read models `projections` (`portfolio`, `strategy`) that a snapshot
/// locks, in a fixed order (each projection's, as its reset truncates them: locks taken in one
/// order make no cycle).
pub fn tables_of(projections: &[&str]) -> Vec<&'static str> {
    projections
        .iter()
        .flat_map(|p| match *p {
            "portfolio" => crate::portfolio::TABLES,
            "strategy" => crate::strategy::TABLES,
            other => panic!("no tables known for the projection {other}"),
        })
        .copied()
        .collect()
}

/// Opens the read-only snapshot a reply is computed in, over `tables`.
///
/// A rebuild's reset empties the tables with `TRUNCATE`, which snapshots taken before it do
/// not see past: a snapshot that read the checkpoint before the reset committed and a table
/// after found the table empty under the old `as_of_seq`. So the tables are locked (shared,
/// as any read locks them) before the snapshot is taken, by the first statement after: a
/// reset in progress is waited for, and none can commit until the reply is read.
///
/// # Errors
/// [`DbError`] on database trouble.
pub async fn snapshot<'c>(
    conn: &'c mut deadpool_postgres::Object,
    tables: &[&str],
) -> Result<deadpool_postgres::Transaction<'c>, DbError> {
    // deadpool's transaction: its `prepare_cached` prepares after the lock, in the snapshot
    // (preparing takes the statement's tables in the statement's order, against a reset's).
    let tx = conn
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute(&format!(
        "LOCK TABLE {} IN ACCESS SHARE MODE",
        tables.join(", ")
    ))
    .await?;
    Ok(tx)
}

/// How far the read models of `projections` are, in the reply's snapshot: the lowest of their
/// checkpoints (a reply drawing on several is only as current as the least current), a sparse
/// one's taken as far as the read-your-writes wait found it current (`reached`).
///
/// # Errors
/// [`DbError`] on database trouble.
pub async fn as_of(
    tx: &Transaction<'_>,
    projections: &[&str],
    reached: &Reached,
) -> Result<u64, DbError> {
    // One round trip for all of them; a projection without a checkpoint row is at 0.
    let rows = tx
        .query(
            "SELECT projection, last_seq FROM ch_checkpoints WHERE projection = ANY($1)",
            &[&projections],
        )
        .await?;
    let checkpoint = |p: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == p)
            .map_or(0, |r| r.get::<_, i64>(1) as u64)
    };
    Ok(projections
        .iter()
        .map(|p| reached.effective(p, checkpoint(p)))
        .min()
        .unwrap_or(0))
}

fn dec(row: &Row, col: &str) -> Decimal {
    row.get::<_, Decimal>(col)
}

/// The whole performance read in one statement (one snapshot, so the figures and `as_of_seq`
/// match without a transaction; prepared once per connection): the portfolio row (with its
/// round-trip counts), its positions with their marks as parallel arrays in symbol order, and
/// its attached strategies. No row: no such portfolio.
const PERFORMANCE_SQL: &str = "
    SELECT (SELECT last_seq FROM ch_checkpoints WHERE projection = 'portfolio') AS as_of_seq,
           p.*, x.symbols, x.quantities, x.cost_bases, x.gross_entries, x.marks,
           ARRAY(SELECT s.strategy_id FROM portfolio_strategies s
                 WHERE s.portfolio_id = p.portfolio_id ORDER BY s.strategy_id) AS attached
    FROM portfolios p
    CROSS JOIN LATERAL (
        SELECT array_agg(q.symbol ORDER BY q.symbol) AS symbols,
               array_agg(q.quantity ORDER BY q.symbol) AS quantities,
               array_agg(q.cost_basis ORDER BY q.symbol) AS cost_bases,
               array_agg(q.gross_entry ORDER BY q.symbol) AS gross_entries,
               array_agg(m.price ORDER BY q.symbol) AS marks
        FROM positions q LEFT JOIN marks m ON m.symbol = q.symbol
        WHERE q.portfolio_id = p.portfolio_id) x
    WHERE p.portfolio_id = $1";

/// The portfolio read model's checkpoint, and whether it holds `portfolio_id`, in one snapshot
/// (for a performance read that found no row: a reset, or a row not there at that checkpoint).
///
/// # Errors
/// [`DbError`] when the database cannot be read.
pub async fn portfolio_checkpoint_and_row(
    conn: &deadpool_postgres::Object,
    portfolio_id: &str,
) -> Result<(u64, bool), DbError> {
    let row = conn
        .query_one(
            "SELECT (SELECT last_seq FROM ch_checkpoints WHERE projection = 'portfolio'),
                    EXISTS (SELECT 1 FROM portfolios WHERE portfolio_id = $1)",
            &[&portfolio_id],
        )
        .await?;
    let at = row.get::<_, Option<i64>>(0).unwrap_or(0);
    Ok((at as u64, row.get(1)))
}

/// `ch.query.portfolio.performance`.
///
/// # Errors
/// `not_found` for an unknown portfolio (the request's fields were checked as it was parsed).
pub async fn portfolio_performance(
    conn: &deadpool_postgres::Object,
    q: &PerformanceQuery,
) -> Result<Value, ApiError> {
    let stmt = conn
        .prepare_cached(PERFORMANCE_SQL)
        .await
        .map_err(DbError::from)?;
    let Some(p) = conn
        .query_opt(&stmt, &[&q.portfolio_id])
        .await
        .map_err(DbError::from)?
    else {
        return Err(ApiError::not_found(format!(
            "portfolio {} not found",
            q.portfolio_id
        )));
    };
    let as_of_seq = p.get::<_, Option<i64>>("as_of_seq").unwrap_or(0);
    let column = |name: &str| p.get::<_, Option<Vec<Decimal>>>(name).unwrap_or_default();
    let symbols: Vec<String> = p
        .get::<_, Option<Vec<String>>>("symbols")
        .unwrap_or_default();
    let (quantities, cost_bases, gross_entries) = (
        column("quantities"),
        column("cost_bases"),
        column("gross_entries"),
    );
    let marks: Vec<Option<Decimal>> = p
        .get::<_, Option<Vec<Option<Decimal>>>>("marks")
        .unwrap_or_default();
    // A mark far beyond any price (recorded all the same) can make a value that a Decimal
    // does not hold: an error reply, not a panic.
    let out_of_range = || {
        ApiError::internal(format!(
            "portfolio {}: its value at the marks needs more than 28 significant digits",
            q.portfolio_id
        ))
    };
    let cash = dec(&p, "cash");
    let mut equity = cash;
    let mut unrealized_total = Decimal::ZERO;
    let mut positions = Vec::with_capacity(symbols.len());
    for (i, symbol) in symbols.iter().enumerate() {
        let (qty, cost, gross, mark) = (quantities[i], cost_bases[i], gross_entries[i], marks[i]);
        let held = Position {
            quantity: qty,
            cost_basis: cost,
            gross_entry: gross,
        };
        let value = held.value_at(mark.as_ref()).ok_or_else(out_of_range)?;
        let unrealized = value.checked_sub(cost).ok_or_else(out_of_range)?;
        equity = equity.checked_add(value).ok_or_else(out_of_range)?;
        unrealized_total = unrealized_total
            .checked_add(unrealized)
            .ok_or_else(out_of_range)?;
        positions.push(json!({
            "symbol": symbol,
            "quantity": plain(qty),
            "avg_cost": plain((cost / qty).round_dp(8)),
            "avg_entry_price": plain((gross / qty).round_dp(8)),
            "cost_basis": plain(cost),
            "mark_price": mark.map(plain),
            "priced": mark.is_some(),
            "market_value": plain(value),
            "unrealized_pnl": plain(unrealized),
        }));
    }
    let closed: i64 = p.get("trade_count");
    let wins: i64 = p.get("win_count");
    let attached: Vec<String> = p.get("attached");
    let nav = dec(&p, "nav_at_flow");
    let e_flow = dec(&p, "equity_at_flow");
    let total_return = if e_flow > Decimal::ZERO {
        let grown = crate::portfolio::grow(nav, equity, e_flow).ok_or_else(out_of_range)?;
        (grown - Decimal::ONE).round_dp(10)
    } else {
        (nav - Decimal::ONE).round_dp(10)
    };
    let win_rate = crate::win_rate(wins, closed).map(plain);
    Ok(json!({
        "portfolio_id": p.get::<_, String>("portfolio_id"),
        "user_id": p.get::<_, String>("user_id"),
        "name": p.get::<_, String>("name"),
        "quote_currency": p.get::<_, String>("quote_currency"),
        "fee_rate": plain(dec(&p, "fee_rate")),
        "status": p.get::<_, String>("status"),
        "cash": plain(cash),
        "positions": positions,
        "equity": plain(equity),
        "net_deposits": plain(dec(&p, "net_deposits")),
        "realized_pnl": plain(dec(&p, "realized_pnl")),
        "unrealized_pnl": plain(unrealized_total),
        "fees_paid": plain(dec(&p, "fees_paid")),
        "total_return": plain(total_return),
        "trade_count": closed,
        "fill_count": p.get::<_, i64>("fill_count"),
        "win_rate": win_rate,
        "rejected_signals": p.get::<_, i64>("rejected_signals"),
        "attached_strategies": attached,
        "opened_at": p.get::<_, chrono::DateTime<chrono::Utc>>("opened_at"),
        "updated_at": p.get::<_, chrono::DateTime<chrono::Utc>>("updated_at"),
        "version": p.get::<_, i64>("version"),
        "as_of_seq": as_of_seq,
    }))
}

fn strategy_row(r: &Row) -> Value {
    json!({
        "strategy_id": r.get::<_, String>("strategy_id"),
        "user_id": r.get::<_, String>("user_id"),
        "name": r.get::<_, String>("name"),
        "status": r.get::<_, String>("status"),
        "version": r.get::<_, i64>("version"),
        "created_at": r.get::<_, chrono::DateTime<chrono::Utc>>("created_at"),
        "updated_at": r.get::<_, chrono::DateTime<chrono::Utc>>("updated_at"),
    })
}

/// `ch.query.strategy.list`: a user's strategies by `strategy_id`, keyset-paginated; the
/// cursor is the last `strategy_id` of the previous page.
///
/// # Errors
/// Database trouble only (the request's fields were checked as it was parsed).
pub async fn strategy_list(
    tx: &Transaction<'_>,
    q: &StrategyListQuery,
    as_of_seq: u64,
) -> Result<Value, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    let rows = tx
        .query(
            "SELECT * FROM strategies
             WHERE user_id = $1 AND ($2::text IS NULL OR strategy_id > $2)
               AND ($3 OR status <> 'deleted')
             ORDER BY strategy_id LIMIT $4",
            &[
                &q.user_id,
                &q.cursor,
                &q.include_deleted,
                &(i64::from(limit) + 1),
            ],
        )
        .await
        .map_err(DbError::from)?;
    let more = rows.len() > limit as usize;
    let page: Vec<Value> = rows.iter().take(limit as usize).map(strategy_row).collect();
    let next_cursor = if more {
        page.last().map(|r| r["strategy_id"].clone())
    } else {
        None
    };
    Ok(json!({"strategies": page, "next_cursor": next_cursor, "as_of_seq": as_of_seq}))
}

/// `ch.query.strategy.get`: the strategy, its attached portfolios and their combined
/// performance (from the portfolio read model).
///
/// # Errors
/// `not_found` for an unknown strategy.
pub async fn strategy_get(
    tx: &Transaction<'_>,
    q: &StrategyGetQuery,
    as_of_seq: u64,
) -> Result<Value, ApiError> {
    let Some(r) = tx
        .query_opt(
            "SELECT * FROM strategies WHERE strategy_id = $1",
            &[&q.strategy_id],
        )
        .await
        .map_err(DbError::from)?
    else {
        return Err(ApiError::not_found(format!(
            "strategy {} not found",
            q.strategy_id
        )));
    };
    let mut v = strategy_row(&r);
    v["rules"] = r.get::<_, Value>("rules");
    v["risk_profile"] = r.get::<_, Value>("risk_profile");
    let portfolios: Vec<String> = tx
        .query(
            "SELECT portfolio_id FROM portfolio_strategies WHERE strategy_id = $1 ORDER BY portfolio_id",
            &[&q.strategy_id],
        )
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let perf = tx
        .query_one(
            "SELECT COALESCE(sum(p.realized_pnl), 0) AS realized_pnl,
                    COALESCE(sum(p.fees_paid), 0) AS fees_paid,
                    COALESCE(sum(p.fill_count), 0)::bigint AS fill_count,
                    COALESCE(sum(p.cash), 0) AS cash,
                    (SELECT count(*) FROM round_trips t
                      WHERE t.portfolio_id = ANY($1) AND t.closed_at IS NOT NULL) AS closed,
                    (SELECT count(*) FROM round_trips t
                      WHERE t.portfolio_id = ANY($1) AND t.closed_at IS NOT NULL AND t.pnl > 0) AS wins
             FROM portfolios p WHERE p.portfolio_id = ANY($1)",
            &[&portfolios],
        )
        .await
        .map_err(DbError::from)?;
    let closed: i64 = perf.get("closed");
    let wins: i64 = perf.get("wins");
    v["attached_portfolios"] = json!(portfolios);
    v["performance"] = json!({
        "portfolio_count": portfolios.len(),
        "trade_count": closed,
        "fill_count": perf.get::<_, i64>("fill_count"),
        "win_rate": crate::win_rate(wins, closed).map(plain),
        "realized_pnl": plain(dec(&perf, "realized_pnl")),
        "fees_paid": plain(dec(&perf, "fees_paid")),
    });
    v["as_of_seq"] = json!(as_of_seq);
    Ok(v)
}

/// Equity of one portfolio at the current marks, as the read model knows it.
///
/// # Errors
/// [`DbError`] on database trouble.
pub async fn equity(tx: &Transaction<'_>, portfolio_id: &str) -> Result<Option<Decimal>, DbError> {
    let row = tx
        .query_one(&format!("SELECT {EQUITY_SQL} AS e"), &[&portfolio_id])
        .await?;
    Ok(row.get("e"))
}

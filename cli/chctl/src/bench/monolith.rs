//! The monolithic baseline of `chctl bench trade-flow --baseline monolith` (issue 3, section 3):
//! "monolithic data access", the classic design the seed weighed CQRS against. One process, one
//! model in PostgreSQL that commands and queries share; no event store, no projector.
//!
//! It answers the subjects of API.md under its own prefix with the same request and reply JSON
//! and the same API errors, and runs the same business rules: every command is parsed by
//! `ch_domain::request::parse_command` and decided by the pure `Aggregate::decide` on a state
//! built from the rows; the resulting event is folded with `Aggregate::apply` and written back.
//!
//! # Per command: one Postgres transaction, four round trips
//!
//! Statements sent together are pipelined on the connection (tokio-postgres sends a request when
//! its future is first polled, and `try_join!` polls in order); the server still runs them one
//! after the other, so every read below runs after the row lock was granted and, in READ
//! COMMITTED, sees what the previous lock holder committed.
//!
//! `portfolio.update` and `signal.execute`:
//! 1. `BEGIN`
//! 2. reads, pipelined: `SELECT .. FROM portfolios WHERE portfolio_id = $1 FOR UPDATE`;
//!    `SELECT nextval('stream_seq')`; the portfolio's positions; its attached strategies; the
//!    strategy the command names, if any (attach, detach, signal; a plain read: strategies only
//!    change through `strategy.create` here); the stored reply of `command_id`, if given.
//! 3. writes, pipelined: `UPDATE portfolios` (every column from the new state; `INSERT` for
//!    `open`); plus, for an executed trade, the position upsert (or `DELETE` when flat) and the
//!    `INSERT INTO trades`; for attach/detach, the `portfolio_strategies` row; with a
//!    `command_id`, the reply row. A rejected signal only updates the portfolio row
//!    (`rejected_signals + 1`, `version + 1`).
//! 4. `COMMIT`
//!
//! A refusal (4xx) rolls back: nothing is stored, as in CipherHorizon.
//!
//! `strategy.create`: `BEGIN`; the existing version and the stored reply, pipelined;
//! `INSERT .. ON CONFLICT DO NOTHING RETURNING last_seq` (plus the reply row); `COMMIT`.
//!
//! `query.portfolio.performance`: one `SELECT` (portfolio row joined with its positions, the
//! attached strategies and the sequence), no transaction: a single statement is a consistent
//! snapshot. Same reply shape as `ch_readmodel::queries::portfolio_performance`.
//!
//! # Stand-ins and differences
//!
//! - `stream_seq`: there is no stream; a global Postgres sequence `stream_seq` numbers the
//!   commands instead, taken after the row lock (so it grows with each portfolio's version).
//!   A refused command may leave a gap. `as_of_seq` of a query is the sequence's current
//!   value: the monolith's reads are never behind (a command replies after its commit), so
//!   every `stream_seq` a client has been given is visible; `min_stream_seq` never waits in
//!   practice (projection lag is zero by construction).
//! - No market prices (`market.price` is not served): `mark_price` is `null`, positions are
//!   valued at their average entry price (`priced: false`) and drawdown checks see no marks.
//! - `command_id` deduplication: a `command_replies` table (no window), checked under the row
//!   lock. `expected_version` is checked against the row's version.
//! - Round trips (`trade_count`, `win_rate`) are counters on the portfolio row, with the open
//!   trip's PnL kept on the position row (the read model keeps a `round_trips` table).
//! - Served: `strategy.create`, every op of `portfolio.update`, `signal.execute`,
//!   `query.portfolio.performance`. Strategy update/delete and the other queries are not.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::Message;
use ch_domain::event::TradeExecuted;
use ch_domain::ids::validate_id;
use ch_domain::portfolio::{
    PortfolioCommand, PortfolioFacts, PortfolioState, PortfolioStatus, Position,
};
use ch_domain::request::{parse_command, reply_extra, Common, Endpoint, Target};
use ch_domain::strategy::StrategyStatus;
use ch_domain::strategy::{RiskProfile, StrategyCommand, StrategyRule, StrategyState};
use ch_domain::{Aggregate, Ctx, DomainError, Event};
use ch_readmodel::portfolio::grow;
use ch_readmodel::queries::{self, PerformanceQuery};
use ch_runtime::error::{ApiError, DbError};
use ch_runtime::metrics::Metrics;
use ch_runtime::query::timeout_from;
use ch_runtime::service::{self, EndpointSpec, Handler, ServiceSpec};
use ch_runtime::Subjects;
use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

/// Connections of the monolith's pool (one per in-flight command or query).
pub const POOL_SIZE: usize = 32;

/// How long `start` waits for the service to list all its endpoints.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The tables of the baseline: one model for commands and queries.
const DDL: &str = "
CREATE SEQUENCE stream_seq;

CREATE TABLE strategies (
    strategy_id  text PRIMARY KEY,
    user_id      text NOT NULL,
    name         text NOT NULL,
    status       text NOT NULL,
    rules        jsonb NOT NULL,
    risk_profile jsonb NOT NULL,
    version      bigint NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    last_seq     bigint NOT NULL
);

CREATE TABLE portfolios (
    portfolio_id      text PRIMARY KEY,
    user_id           text NOT NULL,
    name              text NOT NULL,
    quote_currency    text NOT NULL,
    fee_rate          numeric NOT NULL,
    status            text NOT NULL,
    cash              numeric NOT NULL,
    net_deposits      numeric NOT NULL,
    realized_pnl      numeric NOT NULL,
    fees_paid         numeric NOT NULL,
    high_water_equity numeric NOT NULL,
    fill_count        bigint NOT NULL,
    rejected_signals  bigint NOT NULL,
    -- closed round trips (flat to flat per symbol) and those with a positive PnL
    trade_count       bigint NOT NULL,
    win_count         bigint NOT NULL,
    -- time-weighted return chain, as in the read model (DOMAIN.md, Returns)
    nav_at_flow       numeric NOT NULL,
    equity_at_flow    numeric NOT NULL,
    version           bigint NOT NULL,
    opened_at         timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    last_seq          bigint NOT NULL
);

CREATE TABLE positions (
    portfolio_id text NOT NULL REFERENCES portfolios ON DELETE CASCADE,
    symbol       text NOT NULL,
    quantity     numeric NOT NULL,
    cost_basis   numeric NOT NULL,
    gross_entry  numeric NOT NULL,
    -- realized PnL of the open round trip so far
    trip_pnl     numeric NOT NULL,
    PRIMARY KEY (portfolio_id, symbol)
);

CREATE TABLE portfolio_strategies (
    portfolio_id text NOT NULL,
    strategy_id  text NOT NULL,
    attached_at  timestamptz NOT NULL,
    PRIMARY KEY (portfolio_id, strategy_id)
);

-- Keyed like the read model's (migration 005): no index on the random trade_id.
CREATE TABLE trades (
    trade_id       uuid NOT NULL,
    portfolio_id   text NOT NULL,
    strategy_id    text NOT NULL,
    symbol         text NOT NULL,
    side           text NOT NULL,
    quantity       numeric NOT NULL,
    price          numeric NOT NULL,
    fee            numeric NOT NULL,
    realized_pnl   numeric NOT NULL,
    cash_after     numeric NOT NULL,
    position_after numeric NOT NULL,
    at             timestamptz NOT NULL,
    stream_seq     bigint NOT NULL,
    PRIMARY KEY (portfolio_id, stream_seq)
);

CREATE TABLE command_replies (
    command_id uuid PRIMARY KEY,
    reply      jsonb NOT NULL
);
";

const LOCK_PORTFOLIO: &str = "
    SELECT user_id, name, quote_currency, fee_rate, status, cash, net_deposits, realized_pnl,
           fees_paid, high_water_equity, fill_count, rejected_signals, trade_count, win_count,
           nav_at_flow, equity_at_flow, version, opened_at, updated_at
    FROM portfolios WHERE portfolio_id = $1 FOR UPDATE";
const NEXT_SEQ: &str = "SELECT nextval('stream_seq')";
const POSITIONS: &str = "
    SELECT symbol, quantity, cost_basis, gross_entry, trip_pnl FROM positions WHERE portfolio_id = $1";
const ATTACHED: &str = "SELECT strategy_id FROM portfolio_strategies WHERE portfolio_id = $1";
const STRATEGY: &str = "
    SELECT user_id, name, status, rules::text AS rules, risk_profile::text AS risk_profile,
           version, created_at, updated_at
    FROM strategies WHERE strategy_id = $1";
const STRATEGY_VERSION: &str = "SELECT version FROM strategies WHERE strategy_id = $1";
const STORED_REPLY: &str = "SELECT reply FROM command_replies WHERE command_id = $1";
const INSERT_REPLY: &str = "INSERT INTO command_replies (command_id, reply) VALUES ($1, $2)";
const INSERT_STRATEGY: &str = "
    INSERT INTO strategies (strategy_id, user_id, name, status, rules, risk_profile, version,
                            created_at, updated_at, last_seq)
    VALUES ($1, $2, $3, 'active', $4, $5, 1, $6, $6, nextval('stream_seq'))
    ON CONFLICT (strategy_id) DO NOTHING
    RETURNING last_seq";
const INSERT_PORTFOLIO: &str = "
    INSERT INTO portfolios (portfolio_id, user_id, name, quote_currency, fee_rate, status, cash,
                            net_deposits, realized_pnl, fees_paid, high_water_equity, fill_count,
                            rejected_signals, trade_count, win_count, nav_at_flow, equity_at_flow,
                            version, opened_at, updated_at, last_seq)
    VALUES ($1, $2, $3, $4, $5, 'open', 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, $6, $7, $7, $8)
    ON CONFLICT (portfolio_id) DO NOTHING";
const UPDATE_PORTFOLIO: &str = "
    UPDATE portfolios SET name = $2, status = $3, cash = $4, net_deposits = $5, realized_pnl = $6,
           fees_paid = $7, high_water_equity = $8, fill_count = $9, rejected_signals = $10,
           trade_count = $11, win_count = $12, nav_at_flow = $13, equity_at_flow = $14,
           version = $15, updated_at = $16, last_seq = $17
    WHERE portfolio_id = $1";
const UPSERT_POSITION: &str = "
    INSERT INTO positions (portfolio_id, symbol, quantity, cost_basis, gross_entry, trip_pnl)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (portfolio_id, symbol) DO UPDATE
    SET quantity = $3, cost_basis = $4, gross_entry = $5, trip_pnl = $6";
const DELETE_POSITION: &str = "DELETE FROM positions WHERE portfolio_id = $1 AND symbol = $2";
const INSERT_TRADE: &str = "
    INSERT INTO trades (trade_id, portfolio_id, strategy_id, symbol, side, quantity, price, fee,
                        realized_pnl, cash_after, position_after, at, stream_seq)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";
const ATTACH: &str = "
    INSERT INTO portfolio_strategies (portfolio_id, strategy_id, attached_at) VALUES ($1, $2, $3)";
const DETACH: &str =
    "DELETE FROM portfolio_strategies WHERE portfolio_id = $1 AND strategy_id = $2";
const CURRENT_SEQ: &str = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM stream_seq";
const PERFORMANCE: &str = "
    SELECT p.portfolio_id, p.user_id, p.name, p.quote_currency, p.fee_rate, p.status, p.cash,
           p.net_deposits, p.realized_pnl, p.fees_paid, p.fill_count, p.rejected_signals,
           p.trade_count, p.win_count, p.nav_at_flow, p.equity_at_flow, p.version,
           p.opened_at, p.updated_at,
           x.symbol, x.quantity, x.cost_basis, x.gross_entry,
           ARRAY(SELECT s.strategy_id FROM portfolio_strategies s
                 WHERE s.portfolio_id = $1 ORDER BY s.strategy_id) AS attached,
           (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM stream_seq) AS as_of_seq
    FROM portfolios p LEFT JOIN positions x ON x.portfolio_id = p.portfolio_id
    WHERE p.portfolio_id = $1
    ORDER BY x.symbol";

/// The endpoints served: (name in `nats micro info`, subject after the prefix).
const ENDPOINTS: [(&str, &str); 4] = [
    ("strategy_create", "cmd.strategy.create"),
    ("portfolio_update", "cmd.portfolio.update"),
    ("signal_execute", "cmd.signal.execute"),
    // Last: once it is listed, every endpoint is subscribed (they are added in order).
    ("portfolio_performance", "query.portfolio.performance"),
];

/// Starts the monolith: a NATS micro service in this process answering the same subjects as
/// CipherHorizon under `prefix` (`<prefix>.cmd.strategy.create`, `<prefix>.cmd.portfolio.update`
/// (ops open, deposit, attach_strategy at least; others may answer bad_request "not in the baseline"),
/// `<prefix>.cmd.signal.execute`, `<prefix>.query.portfolio.performance`), with the same
/// request/reply JSON, backed by its own tables in Postgres schema `schema`. Each command is one
/// Postgres transaction.
///
/// The schema is dropped and created again (a benchmark fixture). The service is named
/// `<prefix>-monolith` (also its queue group); use a prefix no CipherHorizon worker serves.
/// Returns once every endpoint is subscribed; the task ends after `shutdown` fires and the
/// requests in flight are answered.
///
/// # Errors
/// When the database cannot be reached or set up, or the service cannot be registered.
pub async fn start(
    conns: service::Connections,
    database_url: &str,
    schema: &str,
    prefix: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let monolith = Monolith::create(database_url, schema).await?;
    let subjects = Subjects::new(prefix);
    let name = subjects.service_name("monolith");
    let spec = ServiceSpec {
        name: name.clone(),
        description: "CipherHorizon benchmark baseline: monolithic data access in PostgreSQL"
            .into(),
        endpoints: ENDPOINTS
            .iter()
            .map(|(ep, suffix)| EndpointSpec {
                name: (*ep).to_owned(),
                subject: format!("{}.{suffix}", subjects.prefix()),
            })
            .collect(),
        metadata: Default::default(),
    };
    let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel::<String>();
    let client = conns.client.clone();
    let task = tokio::spawn(async move {
        let served = service::serve(
            conns,
            spec,
            Arc::new(monolith),
            Metrics::default(),
            shutdown,
        )
        .await;
        if let Err(e) = served {
            let _ = failed_tx.send(e.to_string());
        }
    });
    // Wait until `$SRV.INFO` lists every endpoint, so that the first request finds a responder.
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    loop {
        if let Ok(e) = failed_rx.try_recv() {
            bail!("monolith service {name}: {e}");
        }
        if task.is_finished() {
            bail!("monolith service {name} stopped before it was registered");
        }
        let info = tokio::time::timeout(
            Duration::from_millis(500),
            client.request(format!("$SRV.INFO.{name}"), bytes::Bytes::new()),
        )
        .await;
        if let Ok(Ok(msg)) = info {
            let listed = serde_json::from_slice::<Value>(&msg.payload)
                .ok()
                .and_then(|v| v["endpoints"].as_array().map(Vec::len))
                .unwrap_or(0);
            if listed >= ENDPOINTS.len() {
                return Ok(task);
            }
        }
        if Instant::now() > deadline {
            task.abort();
            bail!(
                "monolith service {name} did not list its endpoints within {} s",
                REGISTER_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The baseline's request handler: a pool on its schema.
struct Monolith {
    pool: Pool,
}

impl Handler for Monolith {
    async fn handle(&self, endpoint: &str, msg: &Message) -> Result<Value, ApiError> {
        self.dispatch(endpoint, &msg.payload).await
    }
}

/// A portfolio as stored: the domain state plus what only the read side needs.
#[derive(Debug, Clone, Default)]
struct Book {
    state: PortfolioState,
    /// Realized PnL of each open position's current round trip.
    trips: HashMap<String, Decimal>,
    fill_count: i64,
    rejected_signals: i64,
    trade_count: i64,
    win_count: i64,
    nav_at_flow: Decimal,
    equity_at_flow: Decimal,
}

fn db(e: tokio_postgres::Error) -> ApiError {
    DbError::from(e).into()
}

fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(500, "internal", msg)
}

fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && schema.len() <= 63
}

/// Business time truncated to what `timestamptz` stores (microseconds), so that a stored time
/// compares with the next command's exactly as the aggregate saw it.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

fn status_of(s: &str) -> PortfolioStatus {
    if s == "closed" {
        PortfolioStatus::Closed
    } else {
        PortfolioStatus::Open
    }
}

/// The reply of API.md for one stored event.
fn reply(aggregate_id: &str, version: u64, seq: u64, event: &Event) -> Value {
    let mut v = json!({
        "aggregate_id": aggregate_id,
        "version": version,
        "stream_seq": seq,
        "events": [{"type": event.event_type(), "stream_seq": seq, "event_id": Uuid::now_v7()}],
    });
    if let (Some(Value::Object(extra)), Value::Object(map)) = (reply_extra(event), &mut v) {
        map.extend(extra);
    }
    v
}

fn duplicate(mut stored: Value) -> Value {
    stored["duplicate"] = Value::Bool(true);
    stored
}

fn check_expected(common: &Common, kind: &str, id: &str, version: u64) -> Result<(), ApiError> {
    match common.expected_version {
        Some(expected) if expected != version => Err(ApiError::conflict(format!(
            "expected_version {expected}, but {kind} {id} is at version {version}"
        ))),
        _ => Ok(()),
    }
}

/// The time of a command: `at` if given, else now, but never before the aggregate's last event.
fn ctx_for(common: &Common, last_at: Option<DateTime<Utc>>) -> Ctx {
    let now = Utc::now();
    let at = common
        .at
        .unwrap_or_else(|| last_at.map_or(now, |last| last.max(now)));
    Ctx {
        at: micros(at),
        now,
        new_id: Uuid::now_v7(),
    }
}

fn strategy_from_row(strategy_id: &str, r: &Row) -> Result<StrategyState, ApiError> {
    let rules: Vec<StrategyRule> = serde_json::from_str(r.get::<_, &str>("rules"))
        .map_err(|e| internal(format!("strategy {strategy_id}: stored rules: {e}")))?;
    let risk_profile: RiskProfile = serde_json::from_str(r.get::<_, &str>("risk_profile"))
        .map_err(|e| internal(format!("strategy {strategy_id}: stored risk_profile: {e}")))?;
    Ok(StrategyState {
        version: r.get::<_, i64>("version") as u64,
        strategy_id: strategy_id.to_owned(),
        user_id: r.get("user_id"),
        name: r.get("name"),
        rules,
        risk_profile: Some(risk_profile),
        status: if r.get::<_, &str>("status") == "deleted" {
            StrategyStatus::Deleted
        } else {
            StrategyStatus::Active
        },
        created_at: Some(r.get("created_at")),
        updated_at: Some(r.get("updated_at")),
    })
}

impl Book {
    /// The portfolio from its locked row, positions and attachments.
    fn from_rows(portfolio_id: &str, p: &Row, positions: &[Row], attached: &[Row]) -> Book {
        let mut book = Book {
            state: PortfolioState {
                version: p.get::<_, i64>("version") as u64,
                portfolio_id: portfolio_id.to_owned(),
                user_id: p.get("user_id"),
                name: p.get("name"),
                quote_currency: p.get("quote_currency"),
                fee_rate: p.get("fee_rate"),
                status: status_of(p.get("status")),
                cash: p.get("cash"),
                net_deposits: p.get("net_deposits"),
                realized_pnl: p.get("realized_pnl"),
                fees_paid: p.get("fees_paid"),
                attached_strategies: attached.iter().map(|r| r.get(0)).collect(),
                positions: BTreeMap::new(),
                high_water_equity: p.get("high_water_equity"),
                opened_at: Some(p.get("opened_at")),
                last_at: Some(p.get("updated_at")),
            },
            trips: HashMap::new(),
            fill_count: p.get("fill_count"),
            rejected_signals: p.get("rejected_signals"),
            trade_count: p.get("trade_count"),
            win_count: p.get("win_count"),
            nav_at_flow: p.get("nav_at_flow"),
            equity_at_flow: p.get("equity_at_flow"),
        };
        for r in positions {
            let symbol: String = r.get("symbol");
            book.trips.insert(symbol.clone(), r.get("trip_pnl"));
            book.state.positions.insert(
                symbol,
                Position {
                    quantity: r.get("quantity"),
                    cost_basis: r.get("cost_basis"),
                    gross_entry: r.get("gross_entry"),
                },
            );
        }
        book
    }

    /// Folds `event` into the state and the read-side figures.
    fn apply(&mut self, event: &Event, at: DateTime<Utc>) {
        match event {
            Event::FundsDeposited(e) => self.flow(e.amount),
            Event::FundsWithdrawn(e) => self.flow(-e.amount),
            Event::TradeExecuted(t) => self.trade(t),
            Event::TradeSignalRejected(_) => self.rejected_signals += 1,
            _ => {}
        }
        self.state.apply(event, at);
    }

    /// An external flow: chains the NAV index with the equity just before it (no marks here:
    /// positions at their entry value), then records the equity just after it. Called before
    /// the state applies the flow.
    fn flow(&mut self, signed_amount: Decimal) {
        let before = self.state.valuation(&BTreeMap::new()).equity;
        if self.equity_at_flow > Decimal::ZERO {
            if let Some(nav) = grow(self.nav_at_flow, before, self.equity_at_flow) {
                self.nav_at_flow = nav.round_dp(20);
            }
        }
        self.equity_at_flow = before.saturating_add(signed_amount);
    }

    /// Fill and round-trip counters of a trade; called before the state applies it.
    fn trade(&mut self, t: &TradeExecuted) {
        self.fill_count += 1;
        let trip = self
            .trips
            .get(&t.symbol)
            .copied()
            .unwrap_or_default()
            .saturating_add(t.realized_pnl);
        if t.position_after.is_zero() {
            self.trips.remove(&t.symbol);
            self.trade_count += 1;
            if trip > Decimal::ZERO {
                self.win_count += 1;
            }
        } else {
            self.trips.insert(t.symbol.clone(), trip);
        }
    }
}

impl Monolith {
    /// Drops and creates `schema` with the baseline's tables, and opens a pool on it.
    async fn create(database_url: &str, schema: &str) -> anyhow::Result<Monolith> {
        if !valid_schema(schema) {
            bail!("monolith schema {schema:?}: expected a plain SQL identifier");
        }
        ch_runtime::pg::ensure_database(database_url)
            .await
            .context("monolith: creating the database")?;
        let admin = ch_runtime::pg::connect(database_url, None)
            .await
            .context("monolith: connecting to PostgreSQL")?;
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
                 SET search_path TO {schema}; {DDL}"
            ))
            .await
            .with_context(|| format!("monolith: creating schema {schema}"))?;
        drop(admin);
        let pool = ch_runtime::pg::PoolSpec {
            database_url,
            schema,
            size: POOL_SIZE,
            access: ch_runtime::pg::Access::ReadWrite,
            application_name: "chctl-bench-monolith",
        }
        .pool()?;
        drop(pool.get().await.context("monolith: opening the pool")?);
        Ok(Monolith { pool })
    }

    async fn dispatch(&self, endpoint: &str, body: &[u8]) -> Result<Value, ApiError> {
        match endpoint {
            "strategy_create" => self.command(Endpoint::StrategyCreate, body).await,
            "portfolio_update" => self.command(Endpoint::PortfolioUpdate, body).await,
            "signal_execute" => self.command(Endpoint::SignalExecute, body).await,
            "portfolio_performance" => self.performance(body).await,
            other => Err(ApiError::not_found(format!("no endpoint {other}"))),
        }
    }

    /// Parses and runs one command in one transaction.
    async fn command(&self, endpoint: Endpoint, body: &[u8]) -> Result<Value, ApiError> {
        let mut parsed = parse_command(endpoint, body)?;
        if let Target::Strategy {
            strategy_id: None, ..
        } = &parsed.target
        {
            parsed.target.set_strategy_id(Uuid::now_v7().to_string());
        }
        match &parsed.target {
            Target::Strategy {
                strategy_id: Some(id),
                command: command @ StrategyCommand::Create { .. },
            } => self.strategy_create(id, &parsed.common, command).await,
            Target::Portfolio {
                portfolio_id,
                command,
            } => {
                self.portfolio_command(portfolio_id, &parsed.common, command)
                    .await
            }
            _ => Err(ApiError::bad_request(format!(
                "{}: not in the baseline",
                endpoint.name()
            ))),
        }
    }

    async fn strategy_create(
        &self,
        id: &str,
        common: &Common,
        command: &StrategyCommand,
    ) -> Result<Value, ApiError> {
        let mut conn = self.pool.get().await.map_err(DbError::from)?;
        let tx = conn.transaction().await.map_err(db)?;
        let (s_version, s_stored, s_insert, s_reply) = futures::try_join!(
            tx.prepare_cached(STRATEGY_VERSION),
            tx.prepare_cached(STORED_REPLY),
            tx.prepare_cached(INSERT_STRATEGY),
            tx.prepare_cached(INSERT_REPLY),
        )
        .map_err(db)?;
        let by_id: [&(dyn ToSql + Sync); 1] = [&id];
        let (existing, stored) = futures::try_join!(tx.query_opt(&s_version, &by_id), async {
            match &common.command_id {
                Some(c) => tx.query_opt(&s_stored, &[c]).await,
                None => Ok(None),
            }
        })
        .map_err(db)?;
        if let Some(r) = stored {
            return Ok(duplicate(r.get(0)));
        }
        let state = StrategyState {
            version: existing.map_or(0, |r| r.get::<_, i64>(0) as u64),
            ..StrategyState::default()
        };
        check_expected(common, "strategy", id, state.version)?;
        let ctx = ctx_for(common, None);
        let event = single(state.decide(command, &(), &ctx)?)?;
        let Event::StrategyCreated(e) = &event else {
            return Err(internal("strategy.create decided no StrategyCreated"));
        };
        let rules = serde_json::to_value(&e.rules).map_err(|e| internal(e.to_string()))?;
        let profile = serde_json::to_value(&e.risk_profile).map_err(|e| internal(e.to_string()))?;
        let Some(row) = tx
            .query_opt(
                &s_insert,
                &[
                    &e.strategy_id,
                    &e.user_id,
                    &e.name,
                    &rules,
                    &profile,
                    &ctx.at,
                ],
            )
            .await
            .map_err(db)?
        else {
            return Err(DomainError::AlreadyExists(format!("strategy {id} already exists")).into());
        };
        let seq = row.get::<_, i64>(0) as u64;
        let v = reply(id, 1, seq, &event);
        if let Some(c) = &common.command_id {
            tx.execute(&s_reply, &[c, &v]).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(v)
    }

    async fn portfolio_command(
        &self,
        id: &str,
        common: &Common,
        command: &PortfolioCommand,
    ) -> Result<Value, ApiError> {
        let strategy_id = match command {
            PortfolioCommand::AttachStrategy { strategy_id }
            | PortfolioCommand::DetachStrategy { strategy_id } => Some(strategy_id.as_str()),
            PortfolioCommand::ExecuteSignal(s) => Some(s.strategy_id.as_str()),
            _ => None,
        };
        let mut conn = self.pool.get().await.map_err(DbError::from)?;
        let tx = conn.transaction().await.map_err(db)?;
        // Cache hits after a connection's first command: no round trip.
        let (s_lock, s_seq, s_pos, s_att, s_strat, s_stored) = futures::try_join!(
            tx.prepare_cached(LOCK_PORTFOLIO),
            tx.prepare_cached(NEXT_SEQ),
            tx.prepare_cached(POSITIONS),
            tx.prepare_cached(ATTACHED),
            tx.prepare_cached(STRATEGY),
            tx.prepare_cached(STORED_REPLY),
        )
        .map_err(db)?;
        // One round trip; the lock comes first, so the other reads see the current rows.
        let by_id: [&(dyn ToSql + Sync); 1] = [&id];
        let (row, seq, positions, attached, strategy, stored) = futures::try_join!(
            tx.query_opt(&s_lock, &by_id),
            tx.query_one(&s_seq, &[]),
            tx.query(&s_pos, &by_id),
            tx.query(&s_att, &by_id),
            async {
                match strategy_id {
                    Some(s) => tx.query_opt(&s_strat, &[&s]).await,
                    None => Ok(None),
                }
            },
            async {
                match &common.command_id {
                    Some(c) => tx.query_opt(&s_stored, &[c]).await,
                    None => Ok(None),
                }
            },
        )
        .map_err(db)?;
        if let Some(r) = stored {
            return Ok(duplicate(r.get(0)));
        }
        let mut book = match &row {
            Some(p) => Book::from_rows(id, p, &positions, &attached),
            None => Book {
                nav_at_flow: Decimal::ONE,
                ..Book::default()
            },
        };
        check_expected(common, "portfolio", id, book.state.version)?;
        let facts = PortfolioFacts {
            strategy: match (strategy_id, &strategy) {
                (Some(s), Some(r)) => Some(strategy_from_row(s, r)?),
                _ => None,
            },
            marks: BTreeMap::new(),
        };
        let ctx = ctx_for(common, book.state.last_at);
        let event = match book.state.decide(command, &facts, &ctx) {
            Ok(events) => single(events)?,
            Err(DomainError::NotFound(_)) if book.state.version == 0 => {
                return Err(ApiError::not_found(format!("portfolio {id} not found")));
            }
            Err(e) => return Err(e.into()),
        };
        let seq_i: i64 = seq.get(0);
        book.apply(&event, ctx.at);
        let v = reply(id, book.state.version, seq_i as u64, &event);
        self.write(&tx, id, &book, &event, seq_i, ctx.at, common, &v)
            .await?;
        tx.commit().await.map_err(db)?;
        Ok(v)
    }

    /// The writes of one decided portfolio event, pipelined.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        id: &str,
        book: &Book,
        event: &Event,
        seq: i64,
        at: DateTime<Utc>,
        common: &Common,
        reply: &Value,
    ) -> Result<(), ApiError> {
        let s = &book.state;
        let (s_main, s_extra, s_trade, s_reply) = futures::try_join!(
            tx.prepare_cached(if matches!(event, Event::PortfolioOpened(_)) {
                INSERT_PORTFOLIO
            } else {
                UPDATE_PORTFOLIO
            }),
            tx.prepare_cached(match event {
                Event::TradeExecuted(t) if t.position_after.is_zero() => DELETE_POSITION,
                Event::StrategyAttached(_) => ATTACH,
                Event::StrategyDetached(_) => DETACH,
                _ => UPSERT_POSITION,
            }),
            tx.prepare_cached(INSERT_TRADE),
            tx.prepare_cached(INSERT_REPLY),
        )
        .map_err(db)?;
        let version = s.version as i64;
        let main = async {
            if let Event::PortfolioOpened(e) = event {
                let n = tx
                    .execute(
                        &s_main,
                        &[
                            &id,
                            &e.user_id,
                            &e.name,
                            &e.quote_currency,
                            &e.fee_rate,
                            &version,
                            &at,
                            &seq,
                        ],
                    )
                    .await?;
                return Ok(n);
            }
            let params: [&(dyn ToSql + Sync); 17] = [
                &id,
                &s.name,
                &s.status.as_str(),
                &s.cash,
                &s.net_deposits,
                &s.realized_pnl,
                &s.fees_paid,
                &s.high_water_equity,
                &book.fill_count,
                &book.rejected_signals,
                &book.trade_count,
                &book.win_count,
                &book.nav_at_flow,
                &book.equity_at_flow,
                &version,
                &at,
                &seq,
            ];
            tx.execute(&s_main, &params).await
        };
        let extra = async {
            match event {
                Event::TradeExecuted(t) if t.position_after.is_zero() => {
                    tx.execute(&s_extra, &[&id, &t.symbol]).await
                }
                Event::TradeExecuted(t) => {
                    let trip = book.trips.get(&t.symbol).copied().unwrap_or_default();
                    tx.execute(
                        &s_extra,
                        &[
                            &id,
                            &t.symbol,
                            &t.position_after,
                            &t.cost_basis_after,
                            &t.gross_entry_after,
                            &trip,
                        ],
                    )
                    .await
                }
                Event::StrategyAttached(e) => {
                    tx.execute(&s_extra, &[&id, &e.strategy_id, &at]).await
                }
                Event::StrategyDetached(e) => tx.execute(&s_extra, &[&id, &e.strategy_id]).await,
                _ => Ok(0),
            }
        };
        let trade = async {
            match event {
                Event::TradeExecuted(t) => {
                    tx.execute(
                        &s_trade,
                        &[
                            &t.trade_id,
                            &id,
                            &t.strategy_id,
                            &t.symbol,
                            &t.side.as_str(),
                            &t.quantity,
                            &t.price,
                            &t.fee,
                            &t.realized_pnl,
                            &t.cash_after,
                            &t.position_after,
                            &at,
                            &seq,
                        ],
                    )
                    .await
                }
                _ => Ok(0),
            }
        };
        let stored = async {
            match &common.command_id {
                Some(c) => tx.execute(&s_reply, &[c, reply]).await,
                None => Ok(0),
            }
        };
        let (n, ..) = futures::try_join!(main, extra, trade, stored).map_err(db)?;
        if n == 0 {
            // Another open of the same id committed between our lock read and our insert.
            return Err(
                DomainError::AlreadyExists(format!("portfolio {id} already exists")).into(),
            );
        }
        Ok(())
    }

    /// `query.portfolio.performance` from the same tables, in one statement.
    async fn performance(&self, body: &[u8]) -> Result<Value, ApiError> {
        let q: PerformanceQuery = queries::parse(body)?;
        validate_id("portfolio_id", &q.portfolio_id).map_err(ApiError::from)?;
        let timeout = timeout_from(q.timeout_ms)?;
        let conn = self.pool.get().await.map_err(DbError::from)?;
        if let Some(min) = q.min_stream_seq {
            // Never behind in practice (see the module docs); bounded like the real query.
            let s = conn.prepare_cached(CURRENT_SEQ).await.map_err(db)?;
            let deadline = Instant::now() + timeout;
            loop {
                let as_of = conn.query_one(&s, &[]).await.map_err(db)?.get::<_, i64>(0);
                if as_of as u64 >= min {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::stale(format!(
                        "min_stream_seq {min} not reached within {} ms (as_of_seq {as_of})",
                        timeout.as_millis()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let s = conn.prepare_cached(PERFORMANCE).await.map_err(db)?;
        let rows = conn.query(&s, &[&q.portfolio_id]).await.map_err(db)?;
        let Some(p) = rows.first() else {
            return Err(ApiError::not_found(format!(
                "portfolio {} not found",
                q.portfolio_id
            )));
        };
        Ok(performance_reply(p, &rows))
    }
}

fn single(events: Vec<Event>) -> Result<Event, ApiError> {
    let n = events.len();
    let mut it = events.into_iter();
    match (it.next(), n) {
        (Some(e), 1) => Ok(e),
        _ => Err(internal(format!(
            "a command decided {n} events, expected 1"
        ))),
    }
}

fn plain(d: Decimal) -> String {
    ch_domain::money::plain(d)
}

/// The performance reply (the shape of `ch_readmodel::queries::portfolio_performance`) from the
/// rows of [`PERFORMANCE`]: the portfolio's columns repeated on each of its positions.
fn performance_reply(p: &Row, rows: &[Row]) -> Value {
    let mut state = PortfolioState {
        cash: p.get("cash"),
        ..PortfolioState::default()
    };
    for r in rows {
        if let Some(symbol) = r.get::<_, Option<String>>("symbol") {
            state.positions.insert(
                symbol,
                Position {
                    quantity: r.get("quantity"),
                    cost_basis: r.get("cost_basis"),
                    gross_entry: r.get("gross_entry"),
                },
            );
        }
    }
    // No marks in the baseline: each position is valued at its entry value.
    let valuation = state.valuation(&BTreeMap::new());
    let positions: Vec<Value> = state
        .positions
        .iter()
        .map(|(symbol, pos)| {
            let per_unit = |x: Decimal| x.checked_div(pos.quantity).map(|d| plain(d.round_dp(8)));
            json!({
                "symbol": symbol,
                "quantity": plain(pos.quantity),
                "avg_cost": per_unit(pos.cost_basis),
                "avg_entry_price": per_unit(pos.gross_entry),
                "cost_basis": plain(pos.cost_basis),
                "mark_price": Value::Null,
                "priced": false,
                "market_value": plain(pos.gross_entry),
                "unrealized_pnl": plain(pos.gross_entry.saturating_sub(pos.cost_basis)),
            })
        })
        .collect();
    let equity = valuation.equity;
    let nav: Decimal = p.get("nav_at_flow");
    let e_flow: Decimal = p.get("equity_at_flow");
    let total_return = if e_flow > Decimal::ZERO {
        grow(nav, equity, e_flow).map(|x| (x - Decimal::ONE).round_dp(10))
    } else {
        Some((nav - Decimal::ONE).round_dp(10))
    };
    let closed: i64 = p.get("trade_count");
    let wins: i64 = p.get("win_count");
    let win_rate = ch_readmodel::win_rate(wins, closed).map(plain);
    let attached: Vec<String> = p.get("attached");
    json!({
        "portfolio_id": p.get::<_, String>("portfolio_id"),
        "user_id": p.get::<_, String>("user_id"),
        "name": p.get::<_, String>("name"),
        "quote_currency": p.get::<_, String>("quote_currency"),
        "fee_rate": plain(p.get("fee_rate")),
        "status": p.get::<_, String>("status"),
        "cash": plain(state.cash),
        "positions": positions,
        "equity": plain(equity),
        "net_deposits": plain(p.get("net_deposits")),
        "realized_pnl": plain(p.get("realized_pnl")),
        "unrealized_pnl": plain(valuation.unrealized_pnl),
        "fees_paid": plain(p.get("fees_paid")),
        "total_return": total_return.map(plain),
        "trade_count": closed,
        "fill_count": p.get::<_, i64>("fill_count"),
        "win_rate": win_rate,
        "rejected_signals": p.get::<_, i64>("rejected_signals"),
        "attached_strategies": attached,
        "opened_at": p.get::<_, DateTime<Utc>>("opened_at"),
        "updated_at": p.get::<_, DateTime<Utc>>("updated_at"),
        "version": p.get::<_, i64>("version"),
        "as_of_seq": p.get::<_, i64>("as_of_seq"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database_url() -> String {
        std::env::var("CH_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ch_test".into())
    }

    /// A monolith on a fresh schema, dropped again by [`Fixture::drop_schema`].
    struct Fixture {
        m: Monolith,
        schema: String,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let u = Uuid::now_v7().simple().to_string();
            let schema = format!("mono_t{}", &u[u.len() - 12..]);
            let m = Monolith::create(&database_url(), &schema)
                .await
                .expect("PostgreSQL at CH_TEST_DATABASE_URL (default 127.0.0.1:5432/ch_test)");
            Fixture { m, schema }
        }

        async fn ok(&self, endpoint: &str, body: Value) -> Value {
            let bytes = serde_json::to_vec(&body).expect("json");
            match self.m.dispatch(endpoint, &bytes).await {
                Ok(v) => v,
                Err(e) => panic!("{endpoint} {body}: {e}"),
            }
        }

        async fn err(&self, endpoint: &str, body: Value) -> ApiError {
            let bytes = serde_json::to_vec(&body).expect("json");
            match self.m.dispatch(endpoint, &bytes).await {
                Ok(v) => panic!("{endpoint} {body}: expected an error, got {v}"),
                Err(e) => e,
            }
        }

        async fn perf(&self, id: &str) -> Value {
            self.ok("portfolio_performance", json!({"portfolio_id": id}))
                .await
        }

        async fn signal(&self, side: &str, qty: &str, price: &str, fee: Option<&str>) -> Value {
            let mut body = json!({"portfolio_id": "p-1", "strategy_id": "s-1", "symbol": "BTC-USDT",
                                  "side": side, "quantity": qty, "price": price});
            if let Some(f) = fee {
                body["fee"] = json!(f);
            }
            self.ok("signal_execute", body).await
        }

        async fn drop_schema(self) {
            let admin = ch_runtime::pg::connect(&database_url(), None)
                .await
                .expect("connect");
            admin
                .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
                .await
                .expect("drop schema");
        }
    }

    fn strategy_body() -> Value {
        json!({
            "strategy_id": "s-1", "user_id": "u-1", "strategy_name": "trend",
            "rules": [{"rule_id": "r1", "symbol": "*", "stake": {"mode": "fixed_quote", "value": "100"}}],
            "risk_profile": {"allowed_symbols": ["BTC-USDT", "ETH-USDT"], "max_open_positions": 2,
                             "max_order_notional": "50000", "max_position_notional": "100000",
                             "max_leverage": 1}
        })
    }

    async fn setup(f: &Fixture) {
        let s = f.ok("strategy_create", strategy_body()).await;
        assert_eq!(s["aggregate_id"], "s-1");
        assert_eq!(s["version"], 1);
        assert_eq!(s["events"][0]["type"], "StrategyCreated");
        let open = f
            .ok(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "open", "user_id": "u-1", "name": "main",
                       "quote_currency": "USDT", "fee_rate": "0.001"}),
            )
            .await;
        assert_eq!(open["version"], 1);
        assert!(open["stream_seq"].as_u64().unwrap() > s["stream_seq"].as_u64().unwrap());
        let dep = f
            .ok(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "deposit", "amount": 25000}),
            )
            .await;
        assert_eq!(dep["version"], 2);
        assert_eq!(dep["events"][0]["type"], "FundsDeposited");
        let att = f
            .ok(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "attach_strategy", "strategy_id": "s-1"}),
            )
            .await;
        assert_eq!(att["version"], 3);
    }

    /// DOMAIN.md's E1 through the handler, without NATS: the same replies as CipherHorizon and
    /// the same figures in the performance query.
    #[tokio::test]
    async fn e1_average_cost_round_trip() {
        let f = Fixture::new().await;
        setup(&f).await;

        let b1 = f.signal("buy", "0.5", "20000", None).await;
        assert_eq!(b1["status"], "executed", "{b1}");
        assert_eq!(b1["version"], 4);
        assert_eq!(b1["trade"]["fee"], "10");
        assert_eq!(b1["trade"]["cash_after"], "14990");
        assert_eq!(b1["trade"]["position_after"], "0.5");

        let b2 = f.signal("buy", "0.5", "22000", None).await;
        assert_eq!(b2["trade"]["fee"], "11");
        assert_eq!(b2["trade"]["cash_after"], "3979");
        let p = f.perf("p-1").await;
        assert_eq!(p["cash"], "3979");
        assert_eq!(p["positions"][0]["quantity"], "1");
        assert_eq!(p["positions"][0]["avg_cost"], "21021");
        assert_eq!(p["positions"][0]["cost_basis"], "21021");
        assert_eq!(p["positions"][0]["mark_price"], Value::Null);
        // Unmarked: valued at its entry value (21000), so equity = 3979 + 21000.
        assert_eq!(p["equity"], "24979");
        assert_eq!(p["fees_paid"], "21");

        let s1 = f.signal("sell", "0.4", "25000", Some("8")).await;
        assert_eq!(s1["trade"]["realized_pnl"], "1583.6");
        assert_eq!(s1["trade"]["cash_after"], "13971");
        assert_eq!(s1["trade"]["position_after"], "0.6");
        let p = f.perf("p-1").await;
        assert_eq!(p["positions"][0]["cost_basis"], "12612.6");
        assert_eq!(p["realized_pnl"], "1583.6");
        assert_eq!(p["trade_count"], 0);

        // A rejected signal is a reply, not an error; it only bumps the count and the version.
        let r = f.signal("sell", "2", "25000", None).await;
        assert_eq!(r["status"], "rejected");
        assert_eq!(r["reason"], "OVERSELL");
        assert_eq!(r["version"], 7);

        let s2 = f.signal("sell", "0.6", "19000", None).await;
        assert_eq!(s2["trade"]["fee"], "11.4");
        assert_eq!(s2["trade"]["realized_pnl"], "-1224");
        assert_eq!(s2["trade"]["cash_after"], "25359.6");
        assert_eq!(s2["trade"]["position_after"], "0");

        let p = f.perf("p-1").await;
        assert_eq!(p["cash"], "25359.6");
        assert_eq!(p["positions"], json!([]));
        assert_eq!(p["equity"], "25359.6");
        assert_eq!(p["net_deposits"], "25000");
        assert_eq!(p["realized_pnl"], "359.6");
        assert_eq!(p["unrealized_pnl"], "0");
        assert_eq!(p["fees_paid"], "40.4");
        assert_eq!(p["fill_count"], 4);
        assert_eq!(p["trade_count"], 1);
        assert_eq!(p["win_rate"], "1");
        assert_eq!(p["rejected_signals"], 1);
        assert_eq!(p["total_return"], "0.014384");
        assert_eq!(p["attached_strategies"], json!(["s-1"]));
        assert_eq!(p["version"], 8);
        assert!(p["as_of_seq"].as_u64().unwrap() >= s2["stream_seq"].as_u64().unwrap());

        // The stored trades carry the fills.
        let conn = f.m.pool.get().await.unwrap();
        let n: i64 = conn
            .query_one(
                "SELECT count(*) FROM trades WHERE portfolio_id = 'p-1'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 4);
        drop(conn);
        f.drop_schema().await;
    }

    #[tokio::test]
    async fn errors_and_idempotency_match_the_api() {
        let f = Fixture::new().await;
        setup(&f).await;

        let e = f.err("performance_typo", json!({})).await;
        assert_eq!(e.status, 404);
        let e = f.perf_err("nope").await;
        assert_eq!((e.status, e.code.as_ref()), (404, "not_found"));
        let e = f
            .err(
                "portfolio_update",
                json!({"portfolio_id": "p-9", "op": "deposit", "amount": "1"}),
            )
            .await;
        assert_eq!(
            (e.status, e.message.as_str()),
            (404, "portfolio p-9 not found")
        );
        let e = f
            .err(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "open", "user_id": "u-1", "name": "x",
                       "quote_currency": "USDT"}),
            )
            .await;
        assert_eq!(e.code, "already_exists");
        let e = f.err("strategy_create", strategy_body()).await;
        assert_eq!(e.code, "already_exists");
        let e = f
            .err(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "withdraw", "amount": "30000"}),
            )
            .await;
        assert_eq!((e.status, e.code.as_ref()), (422, "insufficient_funds"));
        let e = f
            .err(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "deposit", "amount": "1", "typo": 1}),
            )
            .await;
        assert_eq!(e.code, "bad_request");
        let e = f
            .err(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "deposit", "amount": "1",
                       "expected_version": 2}),
            )
            .await;
        assert_eq!(e.code, "conflict");
        let e = f
            .err(
                "portfolio_update",
                json!({"portfolio_id": "p-1", "op": "attach_strategy", "strategy_id": "s-404"}),
            )
            .await;
        assert_eq!(e.status, 404);

        // A command_id is applied once and answered the same way again.
        let c = Uuid::now_v7().to_string();
        let body = json!({"portfolio_id": "p-1", "op": "deposit", "amount": "100",
                          "command_id": c, "expected_version": 3});
        let first = f.ok("portfolio_update", body.clone()).await;
        let again = f.ok("portfolio_update", body).await;
        assert_eq!(again["duplicate"], true);
        assert_eq!(again["stream_seq"], first["stream_seq"]);
        assert_eq!(again["version"], 4);
        let p = f.perf("p-1").await;
        assert_eq!(p["cash"], "25100");
        assert_eq!(p["version"], 4);

        // Concurrent commands on one portfolio serialize on its row.
        let m = Arc::new(f);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move {
                    m.ok(
                        "portfolio_update",
                        json!({"portfolio_id": "p-1", "op": "deposit", "amount": "1.5"}),
                    )
                    .await["version"]
                        .as_u64()
                        .unwrap()
                })
            })
            .collect();
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap());
        }
        versions.sort_unstable();
        assert_eq!(versions, (5..21).collect::<Vec<u64>>());
        let p = m.perf("p-1").await;
        assert_eq!(p["cash"], "25124");
        let Ok(f) = Arc::try_unwrap(m) else {
            panic!("fixture still shared")
        };
        f.drop_schema().await;
    }

    impl Fixture {
        async fn perf_err(&self, id: &str) -> ApiError {
            self.err("portfolio_performance", json!({"portfolio_id": id}))
                .await
        }
    }
}

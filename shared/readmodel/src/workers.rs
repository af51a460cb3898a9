//! The read-side workers: projector runner and query responder, as the binaries run them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Message;
use ch_runtime::app::{boxed_main, App, MainFuture};
use ch_runtime::error::{ApiError, DbError};
use ch_runtime::eventstore::sparse_filter;
use ch_runtime::pg::Retirement;
use ch_runtime::projector::{self, BatchConfig, Projection, Projector};
use ch_runtime::query::{timeout_from, Progress, Reached};
use ch_runtime::service::{self, Handler};
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

use crate::analysis::{self, AnalysisQuery, LeaderboardQuery};
use crate::queries::{self, Consistency, PerformanceQuery, StrategyGetQuery, StrategyListQuery};
use crate::{PortfolioProjection, StrategyProjection, MIGRATIONS};
use ch_runtime::pg::Claim;

/// Applies the read-model migrations to the configured schema (idempotent), and claims the
/// schema for the configured stream.
///
/// # Errors
/// [`DbError`] when the database cannot be reached, a migration fails, or the schema holds
/// another stream's read models.
pub async fn migrate(app: &App) -> Result<(), DbError> {
    let (url, schema) = (&app.cfg.database_url, &app.cfg.db_schema);
    ch_runtime::pg::ensure_database(url).await?;
    ch_runtime::pg::migrate(url, schema, MIGRATIONS).await?;
    let stream = app.subjects.stream_name();
    ch_runtime::pg::check_stream(url, schema, &stream, head(app), Claim::Yes).await
}

/// The stream's last sequence, for the schema's claim (awaited after the checkpoints).
async fn head(app: &App) -> Result<u64, DbError> {
    app.store
        .last_seq()
        .await
        .map_err(|e| DbError::Unavailable(format!("the stream's last sequence: {e}")))
}

/// What a worker does about the read-model migrations as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Schema {
    /// Applies the missing ones (projectors).
    Migrate,
    /// Requires them applied, and creates nothing (workers that only read).
    Require,
}

/// The schema ready as `schema` says, unless `shutdown` comes first (a worker stopped during
/// its start, waiting for the database or another worker's migration lock): `false` then.
///
/// # Errors
/// As [`migrate`]; with [`Schema::Require`], a schema that lacks migrations.
pub(crate) async fn migrated(
    app: &App,
    shutdown: &CancellationToken,
    schema: Schema,
) -> Result<bool, DbError> {
    let ready = async {
        match schema {
            Schema::Migrate => migrate(app).await,
            Schema::Require => {
                let (url, name) = (&app.cfg.database_url, &app.cfg.db_schema);
                ch_runtime::pg::require_migrations(url, name, MIGRATIONS).await?;
                let stream = app.subjects.stream_name();
                ch_runtime::pg::check_stream(url, name, &stream, head(app), Claim::No).await
            }
        }
    };
    tokio::select! {
        done = ready => done.map(|()| true),
        () = shutdown.cancelled() => {
            tracing::info!(worker = %app.worker, "stopped before it had started");
            Ok(false)
        }
    }
}

/// The read-your-writes waiter of a worker that reads `projections`, knowing which of them
/// are sparse (`strategy`).
///
/// # Errors
/// When the progress subscriptions fail.
pub async fn progress(
    app: &App,
    projections: &[&'static str],
) -> Result<Progress, async_nats::SubscribeError> {
    let portfolio = PortfolioProjection::default();
    let sparse = [
        (portfolio.name(), portfolio.consumer_json()),
        (
            StrategyProjection.name(),
            StrategyProjection.consumer_json(),
        ),
    ]
    .into_iter()
    .filter(|(name, _)| projections.contains(name))
    .filter_map(|(name, json)| Some((name, sparse_filter(json, &app.subjects)?)));
    Ok(Progress::subscribe(&app.client, &app.subjects, projections)
        .await?
        .with_sparse(app.store.clone(), sparse))
}

/// Builds the projector of `projection` with the configured batching.
///
/// # Errors
/// [`DbError`] when the pool cannot be built.
pub fn projector<P: Projection>(app: &App, projection: P) -> Result<Projector<P>, DbError> {
    // One session holds the projection's lock for as long as the projector leads (a worker,
    // or `chctl rebuild` replaying): with a pool of one, every batch would wait for a session
    // and fail, for good.
    if app.cfg.db_pool_size < 2 {
        return Err(DbError::Unavailable(format!(
            "CH_DB_POOL={}: a projector needs at least 2 sessions (one holds its lock)",
            app.cfg.db_pool_size
        )));
    }
    Ok(Projector::new(
        projection,
        app.store.clone(),
        app.pool()?,
        app.client.clone(),
        BatchConfig::from_config(&app.cfg),
        app.metrics.clone(),
    )
    .with_service_metadata(app.cfg.service_metadata()))
}

/// Runs a projector worker until `shutdown`.
///
/// # Errors
/// When the pool is below 2 sessions, the schema cannot be migrated or the projector fails
/// for good.
pub async fn run_projector<P: Projection>(
    app: App,
    projection: P,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let projector = projector(&app, projection)?;
    if !migrated(&app, &shutdown, Schema::Migrate).await? {
        return Ok(());
    }
    projector::run(projector, app.intake.clone(), shutdown).await
}

/// `proj-portfolio`'s whole life (see [`ch_runtime::app::boxed_main`]).
#[inline(never)]
pub fn portfolio_projector_main(cfg: ch_runtime::Config) -> MainFuture {
    boxed_main(cfg, "proj-portfolio", |app, shutdown| {
        run_projector(app, PortfolioProjection::default(), shutdown)
    })
}

/// `proj-strategy`'s whole life (see [`ch_runtime::app::boxed_main`]).
#[inline(never)]
pub fn strategy_projector_main(cfg: ch_runtime::Config) -> MainFuture {
    boxed_main(cfg, "proj-strategy", |app, shutdown| {
        run_projector(app, StrategyProjection, shutdown)
    })
}

/// A query worker's whole life: serves `queries` as `worker` (see
/// [`ch_runtime::app::boxed_main`]).
#[inline(never)]
pub fn queries_main(
    cfg: ch_runtime::Config,
    worker: &'static str,
    queries: &'static [Query],
) -> MainFuture {
    boxed_main(cfg, worker, move |app, shutdown| {
        run_queries(app, queries, shutdown)
    })
}

/// The query endpoints of API.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    PortfolioPerformance,
    PortfolioAnalysis,
    StrategyList,
    StrategyGet,
    StrategyLeaderboard,
}

impl Query {
    /// Every query endpoint (a new variant belongs here too: `chctl req` finds names here).
    pub const ALL: [Query; 5] = [
        Query::PortfolioPerformance,
        Query::PortfolioAnalysis,
        Query::StrategyList,
        Query::StrategyGet,
        Query::StrategyLeaderboard,
    ];

    /// The query whose subject suffix is `name`.
    pub fn from_name(name: &str) -> Option<Query> {
        Query::ALL.into_iter().find(|q| q.name() == name)
    }

    /// The subject suffix, e.g. `portfolio.performance`.
    pub fn name(self) -> &'static str {
        match self {
            Query::PortfolioPerformance => "portfolio.performance",
            Query::PortfolioAnalysis => "portfolio.analysis",
            Query::StrategyList => "strategy.list",
            Query::StrategyGet => "strategy.get",
            Query::StrategyLeaderboard => "strategy.leaderboard",
        }
    }

    /// The read models a reply draws on: `min_stream_seq` waits for them, and `as_of_seq` is
    /// the lowest of their checkpoints.
    fn projections(self) -> &'static [&'static str] {
        match self {
            Query::PortfolioPerformance | Query::PortfolioAnalysis => &["portfolio"],
            Query::StrategyList => &["strategy"],
            Query::StrategyGet | Query::StrategyLeaderboard => &["strategy", "portfolio"],
        }
    }
}

struct QueryHandler {
    pool: Pool,
    /// Takes the pool's sessions out of use when one turns out to have been ended.
    retirement: Retirement,
    progress: Progress,
    queries: Vec<Query>,
    /// `CH_QUERY_TIMEOUT_MS`: the bound of a read (see [`QueryHandler::bounded`]).
    read_timeout: Duration,
}

impl QueryHandler {
    /// Read-your-writes: waits (bounded) until the read models reached `min_stream_seq`. The
    /// bound counts from `since`, when the request arrived (a second reading waits only for
    /// what is left of it).
    async fn wait_if_asked<Q: Consistency>(
        &self,
        query: Query,
        q: &Q,
        since: Instant,
    ) -> Result<Reached, ApiError> {
        let timeout = timeout_from(q.timeout_ms())?.saturating_sub(since.elapsed());
        match q.min_stream_seq() {
            // Bounded: a checkpoint read that goes unanswered ends it a second past its bound.
            Some(min) => {
                self.progress
                    .wait_for(&self.pool, query.projections(), min, timeout)
                    .await
            }
            None => Ok(Reached::default()),
        }
    }

    /// When a reading's session and read must be done by: `CH_QUERY_TIMEOUT_MS` from now, for
    /// both together (so that a query, its wait included, ends within what README and the
    /// chart count on for a stopping worker).
    fn read_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.read_timeout
    }

    /// `read` by `deadline` (see [`QueryHandler::read_deadline`]): a database that takes a
    /// session's statements and never answers (stopped, or cut off after the connection was
    /// made: TCP keepalives take minutes to tell, if ever) has the query answered
    /// `unavailable`, not left unanswered.
    async fn bounded<T>(
        &self,
        deadline: tokio::time::Instant,
        read: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout_at(deadline, read).await {
            Ok(answer) => answer,
            Err(_) => Err(self.no_answer(self.read_timeout)),
        }
    }

    /// The answer to a read the database did not answer within `bound`. The pool's sessions
    /// in use are not handed out again (one may still be running the statement, or be cut off).
    fn no_answer(&self, bound: Duration) -> ApiError {
        let dropped = self.retirement.retire(&self.pool);
        warn!(
            bound_ms = bound.as_millis() as u64,
            dropped, "the database did not answer a read; its sessions are replaced"
        );
        ApiError::unavailable(format!(
            "the database did not answer within {} ms",
            bound.as_millis()
        ))
    }

    /// A session for the read by `deadline`, a free one or a new one logged in (no free one
    /// by then, or by the pool's own bound: a busy worker, not a silent database).
    async fn snapshot_conn(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<deadpool_postgres::Object, ApiError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        ch_runtime::pg::session_within(&self.pool, left)
            .await?
            .ok_or_else(|| self.no_answer(self.read_timeout))
    }
}

/// A query read in one snapshot: parse the request as `$ty`, wait if it asks for a stream
/// sequence, open the read-only snapshot (its tables locked against a reset), work out its
/// `as_of_seq` from the checkpoints of the query's projections, and read with
/// `$read(&tx, &q, as_of)`. Should the snapshot be below the sequence asked for (a rebuild
/// reset the read model after the wait), it waits again, within what is left of its bound.
macro_rules! in_snapshot {
    ($handler:ident, $query:ident, $body:ident, $since:ident, $ty:ty, $read:path) => {{
        let q: $ty = queries::parse($body)?;
        loop {
            let reached = $handler.wait_if_asked($query, &q, $since).await?;
            let deadline = $handler.read_deadline();
            let mut conn = $handler.snapshot_conn(deadline).await?;
            let read = $handler
                .bounded(deadline, async {
                    let tables = queries::tables_of($query.projections());
                    let tx = queries::snapshot(&mut conn, &tables).await?;
                    let as_of = queries::as_of(&tx, $query.projections(), &reached).await?;
                    if q.min_stream_seq().is_some_and(|min| as_of < min) {
                        return Ok(None);
                    }
                    $read(&tx, &q, as_of).await.map(Some)
                })
                .await?;
            if let Some(reply) = read {
                break Ok(reply);
            }
            reset_since_the_wait($query);
        }
    }};
}

/// Says that a read found its read model reset since its wait, and will wait again.
fn reset_since_the_wait(query: Query) {
    tracing::info!(
        query = query.name(),
        "the read model was reset (a rebuild) after the wait; waiting again"
    );
}

impl QueryHandler {
    /// One reading of `query` (its request `body`): its wait, if it asks for one, counts from
    /// `since`.
    async fn answer(&self, query: Query, body: &[u8], since: Instant) -> Result<Value, ApiError> {
        match query {
            Query::PortfolioPerformance => {
                let q: PerformanceQuery = queries::parse(body)?;
                loop {
                    // The portfolio read model is not sparse: its checkpoint is the answer.
                    self.wait_if_asked(query, &q, since).await?;
                    let deadline = self.read_deadline();
                    let conn = self.snapshot_conn(deadline).await?;
                    let read = self
                        .bounded(deadline, queries::portfolio_performance(&conn, &q))
                        .await;
                    // One statement reads the row and the checkpoint together; a reset after
                    // the wait shows as the checkpoint below the sequence asked for, or, if
                    // the row was not there, by one more statement: the checkpoint below it,
                    // or the row back (a replay committed between the two statements).
                    let Some(min) = q.min_stream_seq() else {
                        break read;
                    };
                    let reset = match &read {
                        Ok(reply) => reply["as_of_seq"].as_u64().is_some_and(|at| at < min),
                        Err(e) if e.code == "not_found" => {
                            let (at, there) = self
                                .bounded(deadline, async {
                                    Ok(queries::portfolio_checkpoint_and_row(
                                        &conn,
                                        &q.portfolio_id,
                                    )
                                    .await?)
                                })
                                .await?;
                            at < min || there
                        }
                        Err(_) => false,
                    };
                    if !reset {
                        break read;
                    }
                    reset_since_the_wait(query);
                }
            }
            Query::StrategyList => {
                in_snapshot!(
                    self,
                    query,
                    body,
                    since,
                    StrategyListQuery,
                    queries::strategy_list
                )
            }
            Query::PortfolioAnalysis => {
                in_snapshot!(
                    self,
                    query,
                    body,
                    since,
                    AnalysisQuery,
                    analysis::portfolio_analysis
                )
            }
            Query::StrategyLeaderboard => in_snapshot!(
                self,
                query,
                body,
                since,
                LeaderboardQuery,
                analysis::strategy_leaderboard
            ),
            Query::StrategyGet => {
                in_snapshot!(
                    self,
                    query,
                    body,
                    since,
                    StrategyGetQuery,
                    queries::strategy_get
                )
            }
        }
    }
}

impl Handler for QueryHandler {
    async fn handle(&self, endpoint: &str, msg: &Message) -> Result<Value, ApiError> {
        let query = self
            .queries
            .iter()
            .copied()
            .find(|q| service::endpoint_name(q.name()) == endpoint)
            .ok_or_else(|| ApiError::not_found(format!("no query endpoint {endpoint}")))?;
        let since = Instant::now();
        match self.answer(query, &msg.payload, since).await {
            // A pooled session that the server ended (a restart, a failover, a terminated
            // backend) fails its next statement, and the pool's other sessions most likely
            // ended with it: retire them all and read once more on a new one (a read is safe
            // to repeat). If the database is really away, the second answer says so.
            // (Not when no session came free: the worker is busy, its sessions are fine.)
            Err(e) if e.session_lost => {
                let dropped = self.retirement.retire(&self.pool);
                warn!(
                    error = %e.message,
                    dropped,
                    "database session lost; reading again on a new one"
                );
                // In a span of its own: the request's span has its ids already (recorded
                // again, a text log line would show them twice).
                self.answer(query, &msg.payload, since)
                    .instrument(tracing::info_span!("again"))
                    .await
            }
            answer => answer,
        }
    }
}

/// Serves `queries` until `shutdown`.
///
/// # Errors
/// When the service cannot be registered or the database is unreachable.
pub async fn run_queries(
    app: App,
    queries: &[Query],
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    if !migrated(&app, &shutdown, Schema::Require).await? {
        return Ok(());
    }
    let mut projections: Vec<&'static str> = queries
        .iter()
        .flat_map(|q| q.projections().iter().copied())
        .collect();
    projections.sort_unstable();
    projections.dedup();
    let progress = progress(&app, &projections).await?;
    let spec = app.service_spec(
        "CipherHorizon queries (API.md)",
        queries
            .iter()
            .map(|q| (q.name(), app.subjects.query(q.name()))),
    );
    let (pool, retirement) = app.retiring_read_pool()?;
    let handler = Arc::new(QueryHandler {
        pool,
        retirement,
        progress,
        queries: queries.to_vec(),
        read_timeout: app.cfg.query_timeout,
    });
    service::serve(
        app.connections(),
        spec,
        handler,
        app.metrics.clone(),
        shutdown,
    )
    .await
}

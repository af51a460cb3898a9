//! PostgreSQL: a connection pool whose sessions use the configured schema, and a small
//! migration runner (the migrations themselves live in `ch-readmodel`).

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::SinkExt;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use crate::error::{pg_text, DbError};

/// What a pool's sessions may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Projectors, set-up and the monolith: they write.
    ReadWrite,
    /// Query workers: every transaction is read-only (`default_transaction_read_only`), so no
    /// query code can change a read model, whatever role it connects as.
    ReadOnly,
}

/// `CH_DATABASE_URL` parsed: the sessions' configuration, and the TLS they connect with
/// (`crate::pgtls`: `sslmode=require`, `verify-ca`, `verify-full`, `sslrootcert`).
struct Target {
    cfg: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

/// Checks `CH_DATABASE_URL` without connecting: what [`PoolSpec::pool`] and [`connect`] would
/// refuse before trying (`chctl setup` asks before it touches NATS).
///
/// # Errors
/// [`DbError::Unavailable`] naming the variable and what is wrong.
pub fn check_url(database_url: &str) -> Result<(), DbError> {
    parse_url(database_url).map(|_| ())
}

/// An invalid URL is [`DbError::Unavailable`] naming the variable.
fn parse_url(database_url: &str) -> Result<Target, DbError> {
    // Another scheme would be read as a key/value string, and refused as "unexpected EOF".
    if let Some((scheme, _)) = database_url.split_once("://") {
        let is_scheme = scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if is_scheme && !matches!(scheme, "postgres" | "postgresql") {
            return Err(DbError::Unavailable(format!(
                "CH_DATABASE_URL: a {scheme}:// URL; expected postgres:// or postgresql://"
            )));
        }
    }
    let split = crate::pgtls::split(database_url);
    let mut cfg = tokio_postgres::Config::from_str(&split.url).map_err(|e| {
        let hint =
            crate::pgtls::key_value_hint(database_url).map_or(String::new(), |h| format!(" ({h})"));
        DbError::Unavailable(format!("CH_DATABASE_URL: {}{hint}", pg_text(&e)))
    })?;
    // As libpq: no TLS over Unix sockets (the server does not offer it there).
    let hosts = cfg.get_hosts();
    if !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_))) {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        return Ok(Target { cfg, tls: None });
    }
    let tls = crate::pgtls::connector(cfg.get_ssl_mode(), split.root_cert.as_deref())
        .map_err(|e| DbError::Unavailable(format!("CH_DATABASE_URL: {e}")))?;
    Ok(Target { cfg, tls })
}

/// Why [`open`] has no session.
enum Opening {
    /// The server refused it, or could not be reached (its error says which).
    Failed(tokio_postgres::Error),
    /// The server took the connection and did not answer its start-up and log-in within this
    /// bound (a hung server, or a proxy whose server is gone): unbounded, a worker's start or
    /// `chctl setup` would wait for ever.
    Silent(Duration),
}

impl Opening {
    /// The message, with where it went (no password).
    fn text(&self, cfg: &tokio_postgres::Config) -> String {
        match self {
            Opening::Failed(e) => connect_error(cfg, e),
            Opening::Silent(bound) => format!(
                "the database took the connection but did not answer its log-in within {} s {}",
                bound.as_secs(),
                target_of(cfg)
            ),
        }
    }
}

/// One session of `cfg`, with TLS when `tls` is given; its connection runs on a task of its
/// own until the client is dropped or the server ends it. Bounded in all: `connect_timeout`
/// (the URL's, else [`CONNECT_TIMEOUT`]) for each address tried, and [`LOG_IN_TIMEOUT`].
async fn open(
    cfg: &tokio_postgres::Config,
    tls: Option<&MakeRustlsConnect>,
) -> Result<tokio_postgres::Client, Opening> {
    let per_address = cfg
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT);
    let addresses = u32::try_from(cfg.get_hosts().len().max(1)).unwrap_or(u32::MAX);
    let bound = per_address.saturating_mul(addresses) + LOG_IN_TIMEOUT;
    match tokio::time::timeout(bound, open_unbounded(cfg, tls)).await {
        Ok(opened) => opened.map_err(Opening::Failed),
        Err(_) => Err(Opening::Silent(bound)),
    }
}

async fn open_unbounded(
    cfg: &tokio_postgres::Config,
    tls: Option<&MakeRustlsConnect>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    fn drive<F>(conn: F)
    where
        F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
    {
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
    }
    match tls {
        None => {
            let (client, conn) = cfg.connect(NoTls).await?;
            drive(conn);
            Ok(client)
        }
        Some(tls) => {
            let (client, conn) = cfg.connect(tls.clone()).await?;
            drive(conn);
            Ok(client)
        }
    }
}

/// What a pool is for: the database, the schema its sessions use (`search_path`), how many
/// sessions it opens, what they may do, and the name they show as `application_name` in
/// `pg_stat_activity` and the server's log (unless the URL names one).
#[derive(Debug, Clone)]
pub struct PoolSpec<'a> {
    pub database_url: &'a str,
    pub schema: &'a str,
    pub size: usize,
    pub access: Access,
    pub application_name: &'a str,
}

impl PoolSpec<'_> {
    /// The pool.
    ///
    /// # Errors
    /// [`DbError::Unavailable`] when the URL is invalid.
    pub fn pool(&self) -> Result<Pool, DbError> {
        self.build(None)
    }

    /// [`PoolSpec::pool`], with a [`Retirement`] that can take every session begun so far out
    /// of it.
    ///
    /// # Errors
    /// [`DbError::Unavailable`] when the URL is invalid.
    pub fn retiring_pool(&self) -> Result<(Pool, Retirement), DbError> {
        let retirement = Retirement::default();
        let pool = self.build(Some(&retirement))?;
        Ok((pool, retirement))
    }

    fn build(&self, retirement: Option<&Retirement>) -> Result<Pool, DbError> {
        let Target { mut cfg, tls } = parse_url(self.database_url)?;
        let schema = self.schema;
        let read_only = match self.access {
            Access::ReadWrite => "",
            Access::ReadOnly => " -c default_transaction_read_only=on",
        };
        cfg.options(format!(
            "-c search_path={schema}{read_only} {SERVER_KEEPALIVES}"
        ));
        notice_a_vanished_server(&mut cfg);
        // Connecting is bounded per address tried; the start-up and log-in after it were not
        // (a server that takes the connection and never answers held the request for good).
        let tries = u32::try_from(cfg.get_hosts().len().max(1)).unwrap_or(u32::MAX);
        let create_timeout = cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_TIMEOUT)
            .saturating_mul(tries)
            .saturating_add(LOG_IN_TIMEOUT);
        if cfg.get_application_name().is_none() {
            cfg.application_name(self.application_name);
        }
        let manager_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match tls {
            None => Manager::from_config(cfg, NoTls, manager_cfg),
            Some(tls) => Manager::from_config(cfg, tls, manager_cfg),
        };
        let mut builder = Pool::builder(mgr)
            .max_size(self.size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(create_timeout));
        if let Some(r) = retirement.cloned() {
            builder = builder.pre_recycle(Hook::sync_fn(move |_, metrics| {
                if r.is_retired(metrics.created) {
                    Err(HookError::message("retired"))
                } else {
                    Ok(())
                }
            }));
        }
        builder
            .build()
            .map_err(|e| DbError::Unavailable(e.to_string()))
    }
}

/// Takes a pool's sessions out of use at once: those begun before [`Retirement::retire`] are
/// not handed out again, and the pool opens new ones. A database restart or failover ends
/// every session, but each learns it only at its next statement, and a session in use when
/// the first failure shows may still come back to the pool afterwards.
#[derive(Clone, Default)]
pub struct Retirement(Arc<Mutex<Option<Instant>>>);

impl Retirement {
    /// Retires every session of `pool` begun until now, and closes the idle ones at once.
    /// Returns how many it closed.
    pub fn retire(&self, pool: &Pool) -> usize {
        *self.0.lock().expect("retirement lock") = Some(Instant::now());
        pool.retain(|_, _| false).removed.len()
    }

    fn is_retired(&self, began: Instant) -> bool {
        self.0
            .lock()
            .expect("retirement lock")
            .is_some_and(|at| began <= at)
    }
}

/// TCP keepalives a worker's sessions ask the server for: it probes a session idle for 10 s
/// and ends it after 3 probes 5 s apart go unanswered. A worker whose host vanished without
/// closing its connections (power loss, a partition) so loses its sessions within about 25 s
/// instead of the operating system's two hours, and with its lock session, a projector's
/// lock, which a standby then takes. Ignored on Unix-socket connections.
const SERVER_KEEPALIVES: &str =
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3";

/// The same on the worker's side, so that a session whose server vanished ends within about
/// 25 s (an idle one, such as a projector's lock session, would otherwise never notice); and
/// a connection attempt gives up after [`CONNECT_TIMEOUT`] unless the URL says otherwise (to
/// a host that drops packets it waited for the system's TCP timeout, about two minutes).
fn notice_a_vanished_server(cfg: &mut tokio_postgres::Config) {
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    bound_connecting(cfg);
}

/// A connection attempt gives up after [`CONNECT_TIMEOUT`], unless the URL sets its own.
fn bound_connecting(cfg: &mut tokio_postgres::Config) {
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
}

/// How long a connection attempt may take (`connect_timeout` in the URL overrides it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a new pooled session's start-up and log-in may take, after its connection.
const LOG_IN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request waits for a pooled session when all are busy before it is answered
/// `unavailable` (making a new session is bounded by [`CONNECT_TIMEOUT`] per address tried
/// and [`LOG_IN_TIMEOUT`]).
const POOL_WAIT: Duration = Duration::from_secs(10);

/// A session of `pool` within `within`, waiting for a free one and making a new one
/// together: `Ok(None)` when a new one did not connect and log in in time (a database that
/// takes the connection and does not answer); [`DbError::Busy`] when none came free within
/// `within` or the pool's own bound, whichever is shorter (the worker is busy, not the
/// database silent).
///
/// # Errors
/// [`DbError`] when no session comes free, or the database refuses one.
pub async fn session_within(
    pool: &Pool,
    within: Duration,
) -> Result<Option<deadpool_postgres::Object>, DbError> {
    let own = pool.timeouts();
    let timeouts = deadpool_postgres::Timeouts {
        create: Some(within),
        wait: Some(own.wait.map_or(within, |w| w.min(within))),
        ..own
    };
    // A session made after a wait has what is left of `within` (a little more, so that a wait
    // ending at `within` says busy rather than that the database did not answer).
    let until = tokio::time::Instant::now() + within + Duration::from_millis(50);
    match tokio::time::timeout_at(until, pool.timeout_get(&timeouts)).await {
        Err(_)
        | Ok(Err(deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Create))) => {
            Ok(None)
        }
        Ok(got) => Ok(Some(got?)),
    }
}

/// Connects without a pool (admin work: creating databases, advisory locks).
///
/// # Errors
/// [`DbError`] when the server cannot be reached.
pub async fn connect(
    database_url: &str,
    schema: Option<&str>,
) -> Result<tokio_postgres::Client, DbError> {
    let Target { mut cfg, tls } = parse_url(database_url)?;
    if let Some(s) = schema {
        cfg.options(format!("-c search_path={s}"));
    }
    bound_connecting(&mut cfg);
    open(&cfg, tls.as_ref()).await.map_err(|why| {
        DbError::Unavailable(match why {
            Opening::Failed(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => format!(
                "{}: run `chctl setup` first (it creates the database), or check CH_DATABASE_URL",
                pg_text(&e)
            ),
            // Where it went: the bare text does not say which server.
            other => other.text(&cfg),
        })
    })
}

/// A failed connection's error with where it went (no password): "error connecting to
/// server: Connection refused" alone does not say which server.
fn connect_error(cfg: &tokio_postgres::Config, e: &tokio_postgres::Error) -> String {
    format!("{} {}", pg_text(e), target_of(cfg))
}

/// Where a connection goes, as its errors name it: "(database orders as ch at 127.0.0.1:1)".
fn target_of(cfg: &tokio_postgres::Config) -> String {
    // As the connection uses them: no port is 5432, a single one is every host's.
    let port = |i: usize| match cfg.get_ports() {
        [] => 5432,
        [one] => *one,
        ports => ports.get(i).copied().unwrap_or(5432),
    };
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| (h, port(i)))
        .map(|(h, port)| match h {
            Host::Tcp(h) => format!("{h}:{port}"),
            Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
        })
        .collect();
    format!(
        "(database {} as {} at {})",
        cfg.get_dbname().unwrap_or("(default)"),
        cfg.get_user().unwrap_or("(default)"),
        hosts.join(", ")
    )
}

/// Creates the database named in `database_url` if it does not exist. It connects to that
/// database first, and only when the server says there is no such database to the `postgres`
/// database to create it: a role that may not connect there (or a pooler that only serves the
/// application's database) still starts on a database that exists.
///
/// # Errors
/// [`DbError`] when the server cannot be reached or refuses.
pub async fn ensure_database(database_url: &str) -> Result<(), DbError> {
    let Target { mut cfg, tls } = parse_url(database_url)?;
    bound_connecting(&mut cfg);
    let Some(db) = cfg.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    match open(&cfg, tls.as_ref()).await {
        // Dropping the client closes the session.
        Ok(_client) => return Ok(()),
        Err(Opening::Failed(e)) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(why) => return Err(DbError::Unavailable(why.text(&cfg))),
    }
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let client = open(&admin, tls.as_ref())
        .await
        .map_err(|why| DbError::Unavailable(why.text(&admin)))?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .is_some();
    if !exists {
        let quoted = db.replace('"', "\"\"");
        match client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
        {
            Ok(()) => info!(database = %db, "created database"),
            // Another process created it at the same time: Postgres says so as a duplicate
            // database, or, when both inserted into its catalog at once, as a unique violation.
            Err(e)
                if e.code() == Some(&SqlState::DUPLICATE_DATABASE)
                    || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Where a session's read models are, as the session sees it: its database, its schema
/// (`search_path`), and its server, told apart by the time it started (host names differ
/// between a cluster's service and a port-forward to it).
///
/// # Errors
/// [`DbError`] when the database cannot be read.
pub async fn whereabouts(db: &tokio_postgres::Client) -> Result<serde_json::Value, DbError> {
    let row = db
        .query_one(
            "SELECT current_database(), current_schema(), pg_postmaster_start_time()",
            &[],
        )
        .await?;
    Ok(serde_json::json!({
        "database": row.get::<_, String>(0),
        "schema": row.get::<_, Option<String>>(1),
        "server_started_at": row.get::<_, chrono::DateTime<chrono::Utc>>(2),
    }))
}

/// One schema migration: a version number and its SQL.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Creates `schema` and applies the migrations it does not have yet, in one transaction
/// guarded by an advisory lock (several workers may start at once). A schema that has them all
/// is only read, so a worker whose role may only read (a query worker's) starts on a schema that
/// `chctl setup` or a projector has migrated.
///
/// # Errors
/// [`DbError`] when a migration fails; nothing of it is applied then. A role that may not
/// create what is missing gets [`DbError::Unavailable`] saying which migrations are missing.
pub async fn migrate(
    database_url: &str,
    schema: &str,
    migrations: &[Migration],
) -> Result<(), DbError> {
    let mut client = connect(database_url, Some(schema)).await?;
    let missing = missing(&client, migrations).await?;
    if missing.is_empty() {
        return Ok(());
    }
    apply(&mut client, schema, migrations)
        .await
        .map_err(|e| match &e {
            DbError::Query(pg) if pg.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                DbError::Unavailable(format!(
                    "schema {schema} lacks read-model migrations {missing:?} and this role may not \
                     apply them ({}): run `chctl setup`, or start a projector, with a role that \
                     may create tables",
                    pg_text(pg)
                ))
            }
            _ => e,
        })
}

/// Checks, without changing anything, that `schema` has applied every one of `migrations`: the
/// start of a worker that only reads (query workers, `exit-triggers`). Creating the schema
/// there would make a misspelt `CH_DB_SCHEMA` or database name an empty read model, served
/// as if nothing had happened while the projectors write elsewhere.
///
/// # Errors
/// [`DbError::Unavailable`] naming what is missing and what to run; [`DbError`] when the
/// database cannot be read (one that does not exist included).
pub async fn require_migrations(
    database_url: &str,
    schema: &str,
    migrations: &[Migration],
) -> Result<(), DbError> {
    let client = connect(database_url, Some(schema)).await?;
    let missing = missing(&client, migrations).await?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(DbError::Unavailable(format!(
        "schema {schema} lacks read-model migrations {missing:?}: run `chctl setup`, or start \
         a projector, first (query workers and exit-triggers only read: they create no \
         schema, table or database; check CH_DB_SCHEMA and CH_DATABASE_URL if it should have \
         them)"
    )))
}

/// Whether [`check_stream`] may claim a schema that names no stream yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The workers that only read, and `chctl setup` before it touches NATS: nothing written;
    /// a schema it would claim passes, and so does one not migrated yet (no `ch_stream`
    /// table) whose read models are not past `head`.
    No,
    /// The workers that write (projectors, `chctl setup` and `rebuild`), on a migrated
    /// schema: one that names no stream yet is given `stream`, unless its read models are past
    /// `head` (a schema upgraded to migration 8 whose read models were folded from a longer
    /// stream: another prefix's).
    Yes,
}

/// Checks that the read models in `schema` are folded from `stream` (its `ch_stream` row),
/// claiming it as `claim` says; `head` is the stream's last sequence.
///
/// # Errors
/// [`DbError::Refused`] when the schema holds another stream's read models, or is not claimed
/// for the reason above, naming both streams and what to do; [`DbError`] on database trouble.
pub async fn check_stream(
    database_url: &str,
    schema: &str,
    stream: &str,
    head: impl std::future::Future<Output = Result<u64, DbError>>,
    claim: Claim,
) -> Result<(), DbError> {
    // `head` is awaited only after the checkpoints are read: projectors running beside move
    // them on, but never past the head as it is when they commit.
    let client = connect(database_url, Some(schema)).await?;
    let claim = claim == Claim::Yes;
    // A table this role may not read, or one not made yet, is no record (Some(None)).
    let recorded = match client.query_opt("SELECT stream FROM ch_stream", &[]).await {
        Ok(row) => Some(row.map(|r| r.get::<_, String>(0))),
        Err(e) if !claim && e.code() == Some(&SqlState::UNDEFINED_TABLE) => None,
        // A role that may only read, granted the tables before this one was made (an
        // upgrade): it starts, unchecked, and says so (the workers that write have checked).
        Err(e) if !claim && e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            warn!(
                schema,
                stream,
                "this role may not read ch_stream: whose read models the schema holds is not \
                 checked (GRANT SELECT ON ch_stream to it, as on every read-model table)"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(Some(theirs)) = recorded {
        return same_stream(schema, &theirs, stream);
    }
    let folded: i64 = match client
        .query_one("SELECT coalesce(max(last_seq), 0) FROM ch_checkpoints", &[])
        .await
    {
        Ok(row) => row.get(0),
        // A schema not made yet (checked before `chctl setup` makes it).
        Err(e) if !claim && e.code() == Some(&SqlState::UNDEFINED_TABLE) => 0,
        Err(e) => return Err(e.into()),
    };
    let head = head.await?;
    if folded > 0 && folded as u64 > head {
        return Err(DbError::Refused(format!(
            "schema {schema} names no stream yet, and its read models are at seq {folded}, past \
             stream {stream}'s last ({head}): they were folded from another stream, and are not \
             claimed for this one. Give this subject prefix a CH_DB_SCHEMA of its own (`make up` \
             names it after the prefix); or, if the schema is this prefix's, stop the workers \
             that wrote another stream into it and drop it (`DROP SCHEMA ... CASCADE`): `chctl \
             setup` and the projectors fold it again"
        )));
    }
    if !claim {
        return Ok(());
    }
    client
        .execute(
            "INSERT INTO ch_stream (stream) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&stream],
        )
        .await?;
    // Another writer may have claimed it in between.
    let row = client
        .query_one("SELECT stream FROM ch_stream", &[])
        .await?;
    same_stream(schema, row.get(0), stream)
}

fn same_stream(schema: &str, theirs: &str, stream: &str) -> Result<(), DbError> {
    if theirs == stream {
        return Ok(());
    }
    Err(DbError::Refused(format!(
        "schema {schema} holds the read models of stream {theirs}, not {stream}: each subject \
         prefix needs a CH_DB_SCHEMA of its own (`make up` names it after the prefix; should \
         the schema be this prefix's, stop the other prefix's workers and drop it: `chctl \
         setup` and the projectors fold it again)"
    )))
}

/// The versions of `migrations` that the schema on `client`'s search path has not applied.
async fn missing(
    client: &tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<Vec<i32>, DbError> {
    let applied: Vec<i32> = match client.query("SELECT version FROM ch_migrations", &[]).await {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // No schema or no migrations table yet.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(migrations
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

async fn apply(
    client: &mut tokio_postgres::Client,
    schema: &str,
    migrations: &[Migration],
) -> Result<(), DbError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('ch_migrate:' || $1))",
        &[&schema],
    )
    .await?;
    let quoted = schema.replace('"', "\"\"");
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{quoted}\";
         CREATE TABLE IF NOT EXISTS ch_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await?;
    // Read again under the lock: another worker may have applied them meanwhile.
    let applied: Vec<i32> = tx
        .query("SELECT version FROM ch_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for m in migrations.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO ch_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        info!(
            schema,
            version = m.version,
            name = m.name,
            "applied migration"
        );
    }
    tx.commit().await?;
    Ok(())
}

/// Runs a statement prepared once per connection (deadpool's statement cache), for statements
/// on hot paths: planned once, not on every call.
///
/// # Errors
/// The database's error.
pub async fn exec(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.execute(&stmt, params).await
}

/// [`exec`] for a query.
///
/// # Errors
/// The database's error.
pub async fn rows(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.query(&stmt, params).await
}

/// Rows in PostgreSQL's binary `COPY` format, encoded in memory and handed to the connection as
/// one message ([`CopyRows::send`]).
///
/// tokio-postgres' `BinaryCopyInWriter` hands every 4 KiB it encodes to the connection task and
/// waits for it to be taken: for a replay chunk's fills (about a megabyte) hundreds of turns of
/// the worker's single-threaded runtime, in which the replay's other stages wait too. Encoding
/// the rows first made a rebuild about 5 % faster (`bench/HISTORY.md`).
pub struct CopyRows {
    types: &'static [Type],
    buf: BytesMut,
}

impl CopyRows {
    /// Rows of the columns `types`, room reserved for about `rows` of them.
    pub fn new(types: &'static [Type], rows: usize) -> Self {
        let mut buf = BytesMut::with_capacity(COPY_SIGNATURE.len() + 10 + rows * 32 * types.len());
        buf.put_slice(COPY_SIGNATURE);
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        CopyRows { types, buf }
    }

    /// Appends one row, its values in the order of the columns.
    ///
    /// # Panics
    /// When the row has another number of values than the columns, or a value is not of its
    /// column's type: the types are fixed per statement, so a programming error (the types this
    /// project copies encode any value they can hold).
    pub fn push(&mut self, values: &[&(dyn ToSql + Sync)]) {
        assert_eq!(values.len(), self.types.len(), "a COPY row's values");
        self.buf
            .put_i16(i16::try_from(values.len()).expect("fewer than 32768 columns"));
        for (value, ty) in values.iter().zip(self.types) {
            let at = self.buf.len();
            self.buf.put_i32(0);
            let written = value
                .to_sql_checked(ty, &mut self.buf)
                .unwrap_or_else(|e| panic!("a {ty} value for COPY: {e}"));
            let len = match written {
                IsNull::Yes => -1,
                IsNull::No => i32::try_from(self.buf.len() - at - 4).expect("a value under 2 GiB"),
            };
            self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    /// Sends the rows with `statement`, a `COPY ... FROM STDIN BINARY` of the same columns.
    ///
    /// # Errors
    /// What Postgres says of the statement or the rows.
    pub async fn send(
        mut self,
        tx: &tokio_postgres::Transaction<'_>,
        statement: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        self.buf.put_i16(-1); // trailer
        let sink = tx.copy_in(statement).await?;
        let mut sink = std::pin::pin!(sink);
        sink.send(self.buf.freeze()).await?;
        sink.as_mut().finish().await
    }
}

/// The signature that starts a binary `COPY` stream.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary COPY format: signature, flags, header extension; per row its field count,
    /// then each field's length and bytes (-1 and none for NULL); the trailer is added by send.
    #[test]
    fn copy_rows_are_framed_as_postgres_reads_them() {
        const TYPES: &[Type] = &[Type::INT8, Type::TEXT, Type::INT8];
        let mut copy = CopyRows::new(TYPES, 1);
        copy.push(&[&7i64, &"ab", &None::<i64>]);
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend([0, 0, 0, 0, 0, 0, 0, 0]); // flags, header extension
        expected.extend([0, 3]); // fields
        expected.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend([0, 0, 0, 2, b'a', b'b']);
        expected.extend([0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&copy.buf[..], &expected[..]);
    }

    #[test]
    #[should_panic(expected = "a COPY row's values")]
    fn a_copy_row_has_a_value_per_column() {
        CopyRows::new(&[Type::INT8], 1).push(&[&1i64, &2i64]);
    }

    fn unavailable(r: Result<tokio_postgres::Client, DbError>) -> String {
        match r {
            Err(DbError::Unavailable(m)) => m,
            Err(e) => panic!("not Unavailable: {e}"),
            Ok(_) => panic!("connected"),
        }
    }

    /// The errors say why, not only "error connecting to server" or "invalid connection
    /// string" (tokio-postgres keeps the cause apart from its text).
    #[tokio::test]
    async fn connection_errors_say_their_cause() {
        // Nothing listens on port 1.
        let refused = unavailable(connect("postgres://ch@127.0.0.1:1/ch", None).await);
        assert!(
            refused.starts_with("error connecting to server: "),
            "{refused}"
        );
        assert!(refused.to_lowercase().contains("refused"), "{refused}");
        let bad = unavailable(connect("postgres://ch@127.0.0.1:port/ch", None).await);
        assert!(
            bad.starts_with("CH_DATABASE_URL: invalid connection string: "),
            "{bad}"
        );
    }

    /// A server that takes the connection and never answers (a hung one, or a proxy whose
    /// server is gone) fails the log-in within its bound, saying so and where, instead of
    /// holding a worker's start or `chctl setup` for ever.
    #[tokio::test]
    async fn a_database_that_never_answers_fails_its_log_in() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let url = format!("postgres://ch:secret@127.0.0.1:{port}/orders?connect_timeout=1");
        let want = format!(
            "the database took the connection but did not answer its log-in within 6 s \
             (database orders as ch at 127.0.0.1:{port})"
        );
        let started = std::time::Instant::now();
        // chctl's sessions and a worker's start, side by side.
        let (admin, start) = tokio::join!(connect(&url, None), ensure_database(&url));
        assert_eq!(unavailable(admin), want);
        let Err(DbError::Unavailable(m)) = start else {
            panic!("ensure_database did not fail");
        };
        assert_eq!(m, want);
        assert!(started.elapsed() < Duration::from_secs(30));
        silent.abort();
    }

    /// A worker's start that cannot reach Postgres says where it tried, without the password.
    #[tokio::test]
    async fn an_unreachable_database_is_named() {
        let Err(DbError::Unavailable(m)) =
            ensure_database("postgres://ch:secret@127.0.0.1:1/orders").await
        else {
            panic!("connected to port 1");
        };
        assert!(m.starts_with("error connecting to server: "), "{m}");
        assert!(m.ends_with("(database orders as ch at 127.0.0.1:1)"), "{m}");
        assert!(!m.contains("secret"), "{m}");
    }

    /// TLS as libpq's parameters ask for it, but none over Unix sockets (as libpq).
    #[test]
    fn tls_is_asked_by_sslmode_and_never_over_unix_sockets() {
        use tokio_postgres::config::SslMode;
        let tls = |url: &str| parse_url(url).map(|t| (t.tls.is_some(), t.cfg.get_ssl_mode()));
        assert_eq!(tls("postgres://u@h/db").unwrap(), (false, SslMode::Prefer));
        assert_eq!(
            tls("postgres://u@h/db?sslmode=verify-full").unwrap(),
            (true, SslMode::Require)
        );
        assert_eq!(
            tls("host=/run/postgresql sslmode=require").unwrap(),
            (false, SslMode::Disable)
        );
        let Err(DbError::Unavailable(m)) = tls("host=h sslmode=verify-full") else {
            panic!("verify-full in a key/value string was taken");
        };
        assert!(m.contains("read from a URL"), "{m}");
        let Err(DbError::Unavailable(m)) = tls("mysql://u:secret@h/db") else {
            panic!("a mysql:// URL was taken");
        };
        assert_eq!(
            m,
            "CH_DATABASE_URL: a mysql:// URL; expected postgres:// or postgresql://"
        );
        assert!(check_url("host=h options='-c x=a://b'").is_ok());
        assert!(check_url("postgresql://u@h/db").is_ok());
    }

    /// A connection without a pool (a query worker's or exit-trigger's start, chctl's admin
    /// work) that fails says where it went, as a pool's does.
    #[tokio::test]
    async fn a_failed_connection_names_its_server() {
        let Err(e) = connect("postgres://ch@127.0.0.1:1/orders", None).await else {
            panic!("connected to port 1");
        };
        let m = e.to_string();
        assert!(m.ends_with("(database orders as ch at 127.0.0.1:1)"), "{m}");
    }

    /// One port given for several hosts is every host's port, as the connection uses it.
    #[tokio::test]
    async fn a_single_port_applies_to_every_host() {
        let cfg: tokio_postgres::Config = "host=127.0.0.1,127.0.0.2 port=1 user=ch dbname=orders"
            .parse()
            .expect("config");
        let Err(e) = cfg.connect(NoTls).await else {
            panic!("connected to port 1");
        };
        let m = connect_error(&cfg, &e);
        assert!(m.ends_with("at 127.0.0.1:1, 127.0.0.2:1)"), "{m}");
    }
}

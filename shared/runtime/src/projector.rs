//! The projector harness: keeps one read model in PostgreSQL up to date with the stream,
//! exactly once in effect.
//!
//! - One durable pull consumer per projection, ack policy `all`: the newest message of a
//!   committed batch acks the batch (the checkpoint, not the ack, is the truth).
//! - One Postgres transaction per batch: the events applied, the projection flushed and the
//!   checkpoint (`ch_checkpoints`) moved (a live batch sends the checkpoint's compare-and-set
//!   first, with the writes), then commit and announce; acks follow at most every
//!   `ACK_EVERY`. Events at or below the checkpoint are skipped, so redeliveries after a crash
//!   change nothing.
//! - A dense projection's consumer covers every subject of the stream, so sequences are
//!   contiguous: a gap (a rebuild reset the checkpoint, or a redelivery came out of order) is
//!   filled by reading the stream with an ordered consumer before going on: chunks received,
//!   decoded and applied in a pipeline, several chunks per transaction (ADR 002).
//! - A sparse projection's consumer filters the stream (`proj_strategy`: strategy subjects
//!   only), so it is not handed the events it would skip. Its checkpoint still means "every
//!   event up to here is in": a gap is a checkpoint below the one this projector committed
//!   (a rebuild reset it), and when idle it moves the checkpoint to the stream's head once a
//!   direct get has shown that no event of its subjects lies in between.
//! - One active projector per projection and schema: a Postgres advisory lock held by a session
//!   of its own; replicas wait. Should that session end (a database restart or failover), the
//!   projector stops projecting, hands its batch back, and leads again or stands by.
//! - A poison event (undecodable, or a data error in its SQL: classes 22 and 23) is published
//!   to the dead-letter subject with its error, logged, counted, and skipped, unless the schema
//!   holds a migration newer than the projection knows (an upgrade under way: the newer
//!   schema refuses this build's writes, not the event); any other error
//!   (a batch, an idle check, starting to project; the database away, a missing grant)
//!   retries with backoff and is counted in `consecutive_failures`; taking the lock is tried
//!   again every `LEAD_POLL`.
//!   After a failed batch the projector catches up from the stream, from its checkpoint,
//!   before it takes the consumer's next delivery (which follows the failed batch); a replay
//!   that finds the checkpoint reset under it starts again from there.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use deadpool_postgres::Transaction;
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::envelope::{self, StoredEvent};
use crate::error::{pg_text, ApiError, DbError, DecodeError, StoreError};
use crate::eventstore::{consumer_config, sparse_filter, EventStore};
use crate::metrics::Metrics;
use crate::service::{self, EndpointSpec, Handler, ServiceSpec};

/// A read model fed by events.
pub trait Projection: Send + Sync + 'static {
    /// `portfolio`, `strategy`: the checkpoint row, the subjects, the service name.
    fn name(&self) -> &'static str;
    /// The durable consumer definition (a file of `nats/consumers/`).
    fn consumer_json(&self) -> &'static str;
    /// Applies a batch of consecutive events, in order, inside the batch's transaction
    /// (set-based writes are the projection's business: one statement per table, not per event).
    /// `after` is the sequence the batch follows: the transaction's checkpoint, or the last
    /// event of the batch before it in the same transaction. A projection that keeps rows in
    /// memory between batches may use them only if it kept them as of that sequence. Rows it
    /// holds back must be written by [`Projection::flush`].
    fn apply_batch(
        &self,
        tx: &Transaction<'_>,
        events: &[StoredEvent],
        after: u64,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send;
    /// Writes what [`Projection::apply_batch`] held back: called once before every commit, after
    /// one or more batches in the same transaction (a replay applies several chunks per
    /// transaction, so a row that changes in each is written once). Nothing by default.
    fn flush(
        &self,
        tx: &Transaction<'_>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send {
        let _ = tx;
        async { Ok(()) }
    }
    /// Whether events of this `Ch-Event-Type` change the read model; others are skipped
    /// without decoding (their sequence still moves the checkpoint).
    fn wants(&self, event_type: &str) -> bool {
        let _ = event_type;
        true
    }
    /// Empties the read model's tables (a rebuild then replays the stream).
    fn reset(
        &self,
        tx: &Transaction<'_>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send;
    /// The newest schema migration this build knows (`ch_migrations`), if it keeps to them: a
    /// schema past it belongs to a newer release, whose constraints this projector's writes may
    /// break through no fault of the events. None by default.
    fn schema_known(&self) -> Option<i32> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The checkpoint moved back under a replay (a rebuild reset the read model meanwhile):
    /// the replay starts again from where it is now.
    #[error("the checkpoint moved back to {checkpoint} under a replay that had applied up to {applied} (a reset)")]
    Reset { checkpoint: u64, applied: u64 },
    /// The worker is shutting down: a replay stopped after its last committed transaction.
    #[error("stopped by the shutdown at {at}")]
    Stopped { at: u64 },
}

impl ProjectorError {
    /// Whether trying again later may succeed: the store or the database away or refusing
    /// for a while (connections, restarts, serialization, resources).
    fn transient(&self) -> bool {
        match self {
            ProjectorError::Db(DbError::Unavailable(_) | DbError::Busy(_))
            | ProjectorError::Store(StoreError::Unavailable(_))
            | ProjectorError::Reset { .. }
            | ProjectorError::Stopped { .. } => true,
            ProjectorError::Db(DbError::Query(e)) => transient(e),
            ProjectorError::Store(_) | ProjectorError::Db(DbError::Refused(_)) => false,
        }
    }
}

/// Logs a failure the projector will try again: a warning while the store or the database is
/// away for a while (a restart, a failover, a NATS node's crash), an error otherwise.
fn retrying(projection: &str, what: &str, e: &ProjectorError) {
    if let ProjectorError::Stopped { at } = e {
        info!(
            projection,
            at, "{what}: the replay stopped for the shutdown"
        );
    } else if e.transient() {
        warn!(projection, error = %e, "{what} failed; will retry");
    } else {
        error!(projection, error = %e, "{what} failed; will retry");
    }
}

impl From<tokio_postgres::Error> for ProjectorError {
    fn from(e: tokio_postgres::Error) -> Self {
        ProjectorError::Db(DbError::Query(e))
    }
}

/// How batches are formed (`CH_SYNC`, `CH_BATCH_MAX`, `CH_BATCH_WAIT_MS`).
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most events per transaction.
    pub max: usize,
    /// How long to wait to fill a batch once its first event is in (0 = take what is there).
    pub wait: Duration,
    /// `adaptive`: the batch size follows the lag. A batch is what has arrived, up to `max`:
    /// one or a few events when caught up (lowest latency), `max` when behind; and while the
    /// projector is behind (its batch's first event appended [`ADAPTIVE_BEHIND`] ago or more,
    /// or a backlog still on the server), it waits up to [`ADAPTIVE_FILL_WAIT`] to fill the
    /// batch (fewer, larger transactions: throughput).
    pub adaptive: bool,
    /// Most events per transaction of a replay (rebuild, catch-up).
    pub replay_max: usize,
}

impl BatchConfig {
    /// The batching of a sync mode, with `max`/`wait` from the configuration.
    pub fn from_config(cfg: &crate::Config) -> Self {
        BatchConfig {
            max: cfg.batch_max,
            wait: cfg.batch_wait,
            adaptive: cfg.sync == crate::SyncMode::Adaptive,
            replay_max: cfg.replay_batch_max,
        }
    }

    /// Target size and fill wait for a batch whose first message left `pending` behind it and
    /// was appended `behind` ago.
    fn plan(&self, pending: u64, behind: Duration) -> (usize, Duration) {
        if !self.adaptive {
            return (self.max, self.wait);
        }
        // `pending` counts what the server has not delivered yet; what is delivered but not
        // applied is in the client's buffer and taken without waiting. So the target is always
        // `max`; waiting for more pays only when the projector is behind: its last transaction
        // took long enough for events to age, or the server holds a backlog.
        let wait = if pending >= ADAPTIVE_BACKLOG || behind >= ADAPTIVE_BEHIND {
            ADAPTIVE_FILL_WAIT
        } else {
            Duration::ZERO
        };
        (self.max.max(1), wait)
    }
}

/// `adaptive`: the server-side backlog from which a batch waits to fill.
pub const ADAPTIVE_BACKLOG: u64 = 16;
/// `adaptive`: how long ago the first event of a batch must have been appended for the batch
/// to wait to fill. Caught up, an event reaches the projector within a millisecond or so.
pub const ADAPTIVE_BEHIND: Duration = Duration::from_millis(3);
/// `adaptive`: how long a batch waits to fill when the projector is behind. A fifth of `batch`
/// mode's default: since a live batch costs three round trips, waiting longer saved little CPU
/// and cost lag (measured: 1 ms kept `batch`'s projector CPU per command with a lag p50 of
/// 17-21 ms against 27-43 ms for 5 ms and 12-15 ms for `eventual`).
pub const ADAPTIVE_FILL_WAIT: Duration = Duration::from_millis(1);

/// How long ago `unix_nanos` (a JetStream append time) was, by this host's clock; zero for a
/// time ahead of it (clocks of different hosts differ a little).
fn since(unix_nanos: i128) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    Duration::from_nanos(u64::try_from(now - unix_nanos).unwrap_or(0))
}

/// Most events a replay receives, decodes and applies as one chunk (several chunks make a
/// transaction of up to `CH_REPLAY_BATCH_MAX` events).
const REPLAY_CHUNK: usize = 5000;

/// Replays of fewer events than this (the stream's sequences they span) log at debug.
const QUIET_REPLAY: u64 = 1000;

/// `debug!` when `$quiet`, else `info!`.
macro_rules! log_at {
    ($quiet:expr, $($arg:tt)+) => {
        if $quiet {
            debug!($($arg)+)
        } else {
            info!($($arg)+)
        }
    };
}

/// How often a standing-by projector tries to take the lock.
const LEAD_POLL: Duration = Duration::from_secs(1);
/// How long a projector that lost its lock's session waits before trying to take it again:
/// longer than [`LEAD_POLL`], so that a standby takes over first.
const HANDOVER: Duration = Duration::from_millis(1500);

/// Most time between two acks of a projector's consumer (far below its `ack_wait`).
const ACK_EVERY: Duration = Duration::from_millis(100);

/// Acks (policy `all`) everything up to `m`; a lost ack only means a redelivery, skipped.
async fn ack(m: Option<Delivery>) {
    if let Some(m) = m {
        if let Err(e) = m.ack().await {
            debug!(error = %e, "ack failed; the redelivery will be skipped");
        }
    }
}

type PullConsumer =
    async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>;
type Delivery = async_nats::jetstream::Message;

/// A batch from the durable consumer: `first`, then more up to `target` messages. With a fill
/// `wait`, what arrives until it has passed or `stop` comes (the batch is applied then, and
/// the shutdown follows); with none, what has arrived: the client's connection task hands over
/// one socket read (about 64 KiB, some 120 events) at a time, so when that runs dry it gets
/// one turn to read what else is there.
async fn gather(
    messages: &mut async_nats::jetstream::consumer::pull::Stream,
    first: Delivery,
    target: usize,
    wait: Duration,
    stop: &CancellationToken,
) -> Vec<Delivery> {
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + wait;
    let mut yielded = false;
    while batch.len() < target {
        let next = if wait.is_zero() {
            match messages.next().now_or_never() {
                None if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                    continue;
                }
                next => {
                    yielded = false;
                    next.flatten()
                }
            }
        } else {
            tokio::select! {
                () = stop.cancelled() => None,
                next = tokio::time::timeout_at(deadline, messages.next()) => next.ok().flatten(),
            }
        };
        match next {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                warn!(error = %e, "consumer error");
                break;
            }
            None => break,
        }
    }
    batch
}

/// `adaptive`'s decisions, visible: whether batches wait to fill and their size (by powers of
/// two) in the log when they change, at most once a second (caught up at a moderate rate,
/// sizes flicker between one and a few events); the latest ones in the metrics.
#[derive(Default)]
struct AdaptiveLog {
    /// The last decision logged (fill wait or not, batch size bucket), and when.
    last: (bool, u32),
    logged: Option<Instant>,
}

impl AdaptiveLog {
    fn note<P: Projection>(
        &mut self,
        projector: &Projector<P>,
        wait: Duration,
        size: usize,
        behind: Duration,
        pending: u64,
    ) {
        let decision = (!wait.is_zero(), usize::BITS - size.leading_zeros());
        let quiet = self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if decision != self.last && quiet {
            info!(
                projection = projector.name(),
                filling = decision.0,
                batch_size = size,
                behind_ms = behind.as_millis() as u64,
                pending,
                "adaptive batching changed"
            );
            (self.last, self.logged) = (decision, Some(Instant::now()));
        }
        let metrics = &projector.metrics;
        metrics.gauge("batch_size", size as i64);
        metrics.gauge("fill_wait_ms", wait.as_millis() as i64);
        metrics.gauge("behind_ms", behind.as_millis() as i64);
    }
}

/// One message of the stream, decoded when it arrives (a replay decodes each chunk on a
/// blocking-pool thread while the one before is being written).
struct Raw {
    seq: u64,
    payload: Bytes,
    /// Whether the projection wants its `Ch-Event-Type`: others are skipped without decoding.
    wanted: bool,
    /// The decoded event, until the chunk that applies it takes it.
    event: Option<Result<StoredEvent, DecodeError>>,
}

impl Raw {
    fn new(seq: u64, m: &async_nats::Message, projection: &impl Projection) -> Raw {
        let mut raw = Raw::undecoded(seq, m, projection);
        raw.decode();
        raw
    }

    /// As received: [`Raw::decode`] decodes it later.
    fn undecoded(seq: u64, m: &async_nats::Message, projection: &impl Projection) -> Raw {
        let wanted = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Ch-Event-Type"))
            .is_none_or(|t| projection.wants(t.as_str()));
        Raw {
            seq,
            payload: m.payload.clone(),
            wanted,
            event: None,
        }
    }

    fn decode(&mut self) {
        if self.wanted && self.event.is_none() {
            self.event = Some(envelope::decode(self.seq, &self.payload));
        }
    }

    /// The decoded event (decoded again if an earlier attempt of its chunk took it).
    fn take_event(&mut self) -> Result<StoredEvent, DecodeError> {
        self.event
            .take()
            .unwrap_or_else(|| envelope::decode(self.seq, &self.payload))
    }
}

/// An event that could not be decoded: dead-lettered once its transaction has committed.
struct Dead {
    seq: u64,
    payload: Bytes,
    why: String,
}

/// Messages that do not follow the checkpoint: events from `checkpoint + 1` to `first - 1`
/// are missing.
struct Gap {
    checkpoint: u64,
    first: u64,
}

enum Chunk {
    /// Applied (or skipped) up to this sequence.
    Done(u64),
    /// The checkpoint is below the chunk's first sequence minus one.
    Gap { checkpoint: u64, first: u64 },
}

/// Is a Postgres error worth retrying: the database away ([`crate::error::unavailable`]), or a
/// statement that may pass next time (serialization, lock, operator intervention, system)?
fn transient(e: &tokio_postgres::Error) -> bool {
    crate::error::unavailable(e)
        || e.code().is_some_and(|c| {
            matches!(&c.code()[..2], "40" | "57" | "58") || *c == SqlState::LOCK_NOT_AVAILABLE
        })
}

/// Is a Postgres error the fault of the event being applied, so that this event will never
/// apply: a data exception (class 22: a value the column cannot hold) or an integrity
/// constraint (class 23)? Only such an event is dead-lettered and skipped. Anything else
/// (a missing grant, an undefined column, a corrupt page, ...) is the deployment's to fix:
/// skipping would drop every event that meets it for good, so the batch is tried again,
/// with backoff, counted in `consecutive_failures`, and logged as an error until it passes.
fn poison(e: &tokio_postgres::Error) -> bool {
    !transient(e)
        && e.code()
            .is_some_and(|c| matches!(&c.code()[..2], "22" | "23"))
}

/// Reads a projection's checkpoint (0 when it has none yet).
///
/// # Errors
/// [`DbError`] on database trouble.
pub async fn checkpoint(
    client: &impl tokio_postgres::GenericClient,
    name: &str,
) -> Result<u64, DbError> {
    let row = client
        .query_opt(
            "SELECT last_seq FROM ch_checkpoints WHERE projection = $1",
            &[&name],
        )
        .await?;
    Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
}

/// The connection that holds a projection's session advisory lock. Dropping it closes the
/// connection, which releases the lock (returning it to the pool would keep the lock held),
/// also when the task holding it is aborted.
struct Leader(Option<deadpool_postgres::Object>);

impl Drop for Leader {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}

impl Leader {
    /// Whether its session ended (a database restart, a failover, a terminated backend): the
    /// lock went with it, and another projector may hold it now.
    fn lost(&self) -> bool {
        self.0.as_ref().is_none_or(|c| c.is_closed())
    }
}

/// Lets go of the lock: unlocks it in its session, so that it is free once this returns (for
/// a standby, or a rebuild right after a stop), then closes the session. A session that is
/// gone or does not answer within [`UNLOCK_WAIT`] releases it as it closes.
async fn release(leader: Leader) {
    if let Some(conn) = leader.0.as_ref().filter(|c| !c.is_closed()) {
        let unlock = conn.batch_execute("SELECT pg_advisory_unlock_all()");
        let _ = tokio::time::timeout(UNLOCK_WAIT, unlock).await;
    }
    drop(leader);
}

/// How long [`release`] waits for the lock's session to unlock it.
const UNLOCK_WAIT: Duration = Duration::from_secs(1);

/// Backing off after a failure to take the lock, to start projecting, of a batch or of an idle
/// check (the store or the database away for a moment); the failures in a row are the
/// `consecutive_failures` gauge.
struct Retry {
    backoff: Duration,
    failures: i64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            backoff: Duration::from_millis(50),
            failures: 0,
        }
    }
}

impl Retry {
    fn succeeded(&mut self, metrics: &Metrics) {
        if self.failures > 0 {
            *self = Retry::default();
            metrics.gauge("consecutive_failures", 0);
        }
    }

    /// Counts a failure; returns how many in a row.
    fn failed(&mut self, metrics: &Metrics) -> i64 {
        self.failures += 1;
        metrics.gauge("consecutive_failures", self.failures);
        self.failures
    }

    /// Counts a failure and waits before the next attempt; `false` on `shutdown`.
    async fn wait(&mut self, metrics: &Metrics, shutdown: &CancellationToken) -> bool {
        self.failed(metrics);
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        true
    }
}

/// Why [`Projector::project`] returned.
enum Ended {
    Shutdown,
    /// The lock's session ended: stand by (or lead again) as at the start.
    LostLead,
    /// The consumer's deliveries ended (it was deleted: async-nats says so once, as an error,
    /// then ends the stream): start again, which makes it anew where the read model is.
    ConsumerGone,
}

/// Runs one projection.
pub struct Projector<P: Projection> {
    projection: Arc<P>,
    store: EventStore,
    pool: Pool,
    client: async_nats::Client,
    batch: BatchConfig,
    metrics: Metrics,
    /// The subjects of the projection's consumer.
    filter: String,
    /// The consumer sees part of the stream: sequences have holes (see the module docs).
    sparse: bool,
    /// The checkpoint this projector last committed or read ([`UNKNOWN`] before the first).
    position: AtomicU64,
    /// In a replay, the last event applied in its open transaction (0 when none runs): how far
    /// a replay has got between its commits, which come every `CH_REPLAY_BATCH_MAX` events.
    replay_applied: AtomicU64,
    /// The worker's shutdown (see [`run`]): a replay stops between its transactions, each of
    /// which commits its checkpoint, so that the next start goes on from there.
    stop: CancellationToken,
    /// Its micro service's metadata (see [`Projector::with_service_metadata`]).
    service_metadata: std::collections::HashMap<String, String>,
}

const UNKNOWN: u64 = u64::MAX;

/// Moves a checkpoint from `$2` to `$3` only if it is still at `$2` (a reset in between wins);
/// also locks the row for the rest of the transaction.
const ADVANCE_SQL: &str = "UPDATE ch_checkpoints SET last_seq = $3, updated_at = now()
                           WHERE projection = $1 AND last_seq = $2";

/// A read model is rebuildable and its checkpoint commits with it: a commit lost in a database
/// crash is replayed from the stream, so a projector transaction need not wait for the WAL flush.
const NO_WAL_WAIT: &str = "SET LOCAL synchronous_commit = off";

impl<P: Projection> Projector<P> {
    pub fn new(
        projection: P,
        store: EventStore,
        pool: Pool,
        client: async_nats::Client,
        batch: BatchConfig,
        metrics: Metrics,
    ) -> Self {
        let sparse_filter = sparse_filter(projection.consumer_json(), store.subjects());
        let sparse = sparse_filter.is_some();
        let filter = sparse_filter.unwrap_or_else(|| store.subjects().events_filter());
        Projector {
            projection: Arc::new(projection),
            store,
            pool,
            client,
            batch,
            metrics,
            filter,
            sparse,
            position: AtomicU64::new(UNKNOWN),
            replay_applied: AtomicU64::new(0),
            stop: CancellationToken::new(),
            service_metadata: Default::default(),
        }
    }

    /// The metadata its micro service shows in `nats micro info` (a worker's:
    /// `Config::service_metadata`, its `CH_SYNC` and batching).
    #[must_use]
    pub fn with_service_metadata(
        mut self,
        metadata: std::collections::HashMap<String, String>,
    ) -> Self {
        self.service_metadata = metadata;
        self
    }

    fn set_position(&self, seq: u64) {
        self.position.store(seq, Ordering::Relaxed);
    }

    /// How far this projector's replay has got, committed or not (`None` when it replays
    /// nothing): for progress reports, never for reads (its read model has only the checkpoint).
    #[must_use]
    pub fn replay_applied(&self) -> Option<u64> {
        Some(self.replay_applied.load(Ordering::Relaxed)).filter(|&seq| seq > 0)
    }

    /// The checkpoint this projector last committed or read (`None` before the first).
    #[must_use]
    pub fn last_committed(&self) -> Option<u64> {
        Some(self.position.load(Ordering::Relaxed)).filter(|&seq| seq != UNKNOWN)
    }

    fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Opens a projector transaction: locks the checkpoint row (against other writers, a
    /// rebuild's reset) for the transaction and returns the checkpoint.
    async fn begin<'c>(
        &self,
        conn: &'c mut deadpool_postgres::Object,
    ) -> Result<(Transaction<'c>, u64), ProjectorError> {
        let tx = conn.transaction().await?;
        // One round trip with the commit setting: the upsert makes sure the row exists, locks
        // it and returns it.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.name()];
        let lock = tx
            .prepare_cached(
                "INSERT INTO ch_checkpoints (projection, last_seq) VALUES ($1, 0)
                 ON CONFLICT (projection) DO UPDATE SET projection = EXCLUDED.projection
                 RETURNING last_seq",
            )
            .await?;
        let (_, row) =
            futures::try_join!(tx.batch_execute(NO_WAL_WAIT), tx.query_one(&lock, &params),)?;
        let cp: i64 = row.get(0);
        Ok((tx, cp as u64))
    }

    /// The events of `raws` to apply in a transaction that has applied up to `*last`: skips
    /// what is applied already and what the projection does not want (moving `*last`), and
    /// collects what cannot be decoded in `dead`. `Err` when `raws` does not follow `*last`.
    fn select(
        &self,
        raws: &mut [Raw],
        last: &mut u64,
        dead: &mut Vec<Dead>,
    ) -> Result<Vec<StoredEvent>, Gap> {
        if self.sparse {
            // Holes are normal; a checkpoint below ours means the read model was reset.
            let known = self.position.load(Ordering::Relaxed);
            if known != UNKNOWN && *last < known {
                if let Some(first) = raws.iter().find(|r| r.seq > *last) {
                    return Err(Gap {
                        checkpoint: *last,
                        first: first.seq,
                    });
                }
            }
        }
        let mut events = Vec::with_capacity(raws.len());
        for raw in raws.iter_mut() {
            if raw.seq <= *last {
                continue;
            }
            if !self.sparse && raw.seq > *last + 1 {
                return Err(Gap {
                    checkpoint: *last,
                    first: raw.seq,
                });
            }
            *last = raw.seq;
            if !raw.wanted {
                continue;
            }
            match raw.take_event() {
                Ok(ev) => events.push(ev),
                Err(e) => dead.push(Dead {
                    seq: raw.seq,
                    payload: raw.payload.clone(),
                    why: e.to_string(),
                }),
            }
        }
        Ok(events)
    }

    /// Flushes the projection, moves the checkpoint from `cp` to `last`, commits, and then
    /// dead-letters what could not be decoded.
    async fn commit(
        &self,
        tx: Transaction<'_>,
        cp: u64,
        last: u64,
        dead: Vec<Dead>,
    ) -> Result<(), ProjectorError> {
        self.projection.flush(&tx).await?;
        if last != cp {
            crate::pg::exec(
                &tx,
                "UPDATE ch_checkpoints SET last_seq = $2, updated_at = now() WHERE projection = $1",
                &[&self.name(), &(last as i64)],
            )
            .await?;
        }
        tx.commit().await?;
        self.committed(last, dead).await;
        Ok(())
    }

    /// After a commit up to `last`: where this projector is now, and the dead letters of what
    /// could not be decoded.
    async fn committed(&self, last: u64, dead: Vec<Dead>) {
        self.set_position(last);
        for d in dead {
            self.dead_letter(d.seq, &d.payload, &d.why).await;
        }
    }

    /// Applies one chunk of consecutive messages in one transaction.
    async fn apply_chunk(&self, raws: &mut [Raw]) -> Result<Chunk, ProjectorError> {
        let mut conn = self.pool.get().await.map_err(DbError::from)?;
        let (tx, cp) = self.begin(&mut conn).await?;
        let mut last = cp;
        let mut dead = Vec::new();
        let events = match self.select(raws, &mut last, &mut dead) {
            Ok(events) => events,
            Err(Gap { checkpoint, first }) => return Ok(Chunk::Gap { checkpoint, first }),
        };
        if !events.is_empty() {
            self.projection.apply_batch(&tx, &events, cp).await?;
        }
        self.commit(tx, cp, last, dead).await?;
        Ok(Chunk::Done(last))
    }

    async fn dead_letter(&self, seq: u64, payload: &Bytes, why: &str) {
        error!(
            projection = self.name(),
            seq,
            error = why,
            "dead-lettered an event the projection cannot apply"
        );
        self.metrics.add("dead_letters", 1);
        self.metrics.gauge("dead_letters_last_seq", seq as i64);
        let mut h = HeaderMap::new();
        h.insert("Ch-Error", why.replace(['\r', '\n'], " ").as_str());
        h.insert("Ch-Stream-Seq", seq.to_string().as_str());
        let subject = self.store.subjects().dead_letter(self.name());
        if let Err(e) = self
            .client
            .publish_with_headers(subject, h, payload.clone())
            .await
        {
            warn!(projection = self.name(), seq, error = %e, "could not publish the dead letter");
        }
    }

    /// Applies a chunk; on a data error in one event, applies the events one by one and
    /// dead-letters the one that fails. Transient errors are returned for a retry; so is a data
    /// error on a schema a newer release migrated (an upgrade under way): the event is not at
    /// fault, and skipping it would lose it for good.
    async fn apply_robust(&self, raws: &mut [Raw]) -> Result<Chunk, ProjectorError> {
        match self.apply_chunk(raws).await {
            Err(ProjectorError::Db(DbError::Query(e))) if poison(&e) => {
                self.refuse_if_schema_ahead(&e).await?;
                warn!(
                    error = pg_text(&e),
                    events = raws.len(),
                    "batch failed; applying one by one"
                );
                let mut done = 0;
                for raw in raws.iter_mut() {
                    match self.apply_chunk(std::slice::from_mut(raw)).await {
                        Ok(Chunk::Done(s)) => done = s,
                        Ok(gap @ Chunk::Gap { .. }) => return Ok(gap),
                        Err(ProjectorError::Db(DbError::Query(e))) if poison(&e) => {
                            self.dead_letter(raw.seq, &raw.payload, &pg_text(&e)).await;
                            self.skip(raw.seq).await?;
                            done = raw.seq;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(Chunk::Done(done))
            }
            other => other,
        }
    }

    /// An error when the schema holds a migration newer than this build knows: its batches fail
    /// (retried with backoff, logged, counted in `consecutive_failures`) until a projector of
    /// the newer release replaces it, rather than dead-lettering events the new schema's
    /// constraints refuse from an old projector's writes.
    async fn refuse_if_schema_ahead(
        &self,
        e: &tokio_postgres::Error,
    ) -> Result<(), ProjectorError> {
        let Some(known) = self.projection.schema_known() else {
            return Ok(());
        };
        let conn = self.pool.get().await.map_err(DbError::from)?;
        let newest: Option<i32> = conn
            .query_one("SELECT max(version) FROM ch_migrations", &[])
            .await?
            .get(0);
        match newest {
            Some(newest) if newest > known => Err(DbError::Refused(format!(
                "the schema is at migration {newest}, newer than this projector knows ({known}): \
                 its writes break the newer schema ({}), and it waits for its replacement by the \
                 newer release rather than skip events",
                pg_text(e)
            ))
            .into()),
            _ => Ok(()),
        }
    }

    /// Moves the checkpoint past a dead-lettered event (only from where it was: the previous
    /// sequence, or for a sparse projection the checkpoint it committed last).
    async fn skip(&self, seq: u64) -> Result<(), ProjectorError> {
        let from = if self.sparse {
            self.position.load(Ordering::Relaxed)
        } else {
            seq - 1
        };
        match self.advance(from, seq).await? {
            now if now == seq => Ok(()),
            // A reset meanwhile (checkpoint moved back): the caller replays from it (transient).
            now if now < from => Err(ProjectorError::Reset {
                checkpoint: now,
                applied: from,
            }),
            now => Err(StoreError::Other(format!(
                "checkpoint moved to {now} while skipping {seq} from {from}"
            ))
            .into()),
        }
    }

    /// Moves the checkpoint from `from` to `to` with nothing to apply (compare and set: a
    /// reset in between wins). Returns the checkpoint now.
    async fn advance(&self, from: u64, to: u64) -> Result<u64, ProjectorError> {
        let conn = self.pool.get().await.map_err(DbError::from)?;
        let stmt = conn.prepare_cached(ADVANCE_SQL).await?;
        let moved = conn
            .execute(&stmt, &[&self.name(), &(from as i64), &(to as i64)])
            .await?;
        let now = if moved == 1 {
            to
        } else {
            checkpoint(&**conn, self.name()).await?
        };
        self.set_position(now);
        Ok(now)
    }

    /// Sparse projections: is there an event of the projection's subjects in `from..=to`?
    async fn has_events(&self, from: u64, to: u64) -> Result<bool, ProjectorError> {
        Ok(self.store.has_events(&self.filter, from, to).await?)
    }

    /// Replays the stream from the checkpoint up to `to` (inclusive) with an ordered consumer.
    /// Used to fill gaps and by `chctl rebuild`. Transactions of up to `CH_REPLAY_BATCH_MAX`
    /// events, applied in chunks (the projection writes the rows that change in every chunk,
    /// such as a portfolio's, once per transaction); should one fail on an event's data, the
    /// replay starts again from the checkpoint with a transaction per chunk, which finds the
    /// event and dead-letters it.
    ///
    /// # Errors
    /// [`ProjectorError`] on store or database trouble.
    pub async fn catch_up(&self, to: u64) -> Result<u64, ProjectorError> {
        loop {
            match self.catch_up_once(to).await {
                Err(e @ ProjectorError::Reset { .. }) => {
                    info!(projection = self.name(), reason = %e, "replaying from the checkpoint");
                }
                other => return other,
            }
        }
    }

    async fn catch_up_once(&self, to: u64) -> Result<u64, ProjectorError> {
        let per_tx = self.batch.replay_max.max(1);
        match self.replay(to, Some(per_tx)).await {
            Err(ProjectorError::Db(DbError::Query(e))) if poison(&e) => {
                warn!(
                    projection = self.name(),
                    error = pg_text(&e),
                    "a replay transaction failed; replaying a chunk per transaction"
                );
                self.replay(to, None).await
            }
            other => other,
        }
    }

    /// The replay: `per_tx` events per transaction, or `None` for one chunk per transaction,
    /// applied one event at a time if the chunk fails ([`Projector::apply_robust`]).
    async fn replay(&self, to: u64, per_tx: Option<usize>) -> Result<u64, ProjectorError> {
        let from = {
            let conn = self.pool.get().await.map_err(DbError::from)?;
            checkpoint(&**conn, self.name()).await?
        };
        // The replay starts from the checkpoint as it is (also after a reset).
        self.set_position(from);
        if from >= to {
            return Ok(from);
        }
        if self.sparse && !self.has_events(from + 1, to).await? {
            return self.advance(from, to).await;
        }
        let started = Instant::now();
        // A few events (a sparse projection's idle check finding one its durable is about to
        // deliver: the head is read as it is stored) at debug; a catch-up worth the name at info.
        let quiet = to - from < QUIET_REPLAY;
        log_at!(
            quiet,
            projection = self.name(),
            from = from + 1,
            to,
            "catching up from the stream"
        );
        let consumer = self.store.ordered_consumer(&self.filter, from + 1).await?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // Three stages: the reader receives the next chunk while the one before is decoded on
        // a blocking-pool thread (JSON decoding is the projector's largest cost in a replay)
        // and the one before that is folded and written; the handles keep them in order.
        let chunk_size = (self.batch.replay_max / 4).clamp(1, REPLAY_CHUNK);
        let (chunks, mut received) =
            tokio::sync::mpsc::channel::<tokio::task::JoinHandle<Vec<Raw>>>(1);
        let read = async move {
            let mut chunk = Vec::with_capacity(chunk_size);
            loop {
                let msg = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await
                {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => return Err(StoreError::Unavailable(e.to_string()).into()),
                    Ok(None) | Err(_) => {
                        let at = chunk.last().map_or(from, |r: &Raw| r.seq);
                        return Err(
                            StoreError::Unavailable(format!("replay stalled after {at}")).into(),
                        );
                    }
                };
                let info = msg.info().map_err(|e| StoreError::Other(e.to_string()))?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                chunk.push(Raw::undecoded(seq, &msg, &*self.projection));
                // A sparse replay ends with the last event of its subjects.
                let end = seq >= to || (self.sparse && pending == 0);
                if chunk.len() >= chunk_size || end {
                    let mut full = std::mem::replace(&mut chunk, Vec::with_capacity(chunk_size));
                    let decoded = tokio::task::spawn_blocking(move || {
                        full.iter_mut().for_each(Raw::decode);
                        full
                    });
                    // A closed channel: the writer failed, and its error is the one returned.
                    if chunks.send(decoded).await.is_err() || end {
                        return Ok::<(), ProjectorError>(());
                    }
                }
            }
        };
        let decoded = |handle: tokio::task::JoinHandle<Vec<Raw>>| async move {
            handle
                .await
                .map_err(|e| ProjectorError::from(StoreError::Other(format!("decoding: {e}"))))
        };
        // A chunk that does not follow the checkpoint: a reset moved it back below what this
        // replay applied (replay again), or the stream lacks events (an error).
        let skipped = |checkpoint: u64, first: u64, applied: u64| {
            if checkpoint < applied {
                ProjectorError::Reset {
                    checkpoint,
                    applied,
                }
            } else {
                ProjectorError::from(StoreError::Other(format!(
                    "ordered replay skipped from {checkpoint} to {first}"
                )))
            }
        };
        let write = async {
            let mut last = from;
            let mut next_report = Instant::now() + Duration::from_secs(2);
            let mut next = received.recv().await;
            while let Some(handle) = next.take() {
                let mut chunk = decoded(handle).await?;
                match per_tx {
                    None => match self.apply_robust(&mut chunk).await? {
                        Chunk::Done(s) => last = s,
                        Chunk::Gap { checkpoint, first } => {
                            return Err(skipped(checkpoint, first, last))
                        }
                    },
                    Some(per_tx) => {
                        let mut conn = self.pool.get().await.map_err(DbError::from)?;
                        let (tx, cp) = self.begin(&mut conn).await?;
                        let (mut applied, mut dead, mut events_in_tx) = (cp, Vec::new(), 0);
                        // The batches of one transaction follow each other: each one after the
                        // last event of the one before (unwanted events are not handed over).
                        let mut after = cp;
                        loop {
                            let events = self
                                .select(&mut chunk, &mut applied, &mut dead)
                                .map_err(|g| skipped(g.checkpoint, g.first, last))?;
                            events_in_tx += chunk.len();
                            if let Some(last_event) = events.last().map(|e| e.seq) {
                                self.projection.apply_batch(&tx, &events, after).await?;
                                after = last_event;
                            }
                            self.replay_applied.store(applied, Ordering::Relaxed);
                            if events_in_tx + chunk_size > per_tx {
                                break;
                            }
                            match received.recv().await {
                                Some(handle) => chunk = decoded(handle).await?,
                                None => break,
                            }
                        }
                        self.commit(tx, cp, applied, dead).await?;
                        last = applied;
                    }
                }
                // Committed: announced (and in the gauge), so that waiters follow a long replay,
                // after a reset that announced 0.
                self.announce(last).await;
                if self.stop.is_cancelled() {
                    return Err(ProjectorError::Stopped { at: last });
                }
                if Instant::now() >= next_report {
                    let rate = (last - from) as f64 / started.elapsed().as_secs_f64();
                    info!(
                        projection = self.name(),
                        at = last,
                        to,
                        events_per_sec = rate as u64,
                        "catching up"
                    );
                    next_report = Instant::now() + Duration::from_secs(2);
                }
                next = received.recv().await;
            }
            Ok::<u64, ProjectorError>(last)
        };
        let joined = futures::try_join!(read, write);
        self.replay_applied.store(0, Ordering::Relaxed);
        let ((), mut last) = joined?;
        if self.sparse && last < to {
            // Sparse: no event of its subjects after `last` up to `to`.
            last = self.advance(last, to).await?;
        }
        self.announce(last).await;
        let secs = started.elapsed().as_secs_f64();
        log_at!(
            quiet,
            projection = self.name(),
            events = last - from,
            seconds = secs,
            events_per_sec = ((last - from) as f64 / secs.max(1e-9)) as u64,
            "caught up"
        );
        Ok(last)
    }

    async fn announce(&self, seq: u64) {
        self.metrics.gauge("last_seq", seq as i64);
        let subject = self.store.subjects().progress(self.name());
        let _ = self.client.publish(subject, seq.to_string().into()).await;
    }

    /// Applies a batch from the durable consumer that follows the checkpoint this projector
    /// committed last, in three round trips: `BEGIN`; then, sent together, the compare-and-set
    /// of the checkpoint (from where this projector left it to the batch's last sequence, which
    /// also locks the row against a reset), the projection's writes and its flush; `COMMIT`.
    /// The checkpoint need not be read first, as [`Projector::apply_chunk`] does. `None` when it
    /// does not apply (a sparse projection, a batch that does not follow, a checkpoint moved
    /// since: a reset): the caller applies the batch the careful way.
    async fn apply_live(&self, raws: &mut [Raw]) -> Result<Option<u64>, ProjectorError> {
        let from = self.position.load(Ordering::Relaxed);
        if self.sparse || from == UNKNOWN {
            return Ok(None);
        }
        let (mut last, mut dead) = (from, Vec::new());
        let Ok(events) = self.select(raws, &mut last, &mut dead) else {
            return Ok(None);
        };
        if last == from {
            // Redeliveries only: applied already.
            return Ok(Some(from));
        }
        let mut conn = self.pool.get().await.map_err(DbError::from)?;
        let tx = conn.transaction().await?;
        let cas = tx.prepare_cached(ADVANCE_SQL).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&self.name(), &(from as i64), &(last as i64)];
        let writes = async {
            if !events.is_empty() {
                self.projection.apply_batch(&tx, &events, from).await?;
            }
            self.projection.flush(&tx).await
        };
        // Sent in this order on the connection.
        let ((), moved, ()) = futures::try_join!(
            tx.batch_execute(NO_WAL_WAIT),
            tx.execute(&cas, &params),
            writes,
        )?;
        if moved != 1 {
            tx.rollback().await?;
            debug!(
                from,
                "the checkpoint is not where this projector left it (a reset, or none yet); \
                 applying the batch after reading it"
            );
            return Ok(None);
        }
        tx.commit().await?;
        self.committed(last, dead).await;
        Ok(Some(last))
    }

    /// Applies a batch from the durable consumer, filling a gap first if there is one.
    async fn process(&self, raws: &mut [Raw]) -> Result<u64, ProjectorError> {
        if self.sparse {
            self.fill_sparse_gap(raws).await?;
        }
        match self.apply_live(raws).await {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => {}
            // Applied again below: one event at a time if one of them is at fault, or retried
            // with backoff if the database is. Said here with its cause: the connection it
            // failed on may fail the next attempt with no more than "connection closed".
            Err(e) => warn!(error = %e, "live transaction failed; applying the batch again"),
        }
        loop {
            match self.apply_robust(raws).await? {
                Chunk::Done(s) => return Ok(s),
                Chunk::Gap { checkpoint, first } => {
                    debug!(checkpoint, first, "gap before batch");
                    self.catch_up(first - 1).await?;
                }
            }
        }
    }

    /// A sparse projection's sequences have holes, so a delivery lost on the way (a reconnect,
    /// a failover) does not show as one: the batch would move the checkpoint past the event,
    /// and its ack (policy `all`) would ack that event too, for good. So for each hole before
    /// or inside the batch, the stream is asked (one direct get) for the next event of the
    /// projection's subjects after it; if one lies in the hole, the read model first catches
    /// up from the stream to the batch's event after the last such hole.
    async fn fill_sparse_gap(&self, raws: &[Raw]) -> Result<(), ProjectorError> {
        let known = self.position.load(Ordering::Relaxed);
        if known == UNKNOWN {
            return Ok(());
        }
        let (mut prev, mut missing) = (known, None);
        for seq in raws.iter().map(|r| r.seq).filter(|s| *s > known) {
            if seq > prev + 1 && self.has_events(prev + 1, seq - 1).await? {
                missing = Some((prev, seq));
            }
            prev = seq;
        }
        if let Some((after, before)) = missing {
            warn!(
                projection = self.name(),
                checkpoint = known,
                after,
                before,
                "an event was not delivered; catching up from the stream"
            );
            self.catch_up(before - 1).await?;
        }
        Ok(())
    }

    /// Waits to become the active projector of this projection (advisory lock held by a
    /// dedicated connection for as long as this projector runs). The database may be away
    /// meanwhile (a restart): it retries every second, counting the failures in `retry` (a
    /// standby that can reach the database ends the count; one that leads, once it projects).
    /// `None` on `shutdown`.
    async fn lead(&self, shutdown: &CancellationToken, retry: &mut Retry) -> Option<Leader> {
        let (mut standing_by, mut warned) = (false, false);
        loop {
            match self.lead_once().await {
                Ok(Some(leader)) => return Some(leader),
                Ok(None) => {
                    retry.succeeded(&self.metrics);
                    if !standing_by {
                        self.metrics.gauge("active", 0);
                        // The backlog is the active one's to show: summed over replicas, it
                        // counts once.
                        self.metrics.gauge("pending", 0);
                        info!(
                            projection = self.name(),
                            "the lock is held (another projector, or a `chctl rebuild` replaying); standing by"
                        );
                        standing_by = true;
                    }
                }
                Err(e) => {
                    let failures = retry.failed(&self.metrics);
                    // Unless it stood by, it shows the backlog as it grows meanwhile (its
                    // status endpoint, needing the database, says nothing then).
                    if !standing_by {
                        self.count_durable_backlog(shutdown).await;
                    }
                    if !warned {
                        warned = true;
                        warn!(
                            projection = self.name(),
                            error = %e,
                            "cannot take the projector lock; retrying every second"
                        );
                    } else {
                        debug!(projection = self.name(), error = %e, failures, "projector lock");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(LEAD_POLL) => {}
            }
        }
    }

    /// Runs until `shutdown`: leads (or stands by until it can), projects, and should the
    /// lock's session end, stands by again, so that one projector is active at a time. Should
    /// it fail to start projecting because the store or the database is away (a restart), it
    /// releases the lock and tries again, backing off.
    ///
    /// # Errors
    /// [`ProjectorError`] when projecting fails for a reason trying again will not mend: a
    /// consumer definition that does not parse, a stream that lacks events a replay needs.
    /// Database errors are retried (a missing grant or column is logged as it recurs).
    async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), ProjectorError> {
        // One count of failures in a row: taking the lock, starting, batches and idle checks.
        let mut retry = Retry::default();
        while let Some(leader) = self.lead(&shutdown, &mut retry).await {
            match self.project(leader, &shutdown, &mut retry).await {
                Ok(Ended::Shutdown) => break,
                Err(ProjectorError::Stopped { at }) => {
                    info!(
                        projection = self.name(),
                        at, "the replay stopped for the shutdown"
                    );
                    break;
                }
                // The database away, or refusing what is not the events' fault (a missing
                // grant, an undefined column: poison events were dead-lettered by the replay):
                // retried, as after the start, until it passes.
                Err(e) if e.transient() || matches!(e, ProjectorError::Db(DbError::Query(_))) => {
                    retrying(
                        self.name(),
                        "starting to project (the lock is released)",
                        &e,
                    );
                    self.count_durable_backlog(&shutdown).await;
                    if !retry.wait(&self.metrics, &shutdown).await {
                        break;
                    }
                }
                Err(e) => return Err(e),
                Ok(Ended::ConsumerGone) => {
                    warn!(
                        projection = self.name(),
                        "the consumer's deliveries ended (was it deleted?); starting again, which \
                         makes it anew from the checkpoint"
                    );
                    if !retry.wait(&self.metrics, &shutdown).await {
                        break;
                    }
                }
                Ok(Ended::LostLead) => {
                    warn!(
                        projection = self.name(),
                        "the projector lock's database session ended; a standby may take over, \
                         else this one takes the lock again"
                    );
                    // A standby polls every `LEAD_POLL`: it gets the first chance, so that a
                    // replica that lost its session hands over rather than racing for the lock.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(HANDOVER) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Projects while it holds the lock of `leader`: until `shutdown` (the batch in hand is
    /// committed and acked before returning) or until the lock's session ends. `retry` counts
    /// the failures in a row, of starting as well as of batches; a batch or idle check that
    /// succeeds ends the count.
    async fn project(
        &self,
        leader_conn: Leader,
        shutdown: &CancellationToken,
        retry: &mut Retry,
    ) -> Result<Ended, ProjectorError> {
        self.metrics.gauge("active", 1);
        let ended = self.project_with_lock(&leader_conn, shutdown, retry).await;
        self.metrics.gauge("active", 0);
        release(leader_conn).await;
        ended
    }

    /// The projection's durable consumer, made from its shipped definition if it does not
    /// exist yet (starting where the read model is), or replaced if an older definition made
    /// it, or if it would deliver again what the read model has (a replay after an outage
    /// applied its backlog: new events would wait behind its redelivery).
    async fn open_consumer(&self) -> Result<PullConsumer, ProjectorError> {
        let name = self.name();
        let mut cfg = consumer_config(self.projection.consumer_json(), self.store.subjects())?;
        // Only used if the durable does not exist yet: start where the read model is.
        let cp = {
            let conn = self.pool.get().await.map_err(DbError::from)?;
            checkpoint(&**conn, name).await?
        };
        cfg.deliver_policy = DeliverPolicy::ByStartSequence {
            start_sequence: cp + 1,
        };
        let durable = cfg.durable_name.clone().unwrap_or_default();
        let consumer = self.store.durable_consumer(&durable, &cfg).await?;
        let info = consumer.cached_info();
        // A durable is only a cursor (the checkpoint is the truth): replaced when it is not
        // the shipped one (a setting NATS does not update, or one that would stop projecting,
        // `headers_only` say), or behind the read model with events to deliver.
        let differing = crate::eventstore::consumer_differences(&info.config, &cfg);
        if !differing.is_empty() {
            warn!(
                consumer = %durable,
                settings = %differing.join(","),
                "replacing a consumer that differs from nats/consumers/"
            );
        } else if info.ack_floor.stream_sequence < cp
            && info.num_pending + info.num_ack_pending as u64 > 0
        {
            info!(
                consumer = %durable,
                ack_floor = info.ack_floor.stream_sequence,
                checkpoint = cp,
                "moving the consumer past the events the read model has"
            );
        } else {
            return Ok(consumer);
        }
        let stream = self.store.stream();
        let _ = stream.delete_consumer(&durable).await;
        Ok(stream
            .create_consumer(cfg)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?)
    }

    /// Brings the read model to the stream's head from its checkpoint, and announces where it
    /// is: when idle or told of a reset (nothing reset behind its back; waiters that missed an
    /// announcement hear it again), and after a failed batch. The store or the database may be
    /// away for a moment: it backs off then. Whether it caught up; `None` on `shutdown`.
    async fn resync(
        &self,
        what: &str,
        retry: &mut Retry,
        shutdown: &CancellationToken,
    ) -> Option<bool> {
        match self.catch_up_to_head().await {
            Ok(at) => {
                retry.succeeded(&self.metrics);
                self.announce(at).await;
                Some(true)
            }
            Err(e) => {
                retrying(self.name(), what, &e);
                retry.wait(&self.metrics, shutdown).await.then_some(false)
            }
        }
    }

    /// Sets the `pending` gauge from the server's count: what the consumer has not delivered,
    /// and what it delivered that is not acked (handed back after a failure, or in this
    /// projector's buffer). A batch's first delivery sets it as the batch starts, from the
    /// first count alone; this is for when no batch starts (idle, or batches failing).
    async fn count_backlog(&self, consumer: &mut PullConsumer) {
        if let Ok(info) = consumer.info().await {
            let backlog = info.num_pending + info.num_ack_pending as u64;
            self.metrics.gauge("pending", backlog as i64);
        }
    }

    /// [`Projector::count_backlog`] from the durable's name, for when this projector holds no
    /// consumer (it cannot lead, or failed to start projecting); nothing if there is no such
    /// durable yet.
    /// A shutdown does not wait for it (NATS may be away too).
    async fn count_durable_backlog(&self, shutdown: &CancellationToken) {
        let Ok(cfg) = consumer_config(self.projection.consumer_json(), self.store.subjects())
        else {
            return;
        };
        let Some(durable) = cfg.durable_name else {
            return;
        };
        let stream = self.store.stream();
        let info = tokio::select! {
            () = shutdown.cancelled() => return,
            info = stream.consumer_info(&durable) => info,
        };
        if let Ok(info) = info {
            let backlog = info.num_pending + info.num_ack_pending as u64;
            self.metrics.gauge("pending", backlog as i64);
        }
    }

    /// The batch's events in stream order, and the index in `batch` of its newest delivery (by
    /// consumer sequence): the one whose ack acks the batch.
    fn raws_of(&self, batch: &[Delivery]) -> (Vec<Raw>, Option<usize>) {
        let mut raws = Vec::with_capacity(batch.len());
        let mut newest: Option<(u64, usize)> = None;
        // Redeliveries of what is applied are skipped undecoded (decoded when taken, should a
        // reset have moved the checkpoint back meanwhile).
        let applied = self.position.load(Ordering::Relaxed);
        for (i, m) in batch.iter().enumerate() {
            match m.info() {
                Ok(info) => {
                    let seq = info.stream_sequence;
                    raws.push(if applied != UNKNOWN && seq <= applied {
                        Raw::undecoded(seq, m, &*self.projection)
                    } else {
                        Raw::new(seq, m, &*self.projection)
                    });
                    if newest.is_none_or(|(c, _)| info.consumer_sequence > c) {
                        newest = Some((info.consumer_sequence, i));
                    }
                }
                Err(e) => warn!(error = %e, "message without JetStream metadata"),
            }
        }
        raws.sort_by_key(|r| r.seq);
        (raws, newest.map(|(_, i)| i))
    }

    async fn project_with_lock(
        &self,
        leader_conn: &Leader,
        shutdown: &CancellationToken,
        retry: &mut Retry,
    ) -> Result<Ended, ProjectorError> {
        let name = self.name();
        if let Some(why) = self.reset_if_from_another_stream().await? {
            warn!(
                projection = name,
                "read model reset: {why}; folding this stream from its start"
            );
        }
        // Catch up first with an ordered replay: fast after a rebuild or a long outage. Then
        // the durable, moved past what the replay applied.
        let checkpoint = self.catch_up_to_head().await?;
        let mut consumer = self.open_consumer().await?;
        // A batch waits to fill for at most half the consumer's ack wait: the server would
        // deliver its first events again meanwhile.
        let max_fill_wait = consumer.cached_info().config.ack_wait / 2;
        // (`adaptive` decides its own wait, at most a millisecond, and ignores the setting.)
        if !self.batch.adaptive && self.batch.wait > max_fill_wait {
            warn!(
                projection = name,
                batch_wait_ms = self.batch.wait.as_millis() as u64,
                ack_wait_ms = consumer.cached_info().config.ack_wait.as_millis() as u64,
                "CH_BATCH_WAIT_MS is more than half the consumer's ack wait: batches wait {} ms",
                max_fill_wait.as_millis()
            );
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.batch.max.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut resets = self
            .client
            .subscribe(self.store.subjects().projector_reset(name))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        info!(
            projection = name,
            checkpoint,
            consumer_ack_floor = consumer.cached_info().ack_floor.stream_sequence,
            batch_max = self.batch.max,
            filter = %self.filter,
            "projecting"
        );
        // Idle ticks check for a reset and re-announce; a sparse projection also moves its
        // checkpoint to the head on them, so they come more often.
        let idle = if self.sparse {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        };
        let mut decisions = AdaptiveLog::default();
        // The newest applied message not acked yet, and when the last ack went out.
        let mut to_ack: Option<Delivery> = None;
        let mut acked_at = Instant::now();
        // After a failed batch, the next events come from the stream, from the checkpoint: the
        // consumer goes on delivering what follows the failed batch (handed back, to come again
        // later), and a sparse projection, whose sequences have holes anyway, would apply it
        // and move its checkpoint past the failed events for good.
        let mut catch_up_first = false;
        let ended = loop {
            if leader_conn.lost() {
                break Ended::LostLead;
            }
            if catch_up_first {
                match self
                    .resync("catching up after a failed batch", retry, shutdown)
                    .await
                {
                    Some(caught_up) => catch_up_first = !caught_up,
                    None => break Ended::Shutdown,
                }
                if catch_up_first {
                    // Still failing: no batch starts to count what waits.
                    self.count_backlog(&mut consumer).await;
                }
                continue;
            }
            let first = tokio::select! {
                _ = shutdown.cancelled() => break Ended::Shutdown,
                // `chctl rebuild` reset the read model: replay now rather than when idle.
                Some(_) = resets.next() => Err(()),
                m = tokio::time::timeout(idle, messages.next()) => m.map_err(|_| ()),
            };
            let first = match first {
                Err(()) => {
                    ack(to_ack.take()).await;
                    if self.resync("idle check", retry, shutdown).await.is_none() {
                        break Ended::Shutdown;
                    }
                    // Idle: a batch's first delivery set the gauge last, and would show it for
                    // as long as nothing comes.
                    self.count_backlog(&mut consumer).await;
                    continue;
                }
                Ok(None) => break Ended::ConsumerGone,
                Ok(Some(Err(e))) => {
                    warn!(projection = name, error = %e, "consumer error; going on");
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            let (pending, behind) = first.info().map_or((0, Duration::ZERO), |i| {
                (i.pending, since(i.published.unix_timestamp_nanos()))
            });
            let (target, wait) = self.batch.plan(pending, behind);
            self.metrics.gauge("pending", pending as i64);
            let wait = wait.min(max_fill_wait);
            let mut batch = gather(&mut messages, first, target, wait, shutdown).await;
            if self.batch.adaptive {
                decisions.note(self, wait, batch.len(), behind, pending);
            }
            let (mut raws, newest) = self.raws_of(&batch);
            if leader_conn.lost() {
                // Another projector may hold the lock now: hand the batch back to the consumer
                // for it (redelivered now, not after the ack wait).
                for m in &batch {
                    let _ = m.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                }
                break Ended::LostLead;
            }
            let span = info_span!(
                "batch",
                projection = name,
                events = raws.len(),
                pending,
                first_seq = raws.first().map(|r| r.seq),
                last_seq = raws.last().map(|r| r.seq)
            );
            let result = self.process(&mut raws).instrument(span.clone()).await;
            match result {
                Ok(last) => {
                    retry.succeeded(&self.metrics);
                    // The consumers ack with policy `all`: the newest message acks the batch
                    // and every one before it. The checkpoint is the truth (a redelivery is
                    // skipped), so acks go out at most every ACK_EVERY: each one is a consumer
                    // state write on the server, synced to disk with `sync_interval: always`.
                    if let Some(i) = newest {
                        to_ack = Some(batch.swap_remove(i));
                    }
                    if acked_at.elapsed() >= ACK_EVERY {
                        ack(to_ack.take()).await;
                        acked_at = Instant::now();
                    }
                    self.announce(last).await;
                    span.in_scope(|| debug!(last_seq = last, "committed"));
                }
                Err(e) => {
                    span.in_scope(|| retrying(name, "batch", &e));
                    for m in &batch {
                        let _ = m
                            .ack_with(async_nats::jetstream::AckKind::Nak(Some(retry.backoff)))
                            .await;
                    }
                    // The backlog while batches fail (no batch starts to set it).
                    ack(to_ack.take()).await;
                    self.count_backlog(&mut consumer).await;
                    if !retry.wait(&self.metrics, shutdown).await {
                        break Ended::Shutdown;
                    }
                    catch_up_first = true;
                }
            }
        };
        ack(to_ack.take()).await;
        if matches!(ended, Ended::Shutdown) {
            info!(projection = name, "projector stopped");
        }
        Ok(ended)
    }

    /// Replays what the read model lacks up to the stream's head; returns where it is.
    async fn catch_up_to_head(&self) -> Result<u64, ProjectorError> {
        let head = self.store.last_seq().await?;
        self.catch_up(head).await
    }

    /// Empties the read model and sets its checkpoint to 0, in one transaction. A running
    /// projector notices the gap and replays the stream (see [`Projector::rebuild`]). The stream's
    /// creation time is recorded with the checkpoint (see
    /// [`Projector::reset_if_from_another_stream`]).
    ///
    /// # Errors
    /// [`ProjectorError`] on store or database trouble.
    pub async fn reset(&self) -> Result<(), ProjectorError> {
        let (_, created) = self.store.last_seq_and_created().await?;
        self.reset_for(created).await
    }

    /// [`Projector::reset`], recording `created` as the creation time of the stream the read
    /// model is folded from.
    async fn reset_for(&self, created: DateTime<Utc>) -> Result<(), ProjectorError> {
        let mut conn = self.pool.get().await.map_err(DbError::from)?;
        let tx = conn.transaction().await?;
        tx.execute(
            "INSERT INTO ch_checkpoints (projection, last_seq, stream_created) VALUES ($1, 0, $2)
             ON CONFLICT (projection) DO UPDATE
             SET last_seq = 0, stream_created = EXCLUDED.stream_created, updated_at = now()",
            &[&self.name(), &created],
        )
        .await?;
        self.projection.reset(&tx).await?;
        tx.commit().await?;
        info!(projection = self.name(), "read model reset");
        // Announces the checkpoint now, 0: command workers in `immediate` mode go by the last
        // announcement, and would otherwise take the read model for as full as before the
        // reset until the replay announces again (a re-sent command's old `stream_seq` would
        // be `projected: true` on an empty read model). Then tells a running projector to
        // replay now (it would notice on its next idle tick).
        let progress = self.store.subjects().progress(self.name());
        let notice = self.store.subjects().projector_reset(self.name());
        if self.client.publish(progress, "0".into()).await.is_ok()
            && self.client.publish(notice, Bytes::new()).await.is_ok()
        {
            let _ = self.client.flush().await;
        }
        Ok(())
    }

    /// Empties the read model when it was folded from another stream than the store's: one of
    /// the same name made before it (deleted and made again, or another server's), told by the
    /// creation time recorded with the checkpoint; or, for a read model from before that
    /// record, a longer one (its checkpoint past the head). Records the stream's creation time
    /// otherwise. The checkpoint is read before the stream: projectors running beside (the old
    /// release's, during an upgrade) move it on, but never past the head as it is when they
    /// commit. Why it reset, if it did.
    ///
    /// # Errors
    /// [`ProjectorError`] on store or database trouble.
    pub async fn reset_if_from_another_stream(&self) -> Result<Option<String>, ProjectorError> {
        let name = self.name();
        let conn = self.pool.get().await.map_err(DbError::from)?;
        let row = conn
            .query_opt(
                "SELECT last_seq, stream_created FROM ch_checkpoints WHERE projection = $1",
                &[&name],
            )
            .await?;
        let (cp, recorded) = row.map_or((0, None), |r| {
            (
                r.get::<_, i64>(0) as u64,
                r.get::<_, Option<DateTime<Utc>>>(1),
            )
        });
        let (head, created) = self.store.last_seq_and_created().await?;
        let stream = self.store.subjects().stream_name();
        let why = match recorded {
            Some(then) if then != created && cp > 0 => Some(format!(
                "it was folded up to seq {cp} from a stream {stream} made at {then}, not from \
                 the one there now, made at {created}"
            )),
            _ if cp > head => Some(format!(
                "it is at seq {cp} but stream {stream} ends at {head}: it was folded from \
                 another stream"
            )),
            _ => None,
        };
        if why.is_some() {
            drop(conn);
            self.reset_for(created).await?;
        } else if recorded != Some(created) {
            conn.execute(
                "INSERT INTO ch_checkpoints (projection, last_seq, stream_created) VALUES ($1, 0, $2)
                 ON CONFLICT (projection) DO UPDATE SET stream_created = EXCLUDED.stream_created",
                &[&name, &created],
            )
            .await?;
        }
        Ok(why)
    }

    /// Rebuilds the read model from the whole stream: reset, then replay. When another
    /// projector is active it does the replay (returns `None`); otherwise this call replays
    /// and returns the sequence it reached.
    ///
    /// # Errors
    /// [`ProjectorError`] on store or database trouble.
    pub async fn rebuild(&self) -> Result<Option<u64>, ProjectorError> {
        self.rebuild_unless_held(false).await
    }

    /// As [`Projector::rebuild`], but only when this call gets the projection's lock: `None`,
    /// with nothing reset, when another process holds it (for a caller that found no projector
    /// answering its status: the holder may be another `chctl rebuild` replaying, which a reset
    /// would only make start again).
    ///
    /// # Errors
    /// [`ProjectorError`] on store or database trouble.
    pub async fn rebuild_if_free(&self) -> Result<Option<u64>, ProjectorError> {
        self.rebuild_unless_held(true).await
    }

    async fn rebuild_unless_held(&self, held_stops: bool) -> Result<Option<u64>, ProjectorError> {
        let lock = self.lead_once().await?;
        if lock.is_none() && held_stops {
            return Ok(None);
        }
        self.reset().await?;
        let Some(lock) = lock else {
            return Ok(None);
        };
        let head = self.store.last_seq().await?;
        let last = self.catch_up(head).await;
        release(lock).await;
        Ok(Some(last?))
    }

    async fn lead_once(&self) -> Result<Option<Leader>, ProjectorError> {
        let conn = self.pool.get().await.map_err(DbError::from)?;
        let key = format!("ch_projector:{}", self.name());
        let got: bool = conn
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext(current_schema() || $1))",
                &[&key],
            )
            .await?
            .get(0);
        Ok(got.then_some(Leader(Some(conn))))
    }

    /// The rebuild endpoint: resets the read model (its checkpoint to 0, announced), which the
    /// projector then replays from the stream (this one or the one that holds the lock: the
    /// reset notice tells it); the reply comes once the reset is committed, with the stream's
    /// head at that moment. `chctl bench` times a rebuild with it, over NATS only; progress
    /// shows on `<prefix>.progress.<projection>` and in `status`.
    async fn rebuild_requested(&self) -> Result<Value, ApiError> {
        let (head, created) = self.store.last_seq_and_created().await?;
        self.reset_for(created).await.map_err(|e| match e {
            ProjectorError::Db(e) => ApiError::from(e),
            ProjectorError::Store(e) => ApiError::from(e),
            other => ApiError::internal(other.to_string()),
        })?;
        Ok(json!({
            "projection": self.name(),
            "reset": true,
            "stream_last_seq": head,
        }))
    }

    /// The status reply: checkpoint, stream head and lag (none for a sparse projection with no
    /// event of its subjects past its checkpoint, whose checkpoint moves only when idle).
    async fn status(&self) -> Result<Value, ApiError> {
        let conn = self.pool.get().await.map_err(DbError::from)?;
        let last = checkpoint(&**conn, self.name()).await?;
        let read_model = crate::pg::whereabouts(&conn).await?;
        let head = self.store.last_seq().await?;
        let behind = head > last
            && (!self.sparse || self.store.has_events(&self.filter, last + 1, head).await?);
        Ok(json!({
            "projection": self.name(),
            "last_seq": last,
            "stream_last_seq": head,
            "lag_events": if behind { head - last } else { 0 },
            // A replay's position past its last commit (`chctl rebuild` shows it), else null.
            "replay_applied": self.replay_applied().filter(|&seq| seq > last),
            // Where its read model is (`chctl rebuild` checks it resets the same one).
            "read_model": read_model,
        }))
    }
}

struct StatusHandler<P: Projection>(Arc<Projector<P>>);

impl<P: Projection> Handler for StatusHandler<P> {
    async fn handle(&self, endpoint: &str, msg: &async_nats::Message) -> Result<Value, ApiError> {
        crate::service::takes_no_fields(&msg.payload)?;
        match endpoint {
            "rebuild" => self.0.rebuild_requested().await,
            _ => self.0.status().await,
        }
    }
}

/// Runs a projector and its micro service (`<prefix>-proj-<name>`, endpoints `status` and
/// `rebuild`, on `intake`: see [`service::Connections`]) until `shutdown`.
///
/// # Errors
/// When the projector or its service fails to start.
pub async fn run<P: Projection>(
    projector: Projector<P>,
    intake: async_nats::Client,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let mut projector = projector;
    projector.stop = shutdown.clone();
    // Every gauge an operator looks for is there from the start: 0, not absent, until the
    // first failure or dead letter.
    for gauge in [
        "consecutive_failures",
        "dead_letters",
        "dead_letters_last_seq",
    ] {
        projector.metrics.gauge(gauge, 0);
    }
    let projector = Arc::new(projector);
    let subjects = projector.store.subjects().clone();
    let spec = ServiceSpec {
        name: subjects.service_name(&format!("proj-{}", projector.name())),
        description: format!("projector of the {} read model", projector.name()),
        endpoints: vec![
            EndpointSpec {
                name: "status".into(),
                subject: subjects.projector_status(projector.name()),
            },
            EndpointSpec {
                name: "rebuild".into(),
                subject: subjects.projector_rebuild(projector.name()),
            },
        ],
        metadata: projector.service_metadata.clone(),
    };
    let svc = tokio::spawn(service::serve(
        service::Connections {
            client: projector.client.clone(),
            intake,
        },
        spec,
        Arc::new(StatusHandler(projector.clone())),
        projector.metrics.clone(),
        shutdown.clone(),
    ));
    service::alongside(svc, projector.clone().run(shutdown.clone()), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(adaptive: bool) -> BatchConfig {
        BatchConfig {
            max: 500,
            wait: Duration::from_millis(5),
            adaptive,
            replay_max: 5000,
        }
    }

    #[test]
    fn fixed_modes_always_plan_their_settings() {
        let c = config(false);
        assert_eq!(c.plan(0, Duration::ZERO), (500, Duration::from_millis(5)));
        let far_behind = Duration::from_secs(9);
        assert_eq!(c.plan(10_000, far_behind), (500, Duration::from_millis(5)));
    }

    #[test]
    fn adaptive_waits_to_fill_only_when_behind() {
        let c = config(true);
        let just_short = ADAPTIVE_BEHIND - Duration::from_micros(1);
        // Caught up: take what has arrived, no wait (lowest latency).
        assert_eq!(c.plan(0, Duration::ZERO), (500, Duration::ZERO));
        assert_eq!(
            c.plan(ADAPTIVE_BACKLOG - 1, just_short),
            (500, Duration::ZERO)
        );
        // A backlog on the server, or events that waited: fill the batch (throughput).
        assert_eq!(
            c.plan(ADAPTIVE_BACKLOG, Duration::ZERO),
            (500, ADAPTIVE_FILL_WAIT)
        );
        assert_eq!(c.plan(0, ADAPTIVE_BEHIND), (500, ADAPTIVE_FILL_WAIT));
    }

    #[test]
    fn time_since_an_append() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let ago = since(now - 2_000_000_000);
        assert!(
            ago >= Duration::from_secs(2) && ago < Duration::from_secs(60),
            "{ago:?}"
        );
        // A timestamp ahead of this clock (skew between hosts) counts as no time at all.
        assert_eq!(since(now + 60_000_000_000), Duration::ZERO);
    }
}

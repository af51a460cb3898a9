//! The event store: one JetStream stream, one subject per aggregate.
//!
//! - Append: publish to `<prefix>.events.<type>.<id>` with `Nats-Expected-Last-Subject-Sequence`
//!   (0 = must not exist) and `Nats-Msg-Id`; a stale append fails with [`StoreError::Conflict`].
//! - Load: direct gets by subject (`next_by_subj`), never a consumer per load.
//! - Read after write on a replicated stream: a direct get may be answered by any replica,
//!   and a follower may not have the latest appends yet. Single reads go to the stream leader
//!   (the message get API), and a load reads with direct gets up to the subject's last
//!   sequence as the leader knows it (ADR 004). On one server every direct get already sees
//!   every acknowledged append.
//! - Definitions of the stream and the projector consumers are the JSON files in `nats/`,
//!   compiled in, with names and subjects rewritten for the configured prefix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::header::{self, HeaderMap};
use async_nats::jetstream::{self, consumer::pull, stream};
use ch_domain::{event::SCHEMA_VERSION, AggregateType, Event};
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::envelope::{self, Meta, StoredEvent};
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::subjects::Subjects;

/// `nats/stream.json`, usable with `nats stream add --config`.
pub const STREAM_JSON: &str = include_str!("../../../nats/stream.json");
/// `nats/consumers/proj_portfolio.json`.
pub const CONSUMER_PORTFOLIO_JSON: &str =
    include_str!("../../../nats/consumers/proj_portfolio.json");
/// `nats/consumers/proj_strategy.json`.
pub const CONSUMER_STRATEGY_JSON: &str = include_str!("../../../nats/consumers/proj_strategy.json");

pub(crate) const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
/// Clustered streams report a stale expected sequence with this code instead of 10071.
const ERR_WRONG_LAST_SEQ_CLUSTERED: u64 = 10164;
/// The message get API's "no message found".
const ERR_NO_MESSAGE: u64 = 10037;
/// JetStream's refusal of a message above the stream's `max_msg_size`.
const ERR_MESSAGE_TOO_LARGE: u64 = 10054;
/// JetStream's answers to a publish that another try may get past: the account's JetStream
/// limits reached (10002), no cluster quorum (10008), insufficient resources (10023), memory or
/// storage resources exceeded (10028, 10047), the store failed (10077), the stream full
/// (10122), too many publishes queued for the stream (10167, 2.11+), none of which stored it;
/// and, on a replicated stream, "duplicate message id is in process" (10158): the same message
/// id is still being proposed, a re-send of an append whose answer was late, which may yet be
/// stored, and which a later try finds as a duplicate (never `internal`, which would say
/// nothing was).
const RETRYABLE_PUBLISH_ERRORS: [u64; 9] = [
    10002, 10008, 10023, 10028, 10047, 10077, 10122, 10158, 10167,
];

/// The stream definition for a prefix: `nats/stream.json` with name and subjects replaced.
///
/// # Errors
/// [`StoreError::Other`] if the compiled-in JSON is invalid (a build defect).
pub fn stream_config(subjects: &Subjects, replicas: usize) -> Result<stream::Config, StoreError> {
    let mut cfg: stream::Config = serde_json::from_str(STREAM_JSON)
        .map_err(|e| StoreError::Other(format!("nats/stream.json: {e}")))?;
    cfg.name = subjects.stream_name();
    cfg.subjects = vec![subjects.events_filter()];
    cfg.num_replicas = replicas.max(1);
    Ok(cfg)
}

/// A projector's durable consumer definition for a prefix.
///
/// # Errors
/// [`StoreError::Other`] if the JSON is invalid.
pub fn consumer_config(json: &str, subjects: &Subjects) -> Result<pull::Config, StoreError> {
    let mut cfg: pull::Config =
        serde_json::from_str(json).map_err(|e| StoreError::Other(format!("consumer json: {e}")))?;
    // The files are written for prefix `ch`: `ch.events.>` or a part such as
    // `ch.events.strategy.>`.
    cfg.filter_subject = match cfg.filter_subject.strip_prefix("ch.events.") {
        Some(rest) if rest != ">" => format!("{}.events.{rest}", subjects.prefix()),
        _ => subjects.events_filter(),
    };
    Ok(cfg)
}

/// The filter of a projection that reads part of the stream (a *sparse* one, whose
/// checkpoint has holes), from its consumer definition; `None` when it reads every event.
pub fn sparse_filter(consumer_json: &str, subjects: &Subjects) -> Option<String> {
    consumer_config(consumer_json, subjects)
        .ok()
        .map(|c| c.filter_subject)
        .filter(|f| *f != subjects.events_filter())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Creates the event stream if missing, or updates it to the shipped definition in the
/// settings the workers rely on, when one differs (subjects, `deny_delete`, `deny_purge`,
/// `allow_direct`, `duplicate_window`); the others an operator set (limits, storage, replicas)
/// are kept. Idempotent. A refusal by NATS is final (not asked again).
/// Asked for up to [`OPEN_PATIENCE`] as [`EventStore::open`] asks: a cluster that has just
/// formed may leave a lookup or a creation unanswered while it elects its leaders (a creation
/// that went through unanswered is found by the next lookup).
///
/// # Errors
/// [`StoreError`] when JetStream stays unreachable or refuses the definition.
pub async fn ensure_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<stream::Stream, StoreError> {
    Ok(ensure_stream_reporting(js, subjects, replicas).await?.0)
}

/// What [`ensure_stream_reporting`] did to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSetup {
    Created,
    /// There, as shipped in the settings the workers rely on.
    InPlace,
    /// There, and updated in these settings.
    Updated(Vec<&'static str>),
}

/// As [`ensure_stream`], saying what it did, and which settings of an existing stream, left as
/// an operator set them, may lose events (memory storage, a retention other than `limits`,
/// an age, count or size limit): each logged as a warning too.
///
/// # Errors
/// As [`ensure_stream`].
pub async fn ensure_stream_reporting(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<(stream::Stream, StreamSetup, Vec<String>), StoreError> {
    let cfg = stream_config(subjects, replicas)?;
    let what = format!("stream {}", cfg.name);
    patiently(&what, OPEN_PATIENCE, || async {
        match ensure_stream_once(js, &cfg, replicas).await {
            Ok(s) => Answer::Yes(s),
            Err(StoreError::Unavailable(why)) => Answer::NotYet(why),
            Err(e) => Answer::No(e),
        }
    })
    .await
}

/// What [`ensure_consumer`] did to a durable consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerSetup {
    Created,
    InPlace,
    /// Updated in these settings.
    Updated(Vec<&'static str>),
    /// It differs in these, some of which NATS does not update ([`FIXED_CONSUMER_SETTINGS`]):
    /// its projector replaces it when it starts (from where its read model is).
    LeftToProjector(Vec<&'static str>),
}

/// The settings of a durable NATS does not update: a consumer that differs in one is
/// replaced, not updated.
pub const FIXED_CONSUMER_SETTINGS: [&str; 6] = [
    "ack_policy",
    "filter_subject",
    "filter_subjects",
    "replay_policy",
    "max_waiting",
    // Not an update's to undo (a paused consumer delivers nothing): made again, it is not.
    "paused",
];

/// Creates a projector's durable consumer from its shipped definition (`nats/consumers/`), or
/// brings an existing one to it in the settings NATS lets change (`chctl setup`).
///
/// # Errors
/// [`StoreError::Unavailable`] when NATS does not answer or refuses.
pub async fn ensure_consumer(
    stream: &stream::Stream,
    shipped: pull::Config,
) -> Result<ConsumerSetup, StoreError> {
    let durable = shipped.durable_name.clone().unwrap_or_default();
    let current = match stream.consumer_info(&durable).await {
        Ok(info) => info.config,
        Err(_) => {
            stream.create_consumer(shipped).await.map_err(unavailable)?;
            return Ok(ConsumerSetup::Created);
        }
    };
    let differing = consumer_differences(&current, &shipped);
    if differing.is_empty() {
        return Ok(ConsumerSetup::InPlace);
    }
    if differing
        .iter()
        .any(|d| FIXED_CONSUMER_SETTINGS.contains(d))
    {
        return Ok(ConsumerSetup::LeftToProjector(differing));
    }
    // What is not compared stays as it is (where the durable is, its replicas).
    let wanted = pull::Config {
        deliver_policy: current.deliver_policy,
        num_replicas: current.num_replicas,
        memory_storage: current.memory_storage,
        ..shipped
    };
    stream.update_consumer(wanted).await.map_err(|e| {
        let what = format!("updating {durable} ({}): {e}", differing.join(", "));
        // The server's refusal stands; only its being away is worth waiting for.
        match e.kind() {
            async_nats::jetstream::stream::ConsumerUpdateErrorKind::JetStream(_) => {
                StoreError::Other(what)
            }
            _ => unavailable(what),
        }
    })?;
    info!(consumer = %durable, settings = %differing.join(","), "updated consumer");
    Ok(ConsumerSetup::Updated(differing))
}

/// The settings in which a durable differs from its shipped definition (`nats/consumers/`,
/// and what that leaves at NATS' defaults): all that a projector's pulls depend on, where it
/// starts (`deliver_policy`, the projector's to choose) and its replicas (an operator's) aside.
pub fn consumer_differences(
    current: &async_nats::jetstream::consumer::Config,
    shipped: &pull::Config,
) -> Vec<&'static str> {
    differing([
        ("ack_policy", current.ack_policy != shipped.ack_policy),
        (
            "filter_subject",
            current.filter_subject != shipped.filter_subject,
        ),
        (
            "filter_subjects",
            current.filter_subjects != shipped.filter_subjects,
        ),
        (
            "replay_policy",
            current.replay_policy != shipped.replay_policy,
        ),
        ("max_waiting", current.max_waiting != shipped.max_waiting),
        ("ack_wait", current.ack_wait != shipped.ack_wait),
        ("max_deliver", current.max_deliver != shipped.max_deliver),
        (
            "max_ack_pending",
            current.max_ack_pending != shipped.max_ack_pending,
        ),
        ("headers_only", current.headers_only != shipped.headers_only),
        ("max_batch", current.max_batch != shipped.max_batch),
        ("max_expires", current.max_expires != shipped.max_expires),
        ("max_bytes", current.max_bytes != shipped.max_bytes),
        ("backoff", current.backoff != shipped.backoff),
        ("paused", current.pause_until.is_some()),
        ("description", current.description != shipped.description),
    ])
}

/// The names of the settings that differ.
fn differing<const N: usize>(settings: [(&'static str, bool); N]) -> Vec<&'static str> {
    settings
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
}

/// The settings of an existing event stream that may lose events, described.
fn risky_settings(c: &stream::Config) -> Vec<String> {
    let mut risks = Vec::new();
    if c.storage != stream::StorageType::File {
        risks.push("storage is memory: the events go with the server".to_owned());
    }
    if c.retention != stream::RetentionPolicy::Limits {
        risks.push(format!(
            "retention is {:?}, not limits: events are removed once consumed",
            c.retention
        ));
    }
    if !c.max_age.is_zero() {
        risks.push(format!(
            "max_age is {:?}: older events are removed",
            c.max_age
        ));
    }
    for (name, limit) in [
        ("max_msgs", c.max_messages),
        ("max_bytes", c.max_bytes),
        ("max_msgs_per_subject", c.max_messages_per_subject),
    ] {
        if limit > 0 {
            risks.push(format!("{name} is {limit}: events past it are removed"));
        }
    }
    risks
}

/// Prefixes that differ only in case or in `-` against `_` name the same stream: why `current`
/// is another prefix's event store than `wanted`'s, if it is.
fn anothers(current: &stream::Config, wanted: &stream::Config) -> Option<String> {
    let theirs = current
        .subjects
        .iter()
        .find(|s| s.ends_with(".events.>") && !wanted.subjects.contains(s))?;
    Some(format!(
        "stream {} is the event store of subjects {theirs}, not {}: prefixes that differ only \
         in case or in - against _ share a stream name; choose another CH_SUBJECT_PREFIX",
        wanted.name,
        wanted.subjects.join(", ")
    ))
}

/// Why a worker cannot use `current` as the event store of `subjects`, if it cannot: another
/// prefix's stream (whose consumers its projectors would replace with their own), or one that
/// `chctl setup` did not make (without the prefix's subjects, or without direct gets, which
/// every read of an aggregate is).
fn unusable(current: &stream::Config, subjects: &Subjects) -> Option<String> {
    let wanted = stream::Config {
        name: subjects.stream_name(),
        subjects: vec![subjects.events_filter()],
        ..Default::default()
    };
    if let Some(why) = anothers(current, &wanted) {
        return Some(why);
    }
    if !current.subjects.contains(&subjects.events_filter()) {
        return Some(format!(
            "stream {} does not take the subjects {} (it takes {}): `chctl setup` sets them",
            wanted.name,
            subjects.events_filter(),
            current.subjects.join(", ")
        ));
    }
    (!current.allow_direct).then(|| {
        format!(
            "stream {} does not allow direct gets (allow_direct), which every read of an \
             aggregate is: `chctl setup` sets it",
            wanted.name
        )
    })
}

async fn ensure_stream_once(
    js: &jetstream::Context,
    cfg: &stream::Config,
    replicas: usize,
) -> Result<(stream::Stream, StreamSetup, Vec<String>), StoreError> {
    let cfg = cfg.clone();
    match js.get_stream(&cfg.name).await {
        Ok(mut s) => {
            let current = s.info().await.map_err(unavailable)?.config.clone();
            // Replicas may have been scaled by an operator; keep theirs.
            let wanted = stream::Config {
                num_replicas: current.num_replicas,
                ..cfg
            };
            if let Some(why) = anothers(&current, &wanted) {
                return Err(StoreError::Other(why));
            }
            let differing = differing([
                ("subjects", current.subjects != wanted.subjects),
                ("deny_delete", current.deny_delete != wanted.deny_delete),
                ("deny_purge", current.deny_purge != wanted.deny_purge),
                ("allow_direct", current.allow_direct != wanted.allow_direct),
                (
                    "duplicate_window",
                    current.duplicate_window != wanted.duplicate_window,
                ),
            ]);
            let setup = if differing.is_empty() {
                StreamSetup::InPlace
            } else {
                // The rest of the operator's settings go along as they are: NATS refuses to
                // change some (storage, retention), and limits are theirs to choose.
                let wanted = stream::Config {
                    subjects: wanted.subjects.clone(),
                    deny_delete: wanted.deny_delete,
                    deny_purge: wanted.deny_purge,
                    allow_direct: wanted.allow_direct,
                    duplicate_window: wanted.duplicate_window,
                    ..current.clone()
                };
                js.update_stream(&wanted).await.map_err(|e| {
                    use async_nats::jetstream::context::CreateStreamErrorKind;
                    match e.kind() {
                        // The server's refusal stands; only its being away is worth waiting.
                        CreateStreamErrorKind::JetStream(j)
                            if !RETRYABLE_PUBLISH_ERRORS.contains(&j.error_code().0) =>
                        {
                            StoreError::Other(format!(
                                "stream {} differs from nats/stream.json in {} and NATS refuses \
                                 to update it: {e}",
                                wanted.name,
                                differing.join(", ")
                            ))
                        }
                        _ => unavailable(e),
                    }
                })?;
                info!(stream = %wanted.name, settings = %differing.join(","), "updated stream");
                StreamSetup::Updated(differing)
            };
            // The caller says them (set-up, to the operator).
            Ok((s, setup, risky_settings(&current)))
        }
        Err(_) => {
            let s = js.create_stream(cfg.clone()).await.map_err(|e| {
                use async_nats::jetstream::context::CreateStreamErrorKind;
                use async_nats::jetstream::ErrorCode;
                match e.kind() {
                    // A single server refuses replicas for good: not a cluster still forming.
                    CreateStreamErrorKind::JetStream(j)
                        if j.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED =>
                    {
                        StoreError::Other(format!(
                            "{e}: CH_STREAM_REPLICAS={replicas} needs a JetStream cluster"
                        ))
                    }
                    _ => unavailable(e),
                }
            })?;
            info!(stream = %cfg.name, replicas, "created stream");
            if replicas > 1 {
                wait_for_leader(&s).await?;
            }
            Ok((s, StreamSetup::Created, Vec::new()))
        }
    }
}

/// Waits until a replicated stream just created has elected its leader: until then it takes
/// no appends and answers no reads, so `chctl setup` returns with a stream the workers can use.
async fn wait_for_leader(s: &stream::Stream) -> Result<(), StoreError> {
    let name = &s.cached_info().config.name;
    patiently(
        &format!("stream {name} elected no leader"),
        NO_RESPONDERS_PATIENCE,
        || async {
            match s.get_info().await {
                Ok(info) => match info.cluster.and_then(|c| c.leader) {
                    Some(leader) if !leader.is_empty() => Answer::Yes(()),
                    _ => Answer::NotYet("no leader yet".into()),
                },
                Err(e) => Answer::NotYet(e.to_string()),
            }
        },
    )
    .await
}

/// Result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Stream sequence of each appended event.
    pub seqs: Vec<u64>,
    /// The server had already stored this `Nats-Msg-Id` (a re-sent command): `seqs` are the
    /// sequences of the original.
    pub duplicate: bool,
}

/// Events read per batched direct get (nats-server 2.11+).
const LOAD_BATCH: usize = 1000;

/// Bytes a batched direct get answers at most (the server ends the batch after the message
/// that passes them, and says how many are left): without it the server sends up to its
/// `max_pending` for the connection (64 MB by default), which a busy client reading slower
/// than that arrives would be cut off for, as a slow consumer.
const LOAD_MAX_BYTES: usize = 1 << 20;

/// The JetStream event store of one prefix.
#[derive(Clone)]
pub struct EventStore {
    client: async_nats::Client,
    /// The client's counters, read for [`EventStore::connects`] on every cached fact.
    connection: Arc<async_nats::Statistics>,
    js: jetstream::Context,
    stream: stream::Stream,
    subjects: Subjects,
    /// The server answers batched direct gets (2.11+): a cold load is one round trip per
    /// [`LOAD_BATCH`] events instead of one per event.
    batch_get: bool,
    /// Whether the stream has more than one replica (its followers answer direct gets too,
    /// possibly from before the latest appends), as last read from its definition.
    replication: Arc<Replication>,
    /// `$JS.API.DIRECT.GET.<stream>`.
    direct_api: String,
    /// `$JS.API.STREAM.MSG.GET.<stream>`, answered by the stream leader only.
    leader_api: String,
    /// Where reads asked again are counted.
    metrics: Metrics,
}

/// Whether a `major.minor.patch` server version is at least 2.11.
fn supports_batch_get(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 11)
}

/// How long a read waits in all for an answer: on a cluster none comes for a moment after the
/// stream is created ("no responders"), or while its leader changes (unanswered until the
/// client's timeout, so each try waits at most a quarter of this).
const NO_RESPONDERS_PATIENCE: Duration = Duration::from_secs(3);

/// How long a batched direct get waits for its answer before it is asked again: a request
/// sent just before NATS went away (a restart, a stalled host) is lost, and answered when asked
/// again once the connection is back.
const UNANSWERED_LOAD_TRY: Duration = Duration::from_secs(5);
/// How long a batched direct get is asked in all before the read fails (also while no server
/// answers it).
const UNANSWERED_LOAD_PATIENCE: Duration = Duration::from_secs(15);

/// How often the store reads the stream's replica count again: a stream scaled from one
/// replica to three while workers run is read from its leader within this long.
const REPLICATION_CHECK: Duration = Duration::from_secs(10);

/// The stream's replica count as last read, and when.
struct Replication {
    replicated: AtomicBool,
    checked: Mutex<Instant>,
    every: Duration,
}

impl Replication {
    fn new(replicated: bool, every: Duration) -> Arc<Self> {
        Arc::new(Replication {
            replicated: replicated.into(),
            checked: Instant::now().into(),
            every,
        })
    }

    /// Records the replica count of a stream definition just read.
    fn note(&self, replicas: usize) {
        self.replicated.store(replicas > 1, Ordering::Relaxed);
        *self.checked.lock().expect("replication lock") = Instant::now();
    }

    /// Whether the last reading is older than `every`; if so, the caller reads it now.
    fn due(&self) -> bool {
        let mut checked = self.checked.lock().expect("replication lock");
        let due = checked.elapsed() >= self.every;
        if due {
            *checked = Instant::now();
        }
        due
    }
}

/// A message read from the stream: its sequence and payload.
type Read = (u64, bytes::Bytes);

impl EventStore {
    /// Opens the store; the stream must exist (`chctl setup` creates it). A stream that does
    /// not answer yet (a replicated one electing its leader, which takes nats-server 5-10 s
    /// after a leader's crash) is asked again for up to [`OPEN_PATIENCE`].
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the stream cannot be found or does not answer;
    /// [`StoreError::Other`] when it is another prefix's, or not as `chctl setup` makes it.
    pub async fn open(client: async_nats::Client, subjects: Subjects) -> Result<Self, StoreError> {
        let js = jetstream::new(client.clone());
        let name = &subjects.stream_name();
        let stream = patiently(&format!("stream {name}"), OPEN_PATIENCE, || async {
            match js.get_stream(name).await {
                Ok(s) => Answer::Yes(s),
                // Unanswered: a replicated stream without a leader. A missing stream is an
                // answer: fail at once.
                Err(e) if e.kind() == jetstream::context::GetStreamErrorKind::Request => {
                    Answer::NotYet(e.to_string())
                }
                Err(e) => Answer::No(StoreError::Unavailable(format!("stream {name}: {e}"))),
            }
        })
        .await?;
        if let Some(why) = unusable(&stream.cached_info().config, &subjects) {
            return Err(StoreError::Other(why));
        }
        let replicated = stream.cached_info().config.num_replicas > 1;
        let batch_get = supports_batch_get(&client.server_info().version);
        Ok(EventStore {
            connection: client.statistics(),
            direct_api: format!("$JS.API.DIRECT.GET.{}", subjects.stream_name()),
            leader_api: format!("$JS.API.STREAM.MSG.GET.{}", subjects.stream_name()),
            client,
            js,
            stream,
            subjects,
            batch_get,
            replication: Replication::new(replicated, REPLICATION_CHECK),
            metrics: Metrics::default(),
        })
    }

    /// Counts its reads asked again in `metrics` (the worker's `$SRV.STATS`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Reads the stream's replica count again every `every` instead of every 10 s.
    #[must_use]
    pub fn with_replication_check(mut self, every: Duration) -> Self {
        let replicated = self.replication.replicated.load(Ordering::Relaxed);
        self.replication = Replication::new(replicated, every);
        self
    }

    /// Whether the stream has more than one replica, read again from its definition when the
    /// last reading (here or by [`EventStore::last_seq`], which projectors call every idle
    /// second) is older than [`REPLICATION_CHECK`]; the previous answer stands should the
    /// stream not answer.
    async fn replicated(&self) -> bool {
        if self.replication.due() {
            if let Ok(info) = self.stream.get_info().await {
                self.replication.note(info.config.num_replicas);
            }
        }
        self.replication.replicated.load(Ordering::Relaxed)
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn stream(&self) -> &stream::Stream {
        &self.stream
    }

    /// The durable pull consumer `name`, created with `cfg` if it does not exist. Asked as
    /// [`EventStore::open`] asks for the stream, for up to [`OPEN_PATIENCE`]: on a cluster a
    /// consumer just created (or whose leader crashed) answers nothing until its replicas
    /// elect a leader, and a lookup or creation can go unanswered until the client's timeout.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the server refuses or does not answer.
    pub async fn durable_consumer(
        &self,
        name: &str,
        cfg: &pull::Config,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, StoreError> {
        let what = format!("consumer {name}");
        patiently(&what, OPEN_PATIENCE, || async {
            consumer_answer(
                &what,
                self.stream.get_or_create_consumer(name, cfg.clone()).await,
            )
        })
        .await
    }

    /// An ordered consumer of `filter` from stream sequence `from` (a replay), asked for as
    /// [`EventStore::durable_consumer`] is.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the server refuses or does not answer.
    pub async fn ordered_consumer(
        &self,
        filter: &str,
        from: u64,
    ) -> Result<jetstream::consumer::Consumer<pull::OrderedConfig>, StoreError> {
        let cfg = pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        };
        let what = "an ordered consumer";
        patiently(what, OPEN_PATIENCE, || async {
            consumer_answer(what, self.stream.create_consumer(cfg.clone()).await)
        })
        .await
    }

    /// How many times the store's NATS connection has been established: it moves on every
    /// reconnect, after which core-NATS notices sent while disconnected are lost.
    pub fn connects(&self) -> u64 {
        self.connection.connects.load(Ordering::Relaxed)
    }

    /// Appends `events` (v1: exactly one per command) to the aggregate's subject, expecting
    /// `expected_seq` as its last sequence.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the subject has moved on; [`StoreError::Unavailable`] on
    /// NATS trouble (safe to retry with the same message id).
    pub async fn append(
        &self,
        expected_seq: u64,
        events: &[(Meta, Event)],
        msg_id: &str,
    ) -> Result<Appended, StoreError> {
        let [(meta, event)] = events else {
            return Err(StoreError::Other(format!(
                "a command must yield exactly one event, got {}",
                events.len()
            )));
        };
        let subject = self
            .subjects
            .aggregate(meta.aggregate_type, &meta.aggregate_id);
        let mut headers = HeaderMap::new();
        headers.insert(header::NATS_MESSAGE_ID, msg_id);
        headers.insert(EXPECTED_LAST_SUBJECT_SEQ, expected_seq.to_string().as_str());
        headers.insert("Ch-Event-Type", event.event_type());
        headers.insert("Ch-Schema-Version", SCHEMA_VERSION.to_string().as_str());
        headers.insert("Content-Type", "application/json");
        let body = envelope::encode(meta, event);
        let ack = self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                    StoreError::TooLarge(e.to_string())
                }
                _ => unavailable(e),
            })?
            .await;
        match ack {
            Ok(ack) => Ok(Appended {
                seqs: vec![ack.sequence],
                duplicate: ack.duplicate,
            }),
            Err(e) => Err(classify_publish_error(e)),
        }
    }

    /// Events of one aggregate after `after_seq`, in order, by direct get; on a replicated
    /// stream up to its last event as the stream leader knows it (ADR 004).
    ///
    /// # Errors
    /// [`StoreError`] on NATS trouble or an undecodable event.
    pub async fn load(
        &self,
        ty: AggregateType,
        id: &str,
        after_seq: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let subject = self.subjects.aggregate(ty, id);
        // A follower may answer direct gets from before the latest appends: on a replicated
        // stream, read up to the subject's last event as the leader knows it.
        let last = if self.replicated().await {
            match self.last_on(&subject).await? {
                Some(seq) if seq > after_seq => Some(seq),
                _ => return Ok(Vec::new()),
            }
        } else {
            None
        };
        let mut out = if self.batch_get {
            self.load_batched(&subject, after_seq).await?
        } else {
            Vec::new()
        };
        let mut next = out.last().map_or(after_seq, |e| e.seq) + 1;
        // Without batched gets, one at a time; on a replicated stream, what the answering
        // follower did not have yet.
        let rest = !self.batch_get || last.is_some();
        while rest && last.is_none_or(|last| next <= last) {
            let Some((seq, payload)) = self
                .read_one(json!({ "seq": next, "next_by_subj": subject }))
                .await?
            else {
                break;
            };
            out.push(envelope::decode(seq, &payload)?);
            next = seq + 1;
        }
        debug!(%subject, after_seq, loaded = out.len(), "loaded aggregate");
        Ok(out)
    }

    /// [`EventStore::load`] with batched direct gets: one request answers up to [`LOAD_BATCH`]
    /// messages of the subject (fewer when they are large), then an end-of-batch status (204)
    /// with the number left, or 404 when there are none.
    async fn load_batched(
        &self,
        subject: &str,
        after_seq: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        use async_nats::StatusCode;
        let mut out = Vec::new();
        let mut next = after_seq + 1;
        // Asked again, from `next`, while unanswered or while no server answers (a replicated
        // stream electing its leader), for up to UNANSWERED_LOAD_PATIENCE in all.
        let mut again = Backoff::within(UNANSWERED_LOAD_PATIENCE);
        loop {
            let inbox = self.client.new_inbox();
            let mut sub = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(unavailable)?;
            let req = json!({
                "seq": next,
                "next_by_subj": subject,
                "batch": LOAD_BATCH,
                "max_bytes": LOAD_MAX_BYTES,
            });
            self.client
                .publish_with_reply(self.direct_api.clone(), inbox, req.to_string().into())
                .await
                .map_err(unavailable)?;
            let mut got = 0;
            let mut retry = false;
            let mut more = false;
            loop {
                let msg = match tokio::time::timeout(
                    UNANSWERED_LOAD_TRY,
                    futures::StreamExt::next(&mut sub),
                )
                .await
                {
                    Ok(msg) => {
                        msg.ok_or_else(|| StoreError::Unavailable("subscription closed".into()))?
                    }
                    // Lost in a reconnect, or a stalled server.
                    Err(_) if again.wait().await => {
                        self.metrics.read_retry();
                        warn!(%subject, next, "direct get unanswered; asking again");
                        retry = true;
                        break;
                    }
                    Err(_) => {
                        return Err(StoreError::Unavailable(format!(
                            "direct get of {subject} timed out"
                        )))
                    }
                };
                match msg.status {
                    None | Some(StatusCode::OK) => {
                        let seq = sequence_of(&msg)?;
                        out.push(envelope::decode(seq, &msg.payload)?);
                        next = seq + 1;
                        got += 1;
                    }
                    // Nothing (more) on the subject.
                    Some(StatusCode::NOT_FOUND) => break,
                    // End of batch: after LOAD_BATCH messages, or earlier once their bytes
                    // passed LOAD_MAX_BYTES (or the server's max_pending for this
                    // connection), when it says how many are left.
                    Some(s) if s.as_u16() == 204 => {
                        more = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Num-Pending"))
                            .and_then(|v| v.as_str().parse::<u64>().ok())
                            .is_some_and(|left| left > 0);
                        break;
                    }
                    Some(StatusCode::NO_RESPONDERS) if got == 0 && again.wait().await => {
                        self.metrics.read_retry();
                        retry = true;
                        break;
                    }
                    Some(s) => {
                        return Err(StoreError::Unavailable(format!(
                            "direct get of {subject}: status {s} {:?}",
                            msg.description
                        )))
                    }
                }
            }
            let _ = sub.unsubscribe().await;
            if !retry && !more && got < LOAD_BATCH {
                debug!(%subject, after_seq, loaded = out.len(), "loaded aggregate");
                return Ok(out);
            }
        }
    }

    /// A request to JetStream's API, asked [`patiently`] for up to [`NO_RESPONDERS_PATIENCE`]
    /// while no server answers its subject or the answer does not come (a leader election).
    async fn api_request(
        &self,
        subject: &str,
        body: &serde_json::Value,
    ) -> Result<async_nats::Message, StoreError> {
        use async_nats::RequestErrorKind as K;
        let body = bytes::Bytes::from(body.to_string());
        patiently(subject, NO_RESPONDERS_PATIENCE, || async {
            match self.client.request(subject.to_owned(), body.clone()).await {
                Ok(m) => Answer::Yes(m),
                Err(e) if matches!(e.kind(), K::NoResponders | K::TimedOut) => {
                    Answer::NotYet(e.to_string())
                }
                Err(e) => Answer::No(StoreError::Unavailable(format!("{subject}: {e}"))),
            }
        })
        .await
    }

    /// One message (`request` as the message get APIs take it: `seq`, `next_by_subj`,
    /// `last_by_subj`), `None` when there is none: from the stream leader on a replicated
    /// stream, else by direct get.
    async fn read_one(&self, request: serde_json::Value) -> Result<Option<Read>, StoreError> {
        if self.replicated().await {
            self.leader_get(&request).await
        } else {
            self.direct_get(&request).await
        }
    }

    /// A direct get: any replica may answer.
    async fn direct_get(&self, request: &serde_json::Value) -> Result<Option<Read>, StoreError> {
        use async_nats::StatusCode;
        let msg = self.api_request(&self.direct_api, request).await?;
        match msg.status {
            None | Some(StatusCode::OK) => Ok(Some((sequence_of(&msg)?, msg.payload))),
            Some(StatusCode::NOT_FOUND) => Ok(None),
            Some(s) => Err(StoreError::Unavailable(format!(
                "direct get {request}: status {s} {:?}",
                msg.description
            ))),
        }
    }

    /// The message get API (`$JS.API.STREAM.MSG.GET`): unlike direct gets, only the stream
    /// leader answers it, so it sees every acknowledged append.
    async fn leader_get(&self, request: &serde_json::Value) -> Result<Option<Read>, StoreError> {
        use base64::Engine as _;
        #[derive(serde::Deserialize)]
        struct Reply {
            message: Option<Stored>,
            error: Option<ApiErrorReply>,
        }
        #[derive(serde::Deserialize)]
        struct Stored {
            seq: u64,
            #[serde(default)]
            data: String,
        }
        #[derive(serde::Deserialize)]
        struct ApiErrorReply {
            err_code: u64,
            description: String,
        }
        let msg = self.api_request(&self.leader_api, request).await?;
        let reply: Reply = serde_json::from_slice(&msg.payload)
            .map_err(|e| StoreError::Other(format!("{}: {e}", self.leader_api)))?;
        match (reply.message, reply.error) {
            (Some(m), _) => {
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(m.data)
                    .map_err(|e| StoreError::Other(format!("{}: {e}", self.leader_api)))?;
                Ok(Some((m.seq, payload.into())))
            }
            (None, Some(e)) if e.err_code == ERR_NO_MESSAGE => Ok(None),
            (None, Some(e)) => Err(StoreError::Unavailable(format!(
                "get {request}: {} ({})",
                e.description, e.err_code
            ))),
            (None, None) => Err(StoreError::Other(format!(
                "{}: a reply without message or error",
                self.leader_api
            ))),
        }
    }

    /// The sequence of the last event of one aggregate (`None`: it has none), by the stream
    /// leader on a replicated stream.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn last_seq_of(
        &self,
        ty: AggregateType,
        id: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.last_on(&self.subjects.aggregate(ty, id)).await
    }

    async fn last_on(&self, subject: &str) -> Result<Option<u64>, StoreError> {
        let last = self.read_one(json!({ "last_by_subj": subject })).await?;
        Ok(last.map(|(seq, _)| seq))
    }

    /// The event at stream sequence `seq`.
    ///
    /// # Errors
    /// [`StoreError`] on NATS trouble or an undecodable event.
    pub async fn get(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        match self.read_one(json!({ "seq": seq })).await? {
            Some((seq, payload)) => Ok(Some(envelope::decode(seq, &payload)?)),
            None => Ok(None),
        }
    }

    /// The stream's last sequence (0 when empty). Asked for up to [`INFO_PATIENCE`] with short
    /// per-try timeouts: while a replicated stream elects a new leader, the request goes
    /// unanswered, and a projector's idle check waiting the JetStream context's timeout (5 s)
    /// for it would notice the new leader seconds late.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.info().await?.state.last_sequence)
    }

    /// The stream's last sequence and when it was made (to the microsecond, as Postgres keeps
    /// it): a stream deleted and made again under the same name, or another server's, has
    /// another creation time. Asked as [`EventStore::last_seq`].
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn last_seq_and_created(&self) -> Result<(u64, DateTime<Utc>), StoreError> {
        let info = self.info().await?;
        Ok((info.state.last_sequence, created(&info)))
    }

    /// Why the stream there now is not one a worker can use (see [`EventStore::open`]): for a
    /// stream made anew while the workers run. `None` when it is, or does not answer.
    pub async fn unusable_now(&self) -> Option<String> {
        let info = self.info().await.ok()?;
        unusable(&info.config, &self.subjects)
    }

    /// When the stream this store opened was created (as [`EventStore::last_seq_and_created`]
    /// gives it): another time later on means the stream was deleted and made anew since.
    pub fn opened_created(&self) -> DateTime<Utc> {
        created(self.stream.cached_info())
    }

    async fn info(&self) -> Result<stream::Info, StoreError> {
        use jetstream::context::RequestErrorKind as K;
        let name = self.stream.cached_info().config.name.as_str();
        let info = patiently(&format!("stream {name}"), INFO_PATIENCE, || async {
            match self.stream.get_info().await {
                Ok(info) => Answer::Yes(info),
                Err(e) if matches!(e.kind(), K::TimedOut | K::NoResponders) => {
                    Answer::NotYet(e.to_string())
                }
                Err(e) => Answer::No(unavailable(e)),
            }
        })
        .await?;
        self.replication.note(info.config.num_replicas);
        Ok(info)
    }

    /// Is there an event on `filter` (a subject, wildcards allowed) in `from..=to`?
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn has_events(&self, filter: &str, from: u64, to: u64) -> Result<bool, StoreError> {
        Ok(self
            .first_seq_from(filter, from)
            .await?
            .is_some_and(|seq| seq <= to))
    }

    /// Does the stream reach `seq` (is its head at or past it)?
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn reaches(&self, seq: u64) -> Result<bool, StoreError> {
        Ok(self
            .first_seq_from(&self.subjects.events_filter(), seq)
            .await?
            .is_some())
    }

    /// The sequence of the first event on `filter` (wildcards allowed) at or after `from`
    /// (one read, by the leader on a replicated stream); `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn first_seq_from(&self, filter: &str, from: u64) -> Result<Option<u64>, StoreError> {
        let read = self
            .read_one(json!({ "seq": from.max(1), "next_by_subj": filter }))
            .await?;
        Ok(read.map(|(seq, _)| seq))
    }
}

/// A stream's creation time, to the microsecond (as Postgres keeps it in `ch_checkpoints`).
fn created(info: &stream::Info) -> DateTime<Utc> {
    let nanos = i64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    DateTime::from_timestamp_nanos(nanos).trunc_subsecs(6)
}

/// The stream sequence of a direct get's message (its `Nats-Sequence` header).
fn sequence_of(msg: &async_nats::Message) -> Result<u64, StoreError> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Sequence"))
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or_else(|| StoreError::Other("direct get reply without Nats-Sequence".into()))
}

/// Waits between tries of something that may soon answer: 20 ms, doubling up to 500 ms, until
/// a deadline.
struct Backoff {
    until: tokio::time::Instant,
    step: Duration,
}

impl Backoff {
    /// Tries for up to `patience` from now (the tries' own time included).
    fn within(patience: Duration) -> Self {
        Backoff {
            until: tokio::time::Instant::now() + patience,
            step: Duration::from_millis(20),
        }
    }

    /// Waits before the next try; `false` (at once) when the deadline has passed.
    async fn wait(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.until {
            return false;
        }
        tokio::time::sleep(self.step.min(self.until - now)).await;
        self.step = (self.step * 2).min(Duration::from_millis(500));
        true
    }
}

fn classify_publish_error(e: jetstream::context::PublishError) -> StoreError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::WrongLastSequence => StoreError::Conflict,
        K::TimedOut | K::BrokenPipe | K::StreamNotFound | K::MaxAckPending => unavailable(e),
        K::MaxPayloadExceeded => StoreError::TooLarge(e.to_string()),
        _ => {
            let code = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .map(|j| j.error_code().0);
            match code {
                Some(ERR_WRONG_LAST_SEQ_CLUSTERED) => StoreError::Conflict,
                Some(ERR_MESSAGE_TOO_LARGE) => StoreError::TooLarge(e.to_string()),
                Some(c) if RETRYABLE_PUBLISH_ERRORS.contains(&c) => unavailable(e),
                _ => StoreError::Other(e.to_string()),
            }
        }
    }
}

/// Waits until JetStream answers (a freshly started server or cluster elects a leader first).
///
/// # Errors
/// [`StoreError::Unavailable`] when it does not answer within `timeout`.
pub async fn wait_ready(js: &jetstream::Context, timeout: Duration) -> Result<(), StoreError> {
    patiently("JetStream not ready", timeout, || async {
        match js.query_account().await {
            Ok(_) => Answer::Yes(()),
            Err(e) => Answer::NotYet(e.to_string()),
        }
    })
    .await
}

/// How long a worker's start waits for the stream to answer (see [`EventStore::open`]).
const OPEN_PATIENCE: Duration = Duration::from_secs(30);

/// How long [`EventStore::last_seq`] asks: about the client's own request timeout, in shorter
/// tries.
const INFO_PATIENCE: Duration = Duration::from_secs(5);

/// A consumer lookup or creation as a try of [`patiently`]: unanswered (the consumer's or the
/// stream's replicas electing a leader) is asked again.
fn consumer_answer<C>(what: &str, r: Result<C, jetstream::stream::ConsumerError>) -> Answer<C> {
    use jetstream::stream::ConsumerErrorKind as K;
    match r {
        Ok(c) => Answer::Yes(c),
        Err(e) if matches!(e.kind(), K::TimedOut | K::Request) => Answer::NotYet(e.to_string()),
        Err(e) => Answer::No(StoreError::Unavailable(format!("{what}: {e}"))),
    }
}

/// What one try of [`patiently`] came to.
enum Answer<T> {
    Yes(T),
    /// No answer that settles it (unanswered, no responders): ask again.
    NotYet(String),
    /// An answer that ends the tries.
    No(StoreError),
}

/// Asks until answered, for up to `patience`. A cluster node without a leader for the
/// request leaves it unanswered until the client's timeout: each try waits 250 ms for its
/// answer at first, twice as long on each next one (for a slow server), up to a quarter of
/// `patience` and at most 5 s, so that an answer that becomes possible (a leader elected) is
/// had soon after. Says once in the log when a second has passed without an answer; on giving
/// up, the error is `what` with the last try's reason.
async fn patiently<T, F, Fut>(what: &str, patience: Duration, mut ask: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Answer<T>>,
{
    let started = Instant::now();
    let mut backoff = Backoff::within(patience);
    let longest = (patience / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut per_try = Duration::from_millis(250);
    let mut told = false;
    loop {
        let why = match tokio::time::timeout(per_try, ask()).await {
            Ok(Answer::Yes(t)) => return Ok(t),
            Ok(Answer::No(e)) => return Err(e),
            Ok(Answer::NotYet(why)) => why,
            Err(_) => format!("no answer within {per_try:?}"),
        };
        if !backoff.wait().await {
            return Err(StoreError::Unavailable(format!("{what}: {why}")));
        }
        if !told && started.elapsed() >= Duration::from_secs(1) {
            warn!(what, why, "no answer yet; asking again");
            told = true;
        }
        per_try = (per_try * 2).min(longest);
    }
}

#[cfg(test)]
mod tests {
    use super::supports_batch_get;

    #[test]
    fn batch_get_needs_2_11() {
        assert!(supports_batch_get("2.15.1"));
        assert!(supports_batch_get("2.11.0-beta.2"));
        assert!(!supports_batch_get("2.10.22"));
        assert!(!supports_batch_get("2.9.10"));
        assert!(supports_batch_get("3.0.0"));
    }
}

//! The event store: one JetStream stream, one subject per aggregate.
//!
//! - Append: publish to `<prefix>.events.<type>.<id>` with `Nats-Expected-Last-Subject-Sequence`
//!   (0 = must not exist) and `Nats-Msg-Id`; a stale append fails with [`StoreError::Conflict`].
//! - Load: direct gets by subject (`next_by_subj`), never a consumer per load.
//! - Definitions of the stream and the projector consumers are the JSON files in `nats/`,
//!   compiled in, with names and subjects rewritten for the configured prefix.

use std::time::Duration;

use async_nats::header::{self, HeaderMap};
use async_nats::jetstream::{self, consumer::pull, stream};
use ch_domain::{event::SCHEMA_VERSION, AggregateType, Event};
use tracing::{debug, info};

use crate::envelope::{self, Meta, StoredEvent};
use crate::error::StoreError;
use crate::subjects::Subjects;

/// `nats/stream.json`, usable with `nats stream add --config`.
pub const STREAM_JSON: &str = include_str!("../../../nats/stream.json");
/// `nats/consumers/proj_portfolio.json`.
pub const CONSUMER_PORTFOLIO_JSON: &str =
    include_str!("../../../nats/consumers/proj_portfolio.json");
/// `nats/consumers/proj_strategy.json`.
pub const CONSUMER_STRATEGY_JSON: &str = include_str!("../../../nats/consumers/proj_strategy.json");

const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
/// Clustered streams report a stale expected sequence with this code instead of 10071.
const ERR_WRONG_LAST_SEQ_CLUSTERED: u64 = 10164;

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

/// Creates the event stream if missing, or updates it to the shipped definition. Idempotent.
///
/// # Errors
/// [`StoreError`] when JetStream is unreachable or refuses the definition.
pub async fn ensure_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<stream::Stream, StoreError> {
    let cfg = stream_config(subjects, replicas)?;
    match js.get_stream(&cfg.name).await {
        Ok(mut s) => {
            let current = s.info().await.map_err(unavailable)?.config.clone();
            // Replicas may have been scaled by an operator; keep theirs.
            let wanted = stream::Config {
                num_replicas: current.num_replicas,
                ..cfg
            };
            if current.subjects != wanted.subjects
                || current.deny_delete != wanted.deny_delete
                || current.deny_purge != wanted.deny_purge
                || current.allow_direct != wanted.allow_direct
                || current.duplicate_window != wanted.duplicate_window
            {
                js.update_stream(&wanted).await.map_err(unavailable)?;
                info!(stream = %wanted.name, "updated stream");
            }
            Ok(s)
        }
        Err(_) => {
            let s = js.create_stream(cfg.clone()).await.map_err(unavailable)?;
            info!(stream = %cfg.name, "created stream");
            Ok(s)
        }
    }
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

/// The JetStream event store of one prefix.
#[derive(Clone)]
pub struct EventStore {
    client: async_nats::Client,
    /// The client's counters, read for [`EventStore::connects`] on every cached fact.
    connection: std::sync::Arc<async_nats::Statistics>,
    js: jetstream::Context,
    stream: stream::Stream,
    subjects: Subjects,
    /// The server answers batched direct gets (2.11+): a cold load is one round trip per
    /// [`LOAD_BATCH`] events instead of one per event.
    batch_get: bool,
}

/// Whether a `major.minor.patch` server version is at least 2.11.
fn supports_batch_get(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 11)
}

impl EventStore {
    /// Opens the store; the stream must exist (`chctl setup` creates it).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the stream cannot be found.
    pub async fn open(client: async_nats::Client, subjects: Subjects) -> Result<Self, StoreError> {
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(subjects.stream_name()).await.map_err(|e| {
            StoreError::Unavailable(format!("stream {}: {e}", subjects.stream_name()))
        })?;
        let batch_get = supports_batch_get(&client.server_info().version);
        Ok(EventStore {
            connection: client.statistics(),
            client,
            js,
            stream,
            subjects,
            batch_get,
        })
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

    /// How many times the store's NATS connection has been established: it moves on every
    /// reconnect, after which core-NATS notices sent while disconnected are lost.
    pub fn connects(&self) -> u64 {
        self.connection
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
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
            .map_err(unavailable)?
            .await;
        match ack {
            Ok(ack) => Ok(Appended {
                seqs: vec![ack.sequence],
                duplicate: ack.duplicate,
            }),
            Err(e) => Err(classify_publish_error(e)),
        }
    }

    /// Events of one aggregate after `after_seq`, in order, by direct get.
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
        if self.batch_get {
            return self.load_batched(&subject, after_seq).await;
        }
        let mut out = Vec::new();
        let mut next = after_seq + 1;
        loop {
            match self
                .stream
                .direct_get_next_for_subject(subject.clone(), Some(next))
                .await
            {
                Ok(msg) => {
                    next = msg.sequence + 1;
                    out.push(envelope::decode(msg.sequence, &msg.payload)?);
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(unavailable(e)),
            }
        }
        debug!(%subject, after_seq, loaded = out.len(), "loaded aggregate");
        Ok(out)
    }

    /// [`EventStore::load`] with batched direct gets: one request answers up to [`LOAD_BATCH`]
    /// messages of the subject, then an end-of-batch status (204), or 404 when there are none.
    async fn load_batched(
        &self,
        subject: &str,
        after_seq: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        use async_nats::StatusCode;
        let api = format!("$JS.API.DIRECT.GET.{}", self.subjects.stream_name());
        let mut out = Vec::new();
        let mut next = after_seq + 1;
        loop {
            let inbox = self.client.new_inbox();
            let mut sub = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(unavailable)?;
            let req =
                serde_json::json!({"seq": next, "next_by_subj": subject, "batch": LOAD_BATCH});
            self.client
                .publish_with_reply(api.clone(), inbox, req.to_string().into())
                .await
                .map_err(unavailable)?;
            let mut got = 0;
            loop {
                let msg = tokio::time::timeout(
                    Duration::from_secs(5),
                    futures::StreamExt::next(&mut sub),
                )
                .await
                .map_err(|_| StoreError::Unavailable(format!("direct get of {subject} timed out")))?
                .ok_or_else(|| StoreError::Unavailable("subscription closed".into()))?;
                match msg.status {
                    None | Some(StatusCode::OK) => {
                        let seq = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Sequence"))
                            .and_then(|v| v.as_str().parse::<u64>().ok())
                            .ok_or_else(|| {
                                StoreError::Other("direct get reply without Nats-Sequence".into())
                            })?;
                        out.push(envelope::decode(seq, &msg.payload)?);
                        next = seq + 1;
                        got += 1;
                    }
                    // End of batch, or nothing (more) on the subject.
                    Some(StatusCode::NOT_FOUND) => break,
                    Some(s) if s.as_u16() == 204 => break,
                    Some(s) => {
                        return Err(StoreError::Unavailable(format!(
                            "direct get of {subject}: status {s} {:?}",
                            msg.description
                        )))
                    }
                }
            }
            let _ = sub.unsubscribe().await;
            if got < LOAD_BATCH {
                debug!(%subject, after_seq, loaded = out.len(), "loaded aggregate");
                return Ok(out);
            }
        }
    }

    /// The event at stream sequence `seq`.
    ///
    /// # Errors
    /// [`StoreError`] on NATS trouble or an undecodable event.
    pub async fn get(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        match self.stream.direct_get(seq).await {
            Ok(msg) => Ok(Some(envelope::decode(msg.sequence, &msg.payload)?)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The stream's last sequence (0 when empty).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn last_seq(&self) -> Result<u64, StoreError> {
        let info = self.stream.get_info().await.map_err(unavailable)?;
        Ok(info.state.last_sequence)
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
    /// (one direct get); `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on NATS trouble.
    pub async fn first_seq_from(&self, filter: &str, from: u64) -> Result<Option<u64>, StoreError> {
        match self
            .stream
            .direct_get_next_for_subject(filter, Some(from.max(1)))
            .await
        {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }
}

fn classify_publish_error(e: jetstream::context::PublishError) -> StoreError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::WrongLastSequence => StoreError::Conflict,
        K::TimedOut | K::BrokenPipe | K::StreamNotFound | K::MaxAckPending => unavailable(e),
        _ => {
            let clustered_conflict = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .is_some_and(|j| j.error_code().0 == ERR_WRONG_LAST_SEQ_CLUSTERED);
            if clustered_conflict {
                StoreError::Conflict
            } else {
                StoreError::Other(e.to_string())
            }
        }
    }
}

/// Waits until JetStream answers (a freshly started server or cluster elects a leader first).
///
/// # Errors
/// [`StoreError::Unavailable`] when it does not answer within `timeout`.
pub async fn wait_ready(js: &jetstream::Context, timeout: Duration) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    // A cluster node without a JetStream leader yet leaves the request unanswered until the
    // client's timeout (5 s): ask with a short one first, longer ones for a slow server.
    let mut patience = Duration::from_millis(250);
    loop {
        let error = match tokio::time::timeout(patience, js.query_account()).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {patience:?}"),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Unavailable(format!(
                "JetStream not ready: {error}"
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
        patience = (patience * 2).min(Duration::from_secs(5));
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

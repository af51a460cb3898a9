//! The command path shared by every command worker: load (cache, then stream), decide (pure
//! domain), append with the expected subject sequence, retry on conflicts, reply.

use std::future::Future;
use std::time::Duration;

use ch_domain::event::SCHEMA_VERSION;
use ch_domain::request::{digest_kind, names_no_aggregate, reply_extra, Common};
use ch_domain::{Aggregate, Ctx, DomainError, Event};
use chrono::{SubsecRound, Utc};
use rand::Rng;
use serde_json::{json, Value};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::envelope::{Meta, StoredEvent};
use crate::error::{ApiError, StoreError};
use crate::eventstore::EventStore;
use crate::metrics::Metrics;
use crate::repo::{Entry, Repo};

/// How many times a command is decided again after losing an append race.
pub const MAX_CONFLICT_RETRIES: u32 = 200;
/// An append the store did not take (unanswered, or refused as for a while: no stream for
/// the subject yet on a cluster node, no quorum) is re-sent at least this many times...
const MAX_UNAVAILABLE_RETRIES: u32 = 3;
/// ...and for at least this long after the first such failure (a refusal comes at once: three
/// quick re-sends are over in 0.6 s, too soon for a cluster that is still placing the stream).
const UNAVAILABLE_PATIENCE: Duration = Duration::from_secs(5);

/// Gathers the outside facts a decision needs (other aggregates, marks) before `decide`.
pub trait FactSource<A: Aggregate>: Send + Sync {
    /// # Errors
    /// [`ApiError`] when a fact cannot be loaded or the command names something missing.
    fn facts(
        &self,
        state: &A,
        command: &A::Command,
    ) -> impl Future<Output = Result<A::Facts, ApiError>> + Send;
}

/// Aggregates that need no outside facts.
pub struct NoFacts;

impl<A: Aggregate<Facts = ()>> FactSource<A> for NoFacts {
    async fn facts(&self, _: &A, _: &A::Command) -> Result<(), ApiError> {
        Ok(())
    }
}

/// The reply of API.md for the events a command stored.
pub fn reply(events: &[StoredEvent], duplicate: bool) -> Value {
    let last = events.last().expect("a command stores at least one event");
    let mut v = json!({
        "aggregate_id": last.meta.aggregate_id,
        "version": last.meta.aggregate_version,
        "stream_seq": last.seq,
        "events": events.iter().map(|e| json!({
            "type": e.event.event_type(),
            "stream_seq": e.seq,
            "event_id": e.meta.event_id,
        })).collect::<Vec<_>>(),
    });
    if duplicate {
        v["duplicate"] = Value::Bool(true);
    }
    if let (Some(Value::Object(extra)), Value::Object(map)) = (reply_extra(&last.event), &mut v) {
        map.extend(extra);
    }
    v
}

/// Runs commands against one aggregate type.
pub struct Executor<A: Aggregate> {
    repo: Repo<A>,
    metrics: Metrics,
}

impl<A: Aggregate> Executor<A>
where
    A::Command: Sync,
{
    pub fn new(store: EventStore, metrics: Metrics) -> Self {
        Executor {
            repo: Repo::new(store, 100_000),
            metrics,
        }
    }

    pub fn repo(&self) -> &Repo<A> {
        &self.repo
    }

    fn store(&self) -> &EventStore {
        self.repo.store()
    }

    /// The reply for the event stored at `seq` under `common.command_id`, for a command on
    /// aggregate `id`: `duplicate` unless the event is `ours` (an attempt of this command whose
    /// answer was lost).
    ///
    /// The id names the client's intent, and its first outcome stands: a re-send of the same
    /// kind to the same aggregate whose fields differ (another price, amount or `at`; the
    /// exit-trigger worker sends one sell per round trip and rule, whatever price fires it) is
    /// answered the first result, marked `request_differs`.
    ///
    /// # Errors
    /// `command_id_reused` (409) when the id was used for a command on another aggregate, or of
    /// another kind (a deposit's id for a withdrawal): that cannot be a re-send, nothing is
    /// stored, and the first result would describe another command.
    async fn stored_reply(
        &self,
        id: &str,
        seq: u64,
        ours: Option<Uuid>,
        common: &Common,
    ) -> Result<Value, ApiError> {
        let ev = self
            .store()
            .get(seq)
            .await?
            .ok_or_else(|| ApiError::internal(format!("event {seq} vanished")))?;
        self.reply_to(id, ev, ours, common)
    }

    /// [`Executor::stored_reply`] for the event read.
    fn reply_to(
        &self,
        id: &str,
        ev: StoredEvent,
        ours: Option<Uuid>,
        common: &Common,
    ) -> Result<Value, ApiError> {
        let seq = ev.seq;
        // Events stored before digests have none: their kind and fields are not compared.
        let digests = ev
            .meta
            .command_digest
            .as_deref()
            .zip(common.command_digest.as_deref());
        let other_kind = digests.is_some_and(|(stored, asked)| {
            matches!((digest_kind(stored), digest_kind(asked)), (Some(s), Some(a)) if s != a)
        });
        // A create that names no id gets a new one each time: only a create is its re-send.
        let generated_create = common
            .command_digest
            .as_deref()
            .is_some_and(names_no_aggregate)
            && matches!(ev.event, Event::StrategyCreated(_));
        let other_aggregate =
            ev.meta.aggregate_type != A::TYPE || (ev.meta.aggregate_id != id && !generated_create);
        if other_kind || other_aggregate {
            let cid = common.command_id.map(|c| c.to_string()).unwrap_or_default();
            let what = ev
                .meta
                .command_digest
                .as_deref()
                .and_then(digest_kind)
                .map_or_else(String::new, |kind| format!("{kind} on "));
            return Err(ApiError::command_id_reused(format!(
                "command_id {cid} was used for another command ({what}{} {}, stream_seq {seq}): \
                 a new command needs a new command_id",
                ev.meta.aggregate_type.as_str(),
                ev.meta.aggregate_id
            )));
        }
        let differs = digests.is_some_and(|(stored, asked)| stored != asked);
        let duplicate = ours != Some(ev.meta.event_id);
        let mut v = reply(&[ev], duplicate);
        if differs {
            v["request_differs"] = Value::Bool(true);
        }
        Ok(v)
    }

    /// Decides and stores `command` on aggregate `id`; returns the API reply.
    ///
    /// # Errors
    /// [`ApiError`] with the code of API.md; nothing is stored then, but for `unavailable`
    /// after an append that went unanswered (or a re-sent command whose first outcome could
    /// not be read back): it may be stored, and the same `command_id` tells.
    pub async fn execute(
        &self,
        id: &str,
        common: &Common,
        command: &A::Command,
        facts: &impl FactSource<A>,
    ) -> Result<Value, ApiError> {
        let mut entry = self.repo.lock(id).await;
        if entry.last_seq == 0 {
            // Cold or new: whatever the stream has.
            self.repo.catch_up(id, &mut entry).await?;
        }
        let mut unavailable = 0;
        let mut first_unavailable: Option<std::time::Instant> = None;
        let mut attempt = 0;
        let mut fresh = entry.last_seq == 0;
        let mut reloaded_for_id = false;
        // One message id and event id for every attempt: an append that was stored but whose
        // answer was lost (NATS going away in between) is then recognised when sent again, by
        // the server's de-duplication or as the conflict it meets, not decided and stored a
        // second time. Without a `command_id` the message id is made from the first (v1: only)
        // event's id, in a form no `command_id` takes: a client may well name a later command
        // by an event's id (a reaction to it), and that must not meet this one's message id.
        let event_id = Uuid::now_v7();
        let msg_id = common
            .command_id
            .map_or_else(|| unnamed_msg_id(event_id), |c| c.to_string());
        loop {
            if let Some(seq) = common
                .command_id
                .as_ref()
                .and_then(|c| entry.command_seq(c))
            {
                match self.store().get(seq).await? {
                    Some(ev) if ev.meta.command_id == common.command_id => {
                        debug!(seq, "command already applied");
                        return self.reply_to(id, ev, None, common);
                    }
                    // The stream holds no such event there: the entry was read from a stream
                    // since deleted (and made anew), before the worker heard of it. Read again.
                    _ if !reloaded_for_id => {
                        warn!(
                            seq,
                            "the cached command id names an event the stream does not hold: \
                             reading the aggregate again"
                        );
                        reloaded_for_id = true;
                        self.repo.reload(id, &mut entry).await?;
                        fresh = true;
                        continue;
                    }
                    _ => {
                        return Err(ApiError::internal(format!(
                            "event {seq} of this command_id vanished"
                        )))
                    }
                }
            }
            if let Some(expected) = common.expected_version {
                let version = entry.state.version();
                if expected != version && !fresh {
                    // The cache may be behind another replica's appends: look before refusing.
                    self.repo.refresh(id, &mut entry).await?;
                    fresh = true;
                    continue;
                }
                if expected != version {
                    return Err(ApiError::conflict(format!(
                        "expected_version {expected}, but {} {id} is at version {version}",
                        A::TYPE.as_str()
                    )));
                }
            }
            let facts = facts.facts(&entry.state, command).await?;
            // To the microsecond, as an `at` sent is (`ch_domain::request`).
            let now = Utc::now().trunc_subsecs(6);
            // Without `at`, the command's time is now, or the aggregate's last event's if that
            // is later (stamped by a replica whose clock is ahead of this one's): the client sent
            // no time to refuse as too far in the future, so that one is the skew check's `now`.
            let (at, now) = match common.at {
                Some(at) => (at, now),
                None => {
                    let at = entry.state.last_at().map_or(now, |last| last.max(now));
                    (at, at)
                }
            };
            let ctx = Ctx {
                at,
                now,
                new_id: Uuid::now_v7(),
            };
            let events = match entry.state.decide(command, &facts, &ctx) {
                Ok(events) => events,
                Err(_) if !fresh => {
                    // A refusal is never checked by an append: the cache may be behind another
                    // worker's appends (a sell through cmd-signal before a close here), so
                    // refuse only on the current state.
                    self.repo.refresh(id, &mut entry).await?;
                    fresh = true;
                    continue;
                }
                Err(DomainError::NotFound(_)) if entry.state.version() == 0 => {
                    return Err(ApiError::not_found(format!(
                        "{} {id} not found",
                        A::TYPE.as_str()
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            let version = entry.state.version();
            let pairs: Vec<(Meta, _)> = events
                .into_iter()
                .enumerate()
                .map(|(i, event)| {
                    let meta = Meta {
                        event_id: if i == 0 { event_id } else { Uuid::now_v7() },
                        schema_version: SCHEMA_VERSION,
                        aggregate_type: A::TYPE,
                        aggregate_id: event.aggregate_id().to_owned(),
                        aggregate_version: version + i as u64 + 1,
                        occurred_at: at,
                        recorded_at: now,
                        command_id: common.command_id,
                        correlation_id: common
                            .correlation_id
                            .clone()
                            .or_else(|| common.command_id.map(|c| c.to_string())),
                        causation_id: common.causation_id.clone(),
                        command_digest: common.command_digest.clone(),
                    };
                    (meta, event)
                })
                .collect();
            // An append that went unanswered is sent again as it was (the same events, expected
            // sequence and message id), not decided again: it may have been stored.
            let appended = loop {
                match self.store().append(entry.last_seq, &pairs, &msg_id).await {
                    Err(StoreError::Unavailable(m))
                        if unavailable < MAX_UNAVAILABLE_RETRIES
                            || first_unavailable
                                .is_none_or(|t| t.elapsed() < UNAVAILABLE_PATIENCE) =>
                    {
                        first_unavailable.get_or_insert_with(std::time::Instant::now);
                        unavailable += 1;
                        self.metrics.append_retry();
                        warn!(error = %m, "append failed, sending it again");
                        let wait = Duration::from_millis(100 * u64::from(unavailable));
                        tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                    }
                    other => break other,
                }
            };
            match appended {
                Ok(app) if app.duplicate => {
                    // Stored before: by a re-send of the same command_id racing this one (on
                    // another replica too), or by an unanswered attempt of ours; then the client
                    // hears of it for the first time, and the reply says no re-send.
                    if pairs[0].0.aggregate_id == id {
                        self.repo.catch_up(id, &mut entry).await?;
                    }
                    debug!(unavailable, "the append had been stored before");
                    return self
                        .stored_reply(id, app.seqs[0], Some(event_id), common)
                        .await;
                }
                Ok(app) => {
                    let stored: Vec<StoredEvent> = pairs
                        .into_iter()
                        .zip(app.seqs)
                        .map(|((meta, event), seq)| StoredEvent { seq, meta, event })
                        .collect();
                    for ev in &stored {
                        entry.apply(ev);
                    }
                    if attempt > 0 {
                        debug!(attempt, "appended after conflicts");
                    }
                    return Ok(reply(&stored, false));
                }
                Err(StoreError::Conflict) => {
                    attempt += 1;
                    self.metrics.conflict();
                    if attempt > MAX_CONFLICT_RETRIES {
                        warn!(attempt, "gave up after repeated append conflicts");
                        return Err(ApiError::unavailable(format!(
                            "{} {id} is too busy: {attempt} append conflicts in a row",
                            A::TYPE.as_str()
                        )));
                    }
                    let before = entry.last_seq;
                    let seen = catch_up_or_reload(&self.repo, id, &mut entry).await?;
                    // After an unanswered attempt the conflict may be that attempt, stored
                    // after all: its reply, rather than a decision on the state it made.
                    if let Some(ev) = seen
                        .into_iter()
                        .find(|e| unavailable > 0 && e.meta.event_id == event_id)
                    {
                        debug!(seq = ev.seq, "an unanswered append had been stored");
                        return Ok(reply(&[ev], false));
                    }
                    if entry.last_seq == before || attempt > 3 {
                        // Another writer is racing us: back off a little, with jitter.
                        let ms = rand::thread_rng().gen_range(0..(2 * attempt.min(20) as u64 + 1));
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
                Err(StoreError::Unavailable(m)) => {
                    return Err(ApiError::unavailable(format!(
                        "event store unavailable: {m}"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The `Nats-Msg-Id` of a command sent without a `command_id`: its first event's id, prefixed
/// so that it is never a UUID, as every `command_id` is (they share the stream's
/// de-duplication window).
fn unnamed_msg_id(event_id: Uuid) -> String {
    format!("event-{event_id}")
}

/// After a conflict: read what was appended since; if nothing new is visible (a lagging
/// replica, or a cache that went wrong), reload from scratch. Returns the events read.
async fn catch_up_or_reload<A: Aggregate>(
    repo: &Repo<A>,
    id: &str,
    entry: &mut Entry<A>,
) -> Result<Vec<StoredEvent>, StoreError> {
    let seen = repo.catch_up(id, entry).await?;
    if seen.is_empty() {
        return repo.reload(id, entry).await;
    }
    Ok(seen)
}

//! A command worker's cache of aggregate states: one entry per aggregate, each behind its own
//! async mutex so that commands on one aggregate are decided one at a time in this process
//! (across processes, optimistic concurrency takes over). Caches are only caches: an entry can
//! be dropped at any time and is rebuilt from the stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ch_domain::Aggregate;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use crate::envelope::StoredEvent;
use crate::error::StoreError;
use crate::eventstore::{EventStore, EXPECTED_LAST_SUBJECT_SEQ};

/// How many of an aggregate's latest command ids its cache entry keeps at least (a cold load
/// keeps the same ones): a price feed sending a `command_id` with every price would otherwise
/// grow its symbol's entry by one id per price for as long as the worker runs.
pub const COMMAND_IDS_KEPT: usize = 10_000;

/// Ids of commands stored this long before the aggregate's latest event are kept whatever
/// their number: the stream's de-duplication window (`duplicate_window` in
/// `nats/stream.json`, which `chctl setup` keeps), and a minute for the clocks of replicas.
/// A re-send within the window must be answered as a duplicate before it is decided again: a
/// refusal on today's state never reaches the stream's de-duplication.
pub const COMMAND_IDS_KEPT_FOR: chrono::TimeDelta = chrono::TimeDelta::minutes(11);

/// The cached state of one aggregate.
#[derive(Debug, Default)]
pub struct Entry<A> {
    pub state: A,
    /// Stream sequence of the last applied event (0 = none).
    pub last_seq: u64,
    /// `command_id` -> stream sequence of the event it produced, for idempotent replies: those
    /// of the aggregate's last [`COMMAND_IDS_KEPT_FOR`], and at least its last
    /// [`COMMAND_IDS_KEPT`]; in `command_order` oldest first, with their events' `recorded_at`.
    commands: HashMap<Uuid, u64>,
    command_order: VecDeque<(Uuid, DateTime<Utc>)>,
    /// When the entry was last compared with the stream (for [`Repo::fact`]).
    checked_at: Option<Instant>,
    /// How many times the notices' connection had been established then (the store's, if
    /// none is followed): a reconnect since may have lost its change notice.
    checked_connects: u64,
    /// The repo's generation the entry was read in (see [`Repo::forget_all`]).
    generation: u64,
    /// The id of the event at `last_seq` (see [`Repo::refresh`]).
    last_event_id: Option<Uuid>,
}

impl<A: Aggregate> Entry<A> {
    /// Folds one stored event into the entry.
    pub fn apply(&mut self, ev: &StoredEvent) {
        self.state.apply(&ev.event, ev.meta.occurred_at);
        self.last_seq = ev.seq;
        self.last_event_id = Some(ev.meta.event_id);
        if let Some(cid) = ev.meta.command_id {
            if self.commands.insert(cid, ev.seq).is_none() {
                self.command_order.push_back((cid, ev.meta.recorded_at));
            }
        }
        let horizon = ev.meta.recorded_at - COMMAND_IDS_KEPT_FOR;
        while self.command_order.len() > COMMAND_IDS_KEPT {
            match self.command_order.front() {
                Some(&(oldest, at)) if at < horizon => {
                    self.command_order.pop_front();
                    self.commands.remove(&oldest);
                }
                _ => break,
            }
        }
    }

    /// The sequence of the event a command produced, if this aggregate has seen it.
    pub fn command_seq(&self, command_id: &Uuid) -> Option<u64> {
        self.commands.get(command_id).copied()
    }

    /// Forgets everything if it was read in an older generation than `generation` (before a
    /// [`Repo::forget_all`]: from the old stream).
    fn renew(&mut self, generation: u64) {
        if self.generation != generation {
            self.reset(generation);
        }
    }

    /// Forgets everything, to be read from the stream again (in the repo's generation
    /// `generation`).
    fn reset(&mut self, generation: u64) {
        *self = Entry {
            state: A::default(),
            last_seq: 0,
            commands: HashMap::new(),
            command_order: VecDeque::new(),
            checked_at: None,
            checked_connects: 0,
            generation,
            last_event_id: None,
        };
    }
}

type Slot<A> = Arc<tokio::sync::Mutex<Entry<A>>>;

/// The aggregate cache of one aggregate type.
pub struct Repo<A: Aggregate> {
    store: EventStore,
    entries: Mutex<HashMap<String, Slot<A>>>,
    capacity: usize,
    /// Aggregates seen changing on the stream since they were cached (see [`Repo::fact`]):
    /// the subject sequence the noticed append expected (its event lands after it), and when
    /// the notice came.
    stale: Arc<Mutex<HashMap<String, Notice>>>,
    /// A core subscription to this aggregate type's subjects: change notices.
    notices: Arc<Mutex<Option<async_nats::Subscriber>>>,
    /// The counters of the connection the notices come on (see [`Repo::follow`]).
    notices_connection: std::sync::OnceLock<Arc<async_nats::Statistics>>,
    /// How long a cached fact is trusted without a change notice.
    fact_max_age: Duration,
    /// Moved on by [`Repo::forget_all`]: an entry read in an earlier generation (held by a
    /// command at the time, or waited for) is read again from the stream.
    generation: std::sync::atomic::AtomicU64,
}

/// A change notice: the subject's last sequence the noticed append expected (its event, once
/// stored, is after it), and when it came.
#[derive(Debug, Clone, Copy)]
struct Notice {
    after: u64,
    at: Instant,
}

impl Notice {
    /// Adds another notice for the same aggregate.
    fn merge(&mut self, later: Notice) {
        self.after = self.after.max(later.after);
        self.at = self.at.max(later.at);
    }
}

/// How often a task of its own moves a repo's queued change notices (see [`Repo::follow`]).
const NOTICE_DRAIN: Duration = Duration::from_millis(50);

/// Above this many, notices that no longer matter are dropped as more are moved in.
const NOTICES_PRUNED_ABOVE: usize = 1024;

/// Moves queued change notices into the stale set (never waits); `false` once the
/// subscription is closed or gone. A notice older than twice `max_age` (a fact's trust
/// without one) changes nothing: the entry was last read before it came, so its next read
/// goes to the stream anyway. Such notices are dropped once there are many (notices of
/// aggregates that no command reads as a fact would otherwise pile up, one per id).
fn drain_notices(
    notices: &Mutex<Option<async_nats::Subscriber>>,
    stale: &Mutex<HashMap<String, Notice>>,
    max_age: Duration,
) -> bool {
    let mut guard = notices.lock().expect("notices lock poisoned");
    let Some(sub) = guard.as_mut() else {
        return false;
    };
    let mut stale = stale.lock().expect("stale lock poisoned");
    prune_notices(&mut stale, max_age);
    loop {
        match futures::StreamExt::next(sub).now_or_never() {
            Some(Some(msg)) => {
                let id = msg.subject.rsplit('.').next().unwrap_or_default();
                // Every append of ours carries the header; without it, any read will do.
                let after = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(EXPECTED_LAST_SUBJECT_SEQ))
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(0);
                let at = Instant::now();
                notice(&mut stale, id, Notice { after, at });
            }
            Some(None) => {
                // Subscription closed: rely on the age bound from now on.
                *guard = None;
                return false;
            }
            None => return true,
        }
    }
}

/// Drops the notices older than twice `max_age` once there are more than
/// [`NOTICES_PRUNED_ABOVE`] (see [`drain_notices`]).
fn prune_notices(stale: &mut HashMap<String, Notice>, max_age: Duration) {
    if stale.len() > NOTICES_PRUNED_ABOVE {
        stale.retain(|_, n| n.at.elapsed() < 2 * max_age);
    }
}

/// Marks `id` changed by an append that expected its subject at `after`.
fn notice(stale: &mut HashMap<String, Notice>, id: &str, notice: Notice) {
    stale
        .entry(id.to_owned())
        .and_modify(|n| n.merge(notice))
        .or_insert(notice);
}

/// How long a cached fact is trusted without a change notice: a backstop for notices the
/// server dropped (a slow subscriber). Notices lost to a reconnect are covered at once (a
/// fact checked before the last reconnect is read again).
const FACT_MAX_AGE: Duration = Duration::from_secs(1);

impl<A: Aggregate> Repo<A> {
    pub fn new(store: EventStore, capacity: usize) -> Self {
        Repo {
            store,
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(16),
            stale: Arc::new(Mutex::new(HashMap::new())),
            notices: Arc::new(Mutex::new(None)),
            notices_connection: std::sync::OnceLock::new(),
            fact_max_age: FACT_MAX_AGE,
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Trusts cached facts without a change notice for `age` instead of a second.
    pub fn with_fact_max_age(mut self, age: Duration) -> Self {
        self.fact_max_age = age;
        self
    }

    /// Locks the entry of `id`, creating an empty one if needed (call [`Repo::catch_up`]).
    pub async fn lock(&self, id: &str) -> OwnedMutexGuard<Entry<A>> {
        let slot = {
            let mut map = self.entries.lock().expect("cache lock poisoned");
            if map.len() >= self.capacity && !map.contains_key(id) {
                // Drop what nobody holds; the stream has it all.
                map.retain(|_, slot| Arc::strong_count(slot) > 1);
            }
            map.entry(id.to_owned()).or_default().clone()
        };
        let mut entry = slot.lock_owned().await;
        // Waited for across a [`Repo::forget_all`]: read from the old stream.
        entry.renew(self.generation());
        entry
    }

    /// Drops every cached entry and change notice, for a stream deleted or made anew: what
    /// they hold (states, last sequences, command ids) was read from the old stream, whose
    /// sequences the new one numbers again from 1. Each aggregate is read from the stream at
    /// its next use. An entry a command holds meanwhile, or waits for, stays, of an older
    /// generation: read again from the start when the waiter gets it, or at the holder's next
    /// catch-up (its append, if any, meets the new stream's subject sequence: a conflict, and
    /// that catch-up). Returns how many entries were dropped.
    pub fn forget_all(&self) -> usize {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let dropped = {
            // Those a command holds or waits for stay, so that commands on one aggregate go on
            // one at a time here: each is reset when next locked (an older generation).
            let mut map = self.entries.lock().expect("cache lock poisoned");
            let n = map.len();
            map.retain(|_, slot| Arc::strong_count(slot) > 1);
            n - map.len()
        };
        self.drain_notices();
        self.stale.lock().expect("stale lock poisoned").clear();
        dropped
    }

    /// Applies the aggregate's events stored after the entry's last sequence; returns them.
    ///
    /// An entry read from another stream than the one now there is read again from the start:
    /// one read before a [`Repo::forget_all`] (a command held it meanwhile), or one whose next
    /// event on the stream does not follow its version (a stream made anew before the worker
    /// was told; the new stream numbers its sequences from 1 again).
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read; the entry is then reset.
    pub async fn catch_up(
        &self,
        id: &str,
        entry: &mut Entry<A>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let generation = self.generation();
        entry.renew(generation);
        let mut events = self.store.load(A::TYPE, id, entry.last_seq).await;
        let unfollowed = match &events {
            Ok(loaded) if entry.last_seq > 0 => loaded
                .first()
                .map(|e| e.meta.aggregate_version)
                .filter(|&next| next != entry.state.version() + 1),
            _ => None,
        };
        if let Some(next_version) = unfollowed {
            tracing::warn!(
                aggregate = A::TYPE.as_str(),
                id,
                cached_version = entry.state.version(),
                next_version,
                "the stream's next event does not follow the cached state (a stream made \
                 anew?): reading the aggregate again"
            );
            entry.reset(generation);
            events = self.store.load(A::TYPE, id, 0).await;
        }
        match events {
            Ok(events) => {
                for ev in &events {
                    entry.apply(ev);
                }
                Ok(events)
            }
            Err(e) => {
                entry.reset(generation);
                Err(e)
            }
        }
    }

    /// [`Repo::catch_up`] before a decision is refused on the entry's state: should nothing
    /// be newer, the event at the entry's last sequence is read too, and if it is not the one
    /// the entry applied (a stream made anew, shorter than the old one where it holds this
    /// aggregate, before the worker was told), the aggregate is read from the stream's start.
    /// One read more per refusal; an append needs none of it (its expected sequence tells).
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn refresh(&self, id: &str, entry: &mut Entry<A>) -> Result<(), StoreError> {
        let seen = self.catch_up(id, entry).await?;
        if !seen.is_empty() || entry.last_seq == 0 {
            return Ok(());
        }
        let at_last = self.store.get(entry.last_seq).await?;
        if at_last.map(|e| e.meta.event_id) != entry.last_event_id {
            tracing::warn!(
                aggregate = A::TYPE.as_str(),
                id,
                last_seq = entry.last_seq,
                "the stream no longer holds the cached state's last event (a stream made \
                 anew?): reading the aggregate again"
            );
            self.reload(id, entry).await?;
        }
        Ok(())
    }

    /// Forgets the entry's state and reloads it from the stream; returns every event.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn reload(
        &self,
        id: &str,
        entry: &mut Entry<A>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        entry.reset(self.generation());
        self.catch_up(id, entry).await
    }

    /// The current state of `id` (caught up with the stream), for use as a read-only fact.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn current(&self, id: &str) -> Result<A, StoreError> {
        let mut entry = self.lock(id).await;
        self.catch_up(id, &mut entry).await?;
        Ok(entry.state.clone())
    }

    /// Follows change notices: a subscription to `<prefix>.events.<type>.*` on `connection`. A
    /// JetStream append reaches this subscriber before the appender's reply can reach any
    /// client, so a command that arrives after a change, on the same connection, sees its
    /// notice already queued ([`Repo::fact`] moves the queued notices first): the notices
    /// must come on the connection the commands come on (NATS orders what it sends on one
    /// connection, not across two). A reconnect of `connection` may have lost notices: facts
    /// checked before it are read again. The notices are also moved every [`NOTICE_DRAIN`] by
    /// a task of their own: they carry whole events, and while no command reads a fact (a
    /// worker that sees only strategy updates, or prices for symbols nobody holds) they would
    /// pile up in the subscription's buffer (a megabyte per large strategy) until it dropped
    /// them. Must be called within a Tokio runtime.
    pub fn follow(&self, notices: async_nats::Subscriber, connection: &async_nats::Client) {
        let _ = self.notices_connection.set(connection.statistics());
        *self.notices.lock().expect("notices lock poisoned") = Some(notices);
        let (notices, stale) = (Arc::downgrade(&self.notices), Arc::downgrade(&self.stale));
        let max_age = self.fact_max_age;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(NOTICE_DRAIN);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(notices), Some(stale)) = (notices.upgrade(), stale.upgrade()) else {
                    break;
                };
                if !drain_notices(&notices, &stale, max_age) {
                    break;
                }
            }
        });
    }

    /// How many aggregates a change notice has marked since their cached state was last read
    /// as a fact (the notices moved out of the subscription's buffer so far).
    pub fn noticed(&self) -> usize {
        self.stale.lock().expect("stale lock poisoned").len()
    }

    /// Moves queued change notices into the stale set (never waits).
    fn drain_notices(&self) {
        drain_notices(&self.notices, &self.stale, self.fact_max_age);
    }

    /// The state of `id` as a read-only fact for another aggregate's decision: from the cache
    /// while no change notice arrived for it, it is younger than a second and the connection
    /// has not been re-established since it was checked; else caught up with the stream.
    /// Saves a round trip per command for facts that rarely change.
    ///
    /// The server sends a notice as the append arrives and stores the event after it (after
    /// its sync with `sync_interval: always`, after a majority of a cluster has it), so a
    /// read just after a notice may not find the event yet: the notice then stays, and every
    /// read goes to the stream until one finds the event (or, should the append have failed,
    /// for up to a second). A decision made while the append is on its way is concurrent with
    /// it; one made after the appender's reply reached a client finds it.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn fact(&self, id: &str) -> Result<A, StoreError> {
        let mut entry = self.lock(id).await;
        self.drain_notices();
        let noticed = self.stale.lock().expect("stale lock poisoned").remove(id);
        let connects = self.notices_connection.get().map_or_else(
            || self.store.connects(),
            |c| c.connects.load(std::sync::atomic::Ordering::Relaxed),
        );
        let old = entry
            .checked_at
            .is_none_or(|t| t.elapsed() > self.fact_max_age);
        if noticed.is_some() || old || entry.checked_connects != connects {
            // As the read starts: a notice that comes during it (a long read) is newer than
            // the entry, and the entry ages from before it (see [`prune_notices`]).
            let reading = Instant::now();
            self.catch_up(id, &mut entry).await?;
            entry.checked_at = Some(reading);
            entry.checked_connects = connects;
        }
        if let Some(n) = noticed {
            if entry.last_seq <= n.after && n.at.elapsed() < self.fact_max_age {
                // The noticed event is not stored yet: read again next time.
                notice(&mut self.stale.lock().expect("stale lock poisoned"), id, n);
            }
        }
        Ok(entry.state.clone())
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ch_domain::event::{Event, MarketPriceRecorded};
    use ch_domain::market::MarketState;
    use ch_domain::AggregateType;

    fn price(seq: u64, command_id: Uuid, recorded_at: DateTime<Utc>) -> StoredEvent {
        StoredEvent {
            seq,
            meta: crate::envelope::Meta {
                event_id: Uuid::now_v7(),
                schema_version: 1,
                aggregate_type: AggregateType::Market,
                aggregate_id: "BTC-USDT".into(),
                aggregate_version: seq,
                occurred_at: recorded_at,
                recorded_at,
                command_id: Some(command_id),
                correlation_id: None,
                causation_id: None,
                command_digest: None,
            },
            event: Event::MarketPriceRecorded(MarketPriceRecorded {
                symbol: "BTC-USDT".into(),
                price: seq.into(),
            }),
        }
    }

    #[test]
    fn an_entry_keeps_the_de_duplication_windows_command_ids_and_the_latest_beyond_it() {
        let now = Utc::now();
        let ids: Vec<Uuid> = (0..COMMAND_IDS_KEPT + 5).map(|_| Uuid::now_v7()).collect();
        // All within the window: every one kept, however many.
        let mut recent = Entry::<MarketState>::default();
        for (i, id) in ids.iter().enumerate() {
            recent.apply(&price(i as u64 + 1, *id, now));
        }
        assert_eq!(recent.commands.len(), ids.len());
        assert_eq!(recent.command_seq(&ids[0]), Some(1));

        // The first five stored before the window: past the count, those go, oldest first.
        let before = now - COMMAND_IDS_KEPT_FOR - chrono::TimeDelta::seconds(1);
        let mut entry = Entry::<MarketState>::default();
        for (i, id) in ids.iter().enumerate() {
            let at = if i < 5 { before } else { now };
            entry.apply(&price(i as u64 + 1, *id, at));
        }
        assert_eq!(entry.commands.len(), COMMAND_IDS_KEPT);
        assert_eq!(entry.command_order.len(), COMMAND_IDS_KEPT);
        assert_eq!(entry.command_seq(&ids[4]), None, "the fifth oldest is gone");
        assert_eq!(entry.command_seq(&ids[5]), Some(6), "the oldest kept");
        let last = ids.len() - 1;
        assert_eq!(entry.command_seq(&ids[last]), Some(last as u64 + 1));
        assert_eq!(entry.last_seq, ids.len() as u64);
    }

    #[test]
    fn the_ids_are_kept_for_at_least_the_streams_de_duplication_window() {
        let cfg = crate::eventstore::stream_config(&crate::Subjects::new("t"), 1).unwrap();
        let window = chrono::TimeDelta::from_std(cfg.duplicate_window).unwrap();
        assert!(COMMAND_IDS_KEPT_FOR > window, "{window}");
    }

    #[test]
    fn notices_that_change_nothing_are_dropped_once_there_are_many() {
        let max_age = Duration::from_secs(1);
        let now = Instant::now();
        let old = now - 3 * max_age;
        let mut stale = HashMap::new();
        for i in 0..NOTICES_PRUNED_ABOVE {
            notice(&mut stale, &format!("old{i}"), Notice { after: 1, at: old });
        }
        prune_notices(&mut stale, max_age);
        assert_eq!(stale.len(), NOTICES_PRUNED_ABOVE, "few enough: kept");
        notice(&mut stale, "fresh", Notice { after: 7, at: now });
        prune_notices(&mut stale, max_age);
        assert_eq!(stale.len(), 1, "the old ones dropped");
        assert_eq!(stale["fresh"].after, 7);
    }
}

//! Read-your-writes for query workers: wait (bounded) until a read model has applied a stream
//! sequence. Projectors announce each commit on `<prefix>.progress.<projection>`; a waiter
//! also re-reads the checkpoint now and then, since core NATS may drop an announcement.
//!
//! A sparse projection (one that reads part of the stream, like `strategy`) applies only the
//! events of its subjects, and moves its checkpoint over the others when idle. A waiter does
//! not wait for that: when no event of the projection's subjects lies between its checkpoint
//! and the wanted sequence (and the stream reaches it), the read model already shows
//! everything up to that sequence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::eventstore::EventStore;
use crate::projector::checkpoint;
use crate::subjects::Subjects;

/// Default and maximum of `timeout_ms` (API.md).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
pub const MAX_TIMEOUT: Duration = Duration::from_millis(10_000);
/// How often a waiter re-reads the checkpoint if no announcement arrives.
const RECHECK: Duration = Duration::from_millis(25);
/// The first pause before a waiter reads again a checkpoint announced but not read yet
/// (doubling up to [`RECHECK`]).
const ANNOUNCED_PAUSE: Duration = Duration::from_millis(1);

/// How far past a wait's bound a checkpoint read may go unanswered before the wait ends as
/// `unavailable`.
const NO_ANSWER_GRACE: Duration = Duration::from_secs(1);

/// The latest announced sequence of each projection a query worker reads.
#[derive(Clone)]
pub struct Progress {
    watches: Arc<HashMap<&'static str, watch::Receiver<u64>>>,
    /// The sparse projections among them, with their filters, and the stream to ask.
    sparse: Option<(EventStore, Arc<HashMap<&'static str, String>>)>,
}

impl Progress {
    /// Subscribes to the announcements of `projections`.
    ///
    /// # Errors
    /// When the subscription fails.
    pub async fn subscribe(
        client: &async_nats::Client,
        subjects: &Subjects,
        projections: &[&'static str],
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut watches = HashMap::new();
        for &p in projections {
            let (tx, rx) = watch::channel(0u64);
            let mut sub = client.subscribe(subjects.progress(p)).await?;
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    if let Some(seq) = std::str::from_utf8(&msg.payload)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        tx.send_if_modified(|cur| {
                            let newer = seq != *cur;
                            *cur = seq;
                            newer
                        });
                    }
                }
            });
            watches.insert(p, rx);
        }
        Ok(Progress {
            watches: Arc::new(watches),
            sparse: None,
        })
    }

    /// Tells the waiter which projections are sparse (name and subject filter, see
    /// [`crate::eventstore::sparse_filter`]), so that their waits end as soon as nothing of
    /// theirs is left to apply.
    #[must_use]
    pub fn with_sparse(
        mut self,
        store: EventStore,
        filters: impl IntoIterator<Item = (&'static str, String)>,
    ) -> Self {
        self.sparse = Some((store, Arc::new(filters.into_iter().collect())));
        self
    }

    /// A sparse projection at checkpoint `applied` shows everything up to `min_seq` when the
    /// stream reaches `min_seq` and has no event of its subjects in between. `false` when it
    /// is not sparse, or on NATS trouble (the wait goes on as for any projection).
    async fn nothing_to_apply(&self, projection: &str, applied: u64, min_seq: u64) -> bool {
        let Some((store, filters)) = &self.sparse else {
            return false;
        };
        let Some(filter) = filters.get(projection) else {
            return false;
        };
        // Its next event past `min_seq` also shows that the stream reaches `min_seq`; with no
        // next event, the stream's head must be asked.
        let check = async {
            Ok::<_, crate::error::StoreError>(
                match store.first_seq_from(filter, applied + 1).await? {
                    Some(next) => next > min_seq,
                    None => store.reaches(min_seq).await?,
                },
            )
        };
        match check.await {
            Ok(done) => done,
            Err(e) => {
                tracing::debug!(projection, error = %e, "could not look for events to apply");
                false
            }
        }
    }

    /// Waits until every projection in `projections` has applied `min_seq`, or `timeout`.
    /// Returns what it found out about sparse projections, for the reply's `as_of_seq`.
    ///
    /// # Errors
    /// `stale` (504) past the bound; `unavailable` when the database cannot be read.
    pub async fn wait_for(
        &self,
        pool: &Pool,
        projections: &[&'static str],
        min_seq: u64,
        timeout: Duration,
    ) -> Result<Reached, ApiError> {
        let deadline = Instant::now() + timeout;
        let mut reached = Reached::default();
        for &p in projections {
            let mut rx = self.watches.get(p).cloned().expect("subscribed projection");
            // The checkpoint last looked past (sparse projections only).
            let mut looked = None;
            let mut pause = ANNOUNCED_PAUSE;
            loop {
                // A free session has the pool's own bound (a busy worker says so); the read, the
                // wait's bound and a second: a database that takes it and never answers ends
                // the wait as `unavailable`, not never.
                let applied = {
                    let answer_by = deadline.max(Instant::now()) + NO_ANSWER_GRACE;
                    let no_answer = || {
                        ApiError::unavailable(format!(
                            "the database did not answer a read of the {p} checkpoint \
                             within {} ms",
                            (timeout + NO_ANSWER_GRACE).as_millis()
                        ))
                    };
                    // A new session must log in by then too.
                    let within = answer_by.saturating_duration_since(Instant::now());
                    let conn = crate::pg::session_within(pool, within)
                        .await?
                        .ok_or_else(no_answer)?;
                    match tokio::time::timeout_at(answer_by, checkpoint(&**conn, p)).await {
                        Ok(read) => read?,
                        Err(_) => return Err(no_answer()),
                    }
                };
                if applied >= min_seq {
                    break;
                }
                if looked != Some(applied) {
                    looked = Some(applied);
                    // Within the wait's bound: the stream's reads are asked again for seconds
                    // while a replicated stream elects its leader.
                    let looking = self.nothing_to_apply(p, applied, min_seq);
                    if tokio::time::timeout_at(deadline, looking).await == Ok(true) {
                        reached.0.push((p, applied, min_seq));
                        break;
                    }
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::stale(format!(
                        "the {p} read model is at stream sequence {applied}, not yet {min_seq}, after {} ms",
                        timeout.as_millis()
                    )));
                }
                if *rx.borrow() >= min_seq {
                    // Announced, yet not in what this pool reads: a replica behind its primary,
                    // or commits a database crash lost (projectors commit without waiting for
                    // the WAL flush). Look again after a pause, not at once.
                    tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
                    pause = (pause * 2).min(RECHECK);
                } else {
                    let wake = (Instant::now() + RECHECK).min(deadline);
                    let _ = tokio::time::timeout_at(wake, rx.wait_for(|s| *s >= min_seq)).await;
                }
            }
        }
        Ok(reached)
    }
}

/// What a wait found out beyond the checkpoints: sparse projections that show every event up
/// to a sequence although their checkpoint is below it (none of their events lies between).
#[derive(Debug, Default, Clone)]
pub struct Reached(Vec<(&'static str, u64, u64)>);

impl Reached {
    /// The stream sequence `projection` shows everything up to, when its checkpoint is
    /// `checkpoint` in the reply's snapshot: what the wait established, unless the checkpoint
    /// went back since (a rebuild's reset).
    pub fn effective(&self, projection: &str, checkpoint: u64) -> u64 {
        self.0
            .iter()
            .find(|(p, seen, _)| *p == projection && checkpoint >= *seen)
            .map_or(checkpoint, |&(_, _, to)| checkpoint.max(to))
    }
}

impl Progress {
    /// Waits until every projection in `projections` announced `min_seq` (no database read:
    /// for command workers in `immediate` mode). Returns whether it happened within `timeout`.
    pub async fn wait_announced(
        &self,
        projections: &[&'static str],
        min_seq: u64,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        for &p in projections {
            let mut rx = self.watches.get(p).cloned().expect("subscribed projection");
            let reached = matches!(
                tokio::time::timeout_at(deadline, rx.wait_for(|s| *s >= min_seq)).await,
                Ok(Ok(_))
            );
            if !reached {
                return false;
            }
        }
        true
    }
}

/// The bound of a query's wait from its `timeout_ms`.
///
/// # Errors
/// `bad_request` when it is 0 or above the maximum.
pub fn timeout_from(ms: Option<u64>) -> Result<Duration, ApiError> {
    match ms {
        None => Ok(DEFAULT_TIMEOUT),
        Some(0) => Err(ApiError::bad_request("timeout_ms: must be > 0")),
        Some(ms) if Duration::from_millis(ms) > MAX_TIMEOUT => Err(ApiError::bad_request(format!(
            "timeout_ms: at most {}",
            MAX_TIMEOUT.as_millis()
        ))),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::Reached;

    #[test]
    fn a_sparse_projection_counts_as_current_up_to_what_the_wait_established() {
        let reached = Reached(vec![("strategy", 10, 25)]);
        // Its checkpoint as seen by the wait, or moved on since: current up to 25 at least.
        assert_eq!(reached.effective("strategy", 10), 25);
        assert_eq!(reached.effective("strategy", 18), 25);
        assert_eq!(reached.effective("strategy", 30), 30);
        // Reset since the wait (checkpoint went back): only the checkpoint counts.
        assert_eq!(reached.effective("strategy", 4), 4);
        // Other projections: their checkpoint.
        assert_eq!(reached.effective("portfolio", 12), 12);
        assert_eq!(Reached::default().effective("strategy", 7), 7);
    }
}

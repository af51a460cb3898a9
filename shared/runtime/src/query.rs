//! Read-your-writes for query workers: wait (bounded) until a read model has applied a stream
//! sequence. Projectors announce each commit on `<prefix>.progress.<projection>`; a waiter
//! also re-reads the checkpoint now and then, since core NATS may drop an announcement.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{ApiError, DbError};
use crate::projector::checkpoint;
use crate::subjects::Subjects;

/// Default and maximum of `timeout_ms` (API.md).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
pub const MAX_TIMEOUT: Duration = Duration::from_millis(10_000);
/// How often a waiter re-reads the checkpoint if no announcement arrives.
const RECHECK: Duration = Duration::from_millis(25);

/// The latest announced sequence of each projection a query worker reads.
#[derive(Clone)]
pub struct Progress {
    watches: Arc<HashMap<&'static str, watch::Receiver<u64>>>,
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
        })
    }

    /// Waits until every projection in `projections` has applied `min_seq`, or `timeout`.
    ///
    /// # Errors
    /// `stale` (504) past the bound; `unavailable` when the database cannot be read.
    pub async fn wait_for(
        &self,
        pool: &Pool,
        projections: &[&'static str],
        min_seq: u64,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let deadline = Instant::now() + timeout;
        for &p in projections {
            let mut rx = self.watches.get(p).cloned().expect("subscribed projection");
            loop {
                let applied = {
                    let conn = pool.get().await.map_err(DbError::from)?;
                    checkpoint(&**conn, p).await?
                };
                if applied >= min_seq {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::stale(format!(
                        "the {p} read model is at stream sequence {applied}, not yet {min_seq}, after {} ms",
                        timeout.as_millis()
                    )));
                }
                let wake = (Instant::now() + RECHECK).min(deadline);
                let _ = tokio::time::timeout_at(wake, rx.wait_for(|s| *s >= min_seq)).await;
            }
        }
        Ok(())
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

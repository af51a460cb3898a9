//! CipherHorizon's plumbing around the pure domain: configuration, telemetry, the JetStream
//! event store, the Postgres pool, and the harnesses every worker runs in (command, projector,
//! request-reply service), with shutdown and error replies.

pub mod app;
pub mod command;
pub mod commands;
pub mod config;
pub mod envelope;
pub mod error;
pub mod eventstore;
pub mod metrics;
pub mod pg;
pub mod projector;
pub mod query;
pub mod repo;
pub mod service;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;

pub use config::{Config, SyncMode};
pub use error::{ApiError, DbError, StoreError};
pub use eventstore::EventStore;
pub use subjects::Subjects;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{debug, info, warn};

/// mimalloc for every binary built on the runtime: the projectors and the command path
/// allocate per message, and glibc's malloc and free took a fifth of a projector's CPU in a
/// replay profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Connects to NATS with the worker's name. The connection is retried for as long as the
/// client lives: a running worker outlives a restart of the server (a starting one gives up
/// when JetStream does not answer in time, see `app::App::start`). What happens to the
/// connection is logged for an operator by [`log_event`].
///
/// # Errors
/// When the URL is invalid.
pub async fn connect_nats(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let failing = Arc::new(AtomicBool::new(false));
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let failing = failing.clone();
            async move { log_event(&event, &failing) }
        })
        .connect(server_list(url)?)
        .await
}

/// `CH_NATS_URL` as a list of servers: one URL, or several separated by commas (the nodes of
/// a cluster), tried in turn until one answers; once connected, the client also learns the
/// cluster's other nodes from the server.
///
/// # Errors
/// When an entry is not a server URL.
pub fn server_list(urls: &str) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
    urls.split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
        })
}

/// The connection's events in the log (async-nats logs each at info otherwise): a lost
/// connection, the first failed attempt to connect (`failing` remembers it until connected),
/// messages the server dropped for a slow subscriber and server errors are warnings; the
/// attempts after the first, every few seconds while the server is away, are at debug.
fn log_event(event: &async_nats::Event, failing: &AtomicBool) {
    use async_nats::Event;
    match event {
        Event::Connected => {
            failing.store(false, Ordering::Relaxed);
            info!("NATS connected");
        }
        Event::Disconnected => warn!("NATS connection lost; reconnecting"),
        Event::ClientError(e) if !failing.swap(true, Ordering::Relaxed) => {
            warn!(error = %e, "cannot connect to NATS; retrying");
        }
        Event::ClientError(e) => debug!(error = %e, "cannot connect to NATS; retrying"),
        Event::SlowConsumer(sid) => {
            warn!(
                sid,
                "NATS dropped messages for a subscription that fell behind"
            );
        }
        Event::ServerError(e) => warn!(error = %e, "NATS server error"),
        Event::LameDuckMode => warn!("the NATS server is going away (lame duck mode)"),
        Event::Draining | Event::Closed => debug!(event = %event, "NATS connection"),
    }
}

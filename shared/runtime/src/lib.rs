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

/// mimalloc for every binary built on the runtime: the projectors and the command path
/// allocate per message, and glibc's malloc and free took a fifth of a projector's CPU in a
/// replay profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Connects to NATS with the worker's name, retrying the first connection briefly.
///
/// # Errors
/// When NATS cannot be reached.
pub async fn connect_nats(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await
}

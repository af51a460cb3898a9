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
mod pgtls;
pub mod projector;
pub mod query;
pub mod repo;
pub mod service;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;

pub use config::{Config, NatsTls, SyncMode};
pub use error::{ApiError, DbError, StoreError};
pub use eventstore::EventStore;
pub use subjects::Subjects;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{debug, info, warn};

/// mimalloc for every binary built on the runtime: the projectors and the command path
/// allocate per message, and glibc's malloc and free took a fifth of a projector's CPU in a
/// replay profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Connects to NATS (`cfg`'s URL and TLS files) with the worker's name. The connection is
/// retried for as long as the client lives: a running worker outlives a restart of the server
/// (a starting one gives up when JetStream does not answer in time, see `app::App::start`).
/// What happens to the connection is logged for an operator by [`log_event`].
///
/// # Errors
/// When the URL is invalid, or a TLS file (`CH_NATS_CA_FILE`, ...) unreadable.
pub async fn connect_nats(
    cfg: &Config,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    // A file that is not there is said now, naming it: async-nats would say "TLS error" and
    // retry for good.
    cfg.nats_tls
        .check()
        .map_err(|e| async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Tls, e))?;
    let state = Arc::new(EventLog::default());
    let (options, servers) = nats_options(&cfg.nats_tls, &cfg.nats_url)?;
    let (tls, urls) = (cfg.nats_tls.clone(), cfg.nats_url.clone());
    options
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let (state, tls, urls) = (state.clone(), tls.clone(), urls.clone());
            async move {
                if log_event(&event, &state) {
                    // The first failure: the client's events keep no cause ("IO error", "TLS
                    // error"); one attempt of its own says it (an unknown CA, a certificate the
                    // server wants, a refused connection).
                    let bare = match &event {
                        async_nats::Event::ClientError(e) => e.to_string(),
                        other => other.to_string(),
                    };
                    tokio::spawn(async move {
                        match connect_cause(&tls, &urls).await {
                            Some(cause) => {
                                warn!(error = %bare, %cause, "cannot connect to NATS; retrying")
                            }
                            None => warn!(error = %bare, "cannot connect to NATS; retrying"),
                        }
                    });
                }
            }
        })
        .connect(servers)
        .await
}

/// Why connecting to `urls` with `tls` fails, from one attempt of its own (no retries, 2 s at
/// most), with every cause in the error's chain; `None` when it connects.
pub async fn connect_cause(tls: &config::NatsTls, urls: &str) -> Option<String> {
    let attempt = async {
        let (options, servers) = nats_options(tls, urls)?;
        options
            .connection_timeout(std::time::Duration::from_secs(2))
            .connect(servers)
            .await
    };
    let e = attempt.await.err()?;
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    Some(text)
}

/// The connection options `tls` asks for beyond the URL: the CA certificates to verify the
/// server with (instead of the system's) and a client certificate, each requiring TLS. With
/// either, the servers a cluster announces are not added to the URL's: they come as
/// addresses their certificates do not name, and every reconnection to one would fail.
///
/// With them, the servers of `urls` (`CH_NATS_URL`) to connect to ([`server_list`]), read
/// once: the credentials a URL carries go in the options (the first URL that has any):
/// `nats://user:password@host` as user and password, `nats://token@host` as a token,
/// percent-decoded. async-nats reads them from its options only, and they are left out of the
/// addresses (async-nats logs those at debug).
///
/// Reads no file: check them first ([`config::NatsTls::check`]; [`connect_nats`] does).
///
/// # Errors
/// When an entry of `urls` is not a server URL.
pub fn nats_options(
    tls: &config::NatsTls,
    urls: &str,
) -> Result<(async_nats::ConnectOptions, Vec<async_nats::ServerAddr>), async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new();
    let decoded = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let servers = if urls.trim().is_empty() {
        Vec::new()
    } else {
        parsed(urls)?
    };
    if let Some(s) = servers.iter().find(|s| s.has_user_pass()) {
        let user = decoded(s.username().unwrap_or_default());
        options = match s.password() {
            Some(password) => options.user_and_password(user, decoded(password)),
            None => options.token(user),
        };
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &tls.client_cert {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if tls != &config::NatsTls::default() {
        options = options.ignore_discovered_servers();
    }
    Ok((options, without_credentials(servers)?))
}

/// `CH_NATS_URL` as a list of servers: one URL, or several separated by commas (the nodes of
/// a cluster), tried in a random order (async-nats shuffles them, spreading the clients)
/// until one answers; once connected, the client also learns the cluster's other nodes from
/// the server.
///
/// # Errors
/// When an entry is not a server URL.
pub fn server_list(urls: &str) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
    without_credentials(parsed(urls)?)
}

/// `servers` with their credentials taken out (they go in the options: [`nats_options`]).
fn without_credentials(
    servers: Vec<async_nats::ServerAddr>,
) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
    servers
        .into_iter()
        .map(|s| {
            let mut url = s.into_inner();
            let _ = url.set_password(None);
            let _ = url.set_username("");
            async_nats::ServerAddr::from_url(url)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| {
            async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
        })
}

/// The entries of `urls` as async-nats reads them, credentials and all.
fn parsed(urls: &str) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
    urls.split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
        })
}

/// What [`log_event`] remembers between events.
#[derive(Default)]
struct EventLog {
    /// A failed attempt to connect was logged (until connected).
    failing: AtomicBool,
    /// Messages dropped for a full subscription since the last warning about them.
    dropped: AtomicU64,
    /// When that warning was.
    warned_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// At most one warning about dropped messages in this long, with their count since the last.
const DROPPED_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The connection's events in the log (async-nats logs each at info otherwise): a lost
/// connection, the first failed attempt to connect, messages dropped for a subscription that
/// fell behind (at most every [`DROPPED_WARN_EVERY`], counted) and server errors are warnings;
/// the attempts after the first, every few seconds while the server is away, are at debug.
/// `true` for the first failed attempt, which the caller logs with its cause.
fn log_event(event: &async_nats::Event, state: &EventLog) -> bool {
    use async_nats::Event;
    match event {
        Event::Connected => {
            state.failing.store(false, Ordering::Relaxed);
            info!("NATS connected");
        }
        Event::Disconnected => warn!("NATS connection lost; reconnecting"),
        // Logged by the caller, with its cause.
        Event::ClientError(_) if !state.failing.swap(true, Ordering::Relaxed) => return true,
        Event::ClientError(e) => debug!(error = %e, "cannot connect to NATS; retrying"),
        Event::SlowConsumer(sid) => {
            state.dropped.fetch_add(1, Ordering::Relaxed);
            let mut warned_at = state.warned_at.lock().expect("event log lock");
            if warned_at.is_none_or(|t| t.elapsed() >= DROPPED_WARN_EVERY) {
                *warned_at = Some(std::time::Instant::now());
                let dropped = state.dropped.swap(0, Ordering::Relaxed);
                warn!(
                    sid,
                    dropped,
                    "this worker's buffer for a subscription was full: messages to it were \
                     dropped (requests among them go unanswered; the worker is overloaded)"
                );
            }
        }
        Event::ServerError(e) => warn!(error = %e, "NATS server error"),
        Event::LameDuckMode => warn!("the NATS server is going away (lame duck mode)"),
        Event::Draining | Event::Closed => debug!(event = %event, "NATS connection"),
    }
    false
}

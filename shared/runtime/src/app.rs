//! What every worker starts with: configuration, a NATS connection, the event store, metrics.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::error::{DbError, StoreError};
use crate::eventstore::{wait_ready, EventStore};
use crate::metrics::Metrics;
use crate::pg;
use crate::service::{EndpointSpec, ServiceSpec};
use crate::subjects::Subjects;

/// Each variant says its cause in its own text and does not return it again as its
/// `source()`: a chain printed whole (`{:#}` of anyhow) would repeat it.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot connect to NATS at {url}: {error}")]
    Nats {
        url: String,
        error: async_nats::ConnectError,
    },
    /// The client never got a connection while JetStream was awaited; `cause` is what one
    /// attempt of its own then said.
    #[error(
        "cannot reach NATS at {url} (tried for {waited:?}){}; is a nats-server running there, \
         and does it take the credentials and the TLS files (CH_NATS_CA_FILE, CH_NATS_CERT_FILE, \
         CH_NATS_KEY_FILE), if any?",
        cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
    )]
    NatsUnreachable {
        url: String,
        waited: Duration,
        cause: Option<String>,
    },
    #[error("{0} (has `chctl setup` run for this prefix?)")]
    Store(StoreError),
    /// JetStream did not answer, and the server connected to says it has none.
    #[error("{error}: the nats-server at {url} {JETSTREAM_OFF}")]
    NoJetStream { url: String, error: StoreError },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl StartError {
    /// JetStream did not answer within [`JETSTREAM_PATIENCE`]: NATS is unreachable if the
    /// client never got a connection (`state`), JetStream off if the server says so
    /// (`jetstream`, from its INFO), else the store is not ready.
    fn not_ready(
        e: StoreError,
        state: &async_nats::connection::State,
        jetstream: bool,
        url: &str,
    ) -> Self {
        match state {
            async_nats::connection::State::Connected if !jetstream => StartError::NoJetStream {
                url: url.to_owned(),
                error: e,
            },
            async_nats::connection::State::Connected => StartError::Store(e),
            _ => StartError::NatsUnreachable {
                url: url.to_owned(),
                waited: JETSTREAM_PATIENCE,
                cause: None,
            },
        }
    }
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        StartError::Store(e)
    }
}

/// What a server that has no JetStream is told by (a worker's start, `chctl setup`).
pub const JETSTREAM_OFF: &str =
    "has JetStream off (start it with `-js` or a `jetstream {}` block in its configuration)";

/// How long a worker's start waits for JetStream to answer (a server just started, or a
/// cluster electing its leader); a worker that cannot start exits, to be started again.
const JETSTREAM_PATIENCE: Duration = Duration::from_secs(10);

/// A worker's connections, shared by its tasks.
#[derive(Clone)]
pub struct App {
    pub cfg: Config,
    pub subjects: Subjects,
    pub client: async_nats::Client,
    /// The connection of the worker's micro service (see [`crate::service::Connections`]).
    pub intake: async_nats::Client,
    pub store: EventStore,
    pub metrics: Metrics,
    /// The worker's name, e.g. `cmd-portfolio`.
    pub worker: String,
    /// Its service name: the worker's name under the subject prefix, e.g. `ch-cmd-portfolio`.
    pub service_name: String,
}

impl App {
    /// Connects to NATS and opens the event stream.
    ///
    /// # Errors
    /// [`StartError`] saying what could not be reached.
    pub async fn start(cfg: Config, worker: &str) -> Result<App, StartError> {
        let subjects = Subjects::new(cfg.prefix.clone());
        let service_name = subjects.service_name(worker);
        // The address as messages and logs show it (no password).
        let nats = crate::config::redact(&cfg.nats_url);
        let client = crate::connect_nats(&cfg, &service_name)
            .await
            .map_err(|error| StartError::Nats {
                url: nats.clone(),
                error,
            })?;
        // The service's own connection, drained when the worker stops (named apart in the
        // server's connection list); `service::serve` waits for it to come up.
        let intake = crate::connect_nats(&cfg, &format!("{service_name} requests"))
            .await
            .map_err(|error| StartError::Nats {
                url: nats.clone(),
                error,
            })?;
        if let Err(e) = wait_ready(&jetstream::new(client.clone()), JETSTREAM_PATIENCE).await {
            let (state, js) = (client.connection_state(), client.server_info().jetstream);
            let mut error = StartError::not_ready(e, &state, js, &nats);
            if let StartError::NatsUnreachable { cause, .. } = &mut error {
                *cause = crate::connect_cause(&cfg.nats_tls, &cfg.nats_url).await;
            }
            return Err(error);
        }
        let metrics = Metrics::default();
        let store = EventStore::open(client.clone(), subjects.clone())
            .await?
            .with_metrics(metrics.clone());
        info!(
            worker,
            nats = %nats,
            server_version = %client.server_info().version,
            stream = %subjects.stream_name(),
            sync = cfg.sync.as_str(),
            batch_max = cfg.batch_max,
            batch_wait_ms = cfg.batch_wait.as_millis() as u64,
            replay_batch_max = cfg.replay_batch_max,
            immediate_timeout_ms = cfg.immediate_timeout.as_millis() as u64,
            query_timeout_ms = cfg.query_timeout.as_millis() as u64,
            worker_threads = cfg.worker_threads,
            version = env!("CARGO_PKG_VERSION"),
            "started"
        );
        Ok(App {
            cfg,
            subjects,
            client,
            intake,
            store,
            metrics,
            worker: worker.to_owned(),
            service_name,
        })
    }

    /// The connections its micro service runs on.
    pub fn connections(&self) -> crate::service::Connections {
        crate::service::Connections {
            client: self.client.clone(),
            intake: self.intake.clone(),
        }
    }

    /// A Postgres pool on the configured schema.
    ///
    /// # Errors
    /// [`DbError`] when the URL is invalid.
    pub fn pool(&self) -> Result<Pool, DbError> {
        self.pool_spec(pg::Access::ReadWrite).pool()
    }

    /// A Postgres pool on the configured schema whose sessions cannot write (query workers).
    ///
    /// # Errors
    /// [`DbError`] when the URL is invalid.
    pub fn read_pool(&self) -> Result<Pool, DbError> {
        self.pool_spec(pg::Access::ReadOnly).pool()
    }

    /// [`App::read_pool`] with the [`pg::Retirement`] of its sessions (query workers: a
    /// session that the server ended retires the others).
    ///
    /// # Errors
    /// [`DbError`] when the URL is invalid.
    pub fn retiring_read_pool(&self) -> Result<(Pool, pg::Retirement), DbError> {
        self.pool_spec(pg::Access::ReadOnly).retiring_pool()
    }

    /// The configured pool; its sessions carry the worker's service name (`ch-proj-portfolio`)
    /// as `application_name`, so `pg_stat_activity` tells which worker holds each.
    fn pool_spec(&self, access: pg::Access) -> pg::PoolSpec<'_> {
        // Said here, not as the worker starts: command workers open no session, and their
        // start line named a database they never use (and a Kubernetes pod of theirs has none).
        info!(
            worker = %self.worker,
            database = %crate::config::redact(&self.cfg.database_url),
            db_schema = %self.cfg.db_schema,
            db_pool = self.cfg.db_pool_size,
            read_only = matches!(access, pg::Access::ReadOnly),
            "database"
        );
        pg::PoolSpec {
            database_url: &self.cfg.database_url,
            schema: &self.cfg.db_schema,
            size: self.cfg.db_pool_size,
            access,
            application_name: &self.service_name,
        }
    }

    /// The micro service of this worker with the given `(endpoint name, subject)` pairs.
    /// Endpoints are `(name, subject)`; a dotted name (`portfolio.update`) becomes the
    /// endpoint name `portfolio_update`.
    pub fn service_spec<'a>(
        &self,
        description: &str,
        endpoints: impl IntoIterator<Item = (&'a str, String)>,
    ) -> ServiceSpec {
        ServiceSpec {
            name: self.service_name.clone(),
            description: description.to_owned(),
            endpoints: endpoints
                .into_iter()
                .map(|(name, subject)| EndpointSpec {
                    name: crate::service::endpoint_name(name),
                    subject,
                })
                .collect(),
            metadata: self.cfg.service_metadata(),
        }
    }
}

/// A worker binary's whole life as one boxed future: what its `main` runs on the runtime.
pub type MainFuture = BoxFuture<'static, Result<(), async_nats::Error>>;

/// Starts the app as `worker`, then runs `body` until SIGTERM or Ctrl-C, boxed. Call it from a
/// non-generic library function (`commands::main_future`, `ch_readmodel::workers::*_main`):
/// a future is compiled again in every crate that polls it, so a binary that polls only the
/// box compiles none of the workers' state machines (the ten binaries had made half of the
/// release build).
pub fn boxed_main<F, Fut>(cfg: Config, worker: &'static str, body: F) -> MainFuture
where
    F: FnOnce(App, CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), async_nats::Error>> + Send + 'static,
{
    Box::pin(async move {
        // Signals are handled from the first moment: a worker stopped while it still waits
        // for NATS or the stream (a pod deleted during its start) ends at once, and cleanly.
        let shutdown = crate::shutdown::on_signal();
        info!(worker, nats = %crate::config::redact(&cfg.nats_url), "starting");
        let app = tokio::select! {
            app = App::start(cfg, worker) => app.map_err(|e| format!("starting {worker}: {e}"))?,
            () = shutdown.cancelled() => {
                info!(worker, "stopped before it had started");
                return Ok(());
            }
        };
        body(app, shutdown).await
    })
}

/// A worker binary's `main`: the configuration from the environment, logging, the runtime of
/// `CH_WORKER_THREADS`, and the worker's life (`life`, made in a library: see [`boxed_main`]).
///
/// # Errors
/// A configuration error, or what ended the worker's life.
pub fn worker_main(
    worker: &'static str,
    life: fn(Config) -> MainFuture,
) -> Result<(), async_nats::Error> {
    let cfg = Config::from_env()?;
    crate::telemetry::init(cfg.log_json);
    cfg.runtime()?.block_on(life(cfg)).map_err(|e| {
        // In the log too, as its last line (with `CH_LOG_FORMAT=json`, the one a collector
        // reads); the caller prints it on stderr and exits non-zero.
        tracing::error!(worker, error = %e, "the worker failed");
        format!("{worker} failed: {e}").into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error and its sources, as anyhow's `{:#}` prints them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            text = format!("{text}: {cause}");
            next = cause.source();
        }
        text
    }

    #[test]
    fn start_errors_say_their_cause_once() {
        let store = StartError::from(StoreError::Unavailable("JetStream not ready".into()));
        assert_eq!(
            chain(&store),
            "event store unavailable: JetStream not ready (has `chctl setup` run for this prefix?)"
        );
        let nats = StartError::Nats {
            url: "nats://127.0.0.1:1".into(),
            error: async_nats::ConnectError::with_source(
                async_nats::ConnectErrorKind::Io,
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            ),
        };
        let text = chain(&nats);
        assert!(
            text.starts_with("cannot connect to NATS at nats://127.0.0.1:1: "),
            "{text}"
        );
        assert_eq!(text.matches("refused").count(), 1, "{text}");
    }

    /// A worker whose JetStream wait ran out without a connection says NATS is unreachable,
    /// not that the stream may be missing; with a connection, it points at `chctl setup`.
    #[test]
    fn a_start_without_a_connection_says_nats_is_unreachable() {
        use async_nats::connection::State;
        let url = "nats://127.0.0.1:1";
        let unready = || StoreError::Unavailable("JetStream not ready: no answer".into());
        let text = |state: State, jetstream: bool| {
            chain(&StartError::not_ready(unready(), &state, jetstream, url))
        };
        for state in [State::Pending, State::Disconnected] {
            assert_eq!(
                text(state, true),
                "cannot reach NATS at nats://127.0.0.1:1 (tried for 10s); is a nats-server \
                 running there, and does it take the credentials and the TLS files \
                 (CH_NATS_CA_FILE, CH_NATS_CERT_FILE, CH_NATS_KEY_FILE), if any?"
            );
        }
        // With the cause an attempt of its own found (async-nats keeps none).
        let with_cause = StartError::NatsUnreachable {
            url: url.into(),
            waited: JETSTREAM_PATIENCE,
            cause: Some("IO error: Connection refused (os error 111)".into()),
        };
        assert!(
            chain(&with_cause).starts_with(
                "cannot reach NATS at nats://127.0.0.1:1 (tried for 10s): IO error: \
                 Connection refused (os error 111); is a nats-server"
            ),
            "{}",
            chain(&with_cause)
        );
        let found = text(State::Connected, true);
        assert!(
            found.ends_with("(has `chctl setup` run for this prefix?)"),
            "{found}"
        );
        // Connected to a server whose INFO says it has no JetStream: how to turn it on.
        let found = text(State::Connected, false);
        assert!(
            found.ends_with("has JetStream off (start it with `-js` or a `jetstream {}` block in its configuration)"),
            "{found}"
        );
    }
}

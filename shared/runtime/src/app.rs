//! What every worker starts with: configuration, a NATS connection, the event store, metrics.

use async_nats::jetstream;
use deadpool_postgres::Pool;
use std::time::Duration;
use thiserror::Error;

use crate::config::Config;
use crate::error::{DbError, StoreError};
use crate::eventstore::{wait_ready, EventStore};
use crate::metrics::Metrics;
use crate::pg;
use crate::service::{EndpointSpec, ServiceSpec};
use crate::subjects::Subjects;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Nats {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("{0} (has `chctl setup` run for this prefix?)")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A worker's connections, shared by its tasks.
#[derive(Clone)]
pub struct App {
    pub cfg: Config,
    pub subjects: Subjects,
    pub client: async_nats::Client,
    pub store: EventStore,
    pub metrics: Metrics,
    /// The worker's name, e.g. `cmd-portfolio`.
    pub worker: String,
}

impl App {
    /// Connects to NATS and opens the event stream.
    ///
    /// # Errors
    /// [`StartError`] saying what could not be reached.
    pub async fn start(cfg: Config, worker: &str) -> Result<App, StartError> {
        let subjects = Subjects::new(cfg.prefix.clone());
        let client = crate::connect_nats(&cfg.nats_url, &subjects.service_name(worker))
            .await
            .map_err(|source| StartError::Nats {
                url: cfg.nats_url.clone(),
                source,
            })?;
        wait_ready(&jetstream::new(client.clone()), Duration::from_secs(10)).await?;
        let store = EventStore::open(client.clone(), subjects.clone()).await?;
        Ok(App {
            cfg,
            subjects,
            client,
            store,
            metrics: Metrics::default(),
            worker: worker.to_owned(),
        })
    }

    /// A Postgres pool on the configured schema.
    ///
    /// # Errors
    /// [`DbError`] when the URL is invalid.
    pub fn pool(&self) -> Result<Pool, DbError> {
        pg::pool(
            &self.cfg.database_url,
            &self.cfg.db_schema,
            self.cfg.db_pool_size,
        )
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
            name: self.subjects.service_name(&self.worker),
            description: description.to_owned(),
            endpoints: endpoints
                .into_iter()
                .map(|(name, subject)| EndpointSpec {
                    name: crate::service::endpoint_name(name),
                    subject,
                })
                .collect(),
        }
    }
}

//! The request-reply harness shared by command, query and projector workers: a NATS micro
//! service (`nats micro ls`), one queue group per service, one span and one task per request,
//! graceful drain on shutdown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::service::ServiceExt;
use async_nats::Message;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, error, info, warn, Instrument};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Most requests one worker's service handles at once (all its endpoints together); further
/// ones wait in the client's subscription buffer, up to its pending limits, past which NATS
/// drops them as for any slow consumer (the clients time out and may re-send).
const MAX_IN_FLIGHT: usize = 1024;

/// The version every service reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The micro-service endpoint name of a subject suffix (`portfolio.update` ->
/// `portfolio_update`): endpoint names may not contain dots.
pub fn endpoint_name(suffix: &str) -> String {
    suffix.replace('.', "_")
}

/// The body of a request that takes no fields (the admin endpoints'): empty, or an empty JSON
/// object. Anything else is refused, as every endpoint refuses what it does not know: a
/// `{"dry_run": true}` must not reset a read model.
///
/// # Errors
/// `bad_request` naming what was sent.
pub fn takes_no_fields(body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Map<String, Value>>(body) {
        Ok(fields) => match fields.keys().next() {
            None => Ok(()),
            Some(key) => Err(ApiError::bad_request(format!(
                "unknown field `{key}`: this endpoint takes none (send an empty body or {{}})"
            ))),
        },
        Err(e) if e.classify() == serde_json::error::Category::Data => Err(ApiError::bad_request(
            "request body must be empty or a JSON object with no fields",
        )),
        Err(e) => Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
    }
}

/// `s` with its control characters (line breaks among them, and Unicode's line and paragraph
/// separators) escaped as Rust writes them (`\n`, `\u{1b}`), for a text log line.
fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Answers the requests of a service's endpoints.
pub trait Handler: Send + Sync + 'static {
    /// # Errors
    /// [`ApiError`], sent as an error reply with API.md's headers and body.
    fn handle(
        &self,
        endpoint: &str,
        msg: &Message,
    ) -> impl Future<Output = Result<Value, ApiError>> + Send;
}

/// One endpoint: its name in `nats micro info` and its subject.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub name: String,
    pub subject: String,
}

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Service name, also the queue group (e.g. `ch-cmd-portfolio`).
    pub name: String,
    pub description: String,
    pub endpoints: Vec<EndpointSpec>,
    /// The service's metadata in `nats micro info` (a worker's: `Config::service_metadata`).
    pub metadata: std::collections::HashMap<String, String>,
}

/// Runs `work` beside its worker's service task `svc` (started with the same `shutdown`):
/// should the service end first while the worker is not shutting down (it could not start,
/// or NATS refused its subscriptions), the work is stopped and the service's error returned,
/// rather than a worker running on without its stats and status endpoints, unseen. Should
/// this future be dropped (its task aborted), the service task is aborted too: no service
/// answers for a worker that is gone.
///
/// # Errors
/// The work's error, or the service's.
pub async fn alongside<E: Into<async_nats::Error>>(
    svc: tokio::task::JoinHandle<Result<(), async_nats::Error>>,
    work: impl Future<Output = Result<(), E>>,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let mut svc = AbortOnDropHandle::new(svc);
    tokio::pin!(work);
    let served = tokio::select! {
        done = &mut work => {
            shutdown.cancel();
            let _ = svc.await;
            return done.map_err(Into::into);
        }
        served = &mut svc => served,
    };
    let failure: async_nats::Error = match served {
        // A shutdown: the service drained before the work.
        Ok(Ok(())) if shutdown.is_cancelled() => return work.await.map_err(Into::into),
        Ok(Ok(())) => "the service ended by itself".into(),
        Ok(Err(e)) => e,
        Err(e) => e.into(),
    };
    error!(error = %failure, "the worker's service failed; stopping the worker");
    shutdown.cancel();
    let _ = work.await;
    Err(failure)
}

/// The two NATS connections a service runs on.
#[derive(Clone)]
pub struct Connections {
    /// The worker's connection: its work, and the replies sent once the service drains.
    pub client: async_nats::Client,
    /// The service's own connection: its endpoints' and `$SRV` subscriptions and its replies
    /// until it drains. At shutdown the whole connection is drained (the server is told to
    /// stop routing requests here, and what arrived by the client's next read is handed over),
    /// which async-nats offers for a connection but not for a service endpoint: an endpoint's
    /// `stop` drops at once what the queue group routed to it before the server took the
    /// unsubscribe. async-nats 0.51 closes a draining connection at its next read, not after
    /// the server's answer to the drain's ping, so a request routed in that last instant can
    /// still be lost (far fewer than with `stop`: see README). A drained connection closes,
    /// so the replies after that go out on `client`.
    pub intake: async_nats::Client,
}

/// How long a service waits for its own connection to come up (as a worker's start waits for
/// JetStream).
const INTAKE_PATIENCE: Duration = Duration::from_secs(10);

/// How long a draining service waits in all for its replies to be written and its drain to
/// end (NATS away): then it stops without them.
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

/// Serves `spec` until `shutdown` fires, then stops taking requests, answers those it was
/// handed already (queued for it, which no other replica will see), lets the ones in flight
/// finish, and returns.
///
/// # Errors
/// When its connection does not come up, or the service cannot be registered with NATS.
pub async fn serve<H: Handler>(
    conns: Connections,
    spec: ServiceSpec,
    handler: Arc<H>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let Connections { client, intake } = conns;
    // Connected, so that its server's INFO (`max_payload`) is known; one that does not come up
    // fails the service (and its worker) rather than leaving it registered nowhere.
    tokio::select! {
        flushed = tokio::time::timeout(INTAKE_PATIENCE, intake.flush()) => match flushed {
            Ok(done) => done?,
            Err(_) => {
                return Err(format!(
                    "the service's NATS connection did not come up within {} s",
                    INTAKE_PATIENCE.as_secs()
                )
                .into())
            }
        },
        () = shutdown.cancelled() => return Ok(()),
    }
    let stats_metrics = metrics.clone();
    let mut service = StopOnDrop(Some(
        intake
            .service_builder()
            .description(spec.description.clone())
            .metadata(spec.metadata.clone())
            .queue_group(spec.name.clone())
            .stats_handler(move |endpoint, _| stats_metrics.snapshot(&endpoint))
            .start(spec.name.clone(), VERSION)
            .await?,
    ));
    let tracker = TaskTracker::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let replies = Replies {
        client: client.clone(),
        draining: Arc::new(tokio::sync::RwLock::new(false)),
    };
    let mut loops = Vec::new();
    for ep in &spec.endpoints {
        let mut endpoint = service
            .get()
            .endpoint_builder()
            .name(ep.name.clone())
            .add(ep.subject.clone())
            .await?;
        let handler = handler.clone();
        let tracker = tracker.clone();
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        let name = ep.name.clone();
        let permits = permits.clone();
        let replies = replies.clone();
        // The server's limit as it was when the service started (a reconnect to a server
        // with a lower one is refused at publish, and logged).
        let max_payload = intake.server_info().max_payload;
        // Aborted with this task (a worker's task aborted): no endpoint serves on for it.
        loops.push(AbortOnDropHandle::new(tokio::spawn(async move {
            // Every request the server routed here is answered: the loop ends once the
            // drained connection has handed over the last of them.
            let mut drained = 0;
            while let Some(request) = endpoint.next().await {
                drained += u64::from(shutdown.is_cancelled());
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let span = tracing::info_span!(
                    "request",
                    endpoint = %name,
                    subject = %request.message.subject,
                    aggregate_id = tracing::field::Empty,
                    command_id = tracing::field::Empty,
                    stream_seq = tracing::field::Empty,
                );
                let (handler, metrics, name, replies) =
                    (handler.clone(), metrics.clone(), name.clone(), replies.clone());
                tracker.spawn(
                    async move {
                        respond(&*handler, &name, &metrics, max_payload, &replies, request).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            if drained > 0 {
                info!(endpoint = %name, requests = drained, "answered requests received while stopping");
            }
        })));
    }
    info!(service = %spec.name, endpoints = spec.endpoints.len(), "serving");
    shutdown.cancelled().await;
    // One bound for the whole drain, NATS away or not.
    let until = tokio::time::Instant::now() + DRAIN_PATIENCE;
    // Replies from now on go out on the worker's connection: the service's closes once drained.
    // Taken for writing, the flag waits for every reply already being handed to the service's
    // connection; those are written out (async-nats closes a draining connection without
    // writing what is still in its buffer) before the drain's unsubscribes are sent.
    {
        let mut draining = replies.draining.write().await;
        *draining = true;
        match tokio::time::timeout_at(until, intake.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not flush the service's replies"),
            Err(_) => warn!("the service's replies were not written out in time"),
        }
        if let Err(e) = intake.drain().await {
            warn!(error = %e, "could not drain the service's connection");
        }
    }
    let all = futures::future::join_all(loops.iter_mut());
    if tokio::time::timeout_at(until, all).await.is_err() {
        warn!(
            service = %spec.name,
            patience_s = DRAIN_PATIENCE.as_secs(),
            "NATS did not confirm the drain in time: stopped taking requests without it"
        );
    }
    drop(loops);
    tracker.close();
    tracker.wait().await;
    if let Some(service) = service.0.take() {
        let _ = service.stop().await;
    }
    // The last replies may still be in the client's buffer: out before the worker lets go of
    // its connection. Bounded (with NATS away, a flush waits for the reconnection), by the
    // drain's bound or a second, whichever is later: the handlers in flight may have used it up.
    let last = until.max(tokio::time::Instant::now() + Duration::from_secs(1));
    match tokio::time::timeout_at(last, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "could not flush the last replies"),
        Err(_) => warn!("the last replies were not written out in time (NATS away?)"),
    }
    info!(service = %spec.name, "stopped");
    Ok(())
}

/// Where a reply goes out: on the service's connection (which counts it in `$SRV.STATS`) until
/// the service drains, then on the worker's.
#[derive(Clone)]
struct Replies {
    client: async_nats::Client,
    /// Set when the service's connection starts draining; read for each reply while it is
    /// handed to a connection.
    draining: Arc<tokio::sync::RwLock<bool>>,
}

impl Replies {
    async fn send(
        &self,
        request: &async_nats::service::Request,
        body: Bytes,
        headers: Option<async_nats::HeaderMap>,
    ) -> Result<(), async_nats::PublishError> {
        let draining = self.draining.read().await;
        if !*draining {
            return match headers {
                None => request.respond(Ok(body)).await,
                Some(h) => request.respond_with_headers(Ok(body), h).await,
            };
        }
        let Some(reply) = request.message.reply.clone() else {
            return Err(async_nats::PublishError::with_source(
                async_nats::client::PublishErrorKind::InvalidSubject,
                "the request has no reply subject",
            ));
        };
        match headers {
            None => self.client.publish(reply, body).await,
            Some(h) => self.client.publish_with_headers(reply, h, body).await,
        }
    }
}

/// A service that stops when dropped: its PING, INFO and STATS handler is a task of its own,
/// which would answer on for a worker whose task was aborted.
struct StopOnDrop(Option<async_nats::service::Service>);

impl StopOnDrop {
    fn get(&self) -> &async_nats::service::Service {
        self.0.as_ref().expect("a running service")
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(service) = self.0.take() {
            // `stop` signals the endpoints and aborts the handler; it never waits.
            let _ = service.stop().now_or_never();
        }
    }
}

/// Handles one request and sends its reply (an error reply with the API's headers and body),
/// counting it in `metrics`.
async fn respond<H: Handler>(
    handler: &H,
    name: &str,
    metrics: &Metrics,
    max_payload: usize,
    replies: &Replies,
    request: async_nats::service::Request,
) {
    let started = Instant::now();
    // A handler that panics (a bug) is answered `internal` rather than left to time out.
    let result = AssertUnwindSafe(handler.handle(name, &request.message))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(ApiError::internal(format!(
                "the request's handler failed: {what}"
            )))
        });
    // A reply the server would not take (above its max_payload) is refused at publish, and
    // the client would wait for nothing: it is answered `bad_request`, naming its size.
    let result = result.and_then(|v| {
        let body = serde_json::to_vec(&v).expect("json serializes");
        if body.len() > max_payload {
            return Err(ApiError::bad_request(format!(
                "the reply would be {} bytes, more than the NATS server's max_payload of \
                 {max_payload} bytes: ask for less (a shorter period, a coarser interval)",
                body.len()
            )));
        }
        Ok(Bytes::from(body))
    });
    // Counted after the reply is sent: its latency includes the publish, as the worker's
    // figures (the benchmark's "in the worker") always have.
    let count = |result: &Result<Bytes, ApiError>| {
        metrics.request(
            name,
            started.elapsed(),
            result.as_ref().err().map(|e| e.code.as_ref()),
        );
    };
    match &result {
        Ok(_) => debug!(
            latency_us = started.elapsed().as_micros() as u64,
            "answered"
        ),
        // An error is for a bug (`internal`); a store or database away for a while, or a
        // read-your-writes wait that ran out of the client's own time, is a warning. The
        // message may quote the client's text: its line breaks and other control characters
        // escaped, so that it cannot forge lines in a text log.
        Err(e) => {
            let message = escape_controls(&e.message);
            match e.status {
                ..=499 => info!(code = %e.code, error = %message, "request refused"),
                500 => error!(code = %e.code, error = %message, "request failed"),
                _ => warn!(code = %e.code, error = %message, "request failed"),
            }
        }
    }
    // Published without a reply subject: handled (a command is executed, as NATS users expect
    // of a fire-and-forget publish), and there is no one to answer.
    if request.message.reply.is_none() {
        count(&result);
        metrics.no_reply(name);
        debug!("no reply subject: not answered");
        return;
    }
    let sent = match &result {
        Ok(body) => replies.send(&request, body.clone(), None).await,
        Err(e) => replies.send(&request, e.body(), Some(e.headers())).await,
    };
    count(&result);
    if let Err(e) = sent {
        warn!(error = %e, "could not send the reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_message_cannot_break_its_line() {
        assert_eq!(
            escape_controls("unknown op `x`\n2026 INFO forged\u{1b}[0m \"é\"\u{2028}"),
            "unknown op `x`\\n2026 INFO forged\\u{1b}[0m \"é\"\\u{2028}"
        );
    }

    /// Work that runs until `shutdown`, then says it saw it.
    async fn until(shutdown: CancellationToken) -> Result<(), async_nats::Error> {
        shutdown.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_service_that_fails_stops_its_worker_with_its_error() {
        let shutdown = CancellationToken::new();
        let svc = tokio::spawn(async { Err::<(), async_nats::Error>("no subscription".into()) });
        let r = alongside(svc, until(shutdown.clone()), shutdown.clone()).await;
        assert_eq!(r.unwrap_err().to_string(), "no subscription");
        assert!(shutdown.is_cancelled());
    }

    /// A service task that serves until `shutdown`.
    fn serving(
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), async_nats::Error>> {
        let s = shutdown.clone();
        tokio::spawn(async move {
            s.cancelled().await;
            Ok(())
        })
    }

    #[tokio::test]
    async fn a_shutdown_ends_both_without_an_error() {
        let shutdown = CancellationToken::new();
        let svc = serving(&shutdown);
        shutdown.cancel();
        assert!(alongside(svc, until(shutdown.clone()), shutdown)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn the_works_own_error_comes_back() {
        let shutdown = CancellationToken::new();
        let svc = serving(&shutdown);
        let work = async { Err::<(), async_nats::Error>("lost the stream".into()) };
        let r = alongside(svc, work, shutdown.clone()).await;
        assert_eq!(r.unwrap_err().to_string(), "lost the stream");
        assert!(shutdown.is_cancelled(), "the service is told to stop");
    }
}

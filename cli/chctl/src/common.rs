//! What the subcommands share: configuration, the NATS connection, requests and pings.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use async_nats::{Client, Request, RequestErrorKind};
use bytes::Bytes;
use ch_runtime::{Config, Subjects};
use futures::StreamExt;
use serde_json::Value;

/// Every worker binary, in start order; its service is `<prefix>-<worker>`.
pub const WORKERS: [&str; 9] = [
    "proj-portfolio",
    "proj-strategy",
    "query-portfolio",
    "query-strategy",
    "cmd-strategy",
    "cmd-portfolio",
    "cmd-market",
    "cmd-signal",
    "exit-triggers",
];

/// The read models, each with a projector worker `proj-<name>`.
pub const PROJECTIONS: [&str; 2] = ["portfolio", "strategy"];

/// The pid file `up --detach` writes in `run_dir`: the workers `down` stops.
pub fn pid_file(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("workers.pids")
}

/// Configuration of this invocation.
pub struct Ctx {
    pub cfg: Config,
    pub subjects: Subjects,
    pub run_dir: PathBuf,
    /// chctl set `RUST_LOG` itself (the caller had none): workers must not inherit it.
    pub log_default_set: bool,
}

impl Ctx {
    pub fn new(cfg: Config, run_dir: PathBuf, log_default_set: bool) -> Self {
        let subjects = Subjects::new(cfg.prefix.clone());
        Ctx {
            cfg,
            subjects,
            run_dir,
            log_default_set,
        }
    }

    pub fn pid_file(&self) -> PathBuf {
        pid_file(&self.run_dir)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.run_dir.join("logs")
    }

    /// `ch-cmd-portfolio` for worker `cmd-portfolio`.
    pub fn service(&self, worker: &str) -> String {
        self.subjects.service_name(worker)
    }

    /// A full subject. A command or query name gets the prefix and its kind
    /// (`portfolio.update` is `<prefix>.cmd.portfolio.update`, `strategy.list` is
    /// `<prefix>.query.strategy.list`), a subject beginning with a kind of the prefix's
    /// subjects just the prefix (`admin.projector.portfolio.status`); anything else is a full
    /// subject, kept as is (`$SRV.PING`, another prefix's `desk.query.strategy.list`).
    pub fn subject(&self, s: &str) -> String {
        const KINDS: [&str; 6] = ["cmd", "query", "admin", "progress", "events", "dlq"];
        let p = self.subjects.prefix();
        if ch_domain::request::Endpoint::from_name(s).is_some() {
            self.subjects.command(s)
        } else if ch_readmodel::workers::Query::from_name(s).is_some() {
            self.subjects.query(s)
        } else if KINDS.contains(&s.split('.').next().unwrap_or_default()) {
            format!("{p}.{s}")
        } else {
            s.to_owned()
        }
    }

    /// Connects to NATS, retrying for a few seconds (a server may just be starting).
    pub async fn connect(&self) -> Result<Client> {
        let url = &self.cfg.nats_url;
        // A TLS file that is not there will not appear by retrying: said at once.
        self.cfg.nats_tls.check()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut delay = Duration::from_millis(100);
        loop {
            // Its own text only (it holds its cause's already), naming the variable.
            let (options, servers) = ch_runtime::nats_options(&self.cfg.nats_tls, url)
                .map_err(|e| anyhow!("CH_NATS_URL={}: {e}", redact(url)))?;
            let attempt = options
                .name("chctl")
                .connection_timeout(Duration::from_secs(2))
                .connect(servers)
                .await;
            match attempt {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(anyhow!(
                        "cannot reach NATS at {}: {e}\n(start the project's server with \
                         `scripts/nats.sh start`, or point CH_NATS_URL at a running one, with \
                         the credentials and TLS files it takes)",
                        redact(url)
                    ))
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// An error reply of API.md.
#[derive(Debug, Clone)]
pub struct ApiErr {
    pub status: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

/// A reply: its body, and the error when it carries `Nats-Service-Error-Code`.
pub struct Reply {
    pub payload: Bytes,
    pub error: Option<ApiErr>,
}

impl Reply {
    fn from_message(msg: async_nats::Message) -> Self {
        let header = |k: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(k))
                .map(|v| v.as_str().to_owned())
        };
        let error = header("Nats-Service-Error-Code").map(|status| {
            let body: Option<Value> = serde_json::from_slice(&msg.payload).ok();
            let field = |k: &str| {
                body.as_ref()
                    .and_then(|b| b["error"][k].as_str())
                    .map(str::to_owned)
            };
            ApiErr {
                code: field("code").unwrap_or_else(|| "error".into()),
                message: field("message")
                    .or_else(|| header("Nats-Service-Error"))
                    .unwrap_or_default(),
                status,
            }
        });
        Reply {
            payload: msg.payload,
            error,
        }
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.payload).context("the reply is not JSON")
    }

    /// The success body, or the API error.
    pub fn result(self) -> Result<std::result::Result<Value, ApiErr>> {
        match self.error {
            Some(e) => Ok(Err(e)),
            None => self.json().map(Ok),
        }
    }
}

/// Sends a request and waits at most `timeout` for the reply.
pub async fn request(
    client: &Client,
    subject: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Reply> {
    let req = Request::new().payload(body).timeout(Some(timeout));
    match client.send_request(subject.to_owned(), req).await {
        Ok(msg) => Ok(Reply::from_message(msg)),
        Err(e) => Err(match e.kind() {
            RequestErrorKind::NoResponders => anyhow!(
                "no service answers {subject} (is its worker running? `chctl up` starts them)"
            ),
            RequestErrorKind::TimedOut => anyhow!("no reply on {subject} within {timeout:?}"),
            _ => anyhow!("request on {subject}: {e}"),
        }),
    }
}

/// Sends a JSON request and returns the success body or the API error.
pub async fn call(
    client: &Client,
    subject: &str,
    body: &Value,
) -> Result<std::result::Result<Value, ApiErr>> {
    let bytes = Bytes::from(serde_json::to_vec(body)?);
    request(client, subject, bytes, Duration::from_secs(15))
        .await?
        .result()
}

/// A projector's status reply (`last_seq`, `stream_last_seq`, `lag_events`).
pub async fn projector_status(ctx: &Ctx, client: &Client, projection: &str) -> Result<Value> {
    let subject = ctx.subjects.projector_status(projection);
    match request(client, &subject, Bytes::new(), Duration::from_secs(2))
        .await?
        .result()?
    {
        Ok(v) => Ok(v),
        Err(e) => Err(anyhow!("{subject}: {e}")),
    }
}

/// `$SRV.PING.<service>`: the first instance's answer, if any within `timeout`.
pub async fn ping(client: &Client, service: &str, timeout: Duration) -> Option<Value> {
    let req = Request::new().payload(Bytes::new()).timeout(Some(timeout));
    let msg = client
        .send_request(format!("$SRV.PING.{service}"), req)
        .await
        .ok()?;
    serde_json::from_slice(&msg.payload)
        .ok()
        .or(Some(Value::Null))
}

/// Retries pings until the service answers or `deadline` passes; the time it took.
pub async fn wait_ping(
    client: &Client,
    service: &str,
    started: Instant,
    deadline: Instant,
) -> Option<Duration> {
    let mut delay = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if ping(client, service, left.min(Duration::from_millis(500)))
            .await
            .is_some()
        {
            return Some(started.elapsed());
        }
        // No responders comes back at once: back off a little before asking again.
        tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A JSON field shown as text: strings as they are, numbers and booleans printed, `-` if absent.
pub fn text(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub use ch_runtime::config::redact;

/// How long the first instance has to answer a `$SRV` request, and each further one after
/// the one before.
const FIRST_STATS_REPLY: Duration = Duration::from_secs(2);
const NEXT_STATS_REPLY: Duration = Duration::from_millis(100);

/// Every instance's reply to `$SRV.STATS.<service>`.
pub async fn stats(client: &Client, service: &str) -> Result<Vec<Value>, async_nats::Error> {
    every_reply(client, "STATS", service).await
}

/// Every instance's reply to `$SRV.INFO.<service>` (its endpoints and metadata).
pub async fn info(client: &Client, service: &str) -> Result<Vec<Value>, async_nats::Error> {
    every_reply(client, "INFO", service).await
}

/// Every instance's reply to `$SRV.<verb>.<service>`.
async fn every_reply(
    client: &Client,
    verb: &str,
    service: &str,
) -> Result<Vec<Value>, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("$SRV.{verb}.{service}"), inbox, Bytes::new())
        .await?;
    client.flush().await?;
    let mut replies = Vec::new();
    let mut wait = FIRST_STATS_REPLY;
    while let Ok(Some(msg)) = tokio::time::timeout(wait, sub.next()).await {
        if let Ok(v) = serde_json::from_slice(&msg.payload) {
            replies.push(v);
        }
        wait = NEXT_STATS_REPLY;
    }
    Ok(replies)
}

/// JetStream's answer that the stream does not exist; anything else (no JetStream, no answer)
/// is no reason to run `chctl setup`.
pub fn is_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(e.kind(), GetStreamErrorKind::JetStream(j)
        if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx::new(Config::default(), ".run".into(), false)
    }

    #[test]
    fn subjects_get_the_prefix_once() {
        let c = ctx();
        assert_eq!(c.subject("portfolio.update"), "ch.cmd.portfolio.update");
        assert_eq!(c.subject("strategy.list"), "ch.query.strategy.list");
        assert_eq!(
            c.subject("strategy.leaderboard"),
            "ch.query.strategy.leaderboard"
        );
        assert_eq!(
            c.subject("admin.projector.portfolio.status"),
            "ch.admin.projector.portfolio.status"
        );
        assert_eq!(c.subject("cmd.portfolio.update"), "ch.cmd.portfolio.update");
        assert_eq!(
            c.subject("ch.cmd.portfolio.update"),
            "ch.cmd.portfolio.update"
        );
        assert_eq!(c.subject("$SRV.PING"), "$SRV.PING");
        assert_eq!(c.subject("_INBOX.x"), "_INBOX.x");
        // Another prefix's full subject is not this prefix's.
        assert_eq!(c.subject("chk.cmd.x"), "chk.cmd.x");
        assert_eq!(
            c.subject("Desk-2.query.portfolio.performance"),
            "Desk-2.query.portfolio.performance"
        );
        assert_eq!(c.subject("progress.portfolio"), "ch.progress.portfolio");
    }
}

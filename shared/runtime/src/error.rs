//! Typed errors of the plumbing, and the one place where every error becomes an API reply
//! (API.md's table: status, code, message).

use std::borrow::Cow;

use async_nats::HeaderMap;
use bytes::Bytes;
use ch_domain::DomainError;
use serde_json::json;
use thiserror::Error;

/// The longest error message sent, in bytes: messages quote the request (an unknown field's
/// name, a value), and a reply that quotes a large one twice (header and body) would exceed
/// the server's max payload and never be sent.
pub const MAX_MESSAGE: usize = 1024;

/// `message` cut to [`MAX_MESSAGE`] bytes (at a character boundary), marked where cut.
fn clip(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" [...]");
    }
    message
}

/// An error reply: `Nats-Service-Error(-Code)` headers and `{"error": {...}}` body.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code} ({status}): {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: Cow<'static, str>,
    pub message: String,
    /// The database session it was read on ended, or none could be opened (not on the wire):
    /// a read is worth asking again on a new session. Not when the pool had none free.
    pub session_lost: bool,
}

impl ApiError {
    pub fn new(
        status: u16,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: clip(message.into()),
            session_lost: false,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "conflict", message)
    }
    /// A `command_id` already used for another command (another aggregate or kind).
    pub fn command_id_reused(message: impl Into<String>) -> Self {
        Self::new(409, "command_id_reused", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "unavailable", message)
    }
    pub fn stale(message: impl Into<String>) -> Self {
        Self::new(504, "stale", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v =
            json!({"error": {"code": self.code, "status": self.status, "message": self.message}});
        Bytes::from(serde_json::to_vec(&v).expect("json serializes"))
    }

    /// The NATS service error headers.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        // Header values must be one line.
        let msg: String = self
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        h.insert("Nats-Service-Error", msg.as_str());
        h.insert("Nats-Service-Error-Code", self.status.to_string().as_str());
        h.insert("Content-Type", "application/json");
        h
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

/// A stored envelope that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("undecodable event: {0}")]
pub struct DecodeError(pub String);

/// Failures of the JetStream event store, classified by what the caller must do.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The subject moved on since the state was loaded: reload and decide again.
    #[error("wrong last subject sequence")]
    Conflict,
    /// NATS or JetStream is unreachable or timed out: retry later.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The event is larger than the server or the stream takes: it never will be stored.
    #[error("the event is too large to store: {0}")]
    TooLarge(String),
    /// A stored event could not be read.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Something this code did not expect (a bug or a misconfigured stream).
    #[error("event store: {0}")]
    Other(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ApiError::conflict("the aggregate changed concurrently"),
            StoreError::Unavailable(m) => ApiError::unavailable(m),
            e @ StoreError::TooLarge(_) => ApiError::bad_request(format!(
                "{e}: the request makes an event above the server's max_payload; make it smaller"
            )),
            StoreError::Decode(d) => ApiError::internal(d.to_string()),
            StoreError::Other(m) => ApiError::internal(m),
        }
    }
}

/// Postgres errors on the read side. `Query` says the server's message in its text (see
/// [`pg_text`]) and so does not return the error again as its `source()`.
#[derive(Debug, Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// No session of the worker's pool came free in time: the worker is overloaded, the
    /// database need not be (503 all the same: try again later).
    #[error("{BUSY}: {0}")]
    Busy(String),
    #[error("database: {}", pg_text(.0))]
    Query(tokio_postgres::Error),
    /// The database holds what this worker must not use as configured (another stream's read
    /// models): a setting to change, not a server to wait for.
    #[error("{0}")]
    Refused(String),
}

/// How the message of a [`DbError::Busy`] reply begins.
pub const BUSY: &str = "the worker is busy";

impl DbError {
    /// Whether the database is at fault rather than the request (see [`unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unavailable(_) | DbError::Busy(_) => true,
            DbError::Query(q) => unavailable(q),
            DbError::Refused(_) => false,
        }
    }
}

/// Whether the database is at fault rather than the statement, so that the same statement may
/// succeed on another session: the session ended or none could be had (a restart, a failover,
/// a terminated backend, too many connections), or the error is not the server's.
pub fn unavailable(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_none_or(|c| {
            matches!(&c.code()[..2], "08" | "53") || matches!(c.code(), "57P01" | "57P02" | "57P03")
        })
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Query(e)
    }
}

/// A Postgres error with what the server said: `tokio_postgres::Error`'s own text names only
/// its kind ("db error").
pub fn pg_text(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{e}: {} (SQLSTATE {})", db.message(), db.code().code()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            // What the server (or the socket) said, not only "error connecting to server".
            deadpool_postgres::PoolError::Backend(e) => DbError::Unavailable(pg_text(&e)),
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                DbError::Busy(
                    "every database session of its pool stayed in use past the pool's wait".into(),
                )
            }
            e => DbError::Unavailable(e.to_string()),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            ApiError {
                session_lost: !matches!(e, DbError::Busy(_)),
                ..ApiError::unavailable(e.to_string())
            }
        } else {
            ApiError::internal(e.to_string())
        }
    }
}

//! Why the domain refuses a command. Each variant maps to one row of API.md's error table.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    /// 400: malformed or invalid input (field named in the message).
    #[error("{0}")]
    BadRequest(String),
    /// 404: the aggregate does not exist.
    #[error("{0}")]
    NotFound(String),
    /// 409 `already_exists`: create of an existing id.
    #[error("{0}")]
    AlreadyExists(String),
    /// 409 `conflict`: `expected_version` mismatch.
    #[error("{0}")]
    Conflict(String),
    /// 422: a valid command the aggregate refuses; `code` is e.g. `insufficient_funds`,
    /// `strategy_deleted`, `portfolio_closed`, `position_not_flat`.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
}

impl DomainError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        DomainError::BadRequest(msg.into())
    }

    pub fn refused(code: &'static str, msg: impl Into<String>) -> Self {
        DomainError::Refused {
            code,
            message: msg.into(),
        }
    }

    /// The API error code (`bad_request`, `not_found`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::BadRequest(_) => "bad_request",
            DomainError::NotFound(_) => "not_found",
            DomainError::AlreadyExists(_) => "already_exists",
            DomainError::Conflict(_) => "conflict",
            DomainError::Refused { code, .. } => code,
        }
    }

    /// The HTTP-like status number of API.md.
    pub fn status(&self) -> u16 {
        match self {
            DomainError::BadRequest(_) => 400,
            DomainError::NotFound(_) => 404,
            DomainError::AlreadyExists(_) | DomainError::Conflict(_) => 409,
            DomainError::Refused { .. } => 422,
        }
    }
}

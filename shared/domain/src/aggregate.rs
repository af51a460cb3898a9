//! The shape every aggregate shares: `decide` (pure, may refuse) and `apply` (pure, infallible).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{DomainError, Event};

/// The three kinds of aggregate; each is one subject `<prefix>.events.<type>.<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateType {
    Strategy,
    Portfolio,
    Market,
}

impl AggregateType {
    /// The subject token: `strategy`, `portfolio` or `market`.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::Strategy => "strategy",
            AggregateType::Portfolio => "portfolio",
            AggregateType::Market => "market",
        }
    }

    /// Parses a subject token.
    pub fn parse(token: &str) -> Option<Self> {
        match token {
            "strategy" => Some(AggregateType::Strategy),
            "portfolio" => Some(AggregateType::Portfolio),
            "market" => Some(AggregateType::Market),
            _ => None,
        }
    }
}

/// Facts from outside the aggregate that a decision may need, gathered by the caller before
/// `decide` is called: the clock and fresh ids are facts too.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Business time of the command (`at` in the request, or `now`).
    pub at: DateTime<Utc>,
    /// The wall clock when the command was received: the future-skew check's reference (for a
    /// command without `at`, its time as defaulted: the client sent none to refuse).
    pub now: DateTime<Utc>,
    /// A fresh id the decision may use (e.g. a `trade_id`), deterministic in tests.
    pub new_id: Uuid,
}

/// An event-sourced aggregate: a state folded from its own events.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    const TYPE: AggregateType;
    /// What the aggregate is asked to do.
    type Command: Send + Sync;
    /// Outside facts fetched before deciding (other aggregates' states, marks).
    type Facts: Send + Sync;

    /// Number of events applied so far (0 = does not exist).
    fn version(&self) -> u64;

    /// Business time of the last applied event, if the aggregate keeps its time monotonic
    /// (strategies and portfolios do, markets do not). A command without `at` takes
    /// `max(now, last_at)`.
    fn last_at(&self) -> Option<DateTime<Utc>> {
        None
    }

    /// Folds one event that this aggregate emitted earlier. Never fails; unknown or foreign
    /// events are ignored. Must increment the version.
    fn apply(&mut self, event: &Event, at: DateTime<Utc>);

    /// Decides what happens. Returns the events to append (in v1 always exactly one) or a
    /// refusal, in which case nothing is stored.
    ///
    /// # Errors
    /// [`DomainError`] when the command is invalid for this state.
    fn decide(
        &self,
        command: &Self::Command,
        facts: &Self::Facts,
        ctx: &Ctx,
    ) -> Result<Vec<Event>, DomainError>;
}

/// How far a command's business time `at` may lie after the wall clock `now`, in seconds.
pub const MAX_FUTURE_SKEW_SECS: i64 = 5;

/// `at` may not be more than [`MAX_FUTURE_SKEW_SECS`] after `now` (every aggregate).
///
/// # Errors
/// [`DomainError::BadRequest`] naming `at`.
pub fn check_not_future(ctx: &Ctx) -> Result<(), DomainError> {
    if ctx.at > ctx.now + chrono::TimeDelta::seconds(MAX_FUTURE_SKEW_SECS) {
        return Err(DomainError::bad_request(format!(
            "at: {} is more than {MAX_FUTURE_SKEW_SECS} s in the future (now is {})",
            ctx.at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ctx.now.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        )));
    }
    Ok(())
}

/// The time rule of strategies and portfolios (API.md "Conventions"): `at` never goes back
/// before the aggregate's last event and is never more than [`MAX_FUTURE_SKEW_SECS`] after
/// `now`.
///
/// # Errors
/// [`DomainError::BadRequest`] naming `at`.
pub fn check_monotonic_time(last_at: Option<DateTime<Utc>>, ctx: &Ctx) -> Result<(), DomainError> {
    if let Some(last) = last_at {
        if ctx.at < last {
            return Err(DomainError::bad_request(format!(
                "at: {} is before the aggregate's last event at {}",
                ctx.at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                last.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            )));
        }
    }
    check_not_future(ctx)
}

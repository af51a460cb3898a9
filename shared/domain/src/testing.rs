//! A tiny given / when / then harness for aggregates, in the spirit of cqrs-es' `TestFramework`:
//!
//! ```ignore
//! given::<PortfolioState>(vec![opened(), deposited("100")])
//!     .with_facts(facts)
//!     .when(PortfolioCommand::Withdraw { amount: dec("500") })
//!     .then_expect_error("insufficient_funds");
//! ```
//!
//! The `given` events are applied at [`t0`]; the command runs with a fixed [`Ctx`]: `at` and
//! `now` one minute after `t0`, and `new_id` = [`NEW_ID`].

use std::fmt::Debug;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::event::TradeSignalRejected;
use crate::{Aggregate, Ctx, DomainError, Event};

/// The fixed id a decision gets as `ctx.new_id`.
pub const NEW_ID: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);

/// When the `given` events happened: 2026-01-01T00:00:00Z.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// The fixed context: `at = now = t0 + 60 s`.
pub fn ctx() -> Ctx {
    let now = t0() + TimeDelta::seconds(60);
    Ctx {
        at: now,
        now,
        new_id: NEW_ID,
    }
}

/// A decimal from a literal.
pub fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub struct Given<A: Aggregate> {
    state: A,
    facts: A::Facts,
    ctx: Ctx,
}

/// Starts a scenario from the aggregate's past events.
pub fn given<A: Aggregate>(events: Vec<Event>) -> Given<A>
where
    A::Facts: Default,
{
    let mut state = A::default();
    for e in &events {
        state.apply(e, t0());
    }
    Given {
        state,
        facts: A::Facts::default(),
        ctx: ctx(),
    }
}

impl<A: Aggregate> Given<A> {
    pub fn with_facts(mut self, facts: A::Facts) -> Self {
        self.facts = facts;
        self
    }

    /// Sets the command's business time (`now` unchanged).
    pub fn at(mut self, at: DateTime<Utc>) -> Self {
        self.ctx.at = at;
        self
    }

    /// Sets the command's business time relative to `now`.
    pub fn at_now_plus(mut self, delta: TimeDelta) -> Self {
        self.ctx.at = self.ctx.now + delta;
        self
    }

    pub fn state(&self) -> &A {
        &self.state
    }

    pub fn when(self, command: A::Command) -> Then<A> {
        let result = self.state.decide(&command, &self.facts, &self.ctx);
        Then {
            state: self.state,
            result,
            ctx: self.ctx,
        }
    }
}

pub struct Then<A: Aggregate> {
    state: A,
    result: Result<Vec<Event>, DomainError>,
    ctx: Ctx,
}

impl<A: Aggregate + Debug> Then<A> {
    /// The decided events; panics on an error.
    pub fn events(self) -> Vec<Event> {
        match self.result {
            Ok(e) => e,
            Err(e) => panic!("expected events, got error {e:?}"),
        }
    }

    /// Asserts the decided events and returns the state after applying them.
    pub fn then_expect_events(self, expected: Vec<Event>) -> A {
        let (mut state, at) = (self.state.clone(), self.ctx.at);
        let events = self.events();
        assert_eq!(events, expected);
        for e in &events {
            state.apply(e, at);
        }
        state
    }

    /// The state after applying the decided events (whatever they are).
    pub fn then_state(self) -> A {
        let (mut state, at) = (self.state.clone(), self.ctx.at);
        for e in &self.events() {
            state.apply(e, at);
        }
        state
    }

    /// Asserts a refusal with this API code (`bad_request`, `insufficient_funds`, ...).
    pub fn then_expect_error(self, code: &str) -> DomainError {
        match self.result {
            Ok(e) => panic!("expected error {code}, got events {e:?}"),
            Err(e) => {
                assert_eq!(e.code(), code, "{e:?}");
                e
            }
        }
    }

    /// Asserts a refusal with exactly this message.
    pub fn then_expect_error_message(self, message: &str) -> DomainError {
        match self.result {
            Ok(e) => panic!("expected error {message:?}, got events {e:?}"),
            Err(e) => {
                assert_eq!(e.to_string(), message, "{e:?}");
                e
            }
        }
    }

    /// Asserts one stored `TradeSignalRejected` with this reason.
    pub fn then_expect_rejection(self, reason: &str) -> TradeSignalRejected {
        let events = self.events();
        match events.as_slice() {
            [Event::TradeSignalRejected(r)] => {
                assert_eq!(r.reason, reason, "{r:?}");
                r.clone()
            }
            other => panic!("expected a {reason} rejection, got {other:?}"),
        }
    }
}

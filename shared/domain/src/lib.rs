//! CipherHorizon's pure domain.
//!
//! Everything here is deterministic and free of I/O: no clock, no randomness, no network, no
//! database. Outside facts (the current time, a fresh id, a strategy's risk profile, market
//! marks) are fetched by the caller and passed in. `decide` holds every business rule; `apply`
//! only folds an event that was already decided and cannot fail.

pub mod aggregate;
pub mod analytics;
pub mod error;
pub mod event;
pub mod exits;
pub mod ids;
pub mod market;
pub mod money;
pub mod portfolio;
pub mod request;
pub mod strategy;

#[cfg(test)]
mod testing;

pub use aggregate::{Aggregate, AggregateType, Ctx};
pub use error::DomainError;
pub use event::Event;

//! The Market aggregate, one per symbol: its latest price by business time.
//!
//! Prices may arrive in any time order (backfills), so there is no monotonic time rule; only a
//! future `at` (more than 5 s after `now`) is refused.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::aggregate::check_not_future;
use crate::event::MarketPriceRecorded;
use crate::ids::validate_symbol;
use crate::money::validate_amount;
use crate::{Aggregate, AggregateType, Ctx, DomainError, Event};

#[derive(Debug, Clone, PartialEq)]
pub enum MarketCommand {
    RecordPrice { symbol: String, price: Decimal },
}

/// A symbol's market, folded from its events. `version == 0` means no price yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MarketState {
    pub version: u64,
    pub symbol: String,
    /// The price with the latest business time (ties: the later event).
    pub price: Option<Decimal>,
    pub price_at: Option<DateTime<Utc>>,
}

impl Aggregate for MarketState {
    const TYPE: AggregateType = AggregateType::Market;
    type Command = MarketCommand;
    type Facts = ();

    fn version(&self) -> u64 {
        self.version
    }

    fn apply(&mut self, event: &Event, at: DateTime<Utc>) {
        self.version += 1;
        if let Event::MarketPriceRecorded(e) = event {
            self.symbol.clone_from(&e.symbol);
            if self.price_at.is_none_or(|t| at >= t) {
                self.price = Some(e.price);
                self.price_at = Some(at);
            }
        }
    }

    fn decide(
        &self,
        command: &MarketCommand,
        _facts: &(),
        ctx: &Ctx,
    ) -> Result<Vec<Event>, DomainError> {
        let MarketCommand::RecordPrice { symbol, price } = command;
        validate_symbol("symbol", symbol)?;
        validate_amount("price", *price)?;
        check_not_future(ctx)?;
        Ok(vec![Event::MarketPriceRecorded(MarketPriceRecorded {
            symbol: symbol.clone(),
            price: price.normalize(),
        })])
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono::TimeDelta;

    use super::*;
    use crate::testing::{given, t0};

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn rec(price: &str) -> MarketCommand {
        MarketCommand::RecordPrice {
            symbol: "BTC-USDT".into(),
            price: d(price),
        }
    }

    fn recorded(price: &str) -> Event {
        Event::MarketPriceRecorded(MarketPriceRecorded {
            symbol: "BTC-USDT".into(),
            price: d(price),
        })
    }

    #[test]
    fn records_a_normalized_price() {
        given::<MarketState>(vec![])
            .when(rec("20000.500"))
            .then_expect_events(vec![recorded("20000.5")]);
    }

    #[test]
    fn price_must_be_positive_with_at_most_8_places() {
        given::<MarketState>(vec![])
            .when(rec("0"))
            .then_expect_error_message("price: must be > 0");
        given::<MarketState>(vec![])
            .when(rec("-1"))
            .then_expect_error("bad_request");
        given::<MarketState>(vec![])
            .when(rec("1.000000001"))
            .then_expect_error_message("price: at most 8 decimal places");
        given::<MarketState>(vec![])
            .when(MarketCommand::RecordPrice {
                symbol: "BTC.USDT".into(),
                price: d("1"),
            })
            .then_expect_error("bad_request");
    }

    #[test]
    fn backfills_allowed_but_not_the_future() {
        // Last event at t0 + 60 s: an older `at` is a backfill, accepted.
        given::<MarketState>(vec![recorded("1")])
            .at(t0() - TimeDelta::days(30))
            .when(rec("2"))
            .then_expect_events(vec![recorded("2")]);
        given::<MarketState>(vec![])
            .at_now_plus(TimeDelta::seconds(5))
            .when(rec("2"))
            .then_expect_events(vec![recorded("2")]);
        given::<MarketState>(vec![])
            .at_now_plus(TimeDelta::seconds(6))
            .when(rec("2"))
            .then_expect_error("bad_request");
    }

    #[test]
    fn apply_keeps_the_latest_by_business_time() {
        let mut m = MarketState::default();
        m.apply(&recorded("10"), t0());
        m.apply(&recorded("9"), t0() - TimeDelta::seconds(1)); // backfill: older
        assert_eq!(
            (m.price, m.price_at, m.version),
            (Some(d("10")), Some(t0()), 2)
        );
        m.apply(&recorded("11"), t0()); // tie: the later event wins
        assert_eq!(m.price, Some(d("11")));
        m.apply(&recorded("12"), t0() + TimeDelta::seconds(1));
        assert_eq!(
            (m.price, m.price_at, m.symbol.as_str()),
            (
                Some(d("12")),
                Some(t0() + TimeDelta::seconds(1)),
                "BTC-USDT"
            )
        );
    }
}

//! The events of the event store. Serialized adjacently tagged, so an `Event` becomes
//! `{"event_type": "FundsDeposited", "payload": {...}}`, which the envelope flattens.
//!
//! Every `Decimal` in an event is normalized (`1.50` is stored as `"1.5"`) and encoded as a
//! JSON string. Schema changes must stay backward compatible (add optional fields) or bump
//! [`SCHEMA_VERSION`].

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::strategy::{RiskProfile, StrategyRule};
use crate::AggregateType;

/// Schema version written in `Ch-Schema-Version` and the envelope.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum Event {
    StrategyCreated(StrategyCreated),
    StrategyUpdated(StrategyUpdated),
    StrategyDeleted(StrategyDeleted),
    PortfolioOpened(PortfolioOpened),
    FundsDeposited(FundsDeposited),
    FundsWithdrawn(FundsWithdrawn),
    PortfolioRenamed(PortfolioRenamed),
    StrategyAttached(StrategyAttached),
    StrategyDetached(StrategyDetached),
    PortfolioClosed(PortfolioClosed),
    TradeExecuted(TradeExecuted),
    TradeSignalRejected(TradeSignalRejected),
    MarketPriceRecorded(MarketPriceRecorded),
}

impl Event {
    /// The `event_type` name (`Ch-Event-Type` header).
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::StrategyCreated(_) => "StrategyCreated",
            Event::StrategyUpdated(_) => "StrategyUpdated",
            Event::StrategyDeleted(_) => "StrategyDeleted",
            Event::PortfolioOpened(_) => "PortfolioOpened",
            Event::FundsDeposited(_) => "FundsDeposited",
            Event::FundsWithdrawn(_) => "FundsWithdrawn",
            Event::PortfolioRenamed(_) => "PortfolioRenamed",
            Event::StrategyAttached(_) => "StrategyAttached",
            Event::StrategyDetached(_) => "StrategyDetached",
            Event::PortfolioClosed(_) => "PortfolioClosed",
            Event::TradeExecuted(_) => "TradeExecuted",
            Event::TradeSignalRejected(_) => "TradeSignalRejected",
            Event::MarketPriceRecorded(_) => "MarketPriceRecorded",
        }
    }

    /// The aggregate type whose subject carries this event.
    pub fn aggregate_type(&self) -> AggregateType {
        match self {
            Event::StrategyCreated(_) | Event::StrategyUpdated(_) | Event::StrategyDeleted(_) => {
                AggregateType::Strategy
            }
            Event::MarketPriceRecorded(_) => AggregateType::Market,
            _ => AggregateType::Portfolio,
        }
    }

    /// The id of the aggregate this event belongs to.
    pub fn aggregate_id(&self) -> &str {
        match self {
            Event::StrategyCreated(e) => &e.strategy_id,
            Event::StrategyUpdated(e) => &e.strategy_id,
            Event::StrategyDeleted(e) => &e.strategy_id,
            Event::PortfolioOpened(e) => &e.portfolio_id,
            Event::FundsDeposited(e) => &e.portfolio_id,
            Event::FundsWithdrawn(e) => &e.portfolio_id,
            Event::PortfolioRenamed(e) => &e.portfolio_id,
            Event::StrategyAttached(e) => &e.portfolio_id,
            Event::StrategyDetached(e) => &e.portfolio_id,
            Event::PortfolioClosed(e) => &e.portfolio_id,
            Event::TradeExecuted(e) => &e.portfolio_id,
            Event::TradeSignalRejected(e) => &e.portfolio_id,
            Event::MarketPriceRecorded(e) => &e.symbol,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyCreated {
    pub strategy_id: String,
    pub user_id: String,
    pub name: String,
    pub rules: Vec<StrategyRule>,
    pub risk_profile: RiskProfile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyUpdated {
    pub strategy_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<StrategyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_profile: Option<RiskProfile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyDeleted {
    pub strategy_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortfolioOpened {
    pub portfolio_id: String,
    pub user_id: String,
    pub name: String,
    pub quote_currency: String,
    pub fee_rate: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FundsDeposited {
    pub portfolio_id: String,
    pub amount: Decimal,
    pub cash_after: Decimal,
    /// The portfolio's equity just before the flow (positions at the marks known when it was
    /// decided, at their average entry price without one). The drawdown halt's high-water mark
    /// moves in proportion to it, so that a flow is never a gain or a loss to the halt. Absent
    /// from events stored before it was added, which moved the mark by the amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equity_before: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FundsWithdrawn {
    pub portfolio_id: String,
    pub amount: Decimal,
    pub cash_after: Decimal,
    /// The portfolio's equity just before the flow (positions at the marks known when it was
    /// decided, at their average entry price without one). The drawdown halt's high-water mark
    /// moves in proportion to it, so that a flow is never a gain or a loss to the halt. Absent
    /// from events stored before it was added, which moved the mark by the amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equity_before: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortfolioRenamed {
    pub portfolio_id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyAttached {
    pub portfolio_id: String,
    pub strategy_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyDetached {
    pub portfolio_id: String,
    pub strategy_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortfolioClosed {
    pub portfolio_id: String,
}

/// An accepted signal. Carries the position's state after the fill so that projectors never
/// re-implement the accounting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TradeExecuted {
    pub portfolio_id: String,
    pub strategy_id: String,
    pub trade_id: Uuid,
    pub symbol: String,
    pub side: Side,
    pub quantity: Decimal,
    pub price: Decimal,
    pub fee: Decimal,
    /// `n - fee - released` for a sell, 0 for a buy.
    pub realized_pnl: Decimal,
    pub cash_after: Decimal,
    pub position_after: Decimal,
    /// The position's cost basis (fees included) after the fill.
    pub cost_basis_after: Decimal,
    /// The position's gross entry (fees excluded) after the fill.
    pub gross_entry_after: Decimal,
    /// The portfolio's equity just after the fill: cash, this position at the fill price, the
    /// others at the marks known when the signal was decided (at their average entry price
    /// without one). It feeds the high-water mark of the drawdown halt. Absent from events
    /// stored before it was added, which fold as they did (the others at their cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equity_after: Option<Decimal>,
}

/// The signal as it was received, kept on a rejection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub strategy_id: String,
    pub symbol: String,
    pub side: Side,
    pub quantity: Decimal,
    pub price: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fee: Option<Decimal>,
}

/// A signal that failed a check: a business fact, not an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TradeSignalRejected {
    pub portfolio_id: String,
    /// One of DOMAIN.md's reasons, e.g. `OVERSELL`.
    pub reason: String,
    pub detail: String,
    pub signal: SignalRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarketPriceRecorded {
    pub symbol: String,
    pub price: Decimal,
}

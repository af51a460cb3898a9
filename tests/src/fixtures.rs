//! Request bodies used across tests (API.md shapes).

use ch_domain::event::{PortfolioRenamed, SCHEMA_VERSION};
use ch_domain::{AggregateType, Event};
use ch_runtime::envelope::Meta;
use serde_json::{json, Value};

/// A strategy on the given symbols with generous limits.
pub fn strategy(user_id: &str, strategy_id: &str, symbols: &[&str]) -> Value {
    json!({
        "strategy_id": strategy_id,
        "user_id": user_id,
        "strategy_name": format!("strategy {strategy_id}"),
        "rules": [{"rule_id": "r1", "symbol": "*", "stake": {"mode": "fixed_quote", "value": "1000"}}],
        "risk_profile": {
            "allowed_symbols": symbols,
            "max_open_positions": 5,
            "max_order_notional": "1000000",
            "max_position_notional": "1000000",
            "max_leverage": 1
        }
    })
}

/// `portfolio.update` `open` in USDT.
pub fn open(portfolio_id: &str, user_id: &str) -> Value {
    json!({"portfolio_id": portfolio_id, "op": "open", "user_id": user_id,
           "name": format!("portfolio {portfolio_id}"), "quote_currency": "USDT", "fee_rate": "0.001"})
}

/// `strategy.update` renaming `strategy_id` to "renamed" from `expected_version`.
pub fn rename_strategy(strategy_id: &str, expected_version: u64) -> Value {
    json!({"strategy_id": strategy_id, "strategy_name": "renamed", "expected_version": expected_version})
}

pub fn deposit(portfolio_id: &str, amount: &str) -> Value {
    json!({"portfolio_id": portfolio_id, "op": "deposit", "amount": amount})
}

pub fn attach(portfolio_id: &str, strategy_id: &str) -> Value {
    json!({"portfolio_id": portfolio_id, "op": "attach_strategy", "strategy_id": strategy_id})
}

/// A signal; `fee` is optional.
pub fn signal(
    portfolio_id: &str,
    strategy_id: &str,
    side: &str,
    qty: &str,
    price: &str,
    fee: Option<&str>,
) -> Value {
    let mut v = json!({"portfolio_id": portfolio_id, "strategy_id": strategy_id, "symbol": "BTC-USDT",
                       "side": side, "quantity": qty, "price": price});
    if let Some(f) = fee {
        v["fee"] = f.into();
    }
    v
}

pub fn price(symbol: &str, price: &str) -> Value {
    json!({"symbol": symbol, "price": price})
}

pub fn withdraw(portfolio_id: &str, amount: &str) -> Value {
    json!({"portfolio_id": portfolio_id, "op": "withdraw", "amount": amount})
}

pub fn detach(portfolio_id: &str, strategy_id: &str) -> Value {
    json!({"portfolio_id": portfolio_id, "op": "detach_strategy", "strategy_id": strategy_id})
}

pub fn close(portfolio_id: &str) -> Value {
    json!({"portfolio_id": portfolio_id, "op": "close"})
}

/// A signal on any symbol, without `fee` (the portfolio's fee rate applies).
pub fn signal_on(
    portfolio_id: &str,
    strategy_id: &str,
    symbol: &str,
    side: &str,
    qty: &str,
    price: &str,
) -> Value {
    json!({"portfolio_id": portfolio_id, "strategy_id": strategy_id, "symbol": symbol,
           "side": side, "quantity": qty, "price": price})
}

/// [`strategy`] with some `risk_profile` fields replaced (`overrides` is an object).
pub fn strategy_with(
    user_id: &str,
    strategy_id: &str,
    symbols: &[&str],
    overrides: Value,
) -> Value {
    let mut v = strategy(user_id, strategy_id, symbols);
    if let Value::Object(o) = overrides {
        for (k, val) in o {
            v["risk_profile"][k] = val;
        }
    }
    v
}

/// The `strategy_id`s of a reply's `strategies` (a list or a leaderboard), in its order.
pub fn strategy_ids(reply: &Value) -> Vec<&str> {
    reply["strategies"]
        .as_array()
        .unwrap_or_else(|| panic!("no strategies in {reply}"))
        .iter()
        .map(|s| s["strategy_id"].as_str().expect("a strategy_id"))
        .collect()
}

/// A command reply's `stream_seq` (the consistency token for queries).
#[track_caller]
pub fn seq(reply: &Value) -> u64 {
    reply["stream_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no stream_seq in {reply}"))
}

/// A command reply's `version`.
#[track_caller]
pub fn version(reply: &Value) -> u64 {
    reply["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version in {reply}"))
}

/// A rename of `portfolio_id` as the store keeps it, its `version`th event: for tests that
/// append around the command path (the store does not look inside the event).
pub fn renamed(portfolio_id: &str, version: u64, name: &str) -> (Meta, Event) {
    let now = chrono::Utc::now();
    let meta = Meta {
        event_id: uuid::Uuid::now_v7(),
        schema_version: SCHEMA_VERSION,
        aggregate_type: AggregateType::Portfolio,
        aggregate_id: portfolio_id.into(),
        aggregate_version: version,
        occurred_at: now,
        recorded_at: now,
        command_id: None,
        correlation_id: None,
        causation_id: None,
        command_digest: None,
    };
    let event = Event::PortfolioRenamed(PortfolioRenamed {
        portfolio_id: portfolio_id.into(),
        name: name.into(),
    });
    (meta, event)
}

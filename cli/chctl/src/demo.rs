//! `chctl demo`: a deterministic demo data set, loaded through NATS requests like any client.
//!
//! Every command carries a fixed `command_id` (UUID v5 of its step name), so loading twice
//! stores nothing new: a re-sent command answers `"duplicate": true`.

use std::process::ExitCode;

use anyhow::{bail, Result};
use async_nats::Client;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{call, text, Ctx};

pub const USER: &str = "demo-user";
pub const PORTFOLIOS: [&str; 2] = ["demo-1", "demo-2"];
pub const BTC_STRATEGY: &str = "demo-btc-trend";
pub const ETH_STRATEGY: &str = "demo-eth-swing";

/// What loading did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The highest `stream_seq` of the replies: the consistency token for queries.
    pub last_seq: u64,
    pub stored: usize,
    pub duplicates: usize,
    pub existing: usize,
    pub executed: usize,
    pub rejected: usize,
}

struct Step {
    label: String,
    endpoint: &'static str,
    body: Value,
    /// A rejection reason this signal is meant to get.
    expect_reject: Option<&'static str>,
}

fn command_id(label: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("urn:cipherhorizon:demo:v1:{label}").as_bytes(),
    )
}

fn step(label: impl Into<String>, endpoint: &'static str, body: Value) -> Step {
    Step {
        label: label.into(),
        endpoint,
        body,
        expect_reject: None,
    }
}

fn portfolio(id: &str, op: &str, fields: Value) -> Step {
    let mut body = json!({"portfolio_id": id, "op": op});
    if let (Value::Object(b), Value::Object(f)) = (&mut body, fields) {
        b.extend(f);
    }
    let detail = ["amount", "strategy_id"]
        .iter()
        .find_map(|k| {
            body.get(*k)
                .and_then(Value::as_str)
                .map(|v| format!(" {v}"))
        })
        .unwrap_or_default();
    step(
        format!("portfolio {id} {op}{detail}"),
        "portfolio.update",
        body,
    )
}

fn price(symbol: &str, price: &str, n: u32) -> Step {
    step(
        format!("price {symbol} {price} #{n}"),
        "market.price",
        json!({"symbol": symbol, "price": price}),
    )
}

fn signal(portfolio: &str, strategy: &str, symbol: &str, side: &str, qty: &str, px: &str) -> Step {
    step(
        format!("signal {portfolio} {side} {qty} {symbol} @ {px}"),
        "signal.execute",
        json!({"portfolio_id": portfolio, "strategy_id": strategy, "symbol": symbol,
               "side": side, "quantity": qty, "price": px}),
    )
}

fn steps() -> Vec<Step> {
    let mut s = vec![
        step(
            format!("strategy create {BTC_STRATEGY}"),
            "strategy.create",
            json!({
                "strategy_id": BTC_STRATEGY,
                "user_id": USER,
                "strategy_name": "Demo: BTC trend",
                "rules": [{"rule_id": "btc-core", "symbol": "BTC-USDT",
                           "stake": {"mode": "pct_equity", "value": "0.2"},
                           "stop_loss_pct": "0.05", "take_profit_pct": "0.15"}],
                "risk_profile": {"allowed_symbols": ["BTC-USDT", "ETH-USDT"],
                                 "max_open_positions": 2, "max_order_notional": "10000",
                                 "min_order_notional": "50", "max_position_notional": "15000",
                                 "max_drawdown_pct": "0.25", "max_leverage": 1}
            }),
        ),
        step(
            format!("strategy create {ETH_STRATEGY}"),
            "strategy.create",
            json!({
                "strategy_id": ETH_STRATEGY,
                "user_id": USER,
                "strategy_name": "Demo: ETH swing",
                "rules": [{"rule_id": "eth-swing", "symbol": "ETH-USDT",
                           "stake": {"mode": "fixed_quote", "value": "1000"},
                           "stop_loss_pct": "0.08",
                           "trailing_stop": {"trailing_pct": "0.03", "activation_pct": "0.05"}}],
                "risk_profile": {"allowed_symbols": ["ETH-USDT"],
                                 "max_open_positions": 2, "max_order_notional": "5000",
                                 "max_position_notional": "8000", "max_leverage": 1}
            }),
        ),
        portfolio(
            "demo-1",
            "open",
            json!({"user_id": USER, "name": "Demo: BTC + ETH", "quote_currency": "USDT"}),
        ),
        portfolio(
            "demo-2",
            "open",
            json!({"user_id": USER, "name": "Demo: ETH only", "quote_currency": "USDT"}),
        ),
        portfolio("demo-1", "deposit", json!({"amount": "25000"})),
        portfolio("demo-2", "deposit", json!({"amount": "10000"})),
        portfolio(
            "demo-1",
            "attach_strategy",
            json!({"strategy_id": BTC_STRATEGY}),
        ),
        portfolio(
            "demo-1",
            "attach_strategy",
            json!({"strategy_id": ETH_STRATEGY}),
        ),
        portfolio(
            "demo-2",
            "attach_strategy",
            json!({"strategy_id": ETH_STRATEGY}),
        ),
        price("BTC-USDT", "64000", 1),
        price("ETH-USDT", "3200", 1),
        signal("demo-1", BTC_STRATEGY, "BTC-USDT", "buy", "0.1", "64000"),
        signal("demo-1", ETH_STRATEGY, "ETH-USDT", "buy", "1.5", "3200"),
        signal("demo-2", ETH_STRATEGY, "ETH-USDT", "buy", "1.5", "3180"),
        price("BTC-USDT", "66000", 2),
        signal("demo-1", BTC_STRATEGY, "BTC-USDT", "sell", "0.04", "66000"),
    ];
    let mut oversell = signal("demo-1", BTC_STRATEGY, "BTC-USDT", "sell", "1", "66000");
    oversell.expect_reject = Some("OVERSELL");
    s.push(oversell);
    s.extend([
        signal("demo-2", ETH_STRATEGY, "ETH-USDT", "sell", "0.5", "3250"),
        price("BTC-USDT", "66500", 3),
        price("ETH-USDT", "3150", 2),
    ]);
    s
}

/// Sends the demo commands in order; `verbose` prints one line per command.
pub async fn load(ctx: &Ctx, client: &Client, verbose: bool) -> Result<Outcome> {
    let mut out = Outcome::default();
    let steps = steps();
    if verbose {
        println!("loading the demo data ({} commands):", steps.len());
    }
    for mut s in steps {
        s.body["command_id"] = json!(command_id(&s.label).to_string());
        let subject = ctx.subjects.command(s.endpoint);
        let shown = match call(client, &subject, &s.body).await? {
            Ok(reply) => {
                let seq = reply["stream_seq"].as_u64().unwrap_or(0);
                out.last_seq = out.last_seq.max(seq);
                let dup = reply["duplicate"].as_bool().unwrap_or(false);
                if dup {
                    out.duplicates += 1;
                } else {
                    out.stored += 1;
                }
                let mut shown = format!("{} (seq {seq})", if dup { "duplicate" } else { "stored" });
                match reply["status"].as_str() {
                    Some("executed") => out.executed += 1,
                    Some("rejected") => {
                        out.rejected += 1;
                        let reason = text(&reply, "reason");
                        let expected = s.expect_reject == Some(reason.as_str());
                        shown = format!(
                            "{shown}: rejected {reason} ({}){}",
                            text(&reply, "detail"),
                            if expected { ", as intended" } else { "" }
                        );
                    }
                    _ => {}
                }
                shown
            }
            Err(e) if e.code == "already_exists" => {
                out.existing += 1;
                "already exists".to_owned()
            }
            Err(e) => bail!("demo step `{}` on {subject}: {e}", s.label),
        };
        if verbose {
            println!("  {:<48} {shown}", s.label);
        }
    }
    Ok(out)
}

/// Queries the demo portfolios (waiting for `min_seq`) and prints a compact report.
pub async fn report(ctx: &Ctx, client: &Client, min_seq: u64) -> Result<()> {
    let subject = ctx.subjects.query("portfolio.performance");
    for id in PORTFOLIOS {
        let mut q = json!({"portfolio_id": id, "timeout_ms": 10000});
        if min_seq > 0 {
            q["min_stream_seq"] = json!(min_seq);
        }
        let p = match call(client, &subject, &q).await? {
            Ok(p) => p,
            Err(e) => bail!("{subject} for {id}: {e}"),
        };
        print_portfolio(&p);
    }
    Ok(())
}

fn print_portfolio(p: &Value) {
    let t = |k: &str| text(p, k);
    let ccy = t("quote_currency");
    println!(
        "\n{} \"{}\" ({}, {ccy}, as of seq {})",
        t("portfolio_id"),
        t("name"),
        t("status"),
        t("as_of_seq")
    );
    println!(
        "  cash {}  equity {}  net deposits {}  total return {}",
        t("cash"),
        t("equity"),
        t("net_deposits"),
        t("total_return")
    );
    println!(
        "  realized PnL {}  unrealized PnL {}  fees {}  fills {}  round trips {}  win rate {}  rejected signals {}",
        t("realized_pnl"),
        t("unrealized_pnl"),
        t("fees_paid"),
        t("fill_count"),
        t("trade_count"),
        t("win_rate"),
        t("rejected_signals")
    );
    match p["positions"].as_array() {
        Some(ps) if !ps.is_empty() => {
            for pos in ps {
                let t = |k: &str| text(pos, k);
                println!(
                    "  {:<9} qty {:<10} avg cost {:<12} mark {:<10} value {:<14} unrealized {}",
                    t("symbol"),
                    t("quantity"),
                    t("avg_cost"),
                    t("mark_price"),
                    t("market_value"),
                    t("unrealized_pnl")
                );
            }
        }
        _ => println!("  no open positions"),
    }
}

pub async fn run(ctx: &Ctx) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let out = load(ctx, &client, true).await?;
    println!(
        "{} stored, {} duplicate, {} already existing; signals: {} executed, {} rejected",
        out.stored, out.duplicates, out.existing, out.executed, out.rejected
    );
    report(ctx, &client, out.last_seq).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_are_fixed_and_distinct() {
        let labels: Vec<String> = steps().into_iter().map(|s| s.label).collect();
        let mut ids: Vec<Uuid> = labels.iter().map(|l| command_id(l)).collect();
        assert_eq!(command_id(&labels[0]), ids[0]);
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            labels.len(),
            "every step needs its own label: {labels:?}"
        );
    }
}

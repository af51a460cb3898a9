//! The trade-flow workload, generated deterministically from a seed (`rand::rngs::StdRng`).
//!
//! Strategies (allowed symbols among [`PAIRS`], limits that some signals break), portfolios
//! opened, funded and attached to strategies round-robin, then the signals. The generator keeps
//! a simplified book of each portfolio (the risk checks of DOMAIN.md, without fees in position
//! sizes) so that most sells sell what is held and most buys fit the limits; a few signals are
//! meant to be rejected (symbols outside the strategy, oversells, orders above the maximum or
//! below the minimum notional), and others are rejected as the books fill up.
//!
//! Each portfolio's signals belong to one client (`portfolio % clients`), which sends them in
//! the generated order: the outcome of every signal is the same in every run of a seed, and the
//! same for CipherHorizon and the monolithic baseline.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::json;

/// A pair, its starting price, and the places of its prices and quantities.
pub struct Pair {
    pub symbol: &'static str,
    pub price: f64,
    pub price_dp: u32,
    pub qty_dp: u32,
}

/// The 8 USDT pairs the workload trades.
pub const PAIRS: [Pair; 8] = [
    pair("BTC-USDT", 67_000.0, 2, 5),
    pair("ETH-USDT", 3_500.0, 2, 4),
    pair("SOL-USDT", 150.0, 3, 2),
    pair("BNB-USDT", 590.0, 2, 3),
    pair("XRP-USDT", 0.52, 5, 1),
    pair("ADA-USDT", 0.45, 5, 1),
    pair("DOGE-USDT", 0.15, 6, 0),
    pair("AVAX-USDT", 36.0, 3, 2),
];

const fn pair(symbol: &'static str, price: f64, price_dp: u32, qty_dp: u32) -> Pair {
    Pair {
        symbol,
        price,
        price_dp,
        qty_dp,
    }
}

/// Sizes of a workload.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub seed: u64,
    pub portfolios: usize,
    pub strategies: usize,
    pub signals: usize,
    pub clients: usize,
}

/// A strategy of the workload and the limits the generator's book applies.
pub struct StrategySpec {
    pub id: String,
    pub body: Bytes,
    allowed: Vec<usize>,
    max_open: usize,
    max_order: Decimal,
    min_order: Decimal,
    max_position: Decimal,
}

/// A portfolio and its set-up commands, in order (open, deposit, attach).
pub struct PortfolioSpec {
    pub id: String,
    pub setup: Vec<Bytes>,
}

pub struct Workload {
    pub seed: u64,
    pub strategies: Vec<StrategySpec>,
    pub portfolios: Vec<PortfolioSpec>,
    /// The signal requests of each client, in sending order.
    pub signals: Vec<Vec<Bytes>>,
    /// What the generator meant: signals written to break a rule on purpose.
    pub intended_rejections: usize,
}

/// The generator's simplified book of a portfolio.
#[derive(Default)]
struct Book {
    cash: Decimal,
    /// Quantity and cost (notional paid) per pair index.
    positions: BTreeMap<usize, (Decimal, Decimal)>,
}

fn dec(x: f64, dp: u32) -> Decimal {
    Decimal::from_f64(x)
        .unwrap_or(Decimal::ONE)
        .round_dp_with_strategy(dp, RoundingStrategy::ToZero)
        .normalize()
}

fn fee_rate() -> Decimal {
    Decimal::new(1, 3)
}

impl Workload {
    /// Generates the workload of `sizes`; ids start with `run_id`.
    pub fn generate(sizes: Sizes, run_id: &str) -> Workload {
        let mut rng = StdRng::seed_from_u64(sizes.seed);
        let strategies: Vec<StrategySpec> = (0..sizes.strategies.max(1))
            .map(|i| strategy(&mut rng, run_id, i))
            .collect();
        let mut books = Vec::with_capacity(sizes.portfolios);
        let portfolios: Vec<PortfolioSpec> = (0..sizes.portfolios)
            .map(|i| {
                let id = format!("{run_id}-p{i:05}");
                let deposit = Decimal::from(rng.gen_range(10u32..=60) * 1000);
                let strategy = &strategies[i % strategies.len()];
                let user = format!("{run_id}-u{:03}", i % 100);
                let setup = vec![
                    body(&json!({"portfolio_id": id, "op": "open", "user_id": user,
                                 "name": format!("bench portfolio {i}"), "quote_currency": "USDT"})),
                    body(&json!({"portfolio_id": id, "op": "deposit", "amount": deposit.to_string()})),
                    body(&json!({"portfolio_id": id, "op": "attach_strategy",
                                 "strategy_id": strategy.id})),
                ];
                books.push(Book {
                    cash: deposit,
                    ..Book::default()
                });
                PortfolioSpec { id, setup }
            })
            .collect();

        let mut prices: Vec<f64> = PAIRS.iter().map(|p| p.price).collect();
        let clients = sizes.clients.max(1);
        let mut signals: Vec<Vec<Bytes>> = vec![Vec::new(); clients];
        let mut intended = 0;
        if !portfolios.is_empty() {
            for _ in 0..sizes.signals {
                let p = rng.gen_range(0..portfolios.len());
                let s = &strategies[p % strategies.len()];
                let book = &mut books[p];
                let sell = !book.positions.is_empty() && rng.gen_bool(0.45);
                let (pair, side, qty, on_purpose) = if sell {
                    sell_signal(&mut rng, book, s, &prices)
                } else {
                    buy_signal(&mut rng, book, s, &prices)
                };
                intended += usize::from(on_purpose);
                // A small random walk per pair: +-0.2 % per signal on it.
                let px = &mut prices[pair];
                *px *= 1.0 + rng.gen_range(-0.002..0.002);
                let price = dec(*px, PAIRS[pair].price_dp);
                simulate(book, s, pair, side, qty, price);
                signals[p % clients].push(body(&json!({
                    "portfolio_id": portfolios[p].id,
                    "strategy_id": s.id,
                    "symbol": PAIRS[pair].symbol,
                    "side": side,
                    "quantity": qty.to_string(),
                    "price": price.to_string(),
                })));
            }
        }
        Workload {
            seed: sizes.seed,
            strategies,
            portfolios,
            signals,
            intended_rejections: intended,
        }
    }
}

fn body(v: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("JSON serializes"))
}

fn strategy(rng: &mut StdRng, run_id: &str, i: usize) -> StrategySpec {
    let id = format!("{run_id}-s{i:04}");
    let mut all: Vec<usize> = (0..PAIRS.len()).collect();
    all.shuffle(rng);
    let allowed: Vec<usize> = all[..rng.gen_range(3..=6)].to_vec();
    let max_open = rng.gen_range(2..=4usize);
    let max_order = Decimal::from([2000, 3000, 5000][rng.gen_range(0..3)]);
    let min_order = Decimal::from(10);
    let max_position = Decimal::from(rng.gen_range(4..=12) * 1000);
    let symbols: Vec<&str> = allowed.iter().map(|&a| PAIRS[a].symbol).collect();
    let body = body(&json!({
        "strategy_id": id,
        "user_id": format!("{run_id}-u{:03}", i % 100),
        "strategy_name": format!("bench strategy {i}"),
        "rules": [{"rule_id": "r1", "symbol": symbols[0],
                   "stake": {"mode": "fixed_quote", "value": "1000"},
                   "stop_loss_pct": "0.05", "take_profit_pct": "0.15"}],
        "risk_profile": {"allowed_symbols": symbols, "max_open_positions": max_open,
                         "max_order_notional": max_order.to_string(),
                         "min_order_notional": min_order.to_string(),
                         "max_position_notional": max_position.to_string(),
                         "max_drawdown_pct": "0.5", "max_leverage": 1}
    }));
    StrategySpec {
        id,
        body,
        allowed,
        max_open,
        max_order,
        min_order,
        max_position,
    }
}

/// A quantity of about `notional` worth at `price`, at the pair's places (at least one unit).
fn qty_for(pair: usize, notional: f64, price: f64) -> Decimal {
    let dp = PAIRS[pair].qty_dp;
    let q = dec(notional / price, dp);
    if q.is_zero() {
        Decimal::new(1, dp)
    } else {
        q
    }
}

/// A buy; `true` when it is meant to be rejected.
fn buy_signal(
    rng: &mut StdRng,
    book: &Book,
    s: &StrategySpec,
    prices: &[f64],
) -> (usize, &'static str, Decimal, bool) {
    let roll: f64 = rng.gen();
    let max_order = s.max_order.to_f64().unwrap_or(1000.0);
    if roll < 0.03 {
        // A symbol the strategy does not allow.
        let outside: Vec<usize> = (0..PAIRS.len())
            .filter(|p| !s.allowed.contains(p))
            .collect();
        if let Some(&pair) = outside.choose(rng) {
            let n = rng.gen_range(100.0..max_order * 0.5);
            return (pair, "buy", qty_for(pair, n, prices[pair]), true);
        }
    }
    // Mostly a symbol already held (if any), else any allowed one.
    let held: Vec<usize> = book.positions.keys().copied().collect();
    let pair = if !held.is_empty() && (held.len() >= s.max_open || rng.gen_bool(0.5)) {
        *held.choose(rng).expect("not empty")
    } else {
        *s.allowed.choose(rng).expect("strategies allow symbols")
    };
    let px = prices[pair];
    if roll < 0.05 {
        // Above the strategy's maximum order.
        let n = max_order * rng.gen_range(1.1..1.5);
        return (pair, "buy", qty_for(pair, n, px), true);
    }
    if roll < 0.07 {
        // Below the minimum (dust).
        let n = rng.gen_range(1.0..8.0);
        return (pair, "buy", qty_for(pair, n, px), true);
    }
    // Within the order limits, and mostly within the room left in the position.
    let held_value = book
        .positions
        .get(&pair)
        .map_or(0.0, |(q, _)| q.to_f64().unwrap_or(0.0) * px);
    let room = s.max_position.to_f64().unwrap_or(0.0) - held_value;
    let mut n = rng.gen_range(50.0..max_order * 0.6);
    if rng.gen_bool(0.9) && room > 60.0 {
        n = n.min(room * 0.9);
    }
    (pair, "buy", qty_for(pair, n.max(20.0), px), false)
}

/// A sell of a held position (within the strategy's order limit, mostly); `true` when it is
/// meant to be rejected (an oversell).
fn sell_signal(
    rng: &mut StdRng,
    book: &Book,
    s: &StrategySpec,
    prices: &[f64],
) -> (usize, &'static str, Decimal, bool) {
    let held: Vec<(&usize, &(Decimal, Decimal))> = book.positions.iter().collect();
    let (&pair, &(q, _)) = *held.choose(rng).expect("sells only when something is held");
    let dp = PAIRS[pair].qty_dp;
    let roll: f64 = rng.gen();
    if roll < 0.05 {
        // More than held.
        let over = (q * Decimal::new(15, 1)).round_dp(dp) + Decimal::new(1, dp);
        return (pair, "sell", over, true);
    }
    // At most ~90 % of the maximum order (a whole position may be worth more).
    let max_order = s.max_order.to_f64().unwrap_or(1000.0);
    let cap = dec(max_order * 0.9 / prices[pair], dp);
    let whole = roll < 0.40 || q <= Decimal::new(1, dp);
    let qty = if whole {
        q
    } else {
        let part = (q * Decimal::from_f64(rng.gen_range(0.2..0.8)).unwrap_or(Decimal::ONE))
            .round_dp_with_strategy(dp, RoundingStrategy::ToZero);
        if part.is_zero() {
            q
        } else {
            part
        }
    };
    let qty = if qty > cap && !cap.is_zero() && rng.gen_bool(0.95) {
        cap
    } else {
        qty
    };
    (pair, "sell", qty, false)
}

/// Applies a signal to the generator's book if it passes its (simplified) checks.
fn simulate(book: &mut Book, s: &StrategySpec, pair: usize, side: &str, q: Decimal, p: Decimal) {
    if !s.allowed.contains(&pair) {
        return;
    }
    let n = q * p;
    if n > s.max_order || n < s.min_order {
        return;
    }
    let (held, cost) = book.positions.get(&pair).copied().unwrap_or_default();
    if side == "sell" {
        if q > held {
            return;
        }
        book.cash += n - (n * fee_rate()).round_dp(8);
        if q == held {
            book.positions.remove(&pair);
        } else {
            let released = (cost * q / held).round_dp(8);
            book.positions.insert(pair, (held - q, cost - released));
        }
        return;
    }
    if held.is_zero() && book.positions.len() >= s.max_open {
        return;
    }
    if (held + q) * p > s.max_position {
        return;
    }
    let spend = n + (n * fee_rate()).round_dp(8);
    if spend > book.cash {
        return;
    }
    book.cash -= spend;
    book.positions.insert(pair, (held + q, cost + spend));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(seed: u64) -> Sizes {
        Sizes {
            seed,
            portfolios: 20,
            strategies: 4,
            signals: 500,
            clients: 3,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_requests() {
        let a = Workload::generate(sizes(7), "r");
        let b = Workload::generate(sizes(7), "r");
        let c = Workload::generate(sizes(8), "r");
        assert_eq!(a.signals, b.signals);
        assert_ne!(a.signals, c.signals);
        assert_eq!(a.signals.iter().map(Vec::len).sum::<usize>(), 500);
        assert_eq!(a.portfolios.len(), 20);
        assert_eq!(a.strategies.len(), 4);
    }

    #[test]
    fn a_portfolio_belongs_to_one_client_and_requests_are_valid() {
        let w = Workload::generate(sizes(1), "r");
        for (c, list) in w.signals.iter().enumerate() {
            for b in list {
                let v: serde_json::Value = serde_json::from_slice(b).unwrap();
                let id = v["portfolio_id"].as_str().unwrap();
                let n: usize = id.trim_start_matches("r-p").parse().unwrap();
                assert_eq!(n % 3, c);
                let q: Decimal = v["quantity"].as_str().unwrap().parse().unwrap();
                let p: Decimal = v["price"].as_str().unwrap().parse().unwrap();
                assert!(q > Decimal::ZERO && q.scale() <= 8, "{v}");
                assert!(p > Decimal::ZERO && p.scale() <= 8, "{v}");
            }
        }
        assert!(w.intended_rejections > 0);
    }
}

//! The Portfolio aggregate: cash in one quote currency, spot positions at average cost (fees in
//! the basis), attached strategies, and the execution of trade signals (DOMAIN.md).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::aggregate::check_monotonic_time;
use crate::event::{
    FundsDeposited, FundsWithdrawn, PortfolioClosed, PortfolioOpened, PortfolioRenamed, Side,
    SignalRecord, StrategyAttached, StrategyDetached, TradeExecuted, TradeSignalRejected,
};
use crate::ids::{
    symbol_base, symbol_quote, validate_currency, validate_id, validate_name, validate_symbol,
};
use crate::money::{
    exact_add, exact_mul, exact_sub, mul_div_round8, mul_round8, places, plain, round8,
    validate_amount, validate_places, MAX_PLACES,
};
use crate::strategy::{StrategyState, StrategyStatus};
use crate::{Aggregate, AggregateType, Ctx, DomainError, Event};

/// Rejection reasons of `execute_trade_signal` (DOMAIN.md), in check order.
pub mod reason {
    pub const STRATEGY_NOT_ACTIVE: &str = "STRATEGY_NOT_ACTIVE";
    pub const STRATEGY_NOT_ATTACHED: &str = "STRATEGY_NOT_ATTACHED";
    pub const PORTFOLIO_CLOSED: &str = "PORTFOLIO_CLOSED";
    pub const SYMBOL_NOT_ALLOWED: &str = "SYMBOL_NOT_ALLOWED";
    pub const INVALID_QUANTITY: &str = "INVALID_QUANTITY";
    pub const TRADING_HALTED: &str = "TRADING_HALTED";
    pub const OVERSELL: &str = "OVERSELL";
    pub const MAX_OPEN_POSITIONS: &str = "MAX_OPEN_POSITIONS";
    pub const ORDER_NOTIONAL_ABOVE_MAX: &str = "ORDER_NOTIONAL_ABOVE_MAX";
    pub const ORDER_NOTIONAL_BELOW_MIN: &str = "ORDER_NOTIONAL_BELOW_MIN";
    pub const MAX_POSITION_SIZE: &str = "MAX_POSITION_SIZE";
    pub const INSUFFICIENT_CASH: &str = "INSUFFICIENT_CASH";

    /// Every reason, in check order.
    pub const ALL: [&str; 12] = [
        STRATEGY_NOT_ACTIVE,
        STRATEGY_NOT_ATTACHED,
        PORTFOLIO_CLOSED,
        SYMBOL_NOT_ALLOWED,
        INVALID_QUANTITY,
        TRADING_HALTED,
        OVERSELL,
        MAX_OPEN_POSITIONS,
        ORDER_NOTIONAL_ABOVE_MAX,
        ORDER_NOTIONAL_BELOW_MIN,
        MAX_POSITION_SIZE,
        INSUFFICIENT_CASH,
    ];
}

/// One unit in the 28th significant digit of `x` (a decimal's last), for `x >= 0`.
fn last_unit(x: Decimal) -> Decimal {
    let digits = x
        .mantissa()
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d + 1);
    let integer_digits = digits.saturating_sub(x.scale());
    Decimal::new(1, 28u32.saturating_sub(integer_digits).min(28))
}

/// The default `fee_rate` of a new portfolio (0.1 %).
pub fn default_fee_rate() -> Decimal {
    Decimal::new(1, 3)
}

/// A spot position at average cost. Only non-zero positions are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub quantity: Decimal,
    /// What the held quantity cost, fees included.
    pub cost_basis: Decimal,
    /// What the held quantity cost, fees excluded.
    pub gross_entry: Decimal,
}

impl Position {
    /// What it is worth at `mark`, or without one at its average entry price (its gross
    /// entry); `None` on overflow.
    pub fn value_at(&self, mark: Option<&Decimal>) -> Option<Decimal> {
        match mark {
            Some(m) => self.quantity.checked_mul(*m),
            None => Some(self.gross_entry),
        }
    }

    /// `cost_basis / quantity`; `None` when flat.
    pub fn avg_cost(&self) -> Option<Decimal> {
        self.cost_basis.checked_div(self.quantity)
    }

    /// `gross_entry / quantity`; `None` when flat.
    pub fn avg_entry_price(&self) -> Option<Decimal> {
        self.gross_entry.checked_div(self.quantity)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortfolioStatus {
    #[default]
    Open,
    Closed,
}

impl PortfolioStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PortfolioStatus::Open => "open",
            PortfolioStatus::Closed => "closed",
        }
    }
}

/// A trade signal as received (after request validation).
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub strategy_id: String,
    pub symbol: String,
    pub side: Side,
    /// Checked by `decide` (`INVALID_QUANTITY`), not by the request parser.
    pub quantity: Decimal,
    pub price: Decimal,
    /// In quote currency; default `round8(q * p * fee_rate)`.
    pub fee: Option<Decimal>,
}

impl Signal {
    /// The record kept in a `TradeSignalRejected` (decimals normalized).
    pub fn record(&self) -> SignalRecord {
        SignalRecord {
            strategy_id: self.strategy_id.clone(),
            symbol: self.symbol.clone(),
            side: self.side,
            quantity: self.quantity.normalize(),
            price: self.price.normalize(),
            fee: self.fee.map(|f| f.normalize()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PortfolioCommand {
    Open {
        portfolio_id: String,
        user_id: String,
        name: String,
        quote_currency: String,
        fee_rate: Decimal,
    },
    Deposit {
        amount: Decimal,
    },
    Withdraw {
        amount: Decimal,
    },
    Rename {
        name: String,
    },
    AttachStrategy {
        strategy_id: String,
    },
    DetachStrategy {
        strategy_id: String,
    },
    Close,
    ExecuteSignal(Signal),
}

/// Outside facts for a portfolio decision, loaded by the caller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortfolioFacts {
    /// The strategy named by an attach, detach or signal command (`None`: not found).
    pub strategy: Option<StrategyState>,
    /// Latest market price per symbol; may be empty.
    pub marks: BTreeMap<String, Decimal>,
}

/// A portfolio valued at given marks (read side and drawdown halt).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Valuation {
    /// `cash + sum(quantity * mark)`.
    pub equity: Decimal,
    /// `sum(quantity * mark)`.
    pub market_value: Decimal,
    /// `sum(quantity * mark - cost_basis)` (no exit fee).
    pub unrealized_pnl: Decimal,
    /// Symbols without a mark, valued at their `avg_entry_price` instead.
    pub unmarked: Vec<String>,
}

/// A portfolio folded from its events. `version == 0` means it does not exist.
///
/// `high_water_equity` is the high-water mark of the drawdown halt. The aggregate only learns
/// prices from its own fills, so it is kept as follows: a deposit or withdrawal scales it by
/// the flow's share of the equity before it (`equity_before`; by the amount for events stored
/// without it), so that the drawdown it measures is the same after the flow as before (external
/// flows must not read as gains or losses); a `TradeExecuted` raises it to the equity just after the fill if
/// that is higher (`equity_after`: the traded symbol at the fill price, every other position at
/// its mark when the signal was decided; events stored before `equity_after` value those at
/// their average entry price, `gross_entry`). When a buy signal is decided, the equity at the
/// current marks (`PortfolioFacts::marks`) also counts as a candidate high-water mark for that
/// check. A peak of the marks between two of its events is not seen (ADR 005).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortfolioState {
    pub version: u64,
    pub portfolio_id: String,
    pub user_id: String,
    pub name: String,
    pub quote_currency: String,
    pub fee_rate: Decimal,
    pub status: PortfolioStatus,
    pub cash: Decimal,
    /// Deposits minus withdrawals.
    pub net_deposits: Decimal,
    pub realized_pnl: Decimal,
    pub fees_paid: Decimal,
    pub attached_strategies: BTreeSet<String>,
    /// Non-zero positions by symbol.
    pub positions: BTreeMap<String, Position>,
    pub high_water_equity: Decimal,
    pub opened_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
}

type Rejection = (&'static str, String);

fn overflow(what: &str) -> DomainError {
    DomainError::bad_request(format!(
        "{what} is out of range: it needs more than the 28 significant digits of exact decimal arithmetic"
    ))
}

impl PortfolioState {
    /// Values the portfolio at `marks`; a position without a mark is valued at its average
    /// entry price (i.e. at its `gross_entry`) and listed in `unmarked`. Never panics: on a
    /// `Decimal` overflow (absurd magnitudes only) the sums saturate.
    pub fn valuation(&self, marks: &BTreeMap<String, Decimal>) -> Valuation {
        if let Some(v) = self.try_valuation(marks) {
            return v;
        }
        let mut v = Valuation::default();
        for (sym, p) in &self.positions {
            let value = match marks.get(sym) {
                Some(m) => p.quantity.saturating_mul(*m),
                None => {
                    v.unmarked.push(sym.clone());
                    p.gross_entry
                }
            };
            v.market_value = v.market_value.saturating_add(value);
            v.unrealized_pnl = v
                .unrealized_pnl
                .saturating_add(value.saturating_sub(p.cost_basis));
        }
        v.equity = self.cash.saturating_add(v.market_value);
        v
    }

    /// [`PortfolioState::valuation`], `None` on overflow.
    pub fn try_valuation(&self, marks: &BTreeMap<String, Decimal>) -> Option<Valuation> {
        let mut v = Valuation::default();
        for (sym, p) in &self.positions {
            let mark = marks.get(sym);
            if mark.is_none() {
                v.unmarked.push(sym.clone());
            }
            let value = p.value_at(mark)?;
            v.market_value = v.market_value.checked_add(value)?;
            v.unrealized_pnl = v
                .unrealized_pnl
                .checked_add(value.checked_sub(p.cost_basis)?)?;
        }
        v.equity = self.cash.checked_add(v.market_value)?;
        Some(v)
    }

    /// The equity now, with `marks` (unpriced positions at their average entry price).
    fn equity_now(&self, marks: &BTreeMap<String, Decimal>) -> Result<Decimal, DomainError> {
        Ok(self
            .try_valuation(marks)
            .ok_or_else(|| overflow("equity"))?
            .equity
            .normalize())
    }

    /// The high-water mark after an external flow of `amount` (negative: a withdrawal) made
    /// at `equity_before`: first raised to `equity_before` (an equity the portfolio saw, at
    /// the marks of the flow's decision), then scaled by the flow's share of the equity, so
    /// that the drawdown it measures is the same after the flow as before (flows are never
    /// returns). Without the equity (events stored before it), or with none to scale, it
    /// moves by the amount. The scaled mark keeps every digit a decimal holds (28) and is taken
    /// one unit up in the 28th: never below the exact mark, so an equity exactly at the limit
    /// stays halted, and above it by that unit at most, so an equity above the limit by any
    /// amount of 8 places stays trading. Always, not only when the division was cut: whether
    /// it was cannot be told from the quotient (trailing zeros are dropped) nor by
    /// multiplying back (which rounds too). (Rounded to 8 places, the mark moved the boundary
    /// by up to 1e-8 either way; rounded to nearest at 28 digits, an equity at the limit could
    /// trade again after a flow.)
    fn high_water_after_flow(&self, amount: Decimal, equity_before: Option<Decimal>) -> Decimal {
        let hwm = equity_before.map_or(self.high_water_equity, |e| self.high_water_equity.max(e));
        let scaled = equity_before
            .filter(|e| *e > Decimal::ZERO)
            .and_then(|e| {
                let after = e.checked_add(amount)?.max(Decimal::ZERO);
                let quotient = hwm.checked_mul(after)?.checked_div(e)?;
                if quotient.is_zero() {
                    return Some(quotient);
                }
                quotient.checked_add(last_unit(quotient))
            })
            .map(|h| h.normalize());
        scaled.unwrap_or_else(|| hwm.saturating_add(amount).max(Decimal::ZERO))
    }

    fn position(&self, symbol: &str) -> Position {
        self.positions.get(symbol).cloned().unwrap_or_default()
    }

    /// Validates a signal (`bad_request`, nothing stored) and then runs DOMAIN.md's ordered
    /// checks: the first failure is a rejection, otherwise the fill.
    fn evaluate_signal(
        &self,
        sig: &Signal,
        facts: &PortfolioFacts,
        ctx: &Ctx,
    ) -> Result<Result<TradeExecuted, Rejection>, DomainError> {
        validate_id("strategy_id", &sig.strategy_id)?;
        validate_symbol("symbol", &sig.symbol)?;
        validate_amount("price", sig.price)?;
        if let Some(fee) = sig.fee {
            if fee < Decimal::ZERO {
                return Err(DomainError::bad_request("fee: must be >= 0"));
            }
            validate_places("fee", fee)?;
        }
        let (q, p) = (sig.quantity, sig.price);
        let ccy = &self.quote_currency;
        let base = symbol_base(&sig.symbol);

        // 1. strategy active and attached
        let strategy = facts
            .strategy
            .as_ref()
            .filter(|s| s.version > 0 && s.strategy_id == sig.strategy_id);
        let Some(strategy) = strategy else {
            return Ok(Err((
                reason::STRATEGY_NOT_ACTIVE,
                format!("strategy {} does not exist", sig.strategy_id),
            )));
        };
        let profile = match (&strategy.risk_profile, strategy.status) {
            (Some(profile), StrategyStatus::Active) => profile,
            _ => {
                return Ok(Err((
                    reason::STRATEGY_NOT_ACTIVE,
                    format!("strategy {} is deleted", sig.strategy_id),
                )))
            }
        };
        if !self.attached_strategies.contains(&sig.strategy_id) {
            return Ok(Err((
                reason::STRATEGY_NOT_ATTACHED,
                format!(
                    "strategy {} is not attached to portfolio {}",
                    sig.strategy_id, self.portfolio_id
                ),
            )));
        }
        // 2. portfolio open
        if self.status == PortfolioStatus::Closed {
            return Ok(Err((
                reason::PORTFOLIO_CLOSED,
                format!("portfolio {} is closed", self.portfolio_id),
            )));
        }
        // 3. symbol allowed
        let quote = symbol_quote(&sig.symbol);
        if quote != ccy {
            return Ok(Err((
                reason::SYMBOL_NOT_ALLOWED,
                format!(
                    "{}: quote {quote} is not the portfolio's quote currency {ccy}",
                    sig.symbol
                ),
            )));
        }
        if !profile.allows(&sig.symbol) {
            return Ok(Err((
                reason::SYMBOL_NOT_ALLOWED,
                format!(
                    "{} is not in the allowed_symbols of strategy {}",
                    sig.symbol, sig.strategy_id
                ),
            )));
        }
        // 4. quantity
        if q <= Decimal::ZERO {
            return Ok(Err((
                reason::INVALID_QUANTITY,
                format!("quantity {}: must be > 0", plain(q)),
            )));
        }
        if places(&q) > MAX_PLACES {
            return Ok(Err((
                reason::INVALID_QUANTITY,
                format!("quantity {}: at most {MAX_PLACES} decimal places", plain(q)),
            )));
        }
        // 5. drawdown halt (buys only)
        if let (Side::Buy, Some(dd)) = (sig.side, profile.max_drawdown_pct) {
            let equity = self
                .try_valuation(&facts.marks)
                .ok_or_else(|| overflow("equity"))?
                .equity;
            let high_water = self.high_water_equity.max(equity);
            let floor = high_water
                .checked_mul(Decimal::ONE - dd)
                .ok_or_else(|| overflow("high-water equity"))?;
            if high_water > Decimal::ZERO && equity <= floor {
                return Ok(Err((
                    reason::TRADING_HALTED,
                    format!(
                        "equity {} {ccy} is at or below {} {ccy}: {} below its high-water mark {} {ccy} \
                         (max_drawdown_pct {})",
                        plain(round8(equity)),
                        plain(round8(floor)),
                        plain(round8(Decimal::ONE - equity / high_water)),
                        plain(round8(high_water)),
                        plain(dd)
                    ),
                )));
            }
        }
        // 6. oversell
        let pos = self.position(&sig.symbol);
        if sig.side == Side::Sell && q > pos.quantity {
            return Ok(Err((
                reason::OVERSELL,
                format!("sell {} {base}: holding {}", plain(q), plain(pos.quantity)),
            )));
        }
        // 7. open positions
        let open = self.positions.len();
        if sig.side == Side::Buy
            && pos.quantity.is_zero()
            && u32::try_from(open).unwrap_or(u32::MAX) >= profile.max_open_positions
        {
            return Ok(Err((
                reason::MAX_OPEN_POSITIONS,
                format!(
                    "buy {}: would open a new position with {open} open, max_open_positions is {}",
                    sig.symbol, profile.max_open_positions
                ),
            )));
        }
        // 8. order notional
        let n = exact_mul(q, p).ok_or_else(|| overflow("quantity * price"))?;
        if n > profile.max_order_notional {
            return Ok(Err((
                reason::ORDER_NOTIONAL_ABOVE_MAX,
                format!(
                    "{} {} {base} at {}: notional {} {ccy} is above max_order_notional {} {ccy}",
                    sig.side.as_str(),
                    plain(q),
                    plain(p),
                    plain(n),
                    plain(profile.max_order_notional)
                ),
            )));
        }
        if let Some(min) = profile.min_order_notional {
            if n < min {
                return Ok(Err((
                    reason::ORDER_NOTIONAL_BELOW_MIN,
                    format!(
                        "{} {} {base} at {}: notional {} {ccy} is below min_order_notional {} {ccy}",
                        sig.side.as_str(),
                        plain(q),
                        plain(p),
                        plain(n),
                        plain(min)
                    ),
                )));
            }
        }
        // 9. position size after the fill, at the fill price (buys only: a sell reduces risk)
        if sig.side == Side::Buy {
            let after = exact_add(pos.quantity, q).ok_or_else(|| overflow("position"))?;
            let notional = after
                .checked_mul(p)
                .ok_or_else(|| overflow("position notional"))?;
            if notional > profile.max_position_notional {
                return Ok(Err((
                    reason::MAX_POSITION_SIZE,
                    format!(
                        "buy {} {base}: position {} {base} at {} is {} {ccy}, above max_position_notional {} {ccy}",
                        plain(q),
                        plain(after),
                        plain(p),
                        plain(notional),
                        plain(profile.max_position_notional)
                    ),
                )));
            }
        }
        // 10. cash
        let trade = match self.fill(sig, &pos, n)? {
            Ok(trade) => trade,
            Err(rejection) => return Ok(Err(rejection)),
        };
        Ok(Ok(TradeExecuted {
            portfolio_id: self.portfolio_id.clone(),
            strategy_id: sig.strategy_id.clone(),
            trade_id: ctx.new_id,
            symbol: sig.symbol.clone(),
            side: sig.side,
            quantity: q.normalize(),
            price: p.normalize(),
            fee: trade.fee.normalize(),
            realized_pnl: trade.realized.normalize(),
            cash_after: trade.cash_after.normalize(),
            position_after: trade.position_after.normalize(),
            cost_basis_after: trade.cost_basis_after.normalize(),
            gross_entry_after: trade.gross_entry_after.normalize(),
            equity_after: Some(self.equity_after(sig, &trade, &facts.marks)?.normalize()),
        }))
    }

    /// The equity right after `trade`: its cash, the traded position at the fill price and
    /// every other position at its mark (at its average entry price without one).
    fn equity_after(
        &self,
        sig: &Signal,
        trade: &Fill,
        marks: &BTreeMap<String, Decimal>,
    ) -> Result<Decimal, DomainError> {
        let mut equity = trade
            .position_after
            .checked_mul(sig.price)
            .and_then(|v| v.checked_add(trade.cash_after));
        for (sym, p) in &self.positions {
            if *sym != sig.symbol {
                let value = p.value_at(marks.get(sym));
                equity = equity.zip(value).and_then(|(e, v)| e.checked_add(v));
            }
        }
        equity.ok_or_else(|| overflow("equity"))
    }

    /// DOMAIN.md's check 10 and the fill: the fee (the signal's, else the portfolio's rate of
    /// the notional `n`), the cash it needs or leaves, and the position, cost basis and
    /// realized P&L after it; a rejection when the cash does not cover it.
    fn fill(
        &self,
        sig: &Signal,
        pos: &Position,
        n: Decimal,
    ) -> Result<Result<Fill, Rejection>, DomainError> {
        let (q, ccy, base) = (sig.quantity, &self.quote_currency, symbol_base(&sig.symbol));
        let fee = match sig.fee {
            Some(f) => f,
            None => mul_round8(n, self.fee_rate).ok_or_else(|| overflow("fee"))?,
        };
        let fill = match sig.side {
            Side::Buy => {
                let cost = exact_add(n, fee).ok_or_else(|| overflow("cost"))?;
                if cost > self.cash {
                    return Ok(Err((
                        reason::INSUFFICIENT_CASH,
                        format!(
                            "buy {} {base} needs {} {ccy} (fee {}): cash is {} {ccy}",
                            plain(q),
                            plain(cost),
                            plain(fee),
                            plain(self.cash)
                        ),
                    )));
                }
                let cost_basis_after =
                    exact_add(pos.cost_basis, cost).ok_or_else(|| overflow("cost basis"))?;
                let gross_entry_after =
                    exact_add(pos.gross_entry, n).ok_or_else(|| overflow("gross entry"))?;
                let cash_after = exact_sub(self.cash, cost).ok_or_else(|| overflow("cash"))?;
                Fill {
                    fee,
                    realized: Decimal::ZERO,
                    cash_after,
                    position_after: pos.quantity + q,
                    cost_basis_after,
                    gross_entry_after,
                }
            }
            Side::Sell => {
                let proceeds = exact_sub(n, fee).ok_or_else(|| overflow("proceeds"))?;
                let cash_after = exact_add(self.cash, proceeds).ok_or_else(|| overflow("cash"))?;
                if cash_after < Decimal::ZERO {
                    return Ok(Err((
                        reason::INSUFFICIENT_CASH,
                        format!(
                            "sell {} {base}: fee {} {ccy} exceeds cash {} {ccy} plus notional {} {ccy}",
                            plain(q),
                            plain(fee),
                            plain(self.cash),
                            plain(n)
                        ),
                    )));
                }
                let (released, released_gross) = if q == pos.quantity {
                    (pos.cost_basis, pos.gross_entry)
                } else {
                    let share = |total: Decimal| {
                        mul_div_round8(total, q, pos.quantity)
                            .ok_or_else(|| overflow("released cost"))
                    };
                    // min: with a basis of more than 8 places, rounding could release a
                    // hair more than the whole basis.
                    (
                        share(pos.cost_basis)?.min(pos.cost_basis),
                        share(pos.gross_entry)?.min(pos.gross_entry),
                    )
                };
                let err = || overflow("realized pnl");
                Fill {
                    fee,
                    realized: exact_sub(proceeds, released).ok_or_else(err)?,
                    cash_after,
                    position_after: exact_sub(pos.quantity, q).ok_or_else(err)?,
                    cost_basis_after: exact_sub(pos.cost_basis, released).ok_or_else(err)?,
                    gross_entry_after: exact_sub(pos.gross_entry, released_gross)
                        .ok_or_else(err)?,
                }
            }
        };
        Ok(Ok(fill))
    }
}

struct Fill {
    fee: Decimal,
    realized: Decimal,
    cash_after: Decimal,
    position_after: Decimal,
    cost_basis_after: Decimal,
    gross_entry_after: Decimal,
}

impl Aggregate for PortfolioState {
    const TYPE: AggregateType = AggregateType::Portfolio;
    type Command = PortfolioCommand;
    type Facts = PortfolioFacts;

    fn version(&self) -> u64 {
        self.version
    }

    fn last_at(&self) -> Option<DateTime<Utc>> {
        self.last_at
    }

    fn apply(&mut self, event: &Event, at: DateTime<Utc>) {
        self.version += 1;
        self.last_at = Some(at);
        match event {
            Event::PortfolioOpened(e) => {
                self.portfolio_id.clone_from(&e.portfolio_id);
                self.user_id.clone_from(&e.user_id);
                self.name.clone_from(&e.name);
                self.quote_currency.clone_from(&e.quote_currency);
                self.fee_rate = e.fee_rate;
                self.status = PortfolioStatus::Open;
                self.opened_at = Some(at);
            }
            Event::FundsDeposited(e) => {
                self.cash = self.cash.saturating_add(e.amount);
                self.net_deposits = self.net_deposits.saturating_add(e.amount);
                self.high_water_equity = self.high_water_after_flow(e.amount, e.equity_before);
            }
            Event::FundsWithdrawn(e) => {
                self.cash = self.cash.saturating_sub(e.amount);
                self.net_deposits = self.net_deposits.saturating_sub(e.amount);
                self.high_water_equity = self.high_water_after_flow(-e.amount, e.equity_before);
            }
            Event::PortfolioRenamed(e) => self.name.clone_from(&e.name),
            Event::StrategyAttached(e) => {
                self.attached_strategies.insert(e.strategy_id.clone());
            }
            Event::StrategyDetached(e) => {
                self.attached_strategies.remove(&e.strategy_id);
            }
            Event::PortfolioClosed(_) => self.status = PortfolioStatus::Closed,
            Event::TradeExecuted(e) => {
                self.cash = e.cash_after;
                if e.position_after.is_zero() {
                    self.positions.remove(&e.symbol);
                } else {
                    self.positions.insert(
                        e.symbol.clone(),
                        Position {
                            quantity: e.position_after,
                            cost_basis: e.cost_basis_after,
                            gross_entry: e.gross_entry_after,
                        },
                    );
                }
                self.realized_pnl = self.realized_pnl.saturating_add(e.realized_pnl);
                self.fees_paid = self.fees_paid.saturating_add(e.fee);
                let equity = e.equity_after.unwrap_or_else(|| {
                    // Stored before events carried it: the other positions at their cost.
                    let mut equity = e
                        .cash_after
                        .saturating_add(e.position_after.saturating_mul(e.price));
                    for (sym, p) in &self.positions {
                        if *sym != e.symbol {
                            equity = equity.saturating_add(p.gross_entry);
                        }
                    }
                    equity
                });
                self.high_water_equity = self.high_water_equity.max(equity);
            }
            _ => {}
        }
    }

    fn decide(
        &self,
        command: &PortfolioCommand,
        facts: &PortfolioFacts,
        ctx: &Ctx,
    ) -> Result<Vec<Event>, DomainError> {
        match command {
            PortfolioCommand::Open { portfolio_id, .. } if self.version > 0 => {
                return Err(DomainError::AlreadyExists(format!(
                    "portfolio {portfolio_id} already exists"
                )));
            }
            PortfolioCommand::Open { .. } => {}
            _ if self.version == 0 => {
                return Err(DomainError::NotFound("portfolio not found".into()))
            }
            _ => {}
        }
        check_monotonic_time(self.last_at, ctx)?;
        // A closed portfolio takes no new money, names or strategies; its remaining cash may
        // be withdrawn (`close` asks only for flat positions, and the cash would be trapped
        // otherwise) and its strategies detached. Signals are stored rejections.
        if self.status == PortfolioStatus::Closed
            && !matches!(
                command,
                PortfolioCommand::ExecuteSignal(_)
                    | PortfolioCommand::Withdraw { .. }
                    | PortfolioCommand::DetachStrategy { .. }
            )
        {
            return Err(DomainError::refused(
                "portfolio_closed",
                format!("portfolio {} is closed", self.portfolio_id),
            ));
        }
        let id = || self.portfolio_id.clone();
        let ccy = &self.quote_currency;
        let event = match command {
            PortfolioCommand::Open {
                portfolio_id,
                user_id,
                name,
                quote_currency,
                fee_rate,
            } => {
                validate_id("portfolio_id", portfolio_id)?;
                validate_id("user_id", user_id)?;
                validate_name("name", name)?;
                validate_currency("quote_currency", quote_currency)?;
                if *fee_rate < Decimal::ZERO || *fee_rate >= Decimal::ONE {
                    return Err(DomainError::bad_request("fee_rate: must be >= 0 and < 1"));
                }
                validate_places("fee_rate", *fee_rate)?;
                Event::PortfolioOpened(PortfolioOpened {
                    portfolio_id: portfolio_id.clone(),
                    user_id: user_id.clone(),
                    name: name.clone(),
                    quote_currency: quote_currency.clone(),
                    fee_rate: fee_rate.normalize(),
                })
            }
            PortfolioCommand::Deposit { amount } => {
                validate_amount("amount", *amount)?;
                let cash_after = exact_add(self.cash, *amount).ok_or_else(|| overflow("cash"))?;
                exact_add(self.net_deposits, *amount).ok_or_else(|| overflow("net deposits"))?;
                self.high_water_equity
                    .checked_add(*amount)
                    .ok_or_else(|| overflow("amount"))?;
                Event::FundsDeposited(FundsDeposited {
                    portfolio_id: id(),
                    amount: amount.normalize(),
                    cash_after: cash_after.normalize(),
                    equity_before: Some(self.equity_now(&facts.marks)?),
                })
            }
            PortfolioCommand::Withdraw { amount } => {
                validate_amount("amount", *amount)?;
                if *amount > self.cash {
                    return Err(DomainError::refused(
                        "insufficient_funds",
                        format!(
                            "withdraw {} {ccy}: cash is {} {ccy}",
                            plain(*amount),
                            plain(self.cash)
                        ),
                    ));
                }
                Event::FundsWithdrawn(FundsWithdrawn {
                    portfolio_id: id(),
                    amount: amount.normalize(),
                    cash_after: exact_sub(self.cash, *amount)
                        .ok_or_else(|| overflow("cash"))?
                        .normalize(),
                    equity_before: Some(self.equity_now(&facts.marks)?),
                })
            }
            PortfolioCommand::Rename { name } => {
                validate_name("name", name)?;
                Event::PortfolioRenamed(PortfolioRenamed {
                    portfolio_id: id(),
                    name: name.clone(),
                })
            }
            PortfolioCommand::AttachStrategy { strategy_id } => {
                validate_id("strategy_id", strategy_id)?;
                let strategy = facts
                    .strategy
                    .as_ref()
                    .filter(|s| s.version > 0 && s.strategy_id == *strategy_id)
                    .ok_or_else(|| {
                        DomainError::NotFound(format!("strategy {strategy_id} not found"))
                    })?;
                if strategy.status == StrategyStatus::Deleted {
                    return Err(DomainError::refused(
                        "strategy_deleted",
                        format!("strategy {strategy_id} is deleted"),
                    ));
                }
                if self.attached_strategies.contains(strategy_id) {
                    return Err(DomainError::refused(
                        "strategy_already_attached",
                        format!(
                            "strategy {strategy_id} is already attached to portfolio {}",
                            self.portfolio_id
                        ),
                    ));
                }
                Event::StrategyAttached(StrategyAttached {
                    portfolio_id: id(),
                    strategy_id: strategy_id.clone(),
                })
            }
            PortfolioCommand::DetachStrategy { strategy_id } => {
                validate_id("strategy_id", strategy_id)?;
                if !self.attached_strategies.contains(strategy_id) {
                    return Err(DomainError::refused(
                        "strategy_not_attached",
                        format!(
                            "strategy {strategy_id} is not attached to portfolio {}",
                            self.portfolio_id
                        ),
                    ));
                }
                Event::StrategyDetached(StrategyDetached {
                    portfolio_id: id(),
                    strategy_id: strategy_id.clone(),
                })
            }
            PortfolioCommand::Close => {
                if !self.positions.is_empty() {
                    let open: Vec<&str> = self.positions.keys().map(String::as_str).collect();
                    return Err(DomainError::refused(
                        "position_not_flat",
                        format!(
                            "portfolio {} still holds {}",
                            self.portfolio_id,
                            open.join(", ")
                        ),
                    ));
                }
                Event::PortfolioClosed(PortfolioClosed { portfolio_id: id() })
            }
            PortfolioCommand::ExecuteSignal(sig) => match self.evaluate_signal(sig, facts, ctx)? {
                Ok(trade) => Event::TradeExecuted(trade),
                Err((reason, detail)) => Event::TradeSignalRejected(TradeSignalRejected {
                    portfolio_id: id(),
                    reason: reason.to_string(),
                    detail,
                    signal: sig.record(),
                }),
            },
        };
        Ok(vec![event])
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::strategy::fixtures::{created, created_with, deleted, profile, state as strategy};
    use crate::strategy::RiskProfile;
    use crate::testing::{ctx, dec, given, t0, Given, NEW_ID};

    const P: &str = "p-1";
    const S: &str = "s-1";

    fn opened() -> Event {
        Event::PortfolioOpened(PortfolioOpened {
            portfolio_id: P.into(),
            user_id: "u-1".into(),
            name: "main".into(),
            quote_currency: "USDT".into(),
            fee_rate: dec("0.001"),
        })
    }

    /// A deposit as stored before it carried the equity (the mark moves by the amount).
    fn deposited(amount: &str, cash_after: &str) -> Event {
        Event::FundsDeposited(FundsDeposited {
            portfolio_id: P.into(),
            amount: dec(amount),
            cash_after: dec(cash_after),
            equity_before: None,
        })
    }

    fn attached(id: &str) -> Event {
        Event::StrategyAttached(StrategyAttached {
            portfolio_id: P.into(),
            strategy_id: id.into(),
        })
    }

    fn closed() -> Event {
        Event::PortfolioClosed(PortfolioClosed {
            portfolio_id: P.into(),
        })
    }

    /// Opened, 25000 USDT deposited, s-1 attached.
    fn funded() -> Vec<Event> {
        vec![opened(), deposited("25000", "25000"), attached(S)]
    }

    fn facts_with(p: RiskProfile) -> PortfolioFacts {
        PortfolioFacts {
            strategy: Some(strategy(&[created_with(S, p)])),
            marks: BTreeMap::new(),
        }
    }

    fn facts() -> PortfolioFacts {
        facts_with(profile())
    }

    fn signal(side: Side, q: &str, p: &str, fee: Option<&str>) -> PortfolioCommand {
        PortfolioCommand::ExecuteSignal(Signal {
            strategy_id: S.into(),
            symbol: "BTC-USDT".into(),
            side,
            quantity: dec(q),
            price: dec(p),
            fee: fee.map(dec),
        })
    }

    fn buy(q: &str, p: &str) -> PortfolioCommand {
        signal(Side::Buy, q, p, None)
    }

    fn sell(q: &str, p: &str) -> PortfolioCommand {
        signal(Side::Sell, q, p, None)
    }

    fn on(events: Vec<Event>, facts: PortfolioFacts) -> Given<PortfolioState> {
        given::<PortfolioState>(events).with_facts(facts)
    }

    /// Decides `cmd` on `state` and applies the outcome; returns the events.
    fn step(
        state: &mut PortfolioState,
        cmd: &PortfolioCommand,
        facts: &PortfolioFacts,
    ) -> Result<Vec<Event>, DomainError> {
        let c = ctx();
        let events = state.decide(cmd, facts, &c)?;
        for e in &events {
            state.apply(e, c.at);
        }
        Ok(events)
    }

    fn executed(events: &[Event]) -> TradeExecuted {
        match events {
            [Event::TradeExecuted(t)] => t.clone(),
            other => panic!("expected a trade, got {other:?}"),
        }
    }

    // ---- lifecycle ----

    #[test]
    fn open_emits_opened_and_not_twice() {
        let cmd = PortfolioCommand::Open {
            portfolio_id: P.into(),
            user_id: "u-1".into(),
            name: "main".into(),
            quote_currency: "USDT".into(),
            fee_rate: dec("0.0010"),
        };
        let s = given::<PortfolioState>(vec![])
            .when(cmd.clone())
            .then_expect_events(vec![opened()]);
        assert_eq!(
            (s.version, s.status, s.opened_at),
            (1, PortfolioStatus::Open, Some(ctx().at))
        );
        given::<PortfolioState>(vec![opened()])
            .when(cmd.clone())
            .then_expect_error("already_exists");
        for bad in ["1", "-0.1", "0.000000001"] {
            let mut c = cmd.clone();
            if let PortfolioCommand::Open { fee_rate, .. } = &mut c {
                *fee_rate = dec(bad);
            }
            given::<PortfolioState>(vec![])
                .when(c)
                .then_expect_error("bad_request");
        }
        let mut c = cmd;
        if let PortfolioCommand::Open { quote_currency, .. } = &mut c {
            *quote_currency = "usdt".into();
        }
        given::<PortfolioState>(vec![])
            .when(c)
            .then_expect_error("bad_request");
    }

    #[test]
    fn commands_on_a_missing_portfolio_are_not_found() {
        for cmd in [
            PortfolioCommand::Deposit { amount: dec("1") },
            PortfolioCommand::Withdraw { amount: dec("1") },
            PortfolioCommand::Rename { name: "x".into() },
            PortfolioCommand::AttachStrategy {
                strategy_id: S.into(),
            },
            PortfolioCommand::DetachStrategy {
                strategy_id: S.into(),
            },
            PortfolioCommand::Close,
            buy("1", "1"),
        ] {
            on(vec![], facts()).when(cmd).then_expect_error("not_found");
        }
    }

    #[test]
    fn commands_on_a_closed_portfolio_are_refused() {
        for cmd in [
            PortfolioCommand::Deposit { amount: dec("1") },
            PortfolioCommand::Rename { name: "x".into() },
            PortfolioCommand::AttachStrategy {
                strategy_id: "s-2".into(),
            },
            PortfolioCommand::Close,
        ] {
            on(
                vec![opened(), deposited("10", "10"), attached(S), closed()],
                facts(),
            )
            .when(cmd)
            .then_expect_error("portfolio_closed");
        }
    }

    #[test]
    fn cash_withdrawn_to_a_zero_with_places_takes_deposits_again() {
        let mut st = given::<PortfolioState>(vec![opened()]).state().clone();
        let f = facts();
        step(
            &mut st,
            &PortfolioCommand::Deposit { amount: dec("0.1") },
            &f,
        )
        .unwrap();
        step(
            &mut st,
            &PortfolioCommand::Withdraw { amount: dec("0.1") },
            &f,
        )
        .unwrap();
        assert!(st.cash.is_zero() && st.net_deposits.is_zero());
        let out = step(&mut st, &PortfolioCommand::Deposit { amount: dec("5") }, &f).unwrap();
        assert!(
            matches!(&out[0], Event::FundsDeposited(e) if e.cash_after == dec("5")),
            "{out:?}"
        );
        assert_eq!((st.cash, st.net_deposits), (dec("5"), dec("5")));
    }

    #[test]
    fn a_closed_portfolio_lets_its_cash_out_and_its_strategies_go() {
        let mut st =
            given::<PortfolioState>(vec![opened(), deposited("10", "10"), attached(S), closed()])
                .state()
                .clone();
        let out = step(
            &mut st,
            &PortfolioCommand::Withdraw { amount: dec("10") },
            &facts(),
        )
        .unwrap();
        assert!(
            matches!(&out[0], Event::FundsWithdrawn(w) if w.cash_after.is_zero()),
            "{out:?}"
        );
        let gone = step(
            &mut st,
            &PortfolioCommand::DetachStrategy {
                strategy_id: S.into(),
            },
            &facts(),
        )
        .unwrap();
        assert!(matches!(&gone[0], Event::StrategyDetached(_)), "{gone:?}");
        assert_eq!(st.status, PortfolioStatus::Closed);
        assert!(st.attached_strategies.is_empty());
    }

    #[test]
    fn deposit_and_withdraw() {
        let s = given::<PortfolioState>(vec![opened()])
            .when(PortfolioCommand::Deposit {
                amount: dec("100.50"),
            })
            .then_expect_events(vec![Event::FundsDeposited(FundsDeposited {
                portfolio_id: P.into(),
                amount: dec("100.5"),
                cash_after: dec("100.5"),
                equity_before: Some(dec("0")),
            })]);
        assert_eq!(
            (s.cash, s.net_deposits, s.high_water_equity),
            (dec("100.5"), dec("100.5"), dec("100.5"))
        );
        let s = given::<PortfolioState>(vec![opened(), deposited("100.5", "100.5")])
            .when(PortfolioCommand::Withdraw {
                amount: dec("100.5"),
            })
            .then_expect_events(vec![Event::FundsWithdrawn(FundsWithdrawn {
                portfolio_id: P.into(),
                amount: dec("100.5"),
                cash_after: dec("0"),
                equity_before: Some(dec("100.5")),
            })]);
        assert_eq!(
            (s.cash, s.net_deposits, s.high_water_equity),
            (dec("0"), dec("0"), dec("0"))
        );
        for bad in ["0", "-5", "0.000000001"] {
            given::<PortfolioState>(vec![opened()])
                .when(PortfolioCommand::Deposit { amount: dec(bad) })
                .then_expect_error("bad_request");
            given::<PortfolioState>(vec![opened(), deposited("10", "10")])
                .when(PortfolioCommand::Withdraw { amount: dec(bad) })
                .then_expect_error("bad_request");
        }
    }

    #[test]
    fn withdraw_above_cash_is_insufficient_funds() {
        let e = given::<PortfolioState>(vec![opened(), deposited("120.5", "120.5")])
            .when(PortfolioCommand::Withdraw { amount: dec("500") })
            .then_expect_error("insufficient_funds");
        assert_eq!(e.to_string(), "withdraw 500 USDT: cash is 120.5 USDT");
        assert_eq!(e.status(), 422);
    }

    #[test]
    fn rename() {
        let s = given::<PortfolioState>(vec![opened()])
            .when(PortfolioCommand::Rename {
                name: "renamed".into(),
            })
            .then_expect_events(vec![Event::PortfolioRenamed(PortfolioRenamed {
                portfolio_id: P.into(),
                name: "renamed".into(),
            })]);
        assert_eq!(s.name, "renamed");
        given::<PortfolioState>(vec![opened()])
            .when(PortfolioCommand::Rename {
                name: "x".repeat(201),
            })
            .then_expect_error("bad_request");
    }

    #[test]
    fn attach_and_detach() {
        let attach = || PortfolioCommand::AttachStrategy {
            strategy_id: S.into(),
        };
        let detach = || PortfolioCommand::DetachStrategy {
            strategy_id: S.into(),
        };
        let s = on(vec![opened()], facts())
            .when(attach())
            .then_expect_events(vec![attached(S)]);
        assert!(s.attached_strategies.contains(S));
        on(vec![opened()], PortfolioFacts::default())
            .when(attach())
            .then_expect_error("not_found");
        on(
            vec![opened()],
            PortfolioFacts {
                strategy: Some(StrategyState::default()),
                ..facts()
            },
        )
        .when(attach())
        .then_expect_error("not_found");
        on(
            vec![opened()],
            PortfolioFacts {
                strategy: Some(strategy(&[created(S), deleted(S)])),
                ..facts()
            },
        )
        .when(attach())
        .then_expect_error("strategy_deleted");
        on(vec![opened(), attached(S)], facts())
            .when(attach())
            .then_expect_error("strategy_already_attached");
        on(vec![opened()], facts())
            .when(detach())
            .then_expect_error("strategy_not_attached");
        let s = on(vec![opened(), attached(S)], facts())
            .when(detach())
            .then_expect_events(vec![Event::StrategyDetached(StrategyDetached {
                portfolio_id: P.into(),
                strategy_id: S.into(),
            })]);
        assert!(s.attached_strategies.is_empty());
    }

    #[test]
    fn close_needs_flat_positions() {
        let mut st = given::<PortfolioState>(funded()).state().clone();
        step(&mut st, &buy("0.5", "20000"), &facts()).unwrap();
        let e = st
            .decide(&PortfolioCommand::Close, &facts(), &ctx())
            .unwrap_err();
        assert_eq!(e.code(), "position_not_flat");
        step(&mut st, &sell("0.5", "20000"), &facts()).unwrap();
        let ev = step(&mut st, &PortfolioCommand::Close, &facts()).unwrap();
        assert_eq!(ev, vec![closed()]);
        assert_eq!(st.status, PortfolioStatus::Closed);
    }

    #[test]
    fn time_rule() {
        given::<PortfolioState>(vec![opened()])
            .at(t0() - TimeDelta::milliseconds(1))
            .when(PortfolioCommand::Deposit { amount: dec("1") })
            .then_expect_error("bad_request");
        given::<PortfolioState>(vec![opened()])
            .at_now_plus(TimeDelta::seconds(6))
            .when(PortfolioCommand::Deposit { amount: dec("1") })
            .then_expect_error("bad_request");
        let s = given::<PortfolioState>(vec![opened()])
            .at(t0())
            .when(PortfolioCommand::Deposit { amount: dec("1") })
            .then_state();
        assert_eq!(s.last_at(), Some(t0()));
    }

    // ---- signals: bad requests store nothing ----

    #[test]
    fn malformed_signal_is_bad_request() {
        let mut bad_symbol = buy("1", "1");
        if let PortfolioCommand::ExecuteSignal(s) = &mut bad_symbol {
            s.symbol = "BTC.USDT".into();
        }
        for cmd in [
            bad_symbol,
            buy("1", "0"),
            buy("1", "-1"),
            buy("1", "1.000000001"),
            signal(Side::Buy, "1", "1", Some("-0.01")),
            signal(Side::Buy, "1", "1", Some("0.000000001")),
        ] {
            on(funded(), facts())
                .when(cmd)
                .then_expect_error("bad_request");
        }
        on(funded(), facts())
            .when(buy("1", "1.000000001"))
            .then_expect_error_message("price: at most 8 decimal places");
    }

    // ---- signals: every rejection reason, in order ----

    #[test]
    fn strategy_not_active() {
        let r = on(funded(), PortfolioFacts::default())
            .when(buy("0.1", "20000"))
            .then_expect_rejection("STRATEGY_NOT_ACTIVE");
        assert_eq!(r.detail, "strategy s-1 does not exist");
        assert_eq!(r.signal.quantity, dec("0.1"));
        let deleted_facts = PortfolioFacts {
            strategy: Some(strategy(&[created(S), deleted(S)])),
            ..facts()
        };
        let r = on(funded(), deleted_facts.clone())
            .when(buy("0.1", "20000"))
            .then_expect_rejection("STRATEGY_NOT_ACTIVE");
        assert_eq!(r.detail, "strategy s-1 is deleted");
        // before PORTFOLIO_CLOSED
        let mut events = funded();
        events.push(closed());
        on(events, deleted_facts)
            .when(buy("0.1", "20000"))
            .then_expect_rejection("STRATEGY_NOT_ACTIVE");
        // a facts strategy that is another one counts as unknown
        on(
            funded(),
            PortfolioFacts {
                strategy: Some(strategy(&[created("s-2")])),
                ..facts()
            },
        )
        .when(buy("0.1", "20000"))
        .then_expect_rejection("STRATEGY_NOT_ACTIVE");
    }

    #[test]
    fn strategy_not_attached() {
        let r = on(vec![opened(), deposited("100", "100")], facts())
            .when(buy("0.1", "20000"))
            .then_expect_rejection("STRATEGY_NOT_ATTACHED");
        assert_eq!(r.detail, "strategy s-1 is not attached to portfolio p-1");
    }

    #[test]
    fn portfolio_closed_is_a_stored_rejection() {
        let s = on(vec![opened(), attached(S), closed()], facts())
            .when(buy("0.1", "20000"))
            .then_state();
        assert_eq!(s.version, 4);
        on(vec![opened(), attached(S), closed()], facts())
            .when(buy("0.1", "20000"))
            .then_expect_rejection("PORTFOLIO_CLOSED");
    }

    #[test]
    fn symbol_not_allowed() {
        let mut cmd = buy("0.1", "20000");
        if let PortfolioCommand::ExecuteSignal(s) = &mut cmd {
            s.symbol = "SOL-USDT".into();
        }
        let r = on(funded(), facts())
            .when(cmd)
            .then_expect_rejection("SYMBOL_NOT_ALLOWED");
        assert_eq!(
            r.detail,
            "SOL-USDT is not in the allowed_symbols of strategy s-1"
        );
        // quote differs from the portfolio's, even when allowed
        let mut p = profile();
        p.allowed_symbols.push("ETH-BTC".into());
        let mut cmd = buy("0.1", "0.05");
        if let PortfolioCommand::ExecuteSignal(s) = &mut cmd {
            s.symbol = "ETH-BTC".into();
        }
        let r = on(funded(), facts_with(p))
            .when(cmd)
            .then_expect_rejection("SYMBOL_NOT_ALLOWED");
        assert_eq!(
            r.detail,
            "ETH-BTC: quote BTC is not the portfolio's quote currency USDT"
        );
    }

    #[test]
    fn invalid_quantity() {
        for q in ["0", "-1", "0.000000001"] {
            on(funded(), facts())
                .when(buy(q, "20000"))
                .then_expect_rejection("INVALID_QUANTITY");
            on(funded(), facts())
                .when(sell(q, "20000"))
                .then_expect_rejection("INVALID_QUANTITY");
        }
        let r = on(funded(), facts())
            .when(buy("-1", "20000"))
            .then_expect_rejection("INVALID_QUANTITY");
        assert_eq!(
            (r.detail.as_str(), r.signal.quantity),
            ("quantity -1: must be > 0", dec("-1"))
        );
        // "1.000000000" has no places: fine
        on(funded(), facts())
            .when(buy("0.100000000", "20000"))
            .then_expect_events(vec![Event::TradeExecuted(TradeExecuted {
                portfolio_id: P.into(),
                strategy_id: S.into(),
                trade_id: NEW_ID,
                symbol: "BTC-USDT".into(),
                side: Side::Buy,
                quantity: dec("0.1"),
                price: dec("20000"),
                fee: dec("2"),
                realized_pnl: dec("0"),
                cash_after: dec("22998"),
                position_after: dec("0.1"),
                cost_basis_after: dec("2002"),
                gross_entry_after: dec("2000"),
                equity_after: Some(dec("24998")),
            })]);
    }

    /// The high-water mark after a fill counts the other positions at their marks: a position
    /// that lost value is not counted at its cost, which made a halt of a portfolio whose
    /// equity never fell.
    #[test]
    fn the_high_water_mark_values_other_positions_at_their_marks() {
        let p = RiskProfile {
            max_drawdown_pct: Some(dec("0.15")),
            ..profile()
        };
        let mut st =
            given::<PortfolioState>(vec![opened(), deposited("10000", "10000"), attached(S)])
                .state()
                .clone();
        let trade = |symbol: &str, side: Side, q: &str, px: &str| {
            PortfolioCommand::ExecuteSignal(Signal {
                strategy_id: S.into(),
                symbol: symbol.into(),
                side,
                quantity: dec(q),
                price: dec(px),
                fee: Some(dec("0")),
            })
        };
        let f = facts_with(p);
        step(&mut st, &trade("ETH-USDT", Side::Buy, "1", "5000"), &f).unwrap();
        step(&mut st, &trade("BTC-USDT", Side::Buy, "1", "1000"), &f).unwrap();
        assert_eq!(st.high_water_equity.round_dp(8), dec("10000"));
        // ETH falls to 3000 as BTC rises to 3000: equity stays 10000 (cash 4000).
        let marked = PortfolioFacts {
            marks: [
                ("ETH-USDT".to_string(), dec("3000")),
                ("BTC-USDT".to_string(), dec("3000")),
            ]
            .into(),
            ..f.clone()
        };
        let sold = step(
            &mut st,
            &trade("BTC-USDT", Side::Sell, "1", "3000"),
            &marked,
        )
        .unwrap();
        let Event::TradeExecuted(t) = &sold[0] else {
            panic!("{sold:?}")
        };
        assert_eq!(t.equity_after, Some(dec("10000")));
        assert_eq!(
            st.high_water_equity,
            dec("10000"),
            "not 7000 + ETH at its cost 5000"
        );
        let ev = st
            .decide(
                &trade("BTC-USDT", Side::Buy, "0.1", "3000"),
                &marked,
                &ctx(),
            )
            .unwrap();
        assert!(matches!(&ev[0], Event::TradeExecuted(_)), "{ev:?}");

        // An event stored before `equity_after` folds as it did: the others at their cost.
        let mut old = t.clone();
        old.equity_after = None;
        let mut replayed = given::<PortfolioState>(vec![opened(), deposited("10000", "10000")])
            .state()
            .clone();
        replayed.positions = [(
            "ETH-USDT".to_string(),
            Position {
                quantity: dec("1"),
                cost_basis: dec("5000"),
                gross_entry: dec("5000"),
            },
        )]
        .into();
        replayed.apply(&Event::TradeExecuted(old), ctx().at);
        assert_eq!(replayed.high_water_equity.round_dp(8), dec("12000"));
    }

    #[test]
    fn trading_halted_on_drawdown_buys_only() {
        let p = RiskProfile {
            max_drawdown_pct: Some(dec("0.2")),
            ..profile()
        };
        let mut st =
            given::<PortfolioState>(vec![opened(), deposited("10000", "10000"), attached(S)])
                .state()
                .clone();
        let f = facts_with(p);
        step(&mut st, &signal(Side::Buy, "1", "5000", Some("0")), &f).unwrap();
        assert_eq!(st.high_water_equity.round_dp(8), dec("10000"));
        let marked = |m: &str| PortfolioFacts {
            marks: [("BTC-USDT".to_string(), dec(m))].into(),
            ..f.clone()
        };
        // equity 7000 <= 10000 * 0.8
        let r = st
            .decide(&buy("0.1", "2000"), &marked("2000"), &ctx())
            .unwrap();
        let Event::TradeSignalRejected(r) = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(r.reason, "TRADING_HALTED");
        assert_eq!(
            r.detail,
            "equity 7000 USDT is at or below 8000 USDT: 0.3 below its high-water mark 10000 USDT (max_drawdown_pct 0.2)"
        );
        // exactly at the limit: halted; just above: not
        let ev = st
            .decide(&buy("0.1", "3000"), &marked("3000"), &ctx())
            .unwrap();
        assert!(matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "TRADING_HALTED"));
        let ev = st
            .decide(&buy("0.1", "3001"), &marked("3001"), &ctx())
            .unwrap();
        assert!(matches!(&ev[0], Event::TradeExecuted(_)));
        // sells still allowed
        let ev = st
            .decide(&sell("0.5", "2000"), &marked("2000"), &ctx())
            .unwrap();
        assert!(matches!(&ev[0], Event::TradeExecuted(_)));
        // no mark: valued at the average entry price, not halted
        let ev = st.decide(&buy("0.1", "2000"), &f, &ctx()).unwrap();
        assert!(matches!(&ev[0], Event::TradeExecuted(_)));
        // a rise in the marks raises the high-water mark used by the check
        let mut up = st.clone();
        step(
            &mut up,
            &signal(Side::Buy, "0.1", "20000", Some("0")),
            &marked("20000"),
        )
        .unwrap();
        assert_eq!(up.high_water_equity.round_dp(8), dec("25000")); // cash 3000 + 1.1 at 20000
        let ev = up
            .decide(&buy("0.1", "13000"), &marked("13000"), &ctx())
            .unwrap();
        assert!(
            matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "TRADING_HALTED"),
            "{ev:?}"
        );
    }

    /// The facts of a strategy that halts buys at a 20 % drawdown, with BTC-USDT marked at
    /// `mark` (none for `None`).
    fn halting_at(mark: Option<&str>) -> PortfolioFacts {
        let mut f = facts_with(RiskProfile {
            max_drawdown_pct: Some(dec("0.2")),
            ..profile()
        });
        if let Some(m) = mark {
            f.marks.insert("BTC-USDT".to_string(), dec(m));
        }
        f
    }

    #[test]
    fn a_flow_at_a_peak_of_the_marks_keeps_the_peak() {
        let marked = |m: &str| halting_at(Some(m));
        let mut st =
            given::<PortfolioState>(vec![opened(), deposited("10000", "10000"), attached(S)])
                .state()
                .clone();
        step(
            &mut st,
            &signal(Side::Buy, "1", "5000", Some("0")),
            &halting_at(None),
        )
        .unwrap();
        assert_eq!(st.high_water_equity.round_dp(8), dec("10000"));
        // BTC marked at 15000: equity 20000, seen by the deposit made there.
        step(
            &mut st,
            &PortfolioCommand::Deposit { amount: dec("1") },
            &marked("15000"),
        )
        .unwrap();
        assert_eq!(st.high_water_equity.round_dp(8), dec("20001"));
        // Back at 10000: equity 15001, 25 % below the peak the deposit saw.
        let ev = st
            .decide(&buy("0.1", "10000"), &marked("10000"), &ctx())
            .unwrap();
        assert!(
            matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "TRADING_HALTED"),
            "{ev:?}"
        );
    }

    #[test]
    fn high_water_follows_flows_and_fills() {
        let mut st = given::<PortfolioState>(funded()).state().clone();
        assert_eq!(st.high_water_equity.round_dp(8), dec("25000"));
        step(&mut st, &buy("0.5", "20000"), &facts()).unwrap(); // equity 24990 by the fill price
        assert_eq!(st.high_water_equity.round_dp(8), dec("25000"));
        step(
            &mut st,
            &signal(Side::Sell, "0.1", "30000", Some("0")),
            &facts(),
        )
        .unwrap();
        // cash 14990 + 3000, 0.4 at 30000 = 12000
        assert_eq!(st.high_water_equity.round_dp(8), dec("29990"));
        // At the high (marked at 30000), a withdrawal moves the mark by its amount.
        let at_30k = PortfolioFacts {
            marks: [("BTC-USDT".to_string(), dec("30000"))].into(),
            ..facts()
        };
        let withdraw = |amount: &str| PortfolioCommand::Withdraw {
            amount: dec(amount),
        };
        step(&mut st, &withdraw("5000"), &at_30k).unwrap();
        assert_eq!(st.high_water_equity.round_dp(8), dec("24990"));
        step(&mut st, &withdraw("12990"), &at_30k).unwrap();
        assert_eq!(st.high_water_equity.round_dp(8), dec("12000"));
        let mut poor = given::<PortfolioState>(vec![opened(), deposited("10", "10")])
            .state()
            .clone();
        poor.high_water_equity = dec("5");
        step(&mut poor, &withdraw("10"), &facts()).unwrap();
        assert_eq!(poor.high_water_equity.round_dp(8), dec("0"));
    }

    /// A funded portfolio holding `cash` only, with the strategy attached and its high-water
    /// mark at `mark`.
    fn with_mark(cash: &str, mark: Decimal) -> PortfolioState {
        let mut st = given::<PortfolioState>(vec![opened(), deposited(cash, cash), attached(S)])
            .state()
            .clone();
        st.high_water_equity = mark;
        st
    }

    /// Whether the smallest buy is refused `TRADING_HALTED` with `f`'s profile.
    fn buys_halted(st: &PortfolioState, f: &PortfolioFacts) -> bool {
        let buy = signal(Side::Buy, "0.00000001", "1", Some("0"));
        let ev = st.decide(&buy, f, &ctx()).unwrap();
        matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "TRADING_HALTED")
    }

    fn drawdown_limit(dd: Decimal) -> PortfolioFacts {
        facts_with(RiskProfile {
            max_drawdown_pct: Some(dd),
            ..profile()
        })
    }

    /// A withdrawal that leaves the equity exactly `max_drawdown_pct` below the scaled mark
    /// halts buys, though that mark (2000 * 1300 / 1800) has no exact decimal.
    #[test]
    fn a_flow_to_exactly_the_drawdown_limit_halts() {
        let f = drawdown_limit(dec("0.1"));
        let mut st = with_mark("1800", dec("2000")); // exactly 10 % down: halted
        assert!(buys_halted(&st, &f));
        let withdraw = PortfolioCommand::Withdraw { amount: dec("500") };
        step(&mut st, &withdraw, &f).unwrap();
        assert_eq!(st.high_water_equity.round_dp(8), dec("1444.44444444"));
        assert!(buys_halted(&st, &f), "equity 1300 is 10 % below 1444.44...");

        // Just above the limit (1e-8), a withdrawal leaves it trading: the mark was rounded
        // up to 8 places once, and this withdrawal alone halted buys.
        let mut st = with_mark("1800.00000001", dec("2000"));
        assert!(!buys_halted(&st, &f));
        let withdraw = PortfolioCommand::Withdraw { amount: dec("181") };
        step(&mut st, &withdraw, &f).unwrap();
        assert!(!buys_halted(&st, &f), "hwm {}", st.high_water_equity);
    }

    /// Over many marks, limits and flows: an equity exactly at the limit stays halted after a
    /// deposit or a withdrawal, and one 1e-8 above it stays trading (28-digit division
    /// rounded to nearest let 102 of 398 withdrawals at 0.3 below 1000 trade again).
    #[test]
    fn flows_keep_the_halt_at_its_exact_boundary() {
        let mut checked = 0;
        for dd in ["0.1", "0.15", "0.2", "0.25", "0.3", "0.35"] {
            let f = drawdown_limit(dec(dd));
            for hwm in ["1000", "997", "1234.56789", "50000.5"] {
                let limit = dec(hwm) * (Decimal::ONE - dec(dd));
                for (above, want_halted) in [(Decimal::ZERO, true), (dec("0.00000001"), false)] {
                    let cash = (limit + above).to_string();
                    for cmd in [
                        PortfolioCommand::Withdraw { amount: dec("2") },
                        PortfolioCommand::Withdraw { amount: dec("181") },
                        PortfolioCommand::Withdraw {
                            amount: dec("333.33333333"),
                        },
                        PortfolioCommand::Deposit { amount: dec("1") },
                        PortfolioCommand::Deposit {
                            amount: dec("7.77777777"),
                        },
                    ] {
                        let mut st = with_mark(&cash, dec(hwm));
                        assert_eq!(
                            buys_halted(&st, &f),
                            want_halted,
                            "before: {dd} {hwm} {cash}"
                        );
                        step(&mut st, &cmd, &f).unwrap();
                        assert_eq!(
                            buys_halted(&st, &f),
                            want_halted,
                            "after {cmd:?}: dd {dd}, mark {hwm} -> {}, cash {}",
                            st.high_water_equity,
                            st.cash
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 6 * 4 * 2 * 5);

        // Withdrawals of whole amounts at many limits: a quotient cut to 27 digits (its 28th
        // rounded to 0 and dropped) is taken up too (0.02 below 1000, withdraw 201).
        let mut at_limit = 0;
        for dd in 1..100 {
            let dd = Decimal::new(dd, 2);
            let f = drawdown_limit(dd);
            for hwm in [dec("1000"), dec("10000")] {
                let cash = hwm * (Decimal::ONE - dd);
                for amount in [1, 2, 3, 7, 13, 201, 333].map(Decimal::from) {
                    if amount >= cash {
                        continue;
                    }
                    let mut st = with_mark(&cash.to_string(), hwm);
                    step(&mut st, &PortfolioCommand::Withdraw { amount }, &f).unwrap();
                    assert!(
                        buys_halted(&st, &f),
                        "withdraw {amount}: dd {dd}, mark {hwm} -> {}, cash {}",
                        st.high_water_equity,
                        st.cash
                    );
                    at_limit += 1;
                }
            }
        }
        assert!(at_limit > 1000, "{at_limit}");
    }

    #[test]
    fn the_last_unit_is_in_the_28th_digit() {
        assert_eq!(last_unit(dec("1000")), dec("0.000000000000000000000001"));
        assert_eq!(
            last_unit(dec("794.897959183673469387755102")),
            dec("0.0000000000000000000000001")
        );
        assert_eq!(last_unit(dec("0.05")), Decimal::new(1, 28));
    }

    /// In a drawdown, a flow keeps the drawdown as it is: a withdrawal alone never halts
    /// trading, a deposit never lifts a halt (flows are never returns).
    #[test]
    fn flows_in_a_drawdown_keep_it_as_it_is() {
        let p = RiskProfile {
            max_drawdown_pct: Some(dec("0.2")),
            ..profile()
        };
        let f = facts_with(p);
        let mut st =
            given::<PortfolioState>(vec![opened(), deposited("10000", "10000"), attached(S)])
                .state()
                .clone();
        step(&mut st, &signal(Side::Buy, "1", "5000", Some("0")), &f).unwrap();
        // BTC at 3500: equity 8500, 15 % below the mark of 10000.
        let at_3500 = PortfolioFacts {
            marks: [("BTC-USDT".to_string(), dec("3500"))].into(),
            ..f.clone()
        };
        let withdrawn = step(
            &mut st,
            &PortfolioCommand::Withdraw {
                amount: dec("4000"),
            },
            &at_3500,
        )
        .unwrap();
        let Event::FundsWithdrawn(w) = &withdrawn[0] else {
            panic!("{withdrawn:?}")
        };
        assert_eq!(w.equity_before, Some(dec("8500")));
        // 10000 * 4500 / 8500: still 15 % above the equity of 4500, not 25 % (6000).
        assert_eq!(st.high_water_equity.round_dp(8), dec("5294.11764706"));
        let ev = st
            .decide(
                &signal(Side::Buy, "0.1", "3500", Some("0")),
                &at_3500,
                &ctx(),
            )
            .unwrap();
        assert!(matches!(&ev[0], Event::TradeExecuted(_)), "{ev:?}");
        // Deeper, at 2500 (equity 3500, 34 % down): halted, and a deposit does not lift it.
        let at_2500 = PortfolioFacts {
            marks: [("BTC-USDT".to_string(), dec("2500"))].into(),
            ..f.clone()
        };
        step(
            &mut st,
            &PortfolioCommand::Deposit {
                amount: dec("20000"),
            },
            &at_2500,
        )
        .unwrap();
        let ev = st
            .decide(
                &signal(Side::Buy, "0.1", "2500", Some("0")),
                &at_2500,
                &ctx(),
            )
            .unwrap();
        assert!(
            matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "TRADING_HALTED"),
            "{ev:?}"
        );
    }

    #[test]
    fn oversell() {
        let mut st = given::<PortfolioState>(funded()).state().clone();
        let ev = st.decide(&sell("2", "20000"), &facts(), &ctx()).unwrap();
        assert!(
            matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "OVERSELL" && r.detail == "sell 2 BTC: holding 0")
        );
        step(&mut st, &buy("1.5", "10000"), &facts()).unwrap();
        let ev = st.decide(&sell("2", "20000"), &facts(), &ctx()).unwrap();
        let Event::TradeSignalRejected(r) = &ev[0] else {
            panic!()
        };
        assert_eq!(
            (r.reason.as_str(), r.detail.as_str()),
            ("OVERSELL", "sell 2 BTC: holding 1.5")
        );
    }

    #[test]
    fn max_open_positions() {
        let f = facts_with(RiskProfile {
            max_open_positions: 1,
            ..profile()
        });
        let mut st = given::<PortfolioState>(funded()).state().clone();
        step(&mut st, &buy("0.1", "20000"), &f).unwrap();
        let mut eth = buy("1", "1000");
        if let PortfolioCommand::ExecuteSignal(s) = &mut eth {
            s.symbol = "ETH-USDT".into();
        }
        let ev = st.decide(&eth, &f, &ctx()).unwrap();
        assert!(
            matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "MAX_OPEN_POSITIONS"),
            "{ev:?}"
        );
        // adding to an open position is fine
        executed(&step(&mut st, &buy("0.1", "20000"), &f).unwrap());
        // after closing BTC, ETH may open
        step(&mut st, &sell("0.2", "20000"), &f).unwrap();
        executed(&step(&mut st, &eth, &f).unwrap());
    }

    #[test]
    fn order_notional_bounds_apply_to_buys_and_sells() {
        let f = facts_with(RiskProfile {
            max_order_notional: dec("5000"),
            min_order_notional: Some(dec("10")),
            ..profile()
        });
        let mut st = given::<PortfolioState>(funded()).state().clone();
        let reason = |st: &PortfolioState, cmd| match &st.decide(&cmd, &f, &ctx()).unwrap()[0] {
            Event::TradeSignalRejected(r) => r.reason.clone(),
            _ => "executed".into(),
        };
        assert_eq!(
            reason(&st, buy("0.25", "20000.00000004")),
            "ORDER_NOTIONAL_ABOVE_MAX"
        );
        assert_eq!(reason(&st, buy("0.25", "20000")), "executed"); // = max
        assert_eq!(
            reason(&st, buy("0.0004", "20000")),
            "ORDER_NOTIONAL_BELOW_MIN"
        );
        assert_eq!(reason(&st, buy("0.0005", "20000")), "executed"); // = min
        step(&mut st, &buy("0.25", "20000"), &f).unwrap();
        assert_eq!(
            reason(&st, sell("0.25", "30000")),
            "ORDER_NOTIONAL_ABOVE_MAX"
        );
        assert_eq!(
            reason(&st, sell("0.0001", "20000")),
            "ORDER_NOTIONAL_BELOW_MIN"
        );
        let r = st.decide(&buy("0.3", "20000"), &f, &ctx()).unwrap();
        let Event::TradeSignalRejected(r) = &r[0] else {
            panic!()
        };
        assert_eq!(
            r.detail,
            "buy 0.3 BTC at 20000: notional 6000 USDT is above max_order_notional 5000 USDT"
        );
    }

    #[test]
    fn max_position_size_after_the_fill_at_the_fill_price() {
        let f = facts_with(RiskProfile {
            max_position_notional: dec("30000"),
            ..profile()
        });
        let mut st =
            given::<PortfolioState>(vec![opened(), deposited("100000", "100000"), attached(S)])
                .state()
                .clone();
        step(&mut st, &buy("1", "10000"), &f).unwrap();
        // 1 + 0.6 at 20000 = 32000 > 30000
        let r = st.decide(&buy("0.6", "20000"), &f, &ctx()).unwrap();
        let Event::TradeSignalRejected(r) = &r[0] else {
            panic!()
        };
        assert_eq!(r.reason, "MAX_POSITION_SIZE");
        assert_eq!(r.detail, "buy 0.6 BTC: position 1.6 BTC at 20000 is 32000 USDT, above max_position_notional 30000 USDT");
        executed(&step(&mut st, &buy("0.5", "20000"), &f).unwrap()); // exactly 30000
                                                                     // sells are never blocked by the position size
        executed(&step(&mut st, &sell("0.1", "40000"), &f).unwrap());
    }

    #[test]
    fn insufficient_cash() {
        let r = on(
            vec![opened(), deposited("10000", "10000"), attached(S)],
            facts(),
        )
        .when(buy("0.5", "20000"))
        .then_expect_rejection("INSUFFICIENT_CASH");
        assert_eq!(
            r.detail,
            "buy 0.5 BTC needs 10010 USDT (fee 10): cash is 10000 USDT"
        );
        // exactly enough
        let t = executed(
            &on(
                vec![opened(), deposited("10010", "10010"), attached(S)],
                facts(),
            )
            .when(buy("0.5", "20000"))
            .events(),
        );
        assert_eq!(t.cash_after, dec("0"));
        // a sell whose explicit fee exceeds cash plus proceeds
        let mut st =
            given::<PortfolioState>(vec![opened(), deposited("10010", "10010"), attached(S)])
                .state()
                .clone();
        step(&mut st, &buy("0.5", "20000"), &facts()).unwrap();
        let ev = st
            .decide(
                &signal(Side::Sell, "0.5", "1", Some("0.50000001")),
                &facts(),
                &ctx(),
            )
            .unwrap();
        assert!(matches!(&ev[0], Event::TradeSignalRejected(r) if r.reason == "INSUFFICIENT_CASH"));
    }

    #[test]
    fn checks_run_in_order() {
        // closed + not attached: NOT_ATTACHED comes first
        on(vec![opened(), closed()], facts())
            .when(buy("-1", "1"))
            .then_expect_rejection("STRATEGY_NOT_ATTACHED");
        // closed + bad symbol + bad quantity: PORTFOLIO_CLOSED
        on(vec![opened(), attached(S), closed()], facts())
            .when(buy("-1", "1"))
            .then_expect_rejection("PORTFOLIO_CLOSED");
        // invalid quantity before oversell
        on(funded(), facts())
            .when(sell("0.000000001", "1"))
            .then_expect_rejection("INVALID_QUANTITY");
        // oversell before notional
        on(funded(), facts())
            .when(sell("1000", "1000"))
            .then_expect_rejection("OVERSELL");
        // notional before cash
        on(funded(), facts())
            .when(buy("100", "20000"))
            .then_expect_rejection("ORDER_NOTIONAL_ABOVE_MAX");
        // position size before cash
        let f = facts_with(RiskProfile {
            max_position_notional: dec("1000"),
            ..profile()
        });
        on(vec![opened(), attached(S)], f)
            .when(buy("1", "2000"))
            .then_expect_rejection("MAX_POSITION_SIZE");
    }

    #[test]
    fn every_reason_is_covered_here() {
        // The tests above each assert one reason; this pins the list to DOMAIN.md.
        assert_eq!(reason::ALL.len(), 12);
        assert!(reason::ALL
            .iter()
            .all(|r| r.chars().all(|c| c.is_ascii_uppercase() || c == '_')));
    }

    #[test]
    fn rejection_only_bumps_the_version() {
        let before = given::<PortfolioState>(funded()).state().clone();
        let after = on(funded(), facts()).when(sell("1", "1")).then_state();
        assert_eq!(after.version, before.version + 1);
        assert_eq!(
            PortfolioState {
                version: before.version,
                last_at: before.last_at,
                ..after
            },
            before
        );
    }

    // ---- DOMAIN.md E1 ----

    #[test]
    fn a_partial_sell_releases_round8_of_the_exact_share_of_its_basis() {
        let f = facts();
        let events = vec![opened(), deposited("100000", "100000"), attached(S)];
        let mut st = given::<PortfolioState>(events).state().clone();
        let fill = |st: &mut PortfolioState, side, q, p| {
            executed(&step(st, &signal(side, q, p, Some("0")), &f).unwrap())
        };
        fill(&mut st, Side::Buy, "2.99999999", "16833.71411286");
        let t = fill(&mut st, Side::Buy, "0.00000001", "5000.43898777");
        assert_eq!(t.cost_basis_after, dec("50501.1422202472487491"));
        // The exact share, 27544.3984729149999..., is just below a midpoint: Decimal's 28
        // digits rounded it onto ...2915 and round8 released ...292.
        let t = fill(&mut st, Side::Sell, "1.63626389", "20000");
        assert_eq!(t.realized_pnl, dec("5180.87932709"));
        assert_eq!(
            t.cost_basis_after,
            dec("50501.1422202472487491") - dec("27544.39847291")
        );
    }

    /// API.md: `1.000000000` is 1. Inputs with more trailing zeros than a sum with the state
    /// has room for (25 places beside a cash of 5 integer digits and one place) are the values
    /// they write, not refused as out of range.
    #[test]
    fn inputs_with_trailing_zeros_are_their_values() {
        let zeros = |v: &str| format!("{v}{}", "0".repeat(24));
        let f = facts();
        let mut st = given::<PortfolioState>(funded()).state().clone();
        let deposit = PortfolioCommand::Deposit {
            amount: dec(&zeros("0.5")),
        };
        step(&mut st, &deposit, &f).unwrap();
        assert_eq!(st.cash, dec("25000.5"));
        let t = executed(&step(&mut st, &buy(&zeros("0.001"), "20000.5"), &f).unwrap());
        assert_eq!((t.quantity, t.fee), (dec("0.001"), dec("0.02000050")));
        assert_eq!(
            t.cash_after,
            dec("25000.5") - dec("20.0005") - dec("0.0200005")
        );
        let t = executed(&step(&mut st, &sell(&zeros("0.001"), &zeros("20000.5")), &f).unwrap());
        assert_eq!(t.position_after, dec("0"));
        let withdraw = PortfolioCommand::Withdraw {
            amount: dec(&zeros("1.0")),
        };
        step(&mut st, &withdraw, &f).unwrap();
        assert_eq!(st.cash, t.cash_after - dec("1"));
        // Into an empty portfolio and a new position: sums that start from zero.
        let long =
            |v: &str| crate::money::parse_decimal(&format!("{v}.{}", "0".repeat(25))).unwrap();
        let mut empty = given::<PortfolioState>(vec![opened(), attached(S)])
            .state()
            .clone();
        let deposit = PortfolioCommand::Deposit {
            amount: long("1000"),
        };
        step(&mut empty, &deposit, &f).unwrap();
        assert_eq!(empty.cash, dec("1000"));
        let t = executed(
            &step(
                &mut empty,
                &buy(&format!("0.01{}", "0".repeat(25)), "1000"),
                &f,
            )
            .unwrap(),
        );
        assert_eq!(t.position_after, dec("0.01"));
    }

    #[test]
    fn e1_average_cost() {
        let f = facts();
        let mut st = given::<PortfolioState>(funded()).state().clone();
        let row = |st: &PortfolioState,
                   t: &TradeExecuted,
                   fee: &str,
                   cash: &str,
                   qty: &str,
                   cb: &str,
                   realized: &str| {
            assert_eq!(t.fee, dec(fee));
            assert_eq!(st.cash, dec(cash));
            assert_eq!(t.cash_after, dec(cash));
            assert_eq!(t.position_after, dec(qty));
            assert_eq!(t.cost_basis_after, dec(cb));
            assert_eq!(t.realized_pnl, dec(realized));
            assert_eq!(
                st.positions
                    .get("BTC-USDT")
                    .map_or(dec("0"), |p| p.quantity),
                dec(qty)
            );
            assert_eq!(
                st.positions
                    .get("BTC-USDT")
                    .map_or(dec("0"), |p| p.cost_basis),
                dec(cb)
            );
        };
        let marks =
            |m: &str| -> BTreeMap<String, Decimal> { [("BTC-USDT".to_string(), dec(m))].into() };

        let t = executed(&step(&mut st, &buy("0.5", "20000"), &f).unwrap());
        row(&st, &t, "10", "14990", "0.5", "10010", "0");
        let t = executed(&step(&mut st, &buy("0.5", "22000"), &f).unwrap());
        row(&st, &t, "11", "3979", "1.0", "21021", "0");
        let v = st.valuation(&marks("23000"));
        assert_eq!((v.unrealized_pnl, v.equity), (dec("1979"), dec("26979")));
        let p = &st.positions["BTC-USDT"];
        assert_eq!(
            (p.avg_cost(), p.avg_entry_price()),
            (Some(dec("21021")), Some(dec("21000")))
        );

        let t =
            executed(&step(&mut st, &signal(Side::Sell, "0.4", "25000", Some("8")), &f).unwrap());
        row(&st, &t, "8", "13971", "0.6", "12612.6", "1583.6");
        let v = st.valuation(&marks("25000"));
        assert_eq!((v.unrealized_pnl, v.equity), (dec("2387.4"), dec("28971")));
        assert_eq!(
            v.equity - st.net_deposits,
            st.realized_pnl + v.unrealized_pnl
        );

        let t = executed(&step(&mut st, &sell("0.6", "19000"), &f).unwrap());
        row(&st, &t, "11.4", "25359.6", "0", "0", "-1224");
        assert!(st.positions.is_empty());
        assert_eq!(st.realized_pnl, dec("359.6"));
        assert_eq!(st.fees_paid, dec("40.4"));
        assert_eq!(t.trade_id, NEW_ID);
        // Unmarked positions are valued at their average entry price and flagged.
        let mut st2 = given::<PortfolioState>(funded()).state().clone();
        step(&mut st2, &buy("0.5", "20000"), &f).unwrap();
        let v = st2.valuation(&BTreeMap::new());
        assert_eq!(
            (v.equity, v.unrealized_pnl, v.unmarked),
            (dec("24990"), dec("-10"), vec!["BTC-USDT".to_string()])
        );
    }

    // ---- properties ----

    mod props {
        use proptest::prelude::*;

        use super::*;

        const SYMBOLS: [&str; 3] = ["BTC-USDT", "ETH-USDT", "SOL-USDT"];

        #[derive(Debug, Clone)]
        enum Op {
            Deposit(Decimal),
            Withdraw(Decimal),
            Trade {
                sym: usize,
                side: Side,
                q: Decimal,
                p: Decimal,
                fee: Option<Decimal>,
                marks: Vec<Decimal>,
            },
            SellAll {
                sym: usize,
                p: Decimal,
            },
            SellPart {
                sym: usize,
                pct: u32,
                p: Decimal,
            },
        }

        /// `d` cut to `s` places, never 0.
        fn places_max(d: Decimal, s: u32) -> Decimal {
            let r = d.round_dp_with_strategy(s, rust_decimal::RoundingStrategy::ToZero);
            if r.is_zero() {
                Decimal::ONE
            } else {
                r
            }
        }

        /// Up to 1e9 with up to 8 places.
        fn amount() -> impl Strategy<Value = Decimal> {
            (1i64..100_000_000_000_000_000, 0u32..=8)
                .prop_map(|(m, s)| places_max(Decimal::new(m, 8), s))
        }

        /// Mostly valid quantities up to 1000 (8 places); a few invalid (<= 0, 9 places).
        fn qty() -> impl Strategy<Value = Decimal> {
            prop_oneof![
                9 => (1i64..100_000_000_000, 0u32..=8).prop_map(|(m, s)| places_max(Decimal::new(m, 8), s)),
                1 => (-5i64..=0).prop_map(Decimal::from),
                1 => (1i64..1000).prop_map(|m| Decimal::new(m, 9)),
            ]
        }

        /// Up to 100000 with up to 8 places.
        fn price() -> impl Strategy<Value = Decimal> {
            (1i64..10_000_000_000_000, 0u32..=8)
                .prop_map(|(m, s)| places_max(Decimal::new(m, 8), s))
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                amount().prop_map(Op::Deposit),
                amount().prop_map(Op::Withdraw),
                (
                    0usize..3,
                    prop_oneof![Just(Side::Buy), Just(Side::Sell)],
                    qty(),
                    price(),
                    proptest::option::of(
                        (0i64..1_000_000, 0u32..=8).prop_map(|(m, s)| Decimal::new(m, s))
                    ),
                    proptest::collection::vec(price(), 3),
                )
                    .prop_map(|(sym, side, q, p, fee, marks)| Op::Trade {
                        sym,
                        side,
                        q,
                        p,
                        fee,
                        marks
                    }),
                (0usize..3, price()).prop_map(|(sym, p)| Op::SellAll { sym, p }),
                (0usize..3, 1u32..100, price()).prop_map(|(sym, pct, p)| Op::SellPart {
                    sym,
                    pct,
                    p
                }),
            ]
        }

        fn permissive() -> PortfolioFacts {
            facts_with(RiskProfile {
                allowed_symbols: SYMBOLS.iter().map(|s| s.to_string()).collect(),
                max_open_positions: 2,
                max_order_notional: dec("1000000000000000"),
                min_order_notional: Some(dec("0.00000001")),
                max_position_notional: dec("1000000000000000"),
                max_drawdown_pct: Some(dec("0.5")),
                max_leverage: dec("1"),
            })
        }

        fn command(op: &Op, st: &PortfolioState, facts: &mut PortfolioFacts) -> PortfolioCommand {
            facts.marks.clear();
            match op {
                Op::Deposit(a) => PortfolioCommand::Deposit { amount: *a },
                Op::Withdraw(a) => PortfolioCommand::Withdraw { amount: *a },
                Op::Trade {
                    sym,
                    side,
                    q,
                    p,
                    fee,
                    marks,
                } => {
                    for (s, m) in SYMBOLS.iter().zip(marks) {
                        facts.marks.insert(s.to_string(), *m);
                    }
                    PortfolioCommand::ExecuteSignal(Signal {
                        strategy_id: S.into(),
                        symbol: SYMBOLS[*sym].into(),
                        side: *side,
                        quantity: *q,
                        price: *p,
                        fee: *fee,
                    })
                }
                Op::SellAll { sym, p } => PortfolioCommand::ExecuteSignal(Signal {
                    strategy_id: S.into(),
                    symbol: SYMBOLS[*sym].into(),
                    side: Side::Sell,
                    quantity: st
                        .positions
                        .get(SYMBOLS[*sym])
                        .map_or(Decimal::ONE, |p| p.quantity),
                    price: *p,
                    fee: None,
                }),
                Op::SellPart { sym, pct, p } => {
                    let held = st
                        .positions
                        .get(SYMBOLS[*sym])
                        .map_or(Decimal::ONE, |p| p.quantity);
                    let q = round8(held * Decimal::from(*pct) / Decimal::ONE_HUNDRED);
                    PortfolioCommand::ExecuteSignal(Signal {
                        strategy_id: S.into(),
                        symbol: SYMBOLS[*sym].into(),
                        side: Side::Sell,
                        quantity: if q.is_zero() { held } else { q },
                        price: *p,
                        fee: None,
                    })
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            #[test]
            fn invariants_hold_and_replay_rebuilds_the_state(
                ops in proptest::collection::vec(op(), 1..40),
                marks in proptest::collection::vec(price(), 3),
            ) {
                let mut facts = permissive();
                let mut st = given::<PortfolioState>(vec![opened(), attached(S)]).state().clone();
                let mut log = vec![(opened(), t0()), (attached(S), t0())];
                for op in &ops {
                    let cmd = command(op, &st, &mut facts);
                    match step(&mut st, &cmd, &facts) {
                        Ok(events) => { log.extend(events.into_iter().map(|e| (e, ctx().at))) },
                        Err(e) => prop_assert!(
                            matches!(e.code(), "insufficient_funds"),
                            "unexpected refusal {:?} for {:?}", e, op
                        ),
                    }
                    prop_assert!(st.cash >= Decimal::ZERO, "cash {}", st.cash);
                    for (sym, p) in &st.positions {
                        prop_assert!(p.quantity > Decimal::ZERO, "{} quantity {}", sym, p.quantity);
                        prop_assert!(p.cost_basis >= Decimal::ZERO);
                        prop_assert!(p.gross_entry >= Decimal::ZERO);
                    }
                    prop_assert!(st.high_water_equity >= Decimal::ZERO);
                }
                // equity - net_deposits = realized_total + unrealized_total, at random marks
                let marks: BTreeMap<String, Decimal> =
                    SYMBOLS.iter().map(|s| s.to_string()).zip(marks).collect();
                let v = st.valuation(&marks);
                prop_assert!(v.unmarked.is_empty());
                prop_assert_eq!(v.equity - st.net_deposits, st.realized_pnl + v.unrealized_pnl);
                // replaying the stored events (through their JSON form) rebuilds the same state
                let mut replayed = PortfolioState::default();
                for (e, at) in &log {
                    let text = serde_json::to_string(e).unwrap();
                    let back: Event = serde_json::from_str(&text).unwrap();
                    prop_assert_eq!(&back, e);
                    replayed.apply(&back, *at);
                }
                prop_assert_eq!(&replayed, &st);
                prop_assert_eq!(replayed.version as usize, log.len());
            }
        }
    }
}

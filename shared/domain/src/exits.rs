//! Exit triggers (DOMAIN.md, "Exit triggers"): when a market price makes a position's stop loss,
//! take profit or trailing stop fire. Pure: the worker (`ch_readmodel::exits`) gathers the facts
//! (position, open round trip, the high mark since it opened, the portfolio's strategies) and
//! sends the sell this module decides.
//!
//! **Rules.** Against `avg_entry_price = gross_entry / quantity`:
//!
//! - stop loss when `mark <= entry * (1 - stop_loss_pct)`;
//! - take profit when `mark >= entry * (1 + take_profit_pct)`;
//! - trailing stop: active once a price since the round trip opened (the current one included)
//!   reached `entry * (1 + activation_pct)`, with `entry` the average entry price *when that
//!   price was seen*: a buy that raises the entry later does not switch an activated stop off,
//!   and one that lowers it does not activate the stop from a high seen before it
//!   ([`PositionFacts::entries`]). Once active, its stop is `high * (1 - trailing_pct)` with
//!   `high` the highest price since it activated (the running `max(stop, high * (1 -
//!   trailing))` is exactly that, as that high only rises), and it fires when `mark <= stop`;
//!   so never on the price that activates it.
//!
//! Comparisons are exact: `entry * x` is compared as `gross_entry * x` against
//! `mark * quantity`, so no rounded division decides anything.
//!
//! **Several fire at once** (one mark can cross a stop loss and a trailing stop, or a take
//! profit and a trailing stop): one sell of the whole position is issued, named after the first
//! of stop loss, trailing stop, take profit.
//!
//! **Which rule applies** ([`exit_rule`]): the strategies attached to the portfolio, active, whose
//! risk profile allows the symbol (a sell they do not allow would only be rejected), in
//! `strategy_id` order. In each, the rule for the symbol is its first rule naming the symbol
//! exactly, else its first `*` rule (a specific rule overrides the wildcard, as when sizing).
//! The first such rule that sets any exit (stop loss, take profit or trailing stop) applies; a
//! strategy without exits does not silence another strategy's stop.
//!
//! **Exactly once.** The sell's `command_id` is a UUID v5 over the portfolio, the symbol, the
//! round trip's opening stream sequence and that of its last fill, the kind, and the strategy
//! whose rule fired at its version ([`exit_command_id`]): a restarted or a second worker
//! re-sends the same id, which the command side answers with the first result. An exit the
//! risk checks rejected is tried again once the strategy changes (a raised limit, another
//! strategy's rule now applying) or the position does (a fill since), not on every later
//! price, which would store a rejection each.

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::strategy::{RiskProfile, StrategyRule};

/// What fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    StopLoss,
    TrailingStop,
    TakeProfit,
}

impl ExitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitKind::StopLoss => "stop_loss",
            ExitKind::TrailingStop => "trailing_stop",
            ExitKind::TakeProfit => "take_profit",
        }
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An open position as the exit rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionFacts {
    /// Held quantity (> 0).
    pub quantity: Decimal,
    /// Cost of the held quantity without fees (`avg_entry_price * quantity`).
    pub gross_entry: Decimal,
    /// The triggering price.
    pub mark: Decimal,
    /// The position after each fill of the open round trip (in order) with the highest price
    /// seen while it was held, up to and including `mark`'s time: what a trailing stop's
    /// activation is checked against and what it trails. Empty counts as one span of the
    /// position as it is now, at `mark`.
    ///
    /// Only a trailing stop reads `entries`: when [`needs_history`] says no, a caller may skip
    /// gathering them.
    pub entries: Vec<EntrySpan>,
}

/// The position as one fill of the round trip left it, and the highest price (up to `mark`'s
/// time) until the next fill; `None` when no price was seen in between.
#[derive(Debug, Clone, PartialEq)]
pub struct EntrySpan {
    pub quantity: Decimal,
    pub gross_entry: Decimal,
    pub high: Option<Decimal>,
}

impl PositionFacts {
    /// `gross_entry / quantity`, for display (decisions never divide).
    pub fn avg_entry_price(&self) -> Option<Decimal> {
        self.gross_entry.checked_div(self.quantity)
    }

    /// The highest price since the trailing stop activated (the current mark included), or
    /// `None` while it has not: activation is the first price at or above `entry * factor`
    /// with the entry of its time, compared as `price * quantity >= gross_entry * factor` (no
    /// division). From the span of the activating entry its high counts: the prices before
    /// the activating one in that span were below it.
    fn high_since_activation(&self, factor: Decimal) -> Option<Decimal> {
        let reached = |high: Decimal, quantity: Decimal, gross: Decimal| {
            quantity > Decimal::ZERO
                && gross > Decimal::ZERO
                && matches!((high.checked_mul(quantity), gross.checked_mul(factor)),
                            (Some(r), Some(a)) if r >= a)
        };
        let now = [EntrySpan {
            quantity: self.quantity,
            gross_entry: self.gross_entry,
            high: Some(self.mark),
        }];
        let entries = if self.entries.is_empty() {
            &now[..]
        } else {
            &self.entries[..]
        };
        let first = entries
            .iter()
            .position(|e| matches!(e.high, Some(h) if reached(h, e.quantity, e.gross_entry)))?;
        Some(
            entries[first..]
                .iter()
                .filter_map(|e| e.high)
                .fold(self.mark, Decimal::max),
        )
    }
}

/// A fired trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitTrigger {
    pub kind: ExitKind,
    /// The price level the mark crossed (stop or target), rounded to 8 places; for logs.
    pub level: Decimal,
}

/// `entry * factor` compared with `mark` without dividing: `gross * factor` vs `mark * qty`.
/// `Some(Ordering)` of `mark` against the level; `None` on overflow.
fn cmp_mark(f: &PositionFacts, factor: Decimal) -> Option<std::cmp::Ordering> {
    let level = f.gross_entry.checked_mul(factor)?;
    let mark = f.mark.checked_mul(f.quantity)?;
    Some(mark.cmp(&level))
}

fn level(f: &PositionFacts, factor: Decimal) -> Decimal {
    f.avg_entry_price()
        .and_then(|e| e.checked_mul(factor))
        .map_or(Decimal::ZERO, |l| l.round_dp(8).normalize())
}

/// Whether `rule` fires for the position at `f.mark` (see the module's rules and priority).
pub fn evaluate(rule: &StrategyRule, f: &PositionFacts) -> Option<ExitTrigger> {
    use std::cmp::Ordering::{Greater, Less};
    if f.quantity <= Decimal::ZERO || f.gross_entry <= Decimal::ZERO || f.mark <= Decimal::ZERO {
        return None;
    }
    if let Some(sl) = rule.stop_loss_pct {
        let factor = Decimal::ONE - sl;
        if matches!(cmp_mark(f, factor), Some(o) if o != Greater) {
            return Some(ExitTrigger {
                kind: ExitKind::StopLoss,
                level: level(f, factor),
            });
        }
    }
    if let Some(ts) = &rule.trailing_stop {
        if let Some(high) = f.high_since_activation(Decimal::ONE + ts.activation_pct) {
            if let Some(stop) = high.checked_mul(Decimal::ONE - ts.trailing_pct) {
                if f.mark <= stop {
                    return Some(ExitTrigger {
                        kind: ExitKind::TrailingStop,
                        level: stop.round_dp(8).normalize(),
                    });
                }
            }
        }
    }
    if let Some(tp) = rule.take_profit_pct {
        let factor = Decimal::ONE + tp;
        if matches!(cmp_mark(f, factor), Some(o) if o != Less) {
            return Some(ExitTrigger {
                kind: ExitKind::TakeProfit,
                level: level(f, factor),
            });
        }
    }
    None
}

/// A strategy attached to the portfolio (active), as the exit rules need it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedStrategy {
    pub strategy_id: String,
    /// The strategy's version (its events so far): part of its exits' command ids.
    pub version: u64,
    pub rules: Vec<StrategyRule>,
    pub risk_profile: RiskProfile,
}

fn has_exit(rule: &StrategyRule) -> bool {
    rule.stop_loss_pct.is_some() || rule.take_profit_pct.is_some() || rule.trailing_stop.is_some()
}

/// Whether deciding the exit of a position in `symbol` needs the round trip's history
/// ([`PositionFacts::entries`]): only when the rule that
/// applies has a trailing stop.
pub fn needs_history(strategies: &[AttachedStrategy], symbol: &str) -> bool {
    exit_rule(strategies, symbol).is_some_and(|(_, r)| r.trailing_stop.is_some())
}

/// The rule whose exits apply to a position in `symbol`, with its strategy (see the module's
/// "Which rule applies").
pub fn exit_rule<'a>(
    strategies: &'a [AttachedStrategy],
    symbol: &str,
) -> Option<(&'a AttachedStrategy, &'a StrategyRule)> {
    let mut ordered: Vec<&AttachedStrategy> = strategies.iter().collect();
    ordered.sort_by(|a, b| a.strategy_id.cmp(&b.strategy_id));
    ordered
        .into_iter()
        .filter(|s| s.risk_profile.allows(symbol))
        .filter_map(|s| {
            let rule = s
                .rules
                .iter()
                .find(|r| r.symbol == symbol)
                .or_else(|| s.rules.iter().find(|r| r.symbol == "*"))?;
            has_exit(rule).then_some((s, rule))
        })
        .next()
}

/// Namespace of exit `command_id`s (a fixed random UUID).
const EXIT_NAMESPACE: Uuid = Uuid::from_u128(0x6a1c_93e4_7d0b_4f5e_9b2a_0c8e_5d41_f7a3);

/// The deterministic `command_id` of the exit sell of one round trip (the stream sequences of
/// its opening fill and of its last) and trigger kind, by the rule of `strategy` (its id and
/// version). An exit refused by the portfolio's checks is not sent again at later prices under
/// the same id (it would store a rejection each time); a changed strategy or a changed
/// position (a fill since) makes a new one, and the exit is tried again.
pub fn exit_command_id(
    portfolio_id: &str,
    symbol: &str,
    trip: Trip,
    kind: ExitKind,
    strategy: (&str, u64),
) -> Uuid {
    let (strategy_id, version) = strategy;
    let Trip {
        opened_seq,
        last_fill_seq,
    } = trip;
    let name = format!(
        "exit/{portfolio_id}/{symbol}/{opened_seq}/{last_fill_seq}/{}/{strategy_id}@{version}",
        kind.as_str()
    );
    Uuid::new_v5(&EXIT_NAMESPACE, name.as_bytes())
}

/// An open round trip by the stream sequences of its fills: the first (it opened) and the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trip {
    pub opened_seq: u64,
    pub last_fill_seq: u64,
}

/// The exit to send for one position: which strategy names it, what fired, the command id.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitDecision {
    pub strategy_id: String,
    pub rule_id: String,
    pub trigger: ExitTrigger,
    /// Sell this (the whole position) at `price` (the triggering mark).
    pub quantity: Decimal,
    pub price: Decimal,
    pub command_id: Uuid,
}

/// Decides the exit of one position of `portfolio_id` in `symbol` held by round trip `trip`,
/// or `None` when nothing fires.
pub fn decide_exit(
    portfolio_id: &str,
    symbol: &str,
    trip: Trip,
    facts: &PositionFacts,
    strategies: &[AttachedStrategy],
) -> Option<ExitDecision> {
    let (strategy, rule) = exit_rule(strategies, symbol)?;
    let trigger = evaluate(rule, facts)?;
    Some(ExitDecision {
        strategy_id: strategy.strategy_id.clone(),
        rule_id: rule.rule_id.clone(),
        command_id: exit_command_id(
            portfolio_id,
            symbol,
            trip,
            trigger.kind,
            (&strategy.strategy_id, strategy.version),
        ),
        trigger,
        quantity: facts.quantity,
        price: facts.mark,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{Stake, StakeMode, TrailingStop};

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn rule(sl: Option<&str>, tp: Option<&str>, ts: Option<(&str, &str)>) -> StrategyRule {
        StrategyRule {
            rule_id: "r1".into(),
            symbol: "*".into(),
            stake: Stake {
                mode: StakeMode::FixedQuote,
                value: d("1000"),
            },
            stop_loss_pct: sl.map(d),
            take_profit_pct: tp.map(d),
            trailing_stop: ts.map(|(t, a)| TrailingStop {
                trailing_pct: d(t),
                activation_pct: d(a),
            }),
        }
    }

    fn trip(opened_seq: u64, last_fill_seq: u64) -> Trip {
        Trip {
            opened_seq,
            last_fill_seq,
        }
    }

    /// 2 units bought at 100 (gross 200), the price at most `high` since (and `mark` now).
    fn at(mark: &str, high: &str) -> PositionFacts {
        PositionFacts {
            quantity: d("2"),
            gross_entry: d("200"),
            mark: d(mark),
            entries: vec![EntrySpan {
                quantity: d("2"),
                gross_entry: d("200"),
                high: Some(d(high).max(d(mark))),
            }],
        }
    }

    fn kind(r: &StrategyRule, mark: &str, high: &str) -> Option<ExitKind> {
        evaluate(r, &at(mark, high)).map(|t| t.kind)
    }

    #[test]
    fn stop_loss_fires_at_and_below_its_level() {
        let r = rule(Some("0.05"), None, None);
        assert_eq!(kind(&r, "95.01", "100"), None);
        let t = evaluate(&r, &at("95", "100")).unwrap();
        assert_eq!(t.kind, ExitKind::StopLoss);
        assert_eq!(t.level, d("95"));
        assert_eq!(kind(&r, "80", "100"), Some(ExitKind::StopLoss));
    }

    #[test]
    fn take_profit_fires_at_and_above_its_level() {
        let r = rule(None, Some("0.1"), None);
        assert_eq!(kind(&r, "109.99", "109.99"), None);
        let t = evaluate(&r, &at("110", "110")).unwrap();
        assert_eq!((t.kind, t.level), (ExitKind::TakeProfit, d("110")));
        assert_eq!(kind(&r, "150", "150"), Some(ExitKind::TakeProfit));
    }

    #[test]
    fn trailing_stop_needs_activation_then_follows_the_high() {
        // Activation at 105, trailing 10 %.
        let r = rule(None, None, Some(("0.1", "0.05")));
        // Never activated: the high stayed below 105, so a fall changes nothing.
        assert_eq!(kind(&r, "90", "104.99"), None);
        // Activated at 105: stop 94.5.
        assert_eq!(kind(&r, "94.51", "105"), None);
        let t = evaluate(&r, &at("94.5", "105")).unwrap();
        assert_eq!((t.kind, t.level), (ExitKind::TrailingStop, d("94.5")));
        // The high rose to 120: stop 108, above the entry.
        assert_eq!(kind(&r, "108.01", "120"), None);
        let t = evaluate(&r, &at("108", "120")).unwrap();
        assert_eq!((t.kind, t.level), (ExitKind::TrailingStop, d("108")));
        // The current mark is the new high: never fires on itself.
        assert_eq!(kind(&r, "130", "120"), None);
    }

    #[test]
    fn domain_scenario_trailing_stop() {
        // Buy at 100; activation 5 %, trailing 10 %: 100 -> 104 -> 110 -> 120 -> 115 -> 109 -> 107.
        let r = rule(Some("0.2"), Some("0.5"), Some(("0.1", "0.05")));
        let path = ["104", "110", "120", "115", "109", "107"];
        let mut high = Decimal::ZERO;
        let fired: Vec<Option<ExitKind>> = path
            .iter()
            .map(|p| {
                high = high.max(d(p));
                kind(&r, p, &high.to_string())
            })
            .collect();
        assert_eq!(
            fired,
            vec![None, None, None, None, None, Some(ExitKind::TrailingStop)]
        );
    }

    /// A span of the trip: `qty` units for `gross`, the highest price while so held.
    fn span(qty: &str, gross: &str, high: Option<&str>) -> EntrySpan {
        EntrySpan {
            quantity: d(qty),
            gross_entry: d(gross),
            high: high.map(d),
        }
    }

    #[test]
    fn an_activation_counts_against_the_entry_of_its_time() {
        // Activation 5 %, trailing 10 %.
        let r = rule(None, None, Some(("0.1", "0.05")));
        // 1 bought at 100, the price reached 110 (active, stop 99); then 1 more at 110: entry
        // 105, whose activation level (110.25) the high never reached. Still active: at 98 the
        // stop (110 * 0.9 = 99) fires.
        let mut f = PositionFacts {
            quantity: d("2"),
            gross_entry: d("210"),
            mark: d("98"),
            entries: vec![span("1", "100", Some("110")), span("2", "210", Some("110"))],
        };
        let t = evaluate(&r, &f).unwrap();
        assert_eq!((t.kind, t.level), (ExitKind::TrailingStop, d("99")));
        // Judged on today's entry alone it would not have fired.
        f.entries = vec![span("2", "210", Some("110"))];
        assert_eq!(evaluate(&r, &f), None);

        // 1 bought at 100, the price reached 104 (not active: 105 needed); then 1 more at 90:
        // entry 95, activation level 99.75, which the old high passes but no price since the
        // second buy (at most 94) reached. Not active: 93 does not fire.
        let mut f = PositionFacts {
            quantity: d("2"),
            gross_entry: d("190"),
            mark: d("93"),
            entries: vec![span("1", "100", Some("104")), span("2", "190", Some("94"))],
        };
        assert_eq!(evaluate(&r, &f), None);
        // A price since then at 99.75 activates it; the stop trails the high since then, not
        // the older 104: 99.75 * 0.9 = 89.775, so 93 does not fire and 89.775 does.
        f.entries[1].high = Some(d("99.75"));
        assert_eq!(evaluate(&r, &f), None);
        f.mark = d("89.775");
        let t = evaluate(&r, &f).unwrap();
        assert_eq!((t.kind, t.level), (ExitKind::TrailingStop, d("89.775")));
        // Never on the activating price itself, however high the trip went before: a 1 %
        // trail below 104 is 102.96, above the activating 99.75.
        let tight = rule(None, None, Some(("0.01", "0.05")));
        f.mark = d("99.75");
        assert_eq!(evaluate(&tight, &f), None);
        // A span without prices activates nothing; nor does one with no cost (a row without
        // its entry).
        f.entries[1].high = None;
        assert_eq!(evaluate(&r, &f), None);
        f.entries = vec![span("1", "0", Some("104"))];
        assert_eq!(evaluate(&r, &f), None);
    }

    #[test]
    fn several_at_once_use_the_first_of_sl_ts_tp() {
        // Stop loss at 95 and an activated trailing stop with a stop (90) below it.
        let r = rule(Some("0.05"), None, Some(("0.5", "0.8")));
        assert_eq!(kind(&r, "89", "180"), Some(ExitKind::StopLoss));
        // Take profit at 120 and a trailing stop at 180 * 0.9 = 162.
        let r = rule(None, Some("0.2"), Some(("0.1", "0.1")));
        assert_eq!(kind(&r, "150", "180"), Some(ExitKind::TrailingStop));
        assert_eq!(kind(&r, "170", "180"), Some(ExitKind::TakeProfit));
    }

    #[test]
    fn comparisons_are_exact_with_an_inexact_average() {
        // 3 units for 100: entry 33.333...; stop loss 10 % at exactly 30 (gross 90 / 3).
        let f = |mark: &str| PositionFacts {
            quantity: d("3"),
            gross_entry: d("100"),
            mark: d(mark),
            entries: Vec::new(),
        };
        let r = rule(Some("0.1"), None, None);
        assert!(evaluate(&r, &f("30.00000001")).is_none());
        assert_eq!(
            evaluate(&r, &f("30")).map(|t| t.kind),
            Some(ExitKind::StopLoss)
        );
    }

    #[test]
    fn a_rule_without_exits_never_fires() {
        let r = rule(None, None, None);
        assert_eq!(kind(&r, "1", "1000"), None);
    }

    fn profile(symbols: &[&str]) -> RiskProfile {
        RiskProfile {
            allowed_symbols: symbols.iter().map(|s| s.to_string()).collect(),
            max_open_positions: 5,
            max_order_notional: d("100000"),
            min_order_notional: None,
            max_position_notional: d("100000"),
            max_drawdown_pct: None,
            max_leverage: Decimal::ONE,
        }
    }

    fn strat(id: &str, symbols: &[&str], rules: Vec<StrategyRule>) -> AttachedStrategy {
        AttachedStrategy {
            strategy_id: id.into(),
            version: 1,
            rules,
            risk_profile: profile(symbols),
        }
    }

    fn named(id: &str, symbol: &str, sl: Option<&str>) -> StrategyRule {
        StrategyRule {
            rule_id: id.into(),
            symbol: symbol.into(),
            ..rule(sl, None, None)
        }
    }

    #[test]
    fn rule_choice_by_strategy_id_exact_symbol_then_wildcard() {
        let s = vec![
            strat(
                "s2",
                &["BTC-USDT"],
                vec![named("b", "BTC-USDT", Some("0.02"))],
            ),
            strat(
                "s1",
                &["BTC-USDT", "ETH-USDT"],
                vec![
                    named("w", "*", Some("0.1")),
                    named("x", "BTC-USDT", Some("0.05")),
                ],
            ),
        ];
        let (st, r) = exit_rule(&s, "BTC-USDT").unwrap();
        assert_eq!((st.strategy_id.as_str(), r.rule_id.as_str()), ("s1", "x"));
        let (st, r) = exit_rule(&s, "ETH-USDT").unwrap();
        assert_eq!((st.strategy_id.as_str(), r.rule_id.as_str()), ("s1", "w"));
        assert!(exit_rule(&s, "SOL-USDT").is_none());
    }

    #[test]
    fn rule_choice_skips_strategies_without_exits_or_not_allowing_the_symbol() {
        let s = vec![
            strat("a", &["BTC-USDT"], vec![named("none", "*", None)]),
            strat("b", &["ETH-USDT"], vec![named("eth", "*", Some("0.1"))]),
            strat("c", &["BTC-USDT"], vec![named("btc", "*", Some("0.1"))]),
        ];
        let (st, r) = exit_rule(&s, "BTC-USDT").unwrap();
        assert_eq!((st.strategy_id.as_str(), r.rule_id.as_str()), ("c", "btc"));
    }

    #[test]
    fn only_the_rule_that_applies_decides_whether_the_trip_history_is_needed() {
        let trailing = |id: &str, symbol: &str| StrategyRule {
            rule_id: id.into(),
            symbol: symbol.into(),
            ..rule(None, None, Some(("0.1", "0.05")))
        };
        // s1's exact BTC rule (a stop loss) overrides its trailing `*` rule for BTC, and comes
        // before s2's trailing stop: no history for BTC; ETH falls to the `*` rule.
        let s = vec![
            strat("s2", &["BTC-USDT"], vec![trailing("t2", "*")]),
            strat(
                "s1",
                &["BTC-USDT", "ETH-USDT"],
                vec![trailing("t1", "*"), named("x", "BTC-USDT", Some("0.05"))],
            ),
        ];
        assert!(!needs_history(&s, "BTC-USDT"));
        assert!(needs_history(&s, "ETH-USDT"));
        assert!(!needs_history(&s, "SOL-USDT"));
        assert!(needs_history(&s[..1], "BTC-USDT"));
    }

    #[test]
    fn command_ids_are_deterministic_per_trip_kind_and_strategy_version() {
        let id = |p: &str, seq: u64, kind: ExitKind, s: (&str, u64)| {
            exit_command_id(p, "BTC-USDT", trip(seq, seq), kind, s)
        };
        let a = id("p1", 7, ExitKind::StopLoss, ("s1", 1));
        assert_eq!(a, id("p1", 7, ExitKind::StopLoss, ("s1", 1)));
        assert_eq!(a.get_version_num(), 5);
        assert_ne!(a, id("p1", 8, ExitKind::StopLoss, ("s1", 1)));
        assert_ne!(a, id("p1", 7, ExitKind::TakeProfit, ("s1", 1)));
        assert_ne!(a, id("p2", 7, ExitKind::StopLoss, ("s1", 1)));
        // A changed strategy, or another one's rule: a new attempt after a rejection.
        assert_ne!(a, id("p1", 7, ExitKind::StopLoss, ("s1", 2)));
        assert_ne!(a, id("p1", 7, ExitKind::StopLoss, ("s2", 1)));
        // So does a changed position: a fill since.
        let last = |seq| {
            exit_command_id(
                "p1",
                "BTC-USDT",
                trip(7, seq),
                ExitKind::StopLoss,
                ("s1", 1),
            )
        };
        assert_eq!(a, last(7));
        assert_ne!(a, last(9));
    }

    #[test]
    fn decide_exit_sells_the_whole_position_at_the_mark() {
        let s = vec![strat(
            "s1",
            &["BTC-USDT"],
            vec![named("r", "*", Some("0.05"))],
        )];
        let e = decide_exit("p1", "BTC-USDT", trip(3, 4), &at("90", "100"), &s).unwrap();
        assert_eq!(e.strategy_id, "s1");
        assert_eq!(e.quantity, d("2"));
        assert_eq!(e.price, d("90"));
        assert_eq!(
            e.command_id,
            exit_command_id("p1", "BTC-USDT", trip(3, 4), ExitKind::StopLoss, ("s1", 1))
        );
        assert!(decide_exit("p1", "BTC-USDT", trip(3, 4), &at("96", "100"), &s).is_none());
    }
}

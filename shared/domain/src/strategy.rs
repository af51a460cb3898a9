//! The Strategy aggregate: rules and a risk profile, owned by a user; `active` or `deleted`.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::aggregate::check_monotonic_time;
use crate::event::{StrategyCreated, StrategyDeleted, StrategyUpdated};
use crate::ids::{validate_id, validate_name, validate_symbol};
use crate::money::{exact, validate_amount, validate_fraction};
use crate::{Aggregate, AggregateType, Ctx, DomainError, Event};

/// `Serialize` and `Deserialize` for the structs a strategy request nests, derived with
/// `#[serde(remote = "Self")]` (which makes the derived functions inherent): serialized as
/// derived, and read from a JSON object only. serde's derive also takes a struct as an array of
/// its fields in their order, which `deny_unknown_fields` does not see: `[["BTC-USDT"], 3,
/// "50000", ...]` would pass for a risk profile with no field named, and two swapped limits
/// with it (API.md: requests are JSON objects; a typo never passes silently).
macro_rules! from_objects_only {
    ($($t:ty),+ $(,)?) => {$(
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                <$t>::serialize(self, s)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Fields;
                impl<'de> serde::de::Visitor<'de> for Fields {
                    type Value = $t;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a JSON object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<$t, A::Error> {
                        <$t>::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(Fields)
            }
        }
    )+};
}

from_objects_only!(Stake, TrailingStop, StrategyRule, RiskProfile);

/// How a rule sizes its orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StakeMode {
    /// `value` is an amount of the quote currency.
    FixedQuote,
    /// `value` is a fraction of equity, in (0, 1].
    PctEquity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct Stake {
    #[serde(deserialize_with = "crate::request::by_name")]
    pub mode: StakeMode,
    #[serde(deserialize_with = "exact::deserialize")]
    pub value: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct TrailingStop {
    #[serde(deserialize_with = "exact::deserialize")]
    pub trailing_pct: Decimal,
    #[serde(deserialize_with = "exact::deserialize")]
    pub activation_pct: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct StrategyRule {
    pub rule_id: String,
    /// `BASE-QUOTE`, or `*` for every allowed symbol.
    pub symbol: String,
    pub stake: Stake,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "exact::option::deserialize"
    )]
    pub stop_loss_pct: Option<Decimal>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "exact::option::deserialize"
    )]
    pub take_profit_pct: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trailing_stop: Option<TrailingStop>,
}

impl StrategyRule {
    /// The same rule with every decimal normalized (as stored in events).
    pub fn normalized(mut self) -> Self {
        self.stake.value = self.stake.value.normalize();
        self.stop_loss_pct = self.stop_loss_pct.map(|d| d.normalize());
        self.take_profit_pct = self.take_profit_pct.map(|d| d.normalize());
        if let Some(t) = &mut self.trailing_stop {
            t.trailing_pct = t.trailing_pct.normalize();
            t.activation_pct = t.activation_pct.normalize();
        }
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct RiskProfile {
    pub allowed_symbols: Vec<String>,
    pub max_open_positions: u32,
    #[serde(deserialize_with = "exact::deserialize")]
    pub max_order_notional: Decimal,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "exact::option::deserialize"
    )]
    pub min_order_notional: Option<Decimal>,
    #[serde(deserialize_with = "exact::deserialize")]
    pub max_position_notional: Decimal,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "exact::option::deserialize"
    )]
    pub max_drawdown_pct: Option<Decimal>,
    #[serde(deserialize_with = "exact::deserialize")]
    pub max_leverage: Decimal,
}

impl RiskProfile {
    /// The same profile with every decimal normalized (as stored in events).
    pub fn normalized(mut self) -> Self {
        self.max_order_notional = self.max_order_notional.normalize();
        self.min_order_notional = self.min_order_notional.map(|d| d.normalize());
        self.max_position_notional = self.max_position_notional.normalize();
        self.max_drawdown_pct = self.max_drawdown_pct.map(|d| d.normalize());
        self.max_leverage = self.max_leverage.normalize();
        self
    }

    /// Whether `symbol` is in `allowed_symbols`.
    pub fn allows(&self, symbol: &str) -> bool {
        self.allowed_symbols.iter().any(|s| s == symbol)
    }
}

/// Validates a risk profile on its own (fields named `risk_profile.*`).
///
/// # Errors
/// [`DomainError::BadRequest`] naming the first invalid field.
pub fn validate_risk_profile(p: &RiskProfile) -> Result<(), DomainError> {
    if p.allowed_symbols.is_empty() {
        return Err(DomainError::bad_request(
            "risk_profile.allowed_symbols: must not be empty",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, s) in p.allowed_symbols.iter().enumerate() {
        let field = format!("risk_profile.allowed_symbols[{i}]");
        validate_symbol(&field, s)?;
        if !seen.insert(s.as_str()) {
            return Err(DomainError::bad_request(format!(
                "{field}: duplicate symbol {s}"
            )));
        }
    }
    if p.max_open_positions < 1 {
        return Err(DomainError::bad_request(
            "risk_profile.max_open_positions: must be >= 1",
        ));
    }
    validate_amount("risk_profile.max_order_notional", p.max_order_notional)?;
    if let Some(min) = p.min_order_notional {
        validate_amount("risk_profile.min_order_notional", min)?;
        if min > p.max_order_notional {
            return Err(DomainError::bad_request(
                "risk_profile.min_order_notional: must be <= max_order_notional",
            ));
        }
    }
    validate_amount(
        "risk_profile.max_position_notional",
        p.max_position_notional,
    )?;
    if let Some(dd) = p.max_drawdown_pct {
        validate_fraction("risk_profile.max_drawdown_pct", dd)?;
    }
    if p.max_leverage != Decimal::ONE {
        return Err(DomainError::bad_request(
            "risk_profile.max_leverage: must be 1",
        ));
    }
    Ok(())
}

/// Validates rules and a risk profile together (DOMAIN.md "Risk profile and rules"): rule ids
/// valid and unique, rule symbols `*` or within `allowed_symbols`, stakes `> 0` with at most 8
/// places (`pct_equity` at most 1), percentages in (0, 1), `max_leverage == 1`,
/// `take_profit_pct > trailing_stop.activation_pct`.
///
/// # Errors
/// [`DomainError::BadRequest`] naming the first invalid field (`rules[0].stake.value: ...`).
pub fn validate_strategy(
    rules: &[StrategyRule],
    risk_profile: &RiskProfile,
) -> Result<(), DomainError> {
    validate_risk_profile(risk_profile)?;
    let mut ids = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        let f = |name: &str| format!("rules[{i}].{name}");
        validate_id(&f("rule_id"), &r.rule_id)?;
        if !ids.insert(r.rule_id.as_str()) {
            return Err(DomainError::bad_request(format!(
                "{}: duplicate rule_id {}",
                f("rule_id"),
                r.rule_id
            )));
        }
        if r.symbol != "*" {
            validate_symbol(&f("symbol"), &r.symbol)?;
            if !risk_profile.allows(&r.symbol) {
                return Err(DomainError::bad_request(format!(
                    "{}: {} is not in risk_profile.allowed_symbols",
                    f("symbol"),
                    r.symbol
                )));
            }
        }
        validate_amount(&f("stake.value"), r.stake.value)?;
        if r.stake.mode == StakeMode::PctEquity && r.stake.value > Decimal::ONE {
            return Err(DomainError::bad_request(format!(
                "{}: must be <= 1 when stake.mode is pct_equity",
                f("stake.value")
            )));
        }
        if let Some(sl) = r.stop_loss_pct {
            validate_fraction(&f("stop_loss_pct"), sl)?;
        }
        if let Some(tp) = r.take_profit_pct {
            validate_fraction(&f("take_profit_pct"), tp)?;
        }
        if let Some(t) = &r.trailing_stop {
            validate_fraction(&f("trailing_stop.trailing_pct"), t.trailing_pct)?;
            validate_fraction(&f("trailing_stop.activation_pct"), t.activation_pct)?;
            if let Some(tp) = r.take_profit_pct {
                if tp <= t.activation_pct {
                    return Err(DomainError::bad_request(format!(
                        "{}: must be > trailing_stop.activation_pct",
                        f("take_profit_pct")
                    )));
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyStatus {
    #[default]
    Active,
    Deleted,
}

impl StrategyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyStatus::Active => "active",
            StrategyStatus::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StrategyCommand {
    Create {
        strategy_id: String,
        user_id: String,
        name: String,
        rules: Vec<StrategyRule>,
        risk_profile: RiskProfile,
    },
    Update {
        strategy_id: String,
        name: Option<String>,
        rules: Option<Vec<StrategyRule>>,
        risk_profile: Option<RiskProfile>,
    },
    Delete {
        strategy_id: String,
    },
}

impl StrategyCommand {
    pub fn strategy_id(&self) -> &str {
        match self {
            StrategyCommand::Create { strategy_id, .. }
            | StrategyCommand::Update { strategy_id, .. }
            | StrategyCommand::Delete { strategy_id } => strategy_id,
        }
    }
}

/// A strategy folded from its events. `version == 0` means it does not exist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StrategyState {
    pub version: u64,
    pub strategy_id: String,
    pub user_id: String,
    pub name: String,
    pub rules: Vec<StrategyRule>,
    pub risk_profile: Option<RiskProfile>,
    pub status: StrategyStatus,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl StrategyState {
    /// Exists and is not deleted.
    pub fn is_active(&self) -> bool {
        self.version > 0 && self.status == StrategyStatus::Active
    }

    fn require_live(&self, strategy_id: &str) -> Result<(), DomainError> {
        if self.version == 0 {
            return Err(DomainError::NotFound(format!(
                "strategy {strategy_id} not found"
            )));
        }
        if self.status == StrategyStatus::Deleted {
            return Err(DomainError::refused(
                "strategy_deleted",
                format!("strategy {strategy_id} is deleted"),
            ));
        }
        Ok(())
    }
}

impl Aggregate for StrategyState {
    const TYPE: AggregateType = AggregateType::Strategy;
    type Command = StrategyCommand;
    type Facts = ();

    fn version(&self) -> u64 {
        self.version
    }

    fn last_at(&self) -> Option<DateTime<Utc>> {
        self.updated_at
    }

    fn apply(&mut self, event: &Event, at: DateTime<Utc>) {
        self.version += 1;
        match event {
            Event::StrategyCreated(e) => {
                self.strategy_id.clone_from(&e.strategy_id);
                self.user_id.clone_from(&e.user_id);
                self.name.clone_from(&e.name);
                self.rules.clone_from(&e.rules);
                self.risk_profile = Some(e.risk_profile.clone());
                self.status = StrategyStatus::Active;
                self.created_at = Some(at);
                self.updated_at = Some(at);
            }
            Event::StrategyUpdated(e) => {
                if let Some(n) = &e.name {
                    self.name.clone_from(n);
                }
                if let Some(r) = &e.rules {
                    self.rules.clone_from(r);
                }
                if let Some(p) = &e.risk_profile {
                    self.risk_profile = Some(p.clone());
                }
                self.updated_at = Some(at);
            }
            Event::StrategyDeleted(_) => {
                self.status = StrategyStatus::Deleted;
                self.updated_at = Some(at);
            }
            _ => {}
        }
    }

    fn decide(
        &self,
        command: &StrategyCommand,
        _facts: &(),
        ctx: &Ctx,
    ) -> Result<Vec<Event>, DomainError> {
        match command {
            StrategyCommand::Create { strategy_id, .. } if self.version > 0 => {
                return Err(DomainError::AlreadyExists(format!(
                    "strategy {strategy_id} already exists"
                )));
            }
            StrategyCommand::Update { strategy_id, .. }
            | StrategyCommand::Delete { strategy_id }
                if self.version == 0 =>
            {
                return Err(DomainError::NotFound(format!(
                    "strategy {strategy_id} not found"
                )));
            }
            _ => {}
        }
        check_monotonic_time(self.last_at(), ctx)?;
        match command {
            StrategyCommand::Create {
                strategy_id,
                user_id,
                name,
                rules,
                risk_profile,
            } => {
                validate_id("strategy_id", strategy_id)?;
                validate_id("user_id", user_id)?;
                validate_name("strategy_name", name)?;
                validate_strategy(rules, risk_profile)?;
                Ok(vec![Event::StrategyCreated(StrategyCreated {
                    strategy_id: strategy_id.clone(),
                    user_id: user_id.clone(),
                    name: name.clone(),
                    rules: rules
                        .iter()
                        .cloned()
                        .map(StrategyRule::normalized)
                        .collect(),
                    risk_profile: risk_profile.clone().normalized(),
                })])
            }
            StrategyCommand::Update {
                strategy_id,
                name,
                rules,
                risk_profile,
            } => {
                self.require_live(strategy_id)?;
                if name.is_none() && rules.is_none() && risk_profile.is_none() {
                    return Err(DomainError::bad_request(
                        "nothing to update: give strategy_name, rules or risk_profile",
                    ));
                }
                if let Some(n) = name {
                    validate_name("strategy_name", n)?;
                }
                let merged_rules = rules.as_ref().unwrap_or(&self.rules);
                let merged_profile = match (risk_profile, &self.risk_profile) {
                    (Some(p), _) | (None, Some(p)) => p,
                    (None, None) => {
                        return Err(DomainError::bad_request("risk_profile: missing"));
                    }
                };
                validate_strategy(merged_rules, merged_profile)?;
                Ok(vec![Event::StrategyUpdated(StrategyUpdated {
                    strategy_id: self.strategy_id.clone(),
                    name: name.clone(),
                    rules: rules
                        .as_ref()
                        .map(|r| r.iter().cloned().map(StrategyRule::normalized).collect()),
                    risk_profile: risk_profile.clone().map(RiskProfile::normalized),
                })])
            }
            StrategyCommand::Delete { strategy_id } => {
                self.require_live(strategy_id)?;
                Ok(vec![Event::StrategyDeleted(StrategyDeleted {
                    strategy_id: self.strategy_id.clone(),
                })])
            }
        }
    }
}

/// Fixtures shared by the strategy and portfolio tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::testing::dec;

    pub fn profile() -> RiskProfile {
        RiskProfile {
            allowed_symbols: vec!["BTC-USDT".into(), "ETH-USDT".into()],
            max_open_positions: 5,
            max_order_notional: dec("100000"),
            min_order_notional: None,
            max_position_notional: dec("100000"),
            max_drawdown_pct: None,
            max_leverage: dec("1"),
        }
    }

    pub fn rule() -> StrategyRule {
        StrategyRule {
            rule_id: "r1".into(),
            symbol: "BTC-USDT".into(),
            stake: Stake {
                mode: StakeMode::FixedQuote,
                value: dec("1000"),
            },
            stop_loss_pct: Some(dec("0.05")),
            take_profit_pct: Some(dec("0.2")),
            trailing_stop: Some(TrailingStop {
                trailing_pct: dec("0.03"),
                activation_pct: dec("0.1"),
            }),
        }
    }

    pub fn created_with(id: &str, profile: RiskProfile) -> Event {
        Event::StrategyCreated(StrategyCreated {
            strategy_id: id.into(),
            user_id: "u-1".into(),
            name: "momentum".into(),
            rules: vec![rule()],
            risk_profile: profile,
        })
    }

    pub fn created(id: &str) -> Event {
        created_with(id, profile())
    }

    pub fn deleted(id: &str) -> Event {
        Event::StrategyDeleted(StrategyDeleted {
            strategy_id: id.into(),
        })
    }

    /// A strategy state folded from `events`.
    pub fn state(events: &[Event]) -> StrategyState {
        let mut s = StrategyState::default();
        for e in events {
            s.apply(e, crate::testing::t0());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::fixtures::*;
    use super::*;
    use crate::testing::{dec, given, t0};

    fn create() -> StrategyCommand {
        StrategyCommand::Create {
            strategy_id: "s-1".into(),
            user_id: "u-1".into(),
            name: "momentum".into(),
            rules: vec![rule()],
            risk_profile: profile(),
        }
    }

    fn update(
        name: Option<&str>,
        rules: Option<Vec<StrategyRule>>,
        p: Option<RiskProfile>,
    ) -> StrategyCommand {
        StrategyCommand::Update {
            strategy_id: "s-1".into(),
            name: name.map(Into::into),
            rules,
            risk_profile: p,
        }
    }

    fn bad_profile(f: impl FnOnce(&mut RiskProfile)) -> String {
        let mut p = profile();
        f(&mut p);
        validate_strategy(&[rule()], &p).unwrap_err().to_string()
    }

    fn bad_rule(f: impl FnOnce(&mut StrategyRule)) -> String {
        let mut r = rule();
        f(&mut r);
        validate_strategy(&[r], &profile()).unwrap_err().to_string()
    }

    #[test]
    fn create_emits_normalized_created() {
        let mut r = rule();
        r.stake.value = dec("1000.00");
        let mut p = profile();
        p.max_order_notional = dec("100000.0");
        let cmd = StrategyCommand::Create {
            strategy_id: "s-1".into(),
            user_id: "u-1".into(),
            name: "momentum".into(),
            rules: vec![r],
            risk_profile: p,
        };
        let events = given::<StrategyState>(vec![]).when(cmd).events();
        let Event::StrategyCreated(c) = &events[0] else {
            panic!()
        };
        assert_eq!(c.rules[0].stake.value.to_string(), "1000");
        assert_eq!(c.risk_profile.max_order_notional.to_string(), "100000");
        let s = given::<StrategyState>(vec![])
            .when(create())
            .then_expect_events(vec![created("s-1")]);
        assert_eq!(
            (s.version, s.status, s.name.as_str()),
            (1, StrategyStatus::Active, "momentum")
        );
        assert_eq!(s.created_at, Some(crate::testing::ctx().at));
        assert_eq!(s.last_at(), s.updated_at);
    }

    #[test]
    fn create_of_existing_is_already_exists() {
        given::<StrategyState>(vec![created("s-1")])
            .when(create())
            .then_expect_error("already_exists");
    }

    #[test]
    fn update_and_delete_of_missing_are_not_found() {
        given::<StrategyState>(vec![])
            .when(update(Some("x"), None, None))
            .then_expect_error("not_found");
        given::<StrategyState>(vec![])
            .when(StrategyCommand::Delete {
                strategy_id: "s-1".into(),
            })
            .then_expect_error("not_found");
    }

    #[test]
    fn deleted_refuses_update_and_delete() {
        given::<StrategyState>(vec![created("s-1"), deleted("s-1")])
            .when(update(Some("x"), None, None))
            .then_expect_error("strategy_deleted");
        given::<StrategyState>(vec![created("s-1"), deleted("s-1")])
            .when(StrategyCommand::Delete {
                strategy_id: "s-1".into(),
            })
            .then_expect_error("strategy_deleted");
    }

    #[test]
    fn delete_marks_deleted() {
        let s = given::<StrategyState>(vec![created("s-1")])
            .when(StrategyCommand::Delete {
                strategy_id: "s-1".into(),
            })
            .then_expect_events(vec![deleted("s-1")]);
        assert_eq!((s.status, s.version), (StrategyStatus::Deleted, 2));
        assert!(!s.is_active());
    }

    #[test]
    fn update_with_nothing_is_bad_request() {
        given::<StrategyState>(vec![created("s-1")])
            .when(update(None, None, None))
            .then_expect_error("bad_request");
    }

    #[test]
    fn update_emits_only_given_fields() {
        let s = given::<StrategyState>(vec![created("s-1")])
            .when(update(Some("renamed"), None, None))
            .then_expect_events(vec![Event::StrategyUpdated(StrategyUpdated {
                strategy_id: "s-1".into(),
                name: Some("renamed".into()),
                rules: None,
                risk_profile: None,
            })]);
        assert_eq!(
            (s.name.as_str(), s.rules.len(), s.version),
            ("renamed", 1, 2)
        );
    }

    #[test]
    fn update_is_validated_against_the_merged_strategy() {
        // New rules naming a symbol the stored profile does not allow.
        let mut r = rule();
        r.symbol = "SOL-USDT".into();
        given::<StrategyState>(vec![created("s-1")])
            .when(update(None, Some(vec![r.clone()]), None))
            .then_expect_error_message(
                "rules[0].symbol: SOL-USDT is not in risk_profile.allowed_symbols",
            );
        // A new profile that no longer allows the stored rule's symbol.
        let mut p = profile();
        p.allowed_symbols = vec!["ETH-USDT".into()];
        given::<StrategyState>(vec![created("s-1")])
            .when(update(None, None, Some(p.clone())))
            .then_expect_error("bad_request");
        // Both together are fine.
        p.allowed_symbols.push("SOL-USDT".into());
        let s = given::<StrategyState>(vec![created("s-1")])
            .when(update(None, Some(vec![r]), Some(p.clone())))
            .then_state();
        assert_eq!(s.risk_profile, Some(p));
    }

    #[test]
    fn time_never_goes_back_nor_too_far_ahead() {
        given::<StrategyState>(vec![created("s-1")])
            .at(t0() - TimeDelta::seconds(1))
            .when(update(Some("x"), None, None))
            .then_expect_error("bad_request");
        given::<StrategyState>(vec![created("s-1")])
            .at(t0())
            .when(update(Some("x"), None, None))
            .events();
        given::<StrategyState>(vec![])
            .at_now_plus(TimeDelta::seconds(6))
            .when(create())
            .then_expect_error("bad_request");
        given::<StrategyState>(vec![])
            .at_now_plus(TimeDelta::seconds(5))
            .when(create())
            .events();
    }

    #[test]
    fn create_validates_ids_and_name() {
        let mut c = create();
        if let StrategyCommand::Create { name, .. } = &mut c {
            *name = String::new();
        }
        given::<StrategyState>(vec![])
            .when(c)
            .then_expect_error("bad_request");
        let mut c = create();
        if let StrategyCommand::Create { user_id, .. } = &mut c {
            *user_id = "u.1".into();
        }
        given::<StrategyState>(vec![])
            .when(c)
            .then_expect_error_message("user_id: must match ^[A-Za-z0-9_-]{1,64}$");
    }

    #[test]
    fn risk_profile_validation_names_the_field() {
        assert!(validate_strategy(&[rule()], &profile()).is_ok());
        assert_eq!(
            bad_profile(|p| p.max_leverage = dec("2")),
            "risk_profile.max_leverage: must be 1"
        );
        assert!(validate_strategy(
            &[rule()],
            &RiskProfile {
                max_leverage: dec("1.000"),
                ..profile()
            }
        )
        .is_ok());
        assert_eq!(
            bad_profile(|p| p.allowed_symbols.clear()),
            "risk_profile.allowed_symbols: must not be empty"
        );
        assert_eq!(
            bad_profile(|p| p.allowed_symbols.push("btc.usdt".into())),
            "risk_profile.allowed_symbols[2]: must match ^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$"
        );
        assert_eq!(
            bad_profile(|p| p.allowed_symbols.push("BTC-USDT".into())),
            "risk_profile.allowed_symbols[2]: duplicate symbol BTC-USDT"
        );
        assert_eq!(
            bad_profile(|p| p.max_open_positions = 0),
            "risk_profile.max_open_positions: must be >= 1"
        );
        assert_eq!(
            bad_profile(|p| p.max_order_notional = dec("0")),
            "risk_profile.max_order_notional: must be > 0"
        );
        assert_eq!(
            bad_profile(|p| p.max_position_notional = dec("0.000000001")),
            "risk_profile.max_position_notional: at most 8 decimal places"
        );
        assert_eq!(
            bad_profile(|p| p.min_order_notional = Some(dec("-1"))),
            "risk_profile.min_order_notional: must be > 0"
        );
        assert_eq!(
            bad_profile(|p| p.min_order_notional = Some(dec("100001"))),
            "risk_profile.min_order_notional: must be <= max_order_notional"
        );
        assert_eq!(
            bad_profile(|p| p.max_drawdown_pct = Some(dec("1"))),
            "risk_profile.max_drawdown_pct: must be > 0 and < 1"
        );
        assert_eq!(
            bad_profile(|p| p.max_drawdown_pct = Some(dec("0"))),
            "risk_profile.max_drawdown_pct: must be > 0 and < 1"
        );
    }

    #[test]
    fn rule_validation_names_the_field() {
        assert_eq!(
            bad_rule(|r| r.rule_id = "a b".into()),
            "rules[0].rule_id: must match ^[A-Za-z0-9_-]{1,64}$"
        );
        assert_eq!(
            bad_rule(|r| r.symbol = "SOL-USDT".into()),
            "rules[0].symbol: SOL-USDT is not in risk_profile.allowed_symbols"
        );
        assert_eq!(
            bad_rule(|r| r.symbol = ">".into()),
            "rules[0].symbol: must match ^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$"
        );
        assert!(validate_strategy(
            &[StrategyRule {
                symbol: "*".into(),
                ..rule()
            }],
            &profile()
        )
        .is_ok());
        assert_eq!(
            bad_rule(|r| r.stake.value = dec("0")),
            "rules[0].stake.value: must be > 0"
        );
        assert_eq!(
            bad_rule(|r| r.stake = Stake {
                mode: StakeMode::PctEquity,
                value: dec("1.5")
            }),
            "rules[0].stake.value: must be <= 1 when stake.mode is pct_equity"
        );
        assert_eq!(
            bad_rule(|r| r.stop_loss_pct = Some(dec("1"))),
            "rules[0].stop_loss_pct: must be > 0 and < 1"
        );
        assert_eq!(
            bad_rule(|r| r.take_profit_pct = Some(dec("0"))),
            "rules[0].take_profit_pct: must be > 0 and < 1"
        );
        assert_eq!(
            bad_rule(|r| r.trailing_stop = Some(TrailingStop {
                trailing_pct: dec("1.2"),
                activation_pct: dec("0.1")
            })),
            "rules[0].trailing_stop.trailing_pct: must be > 0 and < 1"
        );
        assert_eq!(
            bad_rule(|r| r.trailing_stop = Some(TrailingStop {
                trailing_pct: dec("0.1"),
                activation_pct: dec("-0.1")
            })),
            "rules[0].trailing_stop.activation_pct: must be > 0 and < 1"
        );
        assert_eq!(
            bad_rule(|r| r.take_profit_pct = Some(dec("0.1"))),
            "rules[0].take_profit_pct: must be > trailing_stop.activation_pct"
        );
        let rules = vec![rule(), rule()];
        assert_eq!(
            validate_strategy(&rules, &profile())
                .unwrap_err()
                .to_string(),
            "rules[1].rule_id: duplicate rule_id r1"
        );
        assert!(validate_strategy(&[], &profile()).is_ok());
    }

    #[test]
    fn rules_and_profile_serde() {
        let json = r#"{"rule_id":"r1","symbol":"*","stake":{"mode":"pct_equity","value":1e-1},
                       "trailing_stop":{"trailing_pct":"0.03","activation_pct":0.1}}"#;
        let r: StrategyRule = serde_json::from_str(json).unwrap();
        assert_eq!(
            r.stake,
            Stake {
                mode: StakeMode::PctEquity,
                value: dec("0.1")
            }
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"rule_id":"r1","symbol":"*","stake":{"mode":"pct_equity","value":"0.1"},
                               "trailing_stop":{"trailing_pct":"0.03","activation_pct":"0.1"}})
        );
        let bad = r#"{"rule_id":"r1","symbol":"*","stake":{"mode":"pct_equity","value":1},"stop_loss":0.1}"#;
        let e = serde_json::from_str::<StrategyRule>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("unknown field `stop_loss`"), "{e}");
        let p = profile();
        let back: RiskProfile = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        // Events (flattened in an envelope by the runtime) still deserialize through buffering.
        let ev = created("s-1");
        let text = serde_json::to_string(&ev).unwrap();
        #[derive(serde::Deserialize)]
        struct Envelope {
            #[serde(flatten)]
            event: Event,
        }
        let env: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(env.event, ev);
    }
}

//! Request bodies (bytes) to commands, with clear `bad_request` messages.
//!
//! The body is first read as a map of raw JSON values, the common keys (`command_id`,
//! `expected_version`, `at`, `correlation_id`, `causation_id`, and for `portfolio.update` also
//! `portfolio_id` and `op`) are taken out and parsed one by one, and the rest is re-serialized
//! and read into a per-endpoint (per-op) struct with `deny_unknown_fields`. Decimals are read
//! exactly (`money::exact`) because every struct here is deserialized straight from text,
//! never from serde's buffered content.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::event::Side;
use crate::ids::{validate_currency, validate_id, validate_name, validate_symbol};
use crate::market::MarketCommand;
use crate::money::{exact, plain, validate_amount, validate_places};
use crate::portfolio::{default_fee_rate, PortfolioCommand, Signal};
use crate::strategy::{
    validate_risk_profile, validate_strategy, RiskProfile, StrategyCommand, StrategyRule,
};
use crate::{DomainError, Event};

/// The keys every command accepts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Common {
    pub command_id: Option<Uuid>,
    pub expected_version: Option<u64>,
    /// Business time (RFC 3339, stored as UTC); `None` means now.
    pub at: Option<DateTime<Utc>>,
    /// Stored in the event envelopes: the flow the command belongs to (default: its
    /// `command_id`) and what caused it (an event id, say), ids of the client's choosing.
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// With a `command_id`: what the command asks, as [`command_digest`] sums it up, stored with
    /// its events so that a re-send can be told from another command under the same id.
    pub command_digest: Option<String>,
}

/// The command endpoints (`<prefix>.cmd.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    StrategyCreate,
    StrategyUpdate,
    StrategyDelete,
    PortfolioUpdate,
    MarketPrice,
    SignalExecute,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::StrategyCreate,
        Endpoint::StrategyUpdate,
        Endpoint::StrategyDelete,
        Endpoint::PortfolioUpdate,
        Endpoint::MarketPrice,
        Endpoint::SignalExecute,
    ];

    /// The subject suffix, e.g. `strategy.create`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::StrategyCreate => "strategy.create",
            Endpoint::StrategyUpdate => "strategy.update",
            Endpoint::StrategyDelete => "strategy.delete",
            Endpoint::PortfolioUpdate => "portfolio.update",
            Endpoint::MarketPrice => "market.price",
            Endpoint::SignalExecute => "signal.execute",
        }
    }

    /// The endpoint of a subject suffix.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// The aggregate a command is for, and the command.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `strategy_id` is `None` for a create without one: the caller generates an id and calls
    /// [`Target::set_strategy_id`].
    Strategy {
        strategy_id: Option<String>,
        command: StrategyCommand,
    },
    Portfolio {
        portfolio_id: String,
        command: PortfolioCommand,
    },
    Market {
        symbol: String,
        command: MarketCommand,
    },
}

impl Target {
    /// Sets the strategy id of a strategy command (for a create without `strategy_id`).
    /// No effect on other targets.
    pub fn set_strategy_id(&mut self, id: String) {
        if let Target::Strategy {
            strategy_id,
            command,
        } = self
        {
            match command {
                StrategyCommand::Create { strategy_id: s, .. }
                | StrategyCommand::Update { strategy_id: s, .. }
                | StrategyCommand::Delete { strategy_id: s } => s.clone_from(&id),
            }
            *strategy_id = Some(id);
        }
    }

    /// The aggregate id (`None` only for a strategy create without an id yet).
    pub fn aggregate_id(&self) -> Option<&str> {
        match self {
            Target::Strategy { strategy_id, .. } => strategy_id.as_deref(),
            Target::Portfolio { portfolio_id, .. } => Some(portfolio_id),
            Target::Market { symbol, .. } => Some(symbol),
        }
    }

    /// The strategy a portfolio command names (attach, detach, signal), whose state the caller
    /// loads into `PortfolioFacts::strategy`.
    pub fn referenced_strategy(&self) -> Option<&str> {
        match self {
            Target::Portfolio { command, .. } => match command {
                PortfolioCommand::AttachStrategy { strategy_id }
                | PortfolioCommand::DetachStrategy { strategy_id } => Some(strategy_id),
                PortfolioCommand::ExecuteSignal(s) => Some(&s.strategy_id),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCommand {
    pub common: Common,
    pub target: Target,
}

type RawMap = BTreeMap<String, Box<RawValue>>;

/// A request's top-level fields. A key given twice is refused, as in the nested objects and
/// the queries (read into structs): a map would keep the last one silently.
struct Fields(RawMap);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Fields, A::Error> {
                let mut map = RawMap::new();
                while let Some(key) = a.next_key::<String>()? {
                    if map.contains_key(&key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate field `{key}`"
                        )));
                    }
                    let value = a.next_value()?;
                    map.insert(key, value);
                }
                Ok(Fields(map))
            }
        }
        d.deserialize_map(Visit)
    }
}

fn bad(msg: impl Into<String>) -> DomainError {
    DomainError::bad_request(msg)
}

/// serde_json's message without its ` at line L column C`.
fn clean(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Reads `text` as `T`; the `bad_request` message of a body that does not read as `T`:
/// malformed JSON as serde_json says it, with its position; a wrong, missing or unknown value
/// named by the path of its field (`rules[0].stake.value: ...`), without the position, which
/// would only point into the text again (or into text re-serialized from the request).
///
/// # Errors
/// The message of [`DomainError::BadRequest`]: the path is tracked only once reading failed,
/// so that a valid body pays nothing for it.
pub fn read_json<T: DeserializeOwned>(text: &[u8]) -> Result<T, String> {
    serde_json::from_slice(text).map_err(|_| {
        let de = &mut serde_json::Deserializer::from_slice(text);
        let e = match serde_path_to_error::deserialize::<_, T>(&mut *de) {
            Err(e) => e,
            // Only what follows the value failed (the path reader does not look there).
            Ok(_) => {
                return match de.end() {
                    Err(e) => format!("malformed JSON: {e}"),
                    Ok(()) => "the request could not be read".to_owned(),
                }
            }
        };
        let mut path = e.path().to_string();
        let inner = e.into_inner();
        if inner.classify() != serde_json::error::Category::Data {
            return format!("malformed JSON: {inner}");
        }
        let msg = clean(&inner);
        // An unknown field is named by the message: the path is where it was found.
        if let Some(key) = msg
            .strip_prefix("unknown field `")
            .and_then(|m| m.split('`').next())
        {
            if let Some(parent) = path.strip_suffix(key) {
                path = parent.trim_end_matches('.').to_owned();
            }
        }
        if matches!(path.as_str(), "" | "." | "?") {
            msg
        } else {
            format!("{path}: {msg}")
        }
    })
}

/// Refuses a time the read side would not keep as it was written:
/// - second 60: RFC 3339 allows it for a leap second, and chrono takes it on any day, ordering
///   `12:00:60.5` before `12:01:00.2`, while Postgres stores it as `12:01:00.5`, after: the
///   command side and the read models would order events apart;
/// - a year outside 1 to 9999 once in UTC (`0000-01-01T00:00:00+23:59` is year -1): stored,
///   it reads back as no RFC 3339 timestamp.
///
/// # Errors
/// `bad_request` naming `field`.
pub fn check_time(field: &str, t: &DateTime<Utc>) -> Result<(), DomainError> {
    if chrono::Timelike::nanosecond(t) >= 1_000_000_000 {
        return Err(bad(format!(
            "{field}: second 60 (a leap second) is not taken: give the next second's time"
        )));
    }
    if !(1..=9999).contains(&chrono::Datelike::year(t)) {
        return Err(bad(format!(
            "{field}: must be within the years 1 to 9999 in UTC"
        )));
    }
    Ok(())
}

/// A field of a unit-only enum (`side`, a stake's `mode`, ...), read from its name alone.
/// serde's derive also takes the externally tagged form, `{"buy": null}`, and calls `null`, a
/// number or an array there "malformed JSON" without naming the field; this says "invalid
/// type: ..., expected a string" of those, and serde's own "unknown variant" of other names.
///
/// # Errors
/// The deserializer's, as above.
pub fn by_name<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let name = String::deserialize(d)?;
    T::deserialize(serde::de::value::StringDeserializer::<D::Error>::new(name))
}

/// [`by_name`] for an optional field: absent or `null` is `T`'s default.
///
/// # Errors
/// As [`by_name`].
pub fn by_name_or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(T::default()),
        Some(name) => T::deserialize(serde::de::value::StringDeserializer::<D::Error>::new(name)),
    }
}

/// Reads the remaining keys into `T`. An unknown key there is named with the command's own
/// fields (`T`'s), and the ones every command takes besides, read before (the list serde gives
/// knows only `T`'s, and "there are no fields" of an op like `close` misled).
fn read<T: DeserializeOwned>(rest: &RawMap) -> Result<T, DomainError> {
    let text = serde_json::to_vec(rest).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    read_json(&text).map_err(|e| {
        if !e.starts_with("unknown field `") {
            return bad(e);
        }
        let e = e.replace(", there are no fields", ", expected none of its own");
        bad(format!("{e}; {COMMON_FIELDS}"))
    })
}

/// What an unknown-field message adds about the fields read before the command's own.
const COMMON_FIELDS: &str = "besides its id (and `op`), every command takes `command_id`, \
                             `expected_version`, `at`, `correlation_id` and `causation_id`";

fn take<T: DeserializeOwned>(
    map: &mut RawMap,
    key: &str,
    expected: &str,
) -> Result<Option<T>, DomainError> {
    match map.remove(key) {
        None => Ok(None),
        Some(raw) if raw.get().trim() == "null" => Ok(None),
        Some(raw) => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|_| bad(format!("{key}: must be {expected}"))),
    }
}

fn take_required<T: DeserializeOwned>(
    map: &mut RawMap,
    key: &str,
    expected: &str,
) -> Result<T, DomainError> {
    take(map, key, expected)?.ok_or_else(|| bad(format!("missing field `{key}`")))
}

fn parse_common(map: &mut RawMap) -> Result<Common, DomainError> {
    let command_id = take::<Uuid>(map, "command_id", "a UUID")?;
    let expected_version = take::<u64>(map, "expected_version", "a non-negative integer")?;
    let at = take::<String>(map, "at", "an RFC 3339 timestamp")?
        .map(|s| {
            // Kept to the microsecond, as Postgres keeps it: a finer `at` would order two
            // events one way on the write side and another way in the read models.
            let t = DateTime::parse_from_rfc3339(&s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| bad(format!("at: must be an RFC 3339 timestamp ({e})")))?;
            check_time("at", &t)?;
            Ok(t.trunc_subsecs(6))
        })
        .transpose()?;
    let id = |map: &mut RawMap, field: &str| -> Result<Option<String>, DomainError> {
        let v = take::<String>(map, field, "a string")?;
        if let Some(v) = &v {
            validate_id(field, v)?;
        }
        Ok(v)
    };
    Ok(Common {
        command_id,
        expected_version,
        at,
        correlation_id: id(map, "correlation_id")?,
        causation_id: id(map, "causation_id")?,
        command_digest: None,
    })
}

/// What a command asks, as `<kind>:<sum>`: its kind (the endpoint; for `portfolio.update` with
/// its op, `portfolio.update/deposit`; a `strategy.create` without `strategy_id` is
/// `strategy.create/generated`) and a stable 64-bit sum (FNV-1a, hex) of `expected_version`,
/// `at` and every other field by name and value (the ids that only label the flow,
/// `correlation_id` and `causation_id`, left out). Values count as JSON values, not as text:
/// the order of an object's fields, spacing and string escapes do not change the sum, at any
/// depth, nor does a field sent as `null` rather than left out; numbers count by their exact
/// value (`100`, `100.0` and `1e2` alike); a string and a number differ (`"1"` and `1`).
fn command_digest(endpoint: Endpoint, common: &Common, rest: &RawMap) -> String {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    if let Some(v) = common.expected_version {
        sum_text(&mut h, "expected_version");
        h.write(&v.to_le_bytes());
    }
    if let Some(at) = common.at {
        sum_text(&mut h, "at");
        sum_text(&mut h, &at.to_rfc3339());
    }
    sum_object(&mut h, rest.iter().map(|(k, v)| (k.as_str(), v.as_ref())));
    let named = |key: &str| rest.get(key).is_some_and(|v| v.get().trim() != "null");
    let kind = match endpoint {
        Endpoint::PortfolioUpdate => match rest.get("op").map(|r| serde_json::from_str(r.get())) {
            Some(Ok::<String, _>(op)) => format!("{}/{op}", endpoint.name()),
            _ => endpoint.name().to_owned(),
        },
        Endpoint::StrategyCreate if !named("strategy_id") => GENERATED_CREATE.to_owned(),
        _ => endpoint.name().to_owned(),
    };
    format!("{kind}:{:016x}", h.finish())
}

/// Feeds `text` to `h`, its length first (no two sequences of texts feed alike).
fn sum_text(h: &mut impl std::hash::Hasher, text: &str) {
    h.write(&(text.len() as u64).to_le_bytes());
    h.write(text.as_bytes());
}

/// Feeds an object's fields to `h` in the order given (a map's: by key), those that are `null`
/// left out.
fn sum_object<'a>(
    h: &mut impl std::hash::Hasher,
    fields: impl Iterator<Item = (&'a str, &'a RawValue)>,
) {
    h.write_u8(b'{');
    for (key, value) in fields {
        if value.get().trim() != "null" {
            sum_text(h, key);
            sum_json(h, value);
        }
    }
    h.write_u8(b'}');
}

/// Feeds one JSON value to `h` as a value: objects by key, strings unescaped, numbers by their
/// exact decimal value (their text when a Decimal cannot hold them).
fn sum_json(h: &mut impl std::hash::Hasher, raw: &RawValue) {
    let text = raw.get().trim();
    match text.as_bytes().first() {
        Some(b'{') => match serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(text) {
            Ok(map) => sum_object(h, map.iter().map(|(k, v)| (k.as_str(), v.as_ref()))),
            Err(_) => sum_text(h, text),
        },
        Some(b'[') => match serde_json::from_str::<Vec<Box<RawValue>>>(text) {
            Ok(items) => {
                h.write_u8(b'[');
                for item in &items {
                    sum_json(h, item);
                }
                h.write_u8(b']');
            }
            Err(_) => sum_text(h, text),
        },
        Some(b'"') => {
            h.write_u8(b'"');
            match serde_json::from_str::<String>(text) {
                Ok(s) => sum_text(h, &s),
                Err(_) => sum_text(h, text),
            }
        }
        _ => match crate::money::parse_decimal(text) {
            Some(d) => {
                h.write_u8(b'#');
                sum_text(h, &d.normalize().to_string());
            }
            None => sum_text(h, text),
        },
    }
}

/// The kind part of a [`command_digest`] (`portfolio.update/deposit`), if it has one.
pub fn digest_kind(digest: &str) -> Option<&str> {
    digest.split_once(':').map(|(kind, _)| kind)
}

/// The kind of a `strategy.create` without `strategy_id`, whose id the caller generates.
const GENERATED_CREATE: &str = "strategy.create/generated";

/// Whether a [`command_digest`] is of a command that names no aggregate: a `strategy.create`
/// without `strategy_id`, which gets a new id each time it is sent.
pub fn names_no_aggregate(digest: &str) -> bool {
    digest_kind(digest) == Some(GENERATED_CREATE)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyCreateReq {
    #[serde(default)]
    strategy_id: Option<String>,
    user_id: String,
    strategy_name: String,
    rules: Vec<StrategyRule>,
    risk_profile: RiskProfile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyUpdateReq {
    strategy_id: String,
    #[serde(default)]
    strategy_name: Option<String>,
    #[serde(default)]
    rules: Option<Vec<StrategyRule>>,
    #[serde(default)]
    risk_profile: Option<RiskProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyIdReq {
    strategy_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenReq {
    user_id: String,
    name: String,
    quote_currency: String,
    #[serde(default, deserialize_with = "exact::option::deserialize")]
    fee_rate: Option<Decimal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AmountReq {
    #[serde(deserialize_with = "exact::deserialize")]
    amount: Decimal,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameReq {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyReq {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceReq {
    symbol: String,
    #[serde(deserialize_with = "exact::deserialize")]
    price: Decimal,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalReq {
    portfolio_id: String,
    strategy_id: String,
    symbol: String,
    #[serde(deserialize_with = "by_name")]
    side: Side,
    #[serde(deserialize_with = "exact::deserialize")]
    quantity: Decimal,
    #[serde(deserialize_with = "exact::deserialize")]
    price: Decimal,
    #[serde(default, deserialize_with = "exact::option::deserialize")]
    fee: Option<Decimal>,
}

/// The ops of `portfolio.update`.
pub const PORTFOLIO_OPS: [&str; 7] = [
    "open",
    "deposit",
    "withdraw",
    "rename",
    "attach_strategy",
    "detach_strategy",
    "close",
];

fn parse_portfolio(map: &mut RawMap) -> Result<Target, DomainError> {
    let portfolio_id: String = take_required(map, "portfolio_id", "a string")?;
    validate_id("portfolio_id", &portfolio_id)?;
    let op: String = take_required(map, "op", "a string")?;
    let command = match op.as_str() {
        "open" => {
            let r: OpenReq = read(map)?;
            validate_id("user_id", &r.user_id)?;
            validate_name("name", &r.name)?;
            validate_currency("quote_currency", &r.quote_currency)?;
            let fee_rate = r.fee_rate.unwrap_or_else(default_fee_rate);
            if fee_rate < Decimal::ZERO || fee_rate >= Decimal::ONE {
                return Err(bad("fee_rate: must be >= 0 and < 1"));
            }
            validate_places("fee_rate", fee_rate)?;
            PortfolioCommand::Open {
                portfolio_id: portfolio_id.clone(),
                user_id: r.user_id,
                name: r.name,
                quote_currency: r.quote_currency,
                fee_rate,
            }
        }
        "deposit" | "withdraw" => {
            let r: AmountReq = read(map)?;
            validate_amount("amount", r.amount)?;
            if op == "deposit" {
                PortfolioCommand::Deposit { amount: r.amount }
            } else {
                PortfolioCommand::Withdraw { amount: r.amount }
            }
        }
        "rename" => {
            let r: NameReq = read(map)?;
            validate_name("name", &r.name)?;
            PortfolioCommand::Rename { name: r.name }
        }
        "attach_strategy" | "detach_strategy" => {
            let r: StrategyIdReq = read(map)?;
            validate_id("strategy_id", &r.strategy_id)?;
            if op == "attach_strategy" {
                PortfolioCommand::AttachStrategy {
                    strategy_id: r.strategy_id,
                }
            } else {
                PortfolioCommand::DetachStrategy {
                    strategy_id: r.strategy_id,
                }
            }
        }
        "close" => {
            let _: EmptyReq = read(map)?;
            PortfolioCommand::Close
        }
        other => {
            return Err(bad(format!(
                "op: unknown op `{other}`, expected one of {}",
                PORTFOLIO_OPS.join(", ")
            )));
        }
    };
    Ok(Target::Portfolio {
        portfolio_id,
        command,
    })
}

/// How deep a command's JSON may nest: its deepest field (a rule's trailing stop) is at 4.
pub const MAX_DEPTH: usize = 32;

/// The byte offset where `text` first nests past `max` arrays and objects, if it does (strings
/// and their escapes skipped); linear, whatever the text.
pub fn nested_past(text: &[u8], max: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in text.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Parses a request body for `endpoint`.
///
/// # Errors
/// [`DomainError::BadRequest`] for malformed JSON, a non-object body, an unknown or missing
/// field, an invalid id, symbol, name, timestamp or decimal (amounts and prices `> 0` with at
/// most 8 places; a signal's `quantity` only has to be a decimal).
pub fn parse_command(endpoint: Endpoint, body: &[u8]) -> Result<ParsedCommand, DomainError> {
    // Before any parse: a field's value is read whole (`RawValue`), past serde_json's
    // recursion limit, and the digest of a command walks it again level by level. Tens of
    // thousands of brackets overflowed the worker's stack, and took it down.
    if let Some(at) = nested_past(body, MAX_DEPTH) {
        return Err(bad(format!(
            "malformed JSON: nested more than {MAX_DEPTH} levels deep (at byte {at})"
        )));
    }
    let Fields(mut map) = serde_json::from_slice(body).map_err(|e| {
        if e.classify() != serde_json::error::Category::Data {
            bad(format!("malformed JSON: {e}"))
        } else if body.trim_ascii_start().starts_with(b"{") {
            bad(clean(&e))
        } else {
            bad("request body must be a JSON object")
        }
    })?;
    let mut common = parse_common(&mut map)?;
    if common.command_id.is_some() {
        common.command_digest = Some(command_digest(endpoint, &common, &map));
    }
    let target = match endpoint {
        Endpoint::StrategyCreate => {
            let r: StrategyCreateReq = read(&map)?;
            if let Some(id) = &r.strategy_id {
                validate_id("strategy_id", id)?;
            }
            validate_id("user_id", &r.user_id)?;
            validate_name("strategy_name", &r.strategy_name)?;
            validate_strategy(&r.rules, &r.risk_profile)?;
            Target::Strategy {
                strategy_id: r.strategy_id.clone(),
                command: StrategyCommand::Create {
                    strategy_id: r.strategy_id.unwrap_or_default(),
                    user_id: r.user_id,
                    name: r.strategy_name,
                    rules: r.rules,
                    risk_profile: r.risk_profile,
                },
            }
        }
        Endpoint::StrategyUpdate => {
            let r: StrategyUpdateReq = read(&map)?;
            validate_id("strategy_id", &r.strategy_id)?;
            if let Some(n) = &r.strategy_name {
                validate_name("strategy_name", n)?;
            }
            // Rules alone are checked against the stored profile by `decide`.
            match (&r.rules, &r.risk_profile) {
                (Some(rules), Some(p)) => validate_strategy(rules, p)?,
                (None, Some(p)) => validate_risk_profile(p)?,
                _ => {}
            }
            if r.strategy_name.is_none() && r.rules.is_none() && r.risk_profile.is_none() {
                return Err(bad(
                    "nothing to update: give strategy_name, rules or risk_profile",
                ));
            }
            Target::Strategy {
                strategy_id: Some(r.strategy_id.clone()),
                command: StrategyCommand::Update {
                    strategy_id: r.strategy_id,
                    name: r.strategy_name,
                    rules: r.rules,
                    risk_profile: r.risk_profile,
                },
            }
        }
        Endpoint::StrategyDelete => {
            let r: StrategyIdReq = read(&map)?;
            validate_id("strategy_id", &r.strategy_id)?;
            Target::Strategy {
                strategy_id: Some(r.strategy_id.clone()),
                command: StrategyCommand::Delete {
                    strategy_id: r.strategy_id,
                },
            }
        }
        Endpoint::PortfolioUpdate => parse_portfolio(&mut map)?,
        Endpoint::MarketPrice => {
            let r: PriceReq = read(&map)?;
            validate_symbol("symbol", &r.symbol)?;
            validate_amount("price", r.price)?;
            Target::Market {
                symbol: r.symbol.clone(),
                command: MarketCommand::RecordPrice {
                    symbol: r.symbol,
                    price: r.price,
                },
            }
        }
        Endpoint::SignalExecute => {
            let r: SignalReq = read(&map)?;
            validate_id("portfolio_id", &r.portfolio_id)?;
            validate_id("strategy_id", &r.strategy_id)?;
            validate_symbol("symbol", &r.symbol)?;
            validate_amount("price", r.price)?;
            if let Some(fee) = r.fee {
                if fee < Decimal::ZERO {
                    return Err(bad("fee: must be >= 0"));
                }
                validate_places("fee", fee)?;
            }
            Target::Portfolio {
                portfolio_id: r.portfolio_id,
                command: PortfolioCommand::ExecuteSignal(Signal {
                    strategy_id: r.strategy_id,
                    symbol: r.symbol,
                    side: r.side,
                    quantity: r.quantity,
                    price: r.price,
                    fee: r.fee,
                }),
            }
        }
    };
    Ok(ParsedCommand { common, target })
}

/// The extra reply fields of a signal (API.md): `status` and `trade`, or `status`, `reason`
/// and `detail`. `None` for every other event.
pub fn reply_extra(event: &Event) -> Option<serde_json::Value> {
    match event {
        Event::TradeExecuted(t) => Some(serde_json::json!({
            "status": "executed",
            "trade": {
                "trade_id": t.trade_id.to_string(),
                "symbol": t.symbol,
                "side": t.side.as_str(),
                "quantity": plain(t.quantity),
                "price": plain(t.price),
                "fee": plain(t.fee),
                "realized_pnl": plain(t.realized_pnl),
                "cash_after": plain(t.cash_after),
                "position_after": plain(t.position_after),
            }
        })),
        Event::TradeSignalRejected(r) => Some(serde_json::json!({
            "status": "rejected",
            "reason": r.reason,
            "detail": r.detail,
        })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::StakeMode;
    use crate::testing::{dec, NEW_ID};

    fn parse(endpoint: Endpoint, body: &str) -> Result<ParsedCommand, DomainError> {
        parse_command(endpoint, body.as_bytes())
    }

    fn err(endpoint: Endpoint, body: &str) -> String {
        let e = parse(endpoint, body).unwrap_err();
        assert_eq!(e.code(), "bad_request", "{e:?}");
        e.to_string()
    }

    fn deposit(amount: &str) -> Result<ParsedCommand, DomainError> {
        parse(
            Endpoint::PortfolioUpdate,
            &format!(r#"{{"portfolio_id":"p-1","op":"deposit","amount":{amount}}}"#),
        )
    }

    fn digest(endpoint: Endpoint, body: &str) -> Option<String> {
        parse(endpoint, body).unwrap().common.command_digest
    }

    #[test]
    fn a_command_digest_sums_up_what_is_asked_not_how_it_is_written() {
        const ID: &str = r#""command_id":"0193a1b2-0000-7000-8000-000000000001""#;
        let deposit =
            |fields: &str| digest(Endpoint::PortfolioUpdate, &format!("{{{ID},{fields}}}"));
        let first = deposit(r#""portfolio_id":"p-1","op":"deposit","amount":"100""#);
        let d = first.clone().unwrap();
        assert_eq!(digest_kind(&d), Some("portfolio.update/deposit"), "{d}");
        assert_eq!(d.len(), "portfolio.update/deposit:".len() + 16, "{d}");
        // The same command: fields in another order, other spacing, other flow labels.
        for same in [
            r#""amount":"100","op":"deposit","portfolio_id":"p-1""#,
            r#" "portfolio_id" : "p-1" , "op":"deposit", "amount": "100" "#,
            r#""portfolio_id":"p-1","op":"deposit","amount":"100","correlation_id":"flow-9","causation_id":"ev-1""#,
        ] {
            assert_eq!(deposit(same), first, "{same}");
        }
        // Another command: another value, field, aggregate, business time or endpoint.
        for other in [
            r#""portfolio_id":"p-1","op":"deposit","amount":"7""#,
            r#""portfolio_id":"p-1","op":"deposit","amount":100"#,
            r#""portfolio_id":"p-1","op":"withdraw","amount":"100""#,
            r#""portfolio_id":"p-2","op":"deposit","amount":"100""#,
            r#""portfolio_id":"p-1","op":"deposit","amount":"100","expected_version":3"#,
            r#""portfolio_id":"p-1","op":"deposit","amount":"100","at":"2026-01-05T10:00:00Z""#,
        ] {
            assert_ne!(deposit(other), first, "{other}");
        }
        assert_ne!(
            digest(
                Endpoint::MarketPrice,
                &format!(r#"{{{ID},"symbol":"BTC-USDT","price":"100"}}"#)
            ),
            digest(
                Endpoint::MarketPrice,
                &format!(r#"{{{ID},"symbol":"ETH-USDT","price":"100"}}"#)
            ),
        );
        let withdraw = deposit(r#""portfolio_id":"p-1","op":"withdraw","amount":"100""#).unwrap();
        assert_eq!(digest_kind(&withdraw), Some("portfolio.update/withdraw"));
        // Nested values count as JSON: their fields' order and spacing do not count either.
        let create = |risk: &str| {
            digest(
                Endpoint::StrategyCreate,
                &format!(r#"{{{ID},"user_id":"u-1","strategy_name":"x","rules":{RULES},"risk_profile":{risk}}}"#),
            )
            .unwrap()
        };
        let risk = create(
            r#"{"allowed_symbols":["BTC-USDT"],"max_open_positions":3,"max_order_notional":1,"max_position_notional":1,"max_leverage":1}"#,
        );
        assert_eq!(digest_kind(&risk), Some("strategy.create/generated"));
        assert_eq!(
            create(
                r#"{ "max_leverage": 1, "max_position_notional": 1, "max_order_notional": 1,
                     "max_open_positions": 3, "allowed_symbols": [ "BTC-USDT" ] }"#
            ),
            risk
        );
        assert_ne!(
            create(
                r#"{"allowed_symbols":["BTC-USDT"],"max_open_positions":4,"max_order_notional":1,"max_position_notional":1,"max_leverage":1}"#
            ),
            risk
        );
        // A field sent as null is the field left out; a create naming its id is another kind.
        let named = |id: &str| {
            digest(
                Endpoint::StrategyCreate,
                &format!(r#"{{{ID},"strategy_id":{id},"user_id":"u-1","strategy_name":"x","rules":{RULES},"risk_profile":{{"allowed_symbols":["BTC-USDT"],"max_open_positions":3,"max_order_notional":1,"max_position_notional":1,"max_leverage":1}}}}"#),
            )
            .unwrap()
        };
        assert_eq!(named("null"), risk);
        assert_eq!(digest_kind(&named(r#""s-1""#)), Some("strategy.create"));
        // Numbers count by their exact value: other writings of one value alike, values that
        // an f64 would not tell apart not.
        let amount = |a: &str| {
            deposit(&format!(
                r#""portfolio_id":"p-1","op":"deposit","amount":{a}"#
            ))
        };
        assert_eq!(amount("100.0"), amount("100"));
        assert_eq!(amount("1e2"), amount("100"));
        assert_ne!(amount("1234567890.12345678"), amount("1234567890.12345679"));
        // Strings count unescaped.
        assert_eq!(amount(r#""\u0031""#), amount(r#""1""#));
        // Without a command_id nothing is de-duplicated, so nothing is summed up.
        assert_eq!(
            digest(
                Endpoint::PortfolioUpdate,
                r#"{"portfolio_id":"p-1","op":"deposit","amount":"1"}"#
            ),
            None
        );
    }

    fn deposited_amount(amount: &str) -> Decimal {
        match deposit(amount).unwrap().target {
            Target::Portfolio {
                command: PortfolioCommand::Deposit { amount },
                ..
            } => amount,
            other => panic!("{other:?}"),
        }
    }

    const RULES: &str = r#"[{"rule_id":"r1","symbol":"BTC-USDT","stake":{"mode":"fixed_quote","value":"1000"},
        "stop_loss_pct":0.05,"take_profit_pct":"0.2","trailing_stop":{"trailing_pct":0.03,"activation_pct":0.1}}]"#;
    const PROFILE: &str = r#"{"allowed_symbols":["BTC-USDT"],"max_open_positions":3,"max_order_notional":"10000",
        "max_position_notional":20000,"max_leverage":1}"#;

    #[test]
    fn endpoints() {
        let names: Vec<&str> = Endpoint::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(
            names,
            [
                "strategy.create",
                "strategy.update",
                "strategy.delete",
                "portfolio.update",
                "market.price",
                "signal.execute"
            ]
        );
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_name(e.name()), Some(e));
        }
    }

    #[test]
    fn common_keys() {
        let p = parse(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"close","command_id":"01930000-0000-7000-8000-000000000001",
                "expected_version":4,"at":"2026-01-01T01:00:00+01:00"}"#,
        )
        .unwrap();
        assert_eq!(p.common.command_id, Some(NEW_ID));
        assert_eq!(p.common.expected_version, Some(4));
        assert_eq!(
            p.common.at.unwrap().to_rfc3339(),
            "2026-01-01T00:00:00+00:00"
        );
        // Kept to the microsecond, as the read models keep it.
        let p = parse(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"close","at":"2026-01-01T00:00:00.000001900Z"}"#,
        )
        .unwrap();
        assert_eq!(
            p.common.at.unwrap().to_rfc3339(),
            "2026-01-01T00:00:00.000001+00:00"
        );
        assert_eq!(
            p.target,
            Target::Portfolio {
                portfolio_id: "p-1".into(),
                command: PortfolioCommand::Close
            }
        );
        let p = parse(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"close","at":null}"#,
        )
        .unwrap();
        assert_eq!(p.common, Common::default());
        let base = r#""portfolio_id":"p-1","op":"close""#;
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                &format!(r#"{{{base},"command_id":"x"}}"#)
            ),
            "command_id: must be a UUID"
        );
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                &format!(r#"{{{base},"expected_version":-1}}"#)
            ),
            "expected_version: must be a non-negative integer"
        );
        assert!(err(
            Endpoint::PortfolioUpdate,
            &format!(r#"{{{base},"at":"yesterday"}}"#)
        )
        .starts_with("at: must be an RFC 3339 timestamp"));
        assert!(err(
            Endpoint::PortfolioUpdate,
            &format!(r#"{{{base},"at":"2026-01-01 00:00:00"}}"#)
        )
        .starts_with("at: "));
        // Nesting is bounded before anything is parsed: 100,000 brackets under a command_id
        // overflowed the worker's stack as its digest was taken.
        for deep in ["[".repeat(100_000), "{\"a\":".repeat(100_000)] {
            let body = format!(
                r#"{{"command_id":"{}","portfolio_id":"p-1","op":"deposit","amount":"1","x":{deep}"#,
                Uuid::nil()
            );
            let e = err(Endpoint::PortfolioUpdate, &body);
            assert!(
                e.starts_with("malformed JSON: nested more than 32 levels deep"),
                "{e}"
            );
        }
        // Brackets in strings are text, and 32 levels are taken (here refused as unknown).
        let ok_depth = format!(
            r#"{{{base},"x":"[[[[{{{{","y":{}1{}}}"#,
            "[".repeat(31),
            "]".repeat(31)
        );
        assert!(err(Endpoint::PortfolioUpdate, &ok_depth).starts_with("unknown field `x`"));
        // Second 60: chrono would order it before the next minute, Postgres after it.
        for at in ["2026-12-01T12:00:60.5Z", "2016-12-31T23:59:60Z"] {
            assert!(err(
                Endpoint::PortfolioUpdate,
                &format!(r#"{{{base},"at":"{at}"}}"#)
            )
            .starts_with("at: second 60 (a leap second) is not taken"));
        }
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                &format!(r#"{{{base},"at":"0000-01-01T00:00:00+23:59"}}"#)
            ),
            "at: must be within the years 1 to 9999 in UTC"
        );
        let p = parse(
            Endpoint::PortfolioUpdate,
            &format!(r#"{{{base},"correlation_id":"flow-7","causation_id":"0193-ab"}}"#),
        )
        .unwrap();
        assert_eq!(p.common.correlation_id.as_deref(), Some("flow-7"));
        assert_eq!(p.common.causation_id.as_deref(), Some("0193-ab"));
        assert!(err(
            Endpoint::PortfolioUpdate,
            &format!(r#"{{{base},"causation_id":"a.b"}}"#)
        )
        .starts_with("causation_id: must match"));
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                &format!(r#"{{{base},"correlation_id":7}}"#)
            ),
            "correlation_id: must be a string"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_field() {
        let create = |name: &str, max_open: &str| {
            err(
                Endpoint::StrategyCreate,
                &format!(
                    r#"{{"user_id":"u-1","strategy_name":{name},"rules":{RULES},"risk_profile":{{"allowed_symbols":["BTC-USDT"],"max_open_positions":{max_open},"max_order_notional":1,"max_position_notional":1,"max_leverage":1}}}}"#
                ),
            )
        };
        assert_eq!(
            create("5", "3"),
            "strategy_name: invalid type: integer `5`, expected a string"
        );
        assert_eq!(
            create(r#""x""#, r#""3""#),
            r#"risk_profile.max_open_positions: invalid type: string "3", expected u32"#
        );
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                r#"{"portfolio_id":"p-1","op":"open","user_id":null,"name":"n","quote_currency":"USDT"}"#
            ),
            "user_id: invalid type: null, expected a string"
        );
    }

    #[test]
    fn text_after_the_value_is_malformed_json() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Q {
            portfolio_id: String,
        }
        assert_eq!(
            read_json::<Q>(br#"{"portfolio_id":"p1"} x"#).unwrap_err(),
            "malformed JSON: trailing characters at line 1 column 23"
        );
        assert!(read_json::<Q>(br#" {"portfolio_id":"p1"} "#).is_ok());
    }

    #[test]
    fn malformed_and_non_object_bodies() {
        assert!(err(Endpoint::MarketPrice, "{").starts_with("malformed JSON: "));
        assert!(err(Endpoint::MarketPrice, "").starts_with("malformed JSON: "));
        assert!(
            err(Endpoint::MarketPrice, r#"{"symbol":"BTC-USDT",}"#).starts_with("malformed JSON: ")
        );
        assert_eq!(
            err(Endpoint::MarketPrice, "[1]"),
            "request body must be a JSON object"
        );
        assert_eq!(
            err(Endpoint::MarketPrice, "\"x\""),
            "request body must be a JSON object"
        );
        // A key given twice: not the last one silently.
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                r#"{"portfolio_id":"p-1","portfolio_id":"p-2","op":"deposit","amount":5}"#
            ),
            "duplicate field `portfolio_id`"
        );
    }

    #[test]
    fn unknown_field() {
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                r#"{"portfolio_id":"p-1","op":"deposit","amout":5}"#
            ),
            "unknown field `amout`, expected `amount`; besides its id (and `op`), every command \
             takes `command_id`, `expected_version`, `at`, `correlation_id` and `causation_id`"
        );
        let e = err(
            Endpoint::SignalExecute,
            r#"{"portfolio_id":"p-1","strategy_id":"s-1","symbol":"BTC-USDT","side":"buy","quantity":1,"price":1,"feee":1}"#,
        );
        assert!(
            e.starts_with("unknown field `feee`, expected one of"),
            "{e}"
        );
        let e = err(
            Endpoint::StrategyCreate,
            &format!(
                r#"{{"user_id":"u-1","strategy_name":"x","rules":{RULES},"risk_profile":{{"allowed_symbols":["BTC-USDT"],"max_open_positions":3,"max_order_notional":1,"max_position_notional":1,"max_leverage":1,"leverage":2}}}}"#
            ),
        );
        assert!(
            e.starts_with("risk_profile: unknown field `leverage`"),
            "{e}"
        );
        assert!(err(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"close","x":1}"#
        )
        .starts_with("unknown field `x`, expected none of its own; besides its id"));
    }

    /// A rule, its stake and trailing stop, and the risk profile are JSON objects: serde's
    /// derive would also take each as an array of its fields in their order, naming none (so a
    /// swapped pair of limits would pass).
    #[test]
    fn nested_objects_given_as_arrays_are_refused() {
        let create = |rules: &str, profile: &str| {
            format!(
                r#"{{"user_id":"u-1","strategy_name":"x","rules":{rules},"risk_profile":{profile}}}"#
            )
        };
        let as_array = r#"[["BTC-USDT"],3,"50000",null,"100000",null,1]"#;
        assert_eq!(
            err(Endpoint::StrategyCreate, &create(RULES, as_array)),
            "risk_profile: invalid type: sequence, expected a JSON object"
        );
        let rule_as_array = r#"[["r1","BTC-USDT",{"mode":"fixed_quote","value":"1000"}]]"#;
        assert_eq!(
            err(Endpoint::StrategyCreate, &create(rule_as_array, PROFILE)),
            "rules[0]: invalid type: sequence, expected a JSON object"
        );
        let stake_as_array =
            r#"[{"rule_id":"r1","symbol":"BTC-USDT","stake":["fixed_quote","1000"]}]"#;
        assert_eq!(
            err(Endpoint::StrategyCreate, &create(stake_as_array, PROFILE)),
            "rules[0].stake: invalid type: sequence, expected a JSON object"
        );
        let stop_as_array = r#"[{"rule_id":"r1","symbol":"BTC-USDT","stake":{"mode":"fixed_quote","value":"1000"},"trailing_stop":["0.05","0.1"]}]"#;
        assert_eq!(
            err(Endpoint::StrategyCreate, &create(stop_as_array, PROFILE)),
            "rules[0].trailing_stop: invalid type: sequence, expected a JSON object"
        );
        // The objects themselves still read (and the update's optional profile too).
        assert!(parse(Endpoint::StrategyCreate, &create(RULES, PROFILE)).is_ok());
        let update = format!(r#"{{"strategy_id":"s-1","risk_profile":{as_array}}}"#);
        assert_eq!(
            err(Endpoint::StrategyUpdate, &update),
            "risk_profile: invalid type: sequence, expected a JSON object"
        );
    }

    #[test]
    fn missing_field() {
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                r#"{"portfolio_id":"p-1","op":"deposit"}"#
            ),
            "missing field `amount`"
        );
        assert_eq!(
            err(Endpoint::PortfolioUpdate, r#"{"op":"deposit","amount":1}"#),
            "missing field `portfolio_id`"
        );
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                r#"{"portfolio_id":"p-1","amount":1}"#
            ),
            "missing field `op`"
        );
        assert_eq!(
            err(Endpoint::MarketPrice, r#"{"symbol":"BTC-USDT"}"#),
            "missing field `price`"
        );
    }

    #[test]
    fn unknown_op() {
        assert_eq!(
            err(Endpoint::PortfolioUpdate, r#"{"portfolio_id":"p-1","op":"transfer","amount":1}"#),
            "op: unknown op `transfer`, expected one of open, deposit, withdraw, rename, attach_strategy, detach_strategy, close"
        );
        assert_eq!(
            err(
                Endpoint::PortfolioUpdate,
                r#"{"portfolio_id":"p-1","op":3}"#
            ),
            "op: must be a string"
        );
    }

    #[test]
    fn decimals_are_exact_as_numbers_and_strings() {
        for s in [
            "1e-8",
            "1E-8",
            "\"1e-8\"",
            "\"1E-8\"",
            "0.00000001",
            "\"0.00000001\"",
        ] {
            let a = deposited_amount(s);
            assert_eq!(a, dec("0.00000001"), "{s}");
            assert_eq!(plain(a), "0.00000001");
        }
        assert_eq!(deposited_amount("0.1"), dec("0.1"));
        assert_eq!(
            deposited_amount("12345678901234567890.12345678"),
            dec("12345678901234567890.12345678")
        );
        assert_eq!(deposited_amount("\"1.000000000\""), dec("1"));
        assert_eq!(deposited_amount("2.5e3"), dec("2500"));
    }

    #[test]
    fn nine_places_and_non_positive_are_rejected() {
        assert_eq!(
            deposit("0.000000001").unwrap_err().to_string(),
            "amount: at most 8 decimal places"
        );
        assert_eq!(
            deposit("\"1e-9\"").unwrap_err().to_string(),
            "amount: at most 8 decimal places"
        );
        assert_eq!(deposit("0").unwrap_err().to_string(), "amount: must be > 0");
        assert_eq!(
            deposit("-1").unwrap_err().to_string(),
            "amount: must be > 0"
        );
        let e = deposit("\"abc\"").unwrap_err().to_string();
        assert!(e.starts_with("amount: invalid decimal \"abc\""), "{e}");
        let e = deposit("true").unwrap_err().to_string();
        assert!(e.starts_with("amount: invalid decimal true"), "{e}");
        assert!(deposit("null").is_err());
        assert!(deposit("1e400").is_err());
        assert!(
            parse(
                Endpoint::MarketPrice,
                r#"{"symbol":"BTC-USDT","price":"1.123456789"}"#
            )
            .unwrap_err()
            .to_string()
                == "price: at most 8 decimal places"
        );
    }

    #[test]
    fn ids_with_dots_stars_gt_spaces_are_rejected() {
        for bad in ["p.1", "*", ">", "p 1", "", "p-1.>", &"x".repeat(65)] {
            let body = serde_json::json!({"portfolio_id": bad, "op": "close"}).to_string();
            assert_eq!(
                err(Endpoint::PortfolioUpdate, &body),
                "portfolio_id: must match ^[A-Za-z0-9_-]{1,64}$"
            );
            let body = serde_json::json!({"strategy_id": bad}).to_string();
            assert_eq!(
                err(Endpoint::StrategyDelete, &body),
                "strategy_id: must match ^[A-Za-z0-9_-]{1,64}$"
            );
            let body = serde_json::json!({"portfolio_id": "p-1", "op": "attach_strategy", "strategy_id": bad}).to_string();
            assert!(err(Endpoint::PortfolioUpdate, &body).starts_with("strategy_id: "));
            let body = serde_json::json!({"portfolio_id": "p-1", "op": "open", "user_id": bad, "name": "n", "quote_currency": "USDT"}).to_string();
            assert!(err(Endpoint::PortfolioUpdate, &body).starts_with("user_id: "));
        }
        for bad in ["BTC.USDT", "*", ">", "BTC USDT", "btc-usdt", "BTC"] {
            let body = serde_json::json!({"symbol": bad, "price": 1}).to_string();
            assert_eq!(
                err(Endpoint::MarketPrice, &body),
                "symbol: must match ^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$"
            );
        }
    }

    #[test]
    fn portfolio_ops() {
        let p = parse(Endpoint::PortfolioUpdate, r#"{"portfolio_id":"p-1","op":"open","user_id":"u-1","name":"Main","quote_currency":"USDT"}"#).unwrap();
        assert_eq!(
            p.target,
            Target::Portfolio {
                portfolio_id: "p-1".into(),
                command: PortfolioCommand::Open {
                    portfolio_id: "p-1".into(),
                    user_id: "u-1".into(),
                    name: "Main".into(),
                    quote_currency: "USDT".into(),
                    fee_rate: dec("0.001"),
                }
            }
        );
        let open = |fee: &str| {
            parse(
                Endpoint::PortfolioUpdate,
                &format!(
                    r#"{{"portfolio_id":"p-1","op":"open","user_id":"u-1","name":"Main","quote_currency":"USDT","fee_rate":{fee}}}"#
                ),
            )
        };
        assert!(open("0").is_ok());
        assert!(open("\"0.0025\"").is_ok());
        assert_eq!(
            open("1").unwrap_err().to_string(),
            "fee_rate: must be >= 0 and < 1"
        );
        assert_eq!(
            open("-0.1").unwrap_err().to_string(),
            "fee_rate: must be >= 0 and < 1"
        );
        assert_eq!(
            open("0.000000001").unwrap_err().to_string(),
            "fee_rate: at most 8 decimal places"
        );
        let p = parse(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"withdraw","amount":"5"}"#,
        )
        .unwrap();
        assert_eq!(
            p.target,
            Target::Portfolio {
                portfolio_id: "p-1".into(),
                command: PortfolioCommand::Withdraw { amount: dec("5") }
            }
        );
        let p = parse(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"rename","name":"New"}"#,
        )
        .unwrap();
        assert_eq!(
            p.target,
            Target::Portfolio {
                portfolio_id: "p-1".into(),
                command: PortfolioCommand::Rename { name: "New".into() }
            }
        );
        assert!(err(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"rename","name":""}"#
        )
        .starts_with("name: "));
        let p = parse(
            Endpoint::PortfolioUpdate,
            r#"{"portfolio_id":"p-1","op":"detach_strategy","strategy_id":"s-1"}"#,
        )
        .unwrap();
        assert_eq!(p.target.referenced_strategy(), Some("s-1"));
        assert_eq!(p.target.aggregate_id(), Some("p-1"));
    }

    #[test]
    fn signal() {
        let p = parse(
            Endpoint::SignalExecute,
            r#"{"portfolio_id":"p-1","strategy_id":"s-1","symbol":"BTC-USDT","side":"sell","quantity":"-1e-9","price":2e4,"fee":"0"}"#,
        )
        .unwrap();
        let Target::Portfolio {
            portfolio_id,
            command: PortfolioCommand::ExecuteSignal(s),
        } = p.target
        else {
            panic!()
        };
        assert_eq!(portfolio_id, "p-1");
        assert_eq!(
            (s.side, s.quantity, s.price, s.fee),
            (
                Side::Sell,
                dec("-0.000000001"),
                dec("20000"),
                Some(dec("0"))
            )
        );
        let body = |side: &str, q: &str, price: &str, fee: &str| {
            format!(
                r#"{{"portfolio_id":"p-1","strategy_id":"s-1","symbol":"BTC-USDT","side":"{side}","quantity":{q},"price":{price}{fee}}}"#
            )
        };
        assert!(err(Endpoint::SignalExecute, &body("hold", "1", "1", ""))
            .contains("unknown variant `hold`"));
        // The name alone: not serde's tagged form, and a wrong type is named by its field.
        let with_side = |side: &str| {
            format!(
                r#"{{"portfolio_id":"p-1","strategy_id":"s-1","symbol":"BTC-USDT","side":{side},"quantity":1,"price":1}}"#
            )
        };
        assert_eq!(
            err(Endpoint::SignalExecute, &with_side(r#"{"buy":null}"#)),
            "side: invalid type: map, expected a string"
        );
        for (side, found) in [("null", "null"), ("1", "integer `1`"), ("[]", "sequence")] {
            assert_eq!(
                err(Endpoint::SignalExecute, &with_side(side)),
                format!("side: invalid type: {found}, expected a string")
            );
        }
        let strategy = format!(
            r#"{{"user_id":"u-1","strategy_name":"n","risk_profile":{PROFILE},"rules":{}}}"#,
            RULES.replace(r#""mode":"fixed_quote""#, r#""mode":{"fixed_quote":null}"#)
        );
        assert_eq!(
            err(Endpoint::StrategyCreate, &strategy),
            "rules[0].stake.mode: invalid type: map, expected a string"
        );
        assert!(err(Endpoint::SignalExecute, &body("buy", "\"x\"", "1", ""))
            .starts_with("quantity: invalid decimal"));
        assert_eq!(
            err(Endpoint::SignalExecute, &body("buy", "1", "0", "")),
            "price: must be > 0"
        );
        assert_eq!(
            err(
                Endpoint::SignalExecute,
                &body("buy", "1", "1", r#","fee":-1"#)
            ),
            "fee: must be >= 0"
        );
        assert_eq!(
            err(
                Endpoint::SignalExecute,
                &body("buy", "1", "1", r#","fee":1e-9"#)
            ),
            "fee: at most 8 decimal places"
        );
        assert!(parse(
            Endpoint::SignalExecute,
            &body("buy", "1", "1", r#","fee":null"#)
        )
        .is_ok());
    }

    #[test]
    fn market_price() {
        let p = parse(
            Endpoint::MarketPrice,
            r#"{"symbol":"BTC-USDT","price":"20000.50","at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            p.target,
            Target::Market {
                symbol: "BTC-USDT".into(),
                command: MarketCommand::RecordPrice {
                    symbol: "BTC-USDT".into(),
                    price: dec("20000.5")
                }
            }
        );
        assert!(p.common.at.is_some());
    }

    #[test]
    fn strategy_create_update_delete() {
        let p = parse(
            Endpoint::StrategyCreate,
            &format!(r#"{{"user_id":"u-1","strategy_name":"Momentum","rules":{RULES},"risk_profile":{PROFILE}}}"#),
        )
        .unwrap();
        let mut target = p.target;
        let Target::Strategy {
            strategy_id: None,
            command:
                StrategyCommand::Create {
                    strategy_id,
                    rules,
                    risk_profile,
                    ..
                },
        } = &target
        else {
            panic!("{target:?}")
        };
        assert_eq!(strategy_id, "");
        assert_eq!(rules[0].stake.mode, StakeMode::FixedQuote);
        assert_eq!(rules[0].stop_loss_pct, Some(dec("0.05")));
        assert_eq!(risk_profile.max_position_notional, dec("20000"));
        target.set_strategy_id("gen-1".into());
        assert_eq!(target.aggregate_id(), Some("gen-1"));
        let Target::Strategy {
            command: StrategyCommand::Create { strategy_id, .. },
            ..
        } = &target
        else {
            panic!()
        };
        assert_eq!(strategy_id, "gen-1");

        let with_id = parse(
            Endpoint::StrategyCreate,
            &format!(r#"{{"strategy_id":"s-9","user_id":"u-1","strategy_name":"M","rules":[],"risk_profile":{PROFILE}}}"#),
        )
        .unwrap();
        assert_eq!(with_id.target.aggregate_id(), Some("s-9"));

        let bad_lev = PROFILE.replace(r#""max_leverage":1"#, r#""max_leverage":2"#);
        assert_eq!(
            err(
                Endpoint::StrategyCreate,
                &format!(
                    r#"{{"user_id":"u-1","strategy_name":"M","rules":[],"risk_profile":{bad_lev}}}"#
                )
            ),
            "risk_profile.max_leverage: must be 1"
        );
        assert!(err(
            Endpoint::StrategyCreate,
            &format!(
                r#"{{"user_id":"u-1","strategy_name":"","rules":[],"risk_profile":{PROFILE}}}"#
            )
        )
        .starts_with("strategy_name: "));
        assert_eq!(
            err(
                Endpoint::StrategyCreate,
                r#"{"user_id":"u-1","strategy_name":"M","rules":[]}"#
            ),
            "missing field `risk_profile`"
        );

        let p = parse(
            Endpoint::StrategyUpdate,
            r#"{"strategy_id":"s-1","strategy_name":"N"}"#,
        )
        .unwrap();
        assert_eq!(
            p.target,
            Target::Strategy {
                strategy_id: Some("s-1".into()),
                command: StrategyCommand::Update {
                    strategy_id: "s-1".into(),
                    name: Some("N".into()),
                    rules: None,
                    risk_profile: None
                }
            }
        );
        assert!(err(Endpoint::StrategyUpdate, r#"{"strategy_id":"s-1"}"#)
            .starts_with("nothing to update"));
        assert_eq!(
            err(
                Endpoint::StrategyUpdate,
                &format!(r#"{{"strategy_id":"s-1","risk_profile":{bad_lev}}}"#)
            ),
            "risk_profile.max_leverage: must be 1"
        );
        let p = parse(Endpoint::StrategyDelete, r#"{"strategy_id":"s-1"}"#).unwrap();
        assert_eq!(
            p.target,
            Target::Strategy {
                strategy_id: Some("s-1".into()),
                command: StrategyCommand::Delete {
                    strategy_id: "s-1".into()
                }
            }
        );
        assert!(err(
            Endpoint::StrategyDelete,
            r#"{"strategy_id":"s-1","name":"x"}"#
        )
        .starts_with("unknown field `name`"));
    }

    #[test]
    fn reply_extras() {
        let t = crate::event::TradeExecuted {
            portfolio_id: "p-1".into(),
            strategy_id: "s-1".into(),
            trade_id: NEW_ID,
            symbol: "BTC-USDT".into(),
            side: Side::Buy,
            quantity: dec("0.5"),
            price: dec("20000"),
            fee: dec("10"),
            realized_pnl: dec("0"),
            cash_after: dec("14990"),
            position_after: dec("0.5"),
            cost_basis_after: dec("10010"),
            gross_entry_after: dec("10000"),
            equity_after: Some(dec("24990")),
        };
        assert_eq!(
            reply_extra(&Event::TradeExecuted(t)),
            Some(serde_json::json!({"status": "executed", "trade": {
                "trade_id": NEW_ID.to_string(), "symbol": "BTC-USDT", "side": "buy", "quantity": "0.5",
                "price": "20000", "fee": "10", "realized_pnl": "0", "cash_after": "14990", "position_after": "0.5"}}))
        );
        let r = crate::event::TradeSignalRejected {
            portfolio_id: "p-1".into(),
            reason: "OVERSELL".into(),
            detail: "sell 2 BTC: holding 1.5".into(),
            signal: crate::event::SignalRecord {
                strategy_id: "s-1".into(),
                symbol: "BTC-USDT".into(),
                side: Side::Sell,
                quantity: dec("2"),
                price: dec("1"),
                fee: None,
            },
        };
        assert_eq!(
            reply_extra(&Event::TradeSignalRejected(r)),
            Some(
                serde_json::json!({"status": "rejected", "reason": "OVERSELL", "detail": "sell 2 BTC: holding 1.5"})
            )
        );
        assert_eq!(
            reply_extra(&Event::PortfolioClosed(crate::event::PortfolioClosed {
                portfolio_id: "p-1".into()
            })),
            None
        );
    }
}

//! The event envelope stored on JetStream (API.md, "Events"), and its decoding.

use ch_domain::{AggregateType, Event};
use chrono::{DateTime, Utc};
use serde::de::value::{MapAccessDeserializer, StrDeserializer};
use serde::de::{DeserializeSeed, MapAccess};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::DecodeError;

/// Metadata written around every event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub event_id: Uuid,
    pub schema_version: u32,
    pub aggregate_type: AggregateType,
    pub aggregate_id: String,
    pub aggregate_version: u64,
    /// Business time of the fact (`at` of the command).
    pub occurred_at: DateTime<Utc>,
    /// Wall-clock time the command worker stored it.
    pub recorded_at: DateTime<Utc>,
    /// The three ids below are always in the body (API.md's envelope), `null` when unknown;
    /// events stored before without them decode as `None`.
    #[serde(default)]
    pub command_id: Option<Uuid>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub causation_id: Option<String>,
    /// What the command asked, summed up (`ch_domain::request::Common::command_digest`): only
    /// with a `command_id`, to tell a re-send from another command under the same id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_digest: Option<String>,
}

/// Serialized form: the metadata fields, `event_type` and `payload` side by side.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    #[serde(flatten)]
    meta: &'a Meta,
    #[serde(flatten)]
    event: &'a Event,
}

/// Read form. No `#[serde(flatten)]` here: it would buffer the payload and lose the raw text.
#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    event_id: Uuid,
    schema_version: u32,
    aggregate_type: AggregateType,
    aggregate_id: String,
    aggregate_version: u64,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    #[serde(default)]
    command_id: Option<Uuid>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    causation_id: Option<String>,
    #[serde(default)]
    command_digest: Option<String>,
    event_type: String,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// The envelope's `event_type` and `payload` as the two entries of the map that the adjacently
/// tagged [`Event`] reads: the payload is parsed once, from its own text, and the event type
/// picks its struct (no second document to build and parse).
struct Tagged<'e, 'de> {
    event_type: Option<&'e str>,
    payload: Option<&'de RawValue>,
}

impl<'de> MapAccess<'de> for Tagged<'_, 'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let key = match (self.event_type, self.payload) {
            (Some(_), _) => "event_type",
            (None, Some(_)) => "payload",
            (None, None) => return Ok(None),
        };
        seed.deserialize(StrDeserializer::<serde_json::Error>::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        match (self.event_type.take(), self.payload.take()) {
            (Some(t), payload) => {
                self.payload = payload;
                seed.deserialize(StrDeserializer::<serde_json::Error>::new(t))
            }
            (None, Some(p)) => seed.deserialize(p),
            (None, None) => Err(serde::de::Error::custom("no value left")),
        }
    }
}

/// An event read back from the stream, with its stream sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: u64,
    pub meta: Meta,
    pub event: Event,
}

/// Encodes an envelope as JSON bytes.
pub fn encode(meta: &Meta, event: &Event) -> Vec<u8> {
    serde_json::to_vec(&EnvelopeOut { meta, event }).expect("events always serialize")
}

/// Decodes an envelope. The payload is decoded from its own text (not through a buffered
/// value) so that decimals stay exact.
///
/// # Errors
/// [`DecodeError`] when the body is not an envelope of a known event type.
pub fn decode(seq: u64, body: &[u8]) -> Result<StoredEvent, DecodeError> {
    let env: EnvelopeIn<'_> =
        serde_json::from_slice(body).map_err(|e| DecodeError(format!("envelope: {e}")))?;
    let event = Event::deserialize(MapAccessDeserializer::new(Tagged {
        event_type: Some(&env.event_type),
        payload: Some(env.payload),
    }))
    .map_err(|e| DecodeError(format!("{} payload: {e}", env.event_type)))?;
    Ok(StoredEvent {
        seq,
        meta: Meta {
            event_id: env.event_id,
            schema_version: env.schema_version,
            aggregate_type: env.aggregate_type,
            aggregate_id: env.aggregate_id,
            aggregate_version: env.aggregate_version,
            occurred_at: env.occurred_at,
            recorded_at: env.recorded_at,
            command_id: env.command_id,
            correlation_id: env.correlation_id,
            causation_id: env.causation_id,
            command_digest: env.command_digest,
        },
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ch_domain::event::{MarketPriceRecorded, Side, TradeExecuted};
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn meta() -> Meta {
        let at = DateTime::parse_from_rfc3339("2026-01-05T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Meta {
            event_id: Uuid::nil(),
            schema_version: 1,
            aggregate_type: AggregateType::Portfolio,
            aggregate_id: "p1".into(),
            aggregate_version: 3,
            occurred_at: at,
            recorded_at: at,
            command_id: None,
            correlation_id: Some("c\"1".into()),
            causation_id: None,
            command_digest: None,
        }
    }

    #[test]
    fn events_decode_as_encoded_with_exact_decimals() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        let events = [
            Event::TradeExecuted(TradeExecuted {
                portfolio_id: "p1".into(),
                strategy_id: "s1".into(),
                trade_id: Uuid::from_u128(7),
                symbol: "BTC-USDT".into(),
                side: Side::Sell,
                quantity: d("0.10000000"),
                price: d("20123.45678901234567"),
                fee: d("2.0123"),
                realized_pnl: d("-0.000000001"),
                cash_after: d("10000.5"),
                position_after: d("0"),
                cost_basis_after: d("0"),
                gross_entry_after: d("0"),
                equity_after: Some(d("10000.5")),
            }),
            Event::MarketPriceRecorded(MarketPriceRecorded {
                symbol: "ETH-USDT".into(),
                price: d("1999.99"),
            }),
        ];
        for event in events {
            let body = encode(&meta(), &event);
            let back = decode(42, &body).unwrap();
            assert_eq!(back.seq, 42);
            assert_eq!(back.meta, meta());
            assert_eq!(back.event, event);
            // Scale too: "0.10000000" stays eight places.
            if let Event::TradeExecuted(t) = &back.event {
                assert_eq!(t.quantity.to_string(), "0.10000000");
            }
        }
    }

    #[test]
    fn the_envelope_names_every_id_null_when_unknown_and_decodes_without_them() {
        let event = Event::MarketPriceRecorded(MarketPriceRecorded {
            symbol: "ETH-USDT".into(),
            price: Decimal::ONE,
        });
        let body: serde_json::Value = serde_json::from_slice(&encode(&meta(), &event)).unwrap();
        assert_eq!(body["command_id"], serde_json::Value::Null);
        assert_eq!(body["correlation_id"], "c\"1");
        assert_eq!(body["causation_id"], serde_json::Value::Null);
        for key in ["command_id", "correlation_id", "causation_id"] {
            assert!(body.get(key).is_some(), "{key} missing: {body}");
        }
        // As stored before: the unknown ids left out.
        let mut old = body.clone();
        for key in ["command_id", "causation_id"] {
            old.as_object_mut().unwrap().remove(key);
        }
        let back = decode(1, &serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(back.meta, meta());
    }

    #[test]
    fn an_unknown_type_or_a_bad_payload_is_a_decode_error_that_names_the_type() {
        let body = encode(
            &meta(),
            &Event::MarketPriceRecorded(MarketPriceRecorded {
                symbol: "ETH-USDT".into(),
                price: Decimal::ONE,
            }),
        );
        let text = String::from_utf8(body).unwrap();
        let unknown = text.replace("MarketPriceRecorded", "PriceGuessed");
        let err = decode(1, unknown.as_bytes()).unwrap_err().to_string();
        assert!(
            err.contains("PriceGuessed payload: unknown variant"),
            "{err}"
        );
        let bad = text.replace("\"symbol\"", "\"sym\"");
        let err = decode(1, bad.as_bytes()).unwrap_err().to_string();
        assert!(
            err.contains("MarketPriceRecorded payload: missing field `symbol`"),
            "{err}"
        );
        let err = decode(1, b"{}").unwrap_err().to_string();
        assert!(
            err.starts_with("undecodable event: envelope: missing field"),
            "{err}"
        );
    }
}

//! The event envelope stored on JetStream (API.md, "Events"), and its decoding.

use ch_domain::{AggregateType, Event};
use chrono::{DateTime, Utc};
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
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
    event_type: String,
    #[serde(borrow)]
    payload: &'a RawValue,
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
    let tagged = format!(
        "{{\"event_type\":{},\"payload\":{}}}",
        serde_json::to_string(&env.event_type).expect("a string serializes"),
        env.payload.get()
    );
    let event: Event = serde_json::from_str(&tagged)
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
        },
        event,
    })
}

//! What the field side hands to the rest of the agent: readings, device states, batches.
//!
//! Invariants:
//! - A reading with a bad [`Quality`] carries no value (`value == None`): a failed read
//!   never produces a fake or a stale number.
//! - A reading with [`Quality::Good`] always carries a value, and a float value is finite
//!   (non-finite decodings become [`Quality::Parse`]).
//! - `ts_ms` is wall-clock milliseconds since the Unix epoch at the moment the value was
//!   read (a Pi without RTC may boot with a stale clock; intervals use monotonic time).

use std::fmt;
use std::fmt::Write as _;

/// One decoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
}

impl Value {
    /// The value as a number, for deadbands; `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) => None,
        }
    }

    /// Appends the value as JSON (`null` for a non-finite float, which JSON cannot carry).
    pub fn write_json(&self, out: &mut String) {
        match self {
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::UInt(u) => {
                let _ = write!(out, "{u}");
            }
            Value::Float(f) if f.is_finite() => {
                let _ = write!(out, "{}", serde_json::Value::from(*f));
            }
            Value::Float(_) => out.push_str("null"),
            Value::Text(t) => out.push_str(&serde_json::Value::from(t.as_str()).to_string()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// How trustworthy a reading is; everything except `Good` comes without a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quality {
    Good,
    /// The device did not answer within the timeout (after the configured retries).
    Timeout,
    /// The device answered with this Modbus exception code.
    Exception(u8),
    /// An answer arrived but was corrupted (bad CRC, garbled frame).
    Crc,
    /// The bus is down: serial port missing, TCP connection refused or dropped.
    Disconnected,
    /// The answer did not belong to the request (wrong unit, function or transaction).
    Protocol,
    /// The data arrived but could not be turned into a value (bad text, NaN, failed checksum).
    Parse,
}

impl Quality {
    pub fn is_good(self) -> bool {
        self == Quality::Good
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quality::Good => f.write_str("good"),
            Quality::Timeout => f.write_str("timeout"),
            Quality::Exception(code) => write!(f, "exception:{code:02x}"),
            Quality::Crc => f.write_str("crc"),
            Quality::Disconnected => f.write_str("disconnected"),
            Quality::Protocol => f.write_str("protocol"),
            Quality::Parse => f.write_str("parse"),
        }
    }
}

/// One point's value at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: String,
    pub point: String,
    /// The point's topic override, used verbatim (no prefix) when set; see
    /// [`crate::topics::Topics::point`].
    pub topic: Option<String>,
    /// `None` exactly when `quality` is not good.
    pub value: Option<Value>,
    pub unit: Option<String>,
    pub ts_ms: i64,
    pub quality: Quality,
}

impl Reading {
    /// `{"value":…,"unit":…,"ts":…,"quality":…}`; `value` is `null` when quality is bad,
    /// `unit` is `null` when the point has none.
    pub fn payload_json(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push_str("{\"value\":");
        self.write_fields(&mut out);
        out.push('}');
        out
    }

    /// Writes `VALUE,"unit":…,"ts":…,"quality":…` (shared with the batch payload).
    fn write_fields(&self, out: &mut String) {
        match &self.value {
            Some(v) => v.write_json(out),
            None => out.push_str("null"),
        }
        out.push_str(",\"unit\":");
        match &self.unit {
            Some(u) => out.push_str(&serde_json::Value::from(u.as_str()).to_string()),
            None => out.push_str("null"),
        }
        let _ = write!(
            out,
            ",\"ts\":{},\"quality\":\"{}\"",
            self.ts_ms, self.quality
        );
    }
}

/// The per-device batch payload: `{"ts":…,"points":{"name":{"value":…,"unit":…,"ts":…,"quality":…},…}}`.
pub fn batch_json(ts_ms: i64, readings: &[Reading]) -> String {
    let mut out = String::with_capacity(32 + readings.len() * 80);
    let _ = write!(out, "{{\"ts\":{ts_ms},\"points\":{{");
    for (i, r) in readings.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::from(r.point.as_str()).to_string());
        out.push_str(":{\"value\":");
        r.write_fields(&mut out);
        out.push('}');
    }
    out.push_str("}}");
    out
}

/// A device's health as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// The last poll got an answer (data or a Modbus exception).
    Online,
    /// The last poll failed; polled on its normal interval still.
    Offline,
    /// Failed too often in a row; retried with a growing backoff so it cannot starve the bus.
    Quarantined,
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
            DeviceState::Quarantined => "quarantined",
        })
    }
}

/// What a bus task sends to the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldEvent {
    Reading(Reading),
    /// All points of one poll of a device with `batch = true`, as one JSON object
    /// (see [`batch_json`]); sent after that poll's individual readings.
    Batch {
        device: String,
        payload_json: String,
        ts_ms: i64,
    },
    /// Sent once per change of a device's state (and once at its first poll).
    DeviceState {
        device: String,
        state: DeviceState,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(value: Option<Value>, quality: Quality) -> Reading {
        Reading {
            device: "meter1".into(),
            point: "voltage".into(),
            topic: None,
            value,
            unit: Some("V".into()),
            ts_ms: 1_700_000_000_000,
            quality,
        }
    }

    #[test]
    fn payload_has_value_unit_ts_quality() {
        let r = reading(Some(Value::Float(230.1)), Quality::Good);
        assert_eq!(
            r.payload_json(),
            r#"{"value":230.1,"unit":"V","ts":1700000000000,"quality":"good"}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&r.payload_json()).unwrap();
        assert_eq!(parsed["value"], 230.1);
    }

    #[test]
    fn bad_quality_payload_has_null_value_and_reason() {
        let r = reading(None, Quality::Exception(2));
        assert_eq!(
            r.payload_json(),
            r#"{"value":null,"unit":"V","ts":1700000000000,"quality":"exception:02"}"#
        );
        assert_eq!(Quality::Exception(0x0b).to_string(), "exception:0b");
    }

    #[test]
    fn text_values_are_escaped() {
        let mut r = reading(Some(Value::Text("a\"b\\c".into())), Quality::Good);
        r.unit = None;
        let parsed: serde_json::Value = serde_json::from_str(&r.payload_json()).unwrap();
        assert_eq!(parsed["value"], "a\"b\\c");
        assert!(parsed["unit"].is_null());
    }

    #[test]
    fn batch_is_one_json_object_per_poll() {
        let a = reading(Some(Value::Int(-3)), Quality::Good);
        let mut b = reading(None, Quality::Timeout);
        b.point = "current".into();
        let json = batch_json(5, &[a, b]);
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["ts"], 5);
        assert_eq!(parsed["points"]["voltage"]["value"], -3);
        assert_eq!(parsed["points"]["current"]["quality"], "timeout");
    }
}

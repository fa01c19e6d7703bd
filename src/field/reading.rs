//! What the field side hands to the rest of the agent: readings, device states, batches.
//!
//! Invariants:
//! - A reading with a bad [`Quality`] carries no value (`value == None`): a failed read
//!   never produces a fake or a stale number.
//! - A reading with [`Quality::Good`] always carries a value, and a float value is finite
//!   (non-finite decodings become [`Quality::Parse`]).
//! - `ts_ms` is wall-clock milliseconds since the Unix epoch at the moment the value was
//!   read, and `mono_ms` the boot clock at that moment ([`crate::clock`]): a Pi without
//!   RTC may boot with a stale wall clock, and the boot clock lets a later sync correct
//!   the time. `time` says which it is: [`TimeMark::Synced`] (no `time` field in the
//!   payload), `"unsynced"` (the wall clock was not synchronized: `ts` may be wrong) or
//!   `"corrected"` (`ts` was computed from the boot clock after the sync).
//! - [`retime_payload`] changes only the `ts` numbers and the `time` field of a payload
//!   made here, byte for byte the rest.

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

/// How far a reading's `ts` can be trusted: its payload's `time` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimeMark {
    /// Read while the wall clock was synchronized: no `time` field.
    #[default]
    Synced,
    /// Read while the wall clock was not synchronized; not corrected (yet).
    Unsynced,
    /// Read before the sync; `ts` computed afterwards from the boot clock.
    Corrected,
}

impl TimeMark {
    /// The payload's `time` value; `None` for a synchronized reading.
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            TimeMark::Synced => None,
            TimeMark::Unsynced => Some("unsynced"),
            TimeMark::Corrected => Some("corrected"),
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
    /// The boot clock ([`crate::clock::mono_ms`]) when `ts_ms` was taken.
    pub mono_ms: u64,
    pub time: TimeMark,
    pub quality: Quality,
}

impl Reading {
    /// `{"value":…,"unit":…,"ts":…,"quality":…}`; `value` is `null` when quality is bad,
    /// `unit` is `null` when the point has none; `,"time":"unsynced"` (or `"corrected"`)
    /// last unless the reading is [`TimeMark::Synced`].
    pub fn payload_json(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push_str("{\"value\":");
        self.write_fields(&mut out);
        if let Some(mark) = self.time.as_str() {
            let _ = write!(out, ",\"time\":\"{mark}\"");
        }
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

/// A payload of [`Reading::payload_json`] or [`batch_json`] after a clock correction:
/// every integer `"ts"` moved by `delta_ms`, and the top level's `time` field set to
/// `mark` (added as its last field when missing; [`TimeMark::Synced`] leaves it as it
/// is).
/// Everything else stays byte for byte. `None` when the payload is not such an object
/// (then it is left as it is: a time is never guessed).
pub fn retime_payload(payload: &[u8], delta_ms: i64, mark: TimeMark) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(payload).ok()?;
    let bytes = text.as_bytes();
    if bytes.first() != Some(&b'{') || bytes.last() != Some(&b'}') {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 20);
    let mut depth = 0usize;
    let mut marked = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    if i + 1 != bytes.len() {
                        return None;
                    }
                    if let (false, Some(mark)) = (marked, mark.as_str()) {
                        let _ = write!(out, ",\"time\":\"{mark}\"");
                    }
                }
            }
            b'"' => {
                let end = string_end(bytes, i)?;
                let key = &text[i + 1..end];
                let value = end + 2;
                out.push_str(&text[i..=end]);
                i = end + 1;
                if bytes.get(i) != Some(&b':') {
                    continue;
                }
                if key == "ts"
                    && bytes
                        .get(value)
                        .is_some_and(|b| *b == b'-' || b.is_ascii_digit())
                {
                    let digits = bytes[value + 1..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(bytes.len(), |n| value + 1 + n);
                    let ts: i64 = text[value..digits].parse().ok()?;
                    let _ = write!(out, ":{}", ts.saturating_add(delta_ms));
                    i = digits;
                } else if key == "time" && depth == 1 && bytes.get(value) == Some(&b'"') {
                    let value_end = string_end(bytes, value)?;
                    marked = true;
                    let _ = match mark.as_str() {
                        Some(mark) => write!(out, ":\"{mark}\""),
                        None => write!(out, ":{}", &text[value..=value_end]),
                    };
                    i = value_end + 1;
                }
                continue;
            }
            _ => {}
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    (depth == 0).then(|| out.into_bytes())
}

/// The index of the quote that closes the JSON string opened at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
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
        /// The boot clock when `ts_ms` was taken.
        mono_ms: u64,
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
            mono_ms: 5_000,
            time: TimeMark::Synced,
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

    #[test]
    fn unsynced_and_corrected_readings_say_so_in_their_payload() {
        let mut r = reading(Some(Value::Float(230.1)), Quality::Good);
        r.time = TimeMark::Unsynced;
        assert_eq!(
            r.payload_json(),
            r#"{"value":230.1,"unit":"V","ts":1700000000000,"quality":"good","time":"unsynced"}"#
        );
        let corrected =
            retime_payload(r.payload_json().as_bytes(), 86_400_000, TimeMark::Corrected)
                .expect("our payload");
        r.ts_ms += 86_400_000;
        r.time = TimeMark::Corrected;
        assert_eq!(String::from_utf8(corrected).unwrap(), r.payload_json());
        r.time = TimeMark::Synced;
        let synced = r.payload_json();
        let back = retime_payload(synced.as_bytes(), 0, TimeMark::Unsynced).unwrap();
        r.time = TimeMark::Unsynced;
        assert_eq!(String::from_utf8(back).unwrap(), r.payload_json());
        let kept = retime_payload(r.payload_json().as_bytes(), 0, TimeMark::Synced).unwrap();
        assert_eq!(String::from_utf8(kept).unwrap(), r.payload_json());
        let plain = retime_payload(synced.as_bytes(), 0, TimeMark::Synced).unwrap();
        assert_eq!(String::from_utf8(plain).unwrap(), synced);
    }

    #[test]
    fn retiming_a_batch_moves_every_ts_and_nothing_in_texts_or_names() {
        let mut a = reading(
            Some(Value::Text(r#"x","ts":5,"time":"unsynced"#.into())),
            Quality::Good,
        );
        a.point = "ts".into();
        let mut b = reading(Some(Value::Text("back\\".into())), Quality::Good);
        b.point = "time".into();
        b.ts_ms = -20;
        let json = batch_json(100, &[a, b]);
        let retimed = retime_payload(json.as_bytes(), 1000, TimeMark::Unsynced).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&retimed).unwrap();
        assert_eq!(parsed["ts"], 1100);
        assert_eq!(parsed["time"], "unsynced");
        assert_eq!(parsed["points"]["ts"]["ts"], 1_700_000_001_000_i64);
        assert_eq!(
            parsed["points"]["ts"]["value"],
            r#"x","ts":5,"time":"unsynced"#
        );
        assert_eq!(parsed["points"]["time"]["ts"], 980);
        assert_eq!(parsed["points"]["time"]["value"], "back\\");
        let corrected = retime_payload(&retimed, -100, TimeMark::Corrected).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&corrected).unwrap();
        assert_eq!(parsed["ts"], 1000);
        assert_eq!(parsed["time"], "corrected");
    }

    #[test]
    fn payloads_that_are_not_ours_are_left_alone() {
        for bad in [
            &b"online"[..],
            b"{\"ts\":",
            b"{\"ts\":1}}",
            b"{\"a\":\"b}",
            b"",
            b"\xff{}",
        ] {
            assert_eq!(retime_payload(bad, 5, TimeMark::Corrected), None, "{bad:?}");
        }
    }
}

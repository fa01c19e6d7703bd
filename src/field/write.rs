//! Writes to field devices: which points may be written, the limits a value must keep,
//! and how an engineering value becomes the request that puts it into the device.
//!
//! ```toml
//! [[bus.device.point]]
//! name = "setpoint"
//! kind = "holding"          # writable kinds: "holding" and "coil"
//! address = 10
//! type = "i16"
//! scale = 0.1               # the device holds tenths: 21.5 is written as raw 215
//! writable = true           # default false: commands to this point are refused
//! min = 5.0                 # limits in engineering units (after scale/offset)
//! max = 30.0
//! step = 0.5                # optional: the value must be min + k × step (or k × step)
//! # allowed = [0, 1, 3]     # optional: the only values accepted (operating modes)
//! min_interval_ms = 1000    # optional: least time between two writes of this point
//! # write_function = 16     # one register: 6 (default) or 16 for devices that lack FC6
//! ```
//!
//! A device with `mask_write = false` lacks function 22: its `bit` points are written by
//! a read-modify-write that the bus task does with no other request in between.
//!
//! Invariants:
//! - A value is written only if every rule passes; a refusal carries the reason in
//!   words and nothing reaches the device.
//! - The engineering value goes back through scale and offset; a raw value the type
//!   cannot hold (fraction for an integer, out of the type's range, not finite) is
//!   refused, never wrapped, truncated or saturated.
//! - Multi-register values use the point's byte/word order, the exact inverse of
//!   [`Codec::decode_registers`], and go out in one FC16 request.
//! - Coils: FC5. One register: FC6, or FC16 with `write_function = 16`. A bit in a
//!   holding register: FC22, or read-modify-write where the device lacks FC22.
//! - This module does no I/O: it turns a value into a [`WriteOp`]; the bus task sends it.

use std::time::Duration;

use super::config::{BusKind, DeviceConfig, PointConfig};
use super::decode::{Codec, DataType, RegisterKind};
use super::plan::PointSpan;
use super::reading::Value;
use crate::problem::Scope;

/// The resolved write settings of a writable point.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WriteSpec {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub step: Option<f64>,
    pub allowed: Option<Vec<f64>>,
    pub min_interval: Duration,
    /// FC16 for a single register.
    pub multiple: bool,
    /// The device implements FC22 (mask write).
    pub mask_write: bool,
}

impl WriteSpec {
    /// The write settings of `p` on `device`, or `None` when the point is not writable.
    pub fn of(device: &DeviceConfig, p: &PointConfig) -> Option<WriteSpec> {
        p.writable.then(|| WriteSpec {
            min: p.min,
            max: p.max,
            step: p.step,
            allowed: p.allowed.clone(),
            min_interval: Duration::from_millis(p.min_interval_ms.unwrap_or(0)),
            multiple: p.write_function == Some(16),
            mask_write: device.mask_write,
        })
    }

    /// The limits in one line, for `check-config`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(min) = self.min {
            parts.push(format!("min {min}"));
        }
        if let Some(max) = self.max {
            parts.push(format!("max {max}"));
        }
        if let Some(step) = self.step {
            parts.push(format!("step {step}"));
        }
        if let Some(allowed) = &self.allowed {
            let list: Vec<String> = allowed.iter().map(f64::to_string).collect();
            parts.push(format!("allowed [{}]", list.join(", ")));
        }
        if !self.min_interval.is_zero() {
            parts.push(format!(
                "at most one write per {} ms",
                self.min_interval.as_millis()
            ));
        }
        if parts.is_empty() {
            "no limits".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// A value asked for by a command, before any rule is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Requested {
    Bool(bool),
    /// A number written without a fraction or exponent, kept exact (64-bit types).
    Int(i128),
    Float(f64),
}

impl Requested {
    fn as_f64(self) -> f64 {
        match self {
            Requested::Bool(b) => f64::from(u8::from(b)),
            Requested::Int(i) => i as f64,
            Requested::Float(f) => f,
        }
    }

    /// The value as it is reported back (`applied` in the result).
    pub fn to_value(self) -> Value {
        match self {
            Requested::Bool(b) => Value::Bool(b),
            Requested::Int(i) => i64::try_from(i)
                .map(Value::Int)
                .unwrap_or(Value::Float(i as f64)),
            Requested::Float(f) => Value::Float(f),
        }
    }
}

/// Why a command was not carried out; [`Refusal::reason`] is the counter's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("no such point")]
    UnknownPoint,
    #[error("the point is not writable")]
    NotWritable,
    #[error("payload not understood: {0}")]
    BadPayload(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("not representable: {0}")]
    NotRepresentable(String),
    #[error("too soon: the point accepts one write per {min_interval_ms} ms")]
    TooSoon { min_interval_ms: u64 },
    #[error("stale: {0}")]
    Stale(String),
    #[error("device offline")]
    DeviceOffline,
    #[error("the bus has too many commands waiting")]
    Busy,
}

impl Refusal {
    /// The short name used in counters and results (`"out_of_range"`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownPoint => "unknown_point",
            Refusal::NotWritable => "not_writable",
            Refusal::BadPayload(_) => "bad_payload",
            Refusal::OutOfRange(_) => "out_of_range",
            Refusal::NotRepresentable(_) => "not_representable",
            Refusal::TooSoon { .. } => "too_soon",
            Refusal::Stale(_) => "stale",
            Refusal::DeviceOffline => "device_offline",
            Refusal::Busy => "busy",
        }
    }
}

/// One write as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// FC5.
    Coil { address: u16, on: bool },
    /// FC6.
    Register { address: u16, word: u16 },
    /// FC16.
    Registers { address: u16, words: Vec<u16> },
    /// FC22: `new = (old & and) | (or & !and)`.
    Mask { address: u16, and: u16, or: u16 },
    /// FC3 of one register, then FC6 with `bit` changed, with nothing in between.
    ReadModifyWrite { address: u16, bit: u8, on: bool },
}

impl WriteOp {
    /// The Modbus function code that writes (22 for a mask write, 6 for the write of a
    /// read-modify-write).
    pub fn function_code(&self) -> u8 {
        match self {
            WriteOp::Coil { .. } => 5,
            WriteOp::Register { .. } | WriteOp::ReadModifyWrite { .. } => 6,
            WriteOp::Registers { .. } => 16,
            WriteOp::Mask { .. } => 22,
        }
    }
}

/// Checks `value` against the point's rules and encodes it.
///
/// # Errors
/// The [`Refusal`] of the first rule that fails.
pub(crate) fn encode(
    spec: &WriteSpec,
    span: PointSpan,
    codec: &Codec,
    value: Requested,
) -> Result<WriteOp, Refusal> {
    let address = span.address;
    match (span.kind, codec.data_type) {
        (RegisterKind::Coil, _) => Ok(WriteOp::Coil {
            address,
            on: as_bool(value)?,
        }),
        (RegisterKind::Holding, DataType::Bit) => {
            let on = as_bool(value)?;
            let bit = codec.bit & 15;
            let mask = 1u16 << bit;
            Ok(if spec.mask_write {
                WriteOp::Mask {
                    address,
                    and: !mask,
                    or: if on { mask } else { 0 },
                }
            } else {
                WriteOp::ReadModifyWrite { address, bit, on }
            })
        }
        (RegisterKind::Holding, DataType::Bool) => {
            let word = u16::from(as_bool(value)?);
            Ok(register_op(spec, address, vec![word]))
        }
        (RegisterKind::Holding, t) if t.is_numeric() => {
            check_limits(spec, value)?;
            let words = encode_number(codec, value)?;
            Ok(register_op(spec, address, words))
        }
        _ => Err(Refusal::NotWritable),
    }
}

fn register_op(spec: &WriteSpec, address: u16, words: Vec<u16>) -> WriteOp {
    match words.as_slice() {
        [word] if !spec.multiple => WriteOp::Register {
            address,
            word: *word,
        },
        _ => WriteOp::Registers { address, words },
    }
}

fn as_bool(value: Requested) -> Result<bool, Refusal> {
    match value {
        Requested::Bool(b) => Ok(b),
        Requested::Int(0) => Ok(false),
        Requested::Int(1) => Ok(true),
        Requested::Float(0.0) => Ok(false),
        Requested::Float(1.0) => Ok(true),
        _ => Err(Refusal::OutOfRange(
            "an on/off point takes true/false, 1/0 or ON/OFF".into(),
        )),
    }
}

/// Tolerance for "a whole number" and "a multiple of the step" after float arithmetic.
fn near_integer(x: f64) -> Option<f64> {
    let r = x.round();
    ((x - r).abs() <= 1e-9 * r.abs().max(1.0)).then_some(r)
}

fn check_limits(spec: &WriteSpec, value: Requested) -> Result<(), Refusal> {
    let x = match value {
        Requested::Bool(_) => {
            return Err(Refusal::OutOfRange(
                "a number is needed, not true/false".into(),
            ))
        }
        v => v.as_f64(),
    };
    if !x.is_finite() {
        return Err(Refusal::OutOfRange("not a finite number".into()));
    }
    if let Some(min) = spec.min.filter(|min| x < *min) {
        return Err(Refusal::OutOfRange(format!(
            "{x} is below the minimum {min}"
        )));
    }
    if let Some(max) = spec.max.filter(|max| x > *max) {
        return Err(Refusal::OutOfRange(format!(
            "{x} is above the maximum {max}"
        )));
    }
    if let Some(step) = spec.step {
        let base = spec.min.unwrap_or(0.0);
        if near_integer((x - base) / step).is_none() {
            return Err(Refusal::OutOfRange(format!(
                "{x} is not {base} plus a multiple of the step {step}"
            )));
        }
    }
    if let Some(allowed) = &spec.allowed {
        if !allowed
            .iter()
            .any(|a| (a - x).abs() <= 1e-9 * a.abs().max(1.0))
        {
            let list: Vec<String> = allowed.iter().map(f64::to_string).collect();
            return Err(Refusal::OutOfRange(format!(
                "{x} is not one of the allowed values [{}]",
                list.join(", ")
            )));
        }
    }
    Ok(())
}

/// The raw integer an engineering value stands for, exact when scale and offset are
/// neutral (so 64-bit values keep every digit).
fn raw_integer(codec: &Codec, value: Requested) -> Result<i128, Refusal> {
    if let (Requested::Int(i), 1.0, 0.0) = (value, codec.scale, codec.offset) {
        return Ok(i);
    }
    let x = value.as_f64();
    let raw = (x - codec.offset) / codec.scale;
    let whole = near_integer(raw).ok_or_else(|| {
        Refusal::NotRepresentable(format!(
            "{x} would be the raw value {raw}, and type \"{}\" holds whole numbers only \
             (scale {}, offset {})",
            codec.data_type.name(),
            codec.scale,
            codec.offset
        ))
    })?;
    if whole.abs() > 1.8e19 {
        return Err(out_of_type(codec, x, raw));
    }
    Ok(whole as i128)
}

fn out_of_type(codec: &Codec, x: f64, raw: impl std::fmt::Display) -> Refusal {
    Refusal::NotRepresentable(format!(
        "{x} would be the raw value {raw}, outside what type \"{}\" holds",
        codec.data_type.name()
    ))
}

/// The register words of a number, most significant word first before the byte order.
fn encode_number(codec: &Codec, value: Requested) -> Result<Vec<u16>, Refusal> {
    let x = value.as_f64();
    let range = |lo: i128, hi: i128| -> Result<i128, Refusal> {
        let raw = raw_integer(codec, value)?;
        if raw < lo || raw > hi {
            return Err(out_of_type(codec, x, raw));
        }
        Ok(raw)
    };
    let be: Vec<u16> = match codec.data_type {
        DataType::U16 => vec![range(0, i128::from(u16::MAX))? as u16],
        DataType::I16 => vec![range(i128::from(i16::MIN), i128::from(i16::MAX))? as i16 as u16],
        DataType::U32 => split(u64::from(range(0, i128::from(u32::MAX))? as u32), 2),
        DataType::I32 => split(
            u64::from(range(i128::from(i32::MIN), i128::from(i32::MAX))? as i32 as u32),
            2,
        ),
        DataType::U64 => split(range(0, i128::from(u64::MAX))? as u64, 4),
        DataType::I64 => split(
            range(i128::from(i64::MIN), i128::from(i64::MAX))? as i64 as u64,
            4,
        ),
        DataType::F32 => {
            let raw = (x - codec.offset) / codec.scale;
            let f = raw as f32;
            if !raw.is_finite() || !f.is_finite() {
                return Err(out_of_type(codec, x, raw));
            }
            split(u64::from(f.to_bits()), 2)
        }
        DataType::F64 => {
            let raw = (x - codec.offset) / codec.scale;
            if !raw.is_finite() {
                return Err(out_of_type(codec, x, raw));
            }
            split(raw.to_bits(), 4)
        }
        DataType::Bool | DataType::Bit | DataType::String => return Err(Refusal::NotWritable),
    };
    Ok(codec.order_words(&be))
}

/// `value` as `n` 16-bit words, most significant first.
fn split(value: u64, n: usize) -> Vec<u16> {
    (0..n).rev().map(|i| (value >> (16 * i)) as u16).collect()
}

/// The write rules of one point (`at` is the point's path); called by the field
/// validator for every point.
pub(super) fn validate_point(at: &mut Scope<'_>, bus: BusKind, p: &PointConfig) {
    if !p.writable {
        for (key, set) in [
            ("min", p.min.is_some()),
            ("max", p.max.is_some()),
            ("step", p.step.is_some()),
            ("allowed", p.allowed.is_some()),
            ("min_interval_ms", p.min_interval_ms.is_some()),
            ("write_function", p.write_function.is_some()),
        ] {
            at.only_for(key, set, "points with `writable = true`");
        }
        return;
    }
    let t = p.data_type_or_default();
    let writable_kind = matches!(p.kind, Some(RegisterKind::Coil | RegisterKind::Holding));
    if !at.check(
        bus != BusKind::Lines && writable_kind,
        "writable",
        "only coils and holding registers can be written (input registers and discrete \
         inputs are read-only)",
    ) {
        return;
    }
    at.check(
        t != DataType::String,
        "writable",
        "string points cannot be written",
    );
    let numeric = t.is_numeric();
    for (key, v) in [("min", p.min), ("max", p.max), ("step", p.step)] {
        if let Some(v) = v {
            at.check(numeric, key, "limits apply to numeric points only");
            at.check(v.is_finite(), key, "must be a finite number");
        }
    }
    if let (Some(min), Some(max)) = (p.min, p.max) {
        at.check(min <= max, "min", "must not be above `max`");
    }
    if let Some(step) = p.step {
        at.check(step > 0.0, "step", "must be above 0");
    }
    if let Some(allowed) = &p.allowed {
        at.check(numeric, "allowed", "applies to numeric points only");
        at.check(
            !allowed.is_empty() && allowed.iter().all(|v| v.is_finite()),
            "allowed",
            "must list at least one finite number",
        );
    }
    if let Some(f) = p.write_function {
        at.check(
            f == 6 || f == 16,
            "write_function",
            "must be 6 (write single register) or 16 (write multiple registers)",
        );
        at.check(
            p.kind == Some(RegisterKind::Holding) && t.registers(1) == 1,
            "write_function",
            "applies to points of one holding register",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::decode::ByteOrder;

    fn spec() -> WriteSpec {
        WriteSpec {
            min: None,
            max: None,
            step: None,
            allowed: None,
            min_interval: Duration::ZERO,
            multiple: false,
            mask_write: true,
        }
    }

    fn holding(address: u16, t: DataType) -> PointSpan {
        PointSpan {
            kind: RegisterKind::Holding,
            address,
            width: t.registers(1),
        }
    }

    /// Every numeric type and byte order: the words written decode to the value again.
    #[test]
    fn encoding_is_the_inverse_of_decoding_for_every_type_and_order() {
        let values = [
            (DataType::U16, Requested::Int(54321)),
            (DataType::I16, Requested::Int(-1234)),
            (DataType::U32, Requested::Int(3_000_000_000)),
            (DataType::I32, Requested::Int(-2_000_000_000)),
            (DataType::U64, Requested::Int(18_000_000_000_000_000_001)),
            (DataType::I64, Requested::Int(-9_000_000_000_000_000_007)),
            (DataType::F32, Requested::Float(21.5)),
            (DataType::F64, Requested::Float(-1234.5678)),
        ];
        for order in ByteOrder::ALL {
            for (t, v) in values {
                let codec = Codec::new(t, order);
                let op = encode(&spec(), holding(0, t), &codec, v).unwrap();
                let words = match op {
                    WriteOp::Register { word, .. } => vec![word],
                    WriteOp::Registers { words, .. } => words,
                    other => panic!("{other:?}"),
                };
                assert_eq!(words.len(), usize::from(t.registers(1)));
                let back = codec.decode_registers(&words).unwrap();
                assert_eq!(back.as_f64(), v.to_value().as_f64(), "{t:?} {order:?}");
                if let (Requested::Int(i), Value::UInt(u)) = (v, &back) {
                    assert_eq!(i, i128::from(*u));
                }
                if let (Requested::Int(i), Value::Int(n)) = (v, &back) {
                    assert_eq!(i, i128::from(*n));
                }
            }
        }
    }

    #[test]
    fn known_words_for_the_orders() {
        let codec = |order| Codec::new(DataType::U32, order);
        let words = |order| match encode(
            &spec(),
            holding(0, DataType::U32),
            &codec(order),
            Requested::Int(0x1122_3344),
        ) {
            Ok(WriteOp::Registers { words, .. }) => words,
            other => panic!("{other:?}"),
        };
        assert_eq!(words(ByteOrder::ABCD), [0x1122, 0x3344]);
        assert_eq!(words(ByteOrder::BADC), [0x2211, 0x4433]);
        assert_eq!(words(ByteOrder::CDAB), [0x3344, 0x1122]);
        assert_eq!(words(ByteOrder::DCBA), [0x4433, 0x2211]);
    }

    #[test]
    fn scale_and_offset_go_back_to_the_raw_value_or_are_refused() {
        let mut codec = Codec::new(DataType::I16, ByteOrder::ABCD);
        codec.scale = 0.1;
        let op = encode(
            &spec(),
            holding(7, DataType::I16),
            &codec,
            Requested::Float(21.5),
        );
        assert_eq!(
            op,
            Ok(WriteOp::Register {
                address: 7,
                word: 215
            })
        );
        let refused = encode(
            &spec(),
            holding(7, DataType::I16),
            &codec,
            Requested::Float(21.55),
        )
        .unwrap_err();
        assert_eq!(refused.reason(), "not_representable");
        assert!(refused.to_string().contains("whole numbers"), "{refused}");
        let refused = encode(
            &spec(),
            holding(7, DataType::I16),
            &codec,
            Requested::Float(5000.0),
        )
        .unwrap_err();
        assert!(refused.to_string().contains("outside"), "{refused}");
        let u = Codec::new(DataType::U16, ByteOrder::ABCD);
        for v in [Requested::Int(-1), Requested::Int(65536)] {
            let e = encode(&spec(), holding(0, DataType::U16), &u, v).unwrap_err();
            assert_eq!(e.reason(), "not_representable", "{v:?}");
        }
        let f = Codec::new(DataType::F32, ByteOrder::ABCD);
        let e = encode(
            &spec(),
            holding(0, DataType::F32),
            &f,
            Requested::Float(1e39),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "not_representable");
    }

    #[test]
    fn limits_step_and_allowed_values_refuse_with_the_reason() {
        let codec = Codec::new(DataType::F32, ByteOrder::ABCD);
        let at = holding(0, DataType::F32);
        let limited = WriteSpec {
            min: Some(5.0),
            max: Some(30.0),
            step: Some(0.5),
            ..spec()
        };
        assert!(encode(&limited, at, &codec, Requested::Float(21.5)).is_ok());
        for (v, words) in [
            (4.5, "below the minimum 5"),
            (30.5, "above the maximum 30"),
            (21.3, "step 0.5"),
        ] {
            let e = encode(&limited, at, &codec, Requested::Float(v)).unwrap_err();
            assert_eq!(e.reason(), "out_of_range");
            assert!(e.to_string().contains(words), "{e}");
        }
        let modes = WriteSpec {
            allowed: Some(vec![0.0, 1.0, 3.0]),
            ..spec()
        };
        assert!(encode(&modes, at, &codec, Requested::Int(3)).is_ok());
        let e = encode(&modes, at, &codec, Requested::Int(2)).unwrap_err();
        assert!(e.to_string().contains("[0, 1, 3]"), "{e}");
        let e = encode(&modes, at, &codec, Requested::Bool(true)).unwrap_err();
        assert_eq!(e.reason(), "out_of_range");
    }

    #[test]
    fn coils_bits_and_single_registers_pick_their_function() {
        let coil = PointSpan {
            kind: RegisterKind::Coil,
            address: 3,
            width: 1,
        };
        let b = Codec::new(DataType::Bool, ByteOrder::ABCD);
        assert_eq!(
            encode(&spec(), coil, &b, Requested::Int(0)),
            Ok(WriteOp::Coil {
                address: 3,
                on: false
            })
        );
        assert_eq!(
            encode(&spec(), coil, &b, Requested::Int(2))
                .unwrap_err()
                .reason(),
            "out_of_range"
        );
        let mut bit = Codec::new(DataType::Bit, ByteOrder::ABCD);
        bit.bit = 4;
        let at = holding(9, DataType::Bit);
        assert_eq!(
            encode(&spec(), at, &bit, Requested::Bool(true)),
            Ok(WriteOp::Mask {
                address: 9,
                and: !0x10,
                or: 0x10
            })
        );
        let no_fc22 = WriteSpec {
            mask_write: false,
            ..spec()
        };
        assert_eq!(
            encode(&no_fc22, at, &bit, Requested::Bool(false)),
            Ok(WriteOp::ReadModifyWrite {
                address: 9,
                bit: 4,
                on: false
            })
        );
        let fc16 = WriteSpec {
            multiple: true,
            ..spec()
        };
        let u = Codec::new(DataType::U16, ByteOrder::ABCD);
        let op = encode(&fc16, holding(1, DataType::U16), &u, Requested::Int(7)).unwrap();
        assert_eq!(op.function_code(), 16);
    }
}

#[cfg(test)]
mod validation_tests {
    use crate::field::config::tests::parse;

    fn problems(point: &str) -> Vec<(String, String)> {
        let text = format!(
            "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\n\
             [[bus.device]]\nname = \"d\"\n[[bus.device.point]]\nname = \"p\"\n{point}\n"
        );
        parse(&text)
            .validate()
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    }

    #[test]
    fn read_only_kinds_and_stray_write_keys_are_refused_at_check_config() {
        assert_eq!(
            problems("kind = \"holding\"\naddress = 0\nwritable = true\nmin = 1.0\nmax = 2.0"),
            vec![]
        );
        for kind in ["input", "discrete"] {
            let found = problems(&format!("kind = \"{kind}\"\naddress = 0\nwritable = true"));
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].0, "bus[0].device[0].point[0].writable");
            assert!(found[0].1.contains("read-only"), "{found:?}");
        }
        let found = problems("kind = \"holding\"\naddress = 0\nmax = 3.0");
        assert_eq!(found[0].0, "bus[0].device[0].point[0].max");
        let found = problems("kind = \"coil\"\naddress = 0\nwritable = true\nmin = 0.0");
        assert_eq!(found[0].1, "limits apply to numeric points only");
        let found = problems(
            "kind = \"holding\"\naddress = 0\ntype = \"u32\"\nwritable = true\nwrite_function = 6",
        );
        assert_eq!(found[0].1, "applies to points of one holding register");
        let found = problems(
            "kind = \"holding\"\naddress = 0\nwritable = true\nmin = 3.0\nmax = 1.0\nstep = 0.0",
        );
        assert_eq!(found.len(), 2, "{found:?}");
    }
}

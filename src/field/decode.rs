//! Turning Modbus register words and bits into values: data types, byte/word orders,
//! scale and offset.
//!
//! Byte orders name the four bytes of a 32-bit value `A B C D` from most to least
//! significant, as they appear in consecutive registers:
//!
//! | order | registers (32-bit) | meaning |
//! |---|---|---|
//! | `ABCD` | `AB` `CD` | big-endian, the Modbus default |
//! | `BADC` | `BA` `DC` | bytes swapped inside each register |
//! | `CDAB` | `CD` `AB` | registers in reverse order ("word swap", low word first) |
//! | `DCBA` | `DC` `BA` | little-endian: both |
//!
//! The same two independent switches (swap bytes in a register; reverse the register
//! order) apply to 64-bit values (`CDAB` for a u64 = the four registers low word
//! first) and to 16-bit values (only the byte swap matters). Strings keep the register
//! order; only the byte swap applies.
//!
//! Invariants: decoding never panics on short input (it returns
//! [`DecodeError::Short`]); a non-finite float is an error, never a value.

use std::io::Write as _;

use serde::Deserialize;

use super::reading::Value;

/// Which Modbus table a point lives in (and so which read function reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    /// Read coils (function 0x01), 1 bit each.
    Coil,
    /// Read discrete inputs (function 0x02), 1 bit each.
    Discrete,
    /// Read input registers (function 0x04), 16 bits each.
    Input,
    /// Read holding registers (function 0x03), 16 bits each.
    Holding,
}

impl RegisterKind {
    pub fn function_code(self) -> u8 {
        match self {
            RegisterKind::Coil => 0x01,
            RegisterKind::Discrete => 0x02,
            RegisterKind::Holding => 0x03,
            RegisterKind::Input => 0x04,
        }
    }

    /// Coils and discrete inputs are bits; the others are 16-bit registers.
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::Discrete)
    }

    pub fn name(self) -> &'static str {
        match self {
            RegisterKind::Coil => "coil",
            RegisterKind::Discrete => "discrete",
            RegisterKind::Input => "input",
            RegisterKind::Holding => "holding",
        }
    }

    /// The classic 1-based "Modicon" number of a 0-based protocol address (`holding 0` is
    /// `40001`), only for messages that help people who read vendor manuals.
    pub fn modicon(self, address: u16) -> String {
        let prefix = match self {
            RegisterKind::Coil => 0,
            RegisterKind::Discrete => 1,
            RegisterKind::Input => 3,
            RegisterKind::Holding => 4,
        };
        if address < 9999 {
            format!("{prefix}{:04}", u32::from(address) + 1)
        } else {
            format!("{prefix}{:05}", u32::from(address) + 1)
        }
    }
}

/// How the words of a point are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// A coil or discrete input; on a register, "not zero".
    Bool,
    /// One bit (`bit = 0..=15`, 0 = least significant) of a register.
    Bit,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// `registers = n` registers of text, two ASCII/UTF-8 bytes each; trailing NULs and
    /// spaces are dropped.
    String,
}

impl DataType {
    /// Registers one value occupies (`string_registers` for strings; 1 for bits).
    pub fn registers(self, string_registers: u16) -> u16 {
        match self {
            DataType::Bool | DataType::Bit | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String => string_registers,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::Bit => "bit",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String => "string",
        }
    }

    /// True for types whose value is a number that scale and offset apply to.
    pub fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::Bit | DataType::String)
    }
}

/// Byte and word order of multi-byte values (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum ByteOrder {
    #[default]
    ABCD,
    BADC,
    CDAB,
    DCBA,
}

impl ByteOrder {
    pub const ALL: [ByteOrder; 4] = [
        ByteOrder::ABCD,
        ByteOrder::BADC,
        ByteOrder::CDAB,
        ByteOrder::DCBA,
    ];

    fn swap_bytes(self) -> bool {
        matches!(self, ByteOrder::BADC | ByteOrder::DCBA)
    }

    fn reverse_words(self) -> bool {
        matches!(self, ByteOrder::CDAB | ByteOrder::DCBA)
    }

    pub fn name(self) -> &'static str {
        match self {
            ByteOrder::ABCD => "ABCD",
            ByteOrder::BADC => "BADC",
            ByteOrder::CDAB => "CDAB",
            ByteOrder::DCBA => "DCBA",
        }
    }
}

/// Why words could not become a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{need} registers needed, {got} available")]
    Short { need: usize, got: usize },
    #[error("not a finite number")]
    NotFinite,
}

/// How one point's words become a value. Built once per point, used every poll.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    pub data_type: DataType,
    pub order: ByteOrder,
    /// Bit number for [`DataType::Bit`].
    pub bit: u8,
    /// Register count for [`DataType::String`].
    pub string_registers: u16,
    pub scale: f64,
    pub offset: f64,
}

impl Codec {
    pub fn new(data_type: DataType, order: ByteOrder) -> Codec {
        Codec {
            data_type,
            order,
            bit: 0,
            string_registers: 1,
            scale: 1.0,
            offset: 0.0,
        }
    }

    /// Registers this point occupies.
    pub fn registers(&self) -> u16 {
        self.data_type.registers(self.string_registers)
    }

    /// Decodes the point's registers (`regs` starts at the point's address; extra words
    /// after it are ignored), then applies scale and offset.
    ///
    /// # Errors
    /// [`DecodeError::Short`] if `regs` is too short, [`DecodeError::NotFinite`] for a NaN
    /// or infinite float.
    pub fn decode_registers(&self, regs: &[u16]) -> Result<Value, DecodeError> {
        let need = usize::from(self.registers());
        if regs.len() < need {
            return Err(DecodeError::Short {
                need,
                got: regs.len(),
            });
        }
        let regs = &regs[..need];
        let raw = match self.data_type {
            DataType::Bool => Value::Bool(regs[0] != 0),
            DataType::Bit => Value::Bool((regs[0] >> (self.bit & 15)) & 1 == 1),
            DataType::U16 => Value::UInt(u64::from(self.word(regs[0]))),
            DataType::I16 => Value::Int(i64::from(self.word(regs[0]) as i16)),
            DataType::U32 => Value::UInt(u64::from(self.be32(regs))),
            DataType::I32 => Value::Int(i64::from(self.be32(regs) as i32)),
            DataType::U64 => Value::UInt(self.be64(regs)),
            DataType::I64 => Value::Int(self.be64(regs) as i64),
            DataType::F32 => {
                let f = f32::from_bits(self.be32(regs));
                if !f.is_finite() {
                    return Err(DecodeError::NotFinite);
                }
                Value::Float(f32_to_f64_shortest(f))
            }
            DataType::F64 => {
                let f = f64::from_bits(self.be64(regs));
                if !f.is_finite() {
                    return Err(DecodeError::NotFinite);
                }
                Value::Float(f)
            }
            DataType::String => Value::Text(self.text(regs)),
        };
        self.scaled(raw)
    }

    /// Decodes a coil or discrete input.
    pub fn decode_bit(&self, bit: bool) -> Value {
        Value::Bool(bit)
    }

    /// Applies scale and offset. Integers stay integers when both are neutral; otherwise
    /// the result is a float rounded to 15 significant digits, so that `2301 × 0.1` is
    /// published as `230.1`, not `230.10000000000002`.
    ///
    /// # Errors
    /// [`DecodeError::NotFinite`] if the result overflows.
    pub fn scaled(&self, raw: Value) -> Result<Value, DecodeError> {
        if self.scale == 1.0 && self.offset == 0.0 {
            return Ok(raw);
        }
        let Some(x) = raw.as_f64() else {
            return Ok(raw);
        };
        if matches!(raw, Value::Bool(_)) {
            return Ok(raw);
        }
        let y = x * self.scale + self.offset;
        if !y.is_finite() {
            return Err(DecodeError::NotFinite);
        }
        Ok(Value::Float(round_15(y)))
    }

    fn word(&self, w: u16) -> u16 {
        if self.order.swap_bytes() {
            w.swap_bytes()
        } else {
            w
        }
    }

    /// The register words in most-significant-first order with bytes fixed.
    fn ordered<const N: usize>(&self, regs: &[u16]) -> [u16; N] {
        let mut out = [0u16; N];
        for (i, slot) in out.iter_mut().enumerate() {
            let src = if self.order.reverse_words() {
                regs[N - 1 - i]
            } else {
                regs[i]
            };
            *slot = self.word(src);
        }
        out
    }

    /// The registers that hold the most-significant-first words `be` in this point's
    /// byte/word order: the inverse of decoding's reordering (used to write a value).
    pub fn order_words(&self, be: &[u16]) -> Vec<u16> {
        let n = be.len();
        (0..n)
            .map(|i| {
                let src = if self.order.reverse_words() {
                    n - 1 - i
                } else {
                    i
                };
                self.word(be[src])
            })
            .collect()
    }

    fn be32(&self, regs: &[u16]) -> u32 {
        let [hi, lo] = self.ordered::<2>(regs);
        (u32::from(hi) << 16) | u32::from(lo)
    }

    fn be64(&self, regs: &[u16]) -> u64 {
        self.ordered::<4>(regs)
            .iter()
            .fold(0u64, |acc, w| (acc << 16) | u64::from(*w))
    }

    fn text(&self, regs: &[u16]) -> String {
        let bytes: Vec<u8> = regs
            .iter()
            .flat_map(|w| self.word(*w).to_be_bytes())
            .collect();
        let end = bytes
            .iter()
            .rposition(|b| *b != 0 && *b != b' ')
            .map_or(0, |p| p + 1);
        let start = bytes[..end].iter().position(|b| *b != 0).unwrap_or(end);
        String::from_utf8_lossy(&bytes[start..end]).into_owned()
    }
}

/// An f32 widened to the f64 with the same shortest decimal form, so `123.456f32` is
/// published as `123.456`, not `123.45600128173828`.
fn f32_to_f64_shortest(f: f32) -> f64 {
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    if write!(cursor, "{f}").is_err() {
        return f64::from(f);
    }
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    std::str::from_utf8(&buf[..len])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::from(f))
}

/// Rounds to 15 significant decimal digits (the precision an f64 always holds).
fn round_15(y: f64) -> f64 {
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    if write!(cursor, "{y:.14e}").is_err() {
        return y;
    }
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    std::str::from_utf8(&buf[..len])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(y)
}

/// Encodes a value's big-endian bytes as registers in `order`: the inverse of decoding,
/// used by tests, the benchmark and `probe`'s self-check.
pub fn encode_be_bytes(bytes: &[u8], order: ByteOrder) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            if order.swap_bytes() {
                w.swap_bytes()
            } else {
                w
            }
        })
        .collect();
    if order.reverse_words() {
        words.reverse();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(t: DataType, o: ByteOrder) -> Codec {
        Codec::new(t, o)
    }

    /// 123.456f32 is 0x42F6E979: `AB`=0x42F6, `CD`=0xE979.
    #[test]
    fn f32_123_456_in_all_four_orders() {
        let images = [
            (ByteOrder::ABCD, [0x42F6, 0xE979]),
            (ByteOrder::BADC, [0xF642, 0x79E9]),
            (ByteOrder::CDAB, [0xE979, 0x42F6]),
            (ByteOrder::DCBA, [0x79E9, 0xF642]),
        ];
        for (order, regs) in images {
            assert_eq!(
                codec(DataType::F32, order).decode_registers(&regs),
                Ok(Value::Float(123.456)),
                "{order:?}"
            );
            assert_eq!(encode_be_bytes(&123.456f32.to_be_bytes(), order), regs);
        }
    }

    #[test]
    fn every_type_and_order_round_trips() {
        type Case = (DataType, Vec<u8>, Value);
        let cases: Vec<Case> = vec![
            (
                DataType::U16,
                0xBEEFu16.to_be_bytes().to_vec(),
                Value::UInt(0xBEEF),
            ),
            (
                DataType::I16,
                (-1234i16).to_be_bytes().to_vec(),
                Value::Int(-1234),
            ),
            (
                DataType::U32,
                3_000_000_000u32.to_be_bytes().to_vec(),
                Value::UInt(3_000_000_000),
            ),
            (
                DataType::I32,
                (-123_456_789i32).to_be_bytes().to_vec(),
                Value::Int(-123_456_789),
            ),
            (
                DataType::U64,
                0x0123_4567_89AB_CDEFu64.to_be_bytes().to_vec(),
                Value::UInt(0x0123_4567_89AB_CDEF),
            ),
            (
                DataType::I64,
                (-9_876_543_210_123i64).to_be_bytes().to_vec(),
                Value::Int(-9_876_543_210_123),
            ),
            (
                DataType::F32,
                (-0.5f32).to_be_bytes().to_vec(),
                Value::Float(-0.5),
            ),
            (
                DataType::F64,
                std::f64::consts::PI.to_be_bytes().to_vec(),
                Value::Float(std::f64::consts::PI),
            ),
        ];
        for (t, bytes, want) in cases {
            for order in ByteOrder::ALL {
                let regs = encode_be_bytes(&bytes, order);
                assert_eq!(
                    codec(t, order).decode_registers(&regs),
                    Ok(want.clone()),
                    "{t:?} {order:?} {regs:04x?}"
                );
            }
        }
    }

    /// The 64-bit orders, spelled out: bytes 01..08, `CDAB` = low register first.
    #[test]
    fn u64_orders_against_literal_images() {
        let want = Value::UInt(0x0102_0304_0506_0708);
        let images = [
            (ByteOrder::ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
            (ByteOrder::BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
            (ByteOrder::CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
            (ByteOrder::DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, regs) in images {
            assert_eq!(
                codec(DataType::U64, order).decode_registers(&regs),
                Ok(want.clone())
            );
        }
    }

    #[test]
    fn strings_bits_and_bools() {
        let mut c = codec(DataType::String, ByteOrder::ABCD);
        c.string_registers = 4;
        let regs = [0x5344, 0x4D36, 0x3330, 0x0000]; // "SDM630\0\0"
        assert_eq!(c.decode_registers(&regs), Ok(Value::Text("SDM630".into())));
        c.order = ByteOrder::BADC;
        let swapped = [0x4453, 0x364D, 0x3033, 0x2020];
        assert_eq!(
            c.decode_registers(&swapped),
            Ok(Value::Text("SDM630".into()))
        );

        let mut b = codec(DataType::Bit, ByteOrder::ABCD);
        b.bit = 15;
        assert_eq!(b.decode_registers(&[0x8000]), Ok(Value::Bool(true)));
        b.bit = 0;
        assert_eq!(b.decode_registers(&[0x8000]), Ok(Value::Bool(false)));
        assert_eq!(
            codec(DataType::Bool, ByteOrder::ABCD).decode_registers(&[7]),
            Ok(Value::Bool(true))
        );
    }

    #[test]
    fn scale_and_offset_give_clean_floats() {
        let mut c = codec(DataType::U16, ByteOrder::ABCD);
        c.scale = 0.1;
        assert_eq!(c.decode_registers(&[2301]), Ok(Value::Float(230.1)));
        c.scale = 0.01;
        c.offset = -40.0;
        assert_eq!(c.decode_registers(&[6512]), Ok(Value::Float(25.12)));
        let mut i = codec(DataType::I16, ByteOrder::ABCD);
        i.scale = 1.0;
        assert_eq!(i.decode_registers(&[0xFFFF]), Ok(Value::Int(-1)));
    }

    #[test]
    fn short_input_and_nan_are_errors_not_values() {
        assert_eq!(
            codec(DataType::F64, ByteOrder::ABCD).decode_registers(&[1, 2]),
            Err(DecodeError::Short { need: 4, got: 2 })
        );
        assert_eq!(
            codec(DataType::F32, ByteOrder::ABCD).decode_registers(&[0x7FC0, 0]),
            Err(DecodeError::NotFinite)
        );
        assert_eq!(
            codec(DataType::F32, ByteOrder::ABCD).decode_registers(&[0x7F80, 0]),
            Err(DecodeError::NotFinite)
        );
    }

    #[test]
    fn modicon_numbers_are_one_based() {
        assert_eq!(RegisterKind::Holding.modicon(0), "40001");
        assert_eq!(RegisterKind::Input.modicon(99), "30100");
        assert_eq!(RegisterKind::Coil.modicon(9), "00010");
        assert_eq!(RegisterKind::Holding.modicon(65535), "465536");
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(regs in proptest::collection::vec(proptest::num::u16::ANY, 0..6),
                                 t in 0usize..11, o in 0usize..4, bit in 0u8..16) {
            let types = [DataType::Bool, DataType::Bit, DataType::U16, DataType::I16, DataType::U32,
                DataType::I32, DataType::U64, DataType::I64, DataType::F32, DataType::F64, DataType::String];
            let mut c = codec(types[t], ByteOrder::ALL[o]);
            c.bit = bit;
            c.string_registers = 3;
            let _ = c.decode_registers(&regs);
        }
    }
}

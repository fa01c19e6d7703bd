//! The primitives of the MQTT wire format, below every packet codec: the error type,
//! variable byte integers, length-prefixed strings and binary data, and a bounds-checked
//! reader over one packet's body.
//!
//! A leaf of `mqtt/`: it imports nothing from its siblings. `codec.rs` (packets),
//! `properties.rs` (5.0 properties) and `topic.rs` (names and filters) build on it, so
//! the arrows point one way, as in rumqttc's `mqttbytes`.
//!
//! Invariants:
//! - Every [`Reader`] read checks what is left and fails with [`Error::Truncated`]
//!   instead of panicking; strings are checked for UTF-8 and U+0000.
//! - The `put_*` writers trust their input: callers check lengths first (`str_len`,
//!   `bin_len`), so nothing partial is ever appended.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::packet::ReasonCode;

/// Largest remaining length a four-byte variable byte integer can express.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Largest packet MQTT can express: a five-byte fixed header and the largest remaining
/// length.
pub const MAX_PACKET_SIZE: usize = MAX_REMAINING_LENGTH + 5;

/// Everything that can be wrong with bytes received from a peer or a packet to send.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum Error {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("remaining length has a fifth byte")]
    MalformedRemainingLength,
    #[error("variable byte integer has a fifth byte")]
    MalformedVarInt,
    #[error("unknown packet type {0}")]
    UnknownPacketType(u8),
    #[error("fixed header flags {flags:#06b} are invalid for packet type {packet_type}")]
    InvalidHeaderFlags { packet_type: u8, flags: u8 },
    #[error("QoS 3 is not a quality of service")]
    InvalidQoS,
    #[error("DUP is set on a QoS 0 PUBLISH")]
    DupWithQoS0,
    #[error("packet identifier 0 where a packet identifier is required")]
    ZeroPacketId,
    #[error("packet ends inside a field")]
    Truncated,
    #[error("{0} bytes follow the last field of the packet")]
    TrailingBytes(usize),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string contains U+0000")]
    NullCharacter,
    #[error("string of {0} bytes is longer than 65535")]
    StringTooLong(usize),
    #[error("binary data of {0} bytes is longer than 65535")]
    BinaryTooLong(usize),
    #[error("topic name is empty (and no topic alias is set)")]
    EmptyTopicName,
    #[error("topic name contains a wildcard")]
    WildcardInTopicName,
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(&'static str),
    #[error("SUBSCRIBE or UNSUBSCRIBE without topic filters")]
    NoTopicFilters,
    #[error("acknowledgement without reason codes")]
    NoReasonCodes,
    #[error("reserved bits set in subscription options {0:#04x}")]
    InvalidSubscriptionOptions(u8),
    #[error("no local is set on a shared subscription")]
    NoLocalOnSharedSubscription,
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    #[error("property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    #[error("property {property:#04x} is not allowed in {packet}")]
    PropertyNotAllowed { property: u8, packet: &'static str },
    #[error("property {0:#04x} has an invalid value")]
    InvalidPropertyValue(u8),
    #[error("protocol name is not \"MQTT\"")]
    InvalidProtocolName,
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("invalid CONNECT flags {0:#010b}")]
    InvalidConnectFlags(u8),
    #[error("password without a user name (MQTT 3.1.1)")]
    PasswordWithoutUsername,
    #[error("reserved bits set in CONNACK flags {0:#04x}")]
    InvalidConnAckFlags(u8),
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode { code: u8, packet: &'static str },
    #[error("{0} does not exist in MQTT 3.1.1")]
    NotInV311(&'static str),
}

impl Error {
    /// The MQTT 5.0 reason code to send in DISCONNECT (or CONNACK, for CONNECT errors)
    /// before closing the connection over this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Error::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            Error::InvalidProtocolName | Error::UnsupportedProtocolLevel(_) => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            Error::EmptyTopicName | Error::WildcardInTopicName => ReasonCode::TOPIC_NAME_INVALID,
            Error::InvalidTopicFilter(_) => ReasonCode::TOPIC_FILTER_INVALID,
            Error::DupWithQoS0
            | Error::DuplicateProperty(_)
            | Error::InvalidPropertyValue(_)
            | Error::NoTopicFilters
            | Error::NoReasonCodes
            | Error::NoLocalOnSharedSubscription
            | Error::PasswordWithoutUsername
            | Error::NotInV311(_) => ReasonCode::PROTOCOL_ERROR,
            Error::MalformedRemainingLength
            | Error::MalformedVarInt
            | Error::UnknownPacketType(_)
            | Error::InvalidHeaderFlags { .. }
            | Error::InvalidQoS
            | Error::ZeroPacketId
            | Error::Truncated
            | Error::TrailingBytes(_)
            | Error::InvalidUtf8
            | Error::NullCharacter
            | Error::StringTooLong(_)
            | Error::BinaryTooLong(_)
            | Error::InvalidSubscriptionOptions(_)
            | Error::UnknownProperty(_)
            | Error::PropertyNotAllowed { .. }
            | Error::InvalidConnectFlags(_)
            | Error::InvalidConnAckFlags(_)
            | Error::InvalidReasonCode { .. } => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// A cursor over the body of one packet; every read checks what is left.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    /// A reader over one packet's body.
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes left to read.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Error> {
        if self.buf.is_empty() {
            return Err(Error::Truncated);
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Error> {
        if self.buf.len() < 2 {
            return Err(Error::Truncated);
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        if self.buf.len() < 4 {
            return Err(Error::Truncated);
        }
        Ok(self.buf.get_u32())
    }

    pub(crate) fn pkid(&mut self) -> Result<u16, Error> {
        match self.u16()? {
            0 => Err(Error::ZeroPacketId),
            pkid => Ok(pkid),
        }
    }

    pub(crate) fn varint(&mut self) -> Result<u32, Error> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Error::MalformedVarInt)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, Error> {
        if self.buf.len() < n {
            return Err(Error::Truncated);
        }
        Ok(self.buf.split_to(n))
    }

    /// A reader over the next `n` bytes, which this reader skips.
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader, Error> {
        Ok(Reader { buf: self.take(n)? })
    }

    pub(crate) fn binary(&mut self) -> Result<Bytes, Error> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }

    /// Borrows a length-prefixed string's bytes, checked for UTF-8 and U+0000.
    fn str_bytes(&mut self) -> Result<&str, Error> {
        let n = usize::from(self.u16()?);
        let Some(bytes) = self.buf.get(..n) else {
            return Err(Error::Truncated);
        };
        let s = std::str::from_utf8(bytes).map_err(|_| Error::InvalidUtf8)?;
        if bytes.contains(&0) {
            return Err(Error::NullCharacter);
        }
        Ok(s)
    }

    pub(crate) fn string(&mut self) -> Result<String, Error> {
        let s = self.str_bytes()?.to_owned();
        self.buf.advance(s.len());
        Ok(s)
    }

    /// A length-prefixed string whose raw bytes pass `check` first (a topic name:
    /// wildcards and U+0000 refused before UTF-8 is checked), borrowed until then, so
    /// the hot path copies it once and touches no reference count.
    pub(crate) fn checked_string(
        &mut self,
        check: impl FnOnce(&[u8]) -> Result<(), Error>,
    ) -> Result<String, Error> {
        let n = usize::from(self.u16()?);
        let Some(bytes) = self.buf.get(..n) else {
            return Err(Error::Truncated);
        };
        check(bytes)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| Error::InvalidUtf8)?
            .to_owned();
        self.buf.advance(n);
        Ok(s)
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(&self) -> Result<(), Error> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(Error::TrailingBytes(n)),
        }
    }
}

/// Encoded length of a string field (length prefix included), checked for size and
/// U+0000.
pub(crate) fn str_len(s: &str) -> Result<usize, Error> {
    if s.len() > usize::from(u16::MAX) {
        return Err(Error::StringTooLong(s.len()));
    }
    if s.as_bytes().contains(&0) {
        return Err(Error::NullCharacter);
    }
    Ok(2 + s.len())
}

/// Encoded length of a binary field (length prefix included), checked for size.
pub(crate) fn bin_len(b: &[u8]) -> Result<usize, Error> {
    if b.len() > usize::from(u16::MAX) {
        return Err(Error::BinaryTooLong(b.len()));
    }
    Ok(2 + b.len())
}

/// Bytes a variable byte integer takes.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends a variable byte integer; `value` is at most [`MAX_REMAINING_LENGTH`].
pub(crate) fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut b = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if value == 0 {
            return;
        }
    }
}

pub(crate) fn put_str(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

pub(crate) fn put_binary(out: &mut BytesMut, b: &[u8]) {
    // Lengths were checked against u16::MAX before anything was written.
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

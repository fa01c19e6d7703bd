//! Encoding and decoding of MQTT 3.1.1 and 5.0 control packets.
//!
//! Invariants:
//! - [`check`] reads only the fixed header and rejects a packet larger than the maximum
//!   (fixed header included, as MQTT 5.0 counts it) before its body is buffered.
//! - [`decode`] returns `Ok(None)` and consumes nothing until the whole packet is in the
//!   buffer; then it takes exactly that packet off the front. PUBLISH payloads,
//!   correlation and authentication data, will payloads and passwords are zero-copy
//!   slices of the receive buffer; the only per-packet allocations are the strings.
//!   Such a slice keeps the whole receive chunk alive, so whatever is held for long
//!   (retained messages, offline queues) should be copied out with
//!   `Bytes::copy_from_slice`.
//! - Nothing in the body is trusted: every length is checked against what is left,
//!   every field is validated as the spec requires, and trailing bytes are an error.
//!   No input makes the decoder panic.
//! - 3.1.1 packets never touch property code; 5.0-only fields are ignored when encoding
//!   3.1.1 and left at their defaults when decoding it.
//! - [`encode`] validates before it writes (string lengths, U+0000, topic names and
//!   filters, packet identifiers, property placement and values, reason codes), so it
//!   never appends a partial packet and never produces bytes [`decode`] rejects.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::packet::*;
use super::properties::{self, Place};
use super::topic;
use super::wire::{bin_len, put_binary, put_str, put_varint, str_len, varint_len, Reader};
pub use super::wire::{Error, MAX_PACKET_SIZE, MAX_REMAINING_LENGTH};

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// The fixed header of a packet: type and flags byte, remaining length, header length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub byte1: u8,
    pub remaining_len: usize,
    pub header_len: usize,
}

impl FixedHeader {
    /// The control packet type (high nibble of the first byte).
    pub fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    /// The flags (low nibble of the first byte).
    pub fn flags(&self) -> u8 {
        self.byte1 & 0x0F
    }

    /// Fixed header plus body: the number of bytes the packet occupies.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Reads only the fixed header. `Ok(None)` when it is incomplete; an error when the
/// announced packet is larger than `max_packet_size` (checked before buffering).
///
/// # Errors
/// [`Error::MalformedRemainingLength`] or [`Error::PacketTooLarge`].
pub fn check(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, Error> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining_len = 0usize;
    for (i, &b) in buf[1..].iter().take(4).enumerate() {
        remaining_len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let header = FixedHeader {
                byte1,
                remaining_len,
                header_len: i + 2,
            };
            let size = header.packet_len();
            if size > max_packet_size {
                return Err(Error::PacketTooLarge {
                    size,
                    max: max_packet_size,
                });
            }
            return Ok(Some(header));
        }
    }
    if buf.len() >= 5 {
        return Err(Error::MalformedRemainingLength);
    }
    Ok(None)
}

/// Decodes one packet from the front of `buf`. CONNECT carries its own protocol level;
/// every other packet is decoded as `version`.
///
/// # Errors
/// Any malformation, as a typed [`Error`]; the connection should then be closed (see
/// [`Error::reason_code`]). After an error the buffer's contents are unspecified.
pub fn decode(
    buf: &mut BytesMut,
    version: Protocol,
    max_packet_size: usize,
) -> Result<Option<Packet>, Error> {
    let Some(header) = check(buf, max_packet_size)? else {
        return Ok(None);
    };
    let len = header.packet_len();
    if buf.len() < len {
        // Safe to reserve: `check` bounded the size by the maximum packet size.
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(len);
    frame.advance(header.header_len);
    let mut r = Reader::new(frame.freeze());
    if header.packet_type() == PUBLISH {
        return decode_publish(header.flags(), r, version);
    }
    let packet = decode_body(header.byte1, &mut r, version)?;
    r.finish()?;
    Ok(Some(packet))
}

fn decode_body(byte1: u8, r: &mut Reader, version: Protocol) -> Result<Packet, Error> {
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0F;
    let required_flags = match packet_type {
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if packet_type == 0 || (packet_type == AUTH && version == Protocol::V311) {
        return Err(Error::UnknownPacketType(packet_type));
    }
    if flags != required_flags {
        return Err(Error::InvalidHeaderFlags { packet_type, flags });
    }
    let v5 = version == Protocol::V5;
    Ok(match packet_type {
        CONNECT => Packet::Connect(decode_connect(r)?),
        CONNACK => Packet::ConnAck(decode_connack(r, v5)?),
        PUBACK => Packet::PubAck(decode_ack(r, v5, &PUBACK_CTX)?),
        PUBREC => Packet::PubRec(decode_ack(r, v5, &PUBREC_CTX)?),
        PUBREL => Packet::PubRel(decode_ack(r, v5, &PUBREL_CTX)?),
        PUBCOMP => Packet::PubComp(decode_ack(r, v5, &PUBCOMP_CTX)?),
        SUBSCRIBE => Packet::Subscribe(decode_subscribe(r, v5)?),
        SUBACK => Packet::SubAck(decode_suback(r, v5)?),
        UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(r, v5)?),
        UNSUBACK => Packet::UnsubAck(decode_unsuback(r, v5)?),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => {
            let (reason, properties) = decode_reason_tail(r, v5, &DISCONNECT_CTX)?;
            Packet::Disconnect(Disconnect { reason, properties })
        }
        _ => {
            let (reason, properties) = decode_reason_tail(r, v5, &AUTH_CTX)?;
            Packet::Auth(Auth { reason, properties })
        }
    })
}

fn decode_connect(r: &mut Reader) -> Result<Connect, Error> {
    let name_len = usize::from(r.u16()?);
    if r.take(name_len)? != "MQTT".as_bytes() {
        return Err(Error::InvalidProtocolName);
    }
    let protocol = match r.u8()? {
        4 => Protocol::V311,
        5 => Protocol::V5,
        level => return Err(Error::UnsupportedProtocolLevel(level)),
    };
    let v5 = protocol == Protocol::V5;
    let flags = r.u8()?;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if flags & 0x01 != 0 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(Error::InvalidConnectFlags(flags));
    }
    if !v5 && has_password && !has_username {
        return Err(Error::PasswordWithoutUsername);
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        properties::decode(r, Place::CONNECT)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let qos = QoS::from_u8(will_qos).ok_or(Error::InvalidQoS)?;
        let properties = if v5 {
            properties::decode(r, Place::WILL)?
        } else {
            Properties::default()
        };
        let topic = r.string()?;
        topic::validate_topic_name(&topic)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(r: &mut Reader, v5: bool) -> Result<ConnAck, Error> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(Error::InvalidConnAckFlags(flags));
    }
    let raw = r.u8()?;
    let (code, properties) = if v5 {
        let code = ReasonCode(raw);
        check_reason(code, &CONNACK_CTX)?;
        (code, properties::decode(r, Place::CONNACK)?)
    } else {
        let code = match raw {
            0 => ReasonCode::SUCCESS,
            1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            3 => ReasonCode::SERVER_UNAVAILABLE,
            4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            5 => ReasonCode::NOT_AUTHORIZED,
            code => {
                return Err(Error::InvalidReasonCode {
                    code,
                    packet: "CONNACK",
                })
            }
        };
        (code, Properties::default())
    };
    Ok(ConnAck {
        session_present: flags & 0x01 != 0,
        code,
        properties,
    })
}

/// 3.1.1 CONNACK return code for a 5.0 reason code.
fn connack_return_code(code: ReasonCode) -> Result<u8, Error> {
    Ok(match code {
        ReasonCode::SUCCESS => 0,
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => 1,
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => 2,
        ReasonCode::SERVER_UNAVAILABLE => 3,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD | ReasonCode::BAD_AUTHENTICATION_METHOD => 4,
        ReasonCode::NOT_AUTHORIZED | ReasonCode::BANNED => 5,
        code if code.is_success() => {
            return Err(Error::InvalidReasonCode {
                code: code.0,
                packet: "CONNACK",
            })
        }
        // Every other refusal is a condition on the server's side.
        _ => 3,
    })
}

/// The hot path. A `Packet` is large (the property struct), so the result is built in
/// the return slot rather than moved through layers of `Result`s; the 3.1.1 branch
/// never touches property code. The payload is the rest of the frame, so nothing can
/// trail it.
/// A PUBLISH topic name; may be empty here (5.0 topic alias), checked by the caller.
fn topic_name(r: &mut Reader) -> Result<String, Error> {
    r.checked_string(topic::check_name_bytes)
}

fn decode_publish(flags: u8, mut r: Reader, version: Protocol) -> Result<Option<Packet>, Error> {
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(Error::InvalidQoS)?;
    let dup = flags & 0x08 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(Error::DupWithQoS0);
    }
    let retain = flags & 0x01 != 0;
    let topic = topic_name(&mut r)?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { r.pkid()? };
    if version == Protocol::V311 {
        if topic.is_empty() {
            return Err(Error::EmptyTopicName);
        }
        return Ok(Some(Packet::Publish(Publish {
            dup,
            qos,
            retain,
            topic,
            pkid,
            payload: r.rest(),
            properties: Properties::default(),
        })));
    }
    let mut publish = Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        payload: Bytes::new(),
        properties: Properties::default(),
    };
    properties::decode_into(&mut r, Place::PUBLISH, &mut publish.properties)?;
    if publish.topic.is_empty() && publish.properties.topic_alias.is_none() {
        return Err(Error::EmptyTopicName);
    }
    publish.payload = r.rest();
    Ok(Some(Packet::Publish(publish)))
}

/// Reason codes a packet may carry, and the name and property place that go with it.
struct Ctx {
    name: &'static str,
    place: Place,
    reasons: &'static [u8],
}

static CONNACK_CTX: Ctx = Ctx {
    name: "CONNACK",
    place: Place::CONNACK,
    reasons: &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
        0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    ],
};
const PUB_REASONS: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const REL_REASONS: &[u8] = &[0x00, 0x92];
static PUBACK_CTX: Ctx = Ctx {
    name: "PUBACK",
    place: Place::PUBACK,
    reasons: PUB_REASONS,
};
static PUBREC_CTX: Ctx = Ctx {
    name: "PUBREC",
    place: Place::PUBREC,
    reasons: PUB_REASONS,
};
static PUBREL_CTX: Ctx = Ctx {
    name: "PUBREL",
    place: Place::PUBREL,
    reasons: REL_REASONS,
};
static PUBCOMP_CTX: Ctx = Ctx {
    name: "PUBCOMP",
    place: Place::PUBCOMP,
    reasons: REL_REASONS,
};
static SUBACK_CTX: Ctx = Ctx {
    name: "SUBACK",
    place: Place::SUBACK,
    reasons: &[
        0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
    ],
};
static UNSUBACK_CTX: Ctx = Ctx {
    name: "UNSUBACK",
    place: Place::UNSUBACK,
    reasons: &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91],
};
static DISCONNECT_CTX: Ctx = Ctx {
    name: "DISCONNECT",
    place: Place::DISCONNECT,
    reasons: &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
        0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ],
};
static AUTH_CTX: Ctx = Ctx {
    name: "AUTH",
    place: Place::AUTH,
    reasons: &[0x00, 0x18, 0x19],
};

fn check_reason(code: ReasonCode, ctx: &Ctx) -> Result<(), Error> {
    if ctx.reasons.contains(&code.0) {
        Ok(())
    } else {
        Err(Error::InvalidReasonCode {
            code: code.0,
            packet: ctx.name,
        })
    }
}

fn decode_ack(r: &mut Reader, v5: bool, ctx: &Ctx) -> Result<Ack, Error> {
    let pkid = r.pkid()?;
    let (reason, properties) = decode_reason_tail(r, v5, ctx)?;
    Ok(Ack {
        pkid,
        reason,
        properties,
    })
}

/// The optional "reason code, then properties" tail of 5.0 PUBACK, PUBREC, PUBREL,
/// PUBCOMP, DISCONNECT and AUTH: absent means success with no properties.
fn decode_reason_tail(
    r: &mut Reader,
    v5: bool,
    ctx: &Ctx,
) -> Result<(ReasonCode, Properties), Error> {
    if !v5 || r.is_empty() {
        return Ok((ReasonCode::SUCCESS, Properties::default()));
    }
    let reason = ReasonCode(r.u8()?);
    check_reason(reason, ctx)?;
    let properties = if r.is_empty() {
        Properties::default()
    } else {
        properties::decode(r, ctx.place)?
    };
    Ok((reason, properties))
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, Error> {
    let pkid = r.pkid()?;
    let properties = if v5 {
        properties::decode(r, Place::SUBSCRIBE)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        topic::validate_topic_filter(&filter)?;
        let byte = r.u8()?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if byte & reserved != 0 {
            return Err(Error::InvalidSubscriptionOptions(byte));
        }
        let qos = QoS::from_u8(byte & 0x03).ok_or(Error::InvalidQoS)?;
        let retain_handling = match (byte >> 4) & 0x03 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(Error::InvalidSubscriptionOptions(byte)),
        };
        let options = SubscriptionOptions {
            qos,
            no_local: byte & 0x04 != 0,
            retain_as_published: byte & 0x08 != 0,
            retain_handling,
        };
        if options.no_local && topic::parse_shared(&filter).is_some() {
            return Err(Error::NoLocalOnSharedSubscription);
        }
        filters.push(Subscription { filter, options });
    }
    if filters.is_empty() {
        return Err(Error::NoTopicFilters);
    }
    Ok(Subscribe {
        pkid,
        filters,
        properties,
    })
}

fn decode_suback(r: &mut Reader, v5: bool) -> Result<SubAck, Error> {
    let pkid = r.pkid()?;
    let properties = if v5 {
        properties::decode(r, Place::SUBACK)?
    } else {
        Properties::default()
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let code = ReasonCode(r.u8()?);
        if v5 {
            check_reason(code, &SUBACK_CTX)?;
        } else if !matches!(code.0, 0 | 1 | 2 | 0x80) {
            return Err(Error::InvalidReasonCode {
                code: code.0,
                packet: "SUBACK",
            });
        }
        reasons.push(code);
    }
    if reasons.is_empty() {
        return Err(Error::NoReasonCodes);
    }
    Ok(SubAck {
        pkid,
        reasons,
        properties,
    })
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, Error> {
    let pkid = r.pkid()?;
    let properties = if v5 {
        properties::decode(r, Place::UNSUBSCRIBE)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        topic::validate_topic_filter(&filter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(Error::NoTopicFilters);
    }
    Ok(Unsubscribe {
        pkid,
        filters,
        properties,
    })
}

fn decode_unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, Error> {
    let pkid = r.pkid()?;
    if !v5 {
        return Ok(UnsubAck {
            pkid,
            ..UnsubAck::default()
        });
    }
    let properties = properties::decode(r, Place::UNSUBACK)?;
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let code = ReasonCode(r.u8()?);
        check_reason(code, &UNSUBACK_CTX)?;
        reasons.push(code);
    }
    if reasons.is_empty() {
        return Err(Error::NoReasonCodes);
    }
    Ok(UnsubAck {
        pkid,
        reasons,
        properties,
    })
}

/// Appends the encoding of `packet` as `version` to `out`.
///
/// CONNECT is encoded as its own `protocol`. Nothing is appended when an error is
/// returned.
///
/// # Errors
/// A string or binary field longer than 65535 bytes, U+0000 in a string, an invalid
/// topic name or filter, a missing packet identifier, a property not allowed in the
/// packet, a reason code the packet cannot carry, AUTH in 3.1.1, or a packet larger than
/// [`MAX_REMAINING_LENGTH`].
pub fn encode(packet: &Packet, version: Protocol, out: &mut BytesMut) -> Result<(), Error> {
    let v5 = version == Protocol::V5;
    match packet {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(c) => encode_connack(c, v5, out),
        Packet::Publish(p) => encode_publish(p, v5, p.pkid, p.dup, out).map(|_| ()),
        Packet::PubAck(a) => encode_ack(PUBACK << 4, a, v5, &PUBACK_CTX, out),
        Packet::PubRec(a) => encode_ack(PUBREC << 4, a, v5, &PUBREC_CTX, out),
        Packet::PubRel(a) => encode_ack(PUBREL << 4 | 0b0010, a, v5, &PUBREL_CTX, out),
        Packet::PubComp(a) => encode_ack(PUBCOMP << 4, a, v5, &PUBCOMP_CTX, out),
        Packet::Subscribe(s) => encode_subscribe(s, v5, out),
        Packet::SubAck(s) => encode_suback(s, v5, out),
        Packet::Unsubscribe(u) => encode_unsubscribe(u, v5, out),
        Packet::UnsubAck(u) => encode_unsuback(u, v5, out),
        Packet::PingReq => {
            out.put_slice(&[PINGREQ << 4, 0]);
            Ok(())
        }
        Packet::PingResp => {
            out.put_slice(&[PINGRESP << 4, 0]);
            Ok(())
        }
        Packet::Disconnect(d) => encode_reason_tail(
            DISCONNECT << 4,
            d.reason,
            &d.properties,
            v5,
            &DISCONNECT_CTX,
            out,
        ),
        Packet::Auth(a) => {
            if !v5 {
                return Err(Error::NotInV311("AUTH"));
            }
            encode_reason_tail(AUTH << 4, a.reason, &a.properties, v5, &AUTH_CTX, out)
        }
    }
}

/// Length of a property block including its length prefix; 0 for 3.1.1.
fn props_len(p: &Properties, place: Place, v5: bool) -> Result<(usize, usize), Error> {
    if !v5 {
        return Ok((0, 0));
    }
    let len = properties::validate(p, place)?;
    Ok((len, varint_len(len) + len))
}

/// Checks the remaining length, reserves room and writes the fixed header.
fn put_header(out: &mut BytesMut, byte1: u8, remaining: usize) -> Result<(), Error> {
    if remaining > MAX_REMAINING_LENGTH {
        return Err(Error::PacketTooLarge {
            size: remaining,
            max: MAX_REMAINING_LENGTH,
        });
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(byte1);
    put_varint(out, remaining);
    Ok(())
}

fn check_pkid(pkid: u16) -> Result<(), Error> {
    if pkid == 0 {
        Err(Error::ZeroPacketId)
    } else {
        Ok(())
    }
}

fn encode_connect(c: &Connect, out: &mut BytesMut) -> Result<(), Error> {
    let v5 = c.protocol == Protocol::V5;
    let (props, props_total) = props_len(&c.properties, Place::CONNECT, v5)?;
    let mut len = 6 + 1 + 1 + 2 + props_total + str_len(&c.client_id)?;
    let mut flags = u8::from(c.clean_start) << 1;
    let mut will_props = (0, 0);
    if let Some(w) = &c.will {
        topic::validate_topic_name(&w.topic)?;
        will_props = props_len(&w.properties, Place::WILL, v5)?;
        len += will_props.1 + str_len(&w.topic)? + bin_len(&w.payload)?;
        flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    if let Some(u) = &c.username {
        len += str_len(u)?;
        flags |= 0x80;
    }
    if let Some(p) = &c.password {
        if !v5 && c.username.is_none() {
            return Err(Error::PasswordWithoutUsername);
        }
        len += bin_len(p)?;
        flags |= 0x40;
    }
    put_header(out, CONNECT << 4, len)?;
    put_str(out, "MQTT");
    out.put_u8(c.protocol.level());
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if v5 {
        properties::write(&c.properties, props, out);
    }
    put_str(out, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            properties::write(&w.properties, will_props.0, out);
        }
        put_str(out, &w.topic);
        put_binary(out, &w.payload);
    }
    if let Some(u) = &c.username {
        put_str(out, u);
    }
    if let Some(p) = &c.password {
        put_binary(out, p);
    }
    Ok(())
}

fn encode_connack(c: &ConnAck, v5: bool, out: &mut BytesMut) -> Result<(), Error> {
    let code = if v5 {
        check_reason(c.code, &CONNACK_CTX)?;
        c.code.0
    } else {
        connack_return_code(c.code)?
    };
    let (props, props_total) = props_len(&c.properties, Place::CONNACK, v5)?;
    put_header(out, CONNACK << 4, 2 + props_total)?;
    out.put_u8(u8::from(c.session_present));
    out.put_u8(code);
    if v5 {
        properties::write(&c.properties, props, out);
    }
    Ok(())
}

/// The property block's length and the remaining length of a PUBLISH.
fn publish_remaining(p: &Publish, v5: bool) -> Result<(usize, usize), Error> {
    let (props, props_total) = props_len(&p.properties, Place::PUBLISH, v5)?;
    let pkid_len = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    Ok((
        props,
        2 + p.topic.len() + pkid_len + props_total + p.payload.len(),
    ))
}

/// Bytes `publish` takes on the wire as `version`, fixed header included (what a
/// maximum packet size limits).
///
/// # Errors
/// A property that is not allowed in PUBLISH, or has an invalid value.
pub fn publish_size(publish: &Publish, version: Protocol) -> Result<usize, Error> {
    let (_, remaining) = publish_remaining(publish, version == Protocol::V5)?;
    Ok(1 + varint_len(remaining) + remaining)
}

/// Writes a PUBLISH with `pkid` and `dup` in place of the packet's own; returns the
/// offset of the packet identifier from the start of the packet (0 for QoS 0).
fn encode_publish(
    p: &Publish,
    v5: bool,
    pkid: u16,
    dup: bool,
    out: &mut BytesMut,
) -> Result<usize, Error> {
    if p.topic.is_empty() {
        if !v5 || p.properties.topic_alias.is_none() {
            return Err(Error::EmptyTopicName);
        }
    } else {
        topic::validate_topic_name(&p.topic)?;
    }
    if p.qos != QoS::AtMostOnce {
        check_pkid(pkid)?;
    } else if dup {
        return Err(Error::DupWithQoS0);
    }
    let (props, len) = publish_remaining(p, v5)?;
    let pkid_len = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    let byte1 = PUBLISH << 4 | u8::from(dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain);
    let start = out.len();
    put_header(out, byte1, len)?;
    put_str(out, &p.topic);
    let pkid_offset = if pkid_len == 0 {
        0
    } else {
        let offset = out.len() - start;
        out.put_u16(pkid);
        offset
    };
    if v5 {
        properties::write(&p.properties, props, out);
    }
    out.put_slice(&p.payload);
    Ok(pkid_offset)
}

fn encode_ack(byte1: u8, a: &Ack, v5: bool, ctx: &Ctx, out: &mut BytesMut) -> Result<(), Error> {
    check_pkid(a.pkid)?;
    if !v5 {
        put_header(out, byte1, 2)?;
        out.put_u16(a.pkid);
        return Ok(());
    }
    check_reason(a.reason, ctx)?;
    let (props, props_total) = props_len(&a.properties, ctx.place, v5)?;
    if props == 0 && a.reason == ReasonCode::SUCCESS {
        put_header(out, byte1, 2)?;
        out.put_u16(a.pkid);
    } else if props == 0 {
        put_header(out, byte1, 3)?;
        out.put_u16(a.pkid);
        out.put_u8(a.reason.0);
    } else {
        put_header(out, byte1, 3 + props_total)?;
        out.put_u16(a.pkid);
        out.put_u8(a.reason.0);
        properties::write(&a.properties, props, out);
    }
    Ok(())
}

/// DISCONNECT and AUTH: empty in 3.1.1; in 5.0 empty for success without properties,
/// otherwise reason code and property length. The spec also allows a lone reason code,
/// but some clients (rumqttc 0.24) cannot read that form, and it saves one byte.
fn encode_reason_tail(
    byte1: u8,
    reason: ReasonCode,
    p: &Properties,
    v5: bool,
    ctx: &Ctx,
    out: &mut BytesMut,
) -> Result<(), Error> {
    if !v5 {
        return put_header(out, byte1, 0);
    }
    check_reason(reason, ctx)?;
    let (props, props_total) = props_len(p, ctx.place, v5)?;
    if props == 0 && reason == ReasonCode::SUCCESS {
        return put_header(out, byte1, 0);
    }
    put_header(out, byte1, 1 + props_total)?;
    out.put_u8(reason.0);
    properties::write(p, props, out);
    Ok(())
}

fn encode_subscribe(s: &Subscribe, v5: bool, out: &mut BytesMut) -> Result<(), Error> {
    check_pkid(s.pkid)?;
    if s.filters.is_empty() {
        return Err(Error::NoTopicFilters);
    }
    let (props, props_total) = props_len(&s.properties, Place::SUBSCRIBE, v5)?;
    let mut len = 2 + props_total;
    for sub in &s.filters {
        topic::validate_topic_filter(&sub.filter)?;
        if v5 && sub.options.no_local && topic::parse_shared(&sub.filter).is_some() {
            return Err(Error::NoLocalOnSharedSubscription);
        }
        len += str_len(&sub.filter)? + 1;
    }
    put_header(out, SUBSCRIBE << 4 | 0b0010, len)?;
    out.put_u16(s.pkid);
    if v5 {
        properties::write(&s.properties, props, out);
    }
    for sub in &s.filters {
        put_str(out, &sub.filter);
        let o = sub.options;
        let byte = if v5 {
            let rh = match o.retain_handling {
                RetainHandling::SendAtSubscribe => 0,
                RetainHandling::SendIfNew => 1,
                RetainHandling::DoNotSend => 2,
            };
            o.qos as u8 | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | rh << 4
        } else {
            o.qos as u8
        };
        out.put_u8(byte);
    }
    Ok(())
}

fn encode_suback(s: &SubAck, v5: bool, out: &mut BytesMut) -> Result<(), Error> {
    check_pkid(s.pkid)?;
    if s.reasons.is_empty() {
        return Err(Error::NoReasonCodes);
    }
    for &code in &s.reasons {
        if v5 {
            check_reason(code, &SUBACK_CTX)?;
        } else if code.0 > 2 && code.is_success() {
            return Err(Error::InvalidReasonCode {
                code: code.0,
                packet: "SUBACK",
            });
        }
    }
    let (props, props_total) = props_len(&s.properties, Place::SUBACK, v5)?;
    put_header(out, SUBACK << 4, 2 + props_total + s.reasons.len())?;
    out.put_u16(s.pkid);
    if v5 {
        properties::write(&s.properties, props, out);
    }
    for &code in &s.reasons {
        // 3.1.1 has a single failure return code.
        out.put_u8(if v5 || code.is_success() {
            code.0
        } else {
            0x80
        });
    }
    Ok(())
}

fn encode_unsubscribe(u: &Unsubscribe, v5: bool, out: &mut BytesMut) -> Result<(), Error> {
    check_pkid(u.pkid)?;
    if u.filters.is_empty() {
        return Err(Error::NoTopicFilters);
    }
    let (props, props_total) = props_len(&u.properties, Place::UNSUBSCRIBE, v5)?;
    let mut len = 2 + props_total;
    for filter in &u.filters {
        topic::validate_topic_filter(filter)?;
        len += str_len(filter)?;
    }
    put_header(out, UNSUBSCRIBE << 4 | 0b0010, len)?;
    out.put_u16(u.pkid);
    if v5 {
        properties::write(&u.properties, props, out);
    }
    for filter in &u.filters {
        put_str(out, filter);
    }
    Ok(())
}

fn encode_unsuback(u: &UnsubAck, v5: bool, out: &mut BytesMut) -> Result<(), Error> {
    check_pkid(u.pkid)?;
    if !v5 {
        put_header(out, UNSUBACK << 4, 2)?;
        out.put_u16(u.pkid);
        return Ok(());
    }
    if u.reasons.is_empty() {
        return Err(Error::NoReasonCodes);
    }
    for &code in &u.reasons {
        check_reason(code, &UNSUBACK_CTX)?;
    }
    let (props, props_total) = props_len(&u.properties, Place::UNSUBACK, v5)?;
    put_header(out, UNSUBACK << 4, 2 + props_total + u.reasons.len())?;
    out.put_u16(u.pkid);
    properties::write(&u.properties, props, out);
    for &code in &u.reasons {
        out.put_u8(code.0);
    }
    Ok(())
}

/// A PUBLISH encoded once and shared among subscribers (cloning shares the bytes).
///
/// Only the packet identifier and the DUP and RETAIN flags differ per subscriber;
/// [`EncodedPublish::write`] patches them into the copy it appends. A subscriber that
/// needs a different QoS, topic alias or subscription identifier needs its own encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPublish {
    bytes: Bytes,
    /// Offset of the packet identifier in `bytes`; 0 for QoS 0.
    pkid_offset: usize,
}

impl EncodedPublish {
    /// Encodes `publish` as `version`; its own `pkid` and `dup` are ignored.
    ///
    /// # Errors
    /// As [`encode`] for a PUBLISH.
    pub fn new(publish: &Publish, version: Protocol) -> Result<EncodedPublish, Error> {
        let mut out = BytesMut::new();
        let pkid_offset = encode_publish(publish, version == Protocol::V5, 1, false, &mut out)?;
        Ok(EncodedPublish {
            bytes: out.freeze(),
            pkid_offset,
        })
    }

    /// Appends the packet with packet identifier `pkid` (ignored for QoS 0, where it
    /// must be non-zero otherwise) and the DUP flag (never set for QoS 0).
    pub fn write(&self, pkid: u16, dup: bool, out: &mut BytesMut) {
        self.write_with_retain(pkid, dup, self.retain(), out);
    }

    /// As [`EncodedPublish::write`], with the RETAIN flag replaced (a retained message
    /// delivered on a live subscription without retain-as-published goes out with
    /// RETAIN cleared).
    pub fn write_with_retain(&self, pkid: u16, dup: bool, retain: bool, out: &mut BytesMut) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        if self.pkid_offset == 0 {
            out[start] = (out[start] & !0x01) | u8::from(retain);
            return;
        }
        debug_assert_ne!(pkid, 0, "QoS 1 and 2 PUBLISH need a packet identifier");
        out[start] = (out[start] & !0x09) | u8::from(dup) << 3 | u8::from(retain);
        out[start + self.pkid_offset..start + self.pkid_offset + 2]
            .copy_from_slice(&pkid.to_be_bytes());
    }

    /// Bytes one [`EncodedPublish::write`] appends.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a PUBLISH has at least a fixed header and a topic length.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The QoS the packet was encoded with.
    pub fn qos(&self) -> QoS {
        QoS::from_u8((self.bytes[0] >> 1) & 0x03).unwrap_or_default()
    }

    /// The RETAIN flag the packet was encoded with.
    pub fn retain(&self) -> bool {
        self.bytes[0] & 0x01 != 0
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;

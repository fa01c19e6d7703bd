//! MQTT 5.0 properties: which may appear where, how often, and their wire form.
//!
//! Invariants:
//! - Each packet kind has a [`Place`] with a bitmask of the property identifiers it
//!   allows; decoding rejects an identifier outside it, and encoding refuses to write a
//!   set field outside it, so the encoder never produces what the decoder rejects.
//! - A property appears at most once, except user properties (anywhere) and subscription
//!   identifiers (PUBLISH only).
//! - Values the spec forbids (a receive maximum of 0, a maximum QoS of 2, a byte flag
//!   other than 0 or 1, ...) are rejected in both directions.
//! - Properties are encoded in ascending identifier order; user properties keep their
//!   order.
//! - Nothing here is ever called for a 3.1.1 packet.

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::Properties;
use super::wire::{put_binary, put_str, put_varint, varint_len, Error, Reader};

const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;
const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
const WILL_DELAY_INTERVAL: u8 = 0x18;
const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDENTIFIERS_AVAILABLE: u8 = 0x29;
const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// Largest value of a variable byte integer (and of a subscription identifier).
const MAX_VARINT: u32 = 268_435_455;

const fn mask(ids: &[u8]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1 << ids[i];
        i += 1;
    }
    m
}

/// Where a property block sits: the packet (or the will) and what it allows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    pub(crate) name: &'static str,
    allowed: u64,
    /// Identifiers that may repeat here.
    repeatable: u64,
}

const ACK_PROPS: u64 = mask(&[REASON_STRING, USER_PROPERTY]);
const USER_ONLY: u64 = mask(&[USER_PROPERTY]);

impl Place {
    const fn new(name: &'static str, allowed: u64) -> Place {
        Place {
            name,
            allowed,
            repeatable: USER_ONLY,
        }
    }

    pub(crate) const CONNECT: Place = Place::new(
        "CONNECT",
        mask(&[
            SESSION_EXPIRY_INTERVAL,
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            REQUEST_PROBLEM_INFORMATION,
            REQUEST_RESPONSE_INFORMATION,
            RECEIVE_MAXIMUM,
            TOPIC_ALIAS_MAXIMUM,
            USER_PROPERTY,
            MAXIMUM_PACKET_SIZE,
        ]),
    );
    pub(crate) const WILL: Place = Place::new(
        "will properties",
        mask(&[
            PAYLOAD_FORMAT_INDICATOR,
            MESSAGE_EXPIRY_INTERVAL,
            CONTENT_TYPE,
            RESPONSE_TOPIC,
            CORRELATION_DATA,
            WILL_DELAY_INTERVAL,
            USER_PROPERTY,
        ]),
    );
    pub(crate) const CONNACK: Place = Place::new(
        "CONNACK",
        mask(&[
            SESSION_EXPIRY_INTERVAL,
            ASSIGNED_CLIENT_IDENTIFIER,
            SERVER_KEEP_ALIVE,
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            RESPONSE_INFORMATION,
            SERVER_REFERENCE,
            REASON_STRING,
            RECEIVE_MAXIMUM,
            TOPIC_ALIAS_MAXIMUM,
            MAXIMUM_QOS,
            RETAIN_AVAILABLE,
            USER_PROPERTY,
            MAXIMUM_PACKET_SIZE,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            SUBSCRIPTION_IDENTIFIERS_AVAILABLE,
            SHARED_SUBSCRIPTION_AVAILABLE,
        ]),
    );
    pub(crate) const PUBLISH: Place = Place {
        name: "PUBLISH",
        allowed: mask(&[
            PAYLOAD_FORMAT_INDICATOR,
            MESSAGE_EXPIRY_INTERVAL,
            CONTENT_TYPE,
            RESPONSE_TOPIC,
            CORRELATION_DATA,
            SUBSCRIPTION_IDENTIFIER,
            TOPIC_ALIAS,
            USER_PROPERTY,
        ]),
        repeatable: mask(&[USER_PROPERTY, SUBSCRIPTION_IDENTIFIER]),
    };
    pub(crate) const PUBACK: Place = Place::new("PUBACK", ACK_PROPS);
    pub(crate) const PUBREC: Place = Place::new("PUBREC", ACK_PROPS);
    pub(crate) const PUBREL: Place = Place::new("PUBREL", ACK_PROPS);
    pub(crate) const PUBCOMP: Place = Place::new("PUBCOMP", ACK_PROPS);
    pub(crate) const SUBSCRIBE: Place =
        Place::new("SUBSCRIBE", mask(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]));
    pub(crate) const SUBACK: Place = Place::new("SUBACK", ACK_PROPS);
    pub(crate) const UNSUBSCRIBE: Place = Place::new("UNSUBSCRIBE", USER_ONLY);
    pub(crate) const UNSUBACK: Place = Place::new("UNSUBACK", ACK_PROPS);
    pub(crate) const DISCONNECT: Place = Place::new(
        "DISCONNECT",
        mask(&[
            SESSION_EXPIRY_INTERVAL,
            SERVER_REFERENCE,
            REASON_STRING,
            USER_PROPERTY,
        ]),
    );
    pub(crate) const AUTH: Place = Place::new(
        "AUTH",
        mask(&[
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            REASON_STRING,
            USER_PROPERTY,
        ]),
    );
}

/// Reads a property length and the properties that follow, as allowed at `place`.
pub(crate) fn decode(r: &mut Reader, place: Place) -> Result<Properties, Error> {
    let mut props = Properties::default();
    decode_into(r, place, &mut props)?;
    Ok(props)
}

/// As [`decode`], into a default `props` that already sits where it belongs (the
/// struct is large; PUBLISH avoids moving it).
pub(crate) fn decode_into(
    r: &mut Reader,
    place: Place,
    props: &mut Properties,
) -> Result<(), Error> {
    let len = r.varint()? as usize;
    if len == 0 {
        return Ok(());
    }
    let mut r = r.sub(len)?;
    let mut seen = 0u64;
    while !r.is_empty() {
        let id = r.varint()?;
        let id = u8::try_from(id)
            .ok()
            .filter(|&id| id <= SHARED_SUBSCRIPTION_AVAILABLE && KNOWN & (1 << id) != 0)
            .ok_or(Error::UnknownProperty(id))?;
        let bit = 1u64 << id;
        if place.allowed & bit == 0 {
            return Err(Error::PropertyNotAllowed {
                property: id,
                packet: place.name,
            });
        }
        if seen & bit != 0 && place.repeatable & bit == 0 {
            return Err(Error::DuplicateProperty(id));
        }
        seen |= bit;
        read_one(&mut r, id, props)?;
    }
    check_values(props)
}

const KNOWN: u64 = mask(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    SUBSCRIPTION_IDENTIFIER,
    SESSION_EXPIRY_INTERVAL,
    ASSIGNED_CLIENT_IDENTIFIER,
    SERVER_KEEP_ALIVE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REQUEST_PROBLEM_INFORMATION,
    WILL_DELAY_INTERVAL,
    REQUEST_RESPONSE_INFORMATION,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    TOPIC_ALIAS,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIERS_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
]);

fn read_bool(r: &mut Reader, id: u8) -> Result<bool, Error> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::InvalidPropertyValue(id)),
    }
}

fn read_one(r: &mut Reader, id: u8, p: &mut Properties) -> Result<(), Error> {
    match id {
        PAYLOAD_FORMAT_INDICATOR => p.payload_format_indicator = Some(r.u8()?),
        MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
        CONTENT_TYPE => p.content_type = Some(r.string()?),
        RESPONSE_TOPIC => p.response_topic = Some(r.string()?),
        CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
        SUBSCRIPTION_IDENTIFIER => p.subscription_identifiers.push(r.varint()?),
        SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
        ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
        SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
        AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
        AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
        REQUEST_PROBLEM_INFORMATION => p.request_problem_information = Some(r.u8()?),
        WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
        REQUEST_RESPONSE_INFORMATION => p.request_response_information = Some(r.u8()?),
        RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
        SERVER_REFERENCE => p.server_reference = Some(r.string()?),
        REASON_STRING => p.reason_string = Some(r.string()?),
        RECEIVE_MAXIMUM => p.receive_maximum = Some(r.u16()?),
        TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
        TOPIC_ALIAS => p.topic_alias = Some(r.u16()?),
        MAXIMUM_QOS => p.maximum_qos = Some(r.u8()?),
        RETAIN_AVAILABLE => p.retain_available = Some(read_bool(r, id)?),
        USER_PROPERTY => {
            let key = r.string()?;
            let value = r.string()?;
            p.user_properties.push((key, value));
        }
        MAXIMUM_PACKET_SIZE => p.maximum_packet_size = Some(r.u32()?),
        WILDCARD_SUBSCRIPTION_AVAILABLE => {
            p.wildcard_subscription_available = Some(read_bool(r, id)?)
        }
        SUBSCRIPTION_IDENTIFIERS_AVAILABLE => {
            p.subscription_identifiers_available = Some(read_bool(r, id)?)
        }
        SHARED_SUBSCRIPTION_AVAILABLE => p.shared_subscription_available = Some(read_bool(r, id)?),
        _ => return Err(Error::UnknownProperty(u32::from(id))),
    }
    Ok(())
}

/// Value rules of the spec, shared by decoding and encoding.
fn check_values(p: &Properties) -> Result<(), Error> {
    let flag = |v: Option<u8>| v.is_some_and(|v| v > 1);
    if flag(p.payload_format_indicator) {
        return Err(Error::InvalidPropertyValue(PAYLOAD_FORMAT_INDICATOR));
    }
    if flag(p.request_problem_information) {
        return Err(Error::InvalidPropertyValue(REQUEST_PROBLEM_INFORMATION));
    }
    if flag(p.request_response_information) {
        return Err(Error::InvalidPropertyValue(REQUEST_RESPONSE_INFORMATION));
    }
    if flag(p.maximum_qos) {
        return Err(Error::InvalidPropertyValue(MAXIMUM_QOS));
    }
    if p.receive_maximum == Some(0) {
        return Err(Error::InvalidPropertyValue(RECEIVE_MAXIMUM));
    }
    if p.maximum_packet_size == Some(0) {
        return Err(Error::InvalidPropertyValue(MAXIMUM_PACKET_SIZE));
    }
    if p.topic_alias == Some(0) {
        return Err(Error::InvalidPropertyValue(TOPIC_ALIAS));
    }
    if p.subscription_identifiers
        .iter()
        .any(|&id| id == 0 || id > MAX_VARINT)
    {
        return Err(Error::InvalidPropertyValue(SUBSCRIPTION_IDENTIFIER));
    }
    Ok(())
}

/// Checks that `p` may be written at `place` and returns the length of its properties
/// (without the length prefix).
pub(crate) fn validate(p: &Properties, place: Place) -> Result<usize, Error> {
    if p.is_empty() {
        return Ok(0);
    }
    check_values(p)?;
    let mut present = 0u64;
    let mut len = 0usize;
    let mut fixed = |id: u8, set: bool, size: usize| {
        if set {
            present |= 1 << id;
            len += 1 + size;
        }
    };
    fixed(
        PAYLOAD_FORMAT_INDICATOR,
        p.payload_format_indicator.is_some(),
        1,
    );
    fixed(
        MESSAGE_EXPIRY_INTERVAL,
        p.message_expiry_interval.is_some(),
        4,
    );
    fixed(
        SESSION_EXPIRY_INTERVAL,
        p.session_expiry_interval.is_some(),
        4,
    );
    fixed(SERVER_KEEP_ALIVE, p.server_keep_alive.is_some(), 2);
    fixed(
        REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information.is_some(),
        1,
    );
    fixed(WILL_DELAY_INTERVAL, p.will_delay_interval.is_some(), 4);
    fixed(
        REQUEST_RESPONSE_INFORMATION,
        p.request_response_information.is_some(),
        1,
    );
    fixed(RECEIVE_MAXIMUM, p.receive_maximum.is_some(), 2);
    fixed(TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum.is_some(), 2);
    fixed(TOPIC_ALIAS, p.topic_alias.is_some(), 2);
    fixed(MAXIMUM_QOS, p.maximum_qos.is_some(), 1);
    fixed(RETAIN_AVAILABLE, p.retain_available.is_some(), 1);
    fixed(MAXIMUM_PACKET_SIZE, p.maximum_packet_size.is_some(), 4);
    fixed(
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available.is_some(),
        1,
    );
    fixed(
        SUBSCRIPTION_IDENTIFIERS_AVAILABLE,
        p.subscription_identifiers_available.is_some(),
        1,
    );
    fixed(
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available.is_some(),
        1,
    );
    let strings = [
        (CONTENT_TYPE, &p.content_type),
        (RESPONSE_TOPIC, &p.response_topic),
        (ASSIGNED_CLIENT_IDENTIFIER, &p.assigned_client_identifier),
        (AUTHENTICATION_METHOD, &p.authentication_method),
        (RESPONSE_INFORMATION, &p.response_information),
        (SERVER_REFERENCE, &p.server_reference),
        (REASON_STRING, &p.reason_string),
    ];
    for (id, value) in strings {
        if let Some(s) = value {
            present |= 1 << id;
            len += 1 + string_len(s)?;
        }
    }
    for (id, value) in [
        (CORRELATION_DATA, &p.correlation_data),
        (AUTHENTICATION_DATA, &p.authentication_data),
    ] {
        if let Some(b) = value {
            present |= 1 << id;
            len += 1 + binary_len(b)?;
        }
    }
    if !p.subscription_identifiers.is_empty() {
        present |= 1 << SUBSCRIPTION_IDENTIFIER;
        if p.subscription_identifiers.len() > 1
            && place.repeatable & (1 << SUBSCRIPTION_IDENTIFIER) == 0
        {
            return Err(Error::DuplicateProperty(SUBSCRIPTION_IDENTIFIER));
        }
        for &id in &p.subscription_identifiers {
            len += 1 + varint_len(id as usize);
        }
    }
    if !p.user_properties.is_empty() {
        present |= 1 << USER_PROPERTY;
        for (key, value) in &p.user_properties {
            len += 1 + string_len(key)? + string_len(value)?;
        }
    }
    let outside = present & !place.allowed;
    if outside != 0 {
        return Err(Error::PropertyNotAllowed {
            property: outside.trailing_zeros() as u8,
            packet: place.name,
        });
    }
    Ok(len)
}

fn string_len(s: &str) -> Result<usize, Error> {
    if s.len() > usize::from(u16::MAX) {
        return Err(Error::StringTooLong(s.len()));
    }
    if s.as_bytes().contains(&0) {
        return Err(Error::NullCharacter);
    }
    Ok(2 + s.len())
}

fn binary_len(b: &Bytes) -> Result<usize, Error> {
    if b.len() > usize::from(u16::MAX) {
        return Err(Error::BinaryTooLong(b.len()));
    }
    Ok(2 + b.len())
}

/// Writes the length prefix and the properties; `len` comes from [`validate`].
pub(crate) fn write(p: &Properties, len: usize, out: &mut BytesMut) {
    put_varint(out, len);
    if len == 0 {
        return;
    }
    if let Some(v) = p.payload_format_indicator {
        out.put_u8(PAYLOAD_FORMAT_INDICATOR);
        out.put_u8(v);
    }
    if let Some(v) = p.message_expiry_interval {
        out.put_u8(MESSAGE_EXPIRY_INTERVAL);
        out.put_u32(v);
    }
    if let Some(v) = &p.content_type {
        out.put_u8(CONTENT_TYPE);
        put_str(out, v);
    }
    if let Some(v) = &p.response_topic {
        out.put_u8(RESPONSE_TOPIC);
        put_str(out, v);
    }
    if let Some(v) = &p.correlation_data {
        out.put_u8(CORRELATION_DATA);
        put_binary(out, v);
    }
    for &id in &p.subscription_identifiers {
        out.put_u8(SUBSCRIPTION_IDENTIFIER);
        put_varint(out, id as usize);
    }
    if let Some(v) = p.session_expiry_interval {
        out.put_u8(SESSION_EXPIRY_INTERVAL);
        out.put_u32(v);
    }
    if let Some(v) = &p.assigned_client_identifier {
        out.put_u8(ASSIGNED_CLIENT_IDENTIFIER);
        put_str(out, v);
    }
    if let Some(v) = p.server_keep_alive {
        out.put_u8(SERVER_KEEP_ALIVE);
        out.put_u16(v);
    }
    if let Some(v) = &p.authentication_method {
        out.put_u8(AUTHENTICATION_METHOD);
        put_str(out, v);
    }
    if let Some(v) = &p.authentication_data {
        out.put_u8(AUTHENTICATION_DATA);
        put_binary(out, v);
    }
    if let Some(v) = p.request_problem_information {
        out.put_u8(REQUEST_PROBLEM_INFORMATION);
        out.put_u8(v);
    }
    if let Some(v) = p.will_delay_interval {
        out.put_u8(WILL_DELAY_INTERVAL);
        out.put_u32(v);
    }
    if let Some(v) = p.request_response_information {
        out.put_u8(REQUEST_RESPONSE_INFORMATION);
        out.put_u8(v);
    }
    if let Some(v) = &p.response_information {
        out.put_u8(RESPONSE_INFORMATION);
        put_str(out, v);
    }
    if let Some(v) = &p.server_reference {
        out.put_u8(SERVER_REFERENCE);
        put_str(out, v);
    }
    if let Some(v) = &p.reason_string {
        out.put_u8(REASON_STRING);
        put_str(out, v);
    }
    if let Some(v) = p.receive_maximum {
        out.put_u8(RECEIVE_MAXIMUM);
        out.put_u16(v);
    }
    if let Some(v) = p.topic_alias_maximum {
        out.put_u8(TOPIC_ALIAS_MAXIMUM);
        out.put_u16(v);
    }
    if let Some(v) = p.topic_alias {
        out.put_u8(TOPIC_ALIAS);
        out.put_u16(v);
    }
    if let Some(v) = p.maximum_qos {
        out.put_u8(MAXIMUM_QOS);
        out.put_u8(v);
    }
    if let Some(v) = p.retain_available {
        out.put_u8(RETAIN_AVAILABLE);
        out.put_u8(u8::from(v));
    }
    for (key, value) in &p.user_properties {
        out.put_u8(USER_PROPERTY);
        put_str(out, key);
        put_str(out, value);
    }
    if let Some(v) = p.maximum_packet_size {
        out.put_u8(MAXIMUM_PACKET_SIZE);
        out.put_u32(v);
    }
    if let Some(v) = p.wildcard_subscription_available {
        out.put_u8(WILDCARD_SUBSCRIPTION_AVAILABLE);
        out.put_u8(u8::from(v));
    }
    if let Some(v) = p.subscription_identifiers_available {
        out.put_u8(SUBSCRIPTION_IDENTIFIERS_AVAILABLE);
        out.put_u8(u8::from(v));
    }
    if let Some(v) = p.shared_subscription_available {
        out.put_u8(SHARED_SUBSCRIPTION_AVAILABLE);
        out.put_u8(u8::from(v));
    }
}

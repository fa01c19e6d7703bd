//! Unit tests of the codec: one per validation rule, partial input, the 3.1.1 code
//! mappings and EncodedPublish. Byte vectors from independent implementations and the
//! property tests live in tests/mqtt_codec.rs.

use super::*;

const MAX: usize = 1 << 20;

fn dec(bytes: &[u8], version: Protocol) -> Result<Option<Packet>, Error> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, version, MAX)
}

fn dec3(bytes: &[u8]) -> Result<Option<Packet>, Error> {
    dec(bytes, Protocol::V311)
}

fn dec5(bytes: &[u8]) -> Result<Option<Packet>, Error> {
    dec(bytes, Protocol::V5)
}

fn enc(packet: &Packet, version: Protocol) -> Result<Vec<u8>, Error> {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out)?;
    Ok(out.to_vec())
}

fn round_trip(packet: Packet, version: Protocol) {
    let bytes = enc(&packet, version).expect("encodes");
    let mut buf = BytesMut::from(&bytes[..]);
    let decoded = decode(&mut buf, version, MAX).expect("decodes");
    assert_eq!(decoded, Some(packet));
    assert!(buf.is_empty());
}

fn publish(topic: &str, qos: QoS, pkid: u16) -> Publish {
    Publish {
        topic: topic.to_owned(),
        qos,
        pkid,
        payload: Bytes::from_static(b"hello"),
        ..Publish::default()
    }
}

#[test]
fn check_reads_only_the_fixed_header() {
    assert_eq!(check(&[], MAX), Ok(None));
    assert_eq!(check(&[0x30], MAX), Ok(None));
    assert_eq!(check(&[0x30, 0x80], MAX), Ok(None));
    assert_eq!(
        check(&[0x30, 0x80, 0x01], MAX),
        Ok(Some(FixedHeader {
            byte1: 0x30,
            remaining_len: 128,
            header_len: 3
        }))
    );
    assert_eq!(
        check(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], usize::MAX).map(|h| h.map(|h| h.remaining_len)),
        Ok(Some(MAX_REMAINING_LENGTH))
    );
}

#[test]
fn remaining_length_of_five_bytes_is_malformed() {
    assert_eq!(
        check(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], usize::MAX),
        Err(Error::MalformedRemainingLength)
    );
    assert_eq!(
        dec3(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]),
        Err(Error::MalformedRemainingLength)
    );
}

#[test]
fn too_large_is_refused_from_the_header_before_buffering() {
    // A peer announcing 200 MB: refused with only 5 bytes in hand.
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0xE8, 0x5F][..]);
    let capacity = buf.capacity();
    assert_eq!(
        decode(&mut buf, Protocol::V311, MAX),
        Err(Error::PacketTooLarge {
            size: 200_933_381,
            max: MAX
        })
    );
    assert_eq!(buf.capacity(), capacity);
    // The limit counts the fixed header: a 10-byte packet fits 10, not 9.
    let ten = [0x30, 0x08, 0x00, 0x01, b'a', 1, 2, 3, 4, 5];
    assert!(decode(&mut BytesMut::from(&ten[..]), Protocol::V311, 10).is_ok());
    assert_eq!(
        decode(&mut BytesMut::from(&ten[..]), Protocol::V311, 9),
        Err(Error::PacketTooLarge { size: 10, max: 9 })
    );
}

#[test]
fn partial_input_needs_more_and_consumes_nothing() {
    let mut full = BytesMut::new();
    let mut p = publish("a/b", QoS::AtLeastOnce, 7);
    p.properties.user_properties.push(("k".into(), "v".into()));
    encode(&Packet::Publish(p.clone()), Protocol::V5, &mut full).expect("encodes");
    encode(&Packet::PingReq, Protocol::V5, &mut full).expect("encodes");
    let first_len = full.len() - 2;
    for cut in 0..first_len {
        let mut buf = BytesMut::from(&full[..cut]);
        assert_eq!(decode(&mut buf, Protocol::V5, MAX), Ok(None), "cut {cut}");
        assert_eq!(buf.len(), cut);
    }
    let mut buf = full.clone();
    assert_eq!(
        decode(&mut buf, Protocol::V5, MAX),
        Ok(Some(Packet::Publish(p)))
    );
    assert_eq!(
        decode(&mut buf, Protocol::V5, MAX),
        Ok(Some(Packet::PingReq))
    );
    assert_eq!(decode(&mut buf, Protocol::V5, MAX), Ok(None));
}

#[test]
fn publish_payload_is_a_slice_of_the_receive_buffer() {
    let bytes = enc(
        &Packet::Publish(publish("t", QoS::AtMostOnce, 0)),
        Protocol::V311,
    )
    .expect("encodes");
    let mut buf = BytesMut::from(&bytes[..]);
    let start = buf.as_ptr() as usize;
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, Protocol::V311, MAX) else {
        panic!("not a publish");
    };
    assert_eq!(p.payload.as_ptr() as usize, start + bytes.len() - 5);
}

#[test]
fn unknown_packet_types() {
    assert_eq!(dec3(&[0x00, 0x00]), Err(Error::UnknownPacketType(0)));
    assert_eq!(dec3(&[0xF0, 0x00]), Err(Error::UnknownPacketType(15)));
    assert_eq!(dec5(&[0xF0, 0x00]), Ok(Some(Packet::Auth(Auth::default()))));
}

#[test]
fn reserved_header_flags_must_hold_their_values() {
    for (bytes, packet_type, flags) in [
        (&[0x60u8, 0x02, 0x00, 0x01][..], 6, 0),
        (&[0x82, 0x00], 8, 2),
        (&[0x80, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], 8, 0),
        (&[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], 10, 0),
        (&[0x41, 0x02, 0x00, 0x01], 4, 1),
        (&[0xC1, 0x00], 12, 1),
        (&[0xE8, 0x00], 14, 8),
    ] {
        let err = dec3(bytes).expect_err("invalid flags");
        if packet_type == 8 && flags == 2 {
            assert_eq!(err, Error::Truncated);
            continue;
        }
        assert_eq!(
            err,
            Error::InvalidHeaderFlags { packet_type, flags },
            "{bytes:02x?}"
        );
    }
    assert_eq!(
        dec3(&[0x62, 0x02, 0x00, 0x01]),
        Ok(Some(Packet::PubRel(Ack::new(1))))
    );
}

#[test]
fn qos_3_is_invalid_everywhere() {
    assert_eq!(
        dec3(&[0x36, 0x05, 0x00, 0x01, b'a', 0, 1]),
        Err(Error::InvalidQoS)
    );
    let will_qos3 = [
        0x10,
        0x11,
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0b0001_1100,
        0,
        60,
        0,
        0,
        0,
        1,
        b'w',
        0,
        0,
    ];
    assert_eq!(dec3(&will_qos3), Err(Error::InvalidQoS));
    let sub = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03];
    assert_eq!(dec3(&sub), Err(Error::InvalidQoS));
}

#[test]
fn dup_on_qos_0_is_refused() {
    assert_eq!(
        dec3(&[0x38, 0x03, 0x00, 0x01, b'a']),
        Err(Error::DupWithQoS0)
    );
    let mut p = publish("a", QoS::AtMostOnce, 0);
    p.dup = true;
    assert_eq!(
        enc(&Packet::Publish(p), Protocol::V311),
        Err(Error::DupWithQoS0)
    );
}

#[test]
fn packet_identifier_zero_is_refused() {
    assert_eq!(dec3(&[0x40, 0x02, 0x00, 0x00]), Err(Error::ZeroPacketId));
    assert_eq!(
        dec3(&[0x32, 0x05, 0x00, 0x01, b'a', 0, 0]),
        Err(Error::ZeroPacketId)
    );
    assert_eq!(
        dec3(&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00]),
        Err(Error::ZeroPacketId)
    );
    assert_eq!(
        enc(&Packet::PubAck(Ack::new(0)), Protocol::V5),
        Err(Error::ZeroPacketId)
    );
    assert_eq!(
        enc(
            &Packet::Publish(publish("a", QoS::ExactlyOnce, 0)),
            Protocol::V311
        ),
        Err(Error::ZeroPacketId)
    );
}

#[test]
fn fields_running_past_the_packet_are_truncated() {
    assert_eq!(dec3(&[0x30, 0x02, 0x00, 0x05]), Err(Error::Truncated));
    assert_eq!(dec3(&[0x40, 0x01, 0x00]), Err(Error::Truncated));
    assert_eq!(
        dec3(&[0x32, 0x04, 0x00, 0x01, b'a', 0x00]),
        Err(Error::Truncated)
    );
    // v5 property length larger than what is left.
    assert_eq!(
        dec5(&[0x30, 0x05, 0x00, 0x01, b'a', 0x09, 0x01]),
        Err(Error::Truncated)
    );
}

#[test]
fn bytes_after_the_last_field_are_refused() {
    assert_eq!(dec3(&[0xC0, 0x01, 0x00]), Err(Error::TrailingBytes(1)));
    assert_eq!(
        dec3(&[0x40, 0x03, 0x00, 0x01, 0x00]),
        Err(Error::TrailingBytes(1))
    );
    assert_eq!(dec3(&[0xE0, 0x01, 0x00]), Err(Error::TrailingBytes(1)));
    assert_eq!(
        dec3(&[0xB0, 0x03, 0x00, 0x01, 0x00]),
        Err(Error::TrailingBytes(1))
    );
}

#[test]
fn strings_must_be_utf8_without_nul() {
    assert_eq!(
        dec3(&[0x30, 0x03, 0x00, 0x01, 0xFF]),
        Err(Error::InvalidUtf8)
    );
    assert_eq!(
        dec3(&[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28]),
        Err(Error::InvalidUtf8)
    );
    assert_eq!(
        dec3(&[0x30, 0x04, 0x00, 0x02, b'a', 0]),
        Err(Error::NullCharacter)
    );
    let sub = [0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', 0, 0x00];
    assert_eq!(dec3(&sub), Err(Error::NullCharacter));
    // Non-ASCII UTF-8 is fine.
    assert!(matches!(
        dec3(&[0x30, 0x04, 0x00, 0x02, 0xC3, 0xA9]),
        Ok(Some(Packet::Publish(_)))
    ));
    let mut c = Connect {
        client_id: "a\0".into(),
        ..Connect::default()
    };
    assert_eq!(
        enc(&Packet::Connect(c.clone()), Protocol::V311),
        Err(Error::NullCharacter)
    );
    c.client_id = "x".repeat(65_536);
    assert_eq!(
        enc(&Packet::Connect(c.clone()), Protocol::V311),
        Err(Error::StringTooLong(65_536))
    );
    c.client_id = "x".repeat(65_535);
    assert!(enc(&Packet::Connect(c.clone()), Protocol::V311).is_ok());
    c.client_id.clear();
    c.username = Some("u".into());
    c.password = Some(Bytes::from(vec![0; 65_536]));
    assert_eq!(
        enc(&Packet::Connect(c), Protocol::V311),
        Err(Error::BinaryTooLong(65_536))
    );
}

#[test]
fn topic_names_in_publish_and_will() {
    assert_eq!(dec3(&[0x30, 0x02, 0x00, 0x00]), Err(Error::EmptyTopicName));
    assert_eq!(
        dec5(&[0x30, 0x03, 0x00, 0x00, 0x00]),
        Err(Error::EmptyTopicName)
    );
    // 5.0: an empty topic with a topic alias.
    let Ok(Some(Packet::Publish(p))) = dec5(&[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x07])
    else {
        panic!("aliased publish");
    };
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(7)));
    assert_eq!(
        dec3(&[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'+']),
        Err(Error::WildcardInTopicName)
    );
    assert_eq!(
        dec3(&[0x30, 0x03, 0x00, 0x01, b'#']),
        Err(Error::WildcardInTopicName)
    );
    let will = [
        0x10,
        0x12,
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0b0000_0100,
        0,
        60,
        0,
        0,
        0,
        1,
        b'#',
        0,
        1,
        b'x',
    ];
    assert_eq!(dec3(&will), Err(Error::WildcardInTopicName));
    assert_eq!(
        enc(
            &Packet::Publish(publish("a/#", QoS::AtMostOnce, 0)),
            Protocol::V5
        ),
        Err(Error::WildcardInTopicName)
    );
    assert_eq!(
        enc(
            &Packet::Publish(publish("", QoS::AtMostOnce, 0)),
            Protocol::V5
        ),
        Err(Error::EmptyTopicName)
    );
}

#[test]
fn topic_filters_are_validated() {
    let sub = [0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'#', b'/', b'a', 0x00];
    assert!(matches!(dec3(&sub), Err(Error::InvalidTopicFilter(_))));
    let unsub = [0xA2, 0x06, 0x00, 0x01, 0x00, 0x02, b'a', b'+'];
    assert!(matches!(dec3(&unsub), Err(Error::InvalidTopicFilter(_))));
    let bad = Subscribe {
        pkid: 1,
        filters: vec![Subscription {
            filter: "$share/g".into(),
            options: SubscriptionOptions::default(),
        }],
        properties: Properties::default(),
    };
    assert!(matches!(
        enc(&Packet::Subscribe(bad), Protocol::V5),
        Err(Error::InvalidTopicFilter(_))
    ));
}

#[test]
fn subscribe_and_unsubscribe_need_filters() {
    assert_eq!(dec3(&[0x82, 0x02, 0x00, 0x01]), Err(Error::NoTopicFilters));
    assert_eq!(
        dec5(&[0x82, 0x03, 0x00, 0x01, 0x00]),
        Err(Error::NoTopicFilters)
    );
    assert_eq!(dec3(&[0xA2, 0x02, 0x00, 0x01]), Err(Error::NoTopicFilters));
    let empty = Subscribe {
        pkid: 1,
        ..Subscribe::default()
    };
    assert_eq!(
        enc(&Packet::Subscribe(empty), Protocol::V311),
        Err(Error::NoTopicFilters)
    );
    let empty = Unsubscribe {
        pkid: 1,
        ..Unsubscribe::default()
    };
    assert_eq!(
        enc(&Packet::Unsubscribe(empty), Protocol::V5),
        Err(Error::NoTopicFilters)
    );
}

#[test]
fn acknowledgements_of_subscriptions_need_reason_codes() {
    assert_eq!(dec3(&[0x90, 0x02, 0x00, 0x01]), Err(Error::NoReasonCodes));
    assert_eq!(
        dec5(&[0xB0, 0x03, 0x00, 0x01, 0x00]),
        Err(Error::NoReasonCodes)
    );
    let empty = SubAck {
        pkid: 1,
        ..SubAck::default()
    };
    assert_eq!(
        enc(&Packet::SubAck(empty), Protocol::V5),
        Err(Error::NoReasonCodes)
    );
    // 3.1.1 UNSUBACK has no reason codes at all.
    let unsuback = UnsubAck {
        pkid: 1,
        ..UnsubAck::default()
    };
    round_trip(Packet::UnsubAck(unsuback), Protocol::V311);
}

#[test]
fn subscription_options_reserved_bits() {
    let v3 = |opt: u8| dec3(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', opt]);
    let v5 = |opt: u8| dec5(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', opt]);
    assert_eq!(v3(0x04), Err(Error::InvalidSubscriptionOptions(0x04)));
    assert_eq!(v3(0x80), Err(Error::InvalidSubscriptionOptions(0x80)));
    assert_eq!(v5(0x40), Err(Error::InvalidSubscriptionOptions(0x40)));
    assert_eq!(v5(0x30), Err(Error::InvalidSubscriptionOptions(0x30)));
    let Ok(Some(Packet::Subscribe(s))) = v5(0x2E) else {
        panic!("valid options");
    };
    assert_eq!(
        s.filters[0].options,
        SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::DoNotSend,
        }
    );
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut bytes = vec![0x82, 0x00, 0x00, 0x01, 0x00, 0x00, 0x0C];
    bytes.extend_from_slice(b"$share/g/a/b");
    bytes.push(0x04);
    bytes[1] = (bytes.len() - 2) as u8;
    assert_eq!(dec5(&bytes), Err(Error::NoLocalOnSharedSubscription));
    let last = bytes.len() - 1;
    bytes[last] = 0x01;
    assert!(matches!(dec5(&bytes), Ok(Some(Packet::Subscribe(_)))));
}

#[test]
fn properties_unknown_duplicate_misplaced_or_invalid() {
    // PUBLISH "a" QoS 0 with the given property bytes.
    let publish = |props: &[u8]| {
        let mut b = vec![0x30, 0x00, 0x00, 0x01, b'a', props.len() as u8];
        b.extend_from_slice(props);
        b[1] = (b.len() - 2) as u8;
        dec5(&b)
    };
    assert_eq!(publish(&[0x05, 0x00]), Err(Error::UnknownProperty(0x05)));
    assert_eq!(publish(&[0x80, 0x01]), Err(Error::UnknownProperty(0x80)));
    assert_eq!(
        publish(&[0x80, 0x80, 0x80, 0x80, 0x01]),
        Err(Error::MalformedVarInt)
    );
    assert_eq!(
        publish(&[0x23, 0x00, 0x01, 0x23, 0x00, 0x02]),
        Err(Error::DuplicateProperty(0x23))
    );
    assert_eq!(
        publish(&[0x11, 0x00, 0x00, 0x00, 0x01]),
        Err(Error::PropertyNotAllowed {
            property: 0x11,
            packet: "PUBLISH"
        })
    );
    assert_eq!(
        publish(&[0x23, 0x00, 0x00]),
        Err(Error::InvalidPropertyValue(0x23))
    );
    assert_eq!(
        publish(&[0x01, 0x02]),
        Err(Error::InvalidPropertyValue(0x01))
    );
    assert_eq!(
        publish(&[0x0B, 0x00]),
        Err(Error::InvalidPropertyValue(0x0B))
    );
    // Repeatable: user properties anywhere, subscription identifiers in PUBLISH.
    let Ok(Some(Packet::Publish(p))) = publish(&[
        0x0B, 0x01, 0x0B, 0x02, 0x26, 0x00, 0x01, b'k', 0x00, 0x00, 0x26, 0x00, 0x01, b'k', 0x00,
        0x01, b'v',
    ]) else {
        panic!("valid properties");
    };
    assert_eq!(p.properties.subscription_identifiers, vec![1, 2]);
    assert_eq!(
        p.properties.user_properties,
        vec![("k".into(), "".into()), ("k".into(), "v".into())]
    );
    // But only one subscription identifier in SUBSCRIBE.
    let sub = [
        0x82, 0x0B, 0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00,
    ];
    assert_eq!(dec5(&sub), Err(Error::DuplicateProperty(0x0B)));
    // CONNACK boolean properties are 0 or 1.
    assert_eq!(
        dec5(&[0x20, 0x05, 0x00, 0x00, 0x02, 0x25, 0x02]),
        Err(Error::InvalidPropertyValue(0x25))
    );
    assert_eq!(
        dec5(&[0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x00]),
        Err(Error::InvalidPropertyValue(0x21))
    );
    // The encoder refuses the same things.
    let mut p = publish_with_props();
    p.properties.session_expiry_interval = Some(5);
    assert_eq!(
        enc(&Packet::Publish(p), Protocol::V5),
        Err(Error::PropertyNotAllowed {
            property: 0x11,
            packet: "PUBLISH"
        })
    );
    let mut p = publish_with_props();
    p.properties.topic_alias = Some(0);
    assert_eq!(
        enc(&Packet::Publish(p), Protocol::V5),
        Err(Error::InvalidPropertyValue(0x23))
    );
    let sub = Subscribe {
        pkid: 1,
        filters: vec![Subscription {
            filter: "a".into(),
            options: SubscriptionOptions::default(),
        }],
        properties: Properties {
            subscription_identifiers: vec![1, 2],
            ..Properties::default()
        },
    };
    assert_eq!(
        enc(&Packet::Subscribe(sub), Protocol::V5),
        Err(Error::DuplicateProperty(0x0B))
    );
}

fn publish_with_props() -> Publish {
    let mut p = publish("a/b", QoS::AtLeastOnce, 1);
    p.properties.content_type = Some("text/plain".into());
    p
}

#[test]
fn v311_ignores_properties_entirely() {
    // A 5.0-looking property byte in a 3.1.1 PUBLISH is payload.
    let Ok(Some(Packet::Publish(p))) = dec3(&[0x30, 0x05, 0x00, 0x01, b'a', 0x02, 0x23]) else {
        panic!("publish");
    };
    assert_eq!(&p.payload[..], &[0x02, 0x23]);
    assert!(p.properties.is_empty());
    // And encoding 3.1.1 drops them.
    let bytes = enc(&Packet::Publish(publish_with_props()), Protocol::V311).expect("encodes");
    assert_eq!(bytes, b"\x32\x0c\x00\x03a/b\x00\x01hello");
}

fn connect_bytes(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
    let mut b = vec![0x10, 0x00, 0x00, name.len() as u8];
    b.extend_from_slice(name);
    b.extend_from_slice(&[level, flags, 0x00, 0x3C]);
    if level == 5 {
        b.push(0x00);
    }
    b.extend_from_slice(&[0x00, 0x01, b'c']);
    b[1] = (b.len() - 2) as u8;
    b
}

#[test]
fn connect_protocol_name_level_and_flags() {
    assert_eq!(
        dec3(&connect_bytes(b"MQIsdp", 3, 0x02)),
        Err(Error::InvalidProtocolName)
    );
    assert_eq!(
        dec3(&connect_bytes(b"MQTT", 6, 0x02)),
        Err(Error::UnsupportedProtocolLevel(6))
    );
    assert_eq!(
        dec3(&connect_bytes(b"MQTT", 3, 0x02)),
        Err(Error::UnsupportedProtocolLevel(3))
    );
    assert_eq!(
        dec3(&connect_bytes(b"MQTT", 4, 0x03)),
        Err(Error::InvalidConnectFlags(0x03))
    );
    assert_eq!(
        dec3(&connect_bytes(b"MQTT", 4, 0x22)),
        Err(Error::InvalidConnectFlags(0x22))
    );
    assert_eq!(
        dec3(&connect_bytes(b"MQTT", 4, 0x0A)),
        Err(Error::InvalidConnectFlags(0x0A))
    );
    assert_eq!(
        dec3(&connect_bytes(b"MQTT", 4, 0x42)),
        Err(Error::PasswordWithoutUsername)
    );
    // 5.0 allows a password without a user name; here it is missing, so truncated.
    assert_eq!(
        dec5(&connect_bytes(b"MQTT", 5, 0x42)),
        Err(Error::Truncated)
    );
    // CONNECT ignores the version it is decoded with.
    let Ok(Some(Packet::Connect(c))) = dec3(&connect_bytes(b"MQTT", 5, 0x02)) else {
        panic!("connect");
    };
    assert_eq!(
        (c.protocol, c.clean_start, c.keep_alive),
        (Protocol::V5, true, 60)
    );
    let c = Connect {
        password: Some(Bytes::from_static(b"p")),
        ..Connect::default()
    };
    assert_eq!(
        enc(&Packet::Connect(c.clone()), Protocol::V5),
        Err(Error::PasswordWithoutUsername)
    );
    round_trip(
        Packet::Connect(Connect {
            protocol: Protocol::V5,
            ..c
        }),
        Protocol::V311,
    );
}

#[test]
fn connack_flags_and_codes() {
    assert_eq!(
        dec3(&[0x20, 0x02, 0x02, 0x00]),
        Err(Error::InvalidConnAckFlags(0x02))
    );
    assert_eq!(
        dec3(&[0x20, 0x02, 0x00, 0x06]),
        Err(Error::InvalidReasonCode {
            code: 6,
            packet: "CONNACK"
        })
    );
    assert_eq!(
        dec5(&[0x20, 0x03, 0x00, 0x01, 0x00]),
        Err(Error::InvalidReasonCode {
            code: 1,
            packet: "CONNACK"
        })
    );
    let v3_codes = [
        (ReasonCode::SUCCESS, 0),
        (ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, 1),
        (ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 2),
        (ReasonCode::SERVER_UNAVAILABLE, 3),
        (ReasonCode::BAD_USER_NAME_OR_PASSWORD, 4),
        (ReasonCode::NOT_AUTHORIZED, 5),
    ];
    for (code, rc) in v3_codes {
        let ack = ConnAck {
            code,
            ..ConnAck::default()
        };
        assert_eq!(
            enc(&Packet::ConnAck(ack.clone()), Protocol::V311),
            Ok(vec![0x20, 0x02, 0x00, rc])
        );
        round_trip(Packet::ConnAck(ack), Protocol::V311);
    }
    for (code, rc) in [
        (ReasonCode::BANNED, 5),
        (ReasonCode::BAD_AUTHENTICATION_METHOD, 4),
        (ReasonCode::SERVER_BUSY, 3),
        (ReasonCode::QUOTA_EXCEEDED, 3),
        (ReasonCode::MALFORMED_PACKET, 3),
    ] {
        let ack = ConnAck {
            code,
            ..ConnAck::default()
        };
        assert_eq!(
            enc(&Packet::ConnAck(ack), Protocol::V311),
            Ok(vec![0x20, 0x02, 0x00, rc])
        );
    }
    let not_connack = ConnAck {
        code: ReasonCode::GRANTED_QOS_1,
        ..ConnAck::default()
    };
    assert_eq!(
        enc(&Packet::ConnAck(not_connack), Protocol::V311),
        Err(Error::InvalidReasonCode {
            code: 1,
            packet: "CONNACK"
        })
    );
}

#[test]
fn reason_codes_must_belong_to_their_packet() {
    assert_eq!(
        dec5(&[0x40, 0x03, 0x00, 0x01, 0x05]),
        Err(Error::InvalidReasonCode {
            code: 5,
            packet: "PUBACK"
        })
    );
    assert_eq!(
        dec5(&[0x62, 0x03, 0x00, 0x01, 0x10]),
        Err(Error::InvalidReasonCode {
            code: 0x10,
            packet: "PUBREL"
        })
    );
    assert_eq!(
        dec3(&[0x90, 0x03, 0x00, 0x01, 0x03]),
        Err(Error::InvalidReasonCode {
            code: 3,
            packet: "SUBACK"
        })
    );
    assert_eq!(
        dec5(&[0xE0, 0x01, 0x01]),
        Err(Error::InvalidReasonCode {
            code: 1,
            packet: "DISCONNECT"
        })
    );
    let auth = Auth {
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    };
    assert_eq!(
        enc(&Packet::Auth(auth), Protocol::V311),
        Err(Error::NotInV311("AUTH"))
    );
}

#[test]
fn suback_failures_map_to_0x80_in_v311() {
    let ack = SubAck {
        pkid: 9,
        reasons: vec![
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::UNSPECIFIED_ERROR,
            ReasonCode::GRANTED_QOS_0,
        ],
        properties: Properties::default(),
    };
    let bytes = enc(&Packet::SubAck(ack), Protocol::V311).expect("encodes");
    assert_eq!(bytes, vec![0x90, 0x06, 0x00, 0x09, 0x02, 0x80, 0x80, 0x00]);
    let Ok(Some(Packet::SubAck(back))) = dec3(&bytes) else {
        panic!("suback");
    };
    assert_eq!(back.reasons[1], ReasonCode::UNSPECIFIED_ERROR);
}

#[test]
fn v5_acks_use_the_shortest_form() {
    assert_eq!(
        enc(&Packet::PubAck(Ack::new(1)), Protocol::V5),
        Ok(vec![0x40, 2, 0, 1])
    );
    let ack = Ack {
        pkid: 1,
        reason: ReasonCode::NO_MATCHING_SUBSCRIBERS,
        properties: Properties::default(),
    };
    assert_eq!(
        enc(&Packet::PubRec(ack.clone()), Protocol::V5),
        Ok(vec![0x50, 3, 0, 1, 0x10])
    );
    round_trip(Packet::PubRec(ack), Protocol::V5);
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::default()), Protocol::V5),
        Ok(vec![0xE0, 0])
    );
    // A reason code with an empty property block is also accepted.
    assert_eq!(
        dec5(&[0x40, 0x04, 0x00, 0x01, 0x00, 0x00]),
        Ok(Some(Packet::PubAck(Ack::new(1))))
    );
    let d = Disconnect {
        reason: ReasonCode::SESSION_TAKEN_OVER,
        properties: Properties {
            reason_string: Some("bye".into()),
            ..Properties::default()
        },
    };
    assert_eq!(
        enc(&Packet::Disconnect(d.clone()), Protocol::V5),
        Ok(vec![
            0xE0, 0x08, 0x8E, 0x06, 0x1F, 0x00, 0x03, b'b', b'y', b'e'
        ])
    );
    round_trip(Packet::Disconnect(d.clone()), Protocol::V5);
    // DISCONNECT with a reason always carries the property length (rumqttc 0.24 cannot
    // read the lone reason code), but the lone form is accepted.
    let taken_over = Disconnect {
        reason: ReasonCode::SESSION_TAKEN_OVER,
        properties: Properties::default(),
    };
    assert_eq!(
        enc(&Packet::Disconnect(taken_over.clone()), Protocol::V5),
        Ok(vec![0xE0, 0x02, 0x8E, 0x00])
    );
    assert_eq!(
        dec5(&[0xE0, 0x01, 0x8E]),
        Ok(Some(Packet::Disconnect(taken_over)))
    );
    // 3.1.1 DISCONNECT carries nothing.
    assert_eq!(
        enc(&Packet::Disconnect(d), Protocol::V311),
        Ok(vec![0xE0, 0])
    );
}

#[test]
fn encoding_refuses_a_packet_beyond_the_remaining_length_limit() {
    // Zeroed allocation: untouched pages are never faulted in, and the encoder fails
    // before it copies the payload.
    let mut p = publish("a", QoS::AtMostOnce, 0);
    p.payload = Bytes::from(vec![0u8; MAX_REMAINING_LENGTH]);
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&Packet::Publish(p), Protocol::V311, &mut out),
        Err(Error::PacketTooLarge {
            size: MAX_REMAINING_LENGTH + 3,
            max: MAX_REMAINING_LENGTH
        })
    );
    assert!(out.is_empty());
}

#[test]
fn reason_codes_to_disconnect_with() {
    assert_eq!(Error::Truncated.reason_code(), ReasonCode::MALFORMED_PACKET);
    assert_eq!(
        Error::InvalidQoS.reason_code(),
        ReasonCode::MALFORMED_PACKET
    );
    assert_eq!(
        Error::PacketTooLarge { size: 2, max: 1 }.reason_code(),
        ReasonCode::PACKET_TOO_LARGE
    );
    assert_eq!(
        Error::DuplicateProperty(0x23).reason_code(),
        ReasonCode::PROTOCOL_ERROR
    );
    assert_eq!(
        Error::UnsupportedProtocolLevel(3).reason_code(),
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
    );
    assert_eq!(
        Error::WildcardInTopicName.reason_code(),
        ReasonCode::TOPIC_NAME_INVALID
    );
    assert_eq!(
        Error::InvalidTopicFilter("x").reason_code(),
        ReasonCode::TOPIC_FILTER_INVALID
    );
}

#[test]
fn encoded_publish_patches_packet_id_dup_and_retain() {
    let mut p = publish("a/b", QoS::AtLeastOnce, 0);
    p.retain = true;
    p.properties.message_expiry_interval = Some(30);
    for version in [Protocol::V311, Protocol::V5] {
        let shared = EncodedPublish::new(&p, version).expect("encodes");
        assert_eq!(shared.qos(), QoS::AtLeastOnce);
        assert!(shared.retain());
        let mut out = BytesMut::new();
        shared.write(0x1234, true, &mut out);
        assert_eq!(out.len(), shared.len());
        shared.write_with_retain(7, false, false, &mut out);
        let expected = |pkid, dup, retain| {
            let mut q = p.clone();
            (q.pkid, q.dup, q.retain) = (pkid, dup, retain);
            if version == Protocol::V311 {
                q.properties = Properties::default();
            }
            Some(Packet::Publish(q))
        };
        assert_eq!(
            decode(&mut out, version, MAX),
            Ok(expected(0x1234, true, true))
        );
        assert_eq!(
            decode(&mut out, version, MAX),
            Ok(expected(7, false, false))
        );
    }
    let q0 = EncodedPublish::new(&publish("t", QoS::AtMostOnce, 0), Protocol::V5).expect("encodes");
    let mut out = BytesMut::new();
    q0.write(99, true, &mut out);
    assert_eq!(&out[..], b"\x30\x09\x00\x01t\x00hello");
    assert_eq!(
        EncodedPublish::new(&publish("a/+", QoS::AtMostOnce, 0), Protocol::V5),
        Err(Error::WildcardInTopicName)
    );
}

#[test]
fn every_packet_round_trips_in_both_versions() {
    let props = Properties {
        user_properties: vec![("k".into(), "v".into())],
        reason_string: Some("why".into()),
        ..Properties::default()
    };
    let full_connect = Connect {
        protocol: Protocol::V5,
        clean_start: true,
        keep_alive: 30,
        client_id: "client".into(),
        will: Some(Will {
            topic: "will/t".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                will_delay_interval: Some(10),
                message_expiry_interval: Some(60),
                content_type: Some("text".into()),
                ..Properties::default()
            },
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"secret")),
        properties: Properties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(20),
            maximum_packet_size: Some(1 << 16),
            topic_alias_maximum: Some(10),
            request_problem_information: Some(1),
            request_response_information: Some(0),
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("a".into(), "b".into()), ("a".into(), "c".into())],
            ..Properties::default()
        },
    };
    round_trip(Packet::Connect(full_connect.clone()), Protocol::V311);
    let mut v3_connect = full_connect;
    v3_connect.protocol = Protocol::V311;
    v3_connect.properties = Properties::default();
    if let Some(w) = v3_connect.will.as_mut() {
        w.properties = Properties::default();
    }
    round_trip(Packet::Connect(v3_connect), Protocol::V5);
    round_trip(
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: ReasonCode::SUCCESS,
            properties: Properties {
                assigned_client_identifier: Some("auto-1".into()),
                server_keep_alive: Some(20),
                maximum_qos: Some(1),
                retain_available: Some(true),
                wildcard_subscription_available: Some(true),
                shared_subscription_available: Some(false),
                subscription_identifiers_available: Some(true),
                receive_maximum: Some(100),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(0),
                ..props.clone()
            },
        }),
        Protocol::V5,
    );
    let mut pubv5 = publish("a/b", QoS::ExactlyOnce, 3);
    pubv5.properties = Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(5),
        topic_alias: Some(2),
        response_topic: Some("r".into()),
        correlation_data: Some(Bytes::from_static(b"c")),
        subscription_identifiers: vec![1, 268_435_455],
        content_type: Some("json".into()),
        user_properties: vec![("x".into(), "y".into())],
        ..Properties::default()
    };
    round_trip(Packet::Publish(pubv5), Protocol::V5);
    for version in [Protocol::V311, Protocol::V5] {
        let v5 = version == Protocol::V5;
        let p = |p: &Properties| if v5 { p.clone() } else { Properties::default() };
        round_trip(Packet::Publish(publish("x", QoS::AtMostOnce, 0)), version);
        round_trip(Packet::PubAck(Ack::new(1)), version);
        let ack = Ack {
            pkid: 65535,
            reason: if v5 {
                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
            } else {
                ReasonCode::SUCCESS
            },
            properties: p(&props),
        };
        round_trip(Packet::PubRel(ack.clone()), version);
        round_trip(Packet::PubComp(ack), version);
        round_trip(
            Packet::Subscribe(Subscribe {
                pkid: 2,
                filters: vec![
                    Subscription {
                        filter: "a/+/#".into(),
                        options: SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            ..SubscriptionOptions::default()
                        },
                    },
                    Subscription {
                        filter: "$share/g/b".into(),
                        options: SubscriptionOptions {
                            qos: QoS::ExactlyOnce,
                            no_local: false,
                            retain_as_published: v5,
                            retain_handling: if v5 {
                                RetainHandling::SendIfNew
                            } else {
                                RetainHandling::SendAtSubscribe
                            },
                        },
                    },
                ],
                properties: if v5 {
                    Properties {
                        subscription_identifiers: vec![42],
                        ..Properties::default()
                    }
                } else {
                    Properties::default()
                },
            }),
            version,
        );
        round_trip(
            Packet::SubAck(SubAck {
                pkid: 2,
                reasons: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::UNSPECIFIED_ERROR],
                properties: p(&props),
            }),
            version,
        );
        round_trip(
            Packet::Unsubscribe(Unsubscribe {
                pkid: 3,
                filters: vec!["a/+".into(), "b".into()],
                properties: if v5 {
                    Properties {
                        user_properties: vec![("u".into(), "v".into())],
                        ..Properties::default()
                    }
                } else {
                    Properties::default()
                },
            }),
            version,
        );
        round_trip(
            Packet::UnsubAck(UnsubAck {
                pkid: 3,
                reasons: if v5 {
                    vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
                } else {
                    Vec::new()
                },
                properties: p(&props),
            }),
            version,
        );
        round_trip(Packet::PingReq, version);
        round_trip(Packet::PingResp, version);
        round_trip(Packet::Disconnect(Disconnect::default()), version);
    }
    round_trip(
        Packet::Auth(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties {
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(b"abc")),
                ..Properties::default()
            },
        }),
        Protocol::V5,
    );
}

#[test]
fn publish_size_is_what_encode_writes() {
    for protocol in [Protocol::V311, Protocol::V5] {
        for (topic_len, payload_len) in [(1, 0), (5, 100), (300, 20_000), (10, 2_100_000)] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
                for alias in [None, Some(1)] {
                    let publish = Publish {
                        qos,
                        pkid: if qos == QoS::AtMostOnce { 0 } else { 1 },
                        topic: "t".repeat(topic_len),
                        payload: Bytes::from(vec![0; payload_len]),
                        properties: Properties {
                            topic_alias: alias.filter(|_| protocol == Protocol::V5),
                            ..Properties::default()
                        },
                        ..Publish::default()
                    };
                    let mut buf = BytesMut::new();
                    encode(&Packet::Publish(publish.clone()), protocol, &mut buf).unwrap();
                    assert_eq!(
                        publish_size(&publish, protocol),
                        Ok(buf.len()),
                        "{protocol:?} topic {topic_len} payload {payload_len} {qos:?} {alias:?}"
                    );
                }
            }
        }
    }
}

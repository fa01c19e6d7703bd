//! Property tests: arbitrary valid packets round-trip in both versions; arbitrary and
//! mutated bytes never panic the decoder, and partial input is consistent with whole.

use bytes::{Bytes, BytesMut};
use fieldbridge::mqtt::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const MAX: usize = 1 << 20;

fn text() -> impl Strategy<Value = String> {
    // Any non-control character (so no U+0000), including multi-byte UTF-8.
    "\\PC{0,8}"
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ $é/-]{1,24}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        3 => "[a-z0-9$é]{0,6}",
        1 => Just("+".to_owned()),
    ];
    (option::of("[a-z0-9]{1,5}"), vec(level, 1..5), any::<bool>()).prop_map(
        |(group, mut levels, hash)| {
            if hash {
                levels.push("#".into());
            }
            let mut filter = levels.join("/");
            if filter.is_empty() {
                filter.push('x');
            }
            match group {
                Some(g) => format!("$share/{g}/{filter}"),
                None => filter,
            }
        },
    )
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    option::of(0u8..=1)
}

/// Every property with a valid value; [`keep`] trims it to what a packet allows.
fn any_properties() -> impl Strategy<Value = Properties> {
    let a = (
        flag(),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(text()),
        option::of(binary()),
        vec(1u32..=268_435_455, 0..3),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(any::<u16>()),
        option::of(text()),
        option::of(binary()),
        flag(),
    );
    let b = (
        option::of(any::<u32>()),
        flag(),
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(1u16..),
        option::of(any::<u16>()),
        option::of(1u16..),
        flag(),
        option::of(any::<bool>()),
        vec((text(), text()), 0..3),
        option::of(1u32..),
    );
    let c = (
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
    );
    (a, b, c).prop_map(|(a, b, c)| Properties {
        payload_format_indicator: a.0,
        message_expiry_interval: a.1,
        content_type: a.2,
        response_topic: a.3,
        correlation_data: a.4,
        subscription_identifiers: a.5,
        session_expiry_interval: a.6,
        assigned_client_identifier: a.7,
        server_keep_alive: a.8,
        authentication_method: a.9,
        authentication_data: a.10,
        request_problem_information: a.11,
        will_delay_interval: b.0,
        request_response_information: b.1,
        response_information: b.2,
        server_reference: b.3,
        reason_string: b.4,
        receive_maximum: b.5,
        topic_alias_maximum: b.6,
        topic_alias: b.7,
        maximum_qos: b.8,
        retain_available: b.9,
        user_properties: b.10,
        maximum_packet_size: b.11,
        wildcard_subscription_available: c.0,
        subscription_identifiers_available: c.1,
        shared_subscription_available: c.2,
    })
}

#[derive(Clone, Copy)]
enum Place {
    Connect,
    Will,
    ConnAck,
    Publish,
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
}

/// Keeps only the properties `place` allows.
fn keep(p: Properties, place: Place) -> Properties {
    let base = Properties {
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    };
    match place {
        Place::Connect => Properties {
            session_expiry_interval: p.session_expiry_interval,
            authentication_method: p.authentication_method,
            authentication_data: p.authentication_data,
            request_problem_information: p.request_problem_information,
            request_response_information: p.request_response_information,
            receive_maximum: p.receive_maximum,
            topic_alias_maximum: p.topic_alias_maximum,
            maximum_packet_size: p.maximum_packet_size,
            ..base
        },
        Place::Will => Properties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            will_delay_interval: p.will_delay_interval,
            ..base
        },
        Place::ConnAck => Properties {
            session_expiry_interval: p.session_expiry_interval,
            assigned_client_identifier: p.assigned_client_identifier,
            server_keep_alive: p.server_keep_alive,
            authentication_method: p.authentication_method,
            authentication_data: p.authentication_data,
            response_information: p.response_information,
            server_reference: p.server_reference,
            reason_string: p.reason_string,
            receive_maximum: p.receive_maximum,
            topic_alias_maximum: p.topic_alias_maximum,
            maximum_qos: p.maximum_qos,
            retain_available: p.retain_available,
            maximum_packet_size: p.maximum_packet_size,
            wildcard_subscription_available: p.wildcard_subscription_available,
            subscription_identifiers_available: p.subscription_identifiers_available,
            shared_subscription_available: p.shared_subscription_available,
            ..base
        },
        Place::Publish => Properties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            subscription_identifiers: p.subscription_identifiers,
            topic_alias: p.topic_alias,
            ..base
        },
        Place::Ack => Properties {
            reason_string: p.reason_string,
            ..base
        },
        Place::Subscribe => Properties {
            subscription_identifiers: p.subscription_identifiers.into_iter().take(1).collect(),
            ..base
        },
        Place::Unsubscribe => base,
        Place::Disconnect => Properties {
            session_expiry_interval: p.session_expiry_interval,
            server_reference: p.server_reference,
            reason_string: p.reason_string,
            ..base
        },
        Place::Auth => Properties {
            authentication_method: p.authentication_method,
            authentication_data: p.authentication_data,
            reason_string: p.reason_string,
            ..base
        },
    }
}

fn props_for(place: Place, v5: bool) -> BoxedStrategy<Properties> {
    if v5 {
        any_properties().prop_map(move |p| keep(p, place)).boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

fn reason(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(codes).prop_map(ReasonCode)
}

const CONNACK_V5: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const CONNACK_V3: &[u8] = &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87];
const PUB_V5: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const REL_V5: &[u8] = &[0x00, 0x92];
const SUBACK_V5: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const SUBACK_V3: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const UNSUBACK_V5: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_V5: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_V5: &[u8] = &[0x00, 0x18, 0x19];
const SUCCESS: &[u8] = &[0x00];

fn connect(version: Protocol) -> impl Strategy<Value = Packet> {
    let v5 = version == Protocol::V5;
    let will = (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        props_for(Place::Will, v5),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        option::of(will),
        option::of(text()),
        option::of(binary()),
        props_for(Place::Connect, v5),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // 3.1.1 has no password without a user name.
                let password = if v5 || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                })
            },
        )
}

fn publish(version: Protocol) -> impl Strategy<Value = Publish> {
    let v5 = version == Protocol::V5;
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        1u16..,
        vec(any::<u8>(), 0..128),
        props_for(Place::Publish, v5),
        any::<bool>(),
    )
        .prop_map(
            move |(qos, dup, retain, topic, pkid, payload, properties, aliased)| {
                let at_most_once = qos == QoS::AtMostOnce;
                // 5.0: an aliased PUBLISH may leave the topic empty.
                let topic = if aliased && properties.topic_alias.is_some() {
                    String::new()
                } else {
                    topic
                };
                Publish {
                    dup: dup && !at_most_once,
                    qos,
                    retain,
                    topic,
                    pkid: if at_most_once { 0 } else { pkid },
                    payload: Bytes::from(payload),
                    properties,
                }
            },
        )
}

fn ack(v5: bool, codes: &'static [u8]) -> impl Strategy<Value = Ack> {
    (
        1u16..,
        reason(if v5 { codes } else { SUCCESS }),
        props_for(Place::Ack, v5),
    )
        .prop_map(|(pkid, reason, properties)| Ack {
            pkid,
            reason,
            properties,
        })
}

fn subscription(v5: bool) -> impl Strategy<Value = Subscription> {
    (topic_filter(), qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(
        move |(filter, qos, no_local, rap, rh)| {
            let shared = filter.starts_with("$share/");
            let options = if v5 {
                SubscriptionOptions {
                    qos,
                    no_local: no_local && !shared,
                    retain_as_published: rap,
                    retain_handling: match rh {
                        0 => RetainHandling::SendAtSubscribe,
                        1 => RetainHandling::SendIfNew,
                        _ => RetainHandling::DoNotSend,
                    },
                }
            } else {
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                }
            };
            Subscription { filter, options }
        },
    )
}

fn packet(version: Protocol) -> BoxedStrategy<Packet> {
    let v5 = version == Protocol::V5;
    let mut options = vec![
        connect(version).boxed(),
        (
            any::<bool>(),
            reason(if v5 { CONNACK_V5 } else { CONNACK_V3 }),
            props_for(Place::ConnAck, v5),
        )
            .prop_map(|(session_present, code, properties)| {
                Packet::ConnAck(ConnAck {
                    session_present,
                    code,
                    properties,
                })
            })
            .boxed(),
        publish(version).prop_map(Packet::Publish).boxed(),
        ack(v5, PUB_V5).prop_map(Packet::PubAck).boxed(),
        ack(v5, PUB_V5).prop_map(Packet::PubRec).boxed(),
        ack(v5, REL_V5).prop_map(Packet::PubRel).boxed(),
        ack(v5, REL_V5).prop_map(Packet::PubComp).boxed(),
        (
            1u16..,
            vec(subscription(v5), 1..4),
            props_for(Place::Subscribe, v5),
        )
            .prop_map(|(pkid, filters, properties)| {
                Packet::Subscribe(Subscribe {
                    pkid,
                    filters,
                    properties,
                })
            })
            .boxed(),
        (
            1u16..,
            vec(reason(if v5 { SUBACK_V5 } else { SUBACK_V3 }), 1..5),
            props_for(Place::Ack, v5),
        )
            .prop_map(|(pkid, reasons, properties)| {
                Packet::SubAck(SubAck {
                    pkid,
                    reasons,
                    properties,
                })
            })
            .boxed(),
        (
            1u16..,
            vec(topic_filter(), 1..4),
            props_for(Place::Unsubscribe, v5),
        )
            .prop_map(|(pkid, filters, properties)| {
                Packet::Unsubscribe(Unsubscribe {
                    pkid,
                    filters,
                    properties,
                })
            })
            .boxed(),
        (
            1u16..,
            vec(reason(UNSUBACK_V5), if v5 { 1..4 } else { 0..1 }),
            props_for(Place::Ack, v5),
        )
            .prop_map(|(pkid, reasons, properties)| {
                Packet::UnsubAck(UnsubAck {
                    pkid,
                    reasons,
                    properties,
                })
            })
            .boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        (
            reason(if v5 { DISCONNECT_V5 } else { SUCCESS }),
            props_for(Place::Disconnect, v5),
        )
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
            .boxed(),
    ];
    if v5 {
        options.push(
            (reason(AUTH_V5), props_for(Place::Auth, v5))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options).boxed()
}

fn version() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::V311), Just(Protocol::V5)]
}

fn versioned_packet() -> impl Strategy<Value = (Protocol, Packet)> {
    version().prop_flat_map(|v| (Just(v), packet(v)))
}

/// CONNECT is decoded as its own level whatever version the stream is in.
fn encoded(version: Protocol, packet: &Packet) -> BytesMut {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out).unwrap_or_else(|e| panic!("encode {packet:?}: {e}"));
    out
}

/// Decoding every prefix, then the whole: prefixes need more and consume nothing,
/// an error on a prefix stays an error, and the whole decodes to what it decodes to.
fn decode_with_prefixes(bytes: &[u8], version: Protocol) -> Result<Option<Packet>, Error> {
    let mut whole = BytesMut::from(bytes);
    let result = decode(&mut whole, version, MAX);
    for cut in 0..bytes.len() {
        let mut prefix = BytesMut::from(&bytes[..cut]);
        match decode(&mut prefix, version, MAX) {
            Ok(None) => assert_eq!(prefix.len(), cut, "Ok(None) consumed bytes"),
            Ok(Some(p)) => {
                // A complete packet inside the prefix is the same packet as in the
                // whole buffer.
                assert_eq!(result.clone().ok().flatten(), Some(p), "prefix of {cut}");
            }
            Err(_) => assert!(result.is_err(), "prefix of {cut} failed, whole did not"),
        }
    }
    result
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/mqtt_codec/proptest-regressions.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_packet_round_trips((version, packet) in versioned_packet()) {
        let mut buf = encoded(version, &packet);
        let len = buf.len();
        buf.extend_from_slice(&[0xC0, 0x00]);
        let decoded = decode(&mut buf, version, MAX);
        prop_assert_eq!(decoded, Ok(Some(packet.clone())));
        prop_assert_eq!(&buf[..], &[0xC0, 0x00]);
        // The size limit is exact: one byte less refuses it.
        let mut again = encoded(version, &packet);
        prop_assert_eq!(
            decode(&mut again, version, len - 1),
            Err(Error::PacketTooLarge { size: len, max: len - 1 })
        );
    }

    #[test]
    fn every_prefix_of_a_packet_needs_more((version, packet) in versioned_packet()) {
        let bytes = encoded(version, &packet);
        prop_assert_eq!(decode_with_prefixes(&bytes, version), Ok(Some(packet)));
    }

    #[test]
    fn shared_encoding_equals_direct_encoding(
        version in version(),
        publish in version().prop_flat_map(publish),
        pkid in 1u16..,
        dup in any::<bool>(),
        retain in any::<bool>(),
    ) {
        let mut publish = publish;
        if version == Protocol::V311 {
            publish.properties = Properties::default();
        }
        if publish.topic.is_empty() && version == Protocol::V311 {
            publish.topic = "t".into();
        }
        let shared = EncodedPublish::new(&publish, version).expect("encodes");
        let mut via_shared = BytesMut::new();
        shared.write_with_retain(pkid, dup, retain, &mut via_shared);
        prop_assert_eq!(via_shared.len(), shared.len());
        let at_most_once = publish.qos == QoS::AtMostOnce;
        let direct = Publish {
            pkid: if at_most_once { 0 } else { pkid },
            dup: dup && !at_most_once,
            retain,
            ..publish
        };
        prop_assert_eq!(via_shared, encoded(version, &Packet::Publish(direct)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        version in version(),
        bytes in vec(any::<u8>(), 0..300),
    ) {
        if let Ok(Some(packet)) = decode_with_prefixes(&bytes, version) {
            assert_reencodes(version, &packet);
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        (version, packet) in versioned_packet(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encoded(version, &packet).to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        // Sometimes also truncate or lengthen the body, keeping the header intact.
        let len = cut.index(bytes.len() + 8);
        bytes.resize(len.max(2), 0);
        if let Ok(Some(decoded)) = decode_with_prefixes(&bytes, version) {
            assert_reencodes(version, &decoded);
        }
    }
}

/// Whatever the decoder accepts, the encoder accepts too, and it decodes back equal.
fn assert_reencodes(version: Protocol, packet: &Packet) {
    let stream_version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => version,
    };
    let mut out = BytesMut::new();
    encode(packet, stream_version, &mut out)
        .unwrap_or_else(|e| panic!("decoded {packet:?} but cannot encode it: {e}"));
    assert_eq!(
        decode(&mut out, version, MAX),
        Ok(Some(packet.clone())),
        "re-encoding changed the packet"
    );
}

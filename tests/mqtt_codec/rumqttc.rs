//! Cross-checks with rumqttc's independent codec, both ways: our encoding must read
//! back through rumqttc as the equivalent rumqttc packet, and rumqttc's encoding must
//! decode through ours as our packet. The server-to-client packets (what our broker
//! sends rumqttc clients) are the focus; the client packets rumqttc writes (what our
//! broker reads) are covered too. Where both codecs pick the same wire form the bytes
//! must also be identical.

use bytes::{Bytes, BytesMut};
use fieldbridge::mqtt::*;
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::mqttbytes::QoS as Q4;
use rumqttc::v5::mqttbytes::v5 as r5;
use rumqttc::v5::mqttbytes::QoS as Q5;

const MAX: usize = 1 << 20;

fn ours_to_bytes(packet: &Packet, version: Protocol) -> BytesMut {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out).unwrap_or_else(|e| panic!("encode {packet:?}: {e}"));
    out
}

fn ours_from_bytes(bytes: &[u8], version: Protocol) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, version, MAX)
        .unwrap_or_else(|e| panic!("decode {bytes:02x?}: {e}"))
        .expect("complete packet");
    assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    packet
}

fn write4(p: &r4::Packet, out: &mut BytesMut) {
    let written = match p {
        r4::Packet::Connect(x) => x.write(out),
        r4::Packet::ConnAck(x) => x.write(out),
        r4::Packet::Publish(x) => x.write(out),
        r4::Packet::PubAck(x) => x.write(out),
        r4::Packet::PubRec(x) => x.write(out),
        r4::Packet::PubRel(x) => x.write(out),
        r4::Packet::PubComp(x) => x.write(out),
        r4::Packet::Subscribe(x) => x.write(out),
        r4::Packet::SubAck(x) => x.write(out),
        r4::Packet::Unsubscribe(x) => x.write(out),
        r4::Packet::UnsubAck(x) => x.write(out),
        r4::Packet::PingReq => r4::PingReq.write(out),
        r4::Packet::PingResp => r4::PingResp.write(out),
        r4::Packet::Disconnect => r4::Disconnect.write(out),
    };
    written.expect("rumqttc writes");
}

/// Both directions for one 3.1.1 pair.
fn check4(ours: Packet, theirs: r4::Packet, same_bytes: bool) {
    let our_bytes = ours_to_bytes(&ours, Protocol::V311);
    let mut buf = our_bytes.clone();
    let read = r4::read(&mut buf, MAX).unwrap_or_else(|e| panic!("rumqttc reads {ours:?}: {e:?}"));
    assert_eq!(read, theirs, "rumqttc's reading of our {ours:?}");
    let mut their_bytes = BytesMut::new();
    write4(&theirs, &mut their_bytes);
    assert_eq!(ours_from_bytes(&their_bytes, Protocol::V311), ours);
    if same_bytes {
        assert_eq!(our_bytes, their_bytes, "wire form of {ours:?}");
    }
}

/// Both directions for one 5.0 pair.
fn check5(ours: Packet, theirs: r5::Packet, same_bytes: bool) {
    let our_bytes = ours_to_bytes(&ours, Protocol::V5);
    let mut buf = our_bytes.clone();
    let read = r5::Packet::read(&mut buf, Some(MAX))
        .unwrap_or_else(|e| panic!("rumqttc reads {ours:?}: {e:?}"));
    assert_eq!(read, theirs, "rumqttc's reading of our {ours:?}");
    let mut their_bytes = BytesMut::new();
    theirs.write(&mut their_bytes).expect("rumqttc writes");
    assert_eq!(ours_from_bytes(&their_bytes, Protocol::V5), ours);
    if same_bytes {
        assert_eq!(our_bytes, their_bytes, "wire form of {ours:?}");
    }
}

/// Our encoding read by rumqttc only, for packets rumqttc cannot write correctly.
fn check5_ours_to_theirs(ours: Packet, theirs: r5::Packet) {
    let mut buf = ours_to_bytes(&ours, Protocol::V5);
    let read = r5::Packet::read(&mut buf, Some(MAX))
        .unwrap_or_else(|e| panic!("rumqttc reads {ours:?}: {e:?}"));
    assert_eq!(read, theirs, "rumqttc's reading of our {ours:?}");
    assert!(buf.is_empty());
}

fn props(f: impl FnOnce(&mut Properties)) -> Properties {
    let mut p = Properties::default();
    f(&mut p);
    p
}

#[test]
fn v311_connack_every_return_code() {
    use r4::ConnectReturnCode as C;
    for (code, theirs) in [
        (ReasonCode::SUCCESS, C::Success),
        (
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            C::RefusedProtocolVersion,
        ),
        (ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, C::BadClientId),
        (ReasonCode::SERVER_UNAVAILABLE, C::ServiceUnavailable),
        (
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            C::BadUserNamePassword,
        ),
        (ReasonCode::NOT_AUTHORIZED, C::NotAuthorized),
    ] {
        for session_present in [false, true] {
            check4(
                Packet::ConnAck(ConnAck {
                    session_present,
                    code,
                    properties: Properties::default(),
                }),
                r4::Packet::ConnAck(r4::ConnAck::new(theirs, session_present)),
                true,
            );
        }
    }
}

#[test]
fn v311_publish_and_acknowledgements() {
    for (qos, q4, pkid) in [
        (QoS::AtMostOnce, Q4::AtMostOnce, 0),
        (QoS::AtLeastOnce, Q4::AtLeastOnce, 1),
        (QoS::ExactlyOnce, Q4::ExactlyOnce, 65535),
    ] {
        for (dup, retain) in [(false, false), (qos != QoS::AtMostOnce, true)] {
            check4(
                Packet::Publish(Publish {
                    dup,
                    qos,
                    retain,
                    topic: "plant/line-1/temp".into(),
                    pkid,
                    payload: Bytes::from_static(b"{\"v\":21.5}"),
                    properties: Properties::default(),
                }),
                r4::Packet::Publish(r4::Publish {
                    dup,
                    qos: q4,
                    retain,
                    topic: "plant/line-1/temp".into(),
                    pkid,
                    payload: Bytes::from_static(b"{\"v\":21.5}"),
                }),
                true,
            );
        }
    }
    check4(
        Packet::PubAck(Ack::new(7)),
        r4::Packet::PubAck(r4::PubAck::new(7)),
        true,
    );
    check4(
        Packet::PubRec(Ack::new(8)),
        r4::Packet::PubRec(r4::PubRec::new(8)),
        true,
    );
    check4(
        Packet::PubRel(Ack::new(9)),
        r4::Packet::PubRel(r4::PubRel::new(9)),
        true,
    );
    check4(
        Packet::PubComp(Ack::new(10)),
        r4::Packet::PubComp(r4::PubComp::new(10)),
        true,
    );
}

#[test]
fn v311_subscriptions_and_pings() {
    use r4::SubscribeReasonCode as S;
    check4(
        Packet::SubAck(SubAck {
            pkid: 3,
            reasons: vec![
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::GRANTED_QOS_2,
                ReasonCode::UNSPECIFIED_ERROR,
            ],
            properties: Properties::default(),
        }),
        r4::Packet::SubAck(r4::SubAck::new(
            3,
            vec![
                S::Success(Q4::AtMostOnce),
                S::Success(Q4::AtLeastOnce),
                S::Success(Q4::ExactlyOnce),
                S::Failure,
            ],
        )),
        true,
    );
    check4(
        Packet::UnsubAck(UnsubAck {
            pkid: 4,
            ..UnsubAck::default()
        }),
        r4::Packet::UnsubAck(r4::UnsubAck::new(4)),
        true,
    );
    check4(Packet::PingResp, r4::Packet::PingResp, true);
    check4(Packet::PingReq, r4::Packet::PingReq, true);
    check4(
        Packet::Disconnect(Disconnect::default()),
        r4::Packet::Disconnect,
        true,
    );
    check4(
        Packet::Subscribe(Subscribe {
            pkid: 5,
            filters: vec![
                Subscription {
                    filter: "a/+/c".into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                },
                Subscription {
                    filter: "#".into(),
                    options: SubscriptionOptions::default(),
                },
            ],
            properties: Properties::default(),
        }),
        r4::Packet::Subscribe(r4::Subscribe {
            pkid: 5,
            filters: vec![
                r4::SubscribeFilter::new("a/+/c".into(), Q4::AtLeastOnce),
                r4::SubscribeFilter::new("#".into(), Q4::AtMostOnce),
            ],
        }),
        true,
    );
    check4(
        Packet::Unsubscribe(Unsubscribe {
            pkid: 6,
            filters: vec!["a/+/c".into(), "#".into()],
            properties: Properties::default(),
        }),
        r4::Packet::Unsubscribe(r4::Unsubscribe {
            pkid: 6,
            topics: vec!["a/+/c".into(), "#".into()],
        }),
        true,
    );
}

#[test]
fn v311_connect_with_will_and_login() {
    let mut theirs = r4::Connect::new("gateway-7");
    theirs.keep_alive = 45;
    theirs.clean_session = false;
    theirs.last_will = Some(r4::LastWill::new(
        "gw/7/status",
        "offline",
        Q4::AtLeastOnce,
        true,
    ));
    theirs.set_login("field", "s3cret");
    check4(
        Packet::Connect(Connect {
            protocol: Protocol::V311,
            clean_start: false,
            keep_alive: 45,
            client_id: "gateway-7".into(),
            will: Some(Will {
                topic: "gw/7/status".into(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            username: Some("field".into()),
            password: Some(Bytes::from_static(b"s3cret")),
            properties: Properties::default(),
        }),
        r4::Packet::Connect(theirs),
        true,
    );
}

#[test]
fn v5_connack_with_properties() {
    let theirs = r5::ConnAck {
        session_present: true,
        code: r5::ConnectReturnCode::Success,
        properties: Some(r5::ConnAckProperties {
            session_expiry_interval: Some(3600),
            receive_max: Some(32),
            max_qos: Some(1),
            retain_available: Some(1),
            max_packet_size: Some(1 << 20),
            assigned_client_identifier: Some("auto-42".into()),
            topic_alias_max: Some(16),
            reason_string: Some("welcome".into()),
            user_properties: vec![("node".into(), "gw-1".into())],
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(0),
            shared_subscription_available: Some(1),
            server_keep_alive: Some(30),
            response_information: Some("resp/".into()),
            server_reference: Some("other:1883".into()),
            authentication_method: Some("SCRAM-SHA-256".into()),
            authentication_data: Some(Bytes::from_static(b"\x01\x02")),
        }),
    };
    let ours = ConnAck {
        session_present: true,
        code: ReasonCode::SUCCESS,
        properties: props(|p| {
            p.session_expiry_interval = Some(3600);
            p.receive_maximum = Some(32);
            p.maximum_qos = Some(1);
            p.retain_available = Some(true);
            p.maximum_packet_size = Some(1 << 20);
            p.assigned_client_identifier = Some("auto-42".into());
            p.topic_alias_maximum = Some(16);
            p.reason_string = Some("welcome".into());
            p.user_properties = vec![("node".into(), "gw-1".into())];
            p.wildcard_subscription_available = Some(true);
            p.subscription_identifiers_available = Some(false);
            p.shared_subscription_available = Some(true);
            p.server_keep_alive = Some(30);
            p.response_information = Some("resp/".into());
            p.server_reference = Some("other:1883".into());
            p.authentication_method = Some("SCRAM-SHA-256".into());
            p.authentication_data = Some(Bytes::from_static(b"\x01\x02"));
        }),
    };
    // rumqttc writes properties in its own order; the values must agree.
    check5(Packet::ConnAck(ours), r5::Packet::ConnAck(theirs), false);
    use r5::ConnectReturnCode as C;
    for (code, theirs) in [
        (ReasonCode::SUCCESS, C::Success),
        (ReasonCode::UNSPECIFIED_ERROR, C::UnspecifiedError),
        (
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            C::UnsupportedProtocolVersion,
        ),
        (
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            C::ClientIdentifierNotValid,
        ),
        (
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            C::BadUserNamePassword,
        ),
        (ReasonCode::NOT_AUTHORIZED, C::NotAuthorized),
        (ReasonCode::SERVER_BUSY, C::ServerBusy),
        (ReasonCode::BANNED, C::Banned),
        (ReasonCode::QUOTA_EXCEEDED, C::QuotaExceeded),
    ] {
        check5(
            Packet::ConnAck(ConnAck {
                code,
                ..ConnAck::default()
            }),
            r5::Packet::ConnAck(r5::ConnAck {
                session_present: false,
                code: theirs,
                properties: None,
            }),
            true,
        );
    }
}

#[test]
fn v5_publish_with_properties() {
    for (qos, q5, pkid) in [
        (QoS::AtMostOnce, Q5::AtMostOnce, 0),
        (QoS::AtLeastOnce, Q5::AtLeastOnce, 300),
        (QoS::ExactlyOnce, Q5::ExactlyOnce, 65535),
    ] {
        let theirs = r5::Publish {
            dup: false,
            qos: q5,
            retain: true,
            topic: Bytes::from_static(b"plant/line-1/temp"),
            pkid,
            payload: Bytes::from_static(b"{\"v\":21.5}"),
            properties: Some(r5::PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(600),
                topic_alias: Some(3),
                response_topic: Some("reply/1".into()),
                correlation_data: Some(Bytes::from_static(b"corr")),
                user_properties: vec![("unit".into(), "degC".into())],
                subscription_identifiers: vec![7, 200_000],
                content_type: Some("application/json".into()),
            }),
        };
        let ours = Publish {
            dup: false,
            qos,
            retain: true,
            topic: "plant/line-1/temp".into(),
            pkid,
            payload: Bytes::from_static(b"{\"v\":21.5}"),
            properties: props(|p| {
                p.payload_format_indicator = Some(1);
                p.message_expiry_interval = Some(600);
                p.topic_alias = Some(3);
                p.response_topic = Some("reply/1".into());
                p.correlation_data = Some(Bytes::from_static(b"corr"));
                p.user_properties = vec![("unit".into(), "degC".into())];
                p.subscription_identifiers = vec![7, 200_000];
                p.content_type = Some("application/json".into());
            }),
        };
        check5(Packet::Publish(ours), r5::Packet::Publish(theirs), false);
        check5(
            Packet::Publish(Publish {
                qos,
                pkid,
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                ..Publish::default()
            }),
            r5::Packet::Publish(r5::Publish {
                qos: q5,
                pkid,
                topic: Bytes::from_static(b"t"),
                payload: Bytes::from_static(b"x"),
                ..r5::Publish::default()
            }),
            true,
        );
    }
}

#[test]
fn v5_acknowledgements_with_reasons_and_properties() {
    let ack_props = props(|p| {
        p.reason_string = Some("quota".into());
        p.user_properties = vec![("k".into(), "v".into())];
    });
    check5(
        Packet::PubAck(Ack::new(1)),
        r5::Packet::PubAck(r5::PubAck::new(1, None)),
        true,
    );
    check5(
        Packet::PubAck(Ack {
            pkid: 2,
            reason: ReasonCode::QUOTA_EXCEEDED,
            properties: ack_props.clone(),
        }),
        r5::Packet::PubAck(r5::PubAck {
            pkid: 2,
            reason: r5::PubAckReason::QuotaExceeded,
            properties: Some(r5::PubAckProperties {
                reason_string: Some("quota".into()),
                user_properties: vec![("k".into(), "v".into())],
            }),
        }),
        true,
    );
    // A reason without properties: we send the 3-byte form, rumqttc adds an empty
    // property length; each reads the other's.
    check5(
        Packet::PubAck(Ack {
            pkid: 3,
            reason: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            properties: Properties::default(),
        }),
        r5::Packet::PubAck(r5::PubAck {
            pkid: 3,
            reason: r5::PubAckReason::NoMatchingSubscribers,
            properties: None,
        }),
        false,
    );
    check5(
        Packet::PubRec(Ack {
            pkid: 4,
            reason: ReasonCode::NOT_AUTHORIZED,
            properties: ack_props.clone(),
        }),
        r5::Packet::PubRec(r5::PubRec {
            pkid: 4,
            reason: r5::PubRecReason::NotAuthorized,
            properties: Some(r5::PubRecProperties {
                reason_string: Some("quota".into()),
                user_properties: vec![("k".into(), "v".into())],
            }),
        }),
        true,
    );
    check5(
        Packet::PubRel(Ack::new(5)),
        r5::Packet::PubRel(r5::PubRel::new(5, None)),
        true,
    );
    check5(
        Packet::PubComp(Ack {
            pkid: 6,
            reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            properties: ack_props.clone(),
        }),
        r5::Packet::PubComp(r5::PubComp {
            pkid: 6,
            reason: r5::PubCompReason::PacketIdentifierNotFound,
            properties: Some(r5::PubCompProperties {
                reason_string: Some("quota".into()),
                user_properties: vec![("k".into(), "v".into())],
            }),
        }),
        true,
    );
}

#[test]
fn v5_subscription_acknowledgements_pings_and_disconnect() {
    use r5::SubscribeReasonCode as S;
    check5(
        Packet::SubAck(SubAck {
            pkid: 9,
            reasons: vec![
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::GRANTED_QOS_2,
                ReasonCode::UNSPECIFIED_ERROR,
                ReasonCode::NOT_AUTHORIZED,
                ReasonCode::TOPIC_FILTER_INVALID,
                ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
                ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
            ],
            properties: props(|p| p.reason_string = Some("partly".into())),
        }),
        r5::Packet::SubAck(r5::SubAck {
            pkid: 9,
            return_codes: vec![
                S::Success(Q5::AtMostOnce),
                S::Success(Q5::AtLeastOnce),
                S::Success(Q5::ExactlyOnce),
                S::Unspecified,
                S::NotAuthorized,
                S::TopicFilterInvalid,
                S::SharedSubscriptionsNotSupported,
                S::WildcardSubscriptionsNotSupported,
            ],
            properties: Some(r5::SubAckProperties {
                reason_string: Some("partly".into()),
                user_properties: Vec::new(),
            }),
        }),
        true,
    );
    check5(
        Packet::UnsubAck(UnsubAck {
            pkid: 10,
            reasons: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        }),
        r5::Packet::UnsubAck(r5::UnsubAck {
            pkid: 10,
            reasons: vec![
                r5::UnsubAckReason::Success,
                r5::UnsubAckReason::NoSubscriptionExisted,
            ],
            properties: None,
        }),
        true,
    );
    check5(Packet::PingResp, r5::Packet::PingResp(r5::PingResp), true);
    check5(Packet::PingReq, r5::Packet::PingReq(r5::PingReq), true);
    // rumqttc keeps its DISCONNECT properties type private, so reason codes only; and
    // for a reason without properties it writes remaining length 1 followed by two
    // bytes, so that direction is not checked.
    for (reason, theirs) in [
        (
            ReasonCode::SESSION_TAKEN_OVER,
            r5::DisconnectReasonCode::SessionTakenOver,
        ),
        (
            ReasonCode::SERVER_SHUTTING_DOWN,
            r5::DisconnectReasonCode::ServerShuttingDown,
        ),
        (
            ReasonCode::KEEP_ALIVE_TIMEOUT,
            r5::DisconnectReasonCode::KeepAliveTimeout,
        ),
    ] {
        check5_ours_to_theirs(
            Packet::Disconnect(Disconnect {
                reason,
                properties: Properties::default(),
            }),
            r5::Packet::Disconnect(r5::Disconnect {
                reason_code: theirs,
                properties: None,
            }),
        );
    }
}

#[test]
fn v5_client_packets_rumqttc_sends() {
    let filter = |path: &str, qos, nolocal, preserve_retain, rule| r5::Filter {
        path: path.into(),
        qos,
        nolocal,
        preserve_retain,
        retain_forward_rule: rule,
    };
    check5(
        Packet::Subscribe(Subscribe {
            pkid: 11,
            filters: vec![
                Subscription {
                    filter: "a/#".into(),
                    options: SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                },
                Subscription {
                    filter: "$share/g/b/+".into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: RetainHandling::SendIfNew,
                    },
                },
            ],
            properties: props(|p| {
                p.subscription_identifiers = vec![12];
                p.user_properties = vec![("a".into(), "b".into())];
            }),
        }),
        r5::Packet::Subscribe(r5::Subscribe {
            pkid: 11,
            filters: vec![
                filter(
                    "a/#",
                    Q5::ExactlyOnce,
                    true,
                    true,
                    r5::RetainForwardRule::Never,
                ),
                filter(
                    "$share/g/b/+",
                    Q5::AtLeastOnce,
                    false,
                    false,
                    r5::RetainForwardRule::OnNewSubscribe,
                ),
            ],
            properties: Some(r5::SubscribeProperties {
                id: Some(12),
                user_properties: vec![("a".into(), "b".into())],
            }),
        }),
        true,
    );
    check5(
        Packet::Unsubscribe(Unsubscribe {
            pkid: 13,
            filters: vec!["a/#".into()],
            properties: Properties::default(),
        }),
        r5::Packet::Unsubscribe(r5::Unsubscribe {
            pkid: 13,
            filters: vec!["a/#".into()],
            properties: None,
        }),
        true,
    );
    let connect = r5::Connect {
        keep_alive: 20,
        client_id: "edge-1".into(),
        clean_start: true,
        properties: Some(r5::ConnectProperties {
            session_expiry_interval: Some(600),
            receive_maximum: Some(50),
            max_packet_size: Some(65536),
            topic_alias_max: Some(8),
            request_response_info: Some(1),
            request_problem_info: Some(0),
            user_properties: vec![("fw".into(), "1.2".into())],
            authentication_method: None,
            authentication_data: None,
        }),
    };
    let will = r5::LastWill {
        topic: Bytes::from_static(b"edge/1/status"),
        message: Bytes::from_static(b"offline"),
        qos: Q5::AtLeastOnce,
        retain: true,
        properties: Some(r5::LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    };
    let login = r5::Login {
        username: "edge".into(),
        password: "pw".into(),
    };
    check5(
        Packet::Connect(Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 20,
            client_id: "edge-1".into(),
            will: Some(Will {
                topic: "edge/1/status".into(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: props(|p| {
                    p.will_delay_interval = Some(5);
                    p.payload_format_indicator = Some(1);
                    p.message_expiry_interval = Some(3600);
                    p.content_type = Some("text/plain".into());
                }),
            }),
            username: Some("edge".into()),
            password: Some(Bytes::from_static(b"pw")),
            properties: props(|p| {
                p.session_expiry_interval = Some(600);
                p.receive_maximum = Some(50);
                p.maximum_packet_size = Some(65536);
                p.topic_alias_maximum = Some(8);
                p.request_response_information = Some(1);
                p.request_problem_information = Some(0);
                p.user_properties = vec![("fw".into(), "1.2".into())];
            }),
        }),
        r5::Packet::Connect(connect, Some(will), Some(login)),
        false,
    );
}

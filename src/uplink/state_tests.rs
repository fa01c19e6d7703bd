//! Session state tests: every ordering of packets, no sockets. Time comes from tokio's
//! paused clock where intervals matter.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::*;
use crate::store::{Message, Priority};

const STATUS: &str = "site/gw/status";

fn config(protocol: Protocol) -> SessionConfig {
    SessionConfig {
        protocol,
        client_id: "gw-1".to_owned(),
        username: Some("gw".to_owned()),
        keep_alive: 30,
        session_expiry: 3600,
        inflight: 10,
        status_topic: STATUS.to_owned(),
        online_payload: Bytes::from_static(b"online"),
        offline_payload: Bytes::from_static(b"offline"),
        subscribe: Vec::new(),
        max_incoming_packet: 65_536,
        incoming_receive_maximum: 16,
    }
}

fn session(protocol: Protocol) -> Session {
    Session::new(config(protocol), Arc::new(Counters::default()))
}

fn row(id: i64, qos: QoS, topic: &str) -> Stored {
    Stored {
        id,
        message: Message {
            topic: topic.to_owned(),
            payload: Bytes::from(format!("payload {id}")),
            qos,
            retain: false,
            created_ms: 0,
            priority: Priority::Periodic,
            unsynced: None,
        },
        pkid: None,
        pubrec: false,
    }
}

fn connack(present: bool) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: present,
        ..ConnAck::default()
    })
}

fn connack_with(properties: Properties) -> Packet {
    Packet::ConnAck(ConnAck {
        properties,
        ..ConnAck::default()
    })
}

fn out(s: &mut Session) -> Vec<Packet> {
    s.take_outbox().collect()
}

fn effects(s: &mut Session) -> Vec<Effect> {
    s.take_effects().collect()
}

/// Connects, checks the birth message (after every resumed flow, before anything
/// else) and acknowledges it; the other packets stay in the outbox, in order.
fn connect(s: &mut Session, ack: Packet) {
    let now = Instant::now();
    s.connect(None);
    s.handle(ack, now).unwrap();
    let mut packets = out(s);
    let is_birth = |p: &Packet| matches!(p, Packet::Publish(p) if p.topic == STATUS);
    let Some(at) = packets.iter().position(is_birth) else {
        panic!("no birth: {packets:?}");
    };
    let Packet::Publish(birth) = packets.remove(at) else {
        unreachable!()
    };
    assert_eq!(birth.payload, "online");
    assert!(
        packets[..at]
            .iter()
            .all(|p| matches!(p, Packet::Publish(p) if p.topic != STATUS)
                || matches!(p, Packet::PubRel(_))),
        "only resumed flows go before the birth: {packets:?}"
    );
    assert!(!packets.iter().any(is_birth));
    s.handle(Packet::PubAck(Ack::new(birth.pkid)), now).unwrap();
    s.outbox.extend(packets);
}

fn publishes(packets: &[Packet]) -> Vec<(u16, bool, String)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((
                p.pkid,
                p.dup,
                String::from_utf8_lossy(&p.payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn now() -> Instant {
    Instant::now()
}

#[test]
fn connect_asks_for_a_persistent_session_with_a_retained_will() {
    let mut s = session(Protocol::V311);
    let Packet::Connect(c) = s.connect(Some(Password::new("pw"))) else {
        panic!("not CONNECT");
    };
    assert!(!c.clean_start);
    assert_eq!(c.client_id, "gw-1");
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.username.as_deref(), Some("gw"));
    assert_eq!(c.password, Some(Bytes::from_static(b"pw")));
    let will = c.will.unwrap();
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        (STATUS, &b"offline"[..])
    );
    assert_eq!((will.qos, will.retain), (QoS::AtLeastOnce, true));
    assert!(c.properties.is_empty());

    let mut s = session(Protocol::V5);
    let Packet::Connect(c) = s.connect(None) else {
        panic!("not CONNECT");
    };
    assert!(!c.clean_start);
    assert_eq!(c.properties.session_expiry_interval, Some(3600));
    assert_eq!(c.properties.receive_maximum, Some(16));
    assert_eq!(c.properties.maximum_packet_size, Some(65_536));
}

#[test]
fn birth_is_retained_and_first_after_every_connack_then_subscribe() {
    let mut cfg = config(Protocol::V311);
    cfg.subscribe = vec!["cmd/#".to_owned()];
    let mut s = Session::new(cfg, Arc::new(Counters::default()));
    for present in [false, true] {
        s.connect(None);
        s.handle(connack(present), now()).unwrap();
        let packets = out(&mut s);
        let Packet::Publish(birth) = &packets[0] else {
            panic!("{packets:?}");
        };
        assert!(birth.retain);
        assert_eq!(birth.qos, QoS::AtLeastOnce);
        let Packet::Subscribe(sub) = &packets[1] else {
            panic!("{packets:?}");
        };
        assert_eq!(sub.filters[0].filter, "cmd/#");
        assert_eq!(sub.filters[0].options.qos, QoS::AtLeastOnce);
        assert_ne!(sub.pkid, birth.pkid);
        s.disconnected();
    }
}

#[test]
fn qos1_row_is_deleted_only_on_puback() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    s.offer(row(7, QoS::AtLeastOnce, "t/a"), now());
    let packets = out(&mut s);
    assert_eq!(publishes(&packets), [(7, false, "payload 7".to_owned())]);
    assert_eq!(effects(&mut s), []);
    s.handle(Packet::PubAck(Ack::new(7)), now()).unwrap();
    assert_eq!(effects(&mut s), [Effect::Delete(7)]);
    // A second PUBACK for the same id changes nothing.
    s.handle(Packet::PubAck(Ack::new(7)), now()).unwrap();
    assert_eq!(effects(&mut s), []);
}

#[test]
fn qos2_pubrel_waits_for_the_persisted_pubrec() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    s.offer(row(3, QoS::ExactlyOnce, "t/a"), now());
    assert_eq!(
        publishes(&out(&mut s)),
        [(3, false, "payload 3".to_owned())]
    );
    s.handle(Packet::PubRec(Ack::new(3)), now()).unwrap();
    assert_eq!(out(&mut s), []);
    assert_eq!(
        effects(&mut s),
        [Effect::PersistFlow {
            id: 3,
            pkid: 3,
            pubrec: true
        }]
    );
    // PUBCOMP before PUBREL went out is ignored.
    s.handle(Packet::PubComp(Ack::new(3)), now()).unwrap();
    assert_eq!(effects(&mut s), []);
    s.flow_persisted(3, true, now());
    assert_eq!(out(&mut s), [Packet::PubRel(Ack::new(3))]);
    // A repeated PUBREC gets the PUBREL again.
    s.handle(Packet::PubRec(Ack::new(3)), now()).unwrap();
    assert_eq!(out(&mut s), [Packet::PubRel(Ack::new(3))]);
    s.handle(Packet::PubComp(Ack::new(3)), now()).unwrap();
    assert_eq!(effects(&mut s), [Effect::Delete(3)]);
    assert_eq!(s.held_rows(), Vec::<i64>::new());
}

#[test]
fn qos0_row_is_deleted_once_written() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    s.offer(row(9, QoS::AtMostOnce, "t/a"), now());
    assert_eq!(
        publishes(&out(&mut s)),
        [(0, false, "payload 9".to_owned())]
    );
    assert_eq!(effects(&mut s), [Effect::Delete(9)]);
}

#[test]
fn window_is_the_configured_size_capped_by_receive_maximum() {
    let mut s = session(Protocol::V311);
    assert_eq!(s.room(), 0, "no room before CONNACK");
    connect(&mut s, connack(false));
    assert_eq!(s.room(), 10);
    for id in 1..=10 {
        s.offer(row(id, QoS::AtLeastOnce, "t"), now());
    }
    assert_eq!(s.room(), 0);
    s.handle(Packet::PubAck(Ack::new(4)), now()).unwrap();
    assert_eq!(s.room(), 1);

    let mut s = session(Protocol::V5);
    let props = Properties {
        receive_maximum: Some(3),
        ..Properties::default()
    };
    connect(&mut s, connack_with(props));
    assert_eq!(s.limits().receive_maximum, 3);
    assert_eq!(s.room(), 3);
}

#[test]
fn resume_with_session_present_resends_with_dup_or_pubrel_in_order() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    s.offer(row(1, QoS::AtLeastOnce, "t"), now());
    s.offer(row(2, QoS::ExactlyOnce, "t"), now());
    s.offer(row(3, QoS::ExactlyOnce, "t"), now());
    s.offer(row(4, QoS::AtLeastOnce, "t"), now());
    out(&mut s);
    s.handle(Packet::PubRec(Ack::new(2)), now()).unwrap();
    s.flow_persisted(2, true, now());
    s.handle(Packet::PubAck(Ack::new(4)), now()).unwrap();
    effects(&mut s);
    out(&mut s);
    s.disconnected();
    assert_eq!(s.room(), 0);
    assert_eq!(s.held_rows(), [1, 2, 3]);

    connect(&mut s, connack(true));
    let packets = out(&mut s);
    assert_eq!(
        packets,
        [
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::AtLeastOnce,
                topic: "t".to_owned(),
                pkid: 1,
                payload: Bytes::from_static(b"payload 1"),
                ..Publish::default()
            }),
            Packet::PubRel(Ack::new(2)),
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::ExactlyOnce,
                topic: "t".to_owned(),
                pkid: 3,
                payload: Bytes::from_static(b"payload 3"),
                ..Publish::default()
            }),
        ]
    );
    assert_eq!(s.stats.resent.load(Ordering::Relaxed), 2);
    s.handle(Packet::PubComp(Ack::new(2)), now()).unwrap();
    assert_eq!(effects(&mut s), [Effect::Delete(2)]);
}

#[test]
fn lost_session_starts_over_and_resets_persisted_pubrec_first() {
    let mut s = session(Protocol::V5);
    connect(&mut s, connack(false));
    s.offer(row(1, QoS::ExactlyOnce, "t"), now());
    s.offer(row(2, QoS::AtLeastOnce, "t"), now());
    s.handle(Packet::PubRec(Ack::new(1)), now()).unwrap();
    s.flow_persisted(1, true, now());
    out(&mut s);
    effects(&mut s);
    s.disconnected();

    connect(&mut s, connack(false));
    // The QoS 1 row goes out afresh; the QoS 2 one waits for its reset.
    assert_eq!(
        publishes(&out(&mut s)),
        [(2, false, "payload 2".to_owned())]
    );
    assert_eq!(
        effects(&mut s),
        [Effect::PersistFlow {
            id: 1,
            pkid: 1,
            pubrec: false
        }]
    );
    s.flow_persisted(1, false, now());
    assert_eq!(
        publishes(&out(&mut s)),
        [(1, false, "payload 1".to_owned())]
    );
    s.handle(Packet::PubRec(Ack::new(1)), now()).unwrap();
    assert_eq!(
        effects(&mut s),
        [Effect::PersistFlow {
            id: 1,
            pkid: 1,
            pubrec: true
        }]
    );
}

#[test]
fn a_persist_still_running_across_a_lost_session_is_followed_by_a_reset() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    s.offer(row(5, QoS::ExactlyOnce, "t"), now());
    s.handle(Packet::PubRec(Ack::new(5)), now()).unwrap();
    effects(&mut s);
    s.disconnected();
    connect(&mut s, connack(false));
    assert_eq!(
        effects(&mut s),
        [Effect::PersistFlow {
            id: 5,
            pkid: 5,
            pubrec: false
        }]
    );
    // The earlier persist of `pubrec` completes first (the store keeps order) and is
    // not taken as permission to release.
    s.flow_persisted(5, true, now());
    assert_eq!(out(&mut s), []);
    s.flow_persisted(5, false, now());
    assert_eq!(
        publishes(&out(&mut s)),
        [(5, false, "payload 5".to_owned())]
    );
}

#[test]
fn rows_from_an_earlier_process_resume_their_persisted_flows() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(true));
    let mut released = row(10, QoS::ExactlyOnce, "t");
    released.pkid = Some(10);
    released.pubrec = true;
    let mut published = row(11, QoS::ExactlyOnce, "t");
    published.pkid = Some(11);
    s.offer(released, now());
    s.offer(published, now());
    s.offer(row(12, QoS::ExactlyOnce, "t"), now());
    let packets = out(&mut s);
    assert_eq!(packets[0], Packet::PubRel(Ack::new(10)));
    assert_eq!(
        publishes(&packets),
        [
            (11, true, "payload 11".to_owned()),
            (12, false, "payload 12".to_owned())
        ]
    );
    assert_eq!(effects(&mut s), []);
}

#[test]
fn rows_from_an_earlier_process_start_over_when_the_session_is_gone() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    let mut released = row(10, QoS::ExactlyOnce, "t");
    released.pkid = Some(10);
    released.pubrec = true;
    let mut published = row(11, QoS::ExactlyOnce, "t");
    published.pkid = Some(11);
    s.offer(released, now());
    s.offer(published, now());
    assert_eq!(
        publishes(&out(&mut s)),
        [(11, false, "payload 11".to_owned())]
    );
    assert_eq!(
        effects(&mut s),
        [Effect::PersistFlow {
            id: 10,
            pkid: 10,
            pubrec: false
        }]
    );
    s.flow_persisted(10, false, now());
    assert_eq!(
        publishes(&out(&mut s)),
        [(10, false, "payload 10".to_owned())]
    );
}

#[test]
fn qos2_row_waits_when_its_packet_id_is_taken() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    s.offer(row(1, QoS::ExactlyOnce, "t"), now());
    s.offer(row(65_536, QoS::ExactlyOnce, "t"), now());
    s.offer(row(131_071, QoS::AtLeastOnce, "t"), now());
    assert_eq!(pkid_for_row(65_536), 1);
    assert_eq!(pkid_for_row(131_071), 1);
    let packets = publishes(&out(&mut s));
    // The QoS 1 row takes another id at once; the QoS 2 row waits for id 1.
    assert_eq!(packets.len(), 2);
    assert_eq!(packets[0], (1, false, "payload 1".to_owned()));
    assert_eq!(packets[1].2, "payload 131071");
    assert_ne!(packets[1].0, 1);
    assert_eq!(s.held_rows(), [1, 131_071, 65_536]);
    assert_eq!(s.room(), 7);
    s.handle(Packet::PubRec(Ack::new(1)), now()).unwrap();
    s.flow_persisted(1, true, now());
    s.handle(Packet::PubComp(Ack::new(1)), now()).unwrap();
    let packets = out(&mut s);
    assert_eq!(
        publishes(&packets),
        [(1, false, "payload 65536".to_owned())]
    );
}

#[test]
fn a_message_too_large_for_the_broker_is_dropped_and_does_not_wedge() {
    let mut s = session(Protocol::V5);
    let props = Properties {
        maximum_packet_size: Some(64),
        ..Properties::default()
    };
    connect(&mut s, connack_with(props));
    let mut big = row(1, QoS::AtLeastOnce, "t");
    big.message.payload = Bytes::from(vec![b'x'; 100]);
    s.offer(big, now());
    s.offer(row(2, QoS::AtLeastOnce, "t"), now());
    assert_eq!(
        publishes(&out(&mut s)),
        [(2, false, "payload 2".to_owned())]
    );
    let Effect::Drop {
        id: 1,
        reason: DropReason::TooLarge { size, max: 64 },
    } = effects(&mut s)[0]
    else {
        panic!("not dropped");
    };
    assert!(size > 100);
    assert_eq!(s.room(), 9);
}

#[test]
fn maximum_qos_and_retain_available_are_respected() {
    let mut s = session(Protocol::V5);
    let props = Properties {
        maximum_qos: Some(1),
        retain_available: Some(false),
        ..Properties::default()
    };
    s.connect(None);
    s.handle(connack_with(props), now()).unwrap();
    let Packet::Publish(birth) = &out(&mut s)[0] else {
        panic!("no birth");
    };
    assert!(!birth.retain);
    let mut retained = row(4, QoS::ExactlyOnce, "t");
    retained.message.retain = true;
    s.offer(retained, now());
    let Packet::Publish(p) = &out(&mut s)[0] else {
        panic!("no publish");
    };
    assert_eq!((p.qos, p.retain), (QoS::AtLeastOnce, false));
    s.handle(Packet::PubAck(Ack::new(4)), now()).unwrap();
    assert_eq!(effects(&mut s), [Effect::Delete(4)]);
}

#[test]
fn refused_will_flags_are_dropped_on_the_next_connect() {
    let mut s = session(Protocol::V5);
    s.connect(None);
    let refused = Packet::ConnAck(ConnAck {
        code: ReasonCode::RETAIN_NOT_SUPPORTED,
        ..ConnAck::default()
    });
    assert!(matches!(
        s.handle(refused, now()),
        Err(SessionError::Refused { code: 0x9A, .. })
    ));
    let Packet::Connect(c) = s.connect(None) else {
        panic!()
    };
    assert!(!c.will.unwrap().retain);
}

#[test]
fn bad_credentials_are_an_auth_failure() {
    let mut s = session(Protocol::V311);
    s.connect(None);
    let refused = Packet::ConnAck(ConnAck {
        code: ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        ..ConnAck::default()
    });
    let err = s.handle(refused, now()).unwrap_err();
    assert!(err.is_auth_failure());
    assert!(
        err.to_string().contains("bad user name or password"),
        "{err}"
    );
    assert!(!s.is_connected());
}

#[test]
fn topic_aliases_are_handed_out_first_come_and_reset_per_connection() {
    let mut s = session(Protocol::V5);
    let props = Properties {
        topic_alias_maximum: Some(2),
        ..Properties::default()
    };
    s.connect(None);
    s.handle(connack_with(props.clone()), now()).unwrap();
    let birth = out(&mut s);
    let Packet::Publish(birth) = &birth[0] else {
        panic!()
    };
    assert_eq!(
        (birth.topic.as_str(), birth.properties.topic_alias),
        (STATUS, Some(1))
    );
    for (id, topic) in [(1, "a"), (2, "b"), (3, "a"), (4, "c")] {
        s.offer(row(id, QoS::AtLeastOnce, topic), now());
    }
    let sent: Vec<(String, Option<u16>)> = out(&mut s)
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => (p.topic, p.properties.topic_alias),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("a".to_owned(), Some(2)),
            ("b".to_owned(), None),
            (String::new(), Some(2)),
            ("c".to_owned(), None),
        ]
    );
    s.disconnected();
    s.connect(None);
    s.handle(connack_with(props), now()).unwrap();
    let resent: Vec<(String, Option<u16>)> = out(&mut s)
        .into_iter()
        .take(4)
        .map(|p| match p {
            Packet::Publish(p) => (p.topic, p.properties.topic_alias),
            other => panic!("{other:?}"),
        })
        .collect();
    // A new connection sets its aliases up again, resends first, the birth after them.
    assert_eq!(
        resent,
        [
            ("a".to_owned(), Some(1)),
            ("b".to_owned(), Some(2)),
            (String::new(), Some(1)),
            ("c".to_owned(), None),
        ]
    );
}

#[test]
fn a_dropped_message_does_not_keep_the_alias_it_would_have_set_up() {
    let mut s = session(Protocol::V5);
    let props = Properties {
        topic_alias_maximum: Some(5),
        maximum_packet_size: Some(40),
        ..Properties::default()
    };
    s.connect(None);
    s.handle(connack_with(props), now()).unwrap();
    out(&mut s);
    let mut big = row(1, QoS::AtLeastOnce, "a/b");
    big.message.payload = Bytes::from(vec![0; 40]);
    s.offer(big, now());
    s.offer(row(2, QoS::AtLeastOnce, "a/b"), now());
    let Packet::Publish(p) = &out(&mut s)[0] else {
        panic!()
    };
    assert_eq!(
        p.topic, "a/b",
        "the alias must be set up by a packet that went out"
    );
    assert!(p.properties.topic_alias.is_some());
}

#[test]
fn invalid_topic_is_dropped() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    s.offer(row(1, QoS::AtLeastOnce, "a/+/b"), now());
    assert_eq!(out(&mut s), []);
    assert!(matches!(
        effects(&mut s)[..],
        [Effect::Drop {
            id: 1,
            reason: DropReason::InvalidTopic(_)
        }]
    ));
}

#[test]
fn error_reason_in_puback_drops_the_row_once_logged() {
    let mut s = session(Protocol::V5);
    connect(&mut s, connack(false));
    s.offer(row(1, QoS::AtLeastOnce, "t"), now());
    s.offer(row(2, QoS::ExactlyOnce, "t"), now());
    let refuse = |pkid| Ack {
        pkid,
        reason: ReasonCode::NOT_AUTHORIZED,
        properties: Properties::default(),
    };
    s.handle(Packet::PubAck(refuse(1)), now()).unwrap();
    s.handle(Packet::PubRec(refuse(2)), now()).unwrap();
    assert_eq!(
        effects(&mut s),
        [
            Effect::Drop {
                id: 1,
                reason: DropReason::Rejected(ReasonCode::NOT_AUTHORIZED)
            },
            Effect::Drop {
                id: 2,
                reason: DropReason::Rejected(ReasonCode::NOT_AUTHORIZED)
            },
        ]
    );
    assert_eq!(s.room(), 10);
}

#[test]
fn incoming_messages_are_acknowledged_and_qos2_delivered_once() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    let incoming = |qos, pkid| {
        Packet::Publish(Publish {
            qos,
            pkid,
            topic: "cmd/x".to_owned(),
            payload: Bytes::from_static(b"1"),
            ..Publish::default()
        })
    };
    s.handle(incoming(QoS::AtLeastOnce, 5), now()).unwrap();
    assert_eq!(out(&mut s), [Packet::PubAck(Ack::new(5))]);
    s.handle(incoming(QoS::ExactlyOnce, 6), now()).unwrap();
    s.handle(incoming(QoS::ExactlyOnce, 6), now()).unwrap();
    assert_eq!(
        out(&mut s),
        [Packet::PubRec(Ack::new(6)), Packet::PubRec(Ack::new(6))]
    );
    assert_eq!(effects(&mut s).len(), 2, "QoS 1 once, QoS 2 once");
    s.handle(Packet::PubRel(Ack::new(6)), now()).unwrap();
    assert_eq!(out(&mut s), [Packet::PubComp(Ack::new(6))]);
}

#[test]
fn broker_misbehaviour_ends_the_connection() {
    let mut s = session(Protocol::V311);
    s.connect(None);
    assert!(matches!(
        s.handle(Packet::PubAck(Ack::new(1)), now()),
        Err(SessionError::Protocol(_))
    ));
    let mut s = session(Protocol::V5);
    connect(&mut s, connack(false));
    assert!(matches!(
        s.handle(connack(false), now()),
        Err(SessionError::Protocol(_))
    ));
    let mut s = session(Protocol::V5);
    connect(&mut s, connack(false));
    let bye = Packet::Disconnect(Disconnect {
        reason: ReasonCode::SERVER_SHUTTING_DOWN,
        properties: Properties::default(),
    });
    assert!(matches!(
        s.handle(bye, now()),
        Err(SessionError::ServerDisconnect { code: 0x8B, .. })
    ));
}

#[test]
fn graceful_shutdown_publishes_offline_then_disconnects() {
    let mut s = session(Protocol::V311);
    assert_eq!(s.publish_offline(now()), None, "nothing to do offline");
    connect(&mut s, connack(false));
    s.offer(row(1, QoS::AtLeastOnce, "t"), now());
    out(&mut s);
    let pkid = s.publish_offline(now()).unwrap();
    let Packet::Publish(p) = &out(&mut s)[0] else {
        panic!()
    };
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        (STATUS, &b"offline"[..], true)
    );
    assert!(s.is_pending(pkid));
    s.handle(Packet::PubAck(Ack::new(pkid)), now()).unwrap();
    assert!(!s.is_pending(pkid));
    assert_eq!(s.disconnect(), Packet::Disconnect(Disconnect::default()));
    assert_eq!(s.held_rows(), [1]);
}

#[tokio::test(start_paused = true)]
async fn keepalive_pings_when_quiet_and_fails_without_pingresp() {
    let mut s = session(Protocol::V311);
    s.connect(None);
    s.handle(connack(false), Instant::now()).unwrap();
    out(&mut s);
    let start = Instant::now();
    assert_eq!(s.next_timer(), Some(start + Duration::from_secs(30)));
    tokio::time::advance(Duration::from_secs(29)).await;
    s.on_timer(Instant::now()).unwrap();
    assert_eq!(out(&mut s), []);
    tokio::time::advance(Duration::from_secs(1)).await;
    s.on_timer(Instant::now()).unwrap();
    assert_eq!(out(&mut s), [Packet::PingReq]);
    tokio::time::advance(Duration::from_secs(10)).await;
    s.handle(Packet::PingResp, Instant::now()).unwrap();
    // Quiet again: the next ping is due 30 s after our last send.
    assert_eq!(s.next_timer(), Some(start + Duration::from_secs(60)));
    tokio::time::advance(Duration::from_secs(20)).await;
    s.on_timer(Instant::now()).unwrap();
    assert_eq!(out(&mut s), [Packet::PingReq]);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(matches!(
        s.on_timer(Instant::now()),
        Err(SessionError::PingTimeout(d)) if d == Duration::from_secs(30)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_silent_broker_is_pinged_even_while_we_keep_sending() {
    let mut s = session(Protocol::V311);
    s.connect(None);
    s.handle(connack(false), Instant::now()).unwrap();
    out(&mut s);
    let start = Instant::now();
    for id in 1..=6 {
        tokio::time::advance(Duration::from_secs(5)).await;
        s.offer(row(id, QoS::AtMostOnce, "t"), Instant::now());
        s.on_timer(Instant::now()).unwrap();
    }
    let packets = out(&mut s);
    assert_eq!(packets.last(), Some(&Packet::PingReq));
    assert_eq!(s.next_timer(), Some(start + Duration::from_secs(60)));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(
        s.on_timer(Instant::now()).is_err(),
        "half-open connection not noticed"
    );
}

#[tokio::test(start_paused = true)]
async fn server_keep_alive_overrides_ours() {
    let mut s = session(Protocol::V5);
    s.connect(None);
    let props = Properties {
        server_keep_alive: Some(5),
        ..Properties::default()
    };
    s.handle(connack_with(props), Instant::now()).unwrap();
    assert_eq!(s.limits().keep_alive, 5);
    assert_eq!(
        s.next_timer(),
        Some(Instant::now() + Duration::from_secs(5))
    );
}

#[test]
fn pkid_for_row_covers_the_whole_id_space() {
    assert_eq!(pkid_for_row(1), 1);
    assert_eq!(pkid_for_row(65_535), 65_535);
    assert_eq!(pkid_for_row(65_536), 1);
    assert_eq!(pkid_for_row(0), 65_535);
    assert_eq!(pkid_for_row(i64::MAX), pkid_for_row(i64::MAX - 65_535));
}

fn pkids(packets: &[Packet]) -> Vec<(&'static str, u16)> {
    packets
        .iter()
        .map(|p| match p {
            Packet::Publish(p) if p.topic == STATUS => ("birth", p.pkid),
            Packet::Publish(p) => ("publish", p.pkid),
            Packet::PubRel(ack) => ("pubrel", ack.pkid),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn quota_exceeded_keeps_the_message_and_sends_one_at_a_time_until_it_is_through() {
    let mut s = session(Protocol::V5);
    connect(&mut s, connack(false));
    for id in 1..=3 {
        s.offer(row(id, QoS::AtLeastOnce, "t"), now());
    }
    out(&mut s);
    let quota = Ack {
        pkid: 1,
        reason: ReasonCode::QUOTA_EXCEEDED,
        properties: Properties::default(),
    };
    assert!(matches!(
        s.handle(Packet::PubAck(quota), now()),
        Err(SessionError::Throttled { code: 0x97 })
    ));
    assert_eq!(effects(&mut s), []);
    assert_eq!(s.stats.throttled.load(Ordering::Relaxed), 1);
    s.disconnected();
    s.connect(None);
    s.handle(connack(true), now()).unwrap();
    // The refused message first and alone, then the others one by one, and only then
    // the birth with the whole window back.
    assert_eq!(publishes(&out(&mut s)), [(1, true, "payload 1".to_owned())]);
    for next in [2, 3] {
        s.handle(Packet::PubAck(Ack::new(next - 1)), now()).unwrap();
        assert_eq!(pkids(&out(&mut s)), [("publish", next)]);
    }
    s.handle(Packet::PubAck(Ack::new(3)), now()).unwrap();
    let birth = out(&mut s);
    assert!(matches!(&birth[..], [Packet::Publish(p)] if p.topic == STATUS));
    for id in 4..=6 {
        s.offer(row(id, QoS::AtLeastOnce, "t"), now());
    }
    assert_eq!(out(&mut s).len(), 3, "the full window is back");
    assert_eq!(
        effects(&mut s),
        [1, 2, 3].map(Effect::Delete),
        "every refused message is delivered, in order"
    );
}

/// Found with a mosquitto started with `max_inflight_messages 2`: it counts a
/// resumed session's unreleased QoS 2 flows against the new connection's quota, so
/// the birth message sent first after CONNACK was refused (0x97, or a closed socket on
/// 3.1.1) on every reconnect and the uplink never got to release those flows.
#[test]
fn resumed_qos2_flows_use_the_quota_before_the_birth_after_a_reconnect() {
    let mut s = session(Protocol::V5);
    let two = Properties {
        receive_maximum: Some(2),
        ..Properties::default()
    };
    connect(&mut s, connack_with(two.clone()));
    for id in [2, 4] {
        s.offer(row(id, QoS::ExactlyOnce, "t"), now());
    }
    out(&mut s);
    for pkid in [2, 4] {
        s.handle(Packet::PubRec(Ack::new(pkid)), now()).unwrap();
    }
    effects(&mut s);
    s.disconnected();
    s.connect(None);
    s.handle(
        Packet::ConnAck(ConnAck {
            session_present: true,
            properties: two,
            ..ConnAck::default()
        }),
        now(),
    )
    .unwrap();
    assert_eq!(
        out(&mut s),
        [],
        "the broker holds two flows: its quota is full"
    );
    s.flow_persisted(4, true, now());
    assert_eq!(out(&mut s), [], "PUBREL 4 waits for the older flow");
    s.flow_persisted(2, true, now());
    assert_eq!(pkids(&out(&mut s)), [("pubrel", 2), ("pubrel", 4)]);
    s.handle(Packet::PubComp(Ack::new(2)), now()).unwrap();
    let birth = out(&mut s);
    assert!(matches!(&birth[..], [Packet::Publish(p)] if p.topic == STATUS));
}

/// The flake of `qos1_and_qos2_are_delivered_in_order_on_both_protocols`: the store
/// finished two `pubrec` persists in the other order, the PUBRELs followed, and
/// mosquitto (which delivers QoS 2 on PUBREL) forwarded the younger message first.
#[test]
fn pubrels_keep_publish_order_when_persists_finish_out_of_order() {
    let mut s = session(Protocol::V5);
    connect(&mut s, connack(false));
    for id in [2, 4, 6] {
        s.offer(row(id, QoS::ExactlyOnce, "data/q2"), now());
    }
    out(&mut s);
    for pkid in [2, 4, 6] {
        s.handle(Packet::PubRec(Ack::new(pkid)), now()).unwrap();
    }
    effects(&mut s);
    s.flow_persisted(6, true, now());
    s.flow_persisted(4, true, now());
    // A repeated PUBREC must not let a held PUBREL jump the queue.
    s.handle(Packet::PubRec(Ack::new(4)), now()).unwrap();
    // Nor may a PUBCOMP for a PUBREL never sent finish the flow.
    s.handle(Packet::PubComp(Ack::new(6)), now()).unwrap();
    assert_eq!(out(&mut s), []);
    assert_eq!(effects(&mut s), []);
    s.flow_persisted(2, true, now());
    assert_eq!(
        out(&mut s),
        [2, 4, 6].map(|pkid| Packet::PubRel(Ack::new(pkid)))
    );
    for pkid in [2, 4, 6] {
        s.handle(Packet::PubComp(Ack::new(pkid)), now()).unwrap();
    }
    assert_eq!(effects(&mut s), [2, 4, 6].map(Effect::Delete));
}

#[test]
fn a_released_flow_is_not_held_behind_a_younger_persist() {
    let mut s = session(Protocol::V311);
    connect(&mut s, connack(false));
    for id in [2, 4] {
        s.offer(row(id, QoS::ExactlyOnce, "data/q2"), now());
    }
    out(&mut s);
    s.handle(Packet::PubRec(Ack::new(2)), now()).unwrap();
    s.handle(Packet::PubRec(Ack::new(4)), now()).unwrap();
    s.flow_persisted(2, true, now());
    assert_eq!(out(&mut s), [Packet::PubRel(Ack::new(2))]);
    s.flow_persisted(4, true, now());
    assert_eq!(out(&mut s), [Packet::PubRel(Ack::new(4))]);
}

#[test]
fn a_resumed_pubrel_waits_for_an_older_flow_still_persisting() {
    let mut s = session(Protocol::V5);
    connect(&mut s, connack(false));
    for id in [2, 4] {
        s.offer(row(id, QoS::ExactlyOnce, "t"), now());
    }
    out(&mut s);
    for pkid in [2, 4] {
        s.handle(Packet::PubRec(Ack::new(pkid)), now()).unwrap();
    }
    s.flow_persisted(4, true, now());
    assert_eq!(out(&mut s), [], "PUBREL 4 is held for the persist of 2");
    s.disconnected();
    connect(&mut s, connack(true));
    assert_eq!(out(&mut s), [], "nor does the reconnect let it jump ahead");
    s.flow_persisted(2, true, now());
    assert_eq!(pkids(&out(&mut s)), [("pubrel", 2), ("pubrel", 4)]);
}

#[test]
fn flows_cut_by_a_crash_are_released_first_and_their_ids_wait_for_pubcomp() {
    let mut s = session(Protocol::V311);
    s.sweep(vec![7, 9]);
    connect(&mut s, connack(true));
    let packets = out(&mut s);
    assert_eq!(
        pkids(&packets),
        vec![("pubrel", 7), ("pubrel", 9)],
        "the sweep goes before anything new"
    );
    // A QoS 2 row whose packet id is still being released waits for its PUBCOMP; a
    // QoS 1 row takes another id.
    s.offer(row(7, QoS::ExactlyOnce, "t/a"), now());
    s.offer(row(9, QoS::AtLeastOnce, "t/b"), now());
    let packets = out(&mut s);
    let sent = publishes(&packets);
    assert_eq!(sent.len(), 1, "{packets:?}");
    assert_ne!(sent[0].0, 9);
    assert_eq!(sent[0].2, "payload 9");
    s.handle(Packet::PubComp(Ack::new(7)), now()).unwrap();
    assert_eq!(
        publishes(&out(&mut s)),
        vec![(7, false, "payload 7".into())]
    );
    assert!(!effects(&mut s).contains(&Effect::Swept));
    s.handle(Packet::PubComp(Ack::new(9)), now()).unwrap();
    assert!(effects(&mut s).contains(&Effect::Swept));
}

#[test]
fn a_sweep_cut_by_a_lost_connection_is_resent_on_the_next_resumed_session() {
    let mut s = session(Protocol::V5);
    s.sweep(vec![3, 4]);
    connect(&mut s, connack(true));
    out(&mut s);
    s.handle(Packet::PubComp(Ack::new(3)), now()).unwrap();
    s.disconnected();
    connect(&mut s, connack(true));
    assert_eq!(pkids(&out(&mut s)), vec![("pubrel", 4)]);
}

#[test]
fn no_sweep_when_the_broker_session_is_gone() {
    let mut s = session(Protocol::V311);
    s.sweep(vec![5]);
    connect(&mut s, connack(false));
    assert!(pkids(&out(&mut s)).is_empty());
    assert!(effects(&mut s).contains(&Effect::Swept));
    s.offer(row(5, QoS::ExactlyOnce, "t/a"), now());
    assert_eq!(
        publishes(&out(&mut s)),
        vec![(5, false, "payload 5".into())]
    );
}

/// Regression: a sweep of every packet id (four crashes in a row before a sweep was
/// recorded) left `free_pkid` no id to find, and the birth message spun forever.
#[test]
fn a_sweep_of_every_packet_id_still_leaves_ids_for_the_birth_and_new_rows() {
    let mut s = session(Protocol::V311);
    s.sweep((1..=u16::MAX).collect());
    connect(&mut s, connack(true));
    let released = out(&mut s).len();
    assert!(released > 60_000, "{released}");
    let room = s.room();
    assert!(room > 0 && room <= 16, "{room}");
    for id in 0..room {
        s.offer(row(id as i64 + 1, QoS::AtLeastOnce, "t/a"), now());
    }
    assert_eq!(publishes(&out(&mut s)).len(), room);
    assert_eq!(s.room(), 0, "more rows wait for packet ids to come free");
}

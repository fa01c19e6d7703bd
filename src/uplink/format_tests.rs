//! Session tests with a payload format ([`Format`]): clean sessions, births before rows,
//! rows formatted again for each connection, a host to wait for. No sockets.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::*;
use crate::mqtt::{Publish, Will};
use crate::store::{Message, Priority};
use crate::uplink::format::{Format, Incoming};

/// A format that numbers what it makes: `seq N`, from 0 at each birth.
#[derive(Debug, Default)]
struct Numbered {
    seq: u32,
    wait: bool,
    wills: u32,
}

impl Numbered {
    fn next(&mut self) -> Bytes {
        let seq = self.seq;
        self.seq += 1;
        Bytes::from(format!("seq {seq}"))
    }
}

impl Format for Numbered {
    fn will(&mut self) -> Will {
        self.wills += 1;
        Will {
            topic: "node/death".into(),
            payload: Bytes::from(format!("death {}", self.wills)),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }
    }
    fn subscriptions(&self) -> Vec<String> {
        vec!["node/cmd".into()]
    }
    fn waits_for_host(&self) -> bool {
        self.wait
    }
    fn births(&mut self) -> Vec<(String, Bytes)> {
        self.seq = 0;
        vec![("node/birth".into(), self.next())]
    }
    fn farewell(&mut self) -> (String, Bytes) {
        ("node/death".into(), Bytes::from_static(b"bye"))
    }
    fn row(&mut self, topic: &str, payload: &Bytes, _: i64) -> Option<(String, Bytes)> {
        (payload != "drop").then(|| (format!("node/{topic}"), self.next()))
    }
    fn incoming(&mut self, publish: &Publish) -> Incoming {
        match publish.topic.as_str() {
            "host/state" if publish.payload == "online" => Incoming::HostOnline,
            "host/state" => Incoming::HostOffline,
            "node/cmd" => Incoming::Rebirth,
            _ => Incoming::Forward,
        }
    }
}

fn session(protocol: Protocol, format: Numbered) -> Session {
    let mut session = Session::new(
        SessionConfig {
            protocol,
            client_id: "gw".into(),
            username: None,
            keep_alive: 30,
            session_expiry: 3600,
            inflight: 10,
            status_topic: "gw/status".into(),
            online_payload: Bytes::from_static(b"online"),
            offline_payload: Bytes::from_static(b"offline"),
            subscribe: format.subscriptions(),
            max_incoming_packet: 65_536,
            incoming_receive_maximum: 16,
        },
        Arc::new(Counters::default()),
    );
    session.set_format(Box::new(format));
    session
}

fn row(id: i64, payload: &'static str) -> Stored {
    Stored {
        id,
        message: Message {
            topic: format!("r{id}"),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            created_ms: 0,
            priority: Priority::Periodic,
            unsynced: None,
        },
        pkid: None,
        pubrec: false,
    }
}

fn incoming(topic: &str, payload: &'static str) -> Packet {
    Packet::Publish(Publish {
        topic: topic.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        ..Publish::default()
    })
}

/// CONNECT and a CONNACK without a session.
fn accept(s: &mut Session, now: Instant) {
    s.connect(None);
    s.handle(Packet::ConnAck(ConnAck::default()), now)
        .expect("connack");
}

/// `topic payload` of each PUBLISH, `SUBSCRIBE` for a subscription.
fn wire(session: &mut Session) -> Vec<String> {
    session
        .take_outbox()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(format!(
                "{} {}",
                p.topic,
                String::from_utf8_lossy(&p.payload)
            )),
            Packet::Subscribe(_) => Some("SUBSCRIBE".into()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_format_makes_the_session_clean_and_subscribes_then_births_before_any_row() {
    let now = Instant::now();
    let mut s = session(Protocol::V5, Numbered::default());
    let Packet::Connect(connect) = s.connect(None) else {
        panic!("CONNECT");
    };
    assert!(connect.clean_start, "Sparkplug needs a clean session");
    assert_eq!(connect.properties.session_expiry_interval, Some(0));
    let will = connect.will.expect("will");
    assert_eq!((will.topic.as_str(), will.retain), ("node/death", false));
    s.handle(Packet::ConnAck(ConnAck::default()), now)
        .expect("connack");
    s.offer(row(1, "a"), now);
    assert_eq!(
        wire(&mut s),
        ["SUBSCRIBE", "node/birth seq 0", "node/r1 seq 1"]
    );
}

#[test]
fn unacknowledged_rows_are_formatted_again_behind_the_births_of_a_new_connection() {
    let now = Instant::now();
    let mut s = session(Protocol::V311, Numbered::default());
    accept(&mut s, now);
    s.offer(row(1, "a"), now);
    s.offer(row(2, "b"), now);
    wire(&mut s);
    s.disconnected();
    let Packet::Connect(connect) = s.connect(None) else {
        panic!("CONNECT");
    };
    assert_eq!(
        connect.will.expect("will").payload,
        "death 2",
        "a will per attempt"
    );
    s.handle(Packet::ConnAck(ConnAck::default()), now)
        .expect("connack");
    assert_eq!(
        wire(&mut s),
        [
            "SUBSCRIBE",
            "node/birth seq 0",
            "node/r1 seq 1",
            "node/r2 seq 2"
        ]
    );
    s.handle(Packet::PubAck(Ack::new(1)), now).expect("puback");
    let deleted: Vec<Effect> = s.take_effects().collect();
    assert_eq!(deleted, [Effect::Delete(1)]);
}

#[test]
fn a_rebirth_starts_the_numbers_over_for_the_rows_after_it() {
    let now = Instant::now();
    let mut s = session(Protocol::V311, Numbered::default());
    accept(&mut s, now);
    s.offer(row(1, "a"), now);
    wire(&mut s);
    s.handle(incoming("node/cmd", "rebirth"), now)
        .expect("ncmd");
    s.offer(row(2, "b"), now);
    assert_eq!(wire(&mut s), ["node/birth seq 0", "node/r2 seq 1"]);
    assert!(
        s.take_effects().next().is_none(),
        "a command of the format is not forwarded"
    );
}

#[test]
fn nothing_is_published_until_the_host_is_online_and_its_offline_state_ends_the_connection() {
    let now = Instant::now();
    let mut s = session(
        Protocol::V311,
        Numbered {
            wait: true,
            ..Numbered::default()
        },
    );
    accept(&mut s, now);
    assert_eq!(wire(&mut s), ["SUBSCRIBE"]);
    assert_eq!(s.room(), 0, "rows wait for the host");
    s.handle(incoming("host/state", "online"), now)
        .expect("online");
    assert_eq!(wire(&mut s), ["node/birth seq 0"]);
    assert!(s.room() > 0);
    assert_eq!(
        s.handle(incoming("host/state", "offline"), now),
        Err(SessionError::HostOffline)
    );
}

#[test]
fn a_row_with_nothing_left_to_send_is_deleted_unpublished_and_the_farewell_is_the_formats() {
    let now = Instant::now();
    let mut s = session(Protocol::V311, Numbered::default());
    accept(&mut s, now);
    wire(&mut s);
    s.offer(row(7, "drop"), now);
    assert!(wire(&mut s).is_empty());
    assert_eq!(s.take_effects().collect::<Vec<_>>(), [Effect::Delete(7)]);
    s.publish_offline(now).expect("farewell");
    assert_eq!(wire(&mut s), ["node/death bye"]);
}

/// Regression: the retained offline STATE of a host that is down arrives at every
/// connect; it ended the connection, so the gateway reconnected in a loop instead of
/// waiting, connected, for the host to come back.
#[test]
fn a_retained_offline_state_while_waiting_for_the_host_keeps_the_connection() {
    let now = Instant::now();
    let mut s = session(
        Protocol::V311,
        Numbered {
            wait: true,
            ..Numbered::default()
        },
    );
    accept(&mut s, now);
    wire(&mut s);
    s.handle(incoming("host/state", "offline"), now)
        .expect("a host still offline is waited out");
    s.handle(incoming("node/cmd", "rebirth"), now)
        .expect("no births on request either");
    assert!(wire(&mut s).is_empty());
    s.handle(incoming("host/state", "online"), now)
        .expect("online");
    assert_eq!(wire(&mut s), ["node/birth seq 0"]);
}

//! The session state machine driven packet by packet, without sockets: a [`Router`]
//! shared by several [`Conn`]s, whose output is decoded back into packets.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::auth::{passwd_line, Acl, Policy};
use super::config::BrokerConfig;
use super::conn::{Close, Conn};
use super::router::{Router, Settings};
use super::session::Kick;
use crate::mqtt::*;

fn router_with(config: BrokerConfig, policy: Policy) -> Arc<Router> {
    Arc::new(Router::new(Settings::from_config(&config), policy, None))
}

fn router() -> Arc<Router> {
    router_with(
        BrokerConfig::default(),
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
    )
}

struct Client {
    conn: Option<Conn>,
    protocol: Protocol,
    out: BytesMut,
}

fn connect_packet(protocol: Protocol, id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 30,
        client_id: id.into(),
        ..Connect::default()
    }
}

async fn open(router: &Arc<Router>, connect: Connect) -> (Client, ConnAck) {
    let protocol = connect.protocol;
    let mut out = BytesMut::new();
    let peer = "127.0.0.1:50000".parse().unwrap();
    let conn = Conn::connect(router, connect, peer, &mut out).await;
    let mut client = Client {
        conn,
        protocol,
        out,
    };
    let mut packets = client.decode();
    assert!(!packets.is_empty(), "no CONNACK");
    let Packet::ConnAck(ack) = packets.remove(0) else {
        panic!("expected CONNACK first");
    };
    client.out.clear();
    // A resumed session's resends follow the CONNACK; put them back for `recv`.
    for p in packets {
        encode(&p, protocol, &mut client.out).unwrap();
    }
    (client, ack)
}

async fn connect(router: &Arc<Router>, protocol: Protocol, id: &str) -> Client {
    let (client, ack) = open(router, connect_packet(protocol, id)).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    client
}

impl Client {
    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connected")
    }

    fn decode(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        while let Some(p) = decode(&mut self.out, self.protocol, usize::MAX).unwrap() {
            packets.push(p);
        }
        assert!(self.out.is_empty(), "partial packet left");
        packets
    }

    fn send(&mut self, packet: Packet) -> Result<(), Close> {
        let mut out = std::mem::take(&mut self.out);
        let result = self.conn().handle(packet, &mut out);
        self.out = out;
        result
    }

    /// Everything the broker has for this client now.
    fn recv(&mut self) -> Vec<Packet> {
        let mut out = std::mem::take(&mut self.out);
        self.conn().drain(&mut out, usize::MAX).unwrap();
        self.out = out;
        self.decode()
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<ReasonCode> {
        self.subscribe_with(
            filter,
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
            0,
        )
    }

    fn subscribe_with(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
        id: u32,
    ) -> Vec<ReasonCode> {
        let mut properties = Properties::default();
        if id != 0 {
            properties.subscription_identifiers = vec![id];
        }
        self.send(Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![Subscription {
                filter: filter.into(),
                options,
            }],
            properties,
        }))
        .unwrap();
        match self.decode().remove(0) {
            Packet::SubAck(ack) => {
                let failed = ack.reasons.iter().any(|r| !r.is_success());
                let explained = ack.properties.reason_string.is_some();
                assert_eq!(
                    failed && self.protocol == Protocol::V5,
                    explained,
                    "a 5.0 SUBACK explains failures: {ack:?}"
                );
                ack.reasons
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    fn publish(&mut self, topic: &str, payload: &'static [u8], qos: QoS, pkid: u16) -> Vec<Packet> {
        self.publish_with(Publish {
            qos,
            topic: topic.into(),
            pkid,
            payload: Bytes::from_static(payload),
            ..Publish::default()
        })
    }

    fn publish_with(&mut self, p: Publish) -> Vec<Packet> {
        self.send(Packet::Publish(p)).unwrap();
        self.decode()
    }

    fn close(&mut self, why: Close) {
        self.conn.take().expect("connected").close(why);
    }
}

fn publishes(packets: &[Packet]) -> Vec<&Publish> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn payloads(packets: &[Packet]) -> Vec<&[u8]> {
    publishes(packets).iter().map(|p| &p.payload[..]).collect()
}

#[tokio::test]
async fn qos_is_the_minimum_of_published_and_granted() {
    let router = router();
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut sub = connect(&router, protocol, "sub").await;
        let mut publisher = connect(&router, protocol, "pub").await;
        assert_eq!(
            sub.subscribe("q/+", QoS::AtLeastOnce),
            [ReasonCode::GRANTED_QOS_1]
        );
        assert!(publisher
            .publish("q/0", b"0", QoS::AtMostOnce, 0)
            .is_empty());
        assert_eq!(
            publisher.publish("q/1", b"1", QoS::AtLeastOnce, 7),
            [Packet::PubAck(Ack::new(7))]
        );
        let rec = publisher.publish("q/2", b"2", QoS::ExactlyOnce, 8);
        assert_eq!(rec, [Packet::PubRec(Ack::new(8))]);
        let got = sub.recv();
        let qos: Vec<QoS> = publishes(&got).iter().map(|p| p.qos).collect();
        assert_eq!(qos, [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::AtLeastOnce]);
        assert_eq!(payloads(&got), [b"0", b"1", b"2"]);
        sub.close(Close::Normal);
        publisher.close(Close::Normal);
    }
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos_with_every_id() {
    let router = router();
    let mut sub = connect(&router, Protocol::V5, "sub").await;
    let opts = |qos| SubscriptionOptions {
        qos,
        ..Default::default()
    };
    sub.subscribe_with("a/#", opts(QoS::AtMostOnce), 1);
    sub.subscribe_with("a/+", opts(QoS::ExactlyOnce), 2);
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    publisher.publish("a/b", b"x", QoS::ExactlyOnce, 1);
    let got = sub.recv();
    let p = publishes(&got);
    assert_eq!(p.len(), 1, "{got:?}");
    assert_eq!(p[0].qos, QoS::ExactlyOnce);
    let mut ids = p[0].properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
}

#[tokio::test]
async fn inbound_qos2_is_routed_once_until_released() {
    let router = router();
    let mut sub = connect(&router, Protocol::V311, "sub").await;
    sub.subscribe("t", QoS::AtMostOnce);
    let mut publisher = connect(&router, Protocol::V311, "pub").await;
    publisher.publish("t", b"once", QoS::ExactlyOnce, 5);
    let dup = Publish {
        dup: true,
        qos: QoS::ExactlyOnce,
        topic: "t".into(),
        pkid: 5,
        payload: Bytes::from_static(b"once"),
        ..Publish::default()
    };
    assert_eq!(publisher.publish_with(dup), [Packet::PubRec(Ack::new(5))]);
    assert_eq!(payloads(&sub.recv()), [b"once"]);
    publisher.send(Packet::PubRel(Ack::new(5))).unwrap();
    assert_eq!(publisher.decode(), [Packet::PubComp(Ack::new(5))]);
    publisher.publish("t", b"again", QoS::ExactlyOnce, 5);
    assert_eq!(
        payloads(&sub.recv()),
        [b"again"],
        "a released id is a new message"
    );
}

#[tokio::test]
async fn outbound_qos2_flow_and_receive_maximum() {
    let router = router();
    let mut connect_v5 = connect_packet(Protocol::V5, "sub");
    connect_v5.properties.receive_maximum = Some(2);
    let (mut sub, ack) = open(&router, connect_v5).await;
    assert_eq!(ack.properties.receive_maximum, Some(20));
    assert_eq!(ack.properties.topic_alias_maximum, Some(10));
    sub.subscribe("t", QoS::ExactlyOnce);
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    for (i, payload) in [b"1", b"2", b"3"].iter().enumerate() {
        publisher.publish("t", *payload, QoS::ExactlyOnce, i as u16 + 1);
    }
    let got = sub.recv();
    assert_eq!(payloads(&got), [b"1", b"2"], "window of two");
    let first = publishes(&got)[0].pkid;
    sub.send(Packet::PubRec(Ack::new(first))).unwrap();
    assert_eq!(sub.decode(), [Packet::PubRel(Ack::new(first))]);
    assert!(sub.recv().is_empty(), "slot held until PUBCOMP");
    sub.send(Packet::PubComp(Ack::new(first))).unwrap();
    assert_eq!(payloads(&sub.recv()), [b"3"]);
}

#[tokio::test]
async fn persistent_session_queues_offline_and_resends_unacked_with_dup() {
    let router = router();
    let mut c = connect_packet(Protocol::V311, "keeper");
    c.clean_start = false;
    let (mut sub, ack) = open(&router, c.clone()).await;
    assert!(!ack.session_present);
    sub.subscribe("s/#", QoS::AtLeastOnce);
    let mut publisher = connect(&router, Protocol::V311, "pub").await;
    publisher.publish("s/1", b"sent", QoS::AtLeastOnce, 1);
    let got = sub.recv();
    let unacked = publishes(&got)[0].pkid;
    sub.close(Close::Lost);

    publisher.publish("s/2", b"queued", QoS::AtLeastOnce, 2);
    publisher.publish("s/3", b"qos0 skipped", QoS::AtMostOnce, 0);
    assert_eq!(router.stats().clients_connected, 1);
    assert_eq!(router.stats().sessions, 2);

    let (mut sub, ack) = open(&router, c).await;
    assert!(ack.session_present);
    let resent = sub.decode();
    let p = publishes(&resent);
    assert_eq!(
        (p[0].pkid, p[0].dup, &p[0].payload[..]),
        (unacked, true, &b"sent"[..])
    );
    assert_eq!(payloads(&sub.recv()), [b"queued"]);
}

#[tokio::test]
async fn clean_start_discards_the_old_session() {
    let router = router();
    let mut c = connect_packet(Protocol::V5, "x");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    let (mut sub, _) = open(&router, c.clone()).await;
    sub.subscribe("t", QoS::AtLeastOnce);
    sub.close(Close::Normal);
    c.clean_start = true;
    let (mut sub, ack) = open(&router, c).await;
    assert!(!ack.session_present);
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    publisher.publish("t", b"m", QoS::AtLeastOnce, 1);
    assert!(sub.recv().is_empty(), "old subscription gone");
    assert_eq!(router.stats().subscriptions, 0);
}

#[tokio::test]
async fn will_is_published_on_abnormal_close_only() {
    let router = router();
    let mut watcher = connect(&router, Protocol::V311, "watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce);
    for (why, expected) in [
        (Close::Normal, false),
        (Close::Kicked(Kick::Shutdown), false),
        (Close::Lost, true),
        (Close::WithWill, true),
        (Close::KeepAliveTimeout, true),
        (Close::Kicked(Kick::TakenOver), true),
        (Close::Protocol(ReasonCode::MALFORMED_PACKET), true),
    ] {
        let mut c = connect_packet(Protocol::V5, "mortal");
        c.will = Some(Will {
            topic: "will/mortal".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            ..Will::default()
        });
        let (mut client, _) = open(&router, c).await;
        client.close(why);
        let got = watcher.recv();
        assert_eq!(!got.is_empty(), expected, "{why:?}: {got:?}");
        for p in publishes(&got) {
            watcher.send(Packet::PubAck(Ack::new(p.pkid))).unwrap();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn will_delay_is_cancelled_by_resuming_the_session() {
    let router = router();
    let mut watcher = connect(&router, Protocol::V5, "watcher").await;
    watcher.subscribe("will", QoS::AtMostOnce);
    let mut c = connect_packet(Protocol::V5, "delayed");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(100);
    c.will = Some(Will {
        topic: "will".into(),
        payload: Bytes::from_static(b"late"),
        properties: Properties {
            will_delay_interval: Some(10),
            ..Properties::default()
        },
        ..Will::default()
    });
    let (mut client, _) = open(&router, c.clone()).await;
    client.close(Close::Lost);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(watcher.recv().is_empty(), "within the delay");
    let (mut client, _) = open(&router, c.clone()).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(watcher.recv().is_empty(), "resumed: cancelled");

    client.close(Close::Lost);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(payloads(&watcher.recv()), [b"late"]);
}

#[tokio::test]
async fn takeover_kicks_the_old_connection() {
    let router = router();
    let mut first = connect(&router, Protocol::V5, "same").await;
    let router2 = router.clone();
    let second = tokio::spawn(async move {
        let mut c = connect_packet(Protocol::V5, "same");
        c.clean_start = false;
        open(&router2, c).await
    });
    // The old connection notices on its next drain and lets go.
    let why = loop {
        tokio::task::yield_now().await;
        let mut out = BytesMut::new();
        if let Err(why) = first.conn().drain(&mut out, usize::MAX) {
            break why;
        }
    };
    assert_eq!(why, Close::Kicked(Kick::TakenOver));
    assert_eq!(why.reason(), Some(ReasonCode::SESSION_TAKEN_OVER));
    first.close(why);
    let (_, ack) = second.await.unwrap();
    assert_eq!(ack.code, ReasonCode::SUCCESS);
}

#[tokio::test]
async fn retained_messages_follow_retain_handling() {
    let router = router();
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    publisher.publish_with(Publish {
        retain: true,
        qos: QoS::AtLeastOnce,
        pkid: 1,
        topic: "r/a".into(),
        payload: Bytes::from_static(b"last"),
        ..Publish::default()
    });
    assert_eq!(router.stats().retained, 1);
    let mut sub = connect(&router, Protocol::V5, "sub").await;
    let opts = |rh| SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_handling: rh,
        ..Default::default()
    };
    sub.subscribe_with("r/+", opts(RetainHandling::SendAtSubscribe), 0);
    let got = sub.recv();
    let p = publishes(&got);
    assert_eq!((p.len(), p[0].retain), (1, true));
    sub.send(Packet::PubAck(Ack::new(p[0].pkid))).unwrap();
    sub.subscribe_with("r/+", opts(RetainHandling::SendIfNew), 0);
    assert!(sub.recv().is_empty(), "not new");
    sub.subscribe_with("r/#", opts(RetainHandling::DoNotSend), 0);
    assert!(sub.recv().is_empty());

    // A live retained message keeps its flag only with retain-as-published.
    publisher.publish_with(Publish {
        retain: true,
        topic: "r/a".into(),
        payload: Bytes::from_static(b"newer"),
        ..Publish::default()
    });
    let got = sub.recv();
    assert!(publishes(&got).iter().all(|p| !p.retain), "{got:?}");

    publisher.publish_with(Publish {
        retain: true,
        topic: "r/a".into(),
        ..Publish::default()
    });
    assert_eq!(router.stats().retained, 0, "empty payload clears");
}

#[tokio::test]
async fn no_local_skips_own_messages() {
    let router = router();
    let mut c = connect(&router, Protocol::V5, "echo").await;
    c.subscribe_with(
        "t",
        SubscriptionOptions {
            no_local: true,
            ..Default::default()
        },
        0,
    );
    c.publish("t", b"mine", QoS::AtMostOnce, 0);
    assert!(c.recv().is_empty());
    let mut other = connect(&router, Protocol::V5, "other").await;
    other.publish("t", b"theirs", QoS::AtMostOnce, 0);
    assert_eq!(payloads(&c.recv()), [b"theirs"]);
}

#[tokio::test]
async fn topic_aliases_map_inbound_topics() {
    let router = router();
    let mut sub = connect(&router, Protocol::V5, "sub").await;
    sub.subscribe("long/topic/name", QoS::AtMostOnce);
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    let with_alias = |topic: &str, payload: &'static [u8], alias| Publish {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        properties: Properties {
            topic_alias: Some(alias),
            ..Properties::default()
        },
        ..Publish::default()
    };
    publisher.publish_with(with_alias("long/topic/name", b"1", 3));
    publisher.publish_with(with_alias("", b"2", 3));
    let got = sub.recv();
    assert_eq!(payloads(&got), [b"1", b"2"]);
    assert!(publishes(&got)
        .iter()
        .all(|p| p.properties.topic_alias.is_none()));
    let unknown = publisher.send(Packet::Publish(with_alias("", b"3", 4)));
    assert_eq!(unknown, Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR)));
    let too_big = publisher.send(Packet::Publish(with_alias("x", b"4", 11)));
    assert_eq!(
        too_big,
        Err(Close::Protocol(ReasonCode::TOPIC_ALIAS_INVALID))
    );
}

#[tokio::test]
async fn v5_properties_pass_through() {
    let router = router();
    let mut sub = connect(&router, Protocol::V5, "sub").await;
    sub.subscribe("req", QoS::AtMostOnce);
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    let properties = Properties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        ..Properties::default()
    };
    publisher.publish_with(Publish {
        topic: "req".into(),
        payload: Bytes::from_static(b"?"),
        properties: properties.clone(),
        ..Publish::default()
    });
    let got = sub.recv();
    assert_eq!(publishes(&got)[0].properties, properties);
}

#[tokio::test(start_paused = true)]
async fn queued_messages_expire_and_the_interval_counts_down() {
    let router = router();
    let mut c = connect_packet(Protocol::V5, "slow");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(600);
    let (mut sub, _) = open(&router, c.clone()).await;
    sub.subscribe("e", QoS::AtLeastOnce);
    sub.close(Close::Lost);
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    for (payload, expiry) in [(&b"short"[..], 5), (&b"long"[..], 100)] {
        publisher.publish_with(Publish {
            qos: QoS::AtLeastOnce,
            pkid: 1,
            topic: "e".into(),
            payload: Bytes::from_static(payload),
            properties: Properties {
                message_expiry_interval: Some(expiry),
                ..Properties::default()
            },
            ..Publish::default()
        });
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (mut sub, _) = open(&router, c).await;
    let got = sub.recv();
    let p = publishes(&got);
    assert_eq!(payloads(&got), [b"long"]);
    assert_eq!(p[0].properties.message_expiry_interval, Some(70));
    assert_eq!(router.stats().expired, 1);
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_loses_messages_over_its_bound_only() {
    let config = BrokerConfig {
        max_queued_messages: 5,
        ..BrokerConfig::default()
    };
    let router = router_with(
        config,
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
    );
    let mut slow = connect(&router, Protocol::V311, "slow").await;
    slow.subscribe("f", QoS::AtLeastOnce);
    let mut fast = connect(&router, Protocol::V311, "fast").await;
    fast.subscribe("f", QoS::AtLeastOnce);
    let mut publisher = connect(&router, Protocol::V311, "pub").await;
    for i in 0..10u16 {
        assert_eq!(
            publisher.publish("f", b"m", QoS::AtLeastOnce, i + 1),
            [Packet::PubAck(Ack::new(i + 1))]
        );
        let got = fast.recv();
        for p in publishes(&got) {
            fast.send(Packet::PubAck(Ack::new(p.pkid))).unwrap();
        }
        assert_eq!(publishes(&got).len(), 1);
    }
    assert_eq!(router.stats().dropped, 5);
    assert_eq!(publishes(&slow.recv()).len(), 5);
}

#[tokio::test]
async fn shared_subscriptions_take_turns() {
    let router = router();
    let mut a = connect(&router, Protocol::V5, "a").await;
    let mut b = connect(&router, Protocol::V5, "b").await;
    a.subscribe("$share/g/jobs/+", QoS::AtMostOnce);
    b.subscribe("$share/g/jobs/+", QoS::AtMostOnce);
    assert_eq!(
        a.subscribe("$share/g", QoS::AtMostOnce),
        [ReasonCode::TOPIC_FILTER_INVALID]
    );
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    for _ in 0..4 {
        publisher.publish("jobs/x", b"j", QoS::AtMostOnce, 0);
    }
    assert_eq!((a.recv().len(), b.recv().len()), (2, 2));
}

#[tokio::test]
async fn acl_and_protected_topics_refuse_with_reason_codes() {
    let policy = Policy {
        anonymous_allowed: true,
        acl: Some(Acl::parse("topic read sensors/#\ntopic readwrite lab/#\n").unwrap()),
        protected: vec!["sensors/gw".into()],
        ..Policy::default()
    };
    let router = router_with(BrokerConfig::default(), policy);
    let mut c = connect(&router, Protocol::V5, "lan").await;
    assert_eq!(
        c.subscribe("secret/#", QoS::AtMostOnce),
        [ReasonCode::NOT_AUTHORIZED]
    );
    assert_eq!(
        c.subscribe("sensors/#", QoS::AtMostOnce),
        [ReasonCode::GRANTED_QOS_0]
    );
    let ack = c.publish("sensors/gw/t", b"spoof", QoS::AtLeastOnce, 1);
    assert!(
        matches!(&ack[..], [Packet::PubAck(a)] if a.reason == ReasonCode::NOT_AUTHORIZED
            && a.properties.reason_string.as_deref()
                == Some("not authorized to publish to this topic")),
        "{ack:?}"
    );
    let rec = c.publish("sensors/gw/t", b"spoof", QoS::ExactlyOnce, 2);
    assert!(
        matches!(&rec[..], [Packet::PubRec(a)] if a.reason == ReasonCode::NOT_AUTHORIZED),
        "{rec:?}"
    );
    assert!(c.recv().is_empty(), "nothing delivered");
    assert_eq!(router.stats().denied, 2);
    let ok = c.publish("lab/x", b"fine", QoS::AtLeastOnce, 3);
    assert!(
        matches!(&ok[..], [Packet::PubAck(a)] if a.reason.is_success()),
        "{ok:?}"
    );
}

#[tokio::test]
async fn connect_refusals() {
    let router = router_with(
        BrokerConfig {
            max_keep_alive: Some(60),
            ..BrokerConfig::default()
        },
        Policy::default(),
    );
    // Anonymous not allowed by this policy.
    let (c, ack) = open(&router, connect_packet(Protocol::V5, "anon")).await;
    assert!(c.conn.is_none());
    assert_eq!(ack.code, ReasonCode::NOT_AUTHORIZED);

    let router = router_with(
        BrokerConfig {
            max_keep_alive: Some(60),
            ..BrokerConfig::default()
        },
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
    );
    let mut c = connect_packet(Protocol::V311, "");
    c.clean_start = false;
    let (_, ack) = open(&router, c).await;
    assert_eq!(ack.code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);

    let mut c = connect_packet(Protocol::V5, "");
    c.keep_alive = 600;
    let (client, ack) = open(&router, c).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(ack.properties.assigned_client_identifier.is_some());
    assert_eq!(ack.properties.server_keep_alive, Some(60));
    let mailbox = client.conn.as_ref().unwrap().mailbox();
    assert!(!mailbox.keep_alive_expired(router.now_ms() + 89_000));
    assert!(
        mailbox.keep_alive_expired(router.now_ms() + 90_000),
        "1.5 × the server's 60 s"
    );

    let mut c = connect_packet(Protocol::V311, "slowpoke");
    c.keep_alive = 600;
    let (_, ack) = open(&router, c).await;
    assert_eq!(
        ack.code,
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        "3.1.1 cannot be told"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_sessions_end_and_leave_the_tree() {
    let router = router();
    let mut c = connect_packet(Protocol::V5, "brief");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(10);
    let (mut sub, _) = open(&router, c).await;
    sub.subscribe("x/#", QoS::AtLeastOnce);
    sub.close(Close::Normal);
    router.housekeeping(tokio::time::Instant::now());
    assert_eq!(
        (router.stats().sessions, router.stats().subscriptions),
        (1, 1)
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    router.housekeeping(tokio::time::Instant::now());
    assert_eq!(
        (router.stats().sessions, router.stats().subscriptions),
        (0, 0)
    );
}

#[tokio::test]
async fn protocol_violations_close_with_a_reason() {
    let router = router();
    let mut c = connect(&router, Protocol::V5, "rude").await;
    assert_eq!(
        c.send(Packet::Connect(Connect::default())),
        Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR))
    );
    let mut out = BytesMut::new();
    c.conn()
        .goodbye(Close::Protocol(ReasonCode::PROTOCOL_ERROR), None, &mut out);
    let d = decode(&mut out, Protocol::V5, usize::MAX).unwrap();
    assert!(matches!(d, Some(Packet::Disconnect(d)) if d.reason == ReasonCode::PROTOCOL_ERROR));
    // Session expiry may not be raised from zero at DISCONNECT.
    let raise = Disconnect {
        properties: Properties {
            session_expiry_interval: Some(5),
            ..Properties::default()
        },
        ..Disconnect::default()
    };
    assert_eq!(
        c.send(Packet::Disconnect(raise)),
        Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR))
    );
}

#[tokio::test(start_paused = true)]
async fn keepalive_runs_out_at_one_and_a_half_times_its_value() {
    let router = router();
    let mut c = connect_packet(Protocol::V5, "sleepy");
    c.keep_alive = 10;
    let (mut client, _) = open(&router, c).await;
    let tick = |router: &Router| router.housekeeping(tokio::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(14)).await;
    tick(&router);
    assert!(client.recv().is_empty(), "alive at 14 s");
    client.conn().touch();
    tokio::time::sleep(Duration::from_secs(14)).await;
    tick(&router);
    assert!(client.recv().is_empty(), "a packet restarted the clock");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    tick(&router);
    let mut out = BytesMut::new();
    let why = client.conn().drain(&mut out, usize::MAX).unwrap_err();
    assert_eq!(why, Close::KeepAliveTimeout);
    assert_eq!(why.reason(), Some(ReasonCode::KEEP_ALIVE_TIMEOUT));
}

fn persistent_router(path: &std::path::Path) -> Arc<Router> {
    let (persister, loaded) =
        super::persist::Persister::open(path, Duration::from_millis(100)).unwrap();
    let router = Arc::new(Router::new(
        Settings::from_config(&BrokerConfig::default()),
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
        Some(persister),
    ));
    router.restore(loaded);
    router
}

/// A 5.0 session "durable" (expiry 600 s) subscribed to `d/#` at QoS 2, sent `m1`..`m4`
/// at `qos` and holding them unacknowledged but for `m1`, whose PUBREC it sent (so
/// `m1` waits for PUBCOMP). Returns its CONNECT, the client, the publisher and the
/// packet ids of `m1`..`m4`.
async fn durable_with_flows(
    router: &Arc<Router>,
    qos: [QoS; 4],
) -> (Connect, Client, Client, Vec<u16>) {
    let mut c = connect_packet(Protocol::V5, "durable");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(600);
    let (mut sub, _) = open(router, c.clone()).await;
    sub.subscribe("d/#", QoS::ExactlyOnce);
    let mut publisher = connect(router, Protocol::V5, "pub").await;
    for (i, qos) in qos.into_iter().enumerate() {
        let payload: &'static [u8] = [b"m1", b"m2", b"m3", b"m4"][i];
        publisher.publish("d/x", payload, qos, i as u16 + 1);
    }
    let sent = sub.recv();
    let pkids: Vec<u16> = publishes(&sent).iter().map(|p| p.pkid).collect();
    assert_eq!(pkids.len(), 4);
    sub.send(Packet::PubRec(Ack::new(pkids[0]))).unwrap();
    assert_eq!(sub.decode(), [Packet::PubRel(Ack::new(pkids[0]))]);
    (c, sub, publisher, pkids)
}

/// Regression guard for the restart path: messages in every flow state, inbound QoS 2
/// ids and retained properties come back from the SQLite file as they were.
#[tokio::test]
async fn a_restart_keeps_every_flow_state_of_a_persistent_session() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.db");
    let router = persistent_router(&path);
    let qos = [
        QoS::ExactlyOnce,
        QoS::ExactlyOnce,
        QoS::ExactlyOnce,
        QoS::AtLeastOnce,
    ];
    let (c, mut sub, mut publisher, pkids) = durable_with_flows(&router, qos).await;
    // Inbound QoS 2 from the subscriber, not yet released.
    sub.publish("elsewhere", b"in", QoS::ExactlyOnce, 77);
    sub.close(Close::Lost);
    publisher.publish("d/x", b"m5", QoS::AtLeastOnce, 9);
    publisher.publish_with(Publish {
        retain: true,
        qos: QoS::AtLeastOnce,
        pkid: 10,
        topic: "d/retained".into(),
        payload: Bytes::from_static(b"r"),
        properties: Properties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("unit".into(), "°C".into())],
            message_expiry_interval: Some(3600),
            ..Properties::default()
        },
        ..Publish::default()
    });
    publisher.close(Close::Normal);
    // The retained message also went to the offline subscriber's queue, after m5.
    router.persist_and_close();
    drop(router);

    let router = persistent_router(&path);
    assert_eq!(router.stats().sessions, 1);
    assert_eq!(router.stats().retained, 1);
    let (mut sub, ack) = open(&router, c).await;
    assert!(ack.session_present);
    let resent = sub.decode();
    assert_eq!(resent[0], Packet::PubRel(Ack::new(pkids[0])));
    let again = publishes(&resent);
    let dup: Vec<(u16, bool, &[u8])> = again
        .iter()
        .map(|p| (p.pkid, p.dup, &p.payload[..]))
        .collect();
    assert_eq!(
        dup,
        [
            (pkids[1], true, &b"m2"[..]),
            (pkids[2], true, &b"m3"[..]),
            (pkids[3], true, &b"m4"[..])
        ]
    );
    assert_eq!(payloads(&sub.recv()), [&b"m5"[..], &b"r"[..]]);
    sub.send(Packet::PubRel(Ack::new(77))).unwrap();
    assert_eq!(
        sub.decode(),
        [Packet::PubComp(Ack::new(77))],
        "inbound id kept"
    );

    let mut late = connect(&router, Protocol::V5, "late").await;
    late.subscribe("d/retained", QoS::AtLeastOnce);
    let got = late.recv();
    let r = publishes(&got)[0];
    assert!(r.retain);
    assert_eq!(r.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        r.properties.user_properties,
        [("unit".to_string(), "°C".to_string())]
    );
    let left = r.properties.message_expiry_interval.unwrap();
    assert!((3590..=3600).contains(&left), "{left}");
}

#[tokio::test]
async fn subscriptions_and_retained_messages_are_bounded() {
    let router = router_with(
        BrokerConfig {
            max_subscriptions_per_client: 2,
            max_retained_messages: 2,
            ..BrokerConfig::default()
        },
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
    );
    let mut c = connect(&router, Protocol::V5, "greedy").await;
    assert_eq!(
        c.subscribe("a", QoS::AtMostOnce),
        [ReasonCode::GRANTED_QOS_0]
    );
    assert_eq!(
        c.subscribe("b", QoS::AtMostOnce),
        [ReasonCode::GRANTED_QOS_0]
    );
    assert_eq!(
        c.subscribe("c", QoS::AtMostOnce),
        [ReasonCode::QUOTA_EXCEEDED]
    );
    assert_eq!(
        c.subscribe("a", QoS::AtLeastOnce),
        [ReasonCode::GRANTED_QOS_1],
        "replacing is fine"
    );

    let retain = |topic: &str| Publish {
        retain: true,
        topic: topic.into(),
        payload: Bytes::from_static(b"v"),
        ..Publish::default()
    };
    for topic in ["r/1", "r/2", "r/3", "r/1"] {
        c.publish_with(retain(topic));
    }
    let stats = router.stats();
    assert_eq!(
        (stats.retained, stats.retained_refused),
        (2, 1),
        "r/3 not kept, r/1 updated"
    );
}

/// A TLS listener that cannot read its certificate says so and keeps the I/O error as
/// the source (it used to be flattened into a string).
#[test]
fn tls_error_keeps_the_io_error_as_source() {
    use std::error::Error as _;
    let tls = super::TlsListenerConfig {
        cert_file: "/nonexistent/fieldbridge/cert.pem".into(),
        key_file: "/nonexistent/fieldbridge/key.pem".into(),
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 8883));
    let Err(err) = super::tls_acceptor(addr, &tls) else {
        panic!("a missing certificate file was accepted");
    };
    assert_eq!(
        err.to_string(),
        "TLS listener 127.0.0.1:8883: cannot read /nonexistent/fieldbridge/cert.pem: \
         No such file or directory (os error 2)"
    );
    let tls_error = err.source().expect("the TLS error is the source");
    let io = tls_error.source().expect("the I/O error is kept");
    assert!(io.downcast_ref::<std::io::Error>().is_some());
}

/// A waker that remembers being woken.
#[derive(Default)]
struct Woken(std::sync::atomic::AtomicBool);

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn acl_policy(rules: &str) -> Policy {
    Policy {
        anonymous_allowed: true,
        acl: Some(Acl::parse(rules).unwrap()),
        ..Policy::default()
    }
}

/// Regression: an ACL grant withdrawn by a reload kept delivering to a connection
/// subscribed before it.
#[tokio::test]
async fn a_reload_withdraws_subscriptions_and_queued_messages_the_acl_no_longer_grants() {
    let rules = "topic readwrite sensors/#\ntopic readwrite lab/#\n";
    let router = router_with(BrokerConfig::default(), acl_policy(rules));
    let mut sub = connect(&router, Protocol::V5, "reader").await;
    sub.subscribe("sensors/#", QoS::AtLeastOnce);
    sub.subscribe("lab/#", QoS::AtLeastOnce);
    let mut publisher = connect(&router, Protocol::V5, "writer").await;
    publisher.publish("sensors/queued", b"queued before", QoS::AtLeastOnce, 1);
    assert_eq!(router.stats().subscriptions, 2);

    let woken = Arc::new(Woken::default());
    let waker = std::task::Waker::from(woken.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(sub
        .conn()
        .mailbox()
        .poll_ready(&mut cx, true, false)
        .is_pending());
    router.set_policy(acl_policy("topic readwrite lab/#\n"));
    assert!(
        woken.0.load(std::sync::atomic::Ordering::SeqCst),
        "the reload wakes the connection"
    );
    publisher.publish("lab/x", b"still granted", QoS::AtLeastOnce, 2);
    assert_eq!(payloads(&sub.recv()), [b"still granted"]);
    assert_eq!(router.stats().subscriptions, 1, "sensors/# left the tree");
    publisher.publish("sensors/after", b"after", QoS::AtLeastOnce, 3);
    assert!(sub.recv().is_empty());
}

/// A parked session picks up a reload when it comes back.
#[tokio::test]
async fn a_resumed_session_is_checked_against_the_acl_in_force() {
    let rules = "topic readwrite sensors/#\ntopic readwrite lab/#\n";
    let router = router_with(BrokerConfig::default(), acl_policy(rules));
    let mut c = connect_packet(Protocol::V311, "keeper");
    c.clean_start = false;
    let (mut sub, _) = open(&router, c.clone()).await;
    sub.subscribe("sensors/#", QoS::AtLeastOnce);
    sub.subscribe("lab/#", QoS::AtLeastOnce);
    sub.close(Close::Lost);
    let mut publisher = connect(&router, Protocol::V311, "writer").await;
    publisher.publish("sensors/a", b"queued offline", QoS::AtLeastOnce, 1);
    publisher.publish("lab/a", b"lab offline", QoS::AtLeastOnce, 2);

    router.set_policy(acl_policy("topic readwrite lab/#\n"));
    let (mut sub, ack) = open(&router, c).await;
    assert!(ack.session_present);
    assert_eq!(payloads(&sub.recv()), [b"lab offline"]);
    assert_eq!(router.stats().subscriptions, 1);
}

/// Regression: a user removed from the password file by a reload stayed connected.
#[tokio::test]
async fn a_reload_ends_connections_whose_credentials_it_withdrew() {
    let passwords = |lines: &[&str]| Policy {
        passwords: Some(super::auth::PasswordFile::parse(&lines.join("\n")).unwrap()),
        ..Policy::default()
    };
    let (alice_line, bob_line) = (passwd_line("alice", "a"), passwd_line("bob", "b"));
    let router = router_with(
        BrokerConfig::default(),
        passwords(&[&alice_line, &bob_line]),
    );
    let login = |protocol, user: &str, password: &str| {
        let mut c = connect_packet(protocol, user);
        c.username = Some(user.into());
        c.password = Some(Bytes::copy_from_slice(password.as_bytes()));
        c
    };
    let (mut alice, ack) = open(&router, login(Protocol::V5, "alice", "a")).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    let (mut bob, _) = open(&router, login(Protocol::V311, "bob", "b")).await;

    // bob's line is unchanged, alice's is gone.
    router.set_policy(passwords(&[&bob_line]));
    let mut out = BytesMut::new();
    assert_eq!(
        alice.conn().drain(&mut out, usize::MAX),
        Err(Close::Revoked)
    );
    alice.conn().goodbye(Close::Revoked, None, &mut out);
    alice.out = out;
    assert!(
        matches!(&alice.decode()[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::NOT_AUTHORIZED),
        "a 5.0 client is told"
    );
    alice.close(Close::Revoked);
    assert!(bob.recv().is_empty(), "bob stays connected");

    // A changed password ends the connection too.
    router.set_policy(passwords(&[&passwd_line("bob", "b2")]));
    let mut out = BytesMut::new();
    assert_eq!(bob.conn().drain(&mut out, usize::MAX), Err(Close::Revoked));
}

/// What a kill -9 leaves: the persistence file (and its WAL) as they are once the
/// writer has committed, copied aside while nothing else is written.
fn crash_image(
    path: &std::path::Path,
    router: &Router,
    into: &std::path::Path,
) -> std::path::PathBuf {
    router.persister().expect("persistent").flush();
    let image = into.join("crashed.db");
    for suffix in ["", "-wal"] {
        let from = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            std::fs::copy(&from, format!("{}{suffix}", image.display())).unwrap();
        }
    }
    image
}

/// Opens `id`'s persistent session, subscribes it to `t/#` at QoS 1 and leaves it
/// offline.
async fn park(router: &Arc<Router>, protocol: Protocol, id: &str) {
    let mut c = connect_packet(protocol, id);
    c.clean_start = false;
    if protocol == Protocol::V5 {
        c.properties.session_expiry_interval = Some(600);
    }
    let (mut sub, _) = open(router, c).await;
    sub.subscribe("t/#", QoS::AtLeastOnce);
    sub.close(Close::Normal);
}

async fn resume(router: &Arc<Router>, protocol: Protocol, id: &str) -> Client {
    let mut c = connect_packet(protocol, id);
    c.clean_start = false;
    if protocol == Protocol::V5 {
        c.properties.session_expiry_interval = Some(600);
    }
    let (client, ack) = open(router, c).await;
    assert!(ack.session_present, "{id} was not kept");
    client
}

/// Regression test for issue 11, part 2 (queues lost on kill -9): every flow state of
/// a persistent session is in the file as it changes, with no shutdown snapshot.
#[tokio::test]
async fn a_crash_keeps_every_flow_state_of_a_persistent_session() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.db");
    let router = persistent_router(&path);
    let qos = [
        QoS::ExactlyOnce,
        QoS::ExactlyOnce,
        QoS::AtLeastOnce,
        QoS::AtLeastOnce,
    ];
    let (c, mut sub, mut publisher, pkids) = durable_with_flows(&router, qos).await;
    sub.send(Packet::PubAck(Ack::new(pkids[2]))).unwrap();
    sub.close(Close::Lost);
    publisher.publish("d/x", b"m5", QoS::AtLeastOnce, 9);
    let image = crash_image(&path, &router, dir.path());

    let crashed = persistent_router(&image);
    let (mut sub, ack) = open(&crashed, c).await;
    assert!(ack.session_present);
    let resent = sub.decode();
    assert_eq!(resent[0], Packet::PubRel(Ack::new(pkids[0])), "released m1");
    let dup: Vec<(u16, bool, &[u8])> = publishes(&resent)
        .iter()
        .map(|p| (p.pkid, p.dup, &p.payload[..]))
        .collect();
    assert_eq!(
        dup,
        [(pkids[1], true, &b"m2"[..]), (pkids[3], true, &b"m4"[..])],
        "m3 was acknowledged"
    );
    assert_eq!(payloads(&sub.recv()), [&b"m5"[..]]);
}

/// The file holds what is still owed: acknowledged messages leave it, and a restart
/// reads it without deleting anything.
#[tokio::test]
async fn acknowledged_messages_leave_the_file_and_a_restart_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.db");
    let rows = |path: &std::path::Path| -> i64 {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row("SELECT count(*) FROM queued", [], |r| r.get(0))
            .unwrap()
    };
    let router = persistent_router(&path);
    park(&router, Protocol::V311, "keeper").await;
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    for pkid in 1..=5 {
        publisher.publish("t/a", b"v", QoS::AtLeastOnce, pkid);
    }
    router.persister().unwrap().flush();
    assert_eq!(rows(&path), 5);
    router.persist_and_close();
    drop(router);

    let router = persistent_router(&path);
    assert_eq!(rows(&path), 5, "loading keeps the rows");
    let mut sub = resume(&router, Protocol::V311, "keeper").await;
    let got = sub.recv();
    let pkids: Vec<u16> = publishes(&got).iter().map(|p| p.pkid).collect();
    assert_eq!(pkids.len(), 5);
    for pkid in &pkids[..3] {
        sub.send(Packet::PubAck(Ack::new(*pkid))).unwrap();
    }
    router.persister().unwrap().flush();
    assert_eq!(rows(&path), 2, "the unacknowledged two stay");
    sub.close(Close::Normal);
    router.persist_and_close();
}

fn offline_budget_config(policy: super::config::QueuePolicy) -> BrokerConfig {
    BrokerConfig {
        // Room for about four queued copies of a small message, all sessions together.
        max_queued_bytes_total: 4 * (std::mem::size_of::<super::session::Delivery>() + 8),
        max_queued_bytes: 64,
        queue_budget_policy: policy,
        ..BrokerConfig::default()
    }
}

/// Issue 11, part 3: offline sessions share one byte budget; what it drops is
/// counted, and an online subscriber still gets every message.
#[tokio::test]
async fn the_queue_budget_bounds_offline_sessions_and_spares_online_ones() {
    use super::config::QueuePolicy;
    for policy in [QueuePolicy::DropOldest, QueuePolicy::DropNewest] {
        let router = router_with(
            offline_budget_config(policy),
            Policy {
                anonymous_allowed: true,
                ..Policy::default()
            },
        );
        let mut live = connect(&router, Protocol::V311, "live").await;
        live.subscribe("t/#", QoS::AtLeastOnce);
        park(&router, Protocol::V311, "away1").await;
        park(&router, Protocol::V311, "away2").await;
        let mut publisher = connect(&router, Protocol::V5, "pub").await;
        let values: [&'static [u8]; 4] = [b"1", b"2", b"3", b"4"];
        let mut got = Vec::new();
        for (i, v) in values.into_iter().enumerate() {
            publisher.publish("t/a", v, QoS::AtLeastOnce, i as u16 + 1);
            for p in publishes(&live.recv()) {
                got.push(p.payload.clone());
                live.send(Packet::PubAck(Ack::new(p.pkid))).unwrap();
            }
        }
        assert_eq!(
            got, values,
            "{policy:?}: the online subscriber gets everything"
        );
        let stats = router.stats();
        assert!(stats.queued_bytes <= offline_budget_config(policy).max_queued_bytes_total);
        assert!(stats.dropped_budget >= 3, "{policy:?}: {stats:?}");
        let mut first = resume(&router, Protocol::V311, "away1").await;
        let kept = payloads(&first.recv())
            .iter()
            .map(|p| p.to_vec())
            .collect::<Vec<_>>();
        match policy {
            QueuePolicy::DropOldest => assert_eq!(kept.last().map(Vec::as_slice), Some(&b"4"[..])),
            QueuePolicy::DropNewest => assert_eq!(kept.first().map(Vec::as_slice), Some(&b"1"[..])),
        }
    }
}

/// Issue 11, part 3: at most `max_sessions` offline sessions; the one offline longest
/// ends first, counted with the messages it held.
#[tokio::test]
async fn max_sessions_ends_the_session_offline_longest() {
    let router = router_with(
        BrokerConfig {
            max_sessions: 2,
            ..BrokerConfig::default()
        },
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
    );
    park(&router, Protocol::V311, "s1").await;
    park(&router, Protocol::V5, "s2").await;
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    publisher.publish("t/a", b"v", QoS::AtLeastOnce, 1);
    // s2 comes and goes again: s1 is now the one offline longest.
    resume(&router, Protocol::V5, "s2")
        .await
        .close(Close::Normal);
    park(&router, Protocol::V311, "s3").await;
    let stats = router.stats();
    assert_eq!(
        (stats.sessions, stats.sessions_evicted),
        (3, 1),
        "{stats:?}"
    );
    assert_eq!(stats.dropped_with_sessions, 1, "s1's queued message");
    let mut c = connect_packet(Protocol::V311, "s1");
    c.clean_start = false;
    let (_, ack) = open(&router, c).await;
    assert!(!ack.session_present, "s1 went first");
    resume(&router, Protocol::V5, "s2").await;
}

/// A writer for captured log lines.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Issue 11, part 3: a 3.1.1 persistent session ends after `v311_session_expiry_secs`
/// offline, and expiring 20,000 of them at once is one log line.
#[tokio::test(start_paused = true)]
async fn offline_311_sessions_expire_by_default_with_one_summary_line() {
    let router = router_with(
        BrokerConfig {
            v311_session_expiry_secs: 3600,
            max_sessions: 50_000,
            ..BrokerConfig::default()
        },
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
    );
    const N: usize = 20_000;
    for i in 0..N {
        park(&router, Protocol::V311, &format!("abandoned-{i}")).await;
    }
    assert_eq!(router.stats().sessions, N);
    tokio::time::advance(Duration::from_secs(3599)).await;
    router.housekeeping(tokio::time::Instant::now());
    assert_eq!(router.stats().sessions, N, "not before the expiry");
    tokio::time::advance(Duration::from_secs(2)).await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        router.housekeeping(tokio::time::Instant::now());
    });
    let stats = router.stats();
    assert_eq!((stats.sessions, stats.sessions_expired), (0, N as u64));
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("sessions=20000"), "{}", lines[0]);
}

/// Found by scripts/broker-memory-abuse.sh: the retained messages a subscriber gets on
/// subscribe bypass the bounds, so 2,000 clients that subscribe to the readings and
/// leave held 2,000 copies of every retained reading. Once offline they are held to
/// the budget.
#[tokio::test]
async fn retained_messages_queued_on_subscribe_are_held_to_the_budget_once_offline() {
    let config = offline_budget_config(super::config::QueuePolicy::DropNewest);
    let router = router_with(
        config.clone(),
        Policy {
            anonymous_allowed: true,
            ..Policy::default()
        },
    );
    let mut publisher = connect(&router, Protocol::V5, "pub").await;
    for topic in ["t/1", "t/2", "t/3", "t/4", "t/5", "t/6", "t/7", "t/8"] {
        publisher.publish_with(Publish {
            retain: true,
            qos: QoS::AtLeastOnce,
            pkid: 1,
            topic: topic.into(),
            payload: Bytes::from_static(b"v"),
            ..Publish::default()
        });
    }
    for id in ["leaver1", "leaver2", "leaver3"] {
        park(&router, Protocol::V311, id).await;
    }
    let stats = router.stats();
    assert!(
        stats.queued_bytes <= config.max_queued_bytes_total,
        "{} queued bytes over a budget of {}",
        stats.queued_bytes,
        config.max_queued_bytes_total
    );
    assert!(stats.dropped_budget >= 3 * 8 - 4, "{stats:?}");
}

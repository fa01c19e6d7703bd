//! Captures of mosquitto_pub / mosquitto_sub talking to a hand-driven server.
//!
//! The test plays the broker over a raw TCP socket: it decodes what the client sends,
//! answers with packets from our encoder (CONNACK, PUBACK, SUBACK, ...) so the client
//! proceeds, and finally checks that the client exited successfully. Each client
//! packet must decode to the expected value and re-encode to exactly the bytes the
//! client sent.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fieldbridge::mqtt::*;

use crate::common::util::{tool, wait_for};

const MAX: usize = 1 << 20;

/// A client run: arguments, the packets it must send, and its expected output.
struct Scenario {
    name: &'static str,
    program: &'static str,
    args: Vec<String>,
    expected: Vec<Packet>,
    stdout: &'static str,
    /// mosquitto_sub -U sends UNSUBSCRIBE right after SUBSCRIBE and exits once the
    /// SUBACK is in; holding the SUBACK until the UNSUBSCRIBE arrived fixes the order.
    hold_suback: bool,
}

/// One packet as the client sent it.
struct Captured {
    raw: Vec<u8>,
    packet: Packet,
}

/// The server's answer to a client packet.
fn respond(packet: &Packet, version: Protocol, hold_suback: bool) -> Vec<Packet> {
    match packet {
        Packet::Subscribe(_) if hold_suback => vec![],
        // UNSUBACK first: mosquitto_sub -E disconnects as soon as the SUBACK is in.
        Packet::Unsubscribe(u) if hold_suback => vec![
            Packet::UnsubAck(UnsubAck {
                pkid: u.pkid,
                reasons: match version {
                    Protocol::V5 => vec![ReasonCode::SUCCESS; u.filters.len()],
                    Protocol::V311 => Vec::new(),
                },
                properties: Properties::default(),
            }),
            Packet::SubAck(SubAck {
                pkid: 1,
                reasons: vec![ReasonCode::GRANTED_QOS_0],
                properties: Properties::default(),
            }),
        ],
        Packet::Connect(_) => vec![Packet::ConnAck(ConnAck::default())],
        Packet::Publish(p) => match p.qos {
            QoS::AtMostOnce => vec![],
            QoS::AtLeastOnce => vec![Packet::PubAck(Ack::new(p.pkid))],
            QoS::ExactlyOnce => vec![Packet::PubRec(Ack::new(p.pkid))],
        },
        Packet::PubRel(a) => vec![Packet::PubComp(Ack::new(a.pkid))],
        Packet::Subscribe(s) => vec![Packet::SubAck(SubAck {
            pkid: s.pkid,
            reasons: s
                .filters
                .iter()
                .map(|f| ReasonCode(f.options.qos as u8))
                .collect(),
            properties: Properties::default(),
        })],
        Packet::Unsubscribe(u) => vec![Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons: match version {
                Protocol::V5 => vec![ReasonCode::SUCCESS; u.filters.len()],
                Protocol::V311 => Vec::new(),
            },
            properties: Properties::default(),
        })],
        // The keepalive scenario: answer the ping, then deliver one message so that
        // mosquitto_sub -C 1 exits.
        Packet::PingReq => vec![
            Packet::PingResp,
            Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                pkid: 42,
                topic: "ping/after".into(),
                payload: Bytes::from_static(b"pong"),
                properties: match version {
                    Protocol::V5 => Properties {
                        content_type: Some("text/plain".into()),
                        ..Properties::default()
                    },
                    Protocol::V311 => Properties::default(),
                },
                ..Publish::default()
            }),
        ],
        _ => vec![],
    }
}

/// Kills the client if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the client against a one-connection server and returns what it sent.
fn capture(s: &Scenario) -> Vec<Captured> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let child = Command::new(tool(s.program, "mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(&s.args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut child = KillOnDrop(child);
    let child = &mut child.0;
    let (mut stream, _) = wait_for(
        &format!("{} to connect", s.name),
        Duration::from_secs(10),
        || listener.accept().ok(),
    );
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut buf = BytesMut::new();
    let mut version = Protocol::V311;
    let mut captured = Vec::new();
    let mut chunk = [0u8; 4096];
    'read: loop {
        let n = stream.read(&mut chunk).expect("read from client");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(header) = check(&buf, MAX).expect("valid fixed header") {
            let raw = buf.get(..header.packet_len()).map(<[u8]>::to_vec);
            let Some(packet) = decode(&mut buf, version, MAX)
                .unwrap_or_else(|e| panic!("{}: decode failed: {e}", s.name))
            else {
                break;
            };
            if let Packet::Connect(c) = &packet {
                version = c.protocol;
            }
            let mut out = BytesMut::new();
            for reply in respond(&packet, version, s.hold_suback) {
                encode(&reply, version, &mut out).expect("encode reply");
            }
            stream.write_all(&out).expect("write reply");
            let done = matches!(packet, Packet::Disconnect(_));
            captured.push(Captured {
                raw: raw.expect("whole packet was buffered"),
                packet,
            });
            if done {
                break 'read;
            }
        }
    }
    let status = wait_for(
        &format!("{} to exit", s.name),
        Duration::from_secs(10),
        || child.try_wait().expect("wait"),
    );
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).expect("stdout");
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr).expect("stderr");
    }
    assert!(status.success(), "{} failed: {status} {stderr}", s.name);
    assert_eq!(stdout, s.stdout, "{} printed", s.name);
    captured
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mqtt")
        .join(format!("{name}.bin"))
}

/// Each packet must be exactly what we expect and re-encode to the client's bytes.
fn assert_matches_expected(name: &str, captured: &[Captured], expected: &[Packet]) {
    let packets: Vec<&Packet> = captured.iter().map(|c| &c.packet).collect();
    let expected: Vec<&Packet> = expected.iter().collect();
    assert_eq!(packets, expected, "{name}");
    let mut version = Protocol::V311;
    for c in captured {
        if let Packet::Connect(connect) = &c.packet {
            version = connect.protocol;
        }
        let mut out = BytesMut::new();
        encode(&c.packet, version, &mut out).expect("re-encode");
        assert_eq!(out.to_vec(), c.raw, "{name}: re-encoding {:?}", c.packet);
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn props(f: impl FnOnce(&mut Properties)) -> Properties {
    let mut p = Properties::default();
    f(&mut p);
    p
}

fn connect(protocol: Protocol, client_id: &str, keep_alive: u16) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive,
        client_id: client_id.into(),
        ..Connect::default()
    }
}

fn subscribe_all_sensors() -> Packet {
    Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![Subscription {
            filter: "sensors/#".into(),
            options: SubscriptionOptions::default(),
        }],
        properties: Properties::default(),
    })
}

fn scenarios() -> Vec<Scenario> {
    let pub311 = |qos: &str, name: &'static str| Scenario {
        name,
        program: "mosquitto_pub",
        args: args(&[
            "-V",
            "mqttv311",
            "-i",
            name,
            "-k",
            "30",
            "-u",
            "user",
            "-P",
            "pass",
            "--will-topic",
            "will/pub",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
            "--will-retain",
            "-t",
            "sensors/t1",
            "-m",
            "21.5",
            "-q",
            qos,
            "-r",
        ]),
        expected: vec![
            Packet::Connect(Connect {
                will: Some(Will {
                    topic: "will/pub".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Properties::default(),
                }),
                username: Some("user".into()),
                password: Some(Bytes::from_static(b"pass")),
                ..connect(Protocol::V311, name, 30)
            }),
            Packet::Publish(Publish {
                qos: QoS::from_u8(qos.parse().expect("qos")).expect("qos"),
                pkid: u16::from(qos != "0"),
                retain: true,
                topic: "sensors/t1".into(),
                payload: Bytes::from_static(b"21.5"),
                ..Publish::default()
            }),
        ]
        .into_iter()
        .chain((qos == "2").then(|| Packet::PubRel(Ack::new(1))))
        .chain([Packet::Disconnect(Disconnect::default())])
        .collect(),
        stdout: "",
        hold_suback: false,
    };
    let pub5 = |qos: &str, name: &'static str| Scenario {
        name,
        program: "mosquitto_pub",
        args: args(&[
            "-V",
            "mqttv5",
            "-i",
            name,
            "-D",
            "connect",
            "session-expiry-interval",
            "120",
            "-D",
            "connect",
            "receive-maximum",
            "20",
            "-D",
            "connect",
            "topic-alias-maximum",
            "5",
            "-D",
            "connect",
            "user-property",
            "site",
            "plant-1",
            "-D",
            "connect",
            "maximum-packet-size",
            "65536",
            "-u",
            "user",
            "-P",
            "pass",
            "--will-topic",
            "will/pub5",
            "--will-payload",
            "bye",
            "-D",
            "will",
            "payload-format-indicator",
            "1",
            "-D",
            "will",
            "message-expiry-interval",
            "60",
            "-D",
            "will",
            "content-type",
            "text/plain",
            "-D",
            "will",
            "will-delay-interval",
            "10",
            "-D",
            "publish",
            "payload-format-indicator",
            "1",
            "-D",
            "publish",
            "message-expiry-interval",
            "300",
            "-D",
            "publish",
            "content-type",
            "application/json",
            "-D",
            "publish",
            "response-topic",
            "reply/here",
            "-D",
            "publish",
            "correlation-data",
            "req-1",
            "-D",
            "publish",
            "user-property",
            "unit",
            "degC",
            "-D",
            "disconnect",
            "session-expiry-interval",
            "0",
            "-t",
            "sensors/t5",
            "-m",
            "{\"t\":21.5}",
            "-q",
            qos,
        ]),
        expected: vec![
            Packet::Connect(Connect {
                will: Some(Will {
                    topic: "will/pub5".into(),
                    payload: Bytes::from_static(b"bye"),
                    qos: QoS::AtMostOnce,
                    retain: false,
                    properties: props(|p| {
                        p.payload_format_indicator = Some(1);
                        p.message_expiry_interval = Some(60);
                        p.content_type = Some("text/plain".into());
                        p.will_delay_interval = Some(10);
                    }),
                }),
                username: Some("user".into()),
                password: Some(Bytes::from_static(b"pass")),
                properties: props(|p| {
                    p.session_expiry_interval = Some(120);
                    p.receive_maximum = Some(20);
                    p.topic_alias_maximum = Some(5);
                    p.user_properties = vec![("site".into(), "plant-1".into())];
                    p.maximum_packet_size = Some(65536);
                }),
                ..connect(Protocol::V5, name, 60)
            }),
            Packet::Publish(Publish {
                qos: QoS::from_u8(qos.parse().expect("qos")).expect("qos"),
                pkid: u16::from(qos != "0"),
                topic: "sensors/t5".into(),
                payload: Bytes::from_static(b"{\"t\":21.5}"),
                properties: props(|p| {
                    p.payload_format_indicator = Some(1);
                    p.message_expiry_interval = Some(300);
                    p.content_type = Some("application/json".into());
                    p.response_topic = Some("reply/here".into());
                    p.correlation_data = Some(Bytes::from_static(b"req-1"));
                    p.user_properties = vec![("unit".into(), "degC".into())];
                }),
                ..Publish::default()
            }),
        ]
        .into_iter()
        .chain((qos == "2").then(|| Packet::PubRel(Ack::new(1))))
        .chain([Packet::Disconnect(Disconnect {
            reason: ReasonCode::SUCCESS,
            properties: props(|p| p.session_expiry_interval = Some(0)),
        })])
        .collect(),
        stdout: "",
        hold_suback: false,
    };
    let sub = |opt| SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..opt
    };
    vec![
        pub311("0", "pub311-q0"),
        pub311("1", "pub311-q1"),
        pub311("2", "pub311-q2"),
        pub5("0", "pub5-q0"),
        pub5("1", "pub5-q1"),
        pub5("2", "pub5-q2"),
        Scenario {
            name: "sub311",
            program: "mosquitto_sub",
            args: args(&[
                "-V",
                "mqttv311",
                "-i",
                "sub311",
                "-q",
                "1",
                "-t",
                "sensors/+/temp",
                "-t",
                "alarms/#",
                "-E",
            ]),
            expected: vec![
                Packet::Connect(connect(Protocol::V311, "sub311", 60)),
                Packet::Subscribe(Subscribe {
                    pkid: 1,
                    filters: vec![
                        Subscription {
                            filter: "sensors/+/temp".into(),
                            options: sub(SubscriptionOptions::default()),
                        },
                        Subscription {
                            filter: "alarms/#".into(),
                            options: sub(SubscriptionOptions::default()),
                        },
                    ],
                    properties: Properties::default(),
                }),
                Packet::Disconnect(Disconnect::default()),
            ],
            stdout: "",
            hold_suback: false,
        },
        Scenario {
            name: "sub5",
            program: "mosquitto_sub",
            args: args(&[
                "-V",
                "mqttv5",
                "-i",
                "sub5",
                "-q",
                "1",
                "--retain-as-published",
                "-D",
                "subscribe",
                "user-property",
                "role",
                "dashboard",
                "-t",
                "sensors/+/temp",
                "-t",
                "$share/grp/alarms/#",
                "-E",
            ]),
            expected: vec![
                // mosquitto_sub announces its inflight window.
                Packet::Connect(Connect {
                    properties: props(|p| p.receive_maximum = Some(20)),
                    ..connect(Protocol::V5, "sub5", 60)
                }),
                Packet::Subscribe(Subscribe {
                    pkid: 1,
                    filters: vec![
                        Subscription {
                            filter: "sensors/+/temp".into(),
                            options: sub(SubscriptionOptions {
                                retain_as_published: true,
                                ..SubscriptionOptions::default()
                            }),
                        },
                        Subscription {
                            filter: "$share/grp/alarms/#".into(),
                            options: sub(SubscriptionOptions {
                                retain_as_published: true,
                                ..SubscriptionOptions::default()
                            }),
                        },
                    ],
                    properties: props(|p| {
                        p.user_properties = vec![("role".into(), "dashboard".into())]
                    }),
                }),
                Packet::Disconnect(Disconnect::default()),
            ],
            stdout: "",
            hold_suback: false,
        },
        Scenario {
            name: "unsub311",
            program: "mosquitto_sub",
            args: args(&[
                "-V",
                "mqttv311",
                "-i",
                "unsub311",
                "-c",
                "-t",
                "sensors/#",
                "-U",
                "sensors/+/temp",
                "-E",
            ]),
            expected: vec![
                Packet::Connect(Connect {
                    clean_start: false,
                    ..connect(Protocol::V311, "unsub311", 60)
                }),
                subscribe_all_sensors(),
                Packet::Unsubscribe(Unsubscribe {
                    pkid: 2,
                    filters: vec!["sensors/+/temp".into()],
                    properties: Properties::default(),
                }),
                Packet::Disconnect(Disconnect::default()),
            ],
            stdout: "",
            hold_suback: true,
        },
        Scenario {
            name: "unsub5",
            program: "mosquitto_sub",
            args: args(&[
                "-V",
                "mqttv5",
                "-i",
                "unsub5",
                "-c",
                "-t",
                "sensors/#",
                "-U",
                "sensors/+/temp",
                "-D",
                "unsubscribe",
                "user-property",
                "why",
                "done",
                "-E",
            ]),
            expected: vec![
                Packet::Connect(Connect {
                    clean_start: false,
                    properties: props(|p| {
                        p.session_expiry_interval = Some(u32::MAX);
                        p.receive_maximum = Some(20);
                    }),
                    ..connect(Protocol::V5, "unsub5", 60)
                }),
                subscribe_all_sensors(),
                Packet::Unsubscribe(Unsubscribe {
                    pkid: 2,
                    filters: vec!["sensors/+/temp".into()],
                    properties: props(|p| p.user_properties = vec![("why".into(), "done".into())]),
                }),
                Packet::Disconnect(Disconnect::default()),
            ],
            stdout: "",
            hold_suback: true,
        },
        Scenario {
            name: "ping311",
            program: "mosquitto_sub",
            args: args(&[
                "-V", "mqttv311", "-i", "ping311", "-k", "5", "-q", "1", "-t", "ping/#", "-C", "1",
                "-v",
            ]),
            expected: vec![
                Packet::Connect(connect(Protocol::V311, "ping311", 5)),
                Packet::Subscribe(Subscribe {
                    pkid: 1,
                    filters: vec![Subscription {
                        filter: "ping/#".into(),
                        options: sub(SubscriptionOptions::default()),
                    }],
                    properties: Properties::default(),
                }),
                Packet::PingReq,
                Packet::PubAck(Ack::new(42)),
                Packet::Disconnect(Disconnect::default()),
            ],
            stdout: "ping/after pong\n",
            hold_suback: false,
        },
        Scenario {
            name: "ping5",
            program: "mosquitto_sub",
            args: args(&[
                "-V", "mqttv5", "-i", "ping5", "-k", "5", "-q", "1", "-t", "ping/#", "-C", "1",
                "-F", "%t %p %C",
            ]),
            expected: vec![
                // -C 1: a window of one message.
                Packet::Connect(Connect {
                    properties: props(|p| p.receive_maximum = Some(1)),
                    ..connect(Protocol::V5, "ping5", 5)
                }),
                Packet::Subscribe(Subscribe {
                    pkid: 1,
                    filters: vec![Subscription {
                        filter: "ping/#".into(),
                        options: sub(SubscriptionOptions::default()),
                    }],
                    properties: Properties::default(),
                }),
                Packet::PingReq,
                Packet::PubAck(Ack::new(42)),
                Packet::Disconnect(Disconnect::default()),
            ],
            stdout: "ping/after pong text/plain\n",
            hold_suback: false,
        },
    ]
}

/// Live capture from the installed mosquitto clients. Set FIELDBRIDGE_WRITE_FIXTURES=1
/// to refresh tests/fixtures/mqtt/ from it.
#[test]
fn mosquitto_clients_decode_and_reencode_byte_exact() {
    let scenarios = scenarios();
    let write = std::env::var_os("FIELDBRIDGE_WRITE_FIXTURES").is_some();
    std::thread::scope(|scope| {
        for s in &scenarios {
            scope.spawn(move || {
                let captured = capture(s);
                assert_matches_expected(s.name, &captured, &s.expected);
                if write {
                    let bytes: Vec<u8> = captured.iter().flat_map(|c| c.raw.clone()).collect();
                    std::fs::write(fixture_path(s.name), bytes).expect("write fixture");
                }
            });
        }
    });
}

/// The committed captures (mosquitto 2.0.11), independent of the installed version.
#[test]
fn committed_captures_decode_and_reencode_byte_exact() {
    for s in scenarios() {
        let bytes = std::fs::read(fixture_path(s.name)).expect("fixture exists");
        let mut buf = BytesMut::from(&bytes[..]);
        let mut version = Protocol::V311;
        let mut captured = Vec::new();
        while !buf.is_empty() {
            let header = check(&buf, MAX).expect("header").expect("complete");
            let raw = buf[..header.packet_len()].to_vec();
            let packet = decode(&mut buf, version, MAX)
                .expect("decodes")
                .expect("complete");
            if let Packet::Connect(c) = &packet {
                version = c.protocol;
            }
            captured.push(Captured { raw, packet });
        }
        assert_matches_expected(s.name, &captured, &s.expected);
    }
}

//! The built-in broker against real clients: `mosquitto_sub`/`mosquitto_pub` speaking
//! MQTT 3.1.1 and 5.0, and paho-mqtt (Python) as a second, independent client library.
//!
//! Each test starts the broker in-process on 127.0.0.1:0 with its own tokio runtime, so
//! the test thread can block on the clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::clients::{mosquitto_pub, publish, python, run_bounded, Sub};
use common::util::{tool, wait_for};
use fieldbridge::broker::{
    Broker, BrokerConfig, BrokerHandle, BrokerStats, ListenerConfig, TlsListenerConfig,
};
use fieldbridge::mqtt::QoS;

const WAIT: Duration = Duration::from_secs(10);
const SHUTDOWN: Duration = Duration::from_secs(20);
const VERSIONS: [&str; 2] = ["mqttv311", "mqttv5"];

struct TestBroker {
    rt: tokio::runtime::Runtime,
    handle: Option<BrokerHandle>,
    port: u16,
}

impl TestBroker {
    fn start(config: BrokerConfig) -> TestBroker {
        TestBroker::start_protecting(config, Vec::new())
    }

    fn start_protecting(mut config: BrokerConfig, protected: Vec<String>) -> TestBroker {
        if config.listeners.iter().all(|l| l.bind.port() == 1883) {
            config.listeners = vec![ListenerConfig {
                bind: "127.0.0.1:0".parse().unwrap(),
                tls: None,
            }];
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt
            .block_on(Broker::start(config, protected))
            .expect("broker starts");
        let port = handle.local_addrs()[0].port();
        TestBroker {
            rt,
            handle: Some(handle),
            port,
        }
    }

    fn handle(&self) -> &BrokerHandle {
        self.handle.as_ref().expect("running")
    }

    fn stats(&self) -> BrokerStats {
        self.handle().stats()
    }

    /// Shuts the broker down; a shutdown that hangs fails the test instead of hanging
    /// it.
    fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let done = self
                .rt
                .block_on(async { tokio::time::timeout(SHUTDOWN, handle.shutdown()).await });
            if done.is_err() && !std::thread::panicking() {
                panic!("broker shutdown did not finish within {SHUTDOWN:?}");
            }
        }
    }

    /// Starts mosquitto_sub and waits for its SUBACK.
    fn sub(&self, args: &[&str]) -> Sub {
        let sub = Sub::start(self.port, args);
        sub.wait_subscribed(WAIT);
        sub
    }

    fn publish(&self, args: &[&str]) {
        publish(self.port, args);
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn publish_subscribe_at_every_qos_in_both_versions() {
    let broker = TestBroker::start(BrokerConfig::default());
    for v in VERSIONS {
        let sub = broker.sub(&["-V", v, "-q", "2", "-t", "q/#", "-F", "%q %t %p"]);
        for pub_v in VERSIONS {
            for qos in ["0", "1", "2"] {
                broker.publish(&[
                    "-V",
                    pub_v,
                    "-q",
                    qos,
                    "-t",
                    &format!("q/{pub_v}"),
                    "-m",
                    qos,
                ]);
            }
        }
        let got = sub.wait_messages(6, WAIT);
        // Order holds per topic. Across topics it need not: mosquitto_sub hands a
        // QoS 2 message over on PUBREL, so the next publisher's QoS 0 message on the
        // other topic can be printed first (seen: "0 q/mqttv5 0" before
        // "2 q/mqttv311 2").
        let per_topic = |topic: &str| -> Vec<String> {
            got.iter()
                .filter(|line| line.split(' ').nth(1) == Some(topic))
                .cloned()
                .collect()
        };
        assert_eq!(
            [per_topic("q/mqttv311"), per_topic("q/mqttv5")],
            [
                ["0 q/mqttv311 0", "1 q/mqttv311 1", "2 q/mqttv311 2"],
                ["0 q/mqttv5 0", "1 q/mqttv5 1", "2 q/mqttv5 2"]
            ],
            "subscriber {v}: in order per topic, at the published QoS: {got:?}"
        );
    }
    // Granted QoS 1 caps delivery.
    let sub = broker.sub(&["-V", "mqttv5", "-q", "1", "-t", "cap", "-F", "%q %p"]);
    broker.publish(&["-q", "2", "-t", "cap", "-m", "x"]);
    assert_eq!(sub.wait_messages(1, WAIT), ["1 x"]);
    let stats = broker.stats();
    assert!(
        stats.messages_received >= 7 && stats.messages_sent >= 13,
        "{stats:?}"
    );
}

#[test]
fn wildcards_and_sys_topics() {
    let broker = TestBroker::start(BrokerConfig::default());
    for v in VERSIONS {
        let plus = broker.sub(&["-V", v, "-t", "a/+/c", "-v"]);
        let hash = broker.sub(&["-V", v, "-t", "a/#", "-v"]);
        let all = broker.sub(&["-V", v, "-t", "#", "-v"]);
        for topic in ["a/b/c", "a/b/d", "a", "x/b/c", "a/b/c/d"] {
            broker.publish(&["-V", v, "-t", topic, "-m", "m"]);
        }
        broker.publish(&["-V", v, "-t", "end", "-m", "m"]);
        all.wait_messages(6, WAIT);
        hash.wait_messages(4, WAIT);
        assert_eq!(plus.wait_messages(1, WAIT), ["a/b/c m"]);
        assert_eq!(
            sorted(hash.messages()),
            ["a m", "a/b/c m", "a/b/c/d m", "a/b/d m"]
        );
        assert!(
            all.messages().iter().all(|m| !m.starts_with("$SYS")),
            "# must not match $SYS: {:?}",
            all.messages()
        );
    }
    let sys = Sub::start(broker.port, &["-t", "$SYS/broker/uptime", "-C", "1", "-v"]);
    assert!(sys.wait_messages(1, WAIT)[0].starts_with("$SYS/broker/uptime "));
}

#[test]
fn retained_messages_and_sessions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig {
        persistence_path: Some(dir.path().join("broker.db")),
        ..BrokerConfig::default()
    };
    let mut broker = TestBroker::start(config.clone());
    broker.publish(&[
        "-V", "mqttv311", "-r", "-q", "1", "-t", "site/t1", "-m", "21.5",
    ]);
    broker.publish(&["-V", "mqttv5", "-r", "-t", "site/t2", "-m", "old"]);
    broker.publish(&[
        "-V", "mqttv5", "-r", "-q", "2", "-t", "site/t2", "-m", "new",
    ]);
    broker.publish(&["-r", "-t", "site/gone", "-m", "x"]);
    broker.publish(&["-r", "-t", "site/gone", "-n"]);
    broker.handle().publish(
        "site/agent",
        Bytes::from_static(b"42"),
        QoS::AtLeastOnce,
        true,
    );
    let late = Sub::start(broker.port, &["-t", "site/#", "-F", "%r %t %p", "-C", "3"]);
    assert_eq!(
        sorted(late.wait_messages(3, WAIT)),
        ["1 site/agent 42", "1 site/t1 21.5", "1 site/t2 new"]
    );

    // Persistent sessions of both versions go offline with messages waiting for them.
    let session_args = |v: &'static str| {
        let mut args = vec![
            "-V",
            v,
            "-c",
            "-i",
            if v == "mqttv5" {
                "offline-5"
            } else {
                "offline-4"
            },
        ];
        args.extend(["-q", "2", "-t", "inbox/#", "-v"]);
        if v == "mqttv5" {
            args.extend(["-x", "3600"]);
        }
        args
    };
    for v in VERSIONS {
        broker.sub(&session_args(v)).kill();
    }
    wait_for("both sessions offline", WAIT, || {
        (broker.stats().clients_connected == 0).then_some(())
    });
    broker.publish(&["-q", "1", "-t", "inbox/a", "-m", "before restart 1"]);
    broker.publish(&["-q", "2", "-t", "inbox/b", "-m", "before restart 2"]);
    broker.stop();

    let broker = TestBroker::start(config);
    assert_eq!(broker.stats().retained, 3);
    assert_eq!(broker.stats().sessions, 2);
    for v in VERSIONS {
        let sub = Sub::start(
            broker.port,
            &[
                "-V",
                v,
                "-t",
                "site/#",
                "-F",
                "%r %q %t %p",
                "-q",
                "2",
                "-C",
                "3",
            ],
        );
        assert_eq!(
            sorted(sub.wait_messages(3, WAIT)),
            ["1 1 site/agent 42", "1 1 site/t1 21.5", "1 2 site/t2 new"],
            "{v}: after a restart, at once, at the stored QoS"
        );
        let back = Sub::start(broker.port, &session_args(v));
        assert_eq!(
            back.wait_messages(2, WAIT),
            ["inbox/a before restart 1", "inbox/b before restart 2"],
            "{v}: queued messages kept across the restart"
        );
    }
}

#[test]
fn will_is_sent_for_a_killed_client_not_for_a_clean_exit() {
    let broker = TestBroker::start(BrokerConfig::default());
    for v in VERSIONS {
        let watcher = broker.sub(&["-V", v, "-t", "wills/#", "-v", "-q", "1"]);
        let mut polite = broker.sub(&[
            "-V",
            v,
            "-t",
            "x",
            "-C",
            "1",
            "--will-topic",
            "wills/polite",
            "--will-payload",
            "polite",
        ]);
        broker.publish(&["-t", "x", "-m", "bye"]);
        assert!(polite.wait_exit(WAIT).success());
        let mut victim = broker.sub(&[
            "-V",
            v,
            "-t",
            "x",
            "--will-topic",
            "wills/victim",
            "--will-payload",
            "killed",
            "--will-qos",
            "1",
        ]);
        victim.kill();
        assert_eq!(
            watcher.wait_messages(1, WAIT),
            ["wills/victim killed"],
            "{v}"
        );
    }
}

#[test]
fn persistent_sessions_queue_while_offline() {
    let broker = TestBroker::start(BrokerConfig::default());
    for v in VERSIONS {
        let id = format!("keeper-{v}");
        let mut args = vec!["-V", v, "-c", "-i", &id, "-q", "1", "-t", "inbox/#", "-v"];
        if v == "mqttv5" {
            args.extend(["-x", "300"]);
        }
        let mut first = broker.sub(&args);
        first.kill();
        wait_for("the session to go offline", WAIT, || {
            (broker.stats().clients_connected == 0).then_some(())
        });
        for i in 1..=3 {
            broker.publish(&["-q", "1", "-t", "inbox/a", "-m", &format!("offline {i}")]);
        }
        broker.publish(&["-q", "0", "-t", "inbox/a", "-m", "qos0 not queued"]);
        broker.publish(&["-q", "2", "-t", "inbox/b", "-m", "last"]);
        let back = Sub::start(broker.port, &args);
        assert_eq!(
            back.wait_messages(4, WAIT),
            [
                "inbox/a offline 1",
                "inbox/a offline 2",
                "inbox/a offline 3",
                "inbox/b last"
            ],
            "{v}"
        );
    }
}

#[test]
fn session_takeover_disconnects_the_old_client() {
    let broker = TestBroker::start(BrokerConfig::default());
    let mut old = broker.sub(&["-V", "mqttv5", "-i", "twin", "-t", "t"]);
    let new = broker.sub(&["-V", "mqttv5", "-i", "twin", "-t", "t", "-v"]);
    // mosquitto_sub exits when the broker disconnects it with "session taken over".
    old.wait_exit(WAIT);
    broker.publish(&["-t", "t", "-m", "to the new one"]);
    assert_eq!(new.wait_messages(1, WAIT), ["t to the new one"]);
    assert_eq!(
        old.messages(),
        ["Received DISCONNECT (142)"],
        "session taken over (0x8E)"
    );
}

fn password_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("passwd");
    std::fs::write(&path, "").unwrap();
    for (user, password) in [("alice", "wonderland"), ("bob", "builder")] {
        let mut command = Command::new(tool("mosquitto_passwd", "mosquitto"));
        command.args(["-b"]).arg(&path).args([user, password]);
        assert!(run_bounded(command).status.success());
    }
    path
}

#[test]
fn authentication_and_acl_denials() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic readwrite lab/#\ntopic read sensors/#\n\nuser bob\ntopic read lab/#\ntopic read clients/#\n\npattern write clients/%u/status\n",
    )
    .unwrap();
    let broker = TestBroker::start_protecting(
        BrokerConfig {
            password_file: Some(password_file(dir.path())),
            acl_file: Some(acl),
            ..BrokerConfig::default()
        },
        vec!["sensors/gw1".into()],
    );
    for v in VERSIONS {
        let anonymous = mosquitto_pub(broker.port, &["-V", v, "-t", "lab/x", "-m", "m"]);
        assert!(!anonymous.status.success(), "{v}: anonymous refused");
        let wrong = mosquitto_pub(
            broker.port,
            &[
                "-V", v, "-u", "alice", "-P", "nope", "-t", "lab/x", "-m", "m",
            ],
        );
        assert!(!wrong.status.success(), "{v}: wrong password refused");
        let stderr = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
        assert!(
            stderr.contains("refused")
                || stderr.contains("not authori")
                || stderr.contains("bad user"),
            "{stderr}"
        );

        let bob = ["-V", v, "-u", "bob", "-P", "builder"];
        let denied = Sub::start(broker.port, &[&bob[..], &["-t", "sensors/#"]].concat());
        let code = denied.wait_subscribed(WAIT);
        assert!(
            code == "128" || code == "135",
            "{v}: SUBACK failure code, got {code}"
        );

        let watch = broker.sub(&[&bob[..], &["-t", "lab/#", "-t", "clients/#", "-v"]].concat());
        let alice = ["-V", v, "-u", "alice", "-P", "wonderland"];
        // Denied publishes are acknowledged (3.1.1 has no way to refuse) but not delivered.
        let _ = mosquitto_pub(
            broker.port,
            &[&bob[..], &["-t", "lab/x", "-m", "bob may not"]].concat(),
        );
        let _ = mosquitto_pub(
            broker.port,
            &[&alice[..], &["-t", "sensors/gw1/t", "-m", "spoof"]].concat(),
        );
        publish(
            broker.port,
            &[&bob[..], &["-t", "clients/bob/status", "-m", "pattern ok"]].concat(),
        );
        publish(
            broker.port,
            &[&alice[..], &["-q", "1", "-t", "lab/x", "-m", "alice may"]].concat(),
        );
        assert_eq!(
            watch.wait_messages(2, WAIT),
            ["clients/bob/status pattern ok", "lab/x alice may"],
            "{v}"
        );
    }
    assert!(broker.stats().denied >= 4);
    // The agent itself may always publish into its own tree.
    let reader = broker.sub(&[
        "-u",
        "alice",
        "-P",
        "wonderland",
        "-t",
        "sensors/gw1/#",
        "-v",
    ]);
    broker.handle().publish(
        "sensors/gw1/t",
        Bytes::from_static(b"20.1"),
        QoS::AtMostOnce,
        false,
    );
    assert_eq!(reader.wait_messages(1, WAIT), ["sensors/gw1/t 20.1"]);
}

#[test]
fn reload_picks_up_a_new_password_file_and_keeps_the_old_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = password_file(dir.path());
    let broker = TestBroker::start(BrokerConfig {
        password_file: Some(path.clone()),
        ..BrokerConfig::default()
    });
    let carol = ["-u", "carol", "-P", "c4r0l", "-t", "x", "-m", "m"];
    assert!(!mosquitto_pub(broker.port, &carol).status.success());
    std::fs::write(
        &path,
        fieldbridge::broker::passwd_line("carol", "c4r0l") + "\n",
    )
    .unwrap();
    broker.rt.block_on(broker.handle().reload_auth()).unwrap();
    publish(broker.port, &carol);
    std::fs::write(&path, "carol:garbage\n").unwrap();
    assert!(broker.rt.block_on(broker.handle().reload_auth()).is_err());
    publish(broker.port, &carol);
}

#[test]
fn a_malformed_packet_closes_only_that_connection() {
    let broker = TestBroker::start(BrokerConfig {
        connect_timeout_secs: 1,
        ..BrokerConfig::default()
    });
    let sub = broker.sub(&["-t", "ok", "-v"]);
    // CONNECT, then a PUBLISH whose remaining length claims more than its topic length
    // can hold.
    let mut raw = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0])
        .unwrap();
    let mut connack = [0u8; 4];
    raw.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    raw.write_all(&[0x30, 3, 0, 9, b'x']).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        raw.read_to_end(&mut rest).unwrap(),
        0,
        "closed by the broker"
    );

    // A packet announcing more than the maximum packet size is refused from its header.
    let mut big = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    big.set_read_timeout(Some(WAIT)).unwrap();
    big.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0])
        .unwrap();
    big.read_exact(&mut connack).unwrap();
    big.write_all(&[0x30, 0x80, 0x80, 0x80, 0x01]).unwrap();
    assert_eq!(
        big.read_to_end(&mut rest).unwrap(),
        0,
        "2 MiB announced, 1 MiB allowed"
    );

    // Silent connection: closed after the connect timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(silent.read(&mut [0u8; 1]).unwrap(), 0);

    broker.publish(&["-t", "ok", "-m", "still fine"]);
    assert_eq!(sub.wait_messages(1, WAIT), ["ok still fine"]);
}

/// Connects a raw 3.1.1 client with client id `id` (one byte), subscribes at QoS 0 (no
/// inflight window holds the broker back: it fills the socket), and returns it without
/// ever reading again.
fn stalled_subscriber(port: u16, id: u8, filter: &str) -> TcpStream {
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, id,
    ])
    .unwrap();
    let mut connack = [0u8; 4];
    raw.read_exact(&mut connack).unwrap();
    let f = filter.as_bytes();
    let mut sub = vec![0x82, (2 + 2 + f.len() + 1) as u8, 0, 1, 0, f.len() as u8];
    sub.extend_from_slice(f);
    sub.push(0);
    raw.write_all(&sub).unwrap();
    let mut suback = [0u8; 5];
    raw.read_exact(&mut suback).unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);
    raw
}

#[test]
fn a_subscriber_that_stops_reading_stalls_nobody() {
    let mut broker = TestBroker::start(BrokerConfig {
        max_queued_messages: 100,
        max_queued_bytes: 64 << 20,
        ..BrokerConfig::default()
    });
    let stalled = [b's', b't'].map(|id| stalled_subscriber(broker.port, id, "flood/#"));
    let healthy = broker.sub(&["-q", "1", "-t", "flood/#", "-F", "%t %l"]);
    // 25 MiB for each stalled client, far more than the socket buffers hold; published
    // in steps the healthy subscriber keeps up with.
    let payload = Bytes::from(vec![b'x'; 64 * 1024]);
    for step in 1..=20 {
        for _ in 0..20 {
            broker
                .handle()
                .publish("flood/in", payload.clone(), QoS::AtLeastOnce, false);
        }
        healthy.wait_messages(step * 20, WAIT);
    }
    // A network publisher is not held back either.
    broker.publish(&["-q", "1", "-t", "flood/net", "-m", "still accepted"]);
    let got = healthy.wait_messages(401, WAIT);
    assert_eq!(got.len(), 401);
    assert!(got[..400].iter().all(|l| l == "flood/in 65536"));
    assert_eq!(got[400], "flood/net 14");
    let stats = broker.stats();
    assert!(
        stats.dropped > 0,
        "the stalled subscribers' excess is dropped: {stats:?}"
    );

    // A stalled client's session is taken over at once, though its socket is full.
    let _taken = broker.sub(&["-i", "s", "-t", "other"]);
    // Shutdown does not wait on the other one either.
    let stop = std::thread::spawn(move || broker.stop());
    wait_for("shutdown with a stalled client", WAIT, || {
        stop.is_finished().then_some(())
    });
    drop(stalled);
}

#[test]
fn connection_limit_and_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.key_pair.serialize_pem()).unwrap();
    let broker = TestBroker::start(BrokerConfig {
        listeners: vec![
            ListenerConfig {
                bind: "127.0.0.1:0".parse().unwrap(),
                tls: None,
            },
            ListenerConfig {
                bind: "127.0.0.1:0".parse().unwrap(),
                tls: Some(TlsListenerConfig {
                    cert_file: cert_file.clone(),
                    key_file,
                }),
            },
        ],
        max_connections: 2,
        ..BrokerConfig::default()
    });
    let tls_port = broker.handle().local_addrs()[1].port().to_string();
    let cafile = cert_file.to_str().unwrap();
    let sub = Sub::start(
        broker.port,
        &["-p", &tls_port, "--cafile", cafile, "-t", "tls", "-v"],
    );
    sub.wait_subscribed(WAIT);
    let _second = broker.sub(&["-t", "other"]);
    let third = mosquitto_pub(broker.port, &["-t", "tls", "-m", "over the limit"]);
    assert!(!third.status.success(), "third connection refused");
    drop(_second);
    wait_for("a free connection slot", WAIT, || {
        mosquitto_pub(
            broker.port,
            &[
                "-p", &tls_port, "--cafile", cafile, "-t", "tls", "-m", "secure",
            ],
        )
        .status
        .success()
        .then_some(())
    });
    assert_eq!(sub.wait_messages(1, WAIT), ["tls secure"]);
}

#[test]
fn paho_qos2_flows_and_v5_features() {
    let broker = TestBroker::start(BrokerConfig::default());
    let port = broker.port.to_string();
    for scenario in [
        "qos2",
        "properties",
        "topic_alias",
        "subscription_ids",
        "no_local",
        "retain_handling",
        "shared",
        "message_expiry",
        "will_delay",
    ] {
        let out = python("paho_broker.py", &[&port, scenario]);
        assert!(out.contains(&format!("{scenario}: ok")), "{out}");
    }
}

/// Regression: a shutdown closed connections before writing what was already queued for
/// them, so a status published just before the broker stopped never reached them.
#[test]
fn shutdown_delivers_what_was_queued_before_it() {
    for version in VERSIONS {
        let mut broker = TestBroker::start(BrokerConfig::default());
        let sub = broker.sub(&["-V", version, "-q", "1", "-t", "gw/status", "-v"]);
        broker.handle().publish(
            "gw/status",
            Bytes::from_static(b"offline"),
            QoS::AtLeastOnce,
            true,
        );
        broker.stop();
        // 5.0 clients also print the DISCONNECT (0x8B, server shutting down) that follows.
        assert_eq!(
            sub.wait_messages(1, WAIT)[0],
            "gw/status offline",
            "{version}"
        );
    }
}

// ─── Hostile first packets, idle connection floods, reloads on open connections ─────

/// A raw TCP connection to the broker that waits at most [`WAIT`] for each read.
fn raw_connection(port: u16) -> TcpStream {
    let raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw
}

/// Whether the broker closed `raw` (end of file, or a reset when it closed with our
/// bytes unread) before the read timeout.
fn closed_by_broker(raw: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match raw.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Regression: the first packet was buffered whole before its type was checked, so a
/// first byte other than CONNECT's was only closed after `connect_timeout_secs` (and a
/// PUBLISH announcing 1 MB as the first packet made the broker hold 1 MB for it).
#[test]
fn first_byte_other_than_connect_is_closed_at_once() {
    let broker = TestBroker::start(BrokerConfig {
        connect_timeout_secs: 600,
        ..BrokerConfig::default()
    });
    let sub = broker.sub(&["-t", "ok", "-v"]);
    for first in [
        &[0x30][..],
        // PUBLISH announcing 1,000,000 bytes, within max_packet_size.
        &[0x30, 0xC0, 0x84, 0x3D, 0, 1, b'x'],
        // CONNECT with reserved flags set [MQTT-2.2.2-2].
        &[0x11, 12, 0, 4, b'M', b'Q'],
        &[0x82, 9, 0, 1],
        &[0xC0],
        &[0x00],
    ] {
        let mut raw = raw_connection(broker.port);
        raw.write_all(first).unwrap();
        assert!(
            closed_by_broker(&mut raw),
            "first bytes {first:02x?}: still open after {WAIT:?}"
        );
    }
    broker.publish(&["-t", "ok", "-m", "still fine"]);
    assert_eq!(sub.wait_messages(1, WAIT), ["ok still fine"]);
}

/// Regression: a CONNECT was allowed up to `max_packet_size` (1 MiB), so a connection
/// that had not logged in could make the broker buffer a megabyte.
#[test]
fn connect_larger_than_the_connect_limit_is_closed_from_its_header() {
    let broker = TestBroker::start(BrokerConfig {
        connect_timeout_secs: 600,
        ..BrokerConfig::default()
    });
    let mut raw = raw_connection(broker.port);
    // 200,000 bytes announced: under max_packet_size, over the 64 KiB CONNECT limit.
    raw.write_all(&[0x10, 0xC0, 0x9A, 0x0C, 0, 4, b'M', b'Q', b'T', b'T'])
        .unwrap();
    assert!(closed_by_broker(&mut raw), "still open after {WAIT:?}");
    // A CONNECT of ordinary size still logs in.
    broker.publish(&["-t", "x", "-m", "m"]);
}

/// Regression: connections that never send CONNECT counted against `max_connections`
/// like logged-in clients, so a flood of idle TCP connections locked every real client
/// out for `connect_timeout_secs`.
#[test]
fn idle_connections_that_never_log_in_do_not_lock_real_clients_out() {
    let broker = TestBroker::start(BrokerConfig {
        max_connections: 8,
        connect_timeout_secs: 600,
        ..BrokerConfig::default()
    });
    // The broker accepts in arrival order: the client comes after the whole flood.
    let mut flood: Vec<TcpStream> = (0..8).map(|_| raw_connection(broker.port)).collect();
    let sub = broker.sub(&["-t", "real/#", "-v"]);
    assert!(
        closed_by_broker(&mut flood[0]),
        "the oldest idle connection makes room"
    );
    // A second wave finds the logged-in subscriber holding its slot.
    flood.extend((0..8).map(|_| raw_connection(broker.port)));
    broker.publish(&["-t", "real/in", "-m", "got in"]);
    assert_eq!(sub.wait_messages(1, WAIT), ["real/in got in"]);
    // Slots held by logged-in clients are never taken: with every slot logged in, a new
    // connection is refused.
    drop(flood);
    // Dropped flood connections still waiting to be noticed are pending too: they
    // give way to these.
    let _logged_in: Vec<Sub> = (0..7).map(|_| broker.sub(&["-t", "fill"])).collect();
    let over = mosquitto_pub(broker.port, &["-t", "real/in", "-m", "over"]);
    assert!(
        !over.status.success(),
        "refused when every slot is logged in"
    );
    assert_eq!(
        sub.messages(),
        ["real/in got in"],
        "the subscriber kept its slot"
    );
}

#[test]
fn pending_connections_over_their_limit_close_the_oldest_first() {
    let broker = TestBroker::start(BrokerConfig {
        max_pending_connections: 4,
        connect_timeout_secs: 600,
        ..BrokerConfig::default()
    });
    let mut idle: Vec<TcpStream> = (0..6).map(|_| raw_connection(broker.port)).collect();
    assert!(closed_by_broker(&mut idle[0]), "oldest closed");
    assert!(closed_by_broker(&mut idle[1]), "second oldest closed");
    for (i, raw) in idle.iter_mut().enumerate().skip(2) {
        raw.set_nonblocking(true).unwrap();
        let still_open =
            matches!(raw.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(still_open, "connection {i} is among the newest four");
    }
    broker.publish(&["-t", "x", "-m", "a real client still gets in"]);
}

/// Regression: a user removed from the password file, or an ACL grant withdrawn, by a
/// reload kept receiving on a connection opened before it.
#[test]
fn reload_disconnects_removed_users_and_withdraws_denied_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let acl = dir.path().join("acl");
    let alice_line = fieldbridge::broker::passwd_line("alice", "wonderland") + "\n";
    let bob_line = fieldbridge::broker::passwd_line("bob", "builder") + "\n";
    std::fs::write(&passwd, alice_line.clone() + &bob_line).unwrap();
    std::fs::write(
        &acl,
        "user alice\ntopic read lab/#\nuser bob\ntopic read lab/#\ntopic read sensors/#\n",
    )
    .unwrap();
    let broker = TestBroker::start(BrokerConfig {
        password_file: Some(passwd.clone()),
        acl_file: Some(acl.clone()),
        ..BrokerConfig::default()
    });
    for v in VERSIONS {
        std::fs::write(&passwd, alice_line.clone() + &bob_line).unwrap();
        std::fs::write(
            &acl,
            "user alice\ntopic read lab/#\nuser bob\ntopic read lab/#\ntopic read sensors/#\n",
        )
        .unwrap();
        broker.rt.block_on(broker.handle().reload_auth()).unwrap();
        let mut alice = broker.sub(&[
            "-V",
            v,
            "-u",
            "alice",
            "-P",
            "wonderland",
            "-t",
            "lab/#",
            "-v",
        ]);
        let bob = broker.sub(&[
            "-V",
            v,
            "-u",
            "bob",
            "-P",
            "builder",
            "-t",
            "sensors/#",
            "-t",
            "lab/#",
            "-v",
        ]);
        let subscriptions = broker.stats().subscriptions;

        // bob's line stays as it was: his credentials still hold.
        std::fs::write(&passwd, &bob_line).unwrap();
        std::fs::write(&acl, "user bob\ntopic read lab/#\n").unwrap();
        broker.rt.block_on(broker.handle().reload_auth()).unwrap();

        // 3.1.1 has no DISCONNECT from the broker: the client reconnects and is refused.
        alice.wait_exit(WAIT);
        let told = match v {
            "mqttv5" => alice
                .messages()
                .contains(&"Received DISCONNECT (135)".to_string()),
            _ => alice.stderr().contains("bad user name or password"),
        };
        assert!(told, "{v}: {:?} {}", alice.messages(), alice.stderr());
        // In order from one publisher: when the marker arrives, the sensor reading
        // would have arrived before it.
        for (topic, payload) in [("sensors/t", "withdrawn"), ("lab/end", "marker")] {
            broker
                .handle()
                .publish(topic, Bytes::from(payload), QoS::AtLeastOnce, false);
        }
        assert_eq!(bob.wait_messages(1, WAIT), ["lab/end marker"], "{v}");
        assert_eq!(
            broker.stats().subscriptions,
            subscriptions - 2,
            "{v}: alice's and bob's sensors subscriptions left the tree"
        );
    }
}

//! Commands end to end, with real parts: the agent (in process) polling an independent
//! Modbus slave (pymodbus), LAN clients (mosquitto_pub/mosquitto_sub) on its broker with
//! a password file and an ACL, and a real mosquitto upstream. What lands in the slave is
//! read by an independent pymodbus client.

mod common;

use std::path::Path;
use std::time::Duration;

use common::clients::{mosquitto_pub, Sub};
use common::mosquitto::{publish, Mosquitto, SubOptions, Subscriber};
use common::slave::Slave;
use common::util::{free_port, poll_until, wait_for};
use fieldbridge::agent::Agent;
use serde_json::{json, Value};

const ARRIVE: Duration = Duration::from_secs(20);

const POINTS: &str = "[[bus.device.point]]\nname = \"setpoint\"\nkind = \"holding\"\naddress = 0\n\
    type = \"i16\"\nscale = 0.1\nwritable = true\nmin = 5.0\nmax = 30.0\n\
    [[bus.device.point]]\nname = \"pump\"\nkind = \"coil\"\naddress = 0\nwritable = true\nmin_interval_ms = 60000\n";

fn config(
    prefix: &str,
    broker: Option<(u16, &Path)>,
    upstream: Option<&str>,
    store: &Path,
    slave: u16,
) -> String {
    let mut text = format!(
        "[agent]\nprefix = {prefix:?}\nhealth_interval_secs = 1\ncommand_max_age_ms = 1500\n\n\
         [store]\npath = {:?}\ncommit_interval_ms = 20\n\n",
        store.display().to_string()
    );
    if let Some((port, dir)) = broker {
        text.push_str(&format!(
            "[broker]\nallow_anonymous = false\npassword_file = {:?}\nacl_file = {:?}\n\
             [[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n\n",
            dir.join("passwd").display().to_string(),
            dir.join("acl").display().to_string(),
        ));
    }
    if let Some(url) = upstream {
        text.push_str(&format!(
            "[upstream]\nurl = {url:?}\nclient_id = \"fieldbridge-writes\"\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n\n"
        ));
    }
    text.push_str(&format!(
        "[[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {slave}\n\n\
         [[bus.device]]\nname = \"boiler\"\nunit_id = 1\npoll_interval_ms = 200\n\n{POINTS}"
    ));
    text
}

fn slave() -> Slave {
    Slave::tcp(&json!({"units": {"1": {"holding": {"0": [200]}, "coil": {"0": [1]}}}}))
}

async fn start(text: &str) -> Agent {
    let config = fieldbridge::config::parse("writes.toml", text).expect("config parses");
    Agent::start(config).await.expect("agent starts")
}

/// The JSON results among mosquitto_sub `-v` lines on `topic`.
fn results(lines: &[String], topic: &str) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| l.split_once(' '))
        .filter(|(t, _)| *t == topic)
        .filter_map(|(_, p)| serde_json::from_str(p).ok())
        .collect()
}

fn lan_pub(port: u16, user: &str, topic: &str, payload: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "-u", user, "-P", "pw", "-t", topic, "-m", payload, "-q", "1",
    ];
    args.extend_from_slice(extra);
    let out = mosquitto_pub(port, &args);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A raw MQTT 3.1.1 client (no client library sets DUP on demand): as `operator`, sends
/// one QoS 1 PUBLISH with packet id 9 and then its resend with DUP set, and returns the
/// two PUBACKs.
fn publish_twice_with_dup(port: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }
    fn packet(header: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128);
        let mut out = vec![header, body.len() as u8];
        out.extend_from_slice(body);
        out
    }
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(ARRIVE)).unwrap();
    let mut connect = Vec::new();
    string(&mut connect, b"MQTT");
    connect.extend_from_slice(&[4, 0xC2, 0, 60]);
    for field in [&b"dup-test"[..], b"operator", b"pw"] {
        string(&mut connect, field);
    }
    stream.write_all(&packet(0x10, &connect)).unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    let mut publish = Vec::new();
    string(&mut publish, topic.as_bytes());
    publish.extend_from_slice(&9u16.to_be_bytes());
    publish.extend_from_slice(payload);
    stream.write_all(&packet(0x32, &publish)).unwrap();
    stream.write_all(&packet(0x3A, &publish)).unwrap();
    let mut acks = vec![0u8; 8];
    stream.read_exact(&mut acks).unwrap();
    acks
}

fn writes(slave: &Slave) -> usize {
    slave.requests().iter().filter(|r| r.function >= 5).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_commands_need_an_acl_grant_are_confirmed_by_read_back_and_execute_once() {
    let slave = slave();
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = "writes/lan";
    std::fs::write(
        dir.path().join("passwd"),
        format!(
            "{}\n{}\n",
            fieldbridge::broker::passwd_line("operator", "pw"),
            fieldbridge::broker::passwd_line("viewer", "pw")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("acl"),
        format!(
            "user operator\ntopic read {prefix}/#\ntopic write {prefix}/boiler/+/set\n\
             user viewer\ntopic read {prefix}/#\ntopic read reply/#\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let agent = start(&config(
        prefix,
        Some((port, dir.path())),
        None,
        &dir.path().join("store.db"),
        slave.port(),
    ))
    .await;
    let result_topic = format!("{prefix}/boiler/setpoint/set/result");
    let set = format!("{prefix}/boiler/setpoint/set");
    let sub = Sub::start(
        port,
        &[
            "-u",
            "viewer",
            "-P",
            "pw",
            "-v",
            "-t",
            &format!("{prefix}/boiler/#"),
            "-t",
            "reply/#",
            "-t",
            &format!("{prefix}/health"),
        ],
    );
    sub.wait_subscribed(ARRIVE);

    // No grant: refused by the broker, nothing reaches the device.
    let said = lan_pub(port, "viewer", &set, "22", &["-V", "mqttv5"]);
    assert!(said.contains("Not authorized"), "{said}");

    // With the grant, a bare value as Home Assistant sends it, a 5.0 response topic.
    lan_pub(
        port,
        "operator",
        &set,
        "21.5",
        &[
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "response-topic",
            "reply/ha",
            "-D",
            "publish",
            "correlation-data",
            "req-1",
        ],
    );
    let lines = wait_for("the result and the response", ARRIVE, || {
        let lines = sub.messages();
        (results(&lines, &result_topic).len() == 1 && results(&lines, "reply/ha").len() == 1)
            .then_some(lines)
    });
    let result = &results(&lines, &result_topic)[0];
    assert_eq!(result["ok"], json!(true), "{result}");
    assert_eq!(result["value"], json!(21.5));
    assert_eq!(result["readback"], json!(21.5));
    assert_eq!(result["held"], json!(true));
    assert_eq!(
        results(&lines, "reply/ha")[0]["correlation_data"],
        json!("req-1")
    );
    assert_eq!(slave.read_independently(1, "holding", 0, 1), [215]);
    // The viewer's 22 never reached the device: only the operator's write did.
    assert_eq!(writes(&slave), 1, "{:?}", slave.requests());
    // The new reading is published at once.
    wait_for("the read-back reading", ARRIVE, || {
        sub.messages()
            .iter()
            .any(|l| l.starts_with(&format!("{prefix}/boiler/setpoint ")) && l.contains("21.5"))
            .then_some(())
    });

    // Out of range: a result with the reason, nothing written.
    let before = writes(&slave);
    lan_pub(port, "operator", &set, "99", &[]);
    let refused = wait_for("the refusal", ARRIVE, || {
        results(&sub.messages(), &result_topic).get(1).cloned()
    });
    assert_eq!(refused["ok"], json!(false));
    assert_eq!(refused["reason"], json!("out_of_range"));
    assert_eq!(writes(&slave), before);

    // Zero to a coil, with "OFF" as a Home Assistant switch sends it.
    lan_pub(
        port,
        "operator",
        &format!("{prefix}/boiler/pump/set"),
        "OFF",
        &[],
    );
    let pump = wait_for("the coil result", ARRIVE, || {
        results(&sub.messages(), &format!("{prefix}/boiler/pump/set/result"))
            .first()
            .cloned()
    });
    assert_eq!(pump["ok"], json!(true), "{pump}");
    assert_eq!(slave.read_independently(1, "coil", 0, 1), [0]);
    // A pump switched again within its least interval: refused, left as it is.
    lan_pub(
        port,
        "operator",
        &format!("{prefix}/boiler/pump/set"),
        "ON",
        &[],
    );
    let again = wait_for("the too-soon refusal", ARRIVE, || {
        results(&sub.messages(), &format!("{prefix}/boiler/pump/set/result"))
            .get(1)
            .cloned()
    });
    assert_eq!(again["reason"], json!("too_soon"), "{again}");
    assert_eq!(slave.read_independently(1, "coil", 0, 1), [0]);

    // The same id twice: written once, the result repeated.
    let before = writes(&slave);
    let command = r#"{"value": 20, "id": "once"}"#;
    lan_pub(port, "operator", &set, command, &[]);
    lan_pub(port, "operator", &set, command, &[]);
    let repeated = wait_for("both results", ARRIVE, || {
        let r: Vec<Value> = results(&sub.messages(), &result_topic)
            .into_iter()
            .filter(|r| r["id"] == json!("once"))
            .collect();
        (r.len() == 2).then_some(r)
    });
    assert_eq!(repeated[0], repeated[1]);
    assert_eq!(writes(&slave), before + 1, "{:?}", slave.requests());

    // A QoS 1 resend (DUP) of the same packet: written once, the result repeated.
    let before = writes(&slave);
    let acks = publish_twice_with_dup(port, &set, b"19.5");
    assert_eq!(acks, [0x40, 0x02, 0x00, 0x09, 0x40, 0x02, 0x00, 0x09]);
    let resent = wait_for("the result twice", ARRIVE, || {
        let r: Vec<Value> = results(&sub.messages(), &result_topic)
            .into_iter()
            .filter(|r| r["value"] == json!(19.5))
            .collect();
        (r.len() == 2).then_some(r)
    });
    assert_eq!(resent[0], resent[1]);
    assert_eq!(writes(&slave), before + 1, "{:?}", slave.requests());

    // The counters in the health report.
    let health = wait_for("command counters in the health report", ARRIVE, || {
        results(&sub.messages(), &format!("{prefix}/health"))
            .into_iter()
            .find(|v| v["commands"]["duplicates"] == json!(2))
    });
    assert_eq!(health["commands"]["ok"], json!(4), "{health}");
    assert_eq!(
        health["commands"]["refused"]["out_of_range"],
        json!(1),
        "{health}"
    );
    assert_eq!(
        health["commands"]["refused"]["too_soon"],
        json!(1),
        "{health}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_commands_are_written_and_a_stale_one_after_an_outage_is_refused() {
    let slave = slave();
    let upstream = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = "writes/up";
    let text = config(
        prefix,
        None,
        Some(&upstream.url()),
        &dir.path().join("store.db"),
        slave.port(),
    );
    let results_sub = Subscriber::start(
        &upstream,
        &[&format!("{prefix}/boiler/+/set/result")],
        SubOptions::default(),
    );
    let agent = start(&text).await;
    let set = format!("{prefix}/boiler/setpoint/set");
    // The uplink subscribes after its CONNACK: repeat the command until it is taken
    // (the id makes the repeats one command).
    let first = poll_until(ARRIVE, || {
        publish(&upstream, &set, r#"{"value": 22.0, "id": "up-1"}"#, 1);
        std::thread::sleep(Duration::from_millis(200));
        results_sub.messages().first().cloned()
    })
    .expect("a result upstream");
    let first: Value = serde_json::from_str(&first.payload).unwrap();
    assert_eq!(first["ok"], json!(true), "{first}");
    assert_eq!(slave.read_independently(1, "holding", 0, 1), [220]);
    agent.shutdown().await;

    // While the agent is away its persistent session queues a command; delivered after
    // the outage it is older than the allowed age, and refused.
    // Stamped 1.8 s ago, beyond the 1.5 s allowed: the age a command has after such an
    // outage, without the test waiting it out.
    let before = writes(&slave);
    let sent = fieldbridge::clock::now_ms() - 1800;
    publish(
        &upstream,
        &set,
        &format!(r#"{{"value": 25.0, "id": "late", "ts": {sent}}}"#),
        1,
    );
    let agent = start(&text).await;
    let late = wait_for("the stale refusal upstream", ARRIVE, || {
        results_sub
            .messages()
            .iter()
            .filter_map(|m| serde_json::from_str::<Value>(&m.payload).ok())
            .find(|r| r["id"] == json!("late"))
    });
    assert_eq!(late["ok"], json!(false), "{late}");
    assert_eq!(late["reason"], json!("stale"), "{late}");
    assert_eq!(
        writes(&slave),
        before,
        "nothing written: {:?}",
        slave.requests()
    );
    assert_eq!(slave.read_independently(1, "holding", 0, 1), [220]);
    agent.shutdown().await;
}

#[test]
fn check_config_prints_the_command_topics_and_their_limits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("writes.toml");
    let text = config(
        "site/gw",
        None,
        Some("mqtt://127.0.0.1:1883"),
        &dir.path().join("store.db"),
        5020,
    );
    std::fs::write(&path, text).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run check-config");
    let out = common::util::output_text(&output);
    assert!(output.status.success(), "{out}");
    assert!(
        out.contains("commands (results on <command>/result; older than 1500 ms refused):"),
        "{out}"
    );
    assert!(
        out.contains(
            "  site/gw/boiler/setpoint/set -> boiler holding 0 (i16), FC6, min 5, max 30\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("  site/gw/boiler/pump/set -> boiler coil 0 (bool), FC5, at most one write per 60000 ms\n"),
        "{out}"
    );
}

//! Truthful timestamps end to end, with real parts: an independent Modbus slave
//! (pymodbus), the `fieldbridge` binary, a real mosquitto upstream, mosquitto_sub on
//! both brokers. The clock's sync status is faked through the file the agent reads
//! (`time.sync_file`, systemd-timesyncd's flag file): its directory exists, so the file
//! decides, whatever the kernel of the test machine says.
//!
//! The test machine's wall clock is right all along, so a corrected time equals the
//! original one within the agent's reading of its boot clock; what the tests check is
//! the marking and where each reading goes. The offsets themselves are unit-tested on a
//! fake clock in `src/time.rs`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::agent::Agent;
use common::clients::Sub;
use common::mosquitto::{Mosquitto, SubOptions, Subscriber};
use common::slave::Slave;
use common::util::{free_port, wait_for, wait_for_port};
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(15);
const ARRIVE: Duration = Duration::from_secs(20);
const PREFIX: &str = "e2e/time";

fn counter_slave() -> Slave {
    Slave::tcp(&json!({
        "units": {"1": {
            "holding": {"0": [215]},
            "counter": [{"kind": "holding", "address": 0}]
        }}
    }))
}

fn config(
    dir: &Path,
    lan_port: u16,
    upstream: &str,
    slave_port: u16,
    require_sync: bool,
) -> String {
    format!(
        "[agent]\nprefix = {PREFIX:?}\nhealth_interval_secs = 1\n\n\
         [store]\npath = {store:?}\ncommit_interval_ms = 20\n\n\
         [broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan_port}\"\n\n\
         [upstream]\nurl = {upstream:?}\nclient_id = \"fieldbridge-time\"\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n\n\
         [time]\nrequire_sync = {require_sync}\nsync_file = {sync_file:?}\n\n\
         [[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {slave_port}\n\n\
         [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 100\ntimeout_ms = 2000\n\n\
         [[bus.device.point]]\nname = \"counter\"\nkind = \"holding\"\naddress = 0\ntype = \"u16\"\n",
        store = dir.join("queue.db").display().to_string(),
        sync_file = sync_file(dir).display().to_string(),
    )
}

/// Where the test says the clock is synchronized; its directory exists from the start.
fn sync_file(dir: &Path) -> std::path::PathBuf {
    dir.join("timesync/synchronized")
}

/// The counter readings among `(topic, payload)` pairs, by counter value.
fn counters<'a>(messages: impl Iterator<Item = (&'a str, &'a str)>) -> BTreeMap<u64, Value> {
    let topic = format!("{PREFIX}/meter/counter");
    messages
        .filter(|(t, _)| *t == topic)
        .filter_map(|(_, payload)| serde_json::from_str::<Value>(payload).ok())
        .filter_map(|reading| Some((reading["value"].as_u64()?, reading)))
        .collect()
}

fn lan_counters(sub: &Sub) -> BTreeMap<u64, Value> {
    let lines = sub.messages();
    counters(lines.iter().filter_map(|line| line.split_once(' ')))
}

fn upstream_counters(sub: &Subscriber) -> BTreeMap<u64, Value> {
    let messages = sub.messages();
    counters(
        messages
            .iter()
            .map(|m| (m.topic.as_str(), m.payload.as_str())),
    )
}

/// The `time` mark of a reading: `None` when synchronized.
fn mark(reading: &Value) -> Option<&str> {
    reading.get("time").and_then(Value::as_str)
}

/// The last health report on the LAN broker that satisfies `check`.
fn health(sub: &Sub, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("{PREFIX}/health");
    wait_for(what, ARRIVE, || {
        sub.messages()
            .iter()
            .filter_map(|line| line.split_once(' '))
            .filter(|(t, _)| *t == topic)
            .filter_map(|(_, payload)| serde_json::from_str::<Value>(payload).ok())
            .rfind(|report| check(report))
    })
}

/// Starts the agent with the sync file's directory in place and the file absent, and a
/// mosquitto_sub on its LAN broker.
fn start(dir: &Path, upstream: &Mosquitto, slave: &Slave, require_sync: bool) -> (Agent, Sub) {
    std::fs::create_dir(dir.join("timesync")).expect("timesync dir");
    let lan_port = free_port();
    let text = config(dir, lan_port, &upstream.url(), slave.port(), require_sync);
    let agent = Agent::start(dir, &text);
    wait_for_port(lan_port, START);
    let lan = Sub::start(lan_port, &["-v", "-t", &format!("{PREFIX}/#")]);
    (agent, lan)
}

/// Waits for `n` unsynced counter readings on the LAN broker; returns them.
fn unsynced_on_lan(lan: &Sub, n: usize) -> BTreeMap<u64, Value> {
    wait_for("unsynced readings on the LAN broker", ARRIVE, || {
        let seen = lan_counters(lan);
        (seen.len() >= n).then_some(seen)
    })
}

#[test]
fn readings_are_sent_unsynced_and_the_stored_backlog_arrives_corrected_after_the_sync() {
    let slave = counter_slave();
    let mut upstream = Mosquitto::start();
    // A persistent session that queues what arrives while it reconnects after the
    // broker's restart.
    let up = Subscriber::start(
        &upstream,
        &[&format!("{PREFIX}/#")],
        SubOptions {
            client_id: Some("time-backlog".into()),
            ..SubOptions::default()
        },
    );
    upstream.stop();

    let dir = tempfile::tempdir().expect("temp dir");
    let (agent, lan) = start(dir.path(), &upstream, &slave, false);

    let before = unsynced_on_lan(&lan, 5);
    for reading in before.values() {
        assert_eq!(mark(reading), Some("unsynced"), "{reading}");
    }
    let report = health(&lan, "a health report counting unsynced readings", |r| {
        r["time"]["unsynced"].as_u64() >= Some(5)
    });
    assert_eq!(report["time"]["synced"], false, "{report}");

    std::fs::write(sync_file(dir.path()), b"").expect("the clock syncs");
    agent.wait_line("the wall clock is synchronized", START);
    agent.wait_line("corrected the times of the stored readings", START);
    let synced = wait_for("a synchronized reading on the LAN broker", ARRIVE, || {
        lan_counters(&lan)
            .into_iter()
            .find(|(_, reading)| mark(reading).is_none())
    });
    // A report made after the store's answer counts the corrected rows.
    health(
        &lan,
        "a health report counting the corrected readings",
        |r| r["time"]["synced"] == true && r["time"]["corrected"].as_u64() >= Some(5),
    );

    upstream.restart();
    let arrived = wait_for(
        "the backlog and a synchronized reading upstream",
        ARRIVE,
        || {
            let arrived = upstream_counters(&up);
            (before.keys().all(|v| arrived.contains_key(v)) && arrived.contains_key(&synced.0))
                .then_some(arrived)
        },
    );
    for (value, lan_reading) in &before {
        let reading = &arrived[value];
        assert_eq!(mark(reading), Some("corrected"), "{reading}");
        let (ts, lan_ts) = (reading["ts"].as_i64(), lan_reading["ts"].as_i64());
        let drift = ts.zip(lan_ts).map(|(a, b)| (a - b).abs());
        assert!(
            drift.is_some_and(|ms| ms < 2_000),
            "this clock was right all along: {reading} vs {lan_reading}"
        );
    }
    assert_eq!(mark(&arrived[&synced.0]), None, "{}", arrived[&synced.0]);
    assert!(
        arrived.values().all(|r| mark(r) != Some("unsynced")),
        "no reading of this boot goes upstream unsynced once the clock synced: {arrived:?}"
    );
}

#[test]
fn require_sync_holds_readings_for_upstream_until_the_clock_syncs() {
    let slave = counter_slave();
    let upstream = Mosquitto::start();
    let up = Subscriber::start(&upstream, &[&format!("{PREFIX}/#")], SubOptions::default());

    let dir = tempfile::tempdir().expect("temp dir");
    let (agent, lan) = start(dir.path(), &upstream, &slave, true);
    // The uplink is connected (its online status arrived) and the LAN broker has
    // unsynced readings: none of them went upstream.
    wait_for("the agent online upstream", ARRIVE, || {
        up.messages()
            .iter()
            .any(|m| m.topic == format!("{PREFIX}/status") && m.payload == "online")
            .then_some(())
    });
    let report = health(&lan, "stored unsynced readings", |r| {
        r["time"]["unsynced"].as_u64() >= Some(5) && r["queue"]["depth"].as_u64() >= Some(5)
    });
    assert_eq!(report["upstream"]["state"], "connected", "{report}");
    let held = unsynced_on_lan(&lan, 5);
    assert!(
        upstream_counters(&up).is_empty(),
        "nothing goes upstream before the sync: {:?}",
        up.messages()
    );

    std::fs::write(sync_file(dir.path()), b"").expect("the clock syncs");
    agent.wait_line("stored readings go upstream now", START);
    let arrived = wait_for("the held readings upstream", ARRIVE, || {
        let arrived = upstream_counters(&up);
        held.keys()
            .all(|v| arrived.contains_key(v))
            .then_some(arrived)
    });
    for value in held.keys() {
        assert_eq!(
            mark(&arrived[value]),
            Some("corrected"),
            "{}",
            arrived[value]
        );
    }
    assert!(
        arrived.values().all(|r| mark(r) != Some("unsynced")),
        "{arrived:?}"
    );
}

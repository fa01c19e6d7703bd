//! Sparkplug B edge node, with real parts only: the `fieldbridge` binary with
//! `[upstream] format = "sparkplug"`, a real mosquitto, an independent pymodbus slave, and
//! an independent Sparkplug host application (`tests/fixtures/sparkplug_host.py`: PyPI's
//! pysparkplug decoding with the specification's compiled `sparkplug_b.proto`, on
//! paho-mqtt) that decodes every message as a SCADA host would.
//!
//! Normative statements of the Sparkplug 3.0 specification these tests check (TCK ids):
//!
//! | statement | test |
//! |---|---|
//! | `principles-persistence-clean-session-311`: clean session 1 | the broker drops the session: `births_data_and_rebirth…` (mosquitto's log) |
//! | `payloads-ndeath-will-message` / `-qos` / `-retain`: NDEATH is the will, QoS 1, not retained | `kill_9_…` |
//! | `payloads-nbirth-bdseq`, `payloads-ndeath-bdseq`: bdSeq in NBIRTH equals the will's | `kill_9_…` |
//! | `payloads-nbirth-seq`: NBIRTH has seq 0 | `births_data_and_rebirth…` |
//! | `payloads-sequence-num-always-included`, `-incrementing`: every message but NDEATH has seq, +1 mod 256 | `births_data_and_rebirth…`, `readings_stored…` |
//! | `payloads-nbirth-rebirth-req`: NBIRTH has `Node Control/Rebirth` = false | `births_data_and_rebirth…` |
//! | `topics-nbirth-mqtt`, `topics-dbirth-mqtt`: births QoS 0, not retained | `births_data_and_rebirth…` |
//! | `payloads-name-birth-data-requirement`, `payloads-alias-birth-requirement`: births carry name, alias and datatype | `births_data_and_rebirth…` |
//! | `payloads-alias-uniqueness`: aliases unique over the edge node | `births_data_and_rebirth…` |
//! | `payloads-alias-data-cmd-requirement`: DDATA carries the alias only | `births_data_and_rebirth…` |
//! | `operational-behavior-edge-node-birth-sequence`: NBIRTH then DBIRTHs right after CONNACK | `births_data_and_rebirth…` |
//! | `operational-behavior-edge-node-rebirth` (NCMD `Node Control/Rebirth`): new NBIRTH (seq 0, same bdSeq) and DBIRTHs | `births_data_and_rebirth…` |
//! | `operational-behavior-device-ddeath`: DDEATH when a device is lost, DBIRTH when it is back | `a_device_outage…` |
//! | `payloads-metric-is-historical`: stored data goes out `is_historical`, original timestamps, in order, with the session's seq | `readings_stored…` |
//! | `operational-behavior-edge-node-intentional-offline`: NDEATH before a graceful DISCONNECT | `kill_9_…` (SIGTERM part) |
//! | `operational-behavior-edge-node-birth-sequence-wait` (primary host STATE) | `births_wait_for_the_primary_host…` |
//! | `payloads-dcmd-*`, `operational-behavior-data-commands`: DCMD writes the device's metric | `dcmd_writes_through…` |
//!
//! Not implemented: DDATA at QoS 0 (`topics-ddata-mqtt`): rows are sent at the configured
//! QoS (default 1) so the store deletes them only on acknowledgement; NDATA (the node has
//! no metrics of its own besides bdSeq and Rebirth); templates, data sets, metadata.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::agent::Agent;
use common::mosquitto::{Mosquitto, Options, SubOptions, Subscriber};
use common::slave::Slave;
use common::util::{poll_until, wait_for};
use serde_json::{json, Value};

const ARRIVE: Duration = Duration::from_secs(20);
const GROUP: &str = "plant";
const NODE: &str = "gw1";

/// The Sparkplug host fixture, its decoded messages collected as they arrive.
struct Host {
    child: Child,
    stdin: ChildStdin,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Host {
    fn start(broker: &Mosquitto, client_id: &str) -> Host {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sparkplug_host.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", &broker.port.to_string(), "--group", GROUP])
            .args(["--client-id", client_id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with pysparkplug and paho-mqtt (scripts/requirements-test.txt)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value =
                    serde_json::from_str(&line).unwrap_or_else(|_| json!({ "unparsed": line }));
                sink.lock().expect("lines").push(value);
            }
        });
        let mut host = Host {
            child,
            stdin,
            lines,
        };
        let ready = poll_until(ARRIVE, || {
            if let Ok(Some(status)) = host.child.try_wait() {
                panic!(
                    "the Sparkplug host fixture exited ({status}): it needs paho-mqtt 2, protobuf \
                     and pysparkplug (scripts/test.sh installs scripts/requirements-test*.txt)"
                );
            }
            host.all().iter().any(|l| l["ready"] == true).then_some(())
        });
        assert!(
            ready.is_some(),
            "the host did not subscribe: {:?}",
            host.all()
        );
        host
    }

    fn all(&self) -> Vec<Value> {
        self.lines.lock().expect("lines").clone()
    }

    /// Decoded Sparkplug messages (no fixture notices).
    fn messages(&self) -> Vec<Value> {
        sparkplug_messages(&self.all())
    }

    fn wait<T>(&self, what: &str, mut check: impl FnMut(&[Value]) -> Option<T>) -> T {
        match poll_until(ARRIVE, || check(&self.messages_and_notices())) {
            Some(value) => value,
            None => panic!(
                "timed out waiting for {what}; the host saw:\n{}",
                self.all()
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }

    fn messages_and_notices(&self) -> Vec<Value> {
        self.all()
    }

    fn send(&mut self, command: &str) {
        let name = command
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let before = self
            .all()
            .iter()
            .filter(|l| l["done"] == name.as_str())
            .count();
        writeln!(self.stdin, "{command}").expect("host stdin");
        self.wait("the host to send its command", |all| {
            (all.iter().filter(|l| l["done"] == name.as_str()).count() > before).then_some(())
        });
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Sparkplug messages among the host's lines (not its notices).
fn sparkplug_messages(all: &[Value]) -> Vec<Value> {
    all.iter()
        .filter(|m| m.get("type").is_some())
        .cloned()
        .collect()
}

/// Every message decoded in the independent host without an error.
fn assert_decoded(messages: &[Value]) {
    let failed: Vec<&Value> = messages
        .iter()
        .filter(|m| m.get("error").is_some())
        .collect();
    assert!(failed.is_empty(), "the host could not decode: {failed:?}");
}

fn of_type<'a>(messages: &'a [Value], kind: &str) -> Vec<&'a Value> {
    messages.iter().filter(|m| m["type"] == kind).collect()
}

fn metric<'a>(message: &'a Value, name: &str) -> &'a Value {
    message["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no metric {name} in {message}"))
}

/// The slave: voltage 230 V at 0, temperature 21.5 °C (215, scale 0.1) at 1, a counter
/// at 50 that counts every read, a coil.
fn slave_image() -> Value {
    json!({"units": {"1": {
        "holding": {"0": [230, 215]},
        "coil": {"0": [1]},
        "counter": [{"kind": "holding", "address": 50}]
    }}})
}

const POINTS: &str = "\
[[bus.device.point]]\nname = \"voltage\"\nunit = \"V\"\nkind = \"holding\"\naddress = 0\ntype = \"u16\"\n\
[[bus.device.point]]\nname = \"temperature\"\nunit = \"°C\"\nkind = \"holding\"\naddress = 1\ntype = \"i16\"\nscale = 0.1\n\
[[bus.device.point]]\nname = \"counter\"\nkind = \"holding\"\naddress = 50\ntype = \"u16\"\n\
[[bus.device.point]]\nname = \"running\"\nkind = \"coil\"\naddress = 0\ntype = \"bool\"\n";

fn config(store: &Path, broker: &Mosquitto, slave_port: u16, extra_upstream: &str) -> String {
    format!(
        "[agent]\nprefix = \"fb\"\nqos = 1\n\n[store]\npath = {store:?}\ncommit_interval_ms = 20\n\n\
         [upstream]\nurl = {url:?}\nclient_id = \"fieldbridge-spb\"\nbackoff_min_ms = 50\nbackoff_max_ms = 300\n\
         format = \"sparkplug\"\ngroup_id = \"{GROUP}\"\nedge_node_id = \"{NODE}\"\n{extra_upstream}\n\
         [[bus]]\nname = \"line\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {slave_port}\n\n\
         [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 200\ntimeout_ms = 2000\nretries = 0\nquarantine_after = 100\n\n{POINTS}",
        store = store.display().to_string(),
        url = broker.url(),
    )
}

/// Seq numbers of every message of the edge node but NDEATH go up by one, mod 256, from an NBIRTH's 0;
/// each NBIRTH starts over.
fn assert_seq_continuity(messages: &[Value]) {
    let mut expected: Option<u64> = None;
    let from_node = |m: &&Value| !matches!(m["type"].as_str(), Some("NDEATH" | "NCMD" | "DCMD"));
    for m in messages.iter().filter(from_node) {
        let seq = m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}"));
        if m["type"] == "NBIRTH" {
            assert_eq!(seq, 0, "NBIRTH seq: {m}");
        } else if let Some(want) = expected {
            assert_eq!(seq, want, "seq continuity at {m}");
        }
        expected = Some((seq + 1) % 256);
    }
}

fn broker() -> Mosquitto {
    Mosquitto::start_with(Options {
        // The host's persistent session keeps QoS 0 births across a broker restart
        // too; subscriptions are logged, so a test can wait for the agent's.
        extra: vec![
            "queue_qos0_messages true".into(),
            "log_type subscribe".into(),
        ],
        ..Options::default()
    })
}

#[test]
fn births_data_and_rebirth_decode_in_an_independent_host() {
    let broker = broker();
    let mut host = Host::start(&broker, "host-births");
    let slave = Slave::tcp(&slave_image());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agent = Agent::start(
        dir.path(),
        &config(&dir.path().join("q.db"), &broker, slave.port(), ""),
    );

    let messages = host.wait("NBIRTH, DBIRTH and live DDATA of every point", |all| {
        let live: Vec<&Value> = all
            .iter()
            .filter(|m| m["type"] == "DDATA")
            .flat_map(|m| m["metrics"].as_array().into_iter().flatten())
            .filter(|m| m["is_historical"] == false)
            .collect();
        ["voltage", "temperature", "counter", "running"]
            .iter()
            .all(|name| live.iter().any(|m| m["name"] == *name))
            .then(|| sparkplug_messages(all))
    });
    assert_decoded(&messages);
    assert_eq!(messages[0]["type"], "NBIRTH", "NBIRTH first: {messages:?}");
    assert_eq!(
        messages[1]["type"], "DBIRTH",
        "then the DBIRTH: {messages:?}"
    );
    let nbirth = &messages[0];
    assert_eq!(nbirth["topic"], format!("spBv1.0/{GROUP}/NBIRTH/{NODE}"));
    assert_eq!(
        (nbirth["qos"].as_u64(), nbirth["retain"].as_bool()),
        (Some(0), Some(false))
    );
    assert_eq!(nbirth["seq"], 0);
    assert_eq!(metric(nbirth, "bdSeq")["datatype"], "INT64");
    assert_eq!(metric(nbirth, "Node Control/Rebirth")["value"], false);
    assert_eq!(
        metric(nbirth, "Node Control/Rebirth")["datatype"],
        "BOOLEAN"
    );

    let dbirth = &messages[1];
    assert_eq!(
        dbirth["topic"],
        format!("spBv1.0/{GROUP}/DBIRTH/{NODE}/meter")
    );
    assert_eq!(
        (dbirth["qos"].as_u64(), dbirth["retain"].as_bool()),
        (Some(0), Some(false))
    );
    let want = [
        ("voltage", "UINT16", Some("V")),
        ("temperature", "DOUBLE", Some("°C")),
        ("counter", "UINT16", None),
        ("running", "BOOLEAN", None),
    ];
    let mut aliases = Vec::new();
    for (name, datatype, unit) in want {
        let m = metric(dbirth, name);
        assert_eq!(m["datatype"], datatype, "{m}");
        assert_eq!(
            m["properties"].get("engUnit").and_then(Value::as_str),
            unit,
            "{m}"
        );
        aliases.push(m["alias"].as_u64().expect("alias"));
    }
    aliases.sort_unstable();
    aliases.dedup();
    assert_eq!(aliases.len(), 4, "aliases unique: {dbirth}");

    let ddata = of_type(&messages, "DDATA");
    for d in &ddata {
        for m in d["metrics"].as_array().expect("metrics") {
            assert!(m["alias"].is_u64(), "{m}");
            assert!(m["name"].is_string(), "the host resolved the alias: {m}");
            assert_eq!(m["properties"]["Quality"], 192, "{m}");
        }
    }
    let values: Vec<(String, Value)> = ddata
        .iter()
        .flat_map(|d| d["metrics"].as_array().cloned().unwrap_or_default())
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["value"].clone(),
            )
        })
        .collect();
    assert!(
        values.contains(&("voltage".into(), json!(230))),
        "{values:?}"
    );
    assert!(
        values.contains(&("temperature".into(), json!(21.5))),
        "{values:?}"
    );
    assert!(
        values.contains(&("running".into(), json!(true))),
        "{values:?}"
    );

    let bd_seq = metric(nbirth, "bdSeq")["value"].clone();
    host.send(&format!("rebirth {NODE}"));
    let messages = host.wait("a second NBIRTH and DBIRTH", |all| {
        let births: Vec<&Value> = all.iter().filter(|m| m["type"] == "DBIRTH").collect();
        (births.len() >= 2).then(|| sparkplug_messages(all))
    });
    let nbirths = of_type(&messages, "NBIRTH");
    assert_eq!(nbirths.len(), 2, "{messages:?}");
    assert_eq!(nbirths[1]["seq"], 0);
    assert_eq!(
        metric(nbirths[1], "bdSeq")["value"],
        bd_seq,
        "a rebirth keeps the bdSeq"
    );
    host.wait("DDATA after the rebirth", |all| {
        let after = all.iter().rposition(|m| m["type"] == "DBIRTH")?;
        all[after..]
            .iter()
            .any(|m| m["type"] == "DDATA")
            .then_some(())
    });
    assert_seq_continuity(&host.messages());
    agent.stop();
    assert!(
        broker.log().contains("as fieldbridge-spb (p2, c1"),
        "a clean session: {}",
        broker.log()
    );
}

#[test]
fn kill_9_makes_the_broker_publish_ndeath_with_the_bdseq_of_the_nbirth_and_a_restart_counts_on() {
    let broker = broker();
    let host = Host::start(&broker, "host-death");
    let slave = Slave::tcp(&slave_image());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agent = Agent::start(
        dir.path(),
        &config(&dir.path().join("q.db"), &broker, slave.port(), ""),
    );
    let first = host.wait("the first NBIRTH", |all| {
        all.iter().find(|m| m["type"] == "NBIRTH").cloned()
    });
    let bd_seq = metric(&first, "bdSeq")["value"].as_u64().expect("bdSeq");
    agent.kill9();
    let death = host.wait("NDEATH published by the broker", |all| {
        all.iter().find(|m| m["type"] == "NDEATH").cloned()
    });
    assert_eq!(death["bdSeq"], bd_seq, "NDEATH matches NBIRTH: {death}");
    assert_eq!(death["seq"], Value::Null, "NDEATH carries no seq");
    assert_eq!(
        (death["qos"].as_u64(), death["retain"].as_bool()),
        (Some(1), Some(false))
    );

    agent.launch();
    let second = host.wait("the NBIRTH after the restart", |all| {
        all.iter().filter(|m| m["type"] == "NBIRTH").nth(1).cloned()
    });
    let next = metric(&second, "bdSeq")["value"].as_u64().expect("bdSeq");
    assert_eq!(next, (bd_seq + 1) % 256, "bdSeq kept across the restart");
    agent.stop();
    let deaths = host.wait("NDEATH of the graceful stop", |all| {
        let deaths: Vec<Value> = all
            .iter()
            .filter(|m| m["type"] == "NDEATH")
            .cloned()
            .collect();
        (deaths.len() >= 2).then_some(deaths)
    });
    assert_eq!(deaths[1]["bdSeq"], next, "{deaths:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("q.db.bdseq"))
            .expect("bdseq file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o640, "{mode:o}");
}

#[test]
fn a_device_outage_is_ddeath_and_its_return_dbirth() {
    let broker = broker();
    let host = Host::start(&broker, "host-device");
    let mut slave = Slave::tcp(&slave_image());
    let port = slave.port();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agent = Agent::start(
        dir.path(),
        &config(&dir.path().join("q.db"), &broker, port, ""),
    );
    host.wait("DDATA of the meter", |all| {
        all.iter().any(|m| m["type"] == "DDATA").then_some(())
    });
    slave.kill();
    host.wait("DDEATH of the meter", |all| {
        all.iter()
            .any(|m| m["type"] == "DDEATH" && m["device"] == "meter")
            .then_some(())
    });
    let _slave = Slave::tcp_on(port, &slave_image());
    let messages = host.wait("DBIRTH and DDATA of the meter after the DDEATH", |all| {
        let death = all.iter().position(|m| m["type"] == "DDEATH")?;
        let birth = death + all[death..].iter().position(|m| m["type"] == "DBIRTH")?;
        all[birth..]
            .iter()
            .any(|m| m["type"] == "DDATA" && metric(m, "voltage")["value"] == 230)
            .then(|| all.to_vec())
    });
    let rebirth = messages
        .iter()
        .skip_while(|m| m["type"] != "DDEATH")
        .find(|m| m["type"] == "DBIRTH")
        .expect("DBIRTH");
    assert_eq!(
        rebirth["metrics"].as_array().map(Vec::len),
        Some(4),
        "{rebirth}"
    );
    // Readings that failed while the device was away are null with a bad quality.
    let bad = messages
        .iter()
        .filter(|m| m["type"] == "DDATA")
        .flat_map(|m| m["metrics"].as_array().cloned().unwrap_or_default())
        .find(|m| m["is_null"] == true);
    if let Some(bad) = bad {
        assert_ne!(bad["properties"]["Quality"], 192, "{bad}");
    }
    assert_seq_continuity(&sparkplug_messages(&messages));
    agent.stop();
}

#[test]
fn readings_stored_during_an_upstream_outage_arrive_once_as_historical_ddata_in_order() {
    let mut broker = broker();
    let host = Host::start(&broker, "host-history");
    let slave = Slave::tcp(&slave_image());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agent = Agent::start(
        dir.path(),
        &config(&dir.path().join("q.db"), &broker, slave.port(), ""),
    );
    host.wait("live DDATA", |all| {
        all.iter().any(|m| m["type"] == "DDATA").then_some(())
    });
    broker.stop();
    // Readings pile up in the store while the broker is down.
    agent.wait_log("upstream", 1);
    wait_for("readings stored during the outage", ARRIVE, || {
        let conn = rusqlite::Connection::open_with_flags(
            dir.path().join("q.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .ok()?;
        let rows: i64 = conn
            .query_row(
                "SELECT count(*) FROM message WHERE topic LIKE '%/DDATA/%'",
                [],
                |r| r.get(0),
            )
            .ok()?;
        (rows >= 40).then_some(())
    });
    broker.restart();
    let messages = host.wait("historical DDATA then live DDATA again", |all| {
        let last_hist = all
            .iter()
            .rposition(|m| m["type"] == "DDATA" && m["metrics"][0]["is_historical"] == true)?;
        all[last_hist..]
            .iter()
            .any(|m| m["type"] == "DDATA" && m["metrics"][0]["is_historical"] == false)
            .then(|| sparkplug_messages(all))
    });
    assert_decoded(&messages);
    // The broker redelivers to the host (QoS 1, its persistent session) what it had not
    // seen acknowledged before the restart: the same message again, same seq. Those are
    // the broker's copies, not readings sent twice.
    let mut seen = std::collections::HashSet::new();
    let messages: Vec<Value> = messages
        .into_iter()
        .filter(|m| {
            seen.insert((
                m["topic"].to_string(),
                m["seq"].to_string(),
                m["timestamp"].to_string(),
                m["metrics"].to_string(),
            ))
        })
        .collect();
    let counters: Vec<(u64, bool, u64)> = messages
        .iter()
        .filter(|m| m["type"] == "DDATA")
        .flat_map(|m| m["metrics"].as_array().cloned().unwrap_or_default())
        .filter(|m| m["name"] == "counter" && m["is_null"] == false)
        .map(|m| {
            (
                m["value"].as_u64().expect("counter value"),
                m["is_historical"].as_bool().expect("flag"),
                m["timestamp"].as_u64().expect("timestamp"),
            )
        })
        .collect();
    let historical: Vec<&(u64, bool, u64)> = counters.iter().filter(|c| c.1).collect();
    assert!(historical.len() >= 10, "{counters:?}");
    // Each reading once, in order, with its own (increasing) timestamp.
    let values: Vec<u64> = counters.iter().map(|c| c.0).collect();
    for pair in values.windows(2) {
        assert!(pair[1] > pair[0], "each reading once, in order: {values:?}");
    }
    for pair in historical.windows(2) {
        assert!(pair[1].2 > pair[0].2, "original timestamps: {historical:?}");
    }
    // None lost: the counter counts every poll, so consecutive readings differ by 1
    // (the test host never reads it).
    let gaps: Vec<&[u64]> = values.windows(2).filter(|p| p[1] != p[0] + 1).collect();
    assert!(gaps.is_empty(), "readings lost: {gaps:?} in {values:?}");
    // The new session: births first, then the backlog (historical), then live data.
    // (Before the outage, DDATA that repeat a value the DBIRTH already carried are
    // historical too: no news to the host.)
    let births = messages
        .iter()
        .rposition(|m| m["type"] == "NBIRTH")
        .expect("NBIRTH");
    let kinds: Vec<String> = messages[births..]
        .iter()
        .map(|m| format!("{} {}", m["type"], m["metrics"][0]["is_historical"]))
        .collect();
    let backlog = messages[births..]
        .iter()
        .skip_while(|m| m["type"] != "DDATA")
        .take_while(|m| m["metrics"][0]["is_historical"] == true)
        .count();
    assert!(
        kinds[1].starts_with("\"DBIRTH\"") && backlog >= 40,
        "NBIRTH, DBIRTH, the backlog of at least 40 rows: {kinds:?}"
    );
    assert_seq_continuity(&messages[births..]);
    agent.stop();
}

#[test]
fn births_wait_for_the_primary_host_and_its_offline_state_closes_the_connection() {
    let broker = broker();
    let mut host = Host::start(&broker, "host-primary");
    let slave = Slave::tcp(&slave_image());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agent = Agent::start(
        dir.path(),
        &config(
            &dir.path().join("q.db"),
            &broker,
            slave.port(),
            "primary_host_id = \"scada\"\n",
        ),
    );
    agent.wait_log("upstream connected", 1);
    // Connected, subscribed, and waiting: nothing is born until the host is online
    // (without a primary host, births follow the SUBSCRIBE in the same write).
    wait_for("the agent's STATE subscription", ARRIVE, || {
        broker
            .log()
            .contains("fieldbridge-spb 1 spBv1.0/STATE/scada")
            .then_some(())
    });
    assert!(
        poll_until(Duration::from_millis(1500), || {
            host.messages()
                .iter()
                .any(|m| m["type"] == "NBIRTH")
                .then_some(())
        })
        .is_none(),
        "NBIRTH before the primary host was online: {:?}",
        host.messages()
    );
    host.send("state scada online");
    host.wait("NBIRTH once the host is online", |all| {
        all.iter().any(|m| m["type"] == "NBIRTH").then_some(())
    });
    host.send("state scada offline");
    host.wait("NDEATH (the will) once the host went offline", |all| {
        all.iter().any(|m| m["type"] == "NDEATH").then_some(())
    });
    agent.wait_log("primary host application went offline", 1);
    agent.stop();
}

#[test]
fn dcmd_writes_through_the_write_rules_and_reads_back() {
    let broker = broker();
    let mut host = Host::start(&broker, "host-dcmd");
    let results = Subscriber::start(&broker, &["fb/+/+/set/result"], SubOptions::default());
    let slave = Slave::tcp(&json!({"units": {"1": {
        "holding": {"0": [230, 215, 200]},
        "coil": {"0": [1]},
        "counter": [{"kind": "holding", "address": 50}]
    }}}));
    let dir = tempfile::tempdir().expect("temp dir");
    let setpoint = "[[bus.device.point]]\nname = \"setpoint\"\nunit = \"°C\"\nkind = \"holding\"\naddress = 2\n\
                    type = \"i16\"\nscale = 0.1\nwritable = true\nmin = 5.0\nmax = 30.0\n";
    let text = config(&dir.path().join("q.db"), &broker, slave.port(), "") + setpoint;
    let mut agent = Agent::start(dir.path(), &text);
    let birth = host.wait("DBIRTH with the setpoint", |all| {
        all.iter().find(|m| m["type"] == "DBIRTH").cloned()
    });
    assert_eq!(metric(&birth, "setpoint")["datatype"], "DOUBLE");

    host.send(&format!("dcmd {NODE} meter setpoint 22.5"));
    host.wait("the read-back 22.5 in DDATA", |all| {
        all.iter()
            .filter(|m| m["type"] == "DDATA")
            .flat_map(|m| m["metrics"].as_array().cloned().unwrap_or_default())
            .any(|m| m["name"] == "setpoint" && m["value"] == 22.5)
            .then_some(())
    });
    let ok = results.wait_for_count(1, ARRIVE);
    let result: Value = serde_json::from_str(&ok[0].payload).expect("result JSON");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["readback"], 22.5, "{result}");

    host.send(&format!("dcmd {NODE} meter setpoint 99.0"));
    let refused = results.wait_for_count(2, ARRIVE);
    let result: Value = serde_json::from_str(&refused[1].payload).expect("result JSON");
    assert_eq!(result["ok"], false, "above max is refused: {result}");
    agent.stop();
}

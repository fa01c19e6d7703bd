//! End to end, with real parts only: an independent Modbus slave (pymodbus), the
//! `fieldbridge` binary, a real mosquitto upstream, and mosquitto_sub on both brokers.
//!
//! The no-loss test is a few seconds long here; `scripts/soak.sh` runs the same test
//! for as long as asked (`FIELDBRIDGE_SOAK_SECS`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::clients::Sub;
use common::mosquitto::{retained, Mosquitto, SubOptions, Subscriber};
use common::slave::Slave;
use common::util::{free_port, poll_until, wait_for, wait_for_port};
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(15);
const ARRIVE: Duration = Duration::from_secs(20);

/// The JSON `value` of a reading payload.
fn value_of(payload: &str) -> Option<Value> {
    serde_json::from_str::<Value>(payload)
        .ok()
        .map(|reading| reading["value"].clone())
}

/// Reads the counter register itself (which counts this read too): every value the
/// agent reads later is larger.
fn read_counter(port: u16, address: u16) -> u16 {
    use tokio_modbus::client::Reader;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut ctx = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(1)),
        )
        .await
        .expect("connect to the slave in time")
        .expect("connect to the slave");
        let words = tokio::time::timeout(
            Duration::from_secs(5),
            ctx.read_holding_registers(address, 1),
        )
        .await
        .expect("slave answers in time")
        .expect("transport")
        .expect("no exception");
        words[0]
    })
}

/// Counter values of the `counter` point still queued in the store's database (the
/// agent is not running).
fn queued_counter_values(db: &Path) -> Vec<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the store read-only");
    let mut statement = conn
        .prepare("SELECT payload FROM message WHERE topic LIKE '%/counter'")
        .expect("query the store");
    let rows = statement
        .query_map([], |row| row.get::<_, Vec<u8>>(0))
        .expect("read the store");
    rows.filter_map(Result::ok)
        .filter_map(|payload| value_of(&String::from_utf8_lossy(&payload)))
        .filter_map(|value| value.as_u64())
        .collect()
}

/// The counter values `up` received on `topic`, in arrival order.
fn counter_values(up: &Subscriber, topic: &str) -> Vec<u64> {
    up.messages()
        .iter()
        .filter(|m| m.topic == topic)
        .filter_map(|m| value_of(&m.payload)?.as_u64())
        .collect()
}

fn counter_slave() -> Slave {
    Slave::tcp(&json!({
        "units": {"1": {
            "holding": {"0": [215, 1000]},
            "counter": [{"kind": "holding", "address": 50}]
        }}
    }))
}

struct Setup<'a> {
    prefix: &'a str,
    broker_port: Option<u16>,
    upstream: Option<&'a str>,
    store: &'a Path,
    slave_port: u16,
    poll_ms: u64,
    qos: u8,
    retain_upstream: bool,
    points: &'a str,
}

fn config(setup: &Setup<'_>) -> String {
    let mut text = format!(
        "[agent]\nprefix = {prefix:?}\nhealth_interval_secs = 1\nretain_upstream = {retain_upstream}\nqos = {qos}\n\n[store]\npath = {store:?}\ncommit_interval_ms = 20\n\n",
        prefix = setup.prefix,
        qos = setup.qos,
        retain_upstream = setup.retain_upstream,
        store = setup.store.display().to_string(),
    );
    if let Some(port) = setup.broker_port {
        text.push_str(&format!(
            "[broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n\n"
        ));
    }
    if let Some(url) = setup.upstream {
        text.push_str(&format!(
            "[upstream]\nurl = {url:?}\nclient_id = \"fieldbridge-e2e\"\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n\n"
        ));
    }
    text.push_str(&format!(
        "[[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}\n\n\
         [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = {poll}\ntimeout_ms = 2000\n\n{points}",
        port = setup.slave_port,
        poll = setup.poll_ms,
        points = setup.points,
    ));
    text
}

const COUNTER_POINT: &str =
    "[[bus.device.point]]\nname = \"counter\"\nkind = \"holding\"\naddress = 50\ntype = \"u16\"\n";
const VOLTAGE_POINT: &str = "[[bus.device.point]]\nname = \"voltage\"\nunit = \"V\"\nkind = \"holding\"\naddress = 0\ntype = \"u16\"\nscale = 1.0\n";
const VOLTAGE_AND_ENERGY: &str = "[[bus.device.point]]\nname = \"voltage\"\nunit = \"V\"\nkind = \"holding\"\naddress = 0\ntype = \"u16\"\nscale = 1.0\n\
     [[bus.device.point]]\nname = \"energy\"\nunit = \"kWh\"\nkind = \"holding\"\naddress = 1\ntype = \"u16\"\n";

/// Messages of `topic` among mosquitto_sub `-v` lines (`topic payload`).
fn payloads(lines: &[String], topic: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| line.split_once(' '))
        .filter(|(t, _)| *t == topic)
        .map(|(_, payload)| payload.to_string())
        .collect()
}

#[test]
fn values_arrive_on_both_brokers_retained_with_status_and_health() {
    let slave = counter_slave();
    let upstream = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker_port = free_port();
    let prefix = "e2e/both";
    let _agent = Agent::start(
        dir.path(),
        &config(&Setup {
            prefix,
            broker_port: Some(broker_port),
            upstream: Some(&upstream.url()),
            store: &dir.path().join("queue.db"),
            slave_port: slave.port(),
            poll_ms: 200,
            qos: 1,
            retain_upstream: true,
            points: VOLTAGE_POINT,
        }),
    );
    wait_for_port(broker_port, START);
    let up = Subscriber::start(&upstream, &[&format!("{prefix}/#")], SubOptions::default());
    let local = Sub::start(broker_port, &["-v", "-t", &format!("{prefix}/#")]);

    let voltage = format!("{prefix}/meter/voltage");
    wait_for("a voltage reading upstream", ARRIVE, || {
        up.messages()
            .iter()
            .find(|m| m.topic == voltage)
            .map(|m| assert_eq!(value_of(&m.payload), Some(json!(215)), "{m:?}"))
    });
    wait_for("a voltage reading on the local broker", ARRIVE, || {
        payloads(&local.messages(), &voltage)
            .first()
            .map(|payload| assert_eq!(value_of(payload), Some(json!(215)), "{payload}"))
    });

    // Health on both brokers, with the figures the issue names.
    let health = format!("{prefix}/health");
    let report = wait_for("a health report on the local broker", ARRIVE, || {
        payloads(&local.messages(), &health).into_iter().next()
    });
    let report: Value = serde_json::from_str(&report).expect("health is JSON");
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"), "{report}");
    assert!(report["uptime_secs"].is_u64(), "{report}");
    assert!(report["queue"]["depth"].is_u64(), "{report}");
    assert!(report["readings"]["per_sec"].is_number(), "{report}");
    assert_eq!(
        report["buses"]["plant"]["devices"]["meter"], "online",
        "{report}"
    );
    assert!(
        report["buses"]["plant"]["requests"].as_u64() > Some(0),
        "{report}"
    );
    assert_eq!(report["upstream"]["state"], "connected", "{report}");
    for dropped in ["store_refused", "queue", "upstream", "lan"] {
        assert_eq!(report["dropped"][dropped], 0, "{report}");
    }
    wait_for("a health report upstream", ARRIVE, || {
        up.messages()
            .iter()
            .any(|m| m.topic == health)
            .then_some(())
    });

    // Retained: a subscriber arriving now gets the last values at once, on both sides.
    let late = Sub::start(
        broker_port,
        &[
            "-v",
            "-t",
            &voltage,
            "--retained-only",
            "-C",
            "1",
            "-W",
            "5",
        ],
    );
    let lines = late.wait_messages(1, ARRIVE);
    assert_eq!(value_of(&payloads(&lines, &voltage)[0]), Some(json!(215)));
    for topic in [format!("{prefix}/status"), format!("{prefix}/meter/status")] {
        let local_status = Sub::start(
            broker_port,
            &["-v", "-t", &topic, "--retained-only", "-C", "1", "-W", "5"],
        );
        assert_eq!(
            payloads(&local_status.wait_messages(1, ARRIVE), &topic),
            ["online"]
        );
        let up_status = wait_for(&format!("retained {topic} upstream"), ARRIVE, || {
            retained(&upstream, &topic)
        });
        assert_eq!(up_status.payload, "online", "{topic}");
    }
    let up_voltage = wait_for("retained voltage upstream", ARRIVE, || {
        retained(&upstream, &voltage)
    });
    assert_eq!(value_of(&up_voltage.payload), Some(json!(215)));
}

#[test]
fn sigterm_publishes_offline_exits_zero_and_loses_nothing_accepted() {
    let mut slave = counter_slave();
    let upstream = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker_port = free_port();
    let prefix = "e2e/term";
    let text = config(&Setup {
        prefix,
        broker_port: Some(broker_port),
        upstream: Some(&upstream.url()),
        store: &dir.path().join("queue.db"),
        slave_port: slave.port(),
        poll_ms: 20,
        qos: 1,
        retain_upstream: false,
        points: COUNTER_POINT,
    });
    let counter = format!("{prefix}/meter/counter");
    let status = format!("{prefix}/status");
    // Subscribed before the agent starts: the first reading goes upstream within one
    // poll, and a subscription made after it would miss it (seen on a busy machine:
    // value 1 "missing").
    let up = Subscriber::start(
        &upstream,
        &[&counter, &status],
        SubOptions {
            qos: 1,
            client_id: Some("e2e-term-sub".into()),
            v5: false,
        },
    );
    let mut agent = Agent::start(dir.path(), &text);
    wait_for_port(broker_port, START);
    let local = Sub::start(broker_port, &["-v", "-t", &status]);
    up.wait_for_count(20, ARRIVE);

    agent.signal("TERM");
    // Generous: how long the shutdown takes is not what this test judges; that no
    // step of it ran into `agent.shutdown_timeout_ms` is, from the log below.
    let exit = agent.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "exit status {exit}");
    let log = agent.log();
    assert!(log.contains("shutting down signal=\"SIGTERM\""), "{log}");
    assert!(log.contains("pipeline committed"), "{log}");
    assert!(log.contains("upstream disconnected"), "{log}");
    assert!(!log.contains("did not stop in time"), "{log}");
    assert!(log.contains("fieldbridge stopped"), "{log}");
    assert_eq!(
        payloads(&local.wait_messages(2, ARRIVE), &status),
        ["online", "offline"]
    );
    let offline = wait_for("retained offline upstream", ARRIVE, || {
        retained(&upstream, &status).filter(|m| m.payload == "offline")
    });
    assert!(offline.retained);

    // Every reading handed to the pipeline before SIGTERM was committed: after a
    // restart (which drains the store) the subscriber has all of them, without a gap.
    // Only the poll SIGTERM interrupted (read from the slave, never handed over) may
    // be missing, and it is the last value below the boundary.
    let boundary = u64::from(read_counter(slave.port(), 50));
    agent.launch();
    let missing = || -> Vec<u64> {
        let values: BTreeSet<u64> = up
            .messages()
            .iter()
            .filter(|m| m.topic == counter)
            .filter_map(|m| value_of(&m.payload)?.as_u64())
            .collect();
        (1..boundary).filter(|v| !values.contains(v)).collect()
    };
    let complete = poll_until(ARRIVE, || {
        let missing = missing();
        (missing.is_empty() || missing == [boundary - 1]).then_some(())
    });
    assert!(
        complete.is_some(),
        "values below the boundary {boundary} missing upstream: {:?}\nreceived: {:?}",
        missing(),
        up.messages()
            .iter()
            .map(|m| format!("{} {}", m.topic, m.payload))
            .collect::<Vec<_>>()
    );
    agent.signal("TERM");
    let exit = agent.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "{exit}");
    slave.kill();
}

#[test]
fn sighup_adds_a_point_keeps_queue_and_session_and_rejects_a_broken_config() {
    let slave = counter_slave();
    let mut upstream = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker_port = free_port();
    let prefix = "e2e/hup";
    let db = dir.path().join("queue.db");
    let setup = |points: &'static str, url: String| {
        config(&Setup {
            prefix,
            broker_port: Some(broker_port),
            upstream: Some(&url),
            store: &db,
            slave_port: slave.port(),
            poll_ms: 100,
            qos: 1,
            retain_upstream: false,
            points,
        })
    };
    let mut agent = Agent::start(dir.path(), &setup(VOLTAGE_POINT, upstream.url()));
    wait_for_port(broker_port, START);
    let local = Sub::start(broker_port, &["-v", "-t", &format!("{prefix}/meter/+")]);
    let energy = format!("{prefix}/meter/energy");
    local.wait_messages(1, ARRIVE);
    agent.wait_log("upstream connected", 1);

    // With the upstream down, the queue fills: a reload must leave it alone.
    upstream.stop();
    let depth = || -> u64 {
        let output = Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
            .args(["queue", "stats", "--db"])
            .arg(&db)
            .output()
            .expect("run queue stats");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stats: Value = serde_json::from_slice(&output.stdout).expect("stats JSON");
        stats["depth"].as_u64().expect("depth")
    };
    let before = wait_for("readings queued while upstream is down", ARRIVE, || {
        let depth = depth();
        (depth >= 5).then_some(depth)
    });

    std::fs::write(agent.config(), setup(VOLTAGE_AND_ENERGY, upstream.url()))
        .expect("rewrite config");
    agent.signal("HUP");
    agent.wait_log("device maps reloaded", 1);
    wait_for("the new point on the local broker", ARRIVE, || {
        payloads(&local.messages(), &energy)
            .first()
            .map(|payload| assert_eq!(value_of(payload), Some(json!(1000))))
    });
    assert!(
        depth() >= before,
        "the reload must not drop queued readings"
    );

    // A broken config is rejected and the running one goes on.
    std::fs::write(agent.config(), "[agent]\nprefix = \"x/#\"\n[broker]\n").expect("break config");
    agent.signal("HUP");
    agent.wait_log("reload rejected", 1);
    assert!(
        agent.is_running(),
        "a broken config must not stop the agent"
    );
    let seen = payloads(&local.messages(), &energy).len();
    wait_for("energy readings after the rejected reload", ARRIVE, || {
        (payloads(&local.messages(), &energy).len() > seen + 2).then_some(())
    });
    assert!(agent
        .log()
        .contains("agent.prefix: must not contain MQTT wildcards"));

    // The upstream session was never touched by either reload: one connection, and the
    // queue drains into it once the broker is back.
    upstream.restart();
    let up = Subscriber::start(&upstream, &[&energy], SubOptions::default());
    up.wait_for_count(1, ARRIVE);
    wait_for("the queue to drain", ARRIVE, || {
        (depth() < before).then_some(())
    });
    assert_eq!(
        agent.log().matches("store opened").count(),
        1,
        "store reopened"
    );
}

/// Kills the agent with SIGKILL several times and restarts the upstream mosquitto
/// several times while a counter register is polled every few ms, then checks what the
/// upstream subscriber got against what the agent accepted:
///
/// - every counter value found in the store's database after a kill arrives;
/// - the only values that may be missing are the last ones read before a kill (read
///   but not yet committed): a run of missing values must end right below the value
///   the test itself read from the slave after that kill;
/// - QoS 2: no value arrives twice.
fn no_loss_under_kill_9(qos: u8) {
    let secs: u64 = std::env::var("FIELDBRIDGE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let poll_ms: u64 = std::env::var("FIELDBRIDGE_SOAK_POLL_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let slave = counter_slave();
    let mut upstream = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("queue.db");
    let prefix = format!("e2e/loss{qos}");
    let counter = format!("{prefix}/meter/counter");
    let up = Subscriber::start(
        &upstream,
        &[&counter],
        SubOptions {
            qos,
            client_id: Some(format!("e2e-loss-sub-{qos}")),
            v5: false,
        },
    );
    let mut agent = Agent::start(
        dir.path(),
        &config(&Setup {
            prefix: &prefix,
            broker_port: None,
            upstream: Some(&upstream.url()),
            store: &db,
            slave_port: slave.port(),
            poll_ms,
            qos,
            retain_upstream: false,
            points: COUNTER_POINT,
        }),
    );

    let values = |up: &Subscriber| counter_values(up, &counter);
    let mut kill_boundaries = BTreeSet::new();
    // Values the test read at upstream restarts: markers in the sequence, not holes.
    let mut restart_marks = BTreeSet::new();
    let mut must_arrive = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut round = 0u32;
    while Instant::now() < deadline || round < 4 {
        round += 1;
        let seen = values(&up).len();
        wait_for("progress upstream", ARRIVE, || {
            (values(&up).len() > seen + 5).then_some(())
        });
        if round % 2 == 0 {
            // A graceful restart of the upstream (SIGTERM): mosquitto saves its sessions.
            upstream.stop();
            restart_marks.insert(u64::from(read_counter(slave.port(), 50)));
            upstream.restart();
            up.wait_ready();
        } else {
            agent.kill9();
            kill_boundaries.insert(u64::from(read_counter(slave.port(), 50)));
            must_arrive.extend(queued_counter_values(&db));
            agent.launch();
        }
    }

    // The end: a graceful stop commits everything read; then the boundary, then a
    // restart to drain the store.
    agent.signal("TERM");
    assert!(
        agent.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        agent.log()
    );
    let end = u64::from(read_counter(slave.port(), 50));
    must_arrive.extend(queued_counter_values(&db));
    agent.launch();

    // What can be read but not yet committed when kill -9 strikes: a couple of seconds
    // of polls at most (the group commit runs every 20 ms).
    let max_tail = (2000 / poll_ms).max(10);
    let check = |received: &[u64]| -> Result<(), String> {
        let got: BTreeSet<u64> = received.iter().copied().collect();
        let lost: Vec<u64> = must_arrive
            .iter()
            .filter(|v| **v < end && !got.contains(v))
            .copied()
            .collect();
        if !lost.is_empty() {
            return Err(format!("queued values never arrived: {lost:?}"));
        }
        let mut missing = Vec::new();
        for value in 1..end {
            if got.contains(&value)
                || kill_boundaries.contains(&value)
                || restart_marks.contains(&value)
            {
                continue;
            }
            // A hole is allowed only when it runs up to a kill boundary (read, not yet
            // committed when killed), or when it is the single poll the graceful stop
            // interrupted (read from the slave, never handed to the pipeline).
            let hole_end = (value..end).find(|v| got.contains(v) || kill_boundaries.contains(v));
            let allowed = match hole_end {
                Some(next) => kill_boundaries.contains(&next) && next - value <= max_tail,
                None => value == end - 1,
            };
            if !allowed {
                missing.push(value);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("values lost outside any kill: {missing:?}"))
        }
    };
    let deadline = Instant::now() + ARRIVE;
    let received = loop {
        let received = values(&up);
        match check(&received) {
            Ok(()) => break received,
            Err(problem) if Instant::now() > deadline => panic!(
                "{problem} (kill -9 after {kill_boundaries:?}, upstream restarts after \
                 {restart_marks:?}, graceful stop after {end}; {} received)",
                received.len()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if qos == 2 {
        let mut counts = BTreeMap::new();
        for value in received.iter().filter(|v| **v < end) {
            *counts.entry(*value).or_insert(0u32) += 1;
        }
        let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            duplicates.is_empty(),
            "QoS 2 duplicates: {duplicates:?} (kill -9 after {kill_boundaries:?}, upstream \
             restarts after {restart_marks:?}, graceful stop after {end})"
        );
    }
    let distinct: BTreeSet<u64> = received.iter().copied().filter(|v| *v < end).collect();
    eprintln!(
        "qos {qos}: {} rounds, {} values read, {} arrived ({} deliveries), {} kill -9 boundaries",
        round,
        end - 1,
        distinct.len(),
        received.len(),
        kill_boundaries.len()
    );
    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

/// The fast path at QoS 2 (issue 14), with a commit window of a minute so every reading
/// lives in memory only: acknowledged readings never reach the store file; QoS 2 flows
/// whose PUBLISH the broker took and that kill -9 cut before PUBREL are released by the
/// next process (PUBREL for their packet ids before anything new), so the broker
/// delivers them, once, and never sees one of those packet ids reused for another
/// reading (which a broker that does not compare payloads would take for a duplicate).
/// Fails before the fast path (nothing reaches the broker within the minute) and
/// without the release (no cut flow ever arrives).
#[test]
fn fast_path_qos2_flows_cut_by_kill_9_are_released_not_reused() {
    let slave = counter_slave();
    let upstream = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("queue.db");
    let broker_port = free_port();
    let prefix = "e2e/fast2";
    let counter = format!("{prefix}/meter/counter");
    let up = Subscriber::start(
        &upstream,
        &[&counter],
        SubOptions {
            qos: 2,
            client_id: Some("e2e-fast-sub".to_owned()),
            v5: false,
        },
    );
    let text = config(&Setup {
        prefix,
        broker_port: Some(broker_port),
        upstream: Some(&upstream.url()),
        store: &db,
        slave_port: slave.port(),
        poll_ms: 50,
        qos: 2,
        retain_upstream: false,
        points: COUNTER_POINT,
    })
    .replace("commit_interval_ms = 20", "commit_interval_ms = 60000");
    let mut agent = Agent::start(dir.path(), &text);
    wait_for_port(broker_port, START);
    let local = Sub::start(broker_port, &["-v", "-t", &counter]);
    let values = |up: &Subscriber| counter_values(up, &counter);
    let polled = || -> Vec<u64> {
        payloads(&local.messages(), &counter)
            .iter()
            .filter_map(|p| value_of(p)?.as_u64())
            .collect()
    };
    wait_for("readings upstream from memory", ARRIVE, || {
        (values(&up).len() >= 10).then_some(())
    });
    assert!(
        queued_counter_values(&db).is_empty(),
        "acknowledged readings must never be written to the store"
    );

    // The broker stops answering: PUBLISHes pile up in its socket, unanswered.
    upstream.pause();
    let before = polled().len();
    let cut: Vec<u64> = wait_for("readings polled while upstream is paused", ARRIVE, || {
        let polled = polled();
        (polled.len() >= before + 8).then(|| polled[before..before + 8].to_vec())
    });
    agent.kill9();
    // Now the broker takes those PUBLISHes and answers PUBREC into a closed socket.
    upstream.resume();
    agent.launch();
    // mosquitto reads the PUBLISHes in its socket until its first PUBREC finds the
    // socket closed: the first of them at least. Without the release none would ever
    // arrive (no stored row resends them).
    let received = wait_for("a cut flow delivered", ARRIVE, || {
        let received = values(&up);
        cut.iter().any(|v| received.contains(v)).then_some(received)
    });
    let mut counts = BTreeMap::new();
    for value in &received {
        *counts.entry(*value).or_insert(0u32) += 1;
    }
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "QoS 2 duplicates: {duplicates:?}");
    // New readings flow on, and none of them was taken for a duplicate of a cut flow.
    let after = values(&up).len();
    wait_for("readings after the restart", ARRIVE, || {
        (values(&up).len() > after + 5).then_some(())
    });
    assert!(
        !upstream.log().contains("Reused message ID"),
        "{}",
        upstream.log()
    );
    assert_eq!(agent.count("releasing the QoS 2 flows"), 1);
    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn no_loss_under_kill_9_and_upstream_restarts_qos1() {
    no_loss_under_kill_9(1);
}

#[test]
fn no_loss_under_kill_9_and_upstream_restarts_qos2() {
    no_loss_under_kill_9(2);
}

#[test]
fn a_broker_only_config_runs_a_plain_broker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut agent = Agent::start(
        dir.path(),
        &format!("[broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n"),
    );
    wait_for_port(port, START);
    let sub = Sub::start(port, &["-v", "-t", "plain/#", "-q", "1"]);
    sub.wait_subscribed(START);
    common::clients::publish(port, &["-t", "plain/x", "-m", "hello", "-q", "1"]);
    assert_eq!(sub.wait_messages(1, ARRIVE), ["plain/x hello"]);
    assert!(agent.log().contains("no [upstream]: LAN-only, no store"));
    agent.signal("INT");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn systemd_gets_ready_watchdog_reloading_and_stopping() {
    let slave = counter_slave();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("socket timeout");
    let broker_port = free_port();
    let mut agent = Agent::start_with_env(
        dir.path(),
        &config(&Setup {
            prefix: "e2e/notify",
            broker_port: Some(broker_port),
            upstream: None,
            store: &dir.path().join("queue.db"),
            slave_port: slave.port(),
            poll_ms: 100,
            qos: 1,
            retain_upstream: false,
            points: VOLTAGE_POINT,
        }),
        vec![
            ("NOTIFY_SOCKET".into(), socket_path.display().to_string()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
            ("JOURNAL_STREAM".into(), "8:4242".into()),
        ],
    );
    let mut received = Vec::new();
    let mut next = |what: &str| {
        wait_for(what, START, || {
            let mut buf = [0u8; 512];
            if let Ok(n) = socket.recv(&mut buf) {
                received.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            received.iter().position(|m| m.contains(what)).map(|at| {
                received.drain(..=at);
            })
        })
    };
    next("READY=1");
    // The broker listens by the time READY=1 is sent.
    assert!(std::net::TcpStream::connect(("127.0.0.1", broker_port)).is_ok());
    next("WATCHDOG=1");
    next("WATCHDOG=1");
    agent.signal("HUP");
    next("RELOADING=1");
    next("READY=1");
    agent.signal("TERM");
    next("STOPPING=1");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());

    // Under systemd the journal stamps lines itself: no timestamps, no colours.
    let log = agent.log();
    assert!(log.contains("fieldbridge stopped"), "{log}");
    for line in log.lines() {
        let first = line.trim_start().split(' ').next().unwrap_or_default();
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&first),
            "journal line with a timestamp or colour: {line:?}"
        );
    }
    assert!(!log.contains("withholding watchdog pings"), "{log}");
}

#[test]
fn demo_starts_and_a_subscriber_receives_its_values() {
    let first = free_port();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
        .args(["demo", "--port", &first.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fieldbridge demo");
    let mut stdout = demo.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = tx.send(text.clone());
        }
    });
    let mut printed = String::new();
    let command = wait_for("the printed mosquitto_sub command", START, || {
        while let Ok(text) = rx.try_recv() {
            printed = text;
        }
        printed
            .lines()
            .find(|line| line.trim_start().starts_with("mosquitto_sub "))
            .map(str::trim)
            .map(str::to_string)
    });
    // mosquitto_sub -h 127.0.0.1 -p PORT -t 'fieldbridge/demo/#' -v
    let words: Vec<&str> = command.split_whitespace().collect();
    let port: u16 = words[words.iter().position(|w| *w == "-p").expect("-p") + 1]
        .parse()
        .expect("port number");
    let topic = words[words.iter().position(|w| *w == "-t").expect("-t") + 1].trim_matches('\'');
    assert!(port >= first, "{command}");
    let sub = Sub::start(port, &["-v", "-t", topic]);
    let temperature = wait_for("a demo temperature", ARRIVE, || {
        payloads(&sub.messages(), "fieldbridge/demo/sim/temperature")
            .first()
            .and_then(|payload| value_of(payload)?.as_f64())
    });
    assert!((17.0..=25.0).contains(&temperature), "{temperature}");
    wait_for("the demo energy counter", ARRIVE, || {
        payloads(&sub.messages(), "fieldbridge/demo/sim/energy")
            .first()
            .and_then(|payload| value_of(payload)?.as_u64())
    });

    let status = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let exit = wait_for("demo to exit", Duration::from_secs(10), || {
        demo.try_wait().ok().flatten()
    });
    assert!(exit.success(), "demo exit {exit}");
}

/// Runs `fieldbridge passwd FILE USER` with the password on stdin.
fn passwd(file: &Path, user: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
        .arg("passwd")
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fieldbridge passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let output = child.wait_with_output().expect("wait for passwd");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn passwd_files_work_in_mosquitto_and_sighup_reloads_them_in_the_broker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    passwd(&file, "alice", "wonderland");

    // The file is in mosquitto's own format: Debian's mosquitto accepts it.
    let upstream = Mosquitto::start_with(common::mosquitto::Options {
        extra: vec![format!("password_file {}", file.display())],
        ..Default::default()
    });
    let login = |port: u16, user: &str, password: &str| {
        common::clients::mosquitto_pub(
            port,
            &["-t", "auth/check", "-m", "x", "-u", user, "-P", password],
        )
        .status
        .success()
    };
    assert!(login(upstream.port, "alice", "wonderland"));
    assert!(!login(upstream.port, "alice", "looking-glass"));

    // The built-in broker reads the same file, and re-reads it on SIGHUP.
    let port = free_port();
    let agent = Agent::start(
        dir.path(),
        &format!(
            "[broker]\npassword_file = {:?}\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n",
            file.display().to_string()
        ),
    );
    wait_for_port(port, START);
    assert!(login(port, "alice", "wonderland"));
    assert!(!login(port, "bob", "builder"));
    assert!(
        !login(port, "", ""),
        "anonymous access must be off with a password file"
    );

    passwd(&file, "bob", "builder");
    passwd(&file, "alice", "looking-glass");
    agent.signal("HUP");
    agent.wait_log("broker password and ACL files reloaded", 1);
    assert!(login(port, "bob", "builder"));
    assert!(login(port, "alice", "looking-glass"));
    assert!(!login(port, "alice", "wonderland"));
}

/// Regression: SIGHUP re-read the password and ACL files for new connections only; a
/// user removed from the password file and a subscription the new ACL no longer grants
/// kept receiving on connections opened before the reload.
#[test]
fn sighup_applies_removed_users_and_withdrawn_acl_grants_to_open_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    for (user, password) in [
        ("alice", "wonderland"),
        ("bob", "builder"),
        ("carol", "writer"),
    ] {
        passwd(&file, user, password);
    }
    let acl = dir.path().join("acl");
    let carol = "user carol\ntopic write #\n";
    std::fs::write(
        &acl,
        format!("user alice\ntopic read lab/#\nuser bob\ntopic read lab/#\ntopic read sensors/#\n{carol}"),
    )
    .expect("write acl");
    let port = free_port();
    let agent = Agent::start(
        dir.path(),
        &format!(
            "[broker]\npassword_file = {:?}\nacl_file = {:?}\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n",
            file.display().to_string(),
            acl.display().to_string()
        ),
    );
    wait_for_port(port, START);
    let mut alice = Sub::start(
        port,
        &["-u", "alice", "-P", "wonderland", "-t", "lab/#", "-v"],
    );
    alice.wait_subscribed(START);
    let bob = Sub::start(
        port,
        &[
            "-u",
            "bob",
            "-P",
            "builder",
            "-t",
            "sensors/#",
            "-t",
            "lab/#",
            "-v",
        ],
    );
    bob.wait_subscribed(START);

    let kept: String = std::fs::read_to_string(&file)
        .expect("read passwd")
        .lines()
        .filter(|line| !line.starts_with("alice:"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&file, kept).expect("rewrite passwd");
    std::fs::write(&acl, format!("user bob\ntopic read lab/#\n{carol}")).expect("rewrite acl");
    agent.signal("HUP");
    agent.wait_log("broker password and ACL files reloaded", 1);

    let status = alice.wait_exit(ARRIVE);
    assert!(!status.success(), "alice's client ends: {}", alice.stderr());
    // One publisher after the other, each acknowledged: when the marker arrives, the
    // sensor reading would have arrived before it.
    for (topic, payload) in [("sensors/t", "withdrawn"), ("lab/end", "marker")] {
        common::clients::publish(
            port,
            &[
                "-u", "carol", "-P", "writer", "-q", "1", "-t", topic, "-m", payload,
            ],
        );
    }
    assert_eq!(bob.wait_messages(1, ARRIVE), ["lab/end marker"]);
    let log = agent.log();
    assert!(log.contains("subscriptions withdrawn"), "{log}");
    assert!(log.contains("credentials withdrawn"), "{log}");
}

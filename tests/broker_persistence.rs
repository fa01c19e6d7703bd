//! The LAN broker's queues across crashes, with real parts only: the `fieldbridge`
//! binary (broker-only config, SQLite persistence file), killed with SIGKILL, and
//! `mosquitto_sub -c` / `mosquitto_pub` as the clients.
//!
//! Guards issue 11, part 2: a persistent subscriber (clean session 0) offline while
//! messages arrive lost every queued message on kill -9 of the agent (the queues were
//! written only by the shutdown snapshot), and after a clean restart the snapshot was
//! deleted as soon as it was loaded, so any later crash lost every queue.
//!
//! A test waits for the queued messages to be in the persistence file (the broker's
//! group commit, read from the file with SQLite) before it kills the broker: that is
//! the event "the broker has them", no sleep.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::agent::Agent;
use common::clients::Sub;
use common::util::{free_port, poll_until, tool, wait_for, wait_for_port};

const START: Duration = Duration::from_secs(15);
const ARRIVE: Duration = Duration::from_secs(20);
/// Messages queued for the offline subscriber in each test.
const QUEUED: usize = 100;

/// A `fieldbridge run` process serving only its broker, with its persistence file.
struct Broker {
    agent: Agent,
    db: PathBuf,
    port: u16,
}

impl Broker {
    fn start(dir: &Path, extra: &str) -> Broker {
        let port = free_port();
        let db = dir.join("broker.db");
        let config = format!(
            "[broker]\npersistence_path = \"{}\"\n{extra}\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n",
            db.display()
        );
        let broker = Broker {
            agent: Agent::start(dir, &config),
            db,
            port,
        };
        wait_for_port(port, START);
        broker
    }

    fn launch(&mut self) {
        self.agent.launch();
        wait_for_port(self.port, START);
    }

    fn kill9(&mut self) {
        self.agent.kill9();
    }

    fn stop(&mut self) {
        self.agent.stop();
    }

    fn log(&self) -> String {
        self.agent.log()
    }

    /// Messages the persistence file holds for `client_id` (queued or in flight). A
    /// second connection to the WAL file, as the broker's own would see it.
    fn persisted(&self, client_id: &str) -> usize {
        let conn = rusqlite::Connection::open(&self.db).expect("open the persistence file");
        match conn.query_row(
            "SELECT count(*) FROM queued WHERE client_id = ?1",
            [client_id],
            |r| r.get::<_, i64>(0),
        ) {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(e) => panic!("read the persistence file: {e}"),
        }
    }

    /// Waits until the file holds `n` messages for `client_id`.
    fn wait_persisted(&self, client_id: &str, n: usize) {
        wait_for(
            &format!("{n} queued messages of {client_id} in the persistence file"),
            ARRIVE,
            || (self.persisted(client_id) >= n).then_some(()),
        );
    }
}

/// Opens the persistent session of `id` subscribed to `inbox/#` and leaves it offline
/// (mosquitto_sub -E exits with a DISCONNECT once subscribed).
fn park_subscriber(port: u16, id: &str, qos: u8) {
    let mut sub = Sub::start(
        port,
        &[
            "-c",
            "-i",
            id,
            "-q",
            &qos.to_string(),
            "-t",
            "inbox/#",
            "-E",
        ],
    );
    sub.wait_subscribed(START);
    assert!(sub.wait_exit(START).success(), "{}", sub.stderr());
}

/// Publishes `inbox/a` messages `m1`..`mN` at `qos`, one connection, one per line.
fn publish_lines(port: u16, qos: u8, n: usize) -> Vec<String> {
    let payloads: Vec<String> = (1..=n).map(|i| format!("m{i}")).collect();
    let mut input = tempfile::NamedTempFile::new().expect("temp file");
    writeln!(input, "{}", payloads.join("\n")).expect("write payloads");
    // Not `run_bounded`: that one gives the client no stdin.
    let mut child = Command::new(tool("mosquitto_pub", "mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", &qos.to_string(), "-t", "inbox/a", "-l"])
        .stdin(std::fs::File::open(input.path()).expect("open payloads"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mosquitto_pub");
    let status = poll_until(START, || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "mosquitto_pub -l failed or hung: {status:?}"
    );
    payloads
}

/// Resumes the session of `id` and collects `n` messages.
fn resume_and_receive(port: u16, id: &str, qos: u8, n: usize) -> Vec<String> {
    let mut sub = Sub::start(
        port,
        &[
            "-c",
            "-i",
            id,
            "-q",
            &qos.to_string(),
            "-t",
            "inbox/#",
            "-C",
            &n.to_string(),
        ],
    );
    let got = sub.wait_messages(n, ARRIVE);
    assert!(sub.wait_exit(START).success(), "{}", sub.stderr());
    got
}

fn queued_messages_survive_kill_9(qos: u8) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = Broker::start(dir.path(), "");
    let id = format!("offline-q{qos}");
    park_subscriber(broker.port, &id, qos);
    let sent = publish_lines(broker.port, qos, QUEUED);
    broker.wait_persisted(&id, QUEUED);
    broker.kill9();
    broker.launch();
    assert_eq!(resume_and_receive(broker.port, &id, qos, QUEUED), sent);
}

#[test]
fn queued_messages_of_an_offline_subscriber_survive_kill_9_qos1() {
    queued_messages_survive_kill_9(1);
}

#[test]
fn queued_messages_of_an_offline_subscriber_survive_kill_9_qos2() {
    queued_messages_survive_kill_9(2);
}

/// The snapshot read at start-up stays in the file until its messages are delivered:
/// a crash long after a clean restart still finds them.
#[test]
fn a_crash_after_a_clean_restart_keeps_the_queued_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = Broker::start(dir.path(), "");
    let id = "offline-restarted";
    park_subscriber(broker.port, id, 1);
    let sent = publish_lines(broker.port, 1, QUEUED);
    broker.stop();
    broker.launch();
    assert_eq!(broker.persisted(id), QUEUED, "{}", broker.log());
    broker.kill9();
    broker.launch();
    assert_eq!(resume_and_receive(broker.port, id, 1, QUEUED), sent);
}

/// The latest value of a `$SYS` topic, as a number.
fn sys_number(port: u16, topic: &str) -> u64 {
    let mut sub = Sub::start(port, &["-t", topic, "-C", "1"]);
    let got = sub.wait_messages(1, START);
    assert!(sub.wait_exit(START).success(), "{}", sub.stderr());
    got[0]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{topic} = {:?}", got[0]))
}

/// Issue 11, part 3, with the real binary and real clients: at most `max_sessions`
/// offline sessions (the oldest go first, counted and logged once), offline queues
/// held to the broker-wide budget (drops counted and logged once), and a client
/// online meanwhile gets every message.
#[test]
fn offline_sessions_and_their_queues_are_bounded_and_a_live_client_gets_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start(
        dir.path(),
        "max_sessions = 3\nmax_queued_bytes = 2048\nmax_queued_bytes_total = 2048\nsys_interval_secs = 1",
    );
    for i in 1..=5 {
        park_subscriber(broker.port, &format!("parked-{i}"), 1);
    }
    let live = Sub::start(broker.port, &["-t", "inbox/#", "-q", "1"]);
    live.wait_subscribed(START);
    let sent = publish_lines(broker.port, 1, QUEUED);
    assert_eq!(live.wait_messages(QUEUED, ARRIVE), sent);
    wait_for("the evictions in $SYS", START, || {
        (sys_number(broker.port, "$SYS/broker/clients/evicted") == 2).then_some(())
    });
    assert_eq!(
        sys_number(broker.port, "$SYS/broker/clients/total"),
        4,
        "3 parked + live"
    );
    let dropped = sys_number(broker.port, "$SYS/broker/messages/dropped/budget");
    assert!(
        dropped >= (3 * QUEUED - 30) as u64,
        "{dropped} dropped by the budget"
    );
    assert!(sys_number(broker.port, "$SYS/broker/messages/queued/bytes") <= 2048 + 1024);
    let log = broker.log();
    // One line at the first eviction, then one per doubling.
    assert_eq!(log.matches("too many offline sessions").count(), 2, "{log}");
    assert_eq!(
        log.matches("broker queue budget reached").count(),
        1,
        "{log}"
    );
    // The newest parked session kept the oldest messages (drop_newest keeps the backlog).
    let kept = resume_and_receive(broker.port, "parked-5", 1, 1);
    assert_eq!(kept, ["m1"]);
}

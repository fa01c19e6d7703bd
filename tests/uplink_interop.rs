//! The uplink's delivery tests against any broker on 127.0.0.1, for
//! `scripts/interop-matrix.sh` (every test is ignored in the default suite: the script
//! starts each broker and runs them with `--ignored`). mosquitto_sub judges delivery.
//!
//! Environment, set by the script:
//! - `INTEROP_PORT`: the broker's plain MQTT port; `INTEROP_PROTOCOL`: `3.1.1` or `5`.
//! - `INTEROP_RESTART`: a shell command that restarts the broker (stop, start, wait).
//! - `INTEROP_SERVERS` (comma-separated URLs) and `INTEROP_STOP`: a shell command
//!   given the URL of the node in use as `$1`, which stops that node: the cluster
//!   failover run. `INTEROP_SUB_PORT`: the node to judge on (one that stays up).
//!
//! Each test prints one `INTEROP <name> <figures>` line the script collects.

mod common;

use std::future::ready;
use std::process::Command;
use std::time::Duration;

use fieldbridge::store::{Message, Queue};
use fieldbridge::uplink::{LinkState, ProtocolVersion, Uplink, UplinkConfig, UplinkHandle};

use common::delivery::{open_store, tally};
use common::mosquitto::{retained_on, SubOptions, Subscriber};
use common::util::{poll_until_async, wait_for_async};

const PREFIX: &str = "interop/gw";
const STATUS: &str = "interop/gw/status";
const LONG: Duration = Duration::from_secs(60);

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set (run scripts/interop-matrix.sh)"))
}

fn port() -> u16 {
    env("INTEROP_PORT").parse().expect("INTEROP_PORT is a port")
}

fn url() -> String {
    format!("mqtt://127.0.0.1:{}", port())
}

fn readings(from: usize, n: usize) -> Vec<Message> {
    common::delivery::readings("interop", from, n)
}

fn config(client_id: &str) -> UplinkConfig {
    let mut config = UplinkConfig::new(url());
    config.client_id = Some(client_id.to_owned());
    config.protocol = match std::env::var("INTEROP_PROTOCOL").as_deref() {
        Ok("5") => ProtocolVersion::V5,
        _ => ProtocolVersion::V311,
    };
    config.backoff_min_ms = 100;
    config.backoff_max_ms = 1_000;
    config.keep_alive_secs = 5;
    config.connect_timeout_secs = 3;
    config
}

fn judge(port: u16, id: &str) -> Subscriber {
    Subscriber::start_on(
        port,
        &["interop/q1", "interop/q2", STATUS],
        SubOptions {
            client_id: Some(id.to_owned()),
            ..SubOptions::default()
        },
    )
}

async fn connected(handle: &UplinkHandle) -> bool {
    let mut states = handle.state();
    tokio::time::timeout(
        LONG,
        states.wait_for(|s| matches!(s, LinkState::Connected { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

async fn drained(queue: &Queue) {
    let empty = poll_until_async(LONG, || async move {
        let stats = queue.stats().await.expect("store stats");
        (stats.depth == 0).then_some(())
    })
    .await;
    assert!(empty.is_some(), "store not drained");
}

/// Waits (bounded) for every reading, then reports and checks QoS 1 at least once and
/// QoS 2 exactly once.
async fn judged(name: &str, sub: &Subscriber, n: usize, qos2_exactly_once: bool) {
    let _ = poll_until_async(LONG, || {
        let done =
            tally(&[sub], "interop/q1", n).lost == 0 && tally(&[sub], "interop/q2", n).lost == 0;
        ready(done.then_some(()))
    })
    .await;
    let q1 = tally(&[sub], "interop/q1", n);
    let q2 = tally(&[sub], "interop/q2", n);
    println!("INTEROP {name} qos1 {} qos2 {}", q1.words(), q2.words());
    assert_eq!(q1.lost, 0, "QoS 1 readings lost: {q1:?}");
    assert_eq!(q2.lost, 0, "QoS 2 readings lost: {q2:?}");
    if qos2_exactly_once {
        assert_eq!(q2.duplicated, 0, "QoS 2 delivered twice: {q2:?}");
    }
}

/// Whether QoS 2 must have been exactly once: unless the broker took QoS 2 at QoS 1
/// (PUBACK) or lost the session the flows were in (both counted, both at least once).
fn exactly_once_expected(handle: &UplinkHandle) -> bool {
    let stats = handle.stats();
    println!(
        "INTEROP stats qos2_downgraded={} qos2_restarted={} resent={} connects={}",
        stats.qos2_downgraded, stats.qos2_restarted, stats.resent, stats.connects
    );
    stats.qos2_downgraded == 0 && stats.qos2_restarted == 0
}

fn shell(command: &str, arg: &str) {
    let status = Command::new("sh")
        .args(["-c", command, "sh", arg])
        .status()
        .expect("run sh");
    assert!(status.success(), "{command:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/interop-matrix.sh against each broker"]
async fn interop_qos1_and_qos2() {
    let sub = judge(port(), "judge-qos");
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("q.db"));
    queue.append(readings(0, 200)).await.unwrap();
    let handle = Uplink::spawn(config("interop-qos"), PREFIX.to_owned(), queue.clone()).unwrap();
    assert!(connected(&handle).await, "no connection");
    drained(&queue).await;
    judged("qos", &sub, 200, exactly_once_expected(&handle)).await;
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/interop-matrix.sh against each broker"]
async fn interop_broker_restart() {
    let restart = env("INTEROP_RESTART");
    let sub = judge(port(), "judge-restart");
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("q.db"));
    let handle =
        Uplink::spawn(config("interop-restart"), PREFIX.to_owned(), queue.clone()).unwrap();
    assert!(connected(&handle).await, "no connection");
    queue.append(readings(0, 150)).await.unwrap();
    wait_for_async("the stream to be under way", LONG, || {
        ready((sub.messages().len() >= 50).then_some(()))
    })
    .await;
    shell(&restart, "");
    sub.wait_ready();
    queue.append(readings(150, 150)).await.unwrap();
    drained(&queue).await;
    judged("restart", &sub, 300, exactly_once_expected(&handle)).await;
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/interop-matrix.sh against each broker"]
async fn interop_agent_restart_without_disconnect() {
    let sub = judge(port(), "judge-abandon");
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("q.db"));
    let handle =
        Uplink::spawn(config("interop-abandon"), PREFIX.to_owned(), queue.clone()).unwrap();
    assert!(connected(&handle).await, "no connection");
    queue.append(readings(0, 200)).await.unwrap();
    wait_for_async("the stream to be under way", LONG, || {
        ready((sub.messages().len() >= 50).then_some(()))
    })
    .await;
    // No DISCONNECT: the broker sees the socket close and publishes the will; the
    // rows in flight go back to the store when the task has stopped.
    let mut states = handle.state();
    drop(handle);
    tokio::time::timeout(LONG, states.wait_for(|s| *s == LinkState::Stopped))
        .await
        .expect("the uplink stops")
        .expect("state");
    let handle =
        Uplink::spawn(config("interop-abandon"), PREFIX.to_owned(), queue.clone()).unwrap();
    assert!(connected(&handle).await, "no connection after the restart");
    drained(&queue).await;
    // The first uplink's counters are gone with it; the broker's answers are the same.
    judged("abandon", &sub, 200, exactly_once_expected(&handle)).await;
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/interop-matrix.sh against each broker"]
async fn interop_will_and_birth() {
    let sub = judge(port(), "judge-will");
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("q.db"));
    let handle = Uplink::spawn(config("interop-will"), PREFIX.to_owned(), queue.clone()).unwrap();
    assert!(connected(&handle).await, "no connection");
    wait_for_async("the birth message", LONG, || {
        ready(
            sub.messages()
                .iter()
                .any(|m| m.topic == STATUS && m.payload == "online")
                .then_some(()),
        )
    })
    .await;
    let retained_birth = retained_on(port(), STATUS).map(|m| m.payload);
    drop(handle);
    wait_for_async("the will", LONG, || {
        ready(
            sub.messages()
                .iter()
                .any(|m| m.topic == STATUS && m.payload == "offline")
                .then_some(()),
        )
    })
    .await;
    let retained_will = retained_on(port(), STATUS).map(|m| m.payload);
    println!("INTEROP will retained_birth={retained_birth:?} retained_will={retained_will:?}");
    assert_eq!(
        retained_birth.as_deref(),
        Some("online"),
        "birth not retained"
    );
    assert_eq!(
        retained_will.as_deref(),
        Some("offline"),
        "will not retained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/interop-matrix.sh against each broker"]
async fn interop_persistent_session_resume() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("q.db"));
    for round in 0..2 {
        let handle =
            Uplink::spawn(config("interop-session"), PREFIX.to_owned(), queue.clone()).unwrap();
        let mut states = handle.state();
        let state = tokio::time::timeout(
            LONG,
            states.wait_for(|s| matches!(s, LinkState::Connected { .. })),
        )
        .await
        .expect("connected")
        .expect("state")
        .clone();
        handle.shutdown(Duration::from_secs(5)).await.unwrap();
        if round == 1 {
            println!("INTEROP session second={state:?}");
            assert_eq!(
                state,
                LinkState::Connected {
                    session_present: true
                },
                "the broker did not keep the session"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/interop-matrix.sh against a two-node cluster"]
async fn interop_cluster_failover_under_load() {
    let servers: Vec<String> = env("INTEROP_SERVERS")
        .split(',')
        .map(str::to_owned)
        .collect();
    let stop = env("INTEROP_STOP");
    let sub_port: u16 = env("INTEROP_SUB_PORT").parse().expect("INTEROP_SUB_PORT");
    let sub = judge(sub_port, "judge-cluster");
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("q.db"));
    let mut config = config("interop-cluster");
    config.url = None;
    config.servers = servers;
    config.shared_sessions = std::env::var("INTEROP_SHARED").as_deref() == Ok("1");
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    assert!(connected(&handle).await, "no connection");
    const N: usize = 2_000;
    let feeder = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for k in 0..N / 20 {
                queue.append(readings(k * 20, 20)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_for_async("the stream to be under way", LONG, || {
        ready((sub.messages().len() >= 400).then_some(()))
    })
    .await;
    let active = handle.server().to_owned();
    shell(&stop, &active);
    feeder.await.unwrap();
    drained(&queue).await;
    let stats = handle.stats();
    println!(
        "INTEROP cluster stopped={active} now={} switches={} qos2_restarted={}",
        handle.server(),
        stats.server_switches,
        stats.qos2_restarted
    );
    judged("cluster", &sub, N, false).await;
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
}

//! Failover across upstream servers, against real Debian mosquittos with a real SQLite
//! store and mosquitto_sub on each broker judging delivery.
//!
//! - Two independent brokers (sessions not shared): the active one is stopped under
//!   load, the uplink moves to the other, and every accepted reading arrives on one of
//!   them (QoS 2 flows cut by the switch are resent as new flows and counted).
//! - Failback: the first broker comes back and the uplink returns to it.
//! - A "cluster" that shares sessions: one mosquitto behind two socat relays; the relay
//!   in use is killed, the uplink resumes the same session through the other, and QoS 2
//!   stays exactly once.

mod common;

use std::future::ready;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fieldbridge::mqtt::QoS;
use fieldbridge::store::{Message, Queue};
use fieldbridge::uplink::{LinkState, Uplink, UplinkConfig, UplinkHandle};

use common::delivery::{open_store, tally, Tally};

use common::mosquitto::{Mosquitto, SubOptions, Subscriber};
use common::util::{free_port, poll_until_async, tool, wait_for_async, wait_for_port};

const PREFIX: &str = "site/gw";
const LONG: Duration = Duration::from_secs(30);
const N: usize = 600;

fn config(servers: Vec<String>, client_id: &str) -> UplinkConfig {
    let mut config = UplinkConfig::new("unused");
    config.url = None;
    config.servers = servers;
    config.client_id = Some(client_id.to_owned());
    config.backoff_min_ms = 50;
    config.backoff_max_ms = 500;
    config.keep_alive_secs = 5;
    config.connect_timeout_secs = 2;
    config
}

/// A persistent subscriber (its queue survives a restart of its broker).
fn subscriber(broker: &Mosquitto, id: &str) -> Subscriber {
    Subscriber::start(
        broker,
        &["data/#"],
        SubOptions {
            client_id: Some(id.to_owned()),
            ..SubOptions::default()
        },
    )
}

async fn connected_to(handle: &UplinkHandle, url: &str) {
    let mut states = handle.state();
    let reached = tokio::time::timeout(LONG, async {
        loop {
            if matches!(*states.borrow_and_update(), LinkState::Connected { .. })
                && handle.server() == url
            {
                return;
            }
            if states.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        reached.is_ok() && handle.server() == url,
        "not connected to {url} within {LONG:?}: on {} in state {:?}",
        handle.server(),
        *handle.state().borrow()
    );
}

async fn drained(queue: &Queue) {
    let empty = poll_until_async(LONG, || async move {
        let stats = queue.stats().await.expect("store stats");
        (stats.depth == 0).then_some(())
    })
    .await;
    assert!(empty.is_some(), "store not drained");
}

fn readings(from: usize, n: usize) -> Vec<Message> {
    common::delivery::readings("data", from, n)
}

async fn all_delivered(subs: &[&Subscriber], n: usize) {
    wait_for_async("every reading on one of the brokers", LONG, || {
        let done = ["data/q1", "data/q2"]
            .iter()
            .all(|topic| tally(subs, topic, n).lost == 0);
        ready(done.then_some(()))
    })
    .await;
}

fn has_received(sub: &Subscriber, n: usize) -> bool {
    sub.messages().len() >= n
}

/// Feeds `N` readings per topic in small batches, as polling would.
fn feed(queue: &Queue) -> tokio::task::JoinHandle<()> {
    let queue = queue.clone();
    tokio::spawn(async move {
        for k in 0..N / 10 {
            queue.append(readings(k * 10, 10)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_active_server_moves_readings_to_the_next_and_none_is_lost() {
    let mut a = Mosquitto::start();
    let b = Mosquitto::start();
    let sub_a = subscriber(&a, "judge-a");
    let sub_b = subscriber(&b, "judge-b");
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let handle = Uplink::spawn(
        config(vec![a.url(), b.url()], "failover"),
        PREFIX.to_owned(),
        queue.clone(),
    )
    .unwrap();
    connected_to(&handle, &a.url()).await;
    let feeder = feed(&queue);
    wait_for_async(
        "the stream to be under way on the first broker",
        LONG,
        || ready(has_received(&sub_a, 200).then_some(())),
    )
    .await;
    a.stop();
    connected_to(&handle, &b.url()).await;
    feeder.await.unwrap();
    drained(&queue).await;
    // What the first broker took before it stopped is in its subscriber's queue.
    a.restart();
    all_delivered(&[&sub_a, &sub_b], N).await;
    assert!(
        has_received(&sub_b, 1),
        "nothing arrived on the second broker"
    );
    let stats = handle.stats();
    let q1 = tally(&[&sub_a, &sub_b], "data/q1", N);
    let q2 = tally(&[&sub_a, &sub_b], "data/q2", N);
    eprintln!("failover figures: QoS 1 {q1:?}, QoS 2 {q2:?}, {stats:?}");
    assert_eq!((q1.lost, q2.lost), (0, 0));
    assert!(
        q2.duplicated as u64 <= stats.qos2_restarted,
        "QoS 2 duplicates only from flows restarted by the switch: {q2:?} {stats:?}"
    );
    assert_eq!(stats.server_switches, 1, "{stats:?}");
    assert_eq!(handle.server(), b.url(), "failback is off by default");
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_returns_to_the_first_server_once_it_answers_again() {
    let mut a = Mosquitto::start();
    a.stop();
    let b = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let mut config = config(vec![a.url(), b.url()], "failback");
    config.failback = true;
    config.failback_after_secs = 1;
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    connected_to(&handle, &b.url()).await;
    a.restart();
    let sub_a = subscriber(&a, "judge-a");
    connected_to(&handle, &a.url()).await;
    queue.append(readings(0, 10)).await.unwrap();
    all_delivered(&[&sub_a], 10).await;
    let stats = handle.stats();
    assert_eq!(stats.server_switches, 2, "to b, then back to a: {stats:?}");
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

/// A TCP relay to `port` on a free port, in its own process group so that killing it
/// also cuts the connections its forks carry.
struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let port = free_port();
        let child = Command::new(tool("socat", "socat"))
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!("TCP:127.0.0.1:{to}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn socat");
        wait_for_port(port, Duration::from_secs(5));
        Relay { child, port }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--"])
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_share_sessions_keep_qos2_exactly_once_across_a_switch() {
    let broker = Mosquitto::start();
    let sub = subscriber(&broker, "judge");
    let mut first = Relay::start(broker.port);
    let second = Relay::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let mut config = config(vec![first.url(), second.url()], "cluster");
    config.shared_sessions = true;
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    connected_to(&handle, &first.url()).await;
    let feeder = feed(&queue);
    wait_for_async("the stream to be under way", LONG, || {
        ready(has_received(&sub, 200).then_some(()))
    })
    .await;
    first.kill();
    connected_to(&handle, &second.url()).await;
    feeder.await.unwrap();
    drained(&queue).await;
    all_delivered(&[&sub], N).await;
    let q2 = tally(&[&sub], "data/q2", N);
    let stats = handle.stats();
    assert_eq!(
        q2,
        Tally {
            accepted: N,
            delivered: N,
            duplicated: 0,
            lost: 0
        },
        "{stats:?}"
    );
    assert_eq!(stats.qos2_restarted, 0, "{stats:?}");
    assert_eq!(tally(&[&sub], "data/q1", N).lost, 0);
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

/// An in-process double of a broker that cannot resume sessions (rumqttd 0.20 closes
/// the connection right after a CONNACK with `session present = 1` once the session
/// holds flows): it answers a persistent CONNECT with `session present = 1` and closes
/// at once; a clean CONNECT gets a working session that acknowledges everything.
/// Returns its port and how many connections it refused.
async fn broker_that_cannot_resume() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use bytes::BytesMut;
    use fieldbridge::mqtt::{self, Ack, ConnAck, Packet, Protocol};
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = refused.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let refused = counter.clone();
            tokio::spawn(async move {
                let mut rbuf = BytesMut::new();
                loop {
                    while let Ok(Some(packet)) = mqtt::decode(&mut rbuf, Protocol::V311, 1 << 20) {
                        let reply = match packet {
                            Packet::Connect(connect) => {
                                let ack = Packet::ConnAck(ConnAck {
                                    session_present: !connect.clean_start,
                                    ..ConnAck::default()
                                });
                                if !connect.clean_start {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                    let mut out = BytesMut::new();
                                    mqtt::encode(&ack, Protocol::V311, &mut out).unwrap();
                                    let _ = socket.write_all(&out).await;
                                    return;
                                }
                                ack
                            }
                            Packet::Publish(p) if p.qos == QoS::AtLeastOnce => {
                                Packet::PubAck(Ack::new(p.pkid))
                            }
                            Packet::Publish(p) if p.qos == QoS::ExactlyOnce => {
                                Packet::PubRec(Ack::new(p.pkid))
                            }
                            Packet::PubRel(ack) => Packet::PubComp(Ack::new(ack.pkid)),
                            Packet::PingReq => Packet::PingResp,
                            _ => continue,
                        };
                        let mut out = BytesMut::new();
                        mqtt::encode(&reply, Protocol::V311, &mut out).unwrap();
                        if socket.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                    match socket.read_buf(&mut rbuf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (port, refused)
}

/// Regression (found by scripts/interop-matrix.sh against rumqttd 0.20): a broker that
/// ends every connection resuming our session kept the uplink reconnecting forever,
/// and nothing was delivered. After three such connections in a row the uplink asks for
/// a clean session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_ends_every_resumed_session_gets_a_clean_one() {
    let (port, refused) = broker_that_cannot_resume().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    queue.append(readings(0, 20)).await.unwrap();
    let mut config = UplinkConfig::new(format!("mqtt://127.0.0.1:{port}"));
    config.client_id = Some("resume-refused".to_owned());
    config.backoff_min_ms = 10;
    config.backoff_max_ms = 50;
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    drained(&queue).await;
    let stats = handle.stats();
    assert_eq!(
        refused.load(std::sync::atomic::Ordering::Relaxed),
        3,
        "three resumed sessions ended, then a clean one: {stats:?}"
    );
    assert_eq!(stats.acked, 40, "{stats:?}");
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

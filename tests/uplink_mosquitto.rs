//! The uplink against a real Debian mosquitto, with a real SQLite store in a temp dir
//! and mosquitto_sub as the upstream subscriber that judges delivery.
//!
//! The kill -9 test re-runs this test binary as a child process (the ignored test
//! `child_uplink_process`) so the uplink can die without any cleanup.

mod common;

use std::collections::HashMap;
use std::future::ready;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fieldbridge::mqtt::QoS;
use fieldbridge::store::{DrainOrder, Message, Priority, Queue, StoreConfig};
use fieldbridge::uplink::{LinkState, ProtocolVersion, Uplink, UplinkConfig, UplinkHandle};
use tokio::time::Instant;

use common::mosquitto::{self, Mosquitto, Options, Received, SubOptions, Subscriber, TlsListener};
use common::util::{poll_until_async, wait_for_async};

const PREFIX: &str = "site/gw";
const STATUS: &str = "site/gw/status";
const LONG: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn message(payload: impl Into<String>, qos: QoS, topic: &str) -> Message {
    Message {
        topic: topic.to_owned(),
        payload: Bytes::from(payload.into()),
        qos,
        retain: false,
        created_ms: now_ms(),
        priority: Priority::Periodic,
        unsynced: None,
    }
}

/// `n` messages per topic, QoS 1 on `data/q1` and QoS 2 on `data/q2`, interleaved.
fn mixed(from: usize, n: usize) -> Vec<Message> {
    (from..from + n)
        .flat_map(|i| {
            [
                message(i.to_string(), QoS::AtLeastOnce, "data/q1"),
                message(i.to_string(), QoS::ExactlyOnce, "data/q2"),
            ]
        })
        .collect()
}

/// Logs to the test output when RUST_LOG is set.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn open_store(path: &Path) -> Queue {
    init_logging();
    Queue::open(StoreConfig {
        path: path.to_owned(),
        commit_interval_ms: 5,
        ..StoreConfig::default()
    })
    .expect("open the store")
}

fn config(url: String, client_id: &str) -> UplinkConfig {
    let mut config = UplinkConfig::new(url);
    config.client_id = Some(client_id.to_owned());
    config.backoff_min_ms = 50;
    config.backoff_max_ms = 500;
    config.keep_alive_secs = 5;
    config.connect_timeout_secs = 2;
    config
}

async fn wait_state(
    handle: &UplinkHandle,
    timeout: Duration,
    what: &str,
    mut wanted: impl FnMut(&LinkState) -> bool,
) -> LinkState {
    let mut states = handle.state();
    let found = tokio::time::timeout(timeout, async {
        states.wait_for(|s| wanted(s)).await.map(|s| s.clone())
    })
    .await;
    match found {
        Ok(Ok(state)) => state,
        _ => panic!(
            "no {what} within {timeout:?}; last state {:?}",
            *handle.state().borrow()
        ),
    }
}

async fn connected(handle: &UplinkHandle) -> LinkState {
    wait_state(handle, LONG, "connection", |s| {
        matches!(s, LinkState::Connected { .. })
    })
    .await
}

async fn drained(queue: &Queue) {
    let empty = poll_until_async(LONG, || async move {
        let stats = queue.stats().await.expect("store stats");
        (stats.depth == 0).then_some(())
    })
    .await;
    if empty.is_none() {
        let stats = queue.stats().await.expect("store stats");
        panic!("store not drained: {stats:?}");
    }
}

async fn received(
    sub: &Subscriber,
    what: &str,
    mut done: impl FnMut(&[Received]) -> bool,
) -> Vec<Received> {
    wait_for_async(what, LONG, || {
        let messages = sub.messages();
        ready(done(&messages).then_some(messages))
    })
    .await
}

/// Payload counts per number on `topic`.
fn counts(messages: &[Received], topic: &str) -> HashMap<usize, usize> {
    let mut counts = HashMap::new();
    for m in messages.iter().filter(|m| m.topic == topic) {
        if let Ok(n) = m.payload.parse() {
            *counts.entry(n).or_insert(0) += 1;
        }
    }
    counts
}

fn has_all(messages: &[Received], topic: &str, n: usize) -> bool {
    let counts = counts(messages, topic);
    (0..n).all(|i| counts.contains_key(&i))
}

fn assert_at_least_once(messages: &[Received], topic: &str, n: usize) {
    let counts = counts(messages, topic);
    let missing: Vec<usize> = (0..n).filter(|i| !counts.contains_key(i)).collect();
    assert!(missing.is_empty(), "{topic}: missing {missing:?}");
}

fn assert_exactly_once(messages: &[Received], topic: &str, n: usize) {
    assert_at_least_once(messages, topic, n);
    let counts = counts(messages, topic);
    let twice: Vec<(&usize, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "{topic}: delivered more than once: {twice:?}"
    );
    assert_eq!(counts.len(), n, "{topic}: unexpected payloads");
}

fn payloads(messages: &[Received], topic: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.topic == topic)
        .map(|m| m.payload.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_are_delivered_in_order_on_both_protocols() {
    for protocol in [ProtocolVersion::V311, ProtocolVersion::V5] {
        // mosquitto 2.0.11 can send a message it just received to a subscriber ahead of
        // older ones still queued for that subscriber (seen in its log: `Received PUBREL
        // (Mid: 600)` then at once `Sending PUBLISH ... m600` to the subscriber, before
        // m550..m599). The subscriber's queue forms only when its inflight window is
        // full, so give it room for every message: what is checked is our order.
        let broker = Mosquitto::start_with(Options {
            extra: vec!["max_inflight_messages 1000".to_owned()],
            ..Options::default()
        });
        let sub = Subscriber::start(&broker, &["data/#"], SubOptions::default());
        let dir = tempfile::tempdir().unwrap();
        let queue = open_store(&dir.path().join("queue.db"));
        queue.append(mixed(0, 300)).await.unwrap();
        let mut config = config(broker.url(), "in-order");
        config.protocol = protocol;
        let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
        let got = received(&sub, "600 messages", |m| m.len() >= 600).await;
        let expected: Vec<String> = (0..300).map(|i| i.to_string()).collect();
        assert_eq!(payloads(&got, "data/q1"), expected, "{protocol:?} QoS 1");
        assert_eq!(payloads(&got, "data/q2"), expected, "{protocol:?} QoS 2");
        assert!(got
            .iter()
            .filter(|m| m.topic == "data/q2")
            .all(|m| m.qos == 2));
        assert!(got
            .iter()
            .filter(|m| m.topic == "data/q1")
            .all(|m| m.qos == 1));
        drained(&queue).await;
        let stats = handle.stats();
        assert_eq!(
            (stats.published, stats.acked, stats.resent),
            (600, 600, 0),
            "{stats:?}"
        );
        handle.shutdown(Duration::from_secs(5)).await.unwrap();
        queue.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_keeps_qos1_at_least_once_and_qos2_exactly_once() {
    let mut broker = Mosquitto::start();
    let sub = Subscriber::start(
        &broker,
        &["data/#"],
        SubOptions {
            client_id: Some("upstream-subscriber".to_owned()),
            ..SubOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let config = config(broker.url(), "restart-broker");
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    connected(&handle).await;
    // Live readings keep coming while the broker goes away.
    const N: usize = 1000;
    let feeder = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for k in 0..N / 10 {
                queue.append(mixed(k * 10, 10)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    received(&sub, "the stream to be under way", |m| m.len() >= 300).await;
    broker.stop();
    broker.restart();
    sub.wait_ready();
    feeder.await.unwrap();
    queue
        .append(vec![message("end", QoS::ExactlyOnce, "data/q2")])
        .await
        .unwrap();
    // The end marker goes last; once every message is in, duplicates would have come
    // before it.
    let got = received(&sub, "every message and the end marker", |m| {
        m.iter().any(|m| m.payload == "end") && has_all(m, "data/q1", N) && has_all(m, "data/q2", N)
    })
    .await;
    assert_at_least_once(&got, "data/q1", N);
    assert_exactly_once(&got, "data/q2", N);
    drained(&queue).await;
    let stats = handle.stats();
    assert!(stats.connects >= 2, "{stats:?}");
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

/// Entry point of the child process of the kill -9 test: runs an uplink on the store
/// and config it is given until its stdin closes, then shuts down gracefully.
#[test]
#[ignore = "run by client_killed_mid_stream_resumes_from_the_store as a child process"]
fn child_uplink_process() {
    let (Ok(store), Ok(config)) = (
        std::env::var("UPLINK_CHILD_STORE"),
        std::env::var("UPLINK_CHILD_CONFIG"),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let queue = open_store(Path::new(&store));
        let config: UplinkConfig = toml::from_str(&config).unwrap();
        let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
        tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new()))
            .await
            .unwrap()
            .unwrap();
        handle.shutdown(Duration::from_secs(5)).await.unwrap();
        queue.close().await.unwrap();
    });
}

fn spawn_child(store: &Path, config: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_uplink_process",
            "--ignored",
            "--nocapture",
        ])
        .env("UPLINK_CHILD_STORE", store)
        .env("UPLINK_CHILD_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn retained_status(broker: &Mosquitto, payload: &str) {
    wait_for_async(&format!("retained status {payload:?}"), LONG, || {
        ready(mosquitto::retained(broker, STATUS).filter(|m| m.payload == payload && m.retained))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_stream_resumes_from_the_store() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(
        &broker,
        &["data/#"],
        SubOptions {
            client_id: Some("upstream-subscriber".to_owned()),
            ..SubOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("queue.db");
    const N: usize = 1000;
    let queue = open_store(&store);
    queue.append(mixed(0, N)).await.unwrap();
    queue.close().await.unwrap();
    let config = format!(
        "url = \"{}\"\nclient_id = \"killed-child\"\ninflight = 20\nreplay_rate_limit = 2000\n\
         backoff_min_ms = 50\nbackoff_max_ms = 500\nkeep_alive_secs = 5\n",
        broker.url()
    );

    let mut child = spawn_child(&store, &config);
    retained_status(&broker, "online").await;
    received(&sub, "the stream to be under way", |m| m.len() >= 400).await;
    child.kill().unwrap();
    child.wait().unwrap();
    // The broker saw the socket close without DISCONNECT: the will goes out.
    retained_status(&broker, "offline").await;
    let before_restart = sub.messages().len();
    assert!(
        before_restart < 2 * N,
        "the child finished before it was killed"
    );

    let queue = open_store(&store);
    queue
        .append(vec![message("end", QoS::ExactlyOnce, "data/q2")])
        .await
        .unwrap();
    queue.close().await.unwrap();
    let mut child = spawn_child(&store, &config);
    // The end marker goes last; once every message is in, duplicates would have come
    // before it.
    let got = received(&sub, "every message and the end marker", |m| {
        m.iter().any(|m| m.payload == "end") && has_all(m, "data/q1", N) && has_all(m, "data/q2", N)
    })
    .await;
    assert_at_least_once(&got, "data/q1", N);
    assert_exactly_once(&got, "data/q2", N);
    retained_status(&broker, "online").await;

    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "graceful shutdown failed");
    retained_status(&broker, "offline").await;
    let queue = open_store(&store);
    assert_eq!(queue.stats().await.unwrap().depth, 0);
    queue.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn birth_will_offline_and_subscriptions() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let mut config = config(broker.url(), "status");
    config.subscribe = vec!["site/gw/cmd/#".to_owned()];
    let mut handle = Uplink::spawn(config.clone(), PREFIX.to_owned(), queue.clone()).unwrap();
    let mut incoming = handle.take_incoming().unwrap();
    assert!(handle.take_incoming().is_none());
    connected(&handle).await;
    retained_status(&broker, "online").await;
    // The SUBSCRIBE may still be on its way: publish until a command comes through.
    let command = tokio::time::timeout(LONG, async {
        loop {
            mosquitto::publish(&broker, "site/gw/cmd/valve", "open", 1);
            if let Ok(Some(p)) =
                tokio::time::timeout(Duration::from_millis(200), incoming.recv()).await
            {
                break p;
            }
        }
    })
    .await
    .expect("no incoming command");
    assert_eq!(
        (command.topic.as_str(), &command.payload[..]),
        ("site/gw/cmd/valve", &b"open"[..])
    );
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    retained_status(&broker, "offline").await;

    // Dropped without shutdown: the connection dies without DISCONNECT, the will fires.
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    connected(&handle).await;
    retained_status(&broker, "online").await;
    drop(handle);
    retained_status(&broker, "offline").await;
    queue.close().await.unwrap();
}

struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// A CA, a server certificate for localhost and a client certificate.
    fn generate() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fieldbridge test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        for (name, san) in [("server", "localhost"), ("client", "gateway-17")] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![san.to_owned()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, san);
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn listener(&self, require_certificate: bool) -> TlsListener {
        TlsListener {
            ca_file: self.path("ca.pem"),
            cert_file: self.path("server.pem"),
            key_file: self.path("server.key"),
            require_certificate,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_against_a_mosquitto_tls_listener() {
    let certs = Certs::generate();
    for mutual in [false, true] {
        let broker = Mosquitto::start_with(Options {
            tls: Some(certs.listener(mutual)),
            ..Options::default()
        });
        let sub = Subscriber::start(&broker, &["data/#"], SubOptions::default());
        let dir = tempfile::tempdir().unwrap();
        let queue = open_store(&dir.path().join("queue.db"));
        queue.append(mixed(0, 10)).await.unwrap();
        let mut config = config(broker.tls_url(), "tls");
        config.tls.ca_file = Some(certs.path("ca.pem"));
        if mutual {
            // Without a client certificate the broker refuses the handshake.
            let handle = Uplink::spawn(config.clone(), PREFIX.to_owned(), queue.clone()).unwrap();
            let state = wait_state(&handle, LONG, "a failed attempt", |s| {
                matches!(s, LinkState::Backoff { .. })
            })
            .await;
            assert_eq!(handle.stats().connects, 0, "{state:?}");
            handle.shutdown(Duration::from_secs(5)).await.unwrap();
            config.tls.cert_file = Some(certs.path("client.pem"));
            config.tls.key_file = Some(certs.path("client.key"));
        }
        let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
        let got = received(&sub, "20 messages over TLS", |m| m.len() >= 20).await;
        assert_exactly_once(&got, "data/q2", 10);
        drained(&queue).await;
        handle.shutdown(Duration::from_secs(5)).await.unwrap();
        queue.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_reported_clearly_and_backed_off() {
    let broker = Mosquitto::start_with(Options {
        users: vec![("gw".to_owned(), "right".to_owned())],
        ..Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let password = dir.path().join("password");
    std::fs::write(&password, "wrong\n").unwrap();
    let mut config = config(broker.url(), "auth");
    config.username = Some("gw".to_owned());
    config.password_file = Some(password.clone());
    config.backoff_min_ms = 100;
    config.backoff_max_ms = 400;
    let start = Instant::now();
    let handle = Uplink::spawn(config.clone(), PREFIX.to_owned(), queue.clone()).unwrap();
    let state = wait_state(
        &handle,
        LONG,
        "an auth failure",
        |s| matches!(s, LinkState::Backoff { attempt, .. } if *attempt >= 4),
    )
    .await;
    let LinkState::Backoff { error, .. } = state else {
        unreachable!()
    };
    assert!(
        error.contains("not authorized") || error.contains("bad user name or password"),
        "{error}"
    );
    assert!(!error.contains("wrong"), "the password leaked into {error}");
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    let elapsed = start.elapsed();
    // The uplink counts a refusal when CONNACK arrives; mosquitto logs it when it
    // closes the socket, which on a busy machine can come a moment later.
    let refusals = || broker.log().matches("disconnected, not authorised").count();
    let stats_attempts = wait_for_async("4 refusals in the broker log", LONG, || {
        let n = refusals();
        async move { (n >= 4).then_some(n) }
    })
    .await;
    // Every retry waits at least backoff_min_ms: a busy loop would blow this bound.
    let bound = 1 + elapsed.as_millis() / 100;
    assert!(
        (stats_attempts as u128) <= bound,
        "{stats_attempts} attempts in {elapsed:?}"
    );

    // The right password from the same file connects.
    std::fs::write(&password, "right\n").unwrap();
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    connected(&handle).await;
    let stats = handle.stats();
    assert_eq!((stats.connects, stats.auth_failures), (1, 0));
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_limits_drop_too_large_and_downgrade_qos() {
    let broker = Mosquitto::start_with(Options {
        extra: vec!["max_packet_size 1024".to_owned(), "max_qos 1".to_owned()],
        ..Options::default()
    });
    let sub = Subscriber::start(&broker, &["data/#"], SubOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let mut batch = Vec::new();
    for i in 0..30 {
        if i == 10 {
            batch.push(message("x".repeat(2000), QoS::ExactlyOnce, "data/a"));
        }
        batch.push(message(
            i.to_string(),
            QoS::ExactlyOnce,
            &format!("data/{}", i % 3),
        ));
    }
    queue.append(batch).await.unwrap();
    let mut config = config(broker.url(), "limits");
    config.protocol = ProtocolVersion::V5;
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    drained(&queue).await;
    let got = received(&sub, "30 messages", |m| m.len() >= 30).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            (m.topic.clone(), m.payload.clone()),
            (format!("data/{}", i % 3), i.to_string())
        );
        assert_eq!(m.qos, 1, "QoS 2 downgraded to the broker's maximum");
    }
    let stats = handle.stats();
    assert_eq!((stats.dropped_too_large, stats.acked), (1, 30), "{stats:?}");
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connection_is_detected_and_connect_times_out() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, &["data/#"], SubOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let mut config = config(broker.url(), "half-open");
    config.keep_alive_secs = 1;
    config.connect_timeout_secs = 1;
    config.backoff_min_ms = 300;
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    connected(&handle).await;
    broker.pause();
    let lost = wait_state(
        &handle,
        LONG,
        "a missing PINGRESP",
        |s| matches!(s, LinkState::Backoff { error, .. } if error.contains("PINGRESP")),
    )
    .await;
    let timed_out = wait_state(
        &handle,
        LONG,
        "a connect timeout",
        |s| matches!(s, LinkState::Backoff { error, .. } if error.contains("no CONNACK")),
    )
    .await;
    broker.resume();
    connected(&handle).await;
    queue
        .append(vec![message("after", QoS::AtLeastOnce, "data/x")])
        .await
        .unwrap();
    received(&sub, "a message after the outage", |m| {
        m.iter().any(|m| m.payload == "after")
    })
    .await;
    assert!(handle.stats().connects >= 2, "{lost:?} {timed_out:?}");
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_first_lets_live_data_pass_a_rate_limited_backlog() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, &["data/#"], SubOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    const BACKLOG: usize = 150;
    let backlog: Vec<Message> = (0..BACKLOG)
        .map(|i| {
            let mut m = message(i.to_string(), QoS::AtLeastOnce, "data/backlog");
            m.created_ms -= 60_000;
            m
        })
        .collect();
    queue.append(backlog).await.unwrap();
    let mut config = config(broker.url(), "replay");
    config.drain_order = DrainOrder::NewestFirst;
    config.replay_rate_limit = Some(100);
    let start = Instant::now();
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    received(&sub, "replay to start", |m| m.len() >= 10).await;
    queue
        .append(vec![message("live", QoS::AtLeastOnce, "data/live")])
        .await
        .unwrap();
    let got = received(&sub, "the whole backlog", |m| m.len() > BACKLOG).await;
    let elapsed = start.elapsed();
    let live_at = got.iter().position(|m| m.payload == "live").unwrap();
    assert!(
        live_at < BACKLOG / 2,
        "live data waited behind the backlog: position {live_at}"
    );
    // 100 messages/s with a burst of 10: the backlog cannot take less than 1.4 s.
    assert!(
        elapsed >= Duration::from_millis(1_400),
        "replay took {elapsed:?}"
    );
    assert_at_least_once(&got, "data/backlog", BACKLOG);
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

/// mosquitto's quota (`max_inflight_messages`, announced as receive maximum) counts
/// QoS 2 flows until their PUBREL, and a resumed session's open flows count on the new
/// connection: a window that mixes QoS 1 and 2 must stay inside it, across a
/// reconnect too: no refusal (0x97) is counted. The sans-IO test
/// `resumed_qos2_flows_use_the_quota_before_the_birth_after_a_reconnect` holds the
/// reconnect order packet by packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_broker_quota_is_never_exceeded_across_a_half_open_reconnect() {
    let broker = Mosquitto::start_with(Options {
        extra: vec!["max_inflight_messages 2".to_owned()],
        ..Options::default()
    });
    let sub = Subscriber::start(
        &broker,
        &["data/#"],
        SubOptions {
            client_id: Some("upstream-subscriber".to_owned()),
            ..SubOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    const N: usize = 200;
    queue.append(mixed(0, N)).await.unwrap();
    let mut config = config(broker.url(), "tiny-quota");
    config.protocol = ProtocolVersion::V5;
    config.keep_alive_secs = 1;
    config.connect_timeout_secs = 1;
    let handle = Uplink::spawn(config, PREFIX.to_owned(), queue.clone()).unwrap();
    received(&sub, "the stream to be under way", |m| m.len() >= 40).await;
    // A half-open connection: the broker keeps the session and its open flows while
    // the uplink gives the connection up and comes back.
    broker.pause();
    wait_state(
        &handle,
        LONG,
        "a missing PINGRESP",
        |s| matches!(s, LinkState::Backoff { error, .. } if error.contains("PINGRESP")),
    )
    .await;
    broker.resume();
    let got = received(&sub, "every message", |m| {
        has_all(m, "data/q1", N) && has_all(m, "data/q2", N)
    })
    .await;
    assert_at_least_once(&got, "data/q1", N);
    assert_exactly_once(&got, "data/q2", N);
    drained(&queue).await;
    let stats = handle.stats();
    assert!(stats.connects <= 4, "reconnected over and over: {stats:?}");
    assert_eq!(
        stats.throttled, 0,
        "the broker refused messages for its quota: {stats:?}"
    );
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
}

/// Regression: a 3.1.1 refusal read `reason code 0x87` (a 3.1.1 broker sends return
/// code 5), and a broker whose CA the gateway does not know gave `UnknownIssuer` with no
/// hint of the setting that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_unknown_certificate_authorities_say_what_to_do() {
    let broker = Mosquitto::start_with(Options {
        users: vec![("gw".to_owned(), "right".to_owned())],
        ..Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let queue = open_store(&dir.path().join("queue.db"));
    let mut refused = config(broker.url(), "v311");
    refused.protocol = ProtocolVersion::V311;
    refused.username = Some("gw".to_owned());
    let handle = Uplink::spawn(refused, PREFIX.to_owned(), queue.clone()).unwrap();
    let state = wait_state(&handle, LONG, "a refusal", |s| {
        matches!(s, LinkState::Backoff { .. })
    })
    .await;
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    let error = state.last_error().unwrap_or_default().to_owned();
    assert!(
        error.contains("not authorized (CONNACK return code 5)"),
        "{error}"
    );

    let certs = Certs::generate();
    let tls_broker = Mosquitto::start_with(Options {
        tls: Some(certs.listener(false)),
        ..Options::default()
    });
    // No ca_file: the built-in public roots do not know the test CA.
    let handle = Uplink::spawn(
        config(tls_broker.tls_url(), "no-ca"),
        PREFIX.to_owned(),
        queue.clone(),
    )
    .unwrap();
    let state = wait_state(&handle, LONG, "a failed handshake", |s| {
        matches!(s, LinkState::Backoff { .. })
    })
    .await;
    handle.shutdown(Duration::from_secs(5)).await.unwrap();
    let error = state.last_error().unwrap_or_default();
    assert!(error.contains("set upstream.tls.ca_file"), "{error}");
    queue.close().await.unwrap();
}

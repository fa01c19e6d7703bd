//! Backlog replay: messages queued in the SQLite store, drained by the uplink to a local
//! mosquitto (each row deleted after its PUBACK / PUBCOMP), against rumqttc publishing
//! the same messages from memory to the same mosquitto with the same inflight window.
//!
//! `cargo bench --bench uplink_replay` (set `UPLINK_BENCH_MESSAGES` for another count,
//! `UPLINK_BENCH_QOS1_ONLY` to skip the QoS 2 scenarios).
//! Each scenario runs both clients three times, alternating, and reports the best run
//! of each, so a background hiccup on the shared machine does not decide the ratio.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fieldbridge::mqtt::QoS;
use fieldbridge::store::{Message, Priority, Queue, StoreConfig};
use fieldbridge::uplink::{Uplink, UplinkConfig};

use common::mosquitto::{Mosquitto, Options};

struct Scenario {
    /// mosquitto with `max_inflight_messages 1000` instead of its default 20 (which
    /// also caps the QoS 2 flows a client may hold open).
    wide_broker: bool,
    qos: QoS,
    window: u16,
    /// The store's group commit interval.
    commit_interval_ms: u64,
    /// The store's spacing of flow-state commits; a QoS 2 flow waits for one commit
    /// before PUBLISH and one between PUBREC and PUBREL.
    flow_commit_ms: u64,
}

fn load(n: usize) -> Vec<(String, Bytes)> {
    (0..n)
        .map(|i| {
            let topic = format!("bench/meter-{:02}/power", i % 50);
            let payload = format!(
                "{{\"v\":{:.1},\"ts\":1700000000000,\"q\":\"good\",\"seq\":{i:08}}}",
                i as f64 * 0.1
            );
            (topic, Bytes::from(payload))
        })
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Messages per second for the uplink to drain `load` from a fresh store.
async fn uplink_replay(
    broker: &Mosquitto,
    load: &[(String, Bytes)],
    s: &Scenario,
    run: usize,
) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let queue = Queue::open(StoreConfig {
        path: dir.path().join("queue.db"),
        commit_interval_ms: s.commit_interval_ms,
        flow_commit_ms: s.flow_commit_ms,
        ..StoreConfig::default()
    })
    .expect("open store");
    let created_ms = now_ms();
    for chunk in load.chunks(5_000) {
        let batch = chunk
            .iter()
            .map(|(topic, payload)| Message {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: s.qos,
                retain: false,
                created_ms,
                priority: Priority::Periodic,
                unsynced: None,
            })
            .collect();
        queue.append(batch).await.expect("append");
    }
    let mut config = UplinkConfig::new(broker.url());
    config.client_id = Some(format!("uplink-bench-{:?}-{}-{run}", s.qos, s.window));
    config.inflight = s.window;
    let start = Instant::now();
    let handle = Uplink::spawn(config, "bench".to_owned(), queue.clone()).expect("spawn uplink");
    let n = load.len() as u64;
    while handle.stats().acked < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let stats = handle.stats();
    assert_eq!((stats.published, stats.resent), (n, 0), "{stats:?}");
    handle
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    queue.close().await.expect("close store");
    load.len() as f64 / elapsed.as_secs_f64()
}

/// Messages per second for rumqttc to publish `load` and get every acknowledgement.
async fn rumqttc_publish(
    broker: &Mosquitto,
    load: &[(String, Bytes)],
    s: &Scenario,
    run: usize,
) -> f64 {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let mut options = MqttOptions::new(
        format!("rumqttc-bench-{:?}-{}-{run}", s.qos, s.window),
        "127.0.0.1",
        broker.port,
    );
    options
        .set_inflight(s.window)
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 1_000);
    let qos = match s.qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    };
    let messages = load.to_vec();
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish_bytes(topic, qos, false, payload)
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < load.len() {
        match eventloop.poll().await.expect("rumqttc connection") {
            Event::Incoming(Packet::PubAck(_)) if s.qos == QoS::AtLeastOnce => acked += 1,
            Event::Incoming(Packet::PubComp(_)) => acked += 1,
            _ => {}
        }
    }
    let elapsed = start.elapsed();
    let client = publisher.await.expect("publisher task");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    load.len() as f64 / elapsed.as_secs_f64()
}

fn main() {
    let n: usize = std::env::var("UPLINK_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let broker = Mosquitto::start();
    let wide = Mosquitto::start_with(Options {
        extra: vec!["max_inflight_messages 1000".to_owned()],
        ..Options::default()
    });
    let load = load(n);
    let qos2 = |window: u16, wide_broker: bool, flow_commit_ms: u64| Scenario {
        wide_broker,
        qos: QoS::ExactlyOnce,
        window,
        commit_interval_ms: 100,
        flow_commit_ms,
    };
    let scenarios = [
        Scenario {
            wide_broker: false,
            qos: QoS::AtLeastOnce,
            window: 20,
            commit_interval_ms: 100,
            flow_commit_ms: 1,
        },
        Scenario {
            wide_broker: false,
            qos: QoS::AtLeastOnce,
            window: 100,
            commit_interval_ms: 100,
            flow_commit_ms: 1,
        },
        // A QoS 2 window turns over once per flow commit; its spacing is the knob.
        qos2(20, false, 0),
        qos2(20, false, 1),
        qos2(20, false, 5),
        qos2(1000, true, 1),
    ];
    println!("uplink replay to mosquitto (MQTT 3.1.1, loopback), best of 3 runs");
    println!(
        "| messages | QoS | inflight | mosquitto max_inflight_messages | store commit interval | store flow_commit_ms | uplink msgs/s | rumqttc msgs/s | uplink / rumqttc |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let only_qos1 = std::env::var_os("UPLINK_BENCH_QOS1_ONLY").is_some();
    for s in &scenarios {
        if only_qos1 && s.qos != QoS::AtLeastOnce {
            continue;
        }
        let broker = if s.wide_broker { &wide } else { &broker };
        let mut ours: f64 = 0.0;
        let mut theirs: f64 = 0.0;
        for run in 0..3 {
            ours = ours.max(runtime.block_on(uplink_replay(broker, &load, s, run)));
            theirs = theirs.max(runtime.block_on(rumqttc_publish(broker, &load, s, run)));
        }
        println!(
            "| {} | {} | {} | {} | {} ms | {} ms | {:.0} | {:.0} | {:.2} |",
            load.len(),
            s.qos as u8,
            s.window,
            if s.wide_broker { 1000 } else { 20 },
            s.commit_interval_ms,
            s.flow_commit_ms,
            ours,
            theirs,
            ours / theirs
        );
    }
}

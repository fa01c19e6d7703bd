//! The periodic `{prefix}/health` report, on the local broker and (through the store)
//! upstream.
//!
//! The report is JSON:
//!
//! ```json
//! {"version":"0.1.0","uptime_secs":3600,"ts":1700000000000,
//!  "readings":{"accepted":36000,"per_sec":10.0,"store_refused":0},
//!  "queue":{"depth":0,"oldest_age_ms":null,...store::Stats...},
//!  "disk":{"state":"writable","free_bytes":1800000000,"store_bytes":4100000,
//!          "reserve_bytes":8388608,"buffered":0},
//!  "upstream":{"state":"connected","last_error":null,"connects":1,"published":36000,...},
//!  "lan":{"clients":3,"messages_sent":108000,"denied":0},
//!  "commands":{"ok":12,"failed":0,"duplicates":1,"refused":{"out_of_range":2}},
//!  "time":{"synced":true,"unsynced":0,"corrected":0,"correction_failures":0},
//!  "dropped":{"store_refused":0,"queue":0,"upstream":0,"lan":0},
//!  "buses":{"rs485":{"requests":7200,"failed_requests":0,"readings":36000,
//!           "garbage_lines":0,"devices":{"meter1":"online","meter2":"quarantined"}}}}
//! ```
//!
//! `time.synced` is whether the wall clock is synchronized now; `unsynced` counts the
//! readings sent with `"time":"unsynced"`, `corrected` those corrected after the sync
//! (see `crate::time`).
//! `disk` is the store's filesystem: `state` is `writable`, `full` (readings wait in
//! the memory buffer, `buffered`), `read_only` or `failing`; `free_bytes` what is free
//! on that filesystem, `store_bytes` the queue file with its WAL.
//! `queue` and `disk` are absent without an upstream (no store), `upstream` when LAN-only, `lan`
//! without a local broker. A device that has not reported a state yet is `"starting"`.
//! `upstream.state` is one word (`connecting`, `connected`, `backoff`, `stopped`) and
//! `upstream.last_error` why it backs off (`null` otherwise), so a dashboard can
//! match the state without parsing an error text.
//!
//! The report is retained on the local broker, so a new subscriber gets the last one
//! at once instead of waiting up to an interval. Upstream it is not retained: a
//! backlog replayed newest first would leave an old report as the retained one.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::commands::CommandCounters;
use super::pipeline::{Counters, DeviceStates};
use super::systemd::{Heartbeat, BEAT_PERIOD};
use crate::broker::BrokerHandle;
use crate::clock::now_ms;
use crate::field::{ResolvedBus, StatsSnapshot};
use crate::mqtt::QoS;
use crate::store::{Done, Message, Priority, Queue};
use crate::time::TimeCounters;
use crate::topics::Topics;
use crate::uplink::UplinkHandle;

/// How long the report waits for the store's figures.
const STATS_WAIT: Duration = Duration::from_secs(2);

/// The running buses (replaced on reload), for their names, devices and counters.
pub type BusMap = Arc<Mutex<Vec<ResolvedBus>>>;

/// What the report is made of; `/metrics` reads the same (see `metrics::Metrics`).
pub struct Health {
    pub topics: Topics,
    pub started: Instant,
    pub interval: Duration,
    pub qos: QoS,
    pub broker: Option<BrokerHandle>,
    pub queue: Option<Queue>,
    pub uplink: Option<Arc<UplinkHandle>>,
    pub counters: Arc<Counters>,
    pub devices: DeviceStates,
    pub buses: BusMap,
    pub commands: Arc<CommandCounters>,
    pub time: Arc<TimeCounters>,
}

impl Health {
    /// Publishes a report every `interval` until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, heartbeat: Heartbeat) {
        let mut report = tokio::time::interval(self.interval);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        report.reset();
        let mut beat = tokio::time::interval(BEAT_PERIOD);
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = beat.tick() => heartbeat.beat(),
                _ = report.tick() => {
                    let accepted = self.counters.accepted.load(Ordering::Relaxed);
                    let elapsed = last.0.elapsed().as_secs_f64();
                    let per_sec = if elapsed > 0.0 {
                        accepted.saturating_sub(last.1) as f64 / elapsed
                    } else {
                        0.0
                    };
                    last = (Instant::now(), accepted);
                    let body = self.report(per_sec).await;
                    self.publish(body.to_string()).await;
                }
            }
        }
    }

    /// The report's JSON.
    pub async fn report(&self, per_sec: f64) -> Value {
        let mut report = Map::new();
        report.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        report.insert(
            "uptime_secs".into(),
            json!(self.started.elapsed().as_secs()),
        );
        report.insert("ts".into(), json!(now_ms()));
        report.insert(
            "readings".into(),
            json!({
                "accepted": self.counters.accepted.load(Ordering::Relaxed),
                "per_sec": (per_sec * 100.0).round() / 100.0,
                "store_refused": self.counters.store_failed.load(Ordering::Relaxed),
            }),
        );
        report.insert("commands".into(), self.commands.json());
        report.insert(
            "time".into(),
            json!({
                "synced": self.time.synced.load(Ordering::Relaxed),
                "unsynced": self.time.unsynced.load(Ordering::Relaxed),
                "corrected": self.time.corrected.load(Ordering::Relaxed),
                "correction_failures": self.time.correction_failures.load(Ordering::Relaxed),
            }),
        );
        let mut dropped = Map::new();
        dropped.insert(
            "store_refused".into(),
            json!(self.counters.store_failed.load(Ordering::Relaxed)),
        );
        if let Some(queue) = &self.queue {
            // Bounded: a store thread stuck in a disk call must not stop the report.
            let stats = match tokio::time::timeout(STATS_WAIT, queue.stats()).await {
                Ok(Ok(stats)) => {
                    dropped.insert("queue".into(), json!(stats.dropped.total()));
                    report.insert(
                        "disk".into(),
                        json!({
                            "state": stats.disk,
                            "free_bytes": stats.fs_free_bytes,
                            "store_bytes": stats.file_bytes,
                            "reserve_bytes": stats.reserve_bytes,
                            "buffered": stats.buffered,
                        }),
                    );
                    serde_json::to_value(stats).unwrap_or(Value::Null)
                }
                Ok(Err(err)) => json!({ "error": err.to_string() }),
                Err(_) => json!({ "error": "the store did not answer in time (disk busy)" }),
            };
            report.insert("queue".into(), stats);
        }
        if let Some(uplink) = &self.uplink {
            let stats = uplink.stats();
            let (state, last_error) = {
                let state = uplink.state();
                let state = state.borrow();
                (state.word(), state.last_error().map(str::to_string))
            };
            dropped.insert(
                "upstream".into(),
                json!(stats.dropped_too_large + stats.dropped_invalid + stats.rejected),
            );
            report.insert(
                "upstream".into(),
                json!({
                    "state": state,
                    "last_error": last_error,
                    "connects": stats.connects,
                    "connect_failures": stats.connect_failures,
                    "published": stats.published,
                    "resent": stats.resent,
                    "acked": stats.acked,
                    "throttled": stats.throttled,
                }),
            );
        }
        if let Some(broker) = &self.broker {
            let stats = broker.stats();
            dropped.insert("lan".into(), json!(stats.dropped));
            report.insert(
                "lan".into(),
                json!({
                    "clients": stats.clients_connected,
                    "messages_sent": stats.messages_sent,
                    "denied": stats.denied,
                }),
            );
        }
        report.insert("dropped".into(), Value::Object(dropped));
        report.insert("buses".into(), self.bus_states());
        Value::Object(report)
    }

    fn bus_states(&self) -> Value {
        let mut out = Map::new();
        for bus in bus_snapshots(&self.buses, &self.devices) {
            let states: BTreeMap<String, String> = bus.devices.into_iter().collect();
            let stats = bus.stats;
            out.insert(
                bus.name,
                json!({
                    "requests": stats.requests,
                    "failed_requests": stats.failed_requests,
                    "readings": stats.readings,
                    "garbage_lines": stats.garbage_lines,
                    "devices": states,
                }),
            );
        }
        Value::Object(out)
    }

    async fn publish(&self, body: String) {
        let topic = self.topics.health();
        let payload = Bytes::from(body);
        if let Some(broker) = &self.broker {
            broker.publish(&topic, payload.clone(), QoS::AtMostOnce, true);
        }
        if let Some(queue) = &self.queue {
            let message = Message {
                topic,
                payload,
                qos: self.qos,
                retain: false,
                created_ms: now_ms(),
                priority: Priority::Periodic,
                unsynced: None,
            };
            // Handed over without waiting for the commit: a full disk must not stop the
            // report.
            let done: Done = Box::new(|result| {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "health report not queued");
                }
            });
            queue.submit(vec![message], done).await;
        }
    }
}

/// One bus at one moment: its counters and each device's state (`starting` until the
/// device reports one), in configuration order.
pub struct BusSnapshot {
    pub name: String,
    pub stats: StatsSnapshot,
    pub devices: Vec<(String, String)>,
}

/// The buses now, as the health report and the metrics endpoint see them.
pub fn bus_snapshots(buses: &BusMap, devices: &DeviceStates) -> Vec<BusSnapshot> {
    let states = devices
        .lock()
        .map(|states| states.clone())
        .unwrap_or_default();
    let buses = buses.lock().map(|buses| buses.clone()).unwrap_or_default();
    buses
        .into_iter()
        .map(|bus| BusSnapshot {
            name: bus.name().to_string(),
            stats: bus.stats(),
            devices: bus
                .device_names()
                .into_iter()
                .map(|device| {
                    let state = states
                        .get(&device)
                        .map_or_else(|| "starting".to_string(), ToString::to_string);
                    (device, state)
                })
                .collect(),
        })
        .collect()
}

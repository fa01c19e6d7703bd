//! The pipeline: field events in, the local broker and the store out.
//!
//! Invariants:
//! - A reading is published to the local broker as soon as it arrives (in-process,
//!   never blocking) and handed to the store in batches; it counts as accepted only
//!   once it is durable: committed by the store, or acknowledged by the upstream
//!   broker while the store still held it in memory (the fast path; the store calls
//!   back on the earlier of the two, see [`Queue::submit`]). Without a store
//!   (LAN-only) a reading is accepted once handed to the local broker.
//! - The pipeline never waits for a commit: a batch is handed to the store thread as
//!   soon as the previous one is queued there, so a full or read-only disk never stops
//!   it reading (the store keeps what it cannot write in its bounded memory buffer and
//!   counts what the drop policy drops). Batches are handed over one at a time, so the
//!   store sees readings in arrival order.
//! - Everything is bounded: the input channel, and the pending batch (at most
//!   `batch_max`; only while the store thread has a full request channel, i.e. is
//!   stuck in one disk call, does the pipeline stop reading).
//! - Every reading handed to the store is counted once: `accepted` when durable,
//!   `store_failed` when refused or dropped before it was stored.
//! - Readings are marked and corrected by the time keeper ([`TimeKeeper`]) as they
//!   enter; when the clock's sync arrives (looked at every heartbeat tick) the pending
//!   batch is corrected at once and the store's correction is handed over like a
//!   batch, behind the batches handed over before it.
//! - When every sender is gone, [`Pipeline::run`] hands over what is pending, waits
//!   until the store has answered every batch and returns: this is the "commit the
//!   pipeline" step of a shutdown (bounded by the agent's shutdown timeout).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::recent::Recent;
use super::systemd::{Heartbeat, BEAT_PERIOD};
use crate::broker::BrokerHandle;
use crate::field::{DeviceState, FieldEvent};
use crate::future::maybe;
use crate::mqtt::QoS;
use crate::store::{Done, Message, Priority, Queue};
use crate::time::TimeKeeper;
use crate::topics::Topics;

/// Handing a batch to the store thread that takes longer than this counts as a
/// stalled pipeline for the watchdog (the store thread is stuck in one disk call).
const HANDOVER_STALL: Duration = Duration::from_secs(20);

/// Figures the health report and the tests read.
#[derive(Debug, Default)]
pub struct Counters {
    /// Readings accepted: committed to the store or acknowledged upstream before that,
    /// or published locally when LAN-only.
    pub accepted: AtomicU64,
    /// Readings the store refused or dropped before storing them (the store logs why
    /// and counts them by reason); they reached the local broker.
    pub store_failed: AtomicU64,
    /// Batches the store answered.
    pub appends: AtomicU64,
    /// Batches handed to the store and not answered yet.
    outstanding: AtomicU64,
    /// Woken when `outstanding` drops to zero.
    settled: Notify,
}

impl Counters {
    /// What the store calls once a batch of `readings` readings is answered.
    fn on_answer(self: &Arc<Self>, readings: u64) -> Done {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let counters = Arc::clone(self);
        Box::new(move |result| {
            let counter = match result {
                Ok(_) => &counters.accepted,
                Err(_) => &counters.store_failed,
            };
            counter.fetch_add(readings, Ordering::Relaxed);
            counters.appends.fetch_add(1, Ordering::Relaxed);
            if counters.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                counters.settled.notify_one();
            }
        })
    }

    /// Resolves once the store has answered every batch handed to it.
    async fn all_answered(&self) {
        while self.outstanding.load(Ordering::Acquire) > 0 {
            self.settled.notified().await;
        }
    }
}

/// The last known state of every device, for the health report.
pub type DeviceStates = Arc<Mutex<BTreeMap<String, DeviceState>>>;

/// Where the pipeline sends things.
pub struct Pipeline {
    pub topics: Topics,
    /// QoS of messages queued for the upstream broker.
    pub qos: QoS,
    /// Readings retained on the local broker.
    pub retain: bool,
    /// Readings retained upstream.
    pub retain_upstream: bool,
    pub batch_max: usize,
    pub broker: Option<BrokerHandle>,
    pub queue: Option<Queue>,
    pub counters: Arc<Counters>,
    pub devices: DeviceStates,
    pub time: TimeKeeper,
    /// Every reading is noted here for the status page.
    pub recent: Arc<Recent>,
    /// With `[upstream] format = "sparkplug"`: what the store gets instead of the JSON
    /// message (the local broker keeps JSON).
    pub sparkplug: Option<super::sparkplug::Node>,
}

type Handover = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Pipeline {
    /// Runs until every sender of `events` is gone and the store answered every batch.
    pub async fn run(mut self, mut events: mpsc::Receiver<FieldEvent>, heartbeat: Heartbeat) {
        let mut pending: Vec<Message> = Vec::new();
        let mut pending_readings = 0u64;
        let mut handover: Option<Handover> = None;
        let mut handover_since = Instant::now();
        let mut open = true;
        // Grows to the largest burst seen (`recv_many` reserves as it needs), not to
        // `batch_max` up front: a gateway's bursts are a few readings, and 1,024 events
        // reserved would be ~136 KiB of resident memory for nothing.
        let mut received = Vec::new();
        let mut ticker = tokio::time::interval(BEAT_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if let (None, Some(queue)) = (&handover, &self.queue) {
                if let Some(work) = self.time.store_work(queue) {
                    handover = Some(work);
                    handover_since = Instant::now();
                }
            }
            if handover.is_none() && !pending.is_empty() {
                if let Some(queue) = &self.queue {
                    let batch = std::mem::take(&mut pending);
                    let done = self
                        .counters
                        .on_answer(std::mem::take(&mut pending_readings));
                    let queue = queue.clone();
                    handover = Some(Box::pin(async move { queue.submit(batch, done).await }));
                    handover_since = Instant::now();
                }
            }
            if !open && handover.is_none() && pending.is_empty() {
                break;
            }
            let room = self.batch_max.saturating_sub(pending.len());
            tokio::select! {
                count = events.recv_many(&mut received, room), if open && room > 0 => {
                    if count == 0 {
                        open = false;
                    }
                    for event in received.drain(..) {
                        pending_readings += self.handle(event, &mut pending);
                    }
                }
                () = maybe(&mut handover) => handover = None,
                _ = ticker.tick() => {
                    if self.time.check() {
                        self.time.correct_pending(&mut pending);
                    }
                    let stalled = handover.is_some() && handover_since.elapsed() > HANDOVER_STALL;
                    if !stalled {
                        heartbeat.beat();
                    }
                }
            }
        }
        self.counters.all_answered().await;
    }

    /// Publishes one event locally and queues it for the store; returns how many
    /// readings now wait for a commit (0 or 1).
    fn handle(&self, mut event: FieldEvent, pending: &mut Vec<Message>) -> u64 {
        let unsynced = self.time.mark(&mut event);
        let upstream = self
            .sparkplug
            .as_ref()
            .map(|node| node.row(&event, self.qos));
        let out = self.outgoing(event);
        let payload = Bytes::from(out.payload);
        if let Some(broker) = &self.broker {
            // QoS 1, so persistent LAN sessions get readings queued while offline.
            broker.publish(&out.topic, payload.clone(), QoS::AtLeastOnce, out.retain);
        }
        if self.queue.is_none() {
            self.counters
                .accepted
                .fetch_add(out.readings, Ordering::Relaxed);
            return 0;
        }
        let message = match upstream {
            None => Message {
                topic: out.topic,
                payload,
                qos: self.qos,
                retain: out.retain_upstream,
                created_ms: out.created_ms,
                priority: out.priority,
                unsynced,
            },
            // The boot-clock stamp decides its age; a correction leaves the edge node's
            // rows as they are (not JSON), marked.
            Some(Some(row)) => Message { unsynced, ..row },
            // Nothing of it goes upstream (a batch summary in Sparkplug).
            Some(None) => return 0,
        };
        pending.push(message);
        out.readings
    }

    /// What `event` becomes on the wire; a device state is also noted for the health
    /// report.
    fn outgoing(&self, event: FieldEvent) -> Outgoing {
        match event {
            FieldEvent::Reading(reading) => {
                self.recent.record(&reading);
                Outgoing {
                    topic: self.topics.point(
                        &reading.device,
                        &reading.point,
                        reading.topic.as_deref(),
                    ),
                    payload: reading.payload_json(),
                    retain: self.retain,
                    retain_upstream: self.retain_upstream,
                    priority: Priority::Periodic,
                    created_ms: reading.ts_ms,
                    readings: 1,
                }
            }
            FieldEvent::Batch {
                device,
                payload_json,
                ts_ms,
                ..
            } => Outgoing {
                topic: self.topics.device_batch(&device),
                payload: payload_json,
                retain: false,
                retain_upstream: false,
                priority: Priority::Periodic,
                created_ms: ts_ms,
                readings: 0,
            },
            FieldEvent::DeviceState { device, state } => {
                let topic = self.topics.device_status(&device);
                if let Ok(mut devices) = self.devices.lock() {
                    devices.insert(device, state);
                }
                Outgoing {
                    topic,
                    payload: state.to_string(),
                    retain: true,
                    retain_upstream: true,
                    priority: Priority::Event,
                    created_ms: crate::clock::now_ms(),
                    readings: 0,
                }
            }
        }
    }
}

/// One field event as it goes out: to the local broker at once, then (with a store)
/// into the pending batch.
struct Outgoing {
    topic: String,
    payload: String,
    /// Retained on the local broker.
    retain: bool,
    /// Retained upstream.
    retain_upstream: bool,
    priority: Priority,
    created_ms: i64,
    /// Readings it counts for once accepted: 1 for a reading, 0 for a batch (a summary
    /// of one poll, whose points are sent as readings too) or a device state.
    readings: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::{Quality, Reading, Value};
    use crate::store::StoreConfig;

    fn reading(n: u64) -> FieldEvent {
        FieldEvent::Reading(Reading {
            device: "meter".into(),
            point: "p".into(),
            topic: None,
            value: Some(Value::UInt(n)),
            unit: None,
            ts_ms: crate::clock::now_ms(),
            mono_ms: crate::clock::mono_ms(),
            time: crate::field::TimeMark::Synced,
            quality: Quality::Good,
        })
    }

    fn pipeline(queue: &Queue, counters: &Arc<Counters>) -> Pipeline {
        Pipeline {
            topics: Topics::new("fb"),
            qos: QoS::AtLeastOnce,
            retain: false,
            retain_upstream: false,
            batch_max: 10,
            broker: None,
            queue: Some(queue.clone()),
            counters: counters.clone(),
            devices: DeviceStates::default(),
            time: TimeKeeper::new(Arc::new(crate::clock::TrustedClock), false, Arc::default()),
            recent: Arc::default(),
            sparkplug: None,
        }
    }

    /// Waits (bounded) until `check` holds on the store's stats.
    async fn wait_stats(queue: &Queue, what: &str, check: impl Fn(&crate::store::Stats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = queue.stats().await.expect("stats");
            if check(&stats) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Regression (issue 11): with one append in flight that resolved only after its
    /// commit, a full disk stopped the pipeline reading, so polling stopped and nothing
    /// was counted as dropped.
    #[tokio::test]
    async fn a_full_disk_never_stops_the_pipeline_and_counts_every_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(StoreConfig {
            path: dir.path().join("q.db"),
            commit_interval_ms: 2,
            memory_buffer_rows: 50,
            ..StoreConfig::default()
        })
        .expect("open");
        // Lower than the file: SQLite caps the file at its current size.
        queue
            .pragma("PRAGMA max_page_count = 1")
            .await
            .expect("max_page_count");
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(4);
        let run = tokio::spawn(pipeline(&queue, &counters).run(rx, Heartbeat::new("test")));

        let sent = 500u64;
        for n in 0..sent {
            tokio::time::timeout(Duration::from_secs(5), tx.send(reading(n)))
                .await
                .expect("the pipeline keeps taking readings while the disk is full")
                .expect("pipeline running");
        }
        wait_stats(&queue, "drops beyond the memory buffer", |s| {
            s.buffered <= 50 && s.dropped.disk_full >= sent - 50
        })
        .await;

        queue
            .pragma("PRAGMA max_page_count = 1048576")
            .await
            .expect("space returns");
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the pipeline finishes once its input closes")
            .expect("pipeline task");
        let stats = queue.stats().await.expect("stats");
        let accepted = counters.accepted.load(Ordering::Relaxed);
        assert_eq!(stats.buffered, 0, "{stats:?}");
        assert_eq!(accepted, stats.appended, "{stats:?}");
        assert_eq!(
            accepted + counters.store_failed.load(Ordering::Relaxed),
            sent,
            "every reading is accepted or counted as refused: {stats:?}"
        );
        assert_eq!(stats.depth + stats.dropped.total(), sent, "{stats:?}");
        queue.close().await.expect("close");
    }
}

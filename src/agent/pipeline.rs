//! The pipeline: field events in, the local broker and the store out.
//!
//! Invariants:
//! - A reading is published to the local broker as soon as it arrives (in-process,
//!   never blocking) and appended to the store in batches; it counts as accepted only
//!   once the store's append for it has resolved, i.e. after its commit. Without a
//!   store (LAN-only) a reading is accepted once handed to the local broker.
//! - At most one append is in flight, so the store sees readings in arrival order;
//!   what arrives meanwhile forms the next batch (at most `batch_max`).
//! - Everything is bounded: the input channel, and the pending batch (while it is full
//!   and an append is in flight, the pipeline stops reading, so the bus tasks wait).
//! - When every sender is gone, [`Pipeline::run`] appends what is pending, waits for the
//!   last commit and returns: this is the "commit the pipeline" step of a shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::systemd::{Heartbeat, BEAT_PERIOD};
use crate::broker::BrokerHandle;
use crate::field::{DeviceState, FieldEvent};
use crate::future::maybe;
use crate::mqtt::QoS;
use crate::store::{self, Message, Priority, Queue};
use crate::topics::Topics;

/// An append that takes longer than this counts as a stalled pipeline for the watchdog.
const APPEND_STALL: Duration = Duration::from_secs(20);

/// Figures the health report and the tests read.
#[derive(Debug, Default)]
pub struct Counters {
    /// Readings accepted: committed to the store, or published locally when LAN-only.
    pub accepted: AtomicU64,
    /// Readings the store refused (its error is logged); they reached the local broker.
    pub store_failed: AtomicU64,
    /// Commits the pipeline waited for.
    pub appends: AtomicU64,
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
}

type Append = Pin<Box<dyn Future<Output = (u64, Result<Vec<i64>, store::Error>)> + Send>>;

impl Pipeline {
    /// Runs until every sender of `events` is gone and the last batch is committed.
    pub async fn run(self, mut events: mpsc::Receiver<FieldEvent>, heartbeat: Heartbeat) {
        let mut pending: Vec<Message> = Vec::new();
        let mut pending_readings = 0u64;
        let mut inflight: Option<Append> = None;
        let mut inflight_since = Instant::now();
        let mut open = true;
        let mut received = Vec::with_capacity(self.batch_max);
        let mut store_failing = false;
        let mut ticker = tokio::time::interval(BEAT_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if inflight.is_none() && !pending.is_empty() {
                if let Some(queue) = &self.queue {
                    let batch = std::mem::take(&mut pending);
                    let readings = std::mem::take(&mut pending_readings);
                    let queue = queue.clone();
                    inflight = Some(Box::pin(
                        async move { (readings, queue.append(batch).await) },
                    ));
                    inflight_since = Instant::now();
                }
            }
            if !open && inflight.is_none() && pending.is_empty() {
                return;
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
                (readings, result) = maybe(&mut inflight) => {
                    inflight = None;
                    self.counters.appends.fetch_add(1, Ordering::Relaxed);
                    match result {
                        Ok(_) => {
                            self.counters.accepted.fetch_add(readings, Ordering::Relaxed);
                            if store_failing {
                                tracing::info!("store accepts readings again");
                                store_failing = false;
                            }
                        }
                        Err(err) => {
                            self.counters.store_failed.fetch_add(readings, Ordering::Relaxed);
                            if !store_failing {
                                tracing::error!(error = %err, "store refused readings; they reached the local broker only");
                                store_failing = true;
                            }
                        }
                    }
                }
                _ = ticker.tick() => {
                    let stalled = inflight.is_some() && inflight_since.elapsed() > APPEND_STALL;
                    if !stalled {
                        heartbeat.beat();
                    }
                }
            }
        }
    }

    /// Publishes one event locally and queues it for the store; returns how many
    /// readings now wait for a commit (0 or 1).
    fn handle(&self, event: FieldEvent, pending: &mut Vec<Message>) -> u64 {
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
        pending.push(Message {
            topic: out.topic,
            payload,
            qos: self.qos,
            retain: out.retain_upstream,
            created_ms: out.created_ms,
            priority: out.priority,
        });
        out.readings
    }

    /// What `event` becomes on the wire; a device state is also noted for the health
    /// report.
    fn outgoing(&self, event: FieldEvent) -> Outgoing {
        match event {
            FieldEvent::Reading(reading) => Outgoing {
                topic: self
                    .topics
                    .point(&reading.device, &reading.point, reading.topic.as_deref()),
                payload: reading.payload_json(),
                retain: self.retain,
                retain_upstream: self.retain_upstream,
                priority: Priority::Periodic,
                created_ms: reading.ts_ms,
                readings: 1,
            },
            FieldEvent::Batch {
                device,
                payload_json,
                ts_ms,
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

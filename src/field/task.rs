//! The skeleton every bus task sits on, whatever its protocol: the per-device state of a
//! running task, the hand-off from a poll to the device's health and the point filters,
//! choosing the device due next, and sending events into the agent's channel.
//!
//! Invariants:
//! - A device's points are polled in poll groups (one per interval, each with its own
//!   plan and grid). The group due first is polled first, so a slow or dead device
//!   delays the others by at most one poll of its own, once quarantined by almost
//!   nothing, and a slow group is never starved by fast ones (see [`next_due`]).
//! - Every point of a polled group yields exactly one reading per poll (good, or bad with
//!   the reason); the point's filter then decides whether it is published.
//! - A device's health is one for all its groups; quarantined, all its groups wait.
//! - A device state event is sent, and logged, only when the state changes.
//! - Sending into the bounded channel waits (backpressure) but never outlives shutdown.
//! - The skeleton knows no protocol: a loop plugs in a [`Poller`], and the skeleton does
//!   the rest (waiting for the device due first, counting readings, filtering, health,
//!   rescheduling, sending, stopping at shutdown).

use std::future::Future;

use tokio::sync::mpsc::Sender;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::command::{BusCommand, Inbox};
use super::link::{Chain, ReadError};
use super::plan::{PointSpan, ReadPlan};
use super::reading::{batch_json, DeviceState, FieldEvent, Reading};
use super::resolve::{ResolvedBus, ResolvedDevice};
use super::schedule::{Health, Outcome, PointFilter, Slot};
use crate::clock::now_ms;

/// What one poll of one device gave.
#[derive(Debug)]
pub(crate) struct Polled {
    /// `(point index, reading)`; a lines device may yield only some points.
    pub readings: Vec<(usize, Reading)>,
    pub outcome: Outcome,
    /// The fault that ended the poll, if any (logged with a state change).
    pub fault: Option<ReadError>,
}

/// One protocol's way of polling one device, plugged into [`run_polls`].
pub(crate) trait Poller: Send {
    /// Polls the device of `run` once. May change the run's plan (a split), never its
    /// schedule or health: those are the skeleton's. A poller that writes carries out
    /// the commands waiting in `inbox` before each of its requests.
    fn poll(
        &mut self,
        run: &mut DeviceRun,
        inbox: &mut Inbox,
    ) -> impl Future<Output = Polled> + Send;

    /// Carries out one command and answers it. The default (a bus that cannot write;
    /// validation keeps commands away from it) drops it, which the sender sees.
    fn execute(&mut self, command: BusCommand) -> impl Future<Output = ()> + Send {
        drop(command);
        std::future::ready(())
    }
}

/// The loop of a polled bus: poll the device due first, forever, until shutdown or until
/// the receiver is gone, and carry out each command as it arrives (while idle at once,
/// while polling before the poll's next request). A poll in progress is abandoned at
/// shutdown.
pub(crate) async fn run_polls<P: Poller>(
    bus: &ResolvedBus,
    poller: &mut P,
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
) {
    let mut runs = device_runs(bus);
    let mut inbox = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        inbox = bus.commands.inbox() => inbox,
    };
    loop {
        let i = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            Some(command) = inbox.recv() => {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    () = poller.execute(command) => continue,
                }
            }
            due = next_due(&runs, shutdown) => match due {
                Some(due) => due,
                None => return,
            },
        };
        let started = now_ms();
        let (i, g) = i;
        let run = &mut runs[i];
        run.current = g;
        let polled = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            polled = poller.poll(run, &mut inbox) => polled,
        };
        bus.stats.add_readings(polled.readings.len());
        let events = run.finish_poll(polled, started);
        if !send_all(tx, shutdown, events).await {
            return;
        }
    }
}

/// One poll group of a running device: its points' plan and its poll grid.
pub(crate) struct GroupRun {
    pub points: Vec<usize>,
    pub plan: ReadPlan,
    pub slot: Slot,
}

/// Per-device state inside a running bus task.
pub(crate) struct DeviceRun {
    pub spec: ResolvedDevice,
    pub spans: Vec<PointSpan>,
    /// The device's poll groups, fastest first; a device without groups has one.
    pub groups: Vec<GroupRun>,
    /// The group being polled (set by the skeleton before each poll).
    pub current: usize,
    pub health: Health,
    pub filters: Vec<PointFilter>,
}

impl DeviceRun {
    pub fn new(spec: &ResolvedDevice, anchor: Instant) -> DeviceRun {
        DeviceRun {
            spans: spec.spans(),
            groups: spec
                .groups()
                .iter()
                .map(|g| GroupRun {
                    points: g.points.clone(),
                    plan: spec.plan_of(g),
                    slot: Slot::new(anchor, g.interval),
                })
                .collect(),
            current: 0,
            health: Health::new(spec.quarantine_after, spec.fastest(), spec.backoff_max),
            filters: spec
                .points
                .iter()
                .map(|p| PointFilter::new(p.band, p.heartbeat, p.interval))
                .collect(),
            spec: spec.clone(),
        }
    }

    /// Records a poll's outcome, reschedules, and returns the events to send: published
    /// readings, the batch, and a state change.
    pub fn finish_poll(&mut self, polled: Polled, started_ms: i64) -> Vec<FieldEvent> {
        let Polled {
            readings,
            outcome,
            fault,
        } = polled;
        let now = Instant::now();
        let mut events = Vec::with_capacity(readings.len() + 2);
        let batch = (self.spec.batch && !readings.is_empty()).then(|| {
            let all: Vec<Reading> = readings.iter().map(|(_, r)| r.clone()).collect();
            batch_json(started_ms, &all)
        });
        for (i, r) in readings {
            if self.filters[i].admit(r.value.as_ref(), r.quality, now) {
                events.push(FieldEvent::Reading(r));
            }
        }
        if let Some(payload_json) = batch {
            events.push(FieldEvent::Batch {
                device: self.spec.name.clone(),
                payload_json,
                ts_ms: started_ms,
                mono_ms: crate::clock::mono_at(started_ms),
            });
        }
        if let Some(state) = self.health.record(outcome) {
            self.log_state(state, fault.as_ref());
            events.push(FieldEvent::DeviceState {
                device: self.spec.name.clone(),
                state,
            });
        }
        match self.health.backoff() {
            // Quarantined: every group waits, so a dead device costs one poll per backoff.
            Some(wait) => {
                for g in &mut self.groups {
                    g.slot.advance(now, Some(wait));
                }
            }
            None => {
                if let Some(g) = self.groups.get_mut(self.current) {
                    g.slot.advance(now, None);
                }
            }
        }
        events
    }

    fn log_state(&self, state: DeviceState, fault: Option<&ReadError>) {
        let device = self.spec.name.as_str();
        match state {
            DeviceState::Online => tracing::info!(device, "device online"),
            DeviceState::Offline => tracing::warn!(
                device,
                error = %fault.map(|e| Chain(e).to_string()).unwrap_or_default(),
                "device offline"
            ),
            DeviceState::Quarantined => tracing::warn!(
                device,
                failures = self.spec.quarantine_after,
                error = %fault.map(|e| Chain(e).to_string()).unwrap_or_default(),
                retry_max_ms = self.spec.backoff_max.as_millis() as u64,
                "device quarantined; retrying with backoff"
            ),
        }
    }
}

/// Sends events in order; false once the receiver is gone, or once shutdown is
/// requested and the channel is full. At shutdown, what was already read is still
/// handed over while the channel has room (the pipeline drains it before the store
/// closes), but the task never waits for room.
pub(crate) async fn send_all(
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
    events: Vec<FieldEvent>,
) -> bool {
    for event in events {
        tokio::select! {
            biased;
            permit = tx.reserve() => match permit {
                Ok(permit) => permit.send(event),
                Err(_) => return false,
            },
            _ = shutdown.cancelled() => {
                if tx.try_send(event).is_err() {
                    return false;
                }
            }
        }
    }
    true
}

/// The per-device state of every device of `bus`, on poll grids anchored now.
fn device_runs(bus: &ResolvedBus) -> Vec<DeviceRun> {
    let anchor = Instant::now();
    bus.devices
        .iter()
        .map(|d| DeviceRun::new(d, anchor))
        .collect()
}

/// Waits until the poll group due first is due and returns `(device, group)` (ties go
/// to the device listed first, then to its slower group: the slow group waited longer);
/// `None` once shutdown is requested. A bus without devices just waits for shutdown.
///
/// Earliest due first is what keeps slow groups from starving on a busy bus: a group
/// that has waited is due earlier than any group that was just polled (whose next tick
/// is never in the past), so it goes next.
async fn next_due(runs: &[DeviceRun], shutdown: &CancellationToken) -> Option<(usize, usize)> {
    let due = runs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.groups
                .iter()
                .enumerate()
                .map(move |(g, group)| (group.slot.next, i, std::cmp::Reverse(g)))
        })
        .min();
    let Some((at, i, std::cmp::Reverse(g))) = due else {
        shutdown.cancelled().await;
        return None;
    };
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        _ = tokio::time::sleep_until(at) => Some((i, g)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_event(device: &str) -> FieldEvent {
        FieldEvent::DeviceState {
            device: device.to_string(),
            state: DeviceState::Online,
        }
    }

    /// Regression: at shutdown a poll's readings, already read, were dropped even when
    /// the channel had room, so they never reached the pipeline's final commit.
    #[tokio::test]
    async fn readings_already_read_are_handed_over_at_shutdown_while_there_is_room() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert!(send_all(&tx, &shutdown, vec![state_event("a"), state_event("b")]).await);
        let mut got = Vec::new();
        while let Ok(FieldEvent::DeviceState { device, .. }) = rx.try_recv() {
            got.push(device);
        }
        assert_eq!(got, ["a", "b"]);

        // A full channel does not hold the stopping task.
        tx.try_send(state_event("c")).expect("room for one");
        tx.try_send(state_event("d")).expect("room for two");
        assert!(!send_all(&tx, &shutdown, vec![state_event("e")]).await);
    }
}

//! Time and health bookkeeping for devices, with no I/O: when a device is due, what its
//! state is after a poll, and whether a reading is worth publishing.
//!
//! Invariants:
//! - A poll group's polls (a device's points of one interval) sit on a fixed grid
//!   `anchor + k × interval`; a poll that overruns skips the ticks it missed (tokio's
//!   `MissedTickBehavior::Skip`), it never bunches them, and the grid never drifts with
//!   poll duration.
//! - After `quarantine_after` consecutive failed polls a device is quarantined and retried
//!   after `2 × interval` (its fastest group's), then twice as long each time, up to
//!   `backoff_max`; one answer puts it back on its grid. A bus-level disconnection is not the device's fault and
//!   never quarantines it.
//! - Without a deadband every reading is published. With one, a reading is published when
//!   it is the first, its quality changed, its value moved beyond the band since the last
//!   published value, or the heartbeat would be late by the next chance to publish.
//! - Every time here is tokio's monotonic `Instant`, never the wall clock: a wall clock
//!   set back or forward (NTP after a boot without RTC) moves no poll, no backoff and no
//!   heartbeat. Readings take their timestamps elsewhere (`crate::clock`).

use std::time::Duration;

use tokio::time::Instant;

use super::reading::{DeviceState, Quality, Value};

/// The poll grid of one poll group.
#[derive(Debug, Clone)]
pub struct Slot {
    anchor: Instant,
    interval: Duration,
    /// When the device is next due.
    pub next: Instant,
}

impl Slot {
    pub fn new(anchor: Instant, interval: Duration) -> Slot {
        Slot {
            anchor,
            interval: interval.max(Duration::from_millis(1)),
            next: anchor,
        }
    }

    /// Plans the next poll after the one due at `self.next` finished at `now`: the next
    /// grid tick (skipping those already past), or `now + backoff` for a quarantined
    /// device.
    pub fn advance(&mut self, now: Instant, backoff: Option<Duration>) {
        if let Some(wait) = backoff {
            self.next = now + wait;
            return;
        }
        let period = self.interval.as_nanos();
        let served = self.next.saturating_duration_since(self.anchor).as_nanos();
        let mut k = served / period + 1;
        let behind = now.saturating_duration_since(self.anchor).as_nanos();
        if self.anchor + nanos(k * period) < now {
            k = behind.div_ceil(period);
        }
        self.next = self.anchor + nanos(k * period);
    }
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

/// How a poll went, as far as the device's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device answered at least one request (data or a Modbus exception).
    Answered,
    /// The device did not answer (timeout, corrupted answers).
    Failed,
    /// The bus itself is down; says nothing about the device.
    BusDown,
}

/// Consecutive failures, state and backoff of one device.
#[derive(Debug, Clone)]
pub struct Health {
    failures: u32,
    state: Option<DeviceState>,
    quarantine_after: u32,
    interval: Duration,
    backoff_max: Duration,
}

impl Health {
    pub fn new(quarantine_after: u32, interval: Duration, backoff_max: Duration) -> Health {
        Health {
            failures: 0,
            state: None,
            quarantine_after: quarantine_after.max(1),
            interval,
            backoff_max: backoff_max.max(interval),
        }
    }

    pub fn state(&self) -> Option<DeviceState> {
        self.state
    }

    /// Records a poll; returns the new state if it changed (or on the first poll).
    pub fn record(&mut self, outcome: Outcome) -> Option<DeviceState> {
        let state = match outcome {
            Outcome::Answered => {
                self.failures = 0;
                DeviceState::Online
            }
            Outcome::Failed => {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.quarantine_after {
                    DeviceState::Quarantined
                } else {
                    DeviceState::Offline
                }
            }
            Outcome::BusDown => match self.state {
                Some(DeviceState::Quarantined) => DeviceState::Quarantined,
                _ => DeviceState::Offline,
            },
        };
        if self.state == Some(state) {
            None
        } else {
            self.state = Some(state);
            Some(state)
        }
    }

    /// The wait before the next attempt when quarantined, `None` otherwise (normal grid).
    pub fn backoff(&self) -> Option<Duration> {
        if self.state != Some(DeviceState::Quarantined) {
            return None;
        }
        let doublings = self.failures.saturating_sub(self.quarantine_after).min(20) + 1;
        Some(
            self.interval
                .saturating_mul(1u32 << doublings)
                .min(self.backoff_max),
        )
    }
}

/// Deadband of one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Band {
    /// Publish every reading.
    Every,
    Absolute(f64),
    Percent(f64),
}

/// Decides which readings of one point are published.
#[derive(Debug, Clone)]
pub struct PointFilter {
    band: Band,
    heartbeat: Option<Duration>,
    /// The poll interval: a heartbeat is sent at the last poll before it would be late.
    slack: Duration,
    last: Option<(Option<Value>, Quality, Instant)>,
}

impl PointFilter {
    /// `slack` is the time to the next chance to publish (the poll interval; zero for a
    /// stream): the heartbeat goes out when waiting for that chance would make it late,
    /// so gaps between publications never exceed the heartbeat.
    pub fn new(band: Band, heartbeat: Option<Duration>, slack: Duration) -> PointFilter {
        PointFilter {
            band,
            heartbeat,
            slack,
            last: None,
        }
    }

    /// True if this reading should be published; remembers it if so.
    pub fn admit(&mut self, value: Option<&Value>, quality: Quality, now: Instant) -> bool {
        let publish = match (&self.band, &self.last) {
            (Band::Every, _) | (_, None) => true,
            (band, Some((last_value, last_quality, at))) => {
                *last_quality != quality
                    || self
                        .heartbeat
                        .is_some_and(|h| now.duration_since(*at) + self.slack >= h)
                    || moved(band, last_value.as_ref(), value)
            }
        };
        if publish {
            self.last = Some((value.cloned(), quality, now));
        }
        publish
    }
}

fn moved(band: &Band, last: Option<&Value>, now: Option<&Value>) -> bool {
    match (last, now) {
        (None, None) => false,
        (Some(a), Some(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => {
                let limit = match band {
                    Band::Every => return true,
                    Band::Absolute(d) => *d,
                    Band::Percent(p) => x.abs() * p / 100.0,
                };
                (y - x).abs() > limit || (limit == 0.0 && y != x)
            }
            _ => a != b,
        },
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_grid_does_not_drift_and_skips_missed_ticks() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut slot = Slot::new(t0, s);
        // A poll of 300 ms: next tick is still on the grid.
        slot.advance(t0 + Duration::from_millis(300), None);
        assert_eq!(slot.next, t0 + s);
        // A poll that overran 2.5 intervals: ticks 2 and 3 are skipped, not bunched.
        slot.advance(t0 + Duration::from_millis(3500), None);
        assert_eq!(slot.next, t0 + 4 * s);
        // Finishing exactly on a tick polls at that tick.
        slot.advance(t0 + 5 * s, None);
        assert_eq!(slot.next, t0 + 5 * s);
        // After a backoff, the grid resumes where it was.
        slot.advance(
            t0 + Duration::from_millis(5100),
            Some(Duration::from_millis(2300)),
        );
        assert_eq!(slot.next, t0 + Duration::from_millis(7400));
        slot.advance(t0 + Duration::from_millis(7450), None);
        assert_eq!(slot.next, t0 + 8 * s);
    }

    #[test]
    fn quarantine_after_n_failures_with_capped_doubling_backoff() {
        let s = Duration::from_secs(1);
        let mut h = Health::new(3, s, Duration::from_secs(10));
        assert_eq!(h.record(Outcome::Failed), Some(DeviceState::Offline));
        assert_eq!(h.backoff(), None);
        assert_eq!(h.record(Outcome::Failed), None);
        assert_eq!(h.record(Outcome::Failed), Some(DeviceState::Quarantined));
        let waits: Vec<_> = (0..5)
            .map(|_| {
                let w = h.backoff().unwrap();
                h.record(Outcome::Failed);
                w
            })
            .collect();
        assert_eq!(waits, [2, 4, 8, 10, 10].map(Duration::from_secs));
        assert_eq!(
            h.record(Outcome::BusDown),
            None,
            "a dead bus keeps the quarantine"
        );
        assert_eq!(h.record(Outcome::Answered), Some(DeviceState::Online));
        assert_eq!(h.backoff(), None);
        assert_eq!(h.record(Outcome::BusDown), Some(DeviceState::Offline));
        for _ in 0..10 {
            h.record(Outcome::BusDown);
        }
        assert_eq!(
            h.state(),
            Some(DeviceState::Offline),
            "bus faults never quarantine"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadband_heartbeat_and_quality_changes() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut f = PointFilter::new(
            Band::Absolute(0.5),
            Some(Duration::from_secs(10)),
            Duration::ZERO,
        );
        let v = |x: f64| Value::Float(x);
        assert!(f.admit(Some(&v(10.0)), Quality::Good, at(0)));
        assert!(!f.admit(Some(&v(10.4)), Quality::Good, at(1000)));
        assert!(!f.admit(Some(&v(9.6)), Quality::Good, at(2000)));
        assert!(f.admit(Some(&v(10.6)), Quality::Good, at(3000)));
        assert!(!f.admit(Some(&v(10.6)), Quality::Good, at(12_000)));
        assert!(
            f.admit(Some(&v(10.6)), Quality::Good, at(13_000)),
            "heartbeat"
        );
        assert!(
            f.admit(None, Quality::Timeout, at(14_000)),
            "quality change"
        );
        assert!(!f.admit(None, Quality::Timeout, at(15_000)));
        assert!(
            f.admit(Some(&v(10.6)), Quality::Good, at(16_000)),
            "recovery"
        );

        let mut p = PointFilter::new(Band::Percent(10.0), None, Duration::ZERO);
        assert!(p.admit(Some(&Value::UInt(200)), Quality::Good, at(0)));
        assert!(!p.admit(Some(&Value::UInt(219)), Quality::Good, at(1)));
        assert!(p.admit(Some(&Value::UInt(221)), Quality::Good, at(2)));
        assert!(
            !p.admit(Some(&Value::UInt(221)), Quality::Good, at(1_000_000)),
            "no heartbeat"
        );

        let mut zero = PointFilter::new(Band::Absolute(0.0), None, Duration::ZERO);
        assert!(zero.admit(Some(&Value::Bool(false)), Quality::Good, at(0)));
        assert!(!zero.admit(Some(&Value::Bool(false)), Quality::Good, at(1)));
        assert!(zero.admit(Some(&Value::Bool(true)), Quality::Good, at(2)));
        let mut every = PointFilter::new(Band::Every, None, Duration::ZERO);
        assert!(every.admit(Some(&v(1.0)), Quality::Good, at(0)));
        assert!(every.admit(Some(&v(1.0)), Quality::Good, at(0)));
    }
}

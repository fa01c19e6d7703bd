//! The resolved model of the field side: buses, devices and points with profiles merged
//! in and every default applied, plus the counters of each bus.
//!
//! Invariants:
//! - Resolving is pure (no I/O) and only ever sees a configuration that passed
//!   [`FieldConfig::validate`]; a value validation guarantees is taken as given here
//!   (a regex that compiled there compiles here).
//! - A [`ResolvedBus`] is what the agent keeps: spawning it again after a crashed task
//!   reuses its devices and its counters ([`BusStats`] is shared through an `Arc`), while
//!   everything a running task learns (remembered splits, deadband state) starts over.
//! - This module knows nothing of the bus loops: the task skeleton and both loops read
//!   from it, it reads from none of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::command::CommandQueue;
use super::config::{
    BusConfig, BusKind, DeviceConfig, FieldConfig, HaComponent, LineMode, PointConfig,
    ProfileConfig, StateClass,
};
use super::decode::{ByteOrder, Codec};
use super::link::ReadError;
use super::plan::{Limits, PointSpan, ReadPlan};
use super::reading::{Quality, Reading, TimeMark, Value};
use super::schedule::Band;
use super::write::{encode, Refusal, Requested, WriteOp, WriteSpec};

/// Upper bounds (seconds) of the request latency histogram's buckets; a last, unbounded
/// bucket takes the rest. From a fast TCP device (a few ms) to a slow RS-485 timeout.
pub const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// The qualities a failed request can have, in the order of [`StatsSnapshot::failures`].
pub const FAILURE_QUALITIES: [Quality; 4] = [
    Quality::Timeout,
    Quality::Crc,
    Quality::Disconnected,
    Quality::Protocol,
];

/// Counters of one bus, shared with whoever holds its [`ResolvedBus`].
#[derive(Debug, Default)]
pub struct BusStats {
    requests: AtomicU64,
    failed_requests: AtomicU64,
    failures: [AtomicU64; FAILURE_QUALITIES.len()],
    /// Requests per latency bucket (not cumulative); the last is above every bound.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    readings: AtomicU64,
    lines: AtomicU64,
    garbage_lines: AtomicU64,
}

/// A copy of a bus's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Modbus requests sent (each retry counts), or poll requests written on a lines bus.
    pub requests: u64,
    /// Requests that got no usable answer (timeout, corrupted, disconnected).
    pub failed_requests: u64,
    /// Of those, by quality, in the order of [`FAILURE_QUALITIES`].
    pub failures: [u64; FAILURE_QUALITIES.len()],
    /// Requests by latency (request sent to answer or failure), per bucket of
    /// [`LATENCY_BUCKETS`] (not cumulative; the last is above every bound).
    pub latency: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of all request latencies, in microseconds.
    pub latency_sum_us: u64,
    /// Readings produced (before deadband filtering).
    pub readings: u64,
    /// Lines received on a lines bus.
    pub lines: u64,
    /// Lines skipped as garbage: too long, bad checksum, or not matching the parser.
    pub garbage_lines: u64,
}

impl BusStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            failed_requests: self.failed_requests.load(Ordering::Relaxed),
            failures: std::array::from_fn(|i| self.failures[i].load(Ordering::Relaxed)),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
            readings: self.readings.load(Ordering::Relaxed),
            lines: self.lines.load(Ordering::Relaxed),
            garbage_lines: self.garbage_lines.load(Ordering::Relaxed),
        }
    }

    /// Counts a request sent at `sent` that ended with `result` now.
    pub(crate) fn add_request<T>(&self, sent: Instant, result: &Result<T, ReadError>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let latency = sent.elapsed();
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(micros, Ordering::Relaxed);
        if let Err(err) = result {
            self.failed_requests.fetch_add(1, Ordering::Relaxed);
            let quality = err.quality();
            if let Some(i) = FAILURE_QUALITIES.iter().position(|q| *q == quality) {
                self.failures[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn add_readings(&self, n: usize) {
        self.readings.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_line(&self, garbage: bool) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        if garbage {
            self.garbage_lines.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A point with everything resolved from its configuration.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedPoint {
    pub name: String,
    pub unit: Option<String>,
    pub topic: Option<String>,
    /// Modbus points: where the point sits.
    pub span: Option<PointSpan>,
    pub codec: Codec,
    /// Lines points: capture group or key.
    pub field: String,
    pub band: Band,
    pub heartbeat: Option<Duration>,
    /// Writable points: their limits and write functions.
    pub write: Option<WriteSpec>,
    /// How often the point is polled (its own, its group's, or the device's interval).
    pub interval: Duration,
    /// The `poll_group` it belongs to, if any.
    pub group: Option<String>,
    /// Home Assistant discovery overrides.
    pub device_class: Option<String>,
    pub state_class: Option<StateClass>,
    pub ha_component: Option<HaComponent>,
}

/// Points of one device polled at one interval: one read plan, one poll grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PollGroup {
    pub interval: Duration,
    /// Indexes into the device's points, in order.
    pub points: Vec<usize>,
    /// The `poll_group` names among them (sorted, deduplicated).
    pub names: Vec<String>,
}

/// A device with its profile merged in.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedDevice {
    pub name: String,
    pub unit_id: u8,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub batch: bool,
    pub quarantine_after: u32,
    pub backoff_max: Duration,
    pub limits: Limits,
    /// Least pause between the end of one request to the device and the next to it.
    pub request_delay: Duration,
    pub request: Option<String>,
    pub regex: Option<regex_lite::Regex>,
    pub points: Vec<ResolvedPoint>,
    /// Home Assistant discovery: maker and model (the profile's name by default).
    pub manufacturer: Option<String>,
    pub model: Option<String>,
}

impl ResolvedDevice {
    pub fn spans(&self) -> Vec<PointSpan> {
        self.points
            .iter()
            .map(|p| {
                p.span.unwrap_or(PointSpan {
                    kind: super::decode::RegisterKind::Holding,
                    address: 0,
                    width: 1,
                })
            })
            .collect()
    }

    /// The device's poll groups, fastest first: points of one interval share one group
    /// (and so their requests), whatever group names brought them there.
    pub fn groups(&self) -> Vec<PollGroup> {
        let mut groups: Vec<PollGroup> = Vec::new();
        for (i, p) in self.points.iter().enumerate() {
            let g = match groups.iter().position(|g| g.interval == p.interval) {
                Some(g) => g,
                None => {
                    groups.push(PollGroup {
                        interval: p.interval,
                        points: Vec::new(),
                        names: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            groups[g].points.push(i);
            if let Some(name) = &p.group {
                if !groups[g].names.contains(name) {
                    groups[g].names.push(name.clone());
                }
            }
        }
        for g in &mut groups {
            g.names.sort();
        }
        groups.sort_by_key(|g| g.interval);
        groups
    }

    /// The read plan of one poll group.
    pub fn plan_of(&self, group: &PollGroup) -> ReadPlan {
        ReadPlan::build_for(&self.spans(), &group.points, self.limits)
    }

    /// The shortest interval of its groups (the base of its quarantine backoff).
    pub fn fastest(&self) -> Duration {
        self.points
            .iter()
            .map(|p| p.interval)
            .min()
            .unwrap_or(self.interval)
    }

    /// A reading of point `i` with the given outcome.
    pub fn reading(&self, i: usize, value: Option<Value>, quality: Quality, ts_ms: i64) -> Reading {
        let p = &self.points[i];
        debug_assert_eq!(value.is_some(), quality.is_good());
        Reading {
            device: self.name.clone(),
            point: p.name.clone(),
            topic: p.topic.clone(),
            value,
            unit: p.unit.clone(),
            ts_ms,
            mono_ms: crate::clock::mono_at(ts_ms),
            time: TimeMark::Synced,
            quality,
        }
    }
}

/// A validated bus, ready to be spawned (again, after a crash) with [`super::spawn_bus`].
#[derive(Debug, Clone)]
pub struct ResolvedBus {
    pub(crate) config: BusConfig,
    pub(crate) devices: Arc<[ResolvedDevice]>,
    pub(crate) stats: Arc<BusStats>,
    pub(crate) commands: CommandQueue,
}

/// A command checked against its point and encoded, ready for the bus queue.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedWrite {
    pub device: usize,
    pub point: usize,
    pub op: WriteOp,
    /// The point's least time between writes.
    pub min_interval: Duration,
}

impl ResolvedBus {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn kind(&self) -> BusKind {
        self.config.kind
    }

    /// The bus's counters so far (kept across respawns of the same `ResolvedBus`).
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The bus's command queue (kept across respawns of its task).
    pub fn commands(&self) -> &CommandQueue {
        &self.commands
    }

    /// Checks `value` for `device`/`point` and encodes the write; `None` when the
    /// device is not on this bus.
    pub fn plan_write(
        &self,
        device: &str,
        point: &str,
        value: Requested,
    ) -> Option<Result<PlannedWrite, Refusal>> {
        let d = self.devices.iter().position(|d| d.name == device)?;
        let points = &self.devices[d].points;
        let Some(p) = points.iter().position(|p| p.name == point) else {
            return Some(Err(Refusal::UnknownPoint));
        };
        let rp = &points[p];
        let (Some(spec), Some(span)) = (&rp.write, rp.span) else {
            return Some(Err(Refusal::NotWritable));
        };
        Some(encode(spec, span, &rp.codec, value).map(|op| PlannedWrite {
            device: d,
            point: p,
            op,
            min_interval: spec.min_interval,
        }))
    }

    /// Whether any point on this bus is writable.
    pub fn has_writable_points(&self) -> bool {
        self.devices
            .iter()
            .any(|d| d.points.iter().any(|p| p.write.is_some()))
    }

    /// The device names on this bus.
    pub fn device_names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }
}

fn resolve_point(
    d: &DeviceConfig,
    profile: Option<&ProfileConfig>,
    p: &PointConfig,
) -> ResolvedPoint {
    let data_type = p.data_type_or_default();
    let codec = Codec {
        data_type,
        order: p.order.unwrap_or(ByteOrder::ABCD),
        bit: p.bit.unwrap_or(0),
        string_registers: p.registers.unwrap_or(1),
        scale: p.scale,
        offset: p.offset,
    };
    let span = match (p.kind, p.address.and_then(|a| u16::try_from(a).ok())) {
        (Some(kind), Some(address)) => Some(PointSpan {
            kind,
            address,
            width: p.width().max(1),
        }),
        _ => None,
    };
    let band = match (p.deadband, p.deadband_percent) {
        (Some(d), _) => Band::Absolute(d),
        (None, Some(pc)) => Band::Percent(pc),
        (None, None) => Band::Every,
    };
    ResolvedPoint {
        name: p.name.clone(),
        unit: p.unit.clone(),
        topic: p.topic.clone(),
        span,
        codec,
        field: p.field().to_string(),
        band,
        heartbeat: (band != Band::Every && p.heartbeat_secs > 0)
            .then(|| Duration::from_secs(p.heartbeat_secs)),
        write: WriteSpec::of(d, p),
        interval: Duration::from_millis(
            d.interval_of(profile, p)
                .unwrap_or(d.poll_interval_ms)
                .max(1),
        ),
        group: p.poll_group.clone(),
        device_class: p.device_class.clone(),
        state_class: p.state_class,
        ha_component: p.ha_component,
    }
}

fn resolve_device(config: &FieldConfig, bus: &BusConfig, d: &DeviceConfig) -> ResolvedDevice {
    let profile = d
        .profile
        .as_ref()
        .and_then(|name| config.profiles.get(name));
    let profile_points = profile.map(|p| p.points.as_slice()).unwrap_or_default();
    ResolvedDevice {
        name: d.name.clone(),
        unit_id: d.unit_id,
        interval: Duration::from_millis(d.poll_interval_ms.max(1)),
        timeout: Duration::from_millis(d.timeout_ms(bus).max(1)),
        retries: d.retries,
        batch: d.batch,
        quarantine_after: d.quarantine_after,
        backoff_max: Duration::from_millis(d.backoff_max_ms),
        limits: Limits {
            max_gap: d.max_gap,
            max_registers: d.max_registers_per_request,
            max_bits: d.max_bits_per_request,
        },
        request_delay: Duration::from_millis(d.request_delay_ms),
        request: (bus.kind == BusKind::Lines && bus.mode() == LineMode::Poll)
            .then(|| d.request.clone())
            .flatten(),
        regex: d
            .regex
            .as_deref()
            .and_then(|r| regex_lite::Regex::new(r).ok()),
        points: profile_points
            .iter()
            .chain(&d.points)
            .map(|p| resolve_point(d, profile, p))
            .collect(),
        manufacturer: d.manufacturer.clone(),
        model: d.model.clone().or_else(|| d.profile.clone()),
    }
}

/// Resolves a configuration that passed [`FieldConfig::validate`].
pub(crate) fn resolve_buses(config: &FieldConfig) -> Vec<ResolvedBus> {
    config
        .buses
        .iter()
        .map(|bus| ResolvedBus {
            config: bus.clone(),
            devices: bus
                .devices
                .iter()
                .map(|d| resolve_device(config, bus, d))
                .collect::<Vec<_>>()
                .into(),
            stats: Arc::new(BusStats::default()),
            commands: CommandQueue::default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::config::tests::parse;
    use crate::field::Disconnect;

    /// A meter whose counters come every minute (profile group), one point at its own
    /// 200 ms, one device group overriding the profile's, the rest at the device's 1 s.
    const GROUPS: &str = r#"
        [[bus]]
        name = "rs485"
        kind = "rtu"
        port = "/dev/ttyUSB0"
        [[bus.device]]
        name = "meter"
        profile = "em"
        poll_groups = { status = 5000 }
        [[bus.device.point]]
        name = "power"
        kind = "input"
        address = 12
        type = "f32"
        poll_interval_ms = 200
        [[bus.device.point]]
        name = "alarm"
        kind = "holding"
        address = 100
        poll_group = "status"
        [profile.em]
        poll_groups = { energy = 60000, status = 10000, counters = 60000 }
        [[profile.em.point]]
        name = "voltage"
        kind = "input"
        address = 0
        type = "f32"
        [[profile.em.point]]
        name = "energy"
        kind = "input"
        address = 342
        type = "f32"
        poll_group = "energy"
        [[profile.em.point]]
        name = "hours"
        kind = "input"
        address = 344
        type = "f32"
        poll_group = "counters"
    "#;

    #[test]
    fn points_of_one_interval_share_a_group_and_its_requests() {
        let c = parse(GROUPS);
        assert_eq!(c.validate(), vec![]);
        let bus = crate::field::resolve(&c).unwrap().remove(0);
        let d = &bus.devices[0];
        let names = |g: &PollGroup| -> Vec<&str> {
            g.points
                .iter()
                .map(|&i| d.points[i].name.as_str())
                .collect()
        };
        let groups = d.groups();
        let summary: Vec<(u128, Vec<&str>, Vec<String>)> = groups
            .iter()
            .map(|g| (g.interval.as_millis(), names(g), g.names.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (200, vec!["power"], vec![]),
                (1000, vec!["voltage"], vec![]),
                (5000, vec!["alarm"], vec!["status".to_string()]),
                (
                    60_000,
                    vec!["energy", "hours"],
                    vec!["counters".to_string(), "energy".to_string()]
                ),
            ]
        );
        // Two groups of one interval read their neighbouring registers in one request.
        let slow = d.plan_of(&groups[3]);
        assert_eq!(slow.requests(), 1);
        assert_eq!((slow.blocks[0].start, slow.blocks[0].count), (342, 4));
        assert_eq!(slow.blocks[0].points, vec![1, 2]);
        assert_eq!(d.fastest(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_lands_in_its_latency_bucket_and_a_failure_under_its_quality() {
        let stats = BusStats::default();
        let sent = Instant::now();
        tokio::time::sleep(Duration::from_millis(30)).await;
        stats.add_request(sent, &Ok::<(), ReadError>(()));
        let sent = Instant::now();
        tokio::time::sleep(Duration::from_secs(7)).await;
        stats.add_request::<()>(sent, &Err(ReadError::Timeout));
        stats.add_request::<()>(
            Instant::now(),
            &Err(ReadError::Disconnected(Arc::new(Disconnect::Closed))),
        );
        let now = stats.snapshot();
        assert_eq!((now.requests, now.failed_requests), (3, 2));
        // 30 ms: the 0.05 s bucket; 7 s: above every bound; 0 s: the first bucket.
        let expected: [u64; 11] = [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(now.latency, expected);
        assert_eq!(now.latency_sum_us, 7_030_000);
        assert_eq!(now.failures, [1, 0, 1, 0]);
    }
}

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

use super::command::CommandQueue;
use super::config::{
    BusConfig, BusKind, DeviceConfig, FieldConfig, HaComponent, LineMode, PointConfig, StateClass,
};
use super::decode::{ByteOrder, Codec};
use super::plan::{Limits, PointSpan, ReadPlan};
use super::reading::{Quality, Reading, Value};
use super::schedule::Band;
use super::write::{encode, Refusal, Requested, WriteOp, WriteSpec};

/// Counters of one bus, shared with whoever holds its [`ResolvedBus`].
#[derive(Debug, Default)]
pub struct BusStats {
    requests: AtomicU64,
    failed_requests: AtomicU64,
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
            readings: self.readings.load(Ordering::Relaxed),
            lines: self.lines.load(Ordering::Relaxed),
            garbage_lines: self.garbage_lines.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_request(&self, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed_requests.fetch_add(1, Ordering::Relaxed);
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
    /// Home Assistant discovery overrides.
    pub device_class: Option<String>,
    pub state_class: Option<StateClass>,
    pub ha_component: Option<HaComponent>,
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

    pub fn plan(&self) -> ReadPlan {
        ReadPlan::build(&self.spans(), self.limits)
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

fn resolve_point(d: &DeviceConfig, p: &PointConfig) -> ResolvedPoint {
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
        device_class: p.device_class.clone(),
        state_class: p.state_class,
        ha_component: p.ha_component,
    }
}

fn resolve_device(config: &FieldConfig, bus: &BusConfig, d: &DeviceConfig) -> ResolvedDevice {
    let profile_points = d
        .profile
        .as_ref()
        .and_then(|name| config.profiles.get(name))
        .map(|p| p.points.as_slice())
        .unwrap_or_default();
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
            .map(|p| resolve_point(d, p))
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

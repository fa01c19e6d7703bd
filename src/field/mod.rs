//! The input side: Modbus RTU/TCP buses and ASCII serial-line sensors, described by the
//! `[[bus]]` and `[profile.NAME]` sections of the configuration, polled on schedule and
//! turned into [`Reading`]s.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the TOML schema of buses, devices, profiles and points |
//! | `validate` | the rules of the field sections: `FieldConfig::validate` |
//! | [`decode`] | register words → values: types, byte orders, scale/offset |
//! | [`plan`] | read plans: coalescing points into the fewest requests, splitting on refusal |
//! | [`schedule`] | poll grids, device health and quarantine, deadband/heartbeat (no I/O) |
//! | `resolve` | the resolved model: buses, devices, points with profiles merged; counters |
//! | `task` | the skeleton of every bus task: device runs, next due, the `Poller` hand-off, sending |
//! | `link` | the Modbus connection: timeouts, exceptions vs faults, reconnect |
//! | `modbus` | the poll loop of a Modbus bus: plan blocks, retries, splits, decoding; writes before each request, read-back |
//! | [`write`](mod@write) | writable points: rules, limits, refusals, encoding a value into a write request |
//! | [`command`] | the bus command queue, commands and their reports |
//! | `lines` | line splitting, NMEA checksums, regex/key=value parsing, stream and poll loops |
//!
//! Data flows one way: `resolve` ← `task` ← (`modbus`, `lines`). The skeleton knows no
//! protocol and the resolved model knows no task.
//! | [`probe`] | `fieldbridge probe` |
//! | [`reading`] | readings, qualities, events, JSON payloads |
//!
//! # Invariants
//!
//! - One task per bus, and the task is the only user of its port or connection, so requests
//!   on a bus are strictly sequential (with the inter-frame silence on serial lines),
//!   writes included: a command waits at most for the request on the wire.
//! - Every failed read gives readings with a bad [`Quality`] and no value; nothing is
//!   ever published as good unless it was just read.
//! - Addresses are 0-based protocol addresses everywhere (config, errors, logs, probe).
//! - Nothing here is unbounded: events go through the agent's bounded channel (the bus
//!   waits when it is full), lines are capped at `max_line`, requests at 125 registers or
//!   2000 bits.

pub mod config;
pub mod decode;
pub mod plan;
pub mod probe;
pub mod reading;
pub mod schedule;

pub mod command;
mod lines;
mod link;
mod modbus;
mod resolve;
mod task;
mod validate;
pub mod write;

use std::fmt::Write as _;

use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use command::{BusCommand, CommandQueue, WriteFailure, WriteReport};
pub use config::{
    BusConfig, BusKind, DeviceConfig, FieldConfig, HaComponent, PointConfig, ProfileConfig,
    StateClass,
};
pub use decode::{ByteOrder, DataType, RegisterKind};
pub use link::{Disconnect, ReadError};
pub use probe::{probe, ProbeError, ProbeTarget, ProbeTransport};
pub use reading::{DeviceState, FieldEvent, Quality, Reading, Value};
pub use resolve::{PlannedWrite, ResolvedBus, StatsSnapshot};
pub(crate) use resolve::{ResolvedDevice, ResolvedPoint};
pub use write::{Refusal, Requested, WriteOp};

/// Errors of the field layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration has problems; see [`FieldConfig::validate`].
    #[error("invalid field configuration: {}", crate::problem::Invalid::summary(.0).unwrap_or_default())]
    Invalid(Vec<crate::problem::Invalid>),
    /// `fieldbridge probe` could not read what it was asked for.
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
}

/// Validates and resolves the configuration into buses that can be spawned (and spawned
/// again after a crash, keeping their counters).
///
/// # Errors
/// [`Error::Invalid`] with every problem [`FieldConfig::validate`] finds.
pub fn resolve(config: &FieldConfig) -> Result<Vec<ResolvedBus>, Error> {
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(Error::Invalid(problems));
    }
    Ok(resolve::resolve_buses(config))
}

/// Spawns the task of one bus. It runs until `shutdown` is cancelled or `tx` is closed.
/// Ports and connections are opened inside the task, and reopened there when they fail,
/// so this never fails; a panic in the task shows in the handle and the caller may call
/// this again with the same `bus`.
pub fn spawn_bus(
    bus: &ResolvedBus,
    tx: Sender<FieldEvent>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let bus = bus.clone();
    let span = tracing::info_span!("bus", name = %bus.name());
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            match bus.kind() {
                BusKind::Lines => lines::run_lines(&bus, &tx, &shutdown).await,
                BusKind::Rtu | BusKind::Tcp => {
                    let Some(endpoint) = link::Endpoint::of(&bus.config) else {
                        tracing::error!("bus has no endpoint; it was not validated");
                        return;
                    };
                    let mut link = link::ModbusLink::new(endpoint, bus.config.inter_frame());
                    modbus::run_modbus(&bus, &mut link, &tx, &shutdown).await;
                }
            }
        },
        span,
    ))
}

/// Spawns one task per bus; events go into `tx` (bounded). Tasks stop when `shutdown` is
/// cancelled.
///
/// # Errors
/// [`Error::Invalid`] if the configuration does not validate (nothing is spawned then).
pub fn spawn_buses(
    config: &FieldConfig,
    tx: Sender<FieldEvent>,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, Error> {
    Ok(resolve(config)?
        .iter()
        .map(|bus| spawn_bus(bus, tx.clone(), shutdown.clone()))
        .collect())
}

/// The command topics of every writable point with what a write does and its limits,
/// for `check-config`; empty when no point is writable.
pub fn describe_commands(config: &FieldConfig, topics: &crate::topics::Topics) -> String {
    let mut out = String::new();
    for bus in resolve::resolve_buses(config) {
        for d in bus.devices.iter() {
            for p in &d.points {
                let (Some(spec), Some(span)) = (&p.write, p.span) else {
                    continue;
                };
                let function = match (span.kind, p.codec.data_type) {
                    (RegisterKind::Coil, _) => "FC5".to_string(),
                    (_, DataType::Bit) if spec.mask_write => format!("FC22 bit {}", p.codec.bit),
                    (_, DataType::Bit) => {
                        format!("read-modify-write (FC3+FC6) bit {}", p.codec.bit)
                    }
                    _ if span.width > 1 || spec.multiple => "FC16".to_string(),
                    _ => "FC6".to_string(),
                };
                let _ = writeln!(
                    out,
                    "  {} -> {} {} {} ({}), {}, {}",
                    topics.command(&d.name, &p.name),
                    d.name,
                    span.kind.name(),
                    span.address,
                    p.codec.data_type.name(),
                    function,
                    spec.describe()
                );
            }
        }
    }
    out
}

/// The read plan of every device, for `check-config`: requests per poll, what each reads,
/// and the estimated bus time per poll at the configured baud (serial buses).
pub fn describe_plans(config: &FieldConfig) -> String {
    let mut out = String::new();
    for bus in resolve::resolve_buses(config) {
        let c = &bus.config;
        let _ = match c.kind {
            BusKind::Rtu => writeln!(
                out,
                "bus {:?}: rtu {} at {} baud, {} bits/char, inter-frame silence {:.2} ms",
                c.name,
                c.serial_path().unwrap_or("?"),
                c.baud(),
                c.bits_per_char(),
                c.inter_frame().as_secs_f64() * 1000.0
            ),
            BusKind::Tcp => writeln!(
                out,
                "bus {:?}: tcp {}:{} ({} framing)",
                c.name,
                c.host.as_deref().unwrap_or("?"),
                c.tcp_port().unwrap_or(0),
                if c.framing() == config::Framing::Rtu {
                    "rtu"
                } else {
                    "tcp"
                }
            ),
            BusKind::Lines => writeln!(
                out,
                "bus {:?}: lines {} at {} baud, {} mode",
                c.name,
                c.serial_path().unwrap_or("?"),
                c.baud(),
                if c.mode() == config::LineMode::Poll {
                    "poll"
                } else {
                    "stream"
                }
            ),
        };
        let mut bus_time = 0.0;
        for d in bus.devices.iter() {
            if c.kind == BusKind::Lines {
                let _ = writeln!(
                    out,
                    "  device {:?}: {} points, {}",
                    d.name,
                    d.points.len(),
                    match &d.request {
                        Some(r) => format!("request {r:?} every {} ms", d.interval.as_millis()),
                        None => format!("listening, timeout {} ms", d.timeout.as_millis()),
                    }
                );
                continue;
            }
            let plan = d.plan();
            let _ = write!(
                out,
                "  device {:?} (unit {}): {} points, {} request{} per poll every {} ms",
                d.name,
                d.unit_id,
                d.points.len(),
                plan.requests(),
                if plan.requests() == 1 { "" } else { "s" },
                d.interval.as_millis()
            );
            if c.kind == BusKind::Rtu {
                let t = plan.bus_time(c.baud(), c.bits_per_char(), c.inter_frame());
                bus_time += t.as_secs_f64() / d.interval.as_secs_f64();
                let _ = write!(out, ", ~{:.1} ms on the wire", t.as_secs_f64() * 1000.0);
            }
            out.push('\n');
            for line in plan.describe().lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
        if c.kind == BusKind::Rtu {
            let _ = writeln!(
                out,
                "  bus load ~{:.0}% of the line's time (without device response latency)",
                bus_time * 100.0
            );
        }
    }
    out
}

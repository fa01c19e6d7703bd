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
//! | [`plan`] | read plans: coalescing points (of a device or of one poll group) into the fewest requests, splitting on refusal |
//! | [`schedule`] | poll grids (one per poll group), device health and quarantine, deadband/heartbeat (no I/O) |
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
//! | [`probe`](mod@probe) | `fieldbridge probe` |
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
pub use reading::{retime_payload, DeviceState, FieldEvent, Quality, Reading, TimeMark, Value};
pub use resolve::{PlannedWrite, ResolvedBus, StatsSnapshot, FAILURE_QUALITIES, LATENCY_BUCKETS};
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

/// The read plan of every device, for `check-config`: per poll group, the requests per
/// poll and what each reads; per bus, the estimated load per second and, on serial
/// buses, the share of the line's time at the configured baud, with a warning when the
/// plan needs more than the line carries. Also warns when several buses reach one TCP
/// gateway (each bus polls on its own, so the gateway sees them in parallel).
pub fn describe_plans(config: &FieldConfig) -> String {
    let mut out = String::new();
    let buses = resolve::resolve_buses(config);
    for bus in &buses {
        describe_bus(&mut out, bus);
    }
    let mut endpoints: Vec<(String, &str)> = Vec::new();
    for bus in &buses {
        let c = &bus.config;
        if c.kind != BusKind::Tcp {
            continue;
        }
        let at = format!(
            "{}:{}",
            c.host.as_deref().unwrap_or("?"),
            c.tcp_port().unwrap_or(0)
        );
        if let Some((_, first)) = endpoints.iter().find(|(e, _)| *e == at) {
            let _ = writeln!(
                out,
                "warning: buses {first:?} and {:?} both reach {at}; they poll it at the same time. \
                 A gateway that takes one request at a time needs all its units on one bus.",
                c.name
            );
        } else {
            endpoints.push((at, &c.name));
        }
    }
    out
}

/// One bus of [`describe_plans`].
fn describe_bus(out: &mut String, bus: &ResolvedBus) {
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
    if c.kind == BusKind::Lines {
        for d in bus.devices.iter() {
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
        }
        return;
    }
    let serial = c.kind == BusKind::Rtu;
    let bus_delay = std::time::Duration::from_millis(c.request_delay_ms.unwrap_or(0));
    let (mut requests, mut bytes, mut busy) = (0.0, 0.0, 0.0);
    for d in bus.devices.iter() {
        let _ = writeln!(
            out,
            "  device {:?} (unit {}): {} point{}",
            d.name,
            d.unit_id,
            d.points.len(),
            if d.points.len() == 1 { "" } else { "s" },
        );
        for g in d.groups() {
            let plan = d.plan_of(&g);
            let per_second = 1.0 / g.interval.as_secs_f64();
            let n = plan.requests();
            let _ = write!(
                out,
                "    every {} ms{}: {} point{}, {n} request{} per poll",
                g.interval.as_millis(),
                match g.names.as_slice() {
                    [] => String::new(),
                    names => format!(" (poll_group {})", names.join(", ")),
                },
                g.points.len(),
                if g.points.len() == 1 { "" } else { "s" },
                if n == 1 { "" } else { "s" },
            );
            // Pauses the bus waits out: after every request, and between the requests
            // of one poll to a device that needs them.
            let pauses = n as f64 * bus_delay.as_secs_f64()
                + n.saturating_sub(1) as f64
                    * d.request_delay.saturating_sub(bus_delay).as_secs_f64();
            if serial {
                let t = plan
                    .bus_time(c.baud(), c.bits_per_char(), c.inter_frame())
                    .as_secs_f64();
                busy += (t + pauses) * per_second;
                let _ = write!(out, ", ~{:.1} ms on the wire", t * 1000.0);
            } else {
                busy += pauses * per_second;
            }
            out.push('\n');
            requests += n as f64 * per_second;
            bytes += plan.wire_bytes() as f64 * per_second;
            for line in plan.describe().lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
    }
    if serial {
        let _ = writeln!(
            out,
            "  bus load: {requests:.1} requests/s, {bytes:.0} bytes/s, ~{:.0}% of the line's \
             time at {} baud (pauses included, device response time not)",
            busy * 100.0,
            c.baud()
        );
        if busy > 1.0 {
            let _ = writeln!(
                out,
                "warning: bus {:?} is planned beyond what {} baud carries (~{:.0}% of the \
                 line's time): polls will run late and skip. Poll less often \
                 (poll_interval_ms, poll groups), read fewer registers, raise the baud rate, \
                 or split the devices over more lines.",
                c.name,
                c.baud(),
                busy * 100.0
            );
        }
    } else {
        let _ = writeln!(
            out,
            "  bus load: {requests:.1} requests/s, {bytes:.0} bytes/s of Modbus frames"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's example: 10 meters × 125 registers every second on 9600 baud.
    #[test]
    fn check_config_warns_when_a_serial_bus_is_planned_beyond_its_baud_rate() {
        let mut text =
            "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"/dev/ttyUSB0\"\n".to_string();
        for unit in 1..=10 {
            text += &format!(
                "[[bus.device]]\nname = \"m{unit}\"\nunit_id = {unit}\n\
                 [[bus.device.point]]\nname = \"block\"\nkind = \"holding\"\naddress = 0\n\
                 type = \"string\"\nregisters = 125\n"
            );
        }
        let config: FieldConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.validate(), vec![]);
        let out = describe_plans(&config);
        // Per request: 8 + 5 + 250 = 263 bytes × 11 bits / 9600 baud = 301.4 ms, plus
        // 2 × 4.01 ms of silence: 309.4 ms; ten of them each second.
        assert!(
            out.contains("every 1000 ms: 1 point, 1 request per poll, ~309.4 ms on the wire"),
            "{out}"
        );
        assert!(
            out.contains(
                "bus load: 10.0 requests/s, 2630 bytes/s, ~309% of the line's time at 9600 baud"
            ),
            "{out}"
        );
        assert!(
            out.contains("warning: bus \"rs485\" is planned beyond what 9600 baud carries"),
            "{out}"
        );

        // At 115200 baud the same plan fits, and there is no warning.
        let fast: FieldConfig =
            toml::from_str(&text.replace("kind = \"rtu\"\n", "kind = \"rtu\"\nbaud = 115200\n"))
                .unwrap();
        let out = describe_plans(&fast);
        assert!(out.contains("bus load: 10.0 requests/s"), "{out}");
        assert!(!out.contains("warning"), "{out}");
    }

    #[test]
    fn check_config_prints_the_plan_per_group_and_warns_of_a_shared_gateway() {
        let config: FieldConfig = toml::from_str(
            r#"
            [[bus]]
            name = "gw1"
            kind = "tcp"
            host = "10.0.0.5"
            [[bus.device]]
            name = "meter"
            poll_groups = { energy = 60000 }
            [[bus.device.point]]
            name = "power"
            kind = "input"
            address = 0
            type = "f32"
            [[bus.device.point]]
            name = "energy"
            kind = "input"
            address = 100
            type = "f32"
            poll_group = "energy"
            [[bus]]
            name = "gw2"
            kind = "tcp"
            host = "10.0.0.5"
            [[bus.device]]
            name = "other"
            unit_id = 2
            [[bus.device.point]]
            name = "x"
            kind = "holding"
            address = 0
            "#,
        )
        .unwrap();
        assert_eq!(config.validate(), vec![]);
        let out = describe_plans(&config);
        assert!(
            out.contains("    every 1000 ms: 1 point, 1 request per poll\n      fc04 input 0..=1"),
            "{out}"
        );
        assert!(
            out.contains("    every 60000 ms (poll_group energy): 1 point, 1 request per poll\n      fc04 input 100..=101"),
            "{out}"
        );
        assert!(
            out.contains("warning: buses \"gw1\" and \"gw2\" both reach 10.0.0.5:502"),
            "{out}"
        );
    }
}

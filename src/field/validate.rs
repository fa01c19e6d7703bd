//! The rules of the `[[bus]]` and `[profile.NAME]` sections: [`FieldConfig::validate`].
//!
//! Invariants:
//! - Every problem names the key it is about with its full path (`bus[0].device[2].unit_id`,
//!   `profile.sdm630.point[3].address`); a point that comes from a profile is reported at
//!   the profile, where it can be fixed.
//! - No problems means [`super::resolve`] succeeds and every device's read plan fits the
//!   protocol's limits (125 registers / 2000 bits per request, addresses 0..=65535).
//! - Keys that do not apply to a bus's kind are problems, not silently ignored.
//! - Points may share registers: a status word read whole and bit by bit, or a `u32`
//!   and its low word, are served by the same request. (Writes, when they come, are
//!   where overlaps need care.)

use std::collections::{HashMap, HashSet};

use super::config::{
    default_max_gap, default_unit_id, BusConfig, BusKind, DeviceConfig, FieldConfig, Framing,
    LineMode, PointConfig, PortSetting, MAX_BITS, MAX_REGISTERS,
};
use super::decode::{DataType, RegisterKind};
use crate::problem::{Invalid, Problems, Scope};

impl FieldConfig {
    /// Every semantic problem, with dotted key paths (`bus[0].device[2].unit_id`,
    /// `profile.sdm630.point[3].address`). Empty means the configuration can run.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        for (name, profile) in &self.profiles {
            let mut at = problems.at(format!("profile.{name}"));
            topic_level(&mut at, "", name);
            at.check(
                !profile.points.is_empty(),
                "point",
                "a profile needs at least one point",
            );
            poll_group_intervals(&mut at, &profile.poll_groups);
        }
        let mut bus_names = HashSet::new();
        let mut device_names: HashMap<&str, String> = HashMap::new();
        for (b, bus) in self.buses.iter().enumerate() {
            let mut at = problems.at(format!("bus[{b}]"));
            if at.non_empty("name", &bus.name) {
                let first_use = bus_names.insert(bus.name.as_str());
                at.check(
                    first_use,
                    "name",
                    format!("bus name {:?} is used twice", bus.name),
                );
            }
            validate_bus(&mut at, bus);
            at.check(
                !bus.devices.is_empty(),
                "device",
                "a bus needs at least one device",
            );
            for (d, device) in bus.devices.iter().enumerate() {
                let mut at = at.at(&format!("device[{d}]"));
                topic_level(&mut at, "name", &device.name);
                if let Some(first) = device_names.insert(device.name.as_str(), at.key("")) {
                    at.report(
                        "name",
                        format!(
                            "device name {:?} is already used by {first}; topics need unique device names",
                            device.name
                        ),
                    );
                }
                self.validate_device(&mut at, bus, device);
            }
        }
        problems.into_vec()
    }

    /// The rules of one device (`at` is `bus[B].device[D]`) and of its points.
    fn validate_device(&self, at: &mut Scope<'_>, bus: &BusConfig, device: &DeviceConfig) {
        at.at_least("poll_interval_ms", device.poll_interval_ms, 1);
        if let Some(ms) = device.timeout_ms {
            at.at_least("timeout_ms", ms, 1);
        }
        at.check(device.retries <= 10, "retries", "at most 10");
        at.at_least("quarantine_after", device.quarantine_after, 1);
        at.at_least("backoff_max_ms", device.backoff_max_ms, 1);
        if bus.kind == BusKind::Lines {
            validate_lines_device(at, bus, device);
        } else {
            validate_modbus_device(at, bus, device);
        }

        let points = self.points_of(at, device);
        let mut names: HashMap<&str, &str> = HashMap::new();
        for (pkey, point) in &points {
            let mut p = at.absolute(pkey.as_str());
            topic_level(&mut p, "name", &point.name);
            if let Some(first) = names.insert(point.name.as_str(), pkey.as_str()) {
                p.report(
                    "name",
                    format!(
                        "point name {:?} is already used by {first} in device {:?}",
                        point.name, device.name
                    ),
                );
            }
            validate_point(&mut p, bus.kind, device, point);
            self.validate_poll_group(&mut p, bus.kind, device, point);
        }
        let regex = device
            .regex
            .as_deref()
            .filter(|_| bus.kind == BusKind::Lines)
            .and_then(|r| regex_lite::Regex::new(r).ok());
        if let Some(re) = regex {
            let captures: HashSet<&str> = re.capture_names().flatten().collect();
            for (pkey, p) in &points {
                at.absolute(pkey.as_str()).check(
                    captures.contains(p.field()),
                    "field",
                    format!("the regex has no capture named {:?}", p.field()),
                );
            }
        }
    }

    /// A point's `poll_interval_ms` / `poll_group` (`at` is the point's path).
    fn validate_poll_group(
        &self,
        at: &mut Scope<'_>,
        bus: BusKind,
        device: &DeviceConfig,
        p: &PointConfig,
    ) {
        if bus == BusKind::Lines {
            let modbus = "Modbus points (a line sensor has one interval)";
            at.only_for("poll_interval_ms", p.poll_interval_ms.is_some(), modbus);
            at.only_for("poll_group", p.poll_group.is_some(), modbus);
            return;
        }
        if let Some(ms) = p.poll_interval_ms {
            at.at_least("poll_interval_ms", ms, 1);
            at.check(
                p.poll_group.is_none(),
                "poll_group",
                "set `poll_interval_ms` or `poll_group`, not both",
            );
            return;
        }
        let Some(group) = &p.poll_group else {
            return;
        };
        let profile = device.profile.as_ref().and_then(|n| self.profiles.get(n));
        if device.interval_of(profile, p).is_none() {
            let mut defined: Vec<&str> = device
                .poll_groups
                .keys()
                .chain(profile.iter().flat_map(|pr| pr.poll_groups.keys()))
                .map(String::as_str)
                .collect();
            defined.sort_unstable();
            defined.dedup();
            let defined = if defined.is_empty() {
                "none".to_string()
            } else {
                defined.join(", ")
            };
            at.report(
                "poll_group",
                format!(
                    "no poll group {group:?} in device {:?} or its profile; defined: {defined}",
                    device.name
                ),
            );
        }
    }

    /// The device's points, profile first, then its own, each with the key path it came
    /// from (a profile's point is reported at the profile, where it can be fixed).
    fn points_of<'c>(
        &'c self,
        at: &mut Scope<'_>,
        device: &'c DeviceConfig,
    ) -> Vec<(String, &'c PointConfig)> {
        let mut points: Vec<(String, &PointConfig)> = Vec::new();
        let mut unknown_profile = false;
        if let Some(profile) = &device.profile {
            match self.profiles.get(profile) {
                Some(p) => points.extend(
                    p.points
                        .iter()
                        .enumerate()
                        .map(|(i, pt)| (format!("profile.{profile}.point[{i}]"), pt)),
                ),
                None => {
                    unknown_profile = true;
                    let defined = if self.profiles.is_empty() {
                        "none".to_string()
                    } else {
                        self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    };
                    at.report(
                        "profile",
                        format!("no profile named {profile:?}; defined: {defined}"),
                    );
                }
            }
        }
        points.extend(
            device
                .points
                .iter()
                .enumerate()
                .map(|(i, pt)| (at.key(&format!("point[{i}]")), pt)),
        );
        // With an unknown profile the device's points are unknown too: say it once.
        at.check(
            !points.is_empty() || unknown_profile,
            "point",
            "a device needs at least one point (its own or from a profile)",
        );
        points
    }
}

/// A name usable as one MQTT topic level and in logs.
fn topic_level(at: &mut Scope<'_>, key: &str, name: &str) {
    if at.non_empty(key, name) {
        at.check(
            !name.contains(['/', '+', '#', '\0']) && name.trim() == name,
            key,
            format!(
                "{name:?} cannot be a topic level: no '/', '+', '#', NUL or surrounding spaces"
            ),
        );
    }
}

fn topic_name(at: &mut Scope<'_>, key: &str, topic: &str) {
    at.check(
        !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.len() <= 65_535,
        key,
        format!("{topic:?} is not a topic name: non-empty, no wildcards ('+', '#')"),
    );
}

/// The rules of one `[[bus]]` table (`at` is `bus[B]`); keys of other kinds are refused.
fn validate_bus(at: &mut Scope<'_>, bus: &BusConfig) {
    if matches!(bus.kind, BusKind::Rtu | BusKind::Lines) {
        validate_serial_line(at, bus);
    } else {
        validate_tcp_endpoint(at, bus);
    }
    if let Some(ms) = bus.inter_frame_ms {
        at.in_range("inter_frame_ms", ms, 0.0..=1000.0);
    }
    if bus.kind != BusKind::Lines {
        if let Some(ms) = bus.request_delay_ms {
            at.in_range("request_delay_ms", ms, 0..=60_000);
        }
        at.only_for("mode", bus.mode.is_some(), "lines buses");
        at.only_for("max_line", bus.max_line.is_some(), "lines buses");
        at.only_for("checksum", bus.checksum.is_some(), "lines buses");
    } else {
        at.only_for(
            "inter_frame_ms",
            bus.inter_frame_ms.is_some(),
            "Modbus buses",
        );
        at.only_for(
            "request_delay_ms",
            bus.request_delay_ms.is_some(),
            "Modbus buses",
        );
        at.in_range("max_line", bus.max_line(), 8..=65_536);
        at.check(
            bus.mode() != LineMode::Stream || bus.devices.len() <= 1,
            "device",
            "a stream-mode lines bus carries one device (its port talks on its own); use mode = \"poll\" for several",
        );
    }
}

/// An rtu or lines bus: its serial port and line settings, and no tcp keys.
fn validate_serial_line(at: &mut Scope<'_>, bus: &BusConfig) {
    at.check(
        matches!(&bus.port, Some(PortSetting::Path(p)) if !p.is_empty()),
        "port",
        "a serial bus needs `port`, the device path, e.g. \"/dev/ttyUSB0\"",
    );
    at.at_least("baud", bus.baud(), 1);
    at.check(
        matches!(bus.data_bits(), 7 | 8),
        "data_bits",
        "must be 7 or 8",
    );
    at.check(
        matches!(bus.stop_bits(), 1 | 2),
        "stop_bits",
        "must be 1 or 2",
    );
    at.only_for("host", bus.host.is_some(), "tcp buses");
    at.only_for("framing", bus.framing.is_some(), "tcp buses");
    at.only_for(
        "connect_timeout_ms",
        bus.connect_timeout_ms.is_some(),
        "tcp buses",
    );
}

/// A tcp bus: host and port, and no serial-line keys.
fn validate_tcp_endpoint(at: &mut Scope<'_>, bus: &BusConfig) {
    let host = bus.host.as_deref().unwrap_or_default();
    if at.check(!host.is_empty(), "host", "a tcp bus needs `host`") {
        if let Some((name, port)) = host_with_port(host) {
            at.report(
                "host",
                format!(
                    "{host:?} includes a port; write host = {name:?} and port = {port}{}",
                    if bus.port.is_some() {
                        " (port is already set)"
                    } else {
                        ""
                    }
                ),
            );
        }
    }
    at.check(
        bus.tcp_port().is_some(),
        "port",
        "a tcp bus's port is a number 1..=65535",
    );
    at.only_for("baud", bus.baud.is_some(), "rtu and lines buses");
    at.only_for("parity", bus.parity.is_some(), "rtu and lines buses");
    at.only_for("data_bits", bus.data_bits.is_some(), "rtu and lines buses");
    at.only_for("stop_bits", bus.stop_bits.is_some(), "rtu and lines buses");
    at.only_for(
        "inter_frame_ms",
        bus.inter_frame_ms.is_some() && bus.framing() != Framing::Rtu,
        "rtu buses and tcp buses with framing = \"rtu\"",
    );
}

/// `host` split as host and port when it carries one (`10.0.0.5:502`, `[fe80::1]:502`,
/// `plc.local:502`); a bare IPv6 address is a host without a port.
fn host_with_port(host: &str) -> Option<(&str, u16)> {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return None;
    }
    let (name, port) = host.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let name = name
        .strip_prefix('[')
        .and_then(|name| name.strip_suffix(']'))
        .unwrap_or(name);
    Some((name, port))
}

/// The Modbus-only rules of a device on an rtu or tcp bus.
/// `poll_groups` of a device or a profile (`at` is the owner): intervals of at least 1 ms.
fn poll_group_intervals(at: &mut Scope<'_>, groups: &std::collections::BTreeMap<String, u64>) {
    for (name, &ms) in groups {
        at.at_least(&format!("poll_groups.{name}"), ms, 1);
    }
}

fn validate_modbus_device(at: &mut Scope<'_>, bus: &BusConfig, device: &DeviceConfig) {
    poll_group_intervals(at, &device.poll_groups);
    at.in_range("request_delay_ms", device.request_delay_ms, 0..=60_000);
    at.check(
        bus.kind != BusKind::Rtu || (1..=247).contains(&device.unit_id),
        "unit_id",
        format!(
            "{} is not a unit id on a serial bus: 1..=247 (0 is broadcast, which has no answers)",
            device.unit_id
        ),
    );
    at.in_range(
        "max_registers_per_request",
        device.max_registers_per_request,
        1..=MAX_REGISTERS,
    );
    at.in_range(
        "max_bits_per_request",
        device.max_bits_per_request,
        1..=MAX_BITS,
    );
    at.only_for("request", device.request.is_some(), "lines buses");
    at.only_for("regex", device.regex.is_some(), "lines buses");
}

/// The rules of a device on a lines bus; Modbus keys left at their defaults only.
fn validate_lines_device(at: &mut Scope<'_>, bus: &BusConfig, device: &DeviceConfig) {
    match (bus.mode(), &device.request) {
        (LineMode::Poll, None) => at.report(
            "request",
            "a poll-mode lines device needs `request`, the text to send",
        ),
        (LineMode::Poll, Some(r)) => {
            at.check(
                (1..=1024).contains(&r.len()),
                "request",
                "must be 1..=1024 bytes",
            );
        }
        (LineMode::Stream, Some(_)) => {
            at.only_for("request", true, "poll-mode lines buses");
        }
        (LineMode::Stream, None) => {}
    }
    if let Some(re) = &device.regex {
        match regex_lite::Regex::new(re) {
            Err(e) => at.report("regex", format!("not a valid regex: {e}")),
            Ok(re) => {
                at.check(
                    re.capture_names().flatten().next().is_some(),
                    "regex",
                    "needs named captures, e.g. (?P<temp>[-0-9.]+)",
                );
            }
        }
    }
    let modbus = "Modbus buses";
    at.only_for("unit_id", device.unit_id != default_unit_id(), modbus);
    at.only_for("poll_groups", !device.poll_groups.is_empty(), modbus);
    at.only_for("request_delay_ms", device.request_delay_ms != 0, modbus);
    at.only_for("max_gap", device.max_gap != default_max_gap(), modbus);
    at.only_for(
        "max_registers_per_request",
        device.max_registers_per_request != MAX_REGISTERS,
        modbus,
    );
    at.only_for(
        "max_bits_per_request",
        device.max_bits_per_request != MAX_BITS,
        modbus,
    );
}

/// The rules of one point (`at` is the point's own path, in a device or a profile).
fn validate_point(at: &mut Scope<'_>, bus: BusKind, device: &DeviceConfig, p: &PointConfig) {
    let t = p.data_type_or_default();
    if bus == BusKind::Lines {
        validate_lines_point(at, p, t);
    } else if !validate_modbus_point(at, device, p, t) {
        // Without `kind` or `address` the point's other rules would only repeat that.
        return;
    }
    at.check(
        t.is_numeric() || (p.scale == 1.0 && p.offset == 0.0),
        "scale",
        format!("scale and offset do not apply to type \"{}\"", t.name()),
    );
    at.check(
        p.scale.is_finite() && p.offset.is_finite(),
        "scale",
        "scale and offset must be finite numbers",
    );
    at.check(
        p.deadband.is_none() || p.deadband_percent.is_none(),
        "deadband_percent",
        "set `deadband` or `deadband_percent`, not both",
    );
    for (key, v) in [
        ("deadband", p.deadband),
        ("deadband_percent", p.deadband_percent),
    ] {
        if let Some(v) = v {
            let numeric = at.check(
                t.is_numeric(),
                key,
                format!(
                    "a deadband applies only to numeric types, not to \"{}\"",
                    t.name()
                ),
            );
            if numeric {
                at.check(v.is_finite() && v >= 0.0, key, "must be a number ≥ 0");
            }
        }
    }
    if let Some(topic) = &p.topic {
        topic_name(at, "topic", topic);
    }
    super::write::validate_point(at, bus, p);
}

fn validate_lines_point(at: &mut Scope<'_>, p: &PointConfig, t: DataType) {
    let modbus = "Modbus points";
    at.only_for("kind", p.kind.is_some(), modbus);
    at.only_for("address", p.address.is_some(), modbus);
    at.only_for("order", p.order.is_some(), modbus);
    at.only_for("bit", p.bit.is_some(), modbus);
    at.only_for("registers", p.registers.is_some(), modbus);
    at.check(
        t != DataType::Bit,
        "type",
        "\"bit\" applies only to Modbus registers",
    );
}

/// The rules of a point on a Modbus bus; false when it has no `kind` or `address`.
fn validate_modbus_point(
    at: &mut Scope<'_>,
    device: &DeviceConfig,
    p: &PointConfig,
    t: DataType,
) -> bool {
    at.only_for("field", p.field.is_some(), "lines buses");
    let Some(kind) = p.kind else {
        at.report(
            "kind",
            "a Modbus point needs `kind`: \"coil\", \"discrete\", \"input\" or \"holding\"",
        );
        return false;
    };
    let Some(address) = p.address else {
        at.report(
            "address",
            "a Modbus point needs `address` (0-based protocol address)",
        );
        return false;
    };
    at.check(
        !kind.is_bit() || t == DataType::Bool,
        "type",
        format!("a {} is one bit: type must be \"bool\"", kind.name()),
    );
    match (t, p.bit) {
        (DataType::Bit, None) => at.report("bit", "type \"bit\" needs `bit` (0..=15)"),
        (DataType::Bit, Some(b)) => {
            at.check(b <= 15, "bit", "must be 0..=15 (0 = least significant)");
        }
        (_, Some(_)) => {
            at.only_for("bit", true, "type \"bit\"");
        }
        (_, None) => {}
    }
    match (t, p.registers) {
        (DataType::String, None) => at.report(
            "registers",
            "type \"string\" needs `registers`, its length in registers",
        ),
        (DataType::String, Some(n)) => {
            at.in_range("registers", n, 1..=MAX_REGISTERS);
        }
        (_, Some(_)) => {
            at.only_for("registers", true, "type \"string\"");
        }
        (_, None) => {}
    }
    validate_extent(at, device, p, kind, address);
    true
}

/// Where a placed Modbus point sits: inside the address space, and inside one request
/// of its device.
fn validate_extent(
    at: &mut Scope<'_>,
    device: &DeviceConfig,
    p: &PointConfig,
    kind: RegisterKind,
    address: u32,
) {
    let t = p.data_type_or_default();
    let width = u32::from(p.width());
    if address > 65_535 {
        at.report(
            "address",
            format!("{address} is out of range: addresses are 0-based protocol addresses 0..=65535 (write 40001 as 0)"),
        );
    } else if address + width > 65_536 {
        at.report(
            "address",
            format!(
                "a {} at {address} needs {width} registers and runs past 65535",
                t.name()
            ),
        );
    }
    let limit = if kind.is_bit() {
        device.max_bits_per_request
    } else {
        device.max_registers_per_request
    };
    at.check(
        width <= u32::from(limit),
        "registers",
        format!("{width} registers do not fit in one request of this device (max_registers_per_request = {limit})"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::config::tests::{parse, GOOD};

    fn keys(c: &FieldConfig) -> Vec<String> {
        c.validate().into_iter().map(|i| i.key).collect()
    }

    #[test]
    fn out_of_range_addresses_are_found() {
        let c = parse(
            r#"
            [[bus]]
            name = "b"
            kind = "tcp"
            host = "h"
            [[bus.device]]
            name = "d"
            [[bus.device.point]]
            name = "c"
            kind = "input"
            address = 65535
            type = "u32"
            [[bus.device.point]]
            name = "d"
            kind = "input"
            address = 70000
            [[bus.device.point]]
            name = "e"
            kind = "coil"
            address = 1
            type = "u16"
            "#,
        );
        let problems = c.validate();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "bus[0].device[0].point[0].address",
                "bus[0].device[0].point[1].address",
                "bus[0].device[0].point[2].type",
            ],
            "{problems:#?}"
        );
        assert!(
            problems[1].message.contains("0-based"),
            "{}",
            problems[1].message
        );
    }

    /// Regression: a `u16` and a `bit` (or several bits and the whole word) on one
    /// register were refused as overlapping; reading a status word whole and bit by bit
    /// is standard, and one request serves them all.
    #[test]
    fn overlapping_reads_of_a_status_word_are_allowed() {
        let c = parse(
            r#"
            [[bus]]
            name = "b"
            kind = "tcp"
            host = "h"
            [[bus.device]]
            name = "d"
            [[bus.device.point]]
            name = "status_word"
            kind = "holding"
            address = 20
            [[bus.device.point]]
            name = "running"
            kind = "holding"
            address = 20
            type = "bit"
            bit = 0
            [[bus.device.point]]
            name = "running_again"
            kind = "holding"
            address = 20
            type = "bit"
            bit = 0
            [[bus.device.point]]
            name = "energy"
            kind = "holding"
            address = 19
            type = "u32"
            "#,
        );
        assert_eq!(c.validate(), vec![]);
        let plans = crate::field::describe_plans(&c);
        assert!(plans.contains("4 points, 1 request per poll"), "{plans}");
        assert!(
            plans.contains("fc03 holding 19..=20 (2 registers, 4 points)"),
            "{plans}"
        );
    }

    /// Regression: `host = "10.0.0.5:502"` with `port` passed and failed at runtime
    /// connecting to `10.0.0.5:502:502`.
    #[test]
    fn a_host_with_a_port_is_refused_with_the_fix() {
        let mut c = parse(GOOD);
        c.buses[1].host = Some("10.0.0.5:502".into());
        let found = c.validate();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "bus[1].host");
        assert!(
            found[0]
                .message
                .contains("write host = \"10.0.0.5\" and port = 502 (port is already set)"),
            "{}",
            found[0].message
        );
        c.buses[1].port = None;
        c.buses[1].host = Some("[fe80::1]:1502".into());
        let found = c.validate();
        assert!(
            found[0]
                .message
                .contains("host = \"fe80::1\" and port = 1502"),
            "{found:?}"
        );
        for fine in ["fe80::1", "plc.local", "10.0.0.5"] {
            c.buses[1].host = Some(fine.into());
            assert_eq!(c.validate(), vec![], "{fine}");
        }
    }

    /// Regression: `deadband` on a string point was accepted and silently meaningless.
    #[test]
    fn a_deadband_on_a_string_or_bool_is_refused() {
        let mut c = parse(GOOD);
        c.buses[1].devices[0].points[0].deadband = Some(1.0);
        c.buses[1].devices[0].points[1].deadband_percent = Some(5.0);
        let found: Vec<String> = c
            .validate()
            .into_iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect();
        assert_eq!(
            found,
            [
                "bus[1].device[0].point[0].deadband: a deadband applies only to numeric types, not to \"string\"",
                "bus[1].device[0].point[1].deadband_percent: a deadband applies only to numeric types, not to \"bit\"",
            ]
        );
    }

    #[test]
    fn zero_register_string_at_address_0_is_reported_not_a_panic() {
        let c = parse(
            r#"
            [[bus]]
            name = "b"
            kind = "tcp"
            host = "h"
            [[bus.device]]
            name = "d"
            [[bus.device.point]]
            name = "s"
            kind = "holding"
            address = 0
            type = "string"
            registers = 0
            [[bus.device.point]]
            name = "t"
            kind = "holding"
            address = 1
            "#,
        );
        assert_eq!(keys(&c), vec!["bus[0].device[0].point[0].registers"]);
    }

    #[test]
    fn huge_address_of_a_wide_point_is_reported_not_a_panic() {
        let c = parse(
            r#"
            [[bus]]
            name = "b"
            kind = "tcp"
            host = "h"
            [[bus.device]]
            name = "d"
            [[bus.device.point]]
            name = "a"
            kind = "holding"
            address = 4294967295
            type = "f64"
            [[bus.device.point]]
            name = "b"
            kind = "holding"
            address = 4294967294
            type = "u32"
            "#,
        );
        assert_eq!(
            keys(&c),
            vec![
                "bus[0].device[0].point[0].address",
                "bus[0].device[0].point[1].address"
            ]
        );
    }

    #[test]
    fn poll_groups_must_be_defined_single_and_on_modbus_points() {
        let mut c = parse(GOOD);
        c.profiles.get_mut("sdm630").unwrap().poll_groups = [("energy".to_string(), 60_000)].into();
        c.profiles.get_mut("sdm630").unwrap().points[1].poll_group = Some("energy".into());
        c.buses[0].devices[1].points[0].poll_interval_ms = Some(200);
        c.buses[0].devices[1].request_delay_ms = 20;
        c.buses[1].request_delay_ms = Some(50);
        assert_eq!(c.validate(), vec![]);

        let mut bad = c.clone();
        bad.buses[0].devices[1].points[0].poll_group = Some("energy".into());
        bad.buses[1].devices[0].points[0].poll_group = Some("fast".into());
        bad.buses[1].devices[0].poll_groups = [("slow".to_string(), 0)].into();
        bad.buses[2].devices[0].points[0].poll_interval_ms = Some(100);
        bad.buses[2].request_delay_ms = Some(10);
        bad.buses[0].devices[0].request_delay_ms = 60_001;
        assert_eq!(
            keys(&bad),
            vec![
                "bus[0].device[0].request_delay_ms",
                "bus[0].device[1].point[0].poll_group",
                "bus[1].device[0].poll_groups.slow",
                "bus[1].device[0].point[0].poll_group",
                "bus[2].request_delay_ms",
                "bus[2].device[0].point[0].poll_interval_ms",
            ]
        );
        let unknown = bad
            .validate()
            .into_iter()
            .find(|p| p.key == "bus[1].device[0].point[0].poll_group")
            .unwrap();
        assert!(
            unknown.message.contains("no poll group \"fast\"")
                && unknown.message.contains("defined: slow"),
            "{}",
            unknown.message
        );
    }

    #[test]
    fn unknown_profiles_and_duplicate_names_are_found() {
        let mut c = parse(GOOD);
        c.buses[0].devices[1].profile = Some("sdm360".into());
        c.buses[1].devices[0].name = "meter1".into();
        c.buses[0].devices[1].points[0].name = "voltage_l1".into();
        c.buses[0].devices[0]
            .points
            .push(c.profiles["sdm630"].points[0].clone());
        let problems = c.validate();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "bus[0].device[0].point[0].name",
                "bus[0].device[1].profile",
                "bus[1].device[0].name",
            ],
            "{problems:#?}"
        );
        assert!(problems[1].message.contains("sdm630"));
    }

    #[test]
    fn profile_point_problems_point_at_the_profile() {
        let mut c = parse(GOOD);
        c.profiles.get_mut("sdm630").unwrap().points[0].address = Some(65_535);
        assert_eq!(
            keys(&c),
            vec![
                "profile.sdm630.point[0].address",
                "profile.sdm630.point[0].address"
            ]
        );
    }

    #[test]
    fn keys_of_other_bus_kinds_are_rejected() {
        let mut c = parse(GOOD);
        c.buses[0].host = Some("x".into());
        c.buses[1].baud = Some(9600);
        c.buses[2].devices[0].unit_id = 3;
        c.buses[0].devices[0].unit_id = 0;
        assert_eq!(
            keys(&c),
            vec![
                "bus[0].host",
                "bus[0].device[0].unit_id",
                "bus[1].baud",
                "bus[2].device[0].unit_id",
            ]
        );
    }

    #[test]
    fn lines_devices_are_checked() {
        let mut c = parse(GOOD);
        c.buses[2].devices[0].points[0].field = Some("humidity".into());
        c.buses[2].mode = Some(LineMode::Poll);
        assert_eq!(
            keys(&c),
            vec![
                "bus[2].device[0].request",
                "bus[2].device[0].point[0].field"
            ]
        );
        c.buses[2].devices[0].regex = Some("(unclosed".into());
        c.buses[2].devices[0].request = Some("R\r\n".into());
        assert_eq!(keys(&c), vec!["bus[2].device[0].regex"]);
    }

    /// The messages the collector's helpers now build read exactly as the ones the
    /// validators wrote out by hand before (`check-config` output and docs quote them).
    #[test]
    fn messages_made_by_the_rule_helpers_are_the_documented_ones() {
        let mut c = parse(GOOD);
        c.buses[0].inter_frame_ms = Some(2000.0);
        c.buses[0].devices[0].poll_interval_ms = 0;
        c.buses[0].devices[0].max_bits_per_request = 0;
        c.buses[1].baud = Some(9600);
        c.buses[2].max_line = Some(4);
        let found: Vec<String> = c
            .validate()
            .into_iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect();
        assert_eq!(
            found,
            [
                "bus[0].inter_frame_ms: must be 0..=1000",
                "bus[0].device[0].poll_interval_ms: must be at least 1",
                "bus[0].device[0].max_bits_per_request: must be 1..=2000",
                "bus[1].baud: applies only to rtu and lines buses",
                "bus[2].max_line: must be 8..=65536",
            ]
        );
    }
}

//! The rules of the `[[bus]]` and `[profile.NAME]` sections: [`FieldConfig::validate`].
//!
//! Invariants:
//! - Every problem names the key it is about with its full path (`bus[0].device[2].unit_id`,
//!   `profile.sdm630.point[3].address`); a point that comes from a profile is reported at
//!   the profile, where it can be fixed.
//! - No problems means [`super::resolve`] succeeds and every device's read plan fits the
//!   protocol's limits (125 registers / 2000 bits per request, addresses 0..=65535).
//! - Keys that do not apply to a bus's kind are problems, not silently ignored.

use std::collections::{HashMap, HashSet};

use super::config::{
    default_max_gap, default_unit_id, BusConfig, BusKind, DeviceConfig, FieldConfig, Framing,
    LineMode, PointConfig, PortSetting, MAX_BITS, MAX_REGISTERS,
};
use super::decode::{DataType, RegisterKind};
use crate::problem::Invalid;

/// A name usable as one MQTT topic level and in logs.
fn check_name(problems: &mut Vec<Invalid>, key: String, name: &str) {
    if name.is_empty() {
        problems.push(Invalid::new(key, "must not be empty"));
    } else if name.contains(['/', '+', '#', '\0']) || name.trim() != name {
        problems.push(Invalid::new(
            key,
            format!(
                "{name:?} cannot be a topic level: no '/', '+', '#', NUL or surrounding spaces"
            ),
        ));
    }
}

fn check_topic(problems: &mut Vec<Invalid>, key: String, topic: &str) {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) || topic.len() > 65_535 {
        problems.push(Invalid::new(
            key,
            format!("{topic:?} is not a topic name: non-empty, no wildcards ('+', '#')"),
        ));
    }
}

impl FieldConfig {
    /// Every semantic problem, with dotted key paths (`bus[0].device[2].unit_id`,
    /// `profile.sdm630.point[3].address`). Empty means the configuration can run.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Vec::new();
        for (name, profile) in &self.profiles {
            let key = format!("profile.{name}");
            check_name(&mut problems, key.clone(), name);
            if profile.points.is_empty() {
                problems.push(Invalid::new(
                    format!("{key}.point"),
                    "a profile needs at least one point",
                ));
            }
        }
        let mut bus_names = HashSet::new();
        let mut device_names: HashMap<&str, String> = HashMap::new();
        for (b, bus) in self.buses.iter().enumerate() {
            let bkey = format!("bus[{b}]");
            if bus.name.is_empty() {
                problems.push(Invalid::new(format!("{bkey}.name"), "must not be empty"));
            } else if !bus_names.insert(bus.name.as_str()) {
                problems.push(Invalid::new(
                    format!("{bkey}.name"),
                    format!("bus name {:?} is used twice", bus.name),
                ));
            }
            validate_bus(&mut problems, &bkey, bus);
            if bus.devices.is_empty() {
                problems.push(Invalid::new(
                    format!("{bkey}.device"),
                    "a bus needs at least one device",
                ));
            }
            for (d, device) in bus.devices.iter().enumerate() {
                let dkey = format!("{bkey}.device[{d}]");
                check_name(&mut problems, format!("{dkey}.name"), &device.name);
                if let Some(first) = device_names.insert(device.name.as_str(), dkey.clone()) {
                    problems.push(Invalid::new(
                        format!("{dkey}.name"),
                        format!(
                            "device name {:?} is already used by {first}; topics need unique device names",
                            device.name
                        ),
                    ));
                }
                self.validate_device(&mut problems, &dkey, bus, device);
            }
        }
        problems
    }

    fn validate_device(
        &self,
        problems: &mut Vec<Invalid>,
        dkey: &str,
        bus: &BusConfig,
        device: &DeviceConfig,
    ) {
        let modbus = bus.kind != BusKind::Lines;
        if device.poll_interval_ms == 0 {
            problems.push(Invalid::new(
                format!("{dkey}.poll_interval_ms"),
                "must be at least 1",
            ));
        }
        if device.timeout_ms == Some(0) {
            problems.push(Invalid::new(
                format!("{dkey}.timeout_ms"),
                "must be at least 1",
            ));
        }
        if device.retries > 10 {
            problems.push(Invalid::new(format!("{dkey}.retries"), "at most 10"));
        }
        if device.quarantine_after == 0 {
            problems.push(Invalid::new(
                format!("{dkey}.quarantine_after"),
                "must be at least 1",
            ));
        }
        if device.backoff_max_ms == 0 {
            problems.push(Invalid::new(
                format!("{dkey}.backoff_max_ms"),
                "must be at least 1",
            ));
        }
        if modbus {
            if bus.kind == BusKind::Rtu && !(1..=247).contains(&device.unit_id) {
                problems.push(Invalid::new(
                    format!("{dkey}.unit_id"),
                    format!("{} is not a unit id on a serial bus: 1..=247 (0 is broadcast, which has no answers)", device.unit_id),
                ));
            }
            if !(1..=MAX_REGISTERS).contains(&device.max_registers_per_request) {
                problems.push(Invalid::new(
                    format!("{dkey}.max_registers_per_request"),
                    format!("must be 1..={MAX_REGISTERS}"),
                ));
            }
            if !(1..=MAX_BITS).contains(&device.max_bits_per_request) {
                problems.push(Invalid::new(
                    format!("{dkey}.max_bits_per_request"),
                    format!("must be 1..={MAX_BITS}"),
                ));
            }
            for key in [
                ("request", device.request.is_some()),
                ("regex", device.regex.is_some()),
            ] {
                if key.1 {
                    problems.push(Invalid::new(
                        format!("{dkey}.{}", key.0),
                        "applies only to lines buses",
                    ));
                }
            }
        } else {
            validate_lines_device(problems, dkey, bus, device);
        }

        // The device's points: profile first, then its own, with the key each came from.
        let mut points: Vec<(String, &PointConfig)> = Vec::new();
        if let Some(profile) = &device.profile {
            match self.profiles.get(profile) {
                Some(p) => points.extend(
                    p.points
                        .iter()
                        .enumerate()
                        .map(|(i, pt)| (format!("profile.{profile}.point[{i}]"), pt)),
                ),
                None => problems.push(Invalid::new(
                    format!("{dkey}.profile"),
                    format!(
                        "no profile named {profile:?}; defined: {}",
                        if self.profiles.is_empty() {
                            "none".to_string()
                        } else {
                            self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                )),
            }
        }
        points.extend(
            device
                .points
                .iter()
                .enumerate()
                .map(|(i, pt)| (format!("{dkey}.point[{i}]"), pt)),
        );
        let unknown_profile = device
            .profile
            .as_ref()
            .is_some_and(|p| !self.profiles.contains_key(p));
        if points.is_empty() && !unknown_profile {
            problems.push(Invalid::new(
                format!("{dkey}.point"),
                "a device needs at least one point (its own or from a profile)",
            ));
        }
        let mut names: HashMap<&str, &str> = HashMap::new();
        for (pkey, point) in &points {
            check_name(problems, format!("{pkey}.name"), &point.name);
            if let Some(first) = names.insert(point.name.as_str(), pkey.as_str()) {
                problems.push(Invalid::new(
                    format!("{pkey}.name"),
                    format!(
                        "point name {:?} is already used by {first} in device {:?}",
                        point.name, device.name
                    ),
                ));
            }
            validate_point(problems, pkey, bus.kind, device, point);
        }
        if modbus {
            check_overlaps(problems, device, &points);
        } else if let Some(re) = device
            .regex
            .as_deref()
            .and_then(|r| regex_lite::Regex::new(r).ok())
        {
            let names: HashSet<&str> = re.capture_names().flatten().collect();
            for (pkey, p) in &points {
                if !names.contains(p.field()) {
                    problems.push(Invalid::new(
                        format!("{pkey}.field"),
                        format!("the regex has no capture named {:?}", p.field()),
                    ));
                }
            }
        }
    }
}

fn validate_bus(problems: &mut Vec<Invalid>, bkey: &str, bus: &BusConfig) {
    let serial = matches!(bus.kind, BusKind::Rtu | BusKind::Lines);
    let not_for = |problems: &mut Vec<Invalid>, key: &str, set: bool, applies: &str| {
        if set {
            problems.push(Invalid::new(
                format!("{bkey}.{key}"),
                format!("applies only to {applies} buses"),
            ));
        }
    };
    if serial {
        match &bus.port {
            Some(PortSetting::Path(p)) if !p.is_empty() => {}
            _ => problems.push(Invalid::new(
                format!("{bkey}.port"),
                "a serial bus needs `port`, the device path, e.g. \"/dev/ttyUSB0\"",
            )),
        }
        if bus.baud() == 0 {
            problems.push(Invalid::new(format!("{bkey}.baud"), "must be at least 1"));
        }
        if !matches!(bus.data_bits(), 7 | 8) {
            problems.push(Invalid::new(format!("{bkey}.data_bits"), "must be 7 or 8"));
        }
        if !matches!(bus.stop_bits(), 1 | 2) {
            problems.push(Invalid::new(format!("{bkey}.stop_bits"), "must be 1 or 2"));
        }
        not_for(problems, "host", bus.host.is_some(), "tcp");
        not_for(problems, "framing", bus.framing.is_some(), "tcp");
        not_for(
            problems,
            "connect_timeout_ms",
            bus.connect_timeout_ms.is_some(),
            "tcp",
        );
    } else {
        if bus.host.as_deref().map_or(true, str::is_empty) {
            problems.push(Invalid::new(
                format!("{bkey}.host"),
                "a tcp bus needs `host`",
            ));
        }
        if bus.tcp_port().is_none() {
            problems.push(Invalid::new(
                format!("{bkey}.port"),
                "a tcp bus's port is a number 1..=65535",
            ));
        }
        for (key, set) in [
            ("baud", bus.baud.is_some()),
            ("parity", bus.parity.is_some()),
            ("data_bits", bus.data_bits.is_some()),
            ("stop_bits", bus.stop_bits.is_some()),
        ] {
            not_for(problems, key, set, "rtu and lines");
        }
        if bus.inter_frame_ms.is_some() && bus.framing() != Framing::Rtu {
            problems.push(Invalid::new(
                format!("{bkey}.inter_frame_ms"),
                "applies only to rtu buses and tcp buses with framing = \"rtu\"",
            ));
        }
    }
    if let Some(ms) = bus.inter_frame_ms {
        if !(0.0..=1000.0).contains(&ms) {
            problems.push(Invalid::new(
                format!("{bkey}.inter_frame_ms"),
                "must be 0..=1000",
            ));
        }
    }
    if bus.kind != BusKind::Lines {
        not_for(problems, "mode", bus.mode.is_some(), "lines");
        not_for(problems, "max_line", bus.max_line.is_some(), "lines");
        not_for(problems, "checksum", bus.checksum.is_some(), "lines");
    } else {
        if bus.inter_frame_ms.is_some() {
            problems.push(Invalid::new(
                format!("{bkey}.inter_frame_ms"),
                "applies only to Modbus buses",
            ));
        }
        if !(8..=65_536).contains(&bus.max_line()) {
            problems.push(Invalid::new(
                format!("{bkey}.max_line"),
                "must be 8..=65536",
            ));
        }
        if bus.mode() == LineMode::Stream && bus.devices.len() > 1 {
            problems.push(Invalid::new(
                format!("{bkey}.device"),
                "a stream-mode lines bus carries one device (its port talks on its own); use mode = \"poll\" for several",
            ));
        }
    }
}

fn validate_lines_device(
    problems: &mut Vec<Invalid>,
    dkey: &str,
    bus: &BusConfig,
    device: &DeviceConfig,
) {
    match (bus.mode(), &device.request) {
        (LineMode::Poll, None) => problems.push(Invalid::new(
            format!("{dkey}.request"),
            "a poll-mode lines device needs `request`, the text to send",
        )),
        (LineMode::Stream, Some(_)) => problems.push(Invalid::new(
            format!("{dkey}.request"),
            "applies only to poll-mode lines buses",
        )),
        (LineMode::Poll, Some(r)) if r.is_empty() || r.len() > 1024 => problems.push(Invalid::new(
            format!("{dkey}.request"),
            "must be 1..=1024 bytes",
        )),
        _ => {}
    }
    if let Some(re) = &device.regex {
        match regex_lite::Regex::new(re) {
            Err(e) => problems.push(Invalid::new(
                format!("{dkey}.regex"),
                format!("not a valid regex: {e}"),
            )),
            Ok(re) => {
                let names: HashSet<&str> = re.capture_names().flatten().collect();
                if names.is_empty() {
                    problems.push(Invalid::new(
                        format!("{dkey}.regex"),
                        "needs named captures, e.g. (?P<temp>[-0-9.]+)",
                    ));
                }
            }
        }
    }
    for (key, set) in [
        ("unit_id", device.unit_id != default_unit_id()),
        ("max_gap", device.max_gap != default_max_gap()),
        (
            "max_registers_per_request",
            device.max_registers_per_request != MAX_REGISTERS,
        ),
        (
            "max_bits_per_request",
            device.max_bits_per_request != MAX_BITS,
        ),
    ] {
        if set {
            problems.push(Invalid::new(
                format!("{dkey}.{key}"),
                "applies only to Modbus buses",
            ));
        }
    }
}

fn validate_point(
    problems: &mut Vec<Invalid>,
    pkey: &str,
    bus: BusKind,
    device: &DeviceConfig,
    p: &PointConfig,
) {
    let t = p.data_type_or_default();
    if bus == BusKind::Lines {
        for (key, set) in [
            ("kind", p.kind.is_some()),
            ("address", p.address.is_some()),
            ("order", p.order.is_some()),
            ("bit", p.bit.is_some()),
            ("registers", p.registers.is_some()),
        ] {
            if set {
                problems.push(Invalid::new(
                    format!("{pkey}.{key}"),
                    "applies only to Modbus points",
                ));
            }
        }
        if t == DataType::Bit {
            problems.push(Invalid::new(
                format!("{pkey}.type"),
                "\"bit\" applies only to Modbus registers",
            ));
        }
    } else {
        if p.field.is_some() {
            problems.push(Invalid::new(
                format!("{pkey}.field"),
                "applies only to lines buses",
            ));
        }
        let Some(kind) = p.kind else {
            problems.push(Invalid::new(
                format!("{pkey}.kind"),
                "a Modbus point needs `kind`: \"coil\", \"discrete\", \"input\" or \"holding\"",
            ));
            return;
        };
        let Some(address) = p.address else {
            problems.push(Invalid::new(
                format!("{pkey}.address"),
                "a Modbus point needs `address` (0-based protocol address)",
            ));
            return;
        };
        if kind.is_bit() && t != DataType::Bool {
            problems.push(Invalid::new(
                format!("{pkey}.type"),
                format!("a {} is one bit: type must be \"bool\"", kind.name()),
            ));
        }
        match (t, p.bit) {
            (DataType::Bit, None) => problems.push(Invalid::new(
                format!("{pkey}.bit"),
                "type \"bit\" needs `bit` (0..=15)",
            )),
            (DataType::Bit, Some(b)) if b > 15 => problems.push(Invalid::new(
                format!("{pkey}.bit"),
                "must be 0..=15 (0 = least significant)",
            )),
            (DataType::Bit, Some(_)) => {}
            (_, Some(_)) => problems.push(Invalid::new(
                format!("{pkey}.bit"),
                "applies only to type \"bit\"",
            )),
            (_, None) => {}
        }
        match (t, p.registers) {
            (DataType::String, None) => problems.push(Invalid::new(
                format!("{pkey}.registers"),
                "type \"string\" needs `registers`, its length in registers",
            )),
            (DataType::String, Some(n)) if n == 0 || n > MAX_REGISTERS => {
                problems.push(Invalid::new(
                    format!("{pkey}.registers"),
                    format!("must be 1..={MAX_REGISTERS}"),
                ))
            }
            (DataType::String, Some(_)) => {}
            (_, Some(_)) => problems.push(Invalid::new(
                format!("{pkey}.registers"),
                "applies only to type \"string\"",
            )),
            (_, None) => {}
        }
        let width = u32::from(p.width());
        if address > 65_535 {
            problems.push(Invalid::new(
                format!("{pkey}.address"),
                format!("{address} is out of range: addresses are 0-based protocol addresses 0..=65535 (write 40001 as 0)"),
            ));
        } else if address + width > 65_536 {
            problems.push(Invalid::new(
                format!("{pkey}.address"),
                format!(
                    "a {} at {address} needs {width} registers and runs past 65535",
                    t.name()
                ),
            ));
        }
        let limit = if kind.is_bit() {
            device.max_bits_per_request
        } else {
            device.max_registers_per_request
        };
        if width > u32::from(limit) {
            problems.push(Invalid::new(
                format!("{pkey}.registers"),
                format!("{width} registers do not fit in one request of this device (max_registers_per_request = {limit})"),
            ));
        }
    }
    if !t.is_numeric() && (p.scale != 1.0 || p.offset != 0.0) {
        problems.push(Invalid::new(
            format!("{pkey}.scale"),
            format!("scale and offset do not apply to type \"{}\"", t.name()),
        ));
    }
    if !p.scale.is_finite() || !p.offset.is_finite() {
        problems.push(Invalid::new(
            format!("{pkey}.scale"),
            "scale and offset must be finite numbers",
        ));
    }
    if p.deadband.is_some() && p.deadband_percent.is_some() {
        problems.push(Invalid::new(
            format!("{pkey}.deadband_percent"),
            "set `deadband` or `deadband_percent`, not both",
        ));
    }
    for (key, v) in [
        ("deadband", p.deadband),
        ("deadband_percent", p.deadband_percent),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && v >= 0.0) {
                problems.push(Invalid::new(
                    format!("{pkey}.{key}"),
                    "must be a number ≥ 0",
                ));
            }
        }
    }
    if let Some(topic) = &p.topic {
        check_topic(problems, format!("{pkey}.topic"), topic);
    }
}

/// Two points of one device must not share registers, except different bits of one
/// register (`type = "bit"`). Reports at the later point.
fn check_overlaps(
    problems: &mut Vec<Invalid>,
    device: &DeviceConfig,
    points: &[(String, &PointConfig)],
) {
    /// Where one point sits, and where it came from for the message.
    struct Span<'a> {
        kind: RegisterKind,
        start: u32,
        end: u32,
        bit: Option<u8>,
        name: &'a str,
        key: &'a str,
    }
    let mut spans: Vec<Span<'_>> = points
        .iter()
        .filter_map(|(key, p)| {
            let kind = p.kind?;
            let start = p.address?;
            // A zero width or an address near u32::MAX is reported by validate_point;
            // such a point has no range to overlap with.
            let end = start.checked_add(u32::from(p.width()))?.checked_sub(1)?;
            let is_bit = p.data_type_or_default() == DataType::Bit;
            Some(Span {
                kind,
                start,
                end,
                bit: if is_bit { p.bit } else { None },
                name: p.name.as_str(),
                key: key.as_str(),
            })
        })
        .collect();
    spans.sort_by_key(|s| (s.kind, s.start, s.end));
    for pair in spans.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.kind != b.kind || b.start > a.end {
            continue;
        }
        // Different bits of one register are meant to share it.
        if a.start == b.start && a.bit.is_some() && b.bit.is_some() && a.bit != b.bit {
            continue;
        }
        problems.push(Invalid::new(
            format!("{}.address", b.key),
            format!(
                "{} {} overlaps point {:?} ({} {}..={}) in device {:?}",
                b.kind.name(),
                b.start,
                a.name,
                a.kind.name(),
                a.start,
                a.end,
                device.name
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::config::tests::{parse, GOOD};

    fn keys(c: &FieldConfig) -> Vec<String> {
        c.validate().into_iter().map(|i| i.key).collect()
    }

    #[test]
    fn overlaps_and_out_of_range_are_found() {
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
            address = 0
            type = "f32"
            [[bus.device.point]]
            name = "b"
            kind = "holding"
            address = 1
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
                "bus[0].device[0].point[2].address",
                "bus[0].device[0].point[3].address",
                "bus[0].device[0].point[4].type",
                "bus[0].device[0].point[1].address",
            ],
            "{problems:#?}"
        );
        assert!(
            problems[1].message.contains("0-based"),
            "{}",
            problems[1].message
        );
        assert!(
            problems[3].message.contains("overlaps point \"a\""),
            "{}",
            problems[3].message
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
                "bus[0].device[0].point[0].address",
                "bus[0].device[1].profile",
                "bus[1].device[0].name",
            ],
            "{problems:#?}"
        );
        assert!(problems[2].message.contains("sdm630"));
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
}

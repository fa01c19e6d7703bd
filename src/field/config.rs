//! The `[[bus]]` and `[profile.NAME]` sections of the configuration file.
//!
//! ```toml
//! [[bus]]
//! name = "rs485"            # required; unique; used in logs
//! kind = "rtu"              # "rtu" | "tcp" | "lines"
//! port = "/dev/ttyUSB0"     # rtu/lines: serial device path; tcp: TCP port number (default 502)
//! baud = 9600               # rtu/lines; default 9600
//! parity = "even"           # rtu/lines: "none" | "even" | "odd"; default "even" for rtu (the Modbus spec's), "none" for lines
//! data_bits = 8             # rtu/lines: 7 or 8; default 8
//! stop_bits = 1             # rtu/lines: 1 or 2; default 1
//! # inter_frame_ms = 4.0    # rtu (and tcp with framing = "rtu"): silence between frames;
//!                           # default 3.5 characters at `baud`, 1.75 ms above 19200 baud
//! # request_delay_ms = 0    # rtu/tcp: pause between any two requests on the bus (gateways)
//!
//!   [[bus.device]]
//!   name = "meter1"         # required; unique across all buses; topic level
//!   unit_id = 1             # Modbus unit (slave) id; default 1 (rtu: 1..=247)
//!   poll_interval_ms = 1000 # default 1000
//!   timeout_ms = 1000       # per request; default 1000 (lines stream mode: longest silence, default 10000)
//!   retries = 1             # extra attempts after a timeout or CRC error; default 1
//!   profile = "sdm630"      # optional: points from [profile.sdm630]
//!   max_gap = 10            # unused registers (bits for coils/discrete) a request may span to join two points; default 10
//!   max_registers_per_request = 125  # default 125 (the protocol's limit)
//!   max_bits_per_request = 2000      # default 2000 (the protocol's limit)
//!   batch = false           # also send all points of a poll as one JSON message; default false
//!   quarantine_after = 3    # consecutive failed polls before quarantine; default 3
//!   backoff_max_ms = 60000  # cap of the quarantine retry interval; default 60000
//!   request_delay_ms = 0    # pause between two requests to this device; default 0
//!   poll_groups = { fast = 200 }     # group name -> poll interval ms, for points' `poll_group`
//!
//!     [[bus.device.point]]  # points may also come from the profile
//!     name = "voltage"
//!     kind = "input"        # "coil" | "discrete" | "input" | "holding"
//!     address = 0           # 0-based protocol address (holding 0 = "40001" in 1-based manuals)
//!     type = "f32"          # bool bit u16 i16 u32 i32 u64 i64 f32 f64 string; default bool for
//!                           # coil/discrete, u16 for registers, f64 for lines
//!     order = "ABCD"        # ABCD | BADC | CDAB | DCBA; default ABCD
//!
//! [profile.sdm630]
//!   poll_groups = { energy = 60000 } # the counters every minute, the rest at the device's interval
//!   [[profile.sdm630.point]]
//!   name = "voltage_l1"
//!   unit = "V"
//!   kind = "input"
//!   address = 0
//!   type = "f32"
//! ```
//!
//! Point keys: `name` (required), `unit` (none), `kind` (required on Modbus buses),
//! `address` (required on Modbus buses), `type`, `order`, `bit` (for `type = "bit"`,
//! 0..=15, 0 = least significant), `registers` (for `type = "string"`), `scale` (1.0),
//! `offset` (0.0), `deadband` (numeric types; none: publish every poll), `deadband_percent` (none),
//! `heartbeat_secs` (60, with a deadband: publish at least this often; 0 = never),
//! `topic` (none: `{prefix}/{device}/{point}`; set: used verbatim), `field` (lines: the
//! regex capture group or key to read; default the point's name), `poll_interval_ms` or
//! `poll_group` (Modbus, at most one: poll the point at its own interval or at its
//! group's instead of the device's; points of one interval share requests). Write keys
//! (`writable`, `min`, `max`, `step`, `allowed`, `min_interval_ms`, `write_function`,
//! and the device's `mask_write`): see `field/write.rs`. Home Assistant keys (used with
//! `[homeassistant]`): the point's `device_class`, `state_class` and `ha_component`, the
//! device's `manufacturer` and `model`; see `agent/discovery.rs`.
//!
//! Lines bus keys: `mode` ("stream": the device talks on its own, default; "poll": send
//! each device's `request` and read one line), `max_line` (bytes, default 256),
//! `checksum` ("none", default; "nmea": `$...*hh` with the XOR of the bytes between `$`
//! and `*`). Lines device keys: `request` (poll mode: text to send, e.g. "R\r\n"),
//! `regex` (named captures; without it, lines are parsed as `key=value` pairs separated
//! by spaces, commas or semicolons).
//!
//! Points of one device may share registers (a status word whole and bit by bit).
//!
//! Addresses are 0-based protocol addresses everywhere: in this file, in errors, in logs
//! and in `probe` output. It is the number on the wire, so it is the one convention that
//! cannot be off by one; messages add the 1-based "Modicon" number (40001…) as a hint.
//!
//! This file is the schema (serde shapes, defaults, derived settings); the rules that
//! [`FieldConfig::validate`] applies live in `field/validate.rs`. Invariant: `validate`
//! returning no problems means [`super::resolve`] succeeds and every device's read plan
//! fits the protocol's limits.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::decode::{ByteOrder, DataType, RegisterKind};

/// The field side of the configuration: buses with their devices, and point profiles.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// `[[bus]]` tables, polled in parallel, one task each. Default: none.
    #[serde(default, rename = "bus")]
    pub buses: Vec<BusConfig>,
    /// `[profile.NAME]` tables: point lists shared by devices of one model. Default: none.
    #[serde(default, rename = "profile")]
    pub profiles: BTreeMap<String, ProfileConfig>,
}

/// What a bus talks over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// Modbus RTU on a serial port (RS-485/RS-232).
    Rtu,
    /// Modbus over TCP (or RTU frames over TCP, for serial servers).
    Tcp,
    /// ASCII line sensors on a serial port.
    Lines,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// Framing on a TCP bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// Modbus TCP (MBAP header).
    #[default]
    Tcp,
    /// RTU frames (with CRC) tunnelled over TCP, as serial device servers do.
    Rtu,
}

/// How a lines bus gets its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineMode {
    #[default]
    Stream,
    Poll,
}

/// Line checksum check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checksum {
    #[default]
    None,
    /// NMEA 0183: `$BODY*hh`, hh = XOR of the BODY bytes in hex.
    Nmea,
}

/// `port`: a device path on serial buses, a number on TCP buses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortSetting {
    Number(i64),
    Path(String),
}

/// One `[[bus]]` table. Keys that do not apply to `kind` are rejected by validation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// Required, unique among buses.
    pub name: String,
    /// Required: `rtu`, `tcp` or `lines`.
    pub kind: BusKind,
    /// rtu/lines: serial device path (required). tcp: port number, default 502.
    pub port: Option<PortSetting>,
    /// tcp: host name or address, without the port (required).
    pub host: Option<String>,
    /// tcp: `tcp` (default) or `rtu` (RTU frames over TCP).
    pub framing: Option<Framing>,
    /// rtu/lines: default 9600.
    pub baud: Option<u32>,
    /// rtu/lines: default `even` on rtu (the Modbus spec's default), `none` on lines.
    pub parity: Option<Parity>,
    /// rtu/lines: 7 or 8, default 8.
    pub data_bits: Option<u8>,
    /// rtu/lines: 1 or 2, default 1.
    pub stop_bits: Option<u8>,
    /// rtu (or tcp with `framing = "rtu"`): silence between frames in ms; default 3.5
    /// character times at `baud`, or 1.75 ms above 19200 baud (Modbus over serial line
    /// spec, 2.5.1.1). For RTU over TCP the default is 0.
    pub inter_frame_ms: Option<f64>,
    /// tcp: connect timeout in ms, default 3000.
    pub connect_timeout_ms: Option<u64>,
    /// lines: `stream` (default) or `poll`.
    pub mode: Option<LineMode>,
    /// lines: longest accepted line in bytes, default 256; longer lines count as garbage.
    pub max_line: Option<usize>,
    /// lines: `none` (default) or `nmea`.
    pub checksum: Option<Checksum>,
    /// rtu/tcp: least pause in ms between the end of one request on the bus (answer or
    /// timeout) and the start of the next, whichever units they go to; for gateways that
    /// need a breath between requests. Default 0.
    pub request_delay_ms: Option<u64>,
    /// `[[bus.device]]` tables. Default: none.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
}

/// One `[[bus.device]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Required; unique across all buses; the middle level of the topic.
    pub name: String,
    /// Modbus unit id, default 1. RTU: 1..=247 (0 is broadcast, which has no answers).
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// Default 1000.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Per request. Default 1000; on a stream-mode lines bus, the longest silence before
    /// the points go bad with quality `timeout`, default 10000.
    pub timeout_ms: Option<u64>,
    /// Extra attempts after a timeout or a corrupted answer, default 1.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Name of a `[profile.NAME]` whose points this device has. Default: none.
    pub profile: Option<String>,
    /// Unused registers (bits, for coils/discrete inputs) one request may span to join
    /// two points, default 10.
    #[serde(default = "default_max_gap")]
    pub max_gap: u16,
    /// 1..=125, default 125; lower it for devices that cannot answer 125 registers.
    #[serde(default = "default_max_registers")]
    pub max_registers_per_request: u16,
    /// 1..=2000, default 2000.
    #[serde(default = "default_max_bits")]
    pub max_bits_per_request: u16,
    /// Also send all points of each poll as one JSON message. Default false.
    #[serde(default)]
    pub batch: bool,
    /// Consecutive failed polls after which the device is quarantined, default 3.
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: u32,
    /// Longest interval between retries of a quarantined device, ms, default 60000.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// lines, poll mode: the request to send (TOML escapes such as "\r\n" work).
    pub request: Option<String>,
    /// lines: a regex with named captures; without it lines are `key=value` pairs.
    pub regex: Option<String>,
    /// `[[bus.device.point]]` tables, added to the profile's points. Default: none.
    #[serde(default, rename = "point")]
    pub points: Vec<PointConfig>,
    /// Poll groups: group name → poll interval in ms, for points with `poll_group`.
    /// Adds to (and overrides) the profile's `poll_groups`. Default: none.
    #[serde(default)]
    pub poll_groups: BTreeMap<String, u64>,
    /// Least pause in ms between the end of one request to this device and the start of
    /// the next one to it (devices that need time between requests). Default 0.
    #[serde(default)]
    pub request_delay_ms: u64,
    /// The device implements function 22 (mask write); false: `bit` points are written
    /// by read-modify-write. Default true.
    #[serde(default = "default_mask_write")]
    pub mask_write: bool,
    /// Home Assistant discovery: the maker shown on the device. Default: none.
    pub manufacturer: Option<String>,
    /// Home Assistant discovery: the model shown on the device. Default: the profile's
    /// name.
    pub model: Option<String>,
}

/// One `[profile.NAME]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Free text for people, e.g. the device model. Default: none.
    pub description: Option<String>,
    /// `[[profile.NAME.point]]` tables. Default: none.
    #[serde(default, rename = "point")]
    pub points: Vec<PointConfig>,
    /// Poll groups of the profile's points: name → interval in ms. Default: none.
    #[serde(default)]
    pub poll_groups: BTreeMap<String, u64>,
}

/// One point (in a device or a profile).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointConfig {
    /// Required; unique within its device; the last level of the topic.
    pub name: String,
    /// Engineering unit for the payload, e.g. "V". Default: none.
    pub unit: Option<String>,
    /// Modbus: required.
    pub kind: Option<RegisterKind>,
    /// Modbus: required; 0-based protocol address, 0..=65535.
    pub address: Option<u32>,
    /// Default `bool` on coil/discrete, `u16` on registers, `f64` on lines.
    #[serde(rename = "type")]
    pub data_type: Option<DataType>,
    /// Default ABCD.
    pub order: Option<ByteOrder>,
    /// For `type = "bit"`: 0..=15.
    pub bit: Option<u8>,
    /// For `type = "string"`: register count, 1..=125.
    pub registers: Option<u16>,
    /// Default 1.0: value = raw × scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Default 0.0.
    #[serde(default)]
    pub offset: f64,
    /// Publish only when the value moved more than this since the last publish (or the
    /// quality changed, or the heartbeat is due). Default: none, publish every poll.
    pub deadband: Option<f64>,
    /// Like `deadband`, relative to the last published value. Default: none.
    pub deadband_percent: Option<f64>,
    /// With a deadband: publish at least every N seconds even if unchanged. Default 60;
    /// 0 disables the heartbeat.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Topic used verbatim instead of `{prefix}/{device}/{point}`. Default: none.
    pub topic: Option<String>,
    /// lines: capture group or key to read. Default: the point's name.
    pub field: Option<String>,
    // Poll groups (Modbus): at most one of the two; default the device's interval.
    /// Poll this point every N ms instead of the device's `poll_interval_ms`.
    pub poll_interval_ms: Option<u64>,
    /// Poll this point at the interval of the named group (device or profile
    /// `poll_groups`).
    pub poll_group: Option<String>,
    // Writes (rules and defaults in `field/write.rs`).
    /// Commands may write this point (coils and holding registers). Default false.
    #[serde(default)]
    pub writable: bool,
    /// Writes: lowest value accepted, engineering units. Default: none.
    pub min: Option<f64>,
    /// Writes: highest value accepted, engineering units. Default: none.
    pub max: Option<f64>,
    /// Writes: the value must be `min` (or 0) plus a multiple of this. Default: none.
    pub step: Option<f64>,
    /// Writes: the only values accepted (modes). Default: any.
    pub allowed: Option<Vec<f64>>,
    /// Writes: least time between two writes of the point, ms. Default 0.
    pub min_interval_ms: Option<u64>,
    /// Writes of one register: 6 (default) or 16.
    pub write_function: Option<u8>,
    /// Home Assistant discovery: the entity's device class (`temperature`, `energy`, …).
    /// Default: inferred from `unit`.
    pub device_class: Option<String>,
    /// Home Assistant discovery: `measurement`, `total` or `total_increasing`. Default:
    /// inferred from `unit` (numeric points).
    pub state_class: Option<StateClass>,
    /// Home Assistant discovery: the entity kind. Default: from the point's type and
    /// write keys.
    pub ha_component: Option<HaComponent>,
}

/// Home Assistant's `state_class` of a sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateClass {
    Measurement,
    Total,
    TotalIncreasing,
}

/// The Home Assistant entity kinds a point can be announced as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaComponent {
    Sensor,
    BinarySensor,
    Number,
    Switch,
    Select,
}

pub(super) fn default_unit_id() -> u8 {
    1
}
fn default_poll_interval_ms() -> u64 {
    1000
}
fn default_retries() -> u32 {
    1
}
pub(super) fn default_max_gap() -> u16 {
    10
}
fn default_max_registers() -> u16 {
    MAX_REGISTERS
}
fn default_max_bits() -> u16 {
    MAX_BITS
}
fn default_quarantine_after() -> u32 {
    3
}
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_mask_write() -> bool {
    true
}
fn default_scale() -> f64 {
    1.0
}
fn default_heartbeat_secs() -> u64 {
    60
}

/// The protocol's limit on registers per read request (functions 0x03/0x04).
pub const MAX_REGISTERS: u16 = 125;
/// The protocol's limit on bits per read request (functions 0x01/0x02).
pub const MAX_BITS: u16 = 2000;
/// Default request timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// Default silence limit of a stream-mode line sensor.
pub const DEFAULT_STREAM_TIMEOUT_MS: u64 = 10_000;

impl BusConfig {
    pub fn baud(&self) -> u32 {
        self.baud.unwrap_or(9600)
    }

    pub fn parity(&self) -> Parity {
        self.parity.unwrap_or(match self.kind {
            BusKind::Lines => Parity::None,
            _ => Parity::Even,
        })
    }

    pub fn data_bits(&self) -> u8 {
        self.data_bits.unwrap_or(8)
    }

    pub fn stop_bits(&self) -> u8 {
        self.stop_bits.unwrap_or(1)
    }

    pub fn framing(&self) -> Framing {
        self.framing.unwrap_or_default()
    }

    pub fn mode(&self) -> LineMode {
        self.mode.unwrap_or_default()
    }

    pub fn max_line(&self) -> usize {
        self.max_line.unwrap_or(256)
    }

    pub fn checksum(&self) -> Checksum {
        self.checksum.unwrap_or_default()
    }

    pub fn connect_timeout_ms(&self) -> u64 {
        self.connect_timeout_ms.unwrap_or(3000)
    }

    /// The serial device path (rtu/lines), if configured as a path.
    pub fn serial_path(&self) -> Option<&str> {
        match &self.port {
            Some(PortSetting::Path(p)) => Some(p),
            _ => None,
        }
    }

    /// The TCP port (tcp), default 502.
    pub fn tcp_port(&self) -> Option<u16> {
        match &self.port {
            None => Some(502),
            Some(PortSetting::Number(n)) => u16::try_from(*n).ok().filter(|p| *p != 0),
            Some(PortSetting::Path(_)) => None,
        }
    }

    /// Bits on the wire per character: start + data + parity + stop.
    pub fn bits_per_char(&self) -> u32 {
        let parity = u32::from(self.parity() != Parity::None);
        1 + u32::from(self.data_bits()) + parity + u32::from(self.stop_bits())
    }

    /// The inter-frame silence: configured, or 3.5 characters (1.75 ms above 19200 baud).
    pub fn inter_frame(&self) -> std::time::Duration {
        if let Some(ms) = self.inter_frame_ms {
            return std::time::Duration::from_secs_f64(ms.max(0.0) / 1000.0);
        }
        match self.kind {
            BusKind::Tcp => std::time::Duration::ZERO,
            _ => inter_frame_default(self.baud(), self.bits_per_char()),
        }
    }
}

/// The Modbus default silence: 3.5 character times, fixed at 1.75 ms above 19200 baud.
pub fn inter_frame_default(baud: u32, bits_per_char: u32) -> std::time::Duration {
    if baud > 19_200 || baud == 0 {
        return std::time::Duration::from_micros(1750);
    }
    std::time::Duration::from_secs_f64(3.5 * f64::from(bits_per_char) / f64::from(baud))
}

impl DeviceConfig {
    /// The poll interval of point `p` in ms: its own `poll_interval_ms`, else its
    /// `poll_group`'s (the device's groups before `profile`'s), else the device's. `None`
    /// for a group defined nowhere (validation reports it).
    pub fn interval_of(&self, profile: Option<&ProfileConfig>, p: &PointConfig) -> Option<u64> {
        if let Some(ms) = p.poll_interval_ms {
            return Some(ms);
        }
        match &p.poll_group {
            None => Some(self.poll_interval_ms),
            Some(g) => self
                .poll_groups
                .get(g)
                .or_else(|| profile.and_then(|pr| pr.poll_groups.get(g)))
                .copied(),
        }
    }

    pub fn timeout_ms(&self, bus: &BusConfig) -> u64 {
        self.timeout_ms.unwrap_or(
            if bus.kind == BusKind::Lines && bus.mode() == LineMode::Stream {
                DEFAULT_STREAM_TIMEOUT_MS
            } else {
                DEFAULT_TIMEOUT_MS
            },
        )
    }
}

impl PointConfig {
    /// The data type with its default filled in for `kind` (or for a lines bus).
    pub fn data_type_or_default(&self) -> DataType {
        self.data_type.unwrap_or(match self.kind {
            Some(k) if k.is_bit() => DataType::Bool,
            Some(_) => DataType::U16,
            None => DataType::F64,
        })
    }

    /// The register (or bit) count this point reads.
    pub fn width(&self) -> u16 {
        match self.kind {
            Some(k) if k.is_bit() => 1,
            _ => self
                .data_type_or_default()
                .registers(self.registers.unwrap_or(1)),
        }
    }

    /// The capture/key name on a lines bus.
    pub fn field(&self) -> &str {
        self.field.as_deref().unwrap_or(&self.name)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::field) fn parse(text: &str) -> FieldConfig {
        toml::from_str(text).unwrap()
    }

    /// Three buses (rtu, tcp, lines) and a profile, with no problem.
    pub(in crate::field) const GOOD: &str = r#"
        [[bus]]
        name = "rs485"
        kind = "rtu"
        port = "/dev/ttyUSB0"
        baud = 19200

        [[bus.device]]
        name = "meter1"
        unit_id = 1
        profile = "sdm630"

        [[bus.device]]
        name = "meter2"
        unit_id = 2
        profile = "sdm630"
        [[bus.device.point]]
        name = "status"
        kind = "coil"
        address = 0

        [[bus]]
        name = "plc"
        kind = "tcp"
        host = "127.0.0.1"
        port = 5020
        [[bus.device]]
        name = "plc1"
        unit_id = 255
        [[bus.device.point]]
        name = "name"
        kind = "holding"
        address = 10
        type = "string"
        registers = 8
        [[bus.device.point]]
        name = "run"
        kind = "holding"
        address = 20
        type = "bit"
        bit = 0
        [[bus.device.point]]
        name = "fault"
        kind = "holding"
        address = 20
        type = "bit"
        bit = 1

        [[bus]]
        name = "weather"
        kind = "lines"
        port = "/dev/ttyUSB1"
        [[bus.device]]
        name = "ws1"
        regex = 'T=(?P<temp>[-0-9.]+)'
        [[bus.device.point]]
        name = "temperature"
        field = "temp"
        unit = "°C"

        [profile.sdm630]
        description = "Eastron SDM630"
        [[profile.sdm630.point]]
        name = "voltage_l1"
        unit = "V"
        kind = "input"
        address = 0
        type = "f32"
        [[profile.sdm630.point]]
        name = "energy"
        unit = "kWh"
        kind = "input"
        address = 342
        type = "f32"
        deadband = 0.01
    "#;

    #[test]
    fn a_good_config_has_no_problems_and_defaults() {
        let c = parse(GOOD);
        assert_eq!(c.validate(), vec![]);
        assert_eq!(c.buses.len(), 3);
        let rtu = &c.buses[0];
        assert_eq!(rtu.parity(), Parity::Even);
        assert_eq!(rtu.bits_per_char(), 11);
        assert_eq!(rtu.devices[0].poll_interval_ms, 1000);
        assert_eq!(rtu.devices[0].timeout_ms(rtu), 1000);
        assert_eq!(c.buses[2].parity(), Parity::None);
        assert_eq!(
            c.buses[2].devices[0].timeout_ms(&c.buses[2]),
            DEFAULT_STREAM_TIMEOUT_MS
        );
        assert_eq!(c.buses[1].tcp_port(), Some(5020));
        assert_eq!(c.profiles["sdm630"].points[1].heartbeat_secs, 60);
    }

    #[test]
    fn inter_frame_silence_follows_the_spec() {
        let mut c = parse(GOOD);
        let bus = &mut c.buses[0];
        // 19200 baud, 11 bits per char: 3.5 × 11 / 19200 s ≈ 2.005 ms.
        let t = bus.inter_frame();
        assert!(
            (t.as_secs_f64() - 3.5 * 11.0 / 19200.0).abs() < 1e-9,
            "{t:?}"
        );
        bus.baud = Some(115_200);
        assert_eq!(bus.inter_frame(), std::time::Duration::from_micros(1750));
        bus.inter_frame_ms = Some(5.0);
        assert_eq!(bus.inter_frame(), std::time::Duration::from_millis(5));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let err = toml::from_str::<FieldConfig>(
            "[[bus]]\nname = \"a\"\nkind = \"tcp\"\nhost = \"x\"\nbaudrate = 9600\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("baudrate") && msg.contains("line 5"), "{msg}");
        let err = toml::from_str::<FieldConfig>(
            "[profile.p]\n[[profile.p.point]]\nname = \"a\"\nkind = \"holding\"\naddress = 1\nscael = 2.0\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("scael"), "{err}");
    }
}

//! ASCII serial-line sensors: splitting a byte stream into bounded lines, checking NMEA
//! checksums, parsing lines with a regex or as `key=value` pairs, and the two bus loops
//! (`stream`: the sensor talks on its own; `poll`: send a request, read one line).
//!
//! Invariants:
//! - No line longer than `max_line` bytes is ever buffered: the rest of an overlong line
//!   is dropped as it arrives and the line counts as garbage.
//! - A garbage line (overlong, not UTF-8, failed checksum, not matching the parser) is
//!   counted and skipped; it never produces a value. Logged once when garbage starts and
//!   once when good lines return.
//! - A stream-mode sensor that stays silent for its `timeout_ms` gets readings with
//!   quality `timeout`, never its last value again.
//! - A vanished port gives `disconnected` readings once and is reopened with backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::Sender;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::command::Inbox;
use super::config::{Checksum, LineMode};
use super::decode::{Codec, DataType};
use super::link::{open_serial, same_cause, Chain, Disconnect, ReadError};
use super::reading::{FieldEvent, Quality, Reading, Value};
use super::resolve::{ResolvedBus, ResolvedDevice};
use super::schedule::Outcome;
use super::task::{run_polls, send_all, DeviceRun, Polled, Poller};
use crate::clock::now_ms;

/// Splits bytes into lines of at most `max` bytes (without the `\r\n`/`\n`).
#[derive(Debug)]
pub(crate) struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    /// Inside an overlong line: drop bytes until the next newline.
    discarding: bool,
}

/// One complete line, or why it was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Line {
    Text(String),
    Garbage(&'static str),
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            buf: Vec::with_capacity(max.min(4096)),
            max,
            discarding: false,
        }
    }

    /// Drops a partial line (before a poll request, stale input is not the answer).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }

    /// Feeds bytes; appends every completed line to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Line>) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|b| *b == b'\n');
            let (chunk, rest) = match newline {
                Some(n) => (&bytes[..n], Some(&bytes[n + 1..])),
                None => (bytes, None),
            };
            if !self.discarding {
                if self.buf.len() + chunk.len() > self.max + 1 {
                    self.discarding = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            match rest {
                None => return,
                Some(rest) => {
                    bytes = rest;
                    if self.discarding {
                        self.discarding = false;
                        out.push(Line::Garbage("line too long"));
                        continue;
                    }
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                    if self.buf.len() > self.max {
                        out.push(Line::Garbage("line too long"));
                    } else if !self.buf.is_empty() {
                        match std::str::from_utf8(&self.buf) {
                            Ok(s) => out.push(Line::Text(s.to_string())),
                            Err(_) => out.push(Line::Garbage("not UTF-8 text")),
                        }
                    }
                    self.buf.clear();
                }
            }
        }
    }
}

/// Checks and strips an NMEA checksum: `$BODY*hh` → `$BODY`.
pub(crate) fn strip_nmea(line: &str) -> Result<&str, &'static str> {
    let Some((body, sum)) = line.rsplit_once('*') else {
        return Err("no NMEA checksum");
    };
    let Some(payload) = body.strip_prefix(['$', '!']) else {
        return Err("NMEA sentence does not start with '$'");
    };
    let sum = sum.trim();
    // Exactly two hex digits: `from_str_radix` alone would also take a sign ("+F").
    if sum.len() != 2 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("bad NMEA checksum digits");
    }
    let want = u8::from_str_radix(sum, 16).map_err(|_| "bad NMEA checksum digits")?;
    let got = payload.bytes().fold(0u8, |acc, b| acc ^ b);
    if got == want {
        Ok(body)
    } else {
        Err("NMEA checksum mismatch")
    }
}

/// Parses one text field into a value of the point's type, then scales it.
fn parse_value(codec: &Codec, text: &str) -> Option<Value> {
    let t = text.trim();
    let raw = match codec.data_type {
        DataType::Bool | DataType::Bit => Value::Bool(match t.to_ascii_lowercase().as_str() {
            "1" | "true" | "on" | "yes" => true,
            "0" | "false" | "off" | "no" => false,
            _ => return None,
        }),
        DataType::U16 | DataType::U32 | DataType::U64 => Value::UInt(t.parse().ok()?),
        DataType::I16 | DataType::I32 | DataType::I64 => Value::Int(t.parse().ok()?),
        DataType::F32 | DataType::F64 => {
            let f: f64 = t.parse().ok()?;
            if !f.is_finite() {
                return None;
            }
            Value::Float(f)
        }
        DataType::String => Value::Text(t.to_string()),
    };
    codec.scaled(raw).ok()
}

/// Parses one line into readings of the device's points (those the line carries).
/// `Err` means the line is garbage.
pub(crate) fn parse_line(
    dev: &ResolvedDevice,
    checksum: Checksum,
    line: &str,
    ts_ms: i64,
) -> Result<Vec<(usize, Reading)>, &'static str> {
    let line = match checksum {
        Checksum::None => line,
        Checksum::Nmea => strip_nmea(line)?,
    };
    let mut out = Vec::new();
    let mut push = |i: usize, text: &str| {
        let value = parse_value(&dev.points[i].codec, text);
        let quality = if value.is_some() {
            Quality::Good
        } else {
            Quality::Parse
        };
        out.push((i, dev.reading(i, value, quality, ts_ms)));
    };
    match &dev.regex {
        Some(re) => {
            let caps = re.captures(line).ok_or("does not match the regex")?;
            for (i, p) in dev.points.iter().enumerate() {
                if let Some(m) = caps.name(&p.field) {
                    push(i, m.as_str());
                }
            }
        }
        None => {
            let pairs: Vec<(&str, &str)> = line
                .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
                .filter_map(|tok| tok.split_once('='))
                .map(|(k, v)| (k.trim(), v.trim()))
                .collect();
            if pairs.is_empty() {
                return Err("no key=value pairs");
            }
            for (i, p) in dev.points.iter().enumerate() {
                if let Some((_, v)) = pairs.iter().find(|(k, _)| *k == p.field) {
                    push(i, v);
                }
            }
        }
    }
    Ok(out)
}

const REOPEN_MIN: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// The serial port of a lines bus, reopened lazily with backoff.
struct LinePort {
    bus: ResolvedBus,
    port: Option<tokio_serial::SerialStream>,
    splitter: LineSplitter,
    pending: std::collections::VecDeque<Line>,
    next_open: Instant,
    wait: Duration,
    /// Why the port is closed, for one log line per change.
    last_error: Option<Arc<Disconnect>>,
    /// Inside a run of garbage lines (for one log line per change).
    in_garbage: bool,
}

impl LinePort {
    fn new(bus: &ResolvedBus) -> LinePort {
        LinePort {
            splitter: LineSplitter::new(bus.config.max_line()),
            bus: bus.clone(),
            port: None,
            pending: Default::default(),
            next_open: Instant::now(),
            wait: REOPEN_MIN,
            last_error: None,
            in_garbage: false,
        }
    }

    fn path(&self) -> &str {
        self.bus.config.serial_path().unwrap_or_default()
    }

    /// Opens the port if it is closed and the backoff allows; the error otherwise.
    fn ensure_open(&mut self) -> Result<(), ReadError> {
        if self.port.is_some() {
            return Ok(());
        }
        if Instant::now() < self.next_open {
            return Err(ReadError::Disconnected(
                self.last_error
                    .clone()
                    .unwrap_or_else(|| Arc::new(Disconnect::NotConnected)),
            ));
        }
        let c = &self.bus.config;
        match open_serial(
            self.path(),
            c.baud(),
            c.parity(),
            c.data_bits(),
            c.stop_bits(),
        ) {
            Ok(port) => {
                if self.last_error.take().is_some() {
                    tracing::info!(bus = %c.name, port = self.path(), "serial port is back");
                }
                self.port = Some(port);
                self.wait = REOPEN_MIN;
                self.splitter.clear();
                self.pending.clear();
                Ok(())
            }
            Err(source) => {
                let e = Arc::new(Disconnect::Serial {
                    path: self.path().to_string(),
                    source,
                });
                if !same_cause(self.last_error.as_deref(), &e) {
                    tracing::warn!(bus = %c.name, error = %Chain(&*e), "cannot open serial port; retrying with backoff");
                }
                self.last_error = Some(Arc::clone(&e));
                self.next_open = Instant::now() + self.wait;
                self.wait = (self.wait * 2).min(REOPEN_MAX);
                Err(ReadError::Disconnected(e))
            }
        }
    }

    fn lost(&mut self, why: Disconnect) -> ReadError {
        if self.port.take().is_some() {
            tracing::warn!(bus = %self.bus.config.name, port = self.path(), error = %Chain(&why), "serial port lost; reopening");
        }
        let why = Arc::new(why);
        self.last_error = Some(Arc::clone(&why));
        self.next_open = Instant::now();
        ReadError::Disconnected(why)
    }

    /// The next line (or garbage marker) before `deadline`.
    async fn next_line(&mut self, deadline: Instant) -> Result<Line, ReadError> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Ok(line);
            }
            self.ensure_open()?;
            let Some(port) = self.port.as_mut() else {
                return Err(ReadError::disconnected(Disconnect::NotConnected));
            };
            let mut buf = [0u8; 512];
            let n = match tokio::time::timeout_at(deadline, port.read(&mut buf)).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Ok(0)) => return Err(self.lost(Disconnect::Eof)),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(self.lost(Disconnect::Io(e))),
            };
            let mut lines = Vec::new();
            self.splitter.push(&buf[..n], &mut lines);
            self.pending.extend(lines);
        }
    }

    async fn send(&mut self, request: &str) -> Result<(), ReadError> {
        self.ensure_open()?;
        self.splitter.clear();
        self.pending.clear();
        let Some(port) = self.port.as_mut() else {
            return Err(ReadError::disconnected(Disconnect::NotConnected));
        };
        if let Err(e) = tokio_serial::SerialPort::clear(port, tokio_serial::ClearBuffer::Input) {
            return Err(self.lost(Disconnect::Port(e)));
        }
        let port = self
            .port
            .as_mut()
            .ok_or_else(|| ReadError::disconnected(Disconnect::NotConnected))?;
        match port.write_all(request.as_bytes()).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.lost(Disconnect::Io(e))),
        }
    }

    /// Counts a line and logs the start and end of a run of garbage.
    fn count(&mut self, garbage: Option<(&str, &str)>) {
        self.bus.stats.add_line(garbage.is_some());
        match (garbage, self.in_garbage) {
            (Some((why, line)), false) => {
                self.in_garbage = true;
                let preview: String = line.chars().take(80).collect();
                tracing::warn!(bus = %self.bus.config.name, reason = why, line = %preview, "skipping garbage lines");
            }
            (None, true) => {
                self.in_garbage = false;
                tracing::info!(
                    bus = %self.bus.config.name,
                    garbage_total = self.bus.stats.snapshot().garbage_lines,
                    "good lines again"
                );
            }
            _ => {}
        }
    }
}

/// Readings with the same bad quality for every point of a device.
fn all_bad(dev: &ResolvedDevice, quality: Quality) -> Vec<(usize, Reading)> {
    let ts = now_ms();
    (0..dev.points.len())
        .map(|i| (i, dev.reading(i, None, quality, ts)))
        .collect()
}

/// The loop of a lines bus until shutdown.
pub(crate) async fn run_lines(
    bus: &ResolvedBus,
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
) {
    let mut port = LinePort::new(bus);
    match bus.config.mode() {
        LineMode::Stream => run_stream(bus, &mut port, tx, shutdown).await,
        LineMode::Poll => run_poll(bus, &mut port, tx, shutdown).await,
    }
}

async fn run_stream(
    bus: &ResolvedBus,
    port: &mut LinePort,
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
) {
    let Some(spec) = bus.devices.first() else {
        shutdown.cancelled().await;
        return;
    };
    let mut run = DeviceRun::new(spec, Instant::now());
    // Silence is not the sensor's fault in a way backoff could help: never quarantine.
    run.health = super::schedule::Health::new(u32::MAX, spec.interval, spec.backoff_max);
    // A stream publishes whenever a line arrives: no poll interval to anticipate.
    run.filters = spec
        .points
        .iter()
        .map(|p| super::schedule::PointFilter::new(p.band, p.heartbeat, Duration::ZERO))
        .collect();
    let checksum = bus.config.checksum();
    let mut deadline = Instant::now() + spec.timeout;
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            next = port.next_line(deadline) => next,
        };
        let events = match next {
            Ok(Line::Garbage(why)) => {
                port.count(Some((why, "")));
                continue;
            }
            Ok(Line::Text(text)) => match parse_line(spec, checksum, &text, now_ms()) {
                Err(why) => {
                    port.count(Some((why, &text)));
                    continue;
                }
                Ok(readings) => {
                    port.count(None);
                    bus.stats.add_readings(readings.len());
                    deadline = Instant::now() + spec.timeout;
                    let polled = Polled {
                        readings,
                        outcome: Outcome::Answered,
                        fault: None,
                    };
                    run.finish_poll(polled, now_ms())
                }
            },
            Err(e) => {
                let quality = e.quality();
                let outcome = e.outcome();
                deadline = Instant::now() + spec.timeout;
                let polled = Polled {
                    readings: all_bad(spec, quality),
                    outcome,
                    fault: Some(e),
                };
                let events = run.finish_poll(polled, now_ms());
                if quality == Quality::Disconnected {
                    // Wait for the reopen backoff instead of spinning on the missing port.
                    let wait = port.next_open.max(Instant::now() + REOPEN_MIN);
                    if !send_all(tx, shutdown, events).await {
                        return;
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(wait) => {}
                    }
                    continue;
                }
                events
            }
        };
        if !send_all(tx, shutdown, events).await {
            return;
        }
    }
}

/// Sends the device's request and reads one line as its answer, retrying a silent
/// device up to its `retries`. A poll answer must carry every point: a point the line
/// lacks is a parse error.
async fn poll_line_device(
    port: &mut LinePort,
    spec: &ResolvedDevice,
    checksum: Checksum,
) -> Polled {
    let request = spec.request.as_deref().unwrap_or_default();
    let mut attempt = 0;
    let (readings, outcome, fault) = loop {
        let sent = Instant::now();
        let result = async {
            port.send(request).await?;
            port.next_line(sent + spec.timeout).await
        }
        .await;
        port.bus.stats.add_request(sent, &result);
        match result {
            Ok(Line::Text(text)) => match parse_line(spec, checksum, &text, now_ms()) {
                Ok(mut readings) => {
                    port.count(None);
                    for i in 0..spec.points.len() {
                        if !readings.iter().any(|(j, _)| *j == i) {
                            readings.push((i, spec.reading(i, None, Quality::Parse, now_ms())));
                        }
                    }
                    readings.sort_by_key(|(i, _)| *i);
                    break (readings, Outcome::Answered, None);
                }
                Err(why) => {
                    port.count(Some((why, &text)));
                    break (all_bad(spec, Quality::Parse), Outcome::Answered, None);
                }
            },
            Ok(Line::Garbage(why)) => {
                port.count(Some((why, "")));
                break (all_bad(spec, Quality::Parse), Outcome::Answered, None);
            }
            Err(e) if e.is_retryable() && attempt < spec.retries => attempt += 1,
            Err(e) => {
                let outcome = e.outcome();
                break (all_bad(spec, e.quality()), outcome, Some(e));
            }
        }
    };
    Polled {
        readings,
        outcome,
        fault,
    }
}

/// The poll-mode way of polling a device: write its request, read one line.
struct LinePoller<'a> {
    port: &'a mut LinePort,
    checksum: Checksum,
}

impl Poller for LinePoller<'_> {
    async fn poll(&mut self, run: &mut DeviceRun, _inbox: &mut Inbox) -> Polled {
        poll_line_device(self.port, &run.spec, self.checksum).await
    }
}

async fn run_poll(
    bus: &ResolvedBus,
    port: &mut LinePort,
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
) {
    let checksum = bus.config.checksum();
    run_polls(bus, &mut LinePoller { port, checksum }, tx, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::config::FieldConfig;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Line> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    #[test]
    fn lines_split_across_reads_and_crlf_is_stripped() {
        assert_eq!(
            split(16, &[b"T=2", b"1.5\r\nH=4", b"0\n\n", b"partial"]),
            vec![Line::Text("T=21.5".into()), Line::Text("H=40".into())]
        );
    }

    #[test]
    fn overlong_lines_are_garbage_and_never_buffered_whole() {
        let mut s = LineSplitter::new(8);
        let mut out = Vec::new();
        s.push(b"0123456789abcdef", &mut out);
        s.push(&[b'x'; 10_000], &mut out);
        assert!(
            s.buf.capacity() <= 4096,
            "overlong input is dropped as it comes"
        );
        s.push(b"\nok=1\n", &mut out);
        assert_eq!(
            out,
            vec![Line::Garbage("line too long"), Line::Text("ok=1".into())]
        );
        assert_eq!(split(4, &[b"abcd\r\n"]), vec![Line::Text("abcd".into())]);
        assert_eq!(
            split(4, &[b"abcde\n"]),
            vec![Line::Garbage("line too long")]
        );
        assert_eq!(
            split(8, &[b"\xff\xfe\n"]),
            vec![Line::Garbage("not UTF-8 text")]
        );
    }

    #[test]
    fn nmea_checksums() {
        let good = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
        assert_eq!(strip_nmea(good), Ok(&good[..good.len() - 3]));
        assert_eq!(
            strip_nmea(&good.replace("*47", "*48")),
            Err("NMEA checksum mismatch")
        );
        assert!(strip_nmea("GPGGA,1*47").is_err());
        assert!(strip_nmea("$GPGGA,1").is_err());
        assert!(strip_nmea("$GPGGA,1*zz").is_err());
    }

    #[test]
    fn a_signed_nmea_checksum_is_not_two_hex_digits() {
        // "AB" XORs to 0x03, which `from_str_radix` also reads from "+3".
        assert_eq!(strip_nmea("$AB*03"), Ok("$AB"));
        assert_eq!(strip_nmea("$AB*+3"), Err("bad NMEA checksum digits"));
        assert_eq!(strip_nmea("$AB*3"), Err("bad NMEA checksum digits"));
    }

    fn device(regex: Option<&str>, points: &str) -> ResolvedDevice {
        let regex_line = regex.map(|r| format!("regex = '{r}'")).unwrap_or_default();
        let text = format!(
            "[[bus]]\nname = \"l\"\nkind = \"lines\"\nport = \"/dev/null\"\n[[bus.device]]\nname = \"ws\"\n{regex_line}\n{points}"
        );
        let config: FieldConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.validate(), vec![]);
        super::super::resolve::resolve_buses(&config)[0].devices[0].clone()
    }

    #[test]
    fn regex_captures_become_typed_scaled_values() {
        let dev = device(
            Some(r"^T=(?P<t>-?[0-9.]+) H=(?P<h>[0-9]+)( S=(?P<s>\w+))?$"),
            "[[bus.device.point]]\nname = \"temp\"\nfield = \"t\"\n\
             [[bus.device.point]]\nname = \"hum\"\nfield = \"h\"\ntype = \"u16\"\nscale = 0.1\n\
             [[bus.device.point]]\nname = \"state\"\nfield = \"s\"\ntype = \"string\"\n",
        );
        let r = parse_line(&dev, Checksum::None, "T=-3.5 H=455", 7).unwrap();
        let values: Vec<_> = r.iter().map(|(i, r)| (*i, r.value.clone())).collect();
        assert_eq!(
            values,
            vec![(0, Some(Value::Float(-3.5))), (1, Some(Value::Float(45.5)))]
        );
        let r = parse_line(&dev, Checksum::None, "T=1 H=2 S=ok", 7).unwrap();
        assert_eq!(r[2].1.value, Some(Value::Text("ok".into())));
        assert_eq!(
            parse_line(&dev, Checksum::None, "garbage", 7).unwrap_err(),
            "does not match the regex"
        );
    }

    #[test]
    fn key_value_pairs_and_bad_numbers() {
        let dev = device(
            None,
            "[[bus.device.point]]\nname = \"temp\"\n[[bus.device.point]]\nname = \"door\"\ntype = \"bool\"\n",
        );
        let r = parse_line(&dev, Checksum::None, "temp=21.25, door=on;x=1", 7).unwrap();
        assert_eq!(r[0].1.value, Some(Value::Float(21.25)));
        assert_eq!(r[1].1.value, Some(Value::Bool(true)));
        let r = parse_line(&dev, Checksum::None, "temp=abc", 7).unwrap();
        assert_eq!(
            (r.len(), r[0].1.quality, r[0].1.value.clone()),
            (1, Quality::Parse, None)
        );
        assert!(parse_line(&dev, Checksum::None, "hello world", 7).is_err());
    }
}

//! `fieldbridge probe`: read a register range once and show every way to decode it, so the
//! right type and byte order can be picked by eye (or by an expected value) instead of by
//! trial and error, plus the TOML for the chosen decoding.
//!
//! Addresses in and out are 0-based protocol addresses, like the configuration's; the
//! 1-based "Modicon" number is shown beside them as a hint.

use std::fmt::Write as _;
use std::time::Duration;

use tokio_modbus::ExceptionCode;

use super::config::{Framing, Parity};
use super::decode::{ByteOrder, Codec, DataType, RegisterKind};
use super::link::{Endpoint, Link, ModbusLink, ReadError, Words};

/// What `fieldbridge probe` could not do.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `probe` was asked for more than one request can read.
    #[error("probe: count must be 1..={limit}")]
    ProbeCount { limit: u16 },
    /// `probe` was asked for a range that does not fit the address space.
    #[error("probe: the range runs past address 65535")]
    ProbeRange,
    /// The device answered the probe's read with an exception.
    #[error(
        "probe: unit {unit} answered exception {:#04x} for {} {address}..={last} (0-based protocol addresses; {} in 1-based notation){}",
        u8::from(*.code),
        .kind.name(),
        .kind.modicon(*.address),
        exception_hint(*.code)
    )]
    ProbeException {
        unit: u8,
        kind: RegisterKind,
        address: u16,
        last: u32,
        code: ExceptionCode,
    },
    /// The probe's read got no answer.
    #[error("probe: {endpoint}")]
    ProbeRead {
        endpoint: String,
        #[source]
        source: ReadError,
    },
}

/// Where and what to read.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTarget {
    pub transport: ProbeTransport,
    /// Modbus unit id (default 1 in the CLI).
    pub unit_id: u8,
    pub kind: RegisterKind,
    /// 0-based protocol address of the first register.
    pub address: u16,
    /// Registers (or bits) to read: 1..=125 (2000 for bits).
    pub count: u16,
    pub timeout: Duration,
    /// Pick the decoding whose value is closest to this.
    pub expect: Option<f64>,
    /// Or pick this type and order (at `address`).
    pub choose: Option<(DataType, ByteOrder)>,
}

/// How to reach the device.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeTransport {
    Tcp {
        host: String,
        port: u16,
        framing: Framing,
    },
    Rtu {
        port: String,
        baud: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
    },
}

/// Reads the range and renders the report.
///
/// # Errors
/// [`ProbeError::ProbeCount`] or [`ProbeError::ProbeRange`] for a range that cannot be read,
/// [`ProbeError::ProbeRead`] if the device cannot be reached or does not answer,
/// [`ProbeError::ProbeException`] if it refuses the read.
pub async fn probe(target: &ProbeTarget) -> Result<String, ProbeError> {
    let limit = if target.kind.is_bit() { 2000 } else { 125 };
    if target.count == 0 || target.count > limit {
        return Err(ProbeError::ProbeCount { limit });
    }
    if u32::from(target.address) + u32::from(target.count) - 1 > 65_535 {
        return Err(ProbeError::ProbeRange);
    }
    let (endpoint, silence) = match &target.transport {
        ProbeTransport::Tcp {
            host,
            port,
            framing,
        } => (
            Endpoint::Tcp {
                host: host.clone(),
                port: *port,
                framing: *framing,
                connect_timeout: target.timeout,
            },
            Duration::ZERO,
        ),
        ProbeTransport::Rtu {
            port,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => {
            let bits = 1
                + u32::from(*data_bits)
                + u32::from(*parity != Parity::None)
                + u32::from(*stop_bits);
            (
                Endpoint::Serial {
                    path: port.clone(),
                    baud: *baud,
                    parity: *parity,
                    data_bits: *data_bits,
                    stop_bits: *stop_bits,
                },
                super::config::inter_frame_default(*baud, bits),
            )
        }
    };
    let mut link = ModbusLink::new(endpoint.clone(), silence);
    let read = link
        .read(
            target.unit_id,
            target.kind,
            target.address,
            target.count,
            target.timeout,
        )
        .await;
    let words = match read {
        Ok(Ok(words)) => words,
        Ok(Err(code)) => {
            return Err(ProbeError::ProbeException {
                unit: target.unit_id,
                kind: target.kind,
                address: target.address,
                last: u32::from(target.address) + u32::from(target.count) - 1,
                code,
            })
        }
        Err(source) => {
            return Err(ProbeError::ProbeRead {
                endpoint: endpoint.to_string(),
                source,
            })
        }
    };
    Ok(render(target, &words))
}

/// What to add to an exception's message: 02 is most often a 1-based address.
pub(crate) fn exception_hint(code: ExceptionCode) -> &'static str {
    if u8::from(code) == 2 {
        ": illegal data address — if the manual says 4xxxx/3xxxx, subtract 40001/30001"
    } else {
        ""
    }
}

/// The report for words already read (separate from I/O so it can be tested): the
/// range, a table of the words, and the TOML for one decoding of them.
pub fn render(target: &ProbeTarget, words: &Words) -> String {
    let mut out = String::new();
    write_header(&mut out, target);
    match words {
        Words::Bits(bits) => write_bits(&mut out, target, bits),
        Words::Registers(regs) => write_registers(&mut out, target, regs),
    }
    out
}

/// The range read, in both address conventions.
fn write_header(out: &mut String, target: &ProbeTarget) {
    let last = u32::from(target.address) + u32::from(target.count) - 1;
    let _ = writeln!(
        out,
        "unit {}, {} {}..={} (0-based protocol addresses, as in the config; {}..={} in 1-based notation)",
        target.unit_id,
        target.kind.name(),
        target.address,
        last,
        target.kind.modicon(target.address),
        target.kind.modicon(u16::try_from(last).unwrap_or(u16::MAX)),
    );
}

/// Coils and discrete inputs: one bit per line and a `bool` snippet.
fn write_bits(out: &mut String, target: &ProbeTarget, bits: &[bool]) {
    out.push_str("\naddress  value\n");
    for (i, b) in bits.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<8} {}",
            u32::from(target.address) + i as u32,
            u8::from(*b)
        );
    }
    let snippet = snippet(
        target.kind,
        target.address,
        DataType::Bool,
        ByteOrder::ABCD,
        1,
    );
    let _ = write!(out, "\n{snippet}");
}

/// Registers: every decoding, then the snippet of the chosen (or closest) one.
fn write_registers(out: &mut String, target: &ProbeTarget, regs: &[u16]) {
    write_words(out, target, regs);
    let mut best = Best::default();
    write_wide_decodings(out, target, regs, &mut best);
    if let Some(expect) = target.expect {
        offer_single_registers(target, regs, expect, &mut best);
    }
    if regs.len() >= 2 {
        let _ = writeln!(
            out,
            "\nstring ({} registers)  ABCD: {:?}  BADC: {:?}",
            regs.len(),
            string_of(regs, ByteOrder::ABCD),
            string_of(regs, ByteOrder::BADC)
        );
    }
    out.push('\n');
    let (t, order, address) = choose(out, target, regs, best);
    let width = if t == DataType::String {
        regs.len() as u16
    } else {
        1
    };
    out.push_str(&snippet(target.kind, address, t, order, width));
}

/// One register per line: hex, u16, i16 and its two bytes as ASCII.
fn write_words(out: &mut String, target: &ProbeTarget, regs: &[u16]) {
    out.push_str("\naddress  hex     u16     i16     ascii\n");
    for (i, w) in regs.iter().enumerate() {
        let ascii: String = w
            .to_be_bytes()
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    char::from(*b)
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<8} {:#06x}  {:<7} {:<7} {ascii}",
            u32::from(target.address) + i as u32,
            w,
            w,
            *w as i16,
        );
    }
}

/// A table per 32- and 64-bit type: each start address × each byte order. Every value
/// is offered to `best` when an expected value was given.
fn write_wide_decodings(out: &mut String, target: &ProbeTarget, regs: &[u16], best: &mut Best) {
    for (t, width) in [
        (DataType::F32, 2),
        (DataType::U32, 2),
        (DataType::I32, 2),
        (DataType::F64, 4),
        (DataType::U64, 4),
        (DataType::I64, 4),
    ] {
        if regs.len() < width {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{:<4} at    ABCD                  BADC                  CDAB                  DCBA",
            t.name()
        );
        for start in 0..=regs.len() - width {
            let address = target.address + start as u16;
            let _ = write!(out, "{:<9} ", address);
            for order in ByteOrder::ALL {
                let value = Codec::new(t, order).decode_registers(&regs[start..]);
                let text = match &value {
                    Ok(v) => v.to_string(),
                    Err(_) => "-".into(),
                };
                let _ = write!(out, "{text:<21} ");
                if let (Some(expect), Ok(v)) = (target.expect, &value) {
                    if let Some(x) = v.as_f64() {
                        best.offer(relative_error(x, expect), t, order, address);
                    }
                }
            }
            out.push('\n');
        }
    }
}

/// Offers every register as u16 and as i16 (after the wide types, so a tie keeps them).
fn offer_single_registers(target: &ProbeTarget, regs: &[u16], expect: f64, best: &mut Best) {
    for (start, w) in regs.iter().enumerate() {
        let address = target.address + start as u16;
        for (t, v) in [
            (DataType::U16, f64::from(*w)),
            (DataType::I16, f64::from(*w as i16)),
        ] {
            best.offer(relative_error(v, expect), t, ByteOrder::ABCD, address);
        }
    }
}

/// The decoding to show as TOML: the one asked for, else the closest to the expected
/// value (said so in the report), else the first row with a hint to choose.
fn choose(
    out: &mut String,
    target: &ProbeTarget,
    regs: &[u16],
    best: Best,
) -> (DataType, ByteOrder, u16) {
    match (target.choose, best.0, target.expect) {
        (Some((t, order)), _, _) => (t, order, target.address),
        (None, Some(c), Some(expect)) => {
            let _ = writeln!(
                out,
                "closest to {expect}: {} {} at {} (off by {:.3}%)",
                c.data_type.name(),
                c.order.name(),
                c.address,
                c.error * 100.0
            );
            (c.data_type, c.order, c.address)
        }
        _ => {
            out.push_str("# pass an expected value (or a type and order) to choose; the first row is shown\n");
            let t = if regs.len() >= 2 {
                DataType::F32
            } else {
                DataType::U16
            };
            (t, ByteOrder::ABCD, target.address)
        }
    }
}

fn relative_error(value: f64, expect: f64) -> f64 {
    (value - expect).abs() / expect.abs().max(1e-9)
}

/// A decoding of the words and how far it is from the expected value.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    error: f64,
    data_type: DataType,
    order: ByteOrder,
    address: u16,
}

/// The closest decoding so far; the first of equally close ones wins.
#[derive(Debug, Default)]
struct Best(Option<Candidate>);

impl Best {
    fn offer(&mut self, error: f64, data_type: DataType, order: ByteOrder, address: u16) {
        if self.0.as_ref().map_or(true, |best| error < best.error) {
            self.0 = Some(Candidate {
                error,
                data_type,
                order,
                address,
            });
        }
    }
}

fn string_of(regs: &[u16], order: ByteOrder) -> String {
    let mut c = Codec::new(DataType::String, order);
    c.string_registers = u16::try_from(regs.len()).unwrap_or(u16::MAX);
    c.decode_registers(regs)
        .map(|v| v.to_string().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn snippet(
    kind: RegisterKind,
    address: u16,
    t: DataType,
    order: ByteOrder,
    string_registers: u16,
) -> String {
    let mut s = format!(
        "[[bus.device.point]]\nname = \"value\"\nkind = \"{}\"\naddress = {address}  # 0-based protocol address ({} in 1-based notation)\ntype = \"{}\"\n",
        kind.name(),
        kind.modicon(address),
        t.name(),
    );
    if matches!(
        t,
        DataType::U32
            | DataType::I32
            | DataType::F32
            | DataType::U64
            | DataType::I64
            | DataType::F64
    ) || order != ByteOrder::ABCD
    {
        let _ = writeln!(s, "order = \"{}\"", order.name());
    }
    if t == DataType::String {
        let _ = writeln!(s, "registers = {string_registers}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> ProbeTarget {
        ProbeTarget {
            transport: ProbeTransport::Tcp {
                host: "127.0.0.1".into(),
                port: 502,
                framing: Framing::Tcp,
            },
            unit_id: 1,
            kind: RegisterKind::Holding,
            address: 100,
            count: 4,
            timeout: Duration::from_secs(1),
            expect: Some(123.456),
            choose: None,
        }
    }

    #[test]
    fn the_expected_value_picks_type_order_and_address() {
        // f32 123.456 word-swapped at 101, between two unrelated registers.
        let words = Words::Registers(vec![7, 0xE979, 0x42F6, 9]);
        let report = render(&target(), &words);
        assert!(
            report.contains("closest to 123.456: f32 CDAB at 101"),
            "{report}"
        );
        assert!(
            report
                .contains("address = 101  # 0-based protocol address (40102 in 1-based notation)"),
            "{report}"
        );
        assert!(report.contains("order = \"CDAB\""), "{report}");
        assert!(
            report.contains("40101..=40104 in 1-based notation"),
            "{report}"
        );
    }

    #[test]
    fn a_chosen_decoding_gives_its_snippet_and_bits_print_as_bits() {
        let mut t = target();
        t.expect = None;
        t.choose = Some((DataType::I16, ByteOrder::ABCD));
        let report = render(&t, &Words::Registers(vec![0xFFFF, 1, 2, 3]));
        assert!(report.contains("type = \"i16\""), "{report}");
        assert!(!report.contains("order ="), "{report}");
        t.kind = RegisterKind::Coil;
        t.count = 2;
        let report = render(&t, &Words::Bits(vec![true, false]));
        assert!(report.contains("100      1\n101      0"), "{report}");
        assert!(report.contains("type = \"bool\""), "{report}");
    }
}

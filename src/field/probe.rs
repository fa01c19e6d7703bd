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
use super::decode::{ByteOrder, Codec, DataType, DecodeError, RegisterKind};
use super::link::{Endpoint, Link, ModbusLink, ReadError, Words};
use super::reading::Value;

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
        "probe: unit {unit} answered exception {:#04x} for {} {address}..={last} (0-based protocol addresses{}){}",
        u8::from(*.code),
        .kind.name(),
        one_based(*.kind, *.address, *.last),
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

/// Reads the range twice (the second read tells a stable value from noise) and renders
/// the report.
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
    let first = read_once(&mut link, target, &endpoint).await?;
    // A failed second read only costs the stability check.
    let second = read_once(&mut link, target, &endpoint).await.ok();
    Ok(render(target, &first, second.as_ref()))
}

async fn read_once(
    link: &mut ModbusLink,
    target: &ProbeTarget,
    endpoint: &Endpoint,
) -> Result<Words, ProbeError> {
    let read = link
        .read(
            target.unit_id,
            target.kind,
            target.address,
            target.count,
            target.timeout,
        )
        .await;
    match read {
        Ok(Ok(words)) => Ok(words),
        Ok(Err(code)) => Err(ProbeError::ProbeException {
            unit: target.unit_id,
            kind: target.kind,
            address: target.address,
            last: u32::from(target.address) + u32::from(target.count) - 1,
            code,
        }),
        Err(source) => Err(ProbeError::ProbeRead {
            endpoint: endpoint.to_string(),
            source,
        }),
    }
}

/// What to add to an exception's message: 02 is most often a 1-based address.
pub(crate) fn exception_hint(code: ExceptionCode) -> &'static str {
    if u8::from(code) == 2 {
        ": illegal data address — if the manual says 4xxxx/3xxxx, subtract 40001/30001"
    } else {
        ""
    }
}

/// `"; 40001..=40004 in 1-based notation"` for a range the 5-digit notation can write
/// (addresses below 9999), nothing otherwise: `440012` reads as a typo, not a hint.
fn one_based(kind: RegisterKind, first: u16, last: u32) -> String {
    match u16::try_from(last) {
        Ok(last) if last < 9999 && first == last => {
            format!("; {} in 1-based notation", kind.modicon(first))
        }
        Ok(last) if last < 9999 => format!(
            "; {}..={} in 1-based notation",
            kind.modicon(first),
            kind.modicon(last)
        ),
        _ => String::new(),
    }
}

/// The 0-based address a manual's 1-based number stands for, when `address` looks like
/// one (holding 40001..=49999, input 30001..=39999, discrete 10001..=19999).
fn looks_one_based(kind: RegisterKind, address: u16) -> Option<u16> {
    let base = match kind {
        RegisterKind::Holding => 40_001,
        RegisterKind::Input => 30_001,
        RegisterKind::Discrete => 10_001,
        RegisterKind::Coil => return None,
    };
    (base..base + 9999)
        .contains(&address)
        .then(|| address - base)
}

/// The report for words already read (separate from I/O so it can be tested): the
/// range, a table of the words, and the TOML for one decoding of them. `again` is a
/// second read of the same range, when there is one.
pub fn render(target: &ProbeTarget, words: &Words, again: Option<&Words>) -> String {
    let mut out = String::new();
    write_header(&mut out, target);
    match (words, again) {
        (Words::Bits(bits), _) => write_bits(&mut out, target, bits),
        (Words::Registers(regs), Some(Words::Registers(again))) => {
            write_registers(&mut out, target, regs, Some(again))
        }
        (Words::Registers(regs), _) => write_registers(&mut out, target, regs, None),
    }
    out
}

/// The range read, in both address conventions.
fn write_header(out: &mut String, target: &ProbeTarget) {
    let last = u32::from(target.address) + u32::from(target.count) - 1;
    let _ = writeln!(
        out,
        "unit {}, {} {}..={} (0-based protocol addresses, as in the config{})",
        target.unit_id,
        target.kind.name(),
        target.address,
        last,
        one_based(target.kind, target.address, last),
    );
    if let Some(address) = looks_one_based(target.kind, target.address) {
        let _ = writeln!(
            out,
            "note: {} looks like a manual's 1-based register number; its protocol address is {address} (--address {address})",
            target.address
        );
    }
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
    let choice = Candidate::plain(DataType::Bool, ByteOrder::ABCD, target.address);
    let _ = write!(out, "\n{}", snippet(target.kind, &choice, 1));
}

/// Registers: every decoding, then the snippet of the chosen (or best) one.
fn write_registers(out: &mut String, target: &ProbeTarget, regs: &[u16], again: Option<&[u16]>) {
    write_words(out, target, regs);
    let mut pick = Pick::new(target.expect, again.is_some());
    write_wide_decodings(out, target, regs, again, &mut pick);
    offer_single_registers(target, regs, again, &mut pick);
    if pick.marked {
        out.push_str("(? = implausible: NaN, infinite, beyond ±1e12 or subnormal)\n");
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
    let choice = if target.expect.is_none()
        && target.choose.is_none()
        && regs.iter().all(|w| *w == 0)
    {
        out.push_str("# every register reads 0: no decoding can be told from another; pass --expect VALUE, or --type and --order\n");
        Candidate::plain(DataType::U16, ByteOrder::ABCD, target.address)
    } else {
        choose(out, target, pick)
    };
    let width = if choice.data_type == DataType::String {
        regs.len() as u16
    } else {
        1
    };
    out.push_str(&snippet(target.kind, &choice, width));
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

/// A table per 32- and 64-bit type: each start address × each byte order, floats in
/// compact form and implausible values marked. Every value is offered to `pick`.
fn write_wide_decodings(
    out: &mut String,
    target: &ProbeTarget,
    regs: &[u16],
    again: Option<&[u16]>,
    pick: &mut Pick,
) {
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
            let _ = write!(out, "{address:<9} ");
            for order in ByteOrder::ALL {
                let decoding = Decoding::of(t, order, &regs[start..]);
                let text = decoding.text();
                pick.marked |= decoding.implausible();
                let _ = write!(out, "{text:<21} ");
                let repeat = again.map(|a| Decoding::of(t, order, &a[start..]).value);
                pick.offer(
                    &decoding,
                    repeat,
                    Candidate::plain(t, order, address),
                    width == regs.len(),
                );
            }
            out.push('\n');
        }
    }
}

/// Offers every register as u16 and as i16 (after the wide types, so that a tie keeps
/// them).
fn offer_single_registers(
    target: &ProbeTarget,
    regs: &[u16],
    again: Option<&[u16]>,
    pick: &mut Pick,
) {
    for start in 0..regs.len() {
        let address = target.address + start as u16;
        for t in [DataType::U16, DataType::I16] {
            let decoding = Decoding::of(t, ByteOrder::ABCD, &regs[start..]);
            let repeat = again.map(|a| Decoding::of(t, ByteOrder::ABCD, &a[start..]).value);
            pick.offer(
                &decoding,
                repeat,
                Candidate::plain(t, ByteOrder::ABCD, address),
                regs.len() == 1,
            );
        }
    }
}

/// The decoding to show as TOML: the one asked for, else the closest to the expected
/// value at one of the common scales, else the most plausible one (each said so).
fn choose(out: &mut String, target: &ProbeTarget, pick: Pick) -> Candidate {
    if let Some((t, order)) = target.choose {
        return Candidate::plain(t, order, target.address);
    }
    match (pick.best, target.expect) {
        (Some((c, error)), Some(expect)) => {
            let scale = if c.scale == 1.0 {
                String::new()
            } else {
                format!(" with scale = {}", c.scale)
            };
            let _ = writeln!(
                out,
                "closest to {expect}: {} {} at {}{scale} (off by {:.3}%)",
                c.data_type.name(),
                c.order.name(),
                c.address,
                error * 100.0
            );
            c
        }
        (Some((c, _)), None) => {
            let _ = writeln!(
                out,
                "most plausible: {} {} at {} = {} (finite, human-sized{})\n# to be sure, pass --expect VALUE (what the display shows)",
                c.data_type.name(),
                c.order.name(),
                c.address,
                c.shown,
                if pick.stability_known {
                    ", stable across two reads"
                } else {
                    ""
                }
            );
            c
        }
        (None, _) => {
            out.push_str(
                "# no decoding looks plausible; pass --expect VALUE, or --type and --order\n",
            );
            Candidate::plain(DataType::U16, ByteOrder::ABCD, target.address)
        }
    }
}

/// Most values a human reads off a display are within this range.
const HUMAN_SIZED: std::ops::RangeInclusive<f64> = 1e-3..=1e6;
/// Beyond this a value is taken for a decoding of the wrong words.
const IMPLAUSIBLE_ABOVE: f64 = 1e12;
/// The scales tried against an expected value, `scale = 1` first so that it wins ties.
const SCALES: [f64; 7] = [1.0, 0.1, 0.01, 0.001, 10.0, 100.0, 1000.0];

/// One type and order applied to words.
struct Decoding {
    data_type: DataType,
    /// The number, if the words decode to one (NaN and infinities are kept, marked).
    value: Option<f64>,
    /// The integer text of an integer type (exact beyond 2^53).
    integer: Option<String>,
}

impl Decoding {
    fn of(t: DataType, order: ByteOrder, regs: &[u16]) -> Decoding {
        match Codec::new(t, order).decode_registers(regs) {
            Ok(Value::Float(x)) => Decoding {
                data_type: t,
                value: Some(x),
                integer: None,
            },
            Ok(v @ (Value::UInt(_) | Value::Int(_))) => Decoding {
                data_type: t,
                value: v.as_f64(),
                integer: Some(v.to_string()),
            },
            Ok(_) => Decoding {
                data_type: t,
                value: None,
                integer: None,
            },
            Err(DecodeError::NotFinite) => Decoding {
                data_type: t,
                value: not_finite(t, order, regs),
                integer: None,
            },
            Err(_) => Decoding {
                data_type: t,
                value: None,
                integer: None,
            },
        }
    }

    /// NaN, infinite, beyond ±1e12, or a subnormal float (of its own width).
    fn implausible(&self) -> bool {
        let Some(x) = self.value else {
            return false;
        };
        let smallest = match self.data_type {
            DataType::F32 => f64::from(f32::MIN_POSITIVE),
            DataType::F64 => f64::MIN_POSITIVE,
            _ => 0.0,
        };
        !x.is_finite() || x.abs() > IMPLAUSIBLE_ABOVE || (x != 0.0 && x.abs() < smallest)
    }

    /// The table cell: integers in full, floats compact, a `?` after the implausible.
    fn text(&self) -> String {
        let text = match (&self.integer, self.value) {
            (Some(integer), _) => integer.clone(),
            (None, Some(x)) => compact(x),
            (None, None) => return "-".into(),
        };
        if self.implausible() {
            format!("{text}?")
        } else {
            text
        }
    }
}

/// The NaN or infinity that f32/f64 words hold (the decoder refuses them).
fn not_finite(t: DataType, order: ByteOrder, regs: &[u16]) -> Option<f64> {
    let bits = |t| match Codec::new(t, order).decode_registers(regs) {
        Ok(Value::UInt(bits)) => Some(bits),
        _ => None,
    };
    match t {
        DataType::F32 => bits(DataType::U32)
            .and_then(|b| u32::try_from(b).ok())
            .map(|b| f64::from(f32::from_bits(b))),
        DataType::F64 => bits(DataType::U64).map(f64::from_bits),
        _ => None,
    }
}

/// A float in at most 6 significant digits: `123.456`, `0.5`, `-1.88e25`, `3.1e-7`.
pub(crate) fn compact(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if !x.is_finite() {
        return x.to_string();
    }
    let magnitude = x.abs().log10().floor();
    if (-3.0..7.0).contains(&magnitude) {
        let decimals = (5.0 - magnitude).max(0.0) as usize;
        let text = format!("{x:.decimals$}");
        let text = if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.')
        } else {
            &text
        };
        return text.to_string();
    }
    let text = format!("{x:.2e}");
    // `1.50e7` → `1.5e7`, `2.00e-9` → `2e-9`.
    match text.split_once('e') {
        Some((mantissa, exponent)) => {
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            format!("{mantissa}e{exponent}")
        }
        None => text,
    }
}

/// A decoding that could go into the snippet.
#[derive(Debug, Clone)]
struct Candidate {
    data_type: DataType,
    order: ByteOrder,
    address: u16,
    scale: f64,
    /// The value as the table shows it.
    shown: String,
}

impl Candidate {
    fn plain(data_type: DataType, order: ByteOrder, address: u16) -> Candidate {
        Candidate {
            data_type,
            order,
            address,
            scale: 1.0,
            shown: String::new(),
        }
    }
}

/// The best decoding so far: with an expected value the closest (over the common
/// scales), without one the most plausible. The first of equally good ones wins.
struct Pick {
    expect: Option<f64>,
    /// Whether a second read was there to judge stability by.
    stability_known: bool,
    /// `(candidate, relative error or minus the plausibility score)`: lower is better.
    best: Option<(Candidate, f64)>,
    /// Some value was marked implausible (the table needs its legend).
    marked: bool,
}

impl Pick {
    fn new(expect: Option<f64>, stability_known: bool) -> Pick {
        Pick {
            expect,
            stability_known,
            best: None,
            marked: false,
        }
    }

    /// Offers a decoding; `again` is its value in the second read, `full_width` whether
    /// it spans every register read (what one usually reads for one value).
    fn offer(
        &mut self,
        decoding: &Decoding,
        again: Option<Option<f64>>,
        mut candidate: Candidate,
        full_width: bool,
    ) {
        let Some(x) = decoding.value else {
            return;
        };
        if decoding.implausible() {
            return;
        }
        candidate.shown = decoding.text();
        match self.expect {
            Some(expect) => {
                for scale in SCALES {
                    let error = relative_error(x * scale, expect);
                    let mut scaled = candidate.clone();
                    scaled.scale = scale;
                    self.keep(scaled, error);
                }
            }
            None => {
                let score = plausibility(decoding, x, again.map(|v| v.unwrap_or(f64::NAN)));
                self.keep(candidate, -(score + f64::from(u8::from(full_width))));
            }
        }
    }

    fn keep(&mut self, candidate: Candidate, rank: f64) {
        if self.best.as_ref().map_or(true, |(_, best)| rank < *best) {
            self.best = Some((candidate, rank));
        }
    }
}

/// How much a value looks like a real reading: human-sized (+2), stable across two
/// reads (+2), and for floats a short decimal form (+2): a float decoded from the
/// wrong words has an extreme exponent or a long tail of digits.
fn plausibility(decoding: &Decoding, x: f64, again: Option<f64>) -> f64 {
    let mut score = 0.0;
    if HUMAN_SIZED.contains(&x.abs()) {
        score += 2.0;
    }
    let stable = again.is_some_and(|y| (x - y).abs() <= 0.01 * x.abs().max(y.abs()));
    if stable {
        score += 2.0;
    }
    if matches!(decoding.data_type, DataType::F32 | DataType::F64) && x != 0.0 && short_decimal(x) {
        score += 2.0;
    }
    score
}

/// At most 6 significant digits written out: `123.456`, `0.25`, `1013.2`.
fn short_decimal(x: f64) -> bool {
    let text = format!("{}", x as f32);
    let digits = text
        .trim_start_matches('-')
        .trim_start_matches(['0', '.'])
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    !text.contains('e') && digits <= 6
}

fn relative_error(value: f64, expect: f64) -> f64 {
    (value - expect).abs() / expect.abs().max(1e-9)
}

fn string_of(regs: &[u16], order: ByteOrder) -> String {
    let mut c = Codec::new(DataType::String, order);
    c.string_registers = u16::try_from(regs.len()).unwrap_or(u16::MAX);
    c.decode_registers(regs)
        .map(|v| v.to_string().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn snippet(kind: RegisterKind, choice: &Candidate, string_registers: u16) -> String {
    let (t, order, address) = (choice.data_type, choice.order, choice.address);
    let one_based = if address < 9999 {
        format!(" ({} in 1-based notation)", kind.modicon(address))
    } else {
        String::new()
    };
    let mut s = format!(
        "[[bus.device.point]]\nname = \"value\"\nkind = \"{}\"\naddress = {address}  # 0-based protocol address{one_based}\ntype = \"{}\"\n",
        kind.name(),
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
    if choice.scale != 1.0 {
        let _ = writeln!(s, "scale = {}", choice.scale);
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
        let report = render(&target(), &words, None);
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
        let report = render(&t, &Words::Registers(vec![0xFFFF, 1, 2, 3]), None);
        assert!(report.contains("type = \"i16\""), "{report}");
        assert!(!report.contains("order ="), "{report}");
        t.kind = RegisterKind::Coil;
        t.count = 2;
        let report = render(&t, &Words::Bits(vec![true, false]), None);
        assert!(report.contains("100      1\n101      0"), "{report}");
        assert!(report.contains("type = \"bool\""), "{report}");
    }

    #[test]
    fn floats_print_compact_and_implausible_values_are_marked() {
        assert_eq!(compact(123.456), "123.456");
        assert_eq!(compact(-1.8848e25), "-1.88e25");
        assert_eq!(compact(0.5), "0.5");
        assert_eq!(compact(230.10000000000002), "230.1");
        assert_eq!(compact(3.1e-7), "3.1e-7");
        assert_eq!(compact(15_000_000.0), "1.5e7");
        assert_eq!(compact(0.0), "0");
        // f32 ABCD of E979 42F6 is -1.88e25; a NaN and a subnormal are marked too.
        let mut t = target();
        t.expect = None;
        t.count = 2;
        let report = render(&t, &Words::Registers(vec![0xE979, 0x42F6]), None);
        assert!(report.contains("-1.88e25? "), "{report}");
        assert!(report.contains("? = implausible"), "{report}");
        let report = render(&t, &Words::Registers(vec![0x7FC0, 0x0000]), None);
        assert!(report.contains("NaN?"), "{report}");
        let report = render(&t, &Words::Registers(vec![0x0000, 0x0001]), None);
        assert!(report.contains("1e-45?"), "{report}");
    }

    #[test]
    fn without_an_expected_value_the_most_plausible_decoding_is_proposed() {
        let mut t = target();
        t.expect = None;
        t.count = 2;
        t.address = 10;
        let words = Words::Registers(vec![0xE979, 0x42F6]);
        let report = render(&t, &words, Some(&words));
        assert!(
            report.contains("most plausible: f32 CDAB at 10 = 123.456 (finite, human-sized, stable across two reads)"),
            "{report}"
        );
        assert!(
            report.contains("type = \"f32\"\norder = \"CDAB\""),
            "{report}"
        );

        // Noise in the low word: the word order that keeps the value steady wins.
        let first = Words::Registers(vec![0x4120, 0x1234]);
        let second = Words::Registers(vec![0x4120, 0x9876]);
        let report = render(&t, &first, Some(&second));
        assert!(
            report.contains("most plausible: f32 ABCD at 10"),
            "{report}"
        );

        // Nothing but zeros: nothing to judge by, and said so.
        let zeros = Words::Registers(vec![0, 0]);
        let report = render(&t, &zeros, Some(&zeros));
        assert!(report.contains("every register reads 0"), "{report}");
        assert!(!report.contains("most plausible"), "{report}");

        // One register: a plain u16.
        t.count = 1;
        let report = render(&t, &Words::Registers(vec![215]), None);
        assert!(
            report.contains("most plausible: u16 ABCD at 10 = 215"),
            "{report}"
        );
    }

    #[test]
    fn an_expected_value_is_matched_at_the_common_scales() {
        let mut t = target();
        t.count = 1;
        t.expect = Some(21.5);
        let report = render(&t, &Words::Registers(vec![215]), None);
        assert!(
            report.contains("closest to 21.5: u16 ABCD at 100 with scale = 0.1 (off by 0.000%)"),
            "{report}"
        );
        assert!(report.contains("type = \"u16\"\nscale = 0.1\n"), "{report}");
        t.expect = Some(2150.0);
        let report = render(&t, &Words::Registers(vec![215]), None);
        assert!(report.contains("scale = 10\n"), "{report}");
        // An exact match keeps scale 1.
        t.expect = Some(215.0);
        let report = render(&t, &Words::Registers(vec![215]), None);
        assert!(!report.contains("scale ="), "{report}");
    }

    /// Regression: `--address 40011` printed `440012 in 1-based notation`.
    #[test]
    fn an_address_that_looks_one_based_gets_a_note_not_a_six_digit_number() {
        let mut t = target();
        t.address = 40_011;
        t.count = 1;
        t.expect = None;
        let report = render(&t, &Words::Registers(vec![1]), None);
        assert!(!report.contains("440012"), "{report}");
        assert!(
            report.contains("note: 40011 looks like a manual's 1-based register number; its protocol address is 10 (--address 10)"),
            "{report}"
        );
        assert!(
            report.contains("address = 40011  # 0-based protocol address\n"),
            "{report}"
        );
    }
}

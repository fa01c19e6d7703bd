//! The recent past of every configured point, in memory: its last reading (value,
//! quality, time), how many readings it published, and a short trend of its last
//! values, for the status page and the `fieldbridge_readings_total` metric.
//!
//! Invariants:
//! - Bounded by the configuration, not by traffic: one entry per configured point, made
//!   when the buses are configured ([`Recent::configure`], at start and at each reload
//!   of the device maps); a reading of a point without an entry is ignored. Each entry's
//!   trend is a fixed ring of [`TREND_LEN`] `f32` values (128 bytes); an entry is at
//!   most 256 bytes with it (a test holds this), plus its name twice (entry and index)
//!   and its unit: 10 devices × 50 points take well under 200 KiB.
//! - Nothing is written to disk: a restart starts every trend and count over.
//! - Recording a reading takes one short lock and two lookups by name; it allocates
//!   nothing (a text value's last copy is the only clone), so the pipeline never waits
//!   on a page being rendered for long.
//! - A reload keeps the entries of points that stay (same device and point names) and
//!   drops the others.
//! - Counts and trends are of what the pipeline received: readings after deadband
//!   filtering, bad-quality readings included (they carry no value and add nothing to
//!   the trend).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::field::{Quality, Reading, ResolvedBus, Value};

/// Values kept per point for its trend.
pub const TREND_LEN: usize = 32;
const _: () = assert!(TREND_LEN <= u8::MAX as usize, "the ring's indices are u8");

/// The last [`TREND_LEN`] values of a point, oldest overwritten first.
#[derive(Debug, Clone)]
struct Trend {
    values: [f32; TREND_LEN],
    /// Values held, at most `TREND_LEN` (which fits a `u8`).
    len: u8,
    /// Where the next value goes.
    next: u8,
}

impl Default for Trend {
    fn default() -> Trend {
        Trend {
            values: [0.0; TREND_LEN],
            len: 0,
            next: 0,
        }
    }
}

impl Trend {
    fn push(&mut self, value: f32) {
        let next = usize::from(self.next);
        self.values[next] = value;
        self.next = ((next + 1) % TREND_LEN) as u8;
        self.len = (usize::from(self.len) + 1).min(TREND_LEN) as u8;
    }

    /// Oldest first.
    fn to_vec(&self) -> Vec<f32> {
        let len = usize::from(self.len);
        let start = (usize::from(self.next) + TREND_LEN - len) % TREND_LEN;
        (0..len)
            .map(|i| self.values[(start + i) % TREND_LEN])
            .collect()
    }
}

/// One point's recent past.
#[derive(Debug, Clone)]
struct PointLog {
    name: String,
    unit: Option<String>,
    kind: &'static str,
    last: Option<(Option<Value>, Quality, i64)>,
    readings: u64,
    bad: u64,
    trend: Trend,
}

/// One device's points, in configuration order.
#[derive(Debug, Clone, Default)]
struct DeviceLog {
    points: Vec<PointLog>,
    index: HashMap<String, usize>,
    /// The last bad reading of any of its points: quality and time.
    last_bad: Option<(Quality, i64)>,
}

/// A point as the status page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PointView {
    pub name: String,
    pub unit: Option<String>,
    /// `holding`, `input`, `coil`, `discrete`, or `line` for a lines point.
    pub kind: &'static str,
    /// The last reading's value (`None` before the first reading or when it was bad).
    pub value: Option<Value>,
    pub quality: Option<Quality>,
    pub ts_ms: Option<i64>,
    pub readings: u64,
    pub bad: u64,
    /// Oldest first, at most [`TREND_LEN`].
    pub trend: Vec<f32>,
}

/// A device's points and its last bad reading.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceView {
    pub points: Vec<PointView>,
    pub last_bad: Option<(Quality, i64)>,
}

/// The recent past of every configured point, by device name (names are unique
/// across buses).
#[derive(Debug, Default)]
pub struct Recent {
    devices: Mutex<HashMap<String, DeviceLog>>,
}

impl Recent {
    /// Makes an entry for every point of `buses`, keeping those of points that stay
    /// and dropping the rest.
    pub fn configure(&self, buses: &[ResolvedBus]) {
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        let mut next = HashMap::new();
        for bus in buses {
            for device in bus.devices.iter() {
                let old = devices.remove(&device.name).unwrap_or_default();
                let mut log = DeviceLog {
                    last_bad: old.last_bad,
                    ..DeviceLog::default()
                };
                for point in &device.points {
                    let kind = point.span.map_or("line", |span| span.kind.name());
                    let kept = old.index.get(&point.name).map(|&i| old.points[i].clone());
                    let mut entry = kept.unwrap_or_else(|| PointLog {
                        name: point.name.clone(),
                        unit: None,
                        kind,
                        last: None,
                        readings: 0,
                        bad: 0,
                        trend: Trend::default(),
                    });
                    entry.unit.clone_from(&point.unit);
                    entry.kind = kind;
                    log.index.insert(point.name.clone(), log.points.len());
                    log.points.push(entry);
                }
                next.insert(device.name.clone(), log);
            }
        }
        *devices = next;
    }

    /// Notes `reading` for its point (ignored when the point has no entry).
    pub fn record(&self, reading: &Reading) {
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        let Some(device) = devices.get_mut(reading.device.as_str()) else {
            return;
        };
        let Some(&i) = device.index.get(reading.point.as_str()) else {
            return;
        };
        let point = &mut device.points[i];
        point.readings += 1;
        if !reading.quality.is_good() {
            point.bad += 1;
            device.last_bad = Some((reading.quality, reading.ts_ms));
        }
        if let Some(number) = reading.value.as_ref().and_then(Value::as_f64) {
            point.trend.push(number as f32);
        }
        point.last = Some((reading.value.clone(), reading.quality, reading.ts_ms));
    }

    /// `device`'s points now (`None` when it is not configured).
    pub fn device(&self, device: &str) -> Option<DeviceView> {
        let devices = self.devices.lock().ok()?;
        let log = devices.get(device)?;
        Some(DeviceView {
            last_bad: log.last_bad,
            points: log
                .points
                .iter()
                .map(|p| {
                    let (value, quality, ts_ms) = match &p.last {
                        Some((value, quality, ts)) => (value.clone(), Some(*quality), Some(*ts)),
                        None => (None, None, None),
                    };
                    PointView {
                        name: p.name.clone(),
                        unit: p.unit.clone(),
                        kind: p.kind,
                        value,
                        quality,
                        ts_ms,
                        readings: p.readings,
                        bad: p.bad,
                        trend: p.trend.to_vec(),
                    }
                })
                .collect(),
        })
    }

    /// Readings of `device` by point kind, kinds in first-configured order.
    pub fn readings_by_kind(&self, device: &str) -> Vec<(&'static str, u64)> {
        let Ok(devices) = self.devices.lock() else {
            return Vec::new();
        };
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for point in devices.get(device).map_or(&[][..], |d| &d.points) {
            match out.iter_mut().find(|(kind, _)| *kind == point.kind) {
                Some((_, count)) => *count += point.readings,
                None => out.push((point.kind, point.readings)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::TimeMark;

    fn buses(points: &str) -> Vec<ResolvedBus> {
        let file = format!(
            "[broker]\n[[bus]]\nname = \"b\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\n\
             [[bus.device]]\nname = \"meter\"\n{points}"
        );
        let config = crate::config::parse("test.toml", &file).expect("config");
        crate::field::resolve(&config.field).expect("resolve")
    }

    const TWO: &str =
        "[[bus.device.point]]\nname = \"v\"\nkind = \"input\"\naddress = 0\nunit = \"V\"\n\
                       [[bus.device.point]]\nname = \"alarm\"\nkind = \"coil\"\naddress = 0\n";

    fn reading(point: &str, value: Option<Value>, ts_ms: i64) -> Reading {
        Reading {
            device: "meter".into(),
            point: point.into(),
            topic: None,
            quality: if value.is_some() {
                Quality::Good
            } else {
                Quality::Timeout
            },
            value,
            unit: None,
            ts_ms,
            mono_ms: 0,
            time: TimeMark::Synced,
        }
    }

    #[test]
    fn the_trend_keeps_the_last_values_oldest_first() {
        let recent = Recent::default();
        recent.configure(&buses(TWO));
        for n in 0..(TREND_LEN as u64 + 5) {
            recent.record(&reading("v", Some(Value::UInt(n)), 1000 + n as i64));
        }
        let device = recent.device("meter").expect("configured");
        let v = &device.points[0];
        assert_eq!(v.trend.len(), TREND_LEN);
        assert_eq!(v.trend[0], 5.0);
        assert_eq!(v.trend[TREND_LEN - 1], (TREND_LEN + 4) as f32);
        assert_eq!(v.readings, TREND_LEN as u64 + 5);
        assert_eq!(v.value, Some(Value::UInt(TREND_LEN as u64 + 4)));
        assert_eq!((v.kind, v.unit.as_deref()), ("input", Some("V")));
    }

    #[test]
    fn a_bad_reading_counts_and_leaves_the_trend_alone() {
        let recent = Recent::default();
        recent.configure(&buses(TWO));
        recent.record(&reading("alarm", Some(Value::Bool(true)), 1));
        recent.record(&reading("alarm", None, 2));
        let device = recent.device("meter").expect("configured");
        let alarm = &device.points[1];
        assert_eq!(alarm.trend, vec![1.0]);
        assert_eq!((alarm.readings, alarm.bad), (2, 1));
        assert_eq!(alarm.quality, Some(Quality::Timeout));
        assert_eq!(alarm.value, None);
        assert_eq!(device.last_bad, Some((Quality::Timeout, 2)));
        assert_eq!(
            recent.readings_by_kind("meter"),
            vec![("input", 0), ("coil", 2)]
        );
    }

    /// The memory bound the module docs promise: a point's entry (trend included) is
    /// a few hundred bytes beside its name and unit.
    #[test]
    fn a_point_entry_stays_small() {
        let entry = std::mem::size_of::<PointLog>();
        assert!(entry <= 256, "a point's entry is {entry} bytes");
    }

    #[test]
    fn unknown_points_are_ignored_and_a_reload_keeps_only_configured_points() {
        let recent = Recent::default();
        recent.configure(&buses(TWO));
        recent.record(&reading("v", Some(Value::Float(230.5)), 1));
        recent.record(&reading("nope", Some(Value::Float(1.0)), 1));
        recent.configure(&buses(
            "[[bus.device.point]]\nname = \"v\"\nkind = \"input\"\naddress = 0\n",
        ));
        let device = recent.device("meter").expect("configured");
        assert_eq!(device.points.len(), 1);
        assert_eq!(device.points[0].trend, vec![230.5]);
        assert_eq!(device.points[0].unit, None);
        assert!(recent.device("other").is_none());
    }
}

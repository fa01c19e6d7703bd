//! The status page: `/` (one embedded HTML file, `status.html`, with its script and
//! style inline) and `/api/status`, the JSON it polls every few seconds.
//!
//! `/api/status` is the health report ([`Health::report`]: queue, disk, upstream, LAN,
//! commands, drops) with `readings.per_sec` left out (the page works the rate out from
//! two polls) and `buses` in full, in configuration order:
//!
//! ```json
//! {"version":"0.1.0","prefix":"site/gw","ts":1700000000000,"uptime_secs":60,
//!  "readings":{"accepted":600,"store_refused":0},"queue":{...},"upstream":{...},"lan":{...},
//!  "buses":[{"name":"plant","requests":120,"failed_requests":2,
//!            "failures":{"timeout":2,"crc":0,"disconnected":0,"protocol":0},
//!            "devices":[{"name":"meter","state":"online","last_ts":1700000000000,
//!                        "bad_readings":1,"last_error":{"quality":"timeout","ts":1699999990000},
//!                        "points":[{"name":"voltage","unit":"V","kind":"holding","value":230,
//!                                   "quality":"good","ts":1700000000000,"age_ms":120,
//!                                   "readings":60,"trend":[229,230,230]}]}]}]}
//! ```
//!
//! A point without a reading yet has `value`, `quality`, `ts` and `age_ms` `null`;
//! `last_ts` is the newest reading of any of the device's points, `last_error` its
//! last bad one. Ages are from the agent's clock, so a browser with another clock
//! shows them right.
//!
//! Invariants:
//! - Read-only; it reads the health report's sources and [`Recent`], nothing else.
//! - No build step, no network beyond the endpoint itself: the page is compiled in
//!   (`include_str!`) and fetches only `api/status` (relative, so a reverse proxy may
//!   serve it under a sub-path). Text from devices is put into the page as text
//!   (`textContent`), never as markup.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value as Json};

use super::health::{bus_snapshots, Health};
use super::recent::{PointView, Recent};
use crate::clock::now_ms;
use crate::field::{Value, FAILURE_QUALITIES};
use crate::http::Page;

/// The page itself.
const HTML: &str = include_str!("status.html");

/// What the page and its JSON read.
pub struct Status {
    pub health: Arc<Health>,
    pub recent: Arc<Recent>,
}

impl Status {
    /// `/`: the page.
    pub fn html() -> Page {
        Page {
            content_type: "text/html; charset=utf-8",
            body: Bytes::from_static(HTML.as_bytes()),
        }
    }

    /// `/api/status`.
    pub async fn page(&self) -> Page {
        let body = serde_json::to_vec(&self.json().await).unwrap_or_else(|err| {
            // Every map key is a string and every number finite or null: cannot fail.
            tracing::error!(error = %err, "status JSON not written");
            b"{}".to_vec()
        });
        Page {
            content_type: "application/json",
            body: Bytes::from(body),
        }
    }

    /// The JSON of `/api/status`, written straight from the snapshots (no JSON tree of
    /// every point is built: a page of 500 points is serialized as it is read).
    pub async fn json(&self) -> StatusJson {
        let mut report = match self.health.report(0.0).await {
            Json::Object(report) => report,
            _ => Map::new(),
        };
        if let Some(readings) = report.get_mut("readings").and_then(Json::as_object_mut) {
            readings.remove("per_sec");
        }
        report.remove("buses");
        let now = now_ms();
        let buses = bus_snapshots(&self.health.buses, &self.health.devices)
            .into_iter()
            .map(|bus| {
                let devices = bus
                    .devices
                    .into_iter()
                    .map(|(name, state)| {
                        let view = self.recent.device(&name).unwrap_or_default();
                        DeviceJson {
                            last_ts: view.points.iter().filter_map(|p| p.ts_ms).max(),
                            bad_readings: view.points.iter().map(|p| p.bad).sum(),
                            last_error: view.last_bad.map(|(quality, ts)| LastError {
                                quality: quality.to_string(),
                                ts,
                            }),
                            points: view
                                .points
                                .into_iter()
                                .map(|p| PointJson {
                                    age_ms: p.ts_ms.map(|ts| now.saturating_sub(ts).max(0)),
                                    view: p,
                                })
                                .collect(),
                            name,
                            state,
                        }
                    })
                    .collect();
                BusJson {
                    failures: FAILURE_QUALITIES
                        .iter()
                        .zip(bus.stats.failures)
                        .map(|(quality, count)| (quality.to_string(), count))
                        .collect(),
                    requests: bus.stats.requests,
                    failed_requests: bus.stats.failed_requests,
                    readings: bus.stats.readings,
                    name: bus.name,
                    devices,
                }
            })
            .collect();
        StatusJson {
            report,
            prefix: self.health.topics.prefix().to_string(),
            buses,
        }
    }
}

/// The body of `/api/status` (see the module docs).
#[derive(Serialize)]
pub struct StatusJson {
    #[serde(flatten)]
    pub report: Map<String, Json>,
    pub prefix: String,
    pub buses: Vec<BusJson>,
}

#[derive(Serialize)]
pub struct BusJson {
    name: String,
    requests: u64,
    failed_requests: u64,
    failures: BTreeMap<String, u64>,
    readings: u64,
    devices: Vec<DeviceJson>,
}

#[derive(Serialize)]
struct DeviceJson {
    name: String,
    state: String,
    last_ts: Option<i64>,
    bad_readings: u64,
    last_error: Option<LastError>,
    points: Vec<PointJson>,
}

#[derive(Serialize)]
struct LastError {
    quality: String,
    ts: i64,
}

/// A point's view as JSON, with its age.
struct PointJson {
    view: PointView,
    age_ms: Option<i64>,
}

impl Serialize for PointJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let p = &self.view;
        let mut map = serializer.serialize_map(Some(9))?;
        map.serialize_entry("name", &p.name)?;
        map.serialize_entry("unit", &p.unit)?;
        map.serialize_entry("kind", p.kind)?;
        map.serialize_entry("value", &p.value.as_ref().map(JsonValue))?;
        map.serialize_entry("quality", &p.quality.map(|q| q.to_string()))?;
        map.serialize_entry("ts", &p.ts_ms)?;
        map.serialize_entry("age_ms", &self.age_ms)?;
        map.serialize_entry("readings", &p.readings)?;
        map.serialize_entry("trend", &p.trend)?;
        map.end()
    }
}

/// A reading's value as JSON (`null` for a float JSON cannot carry).
struct JsonValue<'a>(&'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::UInt(u) => serializer.serialize_u64(*u),
            Value::Float(f) if f.is_finite() => serializer.serialize_f64(*f),
            Value::Float(_) => serializer.serialize_none(),
            Value::Text(t) => serializer.serialize_str(t),
        }
    }
}

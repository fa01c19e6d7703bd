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

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value as Json};

use super::health::{bus_snapshots, Health};
use super::recent::Recent;
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
        Page {
            content_type: "application/json",
            body: Bytes::from(self.json().await.to_string()),
        }
    }

    /// The JSON of `/api/status`.
    pub async fn json(&self) -> Json {
        let mut status = self.health.report(0.0).await;
        if let Some(readings) = status.get_mut("readings").and_then(Json::as_object_mut) {
            readings.remove("per_sec");
        }
        if let Some(status) = status.as_object_mut() {
            status.insert("prefix".into(), json!(self.health.topics.prefix()));
            status.insert("buses".into(), self.buses());
        }
        status
    }

    fn buses(&self) -> Json {
        let now = now_ms();
        let buses = bus_snapshots(&self.health.buses, &self.health.devices);
        let buses = buses.into_iter().map(|bus| {
            let failures: Map<String, Json> = FAILURE_QUALITIES
                .iter()
                .zip(bus.stats.failures)
                .map(|(quality, count)| (quality.to_string(), json!(count)))
                .collect();
            let devices: Vec<Json> = bus
                .devices
                .iter()
                .map(|(name, state)| {
                    let view = self.recent.device(name).unwrap_or_default();
                    let last_ts = view.points.iter().filter_map(|p| p.ts_ms).max();
                    let bad: u64 = view.points.iter().map(|p| p.bad).sum();
                    let points: Vec<Json> = view
                        .points
                        .iter()
                        .map(|p| {
                            json!({
                                "name": p.name,
                                "unit": p.unit,
                                "kind": p.kind,
                                "value": p.value.as_ref().map_or(Json::Null, value_json),
                                "quality": p.quality.map(|q| q.to_string()),
                                "ts": p.ts_ms,
                                "age_ms": p.ts_ms.map(|ts| now.saturating_sub(ts).max(0)),
                                "readings": p.readings,
                                "trend": p.trend,
                            })
                        })
                        .collect();
                    json!({
                        "name": name,
                        "state": state,
                        "last_ts": last_ts,
                        "bad_readings": bad,
                        "last_error": view.last_bad.map(|(quality, ts)| {
                            json!({"quality": quality.to_string(), "ts": ts})
                        }),
                        "points": points,
                    })
                })
                .collect();
            json!({
                "name": bus.name,
                "requests": bus.stats.requests,
                "failed_requests": bus.stats.failed_requests,
                "failures": failures,
                "readings": bus.stats.readings,
                "devices": devices,
            })
        });
        Json::Array(buses.collect())
    }
}

/// A value as JSON (`null` for a float JSON cannot carry).
fn value_json(value: &Value) -> Json {
    match value {
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::UInt(u) => json!(u),
        Value::Float(f) => json!(f),
        Value::Text(t) => json!(t),
    }
}

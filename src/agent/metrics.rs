//! `/metrics`: the agent's figures in the Prometheus text format (version 0.0.4).
//!
//! Invariants:
//! - Read-only and gathered from the same snapshots as the health report
//!   ([`health::bus_snapshots`], the store's, the uplink's, the broker's and the command
//!   router's stats): a figure has one source, whichever way it is read.
//! - Names follow the Prometheus conventions: `fieldbridge_` prefix, base units
//!   (seconds, bytes), `_total` on counters. The process figures use the standard
//!   unprefixed `process_` names every exporter uses, so existing dashboards work.
//! - A state is one gauge per possible value (`1` for the current one, `0` for the
//!   others), so a query can match it without parsing text.
//! - A part that is not configured (no store, no uplink, no LAN broker) has no
//!   metrics, rather than zeros that would look like a healthy idle part.

use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;

use super::health::{bus_snapshots, Health};
use super::recent::Recent;
use crate::field::{StatsSnapshot, FAILURE_QUALITIES, LATENCY_BUCKETS};
use crate::http::Page;
use crate::store::DiskState;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every device state, in the order their gauges are written.
const DEVICE_STATES: [&str; 4] = ["starting", "online", "offline", "quarantined"];
/// Every uplink state word (see `LinkState::word`).
const UPLINK_STATES: [&str; 4] = ["connecting", "connected", "backoff", "stopped"];
/// Linux reports process CPU time in clock ticks of 1/100 s (`USER_HZ`) on every
/// architecture the agent ships for.
const USER_HZ: f64 = 100.0;

/// One counter of a bus's stats.
type BusFigure = fn(&StatsSnapshot) -> u64;

/// The figures' sources: the health report's own, and the points' readings.
pub struct Metrics {
    pub health: Arc<Health>,
    pub recent: Arc<Recent>,
}

impl Metrics {
    /// The `/metrics` page.
    pub async fn page(&self) -> Page {
        Page {
            content_type: CONTENT_TYPE,
            body: Bytes::from(self.render().await),
        }
    }

    /// The exposition text.
    pub async fn render(&self) -> String {
        let mut out = Exposition::default();
        out.family(
            "fieldbridge_build_info",
            "gauge",
            "Always 1; the version is a label.",
        );
        out.sample(
            "fieldbridge_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        out.single(
            "fieldbridge_uptime_seconds",
            "gauge",
            "Seconds since the agent started.",
            self.health.started.elapsed().as_millis() as f64 / 1000.0,
        );
        self.readings(&mut out);
        self.buses(&mut out);
        self.store(&mut out).await;
        self.uplink(&mut out);
        self.lan(&mut out);
        self.commands(&mut out);
        process(&mut out);
        out.text
    }

    fn readings(&self, out: &mut Exposition) {
        use std::sync::atomic::Ordering::Relaxed;
        out.single(
            "fieldbridge_readings_accepted_total",
            "counter",
            "Readings accepted: committed to the store, or published on the LAN broker when LAN-only.",
            self.health.counters.accepted.load(Relaxed) as f64,
        );
        out.single(
            "fieldbridge_readings_store_refused_total",
            "counter",
            "Readings the store refused (they reached the LAN broker only).",
            self.health.counters.store_failed.load(Relaxed) as f64,
        );
        let time = &self.health.time;
        out.single(
            "fieldbridge_clock_synchronized",
            "gauge",
            "1 while the wall clock is synchronized to a time source, 0 while readings are marked unsynced.",
            f64::from(u8::from(time.synced.load(Relaxed))),
        );
        out.singles(
            "counter",
            &[
                (
                    "fieldbridge_readings_unsynced_total",
                    "Readings sent while the wall clock was not synchronized (marked \"time\":\"unsynced\").",
                    time.unsynced.load(Relaxed),
                ),
                (
                    "fieldbridge_readings_corrected_total",
                    "Readings taken before the clock's sync whose time was corrected from the boot clock (marked \"time\":\"corrected\").",
                    time.corrected.load(Relaxed),
                ),
                (
                    "fieldbridge_clock_correction_failures_total",
                    "Corrections of the stored readings' times that failed and were retried.",
                    time.correction_failures.load(Relaxed),
                ),
            ],
        );
    }

    fn buses(&self, out: &mut Exposition) {
        let buses = bus_snapshots(&self.health.buses, &self.health.devices);
        let counters: [(&str, &str, BusFigure); 4] = [
            (
                "fieldbridge_bus_requests_total",
                "Requests sent on the bus (each retry counts), or poll requests written on a lines bus.",
                |s| s.requests,
            ),
            (
                "fieldbridge_bus_readings_total",
                "Readings produced by the bus (before deadband filtering).",
                |s| s.readings,
            ),
            (
                "fieldbridge_bus_lines_total",
                "Lines received on a lines bus.",
                |s| s.lines,
            ),
            (
                "fieldbridge_bus_garbage_lines_total",
                "Lines skipped as garbage: too long, bad checksum, or not matching the parser.",
                |s| s.garbage_lines,
            ),
        ];
        for (name, help, value) in counters {
            out.family(name, "counter", help);
            for bus in &buses {
                out.sample(name, &[("bus", &bus.name)], value(&bus.stats) as f64);
            }
        }
        let name = "fieldbridge_bus_request_failures_total";
        out.family(
            name,
            "counter",
            "Requests that got no usable answer, by quality (timeout, crc, disconnected, protocol).",
        );
        for bus in &buses {
            for (quality, value) in FAILURE_QUALITIES.iter().zip(bus.stats.failures) {
                let quality = quality.to_string();
                out.sample(
                    name,
                    &[("bus", &bus.name), ("quality", &quality)],
                    value as f64,
                );
            }
        }
        let name = "fieldbridge_bus_request_duration_seconds";
        out.family(
            name,
            "histogram",
            "Time from sending a request to its answer or failure, per bus.",
        );
        for bus in &buses {
            let mut cumulative = 0;
            for (i, count) in bus.stats.latency.iter().enumerate() {
                cumulative += count;
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |bound| number(*bound));
                out.sample(
                    "fieldbridge_bus_request_duration_seconds_bucket",
                    &[("bus", &bus.name), ("le", &le)],
                    cumulative as f64,
                );
            }
            out.sample(
                "fieldbridge_bus_request_duration_seconds_sum",
                &[("bus", &bus.name)],
                bus.stats.latency_sum_us as f64 / 1e6,
            );
            out.sample(
                "fieldbridge_bus_request_duration_seconds_count",
                &[("bus", &bus.name)],
                cumulative as f64,
            );
        }
        let name = "fieldbridge_device_state";
        out.family(
            name,
            "gauge",
            "1 for the device's current state (starting, online, offline, quarantined), 0 for the others.",
        );
        for bus in &buses {
            for (device, state) in &bus.devices {
                for candidate in DEVICE_STATES {
                    out.sample(
                        name,
                        &[("bus", &bus.name), ("device", device), ("state", candidate)],
                        f64::from(u8::from(state == candidate)),
                    );
                }
            }
        }
        let name = "fieldbridge_readings_total";
        out.family(
            name,
            "counter",
            "Readings published per device and point kind (holding, input, coil, discrete, line), \
             after deadband filtering, bad quality included; since the agent started.",
        );
        for bus in &buses {
            for (device, _) in &bus.devices {
                for (kind, count) in self.recent.readings_by_kind(device) {
                    out.sample(
                        name,
                        &[("bus", &bus.name), ("device", device), ("kind", kind)],
                        count as f64,
                    );
                }
            }
        }
    }

    async fn store(&self, out: &mut Exposition) {
        let Some(queue) = &self.health.queue else {
            return;
        };
        let stats = queue.stats().await;
        out.single(
            "fieldbridge_store_up",
            "gauge",
            "1 when the store answered for its figures.",
            f64::from(u8::from(stats.is_ok())),
        );
        let stats = match stats {
            Ok(stats) => stats,
            Err(err) => {
                tracing::debug!(error = %err, "store figures unavailable for /metrics");
                return;
            }
        };
        let gauges = [
            (
                "fieldbridge_store_rows",
                "Rows stored, pending and in flight.",
                stats.depth,
            ),
            (
                "fieldbridge_store_pending_rows",
                "Rows stored and not in flight.",
                stats.pending,
            ),
            (
                "fieldbridge_store_bytes",
                "Bytes of stored messages, as counted for max_bytes.",
                stats.bytes,
            ),
            (
                "fieldbridge_store_file_bytes",
                "Size of the database file plus its WAL.",
                stats.file_bytes,
            ),
            (
                "fieldbridge_store_buffered_rows",
                "Rows in memory waiting for their commit (group commit, or the disk-full buffer).",
                stats.buffered,
            ),
            (
                "fieldbridge_store_filesystem_free_bytes",
                "Bytes free on the filesystem that holds the store.",
                stats.fs_free_bytes,
            ),
            (
                "fieldbridge_store_reserve_bytes",
                "Bytes the store holds in reserve so delivered rows can always be deleted.",
                stats.reserve_bytes,
            ),
        ];
        out.singles("gauge", &gauges);
        let name = "fieldbridge_store_disk_state";
        out.family(
            name,
            "gauge",
            "1 for the state the store's disk is in: writable, full, read_only or failing.",
        );
        for (state, label) in [
            (DiskState::Writable, "writable"),
            (DiskState::Full, "full"),
            (DiskState::ReadOnly, "read_only"),
            (DiskState::Failing, "failing"),
        ] {
            out.sample(
                name,
                &[("state", label)],
                f64::from(u8::from(stats.disk == state)),
            );
        }
        out.single(
            "fieldbridge_store_oldest_age_seconds",
            "gauge",
            "Age of the oldest stored row; 0 when the store is empty.",
            stats.oldest_age_ms.unwrap_or(0) as f64 / 1000.0,
        );
        let counters = [
            (
                "fieldbridge_store_appended_rows_total",
                "Rows committed, since the database was created.",
                stats.appended,
            ),
            (
                "fieldbridge_store_delivered_rows_total",
                "Rows deleted after the upstream acknowledged them, since the database was created.",
                stats.delivered,
            ),
            (
                "fieldbridge_store_commits_total",
                "Transactions committed.",
                stats.commits,
            ),
            (
                "fieldbridge_store_commit_failures_total",
                "Commits that failed (disk full, read-only, I/O error) and were retried.",
                stats.commit_failures,
            ),
            (
                "fieldbridge_store_written_bytes_total",
                "Bytes SQLite wrote (WAL frames and checkpoint copies), updated at each checkpoint.",
                stats.bytes_written,
            ),
        ];
        out.singles("counter", &counters);
        let dropped = stats.dropped;
        out.by_label(
            "fieldbridge_store_dropped_rows_total",
            "counter",
            "Rows dropped by the store, by reason, since the database was created.",
            "reason",
            &[
                ("max_rows", dropped.max_rows),
                ("max_bytes", dropped.max_bytes),
                ("max_age", dropped.max_age),
                ("disk_full", dropped.disk_full),
                ("shutdown", dropped.shutdown),
            ],
        );
        out.single(
            "fieldbridge_uplink_inflight_messages",
            "gauge",
            "Stored rows sent upstream and not yet acknowledged.",
            stats.in_flight as f64,
        );
    }

    fn uplink(&self, out: &mut Exposition) {
        let Some(uplink) = &self.health.uplink else {
            return;
        };
        let word = uplink.state().borrow().word();
        let name = "fieldbridge_uplink_state";
        out.family(
            name,
            "gauge",
            "1 for the upstream connection's current state, 0 for the others.",
        );
        for state in UPLINK_STATES {
            out.sample(
                name,
                &[("state", state)],
                f64::from(u8::from(word == state)),
            );
        }
        let stats = uplink.stats();
        let counters = [
            (
                "fieldbridge_uplink_connects_total",
                "Successful connections (CONNACK) to the upstream broker.",
                stats.connects,
            ),
            (
                "fieldbridge_uplink_reconnects_total",
                "Connections after the first one.",
                stats.connects.saturating_sub(1),
            ),
            (
                "fieldbridge_uplink_connect_failures_total",
                "Connection attempts that failed (network, TLS, refused, timeout).",
                stats.connect_failures,
            ),
            (
                "fieldbridge_uplink_auth_failures_total",
                "Connection attempts refused for credentials or permissions.",
                stats.auth_failures,
            ),
            (
                "fieldbridge_uplink_published_total",
                "Messages sent upstream for the first time.",
                stats.published,
            ),
            (
                "fieldbridge_uplink_resent_total",
                "Messages sent again after a reconnect.",
                stats.resent,
            ),
            (
                "fieldbridge_uplink_acked_total",
                "Messages the upstream broker acknowledged (then deleted from the store).",
                stats.acked,
            ),
            (
                "fieldbridge_uplink_throttled_total",
                "Messages the upstream broker refused for now (quota); each was sent again.",
                stats.throttled,
            ),
        ];
        out.singles("counter", &counters);
        out.by_label(
            "fieldbridge_uplink_dropped_total",
            "counter",
            "Messages dropped by the uplink, by reason.",
            "reason",
            &[
                ("too_large", stats.dropped_too_large),
                ("invalid_topic", stats.dropped_invalid),
                ("rejected", stats.rejected),
            ],
        );
    }

    fn lan(&self, out: &mut Exposition) {
        let Some(broker) = &self.health.broker else {
            return;
        };
        let stats = broker.stats();
        let gauges = [
            (
                "fieldbridge_lan_clients",
                "Clients connected to the LAN broker.",
                stats.clients_connected as u64,
            ),
            (
                "fieldbridge_lan_sessions",
                "LAN broker sessions, connected or not.",
                stats.sessions as u64,
            ),
            (
                "fieldbridge_lan_subscriptions",
                "Subscriptions on the LAN broker.",
                stats.subscriptions as u64,
            ),
            (
                "fieldbridge_lan_retained_messages",
                "Retained messages on the LAN broker.",
                stats.retained as u64,
            ),
            (
                "fieldbridge_lan_queued_bytes",
                "Bytes queued for LAN sessions.",
                stats.queued_bytes as u64,
            ),
        ];
        out.singles("gauge", &gauges);
        let counters = [
            (
                "fieldbridge_lan_messages_received_total",
                "PUBLISH packets received from LAN clients.",
                stats.messages_received,
            ),
            (
                "fieldbridge_lan_messages_sent_total",
                "PUBLISH packets sent to LAN clients.",
                stats.messages_sent,
            ),
            (
                "fieldbridge_lan_received_bytes_total",
                "Bytes received from LAN clients.",
                stats.bytes_received,
            ),
            (
                "fieldbridge_lan_sent_bytes_total",
                "Bytes sent to LAN clients.",
                stats.bytes_sent,
            ),
            (
                "fieldbridge_lan_denied_total",
                "PUBLISH packets refused by the ACL or the protected topics.",
                stats.denied,
            ),
        ];
        out.singles("counter", &counters);
        out.by_label(
            "fieldbridge_lan_dropped_messages_total",
            "counter",
            "Messages the LAN broker dropped, by reason.",
            "reason",
            &[
                ("client_queue_full", stats.dropped),
                ("queue_budget", stats.dropped_budget),
                ("session_ended", stats.dropped_with_sessions),
                ("expired", stats.expired),
            ],
        );
    }

    fn commands(&self, out: &mut Exposition) {
        let now = self.health.commands.snapshot();
        let refused: u64 = now.refused.values().sum();
        out.by_label(
            "fieldbridge_commands_total",
            "counter",
            "Write commands by result: ok, failed (the device refused or did not answer), duplicate, refused.",
            "result",
            &[
            ("ok", now.ok),
            ("failed", now.failed),
            ("duplicate", now.duplicates),
            ("refused", refused),
        ],
        );
        let name = "fieldbridge_commands_refused_total";
        out.family(
            name,
            "counter",
            "Write commands refused before the bus, by reason.",
        );
        for (reason, value) in &now.refused {
            out.sample(name, &[("reason", reason)], *value as f64);
        }
    }
}

/// RSS and CPU time from `/proc/self` (Linux); absent where it cannot be read.
fn process(out: &mut Exposition) {
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(rss_bytes)
    {
        out.single(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss as f64,
        );
    }
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(cpu_ticks)
    {
        out.single(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            ticks as f64 / USER_HZ,
        );
    }
}

/// `VmRSS:   1234 kB` from `/proc/self/status`, in bytes.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `utime + stime` (fields 14 and 15) of `/proc/self/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The text being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a family; its samples follow.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// One unlabelled family of `kind` per `(name, help, value)`.
    fn singles(&mut self, kind: &str, families: &[(&str, &str, u64)]) {
        for &(name, help, value) in families {
            self.single(name, kind, help, value as f64);
        }
    }

    /// A family with one sample per value of the label `key`.
    fn by_label(&mut self, name: &str, kind: &str, help: &str, key: &str, samples: &[(&str, u64)]) {
        self.family(name, kind, help);
        for &(label, value) in samples {
            self.sample(name, &[(key, label)], value as f64);
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape(value, true));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }
}

/// Escapes `\` and newlines (and `"` in label values), as the text format requires.
fn escape(text: &str, quotes: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// A sample value: integers without a fraction, `+Inf`/`-Inf`/`NaN` as the format spells them.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_quotes_backslashes_and_newlines() {
        let mut out = Exposition::default();
        out.sample("m", &[("device", "a\"b\\c\nd")], 1.0);
        assert_eq!(out.text, "m{device=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn values_are_spelled_as_the_format_wants() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }

    #[test]
    fn cpu_ticks_count_fields_after_a_command_name_with_spaces() {
        let stat = "42 (field (bridge)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn rss_is_read_in_bytes() {
        assert_eq!(
            rss_bytes("Name:\tx\nVmRSS:\t    2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
        assert_eq!(rss_bytes("Name:\tx\n"), None);
    }
}

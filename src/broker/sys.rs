//! `$SYS/broker/...` topics and periodic housekeeping.
//!
//! The `$SYS` values are retained messages published by the broker itself every
//! `sys_interval_secs` (mosquitto's topic names where they exist); they are not written
//! to the persistence file. Housekeeping (ending expired sessions, dropping expired
//! retained messages) runs every second, and so does the check of what the queue limits
//! dropped: one warning when a limit starts dropping messages, one line with the count
//! when a second passes without a drop, never one line per message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::router::{BrokerStats, Router};
use super::session::Message;
use crate::mqtt::QoS;

const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The `$SYS` topics and their values for `stats`.
pub(crate) fn sys_values(stats: &BrokerStats) -> Vec<(&'static str, String)> {
    vec![
        (
            "$SYS/broker/version",
            format!("fieldbridge {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", stats.uptime.as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            stats.clients_connected.to_string(),
        ),
        ("$SYS/broker/clients/total", stats.sessions.to_string()),
        (
            "$SYS/broker/messages/received",
            stats.messages_received.to_string(),
        ),
        ("$SYS/broker/messages/sent", stats.messages_sent.to_string()),
        ("$SYS/broker/messages/dropped", stats.dropped.to_string()),
        (
            "$SYS/broker/messages/dropped/budget",
            stats.dropped_budget.to_string(),
        ),
        (
            "$SYS/broker/messages/queued/bytes",
            stats.queued_bytes.to_string(),
        ),
        (
            "$SYS/broker/clients/expired",
            stats.sessions_expired.to_string(),
        ),
        (
            "$SYS/broker/clients/evicted",
            stats.sessions_evicted.to_string(),
        ),
        (
            "$SYS/broker/bytes/received",
            stats.bytes_received.to_string(),
        ),
        ("$SYS/broker/bytes/sent", stats.bytes_sent.to_string()),
        (
            "$SYS/broker/subscriptions/count",
            stats.subscriptions.to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            stats.retained.to_string(),
        ),
    ]
}

/// Publishes the `$SYS` topics once.
pub(crate) fn publish_sys(router: &Router) {
    for (topic, value) in sys_values(&router.stats()) {
        router.publish(Message {
            topic: topic.to_string(),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: None,
            expires_at: None,
            origin: 0,
        });
    }
}

/// A drop counter watched for state changes.
#[derive(Debug, Default)]
struct Losses {
    counted: u64,
    /// Since when it has been dropping, the counter then.
    dropping_since: Option<u64>,
}

impl Losses {
    /// Logs when `total` starts or stops growing.
    fn check(&mut self, total: u64, start: impl FnOnce(), stop: impl FnOnce(u64)) {
        let grew = total > self.counted;
        match (self.dropping_since, grew) {
            (None, true) => {
                start();
                self.dropping_since = Some(self.counted);
            }
            (Some(since), false) => {
                stop(total - since);
                self.dropping_since = None;
            }
            _ => {}
        }
        self.counted = total;
    }
}

/// The drop counters of the queue limits, and their log lines.
#[derive(Debug, Default)]
struct LossLog {
    budget: Losses,
    client_queues: Losses,
}

impl LossLog {
    fn check(&mut self, stats: &BrokerStats, max_queued_bytes_total: usize) {
        self.budget.check(
            stats.dropped_budget,
            || {
                tracing::warn!(
                    queued_bytes = stats.queued_bytes,
                    max_queued_bytes_total,
                    "broker queue budget reached: messages for offline clients are dropped"
                );
            },
            |dropped| {
                tracing::info!(
                    dropped,
                    "broker queue budget: messages for offline clients are queued again"
                );
            },
        );
        self.client_queues.check(
            stats.dropped,
            || {
                tracing::warn!(
                    "client queues full: messages for slow or offline clients are dropped"
                )
            },
            |dropped| tracing::info!(dropped, "client queues take messages again"),
        );
    }
}

/// Runs housekeeping and `$SYS` updates until cancelled.
pub(crate) async fn maintenance(
    router: Arc<Router>,
    sys_interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_sys = Instant::now();
    let mut losses = LossLog::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let now = Instant::now();
        router.housekeeping(now);
        let stats = router.stats();
        losses.check(&stats, router.settings.max_queued_bytes_total);
        if !sys_interval.is_zero() && now >= next_sys {
            publish_sys(&router);
            next_sys = now + sys_interval;
        }
    }
}

//! Readings to feed an uplink and the tally of what its subscribers received: the
//! failover and interop tests count accepted, delivered, duplicated and lost readings
//! the same way.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fieldbridge::mqtt::QoS;
use fieldbridge::store::{Message, Priority, Queue, StoreConfig};

use super::mosquitto::Subscriber;

/// Reading number `i` (its payload) on `topic`.
pub fn reading(i: usize, qos: QoS, topic: &str) -> Message {
    Message {
        topic: topic.to_owned(),
        payload: Bytes::from(i.to_string()),
        qos,
        retain: false,
        created_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        priority: Priority::Periodic,
        unsynced: None,
    }
}

/// Readings `from..from + n` at QoS 1 on `{base}/q1` and at QoS 2 on `{base}/q2`.
pub fn readings(base: &str, from: usize, n: usize) -> Vec<Message> {
    let (q1, q2) = (format!("{base}/q1"), format!("{base}/q2"));
    (from..from + n)
        .flat_map(|i| {
            [
                reading(i, QoS::AtLeastOnce, &q1),
                reading(i, QoS::ExactlyOnce, &q2),
            ]
        })
        .collect()
}

/// A store in `path` that commits every 5 ms; logs to the test output when RUST_LOG is
/// set.
pub fn open_store(path: &Path) -> Queue {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    Queue::open(StoreConfig {
        path: path.to_owned(),
        commit_interval_ms: 5,
        ..StoreConfig::default()
    })
    .expect("open the store")
}

/// Readings accepted (in the store), delivered (distinct), duplicated and lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub accepted: usize,
    pub delivered: usize,
    pub duplicated: usize,
    pub lost: usize,
}

impl Tally {
    /// `accepted=… delivered=… duplicated=… lost=…`, for a figures line.
    pub fn words(&self) -> String {
        format!(
            "accepted={} delivered={} duplicated={} lost={}",
            self.accepted, self.delivered, self.duplicated, self.lost
        )
    }
}

/// What `subs` together received of readings `0..accepted` on `topic`.
pub fn tally(subs: &[&Subscriber], topic: &str, accepted: usize) -> Tally {
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for sub in subs {
        for m in sub.messages().iter().filter(|m| m.topic == topic) {
            if let Ok(n) = m.payload.parse() {
                *counts.entry(n).or_insert(0) += 1;
            }
        }
    }
    Tally {
        accepted,
        delivered: (0..accepted).filter(|i| counts.contains_key(i)).count(),
        duplicated: counts.values().map(|c| c.saturating_sub(1)).sum(),
        lost: (0..accepted).filter(|i| !counts.contains_key(i)).count(),
    }
}

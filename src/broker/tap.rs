//! Taps: what LAN clients publish on chosen topic filters, handed to the agent in
//! process together with who published it (the command topics of writable points).
//!
//! Invariants:
//! - Only a publish the policy allowed is tapped; the tap never bypasses the ACL.
//! - Handing over never waits: a full tap channel drops the message and counts it
//!   ([`Taps::dropped`]); the publisher still gets its acknowledgement.
//! - A tapped message is also routed as usual (LAN subscribers may watch commands).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::mqtt::{topic, QoS};

/// One message a LAN client published on a tapped filter.
#[derive(Debug, Clone)]
pub struct Tapped {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// The DUP flag: a QoS 1 resend of a message the client may have sent before.
    pub dup: bool,
    /// The packet identifier (0 for QoS 0), to recognise a resend.
    pub pkid: u16,
    /// 5.0: where the publisher wants the answer, and what to send along with it.
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// 5.0 message expiry interval, seconds.
    pub expiry_secs: Option<u32>,
    pub client_id: String,
    pub username: Option<String>,
    pub arrived: Instant,
}

/// The taps of one broker.
#[derive(Debug, Default)]
pub(crate) struct Taps {
    taps: RwLock<Vec<(String, mpsc::Sender<Tapped>)>>,
    /// Messages dropped because a tap's channel was full.
    pub dropped: AtomicU64,
}

impl Taps {
    pub fn add(&self, filter: String, tx: mpsc::Sender<Tapped>) {
        self.taps
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((filter, tx));
    }

    /// Whether any tap wants `topic` (cheap while there is none).
    pub fn wants(&self, topic_name: &str) -> bool {
        let taps = self.taps.read().unwrap_or_else(|e| e.into_inner());
        taps.iter().any(|(f, _)| topic::matches(f, topic_name))
    }

    /// Hands `msg` to every tap whose filter matches.
    pub fn offer(&self, msg: &Tapped) {
        let taps = self.taps.read().unwrap_or_else(|e| e.into_inner());
        for (filter, tx) in taps.iter() {
            if topic::matches(filter, &msg.topic) && tx.try_send(msg.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

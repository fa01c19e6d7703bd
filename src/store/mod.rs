//! The SQLite store-and-forward queue (placeholder signatures; see issue 4).
//!
//! Invariants:
//! - A message is accepted only once the transaction that holds it has committed.
//! - A row is deleted only by `ack`, i.e. after the upstream broker acknowledged it.
//! - Rows in flight at a crash or restart are pending again when the queue reopens.

use bytes::Bytes;

use crate::mqtt::QoS;

/// Drop class of a message: periodic values are dropped before events, events before
/// alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    #[default]
    Periodic = 0,
    Event = 1,
    Alarm = 2,
}

/// A reading already encoded as an outgoing MQTT message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Wall clock, milliseconds since the Unix epoch.
    pub created_ms: i64,
    pub priority: Priority,
}

/// A message handed out by `next`, with its row id and persisted QoS 2 flow state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: i64,
    pub message: Message,
    /// The packet identifier the uplink assigned (QoS 1/2), persisted by `set_flow`.
    pub pkid: Option<u16>,
    /// QoS 2: PUBREC was received, so the flow resumes at PUBREL.
    pub pubrec: bool,
}

/// Which end of the backlog `next` hands out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainOrder {
    #[default]
    OldestFirst,
    NewestFirst,
}

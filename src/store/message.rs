//! What the queue stores: a reading encoded as an MQTT message, its drop class, and the
//! stored row `next` hands out.
//!
//! Invariants: a QoS 2 row is published under [`pkid_for_row`] of its id unless it
//! carries another packet id; a message counts [`Message::stored_size`] bytes for `max_bytes` and
//! [`super::Stats::bytes`], the same when it is appended as when it is dropped or
//! delivered; priorities order as drop classes (periodic < event < alarm).

use bytes::Bytes;

use crate::clock::Stamp;
use crate::mqtt::QoS;

/// Bytes counted per row on top of topic and payload, for `max_bytes` and
/// [`Stats::bytes`](super::Stats::bytes): roughly what SQLite stores besides them.
pub const ROW_OVERHEAD_BYTES: u64 = 32;

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
    /// Set when the message was made while the wall clock was not synchronized: the
    /// boot and boot-clock time of its reading, so a later sync can correct
    /// `created_ms` and the payload ([`super::Queue::retime`]).
    pub unsynced: Option<Stamp>,
}

impl Message {
    /// What this message counts for `max_bytes`.
    pub fn stored_size(&self) -> u64 {
        self.topic.len() as u64 + self.payload.len() as u64 + ROW_OVERHEAD_BYTES
    }
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

/// The packet id a QoS 2 row is published under unless the store holds another one
/// (the uplink's rule, here because the store also needs it: the packet ids of flows
/// cut by a crash, see `store/mod.rs`).
pub fn pkid_for_row(id: i64) -> u16 {
    // Row ids start at 1; packet ids run 1..=65535.
    u16::try_from((id - 1).rem_euclid(65_535) + 1).unwrap_or(1)
}

/// Which end of the backlog `next` hands out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainOrder {
    #[default]
    OldestFirst,
    NewestFirst,
}

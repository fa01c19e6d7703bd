//! The hook of an upstream payload format other than the default JSON (Sparkplug B):
//! the session asks it for the will at each CONNECT, for the messages that open a
//! session, for each stored row as it goes on the wire, and what an incoming message
//! means. JSON needs none of this: without a format the session sends rows as stored,
//! with the status topic as will and birth.
//!
//! Invariants:
//! - A format makes the session clean (3.1.1 clean session 1; 5.0 clean start 1 with
//!   session expiry 0): what it sends depends on the connection (sequence numbers), so
//!   no flow may resume across connections. Rows still leave the store only on their
//!   acknowledgement; unacknowledged ones are formatted again for the next connection.
//! - [`Format::row`] is called in the order rows go on the wire, once per connection a
//!   row is sent on, so a counter it keeps (Sparkplug's `seq`) follows the wire order.
//!
//! Failover hook: [`super::SessionError::HostOffline`] ends a connection when the host
//! the format waits for says it went offline; the client's reconnect loop is where a
//! list of servers moves to the next one.

use std::fmt;

use bytes::Bytes;

use crate::mqtt::{Publish, Will};

/// What an incoming message means to the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Not the format's: hand it to the agent as usual.
    Forward,
    /// Handled, or ignored and logged, by the format.
    Consumed,
    /// Publish the opening messages again ([`Format::births`]).
    Rebirth,
    /// The host the format waits for is online: open the session if it waits.
    HostOnline,
    /// That host went offline: end the connection.
    HostOffline,
}

/// An upstream payload format, called by the sans-IO session.
pub trait Format: Send + fmt::Debug {
    /// The will of the next CONNECT; called once per connection attempt.
    fn will(&mut self) -> Will;
    /// Filters to subscribe to right after CONNACK, before anything is published.
    fn subscriptions(&self) -> Vec<String>;
    /// Whether the opening messages wait for [`Incoming::HostOnline`].
    fn waits_for_host(&self) -> bool;
    /// The messages that open a session, in order (published at QoS 0, not retained).
    fn births(&mut self) -> Vec<(String, Bytes)>;
    /// What a graceful stop publishes (QoS 1, not retained) before DISCONNECT.
    fn farewell(&mut self) -> (String, Bytes);
    /// A stored row as it goes on the wire now; `None` when nothing of it is left to
    /// send (the row is done and deleted).
    fn row(&mut self, topic: &str, payload: &Bytes, created_ms: i64) -> Option<(String, Bytes)>;
    /// What an incoming message means.
    fn incoming(&mut self, publish: &Publish) -> Incoming;
}

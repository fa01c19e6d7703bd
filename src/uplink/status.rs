//! What the uplink tells the rest of the agent about itself: the link state it is in
//! and the counters of what it has done. A leaf of `uplink/`: every other file may
//! import it, it imports none of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Resolving, connecting, handshaking or waiting for CONNACK.
    Connecting { attempt: u32 },
    /// CONNACK received; `session_present` as the broker said.
    Connected { session_present: bool },
    /// Waiting `delay` before attempt `attempt + 1` because of `error`.
    Backoff {
        attempt: u32,
        delay: Duration,
        error: String,
    },
    /// The uplink has stopped.
    Stopped,
}

/// Counters shared between the connection task and [`UplinkStats`] snapshots.
#[derive(Debug, Default)]
pub struct Counters {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub auth_failures: AtomicU64,
    pub published: AtomicU64,
    pub resent: AtomicU64,
    pub acked: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_invalid: AtomicU64,
    pub rejected: AtomicU64,
    pub throttled: AtomicU64,
    pub incoming: AtomicU64,
    pub incoming_dropped: AtomicU64,
}

impl Counters {
    /// A consistent-enough copy for status output.
    pub fn snapshot(&self) -> UplinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UplinkStats {
            connects: get(&self.connects),
            connect_failures: get(&self.connect_failures),
            auth_failures: get(&self.auth_failures),
            published: get(&self.published),
            resent: get(&self.resent),
            acked: get(&self.acked),
            dropped_too_large: get(&self.dropped_too_large),
            dropped_invalid: get(&self.dropped_invalid),
            rejected: get(&self.rejected),
            throttled: get(&self.throttled),
            incoming: get(&self.incoming),
            incoming_dropped: get(&self.incoming_dropped),
        }
    }
}

/// What the uplink has done since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UplinkStats {
    /// Successful CONNACKs.
    pub connects: u64,
    /// Connection attempts that failed (network, TLS, refused, timeout).
    pub connect_failures: u64,
    /// Of those, refusals for credentials or permissions.
    pub auth_failures: u64,
    /// PUBLISH packets of rows sent for the first time.
    pub published: u64,
    /// PUBLISH packets sent again with DUP after a reconnect.
    pub resent: u64,
    /// Rows deleted after the broker's acknowledgement.
    pub acked: u64,
    /// Rows dropped because they exceed the broker's maximum packet size.
    pub dropped_too_large: u64,
    /// Rows dropped because their topic is not a valid topic name.
    pub dropped_invalid: u64,
    /// Rows the broker refused with an error reason code (5.0).
    pub rejected: u64,
    /// Messages the broker refused for now (0x97 quota exceeded, 0x91 packet id in
    /// use); each was kept and sent again.
    pub throttled: u64,
    /// Messages received on the configured subscriptions.
    pub incoming: u64,
    /// Of those, dropped because the consumer's channel was full.
    pub incoming_dropped: u64,
}

//! What the uplink tells the rest of the agent about itself: the link state it is in,
//! the counters of what it has done, and (for its log) what an outage is worth saying
//! ([`OutageLog`]: the first failure, a summary every few minutes, the recovery and
//! the end of the backlog). A leaf of `uplink/`: every other file may import it, it
//! imports none of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

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

impl LinkState {
    /// The state in a word: `connecting`, `connected`, `backoff` or `stopped`.
    pub fn word(&self) -> &'static str {
        match self {
            LinkState::Connecting { .. } => "connecting",
            LinkState::Connected { .. } => "connected",
            LinkState::Backoff { .. } => "backoff",
            LinkState::Stopped => "stopped",
        }
    }

    /// Why the uplink is backing off, while it is.
    pub fn last_error(&self) -> Option<&str> {
        match self {
            LinkState::Backoff { error, .. } => Some(error),
            _ => None,
        }
    }
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
    pub qos2_restarted: AtomicU64,
    pub qos2_downgraded: AtomicU64,
    pub server_switches: AtomicU64,
    /// Index of the server in use, in the configured list.
    pub active_server: AtomicU64,
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
            qos2_restarted: get(&self.qos2_restarted),
            qos2_downgraded: get(&self.qos2_downgraded),
            server_switches: get(&self.server_switches),
            active_server: get(&self.active_server),
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
    /// QoS 2 flows a broker's session did not hold any more (a switch to a server that
    /// does not share sessions, or a broker that lost the session) and that were sent
    /// again as new flows: at least once for these, not exactly once.
    pub qos2_restarted: u64,
    /// QoS 2 messages the broker answered with PUBACK (taken at QoS 1, RabbitMQ 3.x
    /// does): each was deleted as delivered, at least once.
    pub qos2_downgraded: u64,
    /// Moves from one upstream server to another (failover and failback).
    pub server_switches: u64,
    /// Index of the server in use, in the configured list (`url` is index 0).
    pub active_server: u64,
}

/// How often a continuing outage is summarised in the log.
pub const OUTAGE_SUMMARY_EVERY: Duration = Duration::from_secs(300);

/// What the uplink says in its log about an outage, decided with no I/O: the first
/// failure, then a summary at most every [`OUTAGE_SUMMARY_EVERY`] while it lasts, the
/// recovery with the rows waiting, and once those are sent, how long that took. The
/// reconnect attempts in between are not logged (they are counted): a broker that is
/// down for an hour costs a dozen lines, not one per backoff step.
#[derive(Debug, Default)]
pub struct OutageLog {
    down: Option<Down>,
    backlog: Option<Backlog>,
}

#[derive(Debug)]
struct Down {
    since: Instant,
    summarised: Instant,
    failures: u64,
    /// The kind of the failure last logged (credentials refused, or anything else).
    auth: bool,
}

#[derive(Debug)]
struct Backlog {
    since: Instant,
    rows: u64,
}

/// One thing worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutageNote {
    /// An outage began (or its kind changed: the broker now refuses our credentials,
    /// or no longer does): log the error.
    Down,
    /// Still down: a summary.
    StillDown { down_for: Duration, failures: u64 },
    /// Connected after an outage of `down_for`, with `rows` waiting.
    Recovered { down_for: Duration, rows: u64 },
    /// The rows waiting at the connection are sent.
    Drained { took: Duration, rows: u64 },
}

impl OutageLog {
    /// A connection attempt failed, or a connection was lost; `auth` if the broker
    /// refused our credentials.
    pub fn failed(&mut self, now: Instant, auth: bool) -> Option<OutageNote> {
        self.backlog = None;
        match &mut self.down {
            None => {
                self.down = Some(Down {
                    since: now,
                    summarised: now,
                    failures: 1,
                    auth,
                });
                Some(OutageNote::Down)
            }
            Some(down) => {
                down.failures += 1;
                if down.auth != auth {
                    down.auth = auth;
                    down.summarised = now;
                    return Some(OutageNote::Down);
                }
                if now.saturating_duration_since(down.summarised) < OUTAGE_SUMMARY_EVERY {
                    return None;
                }
                down.summarised = now;
                Some(OutageNote::StillDown {
                    down_for: now.saturating_duration_since(down.since),
                    failures: down.failures,
                })
            }
        }
    }

    /// A CONNACK arrived with `rows` waiting in the store.
    pub fn connected(&mut self, now: Instant, rows: u64) -> Option<OutageNote> {
        self.backlog = (rows > 0).then_some(Backlog { since: now, rows });
        self.down.take().map(|down| OutageNote::Recovered {
            down_for: now.saturating_duration_since(down.since),
            rows,
        })
    }

    /// The store has no more rows waiting to be sent.
    pub fn drained(&mut self, now: Instant) -> Option<OutageNote> {
        self.backlog.take().map(|backlog| OutageNote::Drained {
            took: now.saturating_duration_since(backlog.since),
            rows: backlog.rows,
        })
    }
}

/// `1,234,567`: row counts in log lines, readable at a glance.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `0.4 s`, `45 s`, `5 min`, `2 h 10 min`: how long an outage lasted, in words.
pub fn duration_words(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=9 => format!("{:.1} s", d.as_secs_f64()),
        10..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the uplink logged a WARN per reconnect attempt (11 lines in 30 s).
    #[tokio::test(start_paused = true)]
    async fn an_outage_is_logged_once_then_summarised_every_five_minutes() {
        let mut log = OutageLog::default();
        let start = Instant::now();
        let mut notes = Vec::new();
        // Attempts every 500 ms growing to a minute, for 16 minutes.
        let mut delay = Duration::from_millis(500);
        while start.elapsed() < Duration::from_secs(16 * 60) {
            if let Some(note) = log.failed(Instant::now(), false) {
                notes.push((start.elapsed().as_secs(), note));
            }
            tokio::time::advance(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
        let times: Vec<u64> = notes.iter().map(|(t, _)| *t).collect();
        assert_eq!(notes[0], (0, OutageNote::Down));
        assert!(
            matches!(notes[1].1, OutageNote::StillDown { down_for, failures }
                if down_for >= OUTAGE_SUMMARY_EVERY && failures > 5),
            "{notes:?}"
        );
        assert_eq!(
            notes.len(),
            4,
            "first failure and three summaries: {times:?}"
        );
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= 300, "{times:?}");
        }

        // The broker now refuses our credentials: that is news at once.
        assert_eq!(log.failed(Instant::now(), true), Some(OutageNote::Down));

        tokio::time::advance(Duration::from_secs(10)).await;
        let down_for = start.elapsed();
        assert_eq!(
            log.connected(Instant::now(), 1234),
            Some(OutageNote::Recovered {
                down_for,
                rows: 1234
            })
        );
        tokio::time::advance(Duration::from_secs(12)).await;
        assert_eq!(
            log.drained(Instant::now()),
            Some(OutageNote::Drained {
                took: Duration::from_secs(12),
                rows: 1234
            })
        );
        assert_eq!(log.drained(Instant::now()), None, "said once");
        // A connection without an outage before it, and nothing waiting: nothing to say.
        assert_eq!(log.connected(Instant::now(), 0), None);
        assert_eq!(log.drained(Instant::now()), None);
    }

    #[test]
    fn counts_and_durations_in_words() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1234), "1,234");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(duration_words(Duration::from_millis(420)), "0.4 s");
        assert_eq!(duration_words(Duration::from_secs(12)), "12 s");
        assert_eq!(duration_words(Duration::from_secs(300)), "5 min");
        assert_eq!(duration_words(Duration::from_secs(7800)), "2 h 10 min");
    }
}

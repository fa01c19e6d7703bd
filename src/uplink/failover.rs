//! Which of the configured upstream servers the uplink talks to, with no I/O.
//!
//! Invariants:
//! - The servers are tried in the configured order, starting with the first. Every
//!   failure (an attempt that did not reach CONNACK, or a connection lost) moves to the
//!   next server, wrapping around; the caller waits its usual backoff delay before the
//!   attempt, so a fleet that lost its broker does not hammer the next one.
//! - With one server nothing ever switches.
//! - Failback (when enabled) is due only while connected to a server other than the
//!   first, once that connection has lasted `after`; the caller then checks that the
//!   first server accepts TCP connections before it leaves a working connection. A
//!   check that fails waits another `after`.
//! - Each switch is reported once ([`Switch`]), for one log line and a counter.

use std::time::Duration;

use tokio::time::Instant;

/// A move from one server to another, by index in the configured list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub from: usize,
    pub to: usize,
    pub why: SwitchReason,
}

/// Why the uplink moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// The server failed (connection refused, lost, timed out, CONNACK refused).
    Failure,
    /// Back to the first server after a healthy stretch on another one.
    Failback,
}

/// The server choice of one uplink.
#[derive(Debug, Clone)]
pub struct Failover {
    count: usize,
    active: usize,
    /// `Some(after)` when failback is on.
    failback_after: Option<Duration>,
    /// When failback is next due, while connected to a later server.
    failback_at: Option<Instant>,
}

impl Failover {
    /// `count` servers (at least one); failback after `failback_after` when given.
    pub fn new(count: usize, failback_after: Option<Duration>) -> Failover {
        Failover {
            count: count.max(1),
            active: 0,
            failback_after,
            failback_at: None,
        }
    }

    /// Index of the server in use (or about to be tried).
    pub fn active(&self) -> usize {
        self.active
    }

    /// Whether there is more than one server to switch between.
    pub fn is_multi(&self) -> bool {
        self.count > 1
    }

    /// A CONNACK arrived from the active server at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.failback_at = match self.failback_after {
            Some(after) if self.active != 0 => Some(now + after),
            _ => None,
        };
    }

    /// The attempt or the connection failed: the next server, if there is another.
    pub fn failed(&mut self) -> Option<Switch> {
        self.failback_at = None;
        if self.count == 1 {
            return None;
        }
        let from = self.active;
        self.active = (self.active + 1) % self.count;
        Some(Switch {
            from,
            to: self.active,
            why: SwitchReason::Failure,
        })
    }

    /// When to check whether the first server is back, while that is worth doing.
    pub fn failback_due(&self) -> Option<Instant> {
        self.failback_at
    }

    /// The first server did not answer the check at `now`: try again `after` later.
    pub fn failback_refused(&mut self, now: Instant) {
        if let (Some(after), Some(_)) = (self.failback_after, self.failback_at) {
            self.failback_at = Some(now + after);
        }
    }

    /// The first server answers: move back to it.
    pub fn fail_back(&mut self) -> Option<Switch> {
        self.failback_at = None;
        if self.active == 0 {
            return None;
        }
        let from = self.active;
        self.active = 0;
        Some(Switch {
            from,
            to: 0,
            why: SwitchReason::Failback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(300);

    #[test]
    fn one_server_never_switches() {
        let mut failover = Failover::new(1, Some(AFTER));
        assert!(!failover.is_multi());
        assert_eq!(failover.failed(), None);
        failover.connected(Instant::now());
        assert_eq!(failover.failback_due(), None);
        assert_eq!(failover.active(), 0);
    }

    #[test]
    fn failures_go_round_the_list_in_order() {
        let mut failover = Failover::new(3, None);
        let order: Vec<(usize, usize)> = (0..4)
            .map(|_| failover.failed().map(|s| (s.from, s.to)).unwrap())
            .collect();
        assert_eq!(order, [(0, 1), (1, 2), (2, 0), (0, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn failback_is_due_after_a_healthy_stretch_on_a_later_server_only() {
        let mut failover = Failover::new(2, Some(AFTER));
        failover.connected(Instant::now());
        assert_eq!(failover.failback_due(), None, "already on the first server");
        failover.failed();
        assert_eq!(failover.active(), 1);
        assert_eq!(failover.failback_due(), None, "not connected yet");
        let start = Instant::now();
        failover.connected(start);
        assert_eq!(failover.failback_due(), Some(start + AFTER));

        // The first server does not answer: wait a whole stretch again.
        tokio::time::advance(AFTER).await;
        failover.failback_refused(Instant::now());
        assert_eq!(failover.failback_due(), Some(start + 2 * AFTER));

        // A lost connection starts the stretch over.
        tokio::time::advance(AFTER / 2).await;
        assert_eq!(failover.failed().map(|s| s.to), Some(0));
        failover.failed();
        tokio::time::advance(Duration::from_secs(1)).await;
        let again = Instant::now();
        failover.connected(again);
        assert_eq!(failover.failback_due(), Some(again + AFTER));

        tokio::time::advance(AFTER).await;
        assert_eq!(
            failover.fail_back(),
            Some(Switch {
                from: 1,
                to: 0,
                why: SwitchReason::Failback
            })
        );
        failover.connected(Instant::now());
        assert_eq!(failover.failback_due(), None);
        assert_eq!(failover.fail_back(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failback_off_by_default_stays_on_the_working_server() {
        let mut failover = Failover::new(2, None);
        failover.failed();
        failover.connected(Instant::now());
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert_eq!(failover.failback_due(), None);
        assert_eq!(failover.active(), 1);
    }
}

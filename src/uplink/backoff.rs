//! Reconnect delays: exponential with jitter and a cap.
//!
//! Invariants:
//! - Every delay lies in `[min, max]`; the ceiling doubles after each failure until it
//!   reaches `max`, and `reset` (after a successful CONNACK) returns it to `min`.
//! - Jitter takes the delay uniformly from the upper half of the current ceiling
//!   ("equal jitter"): a fleet of gateways that lost the same broker spreads its
//!   reconnects, and no delay is ever shorter than half the ceiling.

use std::time::Duration;

/// The reconnect delay sequence of one uplink.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// `min` is raised to 1 ms and `max` to `min`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff::with_rng(min, max, fastrand::Rng::new())
    }

    /// As [`Backoff::new`] with a given random source (tests use a seed).
    pub fn with_rng(min: Duration, max: Duration, rng: fastrand::Rng) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            ceiling: min,
            attempt: 0,
            rng,
        }
    }

    /// The delay before the next attempt; raises the ceiling for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling.as_micros();
        let half = ceiling / 2;
        let jittered = half + u128::from(self.rng.u64(0..=u64::try_from(half).unwrap_or(u64::MAX)));
        let delay = Duration::from_micros(u64::try_from(jittered).unwrap_or(u64::MAX))
            .clamp(self.min, self.max);
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Failed attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Back to the shortest delay, after a connection succeeded.
    pub fn reset(&mut self) {
        self.ceiling = self.min;
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_with_jitter_up_to_the_cap() {
        for seed in 0..50 {
            let mut backoff = Backoff::with_rng(ms(100), ms(5_000), fastrand::Rng::with_seed(seed));
            let mut ceiling = ms(100);
            for _ in 0..20 {
                let delay = backoff.next_delay();
                assert!(delay >= ms(100) && delay <= ms(5_000), "{delay:?}");
                assert!(delay <= ceiling, "{delay:?} above {ceiling:?}");
                assert!(delay >= ceiling / 2, "{delay:?} below half of {ceiling:?}");
                ceiling = (ceiling * 2).min(ms(5_000));
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..20 {
            let mut backoff =
                Backoff::with_rng(ms(1_000), ms(60_000), fastrand::Rng::with_seed(seed));
            for _ in 0..4 {
                backoff.next_delay();
            }
            seen.insert(backoff.next_delay());
        }
        assert!(seen.len() > 10, "{seen:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::with_rng(ms(10), ms(10_000), fastrand::Rng::with_seed(7));
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert_eq!(backoff.attempt(), 10);
        backoff.reset();
        assert_eq!(backoff.attempt(), 0);
        assert!(backoff.next_delay() <= ms(10));
    }

    #[test]
    fn degenerate_bounds_are_fixed_up() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff.next_delay(), ms(1));
        let mut backoff = Backoff::new(ms(50), ms(10));
        assert_eq!(backoff.next_delay(), ms(50));
        assert_eq!(backoff.next_delay(), ms(50));
    }
}

//! A token bucket: so many units per second with a burst of a tenth of a second's worth
//! (at least one unit). The backlog replay limit and the cloud profiles' pace both use
//! it. No I/O: the caller passes `now`.
//!
//! Invariants:
//! - The bucket starts full and never holds more than its burst.
//! - A cost above the burst waits for a full bucket, then drives the bucket below
//!   zero, so the long-run rate still holds for large items.

use std::time::Duration;

use tokio::time::Instant;

/// Units per second with a small burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// `per_sec` is raised to 1.
    pub fn new(per_sec: u32) -> TokenBucket {
        let per_sec = f64::from(per_sec.max(1));
        let burst = (per_sec / 10.0).max(1.0);
        TokenBucket {
            per_sec,
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        }
        self.last = Some(now);
    }

    /// When `cost` may be spent, or `None` if it may now (nothing is spent).
    pub fn ready_at(&mut self, now: Instant, cost: f64) -> Option<Instant> {
        self.refill(now);
        let need = cost.min(self.burst);
        (self.tokens < need)
            .then(|| now + Duration::from_secs_f64((need - self.tokens) / self.per_sec))
    }

    /// Spends `cost` (after [`TokenBucket::ready_at`] said it may).
    pub fn spend(&mut self, cost: f64) {
        self.tokens -= cost;
    }

    /// Spends `cost` if it may go now; otherwise when to try again.
    pub fn take(&mut self, now: Instant, cost: f64) -> Result<(), Instant> {
        match self.ready_at(now, cost) {
            Some(at) => Err(at),
            None => {
                self.spend(cost);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn keeps_its_rate_after_the_burst() {
        let mut bucket = TokenBucket::new(50);
        let start = Instant::now();
        let mut sent = 0u32;
        while start.elapsed() < Duration::from_secs(4) {
            match bucket.take(Instant::now(), 1.0) {
                Ok(()) => sent += 1,
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
        assert!((200..=206).contains(&sent), "{sent}");
    }
}

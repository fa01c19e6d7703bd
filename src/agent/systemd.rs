//! systemd integration: READY/RELOADING/STOPPING notifications and a watchdog that pings
//! only while the agent's main loops make progress.
//!
//! Each supervised loop owns a [`Heartbeat`] and beats it at least every
//! [`BEAT_PERIOD`], also when idle. The watchdog task pings systemd (`WATCHDOG=1`) at
//! half the `WatchdogSec` interval, and only if every heartbeat is fresh; a loop that
//! hangs therefore stops the pings and systemd restarts the service. Without
//! `NOTIFY_SOCKET` (not under systemd) every notification is a no-op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a healthy loop beats, at the least.
pub const BEAT_PERIOD: Duration = Duration::from_secs(1);

/// Sends one notification; a failure is logged, never fatal.
pub fn notify(state: NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %err, "systemd notification failed");
    }
}

/// The time of a loop's last sign of progress.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    name: &'static str,
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    pub fn new(name: &'static str) -> Heartbeat {
        Heartbeat {
            name,
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn beat(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec))
    } else {
        None
    }
}

/// Pings the watchdog every `interval / 2` while all `loops` have beaten within that
/// time (or within two beat periods, for a watchdog interval shorter than that).
pub async fn run_watchdog(interval: Duration, loops: Vec<Heartbeat>, stop: CancellationToken) {
    let period = interval / 2;
    let limit = period.max(BEAT_PERIOD * 2);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled: Option<&'static str> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match first_stalled(&loops, limit) {
            Some(stuck) => {
                if stalled != Some(stuck.name) {
                    tracing::error!(
                        task = stuck.name,
                        silent_ms = stuck.age().as_millis() as u64,
                        "main loop made no progress: withholding watchdog pings"
                    );
                    stalled = Some(stuck.name);
                }
            }
            None => {
                if let Some(name) = stalled.take() {
                    tracing::info!(task = name, "main loop progressing again");
                }
                notify(NotifyState::Watchdog);
            }
        }
    }
}

/// The first loop that has not beaten within `limit`, if any.
fn first_stalled(loops: &[Heartbeat], limit: Duration) -> Option<&Heartbeat> {
    loops.iter().find(|beat| beat.age() > limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn heartbeat_ages_with_time_and_resets_on_beat() {
        let beat = Heartbeat::new("test");
        beat.beat();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(beat.age(), Duration::from_secs(3));
        beat.beat();
        assert_eq!(beat.age(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_loop_withholds_the_ping_until_it_beats_again() {
        let pipeline = Heartbeat::new("pipeline");
        let health = Heartbeat::new("health");
        let loops = [pipeline.clone(), health.clone()];
        let limit = Duration::from_secs(15);
        pipeline.beat();
        health.beat();
        assert!(first_stalled(&loops, limit).is_none());

        tokio::time::advance(Duration::from_secs(10)).await;
        health.beat();
        tokio::time::advance(Duration::from_secs(10)).await;
        let stalled = first_stalled(&loops, limit).expect("pipeline is silent");
        assert_eq!(stalled.name, "pipeline");

        pipeline.beat();
        assert!(first_stalled(&loops, limit).is_none());
    }
}

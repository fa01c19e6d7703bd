//! Truthful timestamps: the `[time]` section, and the [`TimeKeeper`] that marks readings
//! taken while the wall clock is not synchronized and corrects them once it is.
//!
//! ```toml
//! [time]
//! trust = "ntp"          # or "always": the wall clock is right whatever its status
//! require_sync = false   # true: nothing leaves for upstream before the first sync
//! sync_file = "/run/systemd/timesync/synchronized"
//! ```
//!
//! Invariants:
//! - A reading handled while the clock is not synchronized is marked
//!   [`TimeMark::Unsynced`] and, where the kernel gives a boot id, carries a
//!   [`Stamp`] (boot id, boot clock) into the store.
//! - When the sync arrives the keeper takes `offset = wall − boot clock`, once; the
//!   true time of a reading of this boot is `offset + its boot clock`. Readings taken
//!   before and not sent yet are corrected with it and marked [`TimeMark::Corrected`]:
//!   those still in the channel as they are handled, the pipeline's pending batch at
//!   once ([`TimeKeeper::correct_pending`]), and the store's rows of this boot and its
//!   uncommitted batches by one store request ([`TimeKeeper::store_work`]), queued
//!   behind every batch handed over before it. Rows in flight upstream are not touched
//!   (a resent PUBLISH must be the same message).
//! - Readings of an earlier boot whose clock never synchronized keep their mark and
//!   their time: no offset is known for them, and none is invented.
//! - `require_sync = true`: the store hands nothing to the uplink until the first sync
//!   and the correction queued behind it, so the upstream side only sees corrected
//!   times from this boot; polling and the LAN broker go on meanwhile, marked
//!   `unsynced`. After that first sync a later loss of sync marks readings again but
//!   holds nothing (the clock then runs on from a good time).
//! - Correction faults (disk full, read-only disk) are logged once per state change,
//!   counted (`correction_failures`) and retried with backoff (1 s doubling to
//!   60 s).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::clock::{self, ClockSource, Stamp, SystemClock, TrustedClock};
use crate::field::{retime_payload, FieldEvent, TimeMark};
use crate::problem::{Invalid, Problems};
use crate::store::{Message, Queue, Retimed};

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where systemd-timesyncd says it has synchronized the clock.
pub const TIMESYNCD_FILE: &str = "/run/systemd/timesync/synchronized";

/// What makes the wall clock trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    /// Always (a battery-backed clock, or a clock set by hand): readings are never marked.
    Always,
    /// Once a time source synchronized it: the kernel's NTP status or `sync_file`.
    #[default]
    Ntp,
}

/// `[time]`: how far the wall clock is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConfig {
    /// `"ntp"` (default) or `"always"`.
    pub trust: Trust,
    /// Hold everything for upstream in the store until the clock is synchronized
    /// (then send it corrected). Default false: send at once, marked `unsynced`.
    pub require_sync: bool,
    /// systemd-timesyncd's flag file: where its directory exists, the file decides
    /// whether the clock is synchronized; elsewhere the kernel's NTP status does.
    /// Default `/run/systemd/timesync/synchronized`.
    pub sync_file: PathBuf,
}

impl Default for TimeConfig {
    fn default() -> Self {
        TimeConfig {
            trust: Trust::Ntp,
            require_sync: false,
            sync_file: PathBuf::from(TIMESYNCD_FILE),
        }
    }
}

impl TimeConfig {
    /// Problems with the `[time]` keys.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        let mut time = problems.at("time");
        if time.non_empty("sync_file", &self.sync_file.to_string_lossy()) {
            time.check(
                self.sync_file.is_absolute(),
                "sync_file",
                "must be an absolute path (the agent runs from /)",
            );
        }
        time.check(
            !(self.require_sync && self.trust == Trust::Always),
            "require_sync",
            "with trust = \"always\" the clock counts as synchronized from the start, so \
             nothing would wait: set trust = \"ntp\" or drop require_sync",
        );
        problems.into_vec()
    }

    /// The clock source this section describes.
    pub fn source(&self) -> Arc<dyn ClockSource> {
        match self.trust {
            Trust::Always => Arc::new(TrustedClock),
            Trust::Ntp => Arc::new(SystemClock {
                sync_file: Some(self.sync_file.clone()),
            }),
        }
    }
}

/// Figures for the health report and `/metrics`.
#[derive(Debug, Default)]
pub struct TimeCounters {
    /// Whether the wall clock is synchronized now.
    pub synced: AtomicBool,
    /// Readings sent with `"time":"unsynced"`.
    pub unsynced: AtomicU64,
    /// Readings corrected after the sync (in memory and in the store).
    pub corrected: AtomicU64,
    /// Corrections of the store that failed (retried with backoff).
    pub correction_failures: AtomicU64,
    /// Set by a failed store correction: the keeper tries again.
    retry: AtomicBool,
    /// The last store correction failed (for one log line per change).
    failing: AtomicBool,
}

type StoreWork = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Debug, Clone, Copy)]
enum State {
    Unsynced,
    /// Synchronized since `since_mono` (boot clock); the wall time at boot clock zero is
    /// `offset_ms`.
    Synced {
        since_mono: u64,
        offset_ms: i64,
    },
}

/// The pipeline's view of the clock (see the module doc).
pub struct TimeKeeper {
    source: Arc<dyn ClockSource>,
    boot: Option<i64>,
    state: State,
    counters: Arc<TimeCounters>,
    /// The store holds rows back from the uplink until the first correction.
    holding: bool,
    /// A store correction is wanted (after a sync, or a failed attempt).
    correction_due: bool,
    next_try: Instant,
    retry_wait: Duration,
}

impl TimeKeeper {
    /// A keeper on `source`, its status read now. With `require_sync` and no sync yet,
    /// [`TimeKeeper::holds_upstream`] is true: the caller asks the store to hold
    /// before the uplink starts.
    pub fn new(
        source: Arc<dyn ClockSource>,
        require_sync: bool,
        counters: Arc<TimeCounters>,
    ) -> TimeKeeper {
        TimeKeeper::with_boot(source, clock::boot_id(), require_sync, counters)
    }

    fn with_boot(
        source: Arc<dyn ClockSource>,
        boot: Option<i64>,
        require_sync: bool,
        counters: Arc<TimeCounters>,
    ) -> TimeKeeper {
        let mut keeper = TimeKeeper {
            source,
            boot,
            state: State::Unsynced,
            counters,
            holding: false,
            correction_due: false,
            next_try: Instant::now(),
            retry_wait: RETRY_MIN,
        };
        if keeper.source.synced() {
            // Rows an earlier run of this boot left unsynced are corrected too.
            keeper.synchronized();
        } else {
            keeper.holding = require_sync;
            // Normal at boot on a gateway without RTC: not a warning.
            tracing::info!(
                held_upstream = require_sync,
                "the wall clock is not synchronized yet: readings are marked \"unsynced\" \
                 until it is, then corrected"
            );
        }
        keeper
    }

    pub fn counters(&self) -> &Arc<TimeCounters> {
        &self.counters
    }

    /// Whether the store is to hold rows back from the uplink (until the first sync).
    pub fn holds_upstream(&self) -> bool {
        self.holding
    }

    fn synchronized(&mut self) {
        let mono = self.source.mono_ms();
        let offset_ms = self
            .source
            .wall_ms()
            .saturating_sub(i64::try_from(mono).unwrap_or(i64::MAX));
        self.state = State::Synced {
            since_mono: mono,
            offset_ms,
        };
        self.counters.synced.store(true, Ordering::Relaxed);
        self.correction_due = self.boot.is_some() || self.holding;
        self.next_try = Instant::now();
        self.retry_wait = RETRY_MIN;
    }

    /// Reads the sync status; returns true when the sync has just arrived (the caller
    /// then corrects what it holds with [`TimeKeeper::correct_pending`]).
    pub fn check(&mut self) -> bool {
        if self.counters.retry.swap(false, Ordering::AcqRel) {
            self.correction_due = true;
            self.next_try = Instant::now() + self.retry_wait;
            self.retry_wait = (self.retry_wait * 2).min(RETRY_MAX);
        }
        let synced = self.source.synced();
        match (self.state, synced) {
            (State::Unsynced, true) => {
                self.synchronized();
                tracing::info!(
                    "the wall clock is synchronized: readings taken before are corrected \
                     and marked \"corrected\""
                );
                true
            }
            (State::Synced { .. }, false) => {
                self.state = State::Unsynced;
                self.counters.synced.store(false, Ordering::Relaxed);
                tracing::warn!(
                    "the wall clock lost its synchronization: readings are marked \"unsynced\""
                );
                false
            }
            _ => false,
        }
    }

    /// Marks one event as it enters the pipeline; returns the stamp the store keeps
    /// with an unsynced reading.
    pub fn mark(&self, event: &mut FieldEvent) -> Option<Stamp> {
        match event {
            FieldEvent::Reading(reading) => {
                let (mark, stamp) = self.retime(&mut reading.ts_ms, reading.mono_ms);
                reading.time = mark;
                match mark {
                    TimeMark::Unsynced => &self.counters.unsynced,
                    TimeMark::Corrected => &self.counters.corrected,
                    TimeMark::Synced => return None,
                }
                .fetch_add(1, Ordering::Relaxed);
                stamp
            }
            FieldEvent::Batch {
                payload_json,
                ts_ms,
                mono_ms,
                ..
            } => {
                let before = *ts_ms;
                let (mark, stamp) = self.retime(ts_ms, *mono_ms);
                if mark != TimeMark::Synced {
                    match retime_payload(payload_json.as_bytes(), *ts_ms - before, mark)
                        .and_then(|p| String::from_utf8(p).ok())
                    {
                        Some(payload) => *payload_json = payload,
                        None => *ts_ms = before,
                    }
                }
                stamp
            }
            FieldEvent::DeviceState { .. } => None,
        }
    }

    /// The mark of a reading taken at `mono_ms`, with `ts_ms` corrected when it can be.
    fn retime(&self, ts_ms: &mut i64, mono_ms: u64) -> (TimeMark, Option<Stamp>) {
        match self.state {
            State::Unsynced => (
                TimeMark::Unsynced,
                self.boot.map(|boot| Stamp { boot, mono_ms }),
            ),
            State::Synced {
                since_mono,
                offset_ms,
            } if mono_ms < since_mono => {
                *ts_ms = true_time(offset_ms, mono_ms);
                (TimeMark::Corrected, None)
            }
            State::Synced { .. } => (TimeMark::Synced, None),
        }
    }

    /// Corrects messages of this boot not handed to the store yet; returns how many.
    pub fn correct_pending(&self, messages: &mut [Message]) -> u64 {
        let (State::Synced { offset_ms, .. }, Some(boot)) = (self.state, self.boot) else {
            return 0;
        };
        let mut corrected = 0;
        for message in messages {
            let Some(stamp) = message.unsynced.filter(|s| s.boot == boot) else {
                continue;
            };
            let ts = true_time(offset_ms, stamp.mono_ms);
            if let Some(payload) = retime_payload(
                &message.payload,
                ts.saturating_sub(message.created_ms),
                TimeMark::Corrected,
            ) {
                message.payload = payload.into();
                message.created_ms = ts;
                message.unsynced = None;
                corrected += 1;
            }
        }
        self.counters
            .corrected
            .fetch_add(corrected, Ordering::Relaxed);
        corrected
    }

    /// The store requests a sync calls for, when due: the correction of this boot's rows
    /// (see [`Queue::retime`]), then the end of the hold. Resolves once queued; the
    /// answer comes back through the counters.
    pub fn store_work(&mut self, queue: &Queue) -> Option<StoreWork> {
        let State::Synced { offset_ms, .. } = self.state else {
            return None;
        };
        if !self.correction_due || Instant::now() < self.next_try {
            return None;
        }
        self.correction_due = false;
        let release = std::mem::take(&mut self.holding);
        let queue = queue.clone();
        let boot = self.boot;
        let counters = Arc::clone(&self.counters);
        Some(Box::pin(async move {
            if let Some(boot) = boot {
                let done = Box::new(move |result: Result<Retimed, crate::store::Error>| {
                    answered(&counters, result);
                });
                queue
                    .retime(
                        boot,
                        offset_ms,
                        |p, d| retime_payload(p, d, TimeMark::Corrected),
                        done,
                    )
                    .await;
            }
            if release {
                queue.hold(false).await;
                tracing::info!("the clock is synchronized: stored readings go upstream now");
            }
        }))
    }
}

/// The store's answer to a correction (on the store thread: no waiting here). One log
/// line when corrections start failing, one when one succeeds again.
fn answered(counters: &TimeCounters, result: Result<Retimed, crate::store::Error>) {
    match result {
        Ok(retimed) => {
            counters
                .corrected
                .fetch_add(retimed.rows, Ordering::Relaxed);
            let recovered = counters.failing.swap(false, Ordering::AcqRel);
            if retimed.rows > 0 || recovered {
                tracing::info!(
                    corrected = retimed.rows,
                    in_flight = retimed.in_flight,
                    "corrected the times of the stored readings taken before the sync"
                );
            }
        }
        Err(error) => {
            counters.correction_failures.fetch_add(1, Ordering::Relaxed);
            if counters.failing.swap(true, Ordering::AcqRel) {
                tracing::debug!(%error, "correcting the stored readings' times failed again");
            } else {
                tracing::warn!(
                    %error,
                    "could not correct the stored readings' times; retrying with backoff"
                );
            }
            counters.retry.store(true, Ordering::Release);
        }
    }
}

/// The wall time of boot-clock time `mono_ms`, given the offset.
fn true_time(offset_ms: i64, mono_ms: u64) -> i64 {
    offset_ms.saturating_add(i64::try_from(mono_ms).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;

    use super::*;
    use crate::field::{Quality, Reading, Value};
    use crate::mqtt::QoS;
    use crate::store::{DrainOrder, Priority, StoreConfig};

    const BOOT: i64 = 42;

    /// A clock the test sets: wall, boot clock, sync status.
    #[derive(Default)]
    struct FakeClock {
        wall: AtomicI64,
        mono: AtomicU64,
        synced: AtomicBool,
    }

    impl FakeClock {
        fn at(&self, wall_ms: i64, mono_ms: u64, synced: bool) {
            self.wall.store(wall_ms, Ordering::SeqCst);
            self.mono.store(mono_ms, Ordering::SeqCst);
            self.synced.store(synced, Ordering::SeqCst);
        }
    }

    impl ClockSource for FakeClock {
        fn wall_ms(&self) -> i64 {
            self.wall.load(Ordering::SeqCst)
        }
        fn mono_ms(&self) -> u64 {
            self.mono.load(Ordering::SeqCst)
        }
        fn synced(&self) -> bool {
            self.synced.load(Ordering::SeqCst)
        }
    }

    fn keeper(clock: &Arc<FakeClock>, require_sync: bool) -> TimeKeeper {
        let source: Arc<dyn ClockSource> = clock.clone();
        TimeKeeper::with_boot(source, Some(BOOT), require_sync, Arc::default())
    }

    /// A reading taken now on `clock`.
    fn reading(clock: &FakeClock) -> FieldEvent {
        FieldEvent::Reading(Reading {
            device: "meter".into(),
            point: "power".into(),
            topic: None,
            value: Some(Value::Float(1.5)),
            unit: None,
            ts_ms: clock.wall_ms(),
            mono_ms: clock.mono_ms(),
            time: TimeMark::Synced,
            quality: Quality::Good,
        })
    }

    fn taken(event: FieldEvent) -> Reading {
        match event {
            FieldEvent::Reading(r) => r,
            other => panic!("not a reading: {other:?}"),
        }
    }

    fn stored(reading: &Reading, stamp: Option<Stamp>) -> Message {
        Message {
            topic: "fb/meter/power".into(),
            payload: reading.payload_json().into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            created_ms: reading.ts_ms,
            priority: Priority::Periodic,
            unsynced: stamp,
        }
    }

    fn json(message: &Message) -> serde_json::Value {
        serde_json::from_slice(&message.payload).expect("json")
    }

    /// 1970 plus a few seconds, as a Pi without RTC and without a saved time boots.
    const BOOTED_AT: i64 = 5_000;
    /// The true time the sync brings: the wall clock then steps to it.
    const TRUE_AT_SYNC: i64 = 1_764_590_000_000;

    #[test]
    fn readings_before_the_sync_are_marked_then_corrected_with_the_boot_clock_offset() {
        let clock = Arc::new(FakeClock::default());
        clock.at(BOOTED_AT, 10_000, false);
        let mut time = keeper(&clock, false);
        assert!(!time.counters().synced.load(Ordering::Relaxed));

        let mut event = reading(&clock);
        let stamp = time.mark(&mut event);
        assert_eq!(
            stamp,
            Some(Stamp {
                boot: BOOT,
                mono_ms: 10_000
            })
        );
        let early = taken(event);
        assert_eq!(early.time, TimeMark::Unsynced);
        assert_eq!(early.ts_ms, BOOTED_AT, "an unsynced time is sent as it is");
        let mut pending = vec![stored(&early, stamp)];
        assert_eq!(json(&pending[0])["time"], "unsynced");

        // Taken 5 s later, still waiting in the channel when the sync arrives.
        clock.at(BOOTED_AT + 5_000, 15_000, false);
        let in_channel = reading(&clock);
        // 10 s after the first reading NTP steps the clock.
        clock.at(TRUE_AT_SYNC, 20_000, true);
        assert!(time.check(), "the sync is news once");
        assert!(!time.check());
        assert!(time.counters().synced.load(Ordering::Relaxed));

        assert_eq!(time.correct_pending(&mut pending), 1);
        let corrected = &pending[0];
        assert_eq!(corrected.created_ms, TRUE_AT_SYNC - 10_000);
        assert_eq!(corrected.unsynced, None);
        assert_eq!(json(corrected)["ts"], TRUE_AT_SYNC - 10_000);
        assert_eq!(json(corrected)["time"], "corrected");

        let mut event = in_channel;
        assert_eq!(time.mark(&mut event), None);
        let late = taken(event);
        assert_eq!(
            (late.time, late.ts_ms),
            (TimeMark::Corrected, TRUE_AT_SYNC - 5_000)
        );

        clock.at(TRUE_AT_SYNC + 1_000, 21_000, true);
        let mut event = reading(&clock);
        assert_eq!(time.mark(&mut event), None);
        let now = taken(event);
        assert_eq!(
            (now.time, now.ts_ms),
            (TimeMark::Synced, TRUE_AT_SYNC + 1_000)
        );
        assert!(!now.payload_json().contains("time"));

        let counters = time.counters();
        assert_eq!(counters.unsynced.load(Ordering::Relaxed), 1);
        assert_eq!(counters.corrected.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_batch_taken_before_the_sync_is_marked_and_corrected_as_a_whole() {
        let clock = Arc::new(FakeClock::default());
        clock.at(BOOTED_AT, 10_000, false);
        let mut time = keeper(&clock, false);
        let batch = |clock: &FakeClock| FieldEvent::Batch {
            device: "meter".into(),
            payload_json: crate::field::reading::batch_json(
                clock.wall_ms(),
                &[taken(reading(clock))],
            ),
            ts_ms: clock.wall_ms(),
            mono_ms: clock.mono_ms(),
        };
        let mut unsynced = batch(&clock);
        assert!(time.mark(&mut unsynced).is_some());
        let FieldEvent::Batch { payload_json, .. } = &unsynced else {
            unreachable!()
        };
        let parsed: serde_json::Value = serde_json::from_str(payload_json).unwrap();
        assert_eq!(parsed["time"], "unsynced");

        let mut in_channel = batch(&clock);
        clock.at(TRUE_AT_SYNC, 20_000, true);
        assert!(time.check());
        assert_eq!(time.mark(&mut in_channel), None);
        let FieldEvent::Batch {
            payload_json,
            ts_ms,
            ..
        } = &in_channel
        else {
            unreachable!()
        };
        let parsed: serde_json::Value = serde_json::from_str(payload_json).unwrap();
        assert_eq!(*ts_ms, TRUE_AT_SYNC - 10_000);
        assert_eq!(parsed["ts"], TRUE_AT_SYNC - 10_000);
        assert_eq!(parsed["points"]["power"]["ts"], TRUE_AT_SYNC - 10_000);
        assert_eq!(parsed["time"], "corrected");
    }

    #[test]
    fn a_backwards_jump_of_a_synchronized_clock_is_no_sync_and_invents_nothing() {
        let clock = Arc::new(FakeClock::default());
        clock.at(TRUE_AT_SYNC, 20_000, true);
        let mut time = keeper(&clock, false);
        // An NTP step back by an hour: the clock stays synchronized.
        clock.at(TRUE_AT_SYNC - 3_600_000, 21_000, true);
        assert!(!time.check(), "no new sync, nothing to correct");
        let mut event = reading(&clock);
        assert_eq!(time.mark(&mut event), None);
        let r = taken(event);
        assert_eq!(
            (r.time, r.ts_ms),
            (TimeMark::Synced, TRUE_AT_SYNC - 3_600_000)
        );

        // Losing the sync marks again; the next sync takes a new offset.
        clock.at(TRUE_AT_SYNC - 3_000_000, 22_000, false);
        assert!(!time.check());
        let mut event = reading(&clock);
        assert!(time.mark(&mut event).is_some());
        assert_eq!(taken(event).time, TimeMark::Unsynced);
        clock.at(TRUE_AT_SYNC + 50_000, 30_000, true);
        assert!(time.check());
        let mut pending = vec![{
            let r = Reading {
                ts_ms: TRUE_AT_SYNC - 3_000_000,
                mono_ms: 22_000,
                time: TimeMark::Unsynced,
                ..taken(reading(&clock))
            };
            stored(
                &r,
                Some(Stamp {
                    boot: BOOT,
                    mono_ms: 22_000,
                }),
            )
        }];
        assert_eq!(time.correct_pending(&mut pending), 1);
        assert_eq!(pending[0].created_ms, TRUE_AT_SYNC + 42_000);
    }

    #[test]
    fn without_a_boot_id_nothing_is_stamped_so_nothing_is_ever_corrected() {
        let clock = Arc::new(FakeClock::default());
        clock.at(BOOTED_AT, 10_000, false);
        let source: Arc<dyn ClockSource> = clock.clone();
        let mut time = TimeKeeper::with_boot(source, None, false, Arc::default());
        let mut event = reading(&clock);
        assert_eq!(time.mark(&mut event), None);
        assert_eq!(taken(event).time, TimeMark::Unsynced);
        clock.at(TRUE_AT_SYNC, 20_000, true);
        assert!(time.check());
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(StoreConfig {
            path: dir.path().join("q.db"),
            ..StoreConfig::default()
        })
        .expect("open");
        assert!(
            time.store_work(&queue).is_none(),
            "no boot id, no hold: no request"
        );
    }

    async fn wait_until(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn require_sync_holds_the_store_until_the_sync_and_its_correction() {
        let clock = Arc::new(FakeClock::default());
        clock.at(BOOTED_AT, 10_000, false);
        let mut time = keeper(&clock, true);
        assert!(time.holds_upstream());
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(StoreConfig {
            path: dir.path().join("q.db"),
            commit_interval_ms: 2,
            ..StoreConfig::default()
        })
        .expect("open");
        queue.hold(true).await;
        let mut event = reading(&clock);
        let stamp = time.mark(&mut event);
        queue
            .append(vec![stored(&taken(event), stamp)])
            .await
            .expect("append");
        assert!(time.store_work(&queue).is_none(), "not synchronized yet");
        assert!(queue
            .next(10, DrainOrder::OldestFirst)
            .await
            .expect("next")
            .is_empty());

        clock.at(TRUE_AT_SYNC, 20_000, true);
        assert!(time.check());
        time.store_work(&queue)
            .expect("correction and release")
            .await;
        assert!(time.store_work(&queue).is_none(), "once");
        let rows = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
        assert_eq!(rows.len(), 1, "released");
        let message = &rows[0].message;
        assert_eq!(message.created_ms, TRUE_AT_SYNC - 10_000);
        assert_eq!(json(message)["time"], "corrected");
        let counters = time.counters().clone();
        wait_until("the correction counted", || {
            counters.corrected.load(Ordering::Relaxed) == 1
        })
        .await;
        queue.close().await.expect("close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_correction_is_retried_with_growing_waits() {
        let clock = Arc::new(FakeClock::default());
        clock.at(TRUE_AT_SYNC, 20_000, true);
        let mut time = keeper(&clock, false);
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(StoreConfig {
            path: dir.path().join("q.db"),
            ..StoreConfig::default()
        })
        .expect("open");
        let mut attempts = Vec::new();
        queue
            .pragma("PRAGMA query_only = 1")
            .await
            .expect("read-only");
        let start = Instant::now();
        while attempts.len() < 3 {
            if let Some(work) = time.store_work(&queue) {
                attempts.push(start.elapsed());
                work.await;
                let counters = time.counters().clone();
                let failures = attempts.len() as u64;
                // The store answers on its own thread, which paused time does not wait
                // for: wait on real time, bounded.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while counters.correction_failures.load(Ordering::Relaxed) < failures {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no answer from the store"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            time.check();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let secs: Vec<u64> = attempts.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [0, 1, 3], "1 s, then 2 s: {attempts:?}");
        queue.close().await.expect("close");
    }
}

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
//!   counted (`correction_failures`) and retried with backoff ([`RETRY_MIN`] doubling
//!   to [`RETRY_MAX`]).

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
    failing: bool,
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
            failing: false,
        };
        if keeper.source.synced() {
            // Rows an earlier run of this boot left unsynced are corrected too.
            keeper.synchronized();
        } else {
            keeper.holding = require_sync;
            tracing::warn!(
                held_upstream = require_sync,
                "the wall clock is not synchronized: readings are marked \"unsynced\" \
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
            if !self.failing {
                self.failing = true;
                tracing::warn!(
                    "could not correct the stored readings' times; retrying with backoff"
                );
            }
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
        let was_failing = std::mem::take(&mut self.failing);
        Some(Box::pin(async move {
            if let Some(boot) = boot {
                let done = Box::new(move |result: Result<Retimed, crate::store::Error>| {
                    answered(&counters, result, was_failing);
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

/// The store's answer to a correction (on the store thread: no waiting here).
fn answered(
    counters: &TimeCounters,
    result: Result<Retimed, crate::store::Error>,
    was_failing: bool,
) {
    match result {
        Ok(retimed) => {
            counters
                .corrected
                .fetch_add(retimed.rows, Ordering::Relaxed);
            if retimed.rows > 0 || was_failing {
                tracing::info!(
                    corrected = retimed.rows,
                    in_flight = retimed.in_flight,
                    "corrected the times of the stored readings taken before the sync"
                );
            }
        }
        Err(error) => {
            counters.correction_failures.fetch_add(1, Ordering::Relaxed);
            counters.retry.store(true, Ordering::Release);
            tracing::debug!(%error, "correcting the stored readings' times failed");
        }
    }
}

/// The wall time of boot-clock time `mono_ms`, given the offset.
fn true_time(offset_ms: i64, mono_ms: u64) -> i64 {
    offset_ms.saturating_add(i64::try_from(mono_ms).unwrap_or(i64::MAX))
}

//! The `[store]` section of the configuration.
//!
//! Invariants: every key has a documented default, so an empty `[store]` (or none) is a
//! working configuration; unknown keys are rejected; [`StoreConfig::validate`] bounds
//! every number the queue sizes or times something by (no zero interval, no zero-row
//! buffer, no limit the queue cannot keep), and [`super::Queue::open`] refuses a
//! configuration it rejects.

use std::path::PathBuf;

use serde::Deserialize;

use crate::problem::{Invalid, Problems};

/// How hard SQLite pushes each commit to the storage medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// WAL with `synchronous = NORMAL`: a committed append survives a crash or kill of
    /// the process; a power cut may lose the commits made since the last checkpoint
    /// (at most ~10 s), but never corrupts the file. No fsync per commit, so it is the
    /// flash-friendly choice.
    #[default]
    Normal,
    /// WAL with `synchronous = FULL`: the WAL is fsynced on every commit, so a committed
    /// append also survives a power cut. Costs one fsync per group commit.
    Full,
}

/// What gives way when a retention limit is reached. In both cases periodic values go
/// before events, and events before alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Keep the newest data: the oldest undelivered rows of the lowest priority go.
    #[default]
    DropOldest,
    /// Keep the backlog: the newest rows of the lowest priority go, which is usually
    /// the batch being appended.
    DropNewest,
}

/// `[store]`: the SQLite store-and-forward queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Database file; its directory is created if missing. `-wal` and `-shm` files live
    /// beside it. Default `/var/lib/fieldbridge/queue.db`.
    pub path: PathBuf,
    /// Group commit: appended readings are written in one transaction at most this many
    /// milliseconds after the first of them arrived. Bounds commits per second, hence
    /// flash wear. With the fast path it is also how long a fresh reading may wait in
    /// memory for the upstream broker's acknowledgement before it is written (and what
    /// kill -9 may lose of readings not yet acknowledged). Default 100.
    pub commit_interval_ms: u64,
    /// The fast path: a fresh reading is offered to the uplink at once, from memory,
    /// and one the upstream broker acknowledges (PUBACK at QoS 1, PUBCOMP at QoS 2)
    /// within `commit_interval_ms` is never written to the disk. `false`: every
    /// reading is committed first and read back from the store. Default `true`.
    pub fast_path: bool,
    /// Group commit: a transaction is written at once when this many rows are waiting.
    /// Default 1000.
    pub commit_max_rows: usize,
    /// QoS flow-state updates ([`set_flow`](super::Queue::set_flow)) do not wait for the
    /// group-commit interval: they are committed, together with whatever else waits, as
    /// soon as at least this many milliseconds have passed since the previous commit
    /// (0: as soon as the store thread has taken every request already queued).
    /// A QoS 2 window turns over once per flow commit, so a spacing caps QoS 2 replay
    /// at about `inflight / (2 × flow_commit_ms)` messages/s; in exchange it caps
    /// commits at `1000 / flow_commit_ms` per second plus the group commits. When the
    /// uplink keeps up with live data, rows reach it one group commit at a time and
    /// their flow updates share a few commits per group (about 35 commits/s at 100
    /// QoS 2 readings/s, measured, against 30 with a 1 ms spacing), so the default
    /// needs no cap. With `synchronous = full` each of these commits is an fsync.
    /// Default 0.
    pub flow_commit_ms: u64,
    /// `normal` (default) or `full`; see [`Synchronous`].
    pub synchronous: Synchronous,
    /// Most bytes of stored messages (topic + payload + a fixed per-row overhead of
    /// [`ROW_OVERHEAD_BYTES`](super::ROW_OVERHEAD_BYTES)). Default 128 MiB: with the
    /// WAL (at most 4 MiB) and the reserve (at most 8 MiB) it fits a 1 GiB SD card
    /// with room for the system; about 1.2 million readings of ~110 bytes. The store
    /// warns at start when its filesystem has less room than this.
    pub max_bytes: u64,
    /// Most stored messages. Default 5,000,000.
    pub max_rows: u64,
    /// Messages older than this (by their creation time) are dropped. Default 604800
    /// (7 days).
    pub max_age_secs: u64,
    /// `drop_oldest` (default) or `drop_newest`; see [`DropPolicy`].
    pub policy: DropPolicy,
    /// While the disk is full or read-only, appended messages wait in memory, up to
    /// this many rows; beyond it the drop policy applies. Default 100,000.
    pub memory_buffer_rows: usize,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            path: PathBuf::from("/var/lib/fieldbridge/queue.db"),
            commit_interval_ms: 100,
            fast_path: true,
            commit_max_rows: 1000,
            flow_commit_ms: 0,
            synchronous: Synchronous::Normal,
            max_bytes: 128 * 1024 * 1024,
            max_rows: 5_000_000,
            max_age_secs: 7 * 24 * 3600,
            policy: DropPolicy::DropOldest,
            memory_buffer_rows: 100_000,
        }
    }
}

impl StoreConfig {
    /// Semantic problems, with key paths under `store.`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        let mut store = problems.at("store");
        store.check(
            !self.path.as_os_str().is_empty(),
            "path",
            "must name a database file",
        );
        store.check(
            (1..=60_000).contains(&self.commit_interval_ms),
            "commit_interval_ms",
            "must be between 1 and 60000 milliseconds",
        );
        store.check(
            (1..=1_000_000).contains(&self.commit_max_rows),
            "commit_max_rows",
            "must be between 1 and 1000000",
        );
        store.check(
            self.flow_commit_ms <= 1000,
            "flow_commit_ms",
            "must be between 0 and 1000 milliseconds",
        );
        store.check(
            self.max_bytes >= 64 * 1024,
            "max_bytes",
            "must be at least 65536 (64 KiB)",
        );
        store.at_least("max_rows", self.max_rows, 1);
        store.at_least("max_age_secs", self.max_age_secs, 1);
        store.at_least("memory_buffer_rows", self.memory_buffer_rows, 1);
        problems.into_vec()
    }
}

//! The SQLite store-and-forward queue: every reading is kept here until the upstream
//! broker acknowledged it.
//!
//! # Invariants
//! - A message is accepted only once the transaction that holds it has committed;
//!   [`Queue::append`] resolves only then.
//! - A row is deleted only by [`Queue::ack`] (after the upstream broker acknowledged
//!   it) or by a retention drop, which is counted by reason in [`Stats::dropped`].
//! - In-flight marks live in memory only: rows handed out by [`Queue::next`] and not yet
//!   acknowledged are pending again after a restart or crash. Their packet identifier
//!   and PUBREC flag ([`Queue::set_flow`]) are persisted, so the uplink can resume a
//!   QoS 2 flow with the same packet identifier.
//! - Row ids grow with append order within a process, so queue order is id order, and
//!   per-source delivery order is append order.
//! - Everything is bounded: the request channel, the group-commit buffer
//!   (`commit_max_rows`), the memory buffer while the disk is unavailable
//!   (`memory_buffer_rows`), and the stored rows (`max_rows`, `max_bytes`,
//!   `max_age_secs`).
//!
//! # Threads
//! The SQLite connection lives on one dedicated thread, fed by a bounded channel; a slow
//! fsync never stalls the async tasks. [`Queue`] is a cheap, cloneable handle.
//!
//! # Layout
//! One file per role; each file's `//!` doc states its own invariants. Arrows point one
//! way: the handle talks to the worker only over the channel, the worker uses the
//! leaves, and no leaf imports the worker or the handle.
//!
//! ```text
//!  queue.rs ── request.rs ──► worker.rs ──► commit.rs ──► retention.rs
//!  (the handle)  (the channel)  (the thread)  │ (one transaction)
//!                                             ├──► buffer.rs, cursor.rs (commit.rs reads them too)
//!                                             └──► db.rs, retention.rs
//! ```
//!
//! - `queue.rs`: [`Queue`], the handle; each call is one request.
//! - `request.rs`: the requests and their replies; the channel's capacity.
//! - `worker.rs`: the store thread; when to commit (group commit, flow updates,
//!   retries with backoff), the memory bound while the disk fails, checkpoints,
//!   counters, the age sweep, shutdown.
//! - `commit.rs`: one transaction (inserts, ack deletes, flow updates, retention drops,
//!   counters) and the disk-full eviction; it changes nothing in memory.
//! - `buffer.rs`: appended batches waiting for their commit, and which batch a full
//!   memory buffer drops.
//! - `cursor.rs`: the drain cursor and the in-flight marks.
//! - `retention.rs`: which stored rows give way to the limits and to a full disk.
//! - `db.rs`: the file: open, schema, row mapping, counters, checkpoints, vacuum.
//! - `config.rs`: the `[store]` section.
//!
//! # Commits (flash wear)
//! Appends and acks are collected in memory and written in one transaction at most
//! `commit_interval_ms` after the first of them, or at once when `commit_max_rows` rows
//! wait. Commits per second are thus bounded by the interval, whatever the message
//! rate. Flow-state updates (`set_flow`) do not wait for the interval: a QoS 2 flow
//! waits for two of them, so the window would turn over once per interval. They commit
//! (with everything else buffered) once the store thread has taken every request
//! already queued and `flow_commit_ms` (default 0) have passed since the last commit;
//! concurrent callers share a commit. With `synchronous = normal` such a commit does not
//! fsync; with `full` it does. Live data reaches the uplink one group commit at a time,
//! so its flow updates add a few commits per group commit, not two per message.
//! `next` and `release` write nothing. An `ack` resolves when applied; its delete
//! becomes durable with the next commit, so after a crash a just-acknowledged row may be
//! delivered again (at least once). `append` and `set_flow` resolve only after their
//! commit.
//!
//! # On-disk format
//! One SQLite file in WAL mode with `auto_vacuum = INCREMENTAL` (freed pages are
//! reused, and the file shrinks after a drained backlog). Tables: `message` (id is the
//! queue order; `size` is the byte count used for `max_bytes`; `pkid`/`pubrec` the QoS
//! flow state) and `counter` (name → value, persisted at most every 10 s and on close).
//! `PRAGMA user_version` is the format version. Checkpoints are run by the queue itself
//! (not by SQLite's auto-checkpoint), so it can count what it wrote.
//!
//! # Faults
//! - A corrupt file at open is moved aside as `<name>.corrupt-<UTC timestamp>` (with its
//!   `-wal`), and a fresh one is created, with an error log line.
//! - When a commit fails (disk full, read-only filesystem, I/O error) the data stays in
//!   the memory buffer, retries follow with backoff (100 ms doubling to 30 s), and the
//!   failure is logged with backoff. When the buffer overflows, `drop_oldest` first
//!   deletes the oldest stored rows of the lowest priority to make room on disk and
//!   otherwise drops the oldest buffered batches; `drop_newest` drops the newest
//!   buffered batches. Batches are dropped whole; their `append` fails with
//!   [`Error::Dropped`].

mod buffer;
mod commit;
mod config;
mod cursor;
mod db;
mod queue;
mod request;
mod retention;
#[cfg(test)]
mod tests;
mod worker;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Serialize;

use crate::mqtt::QoS;

pub use config::{DropPolicy, StoreConfig, Synchronous};
pub use queue::Queue;

/// Bytes counted per row on top of topic and payload, for `max_bytes` and
/// [`Stats::bytes`]: roughly what SQLite stores besides them.
pub const ROW_OVERHEAD_BYTES: u64 = 32;

/// Drop class of a message: periodic values are dropped before events, events before
/// alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    #[default]
    Periodic = 0,
    Event = 1,
    Alarm = 2,
}

/// A reading already encoded as an outgoing MQTT message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Wall clock, milliseconds since the Unix epoch.
    pub created_ms: i64,
    pub priority: Priority,
}

impl Message {
    /// What this message counts for `max_bytes`.
    pub fn stored_size(&self) -> u64 {
        self.topic.len() as u64 + self.payload.len() as u64 + ROW_OVERHEAD_BYTES
    }
}

/// A message handed out by `next`, with its row id and persisted QoS 2 flow state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: i64,
    pub message: Message,
    /// The packet identifier the uplink assigned (QoS 1/2), persisted by `set_flow`.
    pub pkid: Option<u16>,
    /// QoS 2: PUBREC was received, so the flow resumes at PUBREL.
    pub pubrec: bool,
}

/// Which end of the backlog `next` hands out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainOrder {
    #[default]
    OldestFirst,
    NewestFirst,
}

/// Why messages were dropped without delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    MaxRows,
    MaxBytes,
    MaxAge,
    /// The disk was full or read-only and the memory buffer overflowed.
    DiskFull,
    /// Held in memory because the disk was unavailable when the queue closed.
    Shutdown,
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DropReason::MaxRows => "max_rows",
            DropReason::MaxBytes => "max_bytes",
            DropReason::MaxAge => "max_age",
            DropReason::DiskFull => "disk_full",
            DropReason::Shutdown => "shutdown",
        })
    }
}

/// Dropped messages by reason, since the database was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DropCounts {
    pub max_rows: u64,
    pub max_bytes: u64,
    pub max_age: u64,
    pub disk_full: u64,
    pub shutdown: u64,
}

impl DropCounts {
    pub fn total(&self) -> u64 {
        self.max_rows + self.max_bytes + self.max_age + self.disk_full + self.shutdown
    }

    fn add(&mut self, reason: DropReason, rows: u64) {
        let slot = match reason {
            DropReason::MaxRows => &mut self.max_rows,
            DropReason::MaxBytes => &mut self.max_bytes,
            DropReason::MaxAge => &mut self.max_age,
            DropReason::DiskFull => &mut self.disk_full,
            DropReason::Shutdown => &mut self.shutdown,
        };
        *slot += rows;
    }
}

/// A snapshot of the queue. Counters (`appended` … `bytes_written`) count since the
/// database file was created; [`read_stats`] sees them as last persisted (at most 10 s
/// old while the agent runs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Stored rows, pending and in flight.
    pub depth: u64,
    /// Stored rows not in flight.
    pub pending: u64,
    /// Rows handed out by `next` and neither acknowledged nor released (always 0 from
    /// [`read_stats`]: in-flight marks live in the agent's memory).
    pub in_flight: u64,
    /// Bytes of stored messages, as counted for `max_bytes`.
    pub bytes: u64,
    /// Age of the first row in queue order, by its creation time; `None` when empty.
    pub oldest_age_ms: Option<u64>,
    /// Appended rows waiting in memory for their commit (group commit, or the memory
    /// buffer while the disk is unavailable).
    pub buffered: u64,
    /// Rows committed.
    pub appended: u64,
    /// Rows deleted by `ack`.
    pub delivered: u64,
    pub dropped: DropCounts,
    /// Transactions committed.
    pub commits: u64,
    /// Commits that failed (disk full, read-only, I/O error) and were retried.
    pub commit_failures: u64,
    /// Bytes SQLite wrote: WAL frames (page + 24-byte header) plus pages copied to the
    /// database file by checkpoints (an upper bound: a page rewritten in several
    /// frames is counted once per frame). Updated at each checkpoint.
    pub bytes_written: u64,
    /// Current size of the database file plus its WAL.
    pub file_bytes: u64,
}

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: database format version {found} is newer than this build supports ({supported})"
    )]
    NewerFormat {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("database integrity check failed: {0}")]
    Corrupt(String),
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The queue was closed; an `append` gets its batch back here.
    #[error("the store is closed ({} messages not stored)", .0.len())]
    Closed(Vec<Message>),
    /// A whole appended batch was dropped before it could be stored.
    #[error("{rows} messages dropped before they were stored ({reason})")]
    Dropped { rows: usize, reason: DropReason },
}

/// Reads the statistics of a queue file without writing to it, while the agent that
/// owns it may be running (`fieldbridge queue stats`).
///
/// # Errors
/// [`Error::Io`] when the file does not exist; [`Error::Sqlite`] when it cannot be read.
pub fn read_stats(path: &Path) -> Result<Stats, Error> {
    db::read_stats(path)
}

//! What the queue reports: the snapshot [`Stats`] and the drops counted by reason.
//!
//! Invariants: counters count since the database file was created (they are persisted
//! with the data); every row that leaves the queue without delivery is counted in
//! exactly one [`DropReason`].

use serde::Serialize;

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

/// Whether the store can write its file right now, as the last commit found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    /// Commits go through.
    #[default]
    Writable,
    /// The filesystem (or the file's page limit) is full: readings wait in memory.
    Full,
    /// The file or its filesystem is read-only: readings wait in memory.
    ReadOnly,
    /// Commits fail with another error (I/O error, lock held elsewhere).
    Failing,
}

impl DiskState {
    /// The state a failed commit's error puts the store in.
    pub(super) fn of(error: &rusqlite::Error) -> DiskState {
        match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => DiskState::Full,
            Some(rusqlite::ErrorCode::ReadOnly) => DiskState::ReadOnly,
            _ => DiskState::Failing,
        }
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

    pub(super) fn add(&mut self, reason: DropReason, rows: u64) {
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
/// database file was created; [`read_stats`](super::read_stats) sees them as last
/// persisted (at most 10 s old while the agent runs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Stored rows, pending and in flight.
    pub depth: u64,
    /// Stored rows not in flight.
    pub pending: u64,
    /// Rows handed out by `next` and neither acknowledged nor released (always 0 from
    /// [`read_stats`](super::read_stats): in-flight marks live in the agent's memory).
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
    /// Whether the last commit could write the file (always `writable` from
    /// [`read_stats`](super::read_stats), which does not write).
    pub disk: DiskState,
    /// Bytes free on the filesystem that holds the file (0 when it cannot be asked).
    pub fs_free_bytes: u64,
    /// Bytes the store keeps in reserve on that filesystem for deleting delivered rows
    /// when it is full (0 while released).
    pub reserve_bytes: u64,
}

//! The SQLite store-and-forward queue: every reading is kept here until the upstream
//! broker acknowledged it.
//!
//! # Invariants
//! - A message is accepted only once the transaction that holds it has committed;
//!   [`Queue::append`] resolves only then, and [`Queue::submit`]'s [`Done`] is called
//!   only then (or with the reason it was not stored). `submit` itself never waits for
//!   the disk, only for a request slot.
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
//! leaves, and no leaf imports the worker or the handle. This file only composes: the
//! shared types live in leaves (`message`, `stats`, `error`) that import nothing above
//! them, and are re-exported here.
//!
//! ```text
//!  queue.rs ──► request.rs ◄── worker.rs ──► commit.rs ──► retention.rs
//!     └─────── spawns ───────────►  │            └──► buffer.rs, cursor.rs, db.rs
//!                                   └──► buffer.rs, cursor.rs, retention.rs, db.rs, space.rs
//!  db.rs ──► space.rs
//!  every file ──► message.rs, stats.rs, error.rs, config.rs (leaves)
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
//! - `db.rs`: the file: open, schema, row mapping, counters, checkpoints, vacuum,
//!   holding the file at its size.
//! - `space.rs`: the filesystem: free bytes, the reserve.
//! - `message.rs`, `stats.rs`, `error.rs`: [`Message`] and [`Stored`], [`Stats`] and
//!   the drop counts, [`Error`].
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
//! - Opening an existing file of the current format writes nothing, so it succeeds on
//!   a full or read-only filesystem. Without room for the `-shm` file the reserve is
//!   released; without room even then, the file is opened with exclusive locking (the
//!   WAL index in memory; `queue stats` cannot read it meanwhile).
//! - When a commit fails (disk full, read-only filesystem, I/O error) the data stays in
//!   the memory buffer, retries follow with backoff (100 ms doubling to 30 s), and one
//!   line is logged ("store full: N rows buffered in memory"), and one more when it
//!   ends ("store accepts readings again"). When the buffer overflows, `drop_oldest`
//!   first deletes the oldest stored rows of the lowest priority to make room on disk
//!   and otherwise drops the oldest buffered batches; `drop_newest` drops the newest
//!   buffered batches. Batches are dropped whole, counted as `disk_full`, and answered
//!   with [`Error::Dropped`].
//! - A full filesystem must never keep delivered rows from being deleted. A WAL whose
//!   commits grew the file cannot be checkpointed without room, and then cannot start
//!   over, so every later transaction needs new space. Hence: a reserve file
//!   (`<name>.reserve`, 1/32 of the filesystem, 256 KiB to 8 MiB) and a checkpoint
//!   before the WAL holds half of it; on a full disk the store checkpoints (releasing
//!   the reserve when that needs room), holds the file at its size (`max_page_count`,
//!   so nothing commits pages a checkpoint could not write; inserts go into free
//!   pages), and writes acks in steps of 256 deletes, each checkpointed so the next
//!   reuses the same WAL space. A drain then shrinks the file by incremental vacuum in
//!   small steps; once the filesystem has room for the reserve twice over, the reserve
//!   is written back and the file may grow again.

mod buffer;
mod commit;
mod config;
mod cursor;
mod db;
mod error;
mod message;
mod queue;
mod request;
mod retention;
mod space;
mod stats;
#[cfg(test)]
mod tests;
mod worker;

use std::path::Path;

pub use config::{DropPolicy, StoreConfig, Synchronous};
pub use error::Error;
pub use message::{pkid_for_row, DrainOrder, Message, Priority, Stored, ROW_OVERHEAD_BYTES};
pub use queue::Queue;
pub use request::Done;
pub use stats::{DiskState, DropCounts, DropReason, Stats};

/// Reads the statistics of a queue file without writing to it, while the agent that
/// owns it may be running (`fieldbridge queue stats`).
///
/// # Errors
/// [`Error::Io`] when the file does not exist; [`Error::Sqlite`] when it cannot be read.
pub fn read_stats(path: &Path) -> Result<Stats, Error> {
    db::read_stats(path)
}

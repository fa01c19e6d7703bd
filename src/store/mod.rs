//! The SQLite store-and-forward queue: every reading is kept here until the upstream
//! broker acknowledged it.
//!
//! # Invariants
//! - A message is accepted once it is durable: the transaction that holds it has
//!   committed, or (the fast path) the upstream broker acknowledged it while it was
//!   still in memory. [`Queue::append`] resolves, and [`Queue::submit`]'s [`Done`] is
//!   called, only when every message of the batch is (or with the reason it was not
//!   stored). `submit` itself never waits for the disk, only for a request slot.
//! - A row is deleted only by [`Queue::ack`] (after the upstream broker acknowledged
//!   it) or by a retention drop, which is counted by reason in [`Stats::dropped`].
//! - In-flight marks live in memory only: rows handed out by [`Queue::next`] and not yet
//!   acknowledged are pending again after a restart or crash. Their packet identifier
//!   and PUBREC flag ([`Queue::set_flow`]) are persisted, so the uplink can resume a
//!   QoS 2 flow with the same packet identifier.
//! - Row ids are given at append and grow with append order, so queue order is id
//!   order, and per-source delivery order is append order. A new process never reuses
//!   an id a row held only in memory may have had (the reservation below).
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
//!                  ▲                 └──► retime.rs ──► request.rs, buffer.rs, cursor.rs
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
//! - `retime.rs`: a clock correction of the rows and buffered messages of this boot
//!   stamped while the wall clock was not synchronized.
//! - `db.rs`: the file: open, schema, row mapping, counters, checkpoints, vacuum,
//!   holding the file at its size.
//! - `space.rs`: the filesystem: free bytes, the reserve.
//! - `message.rs`, `stats.rs`, `error.rs`: [`Message`] and [`Stored`], [`Stats`] and
//!   the drop counts, [`Error`].
//! - `config.rs`: the `[store]` section.
//!
//! # The fast path (`fast_path`, default on)
//! A fresh row is handed out by `next` while it still waits in the memory buffer, after
//! every stored pending row (oldest first: the backlog goes first; newest first: fresh
//! rows first). An `ack` that finds it buffered resolves it there: it is never written.
//! A buffered batch is committed `commit_interval_ms` after it arrived, with whatever
//! rows of it are not acknowledged by then (and the flow state `set_flow` recorded for
//! them in memory); from then on they are stored rows in flight, as before. So with a
//! healthy uplink a reading costs no write, and kill -9 loses at most the readings of
//! the current window that the broker had not acknowledged, as before the fast path.
//!
//! QoS 2 needs two more rules, because the broker keeps state for a flow between its
//! PUBLISH and its PUBREL (mosquitto hands the message on at the PUBREL):
//! - `set_flow` on a buffered row answers at once and is written with the row's insert
//!   if it ever is. A row whose PUBREL went out from memory and is committed before its
//!   PUBCOMP is thus stored with `pubrec`, so after a crash it resumes at PUBREL: never
//!   published as new (which would deliver it twice). A row committed before its
//!   PUBREC is stored without flow state and resumes with a PUBLISH under the packet id
//!   its row id gives (`pkid_for_row`), which the broker deduplicates.
//! - A crash can cut flows of rows that lived in memory only: the broker may hold their
//!   packet ids (PUBREC sent, PUBREL never to come), and in a persistent session a new
//!   PUBLISH under such an id is taken for a duplicate and lost (mosquitto compares
//!   payloads and takes it as new; other brokers need not). Two records make that safe
//!   without a write per reading. `next_id` (counter) is a reservation: buffered rows
//!   are handed out only under ids below its committed value, which is raised 16,384
//!   ids at a time by a counters write, so no later process gives a new row (hence a
//!   packet id) an id a memory row may have had. `unswept_from` (counter, written with
//!   every counters write) is the lowest id not known to be stored or finished (the
//!   oldest buffered row). After a crash, [`Queue::unswept_flows`] lists the packet ids
//!   of the ids from `unswept_from` up to `next_id` that are not stored, less every
//!   packet id a stored QoS 2 row may be open under (its own resumed flow owns it). The
//!   uplink sends PUBREL for each, ahead of any other packet, on the first connection
//!   that resumes the broker session (so the broker delivers what it held, once, and
//!   forgets the id), keeps the ids out of use until their PUBCOMP, then calls
//!   [`Queue::flows_swept`]. A close leaves nothing to sweep (every buffered row is
//!   committed). Known limit: an open memory flow whose packet id a stored QoS 2 row
//!   65,535 ids older also maps to is not released (as with `newest_first` below).
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
//! With the fast path, rows acknowledged within the window are never written, and
//! counters are written alone at most every 10 minutes when no group commit carries
//! them (plus one reservation per 16,384 ids), so a healthy uplink costs a few writes
//! per hour whatever the rate (see BENCHMARKS.md).
//! `next` and `release` write nothing (except a reservation, see the fast path). An
//! `ack` resolves when applied; its delete
//! becomes durable with the next commit, so after a crash a just-acknowledged row may be
//! delivered again (at least once). `append` and `set_flow` resolve only after their
//! commit.
//!
//! # On-disk format
//! One SQLite file in WAL mode with `auto_vacuum = INCREMENTAL` (freed pages are
//! reused, and the file shrinks after a drained backlog). Tables: `message` (id is the
//! queue order; `size` is the byte count used for `max_bytes`; `pkid`/`pubrec` the QoS
//! flow state; `boot`/`mono_ms` the boot-clock stamp of a reading taken while the wall
//! clock was not synchronized, NULL otherwise, indexed by `message_unsynced`; added at
//! open to a file that lacks them) and `counter` (name → value, persisted with a group
//! commit at most every 10 s, alone at most every 10 minutes, with each id reservation,
//! and on close; `next_id` and `unswept_from` are the fast path's records).
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
mod retime;
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
pub use request::{Retimed, Rewrite};
pub use stats::{DiskState, DropCounts, DropReason, Stats};

/// Reads the statistics of a queue file without writing to it, while the agent that
/// owns it may be running (`fieldbridge queue stats`).
///
/// # Errors
/// [`Error::Io`] when the file does not exist; [`Error::Sqlite`] when it cannot be read.
pub fn read_stats(path: &Path) -> Result<Stats, Error> {
    db::read_stats(path)
}

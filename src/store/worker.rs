//! The store thread: it owns the SQLite connection, takes the handle's requests, and
//! decides when to commit (group commit, flow updates, retries while the disk fails),
//! checkpoint, persist counters and sweep for old rows.
//!
//! Invariants (the module-level ones are in `store/mod.rs`):
//! - Only this thread touches the connection.
//! - Memory changes only after a transaction committed ([`Worker::applied`]); a failed
//!   transaction leaves every buffer as it was, for the retry.
//! - A buffered batch is committed at most `commit_interval_ms` after it arrived
//!   (unless every row of it was acknowledged first, then never); acks of stored rows
//!   at most that long after the first of them.
//! - Fast path: a buffered row is handed out only under an id below `reserved`, a value
//!   of `next_id` already committed, so after a crash no new row reuses the id (hence
//!   the QoS 2 packet id) of a row that lived in memory only; `unswept_from` is written
//!   with every counters write so the next start knows which ids those may have been.
//! - Flow updates are committed at most `flow_commit_ms` after the previous commit;
//!   the thread takes every request already queued (up to [`CHANNEL_CAPACITY`], and
//!   until a full group of rows waits) before it decides to commit, so one commit serves
//!   every waiter that is already there.
//! - While commits fail, retries follow with backoff ([`RETRY_MIN`] doubling to
//!   [`RETRY_MAX`]) and the buffer is kept within `memory_buffer_rows`.
//! - Values read back from the file (ids, sizes, counters) may have been written by
//!   something else: they are clamped or saturated, never trusted not to overflow.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::buffer::{self, Buffer};
use super::commit::{self, Work, Written};
use super::config::{DropPolicy, StoreConfig};
use super::cursor::Cursor;
use super::db::{self, Counters, Db};
use super::error::Error;
use super::message::{DrainOrder, Message, Stored};
use super::request::{Command, Done, Flow, Request, Retime, Retimed, CHANNEL_CAPACITY};
use super::retention;
use super::retime;
use super::space::Space;
use super::stats::{DiskState, DropReason, Stats};

/// A checkpoint runs at least this often while there are commits, or once the WAL has
/// grown by half the reserve ([`Space::checkpoint_bytes`]).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Counters are persisted with a group commit at most this often (and on close):
/// writing them with every commit would add a page write per commit.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(10);
/// Without group commits (the fast path delivers everything from memory), counters are
/// written alone at most this often: each such write costs two pages on the medium.
const COUNTERS_IDLE_INTERVAL: Duration = Duration::from_secs(600);
/// Ids reserved for rows handed out from memory by one counters write: at 100
/// readings/s one write every ~3 minutes, and after a crash at most this many packet
/// ids (plus the rows buffered then) to release.
const RESERVE_IDS: i64 = 16_384;
/// Idle queues are checked for rows past `max_age_secs` this often.
const AGE_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// While the file is held at its size, this often the store looks whether a drain
/// left pages to give back and whether the filesystem has room again.
const ROOM_CHECK_INTERVAL: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// State while commits fail (disk full, read-only filesystem, I/O errors).
struct Failing {
    attempts: u32,
    next_retry: Instant,
    state: DiskState,
}

pub(super) struct Worker {
    db: Db,
    config: StoreConfig,
    interval: Duration,
    buffer: Buffer,
    cursor: Cursor,
    flows: Vec<Flow>,
    /// When the oldest uncommitted ack or flow update arrived (buffered batches keep
    /// their own arrival time).
    first_dirty: Option<Instant>,
    /// When the last transaction committed; flow updates wait `flow_spacing` after it.
    last_commit: Instant,
    flow_spacing: Duration,
    rows: u64,
    bytes: u64,
    /// The id of the next appended row.
    next_id: i64,
    /// The `next_id` last committed: rows below it may be handed out from memory.
    reserved: i64,
    /// Packet ids of QoS 2 flows that a crash may have left open at the upstream
    /// broker, until the uplink released them ([`Command::Swept`]).
    unswept: Option<Vec<u16>>,
    counters: Counters,
    counters_saved: Instant,
    counters_dirty: bool,
    wal_estimate: u64,
    commits_since_checkpoint: u64,
    last_checkpoint: Instant,
    next_age_sweep: Instant,
    failing: Option<Failing>,
    /// The file is held at its size because its filesystem is full ([`Db::pin_size`]).
    pinned: bool,
    next_room_check: Instant,
    /// Since when readings could not all be written (failing or pinned), for the one
    /// log line when that ends.
    unwritable: Option<Instant>,
    /// Whether the memory buffer overflowed since `unwritable` (logged once).
    overflowed: bool,
    space: Space,
    dropping: bool,
    /// Per priority class, where `drop_oldest` looks for its next victims.
    scan_from: [i64; 3],
    pending: watch::Sender<u64>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)] // the state read from the file at open
    pub fn new(
        db: Db,
        space: Space,
        pinned: bool,
        config: StoreConfig,
        counters: Counters,
        rows: u64,
        bytes: u64,
        max_id: i64,
        unswept: Vec<u16>,
        pending: watch::Sender<u64>,
    ) -> Worker {
        let now = Instant::now();
        Worker {
            db,
            interval: Duration::from_millis(config.commit_interval_ms),
            flow_spacing: Duration::from_millis(config.flow_commit_ms),
            config,
            buffer: Buffer::default(),
            cursor: Cursor::new(),
            flows: Vec::new(),
            first_dirty: None,
            last_commit: now,
            rows,
            bytes,
            // Ids come from the file: a row id of i64::MAX must not overflow here. Ids
            // saturate, and an insert with a taken id fails and is retried like a full disk.
            next_id: max_id.saturating_add(1).max(counters.next_id).max(1),
            reserved: counters.next_id,
            unswept: (!unswept.is_empty()).then_some(unswept),
            counters,
            counters_saved: now,
            counters_dirty: false,
            wal_estimate: 0,
            commits_since_checkpoint: 0,
            last_checkpoint: now,
            next_age_sweep: now,
            failing: None,
            pinned,
            next_room_check: now,
            unwritable: pinned.then_some(now),
            overflowed: false,
            space,
            dropping: false,
            scan_from: [i64::MIN; 3],
            pending,
        }
    }

    pub fn run(mut self, inbox: std_mpsc::Receiver<Request>) {
        loop {
            let now = Instant::now();
            let wake = self.next_wake(now);
            let request = match inbox.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    if let Err(error) = self.shutdown() {
                        tracing::error!(%error, "store stopped with data it could not write");
                    }
                    return;
                }
            };
            if self.take_queued(request, &inbox).is_break() {
                return;
            }
            let now = Instant::now();
            if self.commit_due(now) {
                self.commit();
            }
            self.maintain(Instant::now());
        }
    }

    /// Handles `request` and everything already queued behind it, so concurrent waiters
    /// share the next commit; but a full group of rows still commits at its threshold.
    /// Breaks when the thread is to stop.
    fn take_queued(
        &mut self,
        mut request: Option<Request>,
        inbox: &std_mpsc::Receiver<Request>,
    ) -> ControlFlow<()> {
        let mut taken = 0;
        while let Some(next) = request.take() {
            match next.command {
                Command::Close { reply } => {
                    let _ = reply.send(self.shutdown());
                    return ControlFlow::Break(());
                }
                #[cfg(test)]
                Command::Crash { reply } => {
                    let _ = reply.send(Ok(()));
                    return ControlFlow::Break(());
                }
                command => self.handle(command),
            }
            taken += 1;
            if taken < CHANNEL_CAPACITY && self.buffer.rows() < self.config.commit_max_rows {
                request = inbox.try_recv().ok();
            }
        }
        ControlFlow::Continue(())
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Append { batch, done } => self.append(batch, done),
            Command::Next { max, order, reply } => {
                let out = self.next(max, order);
                let _ = reply.send(out.map_err(Error::from));
            }
            Command::Ack { ids, reply } => {
                self.ack(ids);
                let _ = reply.send(Ok(()));
            }
            Command::Release { ids, reply } => {
                for &id in &ids {
                    self.buffer.release(id);
                }
                if self.cursor.release(ids) > 0 {
                    self.pending.send_replace(self.pending_rows());
                }
                let _ = reply.send(Ok(()));
            }
            Command::SetFlow(flow) => {
                if self.buffer.set_flow(flow.id, flow.pkid, flow.pubrec) {
                    // Written with the row's insert if it ever is; until then a crash
                    // loses the row and its flow together.
                    let _ = flow.reply.send(Ok(()));
                } else {
                    self.flows.push(flow);
                    self.mark_dirty();
                }
            }
            Command::Unswept { reply } => {
                let _ = reply.send(Ok(self.unswept.clone().unwrap_or_default()));
            }
            Command::Swept { reply } => {
                if self.unswept.take().is_some() {
                    // Promptly: until it is written, every later crash adds a
                    // reservation's worth of ids to the next sweep.
                    self.counters_dirty = true;
                    if self.failing.is_none() {
                        self.write_counters();
                    }
                }
                let _ = reply.send(Ok(()));
            }
            Command::Retime { retime, done } => done(self.retime(&retime)),
            Command::Hold { held } => {
                self.cursor.hold(held);
                if !held {
                    self.pending.send_replace(self.pending_rows());
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            #[cfg(test)]
            Command::Pragma { sql, reply } => {
                let result = self.db.conn.execute_batch(&sql).map_err(Error::from);
                let _ = reply.send(result);
            }
            Command::Close { .. } => unreachable!("handled by take_queued"),
            #[cfg(test)]
            Command::Crash { .. } => unreachable!("handled by take_queued"),
        }
    }

    /// A clock correction: the stored rows in steps, each counted towards the next
    /// checkpoint like a commit, then the buffered messages.
    fn retime(&mut self, retime: &Retime) -> Result<Retimed, Error> {
        let mut total = Retimed::default();
        let mut after = i64::MIN;
        while let Some(step) = retime::step(retime, &mut self.db.conn, &self.cursor, &mut after)? {
            self.bytes = self.bytes.saturating_add_signed(step.retimed.bytes_delta);
            total.rows += step.retimed.rows;
            total.in_flight += step.retimed.in_flight;
            total.bytes_delta += step.retimed.bytes_delta;
            self.wal_estimate += step.written_bytes + 2 * self.db.page_size;
            if self.wal_estimate >= self.space.checkpoint_bytes() {
                self.checkpoint();
            }
        }
        total.rows += retime::buffered(retime, &mut self.buffer);
        Ok(total)
    }

    fn append(&mut self, batch: Vec<Message>, done: Done) {
        self.next_id = self.buffer.push(batch, self.next_id, done);
        if self.config.fast_path {
            self.pending.send_replace(self.pending_rows());
        }
        if self.failing.is_some() {
            self.enforce_memory_bound();
        }
    }

    /// Stored rows first (oldest first: the backlog before fresh rows; newest first:
    /// fresh rows before the backlog), then, on the fast path, buffered rows. Nothing
    /// while the cursor is held.
    fn next(&mut self, max: usize, order: DrainOrder) -> Result<Vec<Stored>, rusqlite::Error> {
        if !self.config.fast_path || self.buffer.unhanded() == 0 || self.cursor.held() {
            return self.cursor.next(&self.db.conn, max, order);
        }
        match order {
            DrainOrder::OldestFirst => {
                let mut out = self.cursor.next(&self.db.conn, max, order)?;
                if out.len() < max {
                    out.extend(self.hand_out_buffered(max - out.len(), order));
                }
                Ok(out)
            }
            DrainOrder::NewestFirst => {
                let fresh = self.hand_out_buffered(max, order);
                match self.cursor.next(&self.db.conn, max - fresh.len(), order) {
                    Ok(mut out) => {
                        out.extend(fresh);
                        Ok(out)
                    }
                    Err(error) => {
                        let ids: Vec<i64> = fresh.iter().map(|s| s.id).collect();
                        for &id in &ids {
                            self.buffer.release(id);
                        }
                        self.cursor.release(ids);
                        Err(error)
                    }
                }
            }
        }
    }

    /// Hands out buffered rows, under ids already reserved (a reservation is committed
    /// first when the buffered rows are past it and the disk may be written).
    fn hand_out_buffered(&mut self, max: usize, order: DrainOrder) -> Vec<Stored> {
        let retry_due = self
            .failing
            .as_ref()
            .map_or(true, |f| Instant::now() >= f.next_retry);
        if self.next_id > self.reserved && retry_due {
            self.reserve();
        }
        let rows = self.buffer.hand_out(max, order, self.reserved);
        self.cursor.handed_from_memory(rows.iter().map(|s| s.id));
        rows
    }

    /// Commits a new reservation of ids for rows handed out from memory.
    fn reserve(&mut self) {
        self.counters.next_id = self.next_id.saturating_add(RESERVE_IDS);
        self.write_counters();
    }

    /// Commits the counters (with the acks and flow updates that wait).
    fn write_counters(&mut self) {
        let work = Work::reserve();
        match self.write(work) {
            Ok(written) => self.applied(written, work),
            Err(error) => self.failed(&error),
        }
    }

    /// Acknowledged rows: buffered ones are resolved without being written (and counted
    /// as appended and delivered); stored ones are deleted by the next commit.
    fn ack(&mut self, ids: Vec<i64>) {
        let mut stored = Vec::with_capacity(ids.len());
        for id in ids {
            if self.buffer.ack(id).is_some() {
                self.cursor.acked_in_memory(id);
                self.counters.appended += 1;
                self.counters.delivered += 1;
                self.counters_dirty = true;
            } else {
                stored.push(id);
            }
        }
        if !stored.is_empty() {
            self.cursor.ack(stored);
            self.mark_dirty();
        }
    }

    fn mark_dirty(&mut self) {
        self.first_dirty.get_or_insert_with(Instant::now);
    }

    fn dirty(&self) -> bool {
        self.buffer.rows() > 0 || !self.cursor.acking().is_empty() || !self.flows.is_empty()
    }

    /// Stored rows not taken, and on the fast path buffered rows not handed out.
    fn pending_rows(&self) -> u64 {
        let handed = self.buffer.rows().saturating_sub(self.buffer.unhanded());
        let stored_taken = self.cursor.taken().saturating_sub(handed) as u64;
        let fresh = if self.config.fast_path {
            self.buffer.unhanded() as u64
        } else {
            0
        };
        self.rows.saturating_sub(stored_taken) + fresh
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = (self.last_checkpoint + CHECKPOINT_INTERVAL).min(self.next_age_sweep);
        if self.pinned {
            wake = wake.min(self.next_room_check);
        }
        let wake = wake.max(now);
        match self.commit_at() {
            Some(due) => wake.min(due),
            None => wake,
        }
    }

    /// When the next commit is due by time: the group-commit interval after the oldest
    /// buffered batch or the first uncommitted ack, or sooner for flow updates; never
    /// before a retry is due.
    fn commit_at(&self) -> Option<Instant> {
        let first = match (self.buffer.oldest(), self.first_dirty) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let mut due = first + self.interval;
        if !self.flows.is_empty() {
            due = due.min(self.last_commit + self.flow_spacing);
        }
        if let Some(failing) = &self.failing {
            due = due.max(failing.next_retry);
        }
        Some(due)
    }

    fn commit_due(&self, now: Instant) -> bool {
        let Some(due) = self.commit_at() else {
            return false;
        };
        if self.failing.as_ref().is_some_and(|f| now < f.next_retry) {
            return false;
        }
        now >= due || self.buffer.rows() >= self.config.commit_max_rows
    }

    /// One group commit. On failure everything stays buffered for the retry, except
    /// that acks and flow updates are tried alone, in small steps, so delivery can go
    /// on (and free pages) while appends cannot be written. On a full filesystem the
    /// file is first held at its size ([`Worker::hold_size`]).
    fn commit(&mut self) {
        if !self.dirty() {
            self.first_dirty = None;
            return;
        }
        if self.pinned {
            self.try_unpin();
        }
        let counters = self.counters_due();
        let all = Work::all(counters);
        match self.write(all) {
            Ok(written) => self.applied(written, all),
            Err(error) => {
                let full = DiskState::of(&error) == DiskState::Full;
                if full {
                    self.hold_size();
                }
                self.write_deletes(counters, full);
                self.failed(&error);
                self.enforce_memory_bound();
            }
        }
    }

    /// The filesystem is full: what is committed is checkpointed (with the reserve
    /// released when that needs room), so the WAL starts over in the space it already
    /// has; then the file is held at its size, so no later transaction commits pages
    /// that a checkpoint could not write. Inserts then go into free pages only. A
    /// commit that fails again while the file is held needs more WAL than it has: the
    /// reserve (topped up from what comes free, see [`Worker::maintain`]) gives it.
    fn hold_size(&mut self) {
        let complete = self.checkpoint_now();
        if (!complete || self.pinned) && self.release_reserve() {
            self.checkpoint_now();
        }
        if !self.pinned {
            match self.db.pin_size() {
                Ok(()) => self.pinned = true,
                Err(error) => tracing::debug!(%error, "could not hold the store file at its size"),
            }
        }
    }

    /// Acks and flow updates in transactions of at most [`commit::SMALL_DELETES`]
    /// deletes each. On a full filesystem a step that finds no room releases the
    /// reserve and is tried once more, and each step is checkpointed, so the next one
    /// reuses the same WAL space.
    fn write_deletes(&mut self, mut counters: bool, full: bool) {
        while !self.cursor.acking().is_empty() || !self.flows.is_empty() {
            let work = Work::small_deletes(counters);
            match self.write(work) {
                Ok(written) => {
                    self.applied(written, work);
                    counters = false;
                    if full {
                        self.checkpoint_now();
                    }
                }
                Err(error)
                    if DiskState::of(&error) == DiskState::Full && self.release_reserve() =>
                {
                    self.checkpoint_now();
                }
                Err(_) => return,
            }
        }
    }

    /// Deletes the reserve; returns whether it was there. One log line per full-disk
    /// episode (later releases of what was topped up are logged at debug level).
    fn release_reserve(&mut self) -> bool {
        let bytes = self.space.len();
        if !self.space.release() {
            return false;
        }
        if self.unwritable.is_none() {
            tracing::warn!(
                reserve_bytes = bytes,
                "disk full: released the store's reserve so delivered readings can still be deleted"
            );
        } else {
            tracing::debug!(reserve_bytes = bytes, "released the store's reserve");
        }
        true
    }

    /// While pinned: once the filesystem has room again (the reserve complete, and
    /// room for it once more), the file may grow again.
    fn try_unpin(&mut self) {
        if !self.space.restore() {
            return;
        }
        match self.db.unpin_size() {
            Ok(()) => {
                self.pinned = false;
                tracing::info!(
                    free_bytes = self.space.free(),
                    reserve_held = self.space.held(),
                    "disk has room again: the store file may grow"
                );
                self.note_writable();
            }
            Err(error) => tracing::debug!(%error, "could not lift the store file's size limit"),
        }
    }

    /// Logs once that readings are written again, when nothing holds them back.
    fn note_writable(&mut self) {
        if self.failing.is_some() || self.pinned {
            return;
        }
        self.overflowed = false;
        if let Some(since) = self.unwritable.take() {
            tracing::info!(
                after_ms = since.elapsed().as_millis() as u64,
                "store accepts readings again"
            );
        }
    }

    fn counters_due(&self) -> bool {
        self.counters_saved.elapsed() >= COUNTERS_INTERVAL
    }

    /// Runs one transaction ([`commit::write`]); nothing in memory changes until
    /// [`Worker::applied`].
    fn write(&mut self, work: Work) -> Result<Written, rusqlite::Error> {
        self.counters.next_id = self.counters.next_id.max(self.next_id);
        if self.unswept.is_none() {
            // Rows below the oldest buffered one are stored or finished.
            self.counters.unswept_from = self.buffer.first_id().unwrap_or(self.next_id);
        }
        let state = commit::State {
            config: &self.config,
            buffer: &self.buffer,
            cursor: &self.cursor,
            flows: &self.flows,
            rows: self.rows,
            bytes: self.bytes,
            counters: self.counters,
            scan_from: self.scan_from,
        };
        commit::write(&mut self.db.conn, work, &state)
    }

    /// Brings memory in line with a committed transaction and answers its waiters.
    /// The `pending` watch is updated before any waiter hears of the commit, so a
    /// caller whose append resolved sees the new count.
    fn applied(&mut self, written: Written, work: Work) {
        let batches = if work.inserts {
            self.buffer.take_front(written.batches)
        } else {
            VecDeque::new()
        };
        let flows = std::mem::take(&mut self.flows);
        self.cursor.acks_committed(&written.acked);
        self.take_totals(&written, work);
        self.log_state_changes(&written, work);
        if written.added_rows > 0 {
            self.pending.send_replace(self.pending_rows());
        }
        buffer::committed(batches);
        for flow in flows {
            let _ = flow.reply.send(Ok(()));
        }
        self.last_commit = Instant::now();
        self.commits_since_checkpoint += 1;
        self.wal_estimate += written.added_bytes + written.removed_bytes + 2 * self.db.page_size;
        if self.wal_estimate >= self.space.checkpoint_bytes() {
            self.checkpoint();
        }
    }

    /// Totals, counters and timers after a commit (buffers already taken).
    fn take_totals(&mut self, written: &Written, work: Work) {
        self.rows = (self.rows + written.added_rows).saturating_sub(written.removed_rows);
        self.bytes = (self.bytes + written.added_bytes).saturating_sub(written.removed_bytes);
        self.counters = written.counters;
        if let Some(scan_from) = written.scan_from {
            self.scan_from = scan_from;
        }
        if work.counters {
            self.counters_saved = Instant::now();
            self.counters_dirty = false;
            self.reserved = written.counters.next_id;
        } else {
            self.counters_dirty = true;
        }
        self.first_dirty = if !self.cursor.acking().is_empty() || !self.flows.is_empty() {
            Some(Instant::now())
        } else {
            None
        };
    }

    /// One log line when the disk is writable again, and one when retention starts or
    /// stops dropping.
    fn log_state_changes(&mut self, written: &Written, work: Work) {
        if work.inserts {
            self.failing = None;
            self.note_writable();
        }
        if !written.dropped.is_empty() && !self.dropping {
            tracing::warn!(
                reasons = ?written.dropped,
                policy = ?self.config.policy,
                "store limit reached: dropping readings by policy (counted in stats)"
            );
            self.dropping = true;
        } else if written.dropped.is_empty() && work.inserts && self.dropping {
            tracing::info!("store within its limits again");
            self.dropping = false;
        }
    }

    /// Counts a failed commit and schedules the retry; one log line when the store
    /// starts failing (retries are logged at debug level).
    fn failed(&mut self, error: &rusqlite::Error) {
        self.counters.commit_failures += 1;
        self.counters_dirty = true;
        let now = Instant::now();
        let buffered = self.buffer.rows();
        let state = DiskState::of(error);
        let entering = self.unwritable.is_none();
        self.unwritable.get_or_insert(now);
        let failing = self.failing.get_or_insert(Failing {
            attempts: 0,
            next_retry: now,
            state,
        });
        failing.attempts += 1;
        failing.state = state;
        let backoff = RETRY_MIN
            .saturating_mul(1 << (failing.attempts - 1).min(16))
            .min(RETRY_MAX);
        failing.next_retry = now + backoff;
        let what = match state {
            DiskState::Full => "store full",
            DiskState::ReadOnly => "store read-only",
            DiskState::Writable | DiskState::Failing => "store cannot write",
        };
        if entering {
            tracing::warn!(
                %error,
                limit = self.config.memory_buffer_rows,
                "{what}: {buffered} rows buffered in memory"
            );
        } else {
            tracing::debug!(
                %error,
                attempts = failing.attempts,
                retry_in_ms = backoff.as_millis() as u64,
                "{what}: {buffered} rows buffered in memory"
            );
        }
    }

    /// Keeps the memory buffer within `memory_buffer_rows` while commits fail:
    /// `drop_oldest` first makes room on disk, then (both policies) whole buffered
    /// batches are dropped.
    fn enforce_memory_bound(&mut self) {
        if self.buffer.rows() <= self.config.memory_buffer_rows {
            return;
        }
        if !std::mem::replace(&mut self.overflowed, true) {
            tracing::warn!(
                limit = self.config.memory_buffer_rows,
                policy = ?self.config.policy,
                "store memory buffer full: dropping readings by policy (counted as dropped.disk_full)"
            );
        }
        if self.config.policy == DropPolicy::DropOldest && self.evict_and_commit() {
            return;
        }
        while self.buffer.rows() > self.config.memory_buffer_rows {
            let Some(rows) = self.buffer.drop_one(self.config.policy) else {
                break;
            };
            self.counters.dropped.disk_full += rows as u64;
            self.counters_dirty = true;
        }
        if !self.dirty() {
            self.first_dirty = None;
        }
    }

    /// Deletes stored rows to make room and retries the commit. A row's pages are not
    /// all freed by deleting one row of the same size (a split, a half-full page), so
    /// eviction gets a few rounds. Returns whether the commit went through.
    fn evict_and_commit(&mut self) -> bool {
        let mut rounds = 0;
        while rounds < 4 && self.evict_stored() {
            rounds += 1;
            let all = Work::all(false);
            if let Ok(written) = self.write(all) {
                self.applied(written, all);
                return true;
            }
        }
        false
    }

    /// `drop_oldest` under a full disk: deletes as many of the oldest stored rows (of
    /// the lowest priorities, none above what is buffered) as are buffered, so the
    /// buffer fits into the freed pages. Returns whether anything was deleted.
    fn evict_stored(&mut self) -> bool {
        let ceiling = self.buffer.ceiling();
        // In steps small enough for the WAL space a full disk leaves.
        let wanted = self.buffer.rows().min(4 * commit::SMALL_DELETES);
        match commit::evict(&mut self.db.conn, ceiling, wanted, &self.cursor) {
            Ok((0, _)) | Err(_) => false,
            Ok((rows, freed)) => {
                self.rows = self.rows.saturating_sub(rows);
                self.bytes = self.bytes.saturating_sub(freed);
                self.counters.dropped.disk_full += rows;
                self.counters.commits += 1;
                self.counters_dirty = true;
                tracing::debug!(
                    rows,
                    "disk full: dropped the oldest stored readings to make room"
                );
                true
            }
        }
    }

    fn stats(&self) -> Result<Stats, Error> {
        Ok(Stats {
            depth: self.rows,
            pending: self.pending_rows(),
            in_flight: self.cursor.in_flight() as u64,
            bytes: self.bytes,
            oldest_age_ms: self
                .db
                .first_created_ms()?
                .map(|created| db::age_ms(crate::clock::now_ms(), created)),
            buffered: self.buffer.rows() as u64,
            appended: self.counters.appended,
            delivered: self.counters.delivered,
            dropped: self.counters.dropped,
            commits: self.counters.commits,
            commit_failures: self.counters.commit_failures,
            bytes_written: self.counters.bytes_written,
            file_bytes: self.db.file_bytes(),
            disk: match &self.failing {
                Some(failing) => failing.state,
                None if self.pinned => DiskState::Full,
                None => DiskState::Writable,
            },
            fs_free_bytes: self.space.free(),
            reserve_bytes: self.space.len(),
        })
    }

    /// Periodic work that is not a group commit: checkpoints, counters, the age sweep,
    /// and while the file is held at its size, the look for room.
    fn maintain(&mut self, now: Instant) {
        if self.pinned && now >= self.next_room_check {
            self.next_room_check = now + ROOM_CHECK_INTERVAL;
            // A drain while the disk was full leaves free pages: give them back, and
            // let the file grow again once the filesystem has room; meanwhile keep
            // what came free in the reserve.
            self.checkpoint();
            self.try_unpin();
            if self.pinned {
                self.space.top_up();
            }
        }
        if now >= self.last_checkpoint + CHECKPOINT_INTERVAL {
            if self.commits_since_checkpoint > 0 {
                self.checkpoint();
            } else {
                self.last_checkpoint = now;
            }
        }
        if now >= self.next_age_sweep {
            self.next_age_sweep = now + AGE_SWEEP_INTERVAL;
            if !self.pinned {
                // A reserve that did not fit at open, or was released and not restored.
                self.space.restore();
            }
            let sweep = (self.counters_dirty
                && self.counters_saved.elapsed() >= COUNTERS_IDLE_INTERVAL)
                || self.has_expired_rows();
            if sweep && self.failing.is_none() {
                let work = Work::sweep();
                match self.write(work) {
                    Ok(written) => self.applied(written, work),
                    Err(error) => self.failed(&error),
                }
            }
        }
    }

    fn has_expired_rows(&self) -> bool {
        matches!(
            self.db.first_created_ms(),
            Ok(Some(created)) if retention::expired(created, retention::age_cutoff(&self.config))
        )
    }

    /// A checkpoint, then the incremental vacuum when a drain left many free pages,
    /// in steps of a quarter of the WAL the store lets grow, each checkpointed.
    fn checkpoint(&mut self) {
        self.checkpoint_now();
        let step = (self.space.checkpoint_bytes() / self.db.page_size.max(512) / 4).max(8);
        let mut shrunk = false;
        loop {
            match self.db.vacuum_step(step) {
                Ok(true) => {
                    shrunk = true;
                    self.checkpoint_now();
                }
                Ok(false) => break,
                Err(error)
                    if DiskState::of(&error) == DiskState::Full && self.release_reserve() =>
                {
                    self.checkpoint_now();
                }
                Err(error) => {
                    tracing::debug!(%error, "incremental vacuum failed");
                    break;
                }
            }
        }
        if shrunk {
            tracing::info!(
                file_bytes = self.db.file_bytes(),
                "store file shrunk after a drain"
            );
        }
    }

    /// A checkpoint alone; returns whether every committed page is in the file now, so
    /// the next transaction starts the WAL over.
    fn checkpoint_now(&mut self) -> bool {
        self.last_checkpoint = Instant::now();
        self.commits_since_checkpoint = 0;
        self.wal_estimate = 0;
        match self.db.checkpoint() {
            Ok((bytes, complete)) => {
                self.counters.bytes_written += bytes;
                self.counters_dirty = true;
                complete
            }
            Err(error) => {
                tracing::debug!(%error, "checkpoint failed; retried with the next one");
                false
            }
        }
    }

    /// Close: one last commit whatever the backoff, counters, a checkpoint.
    fn shutdown(&mut self) -> Result<(), Error> {
        let work = Work::all(true);
        let result = match self.write(work) {
            Ok(written) => {
                self.applied(written, work);
                if self.unswept.is_none() && self.buffer.rows() == 0 {
                    // Every row of this process is stored or delivered: no flow of a
                    // row in memory only is left open (stored rows resume their own).
                    self.counters.unswept_from = self.counters.next_id;
                }
                Ok(())
            }
            Err(error) => self.abandon_buffered(&error),
        };
        self.checkpoint();
        if let Err(error) = self.counters.store(&self.db.conn) {
            tracing::debug!(%error, "counters not persisted at close");
        }
        tracing::info!(rows = self.rows, "store closed");
        result
    }

    /// The last commit failed: what is held in memory is lost, counted and answered.
    fn abandon_buffered(&mut self, error: &rusqlite::Error) -> Result<(), Error> {
        self.failed(error);
        let rows = self.buffer.drop_all(DropReason::Shutdown);
        self.counters.dropped.shutdown += rows as u64;
        for flow in self.flows.drain(..) {
            let _ = flow.reply.send(Err(Error::Closed(Vec::new())));
        }
        if rows > 0 {
            tracing::error!(rows, %error, "store closing: readings held in memory are lost");
            return Err(Error::Dropped {
                rows,
                reason: DropReason::Shutdown,
            });
        }
        Ok(())
    }
}

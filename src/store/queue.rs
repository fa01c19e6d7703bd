//! The queue handle and the thread that owns the SQLite connection.
//!
//! Invariants (the module-level ones are in `store/mod.rs`):
//! - Only the store thread touches the connection; handles talk to it through a channel
//!   bounded by a semaphore of `CHANNEL_CAPACITY` slots.
//! - Memory changes only after a transaction committed (`Worker::applied`); a failed
//!   transaction leaves every buffer as it was, for the retry.
//! - A row id in `in_flight` or `acking` is never handed out by `next` and never chosen
//!   by a retention drop; `acking` rows are deleted by the next commit.
//! - Oldest-first cursor: every stored row with an id up to `cursor` is in `in_flight`,
//!   in `acking`, or in `released`; so `next` reads `released` (in id order) and then
//!   only the rows after `cursor`, never the in-flight and acknowledged rows in front.
//!   New rows get ids above every stored id, hence above `cursor`.
//! - Flow updates are committed at most `flow_commit_ms` after the previous commit;
//!   the thread takes every request already queued before it decides to commit, so one
//!   commit serves every waiter that is already there.
//! - Values read back from the file (ids, sizes, counters) may have been written by
//!   something else: they are clamped or saturated, never trusted not to overflow.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::db::{self, Counters, Db};
use super::{
    DrainOrder, DropPolicy, DropReason, Error, Message, Priority, Stats, StoreConfig, Stored,
};

/// Requests waiting for the store thread; callers beyond it wait for a slot.
const CHANNEL_CAPACITY: usize = 256;
/// A checkpoint runs at least this often while there are commits...
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// ...or once the WAL has grown by about this much.
const CHECKPOINT_WAL_BYTES: u64 = 4 << 20;
/// Counters are persisted at most this often (and on close): writing them with every
/// commit would add a page write per commit.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(10);
/// Most rows the age sweep looks at per commit.
const AGE_SCAN_ROWS: i64 = 1024;
/// Idle queues are checked for rows past `max_age_secs` this often.
const AGE_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// 2020-01-01: a creation time before it comes from a gateway whose clock was not set
/// yet (a Pi without RTC before NTP). Such rows are exempt from `max_age_secs`, or the
/// first clock correction would drop the whole backlog.
const CLOCK_SET_MS: i64 = 1_577_836_800_000;

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Command {
    Append {
        batch: Vec<Message>,
        reply: Reply<Vec<i64>>,
    },
    Next {
        max: usize,
        order: DrainOrder,
        reply: Reply<Vec<Stored>>,
    },
    Ack {
        ids: Vec<i64>,
        reply: Reply<()>,
    },
    Release {
        ids: Vec<i64>,
        reply: Reply<()>,
    },
    SetFlow {
        id: i64,
        pkid: u16,
        pubrec: bool,
        reply: Reply<()>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    Close {
        reply: Reply<()>,
    },
    /// Stops the thread as a crash would: nothing buffered is written.
    #[cfg(test)]
    Crash {
        reply: Reply<()>,
    },
    /// Runs a pragma on the connection: `max_page_count` simulates a full disk,
    /// `query_only` a read-only filesystem.
    #[cfg(test)]
    Pragma {
        sql: String,
        reply: Reply<()>,
    },
}

struct Request {
    command: Command,
    /// Returned when the thread has taken the request: this is what bounds the channel.
    _slot: OwnedSemaphorePermit,
}

/// A handle on the store-and-forward queue. Cheap to clone; all clones talk to the one
/// thread that owns the database. Dropping every handle without [`Queue::close`] still
/// flushes what was buffered.
///
/// Futures returned by its methods do not cancel the request when dropped: a request
/// that reached the thread is carried out.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    requests: std_mpsc::Sender<Request>,
    slots: Arc<Semaphore>,
    pending: watch::Receiver<u64>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("pending", &*self.inner.pending.borrow())
            .finish()
    }
}

impl Queue {
    /// Opens (or creates) the queue file and starts its thread. Rows that were in flight
    /// when the queue last stopped are pending again. A corrupt file is moved aside and
    /// replaced by a fresh one.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::Io`] or
    /// [`Error::Sqlite`] when the file cannot be opened or created;
    /// [`Error::NewerFormat`] for a file written by a newer build.
    pub fn open(config: StoreConfig) -> Result<Queue, Error> {
        if let Some(text) = crate::config::Invalid::summary(&config.validate()) {
            return Err(Error::Config(text));
        }
        let db = Db::open(&config.path, config.synchronous)?;
        let counters = Counters::load(&db.conn)?;
        let (rows, bytes, max_id) = db.totals()?;
        tracing::info!(path = %config.path.display(), rows, bytes, "store opened");
        let (pending_tx, pending_rx) = watch::channel(rows);
        let (requests, inbox) = std_mpsc::channel();
        let worker = Worker::new(
            db,
            config.clone(),
            counters,
            rows,
            bytes,
            max_id,
            pending_tx,
        );
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || worker.run(inbox))
            .map_err(|source| Error::Io {
                path: config.path.clone(),
                source,
            })?;
        Ok(Queue {
            inner: Arc::new(Inner {
                requests,
                slots: Arc::new(Semaphore::new(CHANNEL_CAPACITY)),
                pending: pending_rx,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    async fn send(&self, command: Command) -> Result<(), Command> {
        let Ok(slot) = self.inner.slots.clone().acquire_owned().await else {
            return Err(command);
        };
        self.inner
            .requests
            .send(Request {
                command,
                _slot: slot,
            })
            .map_err(|e| e.0.command)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        if self.send(make(reply)).await.is_err() {
            return Err(Error::Closed(Vec::new()));
        }
        answer.await.map_err(|_| Error::Closed(Vec::new()))?
    }

    /// Stores a batch; resolves once its transaction has committed (at most
    /// `commit_interval_ms` later, or when the disk is writable again). Returns the row
    /// ids in batch order. A row may already have been dropped by a retention limit in
    /// the same commit (`drop_newest` drops the newest rows); such drops are counted in
    /// [`Stats::dropped`].
    ///
    /// # Errors
    /// [`Error::Dropped`] when the whole batch was dropped from the memory buffer while
    /// the disk was unavailable; [`Error::Closed`] (with the batch) when the queue is
    /// closed.
    pub async fn append(&self, batch: Vec<Message>) -> Result<Vec<i64>, Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        if let Err(command) = self.send(Command::Append { batch, reply }).await {
            let batch = match command {
                Command::Append { batch, .. } => batch,
                _ => Vec::new(),
            };
            return Err(Error::Closed(batch));
        }
        answer.await.map_err(|_| Error::Closed(Vec::new()))?
    }

    /// Hands out up to `max` pending rows and marks them in flight. `OldestFirst` gives
    /// the oldest pending rows in queue order; `NewestFirst` gives the newest `max`
    /// pending rows, also in queue order (so live data need not wait behind a backlog,
    /// and a batch still keeps per-source order).
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the file cannot be read; [`Error::Closed`].
    pub async fn next(&self, max: usize, order: DrainOrder) -> Result<Vec<Stored>, Error> {
        self.call(|reply| Command::Next { max, order, reply }).await
    }

    /// Deletes delivered rows. Resolves once the rows are no longer handed out; the
    /// delete becomes durable with the next group commit.
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub async fn ack(&self, ids: Vec<i64>) -> Result<(), Error> {
        self.call(|reply| Command::Ack { ids, reply }).await
    }

    /// Returns in-flight rows to pending (after a disconnect). Their flow state stays.
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub async fn release(&self, ids: Vec<i64>) -> Result<(), Error> {
        self.call(|reply| Command::Release { ids, reply }).await
    }

    /// Persists the QoS 1/2 flow state of a row: the packet identifier assigned to it,
    /// and (QoS 2) whether PUBREC was received. Resolves once committed, so the uplink
    /// should call it before sending the PUBLISH (or PUBREL). It does not wait for the
    /// group-commit interval: it commits (with everything else waiting) once
    /// `flow_commit_ms` have passed since the previous commit, so concurrent calls
    /// share a commit.
    ///
    /// # Errors
    /// [`Error::Closed`] (also when the queue closes while the disk is unavailable).
    pub async fn set_flow(&self, id: i64, pkid: u16, pubrec: bool) -> Result<(), Error> {
        self.call(|reply| Command::SetFlow {
            id,
            pkid,
            pubrec,
            reply,
        })
        .await
    }

    /// A snapshot of depth, bytes, ages and counters.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the file cannot be read; [`Error::Closed`].
    pub async fn stats(&self) -> Result<Stats, Error> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// The number of pending rows; it changes whenever rows become pending (a commit of
    /// appends, a release).
    pub fn pending(&self) -> watch::Receiver<u64> {
        self.inner.pending.clone()
    }

    /// Writes everything buffered, checkpoints, persists counters and stops the thread.
    /// Other clones of this handle get [`Error::Closed`] afterwards.
    ///
    /// # Errors
    /// [`Error::Dropped`] with reason `shutdown` when the disk was still unavailable and
    /// buffered rows could not be written; [`Error::Closed`] if already closed.
    pub async fn close(self) -> Result<(), Error> {
        let result = self.call(|reply| Command::Close { reply }).await;
        self.join().await;
        result
    }

    async fn join(&self) {
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            if tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_or(true, |joined| joined.is_err())
            {
                tracing::error!("store thread ended abnormally");
            }
        }
    }

    /// Stops the thread as a crash would: buffered acks and flow updates are lost.
    #[cfg(test)]
    pub(super) async fn crash(self) {
        let _ = self.call(|reply| Command::Crash { reply }).await;
        self.join().await;
    }

    #[cfg(test)]
    pub(super) async fn pragma(&self, sql: &str) -> Result<(), Error> {
        let sql = sql.to_string();
        self.call(|reply| Command::Pragma { sql, reply }).await
    }
}

/// An appended batch waiting for its commit.
struct Batch {
    messages: Vec<Message>,
    reply: Option<Reply<Vec<i64>>>,
    /// The highest priority in the batch: a batch is dropped whole, so it is worth what
    /// its most important message is.
    priority: Priority,
}

struct Flow {
    id: i64,
    pkid: u16,
    pubrec: bool,
    reply: Reply<()>,
}

/// State while commits fail (disk full, read-only filesystem, I/O errors).
struct Failing {
    since: Instant,
    attempts: u32,
    next_retry: Instant,
}

/// What one transaction should do.
#[derive(Clone, Copy)]
struct Work {
    inserts: bool,
    retention: bool,
    counters: bool,
}

/// What a committed transaction did, applied to the in-memory state after the commit.
#[derive(Default)]
struct Written {
    ids: Vec<Vec<i64>>,
    added_rows: u64,
    added_bytes: u64,
    removed_rows: u64,
    removed_bytes: u64,
    dropped: Vec<(DropReason, u64)>,
    counters: Counters,
    scan_from: Option<[i64; 3]>,
}

struct Worker {
    db: Db,
    config: StoreConfig,
    interval: Duration,
    batches: VecDeque<Batch>,
    buffered_rows: usize,
    in_flight: HashSet<i64>,
    /// Acknowledged rows whose delete is not committed yet; never handed out again.
    acking: HashSet<i64>,
    /// The highest id an oldest-first `next` has looked at.
    cursor: i64,
    /// Released rows at or below `cursor`: `next` hands them out first.
    released: BTreeSet<i64>,
    flows: Vec<Flow>,
    /// When the oldest uncommitted request arrived.
    first_dirty: Option<Instant>,
    /// When the last transaction committed; flow updates wait `flow_spacing` after it.
    last_commit: Instant,
    flow_spacing: Duration,
    rows: u64,
    bytes: u64,
    next_id: i64,
    counters: Counters,
    counters_saved: Instant,
    counters_dirty: bool,
    wal_estimate: u64,
    commits_since_checkpoint: u64,
    last_checkpoint: Instant,
    next_age_sweep: Instant,
    failing: Option<Failing>,
    dropping: bool,
    /// Per priority class, where `drop_oldest` looks for its next victims.
    scan_from: [i64; 3],
    pending: watch::Sender<u64>,
}

impl Worker {
    fn new(
        db: Db,
        config: StoreConfig,
        counters: Counters,
        rows: u64,
        bytes: u64,
        max_id: i64,
        pending: watch::Sender<u64>,
    ) -> Worker {
        let now = Instant::now();
        Worker {
            db,
            interval: Duration::from_millis(config.commit_interval_ms),
            flow_spacing: Duration::from_millis(config.flow_commit_ms),
            config,
            batches: VecDeque::new(),
            buffered_rows: 0,
            in_flight: HashSet::new(),
            acking: HashSet::new(),
            cursor: i64::MIN,
            released: BTreeSet::new(),
            flows: Vec::new(),
            first_dirty: None,
            last_commit: now,
            rows,
            bytes,
            // Ids come from the file: a row id of i64::MAX must not overflow here. Ids
            // saturate, and an insert with a taken id fails and is retried like a full disk.
            next_id: max_id.saturating_add(1).max(counters.next_id).max(1),
            counters,
            counters_saved: now,
            counters_dirty: false,
            wal_estimate: 0,
            commits_since_checkpoint: 0,
            last_checkpoint: now,
            next_age_sweep: now,
            failing: None,
            dropping: false,
            scan_from: [i64::MIN; 3],
            pending,
        }
    }

    fn run(mut self, inbox: std_mpsc::Receiver<Request>) {
        loop {
            let now = Instant::now();
            let wake = self.next_wake(now);
            let mut request = match inbox.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    if let Err(error) = self.shutdown() {
                        tracing::error!(%error, "store stopped with data it could not write");
                    }
                    return;
                }
            };
            // Everything already queued is taken before a commit, so concurrent waiters
            // share it; but a full group of rows still commits at its threshold.
            let mut taken = 0;
            while let Some(next) = request.take() {
                match next.command {
                    Command::Close { reply } => {
                        let _ = reply.send(self.shutdown());
                        return;
                    }
                    #[cfg(test)]
                    Command::Crash { reply } => {
                        let _ = reply.send(Ok(()));
                        return;
                    }
                    command => self.handle(command),
                }
                taken += 1;
                if taken < CHANNEL_CAPACITY && self.buffered_rows < self.config.commit_max_rows {
                    request = inbox.try_recv().ok();
                }
            }
            let now = Instant::now();
            if self.commit_due(now) {
                self.commit();
            }
            self.maintain(Instant::now());
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Append { batch, reply } => {
                let priority = batch.iter().map(|m| m.priority).max().unwrap_or_default();
                self.buffered_rows += batch.len();
                self.batches.push_back(Batch {
                    messages: batch,
                    reply: Some(reply),
                    priority,
                });
                self.mark_dirty();
                if self.failing.is_some() {
                    self.enforce_memory_bound();
                }
            }
            Command::Next { max, order, reply } => {
                let _ = reply.send(self.next(max, order).map_err(Error::from));
            }
            Command::Ack { ids, reply } => {
                for id in ids {
                    self.in_flight.remove(&id);
                    self.released.remove(&id);
                    self.acking.insert(id);
                }
                self.mark_dirty();
                let _ = reply.send(Ok(()));
            }
            Command::Release { ids, reply } => {
                let mut released = 0;
                for id in ids {
                    if self.in_flight.remove(&id) {
                        released += 1;
                        if id <= self.cursor {
                            self.released.insert(id);
                        }
                    }
                }
                if released > 0 {
                    self.pending.send_replace(self.pending_rows());
                }
                let _ = reply.send(Ok(()));
            }
            Command::SetFlow {
                id,
                pkid,
                pubrec,
                reply,
            } => {
                self.flows.push(Flow {
                    id,
                    pkid,
                    pubrec,
                    reply,
                });
                self.mark_dirty();
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            #[cfg(test)]
            Command::Pragma { sql, reply } => {
                let result = self.db.conn.execute_batch(&sql).map_err(Error::from);
                let _ = reply.send(result);
            }
            Command::Close { .. } => unreachable!("handled by run"),
            #[cfg(test)]
            Command::Crash { .. } => unreachable!("handled by run"),
        }
    }

    fn mark_dirty(&mut self) {
        self.first_dirty.get_or_insert_with(Instant::now);
    }

    fn dirty(&self) -> bool {
        self.buffered_rows > 0 || !self.acking.is_empty() || !self.flows.is_empty()
    }

    fn pending_rows(&self) -> u64 {
        self.rows
            .saturating_sub((self.in_flight.len() + self.acking.len()) as u64)
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let wake = (self.last_checkpoint + CHECKPOINT_INTERVAL)
            .min(self.next_age_sweep)
            .max(now);
        match self.commit_at() {
            Some(due) => wake.min(due),
            None => wake,
        }
    }

    /// When the next commit is due by time: the group-commit interval after the first
    /// uncommitted request, or sooner for flow updates; never before a retry is due.
    fn commit_at(&self) -> Option<Instant> {
        let first = self.first_dirty?;
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
        now >= due || self.buffered_rows >= self.config.commit_max_rows
    }

    /// One group commit. On failure everything stays buffered for the retry, except
    /// that acks and flow updates are tried alone, so delivery can go on (and free
    /// space) while appends cannot be written.
    fn commit(&mut self) {
        let counters = self.counters_due();
        let all = Work {
            inserts: true,
            retention: true,
            counters,
        };
        match self.write(all) {
            Ok(written) => self.applied(written, all),
            Err(error) => {
                if !self.acking.is_empty() || !self.flows.is_empty() {
                    let small = Work {
                        inserts: false,
                        retention: false,
                        counters,
                    };
                    if let Ok(written) = self.write(small) {
                        self.applied(written, small);
                    }
                }
                self.failed(&error);
                self.enforce_memory_bound();
            }
        }
    }

    fn counters_due(&self) -> bool {
        self.counters_saved.elapsed() >= COUNTERS_INTERVAL
    }

    /// Runs one transaction; nothing in memory changes until [`Worker::applied`].
    fn write(&mut self, work: Work) -> Result<Written, rusqlite::Error> {
        let mut written = Written {
            counters: self.counters,
            ..Written::default()
        };
        let tx = self
            .db
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut next_id = self.next_id;
        if work.inserts {
            let mut insert = tx.prepare_cached(
                "INSERT INTO message (id, topic, payload, qos, retain, created_ms, priority, size) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for batch in &self.batches {
                let mut ids = Vec::with_capacity(batch.messages.len());
                for m in &batch.messages {
                    let size = m.stored_size();
                    insert.execute(params![
                        next_id,
                        m.topic,
                        m.payload.as_ref(),
                        m.qos as u8,
                        m.retain,
                        m.created_ms,
                        m.priority as u8,
                        i64::try_from(size).unwrap_or(i64::MAX),
                    ])?;
                    ids.push(next_id);
                    next_id = next_id.saturating_add(1);
                    written.added_rows += 1;
                    written.added_bytes += size;
                }
                written.ids.push(ids);
            }
        }
        if !self.acking.is_empty() {
            let mut delete =
                tx.prepare_cached("DELETE FROM message WHERE id = ?1 RETURNING size")?;
            for id in &self.acking {
                if let Some(size) = delete.query_row([id], |r| r.get::<_, i64>(0)).optional()? {
                    written.removed_rows += 1;
                    written.removed_bytes += u64::try_from(size).unwrap_or(0);
                    written.counters.delivered += 1;
                }
            }
        }
        if !self.flows.is_empty() {
            let mut update =
                tx.prepare_cached("UPDATE message SET pkid = ?2, pubrec = ?3 WHERE id = ?1")?;
            for flow in &self.flows {
                update.execute(params![flow.id, flow.pkid, flow.pubrec])?;
            }
        }
        if work.retention {
            let rows = self.rows + written.added_rows - written.removed_rows.min(self.rows);
            let bytes = (self.bytes + written.added_bytes).saturating_sub(written.removed_bytes);
            let (in_flight, acking) = (&self.in_flight, &self.acking);
            let skip = |id: &i64| in_flight.contains(id) || acking.contains(id);
            let (victims, scan_from) =
                retention_victims(&tx, &self.config, skip, self.scan_from, rows, bytes)?;
            written.scan_from = Some(scan_from);
            let mut delete = tx.prepare_cached("DELETE FROM message WHERE id = ?1")?;
            for (id, size, reason) in victims {
                delete.execute([id])?;
                written.removed_rows += 1;
                written.removed_bytes += size;
                written.counters.dropped.add(reason, 1);
                match written.dropped.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, n)) => *n += 1,
                    None => written.dropped.push((reason, 1)),
                }
            }
        }
        written.counters.appended += written.added_rows;
        written.counters.commits += 1;
        written.counters.next_id = next_id;
        if work.counters {
            written.counters.store(&tx)?;
        }
        tx.commit()?;
        Ok(written)
    }

    /// Brings memory in line with a committed transaction and answers its waiters.
    /// The `pending` watch is updated before any waiter hears of the commit, so a
    /// caller whose append resolved sees the new count.
    fn applied(&mut self, mut written: Written, work: Work) {
        let batches = if work.inserts {
            self.buffered_rows = 0;
            std::mem::take(&mut self.batches)
        } else {
            VecDeque::new()
        };
        let flows = std::mem::take(&mut self.flows);
        let ids = std::mem::take(&mut written.ids);
        self.acking.clear();
        self.rows = (self.rows + written.added_rows).saturating_sub(written.removed_rows);
        self.bytes = (self.bytes + written.added_bytes).saturating_sub(written.removed_bytes);
        self.next_id = written.counters.next_id;
        self.counters = written.counters;
        if let Some(scan_from) = written.scan_from {
            self.scan_from = scan_from;
        }
        if work.counters {
            self.counters_saved = Instant::now();
            self.counters_dirty = false;
        } else {
            self.counters_dirty = true;
        }
        self.first_dirty = if self.dirty() {
            Some(Instant::now())
        } else {
            None
        };
        if let Some(failing) = self.failing.take_if(|_| work.inserts) {
            tracing::info!(
                after_ms = failing.since.elapsed().as_millis() as u64,
                attempts = failing.attempts,
                "store writable again; buffered readings committed"
            );
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
        if written.added_rows > 0 {
            self.pending.send_replace(self.pending_rows());
        }
        for (batch, ids) in batches.into_iter().zip(ids) {
            if let Some(reply) = batch.reply {
                let _ = reply.send(Ok(ids));
            }
        }
        for flow in flows {
            let _ = flow.reply.send(Ok(()));
        }
        self.last_commit = Instant::now();
        self.commits_since_checkpoint += 1;
        self.wal_estimate += written.added_bytes + 2 * self.db.page_size;
        if self.wal_estimate >= CHECKPOINT_WAL_BYTES {
            self.checkpoint();
        }
    }

    fn failed(&mut self, error: &rusqlite::Error) {
        self.counters.commit_failures += 1;
        self.counters_dirty = true;
        let now = Instant::now();
        let failing = self.failing.get_or_insert(Failing {
            since: now,
            attempts: 0,
            next_retry: now,
        });
        failing.attempts += 1;
        let backoff = RETRY_MIN
            .saturating_mul(1 << (failing.attempts - 1).min(16))
            .min(RETRY_MAX);
        failing.next_retry = now + backoff;
        if failing.attempts.is_power_of_two() {
            tracing::warn!(
                %error,
                attempts = failing.attempts,
                buffered_rows = self.buffered_rows,
                retry_in_ms = backoff.as_millis() as u64,
                "store cannot commit (disk full or read-only?); holding readings in memory"
            );
        }
    }

    /// Keeps the memory buffer within `memory_buffer_rows` while commits fail.
    fn enforce_memory_bound(&mut self) {
        if self.buffered_rows <= self.config.memory_buffer_rows {
            return;
        }
        // A row's pages are not all freed by deleting one row of the same size (a
        // split, a half-full page), so eviction gets a few rounds.
        let mut rounds = 0;
        while self.config.policy == DropPolicy::DropOldest && rounds < 4 && self.evict_stored() {
            rounds += 1;
            let all = Work {
                inserts: true,
                retention: true,
                counters: false,
            };
            if let Ok(written) = self.write(all) {
                self.applied(written, all);
                return;
            }
        }
        while self.buffered_rows > self.config.memory_buffer_rows {
            let lowest = self
                .batches
                .iter()
                .map(|b| b.priority)
                .min()
                .unwrap_or_default();
            let position = match self.config.policy {
                DropPolicy::DropOldest => self.batches.iter().position(|b| b.priority == lowest),
                DropPolicy::DropNewest => self.batches.iter().rposition(|b| b.priority == lowest),
            };
            let Some(batch) = position.and_then(|p| self.batches.remove(p)) else {
                break;
            };
            let rows = batch.messages.len();
            self.buffered_rows -= rows;
            self.counters.dropped.disk_full += rows as u64;
            self.counters_dirty = true;
            if let Some(reply) = batch.reply {
                let _ = reply.send(Err(Error::Dropped {
                    rows,
                    reason: DropReason::DiskFull,
                }));
            }
        }
        if !self.dirty() {
            self.first_dirty = None;
        }
    }

    /// `drop_oldest` under a full disk: deletes as many of the oldest stored rows (of
    /// the lowest priorities, none above what is buffered) as are buffered, so the
    /// buffer fits into the freed pages. Returns whether anything was deleted.
    fn evict_stored(&mut self) -> bool {
        let ceiling = self
            .batches
            .iter()
            .map(|b| b.priority)
            .max()
            .unwrap_or_default();
        let wanted = self.buffered_rows;
        let result = (|| -> Result<(u64, u64), rusqlite::Error> {
            let tx = self
                .db
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut victims = Vec::new();
            {
                let mut select = tx.prepare_cached(
                    "SELECT id, size FROM message WHERE priority = ?1 ORDER BY id",
                )?;
                'classes: for class in [Priority::Periodic, Priority::Event, Priority::Alarm] {
                    if class > ceiling {
                        break;
                    }
                    let mut cursor = select.query([class as u8])?;
                    while let Some(row) = cursor.next()? {
                        if victims.len() >= wanted {
                            break 'classes;
                        }
                        let id: i64 = row.get(0)?;
                        if !self.in_flight.contains(&id) && !self.acking.contains(&id) {
                            victims.push((id, row.get::<_, i64>(1)?));
                        }
                    }
                }
            }
            let mut freed = 0;
            {
                let mut delete = tx.prepare_cached("DELETE FROM message WHERE id = ?1")?;
                for (id, size) in &victims {
                    delete.execute([id])?;
                    freed += u64::try_from(*size).unwrap_or(0);
                }
            }
            tx.commit()?;
            Ok((victims.len() as u64, freed))
        })();
        match result {
            Ok((0, _)) | Err(_) => false,
            Ok((rows, freed)) => {
                self.rows = self.rows.saturating_sub(rows);
                self.bytes = self.bytes.saturating_sub(freed);
                self.counters.dropped.disk_full += rows;
                self.counters.commits += 1;
                self.counters_dirty = true;
                tracing::warn!(
                    rows,
                    "disk full: dropped the oldest stored readings to make room"
                );
                true
            }
        }
    }

    fn next(&mut self, max: usize, order: DrainOrder) -> Result<Vec<Stored>, rusqlite::Error> {
        let mut out = Vec::with_capacity(max.min(1024));
        if max == 0 {
            return Ok(out);
        }
        match order {
            DrainOrder::OldestFirst => {
                let cursor = self.cursor;
                if let Err(error) = self.next_oldest(max, &mut out) {
                    // What was taken is not handed out: put it back.
                    self.cursor = cursor;
                    self.released
                        .extend(out.iter().map(|s| s.id).filter(|id| *id <= cursor));
                    return Err(error);
                }
            }
            DrainOrder::NewestFirst => {
                self.next_newest(max, &mut out)?;
                for stored in &out {
                    self.released.remove(&stored.id);
                }
            }
        }
        self.in_flight.extend(out.iter().map(|s| s.id));
        Ok(out)
    }

    /// Released rows first (they are older than every row after the cursor), then the
    /// rows after the cursor, which moves past every row it reads.
    fn next_oldest(&mut self, max: usize, out: &mut Vec<Stored>) -> Result<(), rusqlite::Error> {
        if !self.released.is_empty() {
            let mut by_id = self.db.conn.prepare_cached(&format!(
                "SELECT {} FROM message WHERE id = ?1",
                db::STORED_COLUMNS
            ))?;
            while out.len() < max {
                let Some(&id) = self.released.first() else {
                    break;
                };
                let row = by_id.query_row([id], db::stored_from_row).optional()?;
                self.released.remove(&id);
                // A released row may have been dropped by retention since.
                if let Some(stored) = row {
                    out.push(stored);
                }
            }
        }
        let mut statement = self.db.conn.prepare_cached(&format!(
            "SELECT {} FROM message WHERE id > ?1 ORDER BY id LIMIT ?2",
            db::STORED_COLUMNS
        ))?;
        while out.len() < max {
            // Rows after the cursor are in flight or acknowledged only when a
            // newest-first `next` handed them out, so one pass is the rule.
            let limit = max - out.len();
            let mut rows = statement.query(params![
                self.cursor,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut seen = 0;
            while let Some(row) = rows.next()? {
                seen += 1;
                let id: i64 = row.get(0)?;
                if !self.in_flight.contains(&id) && !self.acking.contains(&id) {
                    out.push(db::stored_from_row(row)?);
                }
                self.cursor = id;
            }
            if seen < limit {
                break;
            }
        }
        Ok(())
    }

    /// The newest `max` pending rows, in queue order. Skipped rows are at most the
    /// in-flight and acknowledged ones, so one pass is the rule.
    fn next_newest(&mut self, max: usize, out: &mut Vec<Stored>) -> Result<(), rusqlite::Error> {
        let mut statement = self.db.conn.prepare_cached(&format!(
            "SELECT {} FROM message WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            db::STORED_COLUMNS
        ))?;
        let mut cursor = i64::MAX;
        loop {
            let limit = (max - out.len())
                .saturating_add(self.in_flight.len())
                .saturating_add(self.acking.len());
            let mut rows =
                statement.query(params![cursor, i64::try_from(limit).unwrap_or(i64::MAX)])?;
            let mut seen = 0;
            while let Some(row) = rows.next()? {
                seen += 1;
                let id: i64 = row.get(0)?;
                cursor = id;
                if self.in_flight.contains(&id) || self.acking.contains(&id) {
                    continue;
                }
                out.push(db::stored_from_row(row)?);
                if out.len() == max {
                    break;
                }
            }
            if out.len() == max || seen < limit {
                break;
            }
        }
        out.reverse();
        Ok(())
    }

    fn stats(&self) -> Result<Stats, Error> {
        Ok(Stats {
            depth: self.rows,
            pending: self.pending_rows(),
            in_flight: self.in_flight.len() as u64,
            bytes: self.bytes,
            oldest_age_ms: self
                .db
                .first_created_ms()?
                .map(|created| db::age_ms(crate::clock::now_ms(), created)),
            buffered: self.buffered_rows as u64,
            appended: self.counters.appended,
            delivered: self.counters.delivered,
            dropped: self.counters.dropped,
            commits: self.counters.commits,
            commit_failures: self.counters.commit_failures,
            bytes_written: self.counters.bytes_written,
            file_bytes: self.db.file_bytes(),
        })
    }

    /// Periodic work that is not a group commit: checkpoints, counters, the age sweep.
    fn maintain(&mut self, now: Instant) {
        if now >= self.last_checkpoint + CHECKPOINT_INTERVAL {
            if self.commits_since_checkpoint > 0 {
                self.checkpoint();
            } else {
                self.last_checkpoint = now;
            }
        }
        if now >= self.next_age_sweep {
            self.next_age_sweep = now + AGE_SWEEP_INTERVAL;
            let sweep = (self.counters_dirty && self.counters_due()) || self.has_expired_rows();
            if sweep && self.failing.is_none() {
                let work = Work {
                    inserts: false,
                    retention: true,
                    counters: true,
                };
                match self.write(work) {
                    Ok(written) => self.applied(written, work),
                    Err(error) => self.failed(&error),
                }
            }
        }
    }

    fn has_expired_rows(&self) -> bool {
        let max_age_ms =
            i64::try_from(self.config.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        matches!(
            self.db.first_created_ms(),
            Ok(Some(created)) if created >= CLOCK_SET_MS && created < crate::clock::now_ms().saturating_sub(max_age_ms)
        )
    }

    fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        self.commits_since_checkpoint = 0;
        self.wal_estimate = 0;
        match self.db.checkpoint() {
            Ok(bytes) => {
                self.counters.bytes_written += bytes;
                self.counters_dirty = true;
            }
            Err(error) => tracing::debug!(%error, "checkpoint failed; retried with the next one"),
        }
        match self.db.vacuum_if_worth_it() {
            Ok(true) => {
                if let Ok(bytes) = self.db.checkpoint() {
                    self.counters.bytes_written += bytes;
                }
                tracing::info!(
                    file_bytes = self.db.file_bytes(),
                    "store file shrunk after a drain"
                );
            }
            Ok(false) => {}
            Err(error) => tracing::debug!(%error, "incremental vacuum failed"),
        }
    }

    /// Close: one last commit whatever the backoff, counters, a checkpoint.
    fn shutdown(&mut self) -> Result<(), Error> {
        let work = Work {
            inserts: true,
            retention: true,
            counters: true,
        };
        let mut result = Ok(());
        match self.write(work) {
            Ok(written) => self.applied(written, work),
            Err(error) => {
                self.failed(&error);
                let rows = self.buffered_rows;
                for batch in self.batches.drain(..) {
                    if let Some(reply) = batch.reply {
                        let _ = reply.send(Err(Error::Dropped {
                            rows: batch.messages.len(),
                            reason: DropReason::Shutdown,
                        }));
                    }
                }
                self.buffered_rows = 0;
                self.counters.dropped.shutdown += rows as u64;
                for flow in self.flows.drain(..) {
                    let _ = flow.reply.send(Err(Error::Closed(Vec::new())));
                }
                if rows > 0 {
                    tracing::error!(rows, %error, "store closing: readings held in memory are lost");
                    result = Err(Error::Dropped {
                        rows,
                        reason: DropReason::Shutdown,
                    });
                }
            }
        }
        self.checkpoint();
        if let Err(error) = self.counters.store(&self.db.conn) {
            tracing::debug!(%error, "counters not persisted at close");
        }
        tracing::info!(rows = self.rows, "store closed");
        result
    }
}

/// A row chosen for a retention drop: id, size, why.
type Victim = (i64, u64, DropReason);

/// Rows to drop so the queue is within `max_age_secs`, `max_rows` and `max_bytes`,
/// by the policy: lowest priority first, then oldest (`drop_oldest`) or newest
/// (`drop_newest`). In-flight rows are never dropped.
fn retention_victims(
    tx: &rusqlite::Transaction<'_>,
    config: &StoreConfig,
    skip: impl Fn(&i64) -> bool,
    mut scan_from: [i64; 3],
    mut rows: u64,
    mut bytes: u64,
) -> Result<(Vec<Victim>, [i64; 3]), rusqlite::Error> {
    let mut victims = Vec::new();
    let mut chosen = HashSet::new();
    let max_age_ms = i64::try_from(config.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let cutoff = crate::clock::now_ms().saturating_sub(max_age_ms);
    // Rows are in creation order closely enough: the sweep stops at the first row
    // that is young enough, so it costs only the rows it drops; and it looks at no more
    // than AGE_SCAN_ROWS, in case the front of the queue is in flight or unstamped.
    let mut by_age =
        tx.prepare_cached("SELECT id, size, created_ms FROM message ORDER BY id LIMIT ?1")?;
    let mut cursor = by_age.query([AGE_SCAN_ROWS])?;
    while let Some(row) = cursor.next()? {
        let (id, size, created): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
        if created >= cutoff {
            break;
        }
        if created < CLOCK_SET_MS || skip(&id) {
            continue;
        }
        let size = u64::try_from(size).unwrap_or(0);
        victims.push((id, size, DropReason::MaxAge));
        chosen.insert(id);
        rows = rows.saturating_sub(1);
        bytes = bytes.saturating_sub(size);
    }
    drop(cursor);
    if rows <= config.max_rows && bytes <= config.max_bytes {
        return Ok((victims, scan_from));
    }
    // `drop_oldest` starts each class where the previous drop of that class ended
    // (`scan_from`), so a queue that sits at its limit does not rescan the rows of other
    // classes in front on every commit.
    let oldest = config.policy == DropPolicy::DropOldest;
    let sql = if oldest {
        "SELECT id, size FROM message WHERE priority = ?1 AND id >= ?2 ORDER BY id"
    } else {
        "SELECT id, size FROM message WHERE priority = ?1 AND id >= ?2 ORDER BY id DESC"
    };
    let mut by_policy = tx.prepare_cached(sql)?;
    'classes: for (slot, class) in [Priority::Periodic, Priority::Event, Priority::Alarm]
        .into_iter()
        .enumerate()
    {
        let from = if oldest { scan_from[slot] } else { i64::MIN };
        let mut cursor = by_policy.query(params![class as u8, from])?;
        let mut first_skipped = None;
        while let Some(row) = cursor.next()? {
            let reason = if rows > config.max_rows {
                DropReason::MaxRows
            } else if bytes > config.max_bytes {
                DropReason::MaxBytes
            } else {
                break 'classes;
            };
            let (id, size): (i64, i64) = (row.get(0)?, row.get(1)?);
            if skip(&id) || chosen.contains(&id) {
                first_skipped.get_or_insert(id);
                continue;
            }
            let size = u64::try_from(size).unwrap_or(0);
            victims.push((id, size, reason));
            if oldest {
                // Skipped (in-flight) rows may be released later: scan them again.
                scan_from[slot] = first_skipped.unwrap_or(id.saturating_add(1));
            }
            rows = rows.saturating_sub(1);
            bytes = bytes.saturating_sub(size);
        }
    }
    Ok((victims, scan_from))
}

//! The queue handle: the async API that every other module uses. It owns no data; each
//! call becomes one [`Request`] to the store thread ([`super::worker`]) and waits for its
//! answer.
//!
//! Invariants (the module-level ones are in `store/mod.rs`):
//! - Only the store thread touches the connection; handles talk to it through a channel
//!   bounded by a semaphore of [`CHANNEL_CAPACITY`] slots.
//! - A request that cannot be sent hands its payload back: an `append` to a closed queue
//!   gets its batch in [`Error::Closed`].
//! - Dropping every handle closes the channel, and the thread then shuts down as on
//!   [`Queue::close`] (everything buffered is written).

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch, Semaphore};

use super::config::StoreConfig;
use super::db::{self, Counters, Db};
use super::error::Error;
use super::message::{DrainOrder, Message, Stored};
use super::request::{
    Command, Done, Flow, Reply, Request, Retime, Retimed, Rewrite, CHANNEL_CAPACITY,
};
use super::space::Space;
use super::stats::Stats;
use super::worker::Worker;

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
        if let Some(text) = crate::problem::Invalid::summary(&config.validate()) {
            return Err(Error::Config(text));
        }
        let mut space = Space::new(&config.path);
        let db = Db::open(&config.path, config.synchronous, &mut space)?;
        let counters = Counters::load(&db.conn)?;
        let (rows, bytes, max_id) = db.totals()?;
        let unswept = if counters.unswept_from > 0 {
            db::unswept_flows(&db.conn, counters.unswept_from, counters.next_id)?
        } else {
            Vec::new()
        };
        if !unswept.is_empty() {
            tracing::info!(
                packet_ids = unswept.len(),
                "the agent stopped without closing the store: QoS 2 flows of readings held \
                 in memory may be open at the upstream broker, the uplink releases them"
            );
        }
        tracing::info!(path = %config.path.display(), rows, bytes, "store opened");
        let (pending_tx, pending_rx) = watch::channel(rows);
        let (requests, inbox) = std_mpsc::channel();
        let room = space.room(db.file_bytes());
        if config.max_bytes > room {
            tracing::warn!(
                path = %config.path.display(),
                max_bytes = config.max_bytes,
                room_bytes = room,
                "store.max_bytes is more than its filesystem has room for: the disk would fill \
                 first (readings then wait in memory and the drop policy applies)"
            );
        }
        // The file grows only while the reserve is complete (see `space.rs`).
        let pinned = !space.restore();
        if pinned {
            db.pin_size()?;
            tracing::warn!(
                path = %config.path.display(),
                reserve_bytes = space.bytes(),
                free_bytes = space.free(),
                "disk nearly full: no room for the store's reserve, so the store file does not \
                 grow until there is (readings go into its free pages, then wait in memory)"
            );
        }
        let worker = Worker::new(
            db,
            space,
            pinned,
            config.clone(),
            counters,
            rows,
            bytes,
            max_id,
            unswept,
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
    /// [`Stats::dropped`]. A caller that must not wait for the disk uses
    /// [`Queue::submit`].
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
        let done: Done = Box::new(move |result| {
            let _ = reply.send(result);
        });
        if let Err(command) = self.send(Command::Append { batch, done }).await {
            let batch = match command {
                Command::Append { batch, .. } => batch,
                _ => Vec::new(),
            };
            return Err(Error::Closed(batch));
        }
        answer.await.map_err(|_| Error::Closed(Vec::new()))?
    }

    /// Hands a batch to the store thread without waiting for its commit: resolves as
    /// soon as the thread has the request queued (it waits only while
    /// `CHANNEL_CAPACITY` requests are already queued). `done` is called later, once,
    /// on the store thread, with what [`Queue::append`] would have returned; at once
    /// with [`Error::Closed`] when the queue is closed. While the disk cannot be
    /// written, submitted batches wait in the memory buffer (`memory_buffer_rows`) and
    /// beyond it the drop policy answers them with [`Error::Dropped`].
    pub async fn submit(&self, batch: Vec<Message>, done: Done) {
        if batch.is_empty() {
            done(Ok(Vec::new()));
            return;
        }
        if let Err(Command::Append { batch, done }) =
            self.send(Command::Append { batch, done }).await
        {
            done(Err(Error::Closed(batch)));
        }
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
        self.call(|reply| {
            Command::SetFlow(Flow {
                id,
                pkid,
                pubrec,
                reply,
            })
        })
        .await
    }

    /// Corrects the times of the rows and buffered messages stamped in boot `boot`
    /// ([`Message::unsynced`]) once the wall clock is synchronized: `created_ms`
    /// becomes `offset_ms + mono_ms`, the payload is what `rewrite` makes of it for
    /// that change (`None` leaves the row as it is), and the stamp goes. Rows in flight
    /// are not touched. Like [`Queue::submit`] it resolves once the thread has the
    /// request, behind every batch submitted before it; `done` gets the outcome on the
    /// store thread.
    pub async fn retime(
        &self,
        boot: i64,
        offset_ms: i64,
        rewrite: Rewrite,
        done: Box<dyn FnOnce(Result<Retimed, Error>) + Send>,
    ) {
        let retime = Retime {
            boot,
            offset_ms,
            rewrite,
        };
        if let Err(Command::Retime { done, .. }) = self.send(Command::Retime { retime, done }).await
        {
            done(Err(Error::Closed(Vec::new())));
        }
    }

    /// Holds every row back from [`Queue::next`] (`true`: it hands out nothing) or
    /// hands them out again (`false`, and the `pending` watch fires). Resolves once
    /// the thread has the request; requests after it see it in force.
    pub async fn hold(&self, held: bool) {
        let _ = self.send(Command::Hold { held }).await;
    }

    /// The packet ids of QoS 2 flows that rows held only in memory may have left open at
    /// the upstream broker when the process before this one stopped without closing the
    /// store (kill -9, power cut). The uplink sends PUBREL for each on its first
    /// connection that resumes the broker session, before any new packet id, then calls
    /// [`Queue::flows_swept`]. Stored rows' packet ids are never among them.
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub async fn unswept_flows(&self) -> Result<Vec<u16>, Error> {
        self.call(|reply| Command::Unswept { reply }).await
    }

    /// The flows [`Queue::unswept_flows`] gave are released (or the broker session that
    /// held them is gone); recorded with the next counters write.
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub async fn flows_swept(&self) -> Result<(), Error> {
        self.call(|reply| Command::Swept { reply }).await
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

    /// Runs a pragma on the store's connection: `max_page_count` makes the disk full,
    /// `query_only` read-only, for the tests of what the store and the pipeline do then.
    #[cfg(test)]
    pub(crate) async fn pragma(&self, sql: &str) -> Result<(), Error> {
        let sql = sql.to_string();
        self.call(|reply| Command::Pragma { sql, reply }).await
    }
}

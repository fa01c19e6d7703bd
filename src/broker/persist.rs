//! SQLite persistence of retained messages and persistent sessions.
//!
//! One writer thread owns the database connection. Callers never wait for it: they
//! record what changed in a map keyed by topic, client id or queue entry (so a sensor
//! republished a thousand times between two commits is written once, and a message
//! queued and acknowledged between two commits is never written), and the thread
//! commits everything that changed in one transaction, then looks again.
//!
//! What is written when:
//! - retained messages (except `$`-topics): on every change, batched as above;
//! - session records (protocol, expiry, subscriptions, inbound QoS 2 ids): when a
//!   persistent session subscribes, unsubscribes, disconnects or ends, and on shutdown;
//! - the queued and unacknowledged QoS 1/2 messages of persistent sessions, online or
//!   offline: as they change, through each mailbox's [`QueueLog`] (queued, sent with a
//!   packet id, released, done).
//!
//! Invariants:
//! - Group commit: at most one transaction per `commit_interval` (a flush for shutdown
//!   or a test goes at once), so a burst costs one commit and the flash is spared. A
//!   kill -9 loses at most the changes of the last interval.
//! - A row leaves the file only when its message is done with (acknowledged, expired,
//!   dropped by a limit and counted) or its session ends; reading the file at start-up
//!   deletes nothing, so a crash at any later time finds the same messages.
//! - A failed commit keeps its changes and is retried with backoff, merged with what
//!   changed since; one log line when writing fails and one when it works again.
//!
//! On-disk format (`PRAGMA user_version = 1`): messages are stored as MQTT 5.0 PUBLISH
//! packets encoded by [`crate::mqtt::encode`] (topic, QoS, retain, properties, payload)
//! with the expiry as wall-clock milliseconds beside them, since a monotonic instant
//! does not survive a restart. A queued message is keyed by its session's client id
//! and a `seq` unique in the file (increasing in queue order); `pkid` is set once it was
//! sent, `released` once its QoS 2 PUBREL was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use rusqlite::{params, Connection};
use tokio::time::Instant;

use super::session::{
    Budget, Change, Delivery, LogSink, Message, QueueLog, Session, Slot, SubRecord,
};
use crate::mqtt::{self, Packet, Protocol, Publish, QoS, RetainHandling, SubscriptionOptions};

/// The persistence file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("persistence file {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("persistence file {path}: cannot create: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("persistence file {path} has format version {found}, this build reads 1")]
    Version { path: PathBuf, found: i64 },
    /// The writer thread cannot be started.
    #[error("persistence file {path}: {source}")]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a persistent session needs to be resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRecord {
    pub protocol: Protocol,
    pub expiry: u32,
    pub subscriptions: Vec<(String, SubRecord)>,
    pub incoming: Vec<u16>,
}

impl SessionRecord {
    pub fn of(session: &Session) -> SessionRecord {
        let mut subscriptions: Vec<_> = session
            .subscriptions
            .iter()
            .map(|(f, s)| (f.to_string(), *s))
            .collect();
        subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
        SessionRecord {
            protocol: session.mailbox.protocol(),
            expiry: session.expiry,
            subscriptions,
            incoming: session.incoming.clone(),
        }
    }
}

/// A message queued for (or in flight to) a persistent session.
#[derive(Debug, Clone)]
pub(crate) struct QueuedRecord {
    /// The delivery; its `seq` is the row's key.
    pub delivery: Delivery,
    /// The packet id and flow state when the message was already sent.
    pub pkid: Option<(u16, Slot)>,
}

/// Everything read back at start-up.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub retained: Vec<Message>,
    pub sessions: Vec<(String, SessionRecord, Vec<QueuedRecord>)>,
}

/// One commit's worth of changes (or several, merged after a failed commit).
#[derive(Debug, Default)]
struct Batch {
    retained: HashMap<String, Option<Arc<Message>>>,
    sessions: HashMap<Arc<str>, Option<SessionRecord>>,
    /// Client ids whose rows up to this `seq` go (the session ended).
    forget: HashMap<Arc<str>, u64>,
    queued: HashMap<(Arc<str>, u64), Change>,
    /// What the queue changes hold in the broker-wide budget, released once written.
    held: usize,
    budget: Option<Arc<Budget>>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.retained.is_empty()
            && self.sessions.is_empty()
            && self.forget.is_empty()
            && self.queued.is_empty()
    }

    /// Adds the queue changes of `log`.
    fn take_log(&mut self, log: &QueueLog) {
        let (changes, held) = log.take();
        self.held += held;
        self.budget.get_or_insert_with(|| log.budget.clone());
        for (seq, change) in changes {
            self.put_change(log.client_id.clone(), seq, change);
        }
    }

    /// Written: what the changes held in the budget is free again.
    fn release(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(std::mem::take(&mut self.held));
        }
    }

    fn put_change(&mut self, client_id: Arc<str>, seq: u64, change: Change) {
        match self.queued.entry((client_id, seq)) {
            std::collections::hash_map::Entry::Occupied(mut older) => {
                // The row was on file if the older change said so.
                let on_file = older.get().on_file;
                *older.get_mut() = Change {
                    on_file: on_file || change.on_file,
                    row: change.row,
                };
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(change);
            }
        }
    }

    /// Lays `newer` over this (older) batch: the result writes what both would.
    fn merge(&mut self, newer: Batch) {
        for (client_id, upto) in newer.forget {
            self.queued
                .retain(|(c, seq), _| !(*c == client_id && *seq <= upto));
            let bound = self.forget.entry(client_id).or_insert(0);
            *bound = (*bound).max(upto);
        }
        self.retained.extend(newer.retained);
        self.sessions.extend(newer.sessions);
        self.held += newer.held;
        if self.budget.is_none() {
            self.budget = newer.budget;
        }
        for ((client_id, seq), change) in newer.queued {
            self.put_change(client_id, seq, change);
        }
    }
}

#[derive(Default)]
struct Pending {
    batch: Batch,
    /// Journals with changes not yet taken.
    logs: Vec<Arc<QueueLog>>,
    /// Waiting for everything recorded before they asked to be on disk.
    flushes: Vec<std::sync::mpsc::Sender<()>>,
    stop: bool,
}

impl Pending {
    fn has_work(&self) -> bool {
        !self.batch.is_empty() || !self.logs.is_empty() || !self.flushes.is_empty()
    }
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// The next queue `seq`.
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("persistence writer")
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records with `f` unless the writer stopped, and wakes it.
    fn record(&self, f: impl FnOnce(&mut Pending)) {
        let mut pending = self.lock();
        if pending.stop {
            return;
        }
        f(&mut pending);
        drop(pending);
        self.wake.notify_one();
    }
}

impl LogSink for Shared {
    fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    fn changed(&self, log: Arc<QueueLog>) {
        self.record(|p| p.logs.push(log));
    }
}

/// Handle to the writer thread.
pub(crate) struct Persister {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Persister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Persister")
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    message BLOB NOT NULL,
    expires_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY,
    protocol INTEGER NOT NULL,
    expiry INTEGER NOT NULL,
    subscriptions TEXT NOT NULL,
    incoming TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queued (
    client_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    sub_ids TEXT NOT NULL,
    pkid INTEGER,
    released INTEGER NOT NULL,
    expires_at_ms INTEGER,
    PRIMARY KEY (client_id, seq)
);
";

/// The longest wait between two attempts after a failed commit.
const MAX_RETRY: Duration = Duration::from_secs(30);

fn expiry_to_ms(at: Option<Instant>) -> Option<i64> {
    at.map(|at| {
        let left = at.saturating_duration_since(Instant::now());
        crate::clock::now_ms().saturating_add(i64::try_from(left.as_millis()).unwrap_or(i64::MAX))
    })
}

fn expiry_from_ms(ms: Option<i64>) -> Option<Instant> {
    ms.map(|ms| {
        let left = u64::try_from(ms.saturating_sub(crate::clock::now_ms())).unwrap_or(0);
        Instant::now() + Duration::from_millis(left)
    })
}

fn encode_message(msg: &Message) -> Vec<u8> {
    let mut properties = msg.properties.as_deref().cloned().unwrap_or_default();
    properties.message_expiry_interval = None;
    let publish = Publish {
        dup: false,
        qos: msg.qos,
        retain: msg.retain,
        topic: msg.topic.clone(),
        pkid: u16::from(msg.qos != QoS::AtMostOnce),
        payload: msg.payload.clone(),
        properties,
    };
    let mut out = BytesMut::new();
    match mqtt::encode(&Packet::Publish(publish), Protocol::V5, &mut out) {
        Ok(()) => out.to_vec(),
        Err(e) => {
            // Every message stored here was decoded or built by us and encodes; an
            // empty blob is skipped on load.
            tracing::warn!(topic = %msg.topic, error = %e, "cannot encode message for persistence");
            Vec::new()
        }
    }
}

fn decode_message(blob: &[u8], expires_at_ms: Option<i64>) -> Option<Message> {
    let mut buf = BytesMut::from(blob);
    match mqtt::decode(&mut buf, Protocol::V5, blob.len().max(16)) {
        Ok(Some(Packet::Publish(p))) => Some(Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: (!p.properties.is_empty()).then(|| Box::new(p.properties)),
            expires_at: expiry_from_ms(expires_at_ms),
            origin: 0,
        }),
        _ => None,
    }
}

fn options_byte(o: SubscriptionOptions) -> u8 {
    let rh = match o.retain_handling {
        RetainHandling::SendAtSubscribe => 0,
        RetainHandling::SendIfNew => 1,
        RetainHandling::DoNotSend => 2,
    };
    o.qos as u8 | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | rh << 4
}

fn options_from_byte(b: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::from_u8(b & 3).unwrap_or(QoS::AtMostOnce),
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: match (b >> 4) & 3 {
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => RetainHandling::SendAtSubscribe,
        },
    }
}

fn protocol_from(level: i64) -> Protocol {
    if level == 5 {
        Protocol::V5
    } else {
        Protocol::V311
    }
}

impl Persister {
    /// Opens (or creates) the file, reads what it holds and starts the writer thread,
    /// which commits at most once per `commit_interval`.
    ///
    /// # Errors
    /// When the file cannot be opened, is not a database, or is of another version.
    pub fn open(
        path: &Path,
        commit_interval: Duration,
    ) -> Result<(Persister, Loaded), PersistError> {
        let sqlite = |source| PersistError::Sqlite {
            path: path.to_owned(),
            source,
        };
        crate::files::create_private(path).map_err(|source| PersistError::Create {
            path: path.to_owned(),
            source,
        })?;
        let conn = Connection::open(path).map_err(sqlite)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sqlite)?;
        let empty: bool = conn
            .query_row("SELECT count(*) = 0 FROM sqlite_master", [], |r| r.get(0))
            .map_err(sqlite)?;
        if !empty && version != 1 {
            return Err(PersistError::Version {
                path: path.to_owned(),
                found: version,
            });
        }
        conn.execute_batch(SCHEMA).map_err(sqlite)?;
        conn.execute_batch("PRAGMA user_version = 1")
            .map_err(sqlite)?;
        // Shutdown snapshots of earlier builds numbered each session's rows from 0, and
        // 0 means "not on file" in memory: shift them to 1.. (through negative keys, so
        // no two rows ever share one).
        let min_seq: Option<i64> = conn
            .query_row("SELECT min(seq) FROM queued", [], |r| r.get(0))
            .map_err(sqlite)?;
        if min_seq == Some(0) {
            conn.execute_batch(
                "UPDATE queued SET seq = -seq - 1; UPDATE queued SET seq = -seq WHERE seq < 0;",
            )
            .map_err(sqlite)?;
        }
        let loaded = load(&conn).map_err(sqlite)?;
        let next_seq: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) + 1 FROM queued", [], |r| {
                r.get(0)
            })
            .map_err(sqlite)?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            next_seq: AtomicU64::new(u64::try_from(next_seq).unwrap_or(1).max(1)),
        });
        let thread_shared = shared.clone();
        let thread_path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("broker-persist".into())
            .spawn(move || writer(conn, &thread_shared, &thread_path, commit_interval))
            .map_err(|source| PersistError::Thread {
                path: path.to_owned(),
                source,
            })?;
        Ok((
            Persister {
                shared,
                thread: Mutex::new(Some(thread)),
            },
            loaded,
        ))
    }

    /// Where journaled mailboxes report their changes.
    pub fn sink(&self) -> Arc<dyn LogSink> {
        self.shared.clone()
    }

    /// Records the retained message of `topic` (`None`: cleared).
    pub fn retained(&self, topic: &str, msg: Option<Arc<Message>>) {
        self.shared.record(|p| {
            p.batch.retained.insert(topic.to_owned(), msg);
        });
    }

    /// Records a persistent session's state.
    pub fn session(&self, client_id: &Arc<str>, record: SessionRecord) {
        self.shared.record(|p| {
            p.batch.sessions.insert(client_id.clone(), Some(record));
        });
    }

    /// A session ended: its record goes, and its queued rows up to `last_seq` (those
    /// of a newer session under the same client id have higher keys).
    pub fn forget(&self, client_id: &Arc<str>, last_seq: u64) {
        self.shared.record(|p| {
            p.batch.sessions.insert(client_id.clone(), None);
            p.batch.merge(Batch {
                forget: HashMap::from([(client_id.clone(), last_seq)]),
                ..Batch::default()
            });
        });
    }

    /// Blocks until everything recorded so far is committed (or a commit failed).
    #[cfg(test)]
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared.record(|p| p.flushes.push(tx));
        let _ = rx.recv();
    }

    /// Writes the final session records with every queue change still pending and
    /// stops the thread. Blocks until it is on disk.
    pub fn close(&self, records: Vec<(Arc<str>, SessionRecord)>) {
        self.shared.record(|p| {
            for (client_id, record) in records {
                p.batch.sessions.insert(client_id, Some(record));
            }
            p.stop = true;
        });
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("persistence writer panicked");
            }
        }
    }
}

/// Waits for work, no sooner than `not_before` unless a flush or the stop asks.
fn next_batch(
    shared: &Shared,
    not_before: std::time::Instant,
) -> (Batch, Vec<std::sync::mpsc::Sender<()>>, bool) {
    let mut pending = shared.lock();
    loop {
        let urgent = pending.stop || !pending.flushes.is_empty();
        let now = std::time::Instant::now();
        if pending.has_work() || pending.stop {
            if urgent || now >= not_before {
                break;
            }
            pending = shared
                .wake
                .wait_timeout(pending, not_before - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        } else {
            pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
    }
    let mut batch = std::mem::take(&mut pending.batch);
    let logs = std::mem::take(&mut pending.logs);
    let flushes = std::mem::take(&mut pending.flushes);
    let stop = pending.stop;
    drop(pending);
    // Taken outside the pending lock: a journal takes its mailbox's lock.
    for log in logs {
        batch.take_log(&log);
    }
    (batch, flushes, stop)
}

fn writer(mut conn: Connection, shared: &Shared, path: &Path, interval: Duration) {
    let mut carried = Batch::default();
    let mut failing = false;
    let mut retry = interval;
    let mut not_before = std::time::Instant::now();
    loop {
        let (batch, flushes, stop) = next_batch(shared, not_before);
        carried.merge(batch);
        let started = std::time::Instant::now();
        match commit(&mut conn, &carried) {
            Ok(()) => {
                if failing {
                    tracing::info!(path = %path.display(), "persistence file writable again");
                    failing = false;
                }
                carried.release();
                carried = Batch::default();
                retry = interval;
                not_before = started + interval;
            }
            Err(e) => {
                if !failing {
                    tracing::error!(path = %path.display(), error = %e, "cannot write to the persistence file; changes kept in memory and retried");
                    failing = true;
                }
                retry = (retry * 2).clamp(Duration::from_millis(100), MAX_RETRY);
                not_before = started + retry;
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
        if stop {
            return;
        }
    }
}

fn commit(conn: &mut Connection, batch: &Batch) -> rusqlite::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for (client_id, upto) in &batch.forget {
        tx.prepare_cached("DELETE FROM queued WHERE client_id = ?1 AND seq <= ?2")?
            .execute(params![
                &**client_id,
                i64::try_from(*upto).unwrap_or(i64::MAX)
            ])?;
    }
    for (topic, msg) in &batch.retained {
        match msg {
            Some(msg) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO retained (topic, message, expires_at_ms) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![topic, encode_message(msg), expiry_to_ms(msg.expires_at)])?;
            }
            None => {
                tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                    .execute([topic])?;
            }
        }
    }
    for (client_id, record) in &batch.sessions {
        write_session(&tx, client_id, record.as_ref())?;
    }
    for ((client_id, seq), change) in &batch.queued {
        let seq = i64::try_from(*seq).unwrap_or(i64::MAX);
        match &change.row {
            Some((d, flow)) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO queued (client_id, seq, message, qos, retain, sub_ids, pkid, released, expires_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    &**client_id,
                    seq,
                    encode_message(&d.msg),
                    d.qos as u8,
                    d.retain,
                    serde_json::to_string(&d.sub_ids).unwrap_or_default(),
                    flow.map(|f| f.pkid),
                    flow.is_some_and(|f| f.released),
                    expiry_to_ms(d.msg.expires_at),
                ])?;
            }
            None if change.on_file => {
                tx.prepare_cached("DELETE FROM queued WHERE client_id = ?1 AND seq = ?2")?
                    .execute(params![&**client_id, seq])?;
            }
            None => {}
        }
    }
    tx.commit()
}

fn write_session(
    tx: &rusqlite::Transaction<'_>,
    client_id: &str,
    record: Option<&SessionRecord>,
) -> rusqlite::Result<()> {
    match record {
        Some(r) => {
            let subs: Vec<(&str, u8, u32)> = r
                .subscriptions
                .iter()
                .map(|(f, s)| (f.as_str(), options_byte(s.options), s.id))
                .collect();
            tx.prepare_cached(
                "INSERT OR REPLACE INTO sessions (client_id, protocol, expiry, subscriptions, incoming)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                client_id,
                r.protocol.level(),
                r.expiry,
                serde_json::to_string(&subs).unwrap_or_default(),
                serde_json::to_string(&r.incoming).unwrap_or_default(),
            ])?;
        }
        None => {
            tx.prepare_cached("DELETE FROM sessions WHERE client_id = ?1")?
                .execute([client_id])?;
        }
    }
    Ok(())
}

fn load(conn: &Connection) -> rusqlite::Result<Loaded> {
    let mut loaded = Loaded::default();
    let now = Instant::now();
    let mut stmt = conn.prepare("SELECT message, expires_at_ms FROM retained")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<i64>>(1)?))
    })?;
    for row in rows {
        let (blob, expires) = row?;
        match decode_message(&blob, expires) {
            Some(msg) if !msg.expired(now) => loaded.retained.push(msg),
            Some(_) => {}
            None => {
                tracing::warn!("skipping an unreadable retained message in the persistence file")
            }
        }
    }

    let mut stmt =
        conn.prepare("SELECT client_id, protocol, expiry, subscriptions, incoming FROM sessions")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, u32>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut messages: HashMap<(Vec<u8>, Option<i64>), Arc<Message>> = HashMap::new();
    let mut queued_stmt = conn.prepare(
        "SELECT message, qos, retain, sub_ids, pkid, released, expires_at_ms, seq FROM queued
         WHERE client_id = ?1 ORDER BY seq",
    )?;
    for row in rows {
        let (client_id, protocol, expiry, subs, incoming) = row?;
        let subs: Vec<(String, u8, u32)> = serde_json::from_str(&subs).unwrap_or_default();
        let record = SessionRecord {
            protocol: protocol_from(protocol),
            expiry,
            subscriptions: subs
                .into_iter()
                .map(|(f, o, id)| {
                    (
                        f,
                        SubRecord {
                            options: options_from_byte(o),
                            id,
                        },
                    )
                })
                .collect(),
            incoming: serde_json::from_str(&incoming).unwrap_or_default(),
        };
        let mut queued = Vec::new();
        let rows = queued_stmt.query_map([&client_id], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, u8>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<u16>>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        for row in rows {
            let (blob, qos, retain, sub_ids, pkid, released, expires, seq) = row?;
            // A message queued for many sessions is one row each; in memory it is one
            // message again, as it was before the restart.
            let msg = match messages.get(&(blob.clone(), expires)) {
                Some(msg) => Arc::clone(msg),
                None => {
                    let Some(msg) = decode_message(&blob, expires) else {
                        continue;
                    };
                    let msg = Arc::new(msg);
                    messages.insert((blob, expires), msg.clone());
                    msg
                }
            };
            let sub_ids: Vec<u32> = serde_json::from_str(&sub_ids).unwrap_or_default();
            let mut delivery = Delivery::new(
                msg,
                QoS::from_u8(qos).unwrap_or(QoS::AtLeastOnce),
                retain,
                sub_ids.into_boxed_slice(),
            );
            delivery.seq = u64::try_from(seq).unwrap_or(0);
            let pkid = pkid.filter(|p| *p != 0).map(|p| {
                let slot = if released {
                    Slot::Released
                } else {
                    Slot::Sent(delivery.clone())
                };
                (p, slot)
            });
            queued.push(QueuedRecord { delivery, pkid });
        }
        loaded.sessions.push((client_id, record, queued));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_through_their_byte() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for rh in [
                RetainHandling::SendAtSubscribe,
                RetainHandling::SendIfNew,
                RetainHandling::DoNotSend,
            ] {
                for (nl, rap) in [(false, true), (true, false)] {
                    let o = SubscriptionOptions {
                        qos,
                        no_local: nl,
                        retain_as_published: rap,
                        retain_handling: rh,
                    };
                    assert_eq!(options_from_byte(options_byte(o)), o);
                }
            }
        }
    }

    #[test]
    fn refuses_a_file_of_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE x (y); PRAGMA user_version = 7")
                .unwrap();
        }
        let err = Persister::open(&path, Duration::ZERO).unwrap_err();
        assert!(
            matches!(err, PersistError::Version { found: 7, .. }),
            "{err}"
        );
    }
}

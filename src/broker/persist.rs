//! SQLite persistence of retained messages and persistent sessions.
//!
//! One writer thread owns the database connection. Callers never wait for it: they
//! record what changed in a map keyed by topic or client id (so a sensor republished
//! a thousand times between two commits is written once), and the thread commits
//! everything that changed in one transaction, then looks again.
//!
//! What is written when:
//! - retained messages (except `$`-topics): on every change, batched as above;
//! - session records (protocol, expiry, subscriptions, inbound QoS 2 ids): when a
//!   persistent session subscribes, unsubscribes, disconnects or ends;
//! - queued and unacknowledged messages of persistent sessions: in the snapshot taken
//!   on shutdown. They are deleted from the file once loaded at start-up, since from
//!   then on they live in memory and a later snapshot rewrites them.
//!
//! On-disk format (`PRAGMA user_version = 1`): messages are stored as MQTT 5.0 PUBLISH
//! packets encoded by [`crate::mqtt::encode`] (topic, QoS, retain, properties, payload)
//! with the expiry as wall-clock milliseconds beside them, since a monotonic instant
//! does not survive a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use rusqlite::{params, Connection};
use tokio::time::Instant;

use super::session::{Delivery, Message, Session, Slot, SubRecord};
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

/// A persistent session's full state, for the shutdown snapshot.
pub(crate) type SessionSnapshot = (Arc<str>, SessionRecord, Vec<QueuedRecord>);

/// The snapshot of one parked session: unacknowledged messages first, then the queue.
pub(crate) fn snapshot(session: &Session) -> SessionSnapshot {
    let mut queued: Vec<QueuedRecord> = session
        .inflight
        .iter()
        .map(|(pkid, slot)| {
            let delivery = match slot {
                Slot::Sent(d) => d.clone(),
                // The message itself is delivered; only its id must be released. A
                // placeholder carries the id through the file.
                Slot::Released => Delivery::new(
                    Arc::new(Message {
                        topic: "$released".into(),
                        payload: bytes::Bytes::new(),
                        qos: QoS::ExactlyOnce,
                        retain: false,
                        properties: None,
                        expires_at: None,
                        origin: 0,
                    }),
                    QoS::ExactlyOnce,
                    false,
                    Box::new([]),
                ),
            };
            QueuedRecord {
                delivery,
                pkid: Some((*pkid, slot.clone())),
            }
        })
        .collect();
    queued.extend(session.mailbox.lock().items.iter().map(|d| QueuedRecord {
        delivery: d.clone(),
        pkid: None,
    }));
    (
        session.client_id().clone(),
        SessionRecord::of(session),
        queued,
    )
}

#[derive(Default)]
struct Pending {
    retained: HashMap<String, Option<Arc<Message>>>,
    sessions: HashMap<Arc<str>, Option<SessionRecord>>,
    snapshot: Option<Vec<SessionSnapshot>>,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
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
    /// Opens (or creates) the file, reads what it holds and starts the writer thread.
    ///
    /// # Errors
    /// When the file cannot be opened, is not a database, or is of another version.
    pub fn open(path: &Path) -> Result<(Persister, Loaded), PersistError> {
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
        let loaded = load(&conn).map_err(sqlite)?;
        conn.execute("DELETE FROM queued", []).map_err(sqlite)?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread_path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("broker-persist".into())
            .spawn(move || writer(conn, &thread_shared, &thread_path))
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

    /// Records the retained message of `topic` (`None`: cleared).
    pub fn retained(&self, topic: &str, msg: Option<Arc<Message>>) {
        let mut pending = self.shared.lock();
        if pending.stop {
            return;
        }
        pending.retained.insert(topic.to_owned(), msg);
        drop(pending);
        self.shared.wake.notify_one();
    }

    /// Records a persistent session's state (`None`: the session ended).
    pub fn session(&self, client_id: &Arc<str>, record: Option<SessionRecord>) {
        let mut pending = self.shared.lock();
        if pending.stop {
            return;
        }
        pending.sessions.insert(client_id.clone(), record);
        drop(pending);
        self.shared.wake.notify_one();
    }

    /// Writes the final snapshot of parked sessions and stops the thread. Blocks until
    /// it is on disk.
    pub fn close(&self, snapshot: Vec<SessionSnapshot>) {
        {
            let mut pending = self.shared.lock();
            pending.snapshot = Some(snapshot);
            pending.stop = true;
        }
        self.shared.wake.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("persistence writer panicked");
            }
        }
    }
}

fn writer(mut conn: Connection, shared: &Shared, path: &Path) {
    loop {
        let mut pending = shared.lock();
        while pending.retained.is_empty() && pending.sessions.is_empty() && !pending.stop {
            pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
        let batch = std::mem::take(&mut *pending);
        pending.stop = batch.stop;
        drop(pending);
        if let Err(e) = commit(&mut conn, &batch) {
            tracing::error!(path = %path.display(), error = %e, "cannot write to the persistence file");
        }
        if batch.stop {
            return;
        }
    }
}

fn commit(conn: &mut Connection, batch: &Pending) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
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
    if let Some(snapshot) = &batch.snapshot {
        for (client_id, record, queued) in snapshot {
            write_session(&tx, client_id, Some(record))?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO queued (client_id, seq, message, qos, retain, sub_ids, pkid, released, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for (seq, q) in queued.iter().enumerate() {
                let d = &q.delivery;
                let (pkid, released) = match &q.pkid {
                    Some((pkid, slot)) => (Some(*pkid), matches!(slot, Slot::Released)),
                    None => (None, false),
                };
                insert.execute(params![
                    &**client_id,
                    seq as i64,
                    encode_message(&d.msg),
                    d.qos as u8,
                    d.retain,
                    serde_json::to_string(&d.sub_ids).unwrap_or_default(),
                    pkid,
                    released,
                    expiry_to_ms(d.msg.expires_at),
                ])?;
            }
        }
    }
    tx.commit()
}

fn write_session(
    tx: &rusqlite::Transaction<'_>,
    client_id: &str,
    record: Option<&SessionRecord>,
) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM queued WHERE client_id = ?1")?
        .execute([client_id])?;
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
    let mut queued_stmt = conn.prepare(
        "SELECT message, qos, retain, sub_ids, pkid, released, expires_at_ms FROM queued
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
            ))
        })?;
        for row in rows {
            let (blob, qos, retain, sub_ids, pkid, released, expires) = row?;
            let Some(msg) = decode_message(&blob, expires) else {
                continue;
            };
            let sub_ids: Vec<u32> = serde_json::from_str(&sub_ids).unwrap_or_default();
            let delivery = Delivery::new(
                Arc::new(msg),
                QoS::from_u8(qos).unwrap_or(QoS::AtLeastOnce),
                retain,
                sub_ids.into_boxed_slice(),
            );
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
        let err = Persister::open(&path).unwrap_err();
        assert!(
            matches!(err, PersistError::Version { found: 7, .. }),
            "{err}"
        );
    }
}

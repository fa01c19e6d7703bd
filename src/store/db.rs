//! The SQLite file: opening (with the corrupt-file path), schema, row mapping, counters,
//! checkpoints and incremental vacuum. Synchronous; used only by the queue's thread and
//! by [`read_stats`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};

use super::config::Synchronous;
use super::error::Error;
use super::message::{pkid_for_row, Message, Priority, Stored};
use super::space::Space;
use super::stats::{DiskState, DropCounts, Stats};
use crate::clock::Stamp;
use crate::mqtt::QoS;

/// `PRAGMA user_version` of the format this build writes.
const FORMAT_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    size INTEGER NOT NULL,
    pkid INTEGER,
    pubrec INTEGER NOT NULL DEFAULT 0,
    boot INTEGER,
    mono_ms INTEGER
);
CREATE INDEX IF NOT EXISTS message_unsynced ON message (boot) WHERE mono_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS counter (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Columns of a file written before readings carried a boot-clock stamp, added at open:
/// older builds of the same format read such a file as before (they name their columns).
const STAMP_COLUMNS: &str = "
ALTER TABLE message ADD COLUMN boot INTEGER;
ALTER TABLE message ADD COLUMN mono_ms INTEGER;
CREATE INDEX IF NOT EXISTS message_unsynced ON message (boot) WHERE mono_ms IS NOT NULL;
";

/// Columns read by [`stored_from_row`], in order.
pub(super) const STORED_COLUMNS: &str =
    "id, topic, payload, qos, retain, created_ms, priority, pkid, pubrec, boot, mono_ms";

/// How long a statement waits for a lock held by another connection (a `read_stats`
/// reader, or a second agent started by mistake).
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Persistent counters, as stored in the `counter` table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counters {
    pub appended: u64,
    pub delivered: u64,
    pub dropped: DropCounts,
    pub commits: u64,
    pub commit_failures: u64,
    pub bytes_written: u64,
    /// Every id below this may have been given out (stored, or handed out from memory
    /// by the fast path): ids keep growing across restarts and crashes.
    pub next_id: i64,
    /// Ids from here up to `next_id` that are not stored may be QoS 2 flows of rows
    /// that lived in memory only, open at the upstream broker when the process
    /// stopped: the uplink releases their packet ids after a crash (see `store/mod.rs`).
    pub unswept_from: i64,
}

impl Counters {
    fn pairs(&self) -> [(&'static str, i64); 13] {
        let c = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        [
            ("appended", c(self.appended)),
            ("delivered", c(self.delivered)),
            ("dropped_max_rows", c(self.dropped.max_rows)),
            ("dropped_max_bytes", c(self.dropped.max_bytes)),
            ("dropped_max_age", c(self.dropped.max_age)),
            ("dropped_disk_full", c(self.dropped.disk_full)),
            ("dropped_shutdown", c(self.dropped.shutdown)),
            ("commits", c(self.commits)),
            ("commit_failures", c(self.commit_failures)),
            ("bytes_written", c(self.bytes_written)),
            ("next_id", self.next_id),
            ("unswept_from", self.unswept_from),
            ("format", FORMAT_VERSION),
        ]
    }

    fn set(&mut self, name: &str, value: i64) {
        let v = u64::try_from(value).unwrap_or(0);
        match name {
            "appended" => self.appended = v,
            "delivered" => self.delivered = v,
            "dropped_max_rows" => self.dropped.max_rows = v,
            "dropped_max_bytes" => self.dropped.max_bytes = v,
            "dropped_max_age" => self.dropped.max_age = v,
            "dropped_disk_full" => self.dropped.disk_full = v,
            "dropped_shutdown" => self.dropped.shutdown = v,
            "commits" => self.commits = v,
            "commit_failures" => self.commit_failures = v,
            "bytes_written" => self.bytes_written = v,
            "next_id" => self.next_id = value,
            "unswept_from" => self.unswept_from = value,
            _ => {}
        }
    }

    pub fn load(conn: &Connection) -> Result<Counters, rusqlite::Error> {
        let mut counters = Counters::default();
        let mut stmt = conn.prepare("SELECT name, value FROM counter")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            counters.set(&name, row.get(1)?);
        }
        Ok(counters)
    }

    pub fn store(&self, conn: &Connection) -> Result<(), rusqlite::Error> {
        let mut stmt =
            conn.prepare_cached("INSERT OR REPLACE INTO counter (name, value) VALUES (?1, ?2)")?;
        for (name, value) in self.pairs() {
            stmt.execute(params![name, value])?;
        }
        Ok(())
    }
}

/// An open queue database.
pub(super) struct Db {
    pub conn: Connection,
    pub path: PathBuf,
    pub page_size: u64,
    /// Whether the file was created with `auto_vacuum = INCREMENTAL`.
    pub incremental_vacuum: bool,
    /// The page limit the connection opened with, restored by [`Db::unpin_size`].
    max_page_count: i64,
    /// WAL frames already counted in `bytes_written` since the WAL last restarted.
    wal_frames_seen: u64,
    /// Frames already counted as copied by checkpoints since the WAL last restarted.
    ckpt_frames_seen: u64,
}

/// Whether an error means the file is not a usable SQLite database.
fn is_corruption(error: &Error) -> bool {
    match error {
        Error::Sqlite(e) => matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        ),
        Error::Corrupt(_) => true,
        _ => false,
    }
}

/// Whether an open failed for want of space or write access (a full or read-only
/// filesystem: the `-shm` file cannot be made), rather than a bad file.
fn is_unwritable(error: &Error) -> bool {
    match error {
        Error::Sqlite(e) => matches!(
            e.sqlite_error_code(),
            Some(
                ErrorCode::DiskFull
                    | ErrorCode::ReadOnly
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::CannotOpen
            )
        ),
        _ => false,
    }
}

/// How the connection locks the file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Locking {
    /// Shared memory beside the file (`-shm`): readers such as `queue stats` may look.
    Shared,
    /// No `-shm` (the WAL index lives in the process's memory): what is left when the
    /// filesystem has no room for one, or cannot be written. Other processes cannot
    /// read the file while the store has it open.
    Exclusive,
}

impl Db {
    /// Opens (or creates) the queue file; a corrupt file is moved aside and replaced by a
    /// fresh one. Opening an existing file of the current format writes nothing, so it
    /// succeeds on a full filesystem: there the reserve is released for the `-shm`
    /// file, and without room even for that, the file is opened with exclusive locking.
    pub fn open(path: &Path, synchronous: Synchronous, space: &mut Space) -> Result<Db, Error> {
        let wal_limit = space.checkpoint_bytes();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        match Db::try_open(path, synchronous, Locking::Shared, wal_limit) {
            Err(error) if is_corruption(&error) => {
                let aside = move_aside(path)?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %aside.display(),
                    %error,
                    "queue database is corrupt: moved aside for forensics, starting a fresh one; \
                     its undelivered readings are not forwarded"
                );
                Db::try_open(path, synchronous, Locking::Shared, wal_limit)
            }
            Err(error) if is_unwritable(&error) && path.exists() => {
                if space.release() {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "disk full at start: released the store's reserve to open the queue"
                    );
                    if let Ok(db) = Db::try_open(path, synchronous, Locking::Shared, wal_limit) {
                        return Ok(db);
                    }
                }
                let db = Db::try_open(path, synchronous, Locking::Exclusive, wal_limit)?;
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    "queue opened with exclusive locking: its filesystem is full or read-only; \
                     `fieldbridge queue stats` cannot read it until the agent restarts"
                );
                Ok(db)
            }
            other => other,
        }
    }

    fn try_open(
        path: &Path,
        synchronous: Synchronous,
        locking: Locking,
        wal_limit: u64,
    ) -> Result<Db, Error> {
        crate::files::create_private(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let conn = Connection::open(path)?;
        if locking == Locking::Exclusive {
            // Before the first access, so SQLite never makes a -shm file.
            let _: String = conn.query_row("PRAGMA locking_mode = EXCLUSIVE", [], |r| r.get(0))?;
        }
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(Error::Corrupt(check));
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > FORMAT_VERSION {
            return Err(Error::NewerFormat {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        // Below, each write is made only when the file needs it: an existing file of
        // the current format is opened without writing (a full or read-only disk).
        let page_count: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        if page_count == 0 {
            // Only takes effect before the first table exists.
            conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
        }
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %path.display(), %mode, "queue database could not switch to WAL");
            }
        }
        conn.execute_batch(match synchronous {
            Synchronous::Normal => "PRAGMA synchronous = NORMAL",
            Synchronous::Full => "PRAGMA synchronous = FULL",
        })?;
        // The queue checkpoints itself, so it can count the bytes written; the WAL is
        // truncated back to what the store lets it grow between two checkpoints.
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {wal_limit};"
        ))?;
        let tables: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('message', 'counter')",
            [],
            |r| r.get(0),
        )?;
        if tables < 2 {
            conn.execute_batch(SCHEMA)?;
        }
        let stamped: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('message') WHERE name = 'mono_ms'",
            [],
            |r| r.get(0),
        )?;
        if stamped == 0 {
            conn.execute_batch(STAMP_COLUMNS)?;
        }
        if version != FORMAT_VERSION {
            conn.execute_batch(&format!("PRAGMA user_version = {FORMAT_VERSION}"))?;
        }
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        let max_page_count: i64 = conn.query_row("PRAGMA max_page_count", [], |r| r.get(0))?;
        Ok(Db {
            conn,
            path: path.to_path_buf(),
            page_size: u64::try_from(page_size).unwrap_or(4096),
            incremental_vacuum: auto_vacuum == 2,
            max_page_count,
            wal_frames_seen: 0,
            ckpt_frames_seen: 0,
        })
    }

    /// Keeps the file at its current size (`max_page_count`): while the filesystem is
    /// full, a transaction that would need a new page fails at once, instead of
    /// committing into the WAL pages that no checkpoint could then write.
    pub fn pin_size(&self) -> Result<(), rusqlite::Error> {
        let pages: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let _: i64 = self.conn.query_row(
            &format!("PRAGMA max_page_count = {}", pages.max(1)),
            [],
            |r| r.get(0),
        )?;
        Ok(())
    }

    /// Lets the file grow again (the limit it was opened with).
    pub fn unpin_size(&self) -> Result<(), rusqlite::Error> {
        let _: i64 = self.conn.query_row(
            &format!("PRAGMA max_page_count = {}", self.max_page_count),
            [],
            |r| r.get(0),
        )?;
        Ok(())
    }

    /// Rows and bytes stored, and the largest id.
    pub fn totals(&self) -> Result<(u64, u64, i64), rusqlite::Error> {
        self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM message",
            [],
            |r| {
                Ok((
                    u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    r.get(2)?,
                ))
            },
        )
    }

    /// Creation time of the first row in queue order.
    pub fn first_created_ms(&self) -> Result<Option<i64>, rusqlite::Error> {
        first_created_ms(&self.conn)
    }

    /// Runs a passive checkpoint and returns the bytes written since the last one (new
    /// WAL frames plus the frames copied into the database file), and whether every
    /// frame is in the file now, so the next transaction starts the WAL over.
    pub fn checkpoint(&mut self) -> Result<(u64, bool), rusqlite::Error> {
        let (busy, log, done): (i64, i64, i64) =
            self.conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
        let log = u64::try_from(log).unwrap_or(0);
        let done = u64::try_from(done).unwrap_or(0);
        // A WAL that restarted since the last look has fewer frames than counted then.
        let new_frames = if log >= self.wal_frames_seen {
            log - self.wal_frames_seen
        } else {
            log
        };
        let copied = if done >= self.ckpt_frames_seen {
            done - self.ckpt_frames_seen
        } else {
            done
        };
        let complete = busy == 0 && done == log;
        if complete && log > 0 {
            // Fully checkpointed: the next write starts the WAL over.
            self.wal_frames_seen = 0;
            self.ckpt_frames_seen = 0;
        } else {
            self.wal_frames_seen = log;
            self.ckpt_frames_seen = done;
        }
        Ok((
            new_frames * (self.page_size + 24) + copied * self.page_size,
            complete,
        ))
    }

    /// Gives up to `max_pages` free pages back to the filesystem when they are many:
    /// after a long outage drained, the file shrinks again. Keeps 1 MiB of free pages
    /// to reuse. Returns whether it gave pages back; the caller checkpoints between
    /// steps, so each step fits into the WAL space a full disk leaves.
    pub fn vacuum_step(&mut self, max_pages: u64) -> Result<bool, rusqlite::Error> {
        if !self.incremental_vacuum {
            return Ok(false);
        }
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let total: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let keep = i64::try_from((1 << 20) / self.page_size.max(512)).unwrap_or(256);
        if free <= keep || free * 4 < total {
            return Ok(false);
        }
        let pages = (free - keep).min(i64::try_from(max_pages).unwrap_or(i64::MAX));
        // Each step frees one page: step it to the end.
        let mut vacuum = self
            .conn
            .prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
        let mut steps = vacuum.query([])?;
        while steps.next()?.is_some() {}
        Ok(true)
    }

    pub fn file_bytes(&self) -> u64 {
        file_bytes(&self.path)
    }
}

pub(super) fn first_created_ms(conn: &Connection) -> Result<Option<i64>, rusqlite::Error> {
    conn.query_row(
        "SELECT created_ms FROM message ORDER BY id LIMIT 1",
        [],
        |r| r.get(0),
    )
    .optional()
}

fn file_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    size(path) + size(&sidecar(path, "-wal"))
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Moves a corrupt database (and its WAL) aside under a timestamped name.
fn move_aside(path: &Path) -> Result<PathBuf, Error> {
    let stamp = utc_stamp(SystemTime::now());
    let mut aside = sidecar(path, &format!(".corrupt-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        aside = sidecar(path, &format!(".corrupt-{stamp}-{n}"));
        n += 1;
    }
    let io = |p: &Path| {
        let path = p.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::rename(path, &aside).map_err(io(path))?;
    let wal = sidecar(path, "-wal");
    if wal.exists() {
        std::fs::rename(&wal, sidecar(&aside, "-wal")).map_err(io(&wal))?;
    }
    let shm = sidecar(path, "-shm");
    if shm.exists() {
        std::fs::remove_file(&shm).map_err(io(&shm))?;
    }
    Ok(aside)
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
fn utc_stamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub(super) fn priority_from_db(value: i64) -> Priority {
    match value {
        1 => Priority::Event,
        2 => Priority::Alarm,
        _ => Priority::Periodic,
    }
}

/// Most ids a sweep covers (the newest): a few thousand packet ids always stay free for
/// the uplink's own use.
const SWEEP_MAX: i64 = 65_535 - 4_096;

/// The packet ids of QoS 2 flows that rows held only in memory may have left open at
/// the upstream broker: those of the ids in `from..to` that are not stored, less every
/// packet id a stored QoS 2 row may be open under (its own flow resumes it, and a
/// PUBREL sent for it would release the message before its resumed PUBLISH).
pub(super) fn unswept_flows(
    conn: &Connection,
    from: i64,
    to: i64,
) -> Result<Vec<u16>, rusqlite::Error> {
    let from = from.max(1).max(to.saturating_sub(SWEEP_MAX));
    if from >= to {
        return Ok(Vec::new());
    }
    let mut candidates = vec![false; 65_536];
    {
        let mut stored = conn.prepare("SELECT id FROM message WHERE id >= ?1 AND id < ?2")?;
        let stored: std::collections::HashSet<i64> = stored
            .query_map(params![from, to], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in from..to {
            if !stored.contains(&id) {
                candidates[usize::from(pkid_for_row(id))] = true;
            }
        }
    }
    let mut open = conn.prepare("SELECT id, pkid FROM message WHERE qos = 2")?;
    let mut rows = open.query([])?;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let pkid: Option<i64> = row.get(1)?;
        let pkid = pkid
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .unwrap_or_else(|| pkid_for_row(id));
        candidates[usize::from(pkid)] = false;
    }
    Ok((1..=u16::MAX)
        .filter(|&p| candidates[usize::from(p)])
        .collect())
}

/// Maps a row selected with [`STORED_COLUMNS`]. Out-of-range values (a file written by
/// something else) are clamped rather than blocking the queue.
pub(super) fn stored_from_row(row: &Row<'_>) -> Result<Stored, rusqlite::Error> {
    let qos: i64 = row.get(3)?;
    let pkid: Option<i64> = row.get(7)?;
    let boot: Option<i64> = row.get(9)?;
    let mono_ms: Option<i64> = row.get(10)?;
    Ok(Stored {
        id: row.get(0)?,
        message: Message {
            topic: row.get(1)?,
            payload: Bytes::from(row.get::<_, Vec<u8>>(2)?),
            qos: u8::try_from(qos)
                .ok()
                .and_then(QoS::from_u8)
                .unwrap_or(QoS::AtLeastOnce),
            retain: row.get(4)?,
            created_ms: row.get(5)?,
            priority: priority_from_db(row.get(6)?),
            unsynced: boot.zip(mono_ms).map(|(boot, mono)| Stamp {
                boot,
                mono_ms: u64::try_from(mono).unwrap_or(0),
            }),
        },
        pkid: pkid.and_then(|p| u16::try_from(p).ok()),
        pubrec: row.get(8)?,
    })
}

pub(super) fn age_ms(now_ms: i64, created_ms: i64) -> u64 {
    u64::try_from(now_ms.saturating_sub(created_ms)).unwrap_or(0)
}

pub(super) fn read_stats(path: &Path) -> Result<Stats, Error> {
    if !path.exists() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let (depth, bytes): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM message",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let counters = Counters::load(&conn)?;
    let depth = u64::try_from(depth).unwrap_or(0);
    Ok(Stats {
        depth,
        pending: depth,
        in_flight: 0,
        bytes: u64::try_from(bytes).unwrap_or(0),
        oldest_age_ms: first_created_ms(&conn)?.map(|c| age_ms(crate::clock::now_ms(), c)),
        buffered: 0,
        appended: counters.appended,
        delivered: counters.delivered,
        dropped: counters.dropped,
        commits: counters.commits,
        commit_failures: counters.commit_failures,
        bytes_written: counters.bytes_written,
        file_bytes: file_bytes(path),
        disk: DiskState::Writable,
        fs_free_bytes: super::space::usage(path).map_or(0, |u| u.free),
        reserve_bytes: std::fs::metadata(sidecar(path, ".reserve")).map_or(0, |m| m.len()),
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn utc_stamp_formats_known_instants() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(utc_stamp(t), "20240229T123456Z");
    }
}

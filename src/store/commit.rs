//! One transaction of the store thread: the group commit (inserts of the buffered
//! batches, deletes of acknowledged rows, flow-state updates, retention drops, counters)
//! and the disk-full eviction.
//!
//! Invariants:
//! - Nothing in memory changes here: [`write`] reads the worker's state and returns
//!   what the transaction did ([`Written`]); the worker applies it only after the
//!   commit (`Worker::applied`). A failed transaction thus leaves every buffer as it
//!   was, for the retry.
//! - Rows are inserted under the ids the buffer gave them at append (saturating at
//!   `i64::MAX`; an insert with a taken id fails and is retried like a full disk), with
//!   the flow state recorded for them in memory; acknowledged buffered rows are not
//!   written at all.
//! - The persisted `next_id` is the worker's reservation (`Counters::next_id`), never
//!   lowered here.
//! - Sizes read back from the file may have been written by something else: a negative
//!   one counts as 0, and totals saturate.

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::buffer::Buffer;
use super::config::StoreConfig;
use super::cursor::Cursor;
use super::db::Counters;
use super::message::Priority;
use super::request::Flow;
use super::retention;
use super::stats::DropReason;

/// Most deletes of acknowledged rows in one transaction while the disk is full: a
/// step must fit into the WAL space the file already has.
pub(super) const SMALL_DELETES: usize = 256;

/// What one transaction should do.
#[derive(Clone, Copy)]
pub(super) struct Work {
    /// Inserts the buffered batches that fit in `commit_max_rows` (at least one).
    pub inserts: bool,
    pub retention: bool,
    pub counters: bool,
    /// Most acknowledged rows deleted.
    pub deletes: usize,
}

impl Work {
    /// Everything that waits: the group commit.
    pub fn all(counters: bool) -> Work {
        Work {
            inserts: true,
            retention: true,
            counters,
            deletes: usize::MAX,
        }
    }

    /// A few acks and the flow updates alone, so delivery goes on (and frees pages)
    /// while appends cannot be written.
    pub fn small_deletes(counters: bool) -> Work {
        Work {
            inserts: false,
            retention: false,
            counters,
            deletes: SMALL_DELETES,
        }
    }

    /// Counters alone (with the acks and flow updates that wait): a new reservation of
    /// ids for rows handed out from memory.
    pub fn reserve() -> Work {
        Work {
            inserts: false,
            retention: false,
            counters: true,
            deletes: usize::MAX,
        }
    }

    /// The periodic sweep: retention (age) and counters, no inserts.
    pub fn sweep() -> Work {
        Work {
            inserts: false,
            retention: true,
            counters: true,
            deletes: usize::MAX,
        }
    }
}

/// What a committed transaction did, applied to the in-memory state after the commit.
#[derive(Default)]
pub(super) struct Written {
    /// How many batches from the front of the buffer this transaction inserted.
    pub batches: usize,
    /// Acknowledged ids whose delete this transaction holds.
    pub acked: Vec<i64>,
    pub added_rows: u64,
    pub added_bytes: u64,
    pub removed_rows: u64,
    pub removed_bytes: u64,
    pub dropped: Vec<(DropReason, u64)>,
    pub counters: Counters,
    pub scan_from: Option<[i64; 3]>,
}

/// The worker's state a transaction reads.
pub(super) struct State<'a> {
    pub config: &'a StoreConfig,
    pub buffer: &'a Buffer,
    pub cursor: &'a Cursor,
    pub flows: &'a [Flow],
    pub rows: u64,
    pub bytes: u64,
    pub counters: Counters,
    pub scan_from: [i64; 3],
}

/// Runs one transaction; nothing in memory changes until the worker applies the result.
pub(super) fn write(
    conn: &mut Connection,
    work: Work,
    state: &State<'_>,
) -> Result<Written, rusqlite::Error> {
    let mut written = Written {
        counters: state.counters,
        ..Written::default()
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if work.inserts {
        let batches = state.buffer.prefix(state.config.commit_max_rows);
        insert_batches(&tx, state.buffer, batches, &mut written)?;
    }
    if !state.cursor.acking().is_empty() {
        delete_acked(&tx, state.cursor, work.deletes, &mut written)?;
    }
    if !state.flows.is_empty() {
        update_flows(&tx, state.flows)?;
    }
    if work.retention {
        drop_by_retention(&tx, state, &mut written)?;
    }
    written.counters.appended += written.added_rows;
    written.counters.commits += 1;
    if work.counters {
        written.counters.store(&tx)?;
    }
    tx.commit()?;
    Ok(written)
}

fn insert_batches(
    tx: &Transaction<'_>,
    buffer: &Buffer,
    batches: usize,
    written: &mut Written,
) -> Result<(), rusqlite::Error> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO message \
         (id, topic, payload, qos, retain, created_ms, priority, size, pkid, pubrec, boot, \
         mono_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    for batch in buffer.batches().take(batches) {
        for (id, row) in batch.live() {
            let m = &row.message;
            let size = m.stored_size();
            insert.execute(params![
                id,
                m.topic,
                m.payload.as_ref(),
                m.qos as u8,
                m.retain,
                m.created_ms,
                m.priority as u8,
                i64::try_from(size).unwrap_or(i64::MAX),
                row.flow.map(|(pkid, _)| pkid),
                row.flow.is_some_and(|(_, pubrec)| pubrec),
                m.unsynced.map(|s| s.boot),
                m.unsynced
                    .map(|s| i64::try_from(s.mono_ms).unwrap_or(i64::MAX)),
            ])?;
            written.added_rows += 1;
            written.added_bytes += size;
        }
    }
    written.batches = batches;
    Ok(())
}

/// Deletes up to `limit` acknowledged rows, lowest ids first (neighbours share pages).
fn delete_acked(
    tx: &Transaction<'_>,
    cursor: &Cursor,
    limit: usize,
    written: &mut Written,
) -> Result<(), rusqlite::Error> {
    let mut ids: Vec<i64> = cursor.acking().iter().copied().collect();
    if ids.len() > limit {
        ids.select_nth_unstable(limit);
        ids.truncate(limit);
    }
    ids.sort_unstable();
    let mut delete = tx.prepare_cached("DELETE FROM message WHERE id = ?1 RETURNING size")?;
    for &id in &ids {
        if let Some(size) = delete.query_row([id], |r| r.get::<_, i64>(0)).optional()? {
            written.removed_rows += 1;
            written.removed_bytes += u64::try_from(size).unwrap_or(0);
            written.counters.delivered += 1;
        }
    }
    written.acked = ids;
    Ok(())
}

fn update_flows(tx: &Transaction<'_>, flows: &[Flow]) -> Result<(), rusqlite::Error> {
    let mut update =
        tx.prepare_cached("UPDATE message SET pkid = ?2, pubrec = ?3 WHERE id = ?1")?;
    for flow in flows {
        update.execute(params![flow.id, flow.pkid, flow.pubrec])?;
    }
    Ok(())
}

/// Deletes what retention chooses, on the totals this transaction leaves.
fn drop_by_retention(
    tx: &Transaction<'_>,
    state: &State<'_>,
    written: &mut Written,
) -> Result<(), rusqlite::Error> {
    let rows = state.rows + written.added_rows - written.removed_rows.min(state.rows);
    let bytes = (state.bytes + written.added_bytes).saturating_sub(written.removed_bytes);
    let skip = |id: &i64| state.cursor.is_taken(id);
    let (victims, scan_from) =
        retention::victims(tx, state.config, skip, state.scan_from, rows, bytes)?;
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
    Ok(())
}

/// Deletes up to `wanted` of the oldest stored rows of priorities up to `ceiling` in a
/// transaction of its own (`drop_oldest` under a full disk, so the buffer fits into the
/// freed pages). Returns the rows and bytes deleted.
pub(super) fn evict(
    conn: &mut Connection,
    ceiling: Priority,
    wanted: usize,
    cursor: &Cursor,
) -> Result<(u64, u64), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let victims = retention::disk_full_victims(&tx, ceiling, wanted, |id| cursor.is_taken(id))?;
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
}

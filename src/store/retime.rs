//! A clock correction: once the wall clock is synchronized, the rows and buffered
//! messages stamped with this boot's boot clock get their true time.
//!
//! Invariants:
//! - Only messages with a stamp of the given boot are touched: `created_ms` becomes
//!   `offset_ms + mono_ms`, the payload is rewritten by the caller's function (which
//!   knows the payload format; the store does not), and the stamp is cleared, so a
//!   message is corrected at most once per sync.
//! - Rows in flight or acknowledged ([`Cursor::is_taken`]) are left as they are: a
//!   resent PUBLISH must carry the same message. A payload the function refuses is
//!   left as it is, stamp and all (a time is never guessed).
//! - Stored rows are rewritten in transactions of [`ROWS_PER_TRANSACTION`]; a failed
//!   one changes nothing in memory (the caller retries the whole correction, which
//!   finds only the rows still stamped).

use rusqlite::{params, Connection, TransactionBehavior};

use super::buffer::Buffer;
use super::cursor::Cursor;
use super::message::ROW_OVERHEAD_BYTES;
use super::request::{Retime, Retimed};

/// Rows rewritten per transaction, so a large backlog does not hold one long write.
const ROWS_PER_TRANSACTION: usize = 1024;

/// Corrects the stored rows, then the buffered messages. Returns what was done
/// even when a transaction failed (what committed before it stays corrected), and
/// the error.
pub(super) fn apply(
    retime: &Retime,
    conn: &mut Connection,
    buffer: &mut Buffer,
    cursor: &Cursor,
) -> (Retimed, Option<rusqlite::Error>) {
    let mut done = Retimed::default();
    if let Err(error) = stored(retime, conn, cursor, &mut done) {
        return (done, Some(error));
    }
    for message in buffer.messages_mut() {
        let Some(stamp) = message.unsynced.filter(|s| s.boot == retime.boot) else {
            continue;
        };
        let ts = true_time(retime, stamp.mono_ms);
        if let Some(payload) =
            (retime.rewrite)(&message.payload, ts.saturating_sub(message.created_ms))
        {
            message.payload = payload.into();
            message.created_ms = ts;
            message.unsynced = None;
            done.rows += 1;
        }
    }
    (done, None)
}

fn true_time(retime: &Retime, mono_ms: u64) -> i64 {
    retime
        .offset_ms
        .saturating_add(i64::try_from(mono_ms).unwrap_or(i64::MAX))
}

/// The stored rows, adding to `done` per committed transaction.
fn stored(
    retime: &Retime,
    conn: &mut Connection,
    cursor: &Cursor,
    done: &mut Retimed,
) -> Result<(), rusqlite::Error> {
    let mut after = i64::MIN;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut rows = Vec::new();
        {
            let mut select = tx.prepare_cached(
                "SELECT id, topic, payload, created_ms, mono_ms FROM message \
                     WHERE boot = ?1 AND mono_ms IS NOT NULL AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let mut found = select.query(params![
                retime.boot,
                after,
                i64::try_from(ROWS_PER_TRANSACTION).unwrap_or(i64::MAX)
            ])?;
            while let Some(row) = found.next()? {
                let id: i64 = row.get(0)?;
                let topic: String = row.get(1)?;
                let payload: Vec<u8> = row.get(2)?;
                let created: i64 = row.get(3)?;
                let mono: i64 = row.get(4)?;
                rows.push((id, topic.len(), payload, created, mono));
            }
        }
        let Some(last) = rows.last().map(|r| r.0) else {
            return Ok(());
        };
        let mut batch = Retimed::default();
        {
            let mut update = tx.prepare_cached(
                "UPDATE message SET payload = ?2, created_ms = ?3, size = ?4, boot = NULL, \
                     mono_ms = NULL WHERE id = ?1",
            )?;
            for (id, topic_len, payload, created, mono) in rows {
                if cursor.is_taken(&id) {
                    batch.in_flight += 1;
                    continue;
                }
                let ts = true_time(retime, u64::try_from(mono).unwrap_or(0));
                let Some(new) = (retime.rewrite)(&payload, ts.saturating_sub(created)) else {
                    continue;
                };
                let size = topic_len as u64 + new.len() as u64 + ROW_OVERHEAD_BYTES;
                update.execute(params![
                    id,
                    new,
                    ts,
                    i64::try_from(size).unwrap_or(i64::MAX)
                ])?;
                batch.rows += 1;
                batch.bytes_delta += i64::try_from(new.len()).unwrap_or(0)
                    - i64::try_from(payload.len()).unwrap_or(0);
            }
        }
        tx.commit()?;
        done.rows += batch.rows;
        done.in_flight += batch.in_flight;
        done.bytes_delta += batch.bytes_delta;
        after = last;
    }
}

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
//! - Stored rows are rewritten in transactions of [`ROWS_PER_TRANSACTION`] ([`step`]),
//!   checkpointed between by the store thread; a failed one changes nothing (the caller
//!   retries the whole correction, which finds only the rows still stamped). Buffered
//!   messages ([`buffered`]) are corrected after the stored rows, except those the fast
//!   path has handed out from memory (in flight too).

use rusqlite::{params, Connection, TransactionBehavior};

use super::buffer::Buffer;
use super::cursor::Cursor;
use super::message::ROW_OVERHEAD_BYTES;
use super::request::{Retime, Retimed};

/// Rows rewritten per transaction, so a large backlog does not hold one long write.
const ROWS_PER_TRANSACTION: usize = 1024;

/// Corrects the buffered messages; returns how many.
pub(super) fn buffered(retime: &Retime, buffer: &mut Buffer) -> u64 {
    let mut corrected = 0;
    for message in buffer.unhanded_messages_mut() {
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
            corrected += 1;
        }
    }
    corrected
}

fn true_time(retime: &Retime, mono_ms: u64) -> i64 {
    retime
        .offset_ms
        .saturating_add(i64::try_from(mono_ms).unwrap_or(i64::MAX))
}

/// One transaction of the stored rows: up to [`ROWS_PER_TRANSACTION`] stamped rows of
/// the boot with ids above `after`, which moves past them. `None` when there are none
/// left; the caller checkpoints between steps, so a large backlog does not grow the WAL
/// beyond what the store lets it.
pub(super) fn step(
    retime: &Retime,
    conn: &mut Connection,
    cursor: &Cursor,
    after: &mut i64,
) -> Result<Option<Step>, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut rows = Vec::new();
    {
        let mut select = tx.prepare_cached(
            "SELECT id, topic, payload, created_ms, mono_ms FROM message \
             WHERE boot = ?1 AND mono_ms IS NOT NULL AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let mut found = select.query(params![
            retime.boot,
            *after,
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
        return Ok(None);
    };
    let mut done = Step::default();
    {
        let mut update = tx.prepare_cached(
            "UPDATE message SET payload = ?2, created_ms = ?3, size = ?4, boot = NULL, \
             mono_ms = NULL WHERE id = ?1",
        )?;
        for (id, topic_len, payload, created, mono) in rows {
            if cursor.is_taken(&id) {
                done.retimed.in_flight += 1;
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
            done.retimed.rows += 1;
            done.retimed.bytes_delta +=
                i64::try_from(new.len()).unwrap_or(0) - i64::try_from(payload.len()).unwrap_or(0);
            done.written_bytes += size;
        }
    }
    tx.commit()?;
    *after = last;
    Ok(Some(done))
}

/// What one committed step did.
#[derive(Default)]
pub(super) struct Step {
    pub retimed: Retimed,
    /// The rewritten rows' sizes: what the step added to the WAL, roughly.
    pub written_bytes: u64,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;
    use tokio::sync::oneshot;

    use crate::clock::Stamp;
    use crate::mqtt::QoS;
    use crate::store::{DrainOrder, Error, Message, Priority, Queue, Retimed, StoreConfig, Stored};

    const THIS_BOOT: i64 = 7;

    fn config(path: &Path, commit_interval_ms: u64) -> StoreConfig {
        StoreConfig {
            path: path.to_path_buf(),
            commit_interval_ms,
            ..StoreConfig::default()
        }
    }

    fn message(payload: &str, created_ms: i64, unsynced: Option<(i64, u64)>) -> Message {
        Message {
            topic: "fb/meter/p".into(),
            payload: Bytes::from(payload.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            created_ms,
            priority: Priority::Periodic,
            unsynced: unsynced.map(|(boot, mono_ms)| Stamp { boot, mono_ms }),
        }
    }

    /// The store does not know payloads: this one appends the change, and refuses
    /// payloads starting with `x`.
    fn rewrite(payload: &[u8], delta_ms: i64) -> Option<Vec<u8>> {
        if payload.starts_with(b"x") {
            return None;
        }
        let mut out = payload.to_vec();
        out.extend(format!("{delta_ms:+}").bytes());
        Some(out)
    }

    async fn retime(queue: &Queue, boot: i64, offset_ms: i64) -> Result<Retimed, Error> {
        let (tx, rx) = oneshot::channel();
        let done = Box::new(move |result| {
            let _ = tx.send(result);
        });
        queue.retime(boot, offset_ms, rewrite, done).await;
        rx.await.expect("the store answers a correction")
    }

    fn by_payload<'a>(rows: &'a [Stored], start: &str) -> &'a Stored {
        rows.iter()
            .find(|s| s.message.payload.starts_with(start.as_bytes()))
            .unwrap_or_else(|| panic!("no row {start}: {rows:?}"))
    }

    #[tokio::test]
    async fn a_sync_corrects_the_rows_and_buffered_messages_of_this_boot_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.db");
        let queue = Queue::open(config(&path, 2)).expect("open");
        queue
            .append(vec![
                message("flight", 50, Some((THIS_BOOT, 2000))),
                message("this", 5, Some((THIS_BOOT, 1000))),
                message("earlier-boot", 3, Some((THIS_BOOT - 1, 500))),
                message("synced", 100, None),
                message("xforeign", 7, Some((THIS_BOOT, 4000))),
            ])
            .await
            .expect("append");
        queue.close().await.expect("close");

        // A group-commit interval long enough that the next batch is still buffered
        // when the correction arrives right behind it.
        let queue = Queue::open(config(&path, 10_000)).expect("reopen");
        let flight = queue.next(1, DrainOrder::OldestFirst).await.expect("next");
        assert_eq!(&flight[0].message.payload[..], b"flight");
        queue
            .submit(
                vec![message("buffered", 60, Some((THIS_BOOT, 3000)))],
                Box::new(|_| {}),
            )
            .await;
        let done = retime(&queue, THIS_BOOT, 1_000_000).await.expect("retime");
        assert_eq!((done.rows, done.in_flight), (2, 1), "{done:?}");
        let tracked = queue.stats().await.expect("stats").bytes;
        queue.close().await.expect("close");

        let queue = Queue::open(config(&path, 2)).expect("reopen");
        let rows = queue
            .next(100, DrainOrder::OldestFirst)
            .await
            .expect("next");
        let this = by_payload(&rows, "this");
        assert_eq!(&this.message.payload[..], b"this+1000995");
        assert_eq!(this.message.created_ms, 1_001_000);
        assert_eq!(this.message.unsynced, None);
        let buffered = by_payload(&rows, "buffered");
        assert_eq!(&buffered.message.payload[..], b"buffered+1002940");
        assert_eq!(buffered.message.created_ms, 1_003_000);
        assert_eq!(buffered.message.unsynced, None);
        for (left, created, stamp) in [
            ("flight", 50, Some((THIS_BOOT, 2000))),
            ("earlier-boot", 3, Some((THIS_BOOT - 1, 500))),
            ("synced", 100, None),
            ("xforeign", 7, Some((THIS_BOOT, 4000))),
        ] {
            assert_eq!(
                by_payload(&rows, left).message,
                message(left, created, stamp),
                "left as it was"
            );
        }
        let stats = queue.stats().await.expect("stats");
        assert_eq!(
            stats.bytes - buffered.message.stored_size(),
            tracked,
            "the thread's byte count follows the rewritten sizes"
        );
        queue.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_correction_the_disk_refuses_changes_nothing_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(config(&dir.path().join("q.db"), 2)).expect("open");
        queue
            .append(vec![message("this", 5, Some((THIS_BOOT, 1000)))])
            .await
            .expect("append");
        queue
            .pragma("PRAGMA query_only = 1")
            .await
            .expect("read-only");
        assert!(retime(&queue, THIS_BOOT, 1_000_000).await.is_err());
        queue
            .pragma("PRAGMA query_only = 0")
            .await
            .expect("writable");
        let rows = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
        assert_eq!(rows[0].message, message("this", 5, Some((THIS_BOOT, 1000))));
        let done = retime(&queue, THIS_BOOT, 1_000_000).await.expect("retried");
        assert_eq!(
            (done.rows, done.in_flight),
            (0, 1),
            "in flight since the next"
        );
        queue.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_held_store_hands_out_nothing_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(config(&dir.path().join("q.db"), 2)).expect("open");
        queue.hold(true).await;
        queue
            .append(vec![message("a", 1, None), message("b", 2, None)])
            .await
            .expect("append");
        let mut pending = queue.pending();
        pending.borrow_and_update();
        assert!(queue
            .next(10, DrainOrder::OldestFirst)
            .await
            .expect("next")
            .is_empty());
        queue.hold(false).await;
        tokio::time::timeout(std::time::Duration::from_secs(10), pending.changed())
            .await
            .expect("the release wakes the uplink")
            .expect("watch");
        let rows = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
        assert_eq!(rows.len(), 2);
        queue.close().await.expect("close");
    }

    /// Regression (issue 19): a reading taken while the clock was days behind looked
    /// days old once NTP set the clock, and `max_age_secs` dropped it before the
    /// correction could give it its true time.
    #[tokio::test]
    async fn a_reading_stamped_while_the_clock_was_behind_is_not_aged_out_when_it_jumps_forward() {
        let Some(boot) = crate::clock::boot_id() else {
            panic!("this test needs the kernel's boot id (/proc/sys/kernel/random/boot_id)");
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(StoreConfig {
            max_age_secs: 86_400,
            ..config(&dir.path().join("q.db"), 2)
        })
        .expect("open");
        let ten_days_ago = crate::clock::now_ms() - 10 * 86_400_000;
        let now = crate::clock::mono_ms();
        queue
            .append(vec![
                message("stale-clock", ten_days_ago, Some((boot, now))),
                message("earlier-boot", ten_days_ago, Some((boot ^ 1, now))),
                message("really-old", ten_days_ago, None),
            ])
            .await
            .expect("append");
        let stats = queue.stats().await.expect("stats");
        assert_eq!(stats.dropped.max_age, 1, "{stats:?}");
        let rows = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
        let kept: Vec<&[u8]> = rows.iter().map(|s| &s.message.payload[..]).collect();
        assert_eq!(kept, [&b"stale-clock"[..], b"earlier-boot"]);
        queue.close().await.expect("close");
    }

    #[tokio::test]
    async fn rows_keep_their_order_when_the_wall_clock_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Queue::open(config(&dir.path().join("q.db"), 2)).expect("open");
        let t = crate::clock::now_ms();
        queue
            .append(vec![message("before", t, None)])
            .await
            .expect("append");
        queue
            .append(vec![message("after", t - 3_600_000, None)])
            .await
            .expect("append");
        let rows = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
        let order: Vec<&[u8]> = rows.iter().map(|s| &s.message.payload[..]).collect();
        assert_eq!(order, [&b"before"[..], b"after"]);
        queue.close().await.expect("close");
    }
}

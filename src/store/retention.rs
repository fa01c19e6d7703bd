//! Retention: which stored rows give way to the limits (`max_age_secs`, `max_rows`,
//! `max_bytes`) and, while the disk is full, to buffered appends. It chooses rows; the
//! caller deletes them in its own transaction and counts them by reason.
//!
//! Invariants:
//! - Rows the caller marks as taken (in flight or acknowledged, see
//!   [`super::cursor::Cursor::is_taken`]) are never chosen.
//! - Lowest priority first (periodic, then event, then alarm); within a class the oldest
//!   (`drop_oldest`) or the newest (`drop_newest`) rows go first. Age drops come first
//!   and are by age only.
//! - A creation time before 2020 ([`CLOCK_SET_MS`]) comes from a gateway whose clock was
//!   not set: such rows are exempt from `max_age_secs`.
//! - Each age is measured on the clock it can be trusted on: a row stamped while the wall
//!   clock was not synchronized (`mono_ms` set) by the boot clock when it is of this
//!   boot, and not at all when it is of an earlier boot (its true age is unknown; it
//!   gives way to `max_rows`/`max_bytes` only); every other row by the wall clock. A
//!   wall clock set back makes rows look younger, never older: they are kept longer,
//!   never dropped early. Queue order is id order, whatever the clocks do.
//! - Each choice costs about the rows it drops: the age sweep stops at the first young
//!   row and looks at no more than [`AGE_SCAN_ROWS`]; `drop_oldest` resumes each class
//!   where its previous drop ended (`scan_from`).
//! - Sizes read back from the file may have been written by something else: a negative
//!   one counts as 0.

use std::collections::HashSet;

use rusqlite::{params, Transaction};

use super::config::{DropPolicy, StoreConfig};
use super::message::Priority;
use super::stats::DropReason;

/// Most rows the age sweep looks at per commit.
const AGE_SCAN_ROWS: i64 = 1024;
/// 2020-01-01: a creation time before it comes from a gateway whose clock was not set
/// yet (a Pi without RTC before NTP). Such rows are exempt from `max_age_secs`, or the
/// first clock correction would drop the whole backlog.
const CLOCK_SET_MS: i64 = 1_577_836_800_000;

/// The priority classes in drop order.
const CLASSES: [Priority; 3] = [Priority::Periodic, Priority::Event, Priority::Alarm];

/// A row chosen for a retention drop: id, size, why.
pub(super) type Victim = (i64, u64, DropReason);

/// Creation times below this are past `max_age_secs`.
pub(super) fn age_cutoff(config: &StoreConfig) -> i64 {
    let max_age_ms = i64::try_from(config.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    crate::clock::now_ms().saturating_sub(max_age_ms)
}

/// Whether a row created at `created_ms` is due for an age drop.
pub(super) fn expired(created_ms: i64, cutoff: i64) -> bool {
    created_ms >= CLOCK_SET_MS && created_ms < cutoff
}

/// Running totals while victims are chosen: what the queue would hold without them.
struct Choice {
    victims: Vec<Victim>,
    chosen: HashSet<i64>,
    rows: u64,
    bytes: u64,
}

impl Choice {
    fn take(&mut self, id: i64, size: u64, reason: DropReason) {
        self.victims.push((id, size, reason));
        self.rows = self.rows.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }
}

/// Rows to drop so the queue is within `max_age_secs`, `max_rows` and `max_bytes`,
/// by the policy: lowest priority first, then oldest (`drop_oldest`) or newest
/// (`drop_newest`). `rows` and `bytes` are the totals before the drop. Returns the
/// victims and the new `scan_from`.
pub(super) fn victims(
    tx: &Transaction<'_>,
    config: &StoreConfig,
    skip: impl Fn(&i64) -> bool,
    scan_from: [i64; 3],
    rows: u64,
    bytes: u64,
) -> Result<(Vec<Victim>, [i64; 3]), rusqlite::Error> {
    let mut choice = Choice {
        victims: Vec::new(),
        chosen: HashSet::new(),
        rows,
        bytes,
    };
    by_age(tx, config, &skip, &mut choice)?;
    if choice.rows <= config.max_rows && choice.bytes <= config.max_bytes {
        return Ok((choice.victims, scan_from));
    }
    let scan_from = by_limits(tx, config, &skip, scan_from, &mut choice)?;
    Ok((choice.victims, scan_from))
}

/// Rows past `max_age_secs`. Rows are in creation order closely enough: the sweep stops
/// at the first row that is young enough, so it costs only the rows it drops; and it
/// looks at no more than AGE_SCAN_ROWS, in case the front of the queue is in flight or
/// unstamped.
fn by_age(
    tx: &Transaction<'_>,
    config: &StoreConfig,
    skip: &impl Fn(&i64) -> bool,
    choice: &mut Choice,
) -> Result<(), rusqlite::Error> {
    let cutoff = age_cutoff(config);
    let boot = crate::clock::boot_id();
    let max_age_ms = config.max_age_secs.saturating_mul(1000);
    let now_mono = crate::clock::mono_ms();
    let mut by_age = tx.prepare_cached(
        "SELECT id, size, created_ms, boot, mono_ms FROM message ORDER BY id LIMIT ?1",
    )?;
    let mut cursor = by_age.query([AGE_SCAN_ROWS])?;
    while let Some(row) = cursor.next()? {
        let (id, size, created): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
        let stamp: (Option<i64>, Option<i64>) = (row.get(3)?, row.get(4)?);
        if let (row_boot, Some(mono)) = stamp {
            let age = now_mono.saturating_sub(u64::try_from(mono).unwrap_or(u64::MAX));
            let this_boot = row_boot.is_some() && row_boot == boot;
            if this_boot && age > max_age_ms && !skip(&id) {
                choice.take(id, u64::try_from(size).unwrap_or(0), DropReason::MaxAge);
                choice.chosen.insert(id);
            }
            continue;
        }
        if created >= cutoff {
            break;
        }
        if created < CLOCK_SET_MS || skip(&id) {
            continue;
        }
        choice.take(id, u64::try_from(size).unwrap_or(0), DropReason::MaxAge);
        choice.chosen.insert(id);
    }
    Ok(())
}

/// Rows over `max_rows` or `max_bytes`, class by class. `drop_oldest` starts each class
/// where the previous drop of that class ended (`scan_from`), so a queue that sits at
/// its limit does not rescan the rows of other classes in front on every commit.
fn by_limits(
    tx: &Transaction<'_>,
    config: &StoreConfig,
    skip: &impl Fn(&i64) -> bool,
    mut scan_from: [i64; 3],
    choice: &mut Choice,
) -> Result<[i64; 3], rusqlite::Error> {
    let oldest = config.policy == DropPolicy::DropOldest;
    let sql = if oldest {
        "SELECT id, size FROM message WHERE priority = ?1 AND id >= ?2 ORDER BY id"
    } else {
        "SELECT id, size FROM message WHERE priority = ?1 AND id >= ?2 ORDER BY id DESC"
    };
    let mut by_policy = tx.prepare_cached(sql)?;
    'classes: for (slot, class) in CLASSES.into_iter().enumerate() {
        let from = if oldest { scan_from[slot] } else { i64::MIN };
        let mut cursor = by_policy.query(params![class as u8, from])?;
        let mut first_skipped = None;
        while let Some(row) = cursor.next()? {
            let reason = if choice.rows > config.max_rows {
                DropReason::MaxRows
            } else if choice.bytes > config.max_bytes {
                DropReason::MaxBytes
            } else {
                break 'classes;
            };
            let (id, size): (i64, i64) = (row.get(0)?, row.get(1)?);
            if skip(&id) || choice.chosen.contains(&id) {
                first_skipped.get_or_insert(id);
                continue;
            }
            choice.take(id, u64::try_from(size).unwrap_or(0), reason);
            if oldest {
                // Skipped (in-flight) rows may be released later: scan them again.
                scan_from[slot] = first_skipped.unwrap_or(id.saturating_add(1));
            }
        }
    }
    Ok(scan_from)
}

/// `drop_oldest` under a full disk: up to `wanted` of the oldest stored rows of the
/// lowest priorities, none above `ceiling` (the most important buffered batch), as
/// (id, size as stored).
pub(super) fn disk_full_victims(
    tx: &Transaction<'_>,
    ceiling: Priority,
    wanted: usize,
    skip: impl Fn(&i64) -> bool,
) -> Result<Vec<(i64, i64)>, rusqlite::Error> {
    let mut victims = Vec::new();
    let mut select =
        tx.prepare_cached("SELECT id, size FROM message WHERE priority = ?1 ORDER BY id")?;
    'classes: for class in CLASSES {
        if class > ceiling {
            break;
        }
        let mut cursor = select.query([class as u8])?;
        while let Some(row) = cursor.next()? {
            if victims.len() >= wanted {
                break 'classes;
            }
            let id: i64 = row.get(0)?;
            if !skip(&id) {
                victims.push((id, row.get::<_, i64>(1)?));
            }
        }
    }
    Ok(victims)
}

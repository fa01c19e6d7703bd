//! The drain cursor: which stored rows `next` hands out, and the in-flight marks of the
//! rows it handed out.
//!
//! Invariants:
//! - The marks live in memory only: after a restart or crash every stored row is pending
//!   again. `next` reads the file and writes nothing.
//! - `in_flight` also holds the rows the fast path handed out from the memory buffer
//!   ([`Cursor::handed_from_memory`]): when their batch commits they are stored rows in
//!   flight like any other, so `next` never reads them again.
//! - A row id in `in_flight` or `acking` is never handed out by `next` and never chosen
//!   by a retention drop ([`Cursor::is_taken`]); `acking` rows are deleted by the next
//!   commit, which then calls [`Cursor::acks_committed`].
//! - Oldest-first: every stored row with an id up to `position` is in `in_flight`, in
//!   `acking`, or in `released`; so `next` reads `released` (in id order) and then only
//!   the rows after `position`, never the in-flight and acknowledged rows in front. New
//!   rows get ids above every stored id, hence above `position`.
//! - A `next` that fails hands nothing out: what it took is put back.
//! - While held ([`Cursor::hold`], `time.require_sync` before the first sync) `next`
//!   hands nothing out and moves nothing.

use std::collections::{BTreeSet, HashSet};

use rusqlite::{params, Connection, OptionalExtension};

use super::db;
use super::message::{DrainOrder, Stored};

pub(super) struct Cursor {
    in_flight: HashSet<i64>,
    /// Acknowledged rows whose delete is not committed yet; never handed out again.
    acking: HashSet<i64>,
    /// The highest id an oldest-first `next` has looked at.
    position: i64,
    /// Released rows at or below `position`: `next` hands them out first.
    released: BTreeSet<i64>,
    held: bool,
}

impl Cursor {
    pub fn new() -> Cursor {
        Cursor {
            in_flight: HashSet::new(),
            acking: HashSet::new(),
            position: i64::MIN,
            released: BTreeSet::new(),
            held: false,
        }
    }

    /// Holds every row back from `next` (true) or hands them out again (false).
    pub fn hold(&mut self, held: bool) {
        self.held = held;
    }

    /// Whether rows are held back from `next` (from memory too, on the fast path).
    pub fn held(&self) -> bool {
        self.held
    }

    /// Whether the row is in flight or acknowledged: not to be handed out or dropped.
    pub fn is_taken(&self, id: &i64) -> bool {
        self.in_flight.contains(id) || self.acking.contains(id)
    }

    /// Rows handed out and neither acknowledged nor released.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Stored rows that are not pending: in flight or acknowledged.
    pub fn taken(&self) -> usize {
        self.in_flight.len() + self.acking.len()
    }

    /// Acknowledged rows whose delete waits for the next commit.
    pub fn acking(&self) -> &HashSet<i64> {
        &self.acking
    }

    /// The deletes of these acknowledged rows have committed.
    pub fn acks_committed(&mut self, ids: &[i64]) {
        for id in ids {
            self.acking.remove(id);
        }
    }

    /// Rows handed out from the memory buffer are in flight.
    pub fn handed_from_memory(&mut self, ids: impl IntoIterator<Item = i64>) {
        self.in_flight.extend(ids);
    }

    /// An acknowledged row that was never stored: it is no longer in flight.
    pub fn acked_in_memory(&mut self, id: i64) {
        self.in_flight.remove(&id);
    }

    pub fn ack(&mut self, ids: Vec<i64>) {
        for id in ids {
            self.in_flight.remove(&id);
            self.released.remove(&id);
            self.acking.insert(id);
        }
    }

    /// Makes in-flight rows pending again; returns how many were in flight.
    pub fn release(&mut self, ids: Vec<i64>) -> usize {
        let mut released = 0;
        for id in ids {
            if self.in_flight.remove(&id) {
                released += 1;
                if id <= self.position {
                    self.released.insert(id);
                }
            }
        }
        released
    }

    /// Hands out up to `max` pending rows and marks them in flight.
    pub fn next(
        &mut self,
        conn: &Connection,
        max: usize,
        order: DrainOrder,
    ) -> Result<Vec<Stored>, rusqlite::Error> {
        let mut out = Vec::with_capacity(max.min(1024));
        if max == 0 || self.held {
            return Ok(out);
        }
        match order {
            DrainOrder::OldestFirst => {
                let position = self.position;
                if let Err(error) = self.next_oldest(conn, max, &mut out) {
                    // What was taken is not handed out: put it back.
                    self.position = position;
                    self.released
                        .extend(out.iter().map(|s| s.id).filter(|id| *id <= position));
                    return Err(error);
                }
            }
            DrainOrder::NewestFirst => {
                self.next_newest(conn, max, &mut out)?;
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
    fn next_oldest(
        &mut self,
        conn: &Connection,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<(), rusqlite::Error> {
        if !self.released.is_empty() {
            self.next_released(conn, max, out)?;
        }
        let mut statement = conn.prepare_cached(&format!(
            "SELECT {} FROM message WHERE id > ?1 ORDER BY id LIMIT ?2",
            db::STORED_COLUMNS
        ))?;
        while out.len() < max {
            // Rows after the cursor are in flight or acknowledged only when a
            // newest-first `next` handed them out, so one pass is the rule.
            let limit = max - out.len();
            let mut rows = statement.query(params![
                self.position,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut seen = 0;
            while let Some(row) = rows.next()? {
                seen += 1;
                let id: i64 = row.get(0)?;
                if !self.in_flight.contains(&id) && !self.acking.contains(&id) {
                    out.push(db::stored_from_row(row)?);
                }
                self.position = id;
            }
            if seen < limit {
                break;
            }
        }
        Ok(())
    }

    /// Released rows in id order, while there is room in `out`.
    fn next_released(
        &mut self,
        conn: &Connection,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<(), rusqlite::Error> {
        let mut by_id = conn.prepare_cached(&format!(
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
        Ok(())
    }

    /// The newest `max` pending rows, in queue order. Skipped rows are at most the
    /// in-flight and acknowledged ones, so one pass is the rule.
    fn next_newest(
        &mut self,
        conn: &Connection,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<(), rusqlite::Error> {
        let mut statement = conn.prepare_cached(&format!(
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
}

//! Appended batches waiting for their commit: the group-commit buffer, which is also the
//! memory buffer while the disk is unavailable (full, read-only, failing), and the
//! fast path's source of fresh rows (handed out before their commit, see `store/mod.rs`).
//!
//! Invariants:
//! - Each row gets its id when it is appended, in append order, so ids follow append
//!   order and a batch's ids are consecutive. `rows` is the number of rows not yet
//!   resolved (committed or acknowledged); batches are kept and committed in append
//!   order.
//! - A row is resolved once: acknowledged upstream while buffered ([`Buffer::ack`]: it
//!   is never written) or committed with its batch. A batch's [`Done`] is called
//!   exactly once: with all its ids when every row is resolved (the earlier of commit
//!   and acknowledgement, row by row), or with [`Error::Dropped`].
//! - A buffered row handed out ([`Buffer::hand_out`]) is not handed out again until it
//!   is released; the QoS flow state recorded for it ([`Buffer::set_flow`]) is written
//!   with its insert, so a committed row carries the flow it had in memory.
//! - Bounded: normally a commit is due once `commit_max_rows` rows wait; while commits
//!   fail the worker keeps `rows` within `memory_buffer_rows` by [`Buffer::drop_one`].
//! - A batch is worth what its most important message is: drops pick the batches of the
//!   lowest priority, the oldest (`drop_oldest`) or the newest (`drop_newest`) first.

use std::collections::VecDeque;
use std::time::Instant;

use super::config::DropPolicy;
use super::error::Error;
use super::message::{DrainOrder, Message, Priority, Stored};
use super::request::Done;
use super::stats::DropReason;

/// A buffered row: its message, whether it is handed out, and its flow state.
pub(super) struct Row {
    pub message: Message,
    handed: bool,
    /// `(pkid, pubrec)` recorded by `set_flow` while the row is buffered.
    pub flow: Option<(u16, bool)>,
}

/// An appended batch waiting for its commit.
pub(super) struct Batch {
    first_id: i64,
    /// One entry per appended message; `None` once acknowledged.
    rows: Vec<Option<Row>>,
    live: usize,
    done: Done,
    /// When it was appended: the commit is due `commit_interval_ms` after the oldest
    /// batch still waiting.
    pub arrived: Instant,
    /// The highest priority in the batch: a batch is dropped whole, so it is worth what
    /// its most important message is.
    priority: Priority,
}

impl Batch {
    fn ids(&self) -> Vec<i64> {
        (0..self.rows.len())
            .map(|i| self.first_id.saturating_add(i as i64))
            .collect()
    }

    /// The rows still to write, with their ids.
    pub fn live(&self) -> impl Iterator<Item = (i64, &Row)> {
        self.rows
            .iter()
            .enumerate()
            .filter_map(|(i, row)| Some((self.first_id.saturating_add(i as i64), row.as_ref()?)))
    }

    /// Answers a batch that will not be stored.
    fn refuse(self, reason: DropReason) {
        (self.done)(Err(Error::Dropped {
            rows: self.live,
            reason,
        }));
    }
}

#[derive(Default)]
pub(super) struct Buffer {
    batches: VecDeque<Batch>,
    rows: usize,
    /// Rows not handed out.
    unhanded: usize,
}

impl Buffer {
    /// Buffers a batch whose first row gets `first_id`; returns the id after its last.
    pub fn push(&mut self, messages: Vec<Message>, first_id: i64, done: Done) -> i64 {
        let priority = messages
            .iter()
            .map(|m| m.priority)
            .max()
            .unwrap_or_default();
        let n = messages.len();
        self.rows += n;
        self.unhanded += n;
        self.batches.push_back(Batch {
            first_id,
            rows: messages
                .into_iter()
                .map(|message| {
                    Some(Row {
                        message,
                        handed: false,
                        flow: None,
                    })
                })
                .collect(),
            live: n,
            done,
            arrived: Instant::now(),
            priority,
        });
        first_id.saturating_add(n as i64)
    }

    /// Buffered rows (not yet committed nor acknowledged).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Buffered rows not handed out.
    pub fn unhanded(&self) -> usize {
        self.unhanded
    }

    pub fn batches(&self) -> impl Iterator<Item = &Batch> {
        self.batches.iter()
    }

    /// The buffered messages not handed out, for a clock correction before their commit
    /// (a row handed out stays as it is: a resent PUBLISH carries the same message).
    pub fn unhanded_messages_mut(&mut self) -> impl Iterator<Item = &mut Message> {
        self.batches
            .iter_mut()
            .flat_map(|b| b.rows.iter_mut().flatten())
            .filter(|row| !row.handed)
            .map(|row| &mut row.message)
    }

    /// When the oldest waiting batch was appended.
    pub fn oldest(&self) -> Option<Instant> {
        self.batches.front().map(|b| b.arrived)
    }

    /// The lowest buffered id, if any.
    pub fn first_id(&self) -> Option<i64> {
        self.batches
            .iter()
            .flat_map(|b| b.live().map(|(id, _)| id))
            .next()
    }

    /// How many batches from the front one commit writes: as many as fit in
    /// `max_rows` rows, and at least one.
    pub fn prefix(&self, max_rows: usize) -> usize {
        let mut rows = 0;
        let fit = self
            .batches
            .iter()
            .take_while(|b| {
                rows += b.live;
                rows <= max_rows
            })
            .count();
        fit.max(1).min(self.batches.len())
    }

    /// Takes the first `n` batches, for the commit that stored them.
    pub fn take_front(&mut self, n: usize) -> VecDeque<Batch> {
        let rest = self.batches.split_off(n.min(self.batches.len()));
        let taken = std::mem::replace(&mut self.batches, rest);
        for batch in &taken {
            self.rows -= batch.live;
            self.unhanded -= batch.live().filter(|(_, r)| !r.handed).count();
        }
        taken
    }

    fn locate(&mut self, id: i64) -> Option<(usize, usize)> {
        let b = self
            .batches
            .partition_point(|b| b.first_id <= id)
            .checked_sub(1)?;
        let i = usize::try_from(id - self.batches[b].first_id).ok()?;
        self.batches[b].rows.get(i)?.as_ref()?;
        Some((b, i))
    }

    fn row_mut(&mut self, id: i64) -> Option<&mut Row> {
        let (b, i) = self.locate(id)?;
        self.batches[b].rows[i].as_mut()
    }

    /// Up to `max` rows not handed out, with ids below `below` (the ids reserved for
    /// rows in memory), marked handed out and returned in queue order: the oldest
    /// first, or the newest `max`.
    pub fn hand_out(&mut self, max: usize, order: DrainOrder, below: i64) -> Vec<Stored> {
        let mut out = Vec::new();
        match order {
            DrainOrder::OldestFirst => {
                for batch in &mut self.batches {
                    if out.len() == max || batch.first_id >= below {
                        break;
                    }
                    let first = batch.first_id;
                    for (i, row) in batch.rows.iter_mut().enumerate() {
                        if out.len() == max {
                            break;
                        }
                        take(first.saturating_add(i as i64), row, below, &mut out);
                    }
                }
            }
            DrainOrder::NewestFirst => {
                for batch in self.batches.iter_mut().rev() {
                    if out.len() == max {
                        break;
                    }
                    let first = batch.first_id;
                    for (i, row) in batch.rows.iter_mut().enumerate().rev() {
                        if out.len() == max {
                            break;
                        }
                        take(first.saturating_add(i as i64), row, below, &mut out);
                    }
                }
                out.reverse();
            }
        }
        self.unhanded -= out.len();
        out
    }

    /// Makes a handed-out row available again; false when it is not buffered.
    pub fn release(&mut self, id: i64) -> bool {
        match self.row_mut(id) {
            Some(row) => {
                if std::mem::replace(&mut row.handed, false) {
                    self.unhanded += 1;
                }
                true
            }
            None => false,
        }
    }

    /// Records a QoS flow state for a buffered row; false when it is not buffered.
    pub fn set_flow(&mut self, id: i64, pkid: u16, pubrec: bool) -> bool {
        match self.row_mut(id) {
            Some(row) => {
                row.flow = Some((pkid, pubrec));
                true
            }
            None => false,
        }
    }

    /// The upstream broker acknowledged a buffered row: it is resolved without being
    /// written, and its batch answered once every row of it is resolved. Returns the
    /// row's stored size, or `None` when the row is not buffered.
    pub fn ack(&mut self, id: i64) -> Option<u64> {
        let (b, i) = self.locate(id)?;
        let batch = &mut self.batches[b];
        let row = batch.rows[i].take()?;
        batch.live -= 1;
        self.rows -= 1;
        if !row.handed {
            self.unhanded -= 1;
        }
        if batch.live == 0 {
            if let Some(batch) = self.batches.remove(b) {
                let ids = batch.ids();
                (batch.done)(Ok(ids));
            }
        }
        Some(row.message.stored_size())
    }

    /// The highest priority buffered: what a disk-full eviction may drop up to.
    pub fn ceiling(&self) -> Priority {
        self.batches
            .iter()
            .map(|b| b.priority)
            .max()
            .unwrap_or_default()
    }

    /// Drops one batch of the lowest priority by the policy (the oldest or the newest of
    /// that class), answers it with [`DropReason::DiskFull`] and returns its
    /// rows; `None` when the buffer is empty.
    pub fn drop_one(&mut self, policy: DropPolicy) -> Option<usize> {
        let lowest = self
            .batches
            .iter()
            .map(|b| b.priority)
            .min()
            .unwrap_or_default();
        let position = match policy {
            DropPolicy::DropOldest => self.batches.iter().position(|b| b.priority == lowest),
            DropPolicy::DropNewest => self.batches.iter().rposition(|b| b.priority == lowest),
        };
        let batch = position.and_then(|p| self.batches.remove(p))?;
        let rows = batch.live;
        self.rows -= rows;
        self.unhanded -= batch.live().filter(|(_, r)| !r.handed).count();
        batch.refuse(DropReason::DiskFull);
        Some(rows)
    }

    /// Drops every batch (the queue closes and the disk is still unavailable), answers
    /// each with `reason`, and returns the rows dropped.
    pub fn drop_all(&mut self, reason: DropReason) -> usize {
        let rows = self.rows;
        for batch in self.batches.drain(..) {
            batch.refuse(reason);
        }
        self.rows = 0;
        self.unhanded = 0;
        rows
    }
}

/// Hands out one buffered row if it is live, not handed out and under `below`.
fn take(id: i64, row: &mut Option<Row>, below: i64, out: &mut Vec<Stored>) {
    let Some(row) = row.as_mut().filter(|r| !r.handed && id < below) else {
        return;
    };
    row.handed = true;
    out.push(Stored {
        id,
        message: row.message.clone(),
        pkid: row.flow.map(|(pkid, _)| pkid),
        pubrec: row.flow.is_some_and(|(_, pubrec)| pubrec),
    });
}

/// Answers each committed batch with its row ids (in batch order).
pub(super) fn committed(batches: VecDeque<Batch>) {
    for batch in batches {
        let ids = batch.ids();
        (batch.done)(Ok(ids));
    }
}

//! Appended batches waiting for their commit: the group-commit buffer, which is also the
//! memory buffer while the disk is unavailable (full, read-only, failing).
//!
//! Invariants:
//! - `rows` is the number of messages in `batches`; batches are kept and committed in
//!   append order, so ids follow append order.
//! - A batch is committed or dropped whole, and its [`Done`] is called exactly once:
//!   with its ids after the commit ([`committed`]) or with [`Error::Dropped`].
//! - Bounded: normally a commit is due once `commit_max_rows` rows wait; while commits
//!   fail the worker keeps `rows` within `memory_buffer_rows` by [`Buffer::drop_one`].
//! - A batch is worth what its most important message is: drops pick the batches of the
//!   lowest priority, the oldest (`drop_oldest`) or the newest (`drop_newest`) first.

use std::collections::VecDeque;

use super::config::DropPolicy;
use super::error::Error;
use super::message::{Message, Priority};
use super::request::Done;
use super::stats::DropReason;

/// An appended batch waiting for its commit.
pub(super) struct Batch {
    pub messages: Vec<Message>,
    done: Done,
    /// The highest priority in the batch: a batch is dropped whole, so it is worth what
    /// its most important message is.
    priority: Priority,
}

impl Batch {
    /// Answers a batch that will not be stored.
    fn refuse(self, reason: DropReason) {
        (self.done)(Err(Error::Dropped {
            rows: self.messages.len(),
            reason,
        }));
    }
}

#[derive(Default)]
pub(super) struct Buffer {
    batches: VecDeque<Batch>,
    rows: usize,
}

impl Buffer {
    pub fn push(&mut self, messages: Vec<Message>, done: Done) {
        let priority = messages
            .iter()
            .map(|m| m.priority)
            .max()
            .unwrap_or_default();
        self.rows += messages.len();
        self.batches.push_back(Batch {
            messages,
            done,
            priority,
        });
    }

    /// Buffered rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn batches(&self) -> impl Iterator<Item = &Batch> {
        self.batches.iter()
    }

    /// The buffered messages, for a clock correction before their commit.
    pub fn messages_mut(&mut self) -> impl Iterator<Item = &mut Message> {
        self.batches.iter_mut().flat_map(|b| b.messages.iter_mut())
    }

    /// How many batches from the front one commit writes: as many as fit in
    /// `max_rows` rows, and at least one.
    pub fn prefix(&self, max_rows: usize) -> usize {
        let mut rows = 0;
        let fit = self
            .batches
            .iter()
            .take_while(|b| {
                rows += b.messages.len();
                rows <= max_rows
            })
            .count();
        fit.max(1).min(self.batches.len())
    }

    /// Takes the first `n` batches, for the commit that stored them.
    pub fn take_front(&mut self, n: usize) -> VecDeque<Batch> {
        let rest = self.batches.split_off(n.min(self.batches.len()));
        let taken = std::mem::replace(&mut self.batches, rest);
        self.rows -= taken.iter().map(|b| b.messages.len()).sum::<usize>();
        taken
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
        let rows = batch.messages.len();
        self.rows -= rows;
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
        rows
    }
}

/// Answers each committed batch with its row ids (in batch order).
pub(super) fn committed(batches: VecDeque<Batch>, ids: Vec<Vec<i64>>) {
    for (batch, ids) in batches.into_iter().zip(ids) {
        (batch.done)(Ok(ids));
    }
}

//! What the handle ([`super::Queue`]) sends the store thread: one [`Request`] per call,
//! each with the sender of its answer.
//!
//! Invariants:
//! - The channel is bounded by a semaphore of [`CHANNEL_CAPACITY`] slots: a request holds
//!   its slot until the thread has taken it, and callers beyond it wait for a slot.
//! - Every request is answered exactly once through its [`Reply`] or [`Done`] (or the
//!   reply is dropped when the thread stops, which the handle reports as
//!   [`Error::Closed`]).
//! - A request that reached the thread is carried out, whether or not its caller still
//!   waits for the answer.

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::error::Error;
use super::message::{DrainOrder, Message, Stored};

use super::stats::Stats;

/// Requests waiting for the store thread; callers beyond it wait for a slot. The thread
/// also takes at most this many queued requests before it decides whether to commit.
pub(super) const CHANNEL_CAPACITY: usize = 256;

pub(super) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// What the thread calls, on its own thread and exactly once, with the outcome of an
/// appended batch: its row ids once committed, or why it was not stored. It must not
/// block: it runs between two commits.
pub type Done = Box<dyn FnOnce(Result<Vec<i64>, Error>) + Send>;

pub(super) enum Command {
    Append {
        batch: Vec<Message>,
        done: Done,
    },
    Next {
        max: usize,
        order: DrainOrder,
        reply: Reply<Vec<Stored>>,
    },
    Ack {
        ids: Vec<i64>,
        reply: Reply<()>,
    },
    Release {
        ids: Vec<i64>,
        reply: Reply<()>,
    },
    SetFlow(Flow),
    /// A clock correction (see [`super::Queue::retime`]); answered through `done`.
    Retime {
        retime: Retime,
        done: Box<dyn FnOnce(Result<Retimed, Error>) + Send>,
    },
    /// Holds rows back from `next`, or hands them out again; not answered.
    Hold {
        held: bool,
    },
    /// The packet ids to release after a crash (`Queue::unswept_flows`).
    Unswept {
        reply: Reply<Vec<u16>>,
    },
    /// The uplink released them (`Queue::flows_swept`).
    Swept {
        reply: Reply<()>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    Close {
        reply: Reply<()>,
    },
    /// Stops the thread as a crash would: nothing buffered is written.
    #[cfg(test)]
    Crash {
        reply: Reply<()>,
    },
    /// Runs a pragma on the connection: `max_page_count` simulates a full disk,
    /// `query_only` a read-only filesystem.
    #[cfg(test)]
    Pragma {
        sql: String,
        reply: Reply<()>,
    },
}

/// A flow-state update (`set_flow`): sent as is, and kept by the thread until the
/// commit that holds it, which answers `reply`.
pub(super) struct Flow {
    pub id: i64,
    pub pkid: u16,
    pub pubrec: bool,
    pub reply: Reply<()>,
}

/// Rewrites a payload for a correction of `delta_ms`; `None` leaves it as it is.
pub type Rewrite = fn(&[u8], i64) -> Option<Vec<u8>>;

/// What a correction asks for.
pub struct Retime {
    pub boot: i64,
    /// The true wall time at boot-clock zero.
    pub offset_ms: i64,
    pub rewrite: Rewrite,
}

/// What a correction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retimed {
    /// Messages corrected (stored rows and buffered messages).
    pub rows: u64,
    /// Stamped rows left as they were because they are in flight upstream.
    pub in_flight: u64,
    /// How the stored bytes changed (payloads change length).
    pub bytes_delta: i64,
}

pub(super) struct Request {
    pub command: Command,
    /// Returned when the thread has taken the request: this is what bounds the channel.
    pub _slot: OwnedSemaphorePermit,
}

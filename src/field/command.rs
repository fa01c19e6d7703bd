//! The way into a bus task for writes: the command a bus task carries out, its report,
//! and the bounded queue of each bus.
//!
//! Invariants:
//! - Each bus has one queue, kept by its [`super::ResolvedBus`] so that a respawned task
//!   takes over the commands waiting; only the running task holds the receiving end.
//! - The queue is bounded ([`QUEUE_CAPACITY`]); a command that does not fit is refused
//!   at once ([`Refusal::Busy`]), never waited for.
//! - The bus task looks at its queue before every request on the wire, so a command
//!   waits at most for the request in progress (and, on a serial line, the silence).
//! - Every command gets exactly one report; one dropped unanswered (the task stopped)
//!   shows as a closed reply channel to the sender.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex, OwnedMutexGuard};
use tokio::time::Instant;

use super::link::{Chain, ReadError};
use super::reading::{Reading, Value};
use super::write::{Refusal, WriteOp};

/// Commands a bus holds while it is busy; more are refused as busy.
pub const QUEUE_CAPACITY: usize = 16;

/// One write for a bus task to carry out.
#[derive(Debug)]
pub struct BusCommand {
    /// Index of the device in its bus.
    pub device: usize,
    /// Index of the point in its device.
    pub point: usize,
    pub op: WriteOp,
    /// A command taken off the queue after this is refused as stale (it waited too
    /// long behind others), not written.
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<WriteReport>,
}

/// Why a write that was sent did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum WriteFailure {
    /// The device answered with a Modbus exception.
    #[error("the device answered Modbus exception {code:#04x} ({})", exception_name(*.code))]
    Exception { code: u8 },
    /// No usable answer (timeout, corrupted, disconnected).
    #[error("{}", Chain(.0))]
    Fault(#[source] ReadError),
    /// The command waited in the bus queue past its deadline.
    #[error("stale: it waited past its deadline behind other commands")]
    Stale,
}

impl WriteFailure {
    /// The short name for counters and results.
    pub fn reason(&self) -> &'static str {
        match self {
            WriteFailure::Exception { .. } => "exception",
            WriteFailure::Fault(ReadError::Timeout) => "timeout",
            WriteFailure::Fault(_) => "device_fault",
            WriteFailure::Stale => "stale",
        }
    }
}

/// The standard names of Modbus exception codes.
fn exception_name(code: u8) -> &'static str {
    match code {
        1 => "illegal function",
        2 => "illegal data address",
        3 => "illegal data value",
        4 => "server device failure",
        5 => "acknowledge",
        6 => "server device busy",
        8 => "memory parity error",
        10 => "gateway path unavailable",
        11 => "gateway target device failed to respond",
        _ => "unknown",
    }
}

/// What a bus task did with a command.
#[derive(Debug)]
pub struct WriteReport {
    /// The write was acknowledged by the device, or why not.
    pub outcome: Result<(), WriteFailure>,
    /// Wall clock when the write went out.
    pub written_ms: i64,
    /// The point read again after the write (good or bad), for publishing at once.
    pub readback: Option<Reading>,
    /// The value the device should hold now, to compare with the read-back.
    pub expected: Option<Value>,
}

impl WriteReport {
    /// Whether the device holds the value written: `None` when it could not be read back.
    pub fn held(&self) -> Option<bool> {
        let value = self.readback.as_ref()?.value.as_ref()?;
        Some(self.expected.as_ref() == Some(value))
    }
}

/// The command queue of one bus.
#[derive(Debug, Clone)]
pub struct CommandQueue {
    tx: mpsc::Sender<BusCommand>,
    rx: Arc<Mutex<mpsc::Receiver<BusCommand>>>,
}

impl Default for CommandQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        CommandQueue {
            tx,
            rx: Arc::new(Mutex::new(rx)),
        }
    }
}

/// The receiving end, held by the running bus task.
pub(crate) type Inbox = OwnedMutexGuard<mpsc::Receiver<BusCommand>>;

impl CommandQueue {
    /// Hands `command` to the bus task.
    ///
    /// # Errors
    /// [`Refusal::Busy`] when the queue is full (or the bus has no task any more).
    pub fn submit(&self, command: BusCommand) -> Result<(), Refusal> {
        self.tx.try_send(command).map_err(|_| Refusal::Busy)
    }

    /// The receiving end, for the bus task (waits while a stopping task still holds it).
    pub(crate) async fn inbox(&self) -> Inbox {
        Arc::clone(&self.rx).lock_owned().await
    }
}

//! Process signals as agent commands: SIGTERM and SIGINT ask for a graceful shutdown,
//! SIGHUP for a reload.
//!
//! signal-hook's iterator runs on one small thread and forwards into a bounded channel
//! with `try_send`: the handler side never blocks, and a burst of identical signals
//! collapses into what is already queued.

use std::io;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};
use tokio::sync::mpsc;

/// What a signal asks the agent to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// SIGTERM or SIGINT, named for the log.
    Shutdown(&'static str),
    /// SIGHUP.
    Reload,
}

/// Listens for signals until dropped.
pub struct SignalListener {
    handle: Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SignalListener {
    /// Registers the handlers and returns the channel the commands arrive on.
    ///
    /// # Errors
    /// The handlers cannot be registered or the forwarding thread cannot start.
    pub fn start() -> io::Result<(SignalListener, mpsc::Receiver<Command>)> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let handle = signals.handle();
        let (tx, rx) = mpsc::channel(8);
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    let command = match signal {
                        SIGHUP => Command::Reload,
                        SIGINT => Command::Shutdown("SIGINT"),
                        _ => Command::Shutdown("SIGTERM"),
                    };
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(command) {
                        break;
                    }
                }
            })?;
        Ok((
            SignalListener {
                handle,
                thread: Some(thread),
            },
            rx,
        ))
    }
}

impl Drop for SignalListener {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

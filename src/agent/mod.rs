//! Wiring, lifecycle, shutdown, reload and systemd notify (see issue 7).

pub mod demo;
pub mod signals;
mod supervisor;
pub mod systemd;

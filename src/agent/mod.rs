//! Wiring, lifecycle, shutdown, reload and systemd notify (see issue 7).

pub mod demo;
pub mod signals;
pub mod supervisor;
pub mod systemd;

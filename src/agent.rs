//! Wiring, lifecycle, shutdown, reload and systemd notify (see issue 7).

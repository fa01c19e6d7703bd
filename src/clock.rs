//! The wall clock, in one place: milliseconds since the Unix epoch for readings,
//! persisted expiries and ages. A leaf: it imports nothing from the crate.
//!
//! Monotonic time (`tokio::time::Instant`) stays the clock of intervals, keepalive and
//! backoff; this one is only for values that leave the process or outlive it.

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

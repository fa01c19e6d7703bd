//! The clocks, in one place. A leaf: it imports nothing from the crate.
//!
//! - The wall clock ([`now_ms`]): milliseconds since the Unix epoch, for values that
//!   leave the process or outlive it (reading timestamps, persisted expiries). It may be
//!   wrong (a Raspberry Pi has no battery-backed clock and boots with the time it last
//!   saved, or 1970) and it jumps, either way, when it is set.
//! - The boot clock ([`mono_ms`]): milliseconds since the system booted
//!   (`CLOCK_BOOTTIME`). It never jumps, runs through suspend, is the same for every
//!   process of one boot and starts again at 0 with each boot; with the [`boot_id`] it
//!   stamps a reading ([`Stamp`]), so once the wall clock is synchronized the reading's
//!   true time is `wall − boot clock` (then) `+ stamp`.
//! - Whether the wall clock is synchronized ([`ClockSource::synced`]): the kernel's NTP
//!   status, or systemd-timesyncd's file ([`SystemClock`]).
//! - tokio's `Instant` stays the clock of intervals, keepalive, backoff and deadbands
//!   inside the process.
//!
//! [`ClockSource`] bundles the three for the time keeper (`crate::time`), so tests drive
//! "unsynced → synced with an offset" and backwards jumps with a fake source.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Boot-clock milliseconds: since the system booted, suspend included; never jumps.
pub fn mono_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
        secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
    })
}

/// The boot clock at the moment the wall clock read `wall_ms`, a moment ago (the two
/// are read together; the wall clock does not step between a reading and its stamp).
pub fn mono_at(wall_ms: i64) -> u64 {
    let ago = u64::try_from(now_ms().saturating_sub(wall_ms)).unwrap_or(0);
    mono_ms().saturating_sub(ago)
}

/// This boot's id (the kernel's `boot_id`, folded to 64 bits), or `None` where the
/// kernel does not give one: then no reading is stamped, since a boot-clock time of an
/// unknown boot could be taken for one of this boot.
pub fn boot_id() -> Option<i64> {
    static BOOT: OnceLock<Option<i64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|text| parse_boot_id(&text))
    })
}

/// The first 16 hex digits of a boot id (`74f00bf2-3e00-4e1a-…`), as an `i64`.
fn parse_boot_id(text: &str) -> Option<i64> {
    let hex: String = text
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    if hex.len() < 16 {
        return None;
    }
    u64::from_str_radix(&hex, 16)
        .ok()
        .map(|v| i64::from_ne_bytes(v.to_ne_bytes()))
}

/// Where and when on the boot clock a reading was taken: what a later sync needs to
/// compute its true time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// [`boot_id`] of the boot it was taken in.
    pub boot: i64,
    /// [`mono_ms`] when it was taken.
    pub mono_ms: u64,
}

/// Wall clock, boot clock and sync status, as the time keeper reads them (the system's
/// clocks unless a test says otherwise).
pub trait ClockSource: Send + Sync {
    /// Wall-clock milliseconds since the Unix epoch ([`now_ms`]).
    fn wall_ms(&self) -> i64 {
        now_ms()
    }
    /// Boot-clock milliseconds ([`mono_ms`]).
    fn mono_ms(&self) -> u64 {
        mono_ms()
    }
    /// Whether the wall clock is synchronized to a time source now.
    fn synced(&self) -> bool;
}

/// The system's clocks. Synchronized means: where the directory of `sync_file` exists
/// (systemd-timesyncd runs and keeps `/run/systemd/timesync/synchronized` there), the
/// file exists; elsewhere, the kernel's NTP status says so (`adjtimex`: no
/// `STA_UNSYNC`, no `TIME_ERROR`; chrony, ntpd and timesyncd all set it).
#[derive(Debug, Clone)]
pub struct SystemClock {
    pub sync_file: Option<PathBuf>,
}

impl ClockSource for SystemClock {
    fn synced(&self) -> bool {
        if let Some(file) = &self.sync_file {
            if file.parent().is_some_and(std::path::Path::is_dir) {
                return file.exists();
            }
        }
        kernel_synced()
    }
}

/// A wall clock taken as right whatever its status (`time.trust = "always"`: a
/// gateway with a battery-backed clock, or one set by hand).
#[derive(Debug, Clone, Copy)]
pub struct TrustedClock;

impl ClockSource for TrustedClock {
    fn synced(&self) -> bool {
        true
    }
}

/// The kernel's NTP status: synchronized unless `STA_UNSYNC` is set or the clock state
/// is `TIME_ERROR`.
#[allow(unsafe_code)] // adjtimex has no safe wrapper in nix
fn kernel_synced() -> bool {
    // SAFETY: a zeroed `timex` is a valid value (plain integers); with `modes == 0`
    // adjtimex only reads the kernel's state into it and changes nothing.
    let (state, status) = unsafe {
        let mut timex: nix::libc::timex = std::mem::zeroed();
        let state = nix::libc::adjtimex(&mut timex);
        (state, timex.status)
    };
    state >= 0 && state != nix::libc::TIME_ERROR && status & nix::libc::STA_UNSYNC == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_fold_to_their_first_sixteen_hex_digits() {
        assert_eq!(
            parse_boot_id("74f00bf2-3e00-4e1a-a028-eda388ce7d88\n"),
            Some(i64::from_ne_bytes(0x74f0_0bf2_3e00_4e1a_u64.to_ne_bytes()))
        );
        assert_eq!(parse_boot_id("74f00bf2"), None);
        assert_eq!(parse_boot_id(""), None);
    }

    #[test]
    fn the_file_decides_where_its_directory_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("synchronized");
        let clock = SystemClock {
            sync_file: Some(file.clone()),
        };
        assert!(!clock.synced());
        std::fs::write(&file, b"").expect("touch");
        assert!(clock.synced());
        // No directory: the kernel's status, whatever it is, and no panic.
        let kernel = SystemClock {
            sync_file: Some(dir.path().join("absent/synchronized")),
        };
        assert_eq!(kernel.synced(), kernel_synced());
    }

    #[test]
    fn the_boot_clock_stamp_of_a_wall_time_just_taken_is_at_most_now() {
        let stamp = mono_at(now_ms());
        assert!(stamp <= mono_ms());
    }
}

//! The filesystem under the store: its free space, and the reserve that keeps the
//! delete path working when the filesystem is full.
//!
//! Invariants:
//! - The reserve is a file of its own beside the database (`<name>.reserve`, zeros,
//!   synced), at most [`Space::bytes`] long: 1/32 of the filesystem, at least
//!   [`RESERVE_MIN`] and at most [`RESERVE_MAX`]. It is deleted only when the
//!   filesystem is full ([`Space::release`]), so that the checkpoint of what is already
//!   committed and the deletes of delivered rows find the space they need. While the
//!   disk stays full, whatever space comes free is taken back into it
//!   ([`Space::top_up`]), so another writer (a runaway log) cannot take it; it counts
//!   as complete again ([`Space::restore`]) only once the filesystem has room for it
//!   twice over.
//! - The store checkpoints before its WAL holds more than half of the reserve
//!   ([`Space::checkpoint_bytes`]), and its file grows only while the reserve is
//!   complete (otherwise it is held at its size, also from the start), so releasing
//!   the reserve is always enough for the checkpoint that lets the WAL start over.
//! - Nothing here panics or fails the store: a filesystem that cannot be asked
//!   (`statvfs` fails) reports no free bytes but does not keep the reserve from being
//!   written, and a reserve that cannot be written is simply not held.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Smallest reserve: a few checkpoints' worth of pages on a tiny filesystem.
const RESERVE_MIN: u64 = 256 << 10;
/// Largest reserve: twice the WAL the store lets grow between checkpoints.
const RESERVE_MAX: u64 = 8 << 20;
/// Space [`Space::top_up`] leaves free.
const TOP_UP_MARGIN: u64 = 64 << 10;
/// The WAL is checkpointed at least this often (bytes written to it), whatever the
/// reserve.
const CHECKPOINT_MAX: u64 = 4 << 20;

/// Free and total bytes of a filesystem, as an unprivileged process may use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub free: u64,
    pub total: u64,
}

/// What `statvfs` says of the filesystem that holds `path` (a file or a directory).
pub(super) fn usage(path: &Path) -> Option<Usage> {
    let dir = if path.is_dir() {
        path
    } else {
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    };
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    // The field types are u32 on 32-bit targets (the Pi's armv7) and u64 here.
    #[allow(clippy::useless_conversion)]
    let unit = u64::from(stat.fragment_size()).max(1);
    #[allow(clippy::useless_conversion)]
    let (free, total) = (u64::from(stat.blocks_available()), u64::from(stat.blocks()));
    Some(Usage {
        free: free.saturating_mul(unit),
        total: total.saturating_mul(unit),
    })
}

/// The reserve beside one database file.
pub(super) struct Space {
    db: PathBuf,
    reserve: PathBuf,
    bytes: u64,
    /// The reserve file's length (0: none).
    len: u64,
}

impl Space {
    /// Sizes the reserve for the filesystem of `db`, and notes whether it already
    /// exists in full (left by a previous run).
    pub fn new(db: &Path) -> Space {
        let mut name = db.as_os_str().to_owned();
        name.push(".reserve");
        let reserve = PathBuf::from(name);
        let bytes = usage(db).map_or(RESERVE_MIN, |u| {
            (u.total / 32).clamp(RESERVE_MIN, RESERVE_MAX)
        });
        let len = std::fs::metadata(&reserve).map_or(0, |m| m.len());
        Space {
            db: db.to_path_buf(),
            reserve,
            bytes,
            len,
        }
    }

    /// The reserve's size.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the reserve is on disk in full.
    pub fn held(&self) -> bool {
        self.len >= self.bytes
    }

    /// The reserve's length on disk now.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// WAL bytes after which a checkpoint is due: half the reserve.
    pub fn checkpoint_bytes(&self) -> u64 {
        (self.bytes / 2).min(CHECKPOINT_MAX)
    }

    /// Free bytes on the filesystem (0 when it cannot be asked).
    pub fn free(&self) -> u64 {
        usage(&self.db).map_or(0, |u| u.free)
    }

    /// What the store may fill on its filesystem: what is free plus what its file
    /// (`file_bytes`, with the WAL) already takes, less the reserve and the WAL the
    /// store lets grow.
    pub fn room(&self, file_bytes: u64) -> u64 {
        (self.free() + file_bytes + self.len).saturating_sub(self.bytes + self.checkpoint_bytes())
    }

    /// Deletes the reserve, for the checkpoint and deletes of a full filesystem.
    /// Returns whether that freed anything.
    pub fn release(&mut self) -> bool {
        let existed = std::fs::remove_file(&self.reserve).is_ok();
        let had = std::mem::take(&mut self.len) > 0;
        existed || had
    }

    /// Completes the reserve when the filesystem has room for it twice over. Returns
    /// whether the reserve is held in full afterwards.
    pub fn restore(&mut self) -> bool {
        if self.held() {
            return true;
        }
        let missing = self.bytes - self.len;
        // A filesystem that cannot be asked: the write itself finds out.
        let free = usage(&self.db).map_or(u64::MAX, |u| u.free);
        if free < missing + self.bytes {
            return false;
        }
        self.grow(missing);
        self.held()
    }

    /// While the disk is full: takes what came free back into the reserve (up to its
    /// size, leaving [`TOP_UP_MARGIN`] free).
    pub fn top_up(&mut self) {
        let room = self.free().saturating_sub(TOP_UP_MARGIN);
        let missing = self.bytes.saturating_sub(self.len);
        if room > 0 && missing > 0 {
            self.grow(room.min(missing));
        }
    }

    /// Appends `bytes` zeros to the reserve (synced); on a failure, what was written
    /// stays, and its length is taken from the file.
    fn grow(&mut self, bytes: u64) {
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(crate::files::PRIVATE_MODE)
                .open(&self.reserve)?;
            let block = vec![0u8; 64 << 10];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                file.write_all(&block[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        })();
        if let Err(error) = result {
            tracing::debug!(%error, path = %self.reserve.display(), "reserve not written in full");
        }
        self.len = std::fs::metadata(&self.reserve).map_or(0, |m| m.len());
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn a_relative_file_name_is_asked_about_the_current_directory() {
        let usage = usage(Path::new("queue.db")).expect("statvfs of the current directory");
        assert!(usage.total > 0 && usage.free <= usage.total, "{usage:?}");
    }

    #[test]
    fn the_reserve_is_written_released_and_topped_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut space = Space::new(&dir.path().join("q.db"));
        assert!((RESERVE_MIN..=RESERVE_MAX).contains(&space.bytes()));
        assert!(space.restore(), "a temp dir has room for the reserve");
        assert_eq!(
            std::fs::metadata(dir.path().join("q.db.reserve"))
                .map(|m| m.len())
                .ok(),
            Some(space.bytes())
        );
        assert!(space.release());
        assert!(!space.release(), "released once");
        space.top_up();
        assert!(space.held(), "what is free is taken back");
    }
}

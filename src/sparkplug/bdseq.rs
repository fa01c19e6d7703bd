//! The birth/death sequence number kept across restarts: a small file next to the queue
//! holding the `bdSeq` of the last connection attempt, as decimal text.
//!
//! Invariants:
//! - [`BdSeqFile::advance`] writes the new number before the CONNECT that carries it
//!   goes out, so after a kill -9 the next connection never reuses the number of the
//!   death certificate the broker is about to publish.
//! - The file is created 0640 ([`crate::files::create_private`]) and replaced by rename,
//!   so a crash leaves the old number or the new one, never a torn file.
//! - A missing file starts at 0; an unreadable or garbled one is an error the caller
//!   logs, and counting goes on from the number in memory.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::Error;

/// Where the `bdSeq` lives.
#[derive(Debug, Clone)]
pub struct BdSeqFile {
    path: PathBuf,
}

impl BdSeqFile {
    /// The file beside the queue at `queue`: `{queue}.bdseq`.
    pub fn beside(queue: &Path) -> BdSeqFile {
        let mut name = queue.file_name().unwrap_or_default().to_os_string();
        name.push(".bdseq");
        BdSeqFile {
            path: queue.with_file_name(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `bdSeq` of the last connection attempt, `None` when there was none.
    ///
    /// # Errors
    /// [`Error::BdSeq`] when the file exists but cannot be read or holds no number
    /// from 0 to 255.
    pub fn load(&self) -> Result<Option<u8>, Error> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.error(source)),
        };
        text.trim().parse::<u8>().map(Some).map_err(|_| {
            self.error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{:?} is not a number from 0 to 255", text.trim()),
            ))
        })
    }

    /// The `bdSeq` after `last` (255 wraps to 0; no previous attempt gives 0), written
    /// to the file before it is returned.
    ///
    /// # Errors
    /// [`Error::BdSeq`] when it cannot be written; the number is still the one to use.
    pub fn advance(&self, last: Option<u8>) -> (u8, Result<(), Error>) {
        let next = last.map_or(0, |n| n.wrapping_add(1));
        (next, self.store(next))
    }

    fn store(&self, value: u8) -> Result<(), Error> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            crate::files::create_private(&tmp)?;
            let mut file = std::fs::OpenOptions::new().write(true).open(&tmp)?;
            writeln!(file, "{value}")?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|source| self.error(source))
    }

    fn error(&self, source: std::io::Error) -> Error {
        Error::BdSeq {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_number_survives_a_restart_and_wraps_after_255() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = BdSeqFile::beside(&dir.path().join("queue.db"));
        assert_eq!(file.path(), dir.path().join("queue.db.bdseq"));
        assert_eq!(file.load().expect("no file yet"), None);
        let (first, written) = file.advance(None);
        written.expect("written");
        assert_eq!(first, 0);
        let again = BdSeqFile::beside(&dir.path().join("queue.db"));
        assert_eq!(again.load().expect("load"), Some(0));
        assert_eq!(again.advance(Some(254)).0, 255);
        assert_eq!(again.advance(Some(255)).0, 0);
        let mode = std::fs::metadata(file.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640, "{mode:o}");
    }

    #[test]
    fn a_garbled_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = BdSeqFile::beside(&dir.path().join("q.db"));
        std::fs::write(file.path(), "banana").expect("write");
        let err = file.load().expect_err("garbled");
        assert!(err.to_string().contains("q.db.bdseq"), "{err}");
        assert!(err.to_string().contains("banana"), "{err}");
    }
}

//! Files on the gateway: the private mode of what the agent creates, who may read what,
//! and in words why a file cannot be read.
//!
//! Invariants:
//! - A file the agent creates for its own data (the queue, the broker database, a new
//!   password file) starts as 0640 or tighter whatever the process umask is
//!   ([`create_private`], [`PRIVATE_MODE`]): SQLite would otherwise create it 0644 and its
//!   `-wal`/`-shm` files copy the database's mode.
//! - [`why_denied`] names the path component that refuses access (the file, or the
//!   directory above it that cannot be searched) with its owner, group and mode, and says
//!   who may read it; it reads only metadata and `/etc/passwd`, `/etc/group`.
//! - [`host_name`] is the one place the machine's host name is read.
//! - This module is a leaf: it imports nothing from the crate.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The machine's host name (`/proc/sys/kernel/hostname`, else `/etc/hostname`), trimmed;
/// `None` when neither can be read or it is empty. Callers choose their fallback.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
}

/// Mode of files created for the agent's data: the owner writes, the group reads.
pub const PRIVATE_MODE: u32 = 0o640;

/// Creates `path` empty with [`PRIVATE_MODE`] if it does not exist yet; an existing file
/// is left as it is (its owner may have chosen its mode).
///
/// # Errors
/// When the file does not exist and cannot be created.
pub fn create_private(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_MODE)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(err),
    }
}

/// One line of `/etc/passwd`: what `--as-user` and messages need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
}

/// The account named `name`, from `/etc/passwd`.
pub fn user(name: &str) -> Option<User> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [user, _, uid, gid, ..] if *user == name => Some(User {
                name: name.to_string(),
                uid: uid.parse().ok()?,
                gid: gid.parse().ok()?,
            }),
            _ => None,
        }
    })
}

/// The name of user `uid`, or the number.
pub fn user_name(uid: u32) -> String {
    id_name("/etc/passwd", uid)
}

/// The name of group `gid`, or the number.
pub fn group_name(gid: u32) -> String {
    id_name("/etc/group", gid)
}

/// The name whose third field is `id` in a passwd-format file, or the number.
fn id_name(file: &str, id: u32) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let found: u32 = fields.nth(1)?.parse().ok()?;
                (found == id).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| id.to_string())
}

/// The effective user id of this process (from `/proc/self/status`), if readable.
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Why `path` cannot be read, for a permission error: which file or directory refuses,
/// its owner, group and mode, who may read it and what to do. `None` when no component
/// of the path can be examined.
pub fn why_denied(path: &Path) -> Option<String> {
    let (refusing, meta) = refusing_component(path)?;
    let is_dir = meta.is_dir();
    let mode = meta.mode() & 0o7777;
    let owner = user_name(meta.uid());
    let group = group_name(meta.gid());
    let what = if refusing == path {
        format!("{} is {owner}:{group} {mode:04o}", refusing.display())
    } else {
        format!(
            "its directory {} is {owner}:{group} {mode:04o}",
            refusing.display()
        )
    };
    // Reading a file needs r; passing a directory needs x.
    let (others, group_bit) = if is_dir {
        (0o001, 0o010)
    } else {
        (0o004, 0o040)
    };
    let advice = if mode & others != 0 {
        "it should be readable by everyone; check the directories above it".to_string()
    } else if mode & group_bit != 0 && group != owner {
        format!(
            "readable by {owner} and the {group} group only: run it with sudo, or join the \
             group (sudo adduser $USER {group}, then log in again)"
        )
    } else {
        format!("readable by {owner} only: run it with sudo")
    };
    Some(format!("{what}, {advice}"))
}

/// The component of `path` that refuses access: the file itself when its metadata can
/// be read, else the nearest ancestor whose metadata can (the one that cannot be
/// searched).
fn refusing_component(path: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    let mut at = Some(path);
    while let Some(candidate) = at {
        let probe = if candidate.as_os_str().is_empty() {
            Path::new(".")
        } else {
            candidate
        };
        if let Ok(meta) = std::fs::metadata(probe) {
            return Some((probe.to_path_buf(), meta));
        }
        at = candidate.parent();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_private_makes_0640_and_leaves_existing_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        create_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !PRIVATE_MODE, 0, "{mode:o} is wider than 0640");
        std::fs::write(&path, b"data").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        create_private(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn ids_have_names() {
        assert_eq!(user_name(0), "root");
        assert_eq!(group_name(0), "root");
        assert_eq!(user("root").map(|u| (u.uid, u.gid)), Some((0, 0)));
        assert_eq!(user("no-such-user-here"), None);
        assert_eq!(group_name(4_000_000_000), "4000000000");
    }

    #[test]
    fn why_denied_names_the_file_its_group_and_the_way_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let text = why_denied(&path).unwrap();
        assert!(
            text.starts_with(&format!("{} is ", path.display())),
            "{text}"
        );
        assert!(text.contains("0640"), "{text}");
        let (owner, group) = (user_name(meta.uid()), group_name(meta.gid()));
        if owner == group {
            assert!(text.contains("only: run it with sudo"), "{text}");
        } else {
            assert!(text.contains(&format!("the {group} group")), "{text}");
        }
        // A file below a directory that cannot be searched: the directory is named.
        let hidden = dir.path().join("sub/cert.pem");
        let text = why_denied(&hidden).unwrap();
        assert!(
            text.starts_with(&format!("its directory {}", dir.path().display())),
            "{text}"
        );
    }
}

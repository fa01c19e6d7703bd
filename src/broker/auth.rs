//! Authentication and authorisation: mosquitto's password file and ACL file, and the
//! protected sensor topic trees of the agent.
//!
//! Formats (as read by mosquitto 2.0):
//! - Password file: `user:$7$<iterations>$<salt b64>$<hash b64>` (PBKDF2-HMAC-SHA512, as
//!   written by `mosquitto_passwd`) or `user:$6$<salt b64>$<hash b64>` (SHA-512 of the
//!   password followed by the salt). Blank lines and `#` comments are skipped.
//! - ACL file: `topic [read|write|readwrite|deny] <topic>` lines before any `user` line
//!   apply to anonymous clients; after `user <name>` they apply to that user;
//!   `pattern [access] <topic>` lines apply to every client, with `%c` replaced by the
//!   client id and `%u` by the user name. Access defaults to `readwrite`.
//!
//! Invariants:
//! - With an ACL file, everything not granted is denied; a `deny` rule wins over grants.
//! - A subscription is granted when a readable ACL topic covers the whole filter
//!   (`sensors/#` covers `sensors/+/temp`, `sensors/a` does not cover `sensors/#`).
//! - Publishing into a protected prefix needs a write grant from the ACL file; without an
//!   ACL file nobody on the network may publish there. The in-process publish of the
//!   agent is not checked here.
//! - A pattern whose `%c`/`%u` value holds `/`, `+` or `#` never matches, so a client
//!   cannot widen its own grant by choosing its id.
//! - Secrets are compared in constant time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha2::{Digest, Sha512};

use crate::mqtt::topic;

/// Iterations `mosquitto_passwd` uses for `$7$` lines.
const PBKDF2_ITERATIONS: u32 = 101;
/// Salt length `mosquitto_passwd` uses.
const SALT_LEN: usize = 12;
/// Upper bound on iterations accepted from a file, so one line cannot stall connects.
const MAX_ITERATIONS: u32 = 1_000_000;

/// A password or ACL file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`set_password`] did to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswdChange {
    Added,
    Updated,
}

/// Adds `username` to the password file at `path`, or replaces its line, as
/// `mosquitto_passwd` does: through a temporary file in the same directory and a rename,
/// so a reader never sees half a file.
///
/// The service reads this file as its own user, so its access is kept: an existing file
/// keeps its owner, group and mode (a symbolic link is followed, the link stays); a new
/// file is created 0640 with the group of its directory (`/etc/fieldbridge` is
/// `root:fieldbridge`), or the caller's group where the caller may not give it that one.
///
/// # Errors
/// [`AuthError::Read`] when the existing file cannot be read, [`AuthError::Write`] when
/// the new one cannot be written or the owner cannot be kept.
pub fn set_password(
    path: &Path,
    username: &str,
    password: &str,
) -> Result<PasswdChange, AuthError> {
    let target = match std::fs::canonicalize(path) {
        Ok(target) => target,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => path.to_owned(),
        Err(source) => {
            return Err(AuthError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let existing = match std::fs::read_to_string(&target) {
        Ok(text) => Some(text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(AuthError::Read {
                path: target,
                source,
            })
        }
    };
    let line = passwd_line(username, password);
    let mut change = PasswdChange::Added;
    let mut text = String::new();
    for old in existing.as_deref().unwrap_or_default().lines() {
        if old.split(':').next() == Some(username) {
            text.push_str(&line);
            change = PasswdChange::Updated;
        } else {
            text.push_str(old);
        }
        text.push('\n');
    }
    if change == PasswdChange::Added {
        text.push_str(&line);
        text.push('\n');
    }
    replace_keeping_access(&target, existing.is_some(), &text).map_err(|source| {
        AuthError::Write {
            path: target.clone(),
            source,
        }
    })?;
    Ok(change)
}

/// Writes `text` to `target` through a temporary file and a rename, with the owner,
/// group and mode of the file it replaces, or [`crate::files::PRIVATE_MODE`] and the
/// directory's group for a new file.
fn replace_keeping_access(target: &Path, exists: bool, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        // Private until owner, group and mode are right.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        let mine = file.metadata()?;
        let (uid, gid, mode) = if exists {
            let old = std::fs::metadata(target)?;
            (old.uid(), old.gid(), old.mode() & 0o7777)
        } else {
            let dir_gid = std::fs::metadata(&dir)?.gid();
            (mine.uid(), dir_gid, crate::files::PRIVATE_MODE)
        };
        if (uid, gid) != (mine.uid(), mine.gid()) {
            match std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                Ok(()) => {}
                // A new file in a directory of a group the caller is not in (/tmp) keeps
                // the caller's group.
                Err(err) if !exists && err.kind() == std::io::ErrorKind::PermissionDenied => {}
                Err(err) => return Err(err),
            }
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, target)?;
        // The rename is durable once the directory is.
        std::fs::File::open(&dir)?.sync_all()
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A mosquitto password file line for `username` with a fresh random salt, in the
/// `$7$` (PBKDF2-SHA512) format `mosquitto_passwd` writes.
///
/// # Panics
/// When the operating system has no random source.
pub fn passwd_line(username: &str, password: &str) -> String {
    let mut salt = [0u8; SALT_LEN];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut salt)
        .expect("the operating system provides random bytes");
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), &salt, PBKDF2_ITERATIONS, &mut hash);
    format!(
        "{username}:$7${PBKDF2_ITERATIONS}${}${}",
        B64.encode(salt),
        B64.encode(hash)
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        let fields: Vec<&str> = text.split('$').collect();
        let b64 = |s: &str| B64.decode(s).map_err(|e| format!("bad base64 ({e})"));
        match fields.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .map_err(|_| format!("bad iteration count `{iterations}`"))?;
                if iterations == 0 || iterations > MAX_ITERATIONS {
                    return Err(format!("iteration count {iterations} out of range"));
                }
                let hash = b64(hash)?;
                if hash.is_empty() || hash.len() > 64 {
                    return Err("hash must be 1 to 64 bytes".into());
                }
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt: b64(salt)?,
                    hash,
                })
            }
            ["", "6", salt, hash] => {
                let hash = b64(hash)?;
                if hash.len() != 64 {
                    return Err("a $6$ hash must be 64 bytes".into());
                }
                Ok(Hash::Sha512 {
                    salt: b64(salt)?,
                    hash,
                })
            }
            _ => Err(
                "expected a `$7$` or `$6$` hash (use mosquitto_passwd or `fieldbridge passwd`)"
                    .into(),
            ),
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; 64];
                let out = &mut out[..hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, out);
                constant_time_eq(out, hash)
            }
            Hash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                constant_time_eq(&digest.finalize(), hash)
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The users of a password file.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

impl PasswordFile {
    /// Reads and parses a password file.
    ///
    /// # Errors
    /// When the file cannot be read or a line is not a known hash format.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = read(path)?;
        PasswordFile::parse(&text).map_err(|(line, message)| AuthError::Syntax {
            path: path.to_owned(),
            line,
            message,
        })
    }

    pub(crate) fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| (n + 1, "expected `user:hash`".to_string()))?;
            let hash = Hash::parse(hash.trim()).map_err(|m| (n + 1, m))?;
            users.insert(user.to_string(), hash);
        }
        Ok(PasswordFile { users })
    }

    /// Whether `password` is the password of `username`.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        self.users
            .get(username)
            .is_some_and(|hash| hash.verify(password))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    topic: String,
}

/// The rules of an ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// Who is asking, for ACL checks.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
}

impl Acl {
    /// Reads and parses an ACL file.
    ///
    /// # Errors
    /// When the file cannot be read or a line is not understood.
    pub fn load(path: &Path) -> Result<Acl, AuthError> {
        let text = read(path)?;
        Acl::parse(&text).map_err(|(line, message)| AuthError::Syntax {
            path: path.to_owned(),
            line,
            message,
        })
    }

    pub(crate) fn parse(text: &str) -> Result<Acl, (usize, String)> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |m: &str| (n + 1, m.to_string());
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name"));
                    }
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (first, after) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
                    let (access, topic) = match first {
                        "read" => (Access::Read, after),
                        "write" => (Access::Write, after),
                        "readwrite" => (Access::ReadWrite, after),
                        "deny" => (Access::Deny, after),
                        _ => (Access::ReadWrite, rest),
                    };
                    let topic = topic.trim();
                    if topic.is_empty() {
                        return Err(err("missing topic"));
                    }
                    if topic::validate_topic_filter(topic).is_err() {
                        return Err(err("not a valid topic filter"));
                    }
                    let rule = Rule {
                        access,
                        topic: topic.to_string(),
                    };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(user)) => acl.users.entry(user.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                _ => return Err(err("expected `user`, `topic` or `pattern`")),
            }
        }
        Ok(acl)
    }

    /// Calls `f` with every rule that applies to `who`, patterns substituted; stops when
    /// `f` returns `Some`.
    fn scan<T>(
        &self,
        who: Identity<'_>,
        mut f: impl FnMut(Access, &str) -> Option<T>,
    ) -> Option<T> {
        let own = match who.username {
            Some(user) => self.users.get(user).map(Vec::as_slice).unwrap_or(&[]),
            None => &self.anonymous,
        };
        for rule in own {
            if let Some(found) = f(rule.access, &rule.topic) {
                return Some(found);
            }
        }
        for rule in &self.patterns {
            if let Some(topic) = substitute(&rule.topic, who) {
                if let Some(found) = f(rule.access, &topic) {
                    return Some(found);
                }
            }
        }
        None
    }

    /// Whether `who` may publish to `topic`.
    pub fn can_publish(&self, who: Identity<'_>, topic: &str) -> bool {
        let denied = self.scan(who, |access, filter| {
            (access == Access::Deny && topic::matches(filter, topic)).then_some(())
        });
        denied.is_none()
            && self
                .scan(who, |access, filter| {
                    (access.writes() && topic::matches(filter, topic)).then_some(())
                })
                .is_some()
    }

    /// Whether `who` may subscribe to `filter`.
    pub fn can_subscribe(&self, who: Identity<'_>, filter: &str) -> bool {
        let denied = self.scan(who, |access, rule| {
            (access == Access::Deny && covers(rule, filter)).then_some(())
        });
        denied.is_none()
            && self
                .scan(who, |access, rule| {
                    (access.reads() && covers(rule, filter)).then_some(())
                })
                .is_some()
    }
}

/// `%c` and `%u` replaced, or `None` when a value would change the topic's structure
/// (or the client has no user name and the pattern needs one).
fn substitute(pattern: &str, who: Identity<'_>) -> Option<String> {
    if !pattern.contains('%') {
        return Some(pattern.to_string());
    }
    let unsafe_value = |v: &str| v.contains(['/', '+', '#']);
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let value = match rest.as_bytes().get(at + 1) {
            Some(b'c') => who.client_id,
            Some(b'u') => who.username?,
            _ => {
                out.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        };
        if unsafe_value(value) {
            return None;
        }
        out.push_str(value);
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    Some(out)
}

/// Whether every topic matched by `filter` is also matched by `rule`.
fn covers(rule: &str, filter: &str) -> bool {
    let mut rule_levels = rule.split('/');
    let mut filter_levels = filter.split('/');
    loop {
        match (rule_levels.next(), filter_levels.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(r), Some(f)) if r == f && f != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn read(path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Why a CONNECT or a PUBLISH/SUBSCRIBE is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No or wrong credentials.
    BadCredentials,
    /// Credentials fine, access not granted.
    NotAuthorized,
}

/// Everything needed to decide access; swapped as a whole on reload.
#[derive(Debug, Default)]
pub struct Policy {
    pub passwords: Option<PasswordFile>,
    pub acl: Option<Acl>,
    pub anonymous_allowed: bool,
    /// Topic trees only the agent (or an ACL write grant) may publish into.
    pub protected: Vec<String>,
}

impl Policy {
    /// Reads the files named in the configuration.
    ///
    /// # Errors
    /// When a file cannot be read or parsed.
    pub fn load(
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
        anonymous_allowed: bool,
        protected: Vec<String>,
    ) -> Result<Policy, AuthError> {
        Ok(Policy {
            passwords: password_file.map(PasswordFile::load).transpose()?,
            acl: acl_file.map(Acl::load).transpose()?,
            anonymous_allowed,
            protected,
        })
    }

    /// Checks CONNECT credentials.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        match (username, &self.passwords) {
            (None, _) if self.anonymous_allowed => Ok(()),
            (None, _) => Err(Refusal::NotAuthorized),
            (Some(user), Some(passwords)) => {
                if passwords.verify(user, password.unwrap_or_default()) {
                    Ok(())
                } else {
                    Err(Refusal::BadCredentials)
                }
            }
            // A user name with no password file to check it against: mosquitto treats the
            // client as anonymous.
            (Some(_), None) if self.anonymous_allowed => Ok(()),
            (Some(_), None) => Err(Refusal::NotAuthorized),
        }
    }

    /// Whether credentials that `before` admitted still hold under this policy, for a
    /// client already connected. The password is not kept after CONNECT, so a user
    /// checked against a password file holds only while the file has the very same
    /// line for them: a removed user or a changed password does not.
    pub fn readmits(&self, before: &Policy, username: Option<&str>) -> bool {
        match (username, &before.passwords, &self.passwords) {
            (Some(user), Some(old), Some(new)) => {
                let line = old.users.get(user);
                line.is_some() && line == new.users.get(user)
            }
            // Admitted without a password check, and there is a file to check against
            // now.
            (Some(_), None, Some(_)) => false,
            (None, _, _) | (Some(_), _, None) => self.anonymous_allowed,
        }
    }

    /// Whether publishing needs a check at all (saves work on every PUBLISH).
    pub fn restricts_publish(&self) -> bool {
        self.acl.is_some() || !self.protected.is_empty()
    }

    /// Whether `who` may publish to `topic`.
    pub fn can_publish(&self, who: Identity<'_>, topic: &str) -> bool {
        match &self.acl {
            Some(acl) => acl.can_publish(who, topic),
            None => !self.is_protected(topic),
        }
    }

    /// Whether `who` may subscribe to `filter` (the `$share/group/` part removed).
    pub fn can_subscribe(&self, who: Identity<'_>, filter: &str) -> bool {
        self.acl
            .as_ref()
            .map_or(true, |acl| acl.can_subscribe(who, filter))
    }

    fn is_protected(&self, topic: &str) -> bool {
        self.protected.iter().any(|prefix| {
            topic.starts_with(prefix.as_str())
                && matches!(topic.as_bytes().get(prefix.len()), None | Some(b'/'))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd -b pw alice secret` (mosquitto 2.0.11).
    const MOSQUITTO_LINE: &str = "alice:$7$101$jB5CpdSHi6OHkVwd$nrbRJbVZPSRDJADRzwsy0eYq3N1m/nwMaafGwD/sMFOzQcHq+cOvJIedB2lXLOdKqs4sW+bba30WjeC7opuAGA==";

    fn who<'a>(client_id: &'a str, username: Option<&'a str>) -> Identity<'a> {
        Identity {
            client_id,
            username,
        }
    }

    #[test]
    fn reads_mosquitto_passwd_pbkdf2_lines() {
        let file = PasswordFile::parse(&format!("# users\n\n{MOSQUITTO_LINE}\n")).unwrap();
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"Secret"));
        assert!(!file.verify("bob", b"secret"));
    }

    #[test]
    fn reads_sha512_lines() {
        let salt = b"0123456789ab";
        let mut digest = Sha512::new();
        digest.update(b"pw");
        digest.update(salt);
        let line = format!(
            "bob:$6${}${}",
            B64.encode(salt),
            B64.encode(digest.finalize())
        );
        let file = PasswordFile::parse(&line).unwrap();
        assert!(file.verify("bob", b"pw"));
        assert!(!file.verify("bob", b"pw2"));
    }

    #[test]
    fn passwd_line_round_trips_with_fresh_salts() {
        let a = passwd_line("carol", "hunter2");
        let b = passwd_line("carol", "hunter2");
        assert_ne!(a, b, "salts differ");
        assert!(a.starts_with("carol:$7$101$"));
        let file = PasswordFile::parse(&a).unwrap();
        assert!(file.verify("carol", b"hunter2"));
        assert!(!file.verify("carol", b"hunter3"));
    }

    #[test]
    fn bad_password_lines_name_their_line() {
        let err = PasswordFile::parse("alice:$7$101$AAAA$AAAA\nbob:plaintext\n").unwrap_err();
        assert_eq!(err.0, 2);
        assert!(PasswordFile::parse("no colon here").is_err());
        assert!(PasswordFile::parse("a:$7$0$AAAA$AAAA").is_err());
    }

    const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic sensors/#
topic deny sensors/secret/#
topic write cmd/alice

user bob
topic read sensors/+/temp

pattern write clients/%c/status
pattern read users/%u/#
";

    #[test]
    fn acl_grants_by_user_and_pattern() {
        let acl = Acl::parse(ACL).unwrap();
        let alice = who("a1", Some("alice"));
        let bob = who("b1", Some("bob"));
        let anon = who("x", None);

        assert!(acl.can_publish(alice, "sensors/gw/temp"));
        assert!(!acl.can_publish(alice, "sensors/secret/key"), "deny wins");
        assert!(acl.can_publish(alice, "cmd/alice"));
        assert!(!acl.can_subscribe(alice, "cmd/alice"), "write only");
        assert!(acl.can_subscribe(alice, "sensors/+/temp"));

        assert!(!acl.can_publish(bob, "sensors/gw/temp"));
        assert!(acl.can_subscribe(bob, "sensors/gw/temp"));
        assert!(acl.can_subscribe(bob, "sensors/+/temp"));
        assert!(!acl.can_subscribe(bob, "sensors/#"), "wider than the grant");

        assert!(acl.can_subscribe(anon, "public/#"));
        assert!(!acl.can_subscribe(anon, "sensors/#"));
        assert!(!acl.can_publish(anon, "public/x"));

        assert!(acl.can_publish(bob, "clients/b1/status"));
        assert!(!acl.can_publish(bob, "clients/a1/status"));
        assert!(acl.can_subscribe(bob, "users/bob/#"));
        assert!(
            !acl.can_subscribe(anon, "users/+/x"),
            "%u never matches anonymous"
        );
    }

    #[test]
    fn client_ids_with_wildcards_do_not_widen_patterns() {
        let acl = Acl::parse("pattern write clients/%c/status").unwrap();
        assert!(!acl.can_publish(who("+", None), "clients/x/status"));
        assert!(!acl.can_publish(who("a/b", None), "clients/a/b/status"));
    }

    #[test]
    fn bad_acl_lines_name_their_line() {
        assert_eq!(Acl::parse("user a\ntopic read\n").unwrap_err().0, 2);
        assert_eq!(Acl::parse("topik a\n").unwrap_err().0, 1);
        assert_eq!(Acl::parse("topic read a/#/b\n").unwrap_err().0, 1);
    }

    #[test]
    fn covers_compares_filters_level_by_level() {
        assert!(covers("#", "a/b/#"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/+"));
        assert!(covers("a/+/c", "a/b/c"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/b/c"));
    }

    #[test]
    fn protected_prefixes_refuse_lan_publishers_without_a_grant() {
        let policy = Policy {
            protected: vec!["fieldbridge/gw1".into()],
            anonymous_allowed: true,
            ..Policy::default()
        };
        let anon = who("x", None);
        assert!(policy.restricts_publish());
        assert!(!policy.can_publish(anon, "fieldbridge/gw1"));
        assert!(!policy.can_publish(anon, "fieldbridge/gw1/temp"));
        assert!(policy.can_publish(anon, "fieldbridge/gw10/temp"));
        assert!(policy.can_subscribe(anon, "fieldbridge/gw1/#"));

        let granted = Policy {
            acl: Some(Acl::parse("topic readwrite fieldbridge/#").unwrap()),
            ..policy
        };
        assert!(granted.can_publish(anon, "fieldbridge/gw1/temp"));
    }

    #[test]
    fn a_reload_readmits_only_unchanged_password_lines() {
        let bob = passwd_line("bob", "builder");
        let with = |lines: &str| Policy {
            passwords: Some(PasswordFile::parse(lines).unwrap()),
            ..Policy::default()
        };
        let before = with(&format!("{MOSQUITTO_LINE}\n{bob}\n"));
        let after = with(&bob);
        assert!(after.readmits(&before, Some("bob")));
        assert!(!after.readmits(&before, Some("alice")), "removed");
        assert!(
            !with(&passwd_line("bob", "builder")).readmits(&before, Some("bob")),
            "new line"
        );
        assert!(
            !after.readmits(&before, None),
            "anonymous is still not allowed"
        );
        let open = Policy {
            anonymous_allowed: true,
            ..Policy::default()
        };
        assert!(
            !after.readmits(&open, Some("bob")),
            "now checked against a file"
        );
        assert!(
            open.readmits(&before, Some("bob")),
            "no file: anonymous with a name"
        );
    }

    #[test]
    fn authentication_follows_the_anonymous_rule() {
        let mut policy = Policy {
            passwords: Some(PasswordFile::parse(MOSQUITTO_LINE).unwrap()),
            ..Policy::default()
        };
        assert_eq!(policy.authenticate(None, None), Err(Refusal::NotAuthorized));
        assert_eq!(
            policy.authenticate(Some("alice"), Some(b"nope")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(policy.authenticate(Some("alice"), Some(b"secret")), Ok(()));
        policy.anonymous_allowed = true;
        assert_eq!(policy.authenticate(None, None), Ok(()));
    }
}

//! The store layer's one error type.
//!
//! Invariant: an error never swallows a payload: a closed queue hands an append its batch
//! back ([`Error::Closed`]), and a dropped batch says how many rows and why.

use std::path::PathBuf;

use super::message::Message;
use super::stats::DropReason;

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: database format version {found} is newer than this build supports ({supported})"
    )]
    NewerFormat {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("database integrity check failed: {0}")]
    Corrupt(String),
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The queue was closed; an `append` gets its batch back here.
    #[error("the store is closed ({} messages not stored)", .0.len())]
    Closed(Vec<Message>),
    /// A whole appended batch was dropped before it could be stored.
    #[error("{rows} messages dropped before they were stored ({reason})")]
    Dropped { rows: usize, reason: DropReason },
}

//! The TOML configuration schema (composition and file handling: see issue 7).
//!
//! Each module owns the config struct of its section and validates it; validation
//! problems are reported as [`Invalid`] with the dotted key path, which this module
//! turns into `file:line:column` by looking the key up in the parsed document.

/// One semantic problem in a config section, found after deserialization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted path from the document root, with array indexes:
    /// `bus[0].device[2].unit_id`, `upstream.url`, `profile.sdm630.point[3].address`.
    pub key: String,
    /// What is wrong, in words for a plant engineer.
    pub message: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

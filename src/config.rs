//! The TOML configuration schema (see issue 7).

//! Topic names, topic filters and matching (placeholder signatures; see issue 2).

/// Whether `filter` matches `topic`. `$`-topics are not matched by a leading wildcard.
pub fn matches(_filter: &str, _topic: &str) -> bool {
    todo!("issue 2")
}

//! Topic names, topic filters, shared subscriptions and matching.
//!
//! Invariants:
//! - A valid topic name is 1..=65535 bytes of UTF-8 with no U+0000 and no `+` or `#`.
//! - A valid topic filter is 1..=65535 bytes of UTF-8 with no U+0000, where `#` is only
//!   ever a whole last level and `+` only ever a whole level. A `$share/{group}/{filter}`
//!   filter additionally needs a non-empty group without wildcards and a valid `filter`.
//! - [`matches()`] takes a plain filter (the broker strips the `$share/{group}/` part with
//!   [`parse_shared`] first). A topic starting with `$` is never matched by a filter whose
//!   first level is a wildcard.

use super::wire::Error;

/// Longest UTF-8 string MQTT can carry (a two-byte length prefix).
const MAX_STRING_LEN: usize = 65_535;

/// The prefix of a v5 shared subscription filter.
const SHARE_PREFIX: &str = "$share/";

/// A `$share/{group}/{filter}` subscription split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: &'a str,
}

/// Splits a shared subscription filter. `None` when `filter` is not a shared filter or
/// its group or filter part is missing; [`validate_topic_filter`] rejects the latter.
pub fn parse_shared(filter: &str) -> Option<SharedFilter<'_>> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    let (group, filter) = rest.split_once('/')?;
    if group.is_empty() || filter.is_empty() {
        return None;
    }
    Some(SharedFilter { group, filter })
}

/// Checks a topic name as used in PUBLISH and in a will.
///
/// # Errors
/// [`Error::EmptyTopicName`], [`Error::StringTooLong`], [`Error::NullCharacter`] or
/// [`Error::WildcardInTopicName`].
pub fn validate_topic_name(topic: &str) -> Result<(), Error> {
    if topic.is_empty() {
        return Err(Error::EmptyTopicName);
    }
    if topic.len() > MAX_STRING_LEN {
        return Err(Error::StringTooLong(topic.len()));
    }
    check_name_bytes(topic.as_bytes())
}

/// The byte checks of a topic name, shared with the decoder (which has already checked
/// the length and UTF-8).
pub(crate) fn check_name_bytes(topic: &[u8]) -> Result<(), Error> {
    // Every PUBLISH in and out scans its topic: memchr does it with SIMD.
    match memchr::memchr3(b'+', b'#', 0, topic).map(|i| topic[i]) {
        None => Ok(()),
        Some(0) => Err(Error::NullCharacter),
        Some(_) => Err(Error::WildcardInTopicName),
    }
}

/// Checks a topic filter as used in SUBSCRIBE and UNSUBSCRIBE, including the
/// `$share/{group}/{filter}` form.
///
/// # Errors
/// [`Error::InvalidTopicFilter`] naming the rule that is broken, [`Error::StringTooLong`]
/// or [`Error::NullCharacter`].
pub fn validate_topic_filter(filter: &str) -> Result<(), Error> {
    if filter.len() > MAX_STRING_LEN {
        return Err(Error::StringTooLong(filter.len()));
    }
    if filter.as_bytes().contains(&0) {
        return Err(Error::NullCharacter);
    }
    if let Some(rest) = filter.strip_prefix(SHARE_PREFIX) {
        let Some((group, inner)) = rest.split_once('/') else {
            return Err(Error::InvalidTopicFilter(
                "shared subscription without a filter",
            ));
        };
        if group.is_empty() {
            return Err(Error::InvalidTopicFilter(
                "shared subscription with an empty group",
            ));
        }
        if group.contains(['+', '#']) {
            return Err(Error::InvalidTopicFilter(
                "wildcard in a shared subscription group",
            ));
        }
        return check_filter_levels(inner);
    }
    check_filter_levels(filter)
}

fn check_filter_levels(filter: &str) -> Result<(), Error> {
    if filter.is_empty() {
        return Err(Error::InvalidTopicFilter("empty filter"));
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(Error::InvalidTopicFilter("`#` is not the whole last level"));
        }
        if level.contains('+') && level != "+" {
            return Err(Error::InvalidTopicFilter("`+` is not a whole level"));
        }
    }
    Ok(())
}

/// Splits a topic name or filter into its first level and the rest after the first `/`
/// (`None` at the last level). The broker's subscription tree and retained store walk
/// their levels with it.
#[inline]
pub fn split_level(topic: &str) -> (&str, Option<&str>) {
    match topic.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (topic, None),
    }
}

/// Whether `filter` matches `topic`. `$`-topics are not matched by a leading wildcard.
///
/// Both arguments are assumed valid (see [`validate_topic_filter`] and
/// [`validate_topic_name`]); `filter` is the plain filter of a shared subscription.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `#` also matches the parent level: `a/#` matches `a`.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_levels() {
        assert!(matches("a/b/c", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/+/c", "a/x/c"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/+", "a"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/x"));
        assert!(matches("+", ""));
        assert!(!matches("a/b", "A/b"));
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/broker/uptime", "$SYS/broker/uptime"));
        assert!(matches("$SYS/#", "$SYS/broker/uptime"));
        assert!(matches("$SYS/+/uptime", "$SYS/broker/uptime"));
    }

    #[test]
    fn topic_names_reject_wildcards_and_nul() {
        assert_eq!(validate_topic_name("a/b"), Ok(()));
        assert_eq!(validate_topic_name("/"), Ok(()));
        assert_eq!(validate_topic_name(""), Err(Error::EmptyTopicName));
        assert_eq!(validate_topic_name("a/+"), Err(Error::WildcardInTopicName));
        assert_eq!(validate_topic_name("a/#"), Err(Error::WildcardInTopicName));
        assert_eq!(validate_topic_name("a\0b"), Err(Error::NullCharacter));
        let long = "a".repeat(65_536);
        assert_eq!(
            validate_topic_name(&long),
            Err(Error::StringTooLong(65_536))
        );
    }

    #[test]
    fn topic_filters_follow_wildcard_rules() {
        for ok in [
            "#",
            "+",
            "a/#",
            "+/+/#",
            "a//b",
            "/",
            "$SYS/#",
            "$share/g/a/+",
        ] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a/#/b",
            "a#",
            "#/a",
            "a/b#",
            "a+",
            "a/+b/c",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/#/a",
            "$share/g/",
            "$share/g/a/#/b",
        ] {
            assert!(
                matches!(
                    validate_topic_filter(bad),
                    Err(Error::InvalidTopicFilter(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(validate_topic_filter("a\0"), Err(Error::NullCharacter));
    }

    #[test]
    fn shared_filters_split_group_and_filter() {
        assert_eq!(
            parse_shared("$share/group/a/b/#"),
            Some(SharedFilter {
                group: "group",
                filter: "a/b/#"
            })
        );
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$share/group"), None);
        assert_eq!(parse_shared("$share//a"), None);
        assert_eq!(parse_shared("$SHARE/g/a"), None);
    }
}

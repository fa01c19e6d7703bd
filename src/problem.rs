//! Problems found in a configuration after it was deserialized, each with the dotted key
//! path it is about, and the collector that section validators write their rules into.
//!
//! This module is a leaf: it imports nothing from the crate, so every section (`field`,
//! `uplink`, `store`, `broker`, the agent's own `[agent]`) can report problems without
//! importing the composer in `config.rs`, which in turn imports them all.
//!
//! A validator reads as its list of rules:
//!
//! ```
//! use fieldbridge::problem::Problems;
//!
//! let (unit_id, poll_interval_ms) = (0u8, 0u64);
//! let mut problems = Problems::new();
//! let mut bus = problems.at("bus[0]");
//! let mut device = bus.at("device[2]");
//! device.in_range("unit_id", unit_id, 1..=247);
//! device.at_least("poll_interval_ms", poll_interval_ms, 1);
//! let found = problems.into_vec();
//! assert_eq!(found[0].key, "bus[0].device[2].unit_id");
//! assert_eq!(found[0].message, "must be 1..=247");
//! assert_eq!(found[1].message, "must be at least 1");
//! ```
//!
//! Invariants:
//! - Problems keep the order in which the rules were checked: tests and `check-config`
//!   output rely on it.
//! - A key path is the scope's path joined with the key by `.`, or appended directly
//!   when the key is an index (`[3]`); an empty key names the scope itself, and the
//!   empty path is the document as a whole.

use std::fmt::Display;
use std::ops::RangeInclusive;

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

    /// The problems as one line, `key: message; key: message`, or `None` when there
    /// are none: what a module puts in its config error when it is started with a
    /// section that `check-config` would have refused.
    pub fn summary(problems: &[Invalid]) -> Option<String> {
        if problems.is_empty() {
            return None;
        }
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect();
        Some(text.join("; "))
    }
}

/// The problems of one validation run, in the order they were found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(Vec<Invalid>);

impl Problems {
    pub fn new() -> Problems {
        Problems::default()
    }

    /// Rules for the keys below `path` (`"upstream"`, `"bus[0]"`; `""` for the root).
    pub fn at(&mut self, path: impl Into<String>) -> Scope<'_> {
        Scope {
            problems: self,
            path: path.into(),
        }
    }

    /// Takes problems found elsewhere (another section's `validate()`), keeping order.
    pub fn extend(&mut self, found: impl IntoIterator<Item = Invalid>) {
        self.0.extend(found);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<Invalid> {
        self.0
    }
}

/// Rules for the keys below one path; each rule that fails adds one [`Invalid`].
///
/// The rules return whether the value passed, so a later rule that makes sense only for
/// a passing value can be skipped.
#[derive(Debug)]
pub struct Scope<'a> {
    problems: &'a mut Problems,
    path: String,
}

impl Scope<'_> {
    /// A scope below this one: `at("device[2]")`, `at("tls")`, `at("[3]")`.
    pub fn at(&mut self, sub: &str) -> Scope<'_> {
        let path = self.key(sub);
        Scope {
            problems: self.problems,
            path,
        }
    }

    /// A scope at a path of its own, for a problem found here but located elsewhere:
    /// a device reports its profile's points at `profile.NAME.point[I]`.
    pub fn absolute(&mut self, path: impl Into<String>) -> Scope<'_> {
        Scope {
            problems: self.problems,
            path: path.into(),
        }
    }

    /// The full path of `key` in this scope.
    pub fn key(&self, key: &str) -> String {
        if key.is_empty() {
            self.path.clone()
        } else if self.path.is_empty() {
            key.to_string()
        } else if key.starts_with('[') {
            format!("{}{key}", self.path)
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Reports a problem with `key` unconditionally (for the failing arm of a `match`).
    pub fn report(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.problems.0.push(Invalid::new(key, message));
    }

    /// The general rule: `ok`, or `message` about `key`.
    pub fn check(&mut self, ok: bool, key: &str, message: impl Into<String>) -> bool {
        if !ok {
            self.report(key, message);
        }
        ok
    }

    /// `value >= min`, or "must be at least {min}".
    pub fn at_least<T: PartialOrd + Display>(&mut self, key: &str, value: T, min: T) -> bool {
        let ok = value >= min;
        if !ok {
            self.report(key, format!("must be at least {min}"));
        }
        ok
    }

    /// `value` in `range`, or "must be {start}..={end}".
    pub fn in_range<T: PartialOrd + Display>(
        &mut self,
        key: &str,
        value: T,
        range: RangeInclusive<T>,
    ) -> bool {
        let ok = range.contains(&value);
        if !ok {
            self.report(key, format!("must be {}..={}", range.start(), range.end()));
        }
        ok
    }

    /// A non-empty text, or "must not be empty".
    pub fn non_empty(&mut self, key: &str, text: &str) -> bool {
        self.check(!text.is_empty(), key, "must not be empty")
    }

    /// A key that was set where it has no meaning: "applies only to {applies}".
    pub fn only_for(&mut self, key: &str, set: bool, applies: &str) -> bool {
        self.check(!set, key, format!("applies only to {applies}"))
    }
}

/// A parser's message with Rust's type names said in a plant engineer's words:
/// `invalid value: integer `300`, expected u8` → `…, expected a whole number 0..=255`.
/// Only a type name right after "expected " is replaced; the rest is left as it is.
pub fn in_plain_words(message: &str) -> String {
    const WORDS: [(&str, &str); 13] = [
        ("u8", "a whole number 0..=255"),
        ("u16", "a whole number 0..=65535"),
        ("u32", "a whole number 0..=4294967295"),
        ("u64", "a whole number, 0 or more"),
        ("usize", "a whole number, 0 or more"),
        ("i8", "a whole number -128..=127"),
        ("i16", "a whole number -32768..=32767"),
        ("i32", "a whole number -2147483648..=2147483647"),
        ("i64", "a whole number"),
        ("f32", "a number"),
        ("f64", "a number"),
        ("a boolean", "true or false"),
        ("a string", "a text in quotes"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("expected ") {
        let (before, after) = rest.split_at(at + "expected ".len());
        out.push_str(before);
        rest = after;
        let word = WORDS.iter().find(|(name, _)| {
            rest.strip_prefix(name)
                .is_some_and(|tail| !tail.starts_with(|c: char| c.is_alphanumeric()))
        });
        if let Some((name, plain)) = word {
            out.push_str(plain);
            rest = &rest[name.len()..];
        }
    }
    out.push_str(rest);
    out
}

/// An error's message followed by each cause its text so far does not already show,
/// `outer: inner: …`. Many errors put their cause in their own message and also return
/// it as `source()`, so printing the whole chain would say it twice.
pub fn each_cause_once(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_become_plain_words() {
        assert_eq!(
            in_plain_words("invalid value: integer `300`, expected u8"),
            "invalid value: integer `300`, expected a whole number 0..=255"
        );
        assert_eq!(
            in_plain_words("invalid type: string \"x\", expected u16"),
            "invalid type: string \"x\", expected a whole number 0..=65535"
        );
        assert_eq!(
            in_plain_words("invalid type: integer `1`, expected a boolean"),
            "invalid type: integer `1`, expected true or false"
        );
        // Not a type name: left alone.
        assert_eq!(
            in_plain_words("unknown variant `x`, expected `holding` or `input`"),
            "unknown variant `x`, expected `holding` or `input`"
        );
        assert_eq!(in_plain_words("expected u8x"), "expected u8x");
    }

    #[test]
    fn keys_join_paths_indexes_and_the_scope_itself() {
        let mut problems = Problems::new();
        problems.at("").report("", "document");
        problems.at("").report("agent.qos", "root key");
        let mut bus = problems.at("bus[0]");
        bus.report("name", "dotted");
        bus.at("device").report("[2]", "indexed");
        bus.at("device[1]").report("", "the scope itself");
        bus.absolute("profile.m.point[0]")
            .report("address", "elsewhere");
        let keys: Vec<String> = problems.into_vec().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "",
                "agent.qos",
                "bus[0].name",
                "bus[0].device[2]",
                "bus[0].device[1]",
                "profile.m.point[0].address"
            ]
        );
    }

    #[test]
    fn rules_report_only_what_fails_in_order() {
        let mut problems = Problems::new();
        let mut s = problems.at("store");
        assert!(s.at_least("a", 1u64, 1));
        assert!(!s.at_least("b", 0u64, 1));
        assert!(s.in_range("c", 8usize, 8..=65_536));
        assert!(!s.in_range("d", 0u16, 1..=125));
        assert!(!s.non_empty("e", ""));
        assert!(!s.only_for("f", true, "tcp buses"));
        assert!(s.only_for("g", false, "tcp buses"));
        assert!(!s.check(false, "h", "custom"));
        let found: Vec<String> = problems
            .into_vec()
            .into_iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect();
        assert_eq!(
            found,
            [
                "store.b: must be at least 1",
                "store.d: must be 1..=125",
                "store.e: must not be empty",
                "store.f: applies only to tcp buses",
                "store.h: custom",
            ]
        );
    }

    #[test]
    fn summary_joins_problems_or_is_none() {
        assert_eq!(Invalid::summary(&[]), None);
        let both = [Invalid::new("a", "x"), Invalid::new("b", "y")];
        assert_eq!(Invalid::summary(&both).as_deref(), Some("a: x; b: y"));
    }
}

//! Retained messages by topic level, for matching subscription filters against them.
//!
//! Invariants:
//! - At most one message per topic; storing replaces, clearing (an empty retained
//!   payload) removes it and prunes the empty path.
//! - A filter starting with `+` or `#` does not match topics whose first level starts
//!   with `$` (MQTT 4.7.2), as in the subscription tree.

use std::collections::HashMap;

use crate::mqtt::topic::split_level;

#[derive(Debug)]
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            value: None,
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.value.is_none() && self.children.is_empty()
    }

    fn all(&self, f: &mut impl FnMut(&V)) {
        if let Some(v) = &self.value {
            f(v);
        }
        for child in self.children.values() {
            child.all(f);
        }
    }

    /// Matches the filter levels `level`, `rest` against this node's children.
    fn matches(&self, level: &str, rest: Option<&str>, root: bool, f: &mut impl FnMut(&V)) {
        let visible = |name: &str| !(root && name.starts_with('$'));
        match level {
            "#" => {
                // `a/#` matches `a` itself, handled by the caller, and everything below.
                for (name, child) in &self.children {
                    if visible(name) {
                        child.all(f);
                    }
                }
            }
            "+" => {
                for (name, child) in &self.children {
                    if visible(name) {
                        child.descend(rest, f);
                    }
                }
            }
            literal => {
                if let Some(child) = self.children.get(literal) {
                    child.descend(rest, f);
                }
            }
        }
    }

    fn descend(&self, rest: Option<&str>, f: &mut impl FnMut(&V)) {
        match rest {
            None => {
                if let Some(v) = &self.value {
                    f(v);
                }
            }
            Some(rest) => {
                let (level, rest) = split_level(rest);
                if level == "#" {
                    if let Some(v) = &self.value {
                        f(v);
                    }
                }
                self.matches(level, rest, false, f);
            }
        }
    }

    /// Returns (previous value, node now empty).
    fn remove(&mut self, topic: &str) -> (Option<V>, bool) {
        let (level, rest) = split_level(topic);
        let Some(child) = self.children.get_mut(level) else {
            return (None, self.is_empty());
        };
        let (old, empty) = match rest {
            None => (child.value.take(), child.is_empty()),
            Some(rest) => child.remove(rest),
        };
        if empty {
            self.children.remove(level);
        }
        (old, self.is_empty())
    }

    fn retain(&mut self, keep: &mut impl FnMut(&V) -> bool) -> usize {
        let mut removed = 0;
        if self.value.as_ref().is_some_and(|v| !keep(v)) {
            self.value = None;
            removed += 1;
        }
        self.children.retain(|_, child| {
            removed += child.retain(keep);
            !child.is_empty()
        });
        removed
    }
}

/// The retained message of every topic that has one.
#[derive(Debug)]
pub(crate) struct RetainedStore<V> {
    root: Node<V>,
    count: usize,
}

impl<V> Default for RetainedStore<V> {
    fn default() -> Self {
        RetainedStore {
            root: Node::default(),
            count: 0,
        }
    }
}

impl<V> RetainedStore<V> {
    /// Stores `value` as the retained message of `topic` (a valid topic name).
    pub fn insert(&mut self, topic: &str, value: V) {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.value.replace(value).is_none() {
            self.count += 1;
        }
    }

    /// Whether `topic` has a retained message.
    pub fn contains(&self, topic: &str) -> bool {
        let mut node = &self.root;
        for level in topic.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.value.is_some()
    }

    /// Clears the retained message of `topic`; returns it.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let (old, _) = self.root.remove(topic);
        self.count -= usize::from(old.is_some());
        old
    }

    /// Calls `f` with every retained message whose topic matches `filter` (valid).
    pub fn for_each_match(&self, filter: &str, mut f: impl FnMut(&V)) {
        let (level, rest) = split_level(filter);
        self.root.matches(level, rest, true, &mut f);
    }

    /// Drops the messages `keep` rejects; returns how many.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let removed = self.root.retain(&mut keep);
        self.count -= removed;
        removed
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(topics: &[&str]) -> RetainedStore<String> {
        let mut store = RetainedStore::default();
        for t in topics {
            store.insert(t, t.to_string());
        }
        store
    }

    fn matched(store: &RetainedStore<String>, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.for_each_match(filter, |v| out.push(v.clone()));
        out.sort();
        out
    }

    #[test]
    fn filters_select_retained_topics() {
        let s = store(&["a", "a/b", "a/b/c", "a/x/c", "b/b", "/lead", "$SYS/up"]);
        assert_eq!(s.len(), 7);
        assert_eq!(matched(&s, "a/#"), ["a", "a/b", "a/b/c", "a/x/c"]);
        assert_eq!(matched(&s, "a/+/c"), ["a/b/c", "a/x/c"]);
        assert_eq!(matched(&s, "+/b"), ["a/b", "b/b"]);
        assert_eq!(
            matched(&s, "#"),
            ["/lead", "a", "a/b", "a/b/c", "a/x/c", "b/b"]
        );
        assert_eq!(matched(&s, "+"), ["a"]);
        assert_eq!(matched(&s, "+/lead"), ["/lead"]);
        assert_eq!(matched(&s, "$SYS/#"), ["$SYS/up"]);
        assert_eq!(matched(&s, "a/b"), ["a/b"]);
        assert!(matched(&s, "a/b/c/d").is_empty());
    }

    #[test]
    fn replace_and_clear_keep_the_count() {
        let mut s = store(&["a/b", "a/b/c"]);
        s.insert("a/b", "new".to_string());
        assert_eq!(s.len(), 2);
        assert!(s.contains("a/b") && s.contains("a/b/c"));
        assert!(!s.contains("a") && !s.contains("a/b/c/d") && !s.contains("x"));
        assert_eq!(matched(&s, "a/b"), ["new"]);
        assert_eq!(s.remove("a/b").as_deref(), Some("new"));
        assert_eq!(s.remove("a/b"), None);
        assert_eq!(s.remove("zz/top"), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.remove("a/b/c").as_deref(), Some("a/b/c"));
        assert!(s.root.is_empty(), "pruned");
    }

    #[test]
    fn retain_drops_rejected_messages() {
        let mut s = store(&["a/1", "a/2", "b/1"]);
        assert_eq!(s.retain(|v| !v.ends_with('1')), 2);
        assert_eq!(s.len(), 1);
        assert_eq!(matched(&s, "#"), ["a/2"]);
    }
}

#[cfg(test)]
mod model {
    //! The store against [`crate::mqtt::topic::matches`] over every stored topic.
    use super::*;
    use crate::mqtt::topic;
    use proptest::prelude::*;

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just(String::new()),
            Just("$s".to_string()),
        ]
    }

    proptest! {
        #[test]
        fn store_matches_like_the_topic_rules(
            topics in proptest::collection::vec(proptest::collection::vec(level(), 1..5), 0..12),
            cleared in proptest::collection::vec(any::<bool>(), 12),
            filters in proptest::collection::vec(
                (proptest::collection::vec(prop_oneof![3 => level(), 1 => Just("+".to_string())], 1..5), any::<bool>()),
                1..8,
            ),
        ) {
            let topics: Vec<String> = topics.into_iter().map(|l| l.join("/")).collect();
            let mut store = RetainedStore::default();
            let mut model = std::collections::BTreeSet::new();
            for (i, t) in topics.iter().enumerate() {
                store.insert(t, t.clone());
                model.insert(t.clone());
                if cleared[i] {
                    store.remove(t);
                    model.remove(t);
                }
            }
            prop_assert_eq!(store.len(), model.len());
            for (mut levels, hash) in filters {
                if hash {
                    levels.push("#".into());
                }
                let filter = levels.join("/");
                let mut got = Vec::new();
                store.for_each_match(&filter, |t| got.push(t.clone()));
                got.sort();
                let want: Vec<String> =
                    model.iter().filter(|t| topic::matches(&filter, t)).cloned().collect();
                prop_assert_eq!(got, want, "filter {:?}", filter);
            }
        }
    }
}

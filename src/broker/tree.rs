//! The subscription tree: topic filters by level, with `+`, `#` and shared groups.
//!
//! Invariants:
//! - A node exists only while some filter at or below it has a subscriber; removing the
//!   last subscriber prunes the empty path.
//! - One owner holds at most one subscription per (filter, share group); subscribing
//!   again replaces the options.
//! - A topic whose first level starts with `$` is not matched by a filter starting with
//!   `+` or `#` (MQTT 4.7.2).
//! - Matching takes `&self` only and allocates nothing, so many publishers can match at
//!   once under a read lock; the only mutation during a match is the round-robin cursor
//!   of a shared group, an atomic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::mqtt::topic::split_level;
use crate::mqtt::SubscriptionOptions;

/// Who a subscription delivers to. Equality is identity (one session).
pub(crate) trait Owner: Clone + PartialEq {
    /// Shared groups skip owners that cannot take a message now.
    fn is_online(&self) -> bool;
}

/// One subscription in the tree.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber<T> {
    pub owner: T,
    pub options: SubscriptionOptions,
    /// The v5 subscription identifier, 0 when none.
    pub id: u32,
}

#[derive(Debug)]
struct Group<T> {
    name: Box<str>,
    members: Vec<Subscriber<T>>,
    cursor: AtomicUsize,
}

#[derive(Debug)]
struct Entries<T> {
    direct: Vec<Subscriber<T>>,
    shared: Vec<Group<T>>,
}

impl<T> Default for Entries<T> {
    fn default() -> Self {
        Entries {
            direct: Vec::new(),
            shared: Vec::new(),
        }
    }
}

impl<T: Owner> Entries<T> {
    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_empty()
    }

    fn emit(&self, f: &mut impl FnMut(&Subscriber<T>, bool)) {
        for sub in &self.direct {
            f(sub, false);
        }
        for group in &self.shared {
            if let Some(sub) = group.pick() {
                f(sub, true);
            }
        }
    }

    fn insert(&mut self, group: Option<&str>, sub: Subscriber<T>) -> bool {
        let list = match group {
            None => &mut self.direct,
            Some(name) => {
                let at = match self.shared.iter().position(|g| &*g.name == name) {
                    Some(at) => at,
                    None => {
                        self.shared.push(Group {
                            name: name.into(),
                            members: Vec::new(),
                            cursor: AtomicUsize::new(0),
                        });
                        self.shared.len() - 1
                    }
                };
                &mut self.shared[at].members
            }
        };
        match list.iter_mut().find(|s| s.owner == sub.owner) {
            Some(existing) => {
                *existing = sub;
                false
            }
            None => {
                push_compact(list, sub);
                true
            }
        }
    }

    fn remove(&mut self, group: Option<&str>, owner: &T) -> bool {
        match group {
            None => remove_owner(&mut self.direct, owner),
            Some(name) => {
                let Some(at) = self.shared.iter().position(|g| &*g.name == name) else {
                    return false;
                };
                let removed = remove_owner(&mut self.shared[at].members, owner);
                if self.shared[at].members.is_empty() {
                    self.shared.swap_remove(at);
                }
                removed
            }
        }
    }
}

fn remove_owner<T: PartialEq>(list: &mut Vec<Subscriber<T>>, owner: &T) -> bool {
    match list.iter().position(|s| s.owner == *owner) {
        Some(at) => {
            list.swap_remove(at);
            true
        }
        None => false,
    }
}

impl<T: Owner> Group<T> {
    /// Round robin over the members, preferring online ones.
    fn pick(&self) -> Option<&Subscriber<T>> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.members[(start + i) % n])
            .find(|s| s.owner.is_online())
            .or_else(|| self.members.get(start % n))
    }
}

#[derive(Debug)]
struct Node<T> {
    /// Literal next levels. Boxed on purpose: most nodes are leaves, and an inline map
    /// would make every node (and every bucket of its parent's map) 40 bytes larger.
    #[allow(clippy::box_collection)]
    children: Option<Box<HashMap<Box<str>, Node<T>>>>,
    plus: Option<Box<Node<T>>>,
    /// Subscribers of the filter ending at this node.
    here: Option<Box<Entries<T>>>,
    /// Subscribers of this node's filter followed by `/#`.
    hash: Option<Box<Entries<T>>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: None,
            plus: None,
            here: None,
            hash: None,
        }
    }
}

impl<T: Owner> Node<T> {
    fn is_empty(&self) -> bool {
        self.children.is_none() && self.plus.is_none() && self.here.is_none() && self.hash.is_none()
    }

    fn walk(
        &self,
        level: &str,
        rest: Option<&str>,
        root: bool,
        f: &mut impl FnMut(&Subscriber<T>, bool),
    ) {
        let wildcards = !(root && level.starts_with('$'));
        if wildcards {
            if let Some(hash) = &self.hash {
                hash.emit(f);
            }
        }
        if let Some(child) = self.children.as_ref().and_then(|c| c.get(level)) {
            child.descend(rest, f);
        }
        if wildcards {
            if let Some(plus) = &self.plus {
                plus.descend(rest, f);
            }
        }
    }

    fn descend(&self, rest: Option<&str>, f: &mut impl FnMut(&Subscriber<T>, bool)) {
        match rest {
            None => {
                if let Some(here) = &self.here {
                    here.emit(f);
                }
                // `a/#` also matches `a`.
                if let Some(hash) = &self.hash {
                    hash.emit(f);
                }
            }
            Some(rest) => {
                let (level, rest) = split_level(rest);
                self.walk(level, rest, false, f);
            }
        }
    }

    fn slot(&mut self, filter: &str) -> &mut Option<Box<Entries<T>>> {
        let (level, rest) = split_level(filter);
        match (level, rest) {
            ("#", _) => &mut self.hash,
            (level, rest) => {
                let child = if level == "+" {
                    self.plus.get_or_insert_with(Box::default)
                } else {
                    self.children
                        .get_or_insert_with(Box::default)
                        .entry(level.into())
                        .or_default()
                };
                match rest {
                    None => &mut child.here,
                    Some(rest) => child.slot(rest),
                }
            }
        }
    }

    /// Removes from the entries of `filter`; returns (removed, node now empty).
    fn remove(&mut self, filter: &str, group: Option<&str>, owner: &T) -> (bool, bool) {
        let (level, rest) = split_level(filter);
        let removed = if level == "#" {
            remove_from(&mut self.hash, group, owner)
        } else {
            let child = if level == "+" {
                self.plus.as_deref_mut()
            } else {
                self.children.as_mut().and_then(|c| c.get_mut(level))
            };
            let Some(child) = child else {
                return (false, self.is_empty());
            };
            let (removed, empty) = match rest {
                None => (remove_from(&mut child.here, group, owner), child.is_empty()),
                Some(rest) => child.remove(rest, group, owner),
            };
            if empty {
                if level == "+" {
                    self.plus = None;
                } else {
                    if let Some(children) = &mut self.children {
                        children.remove(level);
                        if children.is_empty() {
                            self.children = None;
                        }
                    }
                }
            }
            removed
        };
        (removed, self.is_empty())
    }
}

fn remove_from<T: Owner>(
    slot: &mut Option<Box<Entries<T>>>,
    group: Option<&str>,
    owner: &T,
) -> bool {
    let Some(entries) = slot else {
        return false;
    };
    let removed = entries.remove(group, owner);
    if entries.is_empty() {
        *slot = None;
    }
    removed
}

/// Pushes growing the allocation one element at a time while the vector is short, so
/// the common one-element case does not reserve room for four. Sessions grow their
/// own list of filters with it too.
pub(crate) fn push_compact<T>(list: &mut Vec<T>, item: T) {
    if list.len() < 8 {
        list.reserve_exact(1);
    }
    list.push(item);
}

/// Filters and their subscribers.
#[derive(Debug)]
pub(crate) struct SubscriptionTree<T> {
    root: Node<T>,
    count: usize,
}

impl<T> Default for SubscriptionTree<T> {
    fn default() -> Self {
        SubscriptionTree {
            root: Node::default(),
            count: 0,
        }
    }
}

impl<T: Owner> SubscriptionTree<T> {
    /// Adds or replaces `sub.owner`'s subscription to `filter` (a valid filter without
    /// the `$share/group/` prefix, which is passed as `group`). True when it is new.
    pub fn insert(&mut self, filter: &str, group: Option<&str>, sub: Subscriber<T>) -> bool {
        let entries = self.root.slot(filter).get_or_insert_with(Box::default);
        let new = entries.insert(group, sub);
        self.count += usize::from(new);
        new
    }

    /// Removes `owner`'s subscription to `filter`. True when there was one.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, owner: &T) -> bool {
        let (removed, _) = self.root.remove(filter, group, owner);
        self.count -= usize::from(removed);
        removed
    }

    /// Calls `f(subscriber, shared)` for every subscription matching `topic` (a valid
    /// topic name); a shared group contributes one member. An owner with overlapping
    /// filters is seen once per filter.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Subscriber<T>, bool)) {
        let (level, rest) = split_level(topic);
        self.root.walk(level, rest, true, &mut f);
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::QoS;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[derive(Debug, Clone)]
    struct Client(u32, Arc<AtomicBool>);
    impl PartialEq for Client {
        fn eq(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }
    impl Owner for Client {
        fn is_online(&self) -> bool {
            self.1.load(Ordering::Relaxed)
        }
    }
    fn client(id: u32) -> Client {
        Client(id, Arc::new(AtomicBool::new(true)))
    }
    fn sub(c: &Client, qos: QoS) -> Subscriber<Client> {
        Subscriber {
            owner: c.clone(),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
            id: 0,
        }
    }
    fn matched(tree: &SubscriptionTree<Client>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        tree.for_each_match(topic, |s, _| out.push(s.owner.0));
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_match_by_level() {
        let mut tree = SubscriptionTree::default();
        let filters = [
            "a/b/c", "a/+/c", "a/#", "#", "+/b/+", "a/b", "+", "a/b/c/#", "b/#", "+/+/+/+",
        ];
        for (i, f) in filters.iter().enumerate() {
            assert!(tree.insert(f, None, sub(&client(i as u32), QoS::AtMostOnce)));
        }
        assert_eq!(tree.len(), filters.len());
        assert_eq!(matched(&tree, "a/b/c"), [0, 1, 2, 3, 4, 7]);
        assert_eq!(matched(&tree, "a"), [2, 3, 6]);
        assert_eq!(matched(&tree, "a/b"), [2, 3, 5]);
        assert_eq!(matched(&tree, "a/b/c/d"), [2, 3, 7, 9]);
        assert_eq!(matched(&tree, "x/b/y"), [3, 4]);
        assert_eq!(matched(&tree, "b"), [3, 6, 8]);
    }

    #[test]
    fn empty_levels_are_levels() {
        let mut tree = SubscriptionTree::default();
        tree.insert("+/+", None, sub(&client(1), QoS::AtMostOnce));
        tree.insert("/#", None, sub(&client(2), QoS::AtMostOnce));
        tree.insert("a//b", None, sub(&client(3), QoS::AtMostOnce));
        assert_eq!(matched(&tree, "/x"), [1, 2]);
        assert_eq!(matched(&tree, "a//b"), [3]);
    }

    #[test]
    fn dollar_topics_escape_leading_wildcards() {
        let mut tree = SubscriptionTree::default();
        tree.insert("#", None, sub(&client(1), QoS::AtMostOnce));
        tree.insert("+/broker/uptime", None, sub(&client(2), QoS::AtMostOnce));
        tree.insert("$SYS/#", None, sub(&client(3), QoS::AtMostOnce));
        tree.insert("$SYS/+/uptime", None, sub(&client(4), QoS::AtMostOnce));
        assert_eq!(matched(&tree, "$SYS/broker/uptime"), [3, 4]);
        assert_eq!(matched(&tree, "$SYS/broker/load"), [3]);
        assert_eq!(matched(&tree, "SYS/broker/uptime"), [1, 2]);
    }

    #[test]
    fn resubscribe_replaces_and_remove_prunes() {
        let mut tree = SubscriptionTree::default();
        let c = client(7);
        assert!(tree.insert("a/+/c", None, sub(&c, QoS::AtMostOnce)));
        assert!(!tree.insert("a/+/c", None, sub(&c, QoS::ExactlyOnce)));
        assert_eq!(tree.len(), 1);
        let mut qos = Vec::new();
        tree.for_each_match("a/b/c", |s, _| qos.push(s.options.qos));
        assert_eq!(qos, [QoS::ExactlyOnce]);
        assert!(!tree.remove("a/+/x", None, &c));
        assert!(!tree.remove("a/+/c", None, &client(8)));
        assert!(tree.remove("a/+/c", None, &c));
        assert_eq!(tree.len(), 0);
        assert!(tree.root.is_empty(), "path pruned: {:?}", tree.root);
        tree.insert("x/#", None, sub(&c, QoS::AtMostOnce));
        assert!(tree.remove("x/#", None, &c));
        assert!(tree.root.is_empty());
    }

    #[test]
    fn shared_groups_take_turns_and_skip_offline_members() {
        let mut tree = SubscriptionTree::default();
        let (a, b, c) = (client(1), client(2), client(3));
        tree.insert("s/+", Some("g"), sub(&a, QoS::AtLeastOnce));
        tree.insert("s/+", Some("g"), sub(&b, QoS::AtLeastOnce));
        tree.insert("s/+", Some("h"), sub(&c, QoS::AtLeastOnce));
        tree.insert("s/+", None, sub(&a, QoS::AtLeastOnce));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut this = Vec::new();
            tree.for_each_match("s/x", |s, shared| this.push((s.owner.0, shared)));
            this.sort_unstable();
            seen.push(this);
        }
        assert_eq!(seen[0].len(), 3, "direct + one per group: {seen:?}");
        let g_members: Vec<u32> = seen
            .iter()
            .map(|m| m.iter().find(|(id, shared)| *shared && *id != 3).unwrap().0)
            .collect();
        assert_eq!(g_members, [1, 2, 1, 2]);

        b.1.store(false, Ordering::Relaxed);
        for _ in 0..3 {
            let mut g = Vec::new();
            tree.for_each_match("s/x", |s, shared| {
                if shared && s.owner.0 != 3 {
                    g.push(s.owner.0)
                }
            });
            assert_eq!(g, [1]);
        }
        assert!(tree.remove("s/+", Some("g"), &a));
        assert!(tree.remove("s/+", Some("g"), &b));
        assert!(!tree.remove("s/+", Some("g"), &b));
        assert_eq!(tree.len(), 2);
    }
}

#[cfg(test)]
mod model {
    //! The tree against the obvious model: every filter checked with
    //! [`crate::mqtt::topic::matches`].
    use super::*;
    use crate::mqtt::topic;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct Id(usize);
    impl PartialEq for Id {
        fn eq(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }
    impl Owner for Id {
        fn is_online(&self) -> bool {
            true
        }
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just(String::new()),
            Just("$s".to_string()),
        ]
    }

    fn topic_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(prop_oneof![3 => level(), 1 => Just("+".to_string())], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#".into());
                }
                levels.join("/")
            })
    }

    proptest! {
        #[test]
        fn tree_matches_like_the_topic_rules(
            filters in proptest::collection::vec(filter(), 1..12),
            removed in proptest::collection::vec(any::<bool>(), 12),
            topics in proptest::collection::vec(topic_name(), 1..8),
        ) {
            let mut tree = SubscriptionTree::default();
            for (i, f) in filters.iter().enumerate() {
                tree.insert(f, None, Subscriber {
                    owner: Id(i),
                    options: crate::mqtt::SubscriptionOptions::default(),
                    id: 0,
                });
            }
            let mut live: Vec<usize> = (0..filters.len()).collect();
            for (i, f) in filters.iter().enumerate() {
                if removed[i] {
                    prop_assert!(tree.remove(f, None, &Id(i)));
                    live.retain(|&j| j != i);
                }
            }
            prop_assert_eq!(tree.len(), live.len());
            for t in &topics {
                let mut got = Vec::new();
                tree.for_each_match(t, |s, _| got.push(s.owner.0));
                got.sort_unstable();
                let want: Vec<usize> = live
                    .iter()
                    .copied()
                    .filter(|&i| topic::matches(&filters[i], t))
                    .collect();
                prop_assert_eq!(got, want, "topic {:?}", t);
            }
            for (i, f) in filters.iter().enumerate() {
                if !removed[i] {
                    tree.remove(f, None, &Id(i));
                }
            }
            prop_assert!(tree.root.is_empty(), "emptied tree keeps no nodes");
        }
    }
}

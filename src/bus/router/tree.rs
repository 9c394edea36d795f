//! Who is subscribed to what: a tree of topic filters, one level per node,
//! as Mosquitto keeps it. Matching a topic walks only the branches that can
//! match it (its own levels, `+` and `#`), so a publish costs the depth of
//! the topic, not the number of subscriptions.

use std::collections::HashMap;

/// A subscriber: one link, and what delivers to it.
pub(super) trait Target: Clone {
    fn link(&self) -> u64;
}

/// The subscriptions of every link.
pub(super) struct Tree<T> {
    root: Node<T>,
}

struct Node<T> {
    children: HashMap<Box<str>, Node<T>>,
    /// Links subscribed to the filter that ends here.
    members: Vec<T>,
    /// Shared subscriptions (`$share/GROUP/filter`) ending here: each
    /// message goes to one member of each group, in turn.
    groups: Vec<Group<T>>,
}

struct Group<T> {
    name: Box<str>,
    members: Vec<T>,
    next: usize,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            members: Vec::new(),
            groups: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.members.is_empty() && self.groups.is_empty()
    }
}

/// A filter as the tree files it: `$share/GROUP/f` is `f` in group GROUP.
pub(super) fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f)) => (Some(group), f),
            None => (None, filter),
        },
        None => (None, filter),
    }
}

impl<T: Target> Default for Tree<T> {
    fn default() -> Self {
        Tree {
            root: Node::default(),
        }
    }
}

impl<T: Target> Tree<T> {
    /// Subscribes `target` to `filter` (again: nothing changes).
    pub fn insert(&mut self, filter: &str, target: T) {
        let (group, f) = split_shared(filter);
        let mut node = &mut self.root;
        for level in f.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let members = match group {
            None => &mut node.members,
            Some(g) => {
                let i = match node.groups.iter().position(|x| &*x.name == g) {
                    Some(i) => i,
                    None => {
                        node.groups.push(Group {
                            name: g.into(),
                            members: Vec::new(),
                            next: 0,
                        });
                        node.groups.len() - 1
                    }
                };
                &mut node.groups[i].members
            }
        };
        if !members.iter().any(|m| m.link() == target.link()) {
            members.push(target);
        }
    }

    /// Unsubscribes `link` from `filter`; empty branches are pruned.
    pub fn remove(&mut self, filter: &str, link: u64) {
        let (group, f) = split_shared(filter);
        let levels: Vec<&str> = f.split('/').collect();
        remove_at(&mut self.root, &levels, group, link);
    }

    /// Calls `deliver` once for every link with a subscription matching
    /// `topic` (a link with several gets one call; the session works out
    /// what its subscriptions want).
    pub fn for_each_match(&mut self, topic: &str, mut deliver: impl FnMut(&T)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut found: Vec<T> = Vec::new();
        // Topics beginning with `$` match no wildcard at their first level.
        let dollar = topic.starts_with('$');
        collect(&mut self.root, &levels, dollar, &mut found);
        if found.len() > 1 {
            found.sort_unstable_by_key(Target::link);
            found.dedup_by_key(|t| t.link());
        }
        for t in &found {
            deliver(t);
        }
    }

    /// Whether anyone (a shared group included) is subscribed to exactly
    /// `filter`, wildcards read as written.
    pub fn has_filter(&self, filter: &str) -> bool {
        let mut node = &self.root;
        for level in filter.split('/') {
            match node.children.get(level) {
                Some(n) => node = n,
                None => return false,
            }
        }
        !node.members.is_empty() || node.groups.iter().any(|g| !g.members.is_empty())
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    #[cfg(test)]
    pub fn for_each_match_count(&mut self, topic: &str) -> usize {
        let mut n = 0;
        self.for_each_match(topic, |_| n += 1);
        n
    }
}

fn remove_at<T: Target>(node: &mut Node<T>, levels: &[&str], group: Option<&str>, link: u64) {
    match levels.split_first() {
        None => match group {
            None => node.members.retain(|m| m.link() != link),
            Some(g) => {
                if let Some(i) = node.groups.iter().position(|x| &*x.name == g) {
                    let grp = &mut node.groups[i];
                    grp.members.retain(|m| m.link() != link);
                    if grp.members.is_empty() {
                        node.groups.swap_remove(i);
                    }
                }
            }
        },
        Some((first, rest)) => {
            if let Some(child) = node.children.get_mut(*first) {
                remove_at(child, rest, group, link);
                if child.is_empty() {
                    node.children.remove(*first);
                }
            }
        }
    }
}

/// The targets of `node`'s own subscriptions (one per shared group).
fn take<T: Target>(node: &mut Node<T>, found: &mut Vec<T>) {
    found.extend(node.members.iter().cloned());
    for g in &mut node.groups {
        g.next = (g.next + 1) % g.members.len();
        found.push(g.members[g.next].clone());
    }
}

fn collect<T: Target>(node: &mut Node<T>, levels: &[&str], dollar: bool, found: &mut Vec<T>) {
    if !dollar && let Some(hash) = node.children.get_mut("#") {
        // `a/#` matches `a` and everything below it.
        take(hash, found);
    }
    let Some((first, rest)) = levels.split_first() else {
        take(node, found);
        return;
    };
    if !dollar && let Some(plus) = node.children.get_mut("+") {
        collect(plus, rest, false, found);
    }
    if let Some(child) = node.children.get_mut(*first) {
        collect(child, rest, false, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::codec;

    #[derive(Clone, Debug, PartialEq)]
    struct T(u64);
    impl Target for T {
        fn link(&self) -> u64 {
            self.0
        }
    }

    fn matched(tree: &mut Tree<T>, topic: &str) -> Vec<u64> {
        let mut v = Vec::new();
        tree.for_each_match(topic, |t| v.push(t.0));
        v
    }

    #[test]
    fn matches_as_the_specification_says() {
        let filters = [
            "a/b", "a/+", "+/b", "a/#", "#", "+", "+/+", "a/b/#", "a/+/c", "$SYS/#", "$SYS/+",
            "+/#", "/a", "a//b", "a/+/+",
        ];
        let topics = [
            "a/b", "a", "a/b/c", "b", "$SYS/x", "$SYS", "/a", "a//b", "a/x/c", "", "/",
        ];
        for (i, f) in filters.iter().enumerate() {
            let mut tree = Tree::default();
            tree.insert(f, T(i as u64));
            for t in topics {
                let want = codec::matches(t, f);
                assert_eq!(!matched(&mut tree, t).is_empty(), want, "{t} vs {f}");
            }
        }
    }

    #[test]
    fn one_delivery_per_link_and_clean_removal() {
        let mut tree = Tree::default();
        tree.insert("a/#", T(1));
        tree.insert("a/b", T(1));
        tree.insert("a/b", T(1));
        tree.insert("+/b", T(2));
        assert_eq!(matched(&mut tree, "a/b"), vec![1, 2]);
        tree.remove("a/#", 1);
        assert_eq!(matched(&mut tree, "a/b"), vec![1, 2]);
        tree.remove("a/b", 1);
        tree.remove("+/b", 2);
        tree.remove("+/b", 9); // not subscribed: nothing happens
        assert!(tree.is_empty());
    }

    #[test]
    fn filters_are_found_as_written() {
        let mut tree = Tree::default();
        tree.insert("#", T(1));
        tree.insert("h/rpc/a/+", T(2));
        tree.insert("$share/g/h/rpc/b/#", T(3));
        assert!(tree.has_filter("h/rpc/a/+"));
        assert!(tree.has_filter("h/rpc/b/#"), "a shared group counts");
        assert!(
            !tree.has_filter("h/rpc/c/+"),
            "`#` matches it, but is not it"
        );
        assert!(!tree.has_filter("h/rpc"));
        tree.remove("h/rpc/a/+", 2);
        assert!(!tree.has_filter("h/rpc/a/+"));
    }

    #[test]
    fn shared_groups_take_turns() {
        let mut tree = Tree::default();
        tree.insert("$share/g/a/+", T(1));
        tree.insert("$share/g/a/+", T(2));
        tree.insert("$share/h/a/+", T(3));
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(matched(&mut tree, "a/x"));
        }
        // Every message reaches group h's one member and one of group g's.
        assert!(seen.iter().all(|v| v.len() == 2 && v.contains(&3)));
        let ones = seen.iter().filter(|v| v.contains(&1)).count();
        assert_eq!(ones, 2, "{seen:?}");
        tree.remove("$share/g/a/+", 1);
        tree.remove("$share/g/a/+", 2);
        tree.remove("$share/h/a/+", 3);
        assert!(tree.is_empty());
        assert!(matched(&mut tree, "a/x").is_empty());
    }
}

//! The local subscriptions as a trie of topic levels, so that fanning a message out costs the
//! topic's depth plus the matches, not a scan of every session's filters.
//!
//! Each node is one level of a filter: literal children by name, one `+` child, the sessions
//! whose filter ends at the node and the sessions whose filter is the node followed by `#`.
//! Matching follows [`TopicFilter::matches`] exactly (tested against it): `#` also matches its
//! parent level (`a/#` matches `a`), `+` matches an empty level, and a topic starting with `$`
//! is not matched by a filter starting with a wildcard.

use std::collections::HashMap;
use std::sync::Arc;

use crate::templates::topic::TopicFilter;

/// A session's key in the index (its client id) and the QoS its filter was granted.
type Subscribers = HashMap<Arc<str>, u8>;

#[derive(Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Filters ending at this node.
    here: Subscribers,
    /// Filters that are this node's path followed by `/#` (at the root: `#`).
    hash: Subscribers,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
    }
}

#[derive(Default)]
pub struct FilterIndex {
    root: Node,
    /// (filter, session) entries held.
    len: usize,
}

impl FilterIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or updates (its QoS) one session's filter.
    pub fn insert(&mut self, filter: &TopicFilter, session: &Arc<str>, qos: u8) {
        let mut node = &mut self.root;
        let mut levels = filter.as_str().split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                // `#` is always last (TopicFilter::parse checks).
                if node.hash.insert(Arc::clone(session), qos).is_none() {
                    self.len += 1;
                }
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.literal.entry(level.into()).or_default()
            };
            if levels.peek().is_none() && node.here.insert(Arc::clone(session), qos).is_none() {
                self.len += 1;
            }
        }
    }

    /// Removes one session's filter; empty branches are pruned.
    pub fn remove(&mut self, filter: &TopicFilter, session: &str) {
        let levels: Vec<&str> = filter.as_str().split('/').collect();
        if remove_at(&mut self.root, &levels, session) {
            self.len -= 1;
        }
    }

    /// Every session with a filter matching `topic`, with the highest QoS among its matching
    /// filters, appended to `out` (each session once, in no particular order).
    pub fn matches(&self, topic: &str, out: &mut Vec<(Arc<str>, u8)>) {
        let start = out.len();
        let levels: Vec<&str> = topic.split('/').collect();
        // A `$` topic (`$SYS/...`, `$aws/...`) is matched only by filters naming its first level.
        let dollar = topic.starts_with('$');
        visit(&self.root, &levels, dollar, out);
        let found = &mut out[start..];
        if found.len() > 1 {
            // Highest QoS first within a session, then keep one entry per session.
            found.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let mut kept: Vec<(Arc<str>, u8)> = Vec::with_capacity(found.len());
            for (s, q) in found.iter() {
                if kept.last().is_none_or(|(k, _)| k != s) {
                    kept.push((Arc::clone(s), *q));
                }
            }
            out.truncate(start);
            out.extend(kept);
        }
    }
}

fn visit(node: &Node, levels: &[&str], root_dollar: bool, out: &mut Vec<(Arc<str>, u8)>) {
    if !root_dollar {
        out.extend(node.hash.iter().map(|(s, q)| (Arc::clone(s), *q)));
    }
    let Some((first, rest)) = levels.split_first() else {
        out.extend(node.here.iter().map(|(s, q)| (Arc::clone(s), *q)));
        return;
    };
    if let Some(child) = node.literal.get(*first) {
        visit(child, rest, false, out);
    }
    if !root_dollar {
        if let Some(plus) = &node.plus {
            visit(plus, rest, false, out);
        }
    }
}

/// Removes `session` from the filter `levels` below `node`; whether it was there. Prunes
/// children left empty.
fn remove_at(node: &mut Node, levels: &[&str], session: &str) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return false;
    };
    if *first == "#" {
        return node.hash.remove(session).is_some();
    }
    let (removed, empty) = if *first == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return false;
        };
        let removed = if rest.is_empty() {
            child.here.remove(session).is_some()
        } else {
            remove_at(child, rest, session)
        };
        (removed, child.is_empty())
    } else {
        let Some(child) = node.literal.get_mut(*first) else {
            return false;
        };
        let removed = if rest.is_empty() {
            child.here.remove(session).is_some()
        } else {
            remove_at(child, rest, session)
        };
        (removed, child.is_empty())
    };
    if empty {
        if *first == "+" {
            node.plus = None;
        } else {
            node.literal.remove(*first);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the test needs no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }
    }

    fn random_topic(rng: &mut Rng) -> String {
        let n = 1 + rng.next() % 4;
        let mut levels: Vec<&str> = (0..n).map(|_| rng.pick(&["a", "b", "", "c"])).collect();
        if rng.next() % 8 == 0 {
            levels[0] = "$sys";
        }
        levels.join("/")
    }

    fn random_filter(rng: &mut Rng) -> TopicFilter {
        loop {
            let n = rng.next() % 4;
            let mut levels: Vec<&str> = (0..n)
                .map(|_| rng.pick(&["a", "b", "", "+", "$sys"]))
                .collect();
            if n == 0 || rng.next() % 3 == 0 {
                levels.push("#");
            }
            // The only filter parse refuses here is the empty one.
            if let Ok(f) = TopicFilter::parse(&levels.join("/")) {
                return f;
            }
        }
    }

    #[test]
    fn matches_what_topic_filter_matches_says() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let mut index = FilterIndex::default();
            let mut held: Vec<(TopicFilter, Arc<str>, u8)> = Vec::new();
            for i in 0..(round % 30 + 1) {
                let filter = random_filter(&mut rng);
                let session: Arc<str> = format!("s{}", rng.next() % 6).into();
                let qos = (i % 2) as u8;
                index.insert(&filter, &session, qos);
                held.retain(|(f, s, _)| !(f == &filter && s == &session));
                held.push((filter, session, qos));
            }
            // Remove some again, including ones never inserted.
            for _ in 0..(round % 7) {
                let filter = random_filter(&mut rng);
                let session: Arc<str> = format!("s{}", rng.next() % 6).into();
                index.remove(&filter, &session);
                held.retain(|(f, s, _)| !(f == &filter && s == &session));
            }
            assert_eq!(index.len(), held.len());
            for _ in 0..20 {
                let topic = random_topic(&mut rng);
                let mut want: HashMap<Arc<str>, u8> = HashMap::new();
                for (f, s, q) in &held {
                    if f.matches(&topic) {
                        let e = want.entry(Arc::clone(s)).or_insert(*q);
                        *e = (*e).max(*q);
                    }
                }
                let mut got = Vec::new();
                index.matches(&topic, &mut got);
                let got_map: HashMap<Arc<str>, u8> = got.iter().cloned().collect();
                assert_eq!(
                    got.len(),
                    got_map.len(),
                    "one entry per session for {topic:?}"
                );
                assert_eq!(got_map, want, "topic {topic:?}");
            }
        }
    }

    #[test]
    fn removing_every_filter_leaves_an_empty_trie() {
        let mut index = FilterIndex::default();
        let s: Arc<str> = "dev".into();
        let filters: Vec<TopicFilter> = ["a/+/c", "a/#", "#", "+", "a/b"]
            .iter()
            .map(|f| TopicFilter::parse(f).unwrap())
            .collect();
        for f in &filters {
            index.insert(f, &s, 1);
        }
        assert_eq!(index.len(), 5);
        for f in &filters {
            index.remove(f, &s);
        }
        assert!(index.is_empty());
        assert!(index.root.is_empty());
    }
}

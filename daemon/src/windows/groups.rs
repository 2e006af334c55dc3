//! The groups of one open window. 10,000 devices keep 10,000 groups in each open window, and
//! two windows are open around every window's end (the next one fills while the last waits out
//! its allowed lateness), so a group is a few slices of shared vectors rather than a few
//! allocations of its own: its key (the JSON of its `GROUP BY` values) and partition key end to
//! end in two byte vectors, its accumulators in one vector of all the groups', and an index of
//! group numbers hashed by key. A new window is sized like the last one closed, so the vectors
//! do not double past what a fleet's window needs.

use std::hash::{BuildHasher, RandomState};
use std::ops::Range;

use hashbrown::HashTable;

use crate::rules::window::Acc;

/// What a window held: the next one is made this big from the start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    groups: usize,
    key_bytes: usize,
    partition_key_bytes: usize,
}

impl Sizes {
    /// Each size the larger of the two.
    pub fn max(self, other: Sizes) -> Sizes {
        Sizes {
            groups: self.groups.max(other.groups),
            key_bytes: self.key_bytes.max(other.key_bytes),
            partition_key_bytes: self.partition_key_bytes.max(other.partition_key_bytes),
        }
    }
}

pub struct Groups {
    /// Group numbers (first-seen order), hashed by key.
    index: HashTable<u32>,
    hasher: RandomState,
    /// Every group's key, end to end; group g's ends at `key_ends[g]`.
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    partition_keys: String,
    partition_key_ends: Vec<usize>,
    /// `per_group` accumulators for each group, in group order.
    accs: Vec<Acc>,
    per_group: usize,
}

/// Group `g`'s range in a vector of slices end to end.
fn span(ends: &[usize], g: usize) -> Range<usize> {
    let start = if g == 0 { 0 } else { ends[g - 1] };
    start..ends[g]
}

impl Groups {
    pub fn new(per_group: usize, like: Sizes) -> Self {
        Self {
            index: HashTable::with_capacity(like.groups),
            hasher: RandomState::new(),
            keys: Vec::with_capacity(like.key_bytes),
            key_ends: Vec::with_capacity(like.groups),
            partition_keys: String::with_capacity(like.partition_key_bytes),
            partition_key_ends: Vec::with_capacity(like.groups),
            accs: Vec::with_capacity(like.groups * per_group),
            per_group,
        }
    }

    pub fn len(&self) -> usize {
        self.key_ends.len()
    }

    pub fn sizes(&self) -> Sizes {
        Sizes {
            groups: self.len(),
            key_bytes: self.keys.len(),
            partition_key_bytes: self.partition_keys.len(),
        }
    }

    /// The accumulators of the group with this key; a new group gets `fresh()` ones (exactly
    /// `per_group` of them) and this partition key (its first row's).
    pub fn get_or_add(
        &mut self,
        key: &[u8],
        partition_key: &str,
        fresh: impl FnOnce() -> Vec<Acc>,
    ) -> &mut [Acc] {
        let Self {
            index,
            hasher,
            keys,
            key_ends,
            ..
        } = self;
        let hash = hasher.hash_one(key);
        let found = index
            .find(hash, |&g| keys[span(key_ends, g as usize)] == *key)
            .copied();
        let g = match found {
            Some(g) => g as usize,
            None => {
                let g = key_ends.len();
                keys.extend_from_slice(key);
                key_ends.push(keys.len());
                index.insert_unique(hash, g as u32, |&g| {
                    hasher.hash_one(&keys[span(key_ends, g as usize)])
                });
                self.partition_keys.push_str(partition_key);
                self.partition_key_ends.push(self.partition_keys.len());
                let accs = fresh();
                debug_assert_eq!(accs.len(), self.per_group);
                self.accs.extend(accs);
                g
            }
        };
        &mut self.accs[g * self.per_group..(g + 1) * self.per_group]
    }

    /// The groups numbered `groups` (in first-seen order): key, partition key, accumulators.
    pub fn range(&self, groups: Range<usize>) -> impl Iterator<Item = (&[u8], &str, &[Acc])> {
        groups.map(move |g| {
            (
                &self.keys[span(&self.key_ends, g)],
                &self.partition_keys[span(&self.partition_key_ends, g)],
                &self.accs[g * self.per_group..(g + 1) * self.per_group],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::value::Value;

    fn count() -> Vec<Acc> {
        vec![Acc::Rows(0), Acc::Count(0)]
    }

    #[test]
    fn groups_are_found_by_key_and_kept_in_first_seen_order() {
        let mut groups = Groups::new(2, Sizes::default());
        for (key, pk) in [("[\"b\"]", "pb"), ("[\"a\"]", "pa"), ("[\"b\"]", "other")] {
            for acc in groups.get_or_add(key.as_bytes(), pk, count) {
                acc.add(&Value::Int(1));
            }
        }
        // Many more, so that the index grows and rehashes by the stored keys.
        for i in 0..1000 {
            let key = format!("[{i}]");
            groups.get_or_add(key.as_bytes(), "", count)[0].add(&Value::Int(1));
        }
        assert_eq!(groups.len(), 1002);
        let all: Vec<_> = groups.range(0..groups.len()).collect();
        assert_eq!(all[0].0, b"[\"b\"]");
        // A group keeps its first row's partition key.
        assert_eq!(all[0].1, "pb");
        assert_eq!(all[0].2, [Acc::Rows(2), Acc::Count(2)]);
        assert_eq!((all[1].0, all[1].1), (&b"[\"a\"]"[..], "pa"));
        assert_eq!(all[1].2, [Acc::Rows(1), Acc::Count(1)]);
        assert_eq!(all[1001].0, b"[999]");
        assert_eq!(all[1001].2[0], Acc::Rows(1));
        // The next window starts the size of this one.
        let sizes = groups.sizes();
        let next = Groups::new(2, sizes);
        assert!(next.key_ends.capacity() >= 1002 && next.accs.capacity() >= 2004);
        assert!(next.keys.capacity() >= sizes.key_bytes);
    }
}

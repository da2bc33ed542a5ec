//! A set of node ids, as a 64-bit mask: the copyset of a directory entry.

use std::fmt;

use crate::{NodeId, MAX_NODES};

/// A set of nodes (ids below [`MAX_NODES`]).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NodeSet(u64);

impl NodeSet {
    /// The empty set.
    pub const EMPTY: NodeSet = NodeSet(0);

    /// The set holding only `node`.
    pub fn only(node: NodeId) -> NodeSet {
        let mut set = NodeSet::EMPTY;
        set.insert(node);
        set
    }

    /// The set whose members are the set bits of `bits` (the wire form; callers check the ids
    /// against the cluster).
    pub fn from_bits(bits: u64) -> NodeSet {
        NodeSet(bits)
    }

    /// The wire form: bit `n` set for each member `n`.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// Whether every member of `self` is in `other`.
    pub fn is_subset(self, other: NodeSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Adds `node`. Ids are validated against the layout before they reach a set.
    pub fn insert(&mut self, node: NodeId) {
        debug_assert!(node < MAX_NODES, "node id {node} beyond the copyset");
        self.0 |= 1u64 << node;
    }

    /// Removes `node`.
    pub fn remove(&mut self, node: NodeId) {
        self.0 &= !(1u64 << node);
    }

    /// Whether `node` is in the set.
    pub fn contains(self, node: NodeId) -> bool {
        node < MAX_NODES && self.0 & (1u64 << node) != 0
    }

    /// Number of nodes in the set.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The set without `node`.
    pub fn without(mut self, node: NodeId) -> NodeSet {
        self.remove(node);
        self
    }

    /// The lowest node of the set.
    pub fn first(self) -> Option<NodeId> {
        (self.0 != 0).then(|| self.0.trailing_zeros())
    }

    /// The nodes in increasing order.
    pub fn iter(self) -> impl Iterator<Item = NodeId> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let node = bits.trailing_zeros();
            bits &= bits - 1;
            Some(node)
        })
    }
}

impl fmt::Debug for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let mut set = NodeSet::EMPTY;
        assert!(set.is_empty());
        set.insert(3);
        set.insert(63);
        set.insert(0);
        assert_eq!(set.len(), 3);
        assert!(set.contains(63) && set.contains(0) && !set.contains(1));
        assert!(!set.contains(64));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 3, 63]);
        assert_eq!(set.without(0).first(), Some(3));
        assert_eq!(NodeSet::only(5).iter().collect::<Vec<_>>(), vec![5]);
        assert_eq!(NodeSet::from_bits(set.bits()), set);
        assert!(NodeSet::only(3).is_subset(set) && !NodeSet::only(4).is_subset(set));
        assert!(NodeSet::EMPTY.is_subset(NodeSet::EMPTY));
    }
}

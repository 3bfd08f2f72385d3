//! Where each polled offset of one partition stands, from the first one not yet
//! committed past.
//!
//! Offsets arrive in increasing order (a redelivered one is already present), and are
//! settled mostly in that order, so a sorted ring does every step in constant time in
//! the common case: a new offset goes at the back, an offset is found by its distance
//! from the front (offsets are dense unless the topic is compacted; then a binary
//! search finds it), and settled ones leave from the front. A `BTreeMap` did the same
//! with a tree walk and an allocation per few records, on the path every record takes
//! three times.

use std::collections::VecDeque;

/// Where one polled offset stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// In the buffer, not yet taken by `fetch`.
    Buffered,
    /// Handed to the runner.
    Leased,
    /// Its outcome is durable (acked, or its next lane confirmed).
    Settled,
}

/// Offsets polled and not yet committed past, in offset order.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    ring: VecDeque<(i64, Slot)>,
}

impl Slots {
    fn index(&self, offset: i64) -> Result<usize, usize> {
        let (Some(&(first, _)), Some(&(last, _))) = (self.ring.front(), self.ring.back()) else {
            return Err(0);
        };
        // A new offset, past every one here: the poll thread asks this of every record
        // it admits, and a binary search for it showed in profiles.
        if offset > last {
            return Err(self.ring.len());
        }
        // Dense offsets: the distance from the front is the index.
        if let Ok(i) = usize::try_from(offset - first)
            && self.ring.get(i).is_some_and(|(o, _)| *o == offset)
        {
            return Ok(i);
        }
        self.ring.binary_search_by_key(&offset, |(o, _)| *o)
    }

    pub(crate) fn get(&self, offset: i64) -> Option<Slot> {
        self.index(offset).ok().map(|i| self.ring[i].1)
    }

    /// Sets where `offset` stands, adding it if it is new.
    pub(crate) fn set(&mut self, offset: i64, slot: Slot) {
        match self.index(offset) {
            Ok(i) => self.ring[i].1 = slot,
            // A new offset past the back is pushed there (`index` answers it at once).
            Err(i) => self.ring.insert(i, (offset, slot)),
        }
    }

    /// Drops the settled offsets at the front: nothing below the first unsettled one
    /// needs remembering.
    pub(crate) fn prune(&mut self) {
        while self.ring.front().is_some_and(|(_, s)| *s == Slot::Settled) {
            self.ring.pop_front();
        }
    }

    /// The first offset not settled, with where it stands.
    pub(crate) fn first_unsettled(&self) -> Option<(i64, Slot)> {
        self.ring.iter().find(|(_, s)| *s != Slot::Settled).copied()
    }

    /// The last offset handed to the runner and not settled.
    pub(crate) fn last_leased(&self) -> Option<i64> {
        self.ring
            .iter()
            .rev()
            .find(|(_, s)| *s == Slot::Leased)
            .map(|(o, _)| *o)
    }

    /// How many offsets are not settled.
    pub(crate) fn unsettled(&self) -> usize {
        self.ring
            .iter()
            .filter(|(_, s)| *s != Slot::Settled)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_offsets_settle_from_the_front() {
        let mut s = Slots::default();
        for o in 10..20 {
            s.set(o, Slot::Buffered);
        }
        s.set(12, Slot::Leased);
        assert_eq!(s.get(12), Some(Slot::Leased));
        assert_eq!(s.get(20), None);
        assert_eq!(s.first_unsettled(), Some((10, Slot::Buffered)));
        s.set(10, Slot::Settled);
        s.set(11, Slot::Settled);
        s.prune();
        assert_eq!(s.first_unsettled(), Some((12, Slot::Leased)));
        assert_eq!(s.get(10), None);
        assert_eq!(s.unsettled(), 8);
        assert_eq!(s.last_leased(), Some(12));
    }

    #[test]
    fn sparse_and_out_of_order_offsets_are_found() {
        let mut s = Slots::default();
        // A compacted topic: gaps between offsets.
        for o in [5, 9, 30, 31, 100] {
            s.set(o, Slot::Buffered);
        }
        assert_eq!(s.get(30), Some(Slot::Buffered));
        assert_eq!(s.get(29), None);
        assert_eq!(s.get(101), None);
        assert_eq!(s.get(4), None);
        // An offset below the back (a held retry record let out late) goes in order.
        s.set(7, Slot::Buffered);
        s.set(5, Slot::Settled);
        s.prune();
        assert_eq!(s.first_unsettled(), Some((7, Slot::Buffered)));
        s.set(7, Slot::Settled);
        s.set(9, Slot::Leased);
        s.set(9, Slot::Buffered);
        s.prune();
        assert_eq!(s.first_unsettled(), Some((9, Slot::Buffered)));
        assert_eq!(s.unsettled(), 4);
        assert_eq!(s.last_leased(), None);
    }

    #[test]
    fn an_empty_partition_has_nothing_unsettled() {
        let mut s = Slots::default();
        s.set(3, Slot::Settled);
        s.prune();
        assert_eq!(s.first_unsettled(), None);
        assert_eq!(s.unsettled(), 0);
        s.set(4, Slot::Leased);
        assert_eq!(s.first_unsettled(), Some((4, Slot::Leased)));
    }
}

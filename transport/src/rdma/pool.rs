//! A pool of equal slots of registered memory: the send buffers and outgoing staging slots of
//! a connection. A slot is taken before it is filled and posted, and given back when its
//! completion arrives; the pool refuses a slot given back twice, since that would let two
//! posts share one buffer.

use std::collections::VecDeque;

/// Why a slot could not be given back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PoolError {
    /// The slot was not taken (given back twice): a bug in the RDMA backend's bookkeeping,
    /// which would let two posts share one buffer; report it.
    #[error("RDMA buffer {slot} was given back to its pool although it was not taken (a bug in the RDMA backend; please report it)")]
    NotTaken {
        /// The slot.
        slot: u32,
    },
    /// The slot does not exist: a completion named a buffer this pool never had.
    #[error("RDMA buffer {slot} does not exist in a pool of {slots} (a bug in the RDMA backend or a corrupt completion; please report it)")]
    Unknown {
        /// The slot.
        slot: u32,
        /// How many the pool has.
        slots: u32,
    },
}

/// Free-list of `slots` slots of `slot_len` bytes starting at `base` in a region.
#[derive(Debug)]
pub(crate) struct SlotPool {
    base: usize,
    slot_len: usize,
    free: VecDeque<u32>,
    taken: Vec<bool>,
}

impl SlotPool {
    pub(crate) fn new(base: usize, slot_len: usize, slots: u32) -> SlotPool {
        SlotPool {
            base,
            slot_len,
            free: (0..slots).collect(),
            taken: vec![false; slots as usize],
        }
    }

    /// A free slot, or `None` when every slot is posted.
    pub(crate) fn take(&mut self) -> Option<u32> {
        let slot = self.free.pop_front()?;
        self.taken[slot as usize] = true;
        Some(slot)
    }

    /// Gives a slot back once its post completed.
    pub(crate) fn give_back(&mut self, slot: u32) -> Result<(), PoolError> {
        let slots = self.slots();
        let taken = self
            .taken
            .get_mut(slot as usize)
            .ok_or(PoolError::Unknown { slot, slots })?;
        if !*taken {
            return Err(PoolError::NotTaken { slot });
        }
        *taken = false;
        self.free.push_back(slot);
        Ok(())
    }

    /// Offset of `slot` in the region.
    pub(crate) fn offset(&self, slot: u32) -> usize {
        self.base + slot as usize * self.slot_len
    }

    pub(crate) fn slots(&self) -> u32 {
        u32::try_from(self.taken.len()).unwrap_or(u32::MAX)
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_until_exhausted_then_give_back() {
        let mut pool = SlotPool::new(1000, 64, 3);
        let taken: Vec<u32> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(taken, vec![0, 1, 2]);
        assert_eq!(pool.take(), None, "an exhausted pool hands out nothing");
        assert_eq!(pool.available(), 0);
        pool.give_back(1).unwrap();
        assert_eq!(pool.take(), Some(1));
        assert_eq!(pool.offset(2), 1000 + 128);
    }

    #[test]
    fn no_slot_is_handed_out_twice_and_double_returns_are_refused() {
        let mut pool = SlotPool::new(0, 8, 4);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a, b);
        pool.give_back(a).unwrap();
        assert_eq!(pool.give_back(a), Err(PoolError::NotTaken { slot: a }));
        assert_eq!(
            pool.give_back(9),
            Err(PoolError::Unknown { slot: 9, slots: 4 })
        );
        let mut seen = std::collections::BTreeSet::new();
        while let Some(slot) = pool.take() {
            assert!(seen.insert(slot), "slot {slot} handed out twice");
        }
        assert_eq!(seen.len(), 3, "b is still taken");
        assert!(!seen.contains(&b));
    }
}

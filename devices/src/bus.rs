//! The port-I/O and MMIO buses: which device answers which address.

use std::sync::Arc;

/// A device on a bus. Accesses arrive with the accessing vCPU's index and the offset from the
/// start of the device's range; devices use interior mutability because vCPUs access them from
/// several threads.
pub trait BusDevice: Send + Sync {
    /// A read of `data.len()` bytes at `offset`.
    fn read(&self, vcpu: usize, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset`.
    fn write(&self, vcpu: usize, offset: u64, data: &[u8]);
}

/// Errors of bus setup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("device range {base:#x}+{len:#x} overlaps the device at {other:#x}+{other_len:#x}")]
    Overlap {
        /// First port or address of the range being added.
        base: u64,
        /// Length of the range being added.
        len: u64,
        /// First port or address of the device already on the bus.
        other: u64,
        /// Length of the range of the device already on the bus.
        other_len: u64,
    },
    /// A zero-length range.
    #[error("device range at {0:#x} is empty")]
    Empty(u64),
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A bus: sorted, non-overlapping ranges, looked up by binary search on every exit.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `base..base+len` for `device`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusError::Overlap {
                base,
                len,
                other: e.base,
                other_len: e.len,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr - e.base < e.len).then_some((e, addr - e.base))
    }

    /// Dispatches a read; `false` if no device claims `addr`.
    pub fn read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                e.device.read(vcpu, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` if no device claims `addr`.
    pub fn write(&self, vcpu: usize, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                e.device.write(vcpu, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(usize, u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, _vcpu: usize, offset: u64, data: &mut [u8]) {
            data.fill(crate::bits::low_u8(offset));
        }
        fn write(&self, vcpu: usize, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((vcpu, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let mut bus = Bus::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();
        assert!(bus.write(1, 0x3fa, &[7]));
        assert!(bus.write(0, 0x64, &[0xfe]));
        assert!(!bus.write(0, 0x400, &[1]));
        assert!(!bus.write(0, 0x3f7, &[1]));
        assert_eq!(a.0.lock().unwrap().as_slice(), &[(1, 2, vec![7])]);
        assert_eq!(b.0.lock().unwrap().as_slice(), &[(0, 4, vec![0xfe])]);
        let mut d = [0u8; 2];
        assert!(bus.read(0, 0x3ff, &mut d));
        assert_eq!(d, [7, 7]);
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Recorder::default()))
            .unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, Arc::new(Recorder::default())),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xf8, 0x10, Arc::new(Recorder::default())),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(0x200, 0, Arc::new(Recorder::default())),
            Err(BusError::Empty(0x200))
        );
        bus.insert(0x110, 1, Arc::new(Recorder::default())).unwrap();
    }
}

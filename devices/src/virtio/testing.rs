//! A minimal virtio driver for the device tests: sets a device up through the MMIO registers
//! and puts hand-written descriptor chains on queue 0.

#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::mmio::{reg, status, MmioTransport, VirtioInterrupt};
use super::{NoPins, VirtioDevice};

/// Descriptor table of queue 0.
pub const DESC: u64 = 0x1000;
/// Available ring of queue 0.
pub const AVAIL: u64 = 0x2000;
/// Used ring of queue 0.
pub const USED: u64 = 0x3000;
/// Where tests put buffers.
pub const DATA: u64 = 0x4000;
/// Queue q's rings are q * QUEUE_STRIDE above queue 0's.
pub const QUEUE_STRIDE: u64 = 0x10000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

#[derive(Default)]
pub struct TestIrq {
    pub level: AtomicBool,
    pub raised: AtomicUsize,
}

impl VirtioInterrupt for TestIrq {
    fn set_level(&self, asserted: bool) {
        if asserted {
            self.raised.fetch_add(1, Ordering::SeqCst);
        }
        self.level.store(asserted, Ordering::SeqCst);
    }
}

pub fn memory(len: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap()
}

pub struct Driver<M: GuestMemory> {
    pub t: MmioTransport<M>,
    pub mem: M,
    pub irq: Arc<TestIrq>,
    /// The queue the helpers address (see `select`).
    pub q: usize,
    sizes: [u16; 2],
    avail_idx: [u16; 2],
}

pub fn r32<M: GuestMemory>(t: &mut MmioTransport<M>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn w32<M: GuestMemory>(t: &mut MmioTransport<M>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

impl<M: GuestMemory + Clone> Driver<M> {
    /// A transport over `device` with no driver activity yet.
    pub fn bare(device: Box<dyn VirtioDevice<M>>, mem: M) -> Self {
        let irq = Arc::new(TestIrq::default());
        let t = MmioTransport::new(device, mem.clone(), Arc::new(NoPins), irq.clone());
        Self {
            t,
            mem,
            irq,
            q: 0,
            sizes: [0; 2],
            avail_idx: [0; 2],
        }
    }

    /// A driver for a transport built by the test (its interrupt is not observed).
    pub fn from_transport(t: MmioTransport<M>, mem: M) -> Self {
        Self {
            t,
            mem,
            irq: Arc::new(TestIrq::default()),
            q: 0,
            sizes: [0; 2],
            avail_idx: [0; 2],
        }
    }

    /// Negotiates every offered feature and sets queue 0 up with `size` entries.
    pub fn new(device: Box<dyn VirtioDevice<M>>, mem: M, size: u16) -> Self {
        let mut d = Self::bare(device, mem);
        d.negotiate();
        d.setup_queue(size);
        let s = d.status();
        w32(&mut d.t, reg::STATUS, s | status::DRIVER_OK);
        assert_ne!(d.status() & status::DRIVER_OK, 0);
        d
    }

    pub fn status(&mut self) -> u32 {
        r32(&mut self.t, reg::STATUS)
    }

    pub fn offered_features(&mut self) -> u64 {
        w32(&mut self.t, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r32(&mut self.t, reg::DEVICE_FEATURES);
        w32(&mut self.t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r32(&mut self.t, reg::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK; returns whether the device kept
    /// FEATURES_OK.
    pub fn try_features(&mut self, features: u64) -> bool {
        w32(&mut self.t, reg::STATUS, status::ACKNOWLEDGE);
        w32(
            &mut self.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        w32(&mut self.t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut self.t, reg::DRIVER_FEATURES, features as u32);
        w32(&mut self.t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut self.t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        let s = self.status() | status::FEATURES_OK;
        w32(&mut self.t, reg::STATUS, s);
        self.status() & status::FEATURES_OK != 0
    }

    pub fn negotiate(&mut self) {
        let f = self.offered_features();
        assert!(self.try_features(f));
    }

    /// Makes the helpers address queue `q` (0 or 1).
    pub fn select(&mut self, q: usize) {
        self.q = q;
    }

    fn base(&self) -> u64 {
        QUEUE_STRIDE * self.q as u64
    }

    pub fn setup_queue(&mut self, size: u16) {
        let (desc, avail, used) = (DESC + self.base(), AVAIL + self.base(), USED + self.base());
        w32(&mut self.t, reg::QUEUE_SEL, self.q as u32);
        w32(&mut self.t, reg::QUEUE_NUM, u32::from(size));
        w32(&mut self.t, reg::QUEUE_DESC_LOW, desc as u32);
        w32(&mut self.t, reg::QUEUE_DESC_HIGH, 0);
        w32(&mut self.t, reg::QUEUE_DRIVER_LOW, avail as u32);
        w32(&mut self.t, reg::QUEUE_DRIVER_HIGH, 0);
        w32(&mut self.t, reg::QUEUE_DEVICE_LOW, used as u32);
        w32(&mut self.t, reg::QUEUE_DEVICE_HIGH, 0);
        w32(&mut self.t, reg::QUEUE_READY, 1);
        self.sizes[self.q] = size;
    }

    /// Writes descriptor `index`.
    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + self.base() + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Writes a chain of `(addr, len, writable)` buffers at descriptors `first..`; returns the
    /// head index.
    pub fn chain(&self, first: u16, buffers: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, write)) in buffers.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= F_NEXT;
            }
            self.desc(index, addr, len, flags, index + 1);
        }
        first
    }

    /// Puts `head` on the available ring (without notifying).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx[self.q] % self.sizes[self.q]);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + self.base() + 4 + 2 * slot))
            .unwrap();
        self.set_avail_idx(self.avail_idx[self.q].wrapping_add(1));
    }

    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx[self.q] = idx;
        self.mem
            .write_obj(idx, GuestAddress(AVAIL + self.base() + 2))
            .unwrap();
    }

    pub fn notify(&mut self) {
        w32(&mut self.t, reg::QUEUE_NOTIFY, self.q as u32);
    }

    /// Publishes `head`, notifies, and returns its used element's (id, len).
    pub fn submit(&mut self, head: u16) -> (u32, u32) {
        let before = self.used_idx();
        self.publish(head);
        self.notify();
        assert_eq!(
            self.used_idx(),
            before.wrapping_add(1),
            "chain not returned"
        );
        self.used_elem(before)
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED + self.base() + 2))
            .unwrap()
    }

    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = USED + self.base() + 4 + 8 * u64::from(i % self.sizes[self.q]);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }
}

/// Bytes on each side of a [`GuardedMemory`].
const GUARD_LEN: usize = 0x1000;
/// What the guard areas hold.
const GUARD_BYTE: u8 = 0xa5;

/// Guest memory at GPA 0 placed between two guard areas of one host mapping, so that the
/// hostile-guest tests see any byte a device writes outside guest memory; dropping it unmaps
/// everything.
pub struct GuardedMemory {
    base: *mut u8,
    total: usize,
}

impl GuardedMemory {
    /// `len` bytes of zeroed guest memory (a multiple of the page size) between the guards.
    pub fn new(len: usize) -> (Self, GuestMemoryMmap) {
        use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
        let total = len + 2 * GUARD_LEN;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; the
        // result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        // SAFETY: `base..base + total` is the mapping just created, readable and writable.
        unsafe { std::ptr::write_bytes(base, GUARD_BYTE, total) };
        // SAFETY: `base + GUARD_LEN` is page-aligned and the `len` bytes after it lie inside
        // the mapping above, which outlives the region (callers drop the GuestMemoryMmap
        // before the GuardedMemory that unmaps).
        let region = unsafe {
            MmapRegion::build_raw(
                base.add(GUARD_LEN),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        mem.write_slice(&vec![0u8; len], GuestAddress(0)).unwrap();
        (Self { base, total }, mem)
    }

    /// Whether both guard areas still hold only the guard byte.
    pub fn guards_intact(&self) -> bool {
        let len = self.total - 2 * GUARD_LEN;
        // SAFETY: both guard areas lie inside the live mapping and nothing writes them while
        // this shared view exists (the device ran to completion before).
        let (front, back) = unsafe {
            (
                std::slice::from_raw_parts(self.base, GUARD_LEN),
                std::slice::from_raw_parts(self.base.add(GUARD_LEN + len), GUARD_LEN),
            )
        };
        front.iter().chain(back).all(|&b| b == GUARD_BYTE)
    }
}

impl Drop for GuardedMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no region refers to it any more.
        unsafe { libc::munmap(self.base.cast(), self.total) };
    }
}

#[test]
fn the_guard_check_sees_a_stray_write() {
    let len = 0x10000;
    let (guarded, mem) = GuardedMemory::new(len);
    drop(mem);
    assert!(guarded.guards_intact());
    // SAFETY: the byte just past guest memory lies inside the guard area of the mapping.
    unsafe { *guarded.base.add(GUARD_LEN + len) = 0 };
    assert!(!guarded.guards_intact());
}

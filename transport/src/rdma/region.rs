//! Memory a verbs device reads and writes on its own: allocated once, page-aligned, never
//! moved or freed while registered, so that its address can be handed to the device (and, for
//! the staging pool and the credit mailbox, to the peer).

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every region: a page, as verbs devices prefer.
const ALIGN: usize = 4096;

/// A zeroed, page-aligned allocation shared between this process and a device.
///
/// Who may touch which bytes is decided by the protocol, not by the borrow checker: a buffer
/// posted to the device belongs to the device until its completion, a staging slot belongs to
/// the sender until the receiver has delivered it. Hence the `unsafe` accessors.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is a plain allocation; every access goes through the `unsafe` accessors,
// whose callers guarantee that no two parties use the same bytes at once.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: shared access is coordinated by the callers of the accessors.
unsafe impl Sync for Region {}

impl Region {
    /// Allocates `len` zeroed bytes (at least one page).
    pub(crate) fn new(len: usize) -> Region {
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Region { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, ALIGN).expect("a page-aligned length is a valid layout")
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The address of byte `offset`, as the device sees it (this process's virtual address).
    pub(crate) fn addr(&self, offset: usize) -> u64 {
        assert!(
            offset <= self.len,
            "offset {offset} past a region of {}",
            self.len
        );
        self.ptr.as_ptr() as u64 + offset as u64
    }

    /// The offset of the device address `addr` with `len` bytes after it, if they lie inside.
    #[cfg(test)]
    pub(crate) fn offset_of(&self, addr: u64, len: usize) -> Option<usize> {
        let offset = usize::try_from(addr.checked_sub(self.addr(0))?).ok()?;
        (offset.checked_add(len)? <= self.len).then_some(offset)
    }

    /// Start of the allocation, for registration.
    pub(crate) fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes `offset..offset + len`, read-only.
    ///
    /// # Safety
    /// Nobody (no thread, no device) may write these bytes while the slice lives.
    pub(crate) unsafe fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked above) and not written meanwhile (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    /// Copies `data` to `offset`.
    ///
    /// # Safety
    /// Nobody else (no thread, no device) may read or write these bytes during the copy.
    pub(crate) unsafe fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: in bounds (checked above), a separate allocation from `data`, and owned by
        // the caller for the copy (its promise).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        }
    }

    /// The 8-byte aligned word at `offset`, read atomically (the device may write it at any
    /// time: the credit mailbox).
    pub(crate) fn load_u64(&self, offset: usize) -> u64 {
        self.word(offset).load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stores the 8-byte aligned word at `offset` atomically (the device may read it at any
    /// time).
    pub(crate) fn store_u64(&self, offset: usize, value: u64) {
        self.word(offset)
            .store(value, std::sync::atomic::Ordering::Release);
    }

    fn word(&self, offset: usize) -> &std::sync::atomic::AtomicU64 {
        self.check(offset, 8);
        assert!(offset % 8 == 0, "mailbox word at unaligned offset {offset}");
        // SAFETY: in bounds and 8-byte aligned (checked above; the base is page-aligned), and
        // these words are only ever accessed atomically by this process (the device writes
        // whole aligned words).
        unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(offset)
                .cast::<std::sync::atomic::AtomicU64>()
        }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "bytes {offset}+{len} past a region of {}",
            self.len
        );
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, and dropped once. The owner keeps
        // the region alive until the device registration is gone (see `Verbs`).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_back_to_offsets_only_inside() {
        let region = Region::new(100);
        assert_eq!(region.len(), 4096);
        assert_eq!(region.addr(0) % 4096, 0);
        assert_eq!(region.offset_of(region.addr(10), 20), Some(10));
        assert_eq!(region.offset_of(region.addr(4090), 7), None);
        assert_eq!(region.offset_of(region.addr(0) - 1, 1), None);
        region.store_u64(8, 42);
        assert_eq!(region.load_u64(8), 42);
        // SAFETY: nobody else uses this region.
        unsafe { region.write(100, b"abc") };
        // SAFETY: as above.
        assert_eq!(unsafe { region.bytes(100, 3) }, b"abc");
    }
}

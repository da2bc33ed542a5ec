//! Guest memory of one node.
//!
//! Backing: one private anonymous mapping (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`) that
//! covers guest-physical 0 up to the end of RAM, the MMIO gap included, so that a guest-physical
//! address is an offset into it and a page number is `gpa / 4096` on every node. We chose
//! anonymous memory over a memfd because the DSM needs exactly what userfaultfd offers for it
//! since Linux 5.7: MISSING faults for Invalid pages, write-protect faults for Shared pages,
//! `UFFDIO_COPY` (optionally write-protected) to install a page atomically, and `MADV_DONTNEED`
//! to drop one so that the next access faults again; a memfd would add page-cache semantics we do
//! not want (pages surviving a drop in the cache, shared-mapping writeback) for nothing in
//! return. `MAP_NORESERVE` because most of a large guest is never touched on a given node. Only
//! the RAM parts are registered with KVM; the gap stays unbacked address space.
//!
//! Every access the VMM makes goes through this mapping, so under the DSM it faults like a guest
//! access would.
//!
//! Under the DSM the mapping is registered with a userfaultfd, and the two must end in one order:
//! unmapped first, the userfaultfd closed after. Closing the userfaultfd of a registered range
//! wakes every thread blocked in a fault on it and retries the fault without userfaultfd, that is
//! against the bare anonymous page: zero where the DSM never installed one (`userfaultfd(2)`). A
//! vCPU blocked waiting for a peer's page would then run on zeros. So the registration is kept
//! here ([`GuestMemory::keep_registration`]) and released only by [`Drop`], after the unmap; and
//! every thread that may fault on guest memory (the vCPU threads, the loader on the main thread)
//! holds or borrows this `GuestMemory`, so the drop cannot run while one of them is blocked.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use resources::{Layout, RamRegion};

use crate::hypervisor::{HypervisorError, KvmVm};

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host would not give us the address space.
    #[error("cannot reserve {size} bytes of address space for guest memory: {source}")]
    Map {
        /// Bytes of guest memory asked for.
        size: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// A VMM access outside guest RAM (a bug or a bad guest-supplied address).
    #[error("guest-physical range {gpa:#x}..{end:#x} is not guest RAM")]
    OutOfRange {
        /// First guest-physical address of the access.
        gpa: u64,
        /// First guest-physical address past it.
        end: u64,
    },
    /// KVM refused the memory slot.
    #[error(transparent)]
    Register(#[from] HypervisorError),
}

/// The guest's RAM as this node maps it.
pub struct GuestMemory {
    base: NonNull<u8>,
    len: u64,
    ram: Vec<RamRegion>,
    /// The userfaultfd registration of the mapping, if any: released after the unmap (see the
    /// module doc).
    registration: Mutex<Option<Arc<dyn Send + Sync>>>,
}

// SAFETY: the mapping is plain memory shared by the vCPU and device threads; all accesses go
// through raw pointers with bounds checks, and concurrent guest accesses are the guest's business.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps the guest-physical space of `layout`.
    pub fn new(layout: &Layout) -> Result<Self, MemoryError> {
        let len = layout.ram_end();
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice; the result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                crate::convert::usize_from(len),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                size: len,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| MemoryError::Map {
            size: len,
            source: std::io::Error::other("null mapping"),
        })?;
        Ok(Self {
            base,
            len,
            ram: layout.ram.clone(),
            registration: Mutex::new(None),
        })
    }

    /// Keeps `registration` (what holds the userfaultfd this mapping is registered with) until
    /// the mapping is gone: see the module doc.
    pub fn keep_registration(&self, registration: Arc<dyn Send + Sync>) {
        *self.registration.lock().unwrap_or_else(|p| p.into_inner()) = Some(registration);
    }

    /// Registers the RAM regions with KVM, one slot each.
    pub fn register(&self, vm: &KvmVm) -> Result<(), MemoryError> {
        for (slot, region) in self.ram.iter().enumerate() {
            let host = self.base.as_ptr() as u64 + region.gpa;
            let slot = u32::try_from(slot).expect("a layout has a handful of RAM regions");
            // SAFETY: the region lies inside our mapping, which lives as long as `self`. The VM
            // is torn down before the mapping: `NodeVm` drops the VM fd before its reference to
            // `self`, and each vCPU thread (whose vCPU fd also holds the VM) holds a reference to
            // `self` that it drops after its vCPU fd.
            unsafe { vm.add_memory(slot, region.gpa, region.size, host)? };
        }
        Ok(())
    }

    /// Host address of guest-physical 0: the DSM registers `[host_base, host_base + len)`.
    pub fn host_base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length of the mapping (end of RAM, the gap included).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never, for a valid layout).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, gpa: u64, len: usize) -> Result<*mut u8, MemoryError> {
        let end = gpa
            .checked_add(len as u64)
            .ok_or(MemoryError::OutOfRange { gpa, end: u64::MAX })?;
        let inside = self
            .ram
            .iter()
            .any(|r| gpa >= r.gpa && end <= r.gpa + r.size);
        if !inside {
            return Err(MemoryError::OutOfRange { gpa, end });
        }
        // SAFETY: `gpa + len <= self.len` because every RAM region lies inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(crate::convert::usize_from(gpa)) })
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let dst = self.check(gpa, data.len())?;
        // SAFETY: `check` proved the destination lies inside guest RAM of our mapping; the source
        // is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies guest memory at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.check(gpa, out.len())?;
        // SAFETY: `check` proved the source lies inside guest RAM of our mapping.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), MemoryError> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        let registration = self
            .registration
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(registration) = registration {
            if Arc::strong_count(&registration) > 1 {
                // Something besides us still holds the registration (a DSM handle someone kept)
                // and may still use the range through it, which the registration's contract
                // forbids after an unmap. Keep both, mapped and registered, until the process
                // exits; no thread can reach the memory through `self` any more.
                std::mem::forget(registration);
                return;
            }
            // SAFETY: unmapping exactly what `new` mapped: this was the last reference to the
            // mapping and to its only registration, so nothing can touch the range any more.
            unsafe {
                libc::munmap(
                    self.base.as_ptr().cast(),
                    crate::convert::usize_from(self.len),
                )
            };
            // Only now: a thread still blocked in a fault (there can be none, see the module doc)
            // would fail on the missing mapping instead of reading a zero page.
            drop(registration);
            return;
        }
        // SAFETY: unmapping exactly what `new` mapped; no references into it outlive `self`.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                crate::convert::usize_from(self.len),
            )
        };
    }
}

//! Our guest memory as the `vm-memory` type linux-loader writes into and virtio queues read.

use std::sync::Arc;

use resources::Layout;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::memory::GuestMemory;

use super::BootError;

/// A `GuestMemoryMmap` whose regions are the RAM regions of `layout` inside `mem`'s mapping.
/// It does not own the mapping: it borrows `mem` for as long as it lives.
pub(crate) struct VmMemoryView<'a> {
    pub(crate) guest: GuestMemoryMmap,
    _mem: &'a GuestMemory,
}

impl<'a> VmMemoryView<'a> {
    /// Wraps the RAM of `layout` in `mem`.
    pub(crate) fn new(mem: &'a GuestMemory, layout: &Layout) -> Result<Self, BootError> {
        // SAFETY: the view borrows `mem`, so the regions cannot outlive its mapping.
        let guest = unsafe { regions_over(mem, layout)? };
        Ok(Self { guest, _mem: mem })
    }
}

/// Like [`VmMemoryView`], but sharing ownership of the mapping: for device models, which hold
/// guest memory for as long as the platform lives.
pub struct SharedVmMemory {
    guest: GuestMemoryMmap,
    // Declared after `guest`, so dropped after it: the mapping outlives every region over it.
    _mem: Arc<GuestMemory>,
}

impl SharedVmMemory {
    /// Wraps the RAM of `layout` in `mem`, keeping `mem` alive.
    pub fn new(mem: Arc<GuestMemory>, layout: &Layout) -> Result<Self, BootError> {
        // SAFETY: `_mem` keeps the mapping alive for as long as `guest` exists (field order).
        let guest = unsafe { regions_over(&mem, layout)? };
        Ok(Self { guest, _mem: mem })
    }

    /// The `vm-memory` view (do not keep clones of it beyond this value's life).
    pub fn guest(&self) -> &GuestMemoryMmap {
        &self.guest
    }
}

/// The RAM regions of `layout` inside `mem`'s mapping, as `vm-memory` regions.
///
/// # Safety
/// The result (and every clone of it) must not be used after `mem`'s mapping is gone.
unsafe fn regions_over(mem: &GuestMemory, layout: &Layout) -> Result<GuestMemoryMmap, BootError> {
    if mem.len() < layout.ram_end() {
        return Err(BootError::MemoryView(format!(
            "the mapping is {:#x} bytes but the layout's RAM ends at {:#x}",
            mem.len(),
            layout.ram_end()
        )));
    }
    let mut regions = Vec::with_capacity(layout.ram.len());
    for region in &layout.ram {
        // SAFETY: `region` lies inside `mem`'s mapping (checked above: the mapping covers
        // 0..ram_end), which was made with exactly these protection and flags; the caller
        // keeps it mapped while the result lives, and `build_raw` regions never unmap what
        // they did not map.
        let mapping = unsafe {
            MmapRegion::build_raw(
                mem.host_base().add(crate::convert::usize_from(region.gpa)),
                crate::convert::usize_from(region.size),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| BootError::MemoryView(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(region.gpa))
            .ok_or_else(|| BootError::MemoryView("region overflows".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| BootError::MemoryView(e.to_string()))
}

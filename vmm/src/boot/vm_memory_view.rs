//! Our guest memory as the `vm-memory` type linux-loader writes into.

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
            // 0..ram_end), which was made with exactly these protection and flags and stays
            // mapped while `mem` lives; the view borrows `mem`, so it cannot outlive the
            // mapping, and `build_raw` regions never unmap what they did not map.
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
        let guest = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| BootError::MemoryView(e.to_string()))?;
        Ok(Self { guest, _mem: mem })
    }
}

//! The e820 memory map handed to the kernel in the zero page.

use resources::{Layout, MMIO_GAP_END, MMIO_GAP_START};

use super::memory_map::{HIMEM_START, LEGACY_HOLE_START};

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved: the legacy hole (which holds the ACPI tables) and the MMIO gap.
pub const E820_RESERVED: u32 = 2;
/// ACPI tables the OS may reclaim (unused: ours sit in the reserved legacy hole).
pub const E820_ACPI: u32 = 3;

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map of `layout`, ascending: its RAM regions, with the legacy hole
/// (`0x9fc00..0x100000`) cut out of the first one and reserved, and the MMIO gap
/// (`0xC000_0000..4 GiB`, where the IOAPIC, the local APIC and the devices live) reserved.
pub fn e820_map(layout: &Layout) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let mut push = |addr: u64, end: u64, kind: u32| {
        if end > addr {
            map.push(E820Entry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    let mut gap_done = false;
    for region in &layout.ram {
        if !gap_done && region.gpa >= MMIO_GAP_END {
            push(MMIO_GAP_START, MMIO_GAP_END, E820_RESERVED);
            gap_done = true;
        }
        let (start, end) = (region.gpa, region.end());
        if start < HIMEM_START {
            push(start, end.min(LEGACY_HOLE_START), E820_RAM);
            push(
                start.max(LEGACY_HOLE_START),
                end.min(HIMEM_START),
                E820_RESERVED,
            );
            push(start.max(HIMEM_START), end, E820_RAM);
        } else {
            push(start, end, E820_RAM);
        }
    }
    if !gap_done {
        push(MMIO_GAP_START, MMIO_GAP_END, E820_RESERVED);
    }
    map
}

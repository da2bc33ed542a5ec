//! The boot page tables and GDT the 64-bit boot protocol enters the kernel with.

use crate::memory::GuestMemory;

use super::memory_map::{GDT_ADDR, GDT_ENTRIES, IDENTITY_MAP_GIB, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use super::BootError;

/// Page-table entry bits.
pub(crate) const PTE_PRESENT: u64 = 1;
pub(crate) const PTE_WRITABLE: u64 = 1 << 1;
pub(crate) const PTE_ACCESSED: u64 = 1 << 5;
pub(crate) const PTE_DIRTY: u64 = 1 << 6;
pub(crate) const PTE_HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const HUGE_PAGE: u64 = 2 << 20;

/// GDT descriptors: a 64-bit code segment (`__BOOT_CS`), a flat data segment (`__BOOT_DS`) and
/// a 32-bit busy TSS for the task register; base 0, limit 4 GiB (page granular).
pub(crate) const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
pub(crate) const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
pub(crate) const GDT_TSS: u64 = 0x008f_8b00_0000_ffff;
/// The boot GDT, indexed by selector / 8.
pub(crate) const GDT: [u64; GDT_ENTRIES] = [0, 0, GDT_CODE64, GDT_DATA, GDT_TSS];

/// Writes the identity map of the first [`IDENTITY_MAP_GIB`] GiB in 2 MiB pages (PML4 at
/// [`PML4_ADDR`]) and the boot GDT at [`GDT_ADDR`].
pub fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    // Accessed and dirty are preset: otherwise the CPU sets them on first use, and under the
    // DSM every node's first touch of a 2 MiB page would pull the page-table page over for a
    // one-bit write.
    let table = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED;
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | table).to_le_bytes());
    mem.write(PML4_ADDR, &pml4)?;
    let mut pdpt = vec![0u8; 4096];
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PD_ADDR + gib * 4096;
        let at = crate::convert::usize_from(gib) * 8;
        pdpt[at..at + 8].copy_from_slice(&(pd | table).to_le_bytes());
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| {
                ((gib * GIB + i * HUGE_PAGE) | table | PTE_DIRTY | PTE_HUGE).to_le_bytes()
            })
            .collect();
        mem.write(pd, &entries)?;
    }
    mem.write(PDPT_ADDR, &pdpt)?;

    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &gdt)?;
    Ok(())
}

//! The boot identity map and GDT, checked by walking them as the CPU would.

use super::support::*;
use crate::boot::memory_map::*;
use crate::boot::page_tables::{PTE_ACCESSED, PTE_DIRTY, PTE_HUGE, PTE_PRESENT, PTE_WRITABLE};
use crate::boot::registers::segment_from_descriptor;
use crate::boot::*;
use crate::memory::GuestMemory;

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates `va` through the 4-level tables at `cr3` in `mem`, checking that every level is
/// present and writable; `None` if a level is not present.
fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let index = (va >> (12 + 9 * level)) & 0x1ff;
        let entry = mem.read_u64(table + index * 8).unwrap();
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        assert_ne!(
            entry & PTE_WRITABLE,
            0,
            "level {level} entry {entry:#x} read-only"
        );
        assert_ne!(entry & PTE_ACCESSED, 0, "accessed bit preset");
        if entry & PTE_HUGE != 0 {
            assert_eq!(level, 1, "only 2 MiB pages are used");
            assert_ne!(entry & PTE_DIRTY, 0, "dirty bit preset");
            let base = entry & ADDR_MASK & !0x1f_ffff;
            return Some(base | (va & 0x1f_ffff));
        }
        table = entry & ADDR_MASK;
    }
    panic!("4 KiB pages are not used by the boot map");
}

#[test]
fn identity_map_covers_the_low_4_gib() {
    let layout = layout(5 * 1024, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    write_page_tables(&mem).unwrap();
    // What the kernel touches before it switches to its own tables: itself, the zero page,
    // the command line, an initrd at the top of low memory, and the APIC windows.
    for va in [
        0,
        ZERO_PAGE_ADDR,
        CMDLINE_ADDR,
        HIMEM_START,
        ELF_ENTRY,
        0x4000_0000 - 1,
        0x7fff_f000,
        0xbfff_ffff,
        0xfec0_0000,
        0xfee0_0000,
        0xffff_ffff,
    ] {
        assert_eq!(translate(&mem, PML4_ADDR, va), Some(va), "{va:#x}");
    }
    // Nothing above 4 GiB is mapped (the kernel maps it itself).
    assert_eq!(translate(&mem, PML4_ADDR, 0x1_0000_0000), None);
    assert_eq!(translate(&mem, PML4_ADDR, 0xffff_ffff_8100_0000), None);
    // Exactly IDENTITY_MAP_GIB page directories, each of 512 huge pages.
    for gib in 0..IDENTITY_MAP_GIB {
        let pdpte = mem.read_u64(PDPT_ADDR + gib * 8).unwrap();
        assert_eq!(pdpte & ADDR_MASK, PD_ADDR + gib * 4096);
        for i in [0u64, 1, 511] {
            let pde = mem.read_u64(PD_ADDR + gib * 4096 + i * 8).unwrap();
            assert_eq!(pde & ADDR_MASK, (gib << 30) + (i << 21));
        }
    }
}

#[test]
fn gdt_holds_the_boot_protocol_segments() {
    let layout = layout(256, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    write_page_tables(&mem).unwrap();
    let descriptor = |sel: u16| mem.read_u64(GDT_ADDR + u64::from(sel)).unwrap();
    assert_eq!(descriptor(0), 0);
    let cs = segment_from_descriptor(BOOT_CS, descriptor(BOOT_CS));
    assert_eq!((cs.type_, cs.s, cs.present, cs.dpl), (0xb, 1, 1, 0));
    assert_eq!((cs.l, cs.db), (1, 0), "64-bit code segment");
    let ds = segment_from_descriptor(BOOT_DS, descriptor(BOOT_DS));
    assert_eq!((ds.type_, ds.s, ds.present), (0x3, 1, 1));
    assert_eq!((ds.base, ds.limit, ds.g, ds.db), (0, 0xffff_ffff, 1, 1));
    let tr = segment_from_descriptor(BOOT_TSS, descriptor(BOOT_TSS));
    assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1), "busy TSS");
}

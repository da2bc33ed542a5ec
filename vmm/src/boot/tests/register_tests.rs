//! The register states of the BSP at kernel entry and of an AP after SIPI.

use kvm_bindings::kvm_sregs;

use crate::boot::memory_map::*;
use crate::boot::registers::{long_mode_sregs, sipi_sregs};

#[test]
fn bsp_enters_long_mode_with_the_boot_selectors() {
    let mut sregs = kvm_sregs::default();
    long_mode_sregs(&mut sregs, PML4_ADDR);
    assert_eq!(sregs.cs.selector, 0x10);
    assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.present), (1, 0, 1));
    for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
        assert_eq!(seg.selector, 0x18);
        assert_eq!((seg.type_, seg.base, seg.limit), (0x3, 0, 0xffff_ffff));
    }
    assert_eq!(sregs.tr.selector, BOOT_TSS);
    assert_eq!((sregs.gdt.base, sregs.gdt.limit), (GDT_ADDR, 39));
    assert_eq!(sregs.cr3, PML4_ADDR);
    assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001, "PG and PE");
    assert_eq!(sregs.cr0 & 0x6000_0000, 0, "caches enabled");
    assert_ne!(sregs.cr4 & 0x20, 0, "PAE");
    assert_eq!(sregs.efer & 0x500, 0x500, "LME and LMA");
}

#[test]
fn ap_starts_in_real_mode_at_the_sipi_page() {
    let mut sregs = kvm_sregs::default();
    long_mode_sregs(&mut sregs, PML4_ADDR);
    sipi_sregs(&mut sregs, 0x9a);
    assert_eq!(sregs.cs.selector, 0x9a00);
    assert_eq!(sregs.cs.base, 0x9a000);
    assert_eq!((sregs.cs.limit, sregs.cs.l, sregs.cs.db), (0xffff, 0, 0));
    for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
        assert_eq!((seg.selector, seg.base, seg.limit), (0, 0, 0xffff));
    }
    assert_eq!(sregs.cr0, 0x6000_0010, "INIT value: CD, NW, ET");
    assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
    assert_eq!((sregs.idt.base, sregs.idt.limit), (0, 0xffff));
}

//! Where the boot structures of a Linux guest live in guest-physical memory.
//!
//! Everything below 1 MiB except the kernel and initrd: the low 640 KiB hold the GDT, the zero
//! page, a boot stack, the page tables and the command line; the legacy BIOS area
//! (`LEGACY_HOLE_START..HIMEM_START`, reserved in the e820 map) holds the ACPI tables, so that a
//! guest which scans `0xE0000..0xFFFFF` for the RSDP finds it too.

/// The boot GDT: null, null, `__BOOT_CS`, `__BOOT_DS`, TSS.
pub const GDT_ADDR: u64 = 0x500;
/// Entries of the boot GDT.
pub const GDT_ENTRIES: usize = 5;
/// The code segment selector of the 64-bit boot protocol (Linux's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// The data segment selector of the 64-bit boot protocol (Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// The task register selector (KVM wants a valid TSS in long mode).
pub const BOOT_TSS: u16 = 0x20;
/// The zero page (`struct boot_params`), 4 KiB.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer: the kernel sets its own at once, this only keeps the first
/// instructions safe.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Page-map level 4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// The one page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// The first of [`IDENTITY_MAP_GIB`] page directories of 2 MiB pages.
pub const PD_ADDR: u64 = 0xb000;
/// How much the boot page tables identity-map: all of the 32-bit space, which holds the
/// kernel, the zero page, the command line and the initrd.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// End (exclusive) of the command-line area.
pub const CMDLINE_AREA_END: u64 = 0x30000;
/// Start of the legacy hole (EBDA, video memory, option and BIOS ROMs), reserved in e820.
pub const LEGACY_HOLE_START: u64 = 0x9fc00;
/// End of the legacy hole: the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The RSDP, at the start of the area a legacy scan searches.
pub const ACPI_RSDP_ADDR: u64 = 0xe0000;
/// First address after the RSDP where the other ACPI tables go.
pub const ACPI_TABLES_ADDR: u64 = 0xe0040;
/// End (exclusive) of the ACPI area.
pub const ACPI_AREA_END: u64 = HIMEM_START;

// Guest-physical layout of a probe guest. This file is the single source of truth: build.rs
// `include!`s it and writes the same values as assembler `.equ` lines for the probe sources, so
// the loader and the probes cannot disagree. Plain `pub const` items only (build.rs parses
// nothing, it evaluates them).

/// The GDT: null, kernel code, kernel data, user data, user code, then one 16-byte TSS
/// descriptor per vCPU.
pub const GDT_ADDR: u64 = 0x1000;
/// Interrupt descriptor table, 256 gates of 16 bytes.
pub const IDT_ADDR: u64 = 0x3000;
/// One slot per vCPU for its 64-bit TSS: 104 bytes, then an I/O permission bitmap that lets
/// CPL3 use ports `0..TSS_IO_PORTS` (the console and the probe device), then the 0xff byte the
/// CPU reads past the bitmap's end.
pub const TSS_ADDR: u64 = 0x100000;
/// Bytes of one vCPU's TSS slot.
pub const TSS_SLOT: u64 = 512;
/// Ports `0..TSS_IO_PORTS` are open to CPL3 through the I/O permission bitmap.
pub const TSS_IO_PORTS: u64 = 0x800;
/// One 64-byte slot per vCPU for its kvmclock (pvclock) structure.
pub const PVCLOCK_ADDR: u64 = 0xC000;
/// Bytes of one vCPU's pvclock slot.
pub const PVCLOCK_SLOT: u64 = 64;
/// Page tables: PML4, PDPT, then page directories of 2 MiB pages, identity map.
pub const PML4_ADDR: u64 = 0x10000;
/// The page directory pointer table under the PML4's first entry.
pub const PDPT_ADDR: u64 = 0x11000;
/// The first page directory; one follows per identity-mapped GiB.
pub const PD_ADDR: u64 = 0x12000;
/// End of the page-table area (exclusive): bounds how many GiB can be identity mapped.
pub const PAGE_TABLES_END: u64 = 0x100000;
/// Per-vCPU stack blocks: `STACKS_ADDR + i * STACK_BLOCK`; the kernel stack grows down from
/// `+ KERNEL_STACK_TOP`, the user stack from the end of the block. Interrupt handlers find their
/// vCPU index from the kernel stack pointer.
pub const STACKS_ADDR: u64 = 0x300000;
/// Bytes of one vCPU's stack block (kernel and user stack).
pub const STACK_BLOCK: u64 = 0x8000;
/// Offset in a stack block where the kernel stack starts, growing down.
pub const KERNEL_STACK_TOP: u64 = 0x2000;
/// Where probe images are linked and loaded; they may be at most `PROBE_IMAGE_MAX` bytes.
pub const PROBE_LOAD_ADDR: u64 = 0x200000;
/// Largest probe image in bytes.
pub const PROBE_IMAGE_MAX: u64 = 0x100000;
/// First byte of guest memory free for the probe's own data.
pub const PROBE_DATA_ADDR: u64 = 0xB00000;
/// Most vCPUs a probe guest can have (xAPIC physical IDs).
pub const PROBE_MAX_VCPUS: u64 = 255;

/// GDT selector of the 64-bit kernel code segment.
pub const KERNEL_CS: u64 = 0x08;
/// GDT selector of the kernel data segment.
pub const KERNEL_DS: u64 = 0x10;
/// GDT selector (RPL 3) of the user data segment.
pub const USER_DS: u64 = 0x1b;
/// GDT selector (RPL 3) of the 64-bit user code segment.
pub const USER_CS: u64 = 0x23;
/// GDT selector of vCPU 0's TSS; each further vCPU's is 16 bytes on.
pub const TSS_SELECTOR_BASE: u64 = 0x28;

/// The probe device's key port (see devices::probe_port): the 4-byte name of a report.
pub const PROBE_PORT_KEY: u64 = 0x500;
/// The probe device's port for bits 31:0 of a reported value.
pub const PROBE_PORT_VALUE_LO: u64 = 0x504;
/// The probe device's port for bits 63:32 of a reported value; writing it sends the report.
pub const PROBE_PORT_VALUE_HI: u64 = 0x508;
/// The probe device's exit port: the probe's status, 0 for success.
pub const PROBE_PORT_EXIT: u64 = 0x50c;
/// Writes to this port do nothing: the cheapest exit, used by `spanvm bench exits`.
pub const PROBE_PORT_NOP: u64 = 0x510;
/// An unclaimed MMIO address in the gap: reads return all ones, writes are ignored.
pub const PROBE_MMIO_NOP: u64 = 0xD000_0000;
/// The master's IRQ line driver (see devices::irq_driver): `out` of `pin | op << 8`.
pub const IRQ_DRIVER_PORT: u64 = 0x520;

/// The COM1 serial console's first port.
pub const COM1_PORT: u64 = 0x3f8;
/// Guest-physical base of the local APIC page (xAPIC mode).
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// Guest-physical base of the IOAPIC's registers.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;

/// Magic at the start of every probe image ("SPANPRB1" little-endian).
pub const PROBE_MAGIC: u64 = 0x3142_5250_4E41_5053;

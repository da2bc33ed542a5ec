//! x86-64 architectural constants the VMM sets or reads in guest state (SDM vol. 3): control
//! register and EFER bits, page-table entry bits, and the MSRs of the SYSCALL machinery. One
//! place, so the probe loader, the Linux boot path and the kvm_pvm repair agree.

/// CR0: protection enable.
pub const CR0_PE: u64 = 1;
/// CR0: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0: task switched (lazy FPU).
pub const CR0_TS: u64 = 1 << 3;
/// CR0: extension type (always 1).
pub const CR0_ET: u64 = 1 << 4;
/// CR0: native FPU error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0: write protect at CPL0.
pub const CR0_WP: u64 = 1 << 16;
/// CR0: not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// CR0: cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;

/// CR4: physical address extension (needed for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4: FXSAVE/FXRSTOR and SSE enabled.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4: unmasked SIMD floating-point exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4: RDFSBASE and friends allowed.
pub const CR4_FSGSBASE: u64 = 1 << 16;

/// EFER: SYSCALL/SYSRET enabled.
pub const EFER_SCE: u64 = 1;
/// EFER: long mode enabled.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Page-table entry: present.
pub const PTE_PRESENT: u64 = 1;
/// Page-table entry: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry: user-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Page-table entry: accessed (set up front so the CPU never writes it).
pub const PTE_ACCESSED: u64 = 1 << 5;
/// Page-table entry: dirty (likewise).
pub const PTE_DIRTY: u64 = 1 << 6;
/// Page-directory entry: a 2 MiB page (1 GiB in a PDPT entry).
pub const PTE_HUGE: u64 = 1 << 7;

/// SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// RFLAGS bits SYSCALL clears (FMASK).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// The GS base SWAPGS exchanges with.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// What RDPID and RDTSCP return in ECX.
pub const MSR_TSC_AUX: u32 = 0xc000_0103;

//! vCPU state at kernel entry (the BSP) and after INIT/SIPI (application processors).

use crate::arch::{
    CR0_CD, CR0_ET, CR0_NE, CR0_NW, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, MSR_CSTAR,
    MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK,
};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::loader::LinuxBoot;
use super::memory_map::{BOOT_CS, BOOT_DS, BOOT_TSS, GDT_ADDR, GDT_ENTRIES};
use super::page_tables::GDT;
use super::BootError;

/// RFLAGS with only the always-one bit set (interrupts off).
const RFLAGS_RESERVED: u64 = 0x2;
/// EDX after INIT: the processor signature (family 6), as the SDM's INIT state has it.
const INIT_EDX: u64 = 0x600;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MISC_ENABLE: fast string operations enabled, as firmware leaves it.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back (what firmware sets up; with MTRRs
/// off Linux would treat all memory as uncached).
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// The MSR values firmware leaves for an OS: caching on, fast strings on, the syscall MSRs
/// clear.
pub(crate) const BOOT_MSRS: [(u32, u64); 10] = [
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
];

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Registers { what, source }
}

/// The KVM segment a GDT descriptor describes, loaded with `selector`.
pub(crate) fn segment_from_descriptor(selector: u16, d: u64) -> kvm_segment {
    let base = ((d >> 16) & 0xff_ffff) | ((d >> 56) << 24);
    let raw_limit = (d & 0xffff) | (((d >> 48) & 0xf) << 16);
    let granular = (d >> 55) & 1 == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).expect("a 20-bit limit scaled by 4 KiB fits 32 bits"),
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g: u8::from(granular),
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Sets `sregs` to the 64-bit boot protocol's state: long mode with paging through the boot
/// identity map, CS = `__BOOT_CS`, the data segments = `__BOOT_DS`.
pub(crate) fn long_mode_sregs(sregs: &mut kvm_sregs, page_table_root: u64) {
    let gdt = |sel: u16| GDT[usize::from(sel / 8)];
    sregs.cs = segment_from_descriptor(BOOT_CS, gdt(BOOT_CS));
    let data = segment_from_descriptor(BOOT_DS, gdt(BOOT_DS));
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_descriptor(BOOT_TSS, gdt(BOOT_TSS));
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(GDT_ENTRIES * 8 - 1).expect("the boot GDT is a few entries");
    // No IDT: the kernel loads its own before it enables interrupts, and an exception
    // before that is a triple fault, which shows as a shutdown exit rather than a hang.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = page_table_root;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Sets `sregs` to the state after INIT followed by SIPI with `vector`: real mode, CS
/// selector `vector << 8` with base `vector << 12`, everything else as the SDM's INIT state
/// (flat 64 KiB data segments, caches disabled, no paging).
pub(crate) fn sipi_sregs(sregs: &mut kvm_sregs, vector: u8) {
    let real_mode = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = real_mode(u16::from(vector) << 8, 0xb);
    let data = real_mode(0, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.ldt = kvm_segment {
        type_: 0x2,
        s: 0,
        ..real_mode(0, 0x2)
    };
    sregs.tr = kvm_segment {
        type_: 0xb,
        s: 0,
        ..real_mode(0, 0xb)
    };
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0xffff;
    sregs.idt.base = 0;
    sregs.idt.limit = 0xffff;
    sregs.cr0 = CR0_CD | CR0_NW | CR0_ET;
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Writes the MSR values firmware leaves for an OS ([`BOOT_MSRS`]).
pub fn set_boot_msrs(fd: &VcpuFd) -> Result<(), BootError> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| BootError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm_err("MSRs"))?;
    if set != entries.len() {
        return Err(BootError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Puts the boot vCPU at the kernel's 64-bit entry: long mode through the boot page tables,
/// `__BOOT_CS`/`__BOOT_DS` of the boot GDT, RSI = the zero page, interrupts off, the x87/SSE
/// state and MSRs as firmware leaves them.
pub fn setup_bsp(fd: &VcpuFd, boot: &LinuxBoot) -> Result<(), BootError> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("special registers"))?;
    long_mode_sregs(&mut sregs, boot.page_table_root);
    fd.set_sregs(&sregs).map_err(kvm_err("special registers"))?;
    let regs = kvm_regs {
        rip: boot.entry,
        rsi: boot.boot_params,
        rsp: boot.stack_top,
        rbp: boot.stack_top,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm_err("registers"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm_err("FPU state"))?;
    set_boot_msrs(fd)
}

/// Puts an application processor that received INIT and then SIPI with `vector` at the start
/// of its real-mode trampoline (`vector << 12`, IP 0), with the SDM's INIT state for the
/// other registers. It also writes [`BOOT_MSRS`], so that every AP starts with the MTRR
/// setup firmware would have given it.
pub fn setup_ap_for_sipi(fd: &VcpuFd, vector: u8) -> Result<(), BootError> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("special registers"))?;
    sipi_sregs(&mut sregs, vector);
    fd.set_sregs(&sregs).map_err(kvm_err("special registers"))?;
    let regs = kvm_regs {
        rip: 0,
        rdx: INIT_EDX,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm_err("registers"))?;
    set_boot_msrs(fd)
}

//! What the repaired instructions do, as pure functions of register and memory values, so that
//! they can be checked without a vCPU: register access by encoding number, effective
//! addresses, flag results, the SYSCALL and SYSRET state transitions, and the reading of IDT
//! gates and exception frames.

use crate::convert::{bits_of_i64, i64_of_bits};
use kvm_bindings::{kvm_regs, kvm_segment};

use super::decode::{Base, Gpr, MemoryOperand, OperandSize};

/// RFLAGS.CF (carry).
pub const RFLAGS_CF: u64 = 1 << 0;
/// Bit 1 of RFLAGS is always 1.
pub const RFLAGS_FIXED: u64 = 1 << 1;
/// RFLAGS.PF (parity).
pub const RFLAGS_PF: u64 = 1 << 2;
/// RFLAGS.AF (auxiliary carry).
pub const RFLAGS_AF: u64 = 1 << 4;
/// RFLAGS.ZF (zero).
pub const RFLAGS_ZF: u64 = 1 << 6;
/// RFLAGS.SF (sign).
pub const RFLAGS_SF: u64 = 1 << 7;
/// RFLAGS.IF (interrupts enabled).
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.OF (overflow).
pub const RFLAGS_OF: u64 = 1 << 11;
/// RFLAGS.RF (resume), which SYSCALL clears.
pub const RFLAGS_RF: u64 = 1 << 16;
/// Alignment check / SMAP override, set by `stac` and cleared by `clac`.
pub const RFLAGS_AC: u64 = 1 << 18;
/// The arithmetic flags `popcnt`, `rdrand` and `rdseed` define.
const ARITHMETIC_FLAGS: u64 = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;
/// The RFLAGS bits SYSRET loads from R11 (SDM: `R11 AND 3C7FD7H`).
const SYSRET_RFLAGS_MASK: u64 = 0x3c_7fd7;

/// `endbr64`: the first instruction of an indirect-branch target when the guest kernel is
/// built for IBT; it may precede the `clac` of an exception entry.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The value of general-purpose register `reg`.
pub fn gpr(regs: &kvm_regs, reg: Gpr) -> u64 {
    match reg & 15 {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

fn gpr_mut(regs: &mut kvm_regs, reg: Gpr) -> &mut u64 {
    match reg & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Writes `value` to register `reg` as an instruction of operand size `size` does: 16-bit
/// writes keep bits 63:16, 32-bit writes zero bits 63:32, 64-bit writes replace all.
pub fn write_gpr(regs: &mut kvm_regs, reg: Gpr, size: OperandSize, value: u64) {
    let r = gpr_mut(regs, reg);
    *r = match size {
        OperandSize::Word => (*r & !0xffff) | (value & 0xffff),
        OperandSize::Dword => value & 0xffff_ffff,
        OperandSize::Qword => value,
    };
}

/// The segment bases a memory operand may add in 64-bit mode.
#[derive(Debug, Clone, Copy, Default)]
pub struct SegmentBases {
    /// FS.base.
    pub fs: u64,
    /// GS.base.
    pub gs: u64,
}

/// The linear address of memory operand `mem` of the instruction that ends at `next_rip`.
pub fn linear_address(
    mem: &MemoryOperand,
    regs: &kvm_regs,
    next_rip: u64,
    bases: SegmentBases,
) -> u64 {
    let base = match mem.base {
        Base::None => 0,
        Base::Reg(r) => gpr(regs, r),
        Base::Rip => next_rip,
    };
    let index = mem
        .index
        .map_or(0, |(r, scale)| gpr(regs, r).wrapping_mul(u64::from(scale)));
    let mut effective = base
        .wrapping_add(index)
        .wrapping_add_signed(mem.displacement);
    if mem.address_32 {
        effective &= 0xffff_ffff;
    }
    let segment = match mem.segment {
        None => 0,
        Some(super::decode::SegmentBase::Fs) => bases.fs,
        Some(super::decode::SegmentBase::Gs) => bases.gs,
    };
    segment.wrapping_add(effective)
}

/// `popcnt`: the count of the `size`-bit source and RFLAGS after it (OF, SF, AF, CF, PF
/// cleared; ZF set exactly when the source is 0).
pub fn popcnt(source: u64, size: OperandSize, rflags: u64) -> (u64, u64) {
    let source = source & size.mask();
    let mut flags = rflags & !ARITHMETIC_FLAGS;
    if source == 0 {
        flags |= RFLAGS_ZF;
    }
    (u64::from(source.count_ones()), flags)
}

/// RFLAGS after a successful `rdrand`/`rdseed`: CF set, OF, SF, ZF, AF, PF cleared.
pub fn random_success_flags(rflags: u64) -> u64 {
    (rflags & !ARITHMETIC_FLAGS) | RFLAGS_CF
}

/// Whether `address` is canonical with 48-bit (or, with `la57`, 57-bit) linear addresses.
pub fn is_canonical(address: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let shift = 64 - bits;
    // Sign-extend from the top implemented bit: canonical addresses are unchanged by it.
    bits_of_i64(i64_of_bits(address << shift) >> shift) == address
}

/// The handler offset of a 64-bit IDT gate (16 bytes), if it is a present interrupt or trap
/// gate.
pub fn gate_target(gate: &[u8; 16]) -> Option<u64> {
    let attributes = gate[5];
    let present = attributes & 0x80 != 0;
    let gate_type = attributes & 0xf;
    if !present || !(gate_type == 0xe || gate_type == 0xf) {
        return None;
    }
    let low = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let middle = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let high = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    Some(low | middle << 16 | high << 32)
}

/// How the instruction at RIP relates to an exception handler's entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPosition {
    /// RIP is the entry point.
    AtEntry,
    /// RIP is 4 bytes in: the entry is the entry if it begins with `endbr64`.
    AfterEndbr64,
    /// Elsewhere.
    Elsewhere,
}

/// Where `rip` is relative to handler `entry`.
pub fn entry_position(rip: u64, entry: u64) -> EntryPosition {
    if rip == entry {
        EntryPosition::AtEntry
    } else if rip == entry.wrapping_add(ENDBR64.len() as u64) {
        EntryPosition::AfterEndbr64
    } else {
        EntryPosition::Elsewhere
    }
}

/// The frame a 64-bit exception with an error code pushes, as found at RSP on entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Error code.
    pub error_code: u64,
    /// Interrupted RIP (for a fetch fault, the address that could not be fetched).
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

/// Size of [`ExceptionFrame`] in guest memory.
pub const EXCEPTION_FRAME_LEN: usize = 48;

impl ExceptionFrame {
    /// The frame stored in `bytes` (six little-endian quadwords, lowest address first).
    pub fn parse(bytes: &[u8; EXCEPTION_FRAME_LEN]) -> Self {
        let q = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        Self {
            error_code: q(0),
            rip: q(1),
            cs: q(2),
            rflags: q(3),
            rsp: q(4),
            ss: q(5),
        }
    }

    /// Whether this is the page fault a `syscall` at CPL3 raises on kvm_pvm: the CPU jumped
    /// to LSTAR without leaving CPL3, so the fetch at LSTAR faulted from user mode.
    pub fn is_partial_syscall(&self, lstar: u64) -> bool {
        self.cs & 3 == 3 && self.rip == lstar
    }
}

/// The SYSCALL and SYSRET MSRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallMsrs {
    /// IA32_STAR: selectors (SYSCALL in 47:32, SYSRET in 63:48).
    pub star: u64,
    /// IA32_LSTAR: 64-bit SYSCALL entry point.
    pub lstar: u64,
    /// IA32_FMASK: RFLAGS bits SYSCALL clears.
    pub fmask: u64,
}

/// A flat 4 GiB segment as SYSCALL and SYSRET load them (the descriptor caches get fixed
/// values, not the GDT's).
fn flat_segment(selector: u16, code: bool, long: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code || !long),
        s: 1,
        l: u8::from(code && long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The state after finishing the SYSCALL that kvm_pvm left half done (see
/// [`ExceptionFrame::is_partial_syscall`]): the page-fault frame is dropped (RSP is the user
/// RSP it holds), RIP = LSTAR, RFLAGS = R11 with the FMASK bits and RF cleared, CS and SS the
/// kernel selectors of STAR[47:32]. RCX and R11 already hold the user's return RIP and RFLAGS:
/// the processor wrote them before it jumped to LSTAR. Returns (regs, CS, SS).
pub fn complete_syscall(
    regs: &kvm_regs,
    frame: &ExceptionFrame,
    msrs: &SyscallMsrs,
) -> (kvm_regs, kvm_segment, kvm_segment) {
    let mut out = *regs;
    out.rsp = frame.rsp;
    out.rip = msrs.lstar;
    out.rflags = (regs.r11 & !msrs.fmask & !RFLAGS_RF) | RFLAGS_FIXED;
    let selector = ((msrs.star >> 32) & 0xffff) as u16;
    let cs = flat_segment(selector & 0xfffc, true, true, 0);
    let ss = flat_segment(selector.wrapping_add(8), false, false, 0);
    (out, cs, ss)
}

/// The state after `sysret` (64-bit with `to_64_bit`, else to compatibility mode), given that
/// its checks passed (CPL 0, RCX canonical): RIP = RCX (ECX), RFLAGS from R11, CS and SS the
/// user selectors of STAR[63:48] with RPL 3. Returns (regs, CS, SS).
pub fn sysret(regs: &kvm_regs, star: u64, to_64_bit: bool) -> (kvm_regs, kvm_segment, kvm_segment) {
    let mut out = *regs;
    let base = ((star >> 48) & 0xffff) as u16;
    let (rip, cs_selector) = if to_64_bit {
        (regs.rcx, base.wrapping_add(16))
    } else {
        (regs.rcx & 0xffff_ffff, base)
    };
    out.rip = rip;
    out.rflags = (regs.r11 & SYSRET_RFLAGS_MASK) | RFLAGS_FIXED;
    let cs = flat_segment(cs_selector | 3, true, to_64_bit, 3);
    let ss = flat_segment(base.wrapping_add(8) | 3, false, false, 3);
    (out, cs, ss)
}

#[cfg(test)]
#[path = "semantics_tests.rs"]
mod tests;

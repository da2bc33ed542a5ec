//! Carrying out a failed instruction on the vCPU: find its bytes, decode it, apply what it
//! does (or inject the exception it raises), and write the state back.

use crate::arch::{
    CR0_MP, CR0_NE, CR0_TS, CR4_FSGSBASE, CR4_LA57, EFER_SCE, MSR_KERNEL_GS_BASE, MSR_LSTAR,
    MSR_STAR, MSR_SYSCALL_MASK, MSR_TSC_AUX,
};
use kvm_bindings::{
    kvm_run, KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;

use super::decode::{
    decode_64, decode_mode_independent, DecodeError, Decoded, FsGsBaseOp, Gpr, Instruction,
    Operand, OperandSize, MAX_INSTRUCTION_LEN,
};
use super::semantics::{self, ExceptionFrame, SegmentBases, SyscallMsrs};
use super::vcpu_access::{Cpu, GuestMemoryAccess, InstructionBytes};
use super::{RepairError, Repaired};

const VECTOR_BP: u8 = 3;
const VECTOR_UD: u8 = 6;
const VECTOR_NM: u8 = 7;
const VECTOR_GP: u8 = 13;
const VECTOR_PF: u8 = 14;
const VECTOR_MF: u8 = 16;

/// x87 status word: an unmasked exception is pending.
const FSW_ES: u16 = 1 << 7;

/// What a repair did, for the counters and for the exit loop's interrupt bookkeeping.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The kind counted.
    pub kind: Repaired,
    /// An exception was injected: the vCPU cannot take an interrupt at the next entry.
    pub exception_injected: bool,
    /// RFLAGS.IF is clear afterwards.
    pub interrupts_masked: bool,
}

/// The instruction bytes KVM reported with the emulation failure in `run`, if it did (recent
/// kernels report up to 15, flagged by `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`).
pub fn exit_instruction_bytes(run: &kvm_run) -> Result<Option<InstructionBytes>, RepairError> {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return Err(RepairError::NotInternalError {
            exit_reason: run.exit_reason,
        });
    }
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the internal-error
    // member of the union; `emulation_failure` is its documented view for suberror 1 and every
    // bit pattern is a valid value of its integer fields.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(RepairError::NotEmulationFailure {
            suberror: failure.suberror,
        });
    }
    let has_bytes = u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
    if failure.ndata < 3 || failure.flags & has_bytes == 0 {
        return Ok(None);
    }
    // SAFETY: the union has a single member, plain integers valid for any bit pattern.
    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    let n = usize::from(insn.insn_size).min(MAX_INSTRUCTION_LEN);
    Ok((n > 0).then(|| InstructionBytes::new(&insn.insn_bytes[..n])))
}

/// Repairs the instruction at RIP of `vcpu`.
pub fn repair(
    vcpu: &VcpuFd,
    mem: &dyn GuestMemoryAccess,
    exit_bytes: Option<InstructionBytes>,
) -> Result<Outcome, RepairError> {
    let mut cpu = Cpu::new(vcpu, mem)?;
    if let Some(bytes) = exit_bytes {
        cpu.bytes = bytes;
        // The hot path (clac, stac, int3, fwait) needs neither the mode nor a memory read.
        if let Some(decoded) = decode_mode_independent(bytes.as_slice()) {
            return carry_out(&mut cpu, decoded);
        }
    }
    let long_mode = cpu.in_64_bit_mode()?;
    if exit_bytes.is_none() {
        fetch(&mut cpu, long_mode)?;
    }
    if !long_mode {
        return match decode_mode_independent(cpu.bytes.as_slice()) {
            Some(decoded) => carry_out(&mut cpu, decoded),
            None => Err(RepairError::Not64BitMode {
                rip: cpu.rip(),
                bytes: cpu.bytes.hex(),
            }),
        };
    }
    let decoded = match decode_64(cpu.bytes.as_slice()) {
        // KVM stops its fetch at a page it cannot read ahead into; try the page walk.
        Err(DecodeError::Truncated) if !cpu.bytes.is_complete() => {
            fetch(&mut cpu, true)?;
            decode_64(cpu.bytes.as_slice())
        }
        other => other,
    };
    match decoded {
        Ok(decoded) => carry_out(&mut cpu, decoded),
        Err(_) => Err(RepairError::Unknown {
            rip: cpu.rip(),
            bytes: cpu.bytes.hex(),
        }),
    }
}

/// Reads up to 15 instruction bytes at CS:RIP from guest memory, keeping what KVM gave if
/// that is longer.
fn fetch(cpu: &mut Cpu<'_>, long_mode: bool) -> Result<(), RepairError> {
    let linear = if long_mode {
        cpu.rip()
    } else {
        cpu.sregs()?.cs.base.wrapping_add(cpu.rip()) & 0xffff_ffff
    };
    let mut buf = [0u8; MAX_INSTRUCTION_LEN];
    let n = cpu.read_virtual_prefix(linear, &mut buf)?;
    if n == 0 && cpu.bytes.as_slice().is_empty() {
        return Err(RepairError::Unreadable {
            what: "bytes",
            rip: cpu.rip(),
            bytes: cpu.bytes.hex(),
            address: linear,
        });
    }
    if n > cpu.bytes.as_slice().len() {
        cpu.bytes = InstructionBytes::new(&buf[..n]);
    }
    Ok(())
}

impl Outcome {
    fn done(kind: Repaired, rflags: u64) -> Self {
        Self {
            kind,
            exception_injected: false,
            interrupts_masked: rflags & semantics::RFLAGS_IF == 0,
        }
    }

    fn raised(kind: Repaired) -> Self {
        Self {
            kind,
            exception_injected: true,
            interrupts_masked: false,
        }
    }
}

/// Moves RIP past the instruction and writes the registers back.
fn step(cpu: &mut Cpu<'_>, next_rip: u64, kind: Repaired) -> Result<Outcome, RepairError> {
    cpu.regs.rip = next_rip;
    cpu.commit_regs()?;
    Ok(Outcome::done(kind, cpu.regs.rflags))
}

/// The instruction faults: RIP stays on it and the exception is injected.
fn fault(
    cpu: &Cpu<'_>,
    kind: Repaired,
    vector: u8,
    error_code: Option<u32>,
) -> Result<Outcome, RepairError> {
    cpu.inject_exception(vector, error_code)?;
    Ok(Outcome::raised(kind))
}

fn carry_out(cpu: &mut Cpu<'_>, decoded: Decoded) -> Result<Outcome, RepairError> {
    let next_rip = cpu.rip().wrapping_add(decoded.len as u64);
    match decoded.instruction {
        Instruction::Int3 => {
            // #BP is a trap: the frame's RIP is the next instruction.
            cpu.regs.rip = next_rip;
            cpu.commit_regs()?;
            cpu.inject_exception(VECTOR_BP, None)?;
            Ok(Outcome::raised(Repaired::Int3))
        }
        Instruction::Clac => clac(cpu, next_rip),
        Instruction::Stac => {
            // At CPL3 clac/stac run natively on kvm_pvm (and fault there), so the exit comes
            // from CPL0, where they are allowed.
            cpu.regs.rflags |= semantics::RFLAGS_AC;
            step(cpu, next_rip, Repaired::Stac)
        }
        Instruction::Fwait => fwait(cpu, next_rip),
        Instruction::Fence => step(cpu, next_rip, Repaired::Fence),
        Instruction::Serialize => step(cpu, next_rip, Repaired::Serialize),
        Instruction::Swapgs => swapgs(cpu, next_rip),
        Instruction::Sysret { to_64_bit } => sysret(cpu, to_64_bit),
        Instruction::Popcnt { size, dst, src } => popcnt(cpu, next_rip, size, dst, src),
        Instruction::Rdpid { dst } => {
            let [aux] = cpu.read_msrs([MSR_TSC_AUX])?;
            semantics::write_gpr(&mut cpu.regs, dst, OperandSize::Qword, aux);
            step(cpu, next_rip, Repaired::Rdpid)
        }
        Instruction::Rdrand { size, dst } => random(cpu, next_rip, size, dst, Repaired::Rdrand),
        Instruction::Rdseed { size, dst } => random(cpu, next_rip, size, dst, Repaired::Rdseed),
        Instruction::FsGsBase { op, size, reg } => fs_gs_base(cpu, next_rip, op, size, reg),
    }
}

fn clac(cpu: &mut Cpu<'_>, next_rip: u64) -> Result<Outcome, RepairError> {
    if let Some((frame, msrs)) = partial_syscall(cpu)? {
        let (regs, cs, ss) = semantics::complete_syscall(&cpu.regs, &frame, &msrs);
        cpu.regs = regs;
        let sregs = cpu.sregs()?;
        sregs.cs = cs;
        sregs.ss = ss;
        cpu.commit_sregs()?;
        cpu.commit_regs()?;
        return Ok(Outcome::done(Repaired::SyscallFromUser, cpu.regs.rflags));
    }
    cpu.regs.rflags &= !semantics::RFLAGS_AC;
    step(cpu, next_rip, Repaired::Clac)
}

/// Whether this `clac` is the first instruction of the page-fault handler, entered for the
/// fetch fault at LSTAR that a `syscall` at CPL3 causes on kvm_pvm; then the frame and the
/// SYSCALL MSRs. Memory that cannot be read means "no": a plain `clac`.
fn partial_syscall(
    cpu: &mut Cpu<'_>,
) -> Result<Option<(ExceptionFrame, SyscallMsrs)>, RepairError> {
    if !cpu.in_64_bit_mode()? || cpu.cpl()? != 0 {
        return Ok(None);
    }
    let idt = cpu.sregs()?.idt;
    let gate_offset = u64::from(VECTOR_PF) * 16;
    if u64::from(idt.limit) < gate_offset + 15 {
        return Ok(None);
    }
    let mut gate = [0u8; 16];
    if !cpu.read_virtual(idt.base.wrapping_add(gate_offset), &mut gate)? {
        return Ok(None);
    }
    let Some(entry) = semantics::gate_target(&gate) else {
        return Ok(None);
    };
    match semantics::entry_position(cpu.rip(), entry) {
        semantics::EntryPosition::Elsewhere => return Ok(None),
        semantics::EntryPosition::AtEntry => {}
        semantics::EntryPosition::AfterEndbr64 => {
            let mut first = [0u8; 4];
            if !cpu.read_virtual(entry, &mut first)? || first != semantics::ENDBR64 {
                return Ok(None);
            }
        }
    }
    let mut raw = [0u8; semantics::EXCEPTION_FRAME_LEN];
    if !cpu.read_virtual(cpu.regs.rsp, &mut raw)? {
        return Ok(None);
    }
    let frame = ExceptionFrame::parse(&raw);
    if frame.cs & 3 != 3 {
        // A fault from kernel mode: no need to read the MSRs.
        return Ok(None);
    }
    let [star, lstar, fmask] = cpu.read_msrs([MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK])?;
    Ok(frame
        .is_partial_syscall(lstar)
        .then_some((frame, SyscallMsrs { star, lstar, fmask })))
}

fn fwait(cpu: &mut Cpu<'_>, next_rip: u64) -> Result<Outcome, RepairError> {
    let cr0 = cpu.sregs()?.cr0;
    if cr0 & CR0_TS != 0 && cr0 & CR0_MP != 0 {
        return fault(cpu, Repaired::Fwait, VECTOR_NM, None);
    }
    // With CR0.NE clear a pending x87 error is signalled through FERR#, which spanvm does not
    // model; the instruction then completes.
    if cr0 & CR0_NE != 0 && cpu.fpu_status()? & FSW_ES != 0 {
        return fault(cpu, Repaired::Fwait, VECTOR_MF, None);
    }
    step(cpu, next_rip, Repaired::Fwait)
}

fn swapgs(cpu: &mut Cpu<'_>, next_rip: u64) -> Result<Outcome, RepairError> {
    if cpu.cpl()? != 0 {
        return fault(cpu, Repaired::Swapgs, VECTOR_GP, Some(0));
    }
    let [kernel_gs_base] = cpu.read_msrs([MSR_KERNEL_GS_BASE])?;
    let sregs = cpu.sregs()?;
    let gs_base = sregs.gs.base;
    sregs.gs.base = kernel_gs_base;
    cpu.write_msr(MSR_KERNEL_GS_BASE, gs_base)?;
    cpu.commit_sregs()?;
    step(cpu, next_rip, Repaired::Swapgs)
}

fn sysret(cpu: &mut Cpu<'_>, to_64_bit: bool) -> Result<Outcome, RepairError> {
    let sregs = *cpu.sregs()?;
    if sregs.efer & EFER_SCE == 0 {
        return fault(cpu, Repaired::Sysret, VECTOR_UD, None);
    }
    let la57 = sregs.cr4 & CR4_LA57 != 0;
    if cpu.cpl()? != 0 || (to_64_bit && !semantics::is_canonical(cpu.regs.rcx, la57)) {
        return fault(cpu, Repaired::Sysret, VECTOR_GP, Some(0));
    }
    let [star] = cpu.read_msrs([MSR_STAR])?;
    let (regs, cs, ss) = semantics::sysret(&cpu.regs, star, to_64_bit);
    cpu.regs = regs;
    let sregs = cpu.sregs()?;
    sregs.cs = cs;
    sregs.ss = ss;
    cpu.commit_sregs()?;
    cpu.commit_regs()?;
    Ok(Outcome::done(Repaired::Sysret, cpu.regs.rflags))
}

fn popcnt(
    cpu: &mut Cpu<'_>,
    next_rip: u64,
    size: OperandSize,
    dst: Gpr,
    src: Operand,
) -> Result<Outcome, RepairError> {
    let source = match src {
        Operand::Reg(reg) => semantics::gpr(&cpu.regs, reg),
        Operand::Memory(mem) => {
            let sregs = cpu.sregs()?;
            let bases = SegmentBases {
                fs: sregs.fs.base,
                gs: sregs.gs.base,
            };
            let address = semantics::linear_address(&mem, &cpu.regs, next_rip, bases);
            let mut raw = [0u8; 8];
            cpu.read_operand("memory operand", address, &mut raw[..size.bytes()])?;
            u64::from_le_bytes(raw)
        }
    };
    let (count, rflags) = semantics::popcnt(source, size, cpu.regs.rflags);
    semantics::write_gpr(&mut cpu.regs, dst, size, count);
    cpu.regs.rflags = rflags;
    step(cpu, next_rip, Repaired::Popcnt)
}

fn random(
    cpu: &mut Cpu<'_>,
    next_rip: u64,
    size: OperandSize,
    dst: Gpr,
    kind: Repaired,
) -> Result<Outcome, RepairError> {
    let mut raw = [0u8; 8];
    host_random(&mut raw[..size.bytes()]).map_err(|source| RepairError::HostRandom {
        rip: cpu.rip(),
        source,
    })?;
    semantics::write_gpr(&mut cpu.regs, dst, size, u64::from_le_bytes(raw));
    cpu.regs.rflags = semantics::random_success_flags(cpu.regs.rflags);
    step(cpu, next_rip, kind)
}

/// Fills `out` from the host's random source.
fn host_random(out: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < out.len() {
        let rest = &mut out[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer it is given,
        // which is a live, exclusively borrowed slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        // Negative is getrandom(2)'s -1.
        let Ok(n) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        };
        filled += n;
    }
    Ok(())
}

fn fs_gs_base(
    cpu: &mut Cpu<'_>,
    next_rip: u64,
    op: FsGsBaseOp,
    size: OperandSize,
    reg: Gpr,
) -> Result<Outcome, RepairError> {
    let sregs = *cpu.sregs()?;
    if sregs.cr4 & CR4_FSGSBASE == 0 {
        return fault(cpu, Repaired::FsGsBase, VECTOR_UD, None);
    }
    match op {
        FsGsBaseOp::ReadFs | FsGsBaseOp::ReadGs => {
            let base = if op == FsGsBaseOp::ReadFs {
                sregs.fs.base
            } else {
                sregs.gs.base
            };
            semantics::write_gpr(&mut cpu.regs, reg, size, base);
        }
        FsGsBaseOp::WriteFs | FsGsBaseOp::WriteGs => {
            let value = semantics::gpr(&cpu.regs, reg) & size.mask();
            if !semantics::is_canonical(value, sregs.cr4 & CR4_LA57 != 0) {
                return fault(cpu, Repaired::FsGsBase, VECTOR_GP, Some(0));
            }
            let sregs = cpu.sregs()?;
            if op == FsGsBaseOp::WriteFs {
                sregs.fs.base = value;
            } else {
                sregs.gs.base = value;
            }
            cpu.commit_sregs()?;
        }
    }
    step(cpu, next_rip, Repaired::FsGsBase)
}

//! Host handling for `kvm_pvm` (see `shared/HOST.md`): there guest code at CPL0 runs in KVM's
//! instruction emulator, which gives up on some instructions a Linux guest needs and exits
//! with `KVM_EXIT_INTERNAL_ERROR`, suberror 1 (emulation failure). [`PvmRepair::handle`]
//! carries out the instructions it knows on the vCPU's registers and counts them; anything
//! else stops the guest with its address and bytes. It also repairs the half-done `syscall`
//! of that host: the processor jumps to LSTAR but stays at CPL3, the fetch there faults, and
//! when the kernel's page-fault entry starts with `clac` the VMM completes the SYSCALL
//! transition itself.
//!
//! On a VT-x host none of these instructions fails emulation, and the exit loop should only
//! call into this module on a kvm_pvm host ([`is_pvm_host`]), so that nothing changes there.
//!
//! The pure parts (decoding, flag and state semantics) live in submodules with their own
//! tests; this file and `execute`/`vcpu_access` are the KVM side.

mod cmdline;
mod decode;
mod execute;
mod semantics;
mod vcpu_access;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_ioctls::VcpuFd;

pub use cmdline::{add_pvm_kernel_params, pvm_cmdline_problems, PVM_KERNEL_PARAMS};
pub use vcpu_access::GuestMemoryAccess;

/// Whether this host's KVM is `kvm_pvm` (the module is loaded).
pub fn is_pvm_host() -> bool {
    crate::hypervisor::Hypervisor::is_pvm_host()
}

/// Errors of the repair: each stops the guest.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// KVM's emulator failed on an instruction spanvm does not emulate either.
    #[error(
        "the guest instruction at RIP {rip:#x} (bytes {bytes}) failed KVM's emulation on this \
         kvm_pvm host and spanvm cannot emulate it; if the kernel can do without the feature, \
         hide it with `clearcpuid=` on the kernel command line"
    )]
    Unknown {
        /// Where the instruction is.
        rip: u64,
        /// Its bytes as fetched (hex).
        bytes: String,
    },
    /// An emulation failure outside 64-bit mode on an instruction whose meaning depends on
    /// the mode.
    #[error(
        "the guest instruction at RIP {rip:#x} (bytes {bytes}) failed KVM's emulation outside \
         64-bit mode, where spanvm emulates only int3, fwait, clac and stac"
    )]
    Not64BitMode {
        /// Where the instruction is.
        rip: u64,
        /// Its bytes as fetched (hex).
        bytes: String,
    },
    /// The exit handed to the repair is not a KVM internal error at all.
    #[error(
        "the vCPU's last exit has reason {exit_reason}, not KVM_EXIT_INTERNAL_ERROR; the \
         repair handles only emulation failures"
    )]
    NotInternalError {
        /// The exit reason in `kvm_run`.
        exit_reason: u32,
    },
    /// The exit is a KVM internal error other than an emulation failure.
    #[error(
        "KVM internal error suberror {suberror} is not an emulation failure (suberror 1); \
         only emulation failures can be repaired"
    )]
    NotEmulationFailure {
        /// The suberror KVM reported.
        suberror: u32,
    },
    /// The instruction's bytes or its memory operand are not in guest RAM.
    #[error(
        "cannot read the {what} of the guest instruction at RIP {rip:#x} (bytes {bytes}): \
         guest-virtual address {address:#x} is not mapped to guest RAM"
    )]
    Unreadable {
        /// What was being read.
        what: &'static str,
        /// Where the instruction is.
        rip: u64,
        /// Its bytes as fetched so far (hex).
        bytes: String,
        /// The guest-virtual address that could not be read.
        address: u64,
    },
    /// A vCPU ioctl failed.
    #[error("KVM {what} failed while repairing a guest instruction: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// KVM would not read or write an MSR the instruction needs.
    #[error("KVM could not {access} MSR {msr:#x} for the guest instruction at RIP {rip:#x}")]
    Msr {
        /// "read" or "write".
        access: &'static str,
        /// The MSR.
        msr: u32,
        /// Where the instruction is.
        rip: u64,
    },
    /// The host gave no random bytes for `rdrand`/`rdseed`.
    #[error("cannot get random bytes from the host for the guest's rdrand/rdseed at RIP {rip:#x}: {source}")]
    HostRandom {
        /// Where the instruction is.
        rip: u64,
        /// What getrandom(2) said.
        source: std::io::Error,
    },
}

/// What a successful repair did, one kind per counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repaired {
    /// `int3`: stepped over, #BP injected.
    Int3,
    /// `clac`: RFLAGS.AC cleared.
    Clac,
    /// `stac`: RFLAGS.AC set.
    Stac,
    /// `popcnt`.
    Popcnt,
    /// `fwait`.
    Fwait,
    /// `lfence`/`mfence`/`sfence`.
    Fence,
    /// `serialize`.
    Serialize,
    /// `swapgs`.
    Swapgs,
    /// `sysret`.
    Sysret,
    /// `rdpid`.
    Rdpid,
    /// `rdrand`.
    Rdrand,
    /// `rdseed`.
    Rdseed,
    /// `rdfsbase`/`rdgsbase`/`wrfsbase`/`wrgsbase`.
    FsGsBase,
    /// A `syscall` from CPL3 completed by the VMM (see the module documentation).
    SyscallFromUser,
}

impl Repaired {
    /// Every kind, in the order the statistics list them.
    pub const ALL: [Repaired; 14] = [
        Repaired::Int3,
        Repaired::Clac,
        Repaired::Stac,
        Repaired::Popcnt,
        Repaired::Fwait,
        Repaired::Fence,
        Repaired::Serialize,
        Repaired::Swapgs,
        Repaired::Sysret,
        Repaired::Rdpid,
        Repaired::Rdrand,
        Repaired::Rdseed,
        Repaired::FsGsBase,
        Repaired::SyscallFromUser,
    ];

    /// The name the statistics use.
    pub fn name(self) -> &'static str {
        match self {
            Repaired::Int3 => "int3",
            Repaired::Clac => "clac",
            Repaired::Stac => "stac",
            Repaired::Popcnt => "popcnt",
            Repaired::Fwait => "fwait",
            Repaired::Fence => "fence",
            Repaired::Serialize => "serialize",
            Repaired::Swapgs => "swapgs",
            Repaired::Sysret => "sysret",
            Repaired::Rdpid => "rdpid",
            Repaired::Rdrand => "rdrand",
            Repaired::Rdseed => "rdseed",
            Repaired::FsGsBase => "fsgsbase",
            Repaired::SyscallFromUser => "syscall-from-user",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Repaired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A snapshot of the repair counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RepairStats {
    counts: [u64; Repaired::ALL.len()],
}

impl RepairStats {
    /// Repairs of `kind`.
    pub fn get(&self, kind: Repaired) -> u64 {
        self.counts[kind.index()]
    }

    /// All repairs.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl fmt::Display for RepairStats {
    /// `kvm_pvm repairs: 29580 (clac 29000, syscall-from-user 580)`, or `... : none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        if total == 0 {
            return f.write_str("kvm_pvm repairs: none");
        }
        write!(f, "kvm_pvm repairs: {total} (")?;
        let mut first = true;
        for kind in Repaired::ALL {
            let n = self.get(kind);
            if n == 0 {
                continue;
            }
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{kind} {n}")?;
        }
        f.write_str(")")
    }
}

/// The repair, shared by all vCPUs of a node (it holds only counters).
#[derive(Debug, Default)]
pub struct PvmRepair {
    counts: [AtomicU64; Repaired::ALL.len()],
}

impl PvmRepair {
    /// A repair with zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles the `KVM_EXIT_INTERNAL_ERROR` that `vcpu` just returned from `KVM_RUN`.
    ///
    /// On `Ok` the vCPU's state is updated (instruction done, or an exception it raises
    /// injected) and the kind is counted. It also lowers `if_flag` and
    /// `ready_for_interrupt_injection` in the vCPU's `kvm_run` when the repair masked
    /// interrupts or injected an exception, so that the exit loop opens an interrupt window
    /// instead of injecting on top of the exception. `mem` reads guest-physical memory (the
    /// instruction if KVM did not report its bytes, memory operands, the IDT, the stack).
    pub fn handle(
        &self,
        vcpu: &mut VcpuFd,
        mem: &dyn GuestMemoryAccess,
    ) -> Result<Repaired, RepairError> {
        let exit_bytes = execute::exit_instruction_bytes(vcpu.get_kvm_run())?;
        self.repair(vcpu, mem, exit_bytes)
    }

    /// [`handle`](Self::handle) with the instruction bytes KVM reported, if any (without
    /// them the bytes are read from guest memory).
    fn repair(
        &self,
        vcpu: &mut VcpuFd,
        mem: &dyn GuestMemoryAccess,
        exit_bytes: Option<vcpu_access::InstructionBytes>,
    ) -> Result<Repaired, RepairError> {
        let outcome = execute::repair(vcpu, mem, exit_bytes)?;
        let run = vcpu.get_kvm_run();
        if outcome.exception_injected {
            run.ready_for_interrupt_injection = 0;
        }
        if outcome.interrupts_masked {
            run.if_flag = 0;
        }
        self.counts[outcome.kind.index()].fetch_add(1, Ordering::Relaxed);
        Ok(outcome.kind)
    }

    /// The counters now.
    pub fn stats(&self) -> RepairStats {
        let mut stats = RepairStats::default();
        for (out, count) in stats.counts.iter_mut().zip(&self.counts) {
            *out = count.load(Ordering::Relaxed);
        }
        stats
    }
}

#[cfg(test)]
mod kvm_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_list_the_kinds_that_happened() {
        let repair = PvmRepair::new();
        assert_eq!(repair.stats().to_string(), "kvm_pvm repairs: none");
        repair.counts[Repaired::Clac.index()].fetch_add(29_000, Ordering::Relaxed);
        repair.counts[Repaired::SyscallFromUser.index()].fetch_add(580, Ordering::Relaxed);
        repair.counts[Repaired::Int3.index()].fetch_add(3, Ordering::Relaxed);
        let stats = repair.stats();
        assert_eq!(stats.total(), 29_583);
        assert_eq!(stats.get(Repaired::Clac), 29_000);
        assert_eq!(stats.get(Repaired::Popcnt), 0);
        assert_eq!(
            stats.to_string(),
            "kvm_pvm repairs: 29583 (int3 3, clac 29000, syscall-from-user 580)"
        );
    }

    #[test]
    fn every_kind_has_its_own_counter_and_name() {
        let names: std::collections::HashSet<_> = Repaired::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), Repaired::ALL.len());
        for (i, kind) in Repaired::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind} is listed in declaration order");
        }
    }
}

//! How often a vCPU left the guest, by reason: what `spanvm stats` shows to tell a vCPU that
//! spins in the guest from one that keeps exiting to the VMM (port I/O, APIC accesses, halts).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why `KVM_RUN` returned to the exit loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// `in` from a port.
    IoIn,
    /// `out` to a port.
    IoOut,
    /// A read of an MMIO address (the xAPIC page, a device, or one forwarded to the master).
    MmioRead,
    /// A write to an MMIO address.
    MmioWrite,
    /// `rdmsr` of an MSR handled in user space (x2APIC, APIC base, TSC deadline).
    MsrRead,
    /// `wrmsr` of an MSR handled in user space.
    MsrWrite,
    /// `hlt`.
    Halt,
    /// The guest opened its interrupt window for a pending interrupt.
    IrqWindow,
    /// `KVM_EXIT_INTR`: a signal was pending when the guest was entered.
    Signal,
    /// `KVM_RUN` returned `EINTR`/`EAGAIN`: the vCPU was kicked out of the guest.
    Kicked,
    /// A triple fault.
    Shutdown,
    /// A power-off or reset from the guest.
    SystemEvent,
    /// KVM's internal error (on `kvm_pvm`: an instruction its emulator gives up on, which
    /// spanvm then carries out).
    InternalError,
    /// Any other exit (they stop the vCPU).
    Other,
}

impl ExitReason {
    /// Every reason, in the order of [`ExitCounters::snapshot`].
    pub const ALL: [ExitReason; 14] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::MsrRead,
        ExitReason::MsrWrite,
        ExitReason::Halt,
        ExitReason::IrqWindow,
        ExitReason::Signal,
        ExitReason::Kicked,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::InternalError,
        ExitReason::Other,
    ];

    /// The reason's name in `spanvm stats` and on its wire (lower case, no spaces).
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::MsrRead => "msr_read",
            ExitReason::MsrWrite => "msr_write",
            ExitReason::Halt => "hlt",
            ExitReason::IrqWindow => "irq_window",
            ExitReason::Signal => "signal",
            ExitReason::Kicked => "kicked",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::InternalError => "internal_error",
            ExitReason::Other => "other",
        }
    }

    /// The reason called `name` (see [`ExitReason::name`]).
    pub fn from_name(name: &str) -> Option<ExitReason> {
        ExitReason::ALL.into_iter().find(|r| r.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Exits of one vCPU by reason.
#[derive(Default)]
pub struct ExitCounters {
    counts: [AtomicU64; ExitReason::ALL.len()],
}

impl ExitCounters {
    /// The vCPU left the guest for `reason`. Only the vCPU's own thread calls this, so a plain
    /// load and store (no locked read-modify-write on the exit path) loses nothing; readers on
    /// other threads see a value at most one exit old.
    pub fn record(&self, reason: ExitReason) {
        let count = &self.counts[reason.index()];
        count.store(count.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// The counts so far, in the order of [`ExitReason::ALL`].
    pub fn snapshot(&self) -> [u64; ExitReason::ALL.len()] {
        std::array::from_fn(|i| self.counts[i].load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indices_follow_all() {
        for (i, reason) in ExitReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert_eq!(ExitReason::from_name(reason.name()), Some(reason));
        }
        assert_eq!(ExitReason::from_name("vmcall"), None);
    }

    #[test]
    fn counts_by_reason() {
        let counters = ExitCounters::default();
        counters.record(ExitReason::Halt);
        counters.record(ExitReason::Halt);
        counters.record(ExitReason::IoOut);
        let snap = counters.snapshot();
        assert_eq!(snap[ExitReason::Halt.index()], 2);
        assert_eq!(snap[ExitReason::IoOut.index()], 1);
        assert_eq!(snap.iter().sum::<u64>(), 3);
    }
}

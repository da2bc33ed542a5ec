//! kvmclock and guest-TSC synchronisation of every spanvm node against the master (node 0).
//!
//! Each node's KVM VM has its own kvmclock, which starts at zero when the VM is created, and
//! each host has its own TSC. Before any vCPU runs, every node other than the master sets its
//! VM clock (`KVM_SET_CLOCK`) from the master's (`KVM_GET_CLOCK`, carried in the START control
//! message as a [`MasterClock`]):
//!
//! * On the same host (equal `/proc/sys/kernel/random/boot_id`, [`BootId`]) both readings come
//!   with the host's `CLOCK_REALTIME`, and KVM's `KVM_CLOCK_REALTIME` flag makes the set exact:
//!   KVM adds the real time that passed since the master's reading.
//! * Otherwise the node takes at least [`MIN_SAMPLES`] ping samples ([`MasterLink`]) and
//!   corrects by half the round trip of the best one ([`estimate`]).
//!
//! The guest TSC follows the master's where the host can offset it (VT-x: every vCPU gets
//! the same `KVM_VCPU_TSC_OFFSET`); where it cannot (`kvm_pvm`) the node says so and measures
//! the skew instead. Afterwards every node measures what is left ([`SyncReport`]) and checks
//! that KVM reports `KVM_CLOCK_TSC_STABLE`, warning loudly about the cost when it does not.
//!
//! Nothing here touches KVM: the VMM hands in [`VmClock`], [`GuestTsc`] and [`MasterLink`]
//! implementations, so that everything is testable without a host.

#![deny(missing_docs)]

mod boot_id;
mod error;
mod estimate;
mod sync;
mod wire;

pub use boot_id::{BootId, BOOT_ID_PATH};
pub use error::ClockError;
pub use estimate::{estimate, Estimate, Sample};
pub use sync::{
    master_clock, master_report, master_tsc_stable_check, reply_to_ping, sync_with_master,
    ClockMethod, LocalNode, SyncReport, TscOutcome, MIN_SAMPLES,
};
pub use wire::{ClockReply, MasterClock, MasterTsc, MASTER_CLOCK_LEN, REPLY_LEN};

/// `KVM_CLOCK_TSC_STABLE`: KVM keeps one master clock for all vCPUs (a stable, synchronised
/// host TSC), so it need not rewrite the vCPUs' kvmclock records on its own.
pub const KVM_CLOCK_TSC_STABLE: u32 = 2;
/// `KVM_CLOCK_REALTIME`: the reading carries the host's `CLOCK_REALTIME` (and a set honours it).
pub const KVM_CLOCK_REALTIME: u32 = 4;
/// `KVM_CLOCK_HOST_TSC`: the reading carries the host TSC at the same instant.
pub const KVM_CLOCK_HOST_TSC: u32 = 8;
/// Every flag spanvm knows; others are refused on the wire.
pub const KNOWN_CLOCK_FLAGS: u32 = KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;

/// One reading of a VM's kvmclock (`KVM_GET_CLOCK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockReading {
    /// The VM's kvmclock, in ns.
    pub clock_ns: u64,
    /// `KVM_CLOCK_*` flags.
    pub flags: u32,
    /// The host's `CLOCK_REALTIME` at the same instant, in ns (valid with
    /// [`KVM_CLOCK_REALTIME`]).
    pub realtime_ns: u64,
    /// The host TSC at (about) the same instant: KVM's own pairing with
    /// [`KVM_CLOCK_HOST_TSC`], else read by the VMM right after the call. Always filled in.
    pub host_tsc: u64,
}

impl ClockReading {
    /// Whether KVM reports a stable master clock.
    pub fn tsc_stable(&self) -> bool {
        self.flags & KVM_CLOCK_TSC_STABLE != 0
    }

    /// The paired realtime, when KVM gave one.
    pub fn realtime(&self) -> Option<u64> {
        (self.flags & KVM_CLOCK_REALTIME != 0).then_some(self.realtime_ns)
    }
}

/// A VM's kvmclock (implemented by the VMM over `KVM_GET_CLOCK` / `KVM_SET_CLOCK`).
pub trait VmClock: Send + Sync {
    /// Reads the clock.
    fn get(&self) -> Result<ClockReading, ClockError>;
    /// Sets the clock to `clock_ns`; with `at_realtime`, to `clock_ns` as of that host
    /// `CLOCK_REALTIME` (KVM adds the time passed since). Only called with `Some` when
    /// [`VmClock::can_set_at_realtime`] holds.
    fn set(&self, clock_ns: u64, at_realtime: Option<u64>) -> Result<(), ClockError>;
    /// Whether KVM accepts `KVM_CLOCK_REALTIME` in `KVM_SET_CLOCK`.
    fn can_set_at_realtime(&self) -> bool;
}

/// What this host lets the VMM do with the guest TSC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TscControl {
    /// The guest TSC is the host TSC plus `offset`, and the offset can be changed.
    Offset {
        /// The current offset of every vCPU (guest TSC = host TSC + offset).
        offset: i64,
    },
    /// The guest TSC cannot be moved here: it is the host TSC.
    Fixed {
        /// Why (e.g. "kvm_pvm cannot offset or scale the guest TSC").
        reason: String,
    },
}

/// The guest TSC of this node's VM (implemented by the VMM).
pub trait GuestTsc: Send + Sync {
    /// What the host allows.
    fn control(&self) -> TscControl;
    /// Gives every vCPU of the VM (local or not) guest TSC = host TSC + `offset`. Only called
    /// when [`GuestTsc::control`] says [`TscControl::Offset`].
    fn set_offset(&self, offset: i64) -> Result<(), ClockError>;
}

/// One clock round trip to the master (implemented by the VMM over the Control channel).
pub trait MasterLink {
    /// Sends sample request `seq` to the master and waits for its [`ClockReply`].
    fn exchange(&self, seq: u64) -> Result<ClockReply, ClockError>;
}

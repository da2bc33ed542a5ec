//! The one error type of clock synchronisation.

use std::time::Duration;

use transport::NodeId;

/// What can go wrong while a node takes its clock from the master.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// A KVM clock or TSC call failed on this node.
    #[error("KVM {what} failed on this node: {detail} (spanvm needs KVM_GET_CLOCK/KVM_SET_CLOCK to keep the guest's time equal on every node; check the host kernel's KVM)")]
    Kvm {
        /// The ioctl or operation.
        what: &'static str,
        /// What KVM said.
        detail: String,
    },
    /// A peer sent a clock frame this node cannot accept.
    #[error(
        "node {from} sent a malformed {what}: {why} (do all nodes run the same spanvm build?)"
    )]
    BadFrame {
        /// The sender.
        from: NodeId,
        /// Which message.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The master could not read its clock to answer a sample.
    #[error("the master could not answer clock sample {seq}: {why}")]
    MasterFailed {
        /// The sample.
        seq: u64,
        /// The master's message.
        why: String,
    },
    /// No answer to a clock sample in time.
    #[error("the master did not answer clock sample {seq} within {waited:?}; is node 0 still running, and is the network between the nodes working?")]
    NoReply {
        /// The sample.
        seq: u64,
        /// How long this node waited.
        waited: Duration,
    },
    /// The control connection to the master is gone.
    #[error("lost the master while synchronising the clock: {0}")]
    MasterLost(String),
    /// No usable sample: every one had a clock or TSC going backwards.
    #[error("none of the {taken} clock samples was usable (this node's kvmclock or TSC went backwards during every round trip); is the host's TSC unstable?")]
    NoUsableSample {
        /// How many samples were taken.
        taken: usize,
    },
    /// The host's boot id could not be read.
    #[error("cannot read the host's boot id from {path}: {why} (spanvm uses it to know whether two nodes share one host)")]
    BootId {
        /// The file read.
        path: String,
        /// The problem.
        why: String,
    },
    /// The clock to set is out of range (a corrupt reading from the master).
    #[error("the kvmclock value derived from the master's ({target_ns} ns) is out of range; the master's clock reading cannot be right")]
    ClockOutOfRange {
        /// The value that would have been set.
        target_ns: i128,
    },
}

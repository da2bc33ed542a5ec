//! Why a node stops, and the one place that decides it: the first reason wins, every thread
//! polls it, and the process exit code tells which.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (or, for a probe, every local vCPU reported success).
    PowerOff,
    /// The guest asked for a reset (i8042 0xFE, triple fault).
    Reset(String),
    /// A probe reported a non-zero exit status.
    ProbeFailed {
        /// The vCPU that reported it.
        vcpu: usize,
        /// The probe's exit status.
        status: u32,
    },
    /// The user interrupted the VMM (Ctrl-C, SIGTERM).
    Interrupted,
    /// A peer node went away or misbehaved.
    PeerLost(String),
    /// The distributed shared memory failed on a node (a kernel call on guest memory failed, a
    /// peer's frame broke the coherence protocol's invariants, the fault thread panicked): no
    /// page can be trusted to be current any more. The text names the node.
    MemoryFailed(String),
    /// Something failed in the VMM.
    Error(String),
}

impl StopReason {
    /// The process exit code for this reason (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            StopReason::PowerOff => 0,
            StopReason::Error(_) => 1,
            StopReason::Reset(_) => 3,
            StopReason::ProbeFailed { .. } => 4,
            StopReason::PeerLost(_) => 5,
            StopReason::MemoryFailed(_) => 6,
            StopReason::Interrupted => 130,
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::PowerOff => write!(f, "guest powered off"),
            StopReason::Reset(why) => write!(f, "guest reset ({why})"),
            StopReason::ProbeFailed { vcpu, status } => {
                write!(f, "probe failed on vCPU {vcpu} with status {status:#x}")
            }
            StopReason::Interrupted => write!(f, "interrupted"),
            StopReason::PeerLost(why) => write!(f, "lost a peer: {why}"),
            StopReason::MemoryFailed(why) => write!(f, "the distributed memory failed on {why}"),
            StopReason::Error(why) => write!(f, "error: {why}"),
        }
    }
}

/// The node's stop flag and reason.
#[derive(Default)]
pub struct Stop {
    flag: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    requested: Condvar,
}

impl Stop {
    /// Records `reason` unless a reason is already set; returns whether this call set it.
    pub fn request(&self, reason: StopReason) -> bool {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_some() {
            return false;
        }
        *r = Some(reason);
        self.flag.store(true, Ordering::SeqCst);
        self.requested.notify_all();
        true
    }

    /// Waits until a stop is requested or `timeout` passes; returns whether one was requested.
    pub fn wait(&self, timeout: Duration) -> bool {
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let (r, _) = self
            .requested
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        r.is_some()
    }

    /// Whether a stop was requested (cheap: checked on every exit).
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The reason, once requested.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

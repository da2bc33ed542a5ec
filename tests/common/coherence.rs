//! The coherence probes and what each must report: shared by the DSM tests on a clean
//! loopback and the same probes on a degraded network.

use super::ProbeRun;

/// A probe whose result is exact only if the distributed memory stays coherent.
#[derive(Debug, Clone, Copy)]
pub enum Coherence {
    /// Every vCPU adds to one shared counter under a lock.
    Counter,
    /// The store-buffer litmus test with mfence, pairs of vCPUs on different nodes.
    StoreBuffer,
    /// A producer and a consumer pass checksummed messages through a ring.
    MessageRing,
    /// Every vCPU increments its own slot of one shared page.
    FalseSharing,
}

impl Coherence {
    /// Every one of them.
    pub const ALL: [Coherence; 4] = [
        Coherence::Counter,
        Coherence::StoreBuffer,
        Coherence::MessageRing,
        Coherence::FalseSharing,
    ];

    /// The probe's name in a cluster description.
    pub fn name(self) -> &'static str {
        match self {
            Coherence::Counter => "counter",
            Coherence::StoreBuffer => "sb-litmus",
            Coherence::MessageRing => "msgring",
            Coherence::FalseSharing => "falseshare",
        }
    }

    /// Guest memory it needs on `nodes` nodes.
    pub fn memory_mib(self, nodes: usize) -> u64 {
        match self {
            // 8 MiB of results per vCPU from 16 MiB.
            Coherence::StoreBuffer => 16 + 8 * nodes as u64 + 16,
            _ => 64,
        }
    }

    /// Asserts the exact result of a run with argument `arg` on `nodes` nodes, one vCPU each.
    pub fn check(self, run: &ProbeRun, nodes: usize, arg: u64) {
        match self {
            Coherence::Counter => {
                let expected = arg * nodes as u64;
                for v in 0..nodes {
                    assert_eq!(run.get(v, "CEXP"), expected);
                    assert_eq!(run.get(v, "CNTR"), expected, "vCPU {v} saw a wrong total");
                }
            }
            Coherence::StoreBuffer => {
                for v in 0..nodes {
                    assert_eq!(run.get(v, "SBNN"), arg);
                    assert_eq!(
                        run.get(v, "SBVI"),
                        0,
                        "vCPU {v}: both sides missed each other's store despite mfence"
                    );
                    assert_eq!(run.get(v, "SBMO"), 0, "vCPU {v}: a read went back in time");
                }
            }
            Coherence::MessageRing => {
                for pair in 0..nodes / 2 {
                    assert_eq!(run.get(2 * pair, "MSGS"), arg);
                    assert_eq!(run.get(2 * pair + 1, "MSGN"), arg);
                    assert_eq!(
                        run.get(2 * pair + 1, "MBAD"),
                        0,
                        "pair {pair}: corrupted messages"
                    );
                }
            }
            Coherence::FalseSharing => {
                for v in 0..nodes {
                    assert_eq!(run.get(v, "FSVL"), arg, "vCPU {v} lost updates to its slot");
                }
                assert_eq!(run.get(0, "FSBD"), 0, "slots of other vCPUs were wrong");
            }
        }
    }
}

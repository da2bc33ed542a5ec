//! How many receivers may busy-poll: fewer than the machine has cores, counted over the whole
//! process (several nodes may share one process, as in `spanvm bench dsm`).
//!
//! A spinning receiver keeps a core for itself. With as many spinners as cores, the threads
//! that produce the frames they wait for (the peer's receiver, the fault thread, the vCPUs)
//! queue behind them, and a fault waits for a time slice instead of a wake-up: on a 2-core
//! machine two spinners made the read fault 3.2 times its floor instead of 1.35 with blocking
//! reads. So a receiver spins only while spinners stay below the core count; the others block,
//! and the mesh says so once.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Receivers spinning now, in this process.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// A receiver's permission to spin; dropping it gives the core back.
#[derive(Debug)]
pub(crate) struct SpinClaim(());

impl Drop for SpinClaim {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a receiver may not spin: `spinning` receivers already hold `cores - 1` of the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoSpareCore {
    pub(crate) spinning: usize,
    pub(crate) cores: usize,
}

impl std::fmt::Display for NoSpareCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "busy polling declined: {} receiver(s) already spin on this machine's {} core(s), \
             and spinners must leave a core for the threads that answer them; using blocking \
             reads",
            self.spinning, self.cores
        )
    }
}

/// Claims a core for one spinning receiver, if a core stays free for everything else.
pub(crate) fn claim() -> Result<SpinClaim, NoSpareCore> {
    claim_on(cores())
}

fn claim_on(cores: usize) -> Result<SpinClaim, NoSpareCore> {
    SPINNING
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |spinning| {
            (spinning + 1 < cores).then_some(spinning + 1)
        })
        .map(|_| SpinClaim(()))
        .map_err(|spinning| NoSpareCore { spinning, cores })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Receivers spinning now, in this process.
pub fn spinning_receivers() -> usize {
    SPINNING.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinners_stay_below_the_core_count_and_give_their_core_back() {
        // Other tests of this process may hold claims of their own: count from here.
        let before = spinning_receivers();
        let cores = before + 3;
        let a = claim_on(cores).expect("a first spinner");
        let b = claim_on(cores).expect("a second spinner");
        let refused = claim_on(cores).expect_err("a spinner on the last free core");
        assert_eq!(refused.cores, cores);
        assert!(refused.to_string().contains("blocking reads"), "{refused}");
        drop(a);
        let c = claim_on(cores).expect("the core given back");
        drop((b, c));
        assert_eq!(claim_on(1).err().map(|e| e.cores), Some(1));
    }
}

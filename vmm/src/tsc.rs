//! The time base of the user-space APIC: the guest TSC, which is the host's `rdtsc` plus the
//! offset the clock synchronisation gave every vCPU (0 unless this node's host can offset the
//! guest TSC and the node follows the master's; see the `clock` crate).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Guest TSC minus host TSC on this node.
static GUEST_OFFSET: AtomicI64 = AtomicI64::new(0);

/// The host's TSC now.
pub fn host_now() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The guest's TSC now (what the guest reads with `rdtsc`).
pub fn now() -> u64 {
    host_now().wrapping_add_signed(GUEST_OFFSET.load(Ordering::Relaxed))
}

/// Records that every vCPU's guest TSC is the host's plus `offset`.
pub fn set_guest_offset(offset: i64) {
    GUEST_OFFSET.store(offset, Ordering::Relaxed);
}

/// `ticks` TSC ticks at `khz` as a duration.
pub fn ticks_to_duration(ticks: u64, khz: u32) -> Duration {
    let ns = u128::from(ticks) * 1_000_000 / u128::from(khz.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_ticks_at_the_given_rate() {
        assert_eq!(
            ticks_to_duration(3_000_000, 3_000_000),
            Duration::from_millis(1)
        );
        assert_eq!(ticks_to_duration(1, 1_000_000), Duration::from_nanos(1));
        assert_eq!(
            ticks_to_duration(u64::MAX, 1),
            Duration::from_nanos(u64::MAX)
        );
    }
}

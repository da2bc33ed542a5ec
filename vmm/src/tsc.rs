//! The time base of the user-space APIC: the guest TSC. spanvm never offsets the guest TSC on
//! this node, so the guest's TSC is the host's `rdtsc`.

use std::time::Duration;

/// The current TSC.
pub fn now() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `ticks` TSC ticks at `khz` as a duration.
pub fn ticks_to_duration(ticks: u64, khz: u32) -> Duration {
    let ns = u128::from(ticks) * 1_000_000 / u128::from(khz.max(1));
    Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
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

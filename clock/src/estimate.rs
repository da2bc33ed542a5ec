//! The sample arithmetic: from round trips to the master, how far this node's kvmclock and
//! TSC are from the master's.
//!
//! A sample is this node's reading before a request, the master's reading in its reply, and
//! this node's reading after the reply came back. With equal delays both ways the master read
//! its clock at the midpoint of the round trip, so `local - master` is
//! `(before + after) / 2 - master`, wrong by at most half the round trip. The sample with the
//! shortest round trip bounds the error best, so it is the one used.

use crate::{ClockError, ClockReading, ClockReply};

/// One round trip: this node's readings around the master's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// This node's reading just before the request went out.
    pub before: ClockReading,
    /// The master's answer.
    pub reply: ClockReply,
    /// This node's reading just after the answer arrived.
    pub after: ClockReading,
}

impl Sample {
    /// The round trip in ns of this node's kvmclock (`None` if the clock went backwards).
    pub fn rtt_ns(&self) -> Option<u64> {
        self.after.clock_ns.checked_sub(self.before.clock_ns)
    }

    /// The round trip in host TSC ticks (`None` if the TSC went backwards).
    pub fn rtt_ticks(&self) -> Option<u64> {
        self.after.host_tsc.checked_sub(self.before.host_tsc)
    }

    /// This node's kvmclock minus the master's, from the midpoint of the round trip.
    pub fn clock_skew_ns(&self) -> i128 {
        let mid = (i128::from(self.before.clock_ns) + i128::from(self.after.clock_ns)) / 2;
        mid - i128::from(self.reply.reading.clock_ns)
    }

    /// This node's host TSC minus the master's, from the midpoint of the round trip.
    pub fn host_tsc_skew_ticks(&self) -> i128 {
        let mid = (i128::from(self.before.host_tsc) + i128::from(self.after.host_tsc)) / 2;
        mid - i128::from(self.reply.reading.host_tsc)
    }

    /// On one host (one `CLOCK_REALTIME`): this node's kvmclock minus the master's, exactly,
    /// from the realtime each reading carries (`None` without realtime on both sides).
    pub fn realtime_skew_ns(&self) -> Option<i128> {
        let local = self.before.realtime()?;
        let master = self.reply.reading.realtime()?;
        let local_epoch = i128::from(self.before.clock_ns) - i128::from(local);
        let master_epoch = i128::from(self.reply.reading.clock_ns) - i128::from(master);
        Some(local_epoch - master_epoch)
    }
}

/// What a set of samples says, taken from the one with the shortest round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Samples taken.
    pub samples: usize,
    /// Usable ones (neither clock nor TSC went backwards).
    pub usable: usize,
    /// The shortest round trip, ns.
    pub best_rtt_ns: u64,
    /// This node's kvmclock minus the master's, ns; off by at most `best_rtt_ns / 2`.
    pub clock_skew_ns: i128,
    /// This node's host TSC minus the master's, ticks; off by at most `tsc_bound_ticks`.
    pub host_tsc_skew_ticks: i128,
    /// Half the best sample's round trip in TSC ticks.
    pub tsc_bound_ticks: u64,
    /// Median of [`Sample::realtime_skew_ns`] over the samples that have one.
    pub realtime_skew_ns: Option<i128>,
    /// Whether the master's latest reply reported `KVM_CLOCK_TSC_STABLE`.
    pub master_tsc_stable: bool,
}

/// The estimate from `samples`: the sample with the shortest round trip.
pub fn estimate(samples: &[Sample]) -> Result<Estimate, ClockError> {
    let usable: Vec<(&Sample, u64, u64)> = samples
        .iter()
        .filter_map(|s| Some((s, s.rtt_ns()?, s.rtt_ticks()?)))
        .collect();
    let &(best, rtt, ticks) =
        usable
            .iter()
            .min_by_key(|(_, rtt, _)| *rtt)
            .ok_or(ClockError::NoUsableSample {
                taken: samples.len(),
            })?;
    let mut by_realtime: Vec<i128> = usable
        .iter()
        .filter_map(|(s, _, _)| s.realtime_skew_ns())
        .collect();
    by_realtime.sort_unstable();
    Ok(Estimate {
        samples: samples.len(),
        usable: usable.len(),
        best_rtt_ns: rtt,
        clock_skew_ns: best.clock_skew_ns(),
        host_tsc_skew_ticks: best.host_tsc_skew_ticks(),
        tsc_bound_ticks: ticks / 2,
        realtime_skew_ns: by_realtime.get(by_realtime.len() / 2).copied(),
        master_tsc_stable: samples.last().is_some_and(|s| s.reply.reading.tsc_stable()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MasterTsc, KVM_CLOCK_REALTIME};

    fn reading(clock_ns: u64, host_tsc: u64) -> ClockReading {
        ClockReading {
            clock_ns,
            flags: 0,
            realtime_ns: 0,
            host_tsc,
        }
    }

    /// A round trip starting at local time `t0` with `out`/`back` one-way delays, against a
    /// master whose clock is local + `master_ahead` and whose TSC is local + `tsc_ahead`
    /// (1 tick per ns here).
    fn sample(t0: u64, out: u64, back: u64, master_ahead: i64, tsc_ahead: i64) -> Sample {
        let at_master = t0 + out;
        Sample {
            before: reading(t0, t0),
            reply: ClockReply {
                seq: 0,
                reading: reading(
                    at_master.checked_add_signed(master_ahead).unwrap(),
                    at_master.checked_add_signed(tsc_ahead).unwrap(),
                ),
                tsc: MasterTsc::Fixed,
            },
            after: reading(t0 + out + back, t0 + out + back),
        }
    }

    #[test]
    fn symmetric_delays_give_the_exact_skew() {
        let s = sample(1_000_000, 5_000, 5_000, 250_000, -42);
        assert_eq!(s.rtt_ns(), Some(10_000));
        assert_eq!(s.clock_skew_ns(), -250_000);
        assert_eq!(s.host_tsc_skew_ticks(), 42);
    }

    #[test]
    fn asymmetric_delays_are_off_by_at_most_half_the_round_trip() {
        // All the delay on the way out: the master read its clock at the end of the round trip.
        let s = sample(1_000_000, 10_000, 0, 0, 0);
        assert_eq!(s.clock_skew_ns(), -5_000);
        let e = estimate(&[s]).unwrap();
        assert!(e.clock_skew_ns.unsigned_abs() <= u128::from(e.best_rtt_ns / 2));
    }

    #[test]
    fn the_shortest_round_trip_wins() {
        let samples = [
            sample(0, 90_000, 10_000, 1_000_000, 7),
            sample(200_000, 3_000, 3_000, 1_000_000, 7),
            sample(400_000, 40_000, 2_000, 1_000_000, 7),
        ];
        let e = estimate(&samples).unwrap();
        assert_eq!(e.samples, 3);
        assert_eq!(e.usable, 3);
        assert_eq!(e.best_rtt_ns, 6_000);
        assert_eq!(e.clock_skew_ns, -1_000_000);
        assert_eq!(e.host_tsc_skew_ticks, -7);
        assert_eq!(e.tsc_bound_ticks, 3_000);
        assert_eq!(e.realtime_skew_ns, None);
    }

    #[test]
    fn samples_with_time_going_backwards_are_dropped() {
        let mut backwards = sample(500_000, 1_000, 1_000, 0, 0);
        backwards.after.clock_ns = 100;
        let mut tsc_backwards = sample(500_000, 1_000, 1_000, 0, 0);
        tsc_backwards.after.host_tsc = 0;
        let good = sample(0, 4_000, 4_000, 10, 0);
        let e = estimate(&[backwards, tsc_backwards, good]).unwrap();
        assert_eq!(e.usable, 1);
        assert_eq!(e.best_rtt_ns, 8_000);
        assert!(matches!(
            estimate(&[backwards, tsc_backwards]),
            Err(ClockError::NoUsableSample { taken: 2 })
        ));
        assert!(matches!(
            estimate(&[]),
            Err(ClockError::NoUsableSample { taken: 0 })
        ));
    }

    #[test]
    fn realtime_pairs_measure_the_skew_on_one_host_whatever_the_delays() {
        // Same host: realtime = kvmclock + 1e18 locally, the master's kvmclock is 300 ns ahead.
        let mk = |t0: u64, out: u64, back: u64| {
            let mut s = sample(t0, out, back, 300, 0);
            s.before.flags = KVM_CLOCK_REALTIME;
            s.before.realtime_ns = s.before.clock_ns + 1_000_000_000_000_000_000;
            s.reply.reading.flags = KVM_CLOCK_REALTIME;
            s.reply.reading.realtime_ns = t0 + out + 1_000_000_000_000_000_000;
            s
        };
        let e = estimate(&[
            mk(0, 80_000, 1_000),
            mk(100_000, 1_000, 90_000),
            mk(300_000, 5, 5),
        ])
        .unwrap();
        assert_eq!(e.realtime_skew_ns, Some(-300));
    }
}

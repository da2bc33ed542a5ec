//! The procedures: what the master puts in START and answers to samples, and how every other
//! node sets its clock and guest TSC from them and reports what it measured.

use std::fmt;

use transport::NodeId;

use crate::estimate::{estimate, Estimate, Sample};
use crate::{
    BootId, ClockError, ClockReply, GuestTsc, MasterClock, MasterLink, MasterTsc, TscControl,
    VmClock,
};

/// The least number of round trips a node takes to set or measure its clock.
pub const MIN_SAMPLES: usize = 16;

/// A skew above this (beyond what the measurement can tell) is reported as a problem.
const SKEW_WARN_NS: u128 = 1_000_000;

/// On one host, a skew measured above this after the exact set is corrected once.
const REFINE_ABOVE_NS: u128 = 100;

/// This node, as the synchronisation needs it.
pub struct LocalNode<'a> {
    /// Its id.
    pub id: NodeId,
    /// Its host's boot id.
    pub boot_id: BootId,
    /// Its TSC frequency.
    pub tsc_khz: u32,
    /// Its VM's kvmclock.
    pub vm: &'a dyn VmClock,
    /// Its VM's guest TSC.
    pub tsc: &'a dyn GuestTsc,
}

/// How the clock was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockMethod {
    /// Same host: the master's reading set as of its realtime (`KVM_CLOCK_REALTIME`).
    SameHostRealtime,
    /// From the best of several round trips.
    RoundTrip {
        /// Round trips taken.
        samples: usize,
        /// The shortest, ns.
        best_rtt_ns: u64,
    },
}

/// What happened to the guest TSC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TscOutcome {
    /// Every vCPU's guest TSC now follows the master's guest TSC.
    Follows {
        /// The offset set (guest TSC = host TSC + offset).
        offset: i64,
    },
    /// The host cannot offset the guest TSC; it is this host's TSC, and the skew is measured.
    CannotOffset {
        /// Why.
        reason: String,
    },
}

/// What a node did and measured; [`fmt::Display`] gives the one line printed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// The node.
    pub node: NodeId,
    /// Whether it shares the master's host.
    pub same_host: bool,
    /// How its clock was set.
    pub method: ClockMethod,
    /// Whether a second set corrected what the first left (same host only).
    pub refined: bool,
    /// Its kvmclock minus the master's after setting, ns.
    pub clock_skew_ns: i128,
    /// How far off that measurement may be, ns (0: measured on one `CLOCK_REALTIME`).
    pub clock_skew_bound_ns: u64,
    /// Whether this node's KVM reports `KVM_CLOCK_TSC_STABLE`.
    pub tsc_stable: bool,
    /// Whether the master's did.
    pub master_tsc_stable: bool,
    /// What happened to the guest TSC.
    pub tsc: TscOutcome,
    /// This node's guest TSC minus the master's, ticks.
    pub tsc_skew_ticks: i128,
    /// How far off that measurement may be, ticks.
    pub tsc_skew_bound_ticks: u64,
    /// This node's TSC frequency.
    pub tsc_khz: u32,
    /// The master's.
    pub master_tsc_khz: u32,
}

/// Reads what the master sends in START.
pub fn master_clock(
    boot_id: BootId,
    tsc_khz: u32,
    vm: &dyn VmClock,
    tsc: &dyn GuestTsc,
) -> Result<MasterClock, ClockError> {
    Ok(MasterClock {
        boot_id,
        reading: vm.get()?,
        tsc_khz,
        tsc: master_tsc(&tsc.control()),
    })
}

/// The master's guest TSC as the wire carries it.
fn master_tsc(control: &TscControl) -> MasterTsc {
    match control {
        TscControl::Offset { offset } => MasterTsc::Offset(*offset),
        TscControl::Fixed { .. } => MasterTsc::Fixed,
    }
}

/// The master's answer to sample request `seq`.
pub fn reply_to_ping(seq: u64, vm: &dyn VmClock, tsc: MasterTsc) -> Result<ClockReply, ClockError> {
    Ok(ClockReply {
        seq,
        reading: vm.get()?,
        tsc,
    })
}

/// The line the master prints at start. Whether KVM runs a stable master clock may be
/// decided only when a vCPU first runs: see [`master_tsc_stable_check`].
pub fn master_report(
    node: NodeId,
    nodes: NodeId,
    master: &MasterClock,
    tsc: &TscControl,
) -> String {
    let tsc_text = match tsc {
        TscControl::Offset { offset } => format!(
            "the other nodes' guest TSCs follow this node's (offset {offset}, {} kHz)",
            master.tsc_khz
        ),
        TscControl::Fixed { reason } => format!(
            "{reason}, so the other nodes cannot follow this node's guest TSC; they measure their skew against it"
        ),
    };
    let stable = if master.reading.tsc_stable() {
        "yes"
    } else {
        "not yet (KVM decides when a vCPU first runs; checked again then)"
    };
    format!(
        "spanvm: node {node} clock: master, the reference for {} other node{} (kvmclock {} ns), TSC_STABLE {stable}; TSC: {tsc_text}",
        nodes.saturating_sub(1),
        if nodes == 2 { "" } else { "s" },
        master.reading.clock_ns,
    )
}

/// The master, after its vCPUs started: waits up to `limit` for KVM to report
/// `KVM_CLOCK_TSC_STABLE` and gives the line to print: a confirmation, or the loud warning.
pub fn master_tsc_stable_check(
    node: NodeId,
    vm: &dyn VmClock,
    limit: std::time::Duration,
) -> Result<String, ClockError> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let reading = vm.get()?;
        if reading.tsc_stable() {
            return Ok(format!(
                "spanvm: node {node} clock: TSC_STABLE yes (reported once its vCPUs ran)"
            ));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(tsc_unstable_warning(node));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `count` round trips to the master, numbered from `*seq`.
fn collect(
    vm: &dyn VmClock,
    link: &dyn MasterLink,
    count: usize,
    seq: &mut u64,
) -> Result<Vec<Sample>, ClockError> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        *seq += 1;
        let before = vm.get()?;
        let reply = link.exchange(*seq)?;
        let after = vm.get()?;
        samples.push(Sample {
            before,
            reply,
            after,
        });
    }
    Ok(samples)
}

/// Sets this node's kvmclock and guest TSC from the master's (see the crate doc) and measures
/// what is left, with at least [`MIN_SAMPLES`] round trips per measurement. Call it before any
/// vCPU of this node runs.
pub fn sync_with_master(
    node: &LocalNode<'_>,
    master: &MasterClock,
    link: &dyn MasterLink,
    samples: usize,
) -> Result<SyncReport, ClockError> {
    let samples = samples.max(MIN_SAMPLES);
    let vm = node.vm;
    let mut seq = 0u64;
    let same_host = node.boot_id == master.boot_id;

    // 1. The kvmclock. On one host any master reading that carries the host's realtime sets
    // it exactly: START's, or else (KVM pairs its clock with realtime only once it runs a
    // stable master clock, which it may decide only when the master's first vCPU runs) the
    // latest sample's that has one.
    let realtime_ok = same_host && vm.can_set_at_realtime();
    let mut before_set: Option<Estimate> = None;
    let mut exact_from = realtime_ok
        .then(|| {
            master
                .reading
                .realtime()
                .map(|r| (master.reading.clock_ns, r))
        })
        .flatten();
    let mut taken = Vec::new();
    if exact_from.is_none() {
        taken = collect(vm, link, samples, &mut seq)?;
        if realtime_ok {
            exact_from = taken
                .iter()
                .rev()
                .find_map(|s| Some((s.reply.reading.clock_ns, s.reply.reading.realtime()?)));
        }
    }
    let method = if let Some((clock_ns, realtime)) = exact_from {
        vm.set(clock_ns, Some(realtime))?;
        ClockMethod::SameHostRealtime
    } else {
        let e = estimate(&taken)?;
        let now = vm.get()?;
        let target = i128::from(now.clock_ns) - e.clock_skew_ns;
        let target =
            u64::try_from(target).map_err(|_| ClockError::ClockOutOfRange { target_ns: target })?;
        let at = if vm.can_set_at_realtime() {
            now.realtime()
        } else {
            None
        };
        vm.set(target, at)?;
        before_set = Some(e);
        ClockMethod::RoundTrip {
            samples,
            best_rtt_ns: e.best_rtt_ns,
        }
    };

    // 2. The guest TSC: follow the master's where the host lets us.
    let tsc = match node.tsc.control() {
        TscControl::Offset { .. } => {
            // This host's TSC minus the master's: one TSC on one host, else measured.
            let host_skew = if same_host {
                0
            } else {
                let e = match before_set {
                    Some(e) => e,
                    None => estimate(&collect(vm, link, samples, &mut seq)?)?,
                };
                e.host_tsc_skew_ticks
            };
            let offset = i128::from(master.tsc.guest_offset()) - host_skew;
            let offset = i64::try_from(offset).map_err(|_| ClockError::Kvm {
                what: "computing the guest TSC offset",
                detail: format!("offset {offset} does not fit 64 bits"),
            })?;
            node.tsc.set_offset(offset)?;
            TscOutcome::Follows { offset }
        }
        TscControl::Fixed { reason } => TscOutcome::CannotOffset { reason },
    };
    let local_offset = match tsc {
        TscOutcome::Follows { offset } => offset,
        TscOutcome::CannotOffset { .. } => 0,
    };

    // 3. What is left.
    let mut after = estimate(&collect(vm, link, samples, &mut seq)?)?;
    let mut refined = false;
    if let (ClockMethod::SameHostRealtime, Some(skew)) = (method, after.realtime_skew_ns) {
        if skew.unsigned_abs() > REFINE_ABOVE_NS {
            // KVM's set lands a fairly constant few hundred ns ahead (it pairs the clock with
            // a realtime read taken after its own clock snapshot): set once more, to what
            // the master's clock is now, less the error the first set made.
            let now = vm.get()?;
            if let Some(realtime) = now.realtime() {
                let target = i128::from(now.clock_ns) - 2 * skew;
                let target = u64::try_from(target)
                    .map_err(|_| ClockError::ClockOutOfRange { target_ns: target })?;
                vm.set(target, Some(realtime))?;
                after = estimate(&collect(vm, link, samples, &mut seq)?)?;
                refined = true;
            }
        }
    }
    let (clock_skew_ns, clock_skew_bound_ns) = match (same_host, after.realtime_skew_ns) {
        (true, Some(skew)) => (skew, 0),
        _ => (after.clock_skew_ns, after.best_rtt_ns / 2),
    };
    let (host_tsc_skew, tsc_bound) = if same_host {
        (0, 0)
    } else {
        (after.host_tsc_skew_ticks, after.tsc_bound_ticks)
    };
    let tsc_skew_ticks =
        host_tsc_skew + i128::from(local_offset) - i128::from(master.tsc.guest_offset());
    let tsc_stable = vm.get()?.tsc_stable();
    Ok(SyncReport {
        node: node.id,
        same_host,
        method,
        refined,
        clock_skew_ns,
        clock_skew_bound_ns,
        tsc_stable,
        master_tsc_stable: after.master_tsc_stable,
        tsc,
        tsc_skew_ticks,
        tsc_skew_bound_ticks: tsc_bound,
        tsc_khz: node.tsc_khz,
        master_tsc_khz: master.tsc_khz,
    })
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// A duration in ns, readable.
// Display only: at most four significant digits are shown, far fewer than f64's 53 bits.
#[allow(clippy::cast_precision_loss)]
fn human_ns(ns: u128) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        _ => format!("{:.3} ms", ns as f64 / 1e6),
    }
}

fn tsc_unstable_warning(node: NodeId) -> String {
    format!(
        "spanvm: WARNING: node {node}: KVM does not report KVM_CLOCK_TSC_STABLE here (no stable \
         master clock: the host TSC is not trusted or not synchronised across its CPUs). What it \
         costs: KVM rewrites a vCPU's kvmclock record whenever it reschedules it, Linux keeps \
         every vCPU's record in one page (hv_clock_boot), so each rewrite pulls that page \
         through the DSM to this node and away from the others, and guest time read on \
         different nodes can disagree. Expect slow timekeeping and that page among the DSM's \
         most-faulted; a host with an invariant TSC and clocksource=tsc avoids it."
    )
}

impl SyncReport {
    /// Warnings to print besides the line: a missing `KVM_CLOCK_TSC_STABLE`, different TSC
    /// frequencies, a skew that setting the clock did not remove.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.tsc_stable {
            w.push(tsc_unstable_warning(self.node));
        }
        if self.tsc_khz != self.master_tsc_khz {
            w.push(format!(
                "spanvm: WARNING: node {}: its TSC runs at {} kHz, the master's at {} kHz; the \
                 guest TSC drifts between these nodes by {:.0} ppm, and guest code that reads \
                 the TSC directly sees time jump when it moves between them",
                self.node,
                self.tsc_khz,
                self.master_tsc_khz,
                (f64::from(self.tsc_khz) - f64::from(self.master_tsc_khz)) * 1e6
                    / f64::from(self.master_tsc_khz.max(1)),
            ));
        }
        let beyond = self
            .clock_skew_ns
            .unsigned_abs()
            .saturating_sub(u128::from(self.clock_skew_bound_ns));
        if beyond > SKEW_WARN_NS {
            w.push(format!(
                "spanvm: WARNING: node {}: its kvmclock is still {} off the master's after \
                 setting it; guest time jumps when a task moves between nodes",
                self.node,
                human_ns(beyond)
            ));
        }
        w
    }

    fn tsc_ticks_ns(&self, ticks: u128) -> u128 {
        ticks * 1_000_000 / u128::from(self.tsc_khz.max(1))
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.same_host {
            "same host"
        } else {
            "other host"
        };
        let how = match self.method {
            ClockMethod::SameHostRealtime if self.refined => {
                format!("{host}, realtime, corrected once")
            }
            ClockMethod::SameHostRealtime => format!("{host}, realtime"),
            ClockMethod::RoundTrip {
                samples,
                best_rtt_ns,
            } => format!(
                "{host}, best of {samples} round trips {}, corrected by half",
                human_ns(u128::from(best_rtt_ns))
            ),
        };
        let bound = if self.clock_skew_bound_ns == 0 {
            "exact".to_string()
        } else {
            format!("±{}", human_ns(u128::from(self.clock_skew_bound_ns)))
        };
        write!(
            f,
            "spanvm: node {} clock: set from master ({how}), skew {} ns ({bound}), TSC_STABLE {} (master {}); TSC: ",
            self.node,
            self.clock_skew_ns,
            yes_no(self.tsc_stable),
            yes_no(self.master_tsc_stable),
        )?;
        let skew_ns = self.tsc_ticks_ns(self.tsc_skew_ticks.unsigned_abs());
        let sign = if self.tsc_skew_ticks < 0 { "-" } else { "" };
        let tsc_bound = if self.tsc_skew_bound_ticks == 0 {
            "exact, one host TSC".to_string()
        } else {
            format!("±{} ticks", self.tsc_skew_bound_ticks)
        };
        match &self.tsc {
            TscOutcome::Follows { offset } => write!(
                f,
                "follows the master's (offset {offset}), skew {} ticks = {sign}{} ({tsc_bound})",
                self.tsc_skew_ticks,
                human_ns(skew_ns)
            ),
            TscOutcome::CannotOffset { reason } => write!(
                f,
                "{reason}, so it does not follow the master's; measured skew {} ticks = {sign}{} ({tsc_bound})",
                self.tsc_skew_ticks,
                human_ns(skew_ns)
            ),
        }
    }
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;

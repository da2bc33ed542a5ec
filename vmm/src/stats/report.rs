//! One node's figures at one moment, as a node's control socket answers them and as
//! `spanvm stats` and `spanvm cluster --stats-interval` read them; and what two of them, or one
//! and the node's uptime, say per second.

use std::time::Duration;

use dsm::stats::LATENCY_BUCKETS;
use dsm::{NodeId, StatsSnapshot};
use forward::{ForwardStats, VcpuInterrupts};
use transport::TransportStats;

use crate::distributed::shadow_zap::ZapStats;
use crate::vcpu::exit_counters::ExitReason;

/// How far the node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Joining the mesh and loading the guest: no figures yet.
    Starting,
    /// The guest runs.
    Running,
    /// The guest stopped; the node is tearing its VM down.
    Stopping,
}

impl Phase {
    /// The phase's name on the wire and on screen.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }

    /// The phase called `name`.
    pub fn from_name(name: &str) -> Option<Phase> {
        [Phase::Starting, Phase::Running, Phase::Stopping]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// One local vCPU's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuReport {
    /// The vCPU's index (its APIC ID).
    pub index: usize,
    /// Exits by reason, in the order of [`ExitReason::ALL`].
    pub exits: [u64; ExitReason::ALL.len()],
    /// Interrupts exchanged with vCPUs of other nodes.
    pub interrupts: VcpuInterrupts,
}

impl VcpuReport {
    /// Every exit of this vCPU.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

/// A node's figures at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReport {
    /// Which node answered.
    pub node: NodeId,
    /// How many nodes its cluster has.
    pub nodes: NodeId,
    /// How far it is.
    pub phase: Phase,
    /// Time since the node process started its node (whole milliseconds).
    pub uptime: Duration,
    /// Its local vCPUs, by index (empty while starting).
    pub vcpus: Vec<VcpuReport>,
    /// The DSM's figures (a node of a multi-node guest, once running).
    pub dsm: Option<StatsSnapshot>,
    /// Interrupt and I/O forwarding (once running).
    pub forward: Option<ForwardStats>,
    /// The connections to the peers (a multi-node guest, once running).
    pub transport: Option<TransportStats>,
    /// The shadow-page-table zap (only where the host shadows guest page tables, `kvm_pvm`).
    pub shadow_zap: Option<ZapStats>,
}

impl NodeReport {
    /// What a node answers before its VM exists.
    pub fn starting(node: NodeId, nodes: NodeId, uptime: Duration) -> NodeReport {
        NodeReport {
            node,
            nodes,
            phase: Phase::Starting,
            uptime,
            vcpus: Vec::new(),
            dsm: None,
            forward: None,
            transport: None,
            shadow_zap: None,
        }
    }

    /// Every exit of every local vCPU.
    pub fn total_exits(&self) -> u64 {
        self.vcpus.iter().map(VcpuReport::total_exits).sum()
    }

    /// Interrupts this node's vCPUs sent to vCPUs of other nodes.
    pub fn interrupts_out(&self) -> u64 {
        self.vcpus.iter().map(|v| v.interrupts.sent).sum()
    }

    /// Interrupts from other nodes delivered to this node's vCPUs.
    pub fn interrupts_in(&self) -> u64 {
        self.vcpus.iter().map(|v| v.interrupts.received).sum()
    }
}

/// Requests of a DSM that left the node.
pub fn remote_requests(dsm: &StatsSnapshot) -> u64 {
    dsm.reads[1] + dsm.writes[1] + dsm.upgrades[1]
}

/// The fault service time below which `percent` % of the requests completed, as the bounds of
/// the log2 bucket it falls in (`[low, high)` µs); `None` before the first request.
pub fn latency_percentile(histogram: &[u64; LATENCY_BUCKETS], percent: u64) -> Option<(u64, u64)> {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the request at `percent`, counted from 1 (at least the first).
    let rank = (total.saturating_mul(percent)).div_ceil(100).max(1);
    let mut seen = 0;
    for (i, &count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(bucket_bounds(i));
        }
    }
    Some(bucket_bounds(LATENCY_BUCKETS - 1))
}

/// The `[low, high)` µs of latency bucket `i` (see [`dsm::stats::LATENCY_BUCKETS`]).
pub fn bucket_bounds(i: usize) -> (u64, u64) {
    let low = if i == 0 { 0 } else { 1u64 << i };
    (low, 1u64 << (i + 1))
}

/// Per-second figures between two reports of one node (or since its start).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// The time they cover.
    pub over: Duration,
    /// DSM faults (local accesses that needed the DSM).
    pub faults: f64,
    /// Completed read requests.
    pub reads: f64,
    /// Completed write requests.
    pub writes: f64,
    /// Completed upgrades.
    pub upgrades: f64,
    /// Requests that left the node.
    pub remote: f64,
    /// DSM page bytes received.
    pub bytes_in: f64,
    /// DSM page bytes sent.
    pub bytes_out: f64,
    /// Interrupts from other nodes delivered here.
    pub interrupts_in: f64,
    /// Interrupts sent to vCPUs of other nodes.
    pub interrupts_out: f64,
    /// Port and MMIO accesses forwarded to the master (or served for peers, on the master).
    pub io: f64,
    /// vCPU exits.
    pub exits: f64,
}

/// `count` per second over `over`, for display (a float is exact enough for any rate).
#[allow(clippy::cast_precision_loss)]
fn per_second(count: u64, over: Duration) -> f64 {
    if over.is_zero() {
        return 0.0;
    }
    count as f64 / over.as_secs_f64()
}

impl Rates {
    /// What happened between `earlier` and `later` (the same node; a counter that went back,
    /// as after a node restart, counts as 0).
    pub fn between(earlier: &NodeReport, later: &NodeReport) -> Rates {
        Self::delta(Some(earlier), later)
    }

    /// Averages since the node started.
    pub fn since_start(report: &NodeReport) -> Rates {
        Self::delta(None, report)
    }

    fn delta(earlier: Option<&NodeReport>, later: &NodeReport) -> Rates {
        let over = later
            .uptime
            .saturating_sub(earlier.map_or(Duration::ZERO, |e| e.uptime));
        let diff = |f: &dyn Fn(&NodeReport) -> u64| {
            let before = earlier.map_or(0, f);
            per_second(f(later).saturating_sub(before), over)
        };
        let dsm = |f: fn(&StatsSnapshot) -> u64| move |r: &NodeReport| r.dsm.as_ref().map_or(0, f);
        let fwd = |r: &NodeReport| {
            r.forward
                .as_ref()
                .map_or(0, |f| f.io_forwarded + f.io_served)
        };
        Rates {
            over,
            faults: diff(&dsm(StatsSnapshot::faults)),
            reads: diff(&dsm(|d| d.reads[0] + d.reads[1])),
            writes: diff(&dsm(|d| d.writes[0] + d.writes[1])),
            upgrades: diff(&dsm(|d| d.upgrades[0] + d.upgrades[1])),
            remote: diff(&dsm(remote_requests)),
            bytes_in: diff(&dsm(|d| d.bytes_received)),
            bytes_out: diff(&dsm(|d| d.bytes_sent)),
            interrupts_in: diff(&NodeReport::interrupts_in),
            interrupts_out: diff(&NodeReport::interrupts_out),
            io: diff(&fwd),
            exits: diff(&NodeReport::total_exits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_name_the_bucket_they_fall_in() {
        let mut h = [0u64; LATENCY_BUCKETS];
        assert_eq!(latency_percentile(&h, 50), None);
        h[0] = 1; // [0, 2)
        h[6] = 98; // [64, 128)
        h[10] = 1; // [1024, 2048)
        assert_eq!(latency_percentile(&h, 1), Some((0, 2)));
        assert_eq!(latency_percentile(&h, 50), Some((64, 128)));
        assert_eq!(latency_percentile(&h, 99), Some((64, 128)));
        assert_eq!(latency_percentile(&h, 100), Some((1024, 2048)));
    }

    fn report(uptime_ms: u64, exits: u64) -> NodeReport {
        let mut exit_counts = [0; ExitReason::ALL.len()];
        exit_counts[0] = exits;
        NodeReport {
            vcpus: vec![VcpuReport {
                index: 1,
                exits: exit_counts,
                interrupts: VcpuInterrupts {
                    sent: exits / 2,
                    received: exits,
                },
            }],
            phase: Phase::Running,
            ..NodeReport::starting(1, 2, Duration::from_millis(uptime_ms))
        }
    }

    #[test]
    fn rates_between_two_reports_and_since_start() {
        let a = report(1000, 100);
        let b = report(3000, 500);
        let r = Rates::between(&a, &b);
        assert_eq!(r.over, Duration::from_secs(2));
        assert!((r.exits - 200.0).abs() < 1e-9, "{r:?}");
        assert!((r.interrupts_in - 200.0).abs() < 1e-9, "{r:?}");
        assert!((r.interrupts_out - 100.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.faults, 0.0);
        let s = Rates::since_start(&b);
        assert!((s.exits - 500.0 / 3.0).abs() < 1e-9, "{s:?}");
        // A node that restarted in between: no negative rates.
        let r = Rates::between(&b, &report(4000, 10));
        assert_eq!(r.exits, 0.0);
        assert_eq!(Rates::between(&b, &b).exits, 0.0);
    }
}

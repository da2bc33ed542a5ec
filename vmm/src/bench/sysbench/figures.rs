//! Per-workload DSM and forwarding figures of the nodes of a running guest.
//!
//! [`node_figures`] takes one snapshot of every node's cumulative counters; a workload's figures
//! are the difference of the snapshots at the start and the end of its measured run. Each node
//! answers on its control socket (`<node config>.stats.sock`, see `crate::stats`), the way
//! `spanvm stats --config FILE` asks it. A single-node guest answers too, without a DSM: its
//! DSM figures are zero.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::stats::client::{query_config, QueryError};
use crate::stats::report::{remote_requests, NodeReport};

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    /// A node did not answer.
    #[error("node {node}: {source}")]
    Query {
        /// The node, by its position in the guest's node list.
        node: usize,
        /// What went wrong.
        source: QueryError,
    },
}

/// One node's cumulative counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Local accesses that needed the DSM (read + write faults, pins included).
    pub faults: u64,
    /// Requests completed with a message to another node (read, write, upgrade).
    pub remote_requests: u64,
    /// Interrupt frames (IPIs, forwarded device interrupts) sent to other nodes.
    pub interrupts_sent: u64,
    /// Port and MMIO accesses forwarded to the master.
    pub io_forwarded: u64,
    /// The node's most-faulted pages, `(guest physical address, faults)`, most first.
    pub top_pages: Vec<(u64, u64)>,
}

impl From<&NodeReport> for NodeCounters {
    fn from(report: &NodeReport) -> NodeCounters {
        let mut counters = NodeCounters::default();
        if let Some(dsm) = &report.dsm {
            counters.faults = dsm.faults();
            counters.remote_requests = remote_requests(dsm);
            counters.top_pages = dsm
                .top_pages
                .iter()
                .map(|&(page, faults)| (page << dsm::PAGE_SHIFT, faults))
                .collect();
        }
        if let Some(forward) = &report.forward {
            counters.interrupts_sent = forward.interrupts_sent;
            counters.io_forwarded = forward.io_forwarded;
        }
        counters
    }
}

/// Every node's counters at one moment.
#[derive(Debug, Clone)]
pub struct NodeFigures {
    /// When the last node answered.
    pub taken: Instant,
    /// Per node, in node order.
    pub nodes: Vec<NodeCounters>,
}

/// How to reach the nodes of one running guest: their config files, in node order (a
/// single-node guest: its one config).
#[derive(Debug, Clone)]
pub struct StatsSource {
    /// Each node's config file; its control socket sits next to it.
    pub configs: Vec<PathBuf>,
}

/// A snapshot of every node's cumulative DSM and forwarding counters.
pub fn node_figures(source: &StatsSource) -> Result<NodeFigures, FiguresError> {
    let nodes = source
        .configs
        .iter()
        .enumerate()
        .map(|(node, config)| {
            query_config(config)
                .map(|report| NodeCounters::from(&report))
                .map_err(|source| FiguresError::Query { node, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NodeFigures {
        taken: Instant::now(),
        nodes,
    })
}

/// What the nodes did between two snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Seconds between the snapshots.
    pub seconds: f64,
    /// DSM faults, all nodes.
    pub faults: u64,
    /// Requests that left their node, all nodes.
    pub remote_requests: u64,
    /// Interrupt frames sent between nodes.
    pub interrupts: u64,
    /// Accesses forwarded to the master.
    pub io: u64,
    /// The most-faulted pages in the interval, `(gpa, faults, exact)`, most first; `exact` is
    /// false where the page was not among a node's full list of pages at the begin snapshot,
    /// so that its count then is known only to be at most the smallest listed one (the figure
    /// is then a lower bound).
    pub top_pages: Vec<(u64, u64, bool)>,
}

impl Delta {
    /// Between `begin` and `end` (of the same guest), whose nodes list at most `listed`
    /// most-faulted pages.
    pub fn between(begin: &NodeFigures, end: &NodeFigures, listed: usize) -> Delta {
        let seconds = end
            .taken
            .saturating_duration_since(begin.taken)
            .as_secs_f64();
        let mut delta = Delta {
            seconds,
            ..Delta::default()
        };
        let mut pages: HashMap<u64, (u64, bool)> = HashMap::new();
        let empty = NodeCounters::default();
        for (i, e) in end.nodes.iter().enumerate() {
            let b = begin.nodes.get(i).unwrap_or(&empty);
            delta.faults += e.faults.saturating_sub(b.faults);
            delta.remote_requests += e.remote_requests.saturating_sub(b.remote_requests);
            delta.interrupts += e.interrupts_sent.saturating_sub(b.interrupts_sent);
            delta.io += e.io_forwarded.saturating_sub(b.io_forwarded);
            let full = b.top_pages.len() >= listed;
            let floor = b.top_pages.iter().map(|p| p.1).min().unwrap_or(0);
            for &(gpa, count) in &e.top_pages {
                let (before, exact) = match b.top_pages.iter().find(|p| p.0 == gpa) {
                    Some(&(_, c)) => (c, true),
                    // Not listed at the begin: from a full list it had at most the smallest
                    // listed count; from a list with room, none.
                    None if full => (floor, false),
                    None => (0, true),
                };
                let entry = pages.entry(gpa).or_insert((0, true));
                entry.0 += count.saturating_sub(before);
                entry.1 &= exact;
            }
        }
        let mut top: Vec<(u64, u64, bool)> = pages
            .into_iter()
            .filter(|(_, (n, _))| *n > 0)
            .map(|(gpa, (n, exact))| (gpa, n, exact))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        delta.top_pages = top;
        delta
    }

    /// `count` per second of the interval.
    pub fn per_second(&self, count: u64) -> f64 {
        if self.seconds <= 0.0 {
            return 0.0;
        }
        // Counts stay far below 2^53.
        #[allow(clippy::cast_precision_loss)]
        let count = count as f64;
        count / self.seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counters_of_a_node_report() {
        let stats = dsm::NodeStats::new(16, 2);
        for _ in 0..3 {
            stats.record_fault(5, true);
        }
        stats.record_fault(7, false);
        stats.record_completed(
            dsm::stats::RequestKind::Write,
            true,
            Duration::from_micros(90),
        );
        stats.record_completed(
            dsm::stats::RequestKind::Read,
            false,
            Duration::from_micros(2),
        );
        let mut report = NodeReport::starting(1, 2, Duration::from_secs(9));
        report.dsm = Some(stats.snapshot(1));
        report.forward = Some(forward::ForwardStats {
            interrupts_sent: 77,
            io_forwarded: 12,
            ..Default::default()
        });
        assert_eq!(
            NodeCounters::from(&report),
            NodeCounters {
                faults: 4,
                remote_requests: 1,
                interrupts_sent: 77,
                io_forwarded: 12,
                top_pages: vec![(0x5000, 3), (0x7000, 1)],
            }
        );
        // A node without a DSM (a single-node guest, or one still starting).
        let alone = NodeReport::starting(0, 1, Duration::from_secs(1));
        assert_eq!(NodeCounters::from(&alone), NodeCounters::default());
    }

    #[test]
    fn a_node_that_is_not_running_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("node-1.toml");
        std::fs::write(&config, "").unwrap();
        let source = StatsSource {
            configs: vec![config],
        };
        let err = node_figures(&source).unwrap_err();
        assert!(
            err.to_string().starts_with("node 0: no node is running"),
            "{err}"
        );
    }

    #[test]
    fn deltas_and_the_top_pages_of_an_interval() {
        let t0 = Instant::now();
        let node = |faults, top: Vec<(u64, u64)>| NodeCounters {
            faults,
            remote_requests: faults / 2,
            interrupts_sent: faults / 10,
            io_forwarded: 1,
            top_pages: top,
        };
        let begin = NodeFigures {
            taken: t0,
            nodes: vec![
                node(1000, vec![(0x1000, 500), (0x2000, 300)]),
                node(100, vec![]),
            ],
        };
        let end = NodeFigures {
            taken: t0 + Duration::from_secs(2),
            nodes: vec![
                // 0x3000 is new: it had at most 300 at the begin.
                node(3000, vec![(0x3000, 1500), (0x1000, 600), (0x2000, 300)]),
                node(700, vec![(0x3000, 200)]),
            ],
        };
        // Node 0's list of 2 was full: 0x3000 had at most 300 there; node 1's was empty.
        let d = Delta::between(&begin, &end, 2);
        assert_eq!(d.faults, 2600);
        assert_eq!(d.remote_requests, 1300);
        assert!((d.per_second(d.faults) - 1300.0).abs() < 1e-6);
        assert_eq!(
            d.top_pages,
            vec![(0x3000, 1400, false), (0x1000, 100, true)]
        );
    }
}

//! Per-node DSM statistics: what a user reads to see why a workload is slow.
//!
//! Counters are atomics updated on the fault and message paths without locks; a
//! [`StatsSnapshot`] is a plain copy for printing ([`std::fmt::Display`]) and for tests.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::{NodeId, PAGE_SHIFT};

/// Buckets of the fault-service-time histogram: bucket `i > 0` holds `[2^i, 2^(i+1))` µs,
/// bucket 0 holds `[0, 2)` µs, the last bucket everything above.
pub const LATENCY_BUCKETS: usize = 32;

/// How a completed request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// A readable copy was installed.
    Read = 0,
    /// A writable copy was installed (page data or zero flag moved).
    Write = 1,
    /// Shared -> Modified: the local copy was kept, only permission moved.
    Upgrade = 2,
}

/// Live counters of one node.
pub struct NodeStats {
    faults_read: AtomicU64,
    faults_write: AtomicU64,
    faults_merged: AtomicU64,
    faults_resolved: AtomicU64,
    pins: AtomicU64,
    // [kind][0 = served without leaving the node, 1 = remote]
    completed: [[AtomicU64; 2]; 3],
    served_as_home: AtomicU64,
    served_as_source: AtomicU64,
    invalidations: AtomicU64,
    deferred_by_pin: AtomicU64,
    zero_pages_received: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    pages_sent: AtomicU64,
    pages_received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    frames_rejected: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    faults_per_page: Box<[AtomicU32]>,
    top_pages: usize,
}

impl NodeStats {
    /// Counters for a node of `page_count` pages, reporting the `top_pages` most-faulted pages.
    pub fn new(page_count: u64, top_pages: usize) -> NodeStats {
        NodeStats {
            faults_read: AtomicU64::new(0),
            faults_write: AtomicU64::new(0),
            faults_merged: AtomicU64::new(0),
            faults_resolved: AtomicU64::new(0),
            pins: AtomicU64::new(0),
            completed: Default::default(),
            served_as_home: AtomicU64::new(0),
            served_as_source: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            deferred_by_pin: AtomicU64::new(0),
            zero_pages_received: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            pages_sent: AtomicU64::new(0),
            pages_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
            latency: Default::default(),
            faults_per_page: (0..page_count).map(|_| AtomicU32::new(0)).collect(),
            top_pages,
        }
    }

    /// A local access (fault) needed `page` for a write (`true`) or a read.
    pub fn record_fault(&self, page: u64, write: bool) {
        if write {
            &self.faults_write
        } else {
            &self.faults_read
        }
        .fetch_add(1, Relaxed);
        let count = usize::try_from(page)
            .ok()
            .and_then(|page| self.faults_per_page.get(page));
        if let Some(count) = count {
            count.fetch_add(1, Relaxed);
        }
    }

    /// A fault joined a request already in flight for its page.
    pub fn record_merged(&self) {
        self.faults_merged.fetch_add(1, Relaxed);
    }

    /// A fault found its page already in the needed state (it raced with an install).
    pub fn record_resolved(&self) {
        self.faults_resolved.fetch_add(1, Relaxed);
    }

    /// A VMM-side pin of one page.
    pub fn record_pin(&self) {
        self.pins.fetch_add(1, Relaxed);
    }

    /// A request of this node completed after `latency`; `remote` if any message of it left the
    /// node.
    pub fn record_completed(&self, kind: RequestKind, remote: bool, latency: Duration) {
        self.completed[kind as usize][usize::from(remote)].fetch_add(1, Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = (63 - (micros | 1).leading_zeros()) as usize;
        self.latency[bucket.min(LATENCY_BUCKETS - 1)].fetch_add(1, Relaxed);
    }

    /// The directory served a request as the page's home.
    pub fn record_served_as_home(&self) {
        self.served_as_home.fetch_add(1, Relaxed);
    }

    /// This node sent its copy of a page to a requester.
    pub fn record_served_as_source(&self) {
        self.served_as_source.fetch_add(1, Relaxed);
    }

    /// This node dropped a copy at a home's request.
    pub fn record_invalidation(&self) {
        self.invalidations.fetch_add(1, Relaxed);
    }

    /// A downgrade or invalidation waited for a pin to end.
    pub fn record_deferred(&self) {
        self.deferred_by_pin.fetch_add(1, Relaxed);
    }

    /// A page was installed from the zero flag (no bytes moved).
    pub fn record_zero_page(&self) {
        self.zero_pages_received.fetch_add(1, Relaxed);
    }

    /// A message went to another node, with `payload` page bytes.
    pub fn record_sent(&self, payload: usize) {
        self.messages_sent.fetch_add(1, Relaxed);
        if payload > 0 {
            self.pages_sent.fetch_add(1, Relaxed);
            self.bytes_sent.fetch_add(payload as u64, Relaxed);
        }
    }

    /// A message came from another node, with `payload` page bytes.
    pub fn record_received(&self, payload: usize) {
        self.messages_received.fetch_add(1, Relaxed);
        if payload > 0 {
            self.pages_received.fetch_add(1, Relaxed);
            self.bytes_received.fetch_add(payload as u64, Relaxed);
        }
    }

    /// A frame or message was rejected as invalid.
    pub fn record_rejected(&self) {
        self.frames_rejected.fetch_add(1, Relaxed);
    }

    /// A copy of the counters, labelled with the node id.
    pub fn snapshot(&self, node: NodeId) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Relaxed);
        let pair = |k: RequestKind| {
            [
                load(&self.completed[k as usize][0]),
                load(&self.completed[k as usize][1]),
            ]
        };
        let mut heap: BinaryHeap<Reverse<(u32, Reverse<u64>)>> = BinaryHeap::new();
        if self.top_pages > 0 {
            for (page, count) in self.faults_per_page.iter().enumerate() {
                let count = count.load(Relaxed);
                if count == 0 {
                    continue;
                }
                heap.push(Reverse((count, Reverse(page as u64))));
                if heap.len() > self.top_pages {
                    heap.pop();
                }
            }
        }
        let mut top: Vec<(u64, u64)> = heap
            .into_iter()
            .map(|Reverse((count, Reverse(page)))| (page, u64::from(count)))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        StatsSnapshot {
            node,
            faults_read: load(&self.faults_read),
            faults_write: load(&self.faults_write),
            faults_merged: load(&self.faults_merged),
            faults_resolved: load(&self.faults_resolved),
            pins: load(&self.pins),
            reads: pair(RequestKind::Read),
            writes: pair(RequestKind::Write),
            upgrades: pair(RequestKind::Upgrade),
            served_as_home: load(&self.served_as_home),
            served_as_source: load(&self.served_as_source),
            invalidations: load(&self.invalidations),
            deferred_by_pin: load(&self.deferred_by_pin),
            zero_pages_received: load(&self.zero_pages_received),
            messages_sent: load(&self.messages_sent),
            messages_received: load(&self.messages_received),
            pages_sent: load(&self.pages_sent),
            pages_received: load(&self.pages_received),
            bytes_sent: load(&self.bytes_sent),
            bytes_received: load(&self.bytes_received),
            frames_rejected: load(&self.frames_rejected),
            latency_log2_us: std::array::from_fn(|i| load(&self.latency[i])),
            top_pages: top,
        }
    }
}

/// A copy of one node's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// The node.
    pub node: NodeId,
    /// Local accesses (faults and pins) that needed a readable page.
    pub faults_read: u64,
    /// Local accesses that needed a writable page.
    pub faults_write: u64,
    /// Faults that joined a request already in flight for the page.
    pub faults_merged: u64,
    /// Faults that found the page already in the needed state when handled.
    pub faults_resolved: u64,
    /// Pages pinned by the VMM.
    pub pins: u64,
    /// Read requests completed: `[served within this node, remote]`.
    pub reads: [u64; 2],
    /// Write requests completed that moved data or the zero flag: `[local, remote]`.
    pub writes: [u64; 2],
    /// Shared -> Modified upgrades completed (no data moved): `[local, remote]`.
    pub upgrades: [u64; 2],
    /// Requests this node's directory served as home.
    pub served_as_home: u64,
    /// Copies this node sent as a request's data source.
    pub served_as_source: u64,
    /// Copies this node dropped at a home's request.
    pub invalidations: u64,
    /// Downgrades or invalidations that waited for a pin to end.
    pub deferred_by_pin: u64,
    /// Pages installed from the zero flag.
    pub zero_pages_received: u64,
    /// Messages sent to other nodes.
    pub messages_sent: u64,
    /// Messages received from other nodes.
    pub messages_received: u64,
    /// Page payloads sent.
    pub pages_sent: u64,
    /// Page payloads received.
    pub pages_received: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Frames or messages rejected as invalid.
    pub frames_rejected: u64,
    /// Fault service time histogram (see [`LATENCY_BUCKETS`]).
    pub latency_log2_us: [u64; LATENCY_BUCKETS],
    /// The most-faulted pages, `(page, faults)`, most first.
    pub top_pages: Vec<(u64, u64)>,
}

impl StatsSnapshot {
    /// Local accesses that needed the DSM.
    pub fn faults(&self) -> u64 {
        self.faults_read + self.faults_write
    }

    /// Requests this node completed.
    pub fn requests(&self) -> u64 {
        [self.reads, self.writes, self.upgrades]
            .iter()
            .map(|[l, r]| l + r)
            .sum()
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "DSM statistics of node {}", self.node)?;
        writeln!(
            f,
            "  faults: {} (read {}, write {}); joined an in-flight request: {}; already resolved: {}; pages pinned by the VMM: {}",
            self.faults(),
            self.faults_read,
            self.faults_write,
            self.faults_merged,
            self.faults_resolved,
            self.pins
        )?;
        writeln!(f, "  requests completed    local   remote")?;
        for (name, [local, remote]) in [
            ("read", self.reads),
            ("write", self.writes),
            ("upgrade", self.upgrades),
        ] {
            writeln!(f, "    {name:<16}{local:>9} {remote:>8}")?;
        }
        writeln!(
            f,
            "  served as home: {}; as data source: {}; copies invalidated: {}; waits for a pin: {}",
            self.served_as_home, self.served_as_source, self.invalidations, self.deferred_by_pin
        )?;
        writeln!(
            f,
            "  traffic: sent {} messages ({} pages, {} bytes), received {} messages ({} pages, {} bytes); zero pages by flag: {}; rejected frames: {}",
            self.messages_sent,
            self.pages_sent,
            self.bytes_sent,
            self.messages_received,
            self.pages_received,
            self.bytes_received,
            self.zero_pages_received,
            self.frames_rejected
        )?;
        let total: u64 = self.latency_log2_us.iter().sum();
        if total > 0 {
            writeln!(f, "  fault service time (µs):")?;
            for (i, &count) in self.latency_log2_us.iter().enumerate() {
                if count == 0 {
                    continue;
                }
                let low = if i == 0 { 0 } else { 1u64 << i };
                // count <= total, so the bar is at most 40 characters.
                let width = (count * 40).div_ceil(total);
                let bar = "#".repeat(usize::try_from(width).unwrap_or(40));
                writeln!(f, "    [{low:>9}, {:>9}) {count:>9} {bar}", 1u64 << (i + 1))?;
            }
        }
        if !self.top_pages.is_empty() {
            writeln!(f, "  most-faulted pages:")?;
            for (page, count) in &self.top_pages {
                writeln!(f, "    gpa {:#014x}: {count} faults", page << PAGE_SHIFT)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_counts_and_ranks() {
        let stats = NodeStats::new(16, 2);
        for _ in 0..3 {
            stats.record_fault(5, true);
        }
        stats.record_fault(7, false);
        stats.record_fault(7, false);
        stats.record_fault(1, false);
        stats.record_completed(RequestKind::Read, true, Duration::from_micros(0));
        stats.record_completed(RequestKind::Upgrade, false, Duration::from_micros(3));
        stats.record_completed(RequestKind::Write, true, Duration::from_secs(1 << 40));
        stats.record_sent(4096);
        stats.record_sent(0);
        let snap = stats.snapshot(3);
        assert_eq!(snap.faults(), 6);
        assert_eq!(snap.faults_write, 3);
        assert_eq!(snap.requests(), 3);
        assert_eq!(snap.reads, [0, 1]);
        assert_eq!(snap.upgrades, [1, 0]);
        assert_eq!(snap.latency_log2_us[0], 1);
        assert_eq!(snap.latency_log2_us[1], 1);
        assert_eq!(snap.latency_log2_us[LATENCY_BUCKETS - 1], 1);
        assert_eq!(snap.top_pages, vec![(5, 3), (7, 2)]);
        assert_eq!(
            (snap.messages_sent, snap.pages_sent, snap.bytes_sent),
            (2, 1, 4096)
        );
        let text = snap.to_string();
        assert!(text.contains("node 3"));
        assert!(text.contains("gpa 0x000000005000: 3 faults"), "{text}");
    }
}

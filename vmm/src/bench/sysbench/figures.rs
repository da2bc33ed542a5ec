//! Per-workload DSM and forwarding figures of the nodes of a running guest.
//!
//! [`node_figures`] takes one snapshot of every node's cumulative counters; a workload's figures
//! are the difference of the snapshots at its begin and end markers. On main the snapshot is
//! taken the way a user takes one: SIGUSR1 to `spanvm cluster`, which passes it to every node,
//! and each node prints its DSM, forwarding and transport statistics on stderr (see
//! `commands::run`); the stderr reader hands each node's printed block to [`DumpBoard`], and
//! [`node_figures`] waits for one new block per node. A single-node guest (`spanvm run`) has no
//! DSM and forwards nothing: its snapshot is all zeros without asking.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a node may take to print its statistics after SIGUSR1.
const DUMP_WAIT: Duration = Duration::from_secs(10);

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    /// The signal could not be sent.
    #[error("cannot send SIGUSR1 to the cluster (pid {pid}): {source}")]
    Signal {
        /// The `spanvm cluster` process.
        pid: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// Some node printed nothing in time.
    #[error("node {node} printed no statistics within {DUMP_WAIT:?} of SIGUSR1")]
    Timeout {
        /// The first silent node.
        node: usize,
    },
}

/// One node's cumulative counters, as it printed them.
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

/// Every node's counters at one moment.
#[derive(Debug, Clone)]
pub struct NodeFigures {
    /// When the last node's block arrived.
    pub taken: Instant,
    /// Per node, in node order (empty for a single-node guest).
    pub nodes: Vec<NodeCounters>,
}

/// Reads the statistics blocks a node prints (one line at a time, `[node N] ` prefix removed).
#[derive(Debug, Default)]
struct BlockReader {
    current: Option<NodeCounters>,
    in_top_pages: bool,
}

/// The first unsigned number after `key` in `line`.
fn count_after(line: &str, key: &str) -> Option<u64> {
    let (_, rest) = line.split_once(key)?;
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

impl BlockReader {
    /// Takes one line; returns a block once its last line (`forwarding: ...`) came.
    fn line(&mut self, line: &str) -> Option<NodeCounters> {
        let text = line.trim();
        if text.starts_with("DSM statistics of node") {
            self.current = Some(NodeCounters::default());
            self.in_top_pages = false;
            return None;
        }
        let current = self.current.as_mut()?;
        if text.starts_with("faults:") {
            current.faults = count_after(text, "faults:").unwrap_or(0);
        } else if let Some(rest) = ["read ", "write ", "upgrade "]
            .iter()
            .find_map(|k| text.strip_prefix(k))
        {
            // "read   <local> <remote>" in the requests table.
            let numbers: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            if let [_, remote] = numbers[..] {
                current.remote_requests += remote;
            }
        } else if text.starts_with("most-faulted pages:") {
            self.in_top_pages = true;
        } else if self.in_top_pages && text.starts_with("gpa ") {
            // "gpa 0x000000005000: 3 faults"
            let page = text
                .strip_prefix("gpa ")
                .and_then(|r| r.split_once(':'))
                .and_then(|(a, rest)| {
                    let addr = u64::from_str_radix(a.trim().trim_start_matches("0x"), 16).ok()?;
                    let faults = rest.split_whitespace().next()?.parse().ok()?;
                    Some((addr, faults))
                });
            if let Some(page) = page {
                current.top_pages.push(page);
            }
        } else if text.starts_with("forwarding:") {
            current.interrupts_sent = count_after(text, "interrupt frames sent").unwrap_or(0);
            current.io_forwarded = count_after(text, "accesses forwarded").unwrap_or(0);
            self.in_top_pages = false;
            return self.current.take();
        }
        None
    }
}

/// Where the stderr reader leaves each node's statistics blocks, and [`node_figures`] waits for
/// them.
#[derive(Debug)]
pub struct DumpBoard {
    state: Mutex<BoardState>,
    arrived: Condvar,
}

#[derive(Debug)]
struct BoardState {
    readers: HashMap<usize, BlockReader>,
    blocks: Vec<Vec<(Instant, NodeCounters)>>,
}

impl DumpBoard {
    /// A board for `nodes` nodes.
    pub fn new(nodes: usize) -> Arc<DumpBoard> {
        Arc::new(DumpBoard {
            state: Mutex::new(BoardState {
                readers: HashMap::new(),
                blocks: vec![Vec::new(); nodes],
            }),
            arrived: Condvar::new(),
        })
    }

    /// One line of the cluster's stderr, with its `[node N] ` prefix.
    pub fn line(&self, line: &str) {
        let Some((node, text)) = line
            .strip_prefix("[node ")
            .and_then(|r| r.split_once("] "))
            .and_then(|(n, t)| Some((n.parse::<usize>().ok()?, t)))
        else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let block = state.readers.entry(node).or_default().line(text);
        if let Some(block) = block {
            if let Some(list) = state.blocks.get_mut(node) {
                list.push((Instant::now(), block));
                self.arrived.notify_all();
            }
        }
    }

    /// How many blocks each node printed so far.
    fn counts(&self) -> Vec<usize> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.blocks.iter().map(Vec::len).collect()
    }

    /// Waits until every node printed more than `before[node]` blocks; returns the newest.
    fn wait_past(&self, before: &[usize]) -> Result<NodeFigures, FiguresError> {
        let deadline = Instant::now() + DUMP_WAIT;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let behind = state
                .blocks
                .iter()
                .zip(before)
                .position(|(list, &n)| list.len() <= n);
            let Some(node) = behind else { break };
            let now = Instant::now();
            if now >= deadline {
                return Err(FiguresError::Timeout { node });
            }
            state = self
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut taken = None::<Instant>;
        let mut nodes = Vec::new();
        for list in &state.blocks {
            if let Some((when, block)) = list.last() {
                taken = Some(taken.map_or(*when, |t| t.max(*when)));
                nodes.push(block.clone());
            }
        }
        Ok(NodeFigures {
            taken: taken.unwrap_or_else(Instant::now),
            nodes,
        })
    }
}

/// How to reach the nodes of one running guest.
#[derive(Debug, Clone)]
pub struct StatsSource {
    /// The `spanvm cluster` process (which passes SIGUSR1 on to every node); `None` for a
    /// single-node guest, which has no DSM.
    pub cluster_pid: Option<u32>,
    /// Where its nodes' statistics blocks arrive.
    pub board: Arc<DumpBoard>,
}

/// A snapshot of every node's cumulative DSM and forwarding counters.
pub fn node_figures(source: &StatsSource) -> Result<NodeFigures, FiguresError> {
    let Some(pid) = source.cluster_pid else {
        return Ok(NodeFigures {
            taken: Instant::now(),
            nodes: Vec::new(),
        });
    };
    let before = source.board.counts();
    let target = libc::pid_t::try_from(pid).map_err(|_| FiguresError::Signal {
        pid,
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: kill(2) on the pid of a child this process started and has not reaped (the caller
    // holds its `Child` until after the last snapshot).
    if unsafe { libc::kill(target, libc::SIGUSR1) } != 0 {
        return Err(FiguresError::Signal {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    source.board.wait_past(&before)
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
    /// false where the page was not among a node's listed pages at the begin snapshot, so that
    /// its count then is known only to be at most the smallest listed one (the figure is then
    /// a lower bound).
    pub top_pages: Vec<(u64, u64, bool)>,
}

impl Delta {
    /// Between `begin` and `end` (of the same guest).
    pub fn between(begin: &NodeFigures, end: &NodeFigures) -> Delta {
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
            let floor = b.top_pages.iter().map(|p| p.1).min().unwrap_or(0);
            for &(gpa, count) in &e.top_pages {
                let (before, exact) = match b.top_pages.iter().find(|p| p.0 == gpa) {
                    Some(&(_, c)) => (c, true),
                    // Not listed at the begin: it had at most the smallest listed count (none
                    // at all if the list was empty).
                    None => (floor, b.top_pages.is_empty()),
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

    // What a node prints on SIGUSR1 (dsm::StatsSnapshot, ZapStats, ForwardStats,
    // TransportStats), as `spanvm cluster` relays it.
    const NODE1: &str = "[node 1] DSM statistics of node 1
[node 1]   faults: 1523 (read 1000, write 523); joined an in-flight request: 3; already resolved: 1; pages pinned by the VMM: 0
[node 1]   requests completed    local   remote
[node 1]     read                     10      900
[node 1]     write                     5      400
[node 1]     upgrade                   2       60
[node 1]   served as home: 700; as data source: 650; copies invalidated: 410; waits for a pin: 0
[node 1]   traffic: sent 4000 messages (900 pages, 3686400 bytes), received 4100 messages (950 pages, 3891200 bytes); zero pages by flag: 12; rejected frames: 0
[node 1]   fault service time (µs):
[node 1]     [       64,       128)       800 ####################
[node 1]   most-faulted pages:
[node 1]     gpa 0x000001bdb000: 400 faults
[node 1]     gpa 0x000007a20000: 300 faults
[node 1] shadow zap: 10 drops, 2 with a zap, 2 re-protections over 2 pages, 0 tables read, 0.1 ms in all
[node 1] forwarding: interrupt frames sent 77, interrupts received 80, accesses forwarded 1234, accesses served 0, addressing changes 1, EOIs sent 5
[node 1]   transport: sent 5000 frames; queued behind a full socket: 0; largest backlog: 4 KiB
";

    #[test]
    fn a_node_block_is_read_whole() {
        let board = DumpBoard::new(2);
        for line in NODE1.lines() {
            board.line(line);
        }
        board.line("[node 0] spanvm: node 0 running 1 of the guest's 2 vCPUs");
        assert_eq!(board.counts(), vec![0, 1]);
        let state = board.state.lock().unwrap();
        let block = &state.blocks[1][0].1;
        assert_eq!(
            *block,
            NodeCounters {
                faults: 1523,
                remote_requests: 1360,
                interrupts_sent: 77,
                io_forwarded: 1234,
                top_pages: vec![(0x1bdb000, 400), (0x7a20000, 300)],
            }
        );
    }

    #[test]
    fn a_snapshot_waits_for_every_node_and_times_out_naming_the_silent_one() {
        let board = DumpBoard::new(2);
        for line in NODE1.lines() {
            board.line(line);
        }
        let b2 = board.clone();
        let feeder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            for line in NODE1.replace("node 1", "node 0").lines() {
                b2.line(line);
            }
        });
        let figures = board.wait_past(&[0, 0]).unwrap();
        feeder.join().unwrap();
        assert_eq!(figures.nodes.len(), 2);
        assert_eq!(figures.nodes[0].faults, 1523);
    }

    #[test]
    fn single_node_guests_have_no_figures() {
        let source = StatsSource {
            cluster_pid: None,
            board: DumpBoard::new(1),
        };
        let figures = node_figures(&source).unwrap();
        assert!(figures.nodes.is_empty());
        let d = Delta::between(&figures, &node_figures(&source).unwrap());
        assert_eq!(
            (d.faults, d.remote_requests, d.interrupts, d.io),
            (0, 0, 0, 0)
        );
        assert!(d.top_pages.is_empty());
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
        let d = Delta::between(&begin, &end);
        assert_eq!(d.faults, 2600);
        assert_eq!(d.remote_requests, 1300);
        assert!((d.per_second(d.faults) - 1300.0).abs() < 1e-6);
        assert_eq!(
            d.top_pages,
            vec![(0x3000, 1400, false), (0x1000, 100, true)]
        );
    }
}

//! Real userfaultfd, no KVM: several DSM nodes inside this test process, each with its own
//! anonymous region, userfaultfd and `Dsm` runtime, linked by in-process channels that carry the
//! encoded frames (one delivery thread per node). Host threads play the vCPUs: they read, write
//! and atomically increment guest memory through the mapped regions, faulting like a guest would.
//!
//! userfaultfd must be available (we run as root); if it is not, these tests fail with the
//! reason instead of passing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dsm::{
    node_index, Access, Dsm, DsmConfig, DsmError, DsmLink, DsmMessage, Frame, LinkError, NodeId,
    StatsSnapshot, UffdGuestPages, PAGE_SIZE,
};

const PAGES: u64 = 256;

enum Delivery {
    Frame(NodeId, Vec<u8>),
    Stop,
}

/// Encoded frames waiting to be sent, with their destinations.
type HeldFrames = Vec<(NodeId, Vec<u8>)>;

/// Sends encoded frames over channels; can hold this node's outgoing traffic, or lose a node.
struct ChannelLink {
    me: NodeId,
    peers: Vec<Sender<Delivery>>,
    held: Mutex<Option<HeldFrames>>,
    lost: Arc<Vec<AtomicBool>>,
}

impl DsmLink for ChannelLink {
    fn send(&self, to: NodeId, msg: &DsmMessage) -> Result<(), LinkError> {
        assert_ne!(to, self.me, "the runtime handles messages to itself inline");
        if self.lost[node_index(to)].load(Ordering::SeqCst)
            || self.lost[node_index(self.me)].load(Ordering::SeqCst)
        {
            // A lost peer: the bytes vanish (as into a dead connection's buffer).
            return Ok(());
        }
        let mut bytes = Vec::new();
        msg.to_frame().encode_into(&mut bytes);
        if let Some(held) = self.held.lock().unwrap().as_mut() {
            held.push((to, bytes));
            return Ok(());
        }
        self.peers[node_index(to)]
            .send(Delivery::Frame(self.me, bytes))
            .map_err(|e| LinkError {
                peer: to,
                reason: e.to_string(),
            })
    }
}

impl ChannelLink {
    fn hold(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    fn release(&self) {
        let held = self.held.lock().unwrap().take().unwrap_or_default();
        for (to, bytes) in held {
            self.peers[node_index(to)]
                .send(Delivery::Frame(self.me, bytes))
                .unwrap();
        }
    }
}

struct Cluster {
    dsms: Vec<Arc<Dsm>>,
    memories: Vec<Arc<UffdGuestPages>>,
    links: Vec<Arc<ChannelLink>>,
    lost: Arc<Vec<AtomicBool>>,
    senders: Vec<Sender<Delivery>>,
    deliverers: Vec<JoinHandle<()>>,
}

impl Cluster {
    fn new(nodes: NodeId) -> Cluster {
        let (senders, receivers): (Vec<Sender<Delivery>>, Vec<Receiver<Delivery>>) =
            (0..nodes).map(|_| channel()).unzip();
        let lost: Arc<Vec<AtomicBool>> =
            Arc::new((0..nodes).map(|_| AtomicBool::new(false)).collect());
        let mut dsms = Vec::new();
        let mut memories = Vec::new();
        let mut links = Vec::new();
        for me in 0..nodes {
            let memory = Arc::new(
                UffdGuestPages::map_anonymous(usize::try_from(PAGES).unwrap() * PAGE_SIZE)
                    .unwrap_or_else(|e| panic!("userfaultfd is required for this test: {e}")),
            );
            let link = Arc::new(ChannelLink {
                me,
                peers: senders.clone(),
                held: Mutex::new(None),
                lost: lost.clone(),
            });
            let config = DsmConfig {
                node: me,
                node_count: nodes,
                page_count: PAGES,
                home_of: Arc::new(move |page| NodeId::try_from(page % u64::from(nodes)).unwrap()),
                top_pages: 4,
                service_priority: resources::ServicePriority::Normal,
            };
            let dsm = Dsm::start(config, memory.clone(), link.clone()).expect("start DSM node");
            dsms.push(Arc::new(dsm));
            memories.push(memory);
            links.push(link);
        }
        let deliverers = receivers
            .into_iter()
            .zip(&dsms)
            .map(|(receiver, dsm)| {
                let dsm = dsm.clone();
                std::thread::spawn(move || {
                    while let Ok(Delivery::Frame(from, bytes)) = receiver.recv() {
                        let frame = Frame::parse(&bytes).expect("frames we encoded parse");
                        dsm.on_frame(from, frame.view());
                    }
                })
            })
            .collect();
        Cluster {
            dsms,
            memories,
            links,
            lost,
            senders,
            deliverers,
        }
    }

    /// The `index`-th 64-bit word of `page` in node `node`'s mapping.
    fn word(&self, node: NodeId, page: u64, index: usize) -> &AtomicU64 {
        assert!(page < PAGES && index < PAGE_SIZE / 8);
        let addr = self.memories[node_index(node)].host_address() as usize
            + usize::try_from(page).unwrap() * PAGE_SIZE
            + index * 8;
        // SAFETY: the address is an aligned word inside node `node`'s mapping, which lives as long
        // as `self`; the DSM only changes what the word's page maps to, and all test accesses to
        // guest memory are atomic.
        unsafe { &*(addr as *const AtomicU64) }
    }

    fn stats(&self, node: NodeId) -> StatsSnapshot {
        self.dsms[node_index(node)].stats()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for sender in &self.senders {
            let _ = sender.send(Delivery::Stop);
        }
        for deliverer in self.deliverers.drain(..) {
            let _ = deliverer.join();
        }
        for dsm in &self.dsms {
            dsm.shutdown();
        }
    }
}

/// Waits for a condition that the test has made inevitable; fails after a generous time.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn increments_are_exact(nodes: NodeId) {
    let cluster = Arc::new(Cluster::new(nodes));
    const THREADS: NodeId = 2;
    const ROUNDS: u64 = 1500;
    // Page 5 and page 6 have different homes; each thread bumps both.
    let barrier = Arc::new(Barrier::new(node_index(nodes * THREADS)));
    let threads: Vec<_> = (0..nodes * THREADS)
        .map(|i| {
            let (cluster, barrier) = (cluster.clone(), barrier.clone());
            std::thread::spawn(move || {
                let node = i / THREADS;
                barrier.wait();
                for round in 0..ROUNDS {
                    // A read first makes the next increment an upgrade (WP fault) when the
                    // page arrived Shared.
                    if round % 3 == 0 {
                        let seen = cluster.word(node, 5, 0).load(Ordering::SeqCst);
                        assert!(seen <= u64::from(nodes * THREADS) * ROUNDS);
                    }
                    cluster.word(node, 5, 0).fetch_add(1, Ordering::SeqCst);
                    cluster.word(node, 6, 17).fetch_add(2, Ordering::SeqCst);
                    // Let the other threads in, so that the pages really move back and forth.
                    std::thread::yield_now();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let total = u64::from(nodes * THREADS) * ROUNDS;
    for node in 0..nodes {
        assert_eq!(
            cluster.word(node, 5, 0).load(Ordering::SeqCst),
            total,
            "node {node}"
        );
        assert_eq!(
            cluster.word(node, 6, 17).load(Ordering::SeqCst),
            2 * total,
            "node {node}"
        );
    }
    let mut upgrades = 0;
    for node in 0..nodes {
        let stats = cluster.stats(node);
        eprintln!("{stats}");
        upgrades += stats.upgrades[0] + stats.upgrades[1];
        assert!(stats.faults() > 0, "node {node} never faulted:\n{stats}");
        assert!(stats.dsm_requests_moved_data(), "node {node}:\n{stats}");
        assert!(
            stats
                .top_pages
                .iter()
                .any(|&(page, _)| page == 5 || page == 6),
            "{stats}"
        );
        assert!(cluster.dsms[node_index(node)].failure().is_none());
    }
    assert!(upgrades > 0, "no read-then-increment became an upgrade");
}

trait SnapshotExt {
    fn dsm_requests_moved_data(&self) -> bool;
}

impl SnapshotExt for StatsSnapshot {
    fn dsm_requests_moved_data(&self) -> bool {
        self.requests() > 0
            && self.writes[0] + self.writes[1] + self.upgrades[0] + self.upgrades[1] > 0
    }
}

#[test]
fn atomic_increments_from_two_nodes_are_exact() {
    increments_are_exact(2);
}

#[test]
fn atomic_increments_from_four_nodes_are_exact() {
    increments_are_exact(4);
}

#[test]
fn every_node_reads_every_other_nodes_writes() {
    for nodes in [2, 4] {
        let cluster = Arc::new(Cluster::new(nodes));
        let pattern = |round: u64, writer: NodeId, page: u64, word: usize| {
            (round << 56) | (u64::from(writer) << 48) | (page << 16) | word as u64
        };
        let pages_of = |writer: NodeId| (u64::from(writer) * 3 + 10)..(u64::from(writer) * 3 + 13);
        for round in 1..=3u64 {
            let barrier = Arc::new(Barrier::new(node_index(nodes)));
            let threads: Vec<_> = (0..nodes)
                .map(|node| {
                    let (cluster, barrier) = (cluster.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        // Each round a node writes whole pages of another node's previous set.
                        let writer_set = (node + NodeId::try_from(round).unwrap()) % nodes;
                        for page in pages_of(writer_set) {
                            for word in 0..PAGE_SIZE / 8 {
                                let value = pattern(round, node, page, word);
                                cluster
                                    .word(node, page, word)
                                    .store(value, Ordering::SeqCst);
                            }
                        }
                        barrier.wait();
                        for other in 0..nodes {
                            let owner = (0..nodes)
                                .find(|&n| (n + NodeId::try_from(round).unwrap()) % nodes == other)
                                .unwrap();
                            for page in pages_of(other) {
                                for word in 0..PAGE_SIZE / 8 {
                                    assert_eq!(
                                        cluster.word(node, page, word).load(Ordering::SeqCst),
                                        pattern(round, owner, page, word),
                                        "node {node} round {round} page {page} word {word}"
                                    );
                                }
                            }
                        }
                        barrier.wait();
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
        }
        let received: u64 = (0..nodes).map(|n| cluster.stats(n).pages_received).sum();
        assert!(received > 0, "page data must have moved between nodes");
    }
}

#[test]
fn never_written_pages_read_zero_without_moving_bytes() {
    let nodes = 4;
    let cluster = Arc::new(Cluster::new(nodes));
    let threads: Vec<_> = (0..nodes)
        .map(|node| {
            let cluster = cluster.clone();
            std::thread::spawn(move || {
                for page in 100..150 {
                    for word in [0, 100, 511] {
                        assert_eq!(cluster.word(node, page, word).load(Ordering::SeqCst), 0);
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    for node in 0..nodes {
        let stats = cluster.stats(node);
        assert_eq!(stats.zero_pages_received, 50, "node {node}:\n{stats}");
        assert_eq!(stats.reads[0] + stats.reads[1], 50, "node {node}:\n{stats}");
        assert_eq!(
            (stats.pages_sent, stats.bytes_sent),
            (0, 0),
            "node {node}:\n{stats}"
        );
        assert_eq!(
            (stats.pages_received, stats.bytes_received),
            (0, 0),
            "node {node}:\n{stats}"
        );
        // A quarter of the pages are homed here: served without leaving the node.
        assert_eq!(
            stats.reads[0],
            50 / u64::from(nodes) + u64::from(node < 50 % nodes),
            "{stats}"
        );
    }
}

#[test]
fn concurrent_faults_on_one_page_share_one_request() {
    let cluster = Arc::new(Cluster::new(2));
    // Page 40 is homed on node 0, which writes it first, so the readers need its data.
    cluster.word(0, 40, 3).store(0xfeed, Ordering::SeqCst);
    let before = cluster.stats(1);
    cluster.links[1].hold();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let cluster = cluster.clone();
            std::thread::spawn(move || cluster.word(1, 40, 3).load(Ordering::SeqCst))
        })
        .collect();
    // Every reader has faulted and its fault has been handled while the one request is held.
    wait_until("four faults are handled", || {
        cluster.stats(1).faults_read == before.faults_read + 4
    });
    cluster.links[1].release();
    for reader in readers {
        assert_eq!(reader.join().unwrap(), 0xfeed);
    }
    let stats = cluster.stats(1);
    assert_eq!(stats.faults_read - before.faults_read, 4, "{stats}");
    assert_eq!(stats.faults_merged - before.faults_merged, 3, "{stats}");
    assert_eq!(stats.requests() - before.requests(), 1, "{stats}");
    assert_eq!(stats.pages_received - before.pages_received, 1, "{stats}");
    let report = stats.to_string();
    assert!(
        report.contains("joined an in-flight request: 3"),
        "{report}"
    );
}

#[test]
fn write_after_read_upgrades_without_moving_data() {
    let cluster = Arc::new(Cluster::new(2));
    cluster.word(0, 21, 0).store(7, Ordering::SeqCst); // home 1, owner 0
    assert_eq!(cluster.word(1, 21, 0).load(Ordering::SeqCst), 7);
    let before = cluster.stats(1);
    cluster.word(1, 21, 0).store(8, Ordering::SeqCst); // Shared -> Modified on node 1
    let after = cluster.stats(1);
    assert_eq!(
        after.upgrades[0] + after.upgrades[1],
        before.upgrades[0] + before.upgrades[1] + 1
    );
    assert_eq!(
        after.pages_received, before.pages_received,
        "an upgrade moves no page"
    );
    assert_eq!(cluster.word(0, 21, 0).load(Ordering::SeqCst), 8);
}

#[test]
fn pinned_page_holds_off_remote_readers_until_unpinned() {
    let cluster = Arc::new(Cluster::new(2));
    let page = 2u64; // homed on node 0
    let gpa = page * PAGE_SIZE as u64;
    let pin = cluster.dsms[0]
        .pin(gpa + 8, 16, Access::Write)
        .expect("pin");
    assert_eq!(pin.pages(), page..page + 1);
    // The VMM writes through its mapping while the page is pinned.
    cluster.word(0, page, 1).store(111, Ordering::SeqCst);
    let reader = {
        let cluster = cluster.clone();
        std::thread::spawn(move || cluster.word(1, page, 1).load(Ordering::SeqCst))
    };
    wait_until("the downgrade waits for the pin", || {
        cluster.stats(0).deferred_by_pin == 1
    });
    cluster.word(0, page, 1).store(222, Ordering::SeqCst);
    drop(pin);
    assert_eq!(
        reader.join().unwrap(),
        222,
        "the reader sees the last write made under the pin"
    );
    // A read pin on node 1 needs no new request: it holds a Shared copy now.
    let requests = cluster.stats(1).requests();
    let read_pin = cluster.dsms[1]
        .pin(gpa, PAGE_SIZE as u64, Access::Read)
        .unwrap();
    assert_eq!(cluster.stats(1).requests(), requests);
    assert_eq!(cluster.word(1, page, 1).load(Ordering::SeqCst), 222);
    drop(read_pin);
    assert!(matches!(
        cluster.dsms[1].pin(PAGES * PAGE_SIZE as u64, 1, Access::Read),
        Err(DsmError::RangeOutOfMemory { .. })
    ));
}

#[test]
fn pins_out_of_page_order_are_refused() {
    let cluster = Cluster::new(2);
    let dsm = &cluster.dsms[0];
    let at = |page: u64| page * PAGE_SIZE as u64;
    let five = dsm.pin(at(5), 8, Access::Read).unwrap();
    for (page, len) in [(3, 8), (5, 8), (4, 2 * PAGE_SIZE as u64)] {
        assert!(
            matches!(
                dsm.pin(at(page), len, Access::Read),
                Err(DsmError::PinOrder { held: 5, .. })
            ),
            "page {page} after page 5"
        );
    }
    let six_seven = dsm.pin(at(6), 2 * PAGE_SIZE as u64, Access::Write).unwrap();
    assert!(matches!(
        dsm.pin(at(7), 8, Access::Read),
        Err(DsmError::PinOrder { page: 7, held: 7 })
    ));
    // Another thread has its own order.
    std::thread::scope(|s| {
        s.spawn(|| drop(dsm.pin(at(1), 8, Access::Read).unwrap()));
    });
    drop(five);
    assert!(matches!(
        dsm.pin(at(3), 8, Access::Read),
        Err(DsmError::PinOrder { held: 7, .. })
    ));
    drop(six_seven);
    drop(dsm.pin(at(3), 8, Access::Read).unwrap());
    // The refused pins left nothing pinned.
    cluster.word(1, 5, 0).store(9, Ordering::SeqCst);
    assert_eq!(cluster.word(0, 5, 0).load(Ordering::SeqCst), 9);
}

#[test]
fn overlapping_read_pins_let_a_remote_writer_through() {
    // Two threads of node 1 pin a page in turn, each holding its pin until the other has taken
    // a new one (or 50 ms have passed: a pin that gives way to a revocation waits for the
    // held one to end), so that without the pin rule some pin is always held and node 0's
    // write of the page would wait forever.
    let cluster = Arc::new(Cluster::new(2));
    let page = 6u64; // homed on node 0
    let gpa = page * PAGE_SIZE as u64;
    assert_eq!(cluster.word(1, page, 0).load(Ordering::SeqCst), 0);
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new((Mutex::new(0u64), Condvar::new()));
    let pinners: Vec<_> = (0..2)
        .map(|_| {
            let (cluster, stop, taken) = (cluster.clone(), stop.clone(), taken.clone());
            std::thread::spawn(move || {
                let (count, changed) = &*taken;
                while !stop.load(Ordering::SeqCst) {
                    let pin = cluster.dsms[1].pin(gpa, 8, Access::Read).unwrap();
                    let mine = {
                        let mut count = count.lock().unwrap();
                        *count += 1;
                        changed.notify_all();
                        *count
                    };
                    let count = count.lock().unwrap();
                    let _ = changed
                        .wait_timeout_while(count, Duration::from_millis(50), |c| {
                            *c == mine && !stop.load(Ordering::SeqCst)
                        })
                        .unwrap();
                    drop(pin);
                }
            })
        })
        .collect();
    wait_until("both pinners are running", || *taken.0.lock().unwrap() >= 4);
    let written = Arc::new(AtomicBool::new(false));
    // Left behind blocked if the write starves; the assertion below says so.
    let _writer = {
        let (cluster, written) = (cluster.clone(), written.clone());
        std::thread::spawn(move || {
            cluster.word(0, page, 0).store(77, Ordering::SeqCst);
            written.store(true, Ordering::SeqCst);
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !written.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    taken.1.notify_all();
    for pinner in pinners {
        pinner.join().unwrap();
    }
    assert!(
        written.load(Ordering::SeqCst),
        "the remote write starved behind overlapping read pins"
    );
    assert_eq!(cluster.word(1, page, 0).load(Ordering::SeqCst), 77);
}

#[test]
fn a_lost_peer_never_makes_a_page_read_as_zero() {
    let cluster = Cluster::new(2);
    let page = 4u64; // homed on node 0
    cluster.word(0, page, 0).store(0xdead, Ordering::SeqCst);
    let faults_before = cluster.stats(1).faults_read;
    cluster.lost[0].store(true, Ordering::SeqCst);
    let read: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
    let addr = cluster.word(1, page, 0) as *const AtomicU64 as usize;
    // This reader blocks for good; it is left behind, and ends with the test process.
    let _reader = {
        let read = read.clone();
        std::thread::spawn(move || {
            // SAFETY: node 1's mapping is never unmapped after its DSM failed (the memory is
            // frozen), so the word stays valid for the life of the process.
            let word = unsafe { &*(addr as *const AtomicU64) };
            let value = word.load(Ordering::SeqCst);
            *read.lock().unwrap() = Some(value);
        })
    };
    wait_until("the reader's fault is handled", || {
        cluster.stats(1).faults_read > faults_before
    });
    cluster.dsms[1].fail("lost node 0 (test)");
    assert!(matches!(
        cluster.dsms[1].pin(0, 8, Access::Read),
        Err(DsmError::Failed { .. })
    ));
    assert_eq!(
        cluster.dsms[1].failure().as_deref(),
        Some("lost node 0 (test)")
    );
    // Neither the failure nor the teardown of the node (runtime and memory dropped) may let the
    // blocked access through: it would read a zero page.
    drop(cluster);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        *read.lock().unwrap(),
        None,
        "a read completed although its data is unreachable"
    );
}

#[test]
fn bad_frames_and_misrouted_messages_are_rejected_and_counted() {
    let cluster = Cluster::new(2);
    let node = &cluster.dsms[1];
    let good = DsmMessage::Request {
        page: 3,
        id: dsm::RequestId { node: 0, seq: 1 },
        access: Access::Read,
    };
    let mut beyond_memory = good.to_frame();
    beyond_memory.arg = PAGES * PAGE_SIZE as u64;
    let mut unknown_node = good.to_frame();
    unknown_node.id = 9 << dsm::RequestId::SEQ_BITS;
    let mut truncated_page = DsmMessage::Grant {
        page: 3,
        id: dsm::RequestId { node: 1, seq: 1 },
        access: Access::Read,
        sharers: dsm::NodeSet::EMPTY,
        data: dsm::GrantData::Bytes(Box::new([1; PAGE_SIZE])),
    }
    .to_frame();
    truncated_page.payload.truncate(100);
    for frame in [beyond_memory, unknown_node, truncated_page] {
        node.on_frame(0, frame.view());
    }
    // Valid frames with the wrong route: page 3 is homed on node 1, but the "requester" lies
    // about who it is; and a fetch that does not come from the page's home.
    node.on_message(
        0,
        DsmMessage::Request {
            page: 3,
            id: dsm::RequestId { node: 1, seq: 5 },
            access: Access::Write,
        },
    );
    node.on_message(
        0,
        DsmMessage::Fetch {
            page: 3,
            id: dsm::RequestId { node: 0, seq: 2 },
            access: Access::Read,
            sharers: dsm::NodeSet::EMPTY,
        },
    );
    // A sender outside the cluster, and a stray grant for a request never made.
    node.on_message(7, good);
    node.on_message(
        0,
        DsmMessage::Grant {
            page: 8,
            id: dsm::RequestId { node: 1, seq: 99 },
            access: Access::Read,
            sharers: dsm::NodeSet::EMPTY,
            data: dsm::GrantData::Zero,
        },
    );
    let stats = cluster.stats(1);
    assert_eq!(stats.frames_rejected, 7, "{stats}");
    assert!(
        node.failure().is_none(),
        "a peer's bad messages must not stop the node"
    );
    assert_eq!(node.directory_view(3).serving, None);
    assert_eq!(node.page_state(8), dsm::PageState::Invalid);
    // The node still works.
    cluster.word(0, 3, 0).store(5, Ordering::SeqCst);
    assert_eq!(cluster.word(1, 3, 0).load(Ordering::SeqCst), 5);
}

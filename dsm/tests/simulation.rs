//! The DSM state machines of 2 to 16 nodes over a simulated network, without KVM or userfaultfd.
//!
//! Each simulated node has a `NodePages`, a `HomeDirectory`, memory on the heap with the kernel's
//! rules (`HeapPages`), a queue of raised-but-unread faults (the uffd queue), and a few threads
//! that read and write a few hot pages, or pin them as the VMM would. The network has one FIFO
//! channel per (sender, receiver, class), the class being the connection the real system uses
//! (`is_bulk`); a node's messages to itself go through a channel too. A seeded RNG picks, at each
//! step, one thing to happen: deliver the head of some channel, let a fault thread read one fault,
//! or let a thread run one access. That gives every interleaving of delays and reorderings the
//! real transport allows (and, with `fifo: false`, arbitrary reordering even within a channel).
//!
//! After every step it checks, for the page the step concerned (and every 64 steps for all): at most one node holds a page Modified, and then nobody holds it
//! Shared; every node's mapping agrees with its state; every valid copy holds the latest write.
//! Every read checks its value against the latest write. Page bytes move only for pages that were
//! write-granted (never-written pages move as the zero flag). At the end: every thread finished,
//! every channel is empty, no request is pending and no directory entry is busy.
//!
//! `DSM_SIM_SEEDS=N` runs N seeds per configuration instead of the default few.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use dsm::{
    node_index, Access, DsmMessage, GrantData, GuestPages, HeapPages, HomeDirectory, Mapping,
    NodeId, NodePages, NodeStats, Outgoing, PageState, PinOutcome, StatsSnapshot,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Request,
    Bulk,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read(u64),
    Write(u64),
    Pin {
        page: u64,
        access: Access,
        hold: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ThreadState {
    Ready,
    /// Faulted on the page; waits for a wake of that page (like a thread blocked in uffd).
    Blocked(u64),
    /// A pin attempt waits for the node's request for the page to complete, or for a
    /// revocation of the page that waits for earlier pins to run.
    PinWaiting(u64),
    /// Holds a pin and accesses the page through it for `left` more steps.
    Pinned {
        page: u64,
        access: Access,
        left: u32,
    },
    Done,
}

struct SimThread {
    ops: VecDeque<Op>,
    state: ThreadState,
}

struct SimNode {
    pages: NodePages,
    directory: HomeDirectory,
    memory: HeapPages,
    stats: Arc<NodeStats>,
    raised_faults: VecDeque<(u64, Access)>,
    threads: Vec<SimThread>,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    nodes: NodeId,
    threads_per_node: usize,
    ops_per_thread: usize,
    hot_pages: u64,
    cold_pages: u64,
    /// Percentages of operation kinds; the rest are reads.
    write_percent: u32,
    read_then_write_percent: u32,
    pin_percent: u32,
    fifo: bool,
    seed: u64,
}

#[derive(Default, Debug)]
struct Totals {
    steps: u64,
    messages: u64,
    /// Copies sent by a data source other than the home, beside the home's grant.
    page_data_messages: u64,
    page_bytes_between_nodes: u64,
    reads_checked: u64,
    writes: u64,
    pinned_accesses: u64,
    /// Pins that gave way to a revocation waiting for earlier pins.
    pins_revoking: u64,
}

struct Sim {
    work: Workload,
    rng: StdRng,
    nodes: Vec<SimNode>,
    page_count: u64,
    channels: BTreeMap<(NodeId, NodeId, Class), VecDeque<DsmMessage>>,
    latest: HashMap<u64, u64>,
    next_value: u64,
    write_granted: HashSet<u64>,
    totals: Totals,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Deliver(NodeId, NodeId, Class),
    HandleFault(NodeId),
    Step(NodeId, usize),
}

impl Sim {
    fn new(work: Workload) -> Sim {
        let page_count = work.hot_pages + work.cold_pages;
        let nodes_count = work.nodes;
        let home_of: dsm::HomeFn =
            Arc::new(move |page| NodeId::try_from(page % u64::from(nodes_count)).unwrap());
        let mut rng = StdRng::seed_from_u64(work.seed);
        let nodes = (0..work.nodes)
            .map(|me| {
                let stats = Arc::new(NodeStats::new(page_count, 4));
                let threads = (0..work.threads_per_node)
                    .map(|t| SimThread {
                        ops: Self::ops(&work, &mut rng, page_count, t < 2),
                        state: ThreadState::Ready,
                    })
                    .collect();
                SimNode {
                    pages: NodePages::new(
                        me,
                        work.nodes,
                        page_count,
                        home_of.clone(),
                        stats.clone(),
                    ),
                    directory: HomeDirectory::new(me, stats.clone()),
                    memory: HeapPages::new(page_count),
                    stats,
                    raised_faults: VecDeque::new(),
                    threads,
                }
            })
            .collect();
        Sim {
            work,
            rng,
            nodes,
            page_count,
            channels: BTreeMap::new(),
            latest: HashMap::new(),
            next_value: 1,
            write_granted: HashSet::new(),
            totals: Totals::default(),
        }
    }

    /// Random operations; a node's first two threads pin (they play the VMM's device threads,
    /// whose pins of one page may overlap).
    fn ops(work: &Workload, rng: &mut StdRng, page_count: u64, may_pin: bool) -> VecDeque<Op> {
        let mut ops = VecDeque::new();
        while ops.len() < work.ops_per_thread {
            let page = if work.cold_pages == 0 || rng.gen_bool(0.85) {
                rng.gen_range(0..work.hot_pages)
            } else {
                rng.gen_range(work.hot_pages..page_count)
            };
            let roll = rng.gen_range(0..100);
            if roll < work.write_percent {
                ops.push_back(Op::Write(page));
            } else if roll < work.write_percent + work.read_then_write_percent {
                ops.push_back(Op::Read(page));
                ops.push_back(Op::Write(page));
            } else if may_pin
                && roll < work.write_percent + work.read_then_write_percent + work.pin_percent
            {
                let access = if rng.gen_bool(0.5) {
                    Access::Read
                } else {
                    Access::Write
                };
                ops.push_back(Op::Pin {
                    page,
                    access,
                    hold: rng.gen_range(1..6),
                });
            } else {
                ops.push_back(Op::Read(page));
            }
        }
        ops
    }

    fn home_of(&self, page: u64) -> NodeId {
        NodeId::try_from(page % u64::from(self.work.nodes)).unwrap()
    }

    fn send(&mut self, from: NodeId, out: &mut Vec<Outgoing>) {
        for Outgoing { to, msg } in out.drain(..) {
            if let DsmMessage::Grant {
                page,
                data: GrantData::Bytes(_),
                ..
            }
            | DsmMessage::PageData { page, .. } = &msg
            {
                assert!(
                    self.write_granted.contains(page),
                    "page {page} moves as bytes but was never write-granted: zero pages must move as the flag"
                );
                if from != to {
                    self.totals.page_bytes_between_nodes += dsm::PAGE_SIZE as u64;
                }
            }
            let class = if msg.is_bulk() {
                Class::Bulk
            } else {
                Class::Request
            };
            self.channels
                .entry((from, to, class))
                .or_default()
                .push_back(msg);
        }
    }

    fn enabled_actions(&self) -> (Vec<Action>, Vec<Action>, Vec<Action>) {
        let deliveries = self
            .channels
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(&(from, to, class), _)| Action::Deliver(from, to, class))
            .collect();
        let mut faults = Vec::new();
        let mut steps = Vec::new();
        for (n, node) in (0..).zip(&self.nodes) {
            if !node.raised_faults.is_empty() {
                faults.push(Action::HandleFault(n));
            }
            for (t, thread) in node.threads.iter().enumerate() {
                let runnable = match thread.state {
                    ThreadState::Ready | ThreadState::Pinned { .. } => true,
                    ThreadState::PinWaiting(page) => {
                        !node.pages.has_pending(page) && !node.pages.has_deferred(page)
                    }
                    ThreadState::Blocked(_) | ThreadState::Done => false,
                };
                if runnable {
                    steps.push(Action::Step(n, t));
                }
            }
        }
        (deliveries, faults, steps)
    }

    fn run(&mut self) -> Vec<StatsSnapshot> {
        let limit = 5_000_000u64;
        loop {
            let (deliveries, faults, steps) = self.enabled_actions();
            let groups: Vec<&Vec<Action>> = [&deliveries, &faults, &steps]
                .into_iter()
                .filter(|g| !g.is_empty())
                .collect();
            if groups.is_empty() {
                break;
            }
            let group = groups[self.rng.gen_range(0..groups.len())];
            let action = group[self.rng.gen_range(0..group.len())];
            self.totals.steps += 1;
            assert!(
                self.totals.steps < limit,
                "no termination after {limit} steps (livelock?)"
            );
            // An action changes only the page it concerns, so checking that page after it keeps
            // the invariants checked at every step; a sweep of all pages backs this up.
            let page = match action {
                Action::Deliver(from, to, class) => self.deliver(from, to, class),
                Action::HandleFault(n) => self.handle_fault(n),
                Action::Step(n, t) => self.step(n, t),
            };
            self.wake_threads();
            self.check_page(page, action);
            if self.totals.steps % 64 == 0 {
                (0..self.page_count).for_each(|p| self.check_page(p, action));
            }
        }
        (0..self.page_count).for_each(|p| self.check_page(p, Action::HandleFault(0)));
        self.check_quiescent();
        (0..)
            .zip(&self.nodes)
            .map(|(n, node)| node.stats.snapshot(n))
            .collect()
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, class: Class) -> u64 {
        let queue = self
            .channels
            .get_mut(&(from, to, class))
            .expect("enabled channel");
        let index = if self.work.fifo {
            0
        } else {
            self.rng.gen_range(0..queue.len())
        };
        let msg = queue.remove(index).expect("non-empty channel");
        if queue.is_empty() {
            self.channels.remove(&(from, to, class));
        }
        self.totals.messages += 1;
        if let DsmMessage::PageData { .. } = msg {
            self.totals.page_data_messages += 1;
        }
        let page = msg.page();
        msg.check_route(from, to, self.home_of(page))
            .unwrap_or_else(|e| panic!("protocol produced a badly routed message {msg:?}: {e}"));
        // The wire form must carry it unchanged.
        let limits = dsm::WireLimits {
            page_count: self.page_count,
            node_count: self.work.nodes,
        };
        assert_eq!(
            dsm::DsmMessage::from_frame(msg.to_frame().view(), &limits).as_ref(),
            Ok(&msg)
        );
        let mut out = Vec::new();
        let node = &mut self.nodes[node_index(to)];
        if msg.is_for_home() {
            let result = match msg {
                DsmMessage::Request { page, id, access } => {
                    node.directory.on_request(page, id, access, &mut out)
                }
                DsmMessage::Confirm { page, id } => node.directory.on_confirm(page, id, &mut out),
                _ => unreachable!(),
            };
            result.unwrap_or_else(|e| panic!("directory of node {to}: {e}"));
        } else {
            let done = node
                .pages
                .on_message(from, msg, Instant::now(), &node.memory, &mut out)
                .unwrap_or_else(|e| panic!("node {to}: {e}"));
            if let Some(done) = done {
                if done.state == PageState::Modified {
                    self.write_granted.insert(done.page);
                }
            }
        }
        self.send(to, &mut out);
        page
    }

    fn handle_fault(&mut self, n: NodeId) -> u64 {
        let node = &mut self.nodes[node_index(n)];
        let (page, access) = node.raised_faults.pop_front().expect("enabled fault");
        let mut out = Vec::new();
        let outcome = node
            .pages
            .fault(page, access, Instant::now(), &mut out)
            .unwrap_or_else(|e| panic!("fault on node {n}: {e}"));
        if outcome == dsm::LocalOutcome::Satisfied {
            node.memory.wake(page).unwrap();
        }
        self.send(n, &mut out);
        page
    }

    fn latest(&self, page: u64) -> u64 {
        self.latest.get(&page).copied().unwrap_or(0)
    }

    fn step(&mut self, n: NodeId, t: usize) -> u64 {
        let mut out = Vec::new();
        let state = self.nodes[node_index(n)].threads[t].state;
        let page = match state {
            ThreadState::Pinned { page, .. } => page,
            _ => match self.nodes[node_index(n)].threads[t].ops.front() {
                Some(Op::Read(page) | Op::Write(page) | Op::Pin { page, .. }) => *page,
                None => unreachable!("runnable thread without an op"),
            },
        };
        match state {
            ThreadState::Ready | ThreadState::PinWaiting(_) => {
                let op = *self.nodes[node_index(n)].threads[t]
                    .ops
                    .front()
                    .expect("ready thread has an op");
                match op {
                    Op::Read(page) => match self.nodes[node_index(n)].memory.load(page, 0) {
                        Some(value) => {
                            assert_eq!(
                                value,
                                self.latest(page),
                                "node {n} thread {t} read a stale value of page {page}"
                            );
                            self.totals.reads_checked += 1;
                            self.finish_op(n, t);
                        }
                        None => self.raise_fault(n, t, page, Access::Read),
                    },
                    Op::Write(page) => {
                        let value = self.next_value;
                        if self.nodes[node_index(n)].memory.store(page, 0, value) {
                            self.next_value += 1;
                            self.latest.insert(page, value);
                            self.totals.writes += 1;
                            self.finish_op(n, t);
                        } else {
                            self.raise_fault(n, t, page, Access::Write);
                        }
                    }
                    Op::Pin { page, access, hold } => {
                        let node = &mut self.nodes[node_index(n)];
                        let outcome = node
                            .pages
                            .try_pin(page, access, Instant::now(), &mut out)
                            .unwrap_or_else(|e| panic!("pin on node {n}: {e}"));
                        let thread = &mut node.threads[t];
                        match outcome {
                            PinOutcome::Pinned => {
                                thread.ops.pop_front();
                                thread.state = ThreadState::Pinned {
                                    page,
                                    access,
                                    left: hold,
                                };
                            }
                            PinOutcome::Waiting => thread.state = ThreadState::PinWaiting(page),
                            PinOutcome::Revoking => {
                                thread.state = ThreadState::PinWaiting(page);
                                self.totals.pins_revoking += 1;
                            }
                        }
                    }
                }
            }
            ThreadState::Pinned { page, access, left } if left > 0 => {
                // The VMM accesses the page directly: a pin guarantees this never faults.
                let value = self.nodes[node_index(n)].memory.load(page, 0);
                assert_eq!(
                    value,
                    Some(self.latest(page)),
                    "pinned read on node {n} of page {page}"
                );
                if access == Access::Write {
                    let value = self.next_value;
                    assert!(
                        self.nodes[node_index(n)].memory.store(page, 0, value),
                        "pinned write faulted"
                    );
                    self.next_value += 1;
                    self.latest.insert(page, value);
                }
                self.totals.pinned_accesses += 1;
                self.nodes[node_index(n)].threads[t].state = ThreadState::Pinned {
                    page,
                    access,
                    left: left - 1,
                };
            }
            ThreadState::Pinned { page, access, .. } => {
                let node = &mut self.nodes[node_index(n)];
                node.pages
                    .unpin(page, access, &node.memory, &mut out)
                    .unwrap_or_else(|e| panic!("unpin on node {n}: {e}"));
                node.threads[t].state = ThreadState::Ready;
                self.finish_if_empty(n, t);
            }
            ThreadState::Blocked(_) | ThreadState::Done => unreachable!("not runnable"),
        }
        self.send(n, &mut out);
        page
    }

    fn raise_fault(&mut self, n: NodeId, t: usize, page: u64, access: Access) {
        let node = &mut self.nodes[node_index(n)];
        node.raised_faults.push_back((page, access));
        node.threads[t].state = ThreadState::Blocked(page);
    }

    fn finish_op(&mut self, n: NodeId, t: usize) {
        let thread = &mut self.nodes[node_index(n)].threads[t];
        thread.ops.pop_front();
        thread.state = ThreadState::Ready;
        self.finish_if_empty(n, t);
    }

    fn finish_if_empty(&mut self, n: NodeId, t: usize) {
        let thread = &mut self.nodes[node_index(n)].threads[t];
        if thread.ops.is_empty() {
            thread.state = ThreadState::Done;
        }
    }

    /// Wakes threads blocked on pages that were installed, unprotected or explicitly woken (uffd
    /// wakes every waiter of the range; a woken thread retries its access).
    fn wake_threads(&mut self) {
        for node in &mut self.nodes {
            let woken = node.memory.take_woken();
            if woken.is_empty() {
                continue;
            }
            for thread in &mut node.threads {
                if let ThreadState::Blocked(page) = thread.state {
                    if woken.contains(&page) {
                        thread.state = ThreadState::Ready;
                    }
                }
            }
        }
    }

    fn check_page(&self, page: u64, after: Action) {
        {
            let latest = self.latest(page);
            let mut modified = Vec::new();
            let mut shared = Vec::new();
            for (n, node) in (0..).zip(&self.nodes) {
                let state = node.pages.state(page);
                let mapping = node.memory.mapping(page);
                let expected = match state {
                    PageState::Invalid => Mapping::NotPresent,
                    PageState::Shared => Mapping::ReadOnly,
                    PageState::Modified => Mapping::Writable,
                };
                assert_eq!(
                    mapping, expected,
                    "node {n} page {page}: state {state:?} but mapping {mapping:?} after {after:?}"
                );
                match state {
                    PageState::Invalid => continue,
                    PageState::Shared => shared.push(n),
                    PageState::Modified => modified.push(n),
                }
                assert_eq!(
                    node.memory.load(page, 0),
                    Some(latest),
                    "node {n} holds page {page} ({state:?}) with a stale value after {after:?}"
                );
            }
            assert!(
                modified.len() <= 1 && (modified.is_empty() || shared.is_empty()),
                "page {page}: Modified on {modified:?}, Shared on {shared:?} after {after:?}"
            );
        }
    }

    fn check_quiescent(&self) {
        for (n, node) in (0..).zip(&self.nodes) {
            for (t, thread) in node.threads.iter().enumerate() {
                assert_eq!(
                    thread.state,
                    ThreadState::Done,
                    "node {n} thread {t} stuck with {} ops left",
                    thread.ops.len()
                );
            }
            assert!(node.raised_faults.is_empty());
            assert_eq!(
                node.pages.pending_pages(),
                Vec::<u64>::new(),
                "node {n} has requests in flight"
            );
            assert_eq!(
                node.pages.deferred_pages(),
                Vec::<u64>::new(),
                "node {n} has deferred operations"
            );
            assert_eq!(
                node.directory.busy_pages(),
                Vec::<u64>::new(),
                "node {n} directory busy"
            );
        }
        assert!(
            self.channels.values().all(|q| q.is_empty()),
            "messages left in flight"
        );
    }
}

/// Seeds per configuration: `default`, or `DSM_SIM_SEEDS` for longer runs.
fn seeds(default: u64) -> u64 {
    std::env::var("DSM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn sum(snapshots: &[StatsSnapshot], f: impl Fn(&StatsSnapshot) -> u64) -> u64 {
    snapshots.iter().map(f).sum()
}

fn run(work: Workload) -> (Totals, Vec<StatsSnapshot>) {
    let mut sim = Sim::new(work);
    let snapshots = sim.run();
    // Every completed request was served by a home.
    assert_eq!(
        sum(&snapshots, |s| s.requests()),
        sum(&snapshots, |s| s.served_as_home),
        "{work:?}"
    );
    (sim.totals, snapshots)
}

fn workload(nodes: NodeId, seed: u64, fifo: bool) -> Workload {
    Workload {
        nodes,
        threads_per_node: 2,
        ops_per_thread: (2400 / node_index(nodes)).clamp(60, 600),
        hot_pages: 3,
        cold_pages: 3,
        write_percent: 30,
        read_then_write_percent: 15,
        pin_percent: 6,
        fifo,
        seed,
    }
}

#[test]
fn random_workloads_stay_coherent_on_2_to_16_nodes() {
    let mut upgrades = 0;
    let mut merged = 0;
    let mut deferred = 0;
    let mut page_data = 0;
    let mut revoking = 0;
    for nodes in [2, 3, 4, 5, 8, 16] {
        for seed in 0..seeds(4) {
            let work = workload(nodes, seed * 1000 + u64::from(nodes), true);
            let (totals, snapshots) = run(work);
            assert!(
                totals.reads_checked > 0 && totals.writes > 0,
                "{work:?}: {totals:?}"
            );
            upgrades += sum(&snapshots, |s| s.upgrades[0] + s.upgrades[1]);
            merged += sum(&snapshots, |s| s.faults_merged);
            deferred += sum(&snapshots, |s| s.deferred_by_pin);
            page_data += totals.page_data_messages;
            revoking += totals.pins_revoking;
        }
    }
    // The runs exercised the paths they are meant to check.
    assert!(upgrades > 0, "no Shared -> Modified upgrade happened");
    assert!(
        page_data > 0,
        "no data source other than the home ever sent a copy"
    );
    assert!(merged > 0, "no concurrent faults were merged");
    assert!(revoking > 0, "no pin ever gave way to a waiting revocation");
    assert!(
        deferred > 0,
        "no downgrade or invalidation ever waited for a pin"
    );
}

#[test]
fn coherent_even_when_channels_reorder_arbitrarily() {
    for nodes in [2, 4, 7, 16] {
        for seed in 0..seeds(3) {
            let (totals, _) = run(workload(nodes, 77 + seed, false));
            assert!(totals.messages > 0);
        }
    }
}

#[test]
fn many_seeds_on_one_hot_page() {
    for seed in 0..seeds(40) {
        let nodes = 2 + NodeId::try_from(seed % 7).unwrap();
        let work = Workload {
            nodes,
            threads_per_node: 3,
            ops_per_thread: 80,
            hot_pages: 1,
            cold_pages: 0,
            write_percent: 40,
            read_then_write_percent: 20,
            pin_percent: 10,
            fifo: seed % 2 == 0,
            seed,
        };
        run(work);
    }
}

#[test]
fn never_written_pages_move_as_flags_only() {
    let work = Workload {
        nodes: 6,
        threads_per_node: 2,
        ops_per_thread: 200,
        hot_pages: 4,
        cold_pages: 4,
        write_percent: 0,
        read_then_write_percent: 0,
        pin_percent: 0,
        fifo: true,
        seed: 5,
    };
    let (totals, snapshots) = run(work);
    assert!(totals.reads_checked > 0);
    assert_eq!(
        totals.page_bytes_between_nodes, 0,
        "a never-written page moved as bytes"
    );
    let reads = sum(&snapshots, |s| s.reads[0] + s.reads[1]);
    assert!(reads > 0);
    assert_eq!(sum(&snapshots, |s| s.zero_pages_received), reads);
}

#[test]
fn written_pages_move_bytes_and_unwritten_ones_do_not() {
    // Writers only touch page 0; pages 1.. are only read: every 4 KiB transfer is of page 0.
    let mut sim = Sim::new(Workload {
        nodes: 4,
        threads_per_node: 2,
        ops_per_thread: 150,
        hot_pages: 4,
        cold_pages: 0,
        write_percent: 0,
        read_then_write_percent: 0,
        pin_percent: 0,
        fifo: true,
        seed: 9,
    });
    let mut rng = StdRng::seed_from_u64(1);
    for node in &mut sim.nodes {
        for thread in &mut node.threads {
            for op in thread.ops.iter_mut() {
                if rng.gen_bool(0.3) {
                    *op = Op::Write(0);
                }
            }
        }
    }
    sim.run();
    assert!(sim.totals.page_bytes_between_nodes > 0);
    assert!(
        sim.write_granted.iter().all(|&p| p == 0),
        "{:?}",
        sim.write_granted
    );
}

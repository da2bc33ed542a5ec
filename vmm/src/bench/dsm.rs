//! `spanvm bench dsm`: the DSM fault path between two nodes on loopback, beside its floor
//! measured in the same run: a local fault served by the same machinery, and a raw 4 KiB
//! round trip between two meshes of the same transport.
//!
//! Both nodes live in this process (each with its own mapping, userfaultfd, DSM and mesh,
//! talking over real connections: loopback TCP, or RDMA on the interface `SPANVM_RDMA_ADDR`
//! names); host threads play the vCPUs, so a fault here is
//! the DSM's cost without KVM's. Run once with blocking reads on the fault-path connections
//! and once with busy polling. Both DSMs share one [`FaultTrace`], so a remote read fault is
//! also broken down by stage on one clock: where the time goes between the access and its
//! return.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dsm::{Dsm, DsmConfig, FaultTrace, Stage, UffdGuestPages};
use resources::{node_index, NodeId, ServicePriority};
use transport::bench::{loopback_round_trip, RoundTripBench};
use transport::{MeshConfig, Transport, TransportKind};

use crate::commands::CommandError;
use crate::distributed::control::Control;
use crate::distributed::link::MeshLink;
use crate::distributed::NodeHandler;

const PAGES: u64 = 64 * 1024; // 256 MiB of address space: enough fresh pages for every sample
const SAMPLES: usize = 2000;
const THROUGHPUT_PAGES_PER_THREAD: u64 = 3000;

struct BenchNode {
    pages: Arc<UffdGuestPages>,
    dsm: Arc<Dsm>,
    mesh: Arc<dyn Transport>,
    control: Arc<Control>,
}

impl BenchNode {
    fn addr(&self, page: u64) -> *mut u64 {
        // SAFETY: page < PAGES, inside the mapping of `pages`.
        unsafe {
            self.pages
                .host_address()
                .add(crate::convert::usize_from(page * 4096))
                .cast()
        }
    }
    fn read(&self, page: u64) -> u64 {
        // SAFETY: an aligned read inside our mapping; a fault is served by the DSM's thread.
        unsafe { self.addr(page).read_volatile() }
    }
    fn write(&self, page: u64, v: u64) {
        // SAFETY: as in `read`.
        unsafe { self.addr(page).write_volatile(v) }
    }
}

fn bench_err(e: impl std::fmt::Display) -> CommandError {
    CommandError::Bench(e.to_string())
}

/// Two nodes: node 0 is home of the first half of the pages, node 1 of the second.
fn pair(
    kind: TransportKind,
    busy_poll: bool,
    trace: &Arc<FaultTrace>,
) -> Result<(BenchNode, BenchNode), CommandError> {
    let ip = transport::bench::bench_ip(kind).map_err(bench_err)?;
    let listeners: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind((ip, 0)))
        .collect::<Result<_, _>>()
        .map_err(bench_err)?;
    let addrs: Vec<_> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()
        .map_err(bench_err)?;
    let mut handles = Vec::new();
    for (me, listener) in (0..).zip(listeners) {
        let addrs = addrs.clone();
        let trace = trace.clone();
        handles.push(std::thread::spawn(
            move || -> Result<BenchNode, CommandError> {
                let pages = Arc::new(
                    UffdGuestPages::map_anonymous(crate::convert::usize_from(PAGES * 4096))
                        .map_err(bench_err)?,
                );
                let link = Arc::new(MeshLink::default());
                let dsm = Arc::new(
                    Dsm::start(
                        DsmConfig {
                            node: me,
                            node_count: 2,
                            page_count: PAGES,
                            home_of: Arc::new(|p| NodeId::from(p >= PAGES / 2)),
                            top_pages: 0,
                            service_priority: ServicePriority::default(),
                        },
                        pages.clone(),
                        link.clone(),
                    )
                    .map_err(bench_err)?,
                );
                dsm.set_trace(trace);
                let control = Arc::new(Control::new(me, 2));
                let handler = Arc::new(NodeHandler::new(control.clone()));
                let _ = handler.dsm.set(dsm.clone());
                let cfg = MeshConfig {
                    me,
                    listen: addrs[node_index(me)],
                    peers: vec![(1 - me, addrs[node_index(1 - me)])],
                    secret: b"spanvm bench dsm secret, loopback only".to_vec(),
                    layout_canonical: "spanvm bench dsm".into(),
                    connect_timeout: Duration::from_secs(20),
                    busy_poll,
                    service_priority: ServicePriority::default(),
                    liveness: Default::default(),
                    socket_buffer: None,
                };
                let mesh =
                    transport::establish_on(kind, listener, cfg, handler).map_err(bench_err)?;
                link.set(&mesh);
                Ok(BenchNode {
                    pages,
                    dsm,
                    mesh,
                    control,
                })
            },
        ));
    }
    let mut nodes = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| bench_err("a bench node thread panicked"))?
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n1 = nodes.pop().ok_or_else(|| bench_err("node 1 missing"))?;
    let n0 = nodes.pop().ok_or_else(|| bench_err("node 0 missing"))?;
    Ok((n0, n1))
}

/// The sample `per_mille` thousandths of the way through `sorted`, rounded to the nearest;
/// integers, so that no sample count is rounded through f64.
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    sorted[((sorted.len() - 1) * per_mille + 500) / 1000]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Measured {
    p50: Duration,
    p99: Duration,
}

fn measure(samples: usize, mut one: impl FnMut(u64) -> Duration) -> Measured {
    let mut v: Vec<Duration> = (0..samples as u64).map(&mut one).collect();
    v.sort();
    Measured {
        p50: percentile(&v, 500),
        p99: percentile(&v, 990),
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

struct Row {
    label: &'static str,
    m: Measured,
}

/// The points of a traced fault in path order, each with what happens on the way to it.
const POINTS: [(Stage, &str); 6] = [
    (
        Stage::FaultRead,
        "uffd: the access reaches the fault thread",
    ),
    (
        Stage::HomeReceived,
        "to the home: state, send, wire, receiver wake-up",
    ),
    (
        Stage::OwnerReceived,
        "to the owner (fetch): directory, send, wire, wake",
    ),
    (
        Stage::DataArrived,
        "to the requester: page read, send, wire, wake-up",
    ),
    (Stage::DataDecoded, "copy out of the receive buffer, checks"),
    (Stage::Installing, "state machine up to the install"),
];
const WAKE: &str = "UFFDIO_COPY, wake-up, the access returns";

/// Per stage (the [`POINTS`], then the wake), the time of every sample that passed it.
#[derive(Default)]
struct Breakdown {
    stages: Vec<Vec<Duration>>,
    total: Vec<Duration>,
}

impl Breakdown {
    /// Adds one traced fault that started at `start` and returned at `end` (trace clock).
    fn add(&mut self, trace: &FaultTrace, start: u64, end: u64) {
        self.stages.resize(POINTS.len() + 1, Vec::new());
        let mut last = start;
        for (i, (stage, _)) in POINTS.iter().enumerate() {
            if let Some(at) = trace.at(*stage) {
                // Threads may pass points in a different order (a reply can arrive before
                // its sender's send returns); such an interval counts as 0.
                self.stages[i].push(Duration::from_nanos(at.saturating_sub(last)));
                last = last.max(at);
            }
        }
        self.stages[POINTS.len()].push(Duration::from_nanos(end.saturating_sub(last)));
        self.total
            .push(Duration::from_nanos(end.saturating_sub(start)));
    }

    /// The median of stage `i`, or `None` when no sample passed it.
    fn median(&self, i: usize) -> Option<Duration> {
        let mut v = self.stages.get(i)?.clone();
        v.sort_unstable();
        (!v.is_empty()).then(|| percentile(&v, 500))
    }
}

/// Times one traced access of `page` by `access` (on the trace's clock).
fn traced(trace: &FaultTrace, into: &mut Breakdown, page: u64, access: impl FnOnce()) -> Duration {
    trace.arm(page);
    let start = trace.now();
    access();
    let end = trace.now();
    into.add(trace, start, end);
    Duration::from_nanos(end - start)
}

fn run_mode(kind: TransportKind, busy_poll: bool) -> Result<(), CommandError> {
    let spinning_before = transport::spinning_receivers();
    let trace = Arc::new(FaultTrace::default());
    let (n0, n1) = pair(kind, busy_poll, &trace)?;
    let spinning = transport::spinning_receivers() - spinning_before;
    // Fresh pages for each measurement: node 0's home is [0, PAGES/2), node 1's the rest.
    let mut next0 = 0u64;
    let mut next1 = PAGES / 2;
    let mut fresh0 = || {
        next0 += 1;
        next0
    };
    let local = measure(SAMPLES, |_| {
        next1 += 1;
        let p = next1;
        timed(|| {
            n1.read(p);
        })
    });
    let mut at_home = Breakdown::default();
    let remote_read = measure(SAMPLES, |i| {
        let p = fresh0();
        n0.write(p, i);
        traced(&trace, &mut at_home, p, || {
            n1.read(p);
        })
    });
    // Node 1 is the home, node 0 the owner: the home's part runs inline on the fault thread
    // and the page comes from the owner.
    let mut owner_remote = Breakdown::default();
    let owned_elsewhere = measure(SAMPLES, |i| {
        next1 += 1;
        let p = next1;
        n0.write(p, i);
        traced(&trace, &mut owner_remote, p, || {
            n1.read(p);
        })
    });
    let remote_write = measure(SAMPLES, |i| {
        let p = fresh0();
        n0.write(p, i);
        timed(|| n1.write(p, i + 1))
    });
    let upgrade = measure(SAMPLES, |i| {
        let p = fresh0();
        n0.write(p, i);
        n1.read(p);
        timed(|| n1.write(p, i + 1))
    });
    // Throughput: two threads per node, each reading pages the other node wrote.
    let base = next0 + 1;
    let per = THROUGHPUT_PAGES_PER_THREAD;
    for p in base..base + 2 * per {
        n0.write(p, p);
    }
    let base1 = next1 + 1;
    for p in base1..base1 + 2 * per {
        n1.write(p, p);
    }
    let n0 = Arc::new(n0);
    let n1 = Arc::new(n1);
    let start = Arc::new(Barrier::new(5));
    let mut threads = Vec::new();
    for t in 0..2u64 {
        for (reader, first) in [(n1.clone(), base), (n0.clone(), base1)] {
            let start = start.clone();
            threads.push(std::thread::spawn(move || {
                start.wait();
                let from = first + t * per;
                (from..from + per)
                    .map(|p| reader.read(p))
                    .fold(0u64, u64::wrapping_add)
            }));
        }
    }
    start.wait();
    let t0 = Instant::now();
    for t in threads {
        t.join()
            .map_err(|_| bench_err("a faulting thread panicked"))?;
    }
    let elapsed = t0.elapsed();
    // A rate for display: f64's 53 bits are far more than the digits shown.
    #[allow(clippy::cast_precision_loss)]
    let faults_per_s = (4 * per) as f64 / elapsed.as_secs_f64();
    for n in [&n0, &n1] {
        n.control.expect_disconnects();
    }
    for n in [&n0, &n1] {
        n.mesh.shutdown();
        n.dsm.shutdown();
    }
    drop((n0, n1));

    let rtt = loopback_round_trip(&RoundTripBench {
        samples: SAMPLES,
        busy_poll,
        kind,
        ..Default::default()
    })
    .map_err(bench_err)?;
    println!();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if busy_poll {
        println!(
            "fault-path receivers: busy polling asked; {spinning} of 2 spin ({cores} cores: \
             the transport lets a receiver spin only while spinners stay below the core count)"
        );
    } else {
        println!("fault-path receivers: blocking reads");
    }
    println!("{:<52} {:>10} {:>10}", "", "p50 µs", "p99 µs");
    let rows = [
        Row {
            label: "anchor: local fault, same DSM machinery",
            m: local,
        },
        Row {
            label: if kind == TransportKind::Rdma {
                "anchor: raw 4 KiB RDMA round trip"
            } else {
                "anchor: raw 4 KiB TCP round trip"
            },
            m: Measured {
                p50: rtt.median,
                p99: rtt.p99,
            },
        },
        Row {
            label: "remote read fault (page at its home)",
            m: remote_read,
        },
        Row {
            label: "remote read fault (home here, owner remote)",
            m: owned_elsewhere,
        },
        Row {
            label: "remote write fault invalidating one sharer",
            m: remote_write,
        },
        Row {
            label: "S->M upgrade (no data moved)",
            m: upgrade,
        },
    ];
    for r in &rows {
        println!(
            "{:<52} {:>10.1} {:>10.1}",
            r.label,
            us(r.m.p50),
            us(r.m.p99)
        );
    }
    println!();
    println!(
        "{:<52} {:>10} {:>10}",
        "remote read fault by stage, p50 µs", "at home", "owner elsewhere"
    );
    let cell = |b: &Breakdown, i: usize| {
        b.median(i)
            .map_or("-".to_string(), |d| format!("{:.1}", us(d)))
    };
    for (i, label) in POINTS
        .iter()
        .map(|(_, label)| *label)
        .chain([WAKE])
        .enumerate()
    {
        println!(
            "{label:<52} {:>10} {:>10}",
            cell(&at_home, i),
            cell(&owner_remote, i)
        );
    }
    let total = |b: &Breakdown| {
        let mut v = b.total.clone();
        v.sort_unstable();
        us(percentile(&v, 500))
    };
    println!(
        "{:<52} {:>10.1} {:>10.1}",
        "whole fault, traced",
        total(&at_home),
        total(&owner_remote)
    );
    let floor_read = us(rows[0].m.p50) + us(rows[1].m.p50);
    let floor_write = us(rows[0].m.p50) + 2.0 * us(rows[1].m.p50);
    let read_goal = if busy_poll { 1.5 } else { 1.25 };
    let read_ratio = us(rows[2].m.p50) / floor_read;
    println!(
        "read fault p50 / (local + 1 RTT) = {read_ratio:.2} (goal <= {read_goal}: {}); write fault p50 / (local + 2 RTT) = {:.2} (goal <= 1.30)",
        if read_ratio <= read_goal { "met" } else { "missed" },
        us(rows[4].m.p50) / floor_write
    );
    println!("throughput, 2 threads per node faulting remote pages: {faults_per_s:.0} faults/s");
    Ok(())
}

/// Runs the benchmark over `kind` (blocking, then busy-polling receivers) and prints its
/// tables.
pub fn run(kind: TransportKind) -> Result<(), CommandError> {
    let ip = transport::bench::bench_ip(kind).map_err(bench_err)?;
    println!(
        "spanvm bench dsm: 2 nodes in one process, real userfaultfd, {kind} on {ip}; \
         {SAMPLES} samples each"
    );
    run_mode(kind, false)?;
    run_mode(kind, true)?;
    Ok(())
}

//! `spanvm bench dsm`: the DSM fault path between two nodes on loopback, beside its floor
//! measured in the same run: a local fault served by the same machinery, and a raw 4 KiB TCP
//! round trip between two meshes of the same kind.
//!
//! Both nodes live in this process (each with its own mapping, userfaultfd, DSM and TCP mesh,
//! talking over real loopback sockets); host threads play the vCPUs, so a fault here is the
//! DSM's cost without KVM's. Run once with blocking reads on the fault-path sockets and once
//! with busy polling.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dsm::{Dsm, DsmConfig, UffdGuestPages};
use resources::{node_index, NodeId};
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
fn pair(busy_poll: bool) -> Result<(BenchNode, BenchNode), CommandError> {
    let listeners: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
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
                        },
                        pages.clone(),
                        link.clone(),
                    )
                    .map_err(bench_err)?,
                );
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
                    liveness: Default::default(),
                    socket_buffer: None,
                };
                let mesh = transport::establish_on(TransportKind::Tcp, listener, cfg, handler)
                    .map_err(bench_err)?;
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

fn run_mode(busy_poll: bool) -> Result<(), CommandError> {
    let (n0, n1) = pair(busy_poll)?;
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
    let remote_read = measure(SAMPLES, |i| {
        let p = fresh0();
        n0.write(p, i);
        timed(|| {
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

    let rtt = loopback_round_trip(&RoundTripBench {
        samples: SAMPLES,
        busy_poll,
        ..Default::default()
    })
    .map_err(bench_err)?;
    println!();
    println!(
        "fault-path sockets: {}",
        if busy_poll {
            "busy polling (non-blocking reads, yielding)"
        } else {
            "blocking reads"
        }
    );
    println!("{:<46} {:>10} {:>10}", "", "p50 µs", "p99 µs");
    let rows = [
        Row {
            label: "anchor: local fault, same DSM machinery",
            m: local,
        },
        Row {
            label: "anchor: raw 4 KiB TCP round trip",
            m: Measured {
                p50: rtt.median,
                p99: rtt.p99,
            },
        },
        Row {
            label: "remote read fault (page from the owner)",
            m: remote_read,
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
            "{:<46} {:>10.1} {:>10.1}",
            r.label,
            us(r.m.p50),
            us(r.m.p99)
        );
    }
    let floor_read = us(rows[0].m.p50) + us(rows[1].m.p50);
    let floor_write = us(rows[0].m.p50) + 2.0 * us(rows[1].m.p50);
    println!(
        "read fault p50 / (local + 1 RTT) = {:.2} (goal <= 1.25); write fault p50 / (local + 2 RTT) = {:.2} (goal <= 1.30)",
        us(rows[2].m.p50) / floor_read,
        us(rows[3].m.p50) / floor_write
    );
    println!("throughput, 2 threads per node faulting remote pages: {faults_per_s:.0} faults/s");
    for n in [&n0, &n1] {
        n.control.expect_disconnects();
    }
    for n in [&n0, &n1] {
        n.mesh.shutdown();
        n.dsm.shutdown();
    }
    Ok(())
}

/// Runs the benchmark (blocking, then busy-polling sockets) and prints its tables.
pub fn run() -> Result<(), CommandError> {
    println!("spanvm bench dsm: 2 nodes in one process, real userfaultfd, TCP on loopback; {SAMPLES} samples each");
    run_mode(false)?;
    run_mode(true)?;
    Ok(())
}

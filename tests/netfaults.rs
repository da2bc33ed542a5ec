//! Network faults as a user's network would inject them, inside a network namespace each test
//! makes and removes (its own loopback, every node on its own `127.0.0.x` address; nothing is
//! sent anywhere else):
//! - segments lost at random (1 % and 5 %, an nftables rule) under the coherence probes, whose
//!   results must stay exact;
//! - a slow link (50 Mbit/s token bucket) under the same probes;
//! - the same with `tc netem` delay and loss, where the host kernel has `sch_netem`;
//! - a node killed, frozen with SIGSTOP, or cut off from one peer by a partition mid-run: every
//!   other node stops with code 5 naming a lost peer within the detection bound (the 2 s
//!   silence limit plus slack), and the measured times are printed.

mod common;

use std::time::{Duration, Instant};

use common::coherence::Coherence;
use common::netns::NetNs;
use common::nodes::{node_file, signal, start_wrapped, wait_until_running, write_secret, Node};
use common::{cluster_text_on, run_cluster_wrapped};

/// Operations per vCPU for each coherence probe on a lossy network: every lost segment of a
/// page transfer stalls it for a retransmission timeout (200 ms on loopback), so fewer than the
/// clean-network tests, still thousands of contended page transfers.
const LOSSY_OPS: u64 = 50_000;

/// The liveness limit (`transport::Liveness::default`): a peer silent this long is lost.
const SILENCE_LIMIT: Duration = Duration::from_secs(2);
/// What the detection bound allows on top of the silence limit: the watchdog's check period,
/// the stop reaching the vCPUs, the process exit, and a third node learning of the loss from
/// a node that stopped (its connections close), on a loaded 2-core host.
const DETECTION_SLACK: Duration = Duration::from_millis(1500);

/// The tests here start clusters whose vCPUs spin; they run one at a time so that the bounds
/// are about spanvm, not about a host overloaded by another test.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs every coherence probe on 2 nodes inside `ns` as it is now degraded, asserting exact
/// results and placement.
fn coherence_probes_exact(ns: &NetNs, condition: &str) {
    let nodes = 2;
    for probe in Coherence::ALL {
        let text = cluster_text_on(
            &ns.node_addrs(nodes),
            1,
            probe.name(),
            LOSSY_OPS,
            probe.memory_mib(nodes),
        );
        let started = Instant::now();
        let dropped_before = ns.dropped_packets();
        let run = run_cluster_wrapped(&ns.wrapper(), &text, &[]);
        run.assert_success(nodes);
        run.assert_placement(nodes, |v| v as u64);
        probe.check(&run, nodes, LOSSY_OPS);
        println!(
            "{condition}: {} exact in {:.1} s, {} segments dropped",
            probe.name(),
            started.elapsed().as_secs_f64(),
            ns.dropped_packets() - dropped_before
        );
    }
}

#[test]
fn coherence_probes_stay_exact_when_1_and_5_percent_of_segments_are_lost() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let ns = NetNs::new();
    for per_mille in [10, 50] {
        ns.lose_segments(per_mille);
        coherence_probes_exact(&ns, &format!("{} % of segments lost", per_mille / 10));
        assert!(ns.dropped_packets() > 0, "the loss rule dropped nothing");
    }
}

/// What this host can do instead of netem's delay: a slow link (token bucket), on which every
/// page waits for its serialisation time and bursts queue.
#[test]
fn coherence_probes_stay_exact_through_a_slow_link() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let ns = NetNs::new();
    ns.rate_limit("50mbit", "32kb", "20ms");
    coherence_probes_exact(&ns, "50 Mbit/s link");
    let held = ns.qdisc_overlimits();
    println!("the token bucket held packets back {held} times");
    assert!(held > 0, "the rate limit never throttled anything");
}

#[test]
#[ignore = "needs tc netem (sch_netem), which this host's kernel lacks (CONFIG_NET_SCH_NETEM \
            is not set); run with --ignored on a host that has it"]
fn coherence_probes_stay_exact_under_netem_delay_and_loss() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let ns = NetNs::new();
    assert!(
        ns.has_netem(),
        "tc netem does not work here: the host kernel lacks sch_netem"
    );
    for (delay, jitter) in [("0.2ms", "0.05ms"), ("5ms", "1ms")] {
        ns.netem(delay, jitter, "0%");
        coherence_probes_exact(&ns, &format!("netem delay {delay} ± {jitter}"));
    }
    for loss in ["1%", "5%"] {
        ns.netem("0.2ms", "0.05ms", loss);
        coherence_probes_exact(&ns, &format!("netem loss {loss}"));
    }
}

/// How a node is taken away mid-run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL: its connections are reset at once.
    Kill,
    /// SIGSTOP: its connections stay open, nothing arrives from it.
    Freeze,
    /// An nftables rule drops everything between it and node 0: both ends stay alive.
    Partition,
}

/// Starts a 3-node counter cluster inside `ns` (one node per `127.0.0.x`), takes node 1 away
/// by `fault` once all run, and checks that every node that can still act stops with code 5
/// within the detection bound, naming a lost peer. Returns (node, time to exit) per survivor.
fn take_node_1_away(fault: Fault) -> Vec<(usize, Duration)> {
    let ns = NetNs::new();
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "cluster.secret", 7);
    let cluster = cluster_text_on(&ns.node_addrs(3), 1, "counter", 2_000_000_000, 64);
    // Declared after `ns`: dropped (every node killed) before the namespace is deleted.
    let mut procs: Vec<Node> = (0..3)
        .map(|i| {
            let config = node_file(dir.path(), i, &secret, &cluster);
            start_wrapped(&ns.wrapper(), dir.path(), i, &config, &[])
        })
        .collect();
    wait_until_running(&procs);
    // Mid-run: the counter probe runs for minutes, and pages move from the first instant.
    std::thread::sleep(Duration::from_millis(500));

    let addrs = ns.node_addrs(3);
    let faulted_at = Instant::now();
    match fault {
        Fault::Kill => signal(&procs[1], libc::SIGKILL),
        Fault::Freeze => signal(&procs[1], libc::SIGSTOP),
        Fault::Partition => ns.partition(addrs[0], addrs[1]),
    }
    // A frozen node cannot act; a killed one is gone. A cut-off node must stop like the rest.
    let must_stop: Vec<usize> = match fault {
        Fault::Kill | Fault::Freeze => vec![0, 2],
        Fault::Partition => vec![0, 1, 2],
    };
    let bound = SILENCE_LIMIT + DETECTION_SLACK;
    let mut times = Vec::new();
    for i in must_stop {
        let (code, at) = procs[i].wait(Duration::from_secs(20));
        let took = at.duration_since(faulted_at);
        let stderr = procs[i].stderr();
        assert_eq!(
            code,
            Some(5),
            "{fault:?}: node {i} should exit with the lost-peer code\n{stderr}"
        );
        assert!(
            stderr.contains("lost a peer: node "),
            "{fault:?}: node {i} does not name the peer it lost:\n{stderr}"
        );
        assert!(
            took <= bound,
            "{fault:?}: node {i} took {took:?} to stop, more than {bound:?}\n{stderr}"
        );
        times.push((i, took));
    }
    // The partitioned pair must each name the other: the silence came from that link.
    if let Fault::Partition = fault {
        for (i, other) in [(0, 1), (1, 0)] {
            let stderr = procs[i].stderr();
            assert!(
                stderr
                    .lines()
                    .any(|l| l.contains("lost") && l.contains(&format!("node {other}"))),
                "node {i} does not say it lost node {other}:\n{stderr}"
            );
        }
    }
    // `procs` (the frozen node among them) is killed on drop, before `ns` is deleted.
    times
}

#[test]
fn a_killed_frozen_or_partitioned_node_stops_every_node_with_code_5_within_the_bound() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut report = String::from("detection times (node 1 taken away; time until exit 5):\n");
    for fault in [Fault::Kill, Fault::Freeze, Fault::Partition] {
        let times = take_node_1_away(fault);
        let line: Vec<String> = times
            .iter()
            .map(|(i, took)| format!("node {i} {:.0} ms", took.as_secs_f64() * 1000.0))
            .collect();
        report.push_str(&format!("  {fault:?}: {}\n", line.join(", ")));
    }
    println!("{report}");
}

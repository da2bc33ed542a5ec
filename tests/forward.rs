//! Forwarding between nodes on real KVM, with real node processes on loopback: IPIs to vCPUs
//! on other nodes (running and halted, xAPIC and x2APIC), and device accesses from a vCPU on
//! another node reaching the master's devices. Every test asserts where each vCPU ran.

mod common;

use common::{cluster_text, run_cluster, ProbeRun};

fn run(nodes: usize, per_node: usize, probe: &str, arg: u64, memory_mib: u64) -> ProbeRun {
    let run = run_cluster(&cluster_text(nodes, per_node, probe, arg, memory_mib));
    run.assert_success(nodes * per_node);
    run.assert_placement(nodes * per_node, |v| (v / per_node) as u64);
    run
}

fn ping_pong(nodes: usize, probe: &str, rounds: u64) {
    // vCPUs 0 and 1 play; with one vCPU per node they are on different nodes.
    let run = run(nodes, 1, probe, 0, 32);
    assert_eq!(run.get(0, "IPIN"), rounds, "pongs vCPU 0 got from node 1");
    if probe != "ipi-halt" {
        assert_eq!(run.get(1, "IPIN"), rounds, "pings vCPU 1 got from node 0");
    }
    assert!(run.get(0, "IPRT") > 0);
}

#[test]
fn ipi_ping_pong_to_a_running_remote_vcpu_xapic_and_x2apic() {
    ping_pong(2, "ipi-xapic", 2000);
    ping_pong(2, "ipi-x2apic", 1000);
}

#[test]
fn ipi_ping_pong_to_a_halted_remote_vcpu() {
    ping_pong(2, "ipi-halt", 1000);
}

#[test]
fn ipi_ping_pong_across_a_4_node_cluster() {
    ping_pong(4, "ipi-x2apic", 1000);
}

#[test]
fn remote_console_output_and_reads_reach_the_master_device() {
    // vCPU 0 (node 0) and the last vCPU (node 1) both write to COM1; the UART exists on the
    // master only, so node 1's line must come out of node 0's console.
    let run = run(2, 1, "hello", 0, 32);
    let out = run.stdout();
    let remote = out
        .lines()
        .find(|l| l.contains("hello again, from the last vCPU: 1"))
        .unwrap_or_else(|| panic!("node 1's greeting is missing:\n{out}"));
    assert!(
        remote.starts_with("[node 0]"),
        "node 1's console output came out of another node: {remote}"
    );
    // Each vCPU read COM1's line status: the master's UART, transmitter idle (0x60), not the
    // 0xff of a port nobody claims.
    for v in 0..2 {
        assert_eq!(run.get(v, "ULSR"), 0x60, "vCPU {v} read COM1's LSR");
    }
    assert!(run
        .stdout()
        .lines()
        .filter(|l| l.contains("hello"))
        .all(|l| l.starts_with("[node 0]")));
}

/// IPIs of the `multicast` probe's phases each vCPU received per sender: `expected(phase,
/// receiver, sender)` as the probe's header describes them (K = 16 per kind of send).
fn multicast_expected(n: usize, phase: &str, r: usize, s: usize) -> u64 {
    const K: u64 = 16;
    let next = |s: usize| (s + 1) % n;
    let other = u64::from(r != s);
    let to_next = u64::from(r == next(s) && r != s);
    match phase {
        "RAC" => u64::from(r == 1 && s == 0) * 200,
        "PHY" => K * other,
        "FLT" | "CLU" | "X2C" => K * other + K * to_next,
        "ALI" => K,
        "ALX" => K * other,
        "SLF" => K * u64::from(r == s),
        "X2P" => K * other + K,
        _ => unreachable!("{phase}"),
    }
}

fn multicast(nodes: usize) {
    let run = run(nodes, 1, "multicast", 0, 32);
    for r in 0..nodes {
        assert_eq!(
            run.get(r, "LOST"),
            0,
            "vCPU {r} waited in vain for receipts"
        );
        assert_eq!(run.get(r, "RMIS"), 0, "late-enable rounds vCPU {r} missed");
    }
    // Late (> 500 ms) but not lost: load on the host, printed for the record.
    println!(
        "late-enable rounds whose IPI came late: {}",
        run.get(1, "RLAT")
    );
    for phase in [
        "RAC", "PHY", "FLT", "CLU", "ALI", "ALX", "SLF", "X2C", "X2P",
    ] {
        for r in 0..nodes {
            for s in 0..nodes {
                assert_eq!(
                    run.get(r, &format!("{phase}{s}")),
                    multicast_expected(nodes, phase, r, s),
                    "{nodes} nodes, phase {phase}: IPIs vCPU {r} got from vCPU {s}"
                );
            }
        }
    }
    // Lowest priority: every IPI reached exactly one of the others, never the sender.
    for s in 0..nodes {
        let got: Vec<u64> = (0..nodes).map(|r| run.get(r, &format!("LOW{s}"))).collect();
        assert_eq!(got[s], 0, "lowest-priority IPIs of vCPU {s} reached itself");
        assert_eq!(
            got.iter().sum::<u64>(),
            16,
            "lowest-priority IPIs from vCPU {s}, per receiver: {got:?}"
        );
    }
}

#[test]
fn multicast_ipis_in_every_addressing_mode_on_2_nodes() {
    multicast(2);
}

#[test]
fn multicast_ipis_in_every_addressing_mode_on_4_nodes() {
    multicast(4);
}

fn nmis(nodes: usize, rounds: u64) {
    let run = run(nodes, 1, "nmi", rounds, 32);
    assert_eq!(run.get(0, "LOST"), 0, "NMIs vCPU 0 waited for in vain");
    assert_eq!(run.get(0, "NMIS"), rounds * (nodes as u64 - 1));
    assert_eq!(run.get(0, "NMIN"), 0, "NMIs vCPU 0 sent to itself");
    for t in 1..nodes {
        assert_eq!(run.get(t, "NMIN"), rounds, "NMIs vCPU {t} took (vector 2)");
        assert_eq!(run.get(t, "NMIE"), 1, "vCPU {t} enabled its APIC half-way");
    }
}

#[test]
fn nmis_reach_remote_vcpus_with_their_apic_disabled_and_enabled() {
    // On this host an NMI to a vCPU spinning at CPL3 takes about 5 ms to arrive even on one
    // node (a host tick, it seems), so the 4-node run sends fewer.
    nmis(2, 1000);
    nmis(4, 200);
}

fn ioapic(nodes: usize) {
    let run = run(nodes, 1, "ioapic", 0, 32);
    // vCPU 1 ran on node 1: its IOAPIC accesses and line changes were forwarded to the master.
    assert_eq!(
        run.get(1, "IOVR"),
        0x0017_0020,
        "IOAPIC version read from node 1"
    );
    assert_eq!(
        run.get(1, "LOST"),
        0,
        "interrupts vCPU 1 waited for in vain"
    );
    for v in 0..nodes {
        assert_eq!(run.get(v, "EDGE"), 100, "edge interrupts vCPU {v} took");
        assert_eq!(
            run.get(v, "LEVL"),
            50,
            "deliveries of a held level line to vCPU {v} (one per EOI)"
        );
    }
    assert_eq!(
        run.get(1, "RIRR"),
        0,
        "Remote IRR left set after the last EOI"
    );
    assert_eq!(run.get(1, "MSK0"), 0, "a masked edge line was delivered");
    assert_eq!(
        run.get(1, "MSK1"),
        1,
        "the edge held while masked, at unmask"
    );
    assert_eq!(run.get(1, "MLV0"), 0, "a masked level line was delivered");
    assert_eq!(run.get(1, "MLV1"), 1, "the asserted level line at unmask");
}

#[test]
fn ioapic_programmed_and_driven_from_a_remote_node() {
    ioapic(2);
    ioapic(4);
}

#[test]
fn a_page_table_entry_rewritten_on_another_node_is_seen_after_invlpg_and_cr3_reload() {
    // HOST.md: on kvm_pvm a page-table page replaced by the DSM can leave KVM's shadow
    // translation behind. Node 1 rewrites the entry node 0's CPL3 code reads, then IPIs node 0,
    // whose handler flushes (argument 0: invlpg, 1: CR3 reload) before the next read.
    for (arg, flush) in [(0, "invlpg"), (1, "CR3 reload")] {
        let run = run(2, 1, "pt-swap", arg, 32);
        assert_eq!(run.get(0, "PTRN"), 200, "rounds with {flush}");
        assert_eq!(
            run.get(1, "PTWR"),
            200,
            "entries rewritten on node 1 ({flush})"
        );
        assert_eq!(
            run.get(0, "PTST"),
            0,
            "reads through a stale translation after {flush}"
        );
    }
}

#[test]
fn ipi_storm_all_to_all_on_4_nodes_loses_nothing() {
    // 8334 IPIs per (sender, receiver) pair, 12 pairs: 100 008 IPIs across the cluster.
    let per_pair = 8334;
    let nodes = 4;
    let run = run(nodes, 1, "storm", per_pair, 32);
    let mut total = 0;
    for r in 0..nodes {
        assert_eq!(run.get(r, "STAL"), 0, "vCPU {r} stalled");
        assert_eq!(run.get(r, "BADS"), 0, "IPIs vCPU {r} got out of sequence");
        assert_eq!(
            run.get(r, "SENT"),
            per_pair * (nodes as u64 - 1),
            "IPIs vCPU {r} sent"
        );
        for s in 0..nodes {
            let expected = if s == r { 0 } else { per_pair };
            let got = run.get(r, &format!("RCV{s}"));
            assert_eq!(got, expected, "IPIs vCPU {r} received from vCPU {s}");
            total += got;
        }
    }
    assert_eq!(total, 100_008);
}

/// Node processes started by a test itself (`spanvm node --config`), each with its output in
/// files; every one still running is killed when this is dropped, on every path out of a test.
struct NodeProcesses {
    dir: tempfile::TempDir,
    children: Vec<std::process::Child>,
}

impl NodeProcesses {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        }
    }

    /// Starts node `id` of `cluster` (a cluster description as `cluster_text` writes it).
    fn start(&mut self, id: usize, cluster: &str) {
        use std::process::{Command, Stdio};
        let dir = self.dir.path();
        let secret = dir.join("cluster.secret");
        if !secret.exists() {
            std::fs::write(&secret, [7u8; 32]).unwrap();
        }
        let config = dir.join(format!("node-{id}.toml"));
        std::fs::write(
            &config,
            format!("node = {id}\nsecret = \"{}\"\n{cluster}", secret.display()),
        )
        .unwrap();
        let out = std::fs::File::create(dir.join(format!("node-{id}.out"))).unwrap();
        let err = std::fs::File::create(dir.join(format!("node-{id}.err"))).unwrap();
        let child = Command::new(common::spanvm())
            .args(["node", "--config", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("cannot start spanvm node");
        assert_eq!(self.children.len(), id, "nodes are started in order");
        self.children.push(child);
    }

    fn stdout(&self, id: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.out"))).unwrap_or_default()
    }

    fn stderr(&self, id: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.err"))).unwrap_or_default()
    }

    /// Waits for every node to exit, at most `limit` (then panics; Drop kills them). Returns
    /// the run as one `ProbeRun`: node 0's status, every node's output one after another.
    fn wait_all(&mut self, limit: std::time::Duration) -> ProbeRun {
        let start = std::time::Instant::now();
        let mut statuses = vec![None; self.children.len()];
        while statuses.iter().any(Option::is_none) {
            for (i, c) in self.children.iter_mut().enumerate() {
                if statuses[i].is_none() {
                    statuses[i] = c.try_wait().unwrap();
                }
            }
            if start.elapsed() > limit {
                let all: String = (0..self.children.len())
                    .map(|i| format!("node {i}:\n{}\n{}\n", self.stdout(i), self.stderr(i)))
                    .collect();
                panic!("nodes did not all exit within {limit:?}\n{all}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let statuses: Vec<std::process::ExitStatus> = statuses.into_iter().flatten().collect();
        for (i, s) in statuses.iter().enumerate() {
            assert!(
                s.success(),
                "node {i} failed: {s:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(i),
                self.stderr(i)
            );
        }
        let stdout: String = (0..statuses.len()).map(|i| self.stdout(i)).collect();
        let stderr: String = (0..statuses.len()).map(|i| self.stderr(i)).collect();
        ProbeRun {
            reports: common::parse_reports(&stdout),
            output: std::process::Output {
                status: statuses[0],
                stdout: stdout.into_bytes(),
                stderr: stderr.into_bytes(),
            },
        }
    }
}

impl Drop for NodeProcesses {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn kvmclock_never_runs_backwards_between_nodes_started_5_s_apart() {
    let hops = 2000;
    let cluster = cluster_text(2, 1, "clock-token", hops, 32);
    let mut nodes = NodeProcesses::new();
    nodes.start(0, &cluster);
    std::thread::sleep(std::time::Duration::from_secs(5));
    nodes.start(1, &cluster);
    let run = nodes.wait_all(std::time::Duration::from_secs(300));
    run.assert_success(2);
    run.assert_placement(2, |v| v as u64);
    assert_eq!(run.get(0, "RECV") + run.get(1, "RECV"), hops - 1);
    for v in 0..2 {
        println!(
            "vCPU {v}: worst send-after-receive skew {} ns, smallest receive - send {} ns",
            run.get(v, "SKEW"),
            run.get(v, "MINL")
        );
    }
    for v in 0..2 {
        assert_eq!(
            run.get(v, "BACK"),
            0,
            "tokens vCPU {v} received before they were sent (by kvmclock); worst by {} ns",
            run.get(v, "SKEW")
        );
    }
}

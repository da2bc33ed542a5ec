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

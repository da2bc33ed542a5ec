//! The exit codes a user and a script see (README, "Exit codes"), on real KVM: a guest reset
//! (3) from a vCPU on another node, a probe that fails (4). Ctrl-C (130) and SIGUSR1 on a
//! cluster are in `dsm_failure.rs`, next to the other signals sent to node processes.

mod common;

use common::{cluster_text, run_cluster, run_probe};

#[test]
fn a_reset_from_a_vcpu_on_another_node_ends_every_node_with_code_3() {
    let run = run_cluster(&cluster_text(2, 1, "reset", 1, 32));
    let stderr = run.stderr();
    assert_eq!(run.output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("exit codes node 0: 3, node 1: 3"),
        "every node should end with the reset code:\n{stderr}"
    );
    assert_eq!(run.get(1, "RSET"), 1, "vCPU 1 pulsed the reset line");
    run.assert_placement(2, |v| v as u64);
}

#[test]
fn a_probe_that_fails_exits_with_code_4() {
    // pt-swap needs two vCPUs and fails with one.
    let run = run_probe("pt-swap", 1, 32);
    assert_eq!(
        run.output.status.code(),
        Some(4),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout(),
        run.stderr()
    );
    assert!(
        run.stderr()
            .contains("probe failed on vCPU 0 with status 0x1"),
        "{}",
        run.stderr()
    );
}

//! Failures of a distributed guest with real node processes: a node killed mid-run, a node whose
//! distributed memory fails, a node with the wrong secret, a node whose layout differs, a node
//! stopped while one of its vCPUs waits for a page of a hung peer. (Malformed frames are fuzzed in the transport
//! and dsm crates' own tests.)

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster_text;
use common::nodes::{
    node_file, signal, start, start_probe_cluster, wait_until_running, write_secret, Node,
};

/// The failure tests run one at a time: each starts several nodes whose vCPUs spin, and the
/// 2-second bound is about spanvm, not about a machine overloaded by the other tests.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn kill_one_mid_counter(nodes: usize, victim: usize) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Enough increments to run for minutes: the kill always lands mid-probe.
    let mut procs = start_probe_cluster(
        dir.path(),
        &cluster_text(nodes, 1, "counter", 2_000_000_000, 64),
        |_| &[],
    );
    wait_until_running(&procs);
    std::thread::sleep(Duration::from_millis(700));
    procs[victim].child.kill().unwrap();
    let killed_at = Instant::now();
    let _ = procs[victim].child.wait();
    for (i, node) in procs.iter_mut().enumerate() {
        if i == victim {
            continue;
        }
        let (code, at) = node.wait(Duration::from_secs(20));
        let stderr = node.stderr();
        let took = at.duration_since(killed_at);
        assert_eq!(
            code,
            Some(5),
            "node {i} should exit with the lost-peer code\n{stderr}"
        );
        assert!(
            took < Duration::from_secs(2),
            "node {i} took {took:?} to stop after node {victim} died\n{stderr}"
        );
        // The stop line names the first loss this node saw; under load that can be a survivor
        // that already left because of the victim, so the victim must be named in a loss line.
        assert!(
            stderr.contains("lost a peer: node "),
            "node {i} does not say it lost a peer:\n{stderr}"
        );
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("lost") && l.contains(&format!("node {victim}"))),
            "node {i} does not say it lost node {victim}:\n{stderr}"
        );
        // The counter probe never finished anywhere, so nothing may have been reported from a
        // page that went missing.
        assert!(
            !node.stdout().contains("CNTR="),
            "node {i} reported a counter after a peer was lost"
        );
    }
}

#[test]
fn killing_a_node_stops_the_other_within_2_seconds() {
    kill_one_mid_counter(2, 1);
}

#[test]
fn killing_a_node_of_4_stops_all_others_within_2_seconds() {
    kill_one_mid_counter(4, 2);
}

#[test]
fn killing_the_master_stops_the_others() {
    kill_one_mid_counter(3, 0);
}

/// Starts two nodes that should refuse each other; returns their stderr and exit codes.
#[test]
fn a_node_whose_memory_fails_stops_every_node_with_code_6_naming_it() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_text(2, 1, "counter", 2_000_000_000, 64);
    // Node 1's 200th page install fails as a refused UFFDIO_COPY (out of memory) would.
    let mut procs = start_probe_cluster(dir.path(), &cluster, |i| {
        if i == 1 {
            &[("SPANVM_TEST_FAIL_INSTALL_AFTER", "200")]
        } else {
            &[]
        }
    });
    let mut ends = Vec::new();
    for (i, node) in procs.iter_mut().enumerate() {
        let (code, at) = node.wait(Duration::from_secs(60));
        let stderr = node.stderr();
        assert_eq!(
            code,
            Some(6),
            "node {i} should exit with the memory-failure code\n{stderr}"
        );
        assert!(
            stderr.contains("the distributed memory failed on node 1")
                && stderr.contains("UFFDIO_COPY"),
            "node {i} does not say that node 1's memory failed and why:\n{stderr}"
        );
        assert!(
            !node.stdout().contains("CNTR="),
            "node {i} reported a counter although the memory failed"
        );
        ends.push(at);
    }
    let apart = if ends[0] > ends[1] {
        ends[0] - ends[1]
    } else {
        ends[1] - ends[0]
    };
    eprintln!("the two nodes stopped {apart:?} apart");
    assert!(
        apart < Duration::from_secs(2),
        "nodes stopped {apart:?} apart"
    );
}

#[test]
fn sigusr1_prints_a_nodes_statistics_and_ctrl_c_on_the_master_stops_all_with_130() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start_probe_cluster(
        dir.path(),
        &cluster_text(2, 1, "counter", 2_000_000_000, 64),
        |_| &[],
    );
    wait_until_running(&procs);
    // Statistics on request, while the guest runs: the DSM's and forwarding's.
    signal(&procs[1], libc::SIGUSR1);
    let asked = Instant::now();
    while !procs[1].stderr().contains("forwarding: ") {
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "no statistics after SIGUSR1:\n{}",
            procs[1].stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = procs[1].stderr();
    assert!(stats.contains("DSM statistics of node 1"), "{stats}");
    assert!(stats.contains("faults: "), "{stats}");
    assert_eq!(
        procs[1].child.try_wait().unwrap(),
        None,
        "SIGUSR1 must not stop the node"
    );
    // Ctrl-C on the master stops the whole guest with 130.
    signal(&procs[0], libc::SIGINT);
    for (i, node) in procs.iter_mut().enumerate() {
        let (code, _) = node.wait(Duration::from_secs(10));
        assert_eq!(code, Some(130), "node {i}\n{}", node.stderr());
        assert!(
            node.stderr().contains("interrupted"),
            "node {i}\n{}",
            node.stderr()
        );
    }
}

/// A 2-node Linux cluster (the master loads the kernel and the initrd through the DSM).
fn linux_pair(dir: &Path) -> [PathBuf; 2] {
    let secret = write_secret(dir, "cluster.secret", 9);
    let addrs = common::free_addrs(2);
    let cluster = format!(
        "[guest]\nvcpus = 2\nmemory_mib = 256\n[guest.linux]\nkernel = \"{}\"\ninitrd = \"{}\"\n\
         cmdline = \"console=ttyS0 spanvm.run=true\"\n\n[[nodes]]\nid = 0\naddress = \"{}\"\n\
         vcpus = [0]\n\n[[nodes]]\nid = 1\naddress = \"{}\"\nvcpus = [1]\n",
        common::image("minimal.vmlinux").display(),
        common::image("initramfs.cpio").display(),
        addrs[0],
        addrs[1]
    );
    [0, 1].map(|i| node_file(dir, i, &secret, &cluster))
}

/// Starts the pair with START held back by the master, kills `victim` while node 1 waits for
/// it, and checks that the survivor exits 5 within 2 s naming the victim.
fn kill_before_start(victim: usize) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let files = linux_pair(dir.path());
    // The master holds START back for a minute: node 1 waits for it all that time.
    let hold = [("SPANVM_TEST_HOLD_START_MS", "60000")];
    let mut procs: Vec<Node> = (0..2)
        .map(|i| start(dir.path(), i, &files[i], if i == 0 { &hold } else { &[] }))
        .collect();
    let survivor = 1 - victim;
    // The master prints its clock line just before it would send START.
    let begun = Instant::now();
    while !procs[0].stderr().contains("clock: master") {
        assert!(
            begun.elapsed() < Duration::from_secs(60),
            "the master never got to START:\n{}",
            procs[0].stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    procs[victim].child.kill().unwrap();
    let killed_at = Instant::now();
    let _ = procs[victim].child.wait();
    let (code, at) = procs[survivor].wait(Duration::from_secs(70));
    let stderr = procs[survivor].stderr();
    let took = at.duration_since(killed_at);
    eprintln!("node {survivor} stopped {took:?} after node {victim} was killed before START");
    assert_eq!(code, Some(5), "node {survivor}\n{stderr}");
    assert!(took < Duration::from_secs(2), "took {took:?}\n{stderr}");
    assert!(
        stderr.contains(&format!("node {victim}")) && stderr.contains("before the guest started"),
        "node {survivor} does not say it lost node {victim} before the start:\n{stderr}"
    );
}

#[test]
fn killing_a_node_that_waits_for_start_stops_the_master_within_2_seconds() {
    kill_before_start(1);
}

#[test]
fn killing_the_master_while_a_node_waits_for_start_stops_it_within_2_seconds() {
    kill_before_start(0);
}

fn refused_pair(secret1_byte: u8, memory1_mib: u64) -> [(Option<i32>, String); 2] {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let s0 = write_secret(dir.path(), "s0", 7);
    let s1 = write_secret(dir.path(), "s1", secret1_byte);
    let cluster = cluster_text(2, 1, "counter", 0, 64);
    let cluster1 = cluster.replace("memory_mib = 64", &format!("memory_mib = {memory1_mib}"));
    let env = [("SPANVM_CONNECT_TIMEOUT", "5")];
    let mut n0 = start(
        dir.path(),
        0,
        &node_file(dir.path(), 0, &s0, &cluster),
        &env,
    );
    let mut n1 = start(
        dir.path(),
        1,
        &node_file(dir.path(), 1, &s1, &cluster1),
        &env,
    );
    let (c0, _) = n0.wait(Duration::from_secs(30));
    let (c1, _) = n1.wait(Duration::from_secs(30));
    [(c0, n0.stderr()), (c1, n1.stderr())]
}

#[test]
fn a_node_with_the_wrong_secret_is_refused() {
    let [(c0, e0), (c1, e1)] = refused_pair(8, 64);
    assert_ne!(
        c0,
        Some(0),
        "node 0 accepted a peer with the wrong secret:\n{e0}"
    );
    assert_ne!(c1, Some(0), "node 1 joined with the wrong secret:\n{e1}");
    for (i, e) in [(0, &e0), (1, &e1)] {
        assert!(
            e.contains("secret"),
            "node {i} does not say the secret is wrong:\n{e}"
        );
        assert!(!e.contains("panicked"), "node {i} panicked:\n{e}");
        assert!(!e.contains("running"), "node {i} started the guest:\n{e}");
    }
}

#[test]
fn a_node_with_a_different_layout_is_refused() {
    let [(c0, e0), (c1, e1)] = refused_pair(7, 128);
    assert_ne!(c0, Some(0));
    assert_ne!(c1, Some(0));
    for (i, e) in [(0, &e0), (1, &e1)] {
        assert!(
            e.contains("layout"),
            "node {i} does not say the layouts differ:\n{e}"
        );
        assert!(
            e.contains("memory"),
            "node {i} does not name the first difference (memory):\n{e}"
        );
        assert!(!e.contains("running"), "node {i} started the guest:\n{e}");
    }
}

#[test]
fn killing_the_master_while_a_vcpu_waits_on_a_forwarded_in_stops_its_node_within_2_seconds() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // vCPU 1 (node 1) reads COM1's LSR in a loop: every read is forwarded to node 0.
    let mut procs =
        start_probe_cluster(dir.path(), &cluster_text(2, 1, "forward-in", 0, 32), |_| {
            &[]
        });
    // Every node still running is killed when `procs` is dropped, however the test ends.
    let started = Instant::now();
    while !procs[1].stdout().contains("PROBE vcpu=1 INRD=1000") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "vCPU 1 made no progress reading the forwarded port\nnode 1:\n{}\n{}",
            procs[1].stdout(),
            procs[1].stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        procs[1].stdout().contains("PROBE vcpu=1 NODE=1"),
        "vCPU 1 did not run on node 1"
    );
    procs[0].child.kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    let _ = procs[0].child.wait();
    let (code, at) = procs[1].wait(Duration::from_secs(20));
    let stderr = procs[1].stderr();
    let took = at.duration_since(killed_at);
    assert_eq!(
        code,
        Some(5),
        "node 1 should exit with the lost-peer code\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(2),
        "node 1 took {took:?} to stop after the master died\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("lost") && l.contains("node 0")),
        "node 1 does not say it lost node 0:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "node 1 panicked:\n{stderr}");
}

/// Records between two progress reports of the `stream` probe (its REPORT_EVERY).
const STREAM_REPORT_EVERY: u64 = 1024;
/// Records in the `stream` probe's ring (its RECORDS): one lap.
const STREAM_LAP: u64 = 16384;

/// Every value `vcpu` reported under `key` in `stdout`, in order.
fn reports_of(stdout: &str, vcpu: usize, key: &str) -> Vec<u64> {
    let prefix = format!("PROBE vcpu={vcpu} {key}=");
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .collect()
}

/// Reads `node`'s stdout as it grows until `vcpu` has reported `key` at `at_least` or more;
/// returns that value. Fails at once if a `stream` check failed or the node exited, so that a
/// broken run is not mistaken for a slow one.
fn wait_for_progress(node: &mut Node, vcpu: usize, key: &str, at_least: u64) -> u64 {
    let started = Instant::now();
    let prefix = format!("PROBE vcpu={vcpu} {key}=");
    let mut seen = 0; // bytes of stdout already looked at, up to the last whole line
    loop {
        let stdout = node.stdout();
        let whole = stdout.rfind('\n').map_or(0, |end| end + 1);
        for line in stdout[seen.min(whole)..whole].lines() {
            assert!(
                !line.contains(" BAD"),
                "the stream check failed before the kill: {line}\n{stdout}\n{}",
                node.stderr()
            );
            let value = line
                .strip_prefix(&prefix)
                .and_then(|v| v.trim().parse().ok());
            if let Some(value) = value.filter(|v: &u64| *v >= at_least) {
                return value;
            }
        }
        seen = whole;
        if let Some(status) = node.child.try_wait().unwrap() {
            panic!(
                "the node exited ({status}) before vCPU {vcpu} reported {key} >= {at_least}\n\
                 {stdout}\n{}",
                node.stderr()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "vCPU {vcpu} did not report {key} >= {at_least} within 60 s\n{stdout}\n{}",
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killing_the_writer_mid_stream_leaves_the_reader_with_only_records_it_checked() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // vCPU 0 (node 0) reads and checks the endless stream vCPU 1 (node 1) writes.
    let mut procs = start_probe_cluster(dir.path(), &cluster_text(2, 1, "stream", 0, 64), |_| &[]);
    // Every node still running is killed when `procs` is dropped, however the test ends.
    // "Mid-run" is when the reader has checked many laps of the ring, each moving every ring
    // page to node 0 and back, so that stale copies of the pages have existed; not a guessed
    // delay.
    let before_kill = wait_for_progress(&mut procs[0], 0, "RDOK", 16 * STREAM_LAP);
    procs[1].child.kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    let _ = procs[1].child.wait();
    let (code, at) = procs[0].wait(Duration::from_secs(20));
    let took = at.duration_since(killed_at);
    let (stdout0, stderr0) = (procs[0].stdout(), procs[0].stderr());
    let stdout1 = procs[1].stdout();
    assert_eq!(
        code,
        Some(5),
        "node 0 should exit with the lost-peer code\n{stderr0}"
    );
    assert!(
        took < Duration::from_secs(2),
        "node 0 took {took:?} to stop after node 1 died\n{stderr0}"
    );
    assert!(
        stderr0
            .lines()
            .any(|l| l.contains("lost") && l.contains("node 1")),
        "node 0 does not say it lost node 1:\n{stderr0}"
    );
    assert!(!stderr0.contains("panicked"), "node 0 panicked:\n{stderr0}");
    // Placement: the reader on the survivor, the writer on the node killed.
    assert!(stdout0.contains("PROBE vcpu=0 NODE=0"), "{stdout0}");
    assert!(stdout1.contains("PROBE vcpu=1 NODE=1"), "{stdout1}");
    // No record the reader was handed, before or after the kill, was zero, stale or garbled;
    // and the reader neither finished nor failed: the survivor stopped it.
    assert!(
        !stdout0.contains(" BAD"),
        "the reader was handed a bad record or head:\n{stdout0}"
    );
    assert!(!stdout0.contains("vcpu=0 EXIT="), "{stdout0}");
    // The reader's counts step by exactly one report's worth: every record up to the last
    // count was checked, none skipped, and the counts only grow.
    let checked = reports_of(&stdout0, 0, "RDOK");
    let expected: Vec<u64> = (1..=checked.len() as u64)
        .map(|k| k * STREAM_REPORT_EVERY)
        .collect();
    assert_eq!(checked, expected, "the reader's progress reports have gaps");
    let last_checked = *checked.last().unwrap();
    assert!(last_checked >= before_kill);
    // The reader cannot have checked records that were never written. The writer reports just
    // after it publishes, so a kill between the two may leave its last report one short.
    let last_written = reports_of(&stdout1, 1, "WROT").last().copied().unwrap_or(0);
    assert!(
        last_checked <= last_written + STREAM_REPORT_EVERY,
        "the reader checked {last_checked} records, the writer reported only {last_written}"
    );
    eprintln!(
        "stream: node 0 stopped {took:?} after node 1 was killed; the reader had checked \
         {before_kill} records when the kill was decided, {last_checked} at its last report; \
         the writer last reported {last_written} written"
    );
}

#[test]
fn a_zero_page_handed_to_the_stream_reader_fails_its_check() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Node 0 installs the pages it receives from node 1 as zeros, from well into the stream on:
    // what a DSM that handed out a lost node's pages as zeros would do. Every one, because a
    // single zero page may be taken back by the writer before the reader gets to it. The stream
    // is finite so that a check that missed would end the run instead of hanging it.
    let mut procs = start_probe_cluster(
        dir.path(),
        &cluster_text(2, 1, "stream", 1_000_000, 64),
        |i| {
            if i == 0 {
                &[("SPANVM_TEST_ZERO_PAGE_AFTER", "500")]
            } else {
                &[]
            }
        },
    );
    let (code, _) = procs[0].wait(Duration::from_secs(120));
    let (stdout0, stderr0) = (procs[0].stdout(), procs[0].stderr());
    assert!(
        stderr0.contains("TEST HOOK SPANVM_TEST_ZERO_PAGE_AFTER FIRED"),
        "the hook did not fire:\n{stderr0}"
    );
    assert!(stdout0.contains("PROBE vcpu=0 NODE=0"), "{stdout0}");
    let reported = |key: &str| reports_of(&stdout0, 0, key).first().copied();
    assert_eq!(
        reported("BADK"),
        Some(1),
        "the reader did not report reading zeros (BADK=1)\n{stdout0}\n{stderr0}"
    );
    assert_eq!(reported("BADW"), Some(0), "{stdout0}");
    assert_eq!(
        code,
        Some(4),
        "node 0 should exit with the probe-failure code\n{stderr0}"
    );
    let (code1, _) = procs[1].wait(Duration::from_secs(20));
    assert_eq!(code1, Some(4), "node 1\n{}", procs[1].stderr());
    let fired = stderr0
        .lines()
        .find(|l| l.contains("FIRED"))
        .unwrap_or_default();
    eprintln!(
        "zero page: {fired}\nthe reader reported: {}",
        stdout0
            .lines()
            .filter(|l| l.contains(" BAD") || l.contains("vcpu=0 EXIT"))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// The pids of `pid`'s children (its main thread's; `spanvm cluster` starts its nodes there).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `pid` still runs (a zombie waiting for init does not).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn nodes_die_with_a_cluster_parent_killed_by_sigkill() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, cluster_text(2, 1, "counter", 2_000_000_000, 64)).unwrap();
    let mut cluster = std::process::Command::new(common::spanvm())
        .args(["cluster", "--config", config.to_str().unwrap()])
        .arg("--dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let parent = cluster.id();
    let started = Instant::now();
    let nodes = loop {
        let nodes = children_of(parent);
        if nodes.len() == 2 {
            break nodes;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = cluster.kill();
            let _ = cluster.wait();
            panic!("spanvm cluster did not start its 2 nodes: {nodes:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let the nodes get as far as running the guest.
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill().unwrap();
    let _ = cluster.wait();
    let killed_at = Instant::now();
    while nodes.iter().any(|&n| is_running(n)) && killed_at.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<u32> = nodes.iter().copied().filter(|&n| is_running(n)).collect();
    for &n in &left {
        // SAFETY: kill(2) so that a failing test leaves nothing spinning; the pid was the
        // cluster's child a moment ago.
        unsafe { libc::kill(libc::pid_t::try_from(n).unwrap(), libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "nodes {left:?} outlived their killed cluster parent"
    );
    println!(
        "both nodes were gone {:?} after the parent was killed",
        killed_at.elapsed()
    );
}

/// How node 0 is stopped while its vCPU waits for a page of the hung node 1.
#[derive(Clone, Copy, Debug)]
enum StopWhileFaulting {
    /// Ctrl-C on node 0: a stop that fails nothing, so the DSM is not frozen by a failure.
    Interrupt,
    /// Node 1 is killed: node 0 loses it.
    KillPeer,
}

/// Runs `stop-fault` on 2 nodes: vCPU 1 (node 1) writes a pattern into a page, vCPU 0 (node 0)
/// sees its flag and reports SEEN; node 1 is then hung (SIGSTOP) before vCPU 0, a second later,
/// reads the page, so that the read waits in a DSM fault for a page only node 1 has. Then node 0
/// is stopped by `how`. Whatever the path, vCPU 0 must never report a value: the page can only
/// have come from nowhere, that is as a zero page let through by closing or unregistering the
/// userfaultfd under the blocked fault. With `ignores_kick` node 0's vCPU threads block the kick
/// signal, so that the fault is not ended by it (as on kernels where a signal does not interrupt
/// a KVM page fault) and the node must tear down around a vCPU that never leaves it.
fn stop_while_a_vcpu_waits_for_a_hung_peer(how: StopWhileFaulting, ignores_kick: bool) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    const WAIT_MS: u64 = 1000;
    // Every node still running is killed when `procs` is dropped, however the test ends
    // (SIGKILL ends a stopped process too).
    let mut procs = start_probe_cluster(
        dir.path(),
        &cluster_text(2, 1, "stop-fault", WAIT_MS, 32),
        |i| {
            // Node 0 lingers after its teardown: a vCPU the teardown let through its fault
            // would report the page it read before the exit ends it.
            match (i, ignores_kick) {
                (0, true) => &[
                    ("SPANVM_TEST_VCPU_IGNORES_KICK", "1"),
                    ("SPANVM_TEST_LINGER_AFTER_TEARDOWN_MS", "500"),
                ],
                (0, false) => &[("SPANVM_TEST_LINGER_AFTER_TEARDOWN_MS", "500")],
                _ => &[],
            }
        },
    );
    let started = Instant::now();
    while !procs[0].stdout().contains("PROBE vcpu=0 SEEN=1") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "vCPU 0 never saw vCPU 1's flag\nnode 0:\n{}\n{}\nnode 1:\n{}\n{}",
            procs[0].stdout(),
            procs[0].stderr(),
            procs[1].stdout(),
            procs[1].stderr()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let seen = Instant::now();
    signal(&procs[1], libc::SIGSTOP);
    let hung_after = seen.elapsed();
    assert!(
        hung_after < Duration::from_millis(WAIT_MS / 2),
        "node 1 was hung only {hung_after:?} after vCPU 0 saw the flag: too late to be sure \
         that vCPU 0 had not read the page yet"
    );
    // vCPU 0 reads the page WAIT_MS after SEEN; node 0 notices the silence of node 1 2 s after
    // the hang. Stop in between, when the read is certainly waiting.
    std::thread::sleep(Duration::from_millis(WAIT_MS + 400).saturating_sub(seen.elapsed()));
    let out = procs[0].stdout();
    assert!(
        !out.contains("RVAL="),
        "vCPU 0 read the page although node 1 was hung:\n{out}"
    );
    match how {
        StopWhileFaulting::Interrupt => signal(&procs[0], libc::SIGINT),
        StopWhileFaulting::KillPeer => {
            procs[1].child.kill().unwrap();
            let _ = procs[1].child.wait();
        }
    }
    let stop_at = Instant::now();
    let (code, at) = procs[0].wait(Duration::from_secs(20));
    let took = at.duration_since(stop_at);
    let stdout = procs[0].stdout();
    let stderr = procs[0].stderr();
    eprintln!("node 0 ({how:?}, kick ignored: {ignores_kick}) exited with {code:?} {took:?} after the stop\n{stderr}");
    assert!(
        !stdout.contains("PROBE vcpu=0 RVAL=") && !stdout.contains("PROBE vcpu=0 EXIT="),
        "vCPU 0 read a page that only the hung node 1 has (made up at the stop):\n{stdout}\n{stderr}"
    );
    // Ctrl-C gives 130; node 0 may notice node 1's silence first (5) under heavy load.
    let expected: &[i32] = match how {
        StopWhileFaulting::Interrupt => &[130, 5],
        StopWhileFaulting::KillPeer => &[5],
    };
    assert!(
        code.is_some_and(|c| expected.contains(&c)),
        "node 0 exited with {code:?}, expected one of {expected:?}\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "node 0 took {took:?} to stop\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "node 0 panicked:\n{stderr}");
    if ignores_kick {
        assert!(
            stderr.contains("vcpu0 did not stop"),
            "node 0 does not say it left vCPU 0 blocked in its fault:\n{stderr}"
        );
    }
}

#[test]
fn interrupting_a_node_whose_vcpu_waits_for_a_page_of_a_hung_peer_never_makes_the_page_up() {
    stop_while_a_vcpu_waits_for_a_hung_peer(StopWhileFaulting::Interrupt, false);
}

#[test]
fn interrupting_a_node_around_a_vcpu_stuck_in_a_page_fault_never_makes_the_page_up() {
    stop_while_a_vcpu_waits_for_a_hung_peer(StopWhileFaulting::Interrupt, true);
}

#[test]
fn killing_the_hung_peer_of_a_vcpu_stuck_in_a_page_fault_never_makes_the_page_up() {
    stop_while_a_vcpu_waits_for_a_hung_peer(StopWhileFaulting::KillPeer, true);
}

//! Failures of a distributed guest with real node processes: a node killed mid-run, a node whose
//! distributed memory fails, a node with the wrong secret, a node whose layout differs. (Malformed frames are fuzzed in the transport
//! and dsm crates' own tests.)

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cluster_text, spanvm};

struct Node {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Node {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
    /// Waits for the exit at most `limit`; returns the exit code and when it came.
    fn wait(&mut self, limit: Duration) -> (Option<i32>, Instant) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), Instant::now());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "node did not exit within {limit:?}\nstderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Node {
    /// A test that fails half-way still leaves no node behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn write_secret(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, [byte; 32]).unwrap();
    p
}

fn node_file(dir: &Path, id: usize, secret: &Path, cluster: &str) -> PathBuf {
    let p = dir.join(format!("node-{id}.toml"));
    std::fs::write(
        &p,
        format!("node = {id}\nsecret = \"{}\"\n{cluster}", secret.display()),
    )
    .unwrap();
    p
}

fn start(dir: &Path, id: usize, config: &Path, env: &[(&str, &str)]) -> Node {
    let stdout = dir.join(format!("node-{id}.out"));
    let stderr = dir.join(format!("node-{id}.err"));
    let mut cmd = Command::new(spanvm());
    cmd.args(["node", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Node {
        child: cmd.spawn().unwrap(),
        stdout,
        stderr,
    }
}

/// Starts every node of the probe cluster `cluster` (from `cluster_text`) with one secret, each
/// with the environment `env(node)`.
fn start_probe_cluster(
    dir: &Path,
    cluster: &str,
    env: impl Fn(usize) -> &'static [(&'static str, &'static str)],
) -> Vec<Node> {
    let secret = write_secret(dir, "cluster.secret", 7);
    let nodes = cluster.matches("[[nodes]]").count();
    (0..nodes)
        .map(|i| start(dir, i, &node_file(dir, i, &secret, cluster), env(i)))
        .collect()
}

fn wait_until_running(nodes: &[Node]) {
    let start = Instant::now();
    while !nodes.iter().all(|n| n.stderr().contains("running")) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nodes did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

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

fn signal(node: &Node, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(libc::pid_t::try_from(node.child.id()).unwrap(), sig) };
    assert_eq!(rc, 0, "kill({sig})");
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

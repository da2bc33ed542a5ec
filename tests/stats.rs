//! Live statistics against real node processes: `spanvm stats` asks a running node over its
//! control socket (`<config>.stats.sock`) while its probe guest moves a page between two nodes,
//! and `spanvm cluster --stats-interval` prints a line per node while its guest runs.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::nodes::{node_file, signal, start_probe_cluster, wait_until_running, write_secret};
use common::{cluster_text, run_spanvm, single_node_config};

/// The tests start nodes that spin on both cores of a small host: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const LIMIT: Duration = Duration::from_secs(30);

fn socket_of(config: &Path) -> PathBuf {
    let mut name = std::fs::canonicalize(config).unwrap().into_os_string();
    name.push(".stats.sock");
    PathBuf::from(name)
}

/// `spanvm stats` with `args` after `--config config`: (exit code, stdout, stderr).
fn stats(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["stats", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = run_spanvm(&all, &[], LIMIT);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The number right after `label` on the first line that has it.
fn figure(page: &str, label: &str) -> u64 {
    figure_if_any(page, label).unwrap_or_else(|| panic!("no `{label}` in:\n{page}"))
}

/// The number right after `label` on the first line that has it, if one does (an exit
/// reason shows only once it happened).
fn figure_if_any(page: &str, label: &str) -> Option<u64> {
    page.lines().find_map(|l| {
        let rest = &l[l.find(label)? + label.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// The figures of a running node (asks again while it is still starting).
fn running_stats(config: &Path, args: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let (code, out, err) = stats(config, args);
        assert_eq!(code, Some(0), "spanvm stats failed:\n{err}");
        if out.contains(": running,") {
            return out;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the node never said it runs:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first answer of a running node for which `ready` holds (the guest's work begins after
/// the node says it runs: its vCPUs meet at a barrier first).
fn stats_once(config: &Path, ready: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let page = running_stats(config, &[]);
        if ready(&page) {
            return page;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the guest never got going:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn stats_of_a_running_node_grow_while_its_guest_faults_across_nodes() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Both vCPUs `lock xadd` one counter far longer than the test: its page keeps moving.
    let mut nodes = start_probe_cluster(
        dir.path(),
        &cluster_text(2, 1, "counter", 2_000_000_000, 64),
        |_| &[],
    );
    wait_until_running(&nodes);
    let configs = [0, 1].map(|i| dir.path().join(format!("node-{i}.toml")));
    for config in &configs {
        assert!(
            socket_of(config).exists(),
            "no socket for {}",
            config.display()
        );
    }

    // Once the counter's page moves, every answer must show more faults than the one before.
    stats_once(&configs[1], |page| figure(page, "remote requests") > 0);
    let mut faults = Vec::new();
    for round in 0..3 {
        let page = running_stats(&configs[1], &[]);
        if round == 2 {
            eprintln!("spanvm stats --config node-1.toml:\n{page}");
        }
        assert!(page.starts_with("node 1 of 2: running"), "{page}");
        assert!(page.contains("fault service time: p50 "), "{page}");
        assert!(page.contains("hottest pages:"), "{page}");
        assert!(page.contains("vCPU 1: exits "), "{page}");
        assert!(figure(&page, "remote requests") > 0, "{page}");
        assert!(figure(&page, "messages sent") > 0, "{page}");
        faults.push(figure(&page, "  faults "));
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(
        faults.windows(2).all(|w| w[0] < w[1]),
        "node 1's fault count did not grow: {faults:?}"
    );

    // The threads a remote fault waits for run at real-time priority where the process may
    // (this host runs the tests as root); the others, the control receiver included, do not.
    let policies = thread_policies(nodes[1].child.id());
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let fifo = |name: &str| {
        policies
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, p)| p == libc::SCHED_FIFO as u32)
            .unwrap_or_else(|| panic!("no thread {name} in node 1: {policies:?}"))
    };
    for name in ["dsm-faults-1", "xport-rx0-0", "xport-rx0-1", "xport-rx0-2"] {
        assert_eq!(fifo(name), root, "{name}: {policies:?}");
    }
    assert!(!fifo("xport-rx0-3"), "the control receiver: {policies:?}");
    for (name, policy) in &policies {
        if name.starts_with("vcpu") || name.starts_with("xport-tx") {
            assert_ne!(*policy, libc::SCHED_FIFO as u32, "{name}: {policies:?}");
        }
    }

    // The master, twice, as the home of the counter's page.
    let first = running_stats(&configs[0], &[]);
    std::thread::sleep(Duration::from_millis(700));
    let second = running_stats(&configs[0], &[]);
    assert!(second.starts_with("node 0 of 2: running"), "{second}");
    assert!(
        figure(&first, "  faults ") < figure(&second, "  faults "),
        "node 0's fault count did not grow:\n{first}\n{second}"
    );
    assert!(figure(&second, "served as home") > 0, "{second}");

    // Rates between two answers a second apart.
    let page = running_stats(&configs[1], &["--interval", "1"]);
    assert!(page.contains("rates (over the last 1."), "{page}");
    assert!(figure(&page, "DSM faults") > 0, "{page}");

    // A second node from the same config file is refused, naming the socket.
    let twin = run_spanvm(
        &["node", "--config", configs[1].to_str().unwrap()],
        &[],
        LIMIT,
    );
    let twin_err = String::from_utf8_lossy(&twin.stderr);
    assert_eq!(twin.status.code(), Some(1), "{twin_err}");
    assert!(
        twin_err.contains("already answers on") && twin_err.contains(".stats.sock"),
        "{twin_err}"
    );
    assert!(
        socket_of(&configs[1]).exists(),
        "the twin took the socket away"
    );

    // Ctrl-C on the master stops both; their sockets go with them.
    signal(&nodes[0], libc::SIGINT);
    for (i, node) in nodes.iter_mut().enumerate() {
        let (code, _) = node.wait(LIMIT);
        assert_eq!(code, Some(130), "node {i}\n{}", node.stderr());
        assert!(
            !socket_of(&configs[i]).exists(),
            "node {i} left its socket behind"
        );
    }
    let (code, _, err) = stats(&configs[1], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no node is running from"), "{err}");
}

/// `(name, scheduling policy)` of every thread of process `pid` (`/proc/PID/task/*/stat`,
/// field 41).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // `pid (comm) state ...`: the name may hold spaces, so split at the last ')'.
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_string();
        // Field 3 (state) is the first after the name; policy is field 41.
        let policy = rest
            .split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap();
        out.push((name, policy));
    }
    out
}

/// `(interrupts from other nodes, to other nodes, mmio_write exits)` of vCPU `vcpu` in a page
/// (no `mmio_write` exit yet counts 0).
fn vcpu_figures(page: &str, vcpu: usize) -> (u64, u64, u64) {
    let line = page
        .lines()
        .find(|l| l.starts_with(&format!("vCPU {vcpu}: exits ")))
        .unwrap_or_else(|| panic!("no line for vCPU {vcpu}:\n{page}"));
    (
        figure(line, "interrupts from other nodes"),
        figure(line, "to other nodes"),
        figure_if_any(line, "mmio_write").unwrap_or(0),
    )
}

#[test]
fn stats_count_each_vcpus_ipis_across_nodes_and_its_exits_by_reason() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Both vCPUs IPI each other through the xAPIC's ICR (MMIO writes), far longer than the test.
    let nodes = start_probe_cluster(
        dir.path(),
        &cluster_text(2, 1, "storm", 1_000_000, 32),
        |_| &[],
    );
    wait_until_running(&nodes);
    let config = dir.path().join("node-1.toml");
    let first = stats_once(&config, |page| {
        let (received, sent, mmio) = vcpu_figures(page, 1);
        received > 0 && sent > 0 && mmio > 0
    });
    std::thread::sleep(Duration::from_millis(700));
    let second = running_stats(&config, &[]);
    let (in_1, out_1, mmio_1) = vcpu_figures(&first, 1);
    let (in_2, out_2, mmio_2) = vcpu_figures(&second, 1);
    assert!(in_1 > 0 && out_1 > 0 && mmio_1 > 0, "{first}");
    assert!(
        in_2 > in_1 && out_2 > out_1 && mmio_2 > mmio_1,
        "vCPU 1's IPIs and exits did not grow:\n{first}\n{second}"
    );
    assert!(figure(&second, "interrupt frames sent") > 0, "{second}");
    // The guards kill both nodes.
    drop(nodes);
}

#[test]
fn stats_without_a_running_node_is_one_clear_error() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "cluster.secret", 3);
    let config = node_file(
        dir.path(),
        1,
        &secret,
        &cluster_text(2, 1, "counter", 0, 64),
    );
    let socket = socket_of(&config);

    let (code, out, err) = stats(&config, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "spanvm: error: no node is running from {}: there is no control socket {}",
            config.display(),
            socket.display()
        )
    );
    assert!(out.is_empty(), "{out}");

    // A socket left by a killed node.
    drop(UnixListener::bind(&socket).unwrap());
    let (code, _, err) = stats(&config, &[]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("left behind by a node that was killed"),
        "{err}"
    );

    // No config file at all.
    let (code, _, err) = stats(&dir.path().join("absent.toml"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot find the node config"), "{err}");

    // A node replaces a stale socket, and removes its own when it ends.
    let single = single_node_config(dir.path(), "counter", 1, 64);
    let single_socket = socket_of(&single);
    drop(UnixListener::bind(&single_socket).unwrap());
    let run = run_spanvm(&["run", "--config", single.to_str().unwrap()], &[], LIMIT);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!single_socket.exists(), "the node left its socket behind");
}

#[test]
fn cluster_prints_a_summary_line_per_node_at_the_stats_interval() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // hotpage's default: both vCPUs write one page for about 2000 events (seconds here).
    let out = run_spanvm(
        &[
            "cluster",
            "--probe",
            "hotpage",
            "--dir",
            dir.path().to_str().unwrap(),
            "--stats-interval",
            "1",
        ],
        &[],
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let summary: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("stats node"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    for node in 0..2 {
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with(&format!("stats node {node}: faults ")))
            .collect();
        assert!(!lines.is_empty(), "no summary line for node {node}:\n{err}");
        for line in &lines {
            for field in [
                ", remote ",
                ", in ",
                ", out ",
                ", IPIs in ",
                ", I/O ",
                ", exits ",
            ] {
                assert!(line.contains(field), "`{field}` missing: {line}");
            }
        }
        assert!(
            lines.iter().any(|l| figure(l, "remote") > 0),
            "node {node} never reported a remote request:\n{err}"
        );
    }
    // The nodes are gone, and so are their sockets.
    for node in 0..2 {
        let config = dir.path().join(format!("node-{node}.toml"));
        assert!(!socket_of(&config).exists());
    }
}

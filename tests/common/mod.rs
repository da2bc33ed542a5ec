//! Helpers shared by the end-to-end tests: write node configs, run the real `spanvm` binary as
//! a child process, and parse what probes report.
#![allow(dead_code)]

pub mod coherence;
pub mod guest_net;
pub mod netns;
pub mod nodes;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where `images/build.sh` put the guest images (`SPANVM_IMAGES_DIR` overrides it).
pub fn images_dir() -> PathBuf {
    std::env::var_os("SPANVM_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

/// A guest image; fails the test, saying how to build it, when it is missing.
pub fn image(name: &str) -> PathBuf {
    let p = images_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the guest images first with `bash images/build.sh`",
        p.display()
    );
    p
}

/// The `spanvm` binary built for these tests.
pub fn spanvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spanvm"))
}

/// A single-node config running `probe` on `vcpus` vCPUs with `memory_mib` of RAM.
pub fn single_node_config(dir: &Path, probe: &str, vcpus: u32, memory_mib: u64) -> PathBuf {
    let list: Vec<String> = (0..vcpus).map(|v| v.to_string()).collect();
    let text = format!(
        "node = 0\n\n[guest]\nvcpus = {vcpus}\nmemory_mib = {memory_mib}\nprobe = \"{probe}\"\n\n[[nodes]]\nid = 0\naddress = \"127.0.0.1:7900\"\nvcpus = [{}]\n",
        list.join(", ")
    );
    let path = dir.join(format!("{probe}-{vcpus}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits for `child` at most `limit`, killing it after that (the test then fails on the status).
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    // Streams the caller took already (to read them as they come) are left to the caller.
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut o) = stdout {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_end(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// Runs `spanvm` with `args` (and extra environment), waiting at most `limit`.
pub fn run_spanvm(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    run_spanvm_wrapped(&[], args, env, limit)
}

/// A `spanvm` command run through `wrapper` (a command that execs the rest of its arguments,
/// such as `ip netns exec NAME`), or directly when `wrapper` is empty.
pub fn spanvm_through(wrapper: &[&str]) -> Command {
    match wrapper.split_first() {
        Some((program, wrapper_args)) => {
            let mut cmd = Command::new(program);
            cmd.args(wrapper_args).arg(spanvm());
            cmd
        }
        None => Command::new(spanvm()),
    }
}

/// Like [`run_spanvm`], through `wrapper` (a command that execs the rest of its arguments).
pub fn run_spanvm_wrapped(
    wrapper: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Output {
    let mut cmd = spanvm_through(wrapper);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    wait_with_limit(cmd.spawn().expect("cannot start spanvm"), limit)
}

/// What a probe run (one node, or a cluster with its `[node N]` prefixes removed) printed,
/// parsed: `PROBE vcpu=N KEY=value` lines.
pub struct ProbeRun {
    pub output: Output,
    pub reports: HashMap<(usize, String), u64>,
}

impl ProbeRun {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// The value vCPU `vcpu` reported under `key`; panics with the whole output if missing.
    pub fn get(&self, vcpu: usize, key: &str) -> u64 {
        match self.reports.get(&(vcpu, key.to_string())) {
            Some(v) => *v,
            None => panic!(
                "vCPU {vcpu} did not report {key}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            ),
        }
    }
    /// Sum over nodes of a number in the DSM statistics, found after `label` on a stderr line.
    pub fn stat_sum(&self, label: &str) -> u64 {
        self.stderr()
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find(label)? + label.len()..];
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// Asserts the run ended with exit code 0 and every listed vCPU reported EXIT=0.
    pub fn assert_success(&self, vcpus: usize) {
        assert!(
            self.output.status.success(),
            "spanvm failed: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.output.status,
            self.stdout(),
            self.stderr()
        );
        for v in 0..vcpus {
            assert_eq!(self.get(v, "EXIT"), 0, "vCPU {v} exit status");
        }
    }
}

pub fn parse_reports(stdout: &str) -> HashMap<(usize, String), u64> {
    let mut map = HashMap::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("PROBE vcpu=") else {
            continue;
        };
        let Some((vcpu, kv)) = rest.split_once(' ') else {
            continue;
        };
        let Some((key, value)) = kv.split_once('=') else {
            continue;
        };
        if let (Ok(vcpu), Ok(value)) = (vcpu.parse(), value.parse()) {
            map.insert((vcpu, key.to_string()), value);
        }
    }
    map
}

impl ProbeRun {
    /// Asserts that vCPU `v` ran on node `owner(v)` (every probe reports NODE at start).
    pub fn assert_placement(&self, vcpus: usize, owner: impl Fn(usize) -> u64) {
        for v in 0..vcpus {
            assert_eq!(
                self.get(v, "NODE"),
                owner(v),
                "vCPU {v} ran on the wrong node\n{}",
                self.stdout()
            );
        }
    }
}

/// Runs `probe` on one node with `vcpus` vCPUs through `spanvm run`.
pub fn run_probe(probe: &str, vcpus: u32, memory_mib: u64) -> ProbeRun {
    let dir = tempfile::tempdir().unwrap();
    let config = single_node_config(dir.path(), probe, vcpus, memory_mib);
    let output = run_spanvm(
        &["run", "--config", config.to_str().unwrap()],
        &[],
        Duration::from_secs(300),
    );
    let reports = parse_reports(&String::from_utf8_lossy(&output.stdout));
    ProbeRun { output, reports }
}

/// Free loopback addresses (bound together so they differ, then released).
pub fn free_addrs(n: usize) -> Vec<std::net::SocketAddr> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// A cluster description: `nodes` nodes with `per_node` vCPUs each, running `probe`.
pub fn cluster_text(
    nodes: usize,
    per_node: usize,
    probe: &str,
    arg: u64,
    memory_mib: u64,
) -> String {
    cluster_text_on(&free_addrs(nodes), per_node, probe, arg, memory_mib)
}

/// Like [`cluster_text`], with node `i` listening on `addrs[i]`.
pub fn cluster_text_on(
    addrs: &[std::net::SocketAddr],
    per_node: usize,
    probe: &str,
    arg: u64,
    memory_mib: u64,
) -> String {
    let nodes = addrs.len();
    let mut text = format!(
        "[guest]\nvcpus = {}\nmemory_mib = {memory_mib}\nprobe = \"{probe}\"\nprobe_arg = {arg}\n",
        nodes * per_node
    );
    for (i, addr) in addrs.iter().enumerate() {
        let vcpus: Vec<String> = (i * per_node..(i + 1) * per_node)
            .map(|v| v.to_string())
            .collect();
        text.push_str(&format!(
            "\n[[nodes]]\nid = {i}\naddress = \"{addr}\"\nvcpus = [{}]\n",
            vcpus.join(", ")
        ));
    }
    text
}

/// Runs a cluster description through `spanvm cluster`.
pub fn run_cluster(text: &str) -> ProbeRun {
    run_cluster_with_env(text, &[])
}

/// Like [`run_cluster`], with extra environment for every node (the test hooks).
pub fn run_cluster_with_env(text: &str, env: &[(&str, &str)]) -> ProbeRun {
    run_cluster_wrapped(&[], text, env)
}

/// Like [`run_cluster_with_env`], with `spanvm` run through `wrapper` (e.g. `ip netns exec
/// NAME`).
pub fn run_cluster_wrapped(wrapper: &[&str], text: &str, env: &[(&str, &str)]) -> ProbeRun {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, text).unwrap();
    let output = run_spanvm_wrapped(
        wrapper,
        &[
            "cluster",
            "--config",
            config.to_str().unwrap(),
            "--dir",
            dir.path().to_str().unwrap(),
        ],
        env,
        Duration::from_secs(600),
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stripped: String = stdout
        .lines()
        .map(|l| match l.strip_prefix("[node ") {
            Some(rest) => rest.split_once("] ").map(|(_, r)| r).unwrap_or(rest),
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    ProbeRun {
        reports: parse_reports(&stripped),
        output,
    }
}

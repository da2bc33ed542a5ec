//! Node processes started one by one (`spanvm node`), for tests that kill, freeze or cut off
//! one of them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::spanvm_through;

/// One node process; killed on drop if it still runs, however the test ends.
pub struct Node {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Node {
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
    /// Waits for the exit at most `limit`; returns the exit code and when it came.
    pub fn wait(&mut self, limit: Duration) -> (Option<i32>, Instant) {
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

/// A 32-byte secret file of `byte`s.
pub fn write_secret(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, [byte; 32]).unwrap();
    p
}

/// The config file of node `id` of `cluster` (a cluster description).
pub fn node_file(dir: &Path, id: usize, secret: &Path, cluster: &str) -> PathBuf {
    let p = dir.join(format!("node-{id}.toml"));
    std::fs::write(
        &p,
        format!("node = {id}\nsecret = \"{}\"\n{cluster}", secret.display()),
    )
    .unwrap();
    p
}

/// Starts node `id` from `config`, its output in `dir`.
pub fn start(dir: &Path, id: usize, config: &Path, env: &[(&str, &str)]) -> Node {
    start_wrapped(&[], dir, id, config, env)
}

/// Like [`start`], run through `wrapper` (e.g. `ip netns exec NAME`, which execs, so the
/// child's pid is the node's).
pub fn start_wrapped(
    wrapper: &[&str],
    dir: &Path,
    id: usize,
    config: &Path,
    env: &[(&str, &str)],
) -> Node {
    let stdout = dir.join(format!("node-{id}.out"));
    let stderr = dir.join(format!("node-{id}.err"));
    let mut cmd = spanvm_through(wrapper);
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
pub fn start_probe_cluster(
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

/// Waits until every node says it runs its vCPUs.
pub fn wait_until_running(nodes: &[Node]) {
    let start = Instant::now();
    while !nodes.iter().all(|n| n.stderr().contains("running")) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nodes did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to `node`.
pub fn signal(node: &Node, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(libc::pid_t::try_from(node.child.id()).unwrap(), sig) };
    assert_eq!(rc, 0, "kill({sig})");
}

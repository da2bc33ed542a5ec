//! A network namespace that a test makes and removes, with its own loopback: nodes listen on
//! `127.0.0.x` inside it, and links between them are degraded (nftables drop rules, `tc
//! netem`) without touching the host's network. Nothing is sent outside the namespace.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The namespace; deleted on drop (processes still inside keep it alive until they end, so
/// drop the nodes first: declare the namespace before them).
pub struct NetNs {
    name: String,
}

/// The nftables table every fault rule of a test goes into.
const TABLE: &str = "spanvm_faults";

impl NetNs {
    /// Makes a fresh namespace with its loopback up. Fails the test loudly when that is not
    /// possible here (it needs root and iproute2: `scripts/setup.sh` installs it).
    pub fn new() -> NetNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "spanvm-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let added = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(
            added.status.success(),
            "cannot make network namespace {name} (the network-fault tests need root and \
             iproute2; run scripts/setup.sh): {}",
            String::from_utf8_lossy(&added.stderr)
        );
        let ns = NetNs { name };
        ns.must(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Its name (a file in `/run/netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME`: a prefix that runs a command inside (it execs the command, so a
    /// child's pid is the command's).
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// `node` listens on `127.0.0.<node + 1>:7400` inside the namespace.
    pub fn node_addrs(&self, nodes: usize) -> Vec<SocketAddr> {
        (0..nodes)
            .map(|i| SocketAddr::from(([127, 0, 0, u8::try_from(i + 1).unwrap()], 7400)))
            .collect()
    }

    /// Runs `args` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    fn must(&self, args: &[&str]) {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "`{}` in {} failed: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Loads an nftables script inside the namespace.
    fn nft(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run nft (scripts/setup.sh installs nftables)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft refused:\n{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Drops `per_mille` of all TCP segments leaving any socket in the namespace, at random
    /// (replacing earlier fault rules).
    pub fn lose_segments(&self, per_mille: u32) {
        self.set_rules(&format!(
            "meta l4proto tcp numgen random mod 1000 < {per_mille} counter drop"
        ));
    }

    /// Segments the fault rules dropped so far (their `counter`s), to show a test's faults
    /// really happened.
    pub fn dropped_packets(&self) -> u64 {
        let out = self.exec(&["nft", "list", "table", "inet", TABLE]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("packets ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Drops everything between `a` and `b` in both directions (replacing earlier rules).
    pub fn partition(&self, a: SocketAddr, b: SocketAddr) {
        let (a, b) = (a.ip(), b.ip());
        self.set_rules(&format!(
            "ip saddr {a} ip daddr {b} counter drop\n    ip saddr {b} ip daddr {a} counter drop"
        ));
    }

    fn set_rules(&self, rules: &str) {
        self.nft(&format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n  chain \
             out {{\n    type filter hook output priority 0; policy accept;\n    {rules}\n  \
             }}\n}}\n"
        ));
    }

    /// Limits the namespace's loopback to `rate` with a token bucket (`tc tbf`): a slow link,
    /// where a page takes its serialisation time and a burst queues behind it (up to
    /// `latency`, past which packets are dropped). Replaces an earlier qdisc.
    pub fn rate_limit(&self, rate: &str, burst: &str, latency: &str) {
        self.must(&[
            "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate, "burst", burst,
            "latency", latency,
        ]);
    }

    /// How often the loopback's qdisc held packets back (`overlimits` of `tc -s qdisc`), to
    /// show that a rate limit really throttled the traffic.
    pub fn qdisc_overlimits(&self) -> u64 {
        let out = self.exec(&["tc", "-s", "qdisc", "show", "dev", "lo"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("overlimits ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Whether `tc netem` works here (the host kernel may lack `sch_netem`).
    pub fn has_netem(&self) -> bool {
        let added = self.exec(&[
            "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms",
        ]);
        let works = added.status.success();
        if works {
            self.must(&["tc", "qdisc", "del", "dev", "lo", "root"]);
        }
        works
    }

    /// Delays every packet on the namespace's loopback by `delay` ± `jitter` and loses
    /// `loss_percent` of them (`tc netem`), replacing an earlier setting.
    pub fn netem(&self, delay: &str, jitter: &str, loss_percent: &str) {
        let _ = self.exec(&["tc", "qdisc", "del", "dev", "lo", "root"]);
        self.must(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "netem",
            "delay",
            delay,
            jitter,
            "loss",
            loss_percent,
        ]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let deleted = run(Command::new("ip").args(["netns", "del", &self.name]));
        if !deleted.status.success() {
            eprintln!(
                "could not delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&deleted.stderr)
            );
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .expect("cannot run ip (scripts/setup.sh installs iproute2)")
}

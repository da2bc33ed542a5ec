//! `spanvm bench boot`: time to each boot milestone of a Linux guest (first console line,
//! "Memory:", the clocksource switch, "Run /init", the workload's end marker) for the minimal
//! kernel and the stock Debian cloud kernel built by `images/build.sh`, each run as a real
//! `spanvm run` child with 2 vCPUs. Where `qemu-system-x86_64` can use hardware KVM (a VT-x
//! host), the same images boot under QEMU in the same run as the anchor; on a `kvm_pvm` host
//! that anchor cannot run and the table says so.
//!
//! A second table boots the minimal kernel on one node with 2 and 4 vCPUs and on 2 and 4 nodes
//! with 1 vCPU each (`spanvm cluster`, real node processes on loopback), running sysbench cpu on
//! every CPU, with its events per second: the cost of spreading one guest over nodes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::commands::CommandError;
use crate::hypervisor::Hypervisor;

const MILESTONES: [(&str, &str); 5] = [
    ("first line", ""),
    ("Memory:", "Memory:"),
    ("clocksource", "clocksource: Switched to clocksource"),
    ("Run /init", "Run /init"),
    ("workload done", "SPANVM-END"),
];
const RUN: &str = "sysbench+cpu+--threads=2+--time=2+run";
const LIMIT: Duration = Duration::from_secs(1200);

pub(super) fn images_dir() -> PathBuf {
    std::env::var_os("SPANVM_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

/// Reads `cmd`'s stdout line by line and notes when each milestone first shows.
fn time_milestones(
    cmd: Command,
    console_log: &Path,
) -> Result<Vec<Option<Duration>>, CommandError> {
    Ok(time_milestones_and_rate(cmd, console_log)?.0)
}

/// Like [`time_milestones`], also returning sysbench's "events per second" if it printed one.
pub(super) fn time_milestones_and_rate(
    mut cmd: Command,
    console_log: &Path,
) -> Result<(Vec<Option<Duration>>, Option<f64>), CommandError> {
    use std::io::Write;
    let mut log = std::fs::File::create(console_log)
        .map_err(|e| CommandError::Bench(format!("{}: {e}", console_log.display())))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| CommandError::Bench(format!("cannot start {cmd:?}: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CommandError::Bench("no stdout".into()))?;
    let mut seen: Vec<Option<Duration>> = vec![None; MILESTONES.len()];
    let mut rate = None;
    for line in BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line);
        if let Some((_, v)) = text.split_once("events per second:") {
            rate = rate.or(v.trim().parse::<f64>().ok());
        }
        let _ = writeln!(log, "{:>9.3} {text}", start.elapsed().as_secs_f64());
        for (i, (_, needle)) in MILESTONES.iter().enumerate() {
            if seen[i].is_none() && (needle.is_empty() || text.contains(needle)) {
                seen[i] = Some(start.elapsed());
            }
        }
        if seen.iter().all(Option::is_some) || start.elapsed() > LIMIT {
            break;
        }
    }
    // The guest powers off right after its end marker: let the nodes finish (their control
    // sockets and namespaces go with a clean exit), killing them only if they linger.
    let deadline = Instant::now() + EXIT_GRACE;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok((seen, rate))
}

/// How long a guest that printed its end marker may take to power off and its nodes to exit.
const EXIT_GRACE: Duration = Duration::from_secs(60);

/// The minimal kernel on `nodes` nodes with `per_node` vCPUs each, sysbench cpu on every CPU.
fn topology_boot(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    nodes: usize,
    per_node: usize,
) -> Result<(Vec<Option<Duration>>, Option<f64>), CommandError> {
    let vcpus = nodes * per_node;
    let run = format!("sysbench+cpu+--threads={vcpus}+--time=5+run");
    let name = format!("topology-{nodes}x{per_node}");
    cluster_boot(
        kernel,
        initrd,
        dir,
        &name,
        (nodes, per_node),
        &run,
        &GuestDevices::default(),
    )
}

/// The virtio devices of a benchmark's guest besides the entropy source.
#[derive(Default)]
pub(super) struct GuestDevices<'a> {
    /// The guest's first disk.
    pub(super) disk: Option<&'a Path>,
    /// A network card on a tap spanvm creates in this namespace; the guest is 10.0.2.15 there.
    pub(super) netns: Option<&'a str>,
}

/// The config of a benchmark's Linux guest: 256 MiB, `kernel` and `initrd`, `/init` running
/// `run` (a `spanvm.run=` value) with `extra` kernel parameters, `devices`, and `nodes` nodes of
/// `per_node` vCPUs on free loopback ports (one node: a node file for `spanvm run`).
pub(super) fn linux_config(
    kernel: &Path,
    initrd: &Path,
    (nodes, per_node): (usize, usize),
    extra: &str,
    run: &str,
    devices: &GuestDevices<'_>,
) -> Result<String, CommandError> {
    let vcpus = nodes * per_node;
    let mut cmdline = String::from("console=ttyS0");
    for param in [
        extra,
        devices.netns.map_or("", |_| super::netns::GUEST_IP_ARG),
    ] {
        if !param.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(param);
        }
    }
    let mut text = if nodes == 1 {
        String::from("node = 0\n")
    } else {
        String::new()
    };
    text.push_str(&format!(
        "[guest]\nvcpus = {vcpus}\nmemory_mib = 256\n[guest.linux]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = '''{cmdline} spanvm.run={run}'''\n",
        kernel.display(),
        initrd.display()
    ));
    if let Some(disk) = devices.disk {
        text.push_str(&format!("[[guest.disk]]\npath = \"{}\"\n", disk.display()));
    }
    if let Some(netns) = devices.netns {
        text.push_str(&format!("[guest.net]\nnetns = \"{netns}\"\n"));
    }
    text.push_str(&super::node_tables(nodes, per_node)?);
    Ok(text)
}

/// Boots `kernel` on `shape.0` nodes with `shape.1` vCPUs each (one node: `spanvm run`,
/// several: `spanvm cluster`), `/init` running `run` (a `spanvm.run=` value), with `devices`.
/// The console goes to `<dir>/<name>.console.log`.
pub(super) fn cluster_boot(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    name: &str,
    (nodes, per_node): (usize, usize),
    run: &str,
    devices: &GuestDevices<'_>,
) -> Result<(Vec<Option<Duration>>, Option<f64>), CommandError> {
    let text = linux_config(kernel, initrd, (nodes, per_node), "", run, devices)?;
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, text)
        .map_err(|e| CommandError::Bench(format!("{}: {e}", config.display())))?;
    let exe = std::env::current_exe().map_err(|e| CommandError::Bench(e.to_string()))?;
    let cmd = super::layout_command(&exe, nodes, &config, &dir.join(name));
    time_milestones_and_rate(cmd, &dir.join(format!("{name}.console.log")))
}

fn spanvm_boot(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
) -> Result<Vec<Option<Duration>>, CommandError> {
    let config = dir.join(format!(
        "{}.toml",
        kernel
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("kernel")
    ));
    let text = format!(
        "node = 0\n[guest]\nvcpus = 2\nmemory_mib = 256\n[guest.linux]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 spanvm.run={RUN}\"\n\n[[nodes]]\nid = 0\naddress = \"127.0.0.1:7960\"\nvcpus = [0, 1]\n",
        kernel.display(),
        initrd.display()
    );
    std::fs::write(&config, text)
        .map_err(|e| CommandError::Bench(format!("{}: {e}", config.display())))?;
    let exe = std::env::current_exe().map_err(|e| CommandError::Bench(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--config").arg(&config);
    time_milestones(cmd, &config.with_extension("console.log"))
}

fn qemu_boot(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
) -> Result<Vec<Option<Duration>>, CommandError> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "2",
        "-m",
        "256",
        "-nographic",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(format!("console=ttyS0 panic=-1 spanvm.run={RUN}"));
    let name = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("kernel");
    time_milestones(cmd, &dir.join(format!("qemu-{name}.console.log")))
}

fn qemu_can_run() -> Option<&'static str> {
    if Hypervisor::is_pvm_host() {
        return Some("not run: this host's KVM is kvm_pvm (no VT-x), where QEMU cannot use KVM");
    }
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    match found {
        Ok(s) if s.success() => None,
        _ => Some("not run: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"),
    }
}

fn row(label: &str, t: &[Option<Duration>]) {
    let cells: Vec<String> = t
        .iter()
        .map(|d| {
            d.map(|d| format!("{:.1}", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into())
        })
        .collect();
    println!(
        "{label:<34} {}",
        cells.iter().map(|c| format!("{c:>15}")).collect::<String>()
    );
}

/// Runs the benchmark and prints the tables (seconds from start); `topology_only` skips the
/// one-node kernel comparison.
pub fn run(topology_only: bool) -> Result<(), CommandError> {
    let dir = images_dir();
    let initrd = dir.join("initramfs.cpio");
    let kernels = [
        ("minimal kernel (vmlinux)", dir.join("minimal.vmlinux")),
        (
            "Debian cloud kernel (vmlinux)",
            dir.join("debian-cloud.vmlinux"),
        ),
    ];
    for p in std::iter::once(&initrd).chain(kernels.iter().map(|(_, p)| p)) {
        if !p.is_file() {
            return Err(CommandError::Bench(format!(
                "{} is missing: run `bash images/build.sh` first",
                p.display()
            )));
        }
    }
    let work = std::env::temp_dir().join(format!("spanvm-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| CommandError::Bench(e.to_string()))?;
    println!(
        "spanvm bench boot: 2 vCPUs, 256 MiB, /init runs `{}`; seconds from start",
        RUN.replace('+', " ")
    );
    println!(
        "{:<34} {}",
        "",
        MILESTONES
            .iter()
            .map(|(m, _)| format!("{m:>15}"))
            .collect::<String>()
    );
    let qemu = qemu_can_run();
    for (label, kernel) in kernels.iter().filter(|_| !topology_only) {
        let t = spanvm_boot(kernel, &initrd, &work)?;
        row(&format!("spanvm: {label}"), &t);
        match qemu {
            None => row(
                &format!("anchor qemu: {label}"),
                &qemu_boot(kernel, &initrd, &work)?,
            ),
            Some(why) => println!("{:<34} {why}", format!("anchor qemu: {label}")),
        }
    }
    let minimal = &kernels[0].1;
    println!();
    println!("minimal kernel, 256 MiB, /init runs `sysbench cpu --threads=<all vCPUs> --time=5 run`; seconds from start");
    println!(
        "{:<34} {}{:>15}",
        "",
        MILESTONES
            .iter()
            .map(|(m, _)| format!("{m:>15}"))
            .collect::<String>(),
        "events/s"
    );
    for (nodes, per_node) in [(1, 2), (2, 1), (1, 4), (4, 1)] {
        let (t, rate) = topology_boot(minimal, &initrd, &work, nodes, per_node)?;
        let label = format!("{nodes} node(s) x {per_node} vCPU(s)");
        print!("{label:<34} ");
        for d in &t {
            let cell = d
                .map(|d| format!("{:.1}", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into());
            print!("{cell:>15}");
        }
        println!(
            "{:>15}",
            rate.map(|r| format!("{r:.1}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("consoles, each line with its time: {}", work.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_configs_name_node_0_and_devices_reach_config_and_command_line() {
        let (k, i) = (Path::new("/k"), Path::new("/i"));
        let one = linux_config(k, i, (1, 2), "", "x", &GuestDevices::default()).unwrap();
        assert!(one.starts_with("node = 0\n[guest]\nvcpus = 2\n"), "{one}");
        assert!(
            one.contains("cmdline = '''console=ttyS0 spanvm.run=x'''"),
            "{one}"
        );
        let disk = Path::new("/d.ext4");
        let two = linux_config(
            k,
            i,
            (2, 1),
            "irqaffinity=0",
            "x",
            &GuestDevices {
                disk: Some(disk),
                netns: Some("ns"),
            },
        )
        .unwrap();
        assert!(!two.contains("node = 0\n[guest]"), "{two}");
        assert!(two.contains(&format!(
            "console=ttyS0 irqaffinity=0 {} spanvm.run=x",
            super::super::netns::GUEST_IP_ARG
        )));
        assert!(
            two.contains("[[guest.disk]]\npath = \"/d.ext4\"\n"),
            "{two}"
        );
        assert!(two.contains("[guest.net]\nnetns = \"ns\"\n"), "{two}");
        assert_eq!(two.matches("[[nodes]]").count(), 2, "{two}");
    }
}

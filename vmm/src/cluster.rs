//! `spanvm cluster`: the one-machine convenience. It turns one cluster description (or the
//! built-in default: 2 nodes x 1 vCPU) into per-node config files, starts every node as a child
//! `spanvm node` process on loopback, shows each node's output with a `[node N]` prefix, and
//! stops them all together.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use resources::{ClusterDescription, ConfigError, GuestImage};

use crate::stats::cluster_watch::ClusterWatch;
use crate::stop::StopReason;
use crate::vm::handle_signals;

/// Guest memory of the default cluster with a probe guest.
pub const DEFAULT_PROBE_MEMORY_MIB: u64 = 64;
/// Guest memory of the default Linux cluster.
pub const DEFAULT_LINUX_MEMORY_MIB: u64 = 256;
/// What the default Linux guest runs: sysbench's cpu and threads tests on both vCPUs.
pub const DEFAULT_WORKLOAD: &str =
    "sysbench cpu --threads=2 --time=5 run; sysbench threads --threads=2 --time=5 run";

/// What `spanvm cluster` runs.
#[derive(Debug, Clone)]
pub enum Guest {
    /// The cluster description in this file.
    Described(PathBuf),
    /// A probe guest by name on the default 2 nodes x 1 vCPU.
    Probe(String),
    /// The built-in default: Linux (the minimal kernel and the initramfs of `images/build.sh`)
    /// on 2 nodes x 1 vCPU running [`DEFAULT_WORKLOAD`].
    DefaultLinux,
}

/// Where `images/build.sh` put the guest images: `$SPANVM_IMAGES_DIR`, else `images/out` under
/// the current directory, else next to the source tree the binary was built in.
fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPANVM_IMAGES_DIR") {
        return PathBuf::from(dir);
    }
    let here = PathBuf::from("images/out");
    if here.is_dir() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out")
}

/// The default Linux guest, or an error that says how to build its images.
fn default_linux() -> Result<GuestImage, ClusterError> {
    let dir = images_dir();
    let kernel = dir.join("minimal.vmlinux");
    let initrd = dir.join("initramfs.cpio");
    for path in [&kernel, &initrd] {
        if !path.is_file() {
            return Err(ClusterError::NoImages {
                missing: path.clone(),
            });
        }
    }
    Ok(GuestImage::Linux {
        kernel,
        initrd: Some(initrd),
        cmdline: format!("console=ttyS0 spanvm.run=\"{DEFAULT_WORKLOAD}\""),
        disks: Vec::new(),
        net: None,
    })
}
/// How long the others may take to stop after one node ended with an error.
const STRAGGLER_GRACE: Duration = Duration::from_secs(5);

/// Errors of `spanvm cluster`.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster description is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something on the local file system failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot write the cluster secret".
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// No free loopback port for the default cluster.
    #[error("cannot find a free loopback port for the nodes: {0}")]
    Ports(std::io::Error),
    /// A node process could not be started.
    #[error("cannot start node {node} ({exe}): {source}")]
    Spawn {
        /// The node whose process failed to start.
        node: usize,
        /// The spanvm executable that was run.
        exe: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    /// The statistics watch could not start.
    #[error(transparent)]
    Watch(#[from] crate::stats::cluster_watch::WatchError),
    /// The default Linux guest's images are not built.
    #[error("the default guest needs {missing}: run `bash images/build.sh` first (or set SPANVM_IMAGES_DIR), or run a probe guest with `spanvm cluster --probe counter`")]
    NoImages {
        /// The first image file that is not there.
        missing: PathBuf,
    },
}

/// Makes the kernel kill the node if this process dies first, even by SIGKILL (which no
/// handler sees): a node left without its cluster parent would spin on, alone. The spawning
/// thread is the main thread, which lives as long as the cluster, as PR_SET_PDEATHSIG needs.
pub(crate) fn die_with_this_process(node: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and only makes two
    // async-signal-safe system calls (prctl, getppid) on plain integers.
    unsafe {
        node.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the request took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "spanvm cluster exited while starting it",
                ));
            }
            Ok(())
        })
    };
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError {
    let path = path.to_path_buf();
    move |source| ClusterError::Io { what, path, source }
}

fn free_loopback_ports(n: usize) -> Result<Vec<SocketAddr>, ClusterError> {
    // Bind them all at once so they differ, then release them for the nodes.
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ClusterError::Ports)?;
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(ClusterError::Ports))
        .collect()
}

fn write_secret(path: &Path) -> Result<(), ClusterError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err(
            "cannot read randomness from",
            Path::new("/dev/urandom"),
        ))?;
    std::fs::write(path, bytes).map_err(io_err("cannot write the cluster secret", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot restrict the cluster secret", path))
}

/// Copies a child's output to ours, line by line, with its node's prefix.
fn relay(
    node: usize,
    from: impl Read + Send + 'static,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "[node {node}] {text}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[node {node}] {text}");
            }
        }
    })
}

/// Runs the cluster of `config` (or the default) until every node has stopped; returns the
/// reason the guest stopped, judged from the nodes' exit codes.
/// With `stats_interval`, prints a statistics line per node at that interval (see
/// `crate::stats::cluster_watch`).
pub fn run(
    guest: Guest,
    dir: Option<&Path>,
    stats_interval: Option<Duration>,
) -> Result<StopReason, ClusterError> {
    let desc = match guest {
        Guest::Described(path) => ClusterDescription::load(&path)?,
        Guest::Probe(name) => ClusterDescription::default_cluster(
            GuestImage::Probe { name, arg: 0 },
            DEFAULT_PROBE_MEMORY_MIB,
            &free_loopback_ports(2)?,
        ),
        Guest::DefaultLinux => ClusterDescription::default_cluster(
            default_linux()?,
            DEFAULT_LINUX_MEMORY_MIB,
            &free_loopback_ports(2)?,
        ),
    };
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("spanvm-cluster-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create the node directory", &dir))?;
    let secret = match &desc.secret_path {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("cluster.secret");
            write_secret(&p)?;
            p
        }
    };
    let exe = std::env::current_exe().map_err(io_err(
        "cannot find the spanvm binary",
        Path::new("/proc/self/exe"),
    ))?;
    let mut files = Vec::new();
    for id in 0..desc.node_count() {
        let path = dir.join(format!("node-{id}.toml"));
        std::fs::write(&path, desc.render_node_file(id, &secret))
            .map_err(io_err("cannot write the node config", &path))?;
        files.push(path);
    }
    eprintln!(
        "spanvm cluster: {} nodes, configs in {}",
        files.len(),
        dir.display()
    );

    let children: Arc<Mutex<Vec<Child>>> = Arc::new(Mutex::new(Vec::new()));
    let signalled = children.clone();
    handle_signals(move |sig| {
        // SIGUSR1 asks every node for its statistics; SIGINT and SIGTERM stop them all.
        let to_children = if sig == libc::SIGUSR1 {
            libc::SIGUSR1
        } else {
            libc::SIGTERM
        };
        for c in signalled.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: kill(2) on a child we started and have not reaped yet.
                unsafe { libc::kill(pid, to_children) };
            }
        }
    })
    .map_err(ClusterError::Signals)?;

    // What the user types goes to the guest's console character by character.
    let _terminal = crate::console::TerminalGuard::new();
    let mut relays = Vec::new();
    for (id, file) in files.iter().enumerate() {
        // The console (and so the user's typing) belongs to the master.
        let stdin = if id == 0 {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut node = Command::new(&exe);
        node.arg("node")
            .arg("--config")
            .arg(file)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_this_process(&mut node);
        let mut child = node.spawn().map_err(|source| ClusterError::Spawn {
            node: id,
            exe: exe.clone(),
            source,
        })?;
        if let Some(mut input) = child.stdin.take() {
            // Daemon thread: it ends with the process (a read of our stdin cannot be undone).
            let _ = std::thread::Builder::new()
                .name("stdin-relay".into())
                .spawn(move || {
                    let mut buf = [0u8; 256];
                    let mut ours = std::io::stdin().lock();
                    while let Ok(n) = ours.read(&mut buf) {
                        if n == 0 || input.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let _ = input.flush();
                    }
                });
        }
        if let Some(out) = child.stdout.take() {
            relays.push(relay(id, out, false));
        }
        if let Some(err) = child.stderr.take() {
            relays.push(relay(id, err, true));
        }
        children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
    }

    // Started after handle_signals, like every thread here; stopped when the nodes are done.
    let watch = match stats_interval {
        Some(every) => Some(ClusterWatch::start(files.clone(), every)?),
        None => None,
    };

    // Wait for every node; once one fails, the others get a grace period, then are killed.
    let mut codes: Vec<Option<i32>> = vec![None; files.len()];
    let mut first_failure: Option<Instant> = None;
    while codes.iter().any(Option::is_none) {
        {
            let mut kids = children.lock().unwrap_or_else(|p| p.into_inner());
            for (i, c) in kids.iter_mut().enumerate() {
                if codes[i].is_none() {
                    if let Ok(Some(status)) = c.try_wait() {
                        let code = status.code().unwrap_or(128 + 9);
                        codes[i] = Some(code);
                        if code != 0 && first_failure.is_none() {
                            first_failure = Some(Instant::now());
                        }
                    }
                }
            }
            if first_failure.is_some_and(|t| t.elapsed() > STRAGGLER_GRACE) {
                for (i, c) in kids.iter_mut().enumerate() {
                    if codes[i].is_none() {
                        eprintln!("spanvm cluster: node {i} did not stop; killing it");
                        let _ = c.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(watch);
    for r in relays {
        let _ = r.join();
    }
    let summary: Vec<String> = codes
        .iter()
        .enumerate()
        .map(|(i, c)| format!("node {i}: {}", c.unwrap_or(-1)))
        .collect();
    eprintln!("spanvm cluster: exit codes {}", summary.join(", "));
    // The master's code says what happened to the guest; a node that died says more.
    let worst = codes
        .iter()
        .flatten()
        .copied()
        .find(|&c| c != 0 && c != 5)
        .or_else(|| codes.iter().flatten().copied().find(|&c| c != 0))
        .unwrap_or(0);
    Ok(match worst {
        0 => StopReason::PowerOff,
        3 => StopReason::Reset("a node reported a guest reset".into()),
        4 => StopReason::ProbeFailed { vcpu: 0, status: 1 },
        5 => StopReason::PeerLost("a node lost its peer".into()),
        6 => StopReason::MemoryFailed("a node (see its output)".into()),
        130 => StopReason::Interrupted,
        c => StopReason::Error(format!("a node exited with code {c}")),
    })
}

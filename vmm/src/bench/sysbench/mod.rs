//! `spanvm bench sysbench`: GiantVM's sysbench and stress-ng evaluation (seed paper, sections
//! 5.2 and 5.3) on spanvm, each multi-node layout against the same guest on one node
//! measured in the same run.
//!
//! For every layout (`AxB`: A node processes with B vCPUs each, on loopback) the minimal kernel
//! boots once with `initramfs-bench.cpio` (the initramfs plus stress-ng) and its `/init` runs
//! every workload in turn between markers (see [`workload`]). The host reads the console as it
//! comes: each workload's figure is parsed from its output, and the nodes' DSM and forwarding
//! counters are read from their control sockets (see [`figures::node_figures`]) when sysbench
//! says "Threads started!"
//! (stress-ng "dispatching hogs") and at its next line, so that a workload's figures cover its
//! measured run and not the seconds the guest spends loading the program. The results go to
//! one directory: the table (also on stdout), `results.csv`, `ratios.svg` and `ratios.png`,
//! `summary.md`, and each boot's console and node output.

pub mod figures;
pub mod layout;
pub mod plot;
pub mod report;
pub mod symbols;
pub mod workload;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::commands::CommandError;
use figures::{node_figures, Delta, NodeFigures, StatsSource};
use layout::{Layout, LayoutError};
use report::{HotPage, Outcome, Results, Row};
use symbols::KernelSymbols;
use workload::{Durations, Marker, Workload};

/// How long a guest may take to reach `/init` (boots take 2-5 minutes on a quiet kvm_pvm host,
/// much longer on a busy one).
const BOOT_LIMIT: Duration = Duration::from_secs(1800);
/// Guest memory.
/// The guest's memory (what `boot::linux_config` gives every benchmark guest).
const MEMORY_MIB: u64 = 256;
/// How many most-faulted pages each node lists (`SPANVM_DSM_HOT_PAGES`).
const HOT_PAGES: usize = 256;

/// Why the benchmark could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum SysbenchError {
    /// `--layouts` is unusable.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// `--workloads` names a workload this run does not have.
    #[error(transparent)]
    Workloads(#[from] workload::SelectionError),
    /// A guest image is not built.
    #[error("{0} is missing: run `bash images/build.sh` first (or set SPANVM_IMAGES_DIR)")]
    MissingImage(PathBuf),
    /// Something on the local file system failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A guest could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was started.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Results could not be written.
    #[error(transparent)]
    Report(#[from] report::ReportError),
    /// The plot could not be made.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    /// Some workloads have no figure (the results are written all the same).
    #[error("{failed} of {rows} workload runs have no figure (see the table and {dir})")]
    Incomplete {
        /// Rows without a figure.
        failed: usize,
        /// All rows.
        rows: usize,
        /// The results directory.
        dir: PathBuf,
    },
}

impl From<SysbenchError> for CommandError {
    fn from(e: SysbenchError) -> CommandError {
        CommandError::Bench(e.to_string())
    }
}

/// What `spanvm bench sysbench` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--layouts`, as given.
    pub layouts: String,
    /// `--quick`: the shortest durations and a smaller set of workloads.
    pub quick: bool,
    /// `--out`: where the results go (default: a fresh directory under the temp dir).
    pub out: Option<PathBuf>,
    /// `--disk`: an ext4 image whose copy the fileio workloads use (none: no fileio).
    pub disk: Option<PathBuf>,
    /// `--workloads`: only these, by name, comma-separated (none: all of the run).
    pub workloads: Option<String>,
}

/// The images a run boots.
struct Images {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn images() -> Result<Images, SysbenchError> {
    let dir = super::boot::images_dir();
    let images = Images {
        kernel: dir.join("minimal.vmlinux"),
        initrd: dir.join("initramfs-bench.cpio"),
    };
    for p in [&images.kernel, &images.initrd] {
        if !p.is_file() {
            return Err(SysbenchError::MissingImage(p.clone()));
        }
    }
    Ok(images)
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SysbenchError {
    let path = path.to_path_buf();
    move |source| SysbenchError::Io { what, path, source }
}

/// The results directory: `--out` (created if needed), else a fresh one under the temp dir.
fn out_dir(asked: Option<&Path>) -> Result<PathBuf, SysbenchError> {
    if let Some(dir) = asked {
        std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        return Ok(dir.to_path_buf());
    }
    let base = std::env::temp_dir();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for n in 0..100 {
        let dir = base.join(format!(
            "spanvm-bench-sysbench-{stamp}-{}-{n}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("cannot create", &dir)(e)),
        }
    }
    Err(io_err("cannot create a fresh directory in", &base)(
        std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    ))
}

/// One progress line on stderr, with the time since the run began.
fn progress(start: Instant, text: &str) {
    eprintln!(
        "[bench sysbench {:>7.1} s] {text}",
        start.elapsed().as_secs_f64()
    );
}

/// A started guest (a `spanvm run` or `spanvm cluster` child): killed and reaped on drop, on
/// every path.
struct GuestProcess {
    child: Child,
    done: Arc<AtomicBool>,
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        // A guest that powered off has exited already; otherwise it is stopped here (its nodes
        // die with it: PR_SET_PDEATHSIG).
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a boot of one layout needs.
struct Boot<'a> {
    layout: Layout,
    images: &'a Images,
    workloads: &'a [Workload],
    durations: Durations,
    disk: Option<&'a Path>,
    dir: &'a Path,
    symbols: Option<&'a KernelSymbols>,
    start: Instant,
}

/// The cluster description of a boot.
fn describe(boot: &Boot<'_>, run: &str, disk: Option<&Path>) -> Result<String, SysbenchError> {
    super::boot::linux_config(
        &boot.images.kernel,
        &boot.images.initrd,
        (boot.layout.nodes, boot.layout.per_node),
        "irqaffinity=0",
        run,
        &super::boot::GuestDevices { disk, netns: None },
    )
    .map_err(|e| SysbenchError::Spawn {
        what: "the nodes (no loopback port)".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Starts the guest of `boot`; returns the process and where its nodes' statistics arrive.
fn start_guest(
    boot: &Boot<'_>,
) -> Result<(GuestProcess, StatsSource, std::process::ChildStdout), SysbenchError> {
    let name = boot.layout.to_string();
    let vcpus = boot.layout.vcpus();
    let run = workload::guest_run(boot.workloads, vcpus, boot.durations);
    std::fs::write(boot.dir.join(format!("{name}.guest-run.txt")), &run)
        .map_err(io_err("cannot write", boot.dir))?;
    let disk = match boot.disk {
        Some(image) => {
            let copy = boot.dir.join(format!("{name}.disk.ext4"));
            std::fs::copy(image, &copy).map_err(io_err("cannot copy the disk image", image))?;
            Some(copy)
        }
        None => None,
    };
    let config = boot.dir.join(format!("{name}.toml"));
    std::fs::write(&config, describe(boot, &run, disk.as_deref())?)
        .map_err(io_err("cannot write", &config))?;
    let exe = std::env::current_exe().map_err(io_err(
        "cannot find the spanvm binary",
        Path::new("/proc/self/exe"),
    ))?;
    let mut cmd = super::layout_command(
        &exe,
        boot.layout.nodes,
        &config,
        &boot.dir.join(format!("{name}.nodes")),
    );
    // The nodes list their most-faulted pages since boot: enough of them that a page hot in one
    // workload makes the list.
    cmd.env("SPANVM_DSM_HOT_PAGES", HOT_PAGES.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::cluster::die_with_this_process(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| SysbenchError::Spawn {
        what: format!("the {name} guest"),
        source,
    })?;
    let done = Arc::new(AtomicBool::new(false));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // Each node's control socket sits next to its config file: the one config of a single
    // node, the files `spanvm cluster` writes into its --dir for several.
    let configs = if boot.layout.nodes == 1 {
        vec![config.clone()]
    } else {
        (0..boot.layout.nodes)
            .map(|i| {
                boot.dir
                    .join(format!("{name}.nodes"))
                    .join(format!("node-{i}.toml"))
            })
            .collect()
    };
    let source = StatsSource { configs };
    let guest = GuestProcess { child, done };
    let Some(stdout) = stdout else {
        return Err(SysbenchError::Spawn {
            what: format!("the {name} guest (no stdout)"),
            source: std::io::Error::other("stdout not piped"),
        });
    };
    // What the nodes print on stderr, to a log file.
    let log = boot.dir.join(format!("{name}.nodes.log"));
    let mut log = std::fs::File::create(&log).map_err(io_err("cannot create", &log))?;
    if let Some(stderr) = stderr {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{}", String::from_utf8_lossy(&line));
            }
        });
    }
    Ok((guest, source, stdout))
}

/// Kills the guest past `limit` (the console reader then sees the end of its output).
fn watchdog(guest: &GuestProcess, limit: Duration) {
    let done = guest.done.clone();
    let Ok(pid) = libc::pid_t::try_from(guest.child.id()) else {
        return;
    };
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !done.load(Ordering::SeqCst) {
            // SAFETY: kill(2) on our child, which is not reaped before `done` is set (the
            // guard sets it first, then kills and waits).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
}

/// The workload running now, as its console lines come.
struct Running {
    index: usize,
    started: Instant,
    text: String,
    begin: Option<NodeFigures>,
    end: Option<NodeFigures>,
}

/// A snapshot, or none (with a line saying why) if the nodes did not answer.
fn snapshot(source: &StatsSource, start: Instant, what: &str) -> Option<NodeFigures> {
    match node_figures(source) {
        Ok(f) => Some(f),
        Err(e) => {
            progress(start, &format!("{what}: no DSM figures: {e}"));
            None
        }
    }
}

/// The most-faulted pages of an interval, named.
fn hot_pages(delta: &Delta, symbols: Option<&KernelSymbols>) -> Vec<HotPage> {
    delta
        .top_pages
        .iter()
        .take(report::TOP_PAGES)
        .map(|&(gpa, faults, exact)| HotPage {
            gpa,
            faults,
            exact,
            owner: symbols.map_or_else(|| "?".to_string(), |s| s.describe(gpa)),
        })
        .collect()
}

/// Boots one layout and runs every workload in it; returns a row per workload and the seconds
/// the guest took to reach `/init`.
fn run_layout(boot: &Boot<'_>) -> Result<(Vec<Row>, Option<f64>), SysbenchError> {
    let name = boot.layout.to_string();
    let limit = BOOT_LIMIT
        + Duration::from_secs(u64::from(boot.durations.limit_seconds))
            * u32::try_from(boot.workloads.len()).unwrap_or(u32::MAX);
    let booted = Instant::now();
    let (guest, source, stdout) = start_guest(boot)?;
    watchdog(&guest, limit);
    let console = boot.dir.join(format!("{name}.console.log"));
    let mut log = std::fs::File::create(&console).map_err(io_err("cannot create", &console))?;
    let mut rows: Vec<Option<Row>> = vec![None; boot.workloads.len()];
    let mut running: Option<Running> = None;
    let mut init_started: Option<f64> = None;
    let mut why_stopped = format!(
        "the guest stopped before it (console: {})",
        console.display()
    );
    for line in BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        let raw = String::from_utf8_lossy(&line);
        let text = workload::strip_node_prefix(&raw).trim_end_matches('\r');
        let _ = writeln!(log, "{:>9.3} {raw}", booted.elapsed().as_secs_f64());
        match workload::marker(text) {
            Marker::InitStarted => {
                let up = booted.elapsed().as_secs_f64();
                init_started = Some(up);
                progress(
                    boot.start,
                    &format!(
                        "{name}: guest up ({} x {} vCPU), /init started {up:.1} s after boot",
                        boot.layout.nodes, boot.layout.per_node
                    ),
                );
            }
            Marker::Begin(w) => {
                running = boot
                    .workloads
                    .iter()
                    .position(|x| x.name == w)
                    .map(|index| Running {
                        index,
                        started: Instant::now(),
                        text: String::new(),
                        begin: None,
                        end: None,
                    });
            }
            Marker::End(w, status) => {
                if let Some(mut r) = running.take().filter(|r| boot.workloads[r.index].name == w) {
                    if r.begin.is_some() && r.end.is_none() {
                        r.end = snapshot(&source, boot.start, &w);
                    }
                    let row = finish(boot, &r, status);
                    progress(boot.start, &progress_line(&row, r.started.elapsed()));
                    rows[r.index] = Some(row);
                }
            }
            Marker::Skip(what) => {
                for (i, w) in boot.workloads.iter().enumerate() {
                    if w.name.starts_with(&what) && rows[i].is_none() {
                        rows[i] = Some(failed_row(
                            boot,
                            w,
                            "the guest could not mount the data disk",
                        ));
                    }
                }
            }
            Marker::InitDone => {
                why_stopped = "the guest's /init ended before it".into();
                break;
            }
            Marker::Text => {
                if let Some(r) = running.as_mut() {
                    r.text.push_str(text);
                    r.text.push('\n');
                    let starts =
                        text.contains("Threads started!") || text.contains("dispatching hogs");
                    if r.begin.is_none() && starts {
                        r.begin = snapshot(&source, boot.start, &boot.workloads[r.index].name);
                    } else if r.begin.is_some()
                        && r.end.is_none()
                        && !text.trim().is_empty()
                        && !starts
                    {
                        r.end = snapshot(&source, boot.start, &boot.workloads[r.index].name);
                    }
                }
            }
        }
    }
    if init_started.is_none() {
        why_stopped = format!(
            "the guest did not reach /init (limit {} s; console: {})",
            limit.as_secs(),
            console.display()
        );
    }
    drop(guest);
    let rows = rows
        .into_iter()
        .zip(boot.workloads)
        .map(|(row, w)| row.unwrap_or_else(|| failed_row(boot, w, &why_stopped)))
        .collect();
    Ok((rows, init_started))
}

fn failed_row(boot: &Boot<'_>, w: &Workload, why: &str) -> Row {
    Row {
        workload: w.clone(),
        layout: boot.layout,
        outcome: Outcome::Failed(why.to_string()),
        delta: Delta::default(),
        hot_pages: Vec::new(),
    }
}

/// The row of a workload whose end marker came with `status`.
fn finish(boot: &Boot<'_>, r: &Running, status: i32) -> Row {
    let w = &boot.workloads[r.index];
    let outcome = if status != 0 {
        let killed = if status == 137 {
            format!(" (killed after {} s)", boot.durations.limit_seconds)
        } else {
            String::new()
        };
        let last = r
            .text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Outcome::Failed(format!(
            "exit status {status}{killed}; last line: {}",
            last.trim()
        ))
    } else {
        match workload::parse_output(w, &r.text, boot.durations) {
            Ok(m) => Outcome::Done(m),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    };
    let delta = match (&r.begin, &r.end) {
        (Some(b), Some(e)) => Delta::between(b, e, HOT_PAGES),
        _ => Delta::default(),
    };
    let hot_pages = hot_pages(&delta, boot.symbols);
    Row {
        workload: w.clone(),
        layout: boot.layout,
        outcome,
        delta,
        hot_pages,
    }
}

fn progress_line(row: &Row, took: Duration) -> String {
    let figure = match &row.outcome {
        Outcome::Done(m) => format!(
            "{:.2} {}{}",
            m.value,
            row.workload.unit(),
            m.p95_ms
                .map(|p| format!(", p95 {p:.2} ms"))
                .unwrap_or_default()
        ),
        Outcome::Failed(why) => format!("FAILED: {why}"),
    };
    let dsm = if row.layout.nodes > 1 {
        let d = &row.delta;
        format!(", {:.0} DSM faults/s", d.per_second(d.faults))
    } else {
        String::new()
    };
    format!(
        "{} {}: {figure}{dsm} ({:.1} s with the program's start-up)",
        row.layout,
        row.workload.name,
        took.as_secs_f64()
    )
}

/// Runs the benchmark; prints the table and the goals, and writes every result file.
pub fn run(opts: &Options) -> Result<(), SysbenchError> {
    let start = Instant::now();
    let asked = layout::parse_layouts(&opts.layouts)?;
    let order = layout::boot_order(&asked);
    let images = images()?;
    if let Some(disk) = &opts.disk {
        if !disk.is_file() {
            return Err(SysbenchError::MissingImage(disk.clone()));
        }
    }
    let dir = out_dir(opts.out.as_deref())?;
    let symbols = match KernelSymbols::load(&images.kernel) {
        Ok(s) => Some(s),
        Err(e) => {
            progress(
                start,
                &format!("pages are shown without kernel symbols: {e}"),
            );
            None
        }
    };
    let durations = if opts.quick {
        Durations::QUICK
    } else {
        Durations::FULL
    };
    let mut workloads = workload::workloads(opts.quick, opts.disk.is_some());
    if let Some(names) = &opts.workloads {
        workloads = workload::select(workloads, names)?;
    }
    let shown: Vec<String> = order.iter().map(ToString::to_string).collect();
    progress(
        start,
        &format!(
            "{} boots ({}), {} workloads each, {} s runs; results in {}",
            order.len(),
            shown.join(", "),
            workloads.len(),
            durations.seconds,
            dir.display()
        ),
    );
    let mut results = Results::default();
    for &layout in &order {
        let boot = Boot {
            layout,
            images: &images,
            workloads: &workloads,
            durations,
            disk: opts.disk.as_deref(),
            dir: &dir,
            symbols: symbols.as_ref(),
            start,
        };
        progress(
            start,
            &format!(
                "{layout}: booting {} node(s) x {} vCPU(s)",
                layout.nodes, layout.per_node
            ),
        );
        let (rows, up) = run_layout(&boot)?;
        results.rows.extend(rows);
        results.boots.push((layout, up));
    }
    let how = format!(
        "Layouts {} (each multi-node layout with its `1xN` baseline); {} workloads per boot, \
         {} s runs{}, seed {}; minimal kernel, {MEMORY_MIB} MiB, `irqaffinity=0`; {:.0} s in all.",
        shown.join(", "),
        workloads.len(),
        durations.seconds,
        if opts.quick { " (--quick)" } else { "" },
        workload::SEED,
        start.elapsed().as_secs_f64()
    );
    let table = report::table(&results);
    let goals = report::goals(&results);
    println!("spanvm bench sysbench: {how}");
    println!("figure: events/s, MiB/s, locks/s or bogo ops/s; ratio: to the 1xN baseline of this run; DSM and forwarding figures per second of the measured run, all nodes (zero on one node: no DSM)");
    print!("{table}");
    println!();
    print!("{goals}");
    let boots = report::boot_times(&results);
    print!("{boots}");
    report::write(&dir, "table.txt", &format!("{table}\n{goals}{boots}"))?;
    report::write(&dir, "results.csv", &report::csv(&results))?;
    report::write(&dir, "summary.md", &report::summary(&results, &how))?;
    let (svg, png) = plot::write(&results, "spanvm bench sysbench", &dir)?;
    println!(
        "results: {} (results.csv, summary.md, {}, {}, consoles and node logs)",
        dir.display(),
        svg.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("ratios.svg"),
        png.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("ratios.png")
    );
    let failed = results.failures();
    if failed > 0 {
        return Err(SysbenchError::Incomplete {
            failed,
            rows: results.rows.len(),
            dir,
        });
    }
    Ok(())
}

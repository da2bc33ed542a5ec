//! `spanvm bench io`: the virtio disk seen from a CPU on the master and from a CPU on another
//! node, against the host's own file I/O in the same run.
//!
//! The same sysbench fileio runs on both sides with O_DIRECT (no page cache on either side):
//! 1 MiB sequential writes and reads, 4 KiB random reads and writes, one thread, 3 s each. On
//! the host it runs in a directory next to the disk image (the file system the image lives
//! on: the anchor); in the guest, on the ext4 data disk of `images/build.sh` (a copy) booted
//! on 2 nodes x 1 vCPU, pinned with `taskset` to CPU 0 (the master, where the device is) and
//! then CPU 1 (node 1: every queue notification is a forwarded MMIO write and the buffers'
//! pages move through the DSM).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::commands::CommandError;

/// (sysbench test mode, block size, total file size, the figure it reports in MiB/s)
const TESTS: [(&str, &str, &str, &str); 4] = [
    ("seqwr", "1M", "32M", "written, MiB/s:"),
    ("seqrd", "1M", "32M", "read, MiB/s:"),
    ("rndrd", "4K", "16M", "read, MiB/s:"),
    ("rndwr", "4K", "16M", "written, MiB/s:"),
];
const SECONDS: u32 = 3;

/// One test's result: MiB/s and the average latency in ms.
#[derive(Debug, Clone, Copy)]
struct Figures {
    mib_s: f64,
    latency_ms: f64,
}

/// The sysbench fileio arguments of one test (without the command name).
fn fileio_args(mode: &str, block: &str, total: &str) -> String {
    format!(
        "fileio --file-num=1 --file-extra-flags=direct --file-block-size={} --file-total-size={total} --file-test-mode={mode} --time={SECONDS}",
        block
    )
}

/// Parses the figures of one sysbench fileio run out of its output.
fn parse(output: &str, figure: &str) -> Option<Figures> {
    let value = |key: &str| {
        output.lines().find_map(|l| {
            l.trim()
                .strip_prefix(key)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    };
    Some(Figures {
        mib_s: value(figure)?,
        latency_ms: value("avg:")?,
    })
}

/// Runs every test on the host in `dir`.
fn host_anchor(dir: &Path) -> Result<HashMap<&'static str, Figures>, CommandError> {
    let mut out = HashMap::new();
    for (mode, block, total, figure) in TESTS {
        let args = fileio_args(mode, block, total);
        let run = |what: &str| {
            Command::new("sysbench")
                .args(args.split_whitespace())
                .arg(what)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| {
                    CommandError::Bench(format!(
                        "cannot run sysbench on the host (it comes with images/build.sh's packages): {e}"
                    ))
                })
        };
        run("prepare")?;
        let result = run("run")?;
        run("cleanup")?;
        let text = String::from_utf8_lossy(&result.stdout);
        let figures = parse(&text, figure).ok_or_else(|| {
            CommandError::Bench(format!(
                "host sysbench fileio {mode} printed no figures:\n{text}"
            ))
        })?;
        out.insert(mode, figures);
    }
    Ok(out)
}

/// The guest's workload: every test on CPU 0, then on CPU 1, each between markers. A loop, to
/// stay short on the kernel command line, without double quotes, which end the value, and
/// without a lone `--`, after which the kernel hands the rest of its command line to init.
fn guest_run() -> String {
    let tests: Vec<String> = TESTS
        .iter()
        .map(|(mode, block, total, _)| format!("{mode}/{block}/{total}"))
        .collect();
    format!(
        "\"mount -t ext4 /dev/vda /mnt && cd /mnt && for c in 0 1; do for t in {}; do m=${{t%%/*}}; r=${{t#*/}}; \
         set x fileio --file-num=1 --file-extra-flags=direct --time={SECONDS} --file-test-mode=$m --file-block-size=${{r%/*}} --file-total-size=${{r#*/}}; shift; \
         sysbench $@ prepare >/dev/null; echo IO-BEGIN $c $m; taskset -c $c sysbench $@ run; echo IO-END; sysbench $@ cleanup >/dev/null; \
         done; done; cd /; umount /mnt\"",
        tests.join(" ")
    )
}

/// Per (CPU, mode), the figures found between the markers of the guest's console log.
fn guest_figures(log: &str) -> HashMap<(u32, String), Figures> {
    let mut out = HashMap::new();
    let mut current: Option<(u32, String)> = None;
    let mut block = String::new();
    for line in log.lines() {
        // The log has each line's time in front of it.
        let text = line.split_once(' ').map_or(line, |(_, rest)| rest).trim();
        if let Some(rest) = text.strip_prefix("IO-BEGIN ") {
            let mut words = rest.split_whitespace();
            if let (Some(cpu), Some(mode)) = (words.next(), words.next()) {
                current = cpu.parse().ok().map(|c| (c, mode.to_string()));
                block.clear();
            }
        } else if text == "IO-END" {
            if let Some((cpu, mode)) = current.take() {
                let figure = TESTS
                    .iter()
                    .find(|t| t.0 == mode)
                    .map_or("read, MiB/s:", |t| t.3);
                if let Some(f) = parse(&block, figure) {
                    out.insert((cpu, mode), f);
                }
            }
        } else if current.is_some() {
            block.push_str(text);
            block.push('\n');
        }
    }
    out
}

fn cell(f: Option<&Figures>) -> String {
    f.map_or_else(
        || "-".to_string(),
        |f| format!("{:.1} / {:.2}", f.mib_s, f.latency_ms),
    )
}

/// Runs the benchmark and prints its table.
pub fn run() -> Result<(), CommandError> {
    let images = super::boot::images_dir();
    let (kernel, initrd, data) = (
        images.join("minimal.vmlinux"),
        images.join("initramfs.cpio"),
        images.join("data.ext4"),
    );
    for p in [&kernel, &initrd, &data] {
        if !p.is_file() {
            return Err(CommandError::Bench(format!(
                "{} is missing: run `bash images/build.sh` first",
                p.display()
            )));
        }
    }
    let work = std::env::temp_dir().join(format!("spanvm-bench-io-{}", std::process::id()));
    let anchor_dir = work.join("host");
    std::fs::create_dir_all(&anchor_dir).map_err(|e| CommandError::Bench(e.to_string()))?;
    let disk = work.join("data.ext4");
    std::fs::copy(&data, &disk)
        .map_err(|e| CommandError::Bench(format!("cannot copy {}: {e}", data.display())))?;
    println!("spanvm bench io: sysbench fileio, O_DIRECT, 1 thread, {SECONDS} s per test; MiB/s / average latency ms");
    println!("anchor: the same on the host, in {}", anchor_dir.display());
    let host = host_anchor(&anchor_dir)?;
    cluster_run(&kernel, &initrd, &work, &disk, &host)?;
    println!("console: {}", work.join("io-2x1.console.log").display());
    Ok(())
}

fn cluster_run(
    kernel: &Path,
    initrd: &Path,
    work: &Path,
    disk: &Path,
    host: &HashMap<&'static str, Figures>,
) -> Result<(), CommandError> {
    super::boot::cluster_boot(
        kernel,
        initrd,
        work,
        "io-2x1",
        (2, 1),
        &guest_run(),
        Some(disk),
    )?;
    let log = std::fs::read_to_string(work.join("io-2x1.console.log"))
        .map_err(|e| CommandError::Bench(e.to_string()))?;
    let guest = guest_figures(&log);
    println!(
        "{:<22}{:>20}{:>22}{:>22}{:>14}",
        "test", "host (anchor)", "guest CPU 0 (master)", "guest CPU 1 (node 1)", "CPU 0 / host"
    );
    for (mode, block, _, _) in TESTS {
        let on = |cpu: u32| guest.get(&(cpu, mode.to_string()));
        let ratio = match (on(0), host.get(mode)) {
            (Some(g), Some(h)) if h.mib_s > 0.0 => format!("{:.2}", g.mib_s / h.mib_s),
            _ => "-".into(),
        };
        println!(
            "{:<22}{:>20}{:>22}{:>22}{:>14}",
            format!("{mode} {block}"),
            cell(host.get(mode)),
            cell(on(0)),
            cell(on(1)),
            ratio
        );
    }
    println!("goal: 1 MiB sequential from the master's CPU >= 0.5 x the host");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_between_markers_per_cpu() {
        let log = "1.0 IO-BEGIN 1 rndrd\n1.1 Throughput:\n1.2     read, MiB/s:   3.25\n1.3          avg:   1.20\n1.4 IO-END\n2.0 IO-BEGIN 0 seqwr\n2.1     written, MiB/s: 40.5\n2.2 avg: 0.10\n2.3 IO-END\n";
        let f = guest_figures(log);
        assert_eq!(f.len(), 2);
        let r = f[&(1, "rndrd".to_string())];
        assert!((r.mib_s - 3.25).abs() < 1e-9 && (r.latency_ms - 1.2).abs() < 1e-9);
        assert!((f[&(0, "seqwr".to_string())].mib_s - 40.5).abs() < 1e-9);
    }

    #[test]
    fn the_guest_script_fits_a_command_line_without_double_quotes_inside() {
        let run = guest_run();
        assert!(run.len() < 1500, "{} bytes", run.len());
        assert_eq!(run.matches('"').count(), 2);
        assert!(!run.split_whitespace().any(|w| w == "--"), "{run}");
    }
}

//! `spanvm bench sharing`: what a page written by vCPUs on different nodes costs, against the
//! same guest on one node in the same run.
//!
//! The `hotpage` probe gives every vCPU events of fixed local work, each ending with a store to
//! the vCPU's own counter, all counters in one 4 KiB page: the shape of sysbench's per-thread
//! statistics, which is why sysbench cpu on 2 nodes x 1 vCPU stays far below one node with 2
//! vCPUs at its default event size (see notes/distributed_linux.md). On one node the page stays
//! in both vCPUs' caches; across nodes the DSM's single-writer protocol moves it at nearly every
//! event, so each event pays a remote write fault. Rows for two event sizes show where that cost
//! stops mattering.

use std::path::Path;
use std::process::Stdio;

use crate::commands::CommandError;

/// Event sizes, in thousands of loop iterations: about a sysbench cpu event at its default
/// prime limit, and ten times that (about `--cpu-max-prime=100000`).
const EVENT_SIZES_K: [u64; 2] = [1600, 16000];
/// Runs per configuration; the median is reported.
const ROUNDS: usize = 3;

/// Runs `hotpage` with `arg` on `nodes` nodes of `per_node` vCPUs; returns per vCPU the events
/// per second it reached.
fn hotpage_rates(
    dir: &Path,
    nodes: usize,
    per_node: usize,
    arg: u64,
) -> Result<Vec<f64>, CommandError> {
    let vcpus = nodes * per_node;
    let mut text = format!(
        "[guest]\nvcpus = {vcpus}\nmemory_mib = 64\nprobe = \"hotpage\"\nprobe_arg = {arg}\n"
    );
    text.push_str(&super::node_tables(nodes, per_node)?);
    let name = format!("hotpage-{nodes}x{per_node}-{arg}");
    let config = dir.join(format!("{name}.toml"));
    let exe = std::env::current_exe()
        .map_err(|e| CommandError::Bench(format!("cannot find the spanvm binary: {e}")))?;
    if nodes == 1 {
        text = format!("node = 0\n{text}");
    }
    let mut cmd = super::layout_command(&exe, nodes, &config, &dir.join(&name));
    std::fs::write(&config, text)
        .map_err(|e| CommandError::Bench(format!("{}: {e}", config.display())))?;
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CommandError::Bench(format!("cannot run {name}: {e}")))?;
    if !out.status.success() {
        return Err(CommandError::Bench(format!(
            "{name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let reports = super::probe_reports(&String::from_utf8_lossy(&out.stdout));
    (0..vcpus)
        .map(|v| {
            let get = |key: &str| {
                reports.get(&(v, key.to_string())).copied().ok_or_else(|| {
                    CommandError::Bench(format!("{name}: vCPU {v} did not report {key}"))
                })
            };
            let (events, ns) = (get("HPEV")?, get("HPNS")?);
            Ok(rate(events, ns))
        })
        .collect()
}

// For display: event counts and nanoseconds are far below f64's 53 bits.
#[allow(clippy::cast_precision_loss)]
fn rate(events: u64, ns: u64) -> f64 {
    events as f64 * 1e9 / ns.max(1) as f64
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints its table.
pub fn run() -> Result<(), CommandError> {
    let dir = std::env::temp_dir().join(format!("spanvm-bench-sharing-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CommandError::Bench(format!("{}: {e}", dir.display())))?;
    println!("hotpage probe: per-vCPU counters in one shared 4 KiB page, written once per event");
    println!("events/s per vCPU, median of {ROUNDS} runs (1 x 2 is the anchor: the same guest on one node)");
    println!(
        "{:<34}{:>12}{:>12}{:>10}{:>22}",
        "event size", "1 x 2", "2 x 1", "2x1/1x2", "cost per event, µs"
    );
    for &arg in &EVENT_SIZES_K {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        // Alternate the two shapes so that a slow moment of the host hits both.
        for _ in 0..ROUNDS {
            one.extend(hotpage_rates(&dir, 1, 2, arg)?);
            two.extend(hotpage_rates(&dir, 2, 1, arg)?);
        }
        let (one, two) = (median(one), median(two));
        let extra_us = (1.0 / two - 1.0 / one) * 1e6;
        println!(
            "{:<34}{:>12.1}{:>12.1}{:>10.2}{:>22.0}",
            format!("{}k iterations ({:.2} ms on 1 node)", arg, 1000.0 / one),
            one,
            two,
            two / one,
            extra_us
        );
    }
    println!(
        "cost per event: how much longer an event takes on 2 nodes (a remote write fault, mostly)"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

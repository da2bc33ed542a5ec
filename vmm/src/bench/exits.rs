//! `spanvm bench exits`: exit round trips and IPI latency through spanvm's exit loop, each beside
//! the same guest code driven by a minimal loop written here against KVM directly (the anchor).
//!
//! The guest measures exits itself (TSC ticks around a loop of exits, `images/probes/bench_exits.S`),
//! so both loops are timed the same way. The IPI latency is half the ping-pong round trip of
//! `ipi-xapic` (two vCPUs, every IPI through the user-space APIC); its anchor is the raw
//! `KVM_INTERRUPT` round trip: inject into a halted vCPU, time until its handler's port write
//! exits.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use devices::probe_port::ProbeEvent;
use kvm_ioctls::VcpuExit;
use resources::NodeConfig;

use crate::commands::CommandError;
use crate::hypervisor::inject_interrupt;
use crate::probe::layout::{
    PROBE_PORT_EXIT, PROBE_PORT_KEY, PROBE_PORT_NOP, PROBE_PORT_VALUE_HI, PROBE_PORT_VALUE_LO,
};
use crate::stop::StopReason;
use crate::vm::NodeVm;

const INJECT_ROUNDS: usize = 5000;
/// How many times each measurement runs (the median is reported).
const ROUNDS: usize = 3;

/// Per key, the median of the values the runs reported.
fn median_reports(runs: &[HashMap<String, u64>]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    if let Some(first) = runs.first() {
        for key in first.keys() {
            let mut v: Vec<u64> = runs.iter().filter_map(|r| r.get(key).copied()).collect();
            v.sort_unstable();
            out.insert(key.clone(), v[v.len() / 2]);
        }
    }
    out
}

fn bench_config(probe: &str, vcpus: u32) -> Result<NodeConfig, CommandError> {
    let list: Vec<String> = (0..vcpus).map(|v| v.to_string()).collect();
    let text = format!(
        "node = 0\n[guest]\nvcpus = {vcpus}\nmemory_mib = 64\nprobe = \"{probe}\"\n\n[[nodes]]\nid = 0\naddress = \"127.0.0.1:1\"\nvcpus = [{}]\n",
        list.join(", ")
    );
    Ok(NodeConfig::parse(&text, Path::new("<spanvm bench>"))?)
}

fn reports(events: &[ProbeEvent]) -> HashMap<String, u64> {
    events
        .iter()
        .filter_map(|e| match e {
            ProbeEvent::Report {
                vcpu: 0,
                key,
                value,
            } => Some((ProbeEvent::key_text(key), *value)),
            _ => None,
        })
        .collect()
}

/// Runs `probe` through spanvm's own exit loop; returns vCPU 0's reports.
fn through_spanvm(probe: &str, vcpus: u32) -> Result<(HashMap<String, u64>, u32), CommandError> {
    let mut vm = NodeVm::build(&bench_config(probe, vcpus)?)?;
    let platform = vm.platform().clone();
    let khz = vm.tsc_khz();
    match vm.run()? {
        StopReason::PowerOff => Ok((reports(&platform.probe_events()), khz)),
        other => Err(CommandError::Bench(format!(
            "probe {probe} under spanvm stopped: {other}"
        ))),
    }
}

/// Runs `bench-exits` on one vCPU with the smallest loop that can run it.
fn through_raw_loop() -> Result<HashMap<String, u64>, CommandError> {
    let vm = NodeVm::build(&bench_config("bench-exits", 1)?)?;
    // `parts` keeps the VM and its memory alive while the vCPU runs.
    let mut parts = vm.into_parts()?;
    let (_, mut fd) = parts
        .vcpus
        .pop()
        .ok_or_else(|| CommandError::Bench("no vCPU".into()))?;
    let mut out = HashMap::new();
    let (mut key, mut low) = ([0u8; 4], 0u32);
    loop {
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                let v = u32::from_le_bytes(b);
                match u64::from(port) {
                    PROBE_PORT_NOP => {}
                    PROBE_PORT_KEY => key = v.to_le_bytes(),
                    PROBE_PORT_VALUE_LO => low = v,
                    PROBE_PORT_VALUE_HI => {
                        out.insert(
                            ProbeEvent::key_text(&key),
                            (u64::from(v) << 32) | u64::from(low),
                        );
                    }
                    PROBE_PORT_EXIT => return Ok(out),
                    _ => {}
                }
            }
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::X86Rdmsr(exit)) => *exit.data = 0,
            Ok(VcpuExit::X86Wrmsr(_)) => {}
            Ok(VcpuExit::IrqWindowOpen) | Err(_) => {}
            Ok(other) => {
                return Err(CommandError::Bench(format!(
                    "raw loop: unexpected exit {other:?}"
                )))
            }
        }
    }
}

/// The raw `KVM_INTERRUPT` round trip in microseconds (median).
fn raw_injection_us() -> Result<f64, CommandError> {
    let vm = NodeVm::build(&bench_config("bench-inject", 1)?)?;
    let mut parts = vm.into_parts()?;
    let (_, mut fd) = parts
        .vcpus
        .pop()
        .ok_or_else(|| CommandError::Bench("no vCPU".into()))?;
    let fail = |what: String| CommandError::Bench(format!("raw injection: {what}"));
    // Run until the guest halts with interrupts enabled.
    loop {
        match fd.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::X86Wrmsr(_)) | Ok(VcpuExit::X86Rdmsr(_)) => {}
            Ok(other) => return Err(fail(format!("unexpected exit {other:?} before hlt"))),
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    let mut samples = Vec::with_capacity(INJECT_ROUNDS);
    for _ in 0..INJECT_ROUNDS {
        let t0 = Instant::now();
        inject_interrupt(&fd, 0x60).map_err(|e| fail(e.to_string()))?;
        loop {
            match fd.run() {
                Ok(VcpuExit::IoOut(port, _)) if u64::from(port) == PROBE_PORT_NOP => break,
                Ok(VcpuExit::Hlt) => {
                    return Err(fail("guest halted without taking the interrupt".into()))
                }
                Ok(_) => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        // Back to hlt (iret, then the loop's hlt).
        loop {
            match fd.run() {
                Ok(VcpuExit::Hlt) => break,
                Ok(_) => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

// For display: f64's 53 bits are far more than the digits shown.
#[allow(clippy::cast_precision_loss)]
fn ticks_us(ticks: u64, khz: u32) -> f64 {
    ticks as f64 * 1000.0 / f64::from(khz)
}

/// Runs `probe` as a 2-node cluster (`spanvm cluster --probe`, real node processes on
/// loopback); returns every vCPU's reports.
fn through_cluster(probe: &str) -> Result<HashMap<(usize, String), u64>, CommandError> {
    let exe = std::env::current_exe()
        .map_err(|e| CommandError::Bench(format!("cannot find the spanvm binary: {e}")))?;
    let out = std::process::Command::new(exe)
        .args(["cluster", "--probe", probe])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| CommandError::Bench(format!("cannot run the {probe} cluster: {e}")))?;
    if !out.status.success() {
        return Err(CommandError::Bench(format!(
            "the {probe} cluster failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(super::probe_reports(&String::from_utf8_lossy(&out.stdout)))
}

/// The median over runs of one vCPU's report.
fn median_of(
    runs: &[HashMap<(usize, String), u64>],
    vcpu: usize,
    key: &str,
) -> Result<u64, CommandError> {
    let mut v: Vec<u64> = runs
        .iter()
        .filter_map(|r| r.get(&(vcpu, key.to_string())).copied())
        .collect();
    if v.len() != runs.len() {
        return Err(CommandError::Bench(format!(
            "vCPU {vcpu} did not report {key}"
        )));
    }
    v.sort_unstable();
    Ok(v[v.len() / 2])
}

/// The median round trip of a small frame between two meshes on loopback, in µs.
fn tcp_round_trip_us() -> Result<f64, CommandError> {
    let report = transport::bench::loopback_round_trip(&transport::bench::RoundTripBench {
        samples: 2000,
        warmup: 200,
        payload_len: 16,
        ..Default::default()
    })
    .map_err(|e| CommandError::Bench(format!("TCP round trip: {e}")))?;
    Ok(report.median.as_secs_f64() * 1e6)
}

/// Runs the benchmark and prints its table.
pub fn run() -> Result<(), CommandError> {
    // Each measurement runs ROUNDS times, spanvm and its anchor alternating, and the median is
    // kept: on a small shared host one run can be off by tens of percent.
    let mut ours_runs = Vec::new();
    let mut raw_runs = Vec::new();
    let mut ipi_runs = Vec::new();
    let mut halted_runs = Vec::new();
    let mut inject_runs = Vec::new();
    let mut forward_runs = Vec::new();
    let mut cross_ipi_runs = Vec::new();
    let mut rtt_runs = Vec::new();
    let mut khz = 0;
    for _ in 0..ROUNDS {
        forward_runs.push(through_cluster("bench-forward")?);
        cross_ipi_runs.push(through_cluster("ipi-xapic")?);
        rtt_runs.push(tcp_round_trip_us()?);
        let (o, k) = through_spanvm("bench-exits", 1)?;
        khz = k;
        ours_runs.push(o);
        raw_runs.push(through_raw_loop()?);
        ipi_runs.push(through_spanvm("ipi-xapic", 2)?.0);
        halted_runs.push(through_spanvm("ipi-halt", 2)?.0);
        inject_runs.push(raw_injection_us()?);
    }
    let ours = median_reports(&ours_runs);
    let raw = median_reports(&raw_runs);
    let ipi = median_reports(&ipi_runs);
    let ipi_halted = median_reports(&halted_runs);
    inject_runs.sort_by(f64::total_cmp);
    let inject = inject_runs[inject_runs.len() / 2];
    let ipi_khz = khz;
    let get = |m: &HashMap<String, u64>, k: &str| {
        m.get(k)
            .copied()
            .ok_or_else(|| CommandError::Bench(format!("the probe did not report {k}")))
    };
    println!("spanvm bench exits (TSC {khz} kHz; guest-timed means, median of {ROUNDS} runs; anchor = same guest code, minimal KVM loop)");
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "exit round trip", "spanvm µs", "raw KVM µs", "ratio"
    );
    for (label, key) in [
        ("port I/O, guest CPL0", "P0IO"),
        ("MMIO, guest CPL0", "P0MM"),
        ("MSR (rdmsr), guest CPL0", "P0MS"),
        ("port I/O, guest CPL3", "P3IO"),
        ("MMIO, guest CPL3", "P3MM"),
    ] {
        let a = ticks_us(get(&ours, key)?, khz);
        let b = ticks_us(get(&raw, key)?, khz);
        println!("{label:<34} {a:>12.2} {b:>12.2} {:>8.2}", a / b);
    }
    println!("{:<34} {:>12} {:>12}", "(MSR at CPL3)", "n/a", "n/a");
    let one_way = ticks_us(get(&ipi, "IPRT")?, ipi_khz) / 2.0;
    println!(
        "{:<34} {:>12.2} {:>12.2} {:>8.2}",
        "IPI one way (xAPIC) vs KVM_INTERRUPT",
        one_way,
        inject,
        one_way / inject
    );
    let halted_one_way = ticks_us(get(&ipi_halted, "IPRT")?, ipi_khz) / 2.0;
    println!(
        "{:<34} {:>12.2} {:>12.2} {:>8.2}",
        "IPI one way, halted target (CPL0)",
        halted_one_way,
        inject,
        halted_one_way / inject
    );
    println!("(the running target is kicked out of KVM_RUN by a signal; the halted one is woken from a condvar.)");
    rtt_runs.sort_by(f64::total_cmp);
    let rtt = rtt_runs[rtt_runs.len() / 2];
    println!();
    println!("across 2 node processes on loopback (median of {ROUNDS} clusters); anchor = local exit above + 1 TCP round trip");
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "spanvm µs", "anchor µs", "ratio"
    );
    println!("{:<34} {:>12.2}", "TCP frame round trip (16 B)", rtt);
    for (label, key, local_key) in [
        ("forwarded port read, CPL3", "FWIO", "P3IO"),
        ("forwarded MMIO read, CPL3", "FWMM", "P3MM"),
    ] {
        let fwd = ticks_us(median_of(&forward_runs, 1, key)?, khz);
        let anchor = ticks_us(get(&ours, local_key)?, khz) + rtt;
        println!(
            "{label:<34} {fwd:>12.2} {anchor:>12.2} {:>8.2}",
            fwd / anchor
        );
    }
    let cross = ticks_us(median_of(&cross_ipi_runs, 0, "IPRT")?, ipi_khz) / 2.0;
    let anchor = one_way + rtt / 2.0;
    println!(
        "{:<34} {:>12.2} {:>12.2} {:>8.2}",
        "cross-node IPI one way (xAPIC)",
        cross,
        anchor,
        cross / anchor
    );
    println!("(cross-node IPI anchor: the local one-way IPI above + half a TCP round trip.)");
    println!("(rdmsr at CPL3 raises #GP on every host, so there is no CPL3 MSR exit to time.)");
    Ok(())
}

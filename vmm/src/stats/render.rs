//! How a node's figures read on screen: the full page of `spanvm stats` and the one-line
//! summary of `spanvm cluster --stats-interval`.

use std::fmt::Write as _;

use dsm::PAGE_SHIFT;

use crate::stats::report::{
    bucket_bounds, latency_percentile, remote_requests, NodeReport, Phase, Rates,
};
use crate::vcpu::exit_counters::ExitReason;

/// A per-second figure with as many digits as it deserves.
fn figure(per_second: f64) -> String {
    if per_second >= 100.0 {
        format!("{per_second:.0}")
    } else {
        format!("{per_second:.1}")
    }
}

/// A rate with its unit.
fn rate(per_second: f64) -> String {
    format!("{}/s", figure(per_second))
}

/// A byte rate in KiB/s or MiB/s.
fn byte_rate(per_second: f64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if per_second >= MIB {
        format!("{:.1} MiB/s", per_second / MIB)
    } else {
        format!("{:.1} KiB/s", per_second / 1024.0)
    }
}

fn uptime(report: &NodeReport) -> String {
    format!("{:.1} s", report.uptime.as_secs_f64())
}

/// The summary line of one node for `spanvm cluster --stats-interval`.
pub fn summary_line(report: &NodeReport, rates: &Rates) -> String {
    let mut line = format!("stats node {}: ", report.node);
    if report.phase == Phase::Starting {
        let _ = write!(line, "starting (up {})", uptime(report));
        return line;
    }
    if report.dsm.is_some() {
        let _ = write!(
            line,
            "faults {}, requests/s r {} w {} u {}, remote {}, in {}, out {}, ",
            rate(rates.faults),
            figure(rates.reads),
            figure(rates.writes),
            figure(rates.upgrades),
            rate(rates.remote),
            byte_rate(rates.bytes_in),
            byte_rate(rates.bytes_out),
        );
    }
    let _ = write!(
        line,
        "IPIs in {} out {}, I/O {}, exits {}",
        rate(rates.interrupts_in),
        rate(rates.interrupts_out),
        rate(rates.io),
        rate(rates.exits),
    );
    if report.phase == Phase::Stopping {
        line.push_str(" (stopping)");
    }
    line
}

/// Everything `spanvm stats` prints for one node; `rates_over` says what the rates cover.
pub fn full_page(report: &NodeReport, rates: &Rates, rates_over: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} of {}: {}, up {}",
        report.node,
        report.nodes,
        report.phase.name(),
        uptime(report)
    );
    if report.phase == Phase::Starting {
        out.push_str("  (joining its peers and loading the guest: no figures yet)\n");
        return out;
    }
    let _ = writeln!(out, "rates ({rates_over}):");
    if report.dsm.is_some() {
        let _ = writeln!(
            out,
            "  DSM faults {}; requests read {}, write {}, upgrade {}; remote {}",
            rate(rates.faults),
            rate(rates.reads),
            rate(rates.writes),
            rate(rates.upgrades),
            rate(rates.remote)
        );
        let _ = writeln!(
            out,
            "  DSM page data in {}, out {}",
            byte_rate(rates.bytes_in),
            byte_rate(rates.bytes_out)
        );
    }
    let _ = writeln!(
        out,
        "  interrupts from other nodes {}, to other nodes {}; forwarded I/O {}; vCPU exits {}",
        rate(rates.interrupts_in),
        rate(rates.interrupts_out),
        rate(rates.io),
        rate(rates.exits)
    );
    dsm_section(&mut out, report);
    if let Some(f) = &report.forward {
        let _ = writeln!(out, "forwarding");
        let _ = writeln!(
            out,
            "  interrupt frames sent {}, interrupts received {}; addressing changes {}; EOIs sent {}",
            f.interrupts_sent, f.interrupts_received, f.addressing_updates, f.eois_sent
        );
        let _ = writeln!(
            out,
            "  I/O: accesses forwarded to the master {}, served for other nodes {}",
            f.io_forwarded, f.io_served
        );
    }
    if let Some(t) = &report.transport {
        let _ = writeln!(out, "{}", t.to_string().trim_start());
    }
    if let Some(z) = &report.shadow_zap {
        let _ = writeln!(out, "{z}");
    }
    for v in &report.vcpus {
        let reasons: Vec<String> = ExitReason::ALL
            .iter()
            .zip(v.exits)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{} {n}", r.name()))
            .collect();
        let _ = writeln!(
            out,
            "vCPU {}: exits {} ({}); interrupts from other nodes {}, to other nodes {}",
            v.index,
            v.total_exits(),
            if reasons.is_empty() {
                "none".to_string()
            } else {
                reasons.join(", ")
            },
            v.interrupts.received,
            v.interrupts.sent
        );
    }
    out
}

fn dsm_section(out: &mut String, report: &NodeReport) {
    let Some(d) = &report.dsm else {
        return;
    };
    let _ = writeln!(out, "DSM");
    let _ = writeln!(
        out,
        "  faults {} (read {}, write {}); joined an in-flight request {}; already resolved {}; pages pinned by the VMM {}",
        d.faults(),
        d.faults_read,
        d.faults_write,
        d.faults_merged,
        d.faults_resolved,
        d.pins
    );
    let _ = writeln!(out, "  requests completed      local    remote");
    for (name, [local, remote]) in [
        ("read", d.reads),
        ("write", d.writes),
        ("upgrade", d.upgrades),
    ] {
        let _ = writeln!(out, "    {name:<16}{local:>11}{remote:>10}");
    }
    let _ = writeln!(out, "  remote requests {}", remote_requests(d));
    let _ = writeln!(
        out,
        "  served as home {}, as data source {}; copies invalidated {}; waits for a pin {}; zero pages by flag {}",
        d.served_as_home, d.served_as_source, d.invalidations, d.deferred_by_pin, d.zero_pages_received
    );
    let _ = writeln!(
        out,
        "  messages sent {} ({} pages, {} bytes), received {} ({} pages, {} bytes); rejected frames {}",
        d.messages_sent,
        d.pages_sent,
        d.bytes_sent,
        d.messages_received,
        d.pages_received,
        d.bytes_received,
        d.frames_rejected
    );
    let percentiles: Vec<String> = [50, 95, 99]
        .iter()
        .filter_map(|&p| {
            let (low, high) = latency_percentile(&d.latency_log2_us, p)?;
            Some(format!("p{p} {low}-{high} µs"))
        })
        .collect();
    if percentiles.is_empty() {
        let _ = writeln!(out, "  fault service time: no request completed yet");
    } else {
        let _ = writeln!(out, "  fault service time: {}", percentiles.join(", "));
        for (i, &count) in d.latency_log2_us.iter().enumerate() {
            if count > 0 {
                let (low, high) = bucket_bounds(i);
                let _ = writeln!(out, "    [{low:>9}, {high:>9}) µs {count:>10}");
            }
        }
    }
    if !d.top_pages.is_empty() {
        let _ = writeln!(out, "  hottest pages:");
        for (page, count) in &d.top_pages {
            let _ = writeln!(out, "    gpa {:#014x}: {count} faults", page << PAGE_SHIFT);
        }
    }
}

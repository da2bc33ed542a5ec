//! `spanvm bench`: measurements, each printed beside an anchor measured in the same run.

pub mod boot;
pub mod dsm;
pub mod exits;
pub mod io;
pub mod sharing;

use std::collections::HashMap;

/// Every `PROBE vcpu=N KEY=VALUE` line of a node's or cluster's output, by (vCPU, key).
fn probe_reports(output: &str) -> HashMap<(usize, String), u64> {
    let mut reports = HashMap::new();
    for line in output.lines() {
        let Some((_, rest)) = line.split_once("PROBE vcpu=") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(vcpu), Some(kv)) = (words.next(), words.next()) else {
            continue;
        };
        if let (Ok(vcpu), Some((k, v))) = (vcpu.parse::<usize>(), kv.split_once('=')) {
            if let Ok(v) = v.parse::<u64>() {
                reports.insert((vcpu, k.to_string()), v);
            }
        }
    }
    reports
}

//! `spanvm bench`: measurements, each printed beside an anchor measured in the same run.

pub mod boot;
pub mod dsm;
pub mod exits;
pub mod io;
mod netns;
pub mod sharing;
pub mod sysbench;

use std::collections::HashMap;

/// The command that runs the guest of `config` on `nodes` nodes with the `spanvm` at `exe`:
/// `spanvm run` for one (the config then names node 0), else `spanvm cluster`, which writes its
/// node files into `nodes_dir`.
fn layout_command(
    exe: &std::path::Path,
    nodes: usize,
    config: &std::path::Path,
    nodes_dir: &std::path::Path,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(exe);
    if nodes == 1 {
        cmd.arg("run").arg("--config").arg(config);
    } else {
        cmd.arg("cluster")
            .arg("--config")
            .arg(config)
            .arg("--dir")
            .arg(nodes_dir);
    }
    cmd
}

/// The `[[nodes]]` tables of `nodes` nodes with `per_node` consecutive vCPUs each, every node
/// on a free loopback port.
fn node_tables(nodes: usize, per_node: usize) -> Result<String, crate::commands::CommandError> {
    use crate::commands::CommandError;
    let listeners = (0..nodes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CommandError::Bench(format!("no free loopback port: {e}")))?;
    let mut text = String::new();
    for (i, listener) in listeners.iter().enumerate() {
        let addr = listener
            .local_addr()
            .map_err(|e| CommandError::Bench(e.to_string()))?;
        let list: Vec<String> = (i * per_node..(i + 1) * per_node)
            .map(|v| v.to_string())
            .collect();
        text.push_str(&format!(
            "\n[[nodes]]\nid = {i}\naddress = \"{addr}\"\nvcpus = [{}]\n",
            list.join(", ")
        ));
    }
    Ok(text)
}

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

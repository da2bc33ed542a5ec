//! `spanvm`: the command line of a spanvm node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use vmm::stop::StopReason;

/// spanvm: one guest across several machines.
#[derive(Parser)]
#[command(name = "spanvm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run this node's part of the guest (a single-node config runs the whole guest).
    Run {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one node of a cluster (the same as `run`).
    Node {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Start every node of a cluster on this machine (loopback) and show their output.
    Cluster {
        /// A cluster description (a node file without `node`); default: one Linux guest on
        /// 2 nodes x 1 vCPU running sysbench cpu and threads (images from images/build.sh).
        #[arg(long, conflicts_with = "probe")]
        config: Option<PathBuf>,
        /// Run this probe guest on the default 2 nodes instead of Linux (e.g. `counter`).
        #[arg(long)]
        probe: Option<String>,
        /// Where to write the per-node config files (default: a fresh directory in /tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Every SECS seconds, print one statistics line per node (faults, remote requests,
        /// DSM traffic, IPIs, forwarded I/O, exits per second) on stderr. Default: off.
        #[arg(long, value_name = "SECS", value_parser = vmm::stats::command::parse_seconds)]
        stats_interval: Option<Duration>,
    },
    /// Show a running node's live statistics (asked over its control socket).
    Stats {
        /// The config file the node runs from.
        #[arg(long)]
        config: PathBuf,
        /// Take two answers SECS seconds apart and show the rates between them (default: one
        /// answer, with averages since the node started).
        #[arg(long, value_name = "SECS", value_parser = vmm::stats::command::parse_seconds)]
        interval: Option<Duration>,
    },
    /// Validate a node config and print the guest layout it describes.
    Check {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Measure spanvm against a minimal baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Exit round trips (port I/O, MMIO, MSR) and IPI latency against a raw KVM loop.
    Exits,
    /// DSM fault latency (read, write with invalidation, upgrade), a remote read fault broken
    /// down by stage, and throughput between two nodes on loopback, against a local fault and
    /// a raw round trip of the same transport.
    Dsm {
        /// The transport between the two nodes: tcp or rdma (rdma needs an `rdma` build and a
        /// verbs device).
        #[arg(long, default_value = "tcp", value_parser = parse_transport)]
        transport: resources::TransportKind,
    },
    /// The virtio disk from a CPU on the master and on another node, against the host's own
    /// file I/O (sysbench fileio, O_DIRECT).
    Io,
    /// A page written by vCPUs on different nodes (sysbench's per-thread statistics) against
    /// the same guest on one node, at two event sizes.
    Sharing,
    /// Time to each Linux boot milestone for the minimal and the Debian kernel (QEMU as the
    /// anchor where it can use hardware KVM), then on 1 x 2, 2 x 1, 1 x 4 and 4 x 1 nodes with
    /// sysbench cpu's events/s.
    Boot {
        /// Only the node-topology table (the one-node kernel comparison takes the longest).
        #[arg(long)]
        topology_only: bool,
    },
    /// GiantVM's evaluation: sysbench cpu, threads, mutex, memory (local, global, 4 KiB global
    /// writes), stress-ng CPU methods and, with --disk, fileio, in one Linux boot per layout,
    /// each multi-node layout against 1xN of the same run; a table, results.csv, a plot and
    /// summary.md with GiantVM's published ratios.
    Sysbench {
        /// Layouts to boot, NODESxVCPUS each (the 1xN baselines are added when missing).
        #[arg(long, default_value = vmm::bench::sysbench::layout::DEFAULT_LAYOUTS)]
        layouts: String,
        /// The shortest runs (5 s each), one mutex case and two stress-ng methods.
        #[arg(long)]
        quick: bool,
        /// Where the results go (default: a fresh directory under /tmp, printed).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run sysbench fileio on a copy of this ext4 image (e.g. images/out/data.ext4).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Only these workloads, comma-separated names as in the table (e.g.
        /// cpu,memory-local-4m); default: all of the run.
        #[arg(long)]
        workloads: Option<String>,
    },
}

fn parse_transport(text: &str) -> Result<resources::TransportKind, String> {
    use resources::ConfigWord;
    resources::TransportKind::from_config(text)
        .ok_or_else(|| format!("unknown transport {text:?}; use tcp or rdma"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } | Command::Node { config } => vmm::commands::run(&config),
        Command::Cluster {
            config,
            probe,
            dir,
            stats_interval,
        } => {
            let guest = match (config, probe) {
                (Some(path), _) => vmm::cluster::Guest::Described(path),
                (None, Some(name)) => vmm::cluster::Guest::Probe(name),
                (None, None) => vmm::cluster::Guest::DefaultLinux,
            };
            vmm::cluster::run(guest, dir.as_deref(), stats_interval)
                .map_err(vmm::commands::CommandError::from)
        }
        Command::Stats { config, interval } => vmm::stats::command::run(&config, interval)
            .map(|()| StopReason::PowerOff)
            .map_err(vmm::commands::CommandError::from),
        Command::Check { config } => vmm::commands::check(&config).map(|()| StopReason::PowerOff),
        Command::Bench {
            what: BenchWhat::Exits,
        } => vmm::bench::exits::run().map(|()| StopReason::PowerOff),
        Command::Bench {
            what: BenchWhat::Dsm { transport },
        } => vmm::bench::dsm::run(transport).map(|()| StopReason::PowerOff),
        Command::Bench {
            what: BenchWhat::Io,
        } => vmm::bench::io::run().map(|()| StopReason::PowerOff),
        Command::Bench {
            what: BenchWhat::Sharing,
        } => vmm::bench::sharing::run().map(|()| StopReason::PowerOff),
        Command::Bench {
            what: BenchWhat::Boot { topology_only },
        } => vmm::bench::boot::run(topology_only).map(|()| StopReason::PowerOff),
        Command::Bench {
            what:
                BenchWhat::Sysbench {
                    layouts,
                    quick,
                    out,
                    disk,
                    workloads,
                },
        } => vmm::bench::sysbench::run(&vmm::bench::sysbench::Options {
            layouts,
            quick,
            out,
            disk,
            workloads,
        })
        .map(|()| StopReason::PowerOff)
        .map_err(vmm::commands::CommandError::from),
    };
    match result {
        Ok(StopReason::PowerOff) => ExitCode::SUCCESS,
        Ok(reason) => {
            eprintln!("spanvm: {reason}");
            ExitCode::from(reason.exit_code())
        }
        Err(e) => {
            eprintln!("spanvm: error: {e}");
            ExitCode::from(1)
        }
    }
}

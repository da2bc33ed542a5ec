//! What the `spanvm` subcommands do.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use resources::{ConfigError, NodeConfig};

use crate::stats::control_socket::{ClaimError, ControlSocket};
use crate::stats::server::StatsServer;
use crate::stats::sources::NodeSources;
use crate::stop::StopReason;
use crate::vm::{handle_signals, NodeVm, VmError};

/// Errors of a command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VM could not be built or run.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    /// The cluster could not be run.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A benchmark could not run.
    #[error("benchmark: {0}")]
    Bench(String),
    /// Another node answers on this node's control socket.
    #[error(transparent)]
    ControlSocket(#[from] ClaimError),
    /// `spanvm stats` could not show a node's figures.
    #[error(transparent)]
    Stats(#[from] crate::stats::command::StatsCommandError),
}

/// Claims the control socket of the node of `cfg` (see `crate::stats`). A live node on it is an
/// error (two nodes from one config file); any other problem only costs `spanvm stats` its
/// answers, so the node says so and runs on.
fn claim_control_socket(cfg: &NodeConfig) -> Result<Option<ControlSocket>, CommandError> {
    let path = match crate::stats::socket_path(&cfg.path) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("spanvm: node {}: no statistics socket: {e}", cfg.node);
            return Ok(None);
        }
    };
    match ControlSocket::claim(&path) {
        Ok(socket) => Ok(Some(socket)),
        Err(e @ ClaimError::InUse { .. }) => Err(e.into()),
        Err(e) => {
            eprintln!("spanvm: node {}: no statistics socket: {e}", cfg.node);
            Ok(None)
        }
    }
}

/// `spanvm check`: validate and describe.
pub fn check(config: &Path) -> Result<(), CommandError> {
    let cfg = NodeConfig::load(config)?;
    println!("{}: valid, this is node {}", cfg.path.display(), cfg.node);
    print!("{}", cfg.layout.describe());
    Ok(())
}

/// `spanvm run` / `spanvm node`: run this node until the guest stops. In a cluster the DSM
/// statistics are printed at exit and on SIGUSR1.
pub fn run(config: &Path) -> Result<StopReason, CommandError> {
    let started = Instant::now();
    let cfg = NodeConfig::load(config)?;
    // Claimed before anything else, so that a second node from the same file stops here, before
    // it binds the cluster's ports.
    let control_socket = claim_control_socket(&cfg)?;
    let socket_file = control_socket.as_ref().map(|s| s.path().to_path_buf());
    // Signals are taken before NodeVm::build starts the DSM's and the transport's threads
    // (which inherit the mask); until the VM exists, Ctrl-C simply ends the process.
    type SignalAction = Box<dyn Fn(i32) + Send>;
    let action: Arc<Mutex<Option<SignalAction>>> = Arc::new(Mutex::new(None));
    let slot = action.clone();
    handle_signals(move |sig| {
        let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(act) => act(sig),
            None if sig == libc::SIGUSR1 => {}
            None => {
                eprintln!("spanvm: interrupted while the node was starting");
                // process::exit skips destructors: the control socket's file goes by hand.
                if let Some(path) = &socket_file {
                    let _ = std::fs::remove_file(path);
                }
                std::process::exit(i32::from(StopReason::Interrupted.exit_code()));
            }
        }
    })
    .map_err(CommandError::Signals)?;
    // After handle_signals, like every thread of the node (it inherits the blocked signals).
    let stats_server = match control_socket {
        Some(socket) => {
            match StatsServer::start(socket, cfg.node, cfg.layout.node_count(), started) {
                Ok(server) => Some(server),
                Err(e) => {
                    eprintln!("spanvm: node {}: no statistics socket: {e}", cfg.node);
                    None
                }
            }
        }
        None => None,
    };
    let mut vm = match NodeVm::build(&cfg) {
        Ok(vm) => vm,
        Err(VmError::Stopped(reason)) => {
            eprintln!(
                "spanvm: node {} stopped before the guest started: {reason}",
                cfg.node
            );
            return Ok(reason);
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(server) = &stats_server {
        server.attach(NodeSources::of(&vm));
    }
    let platform = vm.platform().clone();
    let dsm = vm.dsm();
    // Weak: the handler lives as long as the process, and a strong reference would keep the DSM
    // (and the userfaultfd registration of guest memory) beyond the VM's teardown.
    let dsm_on_request = dsm.as_ref().map(Arc::downgrade);
    let forward_on_request = vm.platform().forward().clone();
    let zap_on_request = vm.shadow_zap().as_ref().map(Arc::downgrade);
    let mesh_on_request = vm.mesh().as_ref().map(Arc::downgrade);
    *action.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(move |sig| {
        if sig == libc::SIGUSR1 {
            if let Some(d) = dsm_on_request.as_ref().and_then(Weak::upgrade) {
                eprint!("{}", d.stats());
                if let Some(z) = zap_on_request.as_ref().and_then(Weak::upgrade) {
                    eprintln!("{}", z.stats());
                }
                eprintln!("{}", forward_on_request.stats());
            }
            if let Some(mesh) = mesh_on_request.as_ref().and_then(Weak::upgrade) {
                eprintln!("{}", mesh.stats());
            }
        } else {
            platform.request_stop(StopReason::Interrupted);
        }
    }));
    eprintln!(
        "spanvm: node {} running {} of the guest's {} vCPUs",
        cfg.node,
        cfg.local().vcpus.len(),
        cfg.layout.vcpu_count
    );
    // The devices, the console among them, live on the master.
    let _terminal = match vm.platform().serial() {
        Some(serial) => {
            crate::console::forward_stdin(serial.clone());
            Some(crate::console::TerminalGuard::new())
        }
        None => None,
    };
    let reason = vm.run();
    // The socket closes with the guest, before the teardown: an answer in progress must not
    // hold a part of the VM while it is taken down.
    drop(stats_server);
    let reason = reason?;
    if let Some(stats) = vm.pvm_repair_stats() {
        if stats.total() > 0 {
            eprintln!("spanvm: {stats}");
        }
    }
    if let Some(d) = dsm {
        eprint!("{}", d.stats());
        if let Some(z) = vm.shadow_zap() {
            eprintln!("{}", z.stats());
        }
        eprintln!("{}", vm.platform().forward().stats());
    }
    if let Some(mesh) = vm.mesh() {
        eprintln!("{}", mesh.stats());
    }
    drop(vm);
    // Fault injection for the tests of a stop while a vCPU waits for a page
    // (tests/dsm_failure.rs): the process lingers after the teardown, so that a thread the
    // teardown let loose (a vCPU let through a pending fault) has time to show it before the
    // exit would end it.
    if let Some(ms) = std::env::var("SPANVM_TEST_LINGER_AFTER_TEARDOWN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    Ok(reason)
}

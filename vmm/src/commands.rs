//! What the `spanvm` subcommands do.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use resources::{ConfigError, NodeConfig};

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
    let cfg = NodeConfig::load(config)?;
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
                std::process::exit(i32::from(StopReason::Interrupted.exit_code()));
            }
        }
    })
    .map_err(CommandError::Signals)?;
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
    let reason = vm.run()?;
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

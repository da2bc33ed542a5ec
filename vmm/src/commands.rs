//! What the `spanvm` subcommands do.

use std::path::Path;

use resources::{ConfigError, NodeConfig};

use crate::stop::StopReason;
use crate::vm::{handle_termination_signals, NodeVm, VmError};

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

/// `spanvm run`: run this node until the guest stops.
pub fn run(config: &Path) -> Result<StopReason, CommandError> {
    let cfg = NodeConfig::load(config)?;
    let vm = NodeVm::build(&cfg)?;
    let platform = vm.platform().clone();
    handle_termination_signals(move || platform.request_stop(StopReason::Interrupted))
        .map_err(CommandError::Signals)?;
    Ok(vm.run()?)
}

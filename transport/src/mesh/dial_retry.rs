//! Dialing during setup, whatever the backend: every channel of every peer this node dials,
//! each with attempts until one succeeds, the peer refuses for good, setup is abandoned, or
//! the deadline passes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::channel::{Channel, NodeId};
use crate::config::MeshConfig;
use crate::error::TransportError;

/// Pause between attempts to reach a peer that is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why one attempt failed.
pub(crate) enum AttemptFailed {
    /// Another attempt may succeed (the peer is not up yet, say); the text says what happened.
    Passing(String),
    /// The peer refused us for a reason that will not pass.
    Definitive(TransportError),
}

impl From<TransportError> for AttemptFailed {
    fn from(error: TransportError) -> AttemptFailed {
        if error.is_definitive() {
            AttemptFailed::Definitive(error)
        } else {
            AttemptFailed::Passing(error.to_string())
        }
    }
}

/// Dials every channel of every peer that this node dials, in order, with
/// [`dial_until_deadline`]; `attempt` makes one attempt at a (peer, address, channel) with the
/// time left. Stops at the first failure.
pub(crate) fn dial_all<T>(
    cfg: &MeshConfig,
    deadline: Instant,
    abandon: &AtomicBool,
    mut attempt: impl FnMut(NodeId, SocketAddr, Channel, Duration) -> Result<T, AttemptFailed>,
) -> Result<BTreeMap<(NodeId, Channel), T>, TransportError> {
    let mut dialed = BTreeMap::new();
    for (peer, addr) in cfg.dialed_peers() {
        for channel in Channel::ALL {
            let done = dial_until_deadline(cfg, peer, addr, deadline, abandon, |remaining| {
                attempt(peer, addr, channel, remaining)
            })?;
            dialed.insert((peer, channel), done);
        }
    }
    Ok(dialed)
}

/// Runs `attempt` (given the time left until `deadline`) until it succeeds or fails
/// definitively; fails with [`TransportError::SetupAbandoned`] once `abandon` is set, and with
/// [`TransportError::PeerUnreachable`] (naming the last problem) once the deadline passed.
fn dial_until_deadline<T>(
    cfg: &MeshConfig,
    peer: NodeId,
    addr: SocketAddr,
    deadline: Instant,
    abandon: &AtomicBool,
    mut attempt: impl FnMut(Duration) -> Result<T, AttemptFailed>,
) -> Result<T, TransportError> {
    let mut last_problem = String::from("no connection attempt could be made");
    loop {
        if abandon.load(Ordering::Acquire) {
            return Err(TransportError::SetupAbandoned);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(TransportError::PeerUnreachable {
                peer,
                addr,
                waited: cfg.connect_timeout,
                detail: last_problem,
            });
        }
        match attempt(remaining) {
            Ok(done) => return Ok(done),
            Err(AttemptFailed::Definitive(error)) => return Err(error),
            Err(AttemptFailed::Passing(problem)) => last_problem = problem,
        }
        thread::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
    }
}

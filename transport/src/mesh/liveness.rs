//! Heartbeats and the watchdog: how a peer that is frozen, or whose connection is half-open,
//! is found lost although none of its connections ever reports an error.

use std::sync::Arc;
use std::thread;

use crate::channel::Channel;
use crate::error::TransportError;
use crate::frame::{FrameRef, KIND_HEARTBEAT};

use super::link::LinkConn;
use super::state::MeshState;

/// Starts sending a heartbeat to every live peer every `heartbeat_interval`, on the control
/// channel. Runs from before the mesh-ready barrier, so that no peer that finished setup
/// earlier sees this node silent.
pub(crate) fn start_heartbeats<C: LinkConn>(
    mesh: &Arc<MeshState<C>>,
) -> Result<(), TransportError> {
    mesh.spawn("xport-heartbeat".to_string(), |mesh| {
        let mut sequence = 0u64;
        loop {
            thread::park_timeout(mesh.liveness.heartbeat_interval);
            if mesh.is_shutting_down() {
                return;
            }
            sequence += 1;
            let beat = FrameRef {
                kind: KIND_HEARTBEAT,
                flags: 0,
                id: sequence,
                arg: 0,
                payload: &[],
            };
            for link in mesh.links.values().filter(|l| !l.is_lost()) {
                if let Err(e) = link.conn(Channel::Control).send_heartbeat(beat) {
                    let why = format!("sending a heartbeat on the control channel failed: {e}");
                    mesh.declare_lost(link.id, &why);
                }
            }
        }
    })
}

/// Starts declaring lost every peer silent for longer than `silence_timeout`.
pub(crate) fn start_watchdog<C: LinkConn>(mesh: &Arc<MeshState<C>>) -> Result<(), TransportError> {
    mesh.spawn("xport-watchdog".to_string(), |mesh| {
        let limit = mesh.liveness.silence_timeout;
        let check_every = mesh.liveness.heartbeat_interval.min(limit / 4);
        loop {
            thread::park_timeout(check_every);
            if mesh.is_shutting_down() {
                return;
            }
            for link in mesh.links.values().filter(|l| !l.is_lost()) {
                let silence = mesh.silence(link);
                if silence > limit {
                    let why = format!(
                        "nothing (no frame, no heartbeat) arrived from node {} for {:.1} s, \
                         more than the {:.1} s allowed: it is frozen or overloaded, or the \
                         {} to it is down",
                        link.id,
                        silence.as_secs_f64(),
                        limit.as_secs_f64(),
                        C::PATH
                    );
                    mesh.declare_lost(link.id, &why);
                }
            }
        }
    })
}

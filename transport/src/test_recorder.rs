//! A frame handler for the unit tests of both backends: it records what the mesh delivered
//! and which losses it reported, and lets a test wait for them.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::api::FrameHandler;
use crate::channel::{Channel, NodeId};
use crate::frame::{Frame, FrameRef};

/// How long a wait goes on before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Seen {
    frames: Vec<(NodeId, Channel, Frame)>,
    lost: Vec<(NodeId, String)>,
}

/// What a mesh's handler saw.
#[derive(Default)]
pub(crate) struct Recorder {
    seen: Mutex<Seen>,
    changed: Condvar,
}

impl FrameHandler for Recorder {
    fn on_frame(&self, from: NodeId, channel: Channel, frame: FrameRef<'_>) {
        self.seen().frames.push((from, channel, frame.to_frame()));
        self.changed.notify_all();
    }

    fn on_peer_lost(&self, peer: NodeId, why: &str) {
        self.seen().lost.push((peer, why.to_string()));
        self.changed.notify_all();
    }
}

impl Recorder {
    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The frames delivered so far.
    pub(crate) fn frames(&self) -> Vec<(NodeId, Channel, Frame)> {
        self.seen().frames.clone()
    }

    /// The losses reported so far (only the RDMA tests look without waiting).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn lost(&self) -> Vec<(NodeId, String)> {
        self.seen().lost.clone()
    }

    /// The frames, once there is at least one (or after 20 s, to fail instead of hanging).
    pub(crate) fn wait_for_frame(&self) -> Vec<(NodeId, Channel, Frame)> {
        self.wait_until(|seen| !seen.frames.is_empty())
            .frames
            .clone()
    }

    /// The losses, once there is at least one (or after 20 s, to fail instead of hanging).
    pub(crate) fn wait_for_loss(&self) -> Vec<(NodeId, String)> {
        self.wait_until(|seen| !seen.lost.is_empty()).lost.clone()
    }

    fn wait_until(&self, done: impl Fn(&Seen) -> bool) -> MutexGuard<'_, Seen> {
        let (seen, _) = self
            .changed
            .wait_timeout_while(self.seen(), PATIENCE, |seen| !done(seen))
            .unwrap_or_else(PoisonError::into_inner);
        seen
    }
}

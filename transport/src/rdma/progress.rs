//! The RDMA mesh's progress threads: one per (peer, channel), polling that queue pair's
//! completions and turning what they report into the mesh's state and the handler's calls.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::channel::{Channel, NodeId};
use crate::error::TransportError;
use crate::frame::FrameRef;
use crate::mesh::link::PeerLink;
use crate::mesh::state::MeshState;
use crate::spin_budget;

use super::conn::{Conn, ConnEvents};
use super::mesh::MeshCore;
use super::ready::ReadyPeers;

/// How long an idle progress loop sleeps in the completion channel before it looks at the
/// shutdown flag again; frames wake it at once.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How long it sleeps while frames wait for credits, which come back without a completion.
const BACKLOG_WAIT: Duration = Duration::from_micros(200);

impl MeshState<Conn> {
    /// Starts one progress loop per connection: it polls the connection's completions (busy,
    /// for the DSM request channel with `busy_poll` while the process-wide spin budget has a
    /// core to spare; otherwise sleeping in the completion channel) and hands frames to the
    /// handler, in order per (peer, channel). `ready` learns which peers passed the mesh-ready
    /// barrier.
    pub(crate) fn start_progress(
        self: &Arc<Self>,
        ready: &Arc<ReadyPeers>,
    ) -> Result<(), TransportError> {
        for &peer in self.links.keys() {
            for channel in Channel::ALL {
                let name = format!("xport-rdma{peer}-{}", channel.index());
                let ready = Arc::clone(ready);
                self.spawn(name, move |core| core.progress_loop(peer, channel, &ready))?;
            }
        }
        Ok(())
    }

    fn progress_loop(&self, peer: NodeId, channel: Channel, ready: &ReadyPeers) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let conn = link.conn(channel);
        // Held for as long as this loop spins; dropping it gives the core back.
        let spin_claim = if self.busy_poll && channel == Channel::DsmRequest {
            spin_budget::claim()
                .map_err(|refused| {
                    eprintln!(
                        "spanvm transport: node {}, RDMA receiver from node {peer}: {refused}",
                        self.me
                    );
                })
                .ok()
        } else {
            None
        };
        let spinning = spin_claim.is_some();
        self.raise_receiver(channel, spinning);
        let events = LinkEvents {
            core: self,
            link,
            ready,
        };
        loop {
            if self.is_shutting_down() || link.is_lost() {
                return;
            }
            match conn.progress(&events) {
                Ok(0) if spinning => {
                    std::hint::spin_loop();
                    thread::yield_now();
                }
                Ok(0) => {
                    let wait = if conn.has_backlog() {
                        BACKLOG_WAIT
                    } else {
                        IDLE_WAIT
                    };
                    conn.verbs().wait(wait);
                }
                Ok(_) => {}
                Err(why) => {
                    if !self.is_shutting_down() && !link.is_lost() {
                        eprintln!(
                            "spanvm transport: node {} drops node {peer}: {why}",
                            self.me
                        );
                    }
                    self.declare_lost(peer, &why);
                    return;
                }
            }
        }
    }
}

/// What one peer's connections report, turned into the mesh's state and the handler's calls.
struct LinkEvents<'a> {
    core: &'a MeshCore,
    link: &'a PeerLink<Conn>,
    ready: &'a ReadyPeers,
}

impl ConnEvents for LinkEvents<'_> {
    fn heard(&self) {
        self.core.heard_from(self.link);
    }

    fn deliver(&self, channel: Channel, frame: FrameRef<'_>) -> Result<(), String> {
        let peer = self.link.id;
        let handler = &self.core.handler;
        panic::catch_unwind(AssertUnwindSafe(|| {
            handler.on_frame(peer, channel, frame);
        }))
        .map_err(|_| {
            format!(
                "the frame handler panicked on a frame from node {peer} on the {channel} \
                 channel, so that connection can no longer be served"
            )
        })
    }

    fn mesh_ready(&self) {
        self.ready.mark(self.link.id);
    }
}

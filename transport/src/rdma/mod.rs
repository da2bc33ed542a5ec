//! The RDMA backend (cargo feature `rdma`): the same mesh as [`crate::TcpMesh`], over
//! reliable-connected queue pairs.
//!
//! # Connections
//! One reliable-connected queue pair per (peer, channel), so that, as on TCP, a page request
//! never queues behind bulk data. The node with the higher id connects with librdmacm to the
//! lower one's `listen` address (an IP address of its RDMA interface, e.g. the RoCE netdev).
//!
//! # Handshake
//! Every new queue pair runs the TCP backend's handshake unchanged (hello, HMAC proofs of the
//! cluster secret, layout hash and, on a mismatch, the first differing line), its bytes carried
//! in SENDs (`stream.rs`). Only then does each end send its pool advert (`advert.rs`): the
//! address and key of the memory the peer may RDMA WRITE, so that no unauthenticated node
//! learns a key.
//!
//! # Frames
//! Requests and control frames are two-sided SEND/RECV into pre-posted registered receive
//! buffers; page payloads are RDMA WRITTEN straight into a registered, pre-allocated staging
//! ring of the receiver, then announced by a SEND; the receiver lends the payload to the
//! handler from where it landed. Credits keep every SEND matched by a posted receive
//! (`conn/mod.rs` has the details).
//!
//! # Lost peers
//! A failed work completion (the queue pair went to the error state: the peer's adapter
//! stopped acknowledging, it disconnected, or an access was refused), a malformed message, or
//! silence past the liveness limit (heartbeats go on the control channel, as on TCP) make the
//! transport close every queue pair of that peer and call [`FrameHandler::on_peer_lost`]
//! exactly once.
//!
//! # Threads
//! One progress thread per (peer, channel) polls that queue pair's completions. It sleeps in
//! the completion channel, or, with [`MeshConfig::busy_poll`], the DSM request channel's polls
//! without sleeping (as far as the process-wide spin budget allows, as on TCP).
//!
//! # Testing
//! The verbs sit behind a small trait (`verbs.rs`); the unit tests run everything above it on
//! an in-memory pair of endpoints (`fake.rs`). Without a device only the start-up check runs
//! against the real library.

mod advert;
mod cm;
mod conn;
#[cfg(test)]
mod fake;
mod ibverbs;
mod mesh;
mod message;
mod pool;
mod progress;
mod ready;
mod region;
mod setup;
mod stream;
mod verbs;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::api::FrameHandler;
use crate::channel::{Channel, NodeId, TransportKind};
use crate::config::MeshConfig;
use crate::error::TransportError;
use crate::frame::KIND_MESH_READY;
use crate::handshake::Credentials;

use crate::mesh::liveness;
use crate::mesh::transport::MeshBackend;
use conn::{transport_frame, Conn};
use mesh::MeshCore;
use ready::ReadyPeers;

/// The barrier waits at least this long even when `connect_timeout` is used up by then.
const MIN_BARRIER_WAIT: Duration = Duration::from_secs(1);
/// How often the barrier looks at who is ready.
const BARRIER_POLL: Duration = Duration::from_millis(5);

/// A node's connections to every other node, over RDMA. Dropping the last `Arc` shuts it down.
pub struct RdmaMesh {
    core: Arc<MeshCore>,
}

impl RdmaMesh {
    /// Checks that this machine has an RDMA device (failing at once with
    /// [`TransportError::NoRdmaDevice`] if not), listens on `cfg.listen`, connects a queue pair
    /// per (peer, channel), authenticates and compares layouts on each, waits until every node
    /// has all its connections, then starts delivering frames to `handler`.
    pub fn establish(
        cfg: MeshConfig,
        handler: Arc<dyn FrameHandler>,
    ) -> Result<Arc<RdmaMesh>, TransportError> {
        cfg.validate()?;
        ibverbs::require_device()?;
        let deadline = Instant::now() + cfg.connect_timeout;
        let creds = Credentials::new(&cfg);
        let conns = setup::connect_all(&cfg, &creds, deadline)?;
        Self::start(&cfg, handler, conns, deadline)
    }

    /// Runs a mesh on connections that are handshaken and advertised: starts the threads,
    /// passes the mesh-ready barrier, and from then on reports losses.
    fn start(
        cfg: &MeshConfig,
        handler: Arc<dyn FrameHandler>,
        conns: BTreeMap<NodeId, Vec<Conn>>,
        deadline: Instant,
    ) -> Result<Arc<RdmaMesh>, TransportError> {
        let core = Arc::new(MeshCore::new(
            cfg.me,
            handler,
            cfg.liveness,
            cfg.busy_poll,
            cfg.service_priority,
            mesh::links(conns),
        ));
        let ready_peers = Arc::new(ReadyPeers::new(core.peers()));
        // From here on, an early return drops `mesh`, which stops the threads started so far.
        let mesh = Arc::new(RdmaMesh {
            core: Arc::clone(&core),
        });
        core.start_progress(&ready_peers)?;
        liveness::start_heartbeats(&core)?;
        let ready = transport_frame(KIND_MESH_READY, &[]);
        for link in core.links.values() {
            if let Err(e) = link.conn(Channel::Control).send_control(ready) {
                return Err(TransportError::LostDuringSetup {
                    peer: link.id,
                    why: format!("telling it this node is ready failed: {e}"),
                });
            }
        }
        let started = Instant::now();
        let until = deadline.max(started + MIN_BARRIER_WAIT);
        loop {
            if let Some(peer) = core.first_lost() {
                return Err(TransportError::LostDuringSetup {
                    peer,
                    why: "one of its queue pairs failed while the mesh was starting".to_string(),
                });
            }
            let Some(waiting) = ready_peers.first_waiting() else {
                break;
            };
            if Instant::now() >= until {
                return Err(TransportError::MeshIncomplete {
                    peer: waiting,
                    waited: started.elapsed(),
                    detail: "it never said it had all its connections".to_string(),
                });
            }
            thread::sleep(BARRIER_POLL);
        }
        core.set_running();
        liveness::start_watchdog(&core)?;
        Ok(mesh)
    }
}

impl MeshBackend for RdmaMesh {
    type Conn = Conn;

    const KIND: TransportKind = TransportKind::Rdma;

    fn state(&self) -> &MeshCore {
        &self.core
    }
}

impl Drop for RdmaMesh {
    fn drop(&mut self) {
        self.core.shutdown();
    }
}

#[cfg(test)]
mod tests;

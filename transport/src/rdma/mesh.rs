//! The RDMA mesh's shared state: [`MeshState`] over RDMA [`Conn`]s, and what the shared mesh
//! code needs of an RDMA connection.

use std::collections::BTreeMap;

use crate::api::TransportStats;
use crate::channel::{Channel, NodeId};
use crate::error::TransportError;
use crate::frame::FrameRef;
use crate::mesh::link::{LinkConn, PeerLink, SendFailure};
use crate::mesh::state::MeshState;

use super::conn::{Conn, ConnError};

/// The shared state of an RDMA mesh.
pub(crate) type MeshCore = MeshState<Conn>;

impl LinkConn for Conn {
    type SendError = ConnError;
    const PATH: &'static str = "RDMA path";

    fn close(&self) {
        Conn::close(self);
    }

    fn stats(&self) -> TransportStats {
        Conn::stats(self)
    }

    /// A peer that died makes the heartbeat's SEND fail (retries exceeded), and a frozen one
    /// stops sending its own, which the watchdog notices.
    fn send_heartbeat(&self, beat: FrameRef<'_>) -> Result<(), ConnError> {
        self.send(beat)
    }

    fn send_frame(&self, frame: FrameRef<'_>) -> Result<(), ConnError> {
        self.send(frame)
    }

    fn send_failure(error: ConnError, peer: NodeId, channel: Channel) -> SendFailure {
        match error {
            ConnError::Closed => SendFailure {
                error: TransportError::PeerLost { peer },
                loses_peer: false,
            },
            ConnError::Backlog(queued) => SendFailure {
                error: TransportError::NotReading {
                    peer,
                    channel,
                    queued,
                },
                loses_peer: true,
            },
            ConnError::Verbs(source) => SendFailure {
                error: TransportError::SendFailed {
                    peer,
                    channel,
                    source: std::io::Error::other(source.to_string()),
                },
                loses_peer: true,
            },
        }
    }
}

/// Takes the established connections: for every peer, one per channel in [`Channel::ALL`]
/// order.
pub(crate) fn links(conns: BTreeMap<NodeId, Vec<Conn>>) -> BTreeMap<NodeId, PeerLink<Conn>> {
    conns
        .into_iter()
        .map(|(id, conns)| (id, PeerLink::new(id, conns)))
        .collect()
}

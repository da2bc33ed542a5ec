//! The [`Transport`] API of a mesh, the same for every backend.

use crate::api::{Transport, TransportStats};
use crate::channel::{Channel, NodeId, TransportKind};
use crate::error::TransportError;
use crate::frame::FrameRef;

use super::link::LinkConn;
use super::state::MeshState;

/// A backend's public mesh type: what it runs on and which kind it is.
pub(crate) trait MeshBackend: Send + Sync {
    type Conn: LinkConn;

    const KIND: TransportKind;

    fn state(&self) -> &MeshState<Self::Conn>;
}

impl<B: MeshBackend> Transport for B {
    fn me(&self) -> NodeId {
        self.state().me
    }

    fn peers(&self) -> Vec<NodeId> {
        self.state().peers()
    }

    fn send_ref(
        &self,
        to: NodeId,
        channel: Channel,
        frame: FrameRef<'_>,
    ) -> Result<(), TransportError> {
        self.state().send_ref(to, channel, frame)
    }

    fn stats(&self) -> TransportStats {
        self.state().stats()
    }

    fn is_lost(&self, peer: NodeId) -> bool {
        self.state().is_lost(peer)
    }

    fn kind(&self) -> TransportKind {
        B::KIND
    }

    fn shutdown(&self) {
        self.state().shutdown();
    }
}

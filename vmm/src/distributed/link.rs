//! The DSM's way out: its messages as transport frames, page requests on the request connection
//! and page data and invalidations on the bulk one.

use std::sync::{Arc, OnceLock};

use dsm::{DsmLink, DsmMessage, LinkError, NodeId};
use transport::{Channel, FrameRef, TcpMesh, Transport};

/// A [`DsmLink`] over the node's mesh (set once the mesh is up).
#[derive(Default)]
pub struct MeshLink {
    mesh: OnceLock<Arc<TcpMesh>>,
}

impl MeshLink {
    /// Gives the link its mesh.
    pub fn set(&self, mesh: Arc<TcpMesh>) {
        let _ = self.mesh.set(mesh);
    }
}

impl DsmLink for MeshLink {
    fn send(&self, to: NodeId, msg: &DsmMessage) -> Result<(), LinkError> {
        let mesh = self.mesh.get().ok_or_else(|| LinkError {
            peer: to,
            reason: "the mesh is not up yet".into(),
        })?;
        let channel = if msg.is_bulk() {
            Channel::DsmBulk
        } else {
            Channel::DsmRequest
        };
        let frame = FrameRef {
            kind: msg.kind(),
            flags: msg.flags(),
            id: msg.id().to_wire(),
            arg: msg.arg(),
            payload: msg.payload(),
        };
        mesh.send_ref(to as u32, channel, frame)
            .map_err(|e| LinkError {
                peer: to,
                reason: e.to_string(),
            })
    }
}

//! The DSM's way out: its messages as transport frames, page requests on the request connection
//! and page data and invalidations on the bulk one.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dsm::{DsmLink, DsmMessage, LinkError, NodeId};
use transport::{Channel, FrameRef, TcpMesh, Transport};

/// How long a DSM message waits for the mesh to come up: a peer may ask for a page while
/// this node's `TcpMesh::establish` has not returned yet (its receivers already run); the
/// answer waits until the mesh is there instead of failing.
const MESH_UP_WAIT: Duration = Duration::from_secs(60);

/// A [`DsmLink`] over the node's mesh (set once the mesh is up).
#[derive(Default)]
pub struct MeshLink {
    mesh: OnceLock<Arc<TcpMesh>>,
    up: Mutex<bool>,
    set: Condvar,
}

impl MeshLink {
    /// Gives the link its mesh.
    pub fn set(&self, mesh: Arc<TcpMesh>) {
        let _ = self.mesh.set(mesh);
        *self.up.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.set.notify_all();
    }

    /// The mesh, waiting (bounded) for it during setup.
    fn mesh(&self) -> Option<&Arc<TcpMesh>> {
        if let Some(m) = self.mesh.get() {
            return Some(m);
        }
        let deadline = Instant::now() + MESH_UP_WAIT;
        let mut up = self.up.lock().unwrap_or_else(|p| p.into_inner());
        while !*up {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            up = self
                .set
                .wait_timeout(up, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        self.mesh.get()
    }
}

impl DsmLink for MeshLink {
    fn send(&self, to: NodeId, msg: &DsmMessage) -> Result<(), LinkError> {
        let mesh = self.mesh().ok_or_else(|| LinkError {
            peer: to,
            reason: format!("the mesh did not come up within {MESH_UP_WAIT:?}"),
        })?;
        let channel = if msg.is_bulk() {
            Channel::DsmBulk
        } else {
            Channel::DsmRequest
        };
        // Borrowed for the common frames; built only when a sharer set follows page bytes.
        let payload = msg.payload();
        let frame = FrameRef {
            kind: msg.kind(),
            flags: msg.flags(),
            id: msg.id().to_wire(),
            arg: msg.arg(),
            payload: &payload,
        };
        mesh.send_ref(
            u32::try_from(to).expect("dsm node ids are below MAX_NODES"),
            channel,
            frame,
        )
        .map_err(|e| LinkError {
            peer: to,
            reason: e.to_string(),
        })
    }
}

//! The DSM's way out: its messages as transport frames, page requests on the request connection
//! and page data and invalidations on the bulk one.

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use dsm::{DsmLink, DsmMessage, LinkError, NodeId};
use transport::{Channel, FrameRef, Transport};

/// How long a DSM message waits for the mesh to come up: a peer may ask for a page while
/// this node's `transport::establish` has not returned yet (its receivers already run); the
/// answer waits until the mesh is there instead of failing.
const MESH_UP_WAIT: Duration = Duration::from_secs(60);

/// A [`DsmLink`] over the node's mesh (set once the mesh is up).
///
/// It holds the mesh weakly: the mesh holds the frame handler, which holds the DSM, which holds
/// this link; a strong reference would keep the DSM, and with it the userfaultfd registration
/// of guest memory, alive for ever (and guest memory is unmapped only once that registration is
/// released, see `crate::memory`).
#[derive(Default)]
pub struct MeshLink {
    mesh: OnceLock<Weak<dyn Transport>>,
    up: Mutex<bool>,
    set: Condvar,
}

impl MeshLink {
    /// Gives the link its mesh.
    pub fn set(&self, mesh: &Arc<dyn Transport>) {
        let _ = self.mesh.set(Arc::downgrade(mesh));
        *self.up.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.set.notify_all();
    }

    /// The mesh, waiting (bounded) for it during setup; `Err` says why there is none.
    fn mesh(&self) -> Result<Arc<dyn Transport>, String> {
        if let Some(m) = self.mesh.get() {
            return m.upgrade().ok_or_else(gone);
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
        match self.mesh.get() {
            Some(m) => m.upgrade().ok_or_else(gone),
            None => Err(format!("the mesh did not come up within {MESH_UP_WAIT:?}")),
        }
    }
}

fn gone() -> String {
    "the mesh is shut down (the node is stopping)".to_string()
}

impl DsmLink for MeshLink {
    fn send(&self, to: NodeId, msg: &DsmMessage) -> Result<(), LinkError> {
        let mesh = self
            .mesh()
            .map_err(|reason| LinkError { peer: to, reason })?;
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
        mesh.send_ref(to, channel, frame).map_err(|e| LinkError {
            peer: to,
            reason: e.to_string(),
        })
    }
}

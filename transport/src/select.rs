//! Choosing the backend at run time: the one place that names one, so that the VMM holds every
//! transport as `Arc<dyn Transport>`.

use std::net::TcpListener;
use std::sync::Arc;

use crate::api::{FrameHandler, Transport};
use crate::channel::TransportKind;
use crate::config::MeshConfig;
use crate::error::TransportError;
use crate::tcp::TcpMesh;

/// Connects this node to every peer over the backend `kind` (see [`TcpMesh::establish`] for
/// what "established" means; every backend keeps the same promises).
pub fn establish(
    kind: TransportKind,
    cfg: MeshConfig,
    handler: Arc<dyn FrameHandler>,
) -> Result<Arc<dyn Transport>, TransportError> {
    match kind {
        TransportKind::Tcp => Ok(TcpMesh::establish(cfg, handler)?),
        TransportKind::Rdma => establish_rdma(cfg, handler),
    }
}

/// Like [`establish`], on a TCP listener the caller bound already (on port 0, say). RDMA
/// listens on the listener's address in its own port space, so the listener is closed first.
pub fn establish_on(
    kind: TransportKind,
    listener: TcpListener,
    mut cfg: MeshConfig,
    handler: Arc<dyn FrameHandler>,
) -> Result<Arc<dyn Transport>, TransportError> {
    match kind {
        TransportKind::Tcp => Ok(TcpMesh::establish_on(listener, cfg, handler)?),
        TransportKind::Rdma => {
            cfg.listen = listener
                .local_addr()
                .map_err(|source| TransportError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
            drop(listener);
            establish_rdma(cfg, handler)
        }
    }
}

#[cfg(feature = "rdma")]
fn establish_rdma(
    cfg: MeshConfig,
    handler: Arc<dyn FrameHandler>,
) -> Result<Arc<dyn Transport>, TransportError> {
    Ok(crate::rdma::RdmaMesh::establish(cfg, handler)?)
}

#[cfg(not(feature = "rdma"))]
fn establish_rdma(
    cfg: MeshConfig,
    _handler: Arc<dyn FrameHandler>,
) -> Result<Arc<dyn Transport>, TransportError> {
    // Refused before anything binds or dials, so the peers see a node that never came.
    cfg.validate()?;
    Err(TransportError::RdmaNotBuilt)
}

#[cfg(all(test, not(feature = "rdma")))]
mod tests {
    use super::*;
    use crate::api::FrameHandler;
    use crate::channel::{Channel, NodeId};
    use crate::frame::FrameRef;

    struct Ignore;
    impl FrameHandler for Ignore {
        fn on_frame(&self, _: NodeId, _: Channel, _: FrameRef<'_>) {}
        fn on_peer_lost(&self, _: NodeId, _: &str) {}
    }

    #[test]
    fn rdma_without_the_feature_is_refused_with_what_to_do() {
        let cfg = MeshConfig {
            me: 0,
            listen: "127.0.0.1:0".parse().unwrap(),
            peers: vec![(1, "127.0.0.1:9".parse().unwrap())],
            secret: vec![7; 32],
            layout_canonical: "layout".into(),
            connect_timeout: std::time::Duration::from_secs(1),
            busy_poll: false,
            service_priority: crate::ServicePriority::Normal,
            liveness: Default::default(),
            socket_buffer: None,
        };
        let error = establish(TransportKind::Rdma, cfg, Arc::new(Ignore))
            .err()
            .expect("an RDMA mesh without the rdma feature");
        assert!(matches!(error, TransportError::RdmaNotBuilt), "{error}");
        let message = error.to_string();
        assert!(message.contains("--features rdma"), "{message}");
        assert!(message.contains("libibverbs-dev"), "{message}");
    }
}

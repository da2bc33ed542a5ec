//! The TCP backend: a full mesh of TCP connections, one per (peer, channel).

mod connection;
mod dial;
mod inner;
mod receiver;
mod setup;
mod setup_watch;
mod writer;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

use crate::api::FrameHandler;
use crate::channel::{Channel, TransportKind};
use crate::config::MeshConfig;
use crate::error::TransportError;
use crate::handshake::Credentials;
use crate::mesh;
use crate::mesh::transport::MeshBackend;
use crate::spin_budget;

use inner::MeshInner;

/// A node's connections to every other node, over TCP. Dropping the last `Arc` shuts it down.
pub struct TcpMesh {
    inner: Arc<MeshInner>,
}

impl TcpMesh {
    /// Listens on `cfg.listen`, connects to every peer (retrying until `connect_timeout`),
    /// authenticates and compares layouts on every connection, waits until every node has all
    /// its connections, then starts one receiver thread per (peer, channel) delivering to
    /// `handler`. Fails if any peer is lost before setup ends (the handler may have been told
    /// of that loss as well).
    pub fn establish(
        cfg: MeshConfig,
        handler: Arc<dyn FrameHandler>,
    ) -> Result<Arc<TcpMesh>, TransportError> {
        cfg.validate()?;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| TransportError::Listen {
            addr: cfg.listen,
            source,
        })?;
        Self::establish_on(listener, cfg, handler)
    }

    /// Like [`TcpMesh::establish`], on a listener the caller bound already (for instance on
    /// port 0, or inherited from a supervisor). `cfg.listen` is then only used in messages.
    pub fn establish_on(
        listener: TcpListener,
        cfg: MeshConfig,
        handler: Arc<dyn FrameHandler>,
    ) -> Result<Arc<TcpMesh>, TransportError> {
        cfg.validate()?;
        let deadline = Instant::now() + cfg.connect_timeout;
        let creds = Credentials::new(&cfg);
        let streams = setup::connect_all(&listener, &cfg, &creds, deadline)?;
        // Nobody else may connect once the mesh is complete.
        drop(listener);

        let inner = Arc::new(inner::build(&cfg, handler, streams)?);
        // From here on, an early return drops `mesh`, which closes everything and stops the
        // threads started so far.
        let mesh = Arc::new(TcpMesh {
            inner: Arc::clone(&inner),
        });
        writer::start_writers(&inner)?;
        mesh::liveness::start_heartbeats(&inner)?;
        let mut control_readers = setup::await_mesh_ready(&inner, deadline, cfg.connect_timeout)?;

        inner.set_running();
        for link in inner.links.values() {
            for channel in Channel::ALL {
                let from_barrier = match channel {
                    Channel::Control => control_readers.remove(&link.id),
                    _ => None,
                };
                let reader = match from_barrier {
                    Some(reader) => reader,
                    None => {
                        let spinning = if inner.busy_poll && channel == Channel::DsmRequest {
                            match spin_budget::claim() {
                                Ok(claim) => Some(claim),
                                Err(refused) => {
                                    eprintln!(
                                        "spanvm transport: node {}, receiver from node {}: \
                                         {refused}",
                                        inner.me, link.id
                                    );
                                    None
                                }
                            }
                        } else {
                            None
                        };
                        link.conn(channel).reader(spinning).map_err(|source| {
                            TransportError::Socket {
                                peer: link.id,
                                channel,
                                source,
                            }
                        })?
                    }
                };
                receiver::start_receiver(&inner, link.id, channel, reader)?;
            }
        }
        mesh::liveness::start_watchdog(&inner)?;
        if let Some(peer) = inner.first_lost() {
            return Err(TransportError::LostDuringSetup {
                peer,
                why: "one of its connections failed while the mesh was starting".to_string(),
            });
        }
        Ok(mesh)
    }
}

impl MeshBackend for TcpMesh {
    type Conn = connection::Connection;

    const KIND: TransportKind = TransportKind::Tcp;

    fn state(&self) -> &MeshInner {
        &self.inner
    }
}

impl Drop for TcpMesh {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod backlog_tests;

//! The TCP mesh's shared state ([`MeshState`] over TCP [`Connection`]s): how it is built from
//! the sockets setup made, and what the shared code needs of a TCP connection.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{FrameHandler, TransportStats};
use crate::channel::{Channel, NodeId};
use crate::config::MeshConfig;
use crate::error::TransportError;
use crate::frame::FrameRef;
use crate::mesh::link::{LinkConn, PeerLink, SendFailure};
use crate::mesh::state::MeshState;

use super::connection::{Connection, SendError};

/// The shared state of a TCP mesh.
pub(crate) type MeshInner = MeshState<Connection>;

impl LinkConn for Connection {
    type SendError = SendError;
    const PATH: &'static str = "network path";

    fn close(&self) {
        Connection::close(self);
    }

    fn stats(&self) -> TransportStats {
        Connection::stats(self)
    }

    fn send_frame(&self, frame: FrameRef<'_>) -> Result<(), SendError> {
        self.write_frame(frame)
    }

    /// Only when nothing is queued: bytes on their way are proof of life too.
    fn send_heartbeat(&self, beat: FrameRef<'_>) -> Result<(), SendError> {
        self.try_write_frame(beat).map(|_| ())
    }

    fn send_failure(error: SendError, peer: NodeId, channel: Channel) -> SendFailure {
        match error {
            SendError::Closed => SendFailure {
                error: TransportError::PeerLost { peer },
                loses_peer: false,
            },
            SendError::Io(source) => SendFailure {
                error: TransportError::SendFailed {
                    peer,
                    channel,
                    source,
                },
                loses_peer: true,
            },
            SendError::Backlog(queued) => SendFailure {
                error: TransportError::NotReading {
                    peer,
                    channel,
                    queued,
                },
                loses_peer: true,
            },
        }
    }
}

/// Takes the connections setup made (one per peer and channel).
pub(crate) fn build(
    cfg: &MeshConfig,
    handler: Arc<dyn FrameHandler>,
    mut streams: BTreeMap<(NodeId, Channel), TcpStream>,
) -> Result<MeshInner, TransportError> {
    let mut links = BTreeMap::new();
    for &(peer, addr) in &cfg.peers {
        let mut conns = Vec::with_capacity(Channel::COUNT);
        for channel in Channel::ALL {
            let stream = streams
                .remove(&(peer, channel))
                .ok_or_else(|| missing(peer, addr, channel))?;
            let socket_error = |source| TransportError::Socket {
                peer,
                channel,
                source,
            };
            // Only the writer thread blocks on this socket, and a peer that reads slowly
            // is not lost while it still sends (the watchdog decides): the timeout only
            // bounds how long the writer goes without checking for a close.
            stream
                .set_write_timeout(Some(cfg.liveness.heartbeat_interval))
                .map_err(socket_error)?;
            if let Some(bytes) = cfg.socket_buffer {
                set_socket_buffers(&stream, bytes).map_err(socket_error)?;
            }
            conns.push(Connection::new(stream));
        }
        links.insert(peer, PeerLink::new(peer, conns));
    }
    Ok(MeshState::new(
        cfg.me,
        handler,
        cfg.liveness,
        cfg.busy_poll,
        cfg.service_priority,
        links,
    ))
}

/// Sets both socket buffer sizes (the kernel doubles them and enforces a minimum).
fn set_socket_buffers(stream: &TcpStream, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: the descriptor belongs to `stream`, which outlives the call, and the option
        // value is a live `c_int` whose exact size is passed.
        let done = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&value).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
                    .expect("an int's size fits socklen_t"),
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn missing(peer: NodeId, addr: SocketAddr, channel: Channel) -> TransportError {
    TransportError::PeerUnreachable {
        peer,
        addr,
        waited: Duration::ZERO,
        detail: format!("setup ended without its {channel} connection"),
    }
}

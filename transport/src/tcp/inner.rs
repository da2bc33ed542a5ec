//! The state a running mesh shares between the caller's threads and its own: the connections
//! per peer, which peers are lost, and the transport's threads.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::api::FrameHandler;
use crate::channel::{Channel, NodeId};
use crate::config::{Liveness, MeshConfig};
use crate::error::TransportError;
use crate::frame::{FrameRef, FIRST_RESERVED_KIND, MAX_PAYLOAD};

use super::connection::{Connection, SendError};

/// Everything about one peer.
pub(crate) struct PeerLink {
    pub id: NodeId,
    /// One connection per channel, indexed by [`Channel::index`].
    conns: Vec<Connection>,
    lost: AtomicBool,
    /// When anything last arrived from this peer, in milliseconds since the mesh's epoch.
    last_heard_ms: AtomicU64,
}

impl PeerLink {
    pub(crate) fn conn(&self, channel: Channel) -> &Connection {
        &self.conns[channel.index()]
    }

    pub(crate) fn conns(&self) -> &[Connection] {
        &self.conns
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// The shared state of a mesh.
pub(crate) struct MeshInner {
    pub me: NodeId,
    pub links: BTreeMap<NodeId, PeerLink>,
    pub handler: Arc<dyn FrameHandler>,
    pub liveness: Liveness,
    pub busy_poll: bool,
    epoch: Instant,
    /// Set once setup is over: from then on, losses are reported to the handler.
    running: AtomicBool,
    shutting_down: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl MeshInner {
    /// Takes the connections setup made (one per peer and channel).
    pub(crate) fn new(
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
            let link = PeerLink {
                id: peer,
                conns,
                lost: AtomicBool::new(false),
                last_heard_ms: AtomicU64::new(0),
            };
            links.insert(peer, link);
        }
        Ok(MeshInner {
            me: cfg.me,
            links,
            handler,
            liveness: cfg.liveness,
            busy_poll: cfg.busy_poll,
            epoch: Instant::now(),
            running: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Starts reporting losses; every peer counts as just heard from.
    pub(crate) fn set_running(&self) {
        let now = self.now_ms();
        for link in self.links.values() {
            link.last_heard_ms.store(now, Ordering::Release);
        }
        self.running.store(true, Ordering::Release);
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn heard_from(&self, link: &PeerLink) {
        link.last_heard_ms.store(self.now_ms(), Ordering::Release);
    }

    /// How long `link` has been silent.
    pub(crate) fn silence(&self, link: &PeerLink) -> Duration {
        let last = link.last_heard_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    /// Closes every connection of `peer` and, once per peer and only while running, reports
    /// the loss to the handler (whose job it is to tell the user).
    pub(crate) fn declare_lost(&self, peer: NodeId, why: &str) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        if link.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        for conn in link.conns() {
            conn.close();
        }
        if self.running.load(Ordering::Acquire) && !self.is_shutting_down() {
            self.handler.on_peer_lost(peer, why);
        }
    }

    /// The first peer lost so far, if any.
    pub(crate) fn first_lost(&self) -> Option<NodeId> {
        self.links.values().find(|l| l.is_lost()).map(|l| l.id)
    }

    pub(crate) fn send_ref(
        &self,
        to: NodeId,
        channel: Channel,
        frame: FrameRef<'_>,
    ) -> Result<(), TransportError> {
        if frame.kind >= FIRST_RESERVED_KIND {
            return Err(TransportError::ReservedKind { kind: frame.kind });
        }
        if frame.payload.len() > MAX_PAYLOAD {
            return Err(TransportError::PayloadTooLarge {
                len: frame.payload.len(),
            });
        }
        self.send_unchecked(to, channel, frame)
    }

    fn send_unchecked(
        &self,
        to: NodeId,
        channel: Channel,
        frame: FrameRef<'_>,
    ) -> Result<(), TransportError> {
        let link = self
            .links
            .get(&to)
            .ok_or(TransportError::UnknownPeer { peer: to })?;
        if self.is_shutting_down() {
            return Err(TransportError::ShutDown);
        }
        if link.is_lost() {
            return Err(TransportError::PeerLost { peer: to });
        }
        link.conn(channel).write_frame(frame).map_err(|error| {
            let why = format!("sending on the {channel} channel failed: {error}");
            match error {
                SendError::Closed => TransportError::PeerLost { peer: to },
                SendError::Io(source) => {
                    self.declare_lost(to, &why);
                    TransportError::SendFailed {
                        peer: to,
                        channel,
                        source,
                    }
                }
                SendError::Backlog(queued) => {
                    self.declare_lost(to, &why);
                    TransportError::NotReading {
                        peer: to,
                        channel,
                        queued,
                    }
                }
            }
        })
    }

    /// Starts a transport thread that the shutdown will wait for.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        name: String,
        body: impl FnOnce(Arc<MeshInner>) + Send + 'static,
    ) -> Result<(), TransportError> {
        let inner = Arc::clone(self);
        let handle = thread::Builder::new()
            .name(name)
            .spawn(move || body(inner))
            .map_err(|source| TransportError::Thread { source })?;
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
        Ok(())
    }

    /// Closes everything and waits for the transport's threads (except the calling one).
    pub(crate) fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        for link in self.links.values() {
            for conn in link.conns() {
                conn.close();
            }
        }
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in &threads {
            handle.thread().unpark();
        }
        let current = thread::current().id();
        for handle in threads {
            if handle.thread().id() == current {
                continue;
            }
            let name = handle.thread().name().unwrap_or("?").to_string();
            if handle.join().is_err() {
                eprintln!(
                    "spanvm transport: node {}: thread {name} panicked (in a frame handler?)",
                    self.me
                );
            }
        }
    }
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

//! The two traits between the transport and its users: what receives frames, and what sends
//! them (the backend: TCP, or RDMA with the `rdma` feature). Past setup, nothing outside this
//! crate names a backend.

use crate::channel::{Channel, NodeId, TransportKind};
use crate::error::TransportError;
use crate::frame::{Frame, FrameRef};

/// How a node's sends went, summed over its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Frames handed to the transport.
    pub frames_sent: u64,
    /// Frames the socket could not take at once, left to a writer thread instead of making
    /// their sender wait.
    pub frames_queued: u64,
    /// The largest backlog of one connection, in bytes.
    pub peak_backlog_bytes: usize,
}

impl TransportStats {
    /// Adds another connection's numbers (the backlog peak is the larger of both).
    pub fn add(&mut self, other: TransportStats) {
        self.frames_sent += other.frames_sent;
        self.frames_queued += other.frames_queued;
        self.peak_backlog_bytes = self.peak_backlog_bytes.max(other.peak_backlog_bytes);
    }
}

impl std::fmt::Display for TransportStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  transport: sent {} frames; queued behind a full socket: {}; largest backlog: {} KiB",
            self.frames_sent,
            self.frames_queued,
            self.peak_backlog_bytes.div_ceil(1024)
        )
    }
}

/// What receives frames and learns of lost peers.
///
/// Called on the receiver thread of the (peer, channel) the frame came in on, so frames of one
/// (peer, channel) arrive in order; keep the call short, since the connection is not read while
/// it runs. Frames may arrive before [`crate::establish`] has returned (peers start sending as
/// soon as their own setup is done). The transport has checked the header only: validate every
/// field against the guest layout before acting on it.
pub trait FrameHandler: Send + Sync {
    /// A frame arrived from `from` on `channel`. The payload is lent from the backend's
    /// receive buffer (TCP's read buffer, an RDMA receive buffer) and is reused once this
    /// returns: copy what must outlive the call ([`FrameRef::to_frame`]), so that no frame
    /// costs an allocation the handler does not need.
    fn on_frame(&self, from: NodeId, channel: Channel, frame: FrameRef<'_>);

    /// `peer` is gone: its connections broke, it sent a malformed frame, or it was silent past
    /// the liveness limit. Called exactly once per peer, never after [`Transport::shutdown`].
    /// All connections to the peer are closed by the time this is called.
    fn on_peer_lost(&self, peer: NodeId, why: &str);
}

/// A set of authenticated connections to every peer.
///
/// Hold it as `Arc<dyn Transport>`. A handler that needs to reply should reach the transport
/// through a `Weak` or a `OnceLock` set after setup: the transport owns the handler, so a strong
/// reference back keeps both alive until [`Transport::shutdown`].
pub trait Transport: Send + Sync {
    /// This node.
    fn me(&self) -> NodeId;

    /// Every peer, in id order (lost ones included).
    fn peers(&self) -> Vec<NodeId>;

    /// Sends one frame; thread-safe, the frame goes out whole and after every frame an
    /// earlier call handed to the same (peer, channel). Never waits for the peer to read: what
    /// the socket does not take at once is queued for the connection's writer thread, up to a
    /// bound past which the peer counts as stuck. Refuses payloads over
    /// [`crate::MAX_PAYLOAD`] and reserved kinds. A write error or a full queue makes the peer
    /// lost.
    fn send(&self, to: NodeId, channel: Channel, frame: &Frame) -> Result<(), TransportError> {
        self.send_ref(to, channel, frame.view())
    }

    /// Like [`Transport::send`], with a borrowed payload (a page straight from memory).
    fn send_ref(
        &self,
        to: NodeId,
        channel: Channel,
        frame: FrameRef<'_>,
    ) -> Result<(), TransportError>;

    /// How this node's sends went so far, over every connection.
    fn stats(&self) -> TransportStats;

    /// Whether `peer` has been declared lost.
    fn is_lost(&self, peer: NodeId) -> bool;

    /// Which backend this is.
    fn kind(&self) -> TransportKind;

    /// Closes every connection and stops the transport's threads; nothing is reported lost
    /// here (the peers, though, see this node lost). Waits for the threads, except when called
    /// from one of them (a handler).
    fn shutdown(&self);
}

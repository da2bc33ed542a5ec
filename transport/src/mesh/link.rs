//! One peer of a mesh: its connections (one per channel), whether it is lost, and when it was
//! last heard from; and the little a mesh needs of a backend's connection.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::api::TransportStats;
use crate::channel::{Channel, NodeId};
use crate::error::TransportError;
use crate::frame::FrameRef;

/// What the shared mesh code needs of a backend's connection.
pub(crate) trait LinkConn: Send + Sync + 'static {
    /// Why sending failed, as the messages say it.
    type SendError: Display;

    /// How the lost-peer messages name the way to a peer ("network path", "RDMA path").
    const PATH: &'static str;

    /// Ends the connection; later sends fail.
    fn close(&self);

    /// What went through this connection so far.
    fn stats(&self) -> TransportStats;

    /// Sends (or queues) a frame of the consumer.
    fn send_frame(&self, frame: FrameRef<'_>) -> Result<(), Self::SendError>;

    /// Sends a heartbeat frame, as the backend's liveness wants it sent.
    fn send_heartbeat(&self, beat: FrameRef<'_>) -> Result<(), Self::SendError>;

    /// What a failed [`LinkConn::send_frame`] to `peer` on `channel` means.
    fn send_failure(error: Self::SendError, peer: NodeId, channel: Channel) -> SendFailure;
}

/// What a failed send means for the caller.
pub(crate) struct SendFailure {
    /// What the caller gets.
    pub error: TransportError,
    /// Whether the connection is unusable, so that the peer is to be declared lost (not
    /// for a connection that was already closed: its peer is lost already).
    pub loses_peer: bool,
}

/// Everything about one peer.
pub(crate) struct PeerLink<C> {
    pub id: NodeId,
    /// One connection per channel, indexed by [`Channel::index`].
    conns: Vec<C>,
    lost: AtomicBool,
    /// When anything last arrived from this peer, in milliseconds since the mesh's epoch.
    last_heard_ms: AtomicU64,
}

impl<C> PeerLink<C> {
    /// `conns` holds one connection per channel, in [`Channel::ALL`] order.
    pub(crate) fn new(id: NodeId, conns: Vec<C>) -> PeerLink<C> {
        debug_assert_eq!(conns.len(), Channel::COUNT);
        PeerLink {
            id,
            conns,
            lost: AtomicBool::new(false),
            last_heard_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn conn(&self, channel: Channel) -> &C {
        &self.conns[channel.index()]
    }

    pub(crate) fn conns(&self) -> &[C] {
        &self.conns
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Marks the peer lost; true only for the call that did so.
    pub(super) fn mark_lost(&self) -> bool {
        !self.lost.swap(true, Ordering::AcqRel)
    }

    pub(super) fn set_last_heard_ms(&self, ms: u64) {
        self.last_heard_ms.store(ms, Ordering::Release);
    }

    pub(super) fn last_heard_ms(&self) -> u64 {
        self.last_heard_ms.load(Ordering::Acquire)
    }
}

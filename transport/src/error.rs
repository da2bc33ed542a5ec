//! Errors of mesh setup and of sending.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::channel::{Channel, NodeId};

/// The other end of a connection: a node id once its hello was read, and always its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    /// The id the remote end claims (or was dialed as); `None` before its hello was read.
    pub id: Option<NodeId>,
    /// Its socket address.
    pub addr: SocketAddr,
}

impl Remote {
    pub(crate) fn node(id: NodeId, addr: SocketAddr) -> Remote {
        Remote { id: Some(id), addr }
    }

    pub(crate) fn unidentified(addr: SocketAddr) -> Remote {
        Remote { id: None, addr }
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id {
            Some(id) => write!(f, "node {id} ({})", self.addr),
            None => write!(f, "an unidentified connection from {}", self.addr),
        }
    }
}

/// Everything that can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The config lists this node among its own peers.
    #[error(
        "invalid mesh config: node {me} lists itself among its peers; list every other node once"
    )]
    PeerIsSelf {
        /// This node.
        me: NodeId,
    },
    /// The config lists a peer twice.
    #[error("invalid mesh config: node {peer} is listed more than once among the peers")]
    DuplicatePeer {
        /// The repeated node.
        peer: NodeId,
    },
    /// The config has no cluster secret.
    #[error("invalid mesh config: the cluster secret is empty; give every node the same non-empty secret")]
    EmptySecret,
    /// The canonical layout text is too long for the handshake.
    #[error("invalid mesh config: the canonical layout text is {len} bytes, more than the {max} the handshake carries")]
    LayoutTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The heartbeat would not fit inside the silence limit.
    #[error("invalid mesh config: heartbeat interval {heartbeat_interval:?} must be non-zero and shorter than the silence timeout {silence_timeout:?}")]
    BadLiveness {
        /// Configured heartbeat interval.
        heartbeat_interval: Duration,
        /// Configured silence timeout.
        silence_timeout: Duration,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using that address, or is it not an address of this machine?)")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A peer was not connected within `connect_timeout`.
    #[error("node {peer} at {addr} was not connected within {waited:?}: {detail}")]
    PeerUnreachable {
        /// The missing peer.
        peer: NodeId,
        /// Where it should be.
        addr: SocketAddr,
        /// How long this node tried.
        waited: Duration,
        /// The last thing that went wrong.
        detail: String,
    },
    /// A peer does not hold the same cluster secret.
    #[error("node {peer} and this node do not share the cluster secret ({detail}); give every node the same secret")]
    WrongSecret {
        /// The peer (as claimed in its hello).
        peer: NodeId,
        /// Which side's proof failed.
        detail: String,
    },
    /// A peer was started from a different guest layout.
    #[error("{difference}; start every node from the same cluster description")]
    LayoutMismatch {
        /// The peer.
        peer: NodeId,
        /// The first differing line, named from this node's side.
        difference: String,
    },
    /// A peer speaks another version of the handshake or frame protocol.
    #[error("{remote} speaks another transport protocol version: {detail}; run the same spanvm build on every node")]
    VersionMismatch {
        /// The peer.
        remote: Remote,
        /// Both versions.
        detail: String,
    },
    /// The node at the other end is not the node expected there.
    #[error("{detail}")]
    UnexpectedNode {
        /// The other end.
        remote: Remote,
        /// Which node was expected and which one answered.
        detail: String,
    },
    /// A second connection of the same class from the same node.
    #[error("{detail}")]
    DuplicateConnection {
        /// The node whose id appears twice.
        peer: NodeId,
        /// The class.
        channel: Channel,
        /// From whose side it was seen.
        detail: String,
    },
    /// The other end broke the handshake protocol (or is not a spanvm node at all).
    #[error("handshake with {remote} failed: {detail}")]
    Handshake {
        /// The other end.
        remote: Remote,
        /// What was wrong.
        detail: String,
    },
    /// Reading or writing failed during the handshake.
    #[error("handshake with {remote} failed: {source}")]
    HandshakeIo {
        /// The other end.
        remote: Remote,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The other end did not finish the handshake by its deadline.
    #[error(
        "handshake with {remote} gave up after {waited:?} {step}: the other end is too slow \
         (a spanvm node answers each step at once, so it is overloaded, the network between \
         the nodes is losing packets, or it is not a spanvm node)"
    )]
    HandshakeTimeout {
        /// The other end.
        remote: Remote,
        /// How long the handshake had run.
        waited: Duration,
        /// What this node was doing when time ran out.
        step: &'static str,
    },
    /// A peer connected but did not report its whole mesh up within `connect_timeout`.
    #[error(
        "node {peer} connected but did not finish joining the mesh within {waited:?}: {detail}"
    )]
    MeshIncomplete {
        /// The peer.
        peer: NodeId,
        /// How long this node waited.
        waited: Duration,
        /// What was seen instead.
        detail: String,
    },
    /// A peer was lost while the mesh was being set up.
    #[error("node {peer} was lost while the mesh was being set up: {why}")]
    LostDuringSetup {
        /// The peer.
        peer: NodeId,
        /// Why it was declared lost.
        why: String,
    },
    /// The OS random source failed, so no handshake nonce could be made.
    #[error("cannot draw a random handshake nonce: {detail}")]
    Randomness {
        /// What failed.
        detail: String,
    },
    /// A socket option or descriptor needed by an established connection could not be had.
    #[error("cannot set up the {channel} connection to node {peer}: {source}")]
    Socket {
        /// The peer.
        peer: NodeId,
        /// The channel.
        channel: Channel,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A transport thread could not be started.
    #[error("cannot start a transport thread: {source}")]
    Thread {
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Setup stopped because another part of it already failed (internal; not normally seen).
    #[error("mesh setup was abandoned because another part of it failed")]
    SetupAbandoned,
    /// A send to a node that is not in the mesh.
    #[error("node {peer} is not a peer of this node")]
    UnknownPeer {
        /// The node.
        peer: NodeId,
    },
    /// A send to a peer that is lost.
    #[error("node {peer} is lost; nothing more can be sent to it")]
    PeerLost {
        /// The peer.
        peer: NodeId,
    },
    /// The payload does not fit in a frame.
    #[error("frame payload of {len} bytes exceeds the maximum of {max} bytes", max = crate::MAX_PAYLOAD)]
    PayloadTooLarge {
        /// The payload length.
        len: usize,
    },
    /// The frame kind belongs to the transport.
    #[error("frame kind {kind:#06x} is reserved for the transport (kinds from {first:#06x} up)", first = crate::FIRST_RESERVED_KIND)]
    ReservedKind {
        /// The kind.
        kind: u16,
    },
    /// A peer left more queued frames unread than a connection may hold.
    #[error("node {peer} does not read its {channel} connection ({queued} bytes wait for it) although it is alive; it is now treated as lost")]
    NotReading {
        /// The peer.
        peer: NodeId,
        /// The channel.
        channel: Channel,
        /// Bytes queued for it.
        queued: usize,
    },
    /// Writing a frame failed; the peer is now treated as lost.
    #[error("sending to node {peer} on the {channel} channel failed: {source}; node {peer} is now treated as lost")]
    SendFailed {
        /// The peer.
        peer: NodeId,
        /// The channel.
        channel: Channel,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The mesh was shut down.
    #[error("the transport is shut down")]
    ShutDown,
    /// The config asks for RDMA but this binary has no RDMA backend.
    #[error(
        "transport = \"rdma\" needs a spanvm built with RDMA support: install libibverbs-dev, \
         librdmacm-dev and libclang-dev (scripts/setup.sh does) and build with \
         `--features rdma`, or set transport = \"tcp\""
    )]
    RdmaNotBuilt,
    /// The cluster asks for the RDMA transport, but this machine has no RDMA device.
    #[error("no RDMA device: {detail}; load a verbs driver or soft-RoCE (rdma link add rxe0 type rxe netdev eth0), or set transport = \"tcp\"")]
    NoRdmaDevice {
        /// What the verbs library reported.
        detail: String,
    },
    /// Setting up an RDMA connection failed in the verbs or connection-manager library.
    #[error("RDMA setup failed while {step}: {source}")]
    RdmaSetup {
        /// What this node was doing.
        step: String,
        /// What the library said.
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// The peer whose loss this error reports, when it is one: a peer that was connected and
    /// went away during setup, or a send to a peer found lost. (A peer that never came is not
    /// a loss: that is a start-up problem, reported as such.)
    pub fn lost_peer(&self) -> Option<NodeId> {
        match self {
            TransportError::LostDuringSetup { peer, .. }
            | TransportError::MeshIncomplete { peer, .. }
            | TransportError::PeerLost { peer }
            | TransportError::SendFailed { peer, .. }
            | TransportError::NotReading { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// Whether retrying the same connection cannot help (the peer refused us for a reason that
    /// will not go away by itself).
    pub(crate) fn is_definitive(&self) -> bool {
        matches!(
            self,
            TransportError::WrongSecret { .. }
                | TransportError::LayoutMismatch { .. }
                | TransportError::VersionMismatch { .. }
                | TransportError::UnexpectedNode { .. }
                | TransportError::DuplicateConnection { .. }
                | TransportError::Handshake { .. }
                | TransportError::Randomness { .. }
        )
    }

    /// The node a handshake failure is about, when it is known.
    pub(crate) fn claimed_peer(&self) -> Option<NodeId> {
        match self {
            TransportError::WrongSecret { peer, .. }
            | TransportError::LayoutMismatch { peer, .. }
            | TransportError::DuplicateConnection { peer, .. } => Some(*peer),
            TransportError::VersionMismatch { remote, .. }
            | TransportError::UnexpectedNode { remote, .. }
            | TransportError::Handshake { remote, .. }
            | TransportError::HandshakeIo { remote, .. }
            | TransportError::HandshakeTimeout { remote, .. } => remote.id,
            _ => None,
        }
    }
}

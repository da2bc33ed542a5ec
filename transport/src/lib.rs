//! Node-to-node connections between the spanvm nodes of one cluster.
//!
//! Every node is a separate OS process, possibly on another machine. This crate connects each
//! node to every other one (a full mesh), proves that both ends belong to the same cluster, and
//! carries binary [`Frame`]s between them. It knows nothing about what the frames mean.
//!
//! # Connections
//! Two nodes share one TCP connection per [`Channel`] (DSM requests, DSM bulk data and
//! invalidations, forwarding, control), so that a page fault never waits behind bulk data.
//! The node with the higher id dials, the lower one accepts. Every socket has `TCP_NODELAY`.
//!
//! # Handshake
//! On every connection both ends send a hello (magic `SPANVM`, protocol version, node ids,
//! channel, a fresh 32-byte nonce), answer the other's nonce with
//! HMAC-SHA256(cluster secret, domain string || nonce || prover id || verifier id || channel),
//! check the answer in constant time, and compare the SHA-256 of the guest layout's canonical
//! text. On a layout mismatch the texts are exchanged (only between nodes that proved the
//! secret) and both ends name the first differing line. A refused node gets a
//! [`TransportError`] that says why; the accepting node logs refusals to stderr and keeps
//! waiting for the right peer until `connect_timeout`. [`TcpMesh::establish`] returns only once
//! every node of the mesh has all its connections.
//!
//! A whole handshake has 3 s, however the other end paces its bytes, and the accepting node
//! handshakes each connection on its own thread (at most 32 at once; more are closed at
//! once), so a connection that sends nothing, trickles bytes or streams garbage delays no one
//! else's handshake.
//!
//! The handshake proves who connects; the frames after it are neither encrypted nor
//! individually authenticated. Run the mesh on a network only the cluster's machines reach.
//!
//! # Frames
//! A fixed 24-byte little-endian header (kind, flags, payload length, id, arg) and up to
//! [`MAX_PAYLOAD`] raw payload bytes. Kinds from [`FIRST_RESERVED_KIND`] up belong to the
//! transport (heartbeats, the mesh-ready barrier) and are never delivered.
//!
//! # What is checked where
//! The transport checks every header before using it: a payload length over [`MAX_PAYLOAD`] or
//! a reserved kind out of place makes it log the problem and treat the sender as lost. It does
//! **not** check frame *contents* (guest addresses, vCPU ids, page numbers): the consumers
//! (`dsm`, `forward`, ...) must validate every field against the guest layout before acting on
//! it, since only they know what the fields mean.
//!
//! # Lost peers
//! EOF, a reset or any error on any connection of a peer, a malformed frame, or 2 s without a
//! frame or heartbeat (heartbeats go every 200 ms on the control channel; see [`Liveness`])
//! make the transport close all connections of that peer and call
//! [`FrameHandler::on_peer_lost`] exactly once for it. [`Transport::shutdown`] (or dropping the
//! [`TcpMesh`]) closes everything without reporting anyone lost; the peers see this node lost.
//!
//! # Threads
//! One receiver thread per (peer, channel) calls the [`FrameHandler`], so frames of one
//! (peer, channel) arrive in order, and a slow handler stalls only that connection. With
//! [`MeshConfig::busy_poll`] the receivers of [`Channel::DsmRequest`] poll with non-blocking
//! reads instead of sleeping in the kernel, which trades one busy core per peer for latency
//! (see [`mod@bench`] for how much).
//!
//! # Backends
//! [`establish`] picks the backend from the config's `transport` key: [`TcpMesh`] (described
//! above) or, in a build with the `rdma` feature, RDMA. Everything past setup holds it as
//! `Arc<dyn Transport>`; receivers lend each payload to the [`FrameHandler`] from their own
//! buffer instead of allocating one per frame. What does not depend on the backend (the
//! peers' state and lost-peer bookkeeping, the thread registry, heartbeats and the watchdog,
//! dialing with retries, the one `Transport` impl) lives in `mesh/`; a backend supplies its
//! connections. Busy polling asks `spin_budget` for a core first.

mod api;
pub mod bench;
mod channel;
mod config;
mod error;
mod frame;
mod frame_reader;
mod handshake;
mod handshake_wire;
mod layout_diff;
mod mesh;
#[cfg(feature = "rdma")]
mod rdma;
mod select;
mod spin_budget;
mod tcp;
#[cfg(test)]
mod test_recorder;

pub use api::{FrameHandler, Transport, TransportStats};
pub use channel::{Channel, NodeId, TransportKind};
pub use config::{Liveness, MeshConfig};
pub use error::{Remote, TransportError};
pub use frame::{
    Frame, FrameError, FrameHeader, FrameRef, FIRST_RESERVED_KIND, HEADER_LEN, MAX_PAYLOAD,
};
#[cfg(feature = "rdma")]
pub use rdma::RdmaMesh;
pub use resources::ServicePriority;
pub use select::{establish, establish_on};
pub use spin_budget::spinning_receivers;
pub use tcp::TcpMesh;

//! The distributed shared memory of spanvm: guest RAM kept coherent between node processes in user
//! space, page by page, with userfaultfd.
//!
//! The protocol is Ivy's MSI with a fixed home (manager) per page, as in GiantVM §3.4: a page is
//! Modified (mapped writable, the only valid copy), Shared (mapped and write-protected, one of
//! several identical copies) or Invalid (not mapped) on each node; there is a single writer and the
//! memory is sequentially consistent. The home of a page keeps its directory entry (owner and
//! copyset) and serves one request for the page at a time, from the request until the requester's
//! confirmation. The message flows are described in `README.md` beside this crate.
//!
//! Layers, each usable alone:
//! - [`protocol`]: the messages and their wire frames, with validation against the layout.
//! - [`directory`]: the home's pure state machine ([`HomeDirectory`]).
//! - [`node`]: the requester/holder's pure state machine ([`NodePages`]) over a [`GuestPages`].
//! - [`memory`]: the [`GuestPages`] trait (what the protocol does to local memory).
//! - [`heap`]: [`HeapPages`], memory on the heap with the kernel's rules, for tests.
//! - [`uffd`]: [`UffdGuestPages`], the real memory: an anonymous mapping under a userfaultfd.
//! - [`runtime`]: [`Dsm`], a running node: fault thread, message entry point, pin/unpin, failure.
//! - [`stats`]: per-node statistics ([`NodeStats`], [`StatsSnapshot`]).
//!
//! The crate knows nothing of sockets or KVM: it sends through a [`DsmLink`] given by the VMM and
//! receives through [`Dsm::on_message`].

#![deny(missing_docs)]

pub mod directory;
pub mod heap;
pub mod memory;
pub mod node;
mod nodeset;
pub mod protocol;
pub mod runtime;
pub mod stats;
pub mod trace;
pub mod uffd;
mod uffd_sys;

use std::sync::Arc;

pub use directory::{DirectoryError, DirectoryView, HomeDirectory};
pub use heap::{HeapPages, Mapping};
pub use memory::{GuestPages, MemoryError, PageContent};
pub use node::{Completion, LocalOutcome, NodeError, NodePages, PageState, PinOutcome};
pub use nodeset::NodeSet;
pub use protocol::{
    Access, DsmMessage, Frame, FrameView, GrantData, Outgoing, PageBuf, ProtocolError, RequestId,
    RequestIds, WireLimits,
};
pub use runtime::{Dsm, DsmConfig, DsmError, DsmLink, FailureHook, LinkError, PinGuard};
pub use stats::{NodeStats, StatsSnapshot};
pub use trace::{FaultTrace, Stage};
pub use uffd::{FaultSource, PageFault, UffdError, UffdGuestPages};

/// Index of a node in the cluster, `0..node_count`; counts of nodes are `NodeId`s too, so that
/// ids and counts compare directly.
pub use resources::{node_index, NodeId};

/// Size of a DSM page (the x86 base page).
pub const PAGE_SIZE: usize = 4096;

/// `gpa >> PAGE_SHIFT` is the page number of a guest-physical address.
pub const PAGE_SHIFT: u32 = 12;

/// Most nodes a cluster may have: a copyset is a 64-bit set.
pub const MAX_NODES: NodeId = 64;

/// Which node is home of a page (from the layout every node agrees on).
pub type HomeFn = Arc<dyn Fn(u64) -> NodeId + Send + Sync>;

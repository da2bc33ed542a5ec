//! The few verbs the RDMA backend uses, behind a trait: the real ones (`ibverbs.rs`, on a
//! queue pair connected with librdmacm) and an in-memory pair for the unit tests
//! (`fake.rs`), so that everything above them runs without an RDMA device.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::region::Region;

/// Keys of a registered region: `lkey` for this end's posts, `rkey` for the peer's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keys {
    pub lkey: u32,
    pub rkey: u32,
}

/// A range of this end's registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Local {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// A range of the peer's registered region, as it advertised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteRange {
    pub addr: u64,
    pub rkey: u32,
}

/// Which work request a completion ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Send,
    Write,
    Recv,
}

/// One completion: the id given when posting, the operation, and the bytes received (for a
/// receive) or the device's reason for failing. Any failure means the queue pair is in the
/// error state: the peer is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Completion {
    pub wr_id: u64,
    pub op: Op,
    pub result: Result<u32, String>,
}

/// Why a verb failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerbsError {
    /// The device refused to register memory.
    #[error("cannot register {len} bytes with the RDMA device: {source} (raise the locked-memory limit: ulimit -l unlimited)")]
    Register {
        /// The region's length.
        len: usize,
        /// What the library said.
        #[source]
        source: io::Error,
    },
    /// Posting a work request failed: the queue pair is broken or full.
    #[error("posting an RDMA {op:?} failed: {source}")]
    Post {
        /// The operation.
        op: Op,
        /// What the library said.
        #[source]
        source: io::Error,
    },
    /// Reading the completion queue failed.
    #[error("polling the RDMA completion queue failed: {source}")]
    Poll {
        /// What the library said.
        #[source]
        source: io::Error,
    },
}

/// One reliable-connected queue pair with its completion queues.
///
/// Posting hands a range of the registered region to the device until the matching
/// [`Completion`]; the posts are `unsafe` because nothing but the caller's bookkeeping (the
/// pools and rings of `conn/`) keeps the program from touching that range meanwhile.
pub(crate) trait Verbs: Send + Sync {
    /// Registers `region` for this end's posts (`lkey`), and its bytes `remote` also for the
    /// peer's RDMA WRITEs (`rkey`); called once, before any post. The endpoint keeps the region
    /// alive for as long as it is registered.
    fn register(&self, region: &Arc<Region>, remote: Range<usize>) -> Result<Keys, VerbsError>;

    /// Posts a receive into `buf`.
    ///
    /// # Safety
    /// `buf` lies in the registered region and nothing reads or writes it until its completion.
    unsafe fn post_recv(&self, wr_id: u64, buf: Local) -> Result<(), VerbsError>;

    /// Posts a SEND of `buf`.
    ///
    /// # Safety
    /// `buf` lies in the registered region and nothing writes it until its completion.
    unsafe fn post_send(&self, wr_id: u64, buf: Local) -> Result<(), VerbsError>;

    /// Posts an RDMA WRITE of `buf` to the peer's `to`.
    ///
    /// # Safety
    /// As for [`Verbs::post_send`]; `to` must be a range the peer handed to this end.
    unsafe fn post_write(&self, wr_id: u64, buf: Local, to: RemoteRange) -> Result<(), VerbsError>;

    /// Appends up to `max` completions (sends, writes and receives) to `out`; never waits.
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<(), VerbsError>;

    /// Sleeps until a completion may be waiting or `timeout` passes (used unless busy-polling).
    fn wait(&self, timeout: Duration);

    /// Connects (or, for an endpoint a listener made, accepts) the queue pair; called once,
    /// after every receive buffer is posted.
    fn connect(&self) -> io::Result<()>;

    /// Moves the queue pair to the error state and disconnects: every outstanding post
    /// completes with an error, and the peer sees its own posts fail.
    fn disconnect(&self);

    /// The peer's address, for messages.
    fn peer_addr(&self) -> SocketAddr;
}

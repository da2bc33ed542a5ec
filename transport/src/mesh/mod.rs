//! What the TCP and the RDMA mesh share: the state per peer ([`link`]), the mesh's shared state
//! with its lost-peer bookkeeping and send checks ([`state`]), the registry of its threads
//! ([`threads`]), heartbeats and the silence watchdog ([`liveness`]), the [`crate::Transport`]
//! API ([`transport`]), and dialing peers during setup ([`dial_retry`]). Each backend brings
//! its connection type, which implements [`link::LinkConn`], and what one dial attempt is.

pub(crate) mod dial_retry;
pub(crate) mod link;
pub(crate) mod liveness;
pub(crate) mod state;
pub(crate) mod threads;
pub(crate) mod transport;

//! What the TCP and the RDMA mesh share: the state per peer ([`link`]), the mesh's shared state
//! with its lost-peer bookkeeping ([`state`]), the registry of its threads ([`threads`]), and
//! heartbeats and the silence watchdog ([`liveness`]). Each backend only brings its connection
//! type, which implements [`link::LinkConn`].

pub(crate) mod dial_retry;
pub(crate) mod link;
pub(crate) mod liveness;
pub(crate) mod state;
pub(crate) mod threads;
pub(crate) mod transport;

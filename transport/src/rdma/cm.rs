//! librdmacm, synchronously: resolving an address, creating an endpoint with its queue pair,
//! connecting, listening and taking connection requests with a timeout.

use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::raw::c_int;
use std::ptr;
use std::time::Duration;

use rdma_sys::{
    ibv_qp_init_attr, ibv_qp_type, rdma_accept, rdma_addrinfo, rdma_cm_id, rdma_conn_param,
    rdma_connect, rdma_create_ep, rdma_destroy_ep, rdma_freeaddrinfo, rdma_get_peer_addr,
    rdma_get_request, rdma_getaddrinfo, rdma_listen, rdma_port_space, RAI_PASSIVE,
};

use super::conn::{RECV_RING, SEND_BUFS, STAGING_SLOTS};
use super::ibverbs::CmEndpoint;

/// Connection requests a listener keeps waiting.
const LISTEN_BACKLOG: c_int = 64;

/// Hardware retries before a queue pair gives up on a silent peer (7 is the maximum), and
/// "receiver not ready" retries (7 means for ever; credits keep this from happening on data).
const RETRY_COUNT: u8 = 7;
const RNR_RETRY_COUNT: u8 = 7;

fn last_error(what: &str) -> io::Error {
    let os = io::Error::last_os_error();
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

/// The queue pair every connection gets: room for every buffer the connection posts.
fn qp_attr() -> ibv_qp_init_attr {
    // SAFETY: ibv_qp_init_attr is plain data, for which all zeroes is a valid value (null
    // queues: librdmacm creates them, with completion channels).
    let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
    // Sends, staging writes, and one credit write.
    attr.cap.max_send_wr = SEND_BUFS + STAGING_SLOTS + 1;
    attr.cap.max_recv_wr = RECV_RING;
    attr.cap.max_send_sge = 1;
    attr.cap.max_recv_sge = 1;
    attr.qp_type = ibv_qp_type::IBV_QPT_RC;
    attr
}

fn conn_param() -> rdma_conn_param {
    // SAFETY: rdma_conn_param is plain data, for which all zeroes is a valid value.
    let mut param: rdma_conn_param = unsafe { std::mem::zeroed() };
    param.retry_count = RETRY_COUNT;
    param.rnr_retry_count = RNR_RETRY_COUNT;
    // RDMA WRITEs only: no incoming READs or atomics to make room for.
    param.responder_resources = 0;
    param.initiator_depth = 0;
    param
}

/// Resolves `addr` into an endpoint with a queue pair (`passive`: for listening on it).
fn create_ep(addr: SocketAddr, passive: bool) -> io::Result<*mut rdma_cm_id> {
    let node = CString::new(addr.ip().to_string()).map_err(io::Error::other)?;
    let service = CString::new(addr.port().to_string()).map_err(io::Error::other)?;
    // SAFETY: rdma_addrinfo is plain data, for which all zeroes is a valid value.
    let mut hints: rdma_addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_port_space = c_int::try_from(rdma_port_space::RDMA_PS_TCP).unwrap_or(0);
    hints.ai_qp_type = c_int::try_from(ibv_qp_type::IBV_QPT_RC).unwrap_or(0);
    if passive {
        hints.ai_flags = c_int::try_from(RAI_PASSIVE).unwrap_or(1);
    }
    let mut res = ptr::null_mut();
    // SAFETY: node and service are live C strings, hints a live struct, res an out-pointer.
    if unsafe { rdma_getaddrinfo(node.as_ptr(), service.as_ptr(), &hints, &mut res) } != 0 {
        return Err(last_error(&format!("rdma_getaddrinfo({addr})")));
    }
    let mut attr = qp_attr();
    let mut id = ptr::null_mut();
    // SAFETY: `res` came from rdma_getaddrinfo and is freed once, after the call; `attr` is
    // live through it.
    let ret = unsafe {
        let ret = rdma_create_ep(&mut id, res, ptr::null_mut(), &mut attr);
        rdma_freeaddrinfo(res);
        ret
    };
    if ret != 0 {
        return Err(last_error(&format!("rdma_create_ep({addr})")));
    }
    Ok(id)
}

/// A new endpoint towards `addr`, not yet connected (so that receives can be posted first).
pub(crate) fn endpoint_to(addr: SocketAddr) -> io::Result<CmEndpoint> {
    let id = create_ep(addr, false)?;
    // SAFETY: `id` was just created with a queue pair and is owned by nobody else.
    Ok(unsafe { CmEndpoint::new(id, addr, false) })
}

/// Connects `id` (an active endpoint whose receives are posted), or accepts its connection
/// (an endpoint from [`Listener::next_request`]); blocks until the peer accepts or refuses.
///
/// # Safety
/// `id` is a live endpoint with a queue pair.
pub(crate) unsafe fn connect(id: *mut rdma_cm_id, passive: bool) -> io::Result<()> {
    let mut param = conn_param();
    // SAFETY: `id` is live (the caller's promise); `param` is live through the call.
    let ret = unsafe {
        if passive {
            rdma_accept(id, &mut param)
        } else {
            rdma_connect(id, &mut param)
        }
    };
    if ret != 0 {
        return Err(last_error(if passive {
            "rdma_accept"
        } else {
            "rdma_connect"
        }));
    }
    Ok(())
}

/// A listening endpoint.
pub(crate) struct Listener {
    id: *mut rdma_cm_id,
}

// SAFETY: librdmacm calls on one id are thread-safe; the listener is used by one thread at a
// time anyway (the acceptor), and only ever passed to the library.
unsafe impl Send for Listener {}
// SAFETY: as for `Send`.
unsafe impl Sync for Listener {}

impl Listener {
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let id = create_ep(addr, true)?;
        let listener = Listener { id };
        // SAFETY: `id` is a live passive endpoint.
        if unsafe { rdma_listen(id, LISTEN_BACKLOG) } != 0 {
            return Err(last_error(&format!("rdma_listen({addr})")));
        }
        Ok(listener)
    }

    /// The next connection request, as an endpoint with its queue pair, or `None` if none
    /// came within `timeout`.
    pub(crate) fn next_request(&self, timeout: Duration) -> io::Result<Option<CmEndpoint>> {
        // SAFETY: a synchronous endpoint has its own event channel, live as long as it is.
        let fd = unsafe { (*(*self.id).channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = c_int::try_from(timeout.as_millis().max(1)).unwrap_or(c_int::MAX);
        // SAFETY: one live pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
        if ready < 0 {
            return Err(last_error("poll on the RDMA listener"));
        }
        if ready == 0 {
            return Ok(None);
        }
        let mut id = ptr::null_mut();
        // SAFETY: an event is waiting (poll said so), so this does not block; `id` is an
        // out-pointer.
        if unsafe { rdma_get_request(self.id, &mut id) } != 0 {
            return Err(last_error("rdma_get_request"));
        }
        // SAFETY: `id` is the new connection's endpoint, with its route filled in.
        let peer = unsafe { socket_addr(rdma_get_peer_addr(&*id)) };
        // SAFETY: rdma_get_request made `id` with a queue pair (the listener's attributes),
        // and hands it to us alone.
        Ok(Some(unsafe { CmEndpoint::new(id, peer, true) }))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: the listener owns `id` and destroys it once.
        unsafe { rdma_destroy_ep(self.id) };
    }
}

/// The address in a `sockaddr` of family AF_INET or AF_INET6 (anything else shows as 0.0.0.0).
///
/// # Safety
/// `addr` is the start of a sockaddr of the size its family implies.
unsafe fn socket_addr(addr: &libc::sockaddr) -> SocketAddr {
    match c_int::from(addr.sa_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in (the caller's promise).
            let sin = unsafe { &*std::ptr::from_ref(addr).cast::<libc::sockaddr_in>() };
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6 (the caller's promise).
            let sin6 = unsafe { &*std::ptr::from_ref(addr).cast::<libc::sockaddr_in6>() };
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            )
        }
        _ => SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}

//! The real verbs: a reliable-connected queue pair made by librdmacm (`rdma_create_ep`, with
//! its own completion queues and completion channels), and the start-up device check.

use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::raw::c_int;
use std::ptr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdma_sys::{
    ibv_access_flags, ibv_ack_cq_events, ibv_comp_channel, ibv_cq, ibv_dereg_mr,
    ibv_free_device_list, ibv_get_cq_event, ibv_get_device_list, ibv_mr, ibv_poll_cq,
    ibv_post_recv, ibv_post_send, ibv_recv_wr, ibv_reg_mr, ibv_req_notify_cq, ibv_send_flags,
    ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_opcode, ibv_wc_status, ibv_wc_status_str, ibv_wr_opcode,
    rdma_cm_id, rdma_destroy_ep, rdma_disconnect,
};

use crate::error::TransportError;

use super::region::Region;
use super::verbs::{Completion, Keys, Local, Op, RemoteRange, Verbs, VerbsError};

/// Fails with [`TransportError::NoRdmaDevice`] unless the verbs library sees a device. Called
/// first thing, before any address is bound or any peer dialed.
pub(crate) fn require_device() -> Result<(), TransportError> {
    let mut count: c_int = 0;
    // SAFETY: `count` is a live int the library writes the number of devices to.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        let error = io::Error::last_os_error();
        return Err(TransportError::NoRdmaDevice {
            detail: format!(
                "ibv_get_device_list failed ({error}): the kernel has no RDMA support loaded \
                 (modules ib_uverbs and a driver)"
            ),
        });
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once; nothing kept from it.
    unsafe { ibv_free_device_list(list) };
    if count <= 0 {
        return Err(TransportError::NoRdmaDevice {
            detail: "ibv_get_device_list found none".to_string(),
        });
    }
    Ok(())
}

/// Completions taken from one queue at a time.
const POLL_BATCH: usize = 32;

/// A connected (or connecting) librdmacm endpoint: an `rdma_cm_id` with its queue pair.
pub(crate) struct CmEndpoint {
    id: *mut rdma_cm_id,
    peer: SocketAddr,
    /// Made by a listener: `connect` accepts instead of connecting.
    passive: bool,
    /// The region and its two registrations (all of it locally, the peer's part remotely).
    registration: Mutex<Option<(Arc<Region>, [*mut ibv_mr; 2])>>,
    /// Completions polled while arming the queues in `wait`, handed out by the next `poll`.
    stash: Mutex<Vec<Completion>>,
}

// SAFETY: libibverbs and librdmacm calls on one id and queue pair are thread-safe (the
// libraries lock internally); the raw pointers are only passed to them, and the registration
// and stash are behind mutexes.
unsafe impl Send for CmEndpoint {}
// SAFETY: as for `Send`.
unsafe impl Sync for CmEndpoint {}

impl CmEndpoint {
    /// Takes ownership of `id`, an endpoint from `rdma_create_ep` or `rdma_get_request` that
    /// has a queue pair.
    ///
    /// # Safety
    /// `id` is valid, has a queue pair, and is owned by nobody else from now on.
    pub(crate) unsafe fn new(id: *mut rdma_cm_id, peer: SocketAddr, passive: bool) -> CmEndpoint {
        CmEndpoint {
            id,
            peer,
            passive,
            registration: Mutex::new(None),
            stash: Mutex::new(Vec::new()),
        }
    }

    fn queues(&self) -> [*mut ibv_cq; 2] {
        // SAFETY: `id` is valid for the endpoint's life (`new`'s contract).
        unsafe { [(*self.id).send_cq, (*self.id).recv_cq] }
    }

    fn channels(&self) -> [*mut ibv_comp_channel; 2] {
        // SAFETY: as in `queues`.
        unsafe { [(*self.id).send_cq_channel, (*self.id).recv_cq_channel] }
    }

    fn poll_queue(cq: *mut ibv_cq, out: &mut Vec<Completion>, max: usize) -> io::Result<()> {
        if cq.is_null() || max == 0 {
            return Ok(());
        }
        // SAFETY: ibv_wc is plain data, for which all zeroes is a valid value.
        let mut wcs: [ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
        let want = c_int::try_from(max.min(POLL_BATCH)).unwrap_or(1);
        // SAFETY: `cq` is a live completion queue of this endpoint and `wcs` has room for
        // `want` entries.
        let n = unsafe { ibv_poll_cq(cq, want, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::other(format!("ibv_poll_cq returned {n}")));
        }
        for wc in &wcs[..usize::try_from(n).unwrap_or(0)] {
            out.push(convert(wc));
        }
        Ok(())
    }
}

fn convert(wc: &ibv_wc) -> Completion {
    let op = match wc.opcode {
        ibv_wc_opcode::IBV_WC_RECV => Op::Recv,
        ibv_wc_opcode::IBV_WC_RDMA_WRITE => Op::Write,
        _ => Op::Send,
    };
    let result = if wc.status == ibv_wc_status::IBV_WC_SUCCESS {
        Ok(wc.byte_len)
    } else {
        // SAFETY: ibv_wc_status_str returns a static string for any status value.
        let text = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) };
        Err(format!(
            "{} (status {}, vendor error {:#x})",
            text.to_string_lossy(),
            wc.status,
            wc.vendor_err
        ))
    };
    // A failed completion's opcode is undefined; its work id still names what failed.
    Completion {
        wr_id: wc.wr_id,
        op,
        result,
    }
}

fn sge(buf: Local) -> ibv_sge {
    ibv_sge {
        addr: buf.addr,
        length: buf.len,
        lkey: buf.lkey,
    }
}

impl Verbs for CmEndpoint {
    fn register(&self, region: &Arc<Region>, remote: Range<usize>) -> Result<Keys, VerbsError> {
        assert!(remote.start <= remote.end && remote.end <= region.len());
        let local = self.register_range(region, 0..region.len(), false)?;
        let remote = match self.register_range(region, remote, true) {
            Ok(mr) => mr,
            Err(e) => {
                // SAFETY: `local` is the live registration just made, deregistered once.
                unsafe { ibv_dereg_mr(local) };
                return Err(e);
            }
        };
        // SAFETY: both are live registrations just made.
        let keys = unsafe {
            Keys {
                lkey: (*local).lkey,
                rkey: (*remote).rkey,
            }
        };
        let old = self
            .registration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace((Arc::clone(region), [local, remote]));
        debug_assert!(old.is_none(), "a connection registers its region once");
        Ok(keys)
    }

    unsafe fn post_recv(&self, wr_id: u64, buf: Local) -> Result<(), VerbsError> {
        let mut sg = sge(buf);
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sg,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the queue pair is the endpoint's; the work request and its scatter entry live
        // through the call (the library copies them); the buffer is the caller's promise.
        let ret = unsafe { ibv_post_recv((*self.id).qp, &mut wr, &mut bad) };
        posted(Op::Recv, ret)
    }

    unsafe fn post_send(&self, wr_id: u64, buf: Local) -> Result<(), VerbsError> {
        // SAFETY: the caller's promise covers the buffer; `post` the rest.
        unsafe { self.post(wr_id, buf, ibv_wr_opcode::IBV_WR_SEND, None) }
    }

    unsafe fn post_write(&self, wr_id: u64, buf: Local, to: RemoteRange) -> Result<(), VerbsError> {
        // SAFETY: the caller's promise covers the buffer and the remote range.
        unsafe { self.post(wr_id, buf, ibv_wr_opcode::IBV_WR_RDMA_WRITE, Some(to)) }
    }

    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<(), VerbsError> {
        {
            let mut stash = self.stash.lock().unwrap_or_else(PoisonError::into_inner);
            let n = max.min(stash.len());
            out.extend(stash.drain(..n));
        }
        for cq in self.queues() {
            let room = max.saturating_sub(out.len());
            Self::poll_queue(cq, out, room).map_err(|source| VerbsError::Poll { source })?;
        }
        Ok(())
    }

    fn wait(&self, timeout: Duration) {
        // Arm both queues, then look once more: a completion that came after the caller's last
        // poll but before the arming raises no event, and must not be slept through.
        for cq in self.queues().into_iter().filter(|cq| !cq.is_null()) {
            // SAFETY: `cq` is a live completion queue of this endpoint.
            unsafe { ibv_req_notify_cq(cq, 0) };
        }
        {
            let mut stash = self.stash.lock().unwrap_or_else(PoisonError::into_inner);
            for cq in self.queues() {
                if Self::poll_queue(cq, &mut stash, POLL_BATCH).is_err() {
                    return;
                }
            }
            if !stash.is_empty() {
                return;
            }
        }
        let channels = self.channels();
        let mut fds: Vec<libc::pollfd> = channels
            .iter()
            .filter(|c| !c.is_null())
            .map(|&c| libc::pollfd {
                // SAFETY: `c` is a live completion channel of this endpoint.
                fd: unsafe { (*c).fd },
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.is_empty() {
            std::thread::sleep(timeout);
            return;
        }
        let millis = c_int::try_from(timeout.as_millis().max(1)).unwrap_or(c_int::MAX);
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(1);
        // SAFETY: `fds` is a live array of `nfds` pollfd entries.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, millis) };
        if ready <= 0 {
            return;
        }
        for &channel in channels.iter().filter(|c| !c.is_null()) {
            // SAFETY: as above.
            let fd = unsafe { (*channel).fd };
            if !fds
                .iter()
                .any(|p| p.fd == fd && p.revents & libc::POLLIN != 0)
            {
                continue;
            }
            let mut cq = ptr::null_mut();
            let mut context = ptr::null_mut();
            // SAFETY: the channel has an event (poll said so), so this does not block; the
            // event is acknowledged at once, as destroying the queue requires.
            unsafe {
                if ibv_get_cq_event(channel, &mut cq, &mut context) == 0 {
                    ibv_ack_cq_events(cq, 1);
                }
            }
        }
    }

    fn connect(&self) -> io::Result<()> {
        // SAFETY: `id` is live and has a queue pair (`new`'s contract).
        unsafe { super::cm::connect(self.id, self.passive) }
    }

    fn disconnect(&self) {
        // SAFETY: `id` is valid; disconnecting twice only returns an error, ignored here.
        unsafe { rdma_disconnect(self.id) };
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

impl CmEndpoint {
    /// Registers bytes `range` of `region`, for local writes and, with `remote`, the peer's.
    fn register_range(
        &self,
        region: &Arc<Region>,
        range: Range<usize>,
        remote: bool,
    ) -> Result<*mut ibv_mr, VerbsError> {
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        let len = range.len();
        // SAFETY: the protection domain is the endpoint's; the range lies inside the region (the
        // caller checked), a live allocation that the endpoint keeps alive until the
        // registration is dropped.
        let mr = unsafe {
            ibv_reg_mr(
                (*self.id).pd,
                region.base().add(range.start).cast(),
                len,
                c_int::try_from(access.0).unwrap_or(c_int::MAX),
            )
        };
        if mr.is_null() {
            return Err(VerbsError::Register {
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(mr)
    }

    /// Posts one signaled work request of `opcode` on `buf` (to `to` for an RDMA WRITE).
    ///
    /// # Safety
    /// As for [`Verbs::post_send`] and [`Verbs::post_write`].
    unsafe fn post(
        &self,
        wr_id: u64,
        buf: Local,
        opcode: ibv_wr_opcode::Type,
        to: Option<RemoteRange>,
    ) -> Result<(), VerbsError> {
        let mut sg = sge(buf);
        // SAFETY: ibv_send_wr is plain data, for which all zeroes is a valid value.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sg;
        wr.num_sge = 1;
        wr.opcode = opcode;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        if let Some(to) = to {
            wr.wr.rdma.remote_addr = to.addr;
            wr.wr.rdma.rkey = to.rkey;
        }
        let mut bad = ptr::null_mut();
        // SAFETY: the queue pair is the endpoint's; the request and its scatter entry live
        // through the call (the library copies them); buffers are the caller's promise.
        let ret = unsafe { ibv_post_send((*self.id).qp, &mut wr, &mut bad) };
        let op = if to.is_some() { Op::Write } else { Op::Send };
        posted(op, ret)
    }
}

fn posted(op: Op, ret: c_int) -> Result<(), VerbsError> {
    if ret == 0 {
        return Ok(());
    }
    Err(VerbsError::Post {
        op,
        source: io::Error::from_raw_os_error(ret),
    })
}

impl Drop for CmEndpoint {
    fn drop(&mut self) {
        // SAFETY: the endpoint owns `id` (`new`'s contract). The queue pair is destroyed
        // first, so that the device no longer touches the region; then the registration goes,
        // then the region itself (its last reference may be the one dropped here).
        unsafe {
            rdma_disconnect(self.id);
            rdma_destroy_ep(self.id);
        }
        let registration = self
            .registration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((region, mrs)) = registration {
            for mr in mrs {
                // SAFETY: `mr` is one of this endpoint's live registrations, deregistered once.
                unsafe { ibv_dereg_mr(mr) };
            }
            drop(region);
        }
    }
}

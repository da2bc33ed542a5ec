//! One reliable connection (peer, channel) over RDMA, above the [`Verbs`] trait.
//!
//! The connection's registered region holds, in this order:
//! - the incoming staging ring: [`STAGING_SLOTS`] payload slots the peer RDMA WRITEs pages
//!   into, used in order and freed in order once delivered;
//! - the incoming credit mailbox: two words the peer writes (its receives posted and its
//!   staging slots freed, both counted since the connection began);
//!
//!   these two alone are registered for remote writes; the rest only for this end's device:
//! - a ring of [`RECV_RING`] receive buffers, all posted from the start and each reposted as
//!   soon as the frame in it was handed over;
//! - a pool of [`SEND_BUFS`] send buffers, taken for a SEND and given back on its completion;
//! - the outgoing staging pool: as many slots, holding a page from the caller's memory until
//!   the RDMA WRITE that carries it completes;
//! - the outgoing credit mailbox: the two words this end writes to the peer's.
//!
//! A frame with a small payload is one SEND. A page is an RDMA WRITE into the peer's next
//! staging slot followed by a SEND of the header naming that slot; a reliable connection
//! places the WRITE before the SEND completes at the receiver, so the page is there when the
//! header is. A sender sends only while the peer has a receive posted and a staging slot free
//! (credits read from the mailbox), so no SEND meets an empty receive queue; what cannot go
//! yet waits in a bounded backlog that the connection's progress loop sends on as credits come
//! back. Credits go back with an RDMA WRITE of the two counters, which costs the peer no
//! receive: batched while frames keep coming, written at once when the queue runs dry.
//!
//! This file holds the memory and the send side; `receive.rs` the completions and what
//! arrives.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::api::TransportStats;
use crate::channel::{Channel, NodeId};
use crate::frame::{Frame, FrameRef, MAX_PAYLOAD};

use super::advert::Advert;
use super::message::{self, INLINE_MAX, KIND_RDMA_POOL, MESSAGE_LEN, STAGING_SLOT_LEN};
use super::pool::SlotPool;
use super::region::Region;
use super::verbs::{Keys, Local, RemoteRange, Verbs, VerbsError};

mod receive;

/// Receive buffers per connection.
pub(crate) const RECV_RING: u32 = 64;
/// Send buffers per connection.
pub(crate) const SEND_BUFS: u32 = 64;
/// Staging slots per connection and direction.
pub(crate) const STAGING_SLOTS: u32 = 32;
/// Most bytes of frames waiting for credits before the peer counts as not reading (as on TCP).
pub(crate) const BACKLOG_LIMIT: usize = 32 << 20;
/// Completions taken from the queue at a time.
const POLL_BATCH: usize = 32;

const TAG_RECV: u64 = 1;
const TAG_SEND: u64 = 2;
const TAG_STAGE: u64 = 3;
const TAG_CREDIT: u64 = 4;

// What the peer may write comes first, in its own registration.
const STAGE_IN_BASE: usize = 0;
const MAILBOX_IN: usize = STAGE_IN_BASE + STAGING_SLOTS as usize * STAGING_SLOT_LEN;
const REMOTE_END: usize = MAILBOX_IN + 16;
// Then what only this end's device touches.
const RECV_BASE: usize = REMOTE_END.next_multiple_of(4096);
const SEND_BASE: usize = RECV_BASE + RECV_RING as usize * MESSAGE_LEN;
const STAGE_OUT_BASE: usize = (SEND_BASE + SEND_BUFS as usize * MESSAGE_LEN).next_multiple_of(64);
const MAILBOX_OUT: usize = STAGE_OUT_BASE + STAGING_SLOTS as usize * STAGING_SLOT_LEN;
/// Bytes of registered memory per connection.
pub(crate) const REGION_LEN: usize = MAILBOX_OUT + 16;

fn wr_id(tag: u64, slot: u32) -> u64 {
    (tag << 32) | u64::from(slot)
}

fn split(wr_id: u64) -> (u64, u32) {
    (wr_id >> 32, (wr_id & 0xFFFF_FFFF) as u32)
}

/// Why a frame could not be handed to the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    /// The connection was closed (the peer is lost or the mesh shut down).
    #[error("the connection is closed")]
    Closed,
    /// The peer left more bytes waiting for credits than a connection may hold.
    #[error("{0} bytes wait for the peer to post receives")]
    Backlog(usize),
    /// A verb failed: the queue pair is broken.
    #[error("{0}")]
    Verbs(#[from] VerbsError),
}

/// What the connection reports while it makes progress.
pub(crate) trait ConnEvents {
    /// Something (anything) arrived from the peer.
    fn heard(&self);
    /// A frame for the consumer; its payload is lent until the call returns. An error (the
    /// handler panicked) makes the peer lost, since the connection can no longer be served.
    fn deliver(&self, channel: Channel, frame: FrameRef<'_>) -> Result<(), String>;
    /// The peer has all its connections (the mesh-ready barrier).
    fn mesh_ready(&self);
}

/// A message taken off the receive queue: where it lies, and how long it is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub slot: u32,
    pub len: u32,
}

struct State {
    bufs: SlotPool,
    stage_out: SlotPool,
    /// SENDs posted since the connection began (each consumes one of the peer's receives).
    sends: u64,
    /// Pages staged at the peer since the connection began.
    staged: u64,
    peer: Option<Advert>,
    /// The peer's receives posted and staging slots freed, as last learnt.
    peer_recvs: u64,
    peer_freed: u64,
    backlog: VecDeque<(Frame, bool)>,
    backlog_bytes: usize,
    /// This end's receives posted and staged payloads delivered, since the connection began.
    recvs_posted: u64,
    staged_delivered: u64,
    /// The counters last written to the peer's mailbox, and whether a write is under way.
    advertised: (u64, u64),
    credit_write_busy: bool,
    closed: bool,
    stats: TransportStats,
}

/// One connection.
pub(crate) struct Conn {
    pub peer: NodeId,
    pub channel: Channel,
    verbs: Box<dyn Verbs>,
    region: Arc<Region>,
    keys: Keys,
    state: Mutex<State>,
    /// Non-handshake messages the handshake read past; handled first by the progress loop.
    early: Mutex<VecDeque<Vec<u8>>>,
}

impl Conn {
    /// Registers the connection's memory and posts every receive buffer. Call before the
    /// connection is established, so that the peer's first SEND finds a receive.
    pub(crate) fn new(
        peer: NodeId,
        channel: Channel,
        verbs: Box<dyn Verbs>,
    ) -> Result<Conn, VerbsError> {
        let region = Arc::new(Region::new(REGION_LEN));
        let keys = verbs.register(&region, STAGE_IN_BASE..REMOTE_END)?;
        let conn = Conn {
            peer,
            channel,
            verbs,
            region,
            keys,
            state: Mutex::new(State {
                bufs: SlotPool::new(SEND_BASE, MESSAGE_LEN, SEND_BUFS),
                stage_out: SlotPool::new(STAGE_OUT_BASE, STAGING_SLOT_LEN, STAGING_SLOTS),
                sends: 0,
                staged: 0,
                peer: None,
                peer_recvs: 0,
                peer_freed: 0,
                backlog: VecDeque::new(),
                backlog_bytes: 0,
                recvs_posted: 0,
                staged_delivered: 0,
                advertised: (0, 0),
                credit_write_busy: false,
                closed: false,
                stats: TransportStats::default(),
            }),
            early: Mutex::new(VecDeque::new()),
        };
        for slot in 0..RECV_RING {
            conn.repost(slot)?;
        }
        Ok(conn)
    }

    /// Names the peer and channel of an accepted connection, once its hello said them.
    pub(crate) fn identify(&mut self, peer: NodeId, channel: Channel) {
        self.peer = peer;
        self.channel = channel;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn verbs(&self) -> &dyn Verbs {
        self.verbs.as_ref()
    }

    fn local(&self, offset: usize, len: usize) -> Local {
        Local {
            addr: self.region.addr(offset),
            len: u32::try_from(len).unwrap_or(u32::MAX),
            lkey: self.keys.lkey,
        }
    }

    /// Posts receive buffer `slot` (again).
    fn repost(&self, slot: u32) -> Result<(), VerbsError> {
        let buf = self.local(RECV_BASE + slot as usize * MESSAGE_LEN, MESSAGE_LEN);
        // SAFETY: receive buffer `slot` is in the registered region, and its previous content
        // was handed over already; nothing touches it until its next receive completes.
        unsafe { self.verbs.post_recv(wr_id(TAG_RECV, slot), buf)? };
        self.state().recvs_posted += 1;
        Ok(())
    }

    /// The bytes of a completed receive; they stay valid until [`Conn::release`].
    fn received(&self, msg: Received) -> &[u8] {
        let len = (msg.len as usize).min(MESSAGE_LEN);
        // SAFETY: the receive completed, so the device is done with the buffer, and it is not
        // reposted before `release` (the caller's order), so nothing writes it meanwhile.
        unsafe {
            self.region
                .bytes(RECV_BASE + msg.slot as usize * MESSAGE_LEN, len)
        }
    }

    /// Hands a received buffer back to the device.
    fn release(&self, msg: Received) -> Result<(), VerbsError> {
        self.repost(msg.slot)
    }

    /// Keeps a message the handshake read past for the progress loop.
    pub(crate) fn keep_early(&self, bytes: Vec<u8>) {
        self.early
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(bytes);
    }

    /// Sends a frame of the consumer (or a heartbeat): inline or staged, with credits; what
    /// cannot go now waits in the backlog.
    pub(crate) fn send(&self, frame: FrameRef<'_>) -> Result<(), ConnError> {
        self.send_as(frame, false)
    }

    /// Sends a transport message that needs no credit (the handshake, the pool advert, the
    /// mesh-ready barrier): the peer's receive queue is never short of buffers for these few,
    /// and a reliable connection retries a SEND that finds none.
    pub(crate) fn send_control(&self, frame: FrameRef<'_>) -> Result<(), ConnError> {
        self.send_as(frame, true)
    }

    fn send_as(&self, frame: FrameRef<'_>, control: bool) -> Result<(), ConnError> {
        let mut state = self.state();
        if state.closed {
            return Err(ConnError::Closed);
        }
        if !control {
            state.stats.frames_sent += 1;
        }
        if state.backlog.is_empty() && self.try_post(&mut state, frame, control)? {
            return Ok(());
        }
        let bytes = frame.payload.len() + crate::frame::HEADER_LEN;
        if state.backlog_bytes + bytes > BACKLOG_LIMIT {
            return Err(ConnError::Backlog(state.backlog_bytes));
        }
        state.backlog_bytes += bytes;
        state.stats.frames_queued += 1;
        state.stats.peak_backlog_bytes = state.stats.peak_backlog_bytes.max(state.backlog_bytes);
        state.backlog.push_back((frame.to_frame(), control));
        Ok(())
    }

    /// Posts `frame` if the buffers and credits it needs are there; `false` if not.
    fn try_post(
        &self,
        state: &mut State,
        frame: FrameRef<'_>,
        control: bool,
    ) -> Result<bool, VerbsError> {
        debug_assert!(frame.payload.len() <= MAX_PAYLOAD);
        let staged = !message::is_inline(frame.payload.len());
        if !control {
            let Some(peer) = state.peer else {
                return Ok(false);
            };
            state.peer_recvs = state.peer_recvs.max(self.region.load_u64(MAILBOX_IN));
            state.peer_freed = state.peer_freed.max(self.region.load_u64(MAILBOX_IN + 8));
            if state.peer_recvs <= state.sends {
                return Ok(false);
            }
            if staged && state.staged - state.peer_freed >= u64::from(peer.staging_slots) {
                return Ok(false);
            }
        }
        let Some(buf) = state.bufs.take() else {
            return Ok(false);
        };
        let mut staged_slot = None;
        if staged {
            let (Some(peer), Some(out)) = (state.peer, state.stage_out.take()) else {
                state.bufs.give_back(buf).ok();
                return Ok(false);
            };
            let slot = u32::try_from(state.staged % u64::from(peer.staging_slots))
                .expect("a slot index is below the slot count, a u32");
            let offset = state.stage_out.offset(out);
            // SAFETY: the outgoing staging slot was just taken from its pool, so no post uses it.
            unsafe { self.region.write(offset, frame.payload) };
            let to = RemoteRange {
                addr: peer.staging.addr + u64::from(slot) * STAGING_SLOT_LEN as u64,
                rkey: peer.staging.rkey,
            };
            let local = self.local(offset, frame.payload.len());
            // SAFETY: the slot is registered and stays untouched until the WRITE completes and
            // gives it back; `to` is the staging slot the peer advertised and has freed.
            unsafe { self.verbs.post_write(wr_id(TAG_STAGE, out), local, to)? };
            state.staged += 1;
            staged_slot = Some(slot);
        }
        let mut bytes = [0u8; MESSAGE_LEN];
        let len = message::encode(frame, staged_slot, &mut bytes)
            .expect("sizes were checked: an inline payload fits, a staged one is in a slot");
        let offset = state.bufs.offset(buf);
        // SAFETY: the send buffer was just taken from its pool, so no post uses it.
        unsafe { self.region.write(offset, &bytes[..len]) };
        // SAFETY: the buffer is registered and stays untouched until its completion gives it
        // back to the pool.
        unsafe {
            self.verbs
                .post_send(wr_id(TAG_SEND, buf), self.local(offset, len))?
        };
        state.sends += 1;
        Ok(true)
    }

    /// Sends on what waits in the backlog, as far as credits go.
    fn drain_backlog(&self, state: &mut State) -> Result<(), VerbsError> {
        while let Some((frame, control)) = state.backlog.pop_front() {
            if !self.try_post(state, frame.view(), control)? {
                state.backlog.push_front((frame, control));
                break;
            }
            state.backlog_bytes -= frame.payload.len() + crate::frame::HEADER_LEN;
        }
        Ok(())
    }

    /// Sends the pool advert: where the peer may write, and this end's receives so far.
    pub(crate) fn advertise(&self) -> Result<(), ConnError> {
        let recvs_posted = self.state().recvs_posted;
        let advert = Advert {
            staging: RemoteRange {
                addr: self.region.addr(STAGE_IN_BASE),
                rkey: self.keys.rkey,
            },
            staging_slots: STAGING_SLOTS,
            mailbox: RemoteRange {
                addr: self.region.addr(MAILBOX_IN),
                rkey: self.keys.rkey,
            },
            recvs_posted,
        };
        self.send_control(transport_frame(KIND_RDMA_POOL, &advert.encode()))
    }

    /// Writes the counters to the peer's mailbox when they moved enough (or at all, with
    /// `now`), unless a write is under way already.
    fn return_credits(&self, state: &mut State, now: bool) -> Result<(), VerbsError> {
        let Some(peer) = state.peer else {
            return Ok(());
        };
        let current = (state.recvs_posted, state.staged_delivered);
        if state.credit_write_busy || current == state.advertised {
            return Ok(());
        }
        let owed_recvs = current.0 - state.advertised.0;
        let owed_slots = current.1 - state.advertised.1;
        if !now
            && owed_recvs < u64::from(RECV_RING / 4)
            && owed_slots < u64::from(STAGING_SLOTS / 4)
        {
            return Ok(());
        }
        self.region.store_u64(MAILBOX_OUT, current.0);
        self.region.store_u64(MAILBOX_OUT + 8, current.1);
        // SAFETY: the two outgoing mailbox words are registered; this end only ever stores
        // newer counters into them atomically, and the device reading a newer value than the
        // one posted is harmless (the counters only grow).
        unsafe {
            self.verbs.post_write(
                wr_id(TAG_CREDIT, 0),
                self.local(MAILBOX_OUT, 16),
                peer.mailbox,
            )?;
        }
        state.credit_write_busy = true;
        state.advertised = current;
        Ok(())
    }

    /// Whether frames wait for credits (the progress loop then polls the mailbox often).
    pub(crate) fn has_backlog(&self) -> bool {
        !self.state().backlog.is_empty()
    }

    /// Stops sending and fails every outstanding post; later sends are refused.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        if !state.closed {
            state.closed = true;
            state.backlog.clear();
            state.backlog_bytes = 0;
            drop(state);
            self.verbs.disconnect();
        }
    }

    pub(crate) fn stats(&self) -> TransportStats {
        self.state().stats
    }
}

/// A frame of the transport's own.
pub(crate) fn transport_frame(kind: u16, payload: &[u8]) -> FrameRef<'_> {
    debug_assert!(payload.len() <= INLINE_MAX);
    FrameRef {
        kind,
        flags: 0,
        id: 0,
        arg: 0,
        payload,
    }
}

//! The receive side of a connection: taking completions, handing what arrived to the
//! consumer, reposting receive buffers and returning credits.

use std::collections::VecDeque;
use std::sync::PoisonError;

use crate::channel::Channel;
use crate::frame::{FrameRef, FIRST_RESERVED_KIND, KIND_HEARTBEAT, KIND_MESH_READY};

use super::{
    split, Conn, ConnEvents, Received, POLL_BATCH, RECV_RING, STAGE_IN_BASE, STAGING_SLOTS,
    STAGING_SLOT_LEN, TAG_CREDIT, TAG_RECV, TAG_SEND, TAG_STAGE,
};
use crate::rdma::advert::Advert;
use crate::rdma::message::{self, Payload, KIND_RDMA_HANDSHAKE, KIND_RDMA_POOL};
use crate::rdma::verbs::{Completion, Op};

impl Conn {
    /// Takes up to a batch of completions and acts on each: gives back send buffers and
    /// staging slots, hands received frames to `events`, reposts receives, sends on the
    /// backlog and returns credits. Returns how much it did; an error says why the peer is
    /// lost (a failed work request means the queue pair is in the error state).
    pub(crate) fn progress(&self, events: &dyn ConnEvents) -> Result<usize, String> {
        let early: Vec<Vec<u8>> = self
            .early
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for bytes in &early {
            self.on_message(bytes, events)?;
        }
        let mut done = Vec::with_capacity(POLL_BATCH);
        self.verbs
            .poll(&mut done, POLL_BATCH)
            .map_err(|e| e.to_string())?;
        for completion in &done {
            self.complete(completion, events)?;
        }
        let mut state = self.state();
        self.drain_backlog(&mut state).map_err(|e| e.to_string())?;
        self.return_credits(&mut state, done.is_empty())
            .map_err(|e| e.to_string())?;
        Ok(done.len() + early.len())
    }

    /// One step of the handshake phase (before the progress loop runs): takes at most one
    /// completion, copies a received message into `stash` (reposting its buffer at once), and
    /// sends on what waits for a send buffer. Returns whether a completion was taken.
    pub(crate) fn pump_handshake(&self, stash: &mut VecDeque<Vec<u8>>) -> Result<bool, String> {
        let mut done = Vec::with_capacity(1);
        self.verbs.poll(&mut done, 1).map_err(|e| e.to_string())?;
        for completion in &done {
            if let Some(msg) = self.complete_send_side(completion)? {
                stash.push_back(self.received(msg).to_vec());
                self.release(msg).map_err(|e| e.to_string())?;
            }
        }
        let mut state = self.state();
        self.drain_backlog(&mut state).map_err(|e| e.to_string())?;
        Ok(!done.is_empty())
    }

    /// Acts on one completion of the send queue; a receive is returned to the caller instead.
    /// Used by the handshake, before the progress loop runs.
    pub(crate) fn complete_send_side(
        &self,
        completion: &Completion,
    ) -> Result<Option<Received>, String> {
        let (tag, slot) = split(completion.wr_id);
        let len = completion
            .result
            .clone()
            .map_err(|why| self.failed(completion.op, &why))?;
        let mut state = self.state();
        let given = match tag {
            TAG_RECV if slot < RECV_RING => return Ok(Some(Received { slot, len })),
            TAG_SEND => state.bufs.give_back(slot),
            TAG_STAGE => state.stage_out.give_back(slot),
            TAG_CREDIT => {
                state.credit_write_busy = false;
                Ok(())
            }
            _ => {
                return Err(format!(
                    "a completion carries a work id ({:#x}) this connection never posted",
                    completion.wr_id
                ))
            }
        };
        given.map_err(|e| e.to_string())?;
        Ok(None)
    }

    fn complete(&self, completion: &Completion, events: &dyn ConnEvents) -> Result<(), String> {
        if let Some(msg) = self.complete_send_side(completion)? {
            let bytes = self.received(msg);
            let handled = self.on_message(bytes, events);
            self.release(msg).map_err(|e| e.to_string())?;
            handled?;
        }
        Ok(())
    }

    fn failed(&self, op: Op, why: &str) -> String {
        format!(
            "an RDMA {op:?} on the {} connection failed: {why}",
            self.channel
        )
    }

    /// Checks one message and acts on it.
    fn on_message(&self, bytes: &[u8], events: &dyn ConnEvents) -> Result<(), String> {
        let channel = self.channel;
        let decoded = message::decode(bytes, STAGING_SLOTS).map_err(|e| {
            format!("it sent a malformed message on the {channel} channel ({e}); treating it as misbehaving")
        })?;
        events.heard();
        let header = decoded.header;
        let payload: &[u8] = match decoded.payload {
            Payload::Inline { offset } => &bytes[offset..offset + header.payload_len()],
            Payload::Staged { slot } => {
                let expected = self.state().staged_delivered % u64::from(STAGING_SLOTS);
                if u64::from(slot) != expected {
                    return Err(format!(
                        "it announced a page in staging slot {slot} on the {channel} channel, \
                         but slot {expected} was next; treating it as misbehaving"
                    ));
                }
                // SAFETY: the peer wrote this slot before the SEND that announces it (a
                // reliable connection places them in order), and writes it again only after
                // this end frees it below, once the frame was handed over.
                unsafe {
                    self.region.bytes(
                        STAGE_IN_BASE + slot as usize * STAGING_SLOT_LEN,
                        header.payload_len(),
                    )
                }
            }
        };
        let frame = FrameRef {
            kind: header.kind,
            flags: header.flags,
            id: header.id,
            arg: header.arg,
            payload,
        };
        match header.kind {
            kind if kind < FIRST_RESERVED_KIND => events.deliver(channel, frame)?,
            KIND_HEARTBEAT if channel == Channel::Control => {}
            KIND_MESH_READY if channel == Channel::Control => events.mesh_ready(),
            KIND_RDMA_POOL => {
                let advert = Advert::decode(payload)
                    .map_err(|e| format!("{e} (on the {channel} channel)"))?;
                let mut state = self.state();
                if state.peer.is_some() {
                    return Err(format!(
                        "it sent a second RDMA pool advert on the {channel} channel; treating \
                         it as misbehaving"
                    ));
                }
                state.peer_recvs = advert.recvs_posted;
                state.peer = Some(advert);
            }
            kind => {
                let what = if kind == KIND_RDMA_HANDSHAKE {
                    "handshake data after the handshake".to_string()
                } else {
                    format!("a frame of reserved kind {kind:#06x}")
                };
                return Err(format!(
                    "it sent {what} on the {channel} channel; treating it as misbehaving"
                ));
            }
        }
        if let Payload::Staged { .. } = decoded.payload {
            self.state().staged_delivered += 1;
        }
        Ok(())
    }
}

//! The state a running mesh shares between the caller's threads and its own, whatever the
//! backend: its peers, which of them are lost and when each was last heard from, and its
//! threads. Each backend adds its sending and its threads in an `impl MeshState<ItsConn>`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use resources::ServicePriority;

use crate::api::{FrameHandler, TransportStats};
use crate::channel::{Channel, NodeId};
use crate::config::Liveness;
use crate::error::TransportError;
use crate::frame::{FrameRef, FIRST_RESERVED_KIND, MAX_PAYLOAD};

use super::link::{LinkConn, PeerLink};
use super::threads::Threads;

/// The shared state of a mesh whose connections are `C`s.
pub(crate) struct MeshState<C> {
    pub me: NodeId,
    pub links: BTreeMap<NodeId, PeerLink<C>>,
    pub handler: Arc<dyn FrameHandler>,
    pub liveness: Liveness,
    pub busy_poll: bool,
    pub service_priority: ServicePriority,
    epoch: Instant,
    /// Set once setup is over: from then on, losses are reported to the handler.
    running: AtomicBool,
    shutting_down: AtomicBool,
    threads: Threads,
}

impl<C: LinkConn> MeshState<C> {
    pub(crate) fn new(
        me: NodeId,
        handler: Arc<dyn FrameHandler>,
        liveness: Liveness,
        busy_poll: bool,
        service_priority: ServicePriority,
        links: BTreeMap<NodeId, PeerLink<C>>,
    ) -> MeshState<C> {
        MeshState {
            me,
            links,
            handler,
            liveness,
            busy_poll,
            service_priority,
            epoch: Instant::now(),
            running: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            threads: Threads::default(),
        }
    }

    /// Gives the calling receiver of `channel` the configured priority, unless it spins or
    /// serves the control channel (start/stop and heartbeats wait for nothing urgent).
    pub(crate) fn raise_receiver(&self, channel: Channel, spinning: bool) {
        if channel != Channel::Control && !spinning {
            self.service_priority
                .apply_to_current_thread(&format!("node {}", self.me));
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Starts reporting losses; every peer counts as just heard from.
    pub(crate) fn set_running(&self) {
        let now = self.now_ms();
        for link in self.links.values() {
            link.set_last_heard_ms(now);
        }
        self.running.store(true, Ordering::Release);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn heard_from(&self, link: &PeerLink<C>) {
        link.set_last_heard_ms(self.now_ms());
    }

    /// How long `link` has been silent.
    pub(crate) fn silence(&self, link: &PeerLink<C>) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(link.last_heard_ms()))
    }

    /// Closes every connection of `peer` and, once per peer and only while running, reports
    /// the loss to the handler (whose job it is to tell the user).
    pub(crate) fn declare_lost(&self, peer: NodeId, why: &str) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        if !link.mark_lost() {
            return;
        }
        for conn in link.conns() {
            conn.close();
        }
        if self.running.load(Ordering::Acquire) && !self.is_shutting_down() {
            self.handler.on_peer_lost(peer, why);
        }
    }

    /// The first peer lost so far, if any.
    pub(crate) fn first_lost(&self) -> Option<NodeId> {
        self.links.values().find(|l| l.is_lost()).map(|l| l.id)
    }

    pub(crate) fn is_lost(&self, peer: NodeId) -> bool {
        self.links.get(&peer).is_some_and(PeerLink::is_lost)
    }

    pub(crate) fn peers(&self) -> Vec<NodeId> {
        self.links.keys().copied().collect()
    }

    /// What went through all connections so far.
    pub(crate) fn stats(&self) -> TransportStats {
        let mut total = TransportStats::default();
        for link in self.links.values() {
            for conn in link.conns() {
                total.add(conn.stats());
            }
        }
        total
    }

    /// Sends a frame of the consumer; a connection that fails makes its peer lost.
    pub(crate) fn send_ref(
        &self,
        to: NodeId,
        channel: Channel,
        frame: FrameRef<'_>,
    ) -> Result<(), TransportError> {
        let link = self.link_to_send(to, frame)?;
        link.conn(channel).send_frame(frame).map_err(|error| {
            let why = format!("sending on the {channel} channel failed: {error}");
            let failure = C::send_failure(error, to, channel);
            if failure.loses_peer {
                self.declare_lost(to, &why);
            }
            failure.error
        })
    }

    /// Checks a frame of the consumer and finds the link it goes on: refuses a reserved kind,
    /// an oversized payload, an unknown or lost peer, and a mesh that is shutting down.
    fn link_to_send(
        &self,
        to: NodeId,
        frame: FrameRef<'_>,
    ) -> Result<&PeerLink<C>, TransportError> {
        if frame.kind >= FIRST_RESERVED_KIND {
            return Err(TransportError::ReservedKind { kind: frame.kind });
        }
        if frame.payload.len() > MAX_PAYLOAD {
            return Err(TransportError::PayloadTooLarge {
                len: frame.payload.len(),
            });
        }
        let link = self
            .links
            .get(&to)
            .ok_or(TransportError::UnknownPeer { peer: to })?;
        if self.is_shutting_down() {
            return Err(TransportError::ShutDown);
        }
        if link.is_lost() {
            return Err(TransportError::PeerLost { peer: to });
        }
        Ok(link)
    }

    /// Starts a transport thread that the shutdown will wait for.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        name: String,
        body: impl FnOnce(Arc<Self>) + Send + 'static,
    ) -> Result<(), TransportError> {
        let state = Arc::clone(self);
        self.threads.spawn(name, move || body(state))
    }

    /// Closes everything and waits for the transport's threads (except the calling one).
    pub(crate) fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        for link in self.links.values() {
            for conn in link.conns() {
                conn.close();
            }
        }
        self.threads.join_all(self.me);
    }
}

//! The state a running RDMA mesh shares between the caller's threads and its own: the
//! connections per peer, which peers are lost, and the threads that make progress on every
//! connection, send heartbeats and watch for silent peers.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::api::{FrameHandler, TransportStats};
use crate::channel::{Channel, NodeId};
use crate::config::Liveness;
use crate::error::TransportError;
use crate::frame::{FrameRef, FIRST_RESERVED_KIND, KIND_HEARTBEAT, MAX_PAYLOAD};
use crate::spin_budget;

use super::conn::{Conn, ConnError, ConnEvents};

/// How long an idle progress loop sleeps in the completion channel before it looks at the
/// shutdown flag again; frames wake it at once.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How long it sleeps while frames wait for credits, which come back without a completion.
const BACKLOG_WAIT: Duration = Duration::from_micros(200);

/// Everything about one peer.
pub(crate) struct PeerLink {
    pub id: NodeId,
    /// One connection per channel, indexed by [`Channel::index`].
    conns: Vec<Conn>,
    lost: AtomicBool,
    /// The peer said it has all its connections (the mesh-ready barrier).
    ready: AtomicBool,
    last_heard_ms: AtomicU64,
}

impl PeerLink {
    pub(crate) fn conn(&self, channel: Channel) -> &Conn {
        &self.conns[channel.index()]
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// The shared state of an RDMA mesh.
pub(crate) struct MeshCore {
    pub me: NodeId,
    pub links: BTreeMap<NodeId, PeerLink>,
    handler: Arc<dyn FrameHandler>,
    liveness: Liveness,
    busy_poll: bool,
    epoch: Instant,
    running: AtomicBool,
    shutting_down: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl MeshCore {
    /// Takes the established connections: for every peer, one per channel in [`Channel::ALL`]
    /// order.
    pub(crate) fn new(
        me: NodeId,
        handler: Arc<dyn FrameHandler>,
        liveness: Liveness,
        busy_poll: bool,
        conns: BTreeMap<NodeId, Vec<Conn>>,
    ) -> MeshCore {
        let links = conns
            .into_iter()
            .map(|(id, conns)| {
                debug_assert_eq!(conns.len(), Channel::COUNT);
                let link = PeerLink {
                    id,
                    conns,
                    lost: AtomicBool::new(false),
                    ready: AtomicBool::new(false),
                    last_heard_ms: AtomicU64::new(0),
                };
                (id, link)
            })
            .collect();
        MeshCore {
            me,
            links,
            handler,
            liveness,
            busy_poll,
            epoch: Instant::now(),
            running: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Starts reporting losses; every peer counts as just heard from.
    pub(crate) fn set_running(&self) {
        let now = self.now_ms();
        for link in self.links.values() {
            link.last_heard_ms.store(now, Ordering::Release);
        }
        self.running.store(true, Ordering::Release);
    }

    /// Closes every connection of `peer` and, once per peer and only while running, tells the
    /// handler.
    pub(crate) fn declare_lost(&self, peer: NodeId, why: &str) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        if link.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        for conn in &link.conns {
            conn.close();
        }
        if self.running.load(Ordering::Acquire) && !self.is_shutting_down() {
            self.handler.on_peer_lost(peer, why);
        }
    }

    /// The first peer lost so far.
    pub(crate) fn first_lost(&self) -> Option<NodeId> {
        self.links.values().find(|l| l.is_lost()).map(|l| l.id)
    }

    pub(crate) fn is_lost(&self, peer: NodeId) -> bool {
        self.links.get(&peer).is_some_and(PeerLink::is_lost)
    }

    pub(crate) fn stats(&self) -> TransportStats {
        let mut total = TransportStats::default();
        for link in self.links.values() {
            for conn in &link.conns {
                total.add(conn.stats());
            }
        }
        total
    }

    pub(crate) fn send_ref(
        &self,
        to: NodeId,
        channel: Channel,
        frame: FrameRef<'_>,
    ) -> Result<(), TransportError> {
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
        link.conn(channel)
            .send(frame)
            .map_err(|error| self.send_failed(to, channel, error))
    }

    fn send_failed(&self, to: NodeId, channel: Channel, error: ConnError) -> TransportError {
        let why = format!("sending on the {channel} channel failed: {error}");
        match error {
            ConnError::Closed => TransportError::PeerLost { peer: to },
            ConnError::Backlog(queued) => {
                self.declare_lost(to, &why);
                TransportError::NotReading {
                    peer: to,
                    channel,
                    queued,
                }
            }
            ConnError::Verbs(source) => {
                self.declare_lost(to, &why);
                TransportError::SendFailed {
                    peer: to,
                    channel,
                    source: std::io::Error::other(source.to_string()),
                }
            }
        }
    }

    /// Starts a thread that the shutdown waits for.
    fn spawn(
        self: &Arc<Self>,
        name: String,
        body: impl FnOnce(Arc<MeshCore>) + Send + 'static,
    ) -> Result<(), TransportError> {
        let core = Arc::clone(self);
        let handle = thread::Builder::new()
            .name(name)
            .spawn(move || body(core))
            .map_err(|source| TransportError::Thread { source })?;
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
        Ok(())
    }

    /// Starts one progress loop per connection: it polls the connection's completions (busy,
    /// for the DSM request channel with `busy_poll` while the process-wide spin budget has a
    /// core to spare; otherwise sleeping in the completion channel) and hands frames to the handler, in order per (peer, channel).
    pub(crate) fn start_progress(self: &Arc<Self>) -> Result<(), TransportError> {
        for &peer in self.links.keys() {
            for channel in Channel::ALL {
                let name = format!("xport-rdma{peer}-{}", channel.index());
                self.spawn(name, move |core| core.progress_loop(peer, channel))?;
            }
        }
        Ok(())
    }

    fn progress_loop(&self, peer: NodeId, channel: Channel) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let conn = link.conn(channel);
        // Held for as long as this loop spins; dropping it gives the core back.
        let spin_claim = if self.busy_poll && channel == Channel::DsmRequest {
            spin_budget::claim()
                .map_err(|refused| {
                    eprintln!(
                        "spanvm transport: node {}, RDMA receiver from node {peer}: {refused}",
                        self.me
                    );
                })
                .ok()
        } else {
            None
        };
        let spinning = spin_claim.is_some();
        let events = LinkEvents { core: self, link };
        loop {
            if self.is_shutting_down() || link.is_lost() {
                return;
            }
            match conn.progress(&events) {
                Ok(0) if spinning => {
                    std::hint::spin_loop();
                    thread::yield_now();
                }
                Ok(0) => {
                    let wait = if conn.has_backlog() {
                        BACKLOG_WAIT
                    } else {
                        IDLE_WAIT
                    };
                    conn.verbs().wait(wait);
                }
                Ok(_) => {}
                Err(why) => {
                    if !self.is_shutting_down() && !link.is_lost() {
                        eprintln!(
                            "spanvm transport: node {} drops node {peer}: {why}",
                            self.me
                        );
                    }
                    self.declare_lost(peer, &why);
                    return;
                }
            }
        }
    }

    /// Sends a heartbeat to every live peer every `heartbeat_interval` on the control channel.
    /// A peer that died makes the heartbeat's SEND fail (retries exceeded), and a frozen one
    /// stops sending its own, which the watchdog notices.
    pub(crate) fn start_heartbeats(self: &Arc<Self>) -> Result<(), TransportError> {
        self.spawn("xport-heartbeat".to_string(), |core| {
            let mut sequence = 0u64;
            loop {
                thread::park_timeout(core.liveness.heartbeat_interval);
                if core.is_shutting_down() {
                    return;
                }
                sequence += 1;
                let beat = FrameRef {
                    kind: KIND_HEARTBEAT,
                    flags: 0,
                    id: sequence,
                    arg: 0,
                    payload: &[],
                };
                for link in core.links.values().filter(|l| !l.is_lost()) {
                    if let Err(e) = link.conn(Channel::Control).send(beat) {
                        let why = format!("sending a heartbeat on the control channel failed: {e}");
                        core.declare_lost(link.id, &why);
                    }
                }
            }
        })
    }

    /// Declares lost every peer silent for longer than `silence_timeout`.
    pub(crate) fn start_watchdog(self: &Arc<Self>) -> Result<(), TransportError> {
        self.spawn("xport-watchdog".to_string(), |core| {
            let limit = core.liveness.silence_timeout;
            let check_every = core.liveness.heartbeat_interval.min(limit / 4);
            loop {
                thread::park_timeout(check_every);
                if core.is_shutting_down() {
                    return;
                }
                for link in core.links.values().filter(|l| !l.is_lost()) {
                    let last = link.last_heard_ms.load(Ordering::Acquire);
                    let silence = Duration::from_millis(core.now_ms().saturating_sub(last));
                    if silence > limit {
                        let why = format!(
                            "nothing (no frame, no heartbeat) arrived from node {} for {:.1} s, \
                             more than the {:.1} s allowed: it is frozen or overloaded, or the \
                             RDMA path to it is down",
                            link.id,
                            silence.as_secs_f64(),
                            limit.as_secs_f64()
                        );
                        core.declare_lost(link.id, &why);
                    }
                }
            }
        })
    }

    /// Closes everything and waits for the threads (except the calling one).
    pub(crate) fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        for link in self.links.values() {
            for conn in &link.conns {
                conn.close();
            }
        }
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in &threads {
            handle.thread().unpark();
        }
        let current = thread::current().id();
        for handle in threads {
            if handle.thread().id() == current {
                continue;
            }
            let name = handle.thread().name().unwrap_or("?").to_string();
            if handle.join().is_err() {
                eprintln!(
                    "spanvm transport: node {}: thread {name} panicked (in a frame handler?)",
                    self.me
                );
            }
        }
    }
}

/// What one peer's connections report, turned into the mesh's state and the handler's calls.
struct LinkEvents<'a> {
    core: &'a MeshCore,
    link: &'a PeerLink,
}

impl ConnEvents for LinkEvents<'_> {
    fn heard(&self) {
        self.link
            .last_heard_ms
            .store(self.core.now_ms(), Ordering::Release);
    }

    fn deliver(&self, channel: Channel, frame: FrameRef<'_>) -> Result<(), String> {
        let peer = self.link.id;
        let handler = &self.core.handler;
        panic::catch_unwind(AssertUnwindSafe(|| {
            handler.on_frame(peer, channel, frame);
        }))
        .map_err(|_| {
            format!(
                "the frame handler panicked on a frame from node {peer} on the {channel} \
                 channel, so that connection can no longer be served"
            )
        })
    }

    fn mesh_ready(&self) {
        self.link.ready.store(true, Ordering::Release);
    }
}

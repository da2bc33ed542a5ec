//! The control protocol on the Control connection: the master tells the others when the guest
//! image is in memory (START), every node tells the master when its local vCPUs are done (DONE),
//! and the master tells everyone to stop (STOP) once all are done or one failed. A node keeps
//! serving the DSM after its own vCPUs are done, until STOP: other nodes may still need its pages.
//!
//! START carries the master's clock ([`clock::MasterClock`]); before its vCPUs run, every other
//! node sets its own from it, taking clock samples from the master on the way (CLOCK_PING with
//! the sample number in `arg`, answered by CLOCK_REPLY carrying a [`clock::ClockReply`], or
//! the master's error text with [`FLAG_CLOCK_ERROR`]).
//!
//! Leaving is two-phase so that no node takes another's exit for a failure: every node answers
//! STOP with STOP_ACK once it treats disconnects as expected; only when all have answered does
//! the master send EXIT, and only then do nodes close their connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use clock::{ClockError, ClockReply, MasterClock, MasterLink};
use resources::node_index;
use transport::{Channel, FrameRef, NodeId, Transport};

use crate::platform::Platform;
use crate::stop::StopReason;

const KIND_START: u16 = 1;
const KIND_DONE: u16 = 2;
const KIND_STOP: u16 = 3;
const KIND_STOP_ACK: u16 = 4;
const KIND_EXIT: u16 = 5;
const KIND_CLOCK_PING: u16 = 6;
const KIND_CLOCK_REPLY: u16 = 7;
/// On a CLOCK_REPLY: the payload is the master's error text, not a reply.
pub const FLAG_CLOCK_ERROR: u16 = 1;
/// How long a node waits for the answer to one clock sample.
const CLOCK_REPLY_WAIT: Duration = Duration::from_secs(2);
/// How long a node that lost a peer keeps its connections open before it leaves.
const LOSS_GRACE: Duration = Duration::from_millis(300);
/// How long the master waits for every STOP_ACK, and a node for EXIT.
const LEAVE_WAIT: Duration = Duration::from_secs(3);

/// Exit codes of StopReason travel in STOP frames; these are the ones a STOP can carry.
fn reason_from_wire(code: u64, text: &str) -> StopReason {
    match code {
        0 => StopReason::PowerOff,
        3 => StopReason::Reset(text.to_string()),
        4 => {
            let (vcpu, status) = text.split_once(':').unwrap_or(("0", "1"));
            StopReason::ProbeFailed {
                vcpu: vcpu.trim().parse().unwrap_or(0),
                status: status.trim().parse().unwrap_or(1),
            }
        }
        5 => StopReason::PeerLost(text.to_string()),
        6 => StopReason::MemoryFailed(text.to_string()),
        130 => StopReason::Interrupted,
        _ => StopReason::Error(text.to_string()),
    }
}

fn reason_text(reason: &StopReason) -> String {
    match reason {
        StopReason::ProbeFailed { vcpu, status } => format!("{vcpu}:{status}"),
        StopReason::Reset(t)
        | StopReason::PeerLost(t)
        | StopReason::MemoryFailed(t)
        | StopReason::Error(t) => t.clone(),
        StopReason::PowerOff | StopReason::Interrupted => String::new(),
    }
}

/// What the master answers a clock sample request with.
pub type ClockResponder = Box<dyn Fn(u64) -> Result<ClockReply, ClockError> + Send + Sync>;

#[derive(Default)]
struct State {
    started: bool,
    /// A stop requested before the platform existed (while the guest was being loaded).
    pending_stop: Option<StopReason>,
    /// Some stop was requested (ends the wait for START).
    stop_requested: bool,
    /// The master's clock from START (or why it could not be read), until taken.
    start_clock: Option<Result<MasterClock, ClockError>>,
    /// The latest answer to a clock sample: its number and content.
    clock_reply: Option<(u64, Result<ClockReply, ClockError>)>,
    /// Per node: its local vCPUs are done (master only).
    done: Vec<bool>,
    stop_sent: bool,
    stop_received: bool,
    exit_received: bool,
    acked: Vec<bool>,
    lost: Vec<bool>,
}

/// One node's side of the control protocol.
pub struct Control {
    me: NodeId,
    nodes: NodeId,
    state: Mutex<State>,
    changed: Condvar,
    mesh: Mutex<Option<Weak<dyn Transport>>>,
    platform: Mutex<Option<Weak<Platform>>>,
    stopping_cleanly: AtomicBool,
    /// Master: answers clock samples (set before START goes out).
    clock_responder: Mutex<Option<ClockResponder>>,
}

impl Control {
    /// Control for node `me` of `nodes`.
    pub fn new(me: NodeId, nodes: NodeId) -> Self {
        Self {
            me,
            nodes,
            state: Mutex::new(State {
                done: vec![false; node_index(nodes)],
                acked: vec![false; node_index(nodes)],
                lost: vec![false; node_index(nodes)],
                ..Default::default()
            }),
            changed: Condvar::new(),
            mesh: Mutex::new(None),
            platform: Mutex::new(None),
            stopping_cleanly: AtomicBool::new(false),
            clock_responder: Mutex::new(None),
        }
    }

    /// Every node but this one.
    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.nodes).filter(|&p| p != self.me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_mesh(&self, mesh: Weak<dyn Transport>) {
        *self.mesh.lock().unwrap_or_else(|p| p.into_inner()) = Some(mesh);
    }

    pub(crate) fn set_platform(&self, platform: Weak<Platform>) {
        let pending = {
            // Under the platform lock, so that no stop falls between the two (see stop_platform).
            let mut slot = self.platform.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(platform);
            self.lock().pending_stop.take()
        };
        if let Some(reason) = pending {
            self.stop_platform(reason);
        }
    }

    fn is_master(&self) -> bool {
        self.me == 0
    }

    fn send(&self, to: NodeId, kind: u16, arg: u64, text: &str) {
        self.send_bytes(to, kind, 0, arg, text.as_bytes());
    }

    fn send_bytes(&self, to: NodeId, kind: u16, flags: u16, arg: u64, payload: &[u8]) {
        let mesh = self
            .mesh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        if let Some(mesh) = mesh {
            let frame = FrameRef {
                kind,
                flags,
                id: 0,
                arg,
                payload,
            };
            // A failed send means that peer is gone; its loss is reported by the transport.
            let _ = mesh.send_ref(to, Channel::Control, frame);
        }
    }

    fn stop_platform(&self, reason: StopReason) {
        // The platform hears the reason before any waiter wakes: a node woken from waiting for
        // START by this stop reads the platform's reason to say why it stopped, and must not
        // find none (which it would report as a START that never came).
        let platform = {
            let slot = self.platform.lock().unwrap_or_else(|p| p.into_inner());
            let platform = slot.as_ref().and_then(Weak::upgrade);
            if platform.is_none() {
                // Kept (under the platform lock) until set_platform hands it over.
                let mut st = self.lock();
                if st.pending_stop.is_none() {
                    st.pending_stop = Some(reason.clone());
                }
            }
            platform
        };
        if let Some(p) = platform {
            p.request_stop(reason);
        }
        self.lock().stop_requested = true;
        self.changed.notify_all();
    }

    /// Something on this node makes the guest unable to go on (a peer broke a protocol):
    /// stops the local guest; leaving then tells the master, which stops the rest.
    pub fn fail(&self, reason: StopReason) {
        self.stop_platform(reason);
    }

    /// From now on, disconnects are expected (this node or the whole cluster is going away).
    pub fn expect_disconnects(&self) {
        self.stopping_cleanly.store(true, Ordering::SeqCst);
    }

    /// Whether this node is leaving on purpose (then peer losses are expected, not errors).
    pub fn is_stopping_cleanly(&self) -> bool {
        self.stopping_cleanly.load(Ordering::SeqCst)
    }

    /// Master: how to answer the other nodes' clock samples (before [`Control::announce_start`]).
    pub fn set_clock_responder(&self, responder: ClockResponder) {
        *self
            .clock_responder
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(responder);
    }

    /// Master: the guest is loaded; let every node set its clock from `clock` and start its
    /// vCPUs.
    pub fn announce_start(&self, clock: &MasterClock) {
        let payload = clock.encode();
        for peer in self.peers() {
            self.send_bytes(peer, KIND_START, 0, 0, &payload);
        }
    }

    /// Waits up to `limit` for a stop to be requested; whether one was.
    pub fn wait_for_stop(&self, limit: Duration) -> bool {
        self.wait_until(limit, |st| st.stop_requested);
        self.lock().stop_requested
    }

    /// Others: waits for the master's START; gives the master's clock from it (or why START
    /// was unusable), or `None` on a stop or the timeout.
    pub fn wait_for_start(&self, timeout: Duration) -> Option<Result<MasterClock, ClockError>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !st.started && !st.stop_requested && !self.is_stopping_cleanly() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if !st.started {
            return None;
        }
        st.start_clock.take()
    }

    /// Master: answers clock sample `seq` from `from`.
    fn answer_clock_ping(&self, from: NodeId, seq: u64) {
        let answer = match self
            .clock_responder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(responder) => responder(seq),
            None => Err(ClockError::MasterFailed {
                seq,
                why: "the master has not published its clock yet (a sample before START)".into(),
            }),
        };
        match answer {
            Ok(reply) => self.send_bytes(from, KIND_CLOCK_REPLY, 0, seq, &reply.encode()),
            Err(e) => self.send_bytes(
                from,
                KIND_CLOCK_REPLY,
                FLAG_CLOCK_ERROR,
                seq,
                e.to_string().as_bytes(),
            ),
        }
    }

    /// Others: a CLOCK_REPLY from the master.
    fn on_clock_reply(&self, from: NodeId, frame: FrameRef<'_>) {
        let seq = frame.arg;
        let reply = if frame.flags == FLAG_CLOCK_ERROR {
            Err(ClockError::MasterFailed {
                seq,
                why: String::from_utf8_lossy(frame.payload).into_owned(),
            })
        } else if frame.flags != 0 {
            Err(ClockError::BadFrame {
                from,
                what: "clock sample reply",
                why: format!("unknown flags {:#x}", frame.flags),
            })
        } else {
            ClockReply::decode(from, frame.payload).and_then(|r| {
                if r.seq == seq {
                    Ok(r)
                } else {
                    Err(ClockError::BadFrame {
                        from,
                        what: "clock sample reply",
                        why: format!("it answers sample {} in a frame for sample {seq}", r.seq),
                    })
                }
            })
        };
        self.lock().clock_reply = Some((seq, reply));
        self.changed.notify_all();
    }

    /// This node's local vCPUs are done, with `reason` (PowerOff when every probe succeeded).
    pub fn local_done(&self, reason: StopReason) {
        if self.is_master() {
            self.master_record_done(self.me, reason);
        } else {
            self.send(
                0,
                KIND_DONE,
                u64::from(reason.exit_code()),
                &reason_text(&reason),
            );
        }
    }

    fn master_record_done(&self, node: NodeId, reason: StopReason) {
        let stop = {
            let mut st = self.lock();
            if let Some(d) = st.done.get_mut(node_index(node)) {
                *d = true;
            }
            let all = st.done.iter().all(|&d| d);
            let stop = if reason != StopReason::PowerOff {
                Some(reason)
            } else {
                all.then_some(StopReason::PowerOff)
            };
            if stop.is_some() && st.stop_sent {
                None
            } else {
                if stop.is_some() {
                    st.stop_sent = true;
                }
                stop
            }
        };
        if let Some(reason) = stop {
            self.broadcast_stop(&reason);
            self.stop_platform(reason);
        }
    }

    /// Master: tells every peer to stop with `reason`.
    pub fn broadcast_stop(&self, reason: &StopReason) {
        self.stopping_cleanly.store(true, Ordering::SeqCst);
        let text = reason_text(reason);
        for peer in self.peers() {
            self.send(peer, KIND_STOP, u64::from(reason.exit_code()), &text);
        }
    }

    /// A control frame from `from`.
    pub fn on_frame(&self, from: NodeId, frame: FrameRef<'_>) {
        let text = String::from_utf8_lossy(frame.payload).into_owned();
        match frame.kind {
            KIND_START if from == 0 => {
                {
                    let mut st = self.lock();
                    st.start_clock = Some(MasterClock::decode(from, frame.payload));
                    st.started = true;
                }
                self.changed.notify_all();
            }
            KIND_CLOCK_PING if self.is_master() => self.answer_clock_ping(from, frame.arg),
            KIND_CLOCK_REPLY if from == 0 && !self.is_master() => self.on_clock_reply(from, frame),
            KIND_DONE if self.is_master() => self.master_record_done(from, reason_from_wire(frame.arg, &text)),
            KIND_STOP if from == 0 => {
                self.lock().stop_received = true;
                self.stopping_cleanly.store(true, Ordering::SeqCst);
                self.changed.notify_all();
                self.send(0, KIND_STOP_ACK, 0, "");
                self.stop_platform(reason_from_wire(frame.arg, &text));
            }
            KIND_STOP_ACK if self.is_master() => {
                if let Some(a) = self.lock().acked.get_mut(node_index(from)) {
                    *a = true;
                }
                self.changed.notify_all();
            }
            KIND_EXIT if from == 0 => {
                self.lock().exit_received = true;
                self.changed.notify_all();
            }
            other => eprintln!("spanvm: node {from} sent control frame kind {other}, which node {} does not expect; ignored", self.me),
        }
    }

    /// The transport lost `peer`: the guest cannot go on (its memory may hold the only copy of
    /// pages); every node stops.
    pub fn peer_lost(&self, peer: NodeId, why: &str) {
        {
            let mut st = self.lock();
            if let Some(l) = st.lost.get_mut(node_index(peer)) {
                *l = true;
            }
        }
        self.changed.notify_all();
        if !self.is_stopping_cleanly() {
            self.stop_platform(StopReason::PeerLost(format!("node {peer}: {why}")));
        }
    }

    /// Waits until `done(state)` holds or `limit` passes.
    fn wait_until(&self, limit: Duration, done: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        while !done(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Before this node closes its connections (see the module doc for the two phases).
    pub fn leave(&self, reason: &StopReason) {
        if matches!(reason, StopReason::PeerLost(_)) {
            // The guest is lost already; every survivor stops on its own, at once. Its own
            // connections stay open a moment longer, so that every other survivor sees the
            // lost node go (and names it) before it sees this one leave.
            self.stopping_cleanly.store(true, Ordering::SeqCst);
            std::thread::sleep(LOSS_GRACE);
            return;
        }
        if self.is_master() {
            let send_stop = {
                let mut st = self.lock();
                !std::mem::replace(&mut st.stop_sent, true)
            };
            if send_stop {
                self.broadcast_stop(reason);
            }
            self.stopping_cleanly.store(true, Ordering::SeqCst);
            self.wait_until(LEAVE_WAIT, |st| {
                self.peers()
                    .all(|p| st.acked[node_index(p)] || st.lost[node_index(p)])
            });
            for peer in self.peers() {
                self.send(peer, KIND_EXIT, 0, "");
            }
            self.wait_until(LEAVE_WAIT, |st| {
                self.peers().all(|p| st.lost[node_index(p)])
            });
        } else {
            let told_to_stop = self.lock().stop_received;
            if !told_to_stop {
                // Stopping on its own (Ctrl-C, an error): the master stops the rest.
                let reason = match reason {
                    StopReason::PowerOff => StopReason::Error(format!(
                        "node {} stopped before the guest finished",
                        self.me
                    )),
                    other => other.clone(),
                };
                self.send(
                    0,
                    KIND_DONE,
                    u64::from(reason.exit_code()),
                    &reason_text(&reason),
                );
            }
            self.wait_until(LEAVE_WAIT, |st| st.exit_received || st.lost[0]);
            self.stopping_cleanly.store(true, Ordering::SeqCst);
        }
    }
}

impl MasterLink for Control {
    /// One clock sample over the Control connection: CLOCK_PING to the master, wait for its
    /// CLOCK_REPLY with the same number.
    fn exchange(&self, seq: u64) -> Result<ClockReply, ClockError> {
        self.lock().clock_reply = None;
        self.send_bytes(0, KIND_CLOCK_PING, 0, seq, &[]);
        let deadline = Instant::now() + CLOCK_REPLY_WAIT;
        let mut st = self.lock();
        loop {
            if let Some((got, _)) = &st.clock_reply {
                if *got == seq {
                    let (_, reply) = st.clock_reply.take().expect("checked above");
                    return reply;
                }
            }
            if st.lost.first().copied().unwrap_or(false) {
                return Err(ClockError::MasterLost(
                    "the connection to node 0 broke".into(),
                ));
            }
            if self.is_stopping_cleanly() {
                return Err(ClockError::MasterLost("the cluster is stopping".into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClockError::NoReply {
                    seq,
                    waited: CLOCK_REPLY_WAIT,
                });
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clock::{BootId, ClockReading, MasterTsc};
    use std::sync::atomic::AtomicU8;
    use std::sync::Arc;

    /// Delivers frames synchronously to the other Controls; `mode` 1 corrupts clock replies,
    /// 2 drops clock pings.
    struct Wire {
        me: NodeId,
        peers: Mutex<Vec<Weak<Control>>>,
        mode: Arc<AtomicU8>,
    }

    impl Transport for Wire {
        fn me(&self) -> NodeId {
            self.me
        }
        fn peers(&self) -> Vec<NodeId> {
            vec![1 - self.me]
        }
        fn send_ref(
            &self,
            to: NodeId,
            _channel: Channel,
            frame: FrameRef<'_>,
        ) -> Result<(), transport::TransportError> {
            let mut payload = frame.payload.to_vec();
            match (self.mode.load(Ordering::SeqCst), frame.kind) {
                (1, KIND_CLOCK_REPLY) => payload[0] ^= 0xff,
                (2, KIND_CLOCK_PING) => return Ok(()),
                _ => {}
            }
            let peer = self.peers.lock().unwrap()[node_index(to)].upgrade();
            if let Some(peer) = peer {
                peer.on_frame(
                    self.me,
                    FrameRef {
                        payload: &payload,
                        ..frame
                    },
                );
            }
            Ok(())
        }
        fn stats(&self) -> transport::TransportStats {
            Default::default()
        }
        fn is_lost(&self, _peer: NodeId) -> bool {
            false
        }
        fn kind(&self) -> transport::TransportKind {
            transport::TransportKind::Tcp
        }
        fn shutdown(&self) {}
    }

    /// A master and a node wired together (the wires are kept alive with them).
    fn pair() -> (Arc<Control>, Arc<Control>, Arc<AtomicU8>, Vec<Arc<Wire>>) {
        let controls = [Arc::new(Control::new(0, 2)), Arc::new(Control::new(1, 2))];
        let mode = Arc::new(AtomicU8::new(0));
        let weak: Vec<Weak<Control>> = controls.iter().map(Arc::downgrade).collect();
        let wires: Vec<Arc<Wire>> = (0..2)
            .map(|me| {
                Arc::new(Wire {
                    me,
                    peers: Mutex::new(weak.clone()),
                    mode: mode.clone(),
                })
            })
            .collect();
        for (c, w) in controls.iter().zip(&wires) {
            c.set_mesh(Arc::downgrade(&(w.clone() as Arc<dyn Transport>)));
        }
        let [master, node] = controls;
        (master, node, mode, wires)
    }

    fn master_clock(clock_ns: u64) -> MasterClock {
        MasterClock {
            boot_id: BootId([7; 16]),
            reading: ClockReading {
                clock_ns,
                flags: clock::KVM_CLOCK_TSC_STABLE,
                realtime_ns: 0,
                host_tsc: 99,
            },
            tsc_khz: 1_000_000,
            tsc: MasterTsc::Fixed,
        }
    }

    #[test]
    fn start_carries_the_masters_clock() {
        let (master, node, _, _w) = pair();
        master.announce_start(&master_clock(123));
        let got = node.wait_for_start(Duration::from_secs(1));
        assert_eq!(got.unwrap().unwrap(), master_clock(123));
    }

    #[test]
    fn a_malformed_start_is_refused_with_the_reason() {
        let (_, node, _, _w) = pair();
        node.on_frame(
            0,
            transport::Frame {
                kind: KIND_START,
                ..Default::default()
            }
            .view(),
        );
        let e = node
            .wait_for_start(Duration::from_secs(1))
            .unwrap()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("node 0 sent a malformed START clock: 0 bytes instead of 64"),
            "{e}"
        );
        // START from another node than the master is not START.
        let (_, node, _, _w) = pair();
        node.on_frame(
            1,
            transport::Frame {
                kind: KIND_START,
                payload: master_clock(1).encode().to_vec(),
                ..Default::default()
            }
            .view(),
        );
        assert!(node.wait_for_start(Duration::from_millis(50)).is_none());
    }

    #[test]
    fn clock_samples_go_to_the_master_and_back() {
        let (master, node, mode, _w) = pair();
        // Before START the master has nothing to answer with, and says so.
        let e = node.exchange(1).unwrap_err();
        assert!(e.to_string().contains("before START"), "{e}");
        master.set_clock_responder(Box::new(|seq| {
            Ok(ClockReply {
                seq,
                reading: master_clock(seq * 10).reading,
                tsc: MasterTsc::Fixed,
            })
        }));
        let r = node.exchange(5).unwrap();
        assert_eq!((r.seq, r.reading.clock_ns), (5, 50));
        mode.store(1, Ordering::SeqCst);
        let e = node.exchange(6).unwrap_err();
        assert!(
            e.to_string()
                .contains("node 0 sent a malformed clock sample reply: bad magic"),
            "{e}"
        );
        mode.store(2, Ordering::SeqCst);
        let e = node.exchange(7).unwrap_err();
        assert!(matches!(e, ClockError::NoReply { seq: 7, .. }), "{e}");
    }

    #[test]
    fn a_lost_master_ends_a_sample_at_once() {
        let (_, node, mode, _w) = pair();
        mode.store(2, Ordering::SeqCst);
        node.peer_lost(0, "connection reset");
        let e = node.exchange(1).unwrap_err();
        assert!(matches!(e, ClockError::MasterLost(_)), "{e}");
    }
}

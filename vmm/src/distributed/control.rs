//! The control protocol on the Control connection: the master tells the others when the guest
//! image is in memory (START), every node tells the master when its local vCPUs are done (DONE),
//! and the master tells everyone to stop (STOP) once all are done or one failed. A node keeps
//! serving the DSM after its own vCPUs are done, until STOP: other nodes may still need its pages.
//!
//! Leaving is two-phase so that no node takes another's exit for a failure: every node answers
//! STOP with STOP_ACK once it treats disconnects as expected; only when all have answered does
//! the master send EXIT, and only then do nodes close their connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use transport::{Channel, Frame, FrameRef, NodeId, Transport};

use crate::platform::Platform;
use crate::stop::StopReason;

const KIND_START: u16 = 1;
const KIND_DONE: u16 = 2;
const KIND_STOP: u16 = 3;
const KIND_STOP_ACK: u16 = 4;
const KIND_EXIT: u16 = 5;
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
        130 => StopReason::Interrupted,
        _ => StopReason::Error(text.to_string()),
    }
}

fn reason_text(reason: &StopReason) -> String {
    match reason {
        StopReason::ProbeFailed { vcpu, status } => format!("{vcpu}:{status}"),
        StopReason::Reset(t) | StopReason::PeerLost(t) | StopReason::Error(t) => t.clone(),
        StopReason::PowerOff | StopReason::Interrupted => String::new(),
    }
}

#[derive(Default)]
struct State {
    started: bool,
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
    nodes: usize,
    state: Mutex<State>,
    changed: Condvar,
    mesh: Mutex<Option<Weak<dyn Transport>>>,
    platform: Mutex<Option<Weak<Platform>>>,
    stopping_cleanly: AtomicBool,
}

impl Control {
    /// Control for node `me` of `nodes`.
    pub fn new(me: NodeId, nodes: usize) -> Self {
        Self {
            me,
            nodes,
            state: Mutex::new(State {
                done: vec![false; nodes],
                acked: vec![false; nodes],
                lost: vec![false; nodes],
                ..Default::default()
            }),
            changed: Condvar::new(),
            mesh: Mutex::new(None),
            platform: Mutex::new(None),
            stopping_cleanly: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_mesh(&self, mesh: Weak<dyn Transport>) {
        *self.mesh.lock().unwrap_or_else(|p| p.into_inner()) = Some(mesh);
    }

    pub(crate) fn set_platform(&self, platform: Weak<Platform>) {
        *self.platform.lock().unwrap_or_else(|p| p.into_inner()) = Some(platform);
    }

    fn is_master(&self) -> bool {
        self.me == 0
    }

    fn send(&self, to: NodeId, kind: u16, arg: u64, text: &str) {
        let mesh = self
            .mesh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        if let Some(mesh) = mesh {
            let frame = FrameRef {
                kind,
                flags: 0,
                id: 0,
                arg,
                payload: text.as_bytes(),
            };
            // A failed send means that peer is gone; its loss is reported by the transport.
            let _ = mesh.send_ref(to, Channel::Control, frame);
        }
    }

    fn stop_platform(&self, reason: StopReason) {
        let platform = self
            .platform
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        if let Some(p) = platform {
            p.request_stop(reason);
        }
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

    /// Master: the guest is loaded; let every node start its vCPUs.
    pub fn announce_start(&self) {
        for peer in (0..self.nodes as NodeId).filter(|&p| p != self.me) {
            self.send(peer, KIND_START, 0, "");
        }
    }

    /// Others: waits for the master's START (or a stop, or the timeout).
    pub fn wait_for_start(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !st.started && !self.is_stopping_cleanly() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.started
    }

    /// This node's local vCPUs are done, with `reason` (PowerOff when every probe succeeded).
    pub fn local_done(&self, reason: StopReason) {
        if self.is_master() {
            self.master_record_done(self.me, reason);
        } else {
            self.send(
                0,
                KIND_DONE,
                reason.exit_code() as u64,
                &reason_text(&reason),
            );
        }
    }

    fn master_record_done(&self, node: NodeId, reason: StopReason) {
        let stop = {
            let mut st = self.lock();
            if let Some(d) = st.done.get_mut(node as usize) {
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
        for peer in (0..self.nodes as NodeId).filter(|&p| p != self.me) {
            self.send(peer, KIND_STOP, reason.exit_code() as u64, &text);
        }
    }

    /// A control frame from `from`.
    pub fn on_frame(&self, from: NodeId, frame: &Frame) {
        let text = String::from_utf8_lossy(&frame.payload).into_owned();
        match frame.kind {
            KIND_START if from == 0 => {
                self.lock().started = true;
                self.changed.notify_all();
            }
            KIND_DONE if self.is_master() => self.master_record_done(from, reason_from_wire(frame.arg, &text)),
            KIND_STOP if from == 0 => {
                self.lock().stop_received = true;
                self.stopping_cleanly.store(true, Ordering::SeqCst);
                self.changed.notify_all();
                self.send(0, KIND_STOP_ACK, 0, "");
                self.stop_platform(reason_from_wire(frame.arg, &text));
            }
            KIND_STOP_ACK if self.is_master() => {
                if let Some(a) = self.lock().acked.get_mut(from as usize) {
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
            if let Some(l) = st.lost.get_mut(peer as usize) {
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
            // The guest is lost already; every survivor stops on its own, at once.
            self.stopping_cleanly.store(true, Ordering::SeqCst);
            return;
        }
        let me = self.me as usize;
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
                (0..self.nodes).all(|i| i == me || st.acked[i] || st.lost[i])
            });
            for peer in (0..self.nodes as NodeId).filter(|&p| p != self.me) {
                self.send(peer, KIND_EXIT, 0, "");
            }
            self.wait_until(LEAVE_WAIT, |st| {
                (0..self.nodes).all(|i| i == me || st.lost[i])
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
                    reason.exit_code() as u64,
                    &reason_text(&reason),
                );
            }
            self.wait_until(LEAVE_WAIT, |st| st.exit_received || st.lost[0]);
            self.stopping_cleanly.store(true, Ordering::SeqCst);
        }
    }
}

//! Forwarding between the nodes of one guest: IPIs, device interrupts (IOAPIC pins, MSI), EOIs
//! of level-triggered interrupts, and port/MMIO accesses to the devices, which all live on the
//! master node.
//!
//! # Interrupts
//! Every interrupt message, wherever it is raised (an ICR write, the IOAPIC, an MSI), goes
//! through [`Forwarder::deliver`]. The sender resolves the destination set against its
//! replicas of every vCPU's APIC addressing state, decides lowest priority there (the same pure
//! function on every node, see [`devices::interrupt::destination_set`]), hands local targets to
//! [`LocalApics`] and sends **one** frame per node that holds remote targets, naming them.
//!
//! # Addressing replicas
//! The replicas are exact whenever a vCPU could be the target of a message that depends on
//! them: a change of a vCPU's APIC ID, LDR, DFR, enable or mode is announced to every node by
//! [`Forwarder::update_addressing`], which returns only when every peer has acknowledged it,
//! and the vCPU thread calls it before the vCPU runs guest code again. So when an AP enables
//! its APIC and tells the BSP through memory, the BSP's node already knows.
//!
//! # Port and MMIO accesses
//! A vCPU on a node other than the master calls [`Forwarder::forward_io`] for an access no
//! local device claims; it blocks until the master's reply (accesses of one vCPU are therefore
//! in order). The master runs forwarded accesses on one worker thread per peer node, never on
//! the transport's receiver thread, since a device access may fault on guest memory and wait
//! for another node.
//!
//! # Checks
//! Every frame is checked before it is acted on: its shape ([`wire`]), that the sender owns
//! the vCPU it speaks for, that targets are this node's vCPUs, that only the master receives
//! accesses and EOIs and only the master answers them. A bad frame is an error for the caller
//! to stop the guest with; nothing of it is applied.

pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use devices::interrupt::{destination_set, ApicAddressing, InterruptMessage};

pub use wire::{ForwardMessage, IoAccess, Space, WireError, WireFrame};

/// Identifier of a node (node 0 is the master).
pub use resources::NodeId;

/// How long a vCPU waits for the master's answer to an access, or for every peer's
/// acknowledgement of an addressing change, before the guest is stopped: a live peer answers
/// in microseconds; a lost one is reported by the transport well before this.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a waiting vCPU thread spins before it sleeps: an answer over loopback TCP takes
/// tens of microseconds, and being woken from sleep costs about as much again on a virtualised
/// host, so a short spin halves a forwarded access.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(60);

/// Errors of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A peer sent a frame that is malformed or not allowed: the peer is broken or hostile.
    #[error("node {from} sent a bad forwarding frame: {why}")]
    BadFrame {
        /// The sender.
        from: NodeId,
        /// What is wrong with it.
        why: String,
    },
    /// A frame could not be sent (the peer is lost).
    #[error("cannot send to node {to}: {why}")]
    Send {
        /// The peer.
        to: NodeId,
        /// The transport's reason.
        why: String,
    },
    /// The node is stopping or a peer was lost while a vCPU waited for an answer.
    #[error("forwarding stopped while vCPU {vcpu} waited for {what}")]
    Released {
        /// The waiting vCPU.
        vcpu: usize,
        /// What it waited for.
        what: &'static str,
    },
    /// No answer came within [`REPLY_TIMEOUT`].
    #[error("vCPU {vcpu} got no {what} from node {from} within {timeout:?}")]
    Timeout {
        /// The waiting vCPU.
        vcpu: usize,
        /// What it waited for.
        what: &'static str,
        /// The node that should have answered.
        from: NodeId,
        /// The limit.
        timeout: Duration,
    },
    /// The vCPU is not one of this node's.
    #[error("vCPU {vcpu} does not run on node {node}")]
    NotLocal {
        /// The vCPU.
        vcpu: usize,
        /// This node.
        node: NodeId,
    },
}

/// Where forwarding frames leave this node (the transport's Forward connection to a peer).
pub trait ForwardLink: Send + Sync {
    /// Sends one frame to `to`; an error means the peer is lost.
    fn send(&self, to: NodeId, frame: &WireFrame) -> Result<(), String>;
}

/// This node's local APICs.
pub trait LocalApics: Send + Sync {
    /// Hands `msg` to local vCPU `vcpu`'s APIC and makes the vCPU look at it.
    fn accept(&self, vcpu: usize, msg: &InterruptMessage);
}

/// The master's devices, as forwarded accesses reach them.
pub trait MasterDevices: Send + Sync {
    /// Carries out `access` for vCPU `vcpu` (a read fills `access.data`).
    fn access(&self, vcpu: usize, access: &mut IoAccess);
    /// A level-triggered `vector` was retired by some vCPU's EOI (the IOAPIC's remote IRR).
    fn end_of_interrupt(&self, vector: u8);
}

/// Who runs what.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// This node.
    pub me: NodeId,
    /// The node with the devices.
    pub master: NodeId,
    /// For every vCPU (by index), the node that runs it.
    pub vcpu_owner: Vec<NodeId>,
    /// Every vCPU's addressing state at power-on.
    pub initial: Vec<ApicAddressing>,
}

/// Counters a user reads to see what forwarding cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForwardStats {
    /// Interrupt frames sent to peers.
    pub interrupts_sent: u64,
    /// Interrupts delivered to local vCPUs that came from peers.
    pub interrupts_received: u64,
    /// Accesses this node's vCPUs forwarded to the master.
    pub io_forwarded: u64,
    /// Accesses the master carried out for peers.
    pub io_served: u64,
    /// Addressing changes announced.
    pub addressing_updates: u64,
    /// EOIs sent to the master.
    pub eois_sent: u64,
}

impl std::fmt::Display for ForwardStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "forwarding: interrupt frames sent {}, interrupts received {}, accesses forwarded {}, accesses served {}, addressing changes {}, EOIs sent {}",
            self.interrupts_sent,
            self.interrupts_received,
            self.io_forwarded,
            self.io_served,
            self.addressing_updates,
            self.eois_sent
        )
    }
}

/// Interrupts one vCPU exchanged with vCPUs of other nodes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VcpuInterrupts {
    /// Interrupts this vCPU raised (IPIs, INIT, SIPI, NMI) for vCPUs of other nodes, counted
    /// once per remote destination vCPU.
    pub sent: u64,
    /// Interrupts from other nodes (their vCPUs' IPIs, the master's devices) delivered to this
    /// vCPU.
    pub received: u64,
}

#[derive(Default)]
struct VcpuCounters {
    sent: AtomicU64,
    received: AtomicU64,
}

#[derive(Default)]
struct Counters {
    interrupts_sent: AtomicU64,
    interrupts_received: AtomicU64,
    io_forwarded: AtomicU64,
    io_served: AtomicU64,
    addressing_updates: AtomicU64,
    eois_sent: AtomicU64,
}

/// What one local vCPU waits for.
#[derive(Default)]
struct Waits {
    /// Per local vCPU: the outstanding access's sequence number and its answer once here.
    io: HashMap<usize, (u64, Option<Vec<u8>>)>,
    /// Per local vCPU: the outstanding addressing change and the peers yet to acknowledge it.
    addressing: HashMap<usize, (u64, Vec<NodeId>)>,
    /// Peers lost (nothing more will come from them).
    lost: Vec<NodeId>,
}

enum Job {
    Access {
        vcpu: usize,
        seq: u64,
        access: IoAccess,
    },
    Eoi(u8),
}

/// One node's forwarding (see the crate doc).
pub struct Forwarder {
    config: ForwardConfig,
    link: Arc<dyn ForwardLink>,
    replicas: RwLock<Vec<ApicAddressing>>,
    local: OnceLock<Arc<dyn LocalApics>>,
    devices: OnceLock<Arc<dyn MasterDevices>>,
    waits: Mutex<Waits>,
    answered: Condvar,
    released: AtomicBool,
    /// Bumped on every answer, so that a waiter can spin on it without the lock.
    answers: AtomicU64,
    next_seq: AtomicU64,
    workers: Mutex<HashMap<NodeId, mpsc::Sender<Job>>>,
    counters: Counters,
    /// Per vCPU (by index): its interrupts across nodes.
    vcpu_counters: Box<[VcpuCounters]>,
    /// Set (once) to what made a worker give up, for the caller's diagnostics.
    worker_error: OnceLock<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Forwarder {
    /// Forwarding for `config.me`, sending through `link`. Attach the local APICs (and on the
    /// master the devices) before frames can arrive.
    pub fn new(config: ForwardConfig, link: Arc<dyn ForwardLink>) -> Arc<Self> {
        let replicas = RwLock::new(config.initial.clone());
        let vcpu_counters = config
            .vcpu_owner
            .iter()
            .map(|_| VcpuCounters::default())
            .collect();
        Arc::new(Self {
            config,
            link,
            replicas,
            local: OnceLock::new(),
            devices: OnceLock::new(),
            waits: Mutex::new(Waits::default()),
            answered: Condvar::new(),
            released: AtomicBool::new(false),
            answers: AtomicU64::new(0),
            next_seq: AtomicU64::new(1),
            workers: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            vcpu_counters,
            worker_error: OnceLock::new(),
        })
    }

    /// Gives forwarding this node's APICs.
    pub fn attach_local(&self, local: Arc<dyn LocalApics>) {
        let _ = self.local.set(local);
    }

    /// Gives the master's forwarding its devices.
    pub fn attach_devices(&self, devices: Arc<dyn MasterDevices>) {
        let _ = self.devices.set(devices);
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.config.me
    }

    /// Whether this node holds the devices.
    pub fn is_master(&self) -> bool {
        self.config.me == self.config.master
    }

    /// Whether vCPU `vcpu` runs on this node.
    pub fn is_local(&self, vcpu: usize) -> bool {
        self.owner(vcpu) == Some(self.config.me)
    }

    fn owner(&self, vcpu: usize) -> Option<NodeId> {
        self.config.vcpu_owner.get(vcpu).copied()
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        let me = self.config.me;
        let mut nodes: Vec<NodeId> = self.config.vcpu_owner.clone();
        nodes.push(self.config.master);
        nodes.sort_unstable();
        nodes.dedup();
        nodes.into_iter().filter(move |&n| n != me)
    }

    /// The current replica of `vcpu`'s addressing.
    pub fn addressing(&self, vcpu: usize) -> Option<ApicAddressing> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(vcpu)
            .copied()
    }

    /// What forwarding did so far.
    pub fn stats(&self) -> ForwardStats {
        let c = &self.counters;
        ForwardStats {
            interrupts_sent: c.interrupts_sent.load(Ordering::Relaxed),
            interrupts_received: c.interrupts_received.load(Ordering::Relaxed),
            io_forwarded: c.io_forwarded.load(Ordering::Relaxed),
            io_served: c.io_served.load(Ordering::Relaxed),
            addressing_updates: c.addressing_updates.load(Ordering::Relaxed),
            eois_sent: c.eois_sent.load(Ordering::Relaxed),
        }
    }

    /// What every vCPU (by index) exchanged with other nodes so far; only local vCPUs count.
    pub fn vcpu_interrupts(&self) -> Vec<VcpuInterrupts> {
        self.vcpu_counters
            .iter()
            .map(|c| VcpuInterrupts {
                sent: c.sent.load(Ordering::Relaxed),
                received: c.received.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn send(&self, to: NodeId, msg: &ForwardMessage) -> Result<(), ForwardError> {
        self.link
            .send(to, &msg.encode())
            .map_err(|why| ForwardError::Send { to, why })
    }

    fn accept_local(&self, vcpu: usize, msg: &InterruptMessage) {
        if let Some(local) = self.local.get() {
            local.accept(vcpu, msg);
        }
    }

    /// Delivers `msg` (raised by vCPU `source`, or by a device when `None`) to every vCPU it
    /// addresses: local ones directly, remote ones with one frame per node.
    pub fn deliver(
        &self,
        msg: &InterruptMessage,
        source: Option<usize>,
    ) -> Result<(), ForwardError> {
        let targets = {
            let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
            destination_set(msg, source, &replicas)
        };
        let mut remote: Vec<(NodeId, Vec<usize>)> = Vec::new();
        for t in targets {
            match self.owner(t) {
                Some(n) if n == self.config.me => self.accept_local(t, msg),
                Some(n) => match remote.iter_mut().find(|(node, _)| *node == n) {
                    Some((_, list)) => list.push(t),
                    None => remote.push((n, vec![t])),
                },
                None => {}
            }
        }
        let mut first_error = None;
        for (node, targets) in remote {
            self.counters
                .interrupts_sent
                .fetch_add(1, Ordering::Relaxed);
            if let Some(c) = source.and_then(|s| self.vcpu_counters.get(s)) {
                c.sent.fetch_add(targets.len() as u64, Ordering::Relaxed);
            }
            let frame = ForwardMessage::Interrupt {
                source,
                msg: *msg,
                targets,
            };
            if let Err(e) = self.send(node, &frame) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Local vCPU `vcpu`'s addressing changed to `state`: updates every replica and returns
    /// once every peer has acknowledged (see the crate doc), or with an error if a peer is lost
    /// or the node stops meanwhile.
    pub fn update_addressing(
        &self,
        vcpu: usize,
        state: ApicAddressing,
    ) -> Result<(), ForwardError> {
        if !self.is_local(vcpu) {
            return Err(ForwardError::NotLocal {
                vcpu,
                node: self.config.me,
            });
        }
        {
            let mut replicas = self.replicas.write().unwrap_or_else(|p| p.into_inner());
            if replicas.get(vcpu) == Some(&state) {
                return Ok(());
            }
            replicas[vcpu] = state;
        }
        let peers: Vec<NodeId> = self.peers().collect();
        if peers.is_empty() {
            return Ok(());
        }
        self.counters
            .addressing_updates
            .fetch_add(1, Ordering::Relaxed);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.waits)
            .addressing
            .insert(vcpu, (seq, peers.clone()));
        let msg = ForwardMessage::Addressing { vcpu, seq, state };
        for &p in &peers {
            if let Err(e) = self.send(p, &msg) {
                lock(&self.waits).addressing.remove(&vcpu);
                return Err(e);
            }
        }
        let result = self.wait(
            vcpu,
            "acknowledgement of its APIC addressing",
            peers[0],
            |w| match w.addressing.get(&vcpu) {
                Some((_, left)) if left.iter().any(|p| !w.lost.contains(p)) => None,
                _ => Some(()),
            },
        );
        lock(&self.waits).addressing.remove(&vcpu);
        result
    }

    /// A local vCPU's access that no local device claims: carried out by the master's devices.
    /// Blocks until the answer is here; a read's bytes are in `access.data` on return.
    pub fn forward_io(&self, vcpu: usize, access: &mut IoAccess) -> Result<(), ForwardError> {
        if self.is_master() {
            let devices = self.devices.get().ok_or(ForwardError::Released {
                vcpu,
                what: "the devices to be attached",
            })?;
            devices.access(vcpu, access);
            return Ok(());
        }
        self.counters.io_forwarded.fetch_add(1, Ordering::Relaxed);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.waits).io.insert(vcpu, (seq, None));
        let master = self.config.master;
        if let Err(e) = self.send(
            master,
            &ForwardMessage::IoRequest {
                vcpu,
                seq,
                access: *access,
            },
        ) {
            lock(&self.waits).io.remove(&vcpu);
            return Err(e);
        }
        let result = self.wait(vcpu, "answer to a forwarded access", master, |w| {
            w.io.get(&vcpu).and_then(|(_, data)| data.clone())
        });
        lock(&self.waits).io.remove(&vcpu);
        let data = result?;
        if !access.write {
            let n = data.len().min(usize::from(access.len));
            access.data[..n].copy_from_slice(&data[..n]);
        }
        Ok(())
    }

    /// A local vCPU retired level-triggered `vector`: the master's IOAPIC must hear of it.
    pub fn end_of_interrupt(&self, vector: u8) -> Result<(), ForwardError> {
        if self.is_master() {
            if let Some(d) = self.devices.get() {
                d.end_of_interrupt(vector);
            }
            return Ok(());
        }
        self.counters.eois_sent.fetch_add(1, Ordering::Relaxed);
        self.send(self.config.master, &ForwardMessage::Eoi { vector })
    }

    /// Waits until `ready` yields, the forwarder is released, the peer `from` is lost, or the
    /// timeout passes.
    fn wait<T>(
        &self,
        vcpu: usize,
        what: &'static str,
        from: NodeId,
        ready: impl Fn(&Waits) -> Option<T>,
    ) -> Result<T, ForwardError> {
        let start = Instant::now();
        let deadline = start + REPLY_TIMEOUT;
        let mut w = lock(&self.waits);
        loop {
            if let Some(v) = ready(&w) {
                return Ok(v);
            }
            if start.elapsed() < SPIN_BEFORE_SLEEP && !self.released.load(Ordering::SeqCst) {
                let seen = self.answers.load(Ordering::Acquire);
                drop(w);
                while self.answers.load(Ordering::Acquire) == seen
                    && start.elapsed() < SPIN_BEFORE_SLEEP
                {
                    std::hint::spin_loop();
                }
                w = lock(&self.waits);
                continue;
            }
            if self.released.load(Ordering::SeqCst) || w.lost.contains(&from) {
                return Err(ForwardError::Released { vcpu, what });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ForwardError::Timeout {
                    vcpu,
                    what,
                    from,
                    timeout: REPLY_TIMEOUT,
                });
            }
            w = self
                .answered
                .wait_timeout(w, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The node is stopping: every waiting vCPU returns (with [`ForwardError::Released`]).
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        let _w = lock(&self.waits);
        self.answers.fetch_add(1, Ordering::Release);
        self.answered.notify_all();
    }

    /// `peer` is lost: waits on it end.
    pub fn peer_lost(&self, peer: NodeId) {
        let mut w = lock(&self.waits);
        if !w.lost.contains(&peer) {
            w.lost.push(peer);
        }
        self.answers.fetch_add(1, Ordering::Release);
        self.answered.notify_all();
    }

    /// What made a master worker give up, if anything did.
    pub fn worker_error(&self) -> Option<String> {
        self.worker_error.get().cloned()
    }

    fn bad(from: NodeId, why: impl Into<String>) -> ForwardError {
        ForwardError::BadFrame {
            from,
            why: why.into(),
        }
    }

    fn check_owned_by(&self, from: NodeId, vcpu: usize) -> Result<(), ForwardError> {
        match self.owner(vcpu) {
            Some(o) if o == from => Ok(()),
            Some(o) => Err(Self::bad(
                from,
                format!("it speaks for vCPU {vcpu}, which runs on node {o}"),
            )),
            None => Err(Self::bad(from, format!("vCPU {vcpu} does not exist"))),
        }
    }

    /// A frame from `from` on the Forward connection. Called on the transport's receiver
    /// thread: never blocks on another node. An error means the peer broke the protocol and
    /// nothing of the frame was applied.
    pub fn on_frame(self: &Arc<Self>, from: NodeId, frame: &WireFrame) -> Result<(), ForwardError> {
        let msg = ForwardMessage::decode(frame).map_err(|e| Self::bad(from, e.to_string()))?;
        if from == self.config.me || self.owner_count(from) == 0 && from != self.config.master {
            return Err(Self::bad(from, "it is not a peer of this guest"));
        }
        match msg {
            ForwardMessage::Interrupt {
                source,
                msg,
                targets,
            } => {
                if let Some(s) = source {
                    self.check_owned_by(from, s)?;
                }
                if let Some(&t) = targets.iter().find(|&&t| !self.is_local(t)) {
                    return Err(Self::bad(
                        from,
                        format!("it sent an interrupt for vCPU {t}, which does not run here"),
                    ));
                }
                for t in targets {
                    self.counters
                        .interrupts_received
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(c) = self.vcpu_counters.get(t) {
                        c.received.fetch_add(1, Ordering::Relaxed);
                    }
                    self.accept_local(t, &msg);
                }
                Ok(())
            }
            ForwardMessage::Addressing { vcpu, seq, state } => {
                self.check_owned_by(from, vcpu)?;
                if let Some(r) = self
                    .replicas
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(vcpu)
                {
                    *r = state;
                }
                self.send(from, &ForwardMessage::AddressingAck { vcpu, seq })
            }
            ForwardMessage::AddressingAck { vcpu, seq } => {
                if !self.is_local(vcpu) {
                    return Err(Self::bad(
                        from,
                        format!("acknowledgement for remote vCPU {vcpu}"),
                    ));
                }
                let mut w = lock(&self.waits);
                if let Some((pending, left)) = w.addressing.get_mut(&vcpu) {
                    if *pending == seq {
                        left.retain(|&p| p != from);
                    }
                }
                self.answers.fetch_add(1, Ordering::Release);
                self.answered.notify_all();
                Ok(())
            }
            ForwardMessage::IoRequest { vcpu, seq, access } => {
                if !self.is_master() {
                    return Err(Self::bad(
                        from,
                        "it sent a device access to a node that is not the master",
                    ));
                }
                self.check_owned_by(from, vcpu)?;
                self.queue(from, Job::Access { vcpu, seq, access });
                Ok(())
            }
            ForwardMessage::IoReply { vcpu, seq, data } => {
                if from != self.config.master {
                    return Err(Self::bad(from, "only the master answers device accesses"));
                }
                let mut w = lock(&self.waits);
                match w.io.get_mut(&vcpu) {
                    Some((pending, answer)) if *pending == seq && answer.is_none() => {
                        *answer = Some(data);
                    }
                    _ => {
                        return Err(Self::bad(
                            from,
                            format!(
                                "an answer for vCPU {vcpu} (access {seq}) that nobody waits for"
                            ),
                        ))
                    }
                }
                self.answers.fetch_add(1, Ordering::Release);
                self.answered.notify_all();
                Ok(())
            }
            ForwardMessage::Eoi { vector } => {
                if !self.is_master() {
                    return Err(Self::bad(
                        from,
                        "it sent an EOI to a node that is not the master",
                    ));
                }
                self.queue(from, Job::Eoi(vector));
                Ok(())
            }
        }
    }

    fn owner_count(&self, node: NodeId) -> usize {
        self.config
            .vcpu_owner
            .iter()
            .filter(|&&o| o == node)
            .count()
    }

    /// Master: hands a job to `from`'s worker (started on first use), keeping its order.
    fn queue(self: &Arc<Self>, from: NodeId, job: Job) {
        let mut workers = lock(&self.workers);
        let tx = workers.entry(from).or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let me = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name(format!("fwd-io-{from}"))
                .spawn(move || loop {
                    // A vCPU's accesses come in bursts: look again briefly before sleeping.
                    let idle_since = Instant::now();
                    let job = loop {
                        match rx.try_recv() {
                            Ok(job) => break Some(job),
                            Err(mpsc::TryRecvError::Disconnected) => break None,
                            Err(mpsc::TryRecvError::Empty)
                                if idle_since.elapsed() < SPIN_BEFORE_SLEEP =>
                            {
                                std::hint::spin_loop()
                            }
                            Err(mpsc::TryRecvError::Empty) => break rx.recv().ok(),
                        }
                    };
                    let (Some(job), Some(fwd)) = (job, me.upgrade()) else {
                        return;
                    };
                    fwd.run_job(from, job);
                });
            if let Err(e) = spawned {
                let _ = self
                    .worker_error
                    .set(format!("cannot start the worker for node {from}: {e}"));
            }
            tx
        });
        let _ = tx.send(job);
    }

    fn run_job(&self, from: NodeId, job: Job) {
        let Some(devices) = self.devices.get() else {
            return;
        };
        match job {
            Job::Access {
                vcpu,
                seq,
                mut access,
            } => {
                devices.access(vcpu, &mut access);
                self.counters.io_served.fetch_add(1, Ordering::Relaxed);
                let data = if access.write {
                    Vec::new()
                } else {
                    access.bytes().to_vec()
                };
                // A failed send means the peer is gone; the transport reports it.
                let _ = self.send(from, &ForwardMessage::IoReply { vcpu, seq, data });
            }
            Job::Eoi(vector) => devices.end_of_interrupt(vector),
        }
    }
}

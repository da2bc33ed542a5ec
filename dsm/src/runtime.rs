//! [`Dsm`]: one running node of the DSM.
//!
//! It owns a fault thread that reads local faults (userfaultfd) and turns them into requests, and
//! exposes [`Dsm::on_message`] for the transport's receiver threads. Both feed the same pure state
//! machines, split into shards by page number so that unrelated pages do not contend: per shard a
//! [`NodePages`] (this node's copies) and a [`HomeDirectory`] (the pages it is home of), each
//! behind its own mutex. No lock is held while a message is sent, and no two locks are ever held
//! together. Messages a node sends to itself (it is home, or data source, of a page it faults on)
//! are handled inline, in order, on the same thread.
//!
//! A lost peer is fatal: [`Dsm::fail`] stops the node, every access still waiting stays blocked
//! (no page is ever installed from nothing), and [`Dsm::pin`] returns an error.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use resources::ServicePriority;
use thiserror::Error;

use crate::directory::{DirectoryView, HomeDirectory};
use crate::memory::GuestPages;
use crate::node::{LocalOutcome, NodeError, NodePages, PageState, PinOutcome};
use crate::protocol::{
    Access, DsmMessage, FrameView, Outgoing, RequestIds, WireLimits, KIND_FETCH, KIND_GRANT,
    KIND_PAGE_DATA, KIND_REQUEST,
};
use crate::stats::{NodeStats, StatsSnapshot};
use crate::trace::{FaultTrace, Stage, TracedPages};
use crate::uffd::{FaultSource, PageFault};
use crate::{HomeFn, NodeId, MAX_NODES, PAGE_SHIFT};

/// Number of lock shards (pages are spread by their low bits).
const SHARDS: u64 = 64;

/// What a node needs to know to run the DSM.
#[derive(Clone)]
pub struct DsmConfig {
    /// This node.
    pub node: NodeId,
    /// Nodes in the cluster (at most [`MAX_NODES`]).
    pub node_count: NodeId,
    /// Pages of guest memory; page `p` is guest-physical address `p << 12` and host address
    /// `memory base + p * 4096`.
    pub page_count: u64,
    /// The home of each page (from the layout).
    pub home_of: HomeFn,
    /// How many of the most-faulted pages the statistics report.
    pub top_pages: usize,
    /// How the fault thread is scheduled (see [`ServicePriority`]).
    pub service_priority: ServicePriority,
}

/// Sends DSM messages to other nodes; the VMM implements it over the transport (bulk messages,
/// see [`DsmMessage::is_bulk`], on the bulk connection). Must not block on the receiving side of
/// this node's own traffic.
pub trait DsmLink: Send + Sync {
    /// Sends `msg` to node `to` (never this node). An error means the peer is lost.
    fn send(&self, to: NodeId, msg: &DsmMessage) -> Result<(), LinkError>;
}

/// A send failed: the peer is unreachable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("cannot send to node {peer}: {reason}")]
pub struct LinkError {
    /// The peer.
    pub peer: NodeId,
    /// Why.
    pub reason: String,
}

/// Errors of the running DSM.
#[derive(Debug, Error)]
pub enum DsmError {
    /// The configuration cannot work.
    #[error("invalid DSM configuration: {0}")]
    BadConfig(String),
    /// The node has failed (a peer was lost or the state became inconsistent) and stopped.
    #[error("the DSM of this node has stopped: {reason}")]
    Failed {
        /// Why it failed.
        reason: String,
    },
    /// A pinned range is not inside guest memory.
    #[error(
        "cannot pin guest range {gpa:#x}+{len:#x}: beyond the {page_count} pages of guest memory"
    )]
    RangeOutOfMemory {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
        /// Pages of guest memory.
        page_count: u64,
    },
    /// A pin was refused.
    #[error("cannot pin: {0}")]
    Pin(NodeError),
    /// A pin would break the pin order (see [`Dsm::pin`]) and could deadlock with another node.
    #[error("cannot pin page {page:#x}: this thread already holds a pin of page {held:#x}, and pins must be taken in increasing page order; drop that guard first, or pin both in one range")]
    PinOrder {
        /// The first page of the refused pin.
        page: u64,
        /// The highest page this thread holds pinned.
        held: u64,
    },
    /// The fault thread could not be started.
    #[error("cannot start the DSM fault thread: {0}")]
    Spawn(std::io::Error),
}

struct Shard {
    pages: Mutex<NodePages>,
    /// Signalled (with `pages` held) whenever a request of this shard completes or a
    /// revocation that waited for pins has run.
    completed: Condvar,
    directory: Mutex<HomeDirectory>,
}

struct Inner {
    me: NodeId,
    node_count: NodeId,
    page_count: u64,
    limits: WireLimits,
    home_of: HomeFn,
    shards: Box<[Shard]>,
    memory: Arc<dyn GuestPages>,
    faults: Arc<dyn FaultSource>,
    link: Arc<dyn DsmLink>,
    stats: Arc<NodeStats>,
    failure: Mutex<Option<Failure>>,
    failed: AtomicBool,
    stopping: AtomicBool,
    /// Told once when the node fails on its own (not when the VMM fails it).
    on_failure: OnceLock<FailureHook>,
    /// Timestamps of one page's fault path, for the benchmark's breakdown.
    trace: OnceLock<Arc<FaultTrace>>,
}

/// The first failure of a node.
struct Failure {
    reason: String,
    /// The peer whose broken link failed the node, if that was the cause.
    lost_link: Option<NodeId>,
}

/// What the VMM runs when the DSM fails on its own: the reason, and the peer whose link broke
/// when that is the cause (then it is a lost peer rather than a memory failure).
pub type FailureHook = Box<dyn Fn(&str, Option<NodeId>) + Send + Sync>;

/// Per-thread buffers of the message paths, reused so that handling a message allocates nothing
/// but page buffers.
#[derive(Default)]
struct Scratch {
    out: Vec<Outgoing>,
    queue: VecDeque<Outgoing>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// The page ranges of the [`PinGuard`]s this thread holds, for the pin order.
    static HELD_PINS: RefCell<Vec<Range<u64>>> = const { RefCell::new(Vec::new()) };
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state machines leave no half-done state behind a panic that matters more than stopping;
    // keep going so that `fail` can still run.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running DSM node (see the module doc).
pub struct Dsm {
    inner: Arc<Inner>,
    fault_thread: Mutex<Option<JoinHandle<()>>>,
}

impl Dsm {
    /// Starts the node over `memory` (whose faults it reads on its own thread), sending through
    /// `link`.
    pub fn start<P>(
        config: DsmConfig,
        memory: Arc<P>,
        link: Arc<dyn DsmLink>,
    ) -> Result<Dsm, DsmError>
    where
        P: GuestPages + FaultSource + 'static,
    {
        let DsmConfig {
            node,
            node_count,
            page_count,
            home_of,
            top_pages,
            service_priority,
        } = config;
        if node_count == 0 || node_count > MAX_NODES {
            return Err(DsmError::BadConfig(format!(
                "{node_count} nodes; the DSM supports 1 to {MAX_NODES}"
            )));
        }
        if node >= node_count {
            return Err(DsmError::BadConfig(format!(
                "node id {node} is not below the node count {node_count}"
            )));
        }
        if page_count == 0 || page_count != memory.page_count() {
            return Err(DsmError::BadConfig(format!(
                "the layout has {page_count} pages of guest memory but the mapping has {}",
                memory.page_count()
            )));
        }
        let stats = Arc::new(NodeStats::new(page_count, top_pages));
        // One key for all shards: their counters differ, so their ids do too.
        let ids = RequestIds::new();
        let shards = (0..SHARDS)
            .map(|offset| Shard {
                pages: Mutex::new(NodePages::new_shard(
                    node,
                    node_count,
                    page_count,
                    SHARDS,
                    offset,
                    home_of.clone(),
                    ids.clone(),
                    stats.clone(),
                )),
                completed: Condvar::new(),
                directory: Mutex::new(HomeDirectory::new(node, stats.clone())),
            })
            .collect();
        let inner = Arc::new(Inner {
            me: node,
            node_count,
            page_count,
            limits: WireLimits {
                page_count,
                node_count,
            },
            home_of,
            shards,
            memory: memory.clone(),
            faults: memory,
            link,
            stats,
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            on_failure: OnceLock::new(),
            trace: OnceLock::new(),
        });
        let thread_inner = inner.clone();
        let fault_thread = std::thread::Builder::new()
            .name(format!("dsm-faults-{node}"))
            .spawn(move || {
                service_priority.apply_to_current_thread(&format!("node {node}"));
                // A panic here would leave every fault unanswered: fail the node instead, so
                // that the VMM stops the cluster and says why.
                let run = std::panic::AssertUnwindSafe(|| thread_inner.fault_loop());
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".into());
                    thread_inner.fail(&format!("the fault thread panicked: {what}"));
                }
            })
            .map_err(DsmError::Spawn)?;
        Ok(Dsm {
            inner,
            fault_thread: Mutex::new(Some(fault_thread)),
        })
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.inner.me
    }

    /// The decoding limits of this cluster's frames.
    pub fn wire_limits(&self) -> WireLimits {
        self.inner.limits
    }

    /// A message from node `from`, already decoded (the transport's receiver threads call this).
    /// Invalid messages are logged, counted and dropped; after a failure everything is dropped.
    pub fn on_message(&self, from: NodeId, msg: DsmMessage) {
        self.inner.receive(from, msg);
    }

    /// A frame from node `from`: decoded and validated against the layout, then handled as by
    /// [`Dsm::on_message`]. A frame that fails validation is logged, counted and dropped.
    pub fn on_frame(&self, from: NodeId, frame: FrameView<'_>) {
        let Some(trace) = self.inner.trace.get() else {
            match DsmMessage::from_frame(frame, &self.inner.limits) {
                Ok(msg) => self.inner.receive(from, msg),
                Err(e) => self.inner.reject(from, &e),
            }
            return;
        };
        let page = frame.arg >> PAGE_SHIFT;
        let carries_page = frame.payload.len() >= crate::PAGE_SIZE;
        let arrived = match frame.kind {
            KIND_REQUEST => Some(Stage::HomeReceived),
            KIND_FETCH => Some(Stage::OwnerReceived),
            KIND_GRANT | KIND_PAGE_DATA if carries_page => Some(Stage::DataArrived),
            _ => None,
        };
        if let Some(stage) = arrived {
            trace.mark(page, stage);
        }
        match DsmMessage::from_frame(frame, &self.inner.limits) {
            Ok(msg) => {
                if carries_page {
                    trace.mark(page, Stage::DataDecoded);
                }
                self.inner.receive(from, msg);
            }
            Err(e) => self.inner.reject(from, &e),
        }
    }

    /// Records the fault path of the page armed in `trace` (see [`FaultTrace`]); for
    /// benchmarks. Set once; later calls are ignored.
    pub fn set_trace(&self, trace: Arc<FaultTrace>) {
        let _ = self.inner.trace.set(trace);
    }

    /// Makes the pages of guest range `gpa..gpa+len` present here in a state allowing `access`
    /// and keeps them so until the guard is dropped: downgrades and invalidations that would
    /// take the access away wait. Blocks while requests are in flight.
    ///
    /// The pin order: a thread takes pins in increasing page order only. A guard's pages are
    /// pinned in increasing order, and a thread that already holds guards may only pin pages
    /// above all of theirs ([`DsmError::PinOrder`] otherwise, in every build). A pin waits for
    /// remote requests while the lower pins stay held, and a held pin makes other nodes'
    /// requests for its page wait; with one order on every node, whoever waits for a page
    /// holds only lower ones, so no cycle of waits can form between nodes. For the same reason
    /// a thread holding pins touches only guest memory it has pinned: a fault on any other page
    /// is a wait outside the order. The guard stays on the thread that took it (it is not
    /// `Send`), where the order is kept.
    pub fn pin(&self, gpa: u64, len: u64, access: Access) -> Result<PinGuard, DsmError> {
        let inner = &self.inner;
        let out_of_memory = || DsmError::RangeOutOfMemory {
            gpa,
            len,
            page_count: inner.page_count,
        };
        let first = gpa >> PAGE_SHIFT;
        let end = if len == 0 {
            first
        } else {
            let last = gpa.checked_add(len - 1).ok_or_else(out_of_memory)? >> PAGE_SHIFT;
            if last >= inner.page_count {
                return Err(out_of_memory());
            }
            last + 1
        };
        if first < end {
            let held = HELD_PINS.with(|held| held.borrow().iter().map(|r| r.end - 1).max());
            if let Some(held) = held.filter(|&held| held >= first) {
                return Err(DsmError::PinOrder { page: first, held });
            }
        }
        let mut guard = PinGuard {
            inner: inner.clone(),
            pages: first..first,
            access,
            _on_this_thread: PhantomData,
        };
        for page in first..end {
            inner.pin_page(page, access)?;
            guard.pages.end = page + 1;
        }
        if first < end {
            HELD_PINS.with(|held| held.borrow_mut().push(first..end));
        }
        Ok(guard)
    }

    /// A copy of this node's statistics.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot(self.inner.me)
    }

    /// This node's local state of `page`.
    pub fn page_state(&self, page: u64) -> PageState {
        lock(&self.inner.shard(page).pages).state(page)
    }

    /// What this node's directory knows of `page` (meaningful where this node is its home).
    pub fn directory_view(&self, page: u64) -> DirectoryView {
        lock(&self.inner.shard(page).directory).view(page)
    }

    /// Why the node failed, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.failure).as_ref().map(|f| f.reason.clone())
    }

    /// Stops the node for good: a peer was lost or the VMM is stopping the guest after an error.
    /// Accesses waiting for pages stay blocked; the memory is frozen so that no teardown lets them
    /// through; pins fail from now on. The failure hook is not run: the caller knows already.
    pub fn fail(&self, reason: &str) {
        self.inner.fail_as(reason, false, None);
    }

    /// Runs `hook` with the reason when this node's DSM fails on its own (a failed kernel call on
    /// guest memory, a peer's frame that breaks the protocol's invariants, a lost link while
    /// sending, a panic of the fault thread); at once if it failed already.
    pub fn on_failure(&self, hook: FailureHook) {
        if self.inner.on_failure.set(hook).is_err() {
            return;
        }
        let failure = lock(&self.inner.failure)
            .as_ref()
            .map(|f| (f.reason.clone(), f.lost_link));
        if let (Some((reason, lost_link)), Some(hook)) = (failure, self.inner.on_failure.get()) {
            hook(&reason, lost_link);
        }
    }

    /// Stops the fault thread (normal exit; the vCPUs must be stopped first).
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.faults.interrupt();
        if let Some(thread) = lock(&self.fault_thread).take() {
            // A panic of the fault thread was already reported on stderr by the panic hook.
            let _ = thread.join();
        }
    }
}

impl Drop for Dsm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Pages pinned by [`Dsm::pin`]; dropping it unpins them. It stays on the thread that pinned
/// them, whose pin order it is part of.
pub struct PinGuard {
    inner: Arc<Inner>,
    pages: Range<u64>,
    access: Access,
    _on_this_thread: PhantomData<*const ()>,
}

impl PinGuard {
    /// The pinned pages.
    pub fn pages(&self) -> Range<u64> {
        self.pages.clone()
    }

    /// The access the pages are pinned for.
    pub fn access(&self) -> Access {
        self.access
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        for page in self.pages.clone() {
            self.inner.unpin_page(page, self.access);
        }
        // A guard whose pin failed part way was never recorded: nothing to remove then.
        HELD_PINS.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(i) = held.iter().position(|r| *r == self.pages) {
                held.swap_remove(i);
            }
        });
    }
}

impl Inner {
    fn shard(&self, page: u64) -> &Shard {
        &self.shards[(page % SHARDS) as usize]
    }

    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn log(&self, what: &str) {
        eprintln!("spanvm dsm (node {}): {what}", self.me);
    }

    fn reject(&self, from: NodeId, error: &dyn std::fmt::Display) {
        self.stats.record_rejected();
        self.log(&format!("rejected a message from node {from}: {error}"));
    }

    fn fail(&self, reason: &str) {
        self.fail_as(reason, true, None);
    }

    /// Records the first failure; `own` failures (not requested by the VMM) run the hook, with
    /// the peer whose link broke when that was the cause.
    fn fail_as(&self, reason: &str, own: bool, lost_link: Option<NodeId>) {
        let first = {
            let mut failure = lock(&self.failure);
            let first = failure.is_none();
            if first {
                *failure = Some(Failure {
                    reason: reason.to_owned(),
                    lost_link,
                });
                self.log(&format!(
                    "stopping: {reason}; accesses waiting for guest pages stay blocked"
                ));
            }
            first
        };
        self.failed.store(true, Ordering::SeqCst);
        self.memory.freeze();
        self.faults.interrupt();
        for shard in self.shards.iter() {
            let _pages = lock(&shard.pages);
            shard.completed.notify_all();
        }
        if first && own {
            if let Some(hook) = self.on_failure.get() {
                hook(reason, lost_link);
            }
        }
    }

    /// Reports a state-machine error: fatal ones stop the node, the others are a peer's fault.
    fn report(&self, from: NodeId, error: NodeError) {
        if error.is_fatal() {
            self.fail(&error.to_string());
        } else {
            self.reject(from, &error);
        }
    }

    fn fault_loop(&self) {
        let mut faults: Vec<PageFault> = Vec::with_capacity(64);
        let mut scratch = Scratch::default();
        while !self.stopping.load(Ordering::SeqCst) && !self.is_failed() {
            faults.clear();
            if let Err(e) = self.faults.wait_faults(&mut faults) {
                self.fail(&e.to_string());
                break;
            }
            for fault in faults.drain(..) {
                if self.is_failed() {
                    break;
                }
                self.handle_fault(fault, &mut scratch);
            }
        }
    }

    fn handle_fault(&self, fault: PageFault, scratch: &mut Scratch) {
        let PageFault { page, access } = fault;
        let trace = self.trace.get();
        if let Some(trace) = trace {
            trace.mark(page, Stage::FaultRead);
        }
        let result = {
            let mut pages = lock(&self.shard(page).pages);
            match pages.fault(page, access, Instant::now(), &mut scratch.out) {
                // The page was installed after the fault was raised: the install woke the thread
                // unless it faulted after it; waking again is harmless.
                Ok(LocalOutcome::Satisfied) => self.memory.wake(page).map_err(NodeError::from),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            // A fault outside the DSM's pages leaves its thread blocked: that is a VMM bug.
            self.report(self.me, e);
        }
        self.dispatch(scratch);
    }

    fn receive(&self, from: NodeId, msg: DsmMessage) {
        if self.is_failed() {
            return;
        }
        if from >= self.node_count {
            self.reject(
                from,
                &format!("node {from} is not in the cluster of {}", self.node_count),
            );
            return;
        }
        if from != self.me {
            self.stats.record_received(msg.page_len());
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => {
                self.handle(from, msg, &mut scratch.out);
                self.dispatch(&mut scratch);
            }
            // Re-entered through a link that delivers synchronously: use fresh buffers.
            Err(_) => {
                let mut scratch = Scratch::default();
                self.handle(from, msg, &mut scratch.out);
                self.dispatch(&mut scratch);
            }
        });
    }

    /// Handles one message; replies go to `out`.
    fn handle(&self, from: NodeId, msg: DsmMessage, out: &mut Vec<Outgoing>) {
        let page = msg.page();
        if page >= self.page_count {
            self.reject(
                from,
                &format!("{} names page {page:#x}, beyond guest memory", msg.name()),
            );
            return;
        }
        let home = (self.home_of)(page);
        if home >= self.node_count {
            self.fail(&format!(
                "the layout says node {home} is home of page {page:#x}, but the cluster has {} nodes",
                self.node_count
            ));
            return;
        }
        if let Err(e) = msg.check_route(from, self.me, home) {
            self.reject(from, &e);
            return;
        }
        let shard = self.shard(page);
        if msg.is_for_home() {
            let result = {
                let mut directory = lock(&shard.directory);
                match msg {
                    DsmMessage::Request { page, id, access } => {
                        directory.on_request(page, id, access, out)
                    }
                    DsmMessage::Confirm { page, id } => directory.on_confirm(page, id, out),
                    _ => Ok(()),
                }
            };
            match result {
                Err(e) if e.is_fatal() => self.fail(&e.to_string()),
                Err(e) => self.reject(from, &e),
                Ok(()) => {}
            }
        } else {
            let result = {
                let mut pages = lock(&shard.pages);
                let traced;
                let memory: &dyn GuestPages = match self.trace.get() {
                    Some(trace) => {
                        traced = TracedPages {
                            pages: &*self.memory,
                            trace,
                        };
                        &traced
                    }
                    None => &*self.memory,
                };
                let result = pages.on_message(from, msg, Instant::now(), memory, out);
                if let Ok(Some(_)) = result {
                    shard.completed.notify_all();
                }
                result
            };
            if let Err(e) = result {
                self.report(from, e);
            }
        }
    }

    /// Sends what the state machines produced, handling messages to this node inline, in order.
    fn dispatch(&self, scratch: &mut Scratch) {
        scratch.queue.extend(scratch.out.drain(..));
        while let Some(Outgoing { to, msg }) = scratch.queue.pop_front() {
            if self.is_failed() {
                scratch.queue.clear();
                return;
            }
            if to == self.me {
                self.handle(to, msg, &mut scratch.out);
                scratch.queue.extend(scratch.out.drain(..));
                continue;
            }
            self.stats.record_sent(msg.page_len());
            if let Err(e) = self.link.send(to, &msg) {
                self.fail_as(&format!("lost node {to}: {e}"), true, Some(to));
            }
        }
    }

    fn pin_page(&self, page: u64, access: Access) -> Result<(), DsmError> {
        let shard = self.shard(page);
        let mut scratch = Scratch::default();
        loop {
            if self.is_failed() {
                return Err(self.failed_error());
            }
            let outcome = {
                let mut pages = lock(&shard.pages);
                pages.try_pin(page, access, Instant::now(), &mut scratch.out)
            };
            match outcome {
                Ok(PinOutcome::Pinned) => {
                    self.dispatch(&mut scratch);
                    return Ok(());
                }
                Ok(PinOutcome::Waiting) => {
                    self.dispatch(&mut scratch);
                    let pages = lock(&shard.pages);
                    let _pages = shard
                        .completed
                        .wait_while(pages, |p| p.has_pending(page) && !self.is_failed())
                        .unwrap_or_else(|e| e.into_inner());
                }
                Ok(PinOutcome::Revoking) => {
                    self.dispatch(&mut scratch);
                    let pages = lock(&shard.pages);
                    let _pages = shard
                        .completed
                        .wait_while(pages, |p| p.has_deferred(page) && !self.is_failed())
                        .unwrap_or_else(|e| e.into_inner());
                }
                Err(e) => {
                    let fatal = e.is_fatal();
                    let message = e.to_string();
                    if fatal {
                        self.fail(&message);
                    }
                    return Err(DsmError::Pin(e));
                }
            }
        }
    }

    fn unpin_page(&self, page: u64, access: Access) {
        if self.is_failed() {
            return;
        }
        let mut scratch = Scratch::default();
        let shard = self.shard(page);
        let result = {
            let mut pages = lock(&shard.pages);
            let revoking = pages.has_deferred(page);
            let result = pages.unpin(page, access, &*self.memory, &mut scratch.out);
            if revoking && !pages.has_deferred(page) {
                // Pins that gave way to the revocation may try again.
                shard.completed.notify_all();
            }
            result
        };
        if let Err(e) = result {
            self.report(self.me, e);
        }
        self.dispatch(&mut scratch);
    }

    fn failed_error(&self) -> DsmError {
        DsmError::Failed {
            reason: lock(&self.failure)
                .as_ref()
                .map_or_else(|| "stopped".to_owned(), |f| f.reason.clone()),
        }
    }
}

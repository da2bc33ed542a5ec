//! A node that is one of several: the transport mesh to its peers, the DSM over its guest
//! memory, and the control protocol that starts and stops the guest on every node together.

pub mod control;
pub mod link;
pub mod shadow_zap;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use dsm::{Dsm, DsmConfig, UffdGuestPages};
use forward::Forwarder;
use resources::NodeConfig;
use transport::{Channel, FrameHandler, FrameRef, MeshConfig, NodeId, Transport};

use crate::memory::GuestMemory;
use crate::platform::Platform;
use crate::stop::StopReason;
use control::Control;
use link::MeshLink;
use shadow_zap::ShadowZap;

/// How long a node waits for its peers to come up (`SPANVM_CONNECT_TIMEOUT`, in seconds,
/// overrides it).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The connect timeout in force.
pub fn connect_timeout() -> Duration {
    std::env::var("SPANVM_CONNECT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(CONNECT_TIMEOUT)
}

/// How many most-faulted pages a node's DSM statistics list (`SPANVM_DSM_HOT_PAGES` overrides
/// it, up to [`MAX_HOT_PAGES`]).
pub const HOT_PAGES: usize = 8;
/// The most a node lists.
pub const MAX_HOT_PAGES: usize = 1024;

/// The number of most-faulted pages listed. `spanvm bench sysbench` asks for more: the lists
/// count since boot, and a page hot only during one workload enters them only if it beats the
/// last listed page.
pub fn hot_pages() -> usize {
    std::env::var("SPANVM_DSM_HOT_PAGES")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .map_or(HOT_PAGES, |n| n.min(MAX_HOT_PAGES))
}

/// Errors of joining the cluster.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// The cluster secret could not be read.
    #[error(transparent)]
    Secret(#[from] resources::ConfigError),
    /// A multi-node config without a secret (validation should have caught it).
    #[error("{0}: a cluster of several nodes needs `secret`")]
    NoSecret(String),
    /// The guest memory could not be put under userfaultfd.
    #[error("cannot put guest memory under userfaultfd: {0}")]
    Uffd(#[from] dsm::UffdError),
    /// The DSM could not start.
    #[error("cannot start the DSM: {0}")]
    Dsm(#[from] dsm::DsmError),
    /// The mesh could not be established.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
}

/// Forwarding frames that arrived before this node's forwarder was attached: a peer may
/// start sending (an INIT to one of our APs) while this node is still building its platform.
#[derive(Default)]
struct ForwardInbox {
    forwarder: Option<Arc<Forwarder>>,
    early: Vec<(NodeId, forward::WireFrame)>,
}

/// What receives frames from peers: DSM traffic to the DSM, control to the control protocol,
/// forwarding to the forwarder.
pub(crate) struct NodeHandler {
    pub(crate) dsm: OnceLock<Arc<Dsm>>,
    pub(crate) control: Arc<Control>,
    forward: Mutex<ForwardInbox>,
    /// Cleared when the node tears down: DSM frames are dropped from then on (see
    /// [`Distributed::shutdown`]).
    dsm_serving: AtomicBool,
}

impl NodeHandler {
    /// A handler for `control`; the DSM and the forwarder are attached later.
    pub(crate) fn new(control: Arc<Control>) -> Self {
        Self {
            dsm: OnceLock::new(),
            control,
            forward: Mutex::new(ForwardInbox::default()),
            dsm_serving: AtomicBool::new(true),
        }
    }

    fn on_forward(&self, from: NodeId, frame: forward::WireFrame) {
        let forwarder = {
            let mut inbox = self.forward.lock().unwrap_or_else(|p| p.into_inner());
            match &inbox.forwarder {
                Some(f) => f.clone(),
                None => {
                    inbox.early.push((from, frame));
                    return;
                }
            }
        };
        self.forward_to(&forwarder, from, &frame);
    }

    fn forward_to(&self, forwarder: &Arc<Forwarder>, from: NodeId, frame: &forward::WireFrame) {
        if let Err(e) = forwarder.on_frame(from, frame) {
            // A peer that breaks the forwarding protocol cannot be trusted with the guest.
            eprintln!("spanvm: {e}");
            self.control.fail(StopReason::Error(e.to_string()));
        }
    }

    /// Hands forwarding frames to `forwarder` from now on, the early ones first.
    fn attach_forwarder(&self, forwarder: Arc<Forwarder>) {
        let mut inbox = self.forward.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock, so that no frame overtakes the early ones.
        for (from, frame) in std::mem::take(&mut inbox.early) {
            self.forward_to(&forwarder, from, &frame);
        }
        inbox.forwarder = Some(forwarder);
    }

    fn forwarder(&self) -> Option<Arc<Forwarder>> {
        self.forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forwarder
            .clone()
    }
}

/// Forwarding frames out on the Forward connection. Weak, for the reason `MeshLink` is: the
/// platform holds the forwarder, and a strong reference would keep the mesh, its handler and
/// the DSM alive as long as the platform.
struct MeshForwardLink(Weak<dyn Transport>);

impl forward::ForwardLink for MeshForwardLink {
    fn send(&self, to: forward::NodeId, frame: &forward::WireFrame) -> Result<(), String> {
        let mesh = self
            .0
            .upgrade()
            .ok_or_else(|| "the mesh is shut down (the node is stopping)".to_string())?;
        mesh.send_ref(
            to,
            Channel::Forward,
            FrameRef {
                kind: frame.kind,
                flags: frame.flags,
                id: frame.id,
                arg: frame.arg,
                payload: &frame.payload,
            },
        )
        .map_err(|e| e.to_string())
    }
}

impl FrameHandler for NodeHandler {
    fn on_frame(&self, from: NodeId, channel: Channel, frame: FrameRef<'_>) {
        match channel {
            Channel::DsmRequest | Channel::DsmBulk => {
                if !self.dsm_serving.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(dsm) = self.dsm.get() {
                    dsm.on_frame(
                        from,
                        dsm::FrameView {
                            kind: frame.kind,
                            flags: frame.flags,
                            id: frame.id,
                            arg: frame.arg,
                            payload: frame.payload,
                        },
                    );
                }
            }
            Channel::Control => self.control.on_frame(from, frame),
            Channel::Forward => self.on_forward(
                from,
                forward::WireFrame {
                    kind: frame.kind,
                    flags: frame.flags,
                    id: frame.id,
                    arg: frame.arg,
                    // Kept past this call when it arrives before the forwarder is attached;
                    // forwarding payloads are a few bytes.
                    payload: frame.payload.to_vec(),
                },
            ),
        }
    }

    fn on_peer_lost(&self, peer: NodeId, why: &str) {
        let clean = self.control.is_stopping_cleanly();
        // The stop reason first: when one node dies, the others die of it moments later, and
        // the first loss seen (the real cause) is the one to report.
        self.control.peer_lost(peer, why);
        if !clean {
            // Pending faults stay blocked for good: a page is never made up from nothing.
            if let Some(dsm) = self.dsm.get() {
                dsm.fail(&format!("node {peer} lost"));
            }
        }
        // A vCPU waiting for that peer's answer comes back (the stop is requested already).
        if let Some(f) = self.forwarder() {
            f.peer_lost(peer);
        }
    }
}

/// The distributed side of a node.
pub struct Distributed {
    /// The DSM over this node's guest memory.
    pub dsm: Arc<Dsm>,
    /// The mesh to the peers.
    pub mesh: Arc<dyn Transport>,
    /// Start/finish/stop coordination.
    pub control: Arc<Control>,
    handler: Arc<NodeHandler>,
    pages: Arc<ShadowZap<UffdGuestPages>>,
}

impl Distributed {
    /// Puts `memory` under the DSM and connects to every peer (blocks until the full mesh is up
    /// and every peer has proven the secret and agreed on the layout).
    pub fn join(config: &NodeConfig, memory: &GuestMemory) -> Result<Self, DistributedError> {
        let layout = &config.layout;
        let secret = config
            .read_secret()?
            .ok_or_else(|| DistributedError::NoSecret(config.path.display().to_string()))?;
        // ShadowZap: on kvm_pvm, dropping a page-table page clears KVM's shadow translations.
        // SAFETY: the mapping belongs to `memory`, which is handed the registration below and
        // unmaps the range only when it holds the last reference to it (`GuestMemory`'s drop),
        // so the range stays mapped for the life of the registration; nothing else registers it
        // with a userfaultfd, and nothing but the DSM populates or drops its pages (the loader
        // writes through the mapping, which faults like a guest access).
        let mut pages = ShadowZap::for_this_host(unsafe {
            UffdGuestPages::register(memory.host_base(), crate::convert::usize_from(memory.len()))?
        });
        // Fault injection for the tests of a failing DSM (tests/dsm_failure.rs).
        if let Some(n) = std::env::var("SPANVM_TEST_FAIL_INSTALL_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            pages = pages.fail_install_after(n);
        }
        if let Ok(v) = std::env::var("SPANVM_TEST_ZERO_PAGE_AFTER") {
            match v.parse() {
                Ok(n) => pages = pages.zero_received_pages_after(n),
                Err(_) => eprintln!(
                    "spanvm: ignoring SPANVM_TEST_ZERO_PAGE_AFTER={v:?}: not a count of pages"
                ),
            }
        }
        let pages = Arc::new(pages);
        // The userfaultfd is closed only after the mapping is gone (see `crate::memory`).
        memory.keep_registration(pages.clone());
        let link = Arc::new(MeshLink::default());
        let home_layout = layout.clone();
        let dsm = Arc::new(Dsm::start(
            DsmConfig {
                node: config.node,
                node_count: layout.node_count(),
                page_count: layout.page_count(),
                home_of: Arc::new(move |page| home_layout.home_of(page << 12).unwrap_or(0)),
                top_pages: hot_pages(),
                service_priority: config.service_priority,
            },
            pages.clone(),
            link.clone(),
        )?);
        let control = Arc::new(Control::new(config.node, layout.node_count()));
        {
            // A DSM that fails on its own stops this node's guest; leaving then tells the
            // master, which stops every other node with the same reason.
            let control = Arc::downgrade(&control);
            let me = config.node;
            dsm.on_failure(Box::new(move |why, lost| {
                let Some(control) = control.upgrade() else {
                    return;
                };
                match lost {
                    // The transport reports the loss too; whichever comes first names it.
                    Some(peer) => control.peer_lost(peer, why),
                    None => {
                        eprintln!("spanvm: node {me}: the distributed memory failed: {why}");
                        control.fail(StopReason::MemoryFailed(format!("node {me}: {why}")));
                    }
                }
            }));
        }
        let handler = Arc::new(NodeHandler::new(control.clone()));
        let _ = handler.dsm.set(dsm.clone());
        let me = config.local();
        let mesh_config = MeshConfig {
            me: config.node,
            listen: me.address,
            peers: layout
                .nodes
                .iter()
                .filter(|n| n.id != config.node)
                .map(|n| (n.id, n.address))
                .collect(),
            secret,
            layout_canonical: layout.canonical(),
            connect_timeout: connect_timeout(),
            busy_poll: false,
            service_priority: config.service_priority,
            liveness: Default::default(),
            socket_buffer: test_socket_buffer(),
        };
        let mesh = transport::establish(layout.transport, mesh_config, handler.clone())?;
        link.set(&mesh);
        control.set_mesh(Arc::downgrade(&mesh));
        Ok(Self {
            dsm,
            mesh,
            control,
            handler,
            pages,
        })
    }

    /// The shadow zap over this node's guest memory, where the host needs it (`kvm_pvm`).
    pub fn shadow_zap(&self) -> Option<Arc<ShadowZap<UffdGuestPages>>> {
        self.pages.is_enabled().then(|| self.pages.clone())
    }

    /// Forwarding's way out to the peers.
    pub fn forward_link(&self) -> Arc<dyn forward::ForwardLink> {
        Arc::new(MeshForwardLink(Arc::downgrade(&self.mesh)))
    }

    /// Starts handing forwarding frames to `forwarder`.
    pub fn attach_forwarder(&self, forwarder: Arc<Forwarder>) {
        self.handler.attach_forwarder(forwarder);
    }

    /// Hooks the control protocol to the platform (stops requested by peers reach it).
    pub fn attach(&self, platform: &Arc<Platform>) {
        self.control.set_platform(Arc::downgrade(platform));
    }

    /// Says goodbye after the guest stopped: the master waits (briefly) for the others to go
    /// first, so that nobody mistakes the master's exit for a lost peer. The mesh and the DSM
    /// keep running until [`Distributed::shutdown`].
    pub fn leave(&self, reason: &StopReason) {
        self.control.leave(reason);
    }

    /// Stops the DSM, then the transport. Call it once every local vCPU thread is joined or
    /// given up on (`NodeVm`'s teardown), and before guest memory may be unmapped: when it
    /// returns no thread of the DSM or of the transport touches guest memory any more.
    ///
    /// A fault still pending (a vCPU given up on) stays pending: the DSM stops without
    /// answering it and nothing here closes the userfaultfd, so the faulting thread stays
    /// blocked and never sees a page the DSM did not install.
    pub fn shutdown(&self) {
        // First the DSM stops serving: frames from peers are dropped, and its fault thread is
        // joined. Frames already being handled on a receiver thread may still install pages;
        // guest memory is mapped throughout, so that is harmless.
        self.handler.dsm_serving.store(false, Ordering::SeqCst);
        self.dsm.shutdown();
        // Then the transport: this joins the receiver threads, so that no frame handler, the
        // DSM's included, is still running when it returns. After `leave`, peers no longer
        // take our going for a loss (or are lost already).
        self.mesh.shutdown();
    }
}

/// Socket buffer sizes forced by a test (`SPANVM_TEST_SOCKET_BUFFER`, bytes) to make every
/// large frame a partial write; the kernel's autotuning otherwise.
fn test_socket_buffer() -> Option<usize> {
    let bytes = std::env::var("SPANVM_TEST_SOCKET_BUFFER").ok()?;
    match bytes.parse() {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            eprintln!("spanvm: ignoring SPANVM_TEST_SOCKET_BUFFER={bytes:?}: not a byte count");
            None
        }
    }
}

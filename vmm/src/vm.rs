//! One node's VM: KVM, guest memory, the platform, the guest image, and the threads that run
//! the local vCPUs, until something stops it.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::interrupt::ApicAddressing;
use forward::{ForwardConfig, Forwarder};
use kvm_ioctls::VcpuFd;
use resources::{GuestImage, NodeConfig, NodeId};

use crate::boot;
use crate::distributed::control::Control;
use crate::distributed::{connect_timeout, Distributed, DistributedError};
use crate::hypervisor::{Hypervisor, HypervisorError, KvmVm};
use crate::memory::{GuestMemory, MemoryError};
use crate::platform::{Platform, PlatformError};
use crate::probe::loader::{self, LoaderError};
use crate::stop::{Stop, StopReason};
use crate::vcpu::exit_loop::{Activity, SipiSetup, VcpuLoop};
use crate::vcpu::pvm_repair::PvmRepair;
use crate::vcpu::timer::run_timer;

/// Errors of bringing a node's VM up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM could not be opened or set up.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The virtio devices could not be set up.
    #[error("cannot set up the guest's virtio devices: {0}")]
    Virtio(#[from] crate::virtio::VirtioSetupError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The platform could not be built.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The probe could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The config names a probe that does not exist.
    #[error("there is no probe guest called `{name}`; the built-in probes are: {known}")]
    UnknownProbe {
        /// The name the config gives.
        name: String,
        /// The built-in probes' names, comma-separated.
        known: String,
    },
    /// The Linux guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// Joining the cluster failed.
    #[error(transparent)]
    Distributed(#[from] DistributedError),
    /// The master never said the guest is loaded.
    #[error("the master (node 0) did not start the guest within {0:?}")]
    NoStart(std::time::Duration),
    /// This node's clock could not be set from the master's.
    #[error("cannot synchronise this node's clock with the master's: {0}")]
    Clock(#[from] clock::ClockError),
    /// The guest was stopped while this node loaded it or waited for START (a peer was lost,
    /// a node's memory failed); the reason carries the exit code.
    #[error("stopped before the guest started: {0}")]
    Stopped(StopReason),
    /// Only a single-node VM that has not run can be taken apart for a raw vCPU loop.
    #[error("only a single-node VM that has not run can be taken apart for a raw vCPU loop")]
    TakenApart,
}

/// A built VM taken apart (see [`NodeVm::into_parts`]). The fields are declared in the order
/// they must go (a plain struct has no other teardown): the vCPU fds and the VM fd hold the
/// KVM memory slots, so they close before the guest memory they point into may be unmapped.
pub struct RawParts {
    /// Local vCPUs, set up to enter the guest.
    pub vcpus: Vec<(usize, VcpuFd)>,
    /// The KVM VM (keeps the vCPUs' VM alive).
    pub vm: KvmVm,
    /// The platform.
    pub platform: Arc<Platform>,
    /// Their TSC frequency.
    pub tsc_khz: u32,
    /// Guest memory.
    pub memory: Arc<GuestMemory>,
}

/// A node's VM, built and ready to run.
///
/// Its teardown is explicit ([`NodeVm::teardown`], run by `Drop`), not left to field order:
/// see there for the order and why.
pub struct NodeVm {
    /// `None` once taken apart or torn down.
    vm: Option<KvmVm>,
    /// `None` once taken apart or torn down.
    memory: Option<Arc<GuestMemory>>,
    distributed: Option<Distributed>,
    /// What a SIPI does (Linux guests); with it, every vCPU but the BSP starts waiting for one.
    on_sipi: Option<SipiSetup>,
    /// The kvm_pvm instruction repair, on such a host only.
    pvm_repair: Option<Arc<PvmRepair>>,
    platform: Arc<Platform>,
    fds: Vec<(usize, VcpuFd)>,
    tsc_khz: u32,
    /// The threads of [`NodeVm::run`], until they are joined.
    vcpu_threads: Vec<JoinHandle<()>>,
    timer_threads: Vec<JoinHandle<()>>,
    /// The master's virtio devices (their threads stop with the vCPUs); `None` elsewhere.
    virtio: Option<crate::virtio::VirtioDevices>,
}

impl NodeVm {
    /// Builds the VM of `config`'s node and loads its guest.
    pub fn build(config: &NodeConfig) -> Result<Self, VmError> {
        let layout = &config.layout;
        let hv = Hypervisor::open()?;
        let vm = hv.create_vm()?;
        let memory = Arc::new(GuestMemory::new(layout)?);
        // Several nodes: the memory goes under the DSM before anything touches it.
        let distributed = if layout.node_count() > 1 {
            match Distributed::join(config, &memory) {
                Ok(distributed) => Some(distributed),
                // A peer that was there and went away is a lost peer in every phase of a
                // node's life, setup included: the same exit code as mid-run.
                Err(DistributedError::Transport(e)) if e.lost_peer().is_some() => {
                    let peer = e.lost_peer().unwrap_or_default();
                    return Err(VmError::Stopped(StopReason::PeerLost(format!(
                        "node {peer} while the mesh was being set up: {e}"
                    ))));
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        memory.register(&vm)?;
        let local: Vec<usize> = config.local().vcpus.iter().map(|&v| v as usize).collect();
        let mut fds = Vec::new();
        for i in 0..layout.vcpu_count {
            let fd = vm.create_vcpu(i)?;
            if local.contains(&(i as usize)) {
                fds.push((i as usize, fd));
            }
        }
        let tsc_khz = match fds.first() {
            Some((_, fd)) => fd.get_tsc_khz().map_err(|source| HypervisorError::Ioctl {
                what: "KVM_GET_TSC_KHZ",
                source,
            })?,
            None => 1_000_000,
        };
        let stop = Arc::new(Stop::default());
        let forwarder = Forwarder::new(
            forward_config(config),
            match &distributed {
                Some(d) => d.forward_link(),
                None => Arc::new(NoPeers),
            },
        );
        let is_master = config.node == layout.master();
        let platform = Platform::new(
            layout.vcpu_count as usize,
            &local,
            tsc_khz,
            stop,
            is_master,
            matches!(layout.guest, GuestImage::Probe { .. }),
            forwarder.clone(),
        )?;
        // The devices are the master's; the others forward every access to them.
        let virtio = if is_master {
            Some(crate::virtio::attach_virtio_devices(
                layout,
                &platform,
                &memory,
                distributed.as_ref().map(|d| d.dsm.clone()),
            )?)
        } else {
            None
        };
        if let Some(d) = &distributed {
            d.attach_forwarder(forwarder);
            d.attach(&platform);
            let control = d.control.clone();
            platform.on_local_finish(Box::new(move |reason| control.local_done(reason)));
        }

        // Loading and the clock wait on peers: a stop requested meanwhile (a lost peer, a failed
        // DSM) is what ended them, whatever error they return.
        let prepared = Self::prepare_guest(config, &vm, &memory, &fds, &distributed, tsc_khz);
        let on_sipi = match (prepared, platform.stop().reason()) {
            (Ok(on_sipi), _) => on_sipi,
            (Err(_), Some(reason)) => return Err(VmError::Stopped(reason)),
            (Err(e), None) => return Err(e),
        };
        Ok(Self {
            vm: Some(vm),
            memory: Some(memory),
            distributed,
            on_sipi,
            pvm_repair: Hypervisor::is_pvm_host().then(|| Arc::new(PvmRepair::new())),
            platform,
            fds,
            tsc_khz,
            vcpu_threads: Vec::new(),
            timer_threads: Vec::new(),
            virtio,
        })
    }

    /// Loads the guest (the master) and sets this node's clock from the master's (the others).
    fn prepare_guest(
        config: &NodeConfig,
        vm: &KvmVm,
        memory: &GuestMemory,
        fds: &[(usize, VcpuFd)],
        distributed: &Option<Distributed>,
        tsc_khz: u32,
    ) -> Result<Option<SipiSetup>, VmError> {
        let layout = &config.layout;
        let mut on_sipi: Option<SipiSetup> = None;
        match &layout.guest {
            GuestImage::Probe { name, arg } => {
                let img = crate::probe::image(name).ok_or_else(|| VmError::UnknownProbe {
                    name: name.clone(),
                    known: crate::probe::names().collect::<Vec<_>>().join(", "),
                })?;
                let entry = if config.node == layout.master() {
                    loader::load(name, img, layout, memory)?
                } else {
                    loader::parse_image(name, img)?.0
                };
                for (i, fd) in fds {
                    loader::setup_vcpu(fd, *i, entry, layout, config.node, tsc_khz, *arg)?;
                }
            }
            GuestImage::Linux {
                kernel,
                initrd,
                cmdline,
                ..
            } => {
                if config.node == layout.master() {
                    let cmdline = linux_cmdline(cmdline, layout.node_count(), layout.vcpu_count);
                    let virtio: Vec<_> = crate::virtio::placed_devices(&layout.guest)
                        .iter()
                        .map(crate::virtio::PlacedDevice::acpi)
                        .collect();
                    boot::write_acpi(memory, layout, &virtio)?;
                    let linux =
                        boot::load_linux(memory, layout, kernel, initrd.as_deref(), &cmdline)?;
                    if let Some((_, bsp)) = fds.iter().find(|(i, _)| *i == 0) {
                        boot::setup_bsp(bsp, &linux)?;
                        boot::set_boot_msrs(bsp)?;
                    }
                }
                // Every other vCPU waits for the guest's INIT/SIPI, as on real hardware.
                on_sipi = Some(Arc::new(|fd: &VcpuFd, vector: u8| {
                    boot::setup_ap_for_sipi(fd, vector).map_err(|e| e.to_string())
                }));
            }
        }
        // --- Clock synchronisation (the `clock` crate; see `sync_clock`): the master's clock
        // goes out in START, and every other node sets its own from it before returning, that
        // is before any local vCPU runs.
        if let Some(d) = distributed {
            sync_clock(config, vm, &d.control, tsc_khz)?;
        }
        // --- End of clock synchronisation.
        Ok(on_sipi)
    }

    fn start_activity(&self, index: usize) -> Activity {
        if self.on_sipi.is_some() && index != 0 {
            Activity::WaitForSipi
        } else {
            Activity::Running
        }
    }

    /// The TSC frequency the vCPUs run at.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The platform (to request a stop from outside, e.g. on Ctrl-C).
    pub fn platform(&self) -> &Arc<Platform> {
        &self.platform
    }

    /// Takes the VM apart for a benchmark that drives the vCPUs with its own loop.
    pub fn into_parts(mut self) -> Result<RawParts, VmError> {
        // A raw loop has no DSM (nor its teardown) and cannot run vCPUs twice.
        if self.distributed.is_some() || self.memory.is_none() || self.fds.is_empty() {
            return Err(VmError::TakenApart);
        }
        let (Some(vm), Some(memory)) = (self.vm.take(), self.memory.take()) else {
            return Err(VmError::TakenApart);
        };
        Ok(RawParts {
            vcpus: std::mem::take(&mut self.fds),
            vm,
            platform: self.platform.clone(),
            tsc_khz: self.tsc_khz,
            memory,
        })
    }

    /// What the kvm_pvm repair did so far (`None` on other hosts).
    pub fn pvm_repair_stats(&self) -> Option<crate::vcpu::pvm_repair::RepairStats> {
        self.pvm_repair.as_ref().map(|r| r.stats())
    }

    /// The shadow zap of a multi-node guest on a host that needs it (`kvm_pvm`).
    pub fn shadow_zap(
        &self,
    ) -> Option<Arc<crate::distributed::shadow_zap::ShadowZap<dsm::UffdGuestPages>>> {
        self.distributed.as_ref().and_then(|d| d.shadow_zap())
    }

    /// The mesh to the peers of a multi-node guest (for its statistics).
    pub fn mesh(&self) -> Option<Arc<dyn transport::Transport>> {
        self.distributed.as_ref().map(|d| d.mesh.clone())
    }

    /// The DSM of a multi-node guest.
    pub fn dsm(&self) -> Option<Arc<dsm::Dsm>> {
        self.distributed.as_ref().map(|d| d.dsm.clone())
    }

    /// Runs every local vCPU until the node stops; returns why it stopped. The vCPU threads are
    /// stopped and joined (or given up on) before it returns; the rest of the teardown is
    /// [`NodeVm::teardown`].
    pub fn run(&mut self) -> Result<StopReason, VmError> {
        let platform = self.platform.clone();
        let memory = self.memory.clone().ok_or(VmError::TakenApart)?;
        for (index, fd) in std::mem::take(&mut self.fds) {
            let Some(shared) = platform.vcpu(index).cloned() else {
                continue;
            };
            let timer_shared = shared.clone();
            let stop = platform.stop().clone();
            let khz = self.tsc_khz;
            self.timer_threads.push(
                std::thread::Builder::new()
                    .name(format!("timer{index}"))
                    .spawn(move || run_timer(timer_shared, stop, khz))
                    .map_err(VmError::Thread)?,
            );
            let p = platform.clone();
            let activity = self.start_activity(index);
            let on_sipi = self.on_sipi.clone();
            let pvm_repair = self.pvm_repair.clone();
            let memory = memory.clone();
            self.vcpu_threads.push(
                std::thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn(move || {
                        let vcpu_loop = VcpuLoop {
                            fd,
                            shared,
                            platform: p.clone(),
                            activity,
                            on_sipi,
                            pvm_repair,
                            memory,
                        };
                        if let Err(e) = vcpu_loop.run() {
                            p.request_stop(StopReason::Error(e.to_string()));
                        }
                    })
                    .map_err(VmError::Thread)?,
            );
        }
        // The node runs until something stops it: its own vCPUs finishing (single node), the
        // master's STOP, a lost peer, an error, or a signal.
        while !platform.stop().wait(Duration::from_millis(500)) {}
        let reason = platform.stop().reason().unwrap_or(StopReason::PowerOff);
        platform.flush_console();
        self.stop_vcpus();
        self.stop_devices();
        if let Some(d) = &self.distributed {
            d.leave(&reason);
        }
        Ok(reason)
    }

    /// Takes the node down, in an order that keeps every lifetime promise made about guest
    /// memory (`GuestMemory::register`, `Distributed::join`, `GuestMemory`'s drop):
    ///
    /// 1. The vCPU threads stop and are joined ([`NodeVm::stop_vcpus`]), while the DSM still
    ///    serves: a vCPU waiting for a page can still get it and leave. A vCPU that stays
    ///    blocked in a fault is given up on; it holds its own reference to guest memory, and so
    ///    to the userfaultfd registration, which keeps its fault pending until the process
    ///    exits (exit kills the thread before any descriptor or mapping is released). Then the
    ///    devices' own threads (a network card's receive thread) stop, also while the DSM
    ///    serves the pages they may be writing.
    /// 2. The DSM stops serving, then the transport stops ([`Distributed::shutdown`]), while
    ///    guest memory is still mapped: their threads install, read and drop guest pages.
    /// 3. The KVM VM fd closes: its memory slots point into guest memory, which must not be
    ///    unmapped under a live slot (the vCPU fds, which also hold the VM, went in step 1).
    /// 4. Guest memory goes last: unmapped once the last reference (ours, or a given-up vCPU
    ///    thread's) is dropped, and only then is the userfaultfd closed (see `crate::memory`).
    ///
    /// Idempotent; `Drop` runs it.
    pub fn teardown(&mut self) {
        self.stop_vcpus();
        self.stop_devices();
        // vCPU fds that never ran (the node failed before `run`, or `run` failed part way).
        self.fds.clear();
        if let Some(distributed) = self.distributed.take() {
            distributed.shutdown();
            drop(distributed);
        }
        drop(self.vm.take());
        drop(self.memory.take());
    }

    /// Stops the threads of the master's devices (a network card stops receiving).
    fn stop_devices(&mut self) {
        if let Some(devices) = &mut self.virtio {
            devices.stop();
        }
    }

    /// Stops the local vCPUs for good and joins their threads; gives up (with a line on stderr)
    /// on those that do not leave within a bound, which can only be a thread blocked in a page
    /// fault that is not going to be served.
    fn stop_vcpus(&mut self) {
        if self.vcpu_threads.is_empty() && self.timer_threads.is_empty() {
            return;
        }
        // Sets the stop flag unless a reason is set already (then it only kicks again): every
        // vCPU leaves guest mode, and `VcpuLoop` never enters it again once the flag is set. A
        // kick also ends a KVM page fault that waits on userfaultfd where the kernel lets
        // signals interrupt it (KVM_RUN returns EINTR); the fault stays pending in the DSM.
        self.platform.request_stop(StopReason::Error(
            "the VM was torn down while its vCPUs ran".into(),
        ));
        let left = join_for(
            std::mem::take(&mut self.vcpu_threads),
            Duration::from_millis(500),
        );
        for name in left {
            eprintln!(
                "spanvm: {name} did not stop: it is blocked in a guest memory access that is not \
                 going to be served; it stays blocked (never on made-up data) until the process exits"
            );
        }
        join_for(
            std::mem::take(&mut self.timer_threads),
            Duration::from_millis(200),
        );
    }
}

impl Drop for NodeVm {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Who runs which vCPU, for forwarding; every APIC starts in its power-on state.
fn forward_config(config: &NodeConfig) -> ForwardConfig {
    let layout = &config.layout;
    ForwardConfig {
        me: config.node,
        master: layout.master(),
        vcpu_owner: (0..layout.vcpu_count)
            .map(|v| layout.node_of_vcpu(v).unwrap_or(layout.master()))
            .collect(),
        initial: (0..layout.vcpu_count)
            .map(ApicAddressing::power_on)
            .collect(),
    }
}

/// The link of a single-node guest: there is nobody to send to.
struct NoPeers;

impl forward::ForwardLink for NoPeers {
    fn send(&self, to: forward::NodeId, _: &forward::WireFrame) -> Result<(), String> {
        Err(format!("a single-node guest has no node {to}"))
    }
}

// --- Clock synchronisation (owned with the `clock` crate).

/// At START: the master publishes its kvmclock and guest TSC in START and answers the other
/// nodes' clock samples; every other node waits for START, sets its kvmclock (and, where the
/// host can offset it, its guest TSC) from the master's, and reports the skew it measured.
fn sync_clock(
    config: &NodeConfig,
    vm: &KvmVm,
    control: &Control,
    tsc_khz: u32,
) -> Result<(), VmError> {
    use clock::GuestTsc as _;
    let layout = &config.layout;
    let kvm_clock = Arc::new(vm.clock());
    let boot_id = clock::BootId::read()?;
    if config.node == layout.master() {
        let tsc_control = kvm_clock.control();
        if let clock::TscControl::Offset { offset } = tsc_control {
            // The user-space APIC's TSC deadlines are in guest TSC ticks.
            crate::tsc::set_guest_offset(offset);
        }
        let master = clock::master_clock(boot_id, tsc_khz, &*kvm_clock, &*kvm_clock)?;
        let responder = kvm_clock.clone();
        let master_tsc = master.tsc;
        control.set_clock_responder(Box::new(move |seq| {
            clock::reply_to_ping(seq, &*responder, master_tsc)
        }));
        eprintln!(
            "{}",
            clock::master_report(config.node, layout.node_count(), &master, &tsc_control)
        );
        // Fault injection for the tests of a node lost before START (tests/dsm_failure.rs):
        // the master holds START back, the others wait for it.
        if let Some(ms) = std::env::var("SPANVM_TEST_HOLD_START_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            if control.wait_for_stop(Duration::from_millis(ms)) {
                return Err(VmError::NoStart(Duration::from_millis(ms)));
            }
        }
        control.announce_start(&master);
        // KVM may turn on its stable master clock only when a vCPU first runs: check then.
        let node = config.node;
        std::thread::Builder::new()
            .name("clock-check".into())
            .spawn(move || {
                match clock::master_tsc_stable_check(node, &*kvm_clock, Duration::from_secs(10)) {
                    Ok(line) => eprintln!("{line}"),
                    Err(e) => eprintln!("spanvm: node {node} clock: {e}"),
                }
            })
            .map_err(VmError::Thread)?;
    } else {
        let master = control
            .wait_for_start(connect_timeout())
            .ok_or(VmError::NoStart(connect_timeout()))??;
        let node = clock::LocalNode {
            id: config.node,
            boot_id,
            tsc_khz,
            vm: &*kvm_clock,
            tsc: &*kvm_clock,
        };
        let report = clock::sync_with_master(&node, &master, control, clock::MIN_SAMPLES)?;
        eprintln!("{report}");
        for w in report.warnings() {
            eprintln!("{w}");
        }
    }
    Ok(())
}

// --- End of clock synchronisation.

/// Joins the threads that finish within `limit` of now; returns the names of the others, which
/// are left running (detached).
fn join_for(threads: Vec<JoinHandle<()>>, limit: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + limit;
    let mut left = Vec::new();
    for t in threads {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            left.push(t.thread().name().unwrap_or("a vCPU thread").to_string());
        }
    }
    left
}

/// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread (and so in every thread it starts
/// later) and starts a thread that hands each to `on_signal(signal)`. Call it before any other
/// thread starts.
pub fn handle_signals(on_signal: impl Fn(i32) + Send + 'static) -> std::io::Result<()> {
    let set = block_signals()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                on_signal(sig);
            }
        })?;
    Ok(())
}

/// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread, and so in every thread it starts
/// afterwards. A thread started earlier would take these signals with their default action
/// instead of leaving them to [`handle_signals`].
fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local, zero-initialised set; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// `key=value` added to a kernel command line unless it sets `key` already.
fn add_param(cmdline: &str, key: &str, value: &str) -> String {
    if cmdline
        .split_whitespace()
        .any(|p| p.split('=').next() == Some(key))
    {
        return cmdline.to_string();
    }
    match cmdline.split_once(" -- ") {
        // Arguments after `--` belong to init; kernel parameters go before them.
        Some((kernel, init)) => format!("{kernel} {key}={value} -- {init}"),
        None if cmdline.is_empty() => format!("{key}={value}"),
        None => format!("{cmdline} {key}={value}"),
    }
}

/// The guest's command line with what spanvm needs added, unless the user set it already:
/// kvm-clock as the clocksource (it is the clock spanvm keeps in step across nodes; with an
/// invariant TSC Linux would otherwise pick the TSC, which is not synchronised between
/// machines), and on `kvm_pvm` the parameters that keep Linux away from instructions the host
/// cannot run (HOST.md). For a guest on several nodes, also the parameters that keep kernel
/// housekeeping from moving pages between nodes.
pub fn linux_cmdline(user: &str, nodes: NodeId, vcpus: u32) -> String {
    let mut cmdline = add_param(user.trim(), "clocksource", "kvm-clock");
    if nodes > 1 {
        // The initrd is loaded by the master, so its pages are in the master's memory: unpack
        // it there, in the init thread on the boot CPU, rather than on whatever CPU the async
        // worker lands on, which may be on another node and pull all of it over.
        cmdline = add_param(&cmdline, "initramfs_async", "0");
        // Every tick reads the timekeeper's and writes the CPU's own scheduler and RCU state,
        // and the timekeeper (CPU 0) writes what the others read: a handful of pages cross the
        // network per tick per CPU. Full dynticks stops the tick of a CPU that runs one user
        // task and offloads its RCU callbacks; CPU 0, on the master, keeps the tick, the
        // timekeeping and the housekeeping. Measured on 2 x 1 (notes/distributed_linux.md):
        // DSM faults during boot and sysbench fell from ~330 000 to ~30 000 per node and
        // `Run /init` from ~195 s to ~130 s. The price: an idle nohz_full CPU is never chosen
        // for idle load balancing, so threads that all wake on CPU 0 may stay there a while
        // (`isolcpus=nohz,1 rcu_nocbs=1` avoids that but faulted 5x more and booted slower).
        // A kernel without NO_HZ_FULL warns and ignores the parameter.
        let user_chose = cmdline
            .split_whitespace()
            .any(|p| p.starts_with("nohz_full=") || p.starts_with("isolcpus="));
        if !user_chose {
            match vcpus {
                0 | 1 => {}
                2 => cmdline = add_param(&cmdline, "nohz_full", "1"),
                n => cmdline = add_param(&cmdline, "nohz_full", &format!("1-{}", n - 1)),
            }
        }
    }
    if Hypervisor::is_pvm_host() {
        cmdline = crate::vcpu::pvm_repair::add_pvm_kernel_params(&cmdline);
    }
    cmdline
}

#[cfg(test)]
mod tests {
    use super::linux_cmdline;

    #[test]
    fn cmdline_gets_kvm_clock_unless_the_user_chose() {
        assert!(linux_cmdline("console=ttyS0", 1, 2).contains("clocksource=kvm-clock"));
        assert!(!linux_cmdline("console=ttyS0", 1, 2).contains("initramfs_async"));
        let two = linux_cmdline("console=ttyS0 -- spanvm.run=true", 2, 2);
        assert!(
            two.starts_with("console=ttyS0 clocksource=kvm-clock initramfs_async=0"),
            "{two}"
        );
        assert!(two.contains(" -- spanvm.run=true"), "{two}");
        assert!(linux_cmdline("initramfs_async=1", 2, 2).contains("initramfs_async=1"));
        assert!(!linux_cmdline("initramfs_async=1", 2, 2).contains("initramfs_async=0"));
        let own = linux_cmdline("console=ttyS0 clocksource=tsc", 1, 2);
        assert!(
            own.contains("clocksource=tsc") && !own.contains("kvm-clock"),
            "{own}"
        );
    }

    #[test]
    fn cmdline_of_a_guest_on_several_nodes_leaves_the_tick_to_cpu_0() {
        assert!(two_nodes(4).contains("nohz_full=1-3"));
        assert!(two_nodes(2).contains("nohz_full=1 "), "{}", two_nodes(2));
        assert!(!linux_cmdline("console=ttyS0", 1, 4).contains("nohz_full"));
        assert!(!linux_cmdline("console=ttyS0", 2, 1).contains("nohz_full"));
        for own in ["nohz_full=2-3", "isolcpus=nohz,2"] {
            let line = linux_cmdline(own, 2, 4);
            assert!(line.contains(own) && !line.contains("=1-3"), "{line}");
        }
    }

    fn two_nodes(vcpus: u32) -> String {
        linux_cmdline("console=ttyS0 -- spanvm.run=true", 2, vcpus)
    }
}

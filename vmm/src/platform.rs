//! The platform of one node: the buses with their devices, the IOAPIC, every local vCPU's
//! shared state, and interrupt routing between them.
//!
//! The devices (COM1, i8042, ACPI PM, IOAPIC) exist on the master only; other nodes have just
//! their node-local probe port and send every other access to the master through
//! [`forward::Forwarder`], which also routes every interrupt, local or remote.

use std::io::Write;
use std::sync::{Arc, Mutex, Weak};

use devices::acpi_pm::{AcpiPm, ACPI_PM_PORT, ACPI_PM_PORT_LEN};
use devices::apic::ApicEffects;
use devices::bus::{Bus, BusError};
use devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use devices::interrupt::InterruptMessage;
use devices::ioapic::IoApic;
use devices::irq_driver::{IrqDriver, IRQ_DRIVER_PORT, IRQ_DRIVER_PORT_LEN};
use devices::irq_line::IrqLine;
use devices::probe_port::{ProbeEvent, ProbePort, PROBE_PORT, PROBE_PORT_LEN};
use devices::serial::{SerialPort, COM1_IRQ, COM1_PORT};
use forward::{ForwardError, Forwarder, IoAccess, Space};

use crate::stop::{Stop, StopReason};
use crate::vcpu::VcpuShared;

/// Size of the IOAPIC's MMIO window.
const IOAPIC_WINDOW: u64 = 0x100;

/// Errors of platform setup.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// Two devices were given the same addresses (a bug in the platform description).
    #[error("platform device layout: {0}")]
    Bus(#[from] BusError),
    /// The MMIO devices were set twice (a bug in the VMM's setup).
    #[error("the platform's MMIO devices were already set")]
    MmioDevicesSet,
}

/// Where probe reports go: printed as `PROBE vcpu=N KEY=value` lines, which tests parse.
/// They share stdout with the guest's console, so a report that comes while the console is in
/// the middle of a line waits until that line ends instead of cutting into it.
pub struct ProbeConsole {
    state: Mutex<ConsoleLines>,
}

#[derive(Default)]
struct ConsoleLines {
    /// The console's last byte was not a newline.
    mid_line: bool,
    /// Reports held back until the console's line ends.
    held: Vec<String>,
}

impl ProbeConsole {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConsoleLines> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn print(&self, line: &str) {
        let mut st = self.lock();
        if st.mid_line {
            st.held.push(line.to_string());
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Writes console bytes, then any reports that waited for the line to end.
    fn console_write(&self, buf: &[u8]) -> std::io::Result<()> {
        let mut st = self.lock();
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        if let Some(&last) = buf.last() {
            st.mid_line = last != b'\n';
        }
        if !st.mid_line {
            for line in st.held.drain(..) {
                writeln!(out, "{line}")?;
            }
        }
        out.flush()
    }

    /// Prints held reports whatever the console's state (the guest stopped mid-line).
    pub fn flush(&self) {
        let mut st = self.lock();
        let mut out = std::io::stdout().lock();
        if !st.held.is_empty() {
            let _ = writeln!(out);
            st.mid_line = false;
        }
        for line in st.held.drain(..) {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

/// The console writer: unbuffered stdout, so a prompt without a newline shows at once.
struct ConsoleOut(Arc<ProbeConsole>);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.console_write(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// One IOAPIC input pin as a device's interrupt line.
struct IoApicPin {
    platform: Weak<Platform>,
    pin: usize,
}

impl IrqLine for IoApicPin {
    fn pulse(&self) {
        if let Some(p) = self.platform.upgrade() {
            p.set_irq(self.pin, true);
            p.set_irq(self.pin, false);
        }
    }
    fn set_level(&self, asserted: bool) {
        if let Some(p) = self.platform.upgrade() {
            p.set_irq(self.pin, asserted);
        }
    }
}

/// The node's platform.
pub struct Platform {
    /// Port-I/O devices.
    pub io_bus: Bus,
    /// MMIO devices other than the local APIC and the IOAPIC (the master's virtio devices),
    /// set once after the platform exists, since they need its interrupt lines.
    mmio_bus: std::sync::OnceLock<Bus>,
    ioapic: Mutex<IoApic>,
    /// The console UART (master only).
    serial: Option<Arc<SerialPort>>,
    /// Local vCPUs by global index (`None` for vCPUs of other nodes).
    vcpus: Vec<Option<Arc<VcpuShared>>>,
    /// Interrupt routing and device-access forwarding (also on a single node).
    forward: Arc<Forwarder>,
    is_master: bool,
    stop: Arc<Stop>,
    probe_console: Arc<ProbeConsole>,
    probe_events: Mutex<Vec<ProbeEvent>>,
    on_local_finish: std::sync::OnceLock<Box<dyn Fn(StopReason) + Send + Sync>>,
    /// Port accesses nobody claims (counted for the statistics).
    pub unclaimed_io: std::sync::atomic::AtomicU64,
}

impl Platform {
    /// Builds the platform for `vcpu_count` vCPUs of which `local` run here; `is_master`
    /// decides whether the devices are here, `probe_guest` whether the probes' test-only IRQ
    /// line driver is among them. Attaches itself to `forward`.
    pub fn new(
        vcpu_count: usize,
        local: &[usize],
        tsc_khz: u32,
        stop: Arc<Stop>,
        is_master: bool,
        probe_guest: bool,
        forward: Arc<Forwarder>,
    ) -> Result<Arc<Self>, PlatformError> {
        let mut vcpus: Vec<Option<Arc<VcpuShared>>> = (0..vcpu_count).map(|_| None).collect();
        for &i in local {
            vcpus[i] = Some(Arc::new(VcpuShared::new(i, tsc_khz)));
        }
        let probe_console = Arc::new(ProbeConsole {
            state: Mutex::new(ConsoleLines::default()),
        });
        let mut build_err = None;
        let platform = Arc::new_cyclic(|weak: &Weak<Platform>| {
            let mut io_bus = Bus::new();
            let serial_irq: Arc<dyn IrqLine> = Arc::new(IoApicPin {
                platform: weak.clone(),
                pin: COM1_IRQ,
            });
            let serial = Arc::new(SerialPort::new(
                serial_irq,
                Box::new(ConsoleOut(probe_console.clone())),
            ));
            let console = serial.clone();
            let off_weak = weak.clone();
            let reset_weak2 = weak.clone();
            let acpi_pm = Arc::new(AcpiPm::new(
                Arc::new(move |vcpu| {
                    if let Some(p) = off_weak.upgrade() {
                        eprintln!("spanvm: the guest powered off (ACPI S5) from vCPU {vcpu}");
                        p.request_stop(StopReason::PowerOff);
                    }
                }),
                Arc::new(move |vcpu| {
                    if let Some(p) = reset_weak2.upgrade() {
                        p.request_stop(StopReason::Reset(format!(
                            "ACPI reset register, written by vCPU {vcpu}"
                        )));
                    }
                }),
            ));
            let reset_stop = stop.clone();
            let reset_weak = weak.clone();
            let i8042 = Arc::new(I8042::new(Arc::new(move || {
                reset_stop.request(StopReason::Reset("i8042 reset command".into()));
                if let Some(p) = reset_weak.upgrade() {
                    p.wake_all();
                }
            })));
            let probe_weak = weak.clone();
            let probe = Arc::new(ProbePort::new(
                vcpu_count,
                Box::new(move |e| {
                    if let Some(p) = probe_weak.upgrade() {
                        p.on_probe_event(e);
                    }
                }),
            ));
            let mut claims = vec![(
                PROBE_PORT,
                PROBE_PORT_LEN,
                probe as Arc<dyn devices::bus::BusDevice>,
            )];
            // The IRQ line driver: probe guests raise IOAPIC pins through it (master only).
            let irq_weak = weak.clone();
            let irq_driver = Arc::new(IrqDriver::new(Box::new(move |pin, high| {
                if let Some(p) = irq_weak.upgrade() {
                    p.set_irq(pin, high);
                }
            })));
            if is_master {
                claims.extend([
                    (COM1_PORT, 8, serial as Arc<dyn devices::bus::BusDevice>),
                    (I8042_PORT, I8042_PORT_LEN, i8042),
                    (ACPI_PM_PORT, ACPI_PM_PORT_LEN, acpi_pm),
                ]);
                // A test device: a real guest (Linux) must not be able to raise IOAPIC pins.
                if probe_guest {
                    claims.push((IRQ_DRIVER_PORT, IRQ_DRIVER_PORT_LEN, irq_driver));
                }
            }
            for (base, len, dev) in claims {
                if let Err(e) = io_bus.insert(base, len, dev) {
                    build_err = Some(e);
                }
            }
            Platform {
                io_bus,
                mmio_bus: std::sync::OnceLock::new(),
                ioapic: Mutex::new(IoApic::new()),
                serial: is_master.then_some(console),
                vcpus,
                forward: forward.clone(),
                is_master,
                stop,
                probe_console,
                probe_events: Mutex::new(Vec::new()),
                on_local_finish: std::sync::OnceLock::new(),
                unclaimed_io: Default::default(),
            }
        });
        if let Some(e) = build_err {
            return Err(e.into());
        }
        forward.attach_local(Arc::new(LocalTargets(Arc::downgrade(&platform))));
        if is_master {
            forward.attach_devices(Arc::new(MasterSide(Arc::downgrade(&platform))));
        }
        Ok(platform)
    }

    /// Puts `bus`'s devices on the MMIO bus; once, before any vCPU runs.
    pub fn set_mmio_devices(&self, bus: Bus) -> Result<(), PlatformError> {
        self.mmio_bus
            .set(bus)
            .map_err(|_| PlatformError::MmioDevicesSet)
    }

    /// IOAPIC input `pin` as a device's interrupt line.
    pub fn irq_line(self: &Arc<Self>, pin: usize) -> Arc<dyn IrqLine> {
        Arc::new(IoApicPin {
            platform: Arc::downgrade(self),
            pin,
        })
    }

    /// The console UART (for forwarding the user's input to it); the master's only.
    pub fn serial(&self) -> Option<&Arc<SerialPort>> {
        self.serial.as_ref()
    }

    /// Prints probe reports still waiting for a console line to end.
    pub fn flush_console(&self) {
        self.probe_console.flush();
    }

    /// Interrupt routing and access forwarding.
    pub fn forward(&self) -> &Arc<Forwarder> {
        &self.forward
    }

    /// A local vCPU by global index.
    pub fn vcpu(&self, index: usize) -> Option<&Arc<VcpuShared>> {
        self.vcpus.get(index)?.as_ref()
    }

    /// Every local vCPU.
    pub fn local_vcpus(&self) -> impl Iterator<Item = &Arc<VcpuShared>> {
        self.vcpus.iter().flatten()
    }

    /// The node's stop state.
    pub fn stop(&self) -> &Arc<Stop> {
        &self.stop
    }

    /// Requests a stop and wakes every vCPU and timer so they see it.
    pub fn request_stop(&self, reason: StopReason) {
        self.stop.request(reason);
        self.wake_all();
        // vCPUs waiting for the master's answer or a peer's acknowledgement come back.
        self.forward.release();
    }

    fn wake_all(&self) {
        for v in self.local_vcpus() {
            v.notify();
            v.timer_changed.notify_all();
        }
    }

    /// Decides what happens when this node's vCPUs are done (or one failed): by default the
    /// node stops; in a cluster the control protocol decides when everyone stops.
    pub fn on_local_finish(&self, hook: Box<dyn Fn(StopReason) + Send + Sync>) {
        let _ = self.on_local_finish.set(hook);
    }

    fn local_finished(&self, reason: StopReason) {
        match self.on_local_finish.get() {
            Some(hook) => hook(reason),
            None => self.request_stop(reason),
        }
    }

    /// Everything the probe reported so far, in order.
    pub fn probe_events(&self) -> Vec<ProbeEvent> {
        self.probe_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn on_probe_event(&self, e: ProbeEvent) {
        self.probe_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e.clone());
        match e {
            ProbeEvent::Report { vcpu, key, value } => {
                self.probe_console.print(&format!(
                    "PROBE vcpu={vcpu} {}={value}",
                    ProbeEvent::key_text(&key)
                ));
            }
            ProbeEvent::Exit { vcpu, status } => {
                self.probe_console
                    .print(&format!("PROBE vcpu={vcpu} EXIT={status}"));
                if let Some(v) = self.vcpu(vcpu) {
                    v.finish();
                }
                if status != 0 {
                    self.local_finished(StopReason::ProbeFailed { vcpu, status });
                } else if self.local_vcpus().all(|v| v.finished()) {
                    self.local_finished(StopReason::PowerOff);
                }
            }
        }
    }

    /// Whether `gpa` is in the IOAPIC's window.
    pub fn is_ioapic(gpa: u64) -> bool {
        (IoApic::BASE..IoApic::BASE + IOAPIC_WINDOW).contains(&gpa)
    }

    /// An IOAPIC register read.
    pub fn ioapic_read(&self, gpa: u64, data: &mut [u8]) {
        self.ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mmio_read(gpa - IoApic::BASE, data);
    }

    /// An IOAPIC register write; delivers what it causes.
    pub fn ioapic_write(&self, gpa: u64, data: &[u8]) {
        let msgs = self
            .ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mmio_write(gpa - IoApic::BASE, data);
        for m in msgs {
            self.deliver(&m, None);
        }
    }

    /// Sets the level of IOAPIC input `pin`.
    pub fn set_irq(&self, pin: usize, level: bool) {
        let msg = self
            .ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_irq(pin, level);
        if let Some(m) = msg {
            self.deliver(&m, None);
        }
    }

    /// Delivers an interrupt message (IPI, IOAPIC or MSI) to every vCPU it addresses, on this
    /// node or another.
    pub fn deliver(&self, msg: &InterruptMessage, source: Option<usize>) {
        // A failed send means a peer is lost; the transport reports that and stops the guest.
        let _ = self.forward.deliver(msg, source);
    }

    /// Hands `msg` to local vCPU `vcpu` and makes it look.
    fn accept_local(&self, vcpu: usize, msg: &InterruptMessage) {
        if let Some(v) = self.vcpu(vcpu) {
            let _ = v.lock_apic().accept(msg);
            v.notify();
        }
    }

    /// A forwarding failure that is not the node stopping anyway stops the guest.
    fn forward_failed(&self, e: ForwardError) {
        match e {
            ForwardError::Released { .. } | ForwardError::Send { .. } => {}
            other => self.request_stop(StopReason::Error(other.to_string())),
        }
    }

    /// Acts on what an APIC access caused, with the APIC's lock released. Runs on the vCPU's
    /// own thread: an addressing change returns only when every node knows it.
    pub fn apply_apic_effects(&self, vcpu: &VcpuShared, effects: ApicEffects) {
        if effects.addressing_changed {
            let now = vcpu.lock_apic().addressing();
            if let Err(e) = self.forward.update_addressing(vcpu.index, now) {
                self.forward_failed(e);
            }
        }
        if effects.timer_changed {
            vcpu.timer_changed.notify_all();
        }
        if let Some(eoi) = effects.eoi {
            if eoi.level {
                if let Err(e) = self.forward.end_of_interrupt(eoi.vector) {
                    self.forward_failed(e);
                }
            }
        }
        if let Some(ipi) = effects.ipi {
            self.deliver(&ipi, Some(vcpu.index));
        }
    }

    /// The IOAPIC retired `vector` (remote IRR), re-delivering a line still asserted.
    fn ioapic_eoi(&self, vector: u8) {
        let msgs = self
            .ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .end_of_interrupt(vector);
        for m in msgs {
            self.deliver(&m, None);
        }
    }

    /// A device access as the master carries it out (its own vCPUs' and forwarded ones).
    fn device_access(&self, vcpu: usize, access: &mut IoAccess) {
        match (access.space, access.write) {
            (Space::Port, true) => {
                if !self.io_bus.write(vcpu, access.address, access.bytes()) {
                    self.count_unclaimed();
                }
            }
            (Space::Port, false) => {
                if !self.io_bus.read(vcpu, access.address, access.bytes_mut()) {
                    access.bytes_mut().fill(0xff);
                    self.count_unclaimed();
                }
            }
            (Space::Mmio, true) if Self::is_ioapic(access.address) => {
                self.ioapic_write(access.address, access.bytes())
            }
            (Space::Mmio, false) if Self::is_ioapic(access.address) => {
                self.ioapic_read(access.address, access.bytes_mut())
            }
            (Space::Mmio, true) => {
                if let Some(bus) = self.mmio_bus.get() {
                    bus.write(vcpu, access.address, access.bytes());
                }
            }
            (Space::Mmio, false) => {
                let claimed = self
                    .mmio_bus
                    .get()
                    .is_some_and(|bus| bus.read(vcpu, access.address, access.bytes_mut()));
                if !claimed {
                    access.bytes_mut().fill(0xff);
                }
            }
        }
    }

    fn count_unclaimed(&self) {
        self.unclaimed_io
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A vCPU's access outside its local APIC: node-local devices (the probe port) first, then
    /// the master's devices, here or forwarded.
    fn access(&self, vcpu: usize, mut access: IoAccess, out: Option<&mut [u8]>) {
        // On the master the bus holds every device; elsewhere only node-local ones.
        let node_local = !self.is_master
            && access.space == Space::Port
            && match out {
                Some(_) => self.io_bus.read(vcpu, access.address, access.bytes_mut()),
                None => self.io_bus.write(vcpu, access.address, access.bytes()),
            };
        if self.is_master {
            self.device_access(vcpu, &mut access);
        } else if !node_local {
            if let Err(e) = self.forward.forward_io(vcpu, &mut access) {
                access.bytes_mut().fill(0xff);
                self.forward_failed(e);
            }
        }
        if let Some(out) = out {
            out.copy_from_slice(access.bytes());
        }
    }

    /// An `out` of `data` to `port` by vCPU `vcpu`.
    pub fn port_write(&self, vcpu: usize, port: u16, data: &[u8]) {
        match IoAccess::write(Space::Port, u64::from(port), data) {
            Some(a) => self.access(vcpu, a, None),
            None => self.count_unclaimed(),
        }
    }

    /// An `in` from `port` by vCPU `vcpu` into `data`.
    pub fn port_read(&self, vcpu: usize, port: u16, data: &mut [u8]) {
        match IoAccess::read(Space::Port, u64::from(port), data.len()) {
            Some(a) => self.access(vcpu, a, Some(data)),
            None => {
                data.fill(0xff);
                self.count_unclaimed();
            }
        }
    }

    /// An MMIO write outside the local APIC window.
    pub fn mmio_write(&self, vcpu: usize, gpa: u64, data: &[u8]) {
        if let Some(a) = IoAccess::write(Space::Mmio, gpa, data) {
            self.access(vcpu, a, None);
        }
    }

    /// An MMIO read outside the local APIC window.
    pub fn mmio_read(&self, vcpu: usize, gpa: u64, data: &mut [u8]) {
        match IoAccess::read(Space::Mmio, gpa, data.len()) {
            Some(a) => self.access(vcpu, a, Some(data)),
            None => data.fill(0xff),
        }
    }
}

/// The platform's vCPUs as forwarding's local targets.
struct LocalTargets(Weak<Platform>);

impl forward::LocalApics for LocalTargets {
    fn accept(&self, vcpu: usize, msg: &InterruptMessage) {
        if let Some(p) = self.0.upgrade() {
            p.accept_local(vcpu, msg);
        }
    }
}

/// The master's devices as forwarded accesses reach them.
struct MasterSide(Weak<Platform>);

impl forward::MasterDevices for MasterSide {
    fn access(&self, vcpu: usize, access: &mut IoAccess) {
        if let Some(p) = self.0.upgrade() {
            p.device_access(vcpu, access);
        }
    }
    fn end_of_interrupt(&self, vector: u8) {
        if let Some(p) = self.0.upgrade() {
            p.ioapic_eoi(vector);
        }
    }
}

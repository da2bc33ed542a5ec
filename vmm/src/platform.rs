//! The platform of one node: the buses with their devices, the IOAPIC, every local vCPU's
//! shared state, and interrupt routing between them.

use std::io::Write;
use std::sync::{Arc, Mutex, RwLock, Weak};

use devices::acpi_pm::{AcpiPm, ACPI_PM_PORT, ACPI_PM_PORT_LEN};
use devices::apic::ApicEffects;
use devices::bus::{Bus, BusError};
use devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use devices::interrupt::{destination_set, ApicAddressing, InterruptMessage};
use devices::ioapic::IoApic;
use devices::irq_line::IrqLine;
use devices::probe_port::{ProbeEvent, ProbePort, PROBE_PORT, PROBE_PORT_LEN};
use devices::serial::{SerialPort, COM1_IRQ, COM1_PORT};

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
}

/// Where probe reports go: printed as `PROBE vcpu=N KEY=value` lines, which tests parse.
pub struct ProbeConsole {
    out: Mutex<Box<dyn Write + Send>>,
}

impl ProbeConsole {
    fn print(&self, line: &str) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The console writer: unbuffered stdout, so a prompt without a newline shows at once.
struct ConsoleOut;

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
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
    /// MMIO devices other than the local APIC and the IOAPIC.
    pub mmio_bus: Bus,
    ioapic: Mutex<IoApic>,
    serial: Arc<SerialPort>,
    /// Local vCPUs by global index (`None` for vCPUs of other nodes).
    vcpus: Vec<Option<Arc<VcpuShared>>>,
    /// Every vCPU's APIC addressing state (the local ones kept current here).
    addressing: RwLock<Vec<ApicAddressing>>,
    stop: Arc<Stop>,
    probe_console: Arc<ProbeConsole>,
    probe_events: Mutex<Vec<ProbeEvent>>,
    on_local_finish: std::sync::OnceLock<Box<dyn Fn(StopReason) + Send + Sync>>,
    /// Port accesses nobody claims (counted for the statistics).
    pub unclaimed_io: std::sync::atomic::AtomicU64,
}

impl Platform {
    /// Builds the platform for `vcpu_count` vCPUs of which `local` run here.
    pub fn new(
        vcpu_count: usize,
        local: &[usize],
        tsc_khz: u32,
        stop: Arc<Stop>,
    ) -> Result<Arc<Self>, PlatformError> {
        let mut vcpus: Vec<Option<Arc<VcpuShared>>> = (0..vcpu_count).map(|_| None).collect();
        for &i in local {
            vcpus[i] = Some(Arc::new(VcpuShared::new(i, tsc_khz)));
        }
        let addressing = (0..vcpu_count)
            .map(|i| match &vcpus[i] {
                Some(v) => v.lock_apic().addressing(),
                None => devices::apic::LocalApic::new(i as u32, i == 0, tsc_khz).addressing(),
            })
            .collect();
        let probe_console = Arc::new(ProbeConsole {
            out: Mutex::new(Box::new(std::io::stdout())),
        });
        let mut build_err = None;
        let platform = Arc::new_cyclic(|weak: &Weak<Platform>| {
            let mut io_bus = Bus::new();
            let serial_irq: Arc<dyn IrqLine> = Arc::new(IoApicPin {
                platform: weak.clone(),
                pin: COM1_IRQ,
            });
            let serial = Arc::new(SerialPort::new(serial_irq, Box::new(ConsoleOut)));
            let console = serial.clone();
            let off_weak = weak.clone();
            let reset_weak2 = weak.clone();
            let acpi_pm = Arc::new(AcpiPm::new(
                Arc::new(move || {
                    if let Some(p) = off_weak.upgrade() {
                        p.request_stop(StopReason::PowerOff);
                    }
                }),
                Arc::new(move || {
                    if let Some(p) = reset_weak2.upgrade() {
                        p.request_stop(StopReason::Reset("ACPI reset register".into()));
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
            for (base, len, dev) in [
                (COM1_PORT, 8, serial as Arc<dyn devices::bus::BusDevice>),
                (I8042_PORT, I8042_PORT_LEN, i8042),
                (PROBE_PORT, PROBE_PORT_LEN, probe),
                (ACPI_PM_PORT, ACPI_PM_PORT_LEN, acpi_pm),
            ] {
                if let Err(e) = io_bus.insert(base, len, dev) {
                    build_err = Some(e);
                }
            }
            Platform {
                io_bus,
                mmio_bus: Bus::new(),
                ioapic: Mutex::new(IoApic::new()),
                serial: console,
                vcpus,
                addressing: RwLock::new(addressing),
                stop,
                probe_console,
                probe_events: Mutex::new(Vec::new()),
                on_local_finish: std::sync::OnceLock::new(),
                unclaimed_io: Default::default(),
            }
        });
        match build_err {
            Some(e) => Err(e.into()),
            None => Ok(platform),
        }
    }

    /// The console UART (for forwarding the user's input to it).
    pub fn serial(&self) -> &Arc<SerialPort> {
        &self.serial
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

    /// Delivers an interrupt message (IPI, IOAPIC or MSI) to every vCPU it addresses.
    pub fn deliver(&self, msg: &InterruptMessage, source: Option<usize>) {
        let targets = {
            let addressing = self.addressing.read().unwrap_or_else(|p| p.into_inner());
            destination_set(msg, source, &addressing)
        };
        for t in targets {
            match self.vcpu(t) {
                Some(v) => {
                    let _ = v.lock_apic().accept(msg);
                    v.notify();
                }
                None => {
                    // Remote vCPUs: forwarding between nodes comes with the forward crate.
                }
            }
        }
    }

    /// Acts on what an APIC access caused, with the APIC's lock released.
    pub fn apply_apic_effects(&self, vcpu: &VcpuShared, effects: ApicEffects) {
        if effects.addressing_changed {
            let now = vcpu.lock_apic().addressing();
            self.addressing.write().unwrap_or_else(|p| p.into_inner())[vcpu.index] = now;
        }
        if effects.timer_changed {
            vcpu.timer_changed.notify_all();
        }
        if let Some(eoi) = effects.eoi {
            if eoi.level {
                let msgs = self
                    .ioapic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .end_of_interrupt(eoi.vector);
                for m in msgs {
                    self.deliver(&m, None);
                }
            }
        }
        if let Some(ipi) = effects.ipi {
            self.deliver(&ipi, Some(vcpu.index));
        }
    }
}

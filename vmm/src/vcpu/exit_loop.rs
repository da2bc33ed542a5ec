//! The exit loop of one local vCPU: enter the guest, handle what made it exit, inject pending
//! interrupts, repeat until the node stops.

use std::sync::Arc;

use devices::apic::LocalApic;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::hypervisor::{inject_interrupt, HypervisorError, MSR_APIC_BASE, MSR_TSC_DEADLINE};
use crate::memory::GuestMemory;
use crate::platform::Platform;
use crate::stop::StopReason;
use crate::tsc;
use crate::vcpu::exit_counters::ExitReason;
use crate::vcpu::pvm_repair::{PvmRepair, RepairError};
use crate::vcpu::{kick, RunState, VcpuShared};

const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;
const LAPIC_WINDOW: u64 = 0x1000;

/// Errors that stop a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_RUN` itself failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {source}")]
    Run {
        /// Index of the vCPU that stopped.
        vcpu: usize,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Injecting an interrupt failed.
    #[error("vCPU {vcpu}: {source}")]
    Inject {
        /// Index of the vCPU that stopped.
        vcpu: usize,
        /// Why the injection failed.
        source: HypervisorError,
    },
    /// KVM could not run the guest's instruction (or entry failed).
    #[error(
        "vCPU {vcpu}: KVM internal error, suberror {suberror}, at RIP {rip:#x} (data {data:x?})"
    )]
    Internal {
        /// Index of the vCPU that stopped.
        vcpu: usize,
        /// KVM's `KVM_INTERNAL_ERROR_*` suberror.
        suberror: u32,
        /// The guest instruction pointer at the exit.
        rip: u64,
        /// The extra words KVM reported with the suberror.
        data: Vec<u64>,
    },
    /// An exit spanvm does not handle.
    #[error("vCPU {vcpu}: unexpected exit {what}")]
    UnexpectedExit {
        /// Index of the vCPU that stopped.
        vcpu: usize,
        /// The exit reason as KVM named it.
        what: String,
    },
    /// An instruction failed KVM's emulation and spanvm could not do it either.
    #[error("vCPU {vcpu}: {source}")]
    Repair {
        /// Index of the vCPU that stopped.
        vcpu: usize,
        /// Why the instruction could not be completed.
        source: RepairError,
    },
    /// Starting the vCPU at a SIPI failed.
    #[error("vCPU {vcpu}: cannot start at the SIPI vector {vector:#x}: {why}")]
    Sipi {
        /// Index of the vCPU that stopped.
        vcpu: usize,
        /// The SIPI vector: the start page number below 1 MiB.
        vector: u8,
        /// Why the vCPU could not be set up there.
        why: String,
    },
    /// Injecting an NMI failed.
    #[error("vCPU {vcpu}: KVM_NMI failed: {source}")]
    Nmi {
        /// Index of the vCPU that stopped.
        vcpu: usize,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(std::io::Error),
    /// The test hook `SPANVM_TEST_VCPU_IGNORES_KICK` could not block the kick signal.
    #[error("cannot block the vCPU kick signal for SPANVM_TEST_VCPU_IGNORES_KICK (unset it): {0}")]
    KickMask(std::io::Error),
}

/// Puts a vCPU in real mode at a SIPI's start page (from the boot code of the guest kind).
pub type SipiSetup = Arc<dyn Fn(&VcpuFd, u8) -> Result<(), String> + Send + Sync>;

/// Whether the vCPU runs or waits for a startup IPI (an application processor before the guest
/// starts it, or any vCPU after INIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Runs guest code.
    Running,
    /// Waits for SIPI; nothing runs.
    WaitForSipi,
}

/// What the loop needs that is not KVM: the platform and this vCPU's shared state.
pub struct VcpuLoop {
    /// The KVM vCPU this loop runs.
    pub fd: VcpuFd,
    /// The state other threads see and poke: kicks, pending interrupts, activity.
    pub shared: Arc<VcpuShared>,
    /// The node's devices and interrupt routing, shared by its vCPUs.
    pub platform: Arc<Platform>,
    /// How the vCPU starts.
    pub activity: Activity,
    /// What a SIPI does; `None` for guests that do not start processors (probes), where INIT
    /// and SIPI are ignored.
    pub on_sipi: Option<SipiSetup>,
    /// On a `kvm_pvm` host: the repair of instructions KVM's emulator gives up on (`None`
    /// elsewhere, so that nothing changes on VT-x).
    pub pvm_repair: Option<Arc<PvmRepair>>,
    /// Guest memory, for the repair's reads of instructions, operands and stacks. Also what
    /// keeps guest memory (and its userfaultfd) alive for as long as this vCPU may touch it:
    /// declared after `fd` so that it is released after the vCPU fd, which holds the VM and its
    /// memory slots (see `crate::memory` and `NodeVm::teardown`).
    pub memory: Arc<GuestMemory>,
}

impl VcpuLoop {
    /// Runs the vCPU until the node stops. The calling thread becomes the vCPU thread.
    pub fn run(mut self) -> Result<(), VcpuError> {
        kick::install_handler().map_err(VcpuError::KickHandler)?;
        // Fault injection for the tests of a stop while a vCPU waits for a page
        // (tests/dsm_failure.rs).
        if std::env::var_os("SPANVM_TEST_VCPU_IGNORES_KICK").is_some() {
            kick::block_in_current_thread().map_err(VcpuError::KickMask)?;
        }
        // SAFETY: pthread_self has no preconditions.
        self.shared.set_thread(unsafe { libc::pthread_self() });
        let run_ptr: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // SAFETY: the kvm_run mapping belongs to `self.fd`, which lives until this function
        // returns, and we unregister before returning.
        unsafe { kick::register_current(run_ptr) };
        let result = self.run_loop();
        kick::unregister_current();
        self.shared.set_state(RunState::InVmm);
        result
    }

    fn stopping(&self) -> bool {
        self.platform.stop().requested() || self.shared.finished()
    }

    fn run_loop(&mut self) -> Result<(), VcpuError> {
        let index = self.shared.index;
        loop {
            self.shared.set_state(RunState::InGuest);
            if self.stopping() {
                return Ok(());
            }
            if !self.service_events()? {
                continue;
            }
            self.prepare_injection()?;
            let exit = self.fd.run();
            self.shared.set_state(RunState::InVmm);
            self.shared.exits.record(exit_reason(&exit));
            match exit {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => self.platform.port_write(index, port, data),
                    VcpuExit::IoIn(port, data) => self.platform.port_read(index, port, data),
                    VcpuExit::MmioRead(addr, data) => {
                        mmio_read(&self.shared, &self.platform, addr, data)
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        mmio_write(&self.shared, &self.platform, addr, data);
                    }
                    VcpuExit::X86Rdmsr(exit) => {
                        let result = {
                            let mut apic = self.shared.lock_apic();
                            read_msr(&mut apic, exit.index)
                        };
                        match result {
                            Some(v) => *exit.data = v,
                            None => *exit.error = 1,
                        }
                    }
                    VcpuExit::X86Wrmsr(exit) => {
                        let (index_, value) = (exit.index, exit.data);
                        let effects = {
                            let mut apic = self.shared.lock_apic();
                            write_msr(&mut apic, index_, value)
                        };
                        match effects {
                            Some(e) => self.platform.apply_apic_effects(&self.shared, e),
                            None => *exit.error = 1,
                        }
                    }
                    VcpuExit::Hlt => self.halt(),
                    VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
                    VcpuExit::Shutdown => {
                        self.platform.request_stop(StopReason::Reset(format!(
                            "triple fault on vCPU {index}"
                        )));
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        let reason = match kind {
                            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
                            kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                                StopReason::Reset(format!("system reset from vCPU {index}"))
                            }
                            other => {
                                StopReason::Error(format!("vCPU {index}: system event {other}"))
                            }
                        };
                        self.platform.request_stop(reason);
                    }
                    VcpuExit::InternalError => {
                        let emulation_failure = {
                            let run = self.fd.get_kvm_run();
                            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
                            // is the member KVM filled in.
                            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                            suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
                        };
                        match (&self.pvm_repair, emulation_failure) {
                            (Some(repair), true) => {
                                repair.handle(&mut self.fd, self.memory.as_ref()).map_err(
                                    |source| VcpuError::Repair {
                                        vcpu: index,
                                        source,
                                    },
                                )?;
                            }
                            _ => return Err(self.internal_error()),
                        }
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        return Err(VcpuError::UnexpectedExit {
                            vcpu: index,
                            what: format!("entry failure {reason:#x} on host CPU {cpu}"),
                        })
                    }
                    other => {
                        return Err(VcpuError::UnexpectedExit {
                            vcpu: index,
                            what: format!("{other:?}"),
                        });
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(source) => {
                    return Err(VcpuError::Run {
                        vcpu: index,
                        source,
                    })
                }
            }
        }
    }

    /// INIT, SIPI and NMI: returns whether the vCPU may enter the guest now (false: it waited
    /// for a SIPI and the loop should look again).
    fn service_events(&mut self) -> Result<bool, VcpuError> {
        let index = self.shared.index;
        let mut apic = self.shared.lock_apic();
        if !apic.has_pending_event() && self.activity == Activity::Running {
            return Ok(true);
        }
        if self.on_sipi.is_none() {
            // Probe guests start every vCPU directly; INIT and SIPI mean nothing to them.
            let _ = (apic.take_init(), apic.take_sipi());
        }
        if apic.take_init() {
            let effects = apic.reset_init();
            drop(apic);
            self.platform.apply_apic_effects(&self.shared, effects);
            self.activity = Activity::WaitForSipi;
            apic = self.shared.lock_apic();
        }
        if self.activity == Activity::WaitForSipi {
            match apic.take_sipi() {
                Some(vector) => {
                    drop(apic);
                    if let Some(setup) = &self.on_sipi {
                        setup(&self.fd, vector).map_err(|why| VcpuError::Sipi {
                            vcpu: index,
                            vector,
                            why,
                        })?;
                    }
                    self.activity = Activity::Running;
                    return Ok(true);
                }
                None => {
                    // Wait-for-SIPI: like a halt that only INIT/SIPI (or a stop) ends.
                    self.shared.set_state(RunState::Halted);
                    if !self.stopping() && !apic.has_pending_event() {
                        drop(
                            self.shared
                                .wakeup
                                .wait(apic)
                                .unwrap_or_else(|p| p.into_inner()),
                        );
                    }
                    return Ok(false);
                }
            }
        }
        // Running: a SIPI outside wait-for-SIPI is ignored (Linux sends two).
        let _ = apic.take_sipi();
        let nmi = apic.take_nmi();
        drop(apic);
        if nmi {
            self.fd.nmi().map_err(|source| VcpuError::Nmi {
                vcpu: index,
                source,
            })?;
        }
        Ok(true)
    }

    /// Injects the highest pending interrupt if the guest can take it now, otherwise asks KVM
    /// to exit as soon as it can (the interrupt-window protocol).
    fn prepare_injection(&mut self) -> Result<(), VcpuError> {
        let run = self.fd.get_kvm_run();
        let ready = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
        let mut apic = self.shared.lock_apic();
        let want_window = match apic.has_injectable() {
            None => false,
            Some(_) if ready => {
                let vector = apic.acknowledge();
                let more = apic.has_injectable().is_some();
                drop(apic);
                if let Some(v) = vector {
                    inject_interrupt(&self.fd, v).map_err(|source| VcpuError::Inject {
                        vcpu: self.shared.index,
                        source,
                    })?;
                }
                more
            }
            Some(_) => true,
        };
        self.fd.get_kvm_run().request_interrupt_window = u8::from(want_window);
        Ok(())
    }

    /// `hlt`: sleep until an interrupt the guest can take arrives (or the node stops).
    fn halt(&mut self) {
        let if_flag = self.fd.get_kvm_run().if_flag != 0;
        let mut apic = self.shared.lock_apic();
        self.shared.set_state(RunState::Halted);
        while !self.stopping() {
            if (if_flag && apic.has_injectable().is_some()) || apic.has_pending_event() {
                break;
            }
            apic = self
                .shared
                .wakeup
                .wait(apic)
                .unwrap_or_else(|p| p.into_inner());
        }
        self.shared.set_state(RunState::InVmm);
    }

    fn internal_error(&mut self) -> VcpuError {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the member KVM
        // filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        VcpuError::Internal {
            vcpu: self.shared.index,
            suberror: internal.suberror,
            rip,
            data: internal.data[..n].to_vec(),
        }
    }
}

/// What `spanvm stats` counts an exit (or a failed `KVM_RUN`) as.
fn exit_reason(exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) -> ExitReason {
    match exit {
        Ok(VcpuExit::IoIn(..)) => ExitReason::IoIn,
        Ok(VcpuExit::IoOut(..)) => ExitReason::IoOut,
        Ok(VcpuExit::MmioRead(..)) => ExitReason::MmioRead,
        Ok(VcpuExit::MmioWrite(..)) => ExitReason::MmioWrite,
        Ok(VcpuExit::X86Rdmsr(_)) => ExitReason::MsrRead,
        Ok(VcpuExit::X86Wrmsr(_)) => ExitReason::MsrWrite,
        Ok(VcpuExit::Hlt) => ExitReason::Halt,
        Ok(VcpuExit::IrqWindowOpen) => ExitReason::IrqWindow,
        Ok(VcpuExit::Intr) => ExitReason::Signal,
        Ok(VcpuExit::Shutdown) => ExitReason::Shutdown,
        Ok(VcpuExit::SystemEvent(..)) => ExitReason::SystemEvent,
        Ok(VcpuExit::InternalError) => ExitReason::InternalError,
        Ok(_) => ExitReason::Other,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitReason::Kicked,
        Err(_) => ExitReason::Other,
    }
}

fn in_lapic_window(apic: &LocalApic, addr: u64) -> Option<u64> {
    let base = apic.apic_base() & !0xfff;
    let xapic_enabled = apic.apic_base() & (1 << 11) != 0 && apic.apic_base() & (1 << 10) == 0;
    (xapic_enabled && addr >= base && addr < base + LAPIC_WINDOW).then(|| addr - base)
}

fn mmio_read(shared: &VcpuShared, platform: &Platform, addr: u64, data: &mut [u8]) {
    {
        let mut apic = shared.lock_apic();
        if let Some(offset) = in_lapic_window(&apic, addr) {
            apic.mmio_read(offset, data, tsc::now());
            return;
        }
    }
    platform.mmio_read(shared.index, addr, data);
}

fn mmio_write(shared: &VcpuShared, platform: &Platform, addr: u64, data: &[u8]) {
    let effects = {
        let mut apic = shared.lock_apic();
        in_lapic_window(&apic, addr).map(|offset| apic.mmio_write(offset, data, tsc::now()))
    };
    match effects {
        Some(e) => platform.apply_apic_effects(shared, e),
        None => platform.mmio_write(shared.index, addr, data),
    }
}

/// An MSR read that reached user space; `None` makes the guest take #GP, as KVM would for an
/// MSR it does not know.
fn read_msr(apic: &mut LocalApic, msr: u32) -> Option<u64> {
    match msr {
        MSR_APIC_BASE => Some(apic.apic_base()),
        MSR_TSC_DEADLINE => Some(apic.tsc_deadline()),
        m if X2APIC_MSRS.contains(&m) => apic.msr_read(m, tsc::now()).ok(),
        _ => None,
    }
}

fn write_msr(apic: &mut LocalApic, msr: u32, value: u64) -> Option<devices::apic::ApicEffects> {
    match msr {
        MSR_APIC_BASE => apic.set_apic_base(value).ok(),
        MSR_TSC_DEADLINE => Some(apic.set_tsc_deadline(value, tsc::now())),
        m if X2APIC_MSRS.contains(&m) => apic.msr_write(m, value, tsc::now()).ok(),
        _ => None,
    }
}

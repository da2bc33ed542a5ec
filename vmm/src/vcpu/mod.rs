//! vCPUs: the state other threads see (`VcpuShared`), the exit loop, the APIC timer thread and
//! the kick.

pub mod exit_counters;
pub mod exit_loop;
pub mod kick;
pub mod pvm_repair;
pub mod timer;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use devices::apic::LocalApic;

use crate::vcpu::exit_counters::ExitCounters;

/// Where a vCPU thread is, so that an interrupt sender knows how to wake it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum RunState {
    /// In the VMM (handling an exit): it checks for interrupts before it re-enters.
    InVmm = 0,
    /// In `KVM_RUN` or about to enter it: it must be kicked.
    InGuest = 1,
    /// Halted, waiting on `wakeup`.
    Halted = 2,
}

/// The part of a local vCPU that other threads (senders of IPIs, the timer, devices) touch.
pub struct VcpuShared {
    /// Global vCPU index (= APIC ID).
    pub index: usize,
    /// Its local APIC.
    pub apic: Mutex<LocalApic>,
    /// Signalled when an interrupt arrives for a halted vCPU (used with `apic`).
    pub wakeup: Condvar,
    /// Signalled when the APIC timer is re-programmed (used with `apic` by the timer thread).
    pub timer_changed: Condvar,
    /// Why the vCPU left the guest, by reason (written by its thread, read by `spanvm stats`).
    pub exits: ExitCounters,
    state: AtomicU8,
    thread: OnceLock<libc::pthread_t>,
    finished: AtomicBool,
}

impl VcpuShared {
    /// A vCPU with a power-on APIC.
    pub fn new(index: usize, tsc_khz: u32) -> Self {
        Self {
            index,
            apic: Mutex::new(LocalApic::new(
                u32::try_from(index).expect("vCPU indices come from u32 vCPU ids"),
                index == 0,
                tsc_khz,
            )),
            wakeup: Condvar::new(),
            timer_changed: Condvar::new(),
            exits: ExitCounters::default(),
            state: AtomicU8::new(RunState::InVmm as u8),
            thread: OnceLock::new(),
            finished: AtomicBool::new(false),
        }
    }

    /// Locks the APIC (a poisoned lock means a vCPU thread panicked; the state is still the
    /// best we have, and the node is stopping anyway).
    pub fn lock_apic(&self) -> MutexGuard<'_, LocalApic> {
        self.apic.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_state(&self, s: RunState) {
        self.state.store(s as u8, Ordering::SeqCst);
    }

    pub(crate) fn set_thread(&self, t: libc::pthread_t) {
        let _ = self.thread.set(t);
    }

    /// Makes the vCPU look at its APIC soon: wakes it if halted, kicks it out of the guest if
    /// running. Call after changing the APIC (with its lock released).
    pub fn notify(&self) {
        self.wakeup.notify_all();
        // Paired with the SeqCst store of InGuest before the vCPU's last look at its APIC: either
        // it saw our change, or we see InGuest here and kick.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.state.load(Ordering::SeqCst) == RunState::InGuest as u8 {
            if let Some(&t) = self.thread.get() {
                kick::kick(t);
            }
        }
    }

    /// Marks the probe on this vCPU as finished: its thread stops running it.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Whether [`finish`](Self::finish) was called.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }
}

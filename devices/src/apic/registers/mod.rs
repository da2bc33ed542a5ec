//! The APIC register file, shared by the xAPIC MMIO page and the x2APIC MSRs: which
//! register an offset names, and the read/write semantics both modes have in common. The
//! mode-specific rules (what exists, what is read-only, reserved bits) live in `xapic` and
//! `x2apic`.

mod x2apic;
mod xapic;

pub use x2apic::{X2APIC_MSR_FIRST, X2APIC_MSR_LAST};

use super::delivery::icr::{self, IcrCommand};
use super::delivery::receive::ESR_SEND_ILLEGAL_VECTOR;
use super::lvt::Lvt;
use super::{ApicEffects, LocalApic};
use crate::interrupt::InterruptMessage;

/// The version register: version 0x14 (integrated APIC), max LVT entry 6 (CMCI present),
/// no EOI-broadcast suppression (bit 24 clear).
pub(crate) const APIC_VERSION: u32 = 0x0006_0014;
/// SVR bits the guest can write: spurious vector, software enable, focus checking.
pub(crate) const SVR_WRITABLE: u32 = 0x3FF;
/// Bits of the TPR.
const TPR_WRITABLE: u32 = 0xFF;

/// A register of the APIC, by its index (xAPIC offset / 16, x2APIC MSR - 0x800).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApicRegister {
    Id,
    Version,
    Tpr,
    Apr,
    Ppr,
    Eoi,
    Rrd,
    Ldr,
    Dfr,
    Svr,
    /// In-service register, 32 vectors per word.
    Isr(usize),
    /// Trigger-mode register, 32 vectors per word.
    Tmr(usize),
    /// Interrupt-request register, 32 vectors per word.
    Irr(usize),
    Esr,
    Lvt(Lvt),
    IcrLow,
    IcrHigh,
    InitialCount,
    CurrentCount,
    DivideConfig,
    SelfIpi,
}

impl ApicRegister {
    /// The register at `index` (0..=0x3F), or `None` for a reserved index.
    pub(crate) fn from_index(index: u32) -> Option<Self> {
        Some(match index {
            0x02 => Self::Id,
            0x03 => Self::Version,
            0x08 => Self::Tpr,
            0x09 => Self::Apr,
            0x0A => Self::Ppr,
            0x0B => Self::Eoi,
            0x0C => Self::Rrd,
            0x0D => Self::Ldr,
            0x0E => Self::Dfr,
            0x0F => Self::Svr,
            0x10..=0x17 => Self::Isr((index - 0x10) as usize),
            0x18..=0x1F => Self::Tmr((index - 0x18) as usize),
            0x20..=0x27 => Self::Irr((index - 0x20) as usize),
            0x28 => Self::Esr,
            0x2F => Self::Lvt(Lvt::Cmci),
            0x30 => Self::IcrLow,
            0x31 => Self::IcrHigh,
            0x32 => Self::Lvt(Lvt::Timer),
            0x33 => Self::Lvt(Lvt::Thermal),
            0x34 => Self::Lvt(Lvt::Perf),
            0x35 => Self::Lvt(Lvt::Lint0),
            0x36 => Self::Lvt(Lvt::Lint1),
            0x37 => Self::Lvt(Lvt::Error),
            0x38 => Self::InitialCount,
            0x39 => Self::CurrentCount,
            0x3E => Self::DivideConfig,
            0x3F => Self::SelfIpi,
            _ => return None,
        })
    }
}

impl LocalApic {
    /// A register's value as both modes read it (write-only registers read 0; ICR high is the
    /// stored half, the ID and LDR follow the current mode).
    fn read_register(&self, register: ApicRegister, now_tsc: u64) -> u32 {
        match register {
            ApicRegister::Id if self.x2apic_mode() => self.initial_apic_id,
            ApicRegister::Id => self.xapic_id_register,
            ApicRegister::Version => APIC_VERSION,
            ApicRegister::Tpr => u32::from(self.tpr),
            ApicRegister::Ppr => u32::from(self.ppr()),
            ApicRegister::Apr | ApicRegister::Eoi | ApicRegister::Rrd | ApicRegister::SelfIpi => 0,
            ApicRegister::Ldr => self.ldr_value(),
            ApicRegister::Dfr => self.dfr,
            ApicRegister::Svr => self.svr,
            ApicRegister::Isr(word) => self.isr.word(word),
            ApicRegister::Tmr(word) => self.tmr.word(word),
            ApicRegister::Irr(word) => self.irr.word(word),
            ApicRegister::Esr => self.esr,
            ApicRegister::Lvt(entry) => self.lvt[entry.index()],
            ApicRegister::IcrLow => self.icr_low,
            ApicRegister::IcrHigh => self.icr_high,
            ApicRegister::InitialCount => self.timer.initial_count(),
            ApicRegister::CurrentCount => self.timer.current_count(now_tsc),
            ApicRegister::DivideConfig => self.timer.divide_config(),
        }
    }

    /// A write with the same meaning in both modes. Registers whose write is mode-specific
    /// (ID, LDR, DFR, ICR, SELF IPI) and read-only registers are the callers' to handle and
    /// are ignored here.
    fn write_register(&mut self, register: ApicRegister, value: u32, now_tsc: u64) -> ApicEffects {
        let mut effects = ApicEffects::default();
        match register {
            ApicRegister::Tpr => self.tpr = (value & TPR_WRITABLE) as u8,
            ApicRegister::Eoi => effects.eoi = self.end_of_interrupt(),
            ApicRegister::Svr => effects = self.write_svr(value),
            ApicRegister::Esr => {
                // Write-then-read: the write latches the errors seen since the last write.
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            ApicRegister::Lvt(entry) => effects = self.write_lvt(entry, value),
            ApicRegister::InitialCount => {
                effects.timer_changed = self.timer.set_initial_count(value, now_tsc);
            }
            ApicRegister::DivideConfig => {
                effects.timer_changed = self.timer.set_divide_config(value, now_tsc);
            }
            _ => {}
        }
        effects
    }

    /// Stores the ICR and turns it into the IPI to send (if any). `destination` is in the
    /// sender's format.
    fn send_icr(&mut self, low: u32, destination: u32) -> Option<InterruptMessage> {
        self.icr_low = low & icr::ICR_LOW_WRITABLE;
        match icr::decode(self.icr_low, destination) {
            IcrCommand::Send(msg) => Some(msg),
            IcrCommand::IllegalVector => {
                self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
                None
            }
            IcrCommand::Nothing => None,
        }
    }
}

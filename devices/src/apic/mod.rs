//! The local APIC of one vCPU, emulated in user space: xAPIC (MMIO) and x2APIC (MSR)
//! register access, interrupt acceptance and priority, IPIs and the timer.
//!
//! Pure logic: no KVM, no threads, no clock. The VMM calls in on every APIC exit, with the
//! guest TSC for anything that depends on time, and acts on the returned [`ApicEffects`]
//! (send an IPI, tell the IOAPIC about a level EOI, re-arm its host timer, broadcast the new
//! addressing state). Any call may make an interrupt injectable (an LVT error interrupt, an
//! EOI that lowers the priority), so the VMM asks [`LocalApic::has_injectable`] before every
//! entry into the guest.
//!
//! Not modelled, because no node knows another node's APIC state: the focus processor
//! (SVR bit 9 is stored only), arbitration priority (APR reads 0) and remote read (RRD reads
//! 0). EOI-broadcast suppression is not advertised (version bit 24 clear), so SVR bit 12 is
//! reserved.

mod base;
pub(crate) mod delivery;
mod error;
mod lvt;
mod registers;
mod timer;
mod vectors;

#[cfg(test)]
mod tests;

pub use delivery::receive::{Accepted, DiscardReason};
pub use error::ApicError;
pub use registers::{X2APIC_MSR_FIRST, X2APIC_MSR_LAST};

/// IA32_APIC_BASE, handled by [`LocalApic::apic_base`] and [`LocalApic::set_apic_base`].
pub const MSR_IA32_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE, handled by [`LocalApic::tsc_deadline`] and
/// [`LocalApic::set_tsc_deadline`].
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6E0;

use crate::bits::low_u8;
use crate::interrupt::{ApicAddressing, InterruptMessage};
use lvt::{Lvt, LVT_COUNT, LVT_MASKED, LVT_RESET};
use timer::ApicTimer;
use vectors::VectorSet;

/// SVR bit 8: the APIC is software-enabled.
const SVR_APIC_ENABLED: u32 = 1 << 8;
/// SVR after reset: spurious vector 0xFF, software-disabled.
const SVR_RESET: u32 = 0xFF;
/// DFR after reset: flat model.
const DFR_RESET: u32 = 0xFFFF_FFFF;

/// What a guest access to the APIC asks of the VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApicEffects {
    /// An IPI to route (from an ICR or SELF IPI write); run it through
    /// [`crate::interrupt::destination_set`] with this vCPU as the source.
    pub ipi: Option<InterruptMessage>,
    /// An interrupt retired by an EOI write.
    pub eoi: Option<EoiEffect>,
    /// [`LocalApic::timer_deadline`] may have changed: re-read it and re-arm the host timer.
    pub timer_changed: bool,
    /// [`LocalApic::addressing`] may have changed: update the replicas on every node.
    pub addressing_changed: bool,
}

/// The interrupt an EOI retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EoiEffect {
    /// The vector whose ISR bit was cleared.
    pub vector: u8,
    /// Its TMR bit was set (level-triggered): pass the EOI to the IOAPIC so it clears Remote IRR.
    pub level: bool,
}

/// The local APIC of one vCPU.
#[derive(Debug, Clone)]
pub struct LocalApic {
    /// The hardware (CPUID) APIC ID: the x2APIC ID, and the xAPIC ID after reset.
    initial_apic_id: u32,
    /// IA32_APIC_BASE as the guest reads it.
    base: u64,
    /// xAPIC ID register, bits 31:24 meaningful.
    xapic_id_register: u32,
    tpr: u8,
    /// xAPIC LDR, bits 31:24 meaningful (x2APIC mode derives it from the ID).
    ldr: u32,
    dfr: u32,
    svr: u32,
    irr: VectorSet,
    isr: VectorSet,
    tmr: VectorSet,
    /// ESR as the guest reads it (latched by the last ESR write).
    esr: u32,
    /// Errors detected since the last ESR write.
    esr_pending: u32,
    lvt: [u32; LVT_COUNT],
    icr_low: u32,
    /// ICR high half: bits 31:24 in xAPIC mode, the 32-bit destination in x2APIC mode.
    icr_high: u32,
    timer: ApicTimer,
    pending_nmi: bool,
    pending_init: bool,
    pending_sipi: Option<u8>,
    pending_extint: bool,
    pending_smi: bool,
}

impl LocalApic {
    /// Where the xAPIC register page sits after reset.
    pub const DEFAULT_BASE: u64 = 0xFEE0_0000;

    /// A local APIC in its power-on state: xAPIC mode and globally enabled through
    /// IA32_APIC_BASE, software-disabled (SVR 0xFF), every LVT entry masked. `tsc_khz` is the
    /// guest TSC rate that converts the 1 GHz APIC bus clock to TSC ticks (0 is taken as 1).
    pub fn new(apic_id: u32, bsp: bool, tsc_khz: u32) -> Self {
        let mut apic = Self {
            initial_apic_id: apic_id,
            base: Self::DEFAULT_BASE | base::BASE_ENABLE | if bsp { base::BASE_BSP } else { 0 },
            xapic_id_register: 0,
            tpr: 0,
            ldr: 0,
            dfr: DFR_RESET,
            svr: SVR_RESET,
            irr: VectorSet::default(),
            isr: VectorSet::default(),
            tmr: VectorSet::default(),
            esr: 0,
            esr_pending: 0,
            lvt: [LVT_RESET; LVT_COUNT],
            icr_low: 0,
            icr_high: 0,
            timer: ApicTimer::new(tsc_khz),
            pending_nmi: false,
            pending_init: false,
            pending_sipi: None,
            pending_extint: false,
            pending_smi: false,
        };
        apic.power_on_reset();
        apic
    }

    /// The addressing state other nodes need to route messages to this APIC.
    pub fn addressing(&self) -> ApicAddressing {
        let globally_enabled = self.globally_enabled();
        ApicAddressing {
            apic_id: self.apic_id(),
            enabled: globally_enabled && self.software_enabled(),
            globally_enabled,
            x2apic: self.x2apic_mode(),
            ldr: self.ldr_value(),
            dfr: self.dfr,
        }
    }

    /// The ID the APIC answers to now: the 8-bit xAPIC ID register, or the x2APIC ID.
    pub fn apic_id(&self) -> u32 {
        if self.x2apic_mode() {
            self.initial_apic_id
        } else {
            self.xapic_id_register >> 24
        }
    }

    /// Whether the APIC is in x2APIC mode (IA32_APIC_BASE bits 10 and 11).
    pub fn x2apic_mode(&self) -> bool {
        self.base & base::BASE_EXTD != 0
    }

    /// Whether IA32_APIC_BASE's global enable is set.
    pub fn globally_enabled(&self) -> bool {
        self.base & base::BASE_ENABLE != 0
    }

    /// Whether SVR's software enable is set.
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_APIC_ENABLED != 0
    }

    /// The task priority as CR8 shows it (TPR bits 7:4), for the VMM's `kvm_run.cr8` sync.
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// Sets TPR from a guest CR8 write (CR8 bits 3:0 become TPR bits 7:4).
    pub fn set_cr8(&mut self, cr8: u64) {
        self.tpr = low_u8((cr8 & 0xF) << 4);
    }

    /// INIT: the SDM's INIT reset state (10.4.7.3): every register as after power-on except
    /// the APIC ID and IA32_APIC_BASE (the mode is kept). A SIPI that is already pending
    /// stays pending; NMI, SMI and ExtINT requests are dropped. The timer stops and the
    /// addressing returns to its reset values, as the returned effects say.
    pub fn reset_init(&mut self) -> ApicEffects {
        self.reset_registers();
        self.pending_nmi = false;
        self.pending_smi = false;
        self.pending_extint = false;
        ApicEffects {
            timer_changed: true,
            addressing_changed: true,
            ..ApicEffects::default()
        }
    }

    /// Power-on (and global-disable) reset: every register, the ID and the pending requests.
    fn power_on_reset(&mut self) {
        self.xapic_id_register = (self.initial_apic_id & 0xFF) << 24;
        self.reset_registers();
        self.pending_nmi = false;
        self.pending_init = false;
        self.pending_sipi = None;
        self.pending_extint = false;
        self.pending_smi = false;
    }

    /// The registers INIT and power-on reset alike (SDM 10.4.7.1).
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = DFR_RESET;
        self.svr = SVR_RESET;
        self.irr = VectorSet::default();
        self.isr = VectorSet::default();
        self.tmr = VectorSet::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.lvt = [LVT_RESET; LVT_COUNT];
        self.icr_low = 0;
        self.icr_high = 0;
        self.timer.reset();
    }

    /// The LDR value: the register in xAPIC mode, derived from the ID in x2APIC mode
    /// (cluster = ID[31:4] in bits 31:16, one bit for ID[3:0] in bits 15:0).
    fn ldr_value(&self) -> u32 {
        if self.x2apic_mode() {
            let id = self.initial_apic_id;
            (id >> 4) << 16 | 1 << (id & 0xF)
        } else {
            self.ldr
        }
    }

    /// Writes SVR; clearing the software enable masks every LVT entry (SDM 10.4.7.2).
    fn write_svr(&mut self, value: u32) -> ApicEffects {
        let was_enabled = self.software_enabled();
        self.svr = value & registers::SVR_WRITABLE;
        if !self.software_enabled() {
            for entry in &mut self.lvt {
                *entry |= LVT_MASKED;
            }
        }
        ApicEffects {
            addressing_changed: was_enabled != self.software_enabled(),
            ..ApicEffects::default()
        }
    }

    /// Writes one LVT entry; while software-disabled the mask bit cannot be cleared.
    fn write_lvt(&mut self, entry: Lvt, value: u32) -> ApicEffects {
        let mut value = value & entry.writable();
        if !self.software_enabled() {
            value |= LVT_MASKED;
        }
        self.lvt[entry.index()] = value;
        let timer_changed =
            entry == Lvt::Timer && self.timer.set_mode(timer::TimerMode::from_lvt(value));
        ApicEffects {
            timer_changed,
            ..ApicEffects::default()
        }
    }
}

//! The receiving side of a local APIC: acceptance into IRR, priority (TPR, PPR), the
//! IRR -> ISR hand-over at injection, EOI, and the non-vectored requests (NMI, INIT, SIPI,
//! SMI, ExtINT) the VMM picks up.

use super::super::lvt::{Lvt, LVT_MASKED};
use super::super::{EoiEffect, LocalApic};
use crate::bits::low_u8;
use crate::interrupt::{DeliveryMode, InterruptMessage, TriggerMode};

/// ESR bit 5: this APIC tried to send a message with an illegal vector.
pub(crate) const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: this APIC received (or raised locally) an illegal vector.
pub(crate) const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit 7: the guest accessed a reserved register.
pub(crate) const ESR_ILLEGAL_REGISTER_ADDRESS: u32 = 1 << 7;

/// What [`LocalApic::accept`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The vector is pending in IRR; `coalesced` when it already was (the two merged, as on
    /// real hardware). Check [`LocalApic::has_injectable`] and kick the vCPU.
    Irr {
        /// The vector set in IRR.
        vector: u8,
        /// IRR already held this vector.
        coalesced: bool,
    },
    /// An NMI is pending: [`LocalApic::take_nmi`].
    Nmi,
    /// An INIT is pending: [`LocalApic::take_init`]; any earlier SIPI was dropped.
    Init,
    /// A start-up IPI is pending: [`LocalApic::take_sipi`].
    StartUp {
        /// The start page (the vCPU starts at `vector << 12`).
        vector: u8,
    },
    /// An SMI is pending: [`LocalApic::take_smi`].
    Smi,
    /// An ExtINT is pending: [`LocalApic::take_extint`]; its vector comes from an
    /// 8259-compatible controller, which the VMM owns (or lacks).
    ExtInt,
    /// The message had no effect.
    Discarded(DiscardReason),
}

/// Why a message had no effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardReason {
    /// IA32_APIC_BASE's global enable is clear: the APIC takes nothing.
    GloballyDisabled,
    /// SVR's software enable is clear: only NMI, SMI, INIT and SIPI are taken.
    SoftwareDisabled,
    /// A Fixed or LowestPriority vector below 16; logged in ESR as "received illegal vector".
    IllegalVector,
    /// The obsolete INIT level de-assert, which modern processors ignore.
    InitDeassert,
}

impl LocalApic {
    /// Takes a message that [`crate::interrupt::destination_set`] routed to this APIC.
    /// Fixed and LowestPriority set IRR, and set TMR for level-triggered messages (clear it for
    /// edge); the other modes become pending requests for the VMM.
    pub fn accept(&mut self, msg: &InterruptMessage) -> Accepted {
        if !self.globally_enabled() {
            return Accepted::Discarded(DiscardReason::GloballyDisabled);
        }
        match msg.delivery {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if !self.software_enabled() {
                    return Accepted::Discarded(DiscardReason::SoftwareDisabled);
                }
                if msg.vector < 16 {
                    self.raise_error(ESR_RECEIVE_ILLEGAL_VECTOR);
                    return Accepted::Discarded(DiscardReason::IllegalVector);
                }
                let coalesced = self.irr.insert(msg.vector);
                self.tmr
                    .assign(msg.vector, msg.trigger == TriggerMode::Level);
                Accepted::Irr {
                    vector: msg.vector,
                    coalesced,
                }
            }
            DeliveryMode::Nmi => {
                self.pending_nmi = true;
                Accepted::Nmi
            }
            DeliveryMode::Init => {
                if msg.trigger == TriggerMode::Level && !msg.level_assert {
                    return Accepted::Discarded(DiscardReason::InitDeassert);
                }
                self.pending_init = true;
                self.pending_sipi = None;
                Accepted::Init
            }
            DeliveryMode::StartUp => {
                self.pending_sipi = Some(msg.vector);
                Accepted::StartUp { vector: msg.vector }
            }
            DeliveryMode::Smi => {
                self.pending_smi = true;
                Accepted::Smi
            }
            DeliveryMode::ExtInt => {
                if !self.software_enabled() {
                    return Accepted::Discarded(DiscardReason::SoftwareDisabled);
                }
                self.pending_extint = true;
                Accepted::ExtInt
            }
        }
    }

    /// The processor priority (SDM 10.8.3.1): TPR if its class is at least that of the
    /// highest in-service vector, else that vector's class.
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// The task priority register (bits 7:0).
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// The highest pending vector whose priority class is above the PPR's class, if the APIC
    /// is globally enabled. A software-disabled APIC still delivers what it held in IRR
    /// when it was disabled (SDM 10.4.7.2: pending interrupts are held and need handling).
    pub fn has_injectable(&self) -> Option<u8> {
        if !self.globally_enabled() {
            return None;
        }
        let vector = self.irr.highest()?;
        (vector >> 4 > self.ppr() >> 4).then_some(vector)
    }

    /// Moves the vector the VMM is about to inject (KVM_INTERRUPT) from IRR to ISR, which
    /// raises PPR; `None` if nothing is injectable.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.has_injectable()?;
        self.irr.remove(vector);
        self.isr.insert(vector);
        Some(vector)
    }

    /// An EOI write: retires the highest in-service vector and reports whether it was
    /// level-triggered. `None` when nothing was in service.
    pub(crate) fn end_of_interrupt(&mut self) -> Option<EoiEffect> {
        let vector = self.isr.highest()?;
        self.isr.remove(vector);
        Some(EoiEffect {
            vector,
            level: self.tmr.contains(vector),
        })
    }

    /// Whether an NMI, INIT or SIPI waits to be taken: a halted or waiting vCPU must wake for
    /// them even with no injectable vector.
    pub fn has_pending_event(&self) -> bool {
        self.pending_nmi || self.pending_init || self.pending_sipi.is_some()
    }

    /// Takes the pending NMI request.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.pending_nmi)
    }

    /// Takes the pending INIT request; the VMM then calls [`LocalApic::reset_init`] and puts
    /// the vCPU in wait-for-SIPI (an INIT to the BSP is the VMM's to interpret).
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.pending_init)
    }

    /// Takes the pending SIPI's start page. A SIPI only counts in wait-for-SIPI state: the
    /// VMM drops one it takes while the vCPU runs (Linux sends two, the second usually lands
    /// on a running AP).
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.pending_sipi.take()
    }

    /// Takes the pending SMI request.
    pub fn take_smi(&mut self) -> bool {
        std::mem::take(&mut self.pending_smi)
    }

    /// Takes the pending ExtINT request.
    pub fn take_extint(&mut self) -> bool {
        std::mem::take(&mut self.pending_extint)
    }

    /// Logs `bits` in the ESR and raises the LVT error interrupt if it is unmasked.
    pub(crate) fn raise_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let entry = self.lvt[Lvt::Error.index()];
        if entry & LVT_MASKED == 0 {
            let vector = low_u8(u64::from(entry));
            if vector < 16 {
                // Not re-raised: an illegal error vector would loop forever.
                self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            } else {
                self.irr.insert(vector);
                self.tmr.remove(vector);
            }
        }
    }

    /// Raises a local (LVT) edge-triggered interrupt with the entry's vector unless masked;
    /// returns whether the vector went into IRR.
    pub(crate) fn raise_lvt(&mut self, entry: Lvt) -> bool {
        let value = self.lvt[entry.index()];
        if value & LVT_MASKED != 0 {
            return false;
        }
        let vector = low_u8(u64::from(value));
        if vector < 16 {
            self.raise_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        self.irr.insert(vector);
        self.tmr.remove(vector);
        true
    }
}

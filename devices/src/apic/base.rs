//! IA32_APIC_BASE (MSR 0x1B): the register page address, the BSP flag and the APIC mode,
//! with the mode transitions of SDM 10.12.5 (figure "Local x2APIC State Transitions").

use super::{ApicEffects, ApicError, LocalApic};

/// Bit 8: this processor is the bootstrap processor.
pub(super) const BASE_BSP: u64 = 1 << 8;
/// Bit 10: x2APIC mode (EXTD).
pub(super) const BASE_EXTD: u64 = 1 << 10;
/// Bit 11: the APIC is globally enabled (EN).
pub(super) const BASE_ENABLE: u64 = 1 << 11;
/// Bits 51:12: the page address. The guest's MAXPHYADDR is not known here, so the
/// architectural maximum of 52 bits is allowed.
const BASE_ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
const BASE_RESERVED: u64 = !(BASE_ADDRESS | BASE_BSP | BASE_EXTD | BASE_ENABLE);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApicMode {
    Disabled,
    XApic,
    X2Apic,
    Invalid,
}

impl ApicMode {
    fn of(base: u64) -> Self {
        match (base & BASE_ENABLE != 0, base & BASE_EXTD != 0) {
            (false, false) => Self::Disabled,
            (true, false) => Self::XApic,
            (true, true) => Self::X2Apic,
            (false, true) => Self::Invalid,
        }
    }
}

impl LocalApic {
    /// The IA32_APIC_BASE value: page address, BSP (bit 8), EXTD (bit 10), EN (bit 11).
    pub fn apic_base(&self) -> u64 {
        self.base
    }

    /// The guest-physical address of the xAPIC register page (meaningful in xAPIC mode).
    pub fn mmio_base(&self) -> u64 {
        self.base & BASE_ADDRESS
    }

    /// A guest WRMSR to IA32_APIC_BASE. Only the transitions the SDM allows succeed:
    /// disabled <-> xAPIC, xAPIC -> x2APIC, x2APIC -> disabled. Leaving the enabled state
    /// resets the APIC to its power-on state (so disabling and re-enabling gives a fresh APIC);
    /// entering x2APIC mode keeps the registers and switches the ID and LDR to their x2APIC
    /// values. Any error is a #GP(0) for the guest and changes nothing.
    pub fn set_apic_base(&mut self, value: u64) -> Result<ApicEffects, ApicError> {
        let reserved = value & BASE_RESERVED;
        if reserved != 0 {
            return Err(ApicError::BaseReservedBits { value, reserved });
        }
        let old = ApicMode::of(self.base);
        let new = ApicMode::of(value);
        match (old, new) {
            (_, ApicMode::Invalid) => return Err(ApicError::BaseInvalidMode { value }),
            (ApicMode::X2Apic, ApicMode::XApic) => return Err(ApicError::X2apicToXapic { value }),
            (ApicMode::Disabled, ApicMode::X2Apic) => {
                return Err(ApicError::DisabledToX2apic { value })
            }
            _ => {}
        }
        self.base = value;
        if old == new {
            return Ok(ApicEffects::default());
        }
        let timer_changed = new == ApicMode::Disabled;
        if timer_changed {
            self.power_on_reset();
        }
        Ok(ApicEffects {
            timer_changed,
            addressing_changed: true,
            ..ApicEffects::default()
        })
    }
}

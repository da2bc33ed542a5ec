//! x2APIC mode: the registers as MSRs 0x800..=0x8FF (SDM 10.12.1). Unlike the MMIO page,
//! every misuse is a #GP: access outside x2APIC mode, registers x2APIC does not have (APR,
//! RRD, DFR, ICR high, reserved slots), reads of write-only and writes of read-only
//! registers, and non-zero reserved bits (SDM 10.12.1.3; bits 63:32 are reserved everywhere
//! but in the 64-bit ICR).

use super::super::{ApicEffects, ApicError, LocalApic};
use super::{ApicRegister, SVR_WRITABLE, TPR_WRITABLE};
use crate::apic::delivery::icr::ICR_LOW_WRITABLE;
use crate::apic::delivery::receive::ESR_SEND_ILLEGAL_VECTOR;
use crate::apic::timer::DIVIDE_CONFIG_WRITABLE;
use crate::bits::{low_u32, low_u8};
use crate::interrupt::{InterruptMessage, Shorthand};

/// The first x2APIC MSR; register index = MSR - this.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
/// The last MSR of the x2APIC range.
pub const X2APIC_MSR_LAST: u32 = 0x8FF;
/// The ICR as one 64-bit MSR: low half as in xAPIC without delivery status, destination in
/// bits 63:32.
const ICR_WRITABLE: u64 = (u32::MAX as u64) << 32 | ICR_LOW_WRITABLE as u64;
/// SELF IPI: only the vector.
const SELF_IPI_WRITABLE: u32 = 0xFF;

impl LocalApic {
    /// A guest RDMSR of an x2APIC register. The ICR reads as one 64-bit value; everything else
    /// is 32 bits wide.
    pub fn msr_read(&mut self, msr: u32, now_tsc: u64) -> Result<u64, ApicError> {
        let register = self.x2apic_register(msr)?;
        match register {
            ApicRegister::Eoi | ApicRegister::SelfIpi => Err(ApicError::WriteOnly { msr }),
            ApicRegister::IcrLow => Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low)),
            register => Ok(u64::from(self.read_register(register, now_tsc))),
        }
    }

    /// A guest WRMSR of an x2APIC register. Writing the ICR (0x830) sends an IPI to the 32-bit
    /// destination in bits 63:32; writing SELF IPI (0x83F) sends a fixed IPI to this APIC.
    /// Both come back in [`ApicEffects::ipi`].
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now_tsc: u64,
    ) -> Result<ApicEffects, ApicError> {
        let register = self.x2apic_register(msr)?;
        let check = |writable: u64| {
            let reserved = value & !writable;
            if reserved == 0 {
                Ok(value)
            } else {
                Err(ApicError::ReservedBits {
                    msr,
                    value,
                    reserved,
                })
            }
        };
        let value32 = |writable: u32| check(u64::from(writable)).map(low_u32);
        let mut effects = ApicEffects::default();
        match register {
            ApicRegister::Id
            | ApicRegister::Version
            | ApicRegister::Ppr
            | ApicRegister::Ldr
            | ApicRegister::Isr(_)
            | ApicRegister::Tmr(_)
            | ApicRegister::Irr(_)
            | ApicRegister::CurrentCount => return Err(ApicError::ReadOnly { msr }),
            ApicRegister::IcrLow => {
                let value = check(ICR_WRITABLE)?;
                self.icr_high = (value >> 32) as u32;
                effects.ipi = self.send_icr(low_u32(value), self.icr_high);
            }
            ApicRegister::SelfIpi => {
                let vector = low_u8(u64::from(value32(SELF_IPI_WRITABLE)?));
                if vector < 16 {
                    self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
                } else {
                    effects.ipi = Some(InterruptMessage {
                        shorthand: Shorthand::SelfOnly,
                        ..InterruptMessage::fixed(vector, self.initial_apic_id)
                    });
                }
            }
            ApicRegister::Tpr => {
                effects = self.write_register(register, value32(TPR_WRITABLE)?, now_tsc);
            }
            ApicRegister::Eoi | ApicRegister::Esr => {
                effects = self.write_register(register, value32(0)?, now_tsc);
            }
            ApicRegister::Svr => {
                effects = self.write_register(register, value32(SVR_WRITABLE)?, now_tsc);
            }
            ApicRegister::Lvt(entry) => {
                let allowed = entry.writable() | entry.read_only();
                effects = self.write_register(register, value32(allowed)?, now_tsc);
            }
            ApicRegister::InitialCount => {
                effects = self.write_register(register, value32(u32::MAX)?, now_tsc);
            }
            ApicRegister::DivideConfig => {
                effects = self.write_register(register, value32(DIVIDE_CONFIG_WRITABLE)?, now_tsc);
            }
            // x2apic_register already rejected these; kept as a #GP rather than a panic.
            ApicRegister::Apr | ApicRegister::Rrd | ApicRegister::Dfr | ApicRegister::IcrHigh => {
                return Err(ApicError::ReservedRegister { msr })
            }
        }
        Ok(effects)
    }

    /// The register an x2APIC MSR names, or why the access is a #GP.
    fn x2apic_register(&self, msr: u32) -> Result<ApicRegister, ApicError> {
        if !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(ApicError::ReservedRegister { msr });
        }
        if !self.x2apic_mode() {
            return Err(ApicError::NotX2apicMode { msr });
        }
        match ApicRegister::from_index(msr - X2APIC_MSR_FIRST) {
            None
            | Some(ApicRegister::Apr)
            | Some(ApicRegister::Rrd)
            | Some(ApicRegister::Dfr)
            | Some(ApicRegister::IcrHigh) => Err(ApicError::ReservedRegister { msr }),
            Some(register) => Ok(register),
        }
    }
}

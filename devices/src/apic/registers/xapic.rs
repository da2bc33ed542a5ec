//! xAPIC mode: the 4 KiB register page at IA32_APIC_BASE, one 32-bit register at the start of
//! each 16-byte slot (SDM 10.4.1).
//!
//! Access sizes, as KVM answers them (and as a guest that works on KVM expects):
//! - reads of 1, 2 or 4 bytes that stay inside the first 4 bytes of a slot return those bytes
//!   of the register (little-endian); any other read (bytes 4..15 of a slot, 8-byte or
//!   crossing accesses, offsets past 0x3FF) returns zeros;
//! - writes must be 4 bytes at a slot start; any other write is ignored;
//! - a read or write of a reserved slot in 0x000..=0x3F0 logs "illegal register address" in
//!   ESR (bit 7), as the SDM describes and QEMU does;
//! - writes to read-only registers are ignored;
//! - while the APIC is globally disabled or in x2APIC mode the page is not the APIC: reads
//!   return all ones, writes are ignored (KVM's "MMIO hole").

use super::super::delivery::icr::ICR_HIGH_XAPIC_WRITABLE;
use super::super::delivery::receive::ESR_ILLEGAL_REGISTER_ADDRESS;
use super::super::{ApicEffects, LocalApic};
use super::ApicRegister;
use crate::bits::low_u32;

/// The xAPIC registers occupy 0x000..=0x3FF; the rest of the page reads zero.
const REGISTER_AREA_END: u64 = 0x400;
/// LDR: logical APIC ID in bits 31:24.
const LDR_WRITABLE: u32 = 0xFF00_0000;
/// DFR: model in bits 31:28; bits 27:0 read as ones.
const DFR_MODEL: u32 = 0xF000_0000;
/// ID register: APIC ID in bits 31:24.
const ID_WRITABLE: u32 = 0xFF00_0000;

impl LocalApic {
    /// A guest read of the xAPIC page at `offset` (from the page start) into `data`
    /// (its length is the access size). See the module doc for odd sizes and offsets.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now_tsc: u64) {
        if !self.globally_enabled() || self.x2apic_mode() {
            data.fill(0xFF);
            return;
        }
        data.fill(0);
        let byte = (offset & 0xF) as usize;
        if !matches!(data.len(), 1 | 2 | 4) || byte + data.len() > 4 || offset >= REGISTER_AREA_END
        {
            return;
        }
        let register = match ApicRegister::from_index(low_u32(offset >> 4)) {
            Some(ApicRegister::SelfIpi) | None => {
                self.raise_error(ESR_ILLEGAL_REGISTER_ADDRESS);
                return;
            }
            Some(register) => register,
        };
        let value = self.read_register(register, now_tsc).to_le_bytes();
        data.copy_from_slice(&value[byte..byte + data.len()]);
    }

    /// A guest write of the xAPIC page at `offset`. Writing ICR low sends the IPI
    /// (returned in [`ApicEffects::ipi`]) to the destination in ICR high bits 31:24.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_tsc: u64) -> ApicEffects {
        let mut effects = ApicEffects::default();
        if !self.globally_enabled() || self.x2apic_mode() {
            return effects;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return effects;
        };
        if offset & 0xF != 0 || offset >= REGISTER_AREA_END {
            return effects;
        }
        let value = u32::from_le_bytes(bytes);
        match ApicRegister::from_index(low_u32(offset >> 4)) {
            Some(ApicRegister::SelfIpi) | None => {
                self.raise_error(ESR_ILLEGAL_REGISTER_ADDRESS);
            }
            Some(ApicRegister::Id) => {
                let old = self.xapic_id_register;
                self.xapic_id_register = value & ID_WRITABLE;
                effects.addressing_changed = old != self.xapic_id_register;
            }
            Some(ApicRegister::Ldr) => {
                let old = self.ldr;
                self.ldr = value & LDR_WRITABLE;
                effects.addressing_changed = old != self.ldr;
            }
            Some(ApicRegister::Dfr) => {
                let old = self.dfr;
                self.dfr = value & DFR_MODEL | !DFR_MODEL;
                effects.addressing_changed = old != self.dfr;
            }
            Some(ApicRegister::IcrLow) => {
                effects.ipi = self.send_icr(value, self.icr_high >> 24);
            }
            Some(ApicRegister::IcrHigh) => self.icr_high = value & ICR_HIGH_XAPIC_WRITABLE,
            Some(register) => effects = self.write_register(register, value, now_tsc),
        }
        effects
    }
}

//! The IOAPIC (82093AA register model, version 0x20 with the EOI register): 24 input pins,
//! each routed by a 64-bit redirection entry to an [`InterruptMessage`].
//!
//! MMIO at [`IoApic::BASE`]: IOREGSEL at 0x00 (register index, bits 7:0), IOWIN at 0x10 (the
//! selected 32-bit register), EOI at 0x40 (vector, bits 7:0). Registers: 0x00 ID (bits 27:24),
//! 0x01 version (0x0017_0020: 24 entries, version 0x20), 0x02 arbitration ID (reads the ID),
//! 0x10 + 2n / 0x11 + 2n the low / high half of redirection entry n. IOWIN and EOI take
//! 4-byte accesses only; IOREGSEL takes 1, 2 or 4 bytes; anything else reads zeros and writes
//! nothing.
//!
//! Redirection entry: vector 7:0, delivery mode 10:8, logical 11, delivery status 12 (reads
//! 0), active-low 13, Remote IRR 14 (read-only), level-triggered 15, masked 16, destination
//! 63:56. Bits 55:49 are kept as destination bits 14:8 (the "extended destination ID" KVM
//! and QEMU offer to guests with more than 255 APIC IDs); a guest that does not use them
//! leaves them zero, which gives the plain 8-bit destination. Entries with the reserved
//! delivery modes 3 and 6 deliver nothing.
//!
//! Pin inputs: [`IoApic::set_irq`] takes the electrical level of the line; the entry's
//! polarity says which level is asserted. A pin no device has driven yet counts as deasserted
//! under either polarity, like a pulled-up active-low line, so that the guest can program an
//! unused pin active-low (ACPI's default for the SCI) without an interrupt storm.
//!
//! Masked pins: a level pin's line state is tracked while masked, and unmasking it while
//! asserted delivers. A rising edge on a masked edge pin is held and delivered at unmask (as
//! QEMU does; the 82093AA datasheet drops it), so a device that signals while its driver is
//! still setting up does not lose its only interrupt.

use crate::bits::{low_u32, low_u8};
use crate::interrupt::{DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode};

/// Number of input pins.
pub const IOAPIC_PINS: usize = PIN_COUNT as usize;
/// [`IOAPIC_PINS`] as the registers count it.
const PIN_COUNT: u32 = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION_FIRST: u32 = 0x10;
const REG_REDIRECTION_LAST: u32 = REG_REDIRECTION_FIRST + 2 * PIN_COUNT - 1;

/// Version 0x20 (has the EOI register), maximum redirection entry 23.
const VERSION: u32 = 0x20 | ((PIN_COUNT - 1) << 16);
const ID_WRITABLE: u32 = 0x0F00_0000;

const ENTRY_LOGICAL: u64 = 1 << 11;
const ENTRY_ACTIVE_LOW: u64 = 1 << 13;
const ENTRY_REMOTE_IRR: u64 = 1 << 14;
const ENTRY_LEVEL: u64 = 1 << 15;
const ENTRY_MASKED: u64 = 1 << 16;
/// Low-half bits the guest writes: vector, delivery mode, logical, polarity, trigger, mask.
const ENTRY_LOW_WRITABLE: u64 = 0x0001_AFFF;
/// High-half bits kept: destination 63:56 and extended destination 55:49.
const ENTRY_HIGH_WRITABLE: u64 = 0xFFFE_0000 << 32;

/// The IOAPIC of the guest (one, on the master node).
#[derive(Debug, Clone)]
pub struct IoApic {
    /// ID register (bits 27:24).
    id: u32,
    /// IOREGSEL.
    selected: u32,
    redirection: [u64; IOAPIC_PINS],
    /// Pins some device has driven (others count as deasserted).
    driven: u32,
    /// Electrical level of each driven pin.
    line_high: u32,
    /// Rising edges seen on masked edge-triggered pins, delivered at unmask.
    held_edges: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// Guest-physical address of the register window.
    pub const BASE: u64 = 0xFEC0_0000;
    /// Size of the register window claimed on the MMIO bus.
    pub const SIZE: u64 = 0x1000;

    /// An IOAPIC after reset: ID 0, every pin masked, edge-triggered, active-high.
    pub fn new() -> Self {
        Self {
            id: 0,
            selected: 0,
            redirection: [ENTRY_MASKED; IOAPIC_PINS],
            driven: 0,
            line_high: 0,
            held_edges: 0,
        }
    }

    /// The redirection entry of `pin` as the guest reads it (`None` past the last pin).
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// A guest read of the register window at `offset` (length = access size).
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match (offset, data.len()) {
            (IOREGSEL, 1 | 2 | 4) => self.selected,
            (IOWIN, 4) => self.read_register(self.selected),
            _ => return,
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    /// A guest write of the register window. Returns the messages it causes: unmasking a pin
    /// whose line is asserted (level) or that saw an edge while masked, or an EOI register
    /// write that re-delivers an asserted level pin.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Vec<InterruptMessage> {
        match (offset, data.len()) {
            (IOREGSEL, 1 | 2 | 4) => {
                let mut bytes = [0; 4];
                bytes[..data.len()].copy_from_slice(data);
                self.selected = u32::from_le_bytes(bytes) & 0xFF;
                Vec::new()
            }
            (IOWIN, 4) | (EOI, 4) => {
                let mut bytes = [0; 4];
                bytes.copy_from_slice(data);
                let value = u32::from_le_bytes(bytes);
                if offset == EOI {
                    self.end_of_interrupt(low_u8(u64::from(value)))
                } else {
                    self.write_register(self.selected, value)
                        .into_iter()
                        .collect()
                }
            }
            _ => Vec::new(),
        }
    }

    /// A device sets the electrical level of `pin`'s input line. Edge pins deliver on the
    /// edge into the asserted state; level pins deliver while asserted and Remote IRR is clear
    /// (setting Remote IRR). Masked pins deliver nothing (see the module doc for what is
    /// remembered). A pin past the last one is ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool) -> Option<InterruptMessage> {
        if pin >= IOAPIC_PINS {
            return None;
        }
        let was_asserted = self.asserted(pin);
        let bit = 1 << pin;
        self.driven |= bit;
        if level {
            self.line_high |= bit;
        } else {
            self.line_high &= !bit;
        }
        let entry = self.redirection[pin];
        if entry & ENTRY_LEVEL != 0 {
            return self.deliver_level(pin);
        }
        if was_asserted || !self.asserted(pin) {
            return None;
        }
        if entry & ENTRY_MASKED != 0 {
            self.held_edges |= bit;
            return None;
        }
        message(entry)
    }

    /// A level-triggered vector was retired by a local APIC EOI (or the guest wrote the EOI
    /// register): clear Remote IRR of every level pin with that vector, and deliver again
    /// those whose line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) -> Vec<InterruptMessage> {
        let mut messages = Vec::new();
        for pin in 0..IOAPIC_PINS {
            let entry = self.redirection[pin];
            if low_u8(entry) == vector && entry & ENTRY_LEVEL != 0 && entry & ENTRY_REMOTE_IRR != 0
            {
                self.redirection[pin] &= !ENTRY_REMOTE_IRR;
                messages.extend(self.deliver_level(pin));
            }
        }
        messages
    }

    /// Whether `pin`'s line is in its asserted state.
    fn asserted(&self, pin: usize) -> bool {
        let bit = 1 << pin;
        let high = self.line_high & bit != 0;
        let active_low = self.redirection[pin] & ENTRY_ACTIVE_LOW != 0;
        self.driven & bit != 0 && high != active_low
    }

    /// Delivers a level pin if it is asserted, unmasked and not awaiting an EOI.
    fn deliver_level(&mut self, pin: usize) -> Option<InterruptMessage> {
        let entry = self.redirection[pin];
        if entry & (ENTRY_MASKED | ENTRY_REMOTE_IRR) != 0 || !self.asserted(pin) {
            return None;
        }
        let msg = message(entry)?;
        self.redirection[pin] |= ENTRY_REMOTE_IRR;
        Some(msg)
    }

    fn read_register(&self, index: u32) -> u32 {
        match index {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => VERSION,
            REG_REDIRECTION_FIRST..=REG_REDIRECTION_LAST => {
                let offset = index - REG_REDIRECTION_FIRST;
                let entry = self.redirection[(offset / 2) as usize];
                if offset % 2 == 0 {
                    low_u32(entry)
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, index: u32, value: u32) -> Option<InterruptMessage> {
        match index {
            REG_ID => {
                self.id = value & ID_WRITABLE;
                None
            }
            REG_REDIRECTION_FIRST..=REG_REDIRECTION_LAST => {
                let offset = index - REG_REDIRECTION_FIRST;
                let pin = (offset / 2) as usize;
                if offset % 2 == 1 {
                    let entry = &mut self.redirection[pin];
                    *entry = *entry & !ENTRY_HIGH_WRITABLE
                        | (u64::from(value) << 32) & ENTRY_HIGH_WRITABLE;
                    return None;
                }
                self.write_low_half(pin, value)
            }
            _ => None,
        }
    }

    /// Writes the low half of a redirection entry; unmasking may deliver.
    fn write_low_half(&mut self, pin: usize, value: u32) -> Option<InterruptMessage> {
        let old = self.redirection[pin];
        let mut entry = old & !ENTRY_LOW_WRITABLE & !0xFFFF_FFFF
            | u64::from(value) & ENTRY_LOW_WRITABLE
            | old & ENTRY_REMOTE_IRR;
        if entry & ENTRY_LEVEL == 0 {
            // Remote IRR has no meaning for an edge pin; a guest switching a pin to edge
            // must not leave it stuck (KVM clears it too).
            entry &= !ENTRY_REMOTE_IRR;
        }
        self.redirection[pin] = entry;
        if entry & ENTRY_MASKED != 0 {
            return None;
        }
        if entry & ENTRY_LEVEL != 0 {
            return self.deliver_level(pin);
        }
        let bit = 1 << pin;
        if self.held_edges & bit != 0 {
            self.held_edges &= !bit;
            return message(entry);
        }
        None
    }
}

/// The message a redirection entry sends; `None` for the reserved delivery modes.
fn message(entry: u64) -> Option<InterruptMessage> {
    let delivery = match DeliveryMode::from_bits(((entry >> 8) & 7) as u32)? {
        DeliveryMode::StartUp => return None,
        mode => mode,
    };
    let level = entry & ENTRY_LEVEL != 0;
    Some(InterruptMessage {
        vector: low_u8(entry),
        delivery,
        dest_mode: if entry & ENTRY_LOGICAL != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        },
        destination: low_u32((entry >> 56) | ((entry >> 49) & 0x7F) << 8),
        trigger: if level {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        },
        level_assert: true,
        shorthand: Shorthand::None,
    })
}

#[cfg(test)]
mod tests;

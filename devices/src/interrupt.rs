//! Interrupt messages as they travel between interrupt controllers, and the addressing state
//! that decides which local APICs a message reaches.
//!
//! One [`InterruptMessage`] describes an IPI (from an ICR or SELF_IPI write), an IOAPIC
//! redirection or an MSI. Every node keeps an [`ApicAddressing`] replica of every vCPU, so
//! [`destination_set`] can be computed wherever the message is raised, without asking the node
//! that runs the target vCPU.

use crate::bits::{low_u32, low_u8};
use thiserror::Error;

pub use crate::apic::delivery::destination::{destination_matches, destination_set};

/// How the receiving APIC handles a message: the 3-bit field of the ICR, of an IOAPIC
/// redirection entry and of MSI data. Encoding 3 is reserved everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// 0: the vector goes to IRR.
    Fixed,
    /// 1: like Fixed, but to exactly one APIC of the destination set.
    LowestPriority,
    /// 2: system management interrupt.
    Smi,
    /// 4: non-maskable interrupt; the vector is ignored.
    Nmi,
    /// 5: INIT (the vCPU resets and waits for a SIPI).
    Init,
    /// 6: start-up IPI; the vector is the page number of the start address.
    StartUp,
    /// 7: the vector comes from an external 8259-compatible controller.
    ExtInt,
}

impl DeliveryMode {
    /// Decodes a 3-bit delivery-mode field; `None` for the reserved encoding 3 or a value
    /// wider than 3 bits.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        Some(match bits {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            7 => Self::ExtInt,
            _ => return None,
        })
    }

    /// The 3-bit encoding of this mode.
    pub const fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::ExtInt => 7,
        }
    }

    /// Whether the vector of a message in this mode is an interrupt vector that lands in IRR.
    pub const fn uses_irr(self) -> bool {
        matches!(self, Self::Fixed | Self::LowestPriority)
    }
}

/// How the destination field is read: an APIC ID or a logical (LDR-matched) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestinationMode {
    /// The destination is an APIC ID (or the broadcast ID).
    Physical,
    /// The destination is matched against each APIC's LDR (and DFR in xAPIC mode).
    Logical,
}

/// Whether the receiver must report the end of the interrupt back to its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TriggerMode {
    /// Edge: fire and forget.
    Edge,
    /// Level: the receiver sets TMR, and its EOI goes back to the IOAPIC.
    Level,
}

/// The ICR destination shorthand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shorthand {
    /// 0: use the destination field.
    None,
    /// 1: the sender only.
    SelfOnly,
    /// 2: every APIC, the sender included.
    AllIncludingSelf,
    /// 3: every APIC but the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// Decodes the 2-bit ICR shorthand field (bits 19:18 shifted down).
    pub const fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }

    /// The 2-bit encoding of this shorthand.
    pub const fn bits(self) -> u32 {
        match self {
            Self::None => 0,
            Self::SelfOnly => 1,
            Self::AllIncludingSelf => 2,
            Self::AllExcludingSelf => 3,
        }
    }
}

/// One interrupt on its way to one or more local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterruptMessage {
    /// The vector (for StartUp: the start page; ignored for NMI, INIT, SMI and ExtInt).
    pub vector: u8,
    /// What the receiver does with it.
    pub delivery: DeliveryMode,
    /// How `destination` is read.
    pub dest_mode: DestinationMode,
    /// An APIC ID or logical address: 8 bits (0xFF broadcast) when sent by an xAPIC-mode APIC,
    /// the IOAPIC or an MSI; 32 bits (0xFFFF_FFFF broadcast) when sent by an x2APIC-mode APIC.
    pub destination: u32,
    /// Edge or level (level: the receiver reports its EOI).
    pub trigger: TriggerMode,
    /// The ICR/MSI level bit; false only for the obsolete INIT level de-assert.
    pub level_assert: bool,
    /// The ICR shorthand; [`Shorthand::None`] for IOAPIC and MSI messages.
    pub shorthand: Shorthand,
}

/// Why a packed message (see [`InterruptMessage::pack`]) could not be unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum InterruptError {
    /// The delivery-mode field holds the reserved encoding 3: the peer that packed it is broken.
    #[error("packed interrupt message {packed:#018x} has the reserved delivery mode 3")]
    ReservedDeliveryMode {
        /// The packed message as received.
        packed: u64,
    },
    /// Bits 31:16, which the packing leaves zero, are set: the frame is corrupt or from another
    /// version of spanvm.
    #[error("packed interrupt message {packed:#018x} has reserved bits 31:16 set")]
    ReservedBits {
        /// The packed message as received.
        packed: u64,
    },
}

const PACK_RESERVED: u64 = 0xFFFF_0000;

impl InterruptMessage {
    /// A fixed, edge-triggered, physically addressed message: the common case of a device
    /// interrupt or IPI.
    pub const fn fixed(vector: u8, destination: u32) -> Self {
        Self {
            vector,
            delivery: DeliveryMode::Fixed,
            dest_mode: DestinationMode::Physical,
            destination,
            trigger: TriggerMode::Edge,
            level_assert: true,
            shorthand: Shorthand::None,
        }
    }

    /// Packs the message into 64 bits for node-to-node frames: vector 7:0, delivery 10:8,
    /// logical 11, level-triggered 12, level-assert 13, shorthand 15:14, zero 31:16,
    /// destination 63:32.
    pub const fn pack(&self) -> u64 {
        self.vector as u64
            | (self.delivery.bits() as u64) << 8
            | (matches!(self.dest_mode, DestinationMode::Logical) as u64) << 11
            | (matches!(self.trigger, TriggerMode::Level) as u64) << 12
            | (self.level_assert as u64) << 13
            | (self.shorthand.bits() as u64) << 14
            | (self.destination as u64) << 32
    }

    /// The inverse of [`InterruptMessage::pack`]; rejects encodings `pack` never produces.
    pub const fn unpack(packed: u64) -> Result<Self, InterruptError> {
        if packed & PACK_RESERVED != 0 {
            return Err(InterruptError::ReservedBits { packed });
        }
        let Some(delivery) = DeliveryMode::from_bits(((packed >> 8) & 7) as u32) else {
            return Err(InterruptError::ReservedDeliveryMode { packed });
        };
        Ok(Self {
            vector: low_u8(packed),
            delivery,
            dest_mode: if packed & (1 << 11) != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            destination: (packed >> 32) as u32,
            trigger: if packed & (1 << 12) != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level_assert: packed & (1 << 13) != 0,
            shorthand: Shorthand::from_bits(low_u32(packed >> 14)),
        })
    }
}

/// The addressing state of one vCPU's APIC, as every node keeps a replica of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApicAddressing {
    /// The APIC ID the APIC answers to: the 8-bit xAPIC ID register in xAPIC mode, the
    /// 32-bit x2APIC ID in x2APIC mode.
    pub apic_id: u32,
    /// Globally (IA32_APIC_BASE) and software (SVR) enabled: takes every kind of message.
    pub enabled: bool,
    /// IA32_APIC_BASE's global enable. An APIC that is globally enabled but software-disabled
    /// (every AP after power-on) still takes NMI, SMI, INIT and SIPI (SDM 10.4.7.2), which is
    /// how APs are started; a globally disabled one takes nothing.
    pub globally_enabled: bool,
    /// In x2APIC mode (32-bit IDs, cluster LDR, no DFR).
    pub x2apic: bool,
    /// The logical destination register (xAPIC: bits 31:24 meaningful; x2APIC: derived,
    /// cluster in 31:16 and one bit of 15:0).
    pub ldr: u32,
    /// The destination format register (xAPIC only): 0xFFFF_FFFF flat, 0x0FFF_FFFF cluster.
    pub dfr: u32,
}

impl ApicAddressing {
    /// The state of an APIC after power-on: xAPIC mode, globally enabled, software-disabled,
    /// LDR 0, flat DFR. Equal to `LocalApic::new(apic_id, ..).addressing()`, so a node can
    /// fill its replica of a remote vCPU before the first update arrives.
    pub const fn power_on(apic_id: u32) -> Self {
        Self {
            apic_id: apic_id & 0xFF,
            enabled: false,
            globally_enabled: true,
            x2apic: false,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_encodings_round_trip_and_reserve_3() {
        for bits in 0..8 {
            match DeliveryMode::from_bits(bits) {
                Some(mode) => assert_eq!(mode.bits(), bits),
                None => assert_eq!(bits, 3),
            }
        }
        assert_eq!(DeliveryMode::from_bits(8), None);
        assert_eq!(DeliveryMode::from_bits(6), Some(DeliveryMode::StartUp));
    }

    #[test]
    fn pack_round_trips_every_field() {
        let msg = InterruptMessage {
            vector: 0xA5,
            delivery: DeliveryMode::Init,
            dest_mode: DestinationMode::Logical,
            destination: 0xDEAD_BEEF,
            trigger: TriggerMode::Level,
            level_assert: false,
            shorthand: Shorthand::AllExcludingSelf,
        };
        let packed = msg.pack();
        assert_eq!(packed, 0xDEAD_BEEF_0000_DDA5);
        assert_eq!(InterruptMessage::unpack(packed), Ok(msg));
        let plain = InterruptMessage::fixed(0x31, 2);
        assert_eq!(plain.pack(), 0x0000_0002_0000_2031);
        assert_eq!(InterruptMessage::unpack(plain.pack()), Ok(plain));
    }

    #[test]
    fn unpack_rejects_what_pack_never_produces() {
        assert_eq!(
            InterruptMessage::unpack(0x300),
            Err(InterruptError::ReservedDeliveryMode { packed: 0x300 })
        );
        assert_eq!(
            InterruptMessage::unpack(0x1_0000),
            Err(InterruptError::ReservedBits { packed: 0x1_0000 })
        );
    }
}

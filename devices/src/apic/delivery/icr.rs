//! The interrupt command register: turning a guest ICR write into an IPI message.

use crate::bits::low_u8;
use crate::interrupt::{DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode};

/// Bit 11: logical destination mode.
const ICR_LOGICAL: u32 = 1 << 11;
/// Bit 14: level (assert).
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
/// Bit 15: level-triggered.
const ICR_LEVEL_TRIGGER: u32 = 1 << 15;
/// The low-half bits the guest can write: vector, delivery mode, destination mode, level,
/// trigger mode, shorthand. Delivery status (bit 12) always reads 0: an IPI is handed to the
/// VMM within the write, so it is never observed pending.
pub(crate) const ICR_LOW_WRITABLE: u32 = 0x000C_CFFF;
/// The xAPIC ICR high half: destination in bits 31:24.
pub(crate) const ICR_HIGH_XAPIC_WRITABLE: u32 = 0xFF00_0000;

/// What an ICR write sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IcrCommand {
    /// A message to route.
    Send(InterruptMessage),
    /// A Fixed or LowestPriority IPI with a vector below 16: nothing is sent and the sender
    /// logs "send illegal vector" in ESR.
    IllegalVector,
    /// Nothing to send: a reserved delivery mode (3 or 7 in the ICR), or the INIT level
    /// de-assert, which only synchronised arbitration IDs on P6-era processors.
    Nothing,
}

/// Decodes an ICR low half; `destination` is already in the sender's format (xAPIC: the
/// 8-bit field of ICR high, x2APIC: the 32-bit high half).
pub(crate) fn decode(low: u32, destination: u32) -> IcrCommand {
    let vector = low_u8(u64::from(low));
    let delivery = match DeliveryMode::from_bits((low >> 8) & 7) {
        None | Some(DeliveryMode::ExtInt) => return IcrCommand::Nothing,
        Some(mode) => mode,
    };
    let level_triggered = low & ICR_LEVEL_TRIGGER != 0;
    let asserted = low & ICR_LEVEL_ASSERT != 0;
    if delivery == DeliveryMode::Init && level_triggered && !asserted {
        return IcrCommand::Nothing;
    }
    if delivery.uses_irr() && vector < 16 {
        return IcrCommand::IllegalVector;
    }
    // The trigger mode only has a meaning for INIT (SDM 10.6.1): other IPIs are edge.
    let trigger = if delivery == DeliveryMode::Init && level_triggered {
        TriggerMode::Level
    } else {
        TriggerMode::Edge
    };
    IcrCommand::Send(InterruptMessage {
        vector,
        delivery,
        dest_mode: if low & ICR_LOGICAL != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        },
        destination,
        trigger,
        level_assert: true,
        shorthand: Shorthand::from_bits(low >> 18),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_logical_all_excluding_self() {
        let IcrCommand::Send(msg) = decode(0x000C_0831, 0x0F) else {
            panic!("no message");
        };
        assert_eq!(
            msg,
            InterruptMessage {
                vector: 0x31,
                delivery: DeliveryMode::Fixed,
                dest_mode: DestinationMode::Logical,
                destination: 0x0F,
                trigger: TriggerMode::Edge,
                level_assert: true,
                shorthand: Shorthand::AllExcludingSelf,
            }
        );
    }

    #[test]
    fn linux_init_sequence() {
        // INIT assert, level-triggered: APIC_INT_LEVELTRIG | APIC_INT_ASSERT | APIC_DM_INIT.
        let IcrCommand::Send(init) = decode(0x0000_C500, 3) else {
            panic!("INIT assert not sent");
        };
        assert_eq!(init.delivery, DeliveryMode::Init);
        assert_eq!(init.trigger, TriggerMode::Level);
        assert_eq!(init.destination, 3);
        // INIT de-assert: APIC_INT_LEVELTRIG | APIC_DM_INIT.
        assert_eq!(decode(0x0000_8500, 3), IcrCommand::Nothing);
        // SIPI to page 0x9A: APIC_DM_STARTUP | 0x9A.
        let IcrCommand::Send(sipi) = decode(0x0000_069A, 3) else {
            panic!("SIPI not sent");
        };
        assert_eq!(sipi.delivery, DeliveryMode::StartUp);
        assert_eq!(sipi.vector, 0x9A);
        assert_eq!(sipi.trigger, TriggerMode::Edge);
    }

    #[test]
    fn reserved_modes_and_illegal_vectors() {
        assert_eq!(decode(0x0000_0330, 1), IcrCommand::Nothing);
        assert_eq!(decode(0x0000_0730, 1), IcrCommand::Nothing);
        assert_eq!(decode(0x0000_000F, 1), IcrCommand::IllegalVector);
        assert_eq!(decode(0x0000_010F, 1), IcrCommand::IllegalVector);
        // NMI ignores the vector, so a small one is legal; fixed IPIs ignore the trigger bit.
        let IcrCommand::Send(nmi) = decode(0x0000_8402, 1) else {
            panic!("NMI not sent");
        };
        assert_eq!(
            (nmi.delivery, nmi.trigger),
            (DeliveryMode::Nmi, TriggerMode::Edge)
        );
    }
}

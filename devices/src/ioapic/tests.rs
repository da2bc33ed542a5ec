//! IOAPIC register access, edge and level pins, Remote IRR and polarity.

use super::*;

fn write_reg(ioapic: &mut IoApic, index: u32, value: u32) -> Vec<InterruptMessage> {
    assert!(ioapic.mmio_write(IOREGSEL, &index.to_le_bytes()).is_empty());
    ioapic.mmio_write(IOWIN, &value.to_le_bytes())
}

fn read_reg(ioapic: &mut IoApic, index: u32) -> u32 {
    ioapic.mmio_write(IOREGSEL, &index.to_le_bytes());
    let mut data = [0; 4];
    ioapic.mmio_read(IOWIN, &mut data);
    u32::from_le_bytes(data)
}

/// Programs `pin` through the registers, high half first (as Linux does), and returns
/// what the low-half write delivered.
fn program(ioapic: &mut IoApic, pin: u32, low: u32, high: u32) -> Vec<InterruptMessage> {
    assert!(write_reg(ioapic, 0x11 + 2 * pin, high).is_empty());
    write_reg(ioapic, 0x10 + 2 * pin, low)
}

const LEVEL: u32 = 1 << 15;
const ACTIVE_LOW: u32 = 1 << 13;
const MASKED: u32 = 1 << 16;
const REMOTE_IRR: u32 = 1 << 14;

fn level_message(vector: u8, destination: u32) -> InterruptMessage {
    InterruptMessage {
        trigger: TriggerMode::Level,
        ..InterruptMessage::fixed(vector, destination)
    }
}

#[test]
fn reset_state_and_identification_registers() {
    let mut ioapic = IoApic::new();
    assert_eq!(read_reg(&mut ioapic, 0x01), 0x0017_0020);
    assert_eq!(read_reg(&mut ioapic, 0x00), 0);
    for pin in 0..PIN_COUNT {
        assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * pin), MASKED);
        assert_eq!(read_reg(&mut ioapic, 0x11 + 2 * pin), 0);
    }
    write_reg(&mut ioapic, 0x00, 0xFFFF_FFFF);
    assert_eq!(read_reg(&mut ioapic, 0x00), 0x0F00_0000);
    assert_eq!(read_reg(&mut ioapic, 0x02), 0x0F00_0000);
    // Version is read-only; unknown registers read 0.
    write_reg(&mut ioapic, 0x01, 0);
    assert_eq!(read_reg(&mut ioapic, 0x01), 0x0017_0020);
    assert_eq!(read_reg(&mut ioapic, 0x40), 0);
    // IOREGSEL reads back (8 bits kept).
    ioapic.mmio_write(IOREGSEL, &0x1234_u32.to_le_bytes());
    let mut data = [0; 4];
    ioapic.mmio_read(IOREGSEL, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x34);
}

#[test]
fn redirection_entry_round_trips_through_both_halves() {
    let mut ioapic = IoApic::new();
    // Every low bit set: delivery status and Remote IRR are not writable.
    program(&mut ioapic, 5, 0xFFFF_FFFF, 0xFFFF_FFFF);
    assert_eq!(read_reg(&mut ioapic, 0x10 + 10), 0x0001_AFFF);
    assert_eq!(read_reg(&mut ioapic, 0x11 + 10), 0xFFFE_0000);
    assert_eq!(ioapic.redirection_entry(5), Some(0xFFFE_0000_0001_AFFF));
    program(&mut ioapic, 5, 0x0000_0931, 0x0300_0000);
    assert_eq!(read_reg(&mut ioapic, 0x10 + 10), 0x0000_0931);
    assert_eq!(read_reg(&mut ioapic, 0x11 + 10), 0x0300_0000);
    // The two halves are independent.
    write_reg(&mut ioapic, 0x11 + 10, 0x0500_0000);
    assert_eq!(ioapic.redirection_entry(5), Some(0x0500_0000_0000_0931));
    assert_eq!(ioapic.redirection_entry(IOAPIC_PINS), None);
}

#[test]
fn odd_access_sizes_read_zero_and_write_nothing() {
    let mut ioapic = IoApic::new();
    program(&mut ioapic, 0, 0x30 | MASKED, 0);
    ioapic.mmio_write(IOREGSEL, &[0x10]);
    let mut narrow = [0xAA; 2];
    ioapic.mmio_read(IOWIN, &mut narrow);
    assert_eq!(narrow, [0, 0]);
    assert!(ioapic.mmio_write(IOWIN, &[0, 0]).is_empty());
    assert_eq!(read_reg(&mut ioapic, 0x10), 0x30 | MASKED);
    let mut other = [0xAA; 4];
    ioapic.mmio_read(0x20, &mut other);
    assert_eq!(other, [0; 4]);
}

#[test]
fn edge_pin_delivers_on_rising_edge_only() {
    let mut ioapic = IoApic::new();
    assert!(program(&mut ioapic, 4, 0x24, 0x0100_0000).is_empty());
    assert_eq!(
        ioapic.set_irq(4, true),
        Some(InterruptMessage::fixed(0x24, 1))
    );
    assert_eq!(ioapic.set_irq(4, true), None);
    assert_eq!(ioapic.set_irq(4, false), None);
    assert_eq!(
        ioapic.set_irq(4, true),
        Some(InterruptMessage::fixed(0x24, 1))
    );
    // No Remote IRR for edge pins.
    assert_eq!(ioapic.redirection_entry(4), Some(0x0100_0000_0000_0024));
    assert_eq!(ioapic.set_irq(IOAPIC_PINS, true), None);
}

#[test]
fn masked_pins_send_nothing_and_deliver_at_unmask() {
    let mut ioapic = IoApic::new();
    // Edge pin: an edge while masked is held until the unmask.
    program(&mut ioapic, 3, 0x23 | MASKED, 0);
    assert_eq!(ioapic.set_irq(3, true), None);
    assert_eq!(ioapic.set_irq(3, false), None);
    assert_eq!(
        program(&mut ioapic, 3, 0x23, 0),
        vec![InterruptMessage::fixed(0x23, 0)]
    );
    assert!(
        program(&mut ioapic, 3, 0x23, 0).is_empty(),
        "a held edge is delivered once"
    );
    // Level pin: asserted while masked, delivered at unmask.
    program(&mut ioapic, 9, 0x29 | LEVEL | MASKED, 0x0200_0000);
    assert_eq!(ioapic.set_irq(9, true), None);
    assert_eq!(
        program(&mut ioapic, 9, 0x29 | LEVEL, 0x0200_0000),
        vec![level_message(0x29, 2)]
    );
    // Level pin deasserted while masked: nothing at unmask.
    program(&mut ioapic, 10, 0x2A | LEVEL | MASKED, 0);
    ioapic.set_irq(10, true);
    ioapic.set_irq(10, false);
    assert!(program(&mut ioapic, 10, 0x2A | LEVEL, 0).is_empty());
}

#[test]
fn level_pin_remote_irr_blocks_until_eoi_then_redelivers_while_asserted() {
    let mut ioapic = IoApic::new();
    program(&mut ioapic, 11, 0x3B | LEVEL, 0x0100_0000);
    assert_eq!(ioapic.set_irq(11, true), Some(level_message(0x3B, 1)));
    assert_eq!(read_reg(&mut ioapic, 0x10 + 22), 0x3B | LEVEL | REMOTE_IRR);
    // Still asserted, Remote IRR set: nothing more.
    assert_eq!(ioapic.set_irq(11, true), None);
    // EOI of another vector changes nothing.
    assert!(ioapic.end_of_interrupt(0x3C).is_empty());
    assert_eq!(read_reg(&mut ioapic, 0x10 + 22), 0x3B | LEVEL | REMOTE_IRR);
    // EOI while still asserted: delivered again, Remote IRR set again.
    assert_eq!(ioapic.end_of_interrupt(0x3B), vec![level_message(0x3B, 1)]);
    assert_eq!(read_reg(&mut ioapic, 0x10 + 22), 0x3B | LEVEL | REMOTE_IRR);
    // Deassert, then EOI: Remote IRR clears, nothing delivered.
    assert_eq!(ioapic.set_irq(11, false), None);
    assert!(ioapic.end_of_interrupt(0x3B).is_empty());
    assert_eq!(read_reg(&mut ioapic, 0x10 + 22), 0x3B | LEVEL);
    assert_eq!(ioapic.set_irq(11, true), Some(level_message(0x3B, 1)));
}

#[test]
fn eoi_register_and_shared_vectors() {
    let mut ioapic = IoApic::new();
    program(&mut ioapic, 16, 0x50 | LEVEL, 0);
    program(&mut ioapic, 17, 0x50 | LEVEL, 0x0100_0000);
    assert!(ioapic.set_irq(16, true).is_some());
    assert!(ioapic.set_irq(17, true).is_some());
    ioapic.set_irq(16, false);
    // The EOI register (version 0x20) clears both pins with the vector; pin 17 is still high.
    assert_eq!(
        ioapic.mmio_write(0x40, &0x50_u32.to_le_bytes()),
        vec![level_message(0x50, 1)]
    );
    assert_eq!(read_reg(&mut ioapic, 0x10 + 32), 0x50 | LEVEL);
    assert_eq!(read_reg(&mut ioapic, 0x10 + 34), 0x50 | LEVEL | REMOTE_IRR);
}

#[test]
fn switching_a_pin_to_edge_clears_remote_irr() {
    let mut ioapic = IoApic::new();
    program(&mut ioapic, 2, 0x22 | LEVEL, 0);
    assert!(ioapic.set_irq(2, true).is_some());
    assert_eq!(read_reg(&mut ioapic, 0x14), 0x22 | LEVEL | REMOTE_IRR);
    assert!(program(&mut ioapic, 2, 0x22, 0).is_empty());
    assert_eq!(read_reg(&mut ioapic, 0x14), 0x22);
    // Rewriting a level entry keeps Remote IRR (it is read-only).
    program(&mut ioapic, 2, 0x22 | LEVEL | MASKED, 0);
    program(&mut ioapic, 2, 0x22 | LEVEL, 0);
    assert_eq!(read_reg(&mut ioapic, 0x14), 0x22 | LEVEL | REMOTE_IRR);
    assert!(program(&mut ioapic, 2, 0x22 | LEVEL, 0).is_empty());
}

#[test]
fn active_low_pin_is_asserted_by_a_low_line() {
    let mut ioapic = IoApic::new();
    // An undriven active-low level pin is not asserted: unmasking delivers nothing.
    assert!(program(&mut ioapic, 9, 0x39 | LEVEL | ACTIVE_LOW, 0).is_empty());
    assert_eq!(ioapic.set_irq(9, true), None, "high is idle for active-low");
    assert_eq!(ioapic.set_irq(9, false), Some(level_message(0x39, 0)));
    ioapic.set_irq(9, true);
    assert!(ioapic.end_of_interrupt(0x39).is_empty());
    // Edge, active-low: the falling electrical edge is the one that counts.
    program(&mut ioapic, 7, 0x27 | ACTIVE_LOW, 0);
    assert_eq!(ioapic.set_irq(7, true), None);
    assert_eq!(
        ioapic.set_irq(7, false),
        Some(InterruptMessage::fixed(0x27, 0))
    );
    assert_eq!(ioapic.set_irq(7, true), None);
    // Flipping the polarity of a driven, unmasked level pin can assert it.
    program(&mut ioapic, 12, 0x3C | LEVEL, 0);
    assert_eq!(ioapic.set_irq(12, false), None);
    assert_eq!(
        program(&mut ioapic, 12, 0x3C | LEVEL | ACTIVE_LOW, 0),
        vec![level_message(0x3C, 0)]
    );
}

#[test]
fn message_fields_follow_the_entry() {
    let mut ioapic = IoApic::new();
    // Lowest priority, logical, level, destination 0x0F.
    program(&mut ioapic, 1, 0x41 | 1 << 8 | 1 << 11 | LEVEL, 0x0F00_0000);
    assert_eq!(
        ioapic.set_irq(1, true),
        Some(InterruptMessage {
            vector: 0x41,
            delivery: DeliveryMode::LowestPriority,
            dest_mode: DestinationMode::Logical,
            destination: 0x0F,
            trigger: TriggerMode::Level,
            level_assert: true,
            shorthand: Shorthand::None,
        })
    );
    // NMI delivery, extended destination bits 55:49 = 0x02 -> destination 0x2FF.
    program(&mut ioapic, 6, 4 << 8, 0xFF04_0000);
    let nmi = ioapic.set_irq(6, true).unwrap();
    assert_eq!((nmi.delivery, nmi.destination), (DeliveryMode::Nmi, 0x2FF));
    // Reserved delivery modes deliver nothing and leave Remote IRR clear.
    program(&mut ioapic, 8, 0x48 | 3 << 8 | LEVEL, 0);
    assert_eq!(ioapic.set_irq(8, true), None);
    assert_eq!(read_reg(&mut ioapic, 0x20), 0x48 | 3 << 8 | LEVEL);
    program(&mut ioapic, 13, 0x4D | 6 << 8, 0);
    assert_eq!(ioapic.set_irq(13, true), None);
}

//! End-to-end flows through the public API, as the VMM wires them: IOAPIC pin -> destination
//! set -> local APIC -> injection -> EOI -> IOAPIC; IPIs between APICs; AP start-up.

use devices::apic::{Accepted, EoiEffect, LocalApic};
use devices::interrupt::{destination_set, ApicAddressing, DeliveryMode, InterruptMessage};
use devices::ioapic::IoApic;

const TSC_KHZ: u32 = 2_000_000;
const SVR: u64 = 0xF0;
const EOI: u64 = 0xB0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;

fn mmio_write(apic: &mut LocalApic, offset: u64, value: u32) -> devices::apic::ApicEffects {
    apic.mmio_write(offset, &value.to_le_bytes(), 0)
}

fn ioapic_program(ioapic: &mut IoApic, pin: u32, low: u32, high: u32) -> Vec<InterruptMessage> {
    ioapic.mmio_write(0x00, &(0x11 + 2 * pin).to_le_bytes());
    ioapic.mmio_write(0x10, &high.to_le_bytes());
    ioapic.mmio_write(0x00, &(0x10 + 2 * pin).to_le_bytes());
    ioapic.mmio_write(0x10, &low.to_le_bytes())
}

fn ioapic_low_half(ioapic: &mut IoApic, pin: u32) -> u32 {
    ioapic.mmio_write(0x00, &(0x10 + 2 * pin).to_le_bytes());
    let mut data = [0; 4];
    ioapic.mmio_read(0x10, &mut data);
    u32::from_le_bytes(data)
}

/// Routes `msg` from `source` to every APIC of its destination set.
fn route(apics: &mut [LocalApic], msg: &InterruptMessage, source: Option<usize>) -> Vec<Accepted> {
    let replicas: Vec<ApicAddressing> = apics.iter().map(LocalApic::addressing).collect();
    destination_set(msg, source, &replicas)
        .into_iter()
        .map(|index| apics[index].accept(msg))
        .collect()
}

fn two_enabled_apics() -> Vec<LocalApic> {
    let mut apics = vec![
        LocalApic::new(0, true, TSC_KHZ),
        LocalApic::new(1, false, TSC_KHZ),
    ];
    for apic in &mut apics {
        mmio_write(apic, SVR, 0x1FF);
    }
    apics
}

#[test]
fn level_interrupt_round_trip_clears_remote_irr_and_redelivers_while_asserted() {
    let mut apics = two_enabled_apics();
    let mut ioapic = IoApic::new();
    // Pin 10: vector 0x3A, level, physical destination APIC 1.
    assert!(ioapic_program(&mut ioapic, 10, 0x3A | 1 << 15, 0x0100_0000).is_empty());

    let msg = ioapic.set_irq(10, true).expect("level pin delivers");
    assert_eq!(
        route(&mut apics, &msg, None),
        vec![Accepted::Irr {
            vector: 0x3A,
            coalesced: false
        }]
    );
    assert_eq!(apics[0].has_injectable(), None);
    assert_eq!(apics[1].acknowledge(), Some(0x3A));
    assert_eq!(ioapic_low_half(&mut ioapic, 10), 0x3A | 1 << 15 | 1 << 14);

    // The guest's handler EOIs while the device still holds the line: re-delivered.
    let eoi = mmio_write(&mut apics[1], EOI, 0).eoi;
    assert_eq!(
        eoi,
        Some(EoiEffect {
            vector: 0x3A,
            level: true
        })
    );
    let again = ioapic.end_of_interrupt(0x3A);
    assert_eq!(again, vec![msg]);
    route(&mut apics, &again[0], None);
    assert_eq!(apics[1].acknowledge(), Some(0x3A));

    // The device lowers the line; the next EOI clears Remote IRR and nothing follows.
    assert_eq!(ioapic.set_irq(10, false), None);
    let eoi = mmio_write(&mut apics[1], EOI, 0).eoi.unwrap();
    assert!(eoi.level);
    assert!(ioapic.end_of_interrupt(eoi.vector).is_empty());
    assert_eq!(ioapic_low_half(&mut ioapic, 10), 0x3A | 1 << 15);
    assert_eq!(apics[1].has_injectable(), None);
}

#[test]
fn edge_interrupt_eoi_does_not_concern_the_ioapic() {
    let mut apics = two_enabled_apics();
    let mut ioapic = IoApic::new();
    ioapic_program(&mut ioapic, 4, 0x24, 0);
    let msg = ioapic.set_irq(4, true).unwrap();
    route(&mut apics, &msg, None);
    assert_eq!(apics[0].acknowledge(), Some(0x24));
    let eoi = mmio_write(&mut apics[0], EOI, 0).eoi;
    assert_eq!(
        eoi,
        Some(EoiEffect {
            vector: 0x24,
            level: false
        })
    );
}

#[test]
fn xapic_ipi_reaches_the_other_apic() {
    let mut apics = two_enabled_apics();
    mmio_write(&mut apics[0], ICR_HIGH, 0x0100_0000);
    let ipi = mmio_write(&mut apics[0], ICR_LOW, 0x0000_00FD).ipi.unwrap();
    assert_eq!(
        route(&mut apics, &ipi, Some(0)),
        vec![Accepted::Irr {
            vector: 0xFD,
            coalesced: false
        }]
    );
    assert_eq!(apics[1].acknowledge(), Some(0xFD));
    assert_eq!(apics[0].has_injectable(), None);
}

#[test]
fn x2apic_ipi_with_all_excluding_self() {
    let mut apics: Vec<LocalApic> = (0..3)
        .map(|id| LocalApic::new(id, id == 0, TSC_KHZ))
        .collect();
    for apic in &mut apics {
        apic.set_apic_base(LocalApic::DEFAULT_BASE | 0xC00).unwrap();
        apic.msr_write(0x80F, 0x1FF, 0).unwrap();
    }
    let ipi = apics[1]
        .msr_write(0x830, 0x000C_00F2, 0)
        .unwrap()
        .ipi
        .unwrap();
    assert_eq!(route(&mut apics, &ipi, Some(1)).len(), 2);
    assert_eq!(apics[0].acknowledge(), Some(0xF2));
    assert_eq!(apics[1].acknowledge(), None);
    assert_eq!(apics[2].acknowledge(), Some(0xF2));
}

#[test]
fn bsp_starts_a_powered_on_ap_with_init_sipi_sipi() {
    let mut apics = vec![
        LocalApic::new(0, true, TSC_KHZ),
        LocalApic::new(1, false, TSC_KHZ),
    ];
    mmio_write(&mut apics[0], SVR, 0x1FF);
    mmio_write(&mut apics[0], ICR_HIGH, 0x0100_0000);
    // Linux: INIT assert (level), INIT de-assert, then two SIPIs to page 0x9A.
    let init = mmio_write(&mut apics[0], ICR_LOW, 0x0000_C500).ipi.unwrap();
    assert_eq!(route(&mut apics, &init, Some(0)), vec![Accepted::Init]);
    assert_eq!(mmio_write(&mut apics[0], ICR_LOW, 0x0000_8500).ipi, None);
    assert!(apics[1].take_init());
    apics[1].reset_init();
    let sipi = mmio_write(&mut apics[0], ICR_LOW, 0x0000_069A).ipi.unwrap();
    assert_eq!(sipi.delivery, DeliveryMode::StartUp);
    assert_eq!(
        route(&mut apics, &sipi, Some(0)),
        vec![Accepted::StartUp { vector: 0x9A }]
    );
    assert_eq!(apics[1].take_sipi(), Some(0x9A));
}

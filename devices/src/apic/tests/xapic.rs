//! xAPIC MMIO register access: reset values, access sizes, masks, ICR, ESR, SVR.

use super::*;

#[test]
fn power_on_register_values() {
    let mut apic = LocalApic::new(3, false, TSC_KHZ);
    assert_eq!(read(&mut apic, ID), 0x0300_0000);
    assert_eq!(read(&mut apic, VERSION), 0x0006_0014);
    assert_eq!(read(&mut apic, TPR), 0);
    assert_eq!(read(&mut apic, PPR), 0);
    assert_eq!(read(&mut apic, LDR), 0);
    assert_eq!(read(&mut apic, DFR), 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, SVR), 0xFF);
    for lvt in [
        LVT_CMCI,
        LVT_TIMER,
        LVT_THERMAL,
        LVT_PERF,
        LVT_LINT0,
        LVT_LINT1,
        LVT_ERROR,
    ] {
        assert_eq!(read(&mut apic, lvt), 0x0001_0000, "LVT {lvt:#x}");
    }
    assert_eq!(read(&mut apic, INITIAL_COUNT), 0);
    assert_eq!(read(&mut apic, CURRENT_COUNT), 0);
    assert_eq!(read(&mut apic, DIVIDE_CONFIG), 0);
    assert_eq!(read(&mut apic, ICR_LOW), 0);
    assert_eq!(read(&mut apic, ICR_HIGH), 0);
    assert_eq!(read(&mut apic, 0x90), 0, "APR");
    assert_eq!(read(&mut apic, 0xC0), 0, "RRD");
    assert_eq!(read(&mut apic, EOI), 0, "EOI reads 0");
    assert_eq!(
        latch_esr(&mut apic),
        0,
        "none of the reads above was illegal"
    );
    assert_eq!(apic.addressing(), ApicAddressing::power_on(3));
}

#[test]
fn narrow_reads_return_register_bytes_and_odd_reads_zero() {
    let mut apic = LocalApic::new(0xAB, false, TSC_KHZ);
    let mut byte = [0; 1];
    apic.mmio_read(ID + 3, &mut byte, 0);
    assert_eq!(byte, [0xAB]);
    let mut half = [0; 2];
    apic.mmio_read(VERSION + 2, &mut half, 0);
    assert_eq!(half, [0x06, 0x00]);
    apic.mmio_read(VERSION, &mut half, 0);
    assert_eq!(half, [0x14, 0x00]);
    // Crossing the 4-byte register, reading its reserved bytes, or 8 bytes at once: zeros.
    let mut crossing = [0xEE; 2];
    apic.mmio_read(VERSION + 3, &mut crossing, 0);
    assert_eq!(crossing, [0, 0]);
    let mut reserved = [0xEE; 4];
    apic.mmio_read(VERSION + 4, &mut reserved, 0);
    assert_eq!(reserved, [0; 4]);
    let mut wide = [0xEE; 8];
    apic.mmio_read(VERSION, &mut wide, 0);
    assert_eq!(wide, [0; 8]);
    let mut beyond = [0xEE; 4];
    apic.mmio_read(0x800, &mut beyond, 0);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn narrow_or_misaligned_writes_are_ignored() {
    let mut apic = enabled_apic(0);
    assert_eq!(apic.mmio_write(TPR, &[0x40], 0), ApicEffects::default());
    assert_eq!(
        apic.mmio_write(TPR, &[0x40, 0, 0, 0, 0, 0, 0, 0], 0),
        ApicEffects::default()
    );
    assert_eq!(
        apic.mmio_write(TPR + 4, &0x40_u32.to_le_bytes(), 0),
        ApicEffects::default()
    );
    assert_eq!(read(&mut apic, TPR), 0);
    write(&mut apic, TPR, 0x40);
    assert_eq!(read(&mut apic, TPR), 0x40);
}

#[test]
fn reserved_registers_log_illegal_register_address() {
    let mut apic = enabled_apic(0);
    assert_eq!(read(&mut apic, 0x40), 0);
    assert_eq!(latch_esr(&mut apic), 1 << 7);
    write(&mut apic, 0x3F0, 0x55);
    assert_eq!(
        latch_esr(&mut apic),
        1 << 7,
        "SELF IPI does not exist in xAPIC mode"
    );
    assert_eq!(latch_esr(&mut apic), 0);
}

#[test]
fn read_only_registers_ignore_writes() {
    let mut apic = enabled_apic(0);
    apic.accept(&edge(0x50));
    for offset in [
        VERSION,
        PPR,
        0x90,
        0xC0,
        IRR0 + 0x20,
        ISR0,
        TMR0,
        CURRENT_COUNT,
    ] {
        assert_eq!(
            write(&mut apic, offset, 0xFFFF_FFFF),
            ApicEffects::default()
        );
    }
    assert_eq!(read(&mut apic, VERSION), 0x0006_0014);
    assert_eq!(read(&mut apic, PPR), 0);
    assert_eq!(read(&mut apic, IRR0 + 0x20), 1 << 16);
    assert_eq!(read(&mut apic, ISR0), 0);
    assert_eq!(latch_esr(&mut apic), 0);
}

#[test]
fn id_ldr_dfr_are_writable_and_change_addressing() {
    let mut apic = enabled_apic(2);
    let effects = write(&mut apic, ID, 0x0712_3456);
    assert!(effects.addressing_changed);
    assert_eq!(read(&mut apic, ID), 0x0700_0000);
    let effects = write(&mut apic, LDR, 0x8123_4567);
    assert!(effects.addressing_changed);
    assert_eq!(read(&mut apic, LDR), 0x8100_0000);
    let effects = write(&mut apic, DFR, 0x0000_0000);
    assert!(effects.addressing_changed);
    assert_eq!(read(&mut apic, DFR), 0x0FFF_FFFF);
    assert!(
        !write(&mut apic, DFR, 0x0123_4567).addressing_changed,
        "same model"
    );
    assert_eq!(
        apic.addressing(),
        ApicAddressing {
            apic_id: 7,
            enabled: true,
            globally_enabled: true,
            x2apic: false,
            ldr: 0x8100_0000,
            dfr: 0x0FFF_FFFF,
        }
    );
}

#[test]
fn lvt_entries_keep_only_their_defined_bits() {
    let mut apic = enabled_apic(0);
    let expected = [
        (LVT_CMCI, 0x0001_07FF),
        (LVT_TIMER, 0x0007_00FF),
        (LVT_THERMAL, 0x0001_07FF),
        (LVT_PERF, 0x0001_07FF),
        (LVT_LINT0, 0x0001_A7FF),
        (LVT_LINT1, 0x0001_A7FF),
        (LVT_ERROR, 0x0001_00FF),
    ];
    for (offset, value) in expected {
        write(&mut apic, offset, 0xFFFF_FFFF);
        assert_eq!(read(&mut apic, offset), value, "LVT {offset:#x}");
        write(&mut apic, offset, 0x0000_0031);
        assert_eq!(read(&mut apic, offset), 0x31, "LVT {offset:#x} unmasked");
    }
}

#[test]
fn software_disable_masks_every_lvt_and_keeps_them_masked() {
    let mut apic = enabled_apic(0);
    write(&mut apic, LVT_LINT0, 0x700);
    write(&mut apic, LVT_TIMER, 0x20031);
    let effects = write(&mut apic, SVR, 0x0FF);
    assert!(effects.addressing_changed);
    assert_eq!(read(&mut apic, LVT_LINT0), 0x0001_0700);
    assert_eq!(read(&mut apic, LVT_TIMER), 0x0003_0031);
    write(&mut apic, LVT_ERROR, 0x00FE);
    assert_eq!(
        read(&mut apic, LVT_ERROR),
        0x0001_00FE,
        "cannot unmask while disabled"
    );
    assert!(write(&mut apic, SVR, 0x1FF).addressing_changed);
    assert!(!write(&mut apic, SVR, 0x3FF).addressing_changed);
    assert_eq!(read(&mut apic, SVR), 0x3FF);
    write(&mut apic, SVR, 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, SVR), 0x3FF, "bits 10 and up are reserved");
    // Enabling again does not unmask.
    assert_eq!(read(&mut apic, LVT_LINT0), 0x0001_0700);
}

#[test]
fn icr_low_write_sends_to_icr_high_destination() {
    let mut apic = enabled_apic(0);
    assert_eq!(
        write(&mut apic, ICR_HIGH, 0x0312_3456),
        ApicEffects::default()
    );
    assert_eq!(read(&mut apic, ICR_HIGH), 0x0300_0000);
    let effects = write(&mut apic, ICR_LOW, 0xFFF3_1841);
    assert_eq!(
        effects.ipi,
        Some(InterruptMessage {
            vector: 0x41,
            delivery: DeliveryMode::Fixed,
            dest_mode: DestinationMode::Logical,
            destination: 3,
            trigger: TriggerMode::Edge,
            level_assert: true,
            shorthand: Shorthand::None,
        })
    );
    // Delivery status (bit 12) reads 0; reserved bits are dropped.
    assert_eq!(read(&mut apic, ICR_LOW), 0x0000_0841);
    let effects = write(&mut apic, ICR_LOW, 0x0004_0042);
    assert_eq!(
        effects.ipi.map(|m| (m.vector, m.shorthand)),
        Some((0x42, Shorthand::SelfOnly))
    );
}

#[test]
fn icr_illegal_vector_is_not_sent_and_logged() {
    let mut apic = enabled_apic(0);
    assert_eq!(write(&mut apic, ICR_LOW, 0x0000_0005).ipi, None);
    assert_eq!(latch_esr(&mut apic), 1 << 5);
    // NMI and INIT carry no vector: not illegal.
    assert!(write(&mut apic, ICR_LOW, 0x0000_0400).ipi.is_some());
    assert!(write(&mut apic, ICR_LOW, 0x0000_4500).ipi.is_some());
    // INIT de-assert sends nothing.
    assert_eq!(write(&mut apic, ICR_LOW, 0x0000_8500).ipi, None);
    assert_eq!(latch_esr(&mut apic), 0);
}

#[test]
fn esr_reads_what_the_last_write_latched() {
    let mut apic = enabled_apic(0);
    apic.accept(&edge(0x01));
    assert_eq!(read(&mut apic, ESR), 0, "not latched before a write");
    write(&mut apic, ESR, 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, ESR), 1 << 6);
    assert_eq!(read(&mut apic, ESR), 1 << 6, "reading does not clear");
    write(&mut apic, ICR_LOW, 0x0000_0001);
    assert_eq!(
        read(&mut apic, ESR),
        1 << 6,
        "new errors show only after a write"
    );
    write(&mut apic, ESR, 0);
    assert_eq!(read(&mut apic, ESR), 1 << 5);
    write(&mut apic, ESR, 0);
    assert_eq!(read(&mut apic, ESR), 0);
}

#[test]
fn eoi_write_reports_the_retired_vector() {
    let mut apic = enabled_apic(0);
    apic.accept(&level(0x33));
    apic.acknowledge();
    let effects = write(&mut apic, EOI, 0x1234);
    assert_eq!(
        effects.eoi,
        Some(EoiEffect {
            vector: 0x33,
            level: true
        })
    );
}

#[test]
fn page_is_not_the_apic_in_x2apic_mode_or_when_disabled() {
    let mut apic = x2apic_apic(1);
    let mut data = [0; 4];
    apic.mmio_read(ID, &mut data, 0);
    assert_eq!(data, [0xFF; 4]);
    assert_eq!(write(&mut apic, TPR, 0x50), ApicEffects::default());
    assert_eq!(apic.msr_read(0x808, 0), Ok(0));
    let mut disabled = LocalApic::new(1, false, TSC_KHZ);
    disabled.set_apic_base(LocalApic::DEFAULT_BASE).unwrap();
    disabled.mmio_read(VERSION, &mut data, 0);
    assert_eq!(data, [0xFF; 4]);
}

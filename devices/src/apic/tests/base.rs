//! IA32_APIC_BASE transitions, resets, INIT.

use super::*;

const EN: u64 = 1 << 11;
const EXTD: u64 = 1 << 10;
const BSP: u64 = 1 << 8;

#[test]
fn power_on_base_values() {
    assert_eq!(LocalApic::new(0, true, TSC_KHZ).apic_base(), 0xFEE0_0900);
    let ap = LocalApic::new(1, false, TSC_KHZ);
    assert_eq!(ap.apic_base(), 0xFEE0_0800);
    assert_eq!(ap.mmio_base(), 0xFEE0_0000);
    assert!(ap.globally_enabled());
    assert!(!ap.software_enabled());
    assert!(!ap.x2apic_mode());
}

#[test]
fn xapic_to_x2apic_keeps_registers_and_switches_addressing() {
    let mut apic = enabled_apic(0x21);
    write(&mut apic, TPR, 0x30);
    write(&mut apic, LDR, 0x0400_0000);
    let effects = apic.set_apic_base(X2_BASE | BSP).unwrap();
    assert_eq!(
        effects,
        ApicEffects {
            addressing_changed: true,
            ..ApicEffects::default()
        }
    );
    assert_eq!(apic.apic_base(), 0xFEE0_0D00);
    assert_eq!(apic.msr_read(0x808, 0), Ok(0x30));
    assert_eq!(apic.msr_read(0x80F, 0), Ok(0x1FF));
    assert_eq!(apic.addressing().ldr, 0x0002_0002);
    assert_eq!(apic.addressing().apic_id, 0x21);
}

#[test]
fn x2apic_to_xapic_directly_is_refused_and_changes_nothing() {
    let mut apic = x2apic_apic(1);
    apic.msr_write(0x808, 0x40, 0).unwrap();
    let value = LocalApic::DEFAULT_BASE | EN;
    assert_eq!(
        apic.set_apic_base(value),
        Err(ApicError::X2apicToXapic { value })
    );
    assert_eq!(apic.apic_base(), X2_BASE);
    assert_eq!(apic.msr_read(0x808, 0), Ok(0x40));
}

#[test]
fn disabled_to_x2apic_and_extd_without_en_are_refused() {
    let mut apic = LocalApic::new(1, false, TSC_KHZ);
    let invalid = LocalApic::DEFAULT_BASE | EXTD;
    assert_eq!(
        apic.set_apic_base(invalid),
        Err(ApicError::BaseInvalidMode { value: invalid })
    );
    apic.set_apic_base(LocalApic::DEFAULT_BASE).unwrap();
    assert_eq!(
        apic.set_apic_base(X2_BASE),
        Err(ApicError::DisabledToX2apic { value: X2_BASE })
    );
    assert_eq!(apic.apic_base(), LocalApic::DEFAULT_BASE);
}

#[test]
fn reserved_base_bits_are_refused() {
    let mut apic = LocalApic::new(1, false, TSC_KHZ);
    for reserved in [1_u64, 1 << 7, 1 << 9, 1 << 52, 1 << 63] {
        let value = LocalApic::DEFAULT_BASE | EN | reserved;
        assert_eq!(
            apic.set_apic_base(value),
            Err(ApicError::BaseReservedBits { value, reserved }),
        );
    }
    assert_eq!(apic.apic_base(), 0xFEE0_0800);
}

#[test]
fn disabling_then_reenabling_gives_a_fresh_apic() {
    let mut apic = enabled_apic(5);
    write(&mut apic, ID, 0x0900_0000);
    write(&mut apic, TPR, 0x20);
    write(&mut apic, LDR, 0x0100_0000);
    write(&mut apic, DFR, 0x0FFF_FFFF);
    write(&mut apic, LVT_TIMER, 0x0002_0040);
    write(&mut apic, INITIAL_COUNT, 1000);
    apic.accept(&edge(0x50));
    apic.accept(&with_mode(DeliveryMode::Nmi, 0));
    let effects = apic.set_apic_base(LocalApic::DEFAULT_BASE).unwrap();
    assert_eq!(
        effects,
        ApicEffects {
            timer_changed: true,
            addressing_changed: true,
            ..ApicEffects::default()
        }
    );
    assert!(!apic.addressing().globally_enabled);
    assert_eq!(apic.timer_deadline(), None);
    let effects = apic.set_apic_base(LocalApic::DEFAULT_BASE | EN).unwrap();
    assert!(effects.addressing_changed);
    assert_eq!(read(&mut apic, ID), 0x0500_0000);
    assert_eq!(read(&mut apic, TPR), 0);
    assert_eq!(read(&mut apic, LDR), 0);
    assert_eq!(read(&mut apic, DFR), 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, SVR), 0xFF);
    assert_eq!(read(&mut apic, LVT_TIMER), 0x0001_0000);
    assert_eq!(read(&mut apic, INITIAL_COUNT), 0);
    assert_eq!(read(&mut apic, IRR0 + 0x50), 0);
    assert!(!apic.take_nmi());
    assert_eq!(apic.addressing(), ApicAddressing::power_on(5));
}

#[test]
fn x2apic_to_disabled_to_xapic_is_the_way_back() {
    let mut apic = x2apic_apic(0x300);
    assert!(apic.set_apic_base(LocalApic::DEFAULT_BASE).is_ok());
    assert!(apic.set_apic_base(LocalApic::DEFAULT_BASE | EN).is_ok());
    assert!(!apic.x2apic_mode());
    // The xAPIC ID register only holds the low 8 bits of a wide ID.
    assert_eq!(read(&mut apic, ID), 0);
    assert_eq!(apic.addressing().apic_id, 0);
}

#[test]
fn same_value_and_relocation_have_no_mode_effects() {
    let mut apic = enabled_apic(1);
    assert_eq!(apic.set_apic_base(0xFEE0_0800), Ok(ApicEffects::default()));
    assert_eq!(
        apic.set_apic_base(0x1_0000_0800),
        Ok(ApicEffects::default())
    );
    assert_eq!(apic.mmio_base(), 0x1_0000_0000);
    assert_eq!(
        read(&mut apic, SVR),
        0x1FF,
        "moving the page keeps the registers"
    );
}

#[test]
fn init_resets_registers_but_keeps_id_mode_and_pending_sipi() {
    let mut apic = enabled_apic(3);
    write(&mut apic, ID, 0x0400_0000);
    write(&mut apic, TPR, 0x70);
    write(&mut apic, LDR, 0x0800_0000);
    write(&mut apic, LVT_TIMER, 0x0002_0040);
    write(&mut apic, INITIAL_COUNT, 100);
    apic.accept(&edge(0x80));
    apic.acknowledge();
    apic.accept(&with_mode(DeliveryMode::Init, 0));
    apic.accept(&with_mode(DeliveryMode::Nmi, 0));
    assert!(apic.take_init());
    apic.accept(&with_mode(DeliveryMode::StartUp, 0x10));
    let effects = apic.reset_init();
    assert_eq!(
        effects,
        ApicEffects {
            timer_changed: true,
            addressing_changed: true,
            ..ApicEffects::default()
        }
    );
    assert_eq!(read(&mut apic, ID), 0x0400_0000);
    assert_eq!(apic.apic_base(), 0xFEE0_0800);
    assert_eq!(read(&mut apic, TPR), 0);
    assert_eq!(read(&mut apic, LDR), 0);
    assert_eq!(read(&mut apic, SVR), 0xFF);
    assert_eq!(read(&mut apic, ISR0 + 0x40), 0);
    assert_eq!(read(&mut apic, LVT_TIMER), 0x0001_0000);
    assert_eq!(apic.timer_deadline(), None);
    assert!(!apic.take_nmi());
    assert_eq!(apic.take_sipi(), Some(0x10));
}

#[test]
fn init_in_x2apic_mode_stays_in_x2apic_mode() {
    let mut apic = x2apic_apic(0x55);
    apic.reset_init();
    assert!(apic.x2apic_mode());
    assert_eq!(apic.msr_read(0x802, 0), Ok(0x55));
    assert_eq!(apic.msr_read(0x80F, 0), Ok(0xFF));
}

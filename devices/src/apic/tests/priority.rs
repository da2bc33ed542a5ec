//! TPR, PPR, ISR nesting, and the has_injectable / acknowledge / EOI cycle.

use super::*;

#[test]
fn tpr_masks_classes_at_or_below_it() {
    let mut apic = enabled_apic(0);
    apic.accept(&edge(0x45));
    write(&mut apic, TPR, 0x50);
    assert_eq!(apic.has_injectable(), None);
    write(&mut apic, TPR, 0x40);
    assert_eq!(apic.has_injectable(), None, "same class as TPR is masked");
    write(&mut apic, TPR, 0x3F);
    assert_eq!(apic.has_injectable(), Some(0x45));
    assert_eq!(read(&mut apic, PPR), 0x3F);
    assert_eq!(apic.acknowledge(), Some(0x45));
    assert_eq!(read(&mut apic, PPR), 0x40);
    assert_eq!(read(&mut apic, TPR), 0x3F);
}

#[test]
fn tpr_only_keeps_its_low_byte() {
    let mut apic = enabled_apic(0);
    write(&mut apic, TPR, 0xFFFF_FF21);
    assert_eq!(read(&mut apic, TPR), 0x21);
    assert_eq!(apic.tpr(), 0x21);
    assert_eq!(apic.cr8(), 2);
    apic.set_cr8(0xB);
    assert_eq!(read(&mut apic, TPR), 0xB0);
}

#[test]
fn ppr_is_tpr_or_the_isr_class() {
    let mut apic = enabled_apic(0);
    apic.accept(&edge(0x45));
    apic.acknowledge();
    write(&mut apic, TPR, 0x5A);
    assert_eq!(read(&mut apic, PPR), 0x5A);
    write(&mut apic, TPR, 0x4A);
    assert_eq!(
        read(&mut apic, PPR),
        0x4A,
        "TPR class equal to ISRV class wins"
    );
    write(&mut apic, TPR, 0x2A);
    assert_eq!(read(&mut apic, PPR), 0x40);
    assert_eq!(apic.ppr(), 0x40);
}

#[test]
fn isr_nesting_only_higher_classes_preempt() {
    let mut apic = enabled_apic(0);
    apic.accept(&edge(0x40));
    assert_eq!(apic.acknowledge(), Some(0x40));
    apic.accept(&edge(0x4F));
    assert_eq!(apic.has_injectable(), None, "same class waits");
    apic.accept(&edge(0x51));
    assert_eq!(apic.acknowledge(), Some(0x51));
    assert_eq!(read(&mut apic, ISR0 + 0x20), 1 << 17 | 1);
    assert_eq!(read(&mut apic, PPR), 0x50);
    assert_eq!(apic.has_injectable(), None);
    // EOI retires the highest in-service vector first.
    let effects = write(&mut apic, EOI, 0);
    assert_eq!(
        effects.eoi,
        Some(EoiEffect {
            vector: 0x51,
            level: false
        })
    );
    assert_eq!(read(&mut apic, PPR), 0x40);
    assert_eq!(apic.has_injectable(), None);
    let effects = write(&mut apic, EOI, 0);
    assert_eq!(
        effects.eoi,
        Some(EoiEffect {
            vector: 0x40,
            level: false
        })
    );
    assert_eq!(apic.acknowledge(), Some(0x4F));
}

#[test]
fn several_vectors_are_injected_highest_first() {
    let mut apic = enabled_apic(0);
    for vector in [0x30, 0x80, 0x55, 0x81] {
        apic.accept(&edge(vector));
    }
    let mut order = Vec::new();
    while let Some(vector) = apic.acknowledge() {
        order.push(vector);
        assert_eq!(write(&mut apic, EOI, 0).eoi.map(|e| e.vector), Some(vector));
    }
    assert_eq!(order, vec![0x81, 0x80, 0x55, 0x30]);
    assert_eq!(read(&mut apic, IRR0 + 0x40), 0);
    assert_eq!(read(&mut apic, ISR0 + 0x40), 0);
}

#[test]
fn interrupt_raised_again_while_in_service_waits_for_eoi() {
    let mut apic = enabled_apic(0);
    apic.accept(&edge(0x61));
    assert_eq!(apic.acknowledge(), Some(0x61));
    apic.accept(&edge(0x61));
    assert_eq!(apic.has_injectable(), None);
    write(&mut apic, EOI, 0);
    assert_eq!(apic.acknowledge(), Some(0x61));
}

#[test]
fn eoi_reports_level_from_tmr() {
    let mut apic = enabled_apic(0);
    apic.accept(&level(0x71));
    apic.accept(&edge(0x72));
    assert_eq!(apic.acknowledge(), Some(0x72));
    assert_eq!(
        write(&mut apic, EOI, 0).eoi,
        Some(EoiEffect {
            vector: 0x72,
            level: false
        })
    );
    assert_eq!(apic.acknowledge(), Some(0x71));
    assert_eq!(
        write(&mut apic, EOI, 0).eoi,
        Some(EoiEffect {
            vector: 0x71,
            level: true
        })
    );
    assert_eq!(
        write(&mut apic, EOI, 0),
        ApicEffects::default(),
        "nothing in service"
    );
}

#[test]
fn nothing_injectable_without_irr_and_acknowledge_changes_nothing() {
    let mut apic = enabled_apic(0);
    assert_eq!(apic.has_injectable(), None);
    assert_eq!(apic.acknowledge(), None);
    write(&mut apic, TPR, 0xF0);
    apic.accept(&edge(0xFF));
    assert_eq!(apic.acknowledge(), None);
    assert_eq!(read(&mut apic, IRR0 + 0x70), 1 << 31);
    assert_eq!(read(&mut apic, ISR0 + 0x70), 0);
}

#[test]
fn irr_held_across_software_disable_is_still_delivered() {
    let mut apic = enabled_apic(0);
    apic.accept(&edge(0x44));
    write(&mut apic, SVR, 0xFF);
    assert!(!apic.software_enabled());
    assert_eq!(apic.has_injectable(), Some(0x44));
}

//! accept(): every delivery mode, IRR/TMR, pending requests, disabled APICs.

use super::*;

#[test]
fn fixed_edge_sets_irr_and_clears_tmr() {
    let mut apic = enabled_apic(0);
    apic.accept(&level(0x41));
    assert_eq!(read(&mut apic, TMR0 + 0x20), 1 << 1);
    assert_eq!(
        apic.accept(&edge(0x41)),
        Accepted::Irr {
            vector: 0x41,
            coalesced: true
        }
    );
    assert_eq!(read(&mut apic, IRR0 + 0x20), 1 << 1);
    assert_eq!(read(&mut apic, TMR0 + 0x20), 0);
    assert_eq!(
        apic.accept(&edge(0xFE)),
        Accepted::Irr {
            vector: 0xFE,
            coalesced: false
        }
    );
    assert_eq!(read(&mut apic, IRR0 + 0x70), 1 << 30);
}

#[test]
fn fixed_level_sets_tmr() {
    let mut apic = enabled_apic(0);
    assert_eq!(
        apic.accept(&level(0x93)),
        Accepted::Irr {
            vector: 0x93,
            coalesced: false
        }
    );
    assert_eq!(read(&mut apic, IRR0 + 0x40), 1 << 19);
    assert_eq!(read(&mut apic, TMR0 + 0x40), 1 << 19);
    for word in [0, 1, 2, 3, 5, 6, 7] {
        assert_eq!(read(&mut apic, IRR0 + 0x10 * word), 0, "IRR word {word}");
        assert_eq!(read(&mut apic, TMR0 + 0x10 * word), 0, "TMR word {word}");
    }
}

#[test]
fn lowest_priority_is_received_like_fixed() {
    let mut apic = enabled_apic(0);
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::LowestPriority, 0x62)),
        Accepted::Irr {
            vector: 0x62,
            coalesced: false
        }
    );
    assert_eq!(apic.has_injectable(), Some(0x62));
}

#[test]
fn nmi_is_a_pending_request_taken_once() {
    let mut apic = enabled_apic(0);
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::Nmi, 0x02)),
        Accepted::Nmi
    );
    assert_eq!(read(&mut apic, IRR0), 0);
    assert!(apic.take_nmi());
    assert!(!apic.take_nmi());
}

#[test]
fn init_then_sipi_and_stale_sipi_dropped() {
    let mut apic = LocalApic::new(1, false, TSC_KHZ);
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::StartUp, 0x11)),
        Accepted::StartUp { vector: 0x11 }
    );
    // INIT drops the SIPI that came before it.
    let init = InterruptMessage {
        trigger: TriggerMode::Level,
        ..with_mode(DeliveryMode::Init, 0)
    };
    assert_eq!(apic.accept(&init), Accepted::Init);
    assert_eq!(apic.take_sipi(), None);
    assert!(apic.take_init());
    assert!(!apic.take_init());
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::StartUp, 0x9A)),
        Accepted::StartUp { vector: 0x9A }
    );
    assert_eq!(apic.take_sipi(), Some(0x9A));
    assert_eq!(apic.take_sipi(), None);
}

#[test]
fn init_level_deassert_is_discarded() {
    let mut apic = LocalApic::new(1, false, TSC_KHZ);
    let deassert = InterruptMessage {
        trigger: TriggerMode::Level,
        level_assert: false,
        ..with_mode(DeliveryMode::Init, 0)
    };
    assert_eq!(
        apic.accept(&deassert),
        Accepted::Discarded(DiscardReason::InitDeassert)
    );
    assert!(!apic.take_init());
}

#[test]
fn smi_and_extint_are_pending_requests() {
    let mut apic = enabled_apic(0);
    assert_eq!(apic.accept(&with_mode(DeliveryMode::Smi, 0)), Accepted::Smi);
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::ExtInt, 0)),
        Accepted::ExtInt
    );
    assert!(apic.take_smi());
    assert!(!apic.take_smi());
    assert!(apic.take_extint());
    assert!(!apic.take_extint());
    assert_eq!(apic.has_injectable(), None);
}

#[test]
fn software_disabled_apic_takes_only_nmi_smi_init_sipi() {
    let mut apic = LocalApic::new(1, false, TSC_KHZ);
    let soft = Accepted::Discarded(DiscardReason::SoftwareDisabled);
    assert_eq!(apic.accept(&edge(0x40)), soft);
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::LowestPriority, 0x40)),
        soft
    );
    assert_eq!(apic.accept(&with_mode(DeliveryMode::ExtInt, 0)), soft);
    assert_eq!(read(&mut apic, IRR0 + 0x20), 0);
    assert_eq!(apic.accept(&with_mode(DeliveryMode::Nmi, 0)), Accepted::Nmi);
    assert_eq!(apic.accept(&with_mode(DeliveryMode::Smi, 0)), Accepted::Smi);
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::Init, 0)),
        Accepted::Init
    );
    assert_eq!(
        apic.accept(&with_mode(DeliveryMode::StartUp, 0x10)),
        Accepted::StartUp { vector: 0x10 }
    );
}

#[test]
fn globally_disabled_apic_takes_nothing() {
    let mut apic = enabled_apic(1);
    apic.set_apic_base(LocalApic::DEFAULT_BASE).unwrap();
    let hard = Accepted::Discarded(DiscardReason::GloballyDisabled);
    for mode in [
        DeliveryMode::Fixed,
        DeliveryMode::LowestPriority,
        DeliveryMode::Smi,
        DeliveryMode::Nmi,
        DeliveryMode::Init,
        DeliveryMode::StartUp,
        DeliveryMode::ExtInt,
    ] {
        assert_eq!(apic.accept(&with_mode(mode, 0x40)), hard, "{mode:?}");
    }
    assert!(!apic.take_nmi());
    assert!(!apic.take_init());
    assert_eq!(apic.take_sipi(), None);
}

#[test]
fn illegal_vector_is_logged_and_raises_the_error_lvt() {
    let mut apic = enabled_apic(0);
    assert_eq!(
        apic.accept(&edge(0x0F)),
        Accepted::Discarded(DiscardReason::IllegalVector)
    );
    assert_eq!(read(&mut apic, IRR0), 0);
    assert_eq!(latch_esr(&mut apic), 1 << 6);
    // With the error LVT unmasked, the error becomes an interrupt.
    write(&mut apic, LVT_ERROR, 0xFE);
    apic.accept(&edge(0x03));
    assert_eq!(apic.has_injectable(), Some(0xFE));
    assert_eq!(read(&mut apic, TMR0 + 0x70), 0);
    assert_eq!(latch_esr(&mut apic), 1 << 6);
    assert_eq!(latch_esr(&mut apic), 0);
}

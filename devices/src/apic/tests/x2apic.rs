//! x2APIC MSR access: mode rules, read-only / write-only registers, reserved bits, ICR,
//! SELF IPI.

use super::*;

#[test]
fn msr_access_outside_x2apic_mode_is_an_error() {
    let mut apic = enabled_apic(1);
    assert_eq!(
        apic.msr_read(0x802, 0),
        Err(ApicError::NotX2apicMode { msr: 0x802 })
    );
    assert_eq!(
        apic.msr_write(0x808, 0x10, 0),
        Err(ApicError::NotX2apicMode { msr: 0x808 })
    );
    assert_eq!(read(&mut apic, TPR), 0);
}

#[test]
fn id_and_ldr_are_derived_and_read_only() {
    let mut apic = x2apic_apic(0x1234);
    assert_eq!(apic.msr_read(0x802, 0), Ok(0x1234));
    assert_eq!(apic.msr_read(0x80D, 0), Ok(0x0123_0010));
    assert_eq!(
        apic.msr_write(0x802, 5, 0),
        Err(ApicError::ReadOnly { msr: 0x802 })
    );
    assert_eq!(
        apic.msr_write(0x80D, 1, 0),
        Err(ApicError::ReadOnly { msr: 0x80D })
    );
    assert_eq!(apic.msr_read(0x802, 0), Ok(0x1234));
    assert_eq!(
        apic.addressing(),
        ApicAddressing {
            apic_id: 0x1234,
            enabled: true,
            globally_enabled: true,
            x2apic: true,
            ldr: 0x0123_0010,
            dfr: 0xFFFF_FFFF,
        }
    );
}

#[test]
fn xapic_only_registers_do_not_exist() {
    let mut apic = x2apic_apic(1);
    for msr in [
        0x809, 0x80C, 0x80E, 0x831, 0x800, 0x801, 0x804, 0x829, 0x83A, 0x840, 0x8FF,
    ] {
        assert_eq!(
            apic.msr_read(msr, 0),
            Err(ApicError::ReservedRegister { msr }),
            "{msr:#x}"
        );
        assert_eq!(
            apic.msr_write(msr, 0, 0),
            Err(ApicError::ReservedRegister { msr }),
            "{msr:#x}"
        );
    }
    assert_eq!(
        apic.msr_read(0x7FF, 0),
        Err(ApicError::ReservedRegister { msr: 0x7FF })
    );
}

#[test]
fn read_only_registers_reject_writes() {
    let mut apic = x2apic_apic(1);
    for msr in [0x803, 0x80A, 0x810, 0x817, 0x818, 0x820, 0x827, 0x839] {
        assert_eq!(
            apic.msr_write(msr, 0, 0),
            Err(ApicError::ReadOnly { msr }),
            "{msr:#x}"
        );
    }
    assert_eq!(apic.msr_read(0x803, 0), Ok(0x0006_0014));
}

#[test]
fn eoi_is_write_only_and_must_be_zero() {
    let mut apic = x2apic_apic(1);
    apic.accept(&level(0x44));
    apic.acknowledge();
    assert_eq!(
        apic.msr_read(0x80B, 0),
        Err(ApicError::WriteOnly { msr: 0x80B })
    );
    assert_eq!(
        apic.msr_write(0x80B, 1, 0),
        Err(ApicError::ReservedBits {
            msr: 0x80B,
            value: 1,
            reserved: 1
        })
    );
    assert_eq!(
        apic.msr_read(0x812, 0),
        Ok(1 << 4),
        "a refused EOI retires nothing"
    );
    let effects = apic.msr_write(0x80B, 0, 0).unwrap();
    assert_eq!(
        effects.eoi,
        Some(EoiEffect {
            vector: 0x44,
            level: true
        })
    );
    assert_eq!(apic.msr_read(0x812, 0), Ok(0));
}

#[test]
fn icr_is_one_64_bit_register_with_a_32_bit_destination() {
    let mut apic = x2apic_apic(1);
    let value = 0x0001_0004_u64 << 32 | 0x0000_4831;
    let effects = apic.msr_write(0x830, value, 0).unwrap();
    assert_eq!(
        effects.ipi,
        Some(InterruptMessage {
            vector: 0x31,
            delivery: DeliveryMode::Fixed,
            dest_mode: DestinationMode::Logical,
            destination: 0x0001_0004,
            trigger: TriggerMode::Edge,
            level_assert: true,
            shorthand: Shorthand::None,
        })
    );
    assert_eq!(apic.msr_read(0x830, 0), Ok(value));
    let broadcast = apic.msr_write(0x830, 0xFFFF_FFFF_0000_00F0, 0).unwrap();
    assert_eq!(broadcast.ipi.map(|m| m.destination), Some(0xFFFF_FFFF));
}

#[test]
fn icr_reserved_bits_are_errors() {
    let mut apic = x2apic_apic(1);
    for bit in [12, 13, 16, 17, 20, 31] {
        let value = 1_u64 << bit | 0x30;
        assert_eq!(
            apic.msr_write(0x830, value, 0),
            Err(ApicError::ReservedBits {
                msr: 0x830,
                value,
                reserved: 1 << bit
            }),
            "bit {bit}"
        );
    }
    assert_eq!(
        apic.msr_read(0x830, 0),
        Ok(0),
        "refused writes store nothing"
    );
}

#[test]
fn self_ipi_sends_a_fixed_ipi_to_self() {
    let mut apic = x2apic_apic(0x42);
    assert_eq!(
        apic.msr_read(0x83F, 0),
        Err(ApicError::WriteOnly { msr: 0x83F })
    );
    let effects = apic.msr_write(0x83F, 0xEC, 0).unwrap();
    assert_eq!(
        effects.ipi,
        Some(InterruptMessage {
            vector: 0xEC,
            delivery: DeliveryMode::Fixed,
            dest_mode: DestinationMode::Physical,
            destination: 0x42,
            trigger: TriggerMode::Edge,
            level_assert: true,
            shorthand: Shorthand::SelfOnly,
        })
    );
    assert_eq!(
        apic.msr_write(0x83F, 0x1EC, 0),
        Err(ApicError::ReservedBits {
            msr: 0x83F,
            value: 0x1EC,
            reserved: 0x100
        })
    );
    assert_eq!(apic.msr_write(0x83F, 0x0E, 0).unwrap().ipi, None);
    apic.msr_write(0x828, 0, 0).unwrap();
    assert_eq!(apic.msr_read(0x828, 0), Ok(1 << 5));
    assert_eq!(apic.msr_read(0x830, 0), Ok(0), "SELF IPI leaves ICR alone");
}

#[test]
fn reserved_bits_in_32_bit_registers_are_errors() {
    let mut apic = x2apic_apic(1);
    let cases: [(u32, u64, u64); 7] = [
        (0x808, 0x100, 0x100),
        (0x808, 1 << 32 | 0x10, 1 << 32),
        (0x80F, 0x1000 | 0x1FF, 0x1000),
        (0x828, 0x1, 0x1),
        (0x832, 1 << 19, 1 << 19),
        (0x83E, 0x4, 0x4),
        (0x838, 1 << 40, 1 << 40),
    ];
    for (msr, value, reserved) in cases {
        assert_eq!(
            apic.msr_write(msr, value, 0),
            Err(ApicError::ReservedBits {
                msr,
                value,
                reserved
            }),
            "{msr:#x}"
        );
    }
    assert_eq!(apic.msr_read(0x808, 0), Ok(0));
    assert_eq!(apic.msr_read(0x80F, 0), Ok(0x1FF));
    // Defined read-only LVT bits (delivery status, remote IRR) are not reserved.
    apic.msr_write(0x835, 0x0001_5000 | 0x31, 0).unwrap();
    assert_eq!(apic.msr_read(0x835, 0), Ok(0x0001_0031));
}

#[test]
fn common_registers_work_through_msrs() {
    let mut apic = x2apic_apic(1);
    let effects = apic.msr_write(0x808, 0x20, 0).unwrap();
    assert_eq!(effects, ApicEffects::default());
    assert_eq!(apic.msr_read(0x808, 0), Ok(0x20));
    apic.accept(&level(0x91));
    assert_eq!(apic.msr_read(0x824, 0), Ok(1 << 17));
    assert_eq!(apic.msr_read(0x81C, 0), Ok(1 << 17));
    assert_eq!(apic.acknowledge(), Some(0x91));
    assert_eq!(apic.msr_read(0x814, 0), Ok(1 << 17));
    assert_eq!(apic.msr_read(0x80A, 0), Ok(0x90));
    let effects = apic.msr_write(0x80F, 0xFF, 0).unwrap();
    assert!(effects.addressing_changed, "software disable");
    assert!(!apic.addressing().enabled);
}

//! Why a local APIC access failed. The caller turns every variant into a #GP(0) for the guest.

use thiserror::Error;

/// A guest access to the local APIC that the architecture answers with #GP(0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ApicError {
    /// An x2APIC MSR (0x800..=0x8FF) was read or written while the APIC is not in x2APIC mode.
    #[error(
        "x2APIC MSR {msr:#x} accessed while the local APIC is not in x2APIC mode \
         (IA32_APIC_BASE bit 10 clear)"
    )]
    NotX2apicMode {
        /// The MSR the guest accessed.
        msr: u32,
    },
    /// The MSR is not an x2APIC register (reserved, or an xAPIC-only register such as DFR,
    /// APR, RRD or ICR high).
    #[error("MSR {msr:#x} is not a register of the x2APIC")]
    ReservedRegister {
        /// The MSR the guest accessed.
        msr: u32,
    },
    /// The register is write-only (EOI, SELF IPI) and the guest read it.
    #[error("x2APIC register MSR {msr:#x} is write-only; the guest read it")]
    WriteOnly {
        /// The MSR the guest read.
        msr: u32,
    },
    /// The register is read-only (ID, version, PPR, LDR, ISR, TMR, IRR, current count) and
    /// the guest wrote it.
    #[error("x2APIC register MSR {msr:#x} is read-only; the guest wrote it")]
    ReadOnly {
        /// The MSR the guest wrote.
        msr: u32,
    },
    /// A value written to an x2APIC register sets bits that are reserved in it (SDM 10.12.1.3:
    /// non-zero writes to reserved bits raise #GP).
    #[error("value {value:#x} written to x2APIC MSR {msr:#x} sets reserved bits {reserved:#x}")]
    ReservedBits {
        /// The MSR the guest wrote.
        msr: u32,
        /// The whole value written.
        value: u64,
        /// The reserved bits that were set.
        reserved: u64,
    },
    /// A value written to IA32_APIC_BASE sets reserved bits (0-7, 9, or above the 52-bit
    /// physical address width).
    #[error("IA32_APIC_BASE value {value:#x} sets reserved bits {reserved:#x}")]
    BaseReservedBits {
        /// The value written.
        value: u64,
        /// The reserved bits that were set.
        reserved: u64,
    },
    /// IA32_APIC_BASE would select x2APIC mode (bit 10) without the global enable (bit 11),
    /// a state the SDM calls invalid.
    #[error(
        "IA32_APIC_BASE value {value:#x} sets x2APIC mode (bit 10) without the global \
         enable (bit 11)"
    )]
    BaseInvalidMode {
        /// The value written.
        value: u64,
    },
    /// IA32_APIC_BASE would go from x2APIC mode straight to xAPIC mode; the SDM requires
    /// disabling the APIC first.
    #[error(
        "IA32_APIC_BASE value {value:#x} would leave x2APIC mode for xAPIC mode directly; \
         the APIC must be disabled (bit 11 clear) in between"
    )]
    X2apicToXapic {
        /// The value written.
        value: u64,
    },
    /// IA32_APIC_BASE would go from disabled straight to x2APIC mode; the SDM requires
    /// entering xAPIC mode first.
    #[error(
        "IA32_APIC_BASE value {value:#x} would enter x2APIC mode from the disabled state; \
         xAPIC mode (bit 11 alone) must be entered first"
    )]
    DisabledToX2apic {
        /// The value written.
        value: u64,
    },
}

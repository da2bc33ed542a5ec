//! The local vector table: which entries exist and which of their bits the guest may write.

/// One entry of the local vector table, in the order of its index into `LocalApic::lvt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lvt {
    /// Corrected machine-check interrupt (offset 0x2F0).
    Cmci,
    /// The APIC timer (0x320).
    Timer,
    /// Thermal sensor (0x330).
    Thermal,
    /// Performance-monitoring counters (0x340).
    Perf,
    /// LINT0 pin (0x350).
    Lint0,
    /// LINT1 pin (0x360).
    Lint1,
    /// APIC internal error (0x370).
    Error,
}

/// Number of LVT entries; the version register reports this minus one as "max LVT".
pub(crate) const LVT_COUNT: usize = 7;

/// The mask bit, common to every entry.
pub(crate) const LVT_MASKED: u32 = 1 << 16;

/// An entry after reset: masked, everything else zero.
pub(crate) const LVT_RESET: u32 = LVT_MASKED;

const VECTOR: u32 = 0xFF;
const DELIVERY_MODE: u32 = 0x700;
const DELIVERY_STATUS: u32 = 1 << 12;
const PIN_POLARITY: u32 = 1 << 13;
const REMOTE_IRR: u32 = 1 << 14;
const TRIGGER_MODE: u32 = 1 << 15;
const TIMER_MODE: u32 = 3 << 17;

impl Lvt {
    /// The entry's index into the LVT array.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// The bits the guest can change.
    pub(crate) const fn writable(self) -> u32 {
        match self {
            Self::Timer => VECTOR | LVT_MASKED | TIMER_MODE,
            Self::Error => VECTOR | LVT_MASKED,
            Self::Cmci | Self::Thermal | Self::Perf => VECTOR | DELIVERY_MODE | LVT_MASKED,
            Self::Lint0 | Self::Lint1 => {
                VECTOR | DELIVERY_MODE | PIN_POLARITY | TRIGGER_MODE | LVT_MASKED
            }
        }
    }

    /// The defined bits the guest can read but not change; in x2APIC mode writing them is not
    /// a reserved-bit violation, everything else outside `writable` is.
    pub(crate) const fn read_only(self) -> u32 {
        match self {
            Self::Lint0 | Self::Lint1 => DELIVERY_STATUS | REMOTE_IRR,
            _ => DELIVERY_STATUS,
        }
    }
}

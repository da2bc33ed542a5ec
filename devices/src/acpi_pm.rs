//! The ACPI power-management registers of a hardware-reduced ACPI platform: the sleep control
//! and sleep status registers and the reset register that the FADT points at.
//!
//! A guest powers off by writing `SLP_TYP(S5) | SLP_EN` to the sleep control register (the
//! ACPI "extended sleep" of hardware-reduced platforms, with the S5 type from the DSDT's
//! `_S5_` package), and resets by writing [`RESET_VALUE`] to the reset register. Both are one
//! byte at a port of [`ACPI_PM_PORT`]'s range; the device turns them into the callbacks it was
//! built with. Other sleep states are not supported: their requests are ignored, which a guest
//! sees as a sleep that returned at once.

use std::sync::Arc;

use crate::bus::BusDevice;

/// First port of the device.
pub const ACPI_PM_PORT: u64 = 0x600;
/// Number of ports the device claims.
pub const ACPI_PM_PORT_LEN: u64 = 4;
/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`, 8 bits, write).
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`, 8 bits).
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (FADT `RESET_REG`, 8 bits, write).
pub const RESET_OFFSET: u64 = 2;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// The sleep type of S5 (soft off), as the DSDT's `_S5_` package declares it.
pub const SLP_TYP_S5: u8 = 5;
/// Position of the sleep type field in the sleep control register (bits 4:2).
pub const SLP_TYP_SHIFT: u8 = 2;
/// Mask of the sleep type field in the sleep control register.
pub const SLP_TYP_MASK: u8 = 0x1c;
/// The sleep enable bit of the sleep control register.
pub const SLP_EN: u8 = 0x20;
/// The wake status bit of the sleep status register (write 1 to clear).
pub const WAK_STS: u8 = 0x80;

/// What the guest asked of the platform; called with the index of the vCPU that asked.
pub type PowerCallback = Arc<dyn Fn(usize) + Send + Sync>;

/// The ACPI power-management device on the port bus.
pub struct AcpiPm {
    on_poweroff: PowerCallback,
    on_reset: PowerCallback,
}

impl AcpiPm {
    /// A device that calls `on_poweroff` when the guest enters S5 and `on_reset` when it writes
    /// the reset value. The callbacks run on the vCPU thread that made the access.
    pub fn new(on_poweroff: PowerCallback, on_reset: PowerCallback) -> Self {
        Self {
            on_poweroff,
            on_reset,
        }
    }

    /// The value a guest writes to the sleep control register to power off.
    pub fn poweroff_command() -> u8 {
        (SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, _vcpu: usize, _offset: u64, data: &mut [u8]) {
        // The guest never sleeps and wakes here, so wake status stays clear; the control and
        // reset registers are write-only and read as zero.
        data.fill(0);
    }

    fn write(&self, vcpu: usize, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET => {
                let sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                if value & SLP_EN != 0 && sleep_type == SLP_TYP_S5 {
                    (self.on_poweroff)(vcpu);
                }
            }
            RESET_OFFSET if value == RESET_VALUE => (self.on_reset)(vcpu),
            // Sleep status: clearing WAK_STS has nothing to clear.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counters {
        poweroff: Arc<AtomicUsize>,
        reset: Arc<AtomicUsize>,
    }

    fn device() -> (Arc<AcpiPm>, Counters) {
        let poweroff = Arc::new(AtomicUsize::new(0));
        let reset = Arc::new(AtomicUsize::new(0));
        let (p, r) = (poweroff.clone(), reset.clone());
        let dev = AcpiPm::new(
            Arc::new(move |_| {
                p.fetch_add(1, Ordering::SeqCst);
            }),
            Arc::new(move |_| {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (Arc::new(dev), Counters { poweroff, reset })
    }

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let (dev, c) = device();
        let mut bus = Bus::new();
        bus.insert(ACPI_PM_PORT, ACPI_PM_PORT_LEN, dev).unwrap();
        // What Linux's acpi_hw_extended_sleep writes: clear WAK_STS, then SLP_TYP|SLP_EN.
        assert!(bus.write(0, ACPI_PM_PORT + SLEEP_STATUS_OFFSET, &[WAK_STS]));
        assert_eq!(c.poweroff.load(Ordering::SeqCst), 0);
        assert!(bus.write(1, ACPI_PM_PORT + SLEEP_CONTROL_OFFSET, &[0x34]));
        assert_eq!(AcpiPm::poweroff_command(), 0x34);
        assert_eq!(c.poweroff.load(Ordering::SeqCst), 1);
        assert_eq!(c.reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn other_sleep_requests_do_nothing() {
        let (dev, c) = device();
        // S5 type without SLP_EN, SLP_EN with S1 and S3 types, and the reset value at the
        // control register.
        for value in [
            SLP_TYP_S5 << SLP_TYP_SHIFT,
            SLP_EN | (1 << 2),
            SLP_EN | (3 << 2),
            1,
        ] {
            dev.write(0, SLEEP_CONTROL_OFFSET, &[value]);
        }
        dev.write(0, 3, &[0xff]);
        dev.write(0, SLEEP_CONTROL_OFFSET, &[]);
        assert_eq!(c.poweroff.load(Ordering::SeqCst), 0);
        assert_eq!(c.reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn reset_value_resets_and_other_values_do_not() {
        let (dev, c) = device();
        dev.write(0, RESET_OFFSET, &[0x06]);
        dev.write(0, RESET_OFFSET, &[0x00]);
        assert_eq!(c.reset.load(Ordering::SeqCst), 0);
        dev.write(2, RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(c.reset.load(Ordering::SeqCst), 1);
        assert_eq!(c.poweroff.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn registers_read_as_zero() {
        let (dev, _) = device();
        for offset in 0..ACPI_PM_PORT_LEN {
            let mut data = [0xaau8; 2];
            dev.read(0, offset, &mut data);
            assert_eq!(data, [0, 0]);
        }
    }
}

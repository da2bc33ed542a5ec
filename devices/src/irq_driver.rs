//! The IRQ line driver: a test device, on the master only, through which a probe guest drives
//! an IOAPIC input pin on demand (no other device of the probe platform raises pins when asked).
//! A vCPU on another node reaches it like any master device, through forwarding.
//!
//! One 32-bit port: an `out` of `pin | op << 8` drives line `pin` (0..23): op 0 drives it low,
//! 1 high, 2 pulses it (high, then low). Other ops and pins do nothing. An `in` reads the
//! levels last driven, bit n for pin n. Lines are active-high for an entry programmed so.

use std::sync::Mutex;

use crate::bus::BusDevice;
use crate::ioapic::IOAPIC_PINS;

/// The driver's port.
pub const IRQ_DRIVER_PORT: u64 = 0x520;
/// Number of ports claimed.
pub const IRQ_DRIVER_PORT_LEN: u64 = 4;

/// Drives pins through `set(pin, high)` (the platform's IOAPIC input).
pub struct IrqDriver {
    levels: Mutex<u32>,
    set: Box<dyn Fn(usize, bool) + Send + Sync>,
}

impl IrqDriver {
    /// A driver whose line changes go to `set`.
    pub fn new(set: Box<dyn Fn(usize, bool) + Send + Sync>) -> Self {
        Self {
            levels: Mutex::new(0),
            set,
        }
    }
}

impl BusDevice for IrqDriver {
    fn read(&self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        let levels = *self.levels.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = levels.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            // An offset beyond usize is beyond the register too: it reads as 0 like any other.
            let byte = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = byte.and_then(|at| bytes.get(at)).copied().unwrap_or(0);
        }
    }

    fn write(&self, _vcpu: usize, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 4 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let pin = (value & 0xff) as usize;
        if pin >= IOAPIC_PINS {
            return;
        }
        // Held across the line changes so that concurrent commands apply in one order.
        let mut levels = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        match (value >> 8) & 0xff {
            0 => {
                *levels &= !(1 << pin);
                (self.set)(pin, false);
            }
            1 => {
                *levels |= 1 << pin;
                (self.set)(pin, true);
            }
            2 => {
                *levels &= !(1 << pin);
                (self.set)(pin, true);
                (self.set)(pin, false);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn drives_pulses_and_reads_back_lines() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let dev = IrqDriver::new(Box::new(move |pin, high| {
            s.lock().unwrap().push((pin, high))
        }));
        dev.write(0, 0, &(3u32 | 1 << 8).to_le_bytes());
        dev.write(0, 0, &(5u32 | 2 << 8).to_le_bytes());
        dev.write(0, 0, &(24u32 | 1 << 8).to_le_bytes()); // no such pin
        dev.write(0, 0, &(4u32 | 7 << 8).to_le_bytes()); // no such op
        dev.write(0, 0, &[1, 1]); // not a 32-bit write
        let mut levels = [0u8; 4];
        dev.read(0, 0, &mut levels);
        assert_eq!(u32::from_le_bytes(levels), 1 << 3);
        dev.write(0, 0, &3u32.to_le_bytes());
        dev.read(0, 0, &mut levels);
        assert_eq!(u32::from_le_bytes(levels), 0);
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            &[(3, true), (5, true), (5, false), (3, false)]
        );
    }
}

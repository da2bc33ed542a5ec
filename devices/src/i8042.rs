//! The i8042 keyboard controller, only as far as a guest uses it to reset the machine
//! (command 0xFE on port 0x64), through vm-superio.

use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Trigger};

use crate::bits::low_u8;
use crate::bus::BusDevice;

/// First port of the controller (data at 0x60, command/status at 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Length of the port range claimed.
pub const I8042_PORT_LEN: u64 = 5;

/// What a guest's reset request calls.
pub struct ResetRequest(pub Arc<dyn Fn() + Send + Sync>);

impl Trigger for ResetRequest {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// The controller on the port bus.
pub struct I8042 {
    dev: Mutex<I8042Device<ResetRequest>>,
}

impl I8042 {
    /// A controller that calls `on_reset` when the guest asks for a reset.
    pub fn new(on_reset: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self {
            dev: Mutex::new(I8042Device::new(ResetRequest(on_reset))),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        let v = dev.read(low_u8(offset));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&self, _vcpu: usize, offset: u64, data: &[u8]) {
        let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&b) = data.first() {
            let _ = dev.write(low_u8(offset), b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn command_fe_requests_reset() {
        let hit = Arc::new(AtomicBool::new(false));
        let h = hit.clone();
        let dev = I8042::new(Arc::new(move || h.store(true, Ordering::SeqCst)));
        dev.write(0, 4, &[0xaa]);
        assert!(!hit.load(Ordering::SeqCst));
        dev.write(0, 4, &[0xfe]);
        assert!(hit.load(Ordering::SeqCst));
    }
}

//! COM1: a 16550A UART (vm-superio) at port 0x3f8 on IRQ 4, whose output is the guest console.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::bits::low_u8;
use crate::bus::BusDevice;
use crate::irq_line::IrqLine;

/// The port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// The ISA IRQ (IOAPIC pin) of COM1.
pub const COM1_IRQ: usize = 4;

/// The serial interrupt as vm-superio wants it: a trigger that pulses our line.
pub struct SerialIrq(Arc<dyn IrqLine>);

impl Trigger for SerialIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// A serial port on the port-I/O bus.
pub struct SerialPort {
    uart: Mutex<Serial<SerialIrq, NoEvents, Box<dyn Write + Send>>>,
}

impl SerialPort {
    /// A UART whose output goes to `out` and whose interrupt raises `irq`.
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Mutex::new(Serial::new(SerialIrq(irq), out)),
        }
    }

    /// Input typed by the user; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        for b in data.iter_mut() {
            *b = uart.read(low_u8(offset));
        }
    }

    fn write(&self, _vcpu: usize, offset: u64, data: &[u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&b) = data.first() {
            // A write error means the console went away (closed terminal or pipe); the guest
            // must not stop because of it.
            let _ = uart.write(low_u8(offset), b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingLine(AtomicUsize);
    impl IrqLine for CountingLine {
        fn pulse(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn set_level(&self, _asserted: bool) {}
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_interrupts_when_enabled() {
        let line = Arc::new(CountingLine::default());
        let out = SharedBuf::default();
        let port = SerialPort::new(line.clone(), Box::new(out.clone()));
        for b in b"hi" {
            port.write(0, 0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
        assert_eq!(
            line.0.load(Ordering::SeqCst),
            0,
            "no interrupt before IER enables it"
        );
        port.write(0, 1, &[0x01]); // IER: received data available
        assert!(port.enqueue_input(b"x") == 1);
        assert!(line.0.load(Ordering::SeqCst) >= 1);
        let mut d = [0u8];
        port.read(0, 0, &mut d);
        assert_eq!(d[0], b'x');
    }
}

//! The emulated platform of a spanvm guest: the devices the VMM places on the guest's buses.
//!
//! Interrupt controller (pure logic, driven by the VMM's exit loop and timers): the local
//! APIC of each vCPU ([`apic`]), the IOAPIC ([`ioapic`]) and the messages between them with
//! their destination matching ([`interrupt`]). Devices: the port/MMIO bus ([`bus`]), the
//! COM1 serial console ([`serial`]), the i8042 reset ([`i8042`]) and the probe port
//! ([`probe_port`]); they raise interrupts through an [`irq_line::IrqLine`]. Virtio devices (block, entropy) on
//! the virtio-mmio transport are in [`virtio`].

pub mod acpi_pm;
pub mod apic;
mod bits;
pub mod bus;
pub mod i8042;
pub mod interrupt;
pub mod ioapic;
pub mod irq_driver;
pub mod irq_line;
pub mod probe_port;
pub mod serial;
pub mod virtio;

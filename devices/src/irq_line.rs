//! How a device raises its interrupt: a line into the interrupt controller, implemented by the
//! VMM (it routes the IOAPIC pin, locally or to the master).

/// One interrupt line of a device.
pub trait IrqLine: Send + Sync {
    /// Raises and lowers the line (an edge-triggered interrupt).
    fn pulse(&self);
    /// Sets the line's level (a level-triggered interrupt).
    fn set_level(&self, asserted: bool);
}

//! How messages leave and enter a local APIC: destination matching, ICR decoding and the
//! receiving side (IRR, ISR, priority, EOI).

pub(crate) mod destination;
pub(super) mod icr;
pub(super) mod receive;

//! Unit tests of the local APIC, one file per topic. Helpers drive the APIC the way a guest
//! does: through its MMIO page or its MSRs.

mod accept;
mod base;
mod priority;
mod properties;
mod timer;
mod x2apic;
mod xapic;

use super::*;
use crate::interrupt::{DeliveryMode, DestinationMode, Shorthand, TriggerMode};

/// 3 GHz: three TSC ticks per APIC bus nanosecond, so expected values are easy to check.
const TSC_KHZ: u32 = 3_000_000;

const ID: u64 = 0x20;
const VERSION: u64 = 0x30;
const TPR: u64 = 0x80;
const PPR: u64 = 0xA0;
const EOI: u64 = 0xB0;
const LDR: u64 = 0xD0;
const DFR: u64 = 0xE0;
const SVR: u64 = 0xF0;
const ISR0: u64 = 0x100;
const TMR0: u64 = 0x180;
const IRR0: u64 = 0x200;
const ESR: u64 = 0x280;
const LVT_CMCI: u64 = 0x2F0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const LVT_THERMAL: u64 = 0x330;
const LVT_PERF: u64 = 0x340;
const LVT_LINT0: u64 = 0x350;
const LVT_LINT1: u64 = 0x360;
const LVT_ERROR: u64 = 0x370;
const INITIAL_COUNT: u64 = 0x380;
const CURRENT_COUNT: u64 = 0x390;
const DIVIDE_CONFIG: u64 = 0x3E0;

const X2_BASE: u64 = LocalApic::DEFAULT_BASE | 1 << 11 | 1 << 10;

fn write(apic: &mut LocalApic, offset: u64, value: u32) -> ApicEffects {
    apic.mmio_write(offset, &value.to_le_bytes(), 0)
}

fn write_at(apic: &mut LocalApic, offset: u64, value: u32, now: u64) -> ApicEffects {
    apic.mmio_write(offset, &value.to_le_bytes(), now)
}

fn read(apic: &mut LocalApic, offset: u64) -> u32 {
    read_at(apic, offset, 0)
}

fn read_at(apic: &mut LocalApic, offset: u64, now: u64) -> u32 {
    let mut data = [0; 4];
    apic.mmio_read(offset, &mut data, now);
    u32::from_le_bytes(data)
}

/// An xAPIC-mode APIC, software-enabled with spurious vector 0xFF.
fn enabled_apic(apic_id: u32) -> LocalApic {
    let mut apic = LocalApic::new(apic_id, apic_id == 0, TSC_KHZ);
    write(&mut apic, SVR, 0x1FF);
    apic
}

/// An x2APIC-mode APIC, software-enabled with spurious vector 0xFF.
fn x2apic_apic(apic_id: u32) -> LocalApic {
    let mut apic = LocalApic::new(apic_id, apic_id == 0, TSC_KHZ);
    apic.set_apic_base(X2_BASE).unwrap();
    apic.msr_write(0x80F, 0x1FF, 0).unwrap();
    apic
}

fn edge(vector: u8) -> InterruptMessage {
    InterruptMessage::fixed(vector, 0)
}

fn level(vector: u8) -> InterruptMessage {
    InterruptMessage {
        trigger: TriggerMode::Level,
        ..InterruptMessage::fixed(vector, 0)
    }
}

fn with_mode(delivery: DeliveryMode, vector: u8) -> InterruptMessage {
    InterruptMessage {
        delivery,
        ..InterruptMessage::fixed(vector, 0)
    }
}

/// Latches and returns the ESR (write, then read).
fn latch_esr(apic: &mut LocalApic) -> u32 {
    write(apic, ESR, 0);
    read(apic, ESR)
}

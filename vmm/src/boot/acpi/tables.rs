//! The fixed-format tables: FADT, MADT, SRAT, SLIT.

use acpi_tables::sdt::Sdt;
use devices::acpi_pm::{
    ACPI_PM_PORT, RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use resources::{node_index, Layout, IOAPIC_GPA, LAPIC_GPA};

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::boot::BootError;

/// The interrupt the FADT names as SCI. A hardware-reduced platform raises none, but Linux
/// programs the SCI's ISA override whatever the FADT's flags say, so it gets a harmless one.
pub(crate) const SCI_IRQ: u8 = 9;
/// The IOAPIC's id in the MADT (its ID register reads 0 after reset).
pub(crate) const IOAPIC_ID: u8 = 0;
/// ISA IRQ 0 (the timer) arrives at GSI 2, as on every PC.
pub(crate) const TIMER_GSI: u32 = 2;
/// SLIT distance of a node to itself and to any other node.
///
/// A page on another spanvm node costs far more than 2x, but the remote distance stays at or
/// below Linux's `node_reclaim_distance` (30): above it the scheduler stops balancing forks and
/// execs across nodes, so the threads of a program started on node 0 all stay there, and with
/// `nohz_full` no idle balancing pulls them to an idle CPU of another node either (measured:
/// both sysbench threads on CPU 0 at distance 100).
pub(crate) const LOCAL_DISTANCE: u8 = 10;
pub(crate) const REMOTE_DISTANCE: u8 = 20;
/// Highest APIC ID a MADT "Processor Local APIC" entry holds; above it x2APIC entries.
const MAX_XAPIC_ID: u32 = 0xfe;

/// FADT flags.
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture flags: no VGA, no CMOS RTC (and, by omission, no i8042 worth
/// probing and no legacy devices).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Interrupt source override flags: active high, level-triggered.
const MPS_ACTIVE_HIGH_LEVEL: u16 = 0b1101;

fn header(signature: &[u8; 4], length: u32, revision: u8) -> Sdt {
    Sdt::new(
        *signature,
        length,
        revision,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    )
}

/// A generic address structure for a one-byte I/O port register.
fn io_port_register(port: u64) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = 1; // system I/O
    gas[1] = 8; // bit width
    gas[3] = 1; // byte access
    gas[4..].copy_from_slice(&port.to_le_bytes());
    gas
}

/// Field offsets of the FADT (ACPI 6.x, revision 6).
pub(crate) mod fadt_offsets {
    pub const LENGTH: u32 = 276;
    pub const DSDT: usize = 40;
    pub const SCI_INT: usize = 46;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const X_DSDT: usize = 140;
    pub const SLEEP_CONTROL_REG: usize = 244;
    pub const SLEEP_STATUS_REG: usize = 256;
    pub const HYPERVISOR_VENDOR: usize = 268;
}

/// A hardware-reduced FADT whose sleep control/status and reset registers are the ports of
/// `devices::acpi_pm`.
pub(crate) fn fadt(dsdt: u64) -> Vec<u8> {
    use fadt_offsets as o;
    let mut t = header(b"FACP", o::LENGTH, 6);
    t.write_u32(
        o::DSDT,
        u32::try_from(dsdt).expect("the ACPI area lies below 4 GiB"),
    );
    t.write_u64(o::X_DSDT, dsdt);
    t.write_u16(o::SCI_INT, u16::from(SCI_IRQ));
    t.write_u16(
        o::IAPC_BOOT_ARCH,
        IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT,
    );
    t.write_u32(
        o::FLAGS,
        FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI,
    );
    t.write_bytes(o::RESET_REG, &io_port_register(ACPI_PM_PORT + RESET_OFFSET));
    t.write_u8(o::RESET_VALUE, RESET_VALUE);
    t.write_bytes(
        o::SLEEP_CONTROL_REG,
        &io_port_register(ACPI_PM_PORT + SLEEP_CONTROL_OFFSET),
    );
    t.write_bytes(
        o::SLEEP_STATUS_REG,
        &io_port_register(ACPI_PM_PORT + SLEEP_STATUS_OFFSET),
    );
    t.write_bytes(o::HYPERVISOR_VENDOR, b"SPANVM\0\0");
    t.as_slice().to_vec()
}

/// The MADT: the local APIC address, one enabled local APIC (x2APIC above id 254) per vCPU
/// with APIC ID = vCPU index, the IOAPIC, the ISA overrides (timer to GSI 2, SCI level/high)
/// and LINT1 as NMI on every processor.
pub(crate) fn madt(layout: &Layout) -> Vec<u8> {
    let mut t = header(b"APIC", 44, 5);
    t.write_u32(
        36,
        u32::try_from(LAPIC_GPA).expect("the local APIC page is below 4 GiB"),
    );
    t.write_u32(40, 0); // no dual 8259
    for vcpu in 0..layout.vcpu_count {
        if vcpu <= MAX_XAPIC_ID {
            let id = u8::try_from(vcpu).expect("xAPIC IDs are at most MAX_XAPIC_ID");
            let mut e = vec![0u8, 8, id, id];
            e.extend_from_slice(&1u32.to_le_bytes()); // enabled
            t.append_slice(&e);
        } else {
            let mut e = vec![9u8, 16, 0, 0];
            e.extend_from_slice(&vcpu.to_le_bytes()); // x2APIC id
            e.extend_from_slice(&1u32.to_le_bytes()); // enabled
            e.extend_from_slice(&vcpu.to_le_bytes()); // processor uid
            t.append_slice(&e);
        }
    }
    let mut ioapic = vec![1u8, 12, IOAPIC_ID, 0];
    let ioapic_gpa = u32::try_from(IOAPIC_GPA).expect("the IOAPIC is below 4 GiB");
    ioapic.extend_from_slice(&ioapic_gpa.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.append_slice(&ioapic);
    for (irq, gsi, flags) in [
        (0u8, TIMER_GSI, 0u16),
        (SCI_IRQ, u32::from(SCI_IRQ), MPS_ACTIVE_HIGH_LEVEL),
    ] {
        let mut e = vec![2u8, 10, 0, irq];
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        t.append_slice(&e);
    }
    // Local APIC NMI: all processors (uid 0xff), conforming polarity/trigger, LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.as_slice().to_vec()
}

/// The SRAT: each vCPU in the proximity domain of the node that runs it, each home range in
/// the domain of its home node (proximity domain = spanvm node id).
pub(crate) fn srat(layout: &Layout) -> Result<Vec<u8>, BootError> {
    let mut t = header(b"SRAT", 48, 3);
    t.write_u32(36, 1); // reserved, 1 for compatibility
    for vcpu in 0..layout.vcpu_count {
        let node = layout.node_of_vcpu(vcpu).ok_or_else(|| BootError::Layout {
            problem: format!("vCPU {vcpu} runs on no node"),
        })?;
        if vcpu <= MAX_XAPIC_ID {
            let d = node.to_le_bytes();
            let id = u8::try_from(vcpu).expect("xAPIC IDs are at most MAX_XAPIC_ID");
            let mut e = vec![0u8, 16, d[0], id];
            e.extend_from_slice(&1u32.to_le_bytes()); // enabled
            e.extend_from_slice(&[0, d[1], d[2], d[3]]); // SAPIC EID, domain bits 31:8
            e.extend_from_slice(&0u32.to_le_bytes()); // clock domain
            t.append_slice(&e);
        } else {
            let mut e = vec![2u8, 24, 0, 0];
            e.extend_from_slice(&node.to_le_bytes());
            e.extend_from_slice(&vcpu.to_le_bytes());
            e.extend_from_slice(&1u32.to_le_bytes()); // enabled
            e.extend_from_slice(&0u32.to_le_bytes()); // clock domain
            e.extend_from_slice(&0u32.to_le_bytes());
            t.append_slice(&e);
        }
    }
    for home in &layout.homes {
        let mut e = vec![1u8, 40];
        e.extend_from_slice(&home.node.to_le_bytes());
        e.extend_from_slice(&[0, 0]);
        e.extend_from_slice(&home.gpa.to_le_bytes());
        e.extend_from_slice(&home.size.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes()); // enabled
        e.extend_from_slice(&0u64.to_le_bytes());
        t.append_slice(&e);
    }
    Ok(t.as_slice().to_vec())
}

/// The SLIT: [`LOCAL_DISTANCE`] within a node, [`REMOTE_DISTANCE`] between nodes.
pub(crate) fn slit(layout: &Layout) -> Vec<u8> {
    let n = node_index(layout.node_count());
    let mut t = header(b"SLIT", 44, 1);
    t.write_u64(36, u64::from(layout.node_count()));
    let matrix: Vec<u8> = (0..n * n)
        .map(|i| {
            if i / n == i % n {
                LOCAL_DISTANCE
            } else {
                REMOTE_DISTANCE
            }
        })
        .collect();
    t.append_slice(&matrix);
    t.as_slice().to_vec()
}

//! The ACPI tables of a spanvm guest: RSDP, XSDT, a hardware-reduced FADT wired to the
//! `devices::acpi_pm` device, MADT (every vCPU, the IOAPIC, ISA overrides), DSDT (COM1, the
//! virtio-mmio devices, `_S5_`), SRAT and SLIT (one proximity domain per spanvm node).
//!
//! They live in the legacy BIOS area: the RSDP at [`ACPI_RSDP_ADDR`] (where a legacy scan of
//! `0xE0000..0xFFFFF` finds it, and which the zero page names as well), the others after it,
//! 16-byte aligned, up to 1 MiB. The e820 map reserves that area.

mod dsdt;
mod tables;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use resources::Layout;

use super::memory_map::{ACPI_AREA_END, ACPI_RSDP_ADDR, ACPI_TABLES_ADDR, HIMEM_START};
use super::BootError;
use crate::memory::GuestMemory;

/// OEM id of every table.
pub(crate) const OEM_ID: [u8; 6] = *b"SPANVM";
/// OEM table id of every table.
pub(crate) const OEM_TABLE_ID: [u8; 8] = *b"SPANVM  ";
/// OEM revision of every table.
pub(crate) const OEM_REVISION: u32 = 1;

/// A virtio-mmio device to announce in the DSDT (`LNRO0005`, as Linux's virtio-mmio driver
/// matches), as `\_SB.VRnn` with `nn` its index in hex (so at most 256 of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of its register window (below 4 GiB).
    pub base: u32,
    /// Size of the window.
    pub size: u32,
    /// Its IOAPIC input (GSI).
    pub gsi: u32,
    /// Level-triggered (active high) rather than edge-triggered.
    pub level_triggered: bool,
}

/// One table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// The table's signature ("FACP", "APIC", ...).
    pub signature: [u8; 4],
    /// Guest-physical address.
    pub gpa: u64,
    /// The complete table, checksum included.
    pub bytes: Vec<u8>,
}

/// Every table of the guest, placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// The RSDP (ACPI 2.0, pointing at the XSDT), at [`ACPI_RSDP_ADDR`].
    pub rsdp: Vec<u8>,
    /// DSDT, FADT, MADT, SRAT, SLIT and XSDT, in that order.
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// The table with `signature`, if any.
    pub fn get(&self, signature: &[u8; 4]) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| &t.signature == signature)
    }
}

/// Builds the tables of `layout` with `virtio_mmio` announced, placed from
/// [`ACPI_TABLES_ADDR`] on.
pub fn build_acpi(
    layout: &Layout,
    virtio_mmio: &[VirtioMmioDevice],
) -> Result<AcpiTables, BootError> {
    let mut next = ACPI_TABLES_ADDR;
    let mut tables = Vec::new();
    let mut place = |signature: [u8; 4], bytes: Vec<u8>| {
        let gpa = next;
        next = (gpa + bytes.len() as u64).div_ceil(16) * 16;
        tables.push(AcpiTable {
            signature,
            gpa,
            bytes,
        });
        gpa
    };
    let dsdt = place(*b"DSDT", dsdt::dsdt(virtio_mmio));
    let fadt = place(*b"FACP", tables::fadt(dsdt));
    let madt = place(*b"APIC", tables::madt(layout));
    let srat = place(*b"SRAT", tables::srat(layout)?);
    let slit = place(*b"SLIT", tables::slit(layout));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for entry in [fadt, madt, srat, slit] {
        xsdt.add_entry(entry);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(*b"XSDT", xsdt_bytes);
    if next > ACPI_AREA_END {
        return Err(BootError::AcpiTooLarge {
            size: next - ACPI_RSDP_ADDR,
            room: ACPI_AREA_END - ACPI_RSDP_ADDR,
        });
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    Ok(AcpiTables { rsdp, tables })
}

/// Writes the tables of `layout` (with `virtio_mmio` announced in the DSDT) into `mem` and
/// returns the RSDP's address, [`ACPI_RSDP_ADDR`].
pub fn write_acpi(
    mem: &GuestMemory,
    layout: &Layout,
    virtio_mmio: &[VirtioMmioDevice],
) -> Result<u64, BootError> {
    if !layout.is_ram(0, HIMEM_START) {
        return Err(BootError::Layout {
            problem: "the ACPI tables need RAM below 1 MiB".into(),
        });
    }
    let acpi = build_acpi(layout, virtio_mmio)?;
    // Clear the whole area first: a legacy RSDP scan must not find a stale signature.
    mem.write(
        ACPI_RSDP_ADDR,
        &vec![0u8; crate::convert::usize_from(ACPI_AREA_END - ACPI_RSDP_ADDR)],
    )?;
    mem.write(ACPI_RSDP_ADDR, &acpi.rsdp)?;
    for table in &acpi.tables {
        mem.write(table.gpa, &table.bytes)?;
    }
    Ok(ACPI_RSDP_ADDR)
}

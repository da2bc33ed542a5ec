//! The ACPI tables, read back through `iasl -d` (Debian's acpica-tools) and from guest memory.

use super::support::*;
use crate::boot::memory_map::*;
use crate::boot::*;
use crate::memory::GuestMemory;

fn table<'a>(acpi: &'a AcpiTables, signature: &[u8; 4]) -> &'a AcpiTable {
    acpi.get(signature)
        .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(signature)))
}

fn virtio_devices() -> Vec<VirtioMmioDevice> {
    vec![
        VirtioMmioDevice {
            base: 0xd000_0000,
            size: 0x200,
            gsi: 12,
            level_triggered: false,
        },
        VirtioMmioDevice {
            base: 0xd000_1000,
            size: 0x1000,
            gsi: 13,
            level_triggered: true,
        },
    ]
}

#[test]
fn madt_lists_every_vcpu_the_ioapic_and_the_overrides() {
    let layout = layout(512, &[3, 2]);
    let acpi = build_acpi(&layout, &[]).unwrap();
    let fields = dsl_fields(&iasl_disassemble("apic", &table(&acpi, b"APIC").bytes));
    assert_eq!(values(&fields, "Signature"), ["\"APIC\""]);
    assert_eq!(hex(values(&fields, "Local Apic Address")[0]), 0xfee0_0000);
    let ids: Vec<u64> = values(&fields, "Local Apic ID")
        .iter()
        .map(|v| hex(v))
        .collect();
    assert_eq!(ids, (0..5).collect::<Vec<u64>>(), "APIC ID = vCPU index");
    let uids: Vec<u64> = values(&fields, "Processor ID")
        .iter()
        .map(|v| hex(v))
        .collect();
    // Five processors, then the NMI entry's "all processors".
    assert_eq!(uids, [0, 1, 2, 3, 4, 0xff]);
    assert_eq!(
        hex(value_after(&fields, "I/O Apic ID", "Address")),
        0xfec0_0000
    );
    assert_eq!(
        hex(value_after(&fields, "I/O Apic ID", "Interrupt")),
        0,
        "GSI base"
    );
    assert_eq!(values(&fields, "I/O Apic ID").len(), 1);
    // ISA IRQ 0 goes to GSI 2; the SCI (IRQ 9) is level, active high.
    let sources = values(&fields, "Source");
    assert_eq!(sources, ["00", "09"]);
    let gsis = values(&fields, "Interrupt");
    assert_eq!(gsis.iter().map(|v| hex(v)).collect::<Vec<_>>(), [0, 2, 9]);
    assert_eq!(
        hex(values(&fields, "Interrupt Input LINT")[0]),
        1,
        "LINT1 is NMI"
    );
}

#[test]
fn madt_and_srat_hold_the_largest_guest() {
    let layout = layout(1024, &[128, 127]);
    let acpi = build_acpi(&layout, &virtio_devices()).unwrap();
    let madt = dsl_fields(&iasl_disassemble("apic", &table(&acpi, b"APIC").bytes));
    let ids: Vec<u64> = values(&madt, "Local Apic ID")
        .iter()
        .map(|v| hex(v))
        .collect();
    assert_eq!(ids, (0..255).collect::<Vec<u64>>());
    let srat = dsl_fields(&iasl_disassemble("srat", &table(&acpi, b"SRAT").bytes));
    assert_eq!(values(&srat, "Apic ID").len(), 255);
}

#[test]
fn srat_gives_each_node_its_vcpus_and_its_home_memory() {
    // 5 GiB over two nodes: node 1's share spans the MMIO gap, so it has two home ranges.
    let layout = layout(5 * 1024, &[2, 2]);
    assert_eq!(layout.homes_of(1).count(), 2);
    let acpi = build_acpi(&layout, &[]).unwrap();
    let fields = dsl_fields(&iasl_disassemble("srat", &table(&acpi, b"SRAT").bytes));

    let domains = values(&fields, "Proximity Domain Low(8)");
    let apic_ids = values(&fields, "Apic ID");
    let cpus: Vec<(u64, u64)> = domains
        .iter()
        .zip(&apic_ids)
        .map(|(d, a)| (hex(d), hex(a)))
        .collect();
    assert_eq!(cpus, [(0, 0), (0, 1), (1, 2), (1, 3)]);
    for high in values(&fields, "Proximity Domain High(24)") {
        assert_eq!(hex(high), 0);
    }

    let memory: Vec<(u64, u64, u64)> = values(&fields, "Proximity Domain")
        .iter()
        .zip(values(&fields, "Base Address"))
        .zip(values(&fields, "Address Length"))
        .map(|((d, b), l)| (hex(d), hex(b), hex(l)))
        .collect();
    let homes: Vec<(u64, u64, u64)> = layout
        .homes
        .iter()
        .map(|h| (u64::from(h.node), h.gpa, h.size))
        .collect();
    assert_eq!(memory, homes);
    assert_eq!(
        memory,
        [
            (0, 0, 0xa000_0000),
            (1, 0xa000_0000, 0x2000_0000),
            (1, 0x1_0000_0000, 0x8000_0000)
        ]
    );
}

#[test]
fn slit_has_10_within_and_20_between_nodes() {
    let acpi = build_acpi(&layout(256, &[1, 1]), &[]).unwrap();
    let fields = dsl_fields(&iasl_disassemble("slit", &table(&acpi, b"SLIT").bytes));
    assert_eq!(hex(values(&fields, "Localities")[0]), 2);
    assert_eq!(values(&fields, "Locality   0"), ["0A 14"]);
    assert_eq!(values(&fields, "Locality   1"), ["14 0A"]);

    let acpi = build_acpi(&layout(256, &[1, 1, 1]), &[]).unwrap();
    let fields = dsl_fields(&iasl_disassemble("slit3", &table(&acpi, b"SLIT").bytes));
    assert_eq!(values(&fields, "Locality   1"), ["14 0A 14"]);
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers_on_the_pm_device() {
    use devices::acpi_pm::*;
    let acpi = build_acpi(&layout(256, &[1]), &[]).unwrap();
    let dsdt = table(&acpi, b"DSDT").gpa;
    let fields = dsl_fields(&iasl_disassemble("facp", &table(&acpi, b"FACP").bytes));
    assert_eq!(values(&fields, "Revision"), ["06"]);
    let addresses: Vec<u64> = values(&fields, "DSDT Address")
        .iter()
        .map(|v| hex(v))
        .collect();
    assert_eq!(addresses, [dsdt, dsdt], "32- and 64-bit DSDT pointers");

    let flags = hex(value_after(&fields, "Reserved", "Flags (decoded below)"));
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");

    for (register, port) in [
        ("Reset Register", ACPI_PM_PORT + RESET_OFFSET),
        (
            "Sleep Control Register",
            ACPI_PM_PORT + SLEEP_CONTROL_OFFSET,
        ),
        ("Sleep Status Register", ACPI_PM_PORT + SLEEP_STATUS_OFFSET),
    ] {
        assert_eq!(
            value_after(&fields, register, "Space ID"),
            "01",
            "{register}: SystemIO"
        );
        assert_eq!(
            hex(value_after(&fields, register, "Bit Width")),
            8,
            "{register}"
        );
        assert_eq!(
            hex(value_after(&fields, register, "Address")),
            port,
            "{register}"
        );
    }
    assert_eq!(
        hex(values(&fields, "Value to cause reset")[0]),
        u64::from(RESET_VALUE)
    );
    assert_eq!(hex(values(&fields, "SCI Interrupt")[0]), 9);
}

#[test]
fn dsdt_declares_com1_the_virtio_devices_and_s5() {
    let acpi = build_acpi(&layout(256, &[1]), &virtio_devices()).unwrap();
    let asl = iasl_disassemble("dsdt", &table(&acpi, b"DSDT").bytes);
    // Compare without whitespace and comments, so the test does not depend on iasl's layout.
    let compact: String = asl
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<String>()
        .split_whitespace()
        .collect();
    for expected in [
        "Device(COM1){Name(_HID,EisaId(\"PNP0501\")/*16550A-compatibleCOMSerialPort*/)",
        "IO(Decode16,0x03F8,0x03F8,0x01,0x08,)IRQNoFlags(){4}",
        "Device(VR00){Name(_HID,\"LNRO0005\")Name(_UID,Zero)",
        "Memory32Fixed(ReadWrite,0xD0000000,0x00000200,)Interrupt(ResourceConsumer,Edge,ActiveHigh,Exclusive,,,){0x0000000C,}",
        "Device(VR01){Name(_HID,\"LNRO0005\")Name(_UID,One)",
        "Memory32Fixed(ReadWrite,0xD0001000,0x00001000,)Interrupt(ResourceConsumer,Level,ActiveHigh,Exclusive,,,){0x0000000D,}",
        "Name(\\_S5,Package(0x04){0x05,0x05,Zero,Zero})",
    ] {
        assert!(compact.contains(expected), "DSDT lacks {expected}:\n{asl}");
    }
    assert!(compact.contains("Scope(\\_SB){Device(COM1)"), "{asl}");
}

#[test]
fn xsdt_points_at_every_table_but_the_dsdt() {
    let acpi = build_acpi(&layout(256, &[1, 1]), &[]).unwrap();
    let fields = dsl_fields(&iasl_disassemble("xsdt", &table(&acpi, b"XSDT").bytes));
    let entries: Vec<u64> = fields
        .iter()
        .filter(|(k, _)| k.starts_with("ACPI Table Address"))
        .map(|(_, v)| hex(v))
        .collect();
    let expected: Vec<u64> = [b"FACP", b"APIC", b"SRAT", b"SLIT"]
        .iter()
        .map(|s| table(&acpi, s).gpa)
        .collect();
    assert_eq!(entries, expected);
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// What a guest does: scan the BIOS area for the RSDP, then follow the XSDT.
#[test]
fn guest_finds_the_tables_from_the_rsdp_in_memory() {
    let layout = layout(256, &[1, 1]);
    let mem = GuestMemory::new(&layout).unwrap();
    // A stale signature from an earlier boot must not survive.
    mem.write(0xf0000, b"RSD PTR ").unwrap();
    assert_eq!(
        write_acpi(&mem, &layout, &virtio_devices()).unwrap(),
        ACPI_RSDP_ADDR
    );

    let found: Vec<u64> = (ACPI_RSDP_ADDR..ACPI_AREA_END)
        .step_by(16)
        .filter(|&a| {
            let mut sig = [0u8; 8];
            mem.read(a, &mut sig).unwrap();
            &sig == b"RSD PTR "
        })
        .collect();
    assert_eq!(found, [ACPI_RSDP_ADDR]);
    let mut rsdp = [0u8; 36];
    mem.read(ACPI_RSDP_ADDR, &mut rsdp).unwrap();
    // iasl 20200925 cannot read a lone RSDP, so it is checked here field by field.
    assert!(checksum_ok(&rsdp[..20]), "ACPI 1.0 checksum");
    assert!(checksum_ok(&rsdp), "extended checksum");
    assert_eq!(rsdp[15], 2, "revision 2: XSDT present");
    assert_eq!(u32::from_le_bytes(rsdp[20..24].try_into().unwrap()), 36);
    let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());

    let read_table = |gpa: u64| {
        let mut head = [0u8; 8];
        mem.read(gpa, &mut head).unwrap();
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        assert!(gpa + len as u64 <= ACPI_AREA_END);
        let mut t = vec![0u8; len];
        mem.read(gpa, &mut t).unwrap();
        assert!(
            checksum_ok(&t),
            "checksum of {}",
            String::from_utf8_lossy(&t[..4])
        );
        t
    };
    let xsdt = read_table(xsdt);
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut signatures = Vec::new();
    for entry in xsdt[36..].chunks(8) {
        let t = read_table(u64::from_le_bytes(entry.try_into().unwrap()));
        if &t[..4] == b"FACP" {
            let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
            assert_eq!(&read_table(dsdt)[..4], b"DSDT");
        }
        signatures.push(String::from_utf8_lossy(&t[..4]).into_owned());
    }
    assert_eq!(signatures, ["FACP", "APIC", "SRAT", "SLIT"]);

    let params_rsdp = {
        let dir = tempfile::tempdir().unwrap();
        let kernel = file(dir.path(), "vmlinux", &tiny_elf(&ENTRY_CODE, 4096));
        load_linux(&mem, &layout, &kernel, None, "").unwrap();
        read_zero_page(&mem).acpi_rsdp_addr
    };
    assert_eq!(params_rsdp, ACPI_RSDP_ADDR);
}

/// The iasl check itself: a table with a wrong checksum must fail it.
#[test]
#[should_panic(expected = "Incorrect checksum")]
fn iasl_check_catches_a_bad_checksum() {
    let acpi = build_acpi(&layout(256, &[1]), &[]).unwrap();
    let mut madt = table(&acpi, b"APIC").bytes.clone();
    madt[9] = madt[9].wrapping_add(1);
    iasl_disassemble("apic", &madt);
}

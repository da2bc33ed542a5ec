//! The DSDT: COM1 (without it a guest on a hardware-reduced platform never sees the serial
//! port's interrupt), the virtio-mmio devices, and the `_S5_` sleep type for power-off.

use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, Aml, AmlSink};
use devices::acpi_pm::SLP_TYP_S5;

use super::{VirtioMmioDevice, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// COM1's first port and ISA IRQ, as the platform places the serial device. The devices crate
/// keeps them as a bus address and a pin index; both are small ISA numbers (checked below), and
/// `TryFrom` is not usable in a const.
#[allow(clippy::cast_possible_truncation)]
pub(crate) const COM1_PORT: u16 = devices::serial::COM1_PORT as u16;
#[allow(clippy::cast_possible_truncation)]
pub(crate) const COM1_IRQ: u8 = devices::serial::COM1_IRQ as u8;
const _: () = assert!(devices::serial::COM1_PORT <= u16::MAX as u64);
const _: () = assert!(devices::serial::COM1_IRQ <= u8::MAX as usize);

/// The small "IRQ" resource descriptor without flags (`IRQNoFlags`: ISA edge, active high),
/// which acpi_tables does not offer.
struct IrqNoFlags {
    irq: u8,
}

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // small item, IRQ descriptor, 2 bytes
        sink.word(1u16 << self.irq);
    }
}

/// The DSDT's AML: `\_SB.COM1`, `\_SB.VRnn` for each virtio-mmio device, and `\_S5_`.
pub(crate) fn dsdt(virtio_mmio: &[VirtioMmioDevice]) -> Vec<u8> {
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = IrqNoFlags { irq: COM1_IRQ };
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_uid: u8 = 1;
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid_name = aml::Name::new("_UID".into(), &com1_uid);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid_name, &com1_uid_name, &com1_crs_name],
    );

    let virtio: Vec<Vec<u8>> = virtio_mmio
        .iter()
        .enumerate()
        .map(|(i, dev)| virtio_device(i, dev))
        .collect();
    let virtio_raw: Vec<RawAml> = virtio.into_iter().map(RawAml).collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(virtio_raw.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("\\_SB_".into(), children);

    let s5_type: u8 = SLP_TYP_S5;
    let reserved: u8 = 0;
    let s5_package = aml::Package::new(vec![&s5_type, &s5_type, &reserved, &reserved]);
    let s5 = aml::Name::new("\\_S5_".into(), &s5_package);

    let mut table = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Device (VRnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed, Interrupt } }`.
fn virtio_device(index: usize, dev: &VirtioMmioDevice) -> Vec<u8> {
    let name = format!("VR{:02X}", index & 0xff);
    let hid: aml::AmlString = "LNRO0005".into();
    let uid = index;
    let window = aml::Memory32Fixed::new(true, dev.base, dev.size);
    let irq = aml::Interrupt::new(true, !dev.level_triggered, false, false, dev.gsi);
    let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let device = aml::Device::new(name.as_str().into(), vec![&hid_name, &uid_name, &crs_name]);
    let mut bytes = Vec::new();
    device.to_aml_bytes(&mut bytes);
    bytes
}

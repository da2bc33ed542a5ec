//! Where each virtio-mmio device of a guest sits: its register window and IOAPIC input. One
//! function decides it, for the DSDT the master writes and the bus the master serves alike, so
//! the guest finds every device where the VMM answers.

use resources::{Disk, GuestImage, NetDevice};

use crate::boot::VirtioMmioDevice;

/// First register window: high in the MMIO gap, clear of the IOAPIC and the local APIC.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// One page per device: 0x100 bytes of registers, then the device's configuration space.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC input of the first device; devices take 16, 17, ... (the pins above the ISA ones).
pub const VIRTIO_FIRST_GSI: u32 = 16;
/// IOAPIC inputs for virtio devices: 16..=23.
pub const VIRTIO_MAX_DEVICES: usize = 8;

/// What a virtio device slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioKind {
    /// virtio-rng, fed from the host's `getrandom`.
    Entropy,
    /// virtio-blk over a raw image.
    Block(Disk),
    /// virtio-net on a tap device.
    Net(NetDevice),
}

/// A virtio device and where the guest finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedDevice {
    /// The device.
    pub kind: VirtioKind,
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Its IOAPIC input, level-triggered, active high.
    pub gsi: u32,
}

impl PlacedDevice {
    /// How the DSDT announces it.
    pub fn acpi(&self) -> VirtioMmioDevice {
        VirtioMmioDevice {
            // Below 4 GiB by construction (see `placed_devices`).
            base: u32::try_from(self.base).unwrap_or(u32::MAX),
            size: u32::try_from(VIRTIO_MMIO_SIZE).unwrap_or(u32::MAX),
            gsi: self.gsi,
            level_triggered: true,
        }
    }
}

/// The virtio devices of `guest`, in the order the guest enumerates them: a Linux guest gets
/// an entropy device, then one block device per disk (`vda`, `vdb`, ...), then its network
/// card if it has one; a probe guest none.
pub fn placed_devices(guest: &GuestImage) -> Vec<PlacedDevice> {
    let GuestImage::Linux { disks, net, .. } = guest else {
        return Vec::new();
    };
    let kinds = std::iter::once(VirtioKind::Entropy)
        .chain(disks.iter().cloned().map(VirtioKind::Block))
        .chain(net.iter().cloned().map(VirtioKind::Net))
        .take(VIRTIO_MAX_DEVICES);
    kinds
        .zip(0u32..)
        .map(|(kind, index)| PlacedDevice {
            kind,
            base: VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_FIRST_GSI + index,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_gets_entropy_then_its_disks_in_order() {
        let disk = |name: &str| Disk {
            path: name.into(),
            read_only: false,
        };
        let guest = GuestImage::Linux {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![disk("/a.img"), disk("/b.img")],
            net: None,
        };
        let placed = placed_devices(&guest);
        assert_eq!(placed.len(), 3);
        assert_eq!(placed[0].kind, VirtioKind::Entropy);
        assert_eq!(placed[1].kind, VirtioKind::Block(disk("/a.img")));
        assert_eq!(placed[2].base, VIRTIO_MMIO_BASE + 2 * VIRTIO_MMIO_SIZE);
        assert_eq!(placed[2].gsi, 18);
        for device in &placed {
            let end = device.base + VIRTIO_MMIO_SIZE;
            assert!(device.base >= resources::MMIO_GAP_START && end <= resources::IOAPIC_GPA);
        }
    }

    fn card() -> NetDevice {
        NetDevice {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            tap: "spanvm0".into(),
            netns: Some("lab".into()),
        }
    }

    #[test]
    fn the_network_card_comes_after_entropy_and_disks() {
        let guest = GuestImage::Linux {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![Disk {
                path: "/a.img".into(),
                read_only: true,
            }],
            net: Some(card()),
        };
        let placed = placed_devices(&guest);
        assert_eq!(placed.len(), 3);
        assert_eq!(placed[0].kind, VirtioKind::Entropy);
        assert!(matches!(placed[1].kind, VirtioKind::Block(_)));
        assert_eq!(placed[2].kind, VirtioKind::Net(card()));
        assert_eq!(placed[2].gsi, 18);
        // Without disks the card is the second device.
        let guest = GuestImage::Linux {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
            net: Some(card()),
        };
        let placed = placed_devices(&guest);
        assert_eq!(placed.len(), 2);
        assert_eq!(placed[1].kind, VirtioKind::Net(card()));
        assert_eq!(placed[1].base, VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE);
    }

    #[test]
    fn the_most_devices_fit_the_ioapic_and_the_window() {
        let disks = (0..resources::MAX_DISKS)
            .map(|i| Disk {
                path: format!("/d{i}").into(),
                read_only: true,
            })
            .collect();
        let guest = GuestImage::Linux {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks,
            net: Some(card()),
        };
        let placed = placed_devices(&guest);
        assert_eq!(placed.len(), resources::MAX_DISKS + 2);
        assert!(placed.len() <= VIRTIO_MAX_DEVICES);
        assert_eq!(
            placed.last().map(|d| &d.kind),
            Some(&VirtioKind::Net(card()))
        );
        let last = placed.last().map(|d| d.gsi).unwrap_or(0);
        assert!(usize::try_from(last).unwrap() < devices::ioapic::IOAPIC_PINS);
    }

    #[test]
    fn probes_have_no_virtio_devices() {
        let guest = GuestImage::Probe {
            name: "hello".into(),
            arg: 0,
        };
        assert!(placed_devices(&guest).is_empty());
    }
}

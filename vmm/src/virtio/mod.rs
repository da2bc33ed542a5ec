//! The guest's virtio-mmio devices on the master: where they sit, and (see the `devices`
//! crate) what they do.

mod placement;

pub use placement::{
    placed_devices, PlacedDevice, VirtioKind, VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES,
    VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};

mod attach;

pub use attach::{attach_virtio_devices, VirtioDevices, VirtioSetupError};

mod tap;

pub use tap::{in_netns, RxThread, TapBackend, TapError};

//! The master's virtio devices, built from the layout and put on the platform's MMIO bus.
//!
//! Each device is a `devices::virtio::MmioTransport` behind a mutex. A queue notification runs
//! the device in the notifying thread: a master vCPU's, or the forwarding worker's for a vCPU of
//! another node, never a transport receiver (a device access can wait on DSM pages). Buffers are
//! pinned through the DSM for the time of a request, so a device reads what another node last
//! wrote and a page it writes is invalid everywhere else before the guest hears of it.

use std::sync::{Arc, Mutex, PoisonError};

use devices::bus::{Bus, BusDevice};
use devices::virtio::block::{Block, BlockBackend, BlockError};
use devices::virtio::mmio::IrqLineInterrupt;
use devices::virtio::net::{Net, RX_QUEUE};
use devices::virtio::pins::pin_pages_in_order;
use devices::virtio::rng::Rng;
use devices::virtio::{
    DmaPinGuard, DmaPins, DmaRange, MmioTransport, NoPins, PinError, VirtioDevice,
};
use dsm::{Access, Dsm};
use resources::Layout;
use vm_memory::GuestMemoryMmap;

use super::placement::{placed_devices, VirtioKind, VIRTIO_MMIO_SIZE};
use super::tap::{RxThread, TapBackend, TapError};
use crate::boot::{BootError, SharedVmMemory};
use crate::memory::GuestMemory;
use crate::platform::Platform;

/// Errors of setting up the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    /// A disk image cannot be used.
    #[error("disk {index} ({path}): {source}")]
    Disk {
        /// Its index in `[[guest.disk]]`.
        index: usize,
        /// Its image.
        path: String,
        /// Why.
        source: BlockError,
    },
    /// The network card's tap cannot be used.
    #[error("network card: {0}")]
    Tap(#[from] TapError),
    /// Guest memory could not be described to the device models.
    #[error("guest memory for the virtio devices: {0}")]
    Memory(#[from] BootError),
    /// Two devices claim the same window (a bug in the placement).
    #[error("virtio device layout: {0}")]
    Bus(#[from] devices::bus::BusError),
    /// The platform refused the devices.
    #[error(transparent)]
    Platform(#[from] crate::platform::PlatformError),
}

/// Pins device buffers through the DSM, page by page in increasing order (the DSM's pin order).
struct DsmPins(Arc<Dsm>);

impl DmaPins for DsmPins {
    fn pin(&self, ranges: &[DmaRange]) -> Result<DmaPinGuard, PinError> {
        let guards = pin_pages_in_order(ranges, |gpa, len, write| {
            let access = if write { Access::Write } else { Access::Read };
            self.0.pin(gpa, len, access).map_err(|e| PinError::Refused {
                first_gpa: gpa,
                len,
                reason: e.to_string(),
            })
        })?;
        Ok(DmaPinGuard::new(guards))
    }
}

/// One device on the bus, with the guest memory its queues use.
struct VirtioSlot {
    transport: Mutex<MmioTransport<GuestMemoryMmap>>,
    // After `transport`, so dropped after it: the regions the transport holds stay mapped.
    _memory: SharedVmMemory,
}

impl BusDevice for VirtioSlot {
    fn read(&self, vcpu: usize, offset: u64, data: &mut [u8]) {
        self.transport.read(vcpu, offset, data);
    }

    fn write(&self, vcpu: usize, offset: u64, data: &[u8]) {
        self.transport.write(vcpu, offset, data);
    }
}

/// The master's virtio devices once on the bus: what must stop before the VM goes away.
pub struct VirtioDevices {
    count: usize,
    rx_threads: Vec<RxThread>,
}

impl VirtioDevices {
    /// How many devices are on the bus.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Stops the devices' own threads (a network card's receive thread); idempotent, and run
    /// by `Drop`.
    pub fn stop(&mut self) {
        for thread in &mut self.rx_threads {
            thread.stop();
        }
        self.rx_threads.clear();
    }
}

impl Drop for VirtioDevices {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds the virtio devices of `layout` (master only) and puts them on `platform`'s MMIO bus;
/// `dsm` is the node's DSM on a cluster, `None` on one node. A network card's receive thread
/// runs until the returned value is stopped or dropped.
pub fn attach_virtio_devices(
    layout: &Layout,
    platform: &Arc<Platform>,
    memory: &Arc<GuestMemory>,
    dsm: Option<Arc<Dsm>>,
) -> Result<VirtioDevices, VirtioSetupError> {
    let placed = placed_devices(&layout.guest);
    let pins: Arc<dyn DmaPins> = match dsm {
        Some(dsm) => Arc::new(DsmPins(dsm)),
        None => Arc::new(NoPins),
    };
    let mut bus = Bus::new();
    let mut disk_index = 0;
    let mut rx_threads = Vec::new();
    for device in &placed {
        let mut tap = None;
        let model: Box<dyn VirtioDevice<GuestMemoryMmap>> = match &device.kind {
            VirtioKind::Entropy => Box::new(Rng::new()),
            VirtioKind::Block(disk) => {
                let index = disk_index;
                disk_index += 1;
                let backend = BlockBackend::open(&disk.path, disk.read_only).map_err(|source| {
                    VirtioSetupError::Disk {
                        index,
                        path: disk.path.display().to_string(),
                        source,
                    }
                })?;
                Box::new(Block::new(backend, &format!("spanvm-disk{index}")))
            }
            VirtioKind::Net(net) => {
                let backend = TapBackend::open(&net.tap, net.netns.as_deref())?;
                let model = Box::new(Net::new(Box::new(backend.clone()), net.mac));
                tap = Some(backend);
                model
            }
        };
        let shared = SharedVmMemory::new(memory.clone(), layout)?;
        let irq = platform.irq_line(crate::convert::usize_from(u64::from(device.gsi)));
        let transport = MmioTransport::new(
            model,
            shared.guest().clone(),
            pins.clone(),
            Arc::new(IrqLineInterrupt(irq)),
        );
        let slot = Arc::new(VirtioSlot {
            transport: Mutex::new(transport),
            _memory: shared,
        });
        if let Some(tap) = tap {
            let slot = slot.clone();
            rx_threads.push(tap.spawn_rx_thread(Box::new(move || {
                slot.transport
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .kick(RX_QUEUE);
            }))?);
        }
        bus.insert(device.base, VIRTIO_MMIO_SIZE, slot)?;
    }
    let mut devices = VirtioDevices {
        count: placed.len(),
        rx_threads,
    };
    if let Err(e) = platform.set_mmio_devices(bus) {
        devices.stop();
        return Err(e.into());
    }
    Ok(devices)
}

//! The virtio-mmio transport (virtio 1.x "modern" register layout only, Version = 2).
//!
//! One [`MmioTransport`] is the 0x200-byte register window of one device: identification,
//! feature negotiation, the device status state machine, virtqueue setup, notification and
//! interrupt status, and the device's configuration space at 0x100. A QueueNotify write runs the
//! device on that queue synchronously, inside the vCPU's MMIO exit.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::pins::DmaPins;
use super::{DeviceContext, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use crate::bits::low_u32;
use crate::bus::BusDevice;

/// Length of the register window of one device.
pub const MMIO_WINDOW_LEN: u64 = 0x200;

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio-mmio version of the modern (1.x) layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("SPAN" is not registered; any value is allowed for VendorID).
pub const VENDOR_ID: u32 = 0x4e41_5053;

/// Register offsets of the virtio-mmio layout.
pub mod reg {
    /// Magic value "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version (2).
    pub const VERSION: u64 = 0x004;
    /// Device ID.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 feature bits of the device, selected by DEVICE_FEATURES_SEL.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 bits DEVICE_FEATURES shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 feature bits the driver accepts, selected by DRIVER_FEATURES_SEL.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 bits DRIVER_FEATURES sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Which queue the queue registers address.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Whether the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Written with a queue index when the driver made buffers available.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available (driver) ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available (driver) ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used (device) ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used (device) ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Changes whenever the device changes its configuration space.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device's configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: a used ring changed.
pub const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG_CHANGE: u32 = 2;

/// VIRTIO_RING_F_EVENT_IDX: never offered (the transport interrupts on every used-ring change).
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// The interrupt line of a virtio-mmio device: a level, asserted while InterruptStatus != 0.
pub trait VirtioInterrupt: Send + Sync {
    /// Asserts or deasserts the line.
    fn set_level(&self, asserted: bool);
}

/// The virtio-mmio register window of one device, owning its virtqueues.
pub struct MmioTransport<M: GuestMemory> {
    device: Box<dyn VirtioDevice<M>>,
    ctx: DeviceContext<M>,
    irq: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    status: u32,
    config_generation: u32,
    broken: Option<VirtioError>,
}

/// The largest valid virtqueue size not above `size` (a power of two in 1..=32768).
fn valid_queue_size(size: u16) -> u16 {
    let size = size.clamp(1, 32768);
    // `size` >= 1, so it has at most 15 leading zeros.
    1 << (15 - size.leading_zeros())
}

impl<M: GuestMemory> MmioTransport<M> {
    /// The transport of `device`, over guest `memory`, pinning device buffers through `pins`
    /// and interrupting through `irq`. Queue maximum sizes that are not powers of two are
    /// rounded down to one.
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        memory: M,
        pins: Arc<dyn DmaPins>,
        irq: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(valid_queue_size(max)).ok())
            .collect();
        Self {
            device,
            ctx: DeviceContext::new(memory, pins),
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            status: 0,
            config_generation: 0,
            broken: None,
        }
    }

    /// The feature bits offered to the driver.
    pub fn device_features(&self) -> u64 {
        (self.device.features() & !(1u64 << VIRTIO_RING_F_EVENT_IDX)) | (1u64 << VIRTIO_F_VERSION_1)
    }

    /// The feature bits the driver accepted (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The pending interrupt causes.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Why the device set DEVICE_NEEDS_RESET, if it did (for the VMM to report).
    pub fn needs_reset_reason(&self) -> Option<&VirtioError> {
        self.broken.as_ref()
    }

    /// The device changed its configuration space: bump ConfigGeneration and interrupt.
    pub fn signal_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG_CHANGE);
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        self.irq.set_level(true);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    /// Reads `data.len()` bytes at `offset` in the window. Registers below 0x100 answer only
    /// aligned 4-byte reads; anything else reads as zero.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let value = match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => low_u32(self.device_features()),
                1 => low_u32(self.device_features() >> 32),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Writes `data` at `offset` in the window. Registers below 0x100 take only aligned 4-byte
    /// writes; others are ignored. A QueueNotify runs the device on that queue before it
    /// returns.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        // Queue layout may change only while negotiation is done and the driver not yet OK.
        let queue_setup = self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if queue_setup => self.with_idle_queue(|q| q.set_size(size16(value))),
            reg::QUEUE_READY if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW if queue_setup => {
                self.with_idle_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH if queue_setup => {
                self.with_idle_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW if queue_setup => {
                self.with_idle_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH if queue_setup => {
                self.with_idle_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW if queue_setup => {
                self.with_idle_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH if queue_setup => {
                self.with_idle_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => {
                self.interrupt_status &= !value;
                if self.interrupt_status == 0 {
                    self.irq.set_level(false);
                }
            }
            reg::STATUS => self.write_status(value),
            _ => {}
        }
    }

    /// Applies `f` to the selected queue unless it is ready (its layout is fixed while ready).
    fn with_idle_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            if !q.ready() {
                f(q);
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Only between DRIVER and FEATURES_OK.
        if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        use status::*;
        let old = self.status;
        // The driver only ever adds bits; DEVICE_NEEDS_RESET is the device's to set.
        let new = (value & !DEVICE_NEEDS_RESET) | (old & DEVICE_NEEDS_RESET);
        if new & old != old {
            return;
        }
        let added = new & !old;
        let order_ok = (added & DRIVER == 0 || new & ACKNOWLEDGE != 0)
            && (added & FEATURES_OK == 0 || new & DRIVER != 0)
            && (added & DRIVER_OK == 0 || new & FEATURES_OK != 0);
        if !order_ok {
            return;
        }
        let mut new = new;
        if added & FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads Status back and sees FEATURES_OK missing.
            new &= !FEATURES_OK;
            if new & DRIVER_OK != 0 {
                return;
            }
        }
        self.status = new;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    /// Device reset: Status = 0, queues and the device model back to their initial state.
    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.broken = None;
        if self.interrupt_status != 0 {
            self.interrupt_status = 0;
            self.irq.set_level(false);
        }
    }

    fn notify(&mut self, value: u32) {
        if self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED)
            != status::DRIVER_OK
        {
            return;
        }
        let Ok(index) = usize::try_from(value) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let result = if queue.is_valid(self.ctx.memory()) {
            self.device.process_queue(index, queue, &self.ctx)
        } else {
            Err(VirtioError::RingsOutsideMemory { queue: index })
        };
        match result {
            Ok(true) => self.raise(INT_USED_BUFFER),
            Ok(false) => {}
            Err(e) => {
                self.broken = Some(e);
                self.status |= status::DEVICE_NEEDS_RESET;
                // The used ring may have changed before the queue broke.
                self.raise(INT_USED_BUFFER | INT_CONFIG_CHANGE);
            }
        }
    }
}

/// The low 16 bits of a QueueNum write (larger sizes are invalid and refused by the queue).
fn size16(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(0)
}

/// The VMM puts a transport on the MMIO bus behind a mutex (vCPUs access it from several
/// threads; each access is short and a notify runs the queue under the lock).
impl<M: GuestMemory + Send + 'static> BusDevice for Mutex<MmioTransport<M>> {
    fn read(&self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data);
    }

    fn write(&self, _vcpu: usize, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(offset, data);
    }
}

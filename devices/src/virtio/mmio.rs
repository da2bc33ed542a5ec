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
use crate::irq_line::IrqLine;

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
    /// Selects a shared memory region (none exist: their length and base read as all ones).
    pub const SHM_SEL: u64 = 0x0ac;
    /// Length of the selected shared memory region, low 32 bits.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Length of the selected shared memory region, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Base of the selected shared memory region, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Base of the selected shared memory region, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
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
/// VIRTIO_RING_F_INDIRECT_DESC: always offered (virtio-queue walks indirect tables, and
/// drivers then fit a many-segment request in one ring entry).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;

/// The interrupt line of a virtio-mmio device: a level, asserted while InterruptStatus != 0.
pub trait VirtioInterrupt: Send + Sync {
    /// Asserts or deasserts the line.
    fn set_level(&self, asserted: bool);
}

/// A [`VirtioInterrupt`] on an interrupt controller line (an IOAPIC pin routed by the VMM).
pub struct IrqLineInterrupt(pub Arc<dyn IrqLine>);

impl VirtioInterrupt for IrqLineInterrupt {
    fn set_level(&self, asserted: bool) {
        self.0.set_level(asserted);
    }
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

    /// The feature bits offered to the driver: the device's, VERSION_1 and INDIRECT_DESC,
    /// never EVENT_IDX.
    pub fn device_features(&self) -> u64 {
        (self.device.features() & !(1u64 << VIRTIO_RING_F_EVENT_IDX))
            | (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
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
            // "Reading from a non-existent region results in a length of -1."
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
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
        } else if added & FEATURES_OK != 0 {
            self.device.features_accepted(self.driver_features);
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

    /// Runs the device on queue `index` as if the driver had notified it: for host-side
    /// events, such as a network backend with frames for the receive queue. Does nothing
    /// before DRIVER_OK, after DEVICE_NEEDS_RESET, or for a queue that is not ready.
    pub fn kick(&mut self, index: usize) {
        self.run_queue(index);
    }

    /// A QueueNotify write.
    fn notify(&mut self, value: u32) {
        if let Ok(index) = usize::try_from(value) {
            self.run_queue(index);
        }
    }

    fn run_queue(&mut self, index: usize) {
        if self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED)
            != status::DRIVER_OK
        {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::*;
    use std::sync::atomic::Ordering;
    use vm_memory::GuestMemoryMmap;

    /// A device with two queues and a feature bit besides EVENT_IDX, counting resets.
    struct Fake {
        resets: Arc<std::sync::atomic::AtomicUsize>,
        config: [u8; 8],
    }
    impl VirtioDevice<GuestMemoryMmap> for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            (1 << 3) | (1 << VIRTIO_RING_F_EVENT_IDX)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64, 100]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = data.first() {
                if let Some(c) = self
                    .config
                    .get_mut(usize::try_from(offset).unwrap_or(usize::MAX))
                {
                    *c = *b;
                }
            }
        }
        fn process_queue(
            &mut self,
            _index: usize,
            _queue: &mut Queue,
            _ctx: &DeviceContext<GuestMemoryMmap>,
        ) -> Result<bool, VirtioError> {
            Ok(true)
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn fake() -> (Driver<GuestMemoryMmap>, Arc<std::sync::atomic::AtomicUsize>) {
        let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dev = Fake {
            resets: resets.clone(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        (Driver::bare(Box::new(dev), memory(0x10000)), resets)
    }

    #[test]
    fn identifies_as_a_modern_virtio_mmio_device() {
        let (mut d, _) = fake();
        assert_eq!(r32(&mut d.t, reg::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(r32(&mut d.t, reg::VERSION), 2);
        assert_eq!(r32(&mut d.t, reg::DEVICE_ID), 42);
        assert_eq!(r32(&mut d.t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(
            r32(&mut d.t, reg::SHM_LEN_LOW),
            u32::MAX,
            "no shared memory regions"
        );
        assert_eq!(r32(&mut d.t, reg::SHM_LEN_HIGH), u32::MAX);
        w32(&mut d.t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM_MAX), 64);
        w32(&mut d.t, reg::QUEUE_SEL, 1);
        assert_eq!(
            r32(&mut d.t, reg::QUEUE_NUM_MAX),
            64,
            "100 rounds down to 64"
        );
        w32(&mut d.t, reg::QUEUE_SEL, 2);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM_MAX), 0, "no third queue");
        // Config space: any size and alignment, zero past its end.
        let mut b = [0u8; 3];
        d.t.read(reg::CONFIG + 1, &mut b);
        assert_eq!(b, [2, 3, 4]);
        d.t.read(reg::CONFIG + 7, &mut b);
        assert_eq!(b, [8, 0, 0]);
    }

    #[test]
    fn wrong_size_or_misaligned_register_accesses_are_ignored() {
        let (mut d, _) = fake();
        let mut two = [0xffu8; 2];
        d.t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xffu8; 4];
        d.t.read(reg::MAGIC_VALUE + 1, &mut four);
        assert_eq!(four, [0; 4]);
        let mut eight = [0xffu8; 8];
        d.t.read(reg::MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        d.t.read(reg::MAGIC_VALUE, &mut []);
        d.t.write(reg::STATUS, &[1]);
        d.t.write(reg::STATUS, &[1, 0]);
        d.t.write(reg::STATUS + 2, &[1, 0, 0, 0]);
        d.t.write(reg::STATUS, &[]);
        assert_eq!(d.status(), 0);
        // Unknown register offsets read as zero, take writes silently.
        assert_eq!(r32(&mut d.t, 0x0f0), 0);
        w32(&mut d.t, 0x0f0, 7);
        d.t.write(u64::MAX - 1, &[1, 2]);
        d.t.read(u64::MAX - 1, &mut two);
    }

    #[test]
    fn offers_version_1_and_not_event_idx() {
        let (mut d, _) = fake();
        let f = d.offered_features();
        assert_eq!(f, (1 << 3) | (1 << 32) | (1 << VIRTIO_RING_F_INDIRECT_DESC));
        w32(&mut d.t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&mut d.t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_refused_without_version_1_or_with_unoffered_bits() {
        let (mut d, _) = fake();
        assert!(!d.try_features(1 << 3), "legacy driver without VERSION_1");
        w32(&mut d.t, reg::STATUS, 0);
        assert!(
            !d.try_features((1 << 32) | (1 << 5)),
            "bit 5 was not offered"
        );
        w32(&mut d.t, reg::STATUS, 0);
        assert!(
            !d.try_features((1 << 32) | (1 << VIRTIO_RING_F_EVENT_IDX)),
            "EVENT_IDX is never offered"
        );
        w32(&mut d.t, reg::STATUS, 0);
        assert!(d.try_features((1 << 32) | (1 << 3)));
        assert_eq!(d.t.driver_features(), (1 << 32) | (1 << 3));
        // Features are frozen once FEATURES_OK is set.
        w32(&mut d.t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut d.t, reg::DRIVER_FEATURES, 0);
        assert_eq!(d.t.driver_features(), (1 << 32) | (1 << 3));
    }

    #[test]
    fn status_bits_must_come_in_order_and_never_go_away() {
        let (mut d, _) = fake();
        w32(&mut d.t, reg::STATUS, status::DRIVER);
        assert_eq!(d.status(), 0, "DRIVER before ACKNOWLEDGE");
        w32(
            &mut d.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(d.status(), 0, "DRIVER_OK before FEATURES_OK");
        w32(&mut d.t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut d.t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            d.status(),
            status::ACKNOWLEDGE | status::DRIVER,
            "bits cannot be cleared"
        );
        w32(
            &mut d.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(
            d.status() & status::DEVICE_NEEDS_RESET,
            0,
            "driver cannot set NEEDS_RESET"
        );
        w32(
            &mut d.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
        );
        assert_ne!(d.status() & status::FAILED, 0);
    }

    #[test]
    fn queue_layout_is_only_accepted_between_features_ok_and_driver_ok() {
        let (mut d, _) = fake();
        w32(&mut d.t, reg::QUEUE_SEL, 0);
        w32(&mut d.t, reg::QUEUE_NUM, 16);
        w32(&mut d.t, reg::QUEUE_READY, 1);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM), 64);
        assert_eq!(r32(&mut d.t, reg::QUEUE_READY), 0);
        d.negotiate();
        w32(&mut d.t, reg::QUEUE_NUM, 15);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM), 64, "not a power of two");
        w32(&mut d.t, reg::QUEUE_NUM, 128);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM), 64, "above the maximum");
        d.setup_queue(16);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM), 16);
        assert_eq!(r32(&mut d.t, reg::QUEUE_READY), 1);
        w32(&mut d.t, reg::QUEUE_NUM, 32);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM), 16, "fixed while ready");
    }

    #[test]
    fn notify_interrupts_and_ack_lowers_the_line() {
        let (mut d, _) = fake();
        d.negotiate();
        d.setup_queue(16);
        d.notify();
        assert_eq!(d.t.interrupt_status(), 0, "no queue runs before DRIVER_OK");
        let s = d.status();
        w32(&mut d.t, reg::STATUS, s | status::DRIVER_OK);
        w32(&mut d.t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(d.t.interrupt_status(), 0, "queue 1 is not ready");
        w32(&mut d.t, reg::QUEUE_NOTIFY, 7);
        d.notify();
        assert_eq!(r32(&mut d.t, reg::INTERRUPT_STATUS), INT_USED_BUFFER);
        assert!(d.irq.level.load(Ordering::SeqCst));
        d.t.signal_config_change();
        assert_eq!(r32(&mut d.t, reg::CONFIG_GENERATION), 1);
        w32(&mut d.t, reg::INTERRUPT_ACK, INT_USED_BUFFER);
        assert!(
            d.irq.level.load(Ordering::SeqCst),
            "config change still pending"
        );
        w32(&mut d.t, reg::INTERRUPT_ACK, INT_CONFIG_CHANGE);
        assert!(!d.irq.level.load(Ordering::SeqCst));
        assert_eq!(r32(&mut d.t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn status_zero_resets_device_and_queues() {
        let (mut d, resets) = fake();
        d.negotiate();
        d.setup_queue(16);
        let s = d.status();
        w32(&mut d.t, reg::STATUS, s | status::DRIVER_OK);
        d.notify();
        assert!(d.irq.level.load(Ordering::SeqCst));
        w32(&mut d.t, reg::STATUS, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(d.status(), 0);
        assert!(!d.irq.level.load(Ordering::SeqCst));
        assert_eq!(r32(&mut d.t, reg::INTERRUPT_STATUS), 0);
        w32(&mut d.t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut d.t, reg::QUEUE_READY), 0);
        assert_eq!(r32(&mut d.t, reg::QUEUE_NUM), 64);
        assert_eq!(d.t.driver_features(), 0);
    }

    #[test]
    fn avail_index_jump_sets_device_needs_reset_until_reset() {
        let mut d = Driver::new(Box::new(Rng::new()), memory(0x10000), 16);
        d.set_avail_idx(17);
        d.notify();
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(d.t.interrupt_status() & INT_CONFIG_CHANGE, 0);
        assert!(matches!(
            d.t.needs_reset_reason(),
            Some(VirtioError::BrokenQueue { queue: 0, .. })
        ));
        assert_eq!(d.used_idx(), 0);
        // Further notifies do nothing, even with a sane index.
        d.set_avail_idx(1);
        d.chain(0, &[(DATA, 16, true)]);
        d.notify();
        assert_eq!(d.used_idx(), 0);
        // Reset and set up again: it works.
        w32(&mut d.t, reg::STATUS, 0);
        assert_eq!(d.status(), 0);
        assert!(d.t.needs_reset_reason().is_none());
        d.write(AVAIL, &[0; 4]);
        d.write(USED, &[0; 4]);
        let mut d2 = d;
        d2.negotiate();
        d2.setup_queue(16);
        let s = d2.status();
        w32(&mut d2.t, reg::STATUS, s | status::DRIVER_OK);
        d2.set_avail_idx(0);
        let head = d2.chain(0, &[(DATA, 16, true)]);
        assert_eq!(d2.submit(head), (0, 16));
    }

    #[test]
    fn rings_outside_guest_memory_set_device_needs_reset() {
        let mut d = Driver::bare(Box::new(Rng::new()), memory(0x10000));
        d.negotiate();
        d.setup_queue(16);
        w32(&mut d.t, reg::QUEUE_READY, 0);
        w32(&mut d.t, reg::QUEUE_DEVICE_LOW, 0xfff8);
        w32(&mut d.t, reg::QUEUE_READY, 1);
        let s = d.status();
        w32(&mut d.t, reg::STATUS, s | status::DRIVER_OK);
        d.notify();
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(matches!(
            d.t.needs_reset_reason(),
            Some(VirtioError::RingsOutsideMemory { queue: 0 })
        ));
    }

    #[test]
    fn a_head_index_outside_the_queue_sets_device_needs_reset() {
        let mut d = Driver::new(Box::new(Rng::new()), memory(0x10000), 16);
        d.publish(16);
        d.notify();
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn an_irq_line_carries_the_level() {
        #[derive(Default)]
        struct Line(std::sync::Mutex<Vec<bool>>);
        impl IrqLine for Line {
            fn pulse(&self) {}
            fn set_level(&self, asserted: bool) {
                self.0.lock().unwrap().push(asserted);
            }
        }
        let line = Arc::new(Line::default());
        let irq = IrqLineInterrupt(line.clone());
        irq.set_level(true);
        irq.set_level(false);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn the_bus_device_wrapper_locks_and_forwards() {
        let d = Driver::bare(Box::new(Rng::new()), memory(0x10000));
        let dev = Mutex::new(d.t);
        let mut b = [0u8; 4];
        BusDevice::read(&dev, 0, reg::DEVICE_ID, &mut b);
        assert_eq!(u32::from_le_bytes(b), 4);
        BusDevice::write(&dev, 0, reg::STATUS, &status::ACKNOWLEDGE.to_le_bytes());
        BusDevice::read(&dev, 1, reg::STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), status::ACKNOWLEDGE);
    }
}

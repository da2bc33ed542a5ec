//! Virtio devices (virtio 1.x, split virtqueues) on the virtio-mmio transport.
//!
//! [`mmio::MmioTransport`] is the register block the guest driver talks to; it owns the
//! virtqueues and hands a notified queue to a [`VirtioDevice`] model ([`block::Block`],
//! [`rng::Rng`], [`net::Net`]), which takes descriptor chains off it through a [`DeviceContext`]. All guest
//! memory a device touches is pinned first ([`pins`]), because on the master node another node
//! may hold the pages. Descriptor chains are the guest's to corrupt: [`chain`] checks them
//! before a device uses them.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod pins;
pub mod rng;

use std::sync::Arc;

use virtio_queue::{DescriptorChain, QueueOwnedT};
pub use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

pub use mmio::{MmioTransport, VirtioInterrupt};
pub use pins::{DmaPinGuard, DmaPins, DmaRange, NoPins, PinError};

/// Device ID of a virtio block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Device ID of a virtio entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Feature bit: the device follows virtio 1.x (always offered and required by the transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Errors that make a device stop using its queues until the driver resets it (the transport
/// then sets DEVICE_NEEDS_RESET in the status register).
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The driver laid out or indexed a virtqueue so that it cannot be used: rings outside
    /// guest memory, the available index moved by more than the queue size, a used-ring entry
    /// for a descriptor index outside the queue.
    #[error("virtqueue {queue} is broken ({source}); the guest driver must reset the device")]
    BrokenQueue {
        /// Index of the queue.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// The driver set a virtqueue ready whose descriptor table or rings lie (partly) outside
    /// guest memory.
    #[error(
        "virtqueue {queue} has its descriptor table or rings outside guest memory; \
         the guest driver must reset the device"
    )]
    RingsOutsideMemory {
        /// Index of the queue.
        queue: usize,
    },
}

/// What a device model may use while it processes a queue: guest memory and the pins that
/// keep its pages available.
pub struct DeviceContext<M: GuestMemory> {
    memory: M,
    pins: Arc<dyn DmaPins>,
}

impl<M: GuestMemory> DeviceContext<M> {
    /// A context over `memory` whose device buffers are pinned through `pins`.
    pub fn new(memory: M, pins: Arc<dyn DmaPins>) -> Self {
        Self { memory, pins }
    }

    /// Guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The pins device buffers go through.
    pub fn pins(&self) -> &dyn DmaPins {
        &*self.pins
    }

    /// The next descriptor chain the driver made available on `queue` (queue number `index`),
    /// or `None` when there is none. An available index that moved by more than the queue size
    /// is a [`VirtioError::BrokenQueue`].
    pub fn next_chain(
        &self,
        index: usize,
        queue: &mut Queue,
    ) -> Result<Option<DescriptorChain<&M>>, VirtioError> {
        let mut avail = queue
            .iter(&self.memory)
            .map_err(|source| VirtioError::BrokenQueue {
                queue: index,
                source,
            })?;
        Ok(avail.next())
    }

    /// Serves every chain available on `queue` (queue number `index`): each is parsed into
    /// checked buffers, its buffers are pinned, `serve` runs on them and says how many bytes it
    /// wrote, and the chain goes back to the driver with that length (0 for a chain that could
    /// not be parsed or pinned; `serve` does not run then). Returns how many chains were used.
    pub fn serve_chains(
        &self,
        index: usize,
        queue: &mut Queue,
        mut serve: impl FnMut(&chain::ChainBuffers, &M) -> u32,
    ) -> Result<u64, VirtioError> {
        let mut used = 0;
        while let Some(chain) = self.next_chain(index, queue)? {
            let head = chain.head_index();
            let mut guard = None;
            let len = match chain::ChainBuffers::parse(chain, &self.memory) {
                Ok(buffers) => match self.pins.pin(&buffers.dma_ranges()) {
                    Ok(pinned) => {
                        guard = Some(pinned);
                        serve(&buffers, &self.memory)
                    }
                    Err(_) => 0,
                },
                Err(_) => 0,
            };
            // Unpin first: the used ring may share a page with a buffer pinned for reading, and
            // writing it under that pin would wait for a remote request that waits for the pin.
            drop(guard);
            self.add_used(index, queue, head, len)?;
            used += 1;
        }
        Ok(used)
    }

    /// Returns the chain with head `head` to the driver on `queue` (queue number `index`),
    /// with `len` bytes written into its device-writable buffers.
    pub fn add_used(
        &self,
        index: usize,
        queue: &mut Queue,
        head: u16,
        len: u32,
    ) -> Result<(), VirtioError> {
        queue
            .add_used(&self.memory, head, len)
            .map_err(|source| VirtioError::BrokenQueue {
                queue: index,
                source,
            })
    }

    /// Returns the chains `used` (head, bytes written) to the driver on `queue` (queue number
    /// `index`) in one step: the used index moves once, after every element is in place, so a
    /// driver polling the ring never sees part of them (a frame over several receive buffers).
    pub fn add_used_together(
        &self,
        index: usize,
        queue: &mut Queue,
        used: &[(u16, u32)],
    ) -> Result<(), VirtioError> {
        use std::sync::atomic::Ordering;
        use vm_memory::{Bytes, GuestAddress};
        let broken = |source| VirtioError::BrokenQueue {
            queue: index,
            source,
        };
        let size = queue.size();
        let ring = queue.used_ring();
        let mut next = queue.next_used();
        for &(head, len) in used {
            if head >= size {
                return Err(broken(virtio_queue::Error::InvalidDescriptorIndex));
            }
            // used ring: flags (2), idx (2), then size elements of (id: u32, len: u32).
            let slot = 4 + 8 * u64::from(next % size);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            let at = ring
                .checked_add(slot)
                .ok_or(broken(virtio_queue::Error::AddressOverflow))?;
            self.memory
                .write_slice(&elem, GuestAddress(at))
                .map_err(|e| broken(virtio_queue::Error::GuestMemory(e)))?;
            next = next.wrapping_add(1);
        }
        let idx = ring
            .checked_add(2)
            .ok_or(broken(virtio_queue::Error::AddressOverflow))?;
        self.memory
            .store(next.to_le(), GuestAddress(idx), Ordering::Release)
            .map_err(|e| broken(virtio_queue::Error::GuestMemory(e)))?;
        queue.set_next_used(next);
        Ok(())
    }
}

/// A virtio device model behind a transport.
pub trait VirtioDevice<M: GuestMemory>: Send {
    /// The virtio device ID (2 block, 4 entropy, ...).
    fn device_type(&self) -> u32;
    /// The device-specific feature bits it offers (the transport adds VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// The maximum size of each of its virtqueues (powers of two, at most 32768).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of its configuration space at `offset`; bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes its configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver accepted `features` (FEATURES_OK set and kept): a device whose host side
    /// depends on them sets it up now.
    fn features_accepted(&mut self, _features: u64) {}
    /// Processes every chain available on queue `index`; returns whether the used ring
    /// changed (the transport then interrupts the driver). An error means the queue is broken
    /// and the device needs a reset.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        ctx: &DeviceContext<M>,
    ) -> Result<bool, VirtioError>;
    /// Back to the state after creation (the driver wrote 0 to Status).
    fn reset(&mut self);
}

/// Reads `data.len()` bytes of a configuration space `config` at `offset`; bytes past its end
/// read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
pub(crate) mod testing;

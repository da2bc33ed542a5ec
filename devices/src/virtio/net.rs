//! virtio-net (device ID 1): an Ethernet card whose frames go to and come from a
//! [`NetBackend`] (a tap device in the VMM, an in-memory queue in tests).
//!
//! Two queues: receive (0) and transmit (1); no control queue, no offloads, no mergeable
//! receive buffers, so every frame travels with a plain 12-byte `virtio_net_hdr_v1` and the
//! driver posts receive buffers large enough for a whole frame. Frames the backend offers
//! while the guest has no receive buffer wait in the device (one at a time) until the driver
//! posts one; the VMM calls [`super::MmioTransport::kick`] on the receive queue when the
//! backend has frames.

use vm_memory::GuestMemory;

use super::chain::ChainBuffers;
use super::{DeviceContext, Queue, VirtioDevice, VirtioError};

/// Device ID of a virtio network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Feature: the device has a MAC address in its configuration.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature: the configuration has a link status field.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// Link status bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Length of the `virtio_net_hdr_v1` in front of every frame (VERSION_1: `num_buffers` is
/// always present).
pub const NET_HDR_LEN: usize = 12;
/// The largest frame the device moves (a 64 KiB GSO frame plus an Ethernet header); larger
/// transmit chains are dropped.
pub const MAX_FRAME_LEN: usize = 65_550;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// The size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;

/// Errors of a network backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The host side (tap device) failed.
    #[error("network backend failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the guest's Ethernet frames go and come from.
pub trait NetBackend: Send {
    /// Sends one frame the guest transmitted. A frame the host cannot take now may be
    /// dropped (as a real wire would); an error is logged by the caller and the frame lost.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError>;
    /// Takes one pending frame for the guest into `buf` (at least [`MAX_FRAME_LEN`] bytes);
    /// returns its length, or `None` when nothing is pending.
    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError>;
}

/// The virtio-net device model.
pub struct Net {
    backend: Box<dyn NetBackend>,
    config: [u8; 8],
    queue_sizes: [u16; 2],
    /// A received frame waiting for a receive buffer.
    pending: Option<Vec<u8>>,
    /// Frames dropped because the guest's buffer was too small or the chain was malformed.
    dropped: u64,
}

impl Net {
    /// A network card with MAC address `mac` on `backend`.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Self {
            backend,
            config,
            queue_sizes: [NET_QUEUE_SIZE; 2],
            pending: None,
            dropped: 0,
        }
    }

    /// Frames dropped so far (malformed chains, receive buffers too small, backend errors).
    pub fn dropped_frames(&self) -> u64 {
        self.dropped
    }

    /// Sends every chain on the transmit queue.
    fn transmit<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        ctx: &DeviceContext<M>,
    ) -> Result<bool, VirtioError> {
        let mut frame = Vec::new();
        let mut delivered = 0u64;
        let used = ctx.serve_chains(TX_QUEUE, queue, |bufs, memory| {
            if self.read_frame(bufs, memory, &mut frame) && self.backend.send(&frame).is_ok() {
                delivered += 1;
            }
            0
        })?;
        // Chains that could not be parsed or pinned count as dropped frames too.
        self.dropped += used.saturating_sub(delivered);
        Ok(used > 0)
    }

    /// The frame of a transmit chain (after its header) into `frame`; false if the chain is
    /// not a frame.
    fn read_frame<M: GuestMemory>(
        &self,
        bufs: &ChainBuffers,
        memory: &M,
        frame: &mut Vec<u8>,
    ) -> bool {
        let total = bufs.readable_len();
        let Some(len) = usize::try_from(total)
            .ok()
            .and_then(|t| t.checked_sub(NET_HDR_LEN))
        else {
            return false;
        };
        if len > MAX_FRAME_LEN {
            return false;
        }
        frame.resize(len, 0);
        matches!(bufs.read_readable(memory, NET_HDR_LEN as u64, frame), Ok(n) if n == len)
    }

    /// Delivers pending frames into receive buffers while both exist.
    fn receive<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        ctx: &DeviceContext<M>,
    ) -> Result<bool, VirtioError> {
        let mut used = false;
        loop {
            if self.pending.is_none() {
                let mut buf = vec![0u8; MAX_FRAME_LEN];
                match self.backend.receive(&mut buf) {
                    Ok(Some(n)) if n <= MAX_FRAME_LEN => {
                        buf.truncate(n);
                        self.pending = Some(buf);
                    }
                    Ok(Some(_)) => {
                        self.dropped += 1;
                        continue;
                    }
                    // A failing backend must not spin this vCPU; the next kick tries again.
                    Err(_) => return Ok(used),
                    Ok(None) => return Ok(used),
                }
            }
            let Some(chain) = ctx.next_chain(RX_QUEUE, queue)? else {
                // No buffer: the frame waits for the driver's next notify.
                return Ok(used);
            };
            let frame = self.pending.take().unwrap_or_default();
            let head = chain.head_index();
            let mut guard = None;
            let len = match ChainBuffers::parse(chain, ctx.memory()) {
                Ok(bufs) => match ctx.pins().pin(&bufs.dma_ranges()) {
                    Ok(g) => {
                        guard = Some(g);
                        Self::write_frame(&bufs, ctx.memory(), &frame)
                    }
                    Err(_) => 0,
                },
                Err(_) => 0,
            };
            if len == 0 {
                self.dropped += 1;
            }
            // Unpin first: the used ring may share a page with a buffer pinned for reading, and
            // writing it under that pin would wait for a remote request that waits for the pin.
            drop(guard);
            ctx.add_used(RX_QUEUE, queue, head, len)?;
            used = true;
        }
    }

    /// Writes header and `frame` into a receive chain; returns the used length, or 0 if it
    /// does not fit (the frame is dropped, the driver counts a length error).
    fn write_frame<M: GuestMemory>(bufs: &ChainBuffers, memory: &M, frame: &[u8]) -> u32 {
        let need = NET_HDR_LEN + frame.len();
        if bufs.writable_len() < need as u64 {
            return 0;
        }
        let mut header = [0u8; NET_HDR_LEN];
        // num_buffers = 1 (no mergeable receive buffers); no checksum or GSO offload.
        header[10..12].copy_from_slice(&1u16.to_le_bytes());
        let ok = matches!(bufs.write_writable(memory, 0, &header), Ok(NET_HDR_LEN))
            && matches!(bufs.write_writable(memory, NET_HDR_LEN as u64, frame), Ok(n) if n == frame.len());
        if ok {
            // need <= NET_HDR_LEN + MAX_FRAME_LEN.
            u32::try_from(need).unwrap_or(0)
        } else {
            0
        }
    }
}

impl<M: GuestMemory> VirtioDevice<M> for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_NET_F_MAC) | (1u64 << VIRTIO_NET_F_STATUS)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only in virtio 1.x (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        ctx: &DeviceContext<M>,
    ) -> Result<bool, VirtioError> {
        match index {
            RX_QUEUE => self.receive(queue, ctx),
            TX_QUEUE => self.transmit(queue, ctx),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use crate::virtio::mmio::{reg, status};
    use crate::virtio::testing::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestMemoryMmap;

    /// Frames the guest sent, and frames waiting for the guest.
    #[derive(Clone, Default)]
    struct MemoryBackend {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
    }

    impl NetBackend for MemoryBackend {
        fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
            Ok(self.inbox.lock().unwrap().pop_front().map(|f| {
                buf[..f.len()].copy_from_slice(&f);
                f.len()
            }))
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn nic() -> (Driver<GuestMemoryMmap>, MemoryBackend) {
        let backend = MemoryBackend::default();
        let mut d = Driver::bare(
            Box::new(Net::new(Box::new(backend.clone()), MAC)),
            memory(0x20000),
        );
        d.negotiate();
        d.setup_queue(16);
        d.select(TX_QUEUE);
        d.setup_queue(16);
        d.select(RX_QUEUE);
        let s = d.status();
        w32(&mut d.t, reg::STATUS, s | status::DRIVER_OK);
        (d, backend)
    }

    fn frame(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn config_has_the_mac_and_link_up() {
        let (mut d, _) = nic();
        let mut c = [0u8; 8];
        d.t.read(reg::CONFIG, &mut c);
        assert_eq!(&c[..6], &MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_eq!(
            d.t.driver_features() & (1 << VIRTIO_NET_F_MAC),
            1 << VIRTIO_NET_F_MAC
        );
    }

    #[test]
    fn transmits_frames_after_their_header() {
        let (mut d, backend) = nic();
        d.select(TX_QUEUE);
        let f = frame(100, 1);
        d.write(DATA, &[0; NET_HDR_LEN]);
        d.write(DATA + 0x100, &f[..40]);
        d.write(DATA + 0x800, &f[40..]);
        let head = d.chain(
            0,
            &[
                (DATA, 12, false),
                (DATA + 0x100, 40, false),
                (DATA + 0x800, 60, false),
            ],
        );
        assert_eq!(d.submit(head), (0, 0));
        // Header and frame in one buffer.
        let mut one = vec![0u8; NET_HDR_LEN];
        one.extend_from_slice(&frame(60, 2));
        d.write(DATA + 0x1000, &one);
        let head = d.chain(3, &[(DATA + 0x1000, one.len() as u32, false)]);
        assert_eq!(d.submit(head), (3, 0));
        assert_eq!(*backend.sent.lock().unwrap(), vec![f, frame(60, 2)]);
    }

    #[test]
    fn malformed_transmit_chains_are_dropped() {
        let (mut d, backend) = nic();
        d.select(TX_QUEUE);
        let head = d.chain(0, &[(DATA, 8, false)]);
        assert_eq!(d.submit(head), (0, 0), "shorter than the header");
        d.desc(1, DATA, 12, F_NEXT, 2);
        d.desc(2, DATA, 100, F_NEXT, 1);
        assert_eq!(d.submit(1), (1, 0), "a loop");
        let head = d.chain(3, &[(DATA, 12, false), (0x1ff00, 0x200, false)]);
        assert_eq!(d.submit(head), (3, 0), "outside guest memory");
        let head = d.chain(
            5,
            &[
                (DATA, 12, false),
                (DATA, 0x10000, false),
                (DATA, 0x10000, false),
            ],
        );
        assert_eq!(d.submit(head), (5, 0), "larger than any frame");
        assert!(backend.sent.lock().unwrap().is_empty());
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn received_frames_wait_for_buffers_and_arrive_with_a_header() {
        let (mut d, backend) = nic();
        backend.inbox.lock().unwrap().push_back(frame(64, 3));
        backend.inbox.lock().unwrap().push_back(frame(1514, 4));
        // No buffer yet: the kick takes the first frame and keeps it.
        d.t.kick(RX_QUEUE);
        assert_eq!(d.used_idx(), 0);
        d.write(DATA, &[0xee; NET_HDR_LEN]);
        let head = d.chain(0, &[(DATA, 1526, true)]);
        assert_eq!(d.submit(head), (0, 12 + 64));
        let got = d.read(DATA, 12 + 64);
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[12..], &frame(64, 3)[..]);
        // The second frame went into the next buffer the driver posted, split over two.
        let head = d.chain(
            1,
            &[(DATA + 0x1000, 500, true), (DATA + 0x2000, 1026, true)],
        );
        assert_eq!(d.submit(head), (1, 12 + 1514));
        let mut got = d.read(DATA + 0x1000, 500);
        got.extend(d.read(DATA + 0x2000, 1026));
        assert_eq!(&got[12..], &frame(1514, 4)[..]);
        // A host-side kick with buffers posted and a new frame delivers at once.
        let head = d.chain(3, &[(DATA + 0x3000, 1526, true)]);
        d.publish(head);
        d.notify();
        backend.inbox.lock().unwrap().push_back(frame(200, 5));
        d.t.kick(RX_QUEUE);
        assert_eq!(d.used_idx(), 3);
        assert_eq!(d.used_elem(2), (3, 212));
        assert!(d.irq.level.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_receive_buffer_too_small_or_read_only_drops_the_frame() {
        let (mut d, backend) = nic();
        backend.inbox.lock().unwrap().push_back(frame(1000, 6));
        backend.inbox.lock().unwrap().push_back(frame(10, 7));
        backend.inbox.lock().unwrap().push_back(frame(10, 8));
        let head = d.chain(0, &[(DATA, 100, true)]);
        assert_eq!(d.submit(head), (0, 0));
        let head = d.chain(1, &[(DATA, 100, false)]);
        assert_eq!(d.submit(head), (1, 0));
        let head = d.chain(2, &[(DATA, 100, true)]);
        assert_eq!(d.submit(head), (2, 22));
        assert_eq!(&d.read(DATA + 12, 10), &frame(10, 8)[..]);
    }

    #[test]
    fn reset_forgets_a_waiting_frame() {
        let (mut d, backend) = nic();
        backend.inbox.lock().unwrap().push_back(frame(64, 9));
        d.t.kick(RX_QUEUE);
        w32(&mut d.t, reg::STATUS, 0);
        let mut d2 = d;
        d2.write(AVAIL, &[0; 4]);
        d2.write(USED, &[0; 4]);
        d2.set_avail_idx(0);
        d2.negotiate();
        d2.setup_queue(16);
        let s = d2.status();
        w32(&mut d2.t, reg::STATUS, s | status::DRIVER_OK);
        let head = d2.chain(0, &[(DATA, 1526, true)]);
        d2.publish(head);
        d2.notify();
        assert_eq!(d2.used_idx(), 0, "nothing to receive after the reset");
    }
}

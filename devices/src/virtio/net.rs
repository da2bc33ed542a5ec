//! virtio-net (device ID 1): an Ethernet card whose frames go to and come from a
//! [`NetBackend`] (a tap device in the VMM, an in-memory queue in tests).
//!
//! Two queues: receive (0) and transmit (1); no control queue. Every frame travels behind a
//! 12-byte `virtio_net_hdr_v1`. With mergeable receive buffers (`VIRTIO_NET_F_MRG_RXBUF`) a
//! received frame fills as many of the driver's buffers as it needs, returned to the driver
//! together; without, each buffer holds a whole frame. Frames the backend offers while the
//! guest has too few receive buffers wait in the device (one at a time) until the driver posts
//! more; the VMM calls [`super::MmioTransport::kick`] on the receive queue when the backend
//! has frames.
//!
//! A backend that can carry the header ([`NetBackend::carries_offloads`], the tap does) gets
//! checksum and TCP segmentation offload offered in both directions: the guest then sends and
//! receives 64 KiB TCP segments with their checksums left to the host. On this host that is
//! what makes the card usable at all: the guest kernel runs emulated (HOST.md), so its cost is
//! per frame, and a 64 KiB segment costs it about what a 1.5 KiB frame does.

use vm_memory::GuestMemory;

use super::chain::ChainBuffers;
use super::{DeviceContext, Queue, QueueT, VirtioDevice, VirtioError};

/// Device ID of a virtio network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Feature: the device completes partial checksums of transmitted frames.
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Feature: the driver accepts received frames with partial checksums.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// Feature: the driver accepts received TCP/IPv4 segments larger than the MTU.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// Feature: the driver accepts received TCP/IPv6 segments larger than the MTU.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// Feature: the device segments transmitted TCP/IPv4 frames larger than the MTU.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// Feature: the device segments transmitted TCP/IPv6 frames larger than the MTU.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Feature: the device has a MAC address in its configuration.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature: a received frame may span several receive buffers (`num_buffers` says how many).
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
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

/// What the driver accepts on received frames, for a backend that carries offloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestOffloads {
    /// Partial checksums (`VIRTIO_NET_F_GUEST_CSUM`).
    pub csum: bool,
    /// TCP/IPv4 segments larger than the MTU (`VIRTIO_NET_F_GUEST_TSO4`).
    pub tso4: bool,
    /// TCP/IPv6 segments larger than the MTU (`VIRTIO_NET_F_GUEST_TSO6`).
    pub tso6: bool,
}

impl GuestOffloads {
    /// The offloads of the driver's accepted feature bits.
    pub fn from_features(features: u64) -> Self {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        // Segmentation without checksum offload is not a combination the spec allows.
        Self {
            csum,
            tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: csum && has(VIRTIO_NET_F_GUEST_TSO6),
        }
    }
}

/// Where the guest's Ethernet frames go and come from. Every frame travels with its
/// `virtio_net_hdr_v1` (checksum and segmentation fields); a backend that does not carry
/// offloads ignores the header of a sent frame and gives received frames an empty one.
pub trait NetBackend: Send {
    /// Whether the backend takes and gives headers with offload requests (checksums left to
    /// the other side, segments larger than the MTU), so the card may offer them.
    fn carries_offloads(&self) -> bool {
        false
    }
    /// The driver accepts `offloads` on received frames from now on (none after a reset).
    fn set_guest_offloads(&mut self, _offloads: GuestOffloads) -> Result<(), NetError> {
        Ok(())
    }
    /// Sends one frame the guest transmitted, with its header. A frame the host cannot take
    /// now may be dropped (as a real wire would); an error is logged by the caller and the
    /// frame lost.
    fn send(&mut self, header: &[u8; NET_HDR_LEN], frame: &[u8]) -> Result<(), NetError>;
    /// Takes one pending frame for the guest into `buf` (at least [`MAX_FRAME_LEN`] bytes)
    /// and its header into `header`; returns the frame's length, or `None` when nothing is
    /// pending.
    fn receive(
        &mut self,
        header: &mut [u8; NET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, NetError>;
}

/// The virtio-net device model.
pub struct Net {
    backend: Box<dyn NetBackend>,
    config: [u8; 8],
    queue_sizes: [u16; 2],
    /// A received frame waiting for a receive buffer, with its header.
    pending: Option<([u8; NET_HDR_LEN], Vec<u8>)>,
    /// Frames dropped because the guest's buffer was too small or the chain was malformed.
    dropped: u64,
    /// The driver accepted VIRTIO_NET_F_MRG_RXBUF.
    mergeable: bool,
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
            mergeable: false,
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
        let mut header = [0u8; NET_HDR_LEN];
        let mut delivered = 0u64;
        let used = ctx.serve_chains(TX_QUEUE, queue, |bufs, memory| {
            if self.read_frame(bufs, memory, &mut header, &mut frame)
                && self.backend.send(&header, &frame).is_ok()
            {
                delivered += 1;
            }
            0
        })?;
        // Chains that could not be parsed or pinned count as dropped frames too.
        self.dropped += used.saturating_sub(delivered);
        Ok(used > 0)
    }

    /// The header and frame of a transmit chain into `header` and `frame`; false if the chain
    /// is not a frame.
    fn read_frame<M: GuestMemory>(
        &self,
        bufs: &ChainBuffers,
        memory: &M,
        header: &mut [u8; NET_HDR_LEN],
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
        matches!(bufs.read_readable(memory, 0, header), Ok(NET_HDR_LEN))
            && matches!(bufs.read_readable(memory, NET_HDR_LEN as u64, frame), Ok(n) if n == len)
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
                let mut header = [0u8; NET_HDR_LEN];
                match self.backend.receive(&mut header, &mut buf) {
                    Ok(Some(n)) if n <= MAX_FRAME_LEN => {
                        buf.truncate(n);
                        self.pending = Some((header, buf));
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
            if self.mergeable {
                match self.receive_merged(queue, ctx)? {
                    Some(()) => {
                        used = true;
                        continue;
                    }
                    None => return Ok(used),
                }
            }
            let Some(chain) = ctx.next_chain(RX_QUEUE, queue)? else {
                // No buffer: the frame waits for the driver's next notify.
                return Ok(used);
            };
            let (header, frame) = self.pending.take().unwrap_or_default();
            let head = chain.head_index();
            let mut guard = None;
            let len = match ChainBuffers::parse(chain, ctx.memory()) {
                Ok(bufs) => match ctx.pins().pin(&bufs.dma_ranges()) {
                    Ok(g) => {
                        guard = Some(g);
                        Self::write_frame(&bufs, ctx.memory(), header, &frame)
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

    /// Delivers the pending frame over as many receive buffers as it needs, all returned to
    /// the driver at once (it reads `num_buffers` entries when it sees the first). `None` when
    /// the available buffers cannot hold it yet: they stay available, the frame pending.
    fn receive_merged<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        ctx: &DeviceContext<M>,
    ) -> Result<Option<()>, VirtioError> {
        let Some((_, frame)) = self.pending.as_ref() else {
            return Ok(Some(()));
        };
        let need = (NET_HDR_LEN + frame.len()) as u64;
        let start = queue.next_avail();
        let mut chains = Vec::new();
        let mut room = 0u64;
        let mut malformed = false;
        while room < need {
            let Some(chain) = ctx.next_chain(RX_QUEUE, queue)? else {
                queue.set_next_avail(start);
                return Ok(None);
            };
            let head = chain.head_index();
            match ChainBuffers::parse(chain, ctx.memory()) {
                Ok(bufs) => {
                    room += bufs.writable_len();
                    chains.push((head, Some(bufs)));
                }
                Err(_) => {
                    // The frame is lost; this chain and those taken so far go back empty.
                    chains.push((head, None));
                    malformed = true;
                    break;
                }
            }
        }
        let (mut header, frame) = self.pending.take().unwrap_or_default();
        let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        header[10..12].copy_from_slice(&count.to_le_bytes());
        let mut packet = Vec::with_capacity(NET_HDR_LEN + frame.len());
        packet.extend_from_slice(&header);
        packet.extend_from_slice(&frame);
        let mut written = 0usize;
        let mut lens = Vec::with_capacity(chains.len());
        for (head, bufs) in &chains {
            let mut len = 0u32;
            if let (false, Some(bufs)) = (malformed, bufs) {
                let take = usize::try_from(bufs.writable_len())
                    .unwrap_or(usize::MAX)
                    .min(packet.len() - written);
                // Pinned only while written: the used ring may share a page with a buffer.
                if let Ok(_pinned) = ctx.pins().pin(&bufs.dma_ranges()) {
                    if let Ok(n) =
                        bufs.write_writable(ctx.memory(), 0, &packet[written..written + take])
                    {
                        if n == take {
                            // take <= MAX_FRAME_LEN + NET_HDR_LEN.
                            len = u32::try_from(take).unwrap_or(0);
                        }
                    }
                }
                if len == 0 {
                    malformed = true;
                }
                written += take;
            }
            lens.push((*head, len));
        }
        if malformed {
            self.dropped += 1;
            for entry in &mut lens {
                entry.1 = 0;
            }
        }
        ctx.add_used_together(RX_QUEUE, queue, &lens)?;
        Ok(Some(()))
    }

    /// Writes `header` and `frame` into a receive chain; returns the used length, or 0 if it
    /// does not fit (the frame is dropped, the driver counts a length error).
    fn write_frame<M: GuestMemory>(
        bufs: &ChainBuffers,
        memory: &M,
        mut header: [u8; NET_HDR_LEN],
        frame: &[u8],
    ) -> u32 {
        let need = NET_HDR_LEN + frame.len();
        if bufs.writable_len() < need as u64 {
            return 0;
        }
        // num_buffers = 1: no mergeable receive buffers.
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
        let plain = (1u64 << VIRTIO_NET_F_MAC)
            | (1u64 << VIRTIO_NET_F_STATUS)
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF);
        if !self.backend.carries_offloads() {
            return plain;
        }
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]
        .iter()
        .fold(plain, |f, bit| f | (1u64 << bit))
    }

    fn features_accepted(&mut self, features: u64) {
        self.mergeable = features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        // A backend that cannot switch keeps giving plain frames, which every driver takes.
        let _ = self
            .backend
            .set_guest_offloads(GuestOffloads::from_features(features));
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
        self.mergeable = false;
        let _ = self.backend.set_guest_offloads(GuestOffloads::default());
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

    /// Frames the guest sent, and frames waiting for the guest; with `offloads`, a backend
    /// that carries headers, recording what it was sent and told.
    #[derive(Clone, Default)]
    struct MemoryBackend {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        sent_headers: Arc<Mutex<Vec<[u8; NET_HDR_LEN]>>>,
        inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
        /// The header every received frame gets.
        rx_header: [u8; NET_HDR_LEN],
        offloads: bool,
        told: Arc<Mutex<Vec<GuestOffloads>>>,
    }

    impl NetBackend for MemoryBackend {
        fn carries_offloads(&self) -> bool {
            self.offloads
        }
        fn set_guest_offloads(&mut self, offloads: GuestOffloads) -> Result<(), NetError> {
            self.told.lock().unwrap().push(offloads);
            Ok(())
        }
        fn send(&mut self, header: &[u8; NET_HDR_LEN], frame: &[u8]) -> Result<(), NetError> {
            self.sent.lock().unwrap().push(frame.to_vec());
            self.sent_headers.lock().unwrap().push(*header);
            Ok(())
        }
        fn receive(
            &mut self,
            header: &mut [u8; NET_HDR_LEN],
            buf: &mut [u8],
        ) -> Result<Option<usize>, NetError> {
            Ok(self.inbox.lock().unwrap().pop_front().map(|f| {
                *header = self.rx_header;
                buf[..f.len()].copy_from_slice(&f);
                f.len()
            }))
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn nic() -> (Driver<GuestMemoryMmap>, MemoryBackend) {
        nic_on(MemoryBackend::default())
    }

    /// A card whose driver takes every feature but mergeable receive buffers: each receive
    /// buffer holds one frame.
    fn nic_on(backend: MemoryBackend) -> (Driver<GuestMemoryMmap>, MemoryBackend) {
        nic_with(backend, false)
    }

    fn nic_with(
        backend: MemoryBackend,
        mergeable: bool,
    ) -> (Driver<GuestMemoryMmap>, MemoryBackend) {
        let mut d = Driver::bare(
            Box::new(Net::new(Box::new(backend.clone()), MAC)),
            memory(0x40000),
        );
        let mut features = d.offered_features();
        if !mergeable {
            features &= !(1u64 << VIRTIO_NET_F_MRG_RXBUF);
        }
        assert!(d.try_features(features));
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
        let head = d.chain(3, &[(DATA, 12, false), (0x3ff00, 0x200, false)]);
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

    const OFFLOAD_BITS: [u32; 6] = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ];

    #[test]
    fn offloads_are_offered_only_over_a_backend_that_carries_them() {
        let (d, backend) = nic();
        for bit in OFFLOAD_BITS {
            assert_eq!(d.t.driver_features() & (1 << bit), 0, "bit {bit}");
        }
        assert!(backend
            .told
            .lock()
            .unwrap()
            .iter()
            .all(|o| *o == GuestOffloads::default()));
        let (d, backend) = nic_on(MemoryBackend {
            offloads: true,
            ..MemoryBackend::default()
        });
        for bit in OFFLOAD_BITS {
            assert_ne!(d.t.driver_features() & (1 << bit), 0, "bit {bit}");
        }
        // FEATURES_OK told the backend what the driver takes on received frames.
        assert_eq!(
            backend.told.lock().unwrap().last(),
            Some(&GuestOffloads {
                csum: true,
                tso4: true,
                tso6: true
            })
        );
    }

    #[test]
    fn a_reset_takes_the_guest_offloads_back() {
        let (mut d, backend) = nic_on(MemoryBackend {
            offloads: true,
            ..MemoryBackend::default()
        });
        w32(&mut d.t, reg::STATUS, 0);
        assert_eq!(
            backend.told.lock().unwrap().last(),
            Some(&GuestOffloads::default())
        );
    }

    #[test]
    fn segmentation_without_checksum_offload_is_not_taken() {
        let tso_only = (1u64 << VIRTIO_NET_F_GUEST_TSO4) | (1u64 << VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(
            GuestOffloads::from_features(tso_only),
            GuestOffloads::default()
        );
        let csum = 1u64 << VIRTIO_NET_F_GUEST_CSUM;
        assert_eq!(
            GuestOffloads::from_features(csum | (1 << VIRTIO_NET_F_GUEST_TSO4)),
            GuestOffloads {
                csum: true,
                tso4: true,
                tso6: false
            }
        );
    }

    #[test]
    fn headers_travel_with_64_kib_segments_both_ways() {
        // A TCP/IPv4 segment with a partial checksum: flags NEEDS_CSUM, gso_type TCPV4,
        // hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16.
        let mut gso = [0u8; NET_HDR_LEN];
        gso[0] = 1;
        gso[1] = 1;
        gso[2..4].copy_from_slice(&54u16.to_le_bytes());
        gso[4..6].copy_from_slice(&1448u16.to_le_bytes());
        gso[6..8].copy_from_slice(&34u16.to_le_bytes());
        gso[8..10].copy_from_slice(&16u16.to_le_bytes());
        let (mut d, backend) = nic_on(MemoryBackend {
            offloads: true,
            rx_header: gso,
            ..MemoryBackend::default()
        });
        let big = frame(65_000, 7);
        // Above both queues' rings.
        const BIG: u64 = 0x20000;
        // Transmit: header and segment reach the backend as the guest wrote them.
        d.select(TX_QUEUE);
        d.write(DATA, &gso);
        d.write(BIG, &big);
        let head = d.chain(0, &[(DATA, 12, false), (BIG, 65_000, false)]);
        assert_eq!(d.submit(head), (0, 0));
        assert_eq!(*backend.sent.lock().unwrap(), vec![big.clone()]);
        assert_eq!(*backend.sent_headers.lock().unwrap(), vec![gso]);
        // Receive: the backend's header arrives with num_buffers set.
        d.select(RX_QUEUE);
        backend.inbox.lock().unwrap().push_back(big.clone());
        let head = d.chain(0, &[(BIG, 12 + 65_000, true)]);
        assert_eq!(d.submit(head), (0, 12 + 65_000));
        let got = d.read(BIG, 12 + 65_000);
        assert_eq!(&got[..10], &gso[..10]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[12..], &big[..]);
    }

    #[test]
    fn a_segment_spreads_over_mergeable_buffers_returned_together() {
        let (mut d, backend) = nic_with(MemoryBackend::default(), true);
        assert_ne!(d.t.driver_features() & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
        let big = frame(20_000, 11);
        backend.inbox.lock().unwrap().push_back(big.clone());
        // Four 4 KiB buffers cannot hold 12 + 20000 bytes: nothing is used, the frame waits.
        const BUFS: u64 = 0x20000;
        for i in 0..4u16 {
            let head = d.chain(i, &[(BUFS + u64::from(i) * 0x1000, 4096, true)]);
            d.publish(head);
        }
        d.notify();
        assert_eq!(d.used_idx(), 0);
        // A fifth: the frame takes all five, the last one partly, in one step.
        let head = d.chain(4, &[(BUFS + 4 * 0x1000, 4096, true)]);
        d.publish(head);
        d.notify();
        assert_eq!(d.used_idx(), 5);
        let lens: Vec<(u32, u32)> = (0..5).map(|i| d.used_elem(i)).collect();
        assert_eq!(
            lens,
            vec![
                (0, 4096),
                (1, 4096),
                (2, 4096),
                (3, 4096),
                (4, 12 + 20_000 - 4 * 4096)
            ]
        );
        let got = d.read(BUFS, 12 + 20_000);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 5, "num_buffers");
        assert_eq!(&got[12..], &big[..]);
        // A small frame next takes one buffer, num_buffers 1.
        backend.inbox.lock().unwrap().push_back(frame(60, 12));
        let head = d.chain(5, &[(BUFS + 5 * 0x1000, 4096, true)]);
        assert_eq!(d.submit(head), (5, 72));
        assert_eq!(d.read(BUFS + 5 * 0x1000 + 10, 2), vec![1, 0]);
    }

    #[test]
    fn a_malformed_buffer_among_mergeable_ones_drops_only_that_frame() {
        let (mut d, backend) = nic_with(MemoryBackend::default(), true);
        backend.inbox.lock().unwrap().push_back(frame(6000, 13));
        backend.inbox.lock().unwrap().push_back(frame(100, 14));
        const BUFS: u64 = 0x20000;
        let head = d.chain(0, &[(BUFS, 4096, true)]);
        d.publish(head);
        // A loop: 1 -> 2 -> 1.
        d.desc(1, BUFS + 0x1000, 100, F_NEXT | F_WRITE, 2);
        d.desc(2, BUFS + 0x2000, 100, F_NEXT | F_WRITE, 1);
        d.publish(1);
        d.notify();
        assert_eq!(d.used_idx(), 2);
        assert_eq!((d.used_elem(0), d.used_elem(1)), ((0, 0), (1, 0)));
        // The next frame arrives whole in the next buffer.
        let head = d.chain(3, &[(BUFS + 0x3000, 4096, true)]);
        assert_eq!(d.submit(head), (3, 112));
        assert_eq!(&d.read(BUFS + 0x3000 + 12, 100), &frame(100, 14)[..]);
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }
}

/// Random receive and transmit rings thrown at the network card, with and without mergeable
/// receive buffers, while frames of every size wait: it must neither panic nor write a byte
/// outside guest memory.
#[cfg(test)]
mod hostile_guest {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use crate::virtio::mmio::{reg, status};
    use crate::virtio::testing::*;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    /// Both queues' rings (queue 1's are QUEUE_STRIDE above queue 0's) fit below this.
    const GUEST_LEN: usize = 0x20000;
    const QUEUE: u16 = 8;

    /// Frames waiting for the guest; what it sends is dropped.
    struct Inbox(Arc<Mutex<Vec<Vec<u8>>>>);

    impl NetBackend for Inbox {
        fn carries_offloads(&self) -> bool {
            true
        }
        fn send(&mut self, _: &[u8; NET_HDR_LEN], _: &[u8]) -> Result<(), NetError> {
            Ok(())
        }
        fn receive(
            &mut self,
            header: &mut [u8; NET_HDR_LEN],
            buf: &mut [u8],
        ) -> Result<Option<usize>, NetError> {
            Ok(self.0.lock().unwrap().pop().map(|f| {
                *header = [0xff; NET_HDR_LEN];
                buf[..f.len()].copy_from_slice(&f);
                f.len()
            }))
        }
    }

    fn address() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..16).prop_map(|i| DATA + 0x800 * i),
            Just(DESC),
            Just(AVAIL),
            Just(USED),
            Just(USED + QUEUE_STRIDE),
            (GUEST_LEN as u64 - 0x1100)..(GUEST_LEN as u64 + 0x100),
            any::<u64>(),
        ]
    }

    fn length() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(12u32),
            Just(1526),
            Just(4096),
            0u32..0x3000,
            any::<u32>()
        ]
    }

    /// A queue as the driver leaves it: descriptors (address, length, flags, next), the
    /// available ring's heads, and its index.
    type Ring = (Vec<(u64, u32, u16, u16)>, Vec<u16>, u16);

    fn ring() -> impl Strategy<Value = Ring> {
        (
            proptest::collection::vec(
                (address(), length(), 0u16..8, 0u16..(QUEUE + 3)),
                QUEUE as usize,
            ),
            proptest::collection::vec(0u16..(QUEUE + 2), QUEUE as usize),
            prop_oneof![0u16..(QUEUE + 2), any::<u16>()],
        )
    }

    fn frame_len() -> impl Strategy<Value = usize> {
        prop_oneof![
            0usize..64,
            1000usize..1600,
            Just(MAX_FRAME_LEN - 1),
            2000usize..20_000
        ]
    }

    fn lay_out(
        d: &mut Driver<vm_memory::GuestMemoryMmap>,
        queue: usize,
        (descs, heads, avail): &Ring,
    ) {
        d.select(queue);
        let base = QUEUE_STRIDE * queue as u64;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            d.desc(i as u16, addr, len, flags, next);
        }
        for (i, &head) in heads.iter().enumerate() {
            d.write(AVAIL + base + 4 + 2 * i as u64, &head.to_le_bytes());
        }
        d.set_avail_idx(*avail);
    }

    fn run(rx: &Ring, tx: &Ring, frames: Vec<usize>, mergeable: bool) -> Result<(), TestCaseError> {
        let (guarded, mem) = GuardedMemory::new(GUEST_LEN);
        {
            let inbox = Arc::new(Mutex::new(
                frames
                    .into_iter()
                    .map(|n| vec![0x5a; n])
                    .collect::<Vec<_>>(),
            ));
            let mut d = Driver::bare(
                Box::new(Net::new(Box::new(Inbox(inbox)), [2, 0, 0, 0, 0, 1])),
                mem.clone(),
            );
            let mut features = d.offered_features();
            if !mergeable {
                features &= !(1u64 << VIRTIO_NET_F_MRG_RXBUF);
            }
            prop_assert!(d.try_features(features));
            for q in [RX_QUEUE, TX_QUEUE] {
                d.select(q);
                d.setup_queue(QUEUE);
            }
            let s = d.status();
            w32(&mut d.t, reg::STATUS, s | status::DRIVER_OK);
            lay_out(&mut d, RX_QUEUE, rx);
            lay_out(&mut d, TX_QUEUE, tx);
            d.t.kick(RX_QUEUE);
            for q in [TX_QUEUE, RX_QUEUE, RX_QUEUE] {
                d.select(q);
                d.notify();
            }
            drop(d);
        }
        drop(mem);
        prop_assert!(
            guarded.guards_intact(),
            "a byte outside guest memory changed"
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_rings_never_panic_or_write_outside_guest_memory(
            rx in ring(),
            tx in ring(),
            frames in proptest::collection::vec(frame_len(), 0..4),
            mergeable in any::<bool>(),
        ) {
            run(&rx, &tx, frames, mergeable)?;
        }
    }
}

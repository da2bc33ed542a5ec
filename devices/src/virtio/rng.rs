//! virtio-rng (device ID 4): an entropy source that fills the guest's buffers from the host's
//! `getrandom(2)`.

use vm_memory::GuestMemory;

use super::chain::ChainBuffers;
use super::{DeviceContext, Queue, VirtioDevice, VirtioError, VIRTIO_ID_RNG};

/// The size of the one request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// At most this many bytes go into one descriptor chain (the driver asks again for more).
pub const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;

/// Errors of the entropy source.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The host's getrandom(2) failed.
    #[error("the host's getrandom(2) failed: {0}")]
    Getrandom(#[source] std::io::Error),
}

/// Fills `buf` from the host's getrandom(2).
pub fn fill_random(buf: &mut [u8]) -> Result<(), RngError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the whole call,
        // and getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(RngError::Getrandom(e));
                }
            }
        }
    }
    Ok(())
}

/// The virtio-rng device model.
pub struct Rng {
    queue_sizes: [u16; 1],
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// An entropy device with one queue of [`RNG_QUEUE_SIZE`].
    pub fn new() -> Self {
        Self {
            queue_sizes: [RNG_QUEUE_SIZE],
        }
    }

    /// Fills the writable buffers of `chain` (at most [`MAX_BYTES_PER_CHAIN`] bytes); returns
    /// how many bytes it wrote.
    fn fill<M: GuestMemory>(chain: &ChainBuffers, memory: &M) -> u32 {
        let want = usize::try_from(chain.writable_len())
            .unwrap_or(usize::MAX)
            .min(MAX_BYTES_PER_CHAIN);
        let mut bytes = vec![0u8; want];
        if fill_random(&mut bytes).is_err() {
            return 0;
        }
        let written = chain.write_writable(memory, 0, &bytes).unwrap_or(0);
        // At most MAX_BYTES_PER_CHAIN.
        u32::try_from(written).unwrap_or(0)
    }
}

impl<M: GuestMemory> VirtioDevice<M> for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        ctx: &DeviceContext<M>,
    ) -> Result<bool, VirtioError> {
        Ok(ctx.serve_chains(index, queue, |buffers, memory| Self::fill(buffers, memory))? > 0)
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::*;

    fn rng() -> Driver<vm_memory::GuestMemoryMmap> {
        Driver::new(Box::new(Rng::new()), memory(0x20000), 16)
    }

    #[test]
    fn fills_every_writable_buffer_of_a_chain() {
        let mut d = rng();
        let head = d.chain(0, &[(DATA, 64, true), (DATA + 0x1000, 200, true)]);
        assert_eq!(d.submit(head), (0, 264));
        assert!(d.read(DATA, 64).iter().any(|&b| b != 0));
        assert!(d.read(DATA + 0x1000, 200).iter().any(|&b| b != 0));
        assert_eq!(
            d.read(DATA + 64, 64),
            vec![0; 64],
            "nothing past the buffer"
        );
        assert!(d.irq.level.load(std::sync::atomic::Ordering::SeqCst));
        // A second request gets different bytes.
        let first = d.read(DATA, 64);
        let head = d.chain(2, &[(DATA, 64, true)]);
        assert_eq!(d.submit(head), (2, 64));
        assert_ne!(d.read(DATA, 64), first);
    }

    #[test]
    fn caps_one_chain_and_ignores_readable_buffers() {
        let mut d = rng();
        let head = d.chain(0, &[(DATA, 0x10000, true), (DATA + 0x10000, 0x100, true)]);
        assert_eq!(
            d.submit(head),
            (0, u32::try_from(MAX_BYTES_PER_CHAIN).unwrap())
        );
        assert_eq!(d.read(DATA + 0x10000, 0x100), vec![0; 0x100]);
        let head = d.chain(4, &[(DATA, 16, false)]);
        assert_eq!(d.submit(head), (4, 0));
    }

    #[test]
    fn broken_chains_come_back_empty() {
        let mut d = rng();
        // Outside guest memory.
        let head = d.chain(0, &[(0x1f000, 0x2000, true)]);
        assert_eq!(d.submit(head), (0, 0));
        // A loop.
        d.desc(3, DATA, 16, F_WRITE | F_NEXT, 4);
        d.desc(4, DATA + 16, 16, F_WRITE | F_NEXT, 3);
        assert_eq!(d.submit(3), (3, 0));
        assert_eq!(d.read(DATA, 32), vec![0; 32]);
        // A next index outside the table.
        d.desc(5, DATA, 16, F_WRITE | F_NEXT, 300);
        assert_eq!(d.submit(5), (5, 0));
    }

    #[test]
    fn getrandom_fills_large_buffers() {
        let mut b = vec![0u8; 1 << 20];
        fill_random(&mut b).unwrap();
        assert!(b.iter().filter(|&&x| x == 0).count() < 1 << 14);
    }
}

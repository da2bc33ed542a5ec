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
        let mut used = false;
        while let Some(chain) = ctx.next_chain(index, queue)? {
            let head = chain.head_index();
            let mut guard = None;
            let len = match ChainBuffers::parse(chain, ctx.memory()) {
                Ok(buffers) => match ctx.pins().pin(&buffers.dma_ranges()) {
                    Ok(g) => {
                        guard = Some(g);
                        Self::fill(&buffers, ctx.memory())
                    }
                    Err(_) => 0,
                },
                Err(_) => 0,
            };
            ctx.add_used(index, queue, head, len)?;
            drop(guard);
            used = true;
        }
        Ok(used)
    }

    fn reset(&mut self) {}
}

//! A descriptor chain checked and split into the buffers the device reads and the buffers it
//! writes.
//!
//! The guest writes descriptor tables, so a chain may loop, point outside guest memory, run
//! past the queue size or put a device-readable buffer after a device-writable one; parsing
//! refuses all of these before a device touches a byte, and the device then returns the chain
//! with used length 0.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::pins::DmaRange;

/// Why a descriptor chain cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain has no descriptor the device can read: its head index lies outside the
    /// queue or its descriptor cannot be read.
    #[error("descriptor chain with head {head} has no usable descriptor")]
    Empty {
        /// Head index.
        head: u16,
    },
    /// The chain does not end: it loops, is longer than the queue, points to a descriptor
    /// index outside the table, or its buffers add up to 4 GiB or more.
    #[error(
        "descriptor chain with head {head} does not end within the queue size \
         (a loop or a next index outside the descriptor table)"
    )]
    Unterminated {
        /// Head index.
        head: u16,
    },
    /// A device-readable buffer follows a device-writable one (virtio 1.x 2.7.4.2).
    #[error("descriptor chain with head {head} has a device-readable buffer after a writable one")]
    ReadableAfterWritable {
        /// Head index.
        head: u16,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error(
        "descriptor chain with head {head} has a buffer {addr:#x}+{len:#x} outside guest memory"
    )]
    OutsideGuestMemory {
        /// Head index.
        head: u16,
        /// The buffer's guest-physical address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Guest memory access failed although the buffer was checked (memory was unplugged).
    #[error("guest memory access at {addr:#x} failed")]
    Access {
        /// Where.
        addr: u64,
    },
}

/// One buffer of a descriptor chain, known to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuffer {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A checked descriptor chain: its head and its device-readable then device-writable buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBuffers {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    /// Device-readable buffers, in chain order.
    pub readable: Vec<GuestBuffer>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<GuestBuffer>,
}

impl ChainBuffers {
    /// Walks `chain` and checks it against `memory`.
    pub fn parse<T>(
        chain: DescriptorChain<T>,
        memory: &impl GuestMemory,
    ) -> Result<Self, ChainError>
    where
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut out = Self {
            head,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut last_has_next = None;
        for desc in chain {
            last_has_next = Some(desc.has_next());
            let buffer = GuestBuffer {
                addr: desc.addr(),
                len: desc.len(),
            };
            if buffer.len > 0
                && !memory.check_range(
                    buffer.addr,
                    buffer.len as usize,
                    access(desc.is_write_only()),
                )
            {
                return Err(ChainError::OutsideGuestMemory {
                    head,
                    addr: buffer.addr.0,
                    len: buffer.len,
                });
            }
            if desc.is_write_only() {
                out.writable.push(buffer);
            } else if out.writable.is_empty() {
                out.readable.push(buffer);
            } else {
                return Err(ChainError::ReadableAfterWritable { head });
            }
        }
        match last_has_next {
            None => Err(ChainError::Empty { head }),
            // The iterator stopped while the last descriptor still pointed on: a loop cut by
            // the queue-size limit, a next index outside the table, or an unreadable one.
            Some(true) => Err(ChainError::Unterminated { head }),
            Some(false) => Ok(out),
        }
    }

    /// Total length of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Every buffer as a range to pin (readable ones for reading, writable ones for writing).
    pub fn dma_ranges(&self) -> Vec<DmaRange> {
        let read = self.readable.iter().map(|b| (b, false));
        let write = self.writable.iter().map(|b| (b, true));
        read.chain(write)
            .map(|(b, write)| DmaRange {
                gpa: b.addr.0,
                len: u64::from(b.len),
                write,
            })
            .collect()
    }

    /// Reads `buf.len()` bytes at `offset` of the concatenated readable buffers; returns how
    /// many bytes there were (less than `buf.len()` at the end).
    pub fn read_readable(
        &self,
        memory: &impl GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, ChainError> {
        let mut done = 0;
        for_each_piece(&self.readable, offset, buf.len(), |addr, at, n| {
            memory
                .read_slice(&mut buf[at..at + n], addr)
                .map_err(|_| ChainError::Access { addr: addr.0 })?;
            done += n;
            Ok(())
        })?;
        Ok(done)
    }

    /// Writes `buf` at `offset` of the concatenated writable buffers; returns how many bytes
    /// fit (less than `buf.len()` at the end).
    pub fn write_writable(
        &self,
        memory: &impl GuestMemory,
        offset: u64,
        buf: &[u8],
    ) -> Result<usize, ChainError> {
        let mut done = 0;
        for_each_piece(&self.writable, offset, buf.len(), |addr, at, n| {
            memory
                .write_slice(&buf[at..at + n], addr)
                .map_err(|_| ChainError::Access { addr: addr.0 })?;
            done += n;
            Ok(())
        })?;
        Ok(done)
    }
}

/// What the device does to a buffer.
fn access(write: bool) -> Permissions {
    if write {
        Permissions::Write
    } else {
        Permissions::Read
    }
}

/// Calls `f(guest_addr, offset_in_request, len)` for each piece of `buffers` that the byte
/// range `offset..offset + len` of their concatenation covers.
fn for_each_piece(
    buffers: &[GuestBuffer],
    mut offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    let mut at = 0usize;
    for b in buffers {
        if at == len {
            break;
        }
        let blen = u64::from(b.len);
        if offset >= blen {
            offset -= blen;
            continue;
        }
        // `blen - offset` fits in u32, so in usize on every supported host.
        let avail = usize::try_from(blen - offset).unwrap_or(usize::MAX);
        let n = avail.min(len - at);
        // Inside a buffer checked to lie in guest memory: no overflow.
        f(b.addr.unchecked_add(offset), at, n)?;
        at += n;
        offset = 0;
    }
    Ok(())
}

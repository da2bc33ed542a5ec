//! virtio-blk (device ID 2): a disk backed by a raw image file on the host.
//!
//! Requests are IN (read sectors), OUT (write sectors), FLUSH (`fdatasync` of the image, so
//! data is on the host file when the guest's fsync returns) and GET_ID (the serial). Data moves
//! between the file and guest memory with pread/pwrite through a bounce buffer.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::GuestMemory;

use super::chain::ChainBuffers;
use super::{DeviceContext, Queue, VirtioDevice, VirtioError, VIRTIO_ID_BLOCK};

/// Bytes per sector: the unit of capacity and of the request header's sector field.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the one request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Length of the serial returned by GET_ID.
pub const BLOCK_ID_LEN: usize = 20;
/// Length of a request header (type, reserved, sector).
pub const REQUEST_HEADER_LEN: u64 = 16;

/// Feature: the device has a maximum number of segments per request (`seg_max`).
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature: the device reports its block size (`blk_size`).
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature: the device has a write cache and takes FLUSH requests.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Request type: read sectors.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush the write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: get the device's serial.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed (I/O error or invalid request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The bounce buffer between the image file and guest memory.
const BOUNCE_LEN: usize = 64 * 1024;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file does not exist.
    #[error("disk image {path} does not exist; create it (e.g. `truncate -s 1G {path}`) or fix the path")]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// The path is a directory, device or other non-regular file.
    #[error("disk image {path} is not a regular file; give the path of a raw image file")]
    NotRegularFile {
        /// The path given.
        path: PathBuf,
    },
    /// A writable disk was asked for but the file cannot be opened for writing.
    #[error(
        "disk image {path} cannot be opened for writing ({source}); \
         fix its permissions or attach it read-only"
    )]
    NotWritable {
        /// The path given.
        path: PathBuf,
        /// Why opening failed.
        source: std::io::Error,
    },
    /// The file's size is not a whole number of 512-byte sectors.
    #[error(
        "disk image {path} is {size} bytes, not a multiple of 512-byte sectors; \
         resize it (e.g. `truncate -s` to a multiple of 512)"
    )]
    NotSectorMultiple {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Any other failure to open or inspect the file.
    #[error("cannot open disk image {path}: {source}")]
    Io {
        /// The path given.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// A raw disk image opened for the guest.
#[derive(Debug)]
pub struct BlockBackend {
    file: File,
    path: PathBuf,
    read_only: bool,
    sectors: u64,
}

impl BlockBackend {
    /// Opens the raw image at `path`, for reading only if `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let path_buf = path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BlockError::Missing {
                    path: path_buf.clone(),
                }
            } else {
                BlockError::Io {
                    path: path_buf.clone(),
                    source,
                }
            }
        })?;
        if !meta.is_file() {
            return Err(BlockError::NotRegularFile { path: path_buf });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                    if !read_only =>
                {
                    BlockError::NotWritable {
                        path: path_buf.clone(),
                        source,
                    }
                }
                _ => BlockError::Io {
                    path: path_buf.clone(),
                    source,
                },
            })?;
        let size = meta.len();
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorMultiple {
                path: path_buf,
                size,
            });
        }
        Ok(Self {
            file,
            path: path_buf,
            read_only,
            sectors: size / SECTOR_SIZE,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the guest may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The virtio-blk device model.
pub struct Block {
    backend: BlockBackend,
    serial: [u8; BLOCK_ID_LEN],
    config: [u8; 24],
    queue_sizes: [u16; 1],
}

/// Why a request failed, as the status byte says it.
enum Failure {
    IoErr,
    Unsupported,
}

impl Block {
    /// A disk on `backend` whose GET_ID answers `serial` (truncated to 20 bytes, NUL-padded).
    pub fn new(backend: BlockBackend, serial: &str) -> Self {
        let mut id = [0u8; BLOCK_ID_LEN];
        let n = serial.len().min(BLOCK_ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        // virtio_blk_config: capacity @0, size_max @8, seg_max @12, geometry @16, blk_size @20.
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&backend.capacity_sectors().to_le_bytes());
        let seg_max = u32::from(BLOCK_QUEUE_SIZE - 2);
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // SECTOR_SIZE is 512.
        config[20..24].copy_from_slice(&512u32.to_le_bytes());
        Self {
            backend,
            serial: id,
            config,
            queue_sizes: [BLOCK_QUEUE_SIZE],
        }
    }

    /// The backing image.
    pub fn backend(&self) -> &BlockBackend {
        &self.backend
    }

    /// Serves one checked request; returns the used length (0: the chain had nowhere to put
    /// a status byte and is dropped).
    fn serve<M: GuestMemory>(&self, req: &ChainBuffers, memory: &M) -> u32 {
        let writable = req.writable_len();
        let Some(status_at) = writable.checked_sub(1) else {
            return 0;
        };
        let (status, data_written) = match self.execute(req, memory, status_at) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Failure::IoErr) => (VIRTIO_BLK_S_IOERR, 0),
            Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        match req.write_writable(memory, status_at, &[status]) {
            // data_written <= writable - 1 < 2^32 (a chain's buffers add up to less than 4 GiB).
            Ok(1) => u32::try_from(data_written + 1).unwrap_or(u32::MAX),
            _ => 0,
        }
    }

    /// Runs the request; returns how many data bytes it wrote into guest buffers.
    fn execute<M: GuestMemory>(
        &self,
        req: &ChainBuffers,
        memory: &M,
        data_out_len: u64,
    ) -> Result<u64, Failure> {
        let mut header = [0u8; 16];
        match req.read_readable(memory, 0, &mut header) {
            Ok(16) => {}
            _ => return Err(Failure::IoErr),
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_range(sector, data_out_len)?;
                self.read_to_guest(req, memory, offset, data_out_len)?;
                Ok(data_out_len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.backend.read_only {
                    return Err(Failure::IoErr);
                }
                let len = req.readable_len() - REQUEST_HEADER_LEN;
                let offset = self.check_range(sector, len)?;
                self.write_from_guest(req, memory, offset, len)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.backend.read_only {
                    self.backend.file.sync_data().map_err(|_| Failure::IoErr)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = usize::try_from(data_out_len)
                    .unwrap_or(usize::MAX)
                    .min(BLOCK_ID_LEN);
                match req.write_writable(memory, 0, &self.serial[..n]) {
                    Ok(done) if done == n => Ok(n as u64),
                    _ => Err(Failure::IoErr),
                }
            }
            _ => Err(Failure::Unsupported),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        if len % SECTOR_SIZE != 0 {
            return Err(Failure::IoErr);
        }
        let end = sector
            .checked_add(len / SECTOR_SIZE)
            .ok_or(Failure::IoErr)?;
        if end > self.backend.sectors {
            return Err(Failure::IoErr);
        }
        // sector < capacity = file size / 512, so this fits.
        Ok(sector * SECTOR_SIZE)
    }

    fn read_to_guest<M: GuestMemory>(
        &self,
        req: &ChainBuffers,
        memory: &M,
        offset: u64,
        len: u64,
    ) -> Result<(), Failure> {
        let mut bounce = vec![0u8; BOUNCE_LEN.min(usize::try_from(len).unwrap_or(BOUNCE_LEN))];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(bounce.len());
            self.backend
                .file
                .read_exact_at(&mut bounce[..n], offset + done)
                .map_err(|_| Failure::IoErr)?;
            match req.write_writable(memory, done, &bounce[..n]) {
                Ok(w) if w == n => {}
                _ => return Err(Failure::IoErr),
            }
            done += n as u64;
        }
        Ok(())
    }

    fn write_from_guest<M: GuestMemory>(
        &self,
        req: &ChainBuffers,
        memory: &M,
        offset: u64,
        len: u64,
    ) -> Result<(), Failure> {
        let mut bounce = vec![0u8; BOUNCE_LEN.min(usize::try_from(len).unwrap_or(BOUNCE_LEN))];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(bounce.len());
            match req.read_readable(memory, REQUEST_HEADER_LEN + done, &mut bounce[..n]) {
                Ok(r) if r == n => {}
                _ => return Err(Failure::IoErr),
            }
            self.backend
                .file
                .write_all_at(&bounce[..n], offset + done)
                .map_err(|_| Failure::IoErr)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl<M: GuestMemory> VirtioDevice<M> for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
        if self.backend.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the configuration is writable (writeback toggling is not offered).
    }

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
                Ok(req) => match ctx.pins().pin(&req.dma_ranges()) {
                    Ok(g) => {
                        guard = Some(g);
                        self.serve(&req, ctx.memory())
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

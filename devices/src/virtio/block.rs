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
        writable_data_len: u64,
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
                let offset = self.check_range(sector, writable_data_len)?;
                self.read_to_guest(req, memory, offset, writable_data_len)?;
                Ok(writable_data_len)
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
                let n = usize::try_from(writable_data_len)
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
        Ok(ctx.serve_chains(index, queue, |req, memory| self.serve(req, memory))? > 0)
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use crate::virtio::mmio::status;
    use crate::virtio::testing::*;
    use std::io::Write;
    use vm_memory::GuestMemoryMmap;

    const SECTORS: u64 = 64;
    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x800;

    fn image(sectors: u64) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / 512) as u8)
            .collect();
        f.write_all(&bytes).unwrap();
        f
    }

    fn disk(read_only: bool) -> (Driver<GuestMemoryMmap>, tempfile::NamedTempFile) {
        let img = image(SECTORS);
        let backend = BlockBackend::open(img.path(), read_only).unwrap();
        let d = Driver::new(
            Box::new(Block::new(backend, "spanvm-disk-0")),
            memory(0x40000),
            16,
        );
        (d, img)
    }

    fn header(d: &Driver<GuestMemoryMmap>, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        d.write(HDR, &h);
        d.write(STATUS, &[0xff]);
    }

    fn status_byte(d: &Driver<GuestMemoryMmap>) -> u8 {
        d.read(STATUS, 1)[0]
    }

    #[test]
    fn open_refuses_what_cannot_be_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        assert!(matches!(
            BlockBackend::open(&missing, true),
            Err(BlockError::Missing { .. })
        ));
        assert!(matches!(
            BlockBackend::open(dir.path(), true),
            Err(BlockError::NotRegularFile { .. })
        ));
        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, [0u8; 513]).unwrap();
        let err = BlockBackend::open(&odd, false).unwrap_err();
        assert!(matches!(
            err,
            BlockError::NotSectorMultiple { size: 513, .. }
        ));
        assert!(err.to_string().contains("multiple of 512"));
        let ro = dir.path().join("ro.img");
        std::fs::write(&ro, [0u8; 1024]).unwrap();
        let mut perms = std::fs::metadata(&ro).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&ro, perms).unwrap();
        assert_eq!(BlockBackend::open(&ro, true).unwrap().capacity_sectors(), 2);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            assert!(matches!(
                BlockBackend::open(&ro, false),
                Err(BlockError::NotWritable { .. })
            ));
        }
    }

    #[test]
    fn config_and_features_describe_the_disk() {
        let (mut d, _img) = disk(false);
        let mut cap = [0u8; 8];
        d.t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), SECTORS);
        let mut b = [0u8; 4];
        d.t.read(0x100 + 20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 512);
        d.t.read(0x100 + 12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 254);
        let f = d.t.driver_features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let (d, _img) = disk(true);
        assert_ne!(d.t.driver_features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn reads_what_the_image_holds() {
        let (mut d, _img) = disk(false);
        header(&d, VIRTIO_BLK_T_IN, 3);
        let head = d.chain(0, &[(HDR, 16, false), (BUF, 1024, true), (STATUS, 1, true)]);
        assert_eq!(d.submit(head), (0, 1025));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_OK);
        let data = d.read(BUF, 1024);
        assert!(data[..512].iter().all(|&b| b == 3));
        assert!(data[512..].iter().all(|&b| b == 4));
    }

    #[test]
    fn writes_reach_the_file_read_back_through_the_ring_and_flush() {
        let (mut d, img) = disk(false);
        // Scattered over three buffers, one crossing a page boundary.
        let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7 % 251) as u8).collect();
        d.write(BUF + 0xf00, &pattern[..512]);
        d.write(BUF + 0x3000, &pattern[512..1024]);
        d.write(BUF + 0x5000, &pattern[1024..]);
        header(&d, VIRTIO_BLK_T_OUT, 10);
        let head = d.chain(
            0,
            &[
                (HDR, 16, false),
                (BUF + 0xf00, 512, false),
                (BUF + 0x3000, 512, false),
                (BUF + 0x5000, 512, false),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(d.submit(head), (0, 1));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_OK);
        let file = std::fs::read(img.path()).unwrap();
        assert_eq!(&file[10 * 512..13 * 512], &pattern[..]);
        assert!(file[9 * 512..10 * 512].iter().all(|&b| b == 9));
        assert!(file[13 * 512..14 * 512].iter().all(|&b| b == 13));
        // Read it back into one buffer.
        header(&d, VIRTIO_BLK_T_IN, 10);
        let head = d.chain(
            5,
            &[
                (HDR, 16, false),
                (BUF + 0x8000, 1536, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(d.submit(head), (5, 1537));
        assert_eq!(d.read(BUF + 0x8000, 1536), pattern);
        // Flush.
        header(&d, VIRTIO_BLK_T_FLUSH, 0);
        let head = d.chain(8, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(d.submit(head), (8, 1));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_OK);
        assert!(d.irq.level.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn the_last_sector_and_a_header_and_status_in_one_page() {
        let (mut d, img) = disk(false);
        d.write(BUF, &[0xab; 512]);
        header(&d, VIRTIO_BLK_T_OUT, SECTORS - 1);
        let head = d.chain(0, &[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        assert_eq!(d.submit(head), (0, 1));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_OK);
        let file = std::fs::read(img.path()).unwrap();
        assert!(file[file.len() - 512..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn serves_a_request_through_an_indirect_table() {
        let (mut d, img) = disk(false);
        d.write(BUF, &[0x77; 1024]);
        header(&d, VIRTIO_BLK_T_OUT, 20);
        // The indirect table lives in guest memory at DATA + 0x3000: header, two data
        // buffers, status.
        let table = DATA + 0x3000;
        let entries: [(u64, u32, u16, u16); 4] = [
            (HDR, 16, F_NEXT, 1),
            (BUF, 512, F_NEXT, 2),
            (BUF + 512, 512, F_NEXT, 3),
            (STATUS, 1, F_WRITE, 0),
        ];
        for (i, (addr, len, flags, next)) in entries.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            d.write(table + 16 * i as u64, &raw);
        }
        const F_INDIRECT: u16 = 4;
        d.desc(0, table, 64, F_INDIRECT, 0);
        assert_eq!(d.submit(0), (0, 1));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_OK);
        let file = std::fs::read(img.path()).unwrap();
        assert!(file[20 * 512..22 * 512].iter().all(|&b| b == 0x77));
        // An indirect table whose last entry points past its end is dropped.
        d.write(table + 48 + 12, &(F_WRITE | F_NEXT).to_le_bytes());
        d.write(table + 48 + 14, &9u16.to_le_bytes());
        d.write(STATUS, &[0xff]);
        assert_eq!(d.submit(0), (0, 0));
        assert_eq!(status_byte(&d), 0xff);
    }

    #[test]
    fn get_id_returns_the_serial() {
        let (mut d, _img) = disk(false);
        header(&d, VIRTIO_BLK_T_GET_ID, 0);
        let head = d.chain(0, &[(HDR, 16, false), (BUF, 20, true), (STATUS, 1, true)]);
        assert_eq!(d.submit(head), (0, 21));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_OK);
        assert_eq!(&d.read(BUF, 20), b"spanvm-disk-0\0\0\0\0\0\0\0");
    }

    /// Submits a request of `kind` at `sector` with `buffers` between header and status; returns
    /// (used len, status byte).
    fn request(
        d: &mut Driver<GuestMemoryMmap>,
        kind: u32,
        sector: u64,
        buffers: &[(u64, u32, bool)],
    ) -> (u32, u8) {
        header(d, kind, sector);
        let mut all = vec![(HDR, 16, false)];
        all.extend_from_slice(buffers);
        all.push((STATUS, 1, true));
        let (_, len) = d.submit(d.chain(0, &all));
        (len, status_byte(d))
    }

    #[test]
    fn invalid_requests_get_ioerr_or_unsupp() {
        let (mut d, img) = disk(false);
        let before = std::fs::read(img.path()).unwrap();
        let ioerr = (1, VIRTIO_BLK_S_IOERR);
        // Data not a multiple of 512.
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_IN, 0, &[(BUF, 100, true)]),
            ioerr
        );
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_OUT, 0, &[(BUF, 513, false)]),
            ioerr
        );
        // Beyond capacity, partly beyond, and a sector number that wraps.
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_IN, SECTORS, &[(BUF, 512, true)]),
            ioerr
        );
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_OUT, SECTORS - 1, &[(BUF, 1024, false)]),
            ioerr
        );
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_IN, u64::MAX, &[(BUF, 512, true)]),
            ioerr
        );
        assert_eq!(
            request(
                &mut d,
                VIRTIO_BLK_T_OUT,
                u64::MAX / 512 + 1,
                &[(BUF, 512, false)]
            ),
            ioerr
        );
        // Unknown request types (discard, write zeroes, garbage).
        assert_eq!(request(&mut d, 11, 0, &[]), (1, VIRTIO_BLK_S_UNSUPP));
        assert_eq!(request(&mut d, 13, 0, &[]), (1, VIRTIO_BLK_S_UNSUPP));
        assert_eq!(
            request(&mut d, 0xdead_beef, 0, &[]),
            (1, VIRTIO_BLK_S_UNSUPP)
        );
        // A header shorter than 16 bytes.
        header(&d, VIRTIO_BLK_T_OUT, 0);
        let head = d.chain(0, &[(HDR, 12, false), (STATUS, 1, true)]);
        assert_eq!(d.submit(head), (0, 1));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_IOERR);
        // No header at all.
        d.write(STATUS, &[0xff]);
        let head = d.chain(0, &[(STATUS, 1, true)]);
        assert_eq!(d.submit(head), (0, 1));
        assert_eq!(status_byte(&d), VIRTIO_BLK_S_IOERR);
        assert_eq!(
            std::fs::read(img.path()).unwrap(),
            before,
            "nothing was written"
        );
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let (mut d, img) = disk(true);
        let before = std::fs::read(img.path()).unwrap();
        d.write(BUF, &[0x55; 512]);
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, false)]),
            (1, VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]),
            (1, VIRTIO_BLK_S_OK)
        );
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_IN, 1, &[(BUF, 512, true)]),
            (513, 0)
        );
        assert_eq!(std::fs::read(img.path()).unwrap(), before);
    }

    #[test]
    fn chains_without_a_writable_status_or_that_do_not_end_are_dropped() {
        let (mut d, img) = disk(false);
        let before = std::fs::read(img.path()).unwrap();
        // Status descriptor not writable.
        header(&d, VIRTIO_BLK_T_OUT, 0);
        let head = d.chain(
            0,
            &[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, false)],
        );
        assert_eq!(d.submit(head), (0, 0));
        assert_eq!(status_byte(&d), 0xff);
        // A readable buffer after a writable one.
        header(&d, VIRTIO_BLK_T_IN, 0);
        let head = d.chain(0, &[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, false)]);
        assert_eq!(d.submit(head), (0, 0));
        assert_eq!(d.read(BUF, 512), vec![0; 512]);
        // A loop: 0 -> 1 -> 2 -> 1.
        header(&d, VIRTIO_BLK_T_IN, 0);
        d.desc(0, HDR, 16, F_NEXT, 1);
        d.desc(1, BUF, 512, F_NEXT | F_WRITE, 2);
        d.desc(2, STATUS, 1, F_NEXT | F_WRITE, 1);
        assert_eq!(d.submit(0), (0, 0));
        assert_eq!(status_byte(&d), 0xff);
        // Longer than the queue: 16 descriptors all chained, the last pointing past the table.
        for i in 0..16u16 {
            d.desc(i, BUF + 512 * u64::from(i), 512, F_NEXT | F_WRITE, i + 1);
        }
        d.desc(0, HDR, 16, F_NEXT, 1);
        assert_eq!(d.submit(0), (0, 0));
        // A buffer outside guest memory, and one that wraps the address space.
        header(&d, VIRTIO_BLK_T_IN, 0);
        let head = d.chain(
            0,
            &[(HDR, 16, false), (0x3ff00, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(d.submit(head), (0, 0));
        let head = d.chain(
            0,
            &[
                (HDR, 16, false),
                (u64::MAX - 10, 512, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(d.submit(head), (0, 0));
        assert_eq!(status_byte(&d), 0xff);
        assert_eq!(std::fs::read(img.path()).unwrap(), before);
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        // The device still works.
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_IN, 2, &[(BUF, 512, true)]),
            (513, 0)
        );
    }

    #[test]
    fn pins_every_buffer_and_unpins_after_the_used_ring() {
        use crate::virtio::pins::{DmaPinGuard, DmaPins, DmaRange, PinError};
        use std::sync::{Arc, Mutex};
        #[derive(Default)]
        struct Recorder(Mutex<Vec<Vec<DmaRange>>>, Arc<Mutex<usize>>);
        struct Unpin(Arc<Mutex<usize>>);
        impl Drop for Unpin {
            fn drop(&mut self) {
                *self.0.lock().unwrap() += 1;
            }
        }
        impl DmaPins for Recorder {
            fn pin(&self, ranges: &[DmaRange]) -> Result<DmaPinGuard, PinError> {
                self.0.lock().unwrap().push(ranges.to_vec());
                if ranges.iter().any(|r| r.gpa == 0x8000) {
                    return Err(PinError::Refused {
                        first_gpa: 0x8000,
                        len: 0x1000,
                        reason: "test".into(),
                    });
                }
                Ok(DmaPinGuard::new(Unpin(self.1.clone())))
            }
        }
        let img = image(SECTORS);
        let backend = BlockBackend::open(img.path(), false).unwrap();
        let pins = Arc::new(Recorder::default());
        let irq = Arc::new(TestIrq::default());
        let mem = memory(0x40000);
        let t = crate::virtio::MmioTransport::new(
            Box::new(Block::new(backend, "x")),
            mem.clone(),
            pins.clone(),
            irq,
        );
        let mut d = Driver::from_transport(t, mem);
        d.negotiate();
        d.setup_queue(16);
        let s = d.status();
        crate::virtio::testing::w32(
            &mut d.t,
            crate::virtio::mmio::reg::STATUS,
            s | status::DRIVER_OK,
        );
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_IN, 0, &[(BUF, 512, true)]),
            (513, 0)
        );
        assert_eq!(
            pins.0.lock().unwrap()[0],
            vec![
                DmaRange {
                    gpa: HDR,
                    len: 16,
                    write: false
                },
                DmaRange {
                    gpa: BUF,
                    len: 512,
                    write: true
                },
                DmaRange {
                    gpa: STATUS,
                    len: 1,
                    write: true
                },
            ]
        );
        assert_eq!(*pins.1.lock().unwrap(), 1, "unpinned");
        // A refused pin drops the request untouched.
        d.write(STATUS, &[0xff]);
        header(&d, VIRTIO_BLK_T_IN, 0);
        let head = d.chain(
            0,
            &[(HDR, 16, false), (0x8000, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(d.submit(head), (0, 0));
        assert_eq!(status_byte(&d), 0xff);
    }
}

/// Random descriptor tables, available rings and request headers thrown at the block device:
/// it must neither panic nor write a byte outside guest memory.
#[cfg(test)]
mod hostile_guest {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use crate::virtio::mmio::reg;
    use crate::virtio::testing::*;
    use proptest::prelude::*;

    const GUEST_LEN: usize = 0x10000;
    const QUEUE: u16 = 8;

    /// Addresses a hostile driver likes: headers, data, the rings, the ends of memory, and
    /// anything at all.
    fn address() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..4).prop_map(|i| DATA + 0x100 * i),
            (0u64..8).prop_map(|i| DATA + 0x1000 + 0x800 * i),
            Just(DESC),
            Just(AVAIL),
            Just(USED),
            (GUEST_LEN as u64 - 0x1100)..(GUEST_LEN as u64 + 0x100),
            any::<u64>(),
        ]
    }

    fn length() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(16u32),
            Just(1),
            Just(512),
            Just(1024),
            0u32..0x2000,
            any::<u32>(),
        ]
    }

    fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        (address(), length(), 0u16..8, 0u16..(QUEUE + 3))
    }

    fn request_header() -> impl Strategy<Value = (u32, u64)> {
        (
            prop_oneof![Just(0u32), Just(1), Just(4), Just(8), any::<u32>()],
            prop_oneof![0u64..70, any::<u64>()],
        )
    }

    fn run(
        descs: &[(u64, u32, u16, u16)],
        heads: &[u16],
        avail_idx: u16,
        headers: &[(u32, u64)],
        read_only: bool,
        used_ring: u64,
    ) -> Result<(), TestCaseError> {
        let (guarded, mem) = GuardedMemory::new(GUEST_LEN);
        {
            let mut img = tempfile::NamedTempFile::new().unwrap();
            std::io::Write::write_all(&mut img, &[0u8; 64 * 512]).unwrap();
            let backend = BlockBackend::open(img.path(), read_only).unwrap();
            let mut d = Driver::new(Box::new(Block::new(backend, "fuzz")), mem.clone(), QUEUE);
            if used_ring != USED {
                w32(&mut d.t, reg::STATUS, 0);
                d.negotiate();
                d.setup_queue(QUEUE);
                w32(&mut d.t, reg::QUEUE_READY, 0);
                w32(&mut d.t, reg::QUEUE_DEVICE_LOW, used_ring as u32);
                w32(&mut d.t, reg::QUEUE_DEVICE_HIGH, (used_ring >> 32) as u32);
                w32(&mut d.t, reg::QUEUE_READY, 1);
                let s = d.status();
                w32(
                    &mut d.t,
                    reg::STATUS,
                    s | crate::virtio::mmio::status::DRIVER_OK,
                );
            }
            for (i, &(kind, sector)) in headers.iter().enumerate() {
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&kind.to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                d.write(DATA + 0x100 * i as u64, &h);
            }
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                d.desc(i as u16, addr, len, flags, next);
            }
            for (i, &head) in heads.iter().enumerate() {
                d.write(AVAIL + 4 + 2 * i as u64, &head.to_le_bytes());
            }
            d.set_avail_idx(avail_idx);
            d.notify();
            d.notify();
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
            descs in proptest::collection::vec(descriptor(), QUEUE as usize),
            heads in proptest::collection::vec(0u16..(QUEUE + 2), QUEUE as usize),
            avail_idx in prop_oneof![0u16..(QUEUE + 2), any::<u16>()],
            headers in proptest::collection::vec(request_header(), 4),
            read_only in any::<bool>(),
            used_ring in prop_oneof![
                3 => Just(USED),
                1 => (GUEST_LEN as u64 - 0x100..GUEST_LEN as u64 + 0x10).prop_map(|a| a & !3),
            ],
        ) {
            run(&descs, &heads, avail_idx, &headers, read_only, used_ring)?;
        }

        /// Mostly well-formed requests (header, data, status) with random headers, lengths and
        /// buffer places, so that the IN/OUT paths run with hostile values.
        #[test]
        fn plausible_requests_never_write_outside_guest_memory(
            header_at in 0u64..4,
            data in (address(), length(), any::<bool>()),
            status_at in address(),
            headers in proptest::collection::vec(request_header(), 4),
            read_only in any::<bool>(),
            copies in 1u16..(QUEUE + 1),
        ) {
            let (data_addr, data_len, data_write) = data;
            let data_flags = F_NEXT | if data_write { F_WRITE } else { 0 };
            let mut descs = vec![(DATA + 0x100 * header_at, 16, F_NEXT, 1)];
            descs.push((data_addr, data_len, data_flags, 2));
            descs.push((status_at, 1, F_WRITE, 0));
            descs.resize(QUEUE as usize, (DATA, 16, 0, 0));
            run(&descs, &vec![0; QUEUE as usize], copies, &headers, read_only, USED)?;
        }
    }

    #[test]
    fn a_used_ring_at_the_end_of_memory_is_refused_not_written_past() {
        let descs = [(DATA, 16, 0, 0); QUEUE as usize];
        run(&descs, &[0; 8], 1, &[(0, 0)], false, GUEST_LEN as u64 - 8).unwrap();
    }
}

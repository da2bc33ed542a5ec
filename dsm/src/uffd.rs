//! [`UffdGuestPages`]: guest memory as an anonymous private mapping under a userfaultfd.
//!
//! Invalid pages are not present (an access raises a MISSING fault), Shared pages are present and
//! uffd-write-protected (a write raises a WP fault), Modified pages are present and writable.
//! Pages are installed with `UFFDIO_COPY` (with `MODE_WP` for Shared: zero pages too, because
//! `UFFDIO_ZEROPAGE` would map the shared zero page, whose first write would not raise a WP fault),
//! protected and unprotected with `UFFDIO_WRITEPROTECT`, and dropped with `MADV_DONTNEED` (on an
//! anonymous mapping the next access faults as MISSING again).
//!
//! The descriptor is created without `UFFD_USER_MODE_ONLY`, because KVM touches guest memory from
//! kernel mode. Faults are read by [`FaultSource::wait_faults`].

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use crate::memory::{GuestPages, MemoryError, PageContent};
use crate::protocol::Access;
use crate::uffd_sys as sys;
use crate::PAGE_SIZE;

/// Errors of setting up the userfaultfd mapping or reading its faults.
#[derive(Debug, Error)]
pub enum UffdError {
    /// The kernel refused to create a userfaultfd.
    #[error("cannot create a userfaultfd: {0} (the DSM needs it: run as root or with CAP_SYS_PTRACE, set /proc/sys/vm/unprivileged_userfaultfd to 1, or give access to /dev/userfaultfd)")]
    Create(io::Error),
    /// The API handshake failed, most likely because the kernel lacks write-protect faults.
    #[error("userfaultfd API handshake failed: {0} (the DSM needs write-protect faults on anonymous memory, Linux 5.7 or later with CONFIG_HAVE_ARCH_USERFAULTFD_WP)")]
    Api(io::Error),
    /// The kernel does not report write-protect faults.
    #[error("this kernel's userfaultfd does not support write-protect faults (features {features:#x}); the DSM needs Linux 5.7 or later")]
    NoWriteProtect {
        /// Features the kernel reported.
        features: u64,
    },
    /// The region is not page-aligned or empty.
    #[error(
        "guest memory region at {addr:#x} of {size:#x} bytes is not a non-empty page-aligned range"
    )]
    BadRegion {
        /// Host address.
        addr: usize,
        /// Size in bytes.
        size: usize,
    },
    /// Mapping the anonymous region failed.
    #[error("cannot map {size:#x} bytes of anonymous memory for the guest: {source}")]
    Map {
        /// Size asked for.
        size: usize,
        /// The OS error.
        source: io::Error,
    },
    /// Registering the region with the userfaultfd failed.
    #[error("cannot register guest memory at {addr:#x} ({size:#x} bytes) with userfaultfd: {source} (it must be a private anonymous mapping)")]
    Register {
        /// Host address.
        addr: usize,
        /// Size in bytes.
        size: usize,
        /// The OS error.
        source: io::Error,
    },
    /// The kernel does not offer the ioctls the DSM needs on the registered range.
    #[error(
        "userfaultfd registration offers ioctls {ioctls:#x}, missing COPY, WRITEPROTECT or WAKE"
    )]
    MissingIoctls {
        /// The ioctls the kernel offered.
        ioctls: u64,
    },
    /// Creating the eventfd that stops the fault reader failed.
    #[error("cannot create the eventfd that stops the DSM fault reader: {0}")]
    EventFd(io::Error),
    /// Waiting for or reading faults failed.
    #[error("reading userfaultfd faults failed: {0}")]
    Read(io::Error),
}

/// A fault of a local thread on guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The page number (offset in the region / 4096).
    pub page: u64,
    /// What the faulting access needs.
    pub access: Access,
}

/// Where the runtime reads local faults from.
pub trait FaultSource: Send + Sync {
    /// Blocks until faults are pending or [`FaultSource::interrupt`] was called, then appends the
    /// pending faults to `out` (possibly none).
    fn wait_faults(&self, out: &mut Vec<PageFault>) -> Result<(), UffdError>;

    /// Makes the current and every later [`FaultSource::wait_faults`] return at once.
    fn interrupt(&self);
}

/// Guest memory under a userfaultfd (see the module doc).
pub struct UffdGuestPages {
    base: usize,
    size: usize,
    uffd: Option<OwnedFd>,
    stop: Option<OwnedFd>,
    owns_mapping: bool,
    frozen: AtomicBool,
}

fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

fn create_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes one int argument and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    // A descriptor is an int; -1 (or anything else negative) is a failure.
    if let Ok(fd @ 0..) = RawFd::try_from(fd) {
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let syscall_error = last_os_error();
    // Where the syscall is restricted, /dev/userfaultfd may still hand out descriptors that also
    // catch kernel-mode faults.
    let Ok(dev) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
    else {
        return Err(UffdError::Create(syscall_error));
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new descriptor.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::Create(syscall_error));
    }
    // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl UffdGuestPages {
    /// Maps `size` bytes of fresh anonymous memory (private, no swap reservation, no transparent
    /// huge pages) and registers it; every page starts Invalid. The mapping is unmapped on drop.
    pub fn map_anonymous(size: usize) -> Result<UffdGuestPages, UffdError> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(UffdError::BadRegion { addr: 0, size });
        }
        // SAFETY: a new anonymous mapping at an address the kernel chooses touches no existing
        // memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(UffdError::Map {
                size,
                source: last_os_error(),
            });
        }
        // SAFETY: the region was just mapped by us, is page-aligned and `size` long.
        match unsafe { Self::register_region(addr as *mut u8, size, true) } {
            Ok(pages) => Ok(pages),
            Err(e) => {
                // SAFETY: unmapping the region we mapped above, which nothing else uses yet.
                unsafe { libc::munmap(addr, size) };
                Err(e)
            }
        }
    }

    /// Registers an existing mapping given by the VMM; every page must be not yet touched (Invalid).
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must be a private anonymous mapping that stays mapped for the
    /// life of the returned value and that nothing but the DSM populates or drops.
    pub unsafe fn register(host_addr: *mut u8, size: usize) -> Result<UffdGuestPages, UffdError> {
        // SAFETY: forwarded from the caller.
        unsafe { Self::register_region(host_addr, size, false) }
    }

    /// # Safety
    /// As [`UffdGuestPages::register`].
    unsafe fn register_region(
        host_addr: *mut u8,
        size: usize,
        owns_mapping: bool,
    ) -> Result<UffdGuestPages, UffdError> {
        let addr = host_addr as usize;
        if size == 0 || size % PAGE_SIZE != 0 || addr % PAGE_SIZE != 0 {
            return Err(UffdError::BadRegion { addr, size });
        }
        // Huge pages would defeat per-page coherence; failure only costs performance, so the
        // result is ignored (kernels without THP refuse the advice).
        // SAFETY: advice on the caller's mapping changes no content.
        unsafe { libc::madvise(host_addr.cast(), size, libc::MADV_NOHUGEPAGE) };
        let uffd = create_uffd()?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) } != 0 {
            return Err(UffdError::Api(last_os_error()));
        }
        if api.features & sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::NoWriteProtect {
                features: api.features,
            });
        }
        let mut register = sys::UffdioRegister {
            range: sys::UffdioRange {
                start: addr as u64,
                len: size as u64,
            },
            mode: sys::UFFDIO_REGISTER_MODE_MISSING | sys::UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the range is the
        // caller's mapping.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut register) } != 0 {
            return Err(UffdError::Register {
                addr,
                size,
                source: last_os_error(),
            });
        }
        let needed = sys::IOCTL_BIT_COPY | sys::IOCTL_BIT_WRITEPROTECT | sys::IOCTL_BIT_WAKE;
        if register.ioctls & needed != needed {
            return Err(UffdError::MissingIoctls {
                ioctls: register.ioctls,
            });
        }
        // SAFETY: eventfd(2) with an initial count and flags returns a new descriptor or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(UffdError::EventFd(last_os_error()));
        }
        Ok(UffdGuestPages {
            base: addr,
            size,
            uffd: Some(uffd),
            // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
            stop: Some(unsafe { OwnedFd::from_raw_fd(stop) }),
            owns_mapping,
            frozen: AtomicBool::new(false),
        })
    }

    /// The host address of page 0 (give it to KVM as the memory slot's userspace address).
    pub fn host_address(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Size of the region in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Pages in the region.
    pub fn page_count(&self) -> u64 {
        (self.size / PAGE_SIZE) as u64
    }

    fn uffd_raw(&self) -> i32 {
        self.uffd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    fn page_address(&self, page: u64) -> Result<u64, MemoryError> {
        if page < self.page_count() {
            Ok(self.base as u64 + page * PAGE_SIZE as u64)
        } else {
            Err(MemoryError::PageOutOfRange {
                page,
                page_count: self.page_count(),
            })
        }
    }

    fn os_error(operation: &'static str, page: u64) -> MemoryError {
        MemoryError::Os {
            operation,
            page,
            errno: last_os_error().to_string(),
        }
    }

    /// Runs a uffd ioctl on one page, retrying while the kernel says `EAGAIN` (the mm is changing).
    fn ioctl_retrying<T>(
        &self,
        request: u64,
        arg: &mut T,
        operation: &'static str,
        page: u64,
    ) -> Result<(), MemoryError> {
        loop {
            // SAFETY: each caller passes the argument struct that `request` reads and writes; the
            // range inside it is a page of our registered region.
            let ret = unsafe { libc::ioctl(self.uffd_raw(), request as _, arg as *mut T) };
            if ret == 0 {
                return Ok(());
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                Some(libc::EEXIST) => return Err(MemoryError::AlreadyPresent { page }),
                _ => return Err(Self::os_error(operation, page)),
            }
        }
    }

    fn write_protect_range(&self, page: u64, protect: bool) -> Result<(), MemoryError> {
        let start = self.page_address(page)?;
        let mut wp = sys::UffdioWriteprotect {
            range: sys::UffdioRange {
                start,
                len: PAGE_SIZE as u64,
            },
            mode: if protect {
                sys::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        let operation = if protect {
            "UFFDIO_WRITEPROTECT"
        } else {
            "UFFDIO_WRITEPROTECT (unprotect)"
        };
        self.ioctl_retrying(sys::UFFDIO_WRITEPROTECT, &mut wp, operation, page)
    }

    /// Sets the uffd write protection of `count` pages from `first` (`protect` true: write-protect,
    /// false: lift it), in one `UFFDIO_WRITEPROTECT`; pages not present are left alone. The caller
    /// must hold the range in that state already, or be entitled to change it: this is meant for
    /// re-applying a page's current protection, whose only effect is that the kernel's MMU
    /// notifiers (KVM's) see the range change, dropping KVM's mappings of it. Does not wake
    /// faulting threads (`MODE_DONTWAKE` when unprotecting).
    pub fn set_write_protection(
        &self,
        first: u64,
        count: u64,
        protect: bool,
    ) -> Result<(), MemoryError> {
        if count == 0 {
            return Ok(());
        }
        let start = self.page_address(first)?;
        self.page_address(first.saturating_add(count - 1))?;
        let mut wp = sys::UffdioWriteprotect {
            range: sys::UffdioRange {
                start,
                len: count * PAGE_SIZE as u64,
            },
            mode: if protect {
                sys::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE
            },
        };
        self.ioctl_retrying(
            sys::UFFDIO_WRITEPROTECT,
            &mut wp,
            "UFFDIO_WRITEPROTECT (range)",
            first,
        )
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl GuestPages for UffdGuestPages {
    fn page_count(&self) -> u64 {
        UffdGuestPages::page_count(self)
    }

    fn install(
        &self,
        page: u64,
        content: PageContent<'_>,
        writable: bool,
    ) -> Result<(), MemoryError> {
        let dst = self.page_address(page)?;
        let src: &[u8; PAGE_SIZE] = match content {
            PageContent::Zero => &ZERO_PAGE,
            PageContent::Bytes(bytes) => bytes,
        };
        let mut copy = sys::UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: PAGE_SIZE as u64,
            mode: if writable {
                0
            } else {
                sys::UFFDIO_COPY_MODE_WP
            },
            copy: 0,
        };
        loop {
            // SAFETY: UFFDIO_COPY reads `struct uffdio_copy`, copies from `src` (a live 4 KiB
            // buffer) into a page of our registered region and writes back `copy`.
            let ret = unsafe { libc::ioctl(self.uffd_raw(), sys::UFFDIO_COPY as _, &mut copy) };
            if ret == 0 {
                return Ok(());
            }
            match io::Error::last_os_error().raw_os_error() {
                // A one-page copy is all or nothing; EAGAIN means "mm changing, try again".
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    copy.copy = 0;
                    continue;
                }
                Some(libc::EEXIST) => return Err(MemoryError::AlreadyPresent { page }),
                _ => return Err(Self::os_error("UFFDIO_COPY", page)),
            }
        }
    }

    fn write_protect(&self, page: u64) -> Result<(), MemoryError> {
        self.write_protect_range(page, true)
    }

    fn make_writable(&self, page: u64) -> Result<(), MemoryError> {
        self.write_protect_range(page, false)
    }

    fn drop_page(&self, page: u64) -> Result<(), MemoryError> {
        let addr = self.page_address(page)?;
        // SAFETY: dropping one page of our region: its content is discarded and the next access
        // faults, which is the protocol's Invalid state; no Rust reference points into guest
        // memory.
        if unsafe { libc::madvise(addr as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) } != 0
        {
            return Err(Self::os_error("MADV_DONTNEED", page));
        }
        Ok(())
    }

    fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        let addr = self.page_address(page)?;
        // SAFETY: the caller (the node state machine, under its lock) only copies pages it holds
        // present and write-protected, so the read neither faults nor races with a write; the
        // source is inside our mapping and does not overlap `out`.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), PAGE_SIZE) };
        Ok(())
    }

    fn wake(&self, page: u64) -> Result<(), MemoryError> {
        let start = self.page_address(page)?;
        let mut range = sys::UffdioRange {
            start,
            len: PAGE_SIZE as u64,
        };
        self.ioctl_retrying(sys::UFFDIO_WAKE, &mut range, "UFFDIO_WAKE", page)
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl FaultSource for UffdGuestPages {
    fn wait_faults(&self, out: &mut Vec<PageFault>) -> Result<(), UffdError> {
        let stop = self.stop.as_ref().map_or(-1, |fd| fd.as_raw_fd());
        let mut fds = [
            libc::pollfd {
                fd: self.uffd_raw(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: poll(2) on an array of two pollfds that lives across the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, -1) };
            if ret >= 0 {
                break;
            }
            let err = last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(UffdError::Read(err));
            }
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        let mut msgs = [sys::UffdMsg::default(); 64];
        // SAFETY: reading whole `uffd_msg` records into a buffer of that many records.
        let ret = unsafe {
            libc::read(
                self.uffd_raw(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        // Negative is read(2)'s -1.
        let Ok(read) = usize::try_from(ret) else {
            let err = last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(UffdError::Read(err)),
            };
        };
        let count = read / std::mem::size_of::<sys::UffdMsg>();
        for msg in &msgs[..count] {
            if msg.event != sys::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let (flags, address) = (msg.arg[0], msg.arg[1]);
            let Some(offset) = usize::try_from(address)
                .ok()
                .and_then(|address| address.checked_sub(self.base))
            else {
                continue;
            };
            if offset >= self.size {
                continue;
            }
            let write = flags & (sys::UFFD_PAGEFAULT_FLAG_WRITE | sys::UFFD_PAGEFAULT_FLAG_WP) != 0;
            out.push(PageFault {
                page: (offset / PAGE_SIZE) as u64,
                access: if write { Access::Write } else { Access::Read },
            });
        }
        Ok(())
    }

    fn interrupt(&self) {
        let one: u64 = 1;
        if let Some(stop) = &self.stop {
            // SAFETY: writing 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl Drop for UffdGuestPages {
    fn drop(&mut self) {
        if self.frozen.load(Ordering::SeqCst) {
            // After a failure, threads may be blocked in faults: closing the descriptor would let
            // them through to zero pages. Keep both the descriptor and the mapping until exit.
            if let Some(fd) = self.uffd.take() {
                std::mem::forget(fd);
            }
            return;
        }
        if self.owns_mapping {
            // Unmap before closing the descriptor: a thread still blocked in a fault then fails
            // on a missing mapping instead of reading a zero page.
            // SAFETY: unmapping the region this value mapped; nothing borrows it past this point.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
        }
    }
}

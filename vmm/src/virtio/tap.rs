//! The network card's host side: a tap device, and the thread that tells the card when frames
//! wait on it.
//!
//! [`TapBackend`] reads and writes whole Ethernet frames on a non-blocking tap file descriptor
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: no packet-information prefix; every frame behind the
//! 12-byte `virtio_net_hdr_v1` the card uses, so checksum and segmentation requests pass
//! between the guest and the host's network stack untouched, and `TUNSETOFFLOAD` tells the
//! host which of them the guest accepts on received frames). Either the tap
//! exists already (`ip tuntap add dev NAME mode tap`) and spanvm attaches to it, or spanvm
//! creates it inside a named network namespace: a short-lived helper thread enters the
//! namespace with `setns`, opens the tap there and hands back the descriptor, which keeps the
//! tap in that namespace whichever namespace uses it later. A tap spanvm created goes away when
//! the descriptor closes.
//!
//! [`RxThread`] (`virtio-net-rx`) waits for the tap to become readable and then kicks the
//! card's receive queue, which reads frames from the backend as long as the guest has receive
//! buffers. When the guest has none, the card keeps one frame and the rest stay in the tap; the
//! thread then stops watching the tap (it would stay readable and the thread would spin) until
//! the guest's next receive-queue notify has drained it, which the backend reports through an
//! eventfd.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::net::{GuestOffloads, NetBackend, NetError, NET_HDR_LEN};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// A tap (Ethernet) device, not a tun (IP) one.
const IFF_TAP: libc::c_short = 0x0002;
/// No packet-information prefix on frames.
const IFF_NO_PI: libc::c_short = 0x1000;
/// A virtio-net header in front of every frame.
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `TUNSETOFFLOAD` bits: the reader takes partial checksums, TCP/IPv4 and TCP/IPv6 segments.
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
/// `IFNAMSIZ`: interface names are at most 15 bytes plus a NUL.
const IFNAMSIZ: usize = 16;

/// How long the receive thread rests after the tap failed a read, before it tries again.
const FAILED_READ_BACKOFF: Duration = Duration::from_millis(100);
/// How long a stopping receive thread may take before it is left behind.
const RX_STOP_LIMIT: Duration = Duration::from_millis(500);

/// Errors of opening a tap device or starting its receive thread.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("tap name {0:?} is not an interface name (1 to 15 bytes, no NUL)")]
    BadName(String),
    /// The tap to attach to does not exist.
    #[error(
        "tap {0} does not exist; create it first (`ip tuntap add dev {0} mode tap user $USER`), \
         or give `netns` in [guest.net] for spanvm to create one in a network namespace"
    )]
    NoSuchTap(String),
    /// The namespace file cannot be opened.
    #[error(
        "cannot open network namespace /run/netns/{netns}: {source} (does it exist? \
         `ip netns add {netns}` makes one)"
    )]
    OpenNetns {
        /// The namespace.
        netns: String,
        /// Why.
        source: std::io::Error,
    },
    /// The helper thread cannot enter the namespace.
    #[error("cannot enter network namespace {netns}: {source} (needs CAP_SYS_ADMIN)")]
    EnterNetns {
        /// The namespace.
        netns: String,
        /// Why.
        source: std::io::Error,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded? is the device readable and writable?)")]
    OpenTun(std::io::Error),
    /// `TUNSETIFF` failed.
    #[error(
        "cannot open tap {tap}: {source} (needs CAP_NET_ADMIN unless the tap belongs to this \
         user / does the device exist, is it a tap (not tun) device without packet info, and \
         is no other program attached to it?)"
    )]
    Attach {
        /// The tap.
        tap: String,
        /// Why.
        source: std::io::Error,
    },
    /// The tap spanvm created cannot be brought up.
    #[error("cannot bring tap {tap} up: {source} (needs CAP_NET_ADMIN)")]
    Up {
        /// The tap.
        tap: String,
        /// Why.
        source: std::io::Error,
    },
    /// The thread that works inside a network namespace cannot be started, or it panicked.
    #[error("cannot run a thread inside network namespace {netns}: {source}")]
    NetnsThread {
        /// The namespace.
        netns: String,
        /// Why.
        source: std::io::Error,
    },
    /// An eventfd or thread for the tap cannot be made.
    #[error("tap {tap}: {what}: {source}")]
    Resource {
        /// The tap.
        tap: String,
        /// What failed.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// What the card's last read of the tap found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastRead {
    /// No read since the receive thread's last kick.
    Untouched,
    /// A frame: the card may hold it for want of a receive buffer, more may wait.
    Frame,
    /// Nothing pending: the tap is drained.
    Drained,
    /// The read failed.
    Failed,
}

/// What the backend and the receive thread share.
struct RxShared {
    state: Mutex<RxState>,
    /// Written when the receive thread waits for the guest and the tap was drained (or failed).
    wake: EventFd,
}

struct RxState {
    last: LastRead,
    /// The receive thread waits for the guest to take frames, not for the tap.
    waiting: bool,
}

impl RxShared {
    fn state(&self) -> std::sync::MutexGuard<'_, RxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a read; wakes a waiting receive thread once the tap is drained or failed.
    fn record(&self, last: LastRead) {
        let mut state = self.state();
        state.last = last;
        if state.waiting && matches!(last, LastRead::Drained | LastRead::Failed) {
            state.waiting = false;
            // An eventfd write only fails when the counter would overflow: a wake is pending.
            let _ = self.wake.write(1);
        }
    }
}

/// A tap device as a [`NetBackend`]: one frame per read and write, never blocking. Clones
/// share the descriptor and the receive thread's state (one goes to the card, one starts the
/// thread).
#[derive(Clone)]
pub struct TapBackend {
    file: Arc<File>,
    name: String,
    shared: Arc<RxShared>,
}

impl TapBackend {
    /// Opens the tap `tap`: created (and brought up) inside the network namespace
    /// `/run/netns/<netns>` if `netns` is given, else an existing tap of this namespace.
    pub fn open(tap: &str, netns: Option<&str>) -> Result<Self, TapError> {
        let name = ifname(tap)?;
        let file = match netns {
            Some(netns) => open_in_netns(tap, name, netns)?,
            None => {
                if !interface_exists(&name) {
                    return Err(TapError::NoSuchTap(tap.to_string()));
                }
                open_tap(tap, &name)?
            }
        };
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|source| TapError::Resource {
            tap: tap.to_string(),
            what: "eventfd",
            source,
        })?;
        Ok(Self {
            file: Arc::new(file),
            name: tap.to_string(),
            shared: Arc::new(RxShared {
                state: Mutex::new(RxState {
                    last: LastRead::Untouched,
                    waiting: false,
                }),
                wake,
            }),
        })
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the receive thread of this tap; `kick` runs the card's receive queue (under the
    /// transport's lock). The thread stops when the returned handle is dropped.
    pub fn spawn_rx_thread(&self, kick: Box<dyn FnMut() + Send>) -> Result<RxThread, TapError> {
        let resource = |what| {
            let tap = self.name.clone();
            move |source| TapError::Resource { tap, what, source }
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(resource("eventfd"))?);
        let watcher = RxWatcher {
            file: self.file.clone(),
            shared: self.shared.clone(),
            stop: stop.clone(),
            kick,
        };
        let handle = std::thread::Builder::new()
            .name("virtio-net-rx".into())
            .spawn(move || watcher.run())
            .map_err(resource("receive thread"))?;
        Ok(RxThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl NetBackend for TapBackend {
    fn carries_offloads(&self) -> bool {
        true
    }

    fn set_guest_offloads(&mut self, offloads: GuestOffloads) -> Result<(), NetError> {
        set_offload(&self.file, offloads).map_err(NetError::Io)
    }

    fn send(&mut self, header: &[u8; NET_HDR_LEN], frame: &[u8]) -> Result<(), NetError> {
        let parts = [std::io::IoSlice::new(header), std::io::IoSlice::new(frame)];
        // A tap takes a frame whole or not at all; it refuses a header that asks for something
        // impossible (the guest's to get wrong) with EINVAL, and the frame is lost.
        let n = (&*self.file).write_vectored(&parts)?;
        if n != NET_HDR_LEN + frame.len() {
            return Err(NetError::Io(std::io::Error::other(format!(
                "the tap took {n} of a {}-byte frame and its header",
                frame.len()
            ))));
        }
        Ok(())
    }

    fn receive(
        &mut self,
        header: &mut [u8; NET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, NetError> {
        // The tap writes the 10 bytes of the legacy header and skips num_buffers: start clean.
        *header = [0; NET_HDR_LEN];
        let mut parts = [
            std::io::IoSliceMut::new(header),
            std::io::IoSliceMut::new(buf),
        ];
        match (&*self.file).read_vectored(&mut parts) {
            Ok(n) if n >= NET_HDR_LEN => {
                self.shared.record(LastRead::Frame);
                Ok(Some(n - NET_HDR_LEN))
            }
            Ok(n) => {
                self.shared.record(LastRead::Failed);
                Err(NetError::Io(std::io::Error::other(format!(
                    "the tap gave {n} bytes, less than a frame's header"
                ))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.shared.record(LastRead::Drained);
                Ok(None)
            }
            Err(e) => {
                self.shared.record(LastRead::Failed);
                Err(e.into())
            }
        }
    }
}

/// The running `virtio-net-rx` thread; dropping it stops the thread.
pub struct RxThread {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

impl RxThread {
    /// Stops the thread and joins it; leaves it behind (with a line on stderr) if it does not
    /// stop within half a second, which only a card blocked in a guest memory access can do.
    pub fn stop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        // Fails only if the counter would overflow: a stop is pending then.
        let _ = self.stop.write(1);
        let deadline = Instant::now() + RX_STOP_LIMIT;
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            eprintln!(
                "spanvm: virtio-net-rx did not stop: the network card waits on a guest memory \
                 access that is not going to be served; it stays blocked until the process exits"
            );
        }
    }
}

impl Drop for RxThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The receive thread's loop.
struct RxWatcher {
    file: Arc<File>,
    shared: Arc<RxShared>,
    stop: Arc<EventFd>,
    kick: Box<dyn FnMut() + Send>,
}

impl RxWatcher {
    fn run(mut self) {
        let mut backoff = false;
        loop {
            let waiting = self.shared.state().waiting;
            let tap = if waiting || backoff {
                -1 // poll ignores negative descriptors
            } else {
                self.file.as_raw_fd()
            };
            let mut fds = [
                pollfd(self.stop.as_raw_fd()),
                pollfd(self.shared.wake.as_raw_fd()),
                pollfd(tap),
            ];
            let timeout = if backoff {
                i32::try_from(FAILED_READ_BACKOFF.as_millis()).unwrap_or(100)
            } else {
                -1
            };
            // SAFETY: `fds` is a valid array of three pollfd structures for the call's duration,
            // and its length is passed with it.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!(
                    "spanvm: virtio-net-rx: poll failed ({}); the guest receives no more frames",
                    std::io::Error::last_os_error()
                );
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            if fds[1].revents != 0 {
                // Drained by the guest's own receive-queue run: watch the tap again.
                let _ = self.shared.wake.read();
            }
            if n == 0 {
                backoff = false;
                continue;
            }
            if fds[2].revents == 0 {
                continue;
            }
            self.shared.state().last = LastRead::Untouched;
            (self.kick)();
            let mut state = self.shared.state();
            match state.last {
                // Every waiting frame went to the guest.
                LastRead::Drained => state.waiting = false,
                // The card holds a frame for want of a buffer, or cannot receive yet: the
                // guest's next receive-queue notify takes frames, and the backend wakes this
                // thread once that drained the tap.
                LastRead::Frame | LastRead::Untouched => state.waiting = true,
                LastRead::Failed => {
                    state.waiting = false;
                    backoff = true;
                }
            }
        }
    }
}

fn pollfd(fd: libc::c_int) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// `tap` as a NUL-padded interface name.
fn ifname(tap: &str) -> Result<[u8; IFNAMSIZ], TapError> {
    let bytes = tap.as_bytes();
    if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::BadName(tap.to_string()));
    }
    let mut name = [0u8; IFNAMSIZ];
    name[..bytes.len()].copy_from_slice(bytes);
    Ok(name)
}

fn interface_exists(name: &[u8; IFNAMSIZ]) -> bool {
    // SAFETY: `name` is NUL-terminated (`ifname` leaves at least one trailing NUL) and lives
    // for the call.
    unsafe { libc::if_nametoindex(name.as_ptr().cast()) != 0 }
}

/// `struct ifreq` as `TUNSETIFF` and `SIOC[GS]IFFLAGS` read it: the name, then the flags.
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    /// The rest of the 40-byte union.
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` and attaches it to the tap `name` (creating it if it does not exist)
/// in the calling thread's network namespace.
fn open_tap(tap: &str, name: &[u8; IFNAMSIZ]) -> Result<File, TapError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = IfReqFlags {
        name: *name,
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is laid out as (name,
    // then the flags at offset 16, 40 bytes in all); `req` outlives the call and the
    // descriptor is a /dev/net/tun open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(TapError::Attach {
            tap: tap.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // The card's header is virtio_net_hdr_v1 (with num_buffers), not the 10-byte legacy one.
    let size = libc::c_int::try_from(NET_HDR_LEN).unwrap_or(12);
    // SAFETY: TUNSETVNETHDRSZ reads one int, `size` lives through the call, and the descriptor
    // is the tap opened above.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
    if rc < 0 {
        return Err(TapError::Attach {
            tap: tap.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    set_offload(&file, GuestOffloads::default()).map_err(|source| TapError::Attach {
        tap: tap.to_string(),
        source,
    })?;
    Ok(file)
}

/// Tells the tap which offloads its reader (the guest) accepts on the frames it gives.
fn set_offload(file: &File, offloads: GuestOffloads) -> std::io::Result<()> {
    let mut flags: libc::c_uint = 0;
    if offloads.csum {
        flags |= TUN_F_CSUM;
        if offloads.tso4 {
            flags |= TUN_F_TSO4;
        }
        if offloads.tso6 {
            flags |= TUN_F_TSO6;
        }
    }
    // SAFETY: TUNSETOFFLOAD takes its unsigned int argument by value, and the descriptor is a
    // tap.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `IFF_UP` on the interface `name` of the calling thread's network namespace.
fn bring_up(tap: &str, name: &[u8; IFNAMSIZ]) -> Result<(), TapError> {
    let err = |source| TapError::Up {
        tap: tap.to_string(),
        source,
    };
    // SAFETY: a plain socket call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a descriptor this function just opened and nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags {
        name: *name,
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`, which `req` is laid out as;
    // `req` outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // IFF_UP is 1; the flags are a c_short in the ifreq.
    req.flags |= 1;
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, which `req` is laid out as; `req` outlives
    // the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Creates the tap `name` inside `/run/netns/<netns>` on a helper thread that enters the
/// namespace (the caller's threads stay where they are) and brings it up.
fn open_in_netns(tap: &str, name: [u8; IFNAMSIZ], netns: &str) -> Result<File, TapError> {
    let tap_name = tap.to_string();
    in_netns(netns, move || {
        let file = open_tap(&tap_name, &name)?;
        bring_up(&tap_name, &name)?;
        Ok(file)
    })?
}

/// Runs `f` on a short-lived thread inside the network namespace `/run/netns/<netns>`: what it
/// creates there (a tap, a socket) stays in that namespace whichever thread uses it later.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TapError> {
    let ns = File::open(format!("/run/netns/{netns}")).map_err(|source| TapError::OpenNetns {
        netns: netns.to_string(),
        source,
    })?;
    let ns_name = netns.to_string();
    let helper = std::thread::Builder::new()
        .name("spanvm-netns".into())
        .spawn(move || {
            // SAFETY: `ns` is an open namespace file that outlives the call; setns with
            // CLONE_NEWNET moves only this thread, which ends right after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(TapError::EnterNetns {
                    netns: ns_name,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .map_err(|source| TapError::NetnsThread {
            netns: netns.to_string(),
            source,
        })?;
    helper.join().unwrap_or_else(|_| {
        Err(TapError::NetnsThread {
            netns: netns.to_string(),
            source: std::io::Error::other("it panicked"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(ifname("spanvm0").is_ok());
        assert!(ifname("a-very-long-tap").is_ok());
        assert!(matches!(ifname(""), Err(TapError::BadName(_))));
        assert!(matches!(
            ifname("a-very-long-tap-0"),
            Err(TapError::BadName(_))
        ));
    }

    #[test]
    fn a_missing_namespace_or_tap_is_named() {
        let err = TapBackend::open("spanvm0", Some("spanvm-no-such-ns"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/run/netns/spanvm-no-such-ns"), "{err}");
        let err = TapBackend::open("spvm-nosuch", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("tap spvm-nosuch does not exist"), "{err}");
    }

    #[test]
    fn the_ifreq_is_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
        assert_eq!(
            std::mem::size_of::<IfReqFlags>(),
            std::mem::size_of::<libc::ifreq>()
        );
    }
}

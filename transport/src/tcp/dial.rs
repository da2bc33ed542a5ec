//! Dialing a peer from this node's own address.
//!
//! A node that listens on one address of a host with several (or on `127.0.0.x` of a shared
//! loopback) also dials from that address, so that peers, packet filters and a test's fault
//! injection all see each connection between the two addresses the cluster description names.
//! The kernel would otherwise pick the source address from the route (on loopback always
//! `127.0.0.1`).

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Connects to `remote` within `timeout`, from `local` (any port) unless `local` is the
/// unspecified address or of the other IP family.
pub(crate) fn connect_from(
    local: IpAddr,
    remote: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    if local.is_unspecified() || local.is_ipv4() != remote.is_ipv4() {
        return TcpStream::connect_timeout(&remote, timeout);
    }
    let family = if remote.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns and nothing else closes.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    let (local_addr, local_len) = sockaddr(SocketAddr::new(local, 0));
    // SAFETY: the address is a live, initialised sockaddr_storage of which `local_len` bytes
    // form a sockaddr of the socket's family.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&local_addr).cast(),
            local_len,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }

    let (remote_addr, remote_len) = sockaddr(remote);
    // SAFETY: as for bind: a live sockaddr of `remote_len` bytes of the socket's family.
    let started = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::from_ref(&remote_addr).cast(),
            remote_len,
        )
    };
    if started != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(error);
        }
        await_connected(&socket, timeout)?;
    }
    let stream = TcpStream::from(socket);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Waits for a non-blocking connect to finish, and returns how it ended.
fn await_connected(socket: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    let ready = loop {
        // SAFETY: one live pollfd, and the count passed is 1.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready >= 0 {
            break ready;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    if ready == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the connection attempt timed out",
        ));
    }
    let mut error: libc::c_int = 0;
    let mut len = socklen_of::<libc::c_int>();
    // SAFETY: `error` is a live c_int and `len` holds its exact size, as SO_ERROR expects.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut error).cast(),
            &mut len,
        )
    };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    if error != 0 {
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(())
}

/// `addr` as a sockaddr, and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data, for which all-zero bytes are valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: family_of(libc::AF_INET),
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            socklen_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: family_of(libc::AF_INET6),
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            socklen_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len)
}

/// The size of `T` as the kernel's length type; socket option values and addresses are a few
/// bytes, far below its range.
fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).expect("a socket value's size fits socklen_t")
}

/// An address family constant as a sockaddr's family field (they are small numbers).
fn family_of(family: libc::c_int) -> libc::sa_family_t {
    libc::sa_family_t::try_from(family).expect("address families fit sa_family_t")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_connection_comes_from_the_nodes_own_loopback_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let remote = listener.local_addr().unwrap();
        let local: IpAddr = "127.0.0.3".parse().unwrap();
        let stream = connect_from(local, remote, Duration::from_secs(5)).unwrap();
        let (_accepted, from) = listener.accept().unwrap();
        assert_eq!(from.ip(), local);
        assert_eq!(stream.local_addr().unwrap().ip(), local);
    }

    #[test]
    fn nobody_listening_is_refused_not_hung() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let remote = free.local_addr().unwrap();
        drop(free);
        let local: IpAddr = "127.0.0.2".parse().unwrap();
        let error = connect_from(local, remote, Duration::from_secs(5)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }
}

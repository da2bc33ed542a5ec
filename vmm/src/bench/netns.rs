//! The network side of `spanvm bench io`: a namespace the bench makes and removes, the
//! streams the guest exchanges with it, and the same streams over the host's loopback as the
//! anchor. Nothing leaves the namespace or the loopback.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::commands::CommandError;

/// The namespace's end of the tap, where the guest's streams go.
pub(super) const HOST_ADDRESS: &str = "10.0.2.2";
/// The guest's `ip=` setting: 10.0.2.15 on eth0, the namespace as the gateway.
pub(super) const GUEST_IP_ARG: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";
/// The namespace sends to the guest on this port ...
pub(super) const DOWN_PORT: u16 = 5001;
/// ... and takes what the guest sends on this one.
pub(super) const UP_PORT: u16 = 5000;
/// The tap spanvm creates in the namespace.
const TAP: &str = "spanvm0";

/// A network namespace that exists while this lives.
pub(super) struct BenchNamespace {
    name: String,
}

impl BenchNamespace {
    /// Makes `spanvm-bench-<pid>` with IPv6 off (no router solicitations on the tap).
    pub(super) fn new() -> Result<Self, CommandError> {
        let name = format!("spanvm-bench-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&[
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Gives the namespace's end of the tap its address once spanvm has made the tap (the
    /// guest's first packets find it there: the boot takes minutes, this seconds).
    pub(super) fn address_tap_when_it_appears(&self) -> std::thread::JoinHandle<bool> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                let cidr = format!("{HOST_ADDRESS}/24");
                if ip(&["-n", &name, "addr", "add", &cidr, "dev", TAP]).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        })
    }

    /// Starts the namespace's listeners: every connection to [`DOWN_PORT`] gets `len` bytes,
    /// every connection to [`UP_PORT`] is read to its end; each reports (bytes, time, sha256
    /// match) on the returned channel, `true` for a download.
    pub(super) fn serve_streams(
        &self,
        len: usize,
    ) -> Result<mpsc::Receiver<StreamResult>, CommandError> {
        let (down, up) = in_namespace(&self.name, || {
            Ok::<_, std::io::Error>((
                TcpListener::bind(("0.0.0.0", DOWN_PORT))?,
                TcpListener::bind(("0.0.0.0", UP_PORT))?,
            ))
        })?
        .map_err(|e| CommandError::Bench(format!("listeners in the namespace: {e}")))?;
        let data = pattern(len);
        let (tx, rx) = mpsc::channel();
        let up_tx = tx.clone();
        std::thread::spawn(move || {
            for conn in down.incoming().flatten() {
                if let Some(r) = send_stream(conn, &data) {
                    let _ = tx.send(r);
                }
            }
        });
        let expected = pattern(len);
        std::thread::spawn(move || {
            for conn in up.incoming().flatten() {
                if let Some(r) = receive_stream(conn, &expected) {
                    let _ = up_tx.send(r);
                }
            }
        });
        Ok(rx)
    }
}

impl Drop for BenchNamespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// One stream as the namespace saw it.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamResult {
    /// A download (namespace -> guest), else an upload.
    pub(super) down: bool,
    pub(super) bytes: usize,
    pub(super) elapsed: Duration,
    /// An upload's bytes equal what the guest was sent (a download's are checked in the guest).
    pub(super) intact: bool,
}

impl StreamResult {
    #[allow(clippy::cast_precision_loss)] // a stream is far below 2^52 bytes
    pub(super) fn mib_s(&self) -> f64 {
        self.bytes as f64 / f64::from(1 << 20) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The stream's bytes: not compressible, the same on both ends.
pub(super) fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn send_stream(mut conn: TcpStream, data: &[u8]) -> Option<StreamResult> {
    let start = Instant::now();
    conn.write_all(data).ok()?;
    conn.shutdown(Shutdown::Write).ok()?;
    // Until the other end closes: it has read everything.
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    Some(StreamResult {
        down: true,
        bytes: data.len(),
        elapsed: start.elapsed(),
        intact: true,
    })
}

fn receive_stream(mut conn: TcpStream, expected: &[u8]) -> Option<StreamResult> {
    let start = Instant::now();
    let mut got = Vec::with_capacity(expected.len());
    conn.read_to_end(&mut got).ok()?;
    Some(StreamResult {
        down: false,
        bytes: got.len(),
        elapsed: start.elapsed(),
        intact: got == expected,
    })
}

/// The anchor: the same stream both ways over the host's loopback, (down, up) in MiB/s.
pub(super) fn loopback_anchor(len: usize) -> Result<(f64, f64), CommandError> {
    let io = |e: std::io::Error| CommandError::Bench(format!("loopback anchor: {e}"));
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let data = pattern(len);
    let server = std::thread::spawn(move || {
        let mut out = Vec::new();
        for conn in listener.incoming().take(2).flatten() {
            out.push(if out.is_empty() {
                send_stream(conn, &data)
            } else {
                receive_stream(conn, &data)
            });
        }
        out
    });
    let mut sink = Vec::with_capacity(len);
    let mut c = TcpStream::connect(addr).map_err(io)?;
    c.read_to_end(&mut sink).map_err(io)?;
    drop(c);
    let mut c = TcpStream::connect(addr).map_err(io)?;
    c.write_all(&sink).map_err(io)?;
    c.shutdown(Shutdown::Write).map_err(io)?;
    let _ = c.read_to_end(&mut Vec::new());
    drop(c);
    let results = server
        .join()
        .map_err(|_| CommandError::Bench("loopback anchor thread failed".into()))?;
    match results.as_slice() {
        [Some(down), Some(up)] if up.intact => Ok((down.mib_s(), up.mib_s())),
        _ => Err(CommandError::Bench(
            "the loopback anchor's streams did not complete intact".into(),
        )),
    }
}

/// Runs `f` on a thread inside the namespace `ns`; sockets made there stay in it.
fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CommandError> {
    crate::virtio::in_netns(ns, f).map_err(|e| CommandError::Bench(e.to_string()))
}

/// `ip ARGS`, an error with its stderr if it fails.
fn ip(args: &[&str]) -> Result<(), CommandError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CommandError::Bench(format!("cannot run ip (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CommandError::Bench(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_anchor_moves_the_stream_both_ways() {
        let (down, up) = loopback_anchor(4 << 20).unwrap();
        assert!(down > 0.0 && up > 0.0);
    }

    #[test]
    fn the_pattern_is_the_same_on_both_ends_and_not_constant() {
        let a = pattern(4096);
        assert_eq!(a, pattern(4096));
        assert!(a.iter().any(|&b| b != a[0]));
    }
}

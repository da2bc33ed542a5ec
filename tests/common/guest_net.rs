//! The far end of a Linux guest's network card in the tests: a namespace the test makes, where
//! spanvm creates the tap; the namespace's end gets 10.0.2.2 once the tap exists, and two
//! listeners there exchange a stream with the guest (10.0.2.15): port 5001 sends it, port 5000
//! takes it back, both checksummed. Nothing leaves the namespace.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::netns::NetNs;

/// The guest's kernel parameter: 10.0.2.15/24 on eth0, the namespace as the gateway.
pub const GUEST_IP_ARG: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";
/// The tap spanvm creates in the namespace.
pub const TAP: &str = "spanvm0";

/// Runs `f` on a thread inside the namespace `ns`; a socket made there stays in that namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    vmm::virtio::in_netns(ns, f).unwrap()
}

/// Byte `i` of the stream.
pub fn pattern(i: usize) -> u8 {
    u8::try_from((i * 131 + i / 4093) % 251).unwrap()
}

/// Lower-case hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the namespace saw of the guest's two streams.
pub struct Streams {
    /// The tap appeared and got its address.
    pub addressed: bool,
    /// The download's sha256 (what the guest must print) and how long sending took.
    pub down: Option<(String, Duration)>,
    /// The upload: its length, sha256 and duration.
    pub up: Option<(usize, String, Duration)>,
}

/// The namespace's listeners and the thread that addresses the tap.
pub struct StreamPeer {
    down: mpsc::Receiver<(String, Duration)>,
    up: mpsc::Receiver<(usize, String, Duration)>,
    addressed: JoinHandle<bool>,
}

impl StreamPeer {
    /// IPv6 off in `ns` (no router solicitations on the tap), listeners up, and a thread that
    /// gives the tap 10.0.2.2/24 as soon as spanvm has made it (within `limit`).
    pub fn start(ns: &NetNs, len: usize, limit: Duration) -> StreamPeer {
        let off = ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        assert!(off.status.success(), "{off:?}");
        let (upload, download) = in_netns(ns.name(), || {
            (
                TcpListener::bind("0.0.0.0:5000").unwrap(),
                TcpListener::bind("0.0.0.0:5001").unwrap(),
            )
        });
        let (up_tx, up) = mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut conn, _)) = upload.accept() else {
                return;
            };
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            let start = Instant::now();
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                total += n;
            }
            let _ = up_tx.send((total, hex(&hash.finalize()), start.elapsed()));
        });
        let (down_tx, down) = mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut conn, _)) = download.accept() else {
                return;
            };
            let data: Vec<u8> = (0..len).map(pattern).collect();
            let start = Instant::now();
            if conn.write_all(&data).is_err() || conn.shutdown(Shutdown::Write).is_err() {
                return;
            }
            // Until the guest closes its end: everything was read.
            let _ = conn.read_to_end(&mut Vec::new());
            let _ = down_tx.send((hex(&Sha256::digest(&data)), start.elapsed()));
        });
        let name = ns.name().to_string();
        let addressed = std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                let added = Command::new("ip")
                    .args(["-n", &name, "addr", "add", "10.0.2.2/24", "dev", TAP])
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                if added.status.success() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        });
        StreamPeer {
            down,
            up,
            addressed,
        }
    }

    /// What happened, once the guest is gone (waits a little for the listeners to report).
    pub fn finish(self) -> Streams {
        Streams {
            addressed: self.addressed.join().unwrap_or(false),
            down: self.down.recv_timeout(Duration::from_secs(5)).ok(),
            up: self.up.recv_timeout(Duration::from_secs(5)).ok(),
        }
    }
}

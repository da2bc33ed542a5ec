//! The thread that answers statistics requests on a node's control socket. One thread, one
//! client at a time, each with short timeouts: a client that says nothing costs it a second
//! and costs the guest nothing, since the figures are read from atomics (see `sources`).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dsm::NodeId;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::stats::control_socket::ControlSocket;
use crate::stats::report::NodeReport;
use crate::stats::sources::NodeSources;
use crate::stats::wire;

/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the statistics thread cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The eventfd that stops the thread could not be made.
    #[error("cannot create the statistics thread's stop event: {0}")]
    StopEvent(std::io::Error),
    /// The thread could not be started.
    #[error("cannot start the statistics thread: {0}")]
    Thread(std::io::Error),
}

/// What the thread answers from.
struct Answerer {
    node: NodeId,
    nodes: NodeId,
    started: Instant,
    /// Set once the VM exists; until then the node answers that it is starting.
    sources: OnceLock<NodeSources>,
}

impl Answerer {
    fn report(&self) -> NodeReport {
        let uptime = Duration::from_millis(
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        );
        match self.sources.get() {
            Some(sources) => sources.report(self.node, self.nodes, uptime),
            None => NodeReport::starting(self.node, self.nodes, uptime),
        }
    }
}

/// A node's statistics thread; dropping it stops the thread and removes the socket file.
pub struct StatsServer {
    answerer: Arc<Answerer>,
    stop: Arc<EventFd>,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl StatsServer {
    /// Starts answering on `socket` for node `node` of `nodes`, whose process started its node
    /// at `started`. Start it after the signal mask is set (`handle_signals`), like every
    /// thread of a node.
    pub fn start(
        socket: ControlSocket,
        node: NodeId,
        nodes: NodeId,
        started: Instant,
    ) -> Result<StatsServer, ServeError> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ServeError::StopEvent)?);
        let answerer = Arc::new(Answerer {
            node,
            nodes,
            started,
            sources: OnceLock::new(),
        });
        let path = socket.path().to_path_buf();
        let thread = {
            let (answerer, stop) = (answerer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("stats".into())
                .spawn(move || serve(socket, &answerer, &stop))
                .map_err(ServeError::Thread)?
        };
        Ok(StatsServer {
            answerer,
            stop,
            path,
            thread: Some(thread),
        })
    }

    /// The node's VM exists: answer with its figures from now on.
    pub fn attach(&self, sources: NodeSources) {
        let _ = self.answerer.sources.set(sources);
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        // If the write fails the thread cannot be told to stop: it is left to end with the
        // process (it holds nothing of the VM strongly), and its socket file, then stale, is
        // replaced by the node's next start.
        if self.stop.write(1).is_ok() {
            if let Some(thread) = self.thread.take() {
                // The thread owns the socket: joining it removes the file.
                let _ = thread.join();
            }
        }
    }
}

/// The thread: waits for a client or the stop event, answers, repeats. The socket (and its
/// file) goes when this returns.
fn serve(socket: ControlSocket, answerer: &Answerer, stop: &EventFd) {
    let mut fds = [
        libc::pollfd {
            fd: socket.listener().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two initialised pollfd whose descriptors (the listener
        // and the eventfd) outlive this call; poll writes only their `revents`.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            eprintln!("spanvm: the statistics socket stops answering: poll failed: {err}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            eprintln!("spanvm: the statistics socket stops answering: its listener failed");
            return;
        }
        // Every client waiting now, one after the other.
        loop {
            match socket.listener().accept() {
                Ok((stream, _)) => {
                    // A client that goes away or dawdles is its own problem, never the node's.
                    let _ = answer(stream, answerer);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A client that gave up before we took it (ECONNABORTED), or no descriptors
                // left for a moment: the next poll tries again.
                Err(_) => break,
            }
        }
    }
}

/// Reads one request line and sends the answer.
fn answer(mut stream: UnixStream, answerer: &Answerer) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let text = match read_request_line(&mut stream)? {
        Some(line) if wire::parse_request(&line).is_ok() => wire::encode(&answerer.report()),
        _ => wire::encode_refusal(&format!(
            "expected the request line `{} {}`",
            wire::MAGIC,
            wire::PROTOCOL_VERSION
        )),
    };
    stream.write_all(text.as_bytes())?;
    stream.flush()
}

/// The request line without its newline; `None` if it is longer than any request or not text.
/// A client of another protocol version gets this node's answer, whose header names the
/// version, so that it can say what is wrong.
fn read_request_line(stream: &mut UnixStream) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 64];
    loop {
        let n = stream.read(&mut byte)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&byte[..n]);
        if line.contains(&b'\n') || line.len() > wire::MAX_REQUEST_BYTES {
            break;
        }
    }
    let Some(end) = line.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    line.truncate(end);
    Ok(String::from_utf8(line).ok())
}

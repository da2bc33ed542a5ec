//! Setting up the mesh: dialing lower-id peers, accepting higher-id ones, and the barrier that
//! makes every node wait until every node has all its connections.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::mem;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::channel::{Channel, NodeId};
use crate::config::MeshConfig;
use crate::error::TransportError;
use crate::frame::{FrameRef, KIND_HEARTBEAT, KIND_MESH_READY};
use crate::frame_reader::{FrameReader, ReceiveError};
use crate::handshake::{self, Admission, Credentials, HANDSHAKE_DEADLINE};
use crate::handshake_wire::{Refusal, RefusalCode};
use crate::mesh::dial_retry::{self, AttemptFailed};

use super::connection::{prepare_socket, SocketSource};
use super::dial;
use super::inner::MeshInner;
use super::setup_watch::SetupWatch;

/// Longest single connect attempt, so that an abandoned setup is noticed soon.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);
/// Pause between polls of the listener.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// The barrier waits at least this long even when `connect_timeout` is used up by then.
const MIN_BARRIER_WAIT: Duration = Duration::from_secs(1);

/// One stream per (peer, channel), authenticated.
pub(crate) type Streams = BTreeMap<(NodeId, Channel), TcpStream>;

/// Dials the lower-id peers while accepting the higher-id ones, until every connection is up
/// or `deadline` passes.
pub(crate) fn connect_all(
    listener: &TcpListener,
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
) -> Result<Streams, TransportError> {
    let abandon = AtomicBool::new(false);
    let watch = SetupWatch::default();
    thread::scope(|scope| {
        let watcher = thread::Builder::new()
            .name("xport-setupwatch".to_string())
            .spawn_scoped(scope, || watch.watch(&abandon))
            .map_err(|source| TransportError::Thread { source })?;
        let acceptor = thread::Builder::new()
            .name("xport-accept".to_string())
            .spawn_scoped(scope, || {
                let accepted = accept_all(listener, cfg, creds, deadline, &abandon, &watch);
                if accepted.is_err() {
                    abandon.store(true, Ordering::Release);
                }
                accepted
            })
            .map_err(|source| TransportError::Thread { source })?;
        let dialed = dial_all(cfg, creds, deadline, &abandon, &watch);
        if dialed.is_err() {
            abandon.store(true, Ordering::Release);
        }
        let accepted = acceptor
            .join()
            .unwrap_or(Err(TransportError::SetupAbandoned));
        watch.finish();
        // The watcher only sleeps and polls; it ends within its period.
        let _ = watcher.join();
        if let Some(peer) = watch.lost() {
            return Err(TransportError::LostDuringSetup {
                peer,
                why: "it closed its connection to this node while the mesh was being set up \
                      (it crashed, was killed, or gave up)"
                    .to_string(),
            });
        }
        match (dialed, accepted) {
            (Ok(mut streams), Ok(accepted)) => {
                streams.extend(accepted);
                Ok(streams)
            }
            // Report the failure that caused the other side to give up.
            (Err(e), _) if !matches!(e, TransportError::SetupAbandoned) => Err(e),
            (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
        }
    })
}

/// Connects and handshakes every channel to every peer this node dials, retrying while a peer
/// is not up (or failed in a way that may pass), failing at once when one refused us for a
/// reason that will not pass.
fn dial_all(
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
    abandon: &AtomicBool,
    watch: &SetupWatch,
) -> Result<Streams, TransportError> {
    dial_retry::dial_all(cfg, deadline, abandon, |peer, addr, channel, remaining| {
        let mut stream = dial::connect_from(cfg.listen.ip(), addr, remaining.min(CONNECT_ATTEMPT))
            .map_err(|e| AttemptFailed::Passing(format!("connecting failed: {e}")))?;
        prepare_socket(&stream).map_err(|source| TransportError::HandshakeIo {
            remote: crate::Remote::node(peer, addr),
            source,
        })?;
        // Not past the setup deadline either, so that setup ends when it says.
        let by = deadline.min(Instant::now() + HANDSHAKE_DEADLINE);
        handshake::dial(&mut stream, creds, peer, addr, channel, by)?;
        watch.add(peer, &stream);
        Ok(stream)
    })
}

/// Accepts connections until every higher-id peer has all its channels, handshaking each on its
/// own thread so that a slow or hostile stranger delays no one else. A refused connection is
/// logged and waiting goes on: the right peer may still come. When this returns, every
/// handshake thread has ended.
fn accept_all(
    listener: &TcpListener,
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
    abandon: &AtomicBool,
    watch: &SetupWatch,
) -> Result<Streams, TransportError> {
    let expected: BTreeSet<NodeId> = cfg.accepted_peers().into_iter().collect();
    if expected.is_empty() {
        return Ok(Streams::new());
    }
    let listen_error = |source| TransportError::Listen {
        addr: listener.local_addr().unwrap_or(cfg.listen),
        source,
    };
    listener.set_nonblocking(true).map_err(listen_error)?;
    let acceptor = Acceptor {
        cfg,
        expected,
        state: Mutex::default(),
        watch,
    };
    thread::scope(|scope| {
        let ended = accept_until_setup_ends(scope, listener, &acceptor, creds, deadline, abandon);
        // The scope waits for every handshake thread; cut off those still waiting on the
        // other end so that this is prompt.
        acceptor.cut_off_handshakes();
        ended
    })?;
    let state = acceptor.state.into_inner();
    Ok(state.unwrap_or_else(PoisonError::into_inner).accepted)
}

fn accept_until_setup_ends<'scope>(
    scope: &'scope thread::Scope<'scope, '_>,
    listener: &TcpListener,
    acceptor: &'scope Acceptor<'_>,
    creds: &'scope Credentials,
    deadline: Instant,
    abandon: &AtomicBool,
) -> Result<(), TransportError> {
    let me = acceptor.cfg.me;
    let mut arrivals: u64 = 0;
    loop {
        if let Some(ended) = acceptor.end_if_over(abandon, deadline) {
            return ended;
        }
        let (stream, from) = match listener.accept() {
            Ok(connection) => connection,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or similar: worth a line, maybe not fatal.
                eprintln!("spanvm transport: node {me}: accepting failed: {e}");
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| prepare_socket(&stream));
        if let Err(e) = prepared {
            eprintln!("spanvm transport: node {me}: cannot set up the connection from {from}: {e}");
            continue;
        }
        arrivals += 1;
        let Some(pending) = acceptor.enter(arrivals, &stream, from) else {
            continue;
        };
        let spawned = thread::Builder::new()
            .name("xport-handshake".to_string())
            .spawn_scoped(scope, move || pending.handshake(stream, from, creds));
        if let Err(e) = spawned {
            // The handshake and its connection were dropped with the closure: closed.
            eprintln!(
                "spanvm transport: node {me}: cannot start a thread to handshake the connection \
                 from {from}: {e}; closed it"
            );
        }
    }
}

/// Most connections handshaken at once. A dialing node handshakes one connection at a time, so
/// this is room for 32 higher-id peers connecting at the same moment (more only wait for a
/// retry), while a flood of connections costs at most this many threads and descriptors.
pub(crate) const MAX_HANDSHAKES: usize = 32;

/// What the accepting side of setup and its handshake threads share.
struct Acceptor<'a> {
    cfg: &'a MeshConfig,
    /// The higher-id peers, which dial this node.
    expected: BTreeSet<NodeId>,
    state: Mutex<AcceptState>,
    /// Where accepted connections are watched for their peer going away.
    watch: &'a SetupWatch,
}

#[derive(Default)]
struct AcceptState {
    accepted: Streams,
    /// Channels whose handshake claimed them and is telling the peer it is accepted.
    claimed: BTreeSet<(NodeId, Channel)>,
    /// Handshakes in progress, by arrival, each with a handle on its connection so that the
    /// end of setup can cut it off.
    in_progress: BTreeMap<u64, TcpStream>,
    /// The last refusal of each expected peer, for the error if it never connects.
    refusals: BTreeMap<NodeId, TransportError>,
    /// The last refusal of a connection that named no expected peer.
    stray_refusal: Option<String>,
    /// Setup is over: nothing more is accepted or recorded.
    over: bool,
}

impl Acceptor<'_> {
    fn lock(&self) -> MutexGuard<'_, AcceptState> {
        // A handshake thread that panicked left the state consistent: every change is one step.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends setup when every channel is accepted, setup was abandoned, or `deadline` passed:
    /// from then on nothing more is accepted.
    fn end_if_over(
        &self,
        abandon: &AtomicBool,
        deadline: Instant,
    ) -> Option<Result<(), TransportError>> {
        let mut state = self.lock();
        let ended = if state.accepted.len() == self.expected.len() * Channel::COUNT {
            Ok(())
        } else if abandon.load(Ordering::Acquire) {
            Err(TransportError::SetupAbandoned)
        } else if Instant::now() >= deadline {
            Err(missing_peer(self.cfg, &self.expected, &mut state))
        } else {
            return None;
        };
        state.over = true;
        Some(ended)
    }

    /// Registers the handshake of a new connection, or refuses it (closing it when the caller
    /// drops it) when too many are in progress already.
    fn enter(&self, arrival: u64, stream: &TcpStream, from: SocketAddr) -> Option<Pending<'_>> {
        let me = self.cfg.me;
        // Only this thread adds handshakes, so the count cannot grow past this check.
        if self.lock().in_progress.len() >= MAX_HANDSHAKES {
            eprintln!(
                "spanvm transport: node {me}: {MAX_HANDSHAKES} handshakes already in progress; \
                 closed the connection from {from} at once"
            );
            return None;
        }
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                eprintln!(
                    "spanvm transport: node {me}: cannot keep a handle on the connection from \
                     {from}: {e}; closed it"
                );
                return None;
            }
        };
        self.lock().in_progress.insert(arrival, handle);
        Some(Pending {
            acceptor: self,
            arrival,
            claimed: Cell::new(None),
        })
    }

    /// Shuts down every connection still handshaking, so that its thread ends at once.
    fn cut_off_handshakes(&self) {
        let cut = mem::take(&mut self.lock().in_progress);
        if !cut.is_empty() {
            eprintln!(
                "spanvm transport: node {}: mesh setup is over; closed {} connection(s) still \
                 handshaking",
                self.cfg.me,
                cut.len()
            );
        }
        for stream in cut.values() {
            // Already closed by the other end is as good.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Whether `peer` may open `channel` to this node now.
    fn admit(&self, state: &AcceptState, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        let me = self.cfg.me;
        if !self.expected.contains(&peer) {
            let message = if self.cfg.peer_addr(peer).is_some() {
                format!(
                    "node {peer} has a lower id than node {me}, so node {me} dials it, not the \
                     other way round; are both nodes' ids what they should be?"
                )
            } else {
                let known: Vec<String> = self
                    .cfg
                    .peers
                    .iter()
                    .map(|(id, _)| id.to_string())
                    .collect();
                format!(
                    "node {peer} is not among node {me}'s peers (nodes {}); were both nodes \
                     started from the same cluster description?",
                    known.join(", ")
                )
            };
            return Err(Refusal {
                code: RefusalCode::UnexpectedNode,
                message,
            });
        }
        let key = (peer, channel);
        if state.accepted.contains_key(&key) || state.claimed.contains(&key) {
            return Err(Refusal {
                code: RefusalCode::DuplicateConnection,
                message: format!(
                    "node {me} already has a {channel} connection from node {peer}; is a second \
                     process running as node {peer}?"
                ),
            });
        }
        if state.over {
            return Err(Refusal {
                code: RefusalCode::Protocol,
                message: format!("node {me} has ended its mesh setup and accepts no more"),
            });
        }
        Ok(())
    }
}

/// One connection's handshake in progress. Dropping it gives up its place and its claim.
struct Pending<'a> {
    acceptor: &'a Acceptor<'a>,
    arrival: u64,
    /// The channel this handshake claimed, until its connection is accepted.
    claimed: Cell<Option<(NodeId, Channel)>>,
}

impl Pending<'_> {
    fn handshake(self, mut stream: TcpStream, from: SocketAddr, creds: &Credentials) {
        let by = Instant::now() + HANDSHAKE_DEADLINE;
        match handshake::accept(&mut stream, creds, from, by, &self) {
            Ok(key) => self.accepted(key, stream),
            Err(e) => self.refused(from, e),
        }
    }

    fn accepted(self, key: (NodeId, Channel), stream: TcpStream) {
        let mut state = self.acceptor.lock();
        // In the same step as it becomes accepted, so that the end of setup cannot cut it off.
        state.in_progress.remove(&self.arrival);
        if self.claimed.take() == Some(key) {
            state.claimed.remove(&key);
            if !state.over {
                self.acceptor.watch.add(key.0, &stream);
                state.accepted.insert(key, stream);
            }
        }
    }

    fn refused(&self, from: SocketAddr, e: TransportError) {
        let me = self.acceptor.cfg.me;
        let line = format!(
            "spanvm transport: node {me} refused a connection from {from}: {e}; still waiting"
        );
        {
            let mut state = self.acceptor.lock();
            if state.over {
                // Cut off (or finished too late) once setup ended: nothing is waiting for it.
                return;
            }
            match e
                .claimed_peer()
                .filter(|peer| self.acceptor.expected.contains(peer))
            {
                Some(peer) => {
                    state.refusals.insert(peer, e);
                }
                None => state.stray_refusal = Some(e.to_string()),
            }
        }
        eprintln!("{line}");
    }
}

impl Admission for Pending<'_> {
    fn screen(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        self.acceptor.admit(&self.acceptor.lock(), peer, channel)
    }

    fn claim(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        let mut state = self.acceptor.lock();
        // Asked again under the same lock as the claim: another handshake may have taken the
        // channel since this one was screened.
        self.acceptor.admit(&state, peer, channel)?;
        state.claimed.insert((peer, channel));
        self.claimed.set(Some((peer, channel)));
        Ok(())
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut state = self.acceptor.lock();
        state.in_progress.remove(&self.arrival);
        if let Some(key) = self.claimed.take() {
            state.claimed.remove(&key);
        }
    }
}

/// The error for a setup that timed out waiting for higher-id peers: the last refusal of the
/// first missing peer if it was refused, else that it never came.
fn missing_peer(
    cfg: &MeshConfig,
    expected: &BTreeSet<NodeId>,
    state: &mut AcceptState,
) -> TransportError {
    let accepted = &state.accepted;
    let connected = |peer: NodeId| {
        Channel::ALL
            .iter()
            .filter(|&&channel| accepted.contains_key(&(peer, channel)))
            .count()
    };
    let Some(&peer) = expected
        .iter()
        .find(|&&peer| connected(peer) < Channel::COUNT)
    else {
        return TransportError::SetupAbandoned;
    };
    let connections = connected(peer);
    if let Some(refusal) = state.refusals.remove(&peer) {
        return refusal;
    }
    let mut detail = format!(
        "it did not connect to this node's listen address {} ({connections} of {} connections \
         made)",
        cfg.listen,
        Channel::COUNT
    );
    if let Some(stray) = state.stray_refusal.take() {
        detail.push_str(&format!(
            "; meanwhile this node refused a connection: {stray}"
        ));
    }
    TransportError::PeerUnreachable {
        peer,
        addr: cfg.peer_addr(peer).unwrap_or(cfg.listen),
        waited: cfg.connect_timeout,
        detail,
    }
}

/// Tells every peer that this node has all its connections, then waits until every peer has
/// said the same. Returns the control channel readers, which may already hold later frames.
pub(crate) fn await_mesh_ready(
    inner: &MeshInner,
    deadline: Instant,
    connect_timeout: Duration,
) -> Result<BTreeMap<NodeId, FrameReader<SocketSource>>, TransportError> {
    let ready = FrameRef {
        kind: KIND_MESH_READY,
        flags: 0,
        id: 0,
        arg: 0,
        payload: &[],
    };
    let incomplete = |peer, detail: String| TransportError::MeshIncomplete {
        peer,
        waited: connect_timeout,
        detail,
    };
    for link in inner.links.values() {
        link.conn(Channel::Control)
            .write_frame(ready)
            .map_err(|e| {
                incomplete(
                    link.id,
                    format!("telling it this node is ready failed: {e}"),
                )
            })?;
    }
    let deadline = deadline.max(Instant::now() + MIN_BARRIER_WAIT);
    let mut readers = BTreeMap::new();
    for link in inner.links.values() {
        let peer = link.id;
        let mut reader = link
            .conn(Channel::Control)
            .reader(None)
            .map_err(|e| incomplete(peer, format!("cannot read its control connection: {e}")))?;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(incomplete(
                    peer,
                    "it is still connecting to other nodes, or is stuck".to_string(),
                ));
            }
            reader
                .source()
                .stream()
                .set_read_timeout(Some(remaining))
                .map_err(|e| {
                    incomplete(peer, format!("cannot wait on its control connection: {e}"))
                })?;
            match reader.next_frame() {
                Ok(frame) if frame.kind == KIND_MESH_READY => break,
                Ok(frame) if frame.kind == KIND_HEARTBEAT => continue,
                Ok(frame) => {
                    return Err(incomplete(
                        peer,
                        format!(
                            "it sent a frame of kind {:#06x} before saying it was ready",
                            frame.kind
                        ),
                    ))
                }
                Err(ReceiveError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(incomplete(peer, format!("its control connection: {e}"))),
            }
        }
        if link.is_lost() {
            return Err(incomplete(peer, "it was lost".to_string()));
        }
        readers.insert(peer, reader);
    }
    for link in inner.links.values() {
        for conn in link.conns() {
            conn.stream()
                .set_read_timeout(None)
                .map_err(|e| incomplete(link.id, format!("cannot clear a read timeout: {e}")))?;
        }
    }
    Ok(readers)
}

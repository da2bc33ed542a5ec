//! Setting up the mesh: dialing lower-id peers, accepting higher-id ones, and the barrier that
//! makes every node wait until every node has all its connections.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::channel::{Channel, NodeId};
use crate::config::MeshConfig;
use crate::error::TransportError;
use crate::frame::{FrameRef, KIND_HEARTBEAT, KIND_MESH_READY};
use crate::frame_reader::{FrameReader, ReceiveError};
use crate::handshake::{self, Admission, Credentials, HANDSHAKE_DEADLINE};
use crate::handshake_wire::{Refusal, RefusalCode};

use super::connection::{prepare_socket, SocketSource};
use super::inner::MeshInner;

/// Longest single connect attempt, so that an abandoned setup is noticed soon.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);
/// Pause between attempts to reach a peer that is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
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
    thread::scope(|scope| {
        let acceptor = thread::Builder::new()
            .name("xport-accept".to_string())
            .spawn_scoped(scope, || {
                let accepted = accept_all(listener, cfg, creds, deadline, &abandon);
                if accepted.is_err() {
                    abandon.store(true, Ordering::Release);
                }
                accepted
            })
            .map_err(|source| TransportError::Thread { source })?;
        let dialed = dial_all(cfg, creds, deadline, &abandon);
        if dialed.is_err() {
            abandon.store(true, Ordering::Release);
        }
        let accepted = acceptor
            .join()
            .unwrap_or(Err(TransportError::SetupAbandoned));
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

fn dial_all(
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
    abandon: &AtomicBool,
) -> Result<Streams, TransportError> {
    let mut streams = Streams::new();
    for (peer, addr) in cfg.dialed_peers() {
        for channel in Channel::ALL {
            let stream = dial_one(cfg, creds, peer, addr, channel, deadline, abandon)?;
            streams.insert((peer, channel), stream);
        }
    }
    Ok(streams)
}

/// Connects and handshakes one channel, retrying while the peer is not up (or failed in a
/// way that may pass), failing at once when it refused us for a reason that will not pass.
fn dial_one(
    cfg: &MeshConfig,
    creds: &Credentials,
    peer: NodeId,
    addr: SocketAddr,
    channel: Channel,
    deadline: Instant,
    abandon: &AtomicBool,
) -> Result<TcpStream, TransportError> {
    let mut last_problem = String::from("no connection attempt could be made");
    loop {
        if abandon.load(Ordering::Acquire) {
            return Err(TransportError::SetupAbandoned);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(TransportError::PeerUnreachable {
                peer,
                addr,
                waited: cfg.connect_timeout,
                detail: last_problem,
            });
        }
        match TcpStream::connect_timeout(&addr, remaining.min(CONNECT_ATTEMPT)) {
            Ok(mut stream) => {
                let shaken = prepare_socket(&stream)
                    .map_err(|source| TransportError::HandshakeIo {
                        remote: crate::Remote::node(peer, addr),
                        source,
                    })
                    .and_then(|()| {
                        // Not past the setup deadline either, so that setup ends when it says.
                        let by = deadline.min(Instant::now() + HANDSHAKE_DEADLINE);
                        handshake::dial(&mut stream, creds, peer, addr, channel, by)
                    });
                match shaken {
                    Ok(()) => return Ok(stream),
                    Err(e) if e.is_definitive() => return Err(e),
                    Err(e) => last_problem = e.to_string(),
                }
            }
            Err(e) => last_problem = format!("connecting failed: {e}"),
        }
        thread::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Accepts and handshakes connections until every higher-id peer has all its channels. A
/// refused connection is logged and waiting goes on: the right peer may still come.
fn accept_all(
    listener: &TcpListener,
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
    abandon: &AtomicBool,
) -> Result<Streams, TransportError> {
    let expected: BTreeSet<NodeId> = cfg.accepted_peers().into_iter().collect();
    let mut accepted = Streams::new();
    if expected.is_empty() {
        return Ok(accepted);
    }
    let listen_error = |source| TransportError::Listen {
        addr: listener.local_addr().unwrap_or(cfg.listen),
        source,
    };
    listener.set_nonblocking(true).map_err(listen_error)?;
    let mut refusals: BTreeMap<NodeId, TransportError> = BTreeMap::new();
    let mut stray_refusal: Option<String> = None;
    while accepted.len() < expected.len() * Channel::COUNT {
        if abandon.load(Ordering::Acquire) {
            return Err(TransportError::SetupAbandoned);
        }
        if Instant::now() >= deadline {
            return Err(missing_peer(
                cfg,
                &expected,
                &accepted,
                refusals,
                stray_refusal,
            ));
        }
        let (mut stream, from) = match listener.accept() {
            Ok(connection) => connection,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or similar: worth a line, maybe not fatal.
                eprintln!("spanvm transport: node {}: accepting failed: {e}", cfg.me);
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| prepare_socket(&stream));
        if let Err(e) = prepared {
            eprintln!(
                "spanvm transport: node {}: cannot set up the connection from {from}: {e}",
                cfg.me
            );
            continue;
        }
        let admission = Serial {
            cfg,
            expected: &expected,
            accepted: &accepted,
        };
        let by = Instant::now() + HANDSHAKE_DEADLINE;
        match handshake::accept(&mut stream, creds, from, by, &admission) {
            Ok(key) => {
                accepted.insert(key, stream);
            }
            Err(e) => {
                eprintln!(
                    "spanvm transport: node {} refused a connection from {from}: {e}; still waiting",
                    cfg.me
                );
                match e.claimed_peer().filter(|peer| expected.contains(peer)) {
                    Some(peer) => {
                        refusals.insert(peer, e);
                    }
                    None => stray_refusal = Some(e.to_string()),
                }
            }
        }
    }
    Ok(accepted)
}

/// Admission while connections are handshaken one at a time: nothing changes between the
/// screening and the claim, so both ask the same.
struct Serial<'a> {
    cfg: &'a MeshConfig,
    expected: &'a BTreeSet<NodeId>,
    accepted: &'a Streams,
}

impl Admission for Serial<'_> {
    fn screen(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        admit(self.cfg, self.expected, self.accepted, peer, channel)
    }
    fn claim(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        admit(self.cfg, self.expected, self.accepted, peer, channel)
    }
}

/// Whether `peer` may open `channel` to this node now.
fn admit(
    cfg: &MeshConfig,
    expected: &BTreeSet<NodeId>,
    accepted: &Streams,
    peer: NodeId,
    channel: Channel,
) -> Result<(), Refusal> {
    let me = cfg.me;
    if !expected.contains(&peer) {
        let message = if cfg.peer_addr(peer).is_some() {
            format!(
                "node {peer} has a lower id than node {me}, so node {me} dials it, not the other \
                 way round; are both nodes' ids what they should be?"
            )
        } else {
            let known: Vec<String> = cfg.peers.iter().map(|(id, _)| id.to_string()).collect();
            format!(
                "node {peer} is not among node {me}'s peers (nodes {}); were both nodes started \
                 from the same cluster description?",
                known.join(", ")
            )
        };
        return Err(Refusal {
            code: RefusalCode::UnexpectedNode,
            message,
        });
    }
    if accepted.contains_key(&(peer, channel)) {
        return Err(Refusal {
            code: RefusalCode::DuplicateConnection,
            message: format!(
                "node {me} already has a {channel} connection from node {peer}; is a second \
                 process running as node {peer}?"
            ),
        });
    }
    Ok(())
}

/// The error for a setup that timed out waiting for higher-id peers: the last refusal of the
/// first missing peer if it was refused, else that it never came.
fn missing_peer(
    cfg: &MeshConfig,
    expected: &BTreeSet<NodeId>,
    accepted: &Streams,
    mut refusals: BTreeMap<NodeId, TransportError>,
    stray_refusal: Option<String>,
) -> TransportError {
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
    if let Some(refusal) = refusals.remove(&peer) {
        return refusal;
    }
    let mut detail = format!(
        "it did not connect to this node's listen address {} ({} of {} connections made)",
        cfg.listen,
        connected(peer),
        Channel::COUNT
    );
    if let Some(stray) = stray_refusal {
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
            .reader(false)
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

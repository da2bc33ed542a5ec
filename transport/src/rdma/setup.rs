//! Setting up the RDMA mesh: connecting a queue pair per channel to every lower-id peer while
//! accepting those of the higher-id ones, each handshaken (`stream.rs`) and advertised.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::channel::{Channel, NodeId};
use crate::config::MeshConfig;
use crate::error::TransportError;
use crate::handshake::{self, Admission, Credentials, HANDSHAKE_DEADLINE};
use crate::handshake_wire::{Refusal, RefusalCode};
use crate::mesh::dial_retry;

use super::cm::{self, Listener};
use super::conn::Conn;
use super::ibverbs::CmEndpoint;
use super::stream::HandshakeStream;
use super::verbs::Verbs;

/// Longest wait for a connection request before the acceptor looks at the clock again.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

type Conns = BTreeMap<(NodeId, Channel), Conn>;

/// Connects every (peer, channel) until all are up or `deadline` passes; returns them per peer
/// in [`Channel::ALL`] order.
pub(crate) fn connect_all(
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
) -> Result<BTreeMap<NodeId, Vec<Conn>>, TransportError> {
    let listener = if cfg.accepted_peers().is_empty() {
        None
    } else {
        Some(
            Listener::bind(cfg.listen).map_err(|source| TransportError::Listen {
                addr: cfg.listen,
                source,
            })?,
        )
    };
    let abandon = AtomicBool::new(false);
    let (dialed, accepted) = thread::scope(|scope| {
        let acceptor = thread::Builder::new()
            .name("xport-rdma-accept".to_string())
            .spawn_scoped(scope, || {
                let accepted = match &listener {
                    Some(listener) => accept_all(listener, cfg, creds, deadline, &abandon),
                    None => Ok(Conns::new()),
                };
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
        Ok::<_, TransportError>((dialed, accepted))
    })?;
    let mut conns = match (dialed, accepted) {
        (Ok(mut dialed), Ok(accepted)) => {
            dialed.extend(accepted);
            dialed
        }
        (Err(e), _) if !matches!(e, TransportError::SetupAbandoned) => return Err(e),
        (_, Err(e)) | (Err(e), Ok(_)) => return Err(e),
    };
    let mut per_peer = BTreeMap::new();
    for &(peer, addr) in &cfg.peers {
        let mut list = Vec::with_capacity(Channel::COUNT);
        for channel in Channel::ALL {
            let conn =
                conns
                    .remove(&(peer, channel))
                    .ok_or_else(|| TransportError::PeerUnreachable {
                        peer,
                        addr,
                        waited: cfg.connect_timeout,
                        detail: format!("setup ended without its {channel} queue pair"),
                    })?;
            list.push(conn);
        }
        per_peer.insert(peer, list);
    }
    Ok(per_peer)
}

/// Connects and handshakes every channel to every peer this node dials, retrying while a peer
/// is not up, failing at once when one refused us for a reason that will not pass.
fn dial_all(
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
    abandon: &AtomicBool,
) -> Result<Conns, TransportError> {
    dial_retry::dial_all(cfg, deadline, abandon, |peer, addr, channel, _| {
        Ok(try_dial(creds, peer, addr, channel, deadline)?)
    })
}

fn try_dial(
    creds: &Credentials,
    peer: NodeId,
    addr: SocketAddr,
    channel: Channel,
    deadline: Instant,
) -> Result<Conn, TransportError> {
    let setup = |step: &str, source| TransportError::RdmaSetup {
        step: format!("connecting the {channel} queue pair to node {peer} at {addr}: {step}"),
        source,
    };
    let endpoint = cm::endpoint_to(addr).map_err(|e| setup("resolving", e))?;
    let conn = Conn::new(peer, channel, Box::new(endpoint))
        .map_err(|e| setup("registering memory", std::io::Error::other(e.to_string())))?;
    // The receives are posted: the peer's first SEND finds one.
    conn.verbs().connect().map_err(|e| setup("connecting", e))?;
    let by = deadline.min(Instant::now() + HANDSHAKE_DEADLINE);
    handshake::dial(
        &mut HandshakeStream::new(&conn),
        creds,
        peer,
        addr,
        channel,
        by,
    )?;
    conn.advertise().map_err(|e| {
        setup(
            "sending the pool advert",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(conn)
}

/// Who may still connect, and which (peer, channel) pairs are taken.
struct Expected {
    me: NodeId,
    peers: BTreeSet<NodeId>,
    claimed: Mutex<BTreeSet<(NodeId, Channel)>>,
}

impl Admission for Expected {
    fn screen(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        if !self.peers.contains(&peer) {
            return Err(Refusal {
                code: RefusalCode::UnexpectedNode,
                message: format!(
                    "node {} does not expect node {peer} to connect (only higher-id peers of its \
                     config connect to it); check the cluster description",
                    self.me
                ),
            });
        }
        let claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        if claimed.contains(&(peer, channel)) {
            return Err(duplicate(self.me, peer, channel));
        }
        Ok(())
    }

    fn claim(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        let mut claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        if !claimed.insert((peer, channel)) {
            return Err(duplicate(self.me, peer, channel));
        }
        Ok(())
    }
}

fn duplicate(me: NodeId, peer: NodeId, channel: Channel) -> Refusal {
    Refusal {
        code: RefusalCode::DuplicateConnection,
        message: format!(
            "node {me} already has a {channel} queue pair from node {peer}; is a second node \
             running with id {peer}?"
        ),
    }
}

/// Accepts until every higher-id peer has all its channels. Handshakes run one at a time: only
/// hosts on the RDMA fabric can connect at all, and each handshake is bounded.
fn accept_all(
    listener: &Listener,
    cfg: &MeshConfig,
    creds: &Credentials,
    deadline: Instant,
    abandon: &AtomicBool,
) -> Result<Conns, TransportError> {
    let expected = Expected {
        me: cfg.me,
        peers: cfg.accepted_peers().into_iter().collect(),
        claimed: Mutex::new(BTreeSet::new()),
    };
    let wanted = expected.peers.len() * Channel::COUNT;
    let mut conns = Conns::new();
    let mut last_problem = String::from("it never connected");
    while conns.len() < wanted {
        if abandon.load(Ordering::Acquire) {
            return Err(TransportError::SetupAbandoned);
        }
        if Instant::now() >= deadline {
            let claimed = expected
                .claimed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let missing = expected
                .peers
                .iter()
                .copied()
                .find(|&p| Channel::ALL.iter().any(|&c| !claimed.contains(&(p, c))))
                .unwrap_or(cfg.me);
            return Err(TransportError::PeerUnreachable {
                peer: missing,
                addr: cfg.peer_addr(missing).unwrap_or(cfg.listen),
                waited: cfg.connect_timeout,
                detail: last_problem,
            });
        }
        let endpoint = match listener.next_request(ACCEPT_POLL) {
            Ok(Some(endpoint)) => endpoint,
            Ok(None) => continue,
            Err(e) => {
                last_problem = e.to_string();
                continue;
            }
        };
        match accept_one(endpoint, cfg.me, creds, deadline, &expected) {
            Ok(conn) => {
                conns.insert((conn.peer, conn.channel), conn);
            }
            Err(e) => {
                // As on TCP: a refused stranger or a misconfigured node is logged, and the
                // right peer is waited for until the deadline.
                eprintln!(
                    "spanvm transport: node {} refused an RDMA connection: {e}",
                    cfg.me
                );
                last_problem = e.to_string();
            }
        }
    }
    Ok(conns)
}

fn accept_one(
    endpoint: CmEndpoint,
    me: NodeId,
    creds: &Credentials,
    deadline: Instant,
    expected: &Expected,
) -> Result<Conn, TransportError> {
    let from = endpoint.peer_addr();
    let setup = |step: &str, source| TransportError::RdmaSetup {
        step: format!("accepting a queue pair from {from}: {step}"),
        source,
    };
    // Identified by its hello below; until then the connection is nobody's.
    let mut conn = Conn::new(me, Channel::Control, Box::new(endpoint))
        .map_err(|e| setup("registering memory", std::io::Error::other(e.to_string())))?;
    conn.verbs().connect().map_err(|e| setup("accepting", e))?;
    let by = deadline.min(Instant::now() + HANDSHAKE_DEADLINE);
    let (peer, channel) =
        handshake::accept(&mut HandshakeStream::new(&conn), creds, from, by, expected)?;
    conn.identify(peer, channel);
    conn.advertise()
        .map_err(|e| TransportError::LostDuringSetup {
            peer,
            why: format!("sending the {channel} pool advert failed: {e}"),
        })?;
    Ok(conn)
}

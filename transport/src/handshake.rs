//! The handshake on a fresh connection, from both ends.
//!
//! D is the dialing node (higher id), A the accepting one:
//! 1. D → A: hello (magic, version, D, A, channel, nonce_D).
//! 2. A checks it, then A → D: hello (…, nonce_A) and proof_A = HMAC(secret, domain ||
//!    nonce_D || A || D || channel); or a refusal.
//! 3. D checks A's hello and proof, then D → A: proof_D over nonce_A, and D's layout hash.
//! 4. A checks proof_D and compares hashes: equal → A → D: accepted. Different → A → D: A's
//!    layout text, D → A: D's layout text, and both name the first differing line.
//!
//! Whoever refuses sends a refusal record that says why, so the other end can report the same
//! cause; layout texts go only to a node that proved the secret. Every step is one ordered
//! write, so neither end ever waits for the other to read a large message.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::channel::{Channel, NodeId};
use crate::config::MeshConfig;
use crate::error::{Remote, TransportError};
use crate::handshake_wire::{
    read_record, write_records, Hello, Record, Refusal, RefusalCode, WireError, DIGEST_LEN,
    NONCE_LEN, PROTOCOL_VERSION,
};
use crate::layout_diff::first_difference;

/// Longest a whole handshake may take, from its first byte to the verdict. A spanvm node
/// answers each step at once, so on a cluster network a handshake is a few round trips and a
/// few milliseconds, even with a 1 MiB layout text; 3 s leaves room for a loaded machine many
/// times over. A per-read timeout would not do: one byte just before each timeout would keep
/// a handshake alive for ever. Past this, a connection that sends nothing or trickles bytes
/// gives up its place, so it delays nobody for longer.
pub(crate) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);

/// Keeps these MACs from being valid for anything else keyed with the same secret.
const PROOF_DOMAIN: &[u8] = b"spanvm transport handshake proof v1";

/// How long in total a refusing end keeps reading after its refusal, so that closing does not
/// reset the connection before the other end has read why.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Most bytes a refusing end reads after its refusal. Before it reads a refusal, a spanvm node
/// has sent at most a hello (up to 256 bytes) and a proof and a layout hash (37 bytes each), so
/// this reads all of them; a stranger's stream of anything else is cut off here.
const REFUSAL_DRAIN_BUDGET: usize = 4096;

/// What a node proves and compares in the handshake.
pub(crate) struct Credentials {
    pub me: NodeId,
    secret: Vec<u8>,
    layout: String,
    layout_hash: [u8; DIGEST_LEN],
}

impl Credentials {
    pub(crate) fn new(cfg: &MeshConfig) -> Credentials {
        Credentials {
            me: cfg.me,
            secret: cfg.secret.clone(),
            layout: cfg.layout_canonical.clone(),
            layout_hash: Sha256::digest(cfg.layout_canonical.as_bytes()).into(),
        }
    }
}

/// The byte stream a handshake runs on: a TCP connection, or the RDMA backend's message
/// channel. Every read and write is bounded by the timeout set just before it.
pub(crate) trait HandshakeLink: Read + Write {
    /// Bounds the next read to `left` (never zero).
    fn set_read_limit(&mut self, left: Duration) -> io::Result<()>;
    /// Bounds the next write to `left` (never zero).
    fn set_write_limit(&mut self, left: Duration) -> io::Result<()>;
    /// Tells the other end nothing more follows (best effort).
    fn shutdown_write(&mut self);
    /// This end's address, as named in messages.
    fn local_name(&self) -> String;
}

impl HandshakeLink for TcpStream {
    fn set_read_limit(&mut self, left: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(left))
    }

    fn set_write_limit(&mut self, left: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(left))
    }

    fn shutdown_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }

    fn local_name(&self) -> String {
        self.local_addr()
            .map_or_else(|_| "this node".to_string(), |a| a.to_string())
    }
}

/// What the accepting end asks about the node that is connecting.
pub(crate) trait Admission {
    /// Whether `peer` may open `channel` now. Asked as soon as the hello names them, before the
    /// node proved anything, so that strangers are turned away cheaply; it must not reserve
    /// anything, since anyone can claim to be any node.
    fn screen(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal>;

    /// Takes `channel` of `peer` for this connection, or refuses it. Asked once the node proved
    /// the secret and the layouts match, just before it is told it is accepted, so that of two
    /// handshakes for the same channel at once only one is told so.
    fn claim(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal>;
}

/// Runs the dialing end of the handshake with `peer` for `channel`; it fails once `deadline`
/// passes.
pub(crate) fn dial(
    stream: &mut impl HandshakeLink,
    creds: &Credentials,
    peer: NodeId,
    addr: SocketAddr,
    channel: Channel,
    deadline: Instant,
) -> Result<(), TransportError> {
    let me = creds.me;
    let remote = Remote::node(peer, addr);
    let mut ex = Exchange::new(stream, deadline);
    let our_nonce = fresh_nonce()?;
    let hello = Hello {
        from: me,
        to: peer,
        channel: channel as u8,
        nonce: our_nonce,
    };
    ex.send(remote, &[Record::Hello(hello)], "sending this node's hello")?;

    let their_hello = match ex.receive(remote, "waiting for its hello")? {
        Record::Hello(hello) => hello,
        Record::ForeignHello { version, .. } => {
            let detail = versions(version);
            refuse(
                &mut ex,
                RefusalCode::VersionMismatch,
                &format!("node {me}: {detail}"),
            );
            return Err(TransportError::VersionMismatch { remote, detail });
        }
        Record::Refused(refusal) => return Err(refused(refusal, peer, remote, channel)),
        other => return Err(out_of_order(remote, "a hello", &other)),
    };
    if their_hello.from != peer || their_hello.to != me || their_hello.channel != channel as u8 {
        let detail = format!(
            "node {me} dialed node {peer} at {addr} for its {channel} channel, but the node \
             there says it is node {} answering node {} on channel {}; check the peer addresses",
            their_hello.from, their_hello.to, their_hello.channel
        );
        refuse(&mut ex, RefusalCode::UnexpectedNode, &detail);
        return Err(TransportError::UnexpectedNode { remote, detail });
    }
    let their_proof = match ex.receive(remote, "waiting for its proof")? {
        Record::Proof(proof) => proof,
        Record::Refused(refusal) => return Err(refused(refusal, peer, remote, channel)),
        other => return Err(out_of_order(remote, "a proof", &other)),
    };
    let proof_ok = verify_proof(&creds.secret, &our_nonce, peer, me, channel, &their_proof);
    if !proof_ok {
        return Err(refuse_wrong_secret(&mut ex, me, peer));
    }
    let our_proof = make_proof(&creds.secret, &their_hello.nonce, me, peer, channel, remote)?;
    ex.send(
        remote,
        &[
            Record::Proof(our_proof),
            Record::LayoutHash(creds.layout_hash),
        ],
        "sending this node's proof",
    )?;

    match ex.receive(remote, "waiting for its verdict")? {
        Record::Accepted => Ok(()),
        Record::Refused(refusal) => Err(refused(refusal, peer, remote, channel)),
        Record::LayoutText(theirs) => {
            // The mismatch is the error to report; if the peer is already gone and cannot get
            // our text, it reports its own side of the mismatch without it.
            let _ = ex.send(
                remote,
                &[Record::LayoutText(creds.layout.clone())],
                "sending this node's layout",
            );
            Err(TransportError::LayoutMismatch {
                peer,
                difference: first_difference(&creds.layout, &theirs, peer),
            })
        }
        other => Err(out_of_order(remote, "a verdict", &other)),
    }
}

/// Runs the accepting end of the handshake on a connection from `from_addr`; it fails once
/// `deadline` passes. `admission` decides whether the node named in the hello may open this
/// channel (known peer, not a duplicate). Returns who connected and for which channel; if it
/// fails after the claim, the caller must give the claimed channel up.
pub(crate) fn accept(
    stream: &mut impl HandshakeLink,
    creds: &Credentials,
    from_addr: SocketAddr,
    deadline: Instant,
    admission: &dyn Admission,
) -> Result<(NodeId, Channel), TransportError> {
    let me = creds.me;
    let unidentified = Remote::unidentified(from_addr);
    let mut ex = Exchange::new(stream, deadline);
    let hello = match ex.receive(unidentified, "waiting for its hello")? {
        Record::Hello(hello) => hello,
        Record::ForeignHello { version, from } => {
            let detail = versions(version);
            refuse(
                &mut ex,
                RefusalCode::VersionMismatch,
                &format!("node {me}: {detail}"),
            );
            let remote = Remote {
                id: from,
                addr: from_addr,
            };
            return Err(TransportError::VersionMismatch { remote, detail });
        }
        other => return Err(out_of_order(unidentified, "a hello", &other)),
    };
    let peer = hello.from;
    let remote = Remote::node(peer, from_addr);
    let Some(channel) = Channel::from_u8(hello.channel) else {
        let detail = format!(
            "it asked for channel {}, which does not exist",
            hello.channel
        );
        refuse(
            &mut ex,
            RefusalCode::Protocol,
            &format!("node {me}: {detail}"),
        );
        return Err(TransportError::Handshake { remote, detail });
    };
    if hello.to != me {
        let detail = format!(
            "node {peer} dialed {} expecting node {}, but this is node {me}; check its peer addresses",
            ex.stream.local_name(),
            hello.to
        );
        refuse(&mut ex, RefusalCode::UnexpectedNode, &detail);
        return Err(TransportError::UnexpectedNode { remote, detail });
    }
    if let Err(refusal) = admission.screen(peer, channel) {
        return Err(turn_away(&mut ex, refusal, remote, peer, channel));
    }

    let our_nonce = fresh_nonce()?;
    let our_proof = make_proof(&creds.secret, &hello.nonce, me, peer, channel, remote)?;
    let our_hello = Hello {
        from: me,
        to: peer,
        channel: channel as u8,
        nonce: our_nonce,
    };
    ex.send(
        remote,
        &[Record::Hello(our_hello), Record::Proof(our_proof)],
        "sending this node's hello and proof",
    )?;

    let their_proof = match ex.receive(remote, "waiting for its proof")? {
        Record::Proof(proof) => proof,
        Record::Refused(refusal) => return Err(refused(refusal, peer, remote, channel)),
        other => return Err(out_of_order(remote, "a proof", &other)),
    };
    if !verify_proof(&creds.secret, &our_nonce, peer, me, channel, &their_proof) {
        return Err(refuse_wrong_secret(&mut ex, me, peer));
    }
    let their_hash = match ex.receive(remote, "waiting for its layout hash")? {
        Record::LayoutHash(hash) => hash,
        other => return Err(out_of_order(remote, "a layout hash", &other)),
    };
    if their_hash == creds.layout_hash {
        if let Err(refusal) = admission.claim(peer, channel) {
            return Err(turn_away(&mut ex, refusal, remote, peer, channel));
        }
        ex.send(remote, &[Record::Accepted], "sending the verdict")?;
        return Ok((peer, channel));
    }
    ex.send(
        remote,
        &[Record::LayoutText(creds.layout.clone())],
        "sending this node's layout",
    )?;
    match ex.receive(remote, "waiting for its layout")? {
        Record::LayoutText(theirs) => Err(TransportError::LayoutMismatch {
            peer,
            difference: first_difference(&creds.layout, &theirs, peer),
        }),
        other => Err(out_of_order(remote, "a layout text", &other)),
    }
}

/// A connection being handshaken. Each read and write waits at most until the deadline, so
/// that the whole handshake is bounded, not each step of it.
struct Exchange<'a, S: HandshakeLink> {
    stream: &'a mut S,
    started: Instant,
    deadline: Instant,
}

/// What a read or write of an [`Exchange`] fails with once its deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the handshake deadline passed")]
struct DeadlinePassed;

impl<'a, S: HandshakeLink> Exchange<'a, S> {
    fn new(stream: &'a mut S, deadline: Instant) -> Exchange<'a, S> {
        Exchange {
            stream,
            started: Instant::now(),
            deadline,
        }
    }

    /// The time left, as a socket timeout (which cannot be zero).
    fn time_left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, DeadlinePassed));
        }
        Ok(left)
    }

    fn receive(&mut self, remote: Remote, step: &'static str) -> Result<Record, TransportError> {
        read_record(self).map_err(|e| match e {
            WireError::Io(source) => self.io_failure(remote, step, source),
            other => TransportError::Handshake {
                remote,
                detail: other.to_string(),
            },
        })
    }

    fn send(
        &mut self,
        remote: Remote,
        records: &[Record],
        step: &'static str,
    ) -> Result<(), TransportError> {
        write_records(self, records).map_err(|source| self.io_failure(remote, step, source))
    }

    fn io_failure(&self, remote: Remote, step: &'static str, source: io::Error) -> TransportError {
        let deadline_passed = source
            .get_ref()
            .is_some_and(|inner| inner.is::<DeadlinePassed>());
        if deadline_passed {
            TransportError::HandshakeTimeout {
                remote,
                waited: self.started.elapsed(),
                step,
            }
        } else {
            TransportError::HandshakeIo { remote, source }
        }
    }

    /// Reads and discards until the other end closes, `budget` bytes were read, or `until`
    /// (or the deadline, if earlier) passes.
    fn drain(&mut self, until: Instant, budget: usize) {
        self.deadline = self.deadline.min(until);
        let mut sink = [0u8; 1024];
        let mut left = budget;
        while left > 0 {
            let want = left.min(sink.len());
            match self.read(&mut sink[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n,
            }
        }
    }
}

/// The socket timeout is the time left, so a timed-out read or write means the deadline passed.
fn deadline_if_timed_out(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, DeadlinePassed)
        }
        _ => e,
    }
}

impl<S: HandshakeLink> Read for Exchange<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.time_left()?;
        self.stream.set_read_limit(left)?;
        self.stream.read(buf).map_err(deadline_if_timed_out)
    }
}

impl<S: HandshakeLink> Write for Exchange<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.time_left()?;
        self.stream.set_write_limit(left)?;
        self.stream.write(buf).map_err(deadline_if_timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

fn versions(theirs: u16) -> String {
    format!("this node speaks protocol version {PROTOCOL_VERSION}, the other end version {theirs}")
}

fn out_of_order(remote: Remote, expected: &str, got: &Record) -> TransportError {
    TransportError::Handshake {
        remote,
        detail: format!("expected {expected}, it sent a {} record", got.name()),
    }
}

/// The error for a refusal received from the other end.
fn refused(refusal: Refusal, peer: NodeId, remote: Remote, channel: Channel) -> TransportError {
    let message = refusal.message;
    match refusal.code {
        RefusalCode::WrongSecret => TransportError::WrongSecret {
            peer,
            detail: format!("node {peer} refused this node's proof: {message}"),
        },
        RefusalCode::UnexpectedNode => TransportError::UnexpectedNode {
            remote,
            detail: format!("{remote} refused the connection: {message}"),
        },
        RefusalCode::DuplicateConnection => TransportError::DuplicateConnection {
            peer,
            channel,
            detail: format!("{remote} refused the {channel} connection: {message}"),
        },
        RefusalCode::VersionMismatch => TransportError::VersionMismatch {
            remote,
            detail: message,
        },
        RefusalCode::Protocol => TransportError::Handshake {
            remote,
            detail: format!("it refused the connection: {message}"),
        },
    }
}

/// Refuses a node the admission said no to; the error is this node's side of the refusal.
fn turn_away(
    ex: &mut Exchange<'_, impl HandshakeLink>,
    refusal: Refusal,
    remote: Remote,
    peer: NodeId,
    channel: Channel,
) -> TransportError {
    refuse(ex, refusal.code, &refusal.message);
    match refusal.code {
        RefusalCode::DuplicateConnection => TransportError::DuplicateConnection {
            peer,
            channel,
            detail: refusal.message,
        },
        _ => TransportError::UnexpectedNode {
            remote,
            detail: refusal.message,
        },
    }
}

fn refuse_wrong_secret(
    ex: &mut Exchange<'_, impl HandshakeLink>,
    me: NodeId,
    peer: NodeId,
) -> TransportError {
    refuse(
        ex,
        RefusalCode::WrongSecret,
        &format!("node {me} could not verify node {peer}'s proof of the cluster secret"),
    );
    TransportError::WrongSecret {
        peer,
        detail: format!("node {peer}'s proof of the secret did not verify on this node"),
    }
}

/// Tells the other end why it is refused, then closes gently. Best effort: the caller reports
/// the refusal itself whatever happens to this courtesy message.
fn refuse(ex: &mut Exchange<'_, impl HandshakeLink>, code: RefusalCode, message: &str) {
    let refusal = Record::Refused(Refusal {
        code,
        message: message.to_string(),
    });
    if write_records(ex, &[refusal]).is_err() {
        return;
    }
    ex.stream.shutdown_write();
    // Read until the other end closes: closing with unread data would send a reset, which
    // can destroy the refusal before the other end has read it. Bounded in bytes and in total
    // time, so that a stranger streaming bytes at us cannot hold the connection.
    ex.drain(Instant::now() + REFUSAL_LINGER, REFUSAL_DRAIN_BUDGET);
}

fn fresh_nonce() -> Result<[u8; NONCE_LEN], TransportError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| TransportError::Randomness {
            detail: e.to_string(),
        })?;
    Ok(nonce)
}

type HmacSha256 = Hmac<Sha256>;

/// The MAC over one proof; binding both ids and the channel keeps a proof from being replayed
/// in the other direction, to another node, or on another channel.
fn proof_mac(
    secret: &[u8],
    nonce: &[u8; NONCE_LEN],
    prover: NodeId,
    verifier: NodeId,
    channel: Channel,
) -> Option<HmacSha256> {
    // HMAC takes keys of any length, so this never fails; a failure only means "no proof".
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).ok()?;
    mac.update(PROOF_DOMAIN);
    mac.update(nonce);
    mac.update(&prover.to_le_bytes());
    mac.update(&verifier.to_le_bytes());
    mac.update(&[channel as u8]);
    Some(mac)
}

fn make_proof(
    secret: &[u8],
    nonce: &[u8; NONCE_LEN],
    prover: NodeId,
    verifier: NodeId,
    channel: Channel,
    remote: Remote,
) -> Result<[u8; DIGEST_LEN], TransportError> {
    let mac = proof_mac(secret, nonce, prover, verifier, channel).ok_or_else(|| {
        TransportError::Handshake {
            remote,
            detail: "the cluster secret cannot key HMAC-SHA256".to_string(),
        }
    })?;
    Ok(mac.finalize().into_bytes().into())
}

/// Checks a proof in constant time.
fn verify_proof(
    secret: &[u8],
    nonce: &[u8; NONCE_LEN],
    prover: NodeId,
    verifier: NodeId,
    channel: Channel,
    proof: &[u8; DIGEST_LEN],
) -> bool {
    proof_mac(secret, nonce, prover, verifier, channel)
        .is_some_and(|mac| mac.verify_slice(proof).is_ok())
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;

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

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

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

/// Read and write timeout while handshaking: a live peer answers each step at once.
pub(crate) const HANDSHAKE_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps these MACs from being valid for anything else keyed with the same secret.
const PROOF_DOMAIN: &[u8] = b"spanvm transport handshake proof v1";

/// How long a refusing end keeps reading after its refusal, so that closing does not reset the
/// connection before the other end has read why.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

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

/// Runs the dialing end of the handshake with `peer` for `channel`.
pub(crate) fn dial(
    stream: &mut TcpStream,
    creds: &Credentials,
    peer: NodeId,
    addr: SocketAddr,
    channel: Channel,
) -> Result<(), TransportError> {
    let me = creds.me;
    let remote = Remote::node(peer, addr);
    let io = |source| TransportError::HandshakeIo { remote, source };
    let our_nonce = fresh_nonce()?;
    let hello = Hello {
        from: me,
        to: peer,
        channel: channel as u8,
        nonce: our_nonce,
    };
    write_records(stream, &[Record::Hello(hello)]).map_err(io)?;

    let their_hello = match read(stream, remote)? {
        Record::Hello(hello) => hello,
        Record::ForeignHello { version, .. } => {
            let detail = versions(version);
            refuse(
                stream,
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
        refuse(stream, RefusalCode::UnexpectedNode, &detail);
        return Err(TransportError::UnexpectedNode { remote, detail });
    }
    let their_proof = match read(stream, remote)? {
        Record::Proof(proof) => proof,
        Record::Refused(refusal) => return Err(refused(refusal, peer, remote, channel)),
        other => return Err(out_of_order(remote, "a proof", &other)),
    };
    let proof_ok = verify_proof(&creds.secret, &our_nonce, peer, me, channel, &their_proof);
    if !proof_ok {
        return Err(refuse_wrong_secret(stream, me, peer));
    }
    let our_proof = make_proof(&creds.secret, &their_hello.nonce, me, peer, channel, remote)?;
    write_records(
        stream,
        &[
            Record::Proof(our_proof),
            Record::LayoutHash(creds.layout_hash),
        ],
    )
    .map_err(io)?;

    match read(stream, remote)? {
        Record::Accepted => Ok(()),
        Record::Refused(refusal) => Err(refused(refusal, peer, remote, channel)),
        Record::LayoutText(theirs) => {
            // The mismatch is the error to report; if the peer is already gone and cannot get
            // our text, it reports its own side of the mismatch without it.
            let _ = write_records(stream, &[Record::LayoutText(creds.layout.clone())]);
            Err(TransportError::LayoutMismatch {
                peer,
                difference: first_difference(&creds.layout, &theirs, peer),
            })
        }
        other => Err(out_of_order(remote, "a verdict", &other)),
    }
}

/// Runs the accepting end of the handshake on a connection from `from_addr`. `admit` decides
/// whether the node named in the hello may open this channel now (known peer, not a duplicate).
/// Returns who connected and for which channel.
pub(crate) fn accept(
    stream: &mut TcpStream,
    creds: &Credentials,
    from_addr: SocketAddr,
    admit: &dyn Fn(NodeId, Channel) -> Result<(), Refusal>,
) -> Result<(NodeId, Channel), TransportError> {
    let me = creds.me;
    let unidentified = Remote::unidentified(from_addr);
    let hello = match read_record(stream) {
        Ok(Record::Hello(hello)) => hello,
        Ok(Record::ForeignHello { version, from }) => {
            let detail = versions(version);
            refuse(
                stream,
                RefusalCode::VersionMismatch,
                &format!("node {me}: {detail}"),
            );
            let remote = Remote {
                id: from,
                addr: from_addr,
            };
            return Err(TransportError::VersionMismatch { remote, detail });
        }
        Ok(other) => return Err(out_of_order(unidentified, "a hello", &other)),
        Err(WireError::Io(source)) => {
            return Err(TransportError::HandshakeIo {
                remote: unidentified,
                source,
            })
        }
        Err(e) => {
            return Err(TransportError::Handshake {
                remote: unidentified,
                detail: e.to_string(),
            })
        }
    };
    let peer = hello.from;
    let remote = Remote::node(peer, from_addr);
    let io = |source| TransportError::HandshakeIo { remote, source };
    let Some(channel) = Channel::from_u8(hello.channel) else {
        let detail = format!(
            "it asked for channel {}, which does not exist",
            hello.channel
        );
        refuse(
            stream,
            RefusalCode::Protocol,
            &format!("node {me}: {detail}"),
        );
        return Err(TransportError::Handshake { remote, detail });
    };
    if hello.to != me {
        let detail = format!(
            "node {peer} dialed {} expecting node {}, but this is node {me}; check its peer addresses",
            stream.local_addr().map_or_else(|_| "this node".to_string(), |a| a.to_string()),
            hello.to
        );
        refuse(stream, RefusalCode::UnexpectedNode, &detail);
        return Err(TransportError::UnexpectedNode { remote, detail });
    }
    if let Err(refusal) = admit(peer, channel) {
        refuse(stream, refusal.code, &refusal.message);
        return Err(match refusal.code {
            RefusalCode::DuplicateConnection => TransportError::DuplicateConnection {
                peer,
                channel,
                detail: refusal.message,
            },
            _ => TransportError::UnexpectedNode {
                remote,
                detail: refusal.message,
            },
        });
    }

    let our_nonce = fresh_nonce()?;
    let our_proof = make_proof(&creds.secret, &hello.nonce, me, peer, channel, remote)?;
    let our_hello = Hello {
        from: me,
        to: peer,
        channel: channel as u8,
        nonce: our_nonce,
    };
    write_records(
        stream,
        &[Record::Hello(our_hello), Record::Proof(our_proof)],
    )
    .map_err(io)?;

    let their_proof = match read(stream, remote)? {
        Record::Proof(proof) => proof,
        Record::Refused(refusal) => return Err(refused(refusal, peer, remote, channel)),
        other => return Err(out_of_order(remote, "a proof", &other)),
    };
    if !verify_proof(&creds.secret, &our_nonce, peer, me, channel, &their_proof) {
        return Err(refuse_wrong_secret(stream, me, peer));
    }
    let their_hash = match read(stream, remote)? {
        Record::LayoutHash(hash) => hash,
        other => return Err(out_of_order(remote, "a layout hash", &other)),
    };
    if their_hash == creds.layout_hash {
        write_records(stream, &[Record::Accepted]).map_err(io)?;
        return Ok((peer, channel));
    }
    write_records(stream, &[Record::LayoutText(creds.layout.clone())]).map_err(io)?;
    match read(stream, remote)? {
        Record::LayoutText(theirs) => Err(TransportError::LayoutMismatch {
            peer,
            difference: first_difference(&creds.layout, &theirs, peer),
        }),
        other => Err(out_of_order(remote, "a layout text", &other)),
    }
}

fn read(stream: &mut TcpStream, remote: Remote) -> Result<Record, TransportError> {
    read_record(stream).map_err(|e| match e {
        WireError::Io(source) => TransportError::HandshakeIo { remote, source },
        other => TransportError::Handshake {
            remote,
            detail: other.to_string(),
        },
    })
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

fn refuse_wrong_secret(stream: &mut TcpStream, me: NodeId, peer: NodeId) -> TransportError {
    refuse(
        stream,
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
fn refuse(stream: &mut TcpStream, code: RefusalCode, message: &str) {
    let refusal = Record::Refused(Refusal {
        code,
        message: message.to_string(),
    });
    if write_records(stream, &[refusal]).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Read until the other end closes: closing with unread data would send a reset, which
    // can destroy the refusal before the other end has read it.
    let _ = stream.set_read_timeout(Some(REFUSAL_LINGER));
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while drained < (4 << 20) {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
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

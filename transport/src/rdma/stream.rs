//! The connection handshake's byte stream over a fresh RDMA connection, so that RDMA nodes
//! prove the cluster secret and compare layouts with exactly the code TCP nodes use
//! (`handshake.rs`). Bytes travel as transport-only frames of at most [`INLINE_MAX`] bytes in
//! SENDs; anything else that arrives meanwhile (the peer's pool advert, once its side is done)
//! is kept for the progress loop.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::handshake::HandshakeLink;

use super::conn::{transport_frame, Conn, ConnError, STAGING_SLOTS};
use super::message::{self, Payload, INLINE_MAX, KIND_RDMA_HANDSHAKE};

/// Longest sleep between two looks at the completion queue while the handshake waits.
const WAIT_STEP: Duration = Duration::from_millis(5);

/// A [`Conn`] seen as a byte stream, for the handshake only.
pub(crate) struct HandshakeStream<'a> {
    conn: &'a Conn,
    /// Messages received and not yet looked at.
    stash: VecDeque<Vec<u8>>,
    /// Handshake bytes received and not yet read.
    bytes: VecDeque<u8>,
    read_limit: Duration,
    write_limit: Duration,
}

impl<'a> HandshakeStream<'a> {
    pub(crate) fn new(conn: &'a Conn) -> HandshakeStream<'a> {
        HandshakeStream {
            conn,
            stash: VecDeque::new(),
            bytes: VecDeque::new(),
            read_limit: Duration::from_secs(1),
            write_limit: Duration::from_secs(1),
        }
    }

    /// Takes one completion, or sleeps a little if none is there; fails once `until` passed.
    fn step(&mut self, until: Instant) -> io::Result<()> {
        let took = self
            .conn
            .pump_handshake(&mut self.stash)
            .map_err(|why| io::Error::new(io::ErrorKind::ConnectionReset, why))?;
        if took {
            return Ok(());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        self.conn.verbs().wait(left.min(WAIT_STEP));
        Ok(())
    }

    /// Moves the stashed messages' handshake bytes into `bytes`; keeps the others.
    fn sort_stash(&mut self) -> io::Result<()> {
        while let Some(raw) = self.stash.pop_front() {
            let decoded = message::decode(&raw, STAGING_SLOTS).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed message: {e}"),
                )
            })?;
            match decoded.payload {
                Payload::Inline { offset } if decoded.header.kind == KIND_RDMA_HANDSHAKE => {
                    let end = offset + decoded.header.payload_len();
                    self.bytes.extend(&raw[offset..end]);
                }
                _ => self.conn.keep_early(raw),
            }
        }
        Ok(())
    }
}

impl Read for HandshakeStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let until = Instant::now() + self.read_limit;
        while self.bytes.is_empty() {
            self.step(until)?;
            self.sort_stash()?;
        }
        let n = buf.len().min(self.bytes.len());
        for (to, from) in buf.iter_mut().zip(self.bytes.drain(..n)) {
            *to = from;
        }
        Ok(n)
    }
}

impl Write for HandshakeStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let chunk = &buf[..buf.len().min(INLINE_MAX)];
        self.conn
            .send_control(transport_frame(KIND_RDMA_HANDSHAKE, chunk))
            .map_err(|e| match e {
                ConnError::Closed => io::Error::from(io::ErrorKind::NotConnected),
                other => io::Error::new(io::ErrorKind::ConnectionReset, other.to_string()),
            })?;
        // Bytes count as written once posted (as TCP's count once the kernel has them).
        let until = Instant::now() + self.write_limit;
        while self.conn.has_backlog() {
            self.step(until)?;
        }
        Ok(chunk.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HandshakeLink for HandshakeStream<'_> {
    fn set_read_limit(&mut self, left: Duration) -> io::Result<()> {
        self.read_limit = left;
        Ok(())
    }

    fn set_write_limit(&mut self, left: Duration) -> io::Result<()> {
        self.write_limit = left;
        Ok(())
    }

    fn shutdown_write(&mut self) {}

    fn local_name(&self) -> String {
        "this node's RDMA address".to_string()
    }
}

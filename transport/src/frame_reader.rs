//! Reading a stream of frames from a connection through one reusable buffer, so that a burst of
//! small frames costs one read system call rather than two per frame.

use std::io;

use crate::frame::{Frame, FrameError, FrameRef, HEADER_LEN, MAX_PAYLOAD};

/// Room for several frames; must hold at least one whole frame of maximal size.
const READ_BUFFER_LEN: usize = 64 * 1024;
const _: () = assert!(READ_BUFFER_LEN >= HEADER_LEN + MAX_PAYLOAD);

/// Where the bytes come from: a blocking socket, a spinning one, or a slice in tests.
pub(crate) trait ByteSource {
    /// Reads at least one byte into `buf` (which is never empty), or returns `Ok(0)` at the end
    /// of the stream.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReceiveError {
    /// The peer closed the connection between two frames.
    #[error("closed by the other end")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error(
        "closed by the other end in the middle of a frame ({have} of {needed} bytes received)"
    )]
    ClosedMidFrame {
        /// Bytes of the unfinished part received.
        have: usize,
        /// Bytes that part needed.
        needed: usize,
    },
    /// The read itself failed (reset, timeout, ...).
    #[error("reading failed: {0}")]
    Io(#[source] io::Error),
    /// The header is invalid: the peer misbehaves.
    #[error("it sent a malformed frame: {0}")]
    Malformed(#[from] FrameError),
}

/// Splits a byte stream into checked frames.
pub(crate) struct FrameReader<S> {
    source: S,
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl<S: ByteSource> FrameReader<S> {
    pub(crate) fn new(source: S) -> Self {
        FrameReader {
            source,
            buf: vec![0u8; READ_BUFFER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn source(&self) -> &S {
        &self.source
    }

    /// The next frame, its payload lent from the read buffer until the next call; its header
    /// is checked before any payload is read.
    pub(crate) fn next_frame(&mut self) -> Result<FrameRef<'_>, ReceiveError> {
        self.ensure(HEADER_LEN)?;
        let mut header_bytes = [0u8; HEADER_LEN];
        header_bytes.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        let header = Frame::decode_header(&header_bytes)?;
        let total = HEADER_LEN + header.payload_len();
        self.ensure(total)?;
        let payload_start = self.start + HEADER_LEN;
        let payload_end = self.start + total;
        // The bytes stay where they are until the next call, which starts by consuming them.
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(FrameRef {
            kind: header.kind,
            flags: header.flags,
            id: header.id,
            arg: header.arg,
            payload: &self.buf[payload_start..payload_end],
        })
    }

    /// Makes at least `needed` (at most one whole frame) unconsumed bytes available.
    fn ensure(&mut self, needed: usize) -> Result<(), ReceiveError> {
        while self.end - self.start < needed {
            if self.start + needed > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.source.fill(&mut self.buf[self.end..]) {
                Ok(0) if self.end == self.start => return Err(ReceiveError::Closed),
                Ok(0) => {
                    return Err(ReceiveError::ClosedMidFrame {
                        have: self.end - self.start,
                        needed,
                    })
                }
                Ok(read) => self.end += read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReceiveError::Io(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Hands out the stream in chunks of the given sizes (cycled), like a socket would.
    struct Chunked {
        bytes: Vec<u8>,
        pos: usize,
        chunks: Vec<usize>,
        next_chunk: usize,
    }

    impl ByteSource for Chunked {
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let chunk = self.chunks[self.next_chunk % self.chunks.len()].max(1);
            self.next_chunk += 1;
            let n = chunk.min(buf.len()).min(self.bytes.len() - self.pos);
            buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn reader(bytes: Vec<u8>, chunks: Vec<usize>) -> FrameReader<Chunked> {
        FrameReader::new(Chunked {
            bytes,
            pos: 0,
            chunks,
            next_chunk: 0,
        })
    }

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD),
        )
            .prop_map(|(kind, flags, id, arg, payload)| Frame {
                kind,
                flags,
                id,
                arg,
                payload,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn frames_survive_any_chunking(
            frames in prop::collection::vec(frame_strategy(), 0..24),
            chunks in prop::collection::vec(1usize..9000, 1..8),
        ) {
            let mut bytes = Vec::new();
            for frame in &frames {
                frame.encode_into(&mut bytes);
            }
            let mut reader = reader(bytes, chunks);
            for frame in &frames {
                prop_assert_eq!(&reader.next_frame().unwrap().to_frame(), frame);
            }
            prop_assert!(matches!(reader.next_frame(), Err(ReceiveError::Closed)));
        }

        #[test]
        fn arbitrary_streams_end_in_an_error_without_panicking(
            bytes in prop::collection::vec(any::<u8>(), 0..20000),
            chunks in prop::collection::vec(1usize..5000, 1..4),
        ) {
            let mut reader = reader(bytes.clone(), chunks);
            let mut offset = 0;
            loop {
                match reader.next_frame() {
                    Ok(frame) => {
                        let frame = frame.to_frame();
                        // Whatever the reader accepts is exactly what the one-shot decoder sees.
                        let (expected, used) = Frame::decode(&bytes[offset..]).unwrap();
                        prop_assert_eq!(frame, expected);
                        offset += used;
                    }
                    Err(ReceiveError::Malformed(FrameError::PayloadTooLong { len })) => {
                        prop_assert!(len > MAX_PAYLOAD as u64);
                        break;
                    }
                    Err(ReceiveError::Closed) => {
                        prop_assert_eq!(offset, bytes.len());
                        break;
                    }
                    Err(ReceiveError::ClosedMidFrame { .. }) => {
                        prop_assert!(Frame::decode(&bytes[offset..]).is_err());
                        break;
                    }
                    Err(other) => prop_assert!(false, "unexpected error {other}"),
                }
            }
        }
    }

    #[test]
    fn an_oversized_header_is_refused_before_its_payload_is_awaited() {
        let mut bytes = crate::frame::FrameHeader {
            kind: 9,
            flags: 0,
            payload_len: u32::MAX,
            id: 1,
            arg: 2,
        }
        .encode()
        .to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut reader = reader(bytes, vec![7]);
        assert!(matches!(
            reader.next_frame(),
            Err(ReceiveError::Malformed(FrameError::PayloadTooLong { len })) if len == u64::from(u32::MAX)
        ));
    }
}

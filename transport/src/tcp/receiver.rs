//! The receiver thread of one (peer, channel): reads frames and hands them to the handler.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use crate::channel::{Channel, NodeId};
use crate::error::TransportError;
use crate::frame::{FIRST_RESERVED_KIND, KIND_HEARTBEAT};
use crate::frame_reader::{FrameReader, ReceiveError};

use super::connection::SocketSource;
use super::inner::MeshInner;

/// Starts the receiver of `peer`'s `channel`.
pub(crate) fn start_receiver(
    inner: &Arc<MeshInner>,
    peer: NodeId,
    channel: Channel,
    reader: FrameReader<SocketSource>,
) -> Result<(), TransportError> {
    let name = format!("xport-rx{peer}-{}", channel.index());
    inner.spawn(name, move |inner| receive(&inner, peer, channel, reader))
}

fn receive(
    inner: &MeshInner,
    peer: NodeId,
    channel: Channel,
    mut reader: FrameReader<SocketSource>,
) {
    let Some(link) = inner.links.get(&peer) else {
        return;
    };
    let spinning = matches!(reader.source(), SocketSource::Spinning(..));
    inner.raise_receiver(channel, spinning);
    loop {
        match reader.next_frame() {
            Ok(frame) => {
                inner.heard_from(link);
                if frame.kind < FIRST_RESERVED_KIND {
                    let delivered = panic::catch_unwind(AssertUnwindSafe(|| {
                        inner.handler.on_frame(peer, channel, frame)
                    }));
                    if delivered.is_err() {
                        // Nobody would read this connection any more: make that loud.
                        let why = format!(
                            "the frame handler panicked on a frame from node {peer} on the \
                             {channel} channel, so that connection can no longer be served"
                        );
                        misbehaved(inner, peer, &why);
                        return;
                    }
                } else if frame.kind != KIND_HEARTBEAT || channel != Channel::Control {
                    let why = format!(
                        "it sent a frame of reserved kind {:#06x} on the {channel} channel; \
                         treating it as misbehaving",
                        frame.kind
                    );
                    misbehaved(inner, peer, &why);
                    return;
                }
            }
            Err(ReceiveError::Malformed(error)) => {
                let why = format!(
                    "it sent a malformed frame on the {channel} channel ({error}); treating it \
                     as misbehaving"
                );
                misbehaved(inner, peer, &why);
                return;
            }
            Err(error) => {
                let why = format!("{channel} connection: {error}");
                // After a shutdown or a loss found elsewhere this is only the echo of our own
                // close, and declare_lost ignores it.
                inner.declare_lost(peer, &why);
                return;
            }
        }
    }
}

/// Logs a peer's protocol violation (the handler hears only that the peer is lost, and a
/// violation is worth a line of its own), then drops the peer.
fn misbehaved(inner: &MeshInner, peer: NodeId, why: &str) {
    if !inner.is_shutting_down() {
        eprintln!(
            "spanvm transport: node {} drops node {peer}: {why}",
            inner.me
        );
    }
    inner.declare_lost(peer, why);
}

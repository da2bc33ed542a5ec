//! The writer thread of one (peer, channel): writes out what senders queued when the socket
//! would not take it at once, so that senders never wait for a peer to read.

use std::io::{self, Write};
use std::sync::Arc;

use crate::channel::{Channel, NodeId};
use crate::error::TransportError;

use super::connection::Connection;
use super::inner::MeshInner;

/// Starts the writer of every (peer, channel). Must run before anything is sent: a send that
/// finds the socket full leaves the rest of its frame to this thread.
pub(crate) fn start_writers(inner: &Arc<MeshInner>) -> Result<(), TransportError> {
    for &peer in inner.links.keys() {
        for channel in Channel::ALL {
            let name = format!("xport-tx{peer}-{}", channel.index());
            inner.spawn(name, move |inner| write_out(&inner, peer, channel))?;
        }
    }
    Ok(())
}

fn write_out(inner: &MeshInner, peer: NodeId, channel: Channel) {
    let Some(link) = inner.links.get(&peer) else {
        return;
    };
    let conn = link.conn(channel);
    let mut batch = Vec::new();
    while conn.next_batch(&mut batch).is_some() {
        if let Err(error) = write_patiently(conn, &batch) {
            // After a close (shutdown, or the loss found elsewhere) this is only its echo,
            // and declare_lost ignores it.
            let why = format!("sending on the {channel} channel failed: {error}");
            inner.declare_lost(peer, &why);
            return;
        }
        batch.clear();
    }
}

/// Writes all of `bytes`, however long the peer takes to read them. Whether a slow peer is
/// alive is the watchdog's call (from what arrives from it), not this thread's: the socket's
/// write timeout only makes it look up regularly to see whether the connection was closed.
fn write_patiently(conn: &Connection, bytes: &[u8]) -> io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        match conn.stream().write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => rest = &rest[written..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if conn.is_closed() {
                    return Err(io::Error::other("the connection was closed"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

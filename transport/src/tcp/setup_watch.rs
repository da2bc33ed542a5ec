//! Watching the connections setup has made so far: a peer that connected and then went away
//! (crashed, killed) while the mesh is still forming ends setup at once as a lost peer, instead
//! of the node waiting out the connect timeout for a mesh that can no longer complete.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::channel::NodeId;

/// How often the established connections are looked at.
const WATCH_PERIOD: Duration = Duration::from_millis(50);

/// The connections setup made so far, and the first peer found gone.
#[derive(Default)]
pub(crate) struct SetupWatch {
    established: Mutex<Vec<(NodeId, TcpStream)>>,
    lost: Mutex<Option<NodeId>>,
    over: AtomicBool,
}

impl SetupWatch {
    /// Watches `stream` (a handle on an authenticated connection to `peer`) from now on.
    pub(crate) fn add(&self, peer: NodeId, stream: &TcpStream) {
        // Without a handle the connection is only not watched; the barrier still sees it die.
        if let Ok(handle) = stream.try_clone() {
            self.established
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((peer, handle));
        }
    }

    /// The peer found gone, if any.
    pub(crate) fn lost(&self) -> Option<NodeId> {
        *self.lost.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends [`SetupWatch::watch`].
    pub(crate) fn finish(&self) {
        self.over.store(true, Ordering::Release);
    }

    /// Until [`SetupWatch::finish`], looks at every established connection each period; when
    /// one was closed or reset by its peer, records the peer and sets `abandon`, which ends
    /// the dialing and accepting sides of setup.
    pub(crate) fn watch(&self, abandon: &AtomicBool) {
        while !self.over.load(Ordering::Acquire) && !abandon.load(Ordering::Acquire) {
            thread::sleep(WATCH_PERIOD);
            let gone = {
                let established = self
                    .established
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                established
                    .iter()
                    .find(|(_, stream)| peer_went_away(stream))
                    .map(|&(peer, _)| peer)
            };
            if let Some(peer) = gone {
                *self.lost.lock().unwrap_or_else(PoisonError::into_inner) = Some(peer);
                abandon.store(true, Ordering::Release);
                return;
            }
        }
    }
}

/// Whether the other end closed (FIN) or reset the connection. `POLLRDHUP` reports a close
/// even behind unread data (a peer that sent heartbeats, then died).
fn peer_went_away(stream: &TcpStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one live pollfd on a descriptor `stream` owns, count 1, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

//! The threads a mesh starts, so that its shutdown can wake and wait for them.

use std::sync::{Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use crate::channel::NodeId;
use crate::error::TransportError;

/// The transport's threads of one mesh.
#[derive(Default)]
pub(crate) struct Threads {
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Threads {
    /// Starts a thread that [`Threads::join_all`] will wait for.
    pub(crate) fn spawn(
        &self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), TransportError> {
        let handle = thread::Builder::new()
            .name(name)
            .spawn(body)
            .map_err(|source| TransportError::Thread { source })?;
        self.handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
        Ok(())
    }

    /// Takes every thread started so far, unparks them all and waits for all but the calling
    /// one, reporting (as node `me`) each that panicked.
    pub(crate) fn join_all(&self, me: NodeId) {
        let threads =
            std::mem::take(&mut *self.handles.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in &threads {
            handle.thread().unpark();
        }
        let current = thread::current().id();
        for handle in threads {
            if handle.thread().id() == current {
                continue;
            }
            let name = handle.thread().name().unwrap_or("?").to_string();
            if handle.join().is_err() {
                eprintln!(
                    "spanvm transport: node {me}: thread {name} panicked (in a frame handler?)"
                );
            }
        }
    }
}

//! Asking a node for its figures over its control socket.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::stats::report::NodeReport;
use crate::stats::wire::{self, WireError};
use crate::stats::{socket_path, SocketPathError};

/// How long a node may take to answer (its snapshot walks every page's fault counter once).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a node's figures could not be had.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The socket path cannot be derived from the config.
    #[error(transparent)]
    SocketPath(#[from] SocketPathError),
    /// Nothing is at the socket path.
    #[error("no node is running from {config}: there is no control socket {socket}")]
    NotRunning {
        /// The node's config file.
        config: PathBuf,
        /// The socket path.
        socket: PathBuf,
    },
    /// A socket file is there but nothing listens on it.
    #[error(
        "no node is running from {config}: {socket} was left behind by a node that was killed \
         (the node replaces it when it starts again)"
    )]
    Stale {
        /// The node's config file.
        config: PathBuf,
        /// The socket path.
        socket: PathBuf,
    },
    /// Connecting failed for another reason (permissions, not a socket).
    #[error("cannot connect to the node's control socket {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("the node at {socket} did not answer: {source}")]
    Exchange {
        /// The socket path.
        socket: PathBuf,
        /// The OS error (a timeout after 5 s among them).
        source: std::io::Error,
    },
    /// The answer is not one this spanvm can read.
    #[error("{socket}: {source}")]
    Answer {
        /// The socket path.
        socket: PathBuf,
        /// What is wrong with it.
        source: WireError,
    },
}

/// The figures of the node that runs from `config`.
pub fn query_config(config: &Path) -> Result<NodeReport, QueryError> {
    let socket = socket_path(config)?;
    query(config, &socket)
}

/// The figures of the node of `config` listening on `socket`.
pub fn query(config: &Path, socket: &Path) -> Result<NodeReport, QueryError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        ErrorKind::NotFound => QueryError::NotRunning {
            config: config.to_path_buf(),
            socket: socket.to_path_buf(),
        },
        ErrorKind::ConnectionRefused => QueryError::Stale {
            config: config.to_path_buf(),
            socket: socket.to_path_buf(),
        },
        _ => QueryError::Connect {
            socket: socket.to_path_buf(),
            source,
        },
    })?;
    let exchange = |source| QueryError::Exchange {
        socket: socket.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(exchange)?;
    stream
        .set_write_timeout(Some(ANSWER_TIMEOUT))
        .map_err(exchange)?;
    stream
        .write_all(wire::request().as_bytes())
        .map_err(exchange)?;
    let mut answer = Vec::new();
    // One byte more than allowed, so that an oversized answer is seen as such.
    let limit = u64::try_from(wire::MAX_ANSWER_BYTES + 1).unwrap_or(u64::MAX);
    (&mut stream)
        .take(limit)
        .read_to_end(&mut answer)
        .map_err(exchange)?;
    wire::decode(&answer).map_err(|source| QueryError::Answer {
        socket: socket.to_path_buf(),
        source,
    })
}

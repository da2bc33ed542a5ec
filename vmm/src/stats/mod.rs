//! Live statistics: a running node answers on a local control socket (a Unix domain socket
//! next to its config file), `spanvm stats` asks one node, and `spanvm cluster
//! --stats-interval` asks every node of its cluster, over and over.
//!
//! The node keeps no history: it answers with its counters as they are (every one of them an
//! atomic the vCPUs, the DSM and forwarding update anyway, read without a lock), and rates are
//! the client's business: `spanvm stats --interval` and the cluster's summary lines take two
//! answers and divide by the time between them; a single answer gives averages since start.

pub mod client;
pub mod cluster_watch;
pub mod command;
pub mod control_socket;
pub mod render;
pub mod report;
pub mod server;
pub mod sources;
pub mod wire;

use std::path::{Path, PathBuf};

/// Longest path a Unix domain socket address can hold (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// What the control socket's file name adds to the config file's.
pub const SOCKET_SUFFIX: &str = ".stats.sock";

/// Why the control socket path of a config cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    /// The config file cannot be found (its absolute path is what names the socket).
    #[error("cannot find the node config {config}: {source}")]
    Config {
        /// The path given.
        config: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path is longer than a Unix socket address allows.
    #[error(
        "the control socket path {path} has {len} bytes, more than the {MAX_SOCKET_PATH} a Unix \
         socket address can hold: move the node's config file to a shorter path"
    )]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

/// The control socket of the node whose config file is `config`: the config file's absolute
/// path with symbolic links resolved, plus [`SOCKET_SUFFIX`] (`/etc/spanvm/node1.toml` ->
/// `/etc/spanvm/node1.toml.stats.sock`). The node and `spanvm stats` derive it alike from the
/// same file, however each was given the path.
pub fn socket_path(config: &Path) -> Result<PathBuf, SocketPathError> {
    let absolute = std::fs::canonicalize(config).map_err(|source| SocketPathError::Config {
        config: config.to_path_buf(),
        source,
    })?;
    let mut name = absolute.into_os_string();
    name.push(SOCKET_SUFFIX);
    let path = PathBuf::from(name);
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(SocketPathError::TooLong { path, len });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_sits_next_to_the_resolved_config() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("node-1.toml");
        std::fs::write(&config, "").unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&config, &link).unwrap();
        let expected = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("node-1.toml.stats.sock");
        assert_eq!(socket_path(&config).unwrap(), expected);
        assert_eq!(socket_path(&link).unwrap(), expected);
        assert!(matches!(
            socket_path(&dir.path().join("absent.toml")),
            Err(SocketPathError::Config { .. })
        ));
        let deep = dir.path().join("d".repeat(100));
        std::fs::create_dir(&deep).unwrap();
        std::fs::write(deep.join("n.toml"), "").unwrap();
        assert!(matches!(
            socket_path(&deep.join("n.toml")),
            Err(SocketPathError::TooLong { .. })
        ));
    }
}

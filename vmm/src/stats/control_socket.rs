//! The file of a node's control socket: claimed at start (a stale one left by a killed node is
//! replaced, a live one is refused), removed when the node ends.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the control socket cannot be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// A running process answers on the path: another node runs from this config file.
    #[error(
        "a running node (or another program) already answers on {path}: is this node running \
         already? Stop it first, or give this node its own config file"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket sits at the path; spanvm does not delete it.
    #[error("{path} exists and is not a socket: remove or rename it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket could not be created (or a stale one removed).
    #[error("cannot create the control socket {path}: {source}")]
    Create {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A bound control socket; its file is removed when this is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we made, so that the drop removes that file and not
    /// one another node put there after ours was deleted behind our back.
    identity: Option<(u64, u64)>,
}

fn create_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClaimError + '_ {
    move |source| ClaimError::Create {
        path: path.to_path_buf(),
        source,
    }
}

impl ControlSocket {
    /// Binds a socket at `path`, replacing a stale socket that no process answers on.
    pub fn claim(path: &Path) -> Result<ControlSocket, ClaimError> {
        let listener = match UnixListener::bind(path) {
            Ok(listener) => listener,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                let meta = std::fs::symlink_metadata(path).map_err(create_err(path))?;
                if !meta.file_type().is_socket() {
                    return Err(ClaimError::NotASocket {
                        path: path.to_path_buf(),
                    });
                }
                match UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(ClaimError::InUse {
                            path: path.to_path_buf(),
                        })
                    }
                    // Nobody listens: a node that was killed (SIGKILL) left it behind.
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path).map_err(create_err(path))?;
                        UnixListener::bind(path).map_err(create_err(path))?
                    }
                    Err(source) => return Err(create_err(path)(source)),
                }
            }
            Err(source) => return Err(create_err(path)(source)),
        };
        let socket = ControlSocket {
            listener,
            path: path.to_path_buf(),
            identity: file_identity(path),
        };
        // The figures (guest-physical addresses of hot pages among them) are for the user who
        // runs the node; the socket is created before this, but nothing answers on it yet.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(create_err(path))?;
        socket
            .listener
            .set_nonblocking(true)
            .map_err(create_err(path))?;
        Ok(socket)
    }

    /// The bound listener (non-blocking).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.identity.is_some() && file_identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_replaces_a_stale_socket_refuses_a_live_one_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml.stats.sock");
        // A stale socket: bound, then its listener gone without removing the file.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let socket = ControlSocket::claim(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        match ControlSocket::claim(&path) {
            Err(e @ ClaimError::InUse { .. }) => {
                assert!(e.to_string().contains("already answers"), "{e}");
            }
            other => panic!("a live socket was not refused: {:?}", other.err()),
        }
        drop(socket);
        assert!(!path.exists(), "the socket file outlived its node");
    }

    #[test]
    fn leaves_a_file_it_did_not_make() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml.stats.sock");
        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(
            ControlSocket::claim(&path),
            Err(ClaimError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        // Ours deleted and another put in its place: the drop leaves the newcomer alone.
        let other = dir.path().join("m.sock");
        let socket = ControlSocket::claim(&other).unwrap();
        std::fs::remove_file(&other).unwrap();
        std::fs::write(&other, "someone else's").unwrap();
        drop(socket);
        assert!(other.exists());
    }
}

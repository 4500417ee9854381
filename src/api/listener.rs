//! Binding the operators' listeners: the admin API's Unix socket (made safely, mode 0600,
//! removed at stop) or TCP, and Prometheus's metrics listener.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::config::AdminEndpoint;

/// Why a listener could not be opened; each names its key.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{key}: cannot listen on {address}: {source}")]
    Tcp {
        key: &'static str,
        address: SocketAddr,
        source: io::Error,
    },
    #[error("admin.socket: cannot make the socket `{}`: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error(
        "admin.socket: `{}` exists and is not a socket; remove it or choose another path",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error(
        "admin.socket: another process serves `{}` (is the gateway running already?)",
        .0.display()
    )]
    InUse(PathBuf),
}

/// The admin API's listener.
pub enum AdminListener {
    Tcp(TcpListener),
    Socket(AdminSocket),
}

impl AdminListener {
    /// Binds `endpoint`: a TCP address, or a Unix socket made by [`AdminSocket::bind`].
    pub async fn bind(endpoint: &AdminEndpoint) -> Result<AdminListener, BindError> {
        match endpoint {
            AdminEndpoint::Tcp(address) => Ok(AdminListener::Tcp(
                bind_tcp("admin.listen", *address).await?,
            )),
            AdminEndpoint::Socket(path) => Ok(AdminListener::Socket(AdminSocket::bind(path)?)),
        }
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            AdminListener::Tcp(listener) => listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "TCP".into()),
            AdminListener::Socket(socket) => format!("unix:{}", socket.path.display()),
        }
    }
}

pub async fn bind_tcp(key: &'static str, address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError::Tcp {
            key,
            address,
            source,
        })
}

/// The admin API's Unix socket. Whoever may open the file may use the API, so the file is
/// 0600 (the gateway's user; root) from its first instant, and it is removed when this is
/// dropped (at stop), unless another process has replaced it meanwhile.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's device and inode, to remove only our own.
    file: (u64, u64),
}

impl AdminSocket {
    /// Makes the socket at `path`, replacing a stale one (left by a gateway that was killed),
    /// never a live one or a file that is not a socket. Needs a Tokio runtime.
    ///
    /// bind() makes the file with the process's umask; a chmod after it would leave a moment in
    /// which another user could connect. So the socket is bound inside a new private directory
    /// (0700) beside `path`, given mode 0600 there, and renamed into place, which also replaces
    /// a stale socket atomically.
    pub fn bind(path: &Path) -> Result<AdminSocket, BindError> {
        let error = |source| BindError::Socket {
            path: path.to_owned(),
            source,
        };
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        // Like the store's directory: made if missing, private to the gateway's user.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(error)?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // Stale only when nobody answers on it; any other failure (no permission, ...)
                // is not a reason to take it over.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(BindError::InUse(path.to_owned())),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(error(e)),
                }
            }
            Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(e)),
        }
        let private = parent.join(format!(".{:08x}", rand::random::<u32>()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(error)?;
        let temporary = private.join("s");
        let bound = bind_private(&temporary, path);
        let _ = std::fs::remove_dir(&private);
        let listener = bound.map_err(error)?;
        let meta = std::fs::symlink_metadata(path).map_err(error)?;
        Ok(AdminSocket {
            listener,
            path: path.to_owned(),
            file: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds at `temporary` (in a private directory), sets 0600 and renames it to `path`.
fn bind_private(temporary: &Path, path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(temporary)?;
    let placed = std::fs::set_permissions(temporary, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(temporary, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(temporary);
        return Err(e);
    }
    Ok(listener)
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.file
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl super::serve::Listener for AdminSocket {
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<UnixStream> {
        Ok(self.listener.accept().await?.0)
    }

    fn try_write(io: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
        io.try_write(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_private_replaces_a_stale_one_and_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/admin.sock");
        let socket = AdminSocket::bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Nothing but the socket is left beside it (the private directory is gone).
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("admin.sock")]);

        // A live socket is not taken over.
        assert!(matches!(AdminSocket::bind(&path), Err(BindError::InUse(_))));
        drop(socket);
        assert!(!path.exists(), "removed at stop");

        // A stale socket (its process gone without removing it) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let socket = AdminSocket::bind(&path).unwrap();
        assert!(UnixStream::connect(&path).await.is_ok());
        drop(socket);

        // A file that is not a socket is left alone.
        std::fs::write(&path, "not a socket").unwrap();
        assert!(matches!(
            AdminSocket::bind(&path),
            Err(BindError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }
}

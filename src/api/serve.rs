//! The connection loop of every listener (the API, the admin API, metrics), in place of
//! `axum::serve`, which sets no limits on connections: here a client has `http.header_read_timeout` to send each request's header (so clients that
//! trickle headers byte by byte, slowloris, or sit idle are disconnected), a header is at most
//! `http.max_header_bytes` and `http.max_headers` lines (else 431), at most
//! `http.max_connections` connections are served at once (one more is answered 503 and
//! closed), and TLS is optional (`http.tls`, the API only). HTTP/1.1, as `axum::serve` with
//! axum's default features. The loop takes TCP and Unix sockets alike ([`Listener`]).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::{HttpConfig, HttpTlsConfig};
use crate::metrics;

/// Why `http.tls` cannot be used; each names its key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("http.tls.cert_file: cannot read certificates from `{}`: {source}", path.display())]
    Cert {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("http.tls.cert_file: `{}` holds no certificate", .0.display())]
    NoCert(PathBuf),
    #[error("http.tls.key_file: cannot read a private key from `{}`: {source}", path.display())]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("http.tls: the certificate and key do not go together: {0}")]
    Config(#[from] rustls::Error),
}

/// Reads the certificate chain and key of `tls` into a server configuration (aws-lc-rs, TLS
/// 1.2 and 1.3, HTTP/1.1 by ALPN).
pub fn load_tls(tls: &HttpTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|source| TlsError::Key {
        path: tls.key_file.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let cert_error = |source| TlsError::Cert {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(cert_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(cert_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(path.to_owned()));
    }
    Ok(certs)
}

/// A socket the loop accepts connections on: TCP, or a Unix socket (the admin API's default).
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// Writes what the socket takes at once, never waiting (the 503 of a full server).
    fn try_write(io: &Self::Io, bytes: &[u8]) -> io::Result<usize>;
}

impl Listener for TcpListener {
    type Io = TcpStream;

    async fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Answers are small and whole: no reason to hold them back (Nagle).
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn try_write(io: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
        io.try_write(bytes)
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<UnixStream> {
        Ok(UnixListener::accept(self).await?.0)
    }

    fn try_write(io: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
        io.try_write(bytes)
    }
}

/// What every connection needs: the HTTP settings, TLS, the app, and the shutdown signal.
struct Server {
    /// Which listener: `api`, `admin` or `metrics` (the `listener` label of the connection
    /// metrics, and logs).
    name: &'static str,
    http1: http1::Builder,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    app: axum::Router,
    shutdown: CancellationToken,
    open: AtomicUsize,
}

/// Serves `app` on `listener` (named `name`) until `shutdown`, then lets the requests in
/// progress finish (each connection closes after its current answer) and returns.
pub async fn serve<L: Listener>(
    name: &'static str,
    listener: L,
    app: axum::Router,
    config: &HttpConfig,
    tls: Option<Arc<ServerConfig>>,
    shutdown: CancellationToken,
) {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(config.max_header_bytes)
        .max_headers(config.max_headers);
    let server = Arc::new(Server {
        name,
        http1,
        tls: tls.map(TlsAcceptor::from),
        handshake_timeout: config.header_read_timeout,
        app,
        shutdown: shutdown.clone(),
        open: AtomicUsize::new(0),
    });
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    accept_failed(name, error).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse::<L>(name, stream, server.tls.is_some());
            continue;
        };
        let server = server.clone();
        connections.spawn(async move { server.connection(stream, slot).await });
    }
    connections.close();
    connections.wait().await;
}

/// Too many open files (or another resource) is worth a pause rather than a hot loop; a
/// connection the client reset before it was accepted is nothing.
async fn accept_failed(name: &'static str, error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    warn!(%error, listener = name, "cannot accept a connection; pausing for a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Every connection slot is taken: answer 503 if the socket takes it at once (never wait on a
/// client here), and close. Over TLS a plain answer would be noise, so only close.
fn refuse<L: Listener>(name: &'static str, stream: L::Io, tls: bool) {
    metrics::http_connection_closed(name, "too_many_connections");
    debug!(
        listener = name,
        "connection refused: http.max_connections are open"
    );
    if !tls {
        const BODY: &str = "{\"error\":{\"code\":\"too_many_connections\",\
            \"message\":\"the gateway serves http.max_connections connections now; retry later\"}}";
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        let _ = L::try_write(&stream, answer.as_bytes());
    }
}

impl Server {
    async fn connection<I>(self: Arc<Self>, stream: I, _slot: OwnedSemaphorePermit)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = self.name;
        metrics::http_connections(name, self.open.fetch_add(1, Ordering::Relaxed) + 1);
        match &self.tls {
            None => self.http(stream).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream));
                tokio::select! {
                    done = handshake => match done {
                        Ok(Ok(tls)) => self.http(tls).await,
                        Ok(Err(error)) => {
                            metrics::http_connection_closed(name, "tls_handshake");
                            debug!(%error, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::http_connection_closed(name, "tls_handshake");
                            debug!("TLS handshake took longer than http.header_read_timeout");
                        }
                    },
                    () = self.shutdown.cancelled() => {}
                }
            }
        }
        metrics::http_connections(name, self.open.fetch_sub(1, Ordering::Relaxed) - 1);
    }

    /// Serves HTTP/1.1 on one connection until the client closes it, a limit closes it, or
    /// shutdown (after the answer in progress).
    async fn http<I>(&self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = TowerToHyperService::new(self.app.clone());
        let connection = self.http1.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            if error.is_timeout() {
                metrics::http_connection_closed(self.name, "header_timeout");
            }
            debug!(%error, listener = self.name, "connection ended with an error");
        }
    }
}

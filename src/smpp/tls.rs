//! TLS towards a carrier (rustls with the aws-lc-rs provider): trust the system's roots or a
//! CA file, check the SMSC's name, and present a client certificate when the carrier wants one.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The key (under `tls`) and what is wrong with it.
    #[error("{key}: {problem}")]
    Config { key: &'static str, problem: String },
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
}

fn problem(key: &'static str, problem: impl ToString) -> TlsError {
    TlsError::Config {
        key,
        problem: problem.to_string(),
    }
}

/// A carrier's TLS client: the connector and the name its certificate must carry.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Tls {
    /// Loads what `config` names; `address` is the carrier's `host:port`.
    pub fn new(config: &TlsConfig, address: &str) -> Result<Tls, TlsError> {
        let server_name = server_name(config, address)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| problem("ca_file", e))?
            .with_root_certificates(roots(config.ca_file.as_deref())?);
        let client = match (&config.client_cert, &config.client_key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert, "client_cert")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| problem("client_key", format!("{}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| problem("client_key", e))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(problem("client_key", "must be set with client_cert")),
            (None, Some(_)) => return Err(problem("client_cert", "must be set with client_key")),
        };
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    /// The TLS handshake over a connected socket.
    pub async fn connect(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, TlsError> {
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(TlsError::Handshake)
    }
}

/// What is wrong with a carrier's TLS settings, each problem naming its key; for config checks.
pub fn check(config: &TlsConfig, address: &str) -> Vec<String> {
    match Tls::new(config, address) {
        Ok(_) => Vec::new(),
        Err(e) => vec![e.to_string()],
    }
}

fn server_name(config: &TlsConfig, address: &str) -> Result<ServerName<'static>, TlsError> {
    let name = match &config.server_name {
        Some(name) => name.clone(),
        None => host_of(address).to_owned(),
    };
    if name.is_empty() {
        return Err(problem(
            "server_name",
            "must be set when the address gives no host",
        ));
    }
    ServerName::try_from(name.clone()).map_err(|_| {
        problem(
            "server_name",
            format!("`{name}` is not a DNS name or IP address"),
        )
    })
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path, "ca_file")? {
                roots
                    .add(cert)
                    .map_err(|e| problem("ca_file", format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            // Unreadable system certificates are skipped; none at all is an error.
            let (added, _) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err(problem(
                    "ca_file",
                    "the system has no CA certificates: set ca_file",
                ));
            }
        }
    }
    Ok(roots)
}

fn certificates(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| problem(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(problem(
            key,
            format!("{}: no PEM certificate in it", path.display()),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_to_check_comes_from_the_address_unless_given() {
        let config = TlsConfig::default();
        assert_eq!(
            server_name(&config, "smsc.example.net:3550").unwrap(),
            ServerName::try_from("smsc.example.net").unwrap()
        );
        assert!(matches!(
            server_name(&config, "127.0.0.1:3550").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name(&config, "[::1]:3550").unwrap(),
            ServerName::IpAddress(_)
        ));
        let named = TlsConfig {
            server_name: Some("smpp.carrier.example".into()),
            ..TlsConfig::default()
        };
        assert_eq!(
            server_name(&named, "10.0.0.1:3550").unwrap(),
            ServerName::try_from("smpp.carrier.example").unwrap()
        );
    }

    fn test_file(name: &str) -> Option<std::path::PathBuf> {
        Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/tls")
                .join(name),
        )
    }

    #[test]
    fn a_ca_file_and_a_client_certificate_load() {
        let config = TlsConfig {
            ca_file: test_file("ca.pem"),
            client_cert: test_file("server.pem"),
            client_key: test_file("server-key.pem"),
            server_name: None,
        };
        assert!(check(&config, "localhost:3550").is_empty());
        let key_is_no_cert = TlsConfig {
            client_cert: test_file("server-key.pem"),
            ..config
        };
        assert!(check(&key_is_no_cert, "localhost:3550")[0].starts_with("client_cert:"));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let missing = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        let problems = check(&missing, "smsc:3550");
        assert!(
            problems[0].starts_with("ca_file: /nonexistent/ca.pem"),
            "{problems:?}"
        );
        let half = TlsConfig {
            client_cert: Some("/nonexistent/cert.pem".into()),
            ca_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/ca.pem").into()),
            ..TlsConfig::default()
        };
        assert!(check(&half, "smsc:3550")[0].starts_with("client_key:"));
        let ip = TlsConfig {
            server_name: Some("not a name".into()),
            ..half
        };
        assert!(check(&ip, "smsc:3550")[0].starts_with("server_name:"));
    }
}

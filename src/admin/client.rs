//! The command line's way to the running daemon's admin API: its Unix socket (`admin.socket`,
//! by default beside the store), or TCP (`admin.listen`) with the token. reqwest speaks HTTP
//! over a Unix socket itself, so this is the same client as the webhooks'.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::AdminError;
use crate::config::{AdminEndpoint, Config, Secret};

/// How long the daemon has to answer one command.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A client of one daemon's admin API.
pub struct AdminClient {
    client: reqwest::Client,
    /// `http://localhost` on the socket (its Host is checked), `http://<address>` on TCP.
    base: String,
    token: Option<Secret>,
    /// Where it connects, for messages.
    endpoint: String,
}

impl AdminClient {
    /// The admin API that `config` describes; `token` (e.g. from `SMSGW_ADMIN_TOKEN`) is sent
    /// instead of `admin.token` when given.
    pub fn new(config: &Config, token: Option<Secret>) -> Result<AdminClient, AdminError> {
        let endpoint = config.admin_endpoint().ok_or(AdminError::Disabled)?;
        // Never through a proxy from the environment: the token is for the daemon only.
        let builder = reqwest::Client::builder().no_proxy().timeout(TIMEOUT);
        let (builder, base, described) = match &endpoint {
            AdminEndpoint::Socket(path) => (
                builder.unix_socket(path.as_path()),
                "http://localhost".to_owned(),
                format!("unix:{}", path.display()),
            ),
            AdminEndpoint::Tcp(address) => {
                let base = format!("http://{address}");
                (builder, base.clone(), base)
            }
        };
        let client = builder.build().map_err(AdminError::Client)?;
        Ok(AdminClient {
            client,
            base,
            token: token.or_else(|| config.admin.token.clone()),
            endpoint: described,
        })
    }

    /// Where it connects: `unix:<path>` or `http://<address>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub async fn get(&self, path: &str) -> Result<Value, AdminError> {
        self.send(self.client.get(self.url(path))).await
    }

    /// A POST without a body (`/admin/carriers/x/pause`, ...).
    pub async fn post(&self, path: &str) -> Result<Value, AdminError> {
        self.send(self.client.post(self.url(path))).await
    }

    /// A POST with a JSON body.
    pub async fn post_json<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Value, AdminError> {
        self.send(self.client.post(self.url(path)).json(body)).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends the request; a 2xx answer's JSON, or why not.
    async fn send(&self, mut request: reqwest::RequestBuilder) -> Result<Value, AdminError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        let response = request.send().await.map_err(|source| {
            if permission_denied(&source) {
                AdminError::NoPermission(self.endpoint.clone())
            } else {
                AdminError::Unreachable {
                    url: self.endpoint.clone(),
                    source,
                }
            }
        })?;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(AdminError::Refused { status, body });
        }
        serde_json::from_str(&body)
            .map_err(|e| AdminError::Invalid(format!("the admin API answered no JSON: {e}")))
    }
}

/// Whether the socket (or its directory) may not be opened by this user: the usual mistake
/// under systemd, worth another message than "is the gateway running?".
fn permission_denied(error: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

//! Test harness: the real daemon (library `run` on a port-0 listener, a temporary SQLite file)
//! against the real SMSC simulator over loopback, and a webhook receiver.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod pg;

use smsgw::config::Config;
use smsgw::sim::{SimConfig, SimHandle};

pub const KEY_A: &str = "key-of-account-a";
pub const KEY_B: &str = "key-of-account-b";
/// Account c may send service messages to opted-out numbers and follows number changes.
pub const KEY_C: &str = "key-of-account-c";
pub const HOOK_SECRET: &str = "webhook-secret-of-a";
/// The `[webhooks]` key that lets webhooks reach the tests' receivers on loopback, which are
/// internal and so refused by default.
pub const ALLOW_LOOPBACK: &str = r#"allow_internal = ["127.0.0.1/32"]"#;

/// A simulated carrier that stops when dropped.
pub struct Sim {
    pub handle: SimHandle,
    stop: CancellationToken,
}

impl Sim {
    pub async fn start(config: SimConfig) -> Sim {
        Sim::start_on("127.0.0.1:0".parse().unwrap(), config).await
    }

    pub async fn start_on(address: SocketAddr, config: SimConfig) -> Sim {
        let listener = TcpListener::bind(address).await.unwrap();
        let stop = CancellationToken::new();
        let handle = smsgw::sim::start(listener, config, stop.clone());
        Sim { handle, stop }
    }

    pub fn address(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Simulator settings for tests: quick receipts.
pub fn sim_config() -> SimConfig {
    SimConfig {
        receipt_delay: Duration::from_millis(50),
        ..SimConfig::default()
    }
}

/// A running gateway.
pub struct Gateway {
    pub url: String,
    /// The admin API's base URL: `http://localhost` on the Unix socket (the default, beside the
    /// store), `http://<address>` on TCP; requests go through `admin_client`.
    pub admin_url: String,
    pub admin_client: reqwest::Client,
    /// `http://<metrics.listen>` (config_text listens on a free port); empty when not set.
    pub metrics_url: String,
    pub db: PathBuf,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), smsgw::RunError>>>,
    pub client: reqwest::Client,
}

/// The configuration every test starts from: two accounts, one carrier at `carrier`.
pub fn config_text(db: &Path, carrier: SocketAddr, hooks: Option<&str>) -> String {
    let hook_lines = hooks
        .map(|url| format!("webhook_url = \"{url}\"\nwebhook_secret = \"{HOOK_SECRET}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
        [store]
        path = "{db}"
        [messages]
        retry_schedule = ["200ms"]
        [webhooks]
        retry_schedule = ["100ms"]
        {ALLOW_LOOPBACK}
        [privacy]
        pseudonym_key = "test-pseudonym-key-0123456789"
        [policy]
        suspect_after = 2
        [metrics]
        listen = "127.0.0.1:0"
        [[accounts]]
        name = "a"
        api_keys = ["{hash_a}"]
        senders = ["iP1", "+46700000001"]
        {hook_lines}
        [[accounts]]
        name = "b"
        api_keys = ["{hash_b}"]
        [[accounts]]
        name = "c"
        api_keys = ["{hash_c}"]
        senders = ["Shop", "+46700000003"]
        service_messages = true
        follow_number_changes = true
        [[carriers]]
        name = "sim"
        address = "{carrier}"
        window = 10
        rate_per_second = 2000
        reconnect_min = "50ms"
        reconnect_max = "500ms"
        response_timeout = "3s"
        "#,
        db = db.display(),
        hash_a = smsgw::api::auth::hash_key(KEY_A),
        hash_b = smsgw::api::auth::hash_key(KEY_B),
        hash_c = smsgw::api::auth::hash_key(KEY_C),
    )
}

pub fn parse_config(text: &str) -> Config {
    Config::parse(text, Path::new("test.toml")).expect("test config is valid")
}

impl Gateway {
    pub async fn start(config: Config) -> Gateway {
        Gateway::start_with(config, "http", reqwest::Client::new(), no_reloads()).await
    }

    /// A gateway that takes new configurations from `reloads`, as SIGHUP gives them.
    pub async fn start_with_reloads(
        config: Config,
        reloads: tokio::sync::mpsc::Receiver<Config>,
    ) -> Gateway {
        Gateway::start_with(config, "http", reqwest::Client::new(), reloads).await
    }

    /// A gateway whose configuration has `http.tls`, and a client that trusts `cert_pem` only.
    pub async fn start_tls(config: Config, cert_pem: &[u8]) -> Gateway {
        let cert = reqwest::Certificate::from_pem(cert_pem).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([cert])
            .build()
            .unwrap();
        Gateway::start_with(config, "https", client, no_reloads()).await
    }

    async fn start_with(
        mut config: Config,
        scheme: &str,
        client: reqwest::Client,
        reloads: tokio::sync::mpsc::Receiver<Config>,
    ) -> Gateway {
        // The daemon's own binding, on a free port; the admin API where the config puts it.
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        let listeners = smsgw::Listeners::bind(&config).await.unwrap();
        let url = format!("{scheme}://{}", listeners.http.local_addr().unwrap());
        let (admin_url, admin_client) = match &listeners.admin {
            Some(smsgw::api::listener::AdminListener::Socket(socket)) => (
                "http://localhost".to_owned(),
                reqwest::Client::builder()
                    .unix_socket(socket.path())
                    .build()
                    .unwrap(),
            ),
            Some(smsgw::api::listener::AdminListener::Tcp(listener)) => (
                format!("http://{}", listener.local_addr().unwrap()),
                reqwest::Client::new(),
            ),
            None => (String::new(), reqwest::Client::new()),
        };
        let metrics_url = listeners
            .metrics
            .as_ref()
            .map(|l| format!("http://{}", l.local_addr().unwrap()))
            .unwrap_or_default();
        let db = config.store.path.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(smsgw::run_with_reloads(
            config,
            listeners,
            shutdown.clone(),
            reloads,
        ));
        let gateway = Gateway {
            url,
            admin_url,
            admin_client,
            metrics_url,
            db,
            shutdown,
            task: Some(task),
            client,
        };
        gateway.wait_until_serving().await;
        gateway
    }

    /// The metrics text, from the metrics listener.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.metrics_url))
            .send()
            .await
            .expect("the metrics listener answers");
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// The API's socket address, for raw TCP clients.
    pub fn address(&self) -> SocketAddr {
        let port = self.url.rsplit(':').next().unwrap().parse().unwrap();
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn wait_until_serving(&self) {
        for _ in 0..200 {
            if let Ok(r) = self
                .client
                .get(format!("{}/healthz", self.url))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the gateway did not start serving");
    }

    /// Waits until at least one bind is up (`/readyz` answers 200).
    pub async fn wait_ready(&self) {
        eventually(
            Duration::from_secs(10),
            "the gateway to be ready",
            || async {
                let r = self
                    .client
                    .get(format!("{}/readyz", self.url))
                    .send()
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await;
    }

    /// Stops the gateway as SIGTERM does and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the gateway stops within 20 s")
                .unwrap()
                .expect("the gateway stops cleanly");
        }
    }

    /// Sends an API request with `key` and returns the status and the JSON answer.
    async fn call(&self, request: reqwest::RequestBuilder, key: &str) -> (u16, Value) {
        let r = request.bearer_auth(key).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, key: &str, body: &Value) -> (u16, Value) {
        self.post_json(key, "/v1/messages", body).await
    }

    pub async fn post_raw(
        &self,
        key: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (u16, HeaderMap, Value) {
        let mut request = self
            .client
            .post(format!("{}/v1/messages", self.url))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, key: &str, path: &str) -> (u16, Value) {
        self.call(self.client.get(format!("{}{path}", self.url)), key)
            .await
    }

    pub async fn post_json(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        let request = self.client.post(format!("{}{path}", self.url)).json(body);
        self.call(request, key).await
    }

    pub async fn post_text(&self, key: &str, path: &str, body: &str) -> (u16, Value) {
        let request = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", "text/csv")
            .body(body.to_owned());
        self.call(request, key).await
    }

    pub async fn get_text(&self, key: &str, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    pub async fn delete(&self, key: &str, path: &str) -> (u16, Value) {
        self.call(self.client.delete(format!("{}{path}", self.url)), key)
            .await
    }

    pub async fn message(&self, key: &str, id: &str) -> Value {
        let (status, body) = self.get(key, &format!("/v1/messages/{id}")).await;
        assert_eq!(status, 200, "GET message: {body}");
        body
    }

    /// Waits until the message reaches `status`.
    pub async fn wait_status(&self, key: &str, id: &str, status: &str) -> Value {
        let what = format!("message {id} to be {status}");
        eventually(Duration::from_secs(15), &what, || async {
            let m = self.message(key, id).await;
            (m["status"] == status).then_some(m)
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A reload channel that never delivers.
fn no_reloads() -> tokio::sync::mpsc::Receiver<Config> {
    tokio::sync::mpsc::channel(1).1
}

/// A message body for account tests.
pub fn message(to: &str, text: &str) -> Value {
    serde_json::json!({ "to": to, "from": "iP1", "text": text })
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Receives webhooks like an application would.
#[derive(Clone, Default)]
pub struct Hooks {
    pub received: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    pub url: String,
    /// While set, requests are never answered (a receiver that hangs).
    pub hang: Arc<std::sync::atomic::AtomicBool>,
}

impl Hooks {
    pub async fn start() -> Hooks {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut hooks = Hooks {
            url: format!("http://{}/hooks", listener.local_addr().unwrap()),
            ..Hooks::default()
        };
        let received = hooks.received.clone();
        let hang = hooks.hang.clone();
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let received = received.clone();
                let hang = hang.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    let body = String::from_utf8_lossy(&body).into_owned();
                    received.lock().unwrap().push((headers, body));
                    "ok"
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        hooks.url = hooks.url.clone();
        hooks
    }

    pub fn bodies(&self) -> Vec<(HeaderMap, Value)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(h, b)| (h.clone(), serde_json::from_str(b).unwrap_or(Value::Null)))
            .collect()
    }

    pub fn raw(&self) -> Vec<(HeaderMap, String)> {
        self.received.lock().unwrap().clone()
    }

    /// (message id, status) of every status event received, alone or in an array.
    pub fn statuses(&self) -> std::collections::BTreeSet<(String, String)> {
        self.bodies()
            .into_iter()
            .flat_map(|(_, body)| match body {
                Value::Array(events) => events,
                event => vec![event],
            })
            .map(|event| {
                (
                    event["message_id"].as_str().unwrap_or("").to_owned(),
                    event["status"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

/// The webhooks a message sent and delivered at the first attempt reports: (id, status).
pub fn sent_and_delivered<'a>(
    ids: impl IntoIterator<Item = &'a String>,
) -> std::collections::BTreeSet<(String, String)> {
    ids.into_iter()
        .flat_map(|id| {
            ["queued", "sent", "delivered"].map(|status| (id.clone(), status.to_owned()))
        })
        .collect()
}

/// A temporary directory with the database path inside.
pub fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("smsgw.db");
    (dir, db)
}

/// The real `smsgw run` binary, as systemd runs it, with its JSON log lines on a channel.
pub struct Daemon {
    pub child: std::process::Child,
    pub url: String,
    /// `http://<address>` of the metrics listener, when `metrics.listen` is set.
    pub metrics_url: Option<String>,
    pub logs: std::sync::mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts the binary on `config_path` and waits (up to 30 s) until its API listens.
    pub fn start(config_path: &Path) -> Daemon {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smsgw"))
            .args(["run", "--config", &config_path.display().to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("the smsgw binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines, logs) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut metrics_url = None;
        while std::time::Instant::now() < deadline {
            let Ok(line) = logs.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            let event: Value = serde_json::from_str(&line).unwrap_or_default();
            let address = event["fields"]["address"].as_str();
            if event["fields"]["message"] == "metrics listening" {
                metrics_url = address.map(|a| format!("http://{a}"));
            }
            if event["fields"]["message"] == "HTTP API listening"
                && let Some(address) = address
            {
                let url = format!("http://{address}");
                return Daemon {
                    child,
                    url,
                    metrics_url,
                    logs,
                };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the daemon did not start listening");
    }

    /// The log lines written since the last call (for a failing test to show).
    pub fn new_logs(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// SIGKILL: no drain, no unbind, nothing flushed; as a crash or an OOM kill.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (up to 30 s) for a clean exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -TERM {pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the daemon") {
                assert!(status.success(), "the daemon exited with {status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave the process behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

//! Where webhooks may go, through the real daemon: never to this machine or a private network
//! (the admin API listens on loopback), whatever form the URL takes, unless the operator
//! allows a network for the accounts' own `webhook_url`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use common::*;

const TO: &str = "+46701234567";
const SECRET_B: &str = "webhook-secret-of-b";

/// A listener on loopback that counts the connections made to it and answers none: where no
/// webhook may arrive (it stands for the admin API).
struct Forbidden {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Forbidden {
    async fn start() -> Forbidden {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Forbidden { port, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connects to `address` at this listener's port: proof that a URL with that address
    /// would reach it, so that its count of zero later means the gateway refused it.
    async fn reachable_at(&self, address: IpAddr) {
        let before = self.connections();
        TcpStream::connect(SocketAddr::new(address, self.port))
            .await
            .unwrap_or_else(|e| panic!("{address} does not reach loopback here: {e}"));
        eventually(
            Duration::from_secs(5),
            "the test's own connection",
            || async { (self.connections() > before).then_some(()) },
        )
        .await;
        self.connections.store(before, Ordering::SeqCst);
    }
}

/// A name other than `localhost` that `/etc/hosts` maps to an IPv4 loopback address (most
/// systems list the machine's own name so), if any: a name the API cannot refuse by its
/// spelling.
fn hosts_name_on_loopback() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().find_map(|line| {
        let mut fields = line.split('#').next()?.split_whitespace();
        let address: IpAddr = fields.next()?.parse().ok()?;
        if !(address.is_ipv4() && address.is_loopback()) {
            return None;
        }
        fields
            .find(|name| *name != "localhost" && !name.ends_with(".localhost"))
            .map(str::to_owned)
    })
}

/// The test configuration without the loopback allow-list, account b signing its webhooks
/// and posting them to `b_hooks`.
fn config_without_allow_list(db: &std::path::Path, sim: &Sim, b_hooks: &str) -> String {
    config_text(db, sim.address(), None)
        .replace(ALLOW_LOOPBACK, "")
        .replace(
            "name = \"b\"\n",
            &format!(
                "name = \"b\"\nwebhook_url = \"{b_hooks}\"\nwebhook_secret = \"{SECRET_B}\"\n"
            ),
        )
}

/// The errors stored with the webhooks waiting for a retry, by URL.
async fn outbox_errors(db: &std::path::Path) -> Vec<(String, String)> {
    let store = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let rows = sqlx::query_as(
        "SELECT url, COALESCE(last_error, '') FROM webhooks WHERE last_error IS NOT NULL",
    )
    .fetch_all(&store)
    .await
    .unwrap();
    store.close().await;
    rows
}

/// Waits until the outbox holds a failed webhook for `url`, and returns its error.
async fn refusal(db: &std::path::Path, url: &str) -> String {
    eventually(
        Duration::from_secs(10),
        &format!("a failed webhook for {url}"),
        || async {
            outbox_errors(db)
                .await
                .into_iter()
                .find(|(u, _)| u == url)
                .map(|(_, error)| error)
        },
    )
    .await
}

#[tokio::test]
async fn a_callback_url_to_this_machine_or_a_private_network_is_refused_in_every_form() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let admin = Forbidden::start().await;
    let config = config_without_allow_list(&db, &sim, "https://hooks.example.com/b");
    let gateway = Gateway::start(parse_config(&config)).await;
    gateway.wait_ready().await;
    // These spellings reach the listener on 127.0.0.1 here.
    for address in ["127.0.0.1", "::ffff:127.0.0.1"] {
        admin.reachable_at(address.parse().unwrap()).await;
    }

    let port = admin.port;
    let long = format!("https://hooks.example.com/{}", "x".repeat(2048));
    let urls = [
        format!("http://127.0.0.1:{port}/admin/carriers/sim/pause"),
        format!("http://2130706433:{port}/"),
        format!("http://0x7f.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://[::ffff:7f00:1]:{port}/"),
        format!("http://[::127.0.0.1]:{port}/"),
        format!("http://[64:ff9b::7f00:1]:{port}/"),
        format!("http://[2002:7f00:1::]:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://localhost.:{port}/"),
        format!("http://admin.localhost:{port}/"),
        "http://[::ffff:10.0.0.1]/".into(),
        "http://[::ffff:169.254.169.254]/latest/meta-data/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://100.64.0.1/".into(),
        "http://198.18.0.1/".into(),
        "http://192.0.2.1/".into(),
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/".into(),
        "http://[fd00::1]/".into(),
        "http://[ff02::1]/".into(),
        "http://224.0.0.1/".into(),
        "http://255.255.255.255/".into(),
        "http://240.0.0.1/".into(),
        long,
    ];
    for url in &urls {
        let (status, answer) = gateway
            .post(
                KEY_B,
                &json!({ "to": TO, "from": "iP1", "text": "x", "callback_url": url }),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("invalid_callback_url")),
            "{url}: {answer}"
        );
    }
    let (_, listed) = gateway.get(KEY_B, "/v1/messages").await;
    assert_eq!(listed["messages"], json!([]), "nothing was stored");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(admin.connections(), 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_never_connected_to() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let admin = Forbidden::start().await;
    let port = admin.port;
    // The operator's URL: a name, which only the lookup when posting can judge.
    let b_hooks = format!("http://localhost:{port}/hooks?token=b-token");
    let gateway = Gateway::start(parse_config(&config_without_allow_list(
        &db, &sim, &b_hooks,
    )))
    .await;
    gateway.wait_ready().await;
    admin.reachable_at("127.0.0.1".parse().unwrap()).await;

    let (status, answer) = gateway.post(KEY_B, &message(TO, "to b's hooks")).await;
    assert_eq!(status, 202, "{answer}");
    let mut ids = vec![answer["id"].as_str().unwrap().to_owned()];
    // An application's callback with a name the API cannot refuse by its spelling.
    let callback = hosts_name_on_loopback().map(|name| format!("http://{name}:{port}/callback"));
    match &callback {
        Some(url) => {
            let (status, answer) = gateway
                .post(
                    KEY_B,
                    &json!({ "to": TO, "from": "iP1", "text": "x", "callback_url": url }),
                )
                .await;
            assert_eq!(status, 202, "a name is judged when posted: {answer}");
            ids.push(answer["id"].as_str().unwrap().to_owned());
        }
        None => println!("SKIPPED: /etc/hosts maps no name but localhost to loopback"),
    }
    for id in &ids {
        gateway.wait_status(KEY_B, id, "delivered").await;
    }

    let error = refusal(&db, &b_hooks).await;
    assert!(
        error.starts_with(
            "not sent: localhost resolves only to addresses that are not public, such as "
        ),
        "{error}"
    );
    if let Some(url) = &callback {
        let error = refusal(&db, url).await;
        assert!(
            error.contains("resolves only to addresses that are not public"),
            "{error}"
        );
    }
    // Retried every 100 ms meanwhile, and never connected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(admin.connections(), 0);
    gateway.stop().await;
}

/// A literal callback stored before this check (by an older version, or another instance) is
/// refused when posted, as the client connects to a literal address without any lookup.
#[tokio::test]
async fn a_stored_callback_to_an_internal_literal_is_refused_when_posted() {
    use smsgw::encoding::Encoding;
    use smsgw::message::{Category, MessageId, Pseudonymizer, Status, now_ms};
    use smsgw::store::sqlite::SqliteStore;
    use smsgw::store::{AccountPolicy, NewMessage, Store, StoreRules};

    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let admin = Forbidden::start().await;
    admin
        .reachable_at("::ffff:127.0.0.1".parse().unwrap())
        .await;
    let port = admin.port;
    let urls = [
        format!("http://[::ffff:7f00:1]:{port}/mapped"),
        format!("http://[64:ff9b::7f00:1]:{port}/nat64"),
        format!("http://[2002:7f00:1::]:{port}/6to4"),
        format!("http://127.0.0.1:{port}/loopback"),
    ];
    let store = SqliteStore::open(
        &db,
        64,
        StoreRules {
            pseudonyms: Pseudonymizer::new(b"test-pseudonym-key-0123456789"),
            suspect_after: 2,
            suspect_codes: Vec::new(),
        },
    )
    .await
    .unwrap();
    let now = now_ms();
    let messages = urls
        .iter()
        .map(|url| NewMessage {
            id: MessageId::new(),
            account: "b".into(),
            reference: None,
            recipient: TO.into(),
            sender: "iP1".into(),
            body: "stored before the check".into(),
            category: Category::Transactional,
            encoding: Encoding::Gsm7,
            segments: 1,
            priority: 0,
            webhook_url: Some(url.clone()),
            consent_at: None,
            status: Status::Queued,
            detail: None,
            created_at: now,
            due_at: now,
            expires_at: now + 3_600_000,
        })
        .collect();
    let render: smsgw::store::RenderAnswer = Arc::new(|_: &[NewMessage]| (202, String::new()));
    store
        .submit("b", AccountPolicy::default(), messages, None, render)
        .await
        .unwrap();
    store.close().await;

    let config = config_without_allow_list(&db, &sim, "https://hooks.example.com/b");
    let gateway = Gateway::start(parse_config(&config)).await;
    for url in &urls {
        let error = refusal(&db, url).await;
        assert!(
            error.starts_with("not sent: ") && error.ends_with(" is not a public address"),
            "{url}: {error}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(admin.connections(), 0);
    gateway.stop().await;
}

/// `webhooks.allow_internal` opens a network to the URL the operator configured, and to
/// nothing an application gives.
#[tokio::test]
async fn with_the_allow_list_the_operators_loopback_receiver_gets_its_webhooks() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let admin = Forbidden::start().await;
    // The operator's receiver by name: the lookup's answer is judged against the allow-list.
    let by_name = hooks.url.replace("127.0.0.1", "localhost");
    let config = config_text(&db, sim.address(), Some(&by_name));
    assert!(config.contains(ALLOW_LOOPBACK));
    let gateway = Gateway::start(parse_config(&config)).await;
    gateway.wait_ready().await;

    let (status, answer) = gateway.post(KEY_A, &message(TO, "to the operator")).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let callback = hosts_name_on_loopback().map(|name| format!("http://{name}:{}/", admin.port));
    let mut other = None;
    match &callback {
        Some(url) => {
            let (status, answer) = gateway
                .post(
                    KEY_A,
                    &json!({ "to": TO, "from": "iP1", "text": "x", "callback_url": url }),
                )
                .await;
            assert_eq!(status, 202, "{answer}");
            other = answer["id"].as_str().map(str::to_owned);
        }
        None => println!("SKIPPED: /etc/hosts maps no name but localhost to loopback"),
    }

    let expected = sent_and_delivered([&id]);
    eventually(
        Duration::from_secs(10),
        "the operator's webhooks",
        || async { (hooks.statuses() == expected).then_some(()) },
    )
    .await;
    if let (Some(url), Some(other)) = (&callback, &other) {
        gateway.wait_status(KEY_A, other, "delivered").await;
        let error = refusal(&db, url).await;
        assert!(
            error.contains("resolves only to addresses that are not public"),
            "{error}"
        );
        assert_eq!(admin.connections(), 0);
    }
    gateway.stop().await;
}

/// A callback URL's query often carries the receiver's token: a failed post is logged, at
/// debug level, without it.
#[tokio::test]
async fn a_failed_webhook_is_logged_without_its_urls_query() {
    const TOKEN_A: &str = "query-token-of-a-4471";
    const TOKEN_B: &str = "query-token-of-b-9023";
    let sim = Sim::start(sim_config()).await;
    // Nothing listens on this port: a's post, to an allowed address, fails with "connection
    // refused"; b's, to localhost (127.0.0.1, not allowed), is refused before any connection.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (dir, db) = temp_db();
    let a_hooks = format!("http://127.0.0.2:{port}/hooks?token={TOKEN_A}");
    let b_hooks = format!("http://localhost:{port}/hooks?token={TOKEN_B}");
    let config = config_text(&db, sim.address(), Some(&a_hooks))
        .replace(ALLOW_LOOPBACK, r#"allow_internal = ["127.0.0.2/32"]"#)
        .replace(
            "name = \"b\"\n",
            &format!(
                "name = \"b\"\nwebhook_url = \"{b_hooks}\"\nwebhook_secret = \"{SECRET_B}\"\n"
            ),
        )
        .replace(
            "[store]",
            "[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n\
             [logging]\nformat = \"json\"\nlevel = \"debug\"\n[store]",
        );
    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, config).unwrap();
    let daemon = Daemon::start(&path);
    let client = reqwest::Client::new();
    for key in [KEY_A, KEY_B] {
        let answer = client
            .post(format!("{}/v1/messages", daemon.url))
            .bearer_auth(key)
            .json(&message(TO, "x"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202);
    }

    // Each receiver's post failed, and was logged saying why.
    let (mut refused, mut unanswered) = (None, None);
    let mut log = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (refused.is_none() || unanswered.is_none()) && std::time::Instant::now() < deadline {
        let Ok(line) = daemon.logs.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
        if event["fields"]["message"] == "webhook failed" {
            let error = event["fields"]["error"].as_str().unwrap_or("").to_owned();
            if error.starts_with("not sent: ") {
                refused = Some(error);
            } else {
                unanswered = Some(error);
            }
        }
        log.push(line);
    }
    daemon.terminate();
    let refused = refused.expect("b's refused post is logged");
    assert!(
        refused.starts_with("not sent: localhost resolves only to addresses that are not public"),
        "{refused}"
    );
    let unanswered = unanswered.expect("a's failed post is logged");
    assert!(
        unanswered.starts_with("request failed: ") && unanswered.contains("onnect"),
        "{unanswered}"
    );
    for token in [TOKEN_A, TOKEN_B] {
        if let Some(line) = log.iter().find(|l| l.contains(token)) {
            panic!("a URL's query is in the log: {line}");
        }
    }
}

/// Parses an RFC 3339 event time.
fn event_time(event: &Value) -> std::time::SystemTime {
    let at = event["at"].as_str().expect("an event time");
    let at = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 time");
    std::time::SystemTime::from(at)
}

/// Account a's receiver accepts the connection and never answers, and a has 150 messages'
/// webhooks for it; account b's webhooks still arrive within 1 s of the change they report.
/// (Before webhooks had lanes per account, b's first one waited behind a's for about 23 s.)
#[tokio::test]
async fn a_dead_receiver_of_one_account_does_not_delay_another_accounts_webhooks() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let dead = Hooks::start().await;
    dead.hang.store(true, Ordering::SeqCst);
    let b_hooks = Hooks::start().await;
    let config = config_text(&db, sim.address(), Some(&dead.url)).replace(
        "name = \"b\"\n",
        &format!(
            "name = \"b\"\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET_B}\"\n",
            b_hooks.url
        ),
    );
    let gateway = Gateway::start(parse_config(&config)).await;
    gateway.wait_ready().await;

    let batch: Vec<Value> = (0..150)
        .map(|i| message(TO, &format!("to a dead receiver {i}")))
        .collect();
    let (status, answer) = gateway.post(KEY_A, &json!({ "messages": batch })).await;
    assert_eq!(status, 202, "{answer}");
    eventually(
        Duration::from_secs(20),
        "a's 150 messages delivered",
        || async {
            let (_, page) = gateway
                .get(KEY_A, "/v1/messages?status=delivered&limit=500")
                .await;
            (page["messages"].as_array().map(Vec::len) == Some(150)).then_some(())
        },
    )
    .await;

    let (status, answer) = gateway
        .post(KEY_B, &message(TO, "to a live receiver"))
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    // When each of b's events arrived (polled every 5 ms), against the time of its change.
    let mut arrived: Vec<(String, std::time::SystemTime, std::time::SystemTime)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while arrived.len() < 3 && tokio::time::Instant::now() < deadline {
        for (_, event) in b_hooks.bodies() {
            let status = event["status"].as_str().unwrap_or("").to_owned();
            if event["message_id"] == id.as_str() && !arrived.iter().any(|(s, ..)| *s == status) {
                arrived.push((status, event_time(&event), std::time::SystemTime::now()));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let statuses: Vec<&str> = arrived.iter().map(|(s, ..)| s.as_str()).collect();
    assert_eq!(
        statuses.len(),
        3,
        "b's queued, sent and delivered webhooks: {statuses:?}"
    );
    for (status, at, when) in &arrived {
        let late = when.duration_since(*at).unwrap_or_default();
        println!("b's {status} webhook arrived {late:?} after the change");
        assert!(
            late <= Duration::from_secs(1),
            "b's {status} webhook arrived {late:?} after the change"
        );
    }
    assert!(dead.raw().is_empty(), "a's receiver never answered");
    gateway.stop().await;
}

/// The real binary on `config`, with `env` added to its environment.
fn daemon_with_env(config: &std::path::Path, env: &[(&str, String)]) -> Daemon {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["run", "--config", &config.display().to_string()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the smsgw binary starts");
    let stdout = child.stdout.take();
    let (lines, logs) = std::sync::mpsc::channel();
    // Held from here on, so that a failure below kills the process (Daemon's Drop).
    let mut daemon = Daemon {
        child,
        url: String::new(),
        metrics_url: None,
        logs,
    };
    let stdout = stdout.expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        let line = daemon
            .logs
            .recv_timeout(Duration::from_secs(30))
            .expect("the daemon logs that it listens");
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
        if event["fields"]["message"] == "HTTP API listening" {
            daemon.url = format!("http://{}", event["fields"]["address"].as_str().unwrap());
            return daemon;
        }
    }
}

/// A proxy from the environment would make the connections for the gateway, to addresses the
/// gateway never judged: webhooks use none.
#[tokio::test]
async fn webhooks_ignore_a_proxy_set_in_the_environment() {
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let proxy = Forbidden::start().await;
    let (dir, db) = temp_db();
    let config = config_text(&db, sim.address(), Some(&hooks.url)).replace(
        "[store]",
        "[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n\
         [logging]\nformat = \"json\"\n[store]",
    );
    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, config).unwrap();
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port);
    let env: Vec<(&str, String)> = ["http_proxy", "HTTP_PROXY", "https_proxy", "ALL_PROXY"]
        .into_iter()
        .map(|name| (name, proxy_url.clone()))
        .collect();
    let daemon = daemon_with_env(&path, &env);
    let answer: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/v1/messages", daemon.url))
        .bearer_auth(KEY_A)
        .json(&message(TO, "not through a proxy"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["id"].as_str().expect("an id").to_owned();
    let expected = sent_and_delivered([&id]);
    eventually(
        Duration::from_secs(15),
        "the webhooks, straight to the receiver",
        || async { (hooks.statuses() == expected).then_some(()) },
    )
    .await;
    daemon.terminate();
    assert_eq!(proxy.connections(), 0);
}

//! The API's defences through the real daemon: key scopes, rate limits, header limits, slow
//! clients and the connection limit, TLS, and account isolation on every route.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;
use smsgw::api::ROUTES;
use smsgw::api::auth::hash_key;
use smsgw::sim::SimConfig;

const SUBMIT_KEY: &str = "key-that-may-only-submit";
const READ_KEY: &str = "key-that-may-only-read";

/// The test configuration with `extra` appended (more `[[accounts]]`, or `[http]` keys).
fn config_with(db: &std::path::Path, sim: &Sim, extra: &str) -> smsgw::config::Config {
    parse_config(&format!(
        "{}\n{extra}",
        config_text(db, sim.address(), None)
    ))
}

fn in_one_hour() -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Sends `request` with `key` and returns the status, the headers and the JSON answer.
async fn call(
    request: reqwest::RequestBuilder,
    key: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = request.bearer_auth(key).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_key_without_the_scope_of_a_route_is_refused_403_insufficient_scope() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let scoped = format!(
        r#"
        [[accounts]]
        name = "scoped"
        api_keys = [
            {{ hash = "{submit}", scopes = ["submit"] }},
            {{ hash = "{read}", scopes = ["read"] }},
        ]
        "#,
        submit = hash_key(SUBMIT_KEY),
        read = hash_key(READ_KEY),
    );
    let gateway = Gateway::start(config_with(&db, &sim, &scoped)).await;

    let (status, body) = gateway
        .post(SUBMIT_KEY, &message("+46701234567", "Hej"))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();

    // The submit-only key cannot read what it sent; the read-only key can, and cannot submit.
    let url = format!("{}/v1/messages/{id}", gateway.url);
    let (status, headers, body) = call(gateway.client.get(&url), SUBMIT_KEY).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_scope");
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"read\""
    );
    let (status, _) = gateway.get(READ_KEY, &format!("/v1/messages/{id}")).await;
    assert_eq!(status, 200);
    let (status, body) = gateway
        .post(READ_KEY, &message("+46701234567", "Hej"))
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("insufficient_scope"))
    );
    let (status, body) = gateway
        .delete(READ_KEY, &format!("/v1/messages/{id}"))
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("insufficient_scope"))
    );

    // Neither may touch the policy or data subjects.
    for key in [SUBMIT_KEY, READ_KEY] {
        let (status, body) = gateway.get(key, "/v1/opt-outs").await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (403, &json!("insufficient_scope"))
        );
        let (status, _) = gateway.get(key, "/v1/subjects/%2B46701234567/export").await;
        assert_eq!(status, 403);
    }
    // A plain hash in api_keys (the old form) still has every scope.
    let (status, _) = gateway.get(KEY_A, "/v1/opt-outs").await;
    assert_eq!(status, 200);
    // An unknown key is still 401, not 403.
    let (status, _) = gateway.get("no-such-key", "/v1/opt-outs").await;
    assert_eq!(status, 401);
    gateway.stop().await;
}

#[tokio::test]
async fn an_account_or_a_key_over_its_rate_gets_429_rate_limited_with_retry_after() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let limited = format!(
        r#"
        [[accounts]]
        name = "limited"
        rate_per_second = 1
        burst = 3
        api_keys = ["{account_key}"]
        [[accounts]]
        name = "keyed"
        api_keys = [{{ hash = "{slow}", scopes = ["read"], rate_per_second = 1, burst = 2 }}, "{fast}"]
        "#,
        account_key = hash_key("limited-account-key"),
        slow = hash_key("slow-key"),
        fast = hash_key("fast-key"),
    );
    let gateway = Gateway::start(config_with(&db, &sim, &limited)).await;
    let url = format!("{}/v1/messages", gateway.url);

    // 20 requests in a row at an account allowed 3 at once and 1 a second: some are refused,
    // however slow this machine is.
    let mut refused = None;
    for _ in 0..20 {
        let (status, headers, body) = call(gateway.client.get(&url), "limited-account-key").await;
        if status == 429 {
            refused = Some((headers, body));
            break;
        }
        assert_eq!(status, 200, "{body}");
    }
    let (headers, body) = refused.expect("the account's limit refuses a request");
    assert_eq!(body["error"]["code"], "rate_limited");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    // Other accounts are not limited by it.
    for _ in 0..10 {
        let (status, _) = gateway.get(KEY_B, "/v1/messages").await;
        assert_eq!(status, 200);
    }
    // After Retry-After the account is served again.
    eventually(
        Duration::from_secs(30),
        "the limit to let a request through",
        || async {
            let (status, _, _) = call(gateway.client.get(&url), "limited-account-key").await;
            (status == 200).then_some(())
        },
    )
    .await;

    // A key's own limit leaves the account's other keys alone.
    let mut key_refused = false;
    for _ in 0..20 {
        let (status, _, body) = call(gateway.client.get(&url), "slow-key").await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited");
            key_refused = true;
            break;
        }
    }
    assert!(key_refused, "the key's own limit refuses a request");
    let (status, _, _) = call(gateway.client.get(&url), "fast-key").await;
    assert_eq!(status, 200);

    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("smsgw_http_rate_limited_total{account=\"limited\",limit=\"account\"}"),
        "{metrics}"
    );
    gateway.stop().await;
}

/// Writes `request` on a new connection and reads until the server closes it or 30 s pass.
async fn raw_exchange(gateway: &Gateway, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(gateway.address()).await.unwrap();
    // The server may answer and close before the whole request is written.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_header_too_large_or_with_too_many_lines_is_answered_431() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let limits = "[http]\nmax_header_bytes = 8192\nmax_headers = 16\n";
    let gateway = Gateway::start(config_with(&db, &sim, limits)).await;

    let big = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let answer = raw_exchange(&gateway, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let many: String = (0..20).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    let answer = raw_exchange(&gateway, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Within the limits, the same request is served.
    let answer = raw_exchange(
        &gateway,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gateway.stop().await;
}

/// How a slow client behaves.
#[derive(Clone, Copy)]
enum Slow {
    /// Sends a header one byte every 100 ms and never finishes it (slowloris).
    Trickle,
    /// Connects and sends nothing.
    Silent,
    /// Sends one request, reads its answer, and keeps the connection open doing nothing.
    IdleAfterAnswer,
}

/// A slow client. Returns true once the server closes the connection, false after 60 s.
async fn slow_client(gateway_address: std::net::SocketAddr, how: Slow) -> bool {
    let stream = TcpStream::connect(gateway_address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = async move {
        match how {
            Slow::Trickle => {
                let header = b"GET /healthz HTTP/1.1\r\nx-slow: ".iter();
                for byte in header.chain([b'a'; 600].iter()) {
                    if writer.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Slow::Silent => {}
            Slow::IdleAfterAnswer => {
                let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
                let _ = writer.write_all(request).await;
            }
        }
        std::future::pending::<()>().await
    };
    let closed = async {
        let mut buffer = [0u8; 1024];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        () = closed => true,
        () = trickle => false,
        () = tokio::time::sleep(Duration::from_secs(60)) => false,
    }
}

#[tokio::test]
async fn slow_clients_are_disconnected_and_the_connection_limit_keeps_the_gateway_serving() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let limits = "[http]\nheader_read_timeout = \"1s\"\nmax_connections = 16\n";
    let gateway = Gateway::start(config_with(&db, &sim, limits)).await;
    let address = gateway.address();

    // 16 connections take every slot: 12 trickle a header byte by byte, 2 send nothing, and 2
    // sit idle after one answer.
    let slow: Vec<_> = (0..16)
        .map(|i| match i {
            0..12 => Slow::Trickle,
            12..14 => Slow::Silent,
            _ => Slow::IdleAfterAnswer,
        })
        .map(|how| tokio::spawn(slow_client(address, how)))
        .collect();
    // While they hold the slots, one more connection is answered 503 and closed at once. (The
    // slow clients may already have been cut off on a very slow machine: then it is served.)
    let answer = raw_exchange(
        &gateway,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections")
            || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );

    // The header read timeout closes every slow connection, though they keep sending.
    for client in slow {
        assert!(
            client.await.unwrap(),
            "a slow client was not disconnected within 60 s"
        );
    }
    // And the gateway serves again.
    let (status, _) = gateway.get(KEY_A, "/v1/messages").await;
    assert_eq!(status, 200);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(
            "smsgw_http_connections_closed_total{listener=\"api\",reason=\"header_timeout\"}"
        ),
        "{metrics}"
    );
    gateway.stop().await;
}

const TLS_CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls/cert.pem");
const TLS_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls/key.pem");

#[tokio::test]
async fn the_api_serves_https_with_the_configured_certificate() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let tls = format!("[http]\ntls = {{ cert_file = \"{TLS_CERT}\", key_file = \"{TLS_KEY}\" }}\n");
    let cert = std::fs::read(TLS_CERT).unwrap();
    let gateway = Gateway::start_tls(config_with(&db, &sim, &tls), &cert).await;
    assert!(gateway.url.starts_with("https://"));
    gateway.wait_ready().await;

    let (status, body) = gateway
        .post(KEY_A, &message("+46701234567", "Över TLS"))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap();
    gateway.wait_status(KEY_A, id, "delivered").await;

    // Plain HTTP on the TLS port gets no answer.
    let answer = raw_exchange(
        &gateway,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(!answer.contains("200 OK"), "{answer}");
    // A client that does not trust the certificate is refused by its own TLS check.
    let plain_client = reqwest::Client::new();
    assert!(
        plain_client
            .get(format!("{}/healthz", gateway.url))
            .send()
            .await
            .is_err()
    );
    gateway.stop().await;
}

const NUM_B: &str = "+46701110001";
const NUM_B_PATH: &str = "%2B46701110001";
const NUM_CHANGED: &str = "+46701110002";
const NUM_SUSPECT: &str = "+46701110003";
/// The number account b's opt-out is for.
const NUM_OPTED_OUT: &str = "+46701110004";
const NUM_OPTED_OUT_PATH: &str = "%2B46701110004";
const B_TEXT: &str = "Private text of account b";

/// What account b holds, to look for in account a's answers.
struct BData {
    scheduled: String,
    held: String,
    ids: Vec<String>,
}

impl BData {
    /// Fails if `answer` (any answer given to account a) shows anything of b's.
    fn assert_absent(&self, route: &str, answer: &str) {
        for id in &self.ids {
            assert!(
                !answer.contains(id.as_str()),
                "{route} shows b's message {id}: {answer}"
            );
        }
        assert!(!answer.contains(B_TEXT), "{route} shows b's text: {answer}");
    }
}

/// Account b's data: a scheduled marketing message to NUM_B, an opt-out of NUM_OPTED_OUT, a number
/// change of NUM_CHANGED, and a message held because NUM_SUSPECT became suspect (the simulator
/// answers every message undeliverable with "unknown subscriber").
async fn account_b_data(gateway: &Gateway) -> BData {
    let mut ids = Vec::new();
    let (status, body) = gateway
        .post(
            KEY_B,
            &json!({"to": NUM_B, "from": "Bee", "text": B_TEXT, "category": "marketing",
                "send_at": in_one_hour()}),
        )
        .await;
    assert_eq!(
        (status, &body["status"]),
        (202, &json!("scheduled")),
        "{body}"
    );
    let scheduled = body["id"].as_str().unwrap().to_owned();
    ids.push(scheduled.clone());
    for _ in 0..2 {
        let (status, body) = gateway
            .post(
                KEY_B,
                &json!({"to": NUM_SUSPECT, "from": "Bee", "text": B_TEXT}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        gateway.wait_status(KEY_B, &id, "undelivered").await;
        ids.push(id);
    }
    let (status, body) = gateway
        .post(
            KEY_B,
            &json!({"to": NUM_SUSPECT, "from": "Bee", "text": B_TEXT}),
        )
        .await;
    assert_eq!(
        (status, &body["status"]),
        (202, &json!("held_suspect")),
        "{body}"
    );
    let held = body["id"].as_str().unwrap().to_owned();
    ids.push(held.clone());

    let (status, body) = gateway
        .post_json(KEY_B, "/v1/opt-outs", &json!({"number": NUM_OPTED_OUT}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = gateway
        .post_json(
            KEY_B,
            "/v1/number-changes",
            &json!({"number": NUM_CHANGED, "kind": "deactivated"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    BData {
        scheduled,
        held,
        ids,
    }
}

/// B's data is as it was: both messages waiting, its opt-out and number change in place.
async fn assert_b_intact(gateway: &Gateway, b: &BData) {
    let scheduled = gateway.message(KEY_B, &b.scheduled).await;
    assert_eq!(scheduled["status"], "scheduled", "{scheduled}");
    let held = gateway.message(KEY_B, &b.held).await;
    assert_eq!(held["status"], "held_suspect", "{held}");
    let (_, opt_outs) = gateway.get(KEY_B, "/v1/opt-outs").await;
    let numbers: Vec<&Value> = opt_outs["opt_outs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| &o["number"])
        .collect();
    assert_eq!(numbers, vec![&json!(NUM_OPTED_OUT)], "{opt_outs}");
    let (_, history) = gateway
        .get(KEY_B, "/v1/number-changes/%2B46701110002")
        .await;
    assert_eq!(history["changes"].as_array().unwrap().len(), 1, "{history}");
    let (_, export) = gateway
        .get(KEY_B, &format!("/v1/subjects/{NUM_B_PATH}/export"))
        .await;
    assert!(export.to_string().contains(B_TEXT), "{export}");
    let (_, export) = gateway
        .get(KEY_B, &format!("/v1/subjects/{NUM_OPTED_OUT_PATH}/export"))
        .await;
    assert!(export.to_string().contains("46701110004"), "{export}");
}

#[tokio::test]
async fn an_account_never_reads_or_changes_another_accounts_data_on_any_route() {
    let sim = Sim::start(SimConfig {
        undeliverable_ratio: 1.0,
        ..sim_config()
    })
    .await;
    let (_dir, db) = temp_db();
    let gateway = Gateway::start(config_with(&db, &sim, "")).await;
    gateway.wait_ready().await;
    let b = account_b_data(&gateway).await;
    let mut covered = BTreeSet::new();
    let mut cover = |method: &str, path: &str| covered.insert((method.to_owned(), path.to_owned()));

    // Reads first, while account a holds nothing: nothing of b's shows.
    for path in [
        "/v1/messages".to_owned(),
        format!("/v1/messages?to={NUM_B_PATH}"),
        "/v1/messages?status=scheduled".to_owned(),
    ] {
        let (status, body) = gateway.get(KEY_A, &path).await;
        assert_eq!(status, 200, "{body}");
        b.assert_absent(&path, &body.to_string());
        assert_eq!(body["messages"], json!([]), "{path}: {body}");
    }
    cover("GET", "/v1/messages");
    for id in &b.ids {
        let (status, body) = gateway.get(KEY_A, &format!("/v1/messages/{id}")).await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
    }
    cover("GET", "/v1/messages/{id}");
    let (status, body) = gateway.get(KEY_A, "/v1/opt-outs").await;
    assert_eq!((status, &body["opt_outs"]), (200, &json!([])), "{body}");
    cover("GET", "/v1/opt-outs");
    let (status, csv) = gateway.get_text(KEY_A, "/v1/opt-outs/export").await;
    assert_eq!(status, 200);
    assert!(!csv.contains("46701110004"), "{csv}");
    cover("GET", "/v1/opt-outs/export");
    let (status, body) = gateway
        .get(KEY_A, "/v1/number-changes/%2B46701110002")
        .await;
    assert_eq!((status, &body["changes"]), (200, &json!([])), "{body}");
    cover("GET", "/v1/number-changes/{number}");
    for number in [NUM_B_PATH, "%2B46701110003", NUM_OPTED_OUT_PATH] {
        let path = format!("/v1/subjects/{number}/export");
        let (status, body) = gateway.get(KEY_A, &path).await;
        assert_eq!(status, 200, "{body}");
        b.assert_absent(&path, &body.to_string());
    }
    cover("GET", "/v1/subjects/{number}/export");
    for path in ["/v1/openapi.json", "/healthz", "/readyz"] {
        let (status, text) = gateway.get_text(KEY_A, path).await;
        assert_eq!(status, 200, "{path}");
        b.assert_absent(path, &text);
        for number in ["46701110001", "46701110004"] {
            assert!(!text.contains(number), "{path} shows b's number");
        }
        cover("GET", path);
    }

    // Writes: none reaches b's data.
    for id in &b.ids {
        let (status, _) = gateway.delete(KEY_A, &format!("/v1/messages/{id}")).await;
        assert_eq!(status, 404);
    }
    cover("DELETE", "/v1/messages/{id}");
    let (status, _) = gateway
        .delete(KEY_A, &format!("/v1/opt-outs/{NUM_OPTED_OUT_PATH}"))
        .await;
    assert_eq!(status, 404, "b's opt-out is not a's to remove");
    cover("DELETE", "/v1/opt-outs/{number}");
    // a's own message to b's opted-out number is not refused by b's opt-out...
    let (status, body) = gateway
        .post(
            KEY_A,
            &json!({"to": NUM_OPTED_OUT, "from": "iP1", "text": "a's own", "category": "marketing",
                "send_at": in_one_hour()}),
        )
        .await;
    assert_eq!(
        (status, &body["status"]),
        (202, &json!("scheduled")),
        "{body}"
    );
    cover("POST", "/v1/messages");
    // ...and a's opt-outs, import and number changes of the same numbers leave b's messages be.
    let (status, _) = gateway
        .post_json(KEY_A, "/v1/opt-outs", &json!({"number": NUM_B}))
        .await;
    assert_eq!(status, 201);
    cover("POST", "/v1/opt-outs");
    let (status, body) = gateway
        .post_text(KEY_A, "/v1/opt-outs/import", &format!("{NUM_SUSPECT}\n"))
        .await;
    assert_eq!((status, &body["imported"]), (200, &json!(1)), "{body}");
    cover("POST", "/v1/opt-outs/import");
    for number in [NUM_B, NUM_SUSPECT] {
        let (status, body) = gateway
            .post_json(
                KEY_A,
                "/v1/number-changes",
                &json!({"number": number, "kind": "deactivated"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    cover("POST", "/v1/number-changes");
    let (status, body) = gateway
        .delete(KEY_A, "/v1/number-changes/%2B46701110003/suspect")
        .await;
    assert_eq!(status, 200, "{body}");
    cover("DELETE", "/v1/number-changes/{number}/suspect");
    for number in [NUM_B_PATH, "%2B46701110003", NUM_OPTED_OUT_PATH] {
        let (status, body) = gateway
            .delete(KEY_A, &format!("/v1/subjects/{number}"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    cover("DELETE", "/v1/subjects/{number}");

    assert_b_intact(&gateway, &b).await;
    let every_route: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let untested: Vec<_> = every_route.difference(&covered).collect();
    assert!(
        untested.is_empty(),
        "routes without an isolation check: {untested:?}"
    );
    gateway.stop().await;
}

const NUMBER: &str = "+46701234567";
const HANDSET: &str = "+46709998877";
const OUR_NUMBER: &str = "+46700000001";
const SECRET_TEXT: &str = "Secret code 918273 for Maja";
const API_KEY: &str = "smsgw_logtest_0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const WRONG_KEY: &str = "smsgw_wrong_key_a1b2c3d4e5f6a7b8c9d0";
const WEBHOOK_SECRET: &str = "webhook-secret-never-logged-5519";
const CARRIER_PASSWORD: &str = "pw7Zq81x";
const PSEUDONYM_KEY: &str = "pseudonym-key-never-logged-7730";

/// Everything the daemon writes, line by line, from a thread per stream.
fn collect(stream: impl std::io::Read + Send + 'static, into: std::sync::mpsc::Sender<String>) {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            if into.send(line).is_err() {
                return;
            }
        }
    });
}

#[tokio::test]
async fn the_daemon_logs_no_number_text_key_or_secret_even_at_debug_level() {
    use std::process::{Command, Stdio};

    let sim = Sim::start(SimConfig {
        password: CARRIER_PASSWORD.into(),
        ..sim_config()
    })
    .await;
    let hooks = Hooks::start().await;
    let (dir, db) = temp_db();
    let config = format!(
        r#"
        [http]
        listen = "127.0.0.1:0"
        [admin]
        enabled = false
        [store]
        path = "{db}"
        [privacy]
        pseudonym_key = "{PSEUDONYM_KEY}"
        [webhooks]
        {ALLOW_LOOPBACK}
        [logging]
        format = "json"
        level = "debug"
        [[accounts]]
        name = "a"
        api_keys = ["{hash}"]
        senders = ["iP1", "{OUR_NUMBER}"]
        webhook_url = "{hooks}"
        webhook_secret = "{WEBHOOK_SECRET}"
        [[carriers]]
        name = "sim"
        address = "{sim}"
        password = "{CARRIER_PASSWORD}"
        "#,
        db = db.display(),
        hash = hash_key(API_KEY),
        hooks = hooks.url,
        sim = sim.address(),
    );
    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, config).unwrap();
    // RUST_LOG=debug: every crate at debug, sqlx and the HTTP stack included.
    let mut child = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, output) = std::sync::mpsc::channel();
    collect(child.stdout.take().unwrap(), lines.clone());
    collect(child.stderr.take().unwrap(), lines);
    let mut log = Vec::new();
    let url = loop {
        let line = output
            .recv_timeout(Duration::from_secs(30))
            .expect("the daemon logs that it listens");
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
        log.push(line);
        if event["fields"]["message"] == "HTTP API listening" {
            break format!("http://{}", event["fields"]["address"].as_str().unwrap());
        }
    };
    let client = reqwest::Client::new();

    // A submit, its receipt and webhooks; a refused key; an inbound STOP (opt-out, reply,
    // inbound webhook).
    let answer: Value = client
        .post(format!("{url}/v1/messages"))
        .bearer_auth(API_KEY)
        .json(&json!({"to": NUMBER, "from": "iP1", "text": SECRET_TEXT}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["id"].as_str().expect("an id").to_owned();
    let refused = client
        .get(format!("{url}/v1/messages"))
        .bearer_auth(WRONG_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    eventually(Duration::from_secs(30), "the delivered webhook", || async {
        hooks
            .bodies()
            .iter()
            .any(|(_, b)| b["message_id"] == id.as_str() && b["status"] == "delivered")
            .then_some(())
    })
    .await;
    sim.handle
        .send_mo(HANDSET, OUR_NUMBER, "STOP")
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the inbound webhook", || async {
        hooks
            .bodies()
            .iter()
            .any(|(_, b)| b["type"] == "message.inbound")
            .then_some(())
    })
    .await;

    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    log.extend(output.try_iter());
    let log = log.join("\n");

    // The log is not empty: debug lines of the gateway, the HTTP client and sqlx are there.
    assert!(log.contains("\"DEBUG\""), "no debug lines: {log}");
    for (what, secret) in [
        ("the recipient's number", NUMBER.trim_start_matches('+')),
        ("the sender's number", HANDSET.trim_start_matches('+')),
        ("the message text", SECRET_TEXT),
        ("the API key", API_KEY),
        ("the refused API key", WRONG_KEY),
        ("the webhook secret", WEBHOOK_SECRET),
        ("the carrier password", CARRIER_PASSWORD),
        ("the pseudonym key", PSEUDONYM_KEY),
    ] {
        if let Some(line) = log.lines().find(|l| l.contains(secret)) {
            panic!("{what} is in the log: {line}");
        }
    }
    // The national form of the number neither.
    assert!(!log.contains("701234567"), "the number is in the log");
}

/// The JSON body of a raw HTTP answer (after the blank line).
fn answer_json(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_body_over_the_limit_by_its_content_length_is_answered_413_at_once_without_100_continue()
{
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = Gateway::start(config_with(&db, &sim, "")).await;

    for expect in ["expect: 100-continue\r\n", ""] {
        let request = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\
             content-type: application/json\r\ncontent-length: 2147483648\r\n{expect}\r\n"
        );
        let started = std::time::Instant::now();
        // Nothing of the body is sent: the answer must come from the header alone, and the
        // connection must close (raw_exchange reads until it does).
        let answer = raw_exchange(&gateway, request.as_bytes()).await;
        let took = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 413"), "{expect}: {answer}");
        assert!(!answer.contains("100 Continue"), "{expect}: {answer}");
        assert_eq!(answer_json(&answer)["error"]["code"], "body_too_large");
        assert!(
            took < Duration::from_secs(2),
            "{expect}: answered after {took:?}"
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_answered_400_malformed_body() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let limit = "[http]\nmax_body_bytes = 100000\n";
    let gateway = Gateway::start(config_with(&db, &sim, limit)).await;
    let post = |body: &str| {
        format!(
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\
             connection: close\r\n\r\n{body}"
        )
    };
    let json = r#"{"to":"+46701234567","from":"iP1","text":"chunked"}"#;

    // A chunk size that is not hexadecimal.
    let answer = raw_exchange(&gateway, post("zz\r\n{}\r\n0\r\n\r\n").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let error = answer_json(&answer);
    assert_eq!(error["error"]["code"], "malformed_body", "{answer}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("chunk")),
        "{answer}"
    );

    // The same body well chunked is taken, in one chunk or in two.
    let one = format!("{:x}\r\n{json}\r\n0\r\n\r\n", json.len());
    let answer = raw_exchange(&gateway, post(&one).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let (head, tail) = json.split_at(10);
    let two = format!(
        "{:x}\r\n{head}\r\n{:x}\r\n{tail}\r\n0\r\n\r\n",
        head.len(),
        tail.len()
    );
    let answer = raw_exchange(&gateway, post(&two).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    // Chunks over the body limit, however well formed, are still 413.
    let big = "a".repeat(70_000);
    let over = format!(
        "{:x}\r\n{big}\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len(),
        big.len()
    );
    let answer = raw_exchange(&gateway, post(&over).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    gateway.stop().await;
}

#[tokio::test]
async fn a_request_with_two_authorization_headers_is_refused_400_duplicate_authorization() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = Gateway::start(config_with(&db, &sim, "")).await;
    let (status, body) = gateway.post(KEY_B, &message("+46701234567", "Hej")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();

    // Whichever key comes first, and even the same key twice: one header, or no answer.
    for (first, second) in [
        (KEY_A, KEY_B),
        (KEY_B, KEY_A),
        (KEY_B, KEY_B),
        (KEY_B, "unknown"),
    ] {
        let request = format!(
            "GET /v1/messages/{id} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {first}\r\n\
             authorization: Bearer {second}\r\nconnection: close\r\n\r\n"
        );
        let answer = raw_exchange(&gateway, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{first}, {second}: {answer}"
        );
        assert_eq!(
            answer_json(&answer)["error"]["code"],
            "duplicate_authorization",
            "{answer}"
        );
        assert!(!answer.contains("+46701234567"), "{answer}");
    }
    // With one header, the same request is answered.
    let (status, _) = gateway.get(KEY_B, &format!("/v1/messages/{id}")).await;
    assert_eq!(status, 200);
    gateway.stop().await;
}

#[tokio::test]
async fn a_sender_that_is_empty_once_normalised_is_refused_422_invalid_sender() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = Gateway::start(config_with(&db, &sim, "")).await;

    // Account b has no `senders` list: any valid sender goes, and these are not valid.
    for from in ["+", " + ", ""] {
        let (status, body) = gateway
            .post(
                KEY_B,
                &json!({"to": "+46701234567", "from": from, "text": "Hej"}),
            )
            .await;
        assert_eq!(status, 422, "{from:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_sender", "{body}");
        assert_eq!(body["error"]["field"], "from", "{body}");
    }
    let (_, list) = gateway.get(KEY_B, "/v1/messages").await;
    assert_eq!(list["messages"], json!([]), "nothing was stored: {list}");
    assert_eq!(sim.handle.submitted_count(), 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_malformed_opt_out_cursor_is_refused_422_invalid_cursor_not_read_as_the_first_page() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = Gateway::start(config_with(&db, &sim, "")).await;
    for number in ["+46701110001", "+46701110002", "+46701110003"] {
        let (status, body) = gateway
            .post_json(KEY_A, "/v1/opt-outs", &json!({"number": number}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, first) = gateway.get(KEY_A, "/v1/opt-outs?limit=2").await;
    assert_eq!(status, 200, "{first}");
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (status, second) = gateway
        .get(KEY_A, &format!("/v1/opt-outs?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["opt_outs"].as_array().unwrap().len(), 1, "{second}");
    assert!(second["next_cursor"].is_null(), "{second}");

    let (key, _) = cursor.split_once(':').unwrap();
    for bad in [
        "garbage".to_owned(),
        key.to_owned(),
        format!("{}:", &key[..63]),
        format!("{}:", key.to_uppercase()),
        format!("{key}:Hej!"),
        format!("{key}:%2B"),
    ] {
        let (status, body) = gateway
            .get(KEY_A, &format!("/v1/opt-outs?limit=2&cursor={bad}"))
            .await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_cursor", "{body}");
        assert_eq!(body["error"]["field"], "cursor", "{body}");
    }
    // A cursor with a sender, as a sender's opt-out writes it, pages on.
    let (status, body) = gateway
        .get(KEY_A, &format!("/v1/opt-outs?limit=2&cursor={key}:iP1"))
        .await;
    assert_eq!(status, 200, "{body}");
    gateway.stop().await;
}

//! The operators' admin API and the commands that use it, against the running daemon; and
//! what the operators' listeners (admin, metrics) refuse.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use smsgw::sim::SimConfig;

const TO: &str = "+46701234567";

async fn admin(gateway: &Gateway, post: bool, path: &str) -> (u16, Value) {
    let url = format!("{}{path}", gateway.admin_url);
    let request = if post {
        gateway.admin_client.post(url)
    } else {
        gateway.admin_client.get(url)
    };
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_paused_carrier_gets_nothing_new_until_resumed() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;
    gateway.wait_ready().await;

    let (_, status) = admin(&gateway, false, "/admin/status").await;
    assert_eq!(status["carriers"][0]["name"], "sim");
    assert_eq!(status["carriers"][0]["binds_up"], 1);
    assert_eq!(status["carriers"][0]["window"], 10);

    assert_eq!(
        admin(&gateway, true, "/admin/carriers/sim/pause").await.0,
        200
    );
    assert_eq!(
        admin(&gateway, true, "/admin/carriers/nope/pause").await.0,
        404
    );
    let (_, answer) = gateway.post(KEY_A, &message(TO, "waits")).await;
    let id = answer["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gateway.message(KEY_A, id).await["status"], "queued");
    assert_eq!(sim.handle.submitted_count(), 0);

    // The queue view shows it, with the number as a pseudonym.
    let (_, queue) = admin(&gateway, false, "/admin/queue?status=queued").await;
    assert_eq!(queue["messages"][0]["id"], id);
    assert_eq!(queue["messages"][0]["account"], "a");
    assert!(!queue.to_string().contains("4670"), "{queue}");

    assert_eq!(
        admin(&gateway, true, "/admin/carriers/sim/resume").await.0,
        200
    );
    gateway.wait_status(KEY_A, id, "delivered").await;
}

#[tokio::test]
async fn an_operator_retries_a_failed_message_and_cancels_a_waiting_one() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(SimConfig {
        reject_ratio: 1.0,
        ..sim_config()
    })
    .await;
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;
    gateway.wait_ready().await;
    let (_, answer) = gateway.post(KEY_A, &message(TO, "refused at first")).await;
    let id = answer["id"].as_str().unwrap();
    gateway.wait_status(KEY_A, id, "failed").await;

    sim.handle.set_config(sim_config());
    let (status, _) = admin(&gateway, true, &format!("/admin/queue/{id}/retry")).await;
    assert_eq!(status, 200);
    let m = gateway.wait_status(KEY_A, id, "delivered").await;
    assert!(
        m["events"]
            .to_string()
            .contains("queued again by an operator")
    );
    let (status, again) = admin(&gateway, true, &format!("/admin/queue/{id}/retry")).await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("not_retryable"))
    );

    let later = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (_, scheduled) = gateway
        .post(
            KEY_B,
            &json!({ "to": TO, "from": "iP1", "text": "later", "send_at": later }),
        )
        .await;
    let id = scheduled["id"].as_str().unwrap();
    assert_eq!(
        admin(&gateway, true, &format!("/admin/queue/{id}/cancel"))
            .await
            .0,
        200
    );
    assert_eq!(gateway.message(KEY_B, id).await["status"], "canceled");
}

#[tokio::test]
async fn smsgw_status_reads_the_running_gateway() {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;
    gateway.wait_ready().await;
    // The same configuration: the command finds the socket beside the store.
    let config = dir.path().join("smsgw.toml");
    std::fs::write(&config, config_text(&db, sim.address(), None)).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsgw"))
            .args(["status", "--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status:?}");
    assert!(text.contains("\"binds_up\": 1"), "{text}");
}

#[tokio::test]
async fn a_retry_after_an_opt_out_is_refused_at_send_time() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(SimConfig {
        reject_ratio: 1.0,
        ..sim_config()
    })
    .await;
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;
    gateway.wait_ready().await;
    let marketing = json!({ "to": TO, "from": "iP1", "text": "Sale", "category": "marketing" });
    let (_, answer) = gateway.post(KEY_A, &marketing).await;
    let id = answer["id"].as_str().unwrap();
    gateway.wait_status(KEY_A, id, "failed").await;

    gateway
        .post_json(KEY_A, "/v1/opt-outs", &json!({ "number": TO }))
        .await;
    sim.handle.set_config(sim_config());
    assert_eq!(
        admin(&gateway, true, &format!("/admin/queue/{id}/retry"))
            .await
            .0,
        200
    );
    let m = gateway.wait_status(KEY_A, id, "refused_opted_out").await;
    assert!(m["detail"].as_str().unwrap().contains("opted out"));
    assert_eq!(
        sim.handle.submitted_count(),
        0,
        "nothing reached the carrier"
    );
}

const ADMIN_TOKEN: &str = "admin-token-of-the-tests-0123456789";

/// The test configuration with the admin API on TCP (a free loopback port) and a token.
fn tcp_admin_config(db: &std::path::Path, sim: &Sim) -> smsgw::config::Config {
    parse_config(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n",
        config_text(db, sim.address(), None)
    ))
}

async fn paused(gateway: &Gateway, token: Option<&str>) -> bool {
    let mut request = gateway
        .admin_client
        .get(format!("{}/admin/status", gateway.admin_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let status: Value = request.send().await.unwrap().json().await.unwrap();
    status["carriers"][0]["paused"]
        .as_bool()
        .expect("the status names the carrier")
}

#[tokio::test]
async fn the_admin_socket_refuses_what_a_browser_sends() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;
    let pause = format!("{}/admin/carriers/sim/pause", gateway.admin_url);

    // A page's form or fetch: an Origin, and text/plain so that no CORS preflight is needed.
    let r = gateway
        .admin_client
        .post(&pause)
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "browser_request_refused", "{body}");
    // The same with only Sec-Fetch-Site, as a browser sends it on a same-origin request.
    let r = gateway
        .admin_client
        .post(&pause)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(!paused(&gateway, None).await, "nothing was paused");

    // A DNS-rebinding page reads with its own name as Host.
    let r = gateway
        .admin_client
        .get(format!("{}/admin/queue", gateway.admin_url))
        .header("host", "evil.example:8081")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "host_refused", "{body}");

    // A form's content type is refused even without an Origin.
    let r = gateway
        .admin_client
        .post(&pause)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert!(!paused(&gateway, None).await);

    // The operator's own request (Host: localhost, no Origin) is served.
    let r = gateway.admin_client.post(&pause).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(paused(&gateway, None).await);
    gateway.stop().await;
}

#[tokio::test]
async fn on_tcp_the_admin_api_needs_its_token_and_its_own_host() {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let gateway = Gateway::start(tcp_admin_config(&db, &sim)).await;
    let pause = format!("{}/admin/carriers/sim/pause", gateway.admin_url);

    for token in [None, Some("admin-token-of-the-tests-012345678"), Some("")] {
        let mut request = gateway.admin_client.post(&pause);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401, "{token:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    }
    let r = gateway
        .admin_client
        .get(format!("{}/admin/queue", gateway.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "reading needs the token too");
    assert!(
        !paused(&gateway, Some(ADMIN_TOKEN)).await,
        "nothing was paused"
    );

    // With the token, a rebinding page's Host or a browser's Origin is still refused.
    let r = gateway
        .admin_client
        .get(format!("{}/admin/queue", gateway.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .header("host", "rebind.evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = gateway
        .admin_client
        .post(&pause)
        .bearer_auth(ADMIN_TOKEN)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(!paused(&gateway, Some(ADMIN_TOKEN)).await);

    // The command sends the configured token; SMSGW_ADMIN_TOKEN replaces it.
    let admin_address = gateway.admin_url.trim_start_matches("http://").to_owned();
    let config = dir.path().join("smsgw.toml");
    let text = config_text(&db, sim.address(), None)
        + &format!("\n[admin]\nlisten = \"{admin_address}\"\ntoken = \"{ADMIN_TOKEN}\"\n");
    std::fs::write(&config, text).unwrap();
    let run = |env_token: Option<&'static str>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_smsgw"));
            command.args([
                "carriers",
                "--config",
                config.to_str().unwrap(),
                "pause",
                "sim",
            ]);
            command.env_remove("SMSGW_ADMIN_TOKEN");
            if let Some(token) = env_token {
                command.env("SMSGW_ADMIN_TOKEN", token);
            }
            command.output().unwrap()
        })
    };
    let refused = run(Some("a-wrong-token-0123456789")).await.unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{refused:?}"
    );
    assert!(!paused(&gateway, Some(ADMIN_TOKEN)).await);
    let done = run(None).await.unwrap();
    assert!(done.status.success(), "{done:?}");
    assert!(paused(&gateway, Some(ADMIN_TOKEN)).await);
    gateway.stop().await;
}

#[tokio::test]
async fn a_client_trickling_its_header_to_the_admin_socket_is_disconnected() {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let text = config_text(&db, sim.address(), None) + "\n[http]\nheader_read_timeout = \"1s\"\n";
    let gateway = Gateway::start(parse_config(&text)).await;
    let socket = dir.path().join("admin.sock");

    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = tokio::time::Instant::now();
    let trickle = async move {
        let header = b"GET /admin/status HTTP/1.1\r\nx-slow: ".iter();
        for byte in header.chain([b'a'; 600].iter()) {
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::future::pending::<()>().await
    };
    let closed = async {
        let mut buffer = [0u8; 1024];
        while let Ok(n) = reader.read(&mut buffer).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        () = closed => {}
        () = trickle => unreachable!(),
        () = tokio::time::sleep(Duration::from_secs(30)) => {
            panic!("a client trickling its header was not disconnected within 30 s")
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        started.elapsed()
    );
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(
            "smsgw_http_connections_closed_total{listener=\"admin\",reason=\"header_timeout\"}"
        ),
        "{metrics}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn metrics_are_for_operators_and_not_on_the_api() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let text = config_text(&db, sim.address(), None).replace(
        "[metrics]",
        "[metrics]\ntoken = \"metrics-token-of-the-tests-0123\"",
    );
    let gateway = Gateway::start(parse_config(&text)).await;
    gateway.wait_ready().await;
    let (_, answer) = gateway.post(KEY_A, &message(TO, "count me")).await;
    assert!(answer["id"].is_string(), "{answer}");

    // An account's key reads no counters on the API.
    let (status, body) = gateway.get_text(KEY_A, "/metrics").await;
    assert_eq!(status, 404, "{body}");
    let r = gateway
        .client
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The metrics listener: with its token only, and never to a browser.
    let metrics = format!("{}/metrics", gateway.metrics_url);
    let r = gateway.client.get(&metrics).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = gateway
        .client
        .get(&metrics)
        .bearer_auth("metrics-token-of-the-tests-0123")
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = gateway
        .client
        .get(&metrics)
        .bearer_auth("metrics-token-of-the-tests-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("smsgw_messages_accepted_total{account=\"a\"}"),
        "{text}"
    );
    // Only /metrics there.
    let r = gateway
        .client
        .get(format!("{}/admin/status", gateway.metrics_url))
        .bearer_auth("metrics-token-of-the-tests-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // And on the admin socket, for an operator with curl.
    let r = gateway
        .admin_client
        .get(format!("{}/metrics", gateway.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("smsgw_messages_accepted_total")
    );
    gateway.stop().await;
}

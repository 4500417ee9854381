//! The operators' admin API and the commands that use it, against the running daemon.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::*;
use smsgw::sim::SimConfig;

const TO: &str = "+46701234567";

async fn admin(gateway: &Gateway, post: bool, path: &str) -> (u16, Value) {
    let url = format!("{}{path}", gateway.admin_url);
    let request = if post {
        gateway.client.post(url)
    } else {
        gateway.client.get(url)
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
    let admin_address = gateway.admin_url.trim_start_matches("http://").to_owned();
    let config = dir.path().join("smsgw.toml");
    let text = config_text(&db, sim.address(), None)
        + &format!("\n[admin]\nlisten = \"{admin_address}\"\n");
    std::fs::write(&config, text).unwrap();
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

//! End to end through the real daemon, a real SQLite file and the SMSC simulator over loopback.

mod common;

use std::time::Duration;

use serde_json::json;

use common::*;
use smsgw::encoding;
use smsgw::sim::SimConfig;

const TO: &str = "+46701234567";

async fn setup(sim: SimConfig) -> (tempfile::TempDir, Sim, Gateway) {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim).await;
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;
    gateway.wait_ready().await;
    (dir, sim, gateway)
}

#[tokio::test]
async fn a_message_is_sent_delivered_and_reported_by_signed_webhooks() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let gateway = Gateway::start(parse_config(&config_text(
        &db,
        sim.address(),
        Some(&hooks.url),
    )))
    .await;
    gateway.wait_ready().await;

    let (status, answer) = gateway
        .post(KEY_A, &json!({ "to": "+46 70 123 45 67", "from": "iP1", "text": "Hej!", "reference": "order-7" }))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "queued");
    assert_eq!(answer["segments"], 1);
    assert_eq!(answer["encoding"], "gsm7");
    let id = answer["id"].as_str().unwrap().to_owned();

    let message = gateway.wait_status(KEY_A, &id, "delivered").await;
    assert_eq!(message["to"], TO, "the number is stored in E.164");
    assert_eq!(message["carrier"], "sim");
    let history: Vec<&str> = message["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["queued", "sending", "sent", "delivered"]);

    let submitted = sim.handle.submitted();
    assert_eq!(submitted.len(), 1);
    assert_eq!(submitted[0].destination_addr, "46701234567");
    assert_eq!(submitted[0].source_addr, "iP1");
    assert_eq!(submitted[0].esm_class, 0x00);
    assert_eq!(submitted[0].registered_delivery & 0x01, 0x01);
    assert_eq!(
        encoding::decode(submitted[0].data_coding, &submitted[0].short_message),
        "Hej!"
    );

    let hooks_seen = eventually(Duration::from_secs(10), "three webhooks", || async {
        let seen = hooks.raw();
        (seen.len() >= 3).then_some(seen)
    })
    .await;
    let now = smsgw::message::now_ms() / 1000;
    let mut statuses = Vec::new();
    for (headers, body) in &hooks_seen {
        let signature = headers[smsgw::webhook::SIGNATURE_HEADER].to_str().unwrap();
        smsgw::webhook::verify(HOOK_SECRET, signature, body, now, 300)
            .expect("every webhook carries a valid signature");
        assert_eq!(
            smsgw::webhook::verify("wrong-secret", signature, body, now, 300),
            Err(smsgw::webhook::VerifyError::Mismatch)
        );
        let event: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(event["message_id"], id.as_str());
        assert_eq!(event["reference"], "order-7");
        statuses.push(event["status"].as_str().unwrap().to_owned());
    }
    statuses.sort();
    assert_eq!(statuses, ["delivered", "queued", "sent"]);
}

#[tokio::test]
async fn a_five_part_ucs2_message_with_an_emoji_arrives_as_five_correct_parts() {
    let (_dir, sim, gateway) = setup(sim_config()).await;
    // 66 units then an emoji across the first part boundary: the surrogate pair must not be cut.
    let text: String = "ж".repeat(66) + "👍" + &"Привет, мир! ".repeat(19);
    let plan = encoding::plan(&text);
    assert_eq!(
        (plan.encoding, plan.segments),
        (encoding::Encoding::Ucs2, 5)
    );

    let (status, answer) = gateway.post(KEY_A, &message(TO, &text)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["segments"], 5);
    assert_eq!(answer["encoding"], "ucs2");
    let id = answer["id"].as_str().unwrap();
    gateway.wait_status(KEY_A, id, "delivered").await;

    let parts = sim.handle.submitted();
    assert_eq!(parts.len(), 5);
    let mut reassembled = vec![String::new(); 5];
    let mut reference = None;
    for part in &parts {
        assert_eq!(part.esm_class & 0x40, 0x40, "UDHI set on every part");
        assert_eq!(part.data_coding, 0x08);
        assert!(part.short_message.len() <= 140);
        let (concat, data) = encoding::strip_udh(&part.short_message);
        let concat = concat.expect("a concatenation UDH");
        assert_eq!(concat.total, 5);
        assert_eq!(*reference.get_or_insert(concat.reference), concat.reference);
        reassembled[concat.part as usize - 1] = encoding::decode(0x08, data);
    }
    assert_eq!(reassembled.concat(), text);
}

#[tokio::test]
async fn throttling_by_the_carrier_slows_the_link_and_loses_nothing() {
    let (_dir, sim, gateway) = setup(SimConfig {
        throttle_above_per_second: Some(20),
        ..sim_config()
    })
    .await;
    let batch: Vec<_> = (0..60)
        .map(|i| message(TO, &format!("message {i}")))
        .collect();
    let (status, answer) = gateway.post(KEY_A, &json!({ "messages": batch })).await;
    assert_eq!(status, 202, "{answer}");
    let ids: Vec<String> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 60);
    for id in &ids {
        gateway.wait_status(KEY_A, id, "delivered").await;
    }
    assert!(sim.handle.throttled_count() > 0, "the simulator throttled");
    assert_eq!(
        sim.handle.submitted_count(),
        60,
        "each message accepted exactly once"
    );
}

#[tokio::test]
async fn a_dropped_link_mid_window_reconnects_and_every_message_ends_final() {
    let (_dir, sim, gateway) = setup(SimConfig {
        receipt_delay: Duration::from_millis(300),
        ..sim_config()
    })
    .await;
    let batch: Vec<_> = (0..40)
        .map(|i| message(TO, &format!("message {i}")))
        .collect();
    let (_, answer) = gateway.post(KEY_A, &json!({ "messages": batch })).await;
    eventually(Duration::from_secs(10), "some submits", || async {
        (sim.handle.submitted_count() >= 5).then_some(())
    })
    .await;
    sim.handle.drop_links();
    for m in answer["messages"].as_array().unwrap() {
        let id = m["id"].as_str().unwrap();
        eventually(Duration::from_secs(20), "a final status", || async {
            let m = gateway.message(KEY_A, id).await;
            let status = m["status"].as_str().unwrap().to_owned();
            matches!(
                status.as_str(),
                "delivered" | "undelivered" | "failed" | "expired"
            )
            .then_some(())
        })
        .await;
    }
    assert!(sim.handle.bind_attempts() >= 2, "the gateway bound again");
}

#[tokio::test]
async fn a_receipt_that_beats_its_submit_response_still_matches() {
    let (_dir, _sim, gateway) = setup(SimConfig {
        receipt_before_response: true,
        ..sim_config()
    })
    .await;
    let (_, answer) = gateway.post(KEY_A, &message(TO, "early receipt")).await;
    let m = gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    let history: Vec<&str> = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["queued", "sending", "sent", "delivered"]);
}

#[tokio::test]
async fn a_carrier_refusal_fails_the_message_with_its_code() {
    let (_dir, _sim, gateway) = setup(SimConfig {
        reject_ratio: 1.0,
        ..sim_config()
    })
    .await;
    let (_, answer) = gateway.post(KEY_A, &message(TO, "refused")).await;
    let m = gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "failed")
        .await;
    assert_eq!(m["error_code"], "0x45");
    assert!(m["detail"].as_str().unwrap().contains("ESME_RSUBMITFAIL"));
}

#[tokio::test]
async fn an_undeliverable_receipt_marks_the_message_undelivered() {
    let (_dir, _sim, gateway) = setup(SimConfig {
        undeliverable_ratio: 1.0,
        ..sim_config()
    })
    .await;
    let (_, answer) = gateway.post(KEY_A, &message(TO, "nobody home")).await;
    let m = gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "undelivered")
        .await;
    assert_eq!(m["error_code"], "001");
}

#[tokio::test]
async fn messages_queued_before_a_restart_are_all_sent_after_it() {
    let (_dir, db) = temp_db();
    // A carrier that is down: messages are accepted and wait in the store.
    let parked = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = parked.local_addr().unwrap();
    drop(parked);
    let gateway = Gateway::start(parse_config(&config_text(&db, address, None))).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let (status, answer) = gateway
            .post(KEY_A, &message(TO, &format!("queued {i}")))
            .await;
        assert_eq!(status, 202);
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    gateway.stop().await;

    let sim = Sim::start_on(address, sim_config()).await;
    let gateway = Gateway::start(parse_config(&config_text(&db, address, None))).await;
    for id in &ids {
        gateway.wait_status(KEY_A, id, "delivered").await;
    }
    assert_eq!(sim.handle.submitted_count(), 10);
}

#[tokio::test]
async fn a_scheduled_message_can_be_canceled_and_is_never_sent() {
    let (_dir, sim, gateway) = setup(sim_config()).await;
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let send_at = later
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (status, answer) = gateway
        .post(
            KEY_A,
            &json!({ "to": TO, "from": "iP1", "text": "later", "send_at": send_at }),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(answer["status"], "scheduled");
    let id = answer["id"].as_str().unwrap();

    assert_eq!(
        gateway.delete(KEY_B, &format!("/v1/messages/{id}")).await.0,
        404
    );
    let (status, body) = gateway.delete(KEY_A, &format!("/v1/messages/{id}")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("canceled")));
    let (status, body) = gateway.delete(KEY_A, &format!("/v1/messages/{id}")).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "not_cancelable");
    assert_eq!(gateway.message(KEY_A, id).await["status"], "canceled");
    assert_eq!(sim.handle.submitted_count(), 0);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_answer_again() {
    let (_dir, sim, gateway) = setup(sim_config()).await;
    let body = serde_json::to_vec(&message(TO, "only once")).unwrap();
    let key = [("idempotency-key", "order-42")];
    let (s1, h1, first) = gateway.post_raw(KEY_A, body.clone(), &key).await;
    let (s2, h2, second) = gateway.post_raw(KEY_A, body.clone(), &key).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first, second);
    assert!(!h1.contains_key("idempotent-replayed"));
    assert_eq!(h2["idempotent-replayed"], "true");

    let other = serde_json::to_vec(&message(TO, "something else")).unwrap();
    let (s3, _, err) = gateway.post_raw(KEY_A, other, &key).await;
    assert_eq!(s3, 422);
    assert_eq!(err["error"]["code"], "idempotency_key_reused");

    // Keys belong to an account: B's same key is B's own first request.
    let (s4, _, b) = gateway.post_raw(KEY_B, body, &key).await;
    assert_eq!(s4, 202);
    assert_ne!(b["id"], first["id"]);

    gateway
        .wait_status(KEY_A, first["id"].as_str().unwrap(), "delivered")
        .await;
    gateway
        .wait_status(KEY_B, b["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(sim.handle.submitted_count(), 2);
}

#[tokio::test]
async fn an_account_never_sees_another_accounts_messages() {
    let (_dir, _sim, gateway) = setup(sim_config()).await;
    let (_, a) = gateway.post(KEY_A, &message(TO, "for a")).await;
    let id = a["id"].as_str().unwrap();
    let (status, body) = gateway.get(KEY_B, &format!("/v1/messages/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (_, list_b) = gateway.get(KEY_B, "/v1/messages").await;
    assert_eq!(list_b["messages"].as_array().unwrap().len(), 0);
    let (_, list_a) = gateway.get(KEY_A, "/v1/messages").await;
    assert_eq!(list_a["messages"][0]["id"], id);
    assert_eq!(gateway.get("not-a-key", "/v1/messages").await.0, 401);
}

#[tokio::test]
async fn the_message_list_pages_and_filters() {
    let (_dir, _sim, gateway) = setup(SimConfig {
        receipts: false,
        ..sim_config()
    })
    .await;
    let batch: Vec<_> = (0..5).map(|i| message(TO, &format!("m{i}"))).collect();
    gateway.post(KEY_A, &json!({ "messages": batch })).await;
    gateway.post(KEY_A, &message("+46701111111", "other")).await;

    let (_, page1) = gateway.get(KEY_A, "/v1/messages?limit=4").await;
    assert_eq!(page1["messages"].as_array().unwrap().len(), 4);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = gateway
        .get(KEY_A, &format!("/v1/messages?limit=4&cursor={cursor}"))
        .await;
    assert_eq!(page2["messages"].as_array().unwrap().len(), 2);
    assert!(page2["next_cursor"].is_null());

    let (_, filtered) = gateway.get(KEY_A, "/v1/messages?to=%2B46701111111").await;
    assert_eq!(filtered["messages"].as_array().unwrap().len(), 1);
    let (status, bad) = gateway.get(KEY_A, "/v1/messages?status=lost").await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (422, Some("invalid_status"))
    );
}

#[tokio::test]
async fn bad_input_gets_a_specific_client_error() {
    let (_dir, sim, gateway) = setup(sim_config()).await;
    let cases: Vec<(serde_json::Value, u16, &str, Option<&str>)> = vec![
        (
            message("0701234567", "x"),
            422,
            "invalid_number",
            Some("to"),
        ),
        (message("+4612", "x"), 422, "invalid_number", Some("to")),
        (message(TO, "   "), 422, "empty_text", Some("text")),
        (
            message(TO, &"a".repeat(1531)),
            422,
            "text_too_long",
            Some("text"),
        ),
        (
            json!({ "to": TO, "from": "ThisIsTooLong", "text": "x" }),
            422,
            "invalid_sender",
            Some("from"),
        ),
        (
            json!({ "to": TO, "from": "iP1", "text": "x", "colour": "red" }),
            400,
            "unknown_field",
            Some("colour"),
        ),
        (
            json!({ "to": TO, "text": "x" }),
            400,
            "missing_field",
            Some("from"),
        ),
        (
            json!({ "to": TO, "from": "iP1", "text": "x", "send_at": "tomorrow" }),
            422,
            "invalid_time",
            Some("send_at"),
        ),
        (
            json!({ "to": TO, "from": "iP1", "text": "x", "send_at": "9999-12-31T00:00:00Z" }),
            422,
            "invalid_time",
            Some("send_at"),
        ),
        (
            json!({ "to": TO, "from": "iP1", "text": "x", "valid_for": "forever" }),
            422,
            "invalid_validity",
            Some("valid_for"),
        ),
        (
            json!({ "to": TO, "from": "iP1", "text": "x", "callback_url": "ftp://x" }),
            422,
            "invalid_callback_url",
            Some("callback_url"),
        ),
        (
            json!({ "to": TO, "from": "iP1", "text": "x", "category": "spam" }),
            400,
            "invalid_value",
            None,
        ),
    ];
    for (body, status, code, field) in cases {
        let (got, answer) = gateway.post(KEY_A, &body).await;
        assert_eq!(got, status, "{body} → {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} → {answer}");
        assert_eq!(
            answer["error"]["field"].as_str(),
            field,
            "{body} → {answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    let (status, answer) = gateway
        .post(KEY_A, &json!({ "to": TO, "from": "Other", "text": "x" }))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("sender_not_allowed"))
    );
    // Account b has no webhook secret: an unsigned callback is refused.
    let (status, answer) = gateway
        .post(KEY_B, &json!({ "to": TO, "from": "Other", "text": "x", "callback_url": "https://hooks.example.com/x" }))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("webhooks_not_configured"))
    );
    // A callback may not reach this machine or a private network (the admin API is there).
    for url in [
        "http://127.0.0.1:8081/admin/carriers/sim/pause",
        "http://localhost/x",
        "http://10.0.0.8/x",
        "http://[::1]/x",
    ] {
        let (status, answer) = gateway
            .post(
                KEY_A,
                &json!({ "to": TO, "from": "iP1", "text": "x", "callback_url": url }),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("invalid_callback_url")),
            "{url}"
        );
    }

    let (status, _, answer) = gateway.post_raw(KEY_A, b"{\"to\": ".to_vec(), &[]).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );

    let huge = serde_json::to_vec(&message(TO, &"a".repeat(2 * 1024 * 1024))).unwrap();
    let (status, _, answer) = gateway.post_raw(KEY_A, huge, &[]).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );

    let (status, _, answer) = gateway.post_raw("wrong-key", b"{}".to_vec(), &[]).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );

    // A batch answers per item and stores the valid ones.
    let batch = json!({ "messages": [message(TO, "good"), message("nope", "bad")] });
    let (status, answer) = gateway.post(KEY_A, &batch).await;
    assert_eq!(status, 202);
    assert_eq!(answer["messages"][0]["status"], "queued");
    assert_eq!(answer["messages"][1]["error"]["code"], "invalid_number");
    gateway
        .wait_status(
            KEY_A,
            answer["messages"][0]["id"].as_str().unwrap(),
            "delivered",
        )
        .await;
    assert_eq!(
        sim.handle.submitted_count(),
        1,
        "nothing invalid reached the carrier"
    );
}

#[tokio::test]
async fn an_inbound_sms_is_stored_and_posted_to_the_owning_account() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let gateway = Gateway::start(parse_config(&config_text(
        &db,
        sim.address(),
        Some(&hooks.url),
    )))
    .await;
    gateway.wait_ready().await;
    sim.handle
        .send_mo("+46709999999", "+46700000001", "Hej tillbaka")
        .await
        .unwrap();
    let (headers, body) = eventually(Duration::from_secs(10), "the inbound webhook", || async {
        hooks.raw().into_iter().next()
    })
    .await;
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "message.inbound");
    assert_eq!(event["from"], "+46709999999");
    assert_eq!(event["text"], "Hej tillbaka");
    let signature = headers[smsgw::webhook::SIGNATURE_HEADER].to_str().unwrap();
    let now = smsgw::message::now_ms() / 1000;
    assert!(smsgw::webhook::verify(HOOK_SECRET, signature, &body, now, 300).is_ok());
    eventually(Duration::from_secs(5), "the deliver_sm_resp", || async {
        (sim.handle.deliver_sm_resp_count() >= 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn shutdown_with_a_window_in_flight_loses_nothing() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(SimConfig {
        receipt_delay: Duration::from_millis(100),
        ..sim_config()
    })
    .await;
    let config = parse_config(&config_text(&db, sim.address(), None));
    let gateway = Gateway::start(config.clone()).await;
    gateway.wait_ready().await;
    let batch: Vec<_> = (0..200).map(|i| message(TO, &format!("m{i}"))).collect();
    let (_, answer) = gateway.post(KEY_A, &json!({ "messages": batch })).await;
    let ids: Vec<String> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    eventually(Duration::from_secs(10), "sending to start", || async {
        (sim.handle.submitted_count() >= 10).then_some(())
    })
    .await;
    gateway.stop().await;

    // Everything accepted is still there, and a restart finishes the job.
    let gateway = Gateway::start(config).await;
    for id in &ids {
        let m = gateway.wait_status(KEY_A, id, "delivered").await;
        assert_eq!(m["to"], TO);
    }
    let submitted = sim.handle.submitted_count();
    assert!(
        submitted >= 200,
        "every message submitted at least once ({submitted})"
    );
}

#[tokio::test]
async fn a_message_whose_validity_ends_while_no_carrier_is_up_expires() {
    let (_dir, db) = temp_db();
    let parked = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = parked.local_addr().unwrap();
    drop(parked);
    let hooks = Hooks::start().await;
    let gateway = Gateway::start(parse_config(&config_text(&db, address, Some(&hooks.url)))).await;
    let (_, answer) = gateway
        .post(
            KEY_A,
            &json!({ "to": TO, "from": "iP1", "text": "soon stale", "valid_for": "2s" }),
        )
        .await;
    let m = gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "expired")
        .await;
    assert!(m["detail"].as_str().unwrap().contains("validity"));
    eventually(Duration::from_secs(10), "the expired webhook", || async {
        hooks
            .bodies()
            .iter()
            .any(|(_, b)| b["status"] == "expired")
            .then_some(())
    })
    .await;
}

/// A hand-written SMSC that sends what the simulator never would: PDUs the gateway cannot
/// decode. The link must survive them.
#[tokio::test]
async fn undecodable_pdus_from_the_carrier_are_refused_and_the_link_survives() {
    use futures::{SinkExt, StreamExt};
    use rusmpp::pdus::{BindTransceiverResp, SubmitSmResp};
    use rusmpp::tokio_codec::CommandCodec;
    use rusmpp::{Command, CommandStatus, Pdu};
    use tokio::io::AsyncWriteExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (_dir, db) = temp_db();
    let gateway = Gateway::start(parse_config(&config_text(&db, address, None))).await;

    let (socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut link = tokio_util::codec::Framed::new(socket, CommandCodec::new());
    let bind = link.next().await.unwrap().unwrap();
    assert!(matches!(bind.pdu(), Some(Pdu::BindTransceiver(_))));
    link.send(Command::new(
        CommandStatus::EsmeRok,
        bind.sequence_number(),
        BindTransceiverResp::builder().build(),
    ))
    .await
    .unwrap();

    // A deliver_sm whose body is garbage, then a command id no SMPP version has.
    let mut raw = Vec::new();
    for (id, seq, body) in [
        (0x0000_0005u32, 71u32, vec![0xFFu8; 7]),
        (0x0000_0777, 72, vec![]),
    ] {
        raw.extend_from_slice(&(16 + body.len() as u32).to_be_bytes());
        raw.extend_from_slice(&id.to_be_bytes());
        raw.extend_from_slice(&0u32.to_be_bytes());
        raw.extend_from_slice(&seq.to_be_bytes());
        raw.extend_from_slice(&body);
    }
    link.get_mut().write_all(&raw).await.unwrap();

    let mut answers = Vec::new();
    while answers.len() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(5), link.next())
            .await
            .expect("the gateway answers")
            .unwrap()
            .unwrap();
        if matches!(frame.pdu(), Some(Pdu::EnquireLink)) {
            continue;
        }
        answers.push((
            u32::from(frame.id()),
            u32::from(frame.status()),
            frame.sequence_number(),
        ));
    }
    assert_eq!(
        answers[0],
        (0x8000_0005, 0x65, 71),
        "deliver_sm_resp ESME_RX_P_APPN"
    );
    assert_eq!(
        (answers[1].0, answers[1].2),
        (0x8000_0000, 72),
        "generic_nack"
    );

    // The same link still carries messages.
    let (_, answer) = gateway.post(KEY_A, &message(TO, "still here")).await;
    let submit = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), link.next())
            .await
            .expect("a submit_sm on the same link")
            .unwrap()
            .unwrap();
        if matches!(frame.pdu(), Some(Pdu::SubmitSm(_))) {
            break frame;
        }
    };
    link.send(Command::new(
        CommandStatus::EsmeRok,
        submit.sequence_number(),
        SubmitSmResp::builder()
            .message_id("abc123".parse().unwrap())
            .build(),
    ))
    .await
    .unwrap();
    gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "sent")
        .await;
}

#[tokio::test]
async fn metrics_expose_the_named_series_after_traffic_and_never_a_number() {
    let (_dir, _sim, gateway) = setup(sim_config()).await;
    let (_, answer) = gateway.post(KEY_A, &message(TO, "count me")).await;
    gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    gateway.post(KEY_A, &message("0701234567", "bad")).await;
    let text = gateway.metrics().await;
    for series in [
        "smsgw_messages_accepted_total{account=\"a\"}",
        "smsgw_messages_rejected_total{account=\"a\",reason=\"invalid_number\"}",
        "smsgw_submits_total{carrier=\"sim\",outcome=\"accepted\"}",
        "smsgw_receipts_total{carrier=\"sim\",state=\"delivered\"}",
        "smsgw_message_status_total{account=\"a\",status=\"delivered\"}",
        "smsgw_submit_response_seconds_bucket",
        "smsgw_receipt_latency_seconds_bucket",
        "smsgw_binds_up{carrier=\"sim\"}",
        "smsgw_window_in_flight",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    assert!(
        !text.contains("4670"),
        "a phone number leaked into the metrics"
    );
}

/// Most webhooks reach the sender in memory, already leased to it (no claim back from the
/// outbox). Those it had not posted when the gateway stopped are waiting again after the
/// restart, not leased for the next 40 s.
#[tokio::test]
async fn webhooks_not_posted_before_a_stop_go_out_right_after_the_restart() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    hooks.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    // One post at a time, and it hangs: everything else waits in the sender.
    let text = config_text(&db, sim.address(), Some(&hooks.url)).replace(
        "[webhooks]\n",
        "[webhooks]\nconcurrency = 1\ntimeout = \"1s\"\n",
    );
    let gateway = Gateway::start(parse_config(&text)).await;
    gateway.wait_ready().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, answer) = gateway
            .post(
                KEY_A,
                &message(TO, &format!("stopped before its webhooks {i}")),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        gateway.wait_status(KEY_A, id, "delivered").await;
    }
    gateway.stop().await;
    assert!(hooks.raw().is_empty(), "the receiver answered nothing yet");

    hooks.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let gateway = Gateway::start(parse_config(&text)).await;
    let expected = sent_and_delivered(&ids);
    eventually(
        Duration::from_secs(10),
        "every webhook after the restart",
        || async { (hooks.statuses() == expected).then_some(()) },
    )
    .await;
    gateway.stop().await;
}

/// With `webhook_batch`, an account receives arrays of events, signed as a whole, and every
/// status change still arrives.
#[tokio::test]
async fn an_account_with_webhook_batch_receives_signed_arrays_of_every_event() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let secret_line = format!("webhook_secret = \"{HOOK_SECRET}\"\n");
    let text = config_text(&db, sim.address(), Some(&hooks.url))
        .replace(&secret_line, &format!("{secret_line}webhook_batch = 50\n"));
    let gateway = Gateway::start(parse_config(&text)).await;
    gateway.wait_ready().await;
    let batch: Vec<_> = (0..20)
        .map(|i| message(TO, &format!("batched webhooks {i}")))
        .collect();
    let (status, answer) = gateway.post(KEY_A, &json!({ "messages": batch })).await;
    assert_eq!(status, 202, "{answer}");
    let ids: Vec<String> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let expected = sent_and_delivered(&ids);
    assert_eq!(expected.len(), 60);

    let requests = eventually(Duration::from_secs(10), "every event", || async {
        let requests = hooks.raw();
        let events: usize = requests
            .iter()
            .map(|(_, body)| {
                serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.as_array().map(Vec::len))
                    .unwrap_or(0)
            })
            .sum();
        (events >= 60).then_some(requests)
    })
    .await;
    let now = smsgw::message::now_ms() / 1000;
    let mut seen = std::collections::BTreeSet::new();
    let mut largest = 0;
    for (headers, body) in &requests {
        let signature = headers[smsgw::webhook::SIGNATURE_HEADER].to_str().unwrap();
        smsgw::webhook::verify(HOOK_SECRET, signature, body, now, 300)
            .expect("each request is signed over its whole array");
        let events: Vec<serde_json::Value> =
            serde_json::from_str(body).expect("each request is a JSON array of events");
        assert!(events.len() <= 50, "at most webhook_batch events a request");
        largest = largest.max(events.len());
        for event in events {
            assert_eq!(event["type"], "message.status");
            let id = event["message_id"].as_str().unwrap().to_owned();
            seen.insert((id, event["status"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(seen, expected);
    // The 20 `queued` events were committed together: they go out in fewer requests.
    assert!(
        largest > 1,
        "events were batched (largest request: {largest})"
    );
    assert!(
        requests.len() < 60,
        "{} requests for 60 events",
        requests.len()
    );
    gateway.stop().await;
}

//! Policy through the real daemon and the simulator: opt-outs (STOP replies, API, erasure),
//! number changes (backdating, refusal, redirect) and suspect numbers.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::*;
use smsgw::encoding;
use smsgw::sim::SimConfig;

const HANDSET: &str = "+46709999999";
/// Account a's number: replies to it belong to account a.
const OURS: &str = "+46700000001";

async fn setup(sim: SimConfig) -> (tempfile::TempDir, Sim, Gateway, Hooks) {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim).await;
    let hooks = Hooks::start().await;
    let gateway = Gateway::start(parse_config(&config_text(
        &db,
        sim.address(),
        Some(&hooks.url),
    )))
    .await;
    gateway.wait_ready().await;
    (dir, sim, gateway, hooks)
}

fn marketing(from: &str, to: &str, text: &str) -> Value {
    json!({ "to": to, "from": from, "text": text, "category": "marketing" })
}

fn rfc3339_ago(hours: i64) -> String {
    (time::OffsetDateTime::now_utc() - time::Duration::hours(hours))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn in_one_hour() -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Texts the simulator received for `to`, decoded.
fn texts_to(sim: &Sim, to: &str) -> Vec<String> {
    let digits = to.trim_start_matches('+');
    sim.handle
        .submitted()
        .iter()
        .filter(|p| p.destination_addr == digits)
        .map(|p| encoding::decode(p.data_coding, &p.short_message))
        .collect()
}

#[tokio::test]
async fn a_stop_reply_stops_marketing_and_start_restores_it() {
    let (_dir, sim, gateway, hooks) = setup(sim_config()).await;
    // A marketing message scheduled for later is waiting when the STOP arrives.
    let (_, waiting) = gateway
        .post(
            KEY_A,
            &json!({ "to": HANDSET, "from": OURS, "text": "Sale!", "category": "marketing", "send_at": in_one_hour() }),
        )
        .await;

    sim.handle.send_mo(HANDSET, OURS, "  Stop! ").await.unwrap();
    let confirmation = eventually(
        Duration::from_secs(10),
        "the opt-out confirmation",
        || async { texts_to(&sim, HANDSET).into_iter().next() },
    )
    .await;
    assert!(confirmation.contains("no more messages"), "{confirmation}");
    let waiting = gateway
        .wait_status(KEY_A, waiting["id"].as_str().unwrap(), "refused_opted_out")
        .await;
    assert!(waiting["detail"].as_str().unwrap().contains("opted out"));

    // The next marketing message is refused at once, with its code and a webhook.
    let (status, refused) = gateway
        .post(KEY_A, &marketing(OURS, HANDSET, "More sale!"))
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["status"], "refused_opted_out");
    assert_eq!(refused["error"]["code"], "refused_opted_out");
    let refused_id = refused["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "the refusal webhook", || async {
        hooks
            .bodies()
            .iter()
            .any(|(_, b)| {
                b["message_id"] == refused_id.as_str() && b["status"] == "refused_opted_out"
            })
            .then_some(())
    })
    .await;
    // The opt-out is scoped to the sender it was sent to: another sender of the account still
    // reaches the number.
    let (status, other) = gateway
        .post(KEY_A, &marketing("iP1", HANDSET, "From iP1"))
        .await;
    assert_eq!((status, other["status"].as_str()), (202, Some("queued")));

    // A second STOP gets no second confirmation.
    sim.handle.send_mo(HANDSET, OURS, "STOP").await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the second STOP to be acknowledged",
        || async { (sim.handle.deliver_sm_resp_count() >= 2).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let confirmations = texts_to(&sim, HANDSET)
        .iter()
        .filter(|t| t.contains("no more messages"))
        .count();
    assert_eq!(confirmations, 1, "at most one confirmation");

    // The inbound webhook says which keyword it was.
    assert!(
        hooks
            .bodies()
            .iter()
            .any(|(_, b)| b["type"] == "message.inbound" && b["keyword"] == "opt_out")
    );

    sim.handle.send_mo(HANDSET, OURS, "start").await.unwrap();
    let id = eventually(Duration::from_secs(10), "START to take effect", || async {
        let (status, answer) = gateway
            .post(KEY_A, &marketing(OURS, HANDSET, "Welcome back"))
            .await;
        (status == 202).then(|| answer["id"].as_str().unwrap().to_owned())
    })
    .await;
    gateway.wait_status(KEY_A, &id, "delivered").await;
}

#[tokio::test]
async fn stopall_covers_every_sender_and_help_gets_the_help_text() {
    let (_dir, sim, gateway, _hooks) = setup(sim_config()).await;
    sim.handle.send_mo(HANDSET, OURS, "hjälp").await.unwrap();
    let help = eventually(Duration::from_secs(10), "the help reply", || async {
        texts_to(&sim, HANDSET).into_iter().next()
    })
    .await;
    assert!(help.to_uppercase().contains("STOP"), "{help}");

    sim.handle.send_mo(HANDSET, OURS, "STOP ALL").await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the opt-out of every sender",
        || async {
            let (status, _) = gateway.post(KEY_A, &marketing("iP1", HANDSET, "x")).await;
            (status == 422).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn service_messages_pass_an_opt_out_only_for_accounts_allowed_to_send_them() {
    let (_dir, _sim, gateway, _hooks) = setup(sim_config()).await;
    for key in [KEY_A, KEY_C] {
        let (status, _) = gateway
            .post_json(key, "/v1/opt-outs", &json!({ "number": HANDSET }))
            .await;
        assert_eq!(status, 201);
    }
    let password_reset = |from: &str| json!({ "to": HANDSET, "from": from, "text": "Your code: 1234", "category": "transactional" });

    // Account a may not send service messages to opted-out numbers.
    let (status, refused) = gateway.post(KEY_A, &password_reset("iP1")).await;
    assert_eq!(
        (status, refused["status"].as_str()),
        (422, Some("refused_opted_out"))
    );

    // Account c may: it goes out, and the history says it overrode the opt-out.
    let (status, sent) = gateway.post(KEY_C, &password_reset("Shop")).await;
    assert_eq!(status, 202, "{sent}");
    let m = gateway
        .wait_status(KEY_C, sent["id"].as_str().unwrap(), "delivered")
        .await;
    assert!(
        m["events"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("opted out")
    );
    // Marketing stays refused even for account c.
    let (status, _) = gateway
        .post(KEY_C, &marketing("Shop", HANDSET, "Sale"))
        .await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn a_deactivation_backdated_a_day_refuses_messages_whose_consent_is_older() {
    let (_dir, sim, gateway, _hooks) = setup(sim_config()).await;
    // Queued for later: one with consent from before the number was deactivated, one after.
    let scheduled = |consent_hours_ago: i64| {
        json!({ "to": HANDSET, "from": "iP1", "text": "Reminder", "send_at": in_one_hour(),
                "consent_at": rfc3339_ago(consent_hours_ago) })
    };
    let (_, stale) = gateway.post(KEY_A, &scheduled(36)).await;
    let (_, fresh) = gateway.post(KEY_A, &scheduled(12)).await;

    let (status, answer) = gateway
        .post_json(
            KEY_A,
            "/v1/number-changes",
            &json!({ "number": HANDSET, "kind": "deactivated", "effective_at": rfc3339_ago(24) }),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["messages_affected"], 1);
    let m = gateway
        .wait_status(
            KEY_A,
            stale["id"].as_str().unwrap(),
            "refused_number_changed",
        )
        .await;
    assert!(m["detail"].as_str().unwrap().contains("deactivated"));
    assert_eq!(
        gateway.message(KEY_A, fresh["id"].as_str().unwrap()).await["status"],
        "scheduled"
    );

    // New messages: refused without later consent, sent with it.
    let (status, refused) = gateway.post(KEY_A, &message(HANDSET, "hello")).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (422, Some("refused_number_changed"))
    );
    let (status, ok) = gateway
        .post(
            KEY_A,
            &json!({ "to": HANDSET, "from": "iP1", "text": "hi", "consent_at": rfc3339_ago(1) }),
        )
        .await;
    assert_eq!(status, 202);
    gateway
        .wait_status(KEY_A, ok["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(texts_to(&sim, HANDSET), ["hi"]);

    // Other accounts do not see account a's report.
    let (status, other) = gateway.post(KEY_B, &message(HANDSET, "from b")).await;
    assert_eq!((status, other["status"].as_str()), (202, Some("queued")));
    let (_, history) = gateway
        .get(
            KEY_A,
            &format!("/v1/number-changes/{}", HANDSET.replace('+', "%2B")),
        )
        .await;
    assert_eq!(history["changes"][0]["kind"], "deactivated");
    assert_eq!(history["changes"][0]["scope"], "account");
}

#[tokio::test]
async fn a_report_backdated_more_than_48_hours_is_refused() {
    let (_dir, _sim, gateway, _hooks) = setup(sim_config()).await;
    let (status, answer) = gateway
        .post_json(
            KEY_A,
            "/v1/number-changes",
            &json!({ "number": HANDSET, "kind": "deactivated", "effective_at": rfc3339_ago(49) }),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(answer["error"]["code"], "invalid_effective_at");
    assert_eq!(answer["error"]["field"], "effective_at");
    let (status, answer) = gateway
        .post_json(
            KEY_A,
            "/v1/number-changes",
            &json!({ "number": HANDSET, "kind": "changed" }),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (422, Some("new_number"))
    );
}

#[tokio::test]
async fn a_changed_number_is_followed_for_accounts_that_ask_and_refused_for_others() {
    let (_dir, sim, gateway, _hooks) = setup(sim_config()).await;
    let new_number = "+46708888888";
    let change = json!({ "number": HANDSET, "kind": "changed", "new_number": new_number,
                         "effective_at": rfc3339_ago(2) });
    assert_eq!(
        gateway
            .post_json(KEY_C, "/v1/number-changes", &change)
            .await
            .0,
        201
    );
    assert_eq!(
        gateway
            .post_json(KEY_A, "/v1/number-changes", &change)
            .await
            .0,
        201
    );

    let old_consent = json!({ "to": HANDSET, "from": "Shop", "text": "Your order shipped",
                              "consent_at": rfc3339_ago(100) });
    let (status, redirected) = gateway.post(KEY_C, &old_consent).await;
    assert_eq!(status, 202, "{redirected}");
    let m = gateway
        .wait_status(KEY_C, redirected["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(m["to"], new_number);
    assert!(
        m["events"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("redirected")
    );
    assert_eq!(texts_to(&sim, new_number), ["Your order shipped"]);
    assert!(texts_to(&sim, HANDSET).is_empty());

    let (status, refused) = gateway
        .post(
            KEY_A,
            &json!({ "to": HANDSET, "from": "iP1", "text": "x", "consent_at": rfc3339_ago(100) }),
        )
        .await;
    assert_eq!(
        (status, refused["status"].as_str()),
        (422, Some("refused_number_changed"))
    );
    // An opt-out from the old number follows the person to the new one.
    gateway
        .post_json(KEY_C, "/v1/opt-outs", &json!({ "number": HANDSET }))
        .await;
    let (status, refused) = gateway
        .post(
            KEY_C,
            &json!({ "to": HANDSET, "from": "Shop", "text": "Sale", "category": "marketing",
                     "consent_at": rfc3339_ago(100) }),
        )
        .await;
    assert_eq!(
        (status, refused["status"].as_str()),
        (422, Some("refused_opted_out"))
    );
}

#[tokio::test]
async fn repeated_unknown_subscriber_results_hold_a_number_until_it_is_cleared() {
    let (_dir, sim, gateway, _hooks) = setup(SimConfig {
        undeliverable_ratio: 1.0,
        ..sim_config()
    })
    .await;
    // Two receipts with err:001 (unknown subscriber) make the number suspect (suspect_after = 2).
    for i in 0..2 {
        let (_, answer) = gateway
            .post(KEY_A, &message(HANDSET, &format!("try {i}")))
            .await;
        gateway
            .wait_status(KEY_A, answer["id"].as_str().unwrap(), "undelivered")
            .await;
    }
    let (status, held) = gateway.post(KEY_A, &message(HANDSET, "held")).await;
    assert_eq!(status, 202);
    assert_eq!(held["status"], "held_suspect");
    let path = format!("/v1/number-changes/{}", HANDSET.replace('+', "%2B"));
    let (_, history) = gateway.get(KEY_A, &path).await;
    assert_eq!(history["suspect"], true);
    assert_eq!(history["unknown_subscriber_results"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sim.handle.submitted_count(),
        2,
        "nothing more went to the carrier"
    );

    sim.handle.set_config(sim_config());
    let (status, cleared) = gateway.delete(KEY_A, &format!("{path}/suspect")).await;
    assert_eq!((status, cleared["cleared"].as_bool()), (200, Some(true)));
    gateway
        .wait_status(KEY_A, held["id"].as_str().unwrap(), "delivered")
        .await;
}

#[tokio::test]
async fn erasure_keeps_the_opt_out_as_a_pseudonymised_suppression() {
    let (_dir, _sim, gateway, _hooks) = setup(sim_config()).await;
    let (_, sent) = gateway.post(KEY_A, &message(HANDSET, "before")).await;
    gateway
        .wait_status(KEY_A, sent["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(
        gateway
            .post_json(KEY_A, "/v1/opt-outs", &json!({ "number": HANDSET }))
            .await
            .0,
        201
    );

    let path = format!("/v1/subjects/{}", HANDSET.replace('+', "%2B"));
    // Another account's erasure touches nothing of account a.
    let (_, erased_b) = gateway.delete(KEY_B, &path).await;
    assert_eq!(erased_b["messages"], 0);
    let (status, erased) = gateway.delete(KEY_A, &path).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["messages"], 1);
    assert_eq!(erased["suppressions_kept"], 1);

    assert_eq!(
        gateway
            .get(
                KEY_A,
                &format!("/v1/messages/{}", sent["id"].as_str().unwrap())
            )
            .await
            .0,
        404
    );
    let (_, list) = gateway.get(KEY_A, "/v1/opt-outs").await;
    let entry = &list["opt_outs"][0];
    assert!(entry["number"].is_null(), "the number is gone: {entry}");
    assert_eq!(entry["pseudonym"].as_str().unwrap().len(), 16);
    let (_, export) = gateway.get_text(KEY_A, "/v1/opt-outs/export").await;
    assert!(!export.contains("4670999"), "{export}");

    // The suppression still works.
    let (status, refused) = gateway
        .post(KEY_A, &marketing("iP1", HANDSET, "Sale"))
        .await;
    assert_eq!(
        (status, refused["status"].as_str()),
        (422, Some("refused_opted_out"))
    );
}

#[tokio::test]
async fn opt_outs_are_managed_imported_and_exported_through_the_api() {
    let (_dir, _sim, gateway, _hooks) = setup(sim_config()).await;
    let (status, answer) = gateway
        .post_text(
            KEY_A,
            "/v1/opt-outs/import",
            "number,sender\n+46701111111\n+46702222222,iP1\nnot-a-number\n",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["imported"], 2);
    assert_eq!(answer["errors"][0]["line"], 4);
    assert_eq!(answer["errors"][0]["error"]["code"], "invalid_number");

    let (_, csv) = gateway.get_text(KEY_A, "/v1/opt-outs/export").await;
    assert!(csv.contains("+46701111111,,import"), "{csv}");
    assert!(csv.contains("+46702222222,iP1,import"), "{csv}");
    // Opt-outs belong to the account that made them.
    let (_, list_b) = gateway.get(KEY_B, "/v1/opt-outs").await;
    assert_eq!(list_b["opt_outs"].as_array().unwrap().len(), 0);

    let (status, _) = gateway.delete(KEY_A, "/v1/opt-outs/%2B46701111111").await;
    assert_eq!(status, 200);
    assert_eq!(
        gateway.delete(KEY_A, "/v1/opt-outs/%2B46701111111").await.0,
        404
    );
    let (_, list) = gateway.get(KEY_A, "/v1/opt-outs").await;
    assert_eq!(list["opt_outs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_subject_export_holds_everything_of_the_account_about_the_number_and_nothing_else() {
    let (_dir, sim, gateway, _hooks) = setup(sim_config()).await;
    let (_, sent) = gateway
        .post(KEY_A, &message(HANDSET, "Your table is booked"))
        .await;
    gateway
        .wait_status(KEY_A, sent["id"].as_str().unwrap(), "delivered")
        .await;
    gateway
        .post(KEY_B, &message(HANDSET, "from account b"))
        .await;
    sim.handle.send_mo(HANDSET, OURS, "Thanks!").await.unwrap();
    gateway
        .post_json(
            KEY_A,
            "/v1/opt-outs",
            &json!({ "number": HANDSET, "sender": "iP1" }),
        )
        .await;

    let path = format!("/v1/subjects/{}/export", HANDSET.replace('+', "%2B"));
    let export = eventually(
        Duration::from_secs(10),
        "the reply in the export",
        || async {
            let (_, export) = gateway.get(KEY_A, &path).await;
            (export["inbound"].as_array().is_some_and(|i| !i.is_empty())).then_some(export)
        },
    )
    .await;
    assert_eq!(export["messages"].as_array().unwrap().len(), 1);
    assert_eq!(export["messages"][0]["text"], "Your table is booked");
    assert!(export["messages"][0]["events"].as_array().unwrap().len() >= 4);
    assert_eq!(export["inbound"][0]["text"], "Thanks!");
    assert_eq!(export["opt_outs"][0]["sender"], "iP1");

    let (_, export_b) = gateway.get(KEY_B, &path).await;
    assert_eq!(export_b["messages"].as_array().unwrap().len(), 1);
    assert_eq!(export_b["messages"][0]["text"], "from account b");
    assert!(export_b["inbound"].as_array().unwrap().is_empty());
    assert!(export_b["opt_outs"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_number_change_dated_ahead_stops_messages_scheduled_after_it() {
    let (_dir, sim, gateway, _hooks) = setup(sim_config()).await;
    let in_seconds = |s: i64| {
        (time::OffsetDateTime::now_utc() + time::Duration::seconds(s))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    // A message is scheduled for two seconds from now; then the number is reported to stop
    // being the recipient's in one second: at send time the change has taken effect.
    let (status, scheduled) = gateway
        .post(
            KEY_A,
            &json!({ "to": HANDSET, "from": "iP1", "text": "later", "send_at": in_seconds(2),
                     "consent_at": rfc3339_ago(1) }),
        )
        .await;
    assert_eq!(
        (status, scheduled["status"].as_str()),
        (202, Some("scheduled"))
    );
    let change = json!({ "number": HANDSET, "kind": "deactivated", "effective_at": in_seconds(1) });
    let (status, answer) = gateway
        .post_json(KEY_A, "/v1/number-changes", &change)
        .await;
    assert_eq!(
        (status, answer["messages_affected"].as_u64()),
        (201, Some(0))
    );
    // A message submitted now for later is refused at once: the change comes before it is due.
    let (status, early) = gateway
        .post(
            KEY_A,
            &json!({ "to": HANDSET, "from": "iP1", "text": "later too", "send_at": in_seconds(3),
                     "consent_at": rfc3339_ago(1) }),
        )
        .await;
    assert_eq!(
        (status, early["status"].as_str()),
        (422, Some("refused_number_changed"))
    );
    gateway
        .wait_status(
            KEY_A,
            scheduled["id"].as_str().unwrap(),
            "refused_number_changed",
        )
        .await;
    assert!(texts_to(&sim, HANDSET).is_empty());

    let (status, answer) = gateway
        .post(
            KEY_A,
            &json!({ "to": HANDSET, "from": "iP1", "text": "x", "consent_at": in_seconds(3600) }),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (422, Some("consent_at"))
    );
}

//! Receipts through the real daemon and the SMSC simulator: carriers that write ids another way,
//! long messages in each multipart format, query_sm for receipts that never came, and the list
//! of receipts that matched nothing.

mod common;

use std::time::Duration;

use serde_json::Value;

use common::*;
use smsgw::encoding;
use smsgw::sim::{IdFormat, ReceiptIds, SimConfig};

const TO: &str = "+46701234567";
/// Generous: the machine running the tests is shared and loaded.
const LIMIT: Duration = Duration::from_secs(30);

/// A gateway whose one carrier has the extra `carrier_keys` (TOML lines).
async fn setup(sim: SimConfig, carrier_keys: &str) -> (tempfile::TempDir, Sim, Gateway) {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim).await;
    let text = config_text(&db, sim.address(), None).replace(
        "response_timeout = \"3s\"",
        &format!("response_timeout = \"3s\"\n{carrier_keys}"),
    );
    let gateway = Gateway::start(parse_config(&text)).await;
    gateway.wait_ready().await;
    (dir, sim, gateway)
}

async fn send(gateway: &Gateway, text: &str) -> String {
    let (status, answer) = gateway.post(KEY_A, &message(TO, text)).await;
    assert_eq!(status, 202, "{answer}");
    answer["id"].as_str().unwrap().to_owned()
}

async fn wait_status(gateway: &Gateway, id: &str, status: &str) -> Value {
    eventually(LIMIT, &format!("message {id} to be {status}"), || async {
        let m = gateway.message(KEY_A, id).await;
        (m["status"] == status).then_some(m)
    })
    .await
}

/// (status, detail) of every event.
fn history(message: &Value) -> Vec<(String, String)> {
    message["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let status = e["status"].as_str().unwrap_or_default().to_owned();
            let detail = e["detail"].as_str().unwrap_or_default().to_owned();
            (status, detail)
        })
        .collect()
}

fn hex_responses_decimal_receipts() -> SimConfig {
    SimConfig {
        response_ids: IdFormat::Hex,
        receipt_ids: ReceiptIds::Decimal,
        ..sim_config()
    }
}

#[tokio::test]
async fn hex_responses_with_decimal_receipts_match_when_configured() {
    let (_dir, sim, gateway) =
        setup(hex_responses_decimal_receipts(), "receipt_id = \"decimal\"").await;
    let id = send(&gateway, "hex in, decimal back").await;
    wait_status(&gateway, &id, "delivered").await;
    // The receipt carried the same number in decimal, which differs from the hex answer as
    // text (a random hex id need not contain a letter, so compare the two renderings).
    let response_id = &sim.handle.submitted()[0].message_id;
    let as_decimal = u64::from_str_radix(response_id, 16)
        .map(|n| n.to_string())
        .unwrap_or_default();
    assert!(
        !as_decimal.is_empty() && &as_decimal != response_id,
        "the simulator answered a hex id ({response_id}) whose decimal form differs"
    );
}

#[tokio::test]
async fn decimal_responses_with_hex_text_only_receipts_match_when_configured() {
    let sim = SimConfig {
        response_ids: IdFormat::Decimal,
        receipt_ids: ReceiptIds::Hex,
        // The id is only in the receipt text.
        receipt_tlvs: false,
        ..sim_config()
    };
    let (_dir, _sim, gateway) = setup(sim, "receipt_id = \"hex\"").await;
    let id = send(&gateway, "decimal in, hex back").await;
    let m = wait_status(&gateway, &id, "delivered").await;
    assert_eq!(m["detail"], "receipt: delivered");
}

#[tokio::test]
async fn auto_learns_a_carrier_that_writes_receipt_ids_in_decimal() {
    let (_dir, sim, gateway) =
        setup(hex_responses_decimal_receipts(), "receipt_id = \"auto\"").await;
    // More than the receipts it takes to settle, one after another, then a burst.
    for n in 0..7 {
        let id = send(&gateway, &format!("learning {n}")).await;
        wait_status(&gateway, &id, "delivered").await;
    }
    let mut burst = Vec::new();
    for n in 0..10 {
        burst.push(send(&gateway, &format!("settled {n}")).await);
    }
    for id in &burst {
        wait_status(&gateway, id, "delivered").await;
    }
    assert_eq!(sim.handle.submitted_count(), 17);
}

#[tokio::test]
async fn unconfigured_the_quirk_leaves_receipts_unmatched_and_listed_without_numbers() {
    let (dir, sim, gateway) =
        setup(hex_responses_decimal_receipts(), "unmatched_after = \"1s\"").await;
    let id = send(&gateway, "nobody will match this").await;
    let admin = |path: String| {
        let client = gateway.admin_client.clone();
        async move {
            let r = client.get(path).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    let url = format!("{}/admin/receipts/unmatched?carrier=sim", gateway.admin_url);
    let listed: Value = eventually(LIMIT, "an unmatched receipt to be listed", || {
        let url = url.clone();
        let admin = &admin;
        async move {
            let (_, body) = admin(url).await;
            assert!(!body.contains("46701234567"), "a plain number: {body}");
            let listed: Value = serde_json::from_str(&body).unwrap();
            (!listed["receipts"].as_array()?.is_empty()).then_some(listed)
        }
    })
    .await;
    let entry = &listed["receipts"][0];
    let response_id = sim.handle.submitted()[0].message_id.to_ascii_uppercase();
    assert_eq!(entry["carrier"], "sim");
    assert_eq!(entry["state"], "delivered");
    assert_eq!(
        entry["id_as_hex"], response_id,
        "the hint shows the id the response gave"
    );
    let handset = entry["handset"]
        .as_str()
        .expect("the handset, pseudonymised");
    assert_eq!(handset.len(), 16);
    assert!(entry["reason"].as_str().unwrap().contains("no message"));
    // The message itself is still waiting for its receipt.
    assert_eq!(gateway.message(KEY_A, &id).await["status"], "sent");

    let (status, _) = admin(format!(
        "{}/admin/receipts/unmatched?carrier=nope",
        gateway.admin_url
    ))
    .await;
    assert_eq!(status, 404);

    // The command asks the running gateway's admin API, on its socket beside the store.
    let config = dir.path().join("smsgw.toml");
    let text = config_text(&gateway.db, sim.address(), None);
    std::fs::write(&config, text).unwrap();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsgw"))
            .args(["receipts", "--config", config.to_str().unwrap()])
            .args(["unmatched", "--carrier", "sim"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(printed.contains(&response_id), "{printed}");
    assert!(!printed.contains("46701234567"), "{printed}");
}

/// A GSM-7 text of three parts.
fn three_parts() -> String {
    let text = "Long message, part by part. ".repeat(15);
    assert_eq!(encoding::plan(&text).segments, 3);
    text
}

/// The partial receipts are history of a `sent` message; the last one delivers it.
fn assert_rolled_up(message: &Value, parts: usize) {
    let events = history(message);
    let partial: Vec<&(String, String)> = events
        .iter()
        .filter(|(status, detail)| {
            status == "sent" && detail.starts_with("receipt: delivered (part ")
        })
        .collect();
    assert_eq!(partial.len(), parts - 1, "{events:?}");
    assert!(
        partial
            .iter()
            .all(|(_, d)| d.ends_with(&format!(" of {parts})"))),
        "{events:?}"
    );
    let (last_status, last_detail) = events.last().unwrap();
    assert_eq!(last_status, "delivered");
    assert!(
        last_detail.starts_with("receipt: delivered"),
        "{last_detail}"
    );
    let delivered = events.iter().filter(|(s, _)| s == "delivered").count();
    assert_eq!(delivered, 1, "{events:?}");
}

#[tokio::test]
async fn a_udh_message_is_delivered_when_its_last_part_is() {
    let (_dir, sim, gateway) = setup(sim_config(), "multipart = \"udh\"").await;
    let id = send(&gateway, &three_parts()).await;
    let m = wait_status(&gateway, &id, "delivered").await;
    assert_rolled_up(&m, 3);
    let submitted = sim.handle.submitted();
    assert_eq!(submitted.len(), 3);
    assert!(
        submitted
            .iter()
            .all(|p| p.esm_class == 0x40 && p.sar.is_none())
    );
}

#[tokio::test]
async fn a_sar_message_goes_with_sar_tlvs_and_rolls_up() {
    let (_dir, sim, gateway) = setup(sim_config(), "multipart = \"sar\"").await;
    let text = three_parts();
    let id = send(&gateway, &text).await;
    let m = wait_status(&gateway, &id, "delivered").await;
    assert_rolled_up(&m, 3);
    let mut submitted = sim.handle.submitted();
    assert_eq!(submitted.len(), 3);
    submitted.sort_by_key(|p| p.sar.map(|(_, _, n)| n));
    let reference = submitted[0].sar.unwrap().0;
    let mut reassembled = String::new();
    for (n, part) in (1u8..).zip(&submitted) {
        assert_eq!(part.esm_class, 0x00, "no UDH with SAR");
        assert_eq!(part.sar, Some((reference, 3, n)));
        reassembled += &encoding::decode(part.data_coding, &part.short_message);
    }
    assert_eq!(reassembled, text);
}

#[tokio::test]
async fn a_payload_message_is_one_submit_and_one_receipt() {
    let (_dir, sim, gateway) = setup(sim_config(), "multipart = \"payload\"").await;
    let text = three_parts();
    let id = send(&gateway, &text).await;
    let m = wait_status(&gateway, &id, "delivered").await;
    assert_eq!(m["segments"], 3, "still billed as three SMS");
    assert_eq!(m["detail"], "receipt: delivered");
    let submitted = sim.handle.submitted();
    assert_eq!(submitted.len(), 1);
    assert_eq!(submitted[0].esm_class, 0x00);
    assert_eq!(
        encoding::decode(submitted[0].data_coding, &submitted[0].short_message),
        text
    );
}

#[tokio::test]
async fn one_undeliverable_part_makes_a_long_message_undelivered() {
    let sim = SimConfig {
        undeliverable_ratio: 1.0,
        ..sim_config()
    };
    let (_dir, _sim, gateway) = setup(sim, "multipart = \"sar\"").await;
    let id = send(&gateway, &three_parts()).await;
    let m = wait_status(&gateway, &id, "undelivered").await;
    assert!(m["detail"].as_str().unwrap().contains("of 3)"), "{m}");
}

#[tokio::test]
async fn query_sm_closes_a_message_whose_receipt_never_came() {
    let sim = SimConfig {
        receipts: false,
        ..sim_config()
    };
    let (_dir, sim, gateway) = setup(sim, "query_after = \"1s\"").await;
    let id = send(&gateway, "the receipt is lost").await;
    let m = wait_status(&gateway, &id, "delivered").await;
    assert!(sim.handle.query_count() >= 1);
    assert_eq!(sim.handle.deliver_sm_sent(), 0, "no receipt was sent");
    assert!(m["detail"].as_str().unwrap().contains("delivered"), "{m}");
}

#[tokio::test]
async fn without_query_after_a_lost_receipt_leaves_the_message_sent() {
    let sim = SimConfig {
        receipts: false,
        ..sim_config()
    };
    let (_dir, sim, gateway) = setup(sim, "").await;
    let id = send(&gateway, "the receipt is lost").await;
    wait_status(&gateway, &id, "sent").await;
    // Several query periods of the test above.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gateway.message(KEY_A, &id).await["status"], "sent");
    assert_eq!(sim.handle.query_count(), 0);
}

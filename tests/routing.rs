//! Routing over several carriers through the real daemon: prefix rules, failover, weighted
//! sets, priority lanes, validity, reload of rates and routes, and `smsgw route`.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::*;
use smsgw::sim::SimConfig;

const SWEDISH_MOBILE: &str = "+46701234567";
const SWEDISH_TELE2: &str = "+46731234567";
const NORWEGIAN: &str = "+4791234567";

/// The common configuration with a second carrier `spare` at `spare`, and `extra` lines (which
/// continue the table of the carrier `sim` until a new table starts).
fn two_carriers(
    db: &std::path::Path,
    sim: std::net::SocketAddr,
    spare: std::net::SocketAddr,
    extra: &str,
) -> String {
    format!(
        "{}\n{extra}\n[[carriers]]\nname = \"spare\"\naddress = \"{spare}\"\n\
         rate_per_second = 2000\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\
         response_timeout = \"3s\"\n",
        config_text(db, sim, None)
    )
}

async fn admin(gateway: &Gateway, path: &str) -> Value {
    let r = gateway
        .admin_client
        .get(format!("{}{path}", gateway.admin_url))
        .send()
        .await
        .unwrap();
    r.json().await.unwrap_or(Value::Null)
}

/// Waits until every carrier has `binds` binds up.
async fn wait_bound(gateway: &Gateway, binds: u64) {
    eventually(Duration::from_secs(15), "every carrier bound", || async {
        let status = admin(gateway, "/admin/status").await;
        let carriers = status["carriers"].as_array()?.clone();
        carriers
            .iter()
            .all(|c| c["binds_up"].as_u64() == Some(binds))
            .then_some(())
    })
    .await;
}

async fn send(gateway: &Gateway, to: &str, text: &str) -> String {
    let (status, answer) = gateway.post(KEY_A, &message(to, text)).await;
    assert_eq!(status, 202, "{answer}");
    answer["id"].as_str().unwrap().to_owned()
}

/// The destinations (digits) a simulator accepted.
fn destinations(sim: &Sim) -> Vec<String> {
    sim.handle
        .submitted()
        .into_iter()
        .map(|p| p.destination_addr)
        .collect()
}

fn event_details(message: &Value) -> String {
    message["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["detail"].as_str())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[tokio::test]
async fn prefix_routes_send_each_message_to_its_carrier_and_refuse_the_rest() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let spare = Sim::start(sim_config()).await;
    let routes = r#"
        [[routes]]
        name = "telia"
        prefixes = ["+4670"]
        carrier = "sim"
        [[routes]]
        name = "tele2"
        prefixes = ["+4673"]
        carrier = "spare"
    "#;
    let text = two_carriers(&db, sim.address(), spare.address(), "") + routes;
    let gateway = Gateway::start(parse_config(&text)).await;
    wait_bound(&gateway, 1).await;

    let first = send(&gateway, SWEDISH_MOBILE, "to sim").await;
    let second = send(&gateway, SWEDISH_TELE2, "to spare").await;
    let delivered = gateway.wait_status(KEY_A, &first, "delivered").await;
    assert_eq!(delivered["carrier"], "sim");
    let delivered = gateway.wait_status(KEY_A, &second, "delivered").await;
    assert_eq!(delivered["carrier"], "spare");
    assert_eq!(destinations(&sim), ["46701234567"]);
    assert_eq!(destinations(&spare), ["46731234567"]);

    // No default route: a Norwegian number is refused at once, with a code, and not stored.
    let (status, answer) = gateway.post(KEY_A, &message(NORWEGIAN, "nowhere")).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "no_route");
    assert_eq!(answer["error"]["field"], "to");
    gateway.stop().await;
}

#[tokio::test]
async fn a_carrier_without_a_bound_link_is_skipped_and_the_history_says_so() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let spare = Sim::start(sim_config()).await;
    let routes = "[[routes]]\ncarrier = \"sim\"\nfailover = [\"spare\"]\n";
    let text = two_carriers(&db, sim.address(), spare.address(), "") + routes;
    let gateway = Gateway::start(parse_config(&text)).await;
    wait_bound(&gateway, 1).await;

    sim.stop();
    eventually(Duration::from_secs(15), "sim to be down", || async {
        let status = admin(&gateway, "/admin/status").await;
        (status["carriers"][0]["binds_up"] == 0).then_some(())
    })
    .await;
    let id = send(&gateway, SWEDISH_MOBILE, "while sim is down").await;
    let delivered = gateway.wait_status(KEY_A, &id, "delivered").await;
    assert_eq!(delivered["carrier"], "spare");
    let details = event_details(&delivered);
    assert!(
        details.contains("sim skipped: down"),
        "the history tells: {details}"
    );
    assert_eq!(destinations(&spare), ["46701234567"]);
    gateway.stop().await;
}

#[tokio::test]
async fn a_refusal_listed_in_failover_on_sends_the_message_to_the_next_carrier() {
    let (_dir, db) = temp_db();
    // `sim` throttles everything; its failover_on says throttling goes elsewhere at once.
    let sim = Sim::start(SimConfig {
        throttle_above_per_second: Some(0),
        ..sim_config()
    })
    .await;
    let spare = Sim::start(sim_config()).await;
    let routes = "[[routes]]\ncarrier = \"sim\"\nfailover = [\"spare\"]\n";
    let extra = "failover_on = [\"throttled\"]";
    let text = two_carriers(&db, sim.address(), spare.address(), extra) + routes;
    let gateway = Gateway::start(parse_config(&text)).await;
    wait_bound(&gateway, 1).await;

    let id = send(&gateway, SWEDISH_MOBILE, "throttled at sim").await;
    let delivered = gateway.wait_status(KEY_A, &id, "delivered").await;
    assert_eq!(delivered["carrier"], "spare");
    let details = event_details(&delivered);
    assert!(
        details.contains("sim refused 0x58 ESME_RTHROTTLED: failed over to spare"),
        "{details}"
    );
    assert!(sim.handle.throttled_count() >= 1);
    assert!(destinations(&sim).is_empty());
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("smsgw_failovers_total{from=\"sim\",to=\"spare\"}"),
        "{metrics}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_weighted_set_splits_messages_roughly_by_weight() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let spare = Sim::start(sim_config()).await;
    let routes = r#"
        [[routes]]
        carriers = [{ name = "sim", weight = 3 }, { name = "spare", weight = 1 }]
    "#;
    let text = two_carriers(&db, sim.address(), spare.address(), "") + routes;
    let gateway = Gateway::start(parse_config(&text)).await;
    wait_bound(&gateway, 1).await;

    let batch: Vec<Value> = (0..80)
        .map(|i| message(SWEDISH_MOBILE, &format!("split {i}")))
        .collect();
    let (status, answer) = gateway.post(KEY_A, &json!({ "messages": batch })).await;
    assert_eq!(status, 202, "{answer}");
    eventually(Duration::from_secs(30), "all 80 submitted", || async {
        (sim.handle.submitted_count() + spare.handle.submitted_count() >= 80).then_some(())
    })
    .await;
    let (to_sim, to_spare) = (sim.handle.submitted_count(), spare.handle.submitted_count());
    assert!(
        (48..=72).contains(&to_sim) && to_spare >= 8,
        "3:1 of 80 is 60:20; got {to_sim}:{to_spare}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_high_priority_message_overtakes_a_bulk_backlog() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    // A slow carrier: the bulk batch waits at it, in the gateway's carrier queue.
    let text = config_text(&db, sim.address(), None).replace(
        "window = 10\n        rate_per_second = 2000",
        "window = 2\n        rate_per_second = 40",
    );
    let gateway = Gateway::start(parse_config(&text)).await;
    gateway.wait_ready().await;

    let bulk: Vec<Value> = (0..80)
        .map(|i| message(SWEDISH_MOBILE, &format!("bulk {i}")))
        .collect();
    let (status, answer) = gateway.post(KEY_A, &json!({ "messages": bulk })).await;
    assert_eq!(status, 202, "{answer}");
    eventually(Duration::from_secs(15), "the bulk to start", || async {
        (sim.handle.submitted_count() >= 2).then_some(())
    })
    .await;
    let urgent =
        json!({ "to": SWEDISH_MOBILE, "from": "iP1", "text": "urgent", "priority": "high" });
    let (status, answer) = gateway.post(KEY_A, &urgent).await;
    assert_eq!(status, 202, "{answer}");
    eventually(
        Duration::from_secs(30),
        "every message submitted",
        || async { (sim.handle.submitted_count() >= 81).then_some(()) },
    )
    .await;
    let order: Vec<Vec<u8>> = sim
        .handle
        .submitted()
        .into_iter()
        .map(|p| p.short_message)
        .collect();
    let position = order
        .iter()
        .position(|text| text == b"urgent")
        .expect("urgent was submitted");
    assert!(
        position < 50,
        "the urgent message went out {position}th of 81; it should overtake most of the bulk"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn validity_goes_to_carriers_that_want_it_and_ends_at_the_gateway() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let spare = Sim::start(sim_config()).await;
    let routes = r#"
        [[routes]]
        prefixes = ["+4670"]
        carrier = "sim"
        [[routes]]
        carrier = "spare"
    "#;
    let extra = "validity_period = \"relative\"";
    let text = two_carriers(&db, sim.address(), spare.address(), extra) + routes;
    let gateway = Gateway::start(parse_config(&text)).await;
    wait_bound(&gateway, 1).await;

    let two_hours = json!({ "to": SWEDISH_MOBILE, "from": "iP1", "text": "2h", "valid_for": "2h" });
    let (_, answer) = gateway.post(KEY_A, &two_hours).await;
    gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    let validity = sim.handle.submitted()[0].validity_period.clone();
    assert!(
        validity == "000000020000000R" || validity.starts_with("0000000159"),
        "about two hours, relative: {validity}"
    );
    let (_, answer) = gateway
        .post(
            KEY_A,
            &json!({ "to": SWEDISH_TELE2, "from": "iP1", "text": "x" }),
        )
        .await;
    gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(
        spare.handle.submitted()[0].validity_period,
        "",
        "spare keeps its own default"
    );

    // With its only carrier paused, a message ends `expired` when its validity does.
    let paused = gateway
        .admin_client
        .post(format!("{}/admin/carriers/spare/pause", gateway.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    let short = json!({ "to": SWEDISH_TELE2, "from": "iP1", "text": "1s", "valid_for": "1s" });
    let (_, answer) = gateway.post(KEY_A, &short).await;
    let expired = gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "expired")
        .await;
    let details = event_details(&expired);
    assert!(details.contains("spare paused"), "{details}");
    assert_eq!(spare.handle.submitted_count(), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn a_reload_changes_rates_windows_and_routes_without_dropping_binds() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let spare = Sim::start(sim_config()).await;
    let text = two_carriers(&db, sim.address(), spare.address(), "");
    let (reloads, reloaded) = tokio::sync::mpsc::channel(1);
    let gateway = Gateway::start_with_reloads(parse_config(&text), reloaded).await;
    wait_bound(&gateway, 1).await;
    let binds_before = sim.handle.bind_attempts() + spare.handle.bind_attempts();

    let slower = text.replace(
        "window = 10\n        rate_per_second = 2000",
        "window = 3\n        rate_per_second = 7",
    ) + "[[routes]]\nprefixes = [\"+4673\"]\ncarrier = \"spare\"\n\
         [[routes]]\ncarrier = \"sim\"\n";
    reloads.send(parse_config(&slower)).await.unwrap();
    eventually(Duration::from_secs(10), "the new limits", || async {
        let status = admin(&gateway, "/admin/status").await;
        let sim = &status["carriers"][0];
        (sim["rate_per_second"] == 7 && sim["window"] == 3).then_some(())
    })
    .await;
    // The new routes apply: +4673 goes to spare only, the rest to sim.
    let ids = [
        send(&gateway, SWEDISH_TELE2, "a").await,
        send(&gateway, SWEDISH_TELE2, "b").await,
        send(&gateway, SWEDISH_MOBILE, "c").await,
    ];
    for id in &ids {
        gateway.wait_status(KEY_A, id, "delivered").await;
    }
    assert_eq!(destinations(&spare), ["46731234567", "46731234567"]);
    assert_eq!(destinations(&sim), ["46701234567"]);

    // The bind itself follows the new rate: after a burst of at most one second's worth (7),
    // the other 8 segments of 15 go out at 7/s, so more than a second passes (at the old rate,
    // milliseconds). A lower bound, which a loaded machine only makes longer.
    let batch: Vec<Value> = (0..15)
        .map(|i| message(SWEDISH_MOBILE, &format!("slow {i}")))
        .collect();
    let started = tokio::time::Instant::now();
    let (status, answer) = gateway.post(KEY_A, &json!({ "messages": batch })).await;
    assert_eq!(status, 202, "{answer}");
    eventually(Duration::from_secs(30), "the slow batch", || async {
        (sim.handle.submitted_count() >= 16).then_some(())
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "15 segments at 7/s took {:?}",
        started.elapsed()
    );
    assert_eq!(
        sim.handle.bind_attempts() + spare.handle.bind_attempts(),
        binds_before,
        "no bind was dropped and made again"
    );
    let status = admin(&gateway, "/admin/status").await;
    assert_eq!(status["carriers"][0]["binds_up"], 1);
    gateway.stop().await;
}

#[tokio::test]
async fn smsgw_route_prints_the_decision_with_the_running_carriers_state() {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let spare = Sim::start(sim_config()).await;
    let routes = r#"
        [[routes]]
        name = "swedish-mobiles"
        prefixes = ["+4670"]
        carriers = [{ name = "sim", weight = 2 }, { name = "spare", weight = 1 }]
        [[routes]]
        name = "marketing"
        category = "marketing"
        carrier = "spare"
    "#;
    let text = two_carriers(&db, sim.address(), spare.address(), "") + routes;
    let gateway = Gateway::start(parse_config(&text)).await;
    wait_bound(&gateway, 1).await;
    spare.stop();
    eventually(Duration::from_secs(15), "spare to be down", || async {
        let status = admin(&gateway, "/admin/status").await;
        (status["carriers"][1]["binds_up"] == 0).then_some(())
    })
    .await;

    // The running gateway's admin socket is beside its store; nothing serves `nobody.sock`.
    let running = dir.path().join("running.toml");
    std::fs::write(&running, &text).unwrap();
    let offline = dir.path().join("offline.toml");
    let nobody = dir.path().join("nobody.sock");
    std::fs::write(
        &offline,
        format!("{text}\n[admin]\nsocket = \"{}\"\n", nobody.display()),
    )
    .unwrap();

    let (ok, out) = smsgw_route(&running, &["+46 70 123 45 67"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("rule: swedish-mobiles (prefix +4670)"),
        "{out}"
    );
    assert!(out.contains("1. sim"), "{out}");
    assert!(out.contains("usable"), "{out}");
    assert!(out.contains("2. spare"), "{out}");
    assert!(out.contains("down (no bind up)"), "{out}");
    assert!(out.contains("the running gateway"), "{out}");

    let (ok, out) = smsgw_route(&offline, &[NORWEGIAN, "--category", "marketing"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("rule: marketing (category marketing)"),
        "{out}"
    );
    assert!(out.contains("state unknown"), "{out}");
    assert!(out.contains("the configuration only"), "{out}");

    let (ok, out) = smsgw_route(&running, &[NORWEGIAN]).await;
    assert!(!ok && out.contains("no route matches"), "{out}");
    gateway.stop().await;
}

async fn smsgw_route(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_smsgw"));
    command.arg("route").args(args).arg("--config").arg(config);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

//! Several gateways on one PostgreSQL database (`SMSGW_TEST_POSTGRES_URL`; each test makes a
//! database of its own, and says loudly when the variable is unset): the end-to-end path on
//! PostgreSQL, binds owned by one instance at a time, and a real daemon killed mid-traffic.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::pg::TestDb;
use common::*;
use smsgw::encoding;
use smsgw::sim::SimConfig;

const TO: &str = "+46701234567";

/// The test configuration with its store on PostgreSQL.
fn pg_config(db: &TestDb, carrier: SocketAddr, hooks: Option<&str>) -> smsgw::config::Config {
    let (_dir, path) = temp_db();
    let text = config_text(&path, carrier, hooks).replace(
        &format!("path = \"{}\"", path.display()),
        &format!("url = \"{}\"", db.url),
    );
    // No store directory to put the admin socket in (these tests do not use it).
    parse_config(&format!("{text}\n[admin]\nenabled = false\n"))
}

#[tokio::test]
async fn on_postgres_a_message_is_sent_delivered_and_reported_by_webhooks() {
    let Some(db) = TestDb::create("e2e_delivered").await else {
        return;
    };
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let gateway = Gateway::start(pg_config(&db, sim.address(), Some(&hooks.url))).await;
    gateway.wait_ready().await;
    let (status, answer) = gateway.post(KEY_A, &message(TO, "Hej!")).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let m = gateway.wait_status(KEY_A, &id, "delivered").await;
    let history: Vec<&str> = m["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["queued", "sending", "sent", "delivered"]);
    let seen = eventually(Duration::from_secs(10), "three webhooks", || async {
        let seen = hooks.bodies();
        (seen.len() >= 3).then_some(seen)
    })
    .await;
    let mut statuses: Vec<String> = seen
        .iter()
        .map(|(_, b)| b["status"].as_str().unwrap_or("").to_owned())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["delivered", "queued", "sent"]);
    assert_eq!(sim.handle.submitted_count(), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn on_postgres_a_receipt_that_beats_its_submit_response_still_matches() {
    let Some(db) = TestDb::create("e2e_early").await else {
        return;
    };
    let sim = Sim::start(SimConfig {
        receipt_before_response: true,
        ..sim_config()
    })
    .await;
    let gateway = Gateway::start(pg_config(&db, sim.address(), None)).await;
    gateway.wait_ready().await;
    let (_, answer) = gateway.post(KEY_A, &message(TO, "early receipt")).await;
    gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    gateway.stop().await;
}

#[tokio::test]
async fn on_postgres_an_idempotency_key_and_an_opt_out_hold_across_gateways() {
    let Some(db) = TestDb::create("e2e_shared").await else {
        return;
    };
    let sim = Sim::start(sim_config()).await;
    let one = Gateway::start(pg_config(&db, sim.address(), None)).await;
    let two = Gateway::start(pg_config(&db, sim.address(), None)).await;
    let body = serde_json::to_vec(&message(TO, "once")).unwrap();
    let key = [("idempotency-key", "order-1")];
    let (status, _, first) = one.post_raw(KEY_A, body.clone(), &key).await;
    assert_eq!(status, 202, "{first}");
    let (status, _, again) = two.post_raw(KEY_A, body, &key).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(
        first["id"], again["id"],
        "the other gateway replays the answer"
    );

    let (status, answer) = one
        .post_json(KEY_A, "/v1/opt-outs", &json!({ "number": "+46709999999" }))
        .await;
    assert!(status < 300, "{status} {answer}");
    let marketing = json!({ "to": "+46709999999", "from": "iP1", "text": "offer",
                            "category": "marketing" });
    let (_, refused) = two.post(KEY_A, &marketing).await;
    assert_eq!(refused["status"], "refused_opted_out", "{refused}");
    one.stop().await;
    two.stop().await;
}

/// Waits until `gateway` answers /readyz with 200 (one of its binds is up).
async fn is_ready(gateway: &Gateway) -> bool {
    gateway
        .client
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn a_bind_runs_in_one_gateway_at_a_time_and_moves_when_its_owner_stops() {
    let Some(db) = TestDb::create("bind_owner").await else {
        return;
    };
    let sim = Sim::start(sim_config()).await;
    // One bind for the carrier: the second gateway waits for it.
    let first = Gateway::start(pg_config(&db, sim.address(), None)).await;
    first.wait_ready().await;
    let second = Gateway::start(pg_config(&db, sim.address(), None)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!is_ready(&second).await, "the second gateway bound as well");
    assert_eq!(
        sim.handle.bind_attempts(),
        1,
        "one bind, by the first gateway"
    );

    // Messages taken by the second gateway are sent through the first one's bind.
    let (_, answer) = second.post(KEY_A, &message(TO, "via the other")).await;
    let id = answer["id"].as_str().unwrap().to_owned();
    second.wait_status(KEY_A, &id, "delivered").await;

    first.stop().await;
    eventually(
        Duration::from_secs(30),
        "the second gateway to bind",
        || async { is_ready(&second).await.then_some(()) },
    )
    .await;
    let (_, answer) = second.post(KEY_A, &message(TO, "after the move")).await;
    second
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(sim.handle.submitted_count(), 2);
    second.stop().await;
}

// ---- two daemons, one killed ----

fn daemon_config(db: &TestDb, sims: &[SocketAddr]) -> String {
    let carriers: String = sims
        .iter()
        .enumerate()
        .map(|(i, address)| {
            format!(
                "[[carriers]]\nname = \"sim{i}\"\naddress = \"{address}\"\nwindow = 50\n\
                 rate_per_second = 5000\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\
                 response_timeout = \"3s\"\n"
            )
        })
        .collect();
    format!(
        r#"
        [http]
        listen = "127.0.0.1:0"
        [admin]
        enabled = false
        [metrics]
        listen = "127.0.0.1:0"
        [store]
        url = "{url}"
        lease = "10s"
        [messages]
        retry_schedule = ["200ms"]
        [privacy]
        pseudonym_key = "test-pseudonym-key-0123456789"
        [logging]
        format = "json"
        [[accounts]]
        name = "a"
        api_keys = ["{hash_a}"]
        senders = ["iP1"]
        {carriers}
        "#,
        url = db.url,
        hash_a = smsgw::api::auth::hash_key(KEY_A),
    )
}

/// Starts `smsgw run` and returns it with its API address (from its JSON log).
/// The daemon, its API's URL and its metrics listener's.
fn start_daemon(config: &std::path::Path) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, logs) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Keep reading after the address is known, so that the daemon never blocks.
            let _ = lines.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    while Instant::now() < deadline {
        let Ok(line) = logs.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
        let address = event["fields"]["address"].as_str().unwrap_or_default();
        if event["fields"]["message"] == "metrics listening" {
            metrics = format!("http://{address}");
        }
        if event["fields"]["message"] == "HTTP API listening" {
            return (child, format!("http://{address}"), metrics);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the daemon did not start listening");
}

/// Submits messages `from..to` (text "m{i}") in batches of 100; returns index → id.
async fn submit_range(url: &str, range: std::ops::Range<usize>) -> HashMap<usize, String> {
    let client = reqwest::Client::new();
    let mut ids = HashMap::new();
    let indices: Vec<usize> = range.collect();
    for chunk in indices.chunks(100) {
        let messages: Vec<Value> = chunk
            .iter()
            .map(|i| message(&format!("+4670{:07}", i), &format!("m{i}")))
            .collect();
        let answer: Value = client
            .post(format!("{url}/v1/messages"))
            .bearer_auth(KEY_A)
            .json(&json!({ "messages": messages }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let results = answer["messages"].as_array().expect("a batch answer");
        for (i, result) in chunk.iter().zip(results) {
            assert_eq!(result["status"], "queued", "{result}");
            ids.insert(*i, result["id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

/// Binds up per carrier, from a daemon's /readyz (its own sessions).
async fn binds_up(url: &str, carrier: &str) -> Option<u64> {
    let answer: Value = reqwest::get(format!("{url}/readyz"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    answer["carriers"][carrier]["binds_up"].as_u64()
}

/// The submit_sm a daemon had accepted by `carrier`, from its metrics listener.
async fn accepted_submits(url: &str, carrier: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("{url}/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("smsgw_submits_total{"))
        .filter(|l| l.contains(&format!("carrier=\"{carrier}\"")))
        .filter(|l| l.contains("outcome=\"accepted\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until every message went out and was answered, and returns the texts the simulator
/// was sent (with how many times).
async fn settled_texts(pool: &sqlx::PgPool, sim: &Sim, total: usize) -> HashMap<String, usize> {
    eventually(Duration::from_secs(120), "every message sent", || async {
        // `sent` counts: a receipt the simulator writes to a session just given up is not
        // written again (a real SMSC would resend an unacknowledged deliver_sm).
        let out: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE status IN ('sent', 'delivered')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (out as usize == total).then_some(())
    })
    .await;
    let mut times: HashMap<String, usize> = HashMap::new();
    for pdu in sim.handle.submitted() {
        *times
            .entry(encoding::decode(pdu.data_coding, &pdu.short_message))
            .or_default() += 1;
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_spread_a_carriers_two_binds_and_both_send() {
    let Some(db) = TestDb::create("spread").await else {
        return;
    };
    let sim = Sim::start(sim_config()).await;
    // Two binds at 100/s each: a backlog that takes seconds, so that a bind is handed over
    // while its window is full.
    let text = daemon_config(&db, &[sim.address()]).replace(
        "rate_per_second = 5000\n",
        "rate_per_second = 100\nbinds = 2\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("smsgw.toml");
    std::fs::write(&config, text).unwrap();
    let (mut first, first_url, first_metrics) = start_daemon(&config);
    eventually(
        Duration::from_secs(30),
        "the instance alone to hold both binds",
        || async { (binds_up(&first_url, "sim0").await == Some(2)).then_some(()) },
    )
    .await;
    let backlog = 2_000;
    let mut ids = submit_range(&first_url, 0..backlog).await;

    let (mut second, second_url, second_metrics) = start_daemon(&config);
    eventually(
        Duration::from_secs(60),
        "each instance to hold one bind",
        || async {
            let one = binds_up(&first_url, "sim0").await;
            let two = binds_up(&second_url, "sim0").await;
            (one == Some(1) && two == Some(1)).then_some(())
        },
    )
    .await;
    // More traffic through both, in rounds until both instances have submitted (which claims
    // what is up to the queue: a round may go all to one).
    let mut total = backlog;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, b) = tokio::join!(
            submit_range(&first_url, total..total + 100),
            submit_range(&second_url, total + 100..total + 200)
        );
        ids.extend(a);
        ids.extend(b);
        total += 200;
        let one = accepted_submits(&first_metrics, "sim0").await;
        let two = accepted_submits(&second_metrics, "sim0").await;
        if one > 0.0 && two > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both instances to submit: {one} and {two} accepted"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(ids.len(), total);

    // The hand-over lost and repeated nothing: the session drained its window first.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let times = settled_texts(&pool, &sim, total).await;
    assert_eq!(times.len(), total, "every message reached the carrier");
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "submitted twice: {twice:?}");
    assert_eq!(
        (
            binds_up(&first_url, "sim0").await,
            binds_up(&second_url, "sim0").await
        ),
        (Some(1), Some(1)),
        "the binds stayed spread"
    );
    for child in [&mut first, &mut second] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}

fn message_count() -> usize {
    std::env::var("SMSGW_TEST_INSTANCES_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_the_queue_and_a_killed_ones_messages_are_sent_by_the_other() {
    let Some(db) = TestDb::create("kill").await else {
        return;
    };
    let total = message_count();
    // The carriers are down while the first half is queued: then the daemon that holds the
    // binds (the first started) sends a backlog, with many claims in flight when it is killed.
    let addresses: Vec<SocketAddr> = (0..2)
        .map(|_| {
            let parked = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            parked.local_addr().unwrap()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("smsgw.toml");
    std::fs::write(&config, daemon_config(&db, &addresses)).unwrap();
    let (mut doomed, doomed_url, _) = start_daemon(&config);
    let (mut survivor, survivor_url, _) = start_daemon(&config);

    let half = total / 2;
    let (mut ids, second) = tokio::join!(
        submit_range(&doomed_url, 0..half / 2),
        submit_range(&survivor_url, half / 2..half)
    );
    ids.extend(second);
    let mut sims = Vec::new();
    for address in &addresses {
        sims.push(Sim::start_on(*address, sim_config()).await);
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    eventually(Duration::from_secs(60), "traffic under way", || async {
        let submitted: usize = sims.iter().map(|s| s.handle.submitted_count()).sum();
        (submitted >= half / 4).then_some(())
    })
    .await;
    doomed.kill().unwrap();
    let _ = doomed.wait();
    // What the killed daemon held: claimed (sending), so possibly submitted unanswered.
    let window: HashSet<String> =
        sqlx::query_scalar("SELECT id FROM messages WHERE status = 'sending'")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(
        !window.is_empty(),
        "the daemon was killed with nothing in flight"
    );
    ids.extend(submit_range(&survivor_url, half..total).await);

    let final_states = "('delivered', 'undelivered', 'expired', 'failed', 'unknown')";
    let open_sql = format!("SELECT id, status FROM messages WHERE status NOT IN {final_states}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let left: Vec<(String, String)> = loop {
        let left: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(open_sql.clone()))
            .fetch_all(&pool)
            .await
            .unwrap();
        // Only `sent` may stay: a receipt the simulator wrote to the killed daemon's socket
        // is not written again (a real SMSC would resend an unacknowledged deliver_sm).
        if left.iter().all(|(_, s)| s == "sent") || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lost_receipts = left.len();
    assert!(
        left.iter().all(|(_, s)| s == "sent"),
        "messages not final after 180 s: {:?}",
        &left[..left.len().min(10)]
    );
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        count as usize, total,
        "every accepted message is stored once"
    );

    // Submitted twice: only messages the killed daemon held when it died.
    let by_id: HashMap<&String, usize> = ids.iter().map(|(i, id)| (id, *i)).collect();
    let mut times: HashMap<String, usize> = HashMap::new();
    for sim in &sims {
        for pdu in sim.handle.submitted() {
            *times
                .entry(encoding::decode(pdu.data_coding, &pdu.short_message))
                .or_default() += 1;
        }
    }
    assert_eq!(times.len(), total, "every message reached a carrier");
    let twice: Vec<&String> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, _)| t)
        .collect();
    let in_window: HashSet<String> = window
        .iter()
        .filter_map(|id| by_id.get(id))
        .map(|i| format!("m{i}"))
        .collect();
    for text in &twice {
        if in_window.contains(*text) {
            continue;
        }
        // Its history says why it went twice.
        let id = ids
            .iter()
            .find(|(i, _)| format!("m{i}") == **text)
            .map(|(_, id)| id.clone())
            .unwrap_or_default();
        let history: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT at, status, detail FROM events WHERE message_id = $1 ORDER BY id",
        )
        .bind(&id)
        .fetch_all(&pool)
        .await
        .unwrap();
        panic!(
            "{text} ({id}) was submitted twice but was not in the killed daemon's window: {history:?}"
        );
    }
    assert!(
        lost_receipts <= window.len() + 500,
        "{lost_receipts} receipts lost"
    );
    eprintln!(
        "{total} messages; the killed daemon held {} claims; {} submitted twice (all among them); \
         {lost_receipts} left `sent` (receipt written to the killed daemon)",
        window.len(),
        twice.len()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &survivor.id().to_string()])
        .status();
    let _ = survivor.wait();
}

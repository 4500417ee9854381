//! Crash safety: the real binary is SIGKILLed at random points under load, restarted on the same
//! SQLite file, and the carrier's record (the simulator runs in this test process, so it
//! outlives every daemon) is checked against the store: every accepted message was submitted
//! at least once and ended delivered, and every duplicate submit is one the history owns up to.
//! The account's webhook receiver (also in this process) must have received every status change
//! of every stored message at least once: none is lost to a kill between commit and post.
//!
//! The seed of the random kill points is printed; `SMSGW_CRASH_SEED=<seed>` replays a run.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::Row;
use tokio::sync::Mutex;

use common::*;

const ROUNDS: usize = 4;
const CLIENTS: usize = 6;
const BATCH: usize = 10;
/// Messages each round has accepted before its kill point is drawn.
const MIN_PER_ROUND: usize = 100;
/// What the history of a message says when a submit of it may have reached the carrier
/// unanswered: the lease released at start-up, or the link lost with the window in flight.
const UNCERTAIN: [&str; 2] = ["may or may not have reached", "a duplicate is possible"];
const OPEN_COUNT: &str = "SELECT COUNT(*) FROM messages WHERE status NOT IN
    ('delivered', 'undelivered', 'expired', 'failed', 'canceled', 'unknown')";

fn config(db: &Path, carrier: std::net::SocketAddr, hooks: &str) -> String {
    format!(
        r#"
        [http]
        listen = "127.0.0.1:0"
        [admin]
        enabled = false
        [store]
        path = "{db}"
        [messages]
        retry_schedule = ["200ms"]
        [webhooks]
        {ALLOW_LOOPBACK}
        [privacy]
        pseudonym_key = "test-pseudonym-key-0123456789"
        [logging]
        format = "json"
        [[accounts]]
        name = "a"
        api_keys = ["{hash_a}"]
        webhook_url = "{hooks}"
        webhook_secret = "crash-test-secret"
        [[carriers]]
        name = "sim"
        address = "{carrier}"
        binds = 2
        window = 20
        rate_per_second = 5000
        reconnect_min = "50ms"
        reconnect_max = "500ms"
        response_timeout = "3s"
        "#,
        db = db.display(),
        hash_a = smsgw::api::auth::hash_key(KEY_A),
    )
}

/// What the load saw: texts whose batch was answered 202, with the id the gateway gave each.
type Accepted = Arc<Mutex<HashMap<String, String>>>;

/// Posts batches of uniquely numbered messages until `stop`; a failed request (the daemon
/// died) ends the client.
async fn load(url: String, round: usize, client: usize, stop: Arc<AtomicBool>, accepted: Accepted) {
    let http = reqwest::Client::new();
    for request in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let texts: Vec<String> = (0..BATCH)
            .map(|n| format!("crash r{round} c{client} q{request} n{n}"))
            .collect();
        let messages: Vec<Value> = texts
            .iter()
            .map(|text| json!({"to": "+46701234567", "from": "iP1", "text": text}))
            .collect();
        let answer = http
            .post(format!("{url}/v1/messages"))
            .bearer_auth(KEY_A)
            .json(&json!({ "messages": messages }))
            .send()
            .await;
        let Ok(answer) = answer else { return };
        if answer.status().as_u16() != 202 {
            return;
        }
        let Ok(body) = answer.json::<Value>().await else {
            return;
        };
        let mut accepted = accepted.lock().await;
        for (text, item) in texts.into_iter().zip(body["messages"].as_array().unwrap()) {
            let id = item["id"].as_str().expect("each accepted item has an id");
            accepted.insert(text, id.to_owned());
        }
    }
}

async fn open_store(db: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .expect("the store opens read-only")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing_and_every_duplicate_is_in_the_history() {
    let seed = std::env::var("SMSGW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("crash test seed: {seed} (replay with SMSGW_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let sim = Sim::start(smsgw::sim::SimConfig {
        receipt_delay: Duration::from_millis(20),
        ..smsgw::sim::SimConfig::default()
    })
    .await;
    let hooks = Hooks::start().await;
    let (dir, db) = temp_db();
    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, config(&db, sim.address(), &hooks.url)).unwrap();
    let accepted: Accepted = Arc::default();

    for round in 0..ROUNDS {
        let daemon = Daemon::start(&path);
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                tokio::spawn(load(
                    daemon.url.clone(),
                    round,
                    client,
                    stop.clone(),
                    accepted.clone(),
                ))
            })
            .collect();
        // Each round stores some load first, so that every kill has something to lose.
        let before = accepted.lock().await.len();
        eventually(
            Duration::from_secs(30),
            "the round's first messages",
            || async { (accepted.lock().await.len() >= before + MIN_PER_ROUND).then_some(()) },
        )
        .await;
        // Killed under load, or (one round in three) a moment after the load stopped, while
        // the backlog is being sent.
        let under_load = rng.random_bool(2.0 / 3.0);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
        if !under_load {
            stop.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        }
        println!(
            "round {round}: SIGKILL {} after {} messages accepted in all, {} submits seen",
            if under_load {
                "under load"
            } else {
                "while sending the backlog"
            },
            accepted.lock().await.len(),
            sim.handle.submitted_count()
        );
        daemon.kill();
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            let _ = client.await;
        }
    }

    // One last run sends whatever is left, and stops cleanly.
    let daemon = Daemon::start(&path);
    let store = open_store(&db).await;
    let what = "every stored message to end final";
    eventually(Duration::from_secs(90), what, || async {
        let open: i64 = sqlx::query_scalar(OPEN_COUNT)
            .fetch_one(&store)
            .await
            .ok()?;
        (open == 0).then_some(())
    })
    .await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM messages")
        .fetch_all(&store)
        .await
        .unwrap();
    let expected = sent_and_delivered(&ids);
    eventually(
        Duration::from_secs(60),
        "every status change of every message posted",
        || async { expected.is_subset(&hooks.statuses()).then_some(()) },
    )
    .await;
    daemon.terminate();

    let accepted = accepted.lock().await.clone();
    let mut submits: HashMap<String, usize> = HashMap::new();
    for pdu in sim.handle.submitted() {
        let text = String::from_utf8_lossy(&pdu.short_message).into_owned();
        *submits.entry(text).or_default() += 1;
    }
    let rows = sqlx::query("SELECT id, body, status FROM messages")
        .fetch_all(&store)
        .await
        .unwrap();
    let mut uncertain: HashMap<String, usize> = HashMap::new();
    for event in sqlx::query("SELECT message_id, detail FROM events WHERE detail IS NOT NULL")
        .fetch_all(&store)
        .await
        .unwrap()
    {
        let detail: String = event.get("detail");
        if UNCERTAIN.iter().any(|u| detail.contains(u)) {
            *uncertain.entry(event.get("message_id")).or_default() += 1;
        }
    }

    let stored: HashSet<String> = rows.iter().map(|r| r.get::<String, _>("id")).collect();
    for (text, id) in &accepted {
        assert!(
            stored.contains(id),
            "accepted {id} ({text:?}) is not in the store"
        );
    }
    let mut duplicates = 0;
    for row in &rows {
        let id: String = row.get("id");
        let body: String = row.get("body");
        let status: String = row.get("status");
        assert_eq!(
            status, "delivered",
            "message {id} ({body:?}) ended {status}"
        );
        let sent = submits.get(&body).copied().unwrap_or(0);
        assert!(
            sent >= 1,
            "message {id} ({body:?}) never reached the carrier"
        );
        let owned_up = uncertain.get(&id).copied().unwrap_or(0);
        assert!(
            sent <= 1 + owned_up,
            "message {id} ({body:?}) was submitted {sent} times, but its history records only \
             {owned_up} uncertain submit(s)"
        );
        duplicates += sent - 1;
    }
    let texts: HashSet<String> = rows.iter().map(|r| r.get::<String, _>("body")).collect();
    for text in submits.keys() {
        assert!(
            texts.contains(text),
            "the carrier got {text:?}, which is not in the store"
        );
    }
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&store)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
    println!(
        "{} messages stored ({} answered 202), {} submits, {duplicates} duplicates, each \
         recorded in its history; {} webhooks received for {} status changes",
        rows.len(),
        accepted.len(),
        sim.handle.submitted_count(),
        hooks.raw().len(),
        expected.len()
    );
}

//! The `smsgw run` process as systemd runs it: signals, reload, clean exit.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn config(db: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
        [http]
        listen = "127.0.0.1:0"
        [admin]
        enabled = false
        [store]
        path = "{db}"
        [privacy]
        pseudonym_key = "test-pseudonym-key-0123456789"
        [logging]
        format = "json"
        [[accounts]]
        name = "a"
        api_keys = ["{hash_a}"]
        {extra}
        [[carriers]]
        name = "simulated"
        simulator = {{ receipt_delay = "10ms" }}
        "#,
        db = db.display(),
        hash_a = smsgw::api::auth::hash_key(KEY_A),
    )
}

/// Starts the daemon and returns it with the address its API listens on (from its JSON log).
fn start(config_path: &std::path::Path) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["run", "--config", config_path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, logs) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Ok(line) = logs.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if event["fields"]["message"] == "HTTP API listening" {
            let address = event["fields"]["address"].as_str().unwrap().to_owned();
            return (child, format!("http://{address}"), logs);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the daemon did not start listening");
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name}");
}

async fn submit(url: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .bearer_auth(key)
        .json(&message("+46701234567", "hello"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn sighup_applies_new_accounts_refuses_a_bad_file_and_sigterm_exits_cleanly() {
    let (dir, db) = temp_db();
    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, config(&db, "")).unwrap();
    let (mut child, url, logs) = start(&path);

    assert_eq!(submit(&url, KEY_A).await, 202);
    assert_eq!(submit(&url, KEY_B).await, 401);

    let account_b = format!(
        "[[accounts]]\nname = \"b\"\napi_keys = [\"{}\"]\n",
        smsgw::api::auth::hash_key(KEY_B)
    );
    std::fs::write(&path, config(&db, &account_b)).unwrap();
    signal(&child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while submit(&url, KEY_B).await != 202 {
        assert!(Instant::now() < deadline, "the reload did not apply");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken file is refused; the gateway keeps running with what it had.
    std::fs::write(&path, "this is not toml").unwrap();
    signal(&child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = logs
            .recv_timeout(Duration::from_millis(200))
            .unwrap_or_default();
        if line.contains("reload refused") {
            break;
        }
        assert!(Instant::now() < deadline, "no refusal logged");
    }
    assert_eq!(submit(&url, KEY_B).await, 202);

    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

/// Waits for a log line that contains every one of `words`.
fn wait_for_log(logs: &std::sync::mpsc::Receiver<String>, words: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = logs
            .recv_timeout(Duration::from_millis(200))
            .unwrap_or_default();
        if words.iter().all(|w| line.contains(w)) {
            return line;
        }
        assert!(Instant::now() < deadline, "no log line with {words:?}");
    }
}

#[tokio::test]
async fn sighup_changes_a_carriers_rate_live_and_says_a_new_carrier_needs_a_restart() {
    let (dir, db) = temp_db();
    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, config(&db, "")).unwrap();
    let (mut child, url, logs) = start(&path);

    let changed = config(&db, "")
        + "        rate_per_second = 9\n        [[carriers]]\n        name = \"later\"\n        address = \"127.0.0.1:9\"\n";
    std::fs::write(&path, changed).unwrap();
    signal(&child, "HUP");
    let line = wait_for_log(&logs, &["carrier limits reloaded", "simulated"]);
    assert!(line.contains("\"rate_per_second\":9"), "{line}");
    wait_for_log(&logs, &["need a restart", "carriers"]);
    assert_eq!(submit(&url, KEY_A).await, 202, "still serving");

    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

//! Erasure on disk: what `DELETE /v1/subjects/{number}` and `smsgw subject erase` remove must
//! be gone from the bytes of the SQLite database file, its WAL and its shared-memory file, not
//! only from what queries return. SQLite leaves deleted cells in free space and old pages in
//! the WAL unless told otherwise; these tests grep the raw files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use common::*;

const SUBJECT: &str = "+46701357913";
const SUBJECT_PATH: &str = "%2B46701357913";
const TEXT: &str = "Quokka-7731 is your code";
const INBOUND_TEXT: &str = "Pangolin-5521 thanks";
const OURS: &str = "+46700000001";

/// A text whose row does not fit in one page (over 4 KB in UTF-8): it spills onto overflow
/// pages, which are freed whole when the row goes.
fn long_text() -> String {
    "Жирафы".repeat(350)
}

/// What must not be left anywhere: the number with and without `+`, and every text.
fn traces_of_subject() -> Vec<Vec<u8>> {
    [
        SUBJECT,
        &SUBJECT[1..],
        "Quokka-7731",
        "Pangolin-5521",
        "ЖирафыЖирафы",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// The database file and its companions, those that exist.
fn database_files(db: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", db.display())))
        .filter(|path| path.exists())
        .collect()
}

/// Each (file, trace) where the bytes of `trace` occur in the file.
fn found(db: &Path, traces: &[Vec<u8>]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for path in database_files(db) {
        let bytes = std::fs::read(&path).unwrap();
        for trace in traces {
            if bytes.windows(trace.len()).any(|w| w == trace.as_slice()) {
                found.push((
                    path.display().to_string(),
                    String::from_utf8_lossy(trace).into_owned(),
                ));
            }
        }
    }
    found
}

/// The test configuration, with room for the long text (32 UCS-2 segments).
fn config(db: &Path, sim: &Sim, hooks: &Hooks) -> String {
    config_text(db, sim.address(), Some(&hooks.url)).replace(
        "retry_schedule = [\"200ms\"]",
        "retry_schedule = [\"200ms\"]\nmax_segments = 40",
    )
}

/// `count` messages of account a to other numbers, so that the subject's rows share their
/// pages (and index pages) with rows that stay.
async fn others(gateway: &Gateway, from: usize, count: usize) {
    let batch: Vec<Value> = (from..from + count)
        .map(|i| message(&format!("+467020{i:05}"), &format!("other message {i}")))
        .collect();
    for chunk in batch.chunks(100) {
        let (status, body) = gateway.post(KEY_A, &json!({ "messages": chunk })).await;
        assert_eq!(status, 202, "{body}");
    }
}

#[tokio::test]
async fn an_erased_subject_is_gone_from_every_byte_of_the_database_files() {
    let (_dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let gateway = Gateway::start(parse_config(&config(&db, &sim, &hooks))).await;
    gateway.wait_ready().await;

    others(&gateway, 0, 300).await;
    let mut ids = Vec::new();
    for text in [TEXT.to_owned(), long_text()] {
        let (status, body) = gateway.post(KEY_A, &message(SUBJECT, &text)).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    others(&gateway, 300, 300).await;
    for id in &ids {
        gateway.wait_status(KEY_A, id, "delivered").await;
    }
    sim.handle
        .send_mo(SUBJECT, OURS, INBOUND_TEXT)
        .await
        .unwrap();
    let (status, body) = gateway
        .post_json(KEY_A, "/v1/opt-outs", &json!({ "number": SUBJECT }))
        .await;
    assert_eq!(status, 201, "{body}");
    eventually(
        Duration::from_secs(10),
        "the inbound SMS stored",
        || async {
            let (_, export) = gateway
                .get(KEY_A, &format!("/v1/subjects/{SUBJECT_PATH}/export"))
                .await;
            (export["inbound"].as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    // The test can fail: every trace is on disk before the erasure.
    let before = found(&db, &traces_of_subject());
    for trace in traces_of_subject() {
        let trace = String::from_utf8_lossy(&trace).into_owned();
        assert!(
            before.iter().any(|(_, t)| *t == trace),
            "{trace} is not on disk before the erasure: {before:?}"
        );
    }

    let (status, erased) = gateway
        .delete(KEY_A, &format!("/v1/subjects/{SUBJECT_PATH}"))
        .await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(
        (erased["messages"].as_u64(), erased["inbound"].as_u64()),
        (Some(2), Some(1))
    );

    // Once the erasure is answered, while the daemon runs and keeps its files open.
    let left = found(&db, &traces_of_subject());
    assert!(left.is_empty(), "left on disk after the erasure: {left:?}");
    // The other messages are still there, and still readable.
    let (_, list) = gateway.get(KEY_A, "/v1/messages?to=%2B46702000042").await;
    assert_eq!(list["messages"].as_array().map(Vec::len), Some(1), "{list}");

    // More traffic, then a clean stop: nothing comes back.
    others(&gateway, 600, 100).await;
    gateway.stop().await;
    let left = found(&db, &traces_of_subject());
    assert!(left.is_empty(), "left on disk after the stop: {left:?}");
}

#[tokio::test]
async fn a_subject_erased_with_the_command_is_gone_from_every_byte_of_the_database_file() {
    let (dir, db) = temp_db();
    let sim = Sim::start(sim_config()).await;
    let hooks = Hooks::start().await;
    let text = config(&db, &sim, &hooks);
    let gateway = Gateway::start(parse_config(&text)).await;
    gateway.wait_ready().await;
    others(&gateway, 0, 200).await;
    let (status, body) = gateway.post(KEY_A, &message(SUBJECT, TEXT)).await;
    assert_eq!(status, 202, "{body}");
    others(&gateway, 200, 200).await;
    gateway
        .wait_status(KEY_A, body["id"].as_str().unwrap(), "delivered")
        .await;
    gateway.stop().await;
    let traces: Vec<Vec<u8>> = [SUBJECT, "Quokka-7731"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    assert!(
        !found(&db, &traces).is_empty(),
        "the traces are on disk before"
    );

    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["subject", "erase", "--account", "a", SUBJECT])
        .env("SMSGW_CONFIG", &path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("erased 1 messages"),
        "{output:?}"
    );
    let left = found(&db, &traces);
    assert!(left.is_empty(), "left on disk after the erasure: {left:?}");
}

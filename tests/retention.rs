//! The retention purge on a real SQLite file, through the `smsgw purge` command.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use smsgw::encoding::Encoding;
use smsgw::message::{Category, MessageId, Pseudonymizer, Status, now_ms};
use smsgw::store::sqlite::SqliteStore;
use smsgw::store::{AccountPolicy, NewMessage, Store, StoreRules, SubmitResult};

const DAY_MS: i64 = 24 * 3600 * 1000;

fn stored(id: MessageId, status: Status, created_at: i64) -> NewMessage {
    NewMessage {
        id,
        account: "a".into(),
        reference: None,
        recipient: "+46701234567".into(),
        sender: "iP1".into(),
        body: "a personal text".into(),
        category: Category::Transactional,
        encoding: Encoding::Gsm7,
        segments: 1,
        priority: 0,
        webhook_url: None,
        consent_at: None,
        status,
        detail: None,
        created_at,
        due_at: created_at,
        expires_at: created_at + DAY_MS,
    }
}

async fn body_of(db: &std::path::Path, id: MessageId) -> Option<Option<String>> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let body: Option<Option<String>> =
        sqlx::query_scalar("SELECT body FROM messages WHERE id = ?1")
            .bind(id.to_string())
            .fetch_optional(&pool)
            .await
            .unwrap();
    pool.close().await;
    body
}

async fn recipient_of(db: &std::path::Path, id: MessageId) -> String {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let recipient: String = sqlx::query_scalar("SELECT recipient FROM messages WHERE id = ?1")
        .bind(id.to_string())
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    recipient
}

fn purge(config: &std::path::Path, dry_run: bool) -> String {
    let mut args = vec!["purge"];
    if dry_run {
        args.push("--dry-run");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(&args)
        .env("SMSGW_CONFIG", config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn purge_removes_bodies_past_the_retention_and_keeps_the_rest() {
    let (dir, db) = temp_db();
    let config = dir.path().join("smsgw.toml");
    std::fs::write(
        &config,
        config_text(&db, "127.0.0.1:9".parse().unwrap(), None),
    )
    .unwrap();

    let now = now_ms();
    let old_done = MessageId::first_at(now - 40 * DAY_MS);
    let old_canceled = MessageId::first_at(now - 35 * DAY_MS);
    let recent = MessageId::new();
    let rules = StoreRules {
        pseudonyms: Pseudonymizer::new(b"test"),
        suspect_after: 0,
        suspect_codes: vec![],
    };
    let store = SqliteStore::open(&db, 16, rules).await.unwrap();
    let messages = vec![
        stored(old_done, Status::RefusedOptedOut, now - 40 * DAY_MS),
        stored(old_canceled, Status::Canceled, now - 35 * DAY_MS),
        stored(recent, Status::RefusedOptedOut, now),
    ];
    let render = Arc::new(|_: &[NewMessage]| (202, String::new()));
    let result = store
        .submit("a", AccountPolicy::default(), messages, None, render)
        .await
        .unwrap();
    assert!(matches!(result, SubmitResult::Stored { .. }));
    store.close().await;

    let dry = purge(&config, true);
    assert!(dry.contains("would remove: 2 message bodies"), "{dry}");
    assert!(dry.contains("1 canceled messages"), "{dry}");
    assert_eq!(
        body_of(&db, old_done).await,
        Some(Some("a personal text".into()))
    );

    let done = purge(&config, false);
    assert!(done.contains("removed: 2 message bodies"), "{done}");
    assert_eq!(
        body_of(&db, old_done).await,
        Some(None),
        "the old body is gone, the row stays"
    );
    assert!(
        recipient_of(&db, old_done).await.starts_with('~'),
        "its number is a pseudonym now"
    );
    assert_eq!(recipient_of(&db, recent).await, "+46701234567");
    assert_eq!(
        body_of(&db, old_canceled).await,
        None,
        "the old canceled message is gone"
    );
    assert_eq!(
        body_of(&db, recent).await,
        Some(Some("a personal text".into()))
    );

    let again = purge(&config, true);
    assert!(again.contains("would remove: 0 message bodies"), "{again}");
}

/// The files among the database and its WAL and shared-memory files that hold `trace`.
fn on_disk(db: &std::path::Path, trace: &str) -> Vec<String> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| format!("{}{suffix}", db.display()))
        .filter(|path| {
            std::fs::read(path)
                .is_ok_and(|bytes| bytes.windows(trace.len()).any(|w| w == trace.as_bytes()))
        })
        .collect()
}

#[tokio::test]
async fn purged_texts_and_numbers_are_gone_from_the_bytes_of_the_database_files() {
    const OLD_NUMBER: &str = "+46709753186";
    const OLD_TEXT: &str = "Okapi-4411 your parcel is here";
    let (dir, db) = temp_db();
    let config = dir.path().join("smsgw.toml");
    std::fs::write(
        &config,
        config_text(&db, "127.0.0.1:9".parse().unwrap(), None),
    )
    .unwrap();
    let now = now_ms();
    let rules = StoreRules {
        pseudonyms: Pseudonymizer::new(b"test"),
        suspect_after: 0,
        suspect_codes: vec![],
    };
    let store = SqliteStore::open(&db, 16, rules).await.unwrap();
    // Old messages to the number among recent ones to others, sharing their pages.
    let mut messages = Vec::new();
    for i in 0..400 {
        let old = i % 100 == 7;
        let created_at = if old { now - 40 * DAY_MS - i } else { now - i };
        let mut m = stored(
            MessageId::first_at(created_at),
            Status::Delivered,
            created_at,
        );
        if old {
            (m.recipient, m.body) = (OLD_NUMBER.into(), OLD_TEXT.into());
        } else {
            (m.recipient, m.body) = (format!("+467030{i:05}"), format!("recent text {i}"));
        }
        messages.push(m);
    }
    let render = Arc::new(|_: &[NewMessage]| (202, String::new()));
    let result = store
        .submit("a", AccountPolicy::default(), messages, None, render)
        .await
        .unwrap();
    assert!(matches!(result, SubmitResult::Stored { .. }));
    store.close().await;
    let traces = [OLD_NUMBER, &OLD_NUMBER[1..], "Okapi-4411"];
    for trace in traces {
        assert!(!on_disk(&db, trace).is_empty(), "{trace} is on disk before");
    }

    let done = purge(&config, false);
    assert!(done.contains("removed: 4 message bodies"), "{done}");
    for trace in traces {
        let files = on_disk(&db, trace);
        assert!(files.is_empty(), "{trace} left in {files:?}");
    }
    assert!(
        !on_disk(&db, "recent text 399").is_empty(),
        "the rest stays"
    );
}

//! A full disk: the SQLite file on an 8 MiB tmpfs that a filler file fills up. Accepting must
//! stop with `503 store_unavailable` and Retry-After (nothing half-stored), `/readyz` must say
//! so, the database must stay intact (`PRAGMA integrity_check`), and once space returns the
//! gateway must accept again and send everything, with no restart.
//!
//! Mounting needs root (CI runs as root); elsewhere the test says it was skipped.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use common::*;

/// A small tmpfs mounted on a temporary directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// None when this process may not mount (not root).
    fn mount(size: &str) -> Option<SmallDisk> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "root, but `mount -t tmpfs` failed");
        Some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros into `path` until the filesystem is full.
fn fill(path: &Path) -> PathBuf {
    let filler = path.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    // The last partial chunk: byte by byte is too slow, halve instead.
    let mut size = chunk.len() / 2;
    while size > 0 {
        if file.write_all(&chunk[..size]).is_err() {
            size /= 2;
        }
    }
    let _ = file.sync_all();
    filler
}

async fn integrity(db: &Path) -> String {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .expect("the store opens read-only");
    let answer = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| format!("integrity_check failed: {e}"));
    pool.close().await;
    answer
}

fn batch(tag: &str, n: usize) -> serde_json::Value {
    // Long texts, so that each batch needs fresh pages (and the WAL must grow).
    let messages: Vec<_> = (0..n)
        .map(|i| message("+46701234567", &format!("{tag} {i} {}", "x".repeat(600))))
        .collect();
    json!({ "messages": messages })
}

fn ids(answer: &serde_json::Value) -> Vec<String> {
    answer["messages"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_accepting_with_503_corrupts_nothing_and_recovers_by_itself() {
    let Some(disk) = SmallDisk::mount("8M") else {
        println!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let db = disk.path().join("smsgw.db");
    let sim = Sim::start(sim_config()).await;
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;
    gateway.wait_ready().await;
    let mut accepted = Vec::new();
    let (status, answer) = gateway.post(KEY_A, &batch("before", 5)).await;
    assert_eq!(status, 202, "{answer}");
    accepted.extend(ids(&answer));

    // The disk fills while the gateway goes on sending what it has.
    let filler = fill(disk.path());
    let mut refused = None;
    for round in 0..300 {
        let (status, headers, answer) = gateway
            .post_raw(
                KEY_A,
                serde_json::to_vec(&batch(&format!("full {round}"), 20)).unwrap(),
                &[],
            )
            .await;
        match status {
            202 => accepted.extend(ids(&answer)),
            503 => {
                refused = Some((headers, answer));
                break;
            }
            other => panic!("a submit on a full disk answered {other}: {answer}"),
        }
    }
    let (headers, answer) = refused.expect("the disk never filled up");
    assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    println!(
        "{} messages accepted before the disk was full",
        accepted.len()
    );

    // Still full: refused again, /readyz says why, reads still work, nothing is corrupt. A
    // batch may still fit where the refused transaction's WAL frames were (they are reused):
    // that one is accepted like any other, and the next are refused.
    let mut refused_again = false;
    for round in 0..20 {
        let (status, answer) = gateway
            .post(KEY_A, &batch(&format!("still full {round}"), 20))
            .await;
        match status {
            202 => accepted.extend(ids(&answer)),
            503 => {
                refused_again = true;
                break;
            }
            other => panic!("a submit on a full disk answered {other}: {answer}"),
        }
    }
    assert!(
        refused_again,
        "the disk is still full: submits are refused again"
    );
    let ready = gateway
        .client
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["store"], "full", "{ready}");
    gateway.message(KEY_A, &accepted[0]).await;
    assert_eq!(integrity(&db).await, "ok");

    // Space returns: the gateway takes submits again, by itself.
    std::fs::remove_file(&filler).unwrap();
    let what = "a submit to succeed once space returned";
    let after = eventually(Duration::from_secs(30), what, || async {
        let (status, answer) = gateway.post(KEY_A, &batch("after", 5)).await;
        (status == 202).then_some(answer)
    })
    .await;
    accepted.extend(ids(&after));
    gateway.wait_ready().await;

    for id in &accepted {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let m = gateway.message(KEY_A, id).await;
            if m["status"] == "delivered" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "message {id} not delivered 60 s after space returned: {m}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    gateway.stop().await;
    assert_eq!(integrity(&db).await, "ok");
}

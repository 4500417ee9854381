//! PostgreSQL for tests: each test gets a database of its own (created from
//! `SMSGW_TEST_POSTGRES_URL`, dropped when the test ends), so that tests run in parallel.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{Connection, Executor};

pub const URL_VAR: &str = "SMSGW_TEST_POSTGRES_URL";

/// A database created for one test; dropped (with any connections left) when this is dropped.
pub struct TestDb {
    pub url: String,
    server: String,
    name: String,
}

impl TestDb {
    /// A new, empty database; None (said loudly on stderr) when the variable is not set.
    pub async fn create(test: &str) -> Option<TestDb> {
        let Ok(server) = std::env::var(URL_VAR) else {
            eprintln!(
                "SKIPPED ON POSTGRESQL: {test}: {URL_VAR} is not set \
                 (e.g. postgres://postgres@127.0.0.1:5432/test); CI sets it"
            );
            return None;
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "smsgw_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst),
            test.chars()
                .filter(char::is_ascii_alphanumeric)
                .take(30)
                .collect::<String>()
        )
        .to_lowercase();
        let mut conn = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("{URL_VAR}={server}: cannot connect: {e}"));
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let _ = conn.close().await;
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("{URL_VAR} must end in /database"),
        };
        Some(TestDb { url, server, name })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime: the clean-up gets a thread and runtime of its own.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&server).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = conn.execute(sqlx::AssertSqlSafe(sql)).await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = done.join();
    }
}

//! SQLite backend: WAL, one writer thread that group-commits, a small pool of readers.
//!
//! SQLite has one writer at a time, so all writes go through one thread and one connection. The
//! thread takes every operation waiting in its channel (up to `max_batch`), applies them in one
//! `BEGIN IMMEDIATE` transaction and answers each caller after the commit: many concurrent HTTP
//! requests cost one fsync. If the batch fails, each operation is retried alone, so one bad
//! operation cannot fail its neighbours.
//!
//! The writer is a plain thread with its own `rusqlite` connection and cached prepared
//! statements: a batch runs its statements back to back, without a round trip to another
//! thread for each (which cost more than the statements themselves through sqlx's async
//! connection). Reads stay on sqlx's pool. Both link the same bundled `libsqlite3-sys`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Params, Transaction, TransactionBehavior};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use tokio::sync::{Mutex, mpsc};

mod policy;
mod receipts;
mod sql;

pub use sql::FACTS_QUERY;

use super::domain::{self, Effects, Job, OutboxRow, Reply, StatusPayload};
use super::shared::{parse_encoding, parse_id, parse_status};
use super::writer::Message;
use super::*;
use crate::message::now_ms;
use sql::SqliteTx;

/// The earliest due time of the waiting messages. The claim's index orders them by
/// (priority, due_at), so a plain `MIN(due_at)` would read every waiting row (a second with a
/// million scheduled); this takes the first entry of each priority lane instead, a few index
/// seeks however long the queue.
const NEXT_DUE_QUERY: &str = "WITH RECURSIVE lanes(priority) AS (
         SELECT MAX(priority) FROM messages WHERE status IN ('queued', 'scheduled')
         UNION ALL
         SELECT (SELECT MAX(priority) FROM messages
                 WHERE status IN ('queued', 'scheduled') AND priority < lanes.priority)
         FROM lanes WHERE lanes.priority IS NOT NULL
     )
     SELECT MIN((SELECT MIN(due_at) FROM messages
                 WHERE status IN ('queued', 'scheduled') AND priority = lanes.priority))
     FROM lanes WHERE lanes.priority IS NOT NULL";

pub struct SqliteStore {
    writer: Writer,
    readers: SqlitePool,
    rules: Arc<StoreRules>,
    signals: Arc<Signals>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<Checkpointer>>,
    /// When the writer last failed a write for a full disk (ms; 0: never).
    disk_full_at: Arc<AtomicI64>,
}

/// Whether two small side tables may hold rows, so that the common case skips a statement:
/// a receipt parked before its submit_sm_resp, and a number with unknown-subscriber results.
/// Set on every insert; cleared only when a query inside the writer finds the table empty.
/// A rolled-back insert leaves the flag set, which costs a statement, never a missed row.
#[derive(Debug, Default)]
struct MaybeRows {
    early_receipts: std::sync::atomic::AtomicBool,
    suspects: std::sync::atomic::AtomicBool,
}

impl MaybeRows {
    fn get(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set(flag: &std::sync::atomic::AtomicBool, value: bool) {
        flag.store(value, std::sync::atomic::Ordering::SeqCst)
    }

    /// Looks again (one statement), from inside the writer's transaction.
    fn refresh(&self, tx: &Tx) -> Result<(), StoreError> {
        let (early, suspects) = one(
            tx,
            "SELECT EXISTS (SELECT 1 FROM early_receipts), EXISTS (SELECT 1 FROM suspects)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Self::set(&self.early_receipts, early);
        Self::set(&self.suspects, suspects);
        Ok(())
    }
}

/// Counts changes of the policy's facts (opt-outs, number changes, suspects), so that a
/// message is checked again at send time only when something changed since it was decided.
/// The count only grows; a batch that rolls back leaves it higher than needed, which costs a
/// needless check, never a missed one. It starts above every stored message's generation, so
/// after a restart each waiting message is checked once more.
#[derive(Debug)]
struct PolicyClock {
    generation: std::sync::atomic::AtomicI64,
    /// The earliest future effective time of a number change: when it passes, the facts change.
    next_effective: std::sync::atomic::AtomicI64,
}

impl PolicyClock {
    fn current(&self) -> i64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn expect_change_at(&self, effective_at: i64) {
        self.next_effective
            .fetch_min(effective_at, std::sync::atomic::Ordering::SeqCst);
    }

    /// Bumps the generation if a dated change has taken effect; returns whether it did.
    fn tick(&self, now: i64) -> bool {
        let next = self
            .next_effective
            .load(std::sync::atomic::Ordering::SeqCst);
        if now < next {
            return false;
        }
        self.next_effective
            .store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
        self.bump();
        true
    }
}

/// The writer's connection, inside the transaction of its batch, with every statement it has
/// run kept prepared.
///
/// rusqlite's statement cache looks a statement up by its text: it hashes the SQL (a few
/// hundred bytes) on every run and again to put it back, and keeps an LRU list; that was 5% of
/// the writer's time. The writer's statements are constants, so the address and length of the
/// text name the statement (the length too, in case one constant begins where another does). A
/// statement is taken out while it runs, so a statement used again inside its own run (it never
/// is) would be prepared a second time, not shared.
///
/// A statement that repeats all the time writes its limit `LIMIT +?n`, not `LIMIT ?n`: SQLite's
/// planner reads a bare bound limit, so every new binding re-prepares the statement (a claim's
/// re-prepare was 4% of the writer's time). The plan is the same either way.
struct Tx<'c> {
    conn: &'c rusqlite::Connection,
    prepared: RefCell<HashMap<(usize, usize), rusqlite::Statement<'c>>>,
}

impl<'c> Tx<'c> {
    fn new(conn: &'c rusqlite::Connection) -> Tx<'c> {
        Tx {
            conn,
            prepared: RefCell::new(HashMap::new()),
        }
    }

    /// Runs `work` on the statement of `sql`, prepared the first time.
    fn with_statement<T>(
        &self,
        sql: &'static str,
        work: impl FnOnce(&mut rusqlite::Statement<'c>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let key = (sql.as_ptr() as usize, sql.len());
        let kept = self.prepared.borrow_mut().remove(&key);
        let mut statement = match kept {
            Some(statement) => statement,
            None => self.conn.prepare(sql)?,
        };
        let result = work(&mut statement);
        self.prepared.borrow_mut().insert(key, statement);
        Ok(result?)
    }

    fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(sql)?)
    }
}

/// Runs a kept statement; returns the rows it changed.
fn run(tx: &Tx, sql: &'static str, params: impl Params) -> Result<u64, StoreError> {
    tx.with_statement(sql, |s| s.execute(params).map(|n| n as u64))
}

/// The rows of a kept statement (a query or an `... RETURNING`), read by `read`.
fn rows<T>(
    tx: &Tx,
    sql: &'static str,
    params: impl Params,
    read: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    tx.with_statement(sql, |s| s.query_map(params, read)?.collect())
}

/// The first row of a kept statement, if any.
fn optional<T>(
    tx: &Tx,
    sql: &'static str,
    params: impl Params,
    read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, StoreError> {
    tx.with_statement(sql, |s| s.query_row(params, read).optional())
}

/// The one row a kept statement returns.
fn one<T>(
    tx: &Tx,
    sql: &'static str,
    params: impl Params,
    read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    tx.with_statement(sql, |s| s.query_row(params, read))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the embedded migrations.
    pub async fn open(
        path: &Path,
        max_batch: usize,
        rules: StoreRules,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // With WAL, NORMAL survives a process crash; FULL also survives power loss.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // Migrations run on a short-lived pool: `Migrator::run` on a bare connection makes the
        // future not `Send` (a higher-ranked lifetime limit of rustc).
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("src/store/migrations/sqlite")
            .run(&migrations)
            .await?;
        migrations.close().await;
        let mut conn = open_writer(path)?;
        let recovered = recover_webhooks(&mut conn)?;
        if recovered > 0 {
            tracing::info!(
                webhooks = recovered,
                "webhooks that were being posted when the last run ended: posted again"
            );
        }
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().read_only(true))
            .await?;
        let signals = Arc::new(Signals::default());
        let (writer, rx) = Writer::new(max_batch * 4);
        let rules = Arc::new(rules);
        let disk_full_at = Arc::new(AtomicI64::new(0));
        let recovery = Recovery {
            disk_full_at: disk_full_at.clone(),
        };
        let thread_signals = signals.clone();
        let thread_rules = rules.clone();
        let wal_limit = WalLimit::new(&conn, path, WAL_RESTART_BYTES)?;
        let handle = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                run_writer(
                    conn,
                    rx,
                    max_batch,
                    thread_signals,
                    thread_rules,
                    recovery,
                    wal_limit,
                )
            })
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        let checkpointer = Checkpointer::start(path)?;
        Ok(SqliteStore {
            writer,
            readers,
            rules,
            signals,
            thread: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some(checkpointer)),
            disk_full_at,
        })
    }

    async fn events_of(&self, id: MessageId) -> Result<Vec<EventView>, StoreError> {
        let events =
            sqlx::query("SELECT at, status, detail FROM events WHERE message_id = ?1 ORDER BY id")
                .bind(id.to_string())
                .fetch_all(&self.readers)
                .await?;
        events
            .iter()
            .map(|e| {
                Ok(EventView {
                    at: e.try_get("at")?,
                    status: parse_status(&e.try_get::<String, _>("status")?)?,
                    detail: e.try_get("detail")?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn writer(&self) -> &Writer {
        &self.writer
    }

    async fn list_opt_outs(
        &self,
        account: &str,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<OptOut>, StoreError> {
        policy::list_opt_outs(&self.readers, account, after, limit).await
    }

    async fn number_history(
        &self,
        account: &str,
        number: &str,
    ) -> Result<NumberHistory, StoreError> {
        policy::number_history(&self.readers, account, number).await
    }

    async fn queue(&self, status: Status, limit: u32) -> Result<Vec<MessageView>, StoreError> {
        let rows = sqlx::query("SELECT * FROM messages WHERE status = ?1 ORDER BY due_at LIMIT ?2")
            .bind(status.as_str())
            .bind(limit as i64)
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(view_from_row).collect()
    }

    async fn export_subject(
        &self,
        account: &str,
        number: &str,
    ) -> Result<SubjectExport, StoreError> {
        let rows = sqlx::query("SELECT * FROM messages WHERE account = ?1 AND recipient = ?2")
            .bind(account)
            .bind(number)
            .fetch_all(&self.readers)
            .await?;
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut view = view_from_row(row)?;
            view.events = self.events_of(view.id).await?;
            messages.push(view);
        }
        let key = self.rules.number_key(number);
        Ok(SubjectExport {
            messages,
            inbound: policy::inbound_from(&self.readers, account, number).await?,
            opt_outs: policy::opt_outs_of(&self.readers, account, &key).await?,
            number: policy::number_history(&self.readers, account, number).await?,
        })
    }

    async fn idempotent_answer(
        &self,
        account: &str,
        key: &str,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        let row = sqlx::query(
            "SELECT key, request_hash, status_code, answer FROM idempotency
             WHERE account = ?1 AND key = ?2",
        )
        .bind(account)
        .bind(key)
        .fetch_optional(&self.readers)
        .await?;
        row.map(|r| idempotent_from_row(&r)).transpose()
    }

    async fn get_message(
        &self,
        account: &str,
        id: MessageId,
    ) -> Result<Option<MessageView>, StoreError> {
        let row = sqlx::query("SELECT * FROM messages WHERE id = ?1 AND account = ?2")
            .bind(id.to_string())
            .bind(account)
            .fetch_optional(&self.readers)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut view = view_from_row(&row)?;
        view.events = self.events_of(id).await?;
        Ok(Some(view))
    }

    async fn list_messages(
        &self,
        account: &str,
        filter: &ListFilter,
    ) -> Result<Vec<MessageView>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM messages
             WHERE account = ?1
               AND (?2 IS NULL OR status = ?2)
               AND (?3 IS NULL OR recipient = ?3)
               AND id >= COALESCE(?4, '')
               AND id < COALESCE(?5, '~')
             ORDER BY id DESC LIMIT ?6",
        )
        .bind(account)
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.recipient.as_deref())
        // Ids are UUIDv7, which sort by creation time: `since` becomes an id bound.
        .bind(filter.since.map(|ms| MessageId::first_at(ms).to_string()))
        .bind(filter.before.map(|id| id.to_string()))
        .bind(filter.limit as i64)
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(view_from_row).collect()
    }

    async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        let due: Option<i64> = sqlx::query_scalar(NEXT_DUE_QUERY)
            .fetch_one(&self.readers)
            .await?;
        Ok(due)
    }

    async fn known_carrier_ids(
        &self,
        carrier: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        receipts::known_carrier_ids(&self.readers, carrier, ids).await
    }

    async fn next_webhook_due(&self) -> Result<Option<i64>, StoreError> {
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT due_at FROM webhooks WHERE locked_until IS NULL ORDER BY due_at LIMIT 1",
        )
        .fetch_optional(&self.readers)
        .await?;
        Ok(due)
    }

    async fn backlog(&self) -> Result<(i64, Option<i64>, i64), StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM messages WHERE status IN ('queued', 'scheduled'))
                        AS queued,
                    (SELECT COUNT(*) FROM webhooks) AS webhooks",
        )
        .fetch_one(&self.readers)
        .await?;
        let handed = self.signals.handoff.unsettled() as i64;
        Ok((
            row.try_get("queued")?,
            self.next_due().await?,
            row.try_get::<i64, _>("webhooks")? + handed,
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        if self.writer.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn disk_full(&self) -> bool {
        let at = self.disk_full_at.load(Ordering::SeqCst);
        at > 0 && now_ms() - at < DISK_FULL_HOLD_MS
    }

    fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    async fn close(&self) {
        if let Some(handle) = self.thread.lock().await.take() {
            // Behind every job already sent: those are still committed.
            self.writer.stop(1).await;
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        if let Some(checkpointer) = self.checkpointer.lock().await.take() {
            let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
        }
        self.readers.close().await;
    }
}

/// The writer's own connection: the same file and settings as the pool's (WAL is a property
/// of the file, set by the migrations' connection).
fn open_writer(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    enlarge_lookaside(&conn);
    conn.busy_timeout(WRITER_BUSY_TIMEOUT)?;
    // With WAL, NORMAL survives a process crash; FULL also survives power loss.
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 0;",
    )?;
    // What is deleted or updated away is overwritten with zeros, in its page (the cell's
    // bytes) and as a page (a freed page, an overflow page of a long text): without it, an
    // erased number or text stays in the file's free space until reused. Only this connection
    // deletes. See `WalLimit::scrub` for the WAL.
    conn.execute_batch("PRAGMA secure_delete = ON;")?;
    Ok(conn)
}

/// The writer's lookaside: SQLite's per-connection allocator for its small objects (cursors,
/// values, the parts of a prepared statement). The kept statements hold all of the default
/// 48 KB, so every other allocation went to `malloc`: 3 million in a 20,000-message run of the
/// e2e bench, 8% of the writer's CPU. With 1.2 MB, ~700 of its slots are in use and none misses.
const LOOKASIDE_SLOTS: c_int = 1000;
const LOOKASIDE_SLOT_BYTES: c_int = 1200;

fn enlarge_lookaside(conn: &rusqlite::Connection) {
    // SAFETY: the handle is the open connection `conn` owns, used on this thread only, and
    // nothing has been allocated from its lookaside yet (SQLite refuses with SQLITE_BUSY then).
    // A null buffer lets SQLite allocate the slots itself.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<c_void>(),
            LOOKASIDE_SLOT_BYTES,
            LOOKASIDE_SLOTS,
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!(rc, "the writer keeps SQLite's default lookaside");
    }
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The WAL's size past which the writer makes it start over.
const WAL_RESTART_BYTES: u64 = 64 << 20;

/// Keeps the WAL from growing without bound, and its commits writing into blocks it already
/// has. SQLite writes from the start of the WAL again only when a write begins after a
/// checkpoint copied all of it. Under a steady load a commit always lands while the passive
/// checkpoint runs, so the WAL never starts over: it grew by ~3 KB a message (310 MB in 6 s of
/// the e2e bench), each append allocating new blocks. The checkpointer cannot force it (the
/// writer takes the lock again at once, so it waits in vain); the writer can, between two
/// transactions: the checkpointer has copied all but the last ~100 ms of pages, so this holds
/// the writer for a few milliseconds. RESTART, not TRUNCATE: the next commits overwrite the
/// file from its start, and a commit's fdatasync that does not grow the file has no metadata
/// to write (0.10-0.21 ms against 0.22-0.72 ms on the 2026-12-04 VM). The writer's
/// `journal_size_limit` cuts the file back to the limit at the first commit after a restart,
/// so its size still tells when the limit is passed.
struct WalLimit {
    wal: std::path::PathBuf,
    most_bytes: u64,
    /// An erasure's truncation waits for a reader: when to try again (see [`WalLimit::scrub`]).
    scrub_retry_at: std::cell::Cell<Option<std::time::Instant>>,
}

impl WalLimit {
    /// Sets `conn`'s `journal_size_limit`: `conn` must be the connection that commits (the
    /// limit belongs to the connection, and the cut happens in its first commit after a
    /// restart).
    fn new(
        conn: &rusqlite::Connection,
        path: &Path,
        most_bytes: u64,
    ) -> Result<WalLimit, StoreError> {
        conn.execute_batch(&format!("PRAGMA journal_size_limit = {most_bytes};"))?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(WalLimit {
            wal: wal.into(),
            most_bytes,
            scrub_retry_at: std::cell::Cell::new(None),
        })
    }

    fn enforce(&self, conn: &rusqlite::Connection) {
        if self
            .scrub_retry_at
            .get()
            .is_some_and(|at| std::time::Instant::now() >= at)
        {
            self.scrub_with(conn, Duration::from_millis(50));
            return;
        }
        let bytes = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
        if bytes <= self.most_bytes {
            return;
        }
        // A reader still on an old snapshot would hold the writer: wait briefly, else later.
        match checkpoint(conn, "RESTART", Duration::from_millis(50)) {
            Ok(true) => tracing::debug!(bytes, "WAL started over"),
            Ok(false) => tracing::debug!(bytes, "WAL not started over: a reader holds it"),
            Err(e) => tracing::debug!(error = %e, "WAL not started over"),
        }
    }

    /// Whether an erasure's truncation is still to be done.
    fn scrub_pending(&self) -> bool {
        self.scrub_retry_at.get().is_some()
    }

    /// After an erasure or a purge, once committed. `secure_delete` has overwritten the erased
    /// rows with zeros in their pages, but the WAL still holds the earlier versions of those
    /// pages, erased rows and all, until it happens to be written over (RESTART writes from
    /// its start again and leaves the rest). TRUNCATE copies every page into the database file
    /// and cuts the WAL to nothing, so those frames are gone. The commits after it grow the
    /// file again (see above); that happens only after an erasure or a purge. If a reader on
    /// an older snapshot holds it past `SCRUB_WAIT`, it is tried again a second later, after
    /// the batch then, until it succeeds.
    fn scrub(&self, conn: &rusqlite::Connection) {
        self.scrub_with(conn, SCRUB_WAIT);
    }

    fn scrub_with(&self, conn: &rusqlite::Connection, wait: Duration) {
        let started = std::time::Instant::now();
        let deadline = started + wait;
        let truncated = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match checkpoint(conn, "TRUNCATE", left) {
                Ok(true) => break Ok(true),
                // SQLite answers busy at once, without its busy handler, while another
                // checkpoint runs (the checkpointer's, a few milliseconds): wait for it here.
                other if left.is_zero() => break other,
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let again = std::time::Instant::now() + Duration::from_secs(1);
        match (truncated, self.scrub_retry_at.get()) {
            (Ok(true), _) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::debug!(ms, "WAL truncated: erased data is out of it");
                self.scrub_retry_at.set(None);
            }
            (failed, None) => {
                tracing::warn!(
                    error = failed.err().map(|e| e.to_string()),
                    "the WAL still holds erased data: a reader keeps it from being truncated; \
                     trying again every second"
                );
                self.scrub_retry_at.set(Some(again));
            }
            (_, Some(_)) => self.scrub_retry_at.set(Some(again)),
        }
    }
}

/// How long an erasure's WAL truncation waits for readers on older snapshots.
const SCRUB_WAIT: Duration = Duration::from_secs(1);

/// Runs `PRAGMA wal_checkpoint(mode)` waiting at most `wait` for the locks; true when it
/// completed (no reader held it back).
fn checkpoint(
    conn: &rusqlite::Connection,
    mode: &str,
    wait: Duration,
) -> Result<bool, rusqlite::Error> {
    let done = conn.busy_timeout(wait).and_then(|()| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            r.get::<_, i64>(0)
        })
    });
    let _ = conn.busy_timeout(WRITER_BUSY_TIMEOUT);
    done.map(|busy| busy == 0)
}

const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Copies committed pages from the WAL into the database file on a thread of its own. SQLite
/// would otherwise do it inside the writer's commits (every 1,000 pages), with the database
/// file's fsync, while every other write waits; here the writer only appends to the WAL and
/// syncs it. A checkpoint that fails (a full disk) is tried again at the next tick.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(1))?;
        conn.execute_batch("PRAGMA synchronous = FULL;")?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %e, "checkpoint failed; trying again");
                    }
                }
            })
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        Ok(Checkpointer { stop, thread })
    }

    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// How long `/readyz` reports a full disk after the last write it failed (the `Retry-After`
/// of the 503 it caused): long enough to be seen, short enough to clear by itself.
const DISK_FULL_HOLD_MS: i64 = 5_000;

/// What the writer does after a failed transaction.
struct Recovery {
    /// When a write last failed for a full disk (ms; 0: never).
    disk_full_at: Arc<AtomicI64>,
}

impl Recovery {
    /// Says when the disk is full, and leaves the connection with no transaction open: SQLite
    /// rolls a transaction back by itself on SQLITE_FULL and on I/O errors, and one it did not
    /// roll back must not stay open either, or the store stays unwritable after space returns.
    fn after_failure(&self, conn: &rusqlite::Connection, error: &StoreError) {
        if error.is_disk_full() {
            let before = self.disk_full_at.swap(now_ms(), Ordering::SeqCst);
            if now_ms() - before > DISK_FULL_HOLD_MS {
                tracing::error!("the disk is full: nothing new can be stored until space returns");
            }
        }
        if !conn.is_autocommit()
            && let Err(e) = conn.execute_batch("ROLLBACK")
        {
            tracing::warn!(error = %e, "rolling back the store's failed transaction failed");
        }
    }
}

/// What the writer's batches share across transactions.
struct WriterState {
    rules: Arc<StoreRules>,
    signals: Arc<Signals>,
    clock: PolicyClock,
    maybe: MaybeRows,
    event_ids: EventIds,
}

fn run_writer(
    conn: rusqlite::Connection,
    mut jobs: mpsc::Receiver<Message>,
    max_batch: usize,
    signals: Arc<Signals>,
    rules: Arc<StoreRules>,
    recovery: Recovery,
    wal_limit: WalLimit,
) {
    let clock = PolicyClock {
        generation: std::sync::atomic::AtomicI64::new(1),
        next_effective: std::sync::atomic::AtomicI64::new(i64::MAX),
    };
    let tx = Tx::new(&conn);
    let dated: Result<Option<i64>, _> = one(
        &tx,
        "SELECT MIN(effective_at) FROM number_changes WHERE effective_at > ?1",
        [now_ms()],
        |r| r.get(0),
    );
    if let Ok(Some(at)) = dated {
        clock.expect_change_at(at);
    }
    let event_ids = match EventIds::read(&tx) {
        Ok(ids) => ids,
        Err(error) => {
            tracing::error!(%error, "reading the last event id failed; the store takes no writes");
            return;
        }
    };
    // Until the first claim looks, assume both side tables hold rows.
    let maybe = MaybeRows::default();
    MaybeRows::set(&maybe.early_receipts, true);
    MaybeRows::set(&maybe.suspects, true);
    let state = WriterState {
        rules,
        signals,
        clock,
        maybe,
        event_ids,
    };
    let mut batch = Vec::with_capacity(max_batch);
    let mut stopping = false;
    while !stopping {
        // The channel keeps order: a stop comes after every job sent before it.
        match jobs.blocking_recv() {
            Some(Message::Job(job)) => batch.push(job),
            Some(Message::Stop) | None => break,
        }
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        match apply_batch(&tx, &state, &batch) {
            Ok((replies, erased)) => {
                // An erasure is answered once the WAL no longer holds what it erased.
                if erased {
                    wal_limit.scrub(&conn);
                }
                for (job, reply) in batch.drain(..).zip(replies) {
                    let _ = job.reply.send(Ok(reply));
                }
            }
            // Alone, each would fail the same way: they all fail now, and the writer goes on.
            Err(error) if error.is_disk_full() => {
                recovery.after_failure(&conn, &error);
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(StoreError::DiskFull));
                }
            }
            Err(error) => {
                tracing::warn!(%error, jobs = batch.len(), "group commit failed; applying one by one");
                recovery.after_failure(&conn, &error);
                for job in batch.drain(..) {
                    let single = std::slice::from_ref(&job);
                    let result = apply_batch(&tx, &state, single);
                    match &result {
                        Err(error) => recovery.after_failure(&conn, error),
                        Ok((_, true)) => wal_limit.scrub(&conn),
                        Ok(_) => {}
                    }
                    let result =
                        result.map(|(mut replies, _)| replies.pop().unwrap_or(Reply::Done));
                    let _ = job.reply.send(result);
                }
            }
        }
        wal_limit.enforce(&conn);
    }
    // The last try: a reader-only connection closes last and does not checkpoint.
    if wal_limit.scrub_pending() {
        wal_limit.scrub(&conn);
    }
}

/// Applies a batch in one transaction: the rules of `store::domain` on this connection, each
/// statement complete before it returns, so `block_on` never waits. What the batch set in
/// motion happens once it has committed. Also says whether it erased personal data.
fn apply_batch(
    tx: &Tx,
    state: &WriterState,
    batch: &[Job],
) -> Result<(Vec<Reply>, bool), StoreError> {
    let mut effects = Effects::default();
    let mut db = SqliteTx {
        tx,
        rules: &state.rules,
        clock: &state.clock,
        maybe: &state.maybe,
        event_ids: &state.event_ids,
        handoff: &state.signals.handoff,
    };
    let result = (|| {
        // The writer is the only one to begin transactions on its connection: none is open.
        let transaction = Transaction::new_unchecked(tx.conn, TransactionBehavior::Immediate)?;
        let now = now_ms();
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            let reply =
                futures::executor::block_on(domain::apply(&mut db, &job.op, now, &mut effects))?;
            replies.push(reply);
        }
        transaction.commit()?;
        Ok(replies)
    })();
    let erased = effects.erased();
    match &result {
        Ok(_) => effects.committed(&state.signals),
        // Rolled back: the rows these jobs name do not exist.
        Err(_) => effects.rolled_back(&state.signals),
    }
    result.map(|replies| (replies, erased))
}
/// Event ids, given by the writer rather than by SQLite, which would reuse the ids of the
/// newest events after an erasure deleted them: the webhook cursor needs ids that only grow.
struct EventIds {
    next: AtomicI64,
}

impl EventIds {
    fn read(tx: &Tx) -> Result<EventIds, StoreError> {
        let last: i64 = one(
            tx,
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM events), 0),
                        (SELECT settled_through FROM webhook_journal))",
            [],
            |r| r.get(0),
        )?;
        Ok(EventIds {
            next: AtomicI64::new(last + 1),
        })
    }

    /// A rolled-back transaction leaves a gap, which is harmless.
    fn next(&self) -> i64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// After a crash: the handed webhooks whose results were not stored (their events are past the
/// cursor) go to the outbox, to be posted again, and the outbox rows a dead process had leased
/// wait again at once (one process writes a SQLite store). Runs once, before the writer starts.
fn recover_webhooks(conn: &mut rusqlite::Connection) -> Result<usize, StoreError> {
    let transaction = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let tx = Tx::new(&transaction);
    let now = now_ms();
    let released = run(
        &tx,
        "UPDATE webhooks SET locked_until = NULL WHERE locked_until IS NOT NULL",
        [],
    )?;
    let unsettled = rows(
        &tx,
        "SELECT e.id, e.message_id, e.at, e.status, e.detail, e.error_code, m.account,
                m.webhook_url, m.reference
         FROM events e JOIN messages m ON m.id = e.message_id
         WHERE e.id > (SELECT settled_through FROM webhook_journal) AND e.hook = 1
               AND m.webhook_url IS NOT NULL
         ORDER BY e.id",
        [],
        |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        },
    )?;
    for (message_id, at, status, detail, error_code, account, url, reference) in &unsettled {
        let payload = StatusPayload {
            message_id,
            reference: reference.as_deref(),
            status: parse_status(status)?,
            detail: detail.as_deref(),
            error_code: error_code.as_deref(),
            at: *at,
        }
        .to_json()?;
        let row = OutboxRow {
            account,
            url,
            payload: &payload,
            attempts: 0,
            created_at: *at,
            due_at: now,
            last_error: None,
        };
        sql::insert_outbox(&tx, &row)?;
    }
    run(
        &tx,
        "UPDATE webhook_journal SET settled_through = MAX(settled_through,
             COALESCE((SELECT MAX(id) FROM events), 0))",
        [],
    )?;
    drop(tx);
    transaction.commit()?;
    Ok(unsettled.len() + released as usize)
}

fn view_from_row(row: &SqliteRow) -> Result<MessageView, StoreError> {
    Ok(MessageView {
        id: parse_id(&row.try_get::<String, _>("id")?)?,
        account: row.try_get("account")?,
        reference: row.try_get("reference")?,
        recipient: row.try_get("recipient")?,
        sender: row.try_get("sender")?,
        category: row
            .try_get::<String, _>("category")?
            .parse()
            .map_err(|_| StoreError::Corrupt("category".into()))?,
        encoding: parse_encoding(&row.try_get::<String, _>("encoding")?)?,
        segments: row.try_get::<i64, _>("segments")? as u32,
        status: parse_status(&row.try_get::<String, _>("status")?)?,
        detail: row.try_get("detail")?,
        error_code: row.try_get("error_code")?,
        carrier: row.try_get("carrier")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
        body: row.try_get("body")?,
        events: Vec::new(),
    })
}

fn idempotent_from_row(row: &SqliteRow) -> Result<IdempotentAnswer, StoreError> {
    Ok(IdempotentAnswer {
        key: row.try_get("key")?,
        request_hash: row.try_get("request_hash")?,
        status_code: row.try_get::<i64, _>("status_code")? as u16,
        answer: row.try_get("answer")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Category, Pseudonymizer};

    #[test]
    fn a_wal_past_its_limit_starts_over_in_the_blocks_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (x BLOB);",
        )
        .unwrap();
        let limit = WalLimit::new(&conn, &path, 1 << 20).unwrap();
        let wal_bytes = || std::fs::metadata(&limit.wal).map_or(0, |m| m.len());
        let (mut largest, mut smallest_after_first_restart) = (0, u64::MAX);
        let mut restarted = false;
        for _ in 0..64 {
            conn.execute("INSERT INTO t (x) VALUES (zeroblob(65536))", [])
                .unwrap();
            let bytes = wal_bytes();
            largest = largest.max(bytes);
            if restarted {
                smallest_after_first_restart = smallest_after_first_restart.min(bytes);
            }
            restarted |= bytes > 1 << 20;
            limit.enforce(&conn);
        }
        // Without it the WAL would hold all 4 MiB; with it, at most the limit and one commit.
        assert!(
            largest <= (1 << 20) + 2 * 65536,
            "the WAL grew to {largest} bytes"
        );
        // Started over, not cut to nothing: later commits overwrite blocks the file has.
        assert!(restarted, "the WAL never passed its limit");
        assert_eq!(
            smallest_after_first_restart,
            1 << 20,
            "the WAL was cut below its limit"
        );
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 64, "nothing written is lost by starting over");
    }

    fn scheduled(priority: i32, due_at: i64, i: usize) -> NewMessage {
        NewMessage {
            id: MessageId::new(),
            account: "a".into(),
            reference: None,
            recipient: format!("+4670123{i:04}"),
            sender: "iP1".into(),
            body: "later".into(),
            category: Category::Transactional,
            encoding: Encoding::Gsm7,
            segments: 1,
            priority,
            webhook_url: None,
            consent_at: None,
            status: Status::Scheduled,
            detail: None,
            created_at: now_ms(),
            due_at,
            expires_at: due_at + 3_600_000,
        }
    }

    /// `next_due` reads the claim's (priority, due_at) index lane by lane: the earliest due
    /// time must come out whichever lane holds it, and none from an empty queue.
    #[tokio::test]
    async fn next_due_is_the_earliest_due_time_of_every_priority() {
        let dir = tempfile::tempdir().unwrap();
        let rules = StoreRules {
            pseudonyms: Pseudonymizer::new(b"test-key"),
            suspect_after: 3,
            suspect_codes: vec![],
        };
        let store = SqliteStore::open(&dir.path().join("s.db"), 16, rules)
            .await
            .unwrap();
        assert_eq!(store.next_due().await.unwrap(), None);
        let later = now_ms() + 3_600_000;
        let render: RenderAnswer = Arc::new(|_: &[NewMessage]| (202, String::new()));
        let messages = vec![
            scheduled(1, later + 5_000, 0),
            scheduled(0, later + 1_000, 1),
            scheduled(0, later + 9_000, 2),
            scheduled(1, later + 2_000, 3),
        ];
        let policy = AccountPolicy::default();
        store
            .submit("a", policy, messages, None, render.clone())
            .await
            .unwrap();
        assert_eq!(store.next_due().await.unwrap(), Some(later + 1_000));
        let earlier_high = vec![scheduled(1, later + 500, 4)];
        store
            .submit("a", AccountPolicy::default(), earlier_high, None, render)
            .await
            .unwrap();
        assert_eq!(store.next_due().await.unwrap(), Some(later + 500));
        store.close().await;
    }
}

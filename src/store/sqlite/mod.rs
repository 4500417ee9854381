//! SQLite backend: WAL, one writer task that group-commits, a small pool of readers.
//!
//! SQLite has one writer at a time, so all writes go through one task and one connection. The
//! task takes every operation waiting in its channel (up to `max_batch`), applies them in one
//! `BEGIN IMMEDIATE` transaction and answers each caller after the commit: many concurrent HTTP
//! requests cost one fsync. If the batch fails, each operation is retried alone, so one bad
//! operation cannot fail its neighbours.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod policy;
mod receipts;

pub use policy::FACTS_QUERY;

use super::*;
use crate::message::{now_ms, rfc3339};
use crate::receipt::{ReceiptState, normalize_id};

/// A backstop: parked receipts older than this are dropped unseen. Each carrier's sweeper
/// gives them up (and lists them) after its `unmatched_after`, at most 24 h, so an hour later.
const EARLY_RECEIPT_TTL_MS: i64 = 25 * 3600 * 1000;

pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    readers: SqlitePool,
    rules: Arc<StoreRules>,
    signals: Arc<Signals>,
    stop: CancellationToken,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// When the writer last failed a write for a full disk (ms; 0: never).
    disk_full_at: Arc<std::sync::atomic::AtomicI64>,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

enum Op {
    Submit {
        account: String,
        policy: AccountPolicy,
        messages: Vec<NewMessage>,
        idempotency: Option<IdempotencyRequest>,
        render: RenderAnswer,
    },
    AddOptOuts {
        account: String,
        entries: Vec<(String, Option<String>)>,
        by: OptOutSource,
        policy: AccountPolicy,
    },
    RemoveOptOut {
        account: String,
        number: String,
        sender: Option<String>,
        by: OptOutSource,
    },
    AddNumberChanges {
        changes: Vec<NumberChange>,
        follow: Vec<String>,
    },
    ClearSuspect {
        number: String,
    },
    Retry {
        id: MessageId,
        expires_at: i64,
    },
    CancelAny {
        id: MessageId,
    },
    EraseSubject {
        account: String,
        number: String,
    },
    Purge {
        cutoffs: Cutoffs,
        limit: u32,
        dry_run: bool,
    },
    Cancel {
        account: String,
        id: MessageId,
    },
    Claim {
        limit: usize,
        lease_until: i64,
    },
    Attempts(Vec<AttemptResult>),
    Receipt {
        carrier: String,
        receipt: Receipt,
    },
    Inbound {
        carrier: String,
        sms: InboundSms,
        owner: Option<InboundOwner>,
    },
    Release {
        all: bool,
    },
    ExpireOverdue,
    ClaimWebhooks {
        limit: usize,
        lease_until: i64,
    },
    WebhookResults(Vec<(i64, WebhookResult)>),
    TakeUnmatched {
        carrier: String,
        received_before: i64,
    },
    ClaimQueries {
        carrier: String,
        accepted_before: i64,
        limit: u32,
    },
}

enum Reply {
    Submit(SubmitResult),
    Cancel(CancelResult),
    Claimed(Vec<Claimed>),
    Receipt(ReceiptMatch),
    Count(u64),
    Webhooks(Vec<WebhookJob>),
    Erased(Erasure),
    Purged(Purge),
    Parked(Vec<ParkedReceipt>),
    Queries(Vec<ReceiptQuery>),
    Done,
}

/// What the operations of a batch share: the rules they apply, and what the batch should wake
/// once committed.
struct Wake {
    rules: Arc<StoreRules>,
    clock: Arc<PolicyClock>,
    maybe: Arc<MaybeRows>,
    queue: bool,
    webhooks: bool,
}

impl Wake {
    fn new(rules: &Arc<StoreRules>, clock: &Arc<PolicyClock>, maybe: &Arc<MaybeRows>) -> Wake {
        Wake {
            rules: rules.clone(),
            clock: clock.clone(),
            maybe: maybe.clone(),
            queue: false,
            webhooks: false,
        }
    }
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
    async fn refresh(&self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM early_receipts) AS early,
                    EXISTS (SELECT 1 FROM suspects) AS suspects",
        )
        .fetch_one(&mut **tx)
        .await?;
        Self::set(&self.early_receipts, row.try_get("early")?);
        Self::set(&self.suspects, row.try_get("suspects")?);
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

type Tx<'c> = sqlx::Transaction<'c, sqlx::Sqlite>;

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
        let writer = SqliteConnection::connect_with(&options).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().read_only(true))
            .await?;
        let signals = Arc::new(Signals::default());
        let (jobs, rx) = mpsc::channel(max_batch * 4);
        let stop = CancellationToken::new();
        let rules = Arc::new(rules);
        let disk_full_at = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let recovery = Recovery {
            options: options.clone(),
            disk_full_at: disk_full_at.clone(),
        };
        let handle = tokio::spawn(run_writer(
            writer,
            rx,
            max_batch,
            signals.clone(),
            rules.clone(),
            stop.clone(),
            recovery,
        ));
        Ok(SqliteStore {
            jobs,
            readers,
            rules,
            signals,
            stop,
            writer: Mutex::new(Some(handle)),
            disk_full_at,
        })
    }

    async fn call(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
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

    async fn count(&self, op: Op) -> Result<u64, StoreError> {
        match self.call(op).await? {
            Reply::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(reply: Reply) -> StoreError {
    let kind = match reply {
        Reply::Submit(_) => "submit",
        Reply::Cancel(_) => "cancel",
        Reply::Claimed(_) => "claimed",
        Reply::Receipt(_) => "receipt",
        Reply::Count(_) => "count",
        Reply::Webhooks(_) => "webhooks",
        Reply::Erased(_) => "erased",
        Reply::Purged(_) => "purged",
        Reply::Parked(_) => "parked",
        Reply::Queries(_) => "queries",
        Reply::Done => "done",
    };
    StoreError::Corrupt(format!("writer answered with an unexpected {kind} reply"))
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(
        &self,
        account: &str,
        policy: AccountPolicy,
        messages: Vec<NewMessage>,
        idempotency: Option<IdempotencyRequest>,
        render: RenderAnswer,
    ) -> Result<SubmitResult, StoreError> {
        let op = Op::Submit {
            account: account.to_owned(),
            policy,
            messages,
            idempotency,
            render,
        };
        match self.call(op).await? {
            Reply::Submit(result) => Ok(result),
            other => Err(unexpected(other)),
        }
    }

    async fn add_opt_outs(
        &self,
        account: &str,
        entries: Vec<(String, Option<String>)>,
        by: OptOutSource,
        policy: AccountPolicy,
    ) -> Result<u64, StoreError> {
        let op = Op::AddOptOuts {
            account: account.to_owned(),
            entries,
            by,
            policy,
        };
        self.count(op).await
    }

    async fn remove_opt_out(
        &self,
        account: &str,
        number: &str,
        sender: Option<String>,
        by: OptOutSource,
    ) -> Result<u64, StoreError> {
        let op = Op::RemoveOptOut {
            account: account.to_owned(),
            number: number.to_owned(),
            sender,
            by,
        };
        self.count(op).await
    }

    async fn list_opt_outs(
        &self,
        account: &str,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<OptOut>, StoreError> {
        policy::list_opt_outs(&self.readers, account, after, limit).await
    }

    async fn add_number_changes(
        &self,
        changes: Vec<NumberChange>,
        follow: Vec<String>,
    ) -> Result<u64, StoreError> {
        self.count(Op::AddNumberChanges { changes, follow }).await
    }

    async fn number_history(
        &self,
        account: &str,
        number: &str,
    ) -> Result<NumberHistory, StoreError> {
        policy::number_history(&self.readers, account, number).await
    }

    async fn clear_suspect(&self, number: &str) -> Result<bool, StoreError> {
        let op = Op::ClearSuspect {
            number: number.to_owned(),
        };
        self.count(op).await.map(|n| n > 0)
    }

    async fn queue(&self, status: Status, limit: u32) -> Result<Vec<MessageView>, StoreError> {
        let rows = sqlx::query("SELECT * FROM messages WHERE status = ?1 ORDER BY due_at LIMIT ?2")
            .bind(status.as_str())
            .bind(limit as i64)
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(view_from_row).collect()
    }

    async fn retry(&self, id: MessageId, expires_at: i64) -> Result<bool, StoreError> {
        self.count(Op::Retry { id, expires_at })
            .await
            .map(|n| n > 0)
    }

    async fn cancel_any(&self, id: MessageId) -> Result<CancelResult, StoreError> {
        match self.call(Op::CancelAny { id }).await? {
            Reply::Cancel(result) => Ok(result),
            other => Err(unexpected(other)),
        }
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

    async fn erase_subject(&self, account: &str, number: &str) -> Result<Erasure, StoreError> {
        let op = Op::EraseSubject {
            account: account.to_owned(),
            number: number.to_owned(),
        };
        match self.call(op).await? {
            Reply::Erased(erasure) => Ok(erasure),
            other => Err(unexpected(other)),
        }
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

    async fn cancel(&self, account: &str, id: MessageId) -> Result<CancelResult, StoreError> {
        let op = Op::Cancel {
            account: account.to_owned(),
            id,
        };
        match self.call(op).await? {
            Reply::Cancel(result) => Ok(result),
            other => Err(unexpected(other)),
        }
    }

    async fn claim_due(&self, limit: usize, lease_until: i64) -> Result<Vec<Claimed>, StoreError> {
        match self.call(Op::Claim { limit, lease_until }).await? {
            Reply::Claimed(claimed) => Ok(claimed),
            other => Err(unexpected(other)),
        }
    }

    async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(due_at) FROM messages WHERE status IN ('queued', 'scheduled')",
        )
        .fetch_one(&self.readers)
        .await?;
        Ok(due)
    }

    async fn record_attempts(&self, results: Vec<AttemptResult>) -> Result<(), StoreError> {
        self.call(Op::Attempts(results)).await.map(|_| ())
    }

    async fn apply_receipt(
        &self,
        carrier: &str,
        receipt: Receipt,
    ) -> Result<ReceiptMatch, StoreError> {
        let op = Op::Receipt {
            carrier: carrier.to_owned(),
            receipt,
        };
        match self.call(op).await? {
            Reply::Receipt(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    async fn known_carrier_ids(
        &self,
        carrier: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        receipts::known_carrier_ids(&self.readers, carrier, ids).await
    }

    async fn take_unmatched_receipts(
        &self,
        carrier: &str,
        received_before: i64,
    ) -> Result<Vec<ParkedReceipt>, StoreError> {
        let op = Op::TakeUnmatched {
            carrier: carrier.to_owned(),
            received_before,
        };
        match self.call(op).await? {
            Reply::Parked(parked) => Ok(parked),
            other => Err(unexpected(other)),
        }
    }

    async fn claim_receipt_queries(
        &self,
        carrier: &str,
        accepted_before: i64,
        limit: u32,
    ) -> Result<Vec<ReceiptQuery>, StoreError> {
        let op = Op::ClaimQueries {
            carrier: carrier.to_owned(),
            accepted_before,
            limit,
        };
        match self.call(op).await? {
            Reply::Queries(queries) => Ok(queries),
            other => Err(unexpected(other)),
        }
    }

    async fn store_inbound(
        &self,
        carrier: &str,
        sms: InboundSms,
        owner: Option<InboundOwner>,
    ) -> Result<(), StoreError> {
        let op = Op::Inbound {
            carrier: carrier.to_owned(),
            sms,
            owner,
        };
        self.call(op).await.map(|_| ())
    }

    async fn release_claims(&self, all: bool) -> Result<u64, StoreError> {
        match self.call(Op::Release { all }).await? {
            Reply::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    async fn expire_overdue(&self) -> Result<u64, StoreError> {
        match self.call(Op::ExpireOverdue).await? {
            Reply::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    async fn claim_webhooks(
        &self,
        limit: usize,
        lease_until: i64,
    ) -> Result<Vec<WebhookJob>, StoreError> {
        match self.call(Op::ClaimWebhooks { limit, lease_until }).await? {
            Reply::Webhooks(jobs) => Ok(jobs),
            other => Err(unexpected(other)),
        }
    }

    async fn webhook_results(&self, results: Vec<(i64, WebhookResult)>) -> Result<(), StoreError> {
        self.call(Op::WebhookResults(results)).await.map(|_| ())
    }

    async fn next_webhook_due(&self) -> Result<Option<i64>, StoreError> {
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT due_at FROM webhooks WHERE locked_until IS NULL ORDER BY due_at LIMIT 1",
        )
        .fetch_optional(&self.readers)
        .await?;
        Ok(due)
    }

    async fn purge(
        &self,
        cutoffs: Cutoffs,
        limit: u32,
        dry_run: bool,
    ) -> Result<Purge, StoreError> {
        let op = Op::Purge {
            cutoffs,
            limit,
            dry_run,
        };
        match self.call(op).await? {
            Reply::Purged(purge) => Ok(purge),
            other => Err(unexpected(other)),
        }
    }

    async fn backlog(&self) -> Result<(i64, Option<i64>, i64), StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM messages WHERE status IN ('queued', 'scheduled'))
                        AS queued,
                    (SELECT MIN(created_at) FROM messages WHERE status IN ('queued', 'scheduled'))
                        AS oldest,
                    (SELECT COUNT(*) FROM webhooks) AS webhooks",
        )
        .fetch_one(&self.readers)
        .await?;
        Ok((
            row.try_get("queued")?,
            row.try_get("oldest")?,
            row.try_get("webhooks")?,
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        if self.jobs.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn disk_full(&self) -> bool {
        let at = self.disk_full_at.load(std::sync::atomic::Ordering::SeqCst);
        at > 0 && now_ms() - at < DISK_FULL_HOLD_MS
    }

    fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    async fn close(&self) {
        self.stop.cancel();
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
        self.readers.close().await;
    }
}

/// How long `/readyz` reports a full disk after the last write it failed (the `Retry-After`
/// of the 503 it caused): long enough to be seen, short enough to clear by itself.
const DISK_FULL_HOLD_MS: i64 = 5_000;

/// What the writer needs to get over a failed transaction: a way to open a fresh connection,
/// and where to say that the disk is full.
struct Recovery {
    options: SqliteConnectOptions,
    /// When a write last failed for a full disk (ms; 0: never).
    disk_full_at: Arc<std::sync::atomic::AtomicI64>,
}

impl Recovery {
    /// Replaces the writer's connection after a failed transaction. SQLite rolls a transaction
    /// back by itself on SQLITE_FULL and on I/O errors; sqlx does not know, its ROLLBACK then
    /// fails, and the connection refuses every later BEGIN (`InvalidSavePointStatement`): the
    /// store would stay unwritable after space returned. A fresh connection has no such state.
    /// If it cannot be opened, the old one is kept and the next failure tries again.
    async fn after_failure(&self, conn: &mut SqliteConnection, error: &StoreError) {
        if error.is_disk_full() {
            let before = self
                .disk_full_at
                .swap(now_ms(), std::sync::atomic::Ordering::SeqCst);
            if now_ms() - before > DISK_FULL_HOLD_MS {
                tracing::error!("the disk is full: nothing new can be stored until space returns");
            }
        }
        match SqliteConnection::connect_with(&self.options).await {
            Ok(fresh) => {
                let old = std::mem::replace(conn, fresh);
                let _ = old.close().await;
            }
            Err(e) => tracing::warn!(error = %e, "reopening the store's writer connection failed"),
        }
    }
}

async fn run_writer(
    mut conn: SqliteConnection,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    signals: Arc<Signals>,
    rules: Arc<StoreRules>,
    stop: CancellationToken,
    recovery: Recovery,
) {
    let clock = Arc::new(PolicyClock {
        generation: std::sync::atomic::AtomicI64::new(1),
        next_effective: std::sync::atomic::AtomicI64::new(i64::MAX),
    });
    let dated: Result<Option<i64>, _> =
        sqlx::query_scalar("SELECT MIN(effective_at) FROM number_changes WHERE effective_at > ?1")
            .bind(now_ms())
            .fetch_one(&mut conn)
            .await;
    if let Ok(Some(at)) = dated {
        clock.expect_change_at(at);
    }
    // Until the first claim looks, assume both side tables hold rows.
    let maybe = Arc::new(MaybeRows::default());
    MaybeRows::set(&maybe.early_receipts, true);
    MaybeRows::set(&maybe.suspects, true);
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        // Biased towards jobs: on shutdown, everything already queued is still committed.
        let first = tokio::select! {
            biased;
            job = jobs.recv() => match job {
                Some(job) => job,
                None => break,
            },
            () = stop.cancelled() => break,
        };
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut wake = Wake::new(&rules, &clock, &maybe);
        match apply_batch(&mut conn, &batch, &mut wake).await {
            Ok(replies) => {
                for (job, reply) in batch.drain(..).zip(replies) {
                    let _ = job.reply.send(Ok(reply));
                }
            }
            // Alone, each would fail the same way: they all fail now, and the writer goes on.
            Err(error) if error.is_disk_full() => {
                recovery.after_failure(&mut conn, &error).await;
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(StoreError::DiskFull));
                }
            }
            Err(error) => {
                tracing::warn!(%error, jobs = batch.len(), "group commit failed; applying one by one");
                recovery.after_failure(&mut conn, &error).await;
                wake = Wake::new(&rules, &clock, &maybe);
                for job in batch.drain(..) {
                    let single = std::slice::from_ref(&job);
                    let result = apply_batch(&mut conn, single, &mut wake)
                        .await
                        .map(|mut replies| replies.pop().unwrap_or(Reply::Done));
                    if let Err(error) = &result {
                        recovery.after_failure(&mut conn, error).await;
                    }
                    let _ = job.reply.send(result);
                }
            }
        }
        if wake.queue {
            signals.queue.notify_one();
        }
        if wake.webhooks {
            signals.webhooks.notify_one();
        }
    }
}

async fn apply_batch(
    conn: &mut SqliteConnection,
    batch: &[Job],
    wake: &mut Wake,
) -> Result<Vec<Reply>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let now = now_ms();
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        replies.push(apply(&mut tx, &job.op, now, wake).await?);
    }
    tx.commit().await?;
    Ok(replies)
}

async fn apply(tx: &mut Tx<'_>, op: &Op, now: i64, wake: &mut Wake) -> Result<Reply, StoreError> {
    Ok(match op {
        Op::Submit {
            account,
            policy,
            messages,
            idempotency,
            render,
        } => Reply::Submit(
            submit(
                tx,
                account,
                policy,
                messages,
                idempotency.as_ref(),
                render,
                now,
                wake,
            )
            .await?,
        ),
        Op::AddOptOuts {
            account,
            entries,
            by,
            policy,
        } => Reply::Count(policy::add_opt_outs(tx, account, entries, by, policy, now, wake).await?),
        Op::RemoveOptOut {
            account,
            number,
            sender,
            by,
        } => Reply::Count(
            policy::remove_opt_out(tx, account, number, sender.as_deref(), by, now, wake).await?,
        ),
        Op::AddNumberChanges { changes, follow } => {
            Reply::Count(policy::add_number_changes(tx, changes, follow, now, wake).await?)
        }
        Op::Retry { id, expires_at } => Reply::Count(retry(tx, *id, *expires_at, now, wake).await?),
        Op::CancelAny { id } => Reply::Cancel(cancel(tx, None, *id, now, wake).await?),
        Op::ClearSuspect { number } => {
            Reply::Count(policy::clear_suspect(tx, number, now, wake).await?)
        }
        Op::Purge {
            cutoffs,
            limit,
            dry_run,
        } => Reply::Purged(purge(tx, cutoffs, *limit, *dry_run, &wake.rules).await?),
        Op::EraseSubject { account, number } => {
            Reply::Erased(policy::erase_subject(tx, account, number, wake).await?)
        }
        Op::Cancel { account, id } => {
            Reply::Cancel(cancel(tx, Some(account), *id, now, wake).await?)
        }
        Op::Claim { limit, lease_until } => {
            Reply::Claimed(claim(tx, *limit, *lease_until, now, wake).await?)
        }
        Op::Attempts(results) => {
            for result in results {
                record_attempt(tx, result, now, wake).await?;
            }
            Reply::Done
        }
        Op::Receipt { carrier, receipt } => {
            Reply::Receipt(apply_receipt(tx, carrier, receipt, now, wake).await?)
        }
        Op::Inbound {
            carrier,
            sms,
            owner,
        } => {
            store_inbound(tx, carrier, sms, owner.as_ref(), now, wake).await?;
            Reply::Done
        }
        Op::Release { all } => Reply::Count(release(tx, *all, now, wake).await?),
        Op::ExpireOverdue => Reply::Count(expire_overdue(tx, now, wake).await?),
        Op::ClaimWebhooks { limit, lease_until } => {
            Reply::Webhooks(claim_webhooks(tx, *limit, *lease_until, now).await?)
        }
        Op::WebhookResults(results) => {
            webhook_results(tx, results).await?;
            Reply::Done
        }
        Op::TakeUnmatched {
            carrier,
            received_before,
        } => Reply::Parked(receipts::take_unmatched(tx, carrier, *received_before).await?),
        Op::ClaimQueries {
            carrier,
            accepted_before,
            limit,
        } => Reply::Queries(
            receipts::claim_queries(tx, carrier, *accepted_before, *limit, now).await?,
        ),
    })
}

#[allow(clippy::too_many_arguments)]
async fn submit(
    tx: &mut Tx<'_>,
    account: &str,
    policy: &AccountPolicy,
    messages: &[NewMessage],
    idempotency: Option<&IdempotencyRequest>,
    render: &RenderAnswer,
    now: i64,
    wake: &mut Wake,
) -> Result<SubmitResult, StoreError> {
    if let Some(request) = idempotency {
        let first = sqlx::query(
            "SELECT key, request_hash, status_code, answer FROM idempotency
             WHERE account = ?1 AND key = ?2",
        )
        .bind(account)
        .bind(&request.key)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = first {
            return Ok(SubmitResult::Replay(idempotent_from_row(&row)?));
        }
    }
    let mut decided = Vec::with_capacity(messages.len());
    for message in messages {
        let mut m = message.clone();
        policy::evaluate(tx, policy, &mut m, now, wake).await?;
        insert_message(tx, &m, policy.service_messages, now, wake).await?;
        decided.push(m);
    }
    let (status_code, answer) = render(&decided);
    if let Some(request) = idempotency {
        sqlx::query(
            "INSERT INTO idempotency (account, key, request_hash, status_code, answer, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(account)
        .bind(&request.key)
        .bind(&request.request_hash)
        .bind(status_code as i64)
        .bind(&answer)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(SubmitResult::Stored {
        status_code,
        answer,
    })
}

/// Inserts a message with its first event (and webhook).
/// `service_messages`: the account may send service messages to opted-out numbers (kept for
/// the check at send time).
async fn insert_message(
    tx: &mut Tx<'_>,
    m: &NewMessage,
    service_messages: bool,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let id = m.id.to_string();
    sqlx::query(
        "INSERT INTO messages (id, account, reference, recipient, sender, body, category,
             encoding, segments, priority, webhook_url, consent_at, status, detail,
             created_at, updated_at, due_at, expires_at, service_messages, policy_gen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15, ?16, ?17,
                 ?18, ?19)",
    )
    .bind(&id)
    .bind(&m.account)
    .bind(&m.reference)
    .bind(&m.recipient)
    .bind(&m.sender)
    .bind(&m.body)
    .bind(m.category.as_str())
    .bind(m.encoding.as_str())
    .bind(m.segments as i64)
    .bind(m.priority as i64)
    .bind(&m.webhook_url)
    .bind(m.consent_at)
    .bind(m.status.as_str())
    .bind(&m.detail)
    .bind(m.created_at)
    .bind(m.due_at)
    .bind(m.expires_at)
    .bind(service_messages)
    .bind(wake.clock.current())
    .execute(&mut **tx)
    .await?;
    let target = Some(WebhookTarget {
        account: m.account.clone(),
        url: m.webhook_url.clone(),
        reference: m.reference.clone(),
    });
    add_event(
        tx,
        &id,
        m.status,
        m.detail.as_deref(),
        None,
        now,
        target.as_ref(),
        wake,
    )
    .await?;
    if matches!(m.status, Status::Queued | Status::Scheduled) {
        wake.queue = true;
    }
    Ok(())
}

/// Sends an ended message once more (an operator's decision after a fault was fixed).
async fn retry(
    tx: &mut Tx<'_>,
    id: MessageId,
    expires_at: i64,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let id = id.to_string();
    let detail = "queued again by an operator";
    let row = sqlx::query(
        "UPDATE messages SET status = 'queued', detail = ?2, due_at = ?3, expires_at = ?4,
             updated_at = ?3
         WHERE id = ?1 AND status IN ('failed', 'expired', 'unknown', 'undelivered')
         RETURNING account, webhook_url, reference",
    )
    .bind(&id)
    .bind(detail)
    .bind(now)
    .bind(expires_at)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(0) };
    // Every part goes again: the earlier ones did not reach the handset.
    sqlx::query("DELETE FROM parts WHERE message_id = ?1")
        .bind(&id)
        .execute(&mut **tx)
        .await?;
    let target = target_from_row(&row)?;
    add_event(
        tx,
        &id,
        Status::Queued,
        Some(detail),
        None,
        now,
        target.as_ref(),
        wake,
    )
    .await?;
    wake.queue = true;
    Ok(1)
}

/// Cancels a waiting message; `account` None is an operator, who may cancel any.
async fn cancel(
    tx: &mut Tx<'_>,
    account: Option<&str>,
    id: MessageId,
    now: i64,
    wake: &mut Wake,
) -> Result<CancelResult, StoreError> {
    let id = id.to_string();
    let updated = sqlx::query(
        "UPDATE messages SET status = 'canceled', detail = 'canceled through the API',
             updated_at = ?3
         WHERE id = ?1 AND (?2 IS NULL OR account = ?2)
           AND status IN ('queued', 'scheduled', 'held_suspect')
         RETURNING account, webhook_url, reference",
    )
    .bind(&id)
    .bind(account)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(row) = updated {
        let target = target_from_row(&row)?;
        add_event(
            tx,
            &id,
            Status::Canceled,
            Some("canceled through the API"),
            None,
            now,
            target.as_ref(),
            wake,
        )
        .await?;
        return Ok(CancelResult::Canceled);
    }
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM messages WHERE id = ?1 AND (?2 IS NULL OR account = ?2)",
    )
    .bind(&id)
    .bind(account)
    .fetch_optional(&mut **tx)
    .await?;
    match status {
        None => Ok(CancelResult::NotFound),
        Some(s) => Ok(CancelResult::TooLate(parse_status(&s)?)),
    }
}

async fn claim(
    tx: &mut Tx<'_>,
    limit: usize,
    lease_until: i64,
    now: i64,
    wake: &mut Wake,
) -> Result<Vec<Claimed>, StoreError> {
    wake.clock.tick(now);
    wake.maybe.refresh(tx).await?;
    let rows = sqlx::query(
        "UPDATE messages SET status = 'sending', locked_until = ?1, attempts = attempts + 1,
             updated_at = ?2
         WHERE id IN (SELECT id FROM messages
                      WHERE status IN ('queued', 'scheduled') AND due_at <= ?2
                      ORDER BY priority DESC, due_at LIMIT ?3)
         RETURNING id, account, recipient, sender, body, encoding, segments, attempts, expires_at,
                   category, priority, consent_at, service_messages, webhook_url, reference, policy_gen",
    )
    .bind(lease_until)
    .bind(now)
    .bind(limit as i64)
    .fetch_all(&mut **tx)
    .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    let mut sending = Vec::with_capacity(rows.len());
    for row in rows {
        let id: String = row.try_get("id")?;
        // What changed while the message waited (an opt-out, a number change, a suspect
        // number, a retry by an operator) stops it here, at the last moment before sending.
        // Checked only when something did change, or the message was out before.
        let decided_in: i64 = row.try_get("policy_gen")?;
        let retried = row.try_get::<i64, _>("attempts")? > 1;
        let stale = decided_in < wake.clock.current() || retried;
        if stale && let Some((status, detail)) = policy::recheck(tx, &row, now, wake).await? {
            set_status(tx, &id, status, &detail, now, wake).await?;
            continue;
        }
        let attempt = row.try_get::<i64, _>("attempts")? as u32;
        let accepted_parts = if attempt > 1 {
            sqlx::query_scalar::<_, i64>("SELECT part FROM parts WHERE message_id = ?1")
                .bind(&id)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(|p| p as u32)
                .collect()
        } else {
            Vec::new()
        };
        sending.push((id.clone(), format!("attempt {attempt}")));
        claimed.push(Claimed {
            id: parse_id(&id)?,
            account: row.try_get("account")?,
            recipient: row.try_get("recipient")?,
            sender: row.try_get("sender")?,
            body: row
                .try_get::<Option<String>, _>("body")?
                .unwrap_or_default(),
            category: row
                .try_get::<String, _>("category")?
                .parse()
                .map_err(|()| StoreError::Corrupt(format!("message {id}: unknown category")))?,
            priority: row.try_get::<i64, _>("priority")? as i32,
            encoding: parse_encoding(&row.try_get::<String, _>("encoding")?)?,
            segments: row.try_get::<i64, _>("segments")? as u32,
            attempt,
            expires_at: row.try_get("expires_at")?,
            accepted_parts,
        });
    }
    // The `sending` events of the whole claim in one statement.
    if !sending.is_empty() {
        let events = serde_json::to_string(&sending).unwrap_or_else(|_| "[]".into());
        sqlx::query(
            "INSERT INTO events (message_id, at, status, detail)
             SELECT value ->> 0, ?2, 'sending', value ->> 1 FROM json_each(?1)",
        )
        .bind(events)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(claimed)
}

async fn record_attempt(
    tx: &mut Tx<'_>,
    result: &AttemptResult,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let id = result.id.to_string();
    let carrier = result.carrier.as_deref().unwrap_or("");
    for part in &result.accepted {
        sqlx::query(
            "INSERT INTO parts (message_id, part, carrier, carrier_message_id, state, updated_at,
                 submitted_id)
             VALUES (?1, ?2, ?3, ?4, 'submitted', ?5, ?6)
             ON CONFLICT (message_id, part) DO UPDATE SET carrier = ?3,
                 carrier_message_id = ?4, state = 'submitted', updated_at = ?5,
                 submitted_id = ?6, queried_at = NULL",
        )
        .bind(&id)
        .bind(part.part as i64)
        .bind(carrier)
        .bind(normalize_id(&part.carrier_message_id))
        .bind(now)
        .bind(&part.carrier_message_id)
        .execute(&mut **tx)
        .await?;
    }
    let (status, detail, error_code, due_at) = match &result.next {
        Next::Sent => (Status::Sent, None, None, None),
        Next::Retry { at, detail } => (Status::Queued, Some(detail.as_str()), None, Some(*at)),
        Next::Finish {
            status,
            detail,
            error_code,
        } => (*status, Some(detail.as_str()), error_code.as_deref(), None),
    };
    let noted = match (result.note.as_deref(), detail) {
        (Some(note), Some(detail)) => Some(format!("{note}; {detail}")),
        (Some(note), None) => Some(note.to_owned()),
        (None, detail) => detail.map(str::to_owned),
    };
    let detail = noted.as_deref();
    // Only a message we hold the claim of moves: a cancel or a restart may have come first.
    let row = sqlx::query(
        "UPDATE messages SET status = ?2, detail = ?3, error_code = COALESCE(?4, error_code),
             carrier = COALESCE(?5, carrier), due_at = COALESCE(?6, due_at),
             locked_until = NULL, updated_at = ?7
         WHERE id = ?1 AND status = 'sending'
         RETURNING account, webhook_url, reference, recipient",
    )
    .bind(&id)
    .bind(status.as_str())
    .bind(detail)
    .bind(error_code)
    .bind(result.carrier.as_deref())
    .bind(due_at)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(row) = row {
        // A retry is the gateway's own business: it is in the history, not posted.
        let target = target_from_row(&row)?.map(|t| WebhookTarget {
            url: t.url.filter(|_| status != Status::Queued),
            ..t
        });
        add_event(
            tx,
            &id,
            status,
            detail,
            error_code,
            now,
            target.as_ref(),
            wake,
        )
        .await?;
        if status == Status::Queued {
            wake.queue = true;
        }
        if let Some(code) = error_code.filter(|c| wake.rules.is_suspect_code(c)) {
            let recipient: String = row.try_get("recipient")?;
            policy::count_failure(tx, &recipient, code, now, wake).await?;
        }
    }
    // Receipts that overtook their submit_sm_resp are applied now that their part is known,
    // even when the message itself moved on (its lease ended) in the meantime.
    let parked = MaybeRows::get(&wake.maybe.early_receipts);
    for part in result.accepted.iter().filter(|_| parked) {
        let key = normalize_id(&part.carrier_message_id);
        let early = sqlx::query(
            "DELETE FROM early_receipts WHERE carrier = ?1 AND carrier_message_id = ?2
             RETURNING state, error_code",
        )
        .bind(carrier)
        .bind(&key)
        .fetch_all(&mut **tx)
        .await?;
        for row in early {
            let state = parse_receipt_state(&row.try_get::<String, _>("state")?)?;
            let error_code: Option<String> = row.try_get("error_code")?;
            let receipt = Receipt {
                carrier_message_id: key.clone(),
                state,
                error_code,
            };
            apply_receipt(tx, carrier, &receipt, now, wake).await?;
        }
    }
    Ok(())
}

async fn apply_receipt(
    tx: &mut Tx<'_>,
    carrier: &str,
    receipt: &Receipt,
    now: i64,
    wake: &mut Wake,
) -> Result<ReceiptMatch, StoreError> {
    let key = normalize_id(&receipt.carrier_message_id);
    // "err:000" on a delivered part is no error; keep codes that say something.
    let receipt = &Receipt {
        error_code: receipt.error_code.clone().filter(|code| {
            receipt.state != ReceiptState::Delivered && !code.trim_start_matches('0').is_empty()
        }),
        ..receipt.clone()
    };
    // Carriers reuse ids over time: the newest part with this id is the one meant.
    let part = sqlx::query(
        "SELECT rowid, message_id, part, state, updated_at FROM parts
         WHERE carrier = ?1 AND carrier_message_id = ?2
         ORDER BY updated_at DESC LIMIT 1",
    )
    .bind(carrier)
    .bind(&key)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(part) = part else {
        MaybeRows::set(&wake.maybe.early_receipts, true);
        sqlx::query(
            "INSERT INTO early_receipts (carrier, carrier_message_id, state, error_code, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(carrier)
        .bind(&key)
        .bind(receipt.state.as_str())
        .bind(&receipt.error_code)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM early_receipts WHERE received_at < ?1")
            .bind(now - EARLY_RECEIPT_TTL_MS)
            .execute(&mut **tx)
            .await?;
        return Ok(ReceiptMatch::Parked);
    };
    let id: String = part.try_get("message_id")?;
    let part_no: i64 = part.try_get("part")?;
    // A late intermediate receipt (ENROUTE after DELIVRD, from another bind) changes nothing.
    let part_is_final =
        parse_receipt_state(&part.try_get::<String, _>("state")?).is_ok_and(ReceiptState::is_final);
    let part_state: String = part.try_get("state")?;
    if receipt.state.is_final() && part_state == "submitted" {
        let accepted_at: i64 = part.try_get("updated_at")?;
        crate::metrics::receipt_latency(carrier, now - accepted_at);
    }
    if receipt.state.is_final() || !part_is_final {
        sqlx::query("UPDATE parts SET state = ?2, updated_at = ?3 WHERE rowid = ?1")
            .bind(part.try_get::<i64, _>("rowid")?)
            .bind(receipt.state.as_str())
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    // The common case, a final receipt for a one-part message still open, in one statement.
    if receipt.state.is_final() {
        let status = match receipt.state {
            ReceiptState::Delivered => Status::Delivered,
            ReceiptState::Expired => Status::Expired,
            _ => Status::Undelivered,
        };
        let detail = receipt_detail(part_no, 1, receipt);
        let closed = sqlx::query(
            "UPDATE messages SET status = ?2, detail = ?3,
                 error_code = COALESCE(?4, error_code), updated_at = ?5
             WHERE id = ?1 AND segments = 1
               AND status IN ('queued', 'scheduled', 'sending', 'sent', 'held_suspect')
             RETURNING account, webhook_url, reference, recipient",
        )
        .bind(&id)
        .bind(status.as_str())
        .bind(&detail)
        .bind(&receipt.error_code)
        .bind(now)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = closed {
            let recipient: String = row.try_get("recipient")?;
            carrier_feedback(tx, &recipient, receipt, status, now, wake).await?;
            let target = target_from_row(&row)?;
            let code = receipt.error_code.as_deref();
            add_event(
                tx,
                &id,
                status,
                Some(&detail),
                code,
                now,
                target.as_ref(),
                wake,
            )
            .await?;
            return Ok(ReceiptMatch::Matched);
        }
    }
    let row = sqlx::query(
        "SELECT status, segments, account, webhook_url, reference, recipient,
             (SELECT COUNT(*) FROM parts WHERE message_id = ?1) AS parts,
             (SELECT COUNT(*) FROM parts WHERE message_id = ?1 AND state = 'delivered')
                 AS delivered
         FROM messages WHERE id = ?1",
    )
    .bind(&id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(ReceiptMatch::Matched);
    };
    let current = parse_status(&row.try_get::<String, _>("status")?)?;
    let target = target_from_row(&row)?;
    let parts = Parts {
        segments: row.try_get("segments")?,
        submitted: row.try_get("parts")?,
        delivered: row.try_get("delivered")?,
        all_submitted: current == Status::Sent,
    };
    let detail = receipt_detail(part_no, parts.submits(), receipt);
    let recipient: String = row.try_get("recipient")?;
    let next = if !receipt.state.is_final() || current.is_final() {
        None
    } else {
        rolled_up_status(&parts, receipt.state)
    };
    if let Some(status) = next {
        carrier_feedback(tx, &recipient, receipt, status, now, wake).await?;
    }
    match next {
        Some(status) => {
            sqlx::query(
                "UPDATE messages SET status = ?2, detail = ?3,
                     error_code = COALESCE(?4, error_code), updated_at = ?5
                 WHERE id = ?1",
            )
            .bind(&id)
            .bind(status.as_str())
            .bind(&detail)
            .bind(&receipt.error_code)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            add_event(
                tx,
                &id,
                status,
                Some(&detail),
                receipt.error_code.as_deref(),
                now,
                target.as_ref(),
                wake,
            )
            .await?;
        }
        // A receipt that changes nothing (intermediate, one part of several, late) is history.
        None => {
            sqlx::query(
                "INSERT INTO events (message_id, at, status, detail) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(&id)
            .bind(now)
            .bind(current.as_str())
            .bind(&detail)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(ReceiptMatch::Matched)
}

/// Carrier feedback on the number, once per message that ends (not per part or duplicate
/// receipt): "unknown subscriber" counts towards suspect, a delivery shows the number works.
async fn carrier_feedback(
    tx: &mut Tx<'_>,
    recipient: &str,
    receipt: &Receipt,
    status: Status,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    match &receipt.error_code {
        _ if status == Status::Delivered => policy::reset_failures(tx, recipient, wake).await,
        Some(code) if wake.rules.is_suspect_code(code) => {
            policy::count_failure(tx, recipient, code, now, wake).await
        }
        _ => Ok(()),
    }
}

/// What the parts of a multi-part message have reached.
struct Parts {
    /// SMS segments (the billing count).
    segments: i64,
    /// submit_sm recorded; fewer than `segments` when the carrier takes the whole text in one
    /// message_payload.
    submitted: i64,
    delivered: i64,
    /// Every submit_sm of the message was accepted (it is `sent`).
    all_submitted: bool,
}

impl Parts {
    /// How many submit_sm (and receipts) the message takes, as far as known.
    fn submits(&self) -> i64 {
        if self.all_submitted {
            self.submitted
        } else {
            self.segments
        }
    }
}

/// The message status once a final receipt for one part is in: delivered when every part is,
/// undelivered or expired as soon as one part is (DOMAIN.md §3.6).
fn rolled_up_status(parts: &Parts, latest: ReceiptState) -> Option<Status> {
    match latest {
        ReceiptState::Delivered => {
            let every_part = parts.delivered >= parts.segments
                || (parts.all_submitted && parts.delivered >= parts.submitted);
            every_part.then_some(Status::Delivered)
        }
        ReceiptState::Expired => Some(Status::Expired),
        _ => Some(Status::Undelivered),
    }
}

fn receipt_detail(part: i64, segments: i64, receipt: &Receipt) -> String {
    let mut detail = format!("receipt: {}", receipt.state.as_str());
    if segments > 1 {
        detail.push_str(&format!(" (part {part} of {segments})"));
    }
    if let Some(err) = &receipt.error_code {
        detail.push_str(&format!(", error {err}"));
    }
    detail
}

async fn store_inbound(
    tx: &mut Tx<'_>,
    carrier: &str,
    sms: &InboundSms,
    owner: Option<&InboundOwner>,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let id = MessageId::new().to_string();
    let sender = crate::message::Msisdn::parse(&format!("+{}", sms.from.trim_start_matches('+')))
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|_| sms.from.clone());
    sqlx::query(
        "INSERT INTO inbound (id, account, carrier, sender, recipient, body, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(&id)
    .bind(owner.map(|o| o.account.as_str()))
    .bind(carrier)
    .bind(&sender)
    .bind(&sms.to)
    .bind(&sms.text)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    // Keywords take effect in this transaction: before the deliver_sm is acknowledged.
    let keyword = match owner {
        Some(owner) => {
            policy::on_inbound(tx, owner, &sender, &sms.to, &sms.text, now, wake).await?
        }
        None => None,
    };
    if let Some((account, Some(url))) = owner.map(|o| (&o.account, &o.webhook_url)) {
        let payload = serde_json::json!({
            "type": "message.inbound",
            "id": id,
            "from": sender,
            "to": sms.to,
            "text": sms.text,
            "keyword": keyword,
            "received_at": rfc3339(now),
        });
        enqueue_webhook(tx, account, url, &payload.to_string(), now, wake).await?;
    }
    Ok(())
}

async fn release(tx: &mut Tx<'_>, all: bool, now: i64, wake: &mut Wake) -> Result<u64, StoreError> {
    let detail = "lease ended while sending: any submit_sm of it may or may not have reached the \
                  carrier; queued again";
    let rows = sqlx::query(
        "UPDATE messages SET status = 'queued', detail = ?2, locked_until = NULL, due_at = ?1,
             updated_at = ?1
         WHERE status = 'sending' AND (?3 OR locked_until < ?1)
         RETURNING id, account, reference, NULL AS webhook_url",
    )
    .bind(now)
    .bind(detail)
    .bind(all)
    .fetch_all(&mut **tx)
    .await?;
    add_events(tx, &rows, Status::Queued, detail, now, wake).await?;
    if !rows.is_empty() {
        wake.queue = true;
    }
    Ok(rows.len() as u64)
}

/// What is left of a number after the retention period.
fn anonymous(rules: &StoreRules, number: &str) -> String {
    if number.starts_with('~') {
        return number.to_owned();
    }
    format!("~{}", rules.pseudonyms.pseudonym(number))
}

/// The retention purge. Ids are UUIDv7, so "created before" is an id range on the primary
/// key and the purge never scans the whole history. A dry run does the same work inside a
/// savepoint and rolls it back, so its counts are exact.
async fn purge(
    tx: &mut Tx<'_>,
    cutoffs: &Cutoffs,
    limit: u32,
    dry_run: bool,
    rules: &StoreRules,
) -> Result<Purge, StoreError> {
    let id_before = |ms: i64| MessageId::first_at(ms).to_string();
    let limit = limit as i64;
    if dry_run {
        sqlx::query("SAVEPOINT dry_run").execute(&mut **tx).await?;
    }
    // Past the retention, a message keeps its statistics only: its text goes, its number
    // becomes a pseudonym (`~` and 16 hex digits) and its status note (which may name a
    // number) goes.
    let done = sqlx::query(
        "SELECT id, recipient FROM messages WHERE id < ?1 AND body IS NOT NULL
           AND status NOT IN ('queued', 'scheduled', 'sending', 'held_suspect')
         LIMIT ?2",
    )
    .bind(id_before(cutoffs.bodies_before))
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    for row in &done {
        let recipient: String = row.try_get("recipient")?;
        sqlx::query("UPDATE messages SET body = NULL, detail = NULL, recipient = ?2 WHERE id = ?1")
            .bind(row.try_get::<String, _>("id")?)
            .bind(anonymous(rules, &recipient))
            .execute(&mut **tx)
            .await?;
    }
    let message_bodies = done.len() as u64;
    let inbound =
        sqlx::query("SELECT id, sender FROM inbound WHERE id < ?1 AND body IS NOT NULL LIMIT ?2")
            .bind(id_before(cutoffs.bodies_before))
            .bind(limit)
            .fetch_all(&mut **tx)
            .await?;
    for row in &inbound {
        let sender: String = row.try_get("sender")?;
        sqlx::query("UPDATE inbound SET body = NULL, sender = ?2 WHERE id = ?1")
            .bind(row.try_get::<String, _>("id")?)
            .bind(anonymous(rules, &sender))
            .execute(&mut **tx)
            .await?;
    }
    let inbound_bodies = inbound.len() as u64;
    let webhooks = sqlx::query(
        "DELETE FROM webhooks WHERE id IN (SELECT id FROM webhooks WHERE created_at < ?1 LIMIT ?2)",
    )
    .bind(cutoffs.bodies_before)
    .bind(limit)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let events = sqlx::query(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE message_id < ?1 LIMIT ?2)",
    )
    .bind(id_before(cutoffs.events_before))
    .bind(limit)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let canceled =
        sqlx::query("SELECT id FROM messages WHERE id < ?1 AND status = 'canceled' LIMIT ?2")
            .bind(id_before(cutoffs.canceled_before))
            .bind(limit)
            .fetch_all(&mut **tx)
            .await?;
    for row in &canceled {
        let id: String = row.try_get("id")?;
        for statement in [
            "DELETE FROM events WHERE message_id = ?1",
            "DELETE FROM messages WHERE id = ?1",
        ] {
            sqlx::query(statement).bind(&id).execute(&mut **tx).await?;
        }
    }
    let idempotency_keys = sqlx::query("DELETE FROM idempotency WHERE created_at < ?1")
        .bind(cutoffs.idempotency_before)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if dry_run {
        sqlx::query("ROLLBACK TO dry_run")
            .execute(&mut **tx)
            .await?;
        sqlx::query("RELEASE dry_run").execute(&mut **tx).await?;
    }
    Ok(Purge {
        message_bodies,
        inbound_bodies,
        webhooks,
        events,
        canceled_messages: canceled.len() as u64,
        idempotency_keys,
    })
}

async fn expire_overdue(tx: &mut Tx<'_>, now: i64, wake: &mut Wake) -> Result<u64, StoreError> {
    let detail = "validity period ended before it could be sent";
    let rows = sqlx::query(
        "UPDATE messages SET status = 'expired', detail = ?2, updated_at = ?1
         WHERE status IN ('queued', 'scheduled') AND expires_at <= ?1
         RETURNING id, account, webhook_url, reference",
    )
    .bind(now)
    .bind(detail)
    .fetch_all(&mut **tx)
    .await?;
    add_events(tx, &rows, Status::Expired, detail, now, wake).await?;
    Ok(rows.len() as u64)
}

async fn claim_webhooks(
    tx: &mut Tx<'_>,
    limit: usize,
    lease_until: i64,
    now: i64,
) -> Result<Vec<WebhookJob>, StoreError> {
    let rows = sqlx::query(
        "UPDATE webhooks SET locked_until = ?1, attempts = attempts + 1
         WHERE id IN (SELECT id FROM webhooks
                      WHERE due_at <= ?2 AND (locked_until IS NULL OR locked_until < ?2)
                      ORDER BY due_at LIMIT ?3)
         RETURNING id, account, url, payload, attempts, created_at",
    )
    .bind(lease_until)
    .bind(now)
    .bind(limit as i64)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(WebhookJob {
                id: r.try_get("id")?,
                account: r.try_get("account")?,
                url: r.try_get("url")?,
                payload: r.try_get("payload")?,
                attempts: r.try_get::<i64, _>("attempts")? as u32,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// Records post results: delivered and given-up webhooks leave the outbox in one statement
/// (the common case, and one trip through the writer's connection instead of one each);
/// retries, rare, are rescheduled one by one.
async fn webhook_results(
    tx: &mut Tx<'_>,
    results: &[(i64, WebhookResult)],
) -> Result<(), StoreError> {
    let mut gone = Vec::with_capacity(results.len());
    for (id, result) in results {
        match result {
            WebhookResult::Delivered => gone.push(*id),
            WebhookResult::GiveUp { error } => {
                tracing::warn!(webhook = id, %error, "webhook given up after its retry period");
                gone.push(*id);
            }
            WebhookResult::RetryAt { at, error } => {
                sqlx::query(
                    "UPDATE webhooks SET due_at = ?2, locked_until = NULL, last_error = ?3
                     WHERE id = ?1",
                )
                .bind(id)
                .bind(at)
                .bind(error)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    if !gone.is_empty() {
        let ids = serde_json::to_string(&gone).unwrap_or_else(|_| "[]".into());
        sqlx::query("DELETE FROM webhooks WHERE id IN (SELECT value FROM json_each(?1))")
            .bind(ids)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Whose message an event is about, and where its status changes are posted (if anywhere).
struct WebhookTarget {
    account: String,
    url: Option<String>,
    reference: Option<String>,
}

/// Moves one message to `status` (releasing any claim) and records the change.
async fn set_status(
    tx: &mut Tx<'_>,
    id: &str,
    status: Status,
    detail: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let row = sqlx::query(
        "UPDATE messages SET status = ?2, detail = ?3, locked_until = NULL, updated_at = ?4
         WHERE id = ?1
         RETURNING id, account, webhook_url, reference",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(detail)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    add_events(tx, std::slice::from_ref(&row), status, detail, now, wake).await
}

/// Records the same status change for every message row of an `UPDATE ... RETURNING id,
/// account, webhook_url, reference`.
async fn add_events(
    tx: &mut Tx<'_>,
    rows: &[SqliteRow],
    status: Status,
    detail: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    for row in rows {
        let id: String = row.try_get("id")?;
        let target = target_from_row(row)?;
        add_event(
            tx,
            &id,
            status,
            Some(detail),
            None,
            now,
            target.as_ref(),
            wake,
        )
        .await?;
    }
    Ok(())
}

/// Records a status change in the history and, when the message has a webhook, in the outbox.
/// `sending` is an internal step and is not posted.
#[allow(clippy::too_many_arguments)]
async fn add_event(
    tx: &mut Tx<'_>,
    id: &str,
    status: Status,
    detail: Option<&str>,
    error_code: Option<&str>,
    now: i64,
    target: Option<&WebhookTarget>,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO events (message_id, at, status, detail) VALUES (?1, ?2, ?3, ?4)")
        .bind(id)
        .bind(now)
        .bind(status.as_str())
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    crate::metrics::status_change(target.map_or("", |t| t.account.as_str()), status.as_str());
    if let Some((target, url)) = target
        .filter(|_| status != Status::Sending)
        .and_then(|t| Some((t, t.url.as_ref()?)))
    {
        let payload = serde_json::json!({
            "type": "message.status",
            "message_id": id,
            "reference": target.reference,
            "status": status,
            "detail": detail,
            "error_code": error_code,
            "at": rfc3339(now),
        });
        enqueue_webhook(tx, &target.account, url, &payload.to_string(), now, wake).await?;
    }
    Ok(())
}

async fn enqueue_webhook(
    tx: &mut Tx<'_>,
    account: &str,
    url: &str,
    payload: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhooks (account, url, payload, created_at, due_at) VALUES (?1, ?2, ?3, ?4, ?4)",
    )
    .bind(account)
    .bind(url)
    .bind(payload)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    wake.webhooks = true;
    Ok(())
}

fn target_from_row(row: &SqliteRow) -> Result<Option<WebhookTarget>, StoreError> {
    Ok(Some(WebhookTarget {
        account: row.try_get("account")?,
        url: row.try_get("webhook_url")?,
        reference: row.try_get("reference")?,
    }))
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

fn parse_id(s: &str) -> Result<MessageId, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("message id `{s}`")))
}

fn parse_status(s: &str) -> Result<Status, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("status `{s}`")))
}

fn parse_encoding(s: &str) -> Result<Encoding, StoreError> {
    match s {
        "gsm7" => Ok(Encoding::Gsm7),
        "ucs2" => Ok(Encoding::Ucs2),
        _ => Err(StoreError::Corrupt(format!("encoding `{s}`"))),
    }
}

fn parse_receipt_state(s: &str) -> Result<ReceiptState, StoreError> {
    const ALL: [ReceiptState; 10] = [
        ReceiptState::Scheduled,
        ReceiptState::Enroute,
        ReceiptState::Delivered,
        ReceiptState::Expired,
        ReceiptState::Deleted,
        ReceiptState::Undeliverable,
        ReceiptState::Accepted,
        ReceiptState::Unknown,
        ReceiptState::Rejected,
        ReceiptState::Skipped,
    ];
    ALL.into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| StoreError::Corrupt(format!("receipt state `{s}`")))
}

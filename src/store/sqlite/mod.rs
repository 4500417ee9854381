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

use crate::store::shared::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Params, Transaction, TransactionBehavior, params};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use tokio::sync::{Mutex, mpsc, oneshot};

mod policy;
mod receipts;

pub use policy::FACTS_QUERY;

use super::*;
use crate::message::{now_ms, rfc3339};
use crate::receipt::{ReceiptState, normalize_id};

/// A backstop: parked receipts older than this are dropped unseen. Each carrier's sweeper
/// gives them up (and lists them) after its `unmatched_after`, at most 24 h, so an hour later.
const EARLY_RECEIPT_TTL_MS: i64 = 25 * 3600 * 1000;

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
    jobs: mpsc::Sender<Message>,
    readers: SqlitePool,
    rules: Arc<StoreRules>,
    signals: Arc<Signals>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<Checkpointer>>,
    /// When the writer last failed a write for a full disk (ms; 0: never).
    disk_full_at: Arc<AtomicI64>,
}

/// What the writer thread receives: work, or the order to stop once the work sent before it
/// is committed.
enum Message {
    Job(Job),
    Stop,
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
        account: Option<String>,
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
    WebhookResults {
        results: Vec<(WebhookJob, WebhookResult)>,
        /// The handoff's cursor after these results (see [`Handoff::settle`]).
        settled_through: Option<i64>,
    },
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
    signals: Arc<Signals>,
    event_ids: Arc<EventIds>,
    queue: bool,
    webhooks: bool,
    /// Webhooks whose event is their durable copy, handed to the sender once committed.
    handed: Vec<WebhookJob>,
}

impl Wake {
    fn new(
        rules: &Arc<StoreRules>,
        clock: &Arc<PolicyClock>,
        maybe: &Arc<MaybeRows>,
        signals: &Arc<Signals>,
        event_ids: &Arc<EventIds>,
    ) -> Wake {
        Wake {
            rules: rules.clone(),
            clock: clock.clone(),
            maybe: maybe.clone(),
            signals: signals.clone(),
            event_ids: event_ids.clone(),
            queue: false,
            webhooks: false,
            handed: Vec::new(),
        }
    }

    /// Wakes what the committed operations gave work to.
    fn committed(&mut self) {
        if self.queue {
            self.signals.queue.notify_one();
        }
        if self.webhooks {
            self.signals.webhooks.notify_one();
        }
        self.signals.handoff.hand(std::mem::take(&mut self.handed));
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
        let mut writer = open_writer(path)?;
        let recovered = recover_webhooks(&mut writer)?;
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
        let (jobs, rx) = mpsc::channel(max_batch * 4);
        let rules = Arc::new(rules);
        let disk_full_at = Arc::new(AtomicI64::new(0));
        let recovery = Recovery {
            disk_full_at: disk_full_at.clone(),
        };
        let thread_signals = signals.clone();
        let thread_rules = rules.clone();
        let wal_limit = WalLimit::new(&writer, path, WAL_RESTART_BYTES)?;
        let handle = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                run_writer(
                    writer,
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
            jobs,
            readers,
            rules,
            signals,
            writer: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some(checkpointer)),
            disk_full_at,
        })
    }

    async fn call(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Message::Job(Job { op, reply }))
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

    async fn clear_suspect(&self, number: &str, account: Option<&str>) -> Result<bool, StoreError> {
        let op = Op::ClearSuspect {
            number: number.to_owned(),
            account: account.map(str::to_owned),
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
        let due: Option<i64> = sqlx::query_scalar(NEXT_DUE_QUERY)
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

    async fn webhook_results(
        &self,
        results: Vec<(WebhookJob, WebhookResult)>,
    ) -> Result<(), StoreError> {
        let handoff = &self.signals.handoff;
        let events: Vec<i64> = results
            .iter()
            .filter(|(job, _)| job.copy == WebhookCopy::Event)
            .map(|(job, _)| job.id)
            .collect();
        let settled_through = handoff.settle(&events);
        let op = Op::WebhookResults {
            results,
            settled_through,
        };
        self.call(op)
            .await
            .map(|_| ())
            .inspect_err(|_| handoff.unsettle(&events))
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
        if self.jobs.is_closed() {
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
        if let Some(handle) = self.writer.lock().await.take() {
            // Behind every job already sent: those are still committed.
            let _ = self.jobs.send(Message::Stop).await;
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
        })
    }

    fn enforce(&self, conn: &rusqlite::Connection) {
        let bytes = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
        if bytes <= self.most_bytes {
            return;
        }
        // A reader still on an old snapshot would hold the writer: wait briefly, else later.
        let restarted = conn
            .busy_timeout(Duration::from_millis(50))
            .and_then(|()| conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get(0)))
            .map(|busy: i64| busy == 0);
        let _ = conn.busy_timeout(WRITER_BUSY_TIMEOUT);
        match restarted {
            Ok(true) => tracing::debug!(bytes, "WAL started over"),
            Ok(false) => tracing::debug!(bytes, "WAL not started over: a reader holds it"),
            Err(e) => tracing::debug!(error = %e, "WAL not started over"),
        }
    }
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

fn run_writer(
    conn: rusqlite::Connection,
    mut jobs: mpsc::Receiver<Message>,
    max_batch: usize,
    signals: Arc<Signals>,
    rules: Arc<StoreRules>,
    recovery: Recovery,
    wal_limit: WalLimit,
) {
    let clock = Arc::new(PolicyClock {
        generation: std::sync::atomic::AtomicI64::new(1),
        next_effective: std::sync::atomic::AtomicI64::new(i64::MAX),
    });
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
        Ok(ids) => Arc::new(ids),
        Err(error) => {
            tracing::error!(%error, "reading the last event id failed; the store takes no writes");
            return;
        }
    };
    // Until the first claim looks, assume both side tables hold rows.
    let maybe = Arc::new(MaybeRows::default());
    MaybeRows::set(&maybe.early_receipts, true);
    MaybeRows::set(&maybe.suspects, true);
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
        let mut wake = Wake::new(&rules, &clock, &maybe, &signals, &event_ids);
        match apply_batch(&tx, &batch, &mut wake) {
            Ok(replies) => {
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
                wake = Wake::new(&rules, &clock, &maybe, &signals, &event_ids);
                for job in batch.drain(..) {
                    let single = std::slice::from_ref(&job);
                    let result = apply_batch(&tx, single, &mut wake)
                        .map(|mut replies| replies.pop().unwrap_or(Reply::Done));
                    if let Err(error) = &result {
                        recovery.after_failure(&conn, error);
                    }
                    let _ = job.reply.send(result);
                }
            }
        }
        wake.committed();
        wal_limit.enforce(&conn);
    }
}

fn apply_batch(tx: &Tx, batch: &[Job], wake: &mut Wake) -> Result<Vec<Reply>, StoreError> {
    let handed_before = wake.handed.len();
    let result = (|| {
        // The writer is the only one to begin transactions on its connection: none is open.
        let transaction = Transaction::new_unchecked(tx.conn, TransactionBehavior::Immediate)?;
        let now = now_ms();
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            replies.push(apply(tx, &job.op, now, wake)?);
        }
        transaction.commit()?;
        Ok(replies)
    })();
    if result.is_err() {
        // Rolled back: the rows these jobs name do not exist.
        let dropped = wake.handed.drain(handed_before..).count();
        wake.signals.handoff.give_back(dropped);
    }
    result
}

fn apply(tx: &Tx, op: &Op, now: i64, wake: &mut Wake) -> Result<Reply, StoreError> {
    Ok(match op {
        Op::Submit {
            account,
            policy,
            messages,
            idempotency,
            render,
        } => Reply::Submit(submit(
            tx,
            account,
            policy,
            messages,
            idempotency.as_ref(),
            render,
            now,
            wake,
        )?),
        Op::AddOptOuts {
            account,
            entries,
            by,
            policy,
        } => Reply::Count(policy::add_opt_outs(
            tx, account, entries, by, policy, now, wake,
        )?),
        Op::RemoveOptOut {
            account,
            number,
            sender,
            by,
        } => Reply::Count(policy::remove_opt_out(
            tx,
            account,
            number,
            sender.as_deref(),
            by,
            now,
            wake,
        )?),
        Op::AddNumberChanges { changes, follow } => {
            Reply::Count(policy::add_number_changes(tx, changes, follow, now, wake)?)
        }
        Op::Retry { id, expires_at } => Reply::Count(retry(tx, *id, *expires_at, now, wake)?),
        Op::CancelAny { id } => Reply::Cancel(cancel(tx, None, *id, now, wake)?),
        Op::ClearSuspect { number, account } => Reply::Count(policy::clear_suspect(
            tx,
            number,
            account.as_deref(),
            now,
            wake,
        )?),
        Op::Purge {
            cutoffs,
            limit,
            dry_run,
        } => Reply::Purged(purge(tx, cutoffs, *limit, *dry_run, &wake.rules)?),
        Op::EraseSubject { account, number } => {
            Reply::Erased(policy::erase_subject(tx, account, number, wake)?)
        }
        Op::Cancel { account, id } => Reply::Cancel(cancel(tx, Some(account), *id, now, wake)?),
        Op::Claim { limit, lease_until } => {
            Reply::Claimed(claim(tx, *limit, *lease_until, now, wake)?)
        }
        Op::Attempts(results) => {
            for result in results {
                record_attempt(tx, result, now, wake)?;
            }
            Reply::Done
        }
        Op::Receipt { carrier, receipt } => {
            Reply::Receipt(apply_receipt(tx, carrier, receipt, now, wake)?)
        }
        Op::Inbound {
            carrier,
            sms,
            owner,
        } => {
            store_inbound(tx, carrier, sms, owner.as_ref(), now, wake)?;
            Reply::Done
        }
        Op::Release { all } => Reply::Count(release(tx, *all, now, wake)?),
        Op::ExpireOverdue => Reply::Count(expire_overdue(tx, now, wake)?),
        Op::ClaimWebhooks { limit, lease_until } => {
            Reply::Webhooks(claim_webhooks(tx, *limit, *lease_until, now)?)
        }
        Op::WebhookResults {
            results,
            settled_through,
        } => {
            webhook_results(tx, results, *settled_through, now, wake)?;
            Reply::Done
        }
        Op::TakeUnmatched {
            carrier,
            received_before,
        } => Reply::Parked(receipts::take_unmatched(tx, carrier, *received_before)?),
        Op::ClaimQueries {
            carrier,
            accepted_before,
            limit,
        } => Reply::Queries(receipts::claim_queries(
            tx,
            carrier,
            *accepted_before,
            *limit,
            now,
        )?),
    })
}

#[allow(clippy::too_many_arguments)]
fn submit(
    tx: &Tx,
    account: &str,
    policy: &AccountPolicy,
    messages: &[NewMessage],
    idempotency: Option<&IdempotencyRequest>,
    render: &RenderAnswer,
    now: i64,
    wake: &mut Wake,
) -> Result<SubmitResult, StoreError> {
    if let Some(request) = idempotency {
        let first = optional(
            tx,
            "SELECT key, request_hash, status_code, answer FROM idempotency
             WHERE account = ?1 AND key = ?2",
            params![account, request.key],
            |r| {
                Ok(IdempotentAnswer {
                    key: r.get(0)?,
                    request_hash: r.get(1)?,
                    status_code: r.get::<_, i64>(2)? as u16,
                    answer: r.get(3)?,
                })
            },
        )?;
        if let Some(answer) = first {
            return Ok(SubmitResult::Replay(answer));
        }
    }
    let mut decided = Vec::with_capacity(messages.len());
    for message in messages {
        let mut m = message.clone();
        policy::evaluate(tx, policy, &mut m, now, wake)?;
        insert_message(tx, &m, policy.service_messages, now, wake)?;
        decided.push(m);
    }
    let (status_code, answer) = render(&decided);
    if let Some(request) = idempotency {
        run(
            tx,
            "INSERT INTO idempotency (account, key, request_hash, status_code, answer, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                account,
                request.key,
                request.request_hash,
                status_code as i64,
                answer,
                now
            ],
        )?;
    }
    Ok(SubmitResult::Stored {
        status_code,
        answer,
    })
}

/// Inserts a message with its first event (and webhook).
/// `service_messages`: the account may send service messages to opted-out numbers (kept for
/// the check at send time).
fn insert_message(
    tx: &Tx,
    m: &NewMessage,
    service_messages: bool,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let id = m.id.to_string();
    run(
        tx,
        "INSERT INTO messages (id, account, reference, recipient, sender, body, category,
             encoding, segments, priority, webhook_url, consent_at, status, detail,
             created_at, updated_at, due_at, expires_at, service_messages, policy_gen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15, ?16, ?17,
                 ?18, ?19)",
        params![
            id,
            m.account,
            m.reference,
            m.recipient,
            m.sender,
            m.body,
            m.category.as_str(),
            m.encoding.as_str(),
            m.segments as i64,
            m.priority as i64,
            m.webhook_url,
            m.consent_at,
            m.status.as_str(),
            m.detail,
            m.created_at,
            m.due_at,
            m.expires_at,
            service_messages,
            wake.clock.current(),
        ],
    )?;
    let target = WebhookTarget {
        account: m.account.clone(),
        url: m.webhook_url.clone(),
        reference: m.reference.clone(),
    };
    add_event(
        tx,
        &id,
        m.status,
        m.detail.as_deref(),
        None,
        now,
        &target,
        wake,
    )?;
    if matches!(m.status, Status::Queued | Status::Scheduled) {
        wake.queue = true;
    }
    Ok(())
}

/// Sends an ended message once more (an operator's decision after a fault was fixed).
fn retry(
    tx: &Tx,
    id: MessageId,
    expires_at: i64,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let id = id.to_string();
    let detail = "queued again by an operator";
    let target = optional(
        tx,
        "UPDATE messages SET status = 'queued', detail = ?2, due_at = ?3, expires_at = ?4,
             updated_at = ?3
         WHERE id = ?1 AND status IN ('failed', 'expired', 'unknown', 'undelivered')
         RETURNING account, webhook_url, reference",
        params![id, detail, now, expires_at],
        target_from_row,
    )?;
    let Some(target) = target else { return Ok(0) };
    // Every part goes again: the earlier ones did not reach the handset.
    run(tx, "DELETE FROM parts WHERE message_id = ?1", [&id])?;
    add_event(
        tx,
        &id,
        Status::Queued,
        Some(detail),
        None,
        now,
        &target,
        wake,
    )?;
    wake.queue = true;
    Ok(1)
}

/// Cancels a waiting message; `account` None is an operator, who may cancel any.
fn cancel(
    tx: &Tx,
    account: Option<&str>,
    id: MessageId,
    now: i64,
    wake: &mut Wake,
) -> Result<CancelResult, StoreError> {
    let id = id.to_string();
    let detail = "canceled through the API";
    let updated = optional(
        tx,
        "UPDATE messages SET status = 'canceled', detail = 'canceled through the API',
             updated_at = ?3
         WHERE id = ?1 AND (?2 IS NULL OR account = ?2)
           AND status IN ('queued', 'scheduled', 'held_suspect')
         RETURNING account, webhook_url, reference",
        params![id, account, now],
        target_from_row,
    )?;
    if let Some(target) = updated {
        add_event(
            tx,
            &id,
            Status::Canceled,
            Some(detail),
            None,
            now,
            &target,
            wake,
        )?;
        return Ok(CancelResult::Canceled);
    }
    let status: Option<String> = optional(
        tx,
        "SELECT status FROM messages WHERE id = ?1 AND (?2 IS NULL OR account = ?2)",
        params![id, account],
        |r| r.get(0),
    )?;
    match status {
        None => Ok(CancelResult::NotFound),
        Some(s) => Ok(CancelResult::TooLate(parse_status(&s)?)),
    }
}

/// A row the claim took: what sending needs, and what the policy checks again.
struct ClaimRow {
    id: String,
    account: String,
    recipient: String,
    sender: String,
    body: Option<String>,
    encoding: String,
    segments: i64,
    attempts: i64,
    expires_at: i64,
    category: String,
    priority: i64,
    consent_at: Option<i64>,
    service_messages: bool,
    policy_gen: i64,
}

fn claim(
    tx: &Tx,
    limit: usize,
    lease_until: i64,
    now: i64,
    wake: &mut Wake,
) -> Result<Vec<Claimed>, StoreError> {
    wake.clock.tick(now);
    wake.maybe.refresh(tx)?;
    let taken = rows(
        tx,
        "UPDATE messages SET status = 'sending', locked_until = ?1, attempts = attempts + 1,
             updated_at = ?2
         WHERE id IN (SELECT id FROM messages
                      WHERE status IN ('queued', 'scheduled') AND due_at <= ?2
                      ORDER BY priority DESC, due_at LIMIT +?3)
         RETURNING id, account, recipient, sender, body, encoding, segments, attempts, expires_at,
                   category, consent_at, service_messages, policy_gen, priority",
        params![lease_until, now, limit as i64],
        |r| {
            Ok(ClaimRow {
                id: r.get(0)?,
                account: r.get(1)?,
                recipient: r.get(2)?,
                sender: r.get(3)?,
                body: r.get(4)?,
                encoding: r.get(5)?,
                segments: r.get(6)?,
                attempts: r.get(7)?,
                expires_at: r.get(8)?,
                category: r.get(9)?,
                consent_at: r.get(10)?,
                service_messages: r.get(11)?,
                policy_gen: r.get(12)?,
                priority: r.get(13)?,
            })
        },
    )?;
    let mut claimed = Vec::with_capacity(taken.len());
    for row in taken {
        // What changed while the message waited (an opt-out, a number change, a suspect
        // number, a retry by an operator) stops it here, at the last moment before sending.
        // Checked only when something did change, or the message was out before.
        let retried = row.attempts > 1;
        let stale = row.policy_gen < wake.clock.current() || retried;
        if stale && let Some((status, detail)) = policy::recheck(tx, &row, now, wake)? {
            set_status(tx, &row.id, status, &detail, now, wake)?;
            continue;
        }
        let attempt = row.attempts as u32;
        let accepted_parts = if retried {
            rows(
                tx,
                "SELECT part FROM parts WHERE message_id = ?1",
                [&row.id],
                |r| r.get::<_, i64>(0),
            )?
            .into_iter()
            .map(|p| p as u32)
            .collect()
        } else {
            Vec::new()
        };
        let detail = format!("attempt {attempt}");
        insert_event(
            tx,
            wake,
            &row.id,
            now,
            Status::Sending,
            Some(&detail),
            None,
            false,
        )?;
        claimed.push(Claimed {
            id: parse_id(&row.id)?,
            account: row.account,
            recipient: row.recipient,
            sender: row.sender,
            body: row.body.unwrap_or_default(),
            category: row.category.parse().map_err(|()| {
                StoreError::Corrupt(format!("message {}: unknown category", row.id))
            })?,
            priority: row.priority as i32,
            encoding: parse_encoding(&row.encoding)?,
            segments: row.segments as u32,
            attempt,
            expires_at: row.expires_at,
            accepted_parts,
        });
    }
    Ok(claimed)
}

fn record_attempt(
    tx: &Tx,
    result: &AttemptResult,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let id = result.id.to_string();
    let carrier = result.carrier.as_deref().unwrap_or("");
    for part in &result.accepted {
        run(
            tx,
            "INSERT INTO parts (message_id, part, carrier, carrier_message_id, state, updated_at,
                 submitted_id)
             VALUES (?1, ?2, ?3, ?4, 'submitted', ?5, ?6)
             ON CONFLICT (message_id, part) DO UPDATE SET carrier = ?3,
                 carrier_message_id = ?4, state = 'submitted', updated_at = ?5,
                 submitted_id = ?6, queried_at = NULL",
            params![
                id,
                part.part as i64,
                carrier,
                normalize_id(&part.carrier_message_id),
                now,
                part.carrier_message_id
            ],
        )?;
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
    // (A SELECT and an UPDATE: `RETURNING` would build a temporary b-tree for its one row.)
    let row = optional(
        tx,
        "SELECT account, webhook_url, reference, recipient FROM messages
         WHERE id = ?1 AND status = 'sending'",
        [&id],
        target_and_recipient,
    )?;
    if let Some((target, recipient)) = row {
        run(
            tx,
            "UPDATE messages SET status = ?2, detail = ?3, error_code = COALESCE(?4, error_code),
                 carrier = COALESCE(?5, carrier), due_at = COALESCE(?6, due_at),
                 locked_until = NULL, updated_at = ?7
             WHERE id = ?1",
            params![
                id,
                status.as_str(),
                detail,
                error_code,
                result.carrier,
                due_at,
                now
            ],
        )?;
        // A retry is the gateway's own business: it is in the history, not posted.
        let target = WebhookTarget {
            url: target.url.filter(|_| status != Status::Queued),
            ..target
        };
        add_event(tx, &id, status, detail, error_code, now, &target, wake)?;
        if status == Status::Queued {
            wake.queue = true;
        }
        if let Some(code) = error_code.filter(|c| wake.rules.is_suspect_code(c)) {
            policy::count_failure(tx, &recipient, code, now, wake)?;
        }
    }
    // Receipts that overtook their submit_sm_resp are applied now that their part is known,
    // even when the message itself moved on (its lease ended) in the meantime.
    let parked = MaybeRows::get(&wake.maybe.early_receipts);
    for part in result.accepted.iter().filter(|_| parked) {
        let key = normalize_id(&part.carrier_message_id);
        // Most parts have none: a SELECT finds that for less than a `DELETE ... RETURNING`.
        let early = rows(
            tx,
            "SELECT state, error_code FROM early_receipts
             WHERE carrier = ?1 AND carrier_message_id = ?2 ORDER BY rowid",
            params![carrier, key],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
        )?;
        if !early.is_empty() {
            run(
                tx,
                "DELETE FROM early_receipts WHERE carrier = ?1 AND carrier_message_id = ?2",
                params![carrier, key],
            )?;
        }
        for (state, error_code) in early {
            let receipt = Receipt {
                carrier_message_id: key.clone(),
                state: parse_receipt_state(&state)?,
                error_code,
            };
            apply_receipt(tx, carrier, &receipt, now, wake)?;
        }
    }
    Ok(())
}

/// The newest part a carrier message id names.
struct PartRow {
    rowid: i64,
    message_id: String,
    part: i64,
    state: String,
    updated_at: i64,
}

fn apply_receipt(
    tx: &Tx,
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
    // Carriers reuse ids over time: the newest part with this id is the one meant. With MAX,
    // SQLite takes the other columns from the row of the maximum, and needs no sort (`ORDER BY
    // updated_at DESC LIMIT 1` built a temporary b-tree for every receipt). It returns one
    // row, of NULLs when no part has the id.
    let part = one(
        tx,
        "SELECT rowid, message_id, part, state, MAX(updated_at) FROM parts
         WHERE carrier = ?1 AND carrier_message_id = ?2",
        params![carrier, key],
        |r| {
            let Some(rowid) = r.get(0)? else {
                return Ok(None);
            };
            Ok(Some(PartRow {
                rowid,
                message_id: r.get(1)?,
                part: r.get(2)?,
                state: r.get(3)?,
                updated_at: r.get(4)?,
            }))
        },
    )?;
    let Some(part) = part else {
        MaybeRows::set(&wake.maybe.early_receipts, true);
        run(
            tx,
            "INSERT INTO early_receipts (carrier, carrier_message_id, state, error_code, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![carrier, key, receipt.state.as_str(), receipt.error_code, now],
        )?;
        run(
            tx,
            "DELETE FROM early_receipts WHERE received_at < ?1",
            [now - EARLY_RECEIPT_TTL_MS],
        )?;
        return Ok(ReceiptMatch::Parked);
    };
    let id = &part.message_id;
    // A late intermediate receipt (ENROUTE after DELIVRD, from another bind) changes nothing.
    let part_is_final = parse_receipt_state(&part.state).is_ok_and(ReceiptState::is_final);
    if receipt.state.is_final() && part.state == "submitted" {
        crate::metrics::receipt_latency(carrier, now - part.updated_at);
    }
    if receipt.state.is_final() || !part_is_final {
        run(
            tx,
            "UPDATE parts SET state = ?2, updated_at = ?3 WHERE rowid = ?1",
            params![part.rowid, receipt.state.as_str(), now],
        )?;
    }
    // The common case, a final receipt for a one-part message still open. A SELECT and an
    // UPDATE cost less than `UPDATE ... RETURNING`, which collects its rows in a temporary
    // b-tree; lists of two constants at most, for the same reason (migration 0008).
    if receipt.state.is_final() {
        let status = match receipt.state {
            ReceiptState::Delivered => Status::Delivered,
            ReceiptState::Expired => Status::Expired,
            _ => Status::Undelivered,
        };
        let detail = receipt_detail(part.part, 1, receipt);
        let closed = optional(
            tx,
            "SELECT account, webhook_url, reference, recipient FROM messages
             WHERE id = ?1 AND segments = 1
               AND (status IN ('sending', 'sent') OR status IN ('queued', 'scheduled')
                    OR status = 'held_suspect')",
            [id],
            target_and_recipient,
        )?;
        if let Some((target, recipient)) = closed {
            set_final_status(tx, id, status, &detail, receipt, now)?;
            carrier_feedback(tx, &recipient, receipt, status, now, wake)?;
            let code = receipt.error_code.as_deref();
            add_event(tx, id, status, Some(&detail), code, now, &target, wake)?;
            return Ok(ReceiptMatch::Matched);
        }
    }
    let row = optional(
        tx,
        "SELECT status, segments, account, webhook_url, reference, recipient,
             (SELECT COUNT(*) FROM parts WHERE message_id = ?1) AS parts,
             (SELECT COUNT(*) FROM parts WHERE message_id = ?1 AND state = 'delivered')
                 AS delivered
         FROM messages WHERE id = ?1",
        [id],
        |r| {
            Ok((
                r.get::<_, String>("status")?,
                [
                    r.get::<_, i64>("segments")?,
                    r.get::<_, i64>("parts")?,
                    r.get::<_, i64>("delivered")?,
                ],
                target_from_row(r)?,
                r.get::<_, String>("recipient")?,
            ))
        },
    )?;
    let Some((current, [segments, submitted, delivered], target, recipient)) = row else {
        return Ok(ReceiptMatch::Matched);
    };
    let current = parse_status(&current)?;
    let parts = Parts {
        segments,
        submitted,
        delivered,
        all_submitted: current == Status::Sent,
    };
    let detail = receipt_detail(part.part, parts.submits(), receipt);
    let next = if !receipt.state.is_final() || current.is_final() {
        None
    } else {
        rolled_up_status(&parts, receipt.state)
    };
    if let Some(status) = next {
        carrier_feedback(tx, &recipient, receipt, status, now, wake)?;
    }
    match next {
        Some(status) => {
            set_final_status(tx, id, status, &detail, receipt, now)?;
            let code = receipt.error_code.as_deref();
            add_event(tx, id, status, Some(&detail), code, now, &target, wake)?;
        }
        // A receipt that changes nothing (intermediate, one part of several, late) is history.
        None => {
            insert_event(tx, wake, id, now, current, Some(&detail), None, false)?;
        }
    }
    Ok(ReceiptMatch::Matched)
}

/// Ends a message with a receipt's status.
fn set_final_status(
    tx: &Tx,
    id: &str,
    status: Status,
    detail: &str,
    receipt: &Receipt,
    now: i64,
) -> Result<(), StoreError> {
    run(
        tx,
        "UPDATE messages SET status = ?2, detail = ?3, error_code = COALESCE(?4, error_code),
             updated_at = ?5
         WHERE id = ?1",
        params![id, status.as_str(), detail, receipt.error_code, now],
    )?;
    Ok(())
}

/// Carrier feedback on the number, once per message that ends (not per part or duplicate
/// receipt): "unknown subscriber" counts towards suspect, a delivery shows the number works.
fn carrier_feedback(
    tx: &Tx,
    recipient: &str,
    receipt: &Receipt,
    status: Status,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    match &receipt.error_code {
        _ if status == Status::Delivered => policy::reset_failures(tx, recipient, wake),
        Some(code) if wake.rules.is_suspect_code(code) => {
            policy::count_failure(tx, recipient, code, now, wake)
        }
        _ => Ok(()),
    }
}

fn store_inbound(
    tx: &Tx,
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
    run(
        tx,
        "INSERT INTO inbound (id, account, carrier, sender, recipient, body, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            owner.map(|o| o.account.as_str()),
            carrier,
            sender,
            sms.to,
            sms.text,
            now
        ],
    )?;
    // Keywords take effect in this transaction: before the deliver_sm is acknowledged.
    let keyword = match owner {
        Some(owner) => policy::on_inbound(tx, owner, &sender, &sms.to, &sms.text, now, wake)?,
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
        enqueue_webhook(tx, account, url, &payload.to_string(), now, now, wake)?;
    }
    Ok(())
}

fn release(tx: &Tx, all: bool, now: i64, wake: &mut Wake) -> Result<u64, StoreError> {
    let detail = "lease ended while sending: any submit_sm of it may or may not have reached the \
                  carrier; queued again";
    let changed = rows(
        tx,
        "UPDATE messages SET status = 'queued', detail = ?2, locked_until = NULL, due_at = ?1,
             updated_at = ?1
         WHERE status = 'sending' AND (?3 OR locked_until < ?1)
         RETURNING id, account, reference, NULL AS webhook_url",
        params![now, detail, all],
        changed_from_row,
    )?;
    add_events(tx, &changed, Status::Queued, detail, now, wake)?;
    if !changed.is_empty() {
        wake.queue = true;
    }
    Ok(changed.len() as u64)
}

/// The retention purge. Ids are UUIDv7, so "created before" is an id range on the primary
/// key and the purge never scans the whole history. A dry run does the same work inside a
/// savepoint and rolls it back, so its counts are exact.
fn purge(
    tx: &Tx,
    cutoffs: &Cutoffs,
    limit: u32,
    dry_run: bool,
    rules: &StoreRules,
) -> Result<Purge, StoreError> {
    let id_before = |ms: i64| MessageId::first_at(ms).to_string();
    let limit = limit as i64;
    if dry_run {
        tx.execute_batch("SAVEPOINT dry_run")?;
    }
    // Past the retention, a message keeps its statistics only: its text goes, its number
    // becomes a pseudonym (`~` and 16 hex digits) and its status note (which may name a
    // number) goes.
    let done = rows(
        tx,
        "SELECT id, recipient FROM messages WHERE id < ?1 AND body IS NOT NULL
           AND status NOT IN ('queued', 'scheduled', 'sending', 'held_suspect')
         LIMIT ?2",
        params![id_before(cutoffs.bodies_before), limit],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    )?;
    for (id, recipient) in &done {
        run(
            tx,
            "UPDATE messages SET body = NULL, detail = NULL, recipient = ?2 WHERE id = ?1",
            params![id, anonymous(rules, recipient)],
        )?;
    }
    let message_bodies = done.len() as u64;
    let inbound = rows(
        tx,
        "SELECT id, sender FROM inbound WHERE id < ?1 AND body IS NOT NULL LIMIT ?2",
        params![id_before(cutoffs.bodies_before), limit],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    )?;
    for (id, sender) in &inbound {
        run(
            tx,
            "UPDATE inbound SET body = NULL, sender = ?2 WHERE id = ?1",
            params![id, anonymous(rules, sender)],
        )?;
    }
    let inbound_bodies = inbound.len() as u64;
    let webhooks = run(
        tx,
        "DELETE FROM webhooks WHERE id IN (SELECT id FROM webhooks WHERE created_at < ?1 LIMIT ?2)",
        params![cutoffs.bodies_before, limit],
    )?;
    let events = run(
        tx,
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE message_id < ?1 LIMIT ?2)",
        params![id_before(cutoffs.events_before), limit],
    )?;
    let canceled = rows(
        tx,
        "SELECT id FROM messages WHERE id < ?1 AND status = 'canceled' LIMIT ?2",
        params![id_before(cutoffs.canceled_before), limit],
        |r| r.get::<_, String>(0),
    )?;
    for id in &canceled {
        run(tx, "DELETE FROM events WHERE message_id = ?1", [id])?;
        run(tx, "DELETE FROM messages WHERE id = ?1", [id])?;
    }
    let idempotency_keys = run(
        tx,
        "DELETE FROM idempotency WHERE created_at < ?1",
        [cutoffs.idempotency_before],
    )?;
    if dry_run {
        tx.execute_batch("ROLLBACK TO dry_run; RELEASE dry_run")?;
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

fn expire_overdue(tx: &Tx, now: i64, wake: &mut Wake) -> Result<u64, StoreError> {
    let detail = "validity period ended before it could be sent";
    let changed = rows(
        tx,
        "UPDATE messages SET status = 'expired', detail = ?2, updated_at = ?1
         WHERE status IN ('queued', 'scheduled') AND expires_at <= ?1
         RETURNING id, account, webhook_url, reference",
        params![now, detail],
        changed_from_row,
    )?;
    add_events(tx, &changed, Status::Expired, detail, now, wake)?;
    Ok(changed.len() as u64)
}

fn claim_webhooks(
    tx: &Tx,
    limit: usize,
    lease_until: i64,
    now: i64,
) -> Result<Vec<WebhookJob>, StoreError> {
    // A lease that ended (its sender died) makes the webhook waiting again.
    run(
        tx,
        "UPDATE webhooks SET locked_until = NULL WHERE locked_until < ?1",
        [now],
    )?;
    rows(
        tx,
        "UPDATE webhooks SET locked_until = ?1, attempts = attempts + 1
         WHERE id IN (SELECT id FROM webhooks
                      WHERE locked_until IS NULL AND due_at <= ?2
                      ORDER BY due_at LIMIT +?3)
         RETURNING id, account, url, payload, attempts, created_at",
        params![lease_until, now, limit as i64],
        |r| {
            Ok(WebhookJob {
                id: r.get(0)?,
                copy: WebhookCopy::Outbox,
                account: r.get(1)?,
                url: r.get(2)?,
                payload: r.get(3)?,
                attempts: r.get::<_, i64>(4)? as u32,
                created_at: r.get(5)?,
            })
        },
    )
}

/// Records post results: delivered and given-up webhooks leave the outbox, retries are
/// rescheduled. A handed webhook has no row: it gets one only to wait again; and the cursor
/// moves past the handed webhooks now settled.
fn webhook_results(
    tx: &Tx,
    results: &[(WebhookJob, WebhookResult)],
    settled_through: Option<i64>,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    for (job, result) in results {
        if let WebhookResult::GiveUp { error } = result {
            tracing::warn!(webhook = job.id, %error, "webhook given up after its retry period");
        }
        match (job.copy, result) {
            (WebhookCopy::Outbox, WebhookResult::Delivered | WebhookResult::GiveUp { .. }) => {
                run(tx, "DELETE FROM webhooks WHERE id = ?1", [job.id])?;
            }
            (WebhookCopy::Outbox, WebhookResult::RetryAt { at, error }) => {
                run(
                    tx,
                    "UPDATE webhooks SET due_at = ?2, locked_until = NULL, last_error = ?3
                     WHERE id = ?1",
                    params![job.id, at, error],
                )?;
            }
            (WebhookCopy::Outbox, WebhookResult::Unposted) => {
                run(
                    tx,
                    "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1
                     WHERE id = ?1",
                    [job.id],
                )?;
            }
            (WebhookCopy::Outbox, WebhookResult::Deferred { at }) => {
                run(
                    tx,
                    "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1, due_at = ?2
                     WHERE id = ?1",
                    params![job.id, at],
                )?;
            }
            (WebhookCopy::Event, WebhookResult::Delivered | WebhookResult::GiveUp { .. }) => {}
            (WebhookCopy::Event, WebhookResult::RetryAt { at, error }) => {
                let row = OutboxRow {
                    account: &job.account,
                    url: &job.url,
                    payload: &job.payload,
                    attempts: job.attempts,
                    created_at: job.created_at,
                    due_at: *at,
                    last_error: Some(error),
                };
                insert_outbox_row(tx, &row)?;
            }
            (WebhookCopy::Event, WebhookResult::Unposted) => {
                enqueue_webhook(
                    tx,
                    &job.account,
                    &job.url,
                    &job.payload,
                    job.created_at,
                    now,
                    wake,
                )?;
            }
            (WebhookCopy::Event, WebhookResult::Deferred { at }) => {
                enqueue_webhook(
                    tx,
                    &job.account,
                    &job.url,
                    &job.payload,
                    job.created_at,
                    *at,
                    wake,
                )?;
            }
        }
    }
    if let Some(through) = settled_through {
        run(
            tx,
            "UPDATE webhook_journal SET settled_through = ?1 WHERE settled_through < ?1",
            [through],
        )?;
    }
    Ok(())
}

/// Whose message an event is about, and where its status changes are posted (if anywhere).
struct WebhookTarget {
    account: String,
    url: Option<String>,
    reference: Option<String>,
}

/// A message row that an `UPDATE ... RETURNING id, account, webhook_url, reference` changed.
struct Changed {
    id: String,
    target: WebhookTarget,
}

/// Moves one message to `status` (releasing any claim) and records the change.
fn set_status(
    tx: &Tx,
    id: &str,
    status: Status,
    detail: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let changed = one(
        tx,
        "UPDATE messages SET status = ?2, detail = ?3, locked_until = NULL, updated_at = ?4
         WHERE id = ?1
         RETURNING id, account, webhook_url, reference",
        params![id, status.as_str(), detail, now],
        changed_from_row,
    )?;
    add_events(
        tx,
        std::slice::from_ref(&changed),
        status,
        detail,
        now,
        wake,
    )
}

/// Records the same status change for every changed message row.
fn add_events(
    tx: &Tx,
    changed: &[Changed],
    status: Status,
    detail: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    for row in changed {
        add_event(
            tx,
            &row.id,
            status,
            Some(detail),
            None,
            now,
            &row.target,
            wake,
        )?;
    }
    Ok(())
}

/// The body of a `message.status` webhook.
#[derive(serde::Serialize)]
#[serde(tag = "type", rename = "message.status")]
struct StatusPayload<'a> {
    message_id: &'a str,
    reference: Option<&'a str>,
    status: Status,
    detail: Option<&'a str>,
    error_code: Option<&'a str>,
    #[serde(serialize_with = "as_rfc3339")]
    at: i64,
}

impl StatusPayload<'_> {
    fn to_json(&self) -> Result<String, StoreError> {
        serde_json::to_string(self)
            .map_err(|e| StoreError::Corrupt(format!("webhook payload: {e}")))
    }
}

fn as_rfc3339<S: serde::Serializer>(at: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*at))
}

/// Records a status change in the history and, when the message has a webhook, posts it: handed
/// to the sender with the event as its durable copy while the sender has room, else through
/// the outbox. `sending` is an internal step and is not posted.
#[allow(clippy::too_many_arguments)]
fn add_event(
    tx: &Tx,
    id: &str,
    status: Status,
    detail: Option<&str>,
    error_code: Option<&str>,
    now: i64,
    target: &WebhookTarget,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    crate::metrics::status_change(&target.account, status.as_str());
    let Some(url) = target.url.as_ref().filter(|_| status != Status::Sending) else {
        insert_event(tx, wake, id, now, status, detail, error_code, false)?;
        return Ok(());
    };
    let event = StatusPayload {
        message_id: id,
        reference: target.reference.as_deref(),
        status,
        detail,
        error_code,
        at: now,
    };
    let payload = event.to_json()?;
    if !wake.signals.handoff.reserve() {
        insert_event(tx, wake, id, now, status, detail, error_code, false)?;
        return enqueue_webhook(tx, &target.account, url, &payload, now, now, wake);
    }
    let event_id = insert_event(tx, wake, id, now, status, detail, error_code, true)
        .inspect_err(|_| wake.signals.handoff.give_back(1))?;
    wake.handed.push(WebhookJob {
        id: event_id,
        copy: WebhookCopy::Event,
        account: target.account.clone(),
        url: url.clone(),
        payload,
        attempts: 1,
        created_at: now,
    });
    Ok(())
}

/// Appends to a message's history; `hook`: the event is the durable copy of a handed webhook.
/// Returns the event's id.
#[allow(clippy::too_many_arguments)]
fn insert_event(
    tx: &Tx,
    wake: &Wake,
    message_id: &str,
    at: i64,
    status: Status,
    detail: Option<&str>,
    error_code: Option<&str>,
    hook: bool,
) -> Result<i64, StoreError> {
    let id = wake.event_ids.next();
    run(
        tx,
        "INSERT INTO events (id, message_id, at, status, detail, error_code, hook)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            message_id,
            at,
            status.as_str(),
            detail,
            error_code,
            hook.then_some(1)
        ],
    )?;
    Ok(id)
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

/// A webhook as the outbox holds it until it is posted.
struct OutboxRow<'a> {
    account: &'a str,
    url: &'a str,
    payload: &'a str,
    /// Posts tried so far.
    attempts: u32,
    created_at: i64,
    due_at: i64,
    last_error: Option<&'a str>,
}

fn insert_outbox_row(tx: &Tx, row: &OutboxRow<'_>) -> Result<(), StoreError> {
    run(
        tx,
        "INSERT INTO webhooks (account, url, payload, attempts, created_at, due_at, last_error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            row.account,
            row.url,
            row.payload,
            row.attempts,
            row.created_at,
            row.due_at,
            row.last_error
        ],
    )?;
    Ok(())
}

/// Writes a webhook not tried yet to the outbox, waiting from `due_at`, and wakes the sender.
fn enqueue_webhook(
    tx: &Tx,
    account: &str,
    url: &str,
    payload: &str,
    created_at: i64,
    due_at: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let row = OutboxRow {
        account,
        url,
        payload,
        attempts: 0,
        created_at,
        due_at,
        last_error: None,
    };
    insert_outbox_row(tx, &row)?;
    wake.webhooks = true;
    Ok(())
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
        insert_outbox_row(&tx, &row)?;
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

/// Reads the `account, webhook_url, reference` columns of a message row.
fn target_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WebhookTarget> {
    Ok(WebhookTarget {
        account: r.get("account")?,
        url: r.get("webhook_url")?,
        reference: r.get("reference")?,
    })
}

fn target_and_recipient(r: &rusqlite::Row<'_>) -> rusqlite::Result<(WebhookTarget, String)> {
    Ok((target_from_row(r)?, r.get("recipient")?))
}

fn changed_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Changed> {
    Ok(Changed {
        id: r.get("id")?,
        target: target_from_row(r)?,
    })
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

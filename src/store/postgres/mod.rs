//! PostgreSQL backend, for several smsgw instances sharing one database.
//!
//! PostgreSQL is built for many concurrent transactions and group-commits them itself, so
//! each instance runs `store.writers` writer tasks, each on a pooled connection: a writer
//! takes its share of the operations waiting in the shared channel, applies the rules of
//! `store::domain` to them in one transaction and answers each caller after the commit. If
//! the batch fails (a deadlock with a concurrent transaction, a duplicate idempotency key
//! committed meanwhile), each operation is retried alone, a few times if PostgreSQL says so,
//! so one bad operation cannot fail its neighbours. The statements are in `sql.rs`.
//!
//! What several instances need beyond that: claims take rows with `FOR UPDATE SKIP LOCKED`
//! and lease them to this instance (`claimed_by`, `locked_until`); a background task renews the
//! leases of the claims still in flight, so only a dead instance's claims return to the queue.
//! The policy generation lives in the database (`policy_clock`), so that an opt-out recorded
//! by one instance makes the others check again at send time. Receipts parked because their
//! submit_sm_resp was not yet stored are matched again by a periodic sweep, since the two may
//! be committed at the same time by two instances.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod link;
mod policy;
mod receipts;
mod sql;

pub use link::PgLinkOwnership;
pub use sql::FACTS_QUERY;

use super::domain::{self, Effects, Job, Reply};
use super::shared::{parse_encoding, parse_id, parse_status};
use super::writer::Message;
use super::*;
use crate::message::now_ms;
use sql::PgTx;

/// Connections for the reads (API lookups, exports, lease renewal, link ownership), beside
/// one per writer (`store.writers`).
const READERS: u32 = 8;
/// How often the leases of the claims in flight are renewed, as a share of the lease.
const RENEWALS_PER_LEASE: i64 = 3;
/// How often one operation is tried alone when PostgreSQL reports a conflict between
/// concurrent transactions (deadlock, serialization failure, unique key taken meanwhile).
const CONFLICT_TRIES: usize = 3;

pub struct PostgresStore {
    writer: Writer,
    readers: PgPool,
    rules: Arc<StoreRules>,
    signals: Arc<Signals>,
    leases: Arc<Leases>,
    stop: CancellationToken,
    /// Writer tasks (`store.writers`).
    writers: usize,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The claims this instance holds and has not settled: their leases are renewed.
#[derive(Debug, Default)]
struct Leases {
    /// Names this process's claims in `messages.claimed_by`.
    instance: String,
    /// The lease asked for by the latest claim (ms).
    lease_ms: AtomicI64,
    in_flight: std::sync::Mutex<HashSet<String>>,
}

impl Leases {
    fn hold(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut set) = self.in_flight.lock() {
            set.extend(ids);
        }
    }

    fn settle<'a>(&self, ids: impl IntoIterator<Item = &'a MessageId>) {
        if let Ok(mut set) = self.in_flight.lock() {
            for id in ids {
                set.remove(&id.to_string());
            }
        }
    }

    fn held(&self) -> Vec<String> {
        self.in_flight
            .lock()
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://...`) and runs the embedded migrations
    /// (several instances starting at once take turns: sqlx holds an advisory lock meanwhile).
    pub async fn open(
        url: &str,
        max_batch: usize,
        writers: usize,
        rules: StoreRules,
    ) -> Result<PostgresStore, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let readers = PgPoolOptions::new()
            .max_connections(READERS + writers as u32)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("src/store/migrations/postgres")
            .run(&readers)
            .await?;
        let signals = Arc::new(Signals::default());
        let (writer, rx) = Writer::new(max_batch * 4);
        let stop = CancellationToken::new();
        let rules = Arc::new(rules);
        let leases = Arc::new(Leases {
            instance: uuid::Uuid::now_v7().to_string(),
            ..Leases::default()
        });
        let jobs = Arc::new(Mutex::new(rx));
        let instance: Arc<str> = Arc::from(leases.instance.as_str());
        let mut tasks: Vec<JoinHandle<()>> = (0..writers)
            .map(|_| {
                tokio::spawn(run_writer(
                    readers.clone(),
                    jobs.clone(),
                    Share { max_batch, writers },
                    signals.clone(),
                    rules.clone(),
                    instance.clone(),
                ))
            })
            .collect();
        tasks.push(tokio::spawn(renew_leases(
            readers.clone(),
            leases.clone(),
            stop.clone(),
        )));
        Ok(PostgresStore {
            writer,
            readers,
            rules,
            signals,
            leases,
            stop,
            writers,
            tasks: Mutex::new(tasks),
        })
    }

    /// Links (binds) owned by one instance at a time, through this database.
    pub fn link_ownership(&self) -> PgLinkOwnership {
        PgLinkOwnership::new(self.readers.clone())
    }

    async fn events_of(&self, id: MessageId) -> Result<Vec<EventView>, StoreError> {
        let events =
            sqlx::query("SELECT at, status, detail FROM events WHERE message_id = $1 ORDER BY id")
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
impl Store for PostgresStore {
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
        let rows = sqlx::query("SELECT * FROM messages WHERE status = $1 ORDER BY due_at LIMIT $2")
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
        let rows = sqlx::query("SELECT * FROM messages WHERE account = $1 AND recipient = $2")
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
             WHERE account = $1 AND key = $2",
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
        let row = sqlx::query("SELECT * FROM messages WHERE id = $1 AND account = $2")
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
             WHERE account = $1
               AND ($2 IS NULL OR status = $2)
               AND ($3 IS NULL OR recipient = $3)
               AND id >= COALESCE($4, '')
               AND id < COALESCE($5, '~')
             ORDER BY id DESC LIMIT $6",
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

    async fn claim_due(&self, limit: usize, lease_until: i64) -> Result<Vec<Claimed>, StoreError> {
        let lease_ms = (lease_until - now_ms()).max(0);
        self.leases.lease_ms.store(lease_ms, Ordering::SeqCst);
        match self.writer.call(Op::Claim { limit, lease_until }).await? {
            Reply::Claimed(claimed) => {
                self.leases.hold(claimed.iter().map(|c| c.id.to_string()));
                Ok(claimed)
            }
            other => Err(other.unexpected()),
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
        // Settled or not, the claims are no longer renewed: if the result could not be
        // stored, the lease ends and the message returns to the queue.
        let ids: Vec<MessageId> = results.iter().map(|r| r.id).collect();
        let recorded = self.writer.call(Op::Attempts(results)).await.map(|_| ());
        self.leases.settle(&ids);
        recorded
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
        Ok((
            row.try_get("queued")?,
            self.next_due().await?,
            row.try_get("webhooks")?,
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        if self.writer.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    async fn close(&self) {
        // Behind every job already sent: those are still committed.
        self.writer.stop(self.writers).await;
        self.stop.cancel();
        for handle in self.tasks.lock().await.drain(..) {
            let _ = handle.await;
        }
        self.readers.close().await;
    }
}

/// How a writer sizes its batch: its share of the operations waiting, at most `max_batch`.
#[derive(Debug, Clone, Copy)]
struct Share {
    max_batch: usize,
    writers: usize,
}

impl Share {
    /// A writer takes an even share of what waits, so that a burst spreads over the writers
    /// instead of one writer taking it all while the others idle; when every writer is busy
    /// the queue grows and the shares with it (more group commit per transaction).
    fn of(&self, waiting: usize) -> usize {
        waiting.div_ceil(self.writers).clamp(1, self.max_batch)
    }
}

/// One of the writers: takes its share of the jobs waiting and applies them in one
/// transaction, while the other writers do the same on their own connections; PostgreSQL
/// group-commits the concurrent transactions. Stops at a [`Message::Stop`], behind the jobs
/// sent before it.
async fn run_writer(
    pool: PgPool,
    jobs: Arc<Mutex<mpsc::Receiver<Message>>>,
    share: Share,
    signals: Arc<Signals>,
    rules: Arc<StoreRules>,
    instance: Arc<str>,
) {
    let mut batch = Vec::with_capacity(share.max_batch.min(64));
    loop {
        let stop = {
            let mut jobs = jobs.lock().await;
            let mut stop = match jobs.recv().await {
                Some(Message::Job(job)) => {
                    batch.push(job);
                    false
                }
                Some(Message::Stop) | None => true,
            };
            let take = share.of(jobs.len() + 1);
            while !stop && batch.len() < take {
                match jobs.try_recv() {
                    Ok(Message::Job(job)) => batch.push(job),
                    Ok(Message::Stop) => stop = true,
                    Err(_) => break,
                }
            }
            stop
        };
        if !batch.is_empty() {
            apply_jobs(&pool, &rules, &instance, &signals, &mut batch).await;
        }
        if stop {
            return;
        }
    }
}

/// Applies a batch in one transaction and answers each job; if it fails, each job alone.
async fn apply_jobs(
    pool: &PgPool,
    rules: &StoreRules,
    instance: &str,
    signals: &Signals,
    batch: &mut Vec<Job>,
) {
    match apply_batch(pool, rules, instance, signals, batch).await {
        Ok(replies) => {
            for (job, reply) in batch.drain(..).zip(replies) {
                let _ = job.reply.send(Ok(reply));
            }
        }
        Err(error) => {
            if batch.len() > 1 {
                tracing::debug!(%error, jobs = batch.len(), "group commit failed; applying one by one");
            }
            for job in batch.drain(..) {
                let result = apply_alone(pool, rules, instance, signals, &job).await;
                let _ = job.reply.send(result);
            }
        }
    }
}

/// One operation in its own transaction, tried again while PostgreSQL reports a conflict with
/// another transaction that a new try may not meet.
async fn apply_alone(
    pool: &PgPool,
    rules: &StoreRules,
    instance: &str,
    signals: &Signals,
    job: &Job,
) -> Result<Reply, StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let single = std::slice::from_ref(job);
        match apply_batch(pool, rules, instance, signals, single).await {
            Ok(mut replies) => return Ok(replies.pop().unwrap_or(Reply::Done)),
            Err(error) if tries < CONFLICT_TRIES && is_conflict(&error) => {
                tracing::debug!(%error, "conflict with a concurrent transaction; trying again");
            }
            Err(error) => return Err(error),
        }
    }
}

/// Deadlock, serialization failure, or a unique key that a concurrent transaction committed
/// (an idempotency key: the next try reads the first answer).
fn is_conflict(error: &StoreError) -> bool {
    let StoreError::Database(sqlx::Error::Database(e)) = error else {
        return false;
    };
    matches!(e.code().as_deref(), Some("40P01" | "40001" | "23505"))
}

/// The rules of `store::domain` for every job of the batch, in one transaction; what they set
/// in motion happens once it has committed.
async fn apply_batch(
    pool: &PgPool,
    rules: &StoreRules,
    instance: &str,
    signals: &Signals,
    batch: &[Job],
) -> Result<Vec<Reply>, StoreError> {
    let mut effects = Effects::default();
    let result = async {
        let mut tx = PgTx::begin(pool, rules, instance).await?;
        let now = now_ms();
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            replies.push(domain::apply(&mut tx, &job.op, now, &mut effects).await?);
        }
        tx.commit().await?;
        Ok(replies)
    }
    .await;
    match &result {
        Ok(_) => effects.committed(signals),
        Err(_) => effects.rolled_back(signals),
    }
    result
}

/// Renews, while this instance runs, the leases of the claims it has not settled, so that
/// another instance takes them only once this one is gone (the lease then ends).
async fn renew_leases(pool: PgPool, leases: Arc<Leases>, stop: CancellationToken) {
    loop {
        let lease = leases.lease_ms.load(Ordering::SeqCst);
        let every = Duration::from_millis((lease / RENEWALS_PER_LEASE).max(1000) as u64);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let held = leases.held();
        if held.is_empty() || lease == 0 {
            continue;
        }
        // A row a writer's transaction holds right now (its result or a receipt being
        // stored) is skipped, not waited for: waiting on rows that many concurrent
        // transactions lock in other orders deadlocked the renewal, and the leases ended under
        // messages still being sent. A skipped row is renewed at the next round, within the
        // lease.
        let renewed = sqlx::query(
            "UPDATE messages SET locked_until = $1
             WHERE id IN (SELECT id FROM messages
                          WHERE id = ANY($2) AND status = 'sending' AND claimed_by = $3
                          FOR UPDATE SKIP LOCKED)",
        )
        .bind(now_ms() + lease)
        .bind(&held)
        .bind(&leases.instance)
        .execute(&pool)
        .await;
        if let Err(error) = renewed {
            tracing::warn!(%error, claims = held.len(), "renewing the leases of claims in flight failed");
        }
    }
}

fn view_from_row(row: &PgRow) -> Result<MessageView, StoreError> {
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

fn idempotent_from_row(row: &PgRow) -> Result<IdempotentAnswer, StoreError> {
    Ok(IdempotentAnswer {
        key: row.try_get("key")?,
        request_hash: row.try_get("request_hash")?,
        status_code: row.try_get::<i64, _>("status_code")? as u16,
        answer: row.try_get("answer")?,
    })
}

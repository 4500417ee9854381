//! PostgreSQL backend, for several smsgw instances sharing one database.
//!
//! The shape is the SQLite backend's: one writer task per instance takes every operation
//! waiting in its channel (up to `max_batch`), applies them in one transaction and answers each
//! caller after the commit, so many concurrent HTTP requests cost one commit. If the batch
//! fails (a deadlock with another instance's batch, a duplicate idempotency key committed by
//! another instance), each operation is retried alone, a few times if PostgreSQL says so, so
//! one bad operation cannot fail its neighbours.
//!
//! What several instances need beyond that: claims take rows with `FOR UPDATE SKIP LOCKED`
//! and lease them to this instance (`claimed_by`, `locked_until`); a background task renews the
//! leases of the claims still in flight, so only a dead instance's claims return to the queue.
//! The policy generation lives in the database (`policy_clock`), so that an opt-out recorded
//! by one instance makes the others check again at send time. Receipts parked because their
//! submit_sm_resp was not yet stored are matched again by a periodic sweep, since the two may
//! be committed at the same time by two instances.

use crate::store::shared::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod link;
mod policy;
mod receipts;

pub use link::PgLinkOwnership;

use super::*;
use crate::message::{now_ms, rfc3339};
use crate::receipt::{ReceiptState, normalize_id};

/// A backstop: parked receipts older than this are dropped unseen. Each carrier's sweeper
/// gives them up (and lists them) after its `unmatched_after`, at most 24 h, so an hour later.
const EARLY_RECEIPT_TTL_MS: i64 = 25 * 3600 * 1000;
/// How often the leases of the claims in flight are renewed, as a share of the lease.
const RENEWALS_PER_LEASE: i64 = 3;
/// How often one operation is tried alone when PostgreSQL reports a conflict between
/// concurrent transactions (deadlock, serialization failure, unique key taken meanwhile).
const CONFLICT_TRIES: usize = 3;

pub struct PostgresStore {
    jobs: mpsc::Sender<Job>,
    readers: PgPool,
    rules: Arc<StoreRules>,
    signals: Arc<Signals>,
    leases: Arc<Leases>,
    stop: CancellationToken,
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

/// What the operations of a batch share: the rules they apply, the policy generation, and what
/// the batch should wake once committed.
struct Wake {
    rules: Arc<StoreRules>,
    instance: String,
    /// The policy generation as read at the start of the batch, plus the batch's own changes.
    generation: i64,
    /// Changes of the policy's facts in this batch, added to the shared count before commit.
    bumps: i64,
    /// The earliest future effective time of a number change recorded in this batch.
    next_effective: Option<i64>,
    queue: bool,
    webhooks: bool,
}

impl Wake {
    fn new(rules: &Arc<StoreRules>, instance: &str) -> Wake {
        Wake {
            rules: rules.clone(),
            instance: instance.to_owned(),
            generation: 0,
            bumps: 0,
            next_effective: None,
            queue: false,
            webhooks: false,
        }
    }

    /// A fact of the policy changed: messages decided before are checked again at send time.
    fn bump(&mut self) {
        self.generation += 1;
        self.bumps += 1;
    }

    fn expect_change_at(&mut self, effective_at: i64) {
        self.next_effective = Some(
            self.next_effective
                .map_or(effective_at, |t| t.min(effective_at)),
        );
    }

    /// Reads the shared generation; done first in every batch, before any fact is read, so
    /// that a change committed by another instance meanwhile leaves the messages of this batch
    /// with an older generation than the shared one (and checked again at send time).
    async fn read_generation(&mut self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        let generation: i64 = sqlx::query_scalar("SELECT generation FROM policy_clock")
            .fetch_one(&mut **tx)
            .await?;
        self.generation = generation + self.bumps;
        Ok(())
    }

    /// Writes the batch's changes of the policy into the shared clock (before the commit).
    async fn write_generation(&self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        if self.bumps > 0 {
            sqlx::query("UPDATE policy_clock SET generation = generation + $1")
                .bind(self.bumps)
                .execute(&mut **tx)
                .await?;
        }
        if let Some(at) = self.next_effective {
            sqlx::query("UPDATE policy_clock SET next_effective = LEAST(next_effective, $1)")
                .bind(at)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// A dated number change has taken effect: the facts changed by themselves.
    async fn tick(&mut self, tx: &mut Tx<'_>, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE policy_clock SET generation = generation + 1,
                 next_effective = COALESCE((SELECT MIN(effective_at) FROM number_changes
                                            WHERE effective_at > $1), 9223372036854775807)
             WHERE next_effective <= $1",
        )
        .bind(now)
        .execute(&mut **tx)
        .await?;
        self.read_generation(tx).await
    }
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://...`) and runs the embedded migrations
    /// (several instances starting at once take turns: sqlx holds an advisory lock meanwhile).
    pub async fn open(
        url: &str,
        max_batch: usize,
        rules: StoreRules,
    ) -> Result<PostgresStore, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let readers = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("src/store/migrations/postgres")
            .run(&readers)
            .await?;
        let signals = Arc::new(Signals::default());
        let (jobs, rx) = mpsc::channel(max_batch * 4);
        let stop = CancellationToken::new();
        let rules = Arc::new(rules);
        let leases = Arc::new(Leases {
            instance: uuid::Uuid::now_v7().to_string(),
            ..Leases::default()
        });
        let writer = tokio::spawn(run_writer(
            readers.clone(),
            rx,
            max_batch,
            signals.clone(),
            rules.clone(),
            leases.instance.clone(),
            stop.clone(),
        ));
        let renewer = tokio::spawn(renew_leases(readers.clone(), leases.clone(), stop.clone()));
        Ok(PostgresStore {
            jobs,
            readers,
            rules,
            signals,
            leases,
            stop,
            tasks: Mutex::new(vec![writer, renewer]),
        })
    }

    /// Links (binds) owned by one instance at a time, through this database.
    pub fn link_ownership(&self) -> PgLinkOwnership {
        PgLinkOwnership::new(self.readers.clone())
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
impl Store for PostgresStore {
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
        let rows = sqlx::query("SELECT * FROM messages WHERE status = $1 ORDER BY due_at LIMIT $2")
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
        let lease_ms = (lease_until - now_ms()).max(0);
        self.leases.lease_ms.store(lease_ms, Ordering::SeqCst);
        match self.call(Op::Claim { limit, lease_until }).await? {
            Reply::Claimed(claimed) => {
                self.leases.hold(claimed.iter().map(|c| c.id.to_string()));
                Ok(claimed)
            }
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
        // Settled or not, the claims are no longer renewed: if the result could not be
        // stored, the lease ends and the message returns to the queue.
        let ids: Vec<MessageId> = results.iter().map(|r| r.id).collect();
        let recorded = self.call(Op::Attempts(results)).await.map(|_| ());
        self.leases.settle(&ids);
        recorded
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
        // Every job here was claimed from the outbox: this store hands nothing over.
        let results = results.into_iter().map(|(job, r)| (job.id, r)).collect();
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
        if self.jobs.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    async fn close(&self) {
        self.stop.cancel();
        for handle in self.tasks.lock().await.drain(..) {
            let _ = handle.await;
        }
        self.readers.close().await;
    }
}

async fn run_writer(
    pool: PgPool,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    signals: Arc<Signals>,
    rules: Arc<StoreRules>,
    instance: String,
    stop: CancellationToken,
) {
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
        let mut wake = Wake::new(&rules, &instance);
        match apply_batch(&pool, &batch, &mut wake).await {
            Ok(replies) => {
                for (job, reply) in batch.drain(..).zip(replies) {
                    let _ = job.reply.send(Ok(reply));
                }
            }
            Err(error) => {
                if batch.len() > 1 {
                    tracing::warn!(%error, jobs = batch.len(), "group commit failed; applying one by one");
                }
                wake = Wake::new(&rules, &instance);
                for job in batch.drain(..) {
                    let result = apply_alone(&pool, &job, &mut wake).await;
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

/// One operation in its own transaction, tried again while PostgreSQL reports a conflict with
/// another transaction that a new try may not meet.
async fn apply_alone(pool: &PgPool, job: &Job, wake: &mut Wake) -> Result<Reply, StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        wake.bumps = 0;
        wake.next_effective = None;
        let single = std::slice::from_ref(job);
        match apply_batch(pool, single, wake).await {
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

async fn apply_batch(
    pool: &PgPool,
    batch: &[Job],
    wake: &mut Wake,
) -> Result<Vec<Reply>, StoreError> {
    let mut tx = pool.begin().await?;
    wake.read_generation(&mut tx).await?;
    let now = now_ms();
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        replies.push(apply(&mut tx, &job.op, now, wake).await?);
    }
    wake.write_generation(&mut tx).await?;
    tx.commit().await?;
    Ok(replies)
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
        let renewed = sqlx::query(
            "UPDATE messages SET locked_until = $1
             WHERE id = ANY($2) AND status = 'sending' AND claimed_by = $3",
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
        Op::ClearSuspect { number, account } => {
            Reply::Count(policy::clear_suspect(tx, number, account.as_deref(), now, wake).await?)
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
             WHERE account = $1 AND key = $2",
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
             VALUES ($1, $2, $3, $4, $5, $6)",
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
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15, $16, $17,
                 $18, $19)",
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
    .bind(wake.generation)
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
        "UPDATE messages SET status = 'queued', detail = $2, due_at = $3, expires_at = $4,
             updated_at = $3
         WHERE id = $1 AND status IN ('failed', 'expired', 'unknown', 'undelivered')
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
    sqlx::query("DELETE FROM parts WHERE message_id = $1")
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
             updated_at = $3
         WHERE id = $1 AND ($2 IS NULL OR account = $2)
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
        "SELECT status FROM messages WHERE id = $1 AND ($2 IS NULL OR account = $2)",
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
    wake.tick(tx, now).await?;
    // Rows another instance is claiming (or a receipt is updating) are skipped, not waited for.
    let rows = sqlx::query(
        "UPDATE messages SET status = 'sending', locked_until = $1, claimed_by = $4,
             attempts = attempts + 1, updated_at = $2
         WHERE id IN (SELECT id FROM messages
                      WHERE status IN ('queued', 'scheduled') AND due_at <= $2
                      ORDER BY priority DESC, due_at LIMIT $3
                      FOR UPDATE SKIP LOCKED)
         RETURNING id, account, recipient, sender, body, encoding, segments, attempts, expires_at,
                   category, priority, consent_at, service_messages, webhook_url, reference,
                   policy_gen",
    )
    .bind(lease_until)
    .bind(now)
    .bind(limit as i64)
    .bind(&wake.instance)
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
        let stale = decided_in < wake.generation || retried;
        if stale && let Some((status, detail)) = policy::recheck(tx, &row, now, wake).await? {
            set_status(tx, &id, status, &detail, now, wake).await?;
            continue;
        }
        let attempt = row.try_get::<i64, _>("attempts")? as u32;
        let accepted_parts = if attempt > 1 {
            sqlx::query_scalar::<_, i64>("SELECT part FROM parts WHERE message_id = $1")
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
        let (ids, details): (Vec<String>, Vec<String>) = sending.into_iter().unzip();
        sqlx::query(
            "INSERT INTO events (message_id, at, status, detail)
             SELECT id, $2, 'sending', detail FROM UNNEST($1::text[], $3::text[]) AS e (id, detail)",
        )
        .bind(ids)
        .bind(now)
        .bind(details)
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
             VALUES ($1, $2, $3, $4, 'submitted', $5, $6)
             ON CONFLICT (message_id, part) DO UPDATE SET carrier = $3,
                 carrier_message_id = $4, state = 'submitted', updated_at = $5,
                 submitted_id = $6, queried_at = NULL",
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
        "UPDATE messages SET status = $2, detail = $3, error_code = COALESCE($4, error_code),
             carrier = COALESCE($5, carrier), due_at = COALESCE($6, due_at),
             locked_until = NULL, updated_at = $7
         WHERE id = $1 AND status = 'sending' AND claimed_by = $8
         RETURNING account, webhook_url, reference, recipient",
    )
    .bind(&id)
    .bind(status.as_str())
    .bind(detail)
    .bind(error_code)
    .bind(result.carrier.as_deref())
    .bind(due_at)
    .bind(now)
    .bind(&wake.instance)
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
    for part in &result.accepted {
        let key = normalize_id(&part.carrier_message_id);
        let early = sqlx::query(
            "DELETE FROM early_receipts WHERE carrier = $1 AND carrier_message_id = $2
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
        "SELECT message_id, part, state, updated_at FROM parts
         WHERE carrier = $1 AND carrier_message_id = $2
         ORDER BY updated_at DESC LIMIT 1",
    )
    .bind(carrier)
    .bind(&key)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(part) = part else {
        sqlx::query(
            "INSERT INTO early_receipts (carrier, carrier_message_id, state, error_code, received_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(carrier)
        .bind(&key)
        .bind(receipt.state.as_str())
        .bind(&receipt.error_code)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM early_receipts WHERE received_at < $1")
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
        sqlx::query(
            "UPDATE parts SET state = $3, updated_at = $4 WHERE message_id = $1 AND part = $2",
        )
        .bind(&id)
        .bind(part_no)
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
            "UPDATE messages SET status = $2, detail = $3,
                 error_code = COALESCE($4, error_code), updated_at = $5
             WHERE id = $1 AND segments = 1
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
             (SELECT COUNT(*) FROM parts WHERE message_id = $1) AS parts,
             (SELECT COUNT(*) FROM parts WHERE message_id = $1 AND state = 'delivered')
                 AS delivered
         FROM messages WHERE id = $1",
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
                "UPDATE messages SET status = $2, detail = $3,
                     error_code = COALESCE($4, error_code), updated_at = $5
                 WHERE id = $1",
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
                "INSERT INTO events (message_id, at, status, detail) VALUES ($1, $2, $3, $4)",
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
        _ if status == Status::Delivered => policy::reset_failures(tx, recipient).await,
        Some(code) if wake.rules.is_suspect_code(code) => {
            policy::count_failure(tx, recipient, code, now, wake).await
        }
        _ => Ok(()),
    }
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
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
        "UPDATE messages SET status = 'queued', detail = $2, locked_until = NULL,
             claimed_by = NULL, due_at = $1, updated_at = $1
         WHERE status = 'sending' AND (locked_until < $1 OR ($3 AND claimed_by = $4))
         RETURNING id, account, reference, NULL AS webhook_url",
    )
    .bind(now)
    .bind(detail)
    .bind(all)
    .bind(&wake.instance)
    .fetch_all(&mut **tx)
    .await?;
    add_events(tx, &rows, Status::Queued, detail, now, wake).await?;
    if !rows.is_empty() {
        wake.queue = true;
    }
    Ok(rows.len() as u64)
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
        "SELECT id, recipient FROM messages WHERE id < $1 AND body IS NOT NULL
           AND status NOT IN ('queued', 'scheduled', 'sending', 'held_suspect')
         LIMIT $2",
    )
    .bind(id_before(cutoffs.bodies_before))
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    for row in &done {
        let recipient: String = row.try_get("recipient")?;
        sqlx::query("UPDATE messages SET body = NULL, detail = NULL, recipient = $2 WHERE id = $1")
            .bind(row.try_get::<String, _>("id")?)
            .bind(anonymous(rules, &recipient))
            .execute(&mut **tx)
            .await?;
    }
    let message_bodies = done.len() as u64;
    let inbound =
        sqlx::query("SELECT id, sender FROM inbound WHERE id < $1 AND body IS NOT NULL LIMIT $2")
            .bind(id_before(cutoffs.bodies_before))
            .bind(limit)
            .fetch_all(&mut **tx)
            .await?;
    for row in &inbound {
        let sender: String = row.try_get("sender")?;
        sqlx::query("UPDATE inbound SET body = NULL, sender = $2 WHERE id = $1")
            .bind(row.try_get::<String, _>("id")?)
            .bind(anonymous(rules, &sender))
            .execute(&mut **tx)
            .await?;
    }
    let inbound_bodies = inbound.len() as u64;
    let webhooks = sqlx::query(
        "DELETE FROM webhooks WHERE id IN (SELECT id FROM webhooks WHERE created_at < $1 LIMIT $2)",
    )
    .bind(cutoffs.bodies_before)
    .bind(limit)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let events = sqlx::query(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE message_id < $1 LIMIT $2)",
    )
    .bind(id_before(cutoffs.events_before))
    .bind(limit)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let canceled =
        sqlx::query("SELECT id FROM messages WHERE id < $1 AND status = 'canceled' LIMIT $2")
            .bind(id_before(cutoffs.canceled_before))
            .bind(limit)
            .fetch_all(&mut **tx)
            .await?;
    for row in &canceled {
        let id: String = row.try_get("id")?;
        for statement in [
            "DELETE FROM events WHERE message_id = $1",
            "DELETE FROM messages WHERE id = $1",
        ] {
            sqlx::query(statement).bind(&id).execute(&mut **tx).await?;
        }
    }
    let idempotency_keys = sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
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
        "UPDATE messages SET status = 'expired', detail = $2, updated_at = $1
         WHERE status IN ('queued', 'scheduled') AND expires_at <= $1
         RETURNING id, account, webhook_url, reference",
    )
    .bind(now)
    .bind(detail)
    .fetch_all(&mut **tx)
    .await?;
    add_events(tx, &rows, Status::Expired, detail, now, wake).await?;
    adopt_early_receipts(tx, now, wake).await?;
    Ok(rows.len() as u64)
}

/// Applies parked receipts whose part is now known. A receipt parks when its part is not
/// stored yet; the instance storing the part then applies it, unless the two transactions
/// ran at the same time on two instances and neither saw the other's row: this sweep (every
/// second, with the expiry sweep) catches those.
async fn adopt_early_receipts(
    tx: &mut Tx<'_>,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let parked = sqlx::query(
        "DELETE FROM early_receipts e USING parts p
         WHERE p.carrier = e.carrier AND p.carrier_message_id = e.carrier_message_id
         RETURNING e.carrier, e.carrier_message_id, e.state, e.error_code",
    )
    .fetch_all(&mut **tx)
    .await?;
    for row in parked {
        let carrier: String = row.try_get("carrier")?;
        let receipt = Receipt {
            carrier_message_id: row.try_get("carrier_message_id")?,
            state: parse_receipt_state(&row.try_get::<String, _>("state")?)?,
            error_code: row.try_get("error_code")?,
        };
        apply_receipt(tx, &carrier, &receipt, now, wake).await?;
    }
    Ok(())
}

async fn claim_webhooks(
    tx: &mut Tx<'_>,
    limit: usize,
    lease_until: i64,
    now: i64,
) -> Result<Vec<WebhookJob>, StoreError> {
    let rows = sqlx::query(
        "UPDATE webhooks SET locked_until = $1, attempts = attempts + 1
         WHERE id IN (SELECT id FROM webhooks
                      WHERE due_at <= $2 AND (locked_until IS NULL OR locked_until < $2)
                      ORDER BY due_at LIMIT $3
                      FOR UPDATE SKIP LOCKED)
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
                copy: WebhookCopy::Outbox,
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
                    "UPDATE webhooks SET due_at = $2, locked_until = NULL, last_error = $3
                     WHERE id = $1",
                )
                .bind(id)
                .bind(at)
                .bind(error)
                .execute(&mut **tx)
                .await?;
            }
            WebhookResult::Unposted => {
                sqlx::query(
                    "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1
                     WHERE id = $1",
                )
                .bind(id)
                .execute(&mut **tx)
                .await?;
            }
            WebhookResult::Deferred { at } => {
                sqlx::query(
                    "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1, due_at = $2
                     WHERE id = $1",
                )
                .bind(id)
                .bind(at)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    if !gone.is_empty() {
        sqlx::query("DELETE FROM webhooks WHERE id = ANY($1)")
            .bind(gone)
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
        "UPDATE messages SET status = $2, detail = $3, locked_until = NULL, updated_at = $4
         WHERE id = $1
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
    rows: &[PgRow],
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
    sqlx::query("INSERT INTO events (message_id, at, status, detail) VALUES ($1, $2, $3, $4)")
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
        "INSERT INTO webhooks (account, url, payload, created_at, due_at) VALUES ($1, $2, $3, $4, $4)",
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

fn target_from_row(row: &PgRow) -> Result<Option<WebhookTarget>, StoreError> {
    Ok(Some(WebhookTarget {
        account: row.try_get("account")?,
        url: row.try_get("webhook_url")?,
        reference: row.try_get("reference")?,
    }))
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

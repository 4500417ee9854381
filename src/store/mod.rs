//! The durable queue and history: the only module that speaks SQL.
//!
//! [`Store`] is the seam between the gateway and its database. SQLite ([`sqlite::SqliteStore`])
//! is the embedded default; PostgreSQL ([`postgres::PostgresStore`]) lets several instances
//! share one queue. Every method that returns `Ok` has committed what it was given: callers answer their
//! own callers (HTTP 202, deliver_sm_resp) only after that.

mod domain;
mod handoff;
pub mod postgres;
mod shared;
pub mod sqlite;
mod writer;

pub use handoff::Handoff;
pub use writer::Writer;

use domain::{Op, Reply};

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::encoding::Encoding;
use crate::message::{Category, MessageId, Status};
use crate::receipt::{InboundSms, Receipt};

/// The store the configuration names, and (PostgreSQL) how the binds are shared with the
/// other instances.
pub struct Opened {
    pub store: Arc<dyn Store>,
    /// None: this instance runs every bind (SQLite: one instance per file).
    pub links: Option<Arc<dyn crate::smpp::ownership::LinkOwnership>>,
}

/// Opens `store.url` (PostgreSQL) if given, else the SQLite file `store.path`.
pub async fn open(
    config: &crate::config::StoreConfig,
    rules: StoreRules,
) -> Result<Opened, StoreError> {
    match &config.url {
        Some(url) => {
            let store =
                postgres::PostgresStore::open(url, config.max_batch, config.writers, rules).await?;
            let links = Arc::new(store.link_ownership());
            Ok(Opened {
                store: Arc::new(store),
                links: Some(links),
            })
        }
        None => Ok(Opened {
            store: Arc::new(
                sqlite::SqliteStore::open(&config.path, config.max_batch, rules).await?,
            ),
            links: None,
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed (full disk, corruption, I/O): nothing was committed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The same, from the SQLite writer's own connection (rusqlite).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The disk is full: nothing was committed.
    #[error("the disk is full")]
    DiskFull,
    /// The writer task has stopped (shutdown, or a fatal error logged before).
    #[error("the store is shut down")]
    Closed,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A message the API has validated and that passed policy, ready to be stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: MessageId,
    pub account: String,
    pub reference: Option<String>,
    /// E.164.
    pub recipient: String,
    pub sender: String,
    pub body: String,
    pub category: Category,
    pub encoding: Encoding,
    pub segments: u32,
    pub priority: i32,
    pub webhook_url: Option<String>,
    pub consent_at: Option<i64>,
    /// `Queued`, `Scheduled`, or a refusal (stored so it can be looked up and reported).
    pub status: Status,
    pub detail: Option<String>,
    pub created_at: i64,
    pub due_at: i64,
    pub expires_at: i64,
}

/// The first answer to a request that carried an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentAnswer {
    pub key: String,
    /// Hash of the request body: the same key with another body is an error, not a replay.
    pub request_hash: String,
    pub status_code: u16,
    pub answer: String,
}

/// What the policy needs to know of the submitting account.
#[derive(Debug, Clone, Default)]
pub struct AccountPolicy {
    /// Service (transactional) messages may go to opted-out numbers.
    pub service_messages: bool,
    /// Messages to a `changed` number go to its new number.
    pub follow_number_changes: bool,
}

/// Renders the API's answer from the messages as stored (after policy), so that the answer to
/// an idempotent request is stored in the same transaction as the messages.
pub type RenderAnswer = Arc<dyn Fn(&[NewMessage]) -> (u16, String) + Send + Sync>;

/// The `Idempotency-Key` of a request and the hash of its body.
#[derive(Debug, Clone)]
pub struct IdempotencyRequest {
    pub key: String,
    pub request_hash: String,
}

#[derive(Debug)]
pub enum SubmitResult {
    /// Stored as the API will show them (policy may have refused, held or redirected some).
    Stored { status_code: u16, answer: String },
    /// The key was used before: nothing was stored, here is the first answer.
    Replay(IdempotentAnswer),
}

/// One opt-out entry of an account; `sender` None covers every sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptOut {
    /// E.164; None once the subject was erased (the suppression stays, pseudonymised).
    pub number: Option<String>,
    pub number_key: String,
    pub sender: Option<String>,
    pub source: String,
    pub created_at: i64,
}

impl OptOut {
    /// The paging cursor that lists the entries after this one.
    pub fn cursor(&self) -> String {
        format!(
            "{}:{}",
            self.number_key,
            self.sender.as_deref().unwrap_or("")
        )
    }
}

/// Who asked for an opt-out change, for the journal.
#[derive(Debug, Clone)]
pub struct OptOutSource {
    /// inbound, api, cli, import.
    pub source: &'static str,
    pub actor: Option<String>,
}

/// A reported number change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberChange {
    /// None: applies to every account (operator and imports).
    pub account: Option<String>,
    pub number: String,
    pub kind: crate::policy::number_change::ChangeKind,
    pub effective_at: i64,
    pub source: String,
}

#[derive(Debug, Clone, Default)]
pub struct NumberHistory {
    pub changes: Vec<(NumberChange, i64)>,
    pub failures: u32,
    pub suspect: bool,
}

/// What the retention purge removes: everything older than these times (ms).
#[derive(Debug, Clone, Copy)]
pub struct Cutoffs {
    pub bodies_before: i64,
    pub events_before: i64,
    pub canceled_before: i64,
    pub idempotency_before: i64,
}

/// What a purge removed (or, dry, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Purge {
    pub message_bodies: u64,
    pub inbound_bodies: u64,
    pub webhooks: u64,
    pub events: u64,
    pub canceled_messages: u64,
    pub idempotency_keys: u64,
}

impl Purge {
    /// Whether anything was removed (or, dry, would be).
    pub fn removed_any(&self) -> bool {
        self.message_bodies
            + self.inbound_bodies
            + self.webhooks
            + self.events
            + self.canceled_messages
            + self.idempotency_keys
            > 0
    }
}

/// What an erasure removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erasure {
    pub messages: u64,
    pub inbound: u64,
    /// Kept: they protect the person who holds the number now.
    pub number_changes_kept: u64,
    /// Opt-outs kept as pseudonymised suppression entries.
    pub suppressions_kept: u64,
}

/// A message claimed for sending, leased to this process.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: MessageId,
    pub account: String,
    pub recipient: String,
    pub sender: String,
    pub body: String,
    /// Routing rules can depend on it.
    pub category: Category,
    /// 1 for `high`, 0 for normal: a high one overtakes normal ones queued at a carrier.
    pub priority: i32,
    pub encoding: Encoding,
    pub segments: u32,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub expires_at: i64,
    /// Parts (1-based) a carrier accepted in an earlier attempt; they are not sent again.
    pub accepted_parts: Vec<u32>,
}

/// A part the carrier accepted, with the id its receipts will carry.
#[derive(Debug, Clone)]
pub struct AcceptedPart {
    pub part: u32,
    pub carrier_message_id: String,
}

/// What becomes of a claimed message after one attempt (decided in `dispatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Every part is accepted.
    Sent,
    /// Try again at this time (ms); `detail` says why.
    Retry { at: i64, detail: String },
    /// A final status: `Failed`, `Expired` or `Unknown`.
    Finish {
        status: Status,
        detail: String,
        error_code: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub id: MessageId,
    pub carrier: Option<String>,
    pub accepted: Vec<AcceptedPart>,
    pub next: Next,
    /// What routing did on the way (a carrier skipped or failed over), for the history: the
    /// detail of a `sent` event, put before the detail of any other.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptMatch {
    Matched,
    /// No part has that id yet: kept until its submit_sm_resp is recorded.
    Parked,
}

/// A receipt the store parked (no part had its id) and now gives up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedReceipt {
    /// Normalised, as it was looked up.
    pub carrier_message_id: String,
    /// A `ReceiptState` word.
    pub state: String,
    pub error_code: Option<String>,
    pub received_at: i64,
}

/// A part accepted by a carrier long ago and still without a final receipt: to be asked
/// about with query_sm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptQuery {
    pub message_id: MessageId,
    pub part: u32,
    /// As the carrier's submit_sm_resp wrote it (the normalised id for parts stored before
    /// the verbatim one was kept).
    pub carrier_message_id: String,
    /// The message's sender, as stored: query_sm names the source address.
    pub sender: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelResult {
    Canceled,
    NotFound,
    TooLate(Status),
}

/// One message as the API shows it.
#[derive(Debug, Clone)]
pub struct MessageView {
    pub id: MessageId,
    pub account: String,
    pub reference: Option<String>,
    pub recipient: String,
    pub sender: String,
    pub category: Category,
    pub encoding: Encoding,
    pub segments: u32,
    pub status: Status,
    pub detail: Option<String>,
    pub error_code: Option<String>,
    pub carrier: Option<String>,
    pub attempts: u32,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
    /// The text, until the retention purge removes it. Shown only in a subject export.
    pub body: Option<String>,
    /// Filled by `get_message` and `export_subject` only.
    pub events: Vec<EventView>,
}

/// An inbound SMS as an export shows it.
#[derive(Debug, Clone)]
pub struct InboundView {
    pub id: String,
    pub to: String,
    pub body: Option<String>,
    pub received_at: i64,
}

/// Everything an account holds about one number (GDPR art. 15).
#[derive(Debug, Clone, Default)]
pub struct SubjectExport {
    pub messages: Vec<MessageView>,
    pub inbound: Vec<InboundView>,
    pub opt_outs: Vec<OptOut>,
    pub number: NumberHistory,
}

#[derive(Debug, Clone)]
pub struct EventView {
    pub at: i64,
    pub status: Status,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub recipient: Option<String>,
    pub since: Option<i64>,
    /// Page after this id (ids sort by creation; pages run newest first).
    pub before: Option<MessageId>,
    pub limit: u32,
}

/// The account an inbound SMS belongs to (by the number it was sent to), its webhook, and
/// the keywords it answers.
#[derive(Debug, Clone)]
pub struct InboundOwner {
    pub account: String,
    pub webhook_url: Option<String>,
    pub keywords: Arc<crate::policy::opt_out::Keywords>,
    pub policy: AccountPolicy,
}

/// The store's share of the policy: how numbers are pseudonymised for the opt-out list, and
/// which carrier results make a number suspect.
#[derive(Debug, Clone)]
pub struct StoreRules {
    pub pseudonyms: crate::message::Pseudonymizer,
    pub suspect_after: u32,
    pub suspect_codes: Vec<String>,
}

impl StoreError {
    /// The disk (or the filesystem's quota) is full: SQLITE_FULL, or ENOSPC from the OS.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => e.code().as_deref() == Some("13"),
            StoreError::Database(sqlx::Error::Io(e)) => e.kind() == std::io::ErrorKind::StorageFull,
            StoreError::Sqlite(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            StoreError::DiskFull => true,
            _ => false,
        }
    }
}

impl StoreRules {
    /// The opt-out key of a number: the full HMAC, so that it stays unique.
    pub fn number_key(&self, number: &str) -> String {
        self.pseudonyms.key(number)
    }

    pub fn is_suspect_code(&self, code: &str) -> bool {
        self.suspect_codes
            .iter()
            .any(|c| c.eq_ignore_ascii_case(code))
    }
}

/// A webhook to post, held by this process until its result is recorded.
#[derive(Debug, Clone)]
pub struct WebhookJob {
    /// The outbox row's id, or (for [`WebhookCopy::Event`]) the status event's.
    pub id: i64,
    pub copy: WebhookCopy,
    pub account: String,
    pub url: String,
    pub payload: String,
    pub attempts: u32,
    pub created_at: i64,
}

/// Where a webhook's durable copy is while it is being posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookCopy {
    /// An outbox row, claimed (leased) from the outbox.
    Outbox,
    /// Only the status event it reports: handed by the store in memory (see [`Handoff`]).
    /// A result other than delivered or given up writes it to the outbox.
    Event,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookResult {
    Delivered,
    RetryAt {
        at: i64,
        error: String,
    },
    GiveUp {
        error: String,
    },
    /// Not posted (the sender stopped first): waiting again at once, the attempt not counted.
    Unposted,
    /// Not posted (its account's receiver is behind): waiting again from `at`, the attempt not
    /// counted.
    Deferred {
        at: i64,
    },
}

/// Wakes the workers that wait for new rows, so they need not poll.
#[derive(Debug, Default)]
pub struct Signals {
    /// A message became due (new submission, or a retry was scheduled).
    pub queue: Notify,
    /// A webhook was written to the outbox for a claim, or one is due again.
    pub webhooks: Notify,
    /// Webhooks handed to this process's sender in memory, without an outbox row.
    pub handoff: Handoff,
}

/// The gateway's durable store. Writes go through the backend's [`Writer`] and the rules of
/// `domain`, written once; reads are each backend's own SQL.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's writer, which applies every write below.
    fn writer(&self) -> &Writer;

    /// Stores a batch of messages (and the first answer, for an idempotent request) in one
    /// transaction. Concurrent callers are group-committed.
    /// Checks each message against the opt-outs, number changes and suspect numbers, stores
    /// it as decided, and stores the rendered answer under the idempotency key if any.
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
        match self.writer().call(op).await? {
            Reply::Submit(result) => Ok(result),
            other => Err(other.unexpected()),
        }
    }

    /// Adds opt-outs (journalled) and refuses the account's waiting messages they cover.
    /// Returns how many entries were new.
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
        self.writer().count(op).await
    }

    /// Removes an opt-out (journalled); `sender` None removes every entry for the number.
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
        self.writer().count(op).await
    }

    /// The account's opt-outs, after the given number key (paging), oldest key first.
    async fn list_opt_outs(
        &self,
        account: &str,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<OptOut>, StoreError>;

    /// Records number changes and refuses (or, for accounts in `follow`, redirects) the
    /// waiting messages whose consent is older. Returns the messages affected.
    async fn add_number_changes(
        &self,
        changes: Vec<NumberChange>,
        follow: Vec<String>,
    ) -> Result<u64, StoreError> {
        self.writer()
            .count(Op::AddNumberChanges { changes, follow })
            .await
    }

    /// The changes visible to `account` for a number, and its carrier-feedback state.
    async fn number_history(
        &self,
        account: &str,
        number: &str,
    ) -> Result<NumberHistory, StoreError>;

    /// Clears a suspect number: the mark goes, and the held messages of `account` (of every
    /// account when `None`, the operator) are queued again. False when it was not suspect and
    /// nothing was held.
    async fn clear_suspect(&self, number: &str, account: Option<&str>) -> Result<bool, StoreError> {
        let op = Op::ClearSuspect {
            number: number.to_owned(),
            account: account.map(str::to_owned),
        };
        self.writer().count(op).await.map(|n| n > 0)
    }

    /// Messages of every account in one status, oldest due first (operators' queue view).
    async fn queue(&self, status: Status, limit: u32) -> Result<Vec<MessageView>, StoreError>;

    /// Sends a message that ended (failed, expired, unknown, undelivered) once more, valid until
    /// `expires_at`. False when it is not in such a state.
    async fn retry(&self, id: MessageId, expires_at: i64) -> Result<bool, StoreError> {
        let op = Op::Retry { id, expires_at };
        self.writer().count(op).await.map(|n| n > 0)
    }

    /// Cancels a waiting message of any account (operators).
    async fn cancel_any(&self, id: MessageId) -> Result<CancelResult, StoreError> {
        match self.writer().call(Op::CancelAny { id }).await? {
            Reply::Cancel(result) => Ok(result),
            other => Err(other.unexpected()),
        }
    }

    /// Everything the account holds about a number.
    async fn export_subject(
        &self,
        account: &str,
        number: &str,
    ) -> Result<SubjectExport, StoreError>;

    /// Erases what the account holds about a number, keeping opt-outs pseudonymised.
    async fn erase_subject(&self, account: &str, number: &str) -> Result<Erasure, StoreError> {
        let op = Op::EraseSubject {
            account: account.to_owned(),
            number: number.to_owned(),
        };
        match self.writer().call(op).await? {
            Reply::Erased(erasure) => Ok(erasure),
            other => Err(other.unexpected()),
        }
    }

    async fn idempotent_answer(
        &self,
        account: &str,
        key: &str,
    ) -> Result<Option<IdempotentAnswer>, StoreError>;

    async fn get_message(
        &self,
        account: &str,
        id: MessageId,
    ) -> Result<Option<MessageView>, StoreError>;

    async fn list_messages(
        &self,
        account: &str,
        filter: &ListFilter,
    ) -> Result<Vec<MessageView>, StoreError>;

    async fn cancel(&self, account: &str, id: MessageId) -> Result<CancelResult, StoreError> {
        let op = Op::Cancel {
            account: account.to_owned(),
            id,
        };
        match self.writer().call(op).await? {
            Reply::Cancel(result) => Ok(result),
            other => Err(other.unexpected()),
        }
    }

    /// Claims up to `limit` due messages, leasing them until `lease_until` (ms).
    async fn claim_due(&self, limit: usize, lease_until: i64) -> Result<Vec<Claimed>, StoreError> {
        match self.writer().call(Op::Claim { limit, lease_until }).await? {
            Reply::Claimed(claimed) => Ok(claimed),
            other => Err(other.unexpected()),
        }
    }

    /// When the earliest waiting message is due (ms), if any.
    async fn next_due(&self) -> Result<Option<i64>, StoreError>;

    async fn record_attempts(&self, results: Vec<AttemptResult>) -> Result<(), StoreError> {
        self.writer().call(Op::Attempts(results)).await.map(|_| ())
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
        match self.writer().call(op).await? {
            Reply::Receipt(m) => Ok(m),
            other => Err(other.unexpected()),
        }
    }

    /// Which of `ids` (normalised) some part of `carrier` has: how `receipt_id = "auto"`
    /// tells which reading of a receipt's id is meant.
    async fn known_carrier_ids(
        &self,
        carrier: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError>;

    /// Removes and returns the receipts of `carrier` parked (by `apply_receipt`) before
    /// `received_before` (ms) whose part never came.
    async fn take_unmatched_receipts(
        &self,
        carrier: &str,
        received_before: i64,
    ) -> Result<Vec<ParkedReceipt>, StoreError> {
        let op = Op::TakeUnmatched {
            carrier: carrier.to_owned(),
            received_before,
        };
        match self.writer().call(op).await? {
            Reply::Parked(parked) => Ok(parked),
            other => Err(other.unexpected()),
        }
    }

    /// Up to `limit` parts of `carrier`'s `sent` messages accepted before `accepted_before`
    /// (ms) that have no final receipt and were not asked about since then; marks them asked
    /// about now, so each is queried at most once per period.
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
        match self.writer().call(op).await? {
            Reply::Queries(queries) => Ok(queries),
            other => Err(other.unexpected()),
        }
    }

    /// Stores a mobile-originated message for its owner, if known, with a webhook if the
    /// owner has one.
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
        self.writer().call(op).await.map(|_| ())
    }

    /// Returns messages whose lease has ended (a process died while sending them) to the queue.
    /// `all` also takes leases that have not ended: right for a single instance at start-up.
    /// PostgreSQL never takes another live instance's claims: there `all` adds only this
    /// process's own.
    async fn release_claims(&self, all: bool) -> Result<u64, StoreError> {
        self.writer().count(Op::Release { all }).await
    }

    /// Expires waiting messages whose validity has ended, even while no carrier is bound.
    async fn expire_overdue(&self) -> Result<u64, StoreError> {
        self.writer().count(Op::ExpireOverdue).await
    }

    async fn claim_webhooks(
        &self,
        limit: usize,
        lease_until: i64,
    ) -> Result<Vec<WebhookJob>, StoreError> {
        match self
            .writer()
            .call(Op::ClaimWebhooks { limit, lease_until })
            .await?
        {
            Reply::Webhooks(jobs) => Ok(jobs),
            other => Err(other.unexpected()),
        }
    }

    /// Records the outcome of posted webhooks, many at once. One caller at a time (the
    /// sender's recorder): the results of handed webhooks settle them in that order.
    async fn webhook_results(
        &self,
        results: Vec<(WebhookJob, WebhookResult)>,
    ) -> Result<(), StoreError> {
        let handoff = &self.signals().handoff;
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
        self.writer()
            .call(op)
            .await
            .map(|_| ())
            .inspect_err(|_| handoff.unsettle(&events))
    }

    /// When the earliest pending webhook is due (ms), if any.
    async fn next_webhook_due(&self) -> Result<Option<i64>, StoreError>;

    /// Removes what the retention periods say is too old, at most `limit` rows of each kind;
    /// `dry_run` only counts.
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
        match self.writer().call(op).await? {
            Reply::Purged(purge) => Ok(purge),
            other => Err(other.unexpected()),
        }
    }

    /// Messages waiting, when the earliest of them is due (ms; as `next_due`: read from the
    /// claim's index, not from every waiting row), and webhooks waiting.
    async fn backlog(&self) -> Result<(i64, Option<i64>, i64), StoreError>;

    /// Answers when the database can be read (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// True while writes fail because the disk is full (one failed within the last few
    /// seconds): reads still answer, nothing new can be accepted (for `/readyz`).
    fn disk_full(&self) -> bool {
        false
    }

    fn signals(&self) -> &Arc<Signals>;

    /// Commits what is queued and stops the writer.
    async fn close(&self);
}

//! The gateway's rules for what the store writes, once for both backends.
//!
//! Every write is an [`Op`], applied by [`apply`] inside a transaction of the backend. The
//! rules (policy decisions at submission and at send time, claims, attempt results, receipt
//! matching and roll-up, keywords, number-change and opt-out effects, the webhook outbox and
//! retention) are written here as async functions over [`Sql`], the statements a backend
//! supplies. SQLite runs them on its writer thread, where every statement completes at once
//! (`futures::executor::block_on` never waits); PostgreSQL runs them on pooled connections,
//! many transactions at a time.
//!
//! What a transaction sets in motion (waking the dispatcher or the webhook sender, handing
//! webhooks over, counting metrics) is collected in [`Effects`] and happens only once the
//! transaction has committed.

mod events;
mod policy;
mod receipts;
mod retention;
mod sending;
pub(crate) mod sql;
mod submit;

pub(crate) use sql::{ChangedRow, ClaimRow, Facts, NewEvent, OutboxRow, PartRow, Sql, Target};

use tokio::sync::oneshot;

use super::{
    AccountPolicy, AttemptResult, CancelResult, Claimed, Cutoffs, Erasure, IdempotencyRequest,
    InboundOwner, NewMessage, NumberChange, OptOutSource, ParkedReceipt, Purge, ReceiptMatch,
    ReceiptQuery, RenderAnswer, Signals, StoreError, SubmitResult, WebhookJob, WebhookResult,
};
use crate::message::{MessageId, Status};
use crate::receipt::{InboundSms, Receipt};

pub(crate) use events::StatusPayload;
pub(crate) use policy::change_columns;

/// One write the store was asked for.
pub(crate) enum Op {
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
        /// The handoff's cursor after these results (see [`super::Handoff::settle`]).
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

/// What an [`Op`] answers once committed.
pub(crate) enum Reply {
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

impl Reply {
    /// The name of a reply that was not the one expected (a defect, reported as corruption).
    pub(crate) fn unexpected(self) -> StoreError {
        let kind = match self {
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
        StoreError::Corrupt(format!(
            "the store answered with an unexpected {kind} reply"
        ))
    }
}

/// An [`Op`] and where its answer goes.
pub(crate) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// A metric that counts a committed change.
enum Counted {
    Status {
        account: String,
        status: Status,
    },
    OptOut {
        action: &'static str,
        source: &'static str,
    },
    NumberChange(&'static str),
}

/// What the operations of a transaction set in motion, done once it has committed.
#[derive(Default)]
pub(crate) struct Effects {
    /// A message became due: wake the dispatcher.
    queue: bool,
    /// A webhook was written to the outbox: wake the sender.
    webhooks: bool,
    /// Webhooks whose status event is their durable copy, handed to the sender (SQLite).
    handed: Vec<WebhookJob>,
    counted: Vec<Counted>,
    /// Personal data was erased or purged: a backend that keeps old versions of its pages
    /// (SQLite's WAL) gets them out before the answer.
    erased: bool,
}

impl Effects {
    /// Whether the transaction erased or purged personal data.
    pub(crate) fn erased(&self) -> bool {
        self.erased
    }

    /// The transaction committed: wake, hand over and count what it did.
    pub(crate) fn committed(&mut self, signals: &Signals) {
        if self.queue {
            signals.queue.notify_one();
        }
        if self.webhooks {
            signals.webhooks.notify_one();
        }
        signals.handoff.hand(std::mem::take(&mut self.handed));
        for counted in self.counted.drain(..) {
            match counted {
                Counted::Status { account, status } => {
                    crate::metrics::status_change(&account, status.as_str())
                }
                Counted::OptOut { action, source } => crate::metrics::opt_out(action, source),
                Counted::NumberChange(kind) => crate::metrics::number_change(kind),
            }
        }
        *self = Effects::default();
    }

    /// The transaction rolled back: nothing it did happened; room reserved for handed
    /// webhooks is given back.
    pub(crate) fn rolled_back(&mut self, signals: &Signals) {
        signals.handoff.give_back(self.handed.len());
        *self = Effects::default();
    }

    fn status_changed(&mut self, account: &str, status: Status) {
        self.counted.push(Counted::Status {
            account: account.to_owned(),
            status,
        });
    }
}

/// Applies one operation inside the backend's open transaction.
pub(crate) async fn apply<D: Sql>(
    db: &mut D,
    op: &Op,
    now: i64,
    effects: &mut Effects,
) -> Result<Reply, StoreError> {
    Ok(match op {
        Op::Submit {
            account,
            policy,
            messages,
            idempotency,
            render,
        } => {
            let request = submit::Request {
                account,
                policy,
                messages,
                idempotency: idempotency.as_ref(),
                render,
            };
            Reply::Submit(submit::submit(db, request, now, effects).await?)
        }
        Op::AddOptOuts {
            account,
            entries,
            by,
            policy,
        } => Reply::Count(
            policy::add_opt_outs(db, account, entries, by, policy, now, effects).await?,
        ),
        Op::RemoveOptOut {
            account,
            number,
            sender,
            by,
        } => {
            let sender = sender.as_deref().map(|s| s.trim_start_matches('+'));
            Reply::Count(
                policy::remove_opt_outs(db, account, number, sender, by, now, effects).await?,
            )
        }
        Op::AddNumberChanges { changes, follow } => {
            Reply::Count(policy::add_number_changes(db, changes, follow, now, effects).await?)
        }
        Op::ClearSuspect { number, account } => {
            Reply::Count(policy::clear_suspect(db, number, account.as_deref(), now, effects).await?)
        }
        Op::EraseSubject { account, number } => {
            effects.erased = true;
            Reply::Erased(policy::erase_subject(db, account, number).await?)
        }
        Op::Retry { id, expires_at } => {
            Reply::Count(sending::retry(db, *id, *expires_at, now, effects).await?)
        }
        Op::CancelAny { id } => Reply::Cancel(sending::cancel(db, None, *id, now, effects).await?),
        Op::Cancel { account, id } => {
            Reply::Cancel(sending::cancel(db, Some(account), *id, now, effects).await?)
        }
        Op::Claim { limit, lease_until } => {
            Reply::Claimed(sending::claim(db, *limit, *lease_until, now, effects).await?)
        }
        Op::Attempts(results) => {
            sending::record_attempts(db, results, now, effects).await?;
            Reply::Done
        }
        Op::Release { all } => Reply::Count(sending::release(db, *all, now, effects).await?),
        Op::ExpireOverdue => Reply::Count(sending::expire_overdue(db, now, effects).await?),
        Op::Receipt { carrier, receipt } => {
            Reply::Receipt(receipts::apply_receipt(db, carrier, receipt, now, effects).await?)
        }
        Op::TakeUnmatched {
            carrier,
            received_before,
        } => Reply::Parked(db.take_unmatched(carrier, *received_before).await?),
        Op::ClaimQueries {
            carrier,
            accepted_before,
            limit,
        } => Reply::Queries(
            db.claim_queries(carrier, *accepted_before, *limit, now)
                .await?,
        ),
        Op::Inbound {
            carrier,
            sms,
            owner,
        } => {
            policy::store_inbound(db, carrier, sms, owner.as_ref(), now, effects).await?;
            Reply::Done
        }
        Op::ClaimWebhooks { limit, lease_until } => {
            Reply::Webhooks(db.claim_outbox(*limit, *lease_until, now).await?)
        }
        Op::WebhookResults {
            results,
            settled_through,
        } => {
            events::webhook_results(db, results, *settled_through, now, effects).await?;
            Reply::Done
        }
        Op::Purge {
            cutoffs,
            limit,
            dry_run,
        } => {
            let purge = retention::purge(db, cutoffs, *limit, *dry_run).await?;
            effects.erased |= !*dry_run && purge.removed_any();
            Reply::Purged(purge)
        }
    })
}

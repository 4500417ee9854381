//! A submission: the policy decides each message, the messages are stored as decided, and an
//! idempotent request's answer is stored with them.

use super::{Effects, NewEvent, Sql, Target, events, policy};
use crate::message::Status;
use crate::store::{
    AccountPolicy, IdempotencyRequest, IdempotentAnswer, NewMessage, RenderAnswer, StoreError,
    SubmitResult,
};

pub(super) struct Request<'a> {
    pub account: &'a str,
    pub policy: &'a AccountPolicy,
    pub messages: &'a [NewMessage],
    pub idempotency: Option<&'a IdempotencyRequest>,
    pub render: &'a RenderAnswer,
}

pub(super) async fn submit<D: Sql>(
    db: &mut D,
    request: Request<'_>,
    now: i64,
    effects: &mut Effects,
) -> Result<SubmitResult, StoreError> {
    // A request that raced one with the same key (committed meanwhile) gets its answer.
    if let Some(idempotency) = request.idempotency
        && let Some(first) = db
            .idempotent_answer(request.account, &idempotency.key)
            .await?
    {
        return Ok(SubmitResult::Replay(first));
    }
    let mut decided = Vec::with_capacity(request.messages.len());
    for message in request.messages {
        let mut m = message.clone();
        policy::evaluate(db, request.policy, &mut m, now).await?;
        insert_message(db, &m, request.policy.service_messages, now, effects).await?;
        decided.push(m);
    }
    let (status_code, answer) = (request.render)(&decided);
    if let Some(idempotency) = request.idempotency {
        let first = IdempotentAnswer {
            key: idempotency.key.clone(),
            request_hash: idempotency.request_hash.clone(),
            status_code,
            answer: answer.clone(),
        };
        db.insert_idempotent_answer(request.account, &first, now)
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
pub(super) async fn insert_message<D: Sql>(
    db: &mut D,
    m: &NewMessage,
    service_messages: bool,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    db.insert_message(m, service_messages).await?;
    let target = Target {
        account: m.account.clone(),
        url: m.webhook_url.clone(),
        reference: m.reference.clone(),
    };
    let id = m.id.to_string();
    let event = NewEvent {
        message_id: &id,
        at: now,
        status: m.status,
        detail: m.detail.as_deref(),
        error_code: None,
    };
    events::add_event(db, event, &target, effects).await?;
    if matches!(m.status, Status::Queued | Status::Scheduled) {
        effects.queue = true;
    }
    Ok(())
}

//! Sending: claims (with the policy checked again at the last moment), attempt results,
//! leases that end, expiry, and what operators and applications do to a waiting message.

use super::events::{add_event, add_events, set_status};
use super::{Effects, NewEvent, Sql, policy, receipts};
use crate::message::{MessageId, Status};
use crate::receipt::{Receipt, normalize_id};
use crate::store::shared::{parse_encoding, parse_id, parse_receipt_state, parse_status};
use crate::store::{AttemptResult, CancelResult, Claimed, Next, StoreError};

pub(super) async fn claim<D: Sql>(
    db: &mut D,
    limit: usize,
    lease_until: i64,
    now: i64,
    effects: &mut Effects,
) -> Result<Vec<Claimed>, StoreError> {
    db.policy_tick(now).await?;
    let taken = db.claim_due(limit, lease_until, now).await?;
    let mut claimed = Vec::with_capacity(taken.len());
    let mut attempts = Vec::with_capacity(taken.len());
    for row in taken {
        // What changed while the message waited (an opt-out, a number change, a suspect
        // number, a retry by an operator) stops it here, at the last moment before sending.
        // Checked only when something did change, or the message was out before.
        let retried = row.attempts > 1;
        let stale = row.policy_gen < db.policy_generation() || retried;
        if stale && let Some((status, detail)) = policy::recheck(db, &row, now).await? {
            set_status(db, &row.id, status, &detail, now, effects).await?;
            continue;
        }
        let attempt = row.attempts as u32;
        let accepted_parts = if retried {
            db.accepted_parts(&row.id).await?
        } else {
            Vec::new()
        };
        attempts.push((row.id.clone(), format!("attempt {attempt}")));
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
    // `sending` is an internal step: in the history, never posted.
    let events: Vec<NewEvent<'_>> = attempts
        .iter()
        .map(|(id, detail)| NewEvent {
            message_id: id,
            at: now,
            status: Status::Sending,
            detail: Some(detail),
            error_code: None,
        })
        .collect();
    db.insert_events(&events).await?;
    Ok(claimed)
}

pub(super) async fn record_attempts<D: Sql>(
    db: &mut D,
    results: &[AttemptResult],
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    for result in results {
        record_attempt(db, result, now, effects).await?;
    }
    Ok(())
}

async fn record_attempt<D: Sql>(
    db: &mut D,
    result: &AttemptResult,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    let id = result.id.to_string();
    let carrier = result.carrier.as_deref().unwrap_or("");
    for part in &result.accepted {
        db.record_part(&id, part.part, carrier, &part.carrier_message_id, now)
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
    let carrier_used = result.carrier.as_deref();
    if let Some((target, recipient)) = db
        .finish_attempt(&id, status, detail, error_code, carrier_used, due_at, now)
        .await?
    {
        // A retry is the gateway's own business: it is in the history, not posted.
        let target = super::Target {
            url: target.url.filter(|_| status != Status::Queued),
            ..target
        };
        let event = NewEvent {
            message_id: &id,
            at: now,
            status,
            detail,
            error_code,
        };
        add_event(db, event, &target, effects).await?;
        if status == Status::Queued {
            effects.queue = true;
        }
        if let Some(code) = error_code.filter(|c| db.rules().is_suspect_code(c)) {
            policy::count_failure(db, &recipient, code, now, effects).await?;
        }
    }
    // Receipts that overtook their submit_sm_resp are applied now that their part is known,
    // even when the message itself moved on (its lease ended) in the meantime.
    for part in &result.accepted {
        let key = normalize_id(&part.carrier_message_id);
        for (state, error_code) in db.take_parked(carrier, &key).await? {
            let receipt = Receipt {
                carrier_message_id: key.clone(),
                state: parse_receipt_state(&state)?,
                error_code,
            };
            receipts::apply_receipt(db, carrier, &receipt, now, effects).await?;
        }
    }
    Ok(())
}

pub(super) async fn release<D: Sql>(
    db: &mut D,
    all: bool,
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let detail = "lease ended while sending: any submit_sm of it may or may not have reached the \
                  carrier; queued again";
    let changed = db.release_claims(all, detail, now).await?;
    // Queued again is the gateway's own business: in the history, not posted.
    let changed: Vec<_> = changed
        .into_iter()
        .map(|mut row| {
            row.target.url = None;
            row
        })
        .collect();
    add_events(db, &changed, Status::Queued, detail, now, effects).await?;
    effects.queue |= !changed.is_empty();
    Ok(changed.len() as u64)
}

/// Expires waiting messages whose validity ended; also applies receipts parked while their
/// part was being stored by another transaction (see [`super::Sql::adoptable_parked`]).
pub(super) async fn expire_overdue<D: Sql>(
    db: &mut D,
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let detail = "validity period ended before it could be sent";
    let changed = db.expire_overdue(detail, now).await?;
    add_events(db, &changed, Status::Expired, detail, now, effects).await?;
    for (carrier, receipt) in db.adoptable_parked().await? {
        receipts::apply_receipt(db, &carrier, &receipt, now, effects).await?;
    }
    Ok(changed.len() as u64)
}

/// Sends an ended message once more (an operator's decision after a fault was fixed).
pub(super) async fn retry<D: Sql>(
    db: &mut D,
    id: MessageId,
    expires_at: i64,
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let id = id.to_string();
    let detail = "queued again by an operator";
    let Some(target) = db.requeue_ended(&id, detail, expires_at, now).await? else {
        return Ok(0);
    };
    let event = NewEvent {
        message_id: &id,
        at: now,
        status: Status::Queued,
        detail: Some(detail),
        error_code: None,
    };
    add_event(db, event, &target, effects).await?;
    effects.queue = true;
    Ok(1)
}

/// Cancels a waiting message; `account` None is an operator, who may cancel any.
pub(super) async fn cancel<D: Sql>(
    db: &mut D,
    account: Option<&str>,
    id: MessageId,
    now: i64,
    effects: &mut Effects,
) -> Result<CancelResult, StoreError> {
    let id = id.to_string();
    let detail = "canceled through the API";
    if let Some(target) = db.cancel_waiting(&id, account, detail, now).await? {
        let event = NewEvent {
            message_id: &id,
            at: now,
            status: Status::Canceled,
            detail: Some(detail),
            error_code: None,
        };
        add_event(db, event, &target, effects).await?;
        return Ok(CancelResult::Canceled);
    }
    match db.status_of(&id, account).await? {
        None => Ok(CancelResult::NotFound),
        Some(s) => Ok(CancelResult::TooLate(parse_status(&s)?)),
    }
}

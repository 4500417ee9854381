//! A message's history and its webhooks: every status change is an event, and a message with
//! a webhook URL gets a `message.status` webhook for it, handed to this process's sender with
//! the event as its durable copy (SQLite, while the sender has room) or through the outbox.

use super::{ChangedRow, Effects, NewEvent, OutboxRow, Sql, Target};
use crate::message::{Status, rfc3339};
use crate::store::handoff::Handoff;
use crate::store::{StoreError, WebhookCopy, WebhookJob, WebhookResult};

/// The body of a `message.status` webhook: the same bytes from either backend.
#[derive(serde::Serialize)]
#[serde(tag = "type", rename = "message.status")]
pub(crate) struct StatusPayload<'a> {
    pub message_id: &'a str,
    pub reference: Option<&'a str>,
    pub status: Status,
    pub detail: Option<&'a str>,
    pub error_code: Option<&'a str>,
    #[serde(serialize_with = "as_rfc3339")]
    pub at: i64,
}

impl StatusPayload<'_> {
    pub(crate) fn to_json(&self) -> Result<String, StoreError> {
        serde_json::to_string(self)
            .map_err(|e| StoreError::Corrupt(format!("webhook payload: {e}")))
    }
}

fn as_rfc3339<S: serde::Serializer>(at: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*at))
}

/// Records a status change in the history and, when the message has a webhook, posts it.
/// `sending` is an internal step and is not posted.
pub(super) async fn add_event<D: Sql>(
    db: &mut D,
    event: NewEvent<'_>,
    target: &Target,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    effects.status_changed(&target.account, event.status);
    let Some(url) = target
        .url
        .as_ref()
        .filter(|_| event.status != Status::Sending)
    else {
        db.insert_event(&event, false).await?;
        return Ok(());
    };
    let payload = StatusPayload {
        message_id: event.message_id,
        reference: target.reference.as_deref(),
        status: event.status,
        detail: event.detail,
        error_code: event.error_code,
        at: event.at,
    }
    .to_json()?;
    if !db.handoff().is_some_and(Handoff::reserve) {
        db.insert_event(&event, false).await?;
        return enqueue_webhook(
            db,
            &target.account,
            url,
            &payload,
            event.at,
            event.at,
            effects,
        )
        .await;
    }
    let event_id = match db.insert_event(&event, true).await {
        Ok(id) => id,
        Err(error) => {
            if let Some(handoff) = db.handoff() {
                handoff.give_back(1);
            }
            return Err(error);
        }
    };
    effects.handed.push(WebhookJob {
        id: event_id,
        copy: WebhookCopy::Event,
        account: target.account.clone(),
        url: url.clone(),
        payload,
        attempts: 1,
        created_at: event.at,
    });
    Ok(())
}

/// Records the same status change for every changed message row.
pub(super) async fn add_events<D: Sql>(
    db: &mut D,
    changed: &[ChangedRow],
    status: Status,
    detail: &str,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    for row in changed {
        let event = NewEvent {
            message_id: &row.id,
            at: now,
            status,
            detail: Some(detail),
            error_code: None,
        };
        add_event(db, event, &row.target, effects).await?;
    }
    Ok(())
}

/// Moves one message to `status` (releasing any claim) and records the change.
pub(super) async fn set_status<D: Sql>(
    db: &mut D,
    id: &str,
    status: Status,
    detail: &str,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    let changed = db.set_status(id, status, detail, now).await?;
    add_events(
        db,
        std::slice::from_ref(&changed),
        status,
        detail,
        now,
        effects,
    )
    .await
}

/// Writes a webhook not tried yet to the outbox, waiting from `due_at`, and wakes the sender.
pub(super) async fn enqueue_webhook<D: Sql>(
    db: &mut D,
    account: &str,
    url: &str,
    payload: &str,
    created_at: i64,
    due_at: i64,
    effects: &mut Effects,
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
    db.insert_outbox(&row).await?;
    effects.webhooks = true;
    Ok(())
}

/// Records post results: delivered and given-up webhooks leave the outbox, retries are
/// rescheduled. A handed webhook has no row: it gets one only to wait again; and the cursor
/// moves past the handed webhooks now settled.
pub(super) async fn webhook_results<D: Sql>(
    db: &mut D,
    results: &[(WebhookJob, WebhookResult)],
    settled_through: Option<i64>,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    let mut done = Vec::new();
    for (job, result) in results {
        if let WebhookResult::GiveUp { error } = result {
            tracing::warn!(webhook = job.id, %error, "webhook given up after its retry period");
        }
        match (job.copy, result) {
            (WebhookCopy::Outbox, WebhookResult::Delivered | WebhookResult::GiveUp { .. }) => {
                done.push(job.id);
            }
            (WebhookCopy::Outbox, WebhookResult::RetryAt { at, error }) => {
                db.outbox_retry(job.id, *at, error).await?;
            }
            (WebhookCopy::Outbox, WebhookResult::Unposted) => db.outbox_unposted(job.id).await?,
            (WebhookCopy::Outbox, WebhookResult::Deferred { at }) => {
                db.outbox_defer(job.id, *at).await?;
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
                db.insert_outbox(&row).await?;
            }
            (WebhookCopy::Event, WebhookResult::Unposted) => {
                let (account, url, payload) = (&job.account, &job.url, &job.payload);
                enqueue_webhook(db, account, url, payload, job.created_at, now, effects).await?;
            }
            (WebhookCopy::Event, WebhookResult::Deferred { at }) => {
                let (account, url, payload) = (&job.account, &job.url, &job.payload);
                enqueue_webhook(db, account, url, payload, job.created_at, *at, effects).await?;
            }
        }
    }
    if !done.is_empty() {
        db.outbox_done(&done).await?;
    }
    if let Some(through) = settled_through {
        db.settle_handed(through).await?;
    }
    Ok(())
}

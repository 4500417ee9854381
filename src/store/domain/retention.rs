//! The retention purge. Ids are UUIDv7, so "created before" is an id range on the primary key
//! and the purge never scans the whole history. A dry run does the same work and rolls it
//! back, so its counts are exact.

use super::Sql;
use crate::message::MessageId;
use crate::store::shared::anonymous;
use crate::store::{Cutoffs, Purge, StoreError};

pub(super) async fn purge<D: Sql>(
    db: &mut D,
    cutoffs: &Cutoffs,
    limit: u32,
    dry_run: bool,
) -> Result<Purge, StoreError> {
    let id_before = |ms: i64| MessageId::first_at(ms).to_string();
    if dry_run {
        db.begin_dry_run().await?;
    }
    // Past the retention, a message keeps its statistics only: its text goes, its number
    // becomes a pseudonym (`~` and 16 hex digits) and its status note (which may name a
    // number) goes.
    let bodies_before = id_before(cutoffs.bodies_before);
    let done = db.messages_with_text(&bodies_before, limit).await?;
    for (id, recipient) in &done {
        let pseudonym = anonymous(db.rules(), recipient);
        db.anonymise_message(id, &pseudonym).await?;
    }
    let inbound = db.inbound_with_text(&bodies_before, limit).await?;
    for (id, sender) in &inbound {
        let pseudonym = anonymous(db.rules(), sender);
        db.anonymise_inbound(id, &pseudonym).await?;
    }
    let webhooks = db
        .delete_webhooks_before(cutoffs.bodies_before, limit)
        .await?;
    let events = db
        .delete_events_before(&id_before(cutoffs.events_before), limit)
        .await?;
    let canceled = db
        .canceled_before(&id_before(cutoffs.canceled_before), limit)
        .await?;
    for id in &canceled {
        db.delete_message(id).await?;
    }
    let idempotency_keys = db
        .delete_idempotency_before(cutoffs.idempotency_before)
        .await?;
    if dry_run {
        db.rollback_dry_run().await?;
    }
    Ok(Purge {
        message_bodies: done.len() as u64,
        inbound_bodies: inbound.len() as u64,
        webhooks,
        events,
        canceled_messages: canceled.len() as u64,
        idempotency_keys,
    })
}

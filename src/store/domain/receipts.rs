//! Receipts: matching a receipt to the part a carrier accepted, the roll-up of a long
//! message's parts, carrier feedback on the number, and receipts that beat their
//! submit_sm_resp (parked until the part is stored).

use super::events::add_event;
use super::{Effects, NewEvent, Sql, policy};
use crate::message::Status;
use crate::receipt::{Receipt, ReceiptState, normalize_id};
use crate::store::shared::{
    Parts, parse_receipt_state, parse_status, receipt_detail, rolled_up_status,
};
use crate::store::{ReceiptMatch, StoreError};

pub(super) async fn apply_receipt<D: Sql>(
    db: &mut D,
    carrier: &str,
    receipt: &Receipt,
    now: i64,
    effects: &mut Effects,
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
    let Some(part) = db.newest_part(carrier, &key).await? else {
        db.park_receipt(carrier, &key, receipt, now).await?;
        return Ok(ReceiptMatch::Parked);
    };
    let id = part.message_id.as_str();
    // A late intermediate receipt (ENROUTE after DELIVRD, from another bind) changes nothing.
    let part_is_final = parse_receipt_state(&part.state).is_ok_and(ReceiptState::is_final);
    if receipt.state.is_final() && part.state == "submitted" {
        crate::metrics::receipt_latency(carrier, now - part.updated_at);
    }
    if receipt.state.is_final() || !part_is_final {
        db.set_part_state(&part, receipt.state.as_str(), now)
            .await?;
    }
    let code = receipt.error_code.as_deref();
    // The common case: a final receipt for a one-part message still open.
    if receipt.state.is_final() {
        let status = match receipt.state {
            ReceiptState::Delivered => Status::Delivered,
            ReceiptState::Expired => Status::Expired,
            _ => Status::Undelivered,
        };
        let detail = receipt_detail(part.part, 1, receipt);
        if let Some((target, recipient)) =
            db.close_single_part(id, status, &detail, code, now).await?
        {
            carrier_feedback(db, &recipient, receipt, status, now, effects).await?;
            let event = NewEvent {
                message_id: id,
                at: now,
                status,
                detail: Some(&detail),
                error_code: code,
            };
            add_event(db, event, &target, effects).await?;
            return Ok(ReceiptMatch::Matched);
        }
    }
    let Some(row) = db.rollup(id).await? else {
        return Ok(ReceiptMatch::Matched);
    };
    let current = parse_status(&row.status)?;
    let parts = Parts {
        segments: row.segments,
        submitted: row.parts,
        delivered: row.delivered,
        all_submitted: current == Status::Sent,
    };
    let detail = receipt_detail(part.part, parts.submits(), receipt);
    let next = if !receipt.state.is_final() || current.is_final() {
        None
    } else {
        rolled_up_status(&parts, receipt.state)
    };
    match next {
        Some(status) => {
            carrier_feedback(db, &row.recipient, receipt, status, now, effects).await?;
            db.set_final_status(id, status, &detail, code, now).await?;
            let event = NewEvent {
                message_id: id,
                at: now,
                status,
                detail: Some(&detail),
                error_code: code,
            };
            add_event(db, event, &row.target, effects).await?;
        }
        // A receipt that changes nothing (intermediate, one part of several, late) is history.
        None => {
            let event = NewEvent {
                message_id: id,
                at: now,
                status: current,
                detail: Some(&detail),
                error_code: None,
            };
            db.insert_events(std::slice::from_ref(&event)).await?;
        }
    }
    Ok(ReceiptMatch::Matched)
}

/// Carrier feedback on the number, once per message that ends (not per part or duplicate
/// receipt): "unknown subscriber" counts towards suspect, a delivery shows the number works.
async fn carrier_feedback<D: Sql>(
    db: &mut D,
    recipient: &str,
    receipt: &Receipt,
    status: Status,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    match &receipt.error_code {
        _ if status == Status::Delivered => db.reset_failures(recipient).await,
        Some(code) if db.rules().is_suspect_code(code) => {
            policy::count_failure(db, recipient, code, now, effects).await
        }
        _ => Ok(()),
    }
}

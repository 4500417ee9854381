//! What both backends share: reading stored values back, the details they write into a
//! message's history, and the roll-up of a long message's receipts. Pure: no SQL here.

use super::StoreError;
use super::StoreRules;
use crate::encoding::Encoding;
use crate::message::{MessageId, Status, rfc3339};
use crate::policy::number_change::ChangeKind;
use crate::receipt::{Receipt, ReceiptState};

pub(super) fn parse_encoding(s: &str) -> Result<Encoding, StoreError> {
    match s {
        "gsm7" => Ok(Encoding::Gsm7),
        "ucs2" => Ok(Encoding::Ucs2),
        _ => Err(StoreError::Corrupt(format!("encoding `{s}`"))),
    }
}

pub(super) fn parse_id(s: &str) -> Result<MessageId, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("message id `{s}`")))
}

pub(super) fn parse_receipt_state(s: &str) -> Result<ReceiptState, StoreError> {
    ReceiptState::ALL
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| StoreError::Corrupt(format!("receipt state `{s}`")))
}

pub(super) fn parse_status(s: &str) -> Result<Status, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("status `{s}`")))
}

pub(super) fn receipt_detail(part: i64, segments: i64, receipt: &Receipt) -> String {
    let mut detail = format!("receipt: {}", receipt.state.as_str());
    if segments > 1 {
        detail.push_str(&format!(" (part {part} of {segments})"));
    }
    if let Some(err) = &receipt.error_code {
        detail.push_str(&format!(", error {err}"));
    }
    detail
}

/// The message status once a final receipt for one part is in: delivered when every part is,
/// undelivered or expired as soon as one part is (DOMAIN.md §3.6).
pub(super) fn rolled_up_status(parts: &Parts, latest: ReceiptState) -> Option<Status> {
    match latest {
        ReceiptState::Delivered => {
            let every_part = parts.delivered >= parts.segments
                || (parts.all_submitted && parts.delivered >= parts.submitted);
            every_part.then_some(Status::Delivered)
        }
        ReceiptState::Expired => Some(Status::Expired),
        _ => Some(Status::Undelivered),
    }
}

/// What is left of a number after the retention period.
pub(super) fn anonymous(rules: &StoreRules, number: &str) -> String {
    if number.starts_with('~') {
        return number.to_owned();
    }
    format!("~{}", rules.pseudonyms.pseudonym(number))
}

pub(super) fn change_kind(
    kind: &str,
    new_number: Option<String>,
) -> Result<ChangeKind, StoreError> {
    match (kind, new_number) {
        ("deactivated", _) => Ok(ChangeKind::Deactivated),
        ("changed", Some(new_number)) => Ok(ChangeKind::Changed { new_number }),
        _ => Err(StoreError::Corrupt(format!("number change kind `{kind}`"))),
    }
}

/// Why a message was refused for a number change (history and API answer).
pub(super) fn refusal_detail(kind: &str, effective_at: i64) -> String {
    format!(
        "the number was {kind} at {}, after the recipient's consent",
        rfc3339(effective_at)
    )
}

/// What the parts of a multi-part message have reached.
pub(super) struct Parts {
    /// SMS segments (the billing count).
    pub segments: i64,
    /// submit_sm recorded; fewer than `segments` when the carrier takes the whole text in one
    /// message_payload.
    pub submitted: i64,
    pub delivered: i64,
    /// Every submit_sm of the message was accepted (it is `sent`).
    pub all_submitted: bool,
}

impl Parts {
    /// How many submit_sm (and receipts) the message takes, as far as known.
    pub fn submits(&self) -> i64 {
        if self.all_submitted {
            self.submitted
        } else {
            self.segments
        }
    }
}

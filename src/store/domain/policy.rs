//! The policy's part of the store: the facts the pure decisions of `crate::policy` need, and
//! what follows from them (refusing, holding or redirecting waiting messages), inside the
//! transaction of the change, so that a decision and what it acts on cannot drift apart.

use super::events::{add_events, enqueue_webhook, set_status};
use super::sql::InboundRow;
use super::submit::insert_message;
use super::{ClaimRow, Counted, Effects, Facts, Sql};
use crate::encoding;
use crate::message::{Category, MessageId, Status, rfc3339};
use crate::policy::number_change::{self, ChangeEvent, ChangeKind, NumberDecision};
use crate::policy::opt_out::{self, Keyword, SendDecision};
use crate::receipt::InboundSms;
use crate::store::shared::refusal_detail;
use crate::store::{
    AccountPolicy, Erasure, InboundOwner, NewMessage, NumberChange, OptOutSource, StoreError,
};

/// Number changes followed in a row before a message is refused instead.
const MAX_REDIRECTS: usize = 3;
/// How long an automatic keyword reply may wait for a carrier.
pub(crate) const REPLY_VALIDITY_MS: i64 = 24 * 3600 * 1000;

const OPTED_OUT_DETAIL: &str = "the recipient opted out of messages from this sender";
const HELD_DETAIL: &str =
    "held: carriers report this number unknown; clear it, or report it deactivated";

async fn facts_of<D: Sql>(
    db: &mut D,
    account: &str,
    recipient: &str,
    sender: &str,
) -> Result<Facts, StoreError> {
    let key = db.rules().number_key(recipient);
    db.facts(account, recipient, &key, sender).await
}

fn append_detail(detail: &mut Option<String>, note: &str) {
    *detail = Some(match detail.take() {
        Some(before) => format!("{before}; {note}"),
        None => note.to_owned(),
    });
}

/// Applies opt-outs, number changes and suspect holds to a message about to be stored.
pub(super) async fn evaluate<D: Sql>(
    db: &mut D,
    policy: &AccountPolicy,
    m: &mut NewMessage,
    now: i64,
) -> Result<(), StoreError> {
    if !matches!(m.status, Status::Queued | Status::Scheduled) {
        return Ok(());
    }
    // The usual case costs one statement: three indexed existence checks. The events are read
    // only for a number that has some.
    let mut facts = facts_of(db, &m.account, &m.recipient, &m.sender).await?;
    // An opt-out belongs to the person: it follows them to their new number.
    let mut opted_out = facts.opted_out;
    // A new number may itself have changed since: follow a short chain, never a loop.
    for hop in 0..=MAX_REDIRECTS {
        if !facts.changed {
            break;
        }
        let events = db.change_events(&m.account, &m.recipient).await?;
        let follow = policy.follow_number_changes && hop < MAX_REDIRECTS;
        // A change dated before the message is due counts: it would have taken effect by then.
        match number_change::decide(&events, m.consent_at, now.max(m.due_at), follow) {
            NumberDecision::Send => break,
            NumberDecision::Refuse { kind, effective_at } => {
                m.status = Status::RefusedNumberChanged;
                m.detail = Some(refusal_detail(kind, effective_at));
                return Ok(());
            }
            NumberDecision::Redirect { to, effective_at } => {
                let note = format!(
                    "redirected from {} to {to}: the number changed at {}",
                    m.recipient,
                    rfc3339(effective_at)
                );
                append_detail(&mut m.detail, &note);
                m.recipient = to;
                facts = facts_of(db, &m.account, &m.recipient, &m.sender).await?;
                opted_out |= facts.opted_out;
            }
        }
    }
    match opt_out::decide(m.category, opted_out, policy.service_messages) {
        SendDecision::Send => {}
        SendDecision::SendOverridingOptOut => append_detail(
            &mut m.detail,
            "service message sent although the recipient opted out (the account may send \
             service messages)",
        ),
        SendDecision::Refuse => {
            m.status = Status::RefusedOptedOut;
            m.detail = Some(OPTED_OUT_DETAIL.into());
            return Ok(());
        }
    }
    if facts.suspect {
        m.status = Status::HeldSuspect;
        m.detail = Some(HELD_DETAIL.into());
    }
    Ok(())
}

/// The policy again, at send time, for a claimed row: a refusal or hold, or None to send.
/// A number change here refuses; redirects are decided at submission and when a change is
/// recorded, not in the middle of sending.
pub(super) async fn recheck<D: Sql>(
    db: &mut D,
    row: &ClaimRow,
    now: i64,
) -> Result<Option<(Status, String)>, StoreError> {
    let category: Category = row
        .category
        .parse()
        .map_err(|_| StoreError::Corrupt("category".into()))?;
    let facts = facts_of(db, &row.account, &row.recipient, &row.sender).await?;
    if facts.changed {
        let events = db.change_events(&row.account, &row.recipient).await?;
        if let NumberDecision::Refuse { kind, effective_at } =
            number_change::decide(&events, row.consent_at, now, false)
        {
            let detail = refusal_detail(kind, effective_at);
            return Ok(Some((Status::RefusedNumberChanged, detail)));
        }
    }
    if opt_out::decide(category, facts.opted_out, row.service_messages) == SendDecision::Refuse {
        return Ok(Some((Status::RefusedOptedOut, OPTED_OUT_DETAIL.into())));
    }
    if facts.suspect {
        return Ok(Some((Status::HeldSuspect, HELD_DETAIL.into())));
    }
    Ok(None)
}

/// Stores a mobile-originated message for its owner, if known; a keyword in it takes effect
/// in the same transaction (before the deliver_sm is acknowledged), and the owner's webhook
/// gets a `message.inbound`.
pub(super) async fn store_inbound<D: Sql>(
    db: &mut D,
    carrier: &str,
    sms: &InboundSms,
    owner: Option<&InboundOwner>,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    let id = MessageId::new().to_string();
    let sender = crate::message::Msisdn::parse(&format!("+{}", sms.from.trim_start_matches('+')))
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|_| sms.from.clone());
    let row = InboundRow {
        id: &id,
        account: owner.map(|o| o.account.as_str()),
        carrier,
        sender: &sender,
        recipient: &sms.to,
        body: &sms.text,
        received_at: now,
    };
    db.insert_inbound(&row).await?;
    let keyword = match owner {
        Some(owner) => on_inbound(db, owner, &sender, &sms.to, &sms.text, now, effects).await?,
        None => None,
    };
    if let Some((account, Some(url))) = owner.map(|o| (&o.account, &o.webhook_url)) {
        let payload = InboundPayload {
            id: &id,
            from: &sender,
            to: &sms.to,
            text: &sms.text,
            keyword,
            received_at: rfc3339(now),
        };
        let payload = serde_json::to_string(&payload)
            .map_err(|e| StoreError::Corrupt(format!("webhook payload: {e}")))?;
        enqueue_webhook(db, account, url, &payload, now, now, effects).await?;
    }
    Ok(())
}

/// The body of a `message.inbound` webhook.
#[derive(serde::Serialize)]
#[serde(tag = "type", rename = "message.inbound")]
struct InboundPayload<'a> {
    id: &'a str,
    from: &'a str,
    to: &'a str,
    text: &'a str,
    keyword: Option<&'static str>,
    received_at: String,
}

/// Acts on a reply keyword (STOP, START, HELP ...) from `from` to our number `to`; returns the
/// keyword's name for the inbound webhook. At most one confirmation is sent: a second STOP to
/// an opted-out number gets none.
async fn on_inbound<D: Sql>(
    db: &mut D,
    owner: &InboundOwner,
    from: &str,
    to: &str,
    text: &str,
    now: i64,
    effects: &mut Effects,
) -> Result<Option<&'static str>, StoreError> {
    let Some(keyword) = opt_out::match_keyword(text, &owner.keywords) else {
        return Ok(None);
    };
    let ours = to.trim_start_matches('+');
    let by = OptOutSource {
        source: "inbound",
        actor: None,
    };
    let key = db.rules().number_key(from);
    let opted_out = db.has_opt_out(&owner.account, &key, ours).await?;
    let account = owner.account.as_str();
    let (name, reply) = match keyword {
        Keyword::OptOut | Keyword::OptOutAll => {
            let scope = (keyword == Keyword::OptOut).then_some(ours);
            add_one(db, account, from, scope, &by, &owner.policy, now, effects).await?;
            (
                "opt_out",
                (!opted_out).then_some(&owner.keywords.opt_out_reply),
            )
        }
        Keyword::OptIn => {
            let removed = remove_opt_outs(db, account, from, Some(ours), &by, now, effects).await?
                + remove_opt_outs(db, account, from, Some(""), &by, now, effects).await?;
            (
                "opt_in",
                (removed > 0).then_some(&owner.keywords.opt_in_reply),
            )
        }
        Keyword::Help => ("help", (!opted_out).then_some(&owner.keywords.help_reply)),
    };
    if let Some(text) = reply.filter(|_| from.starts_with('+')) {
        send_reply(db, owner, from, ours, text, name, now, effects).await?;
    }
    Ok(Some(name))
}

/// Queues the automatic answer to a keyword. It is a service message from the number the
/// keyword was sent to, and it skips the opt-out check: it confirms the opt-out itself.
#[allow(clippy::too_many_arguments)]
async fn send_reply<D: Sql>(
    db: &mut D,
    owner: &InboundOwner,
    to: &str,
    from: &str,
    text: &str,
    keyword: &str,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    let plan = encoding::plan(text);
    let reply = NewMessage {
        id: MessageId::new(),
        account: owner.account.clone(),
        reference: Some(format!("{keyword}_reply")),
        recipient: to.to_owned(),
        sender: from.to_owned(),
        body: text.to_owned(),
        category: Category::Transactional,
        encoding: plan.encoding,
        segments: plan.segments as u32,
        priority: 1,
        webhook_url: owner.webhook_url.clone(),
        consent_at: None,
        status: Status::Queued,
        detail: Some(format!("automatic reply to a {keyword} keyword")),
        created_at: now,
        due_at: now,
        expires_at: now + REPLY_VALIDITY_MS,
    };
    // The confirmation of an opt-out goes to an opted-out number by design.
    insert_message(db, &reply, true, now, effects).await
}

pub(super) async fn add_opt_outs<D: Sql>(
    db: &mut D,
    account: &str,
    entries: &[(String, Option<String>)],
    by: &OptOutSource,
    policy: &AccountPolicy,
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let mut added = 0;
    for (number, sender) in entries {
        let sender = sender.as_deref().map(|s| s.trim_start_matches('+'));
        if add_one(db, account, number, sender, by, policy, now, effects).await? {
            added += 1;
        }
    }
    Ok(added)
}

/// Adds one opt-out (`sender` None: every sender of the account), journals it, and refuses the
/// waiting messages it covers. False when it was there already.
#[allow(clippy::too_many_arguments)]
async fn add_one<D: Sql>(
    db: &mut D,
    account: &str,
    number: &str,
    sender: Option<&str>,
    by: &OptOutSource,
    policy: &AccountPolicy,
    now: i64,
    effects: &mut Effects,
) -> Result<bool, StoreError> {
    let key = db.rules().number_key(number);
    let scope = sender.unwrap_or("");
    if !db
        .insert_opt_out(account, &key, number, scope, by.source, now)
        .await?
    {
        return Ok(false);
    }
    db.journal_opt_out(account, &key, number, scope, "opt_out", by, now)
        .await?;
    db.policy_changed();
    effects.counted.push(Counted::OptOut {
        action: "opt_out",
        source: by.source,
    });
    // Waiting messages (not yet out) that the opt-out covers.
    let changed = db
        .refuse_opted_out(
            account,
            number,
            scope,
            policy.service_messages,
            OPTED_OUT_DETAIL,
            now,
        )
        .await?;
    add_events(
        db,
        &changed,
        Status::RefusedOptedOut,
        OPTED_OUT_DETAIL,
        now,
        effects,
    )
    .await?;
    Ok(true)
}

/// Removes opt-outs of a number: one scope, or (`sender` None) all of them.
pub(super) async fn remove_opt_outs<D: Sql>(
    db: &mut D,
    account: &str,
    number: &str,
    sender: Option<&str>,
    by: &OptOutSource,
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let key = db.rules().number_key(number);
    let removed = db.delete_opt_outs(account, &key, sender).await?;
    for scope in &removed {
        db.journal_opt_out(account, &key, number, scope, "opt_in", by, now)
            .await?;
        effects.counted.push(Counted::OptOut {
            action: "opt_in",
            source: by.source,
        });
    }
    Ok(removed.len() as u64)
}

/// Records number changes and applies those in effect to the waiting messages for the
/// number: refused, or redirected for accounts that follow changes.
pub(super) async fn add_number_changes<D: Sql>(
    db: &mut D,
    changes: &[NumberChange],
    follow: &[String],
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let mut affected = 0;
    for change in changes {
        db.insert_number_change(change, now).await?;
        effects
            .counted
            .push(Counted::NumberChange(change.kind.as_str()));
        if change.effective_at <= now {
            db.policy_changed();
        } else {
            db.number_change_dated(change.effective_at);
        }
        affected += apply_change(db, change, follow, now, effects).await?;
    }
    Ok(affected)
}

async fn apply_change<D: Sql>(
    db: &mut D,
    change: &NumberChange,
    follow: &[String],
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let waiting = db
        .waiting_for(&change.number, change.account.as_deref())
        .await?;
    let event = [ChangeEvent {
        kind: change.kind.clone(),
        effective_at: change.effective_at,
    }];
    let mut affected = 0;
    for (id, account, consent_at) in &waiting {
        let follows = follow.contains(account);
        let (status, detail) = match number_change::decide(&event, *consent_at, now, follows) {
            NumberDecision::Send => continue,
            NumberDecision::Refuse { kind, effective_at } => (
                Status::RefusedNumberChanged,
                refusal_detail(kind, effective_at),
            ),
            NumberDecision::Redirect { to, effective_at } => {
                db.set_recipient(id, &to).await?;
                let detail = format!(
                    "redirected from {} to {to}: the number changed at {}",
                    change.number,
                    rfc3339(effective_at)
                );
                (Status::Queued, detail)
            }
        };
        set_status(db, id, status, &detail, now, effects).await?;
        effects.queue |= status == Status::Queued;
        affected += 1;
    }
    Ok(affected)
}

/// Counts a permanent "unknown subscriber" result; at the threshold the number becomes
/// suspect and its waiting messages are held.
pub(super) async fn count_failure<D: Sql>(
    db: &mut D,
    number: &str,
    code: &str,
    now: i64,
    effects: &mut Effects,
) -> Result<(), StoreError> {
    let (failures, already) = db.count_failure(number, now).await?;
    if already || !number_change::is_suspect(failures, db.rules().suspect_after) {
        return Ok(());
    }
    db.mark_suspect(number).await?;
    db.policy_changed();
    tracing::warn!(
        number = %db.rules().pseudonyms.pseudonym(number),
        failures,
        code,
        "number marked suspect after repeated unknown-subscriber results; its messages are held"
    );
    let changed = db.hold_waiting(number, HELD_DETAIL, now).await?;
    add_events(db, &changed, Status::HeldSuspect, HELD_DETAIL, now, effects).await
}

/// Removes the suspect mark of `number` and queues again the messages it held, of `account`
/// only when one is given (an account never releases another's messages). Counts the mark and
/// the messages released.
pub(super) async fn clear_suspect<D: Sql>(
    db: &mut D,
    number: &str,
    account: Option<&str>,
    now: i64,
    effects: &mut Effects,
) -> Result<u64, StoreError> {
    let cleared = db.delete_suspect(number).await?;
    let detail = "the suspect number was cleared; queued again";
    let changed = db.release_held(number, account, detail, now).await?;
    add_events(db, &changed, Status::Queued, detail, now, effects).await?;
    effects.queue |= !changed.is_empty();
    Ok(cleared + changed.len() as u64)
}

/// Erases what an account holds about a number (GDPR art. 17). Opt-outs stay as suppression
/// entries under the number's pseudonym, so that the erasure does not undo the opt-out.
pub(super) async fn erase_subject<D: Sql>(
    db: &mut D,
    account: &str,
    number: &str,
) -> Result<Erasure, StoreError> {
    let key = db.rules().number_key(number);
    db.erase_subject(account, number, &key).await
}

/// A number change as stored: its kind and new number, for the statements.
pub(crate) fn change_columns(kind: &ChangeKind) -> (&'static str, Option<&str>) {
    match kind {
        ChangeKind::Changed { new_number } => ("changed", Some(new_number.as_str())),
        ChangeKind::Deactivated => ("deactivated", None),
    }
}

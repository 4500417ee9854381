//! The policy's store calls on SQLite: the facts the pure decisions of `crate::policy` need, and
//! what follows from them (refusing, holding or redirecting waiting messages). Everything runs
//! inside the writer's transaction, so a decision and what it acts on cannot drift apart.

use crate::store::shared::*;
use rusqlite::params;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::{
    ClaimRow, Tx, Wake, add_events, changed_from_row, insert_message, one, optional, rows, run,
    set_status,
};
use crate::encoding;
use crate::message::{Category, MessageId, Status, rfc3339};
use crate::policy::number_change::{self, ChangeEvent, ChangeKind, NumberDecision};
use crate::policy::opt_out::{self, Keyword, SendDecision};
use crate::store::{
    AccountPolicy, Erasure, InboundOwner, InboundView, NewMessage, NumberChange, NumberHistory,
    OptOut, OptOutSource, StoreError,
};

/// Number changes followed in a row before a message is refused instead.
const MAX_REDIRECTS: usize = 3;
/// How long an automatic keyword reply may wait for a carrier.
const REPLY_VALIDITY_MS: i64 = 24 * 3600 * 1000;

/// Applies opt-outs, number changes and suspect holds to a message about to be stored.
pub(super) fn evaluate(
    tx: &Tx,
    policy: &AccountPolicy,
    m: &mut NewMessage,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    if !matches!(m.status, Status::Queued | Status::Scheduled) {
        return Ok(());
    }
    // The usual case costs one statement: three indexed existence checks. The events are read
    // only for a number that has some.
    let mut facts = Facts::of(tx, wake, &m.account, &m.recipient, &m.sender)?;
    // An opt-out belongs to the person: it follows them to their new number.
    let mut opted_out = facts.opted_out;
    // A new number may itself have changed since: follow a short chain, never a loop.
    for hop in 0..=MAX_REDIRECTS {
        if !facts.changed {
            break;
        }
        let events = change_events(tx, &m.account, &m.recipient)?;
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
                m.detail = Some(match m.detail.take() {
                    Some(before) => format!("{before}; {note}"),
                    None => note,
                });
                m.recipient = to;
                facts = Facts::of(tx, wake, &m.account, &m.recipient, &m.sender)?;
                opted_out |= facts.opted_out;
            }
        }
    }
    match opt_out::decide(m.category, opted_out, policy.service_messages) {
        SendDecision::Send => {}
        SendDecision::SendOverridingOptOut => {
            let note = "service message sent although the recipient opted out (the account may \
                        send service messages)";
            m.detail = Some(match m.detail.take() {
                Some(before) => format!("{before}; {note}"),
                None => note.to_owned(),
            });
        }
        SendDecision::Refuse => {
            m.status = Status::RefusedOptedOut;
            m.detail = Some("the recipient opted out of messages from this sender".into());
            return Ok(());
        }
    }
    if facts.suspect {
        m.status = Status::HeldSuspect;
        m.detail = Some(HELD_DETAIL.into());
    }
    Ok(())
}

const HELD_DETAIL: &str =
    "held: carriers report this number unknown; clear it, or report it deactivated";

/// The policy again, at send time, for a claimed row (`RETURNING` id, account, recipient,
/// sender, category, consent_at, service_messages): a refusal or hold, or None to send.
/// A number change here refuses; redirects are decided at submission and when a change is
/// recorded, not in the middle of sending.
pub(super) fn recheck(
    tx: &Tx,
    row: &ClaimRow,
    now: i64,
    wake: &Wake,
) -> Result<Option<(Status, String)>, StoreError> {
    let category: Category = row
        .category
        .parse()
        .map_err(|_| StoreError::Corrupt("category".into()))?;
    let facts = Facts::of(tx, wake, &row.account, &row.recipient, &row.sender)?;
    if facts.changed {
        let events = change_events(tx, &row.account, &row.recipient)?;
        if let NumberDecision::Refuse { kind, effective_at } =
            number_change::decide(&events, row.consent_at, now, false)
        {
            let detail = refusal_detail(kind, effective_at);
            return Ok(Some((Status::RefusedNumberChanged, detail)));
        }
    }
    if opt_out::decide(category, facts.opted_out, row.service_messages) == SendDecision::Refuse {
        let detail = "the recipient opted out of messages from this sender";
        return Ok(Some((Status::RefusedOptedOut, detail.into())));
    }
    if facts.suspect {
        return Ok(Some((Status::HeldSuspect, HELD_DETAIL.into())));
    }
    Ok(None)
}

/// What the store knows about a message's recipient that the policy needs.
struct Facts {
    changed: bool,
    opted_out: bool,
    suspect: bool,
}

/// The policy's one lookup per message: (recipient, account, number key, sender). Public so
/// that the benches measure exactly this statement. The opt-out is two seeks, not `sender IN
/// ('', ?4)`: a list holding a variable is built into a temporary b-tree at every run.
pub const FACTS_QUERY: &str = "SELECT
     EXISTS (SELECT 1 FROM number_changes
             WHERE number = ?1 AND (account IS NULL OR account = ?2)) AS changed,
     EXISTS (SELECT 1 FROM opt_outs WHERE account = ?2 AND number_key = ?3 AND sender = '')
       OR EXISTS (SELECT 1 FROM opt_outs WHERE account = ?2 AND number_key = ?3 AND sender = ?4)
       AS opted_out,
     EXISTS (SELECT 1 FROM suspects WHERE number = ?1 AND suspect = 1) AS suspect";

impl Facts {
    fn of(
        tx: &Tx,
        wake: &Wake,
        account: &str,
        recipient: &str,
        sender: &str,
    ) -> Result<Facts, StoreError> {
        let key = wake.rules.number_key(recipient);
        one(
            tx,
            FACTS_QUERY,
            params![recipient, account, key, sender],
            |r| {
                Ok(Facts {
                    changed: r.get("changed")?,
                    opted_out: r.get("opted_out")?,
                    suspect: r.get("suspect")?,
                })
            },
        )
    }
}

fn change_events(tx: &Tx, account: &str, number: &str) -> Result<Vec<ChangeEvent>, StoreError> {
    let found = rows(
        tx,
        "SELECT kind, new_number, effective_at FROM number_changes
         WHERE number = ?1 AND (account IS NULL OR account = ?2)",
        params![number, account],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        },
    )?;
    found
        .into_iter()
        .map(|(kind, new_number, effective_at)| {
            Ok(ChangeEvent {
                kind: change_kind(&kind, new_number)?,
                effective_at,
            })
        })
        .collect()
}

fn is_opted_out(
    tx: &Tx,
    wake: &Wake,
    account: &str,
    number: &str,
    sender: &str,
) -> Result<bool, StoreError> {
    let found: Option<i64> = optional(
        tx,
        "SELECT 1 FROM opt_outs WHERE account = ?1 AND number_key = ?2 AND sender IN ('', ?3)",
        params![account, wake.rules.number_key(number), sender],
        |r| r.get(0),
    )?;
    Ok(found.is_some())
}

/// Acts on a reply keyword (STOP, START, HELP ...) from `from` to our number `to`; returns the
/// keyword's name for the inbound webhook. At most one confirmation is sent: a second STOP to
/// an opted-out number gets none.
pub(super) fn on_inbound(
    tx: &Tx,
    owner: &InboundOwner,
    from: &str,
    to: &str,
    text: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<Option<&'static str>, StoreError> {
    let Some(keyword) = opt_out::match_keyword(text, &owner.keywords) else {
        return Ok(None);
    };
    let ours = to.trim_start_matches('+');
    let by = OptOutSource {
        source: "inbound",
        actor: None,
    };
    let opted_out = is_opted_out(tx, wake, &owner.account, from, ours)?;
    let (name, reply) = match keyword {
        Keyword::OptOut | Keyword::OptOutAll => {
            let scope = (keyword == Keyword::OptOut).then_some(ours);
            add_one(
                tx,
                &owner.account,
                from,
                scope,
                &by,
                &owner.policy,
                now,
                wake,
            )?;
            (
                "opt_out",
                (!opted_out).then_some(&owner.keywords.opt_out_reply),
            )
        }
        Keyword::OptIn => {
            let removed = remove(tx, &owner.account, from, Some(ours), &by, now, wake)?
                + remove(tx, &owner.account, from, Some(""), &by, now, wake)?;
            (
                "opt_in",
                (removed > 0).then_some(&owner.keywords.opt_in_reply),
            )
        }
        Keyword::Help => ("help", (!opted_out).then_some(&owner.keywords.help_reply)),
    };
    if let Some(text) = reply.filter(|_| from.starts_with('+')) {
        send_reply(tx, owner, from, ours, text, name, now, wake)?;
    }
    Ok(Some(name))
}

/// Queues the automatic answer to a keyword. It is a service message from the number the
/// keyword was sent to, and it skips the opt-out check: it confirms the opt-out itself.
#[allow(clippy::too_many_arguments)]
fn send_reply(
    tx: &Tx,
    owner: &InboundOwner,
    to: &str,
    from: &str,
    text: &str,
    keyword: &str,
    now: i64,
    wake: &mut Wake,
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
    insert_message(tx, &reply, true, now, wake)
}

pub(super) fn add_opt_outs(
    tx: &Tx,
    account: &str,
    entries: &[(String, Option<String>)],
    by: &OptOutSource,
    policy: &AccountPolicy,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let mut added = 0;
    for (number, sender) in entries {
        let sender = sender.as_deref().map(|s| s.trim_start_matches('+'));
        if add_one(tx, account, number, sender, by, policy, now, wake)? {
            added += 1;
        }
    }
    Ok(added)
}

/// Adds one opt-out (`sender` None: every sender of the account), journals it, and refuses the
/// waiting messages it covers. False when it was there already.
#[allow(clippy::too_many_arguments)]
fn add_one(
    tx: &Tx,
    account: &str,
    number: &str,
    sender: Option<&str>,
    by: &OptOutSource,
    policy: &AccountPolicy,
    now: i64,
    wake: &mut Wake,
) -> Result<bool, StoreError> {
    let key = wake.rules.number_key(number);
    let scope = sender.unwrap_or("");
    let inserted = run(
        tx,
        "INSERT INTO opt_outs (account, number_key, number, sender, source, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        params![account, key, number, scope, by.source, now],
    )?;
    if inserted == 0 {
        return Ok(false);
    }
    journal(tx, account, &key, number, scope, "opt_out", by, now)?;
    wake.clock.bump();
    crate::metrics::opt_out("opt_out", by.source);
    let detail = "the recipient opted out of messages from this sender";
    // Waiting messages (not yet out) that the opt-out covers.
    let changed = rows(
        tx,
        "UPDATE messages SET status = 'refused_opted_out', detail = ?5, updated_at = ?6
         WHERE recipient = ?1 AND account = ?2
           AND (status IN ('queued', 'scheduled') OR status = 'held_suspect')
           AND (?3 = '' OR sender = ?3) AND (category = 'marketing' OR NOT ?4)
         RETURNING id, account, webhook_url, reference",
        params![number, account, scope, policy.service_messages, detail, now],
        changed_from_row,
    )?;
    add_events(tx, &changed, Status::RefusedOptedOut, detail, now, wake)?;
    Ok(true)
}

pub(super) fn remove_opt_out(
    tx: &Tx,
    account: &str,
    number: &str,
    sender: Option<&str>,
    by: &OptOutSource,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let sender = sender.map(|s| s.trim_start_matches('+'));
    remove(tx, account, number, sender, by, now, wake)
}

/// Removes opt-outs of a number: one scope, or (`sender` None) all of them.
fn remove(
    tx: &Tx,
    account: &str,
    number: &str,
    sender: Option<&str>,
    by: &OptOutSource,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let key = wake.rules.number_key(number);
    let removed = rows(
        tx,
        "DELETE FROM opt_outs WHERE account = ?1 AND number_key = ?2 AND (?3 IS NULL OR sender = ?3)
         RETURNING sender",
        params![account, key, sender],
        |r| r.get::<_, String>(0),
    )?;
    for scope in &removed {
        journal(tx, account, &key, number, scope, "opt_in", by, now)?;
        crate::metrics::opt_out("opt_in", by.source);
    }
    Ok(removed.len() as u64)
}

#[allow(clippy::too_many_arguments)]
fn journal(
    tx: &Tx,
    account: &str,
    key: &str,
    number: &str,
    sender: &str,
    action: &str,
    by: &OptOutSource,
    now: i64,
) -> Result<(), StoreError> {
    run(
        tx,
        "INSERT INTO opt_out_journal (account, number_key, number, sender, action, source, actor, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![account, key, number, sender, action, by.source, by.actor, now],
    )?;
    Ok(())
}

/// The account's opt-outs of one number (every sender scope).
pub(super) async fn opt_outs_of(
    readers: &SqlitePool,
    account: &str,
    key: &str,
) -> Result<Vec<OptOut>, StoreError> {
    let rows = sqlx::query(
        "SELECT number_key, number, sender, source, created_at FROM opt_outs
         WHERE account = ?1 AND number_key = ?2 ORDER BY sender",
    )
    .bind(account)
    .bind(key)
    .fetch_all(readers)
    .await?;
    rows.iter().map(opt_out_from_row).collect()
}

fn opt_out_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<OptOut, StoreError> {
    let sender: String = r.try_get("sender")?;
    Ok(OptOut {
        number: r.try_get("number")?,
        number_key: r.try_get("number_key")?,
        sender: (!sender.is_empty()).then_some(sender),
        source: r.try_get("source")?,
        created_at: r.try_get("created_at")?,
    })
}

/// Inbound SMS the account received from a number.
pub(super) async fn inbound_from(
    readers: &SqlitePool,
    account: &str,
    number: &str,
) -> Result<Vec<InboundView>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, recipient, body, received_at FROM inbound
         WHERE account = ?1 AND sender = ?2 ORDER BY id",
    )
    .bind(account)
    .bind(number)
    .fetch_all(readers)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(InboundView {
                id: r.try_get("id")?,
                to: r.try_get("recipient")?,
                body: r.try_get("body")?,
                received_at: r.try_get("received_at")?,
            })
        })
        .collect()
}

pub(super) async fn list_opt_outs(
    readers: &SqlitePool,
    account: &str,
    after: Option<String>,
    limit: u32,
) -> Result<Vec<OptOut>, StoreError> {
    let (after_key, after_sender) = match after.as_deref().and_then(|c| c.split_once(':')) {
        Some((key, sender)) => (key.to_owned(), sender.to_owned()),
        None => (String::new(), String::new()),
    };
    let rows = sqlx::query(
        "SELECT number_key, number, sender, source, created_at FROM opt_outs
         WHERE account = ?1 AND (number_key, sender) > (?2, ?3)
         ORDER BY number_key, sender LIMIT ?4",
    )
    .bind(account)
    .bind(after_key)
    .bind(after_sender)
    .bind(limit as i64)
    .fetch_all(readers)
    .await?;
    rows.iter().map(opt_out_from_row).collect()
}

/// Records number changes and applies those in effect to the waiting messages for the
/// number: refused, or redirected for accounts that follow changes.
pub(super) fn add_number_changes(
    tx: &Tx,
    changes: &[NumberChange],
    follow: &[String],
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let mut affected = 0;
    for change in changes {
        let new_number = match &change.kind {
            ChangeKind::Changed { new_number } => Some(new_number.as_str()),
            ChangeKind::Deactivated => None,
        };
        run(
            tx,
            "INSERT INTO number_changes (account, number, kind, new_number, effective_at, source,
                 created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                change.account,
                change.number,
                change.kind.as_str(),
                new_number,
                change.effective_at,
                change.source,
                now
            ],
        )?;
        crate::metrics::number_change(change.kind.as_str());
        if change.effective_at <= now {
            wake.clock.bump();
        } else {
            wake.clock.expect_change_at(change.effective_at);
        }
        affected += apply_change(tx, change, follow, now, wake)?;
    }
    Ok(affected)
}

fn apply_change(
    tx: &Tx,
    change: &NumberChange,
    follow: &[String],
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let waiting = rows(
        tx,
        "SELECT id, account, consent_at FROM messages
         WHERE recipient = ?1 AND (status IN ('queued', 'scheduled') OR status = 'held_suspect')
           AND (?2 IS NULL OR account = ?2)",
        params![change.number, change.account],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        },
    )?;
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
                run(
                    tx,
                    "UPDATE messages SET recipient = ?2 WHERE id = ?1",
                    params![id, to],
                )?;
                let detail = format!(
                    "redirected from {} to {to}: the number changed at {}",
                    change.number,
                    rfc3339(effective_at)
                );
                (Status::Queued, detail)
            }
        };
        set_status(tx, id, status, &detail, now, wake)?;
        wake.queue |= status == Status::Queued;
        affected += 1;
    }
    Ok(affected)
}

pub(super) async fn number_history(
    readers: &SqlitePool,
    account: &str,
    number: &str,
) -> Result<NumberHistory, StoreError> {
    let rows = sqlx::query(
        "SELECT account, kind, new_number, effective_at, source, created_at FROM number_changes
         WHERE number = ?1 AND (account IS NULL OR account = ?2) ORDER BY effective_at, id",
    )
    .bind(number)
    .bind(account)
    .fetch_all(readers)
    .await?;
    let changes = rows
        .iter()
        .map(|r| {
            let change = NumberChange {
                account: r.try_get("account")?,
                number: number.to_owned(),
                kind: change_kind(&r.try_get::<String, _>("kind")?, r.try_get("new_number")?)?,
                effective_at: r.try_get("effective_at")?,
                source: r.try_get("source")?,
            };
            Ok((change, r.try_get("created_at")?))
        })
        .collect::<Result<_, StoreError>>()?;
    let feedback = sqlx::query("SELECT failures, suspect FROM suspects WHERE number = ?1")
        .bind(number)
        .fetch_optional(readers)
        .await?;
    let (failures, suspect) = match feedback {
        Some(r) => (
            r.try_get::<i64, _>("failures")? as u32,
            r.try_get::<i64, _>("suspect")? == 1,
        ),
        None => (0, false),
    };
    Ok(NumberHistory {
        changes,
        failures,
        suspect,
    })
}

/// Counts a permanent "unknown subscriber" result; at the threshold the number becomes
/// suspect and its waiting messages are held.
pub(super) fn count_failure(
    tx: &Tx,
    number: &str,
    code: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    super::MaybeRows::set(&wake.maybe.suspects, true);
    let (failures, suspect): (i64, i64) = one(
        tx,
        "INSERT INTO suspects (number, failures, suspect, updated_at) VALUES (?1, 1, 0, ?2)
         ON CONFLICT (number) DO UPDATE SET failures = failures + 1, updated_at = ?2
         RETURNING failures, suspect",
        params![number, now],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let failures = failures as u32;
    let already = suspect == 1;
    if already || !number_change::is_suspect(failures, wake.rules.suspect_after) {
        return Ok(());
    }
    run(
        tx,
        "UPDATE suspects SET suspect = 1 WHERE number = ?1",
        [number],
    )?;
    wake.clock.bump();
    tracing::warn!(
        number = %wake.rules.pseudonyms.pseudonym(number),
        failures,
        code,
        "number marked suspect after repeated unknown-subscriber results; its messages are held"
    );
    let changed = rows(
        tx,
        "UPDATE messages SET status = 'held_suspect', detail = ?2, updated_at = ?3
         WHERE recipient = ?1 AND status IN ('queued', 'scheduled')
         RETURNING id, account, webhook_url, reference",
        params![number, HELD_DETAIL, now],
        changed_from_row,
    )?;
    add_events(tx, &changed, Status::HeldSuspect, HELD_DETAIL, now, wake)
}

/// A delivery shows the number works: failures counted so far no longer add up.
pub(super) fn reset_failures(tx: &Tx, number: &str, wake: &Wake) -> Result<(), StoreError> {
    if !super::MaybeRows::get(&wake.maybe.suspects) {
        return Ok(());
    }
    run(
        tx,
        "DELETE FROM suspects WHERE number = ?1 AND suspect = 0",
        [number],
    )?;
    Ok(())
}

/// Removes the suspect mark of `number` and queues again the messages it held, of `account`
/// only when one is given (an account never releases another's messages). Counts the mark and
/// the messages released.
pub(super) fn clear_suspect(
    tx: &Tx,
    number: &str,
    account: Option<&str>,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let cleared = run(tx, "DELETE FROM suspects WHERE number = ?1", [number])?;
    let detail = "the suspect number was cleared; queued again";
    let changed = rows(
        tx,
        "UPDATE messages SET status = 'queued', detail = ?2, due_at = ?3, updated_at = ?3
         WHERE recipient = ?1 AND status = 'held_suspect' AND (?4 IS NULL OR account = ?4)
         RETURNING id, account, webhook_url, reference",
        params![number, detail, now, account],
        changed_from_row,
    )?;
    add_events(tx, &changed, Status::Queued, detail, now, wake)?;
    wake.queue |= !changed.is_empty();
    Ok(cleared + changed.len() as u64)
}

/// Erases what an account holds about a number (GDPR art. 17). Opt-outs stay as suppression
/// entries under the number's pseudonym, so that the erasure does not undo the opt-out.
pub(super) fn erase_subject(
    tx: &Tx,
    account: &str,
    number: &str,
    wake: &mut Wake,
) -> Result<Erasure, StoreError> {
    run(
        tx,
        "DELETE FROM events WHERE message_id IN
             (SELECT id FROM messages WHERE account = ?1 AND recipient = ?2)",
        [account, number],
    )?;
    run(
        tx,
        "DELETE FROM parts WHERE message_id IN
             (SELECT id FROM messages WHERE account = ?1 AND recipient = ?2)",
        [account, number],
    )?;
    // Webhooks not yet posted may carry the number (inbound `from`) or its messages.
    run(
        tx,
        "DELETE FROM webhooks WHERE account = ?1
           AND (json_extract(payload, '$.from') = ?2
                OR json_extract(payload, '$.message_id') IN
                   (SELECT id FROM messages WHERE account = ?1 AND recipient = ?2))",
        [account, number],
    )?;
    let messages = run(
        tx,
        "DELETE FROM messages WHERE account = ?1 AND recipient = ?2",
        [account, number],
    )?;
    let inbound = run(
        tx,
        "DELETE FROM inbound WHERE account = ?1 AND sender = ?2",
        [account, number],
    )?;
    // Number changes stay: like an opt-out, they protect whoever holds the number now.
    let number_changes_kept: i64 = one(
        tx,
        "SELECT COUNT(*) FROM number_changes WHERE account = ?1 AND number = ?2",
        [account, number],
        |r| r.get(0),
    )?;
    let key = wake.rules.number_key(number);
    let suppressions_kept = run(
        tx,
        "UPDATE opt_outs SET number = NULL WHERE account = ?1 AND number_key = ?2",
        [account, key.as_str()],
    )?;
    run(
        tx,
        "UPDATE opt_out_journal SET number = NULL WHERE account = ?1 AND number_key = ?2",
        [account, key.as_str()],
    )?;
    Ok(Erasure {
        messages,
        inbound,
        number_changes_kept: number_changes_kept as u64,
        suppressions_kept,
    })
}

//! The policy's store calls on PostgreSQL (as `sqlite/policy.rs` does them on SQLite): the facts the pure decisions of `crate::policy` need, and
//! what follows from them (refusing, holding or redirecting waiting messages). Everything runs
//! inside the writer's transaction, so a decision and what it acts on cannot drift apart.

use crate::store::shared::*;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};

use super::{Tx, Wake, add_events, insert_message, set_status};
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
pub(super) async fn evaluate(
    tx: &mut Tx<'_>,
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
    let mut facts = Facts::of(tx, wake, &m.account, &m.recipient, &m.sender).await?;
    // An opt-out belongs to the person: it follows them to their new number.
    let mut opted_out = facts.opted_out;
    // A new number may itself have changed since: follow a short chain, never a loop.
    for hop in 0..=MAX_REDIRECTS {
        if !facts.changed {
            break;
        }
        let events = change_events(tx, &m.account, &m.recipient).await?;
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
                facts = Facts::of(tx, wake, &m.account, &m.recipient, &m.sender).await?;
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
pub(super) async fn recheck(
    tx: &mut Tx<'_>,
    row: &PgRow,
    now: i64,
    wake: &Wake,
) -> Result<Option<(Status, String)>, StoreError> {
    let category: Category = row
        .try_get::<String, _>("category")?
        .parse()
        .map_err(|_| StoreError::Corrupt("category".into()))?;
    let account: String = row.try_get("account")?;
    let recipient: String = row.try_get("recipient")?;
    let sender: String = row.try_get("sender")?;
    let facts = Facts::of(tx, wake, &account, &recipient, &sender).await?;
    if facts.changed {
        let events = change_events(tx, &account, &recipient).await?;
        let consent_at: Option<i64> = row.try_get("consent_at")?;
        if let NumberDecision::Refuse { kind, effective_at } =
            number_change::decide(&events, consent_at, now, false)
        {
            let detail = refusal_detail(kind, effective_at);
            return Ok(Some((Status::RefusedNumberChanged, detail)));
        }
    }
    let service: bool = row.try_get("service_messages")?;
    if opt_out::decide(category, facts.opted_out, service) == SendDecision::Refuse {
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
/// that the benches measure exactly this statement.
pub const FACTS_QUERY: &str = "SELECT
     EXISTS (SELECT 1 FROM number_changes
             WHERE number = $1 AND (account IS NULL OR account = $2)) AS changed,
     EXISTS (SELECT 1 FROM opt_outs
             WHERE account = $2 AND number_key = $3 AND sender IN ('', $4)) AS opted_out,
     EXISTS (SELECT 1 FROM suspects WHERE number = $1 AND suspect) AS suspect";

impl Facts {
    async fn of(
        tx: &mut Tx<'_>,
        wake: &Wake,
        account: &str,
        recipient: &str,
        sender: &str,
    ) -> Result<Facts, StoreError> {
        let row = sqlx::query(FACTS_QUERY)
            .bind(recipient)
            .bind(account)
            .bind(wake.rules.number_key(recipient))
            .bind(sender)
            .fetch_one(&mut **tx)
            .await?;
        Ok(Facts {
            changed: row.try_get("changed")?,
            opted_out: row.try_get("opted_out")?,
            suspect: row.try_get("suspect")?,
        })
    }
}

async fn change_events(
    tx: &mut Tx<'_>,
    account: &str,
    number: &str,
) -> Result<Vec<ChangeEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT kind, new_number, effective_at FROM number_changes
         WHERE number = $1 AND (account IS NULL OR account = $2)",
    )
    .bind(number)
    .bind(account)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ChangeEvent {
                kind: change_kind(&r.try_get::<String, _>("kind")?, r.try_get("new_number")?)?,
                effective_at: r.try_get("effective_at")?,
            })
        })
        .collect()
}

async fn is_opted_out(
    tx: &mut Tx<'_>,
    wake: &Wake,
    account: &str,
    number: &str,
    sender: &str,
) -> Result<bool, StoreError> {
    let found: Option<i64> = sqlx::query_scalar(
        "SELECT 1::BIGINT FROM opt_outs WHERE account = $1 AND number_key = $2 AND sender IN ('', $3)",
    )
    .bind(account)
    .bind(wake.rules.number_key(number))
    .bind(sender)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(found.is_some())
}

/// Acts on a reply keyword (STOP, START, HELP ...) from `from` to our number `to`; returns the
/// keyword's name for the inbound webhook. At most one confirmation is sent: a second STOP to
/// an opted-out number gets none.
pub(super) async fn on_inbound(
    tx: &mut Tx<'_>,
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
    let opted_out = is_opted_out(tx, wake, &owner.account, from, ours).await?;
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
            )
            .await?;
            (
                "opt_out",
                (!opted_out).then_some(&owner.keywords.opt_out_reply),
            )
        }
        Keyword::OptIn => {
            let removed = remove(tx, &owner.account, from, Some(ours), &by, now, wake).await?
                + remove(tx, &owner.account, from, Some(""), &by, now, wake).await?;
            (
                "opt_in",
                (removed > 0).then_some(&owner.keywords.opt_in_reply),
            )
        }
        Keyword::Help => ("help", (!opted_out).then_some(&owner.keywords.help_reply)),
    };
    if let Some(text) = reply.filter(|_| from.starts_with('+')) {
        send_reply(tx, owner, from, ours, text, name, now, wake).await?;
    }
    Ok(Some(name))
}

/// Queues the automatic answer to a keyword. It is a service message from the number the
/// keyword was sent to, and it skips the opt-out check: it confirms the opt-out itself.
#[allow(clippy::too_many_arguments)]
async fn send_reply(
    tx: &mut Tx<'_>,
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
    insert_message(tx, &reply, true, now, wake).await
}

pub(super) async fn add_opt_outs(
    tx: &mut Tx<'_>,
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
        if add_one(tx, account, number, sender, by, policy, now, wake).await? {
            added += 1;
        }
    }
    Ok(added)
}

/// Adds one opt-out (`sender` None: every sender of the account), journals it, and refuses the
/// waiting messages it covers. False when it was there already.
#[allow(clippy::too_many_arguments)]
async fn add_one(
    tx: &mut Tx<'_>,
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
    let inserted = sqlx::query(
        "INSERT INTO opt_outs (account, number_key, number, sender, source, created_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(account)
    .bind(&key)
    .bind(number)
    .bind(scope)
    .bind(by.source)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    journal(tx, account, &key, number, scope, "opt_out", by, now).await?;
    wake.bump();
    crate::metrics::opt_out("opt_out", by.source);
    let detail = "the recipient opted out of messages from this sender";
    // Waiting messages (not yet out) that the opt-out covers.
    let rows = sqlx::query(
        "UPDATE messages SET status = 'refused_opted_out', detail = $5, updated_at = $6
         WHERE recipient = $1 AND account = $2
           AND status IN ('queued', 'scheduled', 'held_suspect')
           AND ($3 = '' OR sender = $3) AND (category = 'marketing' OR NOT $4)
         RETURNING id, account, webhook_url, reference",
    )
    .bind(number)
    .bind(account)
    .bind(scope)
    .bind(policy.service_messages)
    .bind(detail)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    add_events(tx, &rows, Status::RefusedOptedOut, detail, now, wake).await?;
    Ok(true)
}

pub(super) async fn remove_opt_out(
    tx: &mut Tx<'_>,
    account: &str,
    number: &str,
    sender: Option<&str>,
    by: &OptOutSource,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let sender = sender.map(|s| s.trim_start_matches('+'));
    remove(tx, account, number, sender, by, now, wake).await
}

/// Removes opt-outs of a number: one scope, or (`sender` None) all of them.
async fn remove(
    tx: &mut Tx<'_>,
    account: &str,
    number: &str,
    sender: Option<&str>,
    by: &OptOutSource,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let key = wake.rules.number_key(number);
    let removed = sqlx::query(
        "DELETE FROM opt_outs WHERE account = $1 AND number_key = $2 AND ($3 IS NULL OR sender = $3)
         RETURNING sender",
    )
    .bind(account)
    .bind(&key)
    .bind(sender)
    .fetch_all(&mut **tx)
    .await?;
    for row in &removed {
        let scope: String = row.try_get("sender")?;
        journal(tx, account, &key, number, &scope, "opt_in", by, now).await?;
        crate::metrics::opt_out("opt_in", by.source);
    }
    Ok(removed.len() as u64)
}

#[allow(clippy::too_many_arguments)]
async fn journal(
    tx: &mut Tx<'_>,
    account: &str,
    key: &str,
    number: &str,
    sender: &str,
    action: &str,
    by: &OptOutSource,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO opt_out_journal (account, number_key, number, sender, action, source, actor, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(account)
    .bind(key)
    .bind(number)
    .bind(sender)
    .bind(action)
    .bind(by.source)
    .bind(&by.actor)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The account's opt-outs of one number (every sender scope).
pub(super) async fn opt_outs_of(
    readers: &PgPool,
    account: &str,
    key: &str,
) -> Result<Vec<OptOut>, StoreError> {
    let rows = sqlx::query(
        "SELECT number_key, number, sender, source, created_at FROM opt_outs
         WHERE account = $1 AND number_key = $2 ORDER BY sender",
    )
    .bind(account)
    .bind(key)
    .fetch_all(readers)
    .await?;
    rows.iter().map(opt_out_from_row).collect()
}

fn opt_out_from_row(r: &PgRow) -> Result<OptOut, StoreError> {
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
    readers: &PgPool,
    account: &str,
    number: &str,
) -> Result<Vec<InboundView>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, recipient, body, received_at FROM inbound
         WHERE account = $1 AND sender = $2 ORDER BY id",
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
    readers: &PgPool,
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
         WHERE account = $1 AND (number_key, sender) > ($2, $3)
         ORDER BY number_key, sender LIMIT $4",
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
pub(super) async fn add_number_changes(
    tx: &mut Tx<'_>,
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
        sqlx::query(
            "INSERT INTO number_changes (account, number, kind, new_number, effective_at, source,
                 created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&change.account)
        .bind(&change.number)
        .bind(change.kind.as_str())
        .bind(new_number)
        .bind(change.effective_at)
        .bind(&change.source)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        crate::metrics::number_change(change.kind.as_str());
        if change.effective_at <= now {
            wake.bump();
        } else {
            wake.expect_change_at(change.effective_at);
        }
        affected += apply_change(tx, change, follow, now, wake).await?;
    }
    Ok(affected)
}

async fn apply_change(
    tx: &mut Tx<'_>,
    change: &NumberChange,
    follow: &[String],
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let waiting = sqlx::query(
        "SELECT id, account, consent_at FROM messages
         WHERE recipient = $1 AND status IN ('queued', 'scheduled', 'held_suspect')
           AND ($2 IS NULL OR account = $2)",
    )
    .bind(&change.number)
    .bind(&change.account)
    .fetch_all(&mut **tx)
    .await?;
    let event = [ChangeEvent {
        kind: change.kind.clone(),
        effective_at: change.effective_at,
    }];
    let mut affected = 0;
    for row in &waiting {
        let id: String = row.try_get("id")?;
        let account: String = row.try_get("account")?;
        let consent_at: Option<i64> = row.try_get("consent_at")?;
        let follows = follow.contains(&account);
        let (status, detail) = match number_change::decide(&event, consent_at, now, follows) {
            NumberDecision::Send => continue,
            NumberDecision::Refuse { kind, effective_at } => (
                Status::RefusedNumberChanged,
                refusal_detail(kind, effective_at),
            ),
            NumberDecision::Redirect { to, effective_at } => {
                sqlx::query("UPDATE messages SET recipient = $2 WHERE id = $1")
                    .bind(&id)
                    .bind(&to)
                    .execute(&mut **tx)
                    .await?;
                let detail = format!(
                    "redirected from {} to {to}: the number changed at {}",
                    change.number,
                    rfc3339(effective_at)
                );
                (Status::Queued, detail)
            }
        };
        set_status(tx, &id, status, &detail, now, wake).await?;
        wake.queue |= status == Status::Queued;
        affected += 1;
    }
    Ok(affected)
}

pub(super) async fn number_history(
    readers: &PgPool,
    account: &str,
    number: &str,
) -> Result<NumberHistory, StoreError> {
    let rows = sqlx::query(
        "SELECT account, kind, new_number, effective_at, source, created_at FROM number_changes
         WHERE number = $1 AND (account IS NULL OR account = $2) ORDER BY effective_at, id",
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
    let feedback = sqlx::query("SELECT failures, suspect FROM suspects WHERE number = $1")
        .bind(number)
        .fetch_optional(readers)
        .await?;
    let (failures, suspect) = match feedback {
        Some(r) => (
            r.try_get::<i64, _>("failures")? as u32,
            r.try_get::<bool, _>("suspect")?,
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
pub(super) async fn count_failure(
    tx: &mut Tx<'_>,
    number: &str,
    code: &str,
    now: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let row = sqlx::query(
        "INSERT INTO suspects (number, failures, suspect, updated_at) VALUES ($1, 1, FALSE, $2)
         ON CONFLICT (number) DO UPDATE SET failures = suspects.failures + 1, updated_at = $2
         RETURNING failures, suspect",
    )
    .bind(number)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    let failures = row.try_get::<i64, _>("failures")? as u32;
    let already: bool = row.try_get("suspect")?;
    if already || !number_change::is_suspect(failures, wake.rules.suspect_after) {
        return Ok(());
    }
    sqlx::query("UPDATE suspects SET suspect = TRUE WHERE number = $1")
        .bind(number)
        .execute(&mut **tx)
        .await?;
    wake.bump();
    tracing::warn!(
        number = %wake.rules.pseudonyms.pseudonym(number),
        failures,
        code,
        "number marked suspect after repeated unknown-subscriber results; its messages are held"
    );
    let rows = sqlx::query(
        "UPDATE messages SET status = 'held_suspect', detail = $2, updated_at = $3
         WHERE recipient = $1 AND status IN ('queued', 'scheduled')
         RETURNING id, account, webhook_url, reference",
    )
    .bind(number)
    .bind(HELD_DETAIL)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    add_events(tx, &rows, Status::HeldSuspect, HELD_DETAIL, now, wake).await
}

/// A delivery shows the number works: failures counted so far no longer add up.
pub(super) async fn reset_failures(tx: &mut Tx<'_>, number: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM suspects WHERE number = $1 AND NOT suspect")
        .bind(number)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Removes the suspect mark of `number` and queues again the messages it held, of `account`
/// only when one is given (an account never releases another's messages). Counts the mark and
/// the messages released.
pub(super) async fn clear_suspect(
    tx: &mut Tx<'_>,
    number: &str,
    account: Option<&str>,
    now: i64,
    wake: &mut Wake,
) -> Result<u64, StoreError> {
    let cleared = sqlx::query("DELETE FROM suspects WHERE number = $1")
        .bind(number)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    let detail = "the suspect number was cleared; queued again";
    let rows = sqlx::query(
        "UPDATE messages SET status = 'queued', detail = $2, due_at = $3, updated_at = $3
         WHERE recipient = $1 AND status = 'held_suspect' AND ($4::TEXT IS NULL OR account = $4)
         RETURNING id, account, webhook_url, reference",
    )
    .bind(number)
    .bind(detail)
    .bind(now)
    .bind(account)
    .fetch_all(&mut **tx)
    .await?;
    add_events(tx, &rows, Status::Queued, detail, now, wake).await?;
    wake.queue |= !rows.is_empty();
    Ok(cleared + rows.len() as u64)
}

/// Erases what an account holds about a number (GDPR art. 17). Opt-outs stay as suppression
/// entries under the number's pseudonym, so that the erasure does not undo the opt-out.
pub(super) async fn erase_subject(
    tx: &mut Tx<'_>,
    account: &str,
    number: &str,
    wake: &mut Wake,
) -> Result<Erasure, StoreError> {
    sqlx::query(
        "DELETE FROM events WHERE message_id IN
             (SELECT id FROM messages WHERE account = $1 AND recipient = $2)",
    )
    .bind(account)
    .bind(number)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "DELETE FROM parts WHERE message_id IN
             (SELECT id FROM messages WHERE account = $1 AND recipient = $2)",
    )
    .bind(account)
    .bind(number)
    .execute(&mut **tx)
    .await?;
    // Webhooks not yet posted may carry the number (inbound `from`) or its messages.
    sqlx::query(
        "DELETE FROM webhooks WHERE account = $1
           AND (payload::jsonb ->> 'from' = $2
                OR payload::jsonb ->> 'message_id' IN
                   (SELECT id FROM messages WHERE account = $1 AND recipient = $2))",
    )
    .bind(account)
    .bind(number)
    .execute(&mut **tx)
    .await?;
    let messages = sqlx::query("DELETE FROM messages WHERE account = $1 AND recipient = $2")
        .bind(account)
        .bind(number)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    let inbound = sqlx::query("DELETE FROM inbound WHERE account = $1 AND sender = $2")
        .bind(account)
        .bind(number)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    // Number changes stay: like an opt-out, they protect whoever holds the number now.
    let number_changes_kept: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM number_changes WHERE account = $1 AND number = $2",
    )
    .bind(account)
    .bind(number)
    .fetch_one(&mut **tx)
    .await?;
    let key = wake.rules.number_key(number);
    let suppressions_kept =
        sqlx::query("UPDATE opt_outs SET number = NULL WHERE account = $1 AND number_key = $2")
            .bind(account)
            .bind(&key)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    sqlx::query("UPDATE opt_out_journal SET number = NULL WHERE account = $1 AND number_key = $2")
        .bind(account)
        .bind(&key)
        .execute(&mut **tx)
        .await?;
    Ok(Erasure {
        messages,
        inbound,
        number_changes_kept: number_changes_kept as u64,
        suppressions_kept,
    })
}

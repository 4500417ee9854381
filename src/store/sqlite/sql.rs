//! The store's statements on SQLite ([`Sql`]), run by the writer thread inside its batch's
//! transaction. Each completes before it returns: the rules in `store::domain` run here under
//! `block_on` without ever waiting.
//!
//! Some statements are shaped for SQLite's planner: a SELECT and an UPDATE rather than
//! `UPDATE ... RETURNING` for one row (RETURNING collects its rows in a temporary b-tree), lists
//! of at most two constants, `MAX(updated_at)` rather than a sort, `LIMIT +?n` (see [`Tx`]).

use rusqlite::params;

use super::{EventIds, MaybeRows, PolicyClock, Tx, one, optional, rows, run};
use crate::message::Status;
use crate::policy::number_change::ChangeEvent;
use crate::receipt::{Receipt, normalize_id};
use crate::store::domain::{
    ChangedRow, ClaimRow, Facts, NewEvent, OutboxRow, PartRow, Sql, Target,
    sql::{InboundRow, RollupRow},
};
use crate::store::handoff::Handoff;
use crate::store::shared::{change_kind, parse_id};
use crate::store::{
    Erasure, IdempotentAnswer, NewMessage, NumberChange, OptOutSource, ParkedReceipt, ReceiptQuery,
    StoreError, StoreRules, WebhookCopy, WebhookJob,
};

/// A backstop: parked receipts older than this are dropped unseen. Each carrier's sweeper
/// gives them up (and lists them) after its `unmatched_after`, at most 24 h, so an hour later.
const EARLY_RECEIPT_TTL_MS: i64 = 25 * 3600 * 1000;

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

/// The writer's transaction with what its statements share.
pub(super) struct SqliteTx<'a, 'c> {
    pub tx: &'a Tx<'c>,
    pub rules: &'a StoreRules,
    pub clock: &'a PolicyClock,
    pub maybe: &'a MaybeRows,
    pub event_ids: &'a EventIds,
    pub handoff: &'a Handoff,
}

fn target_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Target> {
    Ok(Target {
        account: r.get("account")?,
        url: r.get("webhook_url")?,
        reference: r.get("reference")?,
    })
}

fn target_and_recipient(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Target, String)> {
    Ok((target_from_row(r)?, r.get("recipient")?))
}

fn changed_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChangedRow> {
    Ok(ChangedRow {
        id: r.get("id")?,
        target: target_from_row(r)?,
    })
}

/// Writes a webhook to the outbox (also used by the recovery at start-up).
pub(super) fn insert_outbox(tx: &Tx, row: &OutboxRow<'_>) -> Result<(), StoreError> {
    run(
        tx,
        "INSERT INTO webhooks (account, url, payload, attempts, created_at, due_at, last_error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            row.account,
            row.url,
            row.payload,
            row.attempts,
            row.created_at,
            row.due_at,
            row.last_error
        ],
    )?;
    Ok(())
}

impl Sql for SqliteTx<'_, '_> {
    fn rules(&self) -> &StoreRules {
        self.rules
    }

    fn policy_generation(&self) -> i64 {
        self.clock.current()
    }

    fn policy_changed(&mut self) {
        self.clock.bump();
    }

    fn number_change_dated(&mut self, effective_at: i64) {
        self.clock.expect_change_at(effective_at);
    }

    async fn policy_tick(&mut self, now: i64) -> Result<(), StoreError> {
        self.clock.tick(now);
        Ok(())
    }

    fn handoff(&self) -> Option<&Handoff> {
        Some(self.handoff)
    }

    async fn idempotent_answer(
        &mut self,
        account: &str,
        key: &str,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        optional(
            self.tx,
            "SELECT key, request_hash, status_code, answer FROM idempotency
             WHERE account = ?1 AND key = ?2",
            params![account, key],
            |r| {
                Ok(IdempotentAnswer {
                    key: r.get(0)?,
                    request_hash: r.get(1)?,
                    status_code: r.get::<_, i64>(2)? as u16,
                    answer: r.get(3)?,
                })
            },
        )
    }

    async fn insert_idempotent_answer(
        &mut self,
        account: &str,
        answer: &IdempotentAnswer,
        now: i64,
    ) -> Result<(), StoreError> {
        run(
            self.tx,
            "INSERT INTO idempotency (account, key, request_hash, status_code, answer, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                account,
                answer.key,
                answer.request_hash,
                answer.status_code as i64,
                answer.answer,
                now
            ],
        )?;
        Ok(())
    }

    async fn insert_message(
        &mut self,
        m: &NewMessage,
        service_messages: bool,
    ) -> Result<(), StoreError> {
        run(
            self.tx,
            "INSERT INTO messages (id, account, reference, recipient, sender, body, category,
                 encoding, segments, priority, webhook_url, consent_at, status, detail,
                 created_at, updated_at, due_at, expires_at, service_messages, policy_gen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15, ?16,
                     ?17, ?18, ?19)",
            params![
                m.id.to_string(),
                m.account,
                m.reference,
                m.recipient,
                m.sender,
                m.body,
                m.category.as_str(),
                m.encoding.as_str(),
                m.segments as i64,
                m.priority as i64,
                m.webhook_url,
                m.consent_at,
                m.status.as_str(),
                m.detail,
                m.created_at,
                m.due_at,
                m.expires_at,
                service_messages,
                self.clock.current(),
            ],
        )?;
        Ok(())
    }

    async fn facts(
        &mut self,
        account: &str,
        recipient: &str,
        key: &str,
        sender: &str,
    ) -> Result<Facts, StoreError> {
        one(
            self.tx,
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

    async fn change_events(
        &mut self,
        account: &str,
        number: &str,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let found = rows(
            self.tx,
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

    async fn insert_opt_out(
        &mut self,
        account: &str,
        key: &str,
        number: &str,
        scope: &str,
        source: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let inserted = run(
            self.tx,
            "INSERT INTO opt_outs (account, number_key, number, sender, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            params![account, key, number, scope, source, now],
        )?;
        Ok(inserted > 0)
    }

    async fn delete_opt_outs(
        &mut self,
        account: &str,
        key: &str,
        scope: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        rows(
            self.tx,
            "DELETE FROM opt_outs
             WHERE account = ?1 AND number_key = ?2 AND (?3 IS NULL OR sender = ?3)
             RETURNING sender",
            params![account, key, scope],
            |r| r.get::<_, String>(0),
        )
    }

    async fn journal_opt_out(
        &mut self,
        account: &str,
        key: &str,
        number: &str,
        scope: &str,
        action: &str,
        by: &OptOutSource,
        now: i64,
    ) -> Result<(), StoreError> {
        run(
            self.tx,
            "INSERT INTO opt_out_journal (account, number_key, number, sender, action, source,
                 actor, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                account, key, number, scope, action, by.source, by.actor, now
            ],
        )?;
        Ok(())
    }

    async fn refuse_opted_out(
        &mut self,
        account: &str,
        number: &str,
        scope: &str,
        service_messages: bool,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        rows(
            self.tx,
            "UPDATE messages SET status = 'refused_opted_out', detail = ?5, updated_at = ?6
             WHERE recipient = ?1 AND account = ?2
               AND (status IN ('queued', 'scheduled') OR status = 'held_suspect')
               AND (?3 = '' OR sender = ?3) AND (category = 'marketing' OR NOT ?4)
             RETURNING id, account, webhook_url, reference",
            params![number, account, scope, service_messages, detail, now],
            changed_from_row,
        )
    }

    async fn insert_number_change(
        &mut self,
        change: &NumberChange,
        now: i64,
    ) -> Result<(), StoreError> {
        let (kind, new_number) = crate::store::domain::change_columns(&change.kind);
        run(
            self.tx,
            "INSERT INTO number_changes (account, number, kind, new_number, effective_at, source,
                 created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                change.account,
                change.number,
                kind,
                new_number,
                change.effective_at,
                change.source,
                now
            ],
        )?;
        Ok(())
    }

    async fn waiting_for(
        &mut self,
        number: &str,
        account: Option<&str>,
    ) -> Result<Vec<(String, String, Option<i64>)>, StoreError> {
        rows(
            self.tx,
            "SELECT id, account, consent_at FROM messages
             WHERE recipient = ?1 AND (status IN ('queued', 'scheduled') OR status = 'held_suspect')
               AND (?2 IS NULL OR account = ?2)",
            params![number, account],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    async fn set_recipient(&mut self, id: &str, recipient: &str) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE messages SET recipient = ?2 WHERE id = ?1",
            params![id, recipient],
        )?;
        Ok(())
    }

    async fn count_failure(&mut self, number: &str, now: i64) -> Result<(u32, bool), StoreError> {
        MaybeRows::set(&self.maybe.suspects, true);
        let (failures, suspect): (i64, i64) = one(
            self.tx,
            "INSERT INTO suspects (number, failures, suspect, updated_at) VALUES (?1, 1, 0, ?2)
             ON CONFLICT (number) DO UPDATE SET failures = failures + 1, updated_at = ?2
             RETURNING failures, suspect",
            params![number, now],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((failures as u32, suspect == 1))
    }

    async fn mark_suspect(&mut self, number: &str) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE suspects SET suspect = 1 WHERE number = ?1",
            [number],
        )?;
        Ok(())
    }

    async fn hold_waiting(
        &mut self,
        number: &str,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        rows(
            self.tx,
            "UPDATE messages SET status = 'held_suspect', detail = ?2, updated_at = ?3
             WHERE recipient = ?1 AND status IN ('queued', 'scheduled')
             RETURNING id, account, webhook_url, reference",
            params![number, detail, now],
            changed_from_row,
        )
    }

    async fn reset_failures(&mut self, number: &str) -> Result<(), StoreError> {
        // Most deliveries are to numbers that never failed: no statement while none did.
        if !MaybeRows::get(&self.maybe.suspects) {
            return Ok(());
        }
        run(
            self.tx,
            "DELETE FROM suspects WHERE number = ?1 AND suspect = 0",
            [number],
        )?;
        Ok(())
    }

    async fn delete_suspect(&mut self, number: &str) -> Result<u64, StoreError> {
        run(self.tx, "DELETE FROM suspects WHERE number = ?1", [number])
    }

    async fn release_held(
        &mut self,
        number: &str,
        account: Option<&str>,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        rows(
            self.tx,
            "UPDATE messages SET status = 'queued', detail = ?2, due_at = ?3, updated_at = ?3
             WHERE recipient = ?1 AND status = 'held_suspect' AND (?4 IS NULL OR account = ?4)
             RETURNING id, account, webhook_url, reference",
            params![number, detail, now, account],
            changed_from_row,
        )
    }

    async fn erase_subject(
        &mut self,
        account: &str,
        number: &str,
        key: &str,
    ) -> Result<Erasure, StoreError> {
        let tx = self.tx;
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
        let number_changes_kept: i64 = one(
            tx,
            "SELECT COUNT(*) FROM number_changes WHERE account = ?1 AND number = ?2",
            [account, number],
            |r| r.get(0),
        )?;
        let suppressions_kept = run(
            tx,
            "UPDATE opt_outs SET number = NULL WHERE account = ?1 AND number_key = ?2",
            [account, key],
        )?;
        run(
            tx,
            "UPDATE opt_out_journal SET number = NULL WHERE account = ?1 AND number_key = ?2",
            [account, key],
        )?;
        Ok(Erasure {
            messages,
            inbound,
            number_changes_kept: number_changes_kept as u64,
            suppressions_kept,
        })
    }

    async fn set_status(
        &mut self,
        id: &str,
        status: Status,
        detail: &str,
        now: i64,
    ) -> Result<ChangedRow, StoreError> {
        one(
            self.tx,
            "UPDATE messages SET status = ?2, detail = ?3, locked_until = NULL, updated_at = ?4
             WHERE id = ?1
             RETURNING id, account, webhook_url, reference",
            params![id, status.as_str(), detail, now],
            changed_from_row,
        )
    }

    async fn insert_event(&mut self, event: &NewEvent<'_>, hook: bool) -> Result<i64, StoreError> {
        let id = self.event_ids.next();
        run(
            self.tx,
            "INSERT INTO events (id, message_id, at, status, detail, error_code, hook)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                id,
                event.message_id,
                event.at,
                event.status.as_str(),
                event.detail,
                event.error_code,
                hook.then_some(1)
            ],
        )?;
        Ok(id)
    }

    async fn insert_events(&mut self, events: &[NewEvent<'_>]) -> Result<(), StoreError> {
        for event in events {
            self.insert_event(event, false).await?;
        }
        Ok(())
    }

    async fn claim_due(
        &mut self,
        limit: usize,
        lease_until: i64,
        now: i64,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        self.maybe.refresh(self.tx)?;
        rows(
            self.tx,
            "UPDATE messages SET status = 'sending', locked_until = ?1, attempts = attempts + 1,
                 updated_at = ?2
             WHERE id IN (SELECT id FROM messages
                          WHERE status IN ('queued', 'scheduled') AND due_at <= ?2
                          ORDER BY priority DESC, due_at LIMIT +?3)
             RETURNING id, account, recipient, sender, body, encoding, segments, attempts,
                       expires_at, category, consent_at, service_messages, policy_gen, priority",
            params![lease_until, now, limit as i64],
            |r| {
                Ok(ClaimRow {
                    id: r.get(0)?,
                    account: r.get(1)?,
                    recipient: r.get(2)?,
                    sender: r.get(3)?,
                    body: r.get(4)?,
                    encoding: r.get(5)?,
                    segments: r.get(6)?,
                    attempts: r.get(7)?,
                    expires_at: r.get(8)?,
                    category: r.get(9)?,
                    consent_at: r.get(10)?,
                    service_messages: r.get(11)?,
                    policy_gen: r.get(12)?,
                    priority: r.get(13)?,
                })
            },
        )
    }

    async fn accepted_parts(&mut self, id: &str) -> Result<Vec<u32>, StoreError> {
        let parts = rows(
            self.tx,
            "SELECT part FROM parts WHERE message_id = ?1",
            [id],
            |r| r.get::<_, i64>(0),
        )?;
        Ok(parts.into_iter().map(|p| p as u32).collect())
    }

    async fn record_part(
        &mut self,
        id: &str,
        part: u32,
        carrier: &str,
        carrier_message_id: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        run(
            self.tx,
            "INSERT INTO parts (message_id, part, carrier, carrier_message_id, state, updated_at,
                 submitted_id)
             VALUES (?1, ?2, ?3, ?4, 'submitted', ?5, ?6)
             ON CONFLICT (message_id, part) DO UPDATE SET carrier = ?3,
                 carrier_message_id = ?4, state = 'submitted', updated_at = ?5,
                 submitted_id = ?6, queried_at = NULL",
            params![
                id,
                part as i64,
                carrier,
                normalize_id(carrier_message_id),
                now,
                carrier_message_id
            ],
        )?;
        Ok(())
    }

    async fn finish_attempt(
        &mut self,
        id: &str,
        status: Status,
        detail: Option<&str>,
        error_code: Option<&str>,
        carrier: Option<&str>,
        due_at: Option<i64>,
        now: i64,
    ) -> Result<Option<(Target, String)>, StoreError> {
        let row = optional(
            self.tx,
            "SELECT account, webhook_url, reference, recipient FROM messages
             WHERE id = ?1 AND status = 'sending'",
            [id],
            target_and_recipient,
        )?;
        if row.is_some() {
            run(
                self.tx,
                "UPDATE messages SET status = ?2, detail = ?3,
                     error_code = COALESCE(?4, error_code), carrier = COALESCE(?5, carrier),
                     due_at = COALESCE(?6, due_at), locked_until = NULL, updated_at = ?7
                 WHERE id = ?1",
                params![
                    id,
                    status.as_str(),
                    detail,
                    error_code,
                    carrier,
                    due_at,
                    now
                ],
            )?;
        }
        Ok(row)
    }

    async fn take_parked(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        if !MaybeRows::get(&self.maybe.early_receipts) {
            return Ok(Vec::new());
        }
        // Most parts have none: a SELECT finds that for less than a `DELETE ... RETURNING`.
        let early = rows(
            self.tx,
            "SELECT state, error_code FROM early_receipts
             WHERE carrier = ?1 AND carrier_message_id = ?2 ORDER BY rowid",
            params![carrier, carrier_message_id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
        )?;
        if !early.is_empty() {
            run(
                self.tx,
                "DELETE FROM early_receipts WHERE carrier = ?1 AND carrier_message_id = ?2",
                params![carrier, carrier_message_id],
            )?;
        }
        Ok(early)
    }

    async fn adoptable_parked(&mut self) -> Result<Vec<(String, Receipt)>, StoreError> {
        // One writer: a part and a receipt for it are never stored at the same time.
        Ok(Vec::new())
    }

    async fn release_claims(
        &mut self,
        all: bool,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        rows(
            self.tx,
            "UPDATE messages SET status = 'queued', detail = ?2, locked_until = NULL, due_at = ?1,
                 updated_at = ?1
             WHERE status = 'sending' AND (?3 OR locked_until < ?1)
             RETURNING id, account, reference, webhook_url",
            params![now, detail, all],
            changed_from_row,
        )
    }

    async fn expire_overdue(
        &mut self,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        rows(
            self.tx,
            "UPDATE messages SET status = 'expired', detail = ?2, updated_at = ?1
             WHERE status IN ('queued', 'scheduled') AND expires_at <= ?1
             RETURNING id, account, webhook_url, reference",
            params![now, detail],
            changed_from_row,
        )
    }

    async fn requeue_ended(
        &mut self,
        id: &str,
        detail: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<Option<Target>, StoreError> {
        let target = optional(
            self.tx,
            "UPDATE messages SET status = 'queued', detail = ?2, due_at = ?3, expires_at = ?4,
                 updated_at = ?3
             WHERE id = ?1 AND status IN ('failed', 'expired', 'unknown', 'undelivered')
             RETURNING account, webhook_url, reference",
            params![id, detail, now, expires_at],
            target_from_row,
        )?;
        if target.is_some() {
            // Every part goes again: the earlier ones did not reach the handset.
            run(self.tx, "DELETE FROM parts WHERE message_id = ?1", [id])?;
        }
        Ok(target)
    }

    async fn cancel_waiting(
        &mut self,
        id: &str,
        account: Option<&str>,
        detail: &str,
        now: i64,
    ) -> Result<Option<Target>, StoreError> {
        optional(
            self.tx,
            "UPDATE messages SET status = 'canceled', detail = ?4, updated_at = ?3
             WHERE id = ?1 AND (?2 IS NULL OR account = ?2)
               AND status IN ('queued', 'scheduled', 'held_suspect')
             RETURNING account, webhook_url, reference",
            params![id, account, now, detail],
            target_from_row,
        )
    }

    async fn status_of(
        &mut self,
        id: &str,
        account: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        optional(
            self.tx,
            "SELECT status FROM messages WHERE id = ?1 AND (?2 IS NULL OR account = ?2)",
            params![id, account],
            |r| r.get(0),
        )
    }

    async fn newest_part(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
    ) -> Result<Option<PartRow>, StoreError> {
        // With MAX, SQLite takes the other columns from the row of the maximum, and needs no
        // sort (`ORDER BY updated_at DESC LIMIT 1` built a temporary b-tree for every
        // receipt). It returns one row, of NULLs when no part has the id.
        one(
            self.tx,
            "SELECT message_id, part, state, MAX(updated_at) FROM parts
             WHERE carrier = ?1 AND carrier_message_id = ?2",
            params![carrier, carrier_message_id],
            |r| {
                let Some(message_id) = r.get(0)? else {
                    return Ok(None);
                };
                Ok(Some(PartRow {
                    message_id,
                    part: r.get(1)?,
                    state: r.get(2)?,
                    updated_at: r.get(3)?,
                }))
            },
        )
    }

    async fn park_receipt(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
        receipt: &Receipt,
        now: i64,
    ) -> Result<(), StoreError> {
        MaybeRows::set(&self.maybe.early_receipts, true);
        run(
            self.tx,
            "INSERT INTO early_receipts (carrier, carrier_message_id, state, error_code,
                 received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                carrier,
                carrier_message_id,
                receipt.state.as_str(),
                receipt.error_code,
                now
            ],
        )?;
        run(
            self.tx,
            "DELETE FROM early_receipts WHERE received_at < ?1",
            [now - EARLY_RECEIPT_TTL_MS],
        )?;
        Ok(())
    }

    async fn set_part_state(
        &mut self,
        part: &PartRow,
        state: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE parts SET state = ?3, updated_at = ?4 WHERE message_id = ?1 AND part = ?2",
            params![part.message_id, part.part, state, now],
        )?;
        Ok(())
    }

    async fn close_single_part(
        &mut self,
        id: &str,
        status: Status,
        detail: &str,
        error_code: Option<&str>,
        now: i64,
    ) -> Result<Option<(Target, String)>, StoreError> {
        let closed = optional(
            self.tx,
            "SELECT account, webhook_url, reference, recipient FROM messages
             WHERE id = ?1 AND segments = 1
               AND (status IN ('sending', 'sent') OR status IN ('queued', 'scheduled')
                    OR status = 'held_suspect')",
            [id],
            target_and_recipient,
        )?;
        if closed.is_some() {
            self.set_final_status(id, status, detail, error_code, now)
                .await?;
        }
        Ok(closed)
    }

    async fn rollup(&mut self, id: &str) -> Result<Option<RollupRow>, StoreError> {
        optional(
            self.tx,
            "SELECT status, segments, account, webhook_url, reference, recipient,
                 (SELECT COUNT(*) FROM parts WHERE message_id = ?1) AS parts,
                 (SELECT COUNT(*) FROM parts WHERE message_id = ?1 AND state = 'delivered')
                     AS delivered
             FROM messages WHERE id = ?1",
            [id],
            |r| {
                Ok(RollupRow {
                    status: r.get("status")?,
                    segments: r.get("segments")?,
                    parts: r.get("parts")?,
                    delivered: r.get("delivered")?,
                    target: target_from_row(r)?,
                    recipient: r.get("recipient")?,
                })
            },
        )
    }

    async fn set_final_status(
        &mut self,
        id: &str,
        status: Status,
        detail: &str,
        error_code: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE messages SET status = ?2, detail = ?3, error_code = COALESCE(?4, error_code),
                 updated_at = ?5
             WHERE id = ?1",
            params![id, status.as_str(), detail, error_code, now],
        )?;
        Ok(())
    }

    async fn take_unmatched(
        &mut self,
        carrier: &str,
        received_before: i64,
    ) -> Result<Vec<ParkedReceipt>, StoreError> {
        rows(
            self.tx,
            "DELETE FROM early_receipts WHERE carrier = ?1 AND received_at < ?2
             RETURNING carrier_message_id, state, error_code, received_at",
            params![carrier, received_before],
            |r| {
                Ok(ParkedReceipt {
                    carrier_message_id: r.get(0)?,
                    state: r.get(1)?,
                    error_code: r.get(2)?,
                    received_at: r.get(3)?,
                })
            },
        )
    }

    async fn claim_queries(
        &mut self,
        carrier: &str,
        accepted_before: i64,
        limit: u32,
        now: i64,
    ) -> Result<Vec<ReceiptQuery>, StoreError> {
        // Open parts: no final state yet ('submitted', or an intermediate receipt's state).
        let open = rows(
            self.tx,
            "SELECT p.rowid, p.message_id, p.part,
                    COALESCE(p.submitted_id, p.carrier_message_id) AS id, m.sender
             FROM parts p JOIN messages m ON m.id = p.message_id
             WHERE p.carrier = ?1 AND m.status = 'sent'
               AND p.state IN ('submitted', 'scheduled', 'enroute', 'accepted')
               AND p.updated_at < ?2 AND (p.queried_at IS NULL OR p.queried_at < ?2)
             ORDER BY p.updated_at LIMIT +?3",
            params![carrier, accepted_before, limit as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            },
        )?;
        let mut queries = Vec::with_capacity(open.len());
        for (rowid, message_id, part, id, sender) in open {
            run(
                self.tx,
                "UPDATE parts SET queried_at = ?2 WHERE rowid = ?1",
                params![rowid, now],
            )?;
            queries.push(ReceiptQuery {
                message_id: parse_id(&message_id)?,
                part: part as u32,
                carrier_message_id: id,
                sender,
            });
        }
        Ok(queries)
    }

    async fn insert_inbound(&mut self, row: &InboundRow<'_>) -> Result<(), StoreError> {
        run(
            self.tx,
            "INSERT INTO inbound (id, account, carrier, sender, recipient, body, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                row.id,
                row.account,
                row.carrier,
                row.sender,
                row.recipient,
                row.body,
                row.received_at
            ],
        )?;
        Ok(())
    }

    async fn has_opt_out(
        &mut self,
        account: &str,
        key: &str,
        sender: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = optional(
            self.tx,
            "SELECT 1 FROM opt_outs WHERE account = ?1 AND number_key = ?2 AND sender IN ('', ?3)",
            params![account, key, sender],
            |r| r.get(0),
        )?;
        Ok(found.is_some())
    }

    async fn insert_outbox(&mut self, row: &OutboxRow<'_>) -> Result<(), StoreError> {
        insert_outbox(self.tx, row)
    }

    async fn claim_outbox(
        &mut self,
        limit: usize,
        lease_until: i64,
        now: i64,
    ) -> Result<Vec<WebhookJob>, StoreError> {
        // A lease that ended (its sender died) makes the webhook waiting again.
        run(
            self.tx,
            "UPDATE webhooks SET locked_until = NULL WHERE locked_until < ?1",
            [now],
        )?;
        rows(
            self.tx,
            "UPDATE webhooks SET locked_until = ?1, attempts = attempts + 1
             WHERE id IN (SELECT id FROM webhooks
                          WHERE locked_until IS NULL AND due_at <= ?2
                          ORDER BY due_at LIMIT +?3)
             RETURNING id, account, url, payload, attempts, created_at",
            params![lease_until, now, limit as i64],
            |r| {
                Ok(WebhookJob {
                    id: r.get(0)?,
                    copy: WebhookCopy::Outbox,
                    account: r.get(1)?,
                    url: r.get(2)?,
                    payload: r.get(3)?,
                    attempts: r.get::<_, i64>(4)? as u32,
                    created_at: r.get(5)?,
                })
            },
        )
    }

    async fn outbox_done(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            run(self.tx, "DELETE FROM webhooks WHERE id = ?1", [id])?;
        }
        Ok(())
    }

    async fn outbox_retry(&mut self, id: i64, at: i64, error: &str) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE webhooks SET due_at = ?2, locked_until = NULL, last_error = ?3 WHERE id = ?1",
            params![id, at, error],
        )?;
        Ok(())
    }

    async fn outbox_unposted(&mut self, id: i64) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1 WHERE id = ?1",
            [id],
        )?;
        Ok(())
    }

    async fn outbox_defer(&mut self, id: i64, at: i64) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1, due_at = ?2
             WHERE id = ?1",
            params![id, at],
        )?;
        Ok(())
    }

    async fn settle_handed(&mut self, through: i64) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE webhook_journal SET settled_through = ?1 WHERE settled_through < ?1",
            [through],
        )?;
        Ok(())
    }

    async fn begin_dry_run(&mut self) -> Result<(), StoreError> {
        self.tx.execute_batch("SAVEPOINT dry_run")
    }

    async fn rollback_dry_run(&mut self) -> Result<(), StoreError> {
        self.tx
            .execute_batch("ROLLBACK TO dry_run; RELEASE dry_run")
    }

    async fn messages_with_text(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        rows(
            self.tx,
            "SELECT id, recipient FROM messages WHERE id < ?1 AND body IS NOT NULL
               AND status NOT IN ('queued', 'scheduled', 'sending', 'held_suspect')
             LIMIT ?2",
            params![id_before, limit],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    async fn anonymise_message(&mut self, id: &str, recipient: &str) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE messages SET body = NULL, detail = NULL, recipient = ?2 WHERE id = ?1",
            params![id, recipient],
        )?;
        Ok(())
    }

    async fn inbound_with_text(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        rows(
            self.tx,
            "SELECT id, sender FROM inbound WHERE id < ?1 AND body IS NOT NULL LIMIT ?2",
            params![id_before, limit],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    async fn anonymise_inbound(&mut self, id: &str, sender: &str) -> Result<(), StoreError> {
        run(
            self.tx,
            "UPDATE inbound SET body = NULL, sender = ?2 WHERE id = ?1",
            params![id, sender],
        )?;
        Ok(())
    }

    async fn delete_webhooks_before(&mut self, at: i64, limit: u32) -> Result<u64, StoreError> {
        run(
            self.tx,
            "DELETE FROM webhooks WHERE id IN
                 (SELECT id FROM webhooks WHERE created_at < ?1 LIMIT ?2)",
            params![at, limit],
        )
    }

    async fn delete_events_before(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<u64, StoreError> {
        run(
            self.tx,
            "DELETE FROM events WHERE id IN
                 (SELECT id FROM events WHERE message_id < ?1 LIMIT ?2)",
            params![id_before, limit],
        )
    }

    async fn canceled_before(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        rows(
            self.tx,
            "SELECT id FROM messages WHERE id < ?1 AND status = 'canceled' LIMIT ?2",
            params![id_before, limit],
            |r| r.get(0),
        )
    }

    async fn delete_message(&mut self, id: &str) -> Result<(), StoreError> {
        run(self.tx, "DELETE FROM events WHERE message_id = ?1", [id])?;
        run(self.tx, "DELETE FROM messages WHERE id = ?1", [id])?;
        Ok(())
    }

    async fn delete_idempotency_before(&mut self, at: i64) -> Result<u64, StoreError> {
        run(
            self.tx,
            "DELETE FROM idempotency WHERE created_at < ?1",
            [at],
        )
    }
}

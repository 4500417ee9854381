//! The store's statements on PostgreSQL ([`Sql`]), each a round trip on the transaction's
//! pooled connection. Where the rules hand over many rows at once, one statement takes them
//! all (`UNNEST`, `= ANY`); where SQLite needs a SELECT and an UPDATE, PostgreSQL's
//! `UPDATE ... RETURNING` does it in one trip.

use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row};

use crate::message::Status;
use crate::policy::number_change::ChangeEvent;
use crate::receipt::{Receipt, normalize_id};
use crate::store::domain::{
    ChangedRow, ClaimRow, Facts, NewEvent, OutboxRow, PartRow, Sql, Target,
    sql::{InboundRow, RollupRow},
};
use crate::store::handoff::Handoff;
use crate::store::shared::{change_kind, parse_id, parse_receipt_state};
use crate::store::{
    Erasure, IdempotentAnswer, NewMessage, NumberChange, OptOutSource, ParkedReceipt, ReceiptQuery,
    StoreError, StoreRules, WebhookCopy, WebhookJob,
};

/// A backstop: parked receipts older than this are dropped unseen. Each carrier's sweeper
/// gives them up (and lists them) after its `unmatched_after`, at most 24 h, so an hour later.
const EARLY_RECEIPT_TTL_MS: i64 = 25 * 3600 * 1000;

/// The policy's one lookup per message: (recipient, account, number key, sender).
pub const FACTS_QUERY: &str = "SELECT
     EXISTS (SELECT 1 FROM number_changes
             WHERE number = $1 AND (account IS NULL OR account = $2)) AS changed,
     EXISTS (SELECT 1 FROM opt_outs
             WHERE account = $2 AND number_key = $3 AND sender IN ('', $4)) AS opted_out,
     EXISTS (SELECT 1 FROM suspects WHERE number = $1 AND suspect) AS suspect";

/// One transaction on a pooled connection, with the policy generation it decides in.
pub(super) struct PgTx<'r> {
    pub tx: sqlx::Transaction<'static, Postgres>,
    pub rules: &'r StoreRules,
    /// Names this process's claims in `messages.claimed_by`.
    pub instance: &'r str,
    /// The shared generation as read when the transaction began, plus its own changes.
    pub generation: i64,
    /// Changes of the policy's facts in this transaction, added to the shared count before
    /// commit.
    pub bumps: i64,
    /// The earliest future effective time of a number change recorded in this transaction.
    pub next_effective: Option<i64>,
}

impl<'r> PgTx<'r> {
    /// Begins a transaction. The shared generation is read first, before any fact: a change
    /// committed by another transaction meanwhile leaves this one's decisions with an older
    /// generation than the shared one, so they are checked again at send time.
    pub async fn begin(
        pool: &sqlx::PgPool,
        rules: &'r StoreRules,
        instance: &'r str,
    ) -> Result<PgTx<'r>, StoreError> {
        let mut tx = pool.begin().await?;
        let generation: i64 = sqlx::query_scalar("SELECT generation FROM policy_clock")
            .fetch_one(&mut *tx)
            .await?;
        Ok(PgTx {
            tx,
            rules,
            instance,
            generation,
            bumps: 0,
            next_effective: None,
        })
    }

    /// Writes the transaction's changes of the policy into the shared clock, and commits.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        if self.bumps > 0 {
            sqlx::query("UPDATE policy_clock SET generation = generation + $1")
                .bind(self.bumps)
                .execute(&mut *self.tx)
                .await?;
        }
        if let Some(at) = self.next_effective {
            sqlx::query("UPDATE policy_clock SET next_effective = LEAST(next_effective, $1)")
                .bind(at)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

fn target_from_row(row: &PgRow) -> Result<Target, StoreError> {
    Ok(Target {
        account: row.try_get("account")?,
        url: row.try_get("webhook_url")?,
        reference: row.try_get("reference")?,
    })
}

fn target_and_recipient(row: &PgRow) -> Result<(Target, String), StoreError> {
    Ok((target_from_row(row)?, row.try_get("recipient")?))
}

fn changed_rows(rows: &[PgRow]) -> Result<Vec<ChangedRow>, StoreError> {
    rows.iter()
        .map(|row| {
            Ok(ChangedRow {
                id: row.try_get("id")?,
                target: target_from_row(row)?,
            })
        })
        .collect()
}

impl Sql for PgTx<'_> {
    fn rules(&self) -> &StoreRules {
        self.rules
    }

    fn policy_generation(&self) -> i64 {
        self.generation
    }

    fn policy_changed(&mut self) {
        self.generation += 1;
        self.bumps += 1;
    }

    fn number_change_dated(&mut self, effective_at: i64) {
        self.next_effective = Some(
            self.next_effective
                .map_or(effective_at, |t| t.min(effective_at)),
        );
    }

    async fn policy_tick(&mut self, now: i64) -> Result<(), StoreError> {
        let generation: Option<i64> = sqlx::query_scalar(
            "UPDATE policy_clock SET generation = generation + 1,
                 next_effective = COALESCE((SELECT MIN(effective_at) FROM number_changes
                                            WHERE effective_at > $1), 9223372036854775807)
             WHERE next_effective <= $1
             RETURNING generation",
        )
        .bind(now)
        .fetch_optional(&mut *self.tx)
        .await?;
        if let Some(generation) = generation {
            self.generation = generation + self.bumps;
        }
        Ok(())
    }

    fn handoff(&self) -> Option<&Handoff> {
        // Several instances: an event cannot be the durable copy of one's webhook.
        None
    }

    async fn idempotent_answer(
        &mut self,
        account: &str,
        key: &str,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        let row = sqlx::query(
            "SELECT key, request_hash, status_code, answer FROM idempotency
             WHERE account = $1 AND key = $2",
        )
        .bind(account)
        .bind(key)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| super::idempotent_from_row(&r)).transpose()
    }

    async fn insert_idempotent_answer(
        &mut self,
        account: &str,
        answer: &IdempotentAnswer,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO idempotency (account, key, request_hash, status_code, answer, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(account)
        .bind(&answer.key)
        .bind(&answer.request_hash)
        .bind(answer.status_code as i64)
        .bind(&answer.answer)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn insert_message(
        &mut self,
        m: &NewMessage,
        service_messages: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO messages (id, account, reference, recipient, sender, body, category,
                 encoding, segments, priority, webhook_url, consent_at, status, detail,
                 created_at, updated_at, due_at, expires_at, service_messages, policy_gen)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15, $16,
                     $17, $18, $19)",
        )
        .bind(m.id.to_string())
        .bind(&m.account)
        .bind(&m.reference)
        .bind(&m.recipient)
        .bind(&m.sender)
        .bind(&m.body)
        .bind(m.category.as_str())
        .bind(m.encoding.as_str())
        .bind(m.segments as i64)
        .bind(m.priority as i64)
        .bind(&m.webhook_url)
        .bind(m.consent_at)
        .bind(m.status.as_str())
        .bind(&m.detail)
        .bind(m.created_at)
        .bind(m.due_at)
        .bind(m.expires_at)
        .bind(service_messages)
        .bind(self.generation)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn facts(
        &mut self,
        account: &str,
        recipient: &str,
        key: &str,
        sender: &str,
    ) -> Result<Facts, StoreError> {
        let row = sqlx::query(FACTS_QUERY)
            .bind(recipient)
            .bind(account)
            .bind(key)
            .bind(sender)
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(Facts {
            changed: row.try_get("changed")?,
            opted_out: row.try_get("opted_out")?,
            suspect: row.try_get("suspect")?,
        })
    }

    async fn change_events(
        &mut self,
        account: &str,
        number: &str,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, new_number, effective_at FROM number_changes
             WHERE number = $1 AND (account IS NULL OR account = $2)",
        )
        .bind(number)
        .bind(account)
        .fetch_all(&mut *self.tx)
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

    async fn insert_opt_out(
        &mut self,
        account: &str,
        key: &str,
        number: &str,
        scope: &str,
        source: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO opt_outs (account, number_key, number, sender, source, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(account)
        .bind(key)
        .bind(number)
        .bind(scope)
        .bind(source)
        .bind(now)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        Ok(inserted > 0)
    }

    async fn delete_opt_outs(
        &mut self,
        account: &str,
        key: &str,
        scope: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let removed = sqlx::query_scalar(
            "DELETE FROM opt_outs
             WHERE account = $1 AND number_key = $2 AND ($3::TEXT IS NULL OR sender = $3)
             RETURNING sender",
        )
        .bind(account)
        .bind(key)
        .bind(scope)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(removed)
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
        sqlx::query(
            "INSERT INTO opt_out_journal (account, number_key, number, sender, action, source,
                 actor, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(account)
        .bind(key)
        .bind(number)
        .bind(scope)
        .bind(action)
        .bind(by.source)
        .bind(&by.actor)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
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
        .bind(service_messages)
        .bind(detail)
        .bind(now)
        .fetch_all(&mut *self.tx)
        .await?;
        changed_rows(&rows)
    }

    async fn insert_number_change(
        &mut self,
        change: &NumberChange,
        now: i64,
    ) -> Result<(), StoreError> {
        let (kind, new_number) = crate::store::domain::change_columns(&change.kind);
        sqlx::query(
            "INSERT INTO number_changes (account, number, kind, new_number, effective_at, source,
                 created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&change.account)
        .bind(&change.number)
        .bind(kind)
        .bind(new_number)
        .bind(change.effective_at)
        .bind(&change.source)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn waiting_for(
        &mut self,
        number: &str,
        account: Option<&str>,
    ) -> Result<Vec<(String, String, Option<i64>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, account, consent_at FROM messages
             WHERE recipient = $1 AND status IN ('queued', 'scheduled', 'held_suspect')
               AND ($2::TEXT IS NULL OR account = $2)",
        )
        .bind(number)
        .bind(account)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    async fn set_recipient(&mut self, id: &str, recipient: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE messages SET recipient = $2 WHERE id = $1")
            .bind(id)
            .bind(recipient)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn count_failure(&mut self, number: &str, now: i64) -> Result<(u32, bool), StoreError> {
        let row = sqlx::query(
            "INSERT INTO suspects (number, failures, suspect, updated_at) VALUES ($1, 1, FALSE, $2)
             ON CONFLICT (number) DO UPDATE SET failures = suspects.failures + 1, updated_at = $2
             RETURNING failures, suspect",
        )
        .bind(number)
        .bind(now)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok((
            row.try_get::<i64, _>("failures")? as u32,
            row.try_get("suspect")?,
        ))
    }

    async fn mark_suspect(&mut self, number: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE suspects SET suspect = TRUE WHERE number = $1")
            .bind(number)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn hold_waiting(
        &mut self,
        number: &str,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        let rows = sqlx::query(
            "UPDATE messages SET status = 'held_suspect', detail = $2, updated_at = $3
             WHERE recipient = $1 AND status IN ('queued', 'scheduled')
             RETURNING id, account, webhook_url, reference",
        )
        .bind(number)
        .bind(detail)
        .bind(now)
        .fetch_all(&mut *self.tx)
        .await?;
        changed_rows(&rows)
    }

    async fn reset_failures(&mut self, number: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM suspects WHERE number = $1 AND NOT suspect")
            .bind(number)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn delete_suspect(&mut self, number: &str) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM suspects WHERE number = $1")
            .bind(number)
            .execute(&mut *self.tx)
            .await?;
        Ok(deleted.rows_affected())
    }

    async fn release_held(
        &mut self,
        number: &str,
        account: Option<&str>,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        let rows = sqlx::query(
            "UPDATE messages SET status = 'queued', detail = $2, due_at = $3, updated_at = $3
             WHERE recipient = $1 AND status = 'held_suspect' AND ($4::TEXT IS NULL OR account = $4)
             RETURNING id, account, webhook_url, reference",
        )
        .bind(number)
        .bind(detail)
        .bind(now)
        .bind(account)
        .fetch_all(&mut *self.tx)
        .await?;
        changed_rows(&rows)
    }

    async fn erase_subject(
        &mut self,
        account: &str,
        number: &str,
        key: &str,
    ) -> Result<Erasure, StoreError> {
        let tx = &mut *self.tx;
        for statement in [
            "DELETE FROM events WHERE message_id IN
                 (SELECT id FROM messages WHERE account = $1 AND recipient = $2)",
            "DELETE FROM parts WHERE message_id IN
                 (SELECT id FROM messages WHERE account = $1 AND recipient = $2)",
            // Webhooks not yet posted may carry the number (inbound `from`) or its messages.
            "DELETE FROM webhooks WHERE account = $1
               AND (payload::jsonb ->> 'from' = $2
                    OR payload::jsonb ->> 'message_id' IN
                       (SELECT id FROM messages WHERE account = $1 AND recipient = $2))",
        ] {
            sqlx::query(statement)
                .bind(account)
                .bind(number)
                .execute(&mut *tx)
                .await?;
        }
        let messages = sqlx::query("DELETE FROM messages WHERE account = $1 AND recipient = $2")
            .bind(account)
            .bind(number)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let inbound = sqlx::query("DELETE FROM inbound WHERE account = $1 AND sender = $2")
            .bind(account)
            .bind(number)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let number_changes_kept: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM number_changes WHERE account = $1 AND number = $2",
        )
        .bind(account)
        .bind(number)
        .fetch_one(&mut *tx)
        .await?;
        let suppressions_kept =
            sqlx::query("UPDATE opt_outs SET number = NULL WHERE account = $1 AND number_key = $2")
                .bind(account)
                .bind(key)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query(
            "UPDATE opt_out_journal SET number = NULL WHERE account = $1 AND number_key = $2",
        )
        .bind(account)
        .bind(key)
        .execute(&mut *tx)
        .await?;
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
        let row = sqlx::query(
            "UPDATE messages SET status = $2, detail = $3, locked_until = NULL, updated_at = $4
             WHERE id = $1
             RETURNING id, account, webhook_url, reference",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(detail)
        .bind(now)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(ChangedRow {
            id: row.try_get("id")?,
            target: target_from_row(&row)?,
        })
    }

    async fn insert_event(&mut self, event: &NewEvent<'_>, _hook: bool) -> Result<i64, StoreError> {
        // No hand-off here (see `handoff`): no webhook needs the event's id.
        self.insert_events(std::slice::from_ref(event)).await?;
        Ok(0)
    }

    async fn insert_events(&mut self, events: &[NewEvent<'_>]) -> Result<(), StoreError> {
        match events {
            [] => Ok(()),
            [event] => {
                sqlx::query(
                    "INSERT INTO events (message_id, at, status, detail, error_code)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(event.message_id)
                .bind(event.at)
                .bind(event.status.as_str())
                .bind(event.detail)
                .bind(event.error_code)
                .execute(&mut *self.tx)
                .await?;
                Ok(())
            }
            events => {
                let ids: Vec<&str> = events.iter().map(|e| e.message_id).collect();
                let at: Vec<i64> = events.iter().map(|e| e.at).collect();
                let statuses: Vec<&str> = events.iter().map(|e| e.status.as_str()).collect();
                let details: Vec<Option<&str>> = events.iter().map(|e| e.detail).collect();
                let codes: Vec<Option<&str>> = events.iter().map(|e| e.error_code).collect();
                sqlx::query(
                    "INSERT INTO events (message_id, at, status, detail, error_code)
                     SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[],
                                          $5::TEXT[])",
                )
                .bind(ids)
                .bind(at)
                .bind(statuses)
                .bind(details)
                .bind(codes)
                .execute(&mut *self.tx)
                .await?;
                Ok(())
            }
        }
    }

    async fn claim_due(
        &mut self,
        limit: usize,
        lease_until: i64,
        now: i64,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        // Rows another transaction is claiming (or a receipt is updating) are skipped, not
        // waited for.
        let rows = sqlx::query(
            "UPDATE messages SET status = 'sending', locked_until = $1, claimed_by = $4,
                 attempts = attempts + 1, updated_at = $2
             WHERE id IN (SELECT id FROM messages
                          WHERE status IN ('queued', 'scheduled') AND due_at <= $2
                          ORDER BY priority DESC, due_at LIMIT $3
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, account, recipient, sender, body, encoding, segments, attempts,
                       expires_at, category, priority, consent_at, service_messages, policy_gen",
        )
        .bind(lease_until)
        .bind(now)
        .bind(limit as i64)
        .bind(self.instance)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ClaimRow {
                    id: r.try_get("id")?,
                    account: r.try_get("account")?,
                    recipient: r.try_get("recipient")?,
                    sender: r.try_get("sender")?,
                    body: r.try_get("body")?,
                    encoding: r.try_get("encoding")?,
                    segments: r.try_get("segments")?,
                    attempts: r.try_get("attempts")?,
                    expires_at: r.try_get("expires_at")?,
                    category: r.try_get("category")?,
                    priority: r.try_get("priority")?,
                    consent_at: r.try_get("consent_at")?,
                    service_messages: r.try_get("service_messages")?,
                    policy_gen: r.try_get("policy_gen")?,
                })
            })
            .collect()
    }

    async fn accepted_parts(&mut self, id: &str) -> Result<Vec<u32>, StoreError> {
        let parts: Vec<i64> = sqlx::query_scalar("SELECT part FROM parts WHERE message_id = $1")
            .bind(id)
            .fetch_all(&mut *self.tx)
            .await?;
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
        sqlx::query(
            "INSERT INTO parts (message_id, part, carrier, carrier_message_id, state, updated_at,
                 submitted_id)
             VALUES ($1, $2, $3, $4, 'submitted', $5, $6)
             ON CONFLICT (message_id, part) DO UPDATE SET carrier = $3,
                 carrier_message_id = $4, state = 'submitted', updated_at = $5,
                 submitted_id = $6, queried_at = NULL",
        )
        .bind(id)
        .bind(part as i64)
        .bind(carrier)
        .bind(normalize_id(carrier_message_id))
        .bind(now)
        .bind(carrier_message_id)
        .execute(&mut *self.tx)
        .await?;
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
        let row = sqlx::query(
            "UPDATE messages SET status = $2, detail = $3, error_code = COALESCE($4, error_code),
                 carrier = COALESCE($5, carrier), due_at = COALESCE($6, due_at),
                 locked_until = NULL, updated_at = $7
             WHERE id = $1 AND status = 'sending' AND claimed_by = $8
             RETURNING account, webhook_url, reference, recipient",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(detail)
        .bind(error_code)
        .bind(carrier)
        .bind(due_at)
        .bind(now)
        .bind(self.instance)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.as_ref().map(target_and_recipient).transpose()
    }

    async fn take_parked(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        let rows = sqlx::query(
            "DELETE FROM early_receipts WHERE carrier = $1 AND carrier_message_id = $2
             RETURNING state, error_code",
        )
        .bind(carrier)
        .bind(carrier_message_id)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("error_code")?)))
            .collect()
    }

    async fn adoptable_parked(&mut self) -> Result<Vec<(String, Receipt)>, StoreError> {
        // A receipt parks when its part is not stored yet; the transaction storing the part
        // then applies it, unless the two ran at the same time and neither saw the other's
        // row: this sweep (every second, with the expiry sweep) catches those.
        let rows = sqlx::query(
            "DELETE FROM early_receipts e USING parts p
             WHERE p.carrier = e.carrier AND p.carrier_message_id = e.carrier_message_id
             RETURNING e.carrier, e.carrier_message_id, e.state, e.error_code",
        )
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| {
                let receipt = Receipt {
                    carrier_message_id: r.try_get("carrier_message_id")?,
                    state: parse_receipt_state(&r.try_get::<String, _>("state")?)?,
                    error_code: r.try_get("error_code")?,
                };
                Ok((r.try_get("carrier")?, receipt))
            })
            .collect()
    }

    async fn release_claims(
        &mut self,
        all: bool,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        // Another live instance's claims are never taken: only ended leases, and (`all`)
        // this instance's own.
        let rows = sqlx::query(
            "UPDATE messages SET status = 'queued', detail = $2, locked_until = NULL,
                 claimed_by = NULL, due_at = $1, updated_at = $1
             WHERE status = 'sending' AND (locked_until < $1 OR ($3 AND claimed_by = $4))
             RETURNING id, account, reference, webhook_url",
        )
        .bind(now)
        .bind(detail)
        .bind(all)
        .bind(self.instance)
        .fetch_all(&mut *self.tx)
        .await?;
        changed_rows(&rows)
    }

    async fn expire_overdue(
        &mut self,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError> {
        let rows = sqlx::query(
            "UPDATE messages SET status = 'expired', detail = $2, updated_at = $1
             WHERE status IN ('queued', 'scheduled') AND expires_at <= $1
             RETURNING id, account, webhook_url, reference",
        )
        .bind(now)
        .bind(detail)
        .fetch_all(&mut *self.tx)
        .await?;
        changed_rows(&rows)
    }

    async fn requeue_ended(
        &mut self,
        id: &str,
        detail: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<Option<Target>, StoreError> {
        let row = sqlx::query(
            "UPDATE messages SET status = 'queued', detail = $2, due_at = $3, expires_at = $4,
                 updated_at = $3
             WHERE id = $1 AND status IN ('failed', 'expired', 'unknown', 'undelivered')
             RETURNING account, webhook_url, reference",
        )
        .bind(id)
        .bind(detail)
        .bind(now)
        .bind(expires_at)
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        // Every part goes again: the earlier ones did not reach the handset.
        sqlx::query("DELETE FROM parts WHERE message_id = $1")
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        target_from_row(&row).map(Some)
    }

    async fn cancel_waiting(
        &mut self,
        id: &str,
        account: Option<&str>,
        detail: &str,
        now: i64,
    ) -> Result<Option<Target>, StoreError> {
        let row = sqlx::query(
            "UPDATE messages SET status = 'canceled', detail = $4, updated_at = $3
             WHERE id = $1 AND ($2::TEXT IS NULL OR account = $2)
               AND status IN ('queued', 'scheduled', 'held_suspect')
             RETURNING account, webhook_url, reference",
        )
        .bind(id)
        .bind(account)
        .bind(now)
        .bind(detail)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.as_ref().map(target_from_row).transpose()
    }

    async fn status_of(
        &mut self,
        id: &str,
        account: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let status = sqlx::query_scalar(
            "SELECT status FROM messages WHERE id = $1 AND ($2::TEXT IS NULL OR account = $2)",
        )
        .bind(id)
        .bind(account)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(status)
    }

    async fn newest_part(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
    ) -> Result<Option<PartRow>, StoreError> {
        let row = sqlx::query(
            "SELECT message_id, part, state, updated_at FROM parts
             WHERE carrier = $1 AND carrier_message_id = $2
             ORDER BY updated_at DESC LIMIT 1",
        )
        .bind(carrier)
        .bind(carrier_message_id)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| {
            Ok(PartRow {
                message_id: r.try_get("message_id")?,
                part: r.try_get("part")?,
                state: r.try_get("state")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .transpose()
    }

    async fn park_receipt(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
        receipt: &Receipt,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO early_receipts (carrier, carrier_message_id, state, error_code,
                 received_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(carrier)
        .bind(carrier_message_id)
        .bind(receipt.state.as_str())
        .bind(&receipt.error_code)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("DELETE FROM early_receipts WHERE received_at < $1")
            .bind(now - EARLY_RECEIPT_TTL_MS)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn set_part_state(
        &mut self,
        part: &PartRow,
        state: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE parts SET state = $3, updated_at = $4 WHERE message_id = $1 AND part = $2",
        )
        .bind(&part.message_id)
        .bind(part.part)
        .bind(state)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
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
        let row = sqlx::query(
            "UPDATE messages SET status = $2, detail = $3,
                 error_code = COALESCE($4, error_code), updated_at = $5
             WHERE id = $1 AND segments = 1
               AND status IN ('queued', 'scheduled', 'sending', 'sent', 'held_suspect')
             RETURNING account, webhook_url, reference, recipient",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(detail)
        .bind(error_code)
        .bind(now)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.as_ref().map(target_and_recipient).transpose()
    }

    async fn rollup(&mut self, id: &str) -> Result<Option<RollupRow>, StoreError> {
        let row = sqlx::query(
            "SELECT status, segments, account, webhook_url, reference, recipient,
                 (SELECT COUNT(*) FROM parts WHERE message_id = $1) AS parts,
                 (SELECT COUNT(*) FROM parts WHERE message_id = $1 AND state = 'delivered')
                     AS delivered
             FROM messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| {
            Ok(RollupRow {
                status: r.try_get("status")?,
                segments: r.try_get("segments")?,
                parts: r.try_get("parts")?,
                delivered: r.try_get("delivered")?,
                target: target_from_row(&r)?,
                recipient: r.try_get("recipient")?,
            })
        })
        .transpose()
    }

    async fn set_final_status(
        &mut self,
        id: &str,
        status: Status,
        detail: &str,
        error_code: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE messages SET status = $2, detail = $3, error_code = COALESCE($4, error_code),
                 updated_at = $5
             WHERE id = $1",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(detail)
        .bind(error_code)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn take_unmatched(
        &mut self,
        carrier: &str,
        received_before: i64,
    ) -> Result<Vec<ParkedReceipt>, StoreError> {
        let rows = sqlx::query(
            "DELETE FROM early_receipts WHERE carrier = $1 AND received_at < $2
             RETURNING carrier_message_id, state, error_code, received_at",
        )
        .bind(carrier)
        .bind(received_before)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ParkedReceipt {
                    carrier_message_id: row.try_get("carrier_message_id")?,
                    state: row.try_get("state")?,
                    error_code: row.try_get("error_code")?,
                    received_at: row.try_get("received_at")?,
                })
            })
            .collect()
    }

    async fn claim_queries(
        &mut self,
        carrier: &str,
        accepted_before: i64,
        limit: u32,
        now: i64,
    ) -> Result<Vec<ReceiptQuery>, StoreError> {
        // Open parts: no final state yet ('submitted', or an intermediate receipt's state);
        // marked asked about in the same statement.
        let rows = sqlx::query(
            "UPDATE parts SET queried_at = $4
             FROM (SELECT p.message_id, p.part, m.sender
                   FROM parts p JOIN messages m ON m.id = p.message_id
                   WHERE p.carrier = $1 AND m.status = 'sent'
                     AND p.state IN ('submitted', 'scheduled', 'enroute', 'accepted')
                     AND p.updated_at < $2 AND (p.queried_at IS NULL OR p.queried_at < $2)
                   ORDER BY p.updated_at LIMIT $3
                   FOR UPDATE OF p SKIP LOCKED) AS due
             WHERE parts.message_id = due.message_id AND parts.part = due.part
             RETURNING parts.message_id, parts.part,
                       COALESCE(parts.submitted_id, parts.carrier_message_id) AS id, due.sender",
        )
        .bind(carrier)
        .bind(accepted_before)
        .bind(limit as i64)
        .bind(now)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ReceiptQuery {
                    message_id: parse_id(&row.try_get::<String, _>("message_id")?)?,
                    part: row.try_get::<i64, _>("part")? as u32,
                    carrier_message_id: row.try_get("id")?,
                    sender: row.try_get("sender")?,
                })
            })
            .collect()
    }

    async fn insert_inbound(&mut self, row: &InboundRow<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO inbound (id, account, carrier, sender, recipient, body, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(row.id)
        .bind(row.account)
        .bind(row.carrier)
        .bind(row.sender)
        .bind(row.recipient)
        .bind(row.body)
        .bind(row.received_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn has_opt_out(
        &mut self,
        account: &str,
        key: &str,
        sender: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1::BIGINT FROM opt_outs
             WHERE account = $1 AND number_key = $2 AND sender IN ('', $3)",
        )
        .bind(account)
        .bind(key)
        .bind(sender)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(found.is_some())
    }

    async fn insert_outbox(&mut self, row: &OutboxRow<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhooks (account, url, payload, attempts, created_at, due_at, last_error)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(row.account)
        .bind(row.url)
        .bind(row.payload)
        .bind(row.attempts as i64)
        .bind(row.created_at)
        .bind(row.due_at)
        .bind(row.last_error)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn claim_outbox(
        &mut self,
        limit: usize,
        lease_until: i64,
        now: i64,
    ) -> Result<Vec<WebhookJob>, StoreError> {
        let rows = sqlx::query(
            "UPDATE webhooks SET locked_until = $1, attempts = attempts + 1
             WHERE id IN (SELECT id FROM webhooks
                          WHERE due_at <= $2 AND (locked_until IS NULL OR locked_until < $2)
                          ORDER BY due_at LIMIT $3
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, account, url, payload, attempts, created_at",
        )
        .bind(lease_until)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WebhookJob {
                    copy: WebhookCopy::Outbox,
                    id: r.try_get("id")?,
                    account: r.try_get("account")?,
                    url: r.try_get("url")?,
                    payload: r.try_get("payload")?,
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn outbox_done(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM webhooks WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn outbox_retry(&mut self, id: i64, at: i64, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhooks SET due_at = $2, locked_until = NULL, last_error = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(at)
        .bind(error)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn outbox_unposted(&mut self, id: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1 WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn outbox_defer(&mut self, id: i64, at: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhooks SET locked_until = NULL, attempts = attempts - 1, due_at = $2
             WHERE id = $1",
        )
        .bind(id)
        .bind(at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn settle_handed(&mut self, _through: i64) -> Result<(), StoreError> {
        // Nothing is handed here (see `handoff`).
        Ok(())
    }

    async fn begin_dry_run(&mut self) -> Result<(), StoreError> {
        sqlx::query("SAVEPOINT dry_run")
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn rollback_dry_run(&mut self) -> Result<(), StoreError> {
        for statement in ["ROLLBACK TO dry_run", "RELEASE dry_run"] {
            sqlx::query(statement).execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    async fn messages_with_text(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, recipient FROM messages WHERE id < $1 AND body IS NOT NULL
               AND status NOT IN ('queued', 'scheduled', 'sending', 'held_suspect')
             LIMIT $2",
        )
        .bind(id_before)
        .bind(limit as i64)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn anonymise_message(&mut self, id: &str, recipient: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE messages SET body = NULL, detail = NULL, recipient = $2 WHERE id = $1")
            .bind(id)
            .bind(recipient)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn inbound_with_text(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, sender FROM inbound WHERE id < $1 AND body IS NOT NULL LIMIT $2",
        )
        .bind(id_before)
        .bind(limit as i64)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn anonymise_inbound(&mut self, id: &str, sender: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE inbound SET body = NULL, sender = $2 WHERE id = $1")
            .bind(id)
            .bind(sender)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn delete_webhooks_before(&mut self, at: i64, limit: u32) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM webhooks WHERE id IN
                 (SELECT id FROM webhooks WHERE created_at < $1 LIMIT $2)",
        )
        .bind(at)
        .bind(limit as i64)
        .execute(&mut *self.tx)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn delete_events_before(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM events WHERE id IN
                 (SELECT id FROM events WHERE message_id < $1 LIMIT $2)",
        )
        .bind(id_before)
        .bind(limit as i64)
        .execute(&mut *self.tx)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn canceled_before(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let ids = sqlx::query_scalar(
            "SELECT id FROM messages WHERE id < $1 AND status = 'canceled' LIMIT $2",
        )
        .bind(id_before)
        .bind(limit as i64)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(ids)
    }

    async fn delete_message(&mut self, id: &str) -> Result<(), StoreError> {
        for statement in [
            "DELETE FROM events WHERE message_id = $1",
            "DELETE FROM messages WHERE id = $1",
        ] {
            sqlx::query(statement)
                .bind(id)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(())
    }

    async fn delete_idempotency_before(&mut self, at: i64) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(at)
            .execute(&mut *self.tx)
            .await?;
        Ok(deleted.rows_affected())
    }
}

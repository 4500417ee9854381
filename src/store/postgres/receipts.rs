//! The store's side of receipt diagnosis and query_sm on PostgreSQL (as `sqlite/receipts.rs`): which ids exist, giving up parked
//! receipts, and finding parts whose receipt never came.

use sqlx::Row;

use super::{Tx, parse_id};
use crate::store::{ParkedReceipt, ReceiptQuery, StoreError};

pub(super) async fn known_carrier_ids(
    readers: &sqlx::PgPool,
    carrier: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    let known = sqlx::query_scalar(
        "SELECT DISTINCT carrier_message_id FROM parts
         WHERE carrier = $1 AND carrier_message_id = ANY($2)",
    )
    .bind(carrier)
    .bind(ids)
    .fetch_all(readers)
    .await?;
    Ok(known)
}

pub(super) async fn take_unmatched(
    tx: &mut Tx<'_>,
    carrier: &str,
    received_before: i64,
) -> Result<Vec<ParkedReceipt>, StoreError> {
    let rows = sqlx::query(
        "DELETE FROM early_receipts WHERE carrier = $1 AND received_at < $2
         RETURNING carrier_message_id, state, error_code, received_at",
    )
    .bind(carrier)
    .bind(received_before)
    .fetch_all(&mut **tx)
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

pub(super) async fn claim_queries(
    tx: &mut Tx<'_>,
    carrier: &str,
    accepted_before: i64,
    limit: u32,
    now: i64,
) -> Result<Vec<ReceiptQuery>, StoreError> {
    // Open parts: no final state yet ('submitted', or an intermediate receipt's state).
    let rows = sqlx::query(
        "SELECT p.message_id, p.part,
                COALESCE(p.submitted_id, p.carrier_message_id) AS id, m.sender
         FROM parts p JOIN messages m ON m.id = p.message_id
         WHERE p.carrier = $1 AND m.status = 'sent' AND p.state IN ('submitted', 'scheduled', 'enroute', 'accepted')
           AND p.updated_at < $2 AND (p.queried_at IS NULL OR p.queried_at < $2)
         ORDER BY p.updated_at LIMIT $3
         FOR UPDATE OF p SKIP LOCKED",
    )
    .bind(carrier)
    .bind(accepted_before)
    .bind(limit as i64)
    .fetch_all(&mut **tx)
    .await?;
    let mut queries = Vec::with_capacity(rows.len());
    for row in &rows {
        sqlx::query("UPDATE parts SET queried_at = $3 WHERE message_id = $1 AND part = $2")
            .bind(row.try_get::<String, _>("message_id")?)
            .bind(row.try_get::<i64, _>("part")?)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        queries.push(ReceiptQuery {
            message_id: parse_id(&row.try_get::<String, _>("message_id")?)?,
            part: row.try_get::<i64, _>("part")? as u32,
            carrier_message_id: row.try_get("id")?,
            sender: row.try_get("sender")?,
        });
    }
    Ok(queries)
}

//! The store's side of receipt diagnosis and query_sm: which ids exist, giving up parked
//! receipts, and finding parts whose receipt never came.

use rusqlite::params;

use super::{Tx, parse_id, rows, run};
use crate::store::{ParkedReceipt, ReceiptQuery, StoreError};

pub(super) async fn known_carrier_ids(
    readers: &sqlx::SqlitePool,
    carrier: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    let ids = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let known = sqlx::query_scalar(
        "SELECT DISTINCT carrier_message_id FROM parts
         WHERE carrier = ?1 AND carrier_message_id IN (SELECT value FROM json_each(?2))",
    )
    .bind(carrier)
    .bind(ids)
    .fetch_all(readers)
    .await?;
    Ok(known)
}

pub(super) fn take_unmatched(
    tx: &Tx,
    carrier: &str,
    received_before: i64,
) -> Result<Vec<ParkedReceipt>, StoreError> {
    rows(
        tx,
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

pub(super) fn claim_queries(
    tx: &Tx,
    carrier: &str,
    accepted_before: i64,
    limit: u32,
    now: i64,
) -> Result<Vec<ReceiptQuery>, StoreError> {
    // Open parts: no final state yet ('submitted', or an intermediate receipt's state).
    let open = rows(
        tx,
        "SELECT p.rowid, p.message_id, p.part,
                COALESCE(p.submitted_id, p.carrier_message_id) AS id, m.sender
         FROM parts p JOIN messages m ON m.id = p.message_id
         WHERE p.carrier = ?1 AND m.status = 'sent' AND p.state IN ('submitted', 'scheduled', 'enroute', 'accepted')
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
            tx,
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

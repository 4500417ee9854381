//! Which carrier message ids the store knows (how `receipt_id = "auto"` reads an id).

use crate::store::StoreError;

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

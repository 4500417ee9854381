//! Which carrier message ids the store knows (how `receipt_id = "auto"` reads an id).

use crate::store::StoreError;

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

//! Reads of the policy's tables on SQLite: opt-out lists, number histories and inbound SMS,
//! for the API and subject exports (on the reader pool, outside the writer).

use crate::store::shared::*;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use crate::store::{InboundView, NumberChange, NumberHistory, OptOut, StoreError};

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

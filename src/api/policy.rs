//! `/v1/opt-outs`, `/v1/number-changes` and `/v1/subjects`: the account's side of the policy.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Account;
use super::error::ApiError;
use super::{AppState, authenticate};
use crate::message::{Msisdn, Sender, now_ms, rfc3339};
use crate::policy::number_change::{self, ChangeKind};
use crate::store::{AccountPolicy, NumberChange, OptOut, OptOutSource, SubjectExport};

fn number(text: &str, field: &str) -> Result<String, ApiError> {
    Msisdn::parse(text)
        .map(|m| m.as_str().to_owned())
        .map_err(|e| ApiError::invalid("invalid_number", field, format!("`{field}` {e}")))
}

fn sender(text: Option<&str>) -> Result<Option<String>, ApiError> {
    text.map(|s| {
        Sender::parse(s)
            .map(|s| s.as_str().to_owned())
            .map_err(|e| ApiError::invalid("invalid_sender", "sender", format!("`sender` {e}")))
    })
    .transpose()
}

fn account_policy(account: &Account) -> AccountPolicy {
    AccountPolicy {
        service_messages: account.service_messages,
        follow_number_changes: account.follow_number_changes,
    }
}

fn by_api(account: &Account) -> OptOutSource {
    OptOutSource {
        source: "api",
        actor: Some(account.name.clone()),
    }
}

fn opt_out_json(o: &OptOut) -> Value {
    json!({
        "number": o.number,
        // What remains of an erased subject: the suppression still applies.
        "pseudonym": &o.number_key[..16],
        "sender": o.sender,
        "source": o.source,
        "created_at": rfc3339(o.created_at),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutRequest {
    number: String,
    sender: Option<String>,
}

pub async fn add_opt_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let request: OptOutRequest = super::json_body(&state, body).await?;
    let number = number(&request.number, "number")?;
    let sender = sender(request.sender.as_deref())?;
    let entries = vec![(number.clone(), sender.clone())];
    let added = state
        .store
        .add_opt_outs(
            &account.name,
            entries,
            by_api(&account),
            account_policy(&account),
        )
        .await?;
    let status = if added > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = json!({ "number": number, "sender": sender, "created": added > 0 });
    Ok((status, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderQuery {
    sender: Option<String>,
}

pub async fn remove_opt_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(number_text): Path<String>,
    Query(query): Query<SenderQuery>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let number = number(&number_text, "number")?;
    let sender = sender(query.sender.as_deref())?;
    let removed = state
        .store
        .remove_opt_out(&account.name, &number, sender, by_api(&account))
        .await?;
    if removed == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such opt-out",
        ));
    }
    Ok(Json(json!({ "number": number, "removed": removed })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn list_opt_outs(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit",
            "`limit` must be between 1 and 1000",
        ));
    }
    let page = state
        .store
        .list_opt_outs(&account.name, query.cursor, limit)
        .await?;
    let next_cursor = (page.len() == limit as usize)
        .then(|| page.last())
        .flatten()
        .map(|o| format!("{}:{}", o.number_key, o.sender.as_deref().unwrap_or("")));
    let entries: Vec<Value> = page.iter().map(opt_out_json).collect();
    Ok(Json(
        json!({ "opt_outs": entries, "next_cursor": next_cursor }),
    ))
}

/// The whole list as CSV (`number,sender,source,created_at`); erased numbers show empty.
pub async fn export_opt_outs(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let mut csv = String::from("number,sender,source,created_at\n");
    let mut cursor = None;
    loop {
        let page = state
            .store
            .list_opt_outs(&account.name, cursor.take(), 1000)
            .await?;
        for o in &page {
            csv.push_str(&format!(
                "{},{},{},{}\n",
                o.number.as_deref().unwrap_or(""),
                o.sender.as_deref().unwrap_or(""),
                o.source,
                rfc3339(o.created_at)
            ));
        }
        match page.last() {
            Some(o) if page.len() == 1000 => {
                cursor = Some(format!(
                    "{}:{}",
                    o.number_key,
                    o.sender.as_deref().unwrap_or("")
                ))
            }
            _ => break,
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/csv")], csv).into_response())
}

/// Bulk import: CSV lines `number[,sender]` (a header line is skipped) or JSON lines
/// `{"number": ..., "sender": ...}`. Valid lines are imported; the answer lists the others.
pub async fn import_opt_outs(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let bytes = super::read_body(&state, body).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be UTF-8 text",
        )
    })?;
    let (entries, errors) = parse_import(text);
    let imported = state
        .store
        .add_opt_outs(
            &account.name,
            entries,
            OptOutSource {
                source: "import",
                actor: Some(account.name.clone()),
            },
            account_policy(&account),
        )
        .await?;
    Ok(Json(json!({ "imported": imported, "errors": errors })))
}

/// Parses an import body; JSON lines start with `{`, anything else is CSV.
pub fn parse_import(text: &str) -> (Vec<(String, Option<String>)>, Vec<Value>) {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (index == 0 && line.to_ascii_lowercase().starts_with("number")) {
            continue;
        }
        let parsed = if line.starts_with('{') {
            serde_json::from_str::<OptOutRequest>(line)
                .map_err(|e| ApiError::from_json(&e))
                .map(|r| (r.number, r.sender))
        } else {
            let mut fields = line.split(',').map(str::trim);
            let number = fields.next().unwrap_or_default().to_owned();
            let sender = fields.next().filter(|s| !s.is_empty()).map(str::to_owned);
            Ok((number, sender))
        };
        let checked = parsed.and_then(|(n, s)| Ok((number(&n, "number")?, sender(s.as_deref())?)));
        match checked {
            Ok(entry) => entries.push(entry),
            Err(error) => errors.push(json!({ "line": index + 1, "error": error })),
        }
    }
    (entries, errors)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumberChangeRequest {
    pub number: String,
    /// `deactivated` or `changed`.
    pub kind: String,
    pub new_number: Option<String>,
    /// When it took effect (RFC 3339); now when absent. At most `policy.max_backdate` ago.
    pub effective_at: Option<String>,
}

pub async fn add_number_change(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let request: NumberChangeRequest = super::json_body(&state, body).await?;
    let change = number_change_from(
        request,
        Some(account.name.clone()),
        "api",
        state.live.load().policy.max_backdate,
    )?;
    let affected = state
        .store
        .add_number_changes(
            vec![change.clone()],
            state.live.load().accounts.following_changes(),
        )
        .await?;
    let body = json!({
        "number": change.number,
        "kind": change.kind.as_str(),
        "effective_at": rfc3339(change.effective_at),
        "messages_affected": affected,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Validates a reported change, including how far it may be backdated.
pub fn number_change_from(
    request: NumberChangeRequest,
    account: Option<String>,
    source: &str,
    max_backdate: Duration,
) -> Result<NumberChange, ApiError> {
    let number = number(&request.number, "number")?;
    let kind = match (request.kind.as_str(), request.new_number) {
        ("deactivated", None) => ChangeKind::Deactivated,
        ("changed", Some(new_number)) => ChangeKind::Changed {
            new_number: self::number(&new_number, "new_number")?,
        },
        ("deactivated", Some(_)) => {
            return Err(ApiError::invalid(
                "invalid_value",
                "new_number",
                "a deactivated number has no new_number",
            ));
        }
        ("changed", None) => {
            return Err(ApiError::invalid(
                "missing_field",
                "new_number",
                "a changed number needs new_number",
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "invalid_value",
                "kind",
                "`kind` is `deactivated` or `changed`",
            ));
        }
    };
    let now = now_ms();
    let effective_at = match request.effective_at.as_deref() {
        Some(text) => super::messages::parse_time(text, "effective_at")?,
        None => now,
    };
    number_change::check_report(&kind, &number, effective_at, now, max_backdate).map_err(|e| {
        let field = match e {
            number_change::ReportError::BadNewNumber => "new_number",
            _ => "effective_at",
        };
        ApiError::invalid("invalid_effective_at", field, e.to_string())
    })?;
    Ok(NumberChange {
        account,
        number,
        kind,
        effective_at,
        source: source.to_owned(),
    })
}

pub async fn number_history(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(number_text): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let number = number(&number_text, "number")?;
    let history = state.store.number_history(&account.name, &number).await?;
    let changes: Vec<Value> = history
        .changes
        .iter()
        .map(|(c, reported_at)| {
            let new_number = match &c.kind {
                ChangeKind::Changed { new_number } => Some(new_number.clone()),
                ChangeKind::Deactivated => None,
            };
            json!({
                "kind": c.kind.as_str(),
                "new_number": new_number,
                "effective_at": rfc3339(c.effective_at),
                "reported_at": rfc3339(*reported_at),
                "source": c.source,
                "scope": if c.account.is_some() { "account" } else { "global" },
            })
        })
        .collect();
    Ok(Json(json!({
        "number": number,
        "changes": changes,
        "suspect": history.suspect,
        "unknown_subscriber_results": history.failures,
    })))
}

/// The number works after all: it is no longer suspect and its held messages go out.
pub async fn clear_suspect(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(number_text): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let _account = authenticate(&state, &headers)?;
    let number = number(&number_text, "number")?;
    let cleared = state.store.clear_suspect(&number).await?;
    Ok(Json(json!({ "number": number, "cleared": cleared })))
}

/// Everything the account holds about a number (GDPR art. 15): its messages with their texts
/// and histories, the replies received from it, its opt-outs and number changes.
pub async fn export_subject(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(number_text): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let number = number(&number_text, "number")?;
    let export = state.store.export_subject(&account.name, &number).await?;
    Ok(Json(subject_json(&number, &export)))
}

pub fn subject_json(number: &str, export: &SubjectExport) -> Value {
    let messages: Vec<Value> = export
        .messages
        .iter()
        .map(|m| {
            let mut value = super::messages::view_json(m, true);
            value["text"] = json!(m.body);
            value
        })
        .collect();
    let inbound: Vec<Value> = export
        .inbound
        .iter()
        .map(|i| json!({ "id": i.id, "to": i.to, "text": i.body, "received_at": rfc3339(i.received_at) }))
        .collect();
    let opt_outs: Vec<Value> = export.opt_outs.iter().map(opt_out_json).collect();
    let changes: Vec<Value> = export
        .number
        .changes
        .iter()
        .map(|(c, _)| json!({ "kind": c.kind.as_str(), "effective_at": rfc3339(c.effective_at), "source": c.source }))
        .collect();
    json!({
        "number": number,
        "messages": messages,
        "inbound": inbound,
        "opt_outs": opt_outs,
        "number_changes": changes,
        "suspect": export.number.suspect,
    })
}

/// Erases what the account holds about a number; an opt-out stays, pseudonymised.
pub async fn erase_subject(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(number_text): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let number = number(&number_text, "number")?;
    let erased = state.store.erase_subject(&account.name, &number).await?;
    Ok(Json(json!({
        "messages": erased.messages,
        "inbound": erased.inbound,
        "number_changes": erased.number_changes,
        "suppressions_kept": erased.suppressions_kept,
    })))
}

//! `/v1/messages`: submit (single and batch), read, list, cancel.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::auth::Account;
use super::error::ApiError;
use super::{AppState, authenticate};
use crate::encoding;
use crate::message::{Category, MessageId, Msisdn, Sender, Status, now_ms, rfc3339};
use crate::metrics;
use crate::store::{
    AccountPolicy, CancelResult, IdempotencyRequest, IdempotentAnswer, ListFilter, MessageView,
    NewMessage, RenderAnswer, SubmitResult,
};

/// One message as an application submits it. Unknown fields are refused, so a typo such as
/// `"catgory"` is an error rather than a silent default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitRequest {
    to: String,
    from: String,
    text: String,
    #[serde(default)]
    category: Category,
    consent_at: Option<String>,
    send_at: Option<String>,
    /// How long the gateway may keep trying, e.g. `"2h"`.
    valid_for: Option<String>,
    #[serde(default)]
    priority: Priority,
    callback_url: Option<String>,
    reference: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Priority {
    #[default]
    Normal,
    High,
}

#[derive(Debug, Serialize)]
struct Accepted {
    id: String,
    status: Status,
    segments: u32,
    encoding: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

const MAX_REFERENCE: usize = 128;
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let bytes = super::read_body(&state, body).await?;
    let idempotency_key = idempotency_key(&headers)?;
    let request_hash = hex::encode(Sha256::digest(&bytes));
    if let Some(key) = &idempotency_key
        && let Some(first) = state.store.idempotent_answer(&account.name, key).await?
    {
        return replay(first, &request_hash);
    }
    let parsed = build(&state, &account, &bytes)
        .inspect_err(|e| metrics::rejected(&account.name, e.code))?;
    let stored = parsed.messages.len();
    let idempotency = idempotency_key.map(|key| IdempotencyRequest {
        key,
        request_hash: request_hash.clone(),
    });
    let policy = AccountPolicy {
        service_messages: account.service_messages,
        follow_number_changes: account.follow_number_changes,
    };
    let render = parsed.renderer();
    match state
        .store
        .submit(policy, parsed.messages, idempotency, render)
        .await?
    {
        SubmitResult::Stored {
            status_code,
            answer,
        } => {
            metrics::accepted(&account.name, stored);
            let status = StatusCode::from_u16(status_code).unwrap_or(StatusCode::ACCEPTED);
            Ok(json_response(status, answer))
        }
        SubmitResult::Replay(first) => replay(first, &request_hash),
    }
}

/// A validated request: the messages to store, and where the items that failed validation
/// stand in a batch.
struct Parsed {
    batch: bool,
    messages: Vec<NewMessage>,
    /// One entry per item: the validation error, or None for the next stored message.
    items: Vec<Option<ApiError>>,
}

impl Parsed {
    /// Renders the answer once policy has decided each message (inside the store's commit).
    fn renderer(&self) -> RenderAnswer {
        let batch = self.batch;
        let items = self.items.clone();
        Arc::new(move |stored: &[NewMessage]| {
            if !batch {
                return match stored.first() {
                    Some(m) => single_answer(m),
                    None => (StatusCode::INTERNAL_SERVER_ERROR.as_u16(), "{}".into()),
                };
            }
            let mut stored = stored.iter();
            let answers: Vec<Value> = items
                .iter()
                .map(|item| match item {
                    Some(error) => json!({ "error": error }),
                    None => stored.next().map(item_answer).unwrap_or(Value::Null),
                })
                .collect();
            let status = if items.iter().all(Option::is_some) {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::ACCEPTED
            };
            (status.as_u16(), json!({ "messages": answers }).to_string())
        })
    }
}

/// A message the policy refused carries its refusal as an error with its code.
fn item_answer(m: &NewMessage) -> Value {
    let mut value = serde_json::to_value(accepted(m)).unwrap_or_default();
    if let Some(code) = refusal_code(m.status) {
        value["error"] = json!({
            "code": code,
            "message": m.detail.clone().unwrap_or_default(),
            "field": "to",
        });
    }
    value
}

fn single_answer(m: &NewMessage) -> (u16, String) {
    let status = match refusal_code(m.status) {
        Some(_) => StatusCode::UNPROCESSABLE_ENTITY,
        None => StatusCode::ACCEPTED,
    };
    (status.as_u16(), item_answer(m).to_string())
}

fn refusal_code(status: Status) -> Option<&'static str> {
    match status {
        Status::RefusedOptedOut | Status::RefusedNumberChanged | Status::RefusedInvalid => {
            Some(status.as_str())
        }
        _ => None,
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY => Ok(Some(key.to_owned())),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )),
    }
}

fn replay(first: IdempotentAnswer, request_hash: &str) -> Result<Response, ApiError> {
    if first.request_hash != request_hash {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body",
        ));
    }
    let status = StatusCode::from_u16(first.status_code).unwrap_or(StatusCode::ACCEPTED);
    let mut response = json_response(status, first.answer);
    response.headers_mut().insert(
        "idempotent-replayed",
        axum::http::HeaderValue::from_static("true"),
    );
    Ok(response)
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Validates the body (one message, or `{"messages": [...]}`) into what to store and what to
/// answer. A batch answers per item; its valid items are stored even when others are not.
fn build(state: &AppState, account: &Account, bytes: &Bytes) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::from_json(&e))?;
    let now = now_ms();
    let batch = match &value {
        Value::Object(map) if map.contains_key("messages") => {
            if map.len() > 1 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unknown_field",
                    "a batch body has only the field `messages`",
                ));
            }
            match &map["messages"] {
                Value::Array(items) => items,
                _ => {
                    return Err(ApiError::invalid(
                        "invalid_value",
                        "messages",
                        "`messages` must be an array",
                    ));
                }
            }
        }
        _ => {
            let request: SubmitRequest =
                serde_json::from_value(value).map_err(|e| ApiError::from_json(&e))?;
            let message = validate(state, account, request, now)?;
            return Ok(Parsed {
                batch: false,
                messages: vec![message],
                items: vec![None],
            });
        }
    };
    let max = state.http.max_batch;
    if batch.is_empty() || batch.len() > max {
        return Err(ApiError::invalid(
            "invalid_batch_size",
            "messages",
            format!("a batch holds 1 to {max} messages"),
        ));
    }
    let mut parsed = Parsed {
        batch: true,
        messages: Vec::with_capacity(batch.len()),
        items: Vec::with_capacity(batch.len()),
    };
    for item in batch {
        let result = serde_json::from_value::<SubmitRequest>(item.clone())
            .map_err(|e| ApiError::from_json(&e))
            .and_then(|request| validate(state, account, request, now));
        match result {
            Ok(message) => {
                parsed.messages.push(message);
                parsed.items.push(None);
            }
            Err(error) => {
                metrics::rejected(&account.name, error.code);
                parsed.items.push(Some(error));
            }
        }
    }
    Ok(parsed)
}

fn accepted(message: &NewMessage) -> Accepted {
    Accepted {
        id: message.id.to_string(),
        status: message.status,
        segments: message.segments,
        encoding: message.encoding.as_str(),
        reference: message.reference.clone(),
    }
}

fn validate(
    state: &AppState,
    account: &Account,
    request: SubmitRequest,
    now: i64,
) -> Result<NewMessage, ApiError> {
    let recipient = Msisdn::parse(&request.to)
        .map_err(|e| ApiError::invalid("invalid_number", "to", format!("`to` {e}")))?;
    let sender = Sender::parse(&request.from)
        .map_err(|e| ApiError::invalid("invalid_sender", "from", format!("`from` {e}")))?;
    if !account.may_send_as(sender.as_str()) {
        return Err(ApiError::invalid(
            "sender_not_allowed",
            "from",
            "this account may not send from that sender; see its `senders`",
        ));
    }
    if request.text.trim().is_empty() {
        return Err(ApiError::invalid(
            "empty_text",
            "text",
            "`text` must not be empty",
        ));
    }
    let plan = encoding::plan(&request.text);
    let max_segments = state.messages.max_segments;
    if plan.segments > max_segments {
        return Err(ApiError::invalid(
            "text_too_long",
            "text",
            format!(
                "`text` needs {} SMS segments ({}); at most {max_segments} are allowed",
                plan.segments,
                plan.encoding.as_str()
            ),
        ));
    }
    let consent_at = request
        .consent_at
        .as_deref()
        .map(|t| parse_time(t, "consent_at"))
        .transpose()?
        .or(account.default_consent_at);
    let send_at = request
        .send_at
        .as_deref()
        .map(|t| parse_time(t, "send_at"))
        .transpose()?;
    let validity = match request.valid_for.as_deref() {
        None => state.messages.default_validity,
        Some(text) => parse_validity(text, state.messages.max_validity)?,
    };
    if let Some(url) = &request.callback_url {
        check_callback_url(url)?;
        if !account.can_sign_webhooks {
            return Err(ApiError::invalid(
                "webhooks_not_configured",
                "callback_url",
                "the account has no webhook_secret, and webhooks are always signed",
            ));
        }
    }
    if let Some(reference) = &request.reference
        && reference.len() > MAX_REFERENCE
    {
        return Err(ApiError::invalid(
            "invalid_reference",
            "reference",
            format!("`reference` has at most {MAX_REFERENCE} bytes"),
        ));
    }
    let due_at = send_at.unwrap_or(now).max(now);
    let status = if due_at > now {
        Status::Scheduled
    } else {
        Status::Queued
    };
    Ok(NewMessage {
        id: MessageId::new(),
        account: account.name.clone(),
        reference: request.reference,
        recipient: recipient.as_str().to_owned(),
        sender: sender.as_str().to_owned(),
        body: request.text,
        category: request.category,
        encoding: plan.encoding,
        segments: plan.segments as u32,
        priority: match request.priority {
            Priority::Normal => 0,
            Priority::High => 1,
        },
        webhook_url: request.callback_url.or_else(|| account.webhook_url.clone()),
        consent_at,
        status,
        detail: None,
        created_at: now,
        due_at,
        expires_at: due_at + validity.as_millis() as i64,
    })
}

pub(super) fn parse_time(text: &str, field: &str) -> Result<i64, ApiError> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            ApiError::invalid(
                "invalid_time",
                field,
                format!("`{field}` must be an RFC 3339 time such as 2026-01-01T12:00:00Z"),
            )
        })?;
    Ok((time.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn parse_validity(text: &str, max: Duration) -> Result<Duration, ApiError> {
    let validity = humantime::parse_duration(text).map_err(|_| {
        ApiError::invalid(
            "invalid_validity",
            "valid_for",
            "`valid_for` must be a duration such as \"30m\" or \"2h\"",
        )
    })?;
    if validity < Duration::from_secs(1) || validity > max {
        return Err(ApiError::invalid(
            "invalid_validity",
            "valid_for",
            format!(
                "`valid_for` must be between 1s and {}",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(validity)
}

fn check_callback_url(url: &str) -> Result<(), ApiError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(ApiError::invalid(
            "invalid_callback_url",
            "callback_url",
            "`callback_url` must be an absolute http or https URL",
        )),
    }
}

pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let id: MessageId = id.parse().map_err(|_| ApiError::not_found())?;
    let view = state
        .store
        .get_message(&account.name, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(view_json(&view, true)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    to: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

const MAX_PAGE: u32 = 500;

pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let status = query
        .status
        .as_deref()
        .map(|s| {
            s.parse::<Status>().map_err(|_| {
                ApiError::invalid("invalid_status", "status", format!("unknown status `{s}`"))
            })
        })
        .transpose()?;
    let recipient = query
        .to
        .as_deref()
        .map(|n| {
            Msisdn::parse(n)
                .map(|m| m.as_str().to_owned())
                .map_err(|e| ApiError::invalid("invalid_number", "to", format!("`to` {e}")))
        })
        .transpose()?;
    let since = query
        .since
        .as_deref()
        .map(|t| parse_time(t, "since"))
        .transpose()?;
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<MessageId>()
                .map_err(|_| ApiError::invalid("invalid_cursor", "cursor", "unknown cursor"))
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    let filter = ListFilter {
        status,
        recipient,
        since,
        before,
        limit,
    };
    let page = state.store.list_messages(&account.name, &filter).await?;
    let next_cursor = (page.len() == limit as usize)
        .then(|| page.last().map(|m| m.id.to_string()))
        .flatten();
    let messages: Vec<Value> = page.iter().map(|m| view_json(m, false)).collect();
    Ok(Json(
        json!({ "messages": messages, "next_cursor": next_cursor }),
    ))
}

pub async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let id: MessageId = id.parse().map_err(|_| ApiError::not_found())?;
    match state.store.cancel(&account.name, id).await? {
        CancelResult::Canceled => Ok(Json(
            json!({ "id": id.to_string(), "status": Status::Canceled }),
        )),
        CancelResult::NotFound => Err(ApiError::not_found()),
        CancelResult::TooLate(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancelable",
            format!("the message is {status}; only queued or scheduled messages can be canceled"),
        )),
    }
}

pub(super) fn view_json(m: &MessageView, with_events: bool) -> Value {
    let mut value = json!({
        "id": m.id.to_string(),
        "reference": m.reference,
        "to": m.recipient,
        "from": m.sender,
        "category": m.category,
        "status": m.status,
        "detail": m.detail,
        "error_code": m.error_code,
        "segments": m.segments,
        "encoding": m.encoding.as_str(),
        "carrier": m.carrier,
        "attempts": m.attempts,
        "created_at": rfc3339(m.created_at),
        "updated_at": rfc3339(m.updated_at),
        "expires_at": rfc3339(m.expires_at),
    });
    if with_events {
        value["events"] = m
            .events
            .iter()
            .map(|e| json!({ "status": e.status, "at": rfc3339(e.at), "detail": e.detail }))
            .collect();
    }
    value
}

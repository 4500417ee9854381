//! `/v1/messages`: submit (single and batch), read, list, cancel.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::auth::Account;
use super::error::{ApiError, ErrorEnvelope};
use super::{AppState, Authenticated};
use crate::config::{HttpConfig, MessagesConfig};
use crate::encoding::{self, Encoding};
use crate::message::{Category, MessageId, Msisdn, Sender, Status, now_ms, rfc3339};
use crate::metrics;
use crate::router::{Facts, RouteTable};
use crate::store::{
    AccountPolicy, CancelResult, IdempotencyRequest, IdempotentAnswer, ListFilter, MessageView,
    NewMessage, RenderAnswer, SubmitResult,
};
use crate::webhook::egress;

/// One message as an application submits it. Unknown fields are refused, so a typo such as
/// `"catgory"` is an error rather than a silent default.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"to": "+46701234567", "from": "iP1", "text": "Hej! Your code is 1234"}))]
pub(super) struct SubmitRequest {
    /// The recipient in international format (`+` and the country code); normalised to E.164.
    #[schema(pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")]
    to: String,
    /// An alphanumeric sender of up to 11 characters, or digits; the account's `senders` limit it.
    #[schema(example = "iP1")]
    from: String,
    /// The text; GSM-7 when every character allows it, else UCS-2. At most
    /// `messages.max_segments` segments.
    text: String,
    #[serde(default)]
    category: Category,
    /// When the recipient consented (RFC 3339); a number change after it refuses the message.
    #[schema(format = DateTime)]
    consent_at: Option<String>,
    /// When to send (RFC 3339); a later time gives status `scheduled`.
    #[schema(format = DateTime)]
    send_at: Option<String>,
    /// How long the gateway may keep trying, e.g. `"2h"` (default `messages.default_validity`).
    #[schema(example = "2h")]
    valid_for: Option<String>,
    #[serde(default)]
    priority: Priority,
    /// Where to post this message's status webhooks (else the account's `webhook_url`): an
    /// http or https URL of at most 2,048 bytes that reaches a public address.
    #[schema(max_length = 2048)]
    callback_url: Option<String>,
    /// Yours, echoed in webhooks; at most 128 bytes.
    reference: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum Priority {
    #[default]
    Normal,
    High,
}

/// A batch: up to `http.max_batch` messages in one transaction, one answer per item.
/// (Documentation only: `build` reads the body as JSON and each item as a `SubmitRequest`.)
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct SubmitBatch {
    #[schema(min_items = 1)]
    messages: Vec<SubmitRequest>,
}

/// What `POST /v1/messages` takes: one message or a batch. (Documentation only.)
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(super) enum SubmitBody {
    One(SubmitRequest),
    Batch(SubmitBatch),
}

/// A stored message: its id, its status (queued, scheduled, or the policy's refusal), and how
/// it is sent. A message the policy refused carries the refusal in `error`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "01a223dd-7b4b-738d-a599-a25452d8d82e", "status": "queued", "segments": 1, "encoding": "gsm7"}))]
pub(super) struct Accepted {
    #[schema(format = "uuid")]
    id: String,
    status: Status,
    segments: u32,
    #[schema(value_type = Encoding)]
    encoding: &'static str,
    /// Yours, as submitted; absent when none was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    reference: Option<String>,
    /// The policy's refusal (`refused_opted_out`, `refused_number_changed`), when it refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    error: Option<ApiError>,
}

/// One item of a batch's answer: the stored message, or why the item was not stored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(super) enum BatchItem {
    Stored(Accepted),
    Invalid { error: ApiError },
}

/// A batch's answer: one item per submitted message, in order.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BatchAnswer {
    messages: Vec<Option<BatchItem>>,
}

/// What `POST /v1/messages` answers with 202: the stored message, or the batch's answer.
/// (Documentation only.)
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(super) enum SubmitAnswer {
    One(Accepted),
    Batch(BatchAnswer),
}

/// What `POST /v1/messages` answers with 422: an invalid request, a single message the policy
/// refused (stored, with its `id` and the refusal in `error`), or a batch none of whose items
/// was valid. (Documentation only.)
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(super) enum SubmitRefused {
    Invalid(ErrorEnvelope),
    Refused(Accepted),
    Batch(BatchAnswer),
}

const MAX_REFERENCE: usize = 128;
/// Clocks of applications and the gateway may differ this much.
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;
/// How far ahead a message may be scheduled.
const MAX_SCHEDULE_AHEAD_MS: i64 = 365 * 24 * 3600 * 1000;
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Submit one message, or a batch of them.
///
/// The answer comes once the message is committed to disk. A repeated request with the same
/// `Idempotency-Key` gets the first answer again (with `Idempotent-Replayed: true`); the same
/// key with another body is `422 idempotency_key_reused`.
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "messages",
    operation_id = "submit",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
            description = "Makes a retried request safe: the first answer is given again"),
    ),
    request_body(content = SubmitBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Stored: the message (or each valid item of a batch)",
            body = SubmitAnswer,
            headers(("Idempotent-Replayed" = String,
                description = "`true` when this is the first answer to this Idempotency-Key")),
            links(
                ("GetMessage" = (operation_id = "get_message",
                    parameters(("id" = "$response.body#/id")),
                    description = "The stored message (a single submit)")),
                ("CancelMessage" = (operation_id = "cancel_message",
                    parameters(("id" = "$response.body#/id")),
                    description = "Cancel it while it waits (a single submit)")),
            )),
        (status = 400, description = "Not JSON, an unknown or missing field, a value of the \
            wrong type (`invalid_json`, `unknown_field`, `missing_field`, `invalid_value`), or \
            a bad Idempotency-Key", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 408, description = "The body did not arrive within `http.request_timeout`",
            body = ErrorEnvelope),
        (status = 413, description = "The body is larger than `http.max_body_bytes`",
            body = ErrorEnvelope),
        (status = 422, description = "A field is invalid, the policy refused the message, or \
            no item of a batch was valid", body = SubmitRefused),
        (status = 503, description = "The store cannot take it now; nothing was stored",
            body = ErrorEnvelope),
    ),
)]
pub async fn submit(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = super::read_body(&state, body).await?;
    let answer = submit_body(&state, &account, &bytes, idempotency_key).await?;
    Ok(answer.into_response())
}

/// The answer to a submission: its HTTP status and JSON body, and whether it is the first
/// answer to its idempotency key given again.
#[derive(Debug)]
pub(crate) struct SubmitOutcome {
    pub status: StatusCode,
    pub body: String,
    pub replayed: bool,
}

impl IntoResponse for SubmitOutcome {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, self.body);
        if self.replayed {
            response.headers_mut().insert(
                "idempotent-replayed",
                axum::http::HeaderValue::from_static("true"),
            );
        }
        response
    }
}

/// Submits a body of `POST /v1/messages` (one message or a batch) for `account`: idempotency,
/// validation, policy and the durable commit. It answers once the messages are committed.
/// The HTTP API and the queue intake (`crate::intake`) both submit through here.
pub(crate) async fn submit_body(
    state: &AppState,
    account: &Account,
    bytes: &[u8],
    idempotency_key: Option<String>,
) -> Result<SubmitOutcome, ApiError> {
    // Only a request with a key is compared with an earlier one, so only it is hashed.
    let idempotency = idempotency_key.map(|key| IdempotencyRequest {
        key,
        request_hash: hex::encode(Sha256::digest(bytes)),
    });
    if let Some(request) = &idempotency
        && let Some(first) = state
            .store
            .idempotent_answer(&account.name, &request.key)
            .await?
    {
        return replay(first, &request.request_hash);
    }
    // The store replays only a request with a key (one that raced an equal key).
    let request_hash = idempotency.as_ref().map(|r| r.request_hash.clone());
    let routes = state.carriers.table();
    let rules = SubmitRules {
        http: &state.http,
        messages: &state.messages,
        routes: &routes,
    };
    let parsed = parse_submission(&rules, account, bytes)
        .inspect_err(|e| metrics::rejected(&account.name, e.code))?;
    let stored = parsed.messages.len();
    let policy = AccountPolicy {
        service_messages: account.service_messages,
        follow_number_changes: account.follow_number_changes,
    };
    let render = parsed.renderer();
    match state
        .store
        .submit(&account.name, policy, parsed.messages, idempotency, render)
        .await?
    {
        SubmitResult::Stored {
            status_code,
            answer,
        } => {
            metrics::accepted(&account.name, stored);
            Ok(SubmitOutcome {
                status: StatusCode::from_u16(status_code).unwrap_or(StatusCode::ACCEPTED),
                body: answer,
                replayed: false,
            })
        }
        SubmitResult::Replay(first) => replay(first, request_hash.as_deref().unwrap_or_default()),
    }
}

/// A validated request: the messages to store, and where the items that failed validation
/// stand in a batch.
#[derive(Debug)]
pub struct Parsed {
    pub batch: bool,
    pub messages: Vec<NewMessage>,
    /// One entry per item: the validation error, or None for the next stored message.
    pub items: Vec<Option<ApiError>>,
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
            let messages = items
                .iter()
                .map(|item| match item {
                    Some(error) => Some(BatchItem::Invalid {
                        error: error.clone(),
                    }),
                    None => stored.next().map(|m| BatchItem::Stored(accepted(m))),
                })
                .collect();
            let status = if items.iter().all(Option::is_some) {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::ACCEPTED
            };
            (status.as_u16(), to_json(&BatchAnswer { messages }))
        })
    }
}

fn to_json(answer: &impl Serialize) -> String {
    serde_json::to_string(answer).unwrap_or_else(|_| "{}".into())
}

fn single_answer(m: &NewMessage) -> (u16, String) {
    let status = match refusal_code(m.status) {
        Some(_) => StatusCode::UNPROCESSABLE_ENTITY,
        None => StatusCode::ACCEPTED,
    };
    (status.as_u16(), to_json(&accepted(m)))
}

fn refusal_code(status: Status) -> Option<&'static str> {
    match status {
        Status::RefusedOptedOut | Status::RefusedNumberChanged | Status::RefusedInvalid => {
            Some(status.as_str())
        }
        _ => None,
    }
}

/// The request's `Idempotency-Key`, checked, if it has one.
pub struct IdempotencyKey(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey(None));
        };
        checked_idempotency_key(value.to_str().unwrap_or_default(), "Idempotency-Key")
            .map(|key| IdempotencyKey(Some(key)))
    }
}

/// An idempotency key as given (`name`: the HTTP `Idempotency-Key`, an AMQP `message_id`),
/// checked.
pub(crate) fn checked_idempotency_key(key: &str, name: &str) -> Result<String, ApiError> {
    let visible = |b: u8| b == b'\t' || (b' '..=b'~').contains(&b);
    if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY && key.bytes().all(visible) {
        return Ok(key.to_owned());
    }
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_idempotency_key",
        format!("{name} must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
    ))
}

fn replay(first: IdempotentAnswer, request_hash: &str) -> Result<SubmitOutcome, ApiError> {
    if first.request_hash != request_hash {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body",
        ));
    }
    Ok(SubmitOutcome {
        status: StatusCode::from_u16(first.status_code).unwrap_or(StatusCode::ACCEPTED),
        body: first.answer,
        replayed: true,
    })
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// What a submission is checked against: the limits and the routes in force.
pub struct SubmitRules<'a> {
    pub http: &'a HttpConfig,
    pub messages: &'a MessagesConfig,
    pub routes: &'a RouteTable,
}

/// Validates the body (one message, or `{"messages": [...]}`) into what to store and what to
/// answer. A batch answers per item; its valid items are stored even when others are not.
/// Pure (no store, no network): `fuzz/fuzz_targets/submit_body.rs` feeds it arbitrary bytes.
pub fn parse_submission(
    rules: &SubmitRules<'_>,
    account: &Account,
    bytes: &[u8],
) -> Result<Parsed, ApiError> {
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
            let message = validate(rules, account, request, now)?;
            return Ok(Parsed {
                batch: false,
                messages: vec![message],
                items: vec![None],
            });
        }
    };
    let max = rules.http.max_batch;
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
            .and_then(|request| validate(rules, account, request, now));
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

/// A message the policy refused carries its refusal as an error with its code.
fn accepted(message: &NewMessage) -> Accepted {
    Accepted {
        id: message.id.to_string(),
        status: message.status,
        segments: message.segments,
        encoding: message.encoding.as_str(),
        reference: message.reference.clone(),
        error: refusal_code(message.status)
            .map(|code| ApiError::invalid(code, "to", message.detail.clone().unwrap_or_default())),
    }
}

fn validate(
    rules: &SubmitRules<'_>,
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
    let facts = Facts {
        recipient: recipient.as_str(),
        sender: sender.as_str(),
        account: &account.name,
        category: request.category,
    };
    // Refused now rather than held for a route that may never come: the application hears it.
    if !rules.routes.has_route(&facts) {
        return Err(ApiError::invalid(
            "no_route",
            "to",
            "no route of the gateway takes this message (its destination, sender or category); ask the operator",
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
    let max_segments = rules.messages.max_segments;
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
    // Consent from the future would outrank every number change (rule 3).
    if consent_at.is_some_and(|at| at > now + CLOCK_SKEW_MS) {
        return Err(ApiError::invalid(
            "invalid_time",
            "consent_at",
            "`consent_at` cannot be in the future",
        ));
    }
    let send_at = request
        .send_at
        .as_deref()
        .map(|t| parse_time(t, "send_at"))
        .transpose()?;
    if send_at.is_some_and(|at| at > now + MAX_SCHEDULE_AHEAD_MS) {
        return Err(ApiError::invalid(
            "invalid_time",
            "send_at",
            "`send_at` may be at most 365 days ahead",
        ));
    }
    let validity = match request.valid_for.as_deref() {
        None => rules.messages.default_validity,
        Some(text) => parse_validity(text, rules.messages.max_validity)?,
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

/// Longest `callback_url`, in bytes: real receivers' URLs are far shorter, and each message
/// keeps its URL until it is purged.
const MAX_CALLBACK_URL: usize = 2048;

/// A callback is set by an application, not the operator: it may reach public addresses only
/// (the admin API listens on loopback), whatever `webhooks.allow_internal` says. A literal
/// address is judged here, by the rule the webhook sender applies to every address it
/// connects to ([`egress::is_public`]); a name is judged when the webhook is posted, on what
/// it then resolves to.
fn check_callback_url(url: &str) -> Result<(), ApiError> {
    let invalid =
        |message: &str| ApiError::invalid("invalid_callback_url", "callback_url", message);
    if url.len() > MAX_CALLBACK_URL {
        return Err(invalid(&format!(
            "`callback_url` has at most {MAX_CALLBACK_URL} bytes"
        )));
    }
    let url = reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| invalid("`callback_url` must be an absolute http or https URL"))?;
    let host = url.host_str().unwrap_or("").trim_end_matches('.');
    let private = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(address) => !egress::is_public(address),
        Err(_) => host.is_empty() || host == "localhost" || host.ends_with(".localhost"),
    };
    if private {
        return Err(invalid(
            "`callback_url` may not point at this machine or a private network",
        ));
    }
    Ok(())
}

/// A message id in a path; one that is not a message id is answered like an unknown one.
fn message_id(path: Result<Path<String>, PathRejection>) -> Result<MessageId, ApiError> {
    let text = super::path_param(path, ApiError::not_found)?;
    text.parse().map_err(|_| ApiError::not_found())
}

/// A message and its history.
#[utoipa::path(
    get,
    path = "/v1/messages/{id}",
    tag = "messages",
    operation_id = "get_message",
    security(("bearer" = [])),
    params(("id" = String, Path, format = "uuid", description = "The message id")),
    responses(
        (status = 200, description = "The message, with `events`", body = MessageJson),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such message for this account (`not_found`)",
            body = ErrorEnvelope),
        (status = 503, description = "The store cannot answer now", body = ErrorEnvelope),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<MessageJson>, ApiError> {
    let id = message_id(id)?;
    let view = state
        .store
        .get_message(&account.name, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(view_json(&view, true)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only messages in this status.
    #[param(value_type = Option<Status>)]
    status: Option<String>,
    /// Only messages to this number (international format).
    #[param(pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")]
    to: Option<String>,
    /// Only messages created at or after this time (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Messages per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

const MAX_PAGE: u32 = 500;

/// A page of messages.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MessagePage {
    /// Newest first; without `events`.
    messages: Vec<MessageJson>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// The account's messages, newest first.
#[utoipa::path(
    get,
    path = "/v1/messages",
    tag = "messages",
    operation_id = "list_messages",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "An unknown parameter or a value of the wrong type \
            (`invalid_query`)", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 422, description = "A parameter is invalid (`invalid_status`, \
            `invalid_number`, `invalid_time`, `invalid_cursor`, `invalid_limit`)",
            body = ErrorEnvelope),
        (status = 503, description = "The store cannot answer now", body = ErrorEnvelope),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let query = super::query(query)?;
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
    let messages = page.iter().map(|m| view_json(m, false)).collect();
    Ok(Json(MessagePage {
        messages,
        next_cursor,
    }))
}

/// A canceled message.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Canceled {
    #[schema(format = "uuid")]
    id: String,
    /// `canceled`.
    status: Status,
}

/// Cancel a message that is still `queued` or `scheduled`.
#[utoipa::path(
    delete,
    path = "/v1/messages/{id}",
    tag = "messages",
    operation_id = "cancel_message",
    security(("bearer" = [])),
    params(("id" = String, Path, format = "uuid", description = "The message id")),
    responses(
        (status = 200, description = "Canceled", body = Canceled),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such message for this account (`not_found`)",
            body = ErrorEnvelope),
        (status = 409, description = "The message is past `queued` or `scheduled` \
            (`not_cancelable`)", body = ErrorEnvelope),
        (status = 503, description = "The store cannot answer now", body = ErrorEnvelope),
    ),
)]
pub async fn cancel(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Canceled>, ApiError> {
    let id = message_id(id)?;
    match state.store.cancel(&account.name, id).await? {
        CancelResult::Canceled => Ok(Json(Canceled {
            id: id.to_string(),
            status: Status::Canceled,
        })),
        CancelResult::NotFound => Err(ApiError::not_found()),
        CancelResult::TooLate(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancelable",
            format!("the message is {status}; only queued or scheduled messages can be canceled"),
        )),
    }
}

/// A message as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Message)]
pub(super) struct MessageJson {
    #[schema(format = "uuid")]
    id: String,
    reference: Option<String>,
    /// The recipient, E.164.
    to: String,
    from: String,
    category: Category,
    status: Status,
    /// Why it is in its status, for people.
    detail: Option<String>,
    /// The carrier's error (`command_status` or receipt `err:`) of a failed message.
    error_code: Option<String>,
    segments: u32,
    #[schema(value_type = Encoding)]
    encoding: &'static str,
    /// The carrier it went to.
    carrier: Option<String>,
    attempts: u32,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// When the gateway stops trying.
    #[schema(format = DateTime)]
    expires_at: String,
    /// The history, oldest first; only on `GET /v1/messages/{id}` and in a subject export.
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<Vec<EventJson>>,
}

/// One status change of a message.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Event)]
pub(super) struct EventJson {
    status: Status,
    #[schema(format = DateTime)]
    at: String,
    detail: Option<String>,
}

pub(super) fn view_json(m: &MessageView, with_events: bool) -> MessageJson {
    MessageJson {
        id: m.id.to_string(),
        reference: m.reference.clone(),
        to: m.recipient.clone(),
        from: m.sender.clone(),
        category: m.category,
        status: m.status,
        detail: m.detail.clone(),
        error_code: m.error_code.clone(),
        segments: m.segments,
        encoding: m.encoding.as_str(),
        carrier: m.carrier.clone(),
        attempts: m.attempts,
        created_at: rfc3339(m.created_at),
        updated_at: rfc3339(m.updated_at),
        expires_at: rfc3339(m.expires_at),
        events: with_events.then(|| {
            m.events
                .iter()
                .map(|e| EventJson {
                    status: e.status,
                    at: rfc3339(e.at),
                    detail: e.detail.clone(),
                })
                .collect()
        }),
    }
}

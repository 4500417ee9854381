//! The operators' API, on its own listener (a Unix socket by default, or TCP with a token; see
//! `guard` for what it refuses): gateway status, the queue across accounts, pausing carriers,
//! and the metrics. `smsgw status|queue|carriers|receipts|route` talk to it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::guard::Guard;
use crate::config::MessagesConfig;
use crate::message::{Category, MessageId, Msisdn, Pseudonymizer, Status, now_ms, rfc3339};
use crate::router::{Facts, Router as CarrierRouter};
use crate::store::{CancelResult, Store};

#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn Store>,
    pub carriers: Arc<CarrierRouter>,
    pub messages: Arc<MessagesConfig>,
    /// Operators see numbers as pseudonyms: the queue is for diagnosis, not for reading.
    pub pseudonyms: Pseudonymizer,
    /// Receipts that matched no message (numbers already pseudonymised).
    pub unmatched: Arc<crate::receipt::unmatched::UnmatchedLog>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

/// The admin API behind `guard`; a body (none of today's routes takes one) is at most
/// `max_body_bytes`, as on the API.
pub fn router(state: AdminState, guard: &Guard, max_body_bytes: usize) -> Router {
    let routes = Router::new()
        .route("/admin/status", get(status))
        .route("/admin/queue", get(queue))
        .route("/admin/queue/{id}/retry", post(retry))
        .route("/admin/queue/{id}/cancel", post(cancel))
        .route("/admin/route", get(route))
        .route("/admin/carriers/{name}/pause", post(pause))
        .route("/admin/carriers/{name}/resume", post(resume))
        .route("/admin/receipts/unmatched", get(unmatched_receipts))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state);
    guard.protect(routes)
}

/// Prometheus's own listener (`metrics.listen`): `GET /metrics` and nothing else, behind
/// `guard`.
pub fn metrics_router(
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    guard: &Guard,
) -> Router {
    let routes = Router::new()
        .route(
            "/metrics",
            get(
                |State(handle): State<metrics_exporter_prometheus::PrometheusHandle>| async move {
                    handle.render()
                },
            ),
        )
        .with_state(prometheus);
    guard.protect(routes)
}

/// The gateway's metrics in the Prometheus text format, also here for an operator on the
/// socket (`curl --unix-socket`).
async fn metrics(State(state): State<AdminState>) -> String {
    state.prometheus.render()
}

async fn status(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let (queued, earliest_due, webhooks) = state.store.backlog().await?;
    let carriers: Vec<Value> = state
        .carriers
        .carriers()
        .iter()
        .map(|c| {
            let limits = c.limits();
            json!({
                "name": c.name,
                "binds_up": c.health.bound.load(Ordering::SeqCst),
                "binds": c.config().binds,
                "window": limits.window,
                "rate_per_second": limits.rate_per_second,
                "paused": c.health.paused.load(Ordering::SeqCst),
                "credentials_refused": c.health.credentials_refused.load(Ordering::SeqCst),
            })
        })
        .collect();
    Ok(Json(json!({
        "carriers": carriers,
        "queue": {
            "waiting": queued,
            "oldest_age_seconds": crate::metrics::overdue_ms(earliest_due, now_ms()) / 1000,
        },
        "webhook_backlog": webhooks,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueQuery {
    status: Option<String>,
    limit: Option<u32>,
}

async fn queue(
    State(state): State<AdminState>,
    Query(query): Query<QueueQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match query.status.as_deref() {
        None => Status::Queued,
        Some(s) => s.parse().map_err(|_| {
            ApiError::invalid("invalid_status", "status", format!("unknown status `{s}`"))
        })?,
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let page = state.store.queue(status, limit).await?;
    let messages: Vec<Value> = page
        .iter()
        .map(|m| {
            json!({
                "id": m.id.to_string(),
                "account": m.account,
                "to": state.pseudonyms.pseudonym(&m.recipient),
                "status": m.status,
                "detail": m.detail,
                "attempts": m.attempts,
                "carrier": m.carrier,
                "created_at": rfc3339(m.created_at),
                "expires_at": rfc3339(m.expires_at),
            })
        })
        .collect();
    Ok(Json(json!({ "messages": messages })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteQuery {
    to: String,
    #[serde(default)]
    sender: String,
    #[serde(default)]
    account: String,
    #[serde(default)]
    category: Category,
}

/// The plan the next message with these facts would get, with the carriers' state now.
async fn route(
    State(state): State<AdminState>,
    Query(query): Query<RouteQuery>,
) -> Result<Json<Value>, ApiError> {
    let to = Msisdn::parse(&query.to)
        .map_err(|e| ApiError::invalid("invalid_number", "to", e.to_string()))?;
    let facts = Facts {
        recipient: to.as_str(),
        sender: &query.sender,
        account: &query.account,
        category: query.category,
    };
    let plan = state
        .carriers
        .preview(&facts)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "no_route", e.to_string()))?;
    Ok(Json(json!(plan)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnmatchedQuery {
    carrier: Option<String>,
}

/// The last receipts of each carrier that matched no message, newest first.
async fn unmatched_receipts(
    State(state): State<AdminState>,
    Query(query): Query<UnmatchedQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(name) = &query.carrier
        && state.carriers.find(name).is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such carrier",
        ));
    }
    let receipts = state.unmatched.list(query.carrier.as_deref());
    Ok(Json(json!({ "receipts": receipts })))
}

fn message_id(text: &str) -> Result<MessageId, ApiError> {
    text.parse().map_err(|_| ApiError::not_found())
}

async fn retry(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = message_id(&id)?;
    let expires_at = now_ms() + state.messages.default_validity.as_millis() as i64;
    if !state.store.retry(id, expires_at).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_retryable",
            "only failed, expired, unknown or undelivered messages can be retried",
        ));
    }
    Ok(Json(
        json!({ "id": id.to_string(), "status": Status::Queued }),
    ))
}

async fn cancel(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = message_id(&id)?;
    match state.store.cancel_any(id).await? {
        CancelResult::Canceled => Ok(Json(
            json!({ "id": id.to_string(), "status": Status::Canceled }),
        )),
        CancelResult::NotFound => Err(ApiError::not_found()),
        CancelResult::TooLate(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancelable",
            format!("the message is {status}"),
        )),
    }
}

async fn pause(state: State<AdminState>, name: Path<String>) -> Result<Json<Value>, ApiError> {
    set_paused(state, name, true)
}

async fn resume(state: State<AdminState>, name: Path<String>) -> Result<Json<Value>, ApiError> {
    set_paused(state, name, false)
}

/// A paused carrier keeps its binds (and answers what is in flight) but gets nothing new.
fn set_paused(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    paused: bool,
) -> Result<Json<Value>, ApiError> {
    let carrier = state
        .carriers
        .find(&name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such carrier"))?;
    carrier.health.paused.store(paused, Ordering::SeqCst);
    tracing::warn!(carrier = %name, paused, "carrier paused or resumed by an operator");
    Ok(Json(json!({ "name": name, "paused": paused })))
}

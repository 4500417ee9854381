//! The HTTP API (v1): every route in one table, the shared state, and authentication.

pub mod admin;
pub mod auth;
pub mod error;
mod messages;
pub mod policy;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;

use axum::body::{Body, Bytes};
use serde::de::DeserializeOwned;

use crate::config::{HttpConfig, MessagesConfig};
use crate::router::Router as CarrierRouter;
use crate::store::Store;
use auth::Account;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Accounts and policy settings; a reload replaces them.
    pub live: crate::reload::Live,
    pub carriers: Arc<CarrierRouter>,
    pub http: Arc<HttpConfig>,
    pub messages: Arc<MessagesConfig>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/messages", get(messages::list).post(messages::submit))
        .route(
            "/v1/messages/{id}",
            get(messages::get).delete(messages::cancel),
        )
        .route(
            "/v1/opt-outs",
            get(policy::list_opt_outs).post(policy::add_opt_out),
        )
        .route("/v1/opt-outs/import", post(policy::import_opt_outs))
        .route("/v1/opt-outs/export", get(policy::export_opt_outs))
        .route("/v1/opt-outs/{number}", delete(policy::remove_opt_out))
        .route("/v1/number-changes", post(policy::add_number_change))
        .route("/v1/number-changes/{number}", get(policy::number_history))
        .route(
            "/v1/number-changes/{number}/suspect",
            delete(policy::clear_suspect),
        )
        .route("/v1/subjects/{number}", delete(policy::erase_subject))
        .route("/v1/subjects/{number}/export", get(policy::export_subject))
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Arc<Account>, ApiError> {
    state
        .live
        .load()
        .accounts
        .authenticate(headers)
        .ok_or_else(ApiError::unauthorized)
}

/// Reads the body within the size limit and the request timeout. The timeout covers only the
/// upload: once the body is in, the request is answered, so a slow client cannot leave a stored
/// message behind a timeout error (and be tempted to submit it again).
pub(super) async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.http.max_body_bytes;
    let read = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(state.http.request_timeout, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::body_too_large(limit)),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )),
    }
}

/// Reads a JSON body into `T`, with the API's error codes.
pub(super) async fn json_body<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
) -> Result<T, ApiError> {
    let bytes: Bytes = read_body(state, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::from_json(&e))
}

/// Prometheus text format. Unauthenticated like the health checks: keep the API listener on
/// loopback (the default) or behind a proxy that restricts `/metrics`.
async fn prometheus(State(state): State<AppState>) -> String {
    state.prometheus.render()
}

/// The process is alive.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The gateway can take and send messages: the store answers and at least one bind is up.
async fn readyz(State(state): State<AppState>) -> Response {
    let store_ok = state.store.ping().await.is_ok();
    let carriers: serde_json::Map<String, serde_json::Value> = state
        .carriers
        .carriers()
        .iter()
        .map(|c| {
            let bound = c.health.bound.load(std::sync::atomic::Ordering::SeqCst);
            (c.name.clone(), json!({ "binds_up": bound }))
        })
        .collect();
    let any_bound = state.carriers.carriers().iter().any(|c| c.is_bound());
    let status = if store_ok && any_bound {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body =
        json!({ "store": if store_ok { "ok" } else { "unavailable" }, "carriers": carriers });
    (status, axum::Json(body)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_such_route", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

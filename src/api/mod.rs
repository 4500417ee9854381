//! The HTTP API (v1): every route in one table, the shared state, and authentication.

pub mod auth;
pub mod error;
mod messages;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::config::{HttpConfig, MessagesConfig};
use crate::router::Router as CarrierRouter;
use crate::store::Store;
use auth::{Account, Accounts};
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub accounts: Arc<Accounts>,
    pub carriers: Arc<CarrierRouter>,
    pub http: Arc<HttpConfig>,
    pub messages: Arc<MessagesConfig>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/messages", get(messages::list).post(messages::submit))
        .route(
            "/v1/messages/{id}",
            get(messages::get).delete(messages::cancel),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn authenticate<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Account, ApiError> {
    state
        .accounts
        .authenticate(headers)
        .ok_or_else(ApiError::unauthorized)
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

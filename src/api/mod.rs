//! The HTTP API (v1): every route in one table, the shared state, and authentication.

pub mod admin;
pub mod auth;
pub mod error;
pub mod guard;
pub mod limits;
pub mod listener;
mod messages;
pub mod openapi;
pub mod policy;
pub mod serve;

pub use messages::{Parsed, SubmitRules, parse_submission};

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};

use axum::body::{Body, Bytes};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::config::{HttpConfig, MessagesConfig};
use crate::metrics;
use crate::router::Router as CarrierRouter;
use crate::store::Store;
use auth::{Account, ApiKey, Scope};
use error::ApiError;
// The submit path that the queue intake shares with `POST /v1/messages`.
#[cfg(feature = "amqp")]
pub(crate) use messages::{SubmitOutcome, checked_idempotency_key, submit_body};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Accounts and policy settings; a reload replaces them.
    pub live: crate::reload::Live,
    pub carriers: Arc<CarrierRouter>,
    pub http: Arc<HttpConfig>,
    pub messages: Arc<MessagesConfig>,
}

/// One route of the API: its method, its path (axum's `{param}` syntax is OpenAPI's too), the
/// scope an API key needs for it (`None`: no key at all) and the handler that serves it.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub scope: Option<Scope>,
    handler: fn(MethodFilter) -> MethodRouter<AppState>,
}

/// Every route of the API. `router` is built from this table and nothing else, and
/// `tests/openapi.rs` checks that `/v1/openapi.json` documents exactly these (method, path)
/// pairs: a route added here without its `#[utoipa::path]` listed in `openapi::ApiDoc` fails it.
pub const ROUTES: &[Route] = &[
    Route::new("POST", "/v1/messages", SUBMIT, |m| on(m, messages::submit)),
    Route::new("GET", "/v1/messages", READ, |m| on(m, messages::list)),
    Route::new("GET", "/v1/messages/{id}", READ, |m| on(m, messages::get)),
    Route::new("DELETE", "/v1/messages/{id}", SUBMIT, |m| {
        on(m, messages::cancel)
    }),
    Route::new("GET", "/v1/opt-outs", POLICY, |m| {
        on(m, policy::list_opt_outs)
    }),
    Route::new("POST", "/v1/opt-outs", POLICY, |m| {
        on(m, policy::add_opt_out)
    }),
    Route::new("POST", "/v1/opt-outs/import", POLICY, |m| {
        on(m, policy::import_opt_outs)
    }),
    Route::new("GET", "/v1/opt-outs/export", POLICY, |m| {
        on(m, policy::export_opt_outs)
    }),
    Route::new("DELETE", "/v1/opt-outs/{number}", POLICY, |m| {
        on(m, policy::remove_opt_out)
    }),
    Route::new("POST", "/v1/number-changes", POLICY, |m| {
        on(m, policy::add_number_change)
    }),
    Route::new("GET", "/v1/number-changes/{number}", POLICY, |m| {
        on(m, policy::number_history)
    }),
    Route::new(
        "DELETE",
        "/v1/number-changes/{number}/suspect",
        POLICY,
        |m| on(m, policy::clear_suspect),
    ),
    Route::new("DELETE", "/v1/subjects/{number}", SUBJECTS, |m| {
        on(m, policy::erase_subject)
    }),
    Route::new("GET", "/v1/subjects/{number}/export", SUBJECTS, |m| {
        on(m, policy::export_subject)
    }),
    Route::new("GET", "/v1/openapi.json", PUBLIC, |m| {
        on(m, openapi::document)
    }),
    Route::new("GET", "/healthz", PUBLIC, |m| on(m, healthz)),
    Route::new("GET", "/readyz", PUBLIC, |m| on(m, readyz)),
];

const SUBMIT: Option<Scope> = Some(Scope::Submit);
const READ: Option<Scope> = Some(Scope::Read);
const POLICY: Option<Scope> = Some(Scope::Policy);
const SUBJECTS: Option<Scope> = Some(Scope::Subjects);
/// No API key: health, readiness and the OpenAPI document. (The metrics are not here: the
/// accounts, the API's clients, must not read each other's counters; see `metrics.listen`.)
const PUBLIC: Option<Scope> = None;

impl Route {
    const fn new(
        method: &'static str,
        path: &'static str,
        scope: Option<Scope>,
        handler: fn(MethodFilter) -> MethodRouter<AppState>,
    ) -> Route {
        Route {
            method,
            path,
            scope,
            handler,
        }
    }

    /// The route's handler, behind [`guard`] when it needs a key.
    fn method_router(&self, state: &AppState) -> MethodRouter<AppState> {
        let handler = (self.handler)(self.method_filter());
        match self.scope {
            None => handler,
            Some(scope) => handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                move |State(state): State<AppState>, request: Request, next: Next| {
                    guard(scope, state, request, next)
                },
            )),
        }
    }

    fn method_filter(&self) -> MethodFilter {
        match self.method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "PUT" => MethodFilter::PUT,
            "PATCH" => MethodFilter::PATCH,
            "DELETE" => MethodFilter::DELETE,
            other => panic!("ROUTES: no method filter for {other}"),
        }
    }
}

pub fn router(state: AppState) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |router, route| {
            // Two routes on one path merge their methods (axum panics on a repeated method).
            router.route(route.path, route.method_router(&state))
        })
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// In front of every route that needs a key: the request must have one `Authorization` header
/// (400 `duplicate_authorization`), its key must be known (401) and have the route's
/// scope (403 `insufficient_scope`), and the request must fit the key's and the account's rate
/// limits (429 `rate_limited`, with `Retry-After`). The handler gets the account the guard
/// found, as [`Authenticated`]: the key is looked up once, in one version of the live
/// configuration.
async fn guard(scope: Scope, state: AppState, mut request: Request, next: Next) -> Response {
    if auth::several_authorizations(request.headers()) {
        // RFC 6750 §3.1: more than one way of presenting a token is an `invalid_request`, 400.
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "duplicate_authorization",
            "the request has more than one Authorization header; send exactly one",
        )
        .into_response();
    }
    let Some((account, key)) = state
        .live
        .load()
        .accounts
        .authenticate_bearer(request.headers())
    else {
        return ApiError::unauthorized().into_response();
    };
    match admit(&account, Some(&key), scope) {
        Ok(()) => {
            request.extensions_mut().insert(Authenticated(account));
            next.run(request).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// The account whose key [`guard`] admitted to the route. A handler behind no guard gets 401.
#[derive(Clone)]
pub struct Authenticated(pub Arc<Account>);

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Authenticated>()
            .cloned()
            .ok_or_else(ApiError::unauthorized)
    }
}

/// Why a known key may not make a request now.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The key lacks the scope.
    Scope(Scope),
    /// The key's or the account's rate limit is reached for `wait`.
    Rate {
        which: &'static str,
        wait: std::time::Duration,
    },
}

/// Checks a request of `account` (through `key`, when it came with one) against the key's scope
/// and the key's and the account's rate limits. Every way in (HTTP, the queue intake) asks
/// this, so none of them bypasses a limit.
pub(crate) fn admit(account: &Account, key: Option<&ApiKey>, scope: Scope) -> Result<(), Refusal> {
    if key.is_some_and(|key| !key.allows(scope)) {
        return Err(Refusal::Scope(scope));
    }
    let limits = [
        ("key", key.and_then(|key| key.limit.as_ref())),
        ("account", account.limit.as_ref()),
    ];
    for (which, limit) in limits {
        if let Some(Err(wait)) = limit.map(limits::RateLimit::check) {
            metrics::rate_limited(&account.name, which);
            return Err(Refusal::Rate { which, wait });
        }
    }
    Ok(())
}

impl Refusal {
    pub(crate) fn error(&self) -> ApiError {
        match self {
            Refusal::Scope(scope) => ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!(
                    "this API key does not have the scope `{}` that this route needs",
                    scope.as_str()
                ),
            ),
            Refusal::Rate { which, wait } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "the {which}'s request rate limit is reached; retry in {} s",
                    limits::retry_after_secs(*wait)
                ),
            ),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (name, value) = match &self {
            Refusal::Scope(scope) => (
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(&format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                    scope.as_str()
                )),
            ),
            Refusal::Rate { wait, .. } => (
                header::RETRY_AFTER,
                Ok(HeaderValue::from(limits::retry_after_secs(*wait))),
            ),
        };
        let mut response = self.error().into_response();
        if let Ok(value) = value {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// A path parameter as text. One that is not UTF-8 once percent-decoded gets `invalid()`, the
/// answer the handler gives any other bad value (axum's own rejection is plain text).
pub(super) fn path_param(
    path: Result<Path<String>, PathRejection>,
    invalid: impl FnOnce() -> ApiError,
) -> Result<String, ApiError> {
    path.map(|Path(text)| text).map_err(|_| invalid())
}

/// Query parameters, or `400 invalid_query` in the API's error shape (axum's own rejection is
/// plain text).
pub(super) fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
}

/// Reads the body within the size limit and the request timeout. The timeout covers only the
/// upload: once the body is in, the request is answered, so a slow client cannot leave a stored
/// message behind a timeout error (and be tempted to submit it again).
///
/// A body whose `Content-Length` is over the limit is refused at once, unread: hyper sends
/// `100 Continue` only when the body is first read, so a client that asked for it
/// (`Expect: 100-continue`) gets the 413 instead of an invitation to upload, and hyper closes
/// the connection rather than wait for a body nobody will read.
pub(super) async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.http.max_body_bytes;
    if axum::body::HttpBody::size_hint(&body).lower() > limit as u64 {
        return Err(ApiError::body_too_large(limit));
    }
    match tokio::time::timeout(state.http.request_timeout, collect_body(body, limit)).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )),
    }
}

/// The body's bytes: more than `limit` is `413 body_too_large`, a body hyper cannot decode (a
/// malformed chunk of a chunked body, or one cut short) `400 malformed_body`.
async fn collect_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    let malformed = |error: axum::Error| {
        // hyper's own words (e.g. "Invalid chunk size line: Invalid Size"), which are constants
        // and never quote the body, are in the error's sources.
        let mut why = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            let text = cause.to_string();
            // axum's error shows the same text as the hyper error it wraps.
            if !why.ends_with(&text) {
                why = format!("{why}: {text}");
            }
            source = cause.source();
        }
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_body",
            format!("the request body cannot be read: {why}"),
        )
    };
    let mut stream = body.into_data_stream();
    // Most bodies come in one piece: that one is kept as it is, without a copy.
    let Some(first) = stream.next().await.transpose().map_err(malformed)? else {
        return Ok(Bytes::new());
    };
    if first.len() > limit {
        return Err(ApiError::body_too_large(limit));
    }
    let Some(second) = stream.next().await.transpose().map_err(malformed)? else {
        return Ok(first);
    };
    let mut bytes = Vec::with_capacity(first.len() + second.len());
    let mut next = Some(second);
    bytes.extend_from_slice(&first);
    while let Some(chunk) = next {
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::body_too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
        next = stream.next().await.transpose().map_err(malformed)?;
    }
    Ok(Bytes::from(bytes))
}

/// Reads a JSON body into `T`, with the API's error codes.
pub(super) async fn json_body<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
) -> Result<T, ApiError> {
    let bytes: Bytes = read_body(state, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::from_json(&e))
}

/// The process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "The process is up", body = String,
        content_type = "text/plain", example = "ok\n")),
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// What `/readyz` answers: whether the store answers, and the binds up per carrier.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"store": "ok", "carriers": {"simulated": {"binds_up": 1}}}))]
struct Readiness {
    /// `ok`, `full` (the disk is full: nothing new can be stored; reads still answer) or
    /// `unavailable`.
    store: &'static str,
    carriers: BTreeMap<String, CarrierReadiness>,
}

#[derive(Serialize, ToSchema)]
struct CarrierReadiness {
    binds_up: usize,
}

/// The gateway can take and send messages: the store answers and at least one bind is up.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses(
        (status = 200, description = "The store answers and at least one carrier bind is up",
            body = Readiness),
        (status = 503, description = "The store does not answer, or no carrier bind is up",
            body = Readiness),
    ),
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let disk_full = state.store.disk_full();
    let store_ok = !disk_full && state.store.ping().await.is_ok();
    let carriers = state
        .carriers
        .carriers()
        .iter()
        .map(|c| {
            let binds_up = c.health.bound.load(std::sync::atomic::Ordering::SeqCst);
            (c.name.clone(), CarrierReadiness { binds_up })
        })
        .collect();
    let any_bound = state.carriers.carriers().iter().any(|c| c.is_bound());
    let status = if store_ok && any_bound {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        store: match (store_ok, disk_full) {
            (true, _) => "ok",
            (false, true) => "full",
            (false, false) => "unavailable",
        },
        carriers,
    };
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

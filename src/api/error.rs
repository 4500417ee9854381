//! Every API error, its HTTP status and its machine-readable code, in one place. The body is
//! always `{"error": {"code": "...", "message": "...", "field": "..."}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::StoreError;

/// An error: its machine-readable code, a message for people, and the request field at fault
/// where there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    /// Machine-readable: `unauthorized`, `invalid_json`, `invalid_number`, `not_found`, ... (the
    /// README lists every code with its status).
    #[schema(value_type = String, example = "invalid_number")]
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "to", nullable = false)]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A field of the request is wrong (422).
    pub fn invalid(code: &'static str, field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_owned()),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown API key; send `Authorization: Bearer <key>`",
        )
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such message")
    }

    pub fn body_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// The body is not JSON, or not the JSON we take; serde names the field where it can.
    pub fn from_json(error: &serde_json::Error) -> ApiError {
        let text = error.to_string();
        let field = text
            .split('`')
            .nth(1)
            .filter(|_| text.contains("field"))
            .map(str::to_owned);
        let code = if error.is_syntax() || error.is_eof() {
            "invalid_json"
        } else if text.starts_with("unknown field") {
            "unknown_field"
        } else if text.starts_with("missing field") {
            "missing_field"
        } else {
            "invalid_value"
        };
        ApiError {
            field,
            ..ApiError::new(StatusCode::BAD_REQUEST, code, text)
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        tracing::error!(%error, "store failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the message store cannot take this request now; nothing was stored, retry later",
        )
    }
}

/// The body of every error response. A 401 also carries `WWW-Authenticate: Bearer`, a 503
/// `Retry-After: 5`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_number", "message": "`to` must be in international format, starting with + and the country code", "field": "to"}}))]
pub struct ErrorEnvelope {
    pub error: ApiError,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, Json(ErrorEnvelope { error: self })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

//! The OpenAPI document of the HTTP API, served at `GET /v1/openapi.json`. Each operation is
//! described by the `#[utoipa::path]` beside its handler; this file only lists them, and gives
//! the shared types of `crate::message` and `crate::encoding` their schemas (from the same
//! values the API writes, so the two cannot drift apart).
//!
//! `tests/openapi.rs` checks that the document lists exactly the routes of `super::ROUTES`.

use std::borrow::Cow;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{self, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::encoding::Encoding;
use crate::message::{Category, Status};

use super::auth::Scope;
use super::{ROUTES, messages, policy};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "smsgw",
        description = "An SMS gateway: submit messages, read their status, manage opt-outs and \
            number changes. Every `/v1` route but this document takes `Authorization: Bearer \
            <api key>`; each key belongs to one account, which sees only its own data. Every \
            error has the same shape: `{\"error\": {\"code\", \"message\", \"field\"?}}`. \
            Numbers in paths are E.164 with `+` written `%2B`.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        messages::submit,
        messages::list,
        messages::get,
        messages::cancel,
        policy::list_opt_outs,
        policy::add_opt_out,
        policy::import_opt_outs,
        policy::export_opt_outs,
        policy::remove_opt_out,
        policy::add_number_change,
        policy::number_history,
        policy::clear_suspect,
        policy::erase_subject,
        policy::export_subject,
        super::healthz,
        super::readyz,
        document,
    ),
    modifiers(&BearerAuth, &Scopes),
    tags(
        (name = "messages", description = "Submit, read, list and cancel messages"),
        (name = "policy", description = "Opt-outs, number changes and data subjects"),
        (name = "operations", description = "Health, readiness and this document"),
    ),
)]
pub struct ApiDoc;

/// The name of the security scheme that `security(("bearer" = []))` refers to.
pub const BEARER: &str = "bearer";

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(format!(
                        "An API key of the account (`smsgw api-key` makes one and its hash). \
                         A key has scopes, {}; each operation's security requirement names \
                         the one it needs (a key without it gets 403 `insufficient_scope`).",
                        Scope::names()
                    )))
                    .build(),
            ),
        );
    }
}

/// Each operation that needs a key: the scope it needs (from `super::ROUTES`, the table the
/// router enforces), and its 403 and 429 answers.
struct Scopes;

impl Modify for Scopes {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        for route in ROUTES {
            let Some(scope) = route.scope else { continue };
            let Some(item) = openapi.paths.paths.get_mut(route.path) else {
                continue;
            };
            let operation = match route.method {
                "GET" => item.get.as_mut(),
                "POST" => item.post.as_mut(),
                "PUT" => item.put.as_mut(),
                "PATCH" => item.patch.as_mut(),
                "DELETE" => item.delete.as_mut(),
                _ => None,
            };
            let Some(operation) = operation else { continue };
            operation.security = Some(vec![SecurityRequirement::new(BEARER, [scope.as_str()])]);
            let responses = &mut operation.responses.responses;
            let forbidden = format!(
                "The API key does not have the scope `{}` (`insufficient_scope`)",
                scope.as_str()
            );
            responses.insert("403".into(), error_response(&forbidden).build().into());
            let retry_after = HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                .description(Some("Seconds until a request is allowed again"))
                .build();
            let limited = error_response(
                "The key's or the account's request rate limit is reached (`rate_limited`)",
            )
            .header("Retry-After", retry_after);
            responses.insert("429".into(), limited.build().into());
        }
    }
}

/// An answer with the API's error body.
fn error_response(description: &str) -> ResponseBuilder {
    let body = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
        .build();
    ResponseBuilder::new()
        .description(description)
        .content("application/json", body)
}

/// The document as JSON, built once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serializes")
    })
}

/// This document (OpenAPI 3.1). No authentication.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json",
        body = Object)),
)]
pub(super) async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}

/// A string schema whose values are `values`, with a description.
fn string_enum<'a>(description: &str, values: impl IntoIterator<Item = &'a str>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .enum_values(Some(values))
        .into()
}

impl PartialSchema for Status {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "The state of a message: queued → sending → sent → delivered | undelivered | \
             expired; scheduled waits for send_at; failed, canceled, unknown, held_suspect and \
             the policy refusals are final or wait for an operator",
            Status::ALL.iter().map(|s| s.as_str()),
        )
    }
}

impl ToSchema for Status {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Status")
    }
}

/// Every category, in the API's spelling (`Category` has no list of its own).
const CATEGORIES: [Category; 2] = [Category::Transactional, Category::Marketing];

impl PartialSchema for Category {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "Why a message is sent: transactional messages may override an opt-out when the \
             account has service_messages; marketing messages never do",
            CATEGORIES.iter().map(|c| c.as_str()),
        )
    }
}

impl ToSchema for Category {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Category")
    }
}

impl PartialSchema for Encoding {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "How the text is sent: GSM 03.38 (153 characters a segment) or UCS-2 (67)",
            [Encoding::Gsm7, Encoding::Ucs2].map(Encoding::as_str),
        )
    }
}

impl ToSchema for Encoding {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Encoding")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_schemas_hold_every_value_as_the_api_writes_it() {
        for status in Status::ALL {
            let written = serde_json::to_value(status).unwrap();
            assert_eq!(written, status.as_str());
        }
        for category in CATEGORIES {
            let written = serde_json::to_value(category).unwrap();
            assert_eq!(written, category.as_str());
            assert_eq!(category.as_str().parse::<Category>(), Ok(category));
        }
        // A new Category variant must be added to CATEGORIES: this match stops compiling.
        match Category::default() {
            Category::Transactional | Category::Marketing => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_the_bearer_scheme() {
        let doc: serde_json::Value = serde_json::from_str(json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        for name in [
            "Status",
            "Category",
            "Encoding",
            "ApiError",
            "ErrorEnvelope",
        ] {
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "schema {name} is missing"
            );
        }
    }
}

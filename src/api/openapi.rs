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
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{self, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::encoding::Encoding;
use crate::message::{Category, Status};

use super::{messages, policy};

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
        super::prometheus,
        super::healthz,
        super::readyz,
        document,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "messages", description = "Submit, read, list and cancel messages"),
        (name = "policy", description = "Opt-outs, number changes and data subjects"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
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
                    .description(Some(
                        "An API key of the account (`smsgw api-key` makes one and its hash)",
                    ))
                    .build(),
            ),
        );
    }
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

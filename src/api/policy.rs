//! `/v1/opt-outs`, `/v1/number-changes` and `/v1/subjects`: the account's side of the policy.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::Account;
use super::error::{ApiError, ErrorEnvelope};
use super::messages::MessageJson;
use super::{AppState, Authenticated};
use crate::message::{Msisdn, Sender, now_ms, rfc3339};
use crate::policy::number_change::{self, ChangeKind};
use crate::store::{AccountPolicy, NumberChange, OptOut, OptOutSource, SubjectExport};

/// A number in a path: E.164 with `+` written `%2B`.
fn path_number(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let invalid = || ApiError::invalid("invalid_number", "number", "`number` is not valid text");
    number(&super::path_param(path, invalid)?, "number")
}

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

/// An opt-out: a number that gets no marketing (from one sender, or from any when `sender` is
/// null).
#[derive(Debug, Serialize, ToSchema)]
pub struct OptOutEntry {
    /// E.164; null once the subject was erased (the suppression still applies).
    number: Option<String>,
    /// What remains of an erased subject: the start of the number's HMAC pseudonym.
    pseudonym: String,
    sender: Option<String>,
    /// How it was recorded: `inbound`, `api`, `cli` or `import`.
    source: String,
    #[schema(format = DateTime)]
    created_at: String,
}

fn opt_out_json(o: &OptOut) -> OptOutEntry {
    OptOutEntry {
        number: o.number.clone(),
        pseudonym: o.number_key.chars().take(16).collect(),
        sender: o.sender.clone(),
        source: o.source.clone(),
        created_at: rfc3339(o.created_at),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"number": "+46701234567", "sender": "iP1"}))]
pub struct OptOutRequest {
    /// International format.
    #[schema(pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")]
    number: String,
    /// Only this sender; every sender when absent.
    #[schema(example = "iP1")]
    sender: Option<String>,
}

/// An opt-out added (or already there).
#[derive(Debug, Serialize, ToSchema)]
pub struct OptOutAdded {
    number: String,
    sender: Option<String>,
    /// False when it was there already.
    created: bool,
}

/// Add an opt-out.
///
/// Messages still waiting for the number (`queued`, `scheduled`, `held_suspect`) are refused
/// as a new one would be.
#[utoipa::path(
    post,
    path = "/v1/opt-outs",
    tag = "policy",
    operation_id = "add_opt_out",
    security(("bearer" = [])),
    request_body(content = OptOutRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Added", body = OptOutAdded),
        (status = 200, description = "It was there already", body = OptOutAdded),
        (status = 400, description = "Not JSON, or an unknown, missing or mistyped field",
            body = ErrorEnvelope),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 408, description = "The body did not arrive in time", body = ErrorEnvelope),
        (status = 413, description = "The body is too large", body = ErrorEnvelope),
        (status = 422, description = "`invalid_number` or `invalid_sender`",
            body = ErrorEnvelope),
        (status = 503, description = "The store cannot take it now", body = ErrorEnvelope),
    ),
)]
pub async fn add_opt_out(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
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
    let body = OptOutAdded {
        number,
        sender,
        created: added > 0,
    };
    Ok((status, Json(body)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SenderQuery {
    /// Remove the opt-out from this sender only; absent, the one that covers every sender.
    sender: Option<String>,
}

/// An opt-out removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct OptOutRemoved {
    number: String,
    removed: u64,
}

/// Remove an opt-out (journalled).
#[utoipa::path(
    delete,
    path = "/v1/opt-outs/{number}",
    tag = "policy",
    operation_id = "remove_opt_out",
    security(("bearer" = [])),
    params(
        ("number" = String, Path, description = "E.164, with `+` written `%2B`",
            pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567"),
        SenderQuery,
    ),
    responses(
        (status = 200, description = "Removed", body = OptOutRemoved),
        (status = 400, description = "An unknown query parameter (`invalid_query`)",
            body = ErrorEnvelope),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 404, description = "No such opt-out (`not_found`)", body = ErrorEnvelope),
        (status = 422, description = "`invalid_number` or `invalid_sender`",
            body = ErrorEnvelope),
        (status = 503, description = "The store cannot take it now", body = ErrorEnvelope),
    ),
)]
pub async fn remove_opt_out(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    number_text: Result<Path<String>, PathRejection>,
    query: Result<Query<SenderQuery>, QueryRejection>,
) -> Result<Json<OptOutRemoved>, ApiError> {
    let query = super::query(query)?;
    let number = path_number(number_text)?;
    // Without `sender`, the entry for every sender; a STOP the person sent to one sender stays.
    let sender = sender(query.sender.as_deref())?.or(Some(String::new()));
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
    Ok(Json(OptOutRemoved { number, removed }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Entries per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of opt-outs.
#[derive(Debug, Serialize, ToSchema)]
pub struct OptOutPage {
    opt_outs: Vec<OptOutEntry>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// The account's opt-outs.
#[utoipa::path(
    get,
    path = "/v1/opt-outs",
    tag = "policy",
    operation_id = "list_opt_outs",
    security(("bearer" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of opt-outs", body = OptOutPage),
        (status = 400, description = "An unknown parameter or a value of the wrong type \
            (`invalid_query`)", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 422, description = "`invalid_limit`, `invalid_cursor`", body = ErrorEnvelope),
        (status = 503, description = "The store cannot answer now", body = ErrorEnvelope),
    ),
)]
pub async fn list_opt_outs(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<OptOutPage>, ApiError> {
    let query = super::query(query)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit",
            "`limit` must be between 1 and 1000",
        ));
    }
    let cursor = query.cursor.map(|c| opt_out_cursor(&c)).transpose()?;
    let page = state
        .store
        .list_opt_outs(&account.name, cursor, limit)
        .await?;
    let next_cursor = (page.len() == limit as usize)
        .then(|| page.last())
        .flatten()
        .map(OptOut::cursor);
    let opt_outs = page.iter().map(opt_out_json).collect();
    Ok(Json(OptOutPage {
        opt_outs,
        next_cursor,
    }))
}

/// A cursor as [`OptOut::cursor`] writes it: the number's key (64 hex digits), `:`, and the
/// sender (empty for every sender). Anything else is refused: the store would read it as no
/// cursor and start the list again from its beginning, so a client paging with a damaged cursor
/// would loop.
fn opt_out_cursor(text: &str) -> Result<String, ApiError> {
    let invalid = || {
        ApiError::invalid(
            "invalid_cursor",
            "cursor",
            "`cursor` must be the `next_cursor` of a previous page",
        )
    };
    let (key, sender) = text.split_once(':').ok_or_else(invalid)?;
    let key_ok = key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let sender_ok = sender.is_empty() || Sender::parse(sender).is_ok_and(|s| s.as_str() == sender);
    if !(key_ok && sender_ok) {
        return Err(invalid());
    }
    Ok(text.to_owned())
}

/// The whole list as CSV (`number,sender,source,created_at`); erased numbers show empty.
#[utoipa::path(
    get,
    path = "/v1/opt-outs/export",
    tag = "policy",
    operation_id = "export_opt_outs",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`number,sender,source,created_at` lines after a header",
            body = String, content_type = "text/csv"),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 503, description = "The store cannot answer now", body = ErrorEnvelope),
    ),
)]
pub async fn export_opt_outs(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
) -> Result<Response, ApiError> {
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
            Some(o) if page.len() == 1000 => cursor = Some(o.cursor()),
            _ => break,
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/csv")], csv).into_response())
}

/// A line of an import that was not imported.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImportLineError {
    /// Counted from 1.
    pub line: usize,
    pub error: ApiError,
}

/// As JSON, the way the API shows it (the CLI prints it so).
impl std::fmt::Display for ImportLineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&json)
    }
}

/// What an import did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportResult {
    /// Opt-outs added (lines already on the list count nothing).
    imported: u64,
    /// The lines that were not imported, and why.
    errors: Vec<ImportLineError>,
}

/// Bulk import: CSV lines `number[,sender]` (a header line is skipped) or JSON lines
/// `{"number": ..., "sender": ...}`. Valid lines are imported; the answer lists the others.
#[utoipa::path(
    post,
    path = "/v1/opt-outs/import",
    tag = "policy",
    operation_id = "import_opt_outs",
    security(("bearer" = [])),
    request_body(description = "CSV `number[,sender]` lines, or JSON lines; any content type",
        content(
            (String = "text/csv", example = "number,sender\n+46701234567,iP1\n+46701234568\n"),
            (String = "text/plain",
                example = "{\"number\": \"+46701234567\", \"sender\": \"iP1\"}\n"),
        )),
    responses(
        (status = 200, description = "The valid lines are imported; `errors` lists the others",
            body = ImportResult),
        (status = 400, description = "The body is not UTF-8 (`invalid_body`)",
            body = ErrorEnvelope),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 408, description = "The body did not arrive in time", body = ErrorEnvelope),
        (status = 413, description = "The body is too large", body = ErrorEnvelope),
        (status = 503, description = "The store cannot take it now", body = ErrorEnvelope),
    ),
)]
pub async fn import_opt_outs(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    body: Body,
) -> Result<Json<ImportResult>, ApiError> {
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
    Ok(Json(ImportResult { imported, errors }))
}

/// Parses an import body; JSON lines start with `{`, anything else is CSV.
pub fn parse_import(text: &str) -> (Vec<(String, Option<String>)>, Vec<ImportLineError>) {
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
            Err(error) => errors.push(ImportLineError {
                line: index + 1,
                error,
            }),
        }
    }
    (entries, errors)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"number": "+46701234567", "kind": "deactivated", "effective_at": "2026-11-27T08:00:00Z"}))]
pub struct NumberChangeRequest {
    /// International format.
    #[schema(pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")]
    pub number: String,
    /// `deactivated` or `changed`.
    #[schema(value_type = ChangeKindName)]
    pub kind: String,
    /// The number's new number; only with `changed`, and required there.
    #[schema(pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")]
    pub new_number: Option<String>,
    /// When it took effect (RFC 3339); now when absent. At most `policy.max_backdate` ago.
    #[schema(format = DateTime)]
    pub effective_at: Option<String>,
}

/// What happened to a number: `deactivated` (gone), or `changed` (it moved to `new_number`).
/// (Documentation only: the API reads and writes the kind as text.)
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = ChangeKind)]
#[allow(dead_code)]
enum ChangeKindName {
    Deactivated,
    Changed,
}

/// A number change recorded.
#[derive(Debug, Serialize, ToSchema)]
pub struct NumberChangeAdded {
    number: String,
    #[schema(value_type = ChangeKindName)]
    kind: &'static str,
    #[schema(format = DateTime)]
    effective_at: String,
    /// Waiting messages refused, or redirected, because of it.
    messages_affected: u64,
}

/// Report that a number was deactivated or changed hands.
///
/// Messages whose consent is older than the change are refused from then on
/// (`refused_number_changed`), or follow a changed number when the account has
/// `follow_number_changes`.
#[utoipa::path(
    post,
    path = "/v1/number-changes",
    tag = "policy",
    operation_id = "add_number_change",
    security(("bearer" = [])),
    request_body(content = NumberChangeRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Recorded", body = NumberChangeAdded),
        (status = 400, description = "Not JSON, or an unknown, missing or mistyped field",
            body = ErrorEnvelope),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 408, description = "The body did not arrive in time", body = ErrorEnvelope),
        (status = 413, description = "The body is too large", body = ErrorEnvelope),
        (status = 422, description = "`invalid_number`, `invalid_value`, `missing_field`, \
            `invalid_time` or `invalid_effective_at` (more than `policy.max_backdate` ago, or \
            in the future)", body = ErrorEnvelope),
        (status = 503, description = "The store cannot take it now", body = ErrorEnvelope),
    ),
)]
pub async fn add_number_change(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
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
    let body = NumberChangeAdded {
        number: change.number,
        kind: change.kind.as_str(),
        effective_at: rfc3339(change.effective_at),
        messages_affected: affected,
    };
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

/// A number change as the history shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NumberChangeEntry {
    #[schema(value_type = ChangeKindName)]
    kind: &'static str,
    /// The number it moved to (`changed` only).
    new_number: Option<String>,
    #[schema(format = DateTime)]
    effective_at: String,
    /// When it was reported.
    #[schema(format = DateTime)]
    reported_at: String,
    /// How it was reported: `api`, `cli`, `import`, ...
    source: String,
    /// `account` (reported by this account) or `global` (by the operator).
    scope: &'static str,
}

/// A number change as a subject export shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubjectNumberChange {
    #[schema(value_type = ChangeKindName)]
    kind: &'static str,
    #[schema(format = DateTime)]
    effective_at: String,
    source: String,
}

/// What the account can see about a number.
#[derive(Debug, Serialize, ToSchema)]
pub struct NumberHistory {
    number: String,
    /// Its own and operator-wide changes.
    changes: Vec<NumberChangeEntry>,
    /// Carriers keep reporting it unknown: its messages are held (`held_suspect`).
    suspect: bool,
    /// "Unknown subscriber" results counted towards `policy.suspect_after`.
    unknown_subscriber_results: u32,
}

/// The changes the account can see for a number, and whether it is suspect.
#[utoipa::path(
    get,
    path = "/v1/number-changes/{number}",
    tag = "policy",
    operation_id = "number_history",
    security(("bearer" = [])),
    params(("number" = String, Path, description = "E.164, with `+` written `%2B`",
        pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")),
    responses(
        (status = 200, description = "The number's changes", body = NumberHistory),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 422, description = "`invalid_number`", body = ErrorEnvelope),
        (status = 503, description = "The store cannot answer now", body = ErrorEnvelope),
    ),
)]
pub async fn number_history(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    number_text: Result<Path<String>, PathRejection>,
) -> Result<Json<NumberHistory>, ApiError> {
    let number = path_number(number_text)?;
    let history = state.store.number_history(&account.name, &number).await?;
    let changes = history
        .changes
        .iter()
        .map(|(c, reported_at)| {
            let new_number = match &c.kind {
                ChangeKind::Changed { new_number } => Some(new_number.clone()),
                ChangeKind::Deactivated => None,
            };
            NumberChangeEntry {
                kind: c.kind.as_str(),
                new_number,
                effective_at: rfc3339(c.effective_at),
                reported_at: rfc3339(*reported_at),
                source: c.source.clone(),
                scope: if c.account.is_some() {
                    "account"
                } else {
                    "global"
                },
            }
        })
        .collect();
    Ok(Json(NumberHistory {
        number,
        changes,
        suspect: history.suspect,
        unknown_subscriber_results: history.failures,
    }))
}

/// A number cleared of suspicion.
#[derive(Debug, Serialize, ToSchema)]
pub struct SuspectCleared {
    number: String,
    /// False when it was not suspect and none of the account's messages was held.
    cleared: bool,
}

/// The number works after all: it is no longer suspect, and the account's messages it held go
/// out (another account's held messages wait for that account, or an operator, to clear them).
#[utoipa::path(
    delete,
    path = "/v1/number-changes/{number}/suspect",
    tag = "policy",
    operation_id = "clear_suspect",
    security(("bearer" = [])),
    params(("number" = String, Path, description = "E.164, with `+` written `%2B`",
        pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")),
    responses(
        (status = 200, description = "Cleared (or it was not suspect)", body = SuspectCleared),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 422, description = "`invalid_number`", body = ErrorEnvelope),
        (status = 503, description = "The store cannot take it now", body = ErrorEnvelope),
    ),
)]
pub async fn clear_suspect(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    number_text: Result<Path<String>, PathRejection>,
) -> Result<Json<SuspectCleared>, ApiError> {
    let number = path_number(number_text)?;
    let cleared = state
        .store
        .clear_suspect(&number, Some(&account.name))
        .await?;
    Ok(Json(SuspectCleared { number, cleared }))
}

/// A message in a subject export: the message, its history and its text.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubjectMessage {
    #[serde(flatten)]
    message: MessageJson,
    /// Null once the retention purge removed it.
    text: Option<String>,
}

/// An SMS received from the number.
#[derive(Debug, Serialize, ToSchema)]
pub struct InboundJson {
    id: String,
    /// The account's number it was sent to.
    to: String,
    /// Null once the retention purge removed it.
    text: Option<String>,
    #[schema(format = DateTime)]
    received_at: String,
}

/// Everything the account holds about a number.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubjectData {
    number: String,
    messages: Vec<SubjectMessage>,
    inbound: Vec<InboundJson>,
    opt_outs: Vec<OptOutEntry>,
    number_changes: Vec<SubjectNumberChange>,
    suspect: bool,
}

/// Everything the account holds about a number (GDPR art. 15): its messages with their texts
/// and histories, the replies received from it, its opt-outs and number changes.
#[utoipa::path(
    get,
    path = "/v1/subjects/{number}/export",
    tag = "policy",
    operation_id = "export_subject",
    security(("bearer" = [])),
    params(("number" = String, Path, description = "E.164, with `+` written `%2B`",
        pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")),
    responses(
        (status = 200, description = "What the account holds about the number",
            body = SubjectData),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 422, description = "`invalid_number`", body = ErrorEnvelope),
        (status = 503, description = "The store cannot answer now", body = ErrorEnvelope),
    ),
)]
pub async fn export_subject(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    number_text: Result<Path<String>, PathRejection>,
) -> Result<Json<SubjectData>, ApiError> {
    let number = path_number(number_text)?;
    let export = state.store.export_subject(&account.name, &number).await?;
    Ok(Json(subject_data(&number, &export)))
}

/// The subject export as JSON (`smsgw subject export` prints it).
pub fn subject_json(number: &str, export: &SubjectExport) -> Value {
    serde_json::to_value(subject_data(number, export)).unwrap_or_default()
}

fn subject_data(number: &str, export: &SubjectExport) -> SubjectData {
    let messages = export
        .messages
        .iter()
        .map(|m| SubjectMessage {
            message: super::messages::view_json(m, true),
            text: m.body.clone(),
        })
        .collect();
    let inbound = export
        .inbound
        .iter()
        .map(|i| InboundJson {
            id: i.id.clone(),
            to: i.to.clone(),
            text: i.body.clone(),
            received_at: rfc3339(i.received_at),
        })
        .collect();
    let opt_outs = export.opt_outs.iter().map(opt_out_json).collect();
    let number_changes = export
        .number
        .changes
        .iter()
        .map(|(c, _)| SubjectNumberChange {
            kind: c.kind.as_str(),
            effective_at: rfc3339(c.effective_at),
            source: c.source.clone(),
        })
        .collect();
    SubjectData {
        number: number.to_owned(),
        messages,
        inbound,
        opt_outs,
        number_changes,
        suspect: export.number.suspect,
    }
}

/// What an erasure removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasureResult {
    messages: u64,
    inbound: u64,
    /// Kept: like an opt-out, a number change protects whoever holds the number now.
    number_changes_kept: u64,
    /// Opt-outs kept as pseudonymised suppression entries.
    suppressions_kept: u64,
}

/// Erases what the account holds about a number; an opt-out stays, pseudonymised. On SQLite,
/// once answered, the erased numbers and texts are also gone from the bytes of the database
/// file and its WAL (see the README's Security section for PostgreSQL).
#[utoipa::path(
    delete,
    path = "/v1/subjects/{number}",
    tag = "policy",
    operation_id = "erase_subject",
    security(("bearer" = [])),
    params(("number" = String, Path, description = "E.164, with `+` written `%2B`",
        pattern = r"^(\+|00)[0-9 ()-]{4,32}$", example = "+46701234567")),
    responses(
        (status = 200, description = "Erased", body = ErasureResult),
        (status = 401, description = "No or an unknown API key", body = ErrorEnvelope),
        (status = 422, description = "`invalid_number`", body = ErrorEnvelope),
        (status = 503, description = "The store cannot take it now", body = ErrorEnvelope),
    ),
)]
pub async fn erase_subject(
    State(state): State<AppState>,
    Authenticated(account): Authenticated,
    number_text: Result<Path<String>, PathRejection>,
) -> Result<Json<ErasureResult>, ApiError> {
    let number = path_number(number_text)?;
    let erased = state.store.erase_subject(&account.name, &number).await?;
    Ok(Json(ErasureResult {
        messages: erased.messages,
        inbound: erased.inbound,
        number_changes_kept: erased.number_changes_kept,
        suppressions_kept: erased.suppressions_kept,
    }))
}

//! The provider-compatible send API: the *send* requests of Resend, Postmark and SendGrid, parsed
//! into `email.send` / `email.send_template` calls, and the answers those providers give, built in
//! their own shapes, so that an application keeps its provider's official SDK and only changes the
//! base URL.
//!
//! What runs where: pure Rust, no pgrx and no Postgres. The listener worker's HTTP handlers call
//! `parse` on its main thread's runtime with the raw request; the listener authenticates the key
//! (`keys`), runs each `Call` as the key's role inside one transaction (a batch is all or
//! nothing), and answers with `accepted` (or `validated` for a dry run), or with `refuse` /
//! `batch_refused` built from a `Refusal` — its own (`MissingKey`, `RateLimited`, …) or one mapped
//! from the SQL error by `from_sql_error`. `email.send` validates every argument again: this module
//! checks the request's *shape* (JSON types, the provider's own rules, the members it cannot map)
//! and leaves the values (address syntax, header names, base64, sizes, recipient limits) to the
//! SQL function, whose errors `from_sql_error` renames to the provider's fields.
//!
//! Inputs are hostile: any bytes. Nothing here panics or indexes unchecked; JSON nesting is
//! bounded by serde_json's recursion limit (128) and everything else by the listener's body limit.
//!
//! Decisions, each where a demanding user of the provider would look first:
//! - Unknown JSON members are ignored (all three providers do so), and JSON `null` counts as
//!   absent (SDKs serialize unset members as `null`). A wrong JSON type is refused, naming the
//!   member in the provider's own spelling: Resend `attachments[0].content`, Postmark
//!   `Attachments[0].Content`, SendGrid `personalizations.0.to.1.email` (SendGrid's real `field`
//!   form, with dots).
//! - Values are checked once, by `email.send`: a refused address comes back as the provider's 4xx
//!   naming the provider's field (`recipients` → Resend `to`, Postmark `To`, SendGrid
//!   `personalizations.N.to`). Limits are pg_email's (`pg_email.max_recipients`,
//!   `pg_email.max_message_size`), not the providers' recipient counts; the number of messages in
//!   one request is the provider's (Resend batch 100, Postmark batch 500, SendGrid 1000
//!   personalizations and 1000 recipients in all).
//! - `from` / `From` may be left out: the transport's `from=` or `pg_email.default_sender` applies,
//!   as in SQL (the providers require it; being lenient here breaks no client).
//! - A string holding a NUL character is refused up front (PostgreSQL text and jsonb cannot store
//!   it), naming the member.
//! - `Idempotency-Key` (Resend's header, 1–256 characters) is accepted on every route. A request
//!   that carries several messages (a batch, or several SendGrid personalizations) gives message
//!   `i` the key `KEY[i]` (`hex(SHA-256(KEY))[i]` when that would pass 256 characters), so
//!   replaying the request returns the same ids and a different payload under the same key is a
//!   409 / conflict, as in Resend.
//! - A batch is all or nothing: Resend's `x-batch-validation: permissive` is treated as strict
//!   (nothing is stored when one email is refused; the answer names the index). Postmark batches
//!   answer 200 with one result per message, as Postmark does: the refused one with its error, the
//!   others with ErrorCode 300 "not sent because message N was refused".
//! - Successful answers carry our `email.messages.id` as the provider's message id (as text):
//!   Resend `id`, Postmark `MessageID`, SendGrid `X-Message-Id` (the first message's id; all ids,
//!   comma-separated, in `X-Pg-Email-Ids`).
//! - Every JSON reply carries `content-type: application/json`; the listener adds nothing but the
//!   framing headers.
//!
//! Per provider, see `resend`, `postmark` and `sendgrid`; API keys and the two limiters: `keys`.

pub mod keys;
pub mod postmark;
pub mod resend;
pub mod sendgrid;

use ring::digest;
use serde_json::{Map, Value};

/// The three providers whose send requests are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Resend,
    Postmark,
    SendGrid,
}

/// Which send route a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Resend `POST /emails`.
    ResendEmail,
    /// Resend `POST /emails/batch`.
    ResendBatch,
    /// Postmark `POST /email`.
    PostmarkEmail,
    /// Postmark `POST /email/batch`.
    PostmarkBatch,
    /// Postmark `POST /email/withTemplate`.
    PostmarkTemplate,
    /// Postmark `POST /email/batchWithTemplates`.
    PostmarkTemplateBatch,
    /// SendGrid `POST /v3/mail/send`.
    SendGridSend,
}

impl Route {
    pub fn provider(self) -> Provider {
        match self {
            Route::ResendEmail | Route::ResendBatch => Provider::Resend,
            Route::PostmarkEmail | Route::PostmarkBatch | Route::PostmarkTemplate | Route::PostmarkTemplateBatch => {
                Provider::Postmark
            }
            Route::SendGridSend => Provider::SendGrid,
        }
    }

    /// The route of a request, from its method and path. A query string and one trailing slash
    /// are ignored; Postmark's paths match in any letter case (its API does, and some SDKs
    /// spell `/email/withTemplate/` with a final slash). Anything but POST is no send route.
    pub fn from_path(method_is_post: bool, path: &str) -> Option<Route> {
        if !method_is_post {
            return None;
        }
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let path = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => path,
        };
        match path {
            "/emails" => return Some(Route::ResendEmail),
            "/emails/batch" => return Some(Route::ResendBatch),
            "/v3/mail/send" => return Some(Route::SendGridSend),
            _ => {}
        }
        match path.to_ascii_lowercase().as_str() {
            "/email" => Some(Route::PostmarkEmail),
            "/email/batch" => Some(Route::PostmarkBatch),
            "/email/withtemplate" => Some(Route::PostmarkTemplate),
            "/email/batchwithtemplates" => Some(Route::PostmarkTemplateBatch),
            _ => None,
        }
    }

    /// Whether the request body is a list of messages (a SendGrid request with several
    /// personalizations is several messages too, but not a batch route).
    pub fn is_batch(self) -> bool {
        matches!(self, Route::ResendBatch | Route::PostmarkBatch | Route::PostmarkTemplateBatch)
    }

    /// The most messages one request may carry (the provider's own limit).
    pub fn max_messages(self) -> usize {
        match self {
            Route::ResendBatch => resend::MAX_BATCH,
            Route::PostmarkBatch | Route::PostmarkTemplateBatch => postmark::MAX_BATCH,
            Route::SendGridSend => sendgrid::MAX_PERSONALIZATIONS,
            Route::ResendEmail | Route::PostmarkEmail | Route::PostmarkTemplate => 1,
        }
    }
}

/// One `email.send` call (or `email.send_template` when `template` is set), argument by argument,
/// exactly as the SQL function takes them (all text; the SQL side casts and validates everything
/// again).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Call {
    /// Comma-separated mailboxes: `Ada <ada@x.org>, bob@y.org`.
    pub recipients: Option<String>,
    pub subject: Option<String>,
    /// The text part.
    pub body: Option<String>,
    pub html: Option<String>,
    /// `Name <a@b>`.
    pub sender: Option<String>,
    pub cc: Option<String>,
    pub bcc: Option<String>,
    pub reply_to: Option<String>,
    /// A JSON object `{"X-Name": "value"}`.
    pub headers: Option<Value>,
    /// A JSON array of `{"filename","content_type","content" (base64),"content_id"?}` (email.send's
    /// shape; `content_id` without `<>`).
    pub attachments: Option<Value>,
    pub tags: Option<Vec<String>>,
    /// A JSON object.
    pub metadata: Option<Value>,
    /// RFC 3339 text.
    pub send_at: Option<String>,
    pub idempotency_key: Option<String>,
    pub track_opens: Option<bool>,
    pub track_clicks: Option<bool>,
    /// Postmark `TemplateAlias` (or `TemplateId` as text), Resend `template.id`:
    /// `email.send_template(template, recipients, data, ...)`.
    pub template: Option<String>,
    /// Postmark `TemplateModel`, Resend `template.variables`.
    pub data: Option<Value>,
    /// `email.send(topic => …)`: Resend `topic_id`, SendGrid `asm.group_id` (as text).
    pub topic: Option<String>,
}

/// What a request asks for: one or more calls (a batch is all-or-nothing), and whether only to
/// validate.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub calls: Vec<Call>,
    /// SendGrid `mail_settings.sandbox_mode.enable`: validate, store nothing, answer `validated`.
    pub dry_run: bool,
}

/// An HTTP answer in the provider's own shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// JSON, or empty.
    pub body: String,
}

/// Why a request was refused before or while storing it; each provider renders it in its own
/// shape and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    MissingKey,
    /// A wrong or revoked key.
    InvalidKey,
    /// The key's role lacks a grant.
    Forbidden,
    RateLimited {
        retry_after_secs: u64,
        limit: Option<u64>,
    },
    TooLarge,
    BadJson(String),
    /// `field` is in the provider's naming (`to`, `From`, `personalizations.0.to.1.email`);
    /// `message` says what is wrong with it (`Refusal::missing` starts it with `is required`).
    Invalid {
        field: Option<String>,
        message: String,
    },
    /// The same idempotency key was used with different content (Resend 409
    /// `invalid_idempotent_request`).
    IdempotencyConflict(String),
    /// The database was not reachable or timed out: 503 (Resend 500 `application_error`).
    Unavailable,
    /// `refusal` concerns message `index` of a request of `count` messages (nothing of it was
    /// stored). `parse` returns it for a bad message in a batch; `batch_refused` builds it.
    Batch {
        index: usize,
        count: usize,
        refusal: Box<Refusal>,
    },
}

/// How `Refusal::Invalid` says that a field is missing.
pub const REQUIRED: &str = "is required";

/// The request header that carries an idempotency key, as Resend names it.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// Most characters in an idempotency key (Resend's limit, and `email.send`'s).
pub const MAX_KEY_CHARS: usize = 256;

impl Refusal {
    /// A field with a wrong value.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Refusal {
        Refusal::Invalid { field: Some(field.into()), message: message.into() }
    }

    /// A required field that is missing.
    pub fn missing(field: impl Into<String>) -> Refusal {
        Refusal::Invalid { field: Some(field.into()), message: REQUIRED.into() }
    }

    /// A refusal of the request as a whole, with no field to name.
    pub fn general(message: impl Into<String>) -> Refusal {
        Refusal::Invalid { field: None, message: message.into() }
    }

    /// `refusal` concerns message `index` of `count`.
    pub fn batch(index: usize, count: usize, refusal: Refusal) -> Refusal {
        match refusal {
            b @ Refusal::Batch { .. } => b,
            r => Refusal::Batch { index, count, refusal: Box::new(r) },
        }
    }

    /// Whether this refusal is about one message's content (rather than the whole request: the
    /// key, the rate, the body's syntax or size, the database).
    pub fn is_per_message(&self) -> bool {
        matches!(self, Refusal::Invalid { .. } | Refusal::IdempotencyConflict(_))
    }
}

/// Parses a send request. `headers` have lower-case names; `body` is the raw request body.
pub fn parse(route: Route, headers: &[(String, String)], body: &[u8]) -> Result<Parsed, Refusal> {
    let value = decode(body)?;
    let style = match route.provider() {
        Provider::SendGrid => PathStyle::Dots,
        Provider::Resend | Provider::Postmark => PathStyle::Brackets,
    };
    if let Some(path) = find_nul(&value, style) {
        return Err(Refusal::Invalid {
            field: (!path.is_empty()).then_some(path),
            message: "contains a NUL character (\\u0000), which PostgreSQL cannot store".into(),
        });
    }
    let key = idempotency_key(headers)?;
    let mut parsed = match route {
        Route::ResendEmail | Route::ResendBatch => resend::parse(route, &value)?,
        Route::PostmarkEmail | Route::PostmarkBatch | Route::PostmarkTemplate | Route::PostmarkTemplateBatch => {
            postmark::parse(route, &value)?
        }
        Route::SendGridSend => sendgrid::parse(&value)?,
    };
    if let Some(key) = key {
        let several = route.is_batch() || route == Route::SendGridSend;
        for (i, call) in parsed.calls.iter_mut().enumerate() {
            call.idempotency_key = Some(if several { derived_key(key, i) } else { key.to_string() });
        }
    }
    Ok(parsed)
}

/// Renders a refusal in the provider's shape and status.
pub fn refuse(provider: Provider, r: &Refusal) -> Reply {
    match provider {
        Provider::Resend => resend::refuse(r),
        Provider::Postmark => postmark::refuse(r),
        Provider::SendGrid => sendgrid::refuse(r),
    }
}

/// The success answer for a request whose calls were stored with these message ids (one per
/// call, same order). `now_rfc3339` is Postmark's `SubmittedAt`.
pub fn accepted(route: Route, calls: &[Call], ids: &[i64], now_rfc3339: &str) -> Reply {
    match route.provider() {
        Provider::Resend => resend::accepted(route, ids),
        Provider::Postmark => postmark::accepted(route, calls, ids, now_rfc3339),
        Provider::SendGrid => sendgrid::accepted(ids),
    }
}

/// The answer to a dry run (`Parsed::dry_run`: every call validated, nothing stored): SendGrid's
/// sandbox answers `200` with an empty body. Only SendGrid requests are dry runs; for the other
/// routes this is their success answer with id 0.
pub fn validated(route: Route, calls: &[Call], now_rfc3339: &str) -> Reply {
    match route.provider() {
        Provider::SendGrid => Reply { status: 200, headers: Vec::new(), body: String::new() },
        _ => accepted(route, calls, &vec![0; calls.len()], now_rfc3339),
    }
}

/// The answer when message `index` of `count` was refused (so nothing was stored). Postmark
/// batch routes answer 200 with one result per message (the refused one's ErrorCode and message,
/// the others "not sent because message N was refused"), also for a batch of one; the other
/// routes answer the refusal, naming the index (Resend) or the personalization (SendGrid). A
/// refusal that is not about the message (rate, database) is answered as for the whole request.
/// Use it for every call that fails, whatever the route: for a single-message route it is
/// `refuse`.
pub fn batch_refused(route: Route, index: usize, count: usize, r: &Refusal) -> Reply {
    if count <= 1 && index == 0 && !route.is_batch() {
        return refuse(route.provider(), r);
    }
    refuse(route.provider(), &Refusal::batch(index, count, r.clone()))
}

/// Maps an error raised by `email.send` (SQLSTATE, message text) to a refusal that names the
/// provider's field. pg_email's messages look like `invalid recipients: "x" is not a valid
/// address: …`, `recipients is required (it is NULL or missing)`, `invalid attachments[0].content:
/// …`, `template "x" does not exist`.
///
/// - 22023 → `Invalid` (with "idempotency_key" and "different content": `IdempotencyConflict`);
/// - 42704 (unknown template or topic; unknown or no default transport, which names no field) →
///   `Invalid`;
/// - 22007 / 22008 (a bad timestamp) → `Invalid` naming the provider's `send_at`;
/// - other data exceptions (class 22), integrity violations (class 23, e.g. a CHECK a user added),
///   program limits (class 54) and errors raised by a user's trigger (P0001) → `Invalid` with no
///   field: sending the same request again would fail the same way, so it must not be a 5xx that
///   clients retry;
/// - 42501 → `Forbidden`;
/// - anything else (connection, timeout, serialization failure, internal) → `Unavailable`.
pub fn from_sql_error(route: Route, sqlstate: &str, message: &str) -> Refusal {
    match sqlstate {
        "42501" => Refusal::Forbidden,
        "22023" if message.contains("idempotency_key") && message.contains("different content") => {
            let detail = message.strip_prefix("invalid idempotency_key: ").unwrap_or(message);
            Refusal::IdempotencyConflict(format!(
                "the {IDEMPOTENCY_HEADER} {detail}; repeat a request with exactly the same content, or use a new key"
            ))
        }
        "22023" => invalid_from_sql(route, message),
        "42704" => undefined_from_sql(route, message),
        "22007" | "22008" => {
            Refusal::Invalid { field: provider_field(route, "send_at", None), message: message.into() }
        }
        s if s.starts_with("22") || s.starts_with("23") || s.starts_with("54") || s == "P0001" => {
            Refusal::general(message)
        }
        _ => Refusal::Unavailable,
    }
}

/// `invalid FIELD: DETAIL` or `FIELD is required (it is NULL or missing)`, with FIELD renamed.
fn invalid_from_sql(route: Route, message: &str) -> Refusal {
    let looks_like_field = |f: &str| !f.is_empty() && !f.contains(char::is_whitespace);
    if let Some(field) = message.strip_suffix(" is required (it is NULL or missing)").filter(|f| looks_like_field(f)) {
        return match provider_field(route, field, None) {
            Some(name) => Refusal::missing(name),
            None => Refusal::general(message),
        };
    }
    let Some((field, detail)) = message.strip_prefix("invalid ").and_then(|m| m.split_once(": ")) else {
        return Refusal::general(message);
    };
    if !looks_like_field(field) {
        return Refusal::general(message);
    }
    let Some(name) = provider_field(route, field, None) else {
        return Refusal::general(message);
    };
    // Two of email.send's messages name its own arguments; say them in the provider's words.
    let detail = if field == "body" && detail.starts_with("at least one of body and html") {
        let html = provider_field(route, "html", None).unwrap_or_default();
        if name == html {
            format!("{REQUIRED} (a text or an HTML part)")
        } else {
            format!("{REQUIRED} (at least one of {name} and {html})")
        }
    } else if field == "sender" && detail.starts_with("no sender") {
        format!("{REQUIRED} (this server has no default sender)")
    } else {
        detail.to_string()
    };
    Refusal::Invalid { field: Some(name), message: detail }
}

/// `template "x" does not exist`, `topic "x" does not exist`, `transport "x" does not exist`,
/// `no default transport is configured`.
fn undefined_from_sql(route: Route, message: &str) -> Refusal {
    let (what, name) = match message.split_once(' ') {
        Some((what, rest)) if rest.ends_with("does not exist") => {
            let name = rest.split('"').nth(1);
            (what, name)
        }
        _ => return Refusal::general(message),
    };
    match what {
        "template" | "topic" => match provider_field(route, what, name) {
            Some(field) => Refusal::Invalid { field: Some(field), message: message.into() },
            None => Refusal::general(message),
        },
        _ => Refusal::general(message),
    }
}

/// The provider's name for one of `email.send`'s fields (`recipients`, `attachments[0].content`,
/// `headers.X-Campaign`); None when the provider has no such field (`transport`).
/// `template_name` tells Postmark's `TemplateId` (all digits) from `TemplateAlias`.
fn provider_field(route: Route, pg: &str, template_name: Option<&str>) -> Option<String> {
    let cut = pg.find(['.', '[']).unwrap_or(pg.len());
    let (base, rest) = pg.split_at(cut);
    if base == "attachments" {
        let (index, member) = attachment_path(rest);
        return Some(match route.provider() {
            Provider::Resend => resend::attachment_field(index, member),
            Provider::Postmark => postmark::attachment_field(index, member),
            Provider::SendGrid => sendgrid::attachment_field(index, member),
        });
    }
    let name = match route.provider() {
        Provider::Resend => resend::field_name(base),
        Provider::Postmark => postmark::field_name(base, template_name),
        Provider::SendGrid => sendgrid::field_name(base),
    }?;
    Some(format!("{name}{rest}"))
}

/// `[2].content` → (Some(2), Some("content")); `[2]` → (Some(2), None); `` → (None, None).
fn attachment_path(rest: &str) -> (Option<usize>, Option<&str>) {
    let Some(inner) = rest.strip_prefix('[') else {
        return (None, None);
    };
    let Some((index, after)) = inner.split_once(']') else {
        return (None, None);
    };
    (index.parse().ok(), after.strip_prefix('.').filter(|m| !m.is_empty()))
}

// ---------------------------------------------------------------------------------------------
// What the provider modules share.

/// The body as JSON: UTF-8 (a leading byte order mark is skipped), not empty, valid JSON.
fn decode(body: &[u8]) -> Result<Value, Refusal> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let text = std::str::from_utf8(body).map_err(|e| {
        Refusal::BadJson(format!("the request body is not UTF-8 (an invalid byte at offset {})", e.valid_up_to()))
    })?;
    if text.trim().is_empty() {
        return Err(Refusal::BadJson("the request body is empty; send a JSON document".into()));
    }
    serde_json::from_str(text).map_err(|e| Refusal::BadJson(format!("the request body is not valid JSON: {e}")))
}

/// The `Idempotency-Key` header, checked as Resend does: 1 to 256 characters (and no control
/// characters, which `email.send` refuses).
fn idempotency_key(headers: &[(String, String)]) -> Result<Option<&str>, Refusal> {
    let Some(key) = header(headers, "idempotency-key") else {
        return Ok(None);
    };
    let n = key.chars().count();
    if n == 0 || n > MAX_KEY_CHARS || key.chars().any(char::is_control) {
        return Err(Refusal::invalid(
            IDEMPOTENCY_HEADER,
            format!("must be 1 to {MAX_KEY_CHARS} characters without control characters ({n} given)"),
        ));
    }
    Ok(Some(key))
}

/// The key of message `index` of a request that carries several: `KEY[index]`, or
/// `hex(SHA-256(KEY))[index]` when that would pass 256 characters.
pub fn derived_key(key: &str, index: usize) -> String {
    let suffix = format!("[{index}]");
    if key.chars().count() + suffix.len() <= MAX_KEY_CHARS {
        return format!("{key}{suffix}");
    }
    let d = digest::digest(&digest::SHA256, key.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}{suffix}")
}

/// The first value of a header (names compared without regard to case).
pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// How a provider writes a path into its JSON: `a[0].b` or `a.0.b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathStyle {
    Brackets,
    Dots,
}

/// The path of the first string (member name or value) holding a NUL character; `""` for the
/// root.
fn find_nul(v: &Value, style: PathStyle) -> Option<String> {
    fn walk(v: &Value, path: &mut String, style: PathStyle) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                match style {
                    PathStyle::Brackets => path.push_str(&format!("[{i}]")),
                    PathStyle::Dots if len == 0 => path.push_str(&i.to_string()),
                    PathStyle::Dots => path.push_str(&format!(".{i}")),
                }
                let found = walk(item, path, style);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(k, item)| {
                let len = path.len();
                if len > 0 {
                    path.push('.');
                }
                path.push_str(&k.replace('\0', "\\u0000"));
                let found = k.contains('\0') || walk(item, path, style);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    let mut path = String::new();
    walk(v, &mut path, style).then_some(path)
}

/// A JSON value's type, for messages: "a string", "an array", …
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `field` must be `expected` but is `v`.
pub(crate) fn wrong(field: &str, expected: &str, v: &Value) -> Refusal {
    Refusal::invalid(field, format!("must be {expected}, not {}", kind(v)))
}

/// A JSON object being read, with the prefix that turns its member names into field names.
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Obj<'a> {
    /// `v` must be an object; `what` names it when it is not (`None`: the request body).
    pub(crate) fn new(v: &'a Value, what: Option<&str>, prefix: String) -> Result<Obj<'a>, Refusal> {
        match v {
            Value::Object(map) => Ok(Obj { map, prefix }),
            other => Err(match what {
                Some(field) => wrong(field, "an object", other),
                None => Refusal::general(format!("the request body must be a JSON object, not {}", kind(other))),
            }),
        }
    }

    /// The field name of member `key`.
    pub(crate) fn field(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A member; `null` counts as absent.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn str(&self, key: &str) -> Result<Option<&'a str>, Refusal> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(&self.field(key), "a string", v)),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<String>, Refusal> {
        Ok(self.str(key)?.map(str::to_string))
    }

    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>, Refusal> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong(&self.field(key), "true or false", v)),
        }
    }

    pub(crate) fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, Refusal> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(wrong(&self.field(key), "an object", v)),
        }
    }

    pub(crate) fn array(&self, key: &str) -> Result<Option<&'a [Value]>, Refusal> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.as_slice())),
            Some(v) => Err(wrong(&self.field(key), "an array", v)),
        }
    }

    /// A nested object member, read with its own prefix.
    pub(crate) fn child(&self, key: &str, separator: &str) -> Result<Option<Obj<'a>>, Refusal> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => Obj::new(v, Some(&self.field(key)), format!("{}{key}{separator}", self.prefix)).map(Some),
        }
    }
}

/// An object of string values (custom headers): each value must be a string.
pub(crate) fn string_object(map: &Map<String, Value>, field: &str, sep: &str) -> Result<Map<String, Value>, Refusal> {
    let mut out = Map::new();
    for (name, v) in map {
        match v {
            Value::String(_) => {
                out.insert(name.clone(), v.clone());
            }
            other => return Err(wrong(&format!("{field}{sep}{name}"), "a string", other)),
        }
    }
    Ok(out)
}

/// One attachment in `email.send`'s shape. A missing content type is guessed from the file
/// name; a content id loses a `cid:` prefix and angle brackets.
pub(crate) fn attachment(
    filename: &str,
    content_type: Option<&str>,
    content: String,
    content_id: Option<&str>,
) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), Value::from(filename));
    let content_type = match content_type.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => t.to_string(),
        None => guess_content_type(filename).to_string(),
    };
    m.insert("content_type".into(), Value::from(content_type));
    m.insert("content".into(), Value::from(content));
    if let Some(cid) = content_id.map(clean_content_id).filter(|c| !c.is_empty()) {
        m.insert("content_id".into(), Value::from(cid));
    }
    Value::Object(m)
}

/// `cid:logo`, `<logo>`, ` logo ` → `logo`.
pub(crate) fn clean_content_id(cid: &str) -> String {
    let cid = cid.trim();
    let cid = match cid.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("cid:") => cid.get(4..).unwrap_or_default(),
        _ => cid,
    };
    cid.trim().trim_start_matches('<').trim_end_matches('>').trim().to_string()
}

/// The MIME type of a file name's extension, for attachments sent without one.
pub fn guess_content_type(filename: &str) -> &'static str {
    let ext = match filename.rsplit_once('.') {
        Some((_, ext)) => ext.to_ascii_lowercase(),
        None => return "application/octet-stream",
    };
    match ext.as_str() {
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "bmp" => "image/bmp",
        "ico" => "image/vnd.microsoft.icon",
        "tif" | "tiff" => "image/tiff",
        "heic" => "image/heic",
        "txt" | "log" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "htm" | "html" => "text/html",
        "css" => "text/css",
        "ics" => "text/calendar",
        "vcf" => "text/vcard",
        "xml" => "application/xml",
        "json" => "application/json",
        "js" => "text/javascript",
        "eml" => "message/rfc822",
        "rtf" => "application/rtf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "7z" => "application/x-7z-compressed",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ppt" => "application/vnd.ms-powerpoint",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "odt" => "application/vnd.oasis.opendocument.text",
        "ods" => "application/vnd.oasis.opendocument.spreadsheet",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        _ => "application/octet-stream",
    }
}

/// Quotes a user value for a message (pg_email's one way of doing it).
pub(crate) use crate::message::show;

/// Refuses CR, LF (and other control characters): a display name or an address stays on one
/// header line.
pub(crate) fn check_single_line(field: &str, value: &str) -> Result<(), Refusal> {
    if value.chars().any(char::is_control) {
        return Err(Refusal::invalid(
            field,
            format!("{} contains a line break or control character (header injection is refused)", show(value)),
        ));
    }
    Ok(())
}

/// A light check of a bare address given on its own (SendGrid's `email`): one line, no spaces,
/// no list or angle-bracket punctuation, a local part and a domain. `email.send` checks it fully.
pub(crate) fn check_address(field: &str, email: &str) -> Result<(), Refusal> {
    check_single_line(field, email)?;
    let bad = |c: char| c.is_whitespace() || "<>,;\"()[]\\".contains(c);
    let ok = match email.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && !domain.is_empty() && !email.contains(bad),
        None => false,
    };
    if !ok {
        return Err(Refusal::invalid(field, format!("{} is not a valid email address", show(email))));
    }
    Ok(())
}

/// A mailbox as `email.send` reads it (pg_email's one way of writing one).
pub(crate) use crate::message::mailbox_of as mailbox;

/// A JSON reply.
pub(crate) fn json_reply(status: u16, body: &Value, mut headers: Vec<(&'static str, String)>) -> Reply {
    headers.insert(0, ("content-type", "application/json".to_string()));
    Reply { status, headers, body: body.to_string() }
}

/// `Invalid` as a sentence: `Missing {q}to{q} field.` / `Invalid {q}to{q} field: …` / the message
/// itself when no field is named.
pub(crate) fn sentence(field: Option<&str>, message: &str, quote: &str) -> String {
    let Some(field) = field else {
        return message.to_string();
    };
    if let Some(rest) = message.strip_prefix(REQUIRED) {
        let rest = rest.trim_end_matches('.');
        return format!("Missing {quote}{field}{quote} field{rest}.");
    }
    format!("Invalid {quote}{field}{quote} field: {message}")
}

/// The `Retry-After` value of a rate refusal: at least one second.
pub(crate) fn retry_secs(secs: u64) -> String {
    secs.max(1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn no_headers() -> Vec<(String, String)> {
        Vec::new()
    }

    fn json_of(r: &Reply) -> Value {
        serde_json::from_str(&r.body).unwrap_or(Value::Null)
    }

    fn hdr<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    const ALL_ROUTES: [Route; 7] = [
        Route::ResendEmail,
        Route::ResendBatch,
        Route::PostmarkEmail,
        Route::PostmarkBatch,
        Route::PostmarkTemplate,
        Route::PostmarkTemplateBatch,
        Route::SendGridSend,
    ];

    #[test]
    fn routes_from_paths() {
        let cases = [
            ("/emails", Some(Route::ResendEmail)),
            ("/emails/", Some(Route::ResendEmail)),
            ("/emails/batch", Some(Route::ResendBatch)),
            ("/emails/batch?x=1", Some(Route::ResendBatch)),
            ("/email", Some(Route::PostmarkEmail)),
            ("/email/batch", Some(Route::PostmarkBatch)),
            ("/email/withTemplate", Some(Route::PostmarkTemplate)),
            ("/email/withtemplate/", Some(Route::PostmarkTemplate)),
            ("/EMAIL/WITHTEMPLATE", Some(Route::PostmarkTemplate)),
            ("/email/batchWithTemplates", Some(Route::PostmarkTemplateBatch)),
            ("/v3/mail/send", Some(Route::SendGridSend)),
            ("/v3/mail/send/", Some(Route::SendGridSend)),
            ("/EMAILS", None),
            ("/V3/mail/send", None),
            ("/emails//", None),
            ("/", None),
            ("", None),
            ("/webhooks/x", None),
            ("/email/batch/extra", None),
        ];
        for (path, want) in cases {
            assert_eq!(Route::from_path(true, path), want, "{path}");
        }
        assert_eq!(Route::from_path(false, "/emails"), None);
        assert_eq!(Route::from_path(false, "/v3/mail/send"), None);
    }

    #[test]
    fn route_properties() {
        let providers: Vec<Provider> = ALL_ROUTES.iter().map(|r| r.provider()).collect();
        use Provider::*;
        assert_eq!(providers, [Resend, Resend, Postmark, Postmark, Postmark, Postmark, SendGrid]);
        let batch: Vec<bool> = ALL_ROUTES.iter().map(|r| r.is_batch()).collect();
        assert_eq!(batch, [false, true, false, true, false, true, false]);
        let max: Vec<usize> = ALL_ROUTES.iter().map(|r| r.max_messages()).collect();
        assert_eq!(max, [1, 100, 1, 500, 1, 500, 1000]);
    }

    #[test]
    fn bodies_that_are_not_json_are_refused_in_each_shape() {
        for (body, needle) in [
            (&b""[..], "empty"),
            (&b"  \n"[..], "empty"),
            (&b"\xff\xfe{}"[..], "not UTF-8"),
            (&b"{\"to\": "[..], "not valid JSON"),
            (&b"{'to': 1}"[..], "not valid JSON"),
            (&b"{} {}"[..], "not valid JSON"),
        ] {
            for route in ALL_ROUTES {
                let r = parse(route, &no_headers(), body).unwrap_err();
                let Refusal::BadJson(m) = &r else { panic!("{route:?}: {r:?}") };
                assert!(m.contains(needle), "{m}");
            }
            let r = parse(Route::ResendEmail, &no_headers(), body).unwrap_err();
            let reply = refuse(Provider::Resend, &r);
            assert_eq!(reply.status, 400);
            assert_eq!(json_of(&reply)["name"], "validation_error");
            assert_eq!(json_of(&reply)["statusCode"], 400);
            let reply = refuse(Provider::Postmark, &r);
            assert_eq!((reply.status, json_of(&reply)["ErrorCode"].as_i64()), (422, Some(402)));
            let reply = refuse(Provider::SendGrid, &r);
            assert_eq!(reply.status, 400);
            assert_eq!(json_of(&reply)["errors"][0]["field"], Value::Null);
        }
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let body = b"\xEF\xBB\xBF{\"to\":\"a@x.org\",\"subject\":\"s\",\"text\":\"t\"}";
        let p = parse(Route::ResendEmail, &no_headers(), body).unwrap();
        assert_eq!(p.calls[0].recipients.as_deref(), Some("a@x.org"));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for route in ALL_ROUTES {
            assert!(matches!(parse(route, &no_headers(), deep.as_bytes()), Err(Refusal::BadJson(_))));
        }
        let deep = format!("{{\"headers\":{}1{}}}", "{\"a\":".repeat(100), "}".repeat(100));
        assert!(parse(Route::ResendEmail, &no_headers(), deep.as_bytes()).is_err());
    }

    #[test]
    fn nul_characters_are_refused_naming_the_member() {
        let body = json!({"to": "a@x.org", "subject": "s", "headers": {"X-A": "a\u{0}b"}});
        let r = parse(Route::ResendEmail, &no_headers(), body.to_string().as_bytes()).unwrap_err();
        assert_eq!(
            r,
            Refusal::invalid("headers.X-A", "contains a NUL character (\\u0000), which PostgreSQL cannot store")
        );
        let body = json!([{"To": "a@x.org"}, {"Attachments": [{"Name": "a\u{0}"}]}]);
        let r = parse(Route::PostmarkBatch, &no_headers(), body.to_string().as_bytes()).unwrap_err();
        assert!(matches!(&r, Refusal::Invalid { field: Some(f), .. } if f == "[1].Attachments[0].Name"), "{r:?}");
        let body = json!({"personalizations": [{"to": [{"email": "a@x.org", "name": "\u{0}"}]}]});
        let r = parse(Route::SendGridSend, &no_headers(), body.to_string().as_bytes()).unwrap_err();
        assert!(matches!(&r, Refusal::Invalid { field: Some(f), .. } if f == "personalizations.0.to.0.name"), "{r:?}");
        let body = json!({"k\u{0}": 1});
        let r = parse(Route::SendGridSend, &no_headers(), body.to_string().as_bytes()).unwrap_err();
        assert!(matches!(&r, Refusal::Invalid { field: Some(f), .. } if f == "k\\u0000"), "{r:?}");
        let r = parse(Route::ResendEmail, &no_headers(), b"\"\\u0000\"").unwrap_err();
        assert!(matches!(&r, Refusal::Invalid { field: None, .. }), "{r:?}");
    }

    #[test]
    fn idempotency_keys() {
        let headers = vec![("idempotency-key".to_string(), "order/1".to_string())];
        let one = json!({"to": "a@x.org", "subject": "s", "text": "t"});
        let p = parse(Route::ResendEmail, &headers, one.to_string().as_bytes()).unwrap();
        assert_eq!(p.calls[0].idempotency_key.as_deref(), Some("order/1"));
        let two = json!([one, one]);
        let p = parse(Route::ResendBatch, &headers, two.to_string().as_bytes()).unwrap();
        let keys: Vec<_> = p.calls.iter().map(|c| c.idempotency_key.clone().unwrap_or_default()).collect();
        assert_eq!(keys, ["order/1[0]", "order/1[1]"]);
        let sg = json!({"personalizations": [{"to": [{"email": "a@x.org"}]}], "subject": "s",
                        "content": [{"type": "text/plain", "value": "t"}]});
        let p = parse(Route::SendGridSend, &headers, sg.to_string().as_bytes()).unwrap();
        assert_eq!(p.calls[0].idempotency_key.as_deref(), Some("order/1[0]"));
        let p = parse(Route::PostmarkEmail, &headers, b"{\"To\":\"a@x.org\"}").unwrap();
        assert_eq!(p.calls[0].idempotency_key.as_deref(), Some("order/1"));
        let p = parse(Route::ResendEmail, &no_headers(), one.to_string().as_bytes()).unwrap();
        assert_eq!(p.calls[0].idempotency_key, None);

        for bad in [String::new(), "k".repeat(257), "a\tb".to_string()] {
            let headers = vec![("idempotency-key".to_string(), bad)];
            let r = parse(Route::ResendEmail, &headers, one.to_string().as_bytes()).unwrap_err();
            let reply = refuse(Provider::Resend, &r);
            assert_eq!(reply.status, 400);
            assert_eq!(json_of(&reply)["name"], "invalid_idempotency_key");
        }
        let headers = vec![("idempotency-key".to_string(), "é".repeat(256))];
        assert!(parse(Route::ResendEmail, &headers, one.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn derived_keys_stay_within_the_limit() {
        assert_eq!(derived_key("k", 7), "k[7]");
        let long = "k".repeat(256);
        let d = derived_key(&long, 42);
        assert_eq!(d.len(), 64 + 4);
        assert!(d.ends_with("[42]"));
        assert_ne!(derived_key(&long, 1), derived_key(&"j".repeat(256), 1));
        let edge = "k".repeat(253);
        assert_eq!(derived_key(&edge, 1), format!("{edge}[1]"));
        assert_eq!(derived_key(&edge, 10).chars().count(), 68);
    }

    #[test]
    fn mailboxes_and_content_ids() {
        assert_eq!(mailbox(None, "a@x.org"), "a@x.org");
        assert_eq!(mailbox(Some(" "), "a@x.org"), "a@x.org");
        assert_eq!(mailbox(Some("Ada Lovelace"), "a@x.org"), "Ada Lovelace <a@x.org>");
        assert_eq!(mailbox(Some("Doe, Jane"), "j@x.org"), "\"Doe, Jane\" <j@x.org>");
        assert_eq!(mailbox(Some("A \"B\" \\C"), "j@x.org"), "\"A \\\"B\\\" \\\\C\" <j@x.org>");
        assert_eq!(mailbox(Some("Ada  Lovelace"), "a@x.org"), "\"Ada  Lovelace\" <a@x.org>");
        assert_eq!(mailbox(Some("Zoë"), "z@x.org"), "Zoë <z@x.org>");
        assert_eq!(clean_content_id("cid:logo"), "logo");
        assert_eq!(clean_content_id("CID:<logo@x>"), "logo@x");
        assert_eq!(clean_content_id(" <a> "), "a");
        assert_eq!(clean_content_id("cid"), "cid");
        assert_eq!(clean_content_id("é"), "é");
        assert_eq!(guess_content_type("report.PDF"), "application/pdf");
        assert_eq!(guess_content_type("photo.jpeg"), "image/jpeg");
        assert_eq!(guess_content_type("archive.tar.gz"), "application/gzip");
        assert_eq!(guess_content_type("README"), "application/octet-stream");
        assert_eq!(guess_content_type("x.unknown"), "application/octet-stream");
        assert_eq!(guess_content_type("."), "application/octet-stream");
    }

    #[test]
    fn addresses_given_alone_are_checked_lightly() {
        for ok in ["a@x.org", "a.b+c@x-y.org", "ü@exämple.org"] {
            assert_eq!(check_address("f", ok), Ok(()), "{ok}");
        }
        for bad in ["", "a", "@x.org", "a@", "a b@x.org", "<a@x.org>", "a@x.org, b@y.org", "a@x.org\r\nBcc: e@v.il"] {
            let r = check_address("f", bad).unwrap_err();
            assert!(matches!(&r, Refusal::Invalid { field: Some(f), .. } if f == "f"), "{bad}");
        }
    }

    #[test]
    fn sql_errors_name_each_providers_field() {
        let cases: &[(Route, &str, &str, Refusal)] = &[
            (
                Route::ResendEmail,
                "22023",
                "invalid recipients: \"x\" is not a valid address: missing @",
                Refusal::invalid("to", "\"x\" is not a valid address: missing @"),
            ),
            (
                Route::PostmarkEmail,
                "22023",
                "invalid recipients: \"x\" is not a valid address: missing @",
                Refusal::invalid("To", "\"x\" is not a valid address: missing @"),
            ),
            (
                Route::SendGridSend,
                "22023",
                "invalid recipients: \"x\" is not a valid address: missing @",
                Refusal::invalid("personalizations.0.to", "\"x\" is not a valid address: missing @"),
            ),
            (Route::ResendBatch, "22023", "recipients is required (it is NULL or missing)", Refusal::missing("to")),
            (Route::PostmarkBatch, "22023", "subject is required (it is NULL or missing)", Refusal::missing("Subject")),
            (
                Route::ResendEmail,
                "22023",
                "invalid attachments[0].content: is not valid base64: Invalid byte 33, offset 0.",
                Refusal::invalid("attachments[0].content", "is not valid base64: Invalid byte 33, offset 0."),
            ),
            (
                Route::PostmarkEmail,
                "22023",
                "invalid attachments[2].content_type: \"x\" is not a valid MIME type",
                Refusal::invalid("Attachments[2].ContentType", "\"x\" is not a valid MIME type"),
            ),
            (
                Route::SendGridSend,
                "22023",
                "invalid attachments[1].content_type: \"x\" is not a valid MIME type",
                Refusal::invalid("attachments.1.type", "\"x\" is not a valid MIME type"),
            ),
            (
                Route::ResendEmail,
                "22023",
                "invalid headers.X-Long: value is longer than 998 bytes",
                Refusal::invalid("headers.X-Long", "value is longer than 998 bytes"),
            ),
            (
                Route::PostmarkEmail,
                "22023",
                "invalid headers: header \"Subject\" is set by pg_email itself and cannot be given in headers",
                Refusal::invalid(
                    "Headers",
                    "header \"Subject\" is set by pg_email itself and cannot be given in headers",
                ),
            ),
            (
                Route::ResendEmail,
                "22023",
                "invalid body: at least one of body and html is required",
                Refusal::invalid("text", "is required (at least one of text and html)"),
            ),
            (
                Route::PostmarkEmail,
                "22023",
                "invalid body: at least one of body and html is required",
                Refusal::invalid("TextBody", "is required (at least one of TextBody and HtmlBody)"),
            ),
            (
                Route::SendGridSend,
                "22023",
                "invalid body: at least one of body and html is required",
                Refusal::invalid("content", "is required (a text or an HTML part)"),
            ),
            (
                Route::ResendEmail,
                "22023",
                "invalid sender: no sender: pass sender => 'Name <from@example.org>', set from= on the transport DSN",
                Refusal::invalid("from", "is required (this server has no default sender)"),
            ),
            (
                Route::PostmarkEmail,
                "22023",
                "invalid metadata: must be a JSON object",
                Refusal::invalid("Metadata", "must be a JSON object"),
            ),
            (
                Route::SendGridSend,
                "22023",
                "invalid tags: tag \"\" must be 1 to 128 characters without control characters",
                Refusal::invalid("categories", "tag \"\" must be 1 to 128 characters without control characters"),
            ),
            (
                Route::ResendEmail,
                "22023",
                "invalid idempotency_key: \"a\u{1}\" must be 1 to 256 characters without control characters",
                Refusal::invalid(
                    IDEMPOTENCY_HEADER,
                    "\"a\u{1}\" must be 1 to 256 characters without control characters",
                ),
            ),
            (
                Route::ResendEmail,
                "22023",
                "invalid idempotency_key: \"k\" was already used for message 5 with different content",
                Refusal::IdempotencyConflict(
                    "the Idempotency-Key \"k\" was already used for message 5 with different content; repeat a \
                     request with exactly the same content, or use a new key"
                        .into(),
                ),
            ),
            (
                Route::ResendEmail,
                "22023",
                "something went wrong in a way pg_email words freely",
                Refusal::general("something went wrong in a way pg_email words freely"),
            ),
            (Route::ResendEmail, "22023", "invalid transport: nope", Refusal::general("invalid transport: nope")),
            (
                Route::PostmarkTemplate,
                "42704",
                "template \"welcome\" does not exist",
                Refusal::invalid("TemplateAlias", "template \"welcome\" does not exist"),
            ),
            (
                Route::PostmarkTemplate,
                "42704",
                "template \"12345\" does not exist",
                Refusal::invalid("TemplateId", "template \"12345\" does not exist"),
            ),
            (
                Route::ResendEmail,
                "42704",
                "template \"welcome\" does not exist",
                Refusal::invalid("template.id", "template \"welcome\" does not exist"),
            ),
            (
                Route::ResendEmail,
                "42704",
                "topic \"news\" does not exist",
                Refusal::invalid("topic_id", "topic \"news\" does not exist"),
            ),
            (
                Route::SendGridSend,
                "42704",
                "topic \"17\" does not exist",
                Refusal::invalid("asm.group_id", "topic \"17\" does not exist"),
            ),
            (
                Route::PostmarkEmail,
                "42704",
                "topic \"news\" does not exist",
                Refusal::general("topic \"news\" does not exist"),
            ),
            (
                Route::ResendEmail,
                "42704",
                "transport \"smtp2\" does not exist",
                Refusal::general("transport \"smtp2\" does not exist"),
            ),
            (
                Route::SendGridSend,
                "42704",
                "no default transport is configured",
                Refusal::general("no default transport is configured"),
            ),
            (
                Route::ResendEmail,
                "22007",
                "invalid input syntax for type timestamp with time zone: \"x\"",
                Refusal::invalid("scheduled_at", "invalid input syntax for type timestamp with time zone: \"x\""),
            ),
            (
                Route::SendGridSend,
                "22008",
                "date/time field value out of range: \"x\"",
                Refusal::invalid("send_at", "date/time field value out of range: \"x\""),
            ),
            (
                Route::PostmarkEmail,
                "22008",
                "date/time field value out of range: \"x\"",
                Refusal::general("date/time field value out of range: \"x\""),
            ),
            (Route::ResendEmail, "42501", "permission denied for function send", Refusal::Forbidden),
            (
                Route::PostmarkEmail,
                "42501",
                "new row violates row-level security policy for table \"messages\"",
                Refusal::Forbidden,
            ),
            (
                Route::ResendEmail,
                "23514",
                "new row for relation \"messages\" violates check constraint \"x\"",
                Refusal::general("new row for relation \"messages\" violates check constraint \"x\""),
            ),
            (Route::ResendEmail, "P0001", "our domain only", Refusal::general("our domain only")),
            (Route::ResendEmail, "22P02", "invalid input syntax", Refusal::general("invalid input syntax")),
            (Route::ResendEmail, "40001", "retry", Refusal::Unavailable),
            (Route::ResendEmail, "57014", "canceling statement due to statement timeout", Refusal::Unavailable),
            (Route::ResendEmail, "08006", "connection failure", Refusal::Unavailable),
            (Route::ResendEmail, "XX000", "internal", Refusal::Unavailable),
            (Route::ResendEmail, "55000", "email.send is out of date", Refusal::Unavailable),
            (Route::ResendEmail, "", "", Refusal::Unavailable),
        ];
        for (route, state, message, want) in cases {
            assert_eq!(&from_sql_error(*route, state, message), want, "{route:?} {state} {message}");
        }
    }

    #[test]
    fn sql_error_odd_messages_never_panic() {
        for m in ["", "invalid ", "invalid : x", "invalid a b: c", " is required (it is NULL or missing)", "\"", "é"] {
            for route in ALL_ROUTES {
                for state in ["22023", "42704", "22007", "42501", "99999"] {
                    let r = from_sql_error(route, state, m);
                    assert!(!refuse(route.provider(), &r).body.is_empty());
                }
            }
        }
        assert_eq!(attachment_path("[x].content"), (None, Some("content")));
        assert_eq!(attachment_path("[3"), (None, None));
        assert_eq!(
            from_sql_error(Route::ResendEmail, "22023", "invalid attachments: must be a JSON array"),
            Refusal::invalid("attachments", "must be a JSON array")
        );
    }

    #[test]
    fn every_refusal_in_every_shape() {
        let refusals = [
            Refusal::MissingKey,
            Refusal::InvalidKey,
            Refusal::Forbidden,
            Refusal::RateLimited { retry_after_secs: 3, limit: Some(10) },
            Refusal::TooLarge,
            Refusal::BadJson("bad".into()),
            Refusal::missing("to"),
            Refusal::invalid("to", "\"x\" is not a valid address"),
            Refusal::invalid("attachments[0].path", "no"),
            Refusal::invalid(IDEMPOTENCY_HEADER, "too long"),
            Refusal::general("whole"),
            Refusal::IdempotencyConflict("reused".into()),
            Refusal::Unavailable,
        ];
        let resend: Vec<(u16, String)> = refusals
            .iter()
            .map(|r| {
                let reply = refuse(Provider::Resend, r);
                let j = json_of(&reply);
                assert_eq!(j["statusCode"].as_u64(), Some(u64::from(reply.status)));
                assert!(j["message"].is_string());
                assert_eq!(hdr(&reply, "content-type"), Some("application/json"));
                (reply.status, j["name"].as_str().unwrap_or_default().to_string())
            })
            .collect();
        let want = [
            (401, "missing_api_key"),
            (403, "invalid_api_key"),
            (403, "invalid_permission"),
            (429, "rate_limit_exceeded"),
            (413, "validation_error"),
            (400, "validation_error"),
            (422, "missing_required_field"),
            (422, "validation_error"),
            (422, "invalid_attachment"),
            (400, "invalid_idempotency_key"),
            (422, "validation_error"),
            (409, "invalid_idempotent_request"),
            (500, "application_error"),
        ];
        assert_eq!(resend, want.map(|(s, n)| (s, n.to_string())));

        let postmark: Vec<(u16, i64)> = refusals
            .iter()
            .map(|r| {
                let reply = refuse(Provider::Postmark, r);
                let j = json_of(&reply);
                assert!(j["Message"].is_string());
                (reply.status, j["ErrorCode"].as_i64().unwrap_or(-1))
            })
            .collect();
        assert_eq!(
            postmark,
            [
                (401, 10),
                (401, 10),
                (422, 405),
                (429, 429),
                (413, 300),
                (422, 402),
                (422, 300),
                (422, 300),
                (422, 300),
                (422, 300),
                (422, 300),
                (422, 300),
                (503, 100)
            ]
        );

        let sendgrid: Vec<(u16, Value)> = refusals
            .iter()
            .map(|r| {
                let reply = refuse(Provider::SendGrid, r);
                let j = json_of(&reply);
                assert_eq!(j["errors"].as_array().map(Vec::len), Some(1));
                assert!(j["errors"][0]["message"].is_string());
                assert_eq!(j["errors"][0]["help"], Value::Null);
                (reply.status, j["errors"][0]["field"].clone())
            })
            .collect();
        assert_eq!(
            sendgrid,
            [
                (401, Value::Null),
                (401, Value::Null),
                (403, Value::Null),
                (429, Value::Null),
                (413, Value::Null),
                (400, Value::Null),
                (400, json!("to")),
                (400, json!("to")),
                (400, json!("attachments[0].path")),
                (400, json!(IDEMPOTENCY_HEADER)),
                (400, Value::Null),
                (409, json!(IDEMPOTENCY_HEADER)),
                (503, Value::Null)
            ]
        );
    }

    #[test]
    fn refusal_messages_read_well() {
        let m = |p, r: &Refusal| {
            let j = json_of(&refuse(p, r));
            j["message"]
                .as_str()
                .or(j["Message"].as_str())
                .or(j["errors"][0]["message"].as_str())
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(m(Provider::Resend, &Refusal::missing("to")), "Missing `to` field.");
        assert_eq!(
            m(Provider::Resend, &Refusal::invalid("to", "\"x\" is not a valid address")),
            "Invalid `to` field: \"x\" is not a valid address"
        );
        assert_eq!(m(Provider::Postmark, &Refusal::missing("To")), "Missing 'To' field.");
        assert_eq!(
            m(Provider::Postmark, &Refusal::invalid("TextBody", "is required (at least one of TextBody and HtmlBody)")),
            "Missing 'TextBody' field (at least one of TextBody and HtmlBody)."
        );
        assert_eq!(
            m(
                Provider::SendGrid,
                &Refusal::invalid("personalizations.0.to.0.email", "\"x\" is not a valid email address")
            ),
            "Invalid personalizations.0.to.0.email field: \"x\" is not a valid email address"
        );
        assert_eq!(m(Provider::SendGrid, &Refusal::general("whole")), "whole");
    }

    #[test]
    fn rate_refusals_carry_retry_headers() {
        let r = Refusal::RateLimited { retry_after_secs: 0, limit: Some(10) };
        let reply = refuse(Provider::Resend, &r);
        assert_eq!(hdr(&reply, "retry-after"), Some("1"));
        assert_eq!(hdr(&reply, "ratelimit-limit"), Some("10"));
        assert_eq!(hdr(&reply, "ratelimit-remaining"), Some("0"));
        assert_eq!(hdr(&reply, "ratelimit-reset"), Some("1"));
        let r = Refusal::RateLimited { retry_after_secs: 30, limit: None };
        let reply = refuse(Provider::Resend, &r);
        assert_eq!(hdr(&reply, "ratelimit-limit"), None);
        assert_eq!(hdr(&reply, "retry-after"), Some("30"));
        let reply = refuse(Provider::Postmark, &r);
        assert_eq!(hdr(&reply, "retry-after"), Some("30"));
        let reply = refuse(Provider::SendGrid, &Refusal::RateLimited { retry_after_secs: 7, limit: Some(600) });
        assert_eq!(hdr(&reply, "retry-after"), Some("7"));
        assert_eq!(hdr(&reply, "x-ratelimit-limit"), Some("600"));
        assert_eq!(hdr(&reply, "x-ratelimit-remaining"), Some("0"));
    }

    #[test]
    fn batch_refusals() {
        let bad = Refusal::invalid("To", "\"x\" is not a valid address");
        let reply = batch_refused(Route::PostmarkBatch, 1, 3, &bad);
        assert_eq!(reply.status, 200);
        let j = json_of(&reply);
        let results = j.as_array().cloned().unwrap_or_default();
        assert_eq!(results.len(), 3);
        assert_eq!(
            results[1],
            json!({"ErrorCode": 300, "Message": "Invalid 'To' field: \"x\" is not a valid address"})
        );
        for i in [0, 2] {
            assert_eq!(results[i]["ErrorCode"], 300);
            assert!(results[i]["Message"].as_str().unwrap_or("").starts_with("Not sent: the message at index 1"));
        }
        let missing = from_sql_error(Route::PostmarkTemplateBatch, "42704", "template \"w\" does not exist");
        let j = json_of(&batch_refused(Route::PostmarkTemplateBatch, 0, 2, &missing));
        assert_eq!(j[0]["ErrorCode"], 1101);
        // Not about the message: answered for the whole request.
        let reply = batch_refused(Route::PostmarkBatch, 1, 3, &Refusal::Unavailable);
        assert_eq!((reply.status, json_of(&reply)["ErrorCode"].as_i64()), (503, Some(100)));
        let reply = batch_refused(Route::PostmarkBatch, 0, 2, &Refusal::Forbidden);
        assert_eq!(reply.status, 422);
        // Resend names the index.
        let reply = batch_refused(Route::ResendBatch, 2, 5, &Refusal::invalid("to", "bad"));
        assert_eq!(reply.status, 422);
        assert_eq!(
            json_of(&reply)["message"],
            "Invalid `to` field: bad (the email at index 2 of the batch; none of its 5 emails was sent)"
        );
        let reply = batch_refused(Route::ResendBatch, 2, 5, &Refusal::IdempotencyConflict("reused".into()));
        assert_eq!(reply.status, 409);
        let reply = batch_refused(Route::ResendBatch, 2, 5, &Refusal::Unavailable);
        assert_eq!(json_of(&reply)["message"], "The database could not take the request in time; retry later.");
        // SendGrid puts the personalization's index into the field.
        let r = from_sql_error(Route::SendGridSend, "22023", "invalid recipients: \"x\" is not a valid address");
        let reply = batch_refused(Route::SendGridSend, 3, 4, &r);
        let j = json_of(&reply);
        assert_eq!(reply.status, 400);
        assert_eq!(j["errors"][0]["field"], "personalizations.3.to");
        assert_eq!(j["errors"][0]["message"], "Invalid personalizations.3.to field: \"x\" is not a valid address");
        let r = from_sql_error(Route::SendGridSend, "22023", "invalid sender: \"x\" is not a valid address");
        assert_eq!(json_of(&batch_refused(Route::SendGridSend, 3, 4, &r))["errors"][0]["field"], "from");
        // A single message is answered as by refuse().
        let r = Refusal::invalid("to", "bad");
        assert_eq!(batch_refused(Route::ResendEmail, 0, 1, &r), refuse(Provider::Resend, &r));
        assert_eq!(batch_refused(Route::SendGridSend, 0, 1, &r), refuse(Provider::SendGrid, &r));
        // Nested batch refusals do not nest again; odd indexes do not panic.
        let nested = Refusal::batch(1, 3, Refusal::batch(2, 3, Refusal::missing("To")));
        assert!(matches!(nested, Refusal::Batch { index: 2, .. }));
        assert_eq!(batch_refused(Route::PostmarkBatch, 9, 3, &bad).status, 200);
        assert_eq!(json_of(&batch_refused(Route::PostmarkBatch, 9, 3, &bad)).as_array().map(Vec::len), Some(10));
        assert_eq!(batch_refused(Route::PostmarkBatch, 100_000, 3, &bad).status, 422);
        assert_eq!(batch_refused(Route::PostmarkBatch, usize::MAX, 3, &bad).status, 422);
        assert_eq!(batch_refused(Route::ResendBatch, usize::MAX, usize::MAX, &bad).status, 422);
        assert_eq!(batch_refused(Route::SendGridSend, usize::MAX, 0, &bad).status, 400);
        assert_eq!(
            json_of(&batch_refused(Route::PostmarkBatch, 0, usize::MAX, &bad)).as_array().map(Vec::len),
            Some(500)
        );
    }

    #[test]
    fn accepted_answers() {
        let call = |to: &str| Call { recipients: Some(to.into()), ..Call::default() };
        let calls = [call("a@x.org"), call("Bo <b@y.org>")];
        let now = "2026-01-02T03:04:05Z";

        let r = accepted(Route::ResendEmail, &calls[..1], &[42], now);
        assert_eq!((r.status, json_of(&r)), (200, json!({"id": "42"})));
        let r = accepted(Route::ResendBatch, &calls, &[42, 43], now);
        assert_eq!((r.status, json_of(&r)), (200, json!({"data": [{"id": "42"}, {"id": "43"}]})));

        let one = |to: &str, id: &str| json!({"To": to, "SubmittedAt": now, "MessageID": id, "ErrorCode": 0, "Message": "OK"});
        for route in [Route::PostmarkEmail, Route::PostmarkTemplate] {
            let r = accepted(route, &calls[..1], &[42], now);
            assert_eq!((r.status, json_of(&r)), (200, one("a@x.org", "42")));
        }
        for route in [Route::PostmarkBatch, Route::PostmarkTemplateBatch] {
            let r = accepted(route, &calls, &[42, 43], now);
            assert_eq!(json_of(&r), json!([one("a@x.org", "42"), one("Bo <b@y.org>", "43")]));
        }

        let r = accepted(Route::SendGridSend, &calls, &[42, 43], now);
        assert_eq!((r.status, r.body.as_str()), (202, ""));
        assert_eq!(hdr(&r, "x-message-id"), Some("42"));
        assert_eq!(hdr(&r, "x-pg-email-ids"), Some("42,43"));
        assert_eq!(hdr(&r, "content-type"), None);

        let r = validated(Route::SendGridSend, &calls, now);
        assert_eq!((r.status, r.body.as_str(), r.headers.len()), (200, "", 0));
        assert_eq!(json_of(&validated(Route::ResendEmail, &calls[..1], now)), json!({"id": "0"}));

        // Fewer ids or calls than expected: no panic, the shape holds.
        assert_eq!(json_of(&accepted(Route::ResendEmail, &[], &[], now)), json!({"id": ""}));
        assert_eq!(json_of(&accepted(Route::PostmarkEmail, &[], &[], now))["MessageID"], "");
        assert_eq!(json_of(&accepted(Route::PostmarkBatch, &[], &[7], now))[0]["To"], "");
        assert_eq!(accepted(Route::SendGridSend, &[], &[], now).headers.len(), 0);
    }

    /// A JSON value of any shape, with member names a send request uses, so that mutated
    /// requests reach deep into the parsers.
    fn arb_json() -> impl Strategy<Value = Value> {
        let names = prop::sample::select(vec![
            "from",
            "to",
            "cc",
            "bcc",
            "reply_to",
            "subject",
            "html",
            "text",
            "headers",
            "attachments",
            "tags",
            "scheduled_at",
            "template",
            "id",
            "variables",
            "topic_id",
            "content",
            "filename",
            "content_type",
            "content_id",
            "path",
            "name",
            "value",
            "type",
            "data",
            "From",
            "To",
            "Cc",
            "Bcc",
            "Subject",
            "Tag",
            "HtmlBody",
            "TextBody",
            "ReplyTo",
            "Headers",
            "Name",
            "Value",
            "TrackOpens",
            "TrackLinks",
            "Attachments",
            "Content",
            "ContentType",
            "ContentID",
            "Metadata",
            "MessageStream",
            "TemplateAlias",
            "TemplateId",
            "TemplateModel",
            "Messages",
            "personalizations",
            "email",
            "send_at",
            "custom_args",
            "categories",
            "disposition",
            "mail_settings",
            "sandbox_mode",
            "enable",
            "tracking_settings",
            "click_tracking",
            "open_tracking",
            "asm",
            "group_id",
            "reply_to_list",
            "template_id",
            "footer",
            "substitutions",
            "sections",
            "x",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::from),
            prop::sample::select(vec![
                "a@x.org",
                "Ada <a@x.org>",
                "text/plain",
                "text/html",
                "inline",
                "HtmlOnly",
                "TextOnly",
                "aGk=",
                "2024-08-05T11:52:01Z",
                "in 1 min",
                "cid:x",
                "Buffer",
                "",
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((names.clone(), inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    /// Every outcome of a parse renders: a refusal as a reply with a JSON body, a success as
    /// calls that each provider can answer.
    fn check_outcome(route: Route, out: Result<Parsed, Refusal>) {
        match out {
            Ok(p) => {
                assert!(!p.calls.is_empty());
                assert!(p.calls.len() <= route.max_messages());
                let ids: Vec<i64> = (1..=p.calls.len() as i64).collect();
                let reply = accepted(route, &p.calls, &ids, "2026-01-01T00:00:00Z");
                assert!(reply.status == 200 || reply.status == 202);
                for c in &p.calls {
                    for v in [&c.headers, &c.metadata, &c.data] {
                        assert!(v.as_ref().is_none_or(Value::is_object));
                    }
                    assert!(c.attachments.as_ref().is_none_or(Value::is_array));
                }
            }
            Err(r) => {
                let reply = refuse(route.provider(), &r);
                assert!(reply.status >= 200 && reply.status < 600);
                assert!(serde_json::from_str::<Value>(&reply.body).is_ok(), "{}", reply.body);
                let n = 3;
                let reply = batch_refused(route, 1, n, &r);
                assert!(serde_json::from_str::<Value>(&reply.body).is_ok());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256),
                                 key in prop::option::of(".{0,300}")) {
            let headers: Vec<(String, String)> = key.into_iter().map(|k| ("idempotency-key".to_string(), k)).collect();
            for route in ALL_ROUTES {
                check_outcome(route, parse(route, &headers, &body));
            }
        }

        #[test]
        fn any_json_never_panics(v in arb_json()) {
            let body = v.to_string();
            for route in ALL_ROUTES {
                check_outcome(route, parse(route, &no_headers(), body.as_bytes()));
            }
            // The same value as each message of a batch and as the only personalization.
            check_outcome(Route::ResendBatch, parse(Route::ResendBatch, &no_headers(), json!([v]).to_string().as_bytes()));
            check_outcome(Route::PostmarkBatch, parse(Route::PostmarkBatch, &no_headers(), json!([v]).to_string().as_bytes()));
            let messages = json!({"Messages": [v]}).to_string();
            check_outcome(Route::PostmarkTemplateBatch, parse(Route::PostmarkTemplateBatch, &no_headers(), messages.as_bytes()));
            let sg = json!({"personalizations": [v], "content": [{"type": "text/plain", "value": "x"}]}).to_string();
            check_outcome(Route::SendGridSend, parse(Route::SendGridSend, &no_headers(), sg.as_bytes()));
        }

        #[test]
        fn mutated_requests_never_panic(route_i in 0..ALL_ROUTES.len(), path in prop::collection::vec(any::<prop::sample::Index>(), 1..5),
                                        replacement in arb_json(), cut in any::<prop::sample::Index>()) {
            let route = ALL_ROUTES[route_i];
            let mut v = full_request(route);
            // Replace one value somewhere inside a full, valid request.
            let mut pointer = String::new();
            let mut at = &v;
            for step in &path {
                let next = match at {
                    Value::Object(m) if !m.is_empty() => m.iter().nth(step.index(m.len())).map(|(k, n)| {
                        pointer.push('/');
                        pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                        n
                    }),
                    Value::Array(a) if !a.is_empty() => {
                        let i = step.index(a.len());
                        pointer.push_str(&format!("/{i}"));
                        a.get(i)
                    }
                    _ => None,
                };
                match next {
                    Some(n) => at = n,
                    None => break,
                }
            }
            if let Some(slot) = v.pointer_mut(&pointer) {
                *slot = replacement;
            }
            let body = v.to_string();
            check_outcome(route, parse(route, &no_headers(), body.as_bytes()));
            // And the same text cut short anywhere.
            let cut = cut.index(body.len() + 1);
            check_outcome(route, parse(route, &no_headers(), &body.as_bytes()[..cut]));
        }

        #[test]
        fn sql_errors_never_panic(state in ".{0,6}", message in ".{0,80}", route_i in 0..ALL_ROUTES.len()) {
            let route = ALL_ROUTES[route_i];
            let r = from_sql_error(route, &state, &message);
            prop_assert!(serde_json::from_str::<Value>(&refuse(route.provider(), &r).body).is_ok());
            prop_assert!(serde_json::from_str::<Value>(&batch_refused(route, 0, 2, &r).body).is_ok());
        }

    }

    /// A valid request of each route using most members.
    fn full_request(route: Route) -> Value {
        let resend = json!({
            "from": "Acme <a@acme.test>", "to": ["a@x.org", "b@y.org"], "cc": "c@z.org", "subject": "Hi",
            "html": "<p>Hi</p>", "text": "Hi", "headers": {"X-A": "1"}, "tags": [{"name": "k", "value": "v"}],
            "reply_to": ["r@acme.test"]
        });
        let postmark = json!({
            "From": "a@acme.test", "To": "a@x.org", "Subject": "Hi", "TextBody": "Hi", "Tag": "t",
            "Headers": [{"Name": "X-A", "Value": "1"}], "TrackLinks": "HtmlOnly", "Metadata": {"k": "v"},
            "Attachments": [{"Name": "a.txt", "Content": "aGk=", "ContentID": "cid:a"}],
            "TemplateAlias": "welcome", "TemplateModel": {"n": 1}
        });
        match route {
            Route::ResendEmail => {
                let mut r = resend;
                r["attachments"] = json!([{"content": "aGk=", "filename": "a.txt"}]);
                r["scheduled_at"] = json!("2024-08-05T11:52:01Z");
                r
            }
            Route::ResendBatch => json!([resend, {"to": "d@x.org", "template": {"id": "w", "variables": {"a": 1}}}]),
            Route::PostmarkEmail | Route::PostmarkTemplate => postmark,
            Route::PostmarkBatch => json!([postmark, postmark]),
            Route::PostmarkTemplateBatch => json!({"Messages": [postmark, postmark]}),
            Route::SendGridSend => json!({
                "personalizations": [
                    {"to": [{"email": "a@x.org", "name": "A"}], "headers": {"X-B": "2"}, "send_at": 1714060800},
                    {"to": [{"email": "b@x.org"}], "cc": [{"email": "c@x.org"}], "subject": "Other"}
                ],
                "from": {"email": "f@acme.test", "name": "Acme"}, "subject": "Hi",
                "content": [{"type": "text/plain", "value": "Hi"}, {"type": "text/html", "value": "<b>Hi</b>"}],
                "attachments": [{"content": "aGk=", "filename": "a.png", "disposition": "inline", "content_id": "a"}],
                "categories": ["c"], "custom_args": {"k": "v"}, "headers": {"X-A": "1"},
                "tracking_settings": {"open_tracking": {"enable": true}}
            }),
        }
    }

    #[test]
    fn full_requests_parse() {
        for route in ALL_ROUTES {
            let body = full_request(route).to_string();
            let p = parse(route, &no_headers(), body.as_bytes());
            assert!(p.is_ok(), "{route:?}: {p:?}");
        }
    }
}

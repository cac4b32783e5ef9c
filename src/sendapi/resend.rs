//! Resend: `POST /emails` (one email, a JSON object) and `POST /emails/batch` (a JSON array of 1
//! to 100), authenticated with `Authorization: Bearer <key>`.
//!
//! Mapping to `email.send`:
//! - `from` → sender; `to`, `cc`, `bcc`, `reply_to` (a string or an array of strings, joined with
//!   `, `) → recipients, cc, bcc, reply_to; `subject`; `html`; `text` → body; `headers {}` →
//!   headers (string values).
//! - `scheduled_at` → send_at: ISO 8601 only (`2024-08-05T11:52:01.858Z`, an offset or none =
//!   UTC); Resend's natural language (`in 1 min`) is refused naming `scheduled_at`.
//! - `attachments [{content, filename, content_type, content_id}]`: `content` is base64 text, or
//!   the byte array the Python SDK sends, or the `{"type":"Buffer","data":[…]}` the Node SDK sends
//!   for a Buffer (both become base64); `path` (a URL Resend would fetch) is refused: pg_email
//!   fetches nothing; a missing `content_type` is guessed from the file name's extension
//!   (`application/octet-stream` when unknown).
//! - `tags [{name, value}]` → metadata `{name: value}` only, not tags: a Resend tag is a key and a
//!   value, which is what metadata is (pg_email's tags are single labels that `email.stats` counts
//!   messages under, and per-message values such as user ids would flood it); the Resend transport
//!   sends metadata back out as Resend tags, so the pairs round-trip. Names and values must be
//!   ASCII letters, digits, `_` and `-` (at most 256), as Resend requires.
//! - `template {id, variables}` → `email.send_template(template => id, data => variables)`;
//!   `subject`, `html` and `text` cannot be combined with it (the pg_email template gives them).
//! - `topic_id` → topic. `Idempotency-Key` → idempotency_key (see the parent module).
//! - In a batch, `attachments` and `scheduled_at` are refused, as Resend refuses them.
//!
//! Answers: `200 {"id"}`; batch `200 {"data":[{"id"},…]}`; errors `{"statusCode","message",
//! "name"}`: 400 `validation_error` (bad JSON) / `invalid_idempotency_key`, 401 `missing_api_key`,
//! 403 `invalid_api_key` / `invalid_permission` (the key's role may not send), 409
//! `invalid_idempotent_request`, 413 `validation_error`, 422 `validation_error` /
//! `missing_required_field` / `invalid_attachment`, 429 `rate_limit_exceeded` (with
//! `ratelimit-limit`, `ratelimit-remaining`, `ratelimit-reset` and `retry-after`), 500
//! `application_error` (the database did not answer in time).

use serde_json::{json, Map, Value};

use super::{
    attachment, json_reply, kind, retry_secs, sentence, show, string_object, wrong, Call, Obj, Parsed, Refusal, Reply,
    Route, IDEMPOTENCY_HEADER, REQUIRED,
};

/// Most emails in one batch.
pub const MAX_BATCH: usize = 100;
/// Most characters in a tag's name or value.
const MAX_TAG_CHARS: usize = 256;

pub(super) fn parse(route: Route, v: &Value) -> Result<Parsed, Refusal> {
    let calls = if route == Route::ResendBatch {
        let items = match v {
            Value::Array(items) => items,
            other => {
                return Err(Refusal::general(format!(
                    "the request body must be a JSON array of 1 to {MAX_BATCH} emails, not {}",
                    kind(other)
                )))
            }
        };
        let n = items.len();
        if n == 0 || n > MAX_BATCH {
            return Err(Refusal::general(format!("a batch holds 1 to {MAX_BATCH} emails ({n} given)")));
        }
        let mut calls = Vec::with_capacity(n);
        for (i, item) in items.iter().enumerate() {
            if !item.is_object() {
                let r = Refusal::general(format!("each email must be a JSON object, not {}", kind(item)));
                return Err(Refusal::batch(i, n, r));
            }
            calls.push(email(item, true).map_err(|r| Refusal::batch(i, n, r))?);
        }
        calls
    } else {
        if v.is_array() {
            return Err(Refusal::general(
                "the request body must be one email (a JSON object); send arrays to POST /emails/batch",
            ));
        }
        vec![email(v, false)?]
    };
    Ok(Parsed { calls, dry_run: false })
}

/// One email object.
fn email(v: &Value, in_batch: bool) -> Result<Call, Refusal> {
    let o = Obj::new(v, None, String::new())?;
    let mut c = Call {
        sender: o.string("from")?,
        recipients: list(&o, "to")?,
        cc: list(&o, "cc")?,
        bcc: list(&o, "bcc")?,
        reply_to: list(&o, "reply_to")?,
        subject: o.string("subject")?,
        html: o.string("html")?,
        body: o.string("text")?,
        topic: o.string("topic_id")?,
        ..Call::default()
    };
    if let Some(h) = o.object("headers")? {
        let h = string_object(h, "headers", ".")?;
        c.headers = (!h.is_empty()).then_some(Value::Object(h));
    }
    if let Some(items) = o.array("attachments")?.filter(|a| !a.is_empty()) {
        if in_batch {
            return Err(Refusal::invalid(
                "attachments",
                "are not supported in a batch (as in Resend); send an email with attachments to POST /emails",
            ));
        }
        let list = items.iter().enumerate().map(|(i, a)| attachment_of(i, a)).collect::<Result<Vec<_>, _>>()?;
        c.attachments = Some(Value::Array(list));
    }
    if let Some(at) = o.str("scheduled_at")? {
        if in_batch {
            return Err(Refusal::invalid(
                "scheduled_at",
                "is not supported in a batch (as in Resend); send a scheduled email to POST /emails",
            ));
        }
        let normalized = crate::datetime::parse_iso8601(at).map(|t| t.rfc3339()).ok_or_else(|| {
            Refusal::invalid(
                "scheduled_at",
                format!(
                    "{} is not an ISO 8601 date and time such as 2024-08-05T11:52:01Z; natural-language times \
                     (\"in 1 min\") are not supported",
                    show(at)
                ),
            )
        })?;
        c.send_at = Some(normalized);
    }
    if let Some(tags) = o.array("tags")? {
        let m = tags_of(tags)?;
        c.metadata = (!m.is_empty()).then_some(Value::Object(m));
    }
    if let Some(t) = o.child("template", ".")? {
        let id = t.string("id")?.ok_or_else(|| Refusal::missing("template.id"))?;
        for key in ["subject", "html", "text"] {
            if o.get(key).is_some() {
                return Err(Refusal::invalid(
                    key,
                    "cannot be combined with template: the pg_email template gives the subject, text and HTML",
                ));
            }
        }
        c.template = Some(id);
        c.data = t.object("variables")?.map(|m| Value::Object(m.clone()));
    }
    Ok(c)
}

/// `to`, `cc`, `bcc`, `reply_to`: a string, or an array of strings joined with `, `.
fn list(o: &Obj<'_>, key: &str) -> Result<Option<String>, Refusal> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let mut parts = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => parts.push(s.as_str()),
                    other => return Err(wrong(&format!("{key}[{i}]"), "a string", other)),
                }
            }
            Ok((!parts.is_empty()).then(|| parts.join(", ")))
        }
        Some(other) => Err(wrong(key, "a string or an array of strings", other)),
    }
}

/// One attachment: `content` (base64, bytes or a Node Buffer) and `filename` are required.
fn attachment_of(i: usize, a: &Value) -> Result<Value, Refusal> {
    let o = Obj::new(a, Some(&format!("attachments[{i}]")), format!("attachments[{i}]."))?;
    if o.get("path").is_some() {
        return Err(Refusal::invalid(
            o.field("path"),
            "fetching attachments by URL is not supported; send the file itself, base64-encoded, in content",
        ));
    }
    let content = match o.get("content") {
        None => return Err(Refusal::missing(o.field("content"))),
        Some(Value::String(s)) => s.clone(),
        Some(v) => bytes_as_base64(v).ok_or_else(|| {
            Refusal::invalid(
                o.field("content"),
                "must be base64 text, an array of bytes (0 to 255) or a Node.js Buffer",
            )
        })?,
    };
    let filename = o.str("filename")?.ok_or_else(|| Refusal::missing(o.field("filename")))?;
    Ok(attachment(filename, o.str("content_type")?, content, o.str("content_id")?))
}

/// `[104, 105]` or `{"type": "Buffer", "data": [104, 105]}` → base64.
fn bytes_as_base64(v: &Value) -> Option<String> {
    use base64::Engine;
    let items = match v {
        Value::Array(items) => items,
        Value::Object(m) if m.get("type").and_then(Value::as_str) == Some("Buffer") => m.get("data")?.as_array()?,
        _ => return None,
    };
    let bytes = items.iter().map(|b| b.as_u64().and_then(|n| u8::try_from(n).ok())).collect::<Option<Vec<u8>>>()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `[{name, value}]` → `{name: value}`; a later tag of the same name wins.
fn tags_of(tags: &[Value]) -> Result<Map<String, Value>, Refusal> {
    let mut m = Map::new();
    for (i, t) in tags.iter().enumerate() {
        let o = Obj::new(t, Some(&format!("tags[{i}]")), format!("tags[{i}]."))?;
        let name = o.str("name")?.ok_or_else(|| Refusal::missing(o.field("name")))?;
        let value = o.str("value")?.ok_or_else(|| Refusal::missing(o.field("value")))?;
        check_tag(&o.field("name"), name, false)?;
        check_tag(&o.field("value"), value, true)?;
        m.insert(name.to_string(), Value::from(value));
    }
    Ok(m)
}

/// ASCII letters, digits, `_` and `-`, at most 256 (a name at least one).
fn check_tag(field: &str, text: &str, may_be_empty: bool) -> Result<(), Refusal> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if (text.is_empty() && !may_be_empty) || text.len() > MAX_TAG_CHARS || !text.chars().all(ok_char) {
        return Err(Refusal::invalid(
            field,
            format!(
                "{} may hold only ASCII letters, numbers, underscores (_) and dashes (-), 1 to {MAX_TAG_CHARS} of them",
                show(text)
            ),
        ));
    }
    Ok(())
}

/// Resend's name for one of `email.send`'s arguments.
pub(super) fn field_name(base: &str) -> Option<&'static str> {
    Some(match base {
        "recipients" => "to",
        "subject" => "subject",
        "body" => "text",
        "html" => "html",
        "sender" => "from",
        "cc" => "cc",
        "bcc" => "bcc",
        "reply_to" => "reply_to",
        "headers" => "headers",
        "tags" | "metadata" => "tags",
        "send_at" => "scheduled_at",
        "idempotency_key" => IDEMPOTENCY_HEADER,
        "template" => "template.id",
        "data" => "template.variables",
        "topic" => "topic_id",
        _ => return None,
    })
}

/// `attachments[i].member` (Resend spells the members as `email.send` does).
pub(super) fn attachment_field(index: Option<usize>, member: Option<&str>) -> String {
    match (index, member) {
        (Some(i), Some(m)) => format!("attachments[{i}].{m}"),
        (Some(i), None) => format!("attachments[{i}]"),
        _ => "attachments".into(),
    }
}

pub(super) fn refuse(r: &Refusal) -> Reply {
    let (status, name, message, headers) = parts(r);
    json_reply(status, &json!({"statusCode": status, "message": message, "name": name}), headers)
}

type Parts = (u16, &'static str, String, Vec<(&'static str, String)>);

fn parts(r: &Refusal) -> Parts {
    match r {
        Refusal::MissingKey => (
            401,
            "missing_api_key",
            "Missing API key in the authorization header. Include the following header Authorization: Bearer \
             YOUR_API_KEY in the request."
                .into(),
            Vec::new(),
        ),
        Refusal::InvalidKey => (403, "invalid_api_key", "API key is invalid".into(), Vec::new()),
        Refusal::Forbidden => (
            403,
            "invalid_permission",
            "This API key is valid, but its database role may not send email (the database owner can grant it \
             with email.grant_send)."
                .into(),
            Vec::new(),
        ),
        Refusal::RateLimited { retry_after_secs, limit } => {
            let retry = retry_secs(*retry_after_secs);
            let mut headers = Vec::new();
            if let Some(limit) = limit {
                headers.push(("ratelimit-limit", limit.to_string()));
            }
            headers.push(("ratelimit-remaining", "0".into()));
            headers.push(("ratelimit-reset", retry.clone()));
            headers.push(("retry-after", retry.clone()));
            (429, "rate_limit_exceeded", format!("Too many requests. Retry after {retry} seconds."), headers)
        }
        Refusal::TooLarge => (413, "validation_error", "The request body is too large.".into(), Vec::new()),
        Refusal::BadJson(m) => (400, "validation_error", m.clone(), Vec::new()),
        Refusal::Invalid { field, message } => {
            let field = field.as_deref();
            let text = sentence(field, message, "`");
            let name = match field {
                Some(IDEMPOTENCY_HEADER) => return (400, "invalid_idempotency_key", text, Vec::new()),
                Some(f) if f.starts_with("attachments") => "invalid_attachment",
                Some(_) if message.starts_with(REQUIRED) => "missing_required_field",
                _ => "validation_error",
            };
            (422, name, text, Vec::new())
        }
        Refusal::IdempotencyConflict(m) => (409, "invalid_idempotent_request", m.clone(), Vec::new()),
        Refusal::Unavailable => (
            500,
            "application_error",
            "The database could not take the request in time; retry later.".into(),
            Vec::new(),
        ),
        Refusal::Batch { index, count, refusal } => {
            let (status, name, message, headers) = parts(refusal);
            if !refusal.is_per_message() {
                return (status, name, message, headers);
            }
            let message = format!(
                "{} (the email at index {index} of the batch; none of its {count} emails was sent)",
                message.trim_end_matches('.')
            );
            (status, name, message, headers)
        }
    }
}

pub(super) fn accepted(route: Route, ids: &[i64]) -> Reply {
    let body = if route == Route::ResendBatch {
        json!({"data": ids.iter().map(|id| json!({"id": id.to_string()})).collect::<Vec<_>>()})
    } else {
        json!({"id": ids.first().map(i64::to_string).unwrap_or_default()})
    };
    json_reply(200, &body, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::super::{parse as parse_request, refuse as render, Provider};
    use super::*;

    fn parse_json(route: Route, v: Value) -> Result<Parsed, Refusal> {
        parse_request(route, &[], v.to_string().as_bytes())
    }

    fn one(v: Value) -> Result<Call, Refusal> {
        parse_json(Route::ResendEmail, v).map(|mut p| p.calls.remove(0))
    }

    #[test]
    fn a_full_email() {
        let body = json!({
            "from": "Acme <onboarding@acme.test>",
            "to": ["Ada <ada@x.org>", "bob@y.org"],
            "cc": "carol@z.org",
            "bcc": ["dan@z.org"],
            "reply_to": ["help@acme.test", "Support <s@acme.test>"],
            "subject": "Hello",
            "html": "<p>Hi <img src=\"cid:logo\"></p>",
            "text": "Hi",
            "headers": {"X-Entity-Ref-ID": "123"},
            "scheduled_at": "2024-08-05T11:52:01.858+02:00",
            "attachments": [
                {"content": "aGk=", "filename": "invoice.pdf"},
                {"content": [104, 105], "filename": "notes.txt", "content_type": "text/plain; charset=utf-8"},
                {"content": {"type": "Buffer", "data": [104, 105]}, "filename": "logo.png", "content_id": "logo"},
                {"content": "aGk=", "filename": "data", "content_type": null, "content_id": null}
            ],
            "tags": [{"name": "category", "value": "confirm_email"}, {"name": "user-id", "value": "42"}],
            "topic_id": "news",
            "react": null,
            "unknown_member": {"ignored": true}
        });
        let want = Call {
            recipients: Some("Ada <ada@x.org>, bob@y.org".into()),
            subject: Some("Hello".into()),
            body: Some("Hi".into()),
            html: Some("<p>Hi <img src=\"cid:logo\"></p>".into()),
            sender: Some("Acme <onboarding@acme.test>".into()),
            cc: Some("carol@z.org".into()),
            bcc: Some("dan@z.org".into()),
            reply_to: Some("help@acme.test, Support <s@acme.test>".into()),
            headers: Some(json!({"X-Entity-Ref-ID": "123"})),
            attachments: Some(json!([
                {"filename": "invoice.pdf", "content_type": "application/pdf", "content": "aGk="},
                {"filename": "notes.txt", "content_type": "text/plain; charset=utf-8", "content": "aGk="},
                {"filename": "logo.png", "content_type": "image/png", "content": "aGk=", "content_id": "logo"},
                {"filename": "data", "content_type": "application/octet-stream", "content": "aGk="}
            ])),
            tags: None,
            metadata: Some(json!({"category": "confirm_email", "user-id": "42"})),
            send_at: Some("2024-08-05T11:52:01.858+02:00".into()),
            topic: Some("news".into()),
            ..Call::default()
        };
        assert_eq!(one(body), Ok(want));
    }

    #[test]
    fn a_minimal_email_and_empty_lists() {
        let c = one(
            json!({"to": "a@x.org", "subject": "s", "text": "t", "cc": [], "tags": [], "headers": {}, "attachments": []}),
        );
        let want = Call {
            recipients: Some("a@x.org".into()),
            subject: Some("s".into()),
            body: Some("t".into()),
            ..Call::default()
        };
        assert_eq!(c, Ok(want));
        // Presence is email.send's to check: a request without `to` parses, and the SQL error names `to`.
        assert_eq!(one(json!({"subject": "s"})).map(|c| c.recipients), Ok(None));
    }

    #[test]
    fn a_template_email() {
        let c = one(json!({
            "from": "a@acme.test", "to": "b@x.org",
            "template": {"id": "order-shipped", "variables": {"name": "Ada", "n": 3}}
        }));
        assert_eq!(
            c,
            Ok(Call {
                recipients: Some("b@x.org".into()),
                sender: Some("a@acme.test".into()),
                template: Some("order-shipped".into()),
                data: Some(json!({"name": "Ada", "n": 3})),
                ..Call::default()
            })
        );
        for key in ["subject", "html", "text"] {
            let mut v = json!({"to": "b@x.org", "template": {"id": "t"}});
            v[key] = json!("x");
            assert!(matches!(one(v), Err(Refusal::Invalid { field: Some(f), .. }) if f == key));
        }
        assert_eq!(one(json!({"to": "b@x.org", "template": {}})), Err(Refusal::missing("template.id")));
        assert_eq!(
            one(json!({"to": "b@x.org", "template": "t"})),
            Err(Refusal::invalid("template", "must be an object, not a string"))
        );
        assert_eq!(
            one(json!({"to": "b@x.org", "template": {"id": "t", "variables": [1]}})),
            Err(Refusal::invalid("template.variables", "must be an object, not an array"))
        );
    }

    #[test]
    fn wrong_types_name_the_member() {
        let cases = [
            (json!({"to": 5}), "to", "must be a string or an array of strings, not a number"),
            (json!({"to": ["a@x.org", 5]}), "to[1]", "must be a string, not a number"),
            (json!({"cc": {"a": 1}}), "cc", "must be a string or an array of strings, not an object"),
            (json!({"subject": ["s"]}), "subject", "must be a string, not an array"),
            (json!({"headers": {"X-A": 1}}), "headers.X-A", "must be a string, not a number"),
            (json!({"headers": "X-A: 1"}), "headers", "must be an object, not a string"),
            (json!({"attachments": {}}), "attachments", "must be an array, not an object"),
            (json!({"attachments": ["x"]}), "attachments[0]", "must be an object, not a string"),
            (
                json!({"attachments": [{"content": "aGk=", "filename": 1}]}),
                "attachments[0].filename",
                "must be a string, not a number",
            ),
            (json!({"tags": [{"name": 1, "value": "v"}]}), "tags[0].name", "must be a string, not a number"),
            (json!({"scheduled_at": 1714060800}), "scheduled_at", "must be a string, not a number"),
            (json!({"topic_id": true}), "topic_id", "must be a string, not a boolean"),
        ];
        for (body, field, message) in cases {
            assert_eq!(one(body.clone()), Err(Refusal::invalid(field, message)), "{body}");
        }
        assert_eq!(
            one(json!("a@x.org")),
            Err(Refusal::general("the request body must be a JSON object, not a string"))
        );
        assert!(
            matches!(one(json!([{}])), Err(Refusal::Invalid { field: None, message }) if message.contains("/emails/batch"))
        );
    }

    #[test]
    fn attachments() {
        let r = one(json!({"attachments": [{"path": "https://x.org/a.pdf", "filename": "a.pdf"}]})).unwrap_err();
        assert_eq!(
            r,
            Refusal::invalid(
                "attachments[0].path",
                "fetching attachments by URL is not supported; send the file itself, base64-encoded, in content"
            )
        );
        let reply = render(Provider::Resend, &r);
        assert_eq!(
            (reply.status, serde_json::from_str::<Value>(&reply.body).unwrap_or_default()["name"].clone()),
            (422, json!("invalid_attachment"))
        );
        assert_eq!(one(json!({"attachments": [{"filename": "a"}]})), Err(Refusal::missing("attachments[0].content")));
        assert_eq!(
            one(json!({"attachments": [{"content": "aGk="}]})),
            Err(Refusal::missing("attachments[0].filename"))
        );
        for bad in [
            json!([256]),
            json!([-1]),
            json!([1.5]),
            json!(["a"]),
            json!({"type": "Buffer"}),
            json!({"type": "Blob", "data": []}),
            json!(7),
        ] {
            let r = one(json!({"attachments": [{"content": bad, "filename": "a"}]}));
            assert_eq!(
                r,
                Err(Refusal::invalid(
                    "attachments[0].content",
                    "must be base64 text, an array of bytes (0 to 255) or a Node.js Buffer"
                ))
            );
        }
        let c = one(json!({"attachments": [{"content": [], "filename": "empty.bin", "content_id": "<cid:x>"}]}));
        assert_eq!(
            c.map(|c| c.attachments),
            Ok(Some(
                json!([{"filename": "empty.bin", "content_type": "application/octet-stream", "content": "", "content_id": "cid:x"}])
            ))
        );
    }

    #[test]
    fn tags_follow_resends_rules() {
        let c = one(
            json!({"tags": [{"name": "a", "value": "1"}, {"name": "a", "value": "2"}, {"name": "b", "value": ""}]}),
        );
        assert_eq!(c.map(|c| c.metadata), Ok(Some(json!({"a": "2", "b": ""}))));
        for (tag, field) in [
            (json!({"name": "has space", "value": "v"}), "tags[0].name"),
            (json!({"name": "", "value": "v"}), "tags[0].name"),
            (json!({"name": "n", "value": "a.b"}), "tags[0].value"),
            (json!({"name": "é", "value": "v"}), "tags[0].name"),
            (json!({"name": "x".repeat(257), "value": "v"}), "tags[0].name"),
        ] {
            assert!(matches!(one(json!({"tags": [tag]})), Err(Refusal::Invalid { field: Some(f), .. }) if f == field));
        }
        assert!(one(json!({"tags": [{"name": "x".repeat(256), "value": "v"}]})).is_ok());
        assert_eq!(one(json!({"tags": [{"name": "n"}]})), Err(Refusal::missing("tags[0].value")));
        assert_eq!(one(json!({"tags": [{"value": "v"}]})), Err(Refusal::missing("tags[0].name")));
        assert_eq!(
            one(json!({"tags": {"name": "v"}})),
            Err(Refusal::invalid("tags", "must be an array, not an object"))
        );
    }

    #[test]
    fn scheduled_at_is_iso_8601_only() {
        assert_eq!(
            one(json!({"scheduled_at": "2024-08-05T11:52:01Z"})).map(|c| c.send_at),
            Ok(Some("2024-08-05T11:52:01Z".into()))
        );
        let r = one(json!({"scheduled_at": "in 1 min"})).unwrap_err();
        let Refusal::Invalid { field, message } = &r else { panic!("{r:?}") };
        assert_eq!(field.as_deref(), Some("scheduled_at"));
        assert!(message.starts_with("\"in 1 min\" is not an ISO 8601 date and time"), "{message}");
        assert_eq!(render(Provider::Resend, &r).status, 422);
    }

    #[test]
    fn a_batch() {
        let body = json!([
            {"from": "a@acme.test", "to": ["x@x.org"], "subject": "One", "html": "<p>1</p>"},
            {"from": "a@acme.test", "to": "y@y.org", "subject": "Two", "text": "2", "tags": [{"name": "k", "value": "v"}]}
        ]);
        let p = parse_json(Route::ResendBatch, body);
        let call = |to: &str, subject: &str| Call {
            sender: Some("a@acme.test".into()),
            recipients: Some(to.into()),
            subject: Some(subject.into()),
            ..Call::default()
        };
        let want = vec![
            Call { html: Some("<p>1</p>".into()), ..call("x@x.org", "One") },
            Call { body: Some("2".into()), metadata: Some(json!({"k": "v"})), ..call("y@y.org", "Two") },
        ];
        assert_eq!(p, Ok(Parsed { calls: want, dry_run: false }));
    }

    #[test]
    fn batch_limits_and_refusals() {
        let ok = json!({"to": "a@x.org", "subject": "s", "text": "t"});
        assert!(parse_json(Route::ResendBatch, Value::Array(vec![ok.clone(); 100])).is_ok());
        let r = parse_json(Route::ResendBatch, Value::Array(vec![ok.clone(); 101])).unwrap_err();
        assert_eq!(r, Refusal::general("a batch holds 1 to 100 emails (101 given)"));
        assert_eq!(render(Provider::Resend, &r).status, 422);
        assert_eq!(
            parse_json(Route::ResendBatch, json!([])),
            Err(Refusal::general("a batch holds 1 to 100 emails (0 given)"))
        );
        assert!(matches!(parse_json(Route::ResendBatch, ok.clone()), Err(Refusal::Invalid { field: None, .. })));

        let with = |key: &str, v: Value| {
            let mut e = ok.clone();
            e[key] = v;
            json!([ok, e])
        };
        let r = parse_json(Route::ResendBatch, with("attachments", json!([{"content": "aGk=", "filename": "a"}])))
            .unwrap_err();
        assert!(
            matches!(&r, Refusal::Batch { index: 1, count: 2, refusal } if matches!(&**refusal, Refusal::Invalid { field: Some(f), .. } if f == "attachments"))
        );
        let reply = render(Provider::Resend, &r);
        let j: Value = serde_json::from_str(&reply.body).unwrap_or_default();
        assert_eq!(reply.status, 422);
        assert_eq!(
            j["message"],
            "Invalid `attachments` field: are not supported in a batch (as in Resend); send an email with attachments \
             to POST /emails (the email at index 1 of the batch; none of its 2 emails was sent)"
        );
        let r = parse_json(Route::ResendBatch, with("scheduled_at", json!("2024-08-05T11:52:01Z"))).unwrap_err();
        assert!(
            matches!(&r, Refusal::Batch { index: 1, refusal, .. } if matches!(&**refusal, Refusal::Invalid { field: Some(f), .. } if f == "scheduled_at"))
        );
        let r = parse_json(Route::ResendBatch, json!([ok, 3])).unwrap_err();
        assert_eq!(r, Refusal::batch(1, 2, Refusal::general("each email must be a JSON object, not a number")));
        // An empty attachments list in a batch is no attachment.
        assert!(parse_json(Route::ResendBatch, with("attachments", json!([]))).is_ok());
    }

    #[test]
    fn field_names_for_sql_errors() {
        assert_eq!(field_name("recipients"), Some("to"));
        assert_eq!(field_name("metadata"), Some("tags"));
        assert_eq!(field_name("transport"), None);
        assert_eq!(field_name("track_opens"), None);
        assert_eq!(attachment_field(Some(1), Some("content_id")), "attachments[1].content_id");
        assert_eq!(attachment_field(Some(1), None), "attachments[1]");
        assert_eq!(attachment_field(None, Some("x")), "attachments");
    }
}

//! SendGrid: `POST /v3/mail/send`, authenticated with `Authorization: Bearer <key>`. Each of the
//! 1 to 1000 `personalizations` becomes one `email.send` call (at most 1000 recipients in all, as
//! SendGrid counts them); unknown members are ignored.
//!
//! Mapping to `email.send`, per personalization:
//! - its `to`, `cc`, `bcc` (`[{email, name}]`) → recipients, cc, bcc as `Name <email>` mailboxes
//!   (`"Doe, Jane" <email>` when the name needs quoting; CR, LF and other control characters are
//!   refused); `to` is required;
//! - its `subject`, `send_at`, `from` override the top-level ones; its `headers` and `custom_args`
//!   are merged over the top-level ones (a name in any letter case replaces the top-level one);
//! - `from {email, name}` → sender; `reply_to {email, name}` or `reply_to_list [..]` (not both) →
//!   reply_to;
//! - `content [{type, value}]`: `text/plain` → body, `text/html` → html (one of each; any other
//!   type, such as AMP, is refused);
//! - `attachments [{content, type, filename, disposition, content_id}]` (`contentId` too, as the
//!   official Node SDK sends it): `disposition: inline` requires `content_id`; a `content_id` on an ordinary attachment is dropped (SendGrid uses it
//!   for inline parts only); a missing `type` is guessed from the file name;
//! - `categories` (at most 10) → tags; `custom_args` → metadata; `headers` → headers, refusing the
//!   ones SendGrid reserves (x-sg-id, x-sg-eid, received, dkim-signature, Content-Type,
//!   Content-Transfer-Encoding, To, From, Subject, Reply-To, CC, BCC);
//! - `send_at` (Unix seconds) → send_at as RFC 3339 UTC;
//! - `tracking_settings.open_tracking.enable` / `click_tracking.enable` → track_opens /
//!   track_clicks; `asm.group_id` (an unsubscribe group) → topic, the group id as the topic's
//!   name: consent then applies as for SQL sends (an unknown topic is refused naming
//!   `asm.group_id`);
//! - `mail_settings.sandbox_mode.enable` → a dry run (validated, nothing stored, `200`).
//!
//! Refused as unsupported, naming the member (each would change the mail silently if ignored):
//! `template_id` (dynamic templates), legacy `sections` and `substitutions`,
//! `mail_settings.footer`, `tracking_settings.subscription_tracking` and `ganalytics` when
//! enabled. Ignored: `batch_id`, `ip_pool_name`, `asm.groups_to_display`, the other
//! `mail_settings`, `dynamic_template_data`.
//!
//! Answers: `202` with an empty body and `X-Message-Id` = the first message's id (one per
//! personalization; all of them, comma-separated, in `X-Pg-Email-Ids`); sandbox `200`. Errors
//! `{"errors":[{"message","field","help":null}]}`: 400 (the field in SendGrid's dotted form), 401
//! (missing or wrong key), 403 (the key's role may not send), 409 (idempotency conflict), 413, 429
//! (`Retry-After`, `X-RateLimit-Limit`, `X-RateLimit-Remaining`), 503 (the database did not answer
//! in time).

use serde_json::{json, Map, Value};

use super::{
    attachment, check_address, check_single_line, json_reply, mailbox, retry_secs, sentence, show, wrong, Call, Obj,
    Parsed, Refusal, Reply, IDEMPOTENCY_HEADER, REQUIRED,
};
use crate::datetime::MAX_UNIX;

/// Most personalizations in one request.
pub const MAX_PERSONALIZATIONS: usize = 1000;
/// Most recipients (to, cc and bcc of every personalization) in one request.
pub const MAX_RECIPIENTS: usize = 1000;
/// Most categories.
const MAX_CATEGORIES: usize = 10;
/// Longest category.
const MAX_CATEGORY_CHARS: usize = 255;
/// Headers SendGrid does not let a request set.
const RESERVED: &[&str] = &[
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
];

/// What every personalization shares.
struct Shared {
    sender: Option<String>,
    reply_to: Option<String>,
    subject: Option<String>,
    body: Option<String>,
    html: Option<String>,
    attachments: Option<Value>,
    tags: Option<Vec<String>>,
    custom_args: Map<String, Value>,
    headers: Map<String, Value>,
    send_at: Option<String>,
    track_opens: Option<bool>,
    track_clicks: Option<bool>,
    topic: Option<String>,
}

pub(super) fn parse(v: &Value) -> Result<Parsed, Refusal> {
    let o = Obj::new(v, None, String::new())?;
    if o.get("template_id").is_some() {
        return Err(Refusal::invalid(
            "template_id",
            "SendGrid dynamic templates are not supported; send the content itself (pg_email's own templates are \
             sent through Postmark's POST /email/withTemplate)",
        ));
    }
    if o.object("sections")?.is_some_and(|m| !m.is_empty()) {
        return Err(Refusal::invalid("sections", "legacy substitution sections are not supported"));
    }
    let dry_run = mail_settings(&o)?;
    let (track_opens, track_clicks) = tracking(&o)?;
    let (body, html) = content(&o)?;
    let shared = Shared {
        sender: o.child("from", ".")?.map(|f| address_of(&f)).transpose()?,
        reply_to: reply_to(&o)?,
        subject: o.string("subject")?,
        body,
        html,
        attachments: attachments(&o)?,
        tags: categories(&o)?,
        custom_args: o.object("custom_args")?.cloned().unwrap_or_default(),
        headers: o.object("headers")?.map(|h| headers_of(h, "headers")).transpose()?.unwrap_or_default(),
        send_at: send_at(&o)?,
        track_opens,
        track_clicks,
        topic: asm(&o)?,
    };
    let ps = o.array("personalizations")?.ok_or_else(|| Refusal::missing("personalizations"))?;
    if ps.is_empty() || ps.len() > MAX_PERSONALIZATIONS {
        return Err(Refusal::invalid(
            "personalizations",
            format!("must hold 1 to {MAX_PERSONALIZATIONS} personalizations ({} given)", ps.len()),
        ));
    }
    let total: usize = ps
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|p| ["to", "cc", "bcc"].map(|k| p.get(k).and_then(Value::as_array).map_or(0, Vec::len)))
        .sum();
    if total > MAX_RECIPIENTS {
        return Err(Refusal::invalid(
            "personalizations",
            format!("at most {MAX_RECIPIENTS} recipients (to, cc and bcc of every personalization) are allowed ({total} given)"),
        ));
    }
    let calls = ps.iter().enumerate().map(|(i, p)| personalization(i, p, &shared)).collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed { calls, dry_run })
}

/// Personalization `i` → one call.
fn personalization(i: usize, p: &Value, s: &Shared) -> Result<Call, Refusal> {
    let po = Obj::new(p, Some(&format!("personalizations.{i}")), format!("personalizations.{i}."))?;
    let recipients = mailboxes(&po, "to")?
        .ok_or_else(|| Refusal::invalid(po.field("to"), format!("{REQUIRED} (at least one {{\"email\"}} object)")))?;
    if po.object("substitutions")?.is_some_and(|m| !m.is_empty()) {
        return Err(Refusal::invalid(po.field("substitutions"), "legacy substitutions are not supported"));
    }
    let mut headers = s.headers.clone();
    if let Some(h) = po.object("headers")? {
        for (name, value) in headers_of(h, &po.field("headers"))? {
            headers.retain(|k, _| !k.eq_ignore_ascii_case(&name));
            headers.insert(name, value);
        }
    }
    let mut metadata = s.custom_args.clone();
    if let Some(args) = po.object("custom_args")? {
        metadata.extend(args.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let sender = match po.child("from", ".")? {
        Some(f) => Some(address_of(&f)?),
        None => s.sender.clone(),
    };
    Ok(Call {
        recipients: Some(recipients),
        cc: mailboxes(&po, "cc")?,
        bcc: mailboxes(&po, "bcc")?,
        subject: po.string("subject")?.or_else(|| s.subject.clone()),
        send_at: match send_at(&po)? {
            Some(t) => Some(t),
            None => s.send_at.clone(),
        },
        sender,
        reply_to: s.reply_to.clone(),
        body: s.body.clone(),
        html: s.html.clone(),
        headers: (!headers.is_empty()).then_some(Value::Object(headers)),
        attachments: s.attachments.clone(),
        tags: s.tags.clone(),
        metadata: (!metadata.is_empty()).then_some(Value::Object(metadata)),
        track_opens: s.track_opens,
        track_clicks: s.track_clicks,
        topic: s.topic.clone(),
        ..Call::default()
    })
}

/// `{email, name}` → a mailbox.
fn address_of(o: &Obj<'_>) -> Result<String, Refusal> {
    let email = o.str("email")?.ok_or_else(|| Refusal::missing(o.field("email")))?;
    check_address(&o.field("email"), email)?;
    let name = o.str("name")?;
    if let Some(n) = name {
        check_single_line(&o.field("name"), n)?;
    }
    Ok(mailbox(name, email))
}

/// `[{email, name}, ...]` → `a, Name <b>`; None when absent or empty.
fn mailboxes(o: &Obj<'_>, key: &str) -> Result<Option<String>, Refusal> {
    let Some(items) = o.array(key)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("{}.{i}", o.field(key));
        out.push(address_of(&Obj::new(item, Some(&field), format!("{field}."))?)?);
    }
    Ok((!out.is_empty()).then(|| out.join(", ")))
}

/// `reply_to {email, name}` or `reply_to_list [...]`.
fn reply_to(o: &Obj<'_>) -> Result<Option<String>, Refusal> {
    let single = o.child("reply_to", ".")?.map(|r| address_of(&r)).transpose()?;
    let list = mailboxes(o, "reply_to_list")?;
    match (single, list) {
        (Some(_), Some(_)) => Err(Refusal::invalid("reply_to_list", "cannot be used together with reply_to")),
        (a, b) => Ok(a.or(b)),
    }
}

/// `content [{type, value}]` → (text, html).
fn content(o: &Obj<'_>) -> Result<(Option<String>, Option<String>), Refusal> {
    let (mut text, mut html) = (None, None);
    for (i, item) in o.array("content")?.unwrap_or_default().iter().enumerate() {
        let c = Obj::new(item, Some(&format!("content.{i}")), format!("content.{i}."))?;
        let ty = c.str("type")?.ok_or_else(|| Refusal::missing(c.field("type")))?;
        let value = c.string("value")?.ok_or_else(|| Refusal::missing(c.field("value")))?;
        let essence = ty.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        let slot = match essence.as_str() {
            "text/plain" => &mut text,
            "text/html" => &mut html,
            _ => {
                return Err(Refusal::invalid(
                    c.field("type"),
                    format!("{} is not supported; give text/plain and/or text/html", show(ty)),
                ))
            }
        };
        if slot.is_some() {
            return Err(Refusal::invalid(
                c.field("type"),
                format!("a second {essence} part; give at most one of each type"),
            ));
        }
        *slot = Some(value);
    }
    Ok((text, html))
}

fn attachments(o: &Obj<'_>) -> Result<Option<Value>, Refusal> {
    let Some(items) = o.array("attachments")?.filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let a = Obj::new(item, Some(&format!("attachments.{i}")), format!("attachments.{i}."))?;
        let content = a.string("content")?.ok_or_else(|| Refusal::missing(a.field("content")))?;
        let filename = a.str("filename")?.ok_or_else(|| Refusal::missing(a.field("filename")))?;
        let inline = match a.str("disposition")?.map(str::to_ascii_lowercase).as_deref() {
            None | Some("attachment") => false,
            Some("inline") => true,
            Some(other) => {
                return Err(Refusal::invalid(
                    a.field("disposition"),
                    format!("{} must be attachment or inline", show(other)),
                ))
            }
        };
        // The official Node SDK sends its own `contentId` as it is (sendgrid-nodejs#1080).
        let content_id = match a.str("content_id")? {
            Some(c) => Some(c),
            None => a.str("contentId")?,
        }
        .filter(|c| !c.trim().is_empty());
        if inline && content_id.is_none() {
            return Err(Refusal::invalid(a.field("content_id"), format!("{REQUIRED} when disposition is inline")));
        }
        out.push(attachment(filename, a.str("type")?, content, content_id.filter(|_| inline)));
    }
    Ok(Some(Value::Array(out)))
}

/// `categories` → tags.
fn categories(o: &Obj<'_>) -> Result<Option<Vec<String>>, Refusal> {
    let Some(items) = o.array("categories")? else {
        return Ok(None);
    };
    if items.len() > MAX_CATEGORIES {
        return Err(Refusal::invalid(
            "categories",
            format!("at most {MAX_CATEGORIES} categories are allowed ({} given)", items.len()),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("categories.{i}");
        let text = item.as_str().ok_or_else(|| wrong(&field, "a string", item))?;
        if text.chars().count() > MAX_CATEGORY_CHARS {
            return Err(Refusal::invalid(
                field,
                format!("a category may hold at most {MAX_CATEGORY_CHARS} characters"),
            ));
        }
        out.push(text.to_string());
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Custom headers: string values, none of SendGrid's reserved names.
fn headers_of(h: &Map<String, Value>, field: &str) -> Result<Map<String, Value>, Refusal> {
    let mut out = Map::new();
    for (name, v) in h {
        let at = format!("{field}.{name}");
        if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            return Err(Refusal::invalid(at, format!("{} is a reserved header and cannot be set", show(name))));
        }
        let text = v.as_str().ok_or_else(|| wrong(&at, "a string", v))?;
        out.insert(name.clone(), Value::from(text));
    }
    Ok(out)
}

/// `send_at`: Unix seconds (an integral float is taken too) → RFC 3339.
fn send_at(o: &Obj<'_>) -> Result<Option<String>, Refusal> {
    let Some(v) = o.get("send_at") else {
        return Ok(None);
    };
    let secs = match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64().filter(|f| f.fract() == 0.0 && (0.0..=MAX_UNIX as f64).contains(f)).map(|f| f as i64)
        }),
        _ => return Err(wrong(&o.field("send_at"), "a Unix timestamp (a whole number of seconds)", v)),
    };
    let text = secs.and_then(crate::datetime::rfc3339_seconds).ok_or_else(|| {
        Refusal::invalid(
            o.field("send_at"),
            format!("must be a Unix timestamp: a whole number of seconds from 0 to {MAX_UNIX}"),
        )
    })?;
    Ok(Some(text))
}

/// `mail_settings`: sandbox mode → dry run; an enabled footer is refused.
fn mail_settings(o: &Obj<'_>) -> Result<bool, Refusal> {
    let Some(m) = o.child("mail_settings", ".")? else {
        return Ok(false);
    };
    if enabled(&m, "footer")? {
        return Err(Refusal::invalid(
            "mail_settings.footer.enable",
            "footers are not supported; put the footer in the content",
        ));
    }
    enabled(&m, "sandbox_mode")
}

/// `tracking_settings` → (track_opens, track_clicks); subscription tracking and Google Analytics
/// are refused when enabled.
fn tracking(o: &Obj<'_>) -> Result<(Option<bool>, Option<bool>), Refusal> {
    let Some(t) = o.child("tracking_settings", ".")? else {
        return Ok((None, None));
    };
    if enabled(&t, "subscription_tracking")? {
        return Err(Refusal::invalid(
            "tracking_settings.subscription_tracking.enable",
            "subscription tracking is not supported; pg_email adds List-Unsubscribe to mail sent with a topic \
             (asm.group_id)",
        ));
    }
    if enabled(&t, "ganalytics")? {
        return Err(Refusal::invalid(
            "tracking_settings.ganalytics.enable",
            "Google Analytics link parameters are not supported; put them in the links",
        ));
    }
    let setting = |key: &str| -> Result<Option<bool>, Refusal> {
        match t.child(key, ".")? {
            Some(s) => s.bool("enable"),
            None => Ok(None),
        }
    };
    Ok((setting("open_tracking")?, setting("click_tracking")?))
}

/// Whether `{key: {"enable": true}}` is set.
fn enabled(o: &Obj<'_>, key: &str) -> Result<bool, Refusal> {
    match o.child(key, ".")? {
        Some(s) => Ok(s.bool("enable")?.unwrap_or(false)),
        None => Ok(false),
    }
}

/// `asm.group_id` → topic.
fn asm(o: &Obj<'_>) -> Result<Option<String>, Refusal> {
    let Some(a) = o.child("asm", ".")? else {
        return Ok(None);
    };
    match a.get("group_id") {
        None => Err(Refusal::missing("asm.group_id")),
        Some(Value::Number(n)) if n.is_u64() => Ok(Some(n.to_string())),
        Some(other) => Err(wrong("asm.group_id", "a whole number", other)),
    }
}

/// SendGrid's name for one of `email.send`'s arguments (a personalization's members as those of
/// personalization 0; `batch_refused` puts the right index in).
pub(super) fn field_name(base: &str) -> Option<&'static str> {
    Some(match base {
        "recipients" => "personalizations.0.to",
        "cc" => "personalizations.0.cc",
        "bcc" => "personalizations.0.bcc",
        "subject" => "subject",
        "body" | "html" => "content",
        "sender" => "from",
        "reply_to" => "reply_to",
        "headers" => "headers",
        "tags" => "categories",
        "metadata" => "custom_args",
        "send_at" => "send_at",
        "idempotency_key" => IDEMPOTENCY_HEADER,
        "template" => "template_id",
        "data" => "dynamic_template_data",
        "topic" => "asm.group_id",
        "track_opens" => "tracking_settings.open_tracking.enable",
        "track_clicks" => "tracking_settings.click_tracking.enable",
        _ => return None,
    })
}

/// `attachments.i.member`.
pub(super) fn attachment_field(index: Option<usize>, member: Option<&str>) -> String {
    let member = member.map(|m| if m == "content_type" { "type" } else { m });
    match (index, member) {
        (Some(i), Some(m)) => format!("attachments.{i}.{m}"),
        (Some(i), None) => format!("attachments.{i}"),
        _ => "attachments".into(),
    }
}

pub(super) fn refuse(r: &Refusal) -> Reply {
    let (status, message, field, headers) = parts(r);
    json_reply(status, &json!({"errors": [{"message": message, "field": field, "help": null}]}), headers)
}

type Parts = (u16, String, Option<String>, Vec<(&'static str, String)>);

fn parts(r: &Refusal) -> Parts {
    match r {
        Refusal::MissingKey => {
            (401, "authorization required: send the API key as Authorization: Bearer <key>".into(), None, Vec::new())
        }
        Refusal::InvalidKey => {
            (401, "The provided authorization grant is invalid, expired, or revoked".into(), None, Vec::new())
        }
        Refusal::Forbidden => (
            403,
            "access forbidden: the API key is valid, but its database role may not send email (the database owner \
             can grant it with email.grant_send)"
                .into(),
            None,
            Vec::new(),
        ),
        Refusal::RateLimited { retry_after_secs, limit } => {
            let retry = retry_secs(*retry_after_secs);
            let mut headers = vec![("retry-after", retry.clone())];
            if let Some(limit) = limit {
                headers.push(("x-ratelimit-limit", limit.to_string()));
            }
            headers.push(("x-ratelimit-remaining", "0".into()));
            (429, format!("too many requests: retry after {retry} seconds"), None, headers)
        }
        Refusal::TooLarge => (413, "The request body is too large.".into(), None, Vec::new()),
        Refusal::BadJson(m) => (400, m.clone(), None, Vec::new()),
        Refusal::Invalid { field, message } => {
            (400, sentence(field.as_deref(), message, ""), field.clone(), Vec::new())
        }
        Refusal::IdempotencyConflict(m) => (409, m.clone(), Some(IDEMPOTENCY_HEADER.into()), Vec::new()),
        Refusal::Unavailable => (
            503,
            "service unavailable: the database could not take the request in time; retry later".into(),
            None,
            Vec::new(),
        ),
        Refusal::Batch { index, refusal, .. } => {
            let (status, message, field, headers) = parts(refusal);
            let Some(f) = field.filter(|_| refusal.is_per_message()) else {
                return (status, message, None, headers);
            };
            // Fields named for personalization 0 (from `from_sql_error`) get the real index.
            let located = match f.strip_prefix("personalizations.0") {
                Some(rest) if rest.is_empty() || rest.starts_with('.') => format!("personalizations.{index}{rest}"),
                _ => f.clone(),
            };
            let message = if located != f { message.replace(&f, &located) } else { message };
            (status, message, Some(located), headers)
        }
    }
}

pub(super) fn accepted(ids: &[i64]) -> Reply {
    let mut headers = Vec::new();
    if let Some(first) = ids.first() {
        headers.push(("x-message-id", first.to_string()));
        headers.push(("x-pg-email-ids", ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")));
    }
    Reply { status: 202, headers, body: String::new() }
}

#[cfg(test)]
mod tests {
    use super::super::{parse as parse_request, refuse as render, validated, Provider, Route};
    use super::*;

    fn parse_json(v: &Value) -> Result<Parsed, Refusal> {
        parse_request(Route::SendGridSend, &[], v.to_string().as_bytes())
    }

    fn minimal() -> Value {
        json!({
            "personalizations": [{"to": [{"email": "a@x.org"}]}],
            "from": {"email": "f@acme.test"},
            "subject": "s",
            "content": [{"type": "text/plain", "value": "t"}]
        })
    }

    fn with(path: &str, v: Value) -> Value {
        let mut body = minimal();
        if let Some(slot) = body.pointer_mut(path) {
            *slot = v;
        } else if let Some((parent, key)) = path.rsplit_once('/') {
            if let Some(Value::Object(m)) = body.pointer_mut(parent) {
                m.insert(key.to_string(), v);
            }
        }
        body
    }

    fn field_of(r: Result<Parsed, Refusal>) -> Option<String> {
        match r {
            Err(Refusal::Invalid { field, .. }) => field,
            other => Some(format!("not refused: {other:?}")),
        }
    }

    #[test]
    fn a_full_request_with_two_personalizations() {
        let body = json!({
            "personalizations": [
                {
                    "to": [{"email": "ada@x.org", "name": "Ada Lovelace"}, {"email": "jane@x.org", "name": "Doe, Jane"}],
                    "cc": [{"email": "cc@x.org"}],
                    "bcc": [{"email": "bcc@x.org", "name": ""}],
                    "headers": {"X-Per": "p", "x-shared": "override"},
                    "custom_args": {"user": "7"},
                    "send_at": 1714060800
                },
                {
                    "to": [{"email": "bob@y.org", "name": "Bob \"The\" Builder"}],
                    "subject": "Personal subject",
                    "from": {"email": "other@acme.test", "name": "Other"},
                    "dynamic_template_data": {"ignored": true}
                }
            ],
            "from": {"email": "sender@acme.test", "name": "Acme"},
            "reply_to": {"email": "help@acme.test", "name": "Help Desk"},
            "subject": "Top subject",
            "content": [{"type": "text/plain", "value": "Hi"}, {"type": "text/html; charset=utf-8", "value": "<p>Hi</p>"}],
            "attachments": [
                {"content": "aGk=", "type": "application/pdf", "filename": "a.pdf", "disposition": "attachment", "content_id": "dropped"},
                {"content": "aGk=", "filename": "logo.png", "disposition": "inline", "content_id": "logo"}
            ],
            "categories": ["welcome", "onboarding"],
            "custom_args": {"campaign": "spring", "user": "0"},
            "headers": {"X-Shared": "top", "X-Top": "t"},
            "send_at": 1700000000,
            "batch_id": "ignored",
            "ip_pool_name": "ignored",
            "asm": {"group_id": 17, "groups_to_display": [17]},
            "mail_settings": {"bypass_list_management": {"enable": true}, "footer": {"enable": false}},
            "tracking_settings": {"click_tracking": {"enable": true, "enable_text": false}, "open_tracking": {"enable": false}}
        });
        let p = parse_json(&body).unwrap_or_else(|r| panic!("{r:?}"));
        assert!(!p.dry_run);
        let shared = Call {
            reply_to: Some("Help Desk <help@acme.test>".into()),
            body: Some("Hi".into()),
            html: Some("<p>Hi</p>".into()),
            attachments: Some(json!([
                {"filename": "a.pdf", "content_type": "application/pdf", "content": "aGk="},
                {"filename": "logo.png", "content_type": "image/png", "content": "aGk=", "content_id": "logo"}
            ])),
            tags: Some(vec!["welcome".into(), "onboarding".into()]),
            track_opens: Some(false),
            track_clicks: Some(true),
            topic: Some("17".into()),
            ..Call::default()
        };
        let first = Call {
            recipients: Some("Ada Lovelace <ada@x.org>, \"Doe, Jane\" <jane@x.org>".into()),
            cc: Some("cc@x.org".into()),
            bcc: Some("bcc@x.org".into()),
            subject: Some("Top subject".into()),
            sender: Some("Acme <sender@acme.test>".into()),
            headers: Some(json!({"X-Top": "t", "X-Per": "p", "x-shared": "override"})),
            metadata: Some(json!({"campaign": "spring", "user": "7"})),
            send_at: Some("2024-04-25T16:00:00Z".into()),
            ..shared.clone()
        };
        let second = Call {
            recipients: Some("\"Bob \\\"The\\\" Builder\" <bob@y.org>".into()),
            subject: Some("Personal subject".into()),
            sender: Some("Other <other@acme.test>".into()),
            headers: Some(json!({"X-Shared": "top", "X-Top": "t"})),
            metadata: Some(json!({"campaign": "spring", "user": "0"})),
            send_at: Some("2023-11-14T22:13:20Z".into()),
            ..shared
        };
        assert_eq!(p.calls, vec![first, second]);
    }

    #[test]
    fn a_minimal_request_and_the_sandbox() {
        let p = parse_json(&minimal());
        let want = Call {
            recipients: Some("a@x.org".into()),
            sender: Some("f@acme.test".into()),
            subject: Some("s".into()),
            body: Some("t".into()),
            ..Call::default()
        };
        assert_eq!(p, Ok(Parsed { calls: vec![want.clone()], dry_run: false }));
        let p = parse_json(&with("/mail_settings", json!({"sandbox_mode": {"enable": true}})));
        assert_eq!(p, Ok(Parsed { calls: vec![want.clone()], dry_run: true }));
        assert_eq!(validated(Route::SendGridSend, &[want], "now").status, 200);
        let p = parse_json(&with("/mail_settings", json!({"sandbox_mode": {"enable": false}})));
        assert_eq!(p.map(|p| p.dry_run), Ok(false));
        assert_eq!(
            parse_json(&with("/mail_settings", json!({"sandbox_mode": {"enable": "yes"}}))),
            Err(Refusal::invalid("mail_settings.sandbox_mode.enable", "must be true or false, not a string"))
        );
    }

    #[test]
    fn personalizations_are_required_and_bounded() {
        assert_eq!(parse_json(&json!({"subject": "s"})), Err(Refusal::missing("personalizations")));
        let r = parse_json(&with("/personalizations", json!([]))).unwrap_err();
        assert_eq!(r, Refusal::invalid("personalizations", "must hold 1 to 1000 personalizations (0 given)"));
        let one = json!({"to": [{"email": "a@x.org"}]});
        assert!(parse_json(&with("/personalizations", Value::Array(vec![one.clone(); 1000]))).is_ok());
        let r = parse_json(&with("/personalizations", Value::Array(vec![one; 1001]))).unwrap_err();
        assert_eq!(r, Refusal::invalid("personalizations", "must hold 1 to 1000 personalizations (1001 given)"));
        let many = json!({"to": vec![json!({"email": "a@x.org"}); 600], "cc": vec![json!({"email": "c@x.org"}); 401]});
        let r = parse_json(&with("/personalizations", json!([many]))).unwrap_err();
        assert!(
            matches!(&r, Refusal::Invalid { field: Some(f), message } if f == "personalizations" && message.contains("1001 given"))
        );
        assert_eq!(
            parse_json(&with("/personalizations/0/to", json!([]))),
            Err(Refusal::invalid("personalizations.0.to", "is required (at least one {\"email\"} object)"))
        );
        assert_eq!(
            parse_json(&with(
                "/personalizations",
                json!([{"to": [{"email": "a@x.org"}]}, {"cc": [{"email": "c@x.org"}]}])
            )),
            Err(Refusal::invalid("personalizations.1.to", "is required (at least one {\"email\"} object)"))
        );
        assert_eq!(
            parse_json(&with("/personalizations", json!([5]))),
            Err(Refusal::invalid("personalizations.0", "must be an object, not a number"))
        );
    }

    #[test]
    fn addresses_and_names() {
        let cases = [
            (
                with("/personalizations/0/to", json!([{"email": "a@x.org"}, {"name": "B"}])),
                "personalizations.0.to.1.email",
            ),
            (with("/personalizations/0/to", json!([{"email": "not an address"}])), "personalizations.0.to.0.email"),
            (
                with("/personalizations/0/to", json!([{"email": "a@x.org", "name": "Eve\r\nBcc: x@evil.test"}])),
                "personalizations.0.to.0.name",
            ),
            (
                with("/personalizations/0/to", json!([{"email": "a@x.org\nBcc: x@evil.test"}])),
                "personalizations.0.to.0.email",
            ),
            (with("/personalizations/0/to", json!(["a@x.org"])), "personalizations.0.to.0"),
            (with("/personalizations/0/cc", json!([{"email": 5}])), "personalizations.0.cc.0.email"),
            (with("/personalizations/0/from", json!({"name": "x"})), "personalizations.0.from.email"),
            (with("/from", json!("f@acme.test")), "from"),
            (with("/from", json!({"email": "f@acme.test", "name": 3})), "from.name"),
            (with("/reply_to_list", json!([{"email": "r@x.org"}, {"email": ""}])), "reply_to_list.1.email"),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(parse_json(&body)), Some(field.to_string()), "{body}");
        }
        let p = parse_json(&with("/reply_to_list", json!([{"email": "r@x.org", "name": "R"}, {"email": "s@x.org"}])));
        assert_eq!(p.map(|p| p.calls[0].reply_to.clone()), Ok(Some("R <r@x.org>, s@x.org".into())));
        let mut both = with("/reply_to_list", json!([{"email": "r@x.org"}]));
        both["reply_to"] = json!({"email": "s@x.org"});
        assert_eq!(parse_json(&both), Err(Refusal::invalid("reply_to_list", "cannot be used together with reply_to")));
        // Without any `from`, the server's default sender applies (email.send's rule).
        let mut no_from = minimal();
        no_from.as_object_mut().map(|m| m.remove("from"));
        assert_eq!(parse_json(&no_from).map(|p| p.calls[0].sender.clone()), Ok(None));
    }

    #[test]
    fn content() {
        let c = |v: Value| parse_json(&with("/content", v));
        assert_eq!(
            c(json!([{"type": "text/html", "value": "<b>x</b>"}])).map(|p| p.calls[0].html.clone()),
            Ok(Some("<b>x</b>".into()))
        );
        assert_eq!(
            c(json!([{"type": "TEXT/PLAIN", "value": "x"}])).map(|p| p.calls[0].body.clone()),
            Ok(Some("x".into()))
        );
        assert_eq!(
            c(json!([{"type": "text/x-amp-html", "value": "x"}])),
            Err(Refusal::invalid(
                "content.0.type",
                "\"text/x-amp-html\" is not supported; give text/plain and/or text/html"
            ))
        );
        assert_eq!(
            c(json!([{"type": "text/plain", "value": "a"}, {"type": "text/plain", "value": "b"}])),
            Err(Refusal::invalid("content.1.type", "a second text/plain part; give at most one of each type"))
        );
        assert_eq!(c(json!([{"value": "x"}])), Err(Refusal::missing("content.0.type")));
        assert_eq!(c(json!([{"type": "text/plain"}])), Err(Refusal::missing("content.0.value")));
        assert_eq!(
            c(json!([{"type": "text/plain", "value": 1}])),
            Err(Refusal::invalid("content.0.value", "must be a string, not a number"))
        );
        assert_eq!(
            c(json!({"type": "text/plain"})),
            Err(Refusal::invalid("content", "must be an array, not an object"))
        );
        // No content at all is email.send's to refuse (naming `content`).
        let p = c(json!([])).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!((p.calls[0].body.clone(), p.calls[0].html.clone()), (None, None));
    }

    #[test]
    fn attachments() {
        let a = |v: Value| parse_json(&with("/attachments", json!([v])));
        assert_eq!(
            a(json!({"content": "aGk=", "filename": "x.png", "disposition": "inline"})),
            Err(Refusal::invalid("attachments.0.content_id", "is required when disposition is inline"))
        );
        // The Node SDK's own spelling.
        let p = a(json!({"content": "aGk=", "filename": "x.png", "disposition": "inline", "contentId": "logo"}))
            .unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(p.calls[0].attachments.as_ref().and_then(|v| v[0].get("content_id")), Some(&json!("logo")));
        assert_eq!(
            a(json!({"content": "aGk=", "filename": "x.png", "disposition": "sideways"})),
            Err(Refusal::invalid("attachments.0.disposition", "\"sideways\" must be attachment or inline"))
        );
        assert_eq!(a(json!({"filename": "x"})), Err(Refusal::missing("attachments.0.content")));
        assert_eq!(a(json!({"content": "aGk="})), Err(Refusal::missing("attachments.0.filename")));
        let p = a(
            json!({"content": "aGk=", "filename": "x.bin", "disposition": "INLINE", "content_id": "<x>", "type": ""}),
        );
        assert_eq!(
            p.map(|p| p.calls[0].attachments.clone()),
            Ok(Some(
                json!([{"filename": "x.bin", "content_type": "application/octet-stream", "content": "aGk=", "content_id": "x"}])
            ))
        );
    }

    #[test]
    fn headers_categories_and_args() {
        for name in [
            "To",
            "from",
            "SUBJECT",
            "Reply-To",
            "cc",
            "BCC",
            "Content-Type",
            "content-transfer-encoding",
            "DKIM-Signature",
            "received",
            "x-sg-id",
            "X-SG-EID",
        ] {
            let r = parse_json(&with("/headers", json!({name: "x"}))).unwrap_err();
            assert_eq!(
                r,
                Refusal::invalid(
                    format!("headers.{name}"),
                    format!("\"{name}\" is a reserved header and cannot be set")
                )
            );
            let r = parse_json(&with("/personalizations/0/headers", json!({name: "x"}))).unwrap_err();
            assert!(
                matches!(r, Refusal::Invalid { field: Some(f), .. } if f == format!("personalizations.0.headers.{name}"))
            );
        }
        assert_eq!(
            parse_json(&with("/headers", json!({"X-A": 1}))),
            Err(Refusal::invalid("headers.X-A", "must be a string, not a number"))
        );
        let cats: Vec<String> = (0..11).map(|i| format!("c{i}")).collect();
        assert_eq!(
            parse_json(&with("/categories", json!(cats))),
            Err(Refusal::invalid("categories", "at most 10 categories are allowed (11 given)"))
        );
        assert_eq!(
            parse_json(&with("/categories", json!(["a", 1]))),
            Err(Refusal::invalid("categories.1", "must be a string, not a number"))
        );
        assert!(
            matches!(parse_json(&with("/categories", json!(["x".repeat(256)]))), Err(Refusal::Invalid { field: Some(f), .. }) if f == "categories.0")
        );
        assert_eq!(parse_json(&with("/categories", json!([]))).map(|p| p.calls[0].tags.clone()), Ok(None));
        let p = parse_json(&with("/custom_args", json!({"n": 1, "s": "x"})));
        assert_eq!(p.map(|p| p.calls[0].metadata.clone()), Ok(Some(json!({"n": 1, "s": "x"}))));
        assert_eq!(
            parse_json(&with("/custom_args", json!([1]))),
            Err(Refusal::invalid("custom_args", "must be an object, not an array"))
        );
    }

    #[test]
    fn send_at() {
        let s = |v: Value| parse_json(&with("/send_at", v)).map(|p| p.calls[0].send_at.clone());
        assert_eq!(s(json!(0)), Ok(Some("1970-01-01T00:00:00Z".into())));
        assert_eq!(s(json!(1714060800.0)), Ok(Some("2024-04-25T16:00:00Z".into())));
        for bad in [json!(-1), json!(1.5), json!(253402300800u64), json!(u64::MAX), json!(1e300)] {
            assert!(matches!(s(bad.clone()), Err(Refusal::Invalid { field: Some(f), .. }) if f == "send_at"), "{bad}");
        }
        assert_eq!(
            s(json!("1714060800")),
            Err(Refusal::invalid("send_at", "must be a Unix timestamp (a whole number of seconds), not a string"))
        );
        let p = parse_json(&with("/personalizations/0/send_at", json!("soon")));
        assert!(matches!(p, Err(Refusal::Invalid { field: Some(f), .. }) if f == "personalizations.0.send_at"));
    }

    #[test]
    fn unsupported_features_are_refused() {
        let cases = [
            ("/template_id", json!("d-123"), "template_id"),
            ("/sections", json!({"s": "x"}), "sections"),
            ("/personalizations/0/substitutions", json!({"-name-": "x"}), "personalizations.0.substitutions"),
            ("/mail_settings", json!({"footer": {"enable": true, "text": "x"}}), "mail_settings.footer.enable"),
            (
                "/tracking_settings",
                json!({"subscription_tracking": {"enable": true}}),
                "tracking_settings.subscription_tracking.enable",
            ),
            ("/tracking_settings", json!({"ganalytics": {"enable": true}}), "tracking_settings.ganalytics.enable"),
            ("/asm", json!({"groups_to_display": [1]}), "asm.group_id"),
            ("/asm", json!({"group_id": "x"}), "asm.group_id"),
            ("/tracking_settings", json!({"click_tracking": {"enable": 1}}), "tracking_settings.click_tracking.enable"),
            ("/tracking_settings", json!({"click_tracking": true}), "tracking_settings.click_tracking"),
        ];
        for (path, v, field) in cases {
            assert_eq!(field_of(parse_json(&with(path, v))), Some(field.to_string()), "{path}");
        }
        // Empty legacy members and disabled features pass.
        assert!(parse_json(&with("/sections", json!({}))).is_ok());
        assert!(parse_json(&with("/tracking_settings", json!({"ganalytics": {"enable": false}}))).is_ok());
        assert!(parse_json(&with("/template_id", Value::Null)).is_ok());
        let r = parse_json(&with("/template_id", json!("d-1"))).unwrap_err();
        assert_eq!(render(Provider::SendGrid, &r).status, 400);
    }

    #[test]
    fn wrong_shapes() {
        assert_eq!(
            parse_json(&json!([])),
            Err(Refusal::general("the request body must be a JSON object, not an array"))
        );
        assert_eq!(
            parse_json(&with("/subject", json!(1))),
            Err(Refusal::invalid("subject", "must be a string, not a number"))
        );
        assert_eq!(
            parse_json(&with("/personalizations/0/subject", json!([]))),
            Err(Refusal::invalid("personalizations.0.subject", "must be a string, not an array"))
        );
        assert_eq!(
            parse_json(&with("/personalizations", json!({"to": []}))),
            Err(Refusal::invalid("personalizations", "must be an array, not an object"))
        );
    }

    #[test]
    fn field_names_for_sql_errors() {
        assert_eq!(field_name("recipients"), Some("personalizations.0.to"));
        assert_eq!(field_name("html"), Some("content"));
        assert_eq!(field_name("transport"), None);
        assert_eq!(attachment_field(Some(2), Some("content_type")), "attachments.2.type");
        assert_eq!(attachment_field(Some(2), Some("filename")), "attachments.2.filename");
        assert_eq!(attachment_field(Some(2), None), "attachments.2");
    }
}

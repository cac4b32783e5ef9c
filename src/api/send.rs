//! `email.send` and `email.send_template`: validate every argument in the caller's backend, then
//! insert one outbox row (and its attachments) in the caller's transaction. Nothing here touches
//! the network; the worker is woken when that transaction commits.

use lettre::message::Mailbox;
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::JsonB;

use super::{caller_role, invalid, raise, spi_failed, undefined};
use crate::gucs;
use crate::message::{self, check_single_line, show, FieldError};

/// Everything a caller can pass; shared by `send` and `send_template`.
pub(crate) struct Draft<'a> {
    pub recipients: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub body: Option<&'a str>,
    pub html: Option<&'a str>,
    pub sender: Option<&'a str>,
    pub cc: Option<&'a str>,
    pub bcc: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub headers: Option<JsonB>,
    pub attachments: Option<JsonB>,
    pub tags: Option<Vec<Option<String>>>,
    pub metadata: Option<JsonB>,
    pub send_at: Option<TimestampWithTimeZone>,
    pub idempotency_key: Option<&'a str>,
    pub transport: Option<&'a str>,
    pub priority: Option<i32>,
    /// `(name, version, data)` for template mail.
    pub template: Option<(String, i32, JsonB)>,
}

/// Treats NULL and blank optional address lists alike.
fn optional_list(field: &str, v: Option<&str>) -> Result<Vec<Mailbox>, FieldError> {
    match v {
        Some(s) if !s.trim().is_empty() => message::parse_mailboxes(field, s),
        _ => Ok(Vec::new()),
    }
}

fn texts(list: &[Mailbox]) -> Vec<String> {
    list.iter().map(message::mailbox_text).collect()
}

/// Checks the plain-value arguments; returns the parsed pieces.
struct Checked {
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    bcc: Vec<Mailbox>,
    reply_to: Option<String>,
    headers: Option<JsonB>,
    attachments: Vec<message::Attachment>,
    tags: Option<Vec<String>>,
}

fn check(d: &Draft) -> Result<Checked, FieldError> {
    let to = match d.recipients {
        None => return Err(FieldError::new("recipients", "is required")),
        Some(r) => message::parse_mailboxes("recipients", r)?,
    };
    let cc = optional_list("cc", d.cc)?;
    let bcc = optional_list("bcc", d.bcc)?;
    let reply_to = optional_list("reply_to", d.reply_to)?;
    let total = to.len() + cc.len() + bcc.len();
    if total > gucs::max_recipients() {
        return Err(FieldError::new(
            "recipients",
            format!("{total} recipients in to, cc and bcc exceed pg_email.max_recipients ({})", gucs::max_recipients()),
        ));
    }
    if d.template.is_none() {
        match d.subject {
            None => return Err(FieldError::new("subject", "is required")),
            Some(s) => check_single_line("subject", s)?,
        }
        if d.body.is_none() && d.html.is_none() {
            return Err(FieldError::new("body", "at least one of body and html is required"));
        }
    }
    if let Some(h) = &d.headers {
        message::parse_headers(&h.0)?;
    }
    let attachments = match &d.attachments {
        None => Vec::new(),
        Some(a) => message::parse_attachments(&a.0)?,
    };
    let tags = match &d.tags {
        None => None,
        Some(tags) => {
            if tags.len() > 20 {
                return Err(FieldError::new("tags", format!("{} tags given; at most 20 are allowed", tags.len())));
            }
            let mut out = Vec::with_capacity(tags.len());
            for t in tags {
                let t = t.as_deref().ok_or_else(|| FieldError::new("tags", "a tag is NULL"))?;
                if t.is_empty() || t.chars().count() > 128 || t.chars().any(char::is_control) {
                    return Err(FieldError::new(
                        "tags",
                        format!("tag {} must be 1 to 128 characters without control characters", show(t)),
                    ));
                }
                out.push(t.to_string());
            }
            Some(out)
        }
    };
    if let Some(m) = &d.metadata {
        if !m.0.is_object() {
            return Err(FieldError::new("metadata", "must be a JSON object"));
        }
    }
    if let Some(k) = d.idempotency_key {
        if k.is_empty() || k.chars().count() > 256 || k.chars().any(char::is_control) {
            return Err(FieldError::new(
                "idempotency_key",
                format!("{} must be 1 to 256 characters without control characters", show(k)),
            ));
        }
    }
    let size = d.subject.map_or(0, str::len)
        + d.body.map_or(0, str::len)
        + d.html.map_or(0, str::len)
        + attachments.iter().map(|a| a.content.len()).sum::<usize>();
    if size > gucs::max_message_size() {
        return Err(FieldError::new(
            if attachments.is_empty() { "body" } else { "attachments" },
            format!(
                "the message is {size} bytes, over pg_email.max_message_size ({} bytes)",
                gucs::max_message_size()
            ),
        ));
    }
    Ok(Checked {
        to,
        cc,
        bcc,
        reply_to: (!reply_to.is_empty()).then(|| texts(&reply_to).join(", ")),
        headers: d.headers.as_ref().map(|h| JsonB(h.0.clone())),
        attachments,
        tags,
    })
}

const TRANSPORT: &str = "\
SELECT t.name, t.sender, EXISTS (SELECT 1 FROM email.suppressions) \
FROM email.transports t WHERE ($1::text IS NULL AND t.is_default) OR t.name = $1";

const SUPPRESSED: &str = "SELECT coalesce(array_agg(s.address), '{}') FROM email.suppressions s WHERE s.address = ANY($1)";

/// What this backend knows about a transport, and whether any suppression exists: read once
/// per configuration generation instead of once per message.
struct Route {
    name: String,
    sender: Option<String>,
    any_suppressed: bool,
}

thread_local! {
    /// Transport lookups, valid while the configuration generation is unchanged.
    static ROUTES: std::cell::RefCell<(u64, std::collections::HashMap<Option<String>, std::rc::Rc<Route>>)> =
        std::cell::RefCell::new((0, std::collections::HashMap::new()));
}

/// Called by the statement triggers on email.transports and email.suppressions.
#[pg_extern(volatile, parallel_unsafe)]
fn _config_changed() {
    crate::worker::wake::config_changed();
}

/// Forgets cached transport lookups (add_transport calls it).
pub(crate) fn forget_routes() {
    ROUTES.with(|r| r.borrow_mut().1.clear());
}

fn route(client: &mut pgrx::spi::SpiClient, transport: Option<&str>) -> Option<std::rc::Rc<Route>> {
    // Read the generation before the tables: a change committed meanwhile bumps it again.
    let generation = crate::worker::wake::config_generation();
    let key = transport.map(str::to_string);
    let cached = ROUTES.with(|r| {
        let mut r = r.borrow_mut();
        if r.0 != generation || generation == 0 {
            *r = (generation, std::collections::HashMap::new());
        }
        r.1.get(&key).cloned()
    });
    if cached.is_some() {
        return cached;
    }
    let found = super::run_prepared(client, TRANSPORT, Some(1), &[transport.into()]);
    if found.is_empty() {
        return None;
    }
    let row = found.first();
    let route = std::rc::Rc::new(Route {
        name: row.get(1).ok().flatten().unwrap_or_default(),
        sender: row.get(2).ok().flatten(),
        any_suppressed: row.get(3).ok().flatten().unwrap_or(true),
    });
    ROUTES.with(|r| r.borrow_mut().1.insert(key, route.clone()));
    Some(route)
}

const EXISTING: &str = "SELECT id FROM email.messages WHERE idempotency_key = $1";

const INSERT_ATTACHMENT: &str = "\
INSERT INTO email.attachments (message_id, position, filename, content_type, content_id, content) \
VALUES ($1, $2, $3, $4, $5, $6)";

const INSERT_SUPPRESSED: &str = "\
INSERT INTO email.receipts (message_id, event, transport, recipient, response) \
SELECT $1, 'suppressed', $2, r, 'recipient is on the suppression list' FROM unnest($3::text[]) r";

/// Validates and stores one message; returns its id.
pub(crate) fn enqueue(d: Draft) -> i64 {
    let c = check(&d).unwrap_or_else(|e| invalid(e));
    let bare: Vec<String> = c.to.iter().chain(&c.cc).chain(&c.bcc).map(message::bare_address).collect();
    let creator = caller_role();

    Spi::connect_mut(|client| {
        let Some(found) = route(client, d.transport) else {
            match d.transport {
                Some(name) => undefined("transport", name, Some("Register it with email.add_transport(name, dsn).")),
                None => raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                    "no default transport is configured",
                    Some("Pass transport => 'name', or register one with email.add_transport(name, dsn, is_default => true)."),
                ),
            }
        };
        let transport = found.name.clone();
        let transport_sender = found.sender.clone();
        let suppressed: Vec<String> = if found.any_suppressed {
            super::run_prepared(client, SUPPRESSED, Some(1), &[bare.clone().into()]).first().get::<Vec<String>>(1).ok().flatten().unwrap_or_default()
        } else {
            Vec::new()
        };

        let sender_text = d.sender.map(str::to_string).or(transport_sender).or_else(gucs::default_sender);
        let sender = match sender_text {
            Some(s) => message::parse_mailbox("sender", &s).unwrap_or_else(|e| invalid(e)),
            None => invalid(FieldError::new(
                "sender",
                "no sender: pass sender => 'Name <from@example.org>', set from= on the transport DSN, or set pg_email.default_sender",
            )),
        };

        let keep = |list: &[Mailbox]| -> Vec<Mailbox> {
            list.iter().filter(|m| !suppressed.contains(&message::bare_address(m))).cloned().collect()
        };
        let (to, cc, bcc) = (keep(&c.to), keep(&c.cc), keep(&c.bcc));
        let all_suppressed = to.is_empty() && cc.is_empty() && bcc.is_empty();
        // An all-suppressed message keeps its original recipients, so the row says who it was for.
        let (to, cc, bcc) = if all_suppressed { (c.to.clone(), c.cc.clone(), c.bcc.clone()) } else { (to, cc, bcc) };
        let nonempty = |l: Vec<Mailbox>| (!l.is_empty()).then(|| texts(&l));
        let (template, template_version, data) = match &d.template {
            Some((n, v, data)) => (Some(n.clone()), Some(*v), Some(JsonB(data.0.clone()))),
            None => (None, None, None),
        };
        let message_id = message::new_message_id(&sender);

        // The statement names only the columns this call sets, so the common call plans and
        // runs the smallest INSERT; each shape is prepared once per backend.
        let mut cols: Vec<&str> = vec!["transport", "sender", "recipients", "message_id", "created_by"];
        let mut args: Vec<DatumWithOid> = vec![
            transport.as_str().into(),
            message::mailbox_text(&sender).into(),
            texts(&to).into(),
            message_id.as_str().into(),
            creator.as_str().into(),
        ];
        macro_rules! opt {
            ($col:literal, $v:expr) => {
                if let Some(v) = $v {
                    cols.push($col);
                    args.push(DatumWithOid::from(v));
                }
            };
        }
        opt!("cc", nonempty(cc));
        opt!("bcc", nonempty(bcc));
        opt!("reply_to", c.reply_to.as_deref());
        opt!("subject", d.subject);
        opt!("body", d.body);
        opt!("html", d.html);
        opt!("template", template);
        opt!("template_version", template_version);
        opt!("data", data);
        opt!("headers", c.headers);
        opt!("tags", c.tags);
        opt!("metadata", d.metadata);
        opt!("priority", d.priority.filter(|p| *p != 0));
        opt!("send_at", d.send_at);
        opt!("idempotency_key", d.idempotency_key);
        opt!("attachment_count", (!c.attachments.is_empty()).then_some(c.attachments.len() as i32));
        let mut values: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        if let Some(at) = cols.iter().position(|c| *c == "send_at") {
            cols.push("next_attempt_at");
            values.push(format!("${}", at + 1));
        }
        if all_suppressed {
            cols.push("status");
            values.push("'suppressed'".into());
        }
        let sql = format!(
            "INSERT INTO email.messages ({}) VALUES ({}) {}RETURNING id",
            cols.join(", "),
            values.join(", "),
            if d.idempotency_key.is_some() { "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING " } else { "" }
        );
        let inserted = super::run_prepared(client, &sql, Some(1), &args);
        let id = if inserted.is_empty() {
            // The idempotency key exists (possibly committed by a concurrent call we waited for).
            let existing = client
                .select(EXISTING, Some(1), &[d.idempotency_key.into()])
                .unwrap_or_else(|e| spi_failed(e));
            return existing.first().get::<i64>(1).ok().flatten().unwrap_or_else(|| {
                raise(
                    PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                    "the message with this idempotency_key was removed concurrently; retry",
                    None,
                )
            });
        } else {
            inserted.first().get::<i64>(1).ok().flatten().unwrap_or_else(|| {
                raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "INSERT returned no id", None)
            })
        };

        for (pos, a) in c.attachments.iter().enumerate() {
            let args: Vec<DatumWithOid> = vec![
                id.into(),
                (pos as i32).into(),
                a.filename.as_str().into(),
                a.content_type.as_str().into(),
                a.content_id.as_deref().into(),
                a.content.as_slice().into(),
            ];
            client.update(INSERT_ATTACHMENT, None, &args).unwrap_or_else(|e| spi_failed(e));
        }
        let dropped: Vec<String> = bare.iter().filter(|b| suppressed.contains(b)).cloned().collect();
        if !dropped.is_empty() {
            client
                .update(INSERT_SUPPRESSED, None, &[id.into(), transport.as_str().into(), dropped.into()])
                .unwrap_or_else(|e| spi_failed(e));
        }
        if !all_suppressed {
            crate::worker::wake::mark_queued();
        }
        id
    })
}

/// Queues one message. See DESIGN.md for every argument.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn send(
    recipients: Option<&str>,
    subject: Option<&str>,
    body: default!(Option<&str>, "NULL"),
    html: default!(Option<&str>, "NULL"),
    sender: default!(Option<&str>, "NULL"),
    cc: default!(Option<&str>, "NULL"),
    bcc: default!(Option<&str>, "NULL"),
    reply_to: default!(Option<&str>, "NULL"),
    headers: default!(Option<JsonB>, "NULL"),
    attachments: default!(Option<JsonB>, "NULL"),
    tags: default!(Option<Vec<Option<String>>>, "NULL"),
    metadata: default!(Option<JsonB>, "NULL"),
    send_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    idempotency_key: default!(Option<&str>, "NULL"),
    transport: default!(Option<&str>, "NULL"),
    priority: default!(Option<i32>, 0),
) -> i64 {
    enqueue(Draft {
        recipients,
        subject,
        body,
        html,
        sender,
        cc,
        bcc,
        reply_to,
        headers,
        attachments,
        tags,
        metadata,
        send_at,
        idempotency_key,
        transport,
        priority,
        template: None,
    })
}

/// Queues one message rendered from a stored template when it is sent.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn send_template(
    template: Option<&str>,
    recipients: Option<&str>,
    data: default!(Option<JsonB>, "'{}'"),
    sender: default!(Option<&str>, "NULL"),
    cc: default!(Option<&str>, "NULL"),
    bcc: default!(Option<&str>, "NULL"),
    reply_to: default!(Option<&str>, "NULL"),
    headers: default!(Option<JsonB>, "NULL"),
    attachments: default!(Option<JsonB>, "NULL"),
    tags: default!(Option<Vec<Option<String>>>, "NULL"),
    metadata: default!(Option<JsonB>, "NULL"),
    send_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    idempotency_key: default!(Option<&str>, "NULL"),
    transport: default!(Option<&str>, "NULL"),
    priority: default!(Option<i32>, 0),
) -> i64 {
    let name = template.unwrap_or_else(|| invalid(FieldError::new("template", "is required")));
    let data = data.unwrap_or_else(|| JsonB(serde_json::json!({})));
    if !data.0.is_object() {
        invalid(FieldError::new("data", "must be a JSON object"));
    }
    let version = template_version(name).unwrap_or_else(|| {
        undefined("template", name, Some("Store it first: INSERT INTO email.templates (name, subject, body) VALUES (...)."))
    });
    // A template the data cannot render fails here, in the caller's transaction, not later.
    let rendered = super::templates::render_current(name, &data.0);
    let size = rendered.subject.len() + rendered.body.as_ref().map_or(0, String::len) + rendered.html.as_ref().map_or(0, String::len);
    if size > gucs::max_message_size() {
        invalid(FieldError::new("data", format!("the rendered message is {size} bytes, over pg_email.max_message_size")));
    }
    enqueue(Draft {
        recipients,
        subject: None,
        body: None,
        html: None,
        sender,
        cc,
        bcc,
        reply_to,
        headers,
        attachments,
        tags,
        metadata,
        send_at,
        idempotency_key,
        transport,
        priority,
        template: Some((name.to_string(), version, data)),
    })
}

/// The current version of a stored template, if it exists.
fn template_version(name: &str) -> Option<i32> {
    Spi::get_one_with_args::<i32>("SELECT version FROM email.templates WHERE name = $1", &[name.into()])
        .unwrap_or_else(|e| match e {
            pgrx::spi::SpiError::InvalidPosition => None,
            e => spi_failed(e),
        })
}

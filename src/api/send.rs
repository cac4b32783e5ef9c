//! `email.send` and `email.send_template`: validate every argument in the caller's backend, then
//! insert one outbox row (and its attachments) in the caller's transaction. Nothing here touches
//! the network; the worker is woken when that transaction commits. The rules that need no
//! database live in `crate::draft`; this module adds what needs one (transport, suppressions,
//! idempotency) and stores the result. Its steps are shared with `insert.rs`, which applies them
//! to rows inserted into `email.messages` directly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::LazyLock;

use lettre::message::Mailbox;
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use super::{caller_role, invalid, raise, run_prepared, spi_failed, undefined};
use crate::draft::{self, texts, Checked};
use crate::gucs;
use crate::message::{self, FieldError};

const TRANSPORT_ROUTE: &str = include_str!("../../sql/api/transport_route.sql");
const SUPPRESSED_AMONG: &str = include_str!("../../sql/api/suppressed_among.sql");

/// suppressed_among.sql for one address, the common case. With an array parameter the generic
/// plan assumes ten addresses, so PostgreSQL would plan every call afresh for its one address
/// (measured: 60 µs a call); a scalar keeps one plan.
const SUPPRESSED_ONE: &str = include_str!("../../sql/api/suppressed_one.sql");
const TOPIC: &str = include_str!("../../sql/api/topic.sql");
const INSERT_MESSAGE: &str = include_str!("../../sql/api/insert_message.sql");
const INSERT_MESSAGE_ONCE: &str = include_str!("../../sql/api/insert_message_once.sql");
pub(super) const MESSAGE_BY_KEY: &str = include_str!("../../sql/api/message_by_key.sql");
const MESSAGE_BY_ID_KEY: &str = include_str!("../../sql/api/message_by_id_key.sql");
const INSERT_ATTACHMENT: &str = include_str!("../../sql/api/insert_attachment.sql");
const RECORD_SUPPRESSED: &str = include_str!("../../sql/api/record_suppressed.sql");
const TEMPLATE_VERSION: &str = include_str!("../../sql/api/template_version.sql");
const MAY_SEND: &str = include_str!("../../sql/api/may_send.sql");
const INSERT_RAW: &str = include_str!("../../sql/api/insert_raw.sql");

/// What a call says besides the message itself: who sends it, through which transport, when,
/// how urgently, and for template mail the pinned template with its data.
pub(crate) struct Routing<'a> {
    pub sender: Option<&'a str>,
    pub transport: Option<&'a str>,
    pub send_at: Option<TimestampWithTimeZone>,
    pub priority: Option<i32>,
    /// `(name, version, data)` for template mail.
    pub template: Option<(&'a str, i32, &'a serde_json::Value)>,
    pub track: Track,
    /// The topic the message is about: only its subscribers get it.
    pub topic: Option<&'a str>,
}

/// The call's `track_opens`, `track_clicks` and `list_unsubscribe` (NULL: the settings
/// pg_email.track_opens / pg_email.track_clicks; List-Unsubscribe: on for a topic when there is
/// a URL for the link, else off).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Track {
    pub opens: Option<bool>,
    pub clicks: Option<bool>,
    pub list_unsubscribe: Option<bool>,
}

impl Track {
    /// The resolved flags; a flag that is on needs a URL for the links.
    pub(super) fn resolve(self, topic: bool) -> [bool; 3] {
        let url = gucs::public_url().is_some();
        let flags = [
            self.opens.unwrap_or_else(gucs::track_opens),
            self.clicks.unwrap_or_else(gucs::track_clicks),
            self.list_unsubscribe.unwrap_or(topic && url),
        ];
        if !url {
            for (on, field) in flags.iter().zip(["track_opens", "track_clicks", "list_unsubscribe"]) {
                if *on {
                    invalid(FieldError::new(
                        field,
                        "needs a URL for its links: set pg_email.public_url (or pg_email.listen_address)",
                    ));
                }
            }
        }
        flags
    }
}

pub(super) fn limits() -> draft::Limits {
    draft::Limits { max_recipients: gucs::max_recipients(), max_message_size: gucs::max_message_size() }
}

/// What this backend knows about a transport, and whether any suppression exists: read once
/// per configuration generation instead of once per message.
pub(super) struct Route {
    pub name: String,
    /// smtp, file, capture, or a provider's name.
    pub kind: String,
    pub sender: Option<String>,
    pub any_suppressed: bool,
}

/// The configuration generation this backend's caches of transports and topics are valid for;
/// 0 (no caching) on a distributed outbox (Citus): there a change reaches this node by a
/// two-phase commit, visible at COMMIT PREPARED, after the last bump of the generation here
/// (xact.rs), so a cache filled in between would be stale.
fn cache_generation() -> u64 {
    if super::citus::outbox().is_some() {
        0
    } else {
        crate::shmem::config_generation()
    }
}

/// The cached route for `transport`, when the cache is current (no database access).
pub(super) fn cached_route(transport: Option<&str>) -> Option<Rc<Route>> {
    let generation = cache_generation();
    ROUTES.with(|r| {
        let r = r.borrow();
        if r.0 != generation || generation == 0 {
            return None;
        }
        r.1.get(&transport.map(str::to_string)).cloned()
    })
}

/// Transport lookups by the name a call gave (None: the default), with the configuration
/// generation they were read at.
type RouteCache = (u64, HashMap<Option<String>, Rc<Route>>);

thread_local! {
    /// Transport lookups, valid while the configuration generation is unchanged.
    static ROUTES: RefCell<RouteCache> = RefCell::new((0, HashMap::new()));
    /// Topics' `default_subscribed`, valid while the configuration generation is unchanged.
    static TOPICS: RefCell<(u64, HashMap<String, bool>)> = RefCell::new((0, HashMap::new()));
}

/// Whether a topic is subscribed by default; raises 42704 when it does not exist.
pub(super) fn topic_default(client: &mut SpiClient, topic: &str) -> bool {
    let generation = cache_generation();
    let cached = TOPICS.with(|t| {
        let mut t = t.borrow_mut();
        if t.0 != generation || generation == 0 {
            *t = (generation, HashMap::new());
        }
        t.1.get(topic).copied()
    });
    if let Some(d) = cached {
        return d;
    }
    let found = run_prepared(client, TOPIC, Some(1), &[topic.into()]);
    let Some(default) = (!found.is_empty()).then(|| found.first().get::<bool>(1).ok().flatten()).flatten() else {
        undefined(
            "topic",
            topic,
            Some("Create it with INSERT INTO email.topics (name, description, default_subscribed)."),
        )
    };
    TOPICS.with(|t| t.borrow_mut().1.insert(topic.to_string(), default));
    default
}

/// The transport a call uses (its own, or the default), from the cache when it is current;
/// raises 42704 when there is none.
pub(super) fn lookup_route(client: &mut SpiClient, transport: Option<&str>) -> Rc<Route> {
    // Read the generation before the tables: a change committed meanwhile bumps it again.
    let generation = cache_generation();
    let key = transport.map(str::to_string);
    let cached = ROUTES.with(|r| {
        let mut r = r.borrow_mut();
        if r.0 != generation || generation == 0 {
            *r = (generation, HashMap::new());
        }
        r.1.get(&key).cloned()
    });
    if let Some(route) = cached {
        return route;
    }
    let found = run_prepared(client, TRANSPORT_ROUTE, Some(1), &[transport.into()]);
    if found.is_empty() {
        match transport {
            Some(name) => undefined("transport", name, Some("Register it with email.add_transport(name, dsn).")),
            None => raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                "no default transport is configured",
                Some("Pass transport => 'name', or register one with email.add_transport(name, dsn, is_default => true)."),
            ),
        }
    }
    let row = found.first();
    let route = Rc::new(Route {
        name: row.get_by_name("name").ok().flatten().unwrap_or_default(),
        kind: row.get_by_name("kind").ok().flatten().unwrap_or_default(),
        sender: row.get_by_name("sender").ok().flatten(),
        any_suppressed: row.get_by_name("any_suppressed").ok().flatten().unwrap_or(true),
    });
    ROUTES.with(|r| r.borrow_mut().1.insert(key, route.clone()));
    route
}

/// The recipients of this message not to be mailed (bare, lower-cased), each with why: on the
/// suppression list, or not subscribed to the message's topic.
fn dropped_among(client: &mut SpiClient, route: &Route, topic: Option<&str>, bare: &[String]) -> Vec<(String, String)> {
    let topic = topic.map(|t| (t, topic_default(client, t)));
    dropped(client, route.any_suppressed, topic, bare)
}

/// Which of `bare` are suppressed (looked up only when `any_suppressed`) or not subscribed to
/// `topic` (its name and `default_subscribed`), each with why.
pub(crate) fn dropped(
    client: &mut SpiClient,
    any_suppressed: bool,
    topic: Option<(&str, bool)>,
    bare: &[String],
) -> Vec<(String, String)> {
    let listed_ones = if any_suppressed { suppressed(client, bare) } else { Vec::new() };
    dropped_given(listed_ones, topic, bare)
}

/// `dropped` with the suppressed ones among `bare` already known (`suppressed`).
pub(super) fn dropped_given(
    suppressed: Vec<String>,
    topic: Option<(&str, bool)>,
    bare: &[String],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = suppressed.into_iter().map(|a| (a, ON_THE_LIST.to_string())).collect();
    if let Some((topic, default)) = topic {
        for a in bare {
            if !out.iter().any(|(d, _)| d == a) && !super::probe::subscribed(a, topic).unwrap_or(default) {
                out.push((a.clone(), format!("recipient is not subscribed to topic \"{topic}\"")));
            }
        }
    }
    out
}

const ON_THE_LIST: &str = "recipient is on the suppression list";

/// Which of the bare addresses are on the suppression list.
pub(super) fn suppressed(client: &mut SpiClient, bare: &[String]) -> Vec<String> {
    let found = match bare {
        [one] => run_prepared(client, SUPPRESSED_ONE, Some(1), &[one.as_str().into()]),
        _ => run_prepared(client, SUPPRESSED_AMONG, Some(1), &[bare.to_vec().into()]),
    };
    found.first().get_by_name::<Vec<String>, _>("suppressed").ok().flatten().unwrap_or_default()
}

/// The sender: the call's, else the transport's `from=`, else `pg_email.default_sender`.
pub(super) fn resolve_sender(r: &Routing, route: &Route) -> Mailbox {
    let text = r.sender.map(str::to_string).or_else(|| route.sender.clone()).or_else(gucs::default_sender);
    match text {
        Some(s) => message::parse_mailbox("sender", &s).unwrap_or_else(|e| invalid(e)),
        None => invalid(FieldError::new(
            "sender",
            "no sender: pass sender => 'Name <from@example.org>', set from= on the transport DSN, or set pg_email.default_sender",
        )),
    }
}

/// The recipient lists (to, cc, bcc) that are stored.
pub(super) struct Kept {
    pub lists: [Vec<Mailbox>; 3],
    /// Every recipient was suppressed: the lists stay whole, so the row says who it was for.
    pub all_suppressed: bool,
    /// The one recipient, dropped, and why: its receipt is written with the row, in one
    /// statement instead of two.
    pub receipt: Option<(String, String)>,
}

/// The recipient lists without dropped addresses.
pub(super) fn drop_suppressed(c: &Checked, dropped: &[(String, String)]) -> Kept {
    let keep = |list: &[Mailbox]| -> Vec<Mailbox> {
        list.iter().filter(|m| !dropped.iter().any(|(a, _)| *a == message::bare_address(m))).cloned().collect()
    };
    let kept = [keep(&c.to), keep(&c.cc), keep(&c.bcc)];
    if kept.iter().all(Vec::is_empty) {
        let receipt = match dropped {
            [one] if c.to.len() + c.cc.len() + c.bcc.len() == 1 => Some(one.clone()),
            _ => None,
        };
        Kept { lists: [c.to.clone(), c.cc.clone(), c.bcc.clone()], all_suppressed: true, receipt }
    } else {
        Kept { lists: kept, all_suppressed: false, receipt: None }
    }
}

/// The statements that store a message: [plain, with an idempotency key], each by itself and
/// with the 'suppressed' receipt of its one dropped recipient in the same statement; and each of
/// those again with the id given ($28), which a distributed outbox needs (api/citus.rs): there
/// a keyed message conflicts on its id, derived from the key.
struct Inserts {
    /// [key][receipt]
    by_default: [[&'static str; 2]; 2],
    with_id: [[&'static str; 2]; 2],
}

static INSERTS: LazyLock<Inserts> = LazyLock::new(|| {
    let leak = |s: String| -> &'static str { s.leak() };
    // The row and the receipt of its one dropped recipient ($n recipient, $n+1 why).
    let with_receipt = |sql: &str, n: u32| {
        leak(format!(
            "WITH m AS (\n{sql}\n)\nINSERT INTO email.receipts (message_id, event, transport, recipient, response, source)\n\
             SELECT m.id, 'suppressed', $1, ${n}, ${}, 'api' FROM m\nRETURNING message_id AS id",
            n + 1
        ))
    };
    let id_given = |sql: &str| {
        let sql = sql
            .replacen("INSERT INTO email.messages (", "INSERT INTO email.messages (id, ", 1)
            .replacen("VALUES (", "VALUES ($28, ", 1)
            .replacen(
                "ON CONFLICT (created_by, idempotency_key) WHERE idempotency_key IS NOT NULL",
                "ON CONFLICT (id)",
                1,
            );
        assert!(sql.contains("(id, ") && sql.contains("($28, "), "insert_message*.sql changed shape");
        sql
    };
    let (plain, once) = (id_given(INSERT_MESSAGE), id_given(INSERT_MESSAGE_ONCE));
    Inserts {
        by_default: [
            [INSERT_MESSAGE, with_receipt(INSERT_MESSAGE, 28)],
            [INSERT_MESSAGE_ONCE, with_receipt(INSERT_MESSAGE_ONCE, 28)],
        ],
        with_id: [[leak(plain.clone()), with_receipt(&plain, 29)], [leak(once.clone()), with_receipt(&once, 29)]],
    }
});

/// Inserts the outbox row; returns its id, or the existing id for a known idempotency key. A
/// message whose one recipient was dropped (`kept.receipt`) gets its receipt in the same statement.
#[allow(clippy::too_many_arguments)]
fn insert_message(
    client: &mut SpiClient,
    d: &draft::Draft,
    r: &Routing,
    c: &Checked,
    route: &Route,
    sender: &Mailbox,
    kept: Kept,
    creator: &str,
    id: Option<i64>,
) -> Result<i64, i64> {
    let [to, cc, bcc] = kept.lists;
    let nonempty = |l: Vec<Mailbox>| (!l.is_empty()).then(|| texts(&l));
    let (template, template_version, data) = match r.template {
        Some((n, v, data)) => (Some(n), Some(v), Some(JsonB(data.clone()))),
        None => (None, None, None),
    };
    let message_id = message::new_message_id(sender);
    let request_hash = d.idempotency_key.map(|_| call_fingerprint(d, r));
    let [opens, clicks, list_unsubscribe] = r.track.resolve(r.topic.is_some());
    let mut args: Vec<DatumWithOid> = vec![
        route.name.as_str().into(),
        message::mailbox_text(sender).into(),
        texts(&to).into(),
        message_id.as_str().into(),
        creator.into(),
        nonempty(cc).into(),
        nonempty(bcc).into(),
        c.reply_to.as_deref().into(),
        d.subject.into(),
        d.body.into(),
        d.html.into(),
        template.into(),
        template_version.into(),
        data.into(),
        d.headers.map(|h| JsonB(h.clone())).into(),
        c.tags.clone().into(),
        d.metadata.map(|m| JsonB(m.clone())).into(),
        r.priority.into(),
        r.send_at.into(),
        d.idempotency_key.into(),
        (c.attachments.len() as i32).into(),
        (if kept.all_suppressed { "suppressed" } else { "queued" }).into(),
        request_hash.as_deref().into(),
        opens.into(),
        clicks.into(),
        list_unsubscribe.into(),
        r.topic.into(),
    ];
    let once = usize::from(d.idempotency_key.is_some());
    let receipt = usize::from(kept.receipt.is_some());
    let sql = match id {
        Some(id) => {
            args.push(id.into());
            INSERTS.with_id[once][receipt]
        }
        None => INSERTS.by_default[once][receipt],
    };
    if let Some((who, why)) = &kept.receipt {
        args.push(who.as_str().into());
        args.push(why.as_str().into());
    }
    let inserted = run_prepared(client, sql, Some(1), &args);
    if inserted.is_empty() {
        // This role used the key before (possibly in a concurrent call we waited for).
        let key = d.idempotency_key.unwrap_or_default();
        let existing = match id {
            Some(id) => client.select(MESSAGE_BY_ID_KEY, Some(1), &[key.into(), creator.into(), id.into()]),
            None => client.select(MESSAGE_BY_KEY, Some(1), &[key.into(), creator.into()]),
        };
        let existing = existing.unwrap_or_else(|e| spi_failed(e));
        let row = existing.first();
        let Some(id) = row.get_by_name::<i64, _>("id").ok().flatten() else {
            raise(
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                "the message with this idempotency_key was removed concurrently; retry",
                None,
            )
        };
        let stored: Option<String> = row.get_by_name("request_hash").ok().flatten();
        if stored.is_some() && stored != request_hash {
            different_content(key, id)
        }
        return Err(id);
    }
    inserted
        .first()
        .get_by_name::<i64, _>("id")
        .ok()
        .flatten()
        .map(Ok)
        .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "INSERT returned no id", None))
}

/// Refuses an idempotency key that message `id` used with other content.
pub(super) fn different_content(key: &str, id: i64) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!(
            "invalid idempotency_key: {} was already used for message {id} with different content",
            message::show(key)
        ),
        Some("Repeat a call with exactly the same arguments, or use a new key for a different message."),
    )
}

/// The fingerprint of a call's content: every argument but the idempotency key.
pub(super) fn call_fingerprint(d: &draft::Draft, r: &Routing) -> String {
    // Template mail: the subject was rendered from the template, not given by the call.
    let subject = if r.template.is_some() { None } else { d.subject };
    let send_at = r.send_at.map(|t| t.into_inner());
    let template = r.template.map(|(name, _, data)| serde_json::json!([name, data]));
    let mut content = serde_json::json!([
        d.recipients,
        subject,
        d.body,
        d.html,
        d.cc,
        d.bcc,
        d.reply_to,
        d.headers,
        d.attachments,
        d.tags,
        d.metadata,
        r.sender,
        r.transport,
        send_at,
        r.priority,
        template
    ]);
    // Appended only when given, so a key used before topics existed keeps its fingerprint.
    if let (Some(topic), Some(list)) = (r.topic, content.as_array_mut()) {
        list.push(topic.into());
    }
    draft::fingerprint(&content)
}

fn insert_attachments(client: &mut SpiClient, id: i64, attachments: &[message::Attachment]) {
    for (pos, a) in attachments.iter().enumerate() {
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
}

/// A 'suppressed' receipt for each recipient dropped (at enqueue, or by a retry), in the order
/// of `bare`, saying why.
pub(crate) fn record_suppressed(
    client: &mut SpiClient,
    id: i64,
    transport: &str,
    bare: &[String],
    dropped: &[(String, String)],
) {
    for (who, why) in bare.iter().filter_map(|b| dropped.iter().find(|(a, _)| a == b)) {
        run_prepared(
            client,
            RECORD_SUPPRESSED,
            None,
            &[id.into(), transport.into(), who.as_str().into(), why.as_str().into()],
        );
    }
}

/// Validates and stores one message for the calling role; returns its id.
pub(crate) fn enqueue(d: draft::Draft, r: Routing) -> i64 {
    enqueue_as(d, r, &caller_role())
}

/// Validates and stores one message for role `creator`; returns its id.
pub(crate) fn enqueue_as(d: draft::Draft, r: Routing, creator: &str) -> i64 {
    super::require_current_schema();
    super::warn_if_unserved(false);
    let c = draft::check(&d, &limits()).unwrap_or_else(|e| invalid(e));
    let bare = c.bare_addresses();
    let store = |id: Option<i64>| {
        Spi::connect_mut(|client| {
            let route = lookup_route(client, r.transport);
            let dropped = dropped_among(client, &route, r.topic, &bare);
            let sender = resolve_sender(&r, &route);
            let kept = drop_suppressed(&c, &dropped);
            let all_suppressed = kept.all_suppressed;
            let receipt_with_row = kept.receipt.is_some();
            let id = match insert_message(client, &d, &r, &c, &route, &sender, kept, creator, id) {
                Ok(id) => id,
                Err(existing) => return existing,
            };
            insert_attachments(client, id, &c.attachments);
            if !receipt_with_row {
                record_suppressed(client, id, &route.name, &bare, &dropped);
            }
            if !all_suppressed {
                crate::xact::mark_queued();
            }
            id
        })
    };
    let Some(node) = super::citus::outbox() else {
        return store(None);
    };
    // A distributed outbox (api/citus.rs): a keyed message's id comes from its key; another one
    // is placed on this node when it holds shards. A row written here may be written from a
    // trigger running on a shard.
    let id = match d.idempotency_key {
        Some(key) => Some(super::citus::keyed_id(creator, key)),
        None => node.local_id(),
    };
    match id {
        Some(id) if node.holds(id) => super::citus::nested(|| store(Some(id))),
        id => store(id),
    }
}

/// Stores a message received by SMTP submission for `creator` (an API key's role, which must be
/// allowed to call email.send): the envelope's sender and recipients checked like email.send's,
/// suppressed recipients dropped, the prepared MIME kept to be delivered as it is, through the
/// default transport. Runs in the listener's transaction; returns the message's id.
pub(crate) fn enqueue_raw(creator: &str, sender: &str, recipients: &[String], p: &crate::submission::Prepared) -> i64 {
    super::require_current_schema();
    let sender = message::parse_mailbox("sender", sender).unwrap_or_else(|e| invalid(e));
    let mut list: Vec<Mailbox> = Vec::with_capacity(recipients.len());
    for r in recipients {
        list.push(message::parse_mailbox("recipients", r).unwrap_or_else(|e| invalid(e)));
    }
    let max = gucs::max_recipients();
    if list.len() > max {
        invalid(FieldError::new(
            "recipients",
            format!("{} recipients, more than pg_email.max_recipients ({max})", list.len()),
        ));
    }
    let size = gucs::max_message_size();
    if p.raw.len() > size {
        invalid(FieldError::new(
            "message",
            format!("{} bytes, more than pg_email.max_message_size ({size})", p.raw.len()),
        ));
    }
    Spi::connect_mut(|client| {
        let may = run_prepared(client, MAY_SEND, Some(1), &[creator.into()]);
        if may.first().get_by_name::<bool, _>("may_send").ok().flatten() != Some(true) {
            raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "role {} may not send: it needs USAGE on schema email and EXECUTE on email.send",
                    message::show(creator)
                ),
                None,
            )
        }
        let route = lookup_route(client, None);
        if !matches!(route.kind.as_str(), "smtp" | "file" | "capture") {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "the default transport {} ({}) cannot deliver a submitted message as it is; SMTP submission needs an smtp://, file:// or capture:// default transport",
                    message::show(&route.name),
                    route.kind
                ),
                None,
            )
        }
        let bare: Vec<String> = list.iter().map(message::bare_address).collect();
        let dropped = dropped(client, route.any_suppressed, None, &bare);
        let kept: Vec<String> = bare.iter().filter(|b| !dropped.iter().any(|(d, _)| d == *b)).cloned().collect();
        let all_suppressed = kept.is_empty();
        let stored = if all_suppressed { bare.clone() } else { kept };
        let args: Vec<DatumWithOid> = vec![
            route.name.as_str().into(),
            message::mailbox_text(&sender).into(),
            stored.into(),
            p.message_id.as_str().into(),
            creator.into(),
            p.subject.as_deref().into(),
            p.raw.as_slice().into(),
            (if all_suppressed { "suppressed" } else { "queued" }).into(),
        ];
        let inserted = run_prepared(client, INSERT_RAW, Some(1), &args);
        let id = inserted
            .first()
            .get_by_name::<i64, _>("id")
            .ok()
            .flatten()
            .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "INSERT returned no id", None));
        record_suppressed(client, id, &route.name, &bare, &dropped);
        if !all_suppressed {
            crate::xact::mark_queued();
        }
        id
    })
}

/// Queues one message. See DESIGN.md for every argument.
#[pg_extern(name = "send", volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn send_message(
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
    track_opens: default!(Option<bool>, "NULL"),
    track_clicks: default!(Option<bool>, "NULL"),
    topic: default!(Option<&str>, "NULL"),
    list_unsubscribe: default!(Option<bool>, "NULL"),
) -> i64 {
    let track = Track { opens: track_opens, clicks: track_clicks, list_unsubscribe };
    enqueue(
        draft::Draft {
            recipients,
            subject,
            body,
            html,
            cc,
            bcc,
            reply_to,
            headers: headers.as_ref().map(|h| &h.0),
            attachments: attachments.as_ref().map(|a| &a.0),
            tags: tags.as_deref(),
            metadata: metadata.as_ref().map(|m| &m.0),
            idempotency_key,
            templated: false,
        },
        Routing { sender, transport, send_at, priority, template: None, track, topic },
    )
}

/// Queues one message rendered from a stored template when it is sent.
#[pg_extern(name = "send_template", volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn send_template_message(
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
    track_opens: default!(Option<bool>, "NULL"),
    track_clicks: default!(Option<bool>, "NULL"),
    topic: default!(Option<&str>, "NULL"),
    list_unsubscribe: default!(Option<bool>, "NULL"),
) -> i64 {
    let track = Track { opens: track_opens, clicks: track_clicks, list_unsubscribe };
    let name = template.unwrap_or_else(|| invalid(FieldError::required("template")));
    let data = data.unwrap_or_else(|| JsonB(serde_json::json!({})));
    let d = draft::Draft {
        recipients,
        cc,
        bcc,
        reply_to,
        headers: headers.as_ref().map(|h| &h.0),
        attachments: attachments.as_ref().map(|a| &a.0),
        tags: tags.as_deref(),
        metadata: metadata.as_ref().map(|m| &m.0),
        idempotency_key,
        templated: true,
        ..draft::Draft::default()
    };
    let r = Routing { sender, transport, send_at, priority, template: None, track, topic };
    enqueue_template(name, &data.0, d, r, &caller_role())
}

/// email.send_template for role `creator`: renders the current version of template `name` with
/// `data` now (a template the data cannot render fails here, in the caller's transaction), and
/// queues the message pinned to that version. `d`'s subject is the rendered one.
pub(crate) fn enqueue_template(
    name: &str,
    data: &serde_json::Value,
    d: draft::Draft,
    r: Routing,
    creator: &str,
) -> i64 {
    if !data.is_object() {
        invalid(FieldError::new("data", "must be a JSON object"));
    }
    let version = template_version(name).unwrap_or_else(|| super::templates::no_such_template(name));
    let rendered = super::templates::render_current(name, data);
    let size = rendered.subject.len()
        + rendered.body.as_ref().map_or(0, String::len)
        + rendered.html.as_ref().map_or(0, String::len);
    draft::check_rendered_size(size, &limits()).unwrap_or_else(|e| invalid(e));
    // The subject as rendered now, so the outbox shows it before the mail is sent.
    let d = draft::Draft { subject: Some(&rendered.subject), ..d };
    enqueue_as(d, Routing { template: Some((name, version, data)), ..r }, creator)
}

/// The current version of a stored template, if it exists.
pub(super) fn template_version(name: &str) -> Option<i32> {
    Spi::get_one_with_args::<i32>(TEMPLATE_VERSION, &[name.into()]).unwrap_or_else(|e| match e {
        pgrx::spi::SpiError::InvalidPosition => None,
        e => spi_failed(e),
    })
}

/// The C symbols 0.1.0's `email.send` and `email.send_template` point at. They take fewer
/// arguments than today's, so after a new library is installed and before ALTER EXTENSION
/// pg_email UPDATE they only say what to do (the arguments are not read).
#[pg_extern(sql = false)]
fn send() -> i64 {
    super::require_current_schema();
    raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "email.send is out of date", None)
}

#[pg_extern(sql = false)]
fn send_template() -> i64 {
    super::require_current_schema();
    raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "email.send_template is out of date", None)
}

#[cfg(test)]
mod tests {
    use super::{INSERTS, INSERT_MESSAGE, INSERT_MESSAGE_ONCE};

    #[test]
    fn the_insert_statements_take_the_id_and_the_receipt_where_they_say() {
        let i = &*INSERTS;
        assert_eq!(i.by_default[0][0], INSERT_MESSAGE);
        assert_eq!(i.by_default[1][0], INSERT_MESSAGE_ONCE);
        assert!(i.by_default[0][1].contains("$28, $29, 'api'") && !i.by_default[0][1].contains("(id, "));
        for once in 0..2 {
            for receipt in 0..2 {
                let sql = i.with_id[once][receipt];
                assert!(sql.contains("INSERT INTO email.messages (id, ") && sql.contains("VALUES ($28, "), "{sql}");
                assert_eq!(sql.contains("ON CONFLICT (id) DO NOTHING"), once == 1, "{sql}");
                assert!(!sql.contains("ON CONFLICT (created_by"), "{sql}");
                assert_eq!(sql.contains("$29, $30, 'api'"), receipt == 1, "{sql}");
            }
        }
    }
}

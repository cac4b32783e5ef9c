//! The listener's main thread storing what the HTTP send API and SMTP submission accepted: each
//! request's calls go through `email.send`'s own code (`api::send`) for the API key's role, which
//! must be allowed to execute email.send (checked once per role and transaction); `created_by`
//! names it, and suppression, topics, templates and idempotency apply as in SQL. All of a
//! request runs in one subtransaction of the listener's transaction: a batch is stored whole or
//! not at all. The client is answered only after that transaction commits.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use super::api_http::{NotSent, SubmitJob};
use crate::api::send::{Routing, Track};
use crate::draft::Draft;
use crate::message::FieldError;
use crate::sendapi::Call;

const MAY_SEND: &str = include_str!("../../sql/api/may_send.sql");
const KEYS_USED: &str = include_str!("../../sql/listener/api_keys_used.sql");

/// Raised to roll a dry run back once every call of it went through.
const DRY_RUN_DONE: &str = "pg_email: dry run of the send API, rolled back";

/// The SQLSTATE of a key whose role may not send (insufficient_privilege): the request is
/// refused as forbidden.
pub const ROLE_UNUSABLE: &str = "42501";

thread_local! {
    /// Whether a role may send, as read in this transaction (grants can change at any time, so
    /// it is read again in each one: `forget_roles`).
    static MAY: RefCell<HashMap<String, bool>> = RefCell::new(HashMap::new());
}

/// Called at the start of each transaction that stores requests.
pub fn forget_roles() {
    MAY.with(|m| m.borrow_mut().clear());
}

/// Whether `role` exists and may execute email.send (with USAGE on schema email).
fn may_send(role: &str) -> bool {
    if let Some(known) = MAY.with(|m| m.borrow().get(role).copied()) {
        return known;
    }
    let may = Spi::get_one_with_args::<bool>(MAY_SEND, &[role.into()]).ok().flatten().unwrap_or(false);
    MAY.with(|m| m.borrow_mut().insert(role.to_string(), may));
    may
}

/// Stores `calls` for `role` in one subtransaction; the ids of the messages (existing ones for a
/// repeated idempotency key), or the first call that failed. A dry run checks everything and
/// keeps nothing.
pub fn store(role: &str, calls: &[Call], dry_run: bool) -> Result<Vec<i64>, NotSent> {
    let at = Cell::new(0usize);
    let mut ids = Vec::with_capacity(calls.len());
    let done = crate::subxact::run_coded(|| {
        if !may_send(role) {
            crate::api::raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("role {} may not execute email.send", crate::message::show(role)),
                None,
            )
        }
        for (i, call) in calls.iter().enumerate() {
            at.set(i);
            ids.push(send_one(role, call));
        }
        at.set(calls.len());
        if dry_run {
            pgrx::error!("{DRY_RUN_DONE}");
        }
    });
    match done {
        Ok(()) => Ok(ids),
        Err((_, message)) if dry_run && at.get() == calls.len() && message == DRY_RUN_DONE => Ok(ids),
        Err((sqlstate, message)) => {
            Err(NotSent { index: at.get().min(calls.len().saturating_sub(1)), sqlstate, message })
        }
    }
}

/// One call, as `email.send` (or `email.send_template`) would make it for `role`.
fn send_one(role: &str, c: &Call) -> i64 {
    let send_at = c.send_at.as_deref().map(|t| {
        t.parse::<TimestampWithTimeZone>().unwrap_or_else(|_| {
            crate::api::invalid(FieldError::new("send_at", format!("{} is not a time", crate::message::show(t))))
        })
    });
    let track = Track { opens: c.track_opens, clicks: c.track_clicks, list_unsubscribe: None };
    let routing = Routing {
        sender: c.sender.as_deref(),
        transport: None,
        send_at,
        priority: None,
        template: None,
        track,
        topic: c.topic.as_deref(),
    };
    let draft = Draft {
        recipients: c.recipients.as_deref(),
        cc: c.cc.as_deref(),
        bcc: c.bcc.as_deref(),
        reply_to: c.reply_to.as_deref(),
        headers: c.headers.as_ref(),
        attachments: c.attachments.as_ref(),
        tags: None,
        metadata: c.metadata.as_ref(),
        idempotency_key: c.idempotency_key.as_deref(),
        ..Draft::default()
    };
    let tags: Option<Vec<Option<String>>> = c.tags.as_ref().map(|t| t.iter().cloned().map(Some).collect());
    let draft = Draft { tags: tags.as_deref(), ..draft };
    match &c.template {
        Some(name) => {
            let empty = serde_json::json!({});
            let data = c.data.as_ref().unwrap_or(&empty);
            crate::api::send::enqueue_template(name, data, Draft { templated: true, ..draft }, routing, role)
        }
        None => crate::api::send::enqueue_as(
            Draft { subject: c.subject.as_deref(), body: c.body.as_deref(), html: c.html.as_deref(), ..draft },
            routing,
            role,
        ),
    }
}

/// Notes when keys were last used (names and Unix seconds), in one statement.
pub fn keys_used(used: &[(String, f64)]) {
    if used.is_empty() {
        return;
    }
    let names: Vec<String> = used.iter().map(|(n, _)| n.clone()).collect();
    let at: Vec<f64> = used.iter().map(|(_, t)| *t).collect();
    if let Err(e) = Spi::run_with_args(KEYS_USED, &[names.into(), at.into()]) {
        pgrx::error!("{e}");
    }
}

/// Stores one message received by SMTP submission, as its key's role, in a subtransaction;
/// its id, or why not.
pub fn submit(job: &SubmitJob) -> Result<i64, NotSent> {
    crate::subxact::run_coded(|| crate::api::send::enqueue_raw(&job.role, &job.sender, &job.recipients, &job.prepared))
        .map_err(|(sqlstate, message)| NotSent { index: 0, sqlstate, message })
}

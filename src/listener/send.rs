//! The listener's main thread storing what the HTTP send API and SMTP submission accepted: each
//! request's calls run as `email.send` / `email.send_template` under the API key's role (SET ROLE
//! semantics, so that role's grants and row-level security apply and `created_by` names it), all
//! of a request in one subtransaction of the listener's transaction: a batch is stored whole or
//! not at all. The client is answered only after that transaction commits.

use std::cell::Cell;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::JsonB;

use super::api_http::NotSent;
use crate::sendapi::Call;

const SET_ROLE: &str = include_str!("../../sql/listener/set_role.sql");
const SEND: &str = include_str!("../../sql/listener/send.sql");
const SEND_TEMPLATE: &str = include_str!("../../sql/listener/send_template.sql");
const KEYS_USED: &str = include_str!("../../sql/listener/api_keys_used.sql");

/// Raised to roll a dry run back once every call of it went through.
const DRY_RUN_DONE: &str = "pg_email: dry run of the send API, rolled back";

/// The SQLSTATE of a key whose role cannot be set (invalid_authorization_specification): the
/// request is refused as with a wrong key.
pub const ROLE_UNUSABLE: &str = "28000";

/// Runs `calls` as `role` in one subtransaction; the ids of the messages (existing ones for a
/// repeated idempotency key), or the first call that failed. A dry run checks everything and keeps
/// nothing.
pub fn store(role: &str, calls: &[Call], dry_run: bool) -> Result<Vec<i64>, NotSent> {
    // usize::MAX until the role is set: a role that cannot be set (dropped since) fails the key.
    let at = Cell::new(usize::MAX);
    let mut ids = Vec::with_capacity(calls.len());
    let done = crate::subxact::run_coded(|| {
        Spi::connect_mut(|client| {
            // Sets the role for the rest of the transaction unless reset below; a failure rolls
            // the subtransaction back, which undoes it as well.
            crate::api::run_prepared(client, SET_ROLE, None, &[role.into()]);
            for (i, call) in calls.iter().enumerate() {
                at.set(i);
                ids.push(send_one(client, call));
            }
            at.set(calls.len());
            crate::api::run_prepared(client, SET_ROLE, None, &["none".into()]);
        });
        if dry_run {
            pgrx::error!("{DRY_RUN_DONE}");
        }
    });
    match done {
        Ok(()) => Ok(ids),
        Err((_, message)) if dry_run && at.get() == calls.len() && message == DRY_RUN_DONE => Ok(ids),
        Err((_, message)) if at.get() == usize::MAX => Err(NotSent {
            index: 0,
            sqlstate: ROLE_UNUSABLE.into(),
            message: format!("the API key's role cannot be used: {message}"),
        }),
        Err((sqlstate, message)) => {
            Err(NotSent { index: at.get().min(calls.len().saturating_sub(1)), sqlstate, message })
        }
    }
}

fn send_one(client: &mut pgrx::spi::SpiClient, c: &Call) -> i64 {
    let json = |v: &Option<serde_json::Value>| v.clone().map(JsonB);
    let mut args: Vec<DatumWithOid> = vec![
        c.recipients.as_deref().into(),
        c.sender.as_deref().into(),
        c.cc.as_deref().into(),
        c.bcc.as_deref().into(),
        c.reply_to.as_deref().into(),
        json(&c.headers).into(),
        json(&c.attachments).into(),
        c.tags.clone().into(),
        json(&c.metadata).into(),
        c.send_at.as_deref().into(),
        c.idempotency_key.as_deref().into(),
        c.track_opens.into(),
        c.track_clicks.into(),
        c.topic.as_deref().into(),
    ];
    let sql = match &c.template {
        Some(name) => {
            args.push(name.as_str().into());
            args.push(json(&c.data).into());
            SEND_TEMPLATE
        }
        None => {
            args.push(c.subject.as_deref().into());
            args.push(c.body.as_deref().into());
            args.push(c.html.as_deref().into());
            SEND
        }
    };
    let rows = crate::api::run_prepared(client, sql, Some(1), &args);
    match rows.first().get::<i64>(1) {
        Ok(Some(id)) => id,
        _ => pgrx::error!("pg_email: email.send returned no id"),
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

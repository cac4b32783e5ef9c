//! Administration functions: cancel, retry, purge and worker_status. They run in the caller's
//! backend; cancel and retry act only on messages the caller queued, unless the caller is a
//! member of the extension owner's role.

use pgrx::prelude::*;
use std::sync::atomic::Ordering;

use super::{caller_role, invalid, spi_failed};
use crate::message::FieldError;
use crate::shmem::{self, WorkerState};

const CANCEL: &str = include_str!("../../sql/api/cancel.sql");
const MESSAGE_FOR_RETRY: &str = include_str!("../../sql/api/message_for_retry.sql");
const RETRY_CANDIDATES: &str = include_str!("../../sql/api/retry_candidates.sql");
const REQUEUE: &str = include_str!("../../sql/api/requeue.sql");
const RETRY_NOW: &str = include_str!("../../sql/api/retry_now.sql");
const MARK_SUPPRESSED: &str = include_str!("../../sql/api/mark_suppressed.sql");
const PURGE: &str = include_str!("../../sql/api/purge.sql");
const IS_NEGATIVE: &str = include_str!("../../sql/api/interval_is_negative.sql");

/// Runs `sql` (cancel.sql, retry.sql) for message `id` as the caller; true if it changed a row.
fn change(sql: &str, id: Option<i64>) -> bool {
    let Some(id) = id else { invalid(FieldError::required("id")) };
    let caller = caller_role();
    Spi::connect_mut(|client| {
        let t = client.update(sql, None, &[id.into(), caller.as_str().into()]).unwrap_or_else(|e| spi_failed(e));
        !t.is_empty()
    })
}

/// Cancels a message that is still queued; true if it was.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn cancel(id: Option<i64>) -> bool {
    change(CANCEL, id)
}

/// Retries message `id` as `caller`: a failed or bounced message is requeued for a fresh series
/// of attempts to the recipients that are not suppressed now (none left: it becomes
/// `suppressed`); a queued message waiting for a later attempt becomes due now. True if it was.
fn retry_one(client: &mut pgrx::spi::SpiClient, id: i64, caller: &str) -> bool {
    let found =
        client.update(MESSAGE_FOR_RETRY, Some(1), &[id.into(), caller.into()]).unwrap_or_else(|e| spi_failed(e));
    if found.is_empty() {
        return false;
    }
    let row = found.first();
    let status: String = row.get_by_name("status").ok().flatten().unwrap_or_default();
    let waiting: bool = row.get_by_name("waiting").ok().flatten().unwrap_or(false);
    if status == "queued" && waiting {
        client.update(RETRY_NOW, None, &[id.into()]).unwrap_or_else(|e| spi_failed(e));
        return true;
    }
    if status != "failed" && status != "bounced" {
        return false;
    }
    let transport: String = row.get_by_name("transport").ok().flatten().unwrap_or_default();
    let mut mailboxes = Vec::new();
    for (field, column) in [("recipients", "recipients"), ("cc", "cc"), ("bcc", "bcc")] {
        let list: Vec<String> = row.get_by_name(column).ok().flatten().unwrap_or_default();
        mailboxes.extend(crate::message::stored_list(field, &list).unwrap_or_default());
    }
    let bare: Vec<String> = mailboxes.iter().map(crate::message::bare_address).collect();
    // Recipients suppressed since, or who left the message's topic since (a topic deleted since
    // no longer filters), are not retried.
    let topic: Option<String> = row.get_by_name("topic").ok().flatten();
    let topic_default: Option<bool> = row.get_by_name("topic_default").ok().flatten();
    let topic = topic.as_deref().zip(topic_default);
    let dropped = super::send::dropped(client, true, topic, &bare);
    super::send::record_suppressed(client, id, &transport, &bare, &dropped);
    let pending: Vec<String> = mailboxes
        .iter()
        .filter(|m| !dropped.iter().any(|(a, _)| *a == crate::message::bare_address(m)))
        .map(|m| crate::message::ascii_address(&m.email).to_string())
        .collect();
    if pending.is_empty() {
        if topic.is_none() {
            notice!("message {id} is not retried: every recipient is on the suppression list");
        } else {
            notice!("message {id} is not retried: every recipient is on the suppression list or has left its topic");
        }
        client.update(MARK_SUPPRESSED, None, &[id.into()]).unwrap_or_else(|e| spi_failed(e));
        return false;
    }
    let pending = (!dropped.is_empty()).then_some(pending);
    client.update(REQUEUE, None, &[id.into(), pending.into()]).unwrap_or_else(|e| spi_failed(e));
    true
}

/// Requeues a failed or bounced message for a fresh series of attempts (never to recipients that
/// are suppressed now), or makes a queued message that waits for a retry due now; true if it did.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn retry(id: Option<i64>) -> bool {
    let Some(id) = id else { invalid(FieldError::required("id")) };
    let caller = caller_role();
    let done = Spi::connect_mut(|client| retry_one(client, id, &caller));
    if done {
        crate::xact::mark_queued();
    }
    done
}

/// `email.retry` for every message the caller may act on with status `status` ('failed' and
/// 'bounced' when NULL; 'queued' makes waiting retries due now), through `transport`, last
/// changed at or after `since`; returns how many were retried. For recovery after an outage.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn retry_all(
    transport: default!(Option<&str>, "NULL"),
    status: default!(Option<&str>, "NULL"),
    since: default!(Option<TimestampWithTimeZone>, "NULL"),
) -> i64 {
    let statuses: Vec<String> = match status {
        None => vec!["failed".into(), "bounced".into()],
        Some(s @ ("failed" | "bounced" | "queued")) => vec![s.to_string()],
        Some(other) => invalid(FieldError::new(
            "status",
            format!("{} must be failed, bounced or queued", crate::message::show(other)),
        )),
    };
    let caller = caller_role();
    let done = Spi::connect_mut(|client| {
        let ids: Vec<i64> = client
            .select(RETRY_CANDIDATES, None, &[statuses.into(), transport.into(), since.into(), caller.as_str().into()])
            .unwrap_or_else(|e| spi_failed(e))
            .filter_map(|r| r.get_by_name::<i64, _>("id").ok().flatten())
            .collect();
        ids.into_iter().filter(|id| retry_one(client, *id, &caller)).count() as i64
    });
    if done > 0 {
        crate::xact::mark_queued();
    }
    done
}

/// Deletes finished messages (and their receipts, attachments and captures) created longer ago
/// than `older_than`; returns how many messages went.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn purge(older_than: Option<pgrx::datum::Interval>) -> i64 {
    let Some(older_than) = older_than else { invalid(FieldError::required("older_than")) };
    Spi::connect_mut(|client| {
        let neg = client
            .select(IS_NEGATIVE, None, &[older_than.into()])
            .unwrap_or_else(|e| spi_failed(e))
            .first()
            .get::<bool>(1)
            .ok()
            .flatten()
            .unwrap_or(false);
        if neg {
            invalid(FieldError::new("older_than", "must not be negative"));
        }
        client
            .update(PURGE, None, &[older_than.into()])
            .unwrap_or_else(|e| spi_failed(e))
            .first()
            .get::<i64>(1)
            .ok()
            .flatten()
            .unwrap_or(0)
    })
}

fn ts(v: i64) -> Option<TimestampWithTimeZone> {
    // SAFETY: a TimestampTz is a by-value int64 Datum; from_datum with is_null = false only
    // reinterprets the value.
    (v != 0).then(|| unsafe { TimestampWithTimeZone::from_datum(pgrx::pg_sys::Datum::from(v), false) }).flatten()
}

/// One row per worker of this server that serves this database and is running or has run since
/// the server started. In a database no worker serves, one row says so (worker and pid NULL).
/// `email.worker_status()` (sql/finalize.sql) shows these rows, of every node on Citus. (Its C
/// symbol keeps the name of 0.1.0's `email.worker_status`, whose install script names it.)
#[pg_extern(volatile, parallel_unsafe, name = "_worker_status_local")]
#[allow(clippy::type_complexity)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(worker, Option<i32>),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(in_flight, i32),
        name!(sent, i64),
        name!(deferred, i64),
        name!(failed, i64),
        name!(bounced, i64),
        name!(started_at, Option<TimestampWithTimeZone>),
        name!(last_activity, Option<TimestampWithTimeZone>),
        name!(database, String),
        name!(kind, String),
    ),
> {
    let here = super::current_database();
    if let Some(why) = super::unserved_reason(&here) {
        return TableIterator::new(vec![(None, None, why, 0, 0, 0, 0, 0, None, None, here, "delivery".into())]);
    }
    let mut rows = Vec::new();
    if let Some(shared) = shmem::shared() {
        // The listener's row: events stored as sent, requests answered 503 as deferred, refused
        // (4xx) requests as failed, open connections as in flight.
        let slots = shared.slots.iter().enumerate().map(|(i, s)| (Some(i as i32), s, "delivery"));
        for (worker, s, kind) in slots.chain(std::iter::once((None, &shared.listener, "listener"))) {
            let started = s.started_at.load(Ordering::Relaxed);
            if started == 0 {
                continue;
            }
            let pid = s.pid.load(Ordering::Relaxed);
            rows.push((
                worker,
                (pid != 0).then_some(pid),
                s.state().map_or("unknown", WorkerState::name).to_string(),
                s.in_flight.load(Ordering::Relaxed) as i32,
                s.sent.load(Ordering::Relaxed) as i64,
                s.deferred.load(Ordering::Relaxed) as i64,
                s.failed.load(Ordering::Relaxed) as i64,
                s.bounced.load(Ordering::Relaxed) as i64,
                ts(started),
                ts(s.last_activity.load(Ordering::Relaxed)),
                here.clone(),
                kind.to_string(),
            ));
        }
    }
    TableIterator::new(rows)
}

/// Called by CREATE EXTENSION (and the update script): warns when no worker serves this
/// database, so mail queued here would wait for ever.
#[pg_extern(volatile, parallel_unsafe)]
fn _warn_if_unserved() {
    super::warn_if_unserved(true);
}

//! Administration functions: cancel, retry, purge and worker_status. They run in the caller's
//! backend; cancel and retry act only on messages the caller queued, unless the caller is a
//! member of the extension owner's role.

use pgrx::prelude::*;
use std::sync::atomic::Ordering;

use super::{caller_role, invalid, spi_failed};
use crate::message::FieldError;
use crate::shmem::{self, WorkerState};

const CANCEL: &str = include_str!("../../sql/api/cancel.sql");
const RETRY: &str = include_str!("../../sql/api/retry.sql");
const PURGE: &str = include_str!("../../sql/api/purge.sql");
const IS_NEGATIVE: &str = include_str!("../../sql/api/interval_is_negative.sql");

/// Runs `sql` (cancel.sql, retry.sql) for message `id` as the caller; true if it changed a row.
fn change(sql: &str, id: Option<i64>) -> bool {
    let Some(id) = id else { invalid(FieldError::new("id", "is required")) };
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

/// Requeues a failed or bounced message for a fresh series of attempts; true if it was.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn retry(id: Option<i64>) -> bool {
    let done = change(RETRY, id);
    if done {
        crate::xact::mark_queued();
    }
    done
}

/// Deletes finished messages (and their receipts, attachments and captures) created longer ago
/// than `older_than`; returns how many messages went.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn purge(older_than: Option<pgrx::datum::Interval>) -> i64 {
    let Some(older_than) = older_than else { invalid(FieldError::new("older_than", "is required")) };
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

/// One row per worker slot that is running or has run since the server started.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(worker, i32),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(in_flight, i32),
        name!(sent, i64),
        name!(deferred, i64),
        name!(failed, i64),
        name!(bounced, i64),
        name!(started_at, Option<TimestampWithTimeZone>),
        name!(last_activity, Option<TimestampWithTimeZone>),
    ),
> {
    let mut rows = Vec::new();
    if let Some(shared) = shmem::shared() {
        for (i, s) in shared.slots.iter().enumerate() {
            let started = s.started_at.load(Ordering::Relaxed);
            if started == 0 {
                continue;
            }
            let pid = s.pid.load(Ordering::Relaxed);
            let state = s.state().map_or("unknown", WorkerState::name);
            rows.push((
                i as i32,
                (pid != 0).then_some(pid),
                state.to_string(),
                s.in_flight.load(Ordering::Relaxed) as i32,
                s.sent.load(Ordering::Relaxed) as i64,
                s.deferred.load(Ordering::Relaxed) as i64,
                s.failed.load(Ordering::Relaxed) as i64,
                s.bounced.load(Ordering::Relaxed) as i64,
                ts(started),
                ts(s.last_activity.load(Ordering::Relaxed)),
            ));
        }
    }
    TableIterator::new(rows)
}

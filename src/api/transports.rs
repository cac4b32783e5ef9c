//! `email.add_transport`: parses and validates a DSN in the caller's backend, stores its masked
//! form in `email.transports` and the full DSN in `email.transport_secrets` (owner-only). An
//! error raised while a DSN is being handled hides the statement text from the server log, so a
//! secret typed into the call does not end up there either.

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::{raise, spi_failed, undefined};
use crate::deliver::dsn;
use crate::message::{show, FieldError};

static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

/// Chains the log hook that hides the statement of an ERROR raised while `add_transport` holds
/// a secret (`crate::xact` owns that flag and clears it at transaction end, since an error
/// caught by a PL/pgSQL block never reaches the hook). Called once, from `_PG_init`.
pub(super) fn install_log_hook() {
    // SAFETY: runs once in the postmaster from _PG_init, before any other process exists, so
    // nothing reads the hook variables concurrently; the previous hook is kept and called.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(hide_secret_statement);
    }
}

/// Called by the statement triggers on email.transports and email.suppressions: backends and
/// workers that cache what they read from them read again.
#[pg_extern(volatile, parallel_unsafe)]
fn _config_changed() {
    crate::xact::config_changed();
}

/// Called by the receipts trigger when it queued webhook deliveries: the workers are woken when
/// the transaction commits, as for queued mail.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_workers() {
    crate::xact::mark_hooks_queued();
}

// The previous hook is Postgres C code; the call goes through pg_guard_ffi_boundary, which turns
// a longjmp from it into a Rust panic that pg_guard re-raises as the same ERROR.
#[allow(ffi_unwind_calls)]
#[pg_guard]
unsafe extern "C-unwind" fn hide_secret_statement(edata: *mut pg_sys::ErrorData) {
    // SAFETY: Postgres passes a valid ErrorData (checked for null anyway) that it owns for the
    // duration of the call; PREV_EMIT_LOG_HOOK was set once in _PG_init and is only read here.
    unsafe {
        if !edata.is_null() && (*edata).elevel >= pg_sys::PGERROR as i32 && crate::xact::take_handling_secret() {
            (*edata).hide_stmt = true;
        }
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(edata));
        }
    }
}

const NAME_RULE: &str = "must be 1 to 63 letters, digits, '_', '.' or '-'";

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

const TRANSPORT_EXISTS: &str = include_str!("../../sql/api/transport_exists.sql");
const CLEAR_DEFAULT: &str = include_str!("../../sql/api/clear_default.sql");
const DEFAULT_TRANSPORT: &str = include_str!("../../sql/api/default_transport.sql");
const UPSERT: &str = include_str!("../../sql/api/upsert_transport.sql");
const UPSERT_SECRET: &str = include_str!("../../sql/api/upsert_transport_secret.sql");
const UPDATE: &str = include_str!("../../sql/api/update_transport.sql");

fn checked_name(name: Option<&str>) -> &str {
    let name = name.unwrap_or_else(|| super::invalid(FieldError::required("name")));
    if !valid_name(name) {
        super::invalid(FieldError::new("name", format!("{} {NAME_RULE}", show(name))));
    }
    name
}

/// A fallback must name another transport that exists; '' (remove the fallback) always passes.
fn check_fallback(name: &str, fallback: Option<&str>) {
    let Some(fb) = fallback.filter(|f| !f.is_empty()) else { return };
    if fb == name {
        super::invalid(FieldError::new("fallback", "a transport cannot be its own fallback"));
    }
    let exists = Spi::get_one_with_args::<bool>(TRANSPORT_EXISTS, &[fb.into()])
        .unwrap_or_else(|e| spi_failed(e))
        .unwrap_or(false);
    if !exists {
        undefined("fallback transport", fb, Some("Add the fallback transport first."));
    }
}

/// Before `name` becomes the default: takes the default from the transport that has it, with a
/// NOTICE naming it.
fn take_default(client: &mut pgrx::spi::SpiClient, name: &str) {
    let previous: Option<String> = client
        .select(DEFAULT_TRANSPORT, Some(1), &[])
        .unwrap_or_else(|e| spi_failed(e))
        .first()
        .get_by_name("name")
        .ok()
        .flatten();
    if let Some(previous) = previous.filter(|p| p != name) {
        notice!("transport {} is now the default instead of {}", show(name), show(&previous));
        client.update(CLEAR_DEFAULT, None, &[name.into()]).unwrap_or_else(|e| spi_failed(e));
    }
}

/// Registers a named transport, or replaces its DSN. On a replace, `is_default` and `fallback`
/// left NULL keep their values (`fallback => ''` removes the fallback). `secret` may carry the
/// DSN's secret separately (as a bind parameter, it never appears in a statement's text).
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn add_transport(
    name: Option<&str>,
    dsn: Option<&str>,
    is_default: default!(Option<bool>, "NULL"),
    fallback: default!(Option<&str>, "NULL"),
    secret: default!(Option<&str>, "NULL"),
) {
    crate::xact::handling_secret(true);
    let name = checked_name(name);
    let given = dsn.unwrap_or_else(|| super::invalid(FieldError::required("dsn")));
    let merged = secret.map(|s| {
        dsn::with_secret(given, s).unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid secret for transport {}: {e}", show(name)),
                None,
            )
        })
    });
    let raw = merged.as_deref().unwrap_or(given);
    let parsed = dsn::parse(raw).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid dsn for transport {}: {e}", show(name)),
            Some("See the DSN forms in the README; percent-encode special characters in keys and passwords."),
        )
    });
    crate::deliver::Transport::check(&parsed).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid dsn for transport {}: {e}", show(name)),
            Some("The server checks the files and directories a transport uses as the user PostgreSQL runs as."),
        )
    });
    check_fallback(name, fallback);
    Spi::connect_mut(|client| {
        if is_default == Some(true) {
            take_default(client, name);
        }
        let masked = parsed.masked();
        client
            .update(
                UPSERT,
                None,
                &[
                    name.into(),
                    parsed.kind.name().into(),
                    masked.as_str().into(),
                    is_default.into(),
                    fallback.into(),
                    parsed.from.as_deref().into(),
                ],
            )
            .unwrap_or_else(|e| spi_failed(e));
        client.update(UPSERT_SECRET, None, &[name.into(), raw.trim().into()]).unwrap_or_else(|e| spi_failed(e));
    });
    crate::xact::handling_secret(false);
}

/// Changes whether a transport is the default and what its fallback is, keeping its DSN (and
/// everything left NULL); `fallback => ''` removes the fallback.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn update_transport(
    name: Option<&str>,
    is_default: default!(Option<bool>, "NULL"),
    fallback: default!(Option<&str>, "NULL"),
) {
    let name = checked_name(name);
    check_fallback(name, fallback);
    Spi::connect_mut(|client| {
        if is_default == Some(true) {
            take_default(client, name);
        }
        let updated = client
            .update(UPDATE, None, &[name.into(), is_default.into(), fallback.into()])
            .unwrap_or_else(|e| spi_failed(e));
        if updated.is_empty() {
            undefined("transport", name, Some("Register it with email.add_transport(name, dsn)."));
        }
    });
}

const TRANSPORT_SECRET: &str = include_str!("../../sql/api/transport_secret.sql");

/// Checks a transport without waiting for real mail: its stored DSN, what it needs on this
/// machine, and a connection (SMTP: greeting and EHLO; HTTP APIs: TCP), with timeouts of at most
/// 10 s; with `recipient`, also queues a test message through it (sent after commit). One row
/// per step; the details never contain a secret.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn test_transport(
    name: Option<&str>,
    recipient: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(step, String), name!(ok, bool), name!(detail, String))> {
    let name = checked_name(name);
    let raw = Spi::get_one_with_args::<String>(TRANSPORT_SECRET, &[name.into()])
        .unwrap_or_else(|e| match e {
            pgrx::spi::SpiError::InvalidPosition => None,
            e => spi_failed(e),
        })
        .unwrap_or_else(|| undefined("transport", name, Some("Register it with email.add_transport(name, dsn).")));
    let mut rows = Vec::new();
    let parsed = match dsn::parse(&raw) {
        Ok(d) => {
            rows.push(("dsn".to_string(), true, d.masked()));
            d
        }
        Err(e) => {
            rows.push(("dsn".to_string(), false, e.to_string()));
            return TableIterator::new(rows);
        }
    };
    let scrub = |t: String| dsn::scrub(&t, &parsed.secrets());
    match crate::deliver::Transport::check(&parsed) {
        Ok(()) => rows.push(("local".into(), true, "everything this machine provides is in place".into())),
        Err(e) => {
            rows.push(("local".into(), false, scrub(e.to_string())));
            return TableIterator::new(rows);
        }
    }
    let connected = crate::deliver::probe::connect(&parsed);
    let ok = connected.is_ok();
    rows.push(("connect".into(), ok, scrub(connected.unwrap_or_else(|e| e))));
    if let (Some(to), true) = (recipient, ok) {
        let id = Spi::get_one_with_args::<i64>(
            include_str!("../../sql/api/send_test_message.sql"),
            &[to.into(), format!("pg_email test of transport {}", show(name)).into(), name.into()],
        )
        .unwrap_or_else(|e| spi_failed(e))
        .unwrap_or_default();
        rows.push(("send".into(), true, format!("queued as message {id}; it is sent when this transaction commits")));
    }
    TableIterator::new(rows)
}

//! `email.add_transport`: parses and validates a DSN in the caller's backend, stores its masked
//! form in `email.transports` and the full DSN in `email.transport_secrets` (owner-only). An
//! error raised while a DSN is being handled hides the statement text from the server log, so a
//! secret typed into the call does not end up there either.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::{raise, spi_failed, undefined};
use crate::deliver::dsn;
use crate::message::{show, FieldError};

/// Set while add_transport runs; the log hook hides the statement of an ERROR raised meanwhile.
static HANDLING_SECRET: AtomicBool = AtomicBool::new(false);
static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

pub(super) fn install_log_hook() {
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(hide_secret_statement);
    }
}

/// Forgets the flag at transaction end (an error caught by a PL/pgSQL block never reaches the hook).
pub(crate) fn reset_secret_flag() {
    super::send::forget_routes();
    HANDLING_SECRET.store(false, Ordering::Relaxed);
}

// The previous hook is Postgres C code; the call goes through pg_guard_ffi_boundary, which turns
// a longjmp from it into a Rust panic that pg_guard re-raises as the same ERROR.
#[allow(ffi_unwind_calls)]
#[pg_guard]
unsafe extern "C-unwind" fn hide_secret_statement(edata: *mut pg_sys::ErrorData) {
    unsafe {
        if !edata.is_null() && (*edata).elevel >= pg_sys::PGERROR as i32 && HANDLING_SECRET.swap(false, Ordering::Relaxed) {
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

const UPSERT: &str = "\
INSERT INTO email.transports (name, kind, dsn, is_default, fallback, sender) VALUES ($1, $2, $3, $4, $5, $6) \
ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, dsn = EXCLUDED.dsn, is_default = EXCLUDED.is_default, \
    fallback = EXCLUDED.fallback, sender = EXCLUDED.sender, updated_at = now()";

const UPSERT_SECRET: &str = "\
INSERT INTO email.transport_secrets (name, dsn) VALUES ($1, $2) \
ON CONFLICT (name) DO UPDATE SET dsn = EXCLUDED.dsn";

/// Registers (or replaces) a named transport.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn add_transport(
    name: Option<&str>,
    dsn: Option<&str>,
    is_default: default!(Option<bool>, false),
    fallback: default!(Option<&str>, "NULL"),
) {
    HANDLING_SECRET.store(true, Ordering::Relaxed);
    crate::worker::wake::ensure_callback();
    let name = name.unwrap_or_else(|| super::invalid(FieldError::new("name", "is required")));
    if !valid_name(name) {
        super::invalid(FieldError::new("name", format!("{} {NAME_RULE}", show(name))));
    }
    let raw = dsn.unwrap_or_else(|| super::invalid(FieldError::new("dsn", "is required")));
    let parsed = dsn::parse(raw).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid dsn for transport {}: {e}", show(name)),
            Some("See the DSN forms in the README; percent-encode special characters in keys and passwords."),
        )
    });
    if let Some(fb) = fallback {
        if fb == name {
            super::invalid(FieldError::new("fallback", "a transport cannot be its own fallback"));
        }
        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM email.transports WHERE name = $1)",
            &[fb.into()],
        )
        .unwrap_or_else(|e| spi_failed(e))
        .unwrap_or(false);
        if !exists {
            undefined("fallback transport", fb, Some("Add the fallback transport first."));
        }
    }
    let is_default = is_default.unwrap_or(false);
    Spi::connect_mut(|client| {
        if is_default {
            client
                .update(
                    "UPDATE email.transports SET is_default = false, updated_at = now() WHERE is_default AND name <> $1",
                    None,
                    &[name.into()],
                )
                .unwrap_or_else(|e| spi_failed(e));
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
    super::send::forget_routes();
    HANDLING_SECRET.store(false, Ordering::Relaxed);
}

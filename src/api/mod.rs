//! The SQL surface (`#[pg_extern]` functions in schema `email`). Everything here runs in the
//! caller's backend, inside the caller's transaction, and never touches the network: it
//! validates, then inserts through SPI with user values passed as arguments.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::message::FieldError;

pub mod admin;
pub mod send;
pub mod templates;
pub mod transports;
mod tests;

/// Called from `_PG_init`.
pub fn init() {
    transports::install_log_hook();
}

/// Raises an ERROR with `code`, `message` and an optional hint.
pub(crate) fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = pgrx::pg_sys::panic::ErrorReport::new(code, message.into(), "pg_email");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// A bad argument value: SQLSTATE 22023 with the field named.
pub(crate) fn invalid(e: FieldError) -> ! {
    raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None)
}

/// An object that does not exist: SQLSTATE 42704.
pub(crate) fn undefined(what: &str, name: &str, hint: Option<&str>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("{what} {} does not exist", crate::message::show(name)),
        hint,
    )
}

/// An SPI failure is a bug or a broken installation, never user input.
pub(crate) fn spi_failed(e: pgrx::spi::SpiError) -> ! {
    raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("pg_email: SPI call failed: {e}"), None)
}

/// The role the caller acts as, even inside a SECURITY DEFINER function: the session's current
/// role (after SET ROLE), not the function owner.
pub(crate) fn caller_role() -> String {
    unsafe {
        let oid = pg_sys::GetOuterUserId();
        let name = pg_sys::GetUserNameFromId(oid, false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

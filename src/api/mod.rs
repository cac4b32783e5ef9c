//! The SQL surface (`#[pg_extern]` functions in schema `email`). Everything here runs in the
//! caller's backend, inside the caller's transaction, and never touches the network: it
//! validates, then inserts through SPI with user values passed as arguments.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};

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

thread_local! {
    /// Plans of this backend's hot statements, prepared once (SPI_keepplan) and re-planned by
    /// Postgres itself when the tables they use change.
    static PLANS: RefCell<HashMap<String, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Runs `sql` through a plan prepared on first use; argument types come from `args`.
pub(crate) fn run_prepared<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &str,
    limit: Option<i64>,
    args: &[DatumWithOid],
) -> SpiTupleTable<'conn> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        let stmt = match plans.entry(sql.to_string()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let oids: Vec<pgrx::pg_sys::PgOid> = args.iter().map(|a| pgrx::pg_sys::PgOid::from(a.oid())).collect();
                let prepared = client.prepare_mut(sql, &oids).unwrap_or_else(|e| spi_failed(e)).keep();
                v.insert(prepared)
            }
        };
        client.update(&*stmt, limit.map(|l| l as _), args).unwrap_or_else(|e| spi_failed(e))
    })
}

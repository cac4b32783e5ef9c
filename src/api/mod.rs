//! The SQL surface (`#[pg_extern]` functions in schema `email`). Everything here runs in the
//! caller's backend, inside the caller's transaction, and never touches the network: it
//! validates, then inserts through SPI with user values passed as arguments.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::message::FieldError;

pub mod admin;
#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;
pub mod send;
pub mod templates;
pub mod transports;

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
    // SAFETY: GetOuterUserId only reads backend state; GetUserNameFromId with noerr = false
    // returns a palloc'd NUL-terminated name (or raises an ERROR, which pg_guard turns into a
    // Rust panic that propagates as that ERROR), which is copied before use.
    unsafe {
        let oid = pg_sys::GetOuterUserId();
        let name = pg_sys::GetUserNameFromId(oid, false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

thread_local! {
    /// Plans of this backend's hot statements, prepared once (SPI_keepplan) and re-planned by
    /// Postgres itself when the tables they use change. Shared out as `Rc`s: no borrow of this
    /// map is held while a statement runs, because a statement may fire a user trigger that
    /// calls `email.send` again.
    static PLANS: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Runs `sql` through a plan prepared on first use; argument types come from `args`.
pub(crate) fn run_prepared<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    limit: Option<i64>,
    args: &[DatumWithOid],
) -> SpiTupleTable<'conn> {
    let plan = match PLANS.with(|plans| plans.borrow().get(sql).cloned()) {
        Some(plan) => plan,
        None => {
            let oids: Vec<pg_sys::PgOid> = args.iter().map(|a| pg_sys::PgOid::from(a.oid())).collect();
            let plan = Rc::new(client.prepare_mut(sql, &oids).unwrap_or_else(|e| spi_failed(e)).keep());
            PLANS.with(|plans| plans.borrow_mut().insert(sql, plan.clone()));
            plan
        }
    };
    client.update(&*plan, limit.map(|l| l as _), args).unwrap_or_else(|e| spi_failed(e))
}

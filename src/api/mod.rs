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

use crate::message::{show, FieldError};

pub mod admin;
mod citus;
pub mod dkim;
pub mod events;
mod insert;
#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;
mod probe;
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

/// The name of the database this backend is connected to.
pub(crate) fn current_database() -> String {
    // SAFETY: MyDatabaseId is set once a backend is connected; get_database_name returns a
    // palloc'd copy of the name (or NULL if the database was dropped), copied before use.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Why no worker serves `database`, or None when one does.
pub(crate) fn unserved_reason(database: &str) -> Option<String> {
    if crate::gucs::workers() <= 0 {
        return Some("no worker: pg_email.workers is 0".into());
    }
    let served = crate::gucs::database();
    (served != database).then(|| format!("no worker serves this database (pg_email.database is {})", show(&served)))
}

thread_local! {
    /// Whether this session found the database's schema at this library's version.
    static SCHEMA_CHECKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Refuses to queue mail while the database's schema is at another version than this library
/// (a new build installed and the server restarted, before ALTER EXTENSION pg_email UPDATE): the
/// statements would fail on the old tables with an internal-looking error. Checked once per
/// session, until it passes.
pub(crate) fn require_current_schema() {
    if SCHEMA_CHECKED.with(|c| c.get()) {
        return;
    }
    const LIBRARY: &str = env!("CARGO_PKG_VERSION");
    let installed = Spi::get_one::<String>(include_str!("../../sql/api/extension_version.sql"))
        .unwrap_or_else(|e| spi_failed(e))
        .unwrap_or_default();
    if installed != LIBRARY {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("pg_email {LIBRARY} is loaded, but this database has pg_email {installed}"),
            Some("Run ALTER EXTENSION pg_email UPDATE in this database."),
        );
    }
    SCHEMA_CHECKED.with(|c| c.set(true));
}

thread_local! {
    /// Whether this session was already warned that no worker serves its database.
    static WARNED_UNSERVED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Warns, once per session (or every time when `always`), that mail queued in this database
/// will not be sent because no worker serves it.
pub(crate) fn warn_if_unserved(always: bool) {
    if !always && WARNED_UNSERVED.with(|w| w.get()) {
        return;
    }
    WARNED_UNSERVED.with(|w| w.set(true));
    let here = current_database();
    if let Some(why) = unserved_reason(&here) {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("mail queued in database {} will not be sent: {why}", show(&here)),
            "pg_email",
        )
        .set_hint(format!(
            "Set pg_email.database = {} (and pg_email.workers > 0) in postgresql.conf and restart PostgreSQL.",
            show(&here)
        ))
        .report(PgLogLevel::WARNING);
    }
}

thread_local! {
    /// Plans of this backend's hot statements, prepared once (SPI_keepplan) and re-planned by
    /// Postgres itself when the tables they use change. Shared out as `Rc`s: no borrow of this
    /// map is held while a statement runs, because a statement may fire a user trigger that
    /// calls `email.send` again.
    static PLANS: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Runs `work` with the GUC `settings` made at a new nest level and, with `owner`, as that role
/// (the switch PostgreSQL's RI triggers make), then switches back; an ERROR meanwhile is cleaned
/// up by the (sub)transaction's abort, which restores both.
pub(crate) fn switched<R>(owner: Option<pg_sys::Oid>, settings: &[(&CStr, &CStr)], work: impl FnOnce() -> R) -> R {
    struct Restore {
        user: pg_sys::Oid,
        context: i32,
        nest: i32,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            if std::thread::panicking() {
                return;
            }
            // SAFETY: restores what `switched` saved, on the same thread, in the same
            // transaction; AtEOXact_GUC pops exactly the nest level NewGUCNestLevel made.
            unsafe {
                pg_sys::AtEOXact_GUC(true, self.nest);
                pg_sys::SetUserIdAndSecContext(self.user, self.context);
            }
        }
    }
    // SAFETY: main thread, inside a transaction: the user switch is SECURITY_LOCAL_USERID_CHANGE,
    // and the settings are made at a new GUC nest level, as a function's SET clause would be;
    // both are undone by `Restore` or by the abort.
    let _restore = unsafe {
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        if let Some(owner) = owner {
            pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        }
        let nest = pg_sys::NewGUCNestLevel();
        let restore = Restore { user, context, nest };
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        restore
    };
    work()
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

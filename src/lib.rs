//! pg_email: PostgreSQL as an email platform.
//!
//! `_PG_init` runs in the postmaster (the library must be in `shared_preload_libraries`): it
//! defines the settings, reserves shared memory and registers the delivery workers.
//!
//! What runs where:
//! - `api/` — the SQL surface, in ordinary backends, inside the caller's transaction;
//! - `worker/` — the delivery worker, in its own background processes;
//! - `shmem`, `xact`, `catalog`, `subxact`, `gucs` — Postgres glue both sides use (shared
//!   memory, the per-backend transaction callback, the template catalog, subtransactions,
//!   settings); `api/` and `worker/`
//!   depend on these and never on each other;
//! - `deliver/`, `message`, `draft`, `render` — no pgrx: plain Rust with plain unit tests.

#![deny(ffi_unwind_calls)]

use pgrx::prelude::*;

pub mod api;
pub mod bgw;
pub mod catalog;
pub mod dashboard;
pub mod datetime;
pub mod deliver;
pub mod dkim;
pub mod draft;
pub mod gucs;
pub mod inbound;
pub mod listener;
pub mod message;
pub mod outbound;
pub mod render;
pub mod reply;
pub mod sendapi;
pub mod shmem;
pub mod submission;
pub mod subxact;
pub mod tracking;
pub mod webhook;
pub mod worker;
pub mod xact;

#[cfg(test)]
mod hostile_tests;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[allow(non_snake_case)]
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain global flag Postgres sets while it loads shared_preload_libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_email must be loaded at server start through shared_preload_libraries",
            "Add pg_email to shared_preload_libraries in postgresql.conf (for example \
             shared_preload_libraries = 'pg_email'), set pg_email.database to the database \
             that holds the extension, restart PostgreSQL, then run CREATE EXTENSION pg_email."
        );
    }
    gucs::init();
    shmem::init();
    api::init();
    worker::init();
    listener::init();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_email'",
            "pg_email.database = 'pgrx_tests'",
            "pg_email.max_recipients = 50",
        ]
    }
}

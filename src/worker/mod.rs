//! The delivery worker. `init` runs in the postmaster from `_PG_init`: it reserves shared memory
//! and registers `pg_email.workers` background workers. Each worker process owns one
//! current-thread tokio runtime; its main thread alone talks to Postgres.

pub mod wake;

use pgrx::prelude::*;
use pgrx::pg_shmem_init;
use wake::SHARED;

/// Called from `_PG_init`.
pub fn init() {
    pg_shmem_init!(SHARED);
}

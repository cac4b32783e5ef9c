//! Subtransactions: run a piece of work so that an ERROR raised inside it (by a user's trigger,
//! say) rolls back only that piece and comes back as a value, while the enclosing transaction
//! goes on. Runs on the calling process's main thread, inside an open transaction; the worker
//! uses it to record outcomes whatever triggers users put on its tables.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Runs `work` in a subtransaction. Ok: the subtransaction is committed into the enclosing
/// transaction. Err: it was rolled back, and the error's message is returned.
pub fn run<R>(work: impl FnOnce() -> R) -> Result<R, String> {
    run_coded(work).map_err(|(_, message)| message)
}

/// As `run`, with the error's SQLSTATE (five characters) beside its message.
pub fn run_coded<R>(work: impl FnOnce() -> R) -> Result<R, (String, String)> {
    // An ERROR leaves nothing of `work` behind to observe: everything it wrote to the database
    // is rolled back, and the caller gets only the message.
    let work = std::panic::AssertUnwindSafe(work);
    // SAFETY: called on the main thread inside a transaction. The memory context and resource
    // owner are saved before the subtransaction starts and restored after it ends either way,
    // as PL/pgSQL's exception blocks do; an ERROR inside `work` reaches the catch arm as a Rust
    // panic (pg_guard), after which the subtransaction is rolled back before anything else runs.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        let restore = move || {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        };
        PgTryBuilder::new(|| {
            let r = work();
            pg_sys::ReleaseCurrentSubTransaction();
            restore();
            Ok(r)
        })
        .catch_others(|cause| {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            restore();
            Err(code_and_message(&cause))
        })
        .execute()
    }
}

fn code_and_message(cause: &pg_sys::panic::CaughtError) -> (String, String) {
    use pg_sys::panic::CaughtError;
    match cause {
        CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) | CaughtError::RustPanic { ereport: e, .. } => {
            (sqlstate(e.sql_error_code() as i32), e.message().to_string())
        }
    }
}

/// The five characters of a packed SQLSTATE.
fn sqlstate(code: i32) -> String {
    // Postgres packs each of the five characters into six bits, the first in the lowest.
    (0..5).map(|i| char::from(b'0' + ((code >> (6 * i)) & 0x3f) as u8)).collect()
}

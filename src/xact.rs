//! This backend's per-transaction flags and the one transaction callback that acts on them at
//! commit or abort. Runs in ordinary backends (the SQL API). The callback is registered once per
//! process, on first use: `RegisterXactCallback` is permanent, and one registration per
//! transaction would pile up (pg_net's fault).
//!
//! The flags:
//! - mail (or webhook deliveries) was queued: at commit the workers are woken (shared-memory
//!   flags and latch), at abort nothing;
//! - configuration changed (transports, suppressions): the shared generation is bumped again
//!   when the transaction ends, so a cache filled before the change became visible is dropped;
//! - a secret is being handled (`add_transport`): an ERROR raised meanwhile hides its statement
//!   from the server log; the flag is cleared at transaction end in any case.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem;

static QUEUED_IN_XACT: AtomicBool = AtomicBool::new(false);
static HOOKS_QUEUED_IN_XACT: AtomicBool = AtomicBool::new(false);
static CONFIG_CHANGED_IN_XACT: AtomicBool = AtomicBool::new(false);
static HANDLING_SECRET: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Remembers that this transaction queued mail: the workers are woken when it commits.
pub fn mark_queued() {
    QUEUED_IN_XACT.store(true, Ordering::Relaxed);
    ensure_callback();
}

/// Remembers that this transaction queued webhook deliveries: the workers are woken to claim them
/// when it commits (apart from mail, so queued mail does not make them look for deliveries).
pub fn mark_hooks_queued() {
    HOOKS_QUEUED_IN_XACT.store(true, Ordering::Relaxed);
    ensure_callback();
}

/// Remembers that this transaction changed transports or suppressions, and bumps the shared
/// generation now (this backend's own caches must see the change at once).
pub fn config_changed() {
    shmem::bump_config_generation();
    CONFIG_CHANGED_IN_XACT.store(true, Ordering::Relaxed);
    ensure_callback();
}

/// Marks the start (`true`) or the end (`false`) of code that holds a secret in its arguments.
pub fn handling_secret(on: bool) {
    if on {
        ensure_callback();
    }
    HANDLING_SECRET.store(on, Ordering::Relaxed);
}

/// True once if a secret is being handled: the caller (the log hook) hides the statement.
pub fn take_handling_secret() -> bool {
    HANDLING_SECRET.swap(false, Ordering::Relaxed)
}

fn ensure_callback() {
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        // SAFETY: `on_xact_event` is a `pg_guard`ed `extern "C-unwind"` function with the
        // signature Postgres expects; it ignores its argument, so a null pointer is fine.
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    let committed = match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => true,
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => false,
        _ => return,
    };
    HANDLING_SECRET.store(false, Ordering::Relaxed);
    if CONFIG_CHANGED_IN_XACT.swap(false, Ordering::Relaxed) {
        shmem::bump_config_generation();
    }
    let mail = QUEUED_IN_XACT.swap(false, Ordering::Relaxed);
    let hooks = HOOKS_QUEUED_IN_XACT.swap(false, Ordering::Relaxed);
    if committed && (mail || hooks) {
        shmem::wake_workers(mail, hooks, !crate::gucs::paused());
    }
}

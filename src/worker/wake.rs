//! Commit-time wake-up and the workers' shared state. Backends call `mark_queued` from
//! `email.send*`; a transaction callback, registered once per backend process, sets the workers'
//! latches when that transaction commits and does nothing when it aborts. Workers publish their
//! latch and counters in shared memory, which `email.worker_status()` reads.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic};

/// Most worker processes `pg_email.workers` can start.
pub const MAX_WORKERS: usize = 32;

/// One worker's public face.
#[derive(Default)]
pub struct Slot {
    pub pid: AtomicI32,
    /// `*mut pg_sys::Latch` of the worker process, 0 when none.
    pub latch: AtomicUsize,
    pub state: AtomicU32,
    pub in_flight: AtomicU32,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    /// `TimestampTz` of the last claim or completion.
    pub last_activity: AtomicI64,
    pub started_at: AtomicI64,
}

/// One rate-limited transport's schedule, shared by every worker.
#[derive(Default)]
pub struct RateSlot {
    /// Hash of the transport name and its rate; 0 when free.
    pub key: AtomicU64,
    /// Next free instant, CLOCK_MONOTONIC nanoseconds.
    pub next: AtomicU64,
}

pub const RATE_SLOTS: usize = 32;

#[derive(Default)]
pub struct Shared {
    /// Set by a committing backend, cleared by the worker that claims.
    pub pending: AtomicBool,
    pub slots: [Slot; MAX_WORKERS],
    pub rates: [RateSlot; RATE_SLOTS],
    /// Bumped whenever email.transports or email.suppressions change (and again when that
    /// transaction ends), so backends can cache what they read from them.
    pub config_generation: AtomicU64,
}

static CONFIG_CHANGED_IN_XACT: AtomicBool = AtomicBool::new(false);

/// The current configuration generation (0 without shared memory: caching is then off).
pub fn config_generation() -> u64 {
    shared().map_or(0, |s| s.config_generation.load(Ordering::Acquire))
}

/// Called by the statement triggers on transports and suppressions.
pub fn config_changed() {
    if let Some(s) = shared() {
        s.config_generation.fetch_add(1, Ordering::AcqRel);
    }
    CONFIG_CHANGED_IN_XACT.store(true, Ordering::Relaxed);
    ensure_callback();
}

/// The shared schedule for `key`, claiming a free slot on first use.
pub fn rate_slot(key: u64) -> Option<&'static AtomicU64> {
    let key = key | 1;
    let shared = shared()?;
    for i in 0..RATE_SLOTS {
        let s = &shared.rates[(key as usize + i) % RATE_SLOTS];
        let k = s.key.load(Ordering::Acquire);
        if k == key {
            return Some(&s.next);
        }
        if k == 0 && s.key.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire).map_or_else(|v| v == key, |_| true) {
            return Some(&s.next);
        }
    }
    None
}

unsafe impl PGRXSharedMemory for Shared {}

pub static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"pg_email_shared") };

/// Worker states as shown by `email.worker_status()`.
pub const STATES: [&str; 5] = ["stopped", "starting", "idle", "sending", "waiting for database"];

/// The shared block, when shared memory is set up (always in a preloaded server).
pub fn shared() -> Option<&'static Shared> {
    std::panic::catch_unwind(|| SHARED.get()).ok()
}

static QUEUED_IN_XACT: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Remembers that this transaction queued mail, registering the callback on first use.
pub fn mark_queued() {
    QUEUED_IN_XACT.store(true, Ordering::Relaxed);
    ensure_callback();
}

/// Registers the transaction callback the first time this process needs it, and never again:
/// a callback per transaction would pile up (RegisterXactCallback is permanent).
pub fn ensure_callback() {
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            crate::api::transports::reset_secret_flag();
            bump_if_changed();
            if QUEUED_IN_XACT.swap(false, Ordering::Relaxed) {
                wake_workers();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            crate::api::transports::reset_secret_flag();
            bump_if_changed();
            QUEUED_IN_XACT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// A second bump when the changing transaction ends: a backend that cached what it read before
/// the change became visible sees a new generation afterwards.
fn bump_if_changed() {
    if CONFIG_CHANGED_IN_XACT.swap(false, Ordering::Relaxed) {
        if let Some(s) = shared() {
            s.config_generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Sets the pending flag and every live worker's latch.
pub fn wake_workers() {
    let Some(shared) = shared() else { return };
    shared.pending.store(true, Ordering::Release);
    for slot in &shared.slots {
        let latch = slot.latch.load(Ordering::Acquire);
        if latch != 0 {
            unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
        }
    }
}

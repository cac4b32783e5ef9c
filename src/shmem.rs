//! The shared-memory block every pg_email process sees: each worker's public face (pid, latch,
//! state, counters), the rate-limit schedules shared by all workers, the configuration
//! generation and the "mail is pending" flag. `init` runs in the postmaster from `_PG_init`;
//! backends and workers only read and update atomics here, never anything that needs a lock.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use pgrx::pg_shmem_init;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic};

/// Most worker processes `pg_email.workers` can start.
pub const MAX_WORKERS: usize = 32;

/// Rate-limited transports whose schedule can be shared at once.
pub const RATE_SLOTS: usize = 32;

/// What a worker is doing, as `email.worker_status()` shows it.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Stopped = 0,
    Starting = 1,
    Idle = 2,
    Sending = 3,
    WaitingForDatabase = 4,
    Stopping = 5,
    Paused = 6,
    Listening = 7,
}

impl WorkerState {
    const ALL: [WorkerState; 8] = [
        WorkerState::Stopped,
        WorkerState::Starting,
        WorkerState::Idle,
        WorkerState::Sending,
        WorkerState::WaitingForDatabase,
        WorkerState::Stopping,
        WorkerState::Paused,
        WorkerState::Listening,
    ];

    pub fn from_u32(v: u32) -> Option<WorkerState> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Stopped => "stopped",
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Sending => "sending",
            WorkerState::WaitingForDatabase => "waiting for database",
            WorkerState::Stopping => "stopping",
            WorkerState::Paused => "paused",
            WorkerState::Listening => "listening",
        }
    }
}

/// One worker's public face.
#[derive(Default)]
pub struct Slot {
    pub pid: AtomicI32,
    /// `*mut pg_sys::Latch` of the worker process, 0 when none.
    pub latch: AtomicUsize,
    /// A `WorkerState` as u32.
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

impl Slot {
    pub fn state(&self) -> Option<WorkerState> {
        WorkerState::from_u32(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, s: WorkerState) {
        self.state.store(s as u32, Ordering::Relaxed);
    }
}

/// One rate-limited transport's schedule, shared by every worker.
#[derive(Default)]
pub struct RateSlot {
    /// Hash of the transport name and its rate; 0 when free.
    pub key: AtomicU64,
    /// Next free instant, CLOCK_MONOTONIC nanoseconds.
    pub next: AtomicU64,
}

#[derive(Default)]
pub struct Shared {
    /// Set by a committing backend, cleared by the worker that claims.
    pub pending: AtomicBool,
    /// Webhook deliveries were queued (set with `pending`'s latch): the workers claim them.
    pub hooks_pending: AtomicBool,
    pub slots: [Slot; MAX_WORKERS],
    /// The listener worker: `sent` counts events stored, `failed` requests refused (4xx),
    /// `deferred` requests answered 503, `in_flight` open connections.
    pub listener: Slot,
    pub rates: [RateSlot; RATE_SLOTS],
    /// Bumped whenever email.transports or email.suppressions change (and again when that
    /// transaction ends), so backends and workers can cache what they read from them.
    pub config_generation: AtomicU64,
}

// SAFETY: `Shared` holds only atomics (no pointers into process memory, no heap), so it is
// valid in shared memory and safe to use from every process at once.
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: the name is a static, NUL-terminated C string unique to pg_email; the block is
// allocated by `init` in the postmaster before any process reads it.
pub static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"pg_email_shared") };

/// Reserves the block; called from `_PG_init` in the postmaster.
pub fn init() {
    pg_shmem_init!(SHARED);
}

/// The shared block, when shared memory is set up (always in a preloaded server).
pub fn shared() -> Option<&'static Shared> {
    std::panic::catch_unwind(|| SHARED.get()).ok()
}

/// The shared face of worker `i`.
pub fn slot(i: i32) -> Option<&'static Slot> {
    shared().and_then(|s| s.slots.get(usize::try_from(i).ok()?))
}

/// The current configuration generation (0 without shared memory: caching is then off).
pub fn config_generation() -> u64 {
    shared().map_or(0, |s| s.config_generation.load(Ordering::Acquire))
}

/// Tells every cache keyed on the generation to read again.
pub fn bump_config_generation() {
    if let Some(s) = shared() {
        s.config_generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The shared schedule for `key`, claiming a free slot on first use.
pub fn rate_slot(key: u64) -> Option<&'static AtomicU64> {
    let key = key | 1;
    let shared = shared()?;
    for i in 0..RATE_SLOTS {
        let s = &shared.rates[(key as usize).wrapping_add(i) % RATE_SLOTS];
        let k = s.key.load(Ordering::Acquire);
        if k == key {
            return Some(&s.next);
        }
        if k == 0
            && s.key.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire).map_or_else(|v| v == key, |_| true)
        {
            return Some(&s.next);
        }
    }
    None
}

/// Sets the pending flags (mail, webhook deliveries) and every live worker's latch (for mail
/// only when `claim_mail`: not while pg_email.paused is on).
pub fn wake_workers(mail: bool, hooks: bool, claim_mail: bool) {
    let Some(shared) = shared() else { return };
    if mail {
        shared.pending.store(true, Ordering::Release);
    }
    if hooks {
        shared.hooks_pending.store(true, Ordering::Release);
    }
    // Paused workers claim no mail: only webhook deliveries are worth waking them for (the
    // flag above is seen at their next tick or wake-up).
    if !hooks && !claim_mail {
        return;
    }
    for slot in &shared.slots {
        let latch = slot.latch.load(Ordering::Acquire);
        if latch != 0 {
            // SAFETY: a worker publishes its own `MyLatch` (a latch in shared memory that lives as
            // long as the process slot) and clears it before it exits; SetLatch on a latch whose
            // owner just exited is harmless (it only sets a flag and signals a stale pid).
            unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
        }
    }
}

//! What both kinds of background worker (delivery and listener) share: the signal mask around
//! their runtimes, and the current time in Postgres' form. Runs on a worker's main thread (and
//! `block_signals` on each runtime thread as it starts).

use pgrx::pg_sys;

/// Blocks every signal on the calling thread; used on runtime threads and around `block_on`, so
/// that Postgres' handlers only ever run on the main thread.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: both sets are plain stack values initialised by sigfillset / pthread_sigmask;
    // pthread_sigmask changes only the calling thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
}

pub fn restore_signals(old: libc::sigset_t) {
    // SAFETY: `old` is a mask returned by pthread_sigmask on this thread.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

pub fn now_ts() -> i64 {
    // SAFETY: GetCurrentTimestamp only reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// The listener's current-thread runtime, driven in slices; its blocking-pool threads (DNS lookups)
/// start with every signal blocked, so Postgres' handlers only run on the main thread.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .on_thread_start(|| {
            block_signals();
        })
        .build()
}

/// The delivery worker's runtime: one I/O thread runs the sends, started with every signal
/// blocked, while the main thread (which alone talks to Postgres) claims and records; the main
/// thread collects finished sends with `block_on`, with its signals blocked meanwhile.
pub fn runtime_with_io_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .max_blocking_threads(2)
        .on_thread_start(|| {
            block_signals();
        })
        .build()
}

//! Request-rate caps (`rate=50/s` in a DSN), with no pgrx: a GCRA schedule in one atomic
//! counter. The worker keeps one counter per rate-limited transport in shared memory, so the cap
//! holds across all worker processes; each send reserves the next free instant and sleeps until
//! then on the worker's runtime.

use std::sync::atomic::{AtomicU64, Ordering};

/// Reserves the next instant in the schedule kept in `cell` (nanoseconds of a clock every
/// process shares); returns how many nanoseconds to wait before sending.
pub fn reserve(cell: &AtomicU64, now: u64, interval: u64) -> u64 {
    let mut cur = cell.load(Ordering::Acquire);
    loop {
        let start = cur.max(now);
        match cell.compare_exchange_weak(cur, start + interval, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return start - now,
            Err(seen) => cur = seen,
        }
    }
}

/// 64-bit FNV-1a: a small, stable hash for keys that must be the same in every process and
/// every release (rate-slot keys, Resend idempotency keys). Not for anything an attacker picks to
/// collide.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_requests_evenly() {
        let cell = AtomicU64::new(0);
        let interval = 50_000_000; // 20/s
        let waits: Vec<u64> = (0..5).map(|_| reserve(&cell, 1_000_000_000, interval)).collect();
        assert_eq!(waits, vec![0, 50_000_000, 100_000_000, 150_000_000, 200_000_000]);
        // after a quiet period the schedule starts again from now, with no burst credit
        assert_eq!(reserve(&cell, 10_000_000_000, interval), 0);
        assert_eq!(reserve(&cell, 10_000_000_000, interval), interval);
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // From the FNV reference test suite (draft-eastlake-fnv, 64-bit FNV-1a).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shared_by_threads() {
        let cell = std::sync::Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = cell.clone();
                std::thread::spawn(move || (0..100).map(|_| reserve(&c, 0, 10)).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort();
        assert_eq!(all, (0..400).map(|i| i * 10).collect::<Vec<_>>());
    }
}

//! API keys of the provider-compatible routes, and the two limiters the listener applies to them.
//! Pure Rust: the listener worker calls these on its main thread's runtime.
//!
//! - A key is made by `email.create_api_key` (SQL): `pge_` + 43 characters of URL-safe base64
//!   (two version 4 UUIDs: 244 random bits), so a stored SHA-256 (no salt, no stretching) is
//!   enough — there is nothing to brute-force offline; `hash` here is the same SHA-256. `email.api_keys` shows `prefix` (the first 12 characters: `pge_` and 8
//!   random ones), which is also how a presented key finds its row; `matches` then compares the
//!   hashes in constant time.
//! - `Limiter`: a key's `rate` (`10/s`, `1000/h`) as a token bucket of `count` tokens refilled at
//!   `count` per `per` (a burst of `count`, then evenly spaced), kept per key name in the one
//!   listener process (so it caps the key across all delivery workers). Written as GCRA: one
//!   instant per key, no floating point.
//! - `FailedAuth`: per client address, 10 wrong keys within a minute (from the first) shut that
//!   address out for the rest of the minute, whatever key it then presents. IPv6 addresses count
//!   per /64 (one host can use a whole /64), IPv4-mapped IPv6 as IPv4. At most 10,000 addresses
//!   are tracked, the oldest dropped first, so a flood from many addresses cannot grow memory.
//!
//! Every clock is injected (`now: Instant`), so the tests are exact.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use ring::digest;

use super::{header, Provider};

/// What every key starts with.
pub const KEY_PREFIX: &str = "pge_";
/// Characters of a key shown in `email.api_keys` and used to find it.
pub const PREFIX_CHARS: usize = 12;

/// The first 12 characters of a key.
pub fn prefix(key: &str) -> String {
    key.chars().take(PREFIX_CHARS).collect()
}

/// SHA-256 of a key, as stored.
pub fn hash(key: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(d.as_ref()) {
        *o = *b;
    }
    out
}

/// Whether `presented` is the key whose hash is `stored`, compared in constant time.
pub fn matches(stored: &[u8], presented: &str) -> bool {
    let h = hash(presented);
    if stored.len() != h.len() {
        return false;
    }
    let diff = stored.iter().zip(h.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// The token of `Authorization: Bearer <token>` (the scheme in any letter case).
pub fn bearer(headers: &[(String, String)]) -> Option<&str> {
    let value = header(headers, "authorization")?.trim();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The key a request presents: Postmark's `X-Postmark-Server-Token`, the others' Bearer token.
pub fn presented_key(provider: Provider, headers: &[(String, String)]) -> Option<&str> {
    match provider {
        Provider::Postmark => header(headers, "x-postmark-server-token").map(str::trim).filter(|t| !t.is_empty()),
        Provider::Resend | Provider::SendGrid => bearer(headers),
    }
}

/// A key's rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match (self.per.as_secs(), self.per.subsec_nanos()) {
            (1, 0) => "s".to_string(),
            (60, 0) => "min".to_string(),
            (3600, 0) => "h".to_string(),
            (86_400, 0) => "day".to_string(),
            _ => format!("{}ms", self.per.as_millis()),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Parses `10/s`, `10/sec`, `600/min`, `1000/h`, `1000/hour`, `50000/day` (also `second(s)`,
/// `m`, `minute(s)`, `hours`, `d`, `days`; any letter case, spaces around the parts).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let form = || {
        format!(
            "rate {} must look like 10/s, 600/min, 1000/h or 50000/day: a whole number of at least 1, a slash, and \
             s, min, h or day",
            super::show(text)
        )
    };
    let (count, unit) = text.split_once('/').ok_or_else(form)?;
    let count: u32 = count.trim().parse().ok().filter(|c| *c >= 1).ok_or_else(form)?;
    let per = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" | "seconds" => 1,
        "m" | "min" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        _ => return Err(form()),
    };
    Ok(Rate { count, per: Duration::from_secs(per) })
}

/// Rounds a wait up to whole seconds, at least one (for `Retry-After`).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0));
    secs.max(1)
}

/// Keys tracked by a `Limiter` before idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

/// Token buckets per key name.
#[derive(Debug, Default)]
pub struct Limiter {
    /// Per key: the theoretical arrival time of the next request (GCRA), and the rate it is for.
    buckets: HashMap<String, (Instant, Rate)>,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter::default()
    }

    /// Takes one token of `name`'s bucket, or says how long until one is free.
    pub fn take(&mut self, name: &str, rate: &Rate, now: Instant) -> Result<(), Duration> {
        let interval = rate.per / rate.count.max(1);
        let tolerance = rate.per.saturating_sub(interval);
        if !self.buckets.contains_key(name) && self.buckets.len() >= MAX_BUCKETS {
            // Buckets that are full again hold nothing a new bucket would not.
            self.buckets.retain(|_, (tat, _)| *tat > now);
        }
        let (tat, stored_rate) = self.buckets.entry(name.to_string()).or_insert((now, *rate));
        *stored_rate = *rate;
        let start = (*tat).max(now);
        let ahead = start.duration_since(now);
        if ahead > tolerance {
            return Err(ahead - tolerance);
        }
        *tat = start.checked_add(interval).unwrap_or(start);
        Ok(())
    }

    /// Keeps the buckets of these key names only (the keys that still exist).
    pub fn retain(&mut self, names: &[String]) {
        let keep: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        self.buckets.retain(|name, _| keep.contains(name.as_str()));
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Wrong keys from one address that shut it out for the rest of the window.
pub const MAX_FAILURES: u32 = 10;
/// The window wrong keys are counted in, from the first.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked.
pub const MAX_ADDRESSES: usize = 10_000;

/// Wrong keys per client address.
#[derive(Debug)]
pub struct FailedAuth {
    /// Per address: when its window started, and the wrong keys in it.
    windows: HashMap<IpAddr, (Instant, u32)>,
    /// Addresses in the order their windows started (entries whose window was restarted since
    /// are stale and skipped), for dropping the oldest.
    order: VecDeque<(IpAddr, Instant)>,
    capacity: usize,
}

impl Default for FailedAuth {
    fn default() -> Self {
        FailedAuth::with_capacity(MAX_ADDRESSES)
    }
}

impl FailedAuth {
    pub fn new() -> FailedAuth {
        FailedAuth::default()
    }

    /// Tracks at most `capacity` addresses (at least one).
    pub fn with_capacity(capacity: usize) -> FailedAuth {
        FailedAuth { windows: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// Whether `ip` may try a key now; if not, how long until it may.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.windows.get(&group(ip)) {
            Some((start, count)) if *count >= MAX_FAILURES => {
                let end = start.checked_add(WINDOW).unwrap_or(*start);
                if now < end {
                    Err(end.duration_since(now))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts a wrong key from `ip`.
    pub fn fail(&mut self, ip: IpAddr, now: Instant) {
        let ip = group(ip);
        if let Some((start, count)) = self.windows.get_mut(&ip) {
            if now.saturating_duration_since(*start) < WINDOW {
                *count = count.saturating_add(1);
                return;
            }
            *start = now;
            *count = 1;
            self.order.push_back((ip, now));
            self.compact();
            return;
        }
        while self.windows.len() >= self.capacity {
            let Some((old, started)) = self.order.pop_front() else {
                break;
            };
            if self.windows.get(&old).is_some_and(|(s, _)| *s == started) {
                self.windows.remove(&old);
            }
        }
        self.windows.insert(ip, (now, 1));
        self.order.push_back((ip, now));
        self.compact();
    }

    /// Drops stale order entries once they outnumber the live ones.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.windows.len() + 16 {
            let windows = &self.windows;
            self.order.retain(|(ip, t)| windows.get(ip).is_some_and(|(s, _)| s == t));
        }
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// The unit wrong keys are counted per: an IPv4 address, or an IPv6 /64.
fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn h(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    #[test]
    fn prefixes_of_any_text() {
        assert_eq!(prefix("pge_abcdefghijkl"), "pge_abcdefgh");
        assert_eq!(prefix("short"), "short");
        assert_eq!(prefix(""), "");
        assert_eq!(prefix("ééééééééééééééé"), "éééééééééééé");
    }

    #[test]
    fn hashes_and_constant_time_matching() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let want = [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03,
            0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
        ];
        assert_eq!(hash("abc"), want);
        let key = "pge_0123456789abcdefghijklmnopqrstuvwxyzABCD";
        let stored = hash(key);
        assert!(matches(&stored, key));
        assert!(!matches(&stored, "pge_0123456789abcdefghijklmnopqrstuvwxyzABCE"));
        assert!(!matches(&stored, ""));
        assert!(!matches(&stored[..31], key));
        assert!(!matches(&[], key));
        let mut longer = stored.to_vec();
        longer.push(0);
        assert!(!matches(&longer, key));
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(&[h("authorization", "Bearer re_123")]), Some("re_123"));
        assert_eq!(bearer(&[h("authorization", "bearer   re_123  ")]), Some("re_123"));
        assert_eq!(bearer(&[h("Authorization", "BEARER\tk")]), Some("k"));
        assert_eq!(bearer(&[h("authorization", "Basic YTpi")]), None);
        assert_eq!(bearer(&[h("authorization", "Bearer")]), None);
        assert_eq!(bearer(&[h("authorization", "Bearer ")]), None);
        assert_eq!(bearer(&[h("authorization", "")]), None);
        assert_eq!(bearer(&[h("x-other", "Bearer k")]), None);
        assert_eq!(bearer(&[]), None);
        assert_eq!(bearer(&[h("authorization", "Bearer a"), h("authorization", "Bearer b")]), Some("a"));
    }

    #[test]
    fn presented_keys() {
        let headers = [h("authorization", "Bearer sg"), h("x-postmark-server-token", " pm ")];
        assert_eq!(presented_key(Provider::Resend, &headers), Some("sg"));
        assert_eq!(presented_key(Provider::SendGrid, &headers), Some("sg"));
        assert_eq!(presented_key(Provider::Postmark, &headers), Some("pm"));
        assert_eq!(presented_key(Provider::Postmark, &[h("authorization", "Bearer x")]), None);
        assert_eq!(presented_key(Provider::Postmark, &[h("x-postmark-server-token", "  ")]), None);
        assert_eq!(presented_key(Provider::Resend, &[h("x-postmark-server-token", "pm")]), None);
    }

    #[test]
    fn rates() {
        let r = |count, secs| Ok(Rate { count, per: Duration::from_secs(secs) });
        for (text, want) in [
            ("10/s", r(10, 1)),
            ("10/sec", r(10, 1)),
            ("1/second", r(1, 1)),
            ("600/min", r(600, 60)),
            ("600/m", r(600, 60)),
            (" 600 / MIN ", r(600, 60)),
            ("1000/h", r(1000, 3600)),
            ("1000/hour", r(1000, 3600)),
            ("50000/day", r(50000, 86_400)),
            ("2/d", r(2, 86_400)),
            ("4294967295/s", r(u32::MAX, 1)),
        ] {
            assert_eq!(parse_rate(text), want, "{text}");
        }
        for bad in ["", "10", "0/s", "-1/s", "1.5/s", "10/week", "10/", "/s", "ten/s", "10/s/s", "4294967296/s"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("must look like 10/s, 600/min, 1000/h or 50000/day"), "{bad}: {e}");
        }
        for text in ["10/s", "600/min", "1000/h", "50000/day"] {
            assert_eq!(parse_rate(text).map(|r| r.to_string()).as_deref(), Ok(text));
        }
        assert_eq!(Rate { count: 3, per: Duration::from_millis(1500) }.to_string(), "3/1500ms");
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }

    #[test]
    fn limiter_allows_a_burst_then_spaces_requests() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let rate = Rate { count: 10, per: Duration::from_secs(1) };
        let mut l = Limiter::new();
        for _ in 0..10 {
            assert_eq!(l.take("a", &rate, at(0)), Ok(()));
        }
        assert_eq!(l.take("a", &rate, at(0)), Err(Duration::from_millis(100)));
        assert_eq!(l.take("a", &rate, at(50)), Err(Duration::from_millis(50)));
        assert_eq!(l.take("a", &rate, at(100)), Ok(()));
        assert_eq!(l.take("a", &rate, at(100)), Err(Duration::from_millis(100)));
        // Another key has its own bucket.
        assert_eq!(l.take("b", &rate, at(100)), Ok(()));
        // After a quiet second the whole burst is back, and no more.
        for _ in 0..10 {
            assert_eq!(l.take("a", &rate, at(5000)), Ok(()));
        }
        assert!(l.take("a", &rate, at(5000)).is_err());
        // A refused request costs nothing.
        assert_eq!(l.take("a", &rate, at(5100)), Ok(()));
    }

    #[test]
    fn limiter_slow_rates_and_changes() {
        let t0 = Instant::now();
        let day = Rate { count: 2, per: Duration::from_secs(86_400) };
        let mut l = Limiter::new();
        assert_eq!(l.take("k", &day, t0), Ok(()));
        assert_eq!(l.take("k", &day, t0), Ok(()));
        assert_eq!(l.take("k", &day, t0), Err(Duration::from_secs(43_200)));
        // The key's rate raised: the new rate applies at once.
        let fast = Rate { count: 1000, per: Duration::from_secs(1) };
        assert_eq!(l.take("k", &fast, t0 + Duration::from_secs(1)), Err(Duration::from_millis(86_398_001)));
        let generous = Rate { count: 1_000_000, per: Duration::from_secs(86_400) };
        assert_eq!(l.take("k", &generous, t0 + Duration::from_secs(1)), Ok(()));
        // A rate of zero or a zero period never panics.
        let odd = Rate { count: 0, per: Duration::ZERO };
        assert_eq!(l.take("z", &odd, t0), Ok(()));
        assert_eq!(l.take("z", &odd, t0), Ok(()));
        let zero = Rate { count: 0, per: Duration::from_secs(1) };
        assert_eq!(l.take("y", &zero, t0), Ok(()));
        assert_eq!(l.take("y", &zero, t0), Err(Duration::from_secs(1)));
    }

    #[test]
    fn limiter_forgets_keys_that_are_gone() {
        let t0 = Instant::now();
        let rate = Rate { count: 1, per: Duration::from_secs(60) };
        let mut l = Limiter::new();
        for name in ["a", "b", "c"] {
            assert_eq!(l.take(name, &rate, t0), Ok(()));
        }
        assert_eq!(l.len(), 3);
        l.retain(&["b".to_string()]);
        assert_eq!(l.len(), 1);
        assert_eq!(l.take("a", &rate, t0), Ok(()));
        assert!(l.take("b", &rate, t0).is_err());
        l.retain(&[]);
        assert!(l.is_empty());
    }

    #[test]
    fn limiter_memory_is_bounded() {
        let t0 = Instant::now();
        let rate = Rate { count: 1, per: Duration::from_millis(10) };
        let mut l = Limiter::new();
        for i in 0..MAX_BUCKETS {
            assert_eq!(l.take(&i.to_string(), &rate, t0), Ok(()));
        }
        assert_eq!(l.len(), MAX_BUCKETS);
        // Once every bucket is full again, a new key drops them.
        assert_eq!(l.take("new", &rate, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn ten_wrong_keys_shut_an_address_out_for_the_rest_of_the_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let ip: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
        let other: IpAddr = Ipv4Addr::new(192, 0, 2, 2).into();
        let mut f = FailedAuth::new();
        for i in 0..9 {
            f.fail(ip, at(i));
            assert_eq!(f.check(ip, at(i)), Ok(()));
        }
        f.fail(ip, at(9));
        assert_eq!(f.check(ip, at(9)), Err(Duration::from_secs(51)));
        assert_eq!(f.check(ip, at(59)), Err(Duration::from_secs(1)));
        assert_eq!(f.check(other, at(9)), Ok(()));
        // The window ends a minute after the first wrong key.
        assert_eq!(f.check(ip, at(60)), Ok(()));
        f.fail(ip, at(60));
        assert_eq!(f.check(ip, at(61)), Ok(()));
        // Wrong keys spread over more than a minute never shut the address out.
        let slow: IpAddr = Ipv4Addr::new(198, 51, 100, 7).into();
        for i in 0..30 {
            f.fail(slow, at(i * 7));
            assert_eq!(f.check(slow, at(i * 7)), Ok(()), "{i}");
        }
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t0 = Instant::now();
        let mut f = FailedAuth::new();
        for i in 0..10u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i));
            f.fail(ip, t0);
        }
        assert!(f.check(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 9, 9, 9, 9)), t0).is_err());
        assert_eq!(f.check(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1)), t0), Ok(()));
        assert_eq!(f.len(), 1);
        let v4: IpAddr = Ipv4Addr::new(203, 0, 113, 9).into();
        for _ in 0..10 {
            f.fail(IpAddr::V6(Ipv4Addr::new(203, 0, 113, 9).to_ipv6_mapped()), t0);
        }
        assert!(f.check(v4, t0).is_err());
    }

    #[test]
    fn failed_auth_memory_is_bounded_and_drops_the_oldest() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut f = FailedAuth::with_capacity(3);
        let ip = |n: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
        for _ in 0..10 {
            f.fail(ip(1), at(0));
        }
        f.fail(ip(2), at(1));
        f.fail(ip(3), at(2));
        assert!(f.check(ip(1), at(3)).is_err());
        f.fail(ip(4), at(3));
        assert_eq!(f.len(), 3);
        // The oldest address was dropped, and with it its refusal.
        assert_eq!(f.check(ip(1), at(3)), Ok(()));
        // A flood of addresses keeps memory at the cap.
        let mut f = FailedAuth::new();
        for i in 0..30_000u32 {
            f.fail(IpAddr::V4(Ipv4Addr::from(i)), at(u64::from(i)));
        }
        assert_eq!(f.len(), MAX_ADDRESSES);
        assert!(f.order.len() <= 2 * MAX_ADDRESSES + 16);
        // One address failing again and again, window after window, keeps its order queue short.
        let mut f = FailedAuth::with_capacity(10);
        for minute in 0..1000u64 {
            f.fail(ip(9), t0 + Duration::from_secs(61 * minute));
        }
        assert_eq!(f.len(), 1);
        assert!(f.order.len() <= 18, "{}", f.order.len());
        assert!(!f.is_empty());
    }
}

//! Outbound webhooks: for each receipt a webhook subscribes to, pg_email POSTs an event to the
//! application's URL, signed as Standard Webhooks (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256>`). This is the core of it, with no Postgres in it:
//!
//! - pure functions, callable anywhere: the `whsec_` secrets, the signature and headers, the JSON
//!   body, the URL policy (which destinations a webhook may reach) and the reading of an answer;
//! - the resolver and the two HTTP clients ([`Clients`]) run on the delivery worker's tokio
//!   runtime.
//!
//! No function here calls Postgres; the caller reads settings and rows on its main thread and
//! passes plain values in.
//!
//! Destinations. A webhook may not reach a loopback, private, link-local or otherwise non-public
//! address (see [`refusal`]) unless `pg_email.webhook_allow_hosts` lists its host (any port) or
//! `host:port`. The check is made on the addresses a name *resolves to*, inside the connection,
//! so a name that resolves to a public address when the webhook is added and to 127.0.0.1 when
//! it is called (DNS rebinding) is refused too. A URL whose host is an IP literal never reaches
//! a resolver, so [`Clients::pick`] checks those first. Redirects are never followed and no
//! proxy is used (a proxy would resolve the name instead of us).

use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use ring::hmac;
use serde::Serialize;
use serde_json::Value;
use url::{Host, Url};

/// What is wrong with a webhook's settings, or why a destination is refused. Messages name the
/// field and say why; they never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A value given to pg_email is not acceptable (`field`: `"secret"`, `"url"` or
    /// `"pg_email.webhook_allow_hosts"`). At the SQL boundary: SQLSTATE 22023.
    #[error("{field} {why}")]
    Invalid { field: &'static str, why: String },
    /// The URL's host is, or resolves only to, addresses webhooks may not reach. At send time:
    /// a failed attempt (the address or the allow list may change before the next one).
    #[error("url host {host} {why}; list it in pg_email.webhook_allow_hosts to allow it")]
    Refused { host: String, why: String },
}

fn invalid(field: &'static str, why: impl Into<String>) -> PolicyError {
    PolicyError::Invalid { field, why: why.into() }
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// The prefix of a Standard Webhooks symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The size of a generated key, in bytes.
const GENERATED_KEY: usize = 32;

/// A webhook's signing key: `whsec_` + base64 of 24 to 64 bytes (the Standard Webhooks rule).
/// `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.key.len())
    }
}

/// Standard base64 that accepts the padding written or left out (the Svix dashboards show both).
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl Secret {
    /// Reads `whsec_<base64>` (spaces around it are ignored). The decoded key must be 24 to 64
    /// bytes. The error never repeats the text.
    pub fn parse(text: &str) -> Result<Secret, PolicyError> {
        const FORM: &str = "must be whsec_ followed by the base64 of 24 to 64 random bytes";
        let Some(b64) = text.trim().strip_prefix(SECRET_PREFIX) else {
            return Err(invalid("secret", FORM));
        };
        let key = LENIENT_BASE64.decode(b64).map_err(|_| invalid("secret", format!("{FORM} (it is not base64)")))?;
        if !(24..=64).contains(&key.len()) {
            return Err(invalid("secret", format!("{FORM}, not {} bytes", key.len())));
        }
        Ok(Secret { key })
    }

    /// A new secret of 32 bytes from the system's random source.
    pub fn generate() -> Result<Secret, ring::error::Unspecified> {
        use ring::rand::SecureRandom;
        let mut key = vec![0u8; GENERATED_KEY];
        ring::rand::SystemRandom::new().fill(&mut key)?;
        Ok(Secret { key })
    }

    /// `whsec_` + standard base64 (padded), the form [`Secret::parse`] reads back.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.key))
    }
}

// ---------------------------------------------------------------------------------------------
// Signing

/// The Standard Webhooks v1 signature of one attempt:
/// `v1,` + base64(HMAC-SHA256(key, "{msg_id}.{timestamp}.{body}")).
pub fn sign(secret: &Secret, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret.key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(msg_id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
}

/// The headers of one attempt: `webhook-id` (`msg_id`, the same on every retry of a delivery),
/// `webhook-timestamp` (`timestamp`, Unix seconds of this attempt), `webhook-signature`,
/// `content-type: application/json` and `user-agent: pg_email/<version>`.
pub fn headers(
    secret: &Secret,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    version: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", msg_id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", sign(secret, msg_id, timestamp, body)),
        ("content-type", "application/json".to_string()),
        ("user-agent", format!("pg_email/{version}")),
    ]
}

// ---------------------------------------------------------------------------------------------
// Payload

/// The most bytes of one free-text field (the server's response, the clicked URL, ...) in a
/// body. Longer texts are cut on a character boundary.
pub const TEXT_CAP: usize = 4096;

/// One receipt, as the body of a webhook reports it. The caller fills it from `email.receipts`
/// and `email.messages`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The receipt's event name (`bounced`, `opened`, ...); the body's type is `email.<event>`.
    pub event: String,
    pub receipt_id: i64,
    pub message_id: i64,
    pub rfc_message_id: Option<String>,
    pub recipient: Option<String>,
    pub transport: Option<String>,
    pub tags: Vec<String>,
    /// The message's metadata; `Value::Null` is written as `{}`.
    pub metadata: Value,
    pub smtp_code: Option<i32>,
    pub enhanced_code: Option<String>,
    pub response: Option<String>,
    pub bounce_type: Option<String>,
    pub url: Option<String>,
    /// When the event happened (the receipt's `at`) in Unix seconds, as
    /// `extract(epoch FROM at)::float8` gives it. The body's `timestamp` has milliseconds.
    pub at: f64,
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    timestamp: String,
    data: Data<'a>,
}

/// The body's `data`, fields in the documented order (serde writes a struct in field order).
#[derive(Serialize)]
struct Data<'a> {
    message_id: i64,
    receipt_id: i64,
    rfc_message_id: Option<&'a str>,
    recipient: Option<&'a str>,
    transport: Option<&'a str>,
    tags: &'a [String],
    metadata: &'a Value,
    smtp_code: Option<i32>,
    enhanced_code: Option<&'a str>,
    response: Option<&'a str>,
    bounce_type: Option<&'a str>,
    url: Option<&'a str>,
}

/// The JSON body of a webhook for `e`:
/// `{"type":"email.<event>","timestamp":"<RFC 3339>","data":{...}}`, absent fields as `null`,
/// keys always in the same order. Free-text fields are cut to [`TEXT_CAP`] bytes; tags and
/// metadata are the application's own and go as they are.
pub fn body(e: &Event) -> Vec<u8> {
    let empty = Value::Object(serde_json::Map::new());
    let envelope = Envelope {
        kind: format!("email.{}", e.event),
        timestamp: crate::datetime::rfc3339(e.at),
        data: Data {
            message_id: e.message_id,
            receipt_id: e.receipt_id,
            rfc_message_id: text(&e.rfc_message_id),
            recipient: text(&e.recipient),
            transport: text(&e.transport),
            tags: &e.tags,
            metadata: if e.metadata.is_null() { &empty } else { &e.metadata },
            smtp_code: e.smtp_code,
            enhanced_code: text(&e.enhanced_code),
            response: text(&e.response),
            bounce_type: text(&e.bounce_type),
            url: text(&e.url),
        },
    };
    // Strings, integers and a serde_json::Value (whose map keys are strings): this cannot fail.
    serde_json::to_vec(&envelope).unwrap_or_default()
}

fn text(t: &Option<String>) -> Option<&str> {
    t.as_deref().map(|t| truncate(t, TEXT_CAP))
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// ---------------------------------------------------------------------------------------------
// URL policy

/// The longest webhook URL, in bytes.
pub const MAX_URL_LEN: usize = 2048;

/// Checks a webhook URL when it is added (and again before each attempt): http or https, a host,
/// no user name or password, at most [`MAX_URL_LEN`] bytes as given and as normalised. Returns
/// the parsed URL. Where it points is checked at send time ([`Clients::pick`] and the resolver).
pub fn check_url(text: &str) -> Result<Url, PolicyError> {
    if text.len() > MAX_URL_LEN {
        return Err(invalid("url", format!("is longer than {MAX_URL_LEN} bytes")));
    }
    let url = Url::parse(text).map_err(|e| invalid("url", format!("is not an absolute URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("url", format!("must use http or https, not {}", url.scheme())));
    }
    if url.host().is_none() {
        return Err(invalid("url", "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("url", "must not contain a user name or password"));
    }
    if url.port() == Some(0) {
        return Err(invalid("url", "must not use port 0"));
    }
    if url.as_str().len() > MAX_URL_LEN {
        return Err(invalid("url", format!("is longer than {MAX_URL_LEN} bytes once normalised")));
    }
    Ok(url)
}

/// Whether webhooks may not reach `ip` (without the allow list). See [`refusal`].
pub fn is_forbidden(ip: IpAddr) -> bool {
    refusal(ip).is_some()
}

/// Why webhooks may not reach `ip`, as one word for messages, or `None` for a public address.
///
/// Refused: unspecified, loopback, private (10/8, 172.16/12, 192.168/16, IPv6 fc00::/7),
/// link-local (169.254/16, fe80::/10), shared/CGNAT (100.64/10), 0/8, IETF protocol
/// assignments (192.0.0/24), benchmarking (198.18/15, 2001:2::/48), documentation (192.0.2/24,
/// 198.51.100/24, 203.0.113/24, 2001:db8::/32, 3fff::/20: no server lives there, so refusing
/// them costs nothing), multicast, 240/4 and broadcast, IPv6 site-local (fec0::/10), Teredo
/// (2001::/32, whose client address is hidden) and every IPv6 address outside global unicast
/// 2000::/3. An IPv6 address that carries an IPv4 address (IPv4-mapped ::ffff:0:0/96,
/// IPv4-compatible ::/96, IPv4-translated ::ffff:0:0:0/96, NAT64 64:ff9b::/96, 6to4 2002::/16)
/// is judged by that IPv4 address.
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => refusal_v4(ip),
        IpAddr::V6(ip) => refusal_v6(ip),
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    match ip.octets() {
        [0, 0, 0, 0] => Some("unspecified"),
        [0, ..] => Some("this-network"),
        [127, ..] => Some("loopback"),
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => Some("private"),
        [100, 64..=127, ..] => Some("shared (CGNAT)"),
        [169, 254, ..] => Some("link-local"),
        [192, 0, 0, _] => Some("reserved"),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Some("documentation"),
        [198, 18..=19, ..] => Some("benchmarking"),
        [224..=239, ..] => Some("multicast"),
        [255, 255, 255, 255] => Some("broadcast"),
        [240..=255, ..] => Some("reserved"),
        _ => None,
    }
}

fn refusal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = embedded_v4(ip) {
        return refusal_v4(v4);
    }
    let s = ip.segments();
    match s[0] {
        0x2000..=0x3fff => {}
        0xfc00..=0xfdff => return Some("private"),
        0xfe80..=0xfebf => return Some("link-local"),
        0xfec0..=0xfeff => return Some("site-local"),
        0xff00..=0xffff => return Some("multicast"),
        _ => return Some("reserved"),
    }
    match (s[0], s[1], s[2]) {
        (0x2001, 0x0db8, _) | (0x3fff, 0x0000..=0x0fff, _) => Some("documentation"),
        (0x2001, 0x0000, _) => Some("Teredo"),
        (0x2001, 0x0002, 0x0000) => Some("benchmarking"),
        _ => None,
    }
}

/// The IPv4 address an IPv6 address carries, for the forms that carry one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(v4(hi, lo)), // IPv4-mapped
        [0, 0, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),      // IPv4-compatible
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(v4(hi, lo)), // IPv4-translated (RFC 2765)
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)), // NAT64 (RFC 6052)
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),            // 6to4 (RFC 3056)
        _ => None,
    }
}

/// `pg_email.webhook_allow_hosts`: the hosts webhooks may reach whatever they resolve to.
/// `host` allows every port, `host:port` one port; IPv6 addresses in brackets (`[::1]:8080`;
/// a bare `::1` allows every port). Host names are compared as URLs normalise them: case,
/// IDNA, IPv4 spellings (`127.1`) and a trailing dot do not matter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<(Host<String>, Option<u16>)>,
}

impl AllowList {
    /// Reads a comma-separated list; empty entries are skipped. An entry that is not a host or
    /// `host:port` is an error naming it.
    pub fn parse(text: &str) -> Result<AllowList, PolicyError> {
        let mut entries = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad =
                || invalid("pg_email.webhook_allow_hosts", format!("entry \"{entry}\" is not a host or host:port"));
            let (host, port) = if entry.contains('*') {
                return Err(bad()); // no wildcards: `*.example.com` would be a host name that never matches
            } else if let Ok(ip) = entry.parse::<Ipv6Addr>() {
                (Host::Ipv6(ip), None)
            } else {
                let (host, port) = match entry.rsplit_once(':') {
                    // `[::1]` alone: the colon is inside the brackets.
                    Some((h, _)) if entry.ends_with(']') && h.starts_with('[') => (entry, None),
                    Some((h, p)) => (h, Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?)),
                    None => (entry, None),
                };
                (normal_host(host).ok_or_else(bad)?, port)
            };
            entries.push((host, port));
        }
        Ok(AllowList { entries })
    }

    /// Whether no host is listed (the default).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `host` (a name, an IPv4 address, an IPv6 address with or without brackets) on
    /// `port` is listed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        normal_host(host).is_some_and(|h| self.allows_host(&h, port))
    }

    /// Whether the URL's host and port (the scheme's default when not written) are listed.
    pub fn allows_url(&self, url: &Url) -> bool {
        match (url.host(), url.port_or_known_default()) {
            (Some(host), Some(port)) => self.allows_host(&without_trailing_dot(host.to_owned()), port),
            _ => false,
        }
    }

    fn allows_host(&self, host: &Host<String>, port: u16) -> bool {
        self.entries.iter().any(|(h, p)| h == host && p.is_none_or(|p| p == port))
    }
}

/// A host as a URL would hold it, for comparisons: `None` when it is not a valid host.
fn normal_host(text: &str) -> Option<Host<String>> {
    let host = match text.parse::<Ipv6Addr>() {
        Ok(ip) => Host::Ipv6(ip),
        Err(_) => Host::parse(text).ok()?,
    };
    Some(without_trailing_dot(host))
}

fn without_trailing_dot(host: Host<String>) -> Host<String> {
    match host {
        Host::Domain(d) if d.len() > 1 && d.ends_with('.') => Host::Domain(d[..d.len() - 1].to_string()),
        h => h,
    }
}

/// Refuses a URL whose host is an IP literal webhooks may not reach, unless the allow list
/// lists it. URLs normalise every IPv4 spelling (`0x7f.1`, `127.1`, `2130706433`,
/// `0177.0.0.1`) to dotted decimal, and reqwest connects to a literal without resolving it, so
/// this is where literals are judged. Host names pass: the resolver judges what they resolve to.
pub fn check_literal_ip(url: &Url, allow: &AllowList) -> Result<(), PolicyError> {
    let ip = match url.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(invalid("url", "must name a host")),
    };
    match refusal(ip) {
        Some(kind) if !allow.allows_url(url) => {
            Err(PolicyError::Refused { host: ip.to_string(), why: format!("is not a public address ({kind})") })
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Resolver and clients (on the delivery worker's tokio runtime)

/// A reqwest resolver that resolves with the system resolver (`tokio::net::lookup_host`) and
/// keeps only the addresses webhooks may reach; a name with none left fails with
/// [`PolicyError::Refused`]. It sees names only, never ports: the allow list is applied by
/// [`Clients::pick`], which sends listed destinations through a client without this resolver.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = resolve_public(&host).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The public addresses `host` resolves to (port 0: the connection sets the URL's port).
pub async fn resolve_public(host: &str) -> Result<Vec<SocketAddr>, Box<dyn StdError + Send + Sync>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
    if addrs.is_empty() {
        return Err(format!("url host {host} has no addresses").into());
    }
    Ok(keep_public(host, addrs)?)
}

/// `addrs` without the ones webhooks may not reach; an error naming them when none is left.
pub fn keep_public(host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, PolicyError> {
    let (public, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.into_iter().partition(|a| !is_forbidden(a.ip()));
    if public.is_empty() {
        let mut listed: Vec<String> = Vec::new();
        for a in &refused {
            let item = format!("{} {}", a.ip(), refusal(a.ip()).unwrap_or("refused"));
            if !listed.contains(&item) {
                listed.push(item);
            }
        }
        let why = format!("resolves only to addresses that are not public ({})", listed.join(", "));
        return Err(PolicyError::Refused { host: host.to_string(), why });
    }
    Ok(public)
}

/// The two HTTP clients of webhook deliveries: `guarded` (with [`PublicResolver`]) for every
/// destination, `trusted` (the system resolver, no filtering) for the hosts and ports the allow
/// list names. Both: no redirects, no proxy, the timeout for the whole request and for
/// connecting, rustls. Build once per worker (on or off its runtime) and reuse: each keeps its
/// connections.
#[derive(Debug, Clone)]
pub struct Clients {
    guarded: reqwest::Client,
    trusted: reqwest::Client,
    allow: AllowList,
}

impl Clients {
    /// Both clients; `timeout` bounds each request from connecting to the last byte of the
    /// answer's body. Fails only when TLS cannot be set up.
    pub fn new(timeout: Duration, allow: AllowList) -> Result<Clients, reqwest::Error> {
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(timeout)
                .connect_timeout(timeout)
                .use_rustls_tls()
        };
        Ok(Clients {
            guarded: builder().dns_resolver(Arc::new(PublicResolver)).build()?,
            trusted: builder().build()?,
            allow,
        })
    }

    /// The client to send `url` with (after [`check_url`]), or why it may not be sent: a
    /// listed destination gets the trusted client, an IP literal is judged here
    /// ([`check_literal_ip`]), any other name gets the guarded client.
    pub fn pick(&self, url: &Url) -> Result<&reqwest::Client, PolicyError> {
        if self.allow.allows_url(url) {
            return Ok(&self.trusted);
        }
        check_literal_ip(url, &self.allow)?;
        Ok(&self.guarded)
    }

    /// The allow list the clients were built with (to rebuild them when the setting changes).
    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }
}

// ---------------------------------------------------------------------------------------------
// Outcome

/// The longest wait a `Retry-After` may ask for.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// What to do with a delivery after an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the delivery is `sent`.
    Sent,
    /// 410 Gone: the delivery fails and the webhook is disabled.
    Disable,
    /// Anything else: a failed attempt, retried with the message backoff up to
    /// `pg_email.max_attempts`. `after` is the wait a 429 or 5xx asked for with `Retry-After`
    /// (at most [`RETRY_AFTER_CAP`]): the next attempt should not come sooner.
    Retry { reason: String, after: Option<Duration> },
}

/// Reads an answer's status and `Retry-After` header.
pub fn classify(status: u16, retry_after: Option<&str>) -> Outcome {
    classify_at(status, retry_after, SystemTime::now())
}

/// [`classify`] at a given time (`now` is needed for a `Retry-After` date).
pub fn classify_at(status: u16, retry_after: Option<&str>, now: SystemTime) -> Outcome {
    let named = match http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(reason) => format!("HTTP {status} {reason}"),
        None => format!("HTTP {status}"),
    };
    match status {
        200..=299 => Outcome::Sent,
        410 => Outcome::Disable,
        300..=399 => Outcome::Retry { reason: format!("{named}: redirects are not followed"), after: None },
        429 | 500..=599 => Outcome::Retry { reason: named, after: retry_after.and_then(|v| parse_retry_after(v, now)) },
        _ => Outcome::Retry { reason: named, after: None },
    }
}

/// A `Retry-After` value (delay-seconds or an HTTP-date in any of the three forms RFC 9110
/// accepts) as a wait from `now`, capped at [`RETRY_AFTER_CAP`]; a date in the past is no wait.
/// `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let secs = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse::<u64>().unwrap_or(u64::MAX)
    } else {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        crate::datetime::http_date(value)?.saturating_sub(now).max(0) as u64
    };
    Some(Duration::from_secs(secs).min(RETRY_AFTER_CAP))
}

/// Why a request got no answer, in a few words for `last_error`: a timeout, a refused or reset
/// connection, a name that does not resolve, a destination the policy refuses, a TLS failure.
/// Never the URL (its query may carry a token) and never a secret.
pub fn describe(err: &reqwest::Error) -> String {
    // reqwest's own message names the URL; its sources do not. The innermost one says most
    // ("failed to lookup address information: ...", "invalid peer certificate: ...").
    let mut innermost = None;
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<PolicyError>() {
            return refused.to_string();
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                ConnectionRefused => return "connection refused".into(),
                ConnectionReset => return "connection reset by the server".into(),
                ConnectionAborted => return "connection aborted".into(),
                TimedOut => return "timed out".into(),
                _ => {}
            }
        }
        innermost = Some(e);
        source = e.source();
    }
    let what = if err.is_timeout() {
        return "timed out".into();
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_body() || err.is_decode() {
        "could not read the answer"
    } else if err.is_builder() {
        "could not build the request"
    } else {
        "request failed"
    };
    match innermost {
        Some(e) => format!("{what}: {e}"),
        None => what.to_string(),
    }
}

/// At most `max` bytes of an answer's body, for the delivery's record; reads no further, so a
/// huge or endless answer costs nothing. Invalid UTF-8 is replaced.
pub async fn excerpt(mut response: reqwest::Response, max: usize) -> String {
    let mut bytes: Vec<u8> = Vec::new();
    while bytes.len() <= max {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk[..chunk.len().min(max + 1 - bytes.len())]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    truncate(&text, max).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // -- Secrets ---------------------------------------------------------------------------

    #[test]
    fn secret_parse_accepts_24_to_64_bytes_padded_or_not() {
        // The Standard Webhooks spec's example secret: 24 bytes, no padding.
        assert_eq!(Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap().key.len(), 24);
        let padded = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let secret = Secret::parse(padded).unwrap();
        assert_eq!(secret.key, (0u8..32).collect::<Vec<u8>>());
        assert_eq!(Secret::parse(padded.trim_end_matches('=')).unwrap(), secret);
        assert_eq!(Secret::parse(&format!("  {padded}\n")).unwrap(), secret);
        assert_eq!(secret.to_text(), padded);
        let longest = format!("whsec_{}", STANDARD.encode([7u8; 64]));
        assert_eq!(Secret::parse(&longest).unwrap().key, vec![7u8; 64]);
    }

    #[test]
    fn secret_parse_refuses_and_never_repeats_the_text() {
        let huge = format!("whsec_{}", "A".repeat(1_000_000));
        let short = format!("whsec_{}", STANDARD.encode([1u8; 23]));
        let long = format!("whsec_{}", STANDARD.encode([1u8; 65]));
        let cases: [(&str, &str); 10] = [
            ("", "secret must be whsec_ followed by the base64 of 24 to 64 random bytes"),
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "secret must be whsec_ followed by the base64 of 24 to 64 random bytes",
            ),
            ("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "secret must be whsec_"),
            ("whsk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "secret must be whsec_"),
            ("whsec_", "random bytes, not 0 bytes"),
            ("whsec_MfKQ9r8G!!!!YqrTwjUPD8ILPZIo2LaLaSw", "random bytes (it is not base64)"),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa_-", "(it is not base64)"),
            (&short, "random bytes, not 23 bytes"),
            (&long, "random bytes, not 65 bytes"),
            (&huge, "random bytes, not 750000 bytes"),
        ];
        for (text, expected) in cases {
            let message = Secret::parse(text).unwrap_err().to_string();
            assert!(message.starts_with(expected) || message.ends_with(expected), "{text:.40}: {message}");
            let material = text.trim_start_matches("whsec_");
            assert!(material.len() < 4 || !message.contains(&material[..4]), "{message}");
        }
    }

    #[test]
    fn secret_generate_gives_32_fresh_bytes_that_round_trip() {
        let (a, b) = (Secret::generate().unwrap(), Secret::generate().unwrap());
        assert_eq!(a.key.len(), 32);
        assert_ne!(a, b);
        let text = a.to_text();
        assert!(text.starts_with("whsec_") && text.len() == 6 + 44, "{text}");
        assert_eq!(Secret::parse(&text).unwrap(), a);
        assert_eq!(format!("{a:?}"), "Secret(32 bytes)");
        assert!(!format!("{a:?}").contains(&text[6..]));
    }

    // -- Signing ---------------------------------------------------------------------------

    /// The body of [`sample`] exactly (checked by `body_is_the_documented_json`).
    const SAMPLE_BODY: &str = r#"{"type":"email.bounced","timestamp":"2024-01-02T03:04:05.123Z","data":{"message_id":7,"receipt_id":42,"rfc_message_id":"<7.1704164645@example.com>","recipient":"ana@example.org","transport":"smtp","tags":["welcome","ü"],"metadata":{"plan":"pro"},"smtp_code":550,"enhanced_code":"5.1.1","response":"550 5.1.1 <ana@example.org>: user unknown","bounce_type":"hard","url":null}}"#;

    fn sample() -> Event {
        Event {
            event: "bounced".into(),
            receipt_id: 42,
            message_id: 7,
            rfc_message_id: Some("<7.1704164645@example.com>".into()),
            recipient: Some("ana@example.org".into()),
            transport: Some("smtp".into()),
            tags: vec!["welcome".into(), "ü".into()],
            metadata: serde_json::json!({"plan": "pro"}),
            smtp_code: Some(550),
            enhanced_code: Some("5.1.1".into()),
            response: Some("550 5.1.1 <ana@example.org>: user unknown".into()),
            bounce_type: Some("hard".into()),
            url: None,
            at: 1_704_164_645.123_456,
        }
    }

    /// Vectors from the reference implementation, PyPI `standardwebhooks` under /usr/bin/python3:
    /// `Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=timezone.utc), body)`. The
    /// first is also the example of the Standard Webhooks spec.
    #[test]
    fn sign_matches_the_standardwebhooks_reference() {
        let vectors: [(&str, &str, i64, &str, &str); 3] = [
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                r#"{"test": 2432232314}"#,
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
            (
                "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                "msg_42",
                1_704_164_700,
                SAMPLE_BODY,
                "v1,ICBxC2ubLd/Cz/0UdfQS46H8l58uH+btqXxZGDXPad4=",
            ),
            (
                "whsec_//79/Pv6+fj39vX08/Lx8O/u7ezr6uno5+bl5OPi4eDf3t3c29rZ2NfW1dTT0tHQz87NzMvKycjHxsXEw8LBwA==",
                "msg_1",
                1,
                "",
                "v1,yQcWkInTpuP9b/4Q4ZP6I7ua9qV+s2BW6p9didPXKDo=",
            ),
        ];
        for (secret, id, ts, body, expected) in vectors {
            assert_eq!(sign(&Secret::parse(secret).unwrap(), id, ts, body.as_bytes()), expected, "{id}");
        }
        // Our own body for the sample event is the one signed in the second vector.
        assert_eq!(body(&sample()), SAMPLE_BODY.as_bytes());
    }

    #[test]
    fn headers_are_the_standard_webhooks_set() {
        let secret = Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        assert_eq!(
            headers(&secret, "msg_42", 1_704_164_700, SAMPLE_BODY.as_bytes(), "0.2.0"),
            vec![
                ("webhook-id", "msg_42".to_string()),
                ("webhook-timestamp", "1704164700".to_string()),
                ("webhook-signature", "v1,ICBxC2ubLd/Cz/0UdfQS46H8l58uH+btqXxZGDXPad4=".to_string()),
                ("content-type", "application/json".to_string()),
                ("user-agent", "pg_email/0.2.0".to_string()),
            ]
        );
        // Another attempt of the same delivery: same id, new timestamp, new signature.
        let retry = headers(&secret, "msg_42", 1_704_164_705, SAMPLE_BODY.as_bytes(), "0.2.0");
        assert_eq!(retry[0].1, "msg_42");
        assert_ne!(retry[2].1, "v1,ICBxC2ubLd/Cz/0UdfQS46H8l58uH+btqXxZGDXPad4=");
    }

    // -- Payload ---------------------------------------------------------------------------

    #[test]
    fn body_is_the_documented_json() {
        assert_eq!(String::from_utf8(body(&sample())).unwrap(), SAMPLE_BODY);
        let bare = Event {
            event: "opened".into(),
            receipt_id: 1,
            message_id: 2,
            rfc_message_id: None,
            recipient: None,
            transport: None,
            tags: vec![],
            metadata: Value::Null,
            smtp_code: None,
            enhanced_code: None,
            response: None,
            bounce_type: None,
            url: None,
            at: 0.0,
        };
        assert_eq!(
            String::from_utf8(body(&bare)).unwrap(),
            r#"{"type":"email.opened","timestamp":"1970-01-01T00:00:00.000Z","data":{"message_id":2,"receipt_id":1,"rfc_message_id":null,"recipient":null,"transport":null,"tags":[],"metadata":{},"smtp_code":null,"enhanced_code":null,"response":null,"bounce_type":null,"url":null}}"#
        );
    }

    #[test]
    fn body_escapes_hostile_text_and_keeps_metadata() {
        let nasty = "a\"b\\c\nd\u{0}e\u{2028}f</script><!--\u{1F600}";
        let metadata = serde_json::json!({"z": 1, "a": {"deep": [null, true, 1.5, "x\"y"]}});
        let e = Event {
            response: Some(nasty.into()),
            url: Some("https://example.com/?a=1&b=<2>".into()),
            tags: vec![nasty.into()],
            metadata: metadata.clone(),
            ..sample()
        };
        let parsed: Value = serde_json::from_slice(&body(&e)).unwrap();
        assert_eq!(parsed["data"]["response"], nasty);
        assert_eq!(parsed["data"]["tags"][0], nasty);
        assert_eq!(parsed["data"]["url"], "https://example.com/?a=1&b=<2>");
        assert_eq!(parsed["data"]["metadata"], metadata);
        assert_eq!(parsed["type"], "email.bounced");
    }

    #[test]
    fn body_caps_huge_free_text_on_a_char_boundary() {
        let e = Event {
            response: Some("€".repeat(1_000_000)), // 3 bytes each: 4096 falls inside one
            url: Some(format!("https://example.com/{}", "x".repeat(10_000_000))),
            rfc_message_id: Some("<".repeat(100_000)),
            enhanced_code: Some("5".repeat(100_000)),
            bounce_type: Some("h".repeat(100_000)),
            recipient: Some("r".repeat(100_000)),
            transport: Some("t".repeat(100_000)),
            ..sample()
        };
        let bytes = body(&e);
        assert!(bytes.len() < 8 * TEXT_CAP + 1024, "{}", bytes.len());
        let parsed: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed["data"]["response"].as_str().unwrap(), "€".repeat(1365)); // 4095 bytes
        assert_eq!(parsed["data"]["url"].as_str().unwrap().len(), TEXT_CAP);
        assert_eq!(parsed["data"]["rfc_message_id"].as_str().unwrap().len(), TEXT_CAP);
        assert_eq!(parsed["data"]["recipient"].as_str().unwrap().len(), TEXT_CAP);
    }

    #[test]
    fn truncate_cuts_on_char_boundaries() {
        assert_eq!(truncate("héllo", 10), "héllo");
        assert_eq!(truncate("héllo", 2), "h"); // é is bytes 1..3
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("😀", 3), "");
        assert_eq!(truncate("", 0), "");
    }

    // -- URL policy ------------------------------------------------------------------------

    #[test]
    fn check_url_accepts_http_and_https_urls() {
        let url = check_url("https://hooks.example.com/pg_email?token=abc#frag").unwrap();
        assert_eq!(url.host_str(), Some("hooks.example.com"));
        assert_eq!(check_url("http://Example.COM:8080/x").unwrap().as_str(), "http://example.com:8080/x");
        assert_eq!(check_url("https://BÜCHER.example/").unwrap().host_str(), Some("xn--bcher-kva.example"));
        assert_eq!(check_url("https://[2606:4700::1111]/").unwrap().host_str(), Some("[2606:4700::1111]"));
        let longest = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN - 20));
        assert_eq!(longest.len(), MAX_URL_LEN);
        assert!(check_url(&longest).is_ok());
    }

    #[test]
    fn check_url_refuses_and_says_why() {
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        // Fits as given, but each space becomes %20 when the URL is normalised.
        let grows = format!("https://example.com/{}.", " ".repeat(1000));
        let cases: [(&str, &str); 16] = [
            ("", "url is not an absolute URL (relative URL without a base)"),
            ("/hooks", "url is not an absolute URL (relative URL without a base)"),
            ("example.com/hooks", "url is not an absolute URL (relative URL without a base)"),
            ("ftp://example.com/", "url must use http or https, not ftp"),
            ("file:///etc/passwd", "url must use http or https, not file"),
            ("javascript:alert(1)", "url must use http or https, not javascript"),
            ("mailto:ops@example.com", "url must use http or https, not mailto"),
            ("gopher://127.0.0.1:25/", "url must use http or https, not gopher"),
            ("http://", "url is not an absolute URL (empty host)"),
            ("http://user:pass@example.com/", "url must not contain a user name or password"),
            ("https://token@example.com/", "url must not contain a user name or password"),
            ("http://example.com:0/", "url must not use port 0"),
            ("http://example.com:65536/", "url is not an absolute URL (invalid port number)"),
            ("http://[fe80::1%25eth0]/", "url is not an absolute URL (invalid IPv6 address)"),
            (&long, "url is longer than 2048 bytes"),
            (&grows, "url is longer than 2048 bytes once normalised"),
        ];
        for (text, expected) in cases {
            assert_eq!(check_url(text).unwrap_err().to_string(), expected, "{text:.60}");
        }
        let err = check_url("http://user:hunter2@example.com/").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    /// Every spelling of a non-public address that the url crate normalises to an IP literal,
    /// and what it becomes: `check_literal_ip` refuses them all.
    #[test]
    fn weird_spellings_of_internal_addresses_are_normalised_and_refused() {
        let cases: [(&str, &str); 26] = [
            ("http://0x7f.1/", "127.0.0.1"),
            ("http://127.1/", "127.0.0.1"),
            ("http://2130706433/", "127.0.0.1"),
            ("http://0x7f000001/", "127.0.0.1"),
            ("http://0177.0.0.1/", "127.0.0.1"),
            ("http://017700000001/", "127.0.0.1"),
            ("http://127.0.0.1./", "127.0.0.1"),
            ("http://%31%32%37.0.0.1/", "127.0.0.1"),
            ("http://①②⑦.0.0.1/", "127.0.0.1"),
            ("http://127.0.0.1:8080/", "127.0.0.1"),
            ("http://0/", "0.0.0.0"),
            ("http://0.0.0.0/", "0.0.0.0"),
            ("http://10.1.2.3/", "10.1.2.3"),
            ("http://0xa9fea9fe/latest/meta-data/", "169.254.169.254"),
            ("http://100.64.0.1/", "100.64.0.1"),
            ("http://255.255.255.255/", "255.255.255.255"),
            ("http://224.0.0.1/", "224.0.0.1"),
            ("http://[::1]/", "[::1]"),
            ("http://[::]/", "[::]"),
            ("http://[::ffff:127.0.0.1]/", "[::ffff:7f00:1]"),
            ("http://[0:0:0:0:0:ffff:7f00:1]/", "[::ffff:7f00:1]"),
            ("http://[::127.0.0.1]/", "[::7f00:1]"),
            ("http://[::ffff:169.254.169.254]/", "[::ffff:a9fe:a9fe]"),
            ("http://[64:ff9b::10.0.0.1]/", "[64:ff9b::a00:1]"),
            ("http://[fd00:ec2::254]/", "[fd00:ec2::254]"),
            ("http://[FE80::1]/", "[fe80::1]"),
        ];
        let none = AllowList::default();
        for (text, host) in cases {
            let url = check_url(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(url.host_str(), Some(host), "{text}");
            let err = check_literal_ip(&url, &none).unwrap_err();
            assert!(matches!(err, PolicyError::Refused { .. }), "{text}: {err}");
        }
        assert_eq!(
            check_literal_ip(&check_url("http://0x7f.1/").unwrap(), &none).unwrap_err().to_string(),
            "url host 127.0.0.1 is not a public address (loopback); list it in pg_email.webhook_allow_hosts \
             to allow it"
        );
        assert_eq!(
            check_literal_ip(&check_url("http://[::ffff:10.0.0.1]/").unwrap(), &none).unwrap_err().to_string(),
            "url host ::ffff:10.0.0.1 is not a public address (private); list it in pg_email.webhook_allow_hosts \
             to allow it"
        );
    }

    #[test]
    fn check_literal_ip_passes_public_literals_names_and_listed_hosts() {
        let none = AllowList::default();
        for text in [
            "http://93.184.216.34/",
            "https://[2606:4700:4700::1111]/",
            "http://[::ffff:8.8.8.8]/",
            "http://localhost/",
            "http://internal.example/",
        ] {
            assert_eq!(check_literal_ip(&check_url(text).unwrap(), &none), Ok(()), "{text}");
        }
        let allow = AllowList::parse("127.0.0.1:8080, [::1]").unwrap();
        assert_eq!(check_literal_ip(&check_url("http://127.1:8080/").unwrap(), &allow), Ok(()));
        assert!(check_literal_ip(&check_url("http://127.0.0.1/").unwrap(), &allow).is_err());
        assert_eq!(check_literal_ip(&check_url("https://[::1]:9/").unwrap(), &allow), Ok(()));
        // A listed address in another spelling of IPv6 is another address.
        assert!(check_literal_ip(&check_url("http://[::ffff:127.0.0.1]:8080/").unwrap(), &allow).is_err());
    }

    #[test]
    fn is_forbidden_knows_the_non_public_ranges() {
        let refused: [(&str, &str); 47] = [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this-network"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("10.0.0.0", "private"),
            ("10.255.255.255", "private"),
            ("172.16.0.0", "private"),
            ("172.31.255.255", "private"),
            ("192.168.0.1", "private"),
            ("100.64.0.0", "shared (CGNAT)"),
            ("100.127.255.255", "shared (CGNAT)"),
            ("169.254.169.254", "link-local"),
            ("192.0.0.8", "reserved"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.1", "documentation"),
            ("203.0.113.1", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.254", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::2", "this-network"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::ffff:192.168.1.1", "private"),
            ("::127.0.0.1", "loopback"),
            ("::ffff:0:10.0.0.1", "private"),
            ("64:ff9b::127.0.0.1", "loopback"),
            ("64:ff9b:1::1", "reserved"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("fc00::1", "private"),
            ("fdff:ffff::1", "private"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("2001::1", "Teredo"),
            ("2001:2::1", "benchmarking"),
            ("100::1", "reserved"),
            ("4000::1", "reserved"),
            ("1::1", "reserved"),
        ];
        for (ip, kind) in refused {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(refusal(ip), Some(kind), "{ip}");
            assert!(is_forbidden(ip));
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "2001:3::1",
        ];
        for ip in public {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(refusal(ip), None, "{ip}");
        }
    }

    #[test]
    fn allow_list_matches_hosts_and_ports() {
        let allow = AllowList::parse("host1, host2:8080, 127.0.0.1").unwrap();
        assert!(allow.allows("host1", 1) && allow.allows("HOST1", 443) && allow.allows("Host1.", 80));
        assert!(allow.allows("host2", 8080) && !allow.allows("host2", 80));
        assert!(allow.allows("127.0.0.1", 5432) && allow.allows("127.1", 80) && allow.allows("0x7f.0.0.1", 80));
        assert!(!allow.allows("localhost", 80) && !allow.allows("host3", 8080) && !allow.allows("127.0.0.2", 80));
        assert!(!allow.allows("", 80) && !allow.allows("host1:80", 80) && !allow.allows("[host1]", 80));

        let v6 = AllowList::parse("[::1]:8080, ::2, [FD00::1]").unwrap();
        assert!(v6.allows("[::1]", 8080) && v6.allows("::1", 8080) && v6.allows("0:0::1", 8080));
        assert!(!v6.allows("::1", 80) && !v6.allows("127.0.0.1", 8080));
        assert!(v6.allows("[::2]", 1) && v6.allows("::2", 65535));
        assert!(v6.allows("fd00::1", 9) && v6.allows("[fd00:0::1]", 9));

        let names = AllowList::parse("Hooks.Example.COM.:443, bücher.example").unwrap();
        assert!(names.allows("hooks.example.com", 443) && names.allows("hooks.example.com.", 443));
        assert!(!names.allows("hooks.example.com", 80) && !names.allows("example.com", 443));
        assert!(names.allows("xn--bcher-kva.example", 80) && names.allows("BÜCHER.example", 80));
        assert!(names.allows_url(&check_url("https://HOOKS.example.com/x").unwrap()));
        assert!(names.allows_url(&check_url("https://hooks.example.com.:443/").unwrap()));
        assert!(!names.allows_url(&check_url("http://hooks.example.com/").unwrap()));

        for empty in ["", " ", " , ,, "] {
            let list = AllowList::parse(empty).unwrap();
            assert!(list.is_empty() && !list.allows("localhost", 80));
        }
    }

    #[test]
    fn allow_list_refuses_entries_that_are_not_hosts() {
        for entry in [
            "host:abc",
            "host:0",
            "host:65536",
            "host:",
            "[::1",
            "[::1]:",
            "[::1]x",
            ":80",
            "a b",
            "host:80:90",
            "http://x",
            "a/b",
            "*.example.com",
            "*",
            "[127.0.0.1]",
            "user@host",
        ] {
            let err = AllowList::parse(&format!("ok.example, {entry}")).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("pg_email.webhook_allow_hosts entry \"{entry}\" is not a host or host:port"),
                "{entry}"
            );
        }
    }

    // -- Resolver --------------------------------------------------------------------------

    #[test]
    fn keep_public_drops_refused_addresses_and_names_them_when_none_is_left() {
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let mixed = vec![addr("127.0.0.1:0"), addr("93.184.216.34:0"), addr("[::1]:0"), addr("[2606:4700::1]:0")];
        assert_eq!(
            keep_public("mixed.example", mixed).unwrap(),
            vec![addr("93.184.216.34:0"), addr("[2606:4700::1]:0")]
        );
        let err = keep_public("rebind.example", vec![addr("127.0.0.1:0"), addr("127.0.0.1:0"), addr("[fd00::1]:0")]);
        assert_eq!(
            err.unwrap_err().to_string(),
            "url host rebind.example resolves only to addresses that are not public (127.0.0.1 loopback, fd00::1 \
             private); list it in pg_email.webhook_allow_hosts to allow it"
        );
    }

    #[tokio::test]
    async fn resolver_refuses_localhost_and_literals() {
        let err = resolve_public("localhost").await.unwrap_err();
        let refused = err.downcast_ref::<PolicyError>().unwrap_or_else(|| panic!("{err}"));
        let message = refused.to_string();
        assert!(
            message.starts_with("url host localhost resolves only to addresses that are not public ("),
            "{message}"
        );
        assert!(message.contains("127.0.0.1 loopback") || message.contains("::1 loopback"), "{message}");
        // getaddrinfo reads literals too (a name that is an address in disguise).
        for literal in ["127.0.0.1", "::1", "10.0.0.1", "0177.0.0.1"] {
            let err = resolve_public(literal).await.unwrap_err();
            assert!(err.downcast_ref::<PolicyError>().is_some(), "{literal}: {err}");
        }
    }

    #[tokio::test]
    async fn resolver_keeps_public_literals() {
        // No network here: a public literal resolves without asking DNS.
        assert_eq!(resolve_public("93.184.216.34").await.unwrap(), vec!["93.184.216.34:0".parse().unwrap()]);
    }

    // -- Clients against a local server ----------------------------------------------------

    /// A server on 127.0.0.1 that answers every request with `reply` (or, when empty, never
    /// answers) and passes on each request it read.
    struct Server {
        port: u16,
        requests: tokio::sync::mpsc::UnboundedReceiver<String>,
    }

    async fn serve(reply: Vec<u8>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let reply = Arc::new(reply);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (tx, reply) = (tx.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n @ 1..) = stream.read(&mut buf).await else { return };
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                                })
                                .and_then(|v| v.parse::<usize>().ok())
                                .unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&request).to_string());
                    if reply.is_empty() {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    let _ = stream.write_all(&reply).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Server { port, requests }
    }

    const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    fn clients(allow: &str) -> Clients {
        Clients::new(Duration::from_secs(10), AllowList::parse(allow).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_unless_listed_with_its_port() {
        let mut server = serve(NO_CONTENT.to_vec()).await;
        let port = server.port;
        let url = check_url(&format!("http://localhost:{port}/hook?token=s3cr3t")).unwrap();

        for allow in ["", &format!("localhost:{}", port.checked_add(1).unwrap_or(1)), "127.0.0.1"] {
            let err = clients(allow).pick(&url).unwrap().post(url.clone()).body("{}").send().await.unwrap_err();
            let reason = describe(&err);
            assert!(
                reason.starts_with("url host localhost resolves only to addresses that are not public ("),
                "{allow}: {reason}"
            );
            assert!(!reason.contains("s3cr3t"), "{reason}");
        }
        assert!(server.requests.try_recv().is_err(), "nothing may arrive");

        // Listed: delivered, signed, and classified.
        let secret = Secret::generate().unwrap();
        let payload = body(&sample());
        let mut request = clients(&format!("LOCALHOST:{port}")).pick(&url).unwrap().post(url.clone());
        for (name, value) in headers(&secret, "msg_42", 1_704_164_700, &payload, "0.2.0") {
            request = request.header(name, value);
        }
        let response = request.body(payload.clone()).send().await.unwrap();
        assert_eq!(classify(response.status().as_u16(), None), Outcome::Sent);
        let got = server.requests.recv().await.unwrap();
        assert!(got.starts_with("POST /hook?token=s3cr3t HTTP/1.1\r\n"), "{got}");
        let signature = sign(&secret, "msg_42", 1_704_164_700, &payload);
        assert!(got.contains(&format!("\r\nwebhook-signature: {signature}\r\n")), "{got}");
        assert!(got.contains("\r\nwebhook-id: msg_42\r\n") && got.contains("\r\nuser-agent: pg_email/0.2.0\r\n"));
        assert!(got.ends_with(SAMPLE_BODY), "{got}");
    }

    #[tokio::test]
    async fn a_literal_is_judged_by_pick_because_it_never_reaches_the_resolver() {
        let mut server = serve(NO_CONTENT.to_vec()).await;
        let port = server.port;
        for text in [format!("http://127.0.0.1:{port}/"), format!("http://0x7f.1:{port}/")] {
            let url = check_url(&text).unwrap();
            let err = clients("").pick(&url).unwrap_err();
            assert!(err.to_string().starts_with("url host 127.0.0.1 is not a public address (loopback)"), "{err}");
        }
        let url = check_url(&format!("http://127.1:{port}/")).unwrap();
        // The guarded client alone would connect: reqwest does not resolve a literal.
        let bypass = clients("").guarded.post(url.clone()).send().await.unwrap();
        assert_eq!(bypass.status().as_u16(), 204);
        assert!(server.requests.recv().await.is_some());
        // Listed with its port: sent.
        let listed = clients(&format!("127.0.0.1:{port}"));
        let response = listed.pick(&url).unwrap().post(url.clone()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 204);
        assert!(server.requests.recv().await.is_some());
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let mut server = serve(
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        )
        .await;
        let url = check_url(&format!("http://127.0.0.1:{}/hook", server.port)).unwrap();
        let clients = clients(&format!("127.0.0.1:{}", server.port));
        let response = clients.pick(&url).unwrap().post(url.clone()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 302);
        assert_eq!(
            classify(302, None),
            Outcome::Retry { reason: "HTTP 302 Found: redirects are not followed".into(), after: None }
        );
        assert!(server.requests.recv().await.unwrap().starts_with("POST /hook "));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(server.requests.try_recv().is_err(), "exactly one request");
    }

    #[tokio::test]
    async fn describe_names_refused_connections_timeouts_and_tls_failures() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = check_url(&format!("http://127.0.0.1:{port}/?key=s3cr3t")).unwrap();
        let err = clients("127.0.0.1").pick(&url).unwrap().post(url.clone()).send().await.unwrap_err();
        assert_eq!(describe(&err), "connection refused");

        let silent = serve(Vec::new()).await;
        let url = check_url(&format!("http://127.0.0.1:{}/?key=s3cr3t", silent.port)).unwrap();
        let quick = Clients::new(Duration::from_millis(300), AllowList::parse("127.0.0.1").unwrap()).unwrap();
        let err = quick.pick(&url).unwrap().post(url.clone()).send().await.unwrap_err();
        assert_eq!(describe(&err), "timed out");

        // https to a server that speaks plain HTTP: a TLS failure, in rustls' words.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = check_url(&format!("https://127.0.0.1:{}/?key=s3cr3t", plain.local_addr().unwrap().port())).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = plain.accept().await.unwrap();
            let _ = stream.write_all(NO_CONTENT).await; // answers the ClientHello in plain HTTP
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = clients("127.0.0.1").pick(&url).unwrap().post(url.clone()).send().await.unwrap_err();
        let reason = describe(&err);
        assert!(reason.starts_with("could not connect: ") && reason.contains("corrupt message"), "{reason}");
        assert!(!reason.contains("s3cr3t") && !reason.contains("127.0.0.1"), "{reason}");
    }

    #[tokio::test]
    async fn excerpt_reads_no_more_than_it_keeps() {
        let mut reply = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3000000\r\n\r\n".to_vec();
        reply.extend_from_slice("€".repeat(1_000_000).as_bytes());
        let server = serve(reply).await;
        let url = check_url(&format!("http://127.0.0.1:{}/", server.port)).unwrap();
        let response = clients("127.0.0.1").pick(&url).unwrap().post(url.clone()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 500);
        assert_eq!(excerpt(response, TEXT_CAP).await, "€".repeat(1365));
    }

    // -- Outcome ---------------------------------------------------------------------------

    /// Sun, 06 Nov 1994 08:49:37 GMT (the example date of RFC 9110).
    fn rfc_now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn classify_reads_the_status() {
        let retry = |reason: &str| Outcome::Retry { reason: reason.into(), after: None };
        let cases: [(u16, Outcome); 14] = [
            (200, Outcome::Sent),
            (201, Outcome::Sent),
            (204, Outcome::Sent),
            (299, Outcome::Sent),
            (410, Outcome::Disable),
            (301, retry("HTTP 301 Moved Permanently: redirects are not followed")),
            (308, retry("HTTP 308 Permanent Redirect: redirects are not followed")),
            (304, retry("HTTP 304 Not Modified: redirects are not followed")),
            (400, retry("HTTP 400 Bad Request")),
            (401, retry("HTTP 401 Unauthorized")),
            (404, retry("HTTP 404 Not Found")),
            (500, retry("HTTP 500 Internal Server Error")),
            (599, retry("HTTP 599")),
            (101, retry("HTTP 101 Switching Protocols")),
        ];
        for (status, expected) in cases {
            assert_eq!(classify_at(status, None, rfc_now()), expected, "{status}");
        }
    }

    #[test]
    fn classify_honours_retry_after_on_429_and_5xx_only() {
        let after = |status, value| match classify_at(status, Some(value), rfc_now()) {
            Outcome::Retry { after, .. } => after,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            classify_at(429, Some("120"), rfc_now()),
            Outcome::Retry { reason: "HTTP 429 Too Many Requests".into(), after: Some(Duration::from_secs(120)) }
        );
        assert_eq!(after(503, "Sun, 06 Nov 1994 08:50:37 GMT"), Some(Duration::from_secs(60)));
        assert_eq!(after(502, "7200"), Some(RETRY_AFTER_CAP));
        assert_eq!(after(404, "120"), None);
        assert_eq!(after(302, "120"), None);
        assert_eq!(classify_at(200, Some("120"), rfc_now()), Outcome::Sent);
    }

    #[test]
    fn retry_after_reads_seconds_and_all_three_date_forms() {
        let secs = |n: u64| Some(Duration::from_secs(n));
        let cases: [(&str, Option<Duration>); 22] = [
            ("120", secs(120)),
            (" 120 ", secs(120)),
            ("0", secs(0)),
            ("3600", secs(3600)),
            ("3601", secs(3600)),
            ("99999999999999999999999999", secs(3600)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", secs(0)),
            ("Sun, 06 Nov 1994 08:50:37 GMT", secs(60)),
            ("Sunday, 06-Nov-94 08:50:37 GMT", secs(60)),
            ("Sun Nov  6 08:50:37 1994", secs(60)),
            ("Mon, 07 Nov 1994 08:49:37 GMT", secs(3600)),
            ("Sat, 05 Nov 1994 08:49:37 GMT", secs(0)),
            ("Thu, 01 Jan 1970 00:00:00 GMT", secs(0)),
            ("-5", None),
            ("1.5", None),
            ("", None),
            ("soon", None),
            ("Sun, 31 Feb 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 24:00:00 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37 UTC", None),
            ("Sun, 06 Foo 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 94 8:49:37 GMT", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_retry_after(value, rfc_now()), expected, "{value:?}");
        }
    }
}

//! Every `pg_email.*` setting: the statics Postgres writes into, one `init()` called from
//! `_PG_init` (in the postmaster, so workers and backends inherit the definitions), and typed
//! accessors. Accessors read plain values and must be called on a Postgres thread (the worker's
//! main thread or a backend); futures get copies, never the statics.

use std::ffi::{CStr, CString};
use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// The one database the worker serves.
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// How many worker processes drain the queue (they share it through SKIP LOCKED).
static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
/// Sender used when neither the call nor the transport names one.
static DEFAULT_SENDER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Sends each worker keeps in flight at once.
static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(64);
/// Rows claimed (and completions written) per short transaction.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(200);
/// Longest the worker sleeps without a commit wake-up, in ms.
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Attempts before a transiently failing message is marked `failed`.
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(30);
/// First retry delay in ms; doubles on every attempt.
static RETRY_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// Longest retry delay in ms.
static RETRY_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
/// How long a claimed row stays `sending` before another worker may take it, in ms.
static LEASE_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
/// Stop claiming new mail (in-flight sends finish).
static PAUSED: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Lets DROP EXTENSION pg_email delete mail that is still queued (read by an event trigger).
static DROP_WITH_QUEUED_MAIL: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Finished messages older than this are purged by the worker, in seconds; 0 keeps them.
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Largest message accepted at enqueue (body, html and attachments), in kB.
static MAX_MESSAGE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(25 * 1024);
/// Most recipients (to + cc + bcc) one message may have.
static MAX_RECIPIENTS: GucSetting<i32> = GucSetting::<i32>::new(50);
/// Template engine fuel: the most instructions one render may execute.
static TEMPLATE_FUEL: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);

/// Where the listener worker accepts HTTP (webhooks, tracking, unsubscribe); empty: no listener.
static LISTEN_ADDRESS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The base URL recipients and providers reach the listener at.
static PUBLIC_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Track opens / clicks of messages whose send call leaves it NULL.
static TRACK_OPENS: GucSetting<bool> = GucSetting::<bool>::new(false);
static TRACK_CLICKS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// NOTIFY email_events once per stored receipt (read by the receipts trigger).
static NOTIFY: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Hosts (or host:port) outbound webhooks may reach although they are loopback or private.
static WEBHOOK_ALLOW_HOSTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Longest one webhook request may take, connecting to the answer's last byte, in ms.
static WEBHOOK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Most deliveries of one webhook a worker has in flight at once.
static WEBHOOK_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(32);
/// The password of GET /dashboard on the listener (HTTP Basic, user admin); empty: no dashboard.
static DASHBOARD_PASSWORD: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The domain of VERP return paths and the List-Unsubscribe mailto address.
static BOUNCE_DOMAIN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Where the listener accepts SMTP/LMTP; empty: no inbound mail service.
static INBOUND_ADDRESS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// host:port of the SMTP submission service (RFC 6409) for applications with an API key.
static SUBMISSION_ADDRESS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// PEM certificate chain and private key of the submission service's STARTTLS.
static SUBMISSION_TLS_CERT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static SUBMISSION_TLS_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// More domains (comma-separated) whose mail the inbound service accepts (replies, say).
static INBOUND_DOMAINS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Registers every setting and reserves the `pg_email.` prefix.
pub fn init() {
    GucRegistry::define_string_guc(
        c"pg_email.database",
        c"Database the pg_email worker serves.",
        c"The worker connects to this one database and drains its email.messages.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_email.workers",
        c"Number of pg_email worker processes.",
        c"Workers share the queue through SKIP LOCKED; 0 disables delivery.",
        &WORKERS,
        0,
        32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.default_sender",
        c"Sender used when neither email.send nor the transport names one.",
        c"",
        &DEFAULT_SENDER,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"pg_email.max_in_flight",
        c"Sends each worker keeps in flight.",
        &MAX_IN_FLIGHT,
        1,
        10_000,
        GucFlags::default(),
    );
    int(
        c"pg_email.batch_size",
        c"Rows claimed or completed per transaction.",
        &BATCH_SIZE,
        1,
        10_000,
        GucFlags::default(),
    );
    int(
        c"pg_email.poll_interval",
        c"Longest sleep between queue checks.",
        &POLL_INTERVAL_MS,
        10,
        i32::MAX,
        GucFlags::UNIT_MS,
    );
    int(
        c"pg_email.max_attempts",
        c"Attempts before a message fails for good.",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucFlags::default(),
    );
    int(
        c"pg_email.retry_base",
        c"First retry delay; doubles per attempt.",
        &RETRY_BASE_MS,
        1,
        i32::MAX,
        GucFlags::UNIT_MS,
    );
    int(c"pg_email.retry_max", c"Longest retry delay.", &RETRY_MAX_MS, 1, i32::MAX, GucFlags::UNIT_MS);
    int(
        c"pg_email.lease",
        c"How long a claimed message stays reserved for its worker.",
        &LEASE_MS,
        1000,
        i32::MAX,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"pg_email.paused",
        c"Stop claiming new mail.",
        c"Sends already in flight finish; queued mail waits.",
        &PAUSED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_email.drop_with_queued_mail",
        c"Let DROP EXTENSION pg_email delete mail that is still queued.",
        c"Off: DROP EXTENSION pg_email is refused while messages are queued or being sent.",
        &DROP_WITH_QUEUED_MAIL,
        GucContext::Userset,
        GucFlags::default(),
    );
    int(
        c"pg_email.retention",
        c"Age after which finished messages are purged; 0 keeps them.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucFlags::UNIT_S,
    );
    suset_int(
        c"pg_email.max_message_size",
        c"Largest message accepted at enqueue.",
        &MAX_MESSAGE_SIZE_KB,
        1,
        i32::MAX,
        GucFlags::UNIT_KB,
    );
    suset_int(
        c"pg_email.max_recipients",
        c"Most recipients (to, cc and bcc) per message.",
        &MAX_RECIPIENTS,
        1,
        100_000,
        GucFlags::default(),
    );
    suset_int(
        c"pg_email.template_fuel",
        c"Most template instructions one render may run.",
        &TEMPLATE_FUEL,
        1000,
        i32::MAX,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.listen_address",
        c"host:port the pg_email listener accepts HTTP on (webhooks, tracking, unsubscribe).",
        c"Empty: no listener. Put a reverse proxy in front of it for TLS.",
        &LISTEN_ADDRESS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.public_url",
        c"Base URL recipients and providers reach the listener at.",
        c"Tracking and unsubscribe links use it; default http://<listen_address>.",
        &PUBLIC_URL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_email.notify",
        c"NOTIFY email_events after commit, once per receipt (its id, message id and event).",
        c"Any role can LISTEN, so the payload holds ids only, never an address.",
        &NOTIFY,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_email.track_opens",
        c"Track opens of messages whose email.send call leaves track_opens NULL.",
        c"",
        &TRACK_OPENS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_email.track_clicks",
        c"Track clicks of messages whose email.send call leaves track_clicks NULL.",
        c"",
        &TRACK_CLICKS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.bounce_domain",
        c"Domain of the VERP return paths (bounce+TOKEN@domain) and the unsubscribe mailto address.",
        c"Empty: the envelope sender is the message's sender. Route this domain's mail to the inbound service.",
        &BOUNCE_DOMAIN,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.inbound_address",
        c"host:port the pg_email listener accepts SMTP and LMTP on (bounces, complaints, replies).",
        c"Empty: no inbound mail service. Put an MTA in front of it.",
        &INBOUND_ADDRESS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.submission_address",
        c"host:port the pg_email listener accepts SMTP submission on (applications with an API key).",
        c"Empty: no submission service. AUTH PLAIN or LOGIN with the key's name and the key; STARTTLS is required first unless the client is on loopback.",
        &SUBMISSION_ADDRESS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.submission_tls_cert",
        c"PEM file with the certificate chain the submission service offers with STARTTLS.",
        c"Empty: no STARTTLS, so only clients on loopback can authenticate.",
        &SUBMISSION_TLS_CERT,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"pg_email.submission_tls_key",
        c"PEM file with the private key of pg_email.submission_tls_cert.",
        c"",
        &SUBMISSION_TLS_KEY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"pg_email.inbound_domains",
        c"More domains (comma-separated) whose mail the inbound service accepts, besides bounce_domain.",
        c"",
        &INBOUND_DOMAINS,
        GucContext::Sighup,
        GucFlags::default(),
    );

    GucRegistry::define_string_guc(
        c"pg_email.webhook_allow_hosts",
        c"Hosts (or host:port, comma-separated) outbound webhooks may reach although they resolve to loopback, private or link-local addresses.",
        c"",
        &WEBHOOK_ALLOW_HOSTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(
        c"pg_email.webhook_timeout",
        c"Longest one outbound webhook request may take, connecting included.",
        &WEBHOOK_TIMEOUT_MS,
        100,
        300_000,
        GucFlags::UNIT_MS,
    );
    int(
        c"pg_email.webhook_concurrency",
        c"Most deliveries of one outbound webhook each worker has in flight at once.",
        &WEBHOOK_CONCURRENCY,
        1,
        1000,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_email.dashboard_password",
        c"The password of GET /dashboard on the listener (HTTP Basic, user admin); empty: no dashboard.",
        c"",
        &DASHBOARD_PASSWORD,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );

    // SAFETY: called once from _PG_init in the postmaster with a static NUL-terminated prefix,
    // after every pg_email setting is defined.
    unsafe {
        #[cfg(not(feature = "pg13"))]
        pgrx::pg_sys::MarkGUCPrefixReserved(c"pg_email".as_ptr());
        #[cfg(feature = "pg13")]
        pgrx::pg_sys::EmitWarningsOnPlaceholders(c"pg_email".as_ptr());
    }
}

fn int(name: &'static CStr, short: &'static CStr, s: &'static GucSetting<i32>, min: i32, max: i32, flags: GucFlags) {
    GucRegistry::define_int_guc(name, short, c"", s, min, max, GucContext::Sighup, flags);
}

fn suset_int(
    name: &'static CStr,
    short: &'static CStr,
    s: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(name, short, c"", s, min, max, GucContext::Suset, flags);
}

fn string(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get().and_then(|c| c.into_string().ok()).filter(|v| !v.trim().is_empty())
}

fn ms(v: i32) -> Duration {
    Duration::from_millis(v.max(0) as u64)
}

pub fn database() -> String {
    string(&DATABASE).unwrap_or_else(|| "postgres".into())
}
pub fn workers() -> i32 {
    WORKERS.get()
}
pub fn default_sender() -> Option<String> {
    string(&DEFAULT_SENDER)
}
pub fn max_in_flight() -> usize {
    MAX_IN_FLIGHT.get().max(1) as usize
}
pub fn batch_size() -> usize {
    BATCH_SIZE.get().max(1) as usize
}
pub fn poll_interval() -> Duration {
    ms(POLL_INTERVAL_MS.get())
}
pub fn max_attempts() -> i32 {
    MAX_ATTEMPTS.get()
}
pub fn retry_base() -> Duration {
    ms(RETRY_BASE_MS.get())
}
pub fn retry_max() -> Duration {
    ms(RETRY_MAX_MS.get())
}
pub fn lease() -> Duration {
    ms(LEASE_MS.get())
}
pub fn paused() -> bool {
    PAUSED.get()
}
/// `None` when retention is off.
pub fn retention() -> Option<Duration> {
    let s = RETENTION_S.get();
    (s > 0).then(|| Duration::from_secs(s as u64))
}
/// In bytes.
pub fn max_message_size() -> usize {
    MAX_MESSAGE_SIZE_KB.get().max(0) as usize * 1024
}
pub fn max_recipients() -> usize {
    MAX_RECIPIENTS.get().max(1) as usize
}
pub fn template_fuel() -> u64 {
    TEMPLATE_FUEL.get().max(0) as u64
}
pub fn listen_address() -> Option<String> {
    string(&LISTEN_ADDRESS)
}
/// The base of tracking and unsubscribe links, without a trailing slash.
pub fn public_url() -> Option<String> {
    string(&PUBLIC_URL)
        .or_else(|| listen_address().map(|a| format!("http://{a}")))
        .map(|u| u.trim_end_matches('/').to_string())
}
pub fn track_opens() -> bool {
    TRACK_OPENS.get()
}
pub fn track_clicks() -> bool {
    TRACK_CLICKS.get()
}
/// Lower-cased, without a trailing dot.
pub fn bounce_domain() -> Option<String> {
    string(&BOUNCE_DOMAIN).map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
}
pub fn inbound_address() -> Option<String> {
    string(&INBOUND_ADDRESS)
}

pub fn submission_address() -> Option<String> {
    string(&SUBMISSION_ADDRESS)
}

/// The submission service's certificate and key files, when both are set.
pub fn submission_tls() -> Option<(String, String)> {
    Some((string(&SUBMISSION_TLS_CERT)?, string(&SUBMISSION_TLS_KEY)?))
}
/// The domains the inbound service accepts mail for: bounce_domain and inbound_domains.
pub fn inbound_domains() -> Vec<String> {
    let mut out: Vec<String> = bounce_domain().into_iter().collect();
    if let Some(list) = string(&INBOUND_DOMAINS) {
        out.extend(
            list.split(',').map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()).filter(|d| !d.is_empty()),
        );
    }
    out
}
/// The webhook allow list as written (parsed by `outbound::AllowList`).
pub fn webhook_allow_hosts() -> Option<String> {
    string(&WEBHOOK_ALLOW_HOSTS)
}
pub fn webhook_timeout() -> Duration {
    ms(WEBHOOK_TIMEOUT_MS.get())
}
pub fn webhook_concurrency() -> usize {
    WEBHOOK_CONCURRENCY.get().max(1) as usize
}
/// `None`: the dashboard is off.
pub fn dashboard_password() -> Option<String> {
    DASHBOARD_PASSWORD.get().and_then(|c| c.into_string().ok()).filter(|v| !v.is_empty())
}

//! Provider event webhooks: signature checks on the raw body and normalization into receipt
//! events. No pgrx here: the listener worker calls it between its slices (pure Rust, on its main
//! thread), and `email.ingest_webhook` calls it in an ordinary backend. Each provider is one
//! module; this one holds what they share: the types, reading the DSN options, and the small
//! parsers every provider needs (SMTP replies, RFC 3339 times, our message id, IP addresses).
//!
//! Every check is made on the body exactly as it came, before it is parsed. Nothing here panics
//! on any input: bodies are untrusted until their signature is checked, and authentic bodies may
//! still have any shape. A refusal names what is wrong and never repeats a secret.

pub mod mailgun;
pub mod postmark;
pub mod resend;
pub mod sendgrid;
pub mod ses;

use std::collections::BTreeMap;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::Value;

use crate::deliver::dsn::{Dsn, Kind};

/// One request as received: header names lower-case, the body exactly as it came.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
    /// Now, in Unix seconds (for timestamp windows).
    pub now: i64,
}

impl Request<'_> {
    /// The value of a header (name given lower-case); the first one when repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A transport's webhook settings, from its DSN options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Config {
    /// `webhook_key`: the SPKI DER of the P-256 public key (decoded from base64).
    SendGrid { public_key: Vec<u8> },
    /// `webhook_user`, `webhook_password`: HTTP Basic credentials.
    Postmark { user: String, password: String },
    /// `webhook_secret`: each `whsec_` secret, base64-decoded (space-separated for rotation).
    Resend { secrets: Vec<Vec<u8>> },
    /// `webhook_signing_key`.
    Mailgun { signing_key: String },
    /// `sns_topic_arn`, `sns_url_prefix` (default `https://sns.<region>.amazonaws.com/`), and an
    /// optional pinned certificate `sns_cert_pem`.
    Ses { topic_arn: String, url_prefix: String, cert_pem: Option<String> },
}

/// The receipt event names a webhook can produce, and `unknown` for an authentic event of a
/// type pg_email does not know (kept in `email.unmatched_events` only).
pub const EVENTS: &[&str] =
    &["delivered", "deferred", "bounced", "complained", "opened", "clicked", "unsubscribed", "unknown"];

/// One normalized provider event.
/// Serialized without its empty fields: a row for `email._record_events` is parsed as jsonb, and
/// absent keys read as NULL there.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    /// One of `EVENTS`.
    pub event: &'static str,
    /// The provider's id of this event, or `sha256:<hex>` of the event's JSON when it has none.
    pub provider_event_id: String,
    /// Our `email.messages.id`, echoed back as custom data under the key `pg_email_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_email_id: Option<i64>,
    /// The provider's id of the message (as its send API answered it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_message_id: Option<String>,
    /// The RFC 5322 Message-ID, with angle brackets (`<x@y>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rfc_message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// `hard`, `soft` or `block` for `bounced`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_code: Option<i32>,
    /// RFC 3463 only (`5.1.1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// A valid IPv4/IPv6 address, or None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The provider says a machine did it (SendGrid `sg_machine_open`, a known proxy agent).
    pub machine: bool,
    /// When it happened, in Unix seconds, when the provider says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<f64>,
    /// The event as received (one element of a batch).
    pub payload: serde_json::Value,
}

/// What an authentic request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Verified {
    Events(Vec<Event>),
    /// SES: the certificate at this URL (already checked against the prefix) is needed first.
    NeedCertificate(String),
    /// SES: an authentic SubscriptionConfirmation for our topic; GET this URL once to confirm.
    Confirm {
        subscribe_url: String,
        payload: serde_json::Value,
    },
    /// Authentic and nothing to store (an SNS UnsubscribeConfirmation).
    Ignore(String),
}

/// Why a request is refused: the HTTP status to answer and a reason for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refused {
    pub status: u16,
    pub reason: String,
}

impl Config {
    /// The webhook settings of a parsed DSN; None when it has none.
    pub fn from_dsn(dsn: &Dsn) -> Result<Option<Config>, String> {
        match dsn.kind {
            Kind::Http(p) => Config::from_options(p.name(), &dsn.options),
            Kind::Smtp | Kind::File | Kind::Capture => Ok(None),
        }
    }

    /// The webhook settings in the DSN options of `provider` (a provider name such as
    /// `sendgrid`); None when there are none. The provider modules' DSN checks call this too, so
    /// a DSN that `email.add_transport` accepts always gives a usable configuration. Errors name
    /// the option and never repeat its value.
    pub fn from_options(provider: &str, options: &BTreeMap<String, String>) -> Result<Option<Config>, String> {
        match provider {
            "sendgrid" => sendgrid::config(options),
            "postmark" => postmark::config(options),
            "resend" => resend::config(options),
            "mailgun" => mailgun::config(options),
            "ses" => ses::config(options),
            _ => Ok(None),
        }
    }
}

/// Verifies `req` for a transport with settings `cfg` and normalizes its events. `cert` is the
/// PEM certificate fetched after `Verified::NeedCertificate` (SES only).
pub fn verify(cfg: &Config, req: &Request, cert: Option<&[u8]>) -> Result<Verified, Refused> {
    match cfg {
        Config::SendGrid { public_key } => sendgrid::verify(public_key, req),
        Config::Postmark { user, password } => postmark::verify(user, password, req),
        Config::Resend { secrets } => resend::verify(secrets, req),
        Config::Mailgun { signing_key } => mailgun::verify(signing_key, req),
        Config::Ses { topic_arn, url_prefix, cert_pem } => {
            ses::verify(&ses::Settings { topic_arn, url_prefix, cert_pem: cert_pem.as_deref() }, req, cert)
        }
    }
}

/// Replaces NUL characters, which neither `text` nor `jsonb` can hold, with U+FFFD: an
/// authentic event carrying one (`\u0000` in its JSON) is stored, not refused for ever.
pub fn without_nul(v: &mut serde_json::Value) {
    const NUL: char = '\0';
    match v {
        serde_json::Value::String(s) if s.contains(NUL) => *s = s.replace(NUL, "\u{FFFD}"),
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_nul),
        serde_json::Value::Object(o) => {
            if o.keys().any(|k| k.contains(NUL)) {
                let entries: Vec<(String, serde_json::Value)> = std::mem::take(o).into_iter().collect();
                *o = entries.into_iter().map(|(k, v)| (k.replace(NUL, "\u{FFFD}"), v)).collect();
            }
            o.values_mut().for_each(without_nul);
        }
        _ => {}
    }
}

/// An event as a row for `email._record_events` (the listener and `email.ingest_webhook`).
pub fn row(transport: &str, e: &Event) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or(serde_json::Value::Null);
    without_nul(&mut v);
    if let Some(o) = v.as_object_mut() {
        o.insert("transport".into(), transport.into());
        o.insert("source".into(), "webhook".into());
    }
    v
}

// ---------------------------------------------------------------------------------------------
// What the provider modules share.

impl Event {
    /// An event with only its name and id set.
    pub(crate) fn new(event: &'static str, provider_event_id: String) -> Event {
        Event {
            event,
            provider_event_id,
            pg_email_id: None,
            provider_message_id: None,
            rfc_message_id: None,
            recipient: None,
            bounce_type: None,
            smtp_code: None,
            enhanced_code: None,
            provider_code: None,
            response: None,
            url: None,
            user_agent: None,
            ip: None,
            machine: false,
            at: None,
            payload: Value::Null,
        }
    }

    /// Sets `response` to `text` and reads the SMTP code and RFC 3463 code out of it, unless
    /// they are already known.
    pub(crate) fn set_response(&mut self, text: Option<&str>) {
        let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else { return };
        let (code, enhanced) = crate::reply::parse_reply(text);
        self.smtp_code = self.smtp_code.or(code);
        if self.enhanced_code.is_none() {
            self.enhanced_code = enhanced;
        }
        self.response = Some(text.to_string());
    }

    /// Sets `user_agent`, and `machine` when the agent is a known proxy or scanner.
    pub(crate) fn set_user_agent(&mut self, ua: Option<&str>) {
        if let Some(ua) = ua.map(str::trim).filter(|u| !u.is_empty()) {
            self.machine |= is_machine_agent(ua);
            self.user_agent = Some(ua.to_string());
        }
    }
}

/// A refusal.
pub(crate) fn refuse(status: u16, reason: impl Into<String>) -> Refused {
    Refused { status, reason: reason.into() }
}

/// The body parsed as JSON, or a 400. serde_json refuses nesting deeper than 128 levels, so no
/// body can exhaust the stack here or later.
pub(crate) fn json_body(body: &[u8], provider: &str) -> Result<Value, Refused> {
    serde_json::from_slice(body).map_err(|e| refuse(400, format!("the body is not {provider} JSON: {e}")))
}

/// The value at `path` in nested objects.
pub(crate) fn at_path<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// The non-empty string at `path`.
pub(crate) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at_path(v, path).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

/// A number, or a string holding one (providers are not consistent).
pub(crate) fn number(v: Option<&Value>) -> Option<f64> {
    let n = match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    n.is_finite().then_some(n)
}

/// A string, or a number written as one (an id).
pub(crate) fn id_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Our message id, sent as custom data under `pg_email_id` and echoed back as a JSON number or a
/// string; None unless it is a positive integer.
pub(crate) fn pg_email_id(v: Option<&Value>) -> Option<i64> {
    let id = match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse::<i64>().ok()
        }
        // SES tags come as lists of values.
        Value::Array(a) if a.len() == 1 => return pg_email_id(a.first()),
        _ => None,
    }?;
    (id > 0).then_some(id)
}

/// A valid IPv4 or IPv6 address, as written.
pub(crate) fn valid_ip(s: Option<&str>) -> Option<String> {
    let s = s?.trim();
    s.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_string())
}

/// A Message-ID with angle brackets (`<x@y>`), from one written with or without them.
pub(crate) fn angle(id: Option<&str>) -> Option<String> {
    let inner = id?.trim().trim_start_matches('<').trim_end_matches('>').trim();
    if inner.is_empty() || inner.contains(|c: char| c.is_whitespace() || c == '<' || c == '>') {
        return None;
    }
    Some(format!("<{inner}>"))
}

/// Lower-case hex of the SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    hex(d.as_ref())
}

/// `sha256:<hex>` of a JSON value (its serialization), for an event the provider gives no id.
pub(crate) fn hash_id(v: &Value) -> String {
    format!("sha256:{}", sha256_hex(&serde_json::to_vec(v).unwrap_or_default()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes lower- or upper-case hex.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    s.as_bytes().chunks(2).map(|p| Some((digit(*p.first()?)? * 16 + digit(*p.get(1)?)?) as u8)).collect()
}

/// Compares two secrets in time that depends on neither (both are hashed first, so not even
/// their lengths show).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    da.as_ref().iter().zip(db.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64, with or without padding.
pub(crate) fn b64(s: &str) -> Option<Vec<u8>> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(s.trim()).ok()
}

/// The DER inside a DSN option holding base64 or PEM. DSN option values are form-decoded, so a
/// `+` not written as `%2B` arrives as a space: inside base64 a space can only be that, and is
/// read as `+`. Line breaks and tabs are dropped.
pub(crate) fn pem_or_base64(value: &str) -> Option<Vec<u8>> {
    let body = match value.find("-----BEGIN") {
        Some(start) => {
            let after = value.get(start + "-----BEGIN".len()..)?;
            let after = after.get(after.find("-----")? + "-----".len()..)?;
            after.get(..after.find("-----END")?)?
        }
        None => value,
    };
    let cleaned: String = body
        .trim()
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n' | '\t'))
        .map(|c| if c == ' ' { '+' } else { c })
        .collect();
    b64(&cleaned).filter(|d| !d.is_empty())
}

/// How a permanent failure is classed from its RFC 3463 code: `block` for a policy or security
/// refusal (`5.7.x`: reputation, DMARC, spam content, which say nothing about the address),
/// `soft` for a full mailbox (`5.2.2`, which usually clears), `hard` otherwise.
pub(crate) fn permanent_kind(enhanced: Option<&str>) -> &'static str {
    match enhanced {
        Some(e) if e.starts_with("5.7.") => "block",
        Some("5.2.2") => "soft",
        _ => "hard",
    }
}

/// Whether a user agent is a known image proxy or link scanner rather than a person: Gmail's and
/// Yahoo's image proxies, headless browsers and scripted clients. Apple Mail Privacy Protection
/// sends no telling agent; SendGrid's `sg_machine_open` covers it.
pub fn is_machine_agent(ua: &str) -> bool {
    const MARKERS: &[&str] = &[
        "googleimageproxy",
        "ggpht.com",
        "yahoomailproxy",
        "headlesschrome",
        "python-requests",
        "go-http-client",
        "curl/",
        "wget/",
        "barracuda",
        "mimecast",
        "proofpoint",
    ];
    let ua = ua.to_ascii_lowercase();
    MARKERS.iter().any(|m| ua.contains(m))
}

/// A time given as Unix seconds (a number or numeric string) or as RFC 3339.
pub(crate) fn time(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::String(s) => crate::datetime::parse_iso8601(s).map(|t| t.unix_seconds()).or_else(|| number(v)),
        other => number(Some(other)),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the provider tests share: requests, and a check that a body never panics.

    use super::*;

    pub fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect()
    }

    /// The events of an authentic request, or a panic saying why there are none.
    pub fn events(v: Result<Verified, Refused>) -> Vec<Event> {
        match v {
            Ok(Verified::Events(e)) => e,
            other => panic!("not events: {other:?}"),
        }
    }

    /// The one event of an authentic request.
    pub fn one(v: Result<Verified, Refused>) -> Event {
        let mut e = events(v);
        assert_eq!(e.len(), 1, "{e:?}");
        e.remove(0)
    }

    /// The status of a refusal.
    pub fn status(v: Result<Verified, Refused>) -> u16 {
        match v {
            Err(r) => r.status,
            Ok(ok) => panic!("accepted: {ok:?}"),
        }
    }

    /// Hostile bodies: not JSON, truncated, deeply nested, invalid UTF-8, wrong types.
    pub fn hostile_bodies(valid: &[u8]) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"not json".to_vec(),
            b"null".to_vec(),
            b"42".to_vec(),
            b"\"a string\"".to_vec(),
            b"{}".to_vec(),
            b"[1, 2, 3]".to_vec(),
            b"[{}]".to_vec(),
            b"{\"a\":\xff\xfe}".to_vec(),
            vec![0xff, 0xfe, 0x00, 0x7b],
            "[".repeat(100_000).into_bytes(),
            format!("{}{}", "{\"a\":".repeat(20_000), "}".repeat(20_000)).into_bytes(),
        ];
        for cut in [1, valid.len() / 3, valid.len() / 2, valid.len().saturating_sub(1)] {
            out.push(valid.get(..cut).unwrap_or(valid).to_vec());
        }
        out
    }

    /// Keys the providers' payloads use, so random JSON reaches past the first checks.
    const KEYS: &[&str] = &[
        "event",
        "sg_event_id",
        "sg_message_id",
        "email",
        "timestamp",
        "type",
        "status",
        "reason",
        "response",
        "useragent",
        "ip",
        "url",
        "sg_machine_open",
        "pg_email_id",
        "smtp-id",
        "RecordType",
        "ID",
        "Type",
        "MessageID",
        "Metadata",
        "Email",
        "Recipient",
        "Details",
        "BouncedAt",
        "Geo",
        "IP",
        "OriginalLink",
        "UserAgent",
        "SuppressSending",
        "SuppressionReason",
        "data",
        "created_at",
        "email_id",
        "to",
        "tags",
        "name",
        "value",
        "bounce",
        "click",
        "link",
        "ipAddress",
        "userAgent",
        "severity",
        "recipient",
        "message",
        "headers",
        "message-id",
        "delivery-status",
        "code",
        "enhanced-code",
        "user-variables",
        "client-info",
        "bot",
        "eventType",
        "notificationType",
        "mail",
        "messageId",
        "destination",
        "commonHeaders",
        "bounceType",
        "bounceSubType",
        "bouncedRecipients",
        "emailAddress",
        "diagnosticCode",
        "complaint",
        "complainedRecipients",
        "delivery",
        "recipients",
        "smtpResponse",
        "deliveryDelay",
        "delayedRecipients",
        "open",
    ];

    /// String values the normalizers look for.
    const STRINGS: &[&str] = &[
        "",
        " ",
        "bounce",
        "blocked",
        "delivered",
        "deferred",
        "open",
        "click",
        "spamreport",
        "unsubscribe",
        "Bounce",
        "SpamComplaint",
        "Delivery",
        "Open",
        "Click",
        "SubscriptionChange",
        "HardBounce",
        "SoftBounce",
        "Transient",
        "Blocked",
        "ManualSuppression",
        "email.bounced",
        "email.clicked",
        "email.delivered",
        "failed",
        "permanent",
        "temporary",
        "espblock",
        "suppress-bounce",
        "opened",
        "clicked",
        "Permanent",
        "Undetermined",
        "General",
        "MailboxFull",
        "Complaint",
        "DeliveryDelay",
        "smtp;550 5.1.1 user unknown",
        "5.7.1",
        "4.4.1",
        "250 2.6.0 ok",
        "2024-01-02T03:04:05Z",
        "2024-13-45T99:99:99+99:99",
        "192.0.2.1",
        "::1",
        "42",
        "-1",
        "99999999999999999999",
        "a@example.net",
        "<m@x>",
        "é;550",
        "GoogleImageProxy",
    ];

    /// Random JSON, nested a few levels, with the providers' keys and values.
    pub fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_string())),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    /// What every answer must be: a 4xx refusal, or events that are [`well_formed`].
    pub fn sane(v: &Result<Verified, Refused>) {
        match v {
            Err(r) => assert!((400..500).contains(&r.status), "{r:?}"),
            Ok(Verified::Events(events)) => events.iter().for_each(well_formed),
            Ok(_) => {}
        }
    }

    /// Every event name is one of [`EVENTS`] and `bounce_type` is set exactly for `bounced`.
    pub fn well_formed(e: &Event) {
        assert!(EVENTS.contains(&e.event), "{e:?}");
        assert_eq!(e.bounce_type.is_some(), e.event == "bounced", "{e:?}");
        if let Some(b) = e.bounce_type {
            assert!(["hard", "soft", "block"].contains(&b), "{e:?}");
        }
        assert!(!e.provider_event_id.is_empty());
        if let Some(c) = &e.enhanced_code {
            assert!(crate::reply::is_enhanced(c), "{e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_never_carry_nul() {
        let mut e = super::Event::new("delivered", "a\0b".into());
        e.payload = serde_json::json!({"k\0": ["x\0y", {"z": "\0"}]});
        let row = super::row("t", &e).to_string();
        assert!(!row.contains("\\u0000"), "{row}");
        assert!(row.contains("a\u{FFFD}b"));
    }

    use super::*;
    use crate::deliver::dsn::parse;

    #[test]
    fn smtp_replies_are_read_with_their_codes() {
        let cases: &[(&str, Option<i32>, Option<&str>)] = &[
            ("smtp;550 5.1.1 The email account that you tried to reach does not exist.", Some(550), Some("5.1.1")),
            ("smtp; 550-5.1.1 user unknown", Some(550), Some("5.1.1")),
            ("250 2.6.0 Message received", Some(250), Some("2.6.0")),
            ("250 OK", Some(250), None),
            ("421 4.7.0 [TSS04] Messages temporarily deferred", Some(421), Some("4.7.0")),
            ("5.1.1 The email account does not exist", None, Some("5.1.1")),
            ("X-Postfix; host said: 552 5.2.2 mailbox full", None, None),
            ("Mailbox full (5.2.2)", None, Some("5.2.2")),
            ("unable to get mx info: failed to get IPs from PTR record", None, None),
            ("550 see https://x.example/5.1.1/help 5.1.1", Some(550), None),
            ("550 5.1.1", Some(550), Some("5.1.1")),
            ("600 1.2.3 not a code", None, None),
            ("", None, None),
            ("5", None, None),
            ("55", None, None),
            ("550", Some(550), None),
            ("smtp;", None, None),
            ("é;550 5.1.1", None, Some("5.1.1")),
        ];
        for (text, code, enhanced) in cases {
            assert_eq!(crate::reply::parse_reply(text), (*code, enhanced.map(str::to_string)), "{text}");
        }
        assert!(
            crate::reply::is_enhanced("5.1.1")
                && crate::reply::is_enhanced("4.7.650")
                && crate::reply::is_enhanced("2.0.0")
        );
        assert!(
            !crate::reply::is_enhanced("5.1")
                && !crate::reply::is_enhanced("3.1.1")
                && !crate::reply::is_enhanced("5.1.1.1")
                && !crate::reply::is_enhanced("5.1234.1")
        );
        assert!(
            !crate::reply::is_enhanced("5..1") && !crate::reply::is_enhanced("5.a.1") && !crate::reply::is_enhanced("")
        );
    }

    #[test]
    fn permanent_failures_are_classed_by_their_code() {
        assert_eq!(permanent_kind(Some("5.1.1")), "hard");
        assert_eq!(permanent_kind(None), "hard");
        assert_eq!(permanent_kind(Some("5.7.1")), "block");
        assert_eq!(permanent_kind(Some("5.7.26")), "block");
        assert_eq!(permanent_kind(Some("5.2.2")), "soft");
    }

    #[test]
    fn times_are_unix_seconds_or_iso8601() {
        assert_eq!(time(Some(&serde_json::json!("2024-01-01T22:04:05-05:00"))), Some(1_704_164_645.0));
        assert_eq!(time(Some(&serde_json::json!("2024-01-02T03:04:05Zjunk"))), None);
        assert_eq!(time(Some(&serde_json::json!(1_700_000_000))), Some(1_700_000_000.0));
        assert_eq!(time(Some(&serde_json::json!("1700000000.5"))), Some(1_700_000_000.5));
        assert_eq!(time(Some(&serde_json::json!(true))), None);
    }

    #[test]
    fn our_message_id_is_a_positive_integer() {
        use serde_json::json;
        assert_eq!(pg_email_id(Some(&json!(42))), Some(42));
        assert_eq!(pg_email_id(Some(&json!("42"))), Some(42));
        assert_eq!(pg_email_id(Some(&json!(["42"]))), Some(42));
        for bad in [json!(0), json!(-3), json!("-3"), json!("4 2"), json!("42abc"), json!(4.5), json!(""), json!(null)]
        {
            assert_eq!(pg_email_id(Some(&bad)), None, "{bad}");
        }
        assert_eq!(pg_email_id(Some(&json!("99999999999999999999"))), None);
        assert_eq!(pg_email_id(Some(&json!(["1", "2"]))), None);
        assert_eq!(pg_email_id(None), None);
    }

    #[test]
    fn small_helpers() {
        assert_eq!(valid_ip(Some(" 192.0.2.1 ")).as_deref(), Some("192.0.2.1"));
        assert_eq!(valid_ip(Some("2001:db8::1")).as_deref(), Some("2001:db8::1"));
        assert_eq!(valid_ip(Some("192.0.2.1, 10.0.0.1")), None);
        assert_eq!(valid_ip(Some("not an ip")), None);
        assert_eq!(angle(Some("a@b")).as_deref(), Some("<a@b>"));
        assert_eq!(angle(Some(" <a@b> ")).as_deref(), Some("<a@b>"));
        assert_eq!(angle(Some("<>")), None);
        assert_eq!(angle(Some("a b@c")), None);
        assert_eq!(unhex("00ffA0"), Some(vec![0, 255, 160]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é"), None);
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(is_machine_agent(
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
        ));
        assert!(!is_machine_agent("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"));
        assert_eq!(pem_or_base64("AQID"), Some(vec![1, 2, 3]));
        // A form-decoded `+` (a space) is read back as `+`.
        assert_eq!(pem_or_base64("-----BEGIN X-----\n+/8=\n-----END X-----\n"), Some(vec![0xfb, 0xff]));
        assert_eq!(pem_or_base64("-----BEGIN X----- /w==\n-----END X-----"), Some(vec![0xff]));
        assert_eq!(pem_or_base64(" /w== "), Some(vec![0xff]));
        assert_eq!(pem_or_base64("-----BEGIN X-----"), None);
        assert_eq!(pem_or_base64(""), None);
    }

    proptest::proptest! {
        /// Random bytes and headers against every provider: a 4xx, never a panic.
        #[test]
        fn random_requests_are_refused(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            names in proptest::collection::vec(proptest::sample::select(&[
                "authorization", "svix-id", "svix-timestamp", "svix-signature", "webhook-signature",
                "x-twilio-email-event-webhook-signature", "x-twilio-email-event-webhook-timestamp",
            ][..]), 0..4),
            value in ".{0,40}",
        ) {
            let headers: Vec<(String, String)> = names.iter().map(|n| (n.to_string(), value.clone())).collect();
            let req = Request { headers: &headers, body: &body, now: 0 };
            let spki = {
                let mut k = unhex("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
                k.push(4);
                k.extend([1u8; 64]);
                k
            };
            for cfg in [
                Config::SendGrid { public_key: spki },
                Config::Postmark { user: "u".into(), password: "p".into() },
                Config::Resend { secrets: vec![vec![1; 24]] },
                Config::Mailgun { signing_key: "k".into() },
                Config::Ses { topic_arn: "arn:t".into(), url_prefix: "https://sns/".into(), cert_pem: None },
            ] {
                let got = verify(&cfg, &req, Some(&body));
                proptest::prop_assert!(got.as_ref().is_err_and(|r| (400..500).contains(&r.status)), "{got:?}");
            }
        }
    }

    #[test]
    fn transports_without_webhook_options_have_no_config() {
        for dsn in [
            "smtp://u:p@mail.example.org:587",
            "sendgrid+api://SG.key@default",
            "postmark+api://TOKEN@default",
            "resend+api://re_1@default",
            "mailgun+api://KEY:mg.example.org@default",
            "ses+api://AKIA:s@default?region=eu-west-1",
            "capture://",
        ] {
            assert_eq!(Config::from_dsn(&parse(dsn).unwrap()), Ok(None), "{dsn}");
        }
    }
}
